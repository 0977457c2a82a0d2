//! `cargo xtask`: every developer workflow of the APUS workspace.
//!
//! ```text
//! cargo xtask test              everything CI runs
//! cargo xtask sim ARGS          the deterministic simulator (see --help)
//! cargo xtask demo              three replicated resp-kv servers, load, a leader kill
//! cargo xtask cluster-test ...  three real node processes, a leader kill, checks
//! cargo xtask e2e --server S    Redis, Memcached or resp-kv replicated end to end
//! cargo xtask softroce          the verbs tests inside a Soft-RoCE qemu guest
//! ```

mod bench;
mod chaos;
mod cluster;
mod demo;
mod e2e;
mod fabric_rtt;
mod failover;
mod softroce;
mod tools;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, Result, bail};

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  test              everything CI runs: formatting, clippy, docs, unit and
                    property tests, 5000 simulator seeds, the planted-bug
                    checks, the cluster tests, the end-to-end checks, the demos
  demo [--seconds S]
                    three resp-kv servers replicated by `apus run`: clients
                    through the leader, the leader SIGKILLed after S seconds,
                    failover, the killed replica rebuilt from the log, one
                    digest per replica
  sim ARGS          run the deterministic simulator; ARGS as for apus-sim:
                      --seeds N [--first S] [--replicas R] [--bug NAME] [--threads T]
                      --seed S [--replicas R] [--bug NAME] [--trace]
                      --demo [--seed S]   the simulated demo: timeline of a leader crash
  cluster-test --transport tcp|quic|fabric|verbs|auto [--provider shm|tcp;ofi_rxm|tcp]
               [--durability memory|durable] [--fsync always|batch|never]
               [--proposals N] [--proposers P] [--poll spin|hybrid|park]
               [--expect-transport T] [--apus-bin PATH]
                    three `apus node` processes under load; the leader is
                    SIGKILLed and restarted; every acknowledged proposal must
                    be on every replica (durable: also after a whole-cluster kill;
                    fabric, verbs: also a paused, deposed leader; fabric: the raw
                    fi_write round trip; auto: the transport settled on, checked
                    against --expect-transport; verbs needs an RDMA device)
  chaos             three `apus node` replicas in network namespaces (veth, a
                    bridge) under load: the leader cut off and healed, a link
                    flapping every 200 ms, netem delay and loss (SKIPPED where
                    the kernel has no netem), a follower SIGSTOPped; after each,
                    every acknowledged proposal on every replica (root)
  e2e --server redis|memcached|resp-kv|postgres|slapd|mariadb|nginx
      [--requests N] [--transport tcp|fabric [--provider P]]
                    the server (installed with apt-get when missing) under
                    `apus run` on three replicas: baseline vs replicated load,
                    state compared on every replica (apus check), a paused
                    leader that rejoins, a leader SIGKILL, a restart from the
                    pristine data directory; redis/memcached/resp-kv also bad
                    input, BGSAVE (redis) and an INCR load across failovers
  softroce          boots Debian's kernel under qemu with a Soft-RoCE device
                    (rxe0) and runs inside it the apus-rdma tests and the
                    cluster tests over verbs and auto (settling on verbs);
                    last line softroce: PASS or softroce: FAIL <reason>
  bench [--transport tcp|quic|fabric|verbs|all] [--provider P] [--replicas 3,5,7]
        [--conns 1,8,32] [--size 64] [--durability memory|durable] [--duration S]
        [--app redis,memcached] [--no-etcd] [--softroce] [--kills 20] [--smoke]
                    commit latency (p50/p99/p99.9) and throughput of real
                    clusters per transport, against the raw write round trip,
                    bare vs replicated servers and a 3-member etcd; report in
                    target/apus-bench/<time>/ (report.md, report.json, SVG);
                    verbs without a device: --softroce runs it in the guest";

