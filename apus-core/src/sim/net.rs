//! Simulated remote memory: links, one-sided operations, grants.
//!
//! Each pair of nodes has one connection. Operations on a connection take
//! effect in the order posted (a per-direction FIFO of arrival times); a
//! write may become visible in two pieces (a torn landing) and is checked
//! against the target's access rules and write grant for each piece, exactly
//! as the transport contract says. Breaking a connection fails every
//! operation still on it and tells both ends.

use std::collections::{BinaryHeap, HashSet};

use crate::identity::PeerBook;
use crate::layout::{RegionLayout, RemoteAccess};
use crate::region::Region;
use crate::rng::Rng;
use crate::transport::{
    Capabilities, Completion, OpError, OpId, RemoteOp, Transport, TransportError, TransportEvent,
    Wake,
};
use crate::types::NodeId;

/// Which operation, on which connection.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    /// The node that posted it.
    pub src: usize,
    /// The node it targets.
    pub dst: usize,
    /// The connection it was posted on; a broken connection's traffic is void.
    pub epoch: u64,
    /// The operation.
    pub op: OpId,
}

/// A piece of a write: all of it, or one of the two halves of a torn landing.
#[derive(Debug)]
pub struct WritePiece {
    /// The write.
    pub route: Route,
    /// Where this piece goes in the target region.
    pub offset: usize,
    /// Its bytes, or where in the poster's region they are read from when
    /// the piece lands (offset, length).
    pub bytes: PieceBytes,
    /// The whole write's offset and length (access is checked on it).
    pub whole: (usize, usize),
    /// Whether this is the write's last piece.
    pub last: bool,
}

/// A write piece's payload.
#[derive(Debug)]
pub enum PieceBytes {
    /// Copied from the source when the write was posted.
    Posted(Vec<u8>),
    /// Read from the poster's region when the piece lands: whatever the
    /// engine put there meanwhile is what arrives.
    AtLanding { from: usize, len: usize },
}

/// Something scheduled to happen.
#[derive(Debug)]
pub enum Ev {
    /// Run one engine-loop iteration of a node.
    Run(usize),
    /// Part of a write arrives at its target.
    Land(WritePiece),
    /// A read (or compare-and-swap) arrives at its target.
    Serve(Route, RemoteOp),
    /// An operation's outcome arrives back at its poster, with the data a
    /// read brought back (local offset, bytes).
    Reply(Route, Result<(), OpError>, Option<(usize, Vec<u8>)>),
    /// A transport event is delivered to `node`'s engine.
    Deliver { node: usize, event: TransportEvent },
    /// A node's sync finished.
    SyncDone {
        node: usize,
        incarnation: u64,
        token: u64,
    },
    /// Scheduled faults and their ends.
    Fault(usize),
    /// A fault's effect ends.
    Heal(HealKind),
    /// The client proposes.
    Client,
    /// Every fault heals now.
    HealAll,
}

/// What ends.
#[derive(Clone, Copy, Debug)]
pub enum HealKind {
    /// A crashed node restarts.
    Restart(usize),
    /// A cut between two nodes ends.
    Uncut(usize, usize),
    /// The connection between two nodes is declared lost (a one-way loss
    /// met the operation deadline).
    Cut(usize, usize),
    /// A one-way loss of packets from the first node to the second ends,
    /// and with it the cut its deadline made.
    Unblock(usize, usize),
    /// After healing: a connection that was cut for a one-way loss comes
    /// back.
    Reconnect(usize, usize),
}

#[derive(Debug)]
pub(crate) struct Queued {
    pub time: u64,
    pub seq: u64,
    pub ev: Ev,
}

impl PartialEq for Queued {
    fn eq(&self, o: &Self) -> bool {
        (self.time, self.seq) == (o.time, o.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Queued {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.time, o.seq).cmp(&(self.time, self.seq))
    }
}

/// The event queue.
#[derive(Debug, Default)]
pub struct Queue {
    heap: BinaryHeap<Queued>,
    seq: u64,
}

impl Queue {
    /// Schedules `ev` at `time`.
    pub fn push(&mut self, time: u64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Queued {
            time,
            seq: self.seq,
            ev,
        });
    }

    pub(crate) fn pop(&mut self) -> Option<Queued> {
        self.heap.pop()
    }
}

