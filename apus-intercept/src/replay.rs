//! The state machine of an intercepted server: replaying committed input.
//!
//! Every node applies every entry. Entries of its own connections (it was
//! the leader that accepted them) are already in its server: applying them
//! only releases the waiting server thread, in log order (the turnstile).
//! Entries of other connections are replayed into the local server through a
//! real loopback connection per client connection; a thread per replayed
//! connection drains and hashes what the server answers, and when the
//! connection closes its hash is compared with the leader's.

use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use apus::{Entry, StateMachine};
use apus_core::EntryKind;
use tracing::{debug, warn};

use crate::payload::{Close, Connect, StreamHash};
use crate::registry::Registry;

/// How long a replayed connection may take to deliver the server's last
/// output after its CLOSE is applied.
const DRAIN_WAIT: Duration = Duration::from_secs(5);
/// How long replay waits for the local server to listen.
const CONNECT_WAIT: Duration = Duration::from_secs(30);
/// How long replay waits for the local server to read what it was given
/// before moving on to the next entry.
const CONSUME_WAIT: Duration = Duration::from_secs(2);

/// Releases server threads in log order.
#[derive(Debug, Default)]
pub struct Turnstile {
    waiting: Mutex<BTreeSet<u64>>,
    turn: Condvar,
}

impl Turnstile {
    /// Entry `index` of ours was applied: its thread will come through.
    pub fn note(&self, index: u64) {
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(index);
    }

    /// Waits until every own entry before `index` has come through, then
    /// lets `index` through.
    pub fn pass(&self, index: u64) {
        let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        while w.first().is_some_and(|&first| first < index) {
            let (g, _) = self
                .turn
                .wait_timeout(w, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner());
            w = g;
        }
        w.remove(&index);
        drop(w);
        self.turn.notify_all();
    }
}

struct Replayed {
    stream: TcpStream,
    /// Bytes written into the server on this connection.
    written: u64,
    out: Arc<Mutex<StreamHash>>,
    drained: Arc<AtomicBool>,
}

/// What the replayer and the hooks share.
pub struct Replay {
    /// The local server's address.
    pub app: SocketAddr,
    /// This incarnation's nonce (identifies our own CONNECT entries).
    pub nonce: u64,
    /// Our replicated connections.
    pub registry: &'static Registry,
    /// Releases our server's threads in log order.
    pub turnstile: Turnstile,
    conns: Mutex<HashMap<u64, Replayed>>,
    /// Local ports of replay connections, and the connection each replays.
    ports: Mutex<HashMap<u16, u64>>,
    /// Replayed connections whose output differed from the leader's.
    pub divergences: AtomicU64,
    /// Entries replayed into the local server.
    pub replayed: AtomicU64,
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay")
            .field("app", &self.app)
            .finish_non_exhaustive()
    }
}

impl Replay {
    /// A replayer for the server at `app`.
    pub fn new(app: SocketAddr, nonce: u64, registry: &'static Registry) -> Replay {
        Replay {
            app,
            nonce,
            registry,
            turnstile: Turnstile::default(),
            conns: Mutex::new(HashMap::new()),
            ports: Mutex::new(HashMap::new()),
            divergences: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
        }
    }

