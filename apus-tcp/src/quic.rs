//! The remote-memory transport over QUIC (feature `quic`), with mutual TLS.
//!
//! Each replica has a certificate for the name `apus-n<id>`, signed by the
//! cluster's CA ([`generate_certs`] makes a set). Connections are TLS 1.3
//! both ways: the acceptor requires a client certificate from the CA, the
//! dialer verifies the acceptor's, and each side then checks that the peer's
//! certificate is exactly the one configured for the id it claims. The
//! higher id dials; one bidirectional stream per pair carries the same
//! frames as the TCP transport, processed by the same code in the engine
//! thread (the crate's `link` module): tokio tasks only move bytes and wake the engine, so
//! `set_log_writer` still takes effect the moment it returns.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use apus_core::{
    Capabilities, Completion, NodeId, OpError, Region, RegionLayout, RemoteOp, Transport,
    TransportError, TransportEvent, Wake,
};
use prost::Message;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tracing::{debug, info, warn};

use crate::TransportStats;
use crate::handshake::{self, Hello, LayoutInfo, Verdict};
use crate::identity::{Identity, Introduction};
use crate::link::{Link, Local, OpDeadline};
use crate::sys::{self, EventFd, Interest};

const ALPN: &[u8] = b"apus/1";

/// The certificates of a cluster: the CA, every replica's certificate (by
/// id), and this replica's private key.
pub struct TlsConfig {
    /// The cluster CA.
    pub ca: CertificateDer<'static>,
    /// Every replica's certificate, by id.
    pub certs: Vec<CertificateDer<'static>>,
    /// This replica's private key.
    pub key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("certs", &self.certs.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

fn pem_err(path: &Path, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {e}", path.display()),
    )
}

impl TlsConfig {
    /// Loads PEM files: the CA certificate, each replica's certificate (by
    /// id), and this replica's key.
    pub fn load(ca: &Path, certs: &[&Path], key: &Path) -> io::Result<TlsConfig> {
        let one_cert = |p: &Path| CertificateDer::from_pem_file(p).map_err(|e| pem_err(p, e));
        Ok(TlsConfig {
            ca: one_cert(ca)?,
            certs: certs
                .iter()
                .map(|p| one_cert(p))
                .collect::<io::Result<_>>()?,
            key: PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e))?,
        })
    }
}

/// A freshly generated set of cluster certificates, PEM-encoded.
#[derive(Debug)]
pub struct GeneratedCerts {
    /// The CA certificate.
    pub ca_cert: String,
    /// The CA's private key (keep it offline; it signs new replicas).
    pub ca_key: String,
    /// `(certificate, private key)` of each replica, by id.
    pub replicas: Vec<(String, String)>,
}

/// Generates a CA and one certificate per replica (`apus-n<id>`).
pub fn generate_certs(replicas: usize) -> Result<GeneratedCerts, rcgen::Error> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "apus cluster CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca_pem = ca_cert.pem();
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let mut out = Vec::new();
    for id in 0..replicas {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(vec![server_name(NodeId(id as u8))])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, server_name(NodeId(id as u8)));
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer)?;
        out.push((cert.pem(), key.serialize_pem()));
    }
    Ok(GeneratedCerts {
        ca_cert: ca_pem,
        ca_key: ca_key_pem,
        replicas: out,
    })
}

fn server_name(id: NodeId) -> String {
    format!("apus-n{}", id.0)
}

/// Where every replica listens, and the certificates.
#[derive(Debug)]
pub struct QuicConfig {
    /// This replica.
    pub me: NodeId,
    /// Replication address (UDP) of every replica, by id.
    pub peers: Vec<SocketAddr>,
    /// The region layout every replica uses.
    pub layout: RegionLayout,
    /// The cluster's certificates and this replica's key.
    pub tls: TlsConfig,
    /// An operation without its answer this long ends the connection
    /// ([`DEFAULT_OP_TIMEOUT`](crate::DEFAULT_OP_TIMEOUT) unless configured).
    pub op_timeout: Duration,
    /// Who this replica is across restarts ([`crate::identity`]).
    pub identity: Option<Arc<dyn Identity>>,
}

