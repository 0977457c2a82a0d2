//! Outbound control records: at most one write in flight per (peer, kind).
//!
//! A record is rendered from the replica's state when it is sent, into the
//! staging slot for that peer and kind, and written from there. While a write
//! is in flight its staging bytes must not change (RDMA reads them at some
//! point before completing), so a newer version waits: the slot is marked
//! dirty and is rendered and sent again when the write completes. Bursts of
//! updates (heartbeats, acks, commit advances) thus coalesce into at most one
//! outstanding write each, with the latest state always delivered last.

use crate::layout::SlotKind;
use crate::transport::OpId;
use crate::types::MAX_REPLICAS;

#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct OutSlot {
    pub inflight: Option<OpId>,
    pub dirty: bool,
    /// Writes sent from this slot: the record version, and (modulo the
    /// kind's copies) which inbound copy the next write goes to.
    pub writes: u64,
}

#[derive(Debug)]
pub(crate) struct Outbox {
    slots: [[OutSlot; 4]; MAX_REPLICAS],
}

impl Outbox {
    pub fn new() -> Outbox {
        Outbox {
            slots: [[OutSlot::default(); 4]; MAX_REPLICAS],
        }
    }

    pub fn slot(&mut self, peer: usize, kind: SlotKind) -> &mut OutSlot {
        &mut self.slots[peer][kind as usize]
    }

    /// Forgets every write in flight (their completions will be ignored) and
    /// pending resend of `kind`.
    pub fn reset_kind(&mut self, kind: SlotKind) {
        for peer in &mut self.slots {
            peer[kind as usize] = OutSlot::default();
        }
    }

    /// Whether any record is waiting to be (re)sent to `peer`.
    pub fn has_dirty(&self, peer: usize) -> bool {
        self.slots[peer]
            .iter()
            .any(|s| s.dirty && s.inflight.is_none())
    }
}
