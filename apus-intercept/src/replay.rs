//! The state machine of an intercepted server: replaying committed input.
//!
//! Every node applies every entry. Entries this node proposed are already
//! in its server (its threads read them): applying them only releases the
//! waiting server thread, in log order (the [`Turnstile`]). Entries of
//! other nodes' connections are replayed into the local server through a
//! real loopback connection per client connection; a thread per replayed
//! connection drains and hashes what the server answers, and when the
//! connection closes its hash is compared with the leader's (a difference
//! is counted as "outputs differed": servers put nonces and times in their
//! replies, so this is not a verdict on their state; `apus check` is).
//!
//! Replay keeps log order: an entry goes into the server only once the
//! server has read everything written before it, however long that takes
//! (or the server closed that connection).

use std::collections::{HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use apus::config::ServerCommand;
use apus::{Entry, StateMachine};
use apus_core::EntryKind;
use tracing::{debug, info, warn};

use crate::gate::Gate;
use crate::payload::{Close, Connect, Out, StreamHash};
use crate::registry::Registry;

/// How long a replayed connection may take to deliver the server's last
/// output after its CLOSE is applied.
const DRAIN_WAIT: Duration = Duration::from_secs(5);
/// How long a forked process of the server may keep a replayed connection
/// open after its end of stream (see `Replay::linger`).
const LINGER_LIMIT: Duration = Duration::from_secs(120);
/// How long replay waits for the local server to listen.
const CONNECT_WAIT: Duration = Duration::from_secs(30);
/// How often replay says it is still waiting for the server to read.
const CONSUME_NOTE_EVERY: Duration = Duration::from_secs(10);
/// How long the server may answer replayed input without a read of it
/// being seen before replay gives the server up (see `wait_unread`).
const UNTRACKED_AFTER: Duration = Duration::from_secs(5);
/// The longest the next input waits for a forked process of the server to
/// finish with the one it got before (see [`Turnstile`]): a statement that
/// runs longer than this lets the next one start.
pub const STATEMENT_WAIT: Duration = Duration::from_secs(1);
/// How long a forked reader may sleep with replayed input unread before
/// replay goes on without it (see `Replay::replay_data`).
const BLOCKED_READER: Duration = Duration::from_millis(50);
/// The same for a thread of this process: much longer, since a thread
/// also sleeps on the server's own short-held locks, whose holder may wait
/// long for a core here; passing it over then breaks log order (a memcached
/// replica differed with 50 ms). A row lock that a later entry releases
/// waits far longer (MariaDB: 50 s).
pub const BLOCKED_THREAD: Duration = STATEMENT_WAIT;

/// Whether process (or thread) `pid` is running or runnable (or in uninterruptible
/// I/O), as opposed to asleep: blocked on a lock, or waiting for input.
pub fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rfind(')')
            .and_then(|i| s[i + 1..].split_whitespace().next())
            .is_some_and(|state| matches!(state, "R" | "D"))
    })
}

/// Orders the leader's forked processes as replay orders the followers'.
///
/// Output commit lets the leader's server read its input as soon as it is
/// proposed, in read order: that order is the log's. For a server whose
/// connections run in different processes (PostgreSQL's backends), reading
/// in log order is not enough: two backends handed input a microsecond
/// apart race for the same row lock, and the replicas' runs go different
/// ways. So input read by one forked process is handed over only once the
/// process served before it (for another connection) has stopped running:
/// it waits for more input, or sleeps (blocked on a lock, as it would be on
/// every replica), or [`STATEMENT_WAIT`] has passed. Followers replay by
/// the same rule (`Replay::replay_data`), so every run executes what it
/// read in log order up to the statements that block.
#[derive(Debug, Default)]
pub struct Turnstile {
    state: Mutex<TurnState>,
    turn: Condvar,
}

#[derive(Clone, Copy, Debug)]
struct Released {
    conn: u64,
    by: u32,
    at: Instant,
    answered: bool,
}

#[derive(Debug, Default)]
struct TurnState {
    /// The last process served: its connection, the forked process, when,
    /// and whether that process has been answered (is runnable) yet.
    last: Option<Released>,
    /// Connections whose process waits for more input.
    idle: HashSet<u64>,
}

impl Turnstile {
    /// Connection `conn`'s process waits for more input: it has finished
    /// with what it read.
    pub fn idle(&self, conn: u64) {
        lock(&self.state).idle.insert(conn);
        self.turn.notify_all();
    }

    /// The forked process whose input on `conn` came through last has been
    /// answered: from now on it runs, or sleeps because it is blocked.
    pub fn answered(&self, conn: u64) {
        if let Some(r) = lock(&self.state).last.as_mut().filter(|r| r.conn == conn) {
            r.answered = true;
        }
        self.turn.notify_all();
    }

    /// Forked process `by` is about to get input on `conn`: waits until the
    /// one served before it is done (see above).
    pub fn take_turn(&self, conn: u64, by: u32) {
        debug_assert_ne!(by, 0, "only forked processes take turns");
        let mut st = lock(&self.state);
        loop {
            let racing = st.last.is_some_and(|r| {
                r.by != by
                    && r.conn != conn
                    && !st.idle.contains(&r.conn)
                    && r.at.elapsed() < STATEMENT_WAIT
                    && (!r.answered || running(r.by))
            });
            if !racing {
                break;
            }
            let (g, _) = self
                .turn
                .wait_timeout(st, Duration::from_millis(1))
                .unwrap_or_else(|p| p.into_inner());
            st = g;
        }
        st.idle.remove(&conn);
        st.last = Some(Released {
            conn,
            by,
            at: Instant::now(),
            answered: false,
        });
        drop(st);
        self.turn.notify_all();
    }
}

