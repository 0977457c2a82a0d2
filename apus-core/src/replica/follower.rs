//! The receiving side: leader records, sync commands and the ring.

use super::{Recovery, Replica, ReplicaError, Source};
use crate::config::Durability;
use crate::entry::{self, EntryHeader, TRAILER_LEN};
use crate::record::{AckRecord, LeaderRecord};
use crate::store::{EntryMeta, LogStore};
use crate::types::{NodeId, Pos, Role};

impl<S: LogStore> Replica<S> {
    /// Takes in what the current source (the leader whose stream this replica
    /// follows) has landed: its record first (a re-sync, the commit index),
    /// then every complete entry in the ring.
    pub(super) fn receive(&mut self) -> Result<(), ReplicaError> {
        // A writer we just revoked may have landed a sync (and entries behind
        // it, which it may already count) after we last read its record:
        // take that sync now, as if it had arrived before the term change.
        for w in self.peers() {
            let Some(t) = self.revoked[w.index()].take() else {
                continue;
            };
            #[cfg(any(test, feature = "sim"))]
            if self.bug(crate::config::PlantedBug::NoRevokedDrain) {
                continue;
            }
            if let Some(rec) = self.read_leader_record(w)
                && rec.term == t
                && self.sync_is_fresh(w, &rec)
                && self.sync_agrees(&rec)
            {
                self.apply_sync(w, &rec)?;
            }
        }
        debug_assert!(self.revoked.iter().all(Option::is_none));
        if let Some(src) = self.source
            && let Some(rec) = self.read_leader_record(src.peer)
            && rec.term == src.term
        {
            if rec.sync_seq > src.sync_seq
                && self.writer == Some(src.peer)
                && rec.sync_seq != self.rejected_sync
            {
                self.apply_sync(src.peer, &rec)?;
            }
            self.learn_commit(rec.commit);
        }
        while let Some(h) = self.next_ring_entry() {
            if !self.accept(h)? {
                break;
            }
        }
        Ok(())
    }

    /// Looks at every peer's leader record: adopts higher terms, learns who
    /// leads the current one, takes heartbeats and sync commands from it.
    pub(super) fn read_leader_records(&mut self) -> Result<(), ReplicaError> {
        for p in self.peers() {
            let Some(rec) = self.read_leader_record(p) else {
                continue;
            };
            if rec.term < self.term {
                continue;
            }
            if rec.term > self.term {
                self.adopt_term(rec.term, Some(p))?;
                continue;
            }
            match self.role {
                Role::Leader => {
                    // Election safety is broken: stop rather than spread it.
                    panic!("two leaders in term {}: {} and {p}", self.term, self.cfg.id);
                }
                Role::Candidate => {
                    self.become_follower(Some(p));
                }
                Role::Follower => {
                    if self.leader.is_none() {
                        self.leader = Some(p);
                        self.set_writer(Some(p));
                        self.pre_vote = None;
                        self.reset_election_timer();
                        continue;
                    }
                    assert_eq!(self.leader, Some(p), "two leaders in term {}", self.term);
                    self.follow(p, &rec)?;
                }
            }
        }
        Ok(())
    }

    /// A record from the leader of the current term.
    fn follow(&mut self, p: NodeId, rec: &LeaderRecord) -> Result<(), ReplicaError> {
        if rec.seq != self.leader_seq {
            self.leader_seq = rec.seq;
            self.leader_contact = Some(self.now);
            self.pre_vote = None;
            self.reset_election_timer();
            // Tell the leader it is still heard (it steps down otherwise).
            self.ack_dirty = true;
        }
        if self.settling || self.writer != Some(p) {
            return Ok(());
        }
        if self.sync_is_fresh(p, rec) {
            self.apply_sync(p, rec)?;
            // Entries the leader streamed right behind the sync may already
            // be in the ring.
            while let Some(h) = self.next_ring_entry() {
                if !self.accept(h)? {
                    break;
                }
            }
        }
        if self
            .source
            .is_some_and(|s| s.peer == p && s.term == rec.term)
        {
            self.learn_commit(rec.commit);
        }
        Ok(())
    }

    /// Whether `rec` (from `p`, the leader of our term) carries a sync we
    /// have not applied or refused yet.
    fn sync_is_fresh(&self, p: NodeId, rec: &LeaderRecord) -> bool {
        let current = self
            .source
            .is_some_and(|s| s.peer == p && s.term == rec.term);
        rec.sync_seq != 0
            && rec.sync_seq != self.rejected_sync
            && (!current || self.source.is_some_and(|s| rec.sync_seq > s.sync_seq))
    }

