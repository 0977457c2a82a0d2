//! Checks, on a live cluster, that replicas refuse log writes from a replica
//! they do not grant: the fencing every safety argument in DESIGN.md rests on.
//!
//! A deposed leader may still be writing when its successor takes over; the
//! followers must refuse those writes at the transport (on RDMA, in the NIC:
//! the queue pair of a replica that is not the leader lacks remote write
//! access to the log ring). [`run`] acts as replica `me` while `me` is
//! stopped: it connects to every peer over the cluster's transport like `me`
//! would, reads the peer's status record, and, only if that record names
//! another writer, writes once into the peer's log ring. A refusal means the
//! peer is fenced against `me`; a write that lands means fencing is broken.
//!
//! The write goes half a ring ahead of the peer's tail, a place nothing reads
//! before the real leader has overwritten it, so even on a broken transport
//! an idle cluster's log is not disturbed.

use std::collections::BTreeMap;
use std::fmt;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use apus_core::layout::SLOT_LEN;
use apus_core::record::{Record, RecordError, StatusRecord};
use apus_core::{NodeId, OpError, OpId, Region, RemoteOp, Term, TransportEvent};

use crate::config::{ClusterConfig, ConfigError, TransportKind};
use crate::node::{NodeError, OpenedTransport, open_concrete};

/// Bytes written into each peer's ring.
const PROBE_LEN: usize = 64;
/// What the probe writes: not a log entry (its checksum cannot match), so a
/// reader that met it would treat it as a write still in flight.
const PROBE_PATTERN: &[u8; 16] = b"apus fence-check";

/// How one peer answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The peer grants `writer` (not `me`) in `term` and refused the write.
    Fenced {
        /// The peer's term.
        term: Term,
        /// Whom it grants its log (`None`: nobody, e.g. the leader itself).
        writer: Option<NodeId>,
    },
    /// The peer still grants `me`: nothing was written (wait until a new
    /// leader is elected and run the check again).
    StillGranted {
        /// The peer's term.
        term: Term,
    },
    /// The write landed although the peer grants someone else: fencing is
    /// broken on this transport or hardware.
    Landed {
        /// The peer's term.
        term: Term,
        /// Whom it grants its log.
        writer: Option<NodeId>,
    },
    /// The peer's status record did not decode.
    BadStatus(RecordError),
    /// No answer: not connected, or the connection failed.
    Unreachable(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let grant = |w: &Option<NodeId>| w.map_or("nobody".to_string(), |w| w.to_string());
        match self {
            Outcome::Fenced { term, writer } => write!(
                f,
                "fenced: term {term}, grants {}; the ring write was refused",
                grant(writer)
            ),
            Outcome::StillGranted { term } => write!(
                f,
                "not checked: term {term}, still grants this replica (no new leader yet?); nothing written"
            ),
            Outcome::Landed { term, writer } => write!(
                f,
                "FENCING BROKEN: term {term}, grants {}, yet the ring write landed",
                grant(writer)
            ),
            Outcome::BadStatus(e) => write!(f, "not checked: unreadable status record ({e})"),
            Outcome::Unreachable(why) => write!(f, "not checked: {why}"),
        }
    }
}

/// The result of [`run`].
#[derive(Clone, Debug)]
pub struct FenceReport {
    /// The replica whose identity the check used.
    pub me: NodeId,
    /// The transport it ran over.
    pub transport: TransportKind,
    /// Each peer's answer, in id order.
    pub peers: Vec<(NodeId, Outcome)>,
    /// Ring writes the transport itself counted as refused (verbs: remote
    /// access error completions; fabric: those too, and writes it had no
    /// key for); `None` where the transport keeps no such count.
    pub fenced_writes: Option<u64>,
}

impl FenceReport {
    /// Whether every peer refused the write.
    pub fn all_fenced(&self) -> bool {
        self.peers
            .iter()
            .all(|(_, o)| matches!(o, Outcome::Fenced { .. }))
    }

