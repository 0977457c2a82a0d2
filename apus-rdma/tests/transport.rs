//! The verbs transport as the engine sees it: three transports in one
//! process on one device, polled in turn. On a host without an RDMA device
//! each test prints SKIPPED with the reason; `cargo xtask softroce` runs
//! them inside a Soft-RoCE guest, where they must pass.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use apus_core::layout::SlotKind;
use apus_core::{
    Completion, NodeId, OpError, OpId, Region, RegionLayout, RemoteOp, Transport, TransportEvent,
};
use apus_rdma::{RdmaConfig, RdmaError, RdmaTransport, Selection, StartError};

const SECRET: &[u8] = b"verbs transport test secret";
/// Generous: the guest runs under emulation (TCG).
const PATIENCE: Duration = Duration::from_secs(30);

fn layout() -> RegionLayout {
    RegionLayout::new(3, 1 << 16, 4096).unwrap()
}

/// Three free loopback ports, all held until all are chosen.
fn ports() -> Vec<SocketAddr> {
    let held: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter().map(|l| l.local_addr().unwrap()).collect()
}

struct Node {
    t: RdmaTransport,
    region: Region,
    events: Vec<TransportEvent>,
}

fn start(me: u8, peers: &[SocketAddr], timeout: Duration) -> Option<Node> {
    let region = Region::new(layout().region_len());
    let cfg = RdmaConfig {
        me: NodeId(me),
        peers: peers.to_vec(),
        secret: SECRET.to_vec(),
        layout: layout(),
        device: Selection::default(),
        op_timeout: timeout,
        identity: None,
    };
    match RdmaTransport::start(cfg, region.clone()) {
        Ok(t) => Some(Node {
            t,
            region,
            events: Vec::new(),
        }),
        Err(StartError::Rdma(e @ RdmaError::NoDevice(_))) => {
            eprintln!("SKIPPED: {e}");
            None
        }
        Err(e) => panic!("starting a verbs transport: {e}"),
    }
}

struct Trio {
    nodes: Vec<Option<Node>>,
    peers: Vec<SocketAddr>,
    timeout: Duration,
}

impl Trio {
    fn start(timeout: Duration) -> Option<Trio> {
        let peers = ports();
        let mut nodes = Vec::new();
        for i in 0..3 {
            nodes.push(Some(start(i, &peers, timeout)?));
        }
        let mut t = Trio {
            nodes,
            peers,
            timeout,
        };
        t.until_all_up();
        Some(t)
    }

    fn until_all_up(&mut self) {
        self.until("all peers up", |t| {
            let running: Vec<bool> = t.nodes.iter().map(Option::is_some).collect();
            (0..3).all(|i| {
                !running[i]
                    || (0..3)
                        .filter(|&j| j != i && running[j])
                        .all(|j| t.node(i).t.connected(NodeId(j as u8)))
            })
        });
    }

    fn node(&mut self, i: usize) -> &mut Node {
        self.nodes[i].as_mut().expect("running")
    }

    fn poll_all(&mut self) {
        for n in self.nodes.iter_mut().flatten() {
            n.t.poll(&mut n.events).expect("poll");
        }
    }

    /// Polls every node until `done` holds.
    fn until(&mut self, what: &str, mut done: impl FnMut(&mut Trio) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            self.poll_all();
            std::thread::yield_now();
        }
    }

    /// Polls until node `i` reports the completion of `op`.
    fn completion(&mut self, i: usize, op: OpId) -> Completion {
        let mut found = None;
        self.until("a completion", |t| {
            let n = t.node(i);
            if let Some(at) = n
                .events
                .iter()
                .position(|e| matches!(e, TransportEvent::Completed(c) if c.op == op))
            {
                if let TransportEvent::Completed(c) = n.events.remove(at) {
                    found = Some(c);
                }
                return true;
            }
            false
        });
        found.expect("found")
    }
}

fn write(op: u64, to: u8, local: usize, len: usize, remote: usize) -> RemoteOp {
    RemoteOp::Write {
        op: OpId(op),
        peer: NodeId(to),
        local_offset: local,
        len,
        remote_offset: remote,
    }
}

