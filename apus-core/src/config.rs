//! Engine configuration and its validation.

use std::time::Duration;

use crate::entry::encoded_len;
use crate::layout::{LayoutError, RegionLayout};
use crate::types::{MAX_REPLICAS, NodeId};

/// When an entry counts as replicated.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum Durability {
    /// An entry is committed once a majority holds it in memory: the leader
    /// counts a follower as soon as its remote write completes (as Mu does).
    /// Survives the crash of a minority; a whole-cluster power loss loses
    /// the log. Terms and votes are still saved by the store, and a replica
    /// that restarts without its log neither votes nor campaigns until a
    /// leader has brought it back up to date.
    #[default]
    Memory,
    /// A follower acknowledges an entry only after the runtime has made it
    /// durable (`Action::Sync`), and the leader counts itself only after its
    /// own sync.
    Durable,
}

/// A protocol bug planted on purpose, to prove the simulator catches it.
#[cfg(any(test, feature = "sim"))]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PlantedBug {
    /// The leader commits an entry as soon as it holds it itself.
    CommitWithoutMajority,
    /// A follower accepts an entry written into its ring under an older term
    /// than its source's (it checks the writer term with `<=`, not `==`).
    AcceptStaleTerm,
    /// A node whose election timer fires stands at once, raising its term,
    /// instead of asking for a pre-vote first.
    NoPreVote,
    /// A follower keeps the term of its writer's first grant when the same
    /// writer leads a later term, so a revocation drains nothing of it.
    StaleWriterTerm,
    /// A revoked writer's last landed sync is never drained.
    NoRevokedDrain,
    /// A voter answers and a candidate asks before what the old writer
    /// landed is drained into their logs.
    NoDrainBeforeVote,
    /// The leader record has one copy: a write in flight hides it.
    SingleBufferedLeaderRecord,
    /// A replica that lost its memory votes before it has recovered.
    NoRecoveringGate,
    /// A replica told it is a replacement (its storage was wiped) goes on
    /// voting: [`Replica::rejoin`](crate::Replica::rejoin) does nothing.
    NoRejoin,
}

#[cfg(any(test, feature = "sim"))]
impl PlantedBug {
    /// Every planted bug.
    pub const ALL: [PlantedBug; 9] = [
        PlantedBug::CommitWithoutMajority,
        PlantedBug::AcceptStaleTerm,
        PlantedBug::NoPreVote,
        PlantedBug::StaleWriterTerm,
        PlantedBug::NoRevokedDrain,
        PlantedBug::NoDrainBeforeVote,
        PlantedBug::SingleBufferedLeaderRecord,
        PlantedBug::NoRecoveringGate,
        PlantedBug::NoRejoin,
    ];

    /// Parses the command-line name of a bug.
    pub fn from_name(name: &str) -> Option<PlantedBug> {
        match name {
            "commit-without-majority" => Some(PlantedBug::CommitWithoutMajority),
            "accept-stale-term" => Some(PlantedBug::AcceptStaleTerm),
            "no-pre-vote" => Some(PlantedBug::NoPreVote),
            "stale-writer-term" => Some(PlantedBug::StaleWriterTerm),
            "no-revoked-drain" => Some(PlantedBug::NoRevokedDrain),
            "no-drain-before-vote" => Some(PlantedBug::NoDrainBeforeVote),
            "single-buffered-leader-record" => Some(PlantedBug::SingleBufferedLeaderRecord),
            "no-recovering-gate" => Some(PlantedBug::NoRecoveringGate),
            "no-rejoin" => Some(PlantedBug::NoRejoin),
            _ => None,
        }
    }

    /// The command-line name of the bug.
    pub fn name(self) -> &'static str {
        match self {
            PlantedBug::CommitWithoutMajority => "commit-without-majority",
            PlantedBug::AcceptStaleTerm => "accept-stale-term",
            PlantedBug::NoPreVote => "no-pre-vote",
            PlantedBug::StaleWriterTerm => "stale-writer-term",
            PlantedBug::NoRevokedDrain => "no-revoked-drain",
            PlantedBug::NoDrainBeforeVote => "no-drain-before-vote",
            PlantedBug::SingleBufferedLeaderRecord => "single-buffered-leader-record",
            PlantedBug::NoRecoveringGate => "no-recovering-gate",
            PlantedBug::NoRejoin => "no-rejoin",
        }
    }
}

/// Everything a [`Replica`](crate::Replica) needs to know about its cluster
/// and its limits. Every replica of a cluster must agree on `replicas`,
/// `ring_capacity`, `catchup_chunk` and `max_payload`.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// This replica's id, `0..replicas`.
    pub id: NodeId,
    /// Cluster size.
    pub replicas: usize,
    /// When entries count as replicated.
    pub durability: Durability,
    /// Bytes in the log ring (a multiple of 64).
    pub ring_capacity: usize,
    /// Bytes per catch-up write to a lagging follower (a multiple of 64).
    pub catchup_chunk: usize,
    /// Largest payload a proposal may carry.
    pub max_payload: usize,
    /// Replication writes in flight per follower (pipelining depth).
    pub max_inflight_writes: usize,
    /// How often the leader writes its heartbeat record.
    pub heartbeat_interval: Duration,
    /// A follower that hears nothing from its leader for between one and two
    /// of these starts an election. A leader that hears from no majority for
    /// this long steps down.
    pub election_timeout: Duration,
    /// How long a leader waits before re-reading a follower's status.
    pub probe_interval: Duration,
    /// Seed for the election-timeout jitter.
    pub seed: u64,
    /// A bug to plant (simulator only).
    #[cfg(any(test, feature = "sim"))]
    pub planted_bug: Option<PlantedBug>,
}

