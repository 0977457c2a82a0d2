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

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use apus_core::{
    Capabilities, Completion, NodeId, OpError, OpId, Region, RegionLayout, RemoteOp, Transport,
    TransportError, TransportEvent, Wake,
};
use tracing::{debug, info, warn};

use crate::TransportStats;
use crate::handshake::{self, LayoutInfo};
use crate::link::{Link, Local};
use crate::sys::{self, EventFd, Interest};

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
}

impl std::fmt::Debug for TcpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpConfig")
            .field("me", &self.me)
            .field("peers", &self.peers)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Largest amount of unsent bytes to one peer before the connection is
/// considered stuck and closed.
const MAX_BACKLOG: usize = 256 << 20;
/// Bytes read from one connection per `poll`, so one busy peer cannot
/// starve the others.
const READ_BUDGET: usize = 1 << 20;
/// Concurrent handshakes an acceptor serves; more are dropped.
const MAX_HANDSHAKES: usize = 16;

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
    established: Receiver<(NodeId, TcpStream)>,
    redial: Vec<Option<Sender<()>>>,
    events: VecDeque<TransportEvent>,
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    stats: Arc<TransportStats>,
    pollfds: Vec<libc::pollfd>,
    interests: Vec<Interest>,
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
        if cfg.secret.len() < 16 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the cluster secret must be at least 16 bytes",
            ));
        }
        if region.len() < cfg.layout.region_len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "region too small",
            ));
        }
        let listener = TcpListener::bind(cfg.peers[cfg.me.index()])?;
        listener.set_nonblocking(true)?;
        let (tx, rx) = mpsc::channel();
        let wake = Arc::new(EventFd::new()?);
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(TransportStats::default());
        let info = LayoutInfo::of(&cfg.layout);
        let n = cfg.peers.len();
        let mut threads = Vec::new();
        let mut redial = vec![None; n];
        {
            let (tx, wake, stop, stats, info) = (
                tx.clone(),
                wake.clone(),
                stop.clone(),
                stats.clone(),
                info.clone(),
            );
            let (secret, me) = (cfg.secret.clone(), cfg.me);
            threads.push(
                thread::Builder::new()
                    .name(format!("apus-accept-{me}"))
                    .spawn(move || {
                        accept_loop(listener, secret, me, info, tx, wake, stop, stats)
                    })?,
            );
        }
        for peer in 0..cfg.me.0 {
            let (rtx, rrx) = mpsc::channel();
            redial[usize::from(peer)] = Some(rtx);
            let (tx, wake, stop, stats, info) = (
                tx.clone(),
                wake.clone(),
                stop.clone(),
                stats.clone(),
                info.clone(),
            );
            let (secret, me, addr) = (cfg.secret.clone(), cfg.me, cfg.peers[usize::from(peer)]);
            threads.push(
                thread::Builder::new()
                    .name(format!("apus-dial-{me}-n{peer}"))
                    .spawn(move || {
                        dial_loop(
                            addr,
                            NodeId(peer),
                            secret,
                            me,
                            info,
                            tx,
                            rrx,
                            wake,
                            stop,
                            stats,
                        )
                    })?,
            );
        }
        Ok(TcpTransport {
            me: cfg.me,
            layout: cfg.layout,
            region,
            writer: None,
            conns: (0..n).map(|_| None).collect(),
            established: rx,
            redial,
            events: VecDeque::new(),
            wake,
            stop,
            threads,
            stats,
            pollfds: Vec::with_capacity(n + 1),
            interests: Vec::with_capacity(n + 1),
        })
    }

    /// The transport's counters.
    pub fn stats(&self) -> Arc<TransportStats> {
        self.stats.clone()
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
        if let Some(tx) = &self.redial[peer.index()] {
            let _ = tx.send(());
        }
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
            let r = conn.stream.read(conn.link.rbuf.spare());
            match r {
                Ok(0) => {
                    self.close(peer, "peer closed the connection");
                    return;
                }
                Ok(n) => {
                    conn.link.rbuf.filled(n);
                    budget = budget.saturating_sub(n);
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
                self.stats.violations.fetch_add(1, Ordering::Relaxed);
                warn!(me = %self.me, %peer, %why, "protocol violation: closing");
                self.close(peer, "protocol violation");
                return;
            }
            if budget == 0 {
                break;
            }
        }
        if let Err(why) = self.process(peer) {
            self.stats.violations.fetch_add(1, Ordering::Relaxed);
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
        conn.link.encode(&self.region, op)?;
        self.flush(peer);
        Ok(())
    }

    fn set_log_writer(&mut self, writer: Option<NodeId>) -> Result<(), TransportError> {
        // Remote writes land only inside `poll`, on this thread: the new
        // grant holds for every byte that lands after this returns.
        self.writer = writer;
        Ok(())
    }

    fn poll(&mut self, events: &mut Vec<TransportEvent>) -> Result<(), TransportError> {
        while let Ok((peer, stream)) = self.established.try_recv() {
            self.install(peer, stream);
        }
        for p in 0..self.conns.len() {
            if self.conns[p].is_some() {
                self.receive(NodeId(p as u8));
                self.flush(NodeId(p as u8));
            }
        }
        events.extend(self.events.drain(..));
        Ok(())
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
        self.interests.clear();
        self.interests.push(Interest {
            fd: self.wake.as_raw_fd(),
            writable: false,
        });
        for c in self.conns.iter().flatten() {
            self.interests.push(Interest {
                fd: c.stream.as_raw_fd(),
                writable: !c.link.unsent().is_empty(),
            });
        }
        sys::wait(&self.interests, &mut self.pollfds, timeout)?;
        self.wake.drain();
        Ok(())
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.wake.clone()
    }
}

