//! The `apus` command line.
//!
//! ```text
//! apus node   --config C --id N     run replica N (built-in register, client port)
//! apus status --config C            role, term, commit index and lag of every replica
//! apus certs  --config C [--force]  generate the cluster's TLS certificates (quic)
//! apus run    --config C --id N -- SERVER ARGS...   run a server replicated by the interception library
//! apus leader --config C            print the leader's application address
//! apus fence-check --config C --id N   (N stopped) check every peer refuses N's log writes
//! apus check  --config C            every replica's server digest at one log position
//! apus recover --config C --accept-data-loss   restart a memory-mode cluster that lost a majority's logs
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use apus::client::{Client, RemoteStatus, Reply, Request};
use apus::service::{Register, serve_clients};
use apus::supervisor::pristine::Pristine;
use apus::supervisor::run::{ServerSpec, supervise};
use apus::{ClusterConfig, Node, TransportKind};
use apus_core::NodeId;

const USAGE: &str = "\
usage:
  apus node   --config FILE --id N   run replica N of the cluster in FILE
  apus status --config FILE          show every replica's role, term, commit index and lag
  apus run    --config FILE --id N -- SERVER [ARGS...]
                                     run SERVER replicated (it must listen on replica[N].app)
  apus leader --config FILE          print the current leader's application address
  apus check  --config FILE [--timeout-ms MS]
                                     put a consistency check into the log; every replica runs
                                     the server's digest command (cluster.digest) at that point;
                                     prints each digest, exits 1 if they differ
  apus certs  --config FILE [--force]
                                     generate the CA and every replica's certificate and key
                                     at the paths FILE names (transport = \"quic\")
  apus fence-check --config FILE --id N [--timeout-ms MS]
                                     with replica N stopped, act as N and check that every
                                     peer refuses its writes to their logs (fencing)
  apus recover --config FILE --accept-data-loss [--timeout-ms MS]
                                     memory mode, after a majority of the replicas lost their
                                     logs at once (`apus status` says so): restart the cluster
                                     from the logs that survived; what only the lost ones held
                                     is gone";

struct Args {
    command: String,
    config: Option<PathBuf>,
    id: Option<u8>,
    force: bool,
    /// `recover`: the operator knows what it costs.
    accept_data_loss: bool,
    /// How long `fence-check` waits for the peers.
    timeout: Duration,
    /// What follows `--` (`apus run`).
    server: Vec<String>,
}

fn parse() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let command = it.next().context("missing command")?;
    let mut a = Args {
        command,
        config: None,
        id: None,
        force: false,
        accept_data_loss: false,
        timeout: Duration::from_secs(10),
        server: Vec::new(),
    };
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "-h" | "--help" => a.command = "help".into(),
            "--config" => a.config = Some(PathBuf::from(value()?)),
            "--force" => a.force = true,
            "--accept-data-loss" => a.accept_data_loss = true,
            "--" => {
                a.server = it.by_ref().collect();
                break;
            }
            "--timeout-ms" => {
                let v = value()?;
                let ms: u64 =
                    v.parse().ok().filter(|&ms| ms > 0).with_context(|| {
                        format!("--timeout-ms expects milliseconds > 0, got {v:?}")
                    })?;
                a.timeout = Duration::from_millis(ms);
            }
            "--id" => {
                let v = value()?;
                a.id = Some(
                    v.parse()
                        .with_context(|| format!("--id expects a replica id, got {v:?}"))?,
                );
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("apus: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match args.command.as_str() {
        "node" => node(&args),
        "status" => status(&args),
        "certs" => certs(&args),
        "run" => {
            return match run(&args) {
                Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
                Err(e) => {
                    eprintln!("apus: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        "leader" => leader(&args),
        "fence-check" => fence_check(&args),
        "recover" => recover(&args),
        "check" => {
            return match check(&args) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("apus: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        other => {
            eprintln!("apus: unknown command {other:?}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apus: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(args: &Args) -> Result<ClusterConfig> {
    let path = args.config.as_ref().context("--config FILE is required")?;
    Ok(ClusterConfig::load(path)?)
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn node(args: &Args) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = load(args)?;
    let id = NodeId(args.id.context("--id N is required")?);
    let spec = config.replica(id).with_context(|| {
        format!(
            "--id {}: the cluster has replicas 0..{}",
            id.0,
            config.replicas.len()
        )
    })?;
    let client: SocketAddr = spec.client.with_context(|| {
        format!(
            "replica[{}].client: `apus node` needs a client address",
            id.0
        )
    })?;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let register = Register::default();
    let node = Arc::new(Node::start(&config, id, register.clone()).context("starting the node")?);
    let r = node.recovery();
    if r.entries > 0 || r.cut_reason.is_some() {
        tracing::info!(entries = r.entries, cut_bytes = r.cut_bytes, cut = ?r.cut_reason, "recovered the log");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let server = serve_clients(node.clone(), register, client, stop.clone())
        .with_context(|| format!("serving clients on {client}"))?;
    tracing::info!(%id, %client, "serving clients");
    while !STOP.load(Ordering::SeqCst) {
        if let Some(why) = node.stopped() {
            bail!("the node stopped: {why}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::info!("shutting down");
    stop.store(true, Ordering::SeqCst);
    let _ = server.join();
    match Arc::try_unwrap(node) {
        Ok(n) => n.shutdown(),
        Err(_) => tracing::warn!("client threads still hold the node; exiting anyway"),
    }
    Ok(())
}

/// One replica's status, if it answers on its client address.
fn remote_status(addr: Option<SocketAddr>) -> Option<RemoteStatus> {
    let mut c = Client::connect(addr?, Duration::from_secs(1)).ok()?;
    match c.call(&Request::Status).ok()? {
        Reply::Status(s) => Some(s),
        _ => None,
    }
}

/// Every replica's status (`None`: it did not answer).
fn statuses(config: &ClusterConfig) -> Vec<(NodeId, Option<SocketAddr>, Option<RemoteStatus>)> {
    config
        .replicas
        .iter()
        .map(|r| (r.id, r.client, remote_status(r.client)))
        .collect()
}

/// The replicas that lost their logs in a restart (memory mode), when too
/// many for the others to elect a leader; empty otherwise.
fn lost_majority(rows: &[(NodeId, Option<SocketAddr>, Option<RemoteStatus>)]) -> Vec<NodeId> {
    let n = rows.len();
    let recovering: Vec<NodeId> = rows
        .iter()
        .filter(|(_, _, s)| s.is_some_and(|s| s.recovering))
        .map(|(id, _, _)| *id)
        .collect();
    if recovering.len() > n - (n / 2 + 1) {
        recovering
    } else {
        Vec::new()
    }
}

fn status(args: &Args) -> Result<()> {
    let config = load(args)?;
    let rows = statuses(&config);
    let lost = lost_majority(&rows);
    let top = rows
        .iter()
        .filter_map(|(_, _, s)| s.map(|s| s.commit))
        .max()
        .unwrap_or(0);
    println!(
        "{:<4} {:<10} {:>6} {:>7} {:>10} {:>10} {:>10} {:>8} {:>10} {:>10}  {:<9}",
        "id",
        "role",
        "term",
        "leader",
        "commit",
        "last",
        "applied",
        "lag",
        "last check",
        "outputs≠",
        "transport"
    );
    for (id, addr, st) in rows {
        match st {
            Some(s) => println!(
                "{:<4} {:<10} {:>6} {:>7} {:>10} {:>10} {:>10} {:>8} {:>10} {:>10}  {:<9}{}",
                id.to_string(),
                s.role.to_string(),
                s.term,
                s.leader.map_or("-".to_string(), |l| l.to_string()),
                s.commit,
                s.last_index,
                s.applied,
                top.saturating_sub(s.applied),
                if s.last_check == 0 {
                    "-".to_string()
                } else {
                    s.last_check.to_string()
                },
                s.outputs_differed,
                match s.transport {
                    apus::TransportKind::Auto => "choosing".to_string(),
                    t => t.to_string(),
                },
                if s.recovering { "  (recovering)" } else { "" }
            ),
            None => println!(
                "{:<4} {}",
                id.to_string(),
                match addr {
                    Some(a) => format!("unreachable at {a}"),
                    None => "no client address configured".to_string(),
                }
            ),
        }
    }
    println!(
        "last check: the log index of the replica's last `apus check`; outputs≠: replayed \
         connections whose replies differed from the leader's (nonces and clocks in replies \
         do that too: `apus check` compares state)"
    );
    if !lost.is_empty() {
        println!(
            "\nTHE CLUSTER LOST A MAJORITY'S MEMORY: replicas {} lost their logs in a restart \
             (memory mode). They may not vote until a leader resends what they held, and the \
             others are too few to elect one, so nothing commits. Entries committed only on \
             them are lost. `apus recover --config FILE --accept-data-loss` restarts the \
             cluster from the logs that survived.",
            lost.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// `apus recover --accept-data-loss`: every recovering replica stops
/// waiting for what it lost. A replica that kept its log is elected; when
/// none did, the one with the longest log is told to stand.
fn recover(args: &Args) -> Result<()> {
    let config = load(args)?;
    if config.durability != apus_core::Durability::Memory {
        bail!(
            "recover is for durability = \"memory\": a durable replica keeps its log on disk \
             and recovers it itself"
        );
    }
    if !args.accept_data_loss {
        bail!(
            "recover discards whatever only the replicas that lost their memory held: \
             committed entries may be lost for good. Say --accept-data-loss to do it."
        );
    }
    let rows = statuses(&config);
    let n = rows.len();
    let answered: Vec<(NodeId, RemoteStatus)> = rows
        .iter()
        .filter_map(|(id, _, s)| Some((*id, (*s)?)))
        .collect();
    if answered.len() < n / 2 + 1 {
        bail!(
            "only {} of {n} replicas answered: a leader needs a majority, start the others first",
            answered.len()
        );
    }
    let lost = lost_majority(&rows);
    if lost.is_empty() {
        bail!(
            "nothing to recover: enough replicas kept their logs to elect a leader, and the \
             recovering ones catch up from it"
        );
    }
    // A replica that kept its log stands by itself; otherwise the recovering
    // replica holding the most (a leader had begun to resend it) stands.
    let kept = answered.iter().any(|(_, s)| !s.recovering);
    let stand = (!kept)
        .then(|| {
            answered
                .iter()
                .max_by_key(|(id, s)| (s.last_index, std::cmp::Reverse(id.0)))
                .map(|(id, _)| *id)
        })
        .flatten();
    for (id, addr, _) in rows.iter().filter(|(id, ..)| lost.contains(id)) {
        let addr = addr.context("a recovering replica has no client address")?;
        let mut c = Client::connect(addr, Duration::from_secs(1))
            .with_context(|| format!("connecting to replica {id} at {addr}"))?;
        let asked = Request::AcceptDataLoss {
            stand: stand == Some(*id),
        };
        match c.call(&asked)? {
            Reply::Accepted(true) => println!(
                "replica {id}: no longer waits for its lost log; it votes{}",
                if stand == Some(*id) {
                    " and stands for election"
                } else {
                    ""
                }
            ),
            Reply::Accepted(false) => println!("replica {id}: was no longer recovering"),
            Reply::Failed(why) => bail!("replica {id} refused: {why}"),
            other => bail!("replica {id} answered {other:?}"),
        }
    }
    let deadline = std::time::Instant::now() + args.timeout;
    while std::time::Instant::now() < deadline {
        let leader = statuses(&config).into_iter().find_map(|(id, _, s)| {
            s.filter(|s| s.role == apus_core::Role::Leader)
                .map(|s| (id, s))
        });
        if let Some((id, s)) = leader {
            println!(
                "recover: replica {id} leads term {} with {} entries; the others catch up from it",
                s.term, s.last_index
            );
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!(
        "no leader was elected within {:?} (see `apus status`)",
        args.timeout
    )
}

#[cfg(feature = "quic")]
fn certs(args: &Args) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let config = load(args)?;
    let tls = config
        .tls
        .as_ref()
        .context("cluster.transport: `apus certs` is for transport = \"quic\"")?;
    let generated = apus_tcp::quic::generate_certs(config.replicas.len())?;
    let mut files = vec![
        (tls.ca.clone(), generated.ca_cert.clone(), 0o644),
        (tls.ca_key(), generated.ca_key.clone(), 0o600),
    ];
    for (i, (cert, key)) in generated.replicas.iter().enumerate() {
        files.push((tls.certs[i].clone(), cert.clone(), 0o644));
        files.push((tls.keys[i].clone(), key.clone(), 0o600));
    }
    if !args.force
        && let Some((p, _, _)) = files.iter().find(|(p, _, _)| p.exists())
    {
        bail!(
            "{} exists; pass --force to replace every certificate",
            p.display()
        );
    }
    for (path, pem, mode) in &files {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(*mode)
            .open(path)
            .with_context(|| format!("writing {}", path.display()))?;
        std::io::Write::write_all(&mut f, pem.as_bytes())?;
        println!("wrote {}", path.display());
    }
    println!(
        "keep {} offline: it signs new replicas",
        tls.ca_key().display()
    );
    Ok(())
}

#[cfg(not(feature = "quic"))]
fn certs(_: &Args) -> Result<()> {
    bail!("this build has no QUIC support: rebuild apus with the `quic` feature")
}

/// The interception library: `APUS_INTERCEPT_LIB`, or next to this binary.
fn intercept_lib() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("APUS_INTERCEPT_LIB") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("APUS_INTERCEPT_LIB={} is not a file", p.display());
    }
    let exe = std::env::current_exe().context("locating the apus binary")?;
    let p = exe.with_file_name("libapus_intercept.so");
    if p.is_file() {
        Ok(p)
    } else {
        bail!(
            "{} not found: build it (cargo build -p apus-intercept, same profile as apus) or set APUS_INTERCEPT_LIB",
            p.display()
        )
    }
}

fn run(args: &Args) -> Result<i32> {
    let config_path = args.config.as_ref().context("--config FILE is required")?;
    let config = load(args)?;
    let id = args.id.context("--id N is required")?;
    let spec = config.replica(NodeId(id)).with_context(|| {
        format!(
            "--id {id}: the cluster has replicas 0..{}",
            config.replicas.len()
        )
    })?;
    let Some(app) = spec.app else {
        bail!("replica[{id}].app: `apus run` needs the address the server listens on");
    };
    if args.server.is_empty() {
        bail!("give the server command after --");
    }
    let library = intercept_lib()?;
    let config_abs = std::fs::canonicalize(config_path)?;
    let pristine = match &spec.server_dir {
        Some(dir) => Some(
            Pristine::prepare(dir, &spec.data_dir.join("pristine-server")).with_context(|| {
                format!(
                    "replica[{id}].server_dir: keeping a pristine copy of {}",
                    dir.display()
                )
            })?,
        ),
        None => None,
    };
    supervise(&ServerSpec {
        argv: args.server.clone(),
        env: vec![
            ("APUS_CONFIG".into(), config_abs.display().to_string()),
            ("APUS_ID".into(), id.to_string()),
        ],
        library,
        app_port: app.port(),
        pristine,
    })
}

/// `apus check`: `true` when every replica recorded the same digest.
fn check(args: &Args) -> Result<bool> {
    let config = load(args)?;
    let digest = config
        .digest
        .as_ref()
        .context("cluster.digest is not set: name the server's digest command, e.g. digest = [\"redis-cli\", \"-p\", \"{port}\", \"DEBUG\", \"DIGEST\"]")?;
    let patience = digest.timeout + Duration::from_secs(30);
    let deadline = std::time::Instant::now() + patience.max(args.timeout);
    // The leader puts the CHECK into the log; it answers once the entry is
    // applied there (its own digest taken).
    let (leader, index) = 'search: loop {
        let mut last_error = String::from("no leader reachable");
        for r in &config.replicas {
            let Some(addr) = r.client else { continue };
            let Ok(mut c) = Client::connect(addr, patience) else {
                continue;
            };
            match c.call(&Request::Check) {
                Ok(Reply::Applied { index, .. }) => break 'search (r.id, index),
                Ok(Reply::NotLeader(_)) => {}
                Ok(Reply::Failed(why)) => last_error = why,
                Ok(other) => last_error = format!("unexpected answer {other:?}"),
                Err(e) => last_error = e.to_string(),
            }
        }
        if std::time::Instant::now() > deadline {
            bail!("could not put a check into the log: {last_error}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("check at log index {index} (put in by {leader}):");
    let mut digests = Vec::new();
    for r in &config.replicas {
        let result = loop {
            let got = r.client.and_then(|addr| {
                let mut c = Client::connect(addr, Duration::from_secs(2)).ok()?;
                match c.call(&Request::LastCheck).ok()? {
                    Reply::Checked { index: i, digest } if i >= index => Some((i, digest)),
                    _ => None,
                }
            });
            match got {
                Some(g) => break Some(g),
                None if std::time::Instant::now() > deadline => break None,
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        match result {
            Some((i, Ok(d))) if i == index => {
                println!("  {}: {d}", r.id);
                digests.push(Some(d));
            }
            Some((i, Ok(_))) => {
                println!("  {}: superseded by a later check at {i}", r.id);
                digests.push(None);
            }
            Some((_, Err(why))) => {
                println!("  {}: no digest: {why}", r.id);
                digests.push(None);
            }
            None => {
                println!(
                    "  {}: did not record the check in time (down, or behind)",
                    r.id
                );
                digests.push(None);
            }
        }
    }
    let all_there = digests.iter().all(Option::is_some);
    let equal = all_there && digests.windows(2).all(|w| w[0] == w[1]);
    if equal {
        println!("check: PASS (every replica holds the same state at {index})");
    } else if all_there {
        println!("check: FAIL: the replicas' digests differ");
    } else {
        println!("check: FAIL: not every replica produced a digest");
    }
    Ok(equal)
}

fn leader(args: &Args) -> Result<()> {
    let config = load(args)?;
    for r in &config.replicas {
        if remote_status(r.client).is_some_and(|s| s.role == apus_core::Role::Leader) {
            match r.app {
                Some(app) => println!("{app}"),
                None => println!("{}", r.id),
            }
            return Ok(());
        }
    }
    bail!("no leader reachable (is the cluster running? replicas need a client address)")
}

fn fence_check(args: &Args) -> Result<()> {
    let config = load(args)?;
    let me = NodeId(args.id.context("--id N is required")?);
    let transport = match config.transport {
        TransportKind::Auto => running_transport(&config).context(
            "transport = \"auto\": no replica answered a status request, so the transport the cluster settled on is unknown",
        )?,
        t => t,
    };
    let report = apus::fence_check::run(&config, me, transport, args.timeout)?;
    println!(
        "fence-check: acting as {me} over {transport}; refusals come from {}",
        report.mechanism()
    );
    for (peer, outcome) in &report.peers {
        println!("  {peer}: {outcome}");
    }
    if let Some(n) = report.fenced_writes {
        println!("  ring writes the {transport} transport counted as refused: {n}");
    }
    if report.broken() {
        bail!("FENCING BROKEN: a peer accepted a log write from {me}, which it does not grant");
    }
    if !report.all_fenced() {
        bail!("not every peer was checked (see above)");
    }
    println!("fence-check: PASS (every peer refused {me}'s log write)");
    Ok(())
}

/// The transport the running replicas report.
fn running_transport(config: &ClusterConfig) -> Option<TransportKind> {
    config.replicas.iter().find_map(|r| {
        Some(remote_status(r.client)?.transport).filter(|&t| t != TransportKind::Auto)
    })
}
