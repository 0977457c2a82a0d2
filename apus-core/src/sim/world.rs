//! The simulated cluster: nodes, their engine loops, the client, the faults.

use std::fmt::Write as _;

use super::checker::{Checker, Violation, ViolationKind};
use super::net::{Ev, HealKind, Net, Queue, SimTransport};
use super::scenario::{Fault, Scenario, Target};
use super::store::SimStore;
use crate::config::{Durability, PlantedBug, ReplicaConfig};
use crate::entry::EntryKind;
use crate::identity::PeerBook;
use crate::region::Region;
use crate::replica::{Action, Event, ProposeError, Replica};
use crate::rng::Rng;
use crate::transport::{Transport, TransportEvent};
use crate::types::{Index, NodeId, Role, Time};

const MS: u64 = 1_000_000;
/// How long the client keeps its load on after the faults heal.
const LOAD_AFTER_HEAL: u64 = 5 * MS;

/// One simulated node.
#[derive(Debug)]
struct Node {
    replica: Option<Replica<SimStore>>,
    /// The store of a crashed node, waiting for its restart.
    parked: Option<SimStore>,
    incarnation: u64,
    inbox: Vec<TransportEvent>,
    synced: Vec<u64>,
    wake: u64,
    paused_until: u64,
    clock: (f64, u64),
    down_since: u64,
    /// Consecutive runs at one instant (a busy loop is a liveness bug).
    same_instant: (u64, u32),
    /// When a commit line was last traced for this node.
    traced_commit: u64,
    /// Its last poll's actions are not carried out yet: it was preempted.
    carry_pending: bool,
    /// Its storage was wiped when the cluster had committed this far, and
    /// it has not committed that far since: what it held is excused.
    wiped: Option<Index>,
}

/// What one seed did.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    /// The first invariant that broke, if any.
    pub violation: Option<Violation>,
    /// Events processed.
    pub events: u64,
    /// Simulated time at the end, ns.
    pub sim_time: u64,
    /// Highest committed index.
    pub commits: u64,
    /// Client proposals accepted by a leader.
    pub proposals: u64,
    /// Client proposals that committed.
    pub acknowledged: u64,
    /// Elections started.
    pub elections: u64,
    /// Faults that fired.
    pub faults: usize,
    /// Identifies the fault schedule that ran (kinds, victims, timing).
    pub schedule: u64,
    /// Writes refused for lack of a grant.
    pub denied_writes: u64,
    /// Writes that landed torn.
    pub torn_landings: u64,
    /// Engines preempted between a poll and carrying out its actions.
    pub preemptions: u64,
    /// Entries removed by conflict truncation (divergent suffixes repaired).
    pub truncated: u64,
    /// For each leader crash or pause: time until a leader of a newer term
    /// committed its first entry, ns.
    pub failovers: Vec<u64>,
    /// Per node: applied index and digest of the applied sequence.
    pub digests: Vec<(u64, u64)>,
    /// Commit latencies of client proposals, ns (proposal to leader commit).
    pub latencies: Vec<u64>,
    /// Timeline, when tracing.
    pub trace: Vec<String>,
}

/// A simulated cluster run from one seed.
#[derive(Debug)]
pub struct World {
    sc: Scenario,
    bug: Option<PlantedBug>,
    now: u64,
    rng: Rng,
    q: Queue,
    net: Net,
    nodes: Vec<Node>,
    checker: Checker,
    tracing: bool,
    out: Outcome,
    // Client.
    target: usize,
    next_id: u64,
    inflight_props: Vec<(u64, usize, u64, u64, u64)>,
    post_heal: Vec<u64>,
    healed: bool,
    schedule_hash: u64,
    leader_loss: Option<(u64, u64)>,
    events_buf: Vec<TransportEvent>,
}

fn hash_mix(h: u64, v: u64) -> u64 {
    (h ^ v).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(7)
}