enum Incoming {
    Up {
        peer: NodeId,
        generation: u64,
        tx: UnboundedSender<Vec<u8>>,
    },
    Data {
        peer: NodeId,
        generation: u64,
        bytes: Vec<u8>,
    },
    Down {
        peer: NodeId,
        generation: u64,
    },
}

struct QuicLink {
    generation: u64,
    link: Link,
    tx: UnboundedSender<Vec<u8>>,
}

/// What the tokio tasks share.
struct Ctx {
    me: NodeId,
    layout: LayoutInfo,
    identity: Option<Arc<dyn Identity>>,
    certs: Vec<CertificateDer<'static>>,
    inbox: Mutex<Sender<Incoming>>,
    wake: Arc<EventFd>,
    stop: AtomicBool,
    generation: AtomicU64,
    stats: Arc<TransportStats>,
}

impl Ctx {
    fn introduce(&self, peer: NodeId) -> Option<Introduction> {
        self.identity.as_ref().map(|id| id.introduce(peer))
    }

    /// Acts on an authenticated peer's introduction. With QUIC's two-message
    /// handshake the acceptor learns what the dialer learned only at the
    /// next handshake (the dialer lists it as superseded then).
    fn meet(&self, peer: NodeId, intro: Option<&Introduction>) -> io::Result<()> {
        match (&self.identity, intro) {
            (Some(id), Some(intro)) => id.met(peer, intro),
            _ => Ok(()),
        }
    }

    fn send(&self, m: Incoming) {
        if let Ok(tx) = self.inbox.lock() {
            let _ = tx.send(m);
        }
        self.wake.wake();
    }
}

/// The engine side of the QUIC transport.
pub struct QuicTransport {
    me: NodeId,
    layout: RegionLayout,
    region: Region,
    writer: Option<NodeId>,
    links: Vec<Option<QuicLink>>,
    inbox: Receiver<Incoming>,
    events: VecDeque<TransportEvent>,
    wake: Arc<EventFd>,
    ctx: Arc<Ctx>,
    endpoint: quinn::Endpoint,
    runtime: Option<tokio::runtime::Runtime>,
    pollfds: Vec<libc::pollfd>,
    deadline: OpDeadline,
}

impl std::fmt::Debug for QuicTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicTransport")
            .field("me", &self.me)
            .finish()
    }
}

fn tls_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("TLS configuration: {e}"),
    )
}

