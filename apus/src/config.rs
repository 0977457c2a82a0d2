//! The cluster configuration: one TOML file shared by every replica.
//!
//! ```toml
//! [cluster]
//! name = "orders"                     # optional ("apus"): replicas of other clusters are refused
//! secret = "at least sixteen bytes"   # or secret_file = "/etc/apus/secret"
//! durability = "durable"              # memory | durable
//! fsync = "batch"                     # always | batch | never (durable only)
//! transport = "auto"                  # auto | verbs | fabric | tcp | quic
//! provider = "tcp;ofi_rxm"            # fabric: libfabric provider (shm, tcp;ofi_rxm, tcp, verbs;ofi_rxm, verbs)
//! domain = "lo"                       # fabric: the provider's domain (optional)
//! device = "mlx5_0"                   # verbs: the RDMA device (optional: the first one)
//! op_timeout_ms = 250                 # every transport: an operation this late ends the connection
//! poll = "hybrid"                     # spin | hybrid | park
//! tls_ca = "certs/ca.pem"             # quic: the cluster CA (`apus certs` makes one)
//! follower_clients = "refuse"         # `apus run`: refuse | serve (unreplicated, to inspect)
//! digest = ["redis-cli", "-p", "{port}", "DEBUG", "DIGEST"]  # `apus check`: the server's state digest
//! digest_timeout_ms = 10000           # `apus check`: how long the digest command may take
//! ready = ["pg_isready", "-h", "{host}", "-p", "{port}"]  # `apus run`: succeeds once the server is up
//! max_uncommitted_bytes = 4194304     # `apus run`: input the leader's server may read ahead of its commits
//!
//! [engine]                            # optional; defaults shown
//! ring_capacity = 4194304
//! catchup_chunk = 131072
//! max_payload = 65536
//! max_inflight_writes = 64
//! heartbeat_us = 1000
//! election_timeout_us = 10000
//!
//! [[replica]]
//! id = 0
//! address = "127.0.0.1:7100"          # replication traffic
//! client = "127.0.0.1:7200"           # clients and `apus status`
//! app = "127.0.0.1:6379"              # `apus run`: where this replica's server listens (IPv4)
//! server_dir = "/var/lib/redis"       # `apus run`: the server's own data (restored pristine at every start)
//! data_dir = "/var/lib/apus/0"
//! tls_cert = "certs/n0.pem"           # quic: this replica's certificate...
//! tls_key = "certs/n0.key"            # ...and key
//! ```
//!
//! Every mistake is reported with the field it is in, e.g.
//! `replica[1].address: invalid socket address "localhost"`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use apus_core::{Durability, NodeId, ReplicaConfig};
use serde::Deserialize;

/// `cluster.name` by default.
pub const DEFAULT_CLUSTER_NAME: &str = "apus";
/// Longest `cluster.name`.
pub const MAX_CLUSTER_NAME: usize = 64;

/// `cluster.max_uncommitted_bytes` by default.
pub const DEFAULT_MAX_UNCOMMITTED: usize = 4 << 20;

/// A configuration error, naming the field at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct ConfigError {
    /// Dotted path of the field (`cluster.secret`, `replica[2].data_dir`).
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

fn err<T>(field: impl Into<String>, reason: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError {
        field: field.into(),
        reason: reason.into(),
    })
}

/// When the runtime makes appended entries durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// `fdatasync` for every batch the engine hands over, at once.
    Always,
    /// Wait up to [`Fsync::BATCH_WINDOW`] to gather more, then one `fdatasync`.
    #[default]
    Batch,
    /// Never: acknowledged entries survive a process crash (they are in the
    /// page cache) but not a power loss.
    Never,
}

impl Fsync {
    /// How long `batch` waits to gather more entries into one fsync.
    pub const BATCH_WINDOW: Duration = Duration::from_micros(200);
}

/// How the engine thread waits for work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PollPolicy {
    /// Busy-poll: the lowest latency, one core per node.
    Spin,
    /// Spin briefly after activity, then block.
    #[default]
    Hybrid,
    /// Block until the transport, a proposer or a timer wakes the engine.
    Park,
}

impl PollPolicy {
    /// How long a `hybrid` engine keeps spinning after its last activity.
    pub const HYBRID_SPIN: Duration = Duration::from_micros(50);

