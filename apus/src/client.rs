//! The client protocol of `apus node`: propose entries to a replica and ask
//! for its status, over TCP on the replica's `client` address.
//!
//! ```text
//! frame    = len u32 | type u8 | body            (little-endian, len counts type + body)
//! PROPOSE  1: payload                            -> APPLIED | NOT_LEADER | FAILED
//! STATUS   2: (empty)                            -> STATUS
//! DUMP     3: (empty)                            -> IDS
//! CHECK    4: (empty)                            -> APPLIED (the CHECK entry) | NOT_LEADER | FAILED
//! LAST_CHECK 5: (empty)                          -> CHECKED
//! ACCEPT_DATA_LOSS 6: stand u8                   -> ACCEPTED   (`apus recover --accept-data-loss`)
//! APPLIED  11: index u64 | output
//! NOT_LEADER 12: leader u8 (255 = unknown)
//! FAILED   13: reason (UTF-8)
//! STATUS   14: role u8 | term u64 | leader u8 | commit u64 | last u64 |
//!              applied u64 | recovering u8 | entries u64 | digest u64 |
//!              outputs_differed u64 | fenced_writes u64 | revocations u64 | transport u8 |
//!              last_check u64 | voters_lost u32
//! IDS      15: count u64 | id u64 ...
//! CHECKED  16: index u64 | ok u8 | digest or error (UTF-8)   (index 0: no check yet)
//! ACCEPTED 17: was_recovering u8
//! ```
//!
//! The port is meant for loopback and administration (it carries no
//! authentication); replication traffic never uses it. A malformed request
//! gets a FAILED answer and the connection is closed.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use apus_core::{NodeId, Role};

use crate::config::TransportKind;

/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 16 << 20;

const PROPOSE: u8 = 1;
const STATUS: u8 = 2;
const DUMP: u8 = 3;
const CHECK: u8 = 4;
const LAST_CHECK: u8 = 5;
const ACCEPT_DATA_LOSS: u8 = 6;
const APPLIED: u8 = 11;
const NOT_LEADER: u8 = 12;
const FAILED: u8 = 13;
const STATUS_REPLY: u8 = 14;
const IDS: u8 = 15;
const CHECKED: u8 = 16;
const ACCEPTED: u8 = 17;

/// A request from a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Replicate these bytes.
    Propose(Vec<u8>),
    /// Report status.
    Status,
    /// List the ids of every applied entry (first 8 bytes of each payload).
    Dump,
    /// Put a consistency check into the log (`apus check`, on the leader).
    Check,
    /// The replica's last consistency check.
    LastCheck,
    /// A recovering replica stops waiting for what it lost (memory mode, a
    /// majority lost; see `apus_core::Replica::accept_data_loss`).
    AcceptDataLoss {
        /// It may also stand for election.
        stand: bool,
    },
}

/// A replica's status as reported to clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteStatus {
    /// Role.
    pub role: Role,
    /// Term.
    pub term: u64,
    /// Leader known to the replica.
    pub leader: Option<NodeId>,
    /// Commit index.
    pub commit: u64,
    /// Last log index.
    pub last_index: u64,
    /// Applied index.
    pub applied: u64,
    /// Recovering a lost log.
    pub recovering: bool,
    /// Data entries applied.
    pub entries: u64,
    /// Digest of the applied data entries, in order.
    pub digest: u64,
    /// Replayed connections whose replies differed from the leader's
    /// (`apus run`). Servers put times and nonces in replies, so this is
    /// not a verdict on their state: `apus check` compares state.
    pub outputs_differed: u64,
    /// This replica's ring writes its peers refused (fabric transport).
    pub fenced_writes: u64,
    /// Ring grants this replica revoked (fabric transport).
    pub revocations: u64,
    /// The transport it runs ([`TransportKind::Auto`]: still choosing).
    pub transport: TransportKind,
    /// The log index of the last consistency check it recorded (0: none).
    pub last_check: u64,
    /// The voters it knows lost their logs, when too many to elect anyone
    /// (bit per replica; see `apus_core::Replica::voters_lost`).
    pub voters_lost: u32,
}

/// A reply to a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Committed and applied at `index`.
    Applied {
        /// Log index.
        index: u64,
        /// State machine output.
        output: Vec<u8>,
    },
    /// Ask the leader instead.
    NotLeader(Option<NodeId>),
    /// The proposal did not (or may not have) committed.
    Failed(String),
    /// Status.
    Status(RemoteStatus),
    /// Applied ids.
    Ids(Vec<u64>),
    /// A replica's last consistency check.
    Checked {
        /// The CHECK entry's index (0: no check yet).
        index: u64,
        /// The digest the server's command printed, or why there is none.
        digest: Result<String, String>,
    },
    /// The answer to [`Request::AcceptDataLoss`]: whether the replica was
    /// recovering (and no longer waits).
    Accepted(bool),
}