/// Input written into the server on connection `id` up to byte `target`,
/// which it may not have read yet.
struct Unread {
    id: u64,
    target: u64,
    /// The server closed the connection (its reads of it are over).
    drained: Arc<AtomicBool>,
    /// What the server had answered on it when the input went in.
    out: Arc<Mutex<StreamHash>>,
    answered_before: u64,
}

/// What the server must have answered on one replayed connection before
/// its next input goes in (see [`crate::payload`]).
struct OnConn {
    out: Arc<Mutex<StreamHash>>,
    shortfall: Arc<AtomicU64>,
    target: u64,
}

impl OnConn {
    fn answered(&self) -> u64 {
        lock(&self.out).bytes + self.shortfall.load(Ordering::Relaxed)
    }

    fn reached(&self) -> bool {
        self.answered() >= self.target
    }

    /// The wait timed out: its replies differ here.
    fn give_up(&self) {
        let short = self.target.saturating_sub(self.answered());
        self.shortfall.fetch_add(short, Ordering::Relaxed);
    }
}

struct Replayed {
    stream: TcpStream,
    /// The replay connection's own address (how the server's accept knows it).
    local: SocketAddr,
    /// Bytes written into the server on this connection.
    written: u64,
    out: Arc<Mutex<StreamHash>>,
    /// How much less than the leader's the server answered on it where a
    /// wait timed out (as [`Answered::shortfall`]).
    shortfall: Arc<AtomicU64>,
    drained: Arc<AtomicBool>,
    /// What the server answered on the connections of this one's leader
    /// (see [`crate::payload`]), shared with their drain threads.
    answered: Arc<Answered>,
    /// Whether a wait for the server's answers timed out on this connection
    /// (said once: it is the first thing to look at when a replica lags).
    short_said: bool,
}

/// What the local server answered on one leader incarnation's replayed
/// connections.
#[derive(Debug, Default)]
struct Answered {
    /// Bytes drained.
    bytes: AtomicU64,
    /// How much less than the leader's this server answered where a wait
    /// timed out (its replies differed): later waits allow for it, so one
    /// difference costs one wait, not one per entry.
    shortfall: AtomicU64,
    /// The replay thread, while it waits for more (drain threads wake it).
    waiter: Mutex<Option<thread::Thread>>,
    waiting: AtomicBool,
}

impl Answered {
    /// A drain thread got `n` more bytes.
    fn add(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst)
            && let Some(t) = lock(&self.waiter).as_ref()
        {
            t.unpark();
        }
    }
}

/// A connection into the local server that the library made itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Internal {
    /// Replays client connection `id`.
    Replay(u64),
    /// Carries the digest command of `apus check`.
    Check,
}

/// The digest of one replica at one log position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckResult {
    /// The CHECK entry's index.
    pub index: u64,
    /// What the digest command printed, or why it failed.
    pub digest: Result<String, String>,
}

