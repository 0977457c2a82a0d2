//! `cargo xtask bench`: commit latency and throughput of real multi-process
//! clusters on this machine, per transport, against the transport's raw
//! write round trip, against bare and replicated Redis/memcached, and
//! against a three-member etcd cluster, all driven by the same load
//! generator (`apus-bench`, release build) in the same run.
//!
//! Output: `target/apus-bench/<timestamp>/` with `report.md`, `report.json`
//! and two SVG plots. Timings are measurements, never pass/fail.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use apus_core::Role;

use crate::e2e::{AppCluster, PortPool, ServerKind, status_at, target_dir};

const USAGE: &str = "\
usage: cargo xtask bench [--transport tcp,quic,fabric,verbs|all] [--provider P]
                         [--replicas 3,5,7] [--conns 1,8,32] [--size 64]
                         [--durability memory|durable] [--duration S]
                         [--app redis,memcached] [--pipeline 16] [--no-etcd] [--softroce]
                         [--kills 20] [--smoke]";

/// Transports in report order.
const ALL_TRANSPORTS: [&str; 4] = ["tcp", "quic", "fabric", "verbs"];

#[derive(Clone, Debug)]
struct Opts {
    transports: Vec<String>,
    all: bool,
    provider: String,
    replicas: Vec<usize>,
    conns: Vec<usize>,
    size: usize,
    durability: String,
    duration: f64,
    apps: Vec<ServerKind>,
    /// Requests sent at once per connection in the apps' pipelined points
    /// (1: none).
    pipeline: usize,
    /// Leader SIGKILLs of the failover points, per transport (0: none).
    kills: usize,
    etcd: bool,
    softroce: bool,
    /// Inside the Soft-RoCE guest: verbs points only, rows on stdout.
    in_guest: bool,
    apus_bin: Option<PathBuf>,
    bench_bin: Option<PathBuf>,
    command: String,
}

fn list<T: std::str::FromStr>(flag: &str, v: &str) -> Result<Vec<T>> {
    v.split(',')
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("{flag}: {s:?} is not a number"))
        })
        .collect()
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts> {
        let mut o = Opts {
            transports: Vec::new(),
            all: false,
            provider: "tcp;ofi_rxm".into(),
            replicas: vec![3, 5, 7],
            conns: vec![1, 8, 32],
            size: 64,
            durability: "memory".into(),
            duration: 5.0,
            apps: Vec::new(),
            pipeline: 16,
            kills: 20,
            etcd: true,
            softroce: false,
            in_guest: false,
            apus_bin: None,
            bench_bin: None,
            command: format!("cargo xtask bench {}", args.join(" ")),
        };
        let mut transport = "all".to_string();
        let mut smoke = false;
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--transport" => transport = value()?.clone(),
                "--provider" => o.provider = value()?.clone(),
                "--replicas" => o.replicas = list(flag, value()?)?,
                "--conns" => o.conns = list(flag, value()?)?,
                "--size" => o.size = list(flag, value()?)?[0],
                "--durability" => o.durability = value()?.clone(),
                "--duration" => o.duration = list(flag, value()?)?[0],
                "--app" => {
                    o.apps = value()?
                        .split(',')
                        .map(ServerKind::parse)
                        .collect::<Result<_>>()?
                }
                "--pipeline" => o.pipeline = list(flag, value()?)?[0],
                "--kills" => o.kills = list(flag, value()?)?[0],
                "--no-etcd" => o.etcd = false,
                "--softroce" => o.softroce = true,
                "--smoke" => smoke = true,
                "--in-guest" => o.in_guest = true,
                "--apus-bin" => o.apus_bin = Some(PathBuf::from(value()?)),
                "--bench-bin" => o.bench_bin = Some(PathBuf::from(value()?)),
                "-h" | "--help" => bail!("{USAGE}"),
                other => bail!("unknown argument {other:?}\n{USAGE}"),
            }
        }
        o.all = transport == "all";
        o.transports = if o.all {
            ALL_TRANSPORTS.iter().map(|t| t.to_string()).collect()
        } else {
            let chosen: Vec<String> = transport.split(',').map(|t| t.trim().to_string()).collect();
            if let Some(bad) = chosen
                .iter()
                .find(|t| !ALL_TRANSPORTS.contains(&t.as_str()))
            {
                bail!("--transport {bad:?}: tcp, quic, fabric or verbs (comma-separated), or all");
            }
            // Report order, once each.
            ALL_TRANSPORTS
                .iter()
                .filter(|t| chosen.iter().any(|c| c == *t))
                .map(|t| t.to_string())
                .collect()
        };
        if smoke {
            // Seconds long: keeps every path of the bench working in CI.
            o.transports = vec!["tcp".into()];
            o.all = false;
            o.replicas = vec![3];
            o.conns = vec![2];
            o.duration = 0.5;
            o.apps = vec![ServerKind::Redis];
            o.kills = 3;
        }
        ensure!(
            o.replicas
                .iter()
                .all(|&r| (3..=7).contains(&r) && r % 2 == 1),
            "--replicas: odd counts from 3 to 7"
        );
        ensure!(
            !o.conns.is_empty() && o.conns.iter().all(|&c| (1..=256).contains(&c)),
            "--conns: 1 to 256 each"
        );
        ensure!(
            (1..=256).contains(&o.pipeline),
            "--pipeline: 1 (none) to 256 requests at once"
        );
        ensure!(
            (8..=4096).contains(&o.size),
            "--size: 8 to 4096 bytes (the engine's max_payload here)"
        );
        ensure!(
            matches!(o.durability.as_str(), "memory" | "durable"),
            "--durability memory|durable"
        );
        ensure!(
            o.duration > 0.0 && o.duration <= 600.0,
            "--duration: seconds, up to 600"
        );
        Ok(o)
    }
}

impl Opts {
    /// The apps' points: every connection count one request at a time,
    /// then pipelined.
    fn app_points(&self) -> Vec<(usize, usize)> {
        let depths: &[usize] = if self.pipeline > 1 {
            &[1, self.pipeline]
        } else {
            &[1]
        };
        depths
            .iter()
            .flat_map(|&d| self.conns.iter().map(move |&c| (c, d)))
            .collect()
    }
}

/// One measurement (`apus-bench`'s RESULT line).
#[derive(Clone, Copy, Debug, Default)]
struct Measure {
    ops: u64,
    errors: u64,
    throughput: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    /// CPU time (user + system) the server's processes spent per
    /// operation, in us: for a replicated server, all three replicas
    /// together (the node runs inside them). `None` where not measured.
    cpu_per_op: Option<f64>,
}

