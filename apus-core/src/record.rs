//! Control records: the fixed-size messages replicas leave in each other's
//! control blocks (heartbeats and commit indices, acknowledgements, votes)
//! and the status record a new leader reads remotely.
//!
//! ```text
//!   0  magic    u32  "APR1"
//!   4  version  u8   LAYOUT_VERSION
//!   5  kind     u8   which record
//!   6  reserved u16  zero
//!   8  fields   14 × u64, unused ones zero
//! 120  reserved u32  zero
//! 124  checksum u32  CRC-32C of bytes 0..124, stored last
//! ```
//!
//! A slot is overwritten in place, so a reader can see a half-written record;
//! the checksum (the last word, stored last) rejects it and the reader simply
//! looks again on its next poll.

use crate::layout::{LAYOUT_VERSION, SLOT_LEN};
use crate::types::{Index, NodeId, Pos, Term};

const MAGIC: u32 = u32::from_le_bytes(*b"APR1");
pub(crate) const FIELDS: usize = 14;
const CRC_AT: usize = SLOT_LEN - 4;
// The header word, the fields, the reserved word and the checksum fill a
// slot exactly, in whole words (what the inbound cache compares).
const _: () = assert!(8 + FIELDS * 8 + 8 == SLOT_LEN && SLOT_LEN % 8 == 0);

/// Why a slot does not hold a valid record.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum RecordError {
    /// Not a record (an empty slot, or garbage).
    #[error("not a record (bad magic {0:#010x})")]
    BadMagic(u32),
    /// Written by an incompatible version.
    #[error("unsupported record version {0}")]
    Version(u8),
    /// A record of another kind than the slot holds.
    #[error("record kind {found} where {expected} was expected")]
    Kind {
        /// The kind the slot holds.
        expected: u8,
        /// The kind found.
        found: u8,
    },
    /// Reserved bytes are not zero.
    #[error("reserved record bytes set")]
    Reserved,
    /// Torn or corrupted.
    #[error("record checksum mismatch")]
    Checksum,
    /// A field holds an impossible value.
    #[error("invalid record field: {0}")]
    Field(&'static str),
}

/// A fixed-size control record.
pub trait Record: Sized {
    /// The kind byte.
    const KIND: u8;
    /// The record's fields as words.
    fn to_words(&self) -> [u64; FIELDS];
    /// Rebuilds the record from words, validating every field.
    fn from_words(w: &[u64; FIELDS]) -> Result<Self, RecordError>;

