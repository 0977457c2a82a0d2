//! `cargo xtask e2e --server postgres`: PostgreSQL 15, which forks a
//! backend for every connection.
//!
//! The postmaster accepts each connection (its CONNECT is logged there) and
//! forks a backend, whose reads go through the postmaster's node over the
//! channel of forked processes. pgbench initialises its tables and runs 1
//! and 4 clients; `apus check` compares pgbench's tables on every replica
//! (without `pgbench_history.mtime`, the server's clock).

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{Context, Result, ensure};

use super::ServerKind;
use super::flow::{Bench, Workload};
use super::servers::{POSTGRES_USER, psql};
use crate::tools;

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
    ensure!(
        out.status.success(),
        "pgbench {args:?} against {addr} failed: {text}"
    );
    let number = |key: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    Ok(match (number("tps = "), number("latency average = ")) {
        (Some(rate), Some(latency_ms)) => Bench {
            label,
            rate,
            latency_ms,
        },
        // Initialisation prints no tps: report the time it took.
        _ => Bench {
            label,
            rate: 0.0,
            latency_ms: t.elapsed().as_secs_f64() * 1e3,
        },
    })
}

/// pgbench: init, then 1 and 4 clients.
pub struct Pgbench;

impl Workload for Pgbench {
    fn kind(&self) -> ServerKind {
        ServerKind::Postgres
    }

    fn model(&self) -> &'static str {
        "PostgreSQL 15 (a backend forked per connection)"
    }

    fn unit(&self) -> &'static str {
        "tps"
    }

    fn load(&self, addr: SocketAddr) -> Result<Vec<Bench>> {
        Ok(vec![
            pgbench(addr, "init", &["-i", "-s", "1", "-q"])?,
            pgbench(addr, "1 client", &["-n", "-c", "1", "-t", "300"])?,
            pgbench(
                addr,
                "4 clients",
                &["-n", "-c", "4", "-j", "2", "-t", "100"],
            )?,
        ])
    }

    fn more(&self, addr: SocketAddr) -> Result<()> {
        pgbench(addr, "more", &["-n", "-c", "4", "-j", "2", "-t", "50"]).map(|_| ())
    }

    fn probe(&self, addr: SocketAddr) -> Result<()> {
        psql(addr, "SELECT count(*) FROM pgbench_branches").map(|_| ())
    }
}
