//! `transport = "auto"`: the replicas settle on the best transport all of
//! them can run.
//!
//! Each replica detects what it can run, best first: a verbs device
//! (`verbs`), the configured libfabric provider with RMA
//! (`fabric/<provider>`, `tcp;ofi_rxm` unless configured), TCP (`tcp`);
//! only what this build has compiled in. Replicas meet over the transports'
//! own authenticated handshake with transport `auto` (the higher id dials)
//! and exchange their offers ([`Offer`]). A replica holding every replica's
//! offer runs the first of its own that all of them made: each computes the
//! same answer from the same offers.
//!
//! A replica that meets one already running a transport (it restarted, or
//! came late) learns that transport from the handshake: as the acceptor,
//! from the running replica's authenticated hello; as the dialer, from the
//! refusal, which it confirms with a second, authenticated handshake for
//! that transport. It runs it, or stops with an error saying why it cannot.
//!
//! Until every replica has been heard from once, nobody settles: a cluster
//! whose first start lacks a replica waits for it (logged every few
//! seconds). Pin `transport` in the configuration to start without it.
//!
//! Negotiation runs on a thread of its own; [`AutoTransport`] reports no
//! peer until it is settled, then hands everything to the chosen transport.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use apus_core::{
    Capabilities, Completion, NodeId, OpError, Region, RegionLayout, RemoteOp, Transport,
    TransportError, TransportEvent, Wake,
};
use apus_tcp::handshake::{self, HandshakeError, LayoutInfo};
use apus_tcp::sys::{self as poll_sys, EventFd, Interest};
use tracing::{debug, info, warn};

use crate::config::{ClusterConfig, TransportKind};
use crate::identity::ReplicaIdentity;
use crate::node::{FencingCounts, FencingProbe, NodeError, OpenedTransport, open_concrete};

/// How often a replica redials one it has already heard (a peer that
/// restarted while negotiating needs our offer again).
const REDIAL_EVERY: Duration = Duration::from_secs(1);
/// How often a replica dials one it has not heard yet.
const RETRY_EVERY: Duration = Duration::from_millis(100);
/// How long a dial waits for the TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Between rounds of accepting and dialling.
const ROUND: Duration = Duration::from_millis(20);
/// How often the replicas not heard from yet are logged.
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// What a replica can run, best first (handshake names).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Offer {
    /// `verbs`, `fabric/<provider>`, `tcp`.
    #[prost(string, repeated, tag = "1")]
    pub transports: Vec<String>,
}

/// The handshake name of a concrete transport.
fn wire_name(kind: TransportKind, config: &ClusterConfig) -> String {
    match kind {
        TransportKind::Fabric => format!(
            "fabric/{}",
            config.fabric.as_ref().map_or("", |f| f.provider.as_str())
        ),
        other => other.name().to_string(),
    }
}

/// What this replica can run, best first.
// Which pushes exist depends on the features compiled in.
#[allow(clippy::vec_init_then_push)]
pub fn detect(config: &ClusterConfig) -> Vec<TransportKind> {
    let mut can = Vec::new();
    #[cfg(feature = "verbs")]
    {
        let sel = apus_rdma::Selection {
            device: config.verbs.as_ref().and_then(|v| v.device.clone()),
            ..apus_rdma::Selection::default()
        };
        match apus_rdma::Device::open(&sel, 16) {
            Ok(d) => {
                debug!(device = %d.name(), "auto: verbs available");
                can.push(TransportKind::Verbs);
            }
            Err(e) => info!("auto: verbs not available: {e}"),
        }
    }
    #[cfg(feature = "fabric")]
    if let Some(f) = &config.fabric {
        match apus_fabric::Endpoint::open_in(&f.provider, f.domain.as_deref()) {
            Ok(_) => can.push(TransportKind::Fabric),
            Err(e) => info!(provider = %f.provider, "auto: fabric not available: {e}"),
        }
    }
    #[cfg(feature = "tcp")]
    can.push(TransportKind::Tcp);
    let _ = config;
    can
}

/// The first of `mine` that every offer holds.
fn choose(mine: &[String], offers: &[Vec<String>]) -> Result<String, String> {
    mine.iter()
        .find(|t| offers.iter().all(|o| o.contains(t)))
        .cloned()
        .ok_or_else(|| {
            let listed: Vec<String> = offers
                .iter()
                .enumerate()
                .map(|(i, o)| format!("n{i} offers {o:?}"))
                .collect();
            format!("no transport every replica can run ({})", listed.join(", "))
        })
}

