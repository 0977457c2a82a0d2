//! `cargo xtask e2e --server mariadb`: MariaDB 10.11, a thread per
//! connection, under sysbench's `oltp_read_write`.
//!
//! With one connection its run is a function of its input and `apus check`
//! (`CHECKSUM TABLE`) is equal on every replica. With four, the threads
//! execute concurrently in an order the log does not hold, so the replicas
//! may end in different states: the check runs that last and reports what
//! `apus check` says, without requiring it (README: servers and process
//! models).

use std::net::SocketAddr;

use anyhow::{Context, Result, ensure};

use super::flow::{Bench, Workload};
use super::{AppCluster, ServerKind};
use crate::tools;

fn mariadb(addr: SocketAddr, sql: &str) -> Result<String> {
    let out = tools::command("mariadb")?
        .args([
            "-h",
            &addr.ip().to_string(),
            "-P",
            &addr.port().to_string(),
            "-u",
            "root",
            "-N",
            "-e",
            sql,
        ])
        .output()
        .context("running mariadb")?;
    ensure!(
        out.status.success(),
        "mariadb {sql:?} against {addr}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs sysbench's oltp_read_write `step` (prepare or run) on `threads`.
fn sysbench(
    addr: SocketAddr,
    label: &'static str,
    step: &str,
    threads: usize,
    events: usize,
) -> Result<Bench> {
    let out = tools::command("sysbench")?
        .args([
            "oltp_read_write",
            "--db-driver=mysql",
            "--mysql-user=root",
            "--mysql-db=sbtest",
        ])
        .arg(format!("--mysql-host={}", addr.ip()))
        .arg(format!("--mysql-port={}", addr.port()))
        .args([
            "--tables=1",
            "--table-size=1000",
            "--time=0",
            "--rand-seed=7",
        ])
        .arg(format!("--threads={threads}"))
        .arg(format!("--events={events}"))
        .arg(step)
        .output()
        .context("running sysbench")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "sysbench {step} against {addr} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "transactions:  300  (123.45 per sec.)" and "avg:  8.10"
    let rate = text
        .lines()
        .find(|l| l.trim_start().starts_with("transactions:"))
        .and_then(|l| l.split('(').nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let latency_ms = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("avg:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    Ok(Bench {
        label,
        rate,
        latency_ms,
    })
}

/// sysbench oltp_read_write.
pub struct Sysbench;

impl Workload for Sysbench {
    fn kind(&self) -> ServerKind {
        ServerKind::Mariadb
    }

    fn model(&self) -> &'static str {
        "MariaDB 10.11 (a thread per connection)"
    }

    fn unit(&self) -> &'static str {
        "tps"
    }

    fn load(&self, addr: SocketAddr) -> Result<Vec<Bench>> {
        let t = std::time::Instant::now();
        mariadb(addr, "CREATE DATABASE sbtest")?;
        sysbench(addr, "prepare", "prepare", 1, 0)?;
        let prepare = Bench {
            label: "prepare",
            rate: 0.0,
            latency_ms: t.elapsed().as_secs_f64() * 1e3,
        };
        Ok(vec![prepare, sysbench(addr, "1 conn", "run", 1, 300)?])
    }

    fn more(&self, addr: SocketAddr) -> Result<()> {
        sysbench(addr, "more", "run", 1, 100).map(|_| ())
    }

    fn probe(&self, addr: SocketAddr) -> Result<()> {
        mariadb(addr, "SELECT COUNT(*) FROM sbtest.sbtest1").map(|_| ())
    }

    fn finally(&self, cluster: &mut AppCluster) -> Result<Vec<String>> {
        let l = cluster.leader().context("no leader")?;
        let b = sysbench(cluster.apps[l], "4 conns", "run", 4, 300)?;
        let all: Vec<usize> = (0..super::REPLICAS).collect();
        cluster.wait_converged(&all, std::time::Duration::from_secs(120))?;
        let verdict = match cluster.check() {
            Ok(d) => format!("equal this time ({d})"),
            Err(e) => format!(
                "not equal, as expected of concurrent threads: {}",
                e.to_string()
                    .lines()
                    .filter(|l| l.trim_start().starts_with('n'))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        };
        Ok(vec![format!(
            "sysbench with 4 connections through n{l}: {:.0} tps; apus check: {verdict}",
            b.rate
        )])
    }
}
