//! The receiving side: leader records, sync commands and the ring.

use super::{Recovery, Replica, ReplicaError, Source};
use crate::config::Durability;
use crate::entry::{self, EntryHeader, TRAILER_LEN};
use crate::layout::SlotKind;
use crate::record::{AckRecord, LeaderRecord};
use crate::store::{EntryMeta, LogStore};
use crate::types::{NodeId, Pos, Role};

impl<S: LogStore> Replica<S> {
    /// Takes in what the current source (the leader whose stream this replica
    /// follows) has landed: its record first (a re-sync, the commit index),
    /// then every complete entry in the ring.
    pub(super) fn receive(&mut self) -> Result<(), ReplicaError> {
        if let Some(src) = self.source
            && let Some(rec) = self.read_slot::<LeaderRecord>(SlotKind::Leader, src.peer)
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
            self.accept(h)?;
        }
        Ok(())
    }

    /// Looks at every peer's leader record: adopts higher terms, learns who
    /// leads the current one, takes heartbeats and sync commands from it.
    pub(super) fn read_leader_records(&mut self) -> Result<(), ReplicaError> {
        for p in self.peers() {
            let Some(rec) = self.read_slot::<LeaderRecord>(SlotKind::Leader, p) else {
                continue;
            };
            if rec.term < self.term {
                #[cfg(any(test, feature = "sim"))]
                if self.bug(crate::config::PlantedBug::AcceptStaleTerm)
                    && self.role == Role::Follower
                    && self.leader != Some(p)
                {
                    // Planted bug: follow a leader of an older term.
                    self.leader = Some(p);
                    self.set_writer(Some(p));
                    self.rejected_sync = 0;
                    self.source = Some(Source {
                        peer: p,
                        term: rec.term,
                        sync_seq: 0,
                    });
                    continue;
                }
                continue;
            }
            if rec.term > self.term {
                self.adopt_term(rec.term, Some(p))?;
                continue;
            }
            match self.role {
                Role::Leader => {
                    assert_eq!(p, self.cfg.id, "two leaders in term {}", self.term);
                }
                Role::Candidate => {
                    self.become_follower(Some(p));
                }
                Role::Follower => {
                    if self.leader.is_none() {
                        self.leader = Some(p);
                        self.set_writer(Some(p));
                        self.reset_election_timer();
                        continue;
                    }
                    #[cfg(any(test, feature = "sim"))]
                    if self.bug(crate::config::PlantedBug::AcceptStaleTerm) && self.leader != Some(p)
                    {
                        self.leader = Some(p);
                        self.set_writer(Some(p));
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
            self.reset_election_timer();
            // Tell the leader it is still heard (it steps down otherwise).
            self.ack_dirty = true;
        }
        if self.settling || self.writer != Some(p) {
            return Ok(());
        }
        let current = self.source.is_some_and(|s| s.peer == p && s.term == rec.term);
        let fresh_sync = rec.sync_seq != 0
            && rec.sync_seq != self.rejected_sync
            && (!current || self.source.is_some_and(|s| rec.sync_seq > s.sync_seq));
        if fresh_sync {
            self.apply_sync(p, rec)?;
            // Entries the leader streamed right behind the sync may already
            // be in the ring.
            while let Some(h) = self.next_ring_entry() {
                self.accept(h)?;
            }
        }
        if self.source.is_some_and(|s| s.peer == p && s.term == rec.term) {
            self.learn_commit(rec.commit);
        }
        Ok(())
    }

    /// The leader says: our logs agree up to `sync_index`, and its stream
    /// continues at `sync_pos`.
    fn apply_sync(&mut self, p: NodeId, rec: &LeaderRecord) -> Result<(), ReplicaError> {
        let m = rec.sync_index;
        let agrees = if m == 0 {
            rec.sync_term == 0 && rec.sync_pos == 0
        } else {
            m <= self.last_index
                && self
                    .store
                    .meta(m)
                    .is_some_and(|meta| meta.term == rec.sync_term && meta.end_pos() == rec.sync_pos)
        };
        if !agrees {
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
        if self.recovery == Some(Recovery::AwaitingSync) {
            self.recovery = Some(Recovery::Until(rec.last_index));
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
        if h.pos != pos || h.index != self.expect_index || h.leader_term != src.term {
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
                    && full.leader_term == src.term =>
            {
                Ok(full)
            }
            _ => Err(true),
        }
    }

    /// Takes the entry in `entry_buf` into the log.
    fn accept(&mut self, h: EntryHeader) -> Result<(), ReplicaError> {
        let i = h.index;
        debug_assert_eq!(i, self.expect_index);
        let mut append = true;
        if i <= self.last_index {
            let mine = self.store.meta(i).expect("entry within the log");
            if mine.term == h.term {
                // Log matching: same index and term, same entry.
                assert_eq!(mine.pos, h.pos, "entry {i} at two positions");
                append = false;
            } else {
                self.truncate_after(i - 1)?;
            }
        }
        if append {
            if h.prev_term != self.last_term {
                // Cannot happen with a correct leader: the entries before this
                // one were verified against its log. Refuse and stay put.
                debug_assert!(false, "prev_term mismatch at {i}");
                return Ok(());
            }
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
        self.reset_election_timer();
        self.ack_dirty = true;
        self.status_dirty = true;
        Ok(())
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
