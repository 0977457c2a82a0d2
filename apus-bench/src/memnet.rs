//! A cluster of engines in one thread over zero-latency memory: remote
//! operations land the moment they are posted. What is left is the engine's
//! own cost per commit round, the floor under every transport.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use apus_core::layout::RemoteAccess;
use apus_core::{
    Action, Capabilities, Completion, EntryKind, MemStore, NodeId, OpError, Region, RegionLayout,
    RemoteOp, Replica, ReplicaConfig, Role, Time, Transport, TransportError, TransportEvent, Wake,
};

/// The shared memory: every replica's region and pending events.
struct Fabric {
    regions: Vec<Region>,
    /// Who each replica grants its ring to.
    grants: Vec<Option<NodeId>>,
    events: Vec<VecDeque<TransportEvent>>,
    layout: RegionLayout,
    /// Bytes in flight between two regions (reused: no allocation per op).
    scratch: Vec<u8>,
}

/// One replica's view of [`Fabric`].
struct MemTransport {
    me: NodeId,
    fabric: Rc<RefCell<Fabric>>,
}

#[derive(Debug)]
struct NoWake;

impl Wake for NoWake {
    fn wake(&self) {}
}

impl Transport for MemTransport {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            compare_and_swap: true,
        }
    }

    fn post(&mut self, op: RemoteOp) -> Result<(), TransportError> {
        let mut f = self.fabric.borrow_mut();
        let me = self.me;
        let (op_id, peer, result) = match op {
            RemoteOp::Write {
                op,
                peer,
                local_offset,
                len,
                remote_offset,
            } => {
                let allowed = match f.layout.remote_write_access(me, remote_offset, len) {
                    RemoteAccess::Ring => f.grants[peer.index()] == Some(me),
                    RemoteAccess::Slot(_) => true,
                    RemoteAccess::Denied => false,
                };
                if allowed {
                    let mut buf = std::mem::take(&mut f.scratch);
                    buf.resize(len, 0);
                    f.regions[me.index()].read(local_offset, &mut buf);
                    f.regions[peer.index()].write(remote_offset, &buf);
                    f.scratch = buf;
                }
                (op, peer, allowed)
            }
            RemoteOp::Read {
                op,
                peer,
                remote_offset,
                len,
                local_offset,
            } => {
                let allowed = f.layout.remote_read_allowed(remote_offset, len);
                if allowed {
                    let mut buf = std::mem::take(&mut f.scratch);
                    buf.resize(len, 0);
                    f.regions[peer.index()].read(remote_offset, &mut buf);
                    f.regions[me.index()].write(local_offset, &buf);
                    f.scratch = buf;
                }
                (op, peer, allowed)
            }
            RemoteOp::CompareAndSwap {
                op,
                peer,
                remote_offset,
                expected,
                new,
                local_offset,
            } => {
                let old = f.regions[peer.index()].compare_and_swap(remote_offset, expected, new);
                f.regions[me.index()].write(local_offset, &old.to_le_bytes());
                (op, peer, true)
            }
        };
        f.events[me.index()].push_back(TransportEvent::Completed(Completion {
            op: op_id,
            peer,
            result: if result {
                Ok(())
            } else {
                Err(OpError::AccessDenied)
            },
        }));
        Ok(())
    }

    fn set_log_writer(&mut self, writer: Option<NodeId>) -> Result<(), TransportError> {
        self.fabric.borrow_mut().grants[self.me.index()] = writer;
        Ok(())
    }

    fn poll(&mut self, events: &mut Vec<TransportEvent>) -> Result<(), TransportError> {
        events.extend(self.fabric.borrow_mut().events[self.me.index()].drain(..));
        Ok(())
    }

    fn wait(&mut self, _: Duration) -> Result<(), TransportError> {
        Ok(())
    }

    fn waker(&self) -> Arc<dyn Wake> {
        Arc::new(NoWake)
    }
}

/// `n` replicas in memory mode over zero-latency memory, with a leader.
pub struct MemCluster {
    replicas: Vec<Replica<MemStore>>,
    transports: Vec<MemTransport>,
    now: Time,
    events: Vec<TransportEvent>,
    leader: usize,
}

impl std::fmt::Debug for MemCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemCluster")
            .field("replicas", &self.replicas.len())
            .field("leader", &self.leader)
            .finish()
    }
}

