//! `cargo xtask chaos`: partitions with real processes (issue 15). Three
//! `apus node` replicas, each in a network namespace of its own, joined by
//! veth pairs to a bridge in a "switch" namespace; the load (concurrent
//! proposers) runs from a client namespace on the same bridge. Under load:
//!
//! 1. the leader's link is cut (its switch port down: no FIN, no RST) and
//!    healed 2 s later: the others elect a new leader, the old one rejoins;
//! 2. a follower's link flaps, down and up every 200 ms, for 2 s;
//! 3. a follower's link is dropped for 3 s, longer than the leader's 1 MiB
//!    ring lasts: commits must go on;
//! 4. delay and loss (2 ms, 1%) with netem, where the kernel has it (this
//!    one may not: the phase then says SKIPPED and why);
//! 5. a follower is SIGSTOPped for 2 s and resumed.
//!
//! After each phase: every acknowledged proposal is applied, in the same
//! order, on every replica, and none is left behind; each proposer's
//! acknowledged log indices only grow. Bounded: each phase and each wait has
//! a deadline.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::cluster::{Cluster, Load, REPLICAS};

/// One fault phase: carries out the fault, says what it did.
type Phase<'a> = dyn Fn(&mut Cluster, &Load) -> Result<String> + 'a;

/// Namespace names carry the process id, so runs never meet.
struct Netns {
    prefix: String,
    made: Vec<String>,
}

/// A replica's address on the bridge.
fn node_ip(i: usize) -> String {
    format!("10.77.0.{}", i + 1)
}
const CLIENT_IP: &str = "10.77.0.100";

