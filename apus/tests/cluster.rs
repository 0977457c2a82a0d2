//! Three real nodes in one process over TCP loopback.

mod common;

use std::time::Duration;

use apus::{Node, ProposeError};
use apus_core::{EntryKind, NodeId};
use common::{Log, config, config_with, leader, propose, until};

#[test]
fn three_nodes_commit_fail_over_and_catch_up() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "durable");
    let logs: Vec<Log> = (0..3).map(|_| Log::default()).collect();
    let mut nodes: Vec<Option<Node>> = (0..3)
        .map(|i| Some(Node::start(&cfg, NodeId(i as u8), logs[i].clone()).unwrap()))
        .collect();
    until("a leader", || leader(&nodes).is_some());
    for i in 0..200u32 {
        propose(&nodes, format!("before {i}").as_bytes());
    }
    // Followers may still be applying the last commits.
    until("followers to apply", || {
        logs.iter().all(|l| l.0.lock().unwrap().len() >= 200)
    });

    // The leader stops; the others elect a new one and go on.
    let old = leader(&nodes).unwrap();
    nodes[old].take().unwrap().shutdown();
    for i in 0..200u32 {
        propose(&nodes, format!("after {i}").as_bytes());
    }
    let new = leader(&nodes).unwrap();
    assert_ne!(new, old);

    // The old leader restarts from its data directory and catches up.
    let fresh = Log::default();
    nodes[old] = Some(Node::start(&cfg, NodeId(old as u8), fresh.clone()).unwrap());
    assert!(nodes[old].as_ref().unwrap().recovery().entries >= 200);
    until("the restarted node to catch up", || {
        fresh.0.lock().unwrap().len() >= 400
    });

    let reference = logs[new].0.lock().unwrap().clone();
    assert_eq!(reference.len(), 400);
    assert_eq!(
        &*fresh.0.lock().unwrap(),
        &reference,
        "restarted replica diverged"
    );
    for (i, l) in logs.iter().enumerate() {
        if i != old {
            until("every replica to apply everything", || {
                l.0.lock().unwrap().len() >= 400
            });
            assert_eq!(&*l.0.lock().unwrap(), &reference, "replica {i} diverged");
        }
    }
    for n in nodes.into_iter().flatten() {
        n.shutdown();
    }
}

#[test]
fn a_follower_redirects_and_oversized_proposals_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "memory");
    let nodes: Vec<Option<Node>> = (0..3)
        .map(|i| Some(Node::start(&cfg, NodeId(i as u8), Log::default()).unwrap()))
        .collect();
    until("a leader known to all", || {
        leader(&nodes).is_some() && nodes.iter().flatten().all(|n| n.status().leader.is_some())
    });
    let l = leader(&nodes).unwrap();
    let f = (l + 1) % 3;
    assert_eq!(
        nodes[f].as_ref().unwrap().propose(b"x"),
        Err(ProposeError::NotLeader {
            leader: Some(NodeId(l as u8))
        })
    );
    assert!(matches!(
        nodes[l].as_ref().unwrap().propose(&vec![0; 5000]),
        Err(ProposeError::TooLarge {
            len: 5000,
            max: 4096
        })
    ));
    assert!(nodes[l].as_ref().unwrap().propose(b"fits").is_ok());
}

/// Output commit's node API: submitted proposals commit in order and a
/// wait on the count covers all of them; one that fails (a follower's
/// refusal here) makes every later wait fail, for good.
#[test]
fn submitted_proposals_commit_in_order_and_a_lost_one_fails_every_wait() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "memory");
    let logs: Vec<Log> = (0..3).map(|_| Log::default()).collect();
    let nodes: Vec<Option<Node>> = (0..3)
        .map(|i| Some(Node::start(&cfg, NodeId(i as u8), logs[i].clone()).unwrap()))
        .collect();
    until("a leader known to all", || {
        leader(&nodes).is_some() && nodes.iter().flatten().all(|n| n.status().leader.is_some())
    });
    let l = leader(&nodes).unwrap();
    let n = nodes[l].as_ref().unwrap();
    let mut last = 0;
    for i in 0..500u32 {
        last = n
            .submit(EntryKind::Data, 0, &[format!("s{i}").as_bytes()], 1 << 20)
            .unwrap();
    }
    assert_eq!(last, 500);
    n.wait_submitted(last).unwrap();
    assert_eq!(n.unresolved(), 0);
    // Committed is what the wait promises; applying follows on its own
    // thread.
    until("the 500 applied on the leader", || {
        logs[l].0.lock().unwrap().len() >= 500
    });
    let applied = logs[l].0.lock().unwrap().clone();
    let expected: Vec<Vec<u8>> = (0..500u32).map(|i| format!("s{i}").into_bytes()).collect();
    assert_eq!(applied, expected, "committed in submission order");
    // A small bound makes a submitter wait for the commits before it.
    for i in 0..50u32 {
        n.submit(EntryKind::Data, 0, &[format!("b{i}").as_bytes()], 8)
            .unwrap();
    }
    n.wait_submitted(n.submitted()).unwrap();
    // A follower takes the submission but the engine refuses it.
    let f = nodes[(l + 1) % 3].as_ref().unwrap();
    let t = f.submit(EntryKind::Data, 0, &[b"lost"], 1 << 20).unwrap();
    assert!(f.wait_submitted(t).is_err());
    assert!(f.speculation_lost().is_some());
    assert!(f.wait_submitted(0).is_err(), "for good");
    assert!(n.speculation_lost().is_none(), "the leader lost nothing");
}

