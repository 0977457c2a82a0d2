//! Connection set-up: mutual authentication with the cluster secret.
//!
//! The node with the higher id dials; the other accepts. Messages are
//! prost-encoded, each behind a little-endian `u32` length (at most
//! [`MAX_MESSAGE`] bytes).
//!
//! ```text
//! dialer   -> acceptor  Hello     { protocol, node_id, nonce_d, layout, intro_d }
//! acceptor -> dialer    Challenge { node_id, nonce_a, proof_a, intro_a }  or Verdict{refused}
//! dialer   -> acceptor  Proof     { proof_d, intro_d' }
//! acceptor -> dialer    Verdict   { accepted | reason }
//! ```
//!
//! `proof_a = HMAC-SHA256(secret, "apus acceptor" | transcript | intro_a)` and
//! `proof_d = HMAC-SHA256(secret, "apus dialer" | transcript | intro_d')`,
//! where the transcript binds both nonces, both ids, the layout (with the
//! cluster name) and the dialer's first introduction. Each side proves it
//! holds the secret without sending it; fresh random nonces stop replays; a
//! peer that fails is refused, logged, and never sees a region byte.
//!
//! The introductions ([`identity`](crate::identity)) are acted on only once
//! the other end is authenticated, and before the connection is handed to
//! the engine: a replica told it is a replacement knows it before it reads
//! anything the connection carries. The dialer's second introduction
//! (`intro_d'`) says what it learned from the acceptor's, so the acceptor
//! can stop telling it.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use hmac::{Hmac, Mac};
use prost::Message;
use sha2::Sha256;

use apus_core::{NodeId, RegionLayout};

use crate::identity::{Identity, Introduction};

/// Version of this handshake and of the frame format.
pub const PROTOCOL: u32 = 1;
/// Largest handshake message accepted.
pub const MAX_MESSAGE: usize = 4096;
/// How long either side waits for the other during set-up.
pub const TIMEOUT: Duration = Duration::from_secs(2);
const NONCE_LEN: usize = 32;

/// What both ends must agree on.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct LayoutInfo {
    /// `apus_core::layout::LAYOUT_VERSION`.
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// Cluster size.
    #[prost(uint32, tag = "2")]
    pub replicas: u32,
    /// Ring capacity.
    #[prost(uint64, tag = "3")]
    pub ring_capacity: u64,
    /// Catch-up chunk.
    #[prost(uint64, tag = "4")]
    pub catchup_chunk: u64,
    /// Region size.
    #[prost(uint64, tag = "5")]
    pub region_len: u64,
    /// The transport the connection will carry (`tcp`, `quic`,
    /// `fabric/<provider>`): replicas configured differently refuse each
    /// other with a reason instead of misreading each other's bytes.
    #[prost(string, tag = "6")]
    pub transport: String,
    /// The cluster's name (`cluster.name`): a replica of another cluster is
    /// refused with both names.
    #[prost(string, tag = "7")]
    pub cluster: String,
}

impl LayoutInfo {
    /// Describes `layout`.
    pub fn of(layout: &RegionLayout) -> LayoutInfo {
        LayoutInfo {
            version: u32::from(apus_core::layout::LAYOUT_VERSION),
            replicas: layout.replicas() as u32,
            ring_capacity: layout.ring_capacity() as u64,
            catchup_chunk: layout.catchup_chunk() as u64,
            region_len: layout.region_len() as u64,
            transport: String::new(),
            cluster: String::new(),
        }
    }

    /// The same, for connections that carry `transport`.
    pub fn for_transport(mut self, transport: &str) -> LayoutInfo {
        self.transport = transport.into();
        self
    }
}

/// Dialer's opening.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Hello {
    /// [`PROTOCOL`].
    #[prost(uint32, tag = "1")]
    pub protocol: u32,
    /// Who the dialer says it is.
    #[prost(uint32, tag = "2")]
    pub node_id: u32,
    /// Dialer's nonce.
    #[prost(bytes = "vec", tag = "3")]
    pub nonce: Vec<u8>,
    /// Dialer's region layout.
    #[prost(message, optional, tag = "4")]
    pub layout: Option<LayoutInfo>,
    /// The dialer's introduction (absent: it keeps no identity).
    #[prost(message, optional, tag = "5")]
    pub intro: Option<Introduction>,
}

