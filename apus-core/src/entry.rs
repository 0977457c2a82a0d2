//! Log entries: the bytes a leader writes into every replica's ring.
//!
//! ```text
//!  0  magic        u32   "APE1" little-endian: 0x3145_5041
//!  4  version      u8    LAYOUT_VERSION
//!  5  kind         u8    EntryKind
//!  6  reserved     u16   zero
//!  8  payload_len  u32
//! 12  reserved     u32   zero
//! 16  term         u64   term in which the leader created the entry
//! 24  leader_term  u64   term of the leader that wrote this copy
//! 32  index        u64
//! 40  pos          u64   absolute ring position of this entry
//! 48  prev_term    u64   term of entry index - 1 (log matching)
//! 56  commit       u64   writer's commit index (piggybacked)
//! 64  conn         u64   connection id (0 for library use)
//! 72  payload      payload_len bytes, zero-padded to a multiple of 8
//!  …  checksum     u32   CRC-32C of every byte before it
//!  …  seal         u32   SEAL
//! ```
//!
//! Entries never straddle the end of the ring: one that does not fit in the
//! rest of a lap starts at the next lap. A reader trusts an entry only when
//! the seal and checksum hold *and* the header names the exact position,
//! index and writer term it expects, so a torn write, a stale entry from an
//! earlier lap, and a copy written by a deposed leader are all refused.

use crate::layout::LAYOUT_VERSION;
use crate::types::{Index, Pos, Term};

/// Bytes before the payload.
pub const HEADER_LEN: usize = 72;
/// Bytes after the (padded) payload: checksum and seal.
pub const TRAILER_LEN: usize = 8;
/// Every entry's size and position are multiples of this.
pub const ENTRY_ALIGN: usize = 8;

const MAGIC: u32 = u32::from_le_bytes(*b"APE1");
/// The last word of every entry. Transports store a write in ascending
/// address order, so a visible seal means the whole entry has landed.
pub const SEAL: u32 = u32::from_le_bytes(*b"SEAL");

/// What an entry records.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[repr(u8)]
pub enum EntryKind {
    /// Written by a new leader to commit the entries of earlier terms.
    Noop = 1,
    /// Opaque application bytes (library use), or bytes a client sent.
    Data = 2,
    /// A client connection was accepted (`conn` is its id).
    Connect = 3,
    /// A client connection was closed.
    Close = 4,
    /// A consistency check: every replica records its server's digest at
    /// this point of the log (`apus check`).
    Check = 5,
}

impl EntryKind {
    fn from_u8(v: u8) -> Option<EntryKind> {
        Some(match v {
            1 => EntryKind::Noop,
            2 => EntryKind::Data,
            3 => EntryKind::Connect,
            4 => EntryKind::Close,
            5 => EntryKind::Check,
            _ => return None,
        })
    }
}

/// The fixed fields of an entry.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct EntryHeader {
    /// What the entry records.
    pub kind: EntryKind,
    /// Payload length in bytes.
    pub payload_len: u32,
    /// Term in which the entry was created.
    pub term: Term,
    /// Term of the leader that wrote this copy into the ring.
    pub leader_term: Term,
    /// Log index.
    pub index: Index,
    /// Absolute ring position.
    pub pos: Pos,
    /// Term of the previous entry.
    pub prev_term: Term,
    /// The writer's commit index when it wrote this copy.
    pub commit: Index,
    /// Connection id.
    pub conn: u64,
}

/// Why bytes are not a valid entry.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum EntryError {
    /// Fewer bytes than the header, or than the header says the entry needs.
    #[error("entry truncated: need {needed} bytes, have {have}")]
    Truncated {
        /// Bytes the entry needs.
        needed: usize,
        /// Bytes available.
        have: usize,
    },
    /// The magic number is wrong: not an entry, or garbage.
    #[error("not an entry (bad magic {0:#010x})")]
    BadMagic(u32),
    /// Written by an incompatible version.
    #[error("unsupported entry version {0}")]
    Version(u8),
    /// Unknown entry kind.
    #[error("unknown entry kind {0}")]
    Kind(u8),
    /// Reserved bits are set.
    #[error("reserved entry bits set")]
    Reserved,
    /// The payload is larger than the configured maximum.
    #[error("entry payload of {len} bytes exceeds the limit of {max}")]
    Oversized {
        /// Declared payload length.
        len: usize,
        /// Configured limit.
        max: usize,
    },
    /// The seal is missing: the entry has not fully landed (or is garbage).
    #[error("entry seal missing")]
    Unsealed,
    /// The checksum does not match: torn or corrupted.
    #[error("entry checksum mismatch")]
    Checksum,
    /// Padding after the payload is not zero.
    #[error("entry padding not zero")]
    Padding,
    /// A well-formed entry, but not the one expected here (another position,
    /// index or writer term: a stale lap, or a deposed leader's copy).
    #[error("unexpected entry: {0}")]
    Unexpected(&'static str),
}

