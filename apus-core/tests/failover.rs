//! A follower whose connection to its leader breaks (the leader's process
//! died: its kernel closed the sockets) stands at once instead of after an
//! election timeout of silence; a broken link alone deposes nobody, since
//! the pre-vote needs a majority that hears no leader.

#[path = "support/mesh.rs"]
mod mesh;

use apus_core::{Durability, NodeId};
use mesh::Mesh;

/// The default election timeout, ns.
const ELECTION_TIMEOUT: u64 = 10_000_000;

#[test]
fn a_dead_leaders_broken_connections_start_the_election_at_once() {
    let mut m = Mesh::new(Durability::Memory);
    assert_eq!(
        m.replicas[0].config().election_timeout.as_nanos() as u64,
        ELECTION_TIMEOUT
    );
    let old = m.elect();
    m.run(100, &[1u8; 16]);
    let term = m.replicas[old].term();
    m.crash(old); // its peers get PeerDown, as from a closed socket
    let crashed = m.now;
    let new = m.elect();
    let took = m.now - crashed;
    assert_ne!(new, old);
    assert!(m.replicas[new].term() > term);
    // Without the hint: an election timeout or more of silence first.
    assert!(
        took < ELECTION_TIMEOUT,
        "new leader {:.1} ms after the crash",
        took as f64 / 1e6
    );
}

#[test]
fn a_broken_link_to_a_live_leader_deposes_nobody() {
    let mut m = Mesh::new(Durability::Memory);
    let leader = m.elect();
    m.run(100, &[1u8; 16]);
    let term = m.replicas[leader].term();
    let f = (leader + 1) % 3;
    let pre_votes = m.replicas[f].counters().pre_votes;
    m.set_link(f, leader, false);
    // Several election timeouts: f stands at once, but the other follower
    // still hears the leader and refuses the pre-vote.
    let end = m.now + 5 * ELECTION_TIMEOUT;
    while m.now < end {
        m.step();
    }
    assert!(m.replicas[f].counters().pre_votes > pre_votes, "f did ask");
    assert_eq!(m.leader(), Some(leader));
    assert_eq!(m.replicas[leader].term(), term, "nobody raised the term");
    m.set_link(f, leader, true);
    m.run(10, &[2u8; 16]);
    assert_eq!(m.replicas[f].leader(), Some(NodeId(leader as u8)));
    assert_eq!(m.replicas[leader].term(), term);
}
