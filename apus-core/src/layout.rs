//! The region layout: where everything lives in a node's registered memory.
//!
//! The layout is a pure function of the cluster size, the ring capacity and
//! the catch-up chunk size, which every replica must agree on (the region
//! header records them and the connection handshake compares them). It is
//! versioned by [`LAYOUT_VERSION`].
//!
//! ```text
//! offset 0        region header (128 B)
//!                 inbound control slots, 128 B each, per writer:
//!                   leader record    written by the leader of a term, in two
//!                                    copies used alternately, so that one is
//!                                    always whole while the other is rewritten
//!                   ack record       written by a follower into its leader
//!                   vote request     written by a candidate
//!                   vote response    written by a voter into its candidate
//!                 own status record  read remotely by a new leader (128 B)
//!                 outbound staging   one 128 B slot per (kind, peer): the
//!                                    stable source of an in-flight record write
//!                 probe landing      one 128 B slot per peer: where a remote
//!                                    read of that peer's status lands
//!                 catch-up scratch   CATCHUP_SLOTS chunks per peer: old
//!                                    entries re-encoded under the leader's term
//!                 log ring           `ring_capacity` bytes of entries
//! ```
//!
//! Access rules, enforced by every transport: a peer may write only its own
//! inbound slots (it cannot forge another replica's vote) and the log ring,
//! and the ring only while it holds the write grant; a peer may read only the
//! header and the status record. Everything else is local.

use crate::types::{MAX_REPLICAS, NodeId, Pos};

/// Version of the region layout, the entry format and the record format.
pub const LAYOUT_VERSION: u8 = 1;

/// Size of one control record slot.
pub const SLOT_LEN: usize = 128;

/// Catch-up chunks per peer: how many catch-up writes to one follower may be
/// in flight at once (each from its own scratch chunk).
pub const CATCHUP_SLOTS: usize = 4;

const HEADER_LEN: usize = 128;
const ALIGN: usize = 64;

/// The four kinds of inbound control slot.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SlotKind {
    /// Heartbeat, commit index and sync command from a leader.
    Leader = 0,
    /// A follower's progress report to its leader.
    Ack = 1,
    /// A candidate's request for a vote.
    VoteRequest = 2,
    /// A voter's answer to a candidate.
    VoteResponse = 3,
}

/// Inbound slots per writer: the leader record has two copies.
const SLOTS_PER_WRITER: usize = 5;

impl SlotKind {
    /// How many copies of this slot each writer has.
    pub fn copies(self) -> usize {
        match self {
            SlotKind::Leader => 2,
            _ => 1,
        }
    }

    /// Index of copy 0 of this kind among a writer's inbound slots.
    fn first_slot(self) -> usize {
        match self {
            SlotKind::Leader => 0,
            SlotKind::Ack => 2,
            SlotKind::VoteRequest => 3,
            SlotKind::VoteResponse => 4,
        }
    }

    /// All slot kinds, in layout order.
    pub const ALL: [SlotKind; 4] = [
        SlotKind::Leader,
        SlotKind::Ack,
        SlotKind::VoteRequest,
        SlotKind::VoteResponse,
    ];
}

/// What a remote write to a given range of a region is allowed to touch.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RemoteAccess {
    /// The writer's own inbound slot of this kind.
    Slot(SlotKind),
    /// The log ring: permitted only to the holder of the write grant.
    Ring,
    /// Anything else: refused.
    Denied,
}

/// Offsets of every area in a region. See the module docs for the picture.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RegionLayout {
    replicas: usize,
    ring_capacity: usize,
    catchup_chunk: usize,
    inbound: usize,
    status: usize,
    staging: usize,
    probe: usize,
    scratch: usize,
    ring: usize,
    total: usize,
}