/// `transport = "auto"`: the replicas settle on one transport (not verbs on
/// a host without an RDMA device), `status` shows it, and a replica that
/// restarts learns it from the running ones.
#[test]
fn auto_settles_on_one_transport_and_a_restarted_replica_learns_it() {
    let dir = tempfile::tempdir().unwrap();
    // Fabric (if this build and host have it) stays on loopback.
    let cfg = config_with(
        dir.path(),
        "memory",
        "transport = \"auto\"\ndomain = \"lo\"\n",
    );
    let logs: Vec<Log> = (0..3).map(|_| Log::default()).collect();
    let mut nodes: Vec<Option<Node>> = (0..3)
        .map(|i| Some(Node::start(&cfg, NodeId(i as u8), logs[i].clone()).unwrap()))
        .collect();
    until("every replica to settle", || {
        nodes
            .iter()
            .flatten()
            .all(|n| n.status().transport != apus::TransportKind::Auto)
    });
    let chosen = nodes[0].as_ref().unwrap().status().transport;
    for n in nodes.iter().flatten() {
        assert_eq!(n.status().transport, chosen, "replicas settled differently");
    }
    let has_device = cfg!(feature = "verbs") && verbs_device_present();
    if !has_device {
        assert_ne!(chosen, apus::TransportKind::Verbs);
    }
    eprintln!("auto settled on {chosen}");
    for i in 0..50u32 {
        propose(&nodes, format!("auto {i}").as_bytes());
    }
    // A follower restarts: the others run `chosen` now, not auto.
    let f = (0..3).find(|&i| leader(&nodes) != Some(i)).unwrap();
    nodes[f].take().unwrap().shutdown();
    let fresh = Log::default();
    nodes[f] = Some(Node::start(&cfg, NodeId(f as u8), fresh.clone()).unwrap());
    until("the restarted replica to settle", || {
        nodes[f].as_ref().unwrap().status().transport != apus::TransportKind::Auto
    });
    assert_eq!(nodes[f].as_ref().unwrap().status().transport, chosen);
    for i in 50..100u32 {
        propose(&nodes, format!("auto {i}").as_bytes());
    }
    until("the restarted replica to catch up", || {
        fresh.0.lock().unwrap().len() >= 100
    });
    for n in nodes.into_iter().flatten() {
        n.shutdown();
    }
}

#[cfg(feature = "verbs")]
fn verbs_device_present() -> bool {
    apus_rdma::device_names().is_ok_and(|d| !d.is_empty())
}

#[cfg(not(feature = "verbs"))]
fn verbs_device_present() -> bool {
    false
}

/// `transport = "verbs"` on a host without an RDMA device: the node does
/// not start, and the error says why and what to use instead.
#[cfg(feature = "verbs")]
#[test]
fn verbs_without_a_device_fails_at_once_with_the_alternatives() {
    if verbs_device_present() {
        eprintln!("SKIPPED: this host has an RDMA device (the guest runs the verbs cluster test)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_with(dir.path(), "memory", "transport = \"verbs\"\n");
    let e = match Node::start(&cfg, NodeId(0), Log::default()) {
        Ok(_) => panic!("a verbs node started without a device"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("cluster.transport"), "{e}");
    assert!(e.contains("no RDMA device found"), "{e}");
    assert!(e.contains("transport = \"tcp\""), "{e}");
    assert!(e.contains("\"auto\""), "{e}");
}

/// `fence_check` acting as a stopped, deposed leader: every follower refuses
/// its log write; acting as a running replica is refused before anything is
/// sent.
fn fence_check_over(transport: &str, kind: apus::TransportKind) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config_with(dir.path(), "memory", transport);
    let mut nodes: Vec<Option<Node>> = (0..3)
        .map(|i| Some(Node::start(&cfg, NodeId(i as u8), Log::default()).unwrap()))
        .collect();
    until("a leader", || leader(&nodes).is_some());
    propose(&nodes, b"before");
    let old = leader(&nodes).unwrap();

    let running = apus::fence_check::run(&cfg, NodeId(old as u8), kind, Duration::from_secs(5));
    assert!(
        matches!(
            running,
            Err(apus::fence_check::FenceCheckError::Running { .. })
        ),
        "fence-check beside the running replica: {running:?}"
    );

    let old_term = nodes[old].as_ref().unwrap().status().term;
    nodes[old].take().unwrap().shutdown();
    until("a new leader", || {
        leader(&nodes).is_some_and(|l| nodes[l].as_ref().unwrap().status().term > old_term)
    });
    let report =
        apus::fence_check::run(&cfg, NodeId(old as u8), kind, Duration::from_secs(10)).unwrap();
    assert_eq!(report.peers.len(), 2, "{report:?}");
    assert!(report.all_fenced(), "{report:?}");
    assert!(!report.broken());
    // The cluster is undisturbed: it still commits, and the old leader
    // rejoins.
    propose(&nodes, b"after");
    nodes[old] = Some(Node::start(&cfg, NodeId(old as u8), Log::default()).unwrap());
    propose(&nodes, b"rejoined");
    for n in nodes.into_iter().flatten() {
        n.shutdown();
    }
}

#[test]
fn fence_check_over_tcp_finds_every_follower_refusing_a_deposed_leader() {
    fence_check_over("transport = \"tcp\"\n", apus::TransportKind::Tcp);
}

#[cfg(feature = "fabric")]
#[test]
fn fence_check_over_fabric_finds_every_follower_refusing_a_deposed_leader() {
    fence_check_over(
        "transport = \"fabric\"\nprovider = \"tcp;ofi_rxm\"\n",
        apus::TransportKind::Fabric,
    );
}