/// Slots, reads, compare-and-swap, ordering of completions under selective
/// signaling, and the access rules.
#[test]
fn slots_reads_compare_and_swap_and_rules() {
    let Some(mut t) = Trio::start(PATIENCE) else {
        return;
    };
    let l = layout();
    // Node 1 writes its leader record slot in node 0 (above the inline size).
    let staging = l.staging(SlotKind::Leader, NodeId(0));
    t.node(1).region.write(staging, &[0xab; 512]);
    let slot = l.inbound(SlotKind::Leader, NodeId(1));
    t.node(1).t.post(write(1, 0, staging, 512, slot)).unwrap();
    assert_eq!(t.completion(1, OpId(1)).result, Ok(()));
    let mut got = [0u8; 512];
    t.node(0).region.read(slot, &mut got);
    assert_eq!(got, [0xab; 512]);

    // Someone else's slot: refused, nothing lands.
    let other = l.inbound(SlotKind::Leader, NodeId(2));
    t.node(1).t.post(write(2, 0, staging, 128, other)).unwrap();
    assert_eq!(t.completion(1, OpId(2)).result, Err(OpError::AccessDenied));
    let mut got = [0u8; 128];
    t.node(0).region.read(other, &mut got);
    assert_eq!(got, [0; 128]);

    // A read of node 2's status record lands in node 1's probe slot.
    t.node(2).region.write(l.status(), &[0x5a; 128]);
    let probe = l.probe_landing(NodeId(2));
    let read = |op, remote_offset| RemoteOp::Read {
        op: OpId(op),
        peer: NodeId(2),
        remote_offset,
        len: 64,
        local_offset: probe,
    };
    t.node(1).t.post(read(3, l.status())).unwrap();
    assert_eq!(t.completion(1, OpId(3)).result, Ok(()));
    t.node(1).region.read(probe, &mut got);
    assert_eq!(got[..64], [0x5a; 64]);

    // Reading the ring is not allowed.
    t.node(1).t.post(read(4, l.ring_offset())).unwrap();
    assert_eq!(t.completion(1, OpId(4)).result, Err(OpError::AccessDenied));

    // Compare-and-swap on a word of node 1's slot in node 0.
    if t.node(1).t.capabilities().compare_and_swap {
        let result = l.scratch(NodeId(0), 0);
        let cas = |op, expected, new| RemoteOp::CompareAndSwap {
            op: OpId(op),
            peer: NodeId(0),
            remote_offset: slot,
            expected,
            new,
            local_offset: result,
        };
        let word = u64::from_le_bytes([0xab; 8]);
        t.node(1).t.post(cas(5, word, 42)).unwrap();
        assert_eq!(t.completion(1, OpId(5)).result, Ok(()));
        let mut found = [0u8; 8];
        t.node(1).region.read(result, &mut found);
        assert_eq!(u64::from_le_bytes(found), word, "the old value comes back");
        t.node(1).t.post(cas(6, word, 7)).unwrap();
        assert_eq!(t.completion(1, OpId(6)).result, Ok(()));
        t.node(1).region.read(result, &mut found);
        assert_eq!(
            u64::from_le_bytes(found),
            42,
            "failed CAS returns the value"
        );
        t.node(0).region.read(slot, &mut found);
        assert_eq!(
            u64::from_le_bytes(found),
            42,
            "a failed CAS changes nothing"
        );
    } else {
        eprintln!("SKIPPED (compare-and-swap): the device has no atomics");
    }

    // Many writes in one batch (one signaled request covers many), mixed
    // with reads on the same plane, complete in the order posted.
    for k in 0..300u64 {
        let op = if k % 50 == 49 {
            RemoteOp::Read {
                op: OpId(100 + k),
                peer: NodeId(0),
                remote_offset: l.status(),
                len: 64,
                local_offset: l.probe_landing(NodeId(0)),
            }
        } else {
            write(100 + k, 0, staging, 16 + (k as usize % 300), slot)
        };
        t.node(1).t.post(op).unwrap();
    }
    let mut seen = Vec::new();
    t.until("300 completions", |t| {
        let n = t.node(1);
        for e in n.events.drain(..) {
            if let TransportEvent::Completed(c) = e {
                assert_eq!(c.result, Ok(()), "{c:?}");
                seen.push(c.op.0);
            }
        }
        seen.len() == 300
    });
    assert_eq!(seen, (100..400).collect::<Vec<_>>());
}

/// Polls until node `i` is connected to `peer` again (after a fenced write
/// broke the queue pairs).
fn reconnected(t: &mut Trio, i: usize, peer: u8) {
    t.until("reconnection", |t| t.node(i).t.connected(NodeId(peer)));
}

