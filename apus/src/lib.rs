//! The APUS facade: the `Node` runtime, storage, configuration, and the
//! `apus` command line, with one cargo feature per transport (`tcp`, the
//! default; `quic`, `fabric`, `verbs` as they land).

pub mod config;
pub mod storage;
