//! A closed-loop load generator: `conns` connections, each with one request
//! outstanding at a time, for a fixed time after a warm-up. Every target
//! (APUS, a bare or replicated Redis or memcached, etcd) is driven by this
//! same loop, so their numbers compare.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct LoadSpec {
    /// Concurrent connections, one request outstanding on each.
    pub conns: usize,
    /// Value size in bytes.
    pub size: usize,
    /// Requests in this first stretch are not counted.
    pub warmup: Duration,
    /// The measured stretch after the warm-up.
    pub duration: Duration,
    /// Requests sent at once on each connection before their replies are
    /// read (1: one outstanding at a time).
    pub pipeline: usize,
}

/// One connection to a target.
pub trait Conn {
    /// Sends request number `seq` carrying `value` and waits for its reply.
    fn request(&mut self, seq: u64, value: &[u8]) -> Result<()>;

    /// Sends `depth` requests at once and waits for every reply. Targets
    /// that cannot pipeline send them one after another.
    fn request_pipelined(&mut self, seq: u64, value: &[u8], depth: usize) -> Result<()> {
        (0..depth as u64).try_for_each(|i| self.request(seq + i, value))
    }
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct LoadResult {
    /// Requests completed in the measured stretch.
    pub ops: u64,
    /// Requests that failed (each failure reconnects that connection).
    pub errors: u64,
    /// Length of the measured stretch.
    pub secs: f64,
    /// Request latency in nanoseconds.
    pub latency: Histogram<u64>,
}

/// A histogram for latencies in nanoseconds, 1 ns to 60 s, 3 digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

impl LoadResult {
    /// Completed requests per second.
    pub fn throughput(&self) -> f64 {
        self.ops as f64 / self.secs.max(1e-9)
    }

    /// Latency at quantile `q`, in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1e3
    }
}

impl fmt::Display for LoadResult {
    /// One line, `RESULT key=value ...`, which `cargo xtask bench` parses.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "RESULT ops={} errors={} secs={:.3} throughput={:.1} p50_us={:.2} p99_us={:.2} p999_us={:.2} max_us={:.2}",
            self.ops,
            self.errors,
            self.secs,
            self.throughput(),
            self.quantile_us(0.5),
            self.quantile_us(0.99),
            self.quantile_us(0.999),
            self.latency.max() as f64 / 1e3,
        )
    }
}

