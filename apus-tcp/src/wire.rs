//! Operation frames: what travels on an established connection.
//!
//! ```text
//! frame  = len u32 (bytes after this field) | type u8 | body
//! WRITE  = op u64 | remote u64 | data                  (len = 17 + data)
//! READ   = op u64 | remote u64 | count u32              (len = 21)
//! CAS    = op u64 | remote u64 | expected u64 | new u64 (len = 33)
//! DONE   = op u64 | status u8 | data                   (len = 10 + data)
//! ```
//!
//! Little-endian throughout. The receiver of WRITE, READ and CAS applies them
//! to its region in arrival order and answers each with one DONE, in the same
//! order; DONE carries the bytes a READ fetched or the old word of a CAS.
//! A frame that is malformed or larger than [`MAX_FRAME`] is a protocol
//! violation: the connection is closed.

use apus_core::{OpError, OpId};

/// Largest frame accepted (a write of a whole 64 MiB ring fits).
pub const MAX_FRAME: usize = 64 << 20;
/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;

const T_WRITE: u8 = 1;
const T_READ: u8 = 2;
const T_CAS: u8 = 3;
const T_DONE: u8 = 4;

/// A decoded frame, borrowing its data from the receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Store `data` at `remote`.
    Write {
        /// Operation id, echoed in DONE.
        op: OpId,
        /// Offset in the receiver's region.
        remote: u64,
        /// The bytes.
        data: &'a [u8],
    },
    /// Send back `count` bytes from `remote`.
    Read {
        /// Operation id.
        op: OpId,
        /// Offset in the receiver's region.
        remote: u64,
        /// Bytes wanted.
        count: u32,
    },
    /// Compare-and-swap the word at `remote`.
    Cas {
        /// Operation id.
        op: OpId,
        /// Offset of an aligned word in the receiver's region.
        remote: u64,
        /// Value expected.
        expected: u64,
        /// Value to store.
        new: u64,
    },
    /// The outcome of an operation this side posted.
    Done {
        /// Operation id.
        op: OpId,
        /// How it ended.
        status: Result<(), OpError>,
        /// Bytes read, or the old word of a CAS (little-endian).
        data: &'a [u8],
    },
}

/// Why bytes are not a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The length prefix exceeds [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// Unknown frame type.
    #[error("unknown frame type {0}")]
    Type(u8),
    /// The body does not have the size its type requires.
    #[error("frame type {kind} with a body of {len} bytes")]
    Length {
        /// Frame type.
        kind: u8,
        /// Body length.
        len: usize,
    },
    /// Unknown DONE status.
    #[error("unknown completion status {0}")]
    Status(u8),
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn status_code(s: Result<(), OpError>) -> u8 {
    match s {
        Ok(()) => 0,
        Err(OpError::AccessDenied) => 1,
        Err(OpError::Unsupported) => 2,
        Err(OpError::PeerUnreachable) => 3,
    }
}

/// Splits the first complete frame off `buf`: `Ok(None)` if more bytes are
/// needed, else the frame and the bytes it took.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, WireError> {
    if buf.len() < LEN_PREFIX {
        return Ok(None);
    }
    let len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    if len == 0 {
        return Err(WireError::Length { kind: 0, len: 0 });
    }
    if buf.len() < LEN_PREFIX + len {
        return Ok(None);
    }
    let body = &buf[LEN_PREFIX + 1..LEN_PREFIX + len];
    let kind = buf[LEN_PREFIX];
    let bad = || WireError::Length {
        kind,
        len: body.len(),
    };
    let frame = match kind {
        T_WRITE => {
            if body.len() < 16 {
                return Err(bad());
            }
            Frame::Write {
                op: OpId(u64_at(body, 0)),
                remote: u64_at(body, 8),
                data: &body[16..],
            }
        }
        T_READ => {
            if body.len() != 20 {
                return Err(bad());
            }
            Frame::Read {
                op: OpId(u64_at(body, 0)),
                remote: u64_at(body, 8),
                count: u32::from_le_bytes(body[16..20].try_into().expect("4 bytes")),
            }
        }
        T_CAS => {
            if body.len() != 32 {
                return Err(bad());
            }
            Frame::Cas {
                op: OpId(u64_at(body, 0)),
                remote: u64_at(body, 8),
                expected: u64_at(body, 16),
                new: u64_at(body, 24),
            }
        }
        T_DONE => {
            if body.len() < 9 {
                return Err(bad());
            }
            let status = match body[8] {
                0 => Ok(()),
                1 => Err(OpError::AccessDenied),
                2 => Err(OpError::Unsupported),
                3 => Err(OpError::PeerUnreachable),
                s => return Err(WireError::Status(s)),
            };
            Frame::Done {
                op: OpId(u64_at(body, 0)),
                status,
                data: &body[9..],
            }
        }
        t => return Err(WireError::Type(t)),
    };
    Ok(Some((frame, LEN_PREFIX + len)))
}