impl Drop for TcpTransport {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for tx in self.redial.iter().flatten() {
            let _ = tx.send(());
        }
        self.redial.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn accept_loop(
    listener: TcpListener,
    secret: Vec<u8>,
    me: NodeId,
    info: LayoutInfo,
    tx: Sender<(NodeId, TcpStream)>,
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    stats: Arc<TransportStats>,
) {
    let busy = Arc::new(AtomicUsize::new(0));
    let secret = Arc::new(secret);
    let tx = Arc::new(Mutex::new(tx));
    let mut buf = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let fd = [Interest {
            fd: listener.as_raw_fd(),
            writable: false,
        }];
        if sys::wait(&fd, &mut buf, Duration::from_millis(50)).is_err() {
            continue;
        }
        let Ok((stream, addr)) = listener.accept() else {
            continue;
        };
        if busy.load(Ordering::SeqCst) >= MAX_HANDSHAKES {
            warn!(%me, %addr, "too many concurrent handshakes: dropping connection");
            continue;
        }
        busy.fetch_add(1, Ordering::SeqCst);
        let (secret, info, tx, wake, stats, busy) = (
            secret.clone(),
            info.clone(),
            tx.clone(),
            wake.clone(),
            stats.clone(),
            busy.clone(),
        );
        let spawned = thread::Builder::new()
            .name(format!("apus-hs-{me}"))
            .spawn(move || {
                let mut stream = stream;
                let _ = stream.set_nonblocking(false);
                match handshake::accept(&mut stream, &secret, me, &info) {
                    Ok(peer) => {
                        stats.established.fetch_add(1, Ordering::Relaxed);
                        let _ = tx.lock().expect("sender").send((peer, stream));
                        wake.wake();
                    }
                    Err(e) => {
                        stats.refused.fetch_add(1, Ordering::Relaxed);
                        warn!(%me, %addr, error = %e, "refused connection");
                    }
                }
                busy.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            warn!(%me, "cannot spawn a handshake thread");
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn dial_loop(
    addr: SocketAddr,
    peer: NodeId,
    secret: Vec<u8>,
    me: NodeId,
    info: LayoutInfo,
    tx: Sender<(NodeId, TcpStream)>,
    redial: Receiver<()>,
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    stats: Arc<TransportStats>,
) {
    let mut backoff = Duration::from_millis(5);
    let mut warned = false;
    while !stop.load(Ordering::SeqCst) {
        let attempt = TcpStream::connect_timeout(&addr, handshake::TIMEOUT)
            .map_err(handshake::HandshakeError::Io)
            .and_then(|mut s| handshake::dial(&mut s, &secret, me, peer, &info).map(|()| s));
        match attempt {
            Ok(stream) => {
                stats.established.fetch_add(1, Ordering::Relaxed);
                backoff = Duration::from_millis(5);
                warned = false;
                if tx.send((peer, stream)).is_err() {
                    return;
                }
                wake.wake();
                // Wait until the engine loses the connection (or stops).
                if redial.recv().is_err() {
                    return;
                }
                // Drain duplicate signals.
                while redial.try_recv().is_ok() {}
            }
            Err(e) => {
                if matches!(
                    e,
                    handshake::HandshakeError::Authentication
                        | handshake::HandshakeError::Refused(_)
                ) {
                    stats.refused.fetch_add(1, Ordering::Relaxed);
                    warn!(%me, %peer, %addr, error = %e, "connection refused");
                } else if !warned {
                    debug!(%me, %peer, %addr, error = %e, "cannot connect yet");
                    warned = true;
                }
                if let Err(mpsc::RecvTimeoutError::Disconnected) = redial.recv_timeout(backoff) {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_millis(200));
            }
        }
    }
}
