//! A store that forgets what was not synced when its node crashes.

use crate::entry;
use crate::store::{EntryMeta, HardState, LogStore, MemStore, StoreError};
use crate::types::{Index, Term};

/// The simulator's store: a [`MemStore`] plus a durable watermark.
///
/// Entries up to `durable_len` survive a crash; in memory mode nothing of the
/// log survives (the hard state always does). Syncs capture the last index
/// when requested and are capped by any truncation before they complete.
#[derive(Debug)]
pub struct SimStore {
    mem: MemStore,
    durable_len: Index,
    memory_mode: bool,
    pending: Vec<(u64, Index)>,
    /// Entries removed by truncation since the simulator last looked:
    /// `(index, term, digest)`.
    pub truncated: Vec<(Index, Term, u64)>,
    max_payload: usize,
}

impl SimStore {
    /// An empty store.
    pub fn new(memory_mode: bool, max_payload: usize) -> SimStore {
        SimStore {
            mem: MemStore::new(),
            durable_len: 0,
            memory_mode,
            pending: Vec::new(),
            truncated: Vec::new(),
            max_payload,
        }
    }

    /// Records a sync request covering everything appended so far.
    pub fn request_sync(&mut self, token: u64) {
        let last = self.mem.last_index();
        self.pending.push((token, last));
    }

    /// A sync completed.
    pub fn complete_sync(&mut self, token: u64) {
        if let Some(i) = self.pending.iter().position(|&(t, _)| t == token) {
            let (_, through) = self.pending.remove(i);
            self.durable_len = self.durable_len.max(through.min(self.mem.last_index()));
        }
    }

    /// The node crashed: keep only what was durable.
    pub fn crash(&mut self) {
        self.pending.clear();
        if self.memory_mode {
            self.mem = MemStore::with_hard_state(self.mem.hard_state());
            self.durable_len = 0;
        } else {
            self.mem
                .truncate_after(self.durable_len)
                .expect("memory truncation cannot fail");
        }
        self.truncated.clear();
    }

    /// Digest of entry `index` (term, kind, connection and payload), or
    /// `None` when absent.
    pub fn digest(&self, index: Index) -> Option<u64> {
        let p = self.mem.payload(index, self.max_payload).ok()?;
        let meta = self.mem.meta(index)?;
        Some(entry_digest(meta.term, p))
    }

    /// The durable prefix length.
    pub fn durable_len(&self) -> Index {
        self.durable_len
    }
}

/// FNV-1a over an entry's term and payload.
pub fn entry_digest(term: Term, payload: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in term.to_le_bytes().iter().chain(payload) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

impl LogStore for SimStore {
    fn hard_state(&self) -> HardState {
        self.mem.hard_state()
    }
    fn save_hard_state(&mut self, hs: HardState) -> Result<(), StoreError> {
        self.mem.save_hard_state(hs)
    }
    fn last_index(&self) -> Index {
        self.mem.last_index()
    }
    fn meta(&self, index: Index) -> Option<EntryMeta> {
        self.mem.meta(index)
    }
    fn append(&mut self, index: Index, meta: EntryMeta, encoded: &[u8]) -> Result<(), StoreError> {
        debug_assert!(entry::decode(encoded, self.max_payload).is_ok());
        self.mem.append(index, meta, encoded)
    }
    fn truncate_after(&mut self, index: Index) -> Result<(), StoreError> {
        let last = self.mem.last_index();
        for i in index + 1..=last {
            let term = self.mem.meta(i).map_or(0, |m| m.term);
            let digest = self.digest(i).unwrap_or(0);
            self.truncated.push((i, term, digest));
        }
        self.mem.truncate_after(index)?;
        self.durable_len = self.durable_len.min(index);
        for (_, through) in &mut self.pending {
            *through = (*through).min(index);
        }
        Ok(())
    }
    fn read(&mut self, index: Index, out: &mut Vec<u8>) -> Result<(), StoreError> {
        self.mem.read(index, out)
    }
}