/// Simulated time per step of the cluster: a microsecond.
const STEP: u64 = 1_000;

impl MemCluster {
    /// Builds `n` replicas and runs them until one leads.
    pub fn new(n: usize) -> MemCluster {
        let cfg = |i: usize| ReplicaConfig {
            ring_capacity: 1 << 20,
            catchup_chunk: 64 << 10,
            max_payload: 4096,
            seed: i as u64 + 1,
            ..ReplicaConfig::new(NodeId(i as u8), n)
        };
        let layout = cfg(0).validate().expect("valid configuration");
        let regions: Vec<Region> = (0..n).map(|_| Region::new(layout.region_len())).collect();
        let fabric = Rc::new(RefCell::new(Fabric {
            regions: regions.clone(),
            grants: vec![None; n],
            events: (0..n).map(|_| VecDeque::new()).collect(),
            layout,
            scratch: Vec::new(),
        }));
        let mut c = MemCluster {
            replicas: (0..n)
                .map(|i| {
                    Replica::new(cfg(i), regions[i].clone(), MemStore::new(), Time(0))
                        .expect("replica starts")
                })
                .collect(),
            transports: (0..n)
                .map(|i| MemTransport {
                    me: NodeId(i as u8),
                    fabric: fabric.clone(),
                })
                .collect(),
            now: Time(0),
            events: Vec::new(),
            leader: usize::MAX,
        };
        for i in 0..n {
            for j in (0..n).filter(|&j| j != i) {
                let up = TransportEvent::PeerUp(NodeId(j as u8));
                fabric.borrow_mut().events[i].push_back(up);
            }
        }
        for _ in 0..1_000_000 {
            c.step();
            if let Some(l) = c.replicas.iter().position(|r| r.role() == Role::Leader) {
                // Let it settle (followers synced) before measuring.
                for _ in 0..10_000 {
                    c.step();
                }
                c.leader = l;
                return c;
            }
        }
        panic!("no leader after a million steps");
    }

    /// Advances time by one step and runs every replica once: its events,
    /// its poll, its actions.
    pub fn step(&mut self) {
        self.now = Time(self.now.0 + STEP);
        for i in 0..self.replicas.len() {
            self.events.clear();
            self.transports[i]
                .poll(&mut self.events)
                .expect("memory transport");
            for &ev in &self.events {
                self.replicas[i]
                    .handle_event(ev, self.now)
                    .expect("engine accepts the event");
            }
            self.replicas[i].poll(self.now).expect("engine polls");
            while let Some(a) = self.replicas[i].next_action() {
                match a {
                    Action::Post(op) => self.transports[i].post(op).expect("post"),
                    Action::SetLogWriter(w) => {
                        self.transports[i].set_log_writer(w).expect("grant");
                    }
                    Action::Sync { token } => self.replicas[i].handle_synced(token, self.now),
                }
            }
            while self.replicas[i].next_event().is_some() {}
            while let Ok(Some(_)) = self.replicas[i].next_committed() {}
        }
    }

    /// Proposes `payload` at the leader and steps until it is committed
    /// there; returns the steps taken.
    pub fn commit_one(&mut self, payload: &[u8]) -> usize {
        let p = self.replicas[self.leader]
            .propose(EntryKind::Data, 1, payload)
            .expect("the leader accepts");
        let mut steps = 0;
        while self.replicas[self.leader].commit_index() < p.index {
            self.step();
            steps += 1;
            assert!(steps < 100_000, "no commit in 100000 steps");
        }
        steps
    }

    /// The leader's replica, to bench one step of it alone.
    pub fn leader_mut(&mut self) -> &mut Replica<MemStore> {
        &mut self.replicas[self.leader]
    }

    /// The current simulated time.
    pub fn now(&self) -> Time {
        self.now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memory_cluster_elects_and_commits_on_every_replica() {
        let mut c = MemCluster::new(3);
        for i in 0..100u32 {
            c.commit_one(&i.to_le_bytes());
        }
        let leader_commit = c.replicas[c.leader].commit_index();
        assert!(leader_commit >= 100);
        for _ in 0..1000 {
            c.step();
        }
        for r in &c.replicas {
            assert_eq!(r.commit_index(), leader_commit);
        }
    }
}