    /// Encodes into one slot.
    fn encode(&self) -> [u8; SLOT_LEN] {
        let mut out = [0u8; SLOT_LEN];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4] = LAYOUT_VERSION;
        out[5] = Self::KIND;
        for (i, w) in self.to_words().iter().enumerate() {
            out[8 + i * 8..16 + i * 8].copy_from_slice(&w.to_le_bytes());
        }
        let crc = crc32c::crc32c(&out[..CRC_AT]);
        out[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and validates one slot.
    fn decode(slot: &[u8; SLOT_LEN]) -> Result<Self, RecordError> {
        Self::from_words(&check_slot(slot, Self::KIND)?)
    }
}

/// The words of one slot.
pub(crate) const SLOT_WORDS: usize = SLOT_LEN / 8;

/// The fields of a record of `kind`, once the slot's framing (magic,
/// checksum, version, kind, reserved bytes) holds; the fields themselves are
/// validated by the record type's `from_words`.
pub(crate) fn check_slot(slot: &[u8; SLOT_LEN], kind: u8) -> Result<[u64; FIELDS], RecordError> {
    let magic = u32::from_le_bytes(slot[0..4].try_into().expect("4 bytes"));
    if magic != MAGIC {
        return Err(RecordError::BadMagic(magic));
    }
    let crc = u32::from_le_bytes(slot[CRC_AT..].try_into().expect("4 bytes"));
    if crc32c::crc32c(&slot[..CRC_AT]) != crc {
        return Err(RecordError::Checksum);
    }
    if slot[4] != LAYOUT_VERSION {
        return Err(RecordError::Version(slot[4]));
    }
    if slot[5] != kind {
        return Err(RecordError::Kind {
            expected: kind,
            found: slot[5],
        });
    }
    if slot[6] != 0 || slot[7] != 0 || slot[120..CRC_AT].iter().any(|&b| b != 0) {
        return Err(RecordError::Reserved);
    }
    let mut w = [0u64; FIELDS];
    for (i, word) in w.iter_mut().enumerate() {
        *word = u64::from_le_bytes(slot[8 + i * 8..16 + i * 8].try_into().expect("8 bytes"));
    }
    Ok(w)
}

fn unused_zero(w: &[u64; FIELDS], used: usize) -> Result<(), RecordError> {
    if w[used..].iter().any(|&x| x != 0) {
        return Err(RecordError::Reserved);
    }
    Ok(())
}

/// A word that holds a flag: 0 or 1, nothing else.
fn boolean(word: u64, what: &'static str) -> Result<bool, RecordError> {
    match word {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(RecordError::Field(what)),
    }
}

/// Written by the leader of `term` into each follower's leader slot: a
/// heartbeat, the commit index, and the sync command that tells the follower
/// where the leader's stream into its ring begins.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct LeaderRecord {
    /// The leader's term.
    pub term: Term,
    /// Heartbeat counter; changes on every heartbeat.
    pub seq: u64,
    /// Bumped on every write of this record to this follower: of the two
    /// copies, the valid one with the higher `(term, version)` is current.
    pub version: u64,
    /// The leader's commit index.
    pub commit: Index,
    /// The leader's last log index (for lag reporting and recovery).
    pub last_index: Index,
    /// Bumped each time the leader (re)synchronises this follower; 0 = none yet.
    pub sync_seq: u64,
    /// The follower's log matches the leader's up to this index...
    pub sync_index: Index,
    /// ...whose term is this...
    pub sync_term: Term,
    /// ...and the leader's stream continues at this ring position.
    pub sync_pos: Pos,
}

impl Record for LeaderRecord {
    const KIND: u8 = 1;
    fn to_words(&self) -> [u64; FIELDS] {
        let mut w = [0; FIELDS];
        w[..9].copy_from_slice(&[
            self.term,
            self.seq,
            self.commit,
            self.last_index,
            self.sync_seq,
            self.sync_index,
            self.sync_term,
            self.sync_pos,
            self.version,
        ]);
        w
    }
    fn from_words(w: &[u64; FIELDS]) -> Result<Self, RecordError> {
        unused_zero(w, 9)?;
        let r = LeaderRecord {
            term: w[0],
            seq: w[1],
            commit: w[2],
            last_index: w[3],
            sync_seq: w[4],
            sync_index: w[5],
            sync_term: w[6],
            sync_pos: w[7],
            version: w[8],
        };
        if r.term == 0 {
            return Err(RecordError::Field("leader term 0"));
        }
        if r.commit > r.last_index || r.sync_index > r.last_index {
            return Err(RecordError::Field("index beyond the leader's log"));
        }
        if r.sync_term > r.term {
            return Err(RecordError::Field("sync term beyond the leader's term"));
        }
        Ok(r)
    }
}

/// Written by a follower into its leader's ack slot.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct AckRecord {
    /// The follower's current term (a higher one deposes the reader).
    pub current_term: Term,
    /// Term of the leader whose stream the follower accepts.
    pub source_term: Term,
    /// The sync sequence the follower applied from that leader.
    pub sync_seq: u64,
    /// Changes on every write, so the leader can tell the follower is alive.
    pub seq: u64,
    /// Highest index known to match the leader's log and be persisted as the
    /// durability mode requires.
    pub acked_index: Index,
    /// Ring position the follower expects next (its free window starts here).
    pub next_pos: Pos,
    /// A sync sequence of the leader of `current_term` that the follower
    /// could not apply (0 = none): that leader must read its status again.
    pub rejected_sync: u64,
    /// The follower's last log index.
    pub last_index: Index,
}

