//! The raw `fi_write` round trip: one 64-byte write between two libfabric
//! endpoints of a provider, posted and waited for (delivery complete), with
//! no consensus. The physical limit of one replication round on that
//! provider, measured in the same run as the cluster's commit latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use apus_fabric::{Access, Endpoint, LinkState, Remote};

use crate::e2e::latency_histogram;

/// Median and 99th percentile of the round trip, in microseconds.
pub fn fabric_rtt(provider: &str) -> Result<(f64, f64)> {
    let domain = provider.starts_with("tcp").then_some("lo");
    // Declared before the endpoints, so dropped after them.
    let mut src = vec![7u8; 4096].into_boxed_slice();
    let mut dst = vec![0u8; 4096].into_boxed_slice();
    let open = || Endpoint::open_in(provider, domain).context("opening a libfabric endpoint");
    let (mut writer, mut target) = (open()?, open()?);
    // SAFETY: both buffers outlive their endpoints: the writer is declared
    // after them, and the target is dropped in its thread, which is joined
    // before this function returns.
    let src_mr = unsafe { writer.register(src.as_mut_ptr(), src.len(), Access::LOCAL)? };
    // SAFETY: as above, for `dst` and the target.
    let dst_mr = unsafe { target.register(dst.as_mut_ptr(), dst.len(), Access::REMOTE_WRITE)? };
    let peer = if writer.connection_oriented() {
        // As the transport does: the target awaits a token, the writer
        // dials with it, both poll until the connection is up.
        let token = 0x7274_7400_0000_0001;
        let accepted = target.await_peer(token)?;
        let peer = writer.dial_peer(&target.name()?, token)?;
        let t = Instant::now();
        while writer.link(peer) != LinkState::Up || target.link(accepted) != LinkState::Up {
            writer.poll(&mut Vec::new())?;
            target.poll(&mut Vec::new())?;
            if let LinkState::Down(why) = writer.link(peer) {
                bail!("{provider}: connecting: {why}");
            }
            if t.elapsed() > Duration::from_secs(10) {
                bail!("{provider}: no connection within 10 s");
            }
        }
        peer
    } else {
        let peer = writer.insert_peer(&target.name()?)?;
        target.insert_peer(&writer.name()?)?;
        peer
    };
    let to = Remote {
        peer,
        addr: dst_mr.base,
        key: dst_mr.key,
    };
    // Manual progress: the target lands writes only while it polls.
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut sink = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let _ = target.poll(&mut sink);
                sink.clear();
            }
            drop(target);
        })
    };
    let mut hist = latency_histogram();
    let mut done = Vec::new();
    let result = (|| -> Result<()> {
        for i in 0..5500u64 {
            let t = Instant::now();
            // SAFETY: `src` is registered and outlives the operation (we wait
            // for its completion below).
            while !unsafe { writer.write(src.as_ptr(), 64, &src_mr, to, i + 1)? } {
                writer.poll(&mut done)?;
                if t.elapsed() > Duration::from_secs(10) {
                    bail!("{provider}: the provider never took the write");
                }
            }
            loop {
                done.clear();
                writer.poll(&mut done)?;
                if let Some(c) = done.iter().find(|c| c.context == i + 1) {
                    if let Err(e) = &c.result {
                        bail!("{provider}: write failed: {e}");
                    }
                    break;
                }
                if t.elapsed() > Duration::from_secs(10) {
                    bail!("{provider}: no completion within 10 s");
                }
            }
            if i >= 500 {
                hist.record(t.elapsed().as_nanos() as u64)?;
            }
        }
        Ok(())
    })();
    stop.store(true, Ordering::Relaxed);
    let _ = poller.join();
    result?;
    let us = |q| hist.value_at_quantile(q) as f64 / 1e3;
    Ok((us(0.5), us(0.99)))
}
