//! Failover as a user meets it (`cargo xtask bench`, issue 15): three
//! `apus node` processes with the default engine settings under a steady
//! proposal load; the leader is SIGKILLed `kills` times, each time measuring
//! the time to a new leader (detection + election, seen in its status) and
//! to the first commit after the kill, then restarted and caught up. Between
//! kills the load runs with nobody killed, and every term change in those
//! windows is a spurious election. With `APUS_KEEP` set, the replicas'
//! logs stay in the point's directory after a run that passed.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use apus::client::{Client, Reply, Request};
use apus_core::Role;

use crate::cluster::{Cluster, REPLICAS, write_config};

/// What the kills showed.
#[derive(Clone, Debug, Default)]
pub struct Figures {
    /// Kill to a new leader's status, ms, per kill.
    pub elected_ms: Vec<f64>,
    /// Kill to the first commit after it, ms, per kill.
    pub first_commit_ms: Vec<f64>,
    /// Seconds of load with nobody killed.
    pub steady_secs: f64,
    /// Elections in those seconds.
    pub spurious: u64,
}

impl Figures {
    /// `p50 A ms, p99 B ms, max C ms` of `v`.
    fn quantiles(v: &[f64]) -> String {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        let at = |q: f64| s[((s.len() as f64 * q).ceil() as usize).clamp(1, s.len()) - 1];
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            at(0.5),
            at(0.99),
            s[s.len() - 1]
        )
    }

    /// One line for the report.
    pub fn summary(&self) -> String {
        format!(
            "{} leader SIGKILLs: new leader {} (detection + election); first commit {}; \
             {} spurious elections in {:.0} s of load with nobody killed",
            self.elected_ms.len(),
            Self::quantiles(&self.elected_ms),
            Self::quantiles(&self.first_commit_ms),
            self.spurious,
            self.steady_secs
        )
    }
}

/// The proposals' shared state: where to send, and when the first one
/// acknowledged after a mark (a kill) was.
struct Proposals {
    leader_hint: AtomicUsize,
    next_id: AtomicU64,
    stop: AtomicBool,
    acked: AtomicU64,
    mark: Mutex<(Instant, Option<Instant>)>,
}

impl Proposals {
    fn run(&self, clients: &[std::net::SocketAddr]) {
        let mut conn: Option<(usize, Client)> = None;
        while !self.stop.load(Ordering::SeqCst) {
            let hint = self.leader_hint.load(Ordering::SeqCst) % clients.len();
            if conn.as_ref().is_none_or(|(i, _)| *i != hint) {
                conn = Client::connect(clients[hint], Duration::from_millis(200))
                    .ok()
                    .map(|c| (hint, c));
                if conn.is_none() {
                    self.leader_hint.store(hint + 1, Ordering::SeqCst);
                    thread::sleep(Duration::from_micros(200));
                    continue;
                }
            }
            let id = self.next_id.fetch_add(1, Ordering::SeqCst);
            let reply = conn
                .as_mut()
                .expect("connected")
                .1
                .call(&Request::Propose(id.to_le_bytes().to_vec()));
            match reply {
                Ok(Reply::Applied { .. }) => {
                    let now = Instant::now();
                    let mut m = self.mark.lock().expect("lock");
                    if now > m.0 && m.1.is_none() {
                        m.1 = Some(now);
                    }
                    self.acked.fetch_add(1, Ordering::SeqCst);
                }
                Ok(Reply::NotLeader(leader)) => {
                    self.leader_hint
                        .store(leader.map_or(hint + 1, |l| l.index()), Ordering::SeqCst);
                    thread::sleep(Duration::from_micros(200));
                }
                Ok(_) | Err(_) => {
                    conn = None;
                    self.leader_hint.store(hint + 1, Ordering::SeqCst);
                    thread::sleep(Duration::from_micros(200));
                }
            }
        }
    }
}