#[derive(Debug, Clone)]
struct Link {
    up: bool,
    epoch: u64,
    cuts: u32,
    /// Operations posted on this connection and not yet completed, by poster.
    pending: Vec<(usize, OpId)>,
}

/// The network and every node's memory.
#[derive(Debug)]
pub struct Net {
    n: usize,
    layout: RegionLayout,
    links: Vec<Link>,
    /// Last arrival time per direction, for FIFO delivery.
    last_arrival: Vec<u64>,
    /// Per direction: nothing sent arrives before this (a stall).
    stalled_until: Vec<u64>,
    /// Per direction: how many one-way faults lose its packets now.
    blocked: Vec<u32>,
    /// Last delivery time of a transport event per node: a transport reports
    /// events to its engine in the order they happened.
    last_deliver: Vec<u64>,
    latency: Vec<Vec<(u64, u64)>>,
    torn_chance: f64,
    late_source_chance: f64,
    /// Each node's region (replaced on restart).
    pub regions: Vec<Region>,
    /// Who may write each node's ring.
    pub grant: Vec<Option<NodeId>>,
    /// Whether each node is up.
    pub alive: Vec<bool>,
    failed_ops: HashSet<(usize, OpId)>,
    /// Writes refused for lack of a grant (fencing at work).
    pub denied_writes: u64,
    /// Torn landings.
    pub torn_landings: u64,
    /// Each node's incarnations book (its storage keeps it across crashes;
    /// a wipe starts a new one). Every connection that comes up is a
    /// handshake between the two books.
    pub books: Vec<PeerBook>,
    /// A handshake told the node it is a replacement: it must rejoin
    /// before its next poll.
    pub rejoin: Vec<bool>,
}

const CPU_DELAY: (u64, u64) = (100, 1_000);
/// How long a transport takes to report a connection's loss, ns.
pub(crate) const DETECT_DELAY: (u64, u64) = (5_000, 50_000);

impl Net {
    pub(crate) fn new(
        layout: RegionLayout,
        latency: Vec<Vec<(u64, u64)>>,
        torn_chance: f64,
        late_source_chance: f64,
    ) -> Net {
        let n = layout.replicas();
        let mut net = Net {
            n,
            layout,
            links: vec![
                Link {
                    up: true,
                    epoch: 1,
                    cuts: 0,
                    pending: Vec::new(),
                };
                n * n
            ],
            last_arrival: vec![0; n * n],
            stalled_until: vec![0; n * n],
            blocked: vec![0; n * n],
            last_deliver: vec![0; n],
            latency,
            torn_chance,
            late_source_chance,
            regions: (0..n).map(|_| Region::new(layout.region_len())).collect(),
            grant: vec![None; n],
            alive: vec![true; n],
            failed_ops: HashSet::new(),
            denied_writes: 0,
            torn_landings: 0,
            books: (0..n).map(|i| PeerBook::new(i as u64 + 1)).collect(),
            rejoin: vec![false; n],
        };
        // The links start up: every pair has met.
        for a in 0..n {
            for b in a + 1..n {
                net.meet(a, b);
            }
        }
        net
    }

    /// The handshake of a connection coming up, as the runtime's: the
    /// dialer (higher id) learns from the acceptor's challenge, the acceptor
    /// from the dialer's proof, which already says what the dialer learned.
    fn meet(&mut self, a: usize, b: usize) {
        let (dialer, acceptor) = (a.max(b), a.min(b));
        let (d, c) = (NodeId(dialer as u8), NodeId(acceptor as u8));
        let ch = self.books[acceptor].clone();
        let told = self.books[dialer].met(c, ch.incarnation, ch.remembered(d), &ch.superseded);
        let pr = self.books[dialer].clone();
        let heard = self.books[acceptor].met(d, pr.incarnation, pr.remembered(c), &pr.superseded);
        self.rejoin[dialer] |= told.replaced;
        self.rejoin[acceptor] |= heard.replaced;
    }

    fn pair(&self, a: usize, b: usize) -> usize {
        a.min(b) * self.n + a.max(b)
    }

    fn arrival(&mut self, rng: &mut Rng, now: u64, src: usize, dst: usize) -> u64 {
        let (base, jitter) = self.latency[src][dst];
        let t = now + base + rng.range(0, jitter + 1);
        let t = t.max(self.stalled_until[src * self.n + dst]);
        let slot = &mut self.last_arrival[src * self.n + dst];
        let t = t.max(*slot + 1);
        *slot = t;
        t
    }