/// A transport the cluster already runs, if this replica can run it too.
fn adopt(theirs: &str, mine: &[String], from: NodeId) -> Result<String, String> {
    if mine.iter().any(|m| m == theirs) {
        info!(peer = %from, transport = theirs, "auto: the cluster already runs this transport");
        Ok(theirs.to_string())
    } else {
        Err(format!(
            "the cluster runs transport {theirs:?} (learned from {from}), which this replica \
             cannot run: it can run {mine:?}; install what it needs or pin `transport`"
        ))
    }
}

/// The blocking negotiation: returns the handshake name settled on.
struct Negotiation {
    me: NodeId,
    peers: Vec<SocketAddr>,
    secret: Vec<u8>,
    layout: LayoutInfo,
    mine: Vec<String>,
    stop: Arc<AtomicBool>,
}

/// What one meeting with a peer taught us.
enum Heard {
    Offer(NodeId, Vec<String>),
    Settled(NodeId, String),
}

impl Negotiation {
    fn exchange(&self, s: &mut TcpStream, peer: NodeId) -> Result<Heard, HandshakeError> {
        s.set_read_timeout(Some(handshake::TIMEOUT))?;
        s.set_write_timeout(Some(handshake::TIMEOUT))?;
        handshake::write_msg(
            s,
            &Offer {
                transports: self.mine.clone(),
            },
        )?;
        let theirs: Offer = handshake::read_msg(s)?;
        if theirs.transports.is_empty() {
            return Err(HandshakeError::Malformed("an empty offer".into()));
        }
        Ok(Heard::Offer(peer, theirs.transports))
    }

    /// A replica with a higher id dialled us.
    fn on_accepted(&self, mut s: TcpStream) -> Result<Heard, HandshakeError> {
        s.set_nonblocking(false)?;
        let (peer, theirs) =
            handshake::accept_any_transport(&mut s, &self.secret, self.me, &self.layout, None)?;
        if theirs == "auto" {
            self.exchange(&mut s, peer)
        } else {
            // Authenticated: its hello carried the transport it runs.
            Ok(Heard::Settled(peer, theirs))
        }
    }

    fn dial(&self, peer: NodeId, layout: &LayoutInfo) -> Result<TcpStream, HandshakeError> {
        let mut s = TcpStream::connect_timeout(&self.peers[peer.index()], CONNECT_TIMEOUT)?;
        // The transport settled on introduces the replicas; this meeting only
        // chooses it.
        handshake::dial(&mut s, &self.secret, self.me, peer, layout, None)?;
        Ok(s)
    }

    /// Dials a replica with a lower id.
    fn on_dial(&self, peer: NodeId) -> Result<Heard, HandshakeError> {
        match self.dial(peer, &self.layout) {
            Ok(mut s) => self.exchange(&mut s, peer),
            Err(HandshakeError::OtherTransport { theirs }) => {
                // The refusal is not authenticated: confirm with a handshake
                // for that transport, which only a replica holding the
                // secret and running it completes.
                let confirm = self.layout.clone().for_transport(&theirs);
                self.dial(peer, &confirm)?;
                Ok(Heard::Settled(peer, theirs))
            }
            Err(e) => Err(e),
        }
    }

    fn run(&self) -> Result<String, String> {
        let n = self.peers.len();
        let listener = TcpListener::bind(self.peers[self.me.index()])
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|e| format!("binding {}: {e}", self.peers[self.me.index()]))?;
        let mut offers: Vec<Option<Vec<String>>> = vec![None; n];
        offers[self.me.index()] = Some(self.mine.clone());
        let mut dialled: Vec<Option<Instant>> = vec![None; n];
        let mut reported = Instant::now();
        info!(me = %self.me, offers = ?self.mine, "auto: choosing the transport with the other replicas");
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err("stopped while choosing the transport".into());
            }
            let mut heard = Vec::new();
            loop {
                match listener.accept() {
                    Ok((s, _)) => match self.on_accepted(s) {
                        Ok(h) => heard.push(h),
                        Err(e) => {
                            debug!(me = %self.me, error = %e, "auto: an incoming meeting failed")
                        }
                    },
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        debug!(me = %self.me, error = %e, "auto: accept failed");
                        break;
                    }
                }
            }
            for p in 0..self.me.index() {
                let every = if offers[p].is_some() {
                    REDIAL_EVERY
                } else {
                    RETRY_EVERY
                };
                if dialled[p].is_some_and(|t| t.elapsed() < every) {
                    continue;
                }
                dialled[p] = Some(Instant::now());
                match self.on_dial(NodeId(p as u8)) {
                    Ok(h) => heard.push(h),
                    Err(e) => debug!(me = %self.me, peer = p, error = %e, "auto: cannot meet yet"),
                }
            }
            for h in heard {
                match h {
                    Heard::Settled(peer, theirs) => return adopt(&theirs, &self.mine, peer),
                    Heard::Offer(peer, o) => {
                        debug!(me = %self.me, %peer, offer = ?o, "auto: offer received");
                        offers[peer.index()] = Some(o);
                    }
                }
            }
            if offers.iter().all(Option::is_some) {
                let all: Vec<Vec<String>> = offers.into_iter().flatten().collect();
                return choose(&self.mine, &all);
            }
            if reported.elapsed() >= REPORT_EVERY {
                reported = Instant::now();
                let missing: Vec<String> = (0..n)
                    .filter(|&i| offers[i].is_none())
                    .map(|i| format!("n{i}"))
                    .collect();
                info!(me = %self.me, waiting_for = %missing.join(", "), "auto: waiting for every replica's offer");
            }
            thread::sleep(ROUND);
        }
    }
}

