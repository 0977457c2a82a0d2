//! What the load generator drives: one [`Conn`] per kind of server.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use apus::client::{Client, Reply, Request};

use crate::appclient::{AppConn, Protocol};
use crate::load::Conn;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// A reply slower than this is a failure (covers a leader election).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Proposals to an `apus node` cluster through its client protocol; a
/// redirect (`NotLeader`) moves the connection to the leader and retries
/// within the same request.
#[derive(Debug)]
pub struct ApusConn {
    /// Client address of every replica, by id.
    clients: Vec<SocketAddr>,
    at: usize,
    client: Client,
    payload: Vec<u8>,
}

impl ApusConn {
    /// Connects to the first replica of `clients` that answers.
    pub fn connect(clients: &[SocketAddr], first: usize) -> Result<ApusConn> {
        let n = clients.len();
        for k in 0..n {
            let at = (first + k) % n;
            if let Ok(client) = Client::connect(clients[at], REPLY_TIMEOUT) {
                return Ok(ApusConn {
                    clients: clients.to_vec(),
                    at,
                    client,
                    payload: Vec::new(),
                });
            }
        }
        bail!("no replica accepts client connections ({clients:?})")
    }
}

impl Conn for ApusConn {
    fn request(&mut self, seq: u64, value: &[u8]) -> Result<()> {
        // Unique payloads: the sequence number, then the value.
        self.payload.clear();
        self.payload.extend_from_slice(&seq.to_le_bytes());
        self.payload
            .extend_from_slice(&value[..value.len().saturating_sub(8)]);
        for _ in 0..self.clients.len() + 1 {
            match self.client.call(&Request::Propose(self.payload.clone()))? {
                Reply::Applied { .. } => return Ok(()),
                Reply::NotLeader(Some(l)) if l.index() < self.clients.len() => {
                    self.at = l.index();
                    self.client = Client::connect(self.clients[self.at], REPLY_TIMEOUT)?;
                }
                Reply::NotLeader(_) => bail!("no leader known to replica {}", self.at),
                other => bail!("proposal answered with {other:?}"),
            }
        }
        bail!("redirected in a circle")
    }
}

/// `SET key value` to Redis, or `set` to memcached (bare, or replicated
/// behind `apus run`).
#[derive(Debug)]
pub struct KvConn {
    conn: AppConn,
    key: String,
}

impl KvConn {
    /// Connects to `addr`; connection `n` writes its own key.
    pub fn connect(protocol: Protocol, addr: SocketAddr, n: usize) -> Result<KvConn> {
        Ok(KvConn {
            conn: AppConn::connect(protocol, addr, CONNECT_TIMEOUT)
                .with_context(|| format!("connecting to {addr}"))?,
            key: format!("bench:{n}"),
        })
    }
}

impl Conn for KvConn {
    fn request(&mut self, _: u64, value: &[u8]) -> Result<()> {
        Ok(self.conn.set(&self.key, value)?)
    }

    fn request_pipelined(&mut self, _: u64, value: &[u8], depth: usize) -> Result<()> {
        Ok(self.conn.set_pipelined(&self.key, value, depth)?)
    }
}

/// etcd's `KV/Put`, gRPC over HTTP/2 (prior knowledge, no TLS), as etcdctl
/// sends it; one HTTP/2 connection per load connection.
#[cfg(feature = "etcd")]
pub mod etcd {
    use std::net::SocketAddr;

    use anyhow::{Context, Result, bail};
    use bytes::{BufMut, Bytes, BytesMut};
    use prost::Message;

    use crate::load::Conn;

    /// `etcdserverpb.PutRequest`, the fields this client sets.
    #[derive(Clone, PartialEq, prost::Message)]
    struct PutRequest {
        #[prost(bytes = "vec", tag = "1")]
        key: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        value: Vec<u8>,
    }

    /// `etcdserverpb.ResponseHeader`, to check the reply decodes.
    #[derive(Clone, PartialEq, prost::Message)]
    struct ResponseHeader {
        #[prost(uint64, tag = "1")]
        cluster_id: u64,
        #[prost(uint64, tag = "2")]
        member_id: u64,
        #[prost(int64, tag = "3")]
        revision: i64,
        #[prost(uint64, tag = "4")]
        raft_term: u64,
    }

    /// `etcdserverpb.PutResponse`.
    #[derive(Clone, PartialEq, prost::Message)]
    struct PutResponse {
        #[prost(message, optional, tag = "1")]
        header: Option<ResponseHeader>,
    }

    /// One connection to an etcd member.
    pub struct EtcdConn {
        rt: tokio::runtime::Runtime,
        send: h2::client::SendRequest<Bytes>,
        uri: String,
        key: Vec<u8>,
    }

    impl std::fmt::Debug for EtcdConn {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("EtcdConn").field("uri", &self.uri).finish()
        }
    }

    impl EtcdConn {
        /// Connects to the member at `addr`; connection `n` writes its own key.
        pub fn connect(addr: SocketAddr, n: usize) -> Result<EtcdConn> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()?;
            let send = rt.block_on(async {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let (send, connection) = h2::client::handshake(tcp).await?;
                // Runs whenever the runtime is driven (every request).
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                anyhow::Ok(send)
            })?;
            Ok(EtcdConn {
                rt,
                send,
                uri: format!("http://{addr}/etcdserverpb.KV/Put"),
                key: format!("bench/{n}").into_bytes(),
            })
        }
    }

    impl Conn for EtcdConn {
        fn request(&mut self, _: u64, value: &[u8]) -> Result<()> {
            let msg = PutRequest {
                key: self.key.clone(),
                value: value.to_vec(),
            }
            .encode_to_vec();
            // gRPC message framing: not compressed, big-endian length.
            let mut body = BytesMut::with_capacity(5 + msg.len());
            body.put_u8(0);
            body.put_u32(msg.len() as u32);
            body.put_slice(&msg);
            let req = http::Request::builder()
                .method("POST")
                .uri(&self.uri)
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())?;
            let send = self.send.clone();
            self.rt.block_on(async move {
                let mut send = send.ready().await?;
                let (response, mut stream) = send.send_request(req, false)?;
                stream.send_data(body.freeze(), true)?;
                let response = response.await?;
                if response.status() != http::StatusCode::OK {
                    bail!("HTTP status {}", response.status());
                }
                let early = grpc_status(response.headers());
                let mut body = response.into_body();
                let mut data = BytesMut::new();
                while let Some(chunk) = body.data().await {
                    let chunk = chunk?;
                    let _ = body.flow_control().release_capacity(chunk.len());
                    data.extend_from_slice(&chunk);
                }
                let trailers = body.trailers().await?;
                let status = early.or_else(|| trailers.as_ref().and_then(grpc_status));
                match status {
                    Some((0, _)) => {}
                    Some((code, why)) => bail!("gRPC status {code}: {why}"),
                    None => bail!("reply without a gRPC status"),
                }
                if data.len() < 5
                    || data.len()
                        != 5 + u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize
                {
                    bail!("malformed gRPC reply framing ({} bytes)", data.len());
                }
                let reply = PutResponse::decode(&data[5..]).context("decoding PutResponse")?;
                if reply.header.is_none_or(|h| h.revision <= 0) {
                    bail!("PutResponse without a revision");
                }
                Ok(())
            })
        }
    }

    fn grpc_status(h: &http::HeaderMap) -> Option<(u32, String)> {
        let code = h.get("grpc-status")?.to_str().ok()?.parse().ok()?;
        let why = h
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .unwrap_or("")
            .to_string();
        Some((code, why))
    }
}
