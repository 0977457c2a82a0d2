//! What the test binaries that run real nodes in one process share.

// Each test binary uses a part of it.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apus::{ClusterConfig, Entry, Node, ProposeError, StateMachine};
use apus_core::{EntryKind, Role};

/// Records every data entry it applies.
#[derive(Clone, Default)]
pub struct Log(pub Arc<Mutex<Vec<Vec<u8>>>>);

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
pub fn ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    held.iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

pub fn config(dir: &Path, durability: &str) -> ClusterConfig {
    config_with(dir, durability, "transport = \"tcp\"\n")
}

pub fn config_with(dir: &Path, durability: &str, transport: &str) -> ClusterConfig {
    let mut text = format!(
        "[cluster]\nsecret = \"cluster test secret, 32 bytes...\"\ndurability = \"{durability}\"\npoll = \"park\"\n{transport}\
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
pub fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn leader(nodes: &[Option<Node>]) -> Option<usize> {
    nodes
        .iter()
        .position(|n| n.as_ref().is_some_and(|n| n.status().role == Role::Leader))
}

/// Proposes `payload` to whoever leads, following redirects.
pub fn propose(nodes: &[Option<Node>], payload: &[u8]) -> u64 {
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
