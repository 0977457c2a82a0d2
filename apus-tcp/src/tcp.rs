//! The TCP transport: remote memory emulated by framed operations.
//!
//! One connection per pair of replicas (the higher id dials). Connection
//! set-up and authentication run on background threads; once a connection is
//! established it is handed to the engine thread, which owns every socket
//! from then on: `post` frames an operation, `poll` reads what arrived,
//! *applies incoming writes to the local region itself* (checking the access
//! rules and the log grant), answers reads and compare-and-swaps, and turns
//! DONE frames into completions. Because the engine thread is the only one
//! that lands remote writes, `set_log_writer` takes effect the moment it
//! returns, exactly as the transport contract requires.
//!
//! `wait` blocks in `ppoll` on the sockets and an eventfd, for the runtime's
//! `park`/`hybrid` policies; with the `spin` policy the runtime calls `poll`
//! in a loop (non-blocking sockets, `TCP_NODELAY`), which is the busy-poll
//! mode.
//!
//! Frames are queued and sent at the start of the next `poll` or in `wait`
//! (before it blocks), one system call per peer: what one pass of the
//! engine posts to a peer, and the answers `poll` produced for it (DONE
//! frames, read replies), leave together. An engine that reacts to a landed
//! write with a write of its own (a follower's ack) sends both in one
//! segment, so its peer wakes once, not twice.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use apus_core::{
    Capabilities, Completion, NodeId, OpError, OpId, Region, RegionLayout, RemoteOp, Transport,
    TransportError, TransportEvent, Wake,
};
use tracing::{info, warn};

use crate::TransportStats;
use crate::connect::{Connector, ConnectorConfig};
use crate::handshake::LayoutInfo;
use crate::identity::Identity;
use crate::link::{Link, Local, OpDeadline};
use crate::sys::{self, Interest};

/// Where every replica listens, and the shared secret.
#[derive(Clone)]
pub struct TcpConfig {
    /// This replica.
    pub me: NodeId,
    /// Replication address of every replica, by id.
    pub peers: Vec<SocketAddr>,
    /// The cluster secret (at least 16 bytes).
    pub secret: Vec<u8>,
    /// The region layout every replica uses.
    pub layout: RegionLayout,
    /// An operation without its answer this long ends the connection
    /// ([`DEFAULT_OP_TIMEOUT`](crate::DEFAULT_OP_TIMEOUT) unless configured).
    pub op_timeout: Duration,
    /// Who this replica is across restarts ([`crate::identity`]).
    pub identity: Option<Arc<dyn Identity>>,
}

impl std::fmt::Debug for TcpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpConfig")
            .field("me", &self.me)
            .field("peers", &self.peers)
            .field("secret", &"<redacted>")
            .field("op_timeout", &self.op_timeout)
            .finish()
    }
}

/// Largest amount of unsent bytes to one peer before the connection is
/// considered stuck and closed.
const MAX_BACKLOG: usize = 256 << 20;
/// Bytes read from one connection per `poll`, so one busy peer cannot
/// starve the others.
const READ_BUDGET: usize = 1 << 20;

#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    link: Link,
}

/// The engine side of the TCP transport.
pub struct TcpTransport {
    me: NodeId,
    layout: RegionLayout,
    region: Region,
    writer: Option<NodeId>,
    conns: Vec<Option<Conn>>,
    connector: Connector,
    events: VecDeque<TransportEvent>,
    pollfds: Vec<libc::pollfd>,
    interests: Vec<Interest>,
    /// The peer behind each of `interests` after the first (the waker).
    interest_peers: Vec<usize>,
    /// The peers `wait` saw ready, by index, for the `poll` right after it
    /// (which then reads no other socket: each read of an empty one is a
    /// system call for nothing).
    ready: Vec<bool>,
    /// Whether `ready` holds for the next `poll` (else it reads every
    /// connection: something may have arrived since the last wait).
    only_ready: bool,
    deadline: OpDeadline,
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("me", &self.me)
            .finish()
    }
}

