//! The remote-memory transport over raw RDMA verbs: RC queue pairs,
//! RDMA WRITE (inline when small, selective signaling), READ and atomic
//! compare-and-swap, with Mu-style fencing through queue-pair access flags.
//!
//! * [`verbs`]: the verbs layer on `sideway` (libibverbs loaded at run
//!   time): device, port and GID selection, protection domains,
//!   registration, queue pairs, completions, and a clear error on hosts
//!   without an RDMA device.
//! * [`RdmaTransport`]: [`apus_core::Transport`] on top of it: per peer a
//!   ring plane (fenced by access flags) and a control plane, set up over
//!   the TCP transport's authenticated handshake.

pub mod transport;
pub mod verbs;

pub use transport::{RdmaConfig, RdmaStats, RdmaTransport, StartError};
pub use verbs::{
    Access, CompletionError, Device, Domain, QpEndpoint, QueuePair, RdmaError, Region, Selection,
    WorkCompletion, device_names,
};
