//! `cargo xtask demo`: the real thing, on this machine. First the price:
//! the same set/get load against resp-kv (a RESP key-value server that
//! knows nothing of APUS) alone, then through the leader of three copies
//! under `apus run`, side by side. Then clients drive SET and INCR through
//! the leader; the leader's
//! server is SIGKILLed; a new leader takes over and the clients follow it;
//! the killed replica restarts empty and rebuilds its state from the log;
//! then every replica's state digest is shown, and they must be equal.
//!
//! The simulated timeline of the engine alone stays available as
//! `cargo xtask sim --demo`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::e2e::{
    AppCluster, BareServer, LoadFigures, REPLICAS, ServerKind, build_release, check_counters,
    failover_under_load, mixed_load, target_dir,
};

const CLIENTS: usize = 8;
/// Requests per client of the side-by-side load.
const PRICE_REQUESTS: u64 = 2_000;

/// The side-by-side load, against `addr`.
fn price_load(label: &str, addr: std::net::SocketAddr) -> Result<LoadFigures> {
    let protocol = ServerKind::RespKv.kv_protocol()?;
    mixed_load(label, protocol, addr, CLIENTS, PRICE_REQUESTS)
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

pub fn run_demo(args: &[String]) -> Result<ExitCode> {
    let mut seconds = 3.0f64;
    match args {
        [] => {}
        [flag, v] if flag == "--seconds" => {
            seconds = v
                .parse()
                .ok()
                .filter(|s: &f64| (0.5..=600.0).contains(s))
                .with_context(|| format!("--seconds expects 0.5 to 600, got {v:?}"))?;
        }
        _ => bail!(
            "usage: cargo xtask demo [--seconds S]   (the simulated demo: cargo xtask sim --demo)"
        ),
    }
    println!("demo: building apus, the interception library and resp-kv (release)");
    let bins = build_release()?;
    let bare_dir = target_dir()
        .join("demo")
        .join(format!("resp-kv-bare-{}", std::process::id()));
    let bare = {
        let server = BareServer::start(ServerKind::RespKv, &bins, &bare_dir)?;
        let figures = price_load("bare", server.addr)?;
        drop(server);
        let _ = std::fs::remove_dir_all(&bare_dir);
        figures
    };
    let mut cluster = AppCluster::new(ServerKind::RespKv, bins, "demo")?;
    println!(
        "demo: three replicas of resp-kv, each started as\n  \
         apus run --config {} --id N -- resp-kv --port PORT",
        cluster.config.display()
    );
    for i in 0..REPLICAS {
        cluster.start(i)?;
        println!(
            "  n{i}: resp-kv on {}, replica status on {}",
            cluster.apps[i], cluster.status[i]
        );
    }
    let all: Vec<usize> = (0..REPLICAS).collect();
    let leader = cluster.wait_ready(&all, Duration::from_secs(30))?;
    let term = cluster.replica_status(leader).map_or(0, |s| s.term);
    println!("  n{leader} leads (term {term}); clients find it with `apus leader --config ...`");
    let replicated = price_load("3 replicas", cluster.apps[leader])?;
    println!(
        "demo: the price of replication: {CLIENTS} clients x {PRICE_REQUESTS} SET/GET (half each), \
         resp-kv alone, then through the leader"
    );
    println!(
        "  {:<12} {:>10} {:>10} {:>10}",
        "", "req/s", "p50 ms", "p99 ms"
    );
    for f in [&bare, &replicated] {
        println!(
            "  {:<12} {:>10.0} {:>10.3} {:>10.3}",
            f.label, f.rps, f.p50_ms, f.p99_ms
        );
    }
    println!(
        "  replicated: {:.1}% of bare throughput, p50 +{:.3} ms",
        100.0 * replicated.rps / bare.rps,
        replicated.p50_ms - bare.p50_ms
    );
    println!(
        "demo: {CLIENTS} clients, each looping SET user<c>:<n> then INCR ctr<c> through the leader; \
         SIGKILL of the leader's server after {seconds} s"
    );
    let t0 = Instant::now();
    let mut last_print = t0;
    let mut last_acked = 0u64;
    let mut announced = false;
    let f = failover_under_load(
        &mut cluster,
        CLIENTS,
        true,
        Duration::from_secs_f64(seconds),
        Duration::from_secs(2),
        |_, traffic, phase| {
            if let (Some((victim, new_leader)), false) = (phase, announced) {
                announced = true;
                println!(
                    "  t={:>5.2}s  SIGKILL n{victim}'s resp-kv; n{new_leader} now leads",
                    t0.elapsed().as_secs_f64()
                );
            }
            if last_print.elapsed() >= Duration::from_secs(1) {
                let acked = traffic.acked.load(std::sync::atomic::Ordering::SeqCst);
                let h = traffic.take_window();
                let secs = last_print.elapsed().as_secs_f64();
                last_print = Instant::now();
                println!(
                    "  t={:>5.2}s  {:>6.0} INCR/s acknowledged   p50 {:.3} ms   p99 {:.3} ms",
                    t0.elapsed().as_secs_f64(),
                    (acked - last_acked) as f64 / secs,
                    ms(h.value_at_quantile(0.5)),
                    ms(h.value_at_quantile(0.99)),
                );
                last_acked = acked;
            }
        },
    )?;
    println!(
        "  clients stopped; restarting n{} with an empty resp-kv",
        f.victim
    );
    cluster.restart_empty(f.victim)?;
    cluster.wait_ready(&all, Duration::from_secs(30))?;
    let rebuilt = Instant::now();
    cluster.compare(&all)?;
    check_counters(&cluster, &all, &f.tallies)?;
    println!(
        "  n{} replayed the log into its new server in {:.2} s",
        f.victim,
        rebuilt.elapsed().as_secs_f64()
    );
    let digests: Vec<String> = all
        .iter()
        .map(|&i| cluster.snapshot(i))
        .collect::<Result<_>>()?;
    // Reading the leader's digest went through the log too: settle again.
    let statuses = cluster.wait_converged(&all, Duration::from_secs(30))?;
    let acked: u64 = f.tallies.iter().map(|t| t.acked).sum();
    let extra: u64 = f.tallies.iter().map(|t| t.applied_unacked).sum();
    let commit = statuses[0].commit;
    println!("demo: summary");
    println!(
        "  commits   {commit} log entries; {acked} INCRs acknowledged (+ {acked} SETs), \
         {extra} applied whose reply died with the old leader"
    );
    println!(
        "  latency   INCR through the leader before the kill: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms",
        ms(f.before_kill.value_at_quantile(0.5)),
        ms(f.before_kill.value_at_quantile(0.99)),
        ms(f.before_kill.value_at_quantile(0.999)),
    );
    println!(
        "  failover  n{} elected {:.1} ms after the SIGKILL; clients answered again after {:.1} ms",
        f.new_leader, f.election_ms, f.first_ack_ms
    );
    for (i, (st, digest)) in statuses.iter().zip(&digests).enumerate() {
        let (role, applied, div) = (st.role.to_string(), st.applied, st.outputs_differed);
        println!(
            "  n{i}  {role:<9} applied {applied:>8}  outputs differed {div}  {digest}{}",
            if i == f.victim {
                "   (restarted, rebuilt from the log)"
            } else {
                ""
            }
        );
    }
    ensure!(
        digests.iter().all(|d| d == &digests[0]),
        "the replicas differ"
    );
    println!(
        "demo: PASS: {} replicas hold the same state ({})",
        REPLICAS, digests[0]
    );
    let dir = cluster.dir.clone();
    drop(cluster);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ExitCode::SUCCESS)
}