/// Runs `spec` with connections made by `connect(connection number)`.
/// Fails if a connection cannot be made at the start, or if nothing at all
/// completed.
pub fn run<C, F>(spec: LoadSpec, connect: F) -> Result<LoadResult>
where
    C: Conn,
    F: Fn(usize) -> Result<C> + Sync,
{
    if spec.conns == 0 {
        bail!("at least one connection");
    }
    if spec.pipeline == 0 {
        bail!("a pipeline of at least one request");
    }
    let value = vec![b'v'; spec.size];
    let start = Barrier::new(spec.conns + 1);
    let measuring = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    let errors = AtomicU64::new(0);
    let seq = AtomicU64::new(0);
    let merged = Mutex::new((latency_histogram(), 0u64));
    let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let secs = thread::scope(|s| {
        for c in 0..spec.conns {
            let (value, start, measuring, stop, errors, seq, merged, first_error, connect) = (
                &value,
                &start,
                &measuring,
                &stop,
                &errors,
                &seq,
                &merged,
                &first_error,
                &connect,
            );
            s.spawn(move || {
                let mut conn = connect(c).with_context(|| format!("connection {c}"));
                start.wait();
                let mut h = latency_histogram();
                let mut ops = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Ok(cn) = conn.as_mut() else {
                        // Could not (re)connect: report once, then retry.
                        if let Err(e) = conn {
                            first_error.lock().expect("lock").get_or_insert(e);
                        }
                        thread::sleep(Duration::from_millis(20));
                        conn = connect(c);
                        continue;
                    };
                    let depth = spec.pipeline;
                    let n = seq.fetch_add(depth as u64, Ordering::Relaxed);
                    let t = Instant::now();
                    let done = if depth == 1 {
                        cn.request(n, value)
                    } else {
                        cn.request_pipelined(n, value, depth)
                    };
                    match done {
                        Ok(()) => {
                            if measuring.load(Ordering::Relaxed) {
                                // Each request of a batch waited as long as
                                // the batch.
                                let lat = t.elapsed().as_nanos() as u64;
                                let _ = h.record_n(lat, depth as u64);
                                ops += depth as u64;
                            }
                        }
                        Err(e) => {
                            if measuring.load(Ordering::Relaxed) {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                            first_error.lock().expect("lock").get_or_insert(e);
                            conn = connect(c);
                        }
                    }
                }
                let mut m = merged.lock().expect("lock");
                m.0.add(&h).expect("same bounds");
                m.1 += ops;
            });
        }
        start.wait();
        thread::sleep(spec.warmup);
        measuring.store(true, Ordering::Relaxed);
        let t = Instant::now();
        thread::sleep(spec.duration);
        measuring.store(false, Ordering::Relaxed);
        let secs = t.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        secs
    });
    let (latency, ops) = merged.into_inner().expect("lock");
    if ops == 0 {
        let why = first_error
            .into_inner()
            .expect("lock")
            .map_or("no error reported".to_string(), |e| format!("{e:#}"));
        bail!("no request completed in {secs:.1} s: {why}");
    }
    Ok(LoadResult {
        ops,
        errors: errors.load(Ordering::Relaxed),
        secs,
        latency,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sleeper;
    impl Conn for Sleeper {
        fn request(&mut self, seq: u64, value: &[u8]) -> Result<()> {
            assert_eq!(value.len(), 8);
            if seq % 10 == 9 {
                bail!("every tenth fails");
            }
            thread::sleep(Duration::from_micros(200));
            Ok(())
        }
    }

    #[test]
    fn the_loop_counts_completions_and_failures_in_the_measured_stretch() {
        let spec = LoadSpec {
            conns: 4,
            size: 8,
            warmup: Duration::from_millis(20),
            duration: Duration::from_millis(200),
            pipeline: 1,
        };
        let r = run(spec, |_| Ok(Sleeper)).unwrap();
        assert!(r.ops > 0 && r.errors > 0, "{r}");
        assert!(r.quantile_us(0.5) >= 200.0, "{r}");
        assert!(r.to_string().starts_with("RESULT ops="));
    }

    #[test]
    fn a_target_that_never_answers_is_an_error() {
        struct Broken;
        impl Conn for Broken {
            fn request(&mut self, _: u64, _: &[u8]) -> Result<()> {
                bail!("refused")
            }
        }
        let spec = LoadSpec {
            conns: 1,
            size: 8,
            warmup: Duration::ZERO,
            duration: Duration::from_millis(50),
            pipeline: 1,
        };
        let e = run(spec, |_| Ok(Broken)).unwrap_err();
        assert!(format!("{e:#}").contains("refused"), "{e:#}");
    }

    #[test]
    fn a_pipelined_batch_counts_each_request() {
        /// Counts what it was asked to send; every request takes 100 us.
        struct Counting(std::sync::Arc<AtomicU64>);
        impl Conn for Counting {
            fn request(&mut self, _: u64, _: &[u8]) -> Result<()> {
                unreachable!("a pipelined run sends batches")
            }
            fn request_pipelined(&mut self, _: u64, _: &[u8], depth: usize) -> Result<()> {
                self.0.fetch_add(depth as u64, Ordering::Relaxed);
                thread::sleep(Duration::from_micros(100));
                Ok(())
            }
        }
        let sent = std::sync::Arc::new(AtomicU64::new(0));
        let spec = LoadSpec {
            conns: 2,
            size: 8,
            warmup: Duration::ZERO,
            duration: Duration::from_millis(100),
            pipeline: 16,
        };
        let r = run(spec, |_| Ok(Counting(sent.clone()))).unwrap();
        assert_eq!(r.ops % 16, 0, "{r}");
        assert_eq!(r.latency.len(), r.ops, "one latency per request");
        assert!(r.ops <= sent.load(Ordering::Relaxed), "{r}");
    }
}
