//! A seed's world: cluster shape, network, clocks, load and fault schedule.

use std::time::Duration;

use crate::config::Durability;
use crate::rng::Rng;

/// Which node a fault hits, resolved when it fires.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Target {
    /// Whoever leads at that moment (a random node if nobody does).
    Leader,
    /// A node other than the leader at that moment (random if nobody
    /// leads).
    Follower,
    /// This node.
    Node(usize),
}

/// One fault.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Fault {
    /// The node crashes (memory lost, storage kept up to its last sync) and
    /// restarts `down_for` later.
    Crash {
        /// Victim.
        target: Target,
        /// Time until restart, ns.
        down_for: u64,
    },
    /// The node crashes and its storage is wiped (a replaced disk or
    /// machine): it restarts `down_for` later with an empty log, no term or
    /// vote, and a new incarnation.
    Wipe {
        /// Victim.
        target: Target,
        /// Time until restart, ns.
        down_for: u64,
    },
    /// The nodes in `side` (a bitmask) cannot reach the others.
    Partition {
        /// One side of the cut.
        side: u32,
        /// Duration, ns.
        lasts: u64,
    },
    /// One connection breaks and is re-established.
    LinkFailure {
        /// One end.
        a: usize,
        /// The other end.
        b: usize,
        /// Time until reconnection, ns.
        lasts: u64,
    },
    /// Every link of one node breaks (it runs on, alone) for `lasts`.
    /// Generated seeds do not draw it; the tests of pre-vote place it.
    Isolate {
        /// Victim.
        target: Target,
        /// Duration, ns.
        lasts: u64,
    },
    /// Everything the node sends (writes, read requests, replies) is held
    /// for `lasts`, then delivered in order: a NIC or switch queue that
    /// stopped draining. The node runs on and hears its peers; nobody is
    /// told. Its writes land late, after its peers stopped hearing it.
    Stall {
        /// Victim.
        target: Target,
        /// Duration, ns.
        lasts: u64,
    },
    /// Packets in one direction between `target` and a peer are lost (a
    /// one-way link: a bad cable or a switch port dropping one direction).
    /// The sender's writes and read requests never arrive; the receiver's
    /// writes land, but their completions never come back. Nobody is told
    /// until the transports' operation deadline, `detect` later, ends the
    /// connection; it comes back once `lasts` is over.
    OneWay {
        /// One end.
        target: Target,
        /// The other: `target + peer` (mod replicas), `peer` in 1..replicas.
        peer: usize,
        /// Whether `target`'s own packets are lost (else its peer's).
        outbound: bool,
        /// Until the connection is declared lost, ns.
        detect: u64,
        /// Duration, ns.
        lasts: u64,
    },
    /// The node stops running (a GC pause, a stopped VM) while its memory
    /// keeps taking remote writes; a paused leader wakes up deposed and
    /// keeps writing.
    Pause {
        /// Victim.
        target: Target,
        /// Duration, ns.
        lasts: u64,
    },
}

/// Everything about one simulated run that its seed decides.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// The seed.
    pub seed: u64,
    /// Cluster size.
    pub replicas: usize,
    /// Durability mode.
    pub durability: Durability,
    /// Ring capacity (small, to exercise wrap-around and catch-up).
    pub ring_capacity: usize,
    /// Catch-up chunk.
    pub catchup_chunk: usize,
    /// Payload limit.
    pub max_payload: usize,
    /// Pipelining depth.
    pub max_inflight_writes: usize,
    /// Leader heartbeat.
    pub heartbeat: Duration,
    /// Election timeout.
    pub election_timeout: Duration,
    /// Probe retry interval.
    pub probe_interval: Duration,
    /// One-way latency base and jitter per directed link, ns: `[src][dst]`.
    pub latency: Vec<Vec<(u64, u64)>>,
    /// Chance that a write lands in two visible pieces.
    pub torn_chance: f64,
    /// Chance that a write's bytes are read from its source when they land
    /// rather than when it is posted (a NIC reads the source by DMA at any
    /// time before completion).
    pub late_source_chance: f64,
    /// Chance that an engine is preempted between a poll and carrying out
    /// what it decided: remote writes land meanwhile, under the grants of
    /// before the poll.
    pub preempt_chance: f64,
    /// How long such a preemption lasts, ns.
    pub preempt: (u64, u64),
    /// Fsync latency range, ns.
    pub fsync: (u64, u64),
    /// Gap between proposals, ns.
    pub propose_gap: (u64, u64),
    /// Clock rate and offset per node (timer skew).
    pub clocks: Vec<(f64, u64)>,
    /// Faults, by time.
    pub faults: Vec<(u64, Fault)>,
    /// When every fault is healed.
    pub heal_at: u64,
    /// How long after healing the cluster has to make progress.
    pub liveness_bound: u64,
}

const US: u64 = 1_000;
const MS: u64 = 1_000_000;

