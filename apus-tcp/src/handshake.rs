//! Connection set-up: mutual authentication with the cluster secret.
//!
//! The node with the higher id dials; the other accepts. Messages are
//! prost-encoded, each behind a little-endian `u32` length (at most
//! [`MAX_MESSAGE`] bytes).
//!
//! ```text
//! dialer   -> acceptor  Hello     { protocol, node_id, nonce_d, layout }
//! acceptor -> dialer    Challenge { node_id, nonce_a, proof_a }      or Verdict{refused}
//! dialer   -> acceptor  Proof     { proof_d }
//! acceptor -> dialer    Verdict   { accepted | reason }
//! ```
//!
//! `proof_a = HMAC-SHA256(secret, "apus acceptor" | transcript)` and
//! `proof_d = HMAC-SHA256(secret, "apus dialer" | transcript)`, where the
//! transcript binds both nonces, both ids and the layout. Each side proves it
//! holds the secret without sending it; fresh random nonces stop replays; a
//! peer that fails is refused, logged, and never sees a region byte.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use hmac::{Hmac, Mac};
use prost::Message;
use sha2::Sha256;

use apus_core::{NodeId, RegionLayout};

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
    /// `HMAC(secret, "apus acceptor" | transcript)`.
    #[prost(bytes = "vec", tag = "3")]
    pub proof: Vec<u8>,
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
    /// `HMAC(secret, "apus dialer" | transcript)`.
    #[prost(bytes = "vec", tag = "1")]
    pub proof: Vec<u8>,
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

fn proof(secret: &[u8], label: &str, dialer: &Hello, acceptor: u32, nonce_a: &[u8]) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(label.as_bytes());
    mac.update(&dialer.encode_to_vec());
    mac.update(&acceptor.to_le_bytes());
    mac.update(nonce_a);
    mac.finalize().into_bytes().to_vec()
}

fn verify(
    secret: &[u8],
    label: &str,
    dialer: &Hello,
    acceptor: u32,
    nonce_a: &[u8],
    got: &[u8],
) -> bool {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(label.as_bytes());
    mac.update(&dialer.encode_to_vec());
    mac.update(&acceptor.to_le_bytes());
    mac.update(nonce_a);
    mac.verify_slice(got).is_ok()
}

