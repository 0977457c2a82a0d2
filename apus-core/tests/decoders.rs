//! Property tests for every decoder in the core: log entries, control
//! records, and what a replica takes from its ring and control block. Bad
//! bytes must be refused with an error, never a panic, and never accepted.

use apus_core::NodeId;
use apus_core::entry::{self, EntryError, EntryHeader, EntryKind};
use apus_core::layout::{SLOT_LEN, SlotKind};
use apus_core::record::{AckRecord, LeaderRecord, Record, StatusRecord, VoteRequest, VoteResponse};
use proptest::prelude::*;

mod common;
use common::{Follower, encoded};

const MAX_PAYLOAD: usize = 512;

fn kind() -> impl Strategy<Value = EntryKind> {
    prop_oneof![
        Just(EntryKind::Noop),
        Just(EntryKind::Data),
        Just(EntryKind::Connect),
        Just(EntryKind::Close),
        Just(EntryKind::Check)
    ]
}

fn header() -> impl Strategy<Value = EntryHeader> {
    (kind(), any::<[u64; 7]>()).prop_map(|(kind, w)| EntryHeader {
        kind,
        payload_len: 0,
        term: w[0],
        leader_term: w[1],
        index: w[2],
        pos: w[3] & !7,
        prev_term: w[4],
        commit: w[5],
        conn: w[6],
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn entry_round_trips(h in header(), payload in prop::collection::vec(any::<u8>(), 0..MAX_PAYLOAD)) {
        let buf = encoded(&h, &payload);
        let (d, p) = entry::decode(&buf, MAX_PAYLOAD).unwrap();
        prop_assert_eq!(p, &payload[..]);
        prop_assert_eq!(d, EntryHeader { payload_len: payload.len() as u32, ..h });
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..1024), max in 0usize..2048) {
        if let Ok((h, p)) = entry::decode(&bytes, max) {
            // Anything accepted must be exactly what encoding it produces.
            let again = encoded(&h, p);
            prop_assert_eq!(&bytes[..again.len()], &again[..]);
        }
        let _ = EntryHeader::parse(&bytes, max);
    }

    #[test]
    fn truncated_entry_is_rejected(h in header(), payload in prop::collection::vec(any::<u8>(), 0..64), cut in 0usize..1000) {
        let buf = encoded(&h, &payload);
        let cut = cut % buf.len();
        prop_assert!(entry::decode(&buf[..cut], MAX_PAYLOAD).is_err());
    }

    #[test]
    fn any_bit_flip_is_rejected(h in header(), payload in prop::collection::vec(any::<u8>(), 0..64), at in any::<usize>(), bit in 0u8..8) {
        let mut buf = encoded(&h, &payload);
        let at = at % buf.len();
        buf[at] ^= 1 << bit;
        prop_assert!(entry::decode(&buf, MAX_PAYLOAD).is_err(), "flip at {} accepted", at);
    }

    #[test]
    fn torn_entry_is_rejected(
        old_h in header(), new_h in header(),
        old_p in prop::collection::vec(any::<u8>(), 32..33),
        new_p in prop::collection::vec(any::<u8>(), 32..33),
        split in 1usize..200,
    ) {
        // A new entry half written over an old one of the same size.
        let old = encoded(&old_h, &old_p);
        let new = encoded(&new_h, &new_p);
        prop_assume!(old != new);
        let split = split % (new.len() - 1) + 1;
        let mut torn = new[..split].to_vec();
        torn.extend_from_slice(&old[split..]);
        prop_assume!(torn != new && torn != old);
        prop_assert!(entry::decode(&torn, MAX_PAYLOAD).is_err());
    }

    #[test]
    fn oversized_payload_is_rejected(h in header(), len in 1usize..256) {
        let buf = encoded(&h, &vec![7u8; len]);
        prop_assert_eq!(
            entry::decode(&buf, len - 1),
            Err(EntryError::Oversized { len, max: len - 1 })
        );
    }

    #[test]
    fn records_never_panic_on_garbage(bytes in prop::array::uniform32(any::<u8>()), fill in any::<u8>()) {
        let mut slot = [fill; SLOT_LEN];
        slot[..32].copy_from_slice(&bytes);
        let _ = LeaderRecord::decode(&slot);
        let _ = AckRecord::decode(&slot);
        let _ = VoteRequest::decode(&slot);
        let _ = VoteResponse::decode(&slot);
        let _ = StatusRecord::decode(&slot);
    }

    #[test]
    fn record_bit_flips_are_rejected(term in 1u64..1000, seq in any::<u64>(), at in 0usize..SLOT_LEN, bit in 0u8..8) {
        let rec = LeaderRecord { term, seq, version: 1, commit: 3, last_index: 5, ..Default::default() };
        let mut slot = rec.encode();
        slot[at] ^= 1 << bit;
        prop_assert!(LeaderRecord::decode(&slot).is_err());
    }

    #[test]
    fn a_follower_accepts_only_what_its_leader_wrote(
        garbage in prop::collection::vec(any::<u8>(), 0..600),
        at in 0usize..4096,
        n in 1usize..6,
    ) {
        let mut f = Follower::synced();
        // Garbage anywhere in the ring, then a few genuine entries: exactly
        // the genuine ones are accepted.
        f.scribble_ring(at, &garbage);
        f.poll();
        prop_assert_eq!(f.r.last_index(), 0);
        for i in 1..=n as u64 {
            f.push_entry(i, 1, format!("entry {i}").as_bytes());
        }
        f.poll();
        prop_assert_eq!(f.r.last_index(), n as u64);
    }

    #[test]
    fn garbage_in_control_slots_changes_nothing(garbage in prop::collection::vec(any::<u8>(), SLOT_LEN..SLOT_LEN + 1)) {
        let mut f = Follower::synced();
        let before = (f.r.term(), f.r.role(), f.r.leader());
        for kind in SlotKind::ALL {
            for copy in 0..kind.copies() {
                f.region.write(f.r.layout().inbound_copy(kind, NodeId(0), copy), &garbage);
            }
        }
        f.poll();
        prop_assert_eq!((f.r.term(), f.r.role(), f.r.leader()), before);
    }
}

#[test]
fn stale_lap_wrong_writer_and_wrong_index_are_refused() {
    let mut f = Follower::synced();
    let cap = f.r.layout().ring_capacity() as u64;
    let ring_at = |f: &Follower, pos: u64| f.r.layout().ring_at(pos);
    let mk = |index: u64, pos: u64, leader_term: u64, prev_term: u64| {
        let h = EntryHeader {
            kind: EntryKind::Data,
            payload_len: 0,
            term: 1,
            leader_term,
            index,
            pos,
            prev_term,
            commit: 0,
            conn: 0,
        };
        encoded(&h, b"x")
    };
    // An entry from a later lap at the same offset: wrong position.
    f.region.write(ring_at(&f, 0), &mk(1, cap, 1, 0));
    f.poll();
    assert_eq!(f.r.last_index(), 0, "stale-lap entry accepted");
    // Written under another leader's term.
    f.region.write(ring_at(&f, 0), &mk(1, 0, 2, 0));
    f.poll();
    assert_eq!(f.r.last_index(), 0, "foreign writer accepted");
    // The wrong index.
    f.region.write(ring_at(&f, 0), &mk(2, 0, 1, 0));
    f.poll();
    assert_eq!(f.r.last_index(), 0, "wrong index accepted");
    // Does not chain onto our log.
    f.region.write(ring_at(&f, 0), &mk(1, 0, 1, 5));
    f.poll();
    assert_eq!(f.r.last_index(), 0, "broken chain accepted");
    assert!(f.r.counters().chain_breaks > 0);
    // And the genuine one.
    f.region.write(ring_at(&f, 0), &mk(1, 0, 1, 0));
    f.poll();
    assert_eq!(f.r.last_index(), 1);
}

#[test]
fn a_torn_entry_waits_for_the_rest() {
    let mut f = Follower::synced();
    let h = EntryHeader {
        kind: EntryKind::Data,
        payload_len: 0,
        term: 1,
        leader_term: 1,
        index: 1,
        pos: 0,
        prev_term: 0,
        commit: 0,
        conn: 0,
    };
    let buf = encoded(&h, &[9u8; 100]);
    let at = f.r.layout().ring_at(0);
    f.region.write(at, &buf[..120]);
    f.poll();
    assert_eq!(f.r.last_index(), 0, "half an entry accepted");
    assert!(f.r.counters().torn_reads > 0);
    f.region.write(at + 120, &buf[120..]);
    f.poll();
    assert_eq!(f.r.last_index(), 1);
}
