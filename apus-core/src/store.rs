//! Durable state behind a replica: its hard state (term and vote) and its log.
//!
//! The engine calls a [`LogStore`] synchronously for what is cheap or rare
//! (buffered appends, reads, truncation, saving the hard state) and asks the
//! embedder to make appends durable asynchronously with
//! [`Action::Sync`](crate::Action::Sync), so the runtime can group commits.
//! [`MemStore`] keeps everything in memory; the `apus` crate provides
//! segment files.

use crate::entry::{self, EntryError};
use crate::types::{Index, NodeId, Pos, Term};

/// What must survive a restart for elections to stay safe.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct HardState {
    /// The latest term this replica has seen.
    pub term: Term,
    /// Whom it voted for in that term.
    pub voted_for: Option<NodeId>,
}

/// Where an entry sits: enough to check log matching and to address it in
/// the ring without reading it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct EntryMeta {
    /// Term in which the entry was created.
    pub term: Term,
    /// Ring position.
    pub pos: Pos,
    /// Encoded length in bytes.
    pub len: u32,
}

impl EntryMeta {
    /// The ring position just after the entry.
    pub fn end_pos(&self) -> Pos {
        self.pos + u64::from(self.len)
    }
}

/// A storage failure. The engine treats it as fatal: it stops, and the
/// runtime restarts the replica from what the store recovers.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An operating system error.
    #[error("storage I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A stored entry failed validation.
    #[error("stored entry {index} is corrupt: {source}")]
    Corrupt {
        /// The entry's index.
        index: Index,
        /// What is wrong with it.
        source: EntryError,
    },
    /// A read of an index the store does not hold.
    #[error("entry {0} is not in the store")]
    Missing(Index),
    /// An append that does not extend the log by exactly one index.
    #[error("append of index {got} after last index {last}")]
    NotContiguous {
        /// The index appended.
        got: Index,
        /// The store's last index.
        last: Index,
    },
}

/// A replica's log and hard state.
///
/// Contract: `append` may buffer; the entries become durable only once the
/// runtime has carried out the `Sync` action that covers them. `truncate_after`
/// and `save_hard_state` are durable when they return (both are rare).
pub trait LogStore {
    /// The saved hard state (default for a new replica).
    fn hard_state(&self) -> HardState;
    /// Saves the hard state durably before returning.
    fn save_hard_state(&mut self, hs: HardState) -> Result<(), StoreError>;
    /// Index of the last entry (0 when empty).
    fn last_index(&self) -> Index;
    /// Metadata of entry `index`, or `None` when absent (`index == 0` included).
    fn meta(&self, index: Index) -> Option<EntryMeta>;
    /// Appends one encoded entry whose index is `last_index() + 1`.
    fn append(&mut self, index: Index, meta: EntryMeta, encoded: &[u8]) -> Result<(), StoreError>;
    /// Removes every entry after `index`, durably.
    fn truncate_after(&mut self, index: Index) -> Result<(), StoreError>;
    /// Copies the encoded bytes of entry `index` into `out` (replacing its
    /// contents). Reuses `out`'s allocation.
    fn read(&mut self, index: Index, out: &mut Vec<u8>) -> Result<(), StoreError>;
}

/// A log held in memory: the store for the `memory` durability mode and for
/// tests. Appends are amortised into one growing buffer, not one allocation
/// per entry.
#[derive(Default)]
pub struct MemStore {
    hard: HardState,
    bytes: Vec<u8>,
    /// Per entry: byte offset into `bytes` and metadata. `entries[i]` is index `i + 1`.
    entries: Vec<(usize, EntryMeta)>,
}

impl std::fmt::Debug for MemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemStore")
            .field("hard", &self.hard)
            .field("last_index", &self.entries.len())
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

impl MemStore {
    /// An empty store.
    pub fn new() -> MemStore {
        MemStore::default()
    }

    /// An empty log that keeps the given hard state: what a memory-mode
    /// replica has after a restart (its term and vote were persisted, its log
    /// was not).
    pub fn with_hard_state(hard: HardState) -> MemStore {
        MemStore {
            hard,
            ..MemStore::default()
        }
    }