/// Acceptor's answer: its proof, and a nonce for the dialer to prove on.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Challenge {
    /// The acceptor's id.
    #[prost(uint32, tag = "1")]
    pub node_id: u32,
    /// Acceptor's nonce.
    #[prost(bytes = "vec", tag = "2")]
    pub nonce: Vec<u8>,
    /// `HMAC(secret, "apus acceptor" | transcript | intro)`.
    #[prost(bytes = "vec", tag = "3")]
    pub proof: Vec<u8>,
    /// The acceptor's introduction.
    #[prost(message, optional, tag = "4")]
    pub intro: Option<Introduction>,
}

/// What the acceptor sends after a Hello.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HelloReply {
    /// A challenge, or a refusal.
    #[prost(oneof = "Reply", tags = "1, 2")]
    pub reply: Option<Reply>,
}

/// The two answers to a Hello.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Reply {
    /// Go on: prove you hold the secret.
    #[prost(message, tag = "1")]
    Challenge(Challenge),
    /// Refused before authentication (wrong layout, id or protocol).
    #[prost(message, tag = "2")]
    Refused(Verdict),
}

/// Dialer's proof.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Proof {
    /// `HMAC(secret, "apus dialer" | transcript | intro)`.
    #[prost(bytes = "vec", tag = "1")]
    pub proof: Vec<u8>,
    /// The dialer's introduction again, with what it learned from the
    /// acceptor's.
    #[prost(message, optional, tag = "2")]
    pub intro: Option<Introduction>,
}

/// The acceptor's decision (also sent instead of a Challenge to refuse early).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Verdict {
    /// Whether the connection is established.
    #[prost(bool, tag = "1")]
    pub accepted: bool,
    /// Why not.
    #[prost(string, tag = "2")]
    pub reason: String,
    /// A refusal for running another transport (all else equal): the
    /// acceptor's, so a replica with `transport = "auto"` learns what the
    /// cluster settled on (and confirms it with an authenticated handshake).
    #[prost(string, tag = "3")]
    pub transport: String,
    /// The acceptor's introduction, where no challenge carries it (QUIC,
    /// whose TLS handshake authenticated both ends).
    #[prost(message, optional, tag = "4")]
    pub intro: Option<Introduction>,
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The socket failed or timed out.
    #[error("handshake I/O: {0}")]
    Io(#[from] io::Error),
    /// The peer sent something that is not a well-formed handshake message.
    #[error("malformed handshake message: {0}")]
    Malformed(String),
    /// The peer does not hold the cluster secret.
    #[error("peer failed authentication (wrong cluster secret?)")]
    Authentication,
    /// The peer is not a replica of this cluster as configured.
    #[error("refused: {0}")]
    Refused(String),
    /// The peer runs another transport; everything else matched.
    #[error("refused: the peer runs transport {theirs:?}")]
    OtherTransport {
        /// The acceptor's transport.
        theirs: String,
    },
}

/// Writes one length-prefixed prost message (also used after the handshake
/// by transports that exchange set-up data over the stream).
pub fn write_msg(s: &mut TcpStream, m: &impl Message) -> io::Result<()> {
    let body = m.encode_to_vec();
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&body);
    s.write_all(&buf)
}

/// Reads one length-prefixed prost message of at most [`MAX_MESSAGE`] bytes.
pub fn read_msg<M: Message + Default>(s: &mut TcpStream) -> Result<M, HandshakeError> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(HandshakeError::Malformed(format!("{len}-byte message")));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    M::decode(body.as_slice()).map_err(|e| HandshakeError::Malformed(e.to_string()))
}

fn nonce() -> Result<Vec<u8>, HandshakeError> {
    let mut n = vec![0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(|e| HandshakeError::Io(io::Error::other(e.to_string())))?;
    Ok(n)
}

/// What a proof binds: the transcript so far and the prover's introduction.
struct Transcript<'a> {
    dialer: &'a Hello,
    acceptor: u32,
    nonce_a: &'a [u8],
    intro: Option<&'a Introduction>,
}

