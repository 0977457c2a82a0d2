//! The APUS consensus engine.
//!
//! `apus-core` is a deterministic implementation of the APUS replication
//! protocol with no I/O of its own: no threads, sockets, clocks or async
//! runtime. A [`Replica`] is a value that steps on inputs (proposals, polls
//! of its memory region, transport completions, the current time) and hands
//! back [`Action`]s for its runtime to carry out. The `apus` crate drives it
//! over real transports; the simulator in `sim` (feature `sim`) drives it
//! over simulated remote memory, one seed deciding every latency and fault.
//!
//! The transport model is remote memory, not messages: every node exposes
//! one [`Region`] laid out by [`RegionLayout`]; peers write log entries and
//! control records into it with one-sided operations, and each node polls its
//! own memory. See [`transport`] for the contract a transport keeps and
//! [`replica`] for the protocol.
//!
//! ```
//! use apus_core::{EntryKind, MemStore, NodeId, Region, Replica, ReplicaConfig, Role, Time};
//!
//! // A single-replica cluster elects itself and commits on its own.
//! let cfg = ReplicaConfig::new(NodeId(0), 1);
//! let region = Region::new(cfg.validate().unwrap().region_len());
//! let mut r = Replica::new(cfg, region, MemStore::new(), Time(0)).unwrap();
//! assert_eq!(r.role(), Role::Leader);
//! let p = r.propose(EntryKind::Data, 0, b"hello").unwrap();
//! r.poll(Time(1)).unwrap();
//! assert!(r.commit_index() >= p.index);
//! let mut seen = Vec::new();
//! while let Some(e) = r.next_committed().unwrap() {
//!     seen.push(e.payload.to_vec());
//! }
//! assert_eq!(seen.last().unwrap(), b"hello");
//! ```

pub mod config;
pub mod entry;
pub mod identity;
pub mod layout;
pub mod record;
pub mod region;
pub mod replica;
pub mod rng;
pub mod store;
pub mod transport;
pub mod types;

#[cfg(any(test, feature = "sim"))]
pub mod sim;

pub use config::{ConfigError, Durability, ReplicaConfig};
pub use entry::{EntryError, EntryKind};
pub use layout::RegionLayout;
pub use region::Region;
pub use replica::{
    Action, CommittedEntry, Counters, Event, Proposal, ProposeError, Replica, ReplicaError,
};
pub use store::{EntryMeta, HardState, LogStore, MemStore, StoreError};
pub use transport::{
    Capabilities, Completion, OpError, OpId, RemoteOp, Transport, TransportError, TransportEvent,
    Wake,
};
pub use types::{Index, NodeId, Pos, Role, Term, Time};
