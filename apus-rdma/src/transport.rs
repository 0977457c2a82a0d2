//! [`RdmaTransport`]: the remote-memory transport over RC queue pairs.
//!
//! **Two planes per peer.** Every peer gets two queue pairs, each in a
//! protection domain of its own (a key works only through a queue pair of
//! the domain its registration lives in):
//!
//! * the *ring* plane: this node's log ring registered for remote write, and
//!   a queue pair whose remote-write right is on only while that peer holds
//!   the write grant. [`Transport::set_log_writer`] switches it with
//!   `ibv_modify_qp` (RTS -> RTS, access flags) before it returns: the
//!   deposed writer's next WRITE fails in the NIC with a remote access error
//!   and lands nothing (Mu's fencing). Nothing else tells the writer: the
//!   queue pair's access flags are the only authority, as in Mu.
//! * the *control* plane: the peer's inbound slots (write and atomics) and
//!   this node's header and status record (read), on a queue pair that
//!   always allows them. It cannot reach the ring: the ring's key belongs
//!   to the other domain.
//!
//! **Set-up and liveness.** Replicas meet over the TCP transport's
//! authenticated handshake ([`apus_tcp::connect`]; the layout and the
//! transport, `verbs`, must match). Each side creates the peer's two queue
//! pairs and registrations and sends a [`Hello`] with both queue pairs'
//! endpoints (QPN, PSN, GID) and the windows' addresses and keys; on the
//! peer's hello it connects both queue pairs (INIT -> RTR -> RTS) and sends
//! [`Ready`]; the peer is up once both sides are ready, so no request ever
//! reaches a queue pair that is not yet receiving. The TCP stream stays
//! open: its loss is the peer's loss.
//!
//! **Order.** One RC queue pair executes its requests in order. Operations
//! to one peer that go to different planes are ordered by holding: an
//! operation waits until everything posted on the other plane completed.
//! Completions are released to the engine in posting order.
//!
//! **Signaling.** Requests are posted from [`Transport::poll`] (and `wait`),
//! a batch at a time: only the last request of a run on one queue pair is
//! signaled (and every [`SIGNAL_INTERVAL`](crate::verbs::SIGNAL_INTERVAL)th,
//! and every READ and CAS), so a leader streaming a batch of entries pays
//! one completion per batch. A signaled completion completes every earlier
//! request on its queue pair (RC completes in order).
//!
//! **Failure.** Any error completion ends the connection (the queue pair is
//! in the error state): the failed operation gets [`OpError::AccessDenied`]
//! if it was a ring write the peer refused, else
//! [`OpError::PeerUnreachable`]; every later one fails, the engine hears
//! `PeerDown`, and the dialer reconnects with fresh queue pairs. An
//! operation not complete after the configured timeout ends it too: Soft-RoCE
//! reports nothing at all for a write to a destroyed queue pair.
//!
//! **Limits.** At most [`MAX_QUEUED`] operations per peer (posted or held);
//! at most [`MAX_OUTSTANDING`] posted per queue pair, below its send queue
//! depth. `wait` blocks at most [`PROGRESS_INTERVAL`]: peers' writes into
//! this node are one-sided and raise no event here.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use apus_core::{
    Capabilities, Completion, NodeId, OpError, OpId, Region, RegionLayout, RemoteOp, Transport,
    TransportError, TransportEvent, Wake,
};
use apus_tcp::connect::{Connector, ConnectorConfig};
use apus_tcp::handshake::LayoutInfo;
use apus_tcp::identity::Identity;
use apus_tcp::setup::{MessageReader, RemoteWindow, StreamState, Window};
use apus_tcp::sys::{self as poll_sys, Interest};
use prost::Message;
use tracing::{debug, info, warn};

use crate::verbs::{
    Access, CompletionError, Device, Domain, QpEndpoint, QueuePair, RdmaError, Region as Mr,
    SEND_QUEUE_DEPTH, Selection, WorkCompletion,
};

/// Operations queued per peer (posted and not yet completed, or held). The
/// engine keeps far fewer in flight; reaching this means the peer stopped
/// making progress.
pub const MAX_QUEUED: usize = 8192;
/// Requests posted and not yet completed per queue pair: below the send
/// queue's depth, so a post never finds it full.
pub const MAX_OUTSTANDING: usize = SEND_QUEUE_DEPTH as usize - 16;
/// The longest `wait` blocks without polling the completion queue.
pub const PROGRESS_INTERVAL: Duration = Duration::from_micros(50);
/// How long the peer's `Ready` may take after the hellos crossed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Completion queue entries: every queue pair's outstanding requests.
fn cq_depth(replicas: usize) -> u32 {
    (2 * replicas * SEND_QUEUE_DEPTH as usize).min(65536) as u32
}

