//! Authenticated connection set-up between replicas, on background threads.
//!
//! One TCP connection per pair of replicas: the higher id dials, the lower
//! accepts. Each connection runs the [`handshake`] (the
//! cluster secret, the layout and the transport must match) on its own
//! thread; an authenticated stream is handed to the engine thread through
//! [`Connector::established`], and the engine's [`Wake`] handle fires so a
//! blocked engine notices. When the engine loses a connection it calls
//! [`Connector::lost`] and the dialer (if this node dials that peer) tries
//! again with backoff.
//!
//! The TCP transport carries its frames over these streams; the libfabric
//! transport (`apus-fabric`) uses them to exchange endpoint names and memory
//! keys and as its liveness signal.
//!
//! [`Wake`]: apus_core::Wake

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use apus_core::{NodeId, Wake};
use tracing::{debug, warn};

use crate::TransportStats;
use crate::handshake::{self, LayoutInfo};
use crate::identity::Identity;
use crate::sys::{self, EventFd, Interest};

/// Concurrent handshakes an acceptor serves; more are dropped.
const MAX_HANDSHAKES: usize = 16;

/// What a [`Connector`] needs to know.
#[derive(Clone)]
pub struct ConnectorConfig {
    /// This replica.
    pub me: NodeId,
    /// Set-up address of every replica, by id (this node listens on its own).
    pub peers: Vec<SocketAddr>,
    /// The cluster secret (at least 16 bytes).
    pub secret: Vec<u8>,
    /// What both ends must agree on (layout and transport; the cluster
    /// name is the identity's).
    pub info: LayoutInfo,
    /// Who this replica is across restarts (none: it keeps no identity, and
    /// peers learn nothing of it).
    pub identity: Option<Arc<dyn Identity>>,
}

impl std::fmt::Debug for ConnectorConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectorConfig")
            .field("me", &self.me)
            .field("peers", &self.peers)
            .field("secret", &"<redacted>")
            .field("info", &self.info)
            .field("identity", &self.identity)
            .finish()
    }
}

/// The background threads that establish authenticated connections.
/// Dropping it stops them.
#[derive(Debug)]
pub struct Connector {
    established: Receiver<(NodeId, TcpStream)>,
    redial: Vec<Option<Sender<()>>>,
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    stats: Arc<TransportStats>,
}

impl Connector {
    /// Binds this replica's address and starts accepting and dialling.
    pub fn start(cfg: ConnectorConfig) -> io::Result<Connector> {
        if cfg.me.index() >= cfg.peers.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "this replica's id is outside the peer list",
            ));
        }
        if cfg.secret.len() < 16 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the cluster secret must be at least 16 bytes",
            ));
        }
        let listener = TcpListener::bind(cfg.peers[cfg.me.index()])?;
        listener.set_nonblocking(true)?;
        let (tx, rx) = mpsc::channel();
        let wake = Arc::new(EventFd::new()?);
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(TransportStats::default());
        let n = cfg.peers.len();
        let me = cfg.me;
        let mut info = cfg.info;
        if let Some(id) = &cfg.identity {
            info.cluster = id.cluster().to_string();
        }
        let own = Arc::new(Own {
            me,
            secret: cfg.secret,
            info,
            identity: cfg.identity,
        });
        let mut threads = Vec::new();
        let mut redial = vec![None; n];
        {
            let (own, tx, wake, stop, stats) = (
                own.clone(),
                tx.clone(),
                wake.clone(),
                stop.clone(),
                stats.clone(),
            );
            threads.push(
                thread::Builder::new()
                    .name(format!("apus-accept-{me}"))
                    .spawn(move || accept_loop(listener, own, tx, wake, stop, stats))?,
            );
        }
        for peer in 0..me.0 {
            let (rtx, rrx) = mpsc::channel();
            redial[usize::from(peer)] = Some(rtx);
            let (own, tx, wake, stop, stats) = (
                own.clone(),
                tx.clone(),
                wake.clone(),
                stop.clone(),
                stats.clone(),
            );
            let addr = cfg.peers[usize::from(peer)];
            threads.push(
                thread::Builder::new()
                    .name(format!("apus-dial-{me}-n{peer}"))
                    .spawn(move || {
                        dial_loop(addr, NodeId(peer), own, tx, rrx, wake, stop, stats)
                    })?,
            );
        }
        Ok(Connector {
            established: rx,
            redial,
            wake,
            stop,
            threads,
            stats,
        })
    }

    /// The next authenticated connection, if one is ready.
    pub fn established(&self) -> Option<(NodeId, TcpStream)> {
        self.established.try_recv().ok()
    }

    /// The engine lost its connection to `peer`: dial it again (if this
    /// node is the one that dials it).
    pub fn lost(&self, peer: NodeId) {
        if let Some(Some(tx)) = self.redial.get(peer.index()) {
            let _ = tx.send(());
        }
    }

    /// The eventfd that fires when a connection is established; transports
    /// also use it as their [`Wake`] handle.
    pub fn wake(&self) -> &Arc<EventFd> {
        &self.wake
    }

    /// Set-up counters (refused, established; the transport adds
    /// violations).
    pub fn stats(&self) -> &Arc<TransportStats> {
        &self.stats
    }
}

impl Drop for Connector {
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

/// What this replica proves and says in every handshake.
struct Own {
    me: NodeId,
    secret: Vec<u8>,
    info: LayoutInfo,
    identity: Option<Arc<dyn Identity>>,
}

impl Own {
    fn identity(&self) -> Option<&dyn Identity> {
        self.identity.as_deref()
    }
}

fn accept_loop(
    listener: TcpListener,
    own: Arc<Own>,
    tx: Sender<(NodeId, TcpStream)>,
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    stats: Arc<TransportStats>,
) {
    let me = own.me;
    let busy = Arc::new(AtomicUsize::new(0));
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
        let (own, tx, wake, stats, busy) = (
            own.clone(),
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
                match handshake::accept(&mut stream, &own.secret, me, &own.info, own.identity()) {
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
    own: Arc<Own>,
    tx: Sender<(NodeId, TcpStream)>,
    redial: Receiver<()>,
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    stats: Arc<TransportStats>,
) {
    let me = own.me;
    let mut backoff = Duration::from_millis(5);
    let mut warned = false;
    while !stop.load(Ordering::SeqCst) {
        let attempt = TcpStream::connect_timeout(&addr, handshake::TIMEOUT)
            .map_err(handshake::HandshakeError::Io)
            .and_then(|mut s| {
                handshake::dial(&mut s, &own.secret, me, peer, &own.info, own.identity())
                    .map(|()| s)
            });
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
                        | handshake::HandshakeError::OtherTransport { .. }
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