    /// Whether a poller with nothing to do spins (rather than blocks), its
    /// last activity `idle_for` ago. The engine and the benchmark's raw
    /// round trip both ask this, so their figures compare.
    pub fn spins(self, idle_for: Duration) -> bool {
        match self {
            PollPolicy::Spin => true,
            PollPolicy::Hybrid => idle_for < Self::HYBRID_SPIN,
            PollPolicy::Park => false,
        }
    }
}

/// The replication transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// The best one every replica can run, settled when they first meet:
    /// verbs, then fabric, then tcp (see [`crate::negotiate`]).
    #[default]
    Auto,
    /// TCP with the cluster secret (the `tcp` feature, on by default).
    Tcp,
    /// QUIC with mutual TLS (the `quic` feature).
    Quic,
    /// libfabric RMA with the configured provider (the `fabric` feature).
    Fabric,
    /// Raw RDMA verbs (the `verbs` feature; an RDMA NIC or Soft-RoCE).
    Verbs,
}

impl TransportKind {
    /// Its name in the configuration and in `apus status`.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Auto => "auto",
            TransportKind::Tcp => "tcp",
            TransportKind::Quic => "quic",
            TransportKind::Fabric => "fabric",
            TransportKind::Verbs => "verbs",
        }
    }

    /// Whether its engine must poll the provider for progress even when
    /// idle (a wait bounded at tens of microseconds): one-sided writes
    /// into us land without waking anything.
    pub fn polls_for_progress(self) -> bool {
        matches!(self, TransportKind::Fabric | TransportKind::Verbs)
    }

    /// A one-byte code for the client protocol (0: not settled yet).
    pub fn code(self) -> u8 {
        match self {
            TransportKind::Auto => 0,
            TransportKind::Tcp => 1,
            TransportKind::Quic => 2,
            TransportKind::Fabric => 3,
            TransportKind::Verbs => 4,
        }
    }

    /// The inverse of [`code`](Self::code).
    pub fn from_code(code: u8) -> Option<TransportKind> {
        [
            TransportKind::Auto,
            TransportKind::Tcp,
            TransportKind::Quic,
            TransportKind::Fabric,
            TransportKind::Verbs,
        ]
        .into_iter()
        .find(|k| k.code() == code)
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Settings of the verbs transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerbsSettings {
    /// The RDMA device (`mlx5_0`, `rxe0`); the first one if `None`.
    pub device: Option<String>,
    /// An operation not complete after this long ends the connection.
    pub op_timeout: Duration,
}

/// Settings of the libfabric transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FabricSettings {
    /// The provider (`shm`, `tcp;ofi_rxm`, `tcp`, `verbs;ofi_rxm`, `verbs`).
    pub provider: String,
    /// The provider's domain (for tcp, an interface such as `lo`).
    pub domain: Option<String>,
    /// An operation not complete after this long ends the connection.
    pub op_timeout: Duration,
}

/// What a follower's server does with a real client (`apus run`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FollowerClients {
    /// Close the connection: clients must use the leader (`apus leader`).
    #[default]
    Refuse,
    /// Serve it without replication, to inspect a follower's state with
    /// read-only commands. A write there makes that replica diverge.
    Serve,
}

/// Certificate files for the QUIC transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPaths {
    /// The cluster CA certificate.
    pub ca: PathBuf,
    /// Every replica's certificate, by id.
    pub certs: Vec<PathBuf>,
    /// Every replica's private key, by id.
    pub keys: Vec<PathBuf>,
}

