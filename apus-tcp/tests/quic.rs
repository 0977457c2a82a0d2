//! The QUIC transport keeps the transport contract, and only replicas with
//! the cluster's certificates get in.
#![cfg(feature = "quic")]

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use apus_core::layout::SlotKind;
use apus_core::{NodeId, OpError, OpId, Region, RegionLayout, RemoteOp, Transport, TransportEvent};
use apus_tcp::quic::{GeneratedCerts, QuicConfig, QuicTransport, TlsConfig, generate_certs};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn layout() -> RegionLayout {
    RegionLayout::new(2, 4096, 1024).unwrap()
}

fn tls(certs: &GeneratedCerts, me: usize) -> TlsConfig {
    TlsConfig {
        ca: CertificateDer::from_pem_slice(certs.ca_cert.as_bytes()).unwrap(),
        certs: certs
            .replicas
            .iter()
            .map(|(c, _)| CertificateDer::from_pem_slice(c.as_bytes()).unwrap())
            .collect(),
        key: PrivateKeyDer::from_pem_slice(certs.replicas[me].1.as_bytes()).unwrap(),
    }
}

struct Node {
    t: QuicTransport,
    region: Region,
    events: Vec<TransportEvent>,
}

fn node(me: u8, peers: &[SocketAddr], tls: TlsConfig) -> Node {
    let region = Region::new(layout().region_len());
    let t = QuicTransport::start(
        QuicConfig {
            me: NodeId(me),
            peers: peers.to_vec(),
            layout: layout(),
            op_timeout: apus_tcp::DEFAULT_OP_TIMEOUT,
            identity: None,
            tls,
        },
        region.clone(),
    )
    .unwrap();
    Node {
        t,
        region,
        events: Vec::new(),
    }
}

fn pump(a: &mut Node, b: &mut Node, mut done: impl FnMut(&Node, &Node) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done(a, b) {
        assert!(Instant::now() < deadline, "condition not reached");
        a.t.poll(&mut a.events).unwrap();
        b.t.poll(&mut b.events).unwrap();
        a.t.wait(Duration::from_millis(1)).unwrap();
    }
}

fn completion(n: &Node, op: u64) -> Option<Result<(), OpError>> {
    n.events.iter().find_map(|e| match e {
        TransportEvent::Completed(c) if c.op == OpId(op) => Some(c.result),
        _ => None,
    })
}

#[test]
fn mutual_tls_connects_and_keeps_the_contract() {
    let certs = generate_certs(2).unwrap();
    let peers = [free_udp(), free_udp()];
    let mut a = node(0, &peers, tls(&certs, 0));
    let mut b = node(1, &peers, tls(&certs, 1));
    pump(&mut a, &mut b, |a, b| {
        a.events.contains(&TransportEvent::PeerUp(NodeId(1)))
            && b.events.contains(&TransportEvent::PeerUp(NodeId(0)))
    });
    let l = layout();
    let src = l.staging(SlotKind::Ack, NodeId(1));
    a.region.write(src, b"grant-checked");
    let post = |a: &mut Node, op: u64, remote: usize| {
        a.t.post(RemoteOp::Write {
            op: OpId(op),
            peer: NodeId(1),
            local_offset: src,
            len: 13,
            remote_offset: remote,
        })
        .unwrap()
    };
    post(&mut a, 1, l.inbound(SlotKind::Ack, NodeId(0)));
    post(&mut a, 2, l.ring_offset());
    pump(&mut a, &mut b, |a, _| {
        completion(a, 1).is_some() && completion(a, 2).is_some()
    });
    assert_eq!(completion(&a, 1), Some(Ok(())));
    assert_eq!(
        completion(&a, 2),
        Some(Err(OpError::AccessDenied)),
        "ring written without the grant"
    );
    b.t.set_log_writer(Some(NodeId(0))).unwrap();
    post(&mut a, 3, l.ring_offset());
    a.t.post(RemoteOp::Read {
        op: OpId(4),
        peer: NodeId(1),
        remote_offset: l.status(),
        len: 16,
        local_offset: l.probe_landing(NodeId(1)),
    })
    .unwrap();
    pump(&mut a, &mut b, |a, _| {
        completion(a, 3).is_some() && completion(a, 4).is_some()
    });
    assert_eq!(completion(&a, 3), Some(Ok(())));
    let mut got = [0u8; 13];
    b.region.read(l.ring_offset(), &mut got);
    assert_eq!(&got, b"grant-checked");
    assert_eq!(completion(&a, 4), Some(Ok(())));
}

#[test]
fn a_replica_with_a_foreign_certificate_is_refused() {
    let certs = generate_certs(2).unwrap();
    let foreign = generate_certs(2).unwrap();
    let peers = [free_udp(), free_udp()];
    let mut a = node(0, &peers, tls(&certs, 0));
    // n1 holds a certificate from another CA (but knows the real CA).
    let mut rogue_tls = tls(&foreign, 1);
    rogue_tls.ca = tls(&certs, 0).ca;
    let mut rogue = node(1, &peers, rogue_tls);
    let stats = a.t.stats();
    let rogue_stats = rogue.t.stats();
    pump(&mut a, &mut rogue, |_, _| {
        stats.refused.load(Ordering::Relaxed) + rogue_stats.refused.load(Ordering::Relaxed) >= 2
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
