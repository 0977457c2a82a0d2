//! What `apus node` runs: a replica with a built-in state machine (an
//! ordered register of what was applied) serving the [`client`](crate::client)
//! protocol. The cluster tests and `apus status` talk to it.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use apus_core::EntryKind;
use tracing::{debug, warn};

use crate::client::{RemoteStatus, Reply, Request, read_frame};
use crate::node::{Entry, Node, ProposeError, StateMachine};

/// Client connections served at once; more are refused.
pub const MAX_CLIENTS: usize = 256;

/// What the register has applied.
#[derive(Debug, Default)]
pub struct RegisterState {
    /// Data entries applied.
    pub entries: u64,
    /// FNV-1a over the applied payloads, in order: equal digests mean equal
    /// applied sequences.
    pub digest: u64,
    /// The first 8 bytes of each applied payload (the load generators put a
    /// unique id there).
    pub ids: Vec<u64>,
}

/// The built-in state machine: records what it applies.
#[derive(Clone, Debug, Default)]
pub struct Register(pub Arc<Mutex<RegisterState>>);

impl StateMachine for Register {
    fn apply(&mut self, e: &Entry<'_>) -> Vec<u8> {
        if e.kind != EntryKind::Data {
            return Vec::new();
        }
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        s.entries += 1;
        let mut h = if s.digest == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            s.digest
        };
        for b in e.payload {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        s.digest = h;
        if let Some(id) = e.payload.get(..8) {
            s.ids
                .push(u64::from_le_bytes(id.try_into().expect("8 bytes")));
        }
        s.entries.to_le_bytes().to_vec()
    }
}

/// Serves the client protocol on `addr` until `stop` is set.
pub fn serve_clients(
    node: Arc<Node>,
    register: Register,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
) -> io::Result<thread::JoinHandle<()>> {
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let active = Arc::new(AtomicUsize::new(0));
    thread::Builder::new()
        .name("apus-clients".into())
        .spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        if active.load(Ordering::SeqCst) >= MAX_CLIENTS {
                            warn!(%peer, "too many clients: refusing");
                            continue;
                        }
                        active.fetch_add(1, Ordering::SeqCst);
                        let (node, register, active) =
                            (node.clone(), register.clone(), active.clone());
                        let spawned =
                            thread::Builder::new()
                                .name("apus-client".into())
                                .spawn(move || {
                                    if let Err(e) = serve_one(stream, &node, &register) {
                                        debug!(%peer, error = %e, "client connection ended");
                                    }
                                    active.fetch_sub(1, Ordering::SeqCst);
                                });
                        if spawned.is_err() {
                            warn!("cannot spawn a client thread");
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => warn!(error = %e, "accept failed"),
                }
            }
        })
}

/// Answers [`Request::AcceptDataLoss`] on any replica's client port.
pub fn accept_data_loss(node: &Node, stand: bool) -> Reply {
    match node.accept_data_loss(stand, Duration::from_secs(5)) {
        Ok(was) => Reply::Accepted(was),
        Err(e) => Reply::Failed(e.to_string()),
    }
}

fn serve_one(mut s: TcpStream, node: &Node, register: &Register) -> io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    while let Some((kind, body)) = read_frame(&mut s)? {
        let req = match Request::decode(kind, body) {
            Ok(r) => r,
            Err(e) => {
                // Answer so the client knows why, then hang up.
                s.write_all(&Reply::Failed(format!("malformed request: {e}")).encode())?;
                return Ok(());
            }
        };
        let reply = match req {
            Request::Propose(payload) => match node.propose(&payload) {
                Ok(a) => Reply::Applied {
                    index: a.index,
                    output: a.output,
                },
                Err(ProposeError::NotLeader { leader }) => Reply::NotLeader(leader),
                Err(e) => Reply::Failed(e.to_string()),
            },
            Request::Status => {
                let st = node.status();
                let r = register.0.lock().unwrap_or_else(|p| p.into_inner());
                Reply::Status(RemoteStatus {
                    role: st.role,
                    term: st.term,
                    leader: st.leader,
                    commit: st.commit,
                    last_index: st.last_index,
                    applied: st.applied,
                    recovering: st.recovering,
                    entries: r.entries,
                    digest: r.digest,
                    outputs_differed: 0,
                    fenced_writes: st.fencing.fenced_writes,
                    revocations: st.fencing.revocations,
                    transport: st.transport,
                    last_check: 0,
                    voters_lost: st.voters_lost,
                })
            }
            Request::AcceptDataLoss { stand } => accept_data_loss(node, stand),
            Request::Dump => {
                let r = register.0.lock().unwrap_or_else(|p| p.into_inner());
                Reply::Ids(r.ids.clone())
            }
            Request::Check | Request::LastCheck => Reply::Failed(
                "`apus check` reads a replicated server's state (`apus run`); `apus node` \
                 reports its register's digest in STATUS"
                    .into(),
            ),
        };
        s.write_all(&reply.encode())?;
    }
    Ok(())
}