    /// Holds everything `src` sends until `until` (then it arrives in order).
    pub fn stall(&mut self, src: usize, until: u64) {
        for dst in 0..self.n {
            let slot = &mut self.stalled_until[src * self.n + dst];
            *slot = (*slot).max(until);
        }
    }

    /// Adds (`delta = 1`) or removes (`-1`) a one-way loss of everything
    /// `src` sends to `dst` (see `Fault::OneWay`).
    pub fn block(&mut self, src: usize, dst: usize, delta: i32) {
        let b = &mut self.blocked[src * self.n + dst];
        *b = b.saturating_add_signed(delta);
    }

    /// Ends every one-way loss (a connection that lost packets must be cut
    /// first, see `World::heal_all`).
    pub fn clear_blocks(&mut self) {
        self.blocked.fill(0);
    }

    /// Whether packets from `src` to `dst` are lost now.
    pub fn is_blocked(&self, src: usize, dst: usize) -> bool {
        self.blocked[src * self.n + dst] > 0
    }

    /// Whether the connection between `a` and `b` is up.
    pub fn link_up(&self, a: usize, b: usize) -> bool {
        self.links[self.pair(a, b)].up
    }

    /// Adds (`delta = 1`) or removes (`-1`) a cut between `a` and `b`, and
    /// brings the connection to the state the cuts and node liveness ask for.
    pub fn cut(&mut self, q: &mut Queue, rng: &mut Rng, now: u64, a: usize, b: usize, delta: i32) {
        let p = self.pair(a, b);
        self.links[p].cuts = self.links[p].cuts.saturating_add_signed(delta);
        self.refresh(q, rng, now, a, b);
    }

    /// Removes every cut between `a` and `b`.
    pub fn clear_cuts(&mut self, q: &mut Queue, rng: &mut Rng, now: u64, a: usize, b: usize) {
        let p = self.pair(a, b);
        self.links[p].cuts = 0;
        self.refresh(q, rng, now, a, b);
    }

    /// Brings the connection between `a` and `b` to its desired state.
    pub fn refresh(&mut self, q: &mut Queue, rng: &mut Rng, now: u64, a: usize, b: usize) {
        let p = self.pair(a, b);
        let want = self.alive[a] && self.alive[b] && self.links[p].cuts == 0;
        if want == self.links[p].up {
            return;
        }
        let link = &mut self.links[p];
        link.up = want;
        link.epoch += 1;
        if want {
            self.meet(a, b);
            for (x, y) in [(a, b), (b, a)] {
                self.deliver(q, rng, now, x, TransportEvent::PeerUp(NodeId(y as u8)));
            }
        } else {
            let pending = std::mem::take(&mut link.pending);
            for (poster, op) in pending {
                let peer = if poster == a { b } else { a };
                if self.alive[poster] {
                    let event = TransportEvent::Completed(Completion {
                        op,
                        peer: NodeId(peer as u8),
                        result: Err(OpError::PeerUnreachable),
                    });
                    self.deliver(q, rng, now, poster, event);
                }
            }
            for (x, y) in [(a, b), (b, a)] {
                if self.alive[x] {
                    self.deliver(q, rng, now, x, TransportEvent::PeerDown(NodeId(y as u8)));
                }
            }
        }
    }

    /// Schedules a transport event for `node`, after the ones before it.
    pub(crate) fn deliver(
        &mut self,
        q: &mut Queue,
        rng: &mut Rng,
        now: u64,
        node: usize,
        event: TransportEvent,
    ) {
        let t = (now + rng.range(DETECT_DELAY.0, DETECT_DELAY.1)).max(self.last_deliver[node] + 1);
        self.last_deliver[node] = t;
        q.push(t, Ev::Deliver { node, event });
    }

    fn epoch(&self, a: usize, b: usize) -> u64 {
        self.links[self.pair(a, b)].epoch
    }

    fn finish(&mut self, a: usize, b: usize, poster: usize, op: OpId) {
        let p = self.pair(a, b);
        self.links[p]
            .pending
            .retain(|&(x, o)| !(x == poster && o == op));
    }

