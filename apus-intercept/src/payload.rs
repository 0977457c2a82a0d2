//! What the interception library puts in log entries.
//!
//! * CONNECT: `origin u64 | tag u64 | out u64` — who proposed it (the
//!   proposing node's incarnation nonce) and which accept it was, so a node
//!   recognises its own connections when it applies them; and `out`, below.
//!   The connection id is the entry's index.
//! * DATA: `out u64 | on_conn u64 | bytes`: the bytes the server's read
//!   returned, as they were. `out` has its top bit set, marking the
//!   `on_conn` field (entries written before it have `out u64 | bytes`).
//!
//! `out` is what the leader's server had written, on all the connections
//! that leader accepted, when the accept or read happened; `on_conn`, what
//! it had written on this connection. A follower gives its server the entry
//! only once its server has answered as much on those connections, and on
//! this one: a reply the leader's server sent before it read this input (a
//! response to the client's previous request, on another connection too)
//! has happened on the follower as well, even if the server ran the
//! request on a worker thread. A protocol that forbids input before the
//! server's answer depends on the second (PostgreSQL refuses a startup
//! message that arrived before its answer to the SSL request: other
//! connections' answers had made up the total).
//! * CLOSE: `bytes_out u64 | hash_out u64` — what the leader's server had
//!   written on the connection, for the followers' divergence check.

/// A CONNECT payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connect {
    /// The proposing node's incarnation nonce.
    pub origin: u64,
    /// Distinguishes this node's accepts.
    pub tag: u64,
    /// The leader's output so far (see the module docs).
    pub out: u64,
}

/// Bytes in front of a DATA entry's input.
pub const DATA_HEADER: usize = 16;
/// In a DATA entry's first word: an `on_conn` word follows.
const ON_CONN: u64 = 1 << 63;

/// What the leader's server had written when it read a DATA entry's input
/// (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Out {
    /// On all the connections that leader accepted.
    pub all: u64,
    /// On this connection (`None` in entries written before it was kept).
    pub on_conn: Option<u64>,
}

/// What a DATA payload holds in front of its input: the leader's output so
/// far, on all connections and on this one.
pub fn data_header(out: u64, on_conn: u64) -> [u8; DATA_HEADER] {
    debug_assert!(out < ON_CONN, "2^63 bytes written");
    let mut h = [0u8; DATA_HEADER];
    h[..8].copy_from_slice(&(out | ON_CONN).to_le_bytes());
    h[8..].copy_from_slice(&on_conn.to_le_bytes());
    h
}

/// A DATA payload: [`data_header`], then the input.
#[cfg(test)]
pub fn data(out: u64, on_conn: u64, input: &[u8]) -> Vec<u8> {
    [&data_header(out, on_conn)[..], input].concat()
}

/// A DATA payload's output counts and input; `None` if too short.
pub fn split_data(payload: &[u8]) -> Option<(Out, &[u8])> {
    let first = u64_at_checked(payload, 0)?;
    if first & ON_CONN == 0 {
        let out = Out {
            all: first,
            on_conn: None,
        };
        return Some((out, &payload[8..]));
    }
    let out = Out {
        all: first & !ON_CONN,
        on_conn: Some(u64_at_checked(payload, 8)?),
    };
    Some((out, &payload[DATA_HEADER..]))
}

fn u64_at_checked(b: &[u8], at: usize) -> Option<u64> {
    let word = b.get(at..at + 8)?;
    Some(u64::from_le_bytes(word.try_into().ok()?))
}

/// A CLOSE payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Close {
    /// Bytes the leader's server wrote on the connection.
    pub bytes_out: u64,
    /// Their running hash.
    pub hash_out: u64,
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Connect {
    /// Encodes.
    pub fn encode(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&self.origin.to_le_bytes());
        b[8..16].copy_from_slice(&self.tag.to_le_bytes());
        b[16..].copy_from_slice(&self.out.to_le_bytes());
        b
    }
    /// Decodes; `None` unless exactly 24 bytes.
    pub fn decode(b: &[u8]) -> Option<Connect> {
        (b.len() == 24).then(|| Connect {
            origin: u64_at(b, 0),
            tag: u64_at(b, 8),
            out: u64_at(b, 16),
        })
    }
}

impl Close {
    /// Encodes.
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.bytes_out.to_le_bytes());
        b[8..].copy_from_slice(&self.hash_out.to_le_bytes());
        b
    }
    /// Decodes; `None` unless exactly 16 bytes.
    pub fn decode(b: &[u8]) -> Option<Close> {
        (b.len() == 16).then(|| Close {
            bytes_out: u64_at(b, 0),
            hash_out: u64_at(b, 8),
        })
    }
}

/// A running hash of a byte stream (FNV-1a, 64 bits), split-invariant:
/// hashing `ab` equals hashing `a` then `b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamHash {
    /// Bytes hashed.
    pub bytes: u64,
    /// The hash.
    pub hash: u64,
}

impl Default for StreamHash {
    fn default() -> Self {
        StreamHash {
            bytes: 0,
            hash: 0xcbf2_9ce4_8422_2325,
        }
    }
}

impl StreamHash {
    /// Adds `data`.
    pub fn update(&mut self, data: &[u8]) {
        for b in data {
            self.hash ^= u64::from(*b);
            self.hash = self.hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.bytes += data.len() as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_bad_sizes() {
        let c = Connect {
            origin: 7,
            tag: 9,
            out: 11,
        };
        assert_eq!(Connect::decode(&c.encode()), Some(c));
        let out = Out {
            all: 5,
            on_conn: Some(2),
        };
        assert_eq!(split_data(&data(5, 2, b"GET")), Some((out, &b"GET"[..])));
        assert_eq!(split_data(&data(5, 2, b"")), Some((out, &b""[..])));
        assert_eq!(split_data(&[1, 2, 3]), None);
        // A flagged header cut short.
        assert_eq!(split_data(&data(5, 2, b"")[..12]), None);
        // An entry from before `on_conn`: `out | bytes`.
        let mut old = 9u64.to_le_bytes().to_vec();
        old.extend_from_slice(b"SET");
        let was = Out {
            all: 9,
            on_conn: None,
        };
        assert_eq!(split_data(&old), Some((was, &b"SET"[..])));
        let x = Close {
            bytes_out: 10,
            hash_out: 11,
        };
        assert_eq!(Close::decode(&x.encode()), Some(x));
        assert_eq!(Connect::decode(&[0; 15]), None);
        assert_eq!(Close::decode(&[0; 17]), None);
    }

    #[test]
    fn hash_is_split_invariant() {
        let mut a = StreamHash::default();
        a.update(b"hello world");
        let mut b = StreamHash::default();
        b.update(b"hello");
        b.update(b" world");
        assert_eq!(a, b);
        assert_eq!(a.bytes, 11);
    }
}