impl TcpTransport {
    /// Binds this replica's address and starts connecting to the others.
    /// `region` is the replica's region (the one the engine polls).
    pub fn start(cfg: TcpConfig, region: Region) -> io::Result<TcpTransport> {
        if cfg.peers.len() != cfg.layout.replicas() || cfg.me.index() >= cfg.peers.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "peer list does not match the cluster size",
            ));
        }
        if region.len() < cfg.layout.region_len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "region too small",
            ));
        }
        let n = cfg.peers.len();
        let connector = Connector::start(ConnectorConfig {
            me: cfg.me,
            peers: cfg.peers,
            secret: cfg.secret,
            info: LayoutInfo::of(&cfg.layout).for_transport("tcp"),
            identity: cfg.identity,
        })?;
        Ok(TcpTransport {
            me: cfg.me,
            layout: cfg.layout,
            region,
            writer: None,
            conns: (0..n).map(|_| None).collect(),
            connector,
            events: VecDeque::new(),
            pollfds: Vec::with_capacity(n + 1),
            interests: Vec::with_capacity(n + 1),
            interest_peers: Vec::with_capacity(n),
            ready: vec![false; n],
            only_ready: false,
            deadline: OpDeadline::new(cfg.op_timeout),
        })
    }

    /// The transport's counters.
    pub fn stats(&self) -> Arc<TransportStats> {
        self.connector.stats().clone()
    }

    /// Whether a connection to `peer` is established.
    pub fn connected(&self, peer: NodeId) -> bool {
        self.conns.get(peer.index()).is_some_and(Option::is_some)
    }

    fn install(&mut self, peer: NodeId, stream: TcpStream) {
        if stream.set_nonblocking(true).is_err() || stream.set_nodelay(true).is_err() {
            return;
        }
        if self.conns[peer.index()].is_some() {
            self.close(peer, "replaced by a new connection");
        }
        info!(me = %self.me, %peer, "connection established");
        self.conns[peer.index()] = Some(Conn {
            stream,
            link: Link::new(),
        });
        self.events.push_back(TransportEvent::PeerUp(peer));
    }

    /// Drops the connection to `peer`: every operation on it fails, the
    /// engine hears PeerDown, and the dialer (if we dial) tries again.
    fn close(&mut self, peer: NodeId, why: &str) {
        let Some(mut conn) = self.conns[peer.index()].take() else {
            return;
        };
        info!(me = %self.me, %peer, why, "connection closed");
        conn.link.fail_pending(peer, &mut self.events);
        self.events.push_back(TransportEvent::PeerDown(peer));
        self.connector.lost(peer);
    }

    fn fail_now(&mut self, op: OpId, peer: NodeId) {
        self.events.push_back(TransportEvent::Completed(Completion {
            op,
            peer,
            result: Err(OpError::PeerUnreachable),
        }));
    }

    /// Reads what `peer` sent and acts on every complete frame.
    fn receive(&mut self, peer: NodeId) {
        let mut budget = READ_BUDGET;
        loop {
            let Some(conn) = self.conns[peer.index()].as_mut() else {
                return;
            };
            let room = conn.link.rbuf.spare();
            let asked = room.len();
            let r = conn.stream.read(room);
            // A read that did not fill the room took all there was: no
            // second read just to be told so.
            let drained;
            match r {
                Ok(0) => {
                    self.close(peer, "peer closed the connection");
                    return;
                }
                Ok(n) => {
                    conn.link.rbuf.filled(n);
                    budget = budget.saturating_sub(n);
                    drained = n < asked;
                }
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        self.close(peer, "read error");
                        return;
                    }
                    break;
                }
            }
            if let Err(why) = self.process(peer) {
                self.connector
                    .stats()
                    .violations
                    .fetch_add(1, Ordering::Relaxed);
                warn!(me = %self.me, %peer, %why, "protocol violation: closing");
                self.close(peer, "protocol violation");
                return;
            }
            if budget == 0 || drained {
                break;
            }
        }
        if let Err(why) = self.process(peer) {
            self.connector
                .stats()
                .violations
                .fetch_add(1, Ordering::Relaxed);
            warn!(me = %self.me, %peer, %why, "protocol violation: closing");
            self.close(peer, "protocol violation");
        }
    }

    /// Acts on the complete frames in `peer`'s receive buffer.
    fn process(&mut self, peer: NodeId) -> Result<(), String> {
        let conn = self.conns[peer.index()].as_mut().expect("connected");
        let local = Local {
            layout: &self.layout,
            region: &self.region,
            writer: self.writer,
        };
        conn.link.process(peer, local, &mut self.events)
    }

    /// Ends every connection with an operation past its deadline.
    fn close_overdue(&mut self) {
        let now = Instant::now();
        if !self.deadline.judges(now) {
            return;
        }
        for p in 0..self.conns.len() {
            if self.conns[p]
                .as_ref()
                .is_some_and(|c| self.deadline.overdue(&c.link, now))
            {
                self.connector
                    .stats()
                    .timeouts
                    .fetch_add(1, Ordering::Relaxed);
                self.close(NodeId(p as u8), "an operation did not complete in time");
            }
        }
    }

    /// [`flush`](Self::flush) every connection with something to send.
    fn flush_all(&mut self) {
        for p in 0..self.conns.len() {
            if self.conns[p]
                .as_ref()
                .is_some_and(|c| !c.link.unsent().is_empty())
            {
                self.flush(NodeId(p as u8));
            }
        }
    }

    /// Writes as much of `peer`'s send buffer as the socket takes.
    fn flush(&mut self, peer: NodeId) {
        let Some(conn) = self.conns[peer.index()].as_mut() else {
            return;
        };
        while !conn.link.unsent().is_empty() {
            match conn.stream.write(conn.link.unsent()) {
                Ok(0) => {
                    self.close(peer, "write returned 0");
                    return;
                }
                Ok(n) => conn.link.mark_sent(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.close(peer, "write error");
                    return;
                }
            }
        }
        if conn.link.unsent().len() > MAX_BACKLOG {
            self.close(peer, "peer does not read");
        }
    }
}