    /// The connection replayed from local `port`, if it is one of ours.
    pub fn replay_port(&self, port: u16) -> Option<u64> {
        self.ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&port)
            .copied()
    }

    /// Ids of the connections being replayed.
    pub fn replayed_ids(&self) -> Vec<u64> {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// Opens a loopback connection to the server from a port it will
    /// recognise as ours.
    fn connect(&self, id: u64) -> io::Result<TcpStream> {
        let deadline = Instant::now() + CONNECT_WAIT;
        loop {
            match self.try_connect(id) {
                Ok(s) => return Ok(s),
                Err(e)
                    if Instant::now() < deadline
                        && e.kind() == io::ErrorKind::ConnectionRefused =>
                {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_connect(&self, id: u64) -> io::Result<TcpStream> {
        let SocketAddr::V4(app) = self.app else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "replay needs an IPv4 app address",
            ));
        };
        // SAFETY: plain socket creation; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh socket we own; TcpStream closes it.
        let stream = unsafe { TcpStream::from_raw_fd(fd) };
        let mut local: libc::sockaddr_in = sockaddr_in(std::net::Ipv4Addr::LOCALHOST, 0);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: `local` is a valid sockaddr_in of `len` bytes.
        if unsafe { libc::bind(fd, (&raw const local).cast(), len) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut got = len;
        // SAFETY: `local` has room for a sockaddr_in; `got` holds its size.
        if unsafe { libc::getsockname(fd, (&raw mut local).cast(), &mut got) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let port = u16::from_be(local.sin_port);
        self.ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(port, id);
        let target = sockaddr_in(*app.ip(), app.port());
        // SAFETY: `target` is a valid sockaddr_in of `len` bytes.
        if unsafe { libc::connect(fd, (&raw const target).cast(), len) } != 0 {
            let e = io::Error::last_os_error();
            self.ports
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&port);
            return Err(e);
        }
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    fn replay_connect(&self, id: u64) {
        let stream = match self.connect(id) {
            Ok(s) => s,
            Err(e) => {
                warn!(conn = id, error = %e, "cannot replay a connection into the local server");
                return;
            }
        };
        let out = Arc::new(Mutex::new(StreamHash::default()));
        let drained = Arc::new(AtomicBool::new(false));
        if let Ok(mut reader) = stream.try_clone() {
            let (out, drained) = (out.clone(), drained.clone());
            let spawned = thread::Builder::new()
                .name(format!("apus-drain-{id}"))
                .spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    while let Ok(n) = reader.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        out.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .update(&buf[..n]);
                    }
                    drained.store(true, Ordering::Release);
                });
            if spawned.is_err() {
                warn!(conn = id, "cannot spawn a drain thread");
            }
        }
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            Replayed {
                stream,
                written: 0,
                out,
                drained,
            },
        );
    }

    fn replay_data(&self, id: u64, data: &[u8]) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let Some(c) = conns.get_mut(&id) else {
            debug!(conn = id, "data for a connection that is not replayed here");
            return;
        };
        if data.is_empty() {
            // The client closed its side.
            let _ = c.stream.shutdown(Shutdown::Write);
            return;
        }
        if let Err(e) = c.stream.write_all(data) {
            debug!(conn = id, error = %e, "the local server no longer takes input on a replayed connection");
            return;
        }
        c.written += data.len() as u64;
        let target = c.written;
        drop(conns);
        // The next entry goes in only once the server has read this one, so
        // it reads its input in log order, as the leader's did.
        if !self.registry.wait_consumed(id, target, CONSUME_WAIT) {
            warn!(
                conn = id,
                "the local server has not read its replayed input within 2 s; going on \
                 (log order is no longer guaranteed for it: watch for divergences)"
            );
        }
    }

    /// Ends a replayed connection and returns what the local server wrote
    /// on it (waiting up to `DRAIN_WAIT`, 5 s, for the server to finish).
    pub fn finish(&self, id: u64) -> Option<StreamHash> {
        self.finish_all(&[id]).pop().map(|(_, h)| h)
    }

    /// Ends several replayed connections at once: every one is shut down
    /// first, then their output is drained under one deadline, so a new
    /// leader waits `DRAIN_WAIT` at most, however many clients the old one
    /// had. Returns each connection that was replayed here with its output.
    pub fn finish_all(&self, ids: &[u64]) -> Vec<(u64, StreamHash)> {
        let ended: Vec<(u64, Replayed)> = {
            let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            ids.iter()
                .filter_map(|id| conns.remove(id).map(|c| (*id, c)))
                .collect()
        };
        for (_, c) in &ended {
            let _ = c.stream.shutdown(Shutdown::Write);
        }
        let deadline = Instant::now() + DRAIN_WAIT;
        while !ended.iter().all(|(_, c)| c.drained.load(Ordering::Acquire))
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(1));
        }
        ended
            .into_iter()
            .map(|(id, c)| {
                if !c.drained.load(Ordering::Acquire) {
                    debug!(
                        conn = id,
                        "the local server did not finish its output in time"
                    );
                }
                let _ = c.stream.shutdown(Shutdown::Both);
                let out = *c.out.lock().unwrap_or_else(|p| p.into_inner());
                self.registry.forget_replay(id);
                (id, out)
            })
            .collect()
    }

    fn replay_close(&self, id: u64, leader: Option<Close>) {
        let Some(mine) = self.finish(id) else {
            return;
        };
        match leader {
            Some(l) if l.bytes_out != mine.bytes || l.hash_out != mine.hash => {
                self.divergences.fetch_add(1, Ordering::Relaxed);
                warn!(
                    conn = id,
                    leader_bytes = l.bytes_out,
                    local_bytes = mine.bytes,
                    "DIVERGENCE: the local server's output on this connection differs from the leader's \
                     (bytes 0..{} compared)",
                    l.bytes_out.max(mine.bytes)
                );
            }
            _ => {}
        }
    }
}

fn sockaddr_in(ip: std::net::Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    }
}

/// The [`StateMachine`] of an intercepted server.
#[derive(Debug)]
pub struct Replayer(pub Arc<Replay>);

impl StateMachine for Replayer {
    fn apply(&mut self, e: &Entry<'_>) -> Vec<u8> {
        let r = &self.0;
        match e.kind {
            EntryKind::Noop => {}
            EntryKind::Connect => match Connect::decode(e.payload) {
                Some(c) if c.origin == r.nonce => r.turnstile.note(e.index),
                _ => {
                    r.replay_connect(e.index);
                    r.replayed.fetch_add(1, Ordering::Relaxed);
                }
            },
            EntryKind::Data | EntryKind::Close if r.registry.owns(e.conn) => {
                r.turnstile.note(e.index)
            }
            EntryKind::Data => {
                r.replay_data(e.conn, e.payload);
                r.replayed.fetch_add(1, Ordering::Relaxed);
            }
            EntryKind::Close => {
                r.replay_close(e.conn, Close::decode(e.payload));
                r.replayed.fetch_add(1, Ordering::Relaxed);
            }
        }
        e.index.to_le_bytes().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_turnstile_releases_in_log_order() {
        let t = Arc::new(Turnstile::default());
        for i in [5, 7, 9] {
            t.note(i);
        }
        // Each thread, once through, sees nothing smaller still waiting.
        let handles: Vec<_> = [9u64, 7, 5]
            .into_iter()
            .map(|i| {
                let t = t.clone();
                thread::spawn(move || {
                    t.pass(i);
                    let left = t.waiting.lock().unwrap().clone();
                    assert!(left.iter().all(|&w| w > i), "{i} passed before {left:?}");
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert!(t.waiting.lock().unwrap().is_empty());
    }
}