/// The ring: a write without the grant fails in the NIC with a remote
/// access error, a granted one lands, and after the grant moves the old
/// writer's write fails again and lands nothing (Mu's fencing).
#[test]
fn ring_writes_are_fenced_by_queue_pair_access() {
    let Some(mut t) = Trio::start(Duration::from_secs(10)) else {
        return;
    };
    let l = layout();
    let ring = l.ring_offset();
    let src = l.scratch(NodeId(0), 0);
    t.node(1).region.write(src, &[0x11; 256]);
    // No grant yet: node 0's NIC refuses.
    t.node(1).t.post(write(1, 0, src, 256, ring)).unwrap();
    assert_eq!(t.completion(1, OpId(1)).result, Err(OpError::AccessDenied));
    assert_eq!(t.node(1).t.stats().fenced_writes.load(Relaxed), 1);
    let mut got = [0u8; 256];
    t.node(0).region.read(ring, &mut got);
    assert_eq!(got, [0; 256], "an ungranted write landed");
    reconnected(&mut t, 1, 0);

    // Node 0 grants node 1: its writes land, inline and not.
    t.node(0).t.set_log_writer(Some(NodeId(1))).unwrap();
    t.node(1).t.post(write(2, 0, src, 256, ring)).unwrap();
    assert_eq!(t.completion(1, OpId(2)).result, Ok(()));
    t.node(0).region.read(ring, &mut got);
    assert_eq!(got, [0x11; 256]);
    t.node(1).region.write(src, &[0x12; 4096]);
    t.node(1)
        .t
        .post(write(3, 0, src, 4096, ring + 256))
        .unwrap();
    assert_eq!(t.completion(1, OpId(3)).result, Ok(()));
    let mut big = vec![0u8; 4096];
    t.node(0).region.read(ring + 256, &mut big);
    assert!(big.iter().all(|&b| b == 0x12));

    // Node 0 moves the grant to node 2; node 1's next write is refused by
    // node 0's NIC with a remote access error, and nothing lands.
    t.node(0).t.set_log_writer(Some(NodeId(2))).unwrap();
    assert_eq!(t.node(0).t.stats().revocations.load(Relaxed), 1);
    t.node(1).region.write(src, &[0x22; 256]);
    t.node(1).t.post(write(4, 0, src, 256, ring)).unwrap();
    let c = t.completion(1, OpId(4));
    assert_eq!(
        c.result,
        Err(OpError::AccessDenied),
        "a revoked writer's write"
    );
    t.node(0).region.read(ring, &mut got);
    assert_eq!(got, [0x11; 256], "a revoked writer's bytes landed");
    assert_eq!(t.node(1).t.stats().fenced_writes.load(Relaxed), 2);
    assert_eq!(t.node(1).t.stats().timeouts.load(Relaxed), 0);

    // The new writer's writes land.
    t.node(2).region.write(src, &[0x33; 256]);
    t.node(2).t.post(write(5, 0, src, 256, ring)).unwrap();
    assert_eq!(t.completion(2, OpId(5)).result, Ok(()));
    t.node(0).region.read(ring, &mut got);
    assert_eq!(got, [0x33; 256]);

    // After reconnecting, the deposed writer is still fenced: the new queue
    // pair starts without the right.
    reconnected(&mut t, 1, 0);
    t.node(1).t.post(write(6, 0, src, 256, ring)).unwrap();
    assert_eq!(t.completion(1, OpId(6)).result, Err(OpError::AccessDenied));
}

/// A peer that goes away: PeerDown, its operations fail, and a restarted
/// peer reconnects with fresh queue pairs.
#[test]
fn peer_loss_and_return() {
    let Some(mut t) = Trio::start(Duration::from_secs(2)) else {
        return;
    };
    let l = layout();
    let slot = l.inbound(SlotKind::Ack, NodeId(0));
    let staging = l.staging(SlotKind::Ack, NodeId(2));
    t.nodes[2] = None;
    t.until("PeerDown", |t| {
        t.node(0)
            .events
            .contains(&TransportEvent::PeerDown(NodeId(2)))
    });
    t.node(0).t.post(write(7, 2, staging, 128, slot)).unwrap();
    assert_eq!(
        t.completion(0, OpId(7)).result,
        Err(OpError::PeerUnreachable)
    );
    assert!(!t.node(0).t.connected(NodeId(2)));

    let peers = t.peers.clone();
    let timeout = t.timeout;
    t.nodes[2] = Some(start(2, &peers, timeout).expect("the device is still there"));
    t.until_all_up();
    // Node 2 writes its own slot in node 0.
    let back = l.inbound(SlotKind::Ack, NodeId(2));
    t.node(2).region.write(staging, &[0x77; 128]);
    t.node(2).t.post(write(8, 0, staging, 128, back)).unwrap();
    assert_eq!(t.completion(2, OpId(8)).result, Ok(()));
    let mut got = [0u8; 128];
    t.node(0).region.read(back, &mut got);
    assert_eq!(got, [0x77; 128]);
}

#[test]
fn a_tcp_transport_replica_is_refused_with_a_reason() {
    let peers = ports();
    let Some(mut verbs) = start(0, &peers, Duration::from_secs(1)) else {
        return;
    };
    let tcp = apus_tcp::TcpTransport::start(
        apus_tcp::TcpConfig {
            me: NodeId(1),
            peers: peers.clone(),
            secret: SECRET.to_vec(),
            layout: layout(),
            op_timeout: apus_tcp::DEFAULT_OP_TIMEOUT,
            identity: None,
        },
        Region::new(layout().region_len()),
    )
    .unwrap();
    let stats = verbs.t.setup_stats();
    let deadline = Instant::now() + PATIENCE;
    while stats.refused.load(Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the tcp replica was not refused");
        verbs.t.poll(&mut verbs.events).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!verbs.t.connected(NodeId(1)));
    drop(tcp);
}

#[test]
fn the_transport_is_send() {
    fn is_send<T: Send>() {}
    is_send::<RdmaTransport>();
}