/// How to reach the other replicas and which device to use.
#[derive(Clone)]
pub struct RdmaConfig {
    /// This replica.
    pub me: NodeId,
    /// Set-up (TCP) address of every replica, by id.
    pub peers: Vec<SocketAddr>,
    /// The cluster secret (at least 16 bytes).
    pub secret: Vec<u8>,
    /// The region layout every replica uses.
    pub layout: RegionLayout,
    /// Device, port and GID.
    pub device: Selection,
    /// An operation not complete after this long ends the connection.
    pub op_timeout: Duration,
    /// Who this replica is across restarts (`apus_tcp::identity`).
    pub identity: Option<Arc<dyn Identity>>,
}

impl std::fmt::Debug for RdmaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaConfig")
            .field("me", &self.me)
            .field("peers", &self.peers)
            .field("secret", &"<redacted>")
            .field("device", &self.device)
            .field("op_timeout", &self.op_timeout)
            .finish()
    }
}

/// A queue pair as its peer connects to it.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct QueuePairInfo {
    /// Queue pair number (24 bits).
    #[prost(uint32, tag = "1")]
    pub qpn: u32,
    /// First packet sequence number (24 bits).
    #[prost(uint32, tag = "2")]
    pub psn: u32,
    /// The port's GID (16 bytes).
    #[prost(bytes = "vec", tag = "3")]
    pub gid: Vec<u8>,
}

impl QueuePairInfo {
    fn of(e: QpEndpoint) -> Self {
        QueuePairInfo {
            qpn: e.qpn,
            psn: e.psn,
            gid: e.gid.to_vec(),
        }
    }

    fn check(info: Option<QueuePairInfo>, what: &str) -> Result<QpEndpoint, String> {
        let i = info.ok_or_else(|| format!("hello without the {what} queue pair"))?;
        let gid: [u8; 16] = i
            .gid
            .as_slice()
            .try_into()
            .map_err(|_| format!("{what} queue pair GID of {} bytes", i.gid.len()))?;
        if i.qpn > 0x00ff_ffff || i.psn > 0x00ff_ffff {
            return Err(format!("{what} queue pair number or PSN above 24 bits"));
        }
        Ok(QpEndpoint {
            qpn: i.qpn,
            psn: i.psn,
            gid,
        })
    }
}

/// The first message each side sends after authentication.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    /// The sender's ring-plane queue pair for the receiver.
    #[prost(message, optional, tag = "1")]
    pub ring_qp: Option<QueuePairInfo>,
    /// The sender's control-plane queue pair for the receiver.
    #[prost(message, optional, tag = "2")]
    pub control_qp: Option<QueuePairInfo>,
    /// The receiver's inbound slots in the sender's region (write, CAS).
    #[prost(message, optional, tag = "3")]
    pub slots: Option<Window>,
    /// The sender's region header (read).
    #[prost(message, optional, tag = "4")]
    pub header: Option<Window>,
    /// The sender's status record (read).
    #[prost(message, optional, tag = "5")]
    pub status: Option<Window>,
    /// The sender's log ring: writable through the ring queue pair only
    /// while the receiver holds the grant.
    #[prost(message, optional, tag = "6")]
    pub ring: Option<Window>,
}

/// The second message: the sender's queue pairs are connected (RTS).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ready {}

/// Counters of a verbs transport (monotonic).
#[derive(Debug, Default)]
pub struct RdmaStats {
    /// Writes to a peer's log ring it refused (a remote access error from
    /// its NIC: this node no longer held the grant).
    pub fenced_writes: AtomicU64,
    /// Ring grants this node revoked from a peer: moved by the engine, or
    /// closed with the writer's connection.
    pub revocations: AtomicU64,
    /// Connections ended because an operation did not complete in time.
    pub timeouts: AtomicU64,
    /// Operations that completed with an error.
    pub errors: AtomicU64,
}

/// Which queue pair an operation uses.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Plane {
    Ring,
    Control,
}

#[derive(Debug)]
struct Inflight {
    wr_id: u64,
    op: OpId,
    plane: Plane,
    posted: Instant,
    /// Set when it finished; released once everything before it did.
    done: Option<Result<(), OpError>>,
}