impl Transcript<'_> {
    fn mac(&self, secret: &[u8], label: &str) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key");
        mac.update(label.as_bytes());
        mac.update(&self.dialer.encode_to_vec());
        mac.update(&self.acceptor.to_le_bytes());
        mac.update(self.nonce_a);
        mac.update(&self.intro.map_or(Vec::new(), Message::encode_to_vec));
        mac
    }

    fn proof(&self, secret: &[u8], label: &str) -> Vec<u8> {
        self.mac(secret, label).finalize().into_bytes().to_vec()
    }

    fn verify(&self, secret: &[u8], label: &str, got: &[u8]) -> bool {
        self.mac(secret, label).verify_slice(got).is_ok()
    }
}

/// Acts on an authenticated peer's introduction (a refusal when what it
/// changes cannot be saved: the connection must not be used without it).
fn meet(
    identity: Option<&dyn Identity>,
    peer: NodeId,
    intro: Option<&Introduction>,
) -> Result<(), HandshakeError> {
    match (identity, intro) {
        (Some(id), Some(intro)) => id.met(peer, intro).map_err(HandshakeError::Io),
        _ => Ok(()),
    }
}

/// The cluster-name check, with a reason that names both clusters.
pub fn other_cluster(theirs: Option<&LayoutInfo>, ours: &LayoutInfo) -> Option<String> {
    let theirs = theirs?;
    (theirs.cluster != ours.cluster).then(|| {
        format!(
            "the peer is a replica of cluster {:?}, this one of {:?} (cluster.name)",
            theirs.cluster, ours.cluster
        )
    })
}

/// The dialer's side: returns once the acceptor `expect` accepted us.
/// With an `identity`, both ends introduce themselves and what the
/// acceptor's introduction changes is saved before this returns.
pub fn dial(
    s: &mut TcpStream,
    secret: &[u8],
    me: NodeId,
    expect: NodeId,
    layout: &LayoutInfo,
    identity: Option<&dyn Identity>,
) -> Result<(), HandshakeError> {
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    let hello = Hello {
        protocol: PROTOCOL,
        node_id: u32::from(me.0),
        nonce: nonce()?,
        layout: Some(layout.clone()),
        intro: identity.map(|id| id.introduce(expect)),
    };
    write_msg(s, &hello)?;
    let reply: HelloReply = read_msg(s)?;
    let ch = match reply.reply {
        Some(Reply::Challenge(ch)) => ch,
        Some(Reply::Refused(v)) if !v.transport.is_empty() => {
            return Err(HandshakeError::OtherTransport {
                theirs: v.transport,
            });
        }
        Some(Reply::Refused(v)) => return Err(HandshakeError::Refused(v.reason)),
        None => return Err(HandshakeError::Malformed("empty reply".into())),
    };
    if ch.node_id != u32::from(expect.0) {
        return Err(HandshakeError::Refused(format!(
            "dialled n{} but n{} answered",
            expect.0, ch.node_id
        )));
    }
    let theirs = Transcript {
        dialer: &hello,
        acceptor: ch.node_id,
        nonce_a: &ch.nonce,
        intro: ch.intro.as_ref(),
    };
    if ch.nonce.len() != NONCE_LEN || !theirs.verify(secret, "apus acceptor", &ch.proof) {
        return Err(HandshakeError::Authentication);
    }
    meet(identity, expect, ch.intro.as_ref())?;
    let intro = identity.map(|id| id.introduce(expect));
    let ours = Transcript {
        intro: intro.as_ref(),
        ..theirs
    };
    let proof = ours.proof(secret, "apus dialer");
    write_msg(s, &Proof { proof, intro })?;
    let v: Verdict = read_msg(s)?;
    if !v.accepted {
        return Err(HandshakeError::Refused(v.reason));
    }
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    Ok(())
}

