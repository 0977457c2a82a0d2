//! Incarnations: the rules by which replicas tell a replacement it is one.
//!
//! A replica's incarnation is a random number drawn when its storage is
//! created. When two replicas meet (the runtime's handshake; the
//! simulator's reconnections) each says its incarnation, the incarnation it
//! remembers of the other (`yours`, 0 when it never met it) and the
//! incarnations of itself it has learned were superseded. A replica told
//! that it was once another incarnation than its own is a *replacement*:
//! its storage was wiped or replaced, so it no longer holds what it
//! acknowledged, and it must rejoin as a non-voter
//! ([`Replica::rejoin`](crate::Replica::rejoin)) before it reads anything
//! from that peer. A peer's memory moves to the new incarnation only once
//! the replacement lists the old one as superseded, so a meeting cut
//! halfway never leaves a replacement that nobody will tell.
//!
//! [`PeerBook`] holds the rules and does no I/O; the runtime saves it.

use crate::types::{MAX_REPLICAS, NodeId};

/// Superseded incarnations a replica lists (the oldest is forgotten first:
/// a peer still remembering it tells the replica again, which costs one
/// resynchronisation, not safety).
pub const MAX_SUPERSEDED: usize = 8;

/// What meeting a peer changed in a [`PeerBook`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Meeting {
    /// The book now remembers the peer's incarnation (a first meeting, or a
    /// replacement that knows it is one).
    pub remembered: bool,
    /// The peer remembers an earlier incarnation of this replica: this one
    /// is a replacement and must rejoin as a non-voter.
    pub replaced: bool,
}

impl Meeting {
    /// Whether the book must be saved before the connection is used.
    pub fn changed(&self) -> bool {
        self.remembered || self.replaced
    }
}

/// A replica's incarnation and what it knows of its peers': the rules, with
/// no I/O.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PeerBook {
    /// This replica's incarnation.
    pub incarnation: u64,
    /// This replica learned it is a replacement and has not yet been brought
    /// up to date.
    pub rejoining: bool,
    /// Each peer's incarnation as last met (0: never), by id.
    pub peers: [u64; MAX_REPLICAS],
    /// Earlier incarnations of this replica, oldest first.
    pub superseded: Vec<u64>,
}

impl PeerBook {
    /// A fresh book for a replica of incarnation `incarnation`.
    pub fn new(incarnation: u64) -> PeerBook {
        assert_ne!(incarnation, 0, "incarnation 0 means none");
        PeerBook {
            incarnation,
            rejoining: false,
            peers: [0; MAX_REPLICAS],
            superseded: Vec::new(),
        }
    }

    /// The incarnation of `peer` this replica remembers (0: never met).
    pub fn remembered(&self, peer: NodeId) -> u64 {
        self.peers[peer.index()]
    }

    /// `peer` introduced itself: it is `incarnation`, remembers this
    /// replica as `yours` (0: never met) and was told it once was each of
    /// `superseded`.
    pub fn met(
        &mut self,
        peer: NodeId,
        incarnation: u64,
        yours: u64,
        superseded: &[u64],
    ) -> Meeting {
        let mut m = Meeting::default();
        if incarnation == 0 {
            // A peer that keeps no identity (a tool, a test): nothing to learn.
            return m;
        }
        if yours != 0 && yours != self.incarnation && !self.superseded.contains(&yours) {
            if self.superseded.len() == MAX_SUPERSEDED {
                self.superseded.remove(0);
            }
            self.superseded.push(yours);
            self.rejoining = true;
            m.replaced = true;
        }
        let known = &mut self.peers[peer.index()];
        if *known != incarnation && (*known == 0 || superseded.contains(known)) {
            *known = incarnation;
            m.remembered = true;
        }
        debug_assert!(!m.replaced || self.superseded.last() == Some(&yours));
        debug_assert!(self.superseded.len() <= MAX_SUPERSEDED);
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NodeId = NodeId(0);
    const B: NodeId = NodeId(1);

    /// `y` hears `x` (x speaks to B, y is B and hears A).
    fn hear(y: &mut PeerBook, x: &PeerBook) -> Meeting {
        y.met(A, x.incarnation, x.remembered(B), &x.superseded)
    }

    /// A handshake: both openings, then y's answer, which says what it
    /// learned from x's opening.
    fn meet(x: &mut PeerBook, y: &mut PeerBook) -> (Meeting, Meeting) {
        let y0 = y.clone();
        let my = hear(y, x);
        let mx = x.met(B, y0.incarnation, y0.remembered(A), &y0.superseded);
        let again = x.met(B, y.incarnation, y.remembered(A), &y.superseded);
        (
            Meeting {
                remembered: mx.remembered || again.remembered,
                ..mx
            },
            my,
        )
    }

    #[test]
    fn first_meetings_remember_and_replace_nobody() {
        let (mut a, mut b) = (PeerBook::new(11), PeerBook::new(22));
        let (ma, mb) = meet(&mut a, &mut b);
        assert!(ma.remembered && mb.remembered);
        assert!(!ma.replaced && !mb.replaced);
        assert_eq!((a.peers[1], b.peers[0]), (22, 11));
        assert_eq!(meet(&mut a, &mut b), Default::default(), "nothing new");
    }

    #[test]
    fn a_wiped_replica_learns_it_is_a_replacement_and_is_then_remembered() {
        let (mut a, mut b) = (PeerBook::new(11), PeerBook::new(22));
        meet(&mut a, &mut b);
        // b's storage is wiped: a new incarnation, an empty book.
        let mut b2 = PeerBook::new(33);
        let (ma, mb) = meet(&mut a, &mut b2);
        assert!(mb.replaced && b2.rejoining);
        assert_eq!(b2.superseded, vec![22]);
        assert!(ma.remembered, "a moves on once b2 knows");
        assert_eq!(a.peers[1], 33);
        // Rejoined: meeting again changes nothing and replaces nobody.
        b2.rejoining = false;
        assert_eq!(meet(&mut a, &mut b2), Default::default());
        assert!(!b2.rejoining);
    }

    #[test]
    fn a_peer_keeps_telling_until_the_replacement_knows() {
        let (mut a, mut b) = (PeerBook::new(11), PeerBook::new(22));
        meet(&mut a, &mut b);
        let b2 = PeerBook::new(33);
        // Only b2's opening reaches a (the meeting was cut): a still
        // remembers 22 and tells the next time.
        let heard = a.met(B, b2.incarnation, b2.remembered(A), &b2.superseded);
        assert_eq!(heard, Default::default());
        assert_eq!(a.remembered(B), 22);
    }

    #[test]
    fn a_peer_without_identity_changes_nothing() {
        let mut a = PeerBook::new(11);
        assert_eq!(a.met(B, 0, 5, &[]), Default::default());
        assert_eq!(a, PeerBook::new(11));
    }

    #[test]
    fn the_superseded_list_is_bounded() {
        let mut b = PeerBook::new(99);
        for old in 1..=(MAX_SUPERSEDED as u64 + 3) {
            assert!(b.met(A, 5, old, &[]).replaced);
        }
        assert_eq!(b.superseded.len(), MAX_SUPERSEDED);
        assert_eq!(b.superseded[0], 4);
    }
}
