//! The `LD_PRELOAD` library that replicates an unmodified server.
//!
//! `apus run --config C --id N -- <server...>` starts the server with this
//! library preloaded. Every process of the server that loads it reads its
//! settings (a misconfiguration stops it at once). The first process that
//! listens on the app address (`replica[N].app`), after any daemonizing,
//! asks `apus run` for the node and starts it: that process is the
//! *holder*. Processes it forks later (PostgreSQL's backends, pre-forked
//! workers) replicate through it ([`child`]); a second process listening on
//! the app address, or one accepting there without a node, stops the
//! server.
//!
//! On the **leader**, every inbound event on a client connection accepted
//! on the app address becomes a log entry, proposed without waiting
//! (*output commit*): `accept` proposes a CONNECT (the connection's id is
//! the term and a count), each read-like call that returns bytes proposes
//! DATA with exactly those bytes, end of stream proposes an empty DATA, and
//! the connection's end proposes a CLOSE carrying a hash of everything the
//! server wrote on it. The server goes on at once; its next output to any
//! client (or a shutdown or close it can see) waits until everything
//! proposed before it has committed. A client therefore never sees a reply
//! to input that did not commit: if some never does, the output is never
//! released and the server is rebuilt from the log.
//!
//! On a **follower**, the embedded node applies the same entries by
//! replaying them into the local copy of the server over real loopback
//! connections ([`replay`]), draining and hashing its answers. Real clients
//! that reach a follower are turned away (`follower_clients = "refuse"`).
//!
//! Everything else passes straight through: descriptors that are not
//! replicated client connections cost one atomic load, and the library's
//! own threads and sockets are never replicated.

use std::cell::Cell;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use apus::client::{RemoteStatus, Reply, Request, read_frame};
use apus::supervisor::{Answer, Link, Message};
use apus::{ClusterConfig, Node, ProposeError};
use apus_core::{EntryKind, NodeId, Role};
use tracing::{debug, info, warn};

mod check;
pub mod child;
pub mod gate;
mod hooks;
pub mod payload;
mod real;
pub mod registry;
pub mod replay;

use payload::{Close, Connect, StreamHash};
use registry::Registry;
use replay::{Internal, Replay, Replayer};

/// The replicated client connections of this process.
static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::default);

/// How long a deposed leader may wait for the outcome of its own proposals
/// before its server, which may be held in them, is rebuilt from the log.
const REBUILD_AFTER: Duration = Duration::from_secs(5);

