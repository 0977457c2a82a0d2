//! Counters and latency histograms of a node, exported for Prometheus.
//!
//! The engine thread records into its own histogram (no lock, no
//! allocation) and publishes a copy every [`PUBLISH_EVERY`]; readers take
//! the published copy.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;

/// How often the engine publishes its histogram.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// Monotonic counters, updated by the engine and apply threads.
#[derive(Debug, Default)]
pub struct Counters {
    /// Proposals accepted by this node as leader.
    pub proposed: AtomicU64,
    /// Proposals that committed and were applied here.
    pub committed: AtomicU64,
    /// Proposals refused because this node is not the leader.
    pub not_leader: AtomicU64,
    /// Proposals lost in a leader change (another entry took their index).
    pub lost: AtomicU64,
    /// Entries applied to the state machine.
    pub applied: AtomicU64,
    /// Elections this node started.
    pub elections: AtomicU64,
    /// Syncs (fdatasync batches) completed.
    pub syncs: AtomicU64,
    /// Times the engine woke the apply thread (entries nobody waits for
    /// are applied in batches: see `node::APPLY_WAKE_AT`).
    pub apply_wakeups: AtomicU64,
}

/// Latency quantiles, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Quantiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
}

impl Quantiles {
    /// Quantiles of a histogram recorded in nanoseconds.
    pub fn of(h: &Histogram<u64>) -> Quantiles {
        let us = |v: u64| v as f64 / 1e3;
        Quantiles {
            count: h.len(),
            p50: us(h.value_at_quantile(0.5)),
            p90: us(h.value_at_quantile(0.9)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }
}

/// A new histogram for nanosecond latencies up to 60 s, 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// Everything a node exports.
#[derive(Debug)]
pub struct Metrics {
    /// Counters.
    pub counters: Counters,
    /// Proposal to commit on this node (leader), nanoseconds.
    commit_latency: Mutex<Histogram<u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            counters: Counters::default(),
            commit_latency: Mutex::new(latency_histogram()),
        }
    }
}

impl Metrics {
    /// Replaces the published commit-latency histogram.
    pub fn publish_commit_latency(&self, h: &Histogram<u64>) {
        // The engine publishes; it never waits for a reader (it tries again
        // at its next publish).
        if let Ok(mut p) = self.commit_latency.try_lock() {
            p.clone_from(h);
        }
    }

    /// Commit latency quantiles (proposal accepted by the engine to commit).
    pub fn commit_latency(&self) -> Quantiles {
        self.commit_latency
            .lock()
            .map(|h| Quantiles::of(&h))
            .unwrap_or_default()
    }

    /// The Prometheus text exposition of every metric, labelled with the node.
    pub fn render_prometheus(&self, node: u8) -> String {
        let mut s = String::new();
        let c = &self.counters;
        for (name, help, v) in [
            (
                "apus_proposed_total",
                "Proposals accepted as leader",
                &c.proposed,
            ),
            (
                "apus_committed_total",
                "Proposals committed and applied",
                &c.committed,
            ),
            (
                "apus_not_leader_total",
                "Proposals refused: not the leader",
                &c.not_leader,
            ),
            (
                "apus_lost_total",
                "Proposals lost in a leader change",
                &c.lost,
            ),
            ("apus_applied_total", "Entries applied", &c.applied),
            ("apus_elections_total", "Elections started", &c.elections),
            ("apus_syncs_total", "fdatasync batches", &c.syncs),
            (
                "apus_apply_wakeups_total",
                "Times the engine woke the apply thread",
                &c.apply_wakeups,
            ),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(s, "{name}{{node=\"{node}\"}} {}", v.load(Ordering::Relaxed));
        }
        let q = self.commit_latency();
        let _ = writeln!(
            s,
            "# HELP apus_commit_latency_seconds Proposal to commit\n# TYPE apus_commit_latency_seconds summary"
        );
        for (quantile, v) in [
            ("0.5", q.p50),
            ("0.9", q.p90),
            ("0.99", q.p99),
            ("0.999", q.p999),
        ] {
            let _ = writeln!(
                s,
                "apus_commit_latency_seconds{{node=\"{node}\",quantile=\"{quantile}\"}} {}",
                v / 1e6
            );
        }
        let _ = writeln!(
            s,
            "apus_commit_latency_seconds_count{{node=\"{node}\"}} {}",
            q.count
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_exposition() {
        let m = Metrics::default();
        let mut h = latency_histogram();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        m.publish_commit_latency(&h);
        m.counters.committed.fetch_add(3, Ordering::Relaxed);
        let q = m.commit_latency();
        assert_eq!(q.count, 1000);
        assert!((499.0..=502.0).contains(&q.p50), "{q:?}");
        assert!((989.0..=992.0).contains(&q.p99), "{q:?}");
        let text = m.render_prometheus(2);
        assert!(text.contains("apus_committed_total{node=\"2\"} 3"));
        assert!(text.contains("apus_commit_latency_seconds_count{node=\"2\"} 1000"));
    }
}
