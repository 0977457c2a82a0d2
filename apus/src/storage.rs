//! Durable storage: segment files with checksums, group commit, recovery.
//!
//! ```text
//! <data_dir>/hardstate                   term and vote, replaced atomically
//! <data_dir>/identity                    cluster, replica, incarnation (crate::identity)
//! <data_dir>/log-<first index:020>.seg   records, one per entry:
//!     len u32 | crc32c(len | entry) u32 | entry (the encoded entry, as in the ring)
//! ```
//!
//! Appends go to an in-memory buffer; [`SyncHandle::flush`] writes the buffer
//! out and returns the files to fsync, so the runtime's sync thread can make
//! a whole batch durable with one `fdatasync` while the engine keeps
//! appending (group commit). Truncation and the hard state are durable when
//! their calls return, as the [`LogStore`] contract asks.
//!
//! On open, every segment is read back and checked record by record (length,
//! checksum, entry format, consecutive indices); the log is cut at the first
//! record that fails, which is how a torn tail from a crash mid-write is
//! removed. Anything after it is reported and deleted.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use apus_core::entry;
use apus_core::store::{EntryMeta, HardState, LogStore, MemStore, StoreError};
use apus_core::{Index, NodeId};
use tracing::warn;

/// Segments are rotated once they reach this size (by default).
pub const SEGMENT_BYTES: u64 = 64 << 20;
const RECORD_HEADER: usize = 8;
const HARDSTATE: &str = "hardstate";
const HARDSTATE_MAGIC: &[u8; 4] = b"APHS";

#[derive(Debug)]
struct Segment {
    first_index: Index,
    path: PathBuf,
    file: Arc<File>,
    /// Bytes written to the file.
    written: u64,
    /// Whether bytes were written since the last sync.
    unsynced: bool,
}

#[derive(Debug)]
struct Files {
    dir: PathBuf,
    segments: Vec<Segment>,
    /// Bytes appended to the last segment but not yet written.
    pending: Vec<u8>,
    /// The directory gained or lost a segment since the last sync.
    dir_unsynced: bool,
}

#[derive(Clone, Copy, Debug)]
struct Loc {
    segment: usize,
    offset: u64,
    meta: EntryMeta,
}

/// What recovery found on open.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Entries recovered.
    pub entries: u64,
    /// Bytes cut from the tail (a torn or corrupt record and what followed).
    pub cut_bytes: u64,
    /// Why the log was cut, if it was.
    pub cut_reason: Option<String>,
}

/// A log in segment files plus the hard state. See the module docs.
#[derive(Debug)]
pub struct SegmentStore {
    files: Arc<Mutex<Files>>,
    index: Vec<Loc>,
    hard: HardState,
    max_entry: usize,
    max_payload: usize,
    segment_bytes: u64,
}

/// Lets the runtime's sync thread make appended entries durable.
#[derive(Clone, Debug)]
pub struct SyncHandle {
    files: Arc<Mutex<Files>>,
}

/// Files that must be fsynced for a flush to be durable.
#[derive(Debug, Default)]
pub struct ToSync {
    /// Segments written since their last sync.
    pub files: Vec<Arc<File>>,
    /// The directory, if a segment was created or removed.
    pub dir: Option<PathBuf>,
}

impl ToSync {
    /// Makes everything durable.
    pub fn sync(&self) -> io::Result<()> {
        for f in &self.files {
            f.sync_data()?;
        }
        if let Some(d) = &self.dir {
            File::open(d)?.sync_all()?;
        }
        Ok(())
    }
}

impl SyncHandle {
    /// Writes out everything appended so far and returns what to fsync.
    pub fn flush(&self) -> io::Result<ToSync> {
        let mut f = lock(&self.files);
        f.write_pending()?;
        let mut out = ToSync::default();
        for s in &mut f.segments {
            if s.unsynced {
                out.files.push(s.file.clone());
                s.unsynced = false;
            }
        }
        if f.dir_unsynced {
            out.dir = Some(f.dir.clone());
            f.dir_unsynced = false;
        }
        Ok(out)
    }
}

