//! `cargo xtask cluster-test`: three `apus node` processes on 127.0.0.1
//! under load from concurrent proposers; the leader is SIGKILLed mid-run, a
//! new one takes over, the killed node restarts and catches up; then every
//! acknowledged proposal must be applied on every replica, in the same order.
//! With `--durability durable` the whole cluster is also SIGKILLed and
//! restarted, and nothing acknowledged may be missing afterwards.
//!
//! With `--transport fabric --provider P` (libfabric: `shm`, `tcp;ofi_rxm`, `tcp`)
//! the same checks run over RMA, and a deposed leader comes back: the leader
//! is paused (SIGSTOP) under load until the others elect a new one, then
//! resumed; the followers must have revoked its ring registration, and
//! every acknowledged proposal must still be applied identically.
//!
//! `--transport verbs` does the same over raw RDMA verbs (a host with an
//! RDMA device; `cargo xtask softroce` runs it inside its Soft-RoCE guest),
//! where the followers revoke the deposed leader's queue-pair access.
//! `--transport auto` lets the replicas choose; `--expect-transport T`
//! checks that every replica settled on `T`. `--apus-bin PATH` runs a
//! prebuilt `apus` instead of building one (the guest has no cargo).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use apus::client::{Client, RemoteStatus, Reply, Request};
use apus::config::TransportKind;
use apus_core::Role;
use hdrhistogram::Histogram;

use crate::e2e::{find_leader, latency_histogram, status_at};

pub(crate) const REPLICAS: usize = 3;
const PAYLOAD_FILLER: usize = 24;
/// The engine's log ring in this test: small enough that a follower that
/// pinned it would stop commits within a second.
pub(crate) const RING_CAPACITY: usize = 1 << 20;
/// About what one proposal takes in the ring (header, id, filler, trailer).
const ENTRY_BYTES: usize = 128;

/// Command-line options.
#[derive(Clone, Debug)]
pub struct Options {
    transport: String,
    provider: Option<String>,
    durability: String,
    fsync: Option<String>,
    proposals: u64,
    proposers: usize,
    poll: String,
    expect_transport: Option<String>,
    apus_bin: Option<PathBuf>,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            transport: String::new(),
            provider: None,
            durability: "memory".into(),
            fsync: None,
            proposals: 100_000,
            proposers: 8,
            poll: "park".into(),
            expect_transport: None,
            apus_bin: None,
        };
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let mut value = || {
                it.next()
                    .cloned()
                    .with_context(|| format!("{flag} needs a value"))
            };
            match flag.as_str() {
                "--transport" => o.transport = value()?,
                "--provider" => o.provider = Some(value()?),
                "--durability" => o.durability = value()?,
                "--fsync" => o.fsync = Some(value()?),
                "--poll" => o.poll = value()?,
                "--expect-transport" => o.expect_transport = Some(value()?),
                "--apus-bin" => o.apus_bin = Some(PathBuf::from(value()?)),
                "--proposals" => {
                    o.proposals = value()?.parse().context("--proposals expects a number")?
                }
                "--proposers" => {
                    o.proposers = value()?.parse().context("--proposers expects a number")?
                }
                other => bail!("unknown argument {other:?}"),
            }
        }
        match o.transport.as_str() {
            "tcp" | "quic" | "verbs" => {
                if o.provider.is_some() {
                    bail!("--provider applies to --transport fabric (and auto) only");
                }
            }
            "fabric" => {
                if o.provider.is_none() {
                    bail!("--transport fabric needs --provider (shm, tcp;ofi_rxm, tcp)");
                }
            }
            "auto" => {}
            "" => bail!("--transport is required (tcp, quic, fabric, verbs or auto)"),
            t => bail!("--transport {t:?}: cluster-test knows tcp, quic, fabric, verbs and auto"),
        }
        if o.expect_transport.is_some() && o.transport != "auto" {
            bail!("--expect-transport applies to --transport auto only");
        }
        if !matches!(o.durability.as_str(), "memory" | "durable") {
            bail!("--durability must be memory or durable");
        }
        if o.fsync.is_some() && o.durability != "durable" {
            bail!("--fsync applies to --durability durable only");
        }
        if o.proposers == 0 || o.proposals < 100 {
            bail!("need at least one proposer and 100 proposals");
        }
        Ok(o)
    }
}

/// Three `apus node` processes on one config (cluster-test, the failover
/// bench).
pub(crate) struct Cluster {
    pub(crate) bin: PathBuf,
    pub(crate) dir: PathBuf,
    pub(crate) config: PathBuf,
    pub(crate) clients: Vec<SocketAddr>,
    pub(crate) children: Vec<Option<Child>>,
    /// The network namespace each replica runs in (`cargo xtask chaos`);
    /// empty: this one.
    pub(crate) netns: Vec<String>,
}

