//! The TCP transport keeps the transport contract over real loopback
//! sockets: access rules, the log grant, reads, compare-and-swap, failures on
//! disconnect, and refusal of unauthenticated peers.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use apus_core::layout::SlotKind;
use apus_core::{NodeId, OpError, OpId, Region, RegionLayout, RemoteOp, Transport, TransportEvent};
use apus_tcp::{TcpConfig, TcpTransport};

const SECRET: &[u8] = b"a cluster secret of 32 bytes....";

/// Held while a test chooses loopback ports and binds them: the tests of
/// this binary run in parallel, and a port one test chose but had not bound
/// yet was handed to another (CI: `AddrInUse` starting a node).
static BINDING: Mutex<()> = Mutex::new(());

fn binding() -> MutexGuard<'static, ()> {
    BINDING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Two free loopback ports, both held until both are chosen.
fn free_addrs() -> [SocketAddr; 2] {
    let held = [(); 2].map(|()| TcpListener::bind("127.0.0.1:0").unwrap());
    held.map(|l| l.local_addr().unwrap())
}

/// Nodes 0 and 1 on fresh ports, node 1 with `secret_1`. A port can still be
/// taken by another process between choosing and binding it; then both are
/// chosen again.
fn start_two(secret_1: &[u8]) -> (Node, Node, [SocketAddr; 2]) {
    let _binding = binding();
    for _ in 0..5 {
        let peers = free_addrs();
        match (try_node(0, &peers, SECRET), try_node(1, &peers, secret_1)) {
            (Ok(a), Ok(b)) => return (a, b, peers),
            (Err(e), _) | (_, Err(e)) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            (Err(e), _) | (_, Err(e)) => panic!("starting a tcp transport: {e}"),
        }
    }
    panic!("five pairs of free ports were all taken before they could be bound");
}

fn layout() -> RegionLayout {
    RegionLayout::new(2, 4096, 1024).unwrap()
}

struct Node {
    t: TcpTransport,
    region: Region,
    events: Vec<TransportEvent>,
}

fn try_node(me: u8, peers: &[SocketAddr], secret: &[u8]) -> std::io::Result<Node> {
    let region = Region::new(layout().region_len());
    let t = TcpTransport::start(
        TcpConfig {
            me: NodeId(me),
            peers: peers.to_vec(),
            secret: secret.to_vec(),
            layout: layout(),
            op_timeout: apus_tcp::DEFAULT_OP_TIMEOUT,
            identity: None,
        },
        region.clone(),
    )?;
    Ok(Node {
        t,
        region,
        events: Vec::new(),
    })
}

/// Polls both nodes until `done` holds (a guard against hangs, not a timing
/// assertion).
fn pump(a: &mut Node, b: &mut Node, mut done: impl FnMut(&Node, &Node) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done(a, b) {
        assert!(Instant::now() < deadline, "condition not reached");
        a.t.poll(&mut a.events).unwrap();
        b.t.poll(&mut b.events).unwrap();
        a.t.wait(Duration::from_millis(1)).unwrap();
    }
}

fn pair() -> (Node, Node) {
    let (mut a, mut b, _) = start_two(SECRET);
    pump(&mut a, &mut b, |a, b| {
        a.events.contains(&TransportEvent::PeerUp(NodeId(1)))
            && b.events.contains(&TransportEvent::PeerUp(NodeId(0)))
    });
    a.events.clear();
    b.events.clear();
    (a, b)
}

fn completion(n: &Node, op: u64) -> Option<Result<(), OpError>> {
    n.events.iter().find_map(|e| match e {
        TransportEvent::Completed(c) if c.op == OpId(op) => Some(c.result),
        _ => None,
    })
}

