//! The proposal hot path does not allocate: a three-replica cluster over an
//! in-process zero-latency memory mesh commits thousands of proposals, and
//! the allocations counted while it does are a few buffer doublings of the
//! in-memory log, not one per proposal.

use std::collections::VecDeque;

use apus_core::layout::RemoteAccess;
use apus_core::{
    Action, Completion, Durability, EntryKind, MemStore, NodeId, OpError, Region, RemoteOp,
    Replica, ReplicaConfig, Role, Time, TransportEvent,
};

#[path = "support/counting.rs"]
mod counting;

/// Three replicas whose remote operations take effect at once.
struct Mesh {
    replicas: Vec<Replica<MemStore>>,
    regions: Vec<Region>,
    grant: Vec<Option<NodeId>>,
    inbox: Vec<VecDeque<TransportEvent>>,
    scratch: Vec<u8>,
    now: u64,
}

impl Mesh {
    fn new(durability: Durability) -> Mesh {
        let mut replicas = Vec::new();
        let mut regions = Vec::new();
        for id in 0..3u8 {
            let mut cfg = ReplicaConfig::new(NodeId(id), 3);
            cfg.durability = durability;
            cfg.ring_capacity = 1 << 20;
            cfg.catchup_chunk = 64 << 10;
            cfg.max_payload = 1024;
            cfg.seed = 7;
            let region = Region::new(cfg.validate().unwrap().region_len());
            regions.push(region.clone());
            replicas.push(Replica::new(cfg, region, MemStore::new(), Time(0)).unwrap());
        }
        Mesh {
            replicas,
            regions,
            grant: vec![None; 3],
            inbox: (0..3).map(|_| VecDeque::with_capacity(1 << 16)).collect(),
            scratch: vec![0; 1 << 20],
            now: 0,
        }
    }

    fn complete(&mut self, src: usize, op: RemoteOp, result: Result<(), OpError>) {
        self.inbox[src].push_back(TransportEvent::Completed(Completion {
            op: op.id(),
            peer: op.peer(),
            result,
        }));
    }

    fn carry_out(&mut self, i: usize) {
        while let Some(a) = self.replicas[i].next_action() {
            match a {
                Action::SetLogWriter(w) => self.grant[i] = w,
                Action::Sync { token } => self.replicas[i].handle_synced(token, Time(self.now)),
                Action::Post(op) => match op {
                    RemoteOp::Write {
                        peer,
                        local_offset,
                        len,
                        remote_offset,
                        ..
                    } => {
                        let dst = peer.index();
                        let layout = *self.replicas[dst].layout();
                        let ok =
                            match layout.remote_write_access(NodeId(i as u8), remote_offset, len) {
                                RemoteAccess::Slot(_) => true,
                                RemoteAccess::Ring => self.grant[dst] == Some(NodeId(i as u8)),
                                RemoteAccess::Denied => false,
                            };
                        if ok {
                            let buf = &mut self.scratch[..len];
                            self.regions[i].read(local_offset, buf);
                            self.regions[dst].write(remote_offset, buf);
                            self.complete(i, op, Ok(()));
                        } else {
                            self.complete(i, op, Err(OpError::AccessDenied));
                        }
                    }
                    RemoteOp::Read {
                        peer,
                        remote_offset,
                        len,
                        local_offset,
                        ..
                    } => {
                        let buf = &mut self.scratch[..len];
                        self.regions[peer.index()].read(remote_offset, buf);
                        self.regions[i].write(local_offset, buf);
                        self.complete(i, op, Ok(()));
                    }
                    RemoteOp::CompareAndSwap { .. } => {
                        self.complete(i, op, Err(OpError::Unsupported))
                    }
                },
            }
        }
    }

    /// One engine-loop iteration of every replica; returns entries applied.
    fn step(&mut self) -> u64 {
        self.now += 20_000;
        let now = Time(self.now);
        let mut applied = 0;
        for i in 0..3 {
            while let Some(ev) = self.inbox[i].pop_front() {
                self.replicas[i].handle_event(ev, now).unwrap();
            }
            self.replicas[i].poll(now).unwrap();
            self.carry_out(i);
            while self.replicas[i].next_event().is_some() {}
            while self.replicas[i].next_committed().unwrap().is_some() {
                applied += 1;
            }
        }
        applied
    }

    fn leader(&self) -> Option<usize> {
        self.replicas.iter().position(|r| r.role() == Role::Leader)
    }

    /// Proposes `n` entries, batches of eight per step, and runs until all
    /// three replicas applied them.
    fn run(&mut self, n: u64, payload: &[u8]) {
        let l = self.leader().expect("leader");
        let target = self.replicas[l].last_index() + n;
        let mut left = n;
        while left > 0 || (0..3).any(|i| self.replicas[i].applied_index() < target) {
            for _ in 0..left.min(8) {
                self.replicas[l]
                    .propose(EntryKind::Data, 0, payload)
                    .unwrap();
                left -= 1;
            }
            self.step();
        }
    }
}

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