impl TlsPaths {
    /// Where the CA's private key is kept (next to its certificate).
    pub fn ca_key(&self) -> PathBuf {
        self.ca.with_extension("key")
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    cluster: RawCluster,
    #[serde(default)]
    engine: RawEngine,
    #[serde(default)]
    replica: Vec<RawReplica>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: Option<String>,
    secret: Option<String>,
    secret_file: Option<PathBuf>,
    #[serde(default)]
    durability: Option<String>,
    fsync: Option<Fsync>,
    #[serde(default)]
    transport: TransportKind,
    #[serde(default)]
    poll: PollPolicy,
    tls_ca: Option<PathBuf>,
    #[serde(default)]
    follower_clients: FollowerClients,
    digest: Option<Vec<String>>,
    digest_timeout_ms: Option<u64>,
    ready: Option<Vec<String>>,
    max_uncommitted_bytes: Option<usize>,
    provider: Option<String>,
    domain: Option<String>,
    device: Option<String>,
    op_timeout_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawEngine {
    ring_capacity: Option<usize>,
    catchup_chunk: Option<usize>,
    max_payload: Option<usize>,
    max_inflight_writes: Option<usize>,
    heartbeat_us: Option<u64>,
    election_timeout_us: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplica {
    id: u8,
    address: String,
    client: Option<String>,
    app: Option<String>,
    server_dir: Option<PathBuf>,
    data_dir: PathBuf,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
}

/// One replica of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaSpec {
    /// Its id.
    pub id: NodeId,
    /// Replication address.
    pub address: SocketAddr,
    /// Client and admin address, if it serves one.
    pub client: Option<SocketAddr>,
    /// Where the replicated server listens (`apus run`).
    pub app: Option<SocketAddr>,
    /// The replicated server's own data directory (`apus run`): its first
    /// contents are kept as the pristine state, and every start of the
    /// server (a rebuild included) begins from a copy of them, since the
    /// log is replayed into it from the beginning.
    pub server_dir: Option<PathBuf>,
    /// Where it keeps its log and hard state.
    pub data_dir: PathBuf,
}

/// A command the interception library runs against its own server
/// (`cluster.digest`, `cluster.ready`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerCommand {
    /// The program and its arguments; `{port}` and `{host}` are replaced by
    /// the address the command must connect to (the library relays it to
    /// the server, which takes it for the library's own connection).
    pub argv: Vec<String>,
    /// How long it may run.
    pub timeout: Duration,
}

/// A validated cluster configuration.
#[derive(Clone)]
pub struct ClusterConfig {
    /// The cluster's name, its id: kept in every data directory and checked
    /// in every handshake, so a replica of another cluster (or a data
    /// directory of one) is refused with a reason.
    pub name: String,
    /// The shared secret replicas authenticate each other with.
    pub secret: Vec<u8>,
    /// Durability mode.
    pub durability: Durability,
    /// Fsync policy (durable mode).
    pub fsync: Fsync,
    /// Transport.
    pub transport: TransportKind,
    /// Engine thread wait policy.
    pub poll: PollPolicy,
    /// The replicas, by id.
    pub replicas: Vec<ReplicaSpec>,
    /// Certificates (QUIC).
    pub tls: Option<TlsPaths>,
    /// libfabric settings (`transport = "fabric"`, and what `auto` tries).
    pub fabric: Option<FabricSettings>,
    /// Verbs settings (`transport = "verbs"`, and what `auto` tries).
    pub verbs: Option<VerbsSettings>,
    /// What a follower does with real clients (`apus run`).
    pub follower_clients: FollowerClients,
    /// The server's digest command (`apus check`), if configured.
    pub digest: Option<ServerCommand>,
    /// A command that succeeds once the server answers like the leader's
    /// (PostgreSQL: `pg_isready`); replay waits for it after every start.
    pub ready: Option<ServerCommand>,
    /// How many bytes of input the leader's server may have read ahead of
    /// their commit (output commit, `apus run`); its reads wait beyond.
    pub max_uncommitted: usize,
    /// An operation without its answer this long ends its connection, on
    /// every transport: a follower that stops without a word (SIGSTOP, power
    /// loss, a dropped link) is declared lost and stops pinning the
    /// leader's ring.
    pub op_timeout: Duration,
    /// Engine settings shared by every replica (its `id` is replica 0's;
    /// see [`ClusterConfig::engine_for`]).
    pub engine: ReplicaConfig,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("secret", &"<redacted>")
            .field("durability", &self.durability)
            .field("fsync", &self.fsync)
            .field("transport", &self.transport)
            .field("poll", &self.poll)
            .field("replicas", &self.replicas)
            .finish()
    }
}

fn parse_addr(field: String, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().or_else(|_| {
        err(
            field,
            format!("invalid socket address {s:?} (want ip:port)"),
        )
    })
}

/// The dotted path of the key on the line holding byte `offset`:
/// `cluster.fsync`, `replica[2].address`; `line N` when there is no key.
fn field_at(text: &str, offset: usize) -> String {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line_no = text[..line_start].lines().count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    let Some((key, _)) = line.split_once('=') else {
        return format!("line {line_no}");
    };
    let key = key.trim();
    let mut section = String::new();
    let mut replicas = 0usize;
    for l in text[..line_start].lines() {
        let l = l.trim();
        if l == "[[replica]]" {
            replicas += 1;
            section = format!("replica[{}]", replicas - 1);
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            section = name.trim().to_string();
        }
    }
    if section.is_empty() {
        key.to_string()
    } else {
        format!("{section}.{key}")
    }
}

