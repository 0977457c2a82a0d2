//! The leader: appending, replicating, reconciling followers, committing.

use std::collections::VecDeque;

use super::ops::Purpose;
use super::{Proposal, ProposeError, Replica, ReplicaError};
use crate::config::Durability;
use crate::entry::{self, EntryHeader, EntryKind};
use crate::layout::{CATCHUP_SLOTS, SLOT_LEN, SlotKind};
use crate::record::{AckRecord, LeaderRecord, Record, StatusRecord};
use crate::store::{EntryMeta, LogStore, StoreError};
use crate::transport::{OpError, OpId, RemoteOp};
use crate::types::{Index, MAX_REPLICAS, NodeId, Pos, Role, Term, Time};

/// Where the leader stands with one follower.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Phase {
    /// Its status must be read before anything is sent.
    Probe,
    /// The sync record is on its way; entries wait until it has landed.
    Syncing,
    /// Entries stream.
    Replicate,
}

#[derive(Clone, Copy, Debug)]
struct Inflight {
    op: OpId,
    last_index: Index,
    /// Start of the source bytes in the leader's own ring (stream writes),
    /// which must not be overwritten until the write completes.
    ring_src: Option<Pos>,
}

#[derive(Debug)]
pub(super) struct Progress {
    phase: Phase,
    probe_read: Option<OpId>,
    probe_after: Time,
    sync_seq: u64,
    sync_index: Index,
    sync_term: Term,
    sync_pos: Pos,
    sync_write: Option<OpId>,
    next_index: Index,
    match_index: Index,
    /// The follower's free ring window starts here (its next expected position).
    window: Pos,
    inflight: VecDeque<Inflight>,
    /// Catch-up writes in flight, and the scratch chunk the next one uses.
    catchup_inflight: usize,
    catchup_slot: usize,
    last_ack_seq: u64,
    heard: bool,
}

impl Progress {
    fn new(now: Time, capacity: usize) -> Progress {
        Progress {
            phase: Phase::Probe,
            probe_read: None,
            probe_after: now,
            sync_seq: 0,
            sync_index: 0,
            sync_term: 0,
            sync_pos: 0,
            sync_write: None,
            next_index: 0,
            match_index: 0,
            window: 0,
            inflight: VecDeque::with_capacity(capacity),
            catchup_inflight: 0,
            catchup_slot: 0,
            last_ack_seq: 0,
            heard: false,
        }
    }

    fn restart_probe(&mut self, after: Time) {
        self.phase = Phase::Probe;
        self.probe_read = None;
        self.probe_after = after;
        self.sync_write = None;
        self.inflight.clear();
        self.catchup_inflight = 0;
        self.catchup_slot = 0;
    }
}

#[derive(Debug)]
pub(super) struct LeaderState {
    me: usize,
    peers: Vec<Progress>,
    heartbeat_seq: u64,
    next_heartbeat: Time,
    quorum_check_at: Time,
    /// Index of the first entry this leader wrote (its no-op).
    first_own_index: Index,
}

impl LeaderState {
    pub(super) fn next_timeout(&self, peer_up: &[bool]) -> Time {
        let mut t = self.next_heartbeat.min(self.quorum_check_at);
        for (i, (p, up)) in self.peers.iter().zip(peer_up).enumerate() {
            if i != self.me && *up && p.phase == Phase::Probe && p.probe_read.is_none() {
                t = t.min(p.probe_after);
            }
        }
        t
    }

    /// Judges the quorum no earlier than `at` (after an engine stall).
    pub(super) fn defer_quorum_check(&mut self, at: Time) {
        self.quorum_check_at = self.quorum_check_at.max(at);
    }

    pub(super) fn peer_up(&mut self, p: NodeId, now: Time) {
        let pr = &mut self.peers[p.index()];
        if pr.phase == Phase::Probe {
            pr.probe_after = pr.probe_after.min(now);
        }
    }

    pub(super) fn peer_down(&mut self, p: NodeId, now: Time) {
        self.peers[p.index()].restart_probe(now);
    }

    pub(super) fn record_posted(&mut self, p: NodeId, op: OpId) {
        let pr = &mut self.peers[p.index()];
        if pr.phase == Phase::Syncing && pr.sync_write.is_none() {
            pr.sync_write = Some(op);
        }
    }

    pub(super) fn record_completed(&mut self, p: NodeId, op: OpId, ok: bool, now: Time) {
        let pr = &mut self.peers[p.index()];
        if pr.phase == Phase::Syncing && pr.sync_write == Some(op) {
            if ok {
                // The sync has landed before anything we stream from now on.
                pr.phase = Phase::Replicate;
            } else {
                pr.restart_probe(now);
            }
        } else if !ok && pr.phase != Phase::Probe {
            pr.restart_probe(now);
        }
    }

