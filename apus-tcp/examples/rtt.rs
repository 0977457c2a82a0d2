//! Round trip of one 64-byte remote write between two TCP transports on
//! loopback, each engine in its own thread: `cargo run --release -p apus-tcp
//! --example rtt -- [spin|park] [iterations]`.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use apus_core::layout::SlotKind;
use apus_core::{NodeId, OpId, Region, RegionLayout, RemoteOp, Transport, TransportEvent};
use apus_tcp::{TcpConfig, TcpTransport};

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "park".into());
    let n: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let spin = mode == "spin";
    let layout = RegionLayout::new(2, 4096, 1024).unwrap();
    let addr = || {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let peers = vec![addr(), addr()];
    let mk = |me: u8| {
        let region = Region::new(layout.region_len());
        let cfg = TcpConfig {
            me: NodeId(me),
            peers: peers.clone(),
            secret: b"rtt example secret, 32 bytes....".to_vec(),
            layout,
            op_timeout: apus_tcp::DEFAULT_OP_TIMEOUT,
            identity: None,
        };
        (TcpTransport::start(cfg, region.clone()).unwrap(), region)
    };
    let (mut a, _ra) = mk(0);
    let (mut b, _rb) = mk(1);
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    // The target only has to run its engine loop: it lands writes and answers.
    let server = std::thread::spawn(move || {
        let mut ev = Vec::new();
        while !stop2.load(Ordering::Relaxed) {
            b.poll(&mut ev).unwrap();
            ev.clear();
            if !spin {
                b.wait(Duration::from_millis(10)).unwrap();
            }
        }
    });
    let mut ev = Vec::new();
    while !ev.contains(&TransportEvent::PeerUp(NodeId(1))) {
        a.poll(&mut ev).unwrap();
        a.wait(Duration::from_millis(1)).unwrap();
    }
    let mut samples = Vec::with_capacity(n);
    for i in 0..n as u64 {
        ev.clear();
        let t = Instant::now();
        a.post(RemoteOp::Write {
            op: OpId(i),
            peer: NodeId(1),
            local_offset: layout.staging(SlotKind::Ack, NodeId(1)),
            len: 64,
            remote_offset: layout.inbound(SlotKind::Ack, NodeId(0)),
        })
        .unwrap();
        loop {
            a.poll(&mut ev).unwrap();
            if ev
                .iter()
                .any(|e| matches!(e, TransportEvent::Completed(c) if c.op == OpId(i)))
            {
                break;
            }
            if !spin {
                a.wait(Duration::from_millis(10)).unwrap();
            }
        }
        samples.push(t.elapsed().as_nanos() as u64);
    }
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
    samples.sort_unstable();
    let q = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize] as f64 / 1e3;
    println!(
        "{mode}: {n} round trips, p50 {:.1} us, p99 {:.1} us",
        q(0.5),
        q(0.99)
    );
}
