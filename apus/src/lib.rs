//! The APUS facade: the `Node` runtime (engine thread, proposal queue,
//! storage, configuration), the `apus` command line and the admin API, with
//! one cargo feature per transport (`tcp`, `quic`, `fabric`, `verbs`).
//!
//! Not built yet: issue 3 owns this crate. Today the consensus engine lives in
//! `apus-core`; see its documentation for the sans-IO `Replica`.
