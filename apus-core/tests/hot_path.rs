//! The proposal hot path does not allocate: a three-replica cluster over an
//! in-process zero-latency memory mesh commits thousands of proposals, and
//! the allocations counted while it does are a few buffer doublings of the
//! in-memory log, not one per proposal.

use apus_core::Durability;

#[path = "support/counting.rs"]
mod counting;
#[path = "support/mesh.rs"]
mod mesh;

use mesh::Mesh;

fn allocations_per_proposal(durability: Durability) -> (u64, u64) {
    let mut m = Mesh::new(durability);
    for _ in 0..10_000 {
        if m.leader().is_some() && m.replicas.iter().all(|r| r.leader().is_some()) {
            break;
        }
        m.step();
    }
    assert!(m.leader().is_some(), "no leader elected");
    let payload = [42u8; 100];
    m.run(20_000, &payload); // warm up: buffers reach their working size
    counting::start();
    m.run(20_000, &payload);
    let allocs = counting::stop();
    for r in &m.replicas {
        assert_eq!(r.applied_index(), r.commit_index());
        assert!(r.commit_index() >= 40_000);
    }
    (allocs, 20_000)
}

#[test]
fn committing_does_not_allocate_per_proposal() {
    for durability in [Durability::Memory, Durability::Durable] {
        let (allocs, proposals) = allocations_per_proposal(durability);
        eprintln!("{durability:?}: {allocs} allocations for {proposals} proposals");
        // The in-memory log doubles its buffers now and then (3 replicas x
        // 2 vectors); anything per proposal would be in the tens of thousands.
        assert!(
            allocs <= 24,
            "{durability:?}: {allocs} allocations for {proposals} proposals"
        );
    }
}

#[test]
fn idle_polls_decode_only_the_slots_that_changed() {
    let mut m = Mesh::new(Durability::Memory);
    while m.leader().is_none() || m.replicas.iter().any(|r| r.leader().is_none()) {
        m.step();
        assert!(m.now < 10_000_000_000, "no leader elected");
    }
    m.run(100, &[1u8; 64]);
    let decodes = |m: &Mesh| -> u64 { m.replicas.iter().map(|r| r.counters().slot_decodes).sum() };
    let before = decodes(&m);
    let (start, steps) = (m.now, 10_000);
    for _ in 0..steps {
        m.step();
    }
    let heartbeats = (m.now - start) / 1_000_000; // the default 1 ms interval
    let decoded = decodes(&m) - before;
    // Per heartbeat each follower decodes the leader record copy that was
    // rewritten and the leader each follower's ack; every other look at a
    // slot (several per poll of each replica) is a comparison.
    eprintln!("{decoded} slot decodes in {steps} idle steps, {heartbeats} heartbeats");
    assert!(
        decoded <= 4 * (heartbeats + 1),
        "{decoded} decodes for {heartbeats} heartbeats"
    );
    assert!(
        decoded >= heartbeats,
        "heartbeats must still be read: {decoded}"
    );
}