impl Record for AckRecord {
    const KIND: u8 = 2;
    fn to_words(&self) -> [u64; FIELDS] {
        let mut w = [0; FIELDS];
        w[..8].copy_from_slice(&[
            self.current_term,
            self.source_term,
            self.sync_seq,
            self.seq,
            self.acked_index,
            self.next_pos,
            self.rejected_sync,
            self.last_index,
        ]);
        w
    }
    fn from_words(w: &[u64; FIELDS]) -> Result<Self, RecordError> {
        unused_zero(w, 8)?;
        let r = AckRecord {
            current_term: w[0],
            source_term: w[1],
            sync_seq: w[2],
            seq: w[3],
            acked_index: w[4],
            next_pos: w[5],
            rejected_sync: w[6],
            last_index: w[7],
        };
        if r.source_term > r.current_term {
            return Err(RecordError::Field("source term beyond current term"));
        }
        if r.acked_index > r.last_index {
            return Err(RecordError::Field("acked index beyond the log"));
        }
        Ok(r)
    }
}

/// Written by a candidate into each voter's vote-request slot.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct VoteRequest {
    /// The candidate's term (a pre-vote: the term it would stand in).
    pub term: Term,
    /// The candidate's last log index...
    pub last_index: Index,
    /// ...and its term.
    pub last_term: Term,
    /// A pre-vote (Raft thesis 9.6): would the voter grant a vote in
    /// `term`? Nobody's term or vote changes on it.
    pub pre: bool,
}

impl Record for VoteRequest {
    const KIND: u8 = 3;
    fn to_words(&self) -> [u64; FIELDS] {
        let mut w = [0; FIELDS];
        w[..4].copy_from_slice(&[
            self.term,
            self.last_index,
            self.last_term,
            u64::from(self.pre),
        ]);
        w
    }
    fn from_words(w: &[u64; FIELDS]) -> Result<Self, RecordError> {
        unused_zero(w, 4)?;
        let r = VoteRequest {
            term: w[0],
            last_index: w[1],
            last_term: w[2],
            pre: boolean(w[3], "pre-vote is not a boolean")?,
        };
        if r.term == 0 || r.last_term >= r.term {
            return Err(RecordError::Field("vote request terms"));
        }
        if (r.last_index == 0) != (r.last_term == 0) {
            return Err(RecordError::Field("vote request log position"));
        }
        Ok(r)
    }
}

/// Written by a voter into the candidate's vote-response slot.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct VoteResponse {
    /// The voter's current term (a pre-vote's answer: the term asked about).
    pub term: Term,
    /// Whether the vote is granted for that term.
    pub granted: bool,
    /// The answer to a pre-vote.
    pub pre: bool,
    /// The voter lost its log in a restart (memory mode) and may not vote
    /// until a leader has resent it: a candidate that hears this from too
    /// many voters knows the cluster lost a majority's memory.
    pub recovering: bool,
}

impl Record for VoteResponse {
    const KIND: u8 = 4;
    fn to_words(&self) -> [u64; FIELDS] {
        let mut w = [0; FIELDS];
        w[0] = self.term;
        w[1] = u64::from(self.granted);
        w[2] = u64::from(self.pre);
        w[3] = u64::from(self.recovering);
        w
    }
    fn from_words(w: &[u64; FIELDS]) -> Result<Self, RecordError> {
        unused_zero(w, 4)?;
        Ok(VoteResponse {
            term: w[0],
            granted: boolean(w[1], "granted is not a boolean")?,
            pre: boolean(w[2], "pre-vote is not a boolean")?,
            recovering: boolean(w[3], "recovering is not a boolean")?,
        })
    }
}

/// A node's own status, kept current in its region and read remotely by a
/// leader before it synchronises the node ("reads their tails").
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct StatusRecord {
    /// Current term.
    pub term: Term,
    /// The peer holding the log write grant, if any.
    pub writer: Option<NodeId>,
    /// Whether a grant change is still settling (the tail may still move).
    pub settling: bool,
    /// Whether the node lost its log in a restart and may not vote yet.
    pub recovering: bool,
    /// Last log index...
    pub last_index: Index,
    /// ...and its term.
    pub last_term: Term,
    /// Commit index known to the node.
    pub commit: Index,
    /// Ring position the node expects next.
    pub next_pos: Pos,
    /// Ring position just after the last log entry.
    pub last_end_pos: Pos,
}

