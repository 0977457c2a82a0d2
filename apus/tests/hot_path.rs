//! The leader's path for an input does not allocate: three real nodes over
//! TCP loopback take thousands of [`Node::submit`]s, and the allocations
//! counted in every thread of the process while they do (the submitting
//! thread, the engines, the transports, the apply threads) are far fewer
//! than one per input. The counter itself is shown to catch one allocation
//! per input. Nor does a commit round wake the leader's apply thread.

mod common;

use apus::{Entry, Node, StateMachine};
use apus_core::{EntryKind, NodeId};
use common::{config, leader, until};

#[path = "../../apus-core/tests/support/counting.rs"]
mod counting;

/// Applies without keeping anything (an empty output allocates nothing).
struct Discard;

impl StateMachine for Discard {
    fn apply(&mut self, _: &Entry<'_>) -> Vec<u8> {
        Vec::new()
    }
}

/// Allocations while `n` inputs of `payload` are submitted in bursts of
/// `burst` and each burst waited for; `plant` allocates once more per input
/// (what the test must be able to see).
fn allocations(node: &Node, n: u64, burst: u64, payload: &[u8], plant: bool) -> u64 {
    let header = [7u8; 16];
    counting::start();
    for _ in 0..n / burst {
        for _ in 0..burst {
            if plant {
                std::hint::black_box(Box::new(0u64));
            }
            node.submit(EntryKind::Data, 1, &[&header, payload], 1 << 20)
                .expect("the leader takes it");
        }
        node.wait_submitted(node.submitted()).expect("committed");
    }
    counting::stop()
}

#[test]
fn submitting_input_does_not_allocate_per_input() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "memory");
    let nodes: Vec<Option<Node>> = (0..3)
        .map(|i| Some(Node::start(&cfg, NodeId(i as u8), Discard).unwrap()))
        .collect();
    until("a leader known to all", || {
        leader(&nodes).is_some() && nodes.iter().flatten().all(|n| n.status().leader.is_some())
    });
    let node = nodes[leader(&nodes).unwrap()].as_ref().unwrap();
    let payload = [b'x'; 100];
    // Warm up: queues, buffers and the log reach their working size.
    allocations(node, 20_000, 8, &payload, false);
    let n = 20_000;
    let wakeups = || {
        node.metrics()
            .counters
            .apply_wakeups
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let woken_before = wakeups();
    let seen = allocations(node, n, 8, &payload, false);
    let woken = wakeups() - woken_before;
    let planted = allocations(node, n, 8, &payload, true);
    eprintln!("{seen} allocations for {n} inputs; {planted} with one planted per input");
    assert!(planted >= n, "the counter misses allocations: {planted}");
    assert!(
        seen * 10 < n,
        "{seen} allocations for {n} inputs: the leader's path allocates per input"
    );
    // The leader's wake-ups per commit round are the engine's and the
    // submitter's: input nobody waits for is applied in batches (of 64
    // entries, 8 rounds here; once per round would be 2,500).
    eprintln!(
        "the apply thread was woken {woken} times for {} bursts",
        n / 8
    );
    assert!(
        woken * 4 < n / 8,
        "the apply thread was woken {woken} times for {} commit rounds",
        n / 8
    );
}
