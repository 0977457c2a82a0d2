//! [`FabricTransport`]: the remote-memory transport over libfabric RMA.
//!
//! The engine thread owns one [`Endpoint`]. Its region is registered once
//! for local use (the source of writes, the destination of reads), and
//! again *per peer* for what that peer may do, each under its own fresh
//! key: the peer's inbound slots (write), the header and status record
//! (read), and the log ring (write) only while the peer holds the write
//! grant. A peer learns only its own keys, so the access rules of the layout
//! hold in the provider itself, not in our code.
//!
//! **Set-up and liveness.** Replicas meet over the TCP transport's
//! authenticated handshake ([`apus_tcp::connect`]): the cluster secret, the
//! layout and the transport (`fabric/<provider>`) must match. Each side then
//! registers the peer's windows and sends a [`Hello`] with its endpoint name
//! and the windows' addresses and keys; the peer is up once both hellos have
//! crossed. Connection-oriented providers (`tcp`, `verbs`) also need a
//! provider connection: the lower-numbered replica listens and puts a fresh
//! random token in its hello, the higher one dials presenting it, and a
//! connection request without an awaited token is rejected; the peer is up
//! once that connection is. The TCP stream stays open: grants and revocations of the ring
//! travel on it ([`RingGrant`]), and its loss is the peer's loss.
//!
//! **Fencing.** [`Transport::set_log_writer`] closes the old writer's ring
//! registration before it returns: the key is dead, and the deposed writer's
//! later writes fail in the provider (an error completion, or a silent drop
//! that the operation timeout turns into a failure). Manual-progress
//! providers (tcp, rxm, shm) land remote writes only inside this thread's
//! `poll`, so nothing lands between the revocation and the return either.
//!
//! **Order.** The core's contract wants operations to one peer to take
//! effect, and complete, in the order posted. The endpoint asks the
//! provider for read/write ordering; whatever pair the provider does not
//! order (rxm has no write-after-read), the transport restores by holding
//! the later operation until the earlier ones completed. Completions, which
//! providers report in any order, are released per peer in posting order.
//!
//! **Limits.** At most [`MAX_QUEUED`] operations per peer (posted or held);
//! an operation not complete after the configured timeout ends the
//! connection (every pending operation fails, the peer's keys are revoked,
//! the dialer reconnects). `wait` blocks at most [`PROGRESS_INTERVAL`]:
//! with manual progress, a peer's write into this node lands only when this
//! node polls, and providers without wait objects give nothing to block on.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

use apus_core::{
    Capabilities, Completion, NodeId, OpError, OpId, Region, RegionLayout, RemoteOp, Transport,
    TransportError, TransportEvent, Wake,
};
use apus_tcp::connect::{Connector, ConnectorConfig};
use apus_tcp::handshake::LayoutInfo;
use apus_tcp::identity::Identity;
use apus_tcp::setup::{MessageReader, RemoteWindow, StreamState, Window};
use apus_tcp::sys::{self as poll_sys, Interest};
use prost::Message;
use tracing::{debug, info, warn};

use crate::endpoint::{
    Access, Endpoint, FabricError, LinkState, MemoryRegion, Ordering, PeerAddr, Remote,
};

/// Operations queued per peer (posted and not yet completed, or held for
/// ordering or a full provider queue). The engine keeps far fewer in flight;
/// reaching this means the peer stopped making progress.
pub const MAX_QUEUED: usize = 8192;
/// The longest `wait` blocks without polling the provider.
pub const PROGRESS_INTERVAL: Duration = Duration::from_micros(50);
/// How long a provider connection may take to come up after the hellos
/// crossed (the peer answered on the set-up stream, so it is alive).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A fresh random connection token, never 0 (which means none).
fn connect_token() -> u64 {
    let mut b = [0u8; 8];
    loop {
        if getrandom::fill(&mut b).is_err() {
            // No entropy source: the clock still binds the connection to
            // this hello (the set-up stream is authenticated; the token only
            // has to be unguessable for the time it is awaited).
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64);
            b = t.to_le_bytes();
        }
        let t = u64::from_le_bytes(b);
        if t != 0 {
            return t;
        }
    }
}

/// Compare-and-swaps in flight at once (their operands live in a small
/// registered array).
const CAS_SLOTS: usize = 64;

/// How to reach the other replicas and which libfabric provider to use.
#[derive(Clone)]
pub struct FabricConfig {
    /// This replica.
    pub me: NodeId,
    /// Set-up (TCP) address of every replica, by id.
    pub peers: Vec<SocketAddr>,
    /// The cluster secret (at least 16 bytes).
    pub secret: Vec<u8>,
    /// The region layout every replica uses.
    pub layout: RegionLayout,
    /// libfabric provider: `shm`, `tcp;ofi_rxm`, `verbs;ofi_rxm`.
    pub provider: String,
    /// The provider's domain (for tcp, the interface, such as `lo`); the
    /// provider's first domain if `None`.
    pub domain: Option<String>,
    /// An operation not complete after this long ends the connection.
    pub op_timeout: Duration,
    /// Who this replica is across restarts (`apus_tcp::identity`).
    pub identity: Option<Arc<dyn Identity>>,
}

impl std::fmt::Debug for FabricConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FabricConfig")
            .field("me", &self.me)
            .field("peers", &self.peers)
            .field("secret", &"<redacted>")
            .field("provider", &self.provider)
            .field("domain", &self.domain)
            .field("op_timeout", &self.op_timeout)
            .finish()
    }
}

