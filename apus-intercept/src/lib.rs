//! The `LD_PRELOAD` library that replicates an unmodified server: it hooks
//! `accept`, `read`, `recv`, `close` and friends, turns inbound socket events
//! into log entries on the leader, and replays them into the local server copy
//! on followers.
//!
//! Not built yet: issue 4 owns this crate.