/// What the replayer and the hooks share.
pub struct Replay {
    /// The local server's address.
    pub app: SocketAddr,
    /// This incarnation's nonce (identifies our own CONNECT entries).
    pub nonce: u64,
    /// Our replicated connections.
    pub registry: &'static Registry,
    /// Orders the leader's forked processes.
    pub turnstile: Turnstile,
    /// Keeps the server's reads of input written ahead in log order.
    pub gate: Arc<Gate>,
    /// The digest command (`apus check`).
    digest: Option<ServerCommand>,
    /// The holder's forked children (their threads must be quiet for a
    /// check).
    children: Option<Arc<crate::child::Sessions>>,
    /// The readiness probe, and whether it has succeeded in this run.
    ready: Option<ServerCommand>,
    server_ready: AtomicBool,
    conns: Mutex<HashMap<u64, Replayed>>,
    /// The input written last, until the server has read it.
    unread: Mutex<Option<Unread>>,
    /// Addresses of the library's live connections into the server.
    internal: Mutex<HashMap<SocketAddr, Internal>>,
    /// Connections this node accepted (their CONNECT carried our nonce),
    /// until their CLOSE.
    own: Mutex<HashSet<u64>>,
    /// What the local server answered on the replayed connections of each
    /// leader incarnation (by its nonce).
    answered: Mutex<HashMap<u64, Arc<Answered>>>,
    /// Replayed connections whose output differed from the leader's.
    pub outputs_differed: AtomicU64,
    /// Entries replayed into the local server.
    pub replayed: AtomicU64,
    /// Entries replay went on past, their reader (a forked process) being
    /// blocked: where concurrent transactions may commit in another order
    /// than on the leader.
    pub passed_blocked: AtomicU64,
    /// The last consistency check.
    pub last_check: Mutex<Option<CheckResult>>,
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay")
            .field("app", &self.app)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Replay {
    /// A replayer for the server at `app`.
    pub fn new(
        app: SocketAddr,
        nonce: u64,
        registry: &'static Registry,
        digest: Option<ServerCommand>,
        ready: Option<ServerCommand>,
        children: Option<Arc<crate::child::Sessions>>,
    ) -> Replay {
        Replay {
            app,
            nonce,
            registry,
            turnstile: Turnstile::default(),
            gate: Arc::new(Gate::default()),
            digest,
            children,
            ready,
            server_ready: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            unread: Mutex::new(None),
            internal: Mutex::new(HashMap::new()),
            own: Mutex::new(HashSet::new()),
            answered: Mutex::new(HashMap::new()),
            outputs_differed: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            passed_blocked: AtomicU64::new(0),
            last_check: Mutex::new(None),
        }
    }

    /// What the connection from `peer` is, if the library made it. Only
    /// live connections are known, by their full address: a client can
    /// never be taken for one, since no other socket can hold that address
    /// while ours does.
    pub fn internal(&self, peer: SocketAddr) -> Option<Internal> {
        lock(&self.internal).get(&peer).copied()
    }

    /// Ids of the connections being replayed.
    pub fn replayed_ids(&self) -> Vec<u64> {
        lock(&self.conns).keys().copied().collect()
    }

    /// Opens a loopback connection to the server from an address it will
    /// recognise as `what`; waits for the server to listen.
    fn connect(&self, what: Internal) -> io::Result<(TcpStream, SocketAddr)> {
        let deadline = Instant::now() + CONNECT_WAIT;
        loop {
            match self.try_connect(what) {
                Ok(s) => return Ok(s),
                Err(e)
                    if Instant::now() < deadline
                        && e.kind() == io::ErrorKind::ConnectionRefused =>
                {
                    thread::sleep(Duration::from_millis(10));
                }
                // The chosen local port's connection to the server is still
                // in TIME_WAIT (an earlier run replayed through it): another.
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.kind(),
                            io::ErrorKind::AddrNotAvailable | io::ErrorKind::AddrInUse
                        ) => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn try_connect(&self, what: Internal) -> io::Result<(TcpStream, SocketAddr)> {
        let SocketAddr::V4(app) = self.app else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "replay needs an IPv4 app address (the configuration refuses others)",
            ));
        };
        // SAFETY: plain socket creation; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh socket we own; TcpStream closes it.
        let stream = unsafe { TcpStream::from_raw_fd(fd) };
        // Its port may be bound again while the connection lingers in
        // TIME_WAIT after it ended (by anyone with SO_REUSEADDR): the server
        // must then see a client like any other (see `internal`).
        let one: libc::c_int = 1;
        // SAFETY: setting an option on our own socket from a valid int.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&raw const one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let mut local = bind_even_port(fd)?;
        let mut got = len;
        // SAFETY: `local` has room for a sockaddr_in; `got` holds its size.
        if unsafe { libc::getsockname(fd, (&raw mut local).cast(), &mut got) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let me = SocketAddr::V4(SocketAddrV4::new(
            std::net::Ipv4Addr::LOCALHOST,
            u16::from_be(local.sin_port),
        ));
        // Known before the server can accept it. SO_REUSEADDR lets this
        // socket bind a port that a live connection of ours holds: its entry
        // must not be replaced, and then removed when this connect fails on
        // the same address pair (the server would take that connection for a
        // client's, and replay would wait for reads it never sees).
        self.claim(me, what)?;
        let target = sockaddr_in(*app.ip(), app.port());
        // SAFETY: `target` is a valid sockaddr_in of `len` bytes.
        if unsafe { libc::connect(fd, (&raw const target).cast(), len) } != 0 {
            let e = io::Error::last_os_error();
            lock(&self.internal).remove(&me);
            return Err(e);
        }
        stream.set_nodelay(true)?;
        Ok((stream, me))
    }

    /// Records `me` as the address of internal connection `what`, unless a
    /// live one of ours holds it (see `try_connect`).
    fn claim(&self, me: SocketAddr, what: Internal) -> io::Result<()> {
        let mut internal = lock(&self.internal);
        if internal.contains_key(&me) {
            return Err(io::ErrorKind::AddrInUse.into());
        }
        internal.insert(me, what);
        Ok(())
    }

    /// Waits (once per run) until the server answers as the leader's did
    /// when its clients connected: a server that listens before it is
    /// ready (PostgreSQL while it starts up) would turn replayed
    /// connections away.
    fn wait_ready(&self) {
        let Some(cmd) = &self.ready else { return };
        if self.server_ready.load(Ordering::Acquire) {
            return;
        }
        let since = Instant::now();
        let mut next_note = CONSUME_NOTE_EVERY;
        while let Err(e) = crate::check::run_command(cmd, self) {
            if since.elapsed() >= next_note {
                warn!(error = %e, "the local server is not ready yet (cluster.ready); replay waits");
                next_note += CONSUME_NOTE_EVERY;
            }
            thread::sleep(Duration::from_millis(50));
        }
        self.server_ready.store(true, Ordering::Release);
    }

    /// Waits until the local server has answered `out` bytes on the
    /// connections of `counter`'s leader, as the leader's had when it read
    /// the entry about to go in: so a reply that came before that input on
    /// the leader (to an earlier request, of this client or another) has
    /// come here too, even from a worker thread. Bounded by
    /// [`STATEMENT_WAIT`]: a server whose replies are shorter here (they
    /// differed) is not waited for longer.
    /// Returns whether the wait timed out.
    fn wait_answered(&self, a: &Answered, out: u64, on_conn: Option<&OnConn>) -> bool {
        let target = out.saturating_sub(a.shortfall.load(Ordering::Relaxed));
        let conn_done = || on_conn.is_none_or(OnConn::reached);
        if a.bytes.load(Ordering::SeqCst) >= target && conn_done() {
            return false;
        }
        // Parked, not polling: on two cores a polling replay starves the
        // engine threads of this node and of the others.
        *lock(&a.waiter) = Some(thread::current());
        a.waiting.store(true, Ordering::SeqCst);
        let since = Instant::now();
        let mut timed_out = false;
        while a.bytes.load(Ordering::SeqCst) < target || !conn_done() {
            let waited = since.elapsed();
            if waited >= STATEMENT_WAIT {
                let short = target.saturating_sub(a.bytes.load(Ordering::SeqCst));
                a.shortfall.fetch_add(short, Ordering::Relaxed);
                if let Some(c) = on_conn {
                    c.give_up();
                }
                debug!(
                    short,
                    "the local server answered less than the leader's had; going on"
                );
                timed_out = true;
                break;
            }
            thread::park_timeout((STATEMENT_WAIT - waited).min(Duration::from_millis(10)));
        }
        a.waiting.store(false, Ordering::SeqCst);
        timed_out
    }

    fn counter(&self, origin: u64) -> Arc<Answered> {
        lock(&self.answered).entry(origin).or_default().clone()
    }

    fn replay_connect(&self, id: u64, connect: Connect) {
        self.wait_ready();
        let answered = self.counter(connect.origin);
        let _ = self.wait_answered(&answered, connect.out, None);
        let (stream, local) = match self.connect(Internal::Replay(id)) {
            Ok(s) => s,
            Err(e) => {
                warn!(conn = id, error = %e, "cannot replay a connection into the local server");
                return;
            }
        };
        let out = Arc::new(Mutex::new(StreamHash::default()));
        let drained = Arc::new(AtomicBool::new(false));
        match stream.try_clone() {
            Ok(reader) => {
                let (o, d, a) = (out.clone(), drained.clone(), answered.clone());
                let (gate, origin) = (self.gate.clone(), connect.origin);
                if thread::Builder::new()
                    .name(format!("apus-drain-{id}"))
                    .spawn(move || {
                        crate::inside(|| drain(reader, &o, &d, &a, |n| gate.drained(origin, id, n)))
                    })
                    .is_err()
                {
                    warn!(conn = id, "cannot spawn a drain thread");
                    drained.store(true, Ordering::Release);
                }
            }
            Err(_) => drained.store(true, Ordering::Release),
        }
        self.gate.open(id, connect.origin);
        lock(&self.conns).insert(
            id,
            Replayed {
                stream,
                local,
                written: 0,
                out,
                shortfall: Arc::default(),
                drained,
                answered,
                short_said: false,
            },
        );
    }

    fn replay_data(&self, id: u64, out: Out, data: &[u8]) {
        if self.replay_into_closed(id, out) {
            return;
        }
        let Some((answered, written, on_conn)) = lock(&self.conns).get(&id).map(|c| {
            let on_conn = out.on_conn.map(|target| OnConn {
                out: c.out.clone(),
                shortfall: c.shortfall.clone(),
                target,
            });
            (c.answered.clone(), c.written, on_conn)
        }) else {
            debug!(conn = id, "data for a connection that is not replayed here");
            return;
        };
        if !data.is_empty() && self.gate.gated(id) {
            // Written ahead: the read hook keeps log order (see `gate`).
            // Only this thread writes, so `written` holds.
            self.gate.push(id, written + data.len() as u64, out);
            let mut conns = lock(&self.conns);
            let Some(c) = conns.get_mut(&id) else { return };
            debug_assert_eq!(c.written, written, "one replayer writes");
            if let Err(e) = c.stream.write_all(data) {
                debug!(conn = id, error = %e, "the local server no longer takes input on a replayed connection");
                drop(conns);
                self.gate.closed(id);
                return;
            }
            c.written += data.len() as u64;
            return;
        }
        let timed_out = self.wait_answered(&answered, out.all, on_conn.as_ref());
        let mut conns = lock(&self.conns);
        let Some(c) = conns.get_mut(&id) else {
            return;
        };
        if timed_out && !c.short_said {
            c.short_said = true;
            warn!(
                conn = id,
                answered_here = lock(&c.out).bytes,
                written = c.written,
                read_by_server = self.registry.progress(id).consumed,
                drained = c.drained.load(Ordering::Acquire),
                "the local server answered less than the leader's before this input; going on \
                 (said once per connection)"
            );
        }
        if data.is_empty() {
            // The client closed its side.
            self.gate.end_input(id);
            let _ = c.stream.shutdown(Shutdown::Write);
            return;
        }
        self.gate.announce(id, c.written + data.len() as u64);
        if let Err(e) = c.stream.write_all(data) {
            debug!(conn = id, error = %e, "the local server no longer takes input on a replayed connection");
            return;
        }
        c.written += data.len() as u64;
        let unread = Unread {
            id,
            target: c.written,
            drained: c.drained.clone(),
            out: c.out.clone(),
            answered_before: lock(&c.out).bytes,
        };
        drop(conns);
        *lock(&self.unread) = Some(unread);
    }

    /// Input for a replayed connection the local server has closed (its
    /// drain saw the end): the server cannot take it, and will never answer
    /// on it, so nothing waits for its answers. What the leader's server
    /// had answered on it by then is credited to the other connections'
    /// waits, or each of them would wait [`STATEMENT_WAIT`] for answers
    /// that cannot come (e2e: a replica took a second per entry). Said
    /// once per connection: the leader's server kept it open, so this
    /// replica's state may differ (`apus check` tells). Returns whether
    /// the input was for such a connection.
    fn replay_into_closed(&self, id: u64, out: Out) -> bool {
        let mut conns = lock(&self.conns);
        let Some(c) = conns.get_mut(&id) else {
            return false;
        };
        if !c.drained.load(Ordering::Acquire) {
            return false;
        }
        let here = lock(&c.out).bytes + c.shortfall.load(Ordering::Relaxed);
        let credit = out.on_conn.unwrap_or(0).saturating_sub(here);
        c.shortfall.fetch_add(credit, Ordering::Relaxed);
        c.answered.shortfall.fetch_add(credit, Ordering::Relaxed);
        self.gate.credit(id, credit);
        if !c.short_said {
            c.short_said = true;
            warn!(
                conn = id,
                written = c.written,
                "the local server closed a replayed connection that the leader's server kept open; \
                 its input is dropped here and this replica may differ (said once per connection)"
            );
        }
        true
    }

    /// Waits until the server has read the input last written into it
    /// ([`Unread`]), so that it reads its input in log order across
    /// connections, as the leader's did. Only the server closing the
    /// connection ends the wait (its reads of it are over; the leader's
    /// server did the same, deterministically), or a forked reader that
    /// blocks.
    fn wait_read(&self) {
        self.wait_unread();
        self.gate.wait_empty(CONSUME_NOTE_EVERY, |stuck, waited| {
            warn!(
                conn = stuck.conn,
                waited_s = waited.as_secs(),
                ?stuck,
                "the local server has not read the input written ahead of it; replay waits (log order)"
            );
        });
    }

    /// Waits for the input written last one entry at a time (see
    /// [`wait_read`](Self::wait_read)).
    fn wait_unread(&self) {
        let Some(Unread {
            id,
            target,
            drained,
            out,
            answered_before,
        }) = lock(&self.unread).take()
        else {
            return;
        };
        let local = lock(&self.conns).get(&id).map(|c| c.local);
        let since = Instant::now();
        let mut next_note = CONSUME_NOTE_EVERY;
        let mut asleep_since: Option<Instant> = None;
        while !self
            .registry
            .wait_consumed(id, target, Duration::from_millis(10))
        {
            if drained.load(Ordering::Acquire) {
                debug!(
                    conn = id,
                    "the local server closed a replayed connection with input unread"
                );
                return;
            }
            // A reader (a forked process, or the thread that last read this
            // connection) that sleeps with input waiting is blocked on
            // something else: a lock its statement took in another order
            // than the leader's (concurrent clients race for row locks), which
            // a later entry releases. Replay goes on, or it would wait until
            // the server gives up on the lock (MariaDB: 50 s, then an error
            // the leader never saw). It reads this input when it wakes.
            let progress = self.registry.progress(id);
            let (sleeper, patience) = if progress.reader != 0 {
                (progress.reader, BLOCKED_READER)
            } else {
                (progress.thread, BLOCKED_THREAD)
            };
            if sleeper != 0 && !running(sleeper) {
                let at = *asleep_since.get_or_insert_with(Instant::now);
                if at.elapsed() >= patience {
                    self.passed_blocked.fetch_add(1, Ordering::Relaxed);
                    debug!(
                        conn = id,
                        task = sleeper,
                        "replay goes on past a reader blocked with input unread"
                    );
                    return;
                }
            } else {
                asleep_since = None;
            }
            let answered = lock(&out).bytes;
            if progress.consumed == 0
                && progress.thread == 0
                && progress.reader == 0
                && answered > answered_before
                && since.elapsed() >= UNTRACKED_AFTER
            {
                // The server answered input that no hooked read of a replay
                // connection returned: it reads this connection as another
                // (a client's), so replay cannot keep its reads in log order
                // and would wait here for good. Its state is the log's no
                // more; the log rebuilds it.
                crate::rebuild(&format!(
                    "the local server answered replayed connection {id} ({answered} bytes) but no \
                     read of it was seen as replay: replay lost track of it"
                ));
            }
            if since.elapsed() >= next_note {
                warn!(
                    conn = id,
                    waited_s = since.elapsed().as_secs(),
                    target,
                    ?local,
                    ?progress,
                    answered,
                    sleeper_running = sleeper != 0 && running(sleeper),
                    "the local server has not read the input written last; replay waits (log order)"
                );
                next_note += CONSUME_NOTE_EVERY;
            }
        }
        // A forked process runs what it read before the next entry goes
        // in, unless it blocks (see `Turnstile`).
        let reader = self.registry.progress(id).reader;
        if reader != 0 {
            let since = Instant::now();
            while since.elapsed() < STATEMENT_WAIT
                && running(reader)
                && !self
                    .registry
                    .wait_idle(id, target, Duration::from_millis(1))
            {}
        }
    }

    /// Ends several replayed connections at once: every one is shut down
    /// first, then their output is drained under one deadline, so a new
    /// leader waits `DRAIN_WAIT` at most, however many clients the old one
    /// had. Returns each connection that was replayed here with its output.
    pub fn finish_all(&self, ids: &[u64]) -> Vec<(u64, StreamHash)> {
        // Input written ahead goes in first, in order.
        self.wait_read();
        let ended: Vec<(u64, Replayed)> = {
            let mut conns = lock(&self.conns);
            ids.iter()
                .filter_map(|id| conns.remove(id).map(|c| (*id, c)))
                .collect()
        };
        for (id, c) in &ended {
            self.gate.end_input(*id);
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
                let out = *lock(&c.out);
                lock(&self.internal).remove(&c.local);
                self.gate.forget(id);
                if c.drained.load(Ordering::Acquire) || self.registry.progress(id).reader == 0 {
                    if !c.drained.load(Ordering::Acquire) {
                        debug!(
                            conn = id,
                            "the local server did not finish its output in time"
                        );
                    }
                    let _ = c.stream.shutdown(Shutdown::Both);
                    self.registry.forget_replay(id);
                } else {
                    self.linger(id, c);
                }
                (id, out)
            })
            .collect()
    }