    /// A piece of a write arrives.
    pub fn land(&mut self, q: &mut Queue, rng: &mut Rng, now: u64, piece: WritePiece) {
        let WritePiece {
            route,
            offset,
            bytes,
            whole,
            last,
        } = piece;
        let Route {
            src,
            dst,
            epoch,
            op,
        } = route;
        if self.epoch(src, dst) != epoch || !self.link_up(src, dst) {
            return; // the connection broke; the poster was told
        }
        if self.failed_ops.contains(&(src, op)) {
            if last {
                self.failed_ops.remove(&(src, op));
            }
            return;
        }
        if self.is_blocked(src, dst) {
            // Lost on the way, and the rest of the write with it: the
            // poster hears nothing until the connection is declared lost.
            if !last {
                self.failed_ops.insert((src, op));
            }
            return;
        }
        let access = self
            .layout
            .remote_write_access(NodeId(src as u8), whole.0, whole.1);
        let permitted = match access {
            RemoteAccess::Slot(_) => true,
            RemoteAccess::Ring => self.grant[dst] == Some(NodeId(src as u8)),
            RemoteAccess::Denied => false,
        };
        if permitted {
            match bytes {
                PieceBytes::Posted(bytes) => self.regions[dst].write(offset, &bytes),
                PieceBytes::AtLanding { from, len } => {
                    let mut bytes = vec![0; len];
                    self.regions[src].read(from, &mut bytes);
                    self.regions[dst].write(offset, &bytes);
                }
            }
            q.push(now + rng.range(CPU_DELAY.0, CPU_DELAY.1), Ev::Run(dst));
        } else {
            self.denied_writes += 1;
            if !last {
                self.failed_ops.insert((src, op));
            }
        }
        if last || !permitted {
            let result = if permitted {
                Ok(())
            } else {
                Err(OpError::AccessDenied)
            };
            let t = self.arrival(rng, now, dst, src);
            q.push(t, Ev::Reply(route, result, None));
        }
    }

    /// A read or compare-and-swap is served at its target.
    pub fn serve(&mut self, q: &mut Queue, rng: &mut Rng, now: u64, route: Route, op: RemoteOp) {
        let Route {
            src, dst, epoch, ..
        } = route;
        if self.epoch(src, dst) != epoch || !self.link_up(src, dst) || self.is_blocked(src, dst) {
            return;
        }
        let (result, data) = match op {
            RemoteOp::Read {
                remote_offset,
                len,
                local_offset,
                ..
            } => {
                if self.layout.remote_read_allowed(remote_offset, len) {
                    let mut buf = vec![0; len];
                    self.regions[dst].read(remote_offset, &mut buf);
                    (Ok(()), Some((local_offset, buf)))
                } else {
                    (Err(OpError::AccessDenied), None)
                }
            }
            RemoteOp::CompareAndSwap {
                remote_offset,
                expected,
                new,
                local_offset,
                ..
            } => {
                // Atomics are confined to the writer's own slots, like writes.
                match self
                    .layout
                    .remote_write_access(NodeId(src as u8), remote_offset, 8)
                {
                    RemoteAccess::Slot(_) if remote_offset % 8 == 0 => {
                        let old = self.regions[dst].compare_and_swap(remote_offset, expected, new);
                        (Ok(()), Some((local_offset, old.to_le_bytes().to_vec())))
                    }
                    _ => (Err(OpError::AccessDenied), None),
                }
            }
            RemoteOp::Write { .. } => unreachable!("writes land, they are not served"),
        };
        let t = self.arrival(rng, now, dst, src);
        q.push(t, Ev::Reply(route, result, data));
    }

    /// An outcome arrives back at the poster. Returns the event to deliver.
    pub fn reply(
        &mut self,
        route: Route,
        result: Result<(), OpError>,
        data: Option<(usize, Vec<u8>)>,
    ) -> Option<TransportEvent> {
        let Route {
            src,
            dst,
            epoch,
            op,
        } = route;
        if self.epoch(src, dst) != epoch || !self.link_up(src, dst) || self.is_blocked(dst, src) {
            // A lost completion: whatever the operation did at `dst` stays
            // done, and the poster learns of it only as a failure, when
            // the connection is declared lost.
            return None;
        }
        self.finish(src, dst, src, op);
        if let (Ok(()), Some((at, bytes))) = (result, data) {
            self.regions[src].write(at, &bytes);
        }
        Some(TransportEvent::Completed(Completion {
            op,
            peer: NodeId(dst as u8),
            result,
        }))
    }
}