/// Simulator seeds `cargo xtask test` runs.
const CI_SEEDS: u64 = 5000;
/// The planted bugs random seeds must catch, each with the seeds it gets
/// (every run must report violations). The simulator is deterministic: a
/// bug caught in these seeds is caught in every run. `no-pre-vote` is
/// caught by its own scenario test in apus-core, `stale-writer-term` and
/// `no-revoked-drain` by the drain regression tests
/// (`apus-core/tests/fencing.rs`, run with `--all-features`);
/// `single-buffered-leader-record` by nothing yet, and none of these three
/// by random seeds (issue 15).
const PLANTED_BUGS: [(&str, u64); 5] = [
    ("commit-without-majority", 500),
    ("accept-stale-term", 500),
    ("no-recovering-gate", 1000),
    ("no-drain-before-vote", 5000),
    ("no-rejoin", 5000),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") if args.len() == 1 => test(),
        Some("sim") => sim(&args[1..]),
        Some("demo") => demo::run_demo(&args[1..]),
        Some("cluster-test") => cluster::run_test(&args[1..]),
        Some("chaos") => chaos::run_chaos(&args[1..]),
        Some("e2e") => e2e::run_e2e(&args[1..]),
        Some("softroce") => softroce::run_softroce(&args[1..]),
        Some("bench") => bench::run_bench(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!(
                "xtask: unknown command or arguments: {}\n\n{USAGE}",
                args.join(" ")
            );
            let _ = other;
            return ExitCode::from(2);
        }
        None => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub(crate) use tools::cargo;

/// Runs a command, failing with its name if it exits unsuccessfully.
pub(crate) fn run(what: &str, cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("{what}: cannot start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Builds the simulator in release mode and returns its path.
fn build_sim() -> Result<PathBuf> {
    run(
        "building the simulator",
        // The `sim` profile: optimised, with the engine's debug assertions
        // on, so every simulated step checks them.
        cargo().args([
            "build",
            "--quiet",
            "--profile",
            "sim",
            "--package",
            "apus-core",
            "--features",
            "sim",
            "--bin",
            "apus-sim",
        ]),
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    Ok(target.join("sim").join("apus-sim"))
}

fn sim(args: &[String]) -> Result<ExitCode> {
    let bin = build_sim()?;
    let status = tools::own(&bin)
        .args(args)
        .status()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    Ok(ExitCode::from(status.code().unwrap_or(1) as u8))
}

/// Makes sure rustfmt and clippy are installed (a fresh machine may have
/// only the default rustup profile).
fn ensure_components() -> Result<()> {
    let missing: Vec<&str> = [("fmt", "rustfmt"), ("clippy", "clippy")]
        .into_iter()
        .filter(|(sub, _)| {
            !cargo()
                .args([*sub, "--version"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, component)| component)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("    installing {}", missing.join(", "));
    run(
        "installing toolchain components (rustup component add)",
        tools::command("rustup")?
            .args(["component", "add"])
            .args(&missing),
    )
}

/// Runs `apus-sim` and returns `(seeds, violations)` from its last line,
/// which is exactly `sim: N seeds, V violations`.
fn sim_run(bin: &Path, args: &[&str]) -> Result<(u64, u64, String)> {
    let out = tools::own(bin)
        .args(args)
        .output()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let last = stdout.lines().last().unwrap_or_default();
    let parsed = last
        .strip_prefix("sim: ")
        .and_then(|rest| rest.strip_suffix(" violations"))
        .and_then(|rest| rest.split_once(" seeds, "))
        .and_then(|(n, v)| Some((n.parse().ok()?, v.parse().ok()?)));
    match parsed {
        Some((n, v)) => Ok((n, v, stdout)),
        None => bail!(
            "apus-sim {} ended without its summary line:\n{stdout}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn step(name: &str, f: impl FnOnce() -> Result<String>) -> Result<()> {
    println!("==> {name}");
    let t = Instant::now();
    let note = f().with_context(|| format!("step '{name}'"))?;
    let secs = t.elapsed().as_secs_f64();
    if note.is_empty() {
        println!("    ok ({secs:.1}s)");
    } else {
        println!("    ok ({secs:.1}s): {note}");
    }
    Ok(())
}

/// Runs `cargo xtask ARGS` and requires its last line to start with
/// `pass`; returns that line. On failure, everything it printed is shown.
fn xtask_expect(args: &[&str], pass: &str) -> Result<String> {
    let out = cargo()
        .arg("xtask")
        .args(args)
        .output()
        .with_context(|| format!("running cargo xtask {}", args.join(" ")))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    if !out.status.success() || !last.starts_with(pass) {
        bail!(
            "cargo xtask {} failed ({}):\n{stdout}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(last
        .trim_start_matches(pass)
        .trim_start_matches(':')
        .trim()
        .to_string())
}

fn test() -> Result<ExitCode> {
    let start = Instant::now();
    step("toolchain components", || {
        ensure_components().map(|()| String::new())
    })?;
    step(
        "system libraries (libfabric1 for apus-fabric; cmake and libclang to build sideway for apus-rdma)",
        || {
            let fabric = if tools::ensure_library("libfabric.so.1")? {
                "libfabric1 installed"
            } else {
                "libfabric1 present"
            };
            let cmake = tools::ensure(&["cmake"])?;
            let clang = tools::ensure_packages(&["libclang-dev"])?;
            let build = if cmake || clang {
                "cmake, libclang-dev installed"
            } else {
                "cmake, libclang-dev present"
            };
            Ok(format!("{fabric}; {build}"))
        },
    )?;
    step("cargo fmt --check", || {
        run("cargo fmt", cargo().args(["fmt", "--all", "--", "--check"]))?;
        Ok(String::new())
    })?;
    step("cargo clippy -D warnings", || {
        run(
            "cargo clippy",
            cargo().args([
                "clippy",
                "--quiet",
                "--workspace",
                "--all-targets",
                "--all-features",
                "--",
                "-D",
                "warnings",
            ]),
        )?;
        Ok(String::new())
    })?;
    step("cargo doc (broken links are errors)", || {
        run(
            "cargo doc",
            cargo()
                .args([
                    "doc",
                    "--quiet",
                    "--no-deps",
                    "--workspace",
                    "--all-features",
                ])
                .env("RUSTDOCFLAGS", "-D warnings"),
        )?;
        Ok(String::new())
    })?;
    step("unit, property and doc tests", || {
        // apus-intercept's export test opens the cdylib, which `cargo test`
        // does not build.
        run(
            "building the interception library",
            cargo().args(["build", "--quiet", "--package", "apus-intercept"]),
        )?;
        run(
            "cargo test",
            cargo().args(["test", "--quiet", "--workspace", "--all-features"]),
        )?;
        Ok(String::new())
    })?;
    let bin = build_sim()?;
    step(&format!("simulator: {CI_SEEDS} seeds"), || {
        let seeds = CI_SEEDS.to_string();
        let (n, v, out) = sim_run(&bin, &["--seeds", &seeds])?;
        if n != CI_SEEDS || v != 0 {
            bail!("{v} violations in {n} seeds:\n{out}");
        }
        let stats = out.lines().rev().nth(1).unwrap_or_default().to_string();
        Ok(stats)
    })?;
    for (bug, seeds) in PLANTED_BUGS {
        step(&format!("simulator catches the planted bug {bug}"), || {
            let seeds = seeds.to_string();
            let (n, v, _) = sim_run(&bin, &["--seeds", &seeds, "--bug", bug])?;
            if v == 0 {
                bail!("the planted bug {bug} went unnoticed in {n} seeds");
            }
            Ok(format!("{v} of {n} seeds report a violation"))
        })?;
    }
    for args in [
        &["--transport", "tcp"][..],
        &[
            "--transport",
            "tcp",
            "--durability",
            "durable",
            "--fsync",
            "always",
        ][..],
        &["--transport", "quic"][..],
        &["--transport", "fabric", "--provider", "shm"][..],
        &["--transport", "fabric", "--provider", "tcp;ofi_rxm"][..],
        &["--transport", "fabric", "--provider", "tcp"][..],
        // No RDMA device here: the replicas must settle on libfabric
        // (installed above), the best transport they all have.
        &[
            "--transport",
            "auto",
            "--expect-transport",
            "fabric",
            "--proposals",
            "20000",
        ][..],
    ] {
        step(
            &format!("cargo xtask cluster-test {}", args.join(" ")),
            || {
                let out = cargo()
                    .args(["xtask", "cluster-test"])
                    .args(args)
                    .output()
                    .context("running cluster-test")?;
                let stdout = String::from_utf8_lossy(&out.stdout);
                let stderr = String::from_utf8_lossy(&out.stderr);
                if !out.status.success() || !stdout.lines().any(|l| l.ends_with(": PASS")) {
                    bail!("cluster-test failed:\n{stdout}{stderr}");
                }
                let figures: Vec<&str> = stdout
                    .lines()
                    .skip_while(|l| !l.ends_with(": PASS"))
                    .skip(1)
                    .map(str::trim)
                    .collect();
                Ok(figures.join("\n      "))
            },
        )?;
    }
    step(
        "cargo xtask chaos (replicas in network namespaces: cut, flap, delay/loss, stop)",
        || {
            if !tools::running_as_root() {
                return Ok("SKIPPED: creating network namespaces needs root".into());
            }
            let out = xtask_expect(&["chaos"], "chaos: PASS")?;
            Ok(out)
        },
    )?;
    step(
        "example: replicated key-value store (apus/examples/kv.rs)",
        || {
            let out = cargo()
                .args(["run", "--quiet", "--package", "apus", "--example", "kv"])
                .output()
                .context("running the kv example")?;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let maps: Vec<&str> = stdout.lines().filter(|l| l.contains("): {")).collect();
            let same = maps.len() == 2
                && maps.windows(2).all(|w| {
                    w[0].split_once(": ").map(|x| x.1) == w[1].split_once(": ").map(|x| x.1)
                });
            if !out.status.success() || !same {
                bail!(
                    "kv example failed:\n{stdout}{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok("two surviving replicas hold the same map".into())
        },
    )?;
    for server in [
        "resp-kv",
        "memcached",
        "redis",
        "postgres",
        "slapd",
        "mariadb",
        "nginx",
    ] {
        step(&format!("cargo xtask e2e --server {server}"), || {
            xtask_expect(&["e2e", "--server", server], &format!("e2e {server}: PASS"))
        })?;
    }
    step("cargo xtask e2e --server redis --transport fabric", || {
        // 30k requests: minutes of sustained load over libfabric on two
        // cores end in an election nobody needed (issue 15), which drops
        // redis-benchmark's connections.
        xtask_expect(
            &[
                "e2e",
                "--server",
                "redis",
                "--transport",
                "fabric",
                "--requests",
                "30000",
            ],
            "e2e redis: PASS",
        )
    })?;
    step(
        "cargo xtask softroce (apus-rdma's verbs tests on Soft-RoCE in a qemu guest)",
        || xtask_expect(&["softroce"], "softroce: PASS"),
    )?;
    step(
        "micro-benchmarks, each run once (cargo test -p apus-bench --benches)",
        || {
            run(
                "cargo test --benches",
                cargo().args(["test", "--quiet", "--package", "apus-bench", "--benches"]),
            )?;
            Ok(String::new())
        },
    )?;
    step(
        "cargo xtask bench --smoke (tcp, redis, etcd; seconds long)",
        || xtask_expect(&["bench", "--smoke"], "bench: report in"),
    )?;
    step(
        "cargo xtask demo (three replicated resp-kv servers)",
        || xtask_expect(&["demo"], "demo: PASS"),
    )?;
    step("cargo xtask sim --demo (the simulated timeline)", || {
        let out = tools::own(&bin).arg("--demo").output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("demo failed:\n{stdout}");
        }
        Ok(stdout
            .lines()
            .find(|l| l.contains("failover"))
            .unwrap_or_default()
            .trim()
            .to_string())
    })?;
    println!("xtask test: PASS ({:.0}s)", start.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}