/// The first message each side sends after authentication.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    /// The sender's libfabric endpoint name.
    #[prost(bytes = "vec", tag = "1")]
    pub endpoint: Vec<u8>,
    /// The receiver's inbound slots in the sender's region (write).
    #[prost(message, optional, tag = "2")]
    pub slots: Option<Window>,
    /// The sender's region header (read).
    #[prost(message, optional, tag = "3")]
    pub header: Option<Window>,
    /// The sender's status record (read).
    #[prost(message, optional, tag = "4")]
    pub status: Option<Window>,
    /// The sender's log ring, if the receiver holds the write grant.
    #[prost(message, optional, tag = "5")]
    pub ring: Option<Window>,
    /// Connection-oriented providers, from the lower-numbered replica (which
    /// listens): the token the higher one must present when it connects to
    /// `endpoint`, binding that connection to this authenticated stream.
    /// 0: none.
    #[prost(uint64, tag = "6")]
    pub connect_token: u64,
}

/// Every later message: the receiver's current access to the sender's log
/// ring (a grant with a fresh key, or a revocation).
#[derive(Clone, PartialEq, prost::Message)]
pub struct RingGrant {
    /// The ring window, or `None`: revoked.
    #[prost(message, optional, tag = "1")]
    pub ring: Option<Window>,
}

/// Counters of a fabric transport (monotonic).
#[derive(Debug, Default)]
pub struct FabricStats {
    /// Writes to a peer's log ring refused: no grant, or a revoked key.
    pub fenced_writes: AtomicU64,
    /// Ring grants this node revoked from a peer: moved by the engine, or
    /// closed with the writer's connection.
    pub revocations: AtomicU64,
    /// Connections ended because an operation did not complete in time.
    pub timeouts: AtomicU64,
    /// Operations that completed with a provider error.
    pub errors: AtomicU64,
    /// Times the endpoint was reopened because its inbound path was stuck.
    pub resets: AtomicU64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Read,
    Write,
    Cas,
}

impl Kind {
    fn of(op: &RemoteOp) -> Kind {
        match op {
            RemoteOp::Write { .. } => Kind::Write,
            RemoteOp::Read { .. } => Kind::Read,
            RemoteOp::CompareAndSwap { .. } => Kind::Cas,
        }
    }

    fn reads(self) -> bool {
        matches!(self, Kind::Read | Kind::Cas)
    }

    fn writes(self) -> bool {
        matches!(self, Kind::Write | Kind::Cas)
    }

    /// Whether `self`, posted after `earlier`, is sure to take effect after
    /// it without waiting for its completion.
    fn ordered_after(self, earlier: Kind, o: Ordering) -> bool {
        (!self.reads() || !earlier.reads() || o.read_after_read)
            && (!self.reads() || !earlier.writes() || o.read_after_write)
            && (!self.writes() || !earlier.reads() || o.write_after_read)
            && (!self.writes() || !earlier.writes() || o.write_after_write)
    }
}

/// Checks that an operation's local range lies in the region.
fn check_local(region: &Region, offset: usize, len: usize) -> Result<(), TransportError> {
    if region.contains(offset, len) {
        Ok(())
    } else {
        Err(TransportError::LocalRange { offset, len })
    }
}

/// What this node knows of a peer's region, once its hello arrived.
#[derive(Clone, Copy, Debug)]
struct RemoteSide {
    addr: PeerAddr,
    slots: RemoteWindow,
    readable: [RemoteWindow; 2],
    ring: Option<RemoteWindow>,
}

#[derive(Debug)]
struct Inflight {
    ctx: u64,
    op: OpId,
    kind: Kind,
    ring: bool,
    posted: Instant,
    /// Set when it finished; released once everything before it did.
    done: Option<Result<(), OpError>>,
    cas_slot: Option<usize>,
}

#[derive(Debug)]
struct Peer {
    stream: TcpStream,
    reader: MessageReader,
    /// Our registrations for this peer: its slots, header, status.
    granted: Vec<MemoryRegion>,
    /// Our ring registration for it, while it holds the grant.
    ring: Option<MemoryRegion>,
    remote: Option<RemoteSide>,
    /// Connection-oriented providers: the connection this node awaits
    /// (it listens), until the peer's hello arrives.
    awaited: Option<PeerAddr>,
    /// The engine was told PeerUp: both hellos exchanged and the provider's
    /// connection (if it has them) is up.
    up: bool,
    /// When the connection was installed (bounds the wait for it to come up).
    since: Instant,
    inflight: VecDeque<Inflight>,
    held: VecDeque<RemoteOp>,
}

/// The engine side of the libfabric transport.
pub struct FabricTransport {
    // Field order matters for drop: the endpoint (and with it every
    // registration) closes before the memory it covers is released.
    endpoint: Endpoint,
    local: MemoryRegion,
    cas_mr: Option<MemoryRegion>,
    probe: Option<SelfProbe>,
    cas_operands: Box<[u64]>,
    probe_words: Box<[u64]>,
    cas_free: Vec<usize>,
    region: Region,
    provider: String,
    domain: Option<String>,
    me: NodeId,
    layout: RegionLayout,
    writer: Option<NodeId>,
    peers: Vec<Option<Peer>>,
    connector: Connector,
    events: VecDeque<TransportEvent>,
    completions: Vec<crate::endpoint::Completion>,
    next_ctx: u64,
    op_timeout: Duration,
    ordering: Ordering,
    stats: Arc<FabricStats>,
    pollfds: Vec<libc::pollfd>,
    interests: Vec<Interest>,
}

impl std::fmt::Debug for FabricTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FabricTransport")
            .field("me", &self.me)
            .field("provider", &self.endpoint.provider())
            .finish_non_exhaustive()
    }
}

