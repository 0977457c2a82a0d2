//! The end-to-end check of a server with its own process model and
//! clients (PostgreSQL, slapd, MariaDB, nginx): a [`Workload`] says how to
//! load it; the flow is the same for all.
//!
//! Bare server, then three replicas under `apus run`: the same load through
//! the leader (the log must have grown with it: the server's processes were
//! replicated), `apus check` equal on all replicas; the leader paused until
//! deposed, resumed, caught up; more load; the leader SIGKILLed, more load
//! through the new one, the killed replica restarted from its pristine data
//! directory and rebuilt from the log; `apus check` again.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use super::{AppCluster, BareServer, Options, REPLICAS, ServerKind, build_release, target_dir};

/// What one load measured.
pub struct Bench {
    pub label: &'static str,
    /// Operations per second (0: a timed set-up step).
    pub rate: f64,
    /// Mean latency, or the step's time, in ms.
    pub latency_ms: f64,
}

/// How to drive one server.
pub trait Workload {
    fn kind(&self) -> ServerKind;
    /// The process model, for the first line.
    fn model(&self) -> &'static str;
    /// What `rate` counts (tps, ops/s, req/s).
    fn unit(&self) -> &'static str;
    /// The measured load, bare and through the leader.
    fn load(&self, addr: SocketAddr) -> Result<Vec<Bench>>;
    /// Some more load, after the pause and after the kill.
    fn more(&self, addr: SocketAddr) -> Result<()>;
    /// One request the new leader must answer while the old one is frozen.
    fn probe(&self, addr: SocketAddr) -> Result<()>;
    /// At the end, with every replica up: anything the check adds (MariaDB
    /// shows what concurrent clients do to a threaded server).
    fn finally(&self, _cluster: &mut AppCluster) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
}

pub fn run(o: &Options, w: &dyn Workload) -> Result<ExitCode> {
    let kind = w.kind();
    let name = kind.name();
    kind.ensure_installed()?;
    let bins = build_release()?;
    let started = Instant::now();
    println!(
        "e2e {name}: {} on 3 replicas under `apus run`, {} transport",
        w.model(),
        o.transport
    );
    let bare_dir = target_dir()
        .join("e2e")
        .join(format!("{name}-bare-{}", std::process::id()));
    let bare = {
        let _ = std::fs::remove_dir_all(&bare_dir);
        std::fs::create_dir_all(&bare_dir)?;
        if kind == ServerKind::Postgres {
            super::servers::chown_postgres(&bare_dir)?;
        }
        let server = BareServer::start(kind, &bins, &bare_dir.join("data"))?;
        let rows = w.load(server.addr)?;
        drop(server);
        let _ = std::fs::remove_dir_all(&bare_dir);
        rows
    };
    let mut cluster = AppCluster::with_transport(kind, bins, "e2e", &o.transport_config())?;
    for i in 0..REPLICAS {
        cluster.start(i)?;
    }
    let all: Vec<usize> = (0..REPLICAS).collect();
    let leader = cluster.wait_ready(&all, Duration::from_secs(60))?;
    cluster.wait_serving(leader, Duration::from_secs(60))?;
    let log = std::fs::read_to_string(cluster.dir.join(format!("n{leader}.log")))?;
    let started_in = log
        .lines()
        .find(|l| l.contains("replication started in pid"))
        .context("apus run did not confirm that replication started")?;
    println!("  n{leader} leads; {}", started_in.trim());
    for note in log.lines().filter(|l| l.contains("also listening on")) {
        println!("  {}", note.trim());
    }
    let before = cluster
        .replica_status(leader)
        .context("leader gone")?
        .commit;
    let replicated = w.load(cluster.apps[leader])?;
    let grown = cluster
        .replica_status(leader)
        .context("leader gone")?
        .commit
        - before;
    println!(
        "  {}, bare server vs through the leader ({grown} log entries):",
        w.unit()
    );
    println!(
        "  {:<12} {:>10} {:>12} | {:>10} {:>12} | {:>7}",
        "load", "bare", "latency ms", "3x", "latency ms", "ratio"
    );
    for (b, r) in bare.iter().zip(&replicated) {
        if b.rate == 0.0 {
            println!(
                "  {:<12} {:>10} {:>12.1} | {:>10} {:>12.1} | {:>6.1}x (time)",
                b.label,
                "-",
                b.latency_ms,
                "-",
                r.latency_ms,
                r.latency_ms / b.latency_ms
            );
        } else {
            println!(
                "  {:<12} {:>10.0} {:>12.3} | {:>10.0} {:>12.3} | {:>6.1}x",
                b.label,
                b.rate,
                b.latency_ms,
                r.rate,
                r.latency_ms,
                b.rate / r.rate
            );
        }
    }
    ensure!(
        grown > 10 * replicated.len() as u64,
        "the log grew by only {grown} entries under load: the server's processes were not replicated"
    );
    println!("  after the load: {}", cluster.compare(&all)?);
    let rejoin = super::pause_and_rejoin(&mut cluster, |cluster, new_leader| {
        // A new leader turns clients away while it takes over.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match w.probe(cluster.apps[new_leader]) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!("the new leader n{new_leader} does not serve")));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    })?;
    println!("  pause: {rejoin}");
    let l = cluster.wait_ready(&all, Duration::from_secs(30))?;
    w.more(cluster.apps[l])?;
    println!(
        "  after the pause and more load through n{l}: {}",
        cluster.compare(&all)?
    );
    let victim = cluster.wait_ready(&all, Duration::from_secs(30))?;
    let killed = Instant::now();
    cluster.kill(victim)?;
    let survivors: Vec<usize> = all.iter().copied().filter(|&i| i != victim).collect();
    let new_leader = cluster.wait_ready(&survivors, Duration::from_secs(30))?;
    cluster.wait_serving(new_leader, Duration::from_secs(30))?;
    let failover_ms = killed.elapsed().as_secs_f64() * 1e3;
    w.more(cluster.apps[new_leader])?;
    cluster.restart_empty(victim)?;
    cluster.wait_ready(&all, Duration::from_secs(60))?;
    let rebuilt = Instant::now();
    let after = cluster.compare(&all)?;
    println!(
        "  SIGKILL of the leader n{victim}: n{new_leader} served {failover_ms:.0} ms after the kill; \
         n{victim} restarted from its pristine data directory and rebuilt from the log in {:.1} s: {after}",
        rebuilt.elapsed().as_secs_f64()
    );
    for line in w.finally(&mut cluster)? {
        println!("  {line}");
    }
    cluster.finish();
    println!("  ({:.0} s in all)", started.elapsed().as_secs_f64());
    let rates: Vec<String> = bare
        .iter()
        .zip(&replicated)
        .filter(|(b, _)| b.rate > 0.0)
        .map(|(b, r)| {
            format!(
                "{} bare {:.0} vs 3 replicas {:.0} {} ({:.1}x)",
                b.label,
                b.rate,
                r.rate,
                w.unit(),
                b.rate / r.rate
            )
        })
        .collect();
    println!(
        "e2e {name}: PASS: {}; paused leader rejoined in {:.0} ms; failover {failover_ms:.0} ms",
        rates.join("; "),
        rejoin.rejoin_ms
    );
    Ok(ExitCode::SUCCESS)
}