impl QuicTransport {
    /// Binds this replica's UDP address and starts connecting to the others.
    pub fn start(cfg: QuicConfig, region: Region) -> io::Result<QuicTransport> {
        let n = cfg.layout.replicas();
        if cfg.peers.len() != n || cfg.tls.certs.len() != n || cfg.me.index() >= n {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "peer and certificate lists must match the cluster size",
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cfg.tls.ca.clone()).map_err(tls_err)?;
        let roots = Arc::new(roots);
        let chain = vec![cfg.tls.certs[cfg.me.index()].clone()];
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(tls_err)?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), cfg.tls.key.clone_key())
            .map_err(tls_err)?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_err)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, cfg.tls.key.clone_key())
            .map_err(tls_err)?;
        client.alpn_protocols = vec![ALPN.to_vec()];
        let server = quinn::crypto::rustls::QuicServerConfig::try_from(server).map_err(tls_err)?;
        let client = quinn::crypto::rustls::QuicClientConfig::try_from(client).map_err(tls_err)?;
        let mut transport_cfg = quinn::TransportConfig::default();
        transport_cfg.keep_alive_interval(Some(Duration::from_millis(500)));
        transport_cfg.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(Duration::from_secs(3)).map_err(tls_err)?,
        ));
        let transport_cfg = Arc::new(transport_cfg);
        let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(server));
        server_cfg.transport_config(transport_cfg.clone());
        let mut client_cfg = quinn::ClientConfig::new(Arc::new(client));
        client_cfg.transport_config(transport_cfg);

        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("apus-quic-{}", cfg.me))
            .enable_all()
            .build()?;
        let endpoint = {
            let _guard = runtime.enter();
            let mut ep = quinn::Endpoint::server(server_cfg, cfg.peers[cfg.me.index()])?;
            ep.set_default_client_config(client_cfg);
            ep
        };
        let (tx, rx) = mpsc::channel();
        let wake = Arc::new(EventFd::new()?);
        let mut layout = LayoutInfo::of(&cfg.layout).for_transport("quic");
        if let Some(id) = &cfg.identity {
            layout.cluster = id.cluster().to_string();
        }
        let ctx = Arc::new(Ctx {
            me: cfg.me,
            layout,
            identity: cfg.identity,
            certs: cfg.tls.certs,
            inbox: Mutex::new(tx),
            wake: wake.clone(),
            stop: AtomicBool::new(false),
            generation: AtomicU64::new(1),
            stats: Arc::new(TransportStats::default()),
        });
        runtime.spawn(accept_loop(endpoint.clone(), ctx.clone()));
        for peer in 0..cfg.me.0 {
            let addr = cfg.peers[usize::from(peer)];
            runtime.spawn(dial_loop(endpoint.clone(), NodeId(peer), addr, ctx.clone()));
        }
        Ok(QuicTransport {
            me: cfg.me,
            layout: cfg.layout,
            region,
            writer: None,
            links: (0..n).map(|_| None).collect(),
            inbox: rx,
            events: VecDeque::new(),
            wake,
            ctx,
            endpoint,
            runtime: Some(runtime),
            pollfds: Vec::with_capacity(1),
            deadline: OpDeadline::new(cfg.op_timeout),
        })
    }

    /// The transport's counters.
    pub fn stats(&self) -> Arc<TransportStats> {
        self.ctx.stats.clone()
    }

    /// Whether a connection to `peer` is established.
    pub fn connected(&self, peer: NodeId) -> bool {
        self.links.get(peer.index()).is_some_and(Option::is_some)
    }

    fn close(&mut self, peer: NodeId, why: &str) {
        if let Some(mut l) = self.links[peer.index()].take() {
            info!(me = %self.me, %peer, why, "connection closed");
            l.link.fail_pending(peer, &mut self.events);
            self.events.push_back(TransportEvent::PeerDown(peer));
            // Dropping the sender ends the writer task and the connection;
            // the dialer connects again.
        }
    }

    fn flush(&mut self, peer: NodeId) {
        if let Some(l) = self.links[peer.index()].as_mut() {
            let unsent = l.link.unsent();
            if unsent.is_empty() {
                return;
            }
            let bytes = unsent.to_vec();
            let n = bytes.len();
            if l.tx.send(bytes).is_err() {
                self.close(peer, "connection task gone");
            } else if let Some(l) = self.links[peer.index()].as_mut() {
                l.link.mark_sent(n);
            }
        }
    }
}

impl Transport for QuicTransport {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            compare_and_swap: true,
        }
    }

    fn post(&mut self, op: RemoteOp) -> Result<(), TransportError> {
        let peer = op.peer();
        if peer.index() >= self.links.len() || peer == self.me {
            return Err(TransportError::UnknownPeer(peer));
        }
        let Some(l) = self.links[peer.index()].as_mut() else {
            self.events.push_back(TransportEvent::Completed(Completion {
                op: op.id(),
                peer,
                result: Err(OpError::PeerUnreachable),
            }));
            return Ok(());
        };
        l.link.encode(&self.region, op)?;
        self.flush(peer);
        Ok(())
    }

    fn set_log_writer(&mut self, writer: Option<NodeId>) -> Result<(), TransportError> {
        // Incoming frames are applied only inside `poll`, on this thread.
        self.writer = writer;
        Ok(())
    }

    fn poll(&mut self, events: &mut Vec<TransportEvent>) -> Result<(), TransportError> {
        while let Ok(m) = self.inbox.try_recv() {
            match m {
                Incoming::Up {
                    peer,
                    generation,
                    tx,
                } => {
                    if self.links[peer.index()].is_some() {
                        self.close(peer, "replaced by a new connection");
                    }
                    info!(me = %self.me, %peer, "connection established (QUIC)");
                    self.links[peer.index()] = Some(QuicLink {
                        generation,
                        link: Link::new(),
                        tx,
                    });
                    self.events.push_back(TransportEvent::PeerUp(peer));
                }
                Incoming::Data {
                    peer,
                    generation,
                    bytes,
                } => {
                    let Some(l) = self.links[peer.index()].as_mut() else {
                        continue;
                    };
                    if l.generation != generation {
                        continue;
                    }
                    l.link.rbuf.extend(&bytes);
                    let local = Local {
                        layout: &self.layout,
                        region: &self.region,
                        writer: self.writer,
                    };
                    if let Err(why) = l.link.process(peer, local, &mut self.events) {
                        self.ctx.stats.violations.fetch_add(1, Ordering::Relaxed);
                        warn!(me = %self.me, %peer, %why, "protocol violation: closing");
                        self.close(peer, "protocol violation");
                        continue;
                    }
                    self.flush(peer);
                }
                Incoming::Down { peer, generation } => {
                    if self.links[peer.index()]
                        .as_ref()
                        .is_some_and(|l| l.generation == generation)
                    {
                        self.close(peer, "connection lost");
                    }
                }
            }
        }
        let now = Instant::now();
        if self.deadline.judges(now) {
            for p in 0..self.links.len() {
                if self.links[p]
                    .as_ref()
                    .is_some_and(|l| self.deadline.overdue(&l.link, now))
                {
                    self.ctx.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    self.close(NodeId(p as u8), "an operation did not complete in time");
                }
            }
        }
        events.extend(self.events.drain(..));
        Ok(())
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), TransportError> {
        let fds = [Interest {
            fd: self.wake.as_raw_fd(),
            writable: false,
        }];
        sys::wait(&fds, &mut self.pollfds, timeout)?;
        self.wake.drain();
        Ok(())
    }

    fn waker(&self) -> Arc<dyn Wake> {
        self.wake.clone()
    }
}