fn ip(args: &[&str]) -> Result<()> {
    let out = crate::tools::command("ip")?
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Netns {
    fn name(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }

    /// Deletes the namespaces of earlier runs whose process is gone (a run
    /// that was killed leaves its own behind).
    fn remove_stale() -> Result<()> {
        let out = crate::tools::command("ip")?
            .args(["netns", "list"])
            .output()
            .context("running ip netns list")?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            let pid = name
                .strip_prefix("apus")
                .and_then(|r| r.split_once('-'))
                .and_then(|(pid, _)| pid.parse::<u32>().ok());
            if let Some(pid) = pid
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                ip(&["netns", "del", name])?;
            }
        }
        Ok(())
    }

    /// The switch, one namespace per replica and one for the client.
    fn create() -> Result<Netns> {
        Netns::remove_stale()?;
        let mut n = Netns {
            prefix: format!("apus{}", std::process::id()),
            made: Vec::new(),
        };
        let sw = n.name("sw");
        ip(&["netns", "add", &sw])?;
        n.made.push(sw.clone());
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        let hosts: Vec<(String, String)> = (0..REPLICAS)
            .map(|i| (format!("n{i}"), node_ip(i)))
            .chain([("cl".to_string(), CLIENT_IP.to_string())])
            .collect();
        for (host, addr) in hosts {
            let ns = n.name(&host);
            ip(&["netns", "add", &ns])?;
            n.made.push(ns.clone());
            let port = format!("s-{host}");
            ip(&[
                "link", "add", &port, "netns", &sw, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(n)
    }

    /// Brings `host`'s switch port up or down.
    fn port(&self, host: &str, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        ip(&[
            "-n",
            &self.name("sw"),
            "link",
            "set",
            &format!("s-{host}"),
            state,
        ])
    }

    /// Moves the calling thread (and the threads it starts from now on)
    /// into `host`'s namespace.
    fn enter(&self, host: &str) -> Result<()> {
        let path = format!("/run/netns/{}", self.name(host));
        let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        use std::os::fd::AsRawFd;
        // SAFETY: setns with a namespace fd we hold open; it changes only
        // this thread's network namespace.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns into {path}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Adds netem delay and loss on every replica's interface; `Ok(false)`
    /// if the kernel has no netem.
    fn netem(&self, on: bool) -> Result<bool> {
        for i in 0..REPLICAS {
            let ns = self.name(&format!("n{i}"));
            let mut tc = crate::tools::command("ip")?;
            tc.args(["netns", "exec", &ns, "tc", "qdisc"]);
            if on {
                tc.args([
                    "add", "dev", "eth0", "root", "netem", "delay", "2ms", "loss", "1%",
                ]);
            } else {
                tc.args(["del", "dev", "eth0", "root"]);
            }
            let out = tc.stdin(Stdio::null()).output().context("running tc")?;
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                if on && err.contains("qdisc kind is unknown") {
                    return Ok(false);
                }
                bail!("tc on n{i}: {}", err.trim());
            }
        }
        Ok(true)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in self.made.iter().rev() {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Writes the cluster file: replica `i` at `node_ip(i)`.
fn write_config(dir: &Path) -> Result<std::path::PathBuf> {
    let mut cfg = format!(
        "[cluster]\nsecret = \"chaos secret {}\"\ndurability = \"memory\"\ntransport = \"tcp\"\n\
         [engine]\nheartbeat_us = 2000\nelection_timeout_us = 30000\nring_capacity = {}\n",
        std::process::id(),
        crate::cluster::RING_CAPACITY
    );
    for i in 0..REPLICAS {
        let a = node_ip(i);
        cfg += &format!(
            "[[replica]]\nid = {i}\naddress = \"{a}:7100\"\nclient = \"{a}:7200\"\ndata_dir = \"n{i}\"\n"
        );
    }
    let path = std::path::absolute(dir.join("cluster.toml"))?;
    std::fs::write(&path, cfg)?;
    Ok(path)
}

pub fn run_chaos(args: &[String]) -> Result<ExitCode> {
    if let Some(a) = args.first() {
        bail!("cargo xtask chaos takes no arguments (got {a:?})");
    }
    if !crate::tools::running_as_root() {
        bail!("cargo xtask chaos creates network namespaces: it needs root");
    }
    crate::tools::ensure(&["ip", "tc"])?;
    let bin = crate::e2e::build_release()?.apus;
    let dir = crate::e2e::target_dir()
        .join("chaos")
        .join(std::process::id().to_string());
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let net = Netns::create()?;
    let config = write_config(&dir)?;
    let clients: Vec<SocketAddr> = (0..REPLICAS)
        .map(|i| format!("{}:7200", node_ip(i)).parse())
        .collect::<Result<_, _>>()?;
    let netns = (0..REPLICAS).map(|i| net.name(&format!("n{i}"))).collect();
    let mut cluster = Cluster::new(&bin, &dir, config, &clients, netns);
    // This thread and every thread it starts talk from the client's side.
    net.enter("cl")?;
    println!(
        "chaos: {REPLICAS} replicas in network namespaces {}-n0..n2 (10.77.0.1-3, veth to a bridge), load from {CLIENT_IP}",
        net.prefix
    );
    for i in 0..REPLICAS {
        cluster.start(i)?;
    }
    cluster.wait_for_leader(Duration::from_secs(30))?;
    let mut acked: Vec<u64> = Vec::new();
    let mut next_id = 1;
    let mut figures = Vec::new();
    let phases: [(&str, &Phase); 5] = [
        ("leader cut off", &|c, _| cut_leader(c, &net)),
        ("link flapping", &|c, _| flap(c, &net)),
        ("follower's link dropped", &|c, l| {
            drop_follower_link(c, l, &net)
        }),
        ("delay and loss", &|_, _| delay_and_loss(&net)),
        ("follower stopped", &|c, _| stop_follower(c)),
    ];
    for (name, phase) in phases {
        let leader = cluster.leader().context("no leader")?;
        let load = Load::new(next_id, u64::MAX, leader);
        let workers = load.start(4, &clients);
        wait_acks(&load, 200, Duration::from_secs(30))?;
        let what = phase(&mut cluster, &load).with_context(|| format!("phase {name}"))?;
        // Commits after the fault, then stop.
        let now = load.acked_count.load(Ordering::SeqCst);
        wait_acks(&load, now + 200, Duration::from_secs(30))
            .with_context(|| format!("no commits after the phase {name}"))?;
        load.stop.store(true, Ordering::SeqCst);
        for w in workers {
            let _ = w.join();
        }
        let back = load.regressions.load(Ordering::SeqCst);
        if back > 0 {
            bail!(
                "phase {name}: {back} acknowledgements had a log index below the proposer's previous one"
            );
        }
        next_id = load.next_id.load(Ordering::SeqCst);
        acked.extend(load.acked.lock().expect("lock").iter());
        let (commits, _) = cluster.verify(&acked)?;
        println!(
            "  {name}: {what}; {} acknowledged, {commits} entries identical on every replica",
            load.acked_count.load(Ordering::SeqCst)
        );
        figures.push(what);
    }
    drop(cluster);
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "chaos: PASS: {}; {} proposals acknowledged, every one on every replica, each proposer's log indices increasing",
        figures.join("; "),
        acked.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// Waits until `load` has `n` acknowledgements.
fn wait_acks(load: &Arc<Load>, n: u64, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while load.acked_count.load(Ordering::SeqCst) < n {
        if Instant::now() > deadline {
            bail!(
                "{} of {n} proposals acknowledged within {within:?}",
                load.acked_count.load(Ordering::SeqCst)
            );
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn cut_leader(cluster: &mut Cluster, net: &Netns) -> Result<String> {
    let old = cluster.leader().context("no leader")?;
    let term = cluster.status(old).map_or(0, |s| s.term);
    net.port(&format!("n{old}"), false)?;
    let cut = Instant::now();
    let new = loop {
        let new = (0..REPLICAS).filter(|&i| i != old).find(|&i| {
            cluster
                .status(i)
                .is_some_and(|s| s.role == apus_core::Role::Leader && s.term > term)
        });
        if let Some(n) = new {
            break n;
        }
        if cut.elapsed() > Duration::from_secs(20) {
            net.port(&format!("n{old}"), true)?;
            bail!("no new leader within 20 s of cutting n{old} off");
        }
        thread::sleep(Duration::from_millis(2));
    };
    let elected = cut.elapsed();
    thread::sleep(Duration::from_secs(2).saturating_sub(elected));
    net.port(&format!("n{old}"), true)?;
    Ok(format!(
        "n{old} (leader) cut off; n{new} elected {:.0} ms later; healed after 2 s",
        elected.as_secs_f64() * 1e3
    ))
}

fn flap(cluster: &mut Cluster, net: &Netns) -> Result<String> {
    let leader = cluster.leader().context("no leader")?;
    let victim = (leader + 1) % REPLICAS;
    let host = format!("n{victim}");
    for _ in 0..5 {
        net.port(&host, false)?;
        thread::sleep(Duration::from_millis(200));
        net.port(&host, true)?;
        thread::sleep(Duration::from_millis(200));
    }
    Ok(format!("n{victim}'s link down and up every 200 ms for 2 s"))
}

/// A follower's link dropped for 3 s, longer than the leader's ring lasts
/// at this load: commits must go on (the leader's transport declares the
/// follower lost at the operation deadline instead of waiting for TCP).
fn drop_follower_link(cluster: &mut Cluster, load: &Load, net: &Netns) -> Result<String> {
    const DROPPED_FOR: Duration = Duration::from_secs(3);
    let leader = cluster.leader().context("no leader")?;
    let victim = (leader + 1) % REPLICAS;
    let host = format!("n{victim}");
    net.port(&host, false)?;
    thread::sleep(DROPPED_FOR / 3);
    let early = load.acked_count.load(Ordering::SeqCst);
    thread::sleep(DROPPED_FOR - DROPPED_FOR / 3);
    let late = load.acked_count.load(Ordering::SeqCst) - early;
    net.port(&host, true)?;
    if late == 0 {
        bail!(
            "no commits in the last 2 s of n{victim}'s dropped link: the silent follower stalls the leader"
        );
    }
    Ok(format!(
        "n{victim}'s link dropped for 3 s: {late} commits in its last 2 s"
    ))
}

fn delay_and_loss(net: &Netns) -> Result<String> {
    if !net.netem(true)? {
        println!(
            "  delay and loss: SKIPPED: this kernel has no netem qdisc (sch_netem); \
             the phase runs the load without it"
        );
        return Ok("no netem here (SKIPPED)".into());
    }
    thread::sleep(Duration::from_secs(2));
    net.netem(false)?;
    Ok("2 ms delay and 1% loss on every replica for 2 s".into())
}

fn stop_follower(cluster: &mut Cluster) -> Result<String> {
    let leader = cluster.leader().context("no leader")?;
    let victim = (leader + 2) % REPLICAS;
    let pid = cluster.pid(victim).context("the follower is not running")?;
    crate::e2e::signal(pid, "STOP")?;
    thread::sleep(Duration::from_secs(2));
    crate::e2e::signal(pid, "CONT")?;
    Ok(format!("n{victim} SIGSTOPped for 2 s"))
}