thread_local! {
    /// Set while this thread runs library code: libc calls made from there
    /// pass straight through the hooks.
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with this thread marked as inside the library.
pub(crate) fn inside<R>(f: impl FnOnce() -> R) -> R {
    IN_HOOK.with(|h| {
        let was = h.replace(true);
        let r = f();
        h.set(was);
        r
    })
}

fn in_hook() -> bool {
    IN_HOOK.with(Cell::get)
}

/// What the environment says this process is part of.
struct Settings {
    config: ClusterConfig,
    id: NodeId,
    app: SocketAddr,
    supervisor: Link,
    /// The node's own ports (replication, status): not the server's.
    own_ports: Vec<u16>,
}

/// `Some` in every process of a server `apus run` started.
static SETTINGS: LazyLock<Option<Settings>> = LazyLock::new(|| inside(read_settings));

fn read_settings() -> Option<Settings> {
    let (Some(path), Some(id)) = (std::env::var_os("APUS_CONFIG"), std::env::var_os("APUS_ID"))
    else {
        return None;
    };
    let config = match ClusterConfig::load(&PathBuf::from(path)) {
        Ok(c) => c,
        Err(e) => refuse_alone(&format!("config: {e}")),
    };
    let id = match id.to_str().and_then(|s| s.parse::<u8>().ok()) {
        Some(i) if usize::from(i) < config.replicas.len() => NodeId(i),
        _ => refuse_alone(&format!("APUS_ID {id:?} is not a replica of the cluster")),
    };
    let spec = &config.replicas[id.index()];
    let Some(app) = spec.app else {
        refuse_alone(&format!(
            "replica[{}].app is not set: which port does the server listen on?",
            id.0
        ))
    };
    let supervisor = match Link::from_env() {
        Ok(Some(l)) => l,
        Ok(None) => refuse_alone(
            "the library runs only under `apus run`, which supervises the server \
             (APUS_SUPERVISOR is not set)",
        ),
        Err(e) => refuse_alone(&e.to_string()),
    };
    let own_ports = [Some(spec.address), spec.client]
        .into_iter()
        .flatten()
        .map(|a| a.port())
        .collect();
    Some(Settings {
        config,
        id,
        app,
        supervisor,
        own_ports,
    })
}

/// The exit status of a server that was stopped rather than run
/// unreplicated (EX_CONFIG).
pub const EXIT_REFUSED: i32 = 78;

/// Ends this process before settings exist (nobody to tell).
fn refuse_alone(why: &str) -> ! {
    eprintln!("apus-intercept: {why}; refusing to run the server unreplicated");
    // SAFETY: _exit has no preconditions and does not return.
    unsafe { libc::_exit(EXIT_REFUSED) }
}

/// Stops the server: `apus run` is told why (it stops every process of the
/// server and exits with 78), and this process ends at once. A server that
/// was meant to be replicated must never serve clients unreplicated.
/// `_exit`, not `exit`: this may run inside any libc call of the server,
/// where its atexit handlers cannot be trusted to run.
fn refuse(why: &str) -> ! {
    inside(|| {
        if let Some(s) = SETTINGS.as_ref() {
            let _ = s.supervisor.send(&Message::Refuse(why.to_string()));
        }
    });
    refuse_alone(why)
}

/// A note for the operator, printed by `apus run` (a daemon's own stderr
/// may go nowhere).
fn say(what: String) {
    inside(|| {
        if let Some(s) = SETTINGS.as_ref()
            && s.supervisor.send(&Message::Say(what.clone())).is_err()
        {
            eprintln!("apus-intercept: {what}");
        }
    });
}

/// Reads the settings as the library loads, so a misconfigured replica stops
/// before the server has done anything; registers the fork handlers.
extern "C" fn load_settings() {
    if LazyLock::force(&SETTINGS).is_some() {
        // SAFETY: registering plain extern "C" functions.
        unsafe {
            libc::pthread_atfork(
                Some(before_fork),
                Some(after_fork_parent),
                Some(after_fork_child),
            );
        }
    }
}

extern "C" fn before_fork() {
    REGISTRY.before_fork();
}

extern "C" fn after_fork_parent() {
    REGISTRY.after_fork(false);
}

extern "C" fn after_fork_child() {
    hooks::forget_ids();
    REGISTRY.after_fork(true);
}

#[used]
#[unsafe(link_section = ".init_array")]
static LOAD_SETTINGS: extern "C" fn() = load_settings;

fn settings() -> Option<&'static Settings> {
    SETTINGS.as_ref()
}

/// The node and everything around it, in the process that holds it.
struct Holder {
    pid: u32,
    apus: Apus,
    /// How the holder's forked children reach it.
    children: child::Address,
}

static HOLDER: OnceLock<Holder> = OnceLock::new();