impl Scenario {
    /// The scenario of `seed`; `replicas` overrides the seed's choice.
    pub fn generate(seed: u64, replicas: Option<usize>) -> Scenario {
        let mut r = Rng::new(seed ^ 0x5EED_5EED_5EED_5EED);
        let mut late = Rng::new(seed ^ 0x1A7E_1A7E_1A7E_1A7E);
        // One-way links, drawn from a third stream for the same reason.
        let mut oneway = Rng::new(seed ^ 0x0E0E_0E0E_0E0E_0E0E);
        // Wiped disks, from a fourth.
        let mut wipes = Rng::new(seed ^ 0x3A9E_3A9E_3A9E_3A9E);
        let replicas = replicas.unwrap_or_else(|| r.pick(&[3, 3, 5]));
        let durability = if r.chance(0.5) {
            Durability::Memory
        } else {
            Durability::Durable
        };
        let ring_capacity = r.pick(&[2048, 4096, 8192, 65536]);
        let catchup_chunk = r.pick(&[1024, 2048, 4096]);
        let max_payload = 300;
        let max_inflight_writes = r.pick(&[1, 2, 4, 16]) as usize;
        let heartbeat = Duration::from_micros(r.range(50, 150));
        let election_timeout = Duration::from_micros(r.range(600, 1200));
        let probe_interval = Duration::from_micros(20);
        let mut latency = vec![vec![(0, 0); replicas]; replicas];
        for (a, row) in latency.iter_mut().enumerate() {
            for (b, cell) in row.iter_mut().enumerate() {
                if a != b {
                    let base = if r.chance(0.1) {
                        r.range(50, 300)
                    } else {
                        r.range(1, 25)
                    };
                    *cell = (base * US, r.range(0, 5) * US);
                }
            }
        }
        let clocks = (0..replicas)
            .map(|_| {
                (
                    1.0 + (r.range(0, 101) as f64 - 50.0) / 1000.0,
                    r.range(0, 10 * MS),
                )
            })
            .collect();
        let heal_at = r.range(15, 35) * MS;
        let nfaults = r.range(2, 9);
        let mut faults = Vec::new();
        for _ in 0..nfaults {
            let at = r.range(2 * MS, heal_at);
            let node = r.range(0, replicas as u64) as usize;
            let target = if r.chance(0.6) {
                Target::Leader
            } else {
                Target::Node(node)
            };
            // A lone replica has no links to cut.
            let kind = if replicas == 1 {
                r.pick(&[0, 7])
            } else {
                r.range(0, 10)
            };
            let fault = match kind {
                0..=2 => Fault::Crash {
                    target,
                    down_for: r.range(200 * US, 6 * MS),
                },
                3..=4 => {
                    let mut side = 0u32;
                    while side == 0 || side == (1 << replicas) - 1 {
                        side = r.range(1, 1 << replicas) as u32;
                    }
                    Fault::Partition {
                        side,
                        lasts: r.range(500 * US, 6 * MS),
                    }
                }
                5..=6 => {
                    let a = node;
                    let b = (a + r.range(1, replicas as u64) as usize) % replicas;
                    Fault::LinkFailure {
                        a,
                        b,
                        lasts: r.range(20 * US, 2 * MS),
                    }
                }
                _ => Fault::Pause {
                    target,
                    lasts: r.range(500 * US, 4 * MS),
                },
            };
            // A quarter become stalls, drawn from the second stream so the
            // first stream's choices stay what they were.
            let fault = if replicas > 1 && late.chance(0.25) {
                Fault::Stall {
                    target,
                    lasts: late.range(300 * US, 3 * MS),
                }
            } else if replicas > 1 && oneway.chance(0.2) {
                Fault::OneWay {
                    target,
                    peer: oneway.range(1, replicas as u64) as usize,
                    outbound: oneway.chance(0.5),
                    detect: oneway.range(100 * US, 2 * MS),
                    lasts: oneway.range(200 * US, 4 * MS),
                }
            } else if replicas > 1 && wipes.chance(0.08) {
                Fault::Wipe {
                    target,
                    down_for: wipes.range(200 * US, 6 * MS),
                }
            } else {
                fault
            };
            faults.push((at, fault));
        }
        faults.sort_by_key(|f| f.0);
        Scenario {
            seed,
            replicas,
            durability,
            ring_capacity,
            catchup_chunk,
            max_payload,
            max_inflight_writes,
            heartbeat,
            election_timeout,
            probe_interval,
            latency,
            torn_chance: r.pick(&[0.0, 0.1, 0.5]),
            // Drawn from their own stream: the seeds' other choices (and so
            // their fault schedules) stay what they were before these.
            late_source_chance: late.pick(&[0.0, 0.3, 1.0]),
            preempt_chance: late.pick(&[0.0, 0.05, 0.3]),
            preempt: (US, late.range(5, 100) * US),
            fsync: (5 * US, r.range(10, 200) * US),
            propose_gap: (2 * US, r.range(10, 60) * US),
            clocks,
            faults,
            heal_at,
            liveness_bound: 250 * MS,
        }
    }

    /// A fixed, fault-free start followed by one leader crash: the demo.
    pub fn demo(seed: u64) -> Scenario {
        let mut s = Scenario::generate(seed, Some(3));
        s.durability = Durability::Durable;
        s.ring_capacity = 65536;
        s.catchup_chunk = 4096;
        s.max_inflight_writes = 16;
        s.heartbeat = Duration::from_micros(100);
        s.election_timeout = Duration::from_micros(1000);
        s.torn_chance = 0.1;
        for (a, row) in s.latency.iter_mut().enumerate() {
            for (b, cell) in row.iter_mut().enumerate() {
                if a != b {
                    *cell = (5 * US, 2 * US);
                }
            }
        }
        s.fsync = (10 * US, 40 * US);
        s.propose_gap = (5 * US, 15 * US);
        s.faults = vec![(
            10 * MS,
            Fault::Crash {
                target: Target::Leader,
                down_for: 5 * MS,
            },
        )];
        s.heal_at = 20 * MS;
        s
    }
}