    /// Lowest position of the leader's own ring still being read by a write.
    fn ring_in_use_from(&self) -> Option<Pos> {
        self.peers
            .iter()
            .filter_map(|p| p.inflight.iter().find_map(|f| f.ring_src))
            .min()
    }
}

impl<S: LogStore> Replica<S> {
    pub(super) fn become_leader(&mut self) -> Result<(), ReplicaError> {
        debug_assert_eq!(self.role, super::Role::Candidate);
        self.pre_vote = None;
        self.role = Role::Leader;
        self.leader = Some(self.cfg.id);
        self.source = None;
        self.vote_requests_pending = false;
        let cap = self.cfg.max_inflight_writes;
        let now = self.now;
        self.lead = Some(LeaderState {
            me: self.cfg.id.index(),
            peers: (0..self.cfg.replicas)
                .map(|_| Progress::new(now, cap))
                .collect(),
            heartbeat_seq: 0,
            next_heartbeat: now,
            quorum_check_at: now + self.cfg.election_timeout,
            first_own_index: self.last_index + 1,
        });
        self.status_dirty = true;
        // A no-op of our own term lets the entries of earlier terms commit.
        match self.append_own(EntryKind::Noop, 0, &[]) {
            Ok(_) => {}
            Err(ProposeError::Store(e)) => return Err(e.into()),
            Err(e) => unreachable!("a new leader's ring has room: {e}"),
        }
        self.advance_commit();
        Ok(())
    }

    /// Encodes an entry of our own term at the end of our ring and log.
    pub(super) fn append_own(
        &mut self,
        kind: EntryKind,
        conn: u64,
        payload: &[u8],
    ) -> Result<Proposal, ProposeError> {
        let lead = self.lead.as_ref().expect("leader state");
        let total = entry::encoded_len(payload.len());
        let mut pos = self.last_end;
        if self.layout.lap_remaining(pos) < total {
            pos = self.layout.next_lap(pos);
        }
        let end = pos + total as u64;
        let cap = self.layout.ring_capacity() as u64;
        // Never overwrite bytes a write in flight is still sending...
        if let Some(low) = lead.ring_in_use_from()
            && end > low + cap
        {
            return Err(ProposeError::Backpressure);
        }
        // ...and keep at most one ring's worth of our own uncommitted entries
        // (a new leader's commit index may lag far behind its log).
        let first_uncommitted = match self.store.meta((self.commit + 1).max(lead.first_own_index)) {
            Some(m) => m.pos,
            None => pos,
        };
        if end > first_uncommitted + cap {
            return Err(ProposeError::Backpressure);
        }
        let index = self.last_index + 1;
        let header = EntryHeader {
            kind,
            payload_len: 0,
            term: self.term,
            leader_term: self.term,
            index,
            pos,
            prev_term: self.last_term,
            commit: self.commit,
            conn,
        };
        self.entry_buf.resize(total, 0);
        entry::encode(&header, payload, &mut self.entry_buf);
        self.region.write(self.layout.ring_at(pos), &self.entry_buf);
        let meta = EntryMeta {
            term: self.term,
            pos,
            len: total as u32,
        };
        self.store.append(index, meta, &self.entry_buf)?;
        self.last_index = index;
        self.last_term = self.term;
        self.last_end = end;
        if self.cfg.durability == Durability::Memory {
            self.persisted = index;
        }
        self.status_dirty = true;
        Ok(Proposal {
            index,
            term: self.term,
        })
    }

    pub(super) fn render_leader_record(&self, peer: NodeId, version: u64) -> LeaderRecord {
        let lead = self.lead.as_ref();
        let (seq, pr) = match lead {
            Some(l) => (l.heartbeat_seq, Some(&l.peers[peer.index()])),
            None => (0, None),
        };
        let mut rec = LeaderRecord {
            term: self.term,
            seq,
            version,
            commit: self.commit,
            last_index: self.last_index,
            ..LeaderRecord::default()
        };
        if let Some(pr) = pr
            && pr.phase != Phase::Probe
        {
            rec.sync_seq = pr.sync_seq;
            rec.sync_index = pr.sync_index;
            rec.sync_term = pr.sync_term;
            rec.sync_pos = pr.sync_pos;
        }
        rec
    }