/// Total encoded size of an entry with `payload_len` payload bytes.
pub fn encoded_len(payload_len: usize) -> usize {
    HEADER_LEN + payload_len.next_multiple_of(ENTRY_ALIGN) + TRAILER_LEN
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl EntryHeader {
    /// Encoded size of the whole entry.
    pub fn encoded_len(&self) -> usize {
        encoded_len(self.payload_len as usize)
    }

    /// Position just after this entry.
    pub fn end_pos(&self) -> Pos {
        self.pos + self.encoded_len() as u64
    }

    fn write_to(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4] = LAYOUT_VERSION;
        out[5] = self.kind as u8;
        out[6..8].fill(0);
        out[8..12].copy_from_slice(&self.payload_len.to_le_bytes());
        out[12..16].fill(0);
        for (at, v) in [
            (16, self.term),
            (24, self.leader_term),
            (32, self.index),
            (40, self.pos),
            (48, self.prev_term),
            (56, self.commit),
            (64, self.conn),
        ] {
            out[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Parses the header alone, checking everything but the checksum. Used
    /// to learn an entry's length before reading the rest of it.
    pub fn parse(bytes: &[u8], max_payload: usize) -> Result<EntryHeader, EntryError> {
        if bytes.len() < HEADER_LEN {
            return Err(EntryError::Truncated {
                needed: HEADER_LEN,
                have: bytes.len(),
            });
        }
        let magic = get_u32(bytes, 0);
        if magic != MAGIC {
            return Err(EntryError::BadMagic(magic));
        }
        if bytes[4] != LAYOUT_VERSION {
            return Err(EntryError::Version(bytes[4]));
        }
        let kind = EntryKind::from_u8(bytes[5]).ok_or(EntryError::Kind(bytes[5]))?;
        if bytes[6] != 0 || bytes[7] != 0 || get_u32(bytes, 12) != 0 {
            return Err(EntryError::Reserved);
        }
        let payload_len = get_u32(bytes, 8);
        if payload_len as usize > max_payload {
            return Err(EntryError::Oversized {
                len: payload_len as usize,
                max: max_payload,
            });
        }
        Ok(EntryHeader {
            kind,
            payload_len,
            term: get_u64(bytes, 16),
            leader_term: get_u64(bytes, 24),
            index: get_u64(bytes, 32),
            pos: get_u64(bytes, 40),
            prev_term: get_u64(bytes, 48),
            commit: get_u64(bytes, 56),
            conn: get_u64(bytes, 64),
        })
    }
}

/// Encodes an entry into `out`, which must be exactly
/// `encoded_len(payload.len())` bytes. `header.payload_len` is taken from
/// `payload`.
pub fn encode(header: &EntryHeader, payload: &[u8], out: &mut [u8]) {
    let total = encoded_len(payload.len());
    assert_eq!(out.len(), total, "entry buffer has the wrong size");
    let header = EntryHeader {
        payload_len: u32::try_from(payload.len()).expect("payload fits u32"),
        ..*header
    };
    header.write_to(out);
    out[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
    out[HEADER_LEN + payload.len()..total - TRAILER_LEN].fill(0);
    seal(out);
}

/// Recomputes the checksum and seal of an encoded entry in place.
fn seal(entry: &mut [u8]) {
    let body = entry.len() - TRAILER_LEN;
    let crc = crc32c::crc32c(&entry[..body]);
    entry[body..body + 4].copy_from_slice(&crc.to_le_bytes());
    entry[body + 4..].copy_from_slice(&SEAL.to_le_bytes());
}

/// Rewrites the writer fields (`leader_term`, `commit`) of a valid encoded
/// entry and reseals it. This is how a leader re-sends an entry of an earlier
/// term under its own term.
pub fn rewrite_writer(entry: &mut [u8], leader_term: Term, commit: Index) {
    entry[24..32].copy_from_slice(&leader_term.to_le_bytes());
    entry[56..64].copy_from_slice(&commit.to_le_bytes());
    seal(entry);
}

/// Decodes and fully validates one entry occupying the start of `bytes`.
/// Returns the header and the payload.
pub fn decode(bytes: &[u8], max_payload: usize) -> Result<(EntryHeader, &[u8]), EntryError> {
    let header = EntryHeader::parse(bytes, max_payload)?;
    let total = header.encoded_len();
    if bytes.len() < total {
        return Err(EntryError::Truncated {
            needed: total,
            have: bytes.len(),
        });
    }
    let body = total - TRAILER_LEN;
    if get_u32(bytes, body + 4) != SEAL {
        return Err(EntryError::Unsealed);
    }
    if crc32c::crc32c(&bytes[..body]) != get_u32(bytes, body) {
        return Err(EntryError::Checksum);
    }
    let payload_end = HEADER_LEN + header.payload_len as usize;
    if bytes[payload_end..body].iter().any(|&b| b != 0) {
        return Err(EntryError::Padding);
    }
    Ok((header, &bytes[HEADER_LEN..payload_end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(payload_len: u32) -> EntryHeader {
        EntryHeader {
            kind: EntryKind::Data,
            payload_len,
            term: 3,
            leader_term: 4,
            index: 17,
            pos: 4096,
            prev_term: 2,
            commit: 15,
            conn: 9,
        }
    }

    #[test]
    fn round_trip() {
        let payload = b"hello, replicated world";
        let mut buf = vec![0; encoded_len(payload.len())];
        encode(&sample(0), payload, &mut buf);
        let (h, p) = decode(&buf, 1024).unwrap();
        assert_eq!(h, sample(payload.len() as u32));
        assert_eq!(p, payload);
        assert_eq!(buf.len() % ENTRY_ALIGN, 0);
        assert_eq!(h.end_pos(), 4096 + buf.len() as u64);
    }

    #[test]
    fn empty_payload() {
        let mut buf = vec![0; encoded_len(0)];
        encode(&sample(0), &[], &mut buf);
        assert_eq!(buf.len(), HEADER_LEN + TRAILER_LEN);
        assert_eq!(decode(&buf, 0).unwrap().1, b"");
    }

    #[test]
    fn rewrite_keeps_payload_and_validates() {
        let mut buf = vec![0; encoded_len(5)];
        encode(&sample(0), b"abcde", &mut buf);
        rewrite_writer(&mut buf, 9, 16);
        let (h, p) = decode(&buf, 64).unwrap();
        assert_eq!((h.leader_term, h.commit, h.term), (9, 16, 3));
        assert_eq!(p, b"abcde");
    }

    #[test]
    fn detects_each_kind_of_damage() {
        let mut good = vec![0; encoded_len(10)];
        encode(&sample(0), b"0123456789", &mut good);
        let n = good.len();

        let mut b = good.clone();
        b[0] ^= 1;
        assert!(matches!(decode(&b, 64), Err(EntryError::BadMagic(_))));
        let mut b = good.clone();
        b[4] = 99;
        assert_eq!(decode(&b, 64), Err(EntryError::Version(99)));
        let mut b = good.clone();
        b[5] = 0;
        assert_eq!(decode(&b, 64), Err(EntryError::Kind(0)));
        let mut b = good.clone();
        b[6] = 1;
        assert_eq!(decode(&b, 64), Err(EntryError::Reserved));
        assert!(matches!(
            decode(&good, 4),
            Err(EntryError::Oversized { len: 10, max: 4 })
        ));
        assert!(matches!(
            decode(&good[..n - 1], 64),
            Err(EntryError::Truncated { .. })
        ));
        assert!(matches!(
            decode(&good[..10], 64),
            Err(EntryError::Truncated { .. })
        ));
        let mut b = good.clone();
        b[n - 1] ^= 0xff;
        assert_eq!(decode(&b, 64), Err(EntryError::Unsealed));
        let mut b = good.clone();
        b[HEADER_LEN + 3] ^= 0x10;
        assert_eq!(decode(&b, 64), Err(EntryError::Checksum));
        let mut b = good.clone();
        b[32] ^= 1; // index
        assert_eq!(decode(&b, 64), Err(EntryError::Checksum));
    }
}