    /// Whether some peer accepted a write it should have refused.
    pub fn broken(&self) -> bool {
        self.peers
            .iter()
            .any(|(_, o)| matches!(o, Outcome::Landed { .. }))
    }

    /// Where the refusal happens on this transport, for people reading the
    /// report.
    pub fn mechanism(&self) -> &'static str {
        match self.transport {
            TransportKind::Verbs => {
                "the peer's NIC: a queue pair without remote write access to the ring"
            }
            TransportKind::Fabric => {
                "the peer's provider: its ring key is given to the granted writer only and closed on revocation"
            }
            _ => "the peer's receiver, which checks the grant before it copies",
        }
    }
}

/// Why the check could not run.
#[derive(Debug, thiserror::Error)]
pub enum FenceCheckError {
    /// The configuration does not allow it.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// `me`'s address is taken: `me` is running (or another check is).
    #[error(
        "replica {me}'s address {addr} is in use: stop {me} first (fence-check acts as {me} and must not run beside it)"
    )]
    Running {
        /// The replica.
        me: NodeId,
        /// Its replication address.
        addr: std::net::SocketAddr,
    },
    /// `me`'s address is not on this host.
    #[error("cannot bind replica {me}'s address {addr} ({source}): run fence-check on {me}'s host")]
    NotHere {
        /// The replica.
        me: NodeId,
        /// Its replication address.
        addr: std::net::SocketAddr,
        /// Why binding failed.
        source: std::io::Error,
    },
    /// The transport did not start.
    #[error("{0}")]
    Start(#[from] NodeError),
    /// The transport failed locally.
    #[error("transport: {0}")]
    Transport(#[from] apus_core::TransportError),
}

enum PeerState {
    Connecting,
    Reading(OpId),
    Writing {
        op: OpId,
        term: Term,
        writer: Option<NodeId>,
    },
    Done(Outcome),
}

/// Acts as replica `me` (which must be stopped) over `transport`, and tries
/// one log ring write to each peer that grants someone else; waits at most
/// `within` for the peers to connect and answer.
pub fn run(
    config: &ClusterConfig,
    me: NodeId,
    transport: TransportKind,
    within: Duration,
) -> Result<FenceReport, FenceCheckError> {
    let engine = config.engine_for(me)?;
    let layout = engine.validate().map_err(|e| ConfigError {
        field: format!("engine.{}", e.field),
        reason: e.reason,
    })?;
    if transport == TransportKind::Auto
        || (config.transport != transport && config.transport != TransportKind::Auto)
    {
        return Err(ConfigError {
            field: "cluster.transport".into(),
            reason: format!(
                "fence-check runs over the transport the cluster runs; the configuration names {}, not {transport}",
                config.transport
            ),
        }
        .into());
    }
    let addr = config.replica(me).expect("checked by engine_for").address;
    // The transport binds the address too; binding it here first tells a
    // running replica apart from other start failures.
    match TcpListener::bind(addr) {
        Ok(l) => drop(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(FenceCheckError::Running { me, addr });
        }
        Err(source) => return Err(FenceCheckError::NotHere { me, addr, source }),
    }
    let region = Region::new(layout.region_len());
    let OpenedTransport {
        transport: mut t,
        fencing,
    } = open_concrete(
        transport,
        config,
        me,
        layout,
        region.clone(),
        // It speaks for `me` without being it: peers learn nothing from it.
        std::sync::Arc::new(apus_tcp::identity::Anonymous(config.name.clone())),
    )?;

    let mut states: BTreeMap<NodeId, PeerState> = (0..config.replicas.len())
        .map(|i| NodeId(i as u8))
        .filter(|&p| p != me)
        .map(|p| (p, PeerState::Connecting))
        .collect();
    let mut next_op = 0u64;
    let mut op = || {
        next_op += 1;
        OpId(next_op)
    };
    let mut events = Vec::new();
    let deadline = Instant::now() + within;
    loop {
        events.clear();
        t.poll(&mut events)?;
        for &ev in &events {
            match ev {
                TransportEvent::PeerUp(p) => {
                    if let Some(s @ PeerState::Connecting) = states.get_mut(&p) {
                        let id = op();
                        t.post(RemoteOp::Read {
                            op: id,
                            peer: p,
                            remote_offset: layout.status(),
                            len: SLOT_LEN,
                            local_offset: layout.probe_landing(p),
                        })?;
                        *s = PeerState::Reading(id);
                    }
                }
                TransportEvent::PeerDown(_) => {} // pending operations complete with an error
                TransportEvent::Completed(c) => {
                    let Some(s) = states.get_mut(&c.peer) else {
                        continue;
                    };
                    match *s {
                        PeerState::Reading(id) if id == c.op => match c.result {
                            Ok(()) => {
                                let mut slot = [0u8; SLOT_LEN];
                                region.read(layout.probe_landing(c.peer), &mut slot);
                                *s = match StatusRecord::decode(&slot) {
                                    Err(e) => PeerState::Done(Outcome::BadStatus(e)),
                                    Ok(r) if r.writer == Some(me) => {
                                        PeerState::Done(Outcome::StillGranted { term: r.term })
                                    }
                                    Ok(r) => {
                                        let id = op();
                                        t.post(probe_write(&layout, &region, me, c.peer, id, &r))?;
                                        PeerState::Writing {
                                            op: id,
                                            term: r.term,
                                            writer: r.writer,
                                        }
                                    }
                                };
                            }
                            // The connection broke: read again when it is back.
                            Err(OpError::PeerUnreachable) => *s = PeerState::Connecting,
                            Err(e) => {
                                *s = PeerState::Done(Outcome::Unreachable(format!(
                                    "reading its status record failed: {e}"
                                )))
                            }
                        },
                        PeerState::Writing { op, term, writer } if op == c.op => {
                            *s = PeerState::Done(match c.result {
                                Ok(()) => Outcome::Landed { term, writer },
                                Err(OpError::AccessDenied) => Outcome::Fenced { term, writer },
                                Err(e) => Outcome::Unreachable(format!(
                                    "the ring write failed without a verdict: {e}"
                                )),
                            });
                        }
                        _ => {}
                    }
                }
            }
        }
        let open = states.values().any(|s| !matches!(s, PeerState::Done(_)));
        let now = Instant::now();
        if !open || now >= deadline {
            break;
        }
        t.wait((deadline - now).min(Duration::from_millis(10)))?;
    }
    let peers = states
        .into_iter()
        .map(|(p, s)| {
            let o = match s {
                PeerState::Done(o) => o,
                PeerState::Connecting => {
                    Outcome::Unreachable(format!("no connection within {within:?}"))
                }
                PeerState::Reading(_) | PeerState::Writing { .. } => {
                    Outcome::Unreachable(format!("no answer within {within:?}"))
                }
            };
            (p, o)
        })
        .collect();
    Ok(FenceReport {
        me,
        transport,
        peers,
        fenced_writes: fencing.map(|f| f().fenced_writes),
    })
}

/// The ring write: [`PROBE_LEN`] bytes half a ring ahead of everything the
/// peer holds, from this replica's staging area for that peer.
fn probe_write(
    layout: &apus_core::RegionLayout,
    region: &Region,
    me: NodeId,
    peer: NodeId,
    op: OpId,
    status: &StatusRecord,
) -> RemoteOp {
    let local_offset = layout.scratch(peer, 0);
    let bytes: Vec<u8> = PROBE_PATTERN
        .iter()
        .copied()
        .cycle()
        .take(PROBE_LEN)
        .collect();
    region.write(local_offset, &bytes);
    let mut pos = status.next_pos.max(status.last_end_pos) + layout.ring_capacity() as u64 / 2;
    if layout.lap_remaining(pos) < PROBE_LEN {
        pos = layout.next_lap(pos);
    }
    debug_assert_ne!(Some(me), status.writer);
    RemoteOp::Write {
        op,
        peer,
        local_offset,
        len: PROBE_LEN,
        remote_offset: layout.ring_at(pos),
    }
}
