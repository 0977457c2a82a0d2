//! Who a replica is across restarts: its cluster and its incarnation.
//!
//! A replica's incarnation is a random number drawn when its data directory
//! is created. Every handshake introduces both ends ([`Introduction`]): the
//! sender's incarnation, the incarnation it remembers of the receiver
//! (`yours`, 0 when it never met it), and the incarnations of itself it
//! has learned were superseded. A replica told that it was once another
//! incarnation than its own is a *replacement*: its data directory was
//! wiped or replaced, so it no longer holds what it acknowledged. It
//! remembers this before the connection carries anything and rejoins as a
//! non-voter until a leader has brought it up to date; without that, it and
//! one lagging replica could elect a leader that lacks committed entries.
//!
//! The rules live in the engine crate's [`PeerBook`], which does no I/O (the
//! simulator drives it too); an [`Identity`] keeps a book where it survives
//! restarts (the `apus` crate: in the data directory) and is what the
//! connection set-up consults.
//!
//! A peer's memory of a replacement moves to the new incarnation only once
//! the replacement lists the old one as superseded: until then it keeps
//! telling it, so a handshake cut halfway never leaves a replacement that
//! nobody will tell. Detection needs one peer that met the previous
//! incarnation; a majority of data directories lost at once is data loss no
//! handshake can detect.

use std::fmt;
use std::io;

use apus_core::NodeId;
pub use apus_core::identity::{MAX_SUPERSEDED, Meeting, PeerBook};

/// What one end of a handshake says about itself and about the other end.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Introduction {
    /// The sender's incarnation (never 0).
    #[prost(uint64, tag = "1")]
    pub incarnation: u64,
    /// The receiver's incarnation as the sender remembers it (0: never met).
    #[prost(uint64, tag = "2")]
    pub yours: u64,
    /// Incarnations the sender was told it had before its own.
    #[prost(uint64, repeated, tag = "3")]
    pub superseded: Vec<u64>,
}

/// What `book` says to `peer`.
pub fn introduction(book: &PeerBook, peer: NodeId) -> Introduction {
    Introduction {
        incarnation: book.incarnation,
        yours: book.remembered(peer),
        superseded: book.superseded.clone(),
    }
}

/// `book` heard `theirs` from `peer` (in an authenticated handshake).
pub fn meet(book: &mut PeerBook, peer: NodeId, theirs: &Introduction) -> Meeting {
    book.met(peer, theirs.incarnation, theirs.yours, &theirs.superseded)
}

/// A replica's identity as the connection set-up consults it.
pub trait Identity: Send + Sync + fmt::Debug {
    /// The cluster this replica belongs to (`cluster.name`): replicas of
    /// different clusters refuse each other with a reason.
    fn cluster(&self) -> &str;
    /// What this replica says to `peer`.
    fn introduce(&self, peer: NodeId) -> Introduction;
    /// `peer` introduced itself; what this changes is saved before this
    /// returns (the connection is refused when it cannot be).
    fn met(&self, peer: NodeId, theirs: &Introduction) -> io::Result<()>;
}

/// A tool speaking for a replica (a fence check, a bare transport): it
/// names the cluster, has no incarnation (peers learn nothing from it) and
/// learns nothing.
#[derive(Debug)]
pub struct Anonymous(pub String);

impl Identity for Anonymous {
    fn cluster(&self) -> &str {
        &self.0
    }

    fn introduce(&self, _peer: NodeId) -> Introduction {
        Introduction::default()
    }

    fn met(&self, _peer: NodeId, _theirs: &Introduction) -> io::Result<()> {
        Ok(())
    }
}
