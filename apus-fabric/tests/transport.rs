//! The fabric transport as the engine sees it: three transports in one
//! process, polled in turn, per provider. Needs libfabric (`cargo xtask
//! test` installs it); without it each test prints SKIPPED with the reason.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use apus_core::{
    Completion, NodeId, OpError, OpId, Region, RegionLayout, RemoteOp, Transport, TransportEvent,
};
use apus_fabric::{FabricConfig, FabricTransport};

const SECRET: &[u8] = b"fabric transport test secret";

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
    t: FabricTransport,
    region: Region,
    events: Vec<TransportEvent>,
}

struct Trio {
    nodes: Vec<Option<Node>>,
}

fn domain(provider: &str) -> Option<String> {
    provider.starts_with("tcp").then(|| "lo".to_string())
}

fn start(provider: &str, me: u8, peers: &[SocketAddr], timeout: Duration) -> Option<Node> {
    match try_start(provider, me, peers, timeout) {
        Ok(n) => n,
        Err(e) => panic!("starting a {provider} transport: {e}"),
    }
}

/// [`start`], with the set-up error returned (a port taken meanwhile).
fn try_start(
    provider: &str,
    me: u8,
    peers: &[SocketAddr],
    timeout: Duration,
) -> Result<Option<Node>, apus_fabric::transport::StartError> {
    let region = Region::new(layout().region_len());
    let cfg = FabricConfig {
        me: NodeId(me),
        peers: peers.to_vec(),
        secret: SECRET.to_vec(),
        layout: layout(),
        provider: provider.into(),
        domain: domain(provider),
        op_timeout: timeout,
        identity: None,
    };
    match FabricTransport::start(cfg, region.clone()) {
        Ok(t) => Ok(Some(Node {
            t,
            region,
            events: Vec::new(),
        })),
        Err(apus_fabric::transport::StartError::Fabric(
            e @ apus_fabric::FabricError::LibraryMissing(_),
        )) => {
            eprintln!("SKIPPED: {e}");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

impl Trio {
    fn start(provider: &str, timeout: Duration) -> Option<Trio> {
        // The ports are free when chosen, not when bound: another test's
        // connection can take one meanwhile (CI: "Address already in
        // use"). Then the three start again on fresh ports.
        let mut attempt = 0;
        let nodes = 'start: loop {
            attempt += 1;
            let peers = ports();
            let mut nodes = Vec::new();
            for i in 0..3 {
                match try_start(provider, i, &peers, timeout) {
                    Ok(n) => nodes.push(Some(n?)),
                    Err(e) if attempt < 5 && e.to_string().contains("in use") => {
                        eprintln!("a chosen port was taken ({e}); starting again");
                        continue 'start;
                    }
                    Err(e) => panic!("starting a {provider} transport: {e}"),
                }
            }
            break nodes;
        };
        let mut t = Trio { nodes };
        t.until("all peers up", |t| {
            (0..3).all(|i| {
                (0..3)
                    .filter(|&j| j != i)
                    .all(|j| t.node(i).t.connected(NodeId(j as u8)))
            })
        });
        Some(t)
    }

    fn node(&mut self, i: usize) -> &mut Node {
        self.nodes[i].as_mut().expect("running")
    }

    fn poll_all(&mut self) {
        for n in self.nodes.iter_mut().flatten() {
            n.t.poll(&mut n.events).expect("poll");
        }
    }

    /// Polls every node until `done` holds (10 s at most).
    fn until(&mut self, what: &str, mut done: impl FnMut(&mut Trio) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
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

/// Slots, reads, ordering of completions, and the access rules.
fn slots_reads_and_rules(provider: &str) {
    let Some(mut t) = Trio::start(provider, Duration::from_secs(5)) else {
        return;
    };
    let l = layout();
    // Node 1 writes its leader record slot in node 0.
    let staging = l.staging(apus_core::layout::SlotKind::Leader, NodeId(0));
    t.node(1).region.write(staging, &[0xab; 128]);
    let slot = l.inbound(apus_core::layout::SlotKind::Leader, NodeId(1));
    t.node(1).t.post(write(1, 0, staging, 128, slot)).unwrap();
    assert_eq!(t.completion(1, OpId(1)).result, Ok(()));
    let mut got = [0u8; 128];
    t.node(0).region.read(slot, &mut got);
    assert_eq!(got, [0xab; 128]);

    // Someone else's slot: refused, nothing lands.
    let other = l.inbound(apus_core::layout::SlotKind::Leader, NodeId(2));
    t.node(1).t.post(write(2, 0, staging, 128, other)).unwrap();
    assert_eq!(t.completion(1, OpId(2)).result, Err(OpError::AccessDenied));
    t.node(0).region.read(other, &mut got);
    assert_eq!(got, [0; 128]);

    // A read of node 2's status record lands in node 1's probe slot.
    t.node(2).region.write(l.status(), &[0x5a; 128]);
    let probe = l.probe_landing(NodeId(2));
    t.node(1)
        .t
        .post(RemoteOp::Read {
            op: OpId(3),
            peer: NodeId(2),
            remote_offset: l.status(),
            len: 128,
            local_offset: probe,
        })
        .unwrap();
    assert_eq!(t.completion(1, OpId(3)).result, Ok(()));
    t.node(1).region.read(probe, &mut got);
    assert_eq!(got, [0x5a; 128]);

    // Reading the ring is not allowed.
    t.node(1)
        .t
        .post(RemoteOp::Read {
            op: OpId(4),
            peer: NodeId(2),
            remote_offset: l.ring_offset(),
            len: 64,
            local_offset: probe,
        })
        .unwrap();
    assert_eq!(t.completion(1, OpId(4)).result, Err(OpError::AccessDenied));

    // Many writes in a row complete in the order posted.
    for k in 0..200u64 {
        t.node(1)
            .t
            .post(write(100 + k, 0, staging, 64 + (k as usize % 64), slot))
            .unwrap();
    }
    let mut seen = Vec::new();
    t.until("200 completions", |t| {
        let n = t.node(1);
        for e in n.events.drain(..) {
            if let TransportEvent::Completed(c) = e {
                assert_eq!(c.result, Ok(()));
                seen.push(c.op.0);
            }
        }
        seen.len() == 200
    });
    assert_eq!(seen, (100..300).collect::<Vec<_>>());
}

/// The ring: refused without the grant, written with it, refused again
/// after revocation, even with the old key.
fn ring_grant_and_fencing(provider: &str) {
    let Some(mut t) = Trio::start(provider, Duration::from_millis(500)) else {
        return;
    };
    let l = layout();
    let ring = l.ring_offset();
    let src = l.scratch(NodeId(0), 0);
    t.node(1).region.write(src, &[0x11; 256]);
    // No grant yet.
    t.node(1).t.post(write(1, 0, src, 256, ring)).unwrap();
    assert_eq!(t.completion(1, OpId(1)).result, Err(OpError::AccessDenied));

    // Node 0 grants node 1; once the grant arrived, writes land.
    t.node(0).t.set_log_writer(Some(NodeId(1))).unwrap();
    let mut op = 10;
    loop {
        t.node(1).t.post(write(op, 0, src, 256, ring)).unwrap();
        if t.completion(1, OpId(op)).result.is_ok() {
            break;
        }
        op += 1;
        assert!(op < 10_000, "the grant never arrived");
    }
    let mut got = [0u8; 256];
    t.node(0).region.read(ring, &mut got);
    assert_eq!(got, [0x11; 256]);

    // Node 0 moves the grant to node 2. Node 1 has not heard yet (it is
    // not polled) and writes with its old key: the provider refuses it.
    t.node(0).t.set_log_writer(Some(NodeId(2))).unwrap();
    t.node(1).region.write(src, &[0x22; 256]);
    t.node(1).t.post(write(50_000, 0, src, 256, ring)).unwrap();
    let c = t.completion(1, OpId(50_000));
    assert!(c.result.is_err(), "a revoked writer's write succeeded");
    t.node(0).region.read(ring, &mut got);
    assert_eq!(got, [0x11; 256], "a revoked writer's bytes landed");
    let s = t.node(1).t.stats();
    let fenced = s.fenced_writes.load(std::sync::atomic::Ordering::Relaxed);
    let timeouts = s.timeouts.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        fenced + timeouts >= 1,
        "neither a refusal nor a timeout was counted"
    );
    eprintln!("{provider}: revoked write ended with {c:?} (fenced {fenced}, timeouts {timeouts})");

    // The new writer's writes land.
    t.node(2).region.write(src, &[0x33; 256]);
    let mut op = 60_000;
    loop {
        t.node(2).t.post(write(op, 0, src, 256, ring)).unwrap();
        if t.completion(2, OpId(op)).result.is_ok() {
            break;
        }
        op += 1;
        assert!(op < 70_000, "the new grant never arrived");
    }
    t.node(0).region.read(ring, &mut got);
    assert_eq!(got, [0x33; 256]);
}

/// A peer that goes away: its pending operations fail, PeerDown is
/// reported, and a restarted peer reconnects.
fn peer_loss_and_return(provider: &str) {
    let Some(mut t) = Trio::start(provider, Duration::from_secs(2)) else {
        return;
    };
    let l = layout();
    let slot = l.inbound(apus_core::layout::SlotKind::Ack, NodeId(0));
    let staging = l.staging(apus_core::layout::SlotKind::Ack, NodeId(2));
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
}

/// A granted writer whose connection ends (a paused leader's operations
/// time out before anyone is elected) loses its key with it: the close
/// counts as the revocation, once, and moving the grant later adds none.
fn lost_writer_is_revoked(provider: &str) {
    let Some(mut t) = Trio::start(provider, Duration::from_secs(2)) else {
        return;
    };
    let revocations = |t: &mut Trio| {
        t.node(0)
            .t
            .stats()
            .revocations
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    t.node(0).t.set_log_writer(Some(NodeId(1))).unwrap();
    assert_eq!(revocations(&mut t), 0, "a grant is no revocation");
    t.nodes[1] = None;
    t.until("PeerDown", |t| {
        t.node(0)
            .events
            .contains(&TransportEvent::PeerDown(NodeId(1)))
    });
    assert_eq!(revocations(&mut t), 1, "the lost writer's key was closed");
    t.node(0).t.set_log_writer(Some(NodeId(2))).unwrap();
    assert_eq!(revocations(&mut t), 1, "counted twice");
    t.node(0).t.set_log_writer(None).unwrap();
    assert_eq!(revocations(&mut t), 2, "a connected writer's revocation");
}

macro_rules! per_provider {
    ($($name:ident: $provider:expr, $test:ident;)*) => {$(
        #[test]
        fn $name() {
            $test($provider);
        }
    )*};
}

per_provider! {
    shm_slots_reads_and_rules: "shm", slots_reads_and_rules;
    shm_ring_grant_and_fencing: "shm", ring_grant_and_fencing;
    shm_peer_loss: "shm", peer_loss_and_return;
    shm_lost_writer_is_revoked: "shm", lost_writer_is_revoked;
    rxm_slots_reads_and_rules: "tcp;ofi_rxm", slots_reads_and_rules;
    rxm_ring_grant_and_fencing: "tcp;ofi_rxm", ring_grant_and_fencing;
    rxm_peer_loss: "tcp;ofi_rxm", peer_loss_and_return;
    rxm_lost_writer_is_revoked: "tcp;ofi_rxm", lost_writer_is_revoked;
    tcp_connected_slots_reads_and_rules: "tcp", slots_reads_and_rules;
    tcp_connected_ring_grant_and_fencing: "tcp", ring_grant_and_fencing;
    tcp_connected_peer_loss: "tcp", peer_loss_and_return;
}

#[test]
fn a_tcp_transport_replica_is_refused_with_a_reason() {
    let peers = ports();
    let Some(mut fabric) = start("shm", 0, &peers, Duration::from_secs(1)) else {
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
    let stats = fabric.t.setup_stats();
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.refused.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the tcp replica was not refused");
        fabric.t.poll(&mut fabric.events).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!fabric.t.connected(NodeId(1)));
    drop(tcp);
}