impl ReplicaConfig {
    /// Defaults for a real cluster: 4 MiB ring, 64 KiB payloads, 1 ms
    /// heartbeats, 10 ms election timeout.
    pub fn new(id: NodeId, replicas: usize) -> ReplicaConfig {
        ReplicaConfig {
            id,
            replicas,
            durability: Durability::Memory,
            ring_capacity: 4 << 20,
            catchup_chunk: 128 << 10,
            max_payload: 64 << 10,
            max_inflight_writes: 64,
            heartbeat_interval: Duration::from_millis(1),
            election_timeout: Duration::from_millis(10),
            probe_interval: Duration::from_micros(100),
            seed: 0,
            #[cfg(any(test, feature = "sim"))]
            planted_bug: None,
        }
    }

    /// The region layout this configuration implies.
    pub fn layout(&self) -> Result<RegionLayout, ConfigError> {
        RegionLayout::new(self.replicas, self.ring_capacity, self.catchup_chunk).map_err(|e| {
            let field = match e {
                LayoutError::Replicas(_) => "replicas",
                LayoutError::RingCapacity(_) => "ring_capacity",
                LayoutError::CatchupChunk(_) => "catchup_chunk",
            };
            ConfigError {
                field,
                reason: e.to_string(),
            }
        })
    }

    /// Checks every field; the error names the first one that is wrong.
    pub fn validate(&self) -> Result<RegionLayout, ConfigError> {
        let err = |field: &'static str, reason: String| Err(ConfigError { field, reason });
        if self.replicas == 0 || self.replicas > MAX_REPLICAS {
            return err(
                "replicas",
                format!(
                    "must be between 1 and {MAX_REPLICAS}, got {}",
                    self.replicas
                ),
            );
        }
        if self.id.index() >= self.replicas {
            return err(
                "id",
                format!(
                    "must be below replicas ({}), got {}",
                    self.replicas, self.id.0
                ),
            );
        }
        let layout = self.layout()?;
        let largest = encoded_len(self.max_payload);
        if largest > self.catchup_chunk {
            return err(
                "max_payload",
                format!(
                    "an entry of {} payload bytes takes {largest} bytes, more than catchup_chunk ({})",
                    self.max_payload, self.catchup_chunk
                ),
            );
        }
        if largest > self.ring_capacity / 4 {
            return err(
                "max_payload",
                format!(
                    "an entry of {} payload bytes takes {largest} bytes; the ring ({}) must hold at least four",
                    self.max_payload, self.ring_capacity
                ),
            );
        }
        if self.max_inflight_writes == 0 || self.max_inflight_writes > 4096 {
            return err(
                "max_inflight_writes",
                format!(
                    "must be between 1 and 4096, got {}",
                    self.max_inflight_writes
                ),
            );
        }
        if self.heartbeat_interval.is_zero() {
            return err("heartbeat_interval", "must be positive".into());
        }
        if self.election_timeout < self.heartbeat_interval * 2 {
            return err(
                "election_timeout",
                format!(
                    "must be at least twice heartbeat_interval ({:?}), got {:?}",
                    self.heartbeat_interval, self.election_timeout
                ),
            );
        }
        if self.probe_interval.is_zero() || self.probe_interval > self.election_timeout {
            return err(
                "probe_interval",
                format!(
                    "must be positive and at most election_timeout ({:?}), got {:?}",
                    self.election_timeout, self.probe_interval
                ),
            );
        }
        Ok(layout)
    }
}

/// An invalid configuration field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid configuration: {field}: {reason}")]
pub struct ConfigError {
    /// The field at fault.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        ReplicaConfig::new(NodeId(2), 3).validate().unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        let base = ReplicaConfig::new(NodeId(0), 3);
        type Change = Box<dyn Fn(&mut ReplicaConfig)>;
        let cases: Vec<(&str, Change)> = vec![
            ("replicas", Box::new(|c| c.replicas = 0)),
            ("replicas", Box::new(|c| c.replicas = 17)),
            ("id", Box::new(|c| c.id = NodeId(3))),
            ("ring_capacity", Box::new(|c| c.ring_capacity = 1000)),
            ("catchup_chunk", Box::new(|c| c.catchup_chunk = 0)),
            ("max_payload", Box::new(|c| c.max_payload = 1 << 20)),
            (
                "max_payload",
                Box::new(|c| {
                    c.ring_capacity = 256 << 10;
                    c.max_payload = 100 << 10;
                }),
            ),
            (
                "max_inflight_writes",
                Box::new(|c| c.max_inflight_writes = 0),
            ),
            (
                "heartbeat_interval",
                Box::new(|c| c.heartbeat_interval = Duration::ZERO),
            ),
            (
                "election_timeout",
                Box::new(|c| c.election_timeout = Duration::from_micros(1500)),
            ),
            (
                "probe_interval",
                Box::new(|c| c.probe_interval = Duration::from_secs(1)),
            ),
        ];
        for (field, change) in cases {
            let mut c = base.clone();
            change(&mut c);
            let e = c.validate().expect_err(field);
            assert_eq!(e.field, field, "{e}");
            assert!(e.to_string().contains(field));
        }
    }
}
