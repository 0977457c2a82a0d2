//! Forked processes replicate through the node of the process they came
//! from.
//!
//! The node runs in one process of the server: the one that listens on the
//! app address (the *holder*). Processes it forks afterwards (PostgreSQL's
//! backends, pre-forked workers) inherit its table of replicated
//! descriptors but not its threads, so each one talks to the holder over a
//! channel: an abstract UNIX socket the holder listens on, whose name and
//! token the child inherited in memory (a process outside the holder's
//! fork tree cannot know the token). The holder runs every request through
//! the same code as its own hooks, so a child's reads become log entries in
//! log order and its accepts are judged like the holder's.
//!
//! ```text
//! frame = len u32 | kind u8 | body                       (little-endian)
//! HELLO    1  token [16]                                 -> OK
//! ACCEPT   2  app u8 | fd i32 | peer (family u8, ip [16], port u16)
//!                                                        -> VERDICT kind u8 | id u64
//! INPUT    3  conn u64 | fd i32 | out_bytes u64 | out_hash u64 | data
//!                                                        -> OK | FAILED
//! CLOSE    4  conn u64 | out_bytes u64 | out_hash u64    -> OK
//! CONSUMED 5  replay u64 | n u64                         -> OK
//! IDLE     6  replay u64 | consumed u64                  -> OK
//! WAITS    7  conn u64                                   -> OK
//! BARRIER  8  (empty)                                    -> OK, once every input
//!                                                           proposed so far committed
//! ```
//!
//! INPUT is answered as soon as the input is proposed (output commit); the
//! child's next output to a client, or close of one, sends BARRIER first.
//!
//! A child whose channel ends (it exited) has its connections closed in the
//! log: the holder proposes a CLOSE for each connection the child read and
//! did not close itself (PostgreSQL's backends exit without closing).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use apus::client::{frame, read_frame};

use crate::Verdict;
use crate::payload::StreamHash;

const HELLO: u8 = 1;
const ACCEPT: u8 = 2;
const INPUT: u8 = 3;
const CLOSE: u8 = 4;
const CONSUMED: u8 = 5;
const IDLE: u8 = 6;
const WAITS: u8 = 7;
const BARRIER: u8 = 8;
const OK: u8 = 10;
const FAILED: u8 = 11;
const VERDICT: u8 = 12;

/// How a child reaches its holder (inherited in memory).
#[derive(Clone, Debug)]
pub struct Address {
    /// The abstract socket name.
    pub name: String,
    /// The token a child presents.
    pub token: [u8; 16],
}

/// A request from a child.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// The child accepted `fd` from `peer` on an app listener (`app`) or
    /// another listener of the server.
    Accept {
        /// Whether the listener is on the app address.
        app: bool,
        /// The child's descriptor.
        fd: i32,
        /// The client's address.
        peer: Option<SocketAddr>,
    },
    /// The child read `data` from connection `conn` (its `fd`); what it has
    /// written on the connection so far is `out`.
    Input {
        /// Connection id.
        conn: u64,
        /// The child's descriptor.
        fd: i32,
        /// Output so far.
        out: StreamHash,
        /// What the read returned (empty: end of stream).
        data: Vec<u8>,
    },
    /// The child closed connection `conn`.
    Close {
        /// Connection id.
        conn: u64,
        /// Everything it wrote on it.
        out: StreamHash,
    },
    /// The child read `n` bytes of replay connection `replay`.
    Consumed {
        /// Replayed connection id.
        replay: u64,
        /// Bytes.
        n: u64,
    },
    /// The child asks for more of replay connection `replay`, having read
    /// `consumed` bytes of it and nothing being left.
    Idle {
        /// Replayed connection id.
        replay: u64,
        /// Bytes it has read in all.
        consumed: u64,
    },
    /// The child waits for more of replicated connection `conn`: it has
    /// finished with everything it read.
    Waits {
        /// Connection id.
        conn: u64,
    },
    /// The child is about to write to a client: every input proposed so
    /// far must have committed first.
    Barrier,
}

fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn i32_at(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn put_peer(b: &mut Vec<u8>, peer: Option<SocketAddr>) {
    let (family, ip, port) = match peer {
        None => (0u8, [0u8; 16], 0u16),
        Some(SocketAddr::V4(a)) => (4, a.ip().to_ipv6_mapped().octets(), a.port()),
        Some(SocketAddr::V6(a)) => (6, a.ip().octets(), a.port()),
    };
    b.push(family);
    b.extend_from_slice(&ip);
    b.extend_from_slice(&port.to_le_bytes());
}

fn peer_at(b: &[u8], at: usize) -> Option<Option<SocketAddr>> {
    let family = *b.get(at)?;
    let ip: [u8; 16] = b.get(at + 1..at + 17)?.try_into().ok()?;
    let port = u16::from_le_bytes(b.get(at + 17..at + 19)?.try_into().ok()?);
    let ip6 = Ipv6Addr::from(ip);
    Some(match family {
        0 => None,
        4 => Some(SocketAddr::new(IpAddr::V4(ip6.to_ipv4_mapped()?), port)),
        6 => Some(SocketAddr::new(IpAddr::V6(ip6), port)),
        _ => return None,
    })
}

impl Request {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        let kind = match self {
            Request::Accept { app, fd, peer } => {
                b.push(u8::from(*app));
                b.extend_from_slice(&fd.to_le_bytes());
                put_peer(&mut b, *peer);
                ACCEPT
            }
            Request::Input {
                conn,
                fd,
                out,
                data,
            } => {
                put_u64(&mut b, *conn);
                b.extend_from_slice(&fd.to_le_bytes());
                put_u64(&mut b, out.bytes);
                put_u64(&mut b, out.hash);
                b.extend_from_slice(data);
                INPUT
            }
            Request::Close { conn, out } => {
                put_u64(&mut b, *conn);
                put_u64(&mut b, out.bytes);
                put_u64(&mut b, out.hash);
                CLOSE
            }
            Request::Consumed { replay, n } => {
                put_u64(&mut b, *replay);
                put_u64(&mut b, *n);
                CONSUMED
            }
            Request::Idle { replay, consumed } => {
                put_u64(&mut b, *replay);
                put_u64(&mut b, *consumed);
                IDLE
            }
            Request::Waits { conn } => {
                put_u64(&mut b, *conn);
                WAITS
            }
            Request::Barrier => BARRIER,
        };
        frame(kind, &b)
    }

    fn decode(kind: u8, b: &[u8]) -> Option<Request> {
        let hash = |at: usize| {
            Some(StreamHash {
                bytes: u64_at(b, at)?,
                hash: u64_at(b, at + 8)?,
            })
        };
        Some(match kind {
            ACCEPT if b.len() == 1 + 4 + 19 => Request::Accept {
                app: b[0] != 0,
                fd: i32_at(b, 1)?,
                peer: peer_at(b, 5)?,
            },
            INPUT if b.len() >= 28 => Request::Input {
                conn: u64_at(b, 0)?,
                fd: i32_at(b, 8)?,
                out: hash(12)?,
                data: b[28..].to_vec(),
            },
            CLOSE if b.len() == 24 => Request::Close {
                conn: u64_at(b, 0)?,
                out: hash(8)?,
            },
            CONSUMED if b.len() == 16 => Request::Consumed {
                replay: u64_at(b, 0)?,
                n: u64_at(b, 8)?,
            },
            IDLE if b.len() == 16 => Request::Idle {
                replay: u64_at(b, 0)?,
                consumed: u64_at(b, 8)?,
            },
            WAITS if b.len() == 8 => Request::Waits {
                conn: u64_at(b, 0)?,
            },
            BARRIER if b.is_empty() => Request::Barrier,
            _ => return None,
        })
    }
}

fn verdict_encode(v: Verdict) -> Vec<u8> {
    let (k, id) = match v {
        Verdict::Replicate(id) => (1u8, id),
        Verdict::Replay(id) => (2, id),
        Verdict::Pass => (3, 0),
        Verdict::Reject => (4, 0),
    };
    let mut b = vec![k];
    b.extend_from_slice(&id.to_le_bytes());
    frame(VERDICT, &b)
}

fn verdict_decode(b: &[u8]) -> Option<Verdict> {
    let id = u64_at(b, 1)?;
    Some(match *b.first()? {
        1 => Verdict::Replicate(id),
        2 => Verdict::Replay(id),
        3 => Verdict::Pass,
        4 => Verdict::Reject,
        _ => return None,
    })
}

// ---- the holder's side ----