/// The acceptor's side: returns the authenticated dialer's id. `me` accepts
/// only replicas with a higher id, the same cluster and the same layout.
pub fn accept(
    s: &mut TcpStream,
    secret: &[u8],
    me: NodeId,
    layout: &LayoutInfo,
    identity: Option<&dyn Identity>,
) -> Result<NodeId, HandshakeError> {
    accept_with(s, secret, me, layout, identity, false).map(|(peer, _)| peer)
}

/// [`accept`] for a replica still choosing its transport: the dialer may
/// run any transport (everything else must match); returns its id and the
/// transport it runs, which the handshake authenticated.
pub fn accept_any_transport(
    s: &mut TcpStream,
    secret: &[u8],
    me: NodeId,
    layout: &LayoutInfo,
    identity: Option<&dyn Identity>,
) -> Result<(NodeId, String), HandshakeError> {
    accept_with(s, secret, me, layout, identity, true)
}

/// Why a hello is refused before authentication, if it is: with the
/// acceptor's transport when only the transport differs.
fn refusal(
    hello: &Hello,
    me: NodeId,
    layout: &LayoutInfo,
    any_transport: bool,
) -> Option<(String, String)> {
    if hello.protocol != PROTOCOL {
        let why = format!("protocol {} (this node speaks {PROTOCOL})", hello.protocol);
        return Some((why, String::new()));
    }
    if hello.nonce.len() != NONCE_LEN {
        return Some(("malformed nonce".into(), String::new()));
    }
    if let Some(why) = other_cluster(hello.layout.as_ref(), layout) {
        return Some((why, String::new()));
    }
    let theirs = hello.layout.as_ref().map_or("", |l| l.transport.as_str());
    let same_but_transport = hello
        .layout
        .clone()
        .is_some_and(|l| &l.for_transport(&layout.transport) == layout);
    if !same_but_transport || (!any_transport && theirs != layout.transport) {
        let why = format!(
            "region layout or transport {:?} differs from ours {layout:?}",
            hello.layout
        );
        let ours = if same_but_transport {
            layout.transport.clone()
        } else {
            String::new()
        };
        return Some((why, ours));
    }
    let peer = hello.node_id;
    if peer >= layout.replicas || peer <= u32::from(me.0) {
        let why = format!("n{peer} is not a replica that dials n{}", me.0);
        return Some((why, String::new()));
    }
    None
}

