//! Three real nodes in one process over TCP loopback.

use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apus::{ClusterConfig, Entry, Node, ProposeError, StateMachine};
use apus_core::{EntryKind, NodeId, Role};

/// Records every data entry it applies.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Vec<u8>>>>);

impl StateMachine for Log {
    fn apply(&mut self, e: &Entry<'_>) -> Vec<u8> {
        if e.kind == EntryKind::Data {
            self.0.lock().unwrap().push(e.payload.to_vec());
        }
        e.index.to_le_bytes().to_vec()
    }
}

/// `n` distinct free loopback ports: every listener stays bound until all
/// are chosen, so the kernel cannot hand out one port twice.
fn ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

fn config(dir: &Path, durability: &str) -> ClusterConfig {
    let mut text = format!(
        "[cluster]\nsecret = \"cluster test secret, 32 bytes...\"\ndurability = \"{durability}\"\npoll = \"park\"\n\
         [engine]\nring_capacity = 1048576\ncatchup_chunk = 65536\nmax_payload = 4096\n\
         heartbeat_us = 2000\nelection_timeout_us = 40000\n"
    );
    for (i, port) in ports(3).into_iter().enumerate() {
        text += &format!(
            "[[replica]]\nid = {i}\naddress = \"127.0.0.1:{}\"\ndata_dir = \"{}\"\n",
            port,
            dir.join(format!("n{i}")).display()
        );
    }
    ClusterConfig::parse(&text, None).unwrap()
}

/// Waits (a hang guard, not a timing assertion) until `f` holds.
fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn leader(nodes: &[Option<Node>]) -> Option<usize> {
    nodes
        .iter()
        .position(|n| n.as_ref().is_some_and(|n| n.status().role == Role::Leader))
}

/// Proposes `payload` to whoever leads, following redirects.
fn propose(nodes: &[Option<Node>], payload: &[u8]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "no leader accepted the proposal");
        let Some(l) = leader(nodes) else {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        match nodes[l].as_ref().unwrap().propose(payload) {
            Ok(a) => return a.index,
            Err(ProposeError::NotLeader { .. } | ProposeError::Lost | ProposeError::Timeout) => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("{e}"),
        }
    }
}

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