/// A malformed frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// Unknown frame type.
    #[error("unknown frame type {0}")]
    Type(u8),
    /// Wrong body size for its type.
    #[error("frame type {0} has a malformed body")]
    Body(u8),
    /// Larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
}

/// One frame: `len u32 | type u8 | body` (little-endian, `len` counts type
/// and body). The interception library's channels use the same framing.
pub fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(5 + body.len());
    f.extend_from_slice(&(1 + body.len() as u32).to_le_bytes());
    f.push(kind);
    f.extend_from_slice(body);
    f
}

/// Reads one frame: `(type, body)`; `Ok(None)` on a clean end of stream.
pub fn read_frame(s: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            ProtocolError::TooLarge(len),
        ));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    let kind = body.remove(0);
    Ok(Some((kind, body)))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn node(b: u8) -> Option<NodeId> {
    (b != 255).then_some(NodeId(b))
}

impl Request {
    /// Encodes the request as a frame.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Request::Propose(p) => frame(PROPOSE, p),
            Request::Status => frame(STATUS, &[]),
            Request::Dump => frame(DUMP, &[]),
            Request::Check => frame(CHECK, &[]),
            Request::LastCheck => frame(LAST_CHECK, &[]),
            Request::AcceptDataLoss { stand } => frame(ACCEPT_DATA_LOSS, &[u8::from(*stand)]),
        }
    }

    /// Decodes a request frame.
    pub fn decode(kind: u8, body: Vec<u8>) -> Result<Request, ProtocolError> {
        match kind {
            PROPOSE => Ok(Request::Propose(body)),
            STATUS if body.is_empty() => Ok(Request::Status),
            DUMP if body.is_empty() => Ok(Request::Dump),
            CHECK if body.is_empty() => Ok(Request::Check),
            LAST_CHECK if body.is_empty() => Ok(Request::LastCheck),
            ACCEPT_DATA_LOSS if body == [0] || body == [1] => Ok(Request::AcceptDataLoss {
                stand: body[0] == 1,
            }),
            STATUS | DUMP | CHECK | LAST_CHECK | ACCEPT_DATA_LOSS => Err(ProtocolError::Body(kind)),
            other => Err(ProtocolError::Type(other)),
        }
    }
}

impl Reply {
    /// Encodes the reply as a frame.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Reply::Applied { index, output } => {
                let mut b = index.to_le_bytes().to_vec();
                b.extend_from_slice(output);
                frame(APPLIED, &b)
            }
            Reply::NotLeader(l) => frame(NOT_LEADER, &[l.map_or(255, |n| n.0)]),
            Reply::Failed(why) => frame(FAILED, why.as_bytes()),
            Reply::Status(s) => {
                let mut b = vec![match s.role {
                    Role::Follower => 0,
                    Role::Candidate => 1,
                    Role::Leader => 2,
                }];
                b.extend_from_slice(&s.term.to_le_bytes());
                b.push(s.leader.map_or(255, |n| n.0));
                for v in [s.commit, s.last_index, s.applied] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                b.push(u8::from(s.recovering));
                b.extend_from_slice(&s.entries.to_le_bytes());
                b.extend_from_slice(&s.digest.to_le_bytes());
                for v in [s.outputs_differed, s.fenced_writes, s.revocations] {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                b.push(s.transport.code());
                b.extend_from_slice(&s.last_check.to_le_bytes());
                b.extend_from_slice(&s.voters_lost.to_le_bytes());
                frame(STATUS_REPLY, &b)
            }
            Reply::Ids(ids) => {
                let mut b = (ids.len() as u64).to_le_bytes().to_vec();
                for id in ids {
                    b.extend_from_slice(&id.to_le_bytes());
                }
                frame(IDS, &b)
            }
            Reply::Accepted(was) => frame(ACCEPTED, &[u8::from(*was)]),
            Reply::Checked { index, digest } => {
                let mut b = index.to_le_bytes().to_vec();
                let (ok, text) = match digest {
                    Ok(d) => (1, d),
                    Err(e) => (0, e),
                };
                b.push(ok);
                b.extend_from_slice(text.as_bytes());
                frame(CHECKED, &b)
            }
        }
    }

    /// Decodes a reply frame.
    pub fn decode(kind: u8, b: Vec<u8>) -> Result<Reply, ProtocolError> {
        let bad = || ProtocolError::Body(kind);
        match kind {
            APPLIED if b.len() >= 8 => Ok(Reply::Applied {
                index: u64_at(&b, 0),
                output: b[8..].to_vec(),
            }),
            NOT_LEADER if b.len() == 1 => Ok(Reply::NotLeader(node(b[0]))),
            FAILED => Ok(Reply::Failed(String::from_utf8_lossy(&b).into_owned())),
            STATUS_REPLY if b.len() == 1 + 8 + 1 + 24 + 1 + 40 + 1 + 8 + 4 => {
                let role = match b[0] {
                    0 => Role::Follower,
                    1 => Role::Candidate,
                    2 => Role::Leader,
                    _ => return Err(bad()),
                };
                Ok(Reply::Status(RemoteStatus {
                    role,
                    term: u64_at(&b, 1),
                    leader: node(b[9]),
                    commit: u64_at(&b, 10),
                    last_index: u64_at(&b, 18),
                    applied: u64_at(&b, 26),
                    recovering: b[34] != 0,
                    entries: u64_at(&b, 35),
                    digest: u64_at(&b, 43),
                    outputs_differed: u64_at(&b, 51),
                    fenced_writes: u64_at(&b, 59),
                    revocations: u64_at(&b, 67),
                    transport: TransportKind::from_code(b[75]).ok_or_else(bad)?,
                    last_check: u64_at(&b, 76),
                    voters_lost: u32::from_le_bytes(b[84..88].try_into().expect("4 bytes")),
                }))
            }
            IDS if b.len() >= 8 => {
                let n = u64_at(&b, 0) as usize;
                if b.len() != 8 + n * 8 {
                    return Err(bad());
                }
                Ok(Reply::Ids((0..n).map(|i| u64_at(&b, 8 + i * 8)).collect()))
            }
            ACCEPTED if b == [0] || b == [1] => Ok(Reply::Accepted(b[0] == 1)),
            CHECKED if b.len() >= 9 => {
                let text = String::from_utf8_lossy(&b[9..]).into_owned();
                Ok(Reply::Checked {
                    index: u64_at(&b, 0),
                    digest: if b[8] == 1 { Ok(text) } else { Err(text) },
                })
            }
            APPLIED | NOT_LEADER | STATUS_REPLY | IDS | CHECKED => Err(bad()),
            other => Err(ProtocolError::Type(other)),
        }
    }
}

