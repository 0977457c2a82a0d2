//! The replica: one node's consensus state machine.
//!
//! A [`Replica`] is driven entirely from outside. Its inputs are calls:
//! [`propose`](Replica::propose), [`poll`](Replica::poll) (look at the local
//! region and the timers), [`handle_event`](Replica::handle_event) (a
//! transport completion or connection change) and
//! [`handle_synced`](Replica::handle_synced) (the runtime made appends
//! durable). Its outputs are queued [`Action`]s (remote operations to post,
//! grant changes, syncs), [`Event`]s (role changes, commits), the committed
//! entries ([`next_committed`](Replica::next_committed)) and the time it next
//! wants to be polled ([`next_timeout`](Replica::next_timeout)). It never
//! blocks, sleeps, spawns a thread or reads a clock.
//!
//! # Contract with the runtime
//!
//! * Every action is carried out, in order, before the next call to `poll`.
//!   In particular a [`Action::SetLogWriter`] has taken effect by then: this
//!   is what lets a replica drain everything the old writer managed to land
//!   before it votes or accepts a new leader.
//! * The store's hard state is durable before `save_hard_state` returns.
//! * After a batch of [`handle_event`](Replica::handle_event) calls comes a
//!   `poll`: what the events lead to (acks, syncs, [`Event`]s) is emitted
//!   once, there, and not once per transport completion.
//!
//! # The protocol in one page
//!
//! Raft's safety rules, carried by one-sided memory operations instead of
//! messages:
//!
//! * **Replication.** The leader encodes each proposal into its own ring at
//!   the next position and, once per poll, writes every new byte range
//!   straight from its ring to the same offsets in each follower's ring
//!   (pipelined, up to `max_inflight_writes` per follower). Followers poll
//!   their ring at the position they expect next and accept an entry only if
//!   its checksum, seal, position, index, previous term *and writer term*
//!   (`leader_term`) are exactly what they expect.
//! * **Commit.** In `memory` mode a follower counts as holding a range once
//!   the leader's write of it completes; in `durable` mode once its ack
//!   record says the range is persisted. The leader commits the highest index
//!   of its own term held by a majority (itself included), and followers
//!   learn the commit index from each entry and from the leader record's
//!   heartbeats. A commit does not rewrite the leader record: under load the
//!   next entries carry it, and an idle follower learns it within one
//!   heartbeat interval.
//! * **Election.** A follower that sees no heartbeat for its randomised
//!   timeout becomes a candidate and writes vote requests into every peer's
//!   control block; voters grant at most one vote per term, saved before they
//!   answer, and only to candidates whose log is at least as up to date.
//! * **Fencing.** A replica grants its ring's write right to one peer, the
//!   leader of its term. On any term change it revokes the grant first, then
//!   (in the next poll, when the revocation has taken effect) drains what the
//!   old leader managed to land, and only then votes or follows the new
//!   leader. A write from a deposed leader either landed before the
//!   revocation (and is then in the replica's log before it votes, exactly
//!   as if it had arrived before the term change) or fails. Bytes of an old
//!   leader that linger in a ring are never accepted: their writer term is
//!   not the current source's.
//! * **Reconciliation.** A new leader reads each follower's status record,
//!   finds the index up to which their logs provably agree (the follower's
//!   last entry if the leader has it with the same term, else the follower's
//!   commit index), and writes a sync record naming it. From there it streams
//!   its log; the follower skips entries it already has with the same term
//!   and truncates at the first conflict, so a committed entry is never cut.
//! * **Catch-up.** Entries the leader no longer holds in its ring, or that
//!   were written under an older term, are re-read from the store,
//!   re-stamped with the leader's term and sent from a scratch chunk.

mod election;
mod follower;
mod inbound;
mod leader;
pub(crate) mod ops;
mod outbox;

use std::collections::VecDeque;

use crate::config::{ConfigError, Durability, ReplicaConfig};
use crate::entry::{self, EntryError, EntryKind};
use crate::layout::{RegionLayout, SLOT_LEN, SlotKind};
use crate::record::{LeaderRecord, Record, StatusRecord, VoteResponse};
use crate::region::Region;
use crate::rng::Rng;
use crate::store::{HardState, LogStore, StoreError};
use crate::transport::{OpId, RemoteOp, TransportEvent};
use crate::types::{Index, MAX_REPLICAS, NodeId, Pos, Role, Term, Time};

use election::PreVote;
use inbound::InboundSlots;
use leader::LeaderState;
use ops::Purpose;
use outbox::Outbox;

/// A poll later than an election timeout / this after it was due is an
/// engine stall (see `Replica::note_stall`).
const STALL_FRACTION: u32 = 2;
const _: () = assert!(
    STALL_FRACTION >= 2,
    "a stall is shorter than the timeout it excuses"
);
/// A follower whose connection to its leader broke stands within an
/// election timeout / this (see `Replica::leader_connection_lost`).
const LEADER_LOST_SPREAD: u64 = 2;
const _: () = assert!(
    LEADER_LOST_SPREAD >= 2,
    "sooner than a silent leader's timeout"
);

/// Something the runtime must do for the replica, in order.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Action {
    /// Post this operation on the transport.
    Post(RemoteOp),
    /// Grant the log write right to this peer alone (or to nobody).
    SetLogWriter(Option<NodeId>),
    /// Make every entry appended to the store so far durable, then call
    /// [`Replica::handle_synced`] with `token`.
    Sync {
        /// Echo this back.
        token: u64,
    },
}