/// What this node knows of a peer's region, once its hello arrived.
#[derive(Clone, Copy, Debug)]
struct RemoteSide {
    slots: RemoteWindow,
    readable: [RemoteWindow; 2],
    ring: RemoteWindow,
}

/// One plane's queue pair with the registrations of its domain.
struct PlaneQp {
    // Field order matters for drop: the queue pair goes before the
    // registrations, and the domain (its protection domain) last.
    qp: QueuePair,
    /// The whole region, local access: sources and destinations.
    local: Mr,
    /// What the peer may touch through this plane.
    /// Held, not read: dropping them revokes the keys.
    _exposed: Vec<Mr>,
    _domain: Domain,
}

struct Peer {
    stream: TcpStream,
    reader: MessageReader,
    ring: PlaneQp,
    control: PlaneQp,
    remote: Option<RemoteSide>,
    /// The peer said its queue pairs are connected.
    peer_ready: bool,
    /// The engine was told PeerUp.
    up: bool,
    since: Instant,
    inflight: VecDeque<Inflight>,
    held: VecDeque<RemoteOp>,
}

impl Peer {
    fn plane(&mut self, plane: Plane) -> &mut PlaneQp {
        match plane {
            Plane::Ring => &mut self.ring,
            Plane::Control => &mut self.control,
        }
    }

    fn outstanding(&self, plane: Plane) -> usize {
        self.inflight
            .iter()
            .filter(|f| f.plane == plane && f.done.is_none())
            .count()
    }
}

/// Why the transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No device, or the device or a registration failed.
    #[error(transparent)]
    Rdma(#[from] RdmaError),
    /// The set-up listener or its threads failed.
    #[error("transport set-up: {0}")]
    Io(#[from] io::Error),
}

/// The engine side of the verbs transport.
pub struct RdmaTransport {
    // Field order matters for drop: every queue pair and registration
    // (in `peers`) goes before the device.
    peers: Vec<Option<Peer>>,
    device: Device,
    region: Region,
    me: NodeId,
    layout: RegionLayout,
    writer: Option<NodeId>,
    connector: Connector,
    events: VecDeque<TransportEvent>,
    completions: Vec<WorkCompletion>,
    next_wr: u64,
    op_timeout: Duration,
    stats: Arc<RdmaStats>,
    pollfds: Vec<libc::pollfd>,
    interests: Vec<Interest>,
}

impl std::fmt::Debug for RdmaTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaTransport")
            .field("me", &self.me)
            .field("device", &self.device.name())
            .finish_non_exhaustive()
    }
}

/// The plane a remote offset is written through.
fn plane_of(layout: &RegionLayout, op: &RemoteOp) -> Plane {
    match op {
        RemoteOp::Write { remote_offset, .. } if layout.ring_range().contains(remote_offset) => {
            Plane::Ring
        }
        _ => Plane::Control,
    }
}

fn rdma_err(e: RdmaError) -> TransportError {
    TransportError::Other(e.to_string())
}