impl Transport for TcpTransport {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            compare_and_swap: true,
        }
    }

    fn post(&mut self, op: RemoteOp) -> Result<(), TransportError> {
        let peer = op.peer();
        if peer.index() >= self.conns.len() || peer == self.me {
            return Err(TransportError::UnknownPeer(peer));
        }
        let Some(conn) = self.conns[peer.index()].as_mut() else {
            self.fail_now(op.id(), peer);
            return Ok(());
        };
        // Sent by the next `poll` or `wait` (the engine calls one right
        // after carrying out a pass's actions): every frame a pass posts to
        // one peer leaves in one system call.
        conn.link.encode(&self.region, op)?;
        Ok(())
    }

    fn set_log_writer(&mut self, writer: Option<NodeId>) -> Result<(), TransportError> {
        // Remote writes land only inside `poll`, on this thread: the new
        // grant holds for every byte that lands after this returns.
        self.writer = writer;
        Ok(())
    }

    fn poll(&mut self, events: &mut Vec<TransportEvent>) -> Result<(), TransportError> {
        while let Some((peer, stream)) = self.connector.established() {
            self.install(peer, stream);
        }
        // What the last pass queued goes first. What this pass queues (the
        // DONE of every write that lands now) waits for the engine's
        // reaction: an ack it posts leaves in the same segment, so the
        // writer wakes once for both.
        self.flush_all();
        let only_ready = std::mem::take(&mut self.only_ready);
        for p in 0..self.conns.len() {
            if self.conns[p].is_some() && (!only_ready || self.ready[p]) {
                self.receive(NodeId(p as u8));
            }
        }
        self.close_overdue();
        events.extend(self.events.drain(..));
        Ok(())
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
        self.flush_all();
        self.interests.clear();
        self.interests.push(Interest {
            fd: self.connector.wake().as_raw_fd(),
            writable: false,
        });
        self.interest_peers.clear();
        for (p, c) in self.conns.iter().enumerate() {
            if let Some(c) = c {
                self.interests.push(Interest {
                    fd: c.stream.as_raw_fd(),
                    writable: !c.link.unsent().is_empty(),
                });
                self.interest_peers.push(p);
            }
        }
        sys::wait(&self.interests, &mut self.pollfds, timeout)?;
        debug_assert_eq!(self.pollfds.len(), self.interest_peers.len() + 1);
        self.ready.fill(false);
        for (fd, &p) in self.pollfds[1..].iter().zip(&self.interest_peers) {
            self.ready[p] = fd.revents != 0;
        }
        // A new connection is read at once, and the waker drained, only
        // when the waker fired.
        if self.pollfds[0].revents != 0 {
            self.connector.wake().drain();
            self.ready.fill(true);
        }
        self.only_ready = true;
        Ok(())
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.connector.wake().clone()
    }
}