/// Wakes the chosen transport once there is one, the negotiation's wait
/// before.
#[derive(Debug)]
struct ForwardingWake {
    own: Arc<EventFd>,
    inner: OnceLock<Arc<dyn Wake>>,
}

impl Wake for ForwardingWake {
    fn wake(&self) {
        match self.inner.get() {
            Some(w) => w.wake(),
            None => self.own.wake(),
        }
    }
}

type Settled = Result<(OpenedTransport, TransportKind), String>;

enum State {
    Choosing {
        settled: Receiver<Settled>,
        thread: Option<JoinHandle<()>>,
        /// The last log writer the engine asked for, applied once settled.
        writer: Option<Option<NodeId>>,
    },
    Running(Box<dyn Transport + Send>),
    Failed(String),
}

/// The transport of a replica configured with `transport = "auto"`.
pub struct AutoTransport {
    state: State,
    wake: Arc<ForwardingWake>,
    stop: Arc<AtomicBool>,
    kind: Arc<AtomicU8>,
    fencing: Arc<OnceLock<FencingProbe>>,
    events: Vec<TransportEvent>,
    pollfds: Vec<libc::pollfd>,
}

impl std::fmt::Debug for AutoTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AutoTransport")
            .field("kind", &self.kind.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Starts choosing the transport for replica `id`; `kind` is set to the
/// chosen one's [`TransportKind::code`] once settled.
pub(crate) fn start(
    config: ClusterConfig,
    id: NodeId,
    layout: RegionLayout,
    region: Region,
    kind: Arc<AtomicU8>,
    identity: Arc<ReplicaIdentity>,
) -> Result<OpenedTransport, NodeError> {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let thread = {
        let stop = stop.clone();
        thread::Builder::new()
            .name(format!("apus-auto-{id}"))
            .spawn(move || {
                let kinds = detect(&config);
                let mine: Vec<String> = kinds.iter().map(|&k| wire_name(k, &config)).collect();
                let settled = if mine.is_empty() {
                    Err("this build has no transport auto can run: enable the apus feature `tcp`, `fabric` or `verbs`".to_string())
                } else {
                    Negotiation {
                        me: id,
                        peers: config.replicas.iter().map(|r| r.address).collect(),
                        secret: config.secret.clone(),
                        layout: LayoutInfo {
                            cluster: config.name.clone(),
                            ..LayoutInfo::of(&layout).for_transport("auto")
                        },
                        mine: mine.clone(),
                        stop,
                    }
                    .run()
                };
                let opened = settled.and_then(|name| {
                    let k = kinds[mine.iter().position(|m| *m == name).expect("one of ours")];
                    info!(me = %id, transport = %name, "auto: transport settled");
                    open_concrete(k, &config, id, layout, region, identity)
                        .map(|o| (o, k))
                        .map_err(|e| format!("opening the settled transport {name}: {e}"))
                });
                let _ = tx.send(opened);
            })?
    };
    let own = Arc::new(EventFd::new()?);
    let fencing: Arc<OnceLock<FencingProbe>> = Arc::new(OnceLock::new());
    let probe: FencingProbe = {
        let fencing = fencing.clone();
        Box::new(move || fencing.get().map_or(FencingCounts::default(), |f| f()))
    };
    Ok(OpenedTransport {
        transport: Box::new(AutoTransport {
            state: State::Choosing {
                settled: rx,
                thread: Some(thread),
                writer: None,
            },
            wake: Arc::new(ForwardingWake {
                own,
                inner: OnceLock::new(),
            }),
            stop,
            kind,
            fencing,
            events: Vec::new(),
            pollfds: Vec::with_capacity(1),
        }),
        fencing: Some(probe),
    })
}

impl AutoTransport {
    /// Takes the negotiation's result, if it arrived.
    fn check(&mut self) -> Result<(), TransportError> {
        let State::Choosing {
            settled,
            thread,
            writer,
        } = &mut self.state
        else {
            return Ok(());
        };
        let result = match settled.try_recv() {
            Ok(r) => r,
            Err(TryRecvError::Empty) => return Ok(()),
            Err(TryRecvError::Disconnected) => Err("the negotiation thread died".to_string()),
        };
        if let Some(t) = thread.take() {
            let _ = t.join();
        }
        let writer = *writer;
        match result {
            Ok((opened, kind)) => {
                let mut t = opened.transport;
                if let Some(w) = writer {
                    t.set_log_writer(w)?;
                }
                if let Some(f) = opened.fencing {
                    let _ = self.fencing.set(f);
                }
                let inner = t.waker();
                let _ = self.wake.inner.set(inner.clone());
                // A wake that went to the negotiation's eventfd.
                inner.wake();
                self.kind.store(kind.code(), Ordering::Relaxed);
                self.state = State::Running(t);
            }
            Err(why) => {
                warn!("auto: {why}");
                self.state = State::Failed(why);
            }
        }
        Ok(())
    }
}

impl Transport for AutoTransport {
    fn capabilities(&self) -> Capabilities {
        match &self.state {
            State::Running(t) => t.capabilities(),
            _ => Capabilities::default(),
        }
    }

    fn post(&mut self, op: RemoteOp) -> Result<(), TransportError> {
        match &mut self.state {
            State::Running(t) => t.post(op),
            _ => {
                // No peer is up before the transport is chosen.
                self.events.push(TransportEvent::Completed(Completion {
                    op: op.id(),
                    peer: op.peer(),
                    result: Err(OpError::PeerUnreachable),
                }));
                Ok(())
            }
        }
    }

    fn set_log_writer(&mut self, w: Option<NodeId>) -> Result<(), TransportError> {
        match &mut self.state {
            State::Running(t) => t.set_log_writer(w),
            State::Choosing { writer, .. } => {
                *writer = Some(w);
                Ok(())
            }
            State::Failed(why) => Err(TransportError::Other(why.clone())),
        }
    }

    fn poll(&mut self, events: &mut Vec<TransportEvent>) -> Result<(), TransportError> {
        self.check()?;
        events.append(&mut self.events);
        match &mut self.state {
            State::Running(t) => t.poll(events),
            State::Choosing { .. } => Ok(()),
            State::Failed(why) => Err(TransportError::Other(format!(
                "transport = \"auto\": {why}"
            ))),
        }
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
        if let State::Running(t) = &mut self.state {
            return t.wait(timeout);
        }
        if !self.events.is_empty() {
            return Ok(());
        }
        let own = &self.wake.own;
        poll_sys::wait(
            &[Interest {
                fd: own.as_raw_fd(),
                writable: false,
            }],
            &mut self.pollfds,
            timeout.min(ROUND),
        )?;
        own.drain();
        Ok(())
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.wake.clone()
    }
}

impl Drop for AutoTransport {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let State::Choosing { thread, .. } = &mut self.state
            && let Some(t) = thread.take()
        {
            // Within a round and a handshake: it frees the address.
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn the_best_transport_every_replica_offers_wins() {
        let rdma = s(&["verbs", "fabric/tcp;ofi_rxm", "tcp"]);
        let fabric = s(&["fabric/tcp;ofi_rxm", "tcp"]);
        let plain = s(&["tcp"]);
        assert_eq!(
            choose(&rdma, &[rdma.clone(), rdma.clone(), rdma.clone()]).unwrap(),
            "verbs"
        );
        assert_eq!(
            choose(&rdma, &[rdma.clone(), fabric.clone(), rdma.clone()]).unwrap(),
            "fabric/tcp;ofi_rxm"
        );
        assert_eq!(
            choose(&fabric, &[rdma.clone(), fabric.clone(), plain.clone()]).unwrap(),
            "tcp"
        );
        let e = choose(&rdma, &[rdma.clone(), s(&["quic"])]).unwrap_err();
        assert!(e.contains("no transport every replica can run"), "{e}");
        assert!(e.contains("n1 offers [\"quic\"]"), "{e}");
    }

    #[test]
    fn a_settled_transport_is_adopted_only_if_runnable() {
        let mine = s(&["fabric/tcp;ofi_rxm", "tcp"]);
        assert_eq!(adopt("tcp", &mine, NodeId(1)).unwrap(), "tcp");
        let e = adopt("verbs", &mine, NodeId(2)).unwrap_err();
        assert!(e.contains("\"verbs\"") && e.contains("n2"), "{e}");
    }
}
