//! The `LD_PRELOAD` library that replicates an unmodified server.
//!
//! `apus run --config C --id N -- <server...>` starts the server with this
//! library preloaded. When the server listens on its application address
//! (`replica[N].app`), the library starts an APUS node inside the process.
//! Then, on the **leader**, every inbound event on a client connection
//! accepted on that address becomes a log entry, and the server thread that
//! made the call is held until the entry is committed: `accept` proposes a
//! CONNECT (its index becomes the connection id), each `read`/`recv`/
//! `recvfrom`/`recvmsg`/`readv` that returns bytes proposes DATA with exactly
//! those bytes, end of stream proposes an empty DATA, and `close` proposes a
//! CLOSE carrying a hash of everything the server wrote on the connection
//! (`write`/`send`/`sendto`/`sendmsg`/`writev` are hashed). Server threads
//! are released in log order.
//!
//! On a **follower**, the embedded node applies the same entries by
//! replaying them into the local copy of the server over real loopback
//! connections ([`replay`]), draining and hashing its answers; a CLOSE whose
//! hash differs is reported as a divergence (log line and counter). Real
//! clients that reach a follower are turned away.
//!
//! Everything else passes straight through: descriptors that are not
//! replicated client connections cost one atomic load, the library's own
//! threads and sockets are never replicated, and a forked child (Redis
//! `BGSAVE`) or any other process that inherits the library stays inert.

use std::cell::Cell;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use apus::client::{RemoteStatus, Reply, Request, read_frame};
use apus::{ClusterConfig, Node, ProposeError};
use apus_core::{EntryKind, NodeId, Role};
use tracing::{info, warn};

mod hooks;
pub mod payload;
mod real;
pub mod registry;
pub mod replay;

use payload::Connect;
use registry::Registry;
use replay::{Replay, Replayer};

/// The replicated client connections of this process.
static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::default);

thread_local! {
    /// Set while this thread runs library code: libc calls made from there
    /// pass straight through the hooks.
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with this thread marked as inside the library.
fn inside<R>(f: impl FnOnce() -> R) -> R {
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

/// What the environment says this process is.
struct Settings {
    config: ClusterConfig,
    id: NodeId,
    app: SocketAddr,
    pid: u32,
}

/// `Some` when this process is the server `apus run` started.
static SETTINGS: LazyLock<Option<Settings>> = LazyLock::new(|| inside(read_settings));

fn read_settings() -> Option<Settings> {
    let (Some(path), Some(id)) = (std::env::var_os("APUS_CONFIG"), std::env::var_os("APUS_ID"))
    else {
        return None;
    };
    // Only the process `apus run` started: not its forks, not what they exec.
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    let expected = std::env::var("APUS_PARENT")
        .ok()
        .and_then(|p| p.parse::<i32>().ok());
    if expected != Some(parent) {
        return None;
    }
    let config = match ClusterConfig::load(&PathBuf::from(path)) {
        Ok(c) => c,
        Err(e) => refuse(&format!("config: {e}")),
    };
    let id = match id.to_str().and_then(|s| s.parse::<u8>().ok()) {
        Some(i) if usize::from(i) < config.replicas.len() => NodeId(i),
        _ => refuse(&format!("APUS_ID {id:?} is not a replica of the cluster")),
    };
    let Some(app) = config.replicas[id.index()].app else {
        refuse(&format!(
            "replica[{}].app is not set: which port does the server listen on?",
            id.0
        ))
    };
    Some(Settings {
        config,
        id,
        app,
        pid: std::process::id(),
    })
}

/// Ends the process: a server that was meant to be replicated must never
/// serve clients unreplicated (its state would silently fork from the
/// cluster's). `_exit`, not `exit`: this may run inside any libc call of the
/// server, where its atexit handlers cannot be trusted to run.
fn refuse(why: &str) -> ! {
    eprintln!("apus-intercept: {why}; refusing to run the server unreplicated");
    // SAFETY: _exit has no preconditions and does not return.
    unsafe { libc::_exit(EXIT_REFUSED) }
}

/// The exit status of a server that `refuse` stopped (EX_CONFIG).
pub const EXIT_REFUSED: i32 = 78;

/// Reads the settings as the library loads, so a misconfigured replica stops
/// before the server has done anything.
extern "C" fn load_settings() {
    LazyLock::force(&SETTINGS);
}

#[used]
#[unsafe(link_section = ".init_array")]
static LOAD_SETTINGS: extern "C" fn() = load_settings;

/// The active settings, if this is the replicated process (not a fork).
fn settings() -> Option<&'static Settings> {
    let s = SETTINGS.as_ref()?;
    (std::process::id() == s.pid).then_some(s)
}

/// The running replication machinery of this process.
struct Apus {
    node: Node,
    replay: Arc<Replay>,
    /// Whether this node is the leader and ready for real clients.
    serving: Mutex<bool>,
    max_payload: usize,
    follower_clients: apus::FollowerClients,
}

static APUS: OnceLock<Option<Apus>> = OnceLock::new();

/// Starts the node (once), when the server listens on its app address.
fn apus() -> Option<&'static Apus> {
    APUS.get_or_init(|| inside(start)).as_ref()
}

