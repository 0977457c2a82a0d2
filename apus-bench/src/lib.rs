//! Criterion micro-benchmarks (entry encode/decode, one engine step, a
//! simulated commit round) and the multi-process benchmark drivers behind
//! `cargo xtask bench`.
//!
//! Not built yet: issue 7 owns this crate.
