//! `cargo xtask e2e --server redis|memcached|resp-kv`: an unmodified server
//! replicated by `apus run` on three replicas over TCP, checked end to end.
//!
//! Each run: the bare server's throughput and latency as the baseline; the
//! same load through the replicated leader; the state compared on all three
//! replicas; bad input (garbage, a command cut off by a disconnect, the
//! server closing a connection itself, a value larger than one log entry);
//! Redis `BGSAVE` on the leader; a SIGKILL of the leader under an INCR load
//! (clients move to the new leader, every acknowledged INCR is counted); the
//! killed replica restarted with an empty server, which rebuilds its state by
//! replaying the log; the state compared again on all three, and zero
//! divergences. resp-kv also runs the misconfiguration checks (wrong id,
//! invalid config, a replica whose address is taken, a wrong secret).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use apus::client::{Client, RemoteStatus, Reply, Request};
use apus_core::{NodeId, Role};
use hdrhistogram::Histogram;

use crate::{cargo, root, run, tools};
use apus_bench::appclient::{AppConn, FNV_OFFSET, Protocol, Resp, RespConn, XorShift, fnv1a};

mod flow;
mod ldap;
mod mariadb;
mod nginx;
mod postgres;
pub mod servers;
pub use servers::ServerKind;

pub const REPLICAS: usize = 3;
/// Concurrent clients of the INCR failover load.
const INCR_CLIENTS: usize = 8;
/// Connections of the mixed set/get load (memcached, resp-kv).
const MIXED_CONNS: usize = 16;
/// Keys of the mixed load.
const MIXED_KEYS: u64 = 1000;

/// The binaries the end-to-end checks run, built in release mode.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub apus: PathBuf,
    pub resp_kv: PathBuf,
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// Builds `apus` (with QUIC), the interception library and resp-kv in one
/// cargo invocation, so every harness shares one release build.
pub fn build_release() -> Result<Binaries> {
    // The verbs transport's C shim (sideway) builds with cmake and libclang.
    tools::ensure(&["cmake"])?;
    tools::ensure_packages(&["libclang-dev"])?;
    run(
        "building apus, apus-intercept and resp-kv (release)",
        cargo().args([
            "build",
            "--quiet",
            "--release",
            "--package",
            "apus",
            "--features",
            "apus/quic,apus/fabric,apus/verbs",
            "--package",
            "apus-intercept",
            "--package",
            "apus-demo-server",
        ]),
    )?;
    let dir = target_dir().join("release");
    let b = Binaries {
        apus: dir.join("apus"),
        resp_kv: dir.join("resp-kv"),
    };
    for p in [&b.apus, &b.resp_kv, &dir.join("libapus_intercept.so")] {
        ensure!(p.is_file(), "the build did not produce {}", p.display());
    }
    Ok(b)
}

pub fn free_addr() -> Result<SocketAddr> {
    Ok(bind_fixed(TcpListener::bind)?.0)
}

/// Where ports are looked for: below the kernel's ephemeral range. A port
/// in that range is free only while nobody connects: a server restarted
/// on one (a rebuilt replica's) found it taken by some outgoing
/// connection's local port ("Address already in use").
const FIXED_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// Binds the first free loopback port of [`FIXED_PORTS`] (outside the
/// ephemeral range, checked), from a start that differs between processes.
fn bind_fixed<S>(bind: impl Fn(SocketAddr) -> std::io::Result<S>) -> Result<(SocketAddr, S)> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral = apus::supervisor::run::ephemeral_ports();
    let span = u32::from(FIXED_PORTS.end - FIXED_PORTS.start);
    let start = std::process::id().wrapping_mul(7919) + NEXT.fetch_add(1, Ordering::Relaxed) * 13;
    for i in 0..span {
        let port = FIXED_PORTS.start + ((start + i) % span) as u16;
        if ephemeral.contains(&port) {
            continue;
        }
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if let Ok(s) = bind(addr) {
            NEXT.fetch_add(i, Ordering::Relaxed);
            return Ok((addr, s));
        }
    }
    bail!(
        "no free loopback port in {FIXED_PORTS:?} outside the ephemeral range {}-{}",
        ephemeral.start(),
        ephemeral.end()
    )
}

/// Free loopback ports for one configuration: each socket stays bound until
/// the pool is dropped, so the kernel cannot hand out one port twice (it
/// did: two replicas got the same address). They lie outside the
/// ephemeral range (see [`FIXED_PORTS`]).
#[derive(Default)]
pub struct PortPool {
    tcp: Vec<TcpListener>,
    udp: Vec<std::net::UdpSocket>,
}

impl PortPool {
    pub fn tcp(&mut self) -> Result<SocketAddr> {
        let (a, l) = bind_fixed(TcpListener::bind)?;
        self.tcp.push(l);
        Ok(a)
    }

    pub fn udp(&mut self) -> Result<SocketAddr> {
        let (a, s) = bind_fixed(std::net::UdpSocket::bind)?;
        self.udp.push(s);
        Ok(a)
    }
}

/// A status reply from a replica's client address, if it answers.
pub fn status_at(addr: SocketAddr) -> Option<RemoteStatus> {
    let mut c = Client::connect(addr, Duration::from_millis(300)).ok()?;
    match c.call(&Request::Status).ok()? {
        Reply::Status(s) => Some(s),
        _ => None,
    }
}

/// The replica that reports itself leader, if any.
pub fn find_leader(status: &[SocketAddr]) -> Option<usize> {
    (0..status.len()).find(|&i| status_at(status[i]).is_some_and(|s| s.role == Role::Leader))
}