/// What this process is.
#[derive(Clone, Copy)]
enum Proc {
    /// It runs the node.
    Holder(&'static Apus),
    /// It was forked from the holder.
    Child(&'static child::Address),
    /// A process of the server that has not listened on the app address.
    Candidate,
    /// Not a server `apus run` started.
    Outside,
}

fn proc() -> Proc {
    if settings().is_none() {
        return Proc::Outside;
    }
    match HOLDER.get() {
        Some(h) if h.pid == hooks::getpid() => Proc::Holder(&h.apus),
        Some(h) => Proc::Child(&h.children),
        None => Proc::Candidate,
    }
}

/// Makes this process the holder (it listens on the app address).
fn become_holder() {
    HOLDER.get_or_init(|| inside(start));
}

/// The running replication machinery of the holder.
struct Apus {
    node: Node,
    replay: Arc<Replay>,
    /// Whether this node is the leader and ready for real clients.
    serving: Mutex<bool>,
    max_payload: usize,
    /// How much input the server may have read ahead of its commits.
    max_uncommitted: u64,
    follower_clients: apus::FollowerClients,
    /// The holder's forked children that replicate through it.
    sessions: Arc<child::Sessions>,
    /// What the server has written on its replicated connections (in
    /// this process and, as they report it, in its forked children).
    out_total: AtomicU64,
    /// The term this node last accepted a client in, and how many it
    /// accepted in it (connection ids, see [`replay::conn_id`]).
    accepted: Mutex<(u64, u64)>,
}

/// The engine thread's nice value inside a server, where allowed (see
/// [`Node::set_engine_nice`]).
const ENGINE_NICE: i32 = -10;
/// Its realtime priority, where allowed (see [`Node::set_engine_realtime`]):
/// low among realtime threads (the kernel's own run at 50 and above).
const ENGINE_REALTIME_PRIORITY: u8 = 10;

fn start() -> Holder {
    let s = settings().expect("only a server process becomes the holder");
    match s.supervisor.send(&Message::Claim) {
        Ok((Answer::Granted, _)) => {}
        Ok((Answer::Held(pid), _)) => refuse(&format!(
            "pid {pid} already replicates this server, and this process listens on the app address \
             {} too: its clients would be served unreplicated",
            s.app
        )),
        Err(e) => refuse(&format!("cannot reach `apus run`: {e}")),
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("APUS_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let nonce = {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        u64::from_le_bytes(b) | 1
    };
    let sessions = Arc::new(child::Sessions::default());
    let replay = Arc::new(Replay::new(
        s.app,
        nonce,
        &REGISTRY,
        s.config.digest.clone(),
        s.config.ready.clone(),
        Some(sessions.clone()),
    ));
    let node = match Node::start(&s.config, s.id, Replayer(replay.clone())) {
        Ok(n) => n,
        Err(e) => refuse(&format!("cannot start replica {}: {e}", s.id.0)),
    };
    if s.config.poll == apus::PollPolicy::Park {
        // The server's threads share the cores: a heartbeat that waits
        // behind them longer than the election timeout is an election for
        // nothing (seen under redis-benchmark -c 50 on two cores, with nice
        // -10 too: engines waited up to 200 ms for a core). An engine that
        // spins is not raised: it would take the server's cores.
        if let Err(e) = node.set_engine_nice(ENGINE_NICE) {
            tracing::debug!(error = %e, "the engine thread keeps the default nice value");
        }
        match node.set_engine_realtime(ENGINE_REALTIME_PRIORITY) {
            Ok(()) => tracing::debug!("the engine thread runs under SCHED_FIFO"),
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                info!(error = %e, "the engine thread runs under the normal policy")
            }
            Err(e) => warn!(
                error = %e,
                "the engine thread cannot run under SCHED_FIFO (needs root, CAP_SYS_NICE or \
                 RLIMIT_RTPRIO): on busy cores heartbeats may wait for a core and the \
                 cluster elect leaders for nothing"
            ),
        }
    }
    let children = match child::serve(Arc::new(ChildRequests), sessions.clone()) {
        Ok(a) => a,
        Err(e) => refuse(&format!(
            "cannot open the channel for forked processes: {e}"
        )),
    };
    info!(id = %s.id, app = %s.app, "replication started inside the server");
    let apus = Apus {
        node,
        replay,
        serving: Mutex::new(false),
        max_payload: s.config.engine.max_payload,
        max_uncommitted: s.config.max_uncommitted as u64,
        follower_clients: s.config.follower_clients,
        sessions,
        out_total: AtomicU64::new(0),
        accepted: Mutex::new((0, 0)),
    };
    spawn("apus-roles", watch_roles);
    if let Some(addr) = s.config.replicas[s.id.index()].client {
        // Bound here, not in the thread: an address in use is a
        // misconfiguration (two replicas with one id) and must stop us.
        let listener = match std::net::TcpListener::bind(addr) {
            Ok(l) => l,
            Err(e) => refuse(&format!("cannot serve status on {addr}: {e}")),
        };
        spawn("apus-status", move || serve_status(listener));
    }
    // The lifeline: `apus run` holds this connection while it supervises
    // us. A daemon is not its child, so nothing else would stop us if it
    // died; a server left without its supervisor must not go on.
    match s.supervisor.send(&Message::Started) {
        Ok((Answer::Granted, mut lifeline)) => spawn("apus-lifeline", move || {
            wait_until_closed(&mut lifeline);
            refuse("`apus run`, which supervises this server, is gone");
        }),
        Ok((Answer::Held(pid), _)) => refuse(&format!("pid {pid} already replicates this server")),
        Err(e) => refuse(&format!("cannot reach `apus run`: {e}")),
    }
    Holder {
        pid: hooks::getpid(),
        apus,
        children,
    }
}

/// Starts a library thread (its libc calls pass through the hooks); a
/// thread that cannot start stops the server.
/// Blocks until `lifeline` ends (end of stream, or a real error). A read
/// interrupted by a signal is no end: the server's handlers (installed
/// without `SA_RESTART`, as nginx's are) may run on this thread, and a
/// paused server that is resumed gets SIGCHLD from its resumed children
/// (an nginx replica stopped itself as "supervisor gone" after a pause).
fn wait_until_closed(lifeline: &mut impl std::io::Read) {
    let mut b = [0u8; 1];
    loop {
        match lifeline.read(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // Nothing is ever sent on it: data would be a protocol error.
            Ok(_) | Err(_) => return,
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = thread::Builder::new()
        .name(name.into())
        .spawn(move || inside(f))
    {
        refuse(&format!("cannot start the thread {name}: {e}"));
    }
}

/// The holder's machinery, for its own threads: they start while it is
/// being built, and wait here until it is.
fn holder_apus() -> &'static Apus {
    &HOLDER.wait().apus
}

/// Follows the node's role: a new leader first ends the connections it was
/// replaying (each close replicated), then serves real clients; a node that
/// stops leading ends its clients' connections, in every process.
fn watch_roles() {
    let a = holder_apus();
    let mut leading = false;
    let mut deposed_at: Option<Instant> = None;
    loop {
        thread::sleep(Duration::from_millis(2));
        if let Some(why) = a.node.stopped() {
            refuse(&format!("replication stopped: {why}"));
        }
        let now = a.node.status().role == Role::Leader;
        if let Some(lost) = a.node.speculation_lost() {
            // Output commit handed the server input that is not in the
            // log; none of the outputs it made since were released.
            rebuild(&format!(
                "the server read input that did not commit ({lost}): its state is speculative"
            ));
        }
        if let Some(at) = deposed_at {
            if a.node.unresolved() == 0 {
                deposed_at = None;
            } else if at.elapsed() >= REBUILD_AFTER {
                rebuild(&format!(
                    "this replica lost the leadership {REBUILD_AFTER:?} ago with {} of its \
                     proposals still of unknown outcome: its server read them",
                    a.node.unresolved()
                ));
            }
        }
        if now == leading {
            continue;
        }
        if now && !caught_up(a) {
            // Lost the leadership again before taking over.
            continue;
        }
        leading = now;
        if now {
            take_over(a);
            info!("leading: serving clients");
        } else {
            step_down(a);
            deposed_at = Some(Instant::now());
            info!("no longer leading: client connections closed");
        }
        *a.serving.lock().unwrap_or_else(|p| p.into_inner()) = now;
    }
}

/// A new leader ends every connection it replayed for the old one (their
/// clients reconnect to it) and replicates each end.
fn take_over(a: &Apus) {
    let ids = a.replay.replayed_ids();
    for (id, out) in a.replay.finish_all(&ids) {
        let close = Close {
            bytes_out: out.bytes,
            hash_out: out.hash,
        };
        if let Err(e) = a.replicate(EntryKind::Close, id, &close.encode()) {
            warn!(conn = id, error = %e, "could not replicate the close of a replayed connection");
        }
    }
}

/// A deposed leader shuts its clients' connections down, its own and those
/// its forked children serve; their servers see end of stream.
fn step_down(a: &Apus) {
    REGISTRY.break_all(|fd| {
        // SAFETY: shutdown on a descriptor the server still owns (the
        // registry has checked it is not closed yet); it sees end of stream
        // and closes it itself.
        unsafe {
            real::shutdown(fd, libc::SHUT_RDWR);
        }
    });
    for s in a.sessions.all() {
        let fds: Vec<i32> = s
            .adopted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|(fd, _)| *fd)
            .collect();
        for fd in fds {
            if let Err(e) = child::shut_down_in(s.pid, fd) {
                // Without access to the child's descriptor, the child goes.
                warn!(pid = s.pid, fd, error = %e, "cannot end a child's client connection: stopping the child");
                // SAFETY: signalling a process of our own server.
                unsafe {
                    libc::kill(s.pid as i32, libc::SIGKILL);
                }
            }
        }
    }
}

/// Asks `apus run` to restart the server empty (it replays the log into
/// it), and stops this process meanwhile.
pub(crate) fn rebuild(why: &str) -> ! {
    static ASKED: std::sync::Once = std::sync::Once::new();
    // Several threads may find the reason at once; one asks.
    ASKED.call_once(|| {
        warn!("{why}: asking `apus run` to rebuild the server from the log");
        inside(|| {
            if let Some(s) = settings() {
                let _ = s.supervisor.send(&Message::Rebuild(why.to_string()));
            }
        });
    });
    // `apus run` stops us; if it cannot be reached, do not go on.
    thread::sleep(Duration::from_secs(10));
    refuse(why)
}

/// A new leader first applies every entry its log held when it was
/// elected (the old leader's last requests, committed in the new term):
/// only then has its server seen every byte the old leader's clients sent,
/// and only then may their replayed connections be closed. `false` if the
/// leadership was lost while waiting.
fn caught_up(a: &Apus) -> bool {
    let target = a.node.status().last_index;
    loop {
        let st = a.node.status();
        if st.role != Role::Leader {
            return false;
        }
        if st.applied >= target {
            return true;
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Answers `apus status` and `apus check` on the replica's client address.
fn serve_status(listener: std::net::TcpListener) {
    for stream in listener.incoming().flatten() {
        spawn("apus-status-conn", move || {
            let a = holder_apus();
            let mut s = stream;
            while let Ok(Some((kind, body))) = read_frame(&mut s) {
                let reply = match Request::decode(kind, body) {
                    Ok(Request::Status) => Reply::Status(a.remote_status()),
                    Ok(Request::Check) => a.check(),
                    Ok(Request::LastCheck) => {
                        match a
                            .replay
                            .last_check
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .clone()
                        {
                            Some(c) => Reply::Checked {
                                index: c.index,
                                digest: c.digest,
                            },
                            None => Reply::Checked {
                                index: 0,
                                digest: Err("no check yet".into()),
                            },
                        }
                    }
                    Ok(Request::AcceptDataLoss { stand }) => {
                        apus::service::accept_data_loss(&a.node, stand)
                    }
                    Ok(_) => Reply::Failed(
                        "this port answers STATUS, CHECK, LAST_CHECK and ACCEPT_DATA_LOSS".into(),
                    ),
                    Err(e) => Reply::Failed(format!("malformed request: {e}")),
                };
                if std::io::Write::write_all(&mut s, &reply.encode()).is_err() {
                    break;
                }
            }
        });
    }
}

/// Whether real clients may be served, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Serving {
    /// This node leads and has ended the old leader's connections.
    Leader,
    /// This node leads but is still ending the old leader's connections.
    /// That needs the server's event loop, so a new client is turned away
    /// at once rather than held in `accept` (it retries).
    TakingOver,
    /// Another node leads, or none does.
    Follower,
}

/// What happens to an accepted connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A client connection, replicated as connection `id`.
    Replicate(u64),
    /// The library's replay of connection `id`: watched, not replicated.
    Replay(u64),
    /// Served as it is, unreplicated (internal, or a follower inspected
    /// with `follower_clients = "serve"`).
    Pass,
    /// Closed at once.
    Reject,
}

static NEXT_TAG: AtomicU64 = AtomicU64::new(1);

impl Apus {
    fn serving(&self) -> Serving {
        if self.node.status().role != Role::Leader {
            return Serving::Follower;
        }
        if *self.serving.lock().unwrap_or_else(|p| p.into_inner()) {
            Serving::Leader
        } else {
            Serving::TakingOver
        }
    }

    /// Replicates an entry of the library's own (a CHECK, a new leader's
    /// CLOSE of a replayed connection) and waits until it is applied here,
    /// however long that takes: an error means it will never commit.
    fn replicate(&self, kind: EntryKind, conn: u64, payload: &[u8]) -> Result<u64, ProposeError> {
        self.node
            .propose_resolved(kind, conn, payload)
            .map(|applied| applied.index)
    }

    /// Proposes what the server has just been handed (output commit: the
    /// server goes on at once, its next output waits in [`barrier`](Self::barrier)).
    /// A node that no longer leads refuses here, before the server is
    /// handed the input (a deposed leader's reads see the end of their
    /// connections).
    fn submit(&self, kind: EntryKind, conn: u64, parts: &[&[u8]]) -> Result<(), ProposeError> {
        if !self.node.is_leader() {
            return Err(ProposeError::NotLeader {
                leader: self.node.status().leader,
            });
        }
        self.node
            .submit(kind, conn, parts, self.max_uncommitted)
            .map(|_| ())
    }

    /// Holds an output of the server until every input proposed before it
    /// has committed. If some never will, the output is never released:
    /// the server is rebuilt from the log.
    fn barrier(&self) {
        if let Err(lost) = self.node.wait_submitted(self.node.submitted()) {
            rebuild(&format!(
                "the server read input that did not commit ({lost}); its replies to it are \
                 withheld"
            ));
        }
    }

    /// The id of the next connection accepted as leader.
    fn next_conn_id(&self) -> Option<u64> {
        let term = self.node.status().term;
        let mut g = self.accepted.lock().unwrap_or_else(|p| p.into_inner());
        if g.0 != term {
            *g = (term, 0);
        }
        g.1 += 1;
        replay::conn_id(term, g.1)
    }

    /// A connection accepted on the app address, from `peer`.
    fn accept_app(&self, peer: Option<SocketAddr>) -> Verdict {
        match peer.and_then(|p| self.replay.internal(p)) {
            Some(Internal::Replay(id)) => return Verdict::Replay(id),
            Some(Internal::Check) => return Verdict::Pass,
            None => {}
        }
        match self.serving() {
            Serving::Leader => {}
            Serving::TakingOver => return Verdict::Reject,
            // A real client reached a follower: it must use the leader (or,
            // if so configured, may inspect this replica unreplicated).
            Serving::Follower => {
                debug!(?peer, "a client connected to this follower");
                return self.follower_verdict();
            }
        }
        let connect = Connect {
            origin: self.replay.nonce,
            tag: NEXT_TAG.fetch_add(1, Ordering::Relaxed),
            out: self.out_total.load(Ordering::SeqCst),
        };
        let Some(id) = self.next_conn_id() else {
            warn!("this term has used up its connection ids; turning the client away");
            return Verdict::Reject;
        };
        match self.submit(EntryKind::Connect, id, &[&connect.encode()]) {
            Ok(()) => Verdict::Replicate(id),
            Err(_) => Verdict::Reject,
        }
    }

    /// A connection accepted on another listener of the server: never
    /// replicated (said so at start); a follower that refuses clients
    /// refuses these too.
    fn accept_other(&self) -> Verdict {
        match self.serving() {
            Serving::Follower => self.follower_verdict(),
            Serving::Leader | Serving::TakingOver => Verdict::Pass,
        }
    }

    fn follower_verdict(&self) -> Verdict {
        match self.follower_clients {
            apus::FollowerClients::Serve => Verdict::Pass,
            apus::FollowerClients::Refuse => Verdict::Reject,
        }
    }

    /// Proposes what a read of connection `conn` returned (empty: end of
    /// stream), in entries of at most `max_payload` bytes. `by` is the
    /// forked process that read it (0: this process), which first waits
    /// its turn (see [`Turnstile`](replay::Turnstile)).
    /// `on_conn`: what the server had written on `conn` before this read.
    fn input(&self, conn: u64, on_conn: u64, data: &[u8], by: u32) -> Result<(), ProposeError> {
        if by != 0 {
            self.replay.turnstile.take_turn(conn, by);
        }
        let out = self.out_total.load(Ordering::SeqCst);
        let header = payload::data_header(out, on_conn);
        if data.is_empty() {
            return self.submit(EntryKind::Data, conn, &[&header]);
        }
        data.chunks(self.max_payload - payload::DATA_HEADER)
            .try_for_each(|chunk| self.submit(EntryKind::Data, conn, &[&header, chunk]))
    }

    /// The server wrote `bytes` on its replicated connections.
    fn wrote(&self, bytes: u64) {
        self.out_total.fetch_add(bytes, Ordering::SeqCst);
    }

    /// Replicates the end of connection `conn`, with what the server
    /// wrote, and holds the close (the client sees it) until committed.
    fn close(&self, conn: u64, out: StreamHash) {
        let close = Close {
            bytes_out: out.bytes,
            hash_out: out.hash,
        };
        if self
            .submit(EntryKind::Close, conn, &[&close.encode()])
            .is_ok()
        {
            self.barrier();
        }
    }

    /// `apus check` on the leader: a CHECK entry, answered once applied
    /// here (which took this replica's digest).
    fn check(&self) -> Reply {
        if self.serving() != Serving::Leader {
            return Reply::NotLeader(self.node.status().leader);
        }
        let mut tag = [0u8; 8];
        let _ = getrandom::fill(&mut tag);
        match self.replicate(EntryKind::Check, 0, &tag) {
            Ok(index) => Reply::Applied {
                index,
                output: Vec::new(),
            },
            Err(ProposeError::NotLeader { leader }) => Reply::NotLeader(leader),
            Err(e) => Reply::Failed(e.to_string()),
        }
    }

    fn remote_status(&self) -> RemoteStatus {
        let st = self.node.status();
        RemoteStatus {
            role: st.role,
            term: st.term,
            leader: st.leader,
            commit: st.commit,
            last_index: st.last_index,
            applied: st.applied,
            recovering: st.recovering,
            entries: self.replay.replayed.load(Ordering::Relaxed),
            digest: 0,
            outputs_differed: self.replay.outputs_differed.load(Ordering::Relaxed),
            fenced_writes: st.fencing.fenced_writes,
            revocations: st.fencing.revocations,
            transport: st.transport,
            last_check: self
                .replay
                .last_check
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map_or(0, |c| c.index),
            voters_lost: st.voters_lost,
        }
    }
}

/// The holder's answers to its forked children: its own hook logic.
struct ChildRequests;

impl child::Handler for ChildRequests {
    fn accept(&self, app: bool, peer: Option<SocketAddr>) -> Verdict {
        let a = holder_apus();
        if app {
            a.accept_app(peer)
        } else {
            a.accept_other()
        }
    }

    fn input(&self, conn: u64, on_conn: u64, data: &[u8], pid: u32) -> bool {
        holder_apus().input(conn, on_conn, data, pid).is_ok()
    }

    fn waits(&self, conn: u64) {
        holder_apus().replay.turnstile.idle(conn);
    }

    fn wrote(&self, bytes: u64) {
        holder_apus().wrote(bytes);
    }

    fn barrier(&self) {
        holder_apus().barrier();
    }

    fn close(&self, conn: u64, out: StreamHash) {
        holder_apus().close(conn, out);
    }

    fn consumed(&self, replay: u64, n: u64, pid: u32) {
        REGISTRY.consumed(replay, n, crate::registry::Reader::Process(pid));
        // Read by a forked process: replayed one entry at a time.
        holder_apus().replay.gate.consumed(replay, n, 0);
    }

    fn answered(&self, conn: u64, _: u32) {
        holder_apus().replay.turnstile.answered(conn);
    }

    fn idle(&self, replay: u64, consumed: u64) {
        REGISTRY.idle(replay, consumed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (CI, e2e nginx): the lifeline's read returned EINTR when
    /// a resumed server's master got SIGCHLD on that thread, and the holder
    /// stopped the server as if `apus run` were gone.
    #[test]
    fn an_interrupted_lifeline_read_is_not_the_end() {
        struct Lifeline {
            reads: usize,
        }
        impl std::io::Read for Lifeline {
            fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
                self.reads += 1;
                if self.reads < 3 {
                    Err(std::io::ErrorKind::Interrupted.into())
                } else {
                    Ok(0)
                }
            }
        }
        let mut l = Lifeline { reads: 0 };
        wait_until_closed(&mut l);
        assert_eq!(l.reads, 3, "returned only at end of stream");
    }

    /// The hooks cache each thread's id and the process's; a forked
    /// child's only thread must not report its parent thread's (the gate
    /// and the turnstile tell readers apart by it), nor the child its
    /// parent's process id (it would take itself for the node's holder).
    #[test]
    fn a_forked_child_knows_its_own_thread_and_process_id() {
        let parent = hooks::gettid();
        let parent_pid = hooks::getpid();
        // SAFETY: the child only calls the fork handler, gettid and _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            after_fork_child();
            // SAFETY: gettid has no preconditions.
            let real = unsafe { libc::gettid() } as u32;
            // SAFETY: getpid has no preconditions.
            let real_pid = unsafe { libc::getpid() } as u32;
            let ok = hooks::gettid() == real
                && real != parent
                && hooks::getpid() == real_pid
                && real_pid != parent_pid;
            // SAFETY: ends the child without running the test harness's exit.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid int.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the child saw its parent's thread or process id"
        );
    }
}
