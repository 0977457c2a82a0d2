//! The local registered memory region.
//!
//! Every node exposes one region. Remote peers write into it (an RDMA NIC, or
//! a transport's receiver thread) while the engine polls it, so the bytes are
//! shared mutable memory. The region is therefore an array of `AtomicU64`
//! words: every access is an atomic word load (`Acquire`) or store
//! (`Release`), which is race-free in Rust's memory model and compiles to
//! plain moves on x86-64.
//!
//! Ordering contract for writers (the transports follow it): a write is
//! stored in ascending address order. A reader that observes the last word of
//! a write (an entry's seal, a record's checksum) therefore observes all of it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A handle to a node's region. Clones share the same memory: the engine
/// holds one, the transport that lands remote writes holds another.
#[derive(Clone)]
pub struct Region {
    words: Arc<[AtomicU64]>,
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region").field("len", &self.len()).finish()
    }
}

impl Region {
    /// A zeroed region of `len` bytes, rounded up to a whole number of words.
    pub fn new(len: usize) -> Region {
        let words = len.div_ceil(8);
        Region {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The region's size in bytes.
    pub fn len(&self) -> usize {
        self.words.len() * 8
    }

    /// Whether the region has no bytes.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// The address of the first byte, for registering the region with a NIC.
    pub fn as_ptr(&self) -> *const u8 {
        self.words.as_ptr().cast()
    }

    /// Whether `offset..offset + len` lies inside the region.
    pub fn contains(&self, offset: usize, len: usize) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.len())
    }

    /// Copies `out.len()` bytes starting at `offset` into `out`.
    ///
    /// # Panics
    /// If the range is outside the region (a caller bug, never input-driven:
    /// every offset the engine uses comes from the validated layout).
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        assert!(
            self.contains(offset, out.len()),
            "region read out of bounds"
        );
        let mut done = 0;
        // Whole aligned words (every slot and most ring entries): a fixed
        // 8-byte copy per word, which compiles to one load and one store.
        if offset % 8 == 0 {
            let first = offset / 8;
            done = out.len() / 8 * 8;
            for (cell, chunk) in self.words[first..].iter().zip(out.chunks_exact_mut(8)) {
                chunk.copy_from_slice(&cell.load(Ordering::Acquire).to_le_bytes());
            }
        }
        while done < out.len() {
            let at = offset + done;
            let word = self.words[at / 8].load(Ordering::Acquire).to_le_bytes();
            let skip = at % 8;
            let n = (8 - skip).min(out.len() - done);
            out[done..done + n].copy_from_slice(&word[skip..skip + n]);
            done += n;
        }
    }

    /// Stores `data` at `offset`, in ascending address order.
    ///
    /// # Panics
    /// If the range is outside the region.
    pub fn write(&self, offset: usize, data: &[u8]) {
        assert!(
            self.contains(offset, data.len()),
            "region write out of bounds"
        );
        let mut done = 0;
        if offset % 8 == 0 {
            let first = offset / 8;
            let chunks = data.chunks_exact(8);
            done = data.len() - chunks.remainder().len();
            for (cell, chunk) in self.words[first..].iter().zip(chunks) {
                let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
                cell.store(word, Ordering::Release);
            }
        }
        while done < data.len() {
            let at = offset + done;
            let skip = at % 8;
            let n = (8 - skip).min(data.len() - done);
            let cell = &self.words[at / 8];
            if n == 8 {
                let word = u64::from_le_bytes(data[done..done + 8].try_into().expect("8 bytes"));
                cell.store(word, Ordering::Release);
            } else {
                // A partial word: merge without clobbering the other bytes,
                // which another writer may own.
                let _ = cell.fetch_update(Ordering::Release, Ordering::Acquire, |old| {
                    let mut word = old.to_le_bytes();
                    word[skip..skip + n].copy_from_slice(&data[done..done + n]);
                    Some(u64::from_le_bytes(word))
                });
            }
            done += n;
        }
    }

    /// Whether the aligned words at `offset` hold exactly `words` (each
    /// loaded once, in ascending order).
    ///
    /// # Panics
    /// If `offset` is not 8-aligned or the words lie outside the region.
    #[inline]
    pub fn holds_words(&self, offset: usize, words: &[u64]) -> bool {
        assert!(offset % 8 == 0, "unaligned word compare");
        let cells = &self.words[offset / 8..offset / 8 + words.len()];
        cells
            .iter()
            .zip(words)
            .all(|(cell, &w)| cell.load(Ordering::Acquire) == w)
    }

    /// Loads the aligned little-endian word at `offset`.
    ///
    /// # Panics
    /// If `offset` is not 8-aligned or outside the region.
    #[inline]
    pub fn load_u64(&self, offset: usize) -> u64 {
        assert!(offset % 8 == 0, "unaligned word load");
        self.words[offset / 8].load(Ordering::Acquire)
    }

    /// Atomically replaces the aligned word at `offset` with `new` if it
    /// equals `expected`; returns the value found. This is how transports
    /// without hardware atomics serve a remote compare-and-swap.
    ///
    /// # Panics
    /// If `offset` is not 8-aligned or outside the region.
    pub fn compare_and_swap(&self, offset: usize, expected: u64, new: u64) -> u64 {
        assert!(offset % 8 == 0, "unaligned compare-and-swap");
        match self.words[offset / 8].compare_exchange(
            expected,
            new,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(v) | Err(v) => v,
        }
    }

    /// Fills `offset..offset + len` with zeros.
    pub fn zero(&self, offset: usize, len: usize) {
        const ZEROS: [u8; 256] = [0; 256];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROS.len());
            self.write(offset + done, &ZEROS[..n]);
            done += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_round_trip() {
        let r = Region::new(64);
        let data: Vec<u8> = (1..=29).collect();
        r.write(3, &data);
        let mut out = vec![0; 29];
        r.read(3, &mut out);
        assert_eq!(out, data);
        let mut edge = [9u8; 3];
        r.read(0, &mut edge);
        assert_eq!(edge, [0, 0, 0], "bytes before the write are untouched");
        let mut after = [9u8; 2];
        r.read(32, &mut after);
        assert_eq!(after, [0, 0]);
    }

    #[test]
    fn aligned_reads_and_writes_with_a_partial_tail() {
        let r = Region::new(64);
        r.write(0, &[0xff; 64]);
        let data: Vec<u8> = (1..=21).collect();
        r.write(16, &data);
        let mut out = vec![0; 24];
        r.read(16, &mut out);
        assert_eq!(&out[..21], &data[..]);
        assert_eq!(
            &out[21..],
            &[0xff; 3],
            "the tail word's other bytes are kept"
        );
        let mut whole = [0u8; 8];
        r.read(8, &mut whole);
        assert_eq!(whole, [0xff; 8], "bytes before the write are untouched");
    }

    #[test]
    fn clones_share_memory() {
        let a = Region::new(16);
        let b = a.clone();
        a.write(8, &7u64.to_le_bytes());
        assert_eq!(b.load_u64(8), 7);
    }

    #[test]
    fn compare_and_swap_semantics() {
        let r = Region::new(16);
        assert_eq!(r.compare_and_swap(8, 0, 5), 0);
        assert_eq!(r.compare_and_swap(8, 0, 6), 5, "mismatch leaves the word");
        assert_eq!(r.load_u64(8), 5);
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn out_of_bounds_read_panics() {
        let r = Region::new(8);
        let mut b = [0u8; 4];
        r.read(6, &mut b);
    }
}