    /// Heartbeats and the quorum check.
    pub(super) fn leader_tick(&mut self) -> Result<(), ReplicaError> {
        let now = self.now;
        let lead = self.lead.as_mut().expect("leader state");
        if now >= lead.next_heartbeat {
            lead.heartbeat_seq += 1;
            lead.next_heartbeat = now + self.cfg.heartbeat_interval;
            for p in self.peers() {
                self.send_record(SlotKind::Leader, p);
            }
        }
        let lead = self.lead.as_mut().expect("leader state");
        if now >= lead.quorum_check_at {
            let me = self.cfg.id.index();
            let heard = lead
                .peers
                .iter()
                .enumerate()
                .filter(|(i, p)| *i == me || p.heard)
                .count();
            for p in &mut lead.peers {
                p.heard = false;
            }
            lead.quorum_check_at = now + self.cfg.election_timeout;
            if heard < self.majority {
                // Cut off from a majority: stop taking proposals that cannot
                // commit; a new leader will be elected on the other side.
                self.step_down();
            }
        }
        Ok(())
    }

    /// Reads every follower's ack record.
    pub(super) fn read_acks(&mut self) -> Result<(), ReplicaError> {
        for p in self.peers() {
            let Some(ack) = self.read_slot::<AckRecord>(SlotKind::Ack, p) else {
                continue;
            };
            if ack.current_term > self.term {
                self.adopt_term(ack.current_term, None)?;
                return Ok(());
            }
            let now = self.now;
            let term = self.term;
            let lead = self.lead.as_mut().expect("leader state");
            let pr = &mut lead.peers[p.index()];
            if ack.seq == pr.last_ack_seq {
                continue;
            }
            pr.last_ack_seq = ack.seq;
            if ack.current_term == term {
                pr.heard = true;
            }
            if pr.phase == Phase::Probe {
                continue;
            }
            // A refusal concerns the follower's current leader: us, if its
            // term is ours (it has no source in our term yet).
            if ack.current_term == term
                && ack.rejected_sync != 0
                && ack.rejected_sync == pr.sync_seq
            {
                pr.restart_probe(now);
                continue;
            }
            if ack.source_term != term {
                continue;
            }
            if ack.sync_seq == pr.sync_seq {
                pr.window = pr.window.max(ack.next_pos);
                pr.match_index = pr.match_index.max(ack.acked_index);
            }
        }
        self.advance_commit();
        Ok(())
    }

    /// Probes, streams and catches up every follower.
    pub(super) fn replicate(&mut self) -> Result<(), ReplicaError> {
        for p in self.peers() {
            if !self.peer_up[p.index()] {
                continue;
            }
            let lead = self.lead.as_mut().expect("leader state");
            let pr = &mut lead.peers[p.index()];
            match pr.phase {
                Phase::Probe => {
                    if pr.probe_read.is_none() && self.now >= pr.probe_after {
                        self.op_seq += 1;
                        let op = super::ops::make(self.op_seq, Purpose::StatusRead, p);
                        let pr = &mut self.lead.as_mut().expect("leader state").peers[p.index()];
                        pr.probe_read = Some(op);
                        self.actions.push_back(crate::Action::Post(RemoteOp::Read {
                            op,
                            peer: p,
                            remote_offset: self.layout.status(),
                            len: SLOT_LEN,
                            local_offset: self.layout.probe_landing(p),
                        }));
                    }
                }
                Phase::Syncing => {}
                Phase::Replicate => self.send_entries(p)?,
            }
        }
        Ok(())
    }

    /// Whether our own ring still holds entry `i` as we wrote it.
    fn ring_holds(&self, i: Index, meta: EntryMeta) -> bool {
        let lead = self.lead.as_ref().expect("leader state");
        i >= lead.first_own_index && meta.pos + self.layout.ring_capacity() as u64 >= self.last_end
    }