    /// Leaves replayed connection `id`, read by a forked process, open
    /// until the server closes it (at most [`LINGER_LIMIT`]). Cutting it
    /// would make a backend still running the client's last statement
    /// (blocked on a lock a later entry releases) fail its reply and lose
    /// a transaction the leader's server committed: a PostgreSQL replica
    /// rebuilt from the log held other data than the rest (CI; 1 rebuild in
    /// 3 under CPU load, "could not send data to client: Broken pipe").
    fn linger(&self, id: u64, c: Replayed) {
        let registry = self.registry;
        let spawned = thread::Builder::new()
            .name(format!("apus-linger-{id}"))
            .spawn(move || {
                crate::inside(|| {
                    let since = Instant::now();
                    while !c.drained.load(Ordering::Acquire) && since.elapsed() < LINGER_LIMIT {
                        thread::sleep(Duration::from_millis(10));
                    }
                    let _ = c.stream.shutdown(Shutdown::Both);
                    registry.forget_replay(id);
                });
            });
        if spawned.is_err() {
            warn!(
                conn = id,
                "cannot keep a replayed connection open for its server"
            );
        }
    }

    fn replay_close(&self, id: u64, leader: Option<Close>) {
        let Some((_, mine)) = self.finish_all(&[id]).pop() else {
            return;
        };
        match leader {
            Some(l) if l.bytes_out != mine.bytes || l.hash_out != mine.hash => {
                self.outputs_differed.fetch_add(1, Ordering::Relaxed);
                info!(
                    conn = id,
                    leader_bytes = l.bytes_out,
                    local_bytes = mine.bytes,
                    "outputs differed: the local server's replies on this connection differ from \
                     the leader's (servers put times and nonces in replies; `apus check` compares state)"
                );
            }
            _ => {}
        }
    }