impl World {
    /// Builds the world of `sc`, with `bug` planted in every replica.
    pub fn new(sc: Scenario, bug: Option<PlantedBug>, tracing: bool) -> World {
        let layout = Self::config(&sc, 0, bug)
            .validate()
            .expect("scenario config");
        let mut rng = Rng::new(sc.seed);
        let net = Net::new(
            layout,
            sc.latency.clone(),
            sc.torn_chance,
            sc.late_source_chance,
        );
        let n = sc.replicas;
        let mut w = World {
            bug,
            now: 0,
            q: Queue::default(),
            nodes: Vec::with_capacity(n),
            checker: Checker::new(n),
            tracing,
            out: Outcome::default(),
            target: rng.range(0, n as u64) as usize,
            rng,
            net,
            next_id: 1,
            inflight_props: Vec::new(),
            post_heal: Vec::new(),
            healed: false,
            schedule_hash: 0xcbf2_9ce4_8422_2325 ^ n as u64 ^ (sc.durability as u64) << 8,
            leader_loss: None,
            events_buf: Vec::new(),
            sc,
        };
        for i in 0..n {
            let clock = w.sc.clocks[i];
            w.nodes.push(Node {
                replica: None,
                parked: Some(SimStore::new(
                    w.sc.durability == Durability::Memory,
                    w.sc.max_payload,
                )),
                incarnation: 0,
                inbox: Vec::new(),
                synced: Vec::new(),
                wake: u64::MAX,
                paused_until: 0,
                clock,
                down_since: 0,
                same_instant: (u64::MAX, 0),
                traced_commit: 0,
                carry_pending: false,
                wiped: None,
            });
            w.start_node(i);
        }
        for (k, _) in w.sc.faults.iter().enumerate() {
            let at = w.sc.faults[k].0;
            w.q.push(at, Ev::Fault(k));
        }
        w.q.push(w.sc.heal_at, Ev::HealAll);
        w.q.push(1_000, Ev::Client);
        w
    }

    fn config(sc: &Scenario, id: usize, bug: Option<PlantedBug>) -> ReplicaConfig {
        let mut c = ReplicaConfig::new(NodeId(id as u8), sc.replicas);
        c.durability = sc.durability;
        c.ring_capacity = sc.ring_capacity;
        c.catchup_chunk = sc.catchup_chunk;
        c.max_payload = sc.max_payload;
        c.max_inflight_writes = sc.max_inflight_writes;
        c.heartbeat_interval = sc.heartbeat;
        c.election_timeout = sc.election_timeout;
        c.probe_interval = sc.probe_interval;
        c.seed = sc.seed;
        c.planted_bug = bug;
        c
    }

    fn local_at(&self, i: usize, global: u64) -> Time {
        let (rate, offset) = self.nodes[i].clock;
        Time(offset + (global as f64 * rate) as u64)
    }

    fn local_time(&self, i: usize) -> Time {
        self.local_at(i, self.now)
    }

    /// The first global instant at which node `i`'s clock reads `t` or later.
    fn global_time(&self, i: usize, t: Time) -> u64 {
        let (rate, offset) = self.nodes[i].clock;
        let mut g = (t.0.saturating_sub(offset) as f64 / rate).ceil() as u64;
        while self.local_at(i, g) < t {
            g += 1;
        }
        g.max(self.now)
    }

    fn trace(&mut self, line: impl FnOnce() -> String) {
        if self.tracing {
            let l = line();
            // APUS_SIM_LIVE=1 streams the timeline as it happens: for runs
            // that hang or crash before their trace is printed.
            if std::env::var_os("APUS_SIM_LIVE").is_some() {
                eprintln!("{:>9.3}ms  {l}", self.now as f64 / 1e6);
            }
            self.out
                .trace
                .push(format!("{:>9.3}ms  {l}", self.now as f64 / 1e6));
        }
    }

    fn schedule_run(&mut self, i: usize, at: u64) {
        if at < self.nodes[i].wake {
            self.nodes[i].wake = at;
            self.q.push(at, Ev::Run(i));
        }
    }

    fn start_node(&mut self, i: usize) {
        let store = self.nodes[i].parked.take().expect("parked store");
        let region = Region::new(self.net.regions[i].len());
        self.net.regions[i] = region.clone();
        self.net.grant[i] = None;
        self.net.alive[i] = true;
        let cfg = Self::config(&self.sc, i, self.bug);
        let now = self.local_time(i);
        let r = Replica::new(cfg, region, store, now).expect("replica starts");
        self.nodes[i].replica = Some(r);
        self.nodes[i].incarnation += 1;
        self.nodes[i].wake = u64::MAX;
        self.checker.restarted(i);
        for p in 0..self.sc.replicas {
            if p != i {
                self.net.refresh(&mut self.q, &mut self.rng, self.now, i, p);
            }
        }
        self.schedule_run(i, self.now);
    }

    fn crash_node(&mut self, i: usize) {
        let Some(r) = self.nodes[i].replica.take() else {
            return;
        };
        let (_, mut store) = r.into_parts();
        store.crash();
        self.nodes[i].parked = Some(store);
        self.nodes[i].inbox.clear();
        self.nodes[i].synced.clear();
        self.nodes[i].paused_until = 0;
        self.nodes[i].carry_pending = false;
        self.nodes[i].down_since = self.now;
        self.net.alive[i] = false;
        self.net.grant[i] = None;
        for p in 0..self.sc.replicas {
            if p != i {
                self.net.refresh(&mut self.q, &mut self.rng, self.now, i, p);
            }
        }
    }

