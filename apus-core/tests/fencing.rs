//! Fencing at the follower: what a revoked leader landed before the
//! revocation is taken in before the follower moves on, and nothing it wrote
//! is accepted once a newer leader is the source.

mod common;
use apus_core::{NodeId, Role};
use common::{Follower, FromLeader};

#[test]
fn a_revoked_leaders_landed_sync_and_entries_are_drained_first() {
    let mut f = Follower::synced();
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
    assert_eq!(
        f.r.last_index(),
        4,
        "what the revoked n2 landed must be in our log"
    );
    assert_eq!(f.r.role(), Role::Follower);
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