    /// The payload of entry `index`, validated (for tests and tools).
    pub fn payload(&self, index: Index, max_payload: usize) -> Result<&[u8], StoreError> {
        let bytes = self.encoded(index)?;
        entry::decode(bytes, max_payload)
            .map(|(_, p)| p)
            .map_err(|source| StoreError::Corrupt { index, source })
    }

    fn encoded(&self, index: Index) -> Result<&[u8], StoreError> {
        let i = usize::try_from(index).ok().and_then(|i| i.checked_sub(1));
        let Some(&(off, meta)) = i.and_then(|i| self.entries.get(i)) else {
            return Err(StoreError::Missing(index));
        };
        Ok(&self.bytes[off..off + meta.len as usize])
    }
}

impl LogStore for MemStore {
    fn hard_state(&self) -> HardState {
        self.hard
    }

    fn save_hard_state(&mut self, hs: HardState) -> Result<(), StoreError> {
        self.hard = hs;
        Ok(())
    }

    fn last_index(&self) -> Index {
        self.entries.len() as Index
    }

    fn meta(&self, index: Index) -> Option<EntryMeta> {
        let i = usize::try_from(index).ok()?.checked_sub(1)?;
        self.entries.get(i).map(|&(_, m)| m)
    }

    fn append(&mut self, index: Index, meta: EntryMeta, encoded: &[u8]) -> Result<(), StoreError> {
        if index != self.last_index() + 1 {
            return Err(StoreError::NotContiguous {
                got: index,
                last: self.last_index(),
            });
        }
        debug_assert_eq!(encoded.len(), meta.len as usize);
        self.entries.push((self.bytes.len(), meta));
        self.bytes.extend_from_slice(encoded);
        Ok(())
    }

    fn truncate_after(&mut self, index: Index) -> Result<(), StoreError> {
        let keep = usize::try_from(index).unwrap_or(usize::MAX);
        if keep < self.entries.len() {
            self.bytes.truncate(self.entries[keep].0);
            self.entries.truncate(keep);
        }
        Ok(())
    }

    fn read(&mut self, index: Index, out: &mut Vec<u8>) -> Result<(), StoreError> {
        let bytes = self.encoded(index)?;
        out.clear();
        out.extend_from_slice(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{EntryHeader, EntryKind, encode, encoded_len};

    fn entry(index: Index, term: Term, payload: &[u8]) -> (EntryMeta, Vec<u8>) {
        let mut buf = vec![0; encoded_len(payload.len())];
        let h = EntryHeader {
            kind: EntryKind::Data,
            payload_len: 0,
            term,
            leader_term: term,
            index,
            pos: index * 1000,
            prev_term: 0,
            commit: 0,
            conn: 0,
        };
        encode(&h, payload, &mut buf);
        (
            EntryMeta {
                term,
                pos: index * 1000,
                len: buf.len() as u32,
            },
            buf,
        )
    }

    #[test]
    fn append_read_truncate() {
        let mut s = MemStore::new();
        for i in 1..=5 {
            let (m, b) = entry(i, 1, format!("p{i}").as_bytes());
            s.append(i, m, &b).unwrap();
        }
        assert_eq!(s.last_index(), 5);
        assert_eq!(s.payload(3, 64).unwrap(), b"p3");
        s.truncate_after(2).unwrap();
        assert_eq!(s.last_index(), 2);
        assert!(s.meta(3).is_none());
        assert!(matches!(s.payload(3, 64), Err(StoreError::Missing(3))));
        let (m, b) = entry(3, 2, b"new");
        s.append(3, m, &b).unwrap();
        let mut out = Vec::new();
        s.read(3, &mut out).unwrap();
        assert_eq!(out, b);
        assert_eq!(s.meta(0), None);
    }

    #[test]
    fn rejects_gaps() {
        let mut s = MemStore::new();
        let (m, b) = entry(2, 1, b"x");
        assert!(matches!(
            s.append(2, m, &b),
            Err(StoreError::NotContiguous { got: 2, last: 0 })
        ));
    }
}
