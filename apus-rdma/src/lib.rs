//! The remote-memory transport over raw RDMA verbs: RC queue pairs,
//! RDMA WRITE (inline when small, selective signaling), READ and atomic
//! compare-and-swap, with Mu-style fencing through queue-pair access flags.
//!
//! * [`verbs`]: the verbs layer on `sideway` (libibverbs loaded at run
//!   time): device, port and GID selection, registration, queue pairs,
//!   completions, and a clear error on hosts without an RDMA device.
//!
//! The `apus_core::Transport` on top of it (issue 6) is not built yet.

pub mod verbs;

pub use verbs::{
    Access, CompletionError, Device, QpEndpoint, QueuePair, RdmaError, Region, Selection,
    WorkCompletion, device_names,
};