impl ClusterConfig {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<ClusterConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .or_else(|e| err("--config", format!("cannot read {}: {e}", path.display())))?;
        ClusterConfig::parse(&text, path.parent()).map_err(|e| ConfigError {
            field: format!("{}: {}", path.display(), e.field),
            reason: e.reason,
        })
    }

    /// Parses and validates configuration text. Relative `secret_file` and
    /// `data_dir` paths are taken relative to `base` (the file's directory).
    pub fn parse(text: &str, base: Option<&Path>) -> Result<ClusterConfig, ConfigError> {
        let raw: RawFile = toml::from_str(text).or_else(|e: toml::de::Error| {
            let field = e
                .span()
                .map_or_else(|| "file".into(), |s| field_at(text, s.start));
            err(field, e.message().to_string())
        })?;
        let rel = |p: PathBuf| match base {
            Some(b) if p.is_relative() => b.join(p),
            _ => p,
        };
        let c = raw.cluster;
        let secret = match (c.secret, c.secret_file) {
            (Some(s), None) => s.into_bytes(),
            (None, Some(f)) => {
                let f = rel(f);
                let mut b = std::fs::read(&f).or_else(|e| {
                    err(
                        "cluster.secret_file",
                        format!("cannot read {}: {e}", f.display()),
                    )
                })?;
                while b.last().is_some_and(|c| c.is_ascii_whitespace()) {
                    b.pop();
                }
                b
            }
            (Some(_), Some(_)) => {
                return err("cluster.secret", "give secret or secret_file, not both");
            }
            (None, None) => {
                return err(
                    "cluster.secret",
                    "missing: replicas authenticate each other with it",
                );
            }
        };
        let name = c.name.unwrap_or_else(|| DEFAULT_CLUSTER_NAME.into());
        if name.is_empty()
            || name.len() > MAX_CLUSTER_NAME
            || !name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
        {
            return err(
                "cluster.name",
                format!("{name:?}: 1 to {MAX_CLUSTER_NAME} letters, digits, '-', '_' or '.'"),
            );
        }
        if secret.len() < 16 {
            return err(
                "cluster.secret",
                format!("must be at least 16 bytes, got {}", secret.len()),
            );
        }
        let durability = match c.durability.as_deref() {
            None | Some("durable") => Durability::Durable,
            Some("memory") => Durability::Memory,
            Some(other) => {
                return err(
                    "cluster.durability",
                    format!("{other:?}: want \"memory\" or \"durable\""),
                );
            }
        };
        if durability == Durability::Memory && c.fsync.is_some() {
            return err("cluster.fsync", "applies to durability = \"durable\" only");
        }
        if raw.replica.is_empty() {
            return err("replica", "no [[replica]] entries");
        }
        let mut replicas = Vec::new();
        let mut seen_addr = HashSet::new();
        for (i, r) in raw.replica.iter().enumerate() {
            let f = |name: &str| format!("replica[{i}].{name}");
            if usize::from(r.id) != i {
                return err(
                    f("id"),
                    format!(
                        "replicas must be listed in id order 0, 1, 2...; expected {i}, got {}",
                        r.id
                    ),
                );
            }
            let address = parse_addr(f("address"), &r.address)?;
            if !seen_addr.insert(address) {
                return err(f("address"), format!("{address} is used twice"));
            }
            let client = match &r.client {
                Some(s) => {
                    let a = parse_addr(f("client"), s)?;
                    if !seen_addr.insert(a) {
                        return err(f("client"), format!("{a} is used twice"));
                    }
                    Some(a)
                }
                None => None,
            };
            let app = match &r.app {
                Some(s) => {
                    let a = parse_addr(f("app"), s)?;
                    if !seen_addr.insert(a) {
                        return err(f("app"), format!("{a} is used twice"));
                    }
                    if a.is_ipv6() {
                        return err(
                            f("app"),
                            format!(
                                "{a}: IPv6 is not supported (followers replay into their server \
                                 over IPv4 loopback); give the server an IPv4 address"
                            ),
                        );
                    }
                    Some(a)
                }
                None => None,
            };
            let server_dir = match &r.server_dir {
                Some(d) if d.as_os_str().is_empty() => {
                    return err(f("server_dir"), "must not be empty");
                }
                Some(d) => Some(rel(d.clone())),
                None => None,
            };
            if r.data_dir.as_os_str().is_empty() {
                return err(f("data_dir"), "must not be empty");
            }
            replicas.push(ReplicaSpec {
                id: NodeId(r.id),
                address,
                client,
                app,
                server_dir,
                data_dir: rel(r.data_dir.clone()),
            });
        }
        let op_timeout = match c.op_timeout_ms {
            None => Duration::from_millis(250),
            Some(0) => return err("cluster.op_timeout_ms", "must be at least 1"),
            Some(ms) => Duration::from_millis(ms),
        };
        let auto = c.transport == TransportKind::Auto;
        let fabric = if c.transport == TransportKind::Fabric || auto {
            let provider = match c.provider.clone().filter(|p| !p.is_empty()) {
                Some(p) => p,
                // What auto tries: works between hosts, the fastest here.
                None if auto => "tcp;ofi_rxm".to_string(),
                None => {
                    return err(
                        "cluster.provider",
                        "transport = \"fabric\" needs a libfabric provider: \"shm\" (one host), \
                         \"tcp;ofi_rxm\" or \"tcp\" (any network), \"verbs;ofi_rxm\" or \"verbs\" \
                         (RDMA NICs)",
                    );
                }
            };
            Some(FabricSettings {
                provider,
                domain: c.domain.clone().filter(|d| !d.is_empty()),
                op_timeout,
            })
        } else {
            None
        };
        let verbs = (c.transport == TransportKind::Verbs || auto).then(|| VerbsSettings {
            device: c.device.clone().filter(|d| !d.is_empty()),
            op_timeout,
        });
        for (field, set, applies) in [
            ("provider", c.provider.is_some(), fabric.is_some()),
            ("domain", c.domain.is_some(), fabric.is_some()),
            ("device", c.device.is_some(), verbs.is_some()),
        ] {
            if set && !applies {
                return err(
                    format!("cluster.{field}"),
                    format!("does not apply to transport = \"{}\"", c.transport),
                );
            }
        }
        let tls = match c.transport {
            TransportKind::Tcp
            | TransportKind::Fabric
            | TransportKind::Verbs
            | TransportKind::Auto => None,
            TransportKind::Quic => {
                let Some(ca) = c.tls_ca.clone() else {
                    return err(
                        "cluster.tls_ca",
                        "transport = \"quic\" needs the cluster CA (`apus certs` makes one)",
                    );
                };
                let mut certs = Vec::new();
                let mut keys = Vec::new();
                for (i, r) in raw.replica.iter().enumerate() {
                    match (&r.tls_cert, &r.tls_key) {
                        (Some(c), Some(k)) => {
                            certs.push(rel(c.clone()));
                            keys.push(rel(k.clone()));
                        }
                        (None, _) => {
                            return err(
                                format!("replica[{i}].tls_cert"),
                                "transport = \"quic\" needs it",
                            );
                        }
                        (_, None) => {
                            return err(
                                format!("replica[{i}].tls_key"),
                                "transport = \"quic\" needs it",
                            );
                        }
                    }
                }
                Some(TlsPaths {
                    ca: rel(ca),
                    certs,
                    keys,
                })
            }
        };
        let digest = match (c.digest, c.digest_timeout_ms) {
            (None, None) => None,
            (None, Some(_)) => return err("cluster.digest_timeout_ms", "applies with digest only"),
            (Some(argv), _) if argv.is_empty() || argv[0].is_empty() => {
                return err(
                    "cluster.digest",
                    "must name a program, e.g. [\"redis-cli\", \"-p\", \"{port}\", \"DEBUG\", \"DIGEST\"]",
                );
            }
            (Some(argv), _) if !argv.iter().any(|a| a.contains("{port}")) => {
                return err(
                    "cluster.digest",
                    "must connect to {port}: apus runs it against the replica's server through a port of its own",
                );
            }
            (Some(_), Some(0)) => return err("cluster.digest_timeout_ms", "must be at least 1"),
            (Some(argv), ms) => Some(ServerCommand {
                argv,
                timeout: Duration::from_millis(ms.unwrap_or(10_000)),
            }),
        };
        let ready = match c.ready {
            None => None,
            Some(argv) if argv.is_empty() || argv[0].is_empty() => {
                return err(
                    "cluster.ready",
                    "must name a program, e.g. [\"pg_isready\", \"-h\", \"{host}\", \"-p\", \"{port}\"]",
                );
            }
            Some(argv) if !argv.iter().any(|a| a.contains("{port}")) => {
                return err("cluster.ready", "must connect to {port}");
            }
            Some(argv) => Some(ServerCommand {
                argv,
                timeout: Duration::from_secs(5),
            }),
        };
        let mut engine = ReplicaConfig::new(NodeId(0), replicas.len());
        engine.durability = durability;
        let e = raw.engine;
        if let Some(v) = e.ring_capacity {
            engine.ring_capacity = v;
        }
        if let Some(v) = e.catchup_chunk {
            engine.catchup_chunk = v;
        }
        if let Some(v) = e.max_payload {
            engine.max_payload = v;
        }
        if let Some(v) = e.max_inflight_writes {
            engine.max_inflight_writes = v;
        }
        if let Some(v) = e.heartbeat_us {
            engine.heartbeat_interval = Duration::from_micros(v);
        }
        if let Some(v) = e.election_timeout_us {
            engine.election_timeout = Duration::from_micros(v);
        }
        let max_uncommitted = c.max_uncommitted_bytes.unwrap_or(DEFAULT_MAX_UNCOMMITTED);
        if max_uncommitted < engine.max_payload {
            return err(
                "cluster.max_uncommitted_bytes",
                format!(
                    "{max_uncommitted} is less than one entry (engine.max_payload = {})",
                    engine.max_payload
                ),
            );
        }
        if let Err(e) = engine.validate() {
            let field = match e.field {
                "replicas" => "replica".to_string(),
                "heartbeat_interval" => "engine.heartbeat_us".to_string(),
                "election_timeout" => "engine.election_timeout_us".to_string(),
                other => format!("engine.{other}"),
            };
            return err(field, e.reason);
        }
        Ok(ClusterConfig {
            name,
            secret,
            durability,
            fsync: c.fsync.unwrap_or_default(),
            transport: c.transport,
            poll: c.poll,
            replicas,
            tls,
            fabric,
            verbs,
            follower_clients: c.follower_clients,
            digest,
            ready,
            max_uncommitted,
            op_timeout,
            engine,
        })
    }

    /// The engine configuration of replica `id`.
    pub fn engine_for(&self, id: NodeId) -> Result<ReplicaConfig, ConfigError> {
        if id.index() >= self.replicas.len() {
            return err(
                "--id",
                format!(
                    "{} is not a replica of this cluster (ids 0..{})",
                    id.0,
                    self.replicas.len()
                ),
            );
        }
        let mut e = self.engine.clone();
        e.id = id;
        e.seed = u64::from(id.0) ^ 0x4150_5553;
        Ok(e)
    }

    /// The spec of replica `id`.
    pub fn replica(&self, id: NodeId) -> Option<&ReplicaSpec> {
        self.replicas.get(id.index())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[cluster]
secret = "0123456789abcdef"
durability = "durable"
fsync = "always"
poll = "spin"

[engine]
ring_capacity = 1048576

[[replica]]
id = 0
address = "127.0.0.1:7100"
client = "127.0.0.1:7200"
data_dir = "d0"

[[replica]]
id = 1
address = "127.0.0.1:7101"
data_dir = "/abs/d1"
"#;

    #[test]
    fn parses_a_good_file() {
        let c = ClusterConfig::parse(GOOD, Some(Path::new("/etc/apus"))).unwrap();
        assert_eq!(c.replicas.len(), 2);
        assert_eq!(c.fsync, Fsync::Always);
        assert_eq!(c.poll, PollPolicy::Spin);
        assert_eq!(c.engine.ring_capacity, 1 << 20);
        assert_eq!(c.replicas[0].data_dir, Path::new("/etc/apus/d0"));
        assert_eq!(c.replicas[1].data_dir, Path::new("/abs/d1"));
        assert_eq!(c.engine_for(NodeId(1)).unwrap().id, NodeId(1));
        assert_eq!(c.engine_for(NodeId(2)).unwrap_err().field, "--id");
        assert_eq!(c.digest, None);
        let with_app = GOOD.replacen(
            "poll = \"spin\"",
            "poll = \"spin\"\ndigest = [\"redis-cli\", \"-p\", \"{port}\", \"DEBUG\", \"DIGEST\"]",
            1,
        )
        .replacen(
            "data_dir = \"d0\"",
            "data_dir = \"d0\"\napp = \"127.0.0.1:6379\"\nserver_dir = \"s0\"",
            1,
        );
        let c = ClusterConfig::parse(&with_app, Some(Path::new("/etc/apus"))).unwrap();
        let d = c.digest.clone().unwrap();
        assert_eq!(d.argv[2], "{port}");
        assert_eq!(d.timeout, Duration::from_secs(10));
        assert_eq!(
            c.replicas[0].server_dir.as_deref(),
            Some(Path::new("/etc/apus/s0"))
        );
        assert!(
            !format!("{c:?}").contains("0123456789abcdef"),
            "secret leaked into Debug"
        );
    }

    /// Every invalid field gets an error that names it.
    #[test]
    fn each_invalid_field_is_named() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "secret = \"0123456789abcdef\"",
                "secret = \"short\"",
                "cluster.secret",
            ),
            ("secret = \"0123456789abcdef\"", "", "cluster.secret"),
            (
                "secret = \"0123456789abcdef\"",
                "secret = \"0123456789abcdef\"\nsecret_file = \"x\"",
                "cluster.secret",
            ),
            (
                "secret = \"0123456789abcdef\"",
                "secret_file = \"/nonexistent/secret\"",
                "cluster.secret_file",
            ),
            (
                "durability = \"durable\"",
                "durability = \"fast\"",
                "cluster.durability",
            ),
            (
                "durability = \"durable\"\nfsync = \"always\"",
                "durability = \"memory\"\nfsync = \"always\"",
                "cluster.fsync",
            ),
            (
                "fsync = \"always\"",
                "fsync = \"sometimes\"",
                "cluster.fsync",
            ),
            ("poll = \"spin\"", "poll = \"lazy\"", "cluster.poll"),
            (
                "poll = \"spin\"",
                "poll = \"spin\"\nname = \"two words\"",
                "cluster.name",
            ),
            (
                "poll = \"spin\"",
                "poll = \"spin\"\nname = \"\"",
                "cluster.name",
            ),
            (
                "ring_capacity = 1048576",
                "ring_capacity = 1000",
                "engine.ring_capacity",
            ),
            (
                "ring_capacity = 1048576",
                "ring_capacity = 1048576\nmax_payload = 900000",
                "engine.max_payload",
            ),
            (
                "ring_capacity = 1048576",
                "ring_capacity = 1048576\nheartbeat_us = 0",
                "engine.heartbeat_us",
            ),
            (
                "ring_capacity = 1048576",
                "ring_capacity = 1048576\nelection_timeout_us = 1",
                "engine.election_timeout_us",
            ),
            (
                "ring_capacity = 1048576",
                "ring_capacity = 1048576\nbogus = 1",
                "engine.bogus",
            ),
            ("id = 1", "id = \"one\"", "replica[1].id"),
            (
                "data_dir = \"/abs/d1\"",
                "data_dir = 7",
                "replica[1].data_dir",
            ),
            (
                "address = \"127.0.0.1:7101\"",
                "address = \"localhost\"",
                "replica[1].address",
            ),
            (
                "address = \"127.0.0.1:7101\"",
                "address = \"127.0.0.1:7100\"",
                "replica[1].address",
            ),
            (
                "client = \"127.0.0.1:7200\"",
                "client = \"127.0.0.1:7100\"",
                "replica[0].client",
            ),
            (
                "client = \"127.0.0.1:7200\"",
                "client = \"nope\"",
                "replica[0].client",
            ),
            ("id = 1", "id = 5", "replica[1].id"),
            (
                "data_dir = \"d0\"",
                "data_dir = \"\"",
                "replica[0].data_dir",
            ),
            (
                "data_dir = \"d0\"",
                "data_dir = \"d0\"\napp = \"[::1]:6379\"",
                "replica[0].app",
            ),
            (
                "data_dir = \"d0\"",
                "data_dir = \"d0\"\nserver_dir = \"\"",
                "replica[0].server_dir",
            ),
            (
                "poll = \"spin\"",
                "poll = \"spin\"\ndigest = []",
                "cluster.digest",
            ),
            (
                "poll = \"spin\"",
                "poll = \"spin\"\ndigest = [\"redis-cli\", \"DEBUG\", \"DIGEST\"]",
                "cluster.digest",
            ),
            (
                "poll = \"spin\"",
                "poll = \"spin\"\ndigest_timeout_ms = 5",
                "cluster.digest_timeout_ms",
            ),
            (
                "poll = \"spin\"",
                "poll = \"spin\"\nmax_uncommitted_bytes = 1000",
                "cluster.max_uncommitted_bytes",
            ),
        ];
        for (from, to, field) in cases {
            let text = GOOD.replacen(from, to, 1);
            assert_ne!(&text, GOOD, "case {to:?} did not apply");
            let e = ClusterConfig::parse(&text, None).expect_err(to);
            assert!(e.field.starts_with(field), "{to:?}: got {e}");
        }
        // QUIC needs its certificates.
        let quic = GOOD.replace("poll = \"spin\"", "poll = \"spin\"\ntransport = \"quic\"");
        assert_eq!(
            ClusterConfig::parse(&quic, None).unwrap_err().field,
            "cluster.tls_ca"
        );
        let quic = quic.replace(
            "transport = \"quic\"",
            "transport = \"quic\"\ntls_ca = \"ca.pem\"",
        );
        assert_eq!(
            ClusterConfig::parse(&quic, None).unwrap_err().field,
            "replica[0].tls_cert"
        );
        let quic = quic.replace(
            "data_dir = \"d0\"",
            "data_dir = \"d0\"\ntls_cert = \"n0.pem\"",
        );
        assert_eq!(
            ClusterConfig::parse(&quic, None).unwrap_err().field,
            "replica[0].tls_key"
        );
        let quic = quic
            .replace(
                "tls_cert = \"n0.pem\"",
                "tls_cert = \"n0.pem\"\ntls_key = \"n0.key\"",
            )
            .replace(
                "data_dir = \"/abs/d1\"",
                "data_dir = \"/abs/d1\"\ntls_cert = \"n1.pem\"\ntls_key = \"n1.key\"",
            );
        let c = ClusterConfig::parse(&quic, Some(Path::new("/etc/apus"))).unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.ca, Path::new("/etc/apus/ca.pem"));
        assert_eq!(tls.ca_key(), Path::new("/etc/apus/ca.key"));
        assert_eq!(tls.keys[1], Path::new("/etc/apus/n1.key"));
        let fabric = GOOD.replace("poll = \"spin\"", "poll = \"spin\"\ntransport = \"fabric\"");
        assert_eq!(
            ClusterConfig::parse(&fabric, None).unwrap_err().field,
            "cluster.provider"
        );
        let ok = fabric.replace(
            "transport = \"fabric\"",
            "transport = \"fabric\"\nprovider = \"shm\"",
        );
        let c = ClusterConfig::parse(&ok, None).unwrap();
        assert_eq!(c.fabric.unwrap().op_timeout, Duration::from_millis(250));
        let stray = GOOD.replace(
            "poll = \"spin\"",
            "poll = \"spin\"\ntransport = \"tcp\"\nprovider = \"shm\"",
        );
        assert_eq!(
            ClusterConfig::parse(&stray, None).unwrap_err().field,
            "cluster.provider"
        );
        let stray = GOOD.replace(
            "poll = \"spin\"",
            "poll = \"spin\"\ntransport = \"fabric\"\nprovider = \"shm\"\ndevice = \"rxe0\"",
        );
        assert_eq!(
            ClusterConfig::parse(&stray, None).unwrap_err().field,
            "cluster.device"
        );
        // Auto, the default, carries what it may try: fabric over
        // tcp;ofi_rxm unless configured, verbs on the first device.
        let auto = ClusterConfig::parse(GOOD, None).unwrap();
        assert_eq!(auto.transport, TransportKind::Auto);
        assert_eq!(auto.fabric.unwrap().provider, "tcp;ofi_rxm");
        assert_eq!(auto.verbs.unwrap().device, None);
        let verbs = GOOD.replace(
            "poll = \"spin\"",
            "poll = \"spin\"\ntransport = \"verbs\"\ndevice = \"rxe0\"\nop_timeout_ms = 900",
        );
        let v = ClusterConfig::parse(&verbs, None).unwrap();
        assert_eq!(
            v.verbs,
            Some(VerbsSettings {
                device: Some("rxe0".into()),
                op_timeout: Duration::from_millis(900)
            })
        );
        assert!(v.fabric.is_none());
        let zero = ok.replace(
            "provider = \"shm\"",
            "provider = \"shm\"\nop_timeout_ms = 0",
        );
        assert_eq!(
            ClusterConfig::parse(&zero, None).unwrap_err().field,
            "cluster.op_timeout_ms"
        );
        let transport = GOOD.replace(
            "poll = \"spin\"",
            "poll = \"spin\"\ntransport = \"carrier-pigeon\"",
        );
        assert_eq!(
            ClusterConfig::parse(&transport, None).unwrap_err().field,
            "cluster.transport"
        );
        let none = GOOD.split("[[replica]]").next().unwrap();
        assert_eq!(
            ClusterConfig::parse(none, None).unwrap_err().field,
            "replica"
        );
        let unknown =
            ClusterConfig::parse(&GOOD.replace("poll = \"spin\"", "pol = 1"), None).unwrap_err();
        assert!(unknown.reason.contains("pol"), "{unknown}");
    }
}
