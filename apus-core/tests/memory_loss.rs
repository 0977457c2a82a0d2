//! Memory mode promises nothing once a majority of the replicas lost their
//! memory at once. What it does promise: such a cluster elects nobody (a
//! replica that lost its log never votes), the replica that kept its log
//! says so (`voters_lost`), and once an operator accepts the loss
//! (`accept_data_loss`, `apus recover --accept-data-loss`) the replica that
//! kept the most is elected and the cluster works again.

#[path = "support/mesh.rs"]
mod mesh;

use apus_core::{Durability, EntryKind, Role};
use mesh::Mesh;

/// Steps for `ns` of simulated time; returns whether anyone led meanwhile.
fn run_for(m: &mut Mesh, ns: u64) -> bool {
    let end = m.now + ns;
    let mut led = false;
    while m.now < end {
        m.step();
        led |= m.leader().is_some();
    }
    led
}

/// A cluster that committed `n` entries, its leader and one follower.
fn cluster_with_log(n: u64) -> (Mesh, usize, usize, usize) {
    let mut m = Mesh::new(Durability::Memory);
    let leader = m.elect();
    m.run(n, &[7u8; 32]);
    let f1 = (leader + 1) % 3;
    let f2 = (leader + 2) % 3;
    (m, leader, f1, f2)
}

#[test]
fn a_majority_that_lost_its_memory_elects_nobody_until_the_loss_is_accepted() {
    let (mut m, leader, lost, survivor) = cluster_with_log(500);
    let kept = m.replicas[leader].last_index();
    assert!(kept > 500, "500 entries after the new leader's own");
    assert_eq!(m.replicas[survivor].last_index(), kept);
    // The leader and a follower lose their memory together.
    m.crash(leader);
    m.crash(lost);
    m.restart(leader);
    m.restart(lost);
    assert!(m.replicas[leader].is_recovering() && m.replicas[lost].is_recovering());
    // Two election timeouts and more: the survivor stands again and again,
    // and the recovering replicas refuse it. Nobody is elected.
    assert!(
        !run_for(&mut m, 200_000_000),
        "elected without a majority that kept its log"
    );
    let lost_bits = (1u32 << leader) | (1 << lost);
    assert_eq!(
        m.replicas[survivor].voters_lost(),
        lost_bits,
        "the survivor knows who lost their logs"
    );
    assert!(m.replicas[survivor].counters().pre_votes > 2);

    // The operator accepts the loss: the two only vote.
    let now = apus_core::Time(m.now);
    assert!(m.replicas[leader].accept_data_loss(false, now));
    assert!(m.replicas[lost].accept_data_loss(false, now));
    assert!(
        !m.replicas[survivor].accept_data_loss(false, now),
        "it never lost anything"
    );
    let elected = m.elect();
    assert_eq!(elected, survivor, "the replica that kept its log leads");
    assert_eq!(
        m.replicas[survivor].voters_lost(),
        0,
        "cleared once it leads"
    );
    // The survivor's log is everyone's again, and new entries commit.
    m.run(100, &[9u8; 32]);
    for r in &m.replicas {
        assert!(!r.is_recovering());
        assert_eq!(r.applied_index(), m.replicas[survivor].last_index());
        assert!(r.applied_index() > kept + 100);
    }
}

#[test]
fn a_cluster_that_lost_everything_restarts_from_the_replica_told_to_stand() {
    let (mut m, ..) = cluster_with_log(50);
    for i in 0..3 {
        m.crash(i);
    }
    for i in 0..3 {
        m.restart(i);
    }
    assert!(!run_for(&mut m, 200_000_000), "nobody may vote");
    // Nobody stands, so nobody can tell: `apus status` counts the recovering.
    assert!((0..3).all(|i| m.replicas[i].is_recovering()));
    let now = apus_core::Time(m.now);
    assert!(m.replicas[1].accept_data_loss(true, now));
    assert!(m.replicas[0].accept_data_loss(false, now));
    assert!(m.replicas[2].accept_data_loss(false, now));
    assert!(!run_for(&mut m, 0) || m.leader().is_none());
    let elected = m.elect();
    assert_eq!(elected, 1, "only the replica told to stand stands");
    let before = m.replicas[1].last_index();
    m.run(10, &[1u8; 8]);
    assert_eq!(m.replicas[0].applied_index(), before + 10);
    assert_eq!(m.replicas[2].applied_index(), before + 10);
}

#[test]
fn a_minority_that_lost_its_memory_recovers_on_its_own() {
    let (mut m, leader, lost, _) = cluster_with_log(200);
    m.crash(lost);
    m.restart(lost);
    assert!(m.replicas[lost].is_recovering());
    m.run(10, &[3u8; 16]);
    assert!(
        !m.replicas[lost].is_recovering(),
        "resent the log by the leader"
    );
    assert_eq!(
        m.replicas[lost].applied_index(),
        m.replicas[leader].last_index()
    );
    assert!((0..3).all(|i| m.replicas[i].voters_lost() == 0));
    assert_eq!(m.leader(), Some(leader), "no election was needed");
    assert!(
        m.replicas[leader]
            .propose(EntryKind::Data, 0, b"more")
            .is_ok()
    );
    assert_ne!(m.replicas[lost].role(), Role::Leader);
}
