//! A replicated key-value store in a few lines.
//!
//! ```sh
//! cargo run -p apus --example kv
//! ```
//!
//! Starts three replicas in this process (TCP on 127.0.0.1, a temporary data
//! directory), writes through the leader, stops the leader, keeps writing
//! through the new one, and shows that the surviving replicas hold the same
//! map. A real deployment runs one replica per host with the same
//! `StateMachine` and a shared cluster file (see `apus::config`).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apus::{ClusterConfig, Entry, Node, ProposeError, StateMachine};
use apus_core::{EntryKind, NodeId, Role};

/// The replicated state: `set key value` commands applied in log order.
#[derive(Clone, Default)]
struct Kv(Arc<Mutex<BTreeMap<String, String>>>);

impl StateMachine for Kv {
    fn apply(&mut self, e: &Entry<'_>) -> Vec<u8> {
        if e.kind != EntryKind::Data {
            return Vec::new();
        }
        let cmd = String::from_utf8_lossy(e.payload);
        let mut map = self.0.lock().unwrap();
        match cmd.split_once(' ') {
            Some((k, v)) => map
                .insert(k.to_string(), v.to_string())
                .unwrap_or_default()
                .into_bytes(),
            None => b"malformed".to_vec(),
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("apus-kv-{}", std::process::id()));
    // Three distinct free ports: all held until all are chosen.
    let held = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut text = String::from(
        "[cluster]\nsecret = \"example secret, not for production\"\npoll = \"park\"\n",
    );
    for (i, l) in held.iter().enumerate() {
        text += &format!(
            "[[replica]]\nid = {i}\naddress = \"127.0.0.1:{}\"\ndata_dir = \"{}/n{i}\"\n",
            l.local_addr()?.port(),
            dir.display()
        );
    }
    drop(held);
    let config = ClusterConfig::parse(&text, None)?;

    let stores: Vec<Kv> = (0..3).map(|_| Kv::default()).collect();
    let mut nodes: Vec<Option<Node>> = (0..3)
        .map(|i| Node::start(&config, NodeId(i as u8), stores[i].clone()).map(Some))
        .collect::<Result<_, _>>()?;

    let set =
        |nodes: &[Option<Node>], k: &str, v: &str| -> Result<u64, Box<dyn std::error::Error>> {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let leader = nodes
                    .iter()
                    .flatten()
                    .find(|n| n.status().role == Role::Leader);
                match leader.map(|n| n.propose(format!("{k} {v}").as_bytes())) {
                    Some(Ok(applied)) => return Ok(applied.index),
                    Some(Err(ProposeError::NotLeader { .. } | ProposeError::Lost)) | None
                        if Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err("no leader".into()),
                }
            }
        };

    for (k, v) in [
        ("apple", "red"),
        ("banana", "yellow"),
        ("cherry", "dark red"),
    ] {
        println!("set {k} = {v:<9} committed at index {}", set(&nodes, k, v)?);
    }
    let leader = nodes
        .iter()
        .position(|n| n.as_ref().is_some_and(|n| n.status().role == Role::Leader));
    let leader = leader.ok_or("no leader")?;
    println!("stopping the leader, n{leader}");
    nodes[leader].take().unwrap().shutdown();
    let mut last = 0;
    for (k, v) in [("cherry", "black"), ("date", "brown")] {
        last = set(&nodes, k, v)?;
        println!("set {k} = {v:<9} committed at index {last}");
    }
    // Followers apply what they learn is committed; wait until they have.
    while nodes.iter().flatten().any(|n| n.status().applied < last) {
        std::thread::sleep(Duration::from_millis(1));
    }
    for (i, node) in nodes.iter().enumerate() {
        if let Some(n) = node {
            println!(
                "n{i} ({}): {:?}",
                n.status().role,
                stores[i].0.lock().unwrap()
            );
        }
    }
    for n in nodes.into_iter().flatten() {
        n.shutdown();
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
