//! The remote-memory transport model.
//!
//! Every node exposes one [`Region`](crate::Region). A peer can write into it,
//! read from it, and (where the hardware has atomics) compare-and-swap a word
//! in it; each posted operation completes later, successfully or with an
//! [`OpError`]. A node grants the right to write its log ring to at most one
//! peer at a time (fencing). RDMA does all of this natively; the TCP and QUIC
//! transports emulate it with a receiver that applies framed operations to
//! the region in order; libfabric maps it onto `fi_write`/`fi_read`/`fi_atomic`.
//!
//! The engine never calls a transport: it emits [`RemoteOp`]s inside
//! [`Action`](crate::Action)s and is told about completions through
//! [`Replica::handle_event`](crate::Replica::handle_event). A runtime connects
//! the two in its engine loop: poll the transport and hand each event to the
//! replica, poll the replica, then post every [`Action`](crate::Action) it
//! queued. The simulator's engine loop (feature `sim`) does exactly this over
//! its `SimTransport`.
//!
//! # Contract every transport keeps
//!
//! 1. Operations between one pair of nodes take effect in the order posted.
//! 2. A write lands in ascending address order: once its last word is
//!    visible, all of it is.
//! 3. A write completes successfully only after all of it has landed.
//! 4. Writes obey the layout's access rules
//!    ([`RegionLayout::remote_write_access`](crate::RegionLayout::remote_write_access)):
//!    a peer writes only its own inbound slots, and the ring only while it
//!    holds the grant; anything else fails with [`OpError::AccessDenied`] and
//!    changes nothing. The grant is checked for every byte that lands: a
//!    write is either wholly permitted or completes with an error.
//! 5. [`Transport::set_log_writer`] takes effect before it returns: no write
//!    from a revoked peer lands afterwards.
//! 6. Every posted operation completes exactly once, with an error if the
//!    peer is unreachable.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::types::NodeId;

/// Identifies a posted operation; echoed in its completion.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct OpId(pub u64);

/// A one-sided operation on a peer's region.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RemoteOp {
    /// Copy `len` bytes from the local region at `local_offset` to the peer's
    /// region at `remote_offset`.
    Write {
        /// Echoed in the completion.
        op: OpId,
        /// Target node.
        peer: NodeId,
        /// Source in the local region; must stay unchanged until completion.
        local_offset: usize,
        /// Number of bytes.
        len: usize,
        /// Destination in the peer's region.
        remote_offset: usize,
    },
    /// Copy `len` bytes from the peer's region at `remote_offset` into the
    /// local region at `local_offset`.
    Read {
        /// Echoed in the completion.
        op: OpId,
        /// Target node.
        peer: NodeId,
        /// Source in the peer's region.
        remote_offset: usize,
        /// Number of bytes.
        len: usize,
        /// Destination in the local region.
        local_offset: usize,
    },
    /// Atomically replace the aligned word at `remote_offset` in the peer's
    /// region with `new` if it equals `expected`; the value found is stored
    /// at `local_offset` in the local region.
    CompareAndSwap {
        /// Echoed in the completion.
        op: OpId,
        /// Target node.
        peer: NodeId,
        /// Aligned word in the peer's region.
        remote_offset: usize,
        /// Value expected.
        expected: u64,
        /// Value to store.
        new: u64,
        /// Where the old value lands locally.
        local_offset: usize,
    },
}

impl RemoteOp {
    /// The operation's id.
    pub fn id(&self) -> OpId {
        match *self {
            RemoteOp::Write { op, .. }
            | RemoteOp::Read { op, .. }
            | RemoteOp::CompareAndSwap { op, .. } => op,
        }
    }

    /// The node it targets.
    pub fn peer(&self) -> NodeId {
        match *self {
            RemoteOp::Write { peer, .. }
            | RemoteOp::Read { peer, .. }
            | RemoteOp::CompareAndSwap { peer, .. } => peer,
        }
    }
}

/// Why a remote operation failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum OpError {
    /// The connection to the peer is down (or the peer is).
    #[error("peer unreachable")]
    PeerUnreachable,
    /// The peer refused the operation: no write grant, or an address outside
    /// what this node may touch.
    #[error("access denied by peer")]
    AccessDenied,
    /// The transport cannot perform this operation (no remote atomics).
    #[error("operation not supported by this transport")]
    Unsupported,
}

/// A posted operation finished.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Completion {
    /// The operation.
    pub op: OpId,
    /// The node it targeted.
    pub peer: NodeId,
    /// How it ended.
    pub result: Result<(), OpError>,
}

/// What a transport reports to the engine.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TransportEvent {
    /// A posted operation finished.
    Completed(Completion),
    /// A connection to the peer is (re-)established.
    PeerUp(NodeId),
    /// The connection to the peer broke; its pending operations fail.
    PeerDown(NodeId),
}

/// What a transport can do.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Capabilities {
    /// Remote compare-and-swap is available.
    pub compare_and_swap: bool,
}

/// A local failure of the transport itself (not of a remote operation).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// An operation names a peer this transport does not know.
    #[error("unknown peer {0}")]
    UnknownPeer(NodeId),
    /// An operation's local range lies outside the region.
    #[error("local range {offset}+{len} outside the region")]
    LocalRange {
        /// Offset.
        offset: usize,
        /// Length.
        len: usize,
    },
    /// An operating system or library error.
    #[error("transport I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Anything else the transport cannot recover from.
    #[error("transport: {0}")]
    Other(String),
}

/// Interrupts an engine blocked in [`Transport::wait`], from any thread
/// (a proposer that queued work, the storage thread that finished a sync).
pub trait Wake: Send + Sync + fmt::Debug {
    /// Makes the current or next `wait` return promptly.
    fn wake(&self);
}

/// A remote-memory transport for one node.
pub trait Transport {
    /// What this transport supports.
    fn capabilities(&self) -> Capabilities;
    /// Posts a one-sided operation. Remote failures are reported as
    /// completions, never here.
    fn post(&mut self, op: RemoteOp) -> Result<(), TransportError>;
    /// Grants the log write right to `writer` alone (or to nobody), revoking
    /// it from everyone else before returning.
    fn set_log_writer(&mut self, writer: Option<NodeId>) -> Result<(), TransportError>;
    /// Appends what happened since the last call to `events`.
    fn poll(&mut self, events: &mut Vec<TransportEvent>) -> Result<(), TransportError>;
    /// Blocks until something may have arrived, a [`Wake`] handle fires, or
    /// `timeout` passes; it may return early. The runtime's `park` and
    /// `hybrid` poll policies call it instead of spinning.
    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError>;
    /// A handle that interrupts [`wait`](Self::wait).
    fn waker(&self) -> Arc<dyn Wake>;
}