impl RdmaTransport {
    /// Opens the device, binds this replica's set-up address and starts
    /// connecting to the others. Fails at once, naming the alternatives,
    /// on a host without an RDMA device.
    pub fn start(cfg: RdmaConfig, region: Region) -> Result<RdmaTransport, StartError> {
        if cfg.peers.len() != cfg.layout.replicas() || cfg.me.index() >= cfg.peers.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "peer list does not match the cluster size",
            )
            .into());
        }
        if region.len() < cfg.layout.region_len() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "region too small").into());
        }
        let n = cfg.peers.len();
        let device = Device::open(&cfg.device, cq_depth(n))?;
        info!(me = %cfg.me, device = %device.name(), atomics = device.atomics(), "verbs transport open");
        let connector = Connector::start(ConnectorConfig {
            me: cfg.me,
            peers: cfg.peers,
            secret: cfg.secret,
            info: LayoutInfo::of(&cfg.layout).for_transport("verbs"),
            identity: cfg.identity.clone(),
        })?;
        Ok(RdmaTransport {
            peers: (0..n).map(|_| None).collect(),
            device,
            region,
            me: cfg.me,
            layout: cfg.layout,
            writer: None,
            connector,
            events: VecDeque::new(),
            completions: Vec::with_capacity(64),
            next_wr: 1,
            op_timeout: cfg.op_timeout,
            stats: Arc::new(RdmaStats::default()),
            pollfds: Vec::with_capacity(n + 1),
            interests: Vec::with_capacity(n + 1),
        })
    }

    /// The transport's counters.
    pub fn stats(&self) -> Arc<RdmaStats> {
        self.stats.clone()
    }

    /// Set-up counters (connections refused, established, violations).
    pub fn setup_stats(&self) -> Arc<apus_tcp::TransportStats> {
        self.connector.stats().clone()
    }

    /// The device in use.
    pub fn device(&self) -> &str {
        self.device.name()
    }

    /// Whether `peer` is up (both sides' queue pairs connected).
    pub fn connected(&self, peer: NodeId) -> bool {
        self.peers
            .get(peer.index())
            .and_then(Option::as_ref)
            .is_some_and(|p| p.up)
    }

    /// A protection domain with the whole region registered for local use
    /// and `windows` registered with their access; returns the plane's
    /// parts and the windows as the peer names them.
    fn plane(
        &self,
        windows: &[(std::ops::Range<usize>, Access)],
        qp_access: Access,
    ) -> Result<(PlaneQp, Vec<Window>), RdmaError> {
        let domain = self.device.domain()?;
        let base = self.region.as_ptr().cast_mut();
        // SAFETY: the region's memory is shared by every clone and outlives
        // every registration: the transport holds `region`, and drops
        // `peers` (with their registrations) first.
        let local = unsafe { domain.register(base, self.region.len(), Access::NONE)? };
        let mut exposed = Vec::new();
        let mut named = Vec::new();
        for (range, access) in windows {
            // SAFETY: as above; the range lies in the region (the layout
            // fits it, checked at start).
            let mr = unsafe { domain.register(base.add(range.start), range.len(), *access)? };
            named.push(Window {
                offset: range.start as u64,
                len: range.len() as u64,
                addr: mr.addr(),
                key: u64::from(mr.rkey()),
            });
            exposed.push(mr);
        }
        let qp = domain.queue_pair(qp_access)?;
        Ok((
            PlaneQp {
                qp,
                local,
                _exposed: exposed,
                _domain: domain,
            },
            named,
        ))
    }

    fn ring_access(&self, peer: NodeId) -> Access {
        Access {
            remote_write: self.writer == Some(peer),
            ..Access::NONE
        }
    }

    /// A new authenticated connection to `peer`: build its planes and send
    /// our hello.
    fn install(&mut self, peer: NodeId, mut stream: TcpStream) -> Result<(), TransportError> {
        if self.peers[peer.index()].is_some() {
            self.close(peer, "replaced by a new connection");
        }
        let write = Access {
            remote_write: true,
            ..Access::NONE
        };
        let (ring, ring_w) = self
            .plane(&[(self.layout.ring_range(), write)], self.ring_access(peer))
            .map_err(rdma_err)?;
        let [h, s] = self.layout.remote_readable();
        let read = Access {
            remote_read: true,
            ..Access::NONE
        };
        let slots = Access {
            remote_write: true,
            remote_atomic: true,
            ..Access::NONE
        };
        let (control, control_w) = self
            .plane(
                &[
                    (self.layout.inbound_slots(peer), slots),
                    (h, read),
                    (s, read),
                ],
                Access {
                    remote_read: true,
                    remote_write: true,
                    remote_atomic: true,
                },
            )
            .map_err(rdma_err)?;
        let hello = Hello {
            ring_qp: Some(QueuePairInfo::of(ring.qp.endpoint(&self.device))),
            control_qp: Some(QueuePairInfo::of(control.qp.endpoint(&self.device))),
            slots: Some(control_w[0]),
            header: Some(control_w[1]),
            status: Some(control_w[2]),
            ring: Some(ring_w[0]),
        };
        // Small and the first bytes on a fresh stream: a blocking write.
        let sent = apus_tcp::handshake::write_msg(&mut stream, &hello)
            .and_then(|()| stream.set_nonblocking(true))
            .and_then(|()| stream.set_nodelay(true));
        if let Err(e) = sent {
            debug!(me = %self.me, %peer, error = %e, "cannot send hello");
            self.connector.lost(peer);
            return Ok(());
        }
        debug!(me = %self.me, %peer, "hello sent");
        self.peers[peer.index()] = Some(Peer {
            stream,
            reader: MessageReader::default(),
            ring,
            control,
            remote: None,
            peer_ready: false,
            up: false,
            since: Instant::now(),
            inflight: VecDeque::new(),
            held: VecDeque::new(),
        });
        Ok(())
    }

    /// Ends the connection to `peer`: its queue pairs and registrations go
    /// (with them every key it had), every pending operation fails (in
    /// posting order), the engine hears PeerDown, and the dialer (if we
    /// dial) tries again.
    fn close(&mut self, peer: NodeId, why: &str) {
        let Some(mut p) = self.peers[peer.index()].take() else {
            return;
        };
        info!(me = %self.me, %peer, why, "connection closed");
        if self.writer == Some(peer) {
            // Its ring key dies with the queue pair below: a connection
            // closed before the engine moved the grant revokes it as surely.
            self.stats.revocations.fetch_add(1, AtomicOrdering::Relaxed);
        }
        for f in p.inflight.drain(..) {
            self.events.push_back(TransportEvent::Completed(Completion {
                op: f.op,
                peer,
                result: f.done.unwrap_or(Err(OpError::PeerUnreachable)),
            }));
        }
        for op in p.held.drain(..) {
            self.events.push_back(TransportEvent::Completed(Completion {
                op: op.id(),
                peer,
                result: Err(OpError::PeerUnreachable),
            }));
        }
        if p.up {
            self.events.push_back(TransportEvent::PeerDown(peer));
        }
        // Dropping `p` destroys its queue pairs (their requests are flushed:
        // completions of them find nothing and are dropped) and then its
        // registrations.
        drop(p);
        self.connector.lost(peer);
    }

    fn violation(&mut self, peer: NodeId, why: &str) {
        self.connector
            .stats()
            .violations
            .fetch_add(1, AtomicOrdering::Relaxed);
        warn!(me = %self.me, %peer, why, "protocol violation: closing");
        self.close(peer, "protocol violation");
    }

    /// Reads `peer`'s set-up stream and acts on every whole message.
    fn receive(&mut self, peer: NodeId) {
        let Some(p) = self.peers[peer.index()].as_mut() else {
            return;
        };
        match p.reader.read_from(&mut p.stream) {
            Ok(StreamState::Open) => {}
            Ok(StreamState::Closed) => return self.close(peer, "peer closed the connection"),
            Err(_) => return self.close(peer, "read error"),
        }
        loop {
            let Some(p) = self.peers[peer.index()].as_mut() else {
                return;
            };
            let body = match p.reader.next_message() {
                Ok(Some(body)) => body,
                Ok(None) => return,
                Err(why) => return self.violation(peer, &why),
            };
            let handled = if p.remote.is_none() {
                Hello::decode(body.as_slice())
                    .map_err(|e| e.to_string())
                    .and_then(|h| self.on_hello(peer, h))
            } else if !p.peer_ready {
                Ready::decode(body.as_slice())
                    .map_err(|e| e.to_string())
                    .map(|Ready {}| p.peer_ready = true)
            } else {
                Err("unexpected set-up message after Ready".to_string())
            };
            if let Err(why) = handled {
                return self.violation(peer, &why);
            }
        }
    }

    fn on_hello(&mut self, peer: NodeId, h: Hello) -> Result<(), String> {
        let slots = RemoteWindow::check(h.slots, self.layout.inbound_slots(self.me), "slots")?;
        let [hr, sr] = self.layout.remote_readable();
        let header = RemoteWindow::check(h.header, hr, "header")?;
        let status = RemoteWindow::check(h.status, sr, "status")?;
        let ring = RemoteWindow::check(h.ring, self.layout.ring_range(), "ring")?;
        if [slots, header, status, ring]
            .iter()
            .any(|w| w.key() > u64::from(u32::MAX))
        {
            return Err("a memory key wider than 32 bits".into());
        }
        let ring_qp = QueuePairInfo::check(h.ring_qp, "ring")?;
        let control_qp = QueuePairInfo::check(h.control_qp, "control")?;
        let p = self.peers[peer.index()].as_mut().expect("connected");
        let connected = p
            .ring
            .qp
            .connect(&ring_qp)
            .and_then(|()| p.control.qp.connect(&control_qp));
        if let Err(e) = connected {
            // Our own device refused: not the peer's fault.
            warn!(me = %self.me, %peer, error = %e, "cannot connect the queue pairs");
            self.close(peer, "queue pair connection failed");
            return Ok(());
        }
        p.remote = Some(RemoteSide {
            slots,
            readable: [header, status],
            ring,
        });
        if apus_tcp::handshake::write_msg(&mut p.stream, &Ready {}).is_err() {
            self.close(peer, "cannot send Ready");
        }
        Ok(())
    }

    /// Tells the engine `peer` is up once both sides are ready; closes it if
    /// the peer's Ready does not come in time.
    fn check_ready(&mut self, peer: NodeId) {
        let Some(p) = self.peers[peer.index()].as_mut() else {
            return;
        };
        if p.up {
            return;
        }
        if p.remote.is_some() && p.peer_ready {
            p.up = true;
            info!(me = %self.me, %peer, device = %self.device.name(), "queue pairs connected");
            self.events.push_back(TransportEvent::PeerUp(peer));
        } else if p.since.elapsed() > CONNECT_TIMEOUT {
            self.stats.timeouts.fetch_add(1, AtomicOrdering::Relaxed);
            self.close(peer, "the peer did not become ready in time");
        }
    }

    /// Completes `op` at once (refused before reaching the wire), in order
    /// behind what is in flight.
    fn complete_now(&mut self, peer: NodeId, op: OpId, plane: Plane, result: Result<(), OpError>) {
        let p = self.peers[peer.index()].as_mut().expect("connected");
        p.inflight.push_back(Inflight {
            wr_id: 0,
            op,
            plane,
            posted: Instant::now(),
            done: Some(result),
        });
    }

    /// Posts `peer`'s held operations while order and the send queues
    /// allow; the last of each run on one queue pair is signaled.
    fn post_held(&mut self, peer: NodeId) -> Result<(), TransportError> {
        loop {
            let Some(p) = self.peers[peer.index()].as_mut() else {
                return Ok(());
            };
            let Some(&op) = p.held.front() else {
                return Ok(());
            };
            let plane = plane_of(&self.layout, &op);
            let other = match plane {
                Plane::Ring => Plane::Control,
                Plane::Control => Plane::Ring,
            };
            let outstanding = p.outstanding(plane);
            if p.outstanding(other) > 0 || outstanding >= MAX_OUTSTANDING {
                return Ok(());
            }
            // Signal the last request this round posts on this queue pair:
            // nothing follows it, the next goes to the other plane, or the
            // limit stops the round.
            let last = p
                .held
                .get(1)
                .is_none_or(|next| plane_of(&self.layout, next) != plane)
                || outstanding + 1 >= MAX_OUTSTANDING;
            p.held.pop_front();
            self.post_now(peer, op, plane, last)?;
        }
    }

    /// Posts one operation on `plane`'s queue pair.
    fn post_now(
        &mut self,
        peer: NodeId,
        op: RemoteOp,
        plane: Plane,
        signal: bool,
    ) -> Result<(), TransportError> {
        let wr_id = (self.next_wr << 8) | peer.index() as u64;
        let base = self.region.as_ptr();
        let p = self.peers[peer.index()].as_mut().expect("connected");
        let remote = p.remote.expect("up");
        let q = p.plane(plane);
        let posted = match op {
            RemoteOp::Write {
                local_offset,
                len,
                remote_offset,
                ..
            } => {
                check_local(&self.region, local_offset, len)?;
                let target = match plane {
                    Plane::Ring => remote.ring.at(remote_offset, len),
                    Plane::Control => remote.slots.at(remote_offset, len),
                };
                let Some((addr, key)) = target else {
                    self.complete_now(peer, op.id(), plane, Err(OpError::AccessDenied));
                    return Ok(());
                };
                // SAFETY: the source lies in the region (checked above),
                // registered as `q.local`, which outlives the request.
                unsafe {
                    q.qp.post_write(
                        wr_id,
                        base.add(local_offset),
                        len,
                        &q.local,
                        addr,
                        key as u32,
                        signal,
                    )
                }
                .map(|_| ())
            }
            RemoteOp::Read {
                remote_offset,
                len,
                local_offset,
                ..
            } => {
                check_local(&self.region, local_offset, len)?;
                let Some((addr, key)) = remote
                    .readable
                    .iter()
                    .find_map(|w| w.at(remote_offset, len))
                else {
                    self.complete_now(peer, op.id(), plane, Err(OpError::AccessDenied));
                    return Ok(());
                };
                // SAFETY: the destination lies in the registered region.
                unsafe {
                    q.qp.post_read(
                        wr_id,
                        base.add(local_offset).cast_mut(),
                        len,
                        &q.local,
                        addr,
                        key as u32,
                    )
                }
            }
            RemoteOp::CompareAndSwap {
                remote_offset,
                expected,
                new,
                local_offset,
                ..
            } => {
                check_local(&self.region, local_offset, 8)?;
                if local_offset % 8 != 0 {
                    return Err(TransportError::Other(
                        "compare-and-swap result must be 8-aligned".into(),
                    ));
                }
                let target = (remote_offset % 8 == 0)
                    .then(|| remote.slots.at(remote_offset, 8))
                    .flatten();
                let (true, Some((addr, key))) = (self.device.atomics(), target) else {
                    let why = if self.device.atomics() {
                        OpError::AccessDenied
                    } else {
                        OpError::Unsupported
                    };
                    self.complete_now(peer, op.id(), plane, Err(why));
                    return Ok(());
                };
                // SAFETY: the result word lies in the registered region and
                // is 8-aligned (checked above).
                unsafe {
                    q.qp.post_compare_and_swap(
                        wr_id,
                        base.add(local_offset).cast::<u64>().cast_mut(),
                        &q.local,
                        addr,
                        key as u32,
                        expected,
                        new,
                    )
                }
            }
        };
        match posted {
            Ok(()) => {
                self.next_wr += 1;
                let p = self.peers[peer.index()].as_mut().expect("connected");
                p.inflight.push_back(Inflight {
                    wr_id,
                    op: op.id(),
                    plane,
                    posted: Instant::now(),
                    done: None,
                });
            }
            Err(e) => {
                warn!(me = %self.me, %peer, error = %e, "post failed");
                self.stats.errors.fetch_add(1, AtomicOrdering::Relaxed);
                self.complete_now(peer, op.id(), plane, Err(OpError::PeerUnreachable));
                self.close(peer, "posting failed");
            }
        }
        Ok(())
    }

    /// Hands the engine every completion whose predecessors completed.
    fn release(&mut self, peer: NodeId) {
        let Some(p) = self.peers[peer.index()].as_mut() else {
            return;
        };
        while let Some(f) = p.inflight.front() {
            let Some(result) = f.done else { break };
            let f = p.inflight.pop_front().expect("front");
            self.events.push_back(TransportEvent::Completed(Completion {
                op: f.op,
                peer,
                result,
            }));
        }
    }

    /// Polls the completion queue and files completions with their peers.
    fn progress(&mut self) {
        self.completions.clear();
        self.device.poll(&mut self.completions);
        let mut broken: Vec<(NodeId, &'static str)> = Vec::new();
        for c in std::mem::take(&mut self.completions) {
            let peer = (c.wr_id & 0xff) as usize;
            let Some(p) = self.peers.get_mut(peer).and_then(Option::as_mut) else {
                continue;
            };
            // A completion of a request of an earlier connection finds
            // nothing here and is dropped.
            let Some(i) = p.inflight.iter().position(|f| f.wr_id == c.wr_id) else {
                continue;
            };
            let plane = p.inflight[i].plane;
            match c.status {
                Ok(()) => {
                    // RC completes in order: everything before it on this
                    // queue pair (unsignaled) is done too.
                    for f in p.inflight.range_mut(..=i) {
                        if f.plane == plane && f.done.is_none() {
                            f.done = Some(Ok(()));
                        }
                    }
                }
                Err(e) => {
                    self.stats.errors.fetch_add(1, AtomicOrdering::Relaxed);
                    // Earlier requests on this queue pair succeeded: a failed
                    // one would have reported first.
                    for f in p.inflight.range_mut(..i) {
                        if f.plane == plane && f.done.is_none() {
                            f.done = Some(Ok(()));
                        }
                    }
                    p.inflight[i].done = Some(Err(classify(plane, e, &self.stats)));
                    if plane == Plane::Ring && e.remote_access() {
                        debug!(me = %self.me, peer, error = %e, "ring write refused: fenced");
                        broken.push((NodeId(peer as u8), "the peer fenced our ring writes"));
                    } else {
                        warn!(me = %self.me, peer, error = %e, "operation failed");
                        broken.push((NodeId(peer as u8), "an operation failed"));
                    }
                }
            }
        }
        for (peer, why) in broken {
            // The queue pair is in the error state: start over.
            self.release(peer);
            self.close(peer, why);
        }
    }
}