/// Sends `SIG<name>` to `pid` (KILL, STOP, CONT).
pub fn signal(pid: i32, name: &str) -> Result<()> {
    let sig = match name {
        "KILL" => libc::SIGKILL,
        "STOP" => libc::SIGSTOP,
        "CONT" => libc::SIGCONT,
        "TERM" => libc::SIGTERM,
        other => bail!("signal {other:?}: the harnesses send KILL, STOP, CONT or TERM"),
    };
    // SAFETY: kill has no memory preconditions.
    if unsafe { libc::kill(pid, sig) } != 0 {
        bail!("kill -{name} {pid}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Three replicas of a server, each under `apus run`.
pub struct AppCluster {
    pub kind: ServerKind,
    bins: Binaries,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub apps: Vec<SocketAddr>,
    pub status: Vec<SocketAddr>,
    runs: Vec<Option<Child>>,
    /// Keys the harness wrote, for servers that cannot list their keys.
    pub keys: Mutex<Vec<String>>,
}

impl AppCluster {
    /// Writes the cluster's config under `target/<purpose>/`, over tcp.
    pub fn new(kind: ServerKind, bins: Binaries, purpose: &str) -> Result<AppCluster> {
        AppCluster::with_transport(kind, bins, purpose, "transport = \"tcp\"\n")
    }

    /// The same, with `transport` holding the `[cluster]` lines that choose
    /// the transport.
    pub fn with_transport(
        kind: ServerKind,
        bins: Binaries,
        purpose: &str,
        transport: &str,
    ) -> Result<AppCluster> {
        let dir =
            target_dir()
                .join(purpose)
                .join(format!("{}-{}", kind.name(), std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut cfg = format!(
            "# written by cargo xtask {purpose}\n\
             [cluster]\n\
             secret = \"{purpose} cluster secret {} {}\"\n\
             durability = \"memory\"\n\
             {transport}\
             poll = \"park\"\n\
             # followers answer the harness directly, to compare their state\n\
             follower_clients = \"serve\"\n\
             {digest}\
             {ready}\
             [engine]\n\
             heartbeat_us = 2000\n\
             # 100 ms: with output commit three busy servers share two\n\
             # cores, and a 50 ms window saw leaders step down under\n\
             # redis-benchmark -c 50 (issue 15)\n\
             election_timeout_us = 100000\n",
            kind.name(),
            std::process::id(),
            digest = match kind.digest()? {
                Some(argv) => {
                    let quoted: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
                    format!("digest = [{}]\n", quoted.join(", "))
                }
                None => String::new(),
            },
            ready = match kind.ready_command()? {
                Some(argv) => {
                    let quoted: Vec<String> = argv.iter().map(|a| format!("{a:?}")).collect();
                    format!("ready = [{}]\n", quoted.join(", "))
                }
                None => String::new(),
            }
        );
        // QUIC: certificates per replica, made by `apus certs` below.
        let quic = transport.contains("\"quic\"");
        if quic {
            cfg = cfg.replacen("[engine]", "tls_ca = \"certs/ca.pem\"\n[engine]", 1);
        }
        let (mut apps, mut status) = (Vec::new(), Vec::new());
        let mut pool = PortPool::default();
        for i in 0..REPLICAS {
            let address = if quic { pool.udp()? } else { pool.tcp()? };
            let (client, app) = (pool.tcp()?, pool.tcp()?);
            cfg += &format!(
                "[[replica]]\nid = {i}\naddress = \"{address}\"\nclient = \"{client}\"\n\
                 app = \"{app}\"\nserver_dir = \"server{i}\"\ndata_dir = \"n{i}\"\n"
            );
            if quic {
                cfg += &format!("tls_cert = \"certs/n{i}.pem\"\ntls_key = \"certs/n{i}.key\"\n");
            }
            kind.prepare(&dir.join(format!("server{i}")), app.port())?;
            std::fs::create_dir_all(dir.join(format!("n{i}")))?;
            apps.push(app);
            status.push(client);
        }
        let config = dir.join("cluster.toml");
        std::fs::write(&config, cfg)?;
        drop(pool);
        if kind == ServerKind::Postgres {
            // The node inside the server keeps its files beside them.
            servers::chown_postgres(&dir)?;
        }
        if quic {
            run(
                "apus certs",
                tools::own(&bins.apus)
                    .args(["certs", "--config"])
                    .arg(&config)
                    .stdout(Stdio::null()),
            )?;
        }
        Ok(AppCluster {
            kind,
            bins,
            dir,
            config,
            apps,
            status,
            runs: (0..REPLICAS).map(|_| None).collect(),
            keys: Mutex::new(Vec::new()),
        })
    }

    /// Makes followers close client connections (`follower_clients =
    /// "refuse"`), for load that must only ever be replicated: a write to a
    /// follower that serves would bypass consensus. Call before starting.
    pub fn refuse_follower_clients(&self) -> Result<()> {
        let text = std::fs::read_to_string(&self.config)?;
        let refused = text.replace(
            "follower_clients = \"serve\"",
            "follower_clients = \"refuse\"",
        );
        ensure!(refused != text, "the config has no follower_clients line");
        std::fs::write(&self.config, refused)?;
        Ok(())
    }

    /// Where replica `i`'s server keeps its files (Redis's dump.rdb).
    pub fn server_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("server{i}"))
    }

    /// Restarts replica `i` as a replacement machine would: `apus run`
    /// starts the server from its pristine directory (`server_dir`), since
    /// the log is replayed into it from the beginning; APUS's saved term
    /// and vote are kept.
    pub fn restart_empty(&mut self, i: usize) -> Result<()> {
        self.start(i)
    }

    /// The `apus run` command for replica `i` with `config`.
    pub fn run_command(&self, i: usize, config: &Path, app_port: u16) -> Result<Command> {
        let mut c = tools::own(&self.bins.apus);
        c.args(["run", "--config"])
            .arg(config)
            .args(["--id", &i.to_string(), "--"])
            .args(
                self.kind
                    .command(&self.bins, app_port, &self.server_dir(i))?,
            )
            // APUS_E2E_LOG: another log filter for the replicas (e.g.
            // `apus_intercept=debug,info`).
            .env(
                "APUS_LOG",
                std::env::var("APUS_E2E_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null());
        Ok(c)
    }

    /// Starts replica `i` (with another config, if given), logging to
    /// `n<i>.log`.
    pub fn start_with(&mut self, i: usize, config: Option<&Path>) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("n{i}.log")))?;
        let config = config.unwrap_or(&self.config).to_path_buf();
        let child = self
            .run_command(i, &config, self.apps[i].port())?
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting apus run")?;
        self.runs[i] = Some(child);
        Ok(())
    }

    pub fn start(&mut self, i: usize) -> Result<()> {
        self.start_with(i, None)
    }

    /// The processes of replica `i`'s server (every descendant of its
    /// `apus run`: daemons and forked workers too).
    pub fn server_pids(&self, i: usize) -> Vec<u32> {
        self.runs[i]
            .as_ref()
            .map(|r| apus::supervisor::tree::descendants(r.id()))
            .unwrap_or_default()
    }

    /// SIGKILLs every process of replica `i`'s server at once, as a host
    /// crash would (not `apus run`, which then exits by itself).
    pub fn kill(&mut self, i: usize) -> Result<()> {
        let servers = self.server_pids(i);
        let Some(mut run) = self.runs[i].take() else {
            return Ok(());
        };
        if servers.is_empty() {
            let _ = run.kill();
        }
        for pid in servers {
            let _ = signal(pid as i32, "KILL");
        }
        run.wait()?;
        Ok(())
    }

    /// Freezes (`STOP`) or resumes (`CONT`) every process of replica `i`'s
    /// server, as a VM stall or a long GC pause would.
    pub fn freeze(&self, i: usize, stop: bool) -> Result<()> {
        let pids = self.server_pids(i);
        ensure!(!pids.is_empty(), "replica n{i} has no server processes");
        for pid in pids {
            signal(pid as i32, if stop { "STOP" } else { "CONT" })?;
        }
        Ok(())
    }

    pub fn replica_status(&self, i: usize) -> Option<RemoteStatus> {
        status_at(self.status[i])
    }

    pub fn leader(&self) -> Option<usize> {
        find_leader(&self.status)
    }

    /// Fails if `apus run` of a replica that should be running has exited.
    pub fn check_alive(&mut self, alive: &[usize]) -> Result<()> {
        for &i in alive {
            if let Some(r) = self.runs[i].as_mut()
                && let Some(st) = r.try_wait()?
            {
                bail!(
                    "replica n{i} exited ({st}); its log: {}",
                    self.dir.join(format!("n{i}.log")).display()
                );
            }
        }
        Ok(())
    }

    /// Waits until the `alive` replicas answer and one of them leads.
    pub fn wait_ready(&mut self, alive: &[usize], within: Duration) -> Result<usize> {
        let deadline = Instant::now() + within;
        loop {
            self.check_alive(alive)?;
            let st: Vec<Option<RemoteStatus>> =
                alive.iter().map(|&i| self.replica_status(i)).collect();
            if st.iter().all(Option::is_some) {
                let leaders: Vec<usize> = alive
                    .iter()
                    .zip(&st)
                    .filter(|(_, s)| s.as_ref().is_some_and(|s| s.role == Role::Leader))
                    .map(|(&i, _)| i)
                    .collect();
                // Every replica follows it in its term: a replica still
                // campaigning alone (started before the others could hear
                // it) would depose it as soon as it connects.
                if let [l] = leaders[..] {
                    let term = st[alive
                        .iter()
                        .position(|&i| i == l)
                        .expect("a leader is alive")]
                    .as_ref()
                    .map(|s| s.term);
                    if st
                        .iter()
                        .flatten()
                        .all(|s| s.leader == Some(NodeId(l as u8)) && Some(s.term) == term)
                    {
                        return Ok(l);
                    }
                }
            }
            ensure!(
                Instant::now() < deadline,
                "replicas {alive:?} not ready within {within:?} (status {st:?}); logs in {}",
                self.dir.display()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the `alive` replicas have applied the same commit index,
    /// with one leader, stable over two polls.
    pub fn wait_converged(
        &mut self,
        alive: &[usize],
        within: Duration,
    ) -> Result<Vec<RemoteStatus>> {
        let deadline = Instant::now() + within;
        let mut last: Option<Vec<RemoteStatus>> = None;
        loop {
            self.check_alive(alive)?;
            let st: Vec<Option<RemoteStatus>> =
                alive.iter().map(|&i| self.replica_status(i)).collect();
            if st.iter().all(Option::is_some) {
                let st: Vec<RemoteStatus> = st.into_iter().flatten().collect();
                let settled = st
                    .iter()
                    .all(|s| s.applied == st[0].commit && s.commit == st[0].commit)
                    && st.iter().filter(|s| s.role == Role::Leader).count() == 1;
                if settled && last.as_ref() == Some(&st) {
                    return Ok(st);
                }
                last = Some(st);
            }
            if Instant::now() >= deadline {
                // CI keeps no files: what a lagging replica said is shown here.
                let lagging: Vec<String> = alive
                    .iter()
                    .zip(last.iter().flatten())
                    .filter(|(_, s)| s.applied < s.commit)
                    .map(|(&i, _)| self.log_tail(i, 12))
                    .collect();
                bail!(
                    "replicas {alive:?} did not converge within {within:?}: {last:?}; logs in {}{}",
                    self.dir.display(),
                    lagging.concat()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last `lines` lines of replica `i`'s log, as a block to append to
    /// an error.
    fn log_tail(&self, i: usize, lines: usize) -> String {
        let log = std::fs::read_to_string(self.dir.join(format!("n{i}.log"))).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n    ");
        format!("\n  the end of n{i}.log:\n    {tail}")
    }

    /// A fingerprint of replica `i`'s whole state, read from its server.
    pub fn snapshot(&self, i: usize) -> Result<String> {
        let addr = self.apps[i];
        let timeout = Duration::from_secs(2);
        match self.kind {
            ServerKind::Redis | ServerKind::RespKv => {
                let mut c = RespConn::connect(addr, timeout)?;
                let digest_cmd: &[&[u8]] = if self.kind == ServerKind::Redis {
                    &[b"DEBUG", b"DIGEST"]
                } else {
                    &[b"DIGEST"]
                };
                let digest = match c.call(digest_cmd)? {
                    Resp::Simple(s) => s,
                    Resp::Bulk(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
                    other => bail!("n{i}: digest: {other:?}"),
                };
                let size = match c.call(&[b"DBSIZE"])? {
                    Resp::Int(n) => n,
                    other => bail!("n{i}: DBSIZE: {other:?}"),
                };
                Ok(format!("dbsize {size}, digest {digest}"))
            }
            ServerKind::Memcached => {
                let mut keys = self.keys.lock().expect("lock").clone();
                keys.sort();
                keys.dedup();
                let AppConn::Mc(mut c) = AppConn::connect(Protocol::Memcached, addr, timeout)?
                else {
                    unreachable!("memcached speaks its own protocol");
                };
                let (mut found, mut h) = (0, FNV_OFFSET);
                for chunk in keys.chunks(100) {
                    let mut pairs = c.get_many(chunk)?;
                    pairs.sort();
                    for (k, v) in pairs {
                        found += 1;
                        h = fnv1a(fnv1a(fnv1a(h, k.as_bytes()), b"\0"), &v);
                    }
                }
                Ok(format!(
                    "{found} of {} keys present, digest {h:016x}",
                    keys.len()
                ))
            }
            other => bail!(
                "{}: the harness reads its state with `apus check` only",
                other.name()
            ),
        }
    }

    /// Converges the `alive` replicas, then requires the same state on all
    /// of them and no divergence. A follower's server may still be working
    /// through the last replayed bytes, so a mismatch is retried briefly.
    pub fn compare(&mut self, alive: &[usize]) -> Result<String> {
        let st = self.wait_converged(alive, Duration::from_secs(180))?;
        if self.kind.protocol().is_none() {
            if self.kind.digest()?.is_none() {
                return Ok(format!(
                    "{} replicas at commit {} (no state to compare)",
                    alive.len(),
                    st[0].commit
                ));
            }
            // The server's own digest command, at one log position.
            let digest = self.check()?;
            return Ok(format!(
                "{} replicas at commit {}: apus check: {digest}",
                alive.len(),
                st[0].commit
            ));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let snaps = loop {
            let snaps: Vec<String> = alive
                .iter()
                .map(|&i| self.snapshot(i))
                .collect::<Result<_>>()?;
            if snaps.iter().all(|s| s == &snaps[0]) {
                break snaps;
            }
            ensure!(
                Instant::now() < deadline,
                "replicas hold different states: {}; logs in {}",
                alive
                    .iter()
                    .zip(&snaps)
                    .map(|(i, s)| format!("n{i}: {s}"))
                    .collect::<Vec<_>>()
                    .join("; "),
                self.dir.display()
            );
            thread::sleep(Duration::from_millis(100));
        };
        // These servers put no nonces or clocks in their replies: every
        // replayed connection must have answered exactly as on the leader.
        let differed: u64 = alive
            .iter()
            .filter_map(|&i| self.replica_status(i))
            .map(|s| s.outputs_differed)
            .sum();
        ensure!(
            differed == 0,
            "{differed} replayed connections answered differently from the leader; logs in {}",
            self.dir.display()
        );
        let check = if alive.len() == REPLICAS && self.kind.digest()?.is_some() {
            format!("; apus check: {}", self.check()?)
        } else {
            String::new()
        };
        Ok(format!(
            "{} replicas at commit {}: {}{check}",
            alive.len(),
            st[0].commit,
            snaps[0]
        ))
    }

    /// `apus check`: every replica's digest at one log position; they
    /// must be equal. Returns the digest.
    pub fn check(&self) -> Result<String> {
        let out = tools::own(&self.bins.apus)
            .args(["check", "--config"])
            .arg(&self.config)
            .output()
            .context("running apus check")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && stdout.contains("check: PASS"),
            "apus check failed ({}): {stdout}{}; logs in {}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.dir.display()
        );
        // "  n0: <digest>" per replica: they are equal, so the first says it.
        let digest = stdout
            .lines()
            .find_map(|l| {
                let (id, d) = l.trim().split_once(": ")?;
                id.strip_prefix('n')?.parse::<u8>().ok()?;
                Some(d.to_string())
            })
            .unwrap_or_default();
        Ok(digest)
    }

    /// Waits until replica `i`'s server answers (it may still be starting,
    /// or the node taking over).
    pub fn wait_serving(&self, i: usize, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        while !self.kind.ready(self.apps[i]) {
            ensure!(
                Instant::now() < deadline,
                "n{i}'s {} does not answer at {}; logs in {}",
                self.kind.name(),
                self.apps[i],
                self.dir.display()
            );
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// A connection to the current leader's server.
    pub fn leader_conn(&self) -> Result<AppConn> {
        let l = self.leader().context("no leader")?;
        Ok(AppConn::connect(
            self.kind.kv_protocol()?,
            self.apps[l],
            Duration::from_secs(2),
        )?)
    }

    pub fn remember_key(&self, key: &str) {
        self.keys.lock().expect("lock").push(key.to_string());
    }
}

impl AppCluster {
    /// Stops the cluster and removes its files, unless `APUS_E2E_KEEP` asks
    /// to keep both for a look.
    pub fn finish(self) {
        let dir = self.dir.clone();
        drop(self);
        if std::env::var_os("APUS_E2E_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

impl Drop for AppCluster {
    fn drop(&mut self) {
        if std::env::var_os("APUS_E2E_KEEP").is_some() {
            eprintln!(
                "APUS_E2E_KEEP: leaving the cluster in {} running",
                self.dir.display()
            );
            return;
        }
        // `apus run` takes its server's first process along
        // (PR_SET_PDEATHSIG), not the processes that one forked (nginx's
        // workers outlived every run, each holding its listener).
        for i in 0..self.runs.len() {
            for pid in self.server_pids(i) {
                let _ = signal(pid as i32, "KILL");
            }
        }
        for r in self.runs.iter_mut().flatten() {
            let _ = r.kill();
            let _ = r.wait();
        }
    }
}

/// The server alone, for the baseline.
pub(crate) struct BareServer {
    child: Child,
    pub(crate) addr: SocketAddr,
}

impl BareServer {
    pub(crate) fn start(kind: ServerKind, bins: &Binaries, dir: &Path) -> Result<BareServer> {
        let addr = free_addr()?;
        std::fs::create_dir_all(dir)?;
        kind.prepare(dir, addr.port())?;
        let argv = kind.command(bins, addr.port(), dir)?;
        let log = std::fs::File::create(dir.with_extension("log"))?;
        let mut cmd = tools::server(&argv[0])?;
        cmd.args(&argv[1..])
            .args(kind.foreground_args())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", argv[0]))?;
        let mut s = BareServer { child, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if kind.ready(addr) {
                return Ok(s);
            }
            if let Some(st) = s.child.try_wait()? {
                bail!("{} exited ({st}) before serving", argv[0]);
            }
            ensure!(
                Instant::now() < deadline,
                "{} did not answer within 10 s",
                argv[0]
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for BareServer {
    fn drop(&mut self) {
        // Its forked processes too (nginx's workers survive their master).
        for pid in apus::supervisor::tree::descendants(self.child.id()) {
            let _ = signal(pid as i32, "KILL");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Throughput and latency of one load.
#[derive(Clone, Debug)]
pub struct LoadFigures {
    pub label: String,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Runs redis-benchmark against `addr`, pinned to the last CPU when there
/// are several.
fn redis_benchmark(addr: SocketAddr, requests: u64) -> Result<Vec<LoadFigures>> {
    let cpus = thread::available_parallelism().map_or(1, |n| n.get());
    let mut cmd = if cpus > 1 {
        let mut c = tools::command("taskset")?;
        c.args(["-c", &(cpus - 1).to_string()])
            .arg(tools::path("redis-benchmark")?);
        c
    } else {
        tools::command("redis-benchmark")?
    };
    let out = cmd
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args([
            "-t",
            "set,get,incr,lpush",
            "-c",
            "50",
            "-r",
            "10000",
            "--csv",
        ])
        .args(["-n", &requests.to_string()])
        .stdin(Stdio::null())
        .output()
        .context("running redis-benchmark")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "redis-benchmark failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Vec<String>> = stdout
        .lines()
        .map(|l| {
            l.split(',')
                .map(|f| f.trim_matches('"').to_string())
                .collect()
        })
        .collect();
    let header = rows
        .iter()
        .find(|r| r.first().is_some_and(|f| f == "test"))
        .with_context(|| format!("redis-benchmark printed no CSV header: {stdout}"))?;
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("redis-benchmark CSV lacks column {name}: {header:?}"))
    };
    let (rps, p50, p99) = (col("rps")?, col("p50_latency_ms")?, col("p99_latency_ms")?);
    let figures: Vec<LoadFigures> = rows
        .iter()
        .filter(|r| r.first().is_some_and(|f| f != "test") && r.len() == header.len())
        .map(|r| -> Result<LoadFigures> {
            Ok(LoadFigures {
                label: r[0].clone(),
                rps: r[rps].parse()?,
                p50_ms: r[p50].parse()?,
                p99_ms: r[p99].parse()?,
            })
        })
        .collect::<Result<_>>()?;
    ensure!(
        figures.len() == 4,
        "expected four redis-benchmark results, got: {stdout}"
    );
    Ok(figures)
}

pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

/// A mixed set/get load from `conns` connections over `MIXED_KEYS` keys.
pub fn mixed_load(
    label: &str,
    protocol: Protocol,
    addr: SocketAddr,
    conns: usize,
    ops_per_conn: u64,
) -> Result<LoadFigures> {
    let start = Instant::now();
    let workers: Vec<_> = (0..conns)
        .map(|t| {
            thread::spawn(move || -> Result<Histogram<u64>> {
                let mut c = AppConn::connect(protocol, addr, Duration::from_secs(2))?;
                let mut rng = XorShift::new(t as u64 + 1);
                let mut h = latency_histogram();
                for n in 0..ops_per_conn {
                    let key = format!("k{}", rng.below(MIXED_KEYS));
                    let t0 = Instant::now();
                    if rng.below(2) == 0 {
                        c.set(
                            &key,
                            format!("value-{t}-{n}-{:016x}", rng.next_u64()).as_bytes(),
                        )?;
                    } else {
                        c.get(&key)?;
                    }
                    h.record(t0.elapsed().as_nanos() as u64)?;
                }
                Ok(h)
            })
        })
        .collect();
    let mut h = latency_histogram();
    for w in workers {
        h.add(
            &w.join()
                .map_err(|_| anyhow::anyhow!("a load thread panicked"))??,
        )?;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(LoadFigures {
        label: label.to_string(),
        rps: (conns as u64 * ops_per_conn) as f64 / secs,
        p50_ms: h.value_at_quantile(0.5) as f64 / 1e6,
        p99_ms: h.value_at_quantile(0.99) as f64 / 1e6,
    })
}

/// What the clients of an INCR load share.
pub struct Traffic {
    protocol: Protocol,
    apps: Vec<SocketAddr>,
    status: Vec<SocketAddr>,
    /// Also SET a per-client key before each INCR (the demo).
    with_sets: bool,
    /// Each client sends at most one INCR per this long (zero: as fast as
    /// the leader answers).
    pace: Duration,
    stop: AtomicBool,
    pub acked: AtomicU64,
    killed_at: Mutex<Option<Instant>>,
    first_ack_after_kill: Mutex<Option<Instant>>,
    /// Latencies since the last `take_window`.
    window: Mutex<Histogram<u64>>,
    /// Latencies before the kill.
    pub before_kill: Mutex<Histogram<u64>>,
    recovered: AtomicU64,
    errors: Mutex<Vec<String>>,
}

/// What one INCR client saw.
#[derive(Debug)]
pub struct Tally {
    pub key: String,
    /// The counter's value in the last reply.
    pub last: i64,
    /// INCRs acknowledged.
    pub acked: u64,
    /// INCRs whose reply was lost but which the counter shows were applied.
    pub applied_unacked: u64,
    /// INCRs whose outcome the client never learned.
    pub unknown: u64,
}

impl Traffic {
    pub fn new(cluster: &AppCluster, with_sets: bool, pace: Duration) -> Result<Arc<Traffic>> {
        Ok(Arc::new(Traffic {
            protocol: cluster.kind.kv_protocol()?,
            apps: cluster.apps.clone(),
            status: cluster.status.clone(),
            with_sets,
            pace,
            stop: AtomicBool::new(false),
            acked: AtomicU64::new(0),
            killed_at: Mutex::new(None),
            first_ack_after_kill: Mutex::new(None),
            window: Mutex::new(latency_histogram()),
            before_kill: Mutex::new(latency_histogram()),
            recovered: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
        }))
    }

    pub fn take_window(&self) -> Histogram<u64> {
        std::mem::replace(&mut *self.window.lock().expect("lock"), latency_histogram())
    }

    pub fn mark_kill(&self) -> Instant {
        let now = Instant::now();
        *self.killed_at.lock().expect("lock") = Some(now);
        now
    }

    pub fn first_ack_after_kill(&self) -> Option<Instant> {
        *self.first_ack_after_kill.lock().expect("lock")
    }

    /// Clients that have had a reply since the kill.
    pub fn recovered(&self) -> u64 {
        self.recovered.load(Ordering::SeqCst)
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().expect("lock").clone()
    }
}

/// Starts `clients` INCR clients on keys `ctr0..`, each set to 0 first
/// through the leader.
pub fn start_incr_clients(
    cluster: &AppCluster,
    traffic: &Arc<Traffic>,
    clients: usize,
) -> Result<Vec<thread::JoinHandle<Tally>>> {
    let mut c = cluster.leader_conn()?;
    for t in 0..clients {
        let key = format!("ctr{t}");
        c.set(&key, b"0")?;
        cluster.remember_key(&key);
        if traffic.with_sets {
            for n in 0..64 {
                cluster.remember_key(&format!("user{t}:{n}"));
            }
        }
    }
    drop(c);
    Ok((0..clients)
        .map(|t| {
            let traffic = traffic.clone();
            thread::spawn(move || incr_client(&traffic, t))
        })
        .collect())
}

fn incr_client(tr: &Traffic, t: usize) -> Tally {
    let mut tally = Tally {
        key: format!("ctr{t}"),
        last: 0,
        acked: 0,
        applied_unacked: 0,
        unknown: 0,
    };
    // INCRs sent since the last reply whose outcome is unknown.
    let mut pending: u64 = 0;
    let mut conn: Option<AppConn> = None;
    let mut recovered = false;
    let mut n: u64 = 0;
    while !tr.stop.load(Ordering::SeqCst) {
        let Some(c) = conn.as_mut() else {
            conn = find_leader(&tr.status).and_then(|l| {
                AppConn::connect(tr.protocol, tr.apps[l], Duration::from_millis(500)).ok()
            });
            if conn.is_none() {
                thread::sleep(Duration::from_millis(2));
            }
            continue;
        };
        n += 1;
        if tr.with_sets
            && c.set(&format!("user{t}:{}", n % 64), format!("{n}").as_bytes())
                .is_err()
        {
            conn = None;
            continue;
        }
        let t0 = Instant::now();
        let incr = c.incr(&tally.key);
        let ns = t0.elapsed().as_nanos() as u64;
        if let Some(rest) = tr.pace.checked_sub(t0.elapsed()) {
            thread::sleep(rest);
        }
        match incr {
            Ok(v) => {
                let expected = tally.last + 1;
                if v < expected || v > expected + pending as i64 {
                    tr.errors.lock().expect("lock").push(format!(
                        "{}: reply {v} after {} (with {pending} INCRs of unknown outcome): \
                         an acknowledged INCR was lost or one was applied twice",
                        tally.key, tally.last
                    ));
                    tr.stop.store(true, Ordering::SeqCst);
                }
                tally.applied_unacked += (v - expected).max(0) as u64;
                tally.unknown += pending;
                pending = 0;
                tally.last = v;
                tally.acked += 1;
                tr.acked.fetch_add(1, Ordering::SeqCst);
                let _ = tr.window.lock().expect("lock").record(ns);
                if tr.killed_at.lock().expect("lock").is_some() {
                    tr.first_ack_after_kill
                        .lock()
                        .expect("lock")
                        .get_or_insert_with(Instant::now);
                    if !recovered {
                        recovered = true;
                        tr.recovered.fetch_add(1, Ordering::SeqCst);
                    }
                } else {
                    let _ = tr.before_kill.lock().expect("lock").record(ns);
                }
            }
            Err(_) => {
                pending += 1;
                conn = None;
                thread::sleep(Duration::from_millis(2));
            }
        }
    }
    // Outcomes never learned stay unknown; the final counter tells.
    tally.unknown += pending;
    tally
}

/// Every surviving replica's counters equal what the clients last saw.
pub fn check_counters(cluster: &AppCluster, alive: &[usize], tallies: &[Tally]) -> Result<()> {
    for &i in alive {
        let mut c = AppConn::connect(
            cluster.kind.kv_protocol()?,
            cluster.apps[i],
            Duration::from_secs(2),
        )?;
        for t in tallies {
            let v = c
                .get(&t.key)?
                .with_context(|| format!("n{i} lost {}", t.key))?;
            let v: i64 = String::from_utf8_lossy(&v).trim().parse()?;
            // Requests whose outcome was unknown may have been applied after
            // the client's last reply.
            ensure!(
                v >= t.last && v <= t.last + t.unknown as i64,
                "n{i}: {} = {v}, but its client's last reply was {} ({} acknowledged INCRs)",
                t.key,
                t.last,
                t.acked
            );
        }
    }
    Ok(())
}

/// Outcome of a leader kill under INCR load.
pub struct Failover {
    pub victim: usize,
    pub new_leader: usize,
    pub election_ms: f64,
    pub first_ack_ms: f64,
    pub tallies: Vec<Tally>,
    pub before_kill: Histogram<u64>,
}

/// Runs the INCR load, SIGKILLs the leader's server after `before`, waits
/// until every client has been answered by the new leader and `after` more,
/// then stops the load. `tick` is called about every 100 ms with the traffic.
pub fn failover_under_load(
    cluster: &mut AppCluster,
    clients: usize,
    with_sets: bool,
    before: Duration,
    after: Duration,
    mut tick: impl FnMut(&AppCluster, &Traffic, Option<(usize, usize)>),
) -> Result<Failover> {
    let traffic = Traffic::new(cluster, with_sets, Duration::ZERO)?;
    let workers = start_incr_clients(cluster, &traffic, clients)?;
    let started = Instant::now();
    while started.elapsed() < before {
        thread::sleep(Duration::from_millis(100));
        tick(cluster, &traffic, None);
    }
    let victim = cluster.leader().context("no leader under load")?;
    let old_term = cluster.replica_status(victim).map_or(0, |s| s.term);
    cluster.kill(victim)?;
    let killed = traffic.mark_kill();
    let (new_leader, elected) = loop {
        if let Some(l) = cluster.leader()
            && cluster.replica_status(l).is_some_and(|s| s.term > old_term)
        {
            break (l, Instant::now());
        }
        if killed.elapsed() > Duration::from_secs(30) {
            traffic.stop();
            bail!(
                "no new leader within 30 s of the kill; logs in {}",
                cluster.dir.display()
            );
        }
        thread::sleep(Duration::from_micros(500));
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while traffic.recovered() < clients as u64 && traffic.errors().is_empty() {
        if Instant::now() > deadline {
            traffic.stop();
            bail!(
                "only {} of {clients} clients were answered within 30 s of the kill; logs in {}",
                traffic.recovered(),
                cluster.dir.display()
            );
        }
        thread::sleep(Duration::from_millis(10));
        tick(cluster, &traffic, Some((victim, new_leader)));
    }
    let resumed = Instant::now();
    while resumed.elapsed() < after {
        thread::sleep(Duration::from_millis(100));
        tick(cluster, &traffic, Some((victim, new_leader)));
    }
    traffic.stop();
    let tallies: Vec<Tally> = workers
        .into_iter()
        .map(|w| {
            w.join()
                .map_err(|_| anyhow::anyhow!("an INCR client panicked"))
        })
        .collect::<Result<_>>()?;
    let errors = traffic.errors();
    ensure!(errors.is_empty(), "{}", errors.join("\n"));
    let first = traffic
        .first_ack_after_kill()
        .context("no reply after the kill")?;
    Ok(Failover {
        victim,
        new_leader,
        election_ms: (elected - killed).as_secs_f64() * 1e3,
        first_ack_ms: (first - killed).as_secs_f64() * 1e3,
        tallies,
        before_kill: traffic.before_kill.lock().expect("lock").clone(),
    })
}

/// One pause of the leader: frozen until another replica leads, resumed,
/// and back as a working follower.
#[derive(Debug)]
pub struct Rejoin {
    pub victim: usize,
    pub new_leader: usize,
    /// From the freeze until the new leader was elected.
    pub deposed_ms: f64,
    /// From the resume until the old leader followed the new one and had
    /// applied everything committed when it resumed.
    pub rejoin_ms: f64,
    /// Whether `apus run` rebuilt its server on the way.
    pub rebuilt: bool,
    /// The term it was elected in again while catching up, if it was (a
    /// leader change after the one the pause caused: reported, issue 15).
    pub re_elected: Option<u64>,
}

/// How often each INCR client of [`pause_under_load`] sends at most.
const PAUSE_LOAD_PACE: Duration = Duration::from_millis(5);
/// How soon a resumed leader must follow and have applied what was
/// committed when it resumed...
const REJOIN_WITHIN: Duration = Duration::from_secs(60);
/// ... plus, if its server is rebuilt, a second per this many entries of
/// the log.
const REBUILD_ENTRIES_PER_S: u64 = 4_000;

/// Runs the INCR load and, `rounds` times, freezes the leader's server
/// (every process, SIGSTOP) until another replica leads, resumes it, and
/// waits until it is a follower that has caught up. Then stops the load;
/// every client's counter must match on every replica.
pub fn pause_under_load(
    cluster: &mut AppCluster,
    clients: usize,
    rounds: usize,
) -> Result<(Vec<Rejoin>, Vec<Tally>)> {
    // Paced: three replicas and the clients share this machine's cores, and
    // a saturated leader leaves a rebuilt replica too little CPU to replay
    // the log and catch up (the load's throughput is measured elsewhere).
    let traffic = Traffic::new(cluster, false, PAUSE_LOAD_PACE)?;
    let workers = start_incr_clients(cluster, &traffic, clients)?;
    let mut rejoins = Vec::new();
    let result = (|| -> Result<()> {
        for _ in 0..rounds {
            thread::sleep(Duration::from_millis(700));
            // The new leader must serve the clients (one paused earlier once
            // kept its server threads waiting for ever).
            rejoins.push(pause_and_rejoin(cluster, |cluster, new_leader| {
                let acked = traffic.acked.load(Ordering::SeqCst);
                let serving = Instant::now();
                while traffic.acked.load(Ordering::SeqCst) < acked + 100 {
                    ensure!(
                        serving.elapsed() < Duration::from_secs(20),
                        "the new leader n{new_leader} answered only {} INCRs in 20 s; logs in {}",
                        traffic.acked.load(Ordering::SeqCst) - acked,
                        cluster.dir.display()
                    );
                    thread::sleep(Duration::from_millis(5));
                }
                Ok(())
            })?);
        }
        thread::sleep(Duration::from_millis(500));
        Ok(())
    })();
    traffic.stop();
    let tallies: Vec<Tally> = workers
        .into_iter()
        .map(|w| {
            w.join()
                .map_err(|_| anyhow::anyhow!("an INCR client panicked"))
        })
        .collect::<Result<_>>()?;
    result?;
    let errors = traffic.errors();
    ensure!(errors.is_empty(), "{}", errors.join("\n"));
    Ok((rejoins, tallies))
}

/// Freezes the leader's server until another replica leads, has
/// `serving` check the new leader while it is frozen, resumes it, and waits
/// until it follows the new leader and has applied everything committed
/// when it resumed.
pub fn pause_and_rejoin(
    cluster: &mut AppCluster,
    serving: impl FnOnce(&AppCluster, usize) -> Result<()>,
) -> Result<Rejoin> {
    let all: Vec<usize> = (0..REPLICAS).collect();
    // A replica restarted in memory mode does not vote until it has caught
    // up (it forgot whom it voted for): paused before that, the leader
    // leaves no majority that can elect another, by design.
    let deadline = Instant::now() + Duration::from_secs(60);
    while all
        .iter()
        .any(|&i| cluster.replica_status(i).is_none_or(|s| s.recovering))
    {
        ensure!(
            Instant::now() < deadline,
            "a replica is still recovering 60 s on; logs in {}",
            cluster.dir.display()
        );
        thread::sleep(Duration::from_millis(10));
    }
    let victim = cluster.leader().context("no leader to pause")?;
    let old_term = cluster.replica_status(victim).map_or(0, |s| s.term);
    let log = cluster.dir.join(format!("n{victim}.log"));
    let rebuilds_before = count_in_log(&log, "asks for a rebuild");
    cluster.freeze(victim, true)?;
    let frozen = Instant::now();
    let outcome = (|| -> Result<(usize, f64)> {
        let new_leader = loop {
            if let Some(l) = (0..REPLICAS).filter(|&i| i != victim).find(|&i| {
                cluster
                    .replica_status(i)
                    .is_some_and(|s| s.role == Role::Leader && s.term > old_term)
            }) {
                break l;
            }
            ensure!(
                frozen.elapsed() < Duration::from_secs(30),
                "no new leader within 30 s of freezing n{victim}"
            );
            thread::sleep(Duration::from_millis(1));
        };
        let deposed_ms = frozen.elapsed().as_secs_f64() * 1e3;
        serving(cluster, new_leader)?;
        // Let the new leader commit for a while: the old one must catch up.
        thread::sleep(Duration::from_millis(200));
        Ok((new_leader, deposed_ms))
    })();
    cluster.freeze(victim, false)?;
    let (new_leader, deposed_ms) = outcome?;
    let resumed = Instant::now();
    let led = cluster
        .replica_status(new_leader)
        .context("the new leader stopped answering")?;
    let (target, new_term) = (led.commit, led.term);
    // Output commit: a leader paused with input its server had read but
    // that never committed is rebuilt, and a rebuild replays the whole log
    // (no snapshots yet, issue 16), at a few thousand entries a second on
    // two cores shared with the other replicas and the load.
    let rebuild_allowance = Duration::from_secs(target / REBUILD_ENTRIES_PER_S);
    let re_elected = loop {
        cluster.check_alive(&all)?;
        // Caught up: following a newer leader, or elected itself in a later
        // term than the new leader's (it rejoined, then won an election).
        let now = cluster.replica_status(victim);
        let caught_up = now.as_ref().is_some_and(|v| {
            v.term > old_term
                && v.applied >= target
                && !v.recovering
                && (v.role != Role::Leader || v.term > new_term)
        });
        if let Some(v) = now.filter(|_| caught_up) {
            break (v.role == Role::Leader).then_some(v.term);
        }
        let rebuilding = count_in_log(&log, "asks for a rebuild") > rebuilds_before;
        let limit = REJOIN_WITHIN
            + if rebuilding {
                rebuild_allowance
            } else {
                Duration::ZERO
            };
        ensure!(
            resumed.elapsed() < limit,
            "n{victim}, paused while leading and resumed, did not rejoin as a working \
             follower within {limit:?} (status {:?}; it must apply up to {target}{}); logs in {}",
            cluster.replica_status(victim),
            if rebuilding {
                ", its server rebuilt from the whole log"
            } else {
                ""
            },
            cluster.dir.display()
        );
        thread::sleep(Duration::from_millis(5));
    };
    Ok(Rejoin {
        victim,
        new_leader,
        deposed_ms,
        rejoin_ms: resumed.elapsed().as_secs_f64() * 1e3,
        rebuilt: count_in_log(&log, "asks for a rebuild") > rebuilds_before,
        re_elected,
    })
}

impl std::fmt::Display for Rejoin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "leader n{} paused: n{} elected {:.0} ms later; n{} resumed and caught up as a follower in {:.0} ms{}",
            self.victim,
            self.new_leader,
            self.deposed_ms,
            self.victim,
            self.rejoin_ms,
            if self.rebuilt {
                " (its server rebuilt from the log)"
            } else {
                ""
            }
        )?;
        if let Some(term) = self.re_elected {
            write!(
                f,
                "; it was then elected again in term {term} (a leader change under the catch-up load, issue 15)"
            )?;
        }
        Ok(())
    }
}

fn count_in_log(log: &Path, what: &str) -> usize {
    std::fs::read_to_string(log).map_or(0, |t| t.matches(what).count())
}

/// The pause phase of an end-to-end check: three pauses of the leader
/// under INCR load (so a replica paused before leads again at least once),
/// then every replica equal and every counter right.
pub fn pause_phase(cluster: &mut AppCluster) -> Result<Vec<String>> {
    let all: Vec<usize> = (0..REPLICAS).collect();
    cluster.wait_ready(&all, Duration::from_secs(30))?;
    let (rejoins, tallies) = pause_under_load(cluster, INCR_CLIENTS, 3)?;
    let mut lines: Vec<String> = rejoins.iter().map(Rejoin::to_string).collect();
    lines.push(format!("after the pauses: {}", cluster.compare(&all)?));
    check_counters(cluster, &all, &tallies)?;
    let acked: u64 = tallies.iter().map(|t| t.acked).sum();
    lines.push(format!(
        "{acked} acknowledged INCRs from {INCR_CLIENTS} clients: every replica agrees with every client"
    ));
    Ok(lines)
}

/// Reads from `s` until the server closes the connection or `within` passes;
/// `true` if it closed.
fn read_until_closed(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Garbage, a command cut off by a disconnect, the server closing a
/// connection itself, and a value larger than one log entry, all through the
/// leader. Returns a description of what was sent.
fn bad_input(cluster: &AppCluster) -> Result<String> {
    let l = cluster.leader().context("no leader")?;
    let addr = cluster.apps[l];
    let protocol = cluster.kind.kv_protocol()?;
    // Garbage: printable noise and binary bytes on one connection, starting
    // with a letter (a leading 0x80 would select memcached's binary protocol).
    let mut rng = XorShift::new(42);
    let mut garbage = b"xyzzy ".to_vec();
    garbage.extend((0..4096).map(|i| {
        if i % 97 == 96 {
            b'\n'
        } else {
            rng.below(256) as u8
        }
    }));
    garbage.extend_from_slice(b"\r\n");
    let mut s = TcpStream::connect(addr)?;
    s.write_all(&garbage)?;
    read_until_closed(&mut s, Duration::from_millis(500));
    drop(s);
    // A command cut off by the client's disconnect.
    let partial: &[u8] = match protocol {
        Protocol::Resp => b"*3\r\n$3\r\nSET\r\n$7\r\npartial\r\n$10\r\nabc",
        Protocol::Memcached => b"set partial 0 0 10\r\nabc",
    };
    let mut s = TcpStream::connect(addr)?;
    s.write_all(partial)?;
    thread::sleep(Duration::from_millis(50));
    drop(s);
    // The server closes the connection itself.
    let quit: &[u8] = match protocol {
        Protocol::Resp => b"*1\r\n$4\r\nQUIT\r\n",
        Protocol::Memcached => b"quit\r\n",
    };
    let mut s = TcpStream::connect(addr)?;
    s.write_all(quit)?;
    ensure!(
        read_until_closed(&mut s, Duration::from_secs(5)),
        "the server did not close the connection after QUIT"
    );
    drop(s);
    // A 200 KiB value: several log entries for one request.
    let big: Vec<u8> = (0..200 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
    let mut c = AppConn::connect(protocol, addr, Duration::from_secs(2))?;
    c.set("big", &big)?;
    cluster.remember_key("big");
    cluster.remember_key("partial");
    ensure!(
        c.get("big")?.as_deref() == Some(&big[..]),
        "the 200 KiB value did not read back intact from the leader"
    );
    drop(c);
    Ok("4 KiB of garbage, a SET cut off by a disconnect, QUIT (the server closes), a 200 KiB value".into())
}

/// Misconfigured replicas: each must fail with a clear error and leave the
/// cluster alone. Returns the checks made.
fn misconfiguration(cluster: &mut AppCluster, leader: usize) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let follower = (0..REPLICAS)
        .find(|&i| i != leader)
        .expect("three replicas");
    let spare = free_addr()?.port();
    // A replica id the cluster does not have.
    let out = cluster
        .run_command(7, &cluster.config.clone(), spare)?
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("--id 7"),
        "apus run --id 7 should fail naming --id: {} {err}",
        out.status
    );
    done.push(format!("--id 7: {}", err.trim()));
    // A config with an invalid field.
    let bad = cluster.dir.join("bad-transport.toml");
    let text: String = std::fs::read_to_string(&cluster.config)?
        .lines()
        .map(|l| {
            if l.starts_with("transport = ") {
                "transport = \"carrier-pigeon\"\n".to_string()
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&bad, text)?;
    let out = cluster.run_command(0, &bad, spare)?.output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("cluster.transport"),
        "an invalid transport should be refused naming cluster.transport: {} {err}",
        out.status
    );
    done.push(format!("invalid transport: {}", err.trim()));
    // The library itself, without `apus run`'s checks: a server preloaded
    // with an id the config lacks must stop as the library loads.
    let lib = cluster.bins.apus.with_file_name("libapus_intercept.so");
    let preloaded = |id: &str| {
        tools::own(&cluster.bins.resp_kv)
            .args(["--port", &spare.to_string()])
            .env("LD_PRELOAD", &lib)
            .env("APUS_CONFIG", &cluster.config)
            .env("APUS_ID", id)
            .stdin(Stdio::null())
            .output()
    };
    let out = preloaded("9")?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(78)
            && err.contains("refusing to run the server unreplicated")
            && !String::from_utf8_lossy(&out.stdout).contains("listening"),
        "a preloaded server with APUS_ID=9 should stop at once with status 78: {} {err}",
        out.status
    );
    done.push(format!("preloaded with APUS_ID=9: {}", err.trim()));
    // Preloaded by hand, with a good id but no `apus run` to supervise it.
    let out = preloaded("0")?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(78) && err.contains("only under `apus run`"),
        "a server preloaded without `apus run` should stop at once with status 78: {} {err}",
        out.status
    );
    done.push(format!("preloaded without apus run: {}", err.trim()));
    // A second process claiming a running replica's id: its app port is free
    // but its replication address is taken. The library must stop it before
    // it serves anyone rather than let it run unreplicated.
    let dup = cluster.dir.join("duplicate.toml");
    let text = std::fs::read_to_string(&cluster.config)?.replace(
        &format!("app = \"{}\"", cluster.apps[follower]),
        &format!("app = \"127.0.0.1:{spare}\""),
    );
    std::fs::write(&dup, text)?;
    let mut child = cluster
        .run_command(follower, &dup, spare)?
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("a duplicate replica n{follower} kept running");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .context("stderr")?
        .read_to_string(&mut err)?;
    // The library refuses, or `apus run` reports the library's failure to
    // start its node first (the two race to say it): either way it stopped.
    ensure!(
        !status.success()
            && (err.contains("refusing to run the server unreplicated")
                || err.contains("the server was stopped (it must not run unreplicated)")),
        "a duplicate replica should be stopped by the library: {status} {err}"
    );
    done.push(format!(
        "duplicate n{follower}: {}",
        err.lines()
            .find(|l| l.contains("refusing"))
            .unwrap_or_default()
            .trim()
    ));
    // A follower restarted with the wrong secret cannot join; the others
    // go on committing without it.
    let wrong = cluster.dir.join("wrong-secret.toml");
    let text = std::fs::read_to_string(&cluster.config)?
        .replace("secret = \"", "secret = \"not the cluster's ");
    std::fs::write(&wrong, text)?;
    cluster.kill(follower)?;
    cluster.start_with(follower, Some(&wrong))?;
    thread::sleep(Duration::from_millis(500));
    let before = cluster
        .replica_status(leader)
        .context("leader gone")?
        .commit;
    let mut c = cluster.leader_conn()?;
    for n in 0..100 {
        c.set("during-wrong-secret", n.to_string().as_bytes())?;
    }
    cluster.remember_key("during-wrong-secret");
    drop(c);
    let st = cluster.replica_status(follower);
    let leader_st = cluster.replica_status(leader).context("leader gone")?;
    ensure!(
        leader_st.commit >= before + 100,
        "the cluster stopped committing while n{follower} had the wrong secret"
    );
    ensure!(
        st.as_ref()
            .is_none_or(|s| s.applied < leader_st.commit && s.role != Role::Leader),
        "n{follower} with the wrong secret followed the cluster: {st:?}"
    );
    let leader_log = std::fs::read_to_string(cluster.dir.join(format!("n{leader}.log")))?;
    ensure!(
        leader_log.contains("refused"),
        "the leader did not log the refused connection"
    );
    done.push(format!(
        "n{follower} with a wrong secret: refused (leader's log says so), 100 writes committed without it"
    ));
    cluster.kill(follower)?;
    cluster.restart_empty(follower)?;
    Ok(done)
}

/// Whether a socket other than one in TIME_WAIT holds local port `port`.
fn port_held(port: u16) -> bool {
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|text| {
        text.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local = f.get(1).and_then(|a| a.rsplit_once(':'));
            local.is_some_and(|(_, p)| u16::from_str_radix(p, 16) == Ok(port))
                && f.get(3).is_some_and(|st| *st != "06")
        })
    })
}

/// Local ports of established loopback connections to `port` (the client
/// sides, as `/proc/net/tcp` lists them).
fn clients_of(port: u16) -> Vec<u16> {
    let Ok(text) = std::fs::read_to_string("/proc/net/tcp") else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, remote, state) = (f.get(1)?, f.get(2)?, f.get(3)?);
            let rport = u16::from_str_radix(remote.rsplit_once(':')?.1, 16).ok()?;
            let (lip, lport) = local.rsplit_once(':')?;
            (*state == "01" && rport == port && lip == "0100007F")
                .then(|| u16::from_str_radix(lport, 16).ok())?
        })
        .collect()
}

/// A TCP connection to `to` from 127.0.0.1:`port` (SO_REUSEADDR, so a port
/// whose last connection is in TIME_WAIT can be bound again).
fn connect_from(port: u16, to: SocketAddr) -> Result<TcpStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor we own; results checked.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(ip.octets()),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let local = sin(std::net::Ipv4Addr::LOCALHOST, port);
        ensure!(
            libc::bind(fd, (&raw const local).cast(), len) == 0,
            "bind 127.0.0.1:{port}: {}",
            std::io::Error::last_os_error()
        );
        let SocketAddr::V4(to) = to else {
            bail!("IPv4 only")
        };
        let remote = sin(*to.ip(), to.port());
        ensure!(
            libc::connect(fd, (&raw const remote).cast(), len) == 0,
            "connect to {to}: {}",
            std::io::Error::last_os_error()
        );
        Ok(stream)
    }
}

/// A client that binds the port one of a follower's replay connections
/// used (once the replay has ended) is a client like any other: the
/// follower, which refuses clients here, must refuse it. (Replay
/// connections were once recognised by port alone, and entries were never
/// removed: such a client was served unreplicated.)
fn old_replay_port(cluster: &mut AppCluster, leader: usize) -> Result<String> {
    let all: Vec<usize> = (0..REPLICAS).collect();
    let f = (0..REPLICAS)
        .find(|&i| i != leader)
        .expect("three replicas");
    let refusing = cluster.dir.join("refusing.toml");
    let text = std::fs::read_to_string(&cluster.config)?.replace(
        "follower_clients = \"serve\"",
        "follower_clients = \"refuse\"",
    );
    std::fs::write(&refusing, text)?;
    cluster.kill(f)?;
    let dir = cluster.server_dir(f);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    cluster.start_with(f, Some(&refusing))?;
    cluster.wait_converged(&all, Duration::from_secs(60))?;
    let mut c = RespConn::connect(cluster.apps[leader], Duration::from_secs(2))?;
    c.call(&[b"SET", b"replay-port-probe", b"1"])?;
    cluster.remember_key("replay-port-probe");
    let deadline = Instant::now() + Duration::from_secs(10);
    let port = loop {
        if let Some(&p) = clients_of(cluster.apps[f].port()).first() {
            break p;
        }
        ensure!(
            Instant::now() < deadline,
            "n{f} opened no replay connection for a client of the leader"
        );
        thread::sleep(Duration::from_millis(10));
    };
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(10);
    while port_held(port) {
        ensure!(
            Instant::now() < deadline,
            "n{f}'s replay connection from port {port} did not end"
        );
        thread::sleep(Duration::from_millis(10));
    }
    let mut s = connect_from(port, cluster.apps[f])?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let _ = s.write_all(b"*1\r\n$4\r\nPING\r\n");
    let mut buf = [0u8; 64];
    let served = matches!(s.read(&mut buf), Ok(n) if n > 0);
    ensure!(
        !served,
        "n{f} served a client from 127.0.0.1:{port}, a port its replay used before, unreplicated"
    );
    cluster.kill(f)?;
    cluster.restart_empty(f)?;
    Ok(format!(
        "a client from 127.0.0.1:{port} (n{f}'s replay connection used it before) was refused by n{f}"
    ))
}

pub(crate) struct Options {
    server: ServerKind,
    requests: u64,
    /// `tcp`, or `fabric/<provider>`.
    transport: String,
}

impl Options {
    /// The `[cluster]` lines that choose the transport.
    pub(crate) fn transport_config(&self) -> String {
        match self.transport.strip_prefix("fabric/") {
            None => "transport = \"tcp\"\n".into(),
            Some(p) => {
                let domain = if p.starts_with("tcp") {
                    "domain = \"lo\"\n"
                } else {
                    ""
                };
                format!("transport = \"fabric\"\nprovider = \"{p}\"\n{domain}")
            }
        }
    }
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        server: ServerKind::RespKv,
        requests: 100_000,
        transport: "tcp".into(),
    };
    let mut server = None;
    let mut transport = "tcp".to_string();
    let mut provider = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--server" => server = Some(ServerKind::parse(value()?)?),
            "--transport" => {
                transport = value()?.clone();
                ensure!(
                    transport == "tcp" || transport == "fabric",
                    "--transport {transport:?}: the end-to-end check runs over tcp or fabric"
                );
            }
            "--provider" => provider = Some(value()?.clone()),
            "--requests" => {
                o.requests = value()?.parse().context("--requests expects a number")?;
                ensure!(o.requests >= 1000, "--requests must be at least 1000");
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    o.server = server.context("--server redis|memcached|resp-kv is required")?;
    o.transport = match (transport.as_str(), provider) {
        ("fabric", p) => format!("fabric/{}", p.unwrap_or_else(|| "tcp;ofi_rxm".into())),
        (_, Some(_)) => bail!("--provider applies to --transport fabric only"),
        (t, None) => t.to_string(),
    };
    Ok(o)
}

fn print_loads(rows: &[(LoadFigures, LoadFigures)]) {
    println!(
        "  {:<8} {:>12} {:>9} {:>9} | {:>12} {:>9} {:>9} | {:>7} {:>12}",
        "load",
        "bare req/s",
        "p50 ms",
        "p99 ms",
        "3x req/s",
        "p50 ms",
        "p99 ms",
        "ratio",
        "cost/req us"
    );
    for (b, r) in rows {
        println!(
            "  {:<8} {:>12.0} {:>9.3} {:>9.3} | {:>12.0} {:>9.3} {:>9.3} | {:>6.1}x {:>12.1}",
            b.label,
            b.rps,
            b.p50_ms,
            b.p99_ms,
            r.rps,
            r.p50_ms,
            r.p99_ms,
            b.rps / r.rps,
            1e6 / r.rps - 1e6 / b.rps
        );
    }
}

/// Averages of several loads: total throughput as requests over time, and
/// the mean of the percentiles.
fn overall(rows: &[LoadFigures]) -> LoadFigures {
    let n = rows.len() as f64;
    LoadFigures {
        label: "all".into(),
        rps: n / rows.iter().map(|r| 1.0 / r.rps).sum::<f64>(),
        p50_ms: rows.iter().map(|r| r.p50_ms).sum::<f64>() / n,
        p99_ms: rows.iter().map(|r| r.p99_ms).sum::<f64>() / n,
    }
}

pub fn run_e2e(args: &[String]) -> Result<ExitCode> {
    let o = parse(args)?;
    let kind = o.server;
    match kind {
        ServerKind::Postgres => return flow::run(&o, &postgres::Pgbench),
        ServerKind::Slapd => return flow::run(&o, &ldap::Ldap),
        ServerKind::Nginx => return flow::run(&o, &nginx::Http),
        ServerKind::Mariadb => return flow::run(&o, &mariadb::Sysbench),
        _ => {}
    }
    let name = format!("e2e {}", kind.name());
    kind.ensure_installed()?;
    if o.transport.starts_with("fabric") {
        tools::ensure_library("libfabric.so.1")?;
    }
    let bins = build_release()?;
    let started = Instant::now();
    println!(
        "{name}: 3 replicas under `apus run` on 127.0.0.1, {} transport, memory durability, {} CPUs",
        o.transport,
        thread::available_parallelism().map_or(1, |n| n.get())
    );
    // The same load for the bare server and the replicated leader.
    let load = |addr: SocketAddr| -> Result<Vec<LoadFigures>> {
        match kind {
            ServerKind::Redis => redis_benchmark(addr, o.requests),
            _ => Ok(vec![mixed_load(
                "set/get",
                kind.kv_protocol()?,
                addr,
                MIXED_CONNS,
                o.requests / MIXED_CONNS as u64 / 5,
            )?]),
        }
    };
    // The baseline: the same server alone.
    let bare_dir =
        target_dir()
            .join("e2e")
            .join(format!("{}-bare-{}", kind.name(), std::process::id()));
    let bare_rows = {
        let bare = BareServer::start(kind, &bins, &bare_dir)?;
        let rows = load(bare.addr)?;
        drop(bare);
        let _ = std::fs::remove_dir_all(&bare_dir);
        rows
    };
    let mut cluster = AppCluster::with_transport(kind, bins, "e2e", &o.transport_config())?;
    for i in 0..REPLICAS {
        cluster.start(i)?;
    }
    let all: Vec<usize> = (0..REPLICAS).collect();
    let leader = cluster.wait_ready(&all, Duration::from_secs(30))?;
    // A new leader turns clients away until it has taken over.
    cluster.wait_serving(leader, Duration::from_secs(30))?;
    println!("  n{leader} leads; apps {:?}", cluster.apps);
    for k in 0..MIXED_KEYS {
        cluster.remember_key(&format!("k{k}"));
    }
    let repl_rows = load(cluster.apps[leader])?;
    let rows: Vec<(LoadFigures, LoadFigures)> = bare_rows
        .iter()
        .cloned()
        .zip(repl_rows.iter().cloned())
        .collect();
    match kind {
        ServerKind::Redis => println!(
            "  redis-benchmark -t set,get,incr,lpush -n {} -c 50 -r 10000, bare server vs through the leader:",
            o.requests
        ),
        _ => println!(
            "  mixed set/get, {MIXED_CONNS} connections, {} requests, bare server vs through the leader:",
            o.requests / 5 / MIXED_CONNS as u64 * MIXED_CONNS as u64
        ),
    }
    print_loads(&rows);
    println!("  after the load: {}", cluster.compare(&all)?);
    if kind == ServerKind::Redis {
        let l = cluster.leader().context("no leader")?;
        let mut c = RespConn::connect(cluster.apps[l], Duration::from_secs(2))?;
        let reply = c.call(&[b"BGSAVE"])?;
        ensure!(
            matches!(&reply, Resp::Simple(s) if s.contains("Background saving started")),
            "BGSAVE on the leader: {reply:?}"
        );
        drop(c);
        let rdb = cluster.server_dir(l).join("dump.rdb");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let head = std::fs::read(&rdb).ok().filter(|b| b.len() > 9);
            if head.as_ref().is_some_and(|b| b.starts_with(b"REDIS")) {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "BGSAVE wrote no {}",
                rdb.display()
            );
            thread::sleep(Duration::from_millis(50));
        }
        let out = tools::command("redis-check-rdb")?
            .arg(&rdb)
            .output()
            .context("running redis-check-rdb")?;
        ensure!(
            out.status.success(),
            "redis-check-rdb rejects the leader's snapshot: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let checked = ", redis-check-rdb OK";
        println!(
            "  BGSAVE on the leader n{l}: forked child wrote {} ({} bytes{checked})",
            rdb.display(),
            std::fs::metadata(&rdb)?.len()
        );
        println!("  after BGSAVE: {}", cluster.compare(&all)?);
    }
    let sent = bad_input(&cluster)?;
    println!("  bad input through the leader: {sent}");
    println!("  after bad input: {}", cluster.compare(&all)?);
    if kind == ServerKind::RespKv {
        let leader = cluster.wait_ready(&all, Duration::from_secs(10))?;
        for line in misconfiguration(&mut cluster, leader)? {
            println!("  misconfiguration: {line}");
        }
        println!(
            "  after the misconfigured replicas: {}",
            cluster.compare(&all)?
        );
        let leader = cluster.wait_ready(&all, Duration::from_secs(10))?;
        println!("  replay port: {}", old_replay_port(&mut cluster, leader)?);
    }
    for line in pause_phase(&mut cluster)? {
        println!("  pause: {line}");
    }
    let f = failover_under_load(
        &mut cluster,
        INCR_CLIENTS,
        false,
        Duration::from_millis(1500),
        Duration::from_millis(1000),
        |_, _, _| {},
    )?;
    let survivors: Vec<usize> = all.iter().copied().filter(|&i| i != f.victim).collect();
    let summary = cluster.compare(&survivors)?;
    check_counters(&cluster, &survivors, &f.tallies)?;
    let acked: u64 = f.tallies.iter().map(|t| t.acked).sum();
    let extra: u64 = f.tallies.iter().map(|t| t.applied_unacked).sum();
    let unknown: u64 = f.tallies.iter().map(|t| t.unknown).sum();
    let counted: i64 = f.tallies.iter().map(|t| t.last).sum();
    println!(
        "  SIGKILL of the leader n{} under INCR load from {INCR_CLIENTS} clients: n{} elected {:.1} ms later, \
         clients answered again {:.1} ms after the kill",
        f.victim, f.new_leader, f.election_ms, f.first_ack_ms
    );
    println!(
        "  counters: {counted} in total = {acked} acknowledged INCRs + {extra} applied whose reply died with the leader \
         (of {unknown} with unknown outcome); every survivor agrees with every client"
    );
    println!("  survivors: {summary}");
    cluster.restart_empty(f.victim)?;
    cluster.wait_ready(&all, Duration::from_secs(30))?;
    let replayed_in = Instant::now();
    let after = cluster.compare(&all)?;
    check_counters(&cluster, &all, &f.tallies)?;
    println!(
        "  n{} restarted with an empty server and rebuilt it from the log in {:.1} s: {after}",
        f.victim,
        replayed_in.elapsed().as_secs_f64()
    );
    cluster.finish();
    let (b, r) = (overall(&bare_rows), overall(&repl_rows));
    println!("  ({:.0} s in all)", started.elapsed().as_secs_f64());
    println!(
        "{name}: PASS: bare {:.0} req/s p50 {:.3} ms p99 {:.3} ms; 3 replicas {:.0} req/s p50 {:.3} ms p99 {:.3} ms \
         ({:.1}x, +{:.1} us per request); failover {:.0} ms",
        b.rps,
        b.p50_ms,
        b.p99_ms,
        r.rps,
        r.p50_ms,
        r.p99_ms,
        b.rps / r.rps,
        1e6 / r.rps - 1e6 / b.rps,
        f.first_ack_ms
    );
    Ok(ExitCode::SUCCESS)
}