const NO_WRITER: u64 = u64::MAX;

impl Record for StatusRecord {
    const KIND: u8 = 5;
    fn to_words(&self) -> [u64; FIELDS] {
        let mut w = [0; FIELDS];
        w[..8].copy_from_slice(&[
            self.term,
            self.writer.map_or(NO_WRITER, |n| u64::from(n.0)),
            u64::from(self.settling) | u64::from(self.recovering) << 1,
            self.last_index,
            self.last_term,
            self.commit,
            self.next_pos,
            self.last_end_pos,
        ]);
        w
    }
    fn from_words(w: &[u64; FIELDS]) -> Result<Self, RecordError> {
        unused_zero(w, 8)?;
        let writer = match w[1] {
            NO_WRITER => None,
            v => Some(NodeId(
                u8::try_from(v).map_err(|_| RecordError::Field("writer id"))?,
            )),
        };
        if w[2] > 3 {
            return Err(RecordError::Field("status flags"));
        }
        let r = StatusRecord {
            term: w[0],
            writer,
            settling: w[2] & 1 != 0,
            recovering: w[2] & 2 != 0,
            last_index: w[3],
            last_term: w[4],
            commit: w[5],
            next_pos: w[6],
            last_end_pos: w[7],
        };
        if r.commit > r.last_index || r.last_term > r.term {
            return Err(RecordError::Field("status log position"));
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let l = LeaderRecord {
            term: 5,
            seq: 77,
            version: 3,
            commit: 10,
            last_index: 12,
            sync_seq: 2,
            sync_index: 9,
            sync_term: 4,
            sync_pos: 4096,
        };
        assert_eq!(LeaderRecord::decode(&l.encode()), Ok(l));
        let a = AckRecord {
            current_term: 5,
            source_term: 5,
            sync_seq: 2,
            seq: 1,
            acked_index: 11,
            next_pos: 5000,
            rejected_sync: 0,
            last_index: 12,
        };
        assert_eq!(AckRecord::decode(&a.encode()), Ok(a));
        for pre in [false, true] {
            let v = VoteRequest {
                term: 6,
                last_index: 12,
                last_term: 5,
                pre,
            };
            assert_eq!(VoteRequest::decode(&v.encode()), Ok(v));
            let r = VoteResponse {
                term: 6,
                granted: !pre,
                pre,
                recovering: pre,
            };
            assert_eq!(VoteResponse::decode(&r.encode()), Ok(r));
        }
        let s = StatusRecord {
            term: 6,
            writer: Some(NodeId(2)),
            settling: true,
            recovering: false,
            last_index: 12,
            last_term: 5,
            commit: 10,
            next_pos: 5000,
            last_end_pos: 5000,
        };
        assert_eq!(StatusRecord::decode(&s.encode()), Ok(s));
    }

    #[test]
    fn empty_slot_and_wrong_kind_are_rejected() {
        assert_eq!(
            LeaderRecord::decode(&[0; SLOT_LEN]),
            Err(RecordError::BadMagic(0))
        );
        let v = VoteResponse {
            term: 1,
            granted: false,
            pre: false,
            recovering: false,
        };
        assert_eq!(
            LeaderRecord::decode(&v.encode()),
            Err(RecordError::Kind {
                expected: 1,
                found: 4
            })
        );
    }

    #[test]
    fn torn_record_is_rejected() {
        let a = LeaderRecord {
            term: 1,
            seq: 1,
            ..Default::default()
        }
        .encode();
        let b = LeaderRecord {
            term: 2,
            seq: 9,
            commit: 3,
            last_index: 3,
            ..Default::default()
        }
        .encode();
        let mut torn = a;
        torn[..64].copy_from_slice(&b[..64]);
        assert_eq!(LeaderRecord::decode(&torn), Err(RecordError::Checksum));
    }
}