    /// Whether our log really agrees with the leader's up to the sync point.
    fn sync_agrees(&self, rec: &LeaderRecord) -> bool {
        let m = rec.sync_index;
        if m == 0 {
            return rec.sync_term == 0 && rec.sync_pos == 0;
        }
        m <= self.last_index
            && self
                .store
                .meta(m)
                .is_some_and(|meta| meta.term == rec.sync_term && meta.end_pos() == rec.sync_pos)
    }

    /// The leader says: our logs agree up to `sync_index`, and its stream
    /// continues at `sync_pos`.
    fn apply_sync(&mut self, p: NodeId, rec: &LeaderRecord) -> Result<(), ReplicaError> {
        let m = rec.sync_index;
        if !self.sync_agrees(rec) {
            // Our log changed since the leader read our status (or we
            // restarted): ask it to look again.
            self.rejected_sync = rec.sync_seq;
            self.ack_dirty = true;
            return Ok(());
        }
        self.rejected_sync = 0;
        self.source = Some(Source {
            peer: p,
            term: rec.term,
            sync_seq: rec.sync_seq,
        });
        self.verified = m;
        self.expect_index = m + 1;
        self.expect_pos = rec.sync_pos;
        match self.recovery {
            Some(Recovery::AwaitingSync) => self.recovery = Some(Recovery::Until(rec.last_index)),
            // The loss was accepted and a leader holds what survived.
            Some(Recovery::Waived) => self.recovery = None,
            Some(Recovery::Until(_)) | None => {}
        }
        self.check_recovered();
        self.ack_dirty = true;
        self.status_dirty = true;
        Ok(())
    }

    fn learn_commit(&mut self, leader_commit: u64) {
        let c = leader_commit.min(self.verified);
        if c > self.commit {
            self.commit = c;
            self.status_dirty = true;
        }
    }

    fn check_recovered(&mut self) {
        if let Some(Recovery::Until(target)) = self.recovery
            && self.verified >= target
        {
            self.recovery = None;
            self.status_dirty = true;
        }
    }

    /// The next entry of the source's stream, if it has fully landed.
    fn next_ring_entry(&mut self) -> Option<EntryHeader> {
        let src = self.source?;
        // An entry that does not fit in the rest of a lap starts the next.
        let here = self.expect_pos;
        let candidates = [
            Some(here),
            (self.layout.lap_remaining(here) < self.layout.ring_capacity())
                .then(|| self.layout.next_lap(here)),
        ];
        for pos in candidates.into_iter().flatten() {
            match self.read_ring_entry(pos, src) {
                Ok(h) => return Some(h),
                Err(torn) => {
                    if torn {
                        self.counters.torn_reads += 1;
                    }
                }
            }
        }
        None
    }

    /// Reads and validates the entry the source would have written at `pos`
    /// into `entry_buf`. `Err(true)` when something that claims to be that
    /// entry is incomplete or damaged (a write still landing).
    fn read_ring_entry(&mut self, pos: Pos, src: Source) -> Result<EntryHeader, bool> {
        let room = self.layout.lap_remaining(pos);
        if room < entry::HEADER_LEN + TRAILER_LEN {
            return Err(false);
        }
        let at = self.layout.ring_at(pos);
        let mut hb = [0u8; entry::HEADER_LEN];
        self.region.read(at, &mut hb);
        let Ok(h) = EntryHeader::parse(&hb, self.cfg.max_payload) else {
            return Err(false);
        };
        if h.pos != pos || h.index != self.expect_index || !self.writer_term_ok(h.leader_term, src)
        {
            return Err(false);
        }
        let total = h.encoded_len();
        if total > room {
            return Err(true);
        }
        // The seal is the last word: once it is there, all of it is.
        let seal = self.region.load_u64(at + total - 8);
        if (seal >> 32) as u32 != entry::SEAL {
            return Err(true);
        }
        self.entry_buf.resize(total, 0);
        self.region.read(at, &mut self.entry_buf);
        match entry::decode(&self.entry_buf, self.cfg.max_payload) {
            Ok((full, _))
                if full.pos == pos
                    && full.index == self.expect_index
                    && self.writer_term_ok(full.leader_term, src) =>
            {
                Ok(full)
            }
            _ => Err(true),
        }
    }

    /// Only the source's own copies are taken: bytes written under an older
    /// term (a deposed leader's, or our own divergent entries lingering in
    /// the ring after a resync) are never accepted as the source's.
    fn writer_term_ok(&self, leader_term: crate::types::Term, src: Source) -> bool {
        #[cfg(any(test, feature = "sim"))]
        if self.bug(crate::config::PlantedBug::AcceptStaleTerm) {
            return leader_term <= src.term;
        }
        leader_term == src.term
    }