/// What the holder answers a child with: the holder's own hook logic.
pub trait Handler: Send + Sync + 'static {
    /// A child accepted a connection.
    fn accept(&self, app: bool, peer: Option<SocketAddr>) -> Verdict;
    /// Child `pid` read input; `false` when it could not be replicated.
    /// (`on_conn`: what the child had written on `conn` before this read.)
    fn input(&self, conn: u64, on_conn: u64, data: &[u8], pid: u32) -> bool;
    /// A child waits for more input on connection `conn`.
    fn waits(&self, conn: u64);
    /// Children wrote `bytes` more on their replicated connections.
    fn wrote(&self, bytes: u64);
    /// A connection a child used has ended.
    fn close(&self, conn: u64, out: StreamHash);
    /// Returns once every input proposed so far has committed (it never
    /// returns if one will not: the server is rebuilt).
    fn barrier(&self);
    /// Child `pid` read replayed input (it has been answered already: it
    /// runs).
    fn consumed(&self, replay: u64, n: u64, pid: u32);
    /// Child `pid`, whose input on `conn` came through, has been answered.
    fn answered(&self, conn: u64, pid: u32);
    /// A child asks for more replayed input, having read `consumed` bytes.
    fn idle(&self, replay: u64, consumed: u64);
}

/// One child process connected to the holder.
#[derive(Debug)]
pub struct Session {
    /// Its pid (from the kernel).
    pub pid: u32,
    /// The connections it used and has not closed: their descriptor in the
    /// child and the output it last reported.
    pub adopted: Mutex<HashMap<u64, (i32, StreamHash)>>,
}

/// The holder's children, for a step-down that must end their clients'
/// connections too.
#[derive(Debug, Default)]
pub struct Sessions(Mutex<Vec<Arc<Session>>>);

impl Sessions {
    /// Every live session.
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn add(&self, s: Arc<Session>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(s);
    }

    fn remove(&self, s: &Arc<Session>) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|x| !Arc::ptr_eq(x, s));
    }
}

/// Starts the holder's channel; returns the address children use.
pub fn serve(handler: Arc<dyn Handler>, sessions: Arc<Sessions>) -> io::Result<Address> {
    let mut rnd = [0u8; 24];
    getrandom::fill(&mut rnd).map_err(|e| io::Error::other(e.to_string()))?;
    let mut token = [0u8; 16];
    token.copy_from_slice(&rnd[..16]);
    let name = format!(
        "apus-intercept/{}/{:016x}",
        std::process::id(),
        u64::from_le_bytes(rnd[16..].try_into().expect("8 bytes"))
    );
    let listener = UnixListener::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes())?)?;
    std::thread::Builder::new()
        .name("apus-children".into())
        .spawn(move || {
            crate::inside(|| {
                for stream in listener.incoming().flatten() {
                    let (handler, sessions) = (handler.clone(), sessions.clone());
                    let _ =
                        std::thread::Builder::new()
                            .name("apus-child".into())
                            .spawn(move || {
                                crate::inside(|| session(stream, &token, &*handler, &sessions))
                            });
                }
            })
        })?;
    Ok(Address { name, token })
}

