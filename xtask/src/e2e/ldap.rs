//! `cargo xtask e2e --server slapd`: OpenLDAP's slapd, which daemonizes by
//! default (replication follows the daemon) and serves connections from a
//! thread pool.
//!
//! Load: entries added by four concurrent `ldapadd` connections, modified
//! and deleted by `ldapmodify` and `ldapdelete`. `apus check` digests the
//! tree's user attributes (entries sorted: concurrent adds may number them
//! in another order on each replica; operational attributes, which hold
//! times, are left out).

use std::io::Write;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, ensure};

use super::ServerKind;
use super::flow::{Bench, Workload};
use super::servers::{LDAP_ADMIN, LDAP_BASE, LDAP_PASSWORD};
use crate::tools;

/// Entries added by each of the concurrent connections.
const PER_CLIENT: usize = 50;
const CLIENTS: usize = 4;

/// Runs an LDAP client tool with `ldif` on its standard input.
fn ldap_tool(tool: &str, addr: SocketAddr, extra: &[&str], ldif: &str) -> Result<()> {
    let mut child = tools::command(tool)?
        .args([
            "-x",
            "-H",
            &format!("ldap://{addr}"),
            "-D",
            LDAP_ADMIN,
            "-w",
            LDAP_PASSWORD,
        ])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {tool}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(ldif.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{tool} against {addr} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn person(prefix: &str, n: usize) -> String {
    format!(
        "dn: uid={prefix}-{n},ou=people,{LDAP_BASE}\nobjectClass: inetOrgPerson\nuid: {prefix}-{n}\n\
         cn: Person {prefix} {n}\nsn: {n}\nmail: {prefix}-{n}@apus.test\n\n"
    )
}

/// Adds `count` entries named `prefix-N` over one connection.
fn add(addr: SocketAddr, prefix: &str, count: usize) -> Result<()> {
    let ldif: String = (0..count).map(|n| person(prefix, n)).collect();
    ldap_tool("ldapadd", addr, &[], &ldif)
}

/// LDAP through ldapadd, ldapmodify and ldapdelete.
pub struct Ldap;

impl Workload for Ldap {
    fn kind(&self) -> ServerKind {
        ServerKind::Slapd
    }

    fn model(&self) -> &'static str {
        "OpenLDAP slapd (daemonizes; a thread pool)"
    }

    fn unit(&self) -> &'static str {
        "ops/s"
    }

    fn load(&self, addr: SocketAddr) -> Result<Vec<Bench>> {
        let t = Instant::now();
        std::thread::scope(|s| {
            let adders: Vec<_> = (0..CLIENTS)
                .map(|c| s.spawn(move || add(addr, &format!("c{c}"), PER_CLIENT)))
                .collect();
            adders.into_iter().try_for_each(|a| {
                a.join()
                    .map_err(|_| anyhow::anyhow!("an ldapadd thread panicked"))?
            })
        })?;
        let secs = t.elapsed().as_secs_f64();
        let added = Bench {
            label: "add (4 conns)",
            rate: (CLIENTS * PER_CLIENT) as f64 / secs,
            latency_ms: secs * 1e3 / PER_CLIENT as f64,
        };
        let t = Instant::now();
        let modify: String = (0..PER_CLIENT)
            .map(|n| {
                format!(
                    "dn: uid=c0-{n},ou=people,{LDAP_BASE}\nchangetype: modify\nreplace: description\n\
                     description: modified {n}\n\n"
                )
            })
            .collect();
        ldap_tool("ldapmodify", addr, &[], &modify)?;
        let secs = t.elapsed().as_secs_f64();
        let modified = Bench {
            label: "modify",
            rate: PER_CLIENT as f64 / secs,
            latency_ms: secs * 1e3 / PER_CLIENT as f64,
        };
        let t = Instant::now();
        let dns: String = (0..PER_CLIENT / 2)
            .map(|n| format!("uid=c1-{n},ou=people,{LDAP_BASE}\n"))
            .collect();
        ldap_tool("ldapdelete", addr, &[], &dns)?;
        let secs = t.elapsed().as_secs_f64();
        let deleted = Bench {
            label: "delete",
            rate: (PER_CLIENT / 2) as f64 / secs,
            latency_ms: secs * 1e3 / (PER_CLIENT / 2) as f64,
        };
        Ok(vec![added, modified, deleted])
    }

    fn more(&self, addr: SocketAddr) -> Result<()> {
        static ROUND: AtomicU64 = AtomicU64::new(0);
        let r = ROUND.fetch_add(1, Ordering::Relaxed);
        add(addr, &format!("more{r}"), 20)
    }

    fn probe(&self, addr: SocketAddr) -> Result<()> {
        let out = tools::command("ldapsearch")?
            .args([
                "-x",
                "-H",
                &format!("ldap://{addr}"),
                "-b",
                LDAP_BASE,
                "-s",
                "base",
                "-LLL",
            ])
            .output()?;
        ensure!(
            out.status.success(),
            "ldapsearch against {addr}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }
}
