//! Runs the deterministic simulator: `apus-sim --seeds N [--replicas R]
//! [--bug NAME]` or `apus-sim --seed S [--trace]`. Usually invoked through
//! `cargo xtask sim`.

use std::process::ExitCode;

use apus_core::config::PlantedBug;
use apus_core::sim::{self, Options};

const USAGE: &str =
    "usage: apus-sim (--seeds N [--first S] | --seed S [--trace] | --demo [--seed S]) \
[--replicas R] [--bug NAME] [--threads T]
planted bugs: commit-without-majority, accept-stale-term, no-pre-vote, stale-writer-term,
no-revoked-drain, no-drain-before-vote, single-buffered-leader-record, no-recovering-gate,
no-rejoin";

struct Args {
    demo: bool,
    seeds: Option<u64>,
    first: u64,
    seed: Option<u64>,
    trace: bool,
    threads: usize,
    opts: Options,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        demo: false,
        seeds: None,
        first: 0,
        seed: None,
        trace: false,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        opts: Options::default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        let num = |name: &str, v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{name} expects a non-negative integer, got {v:?}"))
        };
        match flag.as_str() {
            "--seeds" => a.seeds = Some(num("--seeds", value("--seeds")?)?),
            "--first" => a.first = num("--first", value("--first")?)?,
            "--seed" => a.seed = Some(num("--seed", value("--seed")?)?),
            "--threads" => a.threads = num("--threads", value("--threads")?)?.max(1) as usize,
            "--replicas" => {
                let r = num("--replicas", value("--replicas")?)?;
                if !(1..=9).contains(&r) {
                    return Err(format!("--replicas must be between 1 and 9, got {r}"));
                }
                a.opts.replicas = Some(r as usize);
            }
            "--bug" => {
                let v = value("--bug")?;
                a.opts.bug = Some(PlantedBug::from_name(&v).ok_or_else(|| {
                    let names: Vec<&str> = PlantedBug::ALL.iter().map(|b| b.name()).collect();
                    format!("unknown bug {v:?}: one of {}", names.join(", "))
                })?);
            }
            "--trace" => a.trace = true,
            "--demo" => a.demo = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    match (a.seeds, a.seed, a.demo) {
        (Some(_), _, true) => Err("--demo runs one seed: give --seed, not --seeds".into()),
        (_, _, true) => Ok(a),
        (Some(_), Some(_), _) => Err("give --seeds or --seed, not both".into()),
        (None, None, _) => Err("give --seeds N or --seed S".into()),
        _ => Ok(a),
    }
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("apus-sim: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if args.demo {
        return demo(args.seed.unwrap_or(7));
    }
    if let Some(seed) = args.seed {
        let sc = sim::Scenario::generate(seed, args.opts.replicas);
        println!(
            "seed {seed}: {} replicas, {:?} durability, ring {} B, {} faults scheduled, heal at {:.1}ms",
            sc.replicas,
            sc.durability,
            sc.ring_capacity,
            sc.faults.len(),
            sc.heal_at as f64 / 1e6
        );
        let o = sim::run_seed(seed, args.opts, args.trace);
        for line in &o.trace {
            println!("{line}");
        }
        println!(
            "events {}, simulated {:.1}ms, commits {}, proposals {}, elections {}, fenced writes {}, torn landings {}, preemptions {}",
            o.events,
            o.sim_time as f64 / 1e6,
            o.commits,
            o.proposals,
            o.elections,
            o.denied_writes,
            o.torn_landings,
            o.preemptions
        );
        for (i, (applied, digest)) in o.digests.iter().enumerate() {
            println!("n{i}: applied {applied}, digest {digest:016x}");
        }
        let v = u64::from(o.violation.is_some());
        if let Some(viol) = &o.violation {
            println!("VIOLATION seed {seed}: {viol}");
            println!("  replay: {}", sim::replay_command(seed, args.opts));
        }
        println!("sim: 1 seeds, {v} violations");
        return if v == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let n = args.seeds.expect("checked");
    let s = sim::run_seeds(args.first, n, args.opts, args.threads);
    for (seed, v) in &s.violations {
        println!("VIOLATION seed {seed}: {v}");
        println!("  replay: {}", sim::replay_command(*seed, args.opts));
    }
    println!(
        "{:.0} seeds/s on {} threads ({:.1}s); {} distinct fault schedules, {} faults, \
         {} elections, {} commits, {} fenced writes, {} torn landings, {} preemptions, {} divergent entries repaired, {:.1}M events",
        s.seeds as f64 / s.wall_secs,
        args.threads,
        s.wall_secs,
        s.distinct_schedules,
        s.faults,
        s.elections,
        s.commits,
        s.denied_writes,
        s.torn_landings,
        s.preemptions,
        s.truncated,
        s.events as f64 / 1e6
    );
    println!("sim: {} seeds, {} violations", s.seeds, s.violations.len());
    if s.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1e3
}

fn demo(seed: u64) -> ExitCode {
    println!("APUS demo: a simulated three-replica cluster (seed {seed})");
    println!("Every replica runs the real engine over simulated remote memory: 5 us links,");
    println!("durable mode (fsync 10-40 us), a client proposing every 5-15 us. At 10 ms the");
    println!("leader crashes; it restarts 5 ms later and catches up. Times are simulated.\n");
    let o = sim::run_demo(seed);
    for line in &o.trace {
        println!("{line}");
    }
    let mut lat = o.latencies.clone();
    lat.sort_unstable();
    println!("\nsummary");
    println!(
        "  commits            {} entries committed on every replica",
        o.commits
    );
    println!(
        "  proposals          {} accepted, {} committed; {} were taken by the leader that crashed and never acknowledged",
        o.proposals,
        o.acknowledged,
        o.proposals - o.acknowledged
    );
    println!(
        "  commit latency     p50 {:.1} us, p99 {:.1} us (simulated, proposal to leader commit, {} samples)",
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.len()
    );
    match o.failovers.first() {
        Some(f) => println!(
            "  failover           {:.2} ms from the crash to the new leader's first commit",
            *f as f64 / 1e6
        ),
        None => println!("  failover           none measured"),
    }
    println!("  elections          {}", o.elections);
    let same = o.digests.windows(2).all(|w| w[0] == w[1]);
    for (i, (applied, digest)) in o.digests.iter().enumerate() {
        println!("  n{i} state          applied {applied:>6}, digest {digest:016x}");
    }
    match (&o.violation, same) {
        (None, true) => {
            println!(
                "  replicas           identical: every replica applied the same entries in the same order"
            );
            ExitCode::SUCCESS
        }
        (Some(v), _) => {
            println!("  VIOLATION          {v}");
            ExitCode::FAILURE
        }
        (None, false) => {
            println!("  replicas           DIFFER");
            ExitCode::FAILURE
        }
    }
}