fn peer_pid(s: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` has room for a ucred; `len` says so.
    let r = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(cred.pid as u32)
}

fn session(mut s: UnixStream, token: &[u8; 16], h: &dyn Handler, sessions: &Sessions) {
    match read_frame(&mut s) {
        Ok(Some((HELLO, body))) if body == token[..] => {}
        _ => return,
    }
    let Some(pid) = peer_pid(&s) else { return };
    if s.write_all(&frame(OK, &[])).is_err() {
        return;
    }
    let me = Arc::new(Session {
        pid,
        adopted: Mutex::new(HashMap::new()),
    });
    sessions.add(me.clone());
    loop {
        let (kind, body) = match read_frame(&mut s) {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                // The child cannot go on without its channel: say why it ends.
                tracing::warn!(pid, error = %e, "a forked process's channel broke; ending it");
                break;
            }
        };
        let Some(req) = Request::decode(kind, &body) else {
            tracing::warn!(
                pid,
                kind,
                len = body.len(),
                "a forked process sent a malformed request; ending its channel"
            );
            break;
        };
        // What to tell the holder once the child has its answer (and runs).
        let mut after: Option<Box<dyn FnOnce()>> = None;
        let reply = match req {
            Request::Accept { app, peer, .. } => verdict_encode(h.accept(app, peer)),
            Request::Input {
                conn,
                fd,
                out,
                data,
            } => {
                let before = me
                    .adopted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(conn, (fd, out))
                    .map_or(0, |(_, o)| o.bytes);
                h.wrote(out.bytes.saturating_sub(before));
                let pid = me.pid;
                after = Some(Box::new(move || h.answered(conn, pid)));
                if h.input(conn, out.bytes, &data, pid) {
                    frame(OK, &[])
                } else {
                    frame(FAILED, &[])
                }
            }
            Request::Close { conn, out } => {
                let before = me
                    .adopted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&conn)
                    .map_or(0, |(_, o)| o.bytes);
                h.wrote(out.bytes.saturating_sub(before));
                h.close(conn, out);
                frame(OK, &[])
            }
            Request::Consumed { replay, n } => {
                let pid = me.pid;
                after = Some(Box::new(move || h.consumed(replay, n, pid)));
                frame(OK, &[])
            }
            Request::Idle { replay, consumed } => {
                h.idle(replay, consumed);
                frame(OK, &[])
            }
            Request::Waits { conn } => {
                h.waits(conn);
                frame(OK, &[])
            }
            Request::Barrier => {
                h.barrier();
                frame(OK, &[])
            }
        };
        if let Err(e) = s.write_all(&reply) {
            tracing::warn!(pid, error = %e, "cannot answer a forked process; ending its channel");
            break;
        }
        if let Some(f) = after {
            f();
        }
    }
    // The child is gone (or broke the protocol): the connections it used
    // and did not close end with it.
    sessions.remove(&me);
    let left: Vec<(u64, StreamHash)> = me
        .adopted
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
        .map(|(conn, (_, out))| (conn, out))
        .collect();
    for (conn, out) in left {
        h.close(conn, out);
    }
}

/// Ends connection `fd` of process `pid` from outside it: a duplicate
/// taken with `pidfd_getfd` is shut down (the child sees end of stream).
pub fn shut_down_in(pid: u32, fd: i32) -> io::Result<()> {
    // SAFETY: pidfd_open takes a pid and flags and returns a descriptor.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pidfd_getfd on a pidfd we own; the result is checked.
    let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd as libc::c_int, fd, 0) };
    let err = io::Error::last_os_error();
    // SAFETY: closing the pidfd we opened.
    unsafe {
        crate::real::close(pidfd as libc::c_int);
    }
    if dup < 0 {
        return Err(err);
    }
    // SAFETY: `dup` is our own duplicate of the child's socket.
    unsafe {
        crate::real::shutdown(dup as libc::c_int, libc::SHUT_RDWR);
        crate::real::close(dup as libc::c_int);
    }
    Ok(())
}

// ---- the child's side ----

thread_local! {
    /// This thread's channel to the holder, and the pid it was opened in
    /// (a fork inherits the memory, not the right to use the stream).
    static LINK: RefCell<Option<(u32, UnixStream)>> = const { RefCell::new(None) };
}

fn connect(addr: &Address) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect_addr(&UnixAddr::from_abstract_name(addr.name.as_bytes())?)?;
    s.write_all(&frame(HELLO, &addr.token))?;
    match read_frame(&mut s)? {
        Some((OK, _)) => Ok(s),
        _ => Err(io::Error::other(
            "the replicating process refused the channel",
        )),
    }
}

/// Sends `req` to the holder and returns its answer frame. `Err` when the
/// holder cannot be reached: the caller must not serve the connection.
fn call(addr: &Address, req: &Request) -> io::Result<(u8, Vec<u8>)> {
    LINK.with(|l| {
        let mut l = l.borrow_mut();
        let me = std::process::id();
        if l.as_ref().is_none_or(|(pid, _)| *pid != me) {
            // An inherited stream is the parent's: this process opens its
            // own (dropping the copy closes only this process's descriptor).
            *l = None;
            *l = Some((me, connect(addr)?));
        }
        let (_, s) = l.as_mut().expect("set above");
        let r = s
            .write_all(&req.encode())
            .and_then(|()| read_frame(s))
            .and_then(|f| f.ok_or_else(|| io::Error::other("the replicating process is gone")));
        if r.is_err() {
            *l = None;
        }
        r
    })
}

/// A child's accept, judged by the holder.
pub fn accept(addr: &Address, app: bool, fd: i32, peer: Option<SocketAddr>) -> io::Result<Verdict> {
    match call(addr, &Request::Accept { app, fd, peer })? {
        (VERDICT, b) => verdict_decode(&b).ok_or_else(|| io::Error::other("malformed verdict")),
        _ => Err(io::Error::other("unexpected answer to ACCEPT")),
    }
}

/// A child's input, replicated by the holder; `Ok(false)` if it could not
/// be replicated.
pub fn input(addr: &Address, conn: u64, fd: i32, out: StreamHash, data: &[u8]) -> io::Result<bool> {
    let r = call(
        addr,
        &Request::Input {
            conn,
            fd,
            out,
            data: data.to_vec(),
        },
    )?;
    Ok(r.0 == OK)
}

/// A child closed a connection it used.
pub fn close(addr: &Address, conn: u64, out: StreamHash) -> io::Result<()> {
    call(addr, &Request::Close { conn, out }).map(|_| ())
}

/// A child is about to write to a client: returns once every input
/// proposed so far has committed.
pub fn barrier(addr: &Address) -> io::Result<()> {
    match call(addr, &Request::Barrier)? {
        (OK, _) => Ok(()),
        _ => Err(io::Error::other("unexpected answer to BARRIER")),
    }
}

/// A child read replayed input.
pub fn consumed(addr: &Address, replay: u64, n: u64) -> io::Result<()> {
    call(addr, &Request::Consumed { replay, n }).map(|_| ())
}

/// A child waits for more input on replicated connection `conn`.
pub fn waits(addr: &Address, conn: u64) -> io::Result<()> {
    call(addr, &Request::Waits { conn }).map(|_| ())
}

/// A child waits for more replayed input, having read `consumed` bytes.
pub fn idle(addr: &Address, replay: u64, consumed: u64) -> io::Result<()> {
    call(addr, &Request::Idle { replay, consumed }).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let reqs = [
            Request::Accept {
                app: true,
                fd: 9,
                peer: Some("127.0.0.1:4000".parse().unwrap()),
            },
            Request::Accept {
                app: false,
                fd: 3,
                peer: Some("[::1]:80".parse().unwrap()),
            },
            Request::Accept {
                app: false,
                fd: 3,
                peer: None,
            },
            Request::Input {
                conn: 5,
                fd: 7,
                out: StreamHash { bytes: 3, hash: 4 },
                data: b"SELECT 1".to_vec(),
            },
            Request::Close {
                conn: 5,
                out: StreamHash { bytes: 8, hash: 9 },
            },
            Request::Consumed { replay: 2, n: 100 },
            Request::Idle {
                replay: 2,
                consumed: 100,
            },
            Request::Waits { conn: 5 },
            Request::Barrier,
        ];
        for r in reqs {
            let f = r.encode();
            let (k, b) = read_frame(&mut f.as_slice()).unwrap().unwrap();
            assert_eq!(Request::decode(k, &b), Some(r));
        }
        assert_eq!(Request::decode(INPUT, &[0; 5]), None);
        assert_eq!(Request::decode(99, &[]), None);
        for v in [
            Verdict::Replicate(3),
            Verdict::Replay(4),
            Verdict::Pass,
            Verdict::Reject,
        ] {
            let f = verdict_encode(v);
            assert_eq!(verdict_decode(&f[5..]), Some(v));
        }
    }

    struct Echo;
    impl Handler for Echo {
        fn accept(&self, app: bool, _: Option<SocketAddr>) -> Verdict {
            if app {
                Verdict::Replicate(7)
            } else {
                Verdict::Reject
            }
        }
        fn input(&self, _: u64, _: u64, data: &[u8], _: u32) -> bool {
            data != b"bad"
        }
        fn waits(&self, _: u64) {}
        fn wrote(&self, _: u64) {}
        fn close(&self, _: u64, _: StreamHash) {}
        fn barrier(&self) {}
        fn consumed(&self, _: u64, _: u64, _: u32) {}
        fn answered(&self, _: u64, _: u32) {}
        fn idle(&self, _: u64, _: u64) {}
    }

    #[test]
    fn a_child_talks_to_its_holder_and_a_wrong_token_is_refused() {
        let sessions = Arc::new(Sessions::default());
        let addr = serve(Arc::new(Echo), sessions.clone()).unwrap();
        assert_eq!(accept(&addr, true, 5, None).unwrap(), Verdict::Replicate(7));
        assert!(input(&addr, 7, 5, StreamHash::default(), b"x").unwrap());
        assert!(!input(&addr, 7, 5, StreamHash::default(), b"bad").unwrap());
        assert_eq!(sessions.all().len(), 1);
        assert_eq!(sessions.all()[0].pid, std::process::id());
        let wrong = Address {
            name: addr.name.clone(),
            token: [0; 16],
        };
        assert!(connect(&wrong).is_err());
    }
}