/// The dialer's side: returns once the acceptor `expect` accepted us.
pub fn dial(
    s: &mut TcpStream,
    secret: &[u8],
    me: NodeId,
    expect: NodeId,
    layout: &LayoutInfo,
) -> Result<(), HandshakeError> {
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    let hello = Hello {
        protocol: PROTOCOL,
        node_id: u32::from(me.0),
        nonce: nonce()?,
        layout: Some(layout.clone()),
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
    if ch.nonce.len() != NONCE_LEN
        || !verify(
            secret,
            "apus acceptor",
            &hello,
            ch.node_id,
            &ch.nonce,
            &ch.proof,
        )
    {
        return Err(HandshakeError::Authentication);
    }
    write_msg(
        s,
        &Proof {
            proof: proof(secret, "apus dialer", &hello, ch.node_id, &ch.nonce),
        },
    )?;
    let v: Verdict = read_msg(s)?;
    if !v.accepted {
        return Err(HandshakeError::Refused(v.reason));
    }
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    Ok(())
}

/// The acceptor's side: returns the authenticated dialer's id. `me` accepts
/// only replicas with a higher id and the same layout.
pub fn accept(
    s: &mut TcpStream,
    secret: &[u8],
    me: NodeId,
    layout: &LayoutInfo,
) -> Result<NodeId, HandshakeError> {
    accept_with(s, secret, me, layout, false).map(|(peer, _)| peer)
}

/// [`accept`] for a replica still choosing its transport: the dialer may
/// run any transport (everything else must match); returns its id and the
/// transport it runs, which the handshake authenticated.
pub fn accept_any_transport(
    s: &mut TcpStream,
    secret: &[u8],
    me: NodeId,
    layout: &LayoutInfo,
) -> Result<(NodeId, String), HandshakeError> {
    accept_with(s, secret, me, layout, true)
}

fn accept_with(
    s: &mut TcpStream,
    secret: &[u8],
    me: NodeId,
    layout: &LayoutInfo,
    any_transport: bool,
) -> Result<(NodeId, String), HandshakeError> {
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    let hello: Hello = read_msg(s)?;
    let refuse = |s: &mut TcpStream, reason: String, transport: String| -> HandshakeError {
        let refusal = Verdict {
            accepted: false,
            reason: reason.clone(),
            transport,
        };
        let _ = write_msg(
            s,
            &HelloReply {
                reply: Some(Reply::Refused(refusal)),
            },
        );
        HandshakeError::Refused(reason)
    };
    if hello.protocol != PROTOCOL {
        return Err(refuse(
            s,
            format!("protocol {} (this node speaks {PROTOCOL})", hello.protocol),
            String::new(),
        ));
    }
    if hello.nonce.len() != NONCE_LEN {
        return Err(refuse(s, "malformed nonce".into(), String::new()));
    }
    let theirs = hello
        .layout
        .as_ref()
        .map_or(String::new(), |l| l.transport.clone());
    let same_but_transport = hello
        .layout
        .clone()
        .is_some_and(|l| &l.for_transport(&layout.transport) == layout);
    if !same_but_transport || (!any_transport && theirs != layout.transport) {
        return Err(refuse(
            s,
            format!(
                "region layout or transport {:?} differs from ours {layout:?}",
                hello.layout
            ),
            if same_but_transport {
                layout.transport.clone()
            } else {
                String::new()
            },
        ));
    }
    let peer = hello.node_id;
    if peer >= layout.replicas || peer <= u32::from(me.0) {
        return Err(refuse(
            s,
            format!("n{peer} is not a replica that dials n{}", me.0),
            String::new(),
        ));
    }
    let nonce_a = nonce()?;
    let challenge = Challenge {
        node_id: u32::from(me.0),
        proof: proof(secret, "apus acceptor", &hello, u32::from(me.0), &nonce_a),
        nonce: nonce_a.clone(),
    };
    write_msg(
        s,
        &HelloReply {
            reply: Some(Reply::Challenge(challenge)),
        },
    )?;
    let p: Proof = read_msg(s)?;
    if !verify(
        secret,
        "apus dialer",
        &hello,
        u32::from(me.0),
        &nonce_a,
        &p.proof,
    ) {
        let _ = write_msg(
            s,
            &Verdict {
                accepted: false,
                reason: "authentication failed".into(),
                transport: String::new(),
            },
        );
        return Err(HandshakeError::Authentication);
    }
    write_msg(
        s,
        &Verdict {
            accepted: true,
            reason: String::new(),
            transport: String::new(),
        },
    )?;
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    Ok((NodeId(peer as u8), theirs))
}

#[cfg(test)]
mod tests {
    use super::*;
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
            accept(&mut s, acceptor_secret, NodeId(0), &layout())
        });
        let mut s = TcpStream::connect(addr).unwrap();
        let d = dial(
            &mut s,
            dialer_secret,
            NodeId(dialer_id),
            NodeId(0),
            &dialer_layout,
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
            accept(&mut s, b"0123456789abcdef", NodeId(0), &verbs)
        });
        let mut s = TcpStream::connect(addr).unwrap();
        let auto = layout().for_transport("auto");
        let d = dial(&mut s, b"0123456789abcdef", NodeId(1), NodeId(0), &auto);
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
            accept_any_transport(&mut s, b"0123456789abcdef", NodeId(0), &auto)
        });
        let mut s = TcpStream::connect(addr).unwrap();
        let tcp = layout().for_transport("tcp");
        dial(&mut s, b"0123456789abcdef", NodeId(2), NodeId(0), &tcp).unwrap();
        assert_eq!(a.join().unwrap().unwrap(), (NodeId(2), "tcp".to_string()));
        // Still authenticated: a wrong secret fails.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let a = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let auto = layout().for_transport("auto");
            accept_any_transport(&mut s, b"0123456789abcdef", NodeId(0), &auto)
        });
        let mut s = TcpStream::connect(addr).unwrap();
        let tcp = layout().for_transport("tcp");
        assert!(dial(&mut s, b"not-the-secret!!", NodeId(2), NodeId(0), &tcp).is_err());
        assert!(a.join().unwrap().is_err());
    }

    #[test]
    fn garbage_is_refused() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let a = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            accept(&mut s, b"0123456789abcdef", NodeId(0), &layout())
        });
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(&[0xff; 64]).unwrap();
        assert!(a.join().unwrap().is_err());
    }
}
