//! `cargo xtask e2e --server nginx`: nginx with `master_process on`, whose
//! pre-forked workers accept on the listener they inherited. The master
//! listens (and runs the node); each worker replicates the connections it
//! accepts through the master, and followers' workers are fed the replayed
//! ones. nginx serves files and holds no state, so there is no digest:
//! the log must grow with the requests, and every reply must be whole.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use super::ServerKind;
use super::flow::{Bench, Workload};

/// Concurrent keep-alive connections, and requests on each.
const CONNS: usize = 8;
const REQUESTS: usize = 100;

/// Fetches `/file<i>.txt` `count` times over one keep-alive connection and
/// checks every body against what `prepare` wrote.
pub(super) fn fetch(addr: SocketAddr, count: usize) -> Result<()> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    for n in 0..count {
        let i = n % 16;
        write!(w, "GET /file{i}.txt HTTP/1.1\r\nHost: apus\r\n\r\n")?;
        let mut status = String::new();
        r.read_line(&mut status)?;
        ensure!(
            status.starts_with("HTTP/1.1 200"),
            "GET /file{i}.txt from {addr}: {status:?}"
        );
        let mut len = None;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h)? == 0 {
                bail!("{addr} closed the connection in a reply's headers");
            }
            if h == "\r\n" {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse::<usize>().ok();
            }
        }
        let len = len.context("a reply without Content-Length")?;
        let mut body = vec![0u8; len];
        r.read_exact(&mut body)?;
        ensure!(
            len == (i + 1) * 256,
            "/file{i}.txt came back with {len} bytes"
        );
    }
    Ok(())
}

/// HTTP GETs of static files.
pub struct Http;

impl Workload for Http {
    fn kind(&self) -> ServerKind {
        ServerKind::Nginx
    }

    fn model(&self) -> &'static str {
        "nginx (master_process on: pre-forked workers accept on the inherited listener)"
    }

    fn unit(&self) -> &'static str {
        "req/s"
    }

    fn load(&self, addr: SocketAddr) -> Result<Vec<Bench>> {
        let t = Instant::now();
        std::thread::scope(|s| {
            let clients: Vec<_> = (0..CONNS)
                .map(|_| s.spawn(move || fetch(addr, REQUESTS)))
                .collect();
            clients.into_iter().try_for_each(|c| {
                c.join()
                    .map_err(|_| anyhow::anyhow!("an HTTP client panicked"))?
            })
        })?;
        let secs = t.elapsed().as_secs_f64();
        Ok(vec![Bench {
            label: "GET (8 conns)",
            rate: (CONNS * REQUESTS) as f64 / secs,
            latency_ms: secs * 1e3 / REQUESTS as f64,
        }])
    }

    fn more(&self, addr: SocketAddr) -> Result<()> {
        fetch(addr, 50)
    }

    fn probe(&self, addr: SocketAddr) -> Result<()> {
        fetch(addr, 1)
    }
}
