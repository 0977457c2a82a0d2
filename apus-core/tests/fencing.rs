//! Fencing at the follower: what a revoked leader landed before the
//! revocation is taken in before the follower moves on, and nothing it wrote
//! is accepted once a newer leader is the source.

mod common;
use apus_core::{NodeId, Role};
use common::{Bug, Follower, FromLeader};

/// Two entries from n0 (term 1); then n2 leads term 2 with no sync yet: we
/// grant it (revoking n0) and settle. Returns n2's record.
fn granted_to_n2(bug: Bug) -> (Follower, FromLeader) {
    let mut f = Follower::synced_with(bug);
    for i in 1..=2 {
        f.push_entry(i, 1, b"from n0, term 1");
    }
    f.poll();
    // n2 leads term 2: we grant it (revoking n0) and settle.
    let n2 = FromLeader {
        leader: NodeId(2),
        term: 2,
        version: 1,
        sync_seq: 0,
        sync_index: 0,
        sync_term: 0,
        sync_pos: 0,
        last_index: 2,
    };
    f.write_leader_record(n2);
    f.poll();
    f.poll();
    assert_eq!((f.r.term(), f.r.log_writer()), (2, Some(NodeId(2))));
    (f, n2)
}

#[test]
fn a_revoked_leaders_landed_sync_and_entries_are_drained_first() {
    assert_eq!(
        revoked_leader_landed_sync(None),
        4,
        "what the revoked n2 landed must be in our log"
    );
}

/// n2 syncs us and streams two entries, then is revoked; our last index
/// after the settle drain.
fn revoked_leader_landed_sync(bug: Bug) -> u64 {
    let (mut f, n2) = granted_to_n2(bug);
    // n2 syncs us at index 2 and streams two entries (it counts them once
    // its writes complete); before we read n2's record, n0 wins term 3 and
    // we revoke n2.
    let (pos, term) = f.tail();
    f.write_leader_record(FromLeader {
        version: 2,
        sync_seq: 1,
        sync_index: 2,
        sync_term: term,
        sync_pos: pos,
        last_index: 4,
        ..n2
    });
    f.push_entry_by(3, 2, 2, b"from n2, term 2");
    f.push_entry_by(4, 2, 2, b"from n2, term 2");
    f.write_leader_record(FromLeader {
        leader: NodeId(0),
        term: 3,
        version: 9,
        last_index: 2,
        ..n2
    });
    f.poll(); // n0's record is read first: term 3, n2 revoked, settling
    assert_eq!((f.r.term(), f.r.log_writer()), (3, Some(NodeId(0))));
    f.poll(); // the settle drain takes what n2 landed
    assert_eq!(f.r.role(), Role::Follower);
    f.r.last_index()
}

#[test]
fn nothing_from_a_stale_leader_is_taken_once_a_new_leader_syncs() {
    let mut f = Follower::synced();
    for i in 1..=2 {
        f.push_entry(i, 1, b"old leader");
    }
    f.poll();
    assert_eq!(f.r.last_index(), 2);
    let (pos, term) = f.tail();
    // n2 leads term 2 and syncs us at our last entry.
    let n2 = FromLeader {
        leader: NodeId(2),
        term: 2,
        version: 1,
        sync_seq: 1,
        sync_index: 2,
        sync_term: term,
        sync_pos: pos,
        last_index: 2,
    };
    f.write_leader_record(n2);
    f.poll(); // adopt term 2, grant n2, settle
    f.write_leader_record(FromLeader { version: 2, ..n2 });
    f.poll(); // take the sync
    // Bytes n0 wrote under term 1 at the very place n2's stream continues.
    f.push_entry(3, 1, b"stale");
    f.poll();
    assert_eq!(
        f.r.last_index(),
        2,
        "an entry written under a stale term was accepted"
    );
}

#[test]
fn a_live_leader_is_not_deposed_by_a_cut_off_candidate() {
    let mut f = Follower::synced();
    f.vote_request(NodeId(2), 5);
    f.poll();
    assert_eq!((f.r.term(), f.r.log_writer()), (1, Some(NodeId(0))));
}