/// A blocking client of one replica.
#[derive(Debug)]
pub struct Client {
    stream: TcpStream,
}

impl Client {
    /// Connects to a replica's client address.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Client> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        Ok(Client { stream })
    }

    /// Sends a request and waits for the reply.
    pub fn call(&mut self, req: &Request) -> io::Result<Reply> {
        self.stream.write_all(&req.encode())?;
        let (kind, body) = read_frame(&mut self.stream)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"))?;
        Reply::decode(kind, body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let replies = [
            Reply::Applied {
                index: 9,
                output: b"ok".to_vec(),
            },
            Reply::NotLeader(Some(NodeId(2))),
            Reply::NotLeader(None),
            Reply::Failed("lost".into()),
            Reply::Status(RemoteStatus {
                role: Role::Leader,
                term: 3,
                leader: Some(NodeId(1)),
                commit: 10,
                last_index: 11,
                applied: 9,
                recovering: true,
                entries: 7,
                digest: 0xdead,
                outputs_differed: 2,
                fenced_writes: 3,
                revocations: 4,
                transport: TransportKind::Verbs,
                last_check: 12,
                voters_lost: 0b101,
            }),
            Reply::Ids(vec![1, 2, 3]),
            Reply::Accepted(true),
            Reply::Accepted(false),
            Reply::Checked {
                index: 12,
                digest: Ok("d41d8cd9".into()),
            },
            Reply::Checked {
                index: 0,
                digest: Err("no digest command".into()),
            },
        ];
        for r in replies {
            let f = r.encode();
            let (k, b) = read_frame(&mut f.as_slice()).unwrap().unwrap();
            assert_eq!(Reply::decode(k, b).unwrap(), r);
        }
        for q in [
            Request::Propose(b"x".to_vec()),
            Request::Status,
            Request::Dump,
            Request::Check,
            Request::LastCheck,
            Request::AcceptDataLoss { stand: true },
            Request::AcceptDataLoss { stand: false },
        ] {
            let f = q.encode();
            let (k, b) = read_frame(&mut f.as_slice()).unwrap().unwrap();
            assert_eq!(Request::decode(k, b).unwrap(), q);
        }
    }

    #[test]
    fn malformed_frames_are_errors() {
        assert_eq!(Request::decode(9, vec![]), Err(ProtocolError::Type(9)));
        assert_eq!(
            Request::decode(STATUS, vec![1]),
            Err(ProtocolError::Body(STATUS))
        );
        assert_eq!(
            Reply::decode(IDS, vec![5, 0, 0, 0, 0, 0, 0, 0]),
            Err(ProtocolError::Body(IDS))
        );
        assert_eq!(
            Request::decode(ACCEPT_DATA_LOSS, vec![2]),
            Err(ProtocolError::Body(ACCEPT_DATA_LOSS)),
            "stand is a boolean"
        );
        assert!(read_frame(&mut [0u8, 0, 0, 0].as_slice()).is_err());
        assert!(read_frame(&mut [0xffu8, 0xff, 0xff, 0xff].as_slice()).is_err());
        assert_eq!(read_frame(&mut [].as_slice()).unwrap(), None);
    }
}