    fn send_entries(&mut self, p: NodeId) -> Result<(), ReplicaError> {
        let cap = self.layout.ring_capacity() as u64;
        loop {
            let lead = self.lead.as_ref().expect("leader state");
            let pr = &lead.peers[p.index()];
            if pr.inflight.len() >= self.cfg.max_inflight_writes || pr.next_index > self.last_index
            {
                return Ok(());
            }
            let first = pr.next_index;
            let window_end = pr.window + cap;
            let catchup_busy = pr.catchup_inflight >= CATCHUP_SLOTS;
            let slot = pr.catchup_slot;
            let first_meta = self.store.meta(first).expect("entry in log");
            if first_meta.end_pos() > window_end {
                return Ok(()); // the follower's ring is full: wait for its ack
            }
            if self.ring_holds(first, first_meta) {
                // Stream the longest contiguous run straight from our ring.
                let start = first_meta.pos;
                let mut end = first_meta.end_pos();
                let mut last = first;
                while last < self.last_index {
                    let m = self.store.meta(last + 1).expect("entry in log");
                    // One write covers one contiguous stretch of one lap.
                    if m.pos != end
                        || self.layout.lap_remaining(m.pos) == self.layout.ring_capacity()
                        || m.end_pos() > window_end
                    {
                        break;
                    }
                    end = m.end_pos();
                    last += 1;
                }
                self.op_seq += 1;
                let op = super::ops::make(self.op_seq, Purpose::Stream, p);
                let at = self.layout.ring_at(start);
                self.actions.push_back(crate::Action::Post(RemoteOp::Write {
                    op,
                    peer: p,
                    local_offset: at,
                    len: (end - start) as usize,
                    remote_offset: at,
                }));
                self.counters.replication_writes += 1;
                let pr = &mut self.lead.as_mut().expect("leader state").peers[p.index()];
                pr.inflight.push_back(Inflight {
                    op,
                    last_index: last,
                    ring_src: Some(start),
                });
                pr.next_index = last + 1;
            } else {
                if catchup_busy {
                    return Ok(());
                }
                let Some((last, start, len)) = self.fill_catchup(p, slot, first, window_end)?
                else {
                    return Ok(());
                };
                self.op_seq += 1;
                let op = super::ops::make(self.op_seq, Purpose::Catchup, p);
                self.actions.push_back(crate::Action::Post(RemoteOp::Write {
                    op,
                    peer: p,
                    local_offset: self.layout.scratch(p, slot),
                    len,
                    remote_offset: self.layout.ring_at(start),
                }));
                self.counters.replication_writes += 1;
                self.counters.catchup_writes += 1;
                let pr = &mut self.lead.as_mut().expect("leader state").peers[p.index()];
                pr.inflight.push_back(Inflight {
                    op,
                    last_index: last,
                    ring_src: None,
                });
                pr.catchup_inflight += 1;
                pr.catchup_slot = (slot + 1) % CATCHUP_SLOTS;
                pr.next_index = last + 1;
            }
        }
    }

    /// Re-encodes entries `first..` from the store under our term into the
    /// peer's scratch chunk `slot`. Returns the last index, start position
    /// and length.
    fn fill_catchup(
        &mut self,
        p: NodeId,
        slot: usize,
        first: Index,
        window_end: Pos,
    ) -> Result<Option<(Index, Pos, usize)>, ReplicaError> {
        let scratch = self.layout.scratch(p, slot);
        let chunk = self.layout.catchup_chunk();
        let mut used = 0usize;
        let mut start = 0;
        let mut end = 0;
        let mut i = first;
        while i <= self.last_index {
            let m = self.store.meta(i).expect("entry in log");
            let lap_start = self.layout.lap_remaining(m.pos) == self.layout.ring_capacity();
            if i > first && (m.pos != end || lap_start || self.ring_holds(i, m)) {
                break;
            }
            if m.end_pos() > window_end || used + m.len as usize > chunk {
                break;
            }
            self.store.read(i, &mut self.entry_buf)?;
            let (h, _) = entry::decode(&self.entry_buf, self.cfg.max_payload)
                .map_err(|source| StoreError::Corrupt { index: i, source })?;
            if h.index != i || h.pos != m.pos || h.term != m.term {
                return Err(StoreError::Corrupt {
                    index: i,
                    source: entry::EntryError::Unexpected("store index disagrees with entry"),
                }
                .into());
            }
            entry::rewrite_writer(&mut self.entry_buf, self.term, self.commit);
            self.region.write(scratch + used, &self.entry_buf);
            if i == first {
                start = m.pos;
            }
            used += m.len as usize;
            end = m.end_pos();
            i += 1;
        }
        Ok((i > first).then_some((i - 1, start, used)))
    }