/// Why the transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// libfabric, the provider or a registration failed.
    #[error(transparent)]
    Fabric(#[from] FabricError),
    /// The set-up listener or its threads failed.
    #[error("transport set-up: {0}")]
    Io(#[from] io::Error),
}

/// A write from this endpoint to itself: it completes only if this
/// endpoint's own inbound path makes progress. The shm provider's receive
/// queue can be left wedged by a peer killed in the middle of enqueueing
/// into it (libfabric 1.17): every later operation to this node then waits
/// forever; a peer stopped (SIGSTOP) mid-enqueue wedges it until it runs
/// again. A probe that does not complete in time reopens the endpoint.
#[derive(Debug)]
struct SelfProbe {
    addr: PeerAddr,
    mr: MemoryRegion,
    /// A probe is due (a peer was lost, or an operation is late).
    wanted: bool,
    /// The probe in flight: its context and when it was posted.
    pending: Option<(u64, Instant)>,
    /// Progress passes since the probe in flight was posted: a wedge is a
    /// probe that many passes could not complete, not one whose engine
    /// was descheduled meanwhile.
    passes: u32,
    /// When the last probe was posted: late operations ask for one at most
    /// once per `op_timeout / PROBE_FRACTION`.
    last_posted: Option<Instant>,
}

/// An operation `op_timeout / PROBE_FRACTION` late has the self probe
/// posted, and a probe as late reopens the endpoint: a wedged inbound path
/// is found well before the peers' operations time out (a paused leader's
/// followers elect a successor only once their paths to each other work).
const PROBE_FRACTION: u32 = 4;

/// Progress passes a probe must survive before it counts as stuck. A pass
/// takes microseconds; a healthy self write completes within two.
const PROBE_PASSES: u32 = 64;

/// Context of the self probe (peer index 0xff, never a replica's).
const PROBE_PEER: u64 = 0xff;

/// An endpoint with the registrations every connection uses.
struct Opened {
    endpoint: Endpoint,
    local: MemoryRegion,
    cas_mr: Option<MemoryRegion>,
    probe: Option<SelfProbe>,
}

/// Opens the provider's endpoint and registers the region (local use), the
/// compare-and-swap operands and the self probe's words.
fn open_endpoint(
    provider: &str,
    domain: Option<&str>,
    layout: &RegionLayout,
    region: &Region,
    cas_operands: &mut [u64],
    probe_words: &mut [u64],
) -> Result<Opened, FabricError> {
    let mut endpoint = Endpoint::open_in(provider, domain)?;
    if endpoint.max_msg_size() < layout.region_len() {
        return Err(FabricError::Invalid(format!(
            "provider {provider} moves at most {} bytes per operation; the region is {} bytes",
            endpoint.max_msg_size(),
            layout.region_len()
        )));
    }
    // SAFETY: the region's memory is shared by every clone and outlives the
    // endpoint: the transport holds `region` in a field dropped after it.
    let local =
        unsafe { endpoint.register(region.as_ptr().cast_mut(), region.len(), Access::LOCAL)? };
    let cas_mr = if endpoint.atomics() {
        // SAFETY: the transport's boxed slice is never reallocated and is
        // dropped after the endpoint (field order).
        Some(unsafe {
            endpoint.register(
                cas_operands.as_mut_ptr().cast(),
                cas_operands.len() * 8,
                Access::LOCAL,
            )?
        })
    } else {
        None
    };
    // A connection-oriented endpoint has a queue per peer: a dead peer
    // cannot wedge what the others use, so it needs no probe.
    let probe = if endpoint.connection_oriented() {
        None
    } else {
        // SAFETY: as for the operands.
        let mr = unsafe {
            endpoint.register(
                probe_words.as_mut_ptr().cast(),
                probe_words.len() * 8,
                Access::REMOTE_WRITE,
            )?
        };
        let own = endpoint.name()?;
        let addr = endpoint.insert_peer(&own)?;
        Some(SelfProbe {
            addr,
            mr,
            wanted: false,
            pending: None,
            passes: 0,
            last_posted: None,
        })
    };
    Ok(Opened {
        endpoint,
        local,
        cas_mr,
        probe,
    })
}

impl FabricTransport {
    /// Opens the provider's endpoint, registers `region`, binds this
    /// replica's set-up address and starts connecting to the others.
    pub fn start(cfg: FabricConfig, region: Region) -> Result<FabricTransport, StartError> {
        if cfg.peers.len() != cfg.layout.replicas() || cfg.me.index() >= cfg.peers.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "peer list does not match the cluster size",
            )
            .into());
        }
        if region.len() < cfg.layout.region_len() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "region too small").into());
        }
        let mut cas_operands = vec![0u64; 2 * CAS_SLOTS].into_boxed_slice();
        let mut probe_words = vec![0u64; 2].into_boxed_slice();
        let opened = open_endpoint(
            &cfg.provider,
            cfg.domain.as_deref(),
            &cfg.layout,
            &region,
            &mut cas_operands,
            &mut probe_words,
        )?;
        let endpoint = opened.endpoint;
        let ordering = endpoint.ordering();
        info!(
            me = %cfg.me,
            provider = %cfg.provider,
            atomics = endpoint.atomics(),
            ?ordering,
            "libfabric endpoint open"
        );
        let n = cfg.peers.len();
        let connector = Connector::start(ConnectorConfig {
            me: cfg.me,
            peers: cfg.peers,
            secret: cfg.secret,
            info: LayoutInfo::of(&cfg.layout).for_transport(&format!("fabric/{}", cfg.provider)),
            identity: cfg.identity.clone(),
        })?;
        Ok(FabricTransport {
            endpoint,
            local: opened.local,
            cas_mr: opened.cas_mr,
            probe: opened.probe,
            cas_operands,
            probe_words,
            cas_free: (0..CAS_SLOTS).rev().collect(),
            region,
            provider: cfg.provider.clone(),
            domain: cfg.domain.clone(),
            me: cfg.me,
            layout: cfg.layout,
            writer: None,
            peers: (0..n).map(|_| None).collect(),
            connector,
            events: VecDeque::new(),
            completions: Vec::with_capacity(64),
            next_ctx: 1,
            op_timeout: cfg.op_timeout,
            ordering,
            stats: Arc::new(FabricStats::default()),
            pollfds: Vec::with_capacity(n + 1),
            interests: Vec::with_capacity(n + 1),
        })
    }

    /// The transport's counters.
    pub fn stats(&self) -> Arc<FabricStats> {
        self.stats.clone()
    }

    /// Set-up counters (connections refused, established, violations).
    pub fn setup_stats(&self) -> Arc<apus_tcp::TransportStats> {
        self.connector.stats().clone()
    }

    /// The provider in use.
    pub fn provider(&self) -> &str {
        self.endpoint.provider()
    }

    /// Whether `peer` is up (both hellos exchanged, and the provider's
    /// connection up where it has connections).
    pub fn connected(&self, peer: NodeId) -> bool {
        self.peers
            .get(peer.index())
            .and_then(Option::as_ref)
            .is_some_and(|p| p.up)
    }

    fn window(
        &mut self,
        range: std::ops::Range<usize>,
        access: Access,
    ) -> Result<(MemoryRegion, Window), FabricError> {
        // SAFETY: the range lies in the region (the layout fits it, checked
        // at start), whose memory outlives the endpoint.
        let mr = unsafe {
            self.endpoint.register(
                self.region.as_ptr().cast_mut().add(range.start),
                range.len(),
                access,
            )?
        };
        let w = Window {
            offset: range.start as u64,
            len: range.len() as u64,
            addr: mr.base,
            key: mr.key,
        };
        Ok((mr, w))
    }

    /// A new authenticated connection to `peer`: register its windows and
    /// send our hello.
    fn install(&mut self, peer: NodeId, mut stream: TcpStream) -> Result<(), TransportError> {
        if self.peers[peer.index()].is_some() {
            self.close(peer, "replaced by a new connection");
        }
        let fabric = |e: FabricError| TransportError::Other(e.to_string());
        let (slots_mr, slots) = self
            .window(self.layout.inbound_slots(peer), Access::REMOTE_WRITE)
            .map_err(fabric)?;
        let [h, s] = self.layout.remote_readable();
        let (header_mr, header) = self.window(h, Access::REMOTE_READ).map_err(fabric)?;
        let (status_mr, status) = self.window(s, Access::REMOTE_READ).map_err(fabric)?;
        let (ring_mr, ring) = if self.writer == Some(peer) {
            let (m, w) = self
                .window(self.layout.ring_range(), Access::REMOTE_WRITE)
                .map_err(fabric)?;
            (Some(m), Some(w))
        } else {
            (None, None)
        };
        // Connection-oriented providers: the lower-numbered replica listens
        // and accepts only the token it sends here; the higher one dials.
        let (connect_token, awaited) = if self.endpoint.connection_oriented() && self.me < peer {
            let token = connect_token();
            (
                token,
                Some(self.endpoint.await_peer(token).map_err(fabric)?),
            )
        } else {
            (0, None)
        };
        let hello = Hello {
            endpoint: self.endpoint.name().map_err(fabric)?,
            slots: Some(slots),
            header: Some(header),
            status: Some(status),
            ring,
            connect_token,
        };
        // Small and the first bytes on a fresh stream: a blocking write.
        let sent = apus_tcp::handshake::write_msg(&mut stream, &hello)
            .and_then(|()| stream.set_nonblocking(true))
            .and_then(|()| stream.set_nodelay(true));
        let mut p = Peer {
            stream,
            reader: MessageReader::default(),
            granted: vec![slots_mr, header_mr, status_mr],
            ring: ring_mr,
            remote: None,
            awaited,
            up: false,
            since: Instant::now(),
            inflight: VecDeque::new(),
            held: VecDeque::new(),
        };
        if let Err(e) = sent {
            debug!(me = %self.me, %peer, error = %e, "cannot send hello");
            self.release_registrations(&mut p);
            if let Some(a) = p.awaited
                && let Err(e) = self.endpoint.remove_peer(a)
            {
                warn!(me = %self.me, %peer, error = %e, "cannot drop the awaited connection");
            }
            self.connector.lost(peer);
            return Ok(());
        }
        debug!(me = %self.me, %peer, "hello sent");
        self.peers[peer.index()] = Some(p);
        Ok(())
    }

    fn release_registrations(&mut self, p: &mut Peer) {
        if p.ring.is_some() {
            // The granted writer's key dies with its registration: a
            // connection closed before the engine moved the grant (an
            // operation timed out on a paused leader) revokes it as surely.
            self.stats.revocations.fetch_add(1, AtomicOrdering::Relaxed);
        }
        for mr in p.granted.drain(..).chain(p.ring.take()) {
            if let Err(e) = self.endpoint.deregister(mr) {
                warn!(me = %self.me, error = %e, "deregistration failed");
            }
        }
    }

    /// Ends the connection to `peer`: its keys to us are revoked, every
    /// pending operation fails (in posting order), the engine hears
    /// PeerDown, and the dialer (if we dial) tries again.
    fn close(&mut self, peer: NodeId, why: &str) {
        let Some(mut p) = self.peers[peer.index()].take() else {
            return;
        };
        info!(me = %self.me, %peer, why, "connection closed");
        self.release_registrations(&mut p);
        // The shm provider unmaps a removed peer's memory while operations
        // to it may still be pending in its progress engine, and crashes on
        // them (libfabric 1.17): its entries stay (a reconnecting peer gets
        // a new one; a dead peer's stale operations fail on their own).
        let addr = p.remote.as_ref().map(|r| r.addr).or(p.awaited);
        if let Some(addr) = addr
            && self.endpoint.provider() != "shm"
            && let Err(e) = self.endpoint.remove_peer(addr)
        {
            warn!(me = %self.me, %peer, error = %e, "cannot remove the peer's address");
        }
        let was_up = p.up;
        for f in p.inflight.drain(..) {
            if let Some(slot) = f.cas_slot {
                // The operands may still be read by the provider if the
                // operation is alive; keep the slot out of use.
                if f.done.is_some() {
                    self.cas_free.push(slot);
                }
            }
            self.events.push_back(TransportEvent::Completed(Completion {
                op: f.op,
                peer,
                result: f.done.unwrap_or(Err(OpError::PeerUnreachable)),
            }));
        }
        for op in p.held.drain(..) {
            self.events.push_back(TransportEvent::Completed(Completion {
                op: op.id(),
                peer,
                result: Err(OpError::PeerUnreachable),
            }));
        }
        if was_up {
            self.events.push_back(TransportEvent::PeerDown(peer));
        }
        self.connector.lost(peer);
        // A peer that died may have left our inbound queue wedged.
        if let Some(probe) = self.probe.as_mut() {
            probe.wanted = true;
        }
    }

    /// Posts the self probe when one is due, and reopens the endpoint if
    /// the one in flight is overdue.
    fn check_inbound(&mut self) -> Result<(), TransportError> {
        let Some(probe) = self.probe.as_mut() else {
            return Ok(());
        };
        if let Some((_, posted)) = probe.pending {
            if posted.elapsed() > self.op_timeout / PROBE_FRACTION && probe.passes >= PROBE_PASSES {
                self.stats.resets.fetch_add(1, AtomicOrdering::Relaxed);
                warn!(
                    me = %self.me,
                    provider = %self.provider,
                    "this endpoint's inbound path is stuck (a write to itself did not complete): reopening it"
                );
                self.reset()?;
            }
            return Ok(());
        }
        if !probe.wanted {
            return Ok(());
        }
        let ctx = (self.next_ctx << 8) | PROBE_PEER;
        let to = Remote {
            peer: probe.addr,
            addr: probe.mr.base + 8,
            key: probe.mr.key,
        };
        // SAFETY: 8 bytes from word 0 of the registered probe words to word
        // 1 of the same registration; both live as long as the endpoint.
        let r = unsafe {
            self.endpoint
                .write(self.probe_words.as_ptr().cast(), 8, &probe.mr, to, ctx)
        };
        match r {
            Ok(true) => {
                self.next_ctx += 1;
                probe.wanted = false;
                let now = Instant::now();
                probe.pending = Some((ctx, now));
                probe.passes = 0;
                probe.last_posted = Some(now);
            }
            Ok(false) => {}
            Err(e) => {
                warn!(me = %self.me, error = %e, "cannot post the self probe");
                probe.wanted = false;
            }
        }
        Ok(())
    }

    /// Drops every connection and the endpoint, and opens a fresh one; the
    /// peers reconnect and learn its new name.
    fn reset(&mut self) -> Result<(), TransportError> {
        for p in 0..self.peers.len() {
            self.close(NodeId(p as u8), "reopening this endpoint");
        }
        let opened = open_endpoint(
            &self.provider,
            self.domain.as_deref(),
            &self.layout,
            &self.region,
            &mut self.cas_operands,
            &mut self.probe_words,
        )
        .map_err(|e| TransportError::Other(format!("reopening the endpoint: {e}")))?;
        // The old endpoint closes here, with every registration and
        // operation of it.
        self.endpoint = opened.endpoint;
        self.local = opened.local;
        self.cas_mr = opened.cas_mr;
        self.probe = opened.probe;
        self.cas_free = (0..CAS_SLOTS).rev().collect();
        Ok(())
    }

    fn violation(&mut self, peer: NodeId, why: &str) {
        self.connector
            .stats()
            .violations
            .fetch_add(1, AtomicOrdering::Relaxed);
        warn!(me = %self.me, %peer, why, "protocol violation: closing");
        self.close(peer, "protocol violation");
    }

    /// Reads `peer`'s set-up stream and acts on every whole message.
    fn receive(&mut self, peer: NodeId) {
        let Some(p) = self.peers[peer.index()].as_mut() else {
            return;
        };
        match p.reader.read_from(&mut p.stream) {
            Ok(StreamState::Open) => {}
            Ok(StreamState::Closed) => return self.close(peer, "peer closed the connection"),
            Err(_) => return self.close(peer, "read error"),
        }
        loop {
            let Some(p) = self.peers[peer.index()].as_mut() else {
                return;
            };
            let body = match p.reader.next_message() {
                Ok(Some(body)) => body,
                Ok(None) => return,
                Err(why) => return self.violation(peer, &why),
            };
            let first = p.remote.is_none();
            let handled = if first {
                Hello::decode(body.as_slice())
                    .map_err(|e| e.to_string())
                    .and_then(|h| self.on_hello(peer, h))
            } else {
                RingGrant::decode(body.as_slice())
                    .map_err(|e| e.to_string())
                    .and_then(|g| self.on_grant(peer, g))
            };
            if let Err(why) = handled {
                self.violation(peer, &why);
                return;
            }
        }
    }

    fn on_hello(&mut self, peer: NodeId, h: Hello) -> Result<(), String> {
        let slots = RemoteWindow::check(h.slots, self.layout.inbound_slots(self.me), "slots")?;
        let [hr, sr] = self.layout.remote_readable();
        let header = RemoteWindow::check(h.header, hr, "header")?;
        let status = RemoteWindow::check(h.status, sr, "status")?;
        let ring = match h.ring {
            Some(w) => Some(RemoteWindow::check(
                Some(w),
                self.layout.ring_range(),
                "ring",
            )?),
            None => None,
        };
        let addr = if !self.endpoint.connection_oriented() {
            self.endpoint
                .insert_peer(&h.endpoint)
                .map_err(|e| format!("its endpoint name: {e}"))?
        } else if self.me > peer {
            if h.connect_token == 0 {
                return Err("hello without a connection token".into());
            }
            self.endpoint
                .dial_peer(&h.endpoint, h.connect_token)
                .map_err(|e| format!("connecting to its endpoint: {e}"))?
        } else {
            if h.connect_token != 0 {
                return Err("a connection token from the replica that dials".into());
            }
            let p = self.peers[peer.index()].as_mut().expect("connected");
            p.awaited.take().expect("awaited since the hello was sent")
        };
        let p = self.peers[peer.index()].as_mut().expect("connected");
        p.remote = Some(RemoteSide {
            addr,
            slots,
            readable: [header, status],
            ring,
        });
        self.check_link(peer);
        Ok(())
    }

    /// Tells the engine `peer` is up once the provider's connection to it
    /// is (at once for reliable-datagram providers); closes it if the
    /// connection failed or does not come up in time.
    fn check_link(&mut self, peer: NodeId) {
        let Some(p) = self.peers[peer.index()].as_mut() else {
            return;
        };
        let Some(addr) = p.remote.as_ref().map(|r| r.addr) else {
            return;
        };
        match self.endpoint.link(addr) {
            LinkState::Up if !p.up => {
                p.up = true;
                info!(me = %self.me, %peer, provider = %self.endpoint.provider(), "connection established");
                self.events.push_back(TransportEvent::PeerUp(peer));
            }
            LinkState::Up => {}
            LinkState::Down(why) => self.close(peer, &format!("provider connection: {why}")),
            LinkState::Connecting if p.since.elapsed() > CONNECT_TIMEOUT => {
                self.stats.timeouts.fetch_add(1, AtomicOrdering::Relaxed);
                self.close(peer, "the provider connection did not come up in time");
            }
            LinkState::Connecting => {}
        }
    }

    fn on_grant(&mut self, peer: NodeId, g: RingGrant) -> Result<(), String> {
        let ring = match g.ring {
            Some(w) => Some(RemoteWindow::check(
                Some(w),
                self.layout.ring_range(),
                "ring",
            )?),
            None => None,
        };
        debug!(me = %self.me, %peer, granted = ring.is_some(), "ring grant changed");
        let p = self.peers[peer.index()].as_mut().expect("connected");
        p.remote.as_mut().expect("after hello").ring = ring;
        Ok(())
    }

    /// Tells `peer` its current ring access; a failure ends the connection.
    fn send_grant(&mut self, peer: NodeId, ring: Option<Window>) {
        let Some(p) = self.peers[peer.index()].as_mut() else {
            return;
        };
        let body = RingGrant { ring }.encode_to_vec();
        let mut msg = Vec::with_capacity(4 + body.len());
        msg.extend_from_slice(&(body.len() as u32).to_le_bytes());
        msg.extend_from_slice(&body);
        // A few dozen bytes on a stream that carries nothing else: the
        // socket buffer takes it whole or the peer is gone.
        if p.stream.write_all(&msg).is_err() {
            self.close(peer, "cannot send a ring grant");
        }
    }

    fn complete_now(&mut self, peer: NodeId, op: OpId, kind: Kind, result: Result<(), OpError>) {
        let p = self.peers[peer.index()].as_mut().expect("connected");
        p.inflight.push_back(Inflight {
            ctx: 0,
            op,
            kind,
            ring: false,
            posted: Instant::now(),
            done: Some(result),
            cas_slot: None,
        });
    }

    /// Posts `op` to `peer` now if order allows and the provider takes it.
    /// `Ok(false)`: hold it (and everything after it).
    fn try_post(&mut self, peer: NodeId, op: RemoteOp) -> Result<bool, TransportError> {
        let kind = Kind::of(&op);
        let ordering = self.ordering;
        let p = self.peers[peer.index()].as_mut().expect("connected");
        let remote = *p.remote.as_ref().expect("up");
        if !p
            .inflight
            .iter()
            .filter(|f| f.done.is_none())
            .all(|f| kind.ordered_after(f.kind, ordering))
        {
            return Ok(false);
        }
        let ctx = (self.next_ctx << 8) | peer.index() as u64;
        let base = self.region.as_ptr();
        let (posted, ring, cas_slot) = match op {
            RemoteOp::Write {
                local_offset,
                len,
                remote_offset,
                op: id,
                ..
            } => {
                check_local(&self.region, local_offset, len)?;
                let ring = self.layout.ring_range().contains(&remote_offset);
                let target = remote
                    .slots
                    .at(remote_offset, len)
                    .or_else(|| remote.ring.and_then(|r| r.at(remote_offset, len)));
                let Some((addr, key)) = target else {
                    if ring {
                        self.stats
                            .fenced_writes
                            .fetch_add(1, AtomicOrdering::Relaxed);
                    }
                    self.complete_now(peer, id, kind, Err(OpError::AccessDenied));
                    return Ok(true);
                };
                let to = Remote {
                    peer: remote.addr,
                    addr,
                    key,
                };
                let local = &self.local;
                // SAFETY: the source lies in the registered region (checked
                // above), which outlives every operation on the endpoint.
                let r = unsafe {
                    self.endpoint
                        .write(base.add(local_offset), len, local, to, ctx)
                };
                (r, ring, None)
            }
            RemoteOp::Read {
                remote_offset,
                len,
                local_offset,
                op: id,
                ..
            } => {
                check_local(&self.region, local_offset, len)?;
                let Some((addr, key)) = remote
                    .readable
                    .iter()
                    .find_map(|w| w.at(remote_offset, len))
                else {
                    self.complete_now(peer, id, kind, Err(OpError::AccessDenied));
                    return Ok(true);
                };
                let from = Remote {
                    peer: remote.addr,
                    addr,
                    key,
                };
                let local = &self.local;
                // SAFETY: the destination lies in the registered region.
                let r = unsafe {
                    self.endpoint
                        .read(base.add(local_offset).cast_mut(), len, local, from, ctx)
                };
                (r, false, None)
            }
            RemoteOp::CompareAndSwap {
                remote_offset,
                expected,
                new,
                local_offset,
                op: id,
                ..
            } => {
                check_local(&self.region, local_offset, 8)?;
                if local_offset % 8 != 0 {
                    return Err(TransportError::Other(
                        "compare-and-swap result must be 8-aligned".into(),
                    ));
                }
                let target = (remote_offset % 8 == 0)
                    .then(|| remote.slots.at(remote_offset, 8))
                    .flatten();
                let (Some(cas_mr), Some((addr, key))) = (self.cas_mr.as_ref(), target) else {
                    let why = if self.cas_mr.is_none() {
                        OpError::Unsupported
                    } else {
                        OpError::AccessDenied
                    };
                    self.complete_now(peer, id, kind, Err(why));
                    return Ok(true);
                };
                let Some(&slot) = self.cas_free.last() else {
                    return Ok(false);
                };
                self.cas_operands[2 * slot] = new;
                self.cas_operands[2 * slot + 1] = expected;
                let at = Remote {
                    peer: remote.addr,
                    addr,
                    key,
                };
                let operands = self.cas_operands.as_ptr();
                let local = &self.local;
                // SAFETY: the operands live in the registered array until the
                // slot is freed at completion; the result word lies in the
                // registered region and is 8-aligned (checked above).
                let r = unsafe {
                    self.endpoint.compare_and_swap(
                        operands.add(2 * slot),
                        operands.add(2 * slot + 1),
                        cas_mr,
                        base.add(local_offset).cast::<u64>().cast_mut(),
                        local,
                        at,
                        ctx,
                    )
                };
                (r, false, Some(slot))
            }
        };
        match posted {
            Ok(true) => {
                self.next_ctx += 1;
                if let Some(slot) = cas_slot {
                    self.cas_free.retain(|&s| s != slot);
                }
                let p = self.peers[peer.index()].as_mut().expect("connected");
                p.inflight.push_back(Inflight {
                    ctx,
                    op: op.id(),
                    kind,
                    ring,
                    posted: Instant::now(),
                    done: None,
                    cas_slot,
                });
                Ok(true)
            }
            Ok(false) => Ok(false),
            Err(e) => {
                warn!(me = %self.me, %peer, error = %e, "post failed");
                self.stats.errors.fetch_add(1, AtomicOrdering::Relaxed);
                self.complete_now(peer, op.id(), kind, Err(OpError::PeerUnreachable));
                Ok(true)
            }
        }
    }

    /// Posts held operations of `peer` while order and the provider allow.
    fn post_held(&mut self, peer: NodeId) -> Result<(), TransportError> {
        while let Some(op) = self.peers[peer.index()]
            .as_mut()
            .and_then(|p| p.held.front().copied())
        {
            if !self.try_post(peer, op)? {
                break;
            }
            if let Some(p) = self.peers[peer.index()].as_mut() {
                p.held.pop_front();
            }
        }
        Ok(())
    }

    /// Hands the engine every completion whose predecessors completed.
    fn release(&mut self, peer: NodeId) {
        let Some(p) = self.peers[peer.index()].as_mut() else {
            return;
        };
        while let Some(f) = p.inflight.front() {
            let Some(result) = f.done else { break };
            let f = p.inflight.pop_front().expect("front");
            if let Some(slot) = f.cas_slot {
                self.cas_free.push(slot);
            }
            self.events.push_back(TransportEvent::Completed(Completion {
                op: f.op,
                peer,
                result,
            }));
        }
    }

    /// Drives the provider and files its completions with their peers.
    fn progress(&mut self) -> Result<(), TransportError> {
        self.completions.clear();
        self.endpoint
            .poll(&mut self.completions)
            .map_err(|e| TransportError::Other(e.to_string()))?;
        if let Some(probe) = self.probe.as_mut()
            && probe.pending.is_some()
        {
            probe.passes = probe.passes.saturating_add(1);
        }
        let mut broken = Vec::new();
        for c in self.completions.drain(..) {
            if c.context & 0xff == PROBE_PEER {
                if let Some(probe) = self.probe.as_mut()
                    && probe.pending.is_some_and(|(ctx, _)| ctx == c.context)
                {
                    probe.pending = None;
                    debug!(me = %self.me, result = ?c.result, "self probe completed");
                }
                continue;
            }
            let peer = (c.context & 0xff) as usize;
            let Some(p) = self.peers.get_mut(peer).and_then(Option::as_mut) else {
                continue;
            };
            // A completion of an operation of an earlier connection finds
            // nothing here and is dropped.
            let Some(f) = p.inflight.iter_mut().find(|f| f.ctx == c.context) else {
                continue;
            };
            f.done = Some(match &c.result {
                Ok(()) => Ok(()),
                Err(text) => {
                    self.stats.errors.fetch_add(1, AtomicOrdering::Relaxed);
                    if f.ring {
                        // The peer revoked our ring key: fenced.
                        self.stats
                            .fenced_writes
                            .fetch_add(1, AtomicOrdering::Relaxed);
                        debug!(me = %self.me, peer, error = %text, "ring write refused");
                        Err(OpError::AccessDenied)
                    } else {
                        warn!(me = %self.me, peer, error = %text, "operation failed");
                        broken.push(NodeId(peer as u8));
                        Err(OpError::PeerUnreachable)
                    }
                }
            });
        }
        for peer in broken {
            // After an unexplained error the provider's ordering of what
            // follows is unknown: start over with a new connection.
            self.close(peer, "an operation failed");
        }
        Ok(())
    }
}