/// n2 leads term 2, then term 4, and we learn the second term from its
/// record alone (no vote of ours, no grant change). What it lands in term 4
/// before n0's term 5 revokes it must still be drained: the grant's term
/// is renewed with the leader's term (it used to stay 2, and the drain,
/// which looks for a record of the grant's term, skipped n2's term-4 sync).
#[test]
fn a_writer_that_led_again_is_drained_with_its_new_term() {
    assert_eq!(
        writer_that_led_again(None),
        4,
        "what n2 landed in its second term must be in our log"
    );
}

/// n2 leads terms 2 and 4, lands a sync and two entries in term 4, and is
/// revoked; our last index after the settle drain.
fn writer_that_led_again(bug: Bug) -> u64 {
    let (mut f, n2) = granted_to_n2(bug);
    // n2 wins term 4 without us: its heartbeat says so.
    f.write_leader_record(FromLeader {
        term: 4,
        version: 2,
        ..n2
    });
    f.poll();
    f.poll();
    assert_eq!((f.r.term(), f.r.log_writer()), (4, Some(NodeId(2))));
    // In term 4 n2 syncs us and streams two entries; before we read its
    // record, n0 wins term 5 and we revoke n2.
    let (pos, term) = f.tail();
    f.write_leader_record(FromLeader {
        term: 4,
        version: 3,
        sync_seq: 1,
        sync_index: 2,
        sync_term: term,
        sync_pos: pos,
        last_index: 4,
        ..n2
    });
    f.push_entry_by(3, 4, 4, b"from n2, term 4");
    f.push_entry_by(4, 4, 4, b"from n2, term 4");
    f.write_leader_record(FromLeader {
        leader: NodeId(0),
        term: 5,
        version: 9,
        last_index: 2,
        ..n2
    });
    f.poll(); // n0's term 5: n2 revoked, settling
    assert_eq!((f.r.term(), f.r.log_writer()), (5, Some(NodeId(0))));
    f.poll(); // the settle drain takes what n2 landed in term 4
    f.r.last_index()
}

/// Two grant changes in one poll (n0's term 3 from its record, then n2's
/// vote request of term 4) revoke two writers; the drain takes what each
/// landed. A single revoked slot kept only the last one (n0), and what n2
/// landed under its term-2 grant was lost.
#[test]
fn two_revocations_in_one_poll_drain_both_writers() {
    let (mut f, n2) = granted_to_n2(None);
    // n2 syncs us and streams two entries. Before we read any of it, n0's
    // record says it leads term 3, and n2 (cut off from n0) asks for our
    // vote in term 4; we have heard no leader for a long time.
    let (pos, term) = f.tail();
    f.write_leader_record(FromLeader {
        version: 2,
        sync_seq: 1,
        sync_index: 2,
        sync_term: term,
        sync_pos: pos,
        last_index: 4,
        ..n2
    });
    f.push_entry_by(3, 2, 2, b"from n2, term 2");
    f.push_entry_by(4, 2, 2, b"from n2, term 2");
    f.write_leader_record(FromLeader {
        leader: NodeId(0),
        term: 3,
        version: 9,
        last_index: 2,
        ..n2
    });
    f.vote_request(NodeId(2), 4);
    f.advance(10_000_000_000);
    f.poll(); // term 3 (n2 revoked, n0 granted), then term 4 (n0 revoked)
    assert_eq!((f.r.term(), f.r.log_writer()), (4, None));
    f.poll(); // the settle drain takes what n2 landed
    assert_eq!(
        f.r.last_index(),
        4,
        "what the first revoked writer landed must be in our log"
    );
}

/// The planted bugs of the drain are caught by the tests above (the random
/// seeds of the simulator do not reach these interleavings yet).
#[cfg(feature = "sim")]
#[test]
fn the_drain_tests_catch_their_planted_bugs() {
    use apus_core::config::PlantedBug;
    assert_eq!(
        revoked_leader_landed_sync(Some(PlantedBug::NoRevokedDrain)),
        2,
        "no-revoked-drain loses what the revoked leader landed"
    );
    assert_eq!(
        writer_that_led_again(Some(PlantedBug::StaleWriterTerm)),
        2,
        "stale-writer-term loses what the re-elected writer landed"
    );
}