fn lock(m: &Mutex<Files>) -> MutexGuard<'_, Files> {
    // A panic while holding the lock leaves nothing half-done that later
    // calls cannot cope with (the buffer is rewritten from scratch).
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Files {
    fn write_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let seg = self.segments.last_mut().expect("a segment to append to");
        seg.file.write_all_at(&self.pending, seg.written)?;
        seg.written += self.pending.len() as u64;
        seg.unsynced = true;
        self.pending.clear();
        Ok(())
    }

    fn new_segment(&mut self, first_index: Index) -> io::Result<()> {
        self.write_pending()?;
        let path = self.dir.join(format!("log-{first_index:020}.seg"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        self.segments.push(Segment {
            first_index,
            path,
            file: Arc::new(file),
            written: 0,
            unsynced: true,
        });
        self.dir_unsynced = true;
        Ok(())
    }
}

fn record_crc(len: u32, entry: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&len.to_le_bytes()), entry)
}

fn io_err(e: io::Error) -> StoreError {
    StoreError::Io(e)
}

impl SegmentStore {
    /// Opens (or creates) the store in `dir`, recovering what is there.
    pub fn open(dir: &Path, max_payload: usize) -> Result<(SegmentStore, Recovery), StoreError> {
        SegmentStore::open_with(dir, max_payload, SEGMENT_BYTES)
    }

    /// [`open`](Self::open), rotating segments at `segment_bytes`.
    pub fn open_with(
        dir: &Path,
        max_payload: usize,
        segment_bytes: u64,
    ) -> Result<(SegmentStore, Recovery), StoreError> {
        fs::create_dir_all(dir)?;
        let hard = read_hard_state(dir)?;
        let max_entry = entry::encoded_len(max_payload);
        let mut names: Vec<(Index, PathBuf)> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let first = name
                    .strip_prefix("log-")?
                    .strip_suffix(".seg")?
                    .parse()
                    .ok()?;
                Some((first, e.path()))
            })
            .collect();
        names.sort();
        let mut files = Files {
            dir: dir.to_path_buf(),
            segments: Vec::new(),
            pending: Vec::new(),
            dir_unsynced: false,
        };
        let mut index: Vec<Loc> = Vec::new();
        let mut rec = Recovery::default();
        for (first, path) in &names {
            if rec.cut_reason.is_some() {
                // Everything after a cut is unreachable: remove it.
                rec.cut_bytes += fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                fs::remove_file(path)?;
                files.dir_unsynced = true;
                continue;
            }
            let expected_first = index.len() as Index + 1;
            if *first != expected_first {
                rec.cut_reason = Some(format!(
                    "segment {} starts at index {first}, expected {expected_first}",
                    path.display()
                ));
                rec.cut_bytes += fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                fs::remove_file(path)?;
                files.dir_unsynced = true;
                continue;
            }
            let file = OpenOptions::new().read(true).write(true).open(path)?;
            let len = file.metadata()?.len();
            let mut data = Vec::with_capacity(len as usize);
            (&file).read_to_end(&mut data)?;
            let mut at = 0usize;
            let seg_no = files.segments.len();
            let cut = loop {
                if at == data.len() {
                    break None;
                }
                if data.len() - at < RECORD_HEADER {
                    break Some("truncated record header".to_string());
                }
                let rlen = u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes"));
                let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().expect("4 bytes"));
                let rl = rlen as usize;
                if rl > max_entry || rl == 0 {
                    break Some(format!("record of {rl} bytes at offset {at}"));
                }
                if data.len() - at - RECORD_HEADER < rl {
                    break Some(format!("truncated record at offset {at}"));
                }
                let body = &data[at + RECORD_HEADER..at + RECORD_HEADER + rl];
                if record_crc(rlen, body) != crc {
                    break Some(format!("checksum mismatch at offset {at}"));
                }
                let expect = index.len() as Index + 1;
                match entry::decode(body, max_payload) {
                    Ok((h, _)) if h.index == expect && h.encoded_len() == rl => {
                        index.push(Loc {
                            segment: seg_no,
                            offset: (at + RECORD_HEADER) as u64,
                            meta: EntryMeta {
                                term: h.term,
                                pos: h.pos,
                                len: rl as u32,
                            },
                        });
                    }
                    Ok((h, _)) => {
                        break Some(format!("entry {} where {expect} was expected", h.index));
                    }
                    Err(e) => break Some(format!("invalid entry at offset {at}: {e}")),
                }
                at += RECORD_HEADER + rl;
            };
            if let Some(reason) = cut {
                rec.cut_bytes += len - at as u64;
                rec.cut_reason = Some(format!("{}: {reason}", path.display()));
                file.set_len(at as u64)?;
                file.sync_all()?;
            }
            files.segments.push(Segment {
                first_index: *first,
                path: path.clone(),
                file: Arc::new(file),
                written: at as u64,
                unsynced: false,
            });
        }
        // Never keep an empty segment for an index we do not have, except
        // the one we append to next.
        while files.segments.len() > 1
            && files
                .segments
                .last()
                .is_some_and(|s| s.written == 0 && s.first_index > index.len() as Index + 1)
        {
            let s = files.segments.pop().expect("checked");
            fs::remove_file(&s.path)?;
            files.dir_unsynced = true;
        }
        if files.segments.is_empty() {
            files.new_segment(index.len() as Index + 1)?;
        }
        if files.dir_unsynced {
            File::open(dir)?.sync_all()?;
            files.dir_unsynced = false;
        }
        rec.entries = index.len() as u64;
        if let Some(why) = &rec.cut_reason {
            warn!(dir = %dir.display(), cut_bytes = rec.cut_bytes, %why, "log recovered up to its last valid entry");
        }
        Ok((
            SegmentStore {
                files: Arc::new(Mutex::new(files)),
                index,
                hard,
                max_entry,
                max_payload,
                segment_bytes,
            },
            rec,
        ))
    }

    /// The handle the runtime's sync thread uses.
    pub fn sync_handle(&self) -> SyncHandle {
        SyncHandle {
            files: self.files.clone(),
        }
    }
}