    pub(super) fn leader_completion(
        &mut self,
        purpose: Purpose,
        p: NodeId,
        op: OpId,
        result: Result<(), OpError>,
    ) -> Result<(), ReplicaError> {
        let now = self.now;
        let retry = now + self.cfg.probe_interval;
        let lead = self.lead.as_mut().expect("leader state");
        let pr = &mut lead.peers[p.index()];
        match purpose {
            Purpose::StatusRead => {
                if pr.probe_read != Some(op) {
                    return Ok(());
                }
                pr.probe_read = None;
                pr.probe_after = retry;
                if result.is_ok() {
                    let mut buf = [0u8; SLOT_LEN];
                    self.region.read(self.layout.probe_landing(p), &mut buf);
                    if let Ok(st) = StatusRecord::decode(&buf) {
                        self.handle_status(p, st)?;
                    }
                }
            }
            Purpose::Stream | Purpose::Catchup => {
                let Some(front) = pr.inflight.front().copied() else {
                    return Ok(());
                };
                if front.op != op {
                    if pr.inflight.iter().any(|f| f.op == op) {
                        return Err(ReplicaError::CompletionOutOfOrder { op: op.0, peer: p });
                    }
                    // Not in this replication epoch (a reset dropped it).
                    return Ok(());
                }
                pr.inflight.pop_front();
                if purpose == Purpose::Catchup {
                    pr.catchup_inflight -= 1;
                }
                match result {
                    Ok(()) => {
                        if self.cfg.durability == Durability::Memory {
                            // The bytes are in the follower's memory, written
                            // under its grant to us: it will take them in
                            // before it can vote for anyone else.
                            pr.match_index = pr.match_index.max(front.last_index);
                            self.advance_commit();
                        }
                    }
                    Err(_) => pr.restart_probe(retry),
                }
            }
            Purpose::Record(_) => unreachable!("records complete in the outbox"),
        }
        Ok(())
    }

    /// A follower's status arrived: find where our logs agree and sync it.
    fn handle_status(&mut self, p: NodeId, st: StatusRecord) -> Result<(), ReplicaError> {
        if st.term > self.term {
            return self.adopt_term(st.term, None);
        }
        if st.term != self.term || st.writer != Some(self.cfg.id) || st.settling {
            return Ok(()); // not following us yet: look again after probe_interval
        }
        let agrees_at_last =
            st.last_index <= self.last_index && self.term_at(st.last_index) == Some(st.last_term);
        let m = if agrees_at_last {
            st.last_index
        } else {
            // Everything up to a follower's commit index is committed, and
            // so in our log too (min: a status is remote input).
            st.commit.min(self.last_index)
        };
        let (sync_term, sync_pos) = match self.store.meta(m) {
            Some(meta) => (meta.term, meta.end_pos()),
            None => (0, 0),
        };
        let lead = self.lead.as_mut().expect("leader state");
        let pr = &mut lead.peers[p.index()];
        pr.sync_seq += 1;
        pr.sync_index = m;
        pr.sync_term = sync_term;
        pr.sync_pos = sync_pos;
        pr.sync_write = None;
        pr.phase = Phase::Syncing;
        pr.next_index = m + 1;
        pr.window = sync_pos;
        pr.inflight.clear();
        pr.catchup_inflight = 0;
        pr.catchup_slot = 0;
        self.send_record(SlotKind::Leader, p);
        Ok(())
    }

    /// The leader's view of each follower (simulator diagnostics).
    #[cfg(any(test, feature = "sim"))]
    #[doc(hidden)]
    pub fn leader_summary(&self) -> String {
        let Some(lead) = &self.lead else {
            return String::new();
        };
        let mut s = String::new();
        for (i, p) in lead.peers.iter().enumerate() {
            if i == lead.me {
                continue;
            }
            s += &format!(
                " [n{i} {:?} next {} match {} window {} inflight {} catchup {} probe {:?}/{:?} up {}]",
                p.phase,
                p.next_index,
                p.match_index,
                p.window,
                p.inflight.len(),
                p.catchup_inflight,
                p.probe_read,
                p.probe_after,
                self.peer_up[i]
            );
        }
        s
    }

    /// Commits the highest index of our term that a majority holds.
    pub(super) fn advance_commit(&mut self) {
        let Some(lead) = &self.lead else { return };
        if self.role != Role::Leader {
            return;
        }
        let own = match self.cfg.durability {
            Durability::Memory => self.last_index,
            Durability::Durable => self.persisted,
        };
        let mut held = [0 as Index; MAX_REPLICAS];
        let n = self.cfg.replicas;
        for (i, slot) in held.iter_mut().enumerate().take(n) {
            *slot = if i == self.cfg.id.index() {
                own
            } else {
                lead.peers[i].match_index
            };
        }
        held[..n].sort_unstable_by(|a, b| b.cmp(a));
        #[allow(unused_mut)]
        let mut quorum = held[self.majority - 1];
        #[cfg(any(test, feature = "sim"))]
        if self.bug(crate::config::PlantedBug::CommitWithoutMajority) {
            quorum = own;
        }
        if quorum > self.commit && self.term_at(quorum) == Some(self.term) {
            self.commit = quorum;
            self.status_dirty = true;
            // No leader record rewrite per commit (a message to every
            // follower per round): the next entries and the next heartbeat
            // carry the commit index.
        }
    }
}