/// `from` writes `bytes` at `remote` in `to`'s region; returns the outcome.
fn write(
    from: &mut Node,
    to: &mut Node,
    op: u64,
    remote: usize,
    bytes: &[u8],
) -> Result<(), OpError> {
    let local = layout().staging(SlotKind::Ack, NodeId(1));
    from.region.write(local, bytes);
    let peer = if from.t.connected(NodeId(1)) {
        NodeId(1)
    } else {
        NodeId(0)
    };
    from.t
        .post(RemoteOp::Write {
            op: OpId(op),
            peer,
            local_offset: local,
            len: bytes.len(),
            remote_offset: remote,
        })
        .unwrap();
    pump(from, to, |f, _| completion(f, op).is_some());
    completion(from, op).unwrap()
}

#[test]
fn writes_obey_the_access_rules_and_the_grant() {
    let (mut a, mut b) = pair();
    let l = layout();
    let own_slot = l.inbound(SlotKind::Ack, NodeId(0));
    assert_eq!(write(&mut a, &mut b, 1, own_slot, b"ack from n0"), Ok(()));
    let mut got = [0u8; 11];
    b.region.read(own_slot, &mut got);
    assert_eq!(&got, b"ack from n0");

    // Another writer's slot: refused, nothing lands.
    let foreign = l.inbound(SlotKind::Ack, NodeId(1));
    assert_eq!(
        write(&mut a, &mut b, 2, foreign, b"forged"),
        Err(OpError::AccessDenied)
    );
    b.region.read(foreign, &mut got[..6]);
    assert_eq!(&got[..6], &[0; 6]);

    // The ring: refused until granted, accepted while granted, refused again.
    let ring = l.ring_offset();
    assert_eq!(
        write(&mut a, &mut b, 3, ring, b"entry"),
        Err(OpError::AccessDenied)
    );
    b.t.set_log_writer(Some(NodeId(0))).unwrap();
    assert_eq!(write(&mut a, &mut b, 4, ring, b"entry"), Ok(()));
    b.t.set_log_writer(None).unwrap();
    assert_eq!(
        write(&mut a, &mut b, 5, ring + 8, b"stale"),
        Err(OpError::AccessDenied)
    );
    let mut ringb = [0u8; 16];
    b.region.read(ring, &mut ringb);
    assert_eq!(&ringb[..5], b"entry");
    assert_eq!(&ringb[8..13], &[0; 5], "a revoked writer's bytes landed");

    // Outside the region altogether.
    assert_eq!(
        write(&mut a, &mut b, 6, l.region_len() - 2, b"overflow"),
        Err(OpError::AccessDenied)
    );
}

#[test]
fn reads_and_compare_and_swap() {
    let (mut a, mut b) = pair();
    let l = layout();
    b.region.write(l.status(), b"status of n1");
    let landing = l.probe_landing(NodeId(1));
    a.t.post(RemoteOp::Read {
        op: OpId(10),
        peer: NodeId(1),
        remote_offset: l.status(),
        len: 12,
        local_offset: landing,
    })
    .unwrap();
    a.t.post(RemoteOp::Read {
        op: OpId(11),
        peer: NodeId(1),
        remote_offset: l.ring_offset(),
        len: 8,
        local_offset: landing + 64,
    })
    .unwrap();
    let slot = l.inbound(SlotKind::VoteRequest, NodeId(0));
    for (op, expected, new) in [(12, 0, 5), (13, 0, 6)] {
        a.t.post(RemoteOp::CompareAndSwap {
            op: OpId(op),
            peer: NodeId(1),
            remote_offset: slot,
            expected,
            new,
            local_offset: landing + 8 * (op as usize - 10),
        })
        .unwrap();
    }
    pump(&mut a, &mut b, |a, _| {
        (10..14).all(|op| completion(a, op).is_some())
    });
    assert_eq!(completion(&a, 10), Some(Ok(())));
    let mut got = [0u8; 12];
    a.region.read(landing, &mut got);
    assert_eq!(&got, b"status of n1");
    assert_eq!(
        completion(&a, 11),
        Some(Err(OpError::AccessDenied)),
        "the ring is not readable"
    );
    assert_eq!(
        b.region.load_u64(slot),
        5,
        "first CAS swapped, second did not"
    );
    assert_eq!(
        a.region.load_u64(landing + 24),
        5,
        "second CAS saw the first one's value"
    );
}