/// The store for `durability = "memory"`: the log lives in memory, but the
/// term and vote are saved to `<data_dir>/hardstate` (a replica that forgot
/// its vote could vote twice in one term).
#[derive(Debug)]
pub struct MemoryStore {
    dir: PathBuf,
    log: MemStore,
}

impl MemoryStore {
    /// Opens `dir`, keeping the saved term and vote; the log starts empty.
    pub fn open(dir: &Path) -> Result<MemoryStore, StoreError> {
        fs::create_dir_all(dir)?;
        let hard = read_hard_state(dir)?;
        Ok(MemoryStore {
            dir: dir.to_path_buf(),
            log: MemStore::with_hard_state(hard),
        })
    }
}

impl LogStore for MemoryStore {
    fn hard_state(&self) -> HardState {
        self.log.hard_state()
    }
    fn save_hard_state(&mut self, hs: HardState) -> Result<(), StoreError> {
        write_hard_state(&self.dir, hs)?;
        self.log.save_hard_state(hs)
    }
    fn last_index(&self) -> Index {
        self.log.last_index()
    }
    fn meta(&self, index: Index) -> Option<EntryMeta> {
        self.log.meta(index)
    }
    fn append(&mut self, index: Index, meta: EntryMeta, encoded: &[u8]) -> Result<(), StoreError> {
        self.log.append(index, meta, encoded)
    }
    fn truncate_after(&mut self, index: Index) -> Result<(), StoreError> {
        self.log.truncate_after(index)
    }
    fn read(&mut self, index: Index, out: &mut Vec<u8>) -> Result<(), StoreError> {
        self.log.read(index, out)
    }
}

/// The store a node runs on: segment files (`durable`) or memory (`memory`).
#[derive(Debug)]
pub enum NodeStore {
    /// Durable mode.
    Segments(SegmentStore),
    /// Memory mode.
    Memory(MemoryStore),
}

macro_rules! each {
    ($s:expr, $v:ident => $e:expr) => {
        match $s {
            NodeStore::Segments($v) => $e,
            NodeStore::Memory($v) => $e,
        }
    };
}

