//! Reading peers' control slots, decoding only what changed.
//!
//! Every poll looks at the slots each peer may write (leader records, acks,
//! vote requests and responses). Almost all of them are unchanged since the
//! last look, so the reader keeps each slot's raw words as last seen with the
//! outcome of checking them, and compares word by word before it copies,
//! checksums and decodes anything. The comparison is exact (no checksum or
//! version word standing in for the content, which could repeat), so a read
//! gives the same record as a full decode of the same bytes: the cache
//! changes the cost of a poll, never its outcome.
//!
//! A slot rewritten during the comparison is seen either as it was (a read
//! that happened just before the write, as any read may be) or as changed,
//! in which case it is read again whole and checked as before.

use std::cell::RefCell;

use crate::layout::{RegionLayout, SLOT_LEN, SlotKind};
use crate::record::{self, FIELDS, Record, RecordError, SLOT_WORDS};
use crate::region::Region;
use crate::types::NodeId;

/// What the last look at one slot found.
#[derive(Clone, Copy, Debug)]
struct Seen {
    kind: u8,
    raw: [u64; SLOT_WORDS],
    /// The framing check of `raw` for the slot's kind.
    fields: Result<[u64; FIELDS], RecordError>,
}

/// The last-seen contents of every inbound slot of a region.
#[derive(Debug)]
pub(super) struct InboundSlots {
    first: usize,
    /// `None` until a slot is first read: a region can hold anything before.
    seen: RefCell<Box<[Option<Seen>]>>,
    /// Slots copied and checked because they changed (diagnostics, tests).
    decodes: std::cell::Cell<u64>,
}

impl InboundSlots {
    pub(super) fn new(layout: &RegionLayout, replicas: usize) -> InboundSlots {
        let first = layout.inbound_slots(NodeId(0)).start;
        let last = layout.inbound_slots(NodeId(replicas as u8 - 1)).end;
        debug_assert_eq!((last - first) % SLOT_LEN, 0);
        InboundSlots {
            first,
            seen: RefCell::new(vec![None; (last - first) / SLOT_LEN].into_boxed_slice()),
            decodes: std::cell::Cell::new(0),
        }
    }

    /// The valid record in copy `copy` of `writer`'s slot of `kind`, if any.
    pub(super) fn read<R: Record>(
        &self,
        region: &Region,
        layout: &RegionLayout,
        kind: SlotKind,
        writer: NodeId,
        copy: usize,
    ) -> Option<R> {
        let offset = layout.inbound_copy(kind, writer, copy);
        let at = (offset - self.first) / SLOT_LEN;
        let mut seen = self.seen.borrow_mut();
        let fields = match &seen[at] {
            Some(s) if region.holds_words(offset, &s.raw) => {
                // A slot's kind is fixed by the layout.
                debug_assert_eq!(s.kind, R::KIND);
                s.fields
            }
            _ => {
                let mut buf = [0u8; SLOT_LEN];
                region.read(offset, &mut buf);
                let fields = record::check_slot(&buf, R::KIND);
                let mut raw = [0u64; SLOT_WORDS];
                for (w, chunk) in raw.iter_mut().zip(buf.chunks_exact(8)) {
                    *w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
                }
                seen[at] = Some(Seen {
                    kind: R::KIND,
                    raw,
                    fields,
                });
                self.decodes.set(self.decodes.get() + 1);
                fields
            }
        };
        R::from_words(&fields.ok()?).ok()
    }

    pub(super) fn decodes(&self) -> u64 {
        self.decodes.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ReplicaConfig;
    use crate::record::{AckRecord, RecordError};

    fn setup() -> (Region, RegionLayout, InboundSlots) {
        let layout = ReplicaConfig::new(NodeId(0), 3).validate().unwrap();
        let region = Region::new(layout.region_len());
        let slots = InboundSlots::new(&layout, 3);
        (region, layout, slots)
    }

    fn ack(seq: u64) -> AckRecord {
        AckRecord {
            current_term: 2,
            source_term: 2,
            seq,
            ..AckRecord::default()
        }
    }

    #[test]
    fn an_unchanged_slot_is_decoded_once() {
        let (region, layout, slots) = setup();
        let at = layout.inbound(SlotKind::Ack, NodeId(1));
        region.write(at, &ack(1).encode());
        for _ in 0..3 {
            let got = slots.read::<AckRecord>(&region, &layout, SlotKind::Ack, NodeId(1), 0);
            assert_eq!(got, Some(ack(1)));
        }
        assert_eq!(slots.decodes(), 1);
        region.write(at, &ack(2).encode());
        let got = slots.read::<AckRecord>(&region, &layout, SlotKind::Ack, NodeId(1), 0);
        assert_eq!(got, Some(ack(2)), "a rewritten slot is read again");
        assert_eq!(slots.decodes(), 2);
    }

    #[test]
    fn a_change_that_keeps_the_checksum_word_is_still_seen() {
        // A torn write (new fields, old checksum still in place) must not be
        // taken for the record it is replacing.
        let (region, layout, slots) = setup();
        let at = layout.inbound(SlotKind::Ack, NodeId(2));
        let mut bytes = ack(7).encode();
        region.write(at, &bytes);
        assert!(
            slots
                .read::<AckRecord>(&region, &layout, SlotKind::Ack, NodeId(2), 0)
                .is_some()
        );
        bytes[40] ^= 1;
        region.write(at, &bytes);
        let mut raw = [0u8; SLOT_LEN];
        region.read(at, &mut raw);
        assert_eq!(
            record::check_slot(&raw, AckRecord::KIND),
            Err(RecordError::Checksum)
        );
        assert_eq!(
            slots.read::<AckRecord>(&region, &layout, SlotKind::Ack, NodeId(2), 0),
            None
        );
    }

    #[test]
    fn a_slot_never_read_is_checked_even_if_it_is_zero() {
        let (region, layout, slots) = setup();
        let got = slots.read::<AckRecord>(&region, &layout, SlotKind::Ack, NodeId(1), 0);
        assert_eq!(got, None);
        assert_eq!(slots.decodes(), 1);
    }
}