impl Measure {
    fn parse(line: &str) -> Option<Measure> {
        let rest = line.trim().strip_prefix("RESULT ")?;
        let mut m = Measure::default();
        for kv in rest.split_whitespace() {
            let (k, v) = kv.split_once('=')?;
            let Ok(f) = v.parse::<f64>() else {
                continue; // a label (guest rows carry kind=, transport=)
            };
            match k {
                "ops" => m.ops = f as u64,
                "errors" => m.errors = f as u64,
                "throughput" => m.throughput = f,
                "p50_us" => m.p50 = f,
                "p99_us" => m.p99 = f,
                "p999_us" => m.p999 = f,
                "max_us" => m.max = f,
                "cpu_per_op_us" => m.cpu_per_op = Some(f),
                _ => {}
            }
        }
        Some(m)
    }

    fn fields(&self) -> String {
        let cpu = self
            .cpu_per_op
            .map_or(String::new(), |c| format!(" cpu_per_op_us={c:.2}"));
        format!(
            "ops={} errors={} throughput={:.1} p50_us={:.2} p99_us={:.2} p999_us={:.2} max_us={:.2}{cpu}",
            self.ops, self.errors, self.throughput, self.p50, self.p99, self.p999, self.max
        )
    }
}

/// A row of the report.
#[derive(Clone, Debug)]
struct Row {
    /// `rtt`, `apus`, `app` or `etcd`.
    kind: String,
    /// The transport (`bare` for an app without APUS, `-` for etcd).
    transport: String,
    /// For `app`: the server; otherwise empty.
    system: String,
    replicas: usize,
    conns: usize,
    /// Requests sent at once per connection (1: one at a time).
    pipeline: usize,
    emulated: bool,
    m: Measure,
}

impl Row {
    /// The line the guest prints and the host reads back.
    fn guest_line(&self) -> String {
        format!(
            "BENCH_ROW kind={} transport={} replicas={} conns={} {}",
            self.kind,
            self.transport,
            self.replicas,
            self.conns,
            self.m.fields()
        )
    }

    fn from_guest_line(line: &str) -> Option<Row> {
        let rest = line.trim().strip_prefix("BENCH_ROW ")?;
        let field = |k: &str| {
            rest.split_whitespace()
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
        };
        Some(Row {
            kind: field("kind")?.to_string(),
            transport: field("transport")?.to_string(),
            system: String::new(),
            replicas: field("replicas")?.parse().ok()?,
            conns: field("conns")?.parse().ok()?,
            pipeline: 1,
            emulated: true,
            m: Measure::parse(&format!("RESULT {rest}"))?,
        })
    }
}

/// Counts points and draws a progress bar, one line per point.
struct Progress {
    done: usize,
    total: usize,
    started: Instant,
}

impl Progress {
    fn step(&mut self, what: &str) {
        self.done += 1;
        let width = 30;
        let filled = width * self.done.min(self.total) / self.total.max(1);
        eprintln!(
            "bench [{}{}] {}/{} {:>5.0}s  {what}",
            "#".repeat(filled),
            ".".repeat(width - filled),
            self.done,
            self.total,
            self.started.elapsed().as_secs_f64()
        );
    }
}