/// Something that happened, for the runtime and the application.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Event {
    /// The replica's role, term or known leader changed.
    RoleChanged {
        /// New role.
        role: Role,
        /// Current term.
        term: Term,
        /// The leader of that term, when known.
        leader: Option<NodeId>,
    },
    /// The commit index advanced to `index`.
    Committed {
        /// New commit index.
        index: Index,
    },
    /// The set of voters known to have lost their logs changed (see
    /// [`Replica::voters_lost`]; 0: none, or no longer too many).
    VotersLost {
        /// Bit per node.
        voters: u32,
    },
}

/// An accepted proposal: where it will be committed, if it is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Proposal {
    /// Its log index.
    pub index: Index,
    /// The term it was proposed in. The proposal is committed when the commit
    /// index reaches `index` and [`Replica::term_at`] still says this term;
    /// if another entry ends up at `index`, it was lost in a leader change.
    pub term: Term,
}

/// Why a proposal was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// Only the leader takes proposals.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader, when known.
        leader: Option<NodeId>,
    },
    /// The payload exceeds `max_payload`.
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Payload size.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The ring is full of entries not yet committed or still being sent:
    /// retry after the next poll.
    #[error("replication window full; retry after progress")]
    Backpressure,
    /// The store failed: the replica must stop.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A failure that stops the replica.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The region is smaller than the layout needs.
    #[error("region of {have} bytes is smaller than the {need} the layout needs")]
    RegionTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes provided.
        have: usize,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The transport broke its contract: `peer`'s completions must arrive
    /// in posting order. Acting on one out of order could count an entry
    /// as held that is not, so the replica stops instead.
    #[error("the transport completed operation {op:#x} to {peer} out of posting order")]
    CompletionOutOfOrder {
        /// The operation completed early.
        op: u64,
        /// Its peer.
        peer: NodeId,
    },
}

/// A committed entry, borrowed from the replica until the next call.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct CommittedEntry<'a> {
    /// Log index.
    pub index: Index,
    /// Term in which it was proposed.
    pub term: Term,
    /// What it records.
    pub kind: EntryKind,
    /// Connection id.
    pub conn: u64,
    /// The proposed bytes.
    pub payload: &'a [u8],
}

/// The leader whose stream a replica currently accepts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Source {
    pub peer: NodeId,
    pub term: Term,
    pub sync_seq: u64,
}

/// A recovering replica's target: it lost its log in a restart (memory mode)
/// and may vote again only once its log reaches this index.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Recovery {
    /// No leader has synchronised it yet.
    AwaitingSync,
    /// Caught up once the log reaches this index.
    Until(Index),
    /// An operator accepted that what it lost is lost
    /// ([`Replica::accept_data_loss`]): it votes, but does not stand for
    /// election until a leader has synchronised it, so that a replica that
    /// kept its log wins rather than one that lost it.
    Waived,
}

/// Diagnostics counters (monotonic).
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct Counters {
    /// Entries accepted from a leader's stream.
    pub entries_accepted: u64,
    /// Ring reads that found a torn or corrupt entry at the expected place.
    pub torn_reads: u64,
    /// Entries removed by conflict truncation.
    pub entries_truncated: u64,
    /// Well-formed entries refused because they do not chain onto the log
    /// (their previous term differs): never happens with a correct leader.
    pub chain_breaks: u64,
    /// Replication writes posted (stream and catch-up).
    pub replication_writes: u64,
    /// Catch-up writes posted.
    pub catchup_writes: u64,
    /// Elections started.
    pub elections: u64,
    /// Pre-votes started (an election follows only when one wins).
    pub pre_votes: u64,
    /// Polls that came half an election timeout or more after they were
    /// due: the engine did not run (see `Replica::note_stall`).
    pub stalls: u64,
    /// Writes that failed (peer unreachable or access denied).
    pub failed_ops: u64,
    /// Inbound control slots copied and checked because they had changed
    /// since the last look (an unchanged slot costs a comparison only).
    pub slot_decodes: u64,
}

/// One node's consensus engine. See the [module docs](self).
#[derive(Debug)]
pub struct Replica<S: LogStore> {
    cfg: ReplicaConfig,
    layout: RegionLayout,
    region: Region,
    inbound: InboundSlots,
    store: S,
    rng: Rng,
    majority: usize,
    now: Time,

    // Hard state (mirrors the store).
    term: Term,
    voted_for: Option<NodeId>,

    role: Role,
    leader: Option<NodeId>,
    writer: Option<NodeId>,
    /// The latest term in which `writer` holds the grant (it is renewed
    /// when the same writer leads a later term).
    writer_term: Term,
    /// Per node, the term of its grant that the last poll revoked: what it
    /// landed before the revocation is drained next poll. One per node, as
    /// one poll can move the grant more than once.
    revoked: [Option<Term>; MAX_REPLICAS],
    settling: bool,
    recovery: Option<Recovery>,
    /// See [`Replica::voters_lost`].
    voters_lost: u32,

    // The log.
    last_index: Index,
    last_term: Term,
    last_end: Pos,
    commit: Index,
    applied: Index,
    persisted: Index,
    sync_inflight: Option<(u64, Index)>,
    next_sync_token: u64,

    // Receiving a leader's stream.
    source: Option<Source>,
    verified: Index,
    expect_index: Index,
    expect_pos: Pos,
    rejected_sync: u64,
    leader_seq: u64,
    /// When the leader of our term last showed signs of life (`None`: it is
    /// not counted on, as after its connection broke).
    leader_contact: Option<Time>,
    election_deadline: Time,
    /// When the runtime was asked to poll again at the latest (the last
    /// poll's [`next_timeout`](Self::next_timeout)).
    poll_due: Time,
    next_tick: Time,
    ack_dirty: bool,
    ack_seq: u64,
    status_dirty: bool,

