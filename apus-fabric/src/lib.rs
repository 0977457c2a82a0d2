//! The remote-memory transport over libfabric: `fi_write`, `fi_read` and
//! `fi_compare_atomic` on one registered region per node, over
//! reliable-datagram providers (`shm` and `tcp;ofi_rxm` here,
//! `verbs;ofi_rxm` on RDMA hosts) and connection-oriented ones (`tcp` here,
//! `verbs` on RDMA hosts).
//!
//! * [`endpoint`]: the libfabric layer (loaded at run time with `dlopen`,
//!   declared by hand in a private `sys` module): endpoints, registration,
//!   one-sided operations, completions, clear errors for what is missing.
//! * [`FabricTransport`]: [`apus_core::Transport`] on top of it, with
//!   connection set-up, key exchange and liveness over the TCP transport's
//!   authenticated handshake.

pub mod endpoint;
mod sys;
pub mod transport;

pub use endpoint::{
    Access, Completion, Endpoint, FabricError, LinkState, MemoryRegion, Ordering, PeerAddr, Remote,
    rma_providers,
};
pub use transport::{FabricConfig, FabricTransport};