fn start() -> Option<Apus> {
    let s = settings()?;
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
    let replay = Arc::new(Replay::new(s.app, nonce, &REGISTRY));
    let node = match Node::start(&s.config, s.id, Replayer(replay.clone())) {
        Ok(n) => n,
        Err(e) => refuse(&format!("cannot start replica {}: {e}", s.id.0)),
    };
    info!(id = %s.id, app = %s.app, "replication started inside the server");
    let apus = Apus {
        node,
        replay,
        serving: Mutex::new(false),
        max_payload: s.config.engine.max_payload,
        follower_clients: s.config.follower_clients,
    };
    if let Err(e) = thread::Builder::new()
        .name("apus-roles".into())
        .spawn(|| inside(watch_roles))
    {
        refuse(&format!("cannot start the role watcher: {e}"));
    }
    if let Some(addr) = s.config.replicas[s.id.index()].client {
        // Bound here, not in the thread: an address in use is a
        // misconfiguration (two replicas with one id) and must stop us.
        let listener = match std::net::TcpListener::bind(addr) {
            Ok(l) => l,
            Err(e) => refuse(&format!("cannot serve status on {addr}: {e}")),
        };
        if let Err(e) = thread::Builder::new()
            .name("apus-status".into())
            .spawn(move || inside(|| serve_status(listener)))
        {
            refuse(&format!("cannot start the status server: {e}"));
        }
    }
    Some(apus)
}

/// Follows the node's role: a new leader first ends the connections it was
/// replaying (each close replicated), then serves real clients; a node that
/// stops leading turns its clients away.
fn watch_roles() {
    let mut leading = false;
    loop {
        thread::sleep(Duration::from_millis(1));
        let Some(a) = APUS.get().and_then(Option::as_ref) else {
            continue;
        };
        let now = a.node.status().role == Role::Leader;
        if now == leading {
            continue;
        }
        if now && !caught_up(a) {
            // Lost the leadership again before taking over.
            continue;
        }
        leading = now;
        if now {
            let ids = a.replay.replayed_ids();
            for (id, out) in a.replay.finish_all(&ids) {
                let close = payload::Close {
                    bytes_out: out.bytes,
                    hash_out: out.hash,
                };
                if let Err(e) = a.node.propose_entry(EntryKind::Close, id, &close.encode()) {
                    warn!(conn = id, error = %e, "could not replicate the close of a replayed connection");
                }
            }
            info!("leading: serving clients");
        } else {
            for fd in REGISTRY.break_all() {
                // SAFETY: shutdown on a descriptor the server still owns; it
                // sees end of stream and closes it itself.
                unsafe {
                    real::shutdown(fd, libc::SHUT_RDWR);
                }
            }
            info!("no longer leading: client connections closed");
        }
        *a.serving.lock().unwrap_or_else(|p| p.into_inner()) = now;
    }
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

/// Answers STATUS on the replica's client address (for `apus status`).
fn serve_status(listener: std::net::TcpListener) {
    for stream in listener.incoming().flatten() {
        let _ = thread::Builder::new()
            .name("apus-status-conn".into())
            .spawn(move || {
                inside(|| {
                    let mut s = stream;
                    while let Ok(Some((kind, body))) = read_frame(&mut s) {
                        let reply = match (
                            Request::decode(kind, body),
                            APUS.get().and_then(Option::as_ref),
                        ) {
                            (Ok(Request::Status), Some(a)) => {
                                let st = a.node.status();
                                Reply::Status(RemoteStatus {
                                    role: st.role,
                                    term: st.term,
                                    leader: st.leader,
                                    commit: st.commit,
                                    last_index: st.last_index,
                                    applied: st.applied,
                                    recovering: st.recovering,
                                    entries: a.replay.replayed.load(Ordering::Relaxed),
                                    digest: 0,
                                    divergences: a.replay.divergences.load(Ordering::Relaxed),
                                    fenced_writes: st.fencing.fenced_writes,
                                    revocations: st.fencing.revocations,
                                    transport: st.transport,
                                })
                            }
                            (Ok(_), _) => Reply::Failed("this port answers STATUS only".into()),
                            (Err(e), _) => Reply::Failed(format!("malformed request: {e}")),
                        };
                        if std::io::Write::write_all(&mut s, &reply.encode()).is_err() {
                            break;
                        }
                    }
                })
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

    /// Replicates an entry and holds the caller until it is committed and
    /// its turn (log order) has come.
    fn replicate(&self, kind: EntryKind, conn: u64, payload: &[u8]) -> Result<u64, ProposeError> {
        let applied = self.node.propose_entry(kind, conn, payload)?;
        self.replay.turnstile.pass(applied.index);
        Ok(applied.index)
    }
}

static NEXT_TAG: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A CONNECT payload for a new accept of ours.
fn connect_payload(a: &Apus) -> [u8; 16] {
    Connect {
        origin: a.replay.nonce,
        tag: NEXT_TAG.fetch_add(1, Ordering::Relaxed),
    }
    .encode()
}