impl Drop for QuicTransport {
    fn drop(&mut self) {
        self.ctx.stop.store(true, Ordering::SeqCst);
        self.endpoint.close(0u32.into(), b"shutdown");
        self.links.clear();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

async fn write_msg(s: &mut quinn::SendStream, m: &impl Message) -> io::Result<()> {
    let body = m.encode_to_vec();
    let mut buf = (body.len() as u32).to_le_bytes().to_vec();
    buf.extend_from_slice(&body);
    s.write_all(&buf).await.map_err(io::Error::other)
}

async fn read_msg<M: Message + Default>(s: &mut quinn::RecvStream) -> io::Result<M> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.map_err(io::Error::other)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > handshake::MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "oversized set-up message",
        ));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.map_err(io::Error::other)?;
    M::decode(body.as_slice()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn peer_cert(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?
        .first()
        .cloned()
}

async fn accept_loop(endpoint: quinn::Endpoint, ctx: Arc<Ctx>) {
    while let Some(incoming) = endpoint.accept().await {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match accept_one(incoming, &ctx).await {
                Ok((peer, conn, send, recv)) => run_link(peer, conn, send, recv, ctx).await,
                Err(e) => {
                    ctx.stats.refused.fetch_add(1, Ordering::Relaxed);
                    warn!(me = %ctx.me, %remote, error = %e, "refused QUIC connection");
                }
            }
        });
    }
}

async fn accept_one(
    incoming: quinn::Incoming,
    ctx: &Ctx,
) -> io::Result<(
    NodeId,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
)> {
    // The TLS handshake has checked the client certificate against the CA.
    let conn = incoming.await.map_err(io::Error::other)?;
    let (mut send, mut recv) = tokio::time::timeout(handshake::TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no stream opened"))?
        .map_err(io::Error::other)?;
    let hello: Hello = tokio::time::timeout(handshake::TIMEOUT, read_msg(&mut recv))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no hello"))??;
    let refuse = |reason: String| Verdict {
        accepted: false,
        reason,
        transport: String::new(),
        intro: None,
    };
    let peer = NodeId(hello.node_id as u8);
    let verdict = if hello.protocol != handshake::PROTOCOL {
        refuse(format!("protocol {}", hello.protocol))
    } else if let Some(why) = handshake::other_cluster(hello.layout.as_ref(), &ctx.layout) {
        refuse(why)
    } else if hello.layout.as_ref() != Some(&ctx.layout) {
        refuse(format!(
            "region layout {:?} differs from ours {:?}",
            hello.layout, ctx.layout
        ))
    } else if hello.node_id as usize >= ctx.certs.len() || hello.node_id <= u32::from(ctx.me.0) {
        refuse(format!(
            "n{} is not a replica that dials n{}",
            hello.node_id, ctx.me.0
        ))
    } else if peer_cert(&conn).as_ref() != Some(&ctx.certs[hello.node_id as usize]) {
        refuse(format!("certificate is not n{}'s", hello.node_id))
    } else if let Err(e) = ctx.meet(peer, hello.intro.as_ref()) {
        refuse(format!("the acceptor cannot save its identity: {e}"))
    } else {
        Verdict {
            accepted: true,
            reason: String::new(),
            transport: String::new(),
            intro: ctx.introduce(peer),
        }
    };
    write_msg(&mut send, &verdict).await?;
    if !verdict.accepted {
        conn.close(1u32.into(), b"refused");
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            verdict.reason,
        ));
    }
    Ok((peer, conn, send, recv))
}

