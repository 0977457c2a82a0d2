//! `cargo xtask e2e --server postgres`: PostgreSQL 15, which forks a
//! backend for every connection, replicated on three replicas.
//!
//! The postmaster accepts each connection (its CONNECT is logged there) and
//! forks a backend, whose reads go through the postmaster's node over the
//! channel of forked processes. pgbench initialises its tables and runs 1
//! and 4 clients, bare and through the leader; `apus check` compares
//! pgbench's tables on every replica (without `pgbench_history.mtime`, the
//! server's clock); then the leader is paused until deposed and resumed, and
//! killed and restarted empty, and the replicas are compared again.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};

use super::servers::{POSTGRES_USER, psql};
use super::{AppCluster, BareServer, Options, REPLICAS, ServerKind, build_release, target_dir};
use crate::tools;

/// What one pgbench run measured.
struct Bench {
    label: &'static str,
    tps: f64,
    latency_ms: f64,
}

/// Runs pgbench against `addr`; `args` choose the workload.
fn pgbench(addr: SocketAddr, label: &'static str, args: &[&str]) -> Result<Bench> {
    let t = Instant::now();
    let out = tools::command("pgbench")?
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-U", POSTGRES_USER])
        .args(args)
        .arg("postgres")
        .output()
        .context("running pgbench")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "pgbench {args:?} against {addr} failed: {text}");
    let number = |key: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    Ok(match (number("tps = "), number("latency average = ")) {
        (Some(tps), Some(latency_ms)) => Bench {
            label,
            tps,
            latency_ms,
        },
        // Initialisation prints no tps: report the time it took.
        _ => Bench {
            label,
            tps: 0.0,
            latency_ms: t.elapsed().as_secs_f64() * 1e3,
        },
    })
}

/// pgbench's initialisation and the two measured loads.
fn workload(addr: SocketAddr) -> Result<Vec<Bench>> {
    Ok(vec![
        pgbench(addr, "init", &["-i", "-s", "1", "-q"])?,
        pgbench(addr, "1 client", &["-n", "-c", "1", "-t", "300"])?,
        pgbench(addr, "4 clients", &["-n", "-c", "4", "-j", "2", "-t", "100"])?,
    ])
}

pub fn run(o: &Options) -> Result<ExitCode> {
    let kind = ServerKind::Postgres;
    kind.ensure_installed()?;
    let bins = build_release()?;
    let started = Instant::now();
    println!(
        "e2e postgres: PostgreSQL 15 (a backend forked per connection) on 3 replicas under `apus run`, {} transport",
        o.transport
    );
    let bare_dir = target_dir()
        .join("e2e")
        .join(format!("postgres-bare-{}", std::process::id()));
    let bare = {
        let _ = std::fs::remove_dir_all(&bare_dir);
        std::fs::create_dir_all(&bare_dir)?;
        super::servers::chown_postgres(&bare_dir)?;
        let server = BareServer::start(kind, &bins, &bare_dir.join("data"))?;
        let rows = workload(server.addr)?;
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
    let notes = std::fs::read_to_string(cluster.dir.join(format!("n{leader}.log")))?;
    let note = notes
        .lines()
        .find(|l| l.contains("also listening on"))
        .context("apus run did not say that the UNIX socket is not replicated")?;
    println!("  n{leader} leads; {}", note.trim());
    let replicated = workload(cluster.apps[leader])?;
    println!("  pgbench, bare server vs through the leader:");
    println!(
        "  {:<10} {:>10} {:>12} | {:>10} {:>12} | {:>7}",
        "load", "bare tps", "latency ms", "3x tps", "latency ms", "ratio"
    );
    for (b, r) in bare.iter().zip(&replicated) {
        if b.tps == 0.0 {
            println!(
                "  {:<10} {:>10} {:>12.1} | {:>10} {:>12.1} | {:>6.1}x (time)",
                b.label,
                "-",
                b.latency_ms,
                "-",
                r.latency_ms,
                r.latency_ms / b.latency_ms
            );
        } else {
            println!(
                "  {:<10} {:>10.0} {:>12.3} | {:>10.0} {:>12.3} | {:>6.1}x",
                b.label,
                b.tps,
                b.latency_ms,
                r.tps,
                r.latency_ms,
                b.tps / r.tps
            );
        }
    }
    let log_entries = cluster
        .replica_status(leader)
        .context("leader gone")?
        .commit;
    ensure!(
        log_entries > 2_000,
        "the log holds only {log_entries} entries after pgbench: the backends' reads were not replicated"
    );
    println!("  after pgbench: {}", cluster.compare(&all)?);
    let rejoin = super::pause_and_rejoin(&mut cluster, |cluster, new_leader| {
        psql(cluster.apps[new_leader], "SELECT count(*) FROM pgbench_branches").map(|_| ())
    })?;
    println!("  pause: {rejoin}");
    let l = cluster.wait_ready(&all, Duration::from_secs(30))?;
    pgbench(cluster.apps[l], "after pause", &["-n", "-c", "4", "-j", "2", "-t", "50"])?;
    println!("  after the pause and more pgbench through n{l}: {}", cluster.compare(&all)?);
    let victim = cluster.wait_ready(&all, Duration::from_secs(30))?;
    let killed = Instant::now();
    cluster.kill(victim)?;
    let survivors: Vec<usize> = all.iter().copied().filter(|&i| i != victim).collect();
    let new_leader = cluster.wait_ready(&survivors, Duration::from_secs(30))?;
    cluster.wait_serving(new_leader, Duration::from_secs(30))?;
    let failover_ms = killed.elapsed().as_secs_f64() * 1e3;
    pgbench(cluster.apps[new_leader], "after kill", &["-n", "-c", "2", "-t", "50"])?;
    cluster.restart_empty(victim)?;
    cluster.wait_ready(&all, Duration::from_secs(60))?;
    let rebuilt = Instant::now();
    let after = cluster.compare(&all)?;
    println!(
        "  SIGKILL of the leader n{victim}: n{new_leader} served pgbench {failover_ms:.0} ms after the kill; \
         n{victim} restarted from its pristine data directory and rebuilt from the log in {:.1} s: {after}",
        rebuilt.elapsed().as_secs_f64()
    );
    let dir = cluster.dir.clone();
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
    println!("  ({:.0} s in all)", started.elapsed().as_secs_f64());
    let (b1, r1) = (&bare[1], &replicated[1]);
    let (b4, r4) = (&bare[2], &replicated[2]);
    println!(
        "e2e postgres: PASS: 1 client bare {:.0} tps vs 3 replicas {:.0} tps ({:.1}x); 4 clients {:.0} vs {:.0} tps ({:.1}x); paused leader rejoined in {:.0} ms",
        b1.tps,
        r1.tps,
        b1.tps / r1.tps,
        b4.tps,
        r4.tps,
        b4.tps / r4.tps,
        rejoin.rejoin_ms
    );
    Ok(ExitCode::SUCCESS)
}