/// The engine's view of a failed request.
fn classify(plane: Plane, e: CompletionError, stats: &RdmaStats) -> OpError {
    if plane == Plane::Ring && e.remote_access() {
        stats.fenced_writes.fetch_add(1, AtomicOrdering::Relaxed);
        OpError::AccessDenied
    } else {
        OpError::PeerUnreachable
    }
}

/// Checks that an operation's local range lies in the region.
fn check_local(region: &Region, offset: usize, len: usize) -> Result<(), TransportError> {
    if region.contains(offset, len) {
        Ok(())
    } else {
        Err(TransportError::LocalRange { offset, len })
    }
}

impl Transport for RdmaTransport {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            compare_and_swap: self.device.atomics(),
        }
    }

    fn post(&mut self, op: RemoteOp) -> Result<(), TransportError> {
        let peer = op.peer();
        if peer.index() >= self.peers.len() || peer == self.me {
            return Err(TransportError::UnknownPeer(peer));
        }
        if !self.connected(peer) {
            self.events.push_back(TransportEvent::Completed(Completion {
                op: op.id(),
                peer,
                result: Err(OpError::PeerUnreachable),
            }));
            return Ok(());
        }
        let p = self.peers[peer.index()].as_mut().expect("connected");
        if p.held.len() + p.inflight.len() >= MAX_QUEUED {
            self.close(
                peer,
                "too many operations queued: the peer makes no progress",
            );
            self.events.push_back(TransportEvent::Completed(Completion {
                op: op.id(),
                peer,
                result: Err(OpError::PeerUnreachable),
            }));
            return Ok(());
        }
        // Posted from `poll`/`wait`, so a batch gets one signaled request.
        p.held.push_back(op);
        Ok(())
    }

    fn set_log_writer(&mut self, writer: Option<NodeId>) -> Result<(), TransportError> {
        if writer == self.writer {
            return Ok(());
        }
        let old = std::mem::replace(&mut self.writer, writer);
        if let Some(old) = old
            && let Some(p) = self.peers[old.index()].as_mut()
        {
            // In the NIC before we return: the old writer's next WRITE fails
            // with a remote access error.
            match p.ring.qp.set_remote_access(Access::NONE) {
                Ok(()) => debug!(me = %self.me, peer = %old, "ring write revoked"),
                // The queue pair cannot change (it failed, or is not yet
                // connected): destroying it revokes everything just as well.
                Err(e) => {
                    warn!(me = %self.me, peer = %old, error = %e, "cannot revoke in place");
                    self.close(old, "revoking the ring grant");
                }
            }
            self.stats.revocations.fetch_add(1, AtomicOrdering::Relaxed);
        }
        if let Some(new) = writer
            && let Some(p) = self.peers[new.index()].as_mut()
        {
            let write = Access {
                remote_write: true,
                ..Access::NONE
            };
            match p.ring.qp.set_remote_access(write) {
                Ok(()) => debug!(me = %self.me, peer = %new, "ring write granted"),
                // Its next connection starts with the grant (`install`).
                Err(e) => {
                    warn!(me = %self.me, peer = %new, error = %e, "cannot grant in place");
                    self.close(new, "granting the ring");
                }
            }
        }
        Ok(())
    }

    fn poll(&mut self, events: &mut Vec<TransportEvent>) -> Result<(), TransportError> {
        while let Some((peer, stream)) = self.connector.established() {
            self.install(peer, stream)?;
        }
        self.progress();
        let now = Instant::now();
        for i in 0..self.peers.len() {
            let peer = NodeId(i as u8);
            if self.peers[i].is_none() {
                continue;
            }
            self.receive(peer);
            self.check_ready(peer);
            if self.connected(peer) {
                self.release(peer);
                self.post_held(peer)?;
                let Some(p) = self.peers[i].as_ref() else {
                    continue;
                };
                if p.inflight
                    .iter()
                    .find(|f| f.done.is_none())
                    .is_some_and(|f| now.duration_since(f.posted) > self.op_timeout)
                {
                    self.stats.timeouts.fetch_add(1, AtomicOrdering::Relaxed);
                    self.close(peer, "an operation did not complete in time");
                }
            }
        }
        events.extend(self.events.drain(..));
        Ok(())
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
        if !self.events.is_empty() || self.peers.iter().flatten().any(|p| !p.held.is_empty()) {
            return Ok(());
        }
        self.interests.clear();
        self.interests.push(Interest {
            fd: self.connector.wake().as_raw_fd(),
            writable: false,
        });
        for p in self.peers.iter().flatten() {
            self.interests.push(Interest {
                fd: p.stream.as_raw_fd(),
                writable: false,
            });
        }
        poll_sys::wait(
            &self.interests,
            &mut self.pollfds,
            timeout.min(PROGRESS_INTERVAL),
        )?;
        self.connector.wake().drain();
        Ok(())
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.connector.wake().clone()
    }
}

impl Drop for RdmaTransport {
    fn drop(&mut self) {
        // Queue pairs and registrations before the device (also the field
        // order; explicit because it matters).
        self.peers.clear();
    }
}
