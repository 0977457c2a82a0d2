//! APUS: replicate a server, or your own state machine, with Paxos over
//! one-sided remote memory writes.
//!
//! This crate is the runtime around the [`apus_core`] engine: the [`Node`]
//! (engine, sync and apply threads), storage ([`storage`]), the cluster
//! configuration ([`config`]), metrics, and the `apus` command line.
//!
//! # Choosing a transport
//!
//! Each transport is a cargo feature; the cluster configuration picks one of
//! those compiled in (`cluster.transport`), or lets the replicas choose
//! (`auto`, the default: the best one all of them can run, see
//! [`negotiate`]):
//!
//! | feature | transport | runs on |
//! |---|---|---|
//! | `tcp` (default) | framed remote-memory operations over TCP, cluster secret | everywhere |
//! | `quic` | the same frames over QUIC streams, mutual TLS (`apus certs`) | everywhere |
//! | `fabric` | libfabric RMA (`shm`, `tcp;ofi_rxm`, `tcp`, `verbs`) | hosts with libfabric |
//! | `verbs` | raw RDMA verbs, RC queue pairs, fencing by access flags | RDMA NICs, Soft-RoCE |
//!
//! ```toml
//! [dependencies]
//! apus = { path = "apus" }                                  # TCP
//! # apus = { path = "apus", features = ["fabric", "verbs"] } # and RDMA, chosen by `auto`
//! ```
//!
//! # Replicating your own state machine
//!
//! ```no_run
//! use apus::{ClusterConfig, Entry, Node, StateMachine};
//! use apus_core::NodeId;
//!
//! struct Counter(u64);
//! impl StateMachine for Counter {
//!     fn apply(&mut self, e: &Entry<'_>) -> Vec<u8> {
//!         self.0 += e.payload.len() as u64;
//!         self.0.to_le_bytes().to_vec()
//!     }
//! }
//!
//! let config = ClusterConfig::load("cluster.toml".as_ref())?;
//! let node = Node::start(&config, NodeId(0), Counter(0))?;
//! match node.propose(b"hello") {
//!     Ok(applied) => println!("committed at {}", applied.index),
//!     Err(e) => eprintln!("{e}"),  // e.g. NotLeader { leader: Some(n1) }
//! }
//! node.shutdown();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod client;
pub mod config;
pub mod fence_check;
pub mod identity;
pub mod metrics;
pub mod negotiate;
pub mod node;
pub mod service;
mod speculation;
pub mod storage;
pub mod supervisor;

pub use config::{
    ClusterConfig, ConfigError, FollowerClients, Fsync, PollPolicy, TlsPaths, TransportKind,
};
pub use node::{Applied, Entry, Node, NodeError, NodeStatus, ProposeError, StateMachine};
pub use speculation::SpeculationLost;