impl Transport for FabricTransport {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            compare_and_swap: self.cas_mr.is_some(),
        }
    }

    fn post(&mut self, op: RemoteOp) -> Result<(), TransportError> {
        let peer = op.peer();
        if peer.index() >= self.peers.len() || peer == self.me {
            return Err(TransportError::UnknownPeer(peer));
        }
        let up = self.connected(peer);
        if !up {
            self.events.push_back(TransportEvent::Completed(Completion {
                op: op.id(),
                peer,
                result: Err(OpError::PeerUnreachable),
            }));
            return Ok(());
        }
        let p = self.peers[peer.index()].as_mut().expect("connected");
        if p.held.len() + p.inflight.len() >= MAX_QUEUED {
            self.close(
                peer,
                "too many operations queued: the peer makes no progress",
            );
            self.events.push_back(TransportEvent::Completed(Completion {
                op: op.id(),
                peer,
                result: Err(OpError::PeerUnreachable),
            }));
            return Ok(());
        }
        if p.held.is_empty() && self.try_post(peer, op)? {
            return Ok(());
        }
        if let Some(p) = self.peers[peer.index()].as_mut() {
            p.held.push_back(op);
        }
        Ok(())
    }

    fn set_log_writer(&mut self, writer: Option<NodeId>) -> Result<(), TransportError> {
        if writer == self.writer {
            return Ok(());
        }
        if let Some(old) = self.writer
            && let Some(p) = self.peers[old.index()].as_mut()
            && let Some(mr) = p.ring.take()
        {
            // Closing the registration kills its key before we return.
            self.endpoint
                .deregister(mr)
                .map_err(|e| TransportError::Other(e.to_string()))?;
            self.stats.revocations.fetch_add(1, AtomicOrdering::Relaxed);
            self.send_grant(old, None);
        }
        self.writer = writer;
        if let Some(new) = writer
            && self.peers.get(new.index()).is_some_and(Option::is_some)
        {
            let (mr, w) = self
                .window(self.layout.ring_range(), Access::REMOTE_WRITE)
                .map_err(|e| TransportError::Other(e.to_string()))?;
            self.peers[new.index()].as_mut().expect("connected").ring = Some(mr);
            self.send_grant(new, Some(w));
        }
        Ok(())
    }

    fn poll(&mut self, events: &mut Vec<TransportEvent>) -> Result<(), TransportError> {
        while let Some((peer, stream)) = self.connector.established() {
            self.install(peer, stream)?;
        }
        self.progress()?;
        self.check_inbound()?;
        let now = Instant::now();
        for i in 0..self.peers.len() {
            let peer = NodeId(i as u8);
            if self.peers[i].is_none() {
                continue;
            }
            self.receive(peer);
            if self.endpoint.connection_oriented() {
                self.check_link(peer);
            }
            if self.connected(peer) {
                self.release(peer);
                self.post_held(peer)?;
                let p = self.peers[i].as_ref().expect("connected");
                let oldest = p
                    .inflight
                    .iter()
                    .find(|f| f.done.is_none())
                    .map(|f| now.duration_since(f.posted));
                if let Some(probe) = self.probe.as_mut()
                    && probe.pending.is_none()
                    && oldest.is_some_and(|age| age > self.op_timeout / PROBE_FRACTION)
                    && probe
                        .last_posted
                        .is_none_or(|t| now.duration_since(t) > self.op_timeout / PROBE_FRACTION)
                {
                    // Late: our own inbound path may be what is wedged.
                    probe.wanted = true;
                }
                if oldest.is_some_and(|age| age > self.op_timeout) {
                    self.stats.timeouts.fetch_add(1, AtomicOrdering::Relaxed);
                    self.close(peer, "an operation did not complete in time");
                }
            }
        }
        events.extend(self.events.drain(..));
        Ok(())
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
        if !self.events.is_empty() {
            return Ok(());
        }
        self.interests.clear();
        self.interests.push(Interest {
            fd: self.connector.wake().as_raw_fd(),
            writable: false,
        });
        for p in self.peers.iter().flatten() {
            self.interests.push(Interest {
                fd: p.stream.as_raw_fd(),
                writable: false,
            });
        }
        poll_sys::wait(
            &self.interests,
            &mut self.pollfds,
            timeout.min(PROGRESS_INTERVAL),
        )?;
        self.connector.wake().drain();
        Ok(())
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.connector.wake().clone()
    }
}