    // Elections.
    votes: u32,
    vote_requests_pending: bool,
    answered_vote: [Term; MAX_REPLICAS],
    /// The pre-vote we run before standing (see `election.rs`).
    pre_vote: Option<PreVote>,
    /// What we last answered a candidate's pre-vote, until it asks for
    /// a real vote (one response slot carries both).
    pre_vote_answer: [Option<VoteResponse>; MAX_REPLICAS],

    // Peers.
    peer_up: [bool; MAX_REPLICAS],
    outbox: Outbox,
    lead: Option<LeaderState>,

    actions: VecDeque<Action>,
    events: VecDeque<Event>,
    op_seq: u64,
    entry_buf: Vec<u8>,
    apply_buf: Vec<u8>,
    counters: Counters,
    last_role_event: Option<(Role, Term, Option<NodeId>)>,
    last_commit_event: Index,
}

impl<S: LogStore> Replica<S> {
    /// Starts (or restarts) a replica over `region` and `store`.
    ///
    /// A replica restarted in `memory` mode after it had taken part in an
    /// election (its saved term is not 0) has lost its log: it recovers,
    /// neither voting nor campaigning until a leader has caught it up.
    pub fn new(
        cfg: ReplicaConfig,
        region: Region,
        store: S,
        now: Time,
    ) -> Result<Replica<S>, ReplicaError> {
        let layout = cfg.validate()?;
        if region.len() < layout.region_len() {
            return Err(ReplicaError::RegionTooSmall {
                need: layout.region_len(),
                have: region.len(),
            });
        }
        let hs = store.hard_state();
        let last_index = store.last_index();
        let (last_term, last_end) = match store.meta(last_index) {
            Some(m) => (m.term, m.end_pos()),
            None => (0, 0),
        };
        // A lone replica has nobody to recover from: its lost log is lost.
        let recovery = (cfg.durability == Durability::Memory
            && cfg.replicas > 1
            && hs.term > 0
            && last_index == 0)
            .then_some(Recovery::AwaitingSync);
        let seed = cfg.seed ^ (u64::from(cfg.id.0) << 56) ^ hs.term.rotate_left(17);
        let max_entry = entry::encoded_len(cfg.max_payload);
        let mut r = Replica {
            majority: cfg.replicas / 2 + 1,
            rng: Rng::new(seed),
            inbound: InboundSlots::new(&layout, cfg.replicas),
            layout,
            region,
            store,
            now,
            term: hs.term,
            voted_for: hs.voted_for,
            role: Role::Follower,
            leader: None,
            writer: None,
            writer_term: 0,
            revoked: [None; MAX_REPLICAS],
            settling: false,
            recovery,
            voters_lost: 0,
            last_index,
            last_term,
            last_end,
            commit: 0,
            applied: 0,
            persisted: last_index,
            sync_inflight: None,
            next_sync_token: 1,
            source: None,
            verified: 0,
            expect_index: last_index + 1,
            expect_pos: last_end,
            rejected_sync: 0,
            leader_seq: 0,
            leader_contact: None,
            election_deadline: now,
            poll_due: now,
            next_tick: now,
            ack_dirty: false,
            ack_seq: 0,
            status_dirty: true,
            votes: 0,
            vote_requests_pending: false,
            answered_vote: [0; MAX_REPLICAS],
            pre_vote: None,
            pre_vote_answer: [None; MAX_REPLICAS],
            peer_up: [true; MAX_REPLICAS],
            outbox: Outbox::new(),
            lead: None,
            actions: VecDeque::with_capacity(64),
            events: VecDeque::with_capacity(16),
            op_seq: 0,
            entry_buf: Vec::with_capacity(max_entry),
            apply_buf: Vec::with_capacity(max_entry),
            counters: Counters::default(),
            last_role_event: None,
            last_commit_event: 0,
            cfg,
        };
        r.write_region_header();
        r.reset_election_timer();
        r.next_tick = now + r.cfg.heartbeat_interval;
        r.publish_status();
        // The transport starts with nobody granted; say so explicitly.
        r.actions.push_back(Action::SetLogWriter(None));
        r.note_role();
        if r.cfg.replicas == 1 && r.recovery.is_none() {
            r.start_election()?;
        }
        Ok(r)
    }

    // ----------------------------------------------------------------- queries

