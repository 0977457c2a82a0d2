//! Benchmarks of APUS.
//!
//! * `benches/micro.rs`: criterion micro-benchmarks of the engine's hot path
//!   (entry encode/decode, one engine step, a commit round over
//!   zero-latency memory, [`memnet`]).
//! * the `apus-bench` binary: the load generator and probes that
//!   `cargo xtask bench` runs against real multi-process clusters
//!   ([`load`], [`targets`], [`rtt`]).

pub mod appclient;
pub mod load;
pub mod memnet;
pub mod rtt;
pub mod targets;