async fn dial_loop(endpoint: quinn::Endpoint, peer: NodeId, addr: SocketAddr, ctx: Arc<Ctx>) {
    let mut backoff = Duration::from_millis(5);
    while !ctx.stop.load(Ordering::SeqCst) {
        match dial_once(&endpoint, peer, addr, &ctx).await {
            Ok((conn, send, recv)) => {
                backoff = Duration::from_millis(5);
                run_link(peer, conn, send, recv, ctx.clone()).await;
            }
            Err(e) => {
                if e.kind() == io::ErrorKind::PermissionDenied {
                    ctx.stats.refused.fetch_add(1, Ordering::Relaxed);
                    warn!(me = %ctx.me, %peer, error = %e, "QUIC connection refused");
                } else {
                    debug!(me = %ctx.me, %peer, error = %e, "cannot connect yet");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(200));
            }
        }
    }
}

async fn dial_once(
    endpoint: &quinn::Endpoint,
    peer: NodeId,
    addr: SocketAddr,
    ctx: &Ctx,
) -> io::Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
    let connecting = endpoint
        .connect(addr, &server_name(peer))
        .map_err(io::Error::other)?;
    let conn = tokio::time::timeout(handshake::TIMEOUT, connecting)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "QUIC handshake"))?
        .map_err(|e| match e {
            quinn::ConnectionError::TransportError(_)
            | quinn::ConnectionError::ConnectionClosed(_) => {
                io::Error::new(io::ErrorKind::PermissionDenied, e.to_string())
            }
            e => io::Error::other(e),
        })?;
    if peer_cert(&conn).as_ref() != Some(&ctx.certs[peer.index()]) {
        conn.close(1u32.into(), b"wrong certificate");
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{addr} presented a certificate that is not {peer}'s"),
        ));
    }
    let (mut send, mut recv) = conn.open_bi().await.map_err(io::Error::other)?;
    write_msg(
        &mut send,
        &Hello {
            protocol: handshake::PROTOCOL,
            node_id: u32::from(ctx.me.0),
            nonce: Vec::new(),
            layout: Some(ctx.layout.clone()),
            intro: ctx.introduce(peer),
        },
    )
    .await?;
    let v: Verdict = tokio::time::timeout(handshake::TIMEOUT, read_msg(&mut recv))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no verdict"))??;
    if !v.accepted {
        return Err(io::Error::new(io::ErrorKind::PermissionDenied, v.reason));
    }
    // TLS authenticated the acceptor; what it says is acted on before the
    // link carries anything.
    ctx.meet(peer, v.intro.as_ref())?;
    Ok((conn, send, recv))
}

/// Moves bytes between the stream and the engine until either side stops.
async fn run_link(
    peer: NodeId,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    ctx: Arc<Ctx>,
) {
    let generation = ctx.generation.fetch_add(1, Ordering::SeqCst);
    let (tx, mut rx) = unbounded_channel::<Vec<u8>>();
    ctx.stats.established.fetch_add(1, Ordering::Relaxed);
    ctx.send(Incoming::Up {
        peer,
        generation,
        tx,
    });
    let writer = async {
        while let Some(bytes) = rx.recv().await {
            if send.write_all(&bytes).await.is_err() {
                break;
            }
        }
    };
    let reader = async {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(Some(n)) = recv.read(&mut buf).await {
            ctx.send(Incoming::Data {
                peer,
                generation,
                bytes: buf[..n].to_vec(),
            });
        }
    };
    tokio::select! {
        _ = writer => {}
        _ = reader => {}
        _ = conn.closed() => {}
    }
    conn.close(0u32.into(), b"closed");
    ctx.send(Incoming::Down { peer, generation });
}