/// One node's view of the simulated network: the [`Transport`] the engine
/// loop drives, exactly as a real runtime drives a real transport.
#[derive(Debug)]
pub struct SimTransport<'a> {
    pub(crate) net: &'a mut Net,
    pub(crate) queue: &'a mut Queue,
    pub(crate) rng: &'a mut Rng,
    pub(crate) inbox: &'a mut Vec<TransportEvent>,
    pub(crate) me: usize,
    pub(crate) now: u64,
}

impl Transport for SimTransport<'_> {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            compare_and_swap: true,
        }
    }

    fn post(&mut self, op: RemoteOp) -> Result<(), TransportError> {
        let dst = op.peer().index();
        if dst >= self.net.n || dst == self.me {
            return Err(TransportError::UnknownPeer(op.peer()));
        }
        let (src, now) = (self.me, self.now);
        if !self.net.link_up(src, dst) {
            let event = TransportEvent::Completed(Completion {
                op: op.id(),
                peer: op.peer(),
                result: Err(OpError::PeerUnreachable),
            });
            self.net.deliver(self.queue, self.rng, now, src, event);
            return Ok(());
        }
        let epoch = self.net.epoch(src, dst);
        let p = self.net.pair(src, dst);
        self.net.links[p].pending.push((src, op.id()));
        let route = Route {
            src,
            dst,
            epoch,
            op: op.id(),
        };
        match op {
            RemoteOp::Write {
                local_offset,
                len,
                remote_offset,
                ..
            } => {
                if !self.net.regions[src].contains(local_offset, len) {
                    return Err(TransportError::LocalRange {
                        offset: local_offset,
                        len,
                    });
                }
                let late = self.rng.chance(self.net.late_source_chance);
                let region = self.net.regions[src].clone();
                let source = |from: usize, n: usize| {
                    if late {
                        PieceBytes::AtLanding { from, len: n }
                    } else {
                        let mut bytes = vec![0; n];
                        region.read(from, &mut bytes);
                        PieceBytes::Posted(bytes)
                    }
                };
                let t1 = self.net.arrival(self.rng, now, src, dst);
                let torn = len >= 16 && self.rng.chance(self.net.torn_chance);
                if torn {
                    let split = self.rng.range(1, (len / 8) as u64) as usize * 8;
                    let bytes = source(local_offset, split);
                    let tail = source(local_offset + split, len - split);
                    self.net.torn_landings += 1;
                    let t2 = t1 + self.rng.range(200, 3_000);
                    let slot = &mut self.net.last_arrival[src * self.net.n + dst];
                    *slot = (*slot).max(t2);
                    self.queue.push(
                        t1,
                        Ev::Land(WritePiece {
                            route,
                            offset: remote_offset,
                            bytes,
                            whole: (remote_offset, len),
                            last: false,
                        }),
                    );
                    self.queue.push(
                        t2,
                        Ev::Land(WritePiece {
                            route,
                            offset: remote_offset + split,
                            bytes: tail,
                            whole: (remote_offset, len),
                            last: true,
                        }),
                    );
                } else {
                    let bytes = source(local_offset, len);
                    self.queue.push(
                        t1,
                        Ev::Land(WritePiece {
                            route,
                            offset: remote_offset,
                            bytes,
                            whole: (remote_offset, len),
                            last: true,
                        }),
                    );
                }
            }
            RemoteOp::Read { .. } | RemoteOp::CompareAndSwap { .. } => {
                let t = self.net.arrival(self.rng, now, src, dst);
                self.queue.push(t, Ev::Serve(route, op));
            }
        }
        Ok(())
    }

    fn set_log_writer(&mut self, writer: Option<NodeId>) -> Result<(), TransportError> {
        // Takes effect now: anything landing from here on is checked against it.
        self.net.grant[self.me] = writer;
        Ok(())
    }

    fn poll(&mut self, events: &mut Vec<TransportEvent>) -> Result<(), TransportError> {
        events.append(self.inbox);
        Ok(())
    }

    fn wait(&mut self, _timeout: std::time::Duration) -> Result<(), TransportError> {
        // Simulated time only moves between events: nothing to wait for.
        Ok(())
    }

    fn waker(&self) -> std::sync::Arc<dyn Wake> {
        std::sync::Arc::new(SimWaker)
    }
}

/// The simulator's engines never block.
#[derive(Debug)]
struct SimWaker;

impl Wake for SimWaker {
    fn wake(&self) {}
}
