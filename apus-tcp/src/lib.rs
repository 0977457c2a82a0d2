//! The remote-memory transport over TCP, and over QUIC (quinn) behind the
//! `quic` feature.
//!
//! Not built yet: issue 3 owns this crate. It will implement
//! `apus_core::transport::Transport` by framing one-sided writes, reads and
//! compare-and-swap over a stream; a receiver applies each framed write to the
//! local region in order and enforces the log write grant. Peers authenticate
//! with the cluster secret (challenge-response) before anything is applied.