/// Layout parameters that cannot describe a region.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// The cluster size is outside `1..=MAX_REPLICAS`.
    #[error("replicas must be between 1 and {MAX_REPLICAS}, got {0}")]
    Replicas(usize),
    /// The ring capacity is not a positive multiple of 64 bytes.
    #[error("ring_capacity must be a positive multiple of 64 bytes, got {0}")]
    RingCapacity(usize),
    /// The catch-up chunk is not a positive multiple of 64 bytes.
    #[error("catchup_chunk must be a positive multiple of 64 bytes, got {0}")]
    CatchupChunk(usize),
}

const fn align_up(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

impl RegionLayout {
    /// The layout for a cluster of `replicas` with the given ring and
    /// catch-up chunk sizes.
    pub fn new(
        replicas: usize,
        ring_capacity: usize,
        catchup_chunk: usize,
    ) -> Result<RegionLayout, LayoutError> {
        if replicas == 0 || replicas > MAX_REPLICAS {
            return Err(LayoutError::Replicas(replicas));
        }
        if ring_capacity == 0 || ring_capacity % ALIGN != 0 {
            return Err(LayoutError::RingCapacity(ring_capacity));
        }
        if catchup_chunk == 0 || catchup_chunk % ALIGN != 0 {
            return Err(LayoutError::CatchupChunk(catchup_chunk));
        }
        let inbound = HEADER_LEN;
        let status = inbound + SLOTS_PER_WRITER * replicas * SLOT_LEN;
        let staging = status + SLOT_LEN;
        let probe = staging + SlotKind::ALL.len() * replicas * SLOT_LEN;
        let scratch = probe + replicas * SLOT_LEN;
        let ring = align_up(scratch + replicas * CATCHUP_SLOTS * catchup_chunk);
        let total = ring + ring_capacity;
        Ok(RegionLayout {
            replicas,
            ring_capacity,
            catchup_chunk,
            inbound,
            status,
            staging,
            probe,
            scratch,
            ring,
            total,
        })
    }

    /// Number of replicas the layout has slots for.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Total region size in bytes.
    pub fn region_len(&self) -> usize {
        self.total
    }

    /// Offset of the region header.
    pub fn header(&self) -> usize {
        0
    }

    /// Offset of the inbound slot of `kind` written by `writer` (copy 0).
    pub fn inbound(&self, kind: SlotKind, writer: NodeId) -> usize {
        self.inbound_copy(kind, writer, 0)
    }

    /// Offset of copy `copy` of the inbound slot of `kind` written by `writer`.
    pub fn inbound_copy(&self, kind: SlotKind, writer: NodeId, copy: usize) -> usize {
        debug_assert!(writer.index() < self.replicas && copy < kind.copies());
        self.inbound + (writer.index() * SLOTS_PER_WRITER + kind.first_slot() + copy) * SLOT_LEN
    }

    /// Offset of this node's own status record.
    pub fn status(&self) -> usize {
        self.status
    }

    /// Offset of the staging slot holding the record of `kind` bound for `peer`.
    pub fn staging(&self, kind: SlotKind, peer: NodeId) -> usize {
        debug_assert!(peer.index() < self.replicas);
        self.staging + (kind as usize * self.replicas + peer.index()) * SLOT_LEN
    }

    /// Offset where a remote read of `peer`'s status record lands.
    pub fn probe_landing(&self, peer: NodeId) -> usize {
        self.probe + peer.index() * SLOT_LEN
    }

    /// Offset of catch-up scratch chunk `slot` used for `peer`.
    pub fn scratch(&self, peer: NodeId, slot: usize) -> usize {
        debug_assert!(slot < CATCHUP_SLOTS);
        self.scratch + (peer.index() * CATCHUP_SLOTS + slot) * self.catchup_chunk
    }

    /// Size of one catch-up chunk.
    pub fn catchup_chunk(&self) -> usize {
        self.catchup_chunk
    }

    /// Offset of the first byte of the log ring.
    pub fn ring_offset(&self) -> usize {
        self.ring
    }

    /// Capacity of the log ring in bytes.
    pub fn ring_capacity(&self) -> usize {
        self.ring_capacity
    }

    /// Region offset of ring position `pos`.
    pub fn ring_at(&self, pos: Pos) -> usize {
        self.ring + (pos % self.ring_capacity as u64) as usize
    }

    /// Bytes left in the current lap of the ring at `pos`.
    pub fn lap_remaining(&self, pos: Pos) -> usize {
        self.ring_capacity - (pos % self.ring_capacity as u64) as usize
    }

    /// The first position of the lap after the one holding `pos`.
    pub fn next_lap(&self, pos: Pos) -> Pos {
        pos + self.lap_remaining(pos) as u64
    }

    /// What a remote write by `writer` to `offset..offset + len` may touch.
    /// A write that spans areas, or targets another writer's slot, is denied.
    pub fn remote_write_access(&self, writer: NodeId, offset: usize, len: usize) -> RemoteAccess {
        let Some(end) = offset.checked_add(len) else {
            return RemoteAccess::Denied;
        };
        if len == 0 || writer.index() >= self.replicas {
            return RemoteAccess::Denied;
        }
        if offset >= self.ring && end <= self.total {
            return RemoteAccess::Ring;
        }
        for kind in SlotKind::ALL {
            for copy in 0..kind.copies() {
                let slot = self.inbound_copy(kind, writer, copy);
                if offset >= slot && end <= slot + SLOT_LEN {
                    return RemoteAccess::Slot(kind);
                }
            }
        }
        RemoteAccess::Denied
    }

    /// Every inbound slot `writer` may write, as one contiguous range:
    /// what a transport with hardware access control (RDMA, libfabric)
    /// registers for that writer alone.
    pub fn inbound_slots(&self, writer: NodeId) -> std::ops::Range<usize> {
        debug_assert!(writer.index() < self.replicas);
        let start = self.inbound + writer.index() * SLOTS_PER_WRITER * SLOT_LEN;
        start..start + SLOTS_PER_WRITER * SLOT_LEN
    }

    /// The ranges peers may read: the header and the status record.
    pub fn remote_readable(&self) -> [std::ops::Range<usize>; 2] {
        [0..HEADER_LEN, self.status..self.status + SLOT_LEN]
    }

    /// The log ring's range.
    pub fn ring_range(&self) -> std::ops::Range<usize> {
        self.ring..self.total
    }

    /// Whether a peer may read `offset..offset + len` (the header and the
    /// status record only).
    pub fn remote_read_allowed(&self, offset: usize, len: usize) -> bool {
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        (end <= HEADER_LEN) || (offset >= self.status && end <= self.status + SLOT_LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrable_ranges_match_the_access_rules() {
        let l = RegionLayout::new(5, 4096, 1024).unwrap();
        for w in 0..5u8 {
            let r = l.inbound_slots(NodeId(w));
            assert!(matches!(
                l.remote_write_access(NodeId(w), r.start, SLOT_LEN),
                RemoteAccess::Slot(SlotKind::Leader)
            ));
            assert!(matches!(
                l.remote_write_access(NodeId(w), r.end - SLOT_LEN, SLOT_LEN),
                RemoteAccess::Slot(SlotKind::VoteResponse)
            ));
            // Just outside: another writer's slot or the status record.
            assert_eq!(
                l.remote_write_access(NodeId(w), r.end, SLOT_LEN),
                RemoteAccess::Denied
            );
            for kind in SlotKind::ALL {
                for copy in 0..kind.copies() {
                    assert!(r.contains(&l.inbound_copy(kind, NodeId(w), copy)));
                }
            }
        }
        for r in l.remote_readable() {
            assert!(l.remote_read_allowed(r.start, r.len()));
            assert!(!l.remote_read_allowed(r.start, r.len() + 1));
        }
        let ring = l.ring_range();
        assert_eq!(
            l.remote_write_access(NodeId(1), ring.start, ring.len()),
            RemoteAccess::Ring
        );
        assert_eq!(ring.len(), l.ring_capacity());
    }

    #[test]
    fn areas_do_not_overlap_and_are_aligned() {
        let l = RegionLayout::new(5, 4096, 1024).unwrap();
        let mut areas = vec![(l.header(), HEADER_LEN)];
        for kind in SlotKind::ALL {
            for p in 0..5 {
                for copy in 0..kind.copies() {
                    areas.push((l.inbound_copy(kind, NodeId(p), copy), SLOT_LEN));
                }
                areas.push((l.staging(kind, NodeId(p)), SLOT_LEN));
            }
        }
        areas.push((l.status(), SLOT_LEN));
        for p in 0..5 {
            areas.push((l.probe_landing(NodeId(p)), SLOT_LEN));
            for slot in 0..CATCHUP_SLOTS {
                areas.push((l.scratch(NodeId(p), slot), 1024));
            }
        }
        areas.push((l.ring_offset(), 4096));
        areas.sort();
        for w in areas.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "{w:?} overlap");
        }
        for (off, _) in &areas {
            assert_eq!(off % 64, 0);
        }
        assert_eq!(areas.last().map(|a| a.0 + a.1), Some(l.region_len()));
    }

    #[test]
    fn remote_access_rules() {
        let l = RegionLayout::new(3, 4096, 1024).unwrap();
        let own = l.inbound(SlotKind::VoteRequest, NodeId(1));
        assert_eq!(
            l.remote_write_access(NodeId(1), own, SLOT_LEN),
            RemoteAccess::Slot(SlotKind::VoteRequest)
        );
        assert_eq!(
            l.remote_write_access(NodeId(2), own, SLOT_LEN),
            RemoteAccess::Denied,
            "a peer cannot write another peer's slot"
        );
        assert_eq!(
            l.remote_write_access(NodeId(1), own, SLOT_LEN + 1),
            RemoteAccess::Denied
        );
        assert_eq!(
            l.remote_write_access(
                NodeId(2),
                l.inbound_copy(SlotKind::Leader, NodeId(2), 1),
                SLOT_LEN
            ),
            RemoteAccess::Slot(SlotKind::Leader)
        );
        assert_eq!(
            l.remote_write_access(NodeId(0), l.ring_offset(), 100),
            RemoteAccess::Ring
        );
        assert_eq!(
            l.remote_write_access(NodeId(0), l.ring_offset() + 4000, 200),
            RemoteAccess::Denied
        );
        assert_eq!(
            l.remote_write_access(NodeId(0), l.status(), 8),
            RemoteAccess::Denied
        );
        assert_eq!(
            l.remote_write_access(NodeId(7), l.ring_offset(), 8),
            RemoteAccess::Denied
        );
        assert_eq!(
            l.remote_write_access(NodeId(0), usize::MAX, 2),
            RemoteAccess::Denied
        );
        assert!(l.remote_read_allowed(l.status(), SLOT_LEN));
        assert!(!l.remote_read_allowed(l.ring_offset(), 8));
    }

    #[test]
    fn ring_positions_wrap() {
        let l = RegionLayout::new(3, 1024, 64).unwrap();
        assert_eq!(l.ring_at(0), l.ring_offset());
        assert_eq!(l.ring_at(1024 + 8), l.ring_offset() + 8);
        assert_eq!(l.lap_remaining(1000), 24);
        assert_eq!(l.next_lap(1000), 1024);
        assert_eq!(l.next_lap(1024), 2048);
    }

    #[test]
    fn rejects_bad_parameters() {
        assert_eq!(RegionLayout::new(0, 64, 64), Err(LayoutError::Replicas(0)));
        assert_eq!(
            RegionLayout::new(17, 64, 64),
            Err(LayoutError::Replicas(17))
        );
        assert_eq!(
            RegionLayout::new(3, 100, 64),
            Err(LayoutError::RingCapacity(100))
        );
        assert_eq!(
            RegionLayout::new(3, 64, 0),
            Err(LayoutError::CatchupChunk(0))
        );
    }
}