    fn note_leader_loss(&mut self, i: usize) {
        if self.current_leader() == Some(i)
            && self.leader_loss.is_none()
            && let Some(r) = &self.nodes[i].replica
        {
            self.leader_loss = Some((self.now, r.term()));
        }
    }

    fn current_leader(&self) -> Option<usize> {
        let mut best: Option<(u64, usize)> = None;
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(r) = &n.replica
                && r.role() == Role::Leader
                && best.is_none_or(|(t, _)| r.term() > t)
            {
                best = Some((r.term(), i));
            }
        }
        best.map(|(_, i)| i)
    }

    fn resolve(&mut self, t: Target) -> usize {
        match t {
            Target::Node(i) => i,
            Target::Leader => self
                .current_leader()
                .unwrap_or_else(|| self.rng.range(0, self.sc.replicas as u64) as usize),
            Target::Follower => {
                let n = self.sc.replicas;
                let pick = self.rng.range(0, n as u64) as usize;
                match self.current_leader() {
                    Some(l) if n > 1 && pick == l => (pick + 1) % n,
                    _ => pick,
                }
            }
        }
    }

    /// Nodes that are down or recovering a lost log.
    /// Nodes a committed entry may be missing from: wiped ones that have
    /// not caught up, and in memory mode every node down or recovering.
    fn excused(&self) -> usize {
        let memory = self.sc.durability == Durability::Memory;
        self.nodes
            .iter()
            .filter(|n| {
                n.wiped.is_some() || memory && n.replica.as_ref().is_none_or(|r| r.is_recovering())
            })
            .count()
    }

    /// A crash, restarted `down_for` later; with `wipe`, its storage is
    /// replaced by an empty one with a new incarnation.
    fn crash_fault(&mut self, target: Target, down_for: u64, wipe: bool) {
        let n = self.sc.replicas;
        let tolerable = n - (n / 2 + 1);
        let i = self.resolve(target);
        if self.nodes[i].replica.is_none() {
            return;
        }
        let what = if wipe { "wipe" } else { "crash" };
        let memory = self.sc.durability == Durability::Memory;
        if (memory || wipe) && self.excused() + 1 > tolerable {
            // Nothing is promised once a majority has lost its memory or
            // its storage; keep within what is tolerated.
            self.trace(|| format!("fault  {what} n{i} skipped (too many impaired)"));
            return;
        }
        self.note_leader_loss(i);
        self.out.faults += 1;
        let code = if wipe { 9 } else { 1 };
        self.schedule_hash = hash_mix(
            self.schedule_hash,
            code << 32 | i as u64 | (self.now / MS) << 8,
        );
        self.trace(|| {
            format!(
                "fault  {} n{i} (restart in {:.1}ms)",
                what.to_uppercase(),
                down_for as f64 / 1e6
            )
        });
        self.crash_node(i);
        if wipe {
            self.nodes[i].parked = Some(SimStore::new(memory, self.sc.max_payload));
            let old = self.net.books[i].incarnation;
            self.net.books[i] = PeerBook::new(old + n as u64);
            self.net.rejoin[i] = false;
            let committed = self.checker.max_committed();
            self.nodes[i].wiped = Some(self.nodes[i].wiped.unwrap_or(0).max(committed));
        }
        self.q
            .push(self.now + down_for, Ev::Heal(HealKind::Restart(i)));
    }

    fn fire_fault(&mut self, k: usize) {
        let (_, fault) = self.sc.faults[k];
        let n = self.sc.replicas;
        match fault {
            Fault::Crash { target, down_for } => self.crash_fault(target, down_for, false),
            Fault::Wipe { target, down_for } => self.crash_fault(target, down_for, true),
            Fault::Partition { side, lasts } => {
                self.out.faults += 1;
                self.schedule_hash = hash_mix(
                    self.schedule_hash,
                    2 << 32 | u64::from(side) | (self.now / MS) << 16,
                );
                let a: Vec<usize> = (0..n).filter(|i| side & 1 << i != 0).collect();
                let b: Vec<usize> = (0..n).filter(|i| side & 1 << i == 0).collect();
                self.trace(|| {
                    format!(
                        "fault  PARTITION {a:?} | {b:?} for {:.1}ms",
                        lasts as f64 / 1e6
                    )
                });
                for &x in &a {
                    for &y in &b {
                        self.net.cut(&mut self.q, &mut self.rng, self.now, x, y, 1);
                        self.q
                            .push(self.now + lasts, Ev::Heal(HealKind::Uncut(x, y)));
                    }
                }
            }
            Fault::LinkFailure { a, b, lasts } => {
                self.out.faults += 1;
                self.schedule_hash = hash_mix(
                    self.schedule_hash,
                    3 << 32 | (a * 16 + b) as u64 | (self.now / MS) << 16,
                );
                self.trace(|| {
                    format!("fault  LINK n{a}-n{b} down for {:.2}ms", lasts as f64 / 1e6)
                });
                self.net.cut(&mut self.q, &mut self.rng, self.now, a, b, 1);
                self.q
                    .push(self.now + lasts, Ev::Heal(HealKind::Uncut(a, b)));
            }
            Fault::Isolate { target, lasts } => {
                let i = self.resolve(target);
                self.note_leader_loss(i);
                self.out.faults += 1;
                self.schedule_hash = hash_mix(
                    self.schedule_hash,
                    5 << 32 | i as u64 | (self.now / MS) << 8,
                );
                self.trace(|| format!("fault  ISOLATE n{i} for {:.1}ms", lasts as f64 / 1e6));
                for j in (0..n).filter(|&j| j != i) {
                    self.net.cut(&mut self.q, &mut self.rng, self.now, i, j, 1);
                    self.q
                        .push(self.now + lasts, Ev::Heal(HealKind::Uncut(i, j)));
                }
            }
            Fault::OneWay {
                target,
                peer,
                outbound,
                detect,
                lasts,
            } => {
                let i = self.resolve(target);
                let j = (i + peer) % n;
                let (from, to) = if outbound { (i, j) } else { (j, i) };
                self.out.faults += 1;
                self.schedule_hash = hash_mix(
                    self.schedule_hash,
                    7 << 32 | (from * 16 + to) as u64 | (self.now / MS) << 16,
                );
                self.trace(|| {
                    format!(
                        "fault  ONE-WAY n{from}->n{to} loses packets for {:.2}ms (detected after {:.2}ms)",
                        lasts as f64 / 1e6,
                        detect.min(lasts) as f64 / 1e6
                    )
                });
                self.net.block(from, to, 1);
                // The operation deadline ends the connection; it is set up
                // again once the loss is over.
                let cut_at = self.now + detect.min(lasts);
                self.q.push(cut_at, Ev::Heal(HealKind::Cut(from, to)));
                // Down for long enough that the failures of what was in
                // flight reach the engine before anything posted anew.
                self.q.push(
                    (self.now + lasts).max(cut_at + super::net::DETECT_DELAY.1),
                    Ev::Heal(HealKind::Unblock(from, to)),
                );
            }
            Fault::Stall { target, lasts } => {
                let Some(i) = self.strike_running(target, 6) else {
                    return;
                };
                self.trace(|| format!("fault  STALL n{i}'s sends for {:.2}ms", lasts as f64 / 1e6));
                self.net.stall(i, self.now + lasts);
            }
            Fault::Pause { target, lasts } => {
                let Some(i) = self.strike_running(target, 4) else {
                    return;
                };
                self.trace(|| format!("fault  PAUSE n{i} for {:.1}ms", lasts as f64 / 1e6));
                let until = self.now + lasts;
                self.nodes[i].paused_until = self.nodes[i].paused_until.max(until);
            }
        }
    }

    /// A fault of kind `code` strikes `target` if it runs: counted, mixed
    /// into the schedule hash, and a leader's loss noted. Returns the node.
    fn strike_running(&mut self, target: Target, code: u64) -> Option<usize> {
        let i = self.resolve(target);
        self.nodes[i].replica.as_ref()?;
        self.note_leader_loss(i);
        self.out.faults += 1;
        self.schedule_hash = hash_mix(
            self.schedule_hash,
            code << 32 | i as u64 | (self.now / MS) << 8,
        );
        Some(i)
    }

    fn heal_all(&mut self) {
        self.healed = true;
        self.trace(|| "heal   all faults healed".to_string());
        let n = self.sc.replicas;
        for i in 0..n {
            if self.nodes[i].replica.is_none() {
                self.trace(|| format!("heal   RESTART n{i}"));
                self.start_node(i);
            }
            self.nodes[i].paused_until = 0;
            self.schedule_run(i, self.now);
        }
        for a in 0..n {
            for b in a + 1..n {
                self.net
                    .clear_cuts(&mut self.q, &mut self.rng, self.now, a, b);
            }
        }
        // A connection that lost packets one way is declared lost before it
        // comes back, or what it lost would never complete.
        for a in 0..n {
            for b in 0..n {
                if b != a && self.net.is_blocked(a, b) {
                    self.net.cut(&mut self.q, &mut self.rng, self.now, a, b, 1);
                    let back = self.now + super::net::DETECT_DELAY.1;
                    self.q.push(back, Ev::Heal(HealKind::Reconnect(a, b)));
                }
            }
        }
        self.net.clear_blocks();
    }

    /// When the client stops proposing: some time after healing, once a
    /// proposal made after healing was accepted.
    fn load_over(&self) -> bool {
        self.now >= self.sc.heal_at + LOAD_AFTER_HEAL && !self.post_heal.is_empty()
    }

    fn client(&mut self) {
        if self.load_over() {
            return;
        }
        let gap = self.rng.range(self.sc.propose_gap.0, self.sc.propose_gap.1);
        self.q.push(self.now + gap, Ev::Client);
        let t = self.target;
        if self.nodes[t].paused_until > self.now {
            return;
        }
        let Some(r) = self.nodes[t].replica.as_mut() else {
            self.target = self.rng.range(0, self.sc.replicas as u64) as usize;
            return;
        };
        let id = self.next_id;
        let len = if self.rng.chance(0.05) {
            self.rng.range(8, self.sc.max_payload as u64 + 1)
        } else {
            self.rng.range(8, 64)
        } as usize;
        let mut payload = vec![0u8; len];
        payload[..8].copy_from_slice(&id.to_le_bytes());
        for (k, b) in payload[8..].iter_mut().enumerate() {
            *b = (id as u8).wrapping_mul(31).wrapping_add(k as u8);
        }
        self.checker.proposed(id);
        match r.propose(EntryKind::Data, id % 7, &payload) {
            Ok(p) => {
                self.next_id += 1;
                self.out.proposals += 1;
                if self.healed && self.post_heal.len() < 10_000 {
                    self.post_heal.push(id);
                }
                if self.inflight_props.len() < 4096 {
                    self.inflight_props.push((id, t, p.index, p.term, self.now));
                }
                let at = self.now + self.rng.range(100, 2_000);
                self.schedule_run(t, at);
            }
            Err(ProposeError::NotLeader { leader }) => {
                self.next_id += 1;
                self.target = match leader {
                    Some(l) => l.index(),
                    None => self.rng.range(0, self.sc.replicas as u64) as usize,
                };
            }
            Err(ProposeError::Backpressure) => self.next_id += 1,
            Err(e) => panic!("proposal failed: {e}"),
        }
    }

    /// One engine-loop iteration of node `i`: transport events, poll,
    /// actions, then the checks.
    fn run_node(&mut self, i: usize) -> Result<(), Violation> {
        let local = self.local_time(i);
        let Some(mut r) = self.nodes[i].replica.take() else {
            return Ok(());
        };
        if std::mem::take(&mut self.nodes[i].carry_pending) {
            // Back from a preemption: finish the last poll first.
            self.carry_out(i, &mut r);
        }
        let res = self.step_replica(i, &mut r, local);
        let next = self.global_time(i, r.next_timeout());
        let spin = if self.nodes[i].same_instant.0 == self.now {
            self.nodes[i].same_instant.1 += 1;
            self.nodes[i].same_instant.1 > 1000
        } else {
            self.nodes[i].same_instant = (self.now, 0);
            false
        };
        if spin {
            return Err(Violation {
                kind: ViolationKind::Liveness,
                at: self.now,
                detail: format!("n{i} busy-loops: it asks to run again at once, 1000 times: {r:?}"),
            });
        }
        self.nodes[i].replica = Some(r);
        res?;
        self.schedule_run(i, next);
        Ok(())
    }

    fn step_replica(
        &mut self,
        i: usize,
        r: &mut Replica<SimStore>,
        local: Time,
    ) -> Result<(), Violation> {
        let engine = |e: crate::replica::ReplicaError| Violation {
            kind: ViolationKind::EngineError,
            at: 0,
            detail: format!("n{i}: {e}"),
        };
        for token in std::mem::take(&mut self.nodes[i].synced) {
            r.handle_synced(token, local);
        }
        let mut events = std::mem::take(&mut self.events_buf);
        {
            let mut t = SimTransport {
                net: &mut self.net,
                queue: &mut self.q,
                rng: &mut self.rng,
                inbox: &mut self.nodes[i].inbox,
                me: i,
                now: self.now,
            };
            t.poll(&mut events).expect("sim poll");
        }
        // As the runtime does: before the engine reads anything a new
        // connection delivered, whose handshake may have told it that it is
        // a replacement.
        if std::mem::take(&mut self.net.rejoin[i]) && r.rejoin(local) {
            self.trace(|| format!("n{i}     told it is a replacement: rejoining as a non-voter"));
        }
        for e in events.drain(..) {
            if self.tracing {
                match e {
                    TransportEvent::PeerUp(p) => {
                        self.trace(|| format!("n{i}     connection to {p} up"))
                    }
                    TransportEvent::PeerDown(p) => {
                        self.trace(|| format!("n{i}     connection to {p} down"))
                    }
                    TransportEvent::Completed(c) if c.result.is_err() => self.trace(|| {
                        format!(
                            "n{i}     op {:#x} to {} failed: {:?}",
                            c.op.0, c.peer, c.result
                        )
                    }),
                    TransportEvent::Completed(_) => {}
                }
            }
            r.handle_event(e, local).map_err(engine)?;
        }
        self.events_buf = events;
        r.poll(local).map_err(engine)?;
        // A poll that moved the grant is where a preemption is dangerous
        // (the old writer still lands): it is drawn often, and long, there.
        let regrant = self.sc.preempt_chance > 0.0 && r.log_writer() != self.net.grant[i];
        let chance = if regrant { 0.5 } else { self.sc.preempt_chance };
        if self.rng.chance(chance) {
            // Descheduled before its decisions reach the transport: writes
            // keep landing under the grants of before the poll.
            let (lo, hi) = self.sc.preempt;
            let d = self.rng.range(lo, if regrant { hi * 20 } else { hi });
            self.nodes[i].carry_pending = true;
            self.nodes[i].paused_until = self.nodes[i].paused_until.max(self.now + d);
            self.out.preemptions += 1;
            self.trace(|| {
                format!(
                    "n{i}     preempted for {:.3}ms after its poll",
                    d as f64 / 1e6
                )
            });
        } else {
            self.carry_out(i, r);
        }
        // Checks.
        while let Some(ev) = r.next_event() {
            match ev {
                Event::RoleChanged { role, term, leader } => {
                    self.trace(|| match role {
                        Role::Leader => format!("n{i}     LEADER of term {term}"),
                        Role::Candidate => format!("n{i}     candidate, term {term}"),
                        Role::Follower => format!(
                            "n{i}     follower, term {term}, leader {}",
                            leader.map_or("unknown".into(), |l| l.to_string())
                        ),
                    });
                    if role == Role::Leader {
                        self.checker.leader(self.now, i, term)?;
                        self.out.elections += 1;
                    }
                }
                Event::Committed { index } => {
                    if r.role() == Role::Leader {
                        if let Some((since, old_term)) = self.leader_loss
                            && r.term() > old_term
                            && r.term_at(index) == Some(r.term())
                        {
                            self.leader_loss = None;
                            let took = self.now - since;
                            self.out.failovers.push(took);
                            self.trace(|| {
                                format!(
                                    "n{i}     first commit of the new leader, {:.3}ms after the old one was lost",
                                    took as f64 / 1e6
                                )
                            });
                        }
                        self.note_commits(i, r);
                        if self.now >= self.nodes[i].traced_commit + 500_000 {
                            self.nodes[i].traced_commit = self.now;
                            self.trace(|| format!("n{i}     commit index {index}"));
                        }
                    }
                }
                Event::VotersLost { voters } => {
                    self.trace(|| format!("n{i}     voters that lost their logs: {voters:#b}"));
                }
            }
        }
        for (index, term, digest) in std::mem::take(&mut r.store_mut_for_sim().truncated) {
            self.out.truncated += 1;
            self.checker.truncated(self.now, i, index, term, digest)?;
        }
        loop {
            let e = match r.next_committed() {
                Ok(Some(e)) => e,
                Ok(None) => break,
                Err(e) => return Err(engine(e)),
            };
            self.checker
                .applied(self.now, i, e.index, e.term, e.kind, e.payload)?;
            self.out.commits = self.out.commits.max(e.index);
        }
        Ok(())
    }

    fn note_commits(&mut self, i: usize, r: &Replica<SimStore>) {
        let commit = r.commit_index();
        let now = self.now;
        let out = &mut self.out;
        self.inflight_props.retain(|&(_, node, index, term, at)| {
            if node == i && index <= commit {
                if r.term_at(index) == Some(term) && out.latencies.len() < 100_000 {
                    out.latencies.push(now - at);
                }
                false
            } else {
                true
            }
        });
    }

    fn carry_out(&mut self, i: usize, r: &mut Replica<SimStore>) {
        let incarnation = self.nodes[i].incarnation;
        let mut t = SimTransport {
            net: &mut self.net,
            queue: &mut self.q,
            rng: &mut self.rng,
            inbox: &mut self.nodes[i].inbox,
            me: i,
            now: self.now,
        };
        while let Some(a) = r.next_action() {
            match a {
                Action::Post(op) => t.post(op).expect("post"),
                Action::SetLogWriter(w) => {
                    t.set_log_writer(w).expect("grant");
                }
                Action::Sync { token } => {
                    r.store_mut_for_sim().request_sync(token);
                    let d = t.rng.range(self.sc.fsync.0, self.sc.fsync.1);
                    t.queue.push(
                        self.now + d,
                        Ev::SyncDone {
                            node: i,
                            incarnation,
                            token,
                        },
                    );
                }
            }
        }
    }

    fn check_holders(&mut self) -> Result<(), Violation> {
        let memory = self.sc.durability == Durability::Memory;
        for n in &mut self.nodes {
            if let (Some(target), Some(r)) = (n.wiped, &n.replica)
                && r.commit_index() >= target
                && !r.is_recovering()
            {
                n.wiped = None;
            }
        }
        let excused = self.excused();
        // In memory mode a completed write counts: what has landed in a live
        // replica's ring is taken in before that replica can vote.
        let landed: Vec<std::collections::HashMap<u64, (u64, u64)>> = self
            .nodes
            .iter_mut()
            .map(|n| match (&mut n.replica, memory) {
                (Some(r), true) => r
                    .landed_entries()
                    .into_iter()
                    .map(|(i, t, p)| (i, (t, super::store::entry_digest(t, &p))))
                    .collect(),
                _ => Default::default(),
            })
            .collect();
        let nodes = &self.nodes;
        let held = self
            .checker
            .check_holders(self.now, self.sc.replicas, excused, |n, index| {
                if let Some(&e) = landed[n].get(&index) {
                    return Some(e);
                }
                let store = match (&nodes[n].replica, &nodes[n].parked) {
                    (Some(r), _) => r.store(),
                    (None, Some(s)) => s,
                    (None, None) => return None,
                };
                Some((store_term(store, index)?, store.digest(index)?))
            });
        held.map_err(|mut v| {
            for (i, n) in self.nodes.iter().enumerate() {
                let state = n
                    .replica
                    .as_ref()
                    .map_or("down".into(), |r| r.receive_summary());
                let _ = write!(v.detail, "; n{i}: {state}, {} landed", landed[i].len());
            }
            v
        })
    }

    /// Liveness: a proposal made after the faults healed committed, and
    /// once the load stopped every replica applied everything committed.
    fn liveness_done(&self) -> bool {
        if !self.load_over()
            || !self
                .post_heal
                .iter()
                .any(|&id| self.checker.committed_index_of(id).is_some())
        {
            return false;
        }
        let all = self.checker.max_committed();
        self.nodes.iter().enumerate().all(|(i, n)| {
            n.replica
                .as_ref()
                .is_some_and(|r| self.checker.applied[i] >= all && r.commit_index() >= all)
        })
    }

    fn liveness_report(&self) -> String {
        let mut s = String::from("no progress after healing:");
        for (i, n) in self.nodes.iter().enumerate() {
            match &n.replica {
                Some(r) => {
                    let _ = write!(
                        s,
                        " n{i}[{} t{} commit {} last {} applied {}{}]",
                        r.role(),
                        r.term(),
                        r.commit_index(),
                        r.last_index(),
                        self.checker.applied[i],
                        if r.is_recovering() { " recovering" } else { "" }
                    );
                    if self.tracing {
                        let _ = write!(s, "\n      {} {}", r.receive_summary(), r.leader_summary());
                    }
                }
                None => {
                    let _ = write!(s, " n{i}[down]");
                }
            }
        }
        let _ = write!(
            s,
            "; {} proposals accepted since healing, {} committed",
            self.post_heal.len(),
            self.post_heal
                .iter()
                .filter(|&&id| self.checker.committed_index_of(id).is_some())
                .count()
        );
        s
    }

    /// Runs the scenario to its end or to the first violation.
    pub fn run(mut self) -> Outcome {
        install_panic_hook();
        IN_SIM.with(|f| f.set(true));
        let deadline = self.sc.heal_at + self.sc.liveness_bound;
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let r = self.run_inner(deadline);
            (self, r)
        }));
        IN_SIM.with(|f| f.set(false));
        match result {
            Ok((mut w, r)) => {
                if let Err(v) = r {
                    w.trace(|| format!("VIOLATION {v}"));
                    w.out.violation = Some(v);
                }
                w.finish()
            }
            Err(_) => {
                let msg = LAST_PANIC
                    .with(|p| p.borrow_mut().take())
                    .unwrap_or_else(|| "unknown panic".into());
                Outcome {
                    violation: Some(Violation {
                        kind: ViolationKind::Panic,
                        at: 0,
                        detail: msg,
                    }),
                    ..Outcome::default()
                }
            }
        }
    }

    fn finish(mut self) -> Outcome {
        self.out.sim_time = self.now;
        self.out.schedule = self.schedule_hash;
        self.out.denied_writes = self.net.denied_writes;
        self.out.torn_landings = self.net.torn_landings;
        self.out.acknowledged = self.checker.committed_proposals() as u64;
        self.out.digests = (0..self.sc.replicas)
            .map(|i| (self.checker.applied[i], self.checker.applied_digest[i]))
            .collect();
        self.out
    }

    fn run_inner(&mut self, deadline: u64) -> Result<(), Violation> {
        while let Some(item) = self.q.pop() {
            self.now = item.time;
            if self.now > deadline {
                break;
            }
            self.out.events += 1;
            match item.ev {
                Ev::Run(i) => {
                    if self.nodes[i].wake != self.now {
                        continue; // superseded by an earlier run
                    }
                    self.nodes[i].wake = u64::MAX;
                    let until = self.nodes[i].paused_until;
                    if until > self.now {
                        self.schedule_run(i, until);
                        continue;
                    }
                    self.run_node(i).map_err(|mut v| {
                        v.at = self.now;
                        v
                    })?;
                }
                Ev::Land(piece) => {
                    self.net.land(&mut self.q, &mut self.rng, self.now, piece);
                }
                Ev::Serve(route, op) => {
                    self.net
                        .serve(&mut self.q, &mut self.rng, self.now, route, op);
                }
                Ev::Reply(route, result, data) => {
                    if let Some(ev) = self.net.reply(route, result, data) {
                        let src = route.src;
                        self.nodes[src].inbox.push(ev);
                        let at = self.now + self.rng.range(100, 1_000);
                        self.schedule_run(src, at);
                    }
                }
                Ev::Deliver { node, event } => {
                    if self.nodes[node].replica.is_some() {
                        self.nodes[node].inbox.push(event);
                        self.schedule_run(node, self.now);
                    }
                }
                Ev::SyncDone {
                    node,
                    incarnation,
                    token,
                } => {
                    if self.nodes[node].incarnation == incarnation
                        && let Some(r) = self.nodes[node].replica.as_mut()
                    {
                        r.store_mut_for_sim().complete_sync(token);
                        self.nodes[node].synced.push(token);
                        self.schedule_run(node, self.now);
                    }
                }
                Ev::Fault(k) => {
                    if !self.healed {
                        self.fire_fault(k);
                        self.check_holders()?;
                    }
                }
                Ev::Heal(h) => {
                    if self.healed && !matches!(h, HealKind::Reconnect(..)) {
                        continue;
                    }
                    match h {
                        HealKind::Restart(i) => {
                            if self.nodes[i].replica.is_none() {
                                self.trace(|| format!("heal   RESTART n{i}"));
                                self.start_node(i);
                            }
                        }
                        HealKind::Uncut(a, b) => {
                            self.net.cut(&mut self.q, &mut self.rng, self.now, a, b, -1);
                        }
                        HealKind::Cut(a, b) => {
                            self.trace(|| format!("fault  LINK n{a}-n{b} declared lost"));
                            self.net.cut(&mut self.q, &mut self.rng, self.now, a, b, 1);
                        }
                        HealKind::Reconnect(a, b) => {
                            self.net
                                .clear_cuts(&mut self.q, &mut self.rng, self.now, a, b);
                        }
                        HealKind::Unblock(a, b) => {
                            self.trace(|| format!("heal   ONE-WAY n{a}->n{b} over"));
                            self.net.block(a, b, -1);
                            self.net.cut(&mut self.q, &mut self.rng, self.now, a, b, -1);
                        }
                    }
                }
                Ev::HealAll => self.heal_all(),
                Ev::Client => self.client(),
            }
            if self.healed && self.out.events % 16 == 0 && self.liveness_done() {
                self.check_holders()?;
                return Ok(());
            }
        }
        Err(Violation {
            kind: ViolationKind::Liveness,
            at: self.now,
            detail: self.liveness_report(),
        })
    }
}

fn store_term(s: &SimStore, index: u64) -> Option<u64> {
    use crate::store::LogStore;
    s.meta(index).map(|m| m.term)
}

thread_local! {
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Panics inside the simulator are violations, reported with their message
/// and location instead of a backtrace on stderr.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_sim = LAST_PANIC.with(|p| {
                let msg = info
                    .payload()
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let at = info
                    .location()
                    .map(|l| format!(" at {}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                *p.borrow_mut() = Some(format!("{msg}{at}"));
                IN_SIM.with(|f| f.get())
            });
            if !in_sim {
                default(info);
            }
        }));
    });
}

thread_local! {
    static IN_SIM: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}