impl Cluster {
    /// Replicas of `config` (none started yet), run in `netns` (one per
    /// replica) or, empty, here.
    pub(crate) fn new(
        bin: &Path,
        dir: &Path,
        config: PathBuf,
        clients: &[SocketAddr],
        netns: Vec<String>,
    ) -> Cluster {
        assert!(netns.is_empty() || netns.len() == clients.len());
        Cluster {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            config,
            clients: clients.to_vec(),
            children: clients.iter().map(|_| None).collect(),
            netns,
        }
    }

    pub(crate) fn start(&mut self, i: usize) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("n{i}.log")))?;
        let mut cmd = match self.netns.get(i) {
            Some(ns) => {
                let mut c = crate::tools::command("ip")?;
                c.args(["netns", "exec", ns]).arg(&self.bin);
                c
            }
            None => crate::tools::own(&self.bin),
        };
        let child = cmd
            .args(["node", "--config"])
            .arg(&self.config)
            .args(["--id", &i.to_string()])
            .env("RUST_LOG", "info")
            // Anything a node leaves in its working directory (libfabric
            // writes crash backtraces there) stays with the test's logs.
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.children[i] = Some(child);
        Ok(())
    }

    /// Runs the `apus` CLI on the cluster's config: `(succeeded, output)`.
    fn cli(&self, args: &[&str]) -> Result<(bool, String)> {
        let out = crate::tools::own(&self.bin)
            .arg(args[0])
            .arg("--config")
            .arg(&self.config)
            .args(&args[1..])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} {}", self.bin.display(), args[0]))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((out.status.success(), text))
    }

    /// Runs `apus fence-check` as replica `i` (which must be down); fails
    /// unless every peer refused its log write. Returns the per-peer lines.
    fn fence_check(&self, i: usize) -> Result<Vec<String>> {
        let (ok, text) = self.cli(&["fence-check", "--id", &i.to_string()])?;
        if !ok {
            bail!("fence-check as n{i} failed:\n{text}");
        }
        Ok(text
            .lines()
            .filter(|l| !l.contains("PASS"))
            .map(str::to_string)
            .collect())
    }

    pub(crate) fn pid(&self, i: usize) -> Option<i32> {
        self.children[i].as_ref().map(|c| c.id() as i32)
    }

    pub(crate) fn kill(&mut self, i: usize) -> Result<()> {
        if let Some(mut c) = self.children[i].take() {
            c.kill()?; // SIGKILL
            c.wait()?;
        }
        Ok(())
    }

    pub(crate) fn status(&self, i: usize) -> Option<RemoteStatus> {
        status_at(self.clients[i])
    }

    /// Polls replica `i` until its status satisfies `done` or `within`
    /// passes; then the last status it gave, if any.
    fn wait_status(
        &self,
        i: usize,
        within: Duration,
        done: impl Fn(&RemoteStatus) -> bool,
    ) -> Option<RemoteStatus> {
        let deadline = Instant::now() + within;
        let mut last = None;
        loop {
            if let Some(s) = self.status(i) {
                if done(&s) {
                    return Some(s);
                }
                last = Some(s);
            }
            if Instant::now() > deadline {
                return last;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn leader(&self) -> Option<usize> {
        find_leader(&self.clients)
    }

    pub(crate) fn wait_for_leader(&self, within: Duration) -> Result<(usize, Instant)> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.leader() {
                return Ok((l, Instant::now()));
            }
            if Instant::now() > deadline {
                bail!(
                    "no leader within {within:?}; logs in {}",
                    self.dir.display()
                );
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn dump(&self, i: usize) -> Result<Vec<u64>> {
        let mut c = Client::connect(self.clients[i], Duration::from_secs(2))?;
        match c.call(&Request::Dump)? {
            Reply::Ids(ids) => Ok(ids),
            other => bail!("n{i} answered DUMP with {other:?}"),
        }
    }

    /// Waits until every replica has applied the same, settled commit index.
    fn wait_converged(&self, within: Duration) -> Result<Vec<RemoteStatus>> {
        let deadline = Instant::now() + within;
        let mut last: Option<Vec<RemoteStatus>> = None;
        loop {
            let st: Vec<Option<RemoteStatus>> = (0..REPLICAS).map(|i| self.status(i)).collect();
            if st.iter().all(Option::is_some) {
                let st: Vec<RemoteStatus> = st.into_iter().flatten().collect();
                let settled = st
                    .iter()
                    .all(|s| s.applied == st[0].commit && s.commit == st[0].commit)
                    && st.iter().filter(|s| s.role == Role::Leader).count() == 1;
                if settled && last.as_ref().is_some_and(|l| l == &st) {
                    return Ok(st);
                }
                last = Some(st);
            }
            if Instant::now() > deadline {
                bail!(
                    "replicas did not converge within {within:?}: {last:?}; logs in {}",
                    self.dir.display()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every replica applied the same sequence and it holds every acked id.
    pub(crate) fn verify(&self, acked: &[u64]) -> Result<(u64, u64)> {
        let st = self.wait_converged(Duration::from_secs(120))?;
        let dumps: Vec<Vec<u64>> = (0..REPLICAS).map(|i| self.dump(i)).collect::<Result<_>>()?;
        for i in 1..REPLICAS {
            if dumps[i] != dumps[0] || st[i].digest != st[0].digest {
                bail!(
                    "n{i} applied a different sequence than n0 ({} vs {} entries, digests {:016x} vs {:016x})",
                    dumps[i].len(),
                    dumps[0].len(),
                    st[i].digest,
                    st[0].digest
                );
            }
        }
        let applied: HashSet<u64> = dumps[0].iter().copied().collect();
        if applied.len() != dumps[0].len() {
            bail!("an id was applied twice");
        }
        let missing: Vec<u64> = acked
            .iter()
            .copied()
            .filter(|id| !applied.contains(id))
            .take(5)
            .collect();
        if !missing.is_empty() {
            bail!("acknowledged proposals are missing, e.g. {missing:?}");
        }
        Ok((st[0].commit, st[0].digest))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Writes `dir/cluster.toml` for `apus node` processes: `cluster` (the
/// `[cluster]` table, without TLS lines) and `engine` (the `[engine]`
/// table), then `replicas` `[[replica]]` tables on free loopback ports; for
/// QUIC also the CA line, each replica's certificate paths, and the
/// certificates themselves (`apus certs`). Returns the config's path and
/// each replica's client address.
pub fn write_config(
    bin: &Path,
    dir: &Path,
    cluster: &str,
    engine: &str,
    replicas: usize,
    quic: bool,
) -> Result<(PathBuf, Vec<SocketAddr>)> {
    let mut cfg = cluster.to_string();
    if quic {
        cfg += "tls_ca = \"certs/ca.pem\"\n";
    }
    cfg += engine;
    let mut clients = Vec::new();
    let mut pool = crate::e2e::PortPool::default();
    for i in 0..replicas {
        let client = pool.tcp()?;
        clients.push(client);
        let address = if quic { pool.udp()? } else { pool.tcp()? };
        cfg += &format!(
            "[[replica]]\nid = {i}\naddress = \"{address}\"\nclient = \"{client}\"\ndata_dir = \"n{i}\"\n"
        );
        if quic {
            cfg += &format!("tls_cert = \"certs/n{i}.pem\"\ntls_key = \"certs/n{i}.key\"\n");
        }
    }
    let config = std::path::absolute(dir.join("cluster.toml"))?;
    std::fs::write(&config, cfg)?;
    // Ports stay held until the config names them all.
    drop(pool);
    if quic {
        let out = crate::tools::own(bin)
            .args(["certs", "--config"])
            .arg(&config)
            .output()?;
        if !out.status.success() {
            bail!(
                "apus certs failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok((config, clients))
}

/// The plain loopback round trip: 64 bytes there and back over blocking TCP.
fn loopback_rtt() -> Result<(f64, f64)> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let server = thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 64];
        while s.read_exact(&mut b).is_ok() {
            s.write_all(&b)?;
        }
        Ok(())
    });
    let mut c = TcpStream::connect(addr)?;
    c.set_nodelay(true)?;
    let mut h = latency_histogram();
    let mut b = [7u8; 64];
    for i in 0..5000 {
        let t = Instant::now();
        c.write_all(&b)?;
        c.read_exact(&mut b)?;
        if i >= 500 {
            h.record(t.elapsed().as_nanos() as u64)?;
        }
    }
    drop(c);
    let _ = server.join();
    Ok((us(h.value_at_quantile(0.5)), us(h.value_at_quantile(0.99))))
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

/// Proposers' shared state and what they saw.
pub(crate) struct Load {
    pub(crate) next_id: AtomicU64,
    pub(crate) acked: Mutex<Vec<u64>>,
    pub(crate) acked_count: AtomicU64,
    /// Acknowledgements whose log index was not above the same proposer's
    /// previous one: the log went back (must stay 0).
    pub(crate) regressions: AtomicU64,
    target: u64,
    before_kill: Mutex<Histogram<u64>>,
    killed_at: Mutex<Option<Instant>>,
    first_ack_after_kill: Mutex<Option<Instant>>,
    leader_hint: AtomicUsize,
    pub(crate) stop: AtomicBool,
    failed: AtomicU64,
}

impl Load {
    /// A load of `target` acknowledgements, ids from `next_id`, sent first
    /// to replica `leader`.
    pub(crate) fn new(next_id: u64, target: u64, leader: usize) -> Arc<Load> {
        Arc::new(Load {
            next_id: AtomicU64::new(next_id),
            acked: Mutex::new(Vec::new()),
            acked_count: AtomicU64::new(0),
            regressions: AtomicU64::new(0),
            target,
            before_kill: Mutex::new(latency_histogram()),
            killed_at: Mutex::new(None),
            first_ack_after_kill: Mutex::new(None),
            leader_hint: AtomicUsize::new(leader),
            stop: AtomicBool::new(false),
            failed: AtomicU64::new(0),
        })
    }

    /// Runs `proposers` proposer threads against `clients`.
    pub(crate) fn start(
        self: &Arc<Load>,
        proposers: usize,
        clients: &[SocketAddr],
    ) -> Vec<JoinHandle<()>> {
        (0..proposers)
            .map(|_| {
                let (load, clients) = (self.clone(), clients.to_vec());
                thread::spawn(move || proposer(load, clients))
            })
            .collect()
    }
}

/// Stops a follower (SIGSTOP: no FIN, no RST; its kernel keeps taking
/// bytes) under load for longer than the leader's ring lasts, and checks
/// that commits go on: the leader's transport declares it lost at the
/// operation deadline, so it stops pinning the ring. Then resumes it and
/// checks it catches up. Returns the next proposal id.
///
/// The check needs one leader throughout: where commits stopped and the
/// term changed meanwhile (a starved Soft-RoCE guest elected twice in the
/// window), the premise did not hold, and the phase runs once more.
fn follower_stops(
    cluster: &mut Cluster,
    clients: &[SocketAddr],
    next_id: u64,
    acked_so_far: &mut Vec<u64>,
    proposers: usize,
) -> Result<u64> {
    let mut next_id = next_id;
    for attempt in 0..2 {
        let (next, stop) = stop_a_follower(cluster, clients, next_id, acked_so_far, proposers)?;
        next_id = next;
        match stop {
            Stop::CommitsWentOn => {
                let (commits, _) = cluster.verify(acked_so_far)?;
                println!(
                    "  the follower resumed and caught up: {commits} entries identical on every replica"
                );
                return Ok(next_id);
            }
            Stop::Stalled {
                follower,
                term_changed: true,
            } if attempt == 0 => {
                println!(
                    "  the term changed while n{follower} was stopped (leaders changed): no verdict \
                     on the ring; once more"
                );
                cluster.wait_for_leader(Duration::from_secs(20))?;
            }
            Stop::Stalled {
                follower,
                term_changed,
            } => bail!(
                "commits stopped while follower n{follower} was stopped{}: the silent follower \
                 pins the leader's ring; logs in {}",
                if term_changed {
                    " (and the term changed)"
                } else {
                    ""
                },
                cluster.dir.display()
            ),
        }
    }
    unreachable!("the second attempt returns or fails")
}

/// What one stopped follower showed.
enum Stop {
    CommitsWentOn,
    Stalled { follower: usize, term_changed: bool },
}

fn stop_a_follower(
    cluster: &mut Cluster,
    clients: &[SocketAddr],
    next_id: u64,
    acked_so_far: &mut Vec<u64>,
    proposers: usize,
) -> Result<(u64, Stop)> {
    const STOPPED_FOR: Duration = Duration::from_secs(3);
    let leader = cluster.leader().context("no leader")?;
    let term = cluster.status(leader).map(|s| s.term);
    let follower = (leader + 1) % REPLICAS;
    let load = Load::new(next_id, u64::MAX, leader);
    let workers = load.start(proposers, clients);
    while load.acked_count.load(Ordering::SeqCst) < 2000 {
        thread::sleep(Duration::from_millis(2));
    }
    let pid = cluster
        .pid(follower)
        .context("the follower is not running")?;
    crate::e2e::signal(pid, "STOP")?;
    let stopped = Instant::now();
    thread::sleep(STOPPED_FOR / 3);
    let early = load.acked_count.load(Ordering::SeqCst);
    thread::sleep(STOPPED_FOR - stopped.elapsed());
    let late = load.acked_count.load(Ordering::SeqCst) - early;
    let term_after = cluster.status(leader).map(|s| s.term);
    crate::e2e::signal(pid, "CONT")?;
    load.stop.store(true, Ordering::SeqCst);
    for w in workers {
        let _ = w.join();
    }
    println!(
        "  follower n{follower} SIGSTOPped under load for {:.0} s: {late} commits in its last {:.0} s (the leader's ring holds about {} entries)",
        STOPPED_FOR.as_secs_f64(),
        (STOPPED_FOR - STOPPED_FOR / 3).as_secs_f64(),
        RING_CAPACITY / ENTRY_BYTES,
    );
    acked_so_far.extend(load.acked.lock().expect("lock").iter());
    let next = load.next_id.load(Ordering::SeqCst);
    if late > 0 {
        return Ok((next, Stop::CommitsWentOn));
    }
    let term_changed = term.is_none() || term != term_after;
    Ok((
        next,
        Stop::Stalled {
            follower,
            term_changed,
        },
    ))
}

/// Memory mode: the leader and a follower lose their memory together
/// (SIGKILL, restart). The survivor alone cannot be elected and says so,
/// `apus status` tells the operator, nothing commits, and after `apus
/// recover --accept-data-loss` the survivor leads with its log and the
/// cluster commits again. Returns the next proposal id.
fn majority_loses_memory(
    cluster: &mut Cluster,
    clients: &[SocketAddr],
    next_id: u64,
    acked_so_far: &mut Vec<u64>,
    proposers: usize,
) -> Result<u64> {
    let leader = cluster.leader().context("no leader")?;
    let lost = (leader + 1) % REPLICAS;
    let survivor = (leader + 2) % REPLICAS;
    let before = cluster
        .status(survivor)
        .context("the survivor does not answer")?;
    for i in [leader, lost] {
        cluster.kill(i)?;
        cluster.start(i)?;
    }
    for i in [leader, lost] {
        cluster
            .wait_status(i, Duration::from_secs(20), |s| s.recovering)
            .filter(|s| s.recovering)
            .with_context(|| format!("restarted n{i} does not report itself recovering"))?;
    }
    let knows = cluster
        .wait_status(survivor, Duration::from_secs(10), |s| s.voters_lost != 0)
        .filter(|s| s.voters_lost != 0);
    let Some(knows) = knows else {
        bail!(
            "survivor n{survivor} never reported the voters that lost their logs; logs in {}",
            cluster.dir.display()
        );
    };
    let want = (1u32 << leader) | (1 << lost);
    if knows.voters_lost != want {
        bail!(
            "n{survivor} reports lost voters {:#b}, expected {want:#b}",
            knows.voters_lost
        );
    }
    // Dozens of election timeouts: nobody may be elected.
    thread::sleep(Duration::from_secs(1));
    if let Some(l) = cluster.leader() {
        bail!("n{l} was elected although a majority lost its log (memory mode)");
    }
    let (_, status) = cluster.cli(&["status"])?;
    if !status.contains("LOST A MAJORITY'S MEMORY") {
        bail!(
            "`apus status` did not say the cluster lost a majority's memory:
{status}"
        );
    }
    let (refused, why) = cluster.cli(&["recover"])?;
    if refused || !why.contains("--accept-data-loss") {
        bail!(
            "`apus recover` without --accept-data-loss must refuse and say why:
{why}"
        );
    }
    let (ok, out) = cluster.cli(&["recover", "--accept-data-loss"])?;
    if !ok {
        bail!(
            "`apus recover --accept-data-loss` failed:
{out}"
        );
    }
    for line in out.lines() {
        println!("    {line}");
    }
    let (elected, _) = cluster.wait_for_leader(Duration::from_secs(10))?;
    if elected != survivor {
        bail!("n{elected} was elected, not n{survivor}, the replica that kept its log");
    }
    let load = Load::new(next_id, 1000, survivor);
    for w in load.start(proposers, clients) {
        let _ = w.join();
    }
    acked_so_far.extend(load.acked.lock().expect("lock").iter());
    let (commits, _) = cluster.verify(acked_so_far)?;
    println!(
        "  memory mode: n{leader} (leader) and n{lost} lost their memory together; n{survivor} \
         (log {} entries) could not be elected and reported it; `apus status` said so; after \
         `apus recover --accept-data-loss` n{survivor} led again and {commits} entries are \
         identical on every replica",
        before.last_index
    );
    Ok(load.next_id.load(Ordering::SeqCst))
}

fn proposer(load: Arc<Load>, clients: Vec<SocketAddr>) {
    let mut conn: Option<(usize, Client)> = None;
    let mut hist = latency_histogram();
    let mut id = load.next_id.fetch_add(1, Ordering::SeqCst);
    let mut last_index = 0;
    while !load.stop.load(Ordering::SeqCst) && load.acked_count.load(Ordering::SeqCst) < load.target
    {
        let hint = load.leader_hint.load(Ordering::SeqCst) % clients.len();
        if conn.as_ref().is_none_or(|(i, _)| *i != hint) {
            conn = Client::connect(clients[hint], Duration::from_secs(10))
                .ok()
                .map(|c| (hint, c));
            if conn.is_none() {
                load.leader_hint.store(hint + 1, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(2));
                continue;
            }
        }
        let mut payload = id.to_le_bytes().to_vec();
        payload.extend((0..PAYLOAD_FILLER).map(|k| (id as u8).wrapping_add(k as u8)));
        let t = Instant::now();
        let reply = conn
            .as_mut()
            .expect("connected")
            .1
            .call(&Request::Propose(payload));
        match reply {
            Ok(Reply::Applied { index, .. }) => {
                if index <= last_index {
                    load.regressions.fetch_add(1, Ordering::SeqCst);
                }
                last_index = index;
                let killed = load.killed_at.lock().expect("lock").is_some();
                if killed {
                    load.first_ack_after_kill
                        .lock()
                        .expect("lock")
                        .get_or_insert_with(Instant::now);
                } else {
                    let _ = hist.record(t.elapsed().as_nanos() as u64);
                }
                load.acked.lock().expect("lock").push(id);
                load.acked_count.fetch_add(1, Ordering::SeqCst);
                id = load.next_id.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Reply::NotLeader(leader)) => {
                // Never entered a log: the same id may be retried.
                load.leader_hint
                    .store(leader.map_or(hint + 1, |l| l.index()), Ordering::SeqCst);
                if leader.is_none() {
                    thread::sleep(Duration::from_millis(2));
                }
            }
            Ok(_) | Err(_) => {
                // Lost, timed out, or the connection broke: the outcome is
                // unknown, so this id is never reused.
                load.failed.fetch_add(1, Ordering::SeqCst);
                conn = None;
                load.leader_hint.store(hint + 1, Ordering::SeqCst);
                id = load.next_id.fetch_add(1, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(1));
            }
        }
    }
    if let Ok(mut h) = load.before_kill.lock() {
        let _ = h.add(&hist);
    }
}

/// Pauses the leader under load until the others elect a new one, resumes
/// it, and checks that the followers revoked its ring grant and that every
/// acknowledged proposal (of both phases) is applied identically.
fn deposed_leader_returns(
    cluster: &mut Cluster,
    clients: &[SocketAddr],
    next_id: u64,
    acked_so_far: &mut Vec<u64>,
    proposers: usize,
    target: u64,
) -> Result<(u64, u64)> {
    let before: Vec<RemoteStatus> = (0..REPLICAS)
        .map(|i| cluster.status(i).context("a replica does not answer"))
        .collect::<Result<_>>()?;
    let old = cluster.leader().context("no leader")?;
    let old_term = before[old].term;
    let load = Load::new(next_id, target, old);
    let workers = load.start(proposers, clients);
    while load.acked_count.load(Ordering::SeqCst) < target / 10 {
        thread::sleep(Duration::from_millis(2));
    }
    let pid = cluster.pid(old).context("the leader is not running")?;
    crate::e2e::signal(pid, "STOP")?;
    let paused = Instant::now();
    let others: Vec<usize> = (0..REPLICAS).filter(|&i| i != old).collect();
    let new = loop {
        if let Some(&l) = others.iter().find(|&&i| {
            cluster
                .status(i)
                .is_some_and(|s| s.role == Role::Leader && s.term > old_term)
        }) {
            break l;
        }
        if paused.elapsed() > Duration::from_secs(30) {
            crate::e2e::signal(pid, "CONT")?;
            bail!("no new leader while n{old} was paused");
        }
        thread::sleep(Duration::from_millis(1));
    };
    let elected = paused.elapsed();
    // Let the new leader commit on its own for a while, then wake the old.
    thread::sleep(Duration::from_millis(200));
    crate::e2e::signal(pid, "CONT")?;
    for w in workers {
        let _ = w.join();
    }
    acked_so_far.extend(load.acked.lock().expect("lock").iter());
    let (commits, _) = cluster.verify(acked_so_far)?;
    let after: Vec<RemoteStatus> = (0..REPLICAS)
        .map(|i| cluster.status(i).context("a replica does not answer"))
        .collect::<Result<_>>()?;
    let revoked: Vec<u64> = (0..REPLICAS)
        .map(|i| after[i].revocations - before[i].revocations)
        .collect();
    let fenced = after[old].fenced_writes - before[old].fenced_writes;
    println!(
        "  n{old} (leader) paused under load; n{new} elected {:.1} ms later; n{old} resumed 200 ms after that",
        elected.as_secs_f64() * 1e3
    );
    println!(
        "  fencing: ring grants revoked from the deposed leader: {}; its ring writes refused after it resumed: {fenced}",
        others
            .iter()
            .map(|&i| format!("n{i} {}", revoked[i]))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if others.iter().any(|&i| revoked[i] == 0) {
        bail!(
            "a follower never revoked the deposed leader's ring registration ({revoked:?}); logs in {}",
            cluster.dir.display()
        );
    }
    println!(
        "  {} more proposals acknowledged across the pause; {commits} entries identical on every replica",
        load.acked.lock().expect("lock").len()
    );
    Ok((fenced, load.next_id.load(Ordering::SeqCst)))
}

pub fn run_test(args: &[String]) -> Result<ExitCode> {
    let o = Options::parse(args)?;
    let label = match &o.provider {
        Some(p) => format!("{}/{p}", o.transport),
        None => o.transport.clone(),
    };
    let name = format!("cluster-test {label}");
    if o.transport == "fabric" {
        crate::tools::ensure_library("libfabric.so.1")?;
    }
    let bin = match &o.apus_bin {
        Some(b) => b.clone(),
        None => crate::e2e::build_release()?.apus,
    };
    let target = crate::e2e::target_dir();
    let dir = target.join("cluster-test").join(format!(
        "{}-{}-{}",
        label.replace(';', "+").replace('/', "-"),
        o.durability,
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut cfg = format!(
        "[cluster]\nsecret = \"cluster-test secret {}\"\ndurability = \"{}\"\ntransport = \"{}\"\npoll = \"{}\"\n",
        std::process::id(),
        o.durability,
        o.transport,
        o.poll
    );
    if let Some(f) = &o.fsync {
        cfg += &format!("fsync = \"{f}\"\n");
    }
    if let Some(p) = &o.provider {
        cfg += &format!("provider = \"{p}\"\n");
        if p.starts_with("tcp") {
            // The tcp provider's loopback domain: this test stays on lo.
            cfg += "domain = \"lo\"\n";
        }
    }
    if o.transport == "auto" {
        // What auto tries for fabric (tcp;ofi_rxm), kept on loopback.
        cfg += "domain = \"lo\"\n";
    }
    let engine = format!(
        "[engine]\nheartbeat_us = 2000\nelection_timeout_us = 30000\nring_capacity = {RING_CAPACITY}\n"
    );
    let (config, clients) =
        write_config(&bin, &dir, &cfg, &engine, REPLICAS, o.transport == "quic")?;
    let mut cluster = Cluster::new(&bin, &dir, config, &clients, Vec::new());
    println!(
        "{name}: {REPLICAS} replicas on 127.0.0.1, durability {}{}, {} proposals from {} proposers, poll {}",
        o.durability,
        o.fsync
            .as_deref()
            .map(|f| format!(" (fsync {f})"))
            .unwrap_or_default(),
        o.proposals,
        o.proposers,
        o.poll
    );
    let (rtt50, rtt99) = loopback_rtt()?;
    println!(
        "  plain loopback round trip (64 B, blocking TCP): p50 {rtt50:.1} us, p99 {rtt99:.1} us"
    );
    let raw = match &o.provider {
        Some(p) => {
            let (p50, p99) = crate::fabric_rtt::fabric_rtt(p)?;
            println!(
                "  raw fi_write round trip ({p}, 64 B, no consensus): p50 {p50:.1} us, p99 {p99:.1} us"
            );
            Some((p50, p99))
        }
        None => None,
    };
    for i in 0..REPLICAS {
        cluster.start(i)?;
    }
    let (leader, _) = cluster.wait_for_leader(Duration::from_secs(20))?;
    // A replica may still be starting (client port not yet bound) or, under
    // auto, still waiting for an offer when the other two have already
    // elected a leader: wait for each one to report a concrete transport.
    let settled: Vec<String> = (0..REPLICAS)
        .map(|i| {
            cluster
                .wait_status(i, Duration::from_secs(10), |s| {
                    s.transport != TransportKind::Auto
                })
                .map_or("no answer".into(), |s| s.transport.to_string())
        })
        .collect();
    println!(
        "  transport running: {}",
        settled
            .iter()
            .enumerate()
            .map(|(i, t)| format!("n{i} {t}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let want = o
        .expect_transport
        .as_deref()
        .unwrap_or(if o.transport == "auto" {
            "a transport other than auto"
        } else {
            &o.transport
        });
    if settled.iter().any(|t| {
        *t == "auto" || (o.transport != "auto" || o.expect_transport.is_some()) && t != want
    }) {
        bail!(
            "replicas run {settled:?}, expected {want}; logs in {}",
            dir.display()
        );
    }
    let load = Load::new(1, o.proposals, leader);
    let started = Instant::now();
    let workers = load.start(o.proposers, &clients);
    // Half way, SIGKILL the leader.
    while load.acked_count.load(Ordering::SeqCst) < o.proposals / 2 {
        if workers.iter().all(|w| w.is_finished()) {
            break;
        }
        thread::sleep(Duration::from_millis(2));
    }
    let victim = cluster.leader().context("no leader half way through")?;
    let old_term = cluster.status(victim).map_or(0, |s| s.term);
    let at_kill = load.acked_count.load(Ordering::SeqCst);
    cluster.kill(victim)?;
    let killed = Instant::now();
    *load.killed_at.lock().expect("lock") = Some(killed);
    let elected = loop {
        if let Some(l) = cluster.leader()
            && cluster.status(l).is_some_and(|s| s.term > old_term)
        {
            break Instant::now();
        }
        if killed.elapsed() > Duration::from_secs(30) {
            bail!(
                "no new leader within 30 s of the kill; logs in {}",
                dir.display()
            );
        }
        thread::sleep(Duration::from_micros(500));
    };
    let new_leader = cluster.leader().unwrap_or(victim);
    // While the victim is down, act as it: every follower must refuse its
    // log writes (on verbs, with a remote access error from the NIC).
    let fence = cluster.fence_check(victim)?;
    // Let the new leader work alone for a moment, then bring the victim back.
    thread::sleep(Duration::from_millis(300));
    cluster.start(victim)?;
    for w in workers {
        let _ = w.join();
    }
    let load_secs = started.elapsed().as_secs_f64();
    let acked = std::mem::take(&mut *load.acked.lock().expect("lock"));
    let first_commit = load
        .first_ack_after_kill
        .lock()
        .expect("lock")
        .map(|t| t.duration_since(killed));
    let (commits, digest) = cluster.verify(&acked)?;
    let h = load.before_kill.lock().expect("lock").clone();
    println!(
        "  leader n{victim} SIGKILLed after {at_kill} acknowledgements; n{new_leader} led a new term {:.1} ms later; \
         first commit {:.1} ms after the kill",
        (elected - killed).as_secs_f64() * 1e3,
        first_commit.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    );
    println!(
        "  while n{victim} was down, its log writes were refused by every follower ({}):",
        fence
            .first()
            .and_then(|l| l.split_once("refusals come from "))
            .map_or("", |(_, m)| m)
    );
    for line in fence.iter().skip(1) {
        println!("  {line}");
    }
    println!(
        "  n{victim} restarted and caught up; {} replicas identical: {commits} entries, digest {digest:016x}",
        REPLICAS
    );
    println!(
        "  {} proposals acknowledged ({:.0}/s), all present on every replica; {} attempts failed or timed out (retried with new ids)",
        acked.len(),
        acked.len() as f64 / load_secs,
        load.failed.load(Ordering::SeqCst)
    );
    let mut next_id = load.next_id.load(Ordering::SeqCst);
    let mut all_acked = acked.clone();
    next_id = follower_stops(&mut cluster, &clients, next_id, &mut all_acked, o.proposers)?;
    if o.durability == "memory" && o.transport == "tcp" {
        // Transport-independent: run once, on the plainest transport.
        next_id =
            majority_loses_memory(&mut cluster, &clients, next_id, &mut all_acked, o.proposers)?;
    }
    if o.transport == "fabric" || o.transport == "verbs" {
        let target = (o.proposals / 5).clamp(500, 20_000);
        // Whether the resumed leader writes before it reads of the new term
        // in its slots depends on where the pause caught it: pause again
        // (up to three times) until one of its stale writes was refused.
        let mut refused = 0;
        for round in 1..=3 {
            let (fenced, next) = deposed_leader_returns(
                &mut cluster,
                &clients,
                next_id,
                &mut all_acked,
                o.proposers,
                target,
            )?;
            next_id = next;
            refused += fenced;
            if refused > 0 {
                println!(
                    "  deposed leader's ring writes refused by its followers' queue pairs / keys: {refused} (after {round} pause(s))"
                );
                break;
            }
        }
        if refused == 0 {
            println!(
                "  no deposed leader wrote before learning of the new term in 3 pauses (fencing of stale writes is shown by the transport tests)"
            );
        }
    }
    if o.durability == "durable" {
        for i in 0..REPLICAS {
            cluster.kill(i)?;
        }
        println!("  whole cluster SIGKILLed; restarting");
        for i in 0..REPLICAS {
            cluster.start(i)?;
        }
        cluster.wait_for_leader(Duration::from_secs(30))?;
        let (after, _) = cluster.verify(&acked)?;
        println!(
            "  after the restart: {after} entries on every replica, every acknowledged proposal still there"
        );
    }
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
    println!("{name}: PASS");
    println!(
        "  commits {commits}, failover {:.1} ms (detection + election {:.1} ms), \
         commit latency before the kill p50 {:.1} us, p99 {:.1} us (loopback round trip p50 {rtt50:.1} us)",
        first_commit.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3),
        (elected - killed).as_secs_f64() * 1e3,
        us(h.value_at_quantile(0.5)),
        us(h.value_at_quantile(0.99)),
    );
    if let Some((p50, p99)) = raw {
        println!(
            "  raw fi_write round trip p50 {p50:.1} us, p99 {p99:.1} us: commit latency p50 is {:.1}x the raw round trip, p99 {:.1}x",
            us(h.value_at_quantile(0.5)) / p50,
            us(h.value_at_quantile(0.99)) / p99
        );
    }
    Ok(ExitCode::SUCCESS)
}