fn accept_with(
    s: &mut TcpStream,
    secret: &[u8],
    me: NodeId,
    layout: &LayoutInfo,
    identity: Option<&dyn Identity>,
    any_transport: bool,
) -> Result<(NodeId, String), HandshakeError> {
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    let hello: Hello = read_msg(s)?;
    if let Some((reason, transport)) = refusal(&hello, me, layout, any_transport) {
        let refusal = Verdict {
            accepted: false,
            reason: reason.clone(),
            transport,
            intro: None,
        };
        let _ = write_msg(
            s,
            &HelloReply {
                reply: Some(Reply::Refused(refusal)),
            },
        );
        return Err(HandshakeError::Refused(reason));
    }
    let peer = NodeId(hello.node_id as u8);
    let theirs = hello
        .layout
        .as_ref()
        .map_or(String::new(), |l| l.transport.clone());
    let nonce_a = nonce()?;
    let intro = identity.map(|id| id.introduce(peer));
    let ours = Transcript {
        dialer: &hello,
        acceptor: u32::from(me.0),
        nonce_a: &nonce_a,
        intro: intro.as_ref(),
    };
    let challenge = Challenge {
        node_id: u32::from(me.0),
        proof: ours.proof(secret, "apus acceptor"),
        nonce: nonce_a.clone(),
        intro: intro.clone(),
    };
    write_msg(
        s,
        &HelloReply {
            reply: Some(Reply::Challenge(challenge)),
        },
    )?;
    let p: Proof = read_msg(s)?;
    let dialers = Transcript {
        intro: p.intro.as_ref(),
        ..ours
    };
    let verdict = |accepted: bool, reason: &str| Verdict {
        accepted,
        reason: reason.into(),
        transport: String::new(),
        intro: None,
    };
    if !dialers.verify(secret, "apus dialer", &p.proof) {
        let _ = write_msg(s, &verdict(false, "authentication failed"));
        return Err(HandshakeError::Authentication);
    }
    if let Err(e) = meet(identity, peer, p.intro.as_ref()) {
        let _ = write_msg(s, &verdict(false, "the acceptor cannot save its identity"));
        return Err(e);
    }
    write_msg(s, &verdict(true, ""))?;
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    Ok((peer, theirs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::PeerBook;
    use std::net::TcpListener;
    use std::thread;

    fn layout() -> LayoutInfo {
        LayoutInfo::of(&RegionLayout::new(3, 4096, 1024).unwrap())
    }

    fn pair(
        acceptor_secret: &'static [u8],
        dialer_secret: &'static [u8],
        dialer_id: u8,
        dialer_layout: LayoutInfo,
    ) -> (Result<NodeId, HandshakeError>, Result<(), HandshakeError>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let a = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            accept(&mut s, acceptor_secret, NodeId(0), &layout(), None)
        });
        let mut s = TcpStream::connect(addr).unwrap();
        let d = dial(
            &mut s,
            dialer_secret,
            NodeId(dialer_id),
            NodeId(0),
            &dialer_layout,
            None,
        );
        (a.join().unwrap(), d)
    }

    #[test]
    fn same_secret_connects() {
        let (a, d) = pair(b"0123456789abcdef", b"0123456789abcdef", 2, layout());
        assert_eq!(a.unwrap(), NodeId(2));
        d.unwrap();
    }

    #[test]
    fn wrong_secret_is_refused_on_both_sides() {
        let (a, d) = pair(b"0123456789abcdef", b"not-the-secret!!", 2, layout());
        // The dialer cannot verify the acceptor's proof and gives up first.
        assert!(matches!(d, Err(HandshakeError::Authentication)), "{d:?}");
        assert!(a.is_err());
    }

    #[test]
    fn layout_mismatch_and_bad_ids_are_refused_with_a_reason() {
        let other = LayoutInfo::of(&RegionLayout::new(3, 8192, 1024).unwrap());
        let (a, d) = pair(b"0123456789abcdef", b"0123456789abcdef", 2, other);
        assert!(matches!(a, Err(HandshakeError::Refused(_))));
        assert!(
            matches!(d, Err(HandshakeError::Refused(ref r)) if r.contains("layout")),
            "{d:?}"
        );
        let (a, _) = pair(b"0123456789abcdef", b"0123456789abcdef", 7, layout());
        assert!(matches!(a, Err(HandshakeError::Refused(ref r)) if r.contains("n7")));
    }

    #[test]
    fn a_dialer_learns_the_transport_an_acceptor_runs() {
        let verbs = layout().for_transport("verbs");
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let a = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            accept(&mut s, b"0123456789abcdef", NodeId(0), &verbs, None)
        });
        let mut s = TcpStream::connect(addr).unwrap();
        let auto = layout().for_transport("auto");
        let d = dial(
            &mut s,
            b"0123456789abcdef",
            NodeId(1),
            NodeId(0),
            &auto,
            None,
        );
        assert!(
            matches!(d, Err(HandshakeError::OtherTransport { ref theirs }) if theirs == "verbs"),
            "{d:?}"
        );
        assert!(a.join().unwrap().is_err());
        // A different layout is no transport hint.
        let other = LayoutInfo::of(&RegionLayout::new(3, 8192, 1024).unwrap()).for_transport("x");
        let (_, d) = pair(b"0123456789abcdef", b"0123456789abcdef", 2, other);
        assert!(matches!(d, Err(HandshakeError::Refused(_))), "{d:?}");
    }

    #[test]
    fn an_undecided_acceptor_authenticates_any_transport() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let a = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let auto = layout().for_transport("auto");
            accept_any_transport(&mut s, b"0123456789abcdef", NodeId(0), &auto, None)
        });
        let mut s = TcpStream::connect(addr).unwrap();
        let tcp = layout().for_transport("tcp");
        dial(
            &mut s,
            b"0123456789abcdef",
            NodeId(2),
            NodeId(0),
            &tcp,
            None,
        )
        .unwrap();
        assert_eq!(a.join().unwrap().unwrap(), (NodeId(2), "tcp".to_string()));
        // Still authenticated: a wrong secret fails.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let a = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let auto = layout().for_transport("auto");
            accept_any_transport(&mut s, b"0123456789abcdef", NodeId(0), &auto, None)
        });
        let mut s = TcpStream::connect(addr).unwrap();
        let tcp = layout().for_transport("tcp");
        assert!(
            dial(
                &mut s,
                b"not-the-secret!!",
                NodeId(2),
                NodeId(0),
                &tcp,
                None
            )
            .is_err()
        );
        assert!(a.join().unwrap().is_err());
    }

    #[test]
    fn garbage_is_refused() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let a = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            accept(&mut s, b"0123456789abcdef", NodeId(0), &layout(), None)
        });
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&[0xff; 64]).unwrap();
        assert!(a.join().unwrap().is_err());
    }

    /// An identity kept in memory.
    #[derive(Debug)]
    struct Book(&'static str, std::sync::Mutex<PeerBook>);

    impl Identity for Book {
        fn cluster(&self) -> &str {
            self.0
        }
        fn introduce(&self, peer: NodeId) -> Introduction {
            crate::identity::introduction(&self.1.lock().unwrap(), peer)
        }
        fn met(&self, peer: NodeId, theirs: &Introduction) -> io::Result<()> {
            crate::identity::meet(&mut self.1.lock().unwrap(), peer, theirs);
            Ok(())
        }
    }

    fn book(incarnation: u64) -> std::sync::Arc<Book> {
        std::sync::Arc::new(Book(
            "test",
            std::sync::Mutex::new(PeerBook::new(incarnation)),
        ))
    }

    /// One handshake between acceptor n0 and dialer n1 with identities.
    fn introduce(n0: &std::sync::Arc<Book>, n1: &std::sync::Arc<Book>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let acceptor = n0.clone();
        let a = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            accept(
                &mut s,
                b"0123456789abcdef",
                NodeId(0),
                &layout(),
                Some(&*acceptor),
            )
        });
        let mut s = TcpStream::connect(addr).unwrap();
        dial(
            &mut s,
            b"0123456789abcdef",
            NodeId(1),
            NodeId(0),
            &layout(),
            Some(&**n1),
        )
        .unwrap();
        assert_eq!(a.join().unwrap().unwrap(), NodeId(1));
    }

    #[test]
    fn a_wiped_replica_learns_in_the_handshake_that_it_is_a_replacement() {
        let (n0, n1) = (book(10), book(20));
        introduce(&n0, &n1);
        assert_eq!(n0.1.lock().unwrap().peers[1], 20);
        assert_eq!(n1.1.lock().unwrap().peers[0], 10);
        // The dialer's data directory is wiped.
        let n1_new = book(21);
        introduce(&n0, &n1_new);
        let b = n1_new.1.lock().unwrap().clone();
        assert!(b.rejoining && b.superseded == [20], "{b:?}");
        assert_eq!(
            n0.1.lock().unwrap().peers[1],
            21,
            "told within one handshake"
        );
        // The acceptor's data directory is wiped.
        let n0_new = book(11);
        introduce(&n0_new, &n1_new);
        let b = n0_new.1.lock().unwrap().clone();
        assert!(b.rejoining && b.superseded == [10], "{b:?}");
        // Its challenge went out before it knew; the dialer learns next time.
        assert_eq!(n1_new.1.lock().unwrap().peers[0], 10);
        introduce(&n0_new, &n1_new);
        assert_eq!(n1_new.1.lock().unwrap().peers[0], 11);
    }

    #[test]
    fn a_replica_of_another_cluster_is_refused_with_both_names() {
        let mut theirs = layout();
        theirs.cluster = "billing".into();
        let (a, d) = pair(b"0123456789abcdef", b"0123456789abcdef", 2, theirs);
        for r in [a.map(|_| ()), d] {
            assert!(
                matches!(r, Err(HandshakeError::Refused(ref why)) if why.contains("\"billing\"") && why.contains("cluster")),
                "{r:?}"
            );
        }
    }
}
