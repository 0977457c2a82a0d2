//! The remote-memory transport over raw RDMA verbs: RC queue pairs in a full
//! mesh, RDMA WRITE (inline when small, selective signaling), READ and atomic
//! compare-and-swap, with Mu-style fencing through queue-pair access flags.
//!
//! Not built yet: issue 6 owns this crate. It will use `sideway`, which loads
//! rdma-core at run time, so the crate builds on machines without it.
