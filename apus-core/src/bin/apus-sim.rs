//! Runs the deterministic simulator: `apus-sim --seeds N [--replicas R]
//! [--bug NAME]` or `apus-sim --seed S [--trace]`. Usually invoked through
//! `cargo xtask sim`.

use std::process::ExitCode;

use apus_core::config::PlantedBug;
use apus_core::sim::{self, Options};

const USAGE: &str = "usage: apus-sim (--seeds N [--first S] | --seed S [--trace]) \
[--replicas R] [--bug commit-without-majority|accept-stale-term] [--threads T]";

struct Args {
    seeds: Option<u64>,
    first: u64,
    seed: Option<u64>,
    trace: bool,
    threads: usize,
    opts: Options,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
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
                    format!("unknown bug {v:?}: commit-without-majority or accept-stale-term")
                })?);
            }
            "--trace" => a.trace = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    match (a.seeds, a.seed) {
        (Some(_), Some(_)) => Err("give --seeds or --seed, not both".into()),
        (None, None) => Err("give --seeds N or --seed S".into()),
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
            "events {}, simulated {:.1}ms, commits {}, proposals {}, elections {}, fenced writes {}, torn landings {}",
            o.events,
            o.sim_time as f64 / 1e6,
            o.commits,
            o.proposals,
            o.elections,
            o.denied_writes,
            o.torn_landings
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
        return if v == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE };
    }
    let n = args.seeds.expect("checked");
    let s = sim::run_seeds(args.first, n, args.opts, args.threads);
    for (seed, v) in &s.violations {
        println!("VIOLATION seed {seed}: {v}");
        println!("  replay: {}", sim::replay_command(*seed, args.opts));
    }
    println!(
        "{:.0} seeds/s on {} threads ({:.1}s); {} distinct fault schedules, {} faults, \
         {} elections, {} commits, {} fenced writes, {} torn landings, {} divergent entries repaired, {:.1}M events",
        s.seeds as f64 / s.wall_secs,
        args.threads,
        s.wall_secs,
        s.distinct_schedules,
        s.faults,
        s.elections,
        s.commits,
        s.denied_writes,
        s.torn_landings,
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