/// Runs the kills on a cluster of `cluster_lines` (the `[cluster]` table)
/// and `engine_lines` (the `[engine]` table; empty: the defaults) in `dir`,
/// with `steady` of load before each.
pub fn measure(
    bin: &Path,
    dir: &Path,
    (cluster_lines, engine_lines): (&str, &str),
    kills: usize,
    steady: Duration,
) -> Result<Figures> {
    assert!(kills > 0, "at least one kill");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let quic = cluster_lines.contains("\"quic\"");
    let (config, clients) = write_config(bin, dir, cluster_lines, engine_lines, REPLICAS, quic)?;
    let mut cluster = Cluster::new(bin, dir, config, &clients, Vec::new());
    for i in 0..REPLICAS {
        cluster.start(i)?;
    }
    let (leader, _) = cluster.wait_for_leader(Duration::from_secs(20))?;
    let load = Arc::new(Proposals {
        leader_hint: AtomicUsize::new(leader),
        next_id: AtomicU64::new(1),
        stop: AtomicBool::new(false),
        acked: AtomicU64::new(0),
        mark: Mutex::new((Instant::now(), Some(Instant::now()))),
    });
    let worker = {
        let (load, clients) = (load.clone(), clients.clone());
        thread::spawn(move || load.run(&clients))
    };
    let result = kill_repeatedly(&mut cluster, &load, kills, steady);
    load.stop.store(true, Ordering::SeqCst);
    let _ = worker.join();
    drop(cluster);
    if result.is_ok() && std::env::var_os("APUS_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

/// The highest term any replica reports.
fn top_term(cluster: &Cluster) -> u64 {
    (0..REPLICAS)
        .filter_map(|i| cluster.status(i))
        .map(|s| s.term)
        .max()
        .unwrap_or(0)
}

fn kill_repeatedly(
    cluster: &mut Cluster,
    load: &Proposals,
    kills: usize,
    steady: Duration,
) -> Result<Figures> {
    let mut f = Figures::default();
    for _ in 0..kills {
        // Load with nobody killed: a term change now is spurious.
        let before = top_term(cluster);
        let acked = load.acked.load(Ordering::SeqCst);
        thread::sleep(steady);
        if load.acked.load(Ordering::SeqCst) == acked {
            bail!(
                "no commits in {steady:?} of load; logs in {}",
                cluster.dir.display()
            );
        }
        f.spurious += top_term(cluster).saturating_sub(before);
        f.steady_secs += steady.as_secs_f64();
        let (victim, _) = cluster.wait_for_leader(Duration::from_secs(10))?;
        let term = cluster.status(victim).map_or(0, |s| s.term);
        let killed = Instant::now();
        *load.mark.lock().expect("lock") = (killed, None);
        cluster.kill(victim)?;
        let elected = loop {
            let new = (0..REPLICAS).filter(|&i| i != victim).find(|&i| {
                cluster
                    .status(i)
                    .is_some_and(|s| s.role == Role::Leader && s.term > term)
            });
            if let Some(l) = new {
                break (l, killed.elapsed());
            }
            if killed.elapsed() > Duration::from_secs(10) {
                bail!(
                    "no new leader within 10 s of the kill; logs in {}",
                    cluster.dir.display()
                );
            }
            thread::sleep(Duration::from_micros(100));
        };
        load.leader_hint.store(elected.0, Ordering::SeqCst);
        let first = loop {
            if let Some(t) = load.mark.lock().expect("lock").1 {
                break t - killed;
            }
            if killed.elapsed() > Duration::from_secs(10) {
                bail!(
                    "no commit within 10 s of the kill; logs in {}",
                    cluster.dir.display()
                );
            }
            thread::sleep(Duration::from_micros(200));
        };
        f.elected_ms.push(elected.1.as_secs_f64() * 1e3);
        f.first_commit_ms.push(first.as_secs_f64() * 1e3);
        cluster.start(victim)?;
        let target = cluster.status(elected.0).map_or(0, |s| s.commit);
        let caught_up = Instant::now();
        while cluster
            .status(victim)
            .is_none_or(|s| s.recovering || s.applied < target)
        {
            if caught_up.elapsed() > Duration::from_secs(30) {
                bail!("restarted n{victim} did not catch up within 30 s");
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_few_samples_are_samples() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(Figures::quantiles(&v), "p50 3.0 ms, p99 5.0 ms, max 5.0 ms");
    }

    #[test]
    fn the_summary_names_the_spurious_elections() {
        let f = Figures {
            elected_ms: vec![10.0],
            first_commit_ms: vec![12.0],
            steady_secs: 2.0,
            spurious: 1,
        };
        let s = f.summary();
        assert!(s.starts_with("1 leader SIGKILLs"), "{s}");
        assert!(s.contains("1 spurious elections in 2 s"), "{s}");
    }
}
