//! A follower driven by hand: the tests play its leader and the network by
//! writing records and entries straight into its region.

#![allow(dead_code)]

use apus_core::entry::{self, EntryHeader, EntryKind};
use apus_core::layout::SlotKind;
use apus_core::record::{LeaderRecord, Record, VoteRequest};
use apus_core::{MemStore, NodeId, Region, Replica, ReplicaConfig, Role, Time};

/// A planted bug for the follower (bugs exist only with the `sim` feature).
#[cfg(feature = "sim")]
pub type Bug = Option<apus_core::config::PlantedBug>;
/// A planted bug for the follower (bugs exist only with the `sim` feature).
#[cfg(not(feature = "sim"))]
pub type Bug = Option<std::convert::Infallible>;

/// Encodes one entry.
pub fn encoded(h: &EntryHeader, payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0; entry::encoded_len(payload.len())];
    entry::encode(h, payload, &mut buf);
    buf
}

/// A follower (n1 of 3) driven by hand: we play its leader n0 by writing
/// records and entries straight into its region.
pub struct Follower {
    pub r: Replica<MemStore>,
    pub region: Region,
    now: u64,
    next_pos: u64,
    last_term: u64,
}

impl Follower {
    pub fn synced() -> Follower {
        Follower::synced_with(None)
    }

    /// [`synced`](Self::synced), with `bug` planted.
    pub fn synced_with(bug: Bug) -> Follower {
        let mut cfg = ReplicaConfig::new(NodeId(1), 3);
        #[cfg(feature = "sim")]
        {
            cfg.planted_bug = bug;
        }
        #[cfg(not(feature = "sim"))]
        let _ = bug;
        cfg.ring_capacity = 4096;
        cfg.catchup_chunk = 1024;
        cfg.max_payload = 256;
        let layout = cfg.validate().unwrap();
        let region = Region::new(layout.region_len());
        let r = Replica::new(cfg, region.clone(), MemStore::new(), Time(0)).unwrap();
        let mut f = Follower {
            r,
            region,
            now: 1,
            next_pos: 0,
            last_term: 0,
        };
        // Leader n0 of term 1 syncs us at index 0.
        f.leader_record(1);
        f.poll(); // adopts term 1, grants n0 (settling)
        f.poll(); // applies the sync
        assert_eq!(
            (f.r.term(), f.r.role(), f.r.leader()),
            (1, Role::Follower, Some(NodeId(0)))
        );
        assert_eq!(f.r.log_writer(), Some(NodeId(0)));
        f
    }

    pub fn leader_record(&mut self, version: u64) {
        self.leader_record_with(version, 1, 0);
    }

    /// Leader n0 of term 1 writes its record: `sync_seq` syncs us at
    /// `sync_index` (0 or the last entry pushed).
    pub fn leader_record_with(&mut self, version: u64, sync_seq: u64, last_index: u64) {
        let (sync_index, sync_term, sync_pos) = if sync_seq > 1 {
            (last_index, self.last_term, self.next_pos)
        } else {
            (0, 0, 0)
        };
        let rec = LeaderRecord {
            term: 1,
            seq: version,
            version,
            commit: 0,
            last_index,
            sync_seq,
            sync_index,
            sync_term,
            sync_pos,
        };
        let at = self
            .r
            .layout()
            .inbound_copy(SlotKind::Leader, NodeId(0), (version % 2) as usize);
        self.region.write(at, &rec.encode());
    }

    pub fn poll(&mut self) {
        self.now += 1000;
        self.r.poll(Time(self.now)).unwrap();
        // Nobody carries the actions out: we play the network by hand.
        while self.r.next_action().is_some() {}
    }

    pub fn scribble_ring(&mut self, at: usize, bytes: &[u8]) {
        let ring = self.r.layout().ring_offset();
        let cap = self.r.layout().ring_capacity();
        let at = at % cap;
        let n = bytes.len().min(cap - at);
        self.region.write(ring + at, &bytes[..n]);
    }

    pub fn push_entry(&mut self, index: u64, term: u64, payload: &[u8]) {
        self.push_entry_by(index, term, 1, payload);
    }

    /// Writes entry `index` of `term` as the leader of `leader_term` would.
    pub fn push_entry_by(&mut self, index: u64, term: u64, leader_term: u64, payload: &[u8]) {
        let h = EntryHeader {
            kind: EntryKind::Data,
            payload_len: 0,
            term,
            leader_term,
            index,
            pos: self.next_pos,
            prev_term: self.last_term,
            commit: 0,
            conn: 0,
        };
        let buf = encoded(&h, payload);
        let at = self.r.layout().ring_at(self.next_pos);
        self.region.write(at, &buf);
        self.next_pos += buf.len() as u64;
        self.last_term = term;
    }
}

/// A leader record, as a leader writes it into our slot.
#[derive(Clone, Copy, Debug)]
pub struct FromLeader {
    pub leader: NodeId,
    pub term: u64,
    pub version: u64,
    pub sync_seq: u64,
    pub sync_index: u64,
    pub sync_term: u64,
    pub sync_pos: u64,
    pub last_index: u64,
}

impl Follower {
    /// Writes `r` into the leader slot of `r.leader`.
    pub fn write_leader_record(&mut self, r: FromLeader) {
        let rec = LeaderRecord {
            term: r.term,
            seq: r.version,
            version: r.version,
            commit: 0,
            last_index: r.last_index,
            sync_seq: r.sync_seq,
            sync_index: r.sync_index,
            sync_term: r.sync_term,
            sync_pos: r.sync_pos,
        };
        let at = self
            .r
            .layout()
            .inbound_copy(SlotKind::Leader, r.leader, (r.version % 2) as usize);
        self.region.write(at, &rec.encode());
    }

    /// Where our next pushed entry goes, and the term of the last one.
    pub fn tail(&self) -> (u64, u64) {
        (self.next_pos, self.last_term)
    }

    /// Lets `ns` pass without a word from the leader.
    pub fn advance(&mut self, ns: u64) {
        self.now += ns;
    }

    /// Candidate `from` asks for our vote in `term`.
    pub fn vote_request(&mut self, from: NodeId, term: u64) {
        let req = VoteRequest {
            term,
            last_index: 0,
            last_term: 0,
            pre: false,
        };
        let at = self.r.layout().inbound(SlotKind::VoteRequest, from);
        self.region.write(at, &req.encode());
    }
}