pub fn run_bench(args: &[String]) -> Result<ExitCode> {
    let o = Opts::parse(args)?;
    if o.in_guest {
        return in_guest(&o);
    }
    let rdma = rdma_device_present();
    let mut local: Vec<String> = Vec::new();
    let mut guest = false;
    let mut notes: Vec<String> = Vec::new();
    for t in &o.transports {
        if t == "verbs" && !rdma {
            if o.softroce {
                guest = true;
            } else if o.all {
                notes.push(
                    "verbs: SKIPPED, no RDMA device on this host (/sys/class/infiniband is empty); \
                     `--softroce` runs its points emulated in a Soft-RoCE guest"
                        .into(),
                );
            } else {
                bail!(
                    "--transport verbs: no RDMA device found (/sys/class/infiniband is empty); \
                     run the verbs points emulated inside a Soft-RoCE guest with --softroce"
                );
            }
        } else {
            local.push(t.clone());
        }
    }
    let bins = crate::e2e::build_release()?;
    let bench_bin = build_bench()?;
    for kind in &o.apps {
        kind.ensure_installed()?;
    }
    if o.etcd {
        crate::tools::ensure(&["etcd"])?;
    }
    let out = target_dir().join("apus-bench").join(timestamp());
    std::fs::create_dir_all(&out)?;
    let pin = Pinning::new();
    // Described before pinning narrows what this process sees.
    let machine = machine();
    // The guest first, while qemu may still use every core.
    let guest_rows = if guest {
        softroce_points(&o, &bins.apus, &bench_bin)?
    } else {
        Vec::new()
    };
    pin.pin_self()?;
    let replicated_apps = local
        .iter()
        .filter(|t| matches!(t.as_str(), "tcp" | "quic" | "fabric"))
        .count();
    let mut p = Progress {
        done: 0,
        total: local.len()
            * (RTT_POLICIES.len() + o.replicas.len() * o.conns.len() + usize::from(o.kills > 0))
            + o.apps.len() * o.app_points().len() * (1 + replicated_apps)
            + if o.etcd { o.conns.len() } else { 0 }
            + usize::from(guest),
        started: Instant::now(),
    };
    let mut rows: Vec<Row> = Vec::new();
    for t in &local {
        let dir = out.join(t);
        let cluster = ApusCluster::new(&o, t, 3, &bins.apus, &dir.join("rtt"), &pin)?;
        for (kind, poll) in RTT_POLICIES {
            let rtt = cluster.rtt(&bench_bin, &pin, poll)?;
            p.step(&format!(
                "{t}: raw write round trip ({poll}) p50 {:.1} us, p99 {:.1} us",
                rtt.p50, rtt.p99
            ));
            rows.push(Row {
                kind: kind.into(),
                transport: t.clone(),
                system: String::new(),
                replicas: 2,
                conns: 1,
                pipeline: 1,
                emulated: false,
                m: rtt,
            });
        }
        if o.kills > 0 {
            // Unpinned, with the default engine settings: what users get.
            let steady = Duration::from_secs_f64(o.duration.clamp(0.5, 3.0));
            let f = crate::failover::measure(
                &bins.apus,
                &dir.join("failover"),
                // No [engine] table: the defaults users get.
                (&cluster_table(&o, t), ""),
                o.kills,
                steady,
            )?;
            p.step(&format!("{t}: failover, {}", f.summary()));
            notes.push(format!(
                "failover over apus/{t} (3 `apus node` replicas, default engine settings: \
                 1 ms heartbeat, 10 ms election timeout; one proposer): {}",
                f.summary()
            ));
        }
        for &r in &o.replicas {
            let mut cluster =
                ApusCluster::new(&o, t, r, &bins.apus, &dir.join(format!("r{r}")), &pin)?;
            cluster.start()?;
            for &c in &o.conns {
                let m = cluster.load(&bench_bin, &o, c, &pin)?;
                p.step(&format!(
                    "{t}: {r} replicas, {c} conns: {:.0}/s, p50 {:.1} us, p99 {:.1} us",
                    m.throughput, m.p50, m.p99
                ));
                rows.push(Row {
                    kind: "apus".into(),
                    transport: t.clone(),
                    system: String::new(),
                    replicas: r,
                    conns: c,
                    pipeline: 1,
                    emulated: false,
                    m,
                });
            }
        }
    }
    for &kind in &o.apps {
        for (c, depth) in o.app_points() {
            let m = bare_app(kind, &bins, &bench_bin, &o, (c, depth), &out, &pin)?;
            p.step(&format!(
                "{} bare, {c} conns x{depth}: {:.0}/s, p50 {:.1} us",
                kind.name(),
                m.throughput,
                m.p50
            ));
            rows.push(Row {
                kind: "app".into(),
                transport: "bare".into(),
                system: kind.name().into(),
                replicas: 1,
                conns: c,
                pipeline: depth,
                emulated: false,
                m,
            });
        }
        for t in local
            .iter()
            .filter(|t| matches!(t.as_str(), "tcp" | "quic" | "fabric"))
        {
            let transport_lines = match t.as_str() {
                "fabric" => format!(
                    "transport = \"fabric\"\nprovider = \"{}\"\n{}",
                    o.provider,
                    lo_domain(&o.provider)
                ),
                t => format!("transport = \"{t}\"\n"),
            };
            let mut app =
                AppCluster::with_transport(kind, bins.clone(), "apus-bench", &transport_lines)?;
            // Every request through consensus: a follower never serves.
            app.refuse_follower_clients()?;
            for i in 0..3 {
                app.start(i)?;
            }
            let mut leader = app.wait_ready(&[0, 1, 2], Duration::from_secs(60))?;
            let top_term = |app: &AppCluster| {
                (0..3)
                    .filter_map(|i| app.replica_status(i))
                    .map(|s| s.term)
                    .max()
                    .unwrap_or(0)
            };
            let first_term = top_term(&app);
            let points_started = Instant::now();
            for (c, depth) in o.app_points() {
                let pids: Vec<u32> = (0..3).flat_map(|i| app.server_pids(i)).collect();
                let measured = with_cpu(&o, &pids, || {
                    run_load(
                        &bench_bin,
                        &[kind.name(), "--addr", &app.apps[leader].to_string()],
                        &o,
                        (c, depth),
                        &pin,
                    )
                });
                let point = format!("{} over apus/{t}, {c} conns x{depth}", kind.name());
                if app.leader() != Some(leader) {
                    notes.push(format!(
                        "{point}: the leader changed during the point (requests to the old one failed and were retried, or the point has no result)"
                    ));
                    // The next points go to the new leader.
                    leader = app.wait_ready(&[0, 1, 2], Duration::from_secs(60))?;
                }
                let m = match measured {
                    Ok(m) => m,
                    Err(e) => {
                        // Reported, not fatal: the other points still say
                        // something.
                        notes.push(format!("{point}: no result: {e:#}"));
                        p.step(&format!("{point}: FAILED (see the notes)"));
                        continue;
                    }
                };
                p.step(&format!(
                    "{point}: {:.0}/s, p50 {:.1} us",
                    m.throughput, m.p50
                ));
                rows.push(Row {
                    kind: "app".into(),
                    transport: t.clone(),
                    system: kind.name().into(),
                    replicas: 3,
                    conns: c,
                    pipeline: depth,
                    emulated: false,
                    m,
                });
            }
            notes.push(format!(
                "{} over apus/{t}: {} spurious elections (term changes; nothing was killed) \
                 in {:.0} s of its points (engine: the e2e clusters' 2 ms heartbeat and 100 ms \
                 election timeout)",
                kind.name(),
                top_term(&app).saturating_sub(first_term),
                points_started.elapsed().as_secs_f64()
            ));
        }
    }
    if o.etcd {
        let etcd = EtcdCluster::start(&o, &out.join("etcd"), &pin)?;
        for &c in &o.conns {
            let m = run_load(
                &bench_bin,
                &["etcd", "--addr", &etcd.leader.to_string()],
                &o,
                (c, 1),
                &pin,
            )?;
            p.step(&format!(
                "etcd, {c} conns: {:.0}/s, p50 {:.1} us, p99 {:.1} us",
                m.throughput, m.p50, m.p99
            ));
            rows.push(Row {
                kind: "etcd".into(),
                transport: "-".into(),
                system: "etcd".into(),
                replicas: 3,
                conns: c,
                pipeline: 1,
                emulated: false,
                m,
            });
        }
        notes.push(format!(
            "etcd {}: data directories {} (APUS {} mode)",
            etcd.version,
            if o.durability == "memory" {
                "on tmpfs (/dev/shm), fsync cheap"
            } else {
                "on disk, fsync per commit"
            },
            o.durability
        ));
    }
    if guest {
        p.step(&format!(
            "verbs (Soft-RoCE guest, run first): {} points",
            guest_rows.len()
        ));
        rows.extend(guest_rows);
    }
    let report = Report {
        machine,
        o: &o,
        rows: &rows,
        notes: &notes,
        pin: &pin,
    };
    report.write(&out)?;
    println!("{}", std::fs::read_to_string(out.join("report.md"))?);
    println!("bench: report in {}", out.display());
    Ok(ExitCode::SUCCESS)
}

fn rdma_device_present() -> bool {
    std::fs::read_dir("/sys/class/infiniband").is_ok_and(|mut d| d.next().is_some())
}

fn lo_domain(provider: &str) -> &'static str {
    if provider.starts_with("tcp") {
        "domain = \"lo\"\n"
    } else {
        ""
    }
}

fn timestamp() -> String {
    let out = crate::tools::command("date")
        .ok()
        .and_then(|mut c| c.args(["-u", "+%Y%m%dT%H%M%SZ"]).output().ok())
        .filter(|o| o.status.success());
    match out {
        Some(o) => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .to_string(),
    }
}

/// `apus-bench` in release, with every transport and the etcd target.
fn build_bench() -> Result<PathBuf> {
    crate::run(
        "building apus-bench (release)",
        crate::cargo().args([
            "build",
            "--quiet",
            "--release",
            "--package",
            "apus-bench",
            "--features",
            "apus-bench/etcd,apus-bench/quic,apus-bench/fabric,apus-bench/verbs",
        ]),
    )?;
    let bin = target_dir().join("release").join("apus-bench");
    ensure!(bin.is_file(), "the build did not produce {}", bin.display());
    Ok(bin)
}

/// Which cores run what: the load generator gets the last core, servers
/// the others (each replica its own where there are enough).
#[derive(Clone, Copy, Debug)]
struct Pinning {
    cores: usize,
}

