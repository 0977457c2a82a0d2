//! The invariants, checked after every step of the simulation.

use std::collections::{HashMap, HashSet};
use std::fmt;

use crate::entry::EntryKind;
use crate::types::{Index, Term};

use super::store::entry_digest;

/// Which invariant broke.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ViolationKind {
    /// Two replicas committed different entries at one index.
    Agreement,
    /// A committed entry was lost while a majority survived.
    Durability,
    /// A committed entry was never proposed, or committed twice.
    Validity,
    /// Two leaders in one term.
    ElectionSafety,
    /// No progress within the bound after the faults healed.
    Liveness,
    /// The engine panicked (an internal assertion failed).
    Panic,
    /// The engine returned an error.
    EngineError,
}

impl fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ViolationKind::Agreement => "agreement",
            ViolationKind::Durability => "durability",
            ViolationKind::Validity => "validity",
            ViolationKind::ElectionSafety => "election-safety",
            ViolationKind::Liveness => "liveness",
            ViolationKind::Panic => "panic",
            ViolationKind::EngineError => "engine-error",
        })
    }
}

/// A broken invariant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Which invariant.
    pub kind: ViolationKind,
    /// Simulated time, ns.
    pub at: u64,
    /// What exactly.
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at {:.3}ms: {}",
            self.kind,
            self.at as f64 / 1e6,
            self.detail
        )
    }
}

#[derive(Clone, Copy, Debug)]
struct Committed {
    term: Term,
    digest: u64,
    by: usize,
}

/// What has been proposed and committed so far, across all replicas.
#[derive(Debug, Default)]
pub struct Checker {
    committed: Vec<Option<Committed>>,
    index_of_id: HashMap<u64, Index>,
    proposed: HashSet<u64>,
    leaders: HashMap<Term, usize>,
    /// Per node: the highest index it has applied in its current life.
    pub applied: Vec<Index>,
    /// Per node: a running digest of its applied sequence.
    pub applied_digest: Vec<u64>,
}

impl Checker {
    /// A checker for `replicas` nodes.
    pub fn new(replicas: usize) -> Checker {
        Checker {
            committed: vec![None],
            applied: vec![0; replicas],
            applied_digest: vec![0; replicas],
            ..Checker::default()
        }
    }

    /// Records a client proposal.
    pub fn proposed(&mut self, id: u64) {
        self.proposed.insert(id);
    }

    /// Highest index any replica has committed.
    pub fn max_committed(&self) -> Index {
        (self.committed.len() - 1) as Index
    }

    /// How many client proposals committed.
    pub fn committed_proposals(&self) -> usize {
        self.index_of_id.len()
    }

    /// Index at which client proposal `id` committed, if it did.
    pub fn committed_index_of(&self, id: u64) -> Option<Index> {
        self.index_of_id.get(&id).copied()
    }

    /// The committed entry at `index`: term and digest.
    pub fn committed_at(&self, index: Index) -> Option<(Term, u64)> {
        self.committed
            .get(index as usize)
            .copied()
            .flatten()
            .map(|c| (c.term, c.digest))
    }

    /// A node restarted: its application starts again from index 1.
    pub fn restarted(&mut self, node: usize) {
        self.applied[node] = 0;
        self.applied_digest[node] = 0;
    }

    /// Node `node` applied (reported committed) entry `index`.
    pub fn applied(
        &mut self,
        now: u64,
        node: usize,
        index: Index,
        term: Term,
        kind: EntryKind,
        payload: &[u8],
    ) -> Result<(), Violation> {
        let v = |kind, detail| {
            Err(Violation {
                kind,
                at: now,
                detail,
            })
        };
        if index != self.applied[node] + 1 {
            return v(
                ViolationKind::Agreement,
                format!("n{node} applied index {index} after {}", self.applied[node]),
            );
        }
        self.applied[node] = index;
        let digest = entry_digest(term, payload);
        self.applied_digest[node] = self.applied_digest[node].rotate_left(5) ^ digest;
        let i = index as usize;
        if self.committed.len() <= i {
            self.committed.resize(i + 1, None);
        }
        match self.committed[i] {
            Some(c) if c.term != term || c.digest != digest => {
                return v(
                    ViolationKind::Agreement,
                    format!(
                        "index {index}: n{node} committed term {term} digest {digest:016x}, \
                         n{} committed term {} digest {:016x}",
                        c.by, c.term, c.digest
                    ),
                );
            }
            Some(_) => return Ok(()),
            None => {
                self.committed[i] = Some(Committed {
                    term,
                    digest,
                    by: node,
                })
            }
        }
        match kind {
            EntryKind::Noop => {
                if !payload.is_empty() {
                    return v(
                        ViolationKind::Validity,
                        format!("no-op at {index} has a payload"),
                    );
                }
            }
            _ => {
                let Some(id) = payload
                    .get(..8)
                    .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                else {
                    return v(
                        ViolationKind::Validity,
                        format!("entry {index} has no client id"),
                    );
                };
                if !self.proposed.contains(&id) {
                    return v(
                        ViolationKind::Validity,
                        format!("entry {index} carries id {id}, never proposed"),
                    );
                }
                if let Some(prev) = self.index_of_id.insert(id, index) {
                    return v(
                        ViolationKind::Validity,
                        format!("proposal {id} committed twice, at {prev} and {index}"),
                    );
                }
            }
        }
        Ok(())
    }

    /// Node `node` became leader of `term`.
    pub fn leader(&mut self, now: u64, node: usize, term: Term) -> Result<(), Violation> {
        match self.leaders.insert(term, node) {
            Some(other) if other != node => Err(Violation {
                kind: ViolationKind::ElectionSafety,
                at: now,
                detail: format!("n{other} and n{node} both led term {term}"),
            }),
            _ => Ok(()),
        }
    }

    /// Node `node` removed entry `(index, term)` from its log by truncation.
    pub fn truncated(
        &self,
        now: u64,
        node: usize,
        index: Index,
        term: Term,
        digest: u64,
    ) -> Result<(), Violation> {
        match self.committed_at(index) {
            Some((t, d)) if t == term && d == digest => Err(Violation {
                kind: ViolationKind::Durability,
                at: now,
                detail: format!("n{node} truncated committed entry {index} (term {term})"),
            }),
            _ => Ok(()),
        }
    }

    /// Every committed entry must still be held by a majority, counting
    /// replicas that are down or recovering (their loss is a tolerated
    /// failure) as holders. `holds(node, index, term, digest)` says whether a
    /// node's log (or its durable storage, if down) holds the entry.
    pub fn check_holders(
        &self,
        now: u64,
        replicas: usize,
        excused: usize,
        holds: impl Fn(usize, Index) -> Option<(Term, u64)>,
    ) -> Result<(), Violation> {
        let majority = replicas / 2 + 1;
        for (i, c) in self.committed.iter().enumerate().skip(1) {
            let Some(c) = c else { continue };
            let holders = (0..replicas)
                .filter(|&n| holds(n, i as Index) == Some((c.term, c.digest)))
                .count();
            if holders + excused < majority {
                return Err(Violation {
                    kind: ViolationKind::Durability,
                    at: now,
                    detail: format!(
                        "committed entry {i} (term {}) held by {holders} of {replicas} replicas \
                         ({excused} excused as down or recovering)",
                        c.term
                    ),
                });
            }
        }
        Ok(())
    }
}