#[test]
fn losing_the_peer_fails_pending_operations_and_reconnects() {
    let (mut a, mut b, peers) = start_two(SECRET);
    pump(&mut a, &mut b, |a, _| {
        a.events.contains(&TransportEvent::PeerUp(NodeId(1)))
    });
    // Node 1's port is free from here until it binds it again.
    let binding = binding();
    drop(b);
    // Posted after the peer died: it completes, with an error.
    let l = layout();
    a.t.post(RemoteOp::Write {
        op: OpId(20),
        peer: NodeId(1),
        local_offset: l.staging(SlotKind::Leader, NodeId(1)),
        len: 8,
        remote_offset: l.inbound(SlotKind::Leader, NodeId(0)),
    })
    .unwrap();
    let mut b = try_node(1, &peers, SECRET).unwrap();
    drop(binding);
    pump(&mut a, &mut b, |a, _| {
        completion(a, 20) == Some(Err(OpError::PeerUnreachable))
            && a.events.contains(&TransportEvent::PeerDown(NodeId(1)))
    });
    // The dialer comes back.
    a.events.clear();
    pump(&mut a, &mut b, |a, _| {
        a.events.contains(&TransportEvent::PeerUp(NodeId(1)))
    });
}

#[test]
fn a_wrong_secret_or_garbage_is_refused_and_changes_nothing() {
    let (mut a, mut rogue, peers) = start_two(b"this is not the cluster secret!!");
    let stats = a.t.stats();
    pump(&mut a, &mut rogue, |_, _| {
        stats.refused.load(Ordering::Relaxed) >= 1
    });
    // Garbage on the replication port.
    let mut s = TcpStream::connect(peers[0]).unwrap();
    s.write_all(&[0x42; 300]).unwrap();
    drop(s);
    pump(&mut a, &mut rogue, |_, _| {
        stats.refused.load(Ordering::Relaxed) >= 2
    });
    assert!(
        !a.events
            .iter()
            .any(|e| matches!(e, TransportEvent::PeerUp(_)))
    );
    let mut everything = vec![0u8; layout().region_len()];
    a.region.read(0, &mut everything);
    assert!(
        everything.iter().all(|&b| b == 0),
        "a refused peer changed the region"
    );
}

/// A peer that stops answering without closing (a stopped process: its
/// kernel still takes our bytes) is declared lost once an operation is
/// past the deadline: the operation fails, PeerDown is reported, and the
/// leader's ring is no longer pinned by it.
#[test]
fn a_peer_that_stops_answering_is_lost_after_the_op_deadline() {
    let (mut a, b) = pair();
    let slot = layout().inbound(SlotKind::Ack, NodeId(0));
    let local = layout().staging(SlotKind::Ack, NodeId(1));
    a.t.post(RemoteOp::Write {
        op: OpId(77),
        peer: NodeId(1),
        local_offset: local,
        len: 64,
        remote_offset: slot,
    })
    .unwrap();
    // `b` is never polled again: it neither reads nor answers.
    let posted = Instant::now();
    let limit = posted + Duration::from_secs(20);
    while completion(&a, 77).is_none() {
        assert!(
            Instant::now() < limit,
            "the silent peer was never declared lost"
        );
        a.t.poll(&mut a.events).unwrap();
        a.t.wait(Duration::from_millis(1)).unwrap();
    }
    let waited = posted.elapsed();
    assert_eq!(completion(&a, 77), Some(Err(OpError::PeerUnreachable)));
    assert!(a.events.contains(&TransportEvent::PeerDown(NodeId(1))));
    assert!(
        waited >= apus_tcp::DEFAULT_OP_TIMEOUT,
        "declared lost after {waited:?}, before the deadline"
    );
    assert_eq!(a.t.stats().timeouts.load(Ordering::Relaxed), 1);
    drop(b);
}