    /// Runs the digest command at log position `index` (every earlier
    /// entry has been read by the server) and records the result.
    /// Waits until the server's threads (and its forked processes) are done
    /// with what replay gave them so far, up to [`STATEMENT_WAIT`].
    fn wait_quiescent(&self) {
        let children: Vec<u32> = self
            .children
            .as_ref()
            .map(|c| c.all().iter().map(|s| s.pid).collect())
            .unwrap_or_default();
        crate::check::wait_quiescent(&children, STATEMENT_WAIT);
    }

    fn check(&self, index: u64) {
        self.wait_ready();
        self.wait_quiescent();
        let digest = match &self.digest {
            None => Err("no digest command configured (cluster.digest)".to_string()),
            Some(cmd) => crate::check::run_command(cmd, self),
        };
        match &digest {
            Ok(d) => info!(index, digest = %d, "check: digest recorded"),
            Err(e) => warn!(index, error = %e, "check: no digest"),
        }
        *lock(&self.last_check) = Some(CheckResult { index, digest });
    }

    /// Opens a connection into the server for the digest command; it is
    /// known as internal until `done` is called with its address.
    pub fn connect_check(&self) -> io::Result<(TcpStream, SocketAddr)> {
        self.connect(Internal::Check)
    }

    /// An internal connection has ended.
    pub fn forget_internal(&self, local: SocketAddr) {
        lock(&self.internal).remove(&local);
    }