    /// This replica's id.
    pub fn id(&self) -> NodeId {
        self.cfg.id
    }
    /// Current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Current term.
    pub fn term(&self) -> Term {
        self.term
    }
    /// The leader of the current term, when known.
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }
    /// Highest index known committed.
    pub fn commit_index(&self) -> Index {
        self.commit
    }
    /// Highest index handed out by [`next_committed`](Self::next_committed).
    pub fn applied_index(&self) -> Index {
        self.applied
    }
    /// Last index in the log.
    pub fn last_index(&self) -> Index {
        self.last_index
    }
    /// The term of entry `index`, if the log holds it.
    pub fn term_at(&self, index: Index) -> Option<Term> {
        if index == 0 {
            return Some(0);
        }
        self.store.meta(index).map(|m| m.term)
    }
    /// Whether the replica lost its log in a restart and is catching up:
    /// it neither votes nor stands for election.
    pub fn is_recovering(&self) -> bool {
        matches!(
            self.recovery,
            Some(Recovery::AwaitingSync | Recovery::Until(_))
        )
    }
    /// The voters whose pre-vote answers say they lost their logs, when
    /// they are too many for the rest to form a majority (bit per node):
    /// the cluster lost a majority's memory and elects nobody until an
    /// operator accepts the loss ([`accept_data_loss`](Self::accept_data_loss)).
    /// 0 otherwise.
    pub fn voters_lost(&self) -> u32 {
        self.voters_lost
    }
    /// The peer currently granted the right to write this replica's ring.
    pub fn log_writer(&self) -> Option<NodeId> {
        self.writer
    }
    /// The configuration.
    pub fn config(&self) -> &ReplicaConfig {
        &self.cfg
    }
    /// The region layout.
    pub fn layout(&self) -> &RegionLayout {
        &self.layout
    }
    /// The region.
    pub fn region(&self) -> &Region {
        &self.region
    }
    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }
    /// Stops the replica, handing back its region and store.
    pub fn into_parts(self) -> (Region, S) {
        (self.region, self.store)
    }
    /// Mutable access to the store, for the simulator's bookkeeping only:
    /// changing the log behind the engine's back breaks it.
    #[cfg(any(test, feature = "sim"))]
    #[doc(hidden)]
    pub fn store_mut_for_sim(&mut self) -> &mut S {
        &mut self.store
    }
    /// Diagnostics counters.
    pub fn counters(&self) -> Counters {
        Counters {
            slot_decodes: self.inbound.decodes(),
            ..self.counters
        }
    }
    /// The next queued action.
    pub fn next_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }
    /// The next queued event.
    pub fn next_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
    /// When the replica next needs [`poll`](Self::poll) even if nothing
    /// arrives.
    pub fn next_timeout(&self) -> Time {
        if self.settling || self.vote_requests_pending {
            return self.now;
        }
        let mut t = self.next_tick;
        match &self.lead {
            Some(lead) if self.role == Role::Leader => {
                t = t.min(lead.next_timeout(&self.peer_up));
            }
            _ => t = t.min(self.election_deadline),
        }
        t
    }

    // ------------------------------------------------------------------ inputs

    /// Looks at the local region and the timers, and reacts.
    pub fn poll(&mut self, now: Time) -> Result<(), ReplicaError> {
        self.now = self.now.max(now);
        self.note_stall();
        // Everything emitted by the previous call has been carried out,
        // grant changes included: what the old writer landed is final now.
        if self.settling {
            self.settling = false;
            self.status_dirty = true;
        }
        if self.role != Role::Leader {
            self.receive()?;
        }
        self.read_leader_records()?;
        // While our leader is alive we grant no vote (leader stickiness,
        // Raft thesis 9.6, covers higher terms; a rival of the same term is
        // refused by silence): the vote slots are not even looked at.
        if !self.leader_is_alive() {
            self.read_vote_requests()?;
        }
        match self.role {
            Role::Candidate => self.read_vote_responses()?,
            Role::Leader => self.read_acks()?,
            Role::Follower if self.pre_vote.is_some() => self.read_vote_responses()?,
            Role::Follower => {}
        }
        self.note_voters_lost();
        self.tick()?;
        if self.role == Role::Leader {
            self.replicate()?;
        }
        self.finish_poll();
        self.poll_due = self.next_timeout();
        debug_assert!(self.poll_due >= self.now || self.settling || self.vote_requests_pending);
        Ok(())
    }

    /// A poll much later than it was due means this engine did not run
    /// (descheduled, stopped, a long pass elsewhere): what peers sent
    /// meanwhile may still wait in the transport, so for a heartbeat
    /// interval (a few polls that take it in) nobody is blamed for a
    /// silence that was ours. A runtime that sleeps until
    /// [`next_timeout`](Self::next_timeout) is never late by this much.
    fn note_stall(&mut self) {
        let late = self.now.saturating_since(self.poll_due);
        if late < self.cfg.election_timeout / STALL_FRACTION {
            return;
        }
        self.counters.stalls += 1;
        let grace = self.now + self.cfg.heartbeat_interval;
        self.election_deadline = self.election_deadline.max(grace);
        if let Some(lead) = &mut self.lead {
            lead.defer_quorum_check(grace);
        }
        debug_assert!(
            self.election_deadline > self.now,
            "the grace is in the future"
        );
    }

    /// Takes a transport event. Call [`poll`](Self::poll) after a batch of
    /// them: the acks, syncs and [`Event`]s they lead to are emitted there.
    pub fn handle_event(&mut self, event: TransportEvent, now: Time) -> Result<(), ReplicaError> {
        self.now = self.now.max(now);
        match event {
            TransportEvent::PeerUp(p) if p.index() < self.cfg.replicas => {
                self.peer_up[p.index()] = true;
                // It may have restarted with a fresh region: an answer we
                // sent it before is gone, and an unchanged one is never
                // sent again (sim seed 2497: a restarted candidate waited
                // forever for a yes it had been given in its earlier life).
                self.pre_vote_answer[p.index()] = None;
                self.resend_dirty(p);
                if let Some(lead) = &mut self.lead {
                    lead.peer_up(p, self.now);
                }
            }
            TransportEvent::PeerDown(p) if p.index() < self.cfg.replicas => {
                self.peer_up[p.index()] = false;
                if let Some(lead) = &mut self.lead {
                    lead.peer_down(p, self.now);
                }
                if self.role == Role::Follower && self.leader == Some(p) {
                    self.leader_connection_lost();
                }
            }
            TransportEvent::Completed(c) => self.complete(c.op, c.peer, c.result)?,
            _ => {}
        }
        // What the event leads to (an ack, a sync, the events) is emitted
        // once by the poll that follows the batch, not once per completion.
        Ok(())
    }

    /// The runtime made everything appended before the `Sync` with this
    /// token durable.
    pub fn handle_synced(&mut self, token: u64, now: Time) {
        self.now = self.now.max(now);
        if let Some((t, through)) = self.sync_inflight
            && t == token
        {
            self.sync_inflight = None;
            self.persisted = self.persisted.max(through).min(self.last_index);
            self.ack_dirty = true;
            if self.role == Role::Leader {
                self.advance_commit();
            }
        }
        self.finish_poll();
    }

    /// The operator's answer to a cluster that lost a majority's memory
    /// ([`voters_lost`](Self::voters_lost), `apus recover
    /// --accept-data-loss`): this recovering replica stops waiting for a
    /// leader that holds everything it acknowledged, since none may be left.
    /// With `stand`, it may also stand for election (for the replica with
    /// the best log when every replica lost its own); without, it only
    /// votes, so that a replica that kept its log is elected. Entries
    /// committed only on replicas that lost them are gone. Returns whether
    /// the replica was recovering.
    pub fn accept_data_loss(&mut self, stand: bool, now: Time) -> bool {
        self.now = self.now.max(now);
        let waived = self.recovery == Some(Recovery::Waived);
        if !(self.is_recovering() || stand && waived) {
            return false;
        }
        self.recovery = if stand { None } else { Some(Recovery::Waived) };
        assert!(!self.is_recovering(), "the gate is lifted");
        self.status_dirty = true;
        self.reset_election_timer();
        self.finish_poll();
        true
    }

    /// This replica's storage replaced one the cluster knew (its data
    /// directory was wiped or swapped: a peer remembers an earlier
    /// incarnation of it), so it may no longer hold what it acknowledged:
    /// it neither votes nor stands until a leader has synchronised it and it
    /// holds that leader's log, as a memory-mode replica that lost its log.
    /// A synchronisation it already took is asked for again, so the target
    /// is the leader's log as of now. Returns whether this changed anything.
    pub fn rejoin(&mut self, now: Time) -> bool {
        self.now = self.now.max(now);
        if self.is_recovering() || self.cfg.replicas == 1 {
            return false;
        }
        #[cfg(any(test, feature = "sim"))]
        if self.bug(crate::config::PlantedBug::NoRejoin) {
            return false;
        }
        if self.role != Role::Follower {
            // Elected (or standing) before it knew: what it holds may lack
            // committed entries, so it must not lead.
            self.become_follower(None);
        }
        self.recovery = Some(Recovery::AwaitingSync);
        if let Some(src) = self.source {
            self.rejected_sync = src.sync_seq;
            self.ack_dirty = true;
        }
        self.pre_vote = None;
        self.status_dirty = true;
        assert!(self.is_recovering() && self.role == Role::Follower);
        self.finish_poll();
        true
    }

    /// Proposes an entry. Only the leader accepts; the entry is replicated by
    /// the next [`poll`](Self::poll), batched with every other proposal made
    /// since the last one.
    pub fn propose(
        &mut self,
        kind: EntryKind,
        conn: u64,
        payload: &[u8],
    ) -> Result<Proposal, ProposeError> {
        if self.role != Role::Leader {
            return Err(ProposeError::NotLeader {
                leader: self.leader,
            });
        }
        if payload.len() > self.cfg.max_payload {
            return Err(ProposeError::TooLarge {
                len: payload.len(),
                max: self.cfg.max_payload,
            });
        }
        self.append_own(kind, conn, payload)
    }

    /// The next committed entry not yet handed out, in log order.
    pub fn next_committed(&mut self) -> Result<Option<CommittedEntry<'_>>, ReplicaError> {
        if self.applied >= self.commit {
            return Ok(None);
        }
        let index = self.applied + 1;
        self.store.read(index, &mut self.apply_buf)?;
        let (h, _) = entry::decode(&self.apply_buf, self.cfg.max_payload)
            .map_err(|source| StoreError::Corrupt { index, source })?;
        if h.index != index {
            return Err(StoreError::Corrupt {
                index,
                source: EntryError::Unexpected("stored entry has another index"),
            }
            .into());
        }
        self.applied = index;
        let start = entry::HEADER_LEN;
        Ok(Some(CommittedEntry {
            index,
            term: h.term,
            kind: h.kind,
            conn: h.conn,
            payload: &self.apply_buf[start..start + h.payload_len as usize],
        }))
    }

    // --------------------------------------------------------------- internals

    fn next_op(&mut self, purpose: Purpose, peer: NodeId) -> OpId {
        self.op_seq += 1;
        ops::make(self.op_seq, purpose, peer)
    }

    fn peers(&self) -> impl Iterator<Item = NodeId> + use<S> {
        let me = self.cfg.id;
        (0..self.cfg.replicas as u8)
            .map(NodeId)
            .filter(move |&p| p != me)
    }

    #[cfg(any(test, feature = "sim"))]
    fn bug(&self, bug: crate::config::PlantedBug) -> bool {
        self.cfg.planted_bug == Some(bug)
    }

    fn save_hard_state(&mut self) -> Result<(), ReplicaError> {
        self.store.save_hard_state(HardState {
            term: self.term,
            voted_for: self.voted_for,
        })?;
        self.status_dirty = true;
        Ok(())
    }

    /// Grants our ring to `writer` (revoking the previous writer's grant),
    /// or renews the same writer's grant for the current term.
    fn set_writer(&mut self, writer: Option<NodeId>) {
        debug_assert!(self.term >= self.writer_term, "terms only grow");
        if self.writer == writer {
            // The same writer leads a later term (we may have learned it
            // from its record alone): its grant is of this term now, and a
            // later revocation drains its record of this term.
            #[cfg(any(test, feature = "sim"))]
            if self.bug(crate::config::PlantedBug::StaleWriterTerm) {
                return;
            }
            self.writer_term = self.term;
            return;
        }
        if let Some(old) = self.writer {
            let slot = &mut self.revoked[old.index()];
            *slot = Some(slot.map_or(self.writer_term, |t| t.max(self.writer_term)));
        }
        self.writer = writer;
        self.writer_term = self.term;
        // A refusal was about the old writer's sync numbering.
        self.rejected_sync = 0;
        self.actions.push_back(Action::SetLogWriter(writer));
        self.settling = true;
        self.status_dirty = true;
    }

    /// The connection to our leader broke (its process died, its host or
    /// the link went down): stop counting on it now rather than after an
    /// election timeout of silence, and stand after a short random delay
    /// (spread so that two followers rarely stand at once). Only a hint:
    /// the pre-vote still needs a majority that hears no live leader
    /// either, so a leader that lost just its link to us keeps leading.
    fn leader_connection_lost(&mut self) {
        debug_assert_eq!(self.role, Role::Follower);
        // Not a time long past: an engine's clock starts at 0 when it does,
        // and one that lost its leader within its first election timeout
        // still counted on it (CI: this assertion, in a cluster test).
        self.leader_contact = None;
        let spread = self.cfg.election_timeout.as_nanos() as u64 / LEADER_LOST_SPREAD;
        let soon = Time(self.now.0 + self.rng.range(0, spread.max(1)));
        self.election_deadline = self.election_deadline.min(soon);
        debug_assert!(!self.leader_is_alive(), "not counted on any more");
    }

    fn reset_election_timer(&mut self) {
        let base = self.cfg.election_timeout.as_nanos() as u64;
        let jitter = self.rng.range(0, base);
        self.election_deadline = Time(self.now.0 + base + jitter);
    }

    /// Sends the record of `kind` to `peer`, or marks it to be sent as soon
    /// as the write in flight from the same staging slot completes.
    fn send_record(&mut self, kind: SlotKind, peer: NodeId) -> Option<OpId> {
        let slot = self.outbox.slot(peer.index(), kind);
        if slot.inflight.is_some() || !self.peer_up[peer.index()] {
            slot.dirty = true;
            return None;
        }
        slot.dirty = false;
        slot.writes += 1;
        let version = slot.writes;
        let copy = (version % kind.copies() as u64) as usize;
        #[cfg(any(test, feature = "sim"))]
        let copy = if self.bug(crate::config::PlantedBug::SingleBufferedLeaderRecord) {
            0
        } else {
            copy
        };
        let bytes = match kind {
            SlotKind::Leader => self.render_leader_record(peer, version).encode(),
            SlotKind::Ack => self.render_ack().encode(),
            SlotKind::VoteRequest => self.render_vote_request().encode(),
            SlotKind::VoteResponse => self.render_vote_response(peer).encode(),
        };
        let local = self.layout.staging(kind, peer);
        self.region.write(local, &bytes);
        let op = self.next_op(Purpose::Record(kind), peer);
        self.outbox.slot(peer.index(), kind).inflight = Some(op);
        self.actions.push_back(Action::Post(RemoteOp::Write {
            op,
            peer,
            local_offset: local,
            len: SLOT_LEN,
            remote_offset: self.layout.inbound_copy(kind, self.cfg.id, copy),
        }));
        if kind == SlotKind::Leader
            && let Some(lead) = &mut self.lead
        {
            lead.record_posted(peer, op);
        }
        Some(op)
    }

    fn resend_dirty(&mut self, peer: NodeId) {
        if !self.outbox.has_dirty(peer.index()) {
            return;
        }
        for kind in SlotKind::ALL {
            let slot = *self.outbox.slot(peer.index(), kind);
            if slot.dirty && slot.inflight.is_none() {
                self.send_record(kind, peer);
            }
        }
    }

    fn read_slot<R: Record>(&self, kind: SlotKind, writer: NodeId) -> Option<R> {
        debug_assert_eq!(kind.copies(), 1);
        self.inbound
            .read(&self.region, &self.layout, kind, writer, 0)
    }

    /// The current leader record from `writer`: of its two copies, the valid
    /// one with the higher `(term, version)`. A copy being rewritten may be
    /// torn; the other then holds the latest completed write.
    fn read_leader_record(&self, writer: NodeId) -> Option<LeaderRecord> {
        let mut best: Option<LeaderRecord> = None;
        for copy in 0..SlotKind::Leader.copies() {
            if let Some(r) = self.inbound.read::<LeaderRecord>(
                &self.region,
                &self.layout,
                SlotKind::Leader,
                writer,
                copy,
            ) && best.is_none_or(|b| (r.term, r.version) > (b.term, b.version))
            {
                best = Some(r);
            }
        }
        best
    }

    fn complete(
        &mut self,
        op: OpId,
        peer: NodeId,
        result: Result<(), crate::transport::OpError>,
    ) -> Result<(), ReplicaError> {
        let Some((purpose, p)) = ops::split(op) else {
            return Ok(());
        };
        if p != peer || p.index() >= self.cfg.replicas {
            return Ok(());
        }
        if result.is_err() {
            self.counters.failed_ops += 1;
        }
        match purpose {
            Purpose::Record(kind) => {
                let slot = self.outbox.slot(peer.index(), kind);
                if slot.inflight != Some(op) {
                    return Ok(());
                }
                slot.inflight = None;
                if result.is_err() {
                    // Retried on the next tick or when the peer comes back.
                    slot.dirty = true;
                }
                if kind == SlotKind::Leader
                    && let Some(lead) = &mut self.lead
                {
                    lead.record_completed(peer, op, result.is_ok(), self.now);
                }
                if result.is_ok() {
                    self.resend_dirty(peer);
                }
            }
            Purpose::Stream | Purpose::Catchup | Purpose::StatusRead => {
                if self.role == Role::Leader {
                    self.leader_completion(purpose, peer, op, result)?;
                }
            }
        }
        Ok(())
    }

    fn tick(&mut self) -> Result<(), ReplicaError> {
        if self.now >= self.next_tick {
            self.next_tick = self.now + self.cfg.heartbeat_interval;
            for p in self.peers() {
                self.resend_dirty(p);
            }
        }
        match self.role {
            Role::Leader => self.leader_tick()?,
            Role::Follower | Role::Candidate => {
                if self.now >= self.election_deadline {
                    if self.recovery.is_none() {
                        self.start_pre_vote()?;
                    } else {
                        self.reset_election_timer();
                    }
                }
            }
        }
        Ok(())
    }

    fn finish_poll(&mut self) {
        if self.ack_dirty
            && let Some(target) = self.leader.or(self.source.map(|s| s.peer))
            && target != self.cfg.id
        {
            self.ack_dirty = false;
            self.send_record(SlotKind::Ack, target);
        }
        self.request_sync();
        self.note_role();
        if self.commit > self.last_commit_event {
            self.last_commit_event = self.commit;
            // Consecutive commit events coalesce: the queue stays bounded by
            // the role changes between two drains, however late the runtime.
            match self.events.back_mut() {
                Some(Event::Committed { index }) => *index = self.commit,
                _ => self
                    .events
                    .push_back(Event::Committed { index: self.commit }),
            }
        }
        if self.status_dirty {
            self.publish_status();
        }
    }

    fn request_sync(&mut self) {
        if self.cfg.durability == Durability::Durable
            && self.sync_inflight.is_none()
            && self.persisted < self.last_index
        {
            let token = self.next_sync_token;
            self.next_sync_token += 1;
            self.sync_inflight = Some((token, self.last_index));
            self.actions.push_back(Action::Sync { token });
        }
    }

    fn note_role(&mut self) {
        let now = (self.role, self.term, self.leader);
        if self.last_role_event != Some(now) {
            self.last_role_event = Some(now);
            self.events.push_back(Event::RoleChanged {
                role: self.role,
                term: self.term,
                leader: self.leader,
            });
        }
    }

    fn publish_status(&mut self) {
        self.status_dirty = false;
        let st = StatusRecord {
            term: self.term,
            writer: self.writer,
            settling: self.settling,
            recovering: self.is_recovering(),
            last_index: self.last_index,
            last_term: self.last_term,
            commit: self.commit.min(self.last_index),
            next_pos: self.expect_pos,
            last_end_pos: self.last_end,
        };
        self.region.write(self.layout.status(), &st.encode());
    }

    fn write_region_header(&mut self) {
        let mut h = [0u8; 64];
        h[0..8].copy_from_slice(b"APUSRGN1");
        h[8] = crate::layout::LAYOUT_VERSION;
        h[9] = self.cfg.id.0;
        h[10] = self.cfg.replicas as u8;
        h[16..24].copy_from_slice(&(self.layout.ring_capacity() as u64).to_le_bytes());
        h[24..32].copy_from_slice(&(self.layout.catchup_chunk() as u64).to_le_bytes());
        h[32..40].copy_from_slice(&(self.cfg.max_payload as u64).to_le_bytes());
        h[40..48].copy_from_slice(&(self.layout.ring_offset() as u64).to_le_bytes());
        self.region.write(self.layout.header(), &h);
    }

    /// Truncates the log after `index` (a conflict with the source's log).
    fn truncate_after(&mut self, index: Index) -> Result<(), ReplicaError> {
        debug_assert!(index < self.last_index);
        assert!(
            index >= self.commit,
            "truncating committed entry {} (commit {})",
            index + 1,
            self.commit
        );
        self.counters.entries_truncated += self.last_index - index;
        self.store.truncate_after(index)?;
        self.last_index = index;
        let (term, end) = match self.store.meta(index) {
            Some(m) => (m.term, m.end_pos()),
            None => (0, 0),
        };
        self.last_term = term;
        self.last_end = end;
        self.persisted = self.persisted.min(index);
        if let Some((_, through)) = &mut self.sync_inflight {
            *through = (*through).min(index);
        }
        self.status_dirty = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;

    fn replica(replicas: usize, durability: Durability, store: MemStore) -> Replica<MemStore> {
        let mut cfg = ReplicaConfig::new(NodeId(0), replicas);
        cfg.durability = durability;
        let region = Region::new(cfg.validate().unwrap().region_len());
        Replica::new(cfg, region, store, Time(0)).unwrap()
    }

    #[test]
    fn memory_mode_restart_recovers_only_with_peers() {
        let hs = HardState {
            term: 3,
            voted_for: Some(NodeId(0)),
        };
        let lone = replica(1, Durability::Memory, MemStore::with_hard_state(hs));
        assert!(!lone.is_recovering());
        assert_eq!((lone.role(), lone.term()), (Role::Leader, 4));
        let member = replica(3, Durability::Memory, MemStore::with_hard_state(hs));
        assert!(member.is_recovering(), "lost its log: must not vote yet");
        let durable = replica(3, Durability::Durable, MemStore::with_hard_state(hs));
        assert!(!durable.is_recovering());
    }

    /// Regression (CI, `apus --test cluster`): a follower whose engine
    /// started less than an election timeout ago, and whose leader's
    /// connection then broke, still counted on that leader (its last
    /// contact was set to time 0, which its clock had barely passed).
    #[test]
    fn a_leader_whose_connection_broke_is_not_counted_on_even_early() {
        let mut r = replica(3, Durability::Memory, MemStore::new());
        let timeout = r.config().election_timeout.as_nanos() as u64;
        r.now = Time(timeout / 10);
        r.leader = Some(NodeId(1));
        r.leader_contact = Some(Time(timeout / 20));
        assert!(r.leader_is_alive());
        r.leader_connection_lost();
        assert!(!r.leader_is_alive());
        assert!(
            r.election_deadline.0 <= r.now.0 + timeout / LEADER_LOST_SPREAD,
            "stands within half an election timeout"
        );
    }

    #[test]
    fn proposals_are_refused_clearly() {
        let mut follower = replica(3, Durability::Memory, MemStore::new());
        assert!(matches!(
            follower.propose(EntryKind::Data, 0, b"x"),
            Err(ProposeError::NotLeader { leader: None })
        ));
        let mut leader = replica(1, Durability::Memory, MemStore::new());
        let max = leader.config().max_payload;
        assert!(matches!(
            leader.propose(EntryKind::Data, 0, &vec![0; max + 1]),
            Err(ProposeError::TooLarge { .. })
        ));
        assert!(leader.propose(EntryKind::Data, 0, &vec![0; max]).is_ok());
    }

    /// Grants `r`'s pre-vote and then its vote by hand: the responses of
    /// `voters` written into its slots, from `now` on.
    fn win_election(r: &mut Replica<MemStore>, voters: &[u8], now: Time) {
        let grant = |r: &mut Replica<MemStore>, term, pre| {
            for &p in voters {
                let resp = VoteResponse {
                    term,
                    granted: true,
                    pre,
                    recovering: false,
                };
                let at = r.layout().inbound(SlotKind::VoteResponse, NodeId(p));
                r.region.write(at, &resp.encode());
            }
        };
        // The timer fires (polled when asked): a pre-vote for the next
        // term, ours unchanged.
        let term = r.term();
        let mut now = now;
        r.poll(now).unwrap();
        while r.counters().pre_votes == 0 {
            now = r.next_timeout().max(Time(now.0 + 1));
            r.poll(now).unwrap();
        }
        assert_eq!(
            (r.role(), r.term()),
            (Role::Follower, term),
            "a pre-vote first"
        );
        grant(r, term + 1, true);
        r.poll(Time(now.0 + 1)).unwrap();
        assert_eq!((r.role(), r.term()), (Role::Candidate, term + 1));
        grant(r, term + 1, false);
        r.poll(Time(now.0 + 2)).unwrap();
        r.poll(Time(now.0 + 3)).unwrap();
        assert_eq!(r.role(), Role::Leader);
    }

    /// A runtime that polls when asked is never taken for stalled; one
    /// that comes back long after (the engine was descheduled) judges no
    /// silence until a heartbeat interval has let it read what arrived.
    #[test]
    fn a_stalled_engine_does_not_blame_its_peers_for_its_own_silence() {
        let mut prompt = replica(3, Durability::Memory, MemStore::new());
        let mut now = Time(1);
        while prompt.counters().pre_votes == 0 {
            prompt.poll(now).unwrap();
            assert!(prompt.next_timeout() > now);
            now = prompt.next_timeout();
        }
        assert_eq!(prompt.counters().stalls, 0, "a prompt runtime stalled");

        let mut late = replica(3, Durability::Memory, MemStore::new());
        late.poll(Time(1)).unwrap();
        let timeout = late.cfg.election_timeout;
        let back = Time(1) + timeout * 10;
        late.poll(back).unwrap();
        assert_eq!(late.counters().stalls, 1);
        assert_eq!(
            late.counters().pre_votes,
            0,
            "judged the silence of its own stall"
        );
        let after = back + late.cfg.heartbeat_interval;
        assert!(late.next_timeout() <= after);
        late.poll(after).unwrap();
        assert_eq!(late.counters().pre_votes, 1, "then the silence counts");
    }

    #[test]
    fn a_leader_applies_backpressure_at_one_ring_of_uncommitted_entries() {
        // A three-replica leader nobody acknowledges: proposals stop at one ring.
        let mut r = replica(3, Durability::Memory, MemStore::new());
        let cap = r.layout().ring_capacity();
        win_election(&mut r, &[1, 2], Time(100_000_000));
        let payload = vec![1u8; 1000];
        let mut accepted = 0usize;
        loop {
            match r.propose(EntryKind::Data, 0, &payload) {
                Ok(_) => accepted += 1,
                Err(ProposeError::Backpressure) => break,
                Err(e) => panic!("{e}"),
            }
        }
        let per_entry = entry::encoded_len(payload.len());
        assert!(
            accepted * per_entry <= cap && (accepted + 2) * per_entry > cap,
            "{accepted}"
        );
        assert_eq!(r.commit_index(), 0);
    }
}
