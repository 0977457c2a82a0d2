//! The remote-memory transport over libfabric: `fi_write`, `fi_read` and
//! `fi_atomic` compare-and-swap on one registered region per node, for the
//! `tcp`, `tcp;ofi_rxm`, `shm` and `verbs;ofi_rxm` providers.
//!
//! Not built yet: issue 5 owns this crate, including its own thin FFI to the
//! system libfabric (the published bindings do not build here, see
//! DESIGN.md).
