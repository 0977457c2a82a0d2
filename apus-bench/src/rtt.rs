//! The raw remote-write round trip of a transport: replica 0 writes 64
//! bytes into replica 1's inbound slot and waits for the completion, with no
//! engine and no consensus. One commit needs at least one such round, so
//! commit latency / this round trip says what the engine costs on top.
//!
//! Both ends run in this process on the transport the cluster
//! configuration names, exactly as a node opens it
//! ([`apus::node::open_bare_transport`]), and wait between polls as the
//! given [`PollPolicy`] says, exactly as an engine does
//! ([`PollPolicy::spins`]): with `spin` the figure is the transport's best
//! round trip; with the cluster's own policy it includes the same wake-up
//! delays a commit pays, so commit latency / that figure compares like with
//! like.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use apus::{ClusterConfig, PollPolicy};
use apus_core::layout::SlotKind;
use apus_core::{NodeId, OpId, RemoteOp, TransportEvent};
use hdrhistogram::Histogram;

use crate::load::latency_histogram;

/// Bytes per write: a small entry or control record.
pub const WRITE_LEN: usize = 64;

/// How long a poller that does not spin blocks in the transport at most
/// (the stop flag is looked at in between).
const WAIT_AT_MOST: Duration = Duration::from_millis(5);

/// Measures `count` round trips (after `count / 10` not counted) between
/// replicas 0 and 1 of `config`, both ends polling as `policy` says.
/// Latencies in nanoseconds.
pub fn write_round_trip(
    config: &ClusterConfig,
    count: usize,
    policy: PollPolicy,
) -> Result<Histogram<u64>> {
    let (mut writer, region, layout) =
        apus::node::open_bare_transport(config, NodeId(0)).context("opening replica 0")?;
    let (target, _target_region, _) =
        apus::node::open_bare_transport(config, NodeId(1)).context("opening replica 1")?;
    // Transports that progress only when polled (libfabric's manual
    // progress) need the target driven, as its engine would.
    let stop = Arc::new(AtomicBool::new(false));
    let pump = {
        let stop = stop.clone();
        let mut target = target;
        thread::spawn(move || -> Result<()> {
            let mut events = Vec::new();
            let mut last_activity = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                events.clear();
                target.poll(&mut events)?;
                if !events.is_empty() {
                    last_activity = Instant::now();
                }
                idle(&mut *target, policy, last_activity)?;
            }
            Ok(())
        })
    };
    let result = (|| {
        let mut events = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        'up: loop {
            events.clear();
            writer.poll(&mut events)?;
            if events.contains(&TransportEvent::PeerUp(NodeId(1))) {
                break 'up;
            }
            if Instant::now() > deadline {
                bail!("replica 1 did not connect within 20 s");
            }
            writer.wait(Duration::from_millis(5))?;
        }
        region.write(layout.staging(SlotKind::Leader, NodeId(1)), &[7; WRITE_LEN]);
        let remote_offset = layout.inbound(SlotKind::Leader, NodeId(0));
        let warmup = count / 10;
        let mut h = latency_histogram();
        for i in 0..warmup + count {
            let op = OpId(i as u64 + 1);
            let t = Instant::now();
            writer.post(RemoteOp::Write {
                op,
                peer: NodeId(1),
                local_offset: layout.staging(SlotKind::Leader, NodeId(1)),
                len: WRITE_LEN,
                remote_offset,
            })?;
            'done: loop {
                events.clear();
                writer.poll(&mut events)?;
                for e in &events {
                    if let TransportEvent::Completed(c) = e
                        && c.op == op
                    {
                        c.result.map_err(|e| anyhow::anyhow!("write {i}: {e}"))?;
                        break 'done;
                    }
                    if *e == TransportEvent::PeerDown(NodeId(1)) {
                        bail!("replica 1 went down during the measurement");
                    }
                }
                if t.elapsed() > Duration::from_secs(5) {
                    bail!("write {i} not completed within 5 s");
                }
                idle(&mut *writer, policy, t)?;
            }
            if i >= warmup {
                let _ = h.record(t.elapsed().as_nanos() as u64);
            }
        }
        Ok(h)
    })();
    stop.store(true, Ordering::Relaxed);
    match pump.join() {
        Ok(Err(e)) if result.is_ok() => return Err(e.context("replica 1")),
        Err(_) => bail!("replica 1's thread panicked"),
        _ => {}
    }
    result
}

/// Nothing to do: yield (spinning) or block in the transport, as `policy`
/// says an engine would.
fn idle(
    transport: &mut (dyn apus_core::Transport + Send),
    policy: PollPolicy,
    last_activity: Instant,
) -> Result<()> {
    if policy.spins(last_activity.elapsed()) {
        thread::yield_now();
    } else {
        transport.wait(WAIT_AT_MOST)?;
    }
    Ok(())
}