impl Pinning {
    fn new() -> Pinning {
        Pinning {
            cores: thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    fn load_cpu(&self) -> String {
        (self.cores - 1).to_string()
    }

    fn server_cpus(&self) -> String {
        match self.cores {
            1 => "0".into(),
            2 => "0".into(),
            n => format!("0-{}", n - 2),
        }
    }

    fn all_cpus(&self) -> String {
        format!("0-{}", self.cores - 1)
    }

    /// Cores for replica `i` of `n`.
    fn replica_cpus(&self, i: usize, n: usize) -> String {
        if self.cores > n {
            i.to_string()
        } else {
            self.server_cpus()
        }
    }

    /// This process (and so every server it starts) on the server cores;
    /// the load generator is moved to its own core when started.
    fn pin_self(&self) -> Result<()> {
        if self.cores < 2 {
            return Ok(());
        }
        crate::run(
            "taskset",
            crate::tools::command("taskset")?
                .args(["-a", "-p", "-c", &self.server_cpus()])
                .arg(std::process::id().to_string())
                .stdout(Stdio::null()),
        )
    }

    /// `program` started on `cpus` (unpinned on one core).
    fn command(&self, cpus: &str, program: &Path) -> Result<Command> {
        if self.cores < 2 {
            return Ok(crate::tools::own(program));
        }
        let mut c = crate::tools::command("taskset")?;
        c.args(["-c", cpus]).arg(program);
        Ok(c)
    }

    fn describe(&self) -> String {
        if self.cores < 2 {
            "one core: nothing pinned".into()
        } else {
            format!(
                "{} cores: load generator on core {}, servers on core(s) {}{}",
                self.cores,
                self.load_cpu(),
                self.server_cpus(),
                if self.cores > 3 {
                    " (one core per replica where they fit)"
                } else {
                    ""
                }
            )
        }
    }
}

/// Runs the load generator on its core; its RESULT line.
/// Seconds of load before the measured part of a point.
fn warmup(o: &Opts) -> f64 {
    (o.duration / 5.0).clamp(0.2, 1.0)
}

/// CPU time (utime + stime) the processes `pids` have used, in seconds
/// (processes that are gone count nothing).
fn cpu_seconds(pids: &[u32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name: state is the first, utime the
            // 12th, stime the 13th.
            let rest = &stat[stat.rfind(')')? + 1..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .sum()
}

/// Runs a load point and charges it the CPU that `pids` (the server's
/// processes) used meanwhile, per operation. The warm-up's share is taken
/// out pro rata by time (the load generator counts only measured
/// operations).
fn with_cpu(o: &Opts, pids: &[u32], point: impl FnOnce() -> Result<Measure>) -> Result<Measure> {
    let before = cpu_seconds(pids);
    let mut m = point()?;
    let used = (cpu_seconds(pids) - before).max(0.0);
    let measured = used * o.duration / (o.duration + warmup(o));
    m.cpu_per_op = (m.ops > 0).then(|| measured * 1e6 / m.ops as f64);
    Ok(m)
}

/// `apus-bench load` against `target`: `conns` connections, each sending
/// `pipeline` requests at once.
fn run_load(
    bench: &Path,
    target: &[&str],
    o: &Opts,
    (conns, pipeline): (usize, usize),
    pin: &Pinning,
) -> Result<Measure> {
    let mut c = pin.command(&pin.load_cpu(), bench)?;
    c.args(["load", "--target"]).args(target);
    c.args([
        "--conns",
        &conns.to_string(),
        "--pipeline",
        &pipeline.to_string(),
        "--size",
        &o.size.to_string(),
        "--duration",
        &o.duration.to_string(),
        "--warmup",
        &warmup(o).to_string(),
    ]);
    let out = c.output().context("running apus-bench")?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.lines().find_map(Measure::parse) {
        Some(m) if out.status.success() => Ok(m),
        _ => bail!(
            "apus-bench load {}: {}{}",
            target.join(" "),
            text,
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The cluster's poll policy in every benchmarked configuration.
const CLUSTER_POLL: &str = "park";
/// The raw round trip's row kinds and how each polls: with the cluster's
/// own policy (the baseline every ratio uses) and spinning (the
/// transport's best).
const RTT_POLICIES: [(&str, &str); 2] = [("rtt", CLUSTER_POLL), ("rtt-spin", "spin")];

/// `replicas` processes of `apus node`.
struct ApusCluster {
    bin: PathBuf,
    dir: PathBuf,
    config: PathBuf,
    clients: Vec<SocketAddr>,
    children: Vec<Child>,
    replicas: usize,
    pin_cpus: Vec<String>,
    pin: Pinning,
}

/// The `[cluster]` table of the bench's `apus node` clusters.
fn cluster_table(o: &Opts, transport: &str) -> String {
    let mut cfg = format!(
        "# written by cargo xtask bench\n[cluster]\nsecret = \"apus-bench secret {}\"\n\
         durability = \"{}\"\ntransport = \"{transport}\"\npoll = \"{CLUSTER_POLL}\"\n",
        std::process::id(),
        o.durability
    );
    if o.durability == "durable" {
        cfg += "fsync = \"always\"\n";
    }
    if transport == "fabric" {
        cfg += &format!("provider = \"{}\"\n{}", o.provider, lo_domain(&o.provider));
    }
    cfg
}

impl ApusCluster {
    fn new(
        o: &Opts,
        transport: &str,
        replicas: usize,
        bin: &Path,
        dir: &Path,
        pin: &Pinning,
    ) -> Result<ApusCluster> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let cfg = cluster_table(o, transport);
        let engine =
            "[engine]\nheartbeat_us = 2000\nelection_timeout_us = 50000\nmax_payload = 4096\n";
        let (config, clients) =
            crate::cluster::write_config(bin, dir, &cfg, engine, replicas, transport == "quic")?;
        Ok(ApusCluster {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            config,
            clients,
            children: Vec::new(),
            replicas,
            pin_cpus: (0..replicas)
                .map(|i| pin.replica_cpus(i, replicas))
                .collect(),
            pin: *pin,
        })
    }

    fn start(&mut self) -> Result<()> {
        for i in 0..self.replicas {
            let log = std::fs::File::create(self.dir.join(format!("n{i}.log")))?;
            let child = self
                .pin
                .command(&self.pin_cpus[i], &self.bin)?
                .args(["node", "--config"])
                .arg(&self.config)
                .args(["--id", &i.to_string()])
                .env("RUST_LOG", "warn")
                .current_dir(&self.dir)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting apus node")?;
            self.children.push(child);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st: Vec<_> = self.clients.iter().map(|&a| status_at(a)).collect();
            if st.iter().all(Option::is_some)
                && st
                    .iter()
                    .flatten()
                    .filter(|s| s.role == Role::Leader)
                    .count()
                    == 1
            {
                return Ok(());
            }
            for (i, c) in self.children.iter_mut().enumerate() {
                if let Some(s) = c.try_wait()? {
                    bail!("replica {i} exited ({s}); log in {}", self.dir.display());
                }
            }
            ensure!(
                Instant::now() < deadline,
                "no leader within 60 s; logs in {}",
                self.dir.display()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn load(&self, bench: &Path, o: &Opts, conns: usize, pin: &Pinning) -> Result<Measure> {
        let clients = self
            .clients
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(",");
        run_load(bench, &["apus", "--clients", &clients], o, (conns, 1), pin)
            .with_context(|| format!("logs in {}", self.dir.display()))
    }

    /// The transport's raw write round trip between replicas 0 and 1, both
    /// ends polling as `poll` says.
    fn rtt(&self, bench: &Path, pin: &Pinning, poll: &str) -> Result<Measure> {
        // Both ends in one process: every core, as the two replicas of a
        // cluster would have.
        let out = pin
            .command(&pin.all_cpus(), bench)?
            .args(["rtt", "--config"])
            .arg(&self.config)
            .args(["--count", "3000", "--poll", poll])
            .current_dir(&self.dir)
            .output()
            .context("running apus-bench rtt")?;
        let text = String::from_utf8_lossy(&out.stdout);
        match text.lines().find_map(Measure::parse) {
            Some(m) if out.status.success() => Ok(m),
            _ => bail!(
                "apus-bench rtt: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }
}

impl Drop for ApusCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The server alone, no APUS, on the server cores.
fn bare_app(
    kind: ServerKind,
    bins: &crate::e2e::Binaries,
    bench: &Path,
    o: &Opts,
    point: (usize, usize),
    out: &Path,
    pin: &Pinning,
) -> Result<Measure> {
    let dir = out.join(format!("{}-bare", kind.name()));
    std::fs::create_dir_all(&dir)?;
    let addr = PortPool::default().tcp()?;
    kind.prepare(&dir, addr.port())?;
    let argv = kind.command(bins, addr.port(), &dir)?;
    let mut child = crate::tools::server(&argv[0])?
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", argv[0]))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            bail!("{} did not listen on {addr}", kind.name());
        }
        thread::sleep(Duration::from_millis(20));
    }
    let mut pids = apus::supervisor::tree::descendants(child.id());
    pids.push(child.id());
    let m = with_cpu(o, &pids, || {
        run_load(
            bench,
            &[kind.name(), "--addr", &addr.to_string()],
            o,
            point,
            pin,
        )
    });
    let _ = child.kill();
    let _ = child.wait();
    m
}

/// Three etcd members on loopback, data on tmpfs (memory) or disk
/// (durable).
struct EtcdCluster {
    children: Vec<Child>,
    leader: SocketAddr,
    version: String,
    data: PathBuf,
}

impl EtcdCluster {
    fn start(o: &Opts, dir: &Path, _pin: &Pinning) -> Result<EtcdCluster> {
        std::fs::create_dir_all(dir)?;
        let data = if o.durability == "memory" {
            PathBuf::from(format!("/dev/shm/apus-bench-etcd-{}", std::process::id()))
        } else {
            dir.join("data")
        };
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data)?;
        let version = crate::tools::command("etcd")?
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .find_map(|l| l.strip_prefix("etcd Version: ").map(str::to_string))
            })
            .unwrap_or_else(|| "?".into());
        let mut pool = PortPool::default();
        let members: Vec<(SocketAddr, SocketAddr)> = (0..3)
            .map(|_| Ok((pool.tcp()?, pool.tcp()?)))
            .collect::<Result<_>>()?;
        drop(pool);
        let initial = members
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut children = Vec::new();
        for (i, (client, peer)) in members.iter().enumerate() {
            let log = std::fs::File::create(dir.join(format!("m{i}.log")))?;
            children.push(
                crate::tools::command("etcd")?
                    .args(["--name", &format!("m{i}")])
                    .arg("--data-dir")
                    .arg(data.join(format!("m{i}")))
                    .args(["--listen-client-urls", &format!("http://{client}")])
                    .args(["--advertise-client-urls", &format!("http://{client}")])
                    .args(["--listen-peer-urls", &format!("http://{peer}")])
                    .args(["--initial-advertise-peer-urls", &format!("http://{peer}")])
                    .args(["--initial-cluster", &initial])
                    .args(["--initial-cluster-state", "new"])
                    .args([
                        "--initial-cluster-token",
                        &format!("apus-bench-{}", std::process::id()),
                    ])
                    .args(["--log-level", "warn", "--logger", "zap"])
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()
                    .context("starting etcd")?,
            );
        }
        let mut c = EtcdCluster {
            children,
            leader: members[0].0,
            version,
            data,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let leader = members.iter().find_map(|(client, _)| {
                let s = http_post(*client, "/v3/maintenance/status", "{}").ok()?;
                let me = json_str(&s, "member_id")?;
                (json_str(&s, "leader")? == me).then_some(*client)
            });
            if let Some(l) = leader {
                c.leader = l;
                return Ok(c);
            }
            for (i, ch) in c.children.iter_mut().enumerate() {
                if let Some(s) = ch.try_wait()? {
                    bail!("etcd member {i} exited ({s}); log in {}", dir.display());
                }
            }
            ensure!(
                Instant::now() < deadline,
                "etcd elected no leader within 60 s; logs in {}",
                dir.display()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if self.data.starts_with("/dev/shm") {
            let _ = std::fs::remove_dir_all(&self.data);
        }
    }
}

/// A one-shot HTTP/1.1 POST; the response body.
fn http_post(addr: SocketAddr, path: &str, body: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").context("no HTTP body")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "HTTP: {head}");
    Ok(body.to_string())
}

/// The string value of the first `"key":"value"` in `json`.
fn json_str(json: &str, key: &str) -> Option<String> {
    let at = json.find(&format!("\"{key}\":\""))? + key.len() + 4;
    Some(json[at..].split('"').next()?.to_string())
}

/// Runs the verbs points inside the Soft-RoCE guest; its rows, labelled
/// emulated.
fn softroce_points(o: &Opts, apus: &Path, bench: &Path) -> Result<Vec<Row>> {
    let join = |v: &[usize]| {
        v.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let script = format!(
        "export CARGO_TARGET_DIR=/tmp/target\n\
         /usr/bin/xtask bench --in-guest --transport verbs --replicas {} --conns {} --size {} \
         --durability {} --duration {} --apus-bin /usr/bin/apus --bench-bin /usr/bin/apus-bench 2>&1 \
         || fail \"bench in the guest\"\n",
        join(&o.replicas),
        join(&o.conns),
        o.size,
        o.durability,
        o.duration
    );
    let log = crate::softroce::run_in_guest(&[apus.to_path_buf(), bench.to_path_buf()], &script)?;
    let rows: Vec<Row> = log.iter().filter_map(|l| Row::from_guest_line(l)).collect();
    ensure!(
        rows.iter().any(|r| r.kind == "apus"),
        "the guest printed no benchmark rows"
    );
    Ok(rows)
}

/// Inside the guest: the verbs points, printed as rows.
fn in_guest(o: &Opts) -> Result<ExitCode> {
    let apus = o.apus_bin.clone().context("--in-guest needs --apus-bin")?;
    let bench = o
        .bench_bin
        .clone()
        .context("--in-guest needs --bench-bin")?;
    ensure!(rdma_device_present(), "no RDMA device in the guest");
    // One vCPU pair: no pinning.
    let pin = Pinning { cores: 1 };
    let out = target_dir().join("apus-bench-guest");
    let cluster = ApusCluster::new(o, "verbs", 3, &apus, &out.join("rtt"), &pin)?;
    let row = |kind: &str, replicas, conns, m| Row {
        kind: kind.into(),
        transport: "verbs".into(),
        system: String::new(),
        replicas,
        conns,
        pipeline: 1,
        emulated: true,
        m,
    };
    for (kind, poll) in RTT_POLICIES {
        let rtt = cluster.rtt(&bench, &pin, poll)?;
        println!("{}", row(kind, 2, 1, rtt).guest_line());
    }
    for &r in &o.replicas {
        let mut c = ApusCluster::new(o, "verbs", r, &apus, &out.join(format!("r{r}")), &pin)?;
        c.start()?;
        for &n in &o.conns {
            let m = c.load(&bench, o, n, &pin)?;
            println!("{}", row("apus", r, n, m).guest_line());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The report: markdown, JSON and plots.
struct Report<'a> {
    machine: String,
    o: &'a Opts,
    rows: &'a [Row],
    notes: &'a [String],
    pin: &'a Pinning,
}

fn machine() -> String {
    let cpu = crate::tools::command("lscpu")
        .ok()
        .and_then(|mut c| c.output().ok())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("Model name:").map(|m| m.trim().to_string()))
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or("?".into(), |kb| format!("{:.0} GiB", kb / 1048576.0));
    let os = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("PRETTY_NAME=")
                    .map(|v| v.trim_matches('"').to_string())
            })
        })
        .unwrap_or_else(|| "?".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or("?".into(), |k| k.trim().to_string());
    format!(
        "{cpu}, {} cores, {mem} memory, {os}, Linux {kernel}",
        thread::available_parallelism().map_or(1, |n| n.get())
    )
}

impl Report<'_> {
    /// The raw round trip measured as `kind` (see [`RTT_POLICIES`]).
    fn rtt(&self, transport: &str, kind: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.kind == kind && r.transport == transport)
    }

    fn apus(&self, transport: &str, replicas: usize, conns: usize) -> Option<&Row> {
        self.rows.iter().find(|r| {
            r.kind == "apus"
                && r.transport == transport
                && r.replicas == replicas
                && r.conns == conns
        })
    }

    fn transports(&self) -> Vec<String> {
        let mut t: Vec<String> = Vec::new();
        for r in self.rows.iter().filter(|r| r.kind == "apus") {
            if !t.contains(&r.transport) {
                t.push(r.transport.clone());
            }
        }
        t
    }

    fn label(&self, transport: &str) -> String {
        let emulated = self
            .rows
            .iter()
            .any(|r| r.transport == transport && r.emulated);
        match transport {
            "fabric" => format!("fabric ({})", self.o.provider),
            t if emulated => format!("{t} (Soft-RoCE, emulated)"),
            t => t.to_string(),
        }
    }

    /// Growth from the first to the last point, in percent.
    fn growth(first: f64, last: f64) -> String {
        if first > 0.0 {
            format!("{:+.0}%", (last / first - 1.0) * 100.0)
        } else {
            "-".into()
        }
    }

    fn write(&self, out: &Path) -> Result<()> {
        let o = self.o;
        let mut md = String::new();
        let _ = writeln!(md, "# APUS benchmark\n");
        let _ = writeln!(md, "- command: `{}`", o.command);
        let _ = writeln!(md, "- machine: {}", self.machine);
        let _ = writeln!(md, "- pinning: {}", self.pin.describe());
        let _ = writeln!(
            md,
            "- load: closed loop, one request outstanding per connection (servers: also `x{}`, that many sent at once, like redis-benchmark -P; each request's latency is its batch's), {} B values, {} s measured after a warm-up; durability {}{}",
            o.pipeline,
            o.size,
            o.duration,
            o.durability,
            if o.durability == "durable" {
                " (fsync = always)"
            } else {
                ""
            }
        );
        let _ = writeln!(
            md,
            "- latency in microseconds (HdrHistogram, 3 digits); ratio = commit latency / the transport's raw write round trip at the same percentile, measured with the cluster's poll policy (`{CLUSTER_POLL}`, like for like); `/ spin` = against the spinning round trip, the transport's best\n"
        );
        let _ = writeln!(md, "## Raw remote-write round trip (no consensus)\n");
        let _ = writeln!(
            md,
            "| transport | poll | p50 | p99 | p99.9 |\n|---|---|---:|---:|---:|"
        );
        for t in self.transports() {
            for (kind, poll) in RTT_POLICIES {
                if let Some(r) = self.rtt(&t, kind) {
                    let _ = writeln!(
                        md,
                        "| {} | {poll} | {:.1} | {:.1} | {:.1} |",
                        self.label(&t),
                        r.m.p50,
                        r.m.p99,
                        r.m.p999
                    );
                }
            }
        }
        let _ = writeln!(md, "\n## Commit latency and throughput\n");
        let _ = writeln!(
            md,
            "| transport | replicas | conns | commits/s | p50 | p99 | p99.9 | p50 / raw | p99 / raw | p50 / spin | errors |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        for t in self.transports() {
            let raw = self.rtt(&t, "rtt").map(|r| r.m);
            let spin = self.rtt(&t, "rtt-spin").map(|r| r.m);
            for &rep in &o.replicas {
                for &c in &o.conns {
                    let Some(r) = self.apus(&t, rep, c) else {
                        continue;
                    };
                    let ratio = |v: f64, base: Option<f64>| {
                        base.filter(|b| *b > 0.0)
                            .map_or("-".into(), |b| format!("{:.1}x", v / b))
                    };
                    let _ = writeln!(
                        md,
                        "| {} | {rep} | {c} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} |",
                        self.label(&t),
                        r.m.throughput,
                        r.m.p50,
                        r.m.p99,
                        r.m.p999,
                        ratio(r.m.p50, raw.map(|m| m.p50)),
                        ratio(r.m.p99, raw.map(|m| m.p99)),
                        ratio(r.m.p50, spin.map(|m| m.p50)),
                        r.m.errors
                    );
                }
            }
        }
        let (c0, c1) = (o.conns[0], *o.conns.last().expect("non-empty"));
        let (r0, r1) = (o.replicas[0], *o.replicas.last().expect("non-empty"));
        let _ = writeln!(md, "\n## Scaling (median commit latency growth)\n");
        let _ = writeln!(
            md,
            "| transport | conns {c0} -> {c1} ({r0} replicas) | replicas {r0} -> {r1} ({c0} conns) |\n|---|---:|---:|"
        );
        for t in self.transports() {
            let g = |a: Option<&Row>, b: Option<&Row>| match (a, b) {
                (Some(a), Some(b)) => Report::growth(a.m.p50, b.m.p50),
                _ => "-".into(),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                self.label(&t),
                g(self.apus(&t, r0, c0), self.apus(&t, r0, c1)),
                g(self.apus(&t, r0, c0), self.apus(&t, r1, c0)),
            );
        }
        let apps: Vec<&Row> = self.rows.iter().filter(|r| r.kind == "app").collect();
        if !apps.is_empty() {
            let _ = writeln!(
                md,
                "\n## Unmodified servers: bare vs replicated (3 replicas)\n"
            );
            let _ = writeln!(
                md,
                "| server | transport | conns | ops/s | p50 | p99 | CPU/op (us) | throughput vs bare | p50 vs bare | added p50 / raw | CPU/op vs bare |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for r in &apps {
                let bare = apps.iter().find(|b| {
                    b.system == r.system
                        && b.transport == "bare"
                        && (b.conns, b.pipeline) == (r.conns, r.pipeline)
                });
                // What replication adds to the median, in raw round trips
                // of the same transport and poll policy.
                let added = |b: &Row| {
                    self.rtt(&r.transport, "rtt")
                        .filter(|raw| raw.m.p50 > 0.0)
                        .map_or("-".into(), |raw| {
                            format!("{:.1}", (r.m.p50 - b.m.p50) / raw.m.p50)
                        })
                };
                let (tp, lat, added, cpu_ratio) = match bare {
                    Some(b) if r.transport != "bare" => (
                        format!("{:.2}x", r.m.throughput / b.m.throughput.max(1e-9)),
                        format!("{:.1}x", r.m.p50 / b.m.p50.max(1e-9)),
                        added(b),
                        match (r.m.cpu_per_op, b.m.cpu_per_op) {
                            (Some(x), Some(y)) if y > 0.0 => format!("{:.1}x", x / y),
                            _ => "-".into(),
                        },
                    ),
                    _ => ("1x".into(), "1x".into(), "-".into(), "1x".into()),
                };
                let cpu = r.m.cpu_per_op.map_or("-".into(), |c| format!("{c:.1}"));
                let _ = writeln!(
                    md,
                    "| {} | {} | {}{} | {:.0} | {:.1} | {:.1} | {cpu} | {tp} | {lat} | {added} | {cpu_ratio} |",
                    r.system,
                    r.transport,
                    r.conns,
                    if r.pipeline > 1 {
                        format!(" x{}", r.pipeline)
                    } else {
                        String::new()
                    },
                    r.m.throughput,
                    r.m.p50,
                    r.m.p99
                );
            }
        }
        let etcd: Vec<&Row> = self.rows.iter().filter(|r| r.kind == "etcd").collect();
        if !etcd.is_empty() {
            let _ = writeln!(
                md,
                "\n## Against etcd (3 members, put of {} B vs APUS commit of {} B, same load generator)\n",
                o.size, o.size
            );
            let _ = writeln!(
                md,
                "| conns | etcd puts/s | etcd p50 | etcd p99 | best APUS transport | APUS commits/s | APUS p50 | APUS p99 | throughput ratio | p50 ratio |\n|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|"
            );
            for e in &etcd {
                let best = self
                    .rows
                    .iter()
                    .filter(|r| {
                        r.kind == "apus" && r.replicas == 3 && r.conns == e.conns && !r.emulated
                    })
                    .min_by(|a, b| a.m.p50.total_cmp(&b.m.p50));
                if let Some(a) = best {
                    let _ = writeln!(
                        md,
                        "| {} | {:.0} | {:.1} | {:.1} | {} | {:.0} | {:.1} | {:.1} | {:.1}x | {:.2}x |",
                        e.conns,
                        e.m.throughput,
                        e.m.p50,
                        e.m.p99,
                        self.label(&a.transport),
                        a.m.throughput,
                        a.m.p50,
                        a.m.p99,
                        a.m.throughput / e.m.throughput.max(1e-9),
                        a.m.p50 / e.m.p50.max(1e-9)
                    );
                }
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(md, "\n## Notes\n");
            for n in self.notes {
                let _ = writeln!(md, "- {n}");
            }
        }
        let _ = writeln!(
            md,
            "\nPlots: `latency-vs-conns.svg`, `latency-vs-replicas.svg`. Raw data: `report.json`."
        );
        std::fs::write(out.join("report.md"), md)?;
        std::fs::write(out.join("report.json"), self.json())?;
        let series = |by_conns: bool| -> Vec<(String, Vec<(f64, f64)>)> {
            self.transports()
                .into_iter()
                .map(|t| {
                    let pts = if by_conns {
                        o.conns
                            .iter()
                            .filter_map(|&c| self.apus(&t, r0, c).map(|r| (c as f64, r.m.p50)))
                            .collect()
                    } else {
                        o.replicas
                            .iter()
                            .filter_map(|&rep| {
                                self.apus(&t, rep, c0).map(|r| (rep as f64, r.m.p50))
                            })
                            .collect()
                    };
                    (self.label(&t), pts)
                })
                .collect()
        };
        std::fs::write(
            out.join("latency-vs-conns.svg"),
            svg_plot(
                &format!("median commit latency vs connections ({r0} replicas)"),
                "concurrent connections",
                &series(true),
            ),
        )?;
        std::fs::write(
            out.join("latency-vs-replicas.svg"),
            svg_plot(
                &format!("median commit latency vs replicas ({c0} connections)"),
                "replicas",
                &series(false),
            ),
        )?;
        Ok(())
    }

    fn json(&self) -> String {
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let mut j = String::from("{\n");
        let _ = writeln!(j, "  \"command\": \"{}\",", esc(&self.o.command));
        let _ = writeln!(j, "  \"machine\": \"{}\",", esc(&self.machine));
        let _ = writeln!(j, "  \"pinning\": \"{}\",", esc(&self.pin.describe()));
        let _ = writeln!(j, "  \"size\": {},", self.o.size);
        let _ = writeln!(j, "  \"durability\": \"{}\",", self.o.durability);
        let _ = writeln!(j, "  \"duration_s\": {},", self.o.duration);
        let _ = writeln!(j, "  \"latency_unit\": \"us\",");
        j += "  \"rows\": [\n";
        for (i, r) in self.rows.iter().enumerate() {
            let _ = write!(
                j,
                "    {{\"kind\": \"{}\", \"transport\": \"{}\", \"system\": \"{}\", \"replicas\": {}, \"conns\": {}, \"emulated\": {}, \"ops\": {}, \"errors\": {}, \"throughput\": {:.1}, \"p50\": {:.2}, \"p99\": {:.2}, \"p999\": {:.2}, \"max\": {:.2}}}",
                r.kind,
                esc(&r.transport),
                esc(&r.system),
                r.replicas,
                r.conns,
                r.emulated,
                r.m.ops,
                r.m.errors,
                r.m.throughput,
                r.m.p50,
                r.m.p99,
                r.m.p999,
                r.m.max
            );
            j += if i + 1 < self.rows.len() { ",\n" } else { "\n" };
        }
        j += "  ],\n  \"notes\": [";
        j += &self
            .notes
            .iter()
            .map(|n| format!("\"{}\"", esc(n)))
            .collect::<Vec<_>>()
            .join(", ");
        j += "]\n}\n";
        j
    }
}

/// A line plot of `series` (x, microseconds), log-scaled y when the values
/// span more than a decade.
fn svg_plot(title: &str, xlabel: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    const W: f64 = 640.0;
    const H: f64 = 400.0;
    const L: f64 = 70.0;
    const R: f64 = 180.0;
    const T: f64 = 40.0;
    const B: f64 = 50.0;
    const COLORS: [&str; 6] = [
        "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
    ];
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    let (xmin, xmax) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &(x, _)| (a.min(x), b.max(x)));
    let (ymin, ymax) = pts
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &(_, y)| (a.min(y), b.max(y)));
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">{title}</text>\n",
        (L + W - R) / 2.0
    );
    if pts.is_empty() {
        s += "<text x=\"50%\" y=\"50%\">no data</text>\n</svg>\n";
        return s;
    }
    let log = ymax / ymin.max(1e-9) > 10.0;
    let fy = |y: f64| if log { y.max(1e-3).log10() } else { y };
    let (y0, y1) = if log {
        (fy(ymin).floor(), fy(ymax).ceil())
    } else {
        (0.0, ymax * 1.1)
    };
    let xspan = (xmax - xmin).max(1e-9);
    let px = |x: f64| L + (x - xmin) / xspan * (W - L - R);
    let py = |y: f64| H - B - (fy(y) - y0) / (y1 - y0).max(1e-9) * (H - T - B);
    let _ = writeln!(
        s,
        "<line x1=\"{L}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{L}\" y1=\"{T}\" x2=\"{L}\" y2=\"{}\" stroke=\"black\"/>",
        H - B,
        W - R,
        H - B,
        H - B
    );
    let mut xs: Vec<f64> = pts.iter().map(|p| p.0).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    for x in xs {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{x}</text>",
            px(x),
            H - B + 16.0
        );
    }
    let ticks: Vec<f64> = if log {
        (y0 as i32..=y1 as i32).map(|e| 10f64.powi(e)).collect()
    } else {
        (0..=4).map(|i| y1 * i as f64 / 4.0).collect()
    };
    for y in ticks {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n<line x1=\"{L}\" y1=\"{:.1}\" x2=\"{}\" y2=\"{:.1}\" stroke=\"#ddd\"/>",
            L - 6.0,
            py(y) + 4.0,
            if y >= 10.0 {
                format!("{y:.0}")
            } else {
                format!("{y:.1}")
            },
            py(y),
            W - R,
            py(y)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{xlabel}</text>\n<text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">p50 commit latency (us{})</text>",
        (L + W - R) / 2.0,
        H - 12.0,
        (T + H - B) / 2.0,
        (T + H - B) / 2.0,
        if log { ", log scale" } else { "" }
    );
    for (i, (name, p)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path = p
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect::<Vec<_>>()
            .join(" ");
        let _ = writeln!(
            s,
            "<polyline points=\"{path}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>"
        );
        for &(x, y) in p {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>",
                px(x),
                py(y)
            );
        }
        let ly = T + 10.0 + i as f64 * 18.0;
        let _ = writeln!(
            s,
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"/>\n<text x=\"{}\" y=\"{}\">{name}</text>",
            W - R + 10.0,
            W - R + 30.0,
            W - R + 36.0,
            ly + 4.0
        );
    }
    s += "</svg>\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_survive_the_trip_out_of_the_guest() {
        let r = Row {
            kind: "apus".into(),
            transport: "verbs".into(),
            system: String::new(),
            replicas: 5,
            conns: 8,
            pipeline: 1,
            emulated: true,
            m: Measure {
                ops: 10,
                errors: 1,
                throughput: 2.5,
                p50: 3.25,
                p99: 4.5,
                p999: 5.0,
                max: 6.0,
                cpu_per_op: Some(7.25),
            },
        };
        let back = Row::from_guest_line(&r.guest_line()).expect("parses");
        assert_eq!((back.replicas, back.conns, back.m.ops), (5, 8, 10));
        assert!((back.m.p50 - 3.25).abs() < 1e-9 && back.emulated);
        assert_eq!(
            back.m.cpu_per_op,
            Some(7.25),
            "the CPU per operation travels too"
        );
    }

    #[test]
    fn bad_options_are_refused() {
        let parse = |a: &[&str]| Opts::parse(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(parse(&["--replicas", "4"]).is_err());
        assert!(parse(&["--transport", "smoke-signals"]).is_err());
        assert!(parse(&["--conns", "0"]).is_err());
        assert!(parse(&["--durability", "paper"]).is_err());
        assert!(parse(&["--transport", "tcp", "--replicas", "3,5"]).is_ok());
        assert!(parse(&["--transport", "tcp,carrier-pigeon"]).is_err());
        assert!(parse(&["--pipeline", "0"]).is_err());
        let o = parse(&[
            "--transport",
            "fabric,tcp",
            "--conns",
            "1,8",
            "--pipeline",
            "16",
        ])
        .unwrap();
        assert_eq!(o.transports, ["tcp", "fabric"], "report order");
        assert_eq!(o.app_points(), [(1, 1), (8, 1), (1, 16), (8, 16)]);
    }

    #[test]
    fn the_plot_is_svg_with_one_line_per_series() {
        let s = svg_plot(
            "t",
            "x",
            &[
                ("a".into(), vec![(1.0, 10.0), (8.0, 20.0)]),
                ("b".into(), vec![(1.0, 100.0), (8.0, 900.0)]),
            ],
        );
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert_eq!(s.matches("<polyline").count(), 2);
    }
}
