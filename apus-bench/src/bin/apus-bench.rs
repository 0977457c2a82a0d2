//! The load generator and probes `cargo xtask bench` runs (release build).
//!
//! ```text
//! apus-bench load --target apus --clients A,B,C   --conns N --size S --duration SECS [--warmup SECS]
//! apus-bench load --target redis|memcached|etcd --addr A   (same options)
//! apus-bench rtt  --config CLUSTER.toml [--count N] [--poll spin|hybrid|park]
//! ```
//!
//! Each prints one `RESULT key=value ...` line on success.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use apus_bench::appclient::Protocol;
use apus_bench::load::{self, LoadSpec};
use apus_bench::targets::{ApusConn, KvConn};

const USAGE: &str = "\
usage:
  apus-bench load --target apus --clients ADDR,ADDR,... [options]
  apus-bench load --target redis|memcached|etcd --addr ADDR [options]
      options: --conns N (1) --size BYTES (64) --duration SECS (5) --warmup SECS (1)
               --pipeline N (1: requests sent at once per connection; redis, memcached)
  apus-bench rtt --config CLUSTER.toml [--count N (2000)] [--poll spin|hybrid|park (the cluster's)]";

#[derive(Default)]
struct Args {
    command: String,
    target: Option<String>,
    clients: Vec<SocketAddr>,
    addr: Option<SocketAddr>,
    config: Option<PathBuf>,
    conns: Option<usize>,
    size: Option<usize>,
    duration: Option<f64>,
    warmup: Option<f64>,
    count: Option<usize>,
    pipeline: Option<usize>,
    poll: Option<apus::PollPolicy>,
}

fn parse() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        command: it.next().context("missing command")?,
        ..Args::default()
    };
    while let Some(flag) = it.next() {
        let v = it.next().with_context(|| format!("{flag} needs a value"))?;
        let num = |what: &str| -> Result<f64> {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .with_context(|| format!("{flag} expects {what}, got {v:?}"))
        };
        match flag.as_str() {
            "--target" => a.target = Some(v),
            "--clients" => {
                a.clients = v
                    .split(',')
                    .map(|s| {
                        s.parse()
                            .with_context(|| format!("--clients: bad address {s:?}"))
                    })
                    .collect::<Result<_>>()?
            }
            "--addr" => {
                a.addr = Some(
                    v.parse()
                        .with_context(|| format!("--addr: bad address {v:?}"))?,
                )
            }
            "--config" => a.config = Some(PathBuf::from(v)),
            "--conns" => a.conns = Some(num("a count")? as usize),
            "--size" => a.size = Some(num("bytes")? as usize),
            "--duration" => a.duration = Some(num("seconds")?),
            "--warmup" => a.warmup = Some(num("seconds")?),
            "--count" => a.count = Some(num("a count")? as usize),
            "--pipeline" => a.pipeline = Some(num("a count")? as usize),
            "--poll" => {
                a.poll = Some(match v.as_str() {
                    "spin" => apus::PollPolicy::Spin,
                    "hybrid" => apus::PollPolicy::Hybrid,
                    "park" => apus::PollPolicy::Park,
                    _ => bail!("--poll expects spin, hybrid or park, got {v:?}"),
                })
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let result = parse().and_then(|a| match a.command.as_str() {
        "load" => load_cmd(&a),
        "rtt" => rtt_cmd(&a),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command {other:?}"),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("apus-bench: {e:#}\n{USAGE}");
            ExitCode::FAILURE
        }
    }
}

fn load_cmd(a: &Args) -> Result<()> {
    let spec = LoadSpec {
        conns: a.conns.unwrap_or(1).max(1),
        size: a.size.unwrap_or(64).max(8),
        warmup: Duration::from_secs_f64(a.warmup.unwrap_or(1.0)),
        duration: Duration::from_secs_f64(a.duration.unwrap_or(5.0).max(0.1)),
        pipeline: a.pipeline.unwrap_or(1).max(1),
    };
    let addr = || a.addr.context("--addr is required for this target");
    let result = match a.target.as_deref().context("--target is required")? {
        "apus" => {
            if a.clients.is_empty() {
                bail!("--clients is required for --target apus");
            }
            load::run(spec, |n| ApusConn::connect(&a.clients, n))?
        }
        "redis" => {
            let at = addr()?;
            load::run(spec, |n| KvConn::connect(Protocol::Resp, at, n))?
        }
        "memcached" => {
            let at = addr()?;
            load::run(spec, |n| KvConn::connect(Protocol::Memcached, at, n))?
        }
        #[cfg(feature = "etcd")]
        "etcd" => {
            let at = addr()?;
            load::run(spec, |n| {
                apus_bench::targets::etcd::EtcdConn::connect(at, n)
            })?
        }
        #[cfg(not(feature = "etcd"))]
        "etcd" => bail!("this build has no etcd target: rebuild apus-bench with --features etcd"),
        other => bail!("unknown target {other:?} (apus, redis, memcached, etcd)"),
    };
    println!("{result}");
    Ok(())
}

fn rtt_cmd(a: &Args) -> Result<()> {
    let path = a.config.as_ref().context("--config is required")?;
    let config = apus::ClusterConfig::load(path)?;
    let count = a.count.unwrap_or(2000).max(10);
    let poll = a.poll.unwrap_or(config.poll);
    let h = apus_bench::rtt::write_round_trip(&config, count, poll)?;
    println!(
        "RESULT ops={} errors=0 secs=0 throughput=0 p50_us={:.2} p99_us={:.2} p999_us={:.2} max_us={:.2}",
        h.len(),
        h.value_at_quantile(0.5) as f64 / 1e3,
        h.value_at_quantile(0.99) as f64 / 1e3,
        h.value_at_quantile(0.999) as f64 / 1e3,
        h.max() as f64 / 1e3
    );
    Ok(())
}
