//! The remote-memory transport over TCP.
//!
//! [`TcpTransport`] implements [`apus_core::Transport`] by framing one-sided
//! writes, reads and compare-and-swaps over one TCP connection per pair of
//! replicas (`TCP_NODELAY`). The receiving engine applies each framed write
//! to its own region, in order, and enforces the log write grant, so the
//! engine cannot tell this transport from RDMA except by its latency. Peers
//! authenticate at connection time with the cluster secret
//! ([`handshake`]: HMAC-SHA256 challenge-response, the secret never crosses
//! the wire); a process without it is refused and logged.
//!
//! With the `quic` feature, [`quic::QuicTransport`] carries the same frames
//! over QUIC streams (quinn), with mutual TLS between replicas instead of the
//! shared secret.
//!
//! Poll modes: call [`Transport::poll`](apus_core::Transport::poll) in a loop
//! (busy-poll: non-blocking sockets, the lowest latency, one core per node),
//! or block in [`Transport::wait`](apus_core::Transport::wait) (`ppoll` on
//! the sockets and an eventfd) between polls.

pub mod connect;
pub mod handshake;
pub mod identity;
mod link;
#[cfg(feature = "quic")]
pub mod quic;
pub mod setup;
pub mod sys;
mod tcp;
pub mod wire;

use std::sync::atomic::AtomicUsize;
use std::time::Duration;

pub use tcp::{TcpConfig, TcpTransport};

/// The default per-operation deadline (`cluster.op_timeout_ms`): an
/// operation without its answer this long after it was posted ends the
/// connection.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_millis(250);

/// Counters of a transport (monotonic).
#[derive(Debug, Default)]
pub struct TransportStats {
    /// Connections that failed set-up (wrong secret or certificate, garbage,
    /// wrong layout).
    pub refused: AtomicUsize,
    /// Established connections closed for a protocol violation.
    pub violations: AtomicUsize,
    /// Connections established.
    pub established: AtomicUsize,
    /// Connections closed because an operation did not complete in time.
    pub timeouts: AtomicUsize,
}