    /// Takes the entry in `entry_buf` into the log; `false` if it cannot be
    /// (it does not chain onto our log), in which case nothing changes.
    fn accept(&mut self, h: EntryHeader) -> Result<bool, ReplicaError> {
        let i = h.index;
        debug_assert_eq!(i, self.expect_index);
        // Log matching: the entry must chain onto our verified prefix.
        if h.prev_term != self.term_at(i - 1).unwrap_or(0) {
            self.counters.chain_breaks += 1;
            return Ok(false);
        }
        let mut append = true;
        if i <= self.last_index {
            let mine = self.store.meta(i).expect("entry within the log");
            if mine.term == h.term {
                // Same index and term: the same entry.
                assert_eq!(mine.pos, h.pos, "entry {i} at two positions");
                append = false;
            } else {
                self.truncate_after(i - 1)?;
            }
        }
        if append {
            let meta = EntryMeta {
                term: h.term,
                pos: h.pos,
                len: h.encoded_len() as u32,
            };
            self.store.append(i, meta, &self.entry_buf)?;
            self.last_index = i;
            self.last_term = h.term;
            self.last_end = h.end_pos();
            if self.cfg.durability == Durability::Memory {
                self.persisted = i;
            }
        }
        self.counters.entries_accepted += 1;
        self.verified = i;
        self.expect_index = i + 1;
        self.expect_pos = h.end_pos();
        self.learn_commit(h.commit);
        self.check_recovered();
        self.leader_contact = Some(self.now);
        self.reset_election_timer();
        self.ack_dirty = true;
        self.status_dirty = true;
        Ok(true)
    }

    /// Entries that have fully landed in the ring from the current source
    /// and would be accepted next, without accepting them: in memory mode
    /// these count as held (the replica takes them in before it can vote).
    /// For the simulator's durability check.
    #[cfg(any(test, feature = "sim"))]
    #[doc(hidden)]
    pub fn landed_entries(&mut self) -> Vec<(crate::types::Index, crate::types::Term, Vec<u8>)> {
        let saved = (
            self.source,
            self.expect_index,
            self.expect_pos,
            self.counters,
        );
        // A sync from our leader that has landed is applied by the next poll,
        // before the ring is read and before any vote: apply it here too.
        if let Some(l) = self.leader
            && l != self.cfg.id
            && self.writer == Some(l)
            && let Some(rec) = self.read_leader_record(l)
            && rec.term == self.term
            && self.sync_is_fresh(l, &rec)
            && self.sync_agrees(&rec)
        {
            self.source = Some(Source {
                peer: l,
                term: rec.term,
                sync_seq: rec.sync_seq,
            });
            self.expect_index = rec.sync_index + 1;
            self.expect_pos = rec.sync_pos;
        }
        let mut out = Vec::new();
        while let Some(h) = self.next_ring_entry() {
            let start = entry::HEADER_LEN;
            out.push((
                h.index,
                h.term,
                self.entry_buf[start..start + h.payload_len as usize].to_vec(),
            ));
            self.expect_index = h.index + 1;
            self.expect_pos = h.end_pos();
        }
        (
            self.source,
            self.expect_index,
            self.expect_pos,
            self.counters,
        ) = saved;
        out
    }

    /// One line on where this replica's receiving side stands (simulator
    /// diagnostics).
    #[cfg(any(test, feature = "sim"))]
    #[doc(hidden)]
    pub fn receive_summary(&self) -> String {
        format!(
            "{} t{} writer {:?} leader {:?} source {:?} verified {} expect {}@{} last {} commit {}{}",
            self.role,
            self.term,
            self.writer,
            self.leader,
            self.source.map(|s| (s.peer, s.term, s.sync_seq)),
            self.verified,
            self.expect_index,
            self.expect_pos,
            self.last_index,
            self.commit,
            if self.settling { " settling" } else { "" }
        ) + &match self.leader.filter(|&l| l != self.cfg.id) {
            Some(l) => format!(" leader-record {:?}", self.read_leader_record(l)),
            None => String::new(),
        }
    }

    pub(super) fn render_ack(&mut self) -> AckRecord {
        self.ack_seq += 1;
        let (source_term, sync_seq, acked) = match self.source {
            Some(s) => (s.term, s.sync_seq, self.verified.min(self.persisted)),
            None => (0, 0, 0),
        };
        AckRecord {
            current_term: self.term,
            source_term,
            sync_seq,
            seq: self.ack_seq,
            acked_index: acked,
            next_pos: self.expect_pos,
            rejected_sync: self.rejected_sync,
            last_index: self.last_index,
        }
    }
}