impl LogStore for NodeStore {
    fn hard_state(&self) -> HardState {
        each!(self, s => s.hard_state())
    }
    fn save_hard_state(&mut self, hs: HardState) -> Result<(), StoreError> {
        each!(self, s => s.save_hard_state(hs))
    }
    fn last_index(&self) -> Index {
        each!(self, s => s.last_index())
    }
    fn meta(&self, index: Index) -> Option<EntryMeta> {
        each!(self, s => s.meta(index))
    }
    fn append(&mut self, index: Index, meta: EntryMeta, encoded: &[u8]) -> Result<(), StoreError> {
        each!(self, s => s.append(index, meta, encoded))
    }
    fn truncate_after(&mut self, index: Index) -> Result<(), StoreError> {
        each!(self, s => s.truncate_after(index))
    }
    fn read(&mut self, index: Index, out: &mut Vec<u8>) -> Result<(), StoreError> {
        each!(self, s => s.read(index, out))
    }
}

fn read_hard_state(dir: &Path) -> Result<HardState, StoreError> {
    let path = dir.join(HARDSTATE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(HardState::default()),
        Err(e) => return Err(e.into()),
    };
    let corrupt = |why: &str| {
        StoreError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is corrupt ({why}); refusing to start without knowing this replica's vote",
                path.display()
            ),
        ))
    };
    if bytes.len() != 22 || &bytes[..4] != HARDSTATE_MAGIC {
        return Err(corrupt("bad size or magic"));
    }
    let crc = u32::from_le_bytes(bytes[18..22].try_into().expect("4 bytes"));
    if crc32c::crc32c(&bytes[..18]) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    let term = u64::from_le_bytes(bytes[4..12].try_into().expect("8 bytes"));
    let voted_for = match bytes[12] {
        0 => None,
        1 => Some(NodeId(bytes[13])),
        _ => return Err(corrupt("bad vote flag")),
    };
    Ok(HardState { term, voted_for })
}

fn write_hard_state(dir: &Path, hs: HardState) -> io::Result<()> {
    let mut b = Vec::with_capacity(22);
    b.extend_from_slice(HARDSTATE_MAGIC);
    b.extend_from_slice(&hs.term.to_le_bytes());
    b.push(u8::from(hs.voted_for.is_some()));
    b.push(hs.voted_for.map_or(0, |n| n.0));
    b.extend_from_slice(&[0; 4]);
    let crc = crc32c::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    replace_file(dir, HARDSTATE, &b)
}

/// Replaces `dir/name` with `bytes` atomically and durably: a crash leaves
/// the old file or the new one, never a mix.
pub(crate) fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

impl LogStore for SegmentStore {
    fn hard_state(&self) -> HardState {
        self.hard
    }

    fn save_hard_state(&mut self, hs: HardState) -> Result<(), StoreError> {
        let dir = lock(&self.files).dir.clone();
        write_hard_state(&dir, hs)?;
        self.hard = hs;
        Ok(())
    }

    fn last_index(&self) -> Index {
        self.index.len() as Index
    }

    fn meta(&self, index: Index) -> Option<EntryMeta> {
        let i = usize::try_from(index).ok()?.checked_sub(1)?;
        self.index.get(i).map(|l| l.meta)
    }

    fn append(&mut self, index: Index, meta: EntryMeta, encoded: &[u8]) -> Result<(), StoreError> {
        if index != self.last_index() + 1 {
            return Err(StoreError::NotContiguous {
                got: index,
                last: self.last_index(),
            });
        }
        if encoded.is_empty() || encoded.len() > self.max_entry {
            return Err(StoreError::Corrupt {
                index,
                source: entry::EntryError::Oversized {
                    len: encoded.len(),
                    max: self.max_entry,
                },
            });
        }
        let mut f = lock(&self.files);
        let full = f
            .segments
            .last()
            .is_some_and(|s| s.written + f.pending.len() as u64 >= self.segment_bytes);
        if full {
            f.new_segment(index).map_err(io_err)?;
        }
        let segment = f.segments.len() - 1;
        let offset = f.segments[segment].written + f.pending.len() as u64 + RECORD_HEADER as u64;
        let len = encoded.len() as u32;
        f.pending.extend_from_slice(&len.to_le_bytes());
        f.pending
            .extend_from_slice(&record_crc(len, encoded).to_le_bytes());
        f.pending.extend_from_slice(encoded);
        drop(f);
        self.index.push(Loc {
            segment,
            offset,
            meta,
        });
        Ok(())
    }

