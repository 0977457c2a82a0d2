//! Identifiers, terms, log indices and the engine's notion of time.

use std::fmt;
use std::ops::{Add, Sub};
use std::time::Duration;

/// The largest cluster the region layout supports.
pub const MAX_REPLICAS: usize = 16;

/// A replica's id: its position in the cluster configuration, `0..replicas`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct NodeId(pub u8);

impl NodeId {
    /// The id as an array index.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

/// An election term. Term 0 means "before any election".
pub type Term = u64;

/// A log index. Index 0 is the empty prefix; the first entry is index 1.
pub type Index = u64;

/// An absolute byte position in the log ring's infinite stream. The region
/// offset of a position is `ring_offset + pos % ring_capacity`; positions only
/// grow, so a position also says which lap of the ring an entry belongs to.
pub type Pos = u64;

/// A point in time, in nanoseconds since an arbitrary epoch chosen by the
/// caller. The engine never reads a clock: every call that needs the time is
/// given one, which is what makes the simulator deterministic.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(pub u64);

impl Time {
    /// The time as nanoseconds since the caller's epoch.
    pub fn as_nanos(self) -> u64 {
        self.0
    }

    /// `self - earlier`, or zero when `earlier` is later.
    pub fn saturating_since(self, earlier: Time) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Time {
    type Output = Time;
    fn add(self, d: Duration) -> Time {
        Time(
            self.0
                .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        )
    }
}

impl Sub<Time> for Time {
    type Output = Duration;
    fn sub(self, earlier: Time) -> Duration {
        self.saturating_since(earlier)
    }
}

impl fmt::Debug for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:06}ms", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}

/// The role a replica plays in its current term.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    /// Accepts entries from the leader of its term.
    Follower,
    /// Asks for votes in its term.
    Candidate,
    /// Orders and replicates proposals in its term.
    Leader,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::Leader => "leader",
        })
    }
}
