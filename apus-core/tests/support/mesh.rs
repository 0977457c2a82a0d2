//! Replicas whose remote operations take effect at once: an in-process,
//! zero-latency memory mesh for tests that drive whole clusters of
//! [`Replica`]s step by step (`#[path]`-included by the tests using it).

#![allow(dead_code)] // each test file uses its own part

use std::collections::VecDeque;

use apus_core::layout::RemoteAccess;
use apus_core::{
    Action, Completion, Durability, EntryKind, MemStore, NodeId, OpError, Region, RemoteOp,
    Replica, ReplicaConfig, Role, Time, TransportEvent,
};

/// Three replicas whose remote operations take effect at once.
pub struct Mesh {
    pub replicas: Vec<Replica<MemStore>>,
    pub regions: Vec<Region>,
    grant: Vec<Option<NodeId>>,
    inbox: Vec<VecDeque<TransportEvent>>,
    scratch: Vec<u8>,
    pub now: u64,
    /// Crashed replicas: they do not run, and operations on them fail.
    pub down: Vec<bool>,
    /// Broken links, `[a * 3 + b]` for both orders: operations fail.
    cut: Vec<bool>,
}

impl Mesh {
    pub fn new(durability: Durability) -> Mesh {
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
            down: vec![false; 3],
            cut: vec![false; 9],
        }
    }

    /// Replica `i` crashes: it stops, and its peers' operations on it fail.
    pub fn crash(&mut self, i: usize) {
        self.down[i] = true;
        self.grant[i] = None;
        self.inbox[i].clear();
        for (j, inbox) in self.inbox.iter_mut().enumerate() {
            if j != i {
                inbox.push_back(TransportEvent::PeerDown(NodeId(i as u8)));
            }
        }
    }

    /// The link between `a` and `b` breaks (both are told) or comes back.
    pub fn set_link(&mut self, a: usize, b: usize, up: bool) {
        self.cut[a * 3 + b] = !up;
        self.cut[b * 3 + a] = !up;
        for (to, from) in [(a, b), (b, a)] {
            let id = NodeId(from as u8);
            let ev = if up {
                TransportEvent::PeerUp(id)
            } else {
                TransportEvent::PeerDown(id)
            };
            self.inbox[to].push_back(ev);
        }
    }

    /// Memory-mode replica `i` starts again with its hard state (term and
    /// vote, always saved) and a fresh region: its log and memory are gone.
    pub fn restart(&mut self, i: usize) {
        assert!(self.down[i], "restart a crashed replica");
        let cfg = self.replicas[i].config().clone();
        assert_eq!(cfg.durability, Durability::Memory);
        let hard = apus_core::store::LogStore::hard_state(self.replicas[i].store());
        let store = MemStore::with_hard_state(hard);
        let region = Region::new(cfg.validate().unwrap().region_len());
        self.regions[i] = region.clone();
        self.replicas[i] = Replica::new(cfg, region, store, Time(self.now)).unwrap();
        self.down[i] = false;
        for (j, inbox) in self.inbox.iter_mut().enumerate() {
            if j != i {
                inbox.push_back(TransportEvent::PeerUp(NodeId(i as u8)));
            }
        }
    }

    /// Steps until a leader is elected and every running replica follows it.
    pub fn elect(&mut self) -> usize {
        let deadline = self.now + 10_000_000_000;
        loop {
            if let Some(l) = self.leader()
                && (0..3)
                    .all(|i| self.down[i] || self.replicas[i].leader() == Some(NodeId(l as u8)))
            {
                return l;
            }
            assert!(self.now < deadline, "no leader elected within 10 s");
            self.step();
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
                        if self.down[dst] || self.cut[i * 3 + dst] {
                            self.complete(i, op, Err(OpError::PeerUnreachable));
                            continue;
                        }
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
                        if self.down[peer.index()] || self.cut[i * 3 + peer.index()] {
                            self.complete(i, op, Err(OpError::PeerUnreachable));
                            continue;
                        }
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
    pub fn step(&mut self) -> u64 {
        self.now += 20_000;
        let now = Time(self.now);
        let mut applied = 0;
        for i in 0..3 {
            if self.down[i] {
                continue;
            }
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

    pub fn leader(&self) -> Option<usize> {
        (0..3).find(|&i| !self.down[i] && self.replicas[i].role() == Role::Leader)
    }

    /// Proposes `n` entries, batches of eight per step, and runs until all
    /// three replicas applied them.
    pub fn run(&mut self, n: u64, payload: &[u8]) {
        let l = self.leader().expect("leader");
        let target = self.replicas[l].last_index() + n;
        let mut left = n;
        while left > 0 || (0..3).any(|i| !self.down[i] && self.replicas[i].applied_index() < target)
        {
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