    fn truncate_after(&mut self, index: Index) -> Result<(), StoreError> {
        if index >= self.last_index() {
            return Ok(());
        }
        let first_gone = self.index[index as usize];
        let mut f = lock(&self.files);
        f.write_pending().map_err(io_err)?;
        // Remove whole segments past the cut, then shorten the one it is in.
        while f.segments.len() > first_gone.segment + 1 {
            let s = f.segments.pop().expect("checked");
            fs::remove_file(&s.path)?;
        }
        let seg = f.segments.last_mut().expect("the cut's segment");
        let cut_at = first_gone.offset - RECORD_HEADER as u64;
        seg.file.set_len(cut_at)?;
        seg.written = cut_at;
        seg.file.sync_all()?;
        seg.unsynced = false;
        let dir = f.dir.clone();
        drop(f);
        File::open(&dir)?.sync_all()?;
        self.index.truncate(index as usize);
        Ok(())
    }

    fn read(&mut self, index: Index, out: &mut Vec<u8>) -> Result<(), StoreError> {
        let loc = usize::try_from(index)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| self.index.get(i).copied())
            .ok_or(StoreError::Missing(index))?;
        let len = loc.meta.len as usize;
        out.resize(len, 0);
        let f = lock(&self.files);
        let seg = &f.segments[loc.segment];
        if loc.offset >= seg.written {
            let at = (loc.offset - seg.written) as usize;
            out.copy_from_slice(&f.pending[at..at + len]);
        } else {
            seg.file.read_exact_at(out, loc.offset)?;
        }
        drop(f);
        entry::decode(out, self.max_payload)
            .map(|_| ())
            .map_err(|source| StoreError::Corrupt { index, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apus_core::entry::{EntryHeader, EntryKind, encode, encoded_len};

    fn entry(index: Index, term: u64, payload: &[u8]) -> (EntryMeta, Vec<u8>) {
        let mut buf = vec![0; encoded_len(payload.len())];
        let h = EntryHeader {
            kind: EntryKind::Data,
            payload_len: 0,
            term,
            leader_term: term,
            index,
            pos: index * 1000,
            prev_term: term,
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

    fn fill(s: &mut SegmentStore, from: Index, to: Index) {
        for i in from..=to {
            let (m, b) = entry(i, 1, format!("entry {i}").as_bytes());
            s.append(i, m, &b).unwrap();
        }
    }

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn survives_reopen_after_sync() {
        let d = dir();
        let (mut s, r) = SegmentStore::open(d.path(), 1024).unwrap();
        assert_eq!(r.entries, 0);
        fill(&mut s, 1, 100);
        s.sync_handle().flush().unwrap().sync().unwrap();
        s.save_hard_state(HardState {
            term: 7,
            voted_for: Some(NodeId(2)),
        })
        .unwrap();
        drop(s);
        let (mut s, r) = SegmentStore::open(d.path(), 1024).unwrap();
        assert_eq!((r.entries, r.cut_bytes), (100, 0));
        assert_eq!(s.hard_state().term, 7);
        assert_eq!(s.hard_state().voted_for, Some(NodeId(2)));
        let mut out = Vec::new();
        s.read(42, &mut out).unwrap();
        assert_eq!(out, entry(42, 1, b"entry 42").1);
    }

    #[test]
    fn reads_see_unflushed_entries() {
        let d = dir();
        let (mut s, _) = SegmentStore::open(d.path(), 1024).unwrap();
        fill(&mut s, 1, 3);
        let mut out = Vec::new();
        s.read(2, &mut out).unwrap();
        assert_eq!(out, entry(2, 1, b"entry 2").1);
    }

    #[test]
    fn a_torn_tail_is_cut_at_the_last_valid_entry() {
        let d = dir();
        let (mut s, _) = SegmentStore::open(d.path(), 1024).unwrap();
        fill(&mut s, 1, 10);
        s.sync_handle().flush().unwrap();
        drop(s);
        let seg = d.path().join(format!("log-{:020}.seg", 1));
        let full = fs::read(&seg).unwrap();
        for cut in [full.len() - 1, full.len() - 30, full.len() - 90] {
            fs::write(&seg, &full[..cut]).unwrap();
            let (s, r) = SegmentStore::open(d.path(), 1024).unwrap();
            assert!(r.entries < 10 && r.entries >= 8, "cut {cut}: {r:?}");
            assert!(r.cut_reason.is_some());
            assert_eq!(s.last_index(), r.entries);
        }
    }

    #[test]
    fn corruption_in_the_middle_cuts_there() {
        let d = dir();
        let (mut s, _) = SegmentStore::open(d.path(), 1024).unwrap();
        fill(&mut s, 1, 10);
        s.sync_handle().flush().unwrap();
        drop(s);
        let seg = d.path().join(format!("log-{:020}.seg", 1));
        let mut bytes = fs::read(&seg).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x40;
        fs::write(&seg, &bytes).unwrap();
        let (mut s, r) = SegmentStore::open(d.path(), 1024).unwrap();
        assert!(r.entries < 10, "{r:?}");
        // The store keeps working from the cut.
        let next = s.last_index() + 1;
        fill(&mut s, next, next + 2);
        s.sync_handle().flush().unwrap();
        drop(s);
        let (s, r) = SegmentStore::open(d.path(), 1024).unwrap();
        assert_eq!(s.last_index(), next + 2);
        assert_eq!(r.cut_bytes, 0);
    }

    #[test]
    fn truncate_then_append_survives_reopen() {
        let d = dir();
        let (mut s, _) = SegmentStore::open(d.path(), 1024).unwrap();
        fill(&mut s, 1, 20);
        s.truncate_after(12).unwrap();
        let (m, b) = entry(13, 2, b"new 13");
        s.append(13, m, &b).unwrap();
        s.sync_handle().flush().unwrap();
        drop(s);
        let (mut s, r) = SegmentStore::open(d.path(), 1024).unwrap();
        assert_eq!(r.entries, 13);
        assert_eq!(s.meta(13).unwrap().term, 2);
        let mut out = Vec::new();
        s.read(13, &mut out).unwrap();
        assert_eq!(out, b);
    }

    #[test]
    fn segments_rotate_truncate_and_recover() {
        let d = dir();
        let (mut s, _) = SegmentStore::open_with(d.path(), 1024, 1000).unwrap();
        fill(&mut s, 1, 60);
        s.sync_handle().flush().unwrap().sync().unwrap();
        let segments = || {
            fs::read_dir(d.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .ends_with(".seg")
                })
                .count()
        };
        let before = segments();
        assert!(before >= 5, "{before} segments");
        // Cut in an early segment: later segments go.
        s.truncate_after(15).unwrap();
        assert!(segments() < before);
        fill(&mut s, 16, 30);
        s.sync_handle().flush().unwrap();
        drop(s);
        // A torn last record in the last segment.
        let mut names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        names.sort();
        let last = names.last().unwrap();
        let b = fs::read(last).unwrap();
        fs::write(last, &b[..b.len() - 3]).unwrap();
        let (mut s, r) = SegmentStore::open_with(d.path(), 1024, 1000).unwrap();
        assert_eq!(r.entries, 29, "{r:?}");
        for i in 1..=29 {
            let mut out = Vec::new();
            s.read(i, &mut out).unwrap();
            assert_eq!(
                out,
                entry(i, 1, format!("entry {i}").as_bytes()).1,
                "entry {i}"
            );
        }
    }

    #[test]
    fn a_corrupt_hard_state_is_refused_clearly() {
        let d = dir();
        let (mut s, _) = SegmentStore::open(d.path(), 1024).unwrap();
        s.save_hard_state(HardState {
            term: 3,
            voted_for: None,
        })
        .unwrap();
        drop(s);
        let p = d.path().join(HARDSTATE);
        let mut b = fs::read(&p).unwrap();
        b[5] ^= 1;
        fs::write(&p, b).unwrap();
        let e = SegmentStore::open(d.path(), 1024).unwrap_err();
        assert!(e.to_string().contains("hardstate is corrupt"), "{e}");
    }
}