fn header(out: &mut Vec<u8>, kind: u8, body_len: usize) {
    let len = u32::try_from(1 + body_len).expect("frame fits u32");
    out.extend_from_slice(&len.to_le_bytes());
    out.push(kind);
}

/// Appends a WRITE frame whose `len` data bytes the caller fills in at the
/// returned range of `out`.
pub fn encode_write(
    out: &mut Vec<u8>,
    op: OpId,
    remote: u64,
    len: usize,
) -> std::ops::Range<usize> {
    header(out, T_WRITE, 16 + len);
    out.extend_from_slice(&op.0.to_le_bytes());
    out.extend_from_slice(&remote.to_le_bytes());
    let start = out.len();
    out.resize(start + len, 0);
    start..start + len
}

/// Appends a READ frame.
pub fn encode_read(out: &mut Vec<u8>, op: OpId, remote: u64, count: u32) {
    header(out, T_READ, 20);
    out.extend_from_slice(&op.0.to_le_bytes());
    out.extend_from_slice(&remote.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
}

/// Appends a CAS frame.
pub fn encode_cas(out: &mut Vec<u8>, op: OpId, remote: u64, expected: u64, new: u64) {
    header(out, T_CAS, 32);
    for w in [op.0, remote, expected, new] {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// Appends a DONE frame with `len` data bytes the caller fills in at the
/// returned range.
pub fn encode_done(
    out: &mut Vec<u8>,
    op: OpId,
    status: Result<(), OpError>,
    len: usize,
) -> std::ops::Range<usize> {
    header(out, T_DONE, 9 + len);
    out.extend_from_slice(&op.0.to_le_bytes());
    out.push(status_code(status));
    let start = out.len();
    out.resize(start + len, 0);
    start..start + len
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips() {
        let mut b = Vec::new();
        let r = encode_write(&mut b, OpId(7), 4096, 3);
        b[r].copy_from_slice(b"abc");
        encode_read(&mut b, OpId(8), 128, 64);
        encode_cas(&mut b, OpId(9), 256, 1, 2);
        let r = encode_done(&mut b, OpId(10), Err(OpError::AccessDenied), 2);
        b[r].copy_from_slice(b"xy");
        let mut at = 0;
        let mut frames = Vec::new();
        while let Some((f, n)) = decode(&b[at..]).unwrap() {
            frames.push(format!("{f:?}"));
            at += n;
        }
        assert_eq!(at, b.len());
        assert_eq!(frames.len(), 4);
        let (f, _) = decode(&b).unwrap().unwrap();
        assert_eq!(
            f,
            Frame::Write {
                op: OpId(7),
                remote: 4096,
                data: b"abc"
            }
        );
    }

    #[test]
    fn partial_frames_wait() {
        let mut b = Vec::new();
        encode_read(&mut b, OpId(1), 2, 3);
        for cut in 0..b.len() {
            assert_eq!(decode(&b[..cut]), Ok(None));
        }
    }

    #[test]
    fn malformed_frames_are_errors() {
        assert_eq!(
            decode(&[0, 0, 0, 0]),
            Err(WireError::Length { kind: 0, len: 0 })
        );
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0x7f]),
            Err(WireError::TooLarge(0x7fff_ffff))
        );
        assert_eq!(decode(&[1, 0, 0, 0, 99]), Err(WireError::Type(99)));
        assert_eq!(
            decode(&[2, 0, 0, 0, T_READ, 0]),
            Err(WireError::Length {
                kind: T_READ,
                len: 1
            })
        );
        let mut b = Vec::new();
        encode_done(&mut b, OpId(1), Ok(()), 0);
        b[4 + 1 + 8] = 9;
        assert_eq!(decode(&b), Err(WireError::Status(9)));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let mut at = 0;
            while let Ok(Some((_, n))) = decode(&bytes[at..]) {
                prop_assert!(n > 0);
                at += n;
            }
        }
    }
}