    fn apply_entry(&self, e: &Entry<'_>) {
        // Pipelined: more input for the connection written last goes in at
        // once; anything else waits until the server has read that.
        // Written ahead (see `gate`): the read hook keeps the order, and
        // only input written one entry at a time is waited for.
        let same_stream = e.kind == EntryKind::Data
            && lock(&self.unread).as_ref().is_some_and(|u| u.id == e.conn);
        let ahead = e.kind == EntryKind::Data
            && crate::payload::split_data(e.payload).is_some_and(|(_, input)| !input.is_empty())
            && self.gate.gated(e.conn);
        if ahead {
            self.wait_unread();
        } else if !same_stream {
            self.wait_read();
        }
        match e.kind {
            EntryKind::Noop => {}
            EntryKind::Check => self.check(e.index),
            EntryKind::Connect => match Connect::decode(e.payload) {
                Some(c) if c.origin == self.nonce => {
                    lock(&self.own).insert(connect_id(e));
                }
                Some(c) => {
                    self.replay_connect(connect_id(e), c);
                    self.replayed.fetch_add(1, Ordering::Relaxed);
                }
                None => warn!(index = e.index, "a malformed CONNECT entry; not replayed"),
            },
            // Our own connection: its input is already in our server. (A
            // CLOSE of it from a new leader only ends it in the log.)
            EntryKind::Data | EntryKind::Close if lock(&self.own).contains(&e.conn) => {
                if e.kind == EntryKind::Close {
                    lock(&self.own).remove(&e.conn);
                }
            }
            EntryKind::Data => match crate::payload::split_data(e.payload) {
                Some((out, input)) => {
                    self.replay_data(e.conn, out, input);
                    self.replayed.fetch_add(1, Ordering::Relaxed);
                }
                None => warn!(index = e.index, "a malformed DATA entry; not replayed"),
            },
            EntryKind::Close => {
                self.replay_close(e.conn, Close::decode(e.payload));
                self.replayed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn drain(
    mut reader: TcpStream,
    out: &Mutex<StreamHash>,
    drained: &AtomicBool,
    answered: &Answered,
    also: impl Fn(u64),
) {
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = reader.read(&mut buf) {
        if n == 0 {
            break;
        }
        lock(out).update(&buf[..n]);
        answered.add(n as u64);
        also(n as u64);
    }
    drained.store(true, Ordering::Release);
}

/// Tries for the local end of a replay connection before an ephemeral port.
const EVEN_PORT_TRIES: usize = 32;

/// Binds `fd` to 127.0.0.1 on a free even port of the ephemeral range, or
/// any port if none is found. Not `bind(0)`: Linux gives `bind(0)` odd ports,
/// the ones a server told to listen on a free port gets too, and a replay
/// connection holding one while a replica's server restarts (a rebuild) took
/// its port (CI: "Address already in use"). `connect` takes even ports, and
/// never one bound already.
fn bind_even_port(fd: libc::c_int) -> io::Result<libc::sockaddr_in> {
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let (low, high) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|w| w.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .filter(|(l, h)| l < h)
        .unwrap_or((32768, 60999));
    let span = u32::from(high - low) / 2;
    for _ in 0..EVEN_PORT_TRIES {
        let mut r = [0u8; 4];
        let _ = getrandom::fill(&mut r);
        let port = (u32::from(low) + u32::from_le_bytes(r) % span.max(1) * 2) & !1;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        let local = sockaddr_in(std::net::Ipv4Addr::LOCALHOST, port);
        // SAFETY: `local` is a valid sockaddr_in of `len` bytes.
        if unsafe { libc::bind(fd, (&raw const local).cast(), len) } == 0 {
            return Ok(local);
        }
    }
    let local = sockaddr_in(std::net::Ipv4Addr::LOCALHOST, 0);
    // SAFETY: as above.
    if unsafe { libc::bind(fd, (&raw const local).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(local)
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

/// The id of the connection a CONNECT entry opens: the one the leader gave
/// it ([`conn_id`]), or, in a log written before ids, the entry's index.
fn connect_id(e: &Entry<'_>) -> u64 {
    if e.conn != 0 { e.conn } else { e.index }
}

/// The id a leader gives the `n`th connection it accepts in `term`
/// (`n` from 1): unique in the log without waiting for the CONNECT to
/// commit, since a term has one leader. `None` past 2^32 terms or 2^32
/// connections in a term (the leader then turns clients away).
pub fn conn_id(term: u64, n: u64) -> Option<u64> {
    (term < 1 << 32 && n > 0 && n < 1 << 32).then_some(term << 32 | n)
}

/// The [`StateMachine`] of an intercepted server.
#[derive(Debug)]
pub struct Replayer(pub Arc<Replay>);

impl StateMachine for Replayer {
    fn apply(&mut self, e: &Entry<'_>) -> Vec<u8> {
        crate::inside(|| self.0.apply_entry(e));
        e.index.to_le_bytes().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Reader;

    #[test]
    fn a_forked_process_is_served_once_the_one_before_it_is_done() {
        let t = Arc::new(Turnstile::default());
        // Connection 10's input goes to a process that runs.
        let mut busy = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        // Running once it has started its loop (not while it execs).
        let started = Instant::now();
        while !(running(busy.id()) && running(busy.id())) {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the busy process never ran"
            );
            thread::sleep(Duration::from_millis(1));
        }
        thread::sleep(Duration::from_millis(20));
        t.take_turn(10, busy.id());
        t.answered(10);
        // Another process and connection waits until connection 10 is idle
        // (or the process sleeps, or STATEMENT_WAIT).
        // Whether it passed before connection 10 went idle is asked of the
        // turnstile, not of a clock: the waiter may start late on a loaded
        // machine (CI: it "passed after 1.2 ms" of a 5 ms wait).
        let idled = Arc::new(AtomicBool::new(false));
        let t2 = t.clone();
        let idled2 = idled.clone();
        let h = thread::spawn(move || {
            let at = Instant::now();
            t2.take_turn(20, 200);
            (idled2.load(Ordering::SeqCst), at.elapsed())
        });
        thread::sleep(Duration::from_millis(5));
        idled.store(true, Ordering::SeqCst);
        t.idle(10);
        let (after_idle, waited) = h.join().unwrap();
        assert!(
            after_idle || !running(busy.id()),
            "passed while connection 10's process ran"
        );
        assert!(waited < STATEMENT_WAIT, "passed after {waited:?}");
        // The same process again passes at once.
        let at = Instant::now();
        t.take_turn(20, 200);
        assert!(at.elapsed() < STATEMENT_WAIT);
        busy.kill().unwrap();
        busy.wait().unwrap();
    }

    /// Regression (issue 14): a replay connection's local port was an odd
    /// one, as `bind(0)` gives, and took a restarting server's port.
    #[test]
    fn a_replay_connection_binds_an_even_port() {
        for _ in 0..20 {
            // SAFETY: plain socket creation; the result is checked.
            let fd =
                unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
            assert!(fd >= 0);
            // SAFETY: `fd` is a fresh socket we own; the stream closes it.
            let s = unsafe { TcpStream::from_raw_fd(fd) };
            let local = bind_even_port(fd).unwrap();
            let port = u16::from_be(local.sin_port);
            assert!(port != 0 && port % 2 == 0, "port {port}");
            drop(s);
        }
    }

    /// Two of our sockets may bind one port (SO_REUSEADDR): the second
    /// must not take over, then drop, the live one's address, or the server
    /// takes the live connection for a client's.
    #[test]
    fn an_address_held_by_a_live_internal_connection_is_not_claimed_again() {
        let r = replay();
        let me: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        r.claim(me, Internal::Replay(1)).unwrap();
        let e = r.claim(me, Internal::Replay(2)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert_eq!(r.internal(me), Some(Internal::Replay(1)));
        r.forget_internal(me);
        r.claim(me, Internal::Check).unwrap();
        assert_eq!(r.internal(me), Some(Internal::Check));
    }

    fn replay() -> Replay {
        static REG: std::sync::LazyLock<Registry> = std::sync::LazyLock::new(Registry::default);
        Replay::new("127.0.0.1:1".parse().unwrap(), 7, &REG, None, None, None)
    }

    fn entry(index: u64, kind: EntryKind, conn: u64, payload: &[u8], here: bool) -> Entry<'_> {
        Entry {
            index,
            term: 1,
            kind,
            conn,
            payload,
            proposed_here: here,
        }
    }

    /// Our own connections (their CONNECT carries our nonce) are known by
    /// the id the CONNECT names, not by its index: output commit gives a
    /// connection its id before the CONNECT commits. A new leader's CLOSE
    /// of one ends it in the log.
    #[test]
    fn own_connections_are_known_by_their_id() {
        let r = Arc::new(replay());
        let mut sm = Replayer(r.clone());
        let ours = Connect {
            origin: 7,
            tag: 1,
            out: 0,
        }
        .encode();
        let id = conn_id(3, 1).unwrap();
        sm.apply(&entry(5, EntryKind::Connect, id, &ours, true));
        assert!(lock(&r.own).contains(&id));
        sm.apply(&entry(6, EntryKind::Data, id, b"GET a", true));
        assert_eq!(r.replayed.load(Ordering::Relaxed), 0, "not replayed here");
        let close = Close::default().encode();
        sm.apply(&entry(7, EntryKind::Close, id, &close, false));
        assert!(!lock(&r.own).contains(&id));
        // A log from before ids: the CONNECT's index is the id.
        sm.apply(&entry(8, EntryKind::Connect, 0, &ours, true));
        assert!(lock(&r.own).contains(&8));
    }

    /// A replay of connection 9 into a listener of the test's, accepted:
    /// the replay, the server's side and the replay's address.
    fn replaying_connection_9() -> (Replay, std::net::TcpStream, SocketAddr) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let reg: &'static Registry = Box::leak(Box::default());
        let r = Replay::new(l.local_addr().unwrap(), 7, reg, None, None, None);
        r.replay_connect(
            9,
            Connect {
                origin: 3,
                tag: 1,
                out: 0,
            },
        );
        let (server_side, peer) = l.accept().unwrap();
        (r, server_side, peer)
    }

    /// Regression: replay cut a replayed connection 5 s after its CLOSE
    /// while a PostgreSQL backend, blocked on a row lock, had not answered
    /// its last statement; its reply failed and its transaction was lost
    /// (a rebuilt replica differed in CI). A forked reader's connection now
    /// stays open until the server closes it.
    #[test]
    fn a_forked_reader_slow_to_finish_a_closed_connection_is_not_cut_off() {
        let (r, mut server_side, _) = replaying_connection_9();
        // Its reader is a forked process (a backend), asleep.
        r.registry.consumed(9, 0, Reader::Process(u32::MAX));
        assert_eq!(r.finish_all(&[9]).len(), 1);
        let mut eof = [0u8; 1];
        assert_eq!(server_side.read(&mut eof).unwrap(), 0, "end of stream");
        // The late replies are taken: the replay side is still open.
        for _ in 0..3 {
            server_side
                .write_all(b"the reply to the last statement")
                .expect("not cut off");
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Regression (e2e mariadb, 4 concurrent sysbench clients): a server
    /// thread blocked on a row lock that a later entry releases left its
    /// replayed input unread, and replay waited for it until MariaDB gave up
    /// on the lock (50 s per lock, then an error the leader never saw). A
    /// thread asleep with input unread is now passed over, as a forked
    /// process is.
    #[test]
    fn a_server_thread_blocked_with_input_unread_is_passed_over() {
        let (r, _server_side, _) = replaying_connection_9();
        // The thread that read this connection so far, now blocked.
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let blocked = thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() } as u32).unwrap();
            let _ = release_rx.recv();
        });
        let tid = tid_rx.recv().unwrap();
        r.registry.consumed(9, 0, Reader::Thread(tid));
        let started = Instant::now();
        r.replay_data(9, Out::default(), b"UPDATE sbtest1 SET k=k+1 WHERE id=7");
        // Pipelined: the wait comes before the next entry of another kind.
        r.wait_read();
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_secs(10),
            "replay waited {waited:?} for a blocked thread"
        );
        assert_eq!(r.passed_blocked.load(Ordering::Relaxed), 1);
        release_tx.send(()).unwrap();
        blocked.join().unwrap();
    }

    #[test]
    fn internal_connections_are_known_by_full_address_while_alive() {
        let (r, server_side, peer) = replaying_connection_9();
        assert_eq!(r.internal(peer), Some(Internal::Replay(9)));
        // The same port from another address is nobody we know.
        let other = SocketAddr::new("127.0.0.2".parse().unwrap(), peer.port());
        assert_eq!(r.internal(other), None);
        drop(server_side);
        assert_eq!(r.finish_all(&[9]).len(), 1);
        assert_eq!(
            r.internal(peer),
            None,
            "forgotten once the connection ended"
        );
    }
}
