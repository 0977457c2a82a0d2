//! The `Node` runtime: one replica of a cluster, running in threads of the
//! calling process.
//!
//! * The **engine thread** owns the [`Replica`], its transport and its store.
//!   Each iteration it takes queued proposals, polls the transport, polls the
//!   replica, carries out its actions, and hands committed entries to the
//!   apply thread. Between iterations it spins or blocks, as the
//!   [`PollPolicy`] says.
//! * Proposers (any thread) push onto a bounded lock-free queue and wait on
//!   their own waiter: a short spin, then park.
//! * The **sync thread** (durable mode) makes appends durable with one
//!   `fdatasync` per batch (group commit).
//! * The **apply thread** feeds committed entries, in order, to the
//!   application's [`StateMachine`] and answers the waiting proposer with
//!   what `apply` returned.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

use apus_core::{
    Action, EntryKind, Event, Index, NodeId, Region, Replica, Role, Term, Time, Transport,
    TransportEvent, Wake,
};
use crossbeam_queue::ArrayQueue;
use tracing::{error, info, warn};

use crate::config::{ClusterConfig, ConfigError, Fsync, PollPolicy, TransportKind};
use crate::identity::{IdentityError, ReplicaIdentity};
use crate::metrics::{self, Metrics, PUBLISH_EVERY};
use crate::speculation::{Speculation, SpeculationLost};
use crate::storage::{MemoryStore, NodeStore, Recovery, SegmentStore, SyncHandle};
use apus_tcp::identity::{Anonymous, Identity};

/// Proposals queued for the engine, at most.
pub const PROPOSAL_QUEUE: usize = 4096;
/// Committed entries queued for the apply thread, at most.
pub const APPLY_QUEUE: usize = 4096;
/// Committed entries that nobody waits for (this leader's submitted input:
/// its server has it already) wait in the apply queue until this many are
/// queued, or until the apply thread's own timed wake-up
/// ([`APPLY_IDLE_WAIT`]): waking it on every commit round would cost the
/// leader a thread wake-up per round on top of the engine's and the
/// server's. Small next to the spare buffers, which the queued entries
/// hold until applied.
const APPLY_WAKE_AT: usize = SPARE_BUFFERS / 4;
/// How long an idle apply thread sleeps before it looks at its queue
/// unwoken.
const APPLY_IDLE_WAIT: Duration = Duration::from_millis(20);
const _: () = assert!(APPLY_WAKE_AT >= 1 && APPLY_WAKE_AT < APPLY_QUEUE);
/// Payload buffers kept for reuse between proposals and applied entries, so
/// that the steady state allocates none per entry.
const SPARE_BUFFERS: usize = 256;
/// A buffer that grew beyond this is dropped instead of kept.
const SPARE_BUFFER_MAX: usize = 16 << 10;
/// A new buffer has room for at least this much.
const SPARE_BUFFER_MIN: usize = 512;
// What the spare pool may hold at most, kept small next to the queues.
const _: () = assert!(SPARE_BUFFERS * SPARE_BUFFER_MAX <= 4 << 20);
const _: () = assert!(SPARE_BUFFER_MIN <= SPARE_BUFFER_MAX);
/// How long an engine with a realtime priority may run without parking
/// before it drops to the normal policy (see [`Node::set_engine_realtime`]).
/// Its passes take microseconds, but under bulk load (4 KiB values, 50
/// pipelined connections) it is busy for 20-80 ms at a time, and dropped
/// then it starves again; busy this long is a bug that must not keep a
/// core from the server.
pub const REALTIME_BUSY_LIMIT: Duration = Duration::from_millis(500);

/// How long a proposer spins before it parks.
const PROPOSER_SPIN: Duration = Duration::from_micros(20);
/// Default time a proposal may take before `propose` gives up.
pub const DEFAULT_PROPOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The application's replicated state.
pub trait StateMachine: Send + 'static {
    /// Applies one committed entry. Called for every entry, in log order,
    /// exactly once per run of the node (after a restart, from index 1 again
    /// in memory mode, or the whole log in durable mode). The returned bytes
    /// go back to the proposer if it is waiting on this node.
    fn apply(&mut self, entry: &Entry<'_>) -> Vec<u8>;
}

/// A committed entry handed to [`StateMachine::apply`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<'a> {
    /// Log index.
    pub index: Index,
    /// Term it was proposed in.
    pub term: Term,
    /// What it records (library users see `Data`, and the leaders' `Noop`s).
    pub kind: EntryKind,
    /// Connection id (0 for library use).
    pub conn: u64,
    /// The proposed bytes.
    pub payload: &'a [u8],
    /// Whether it was proposed through this node in this run, and its
    /// proposer is answered with what `apply` returns.
    pub proposed_here: bool,
}

/// A proposal that committed and was applied on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// Its log index.
    pub index: Index,
    /// What the state machine returned.
    pub output: Vec<u8>,
}

/// Why a proposal did not commit (as far as this node knows).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// Only the leader takes proposals; try it.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader, when known.
        leader: Option<NodeId>,
    },
    /// The payload is larger than `engine.max_payload`.
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Payload size.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// A leader change replaced the proposal: it will never commit.
    #[error("lost in a leader change; it did not commit")]
    Lost,
    /// No answer in time. The proposal may still commit.
    #[error("timed out; the proposal may or may not commit")]
    Timeout,
    /// The node is shutting down or has stopped.
    #[error("node stopped: {0}")]
    Stopped(String),
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration does not fit.
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// Storage could not be opened or recovered.
    #[error("storage: {0}")]
    Store(#[from] apus_core::StoreError),
    /// The transport could not start.
    #[error("transport: {0}")]
    Transport(#[from] std::io::Error),
    /// The engine refused its configuration or state.
    #[error("engine: {0}")]
    Engine(#[from] apus_core::ReplicaError),
    /// The data directory's identity is another cluster's or replica's, or
    /// unreadable.
    #[error("identity: {0}")]
    Identity(#[from] IdentityError),
}

/// What a node knows about itself (for `apus status`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    /// This node.
    pub id: NodeId,
    /// Its role.
    pub role: Role,
    /// Its term.
    pub term: Term,
    /// The leader it knows of.
    pub leader: Option<NodeId>,
    /// Commit index.
    pub commit: Index,
    /// Last log index.
    pub last_index: Index,
    /// Entries applied by the state machine.
    pub applied: Index,
    /// Whether it is recovering a lost log (memory mode restart).
    pub recovering: bool,
    /// The voters it knows lost their logs, when too many for the rest to
    /// elect anyone (bit per replica; see [`Replica::voters_lost`]).
    pub voters_lost: u32,
    /// The transport's fencing counters (zero for transports that fence
    /// inside the receiver instead: tcp, quic).
    pub fencing: FencingCounts,
    /// The transport running ([`TransportKind::Auto`] while `auto` is
    /// still choosing).
    pub transport: TransportKind,
}

/// What a transport with hardware access control reports about fencing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FencingCounts {
    /// This node's writes to a peer's log ring that the peer refused
    /// (no grant, or a revoked key).
    pub fenced_writes: u64,
    /// Ring grants this node revoked.
    pub revocations: u64,
}

#[derive(Debug)]
struct Waiter {
    done: AtomicBool,
    result: Mutex<Option<Result<Applied, ProposeError>>>,
    thread: Thread,
}

impl Waiter {
    fn new() -> Arc<Waiter> {
        Arc::new(Waiter {
            done: AtomicBool::new(false),
            result: Mutex::new(None),
            thread: thread::current(),
        })
    }

    fn complete(&self, r: Result<Applied, ProposeError>) {
        if let Ok(mut slot) = self.result.lock() {
            if slot.is_some() {
                return;
            }
            *slot = Some(r);
        }
        self.done.store(true, Ordering::Release);
        self.thread.unpark();
    }

    /// Spins briefly, then parks until completed or `deadline` (none: until
    /// completed).
    fn wait(&self, deadline: Option<Instant>) -> Result<Applied, ProposeError> {
        let spin_until = Instant::now() + PROPOSER_SPIN;
        while !self.done.load(Ordering::Acquire) {
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(ProposeError::Timeout);
            }
            if now < spin_until {
                std::hint::spin_loop();
            } else {
                // Parks are bounded so a missed unpark costs a second, not
                // the proposal.
                let park = deadline.map_or(Duration::from_secs(1), |d| d - now);
                thread::park_timeout(park.min(Duration::from_secs(1)));
            }
        }
        self.result
            .lock()
            .ok()
            .and_then(|mut r| r.take())
            .unwrap_or(Err(ProposeError::Stopped("waiter poisoned".into())))
    }
}

/// Who learns a proposal's outcome.
enum Proposer {
    /// A thread waiting in [`Node::propose`] and friends.
    Waiting(Arc<Waiter>),
    /// Nobody waits ([`Node::submit`]): the outcome is counted in the
    /// node's [`Speculation`]; `bytes` is the payload's length.
    Submitted { bytes: u64 },
}

impl Proposer {
    /// The proposal will never commit.
    fn fail(self, e: ProposeError, spec: &Speculation) {
        match self {
            Proposer::Waiting(w) => w.complete(Err(e)),
            Proposer::Submitted { bytes } => spec.resolve(bytes, false),
        }
    }
}

struct Request {
    kind: EntryKind,
    conn: u64,
    payload: Vec<u8>,
    proposer: Proposer,
}

struct ApplyItem {
    index: Index,
    term: Term,
    kind: EntryKind,
    conn: u64,
    payload: Vec<u8>,
    waiter: Option<Arc<Waiter>>,
    proposed_here: bool,
}

struct Shared {
    id: NodeId,
    queue: ArrayQueue<Request>,
    apply_queue: ArrayQueue<ApplyItem>,
    /// Payload buffers to reuse (see [`SPARE_BUFFERS`]).
    spare: ArrayQueue<Vec<u8>>,
    waker: Arc<dyn Wake>,
    fencing: Option<FencingProbe>,
    /// [`TransportKind::code`] of the transport running (0: choosing).
    transport_kind: Arc<AtomicU8>,
    engine_parked: AtomicBool,
    /// The engine thread's id (0 until it runs).
    engine_tid: AtomicU32,
    /// The realtime priority the engine runs at while it behaves (0: none;
    /// see [`Node::set_engine_realtime`]).
    realtime_priority: AtomicU8,
    stop: AtomicBool,
    stopped: Mutex<Option<String>>,
    status: Mutex<NodeStatus>,
    applied: AtomicU64,
    metrics: Metrics,
    max_payload: usize,
    /// Submitted proposals ([`Node::submit`]).
    speculation: Speculation,
    /// Whether the replica leads, as last published (one load, for
    /// [`Node::is_leader`]).
    leading: AtomicBool,
    apply_thread: OnceLock<Thread>,
    /// An operator's [`Node::accept_data_loss`] for the engine to carry out
    /// (`DATA_LOSS_*`), and the engine's answer.
    data_loss_request: AtomicU8,
    data_loss_answer: Mutex<Option<bool>>,
}

/// Replica ids as a bit set, for logs: `{0, 2}`.
struct NodeSet(u32);

impl std::fmt::Debug for NodeSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set()
            .entries((0..32).filter(|i| self.0 & (1 << i) != 0))
            .finish()
    }
}

const DATA_LOSS_NONE: u8 = 0;
const DATA_LOSS_VOTE: u8 = 1;
const DATA_LOSS_STAND: u8 = 2;

/// A recovering replica no leader has synchronised for this long says so.
const RECOVERING_WARN_AFTER: Duration = Duration::from_secs(10);

/// A running replica. See the module docs.
pub struct Node {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    recovery: Recovery,
    propose_timeout: Duration,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.shared.id).finish()
    }
}

impl Shared {
    /// A buffer holding `parts` concatenated: a spare one when there is one.
    fn buffer_of(&self, parts: &[&[u8]]) -> Vec<u8> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut b = self
            .spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(len.max(SPARE_BUFFER_MIN)));
        b.clear();
        for p in parts {
            b.extend_from_slice(p);
        }
        debug_assert_eq!(b.len(), len);
        b
    }

    /// Keeps `b` for [`buffer_of`](Self::buffer_of), unless it grew large
    /// or enough are kept.
    fn recycle(&self, b: Vec<u8>) {
        if b.capacity() <= SPARE_BUFFER_MAX {
            let _ = self.spare.push(b);
        }
    }
}

impl Node {
    /// Starts replica `id` of the cluster described by `config`, applying
    /// committed entries to `sm`. The log is recovered from `data_dir` first
    /// (durable mode).
    pub fn start<S: StateMachine>(
        config: &ClusterConfig,
        id: NodeId,
        sm: S,
    ) -> Result<Node, NodeError> {
        let engine_cfg = config.engine_for(id)?;
        let spec = config.replica(id).expect("checked by engine_for").clone();
        let layout = engine_cfg.validate().map_err(|e| ConfigError {
            field: format!("engine.{}", e.field),
            reason: e.reason,
        })?;
        let identity = Arc::new(ReplicaIdentity::open(&spec.data_dir, &config.name, id)?);
        let (store, recovery, sync) = match config.durability {
            apus_core::Durability::Durable => {
                let (s, r) = SegmentStore::open(&spec.data_dir, engine_cfg.max_payload)?;
                let h = s.sync_handle();
                (NodeStore::Segments(s), r, Some(h))
            }
            apus_core::Durability::Memory => (
                NodeStore::Memory(MemoryStore::open(&spec.data_dir)?),
                Recovery::default(),
                None,
            ),
        };
        let region = Region::new(layout.region_len());
        let transport_kind = Arc::new(AtomicU8::new(0));
        let OpenedTransport { transport, fencing } = open_transport(
            config,
            id,
            layout,
            region.clone(),
            transport_kind.clone(),
            identity.clone(),
        )?;
        let max_payload = engine_cfg.max_payload;
        let epoch = Instant::now();
        let replica = Replica::new(engine_cfg, region, store, Time(0))?;
        info!(
            node = %id,
            durability = ?config.durability,
            recovered = recovery.entries,
            "node starting"
        );
        let shared = Arc::new(Shared {
            id,
            queue: ArrayQueue::new(PROPOSAL_QUEUE),
            apply_queue: ArrayQueue::new(APPLY_QUEUE),
            spare: ArrayQueue::new(SPARE_BUFFERS),
            waker: transport.waker(),
            fencing,
            transport_kind,
            engine_parked: AtomicBool::new(false),
            engine_tid: AtomicU32::new(0),
            realtime_priority: AtomicU8::new(0),
            stop: AtomicBool::new(false),
            stopped: Mutex::new(None),
            status: Mutex::new(NodeStatus {
                id,
                role: Role::Follower,
                term: replica.term(),
                leader: None,
                commit: 0,
                last_index: replica.last_index(),
                applied: 0,
                recovering: replica.is_recovering(),
                voters_lost: 0,
                fencing: FencingCounts::default(),
                transport: TransportKind::Auto,
            }),
            applied: AtomicU64::new(0),
            metrics: Metrics::default(),
            max_payload,
            speculation: Speculation::default(),
            leading: AtomicBool::new(false),
            data_loss_request: AtomicU8::new(DATA_LOSS_NONE),
            data_loss_answer: Mutex::new(None),
            apply_thread: OnceLock::new(),
        });
        let mut threads = Vec::new();
        let apply = {
            let shared = shared.clone();
            thread::Builder::new()
                .name(format!("apus-apply-{id}"))
                .spawn(move || apply_loop(shared, sm))?
        };
        let _ = shared.apply_thread.set(apply.thread().clone());
        threads.push(apply);
        let (synced_tx, synced_rx) = mpsc::channel();
        let sync_tx = match (sync, config.fsync) {
            (Some(handle), policy) => {
                let (tx, rx) = mpsc::channel();
                let shared = shared.clone();
                threads.push(
                    thread::Builder::new()
                        .name(format!("apus-sync-{id}"))
                        .spawn(move || sync_loop(handle, policy, rx, synced_tx, shared))?,
                );
                Some(tx)
            }
            (None, _) => None,
        };
        let engine = Engine {
            replica,
            transport,
            shared: shared.clone(),
            pending: VecDeque::new(),
            retry: None,
            sync_tx,
            synced_rx,
            policy: config.poll,
            epoch,
            latency: metrics::latency_histogram(),
            events: Vec::with_capacity(64),
            last_status: None,
            last_publish: epoch,
            last_stalls: 0,
            realtime_dropped: false,
            last_pre_votes: 0,
            recovering_since: None,
            wake_retry: false,
            identity,
            rejoining: false,
        };
        threads.push(
            thread::Builder::new()
                .name(format!("apus-engine-{id}"))
                .spawn(move || engine.run())?,
        );
        Ok(Node {
            shared,
            threads,
            recovery,
            propose_timeout: DEFAULT_PROPOSE_TIMEOUT,
        })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.shared.id
    }

    /// What recovery found in `data_dir` at start.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// Sets how long [`propose`](Self::propose) waits (default 5 s).
    pub fn set_propose_timeout(&mut self, t: Duration) {
        self.propose_timeout = t;
    }

    /// Replicates `payload` and waits until it is committed and applied on
    /// this node; returns what the state machine's `apply` returned.
    pub fn propose(&self, payload: &[u8]) -> Result<Applied, ProposeError> {
        self.propose_entry(EntryKind::Data, 0, payload)
    }

    /// [`propose`](Self::propose) with an entry kind and connection id (for
    /// the interception library).
    pub fn propose_entry(
        &self,
        kind: EntryKind,
        conn: u64,
        payload: &[u8],
    ) -> Result<Applied, ProposeError> {
        self.propose_until(
            kind,
            conn,
            payload,
            Some(Instant::now() + self.propose_timeout),
        )
    }

    /// [`propose_entry`](Self::propose_entry) without a timeout: waits until
    /// the outcome is known. It returns `Ok` once the entry is applied here,
    /// and an error only when the entry is known never to commit
    /// (`NotLeader`, `TooLarge`, `Lost`) or the node stopped; never
    /// `Timeout`. For callers that must not act on an unknown outcome: the
    /// interception library, whose server must see exactly the input that
    /// commits.
    pub fn propose_resolved(
        &self,
        kind: EntryKind,
        conn: u64,
        payload: &[u8],
    ) -> Result<Applied, ProposeError> {
        let r = self.propose_until(kind, conn, payload, None);
        debug_assert!(r != Err(ProposeError::Timeout), "no deadline, no timeout");
        r
    }

    /// Whether a proposal of `len` payload bytes can be made at all.
    fn admit(&self, len: usize) -> Result<(), ProposeError> {
        if let Some(why) = self.stopped() {
            return Err(ProposeError::Stopped(why));
        }
        if len > self.shared.max_payload {
            return Err(ProposeError::TooLarge {
                len,
                max: self.shared.max_payload,
            });
        }
        Ok(())
    }

    fn propose_until(
        &self,
        kind: EntryKind,
        conn: u64,
        payload: &[u8],
        deadline: Option<Instant>,
    ) -> Result<Applied, ProposeError> {
        self.admit(payload.len())?;
        let waiter = Waiter::new();
        let req = Request {
            kind,
            conn,
            payload: self.shared.buffer_of(&[payload]),
            proposer: Proposer::Waiting(waiter.clone()),
        };
        if let Err((req, e)) = self.enqueue(req, deadline) {
            drop(req);
            return Err(e);
        }
        waiter.wait(deadline)
    }

    /// Queues `req` for the engine, waiting for room (until `deadline`).
    fn enqueue(
        &self,
        mut req: Request,
        deadline: Option<Instant>,
    ) -> Result<(), (Request, ProposeError)> {
        loop {
            match self.shared.queue.push(req) {
                Ok(()) => break,
                Err(back) => {
                    // Queue full: the engine is behind. Wait for room.
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err((back, ProposeError::Timeout));
                    }
                    if let Some(why) = self.stopped() {
                        return Err((back, ProposeError::Stopped(why)));
                    }
                    req = back;
                    self.shared.waker.wake();
                    thread::yield_now();
                }
            }
        }
        // Dekker-style hand-off with the engine's park (see Engine::idle).
        if self.shared.engine_parked.load(Ordering::SeqCst) {
            self.shared.waker.wake();
        }
        Ok(())
    }

    /// Proposes without waiting (output commit): returns the number of
    /// proposals submitted so far, this one included, for
    /// [`wait_submitted`](Self::wait_submitted). Once more than
    /// `max_uncommitted` payload bytes are submitted and unresolved, waits
    /// until they all are. The outcome is not reported per proposal: a
    /// submitted proposal that fails makes every later wait fail (the
    /// caller acted on input that did not commit). Errors here mean the
    /// proposal was not made.
    ///
    /// The payload is `parts` concatenated (a header and the bytes a server
    /// read, say): they are copied once, into a reused buffer, so the steady
    /// state allocates nothing per proposal.
    pub fn submit(
        &self,
        kind: EntryKind,
        conn: u64,
        parts: &[&[u8]],
        max_uncommitted: u64,
    ) -> Result<u64, ProposeError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        self.admit(len)?;
        let spec = &self.shared.speculation;
        let bytes = len as u64;
        if spec.outstanding() + bytes > max_uncommitted {
            // The bound on input a server may run ahead of its commits. A
            // failure shows at the caller's next wait.
            let _ = spec.wait(spec.submitted(), &self.shared.stop);
        }
        let req = Request {
            kind,
            conn,
            payload: self.shared.buffer_of(parts),
            proposer: Proposer::Submitted { bytes },
        };
        let target = spec.submit(bytes);
        if let Err((_, e)) = self.enqueue(req, None) {
            // Counted, never queued: it fails like one the engine drops.
            spec.withdraw(bytes);
            return Err(e);
        }
        Ok(target)
    }

    /// Waits until the first `target` submitted proposals are resolved
    /// (see [`submit`](Self::submit)); fails if any submitted proposal
    /// ever failed, or the node stopped with some unresolved.
    pub fn wait_submitted(&self, target: u64) -> Result<(), SpeculationLost> {
        self.shared.speculation.wait(target, &self.shared.stop)
    }

    /// Proposals submitted so far: [`wait_submitted`](Self::wait_submitted)
    /// with it waits for all of them.
    pub fn submitted(&self) -> u64 {
        self.shared.speculation.submitted()
    }

    /// Gives the engine thread the nice value `nice` (lowering it below 0
    /// needs root or `CAP_SYS_NICE`). For a node whose cores busy threads
    /// share, so that heartbeats and acks do not wait behind them: the
    /// interception library raises it above the server's threads. Measured
    /// on two cores: with a raised engine, `redis-benchmark -c 50` through
    /// a replicated Redis saw no spurious election; `apus node` under
    /// `cluster-test` committed slower (p50 702 us against 455 us: its own
    /// client threads waited), so the library does not do it by itself.
    pub fn set_engine_nice(&self, nice: i32) -> std::io::Result<()> {
        let tid = self.engine_tid()?;
        // SAFETY: setpriority on a thread of this process; no memory.
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs the engine thread under `SCHED_FIFO` at `priority` (1-99; needs
    /// root, `CAP_SYS_NICE` or an `RLIMIT_RTPRIO` that allows it), so that
    /// no thread of the server, however many are runnable, delays a
    /// heartbeat or an ack. Measured on two cores under
    /// `redis-benchmark -c 50` through a replicated Redis: with nice -10
    /// engines waited up to 200 ms for a core and the leader changed
    /// within seconds; realtime, none did.
    ///
    /// A realtime thread that never blocks would take its core from
    /// everything else, so the engine keeps the priority only while it
    /// behaves as an event handler: busy for more than
    /// [`REALTIME_BUSY_LIMIT`] without parking, it drops to the normal
    /// policy (its nice value, see [`set_engine_nice`](Self::set_engine_nice))
    /// and says so, and takes the priority back the next time it parks.
    /// While the replica leads, its engine runs at `priority + 1`: busy
    /// followers' engines at the same priority could otherwise keep it off
    /// both cores of a small host for longer than an election timeout.
    /// Meant for [`PollPolicy::Park`] only: an engine that spins never
    /// parks. Refused for the fabric and verbs transports, whose engines
    /// wake every 50 us to drive the provider even when idle (and dropped
    /// when `auto` settles on one of them).
    pub fn set_engine_realtime(&self, priority: u8) -> std::io::Result<()> {
        if !(1..=99).contains(&priority) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a realtime priority is 1-99, not {priority}"),
            ));
        }
        let running = TransportKind::from_code(self.shared.transport_kind.load(Ordering::Relaxed));
        if let Some(kind) = running.filter(|k| k.polls_for_progress()) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!(
                    "the {} transport polls for progress even when idle: a realtime engine \
                     would take the cores from the server",
                    kind.name()
                ),
            ));
        }
        // A leader's engine runs one above (see `Engine::role_priority`);
        // the engine moves itself on every role change from now on.
        self.shared
            .realtime_priority
            .store(priority, Ordering::Release);
        let leading = u8::from(self.is_leader());
        if let Err(e) = set_realtime(self.engine_tid()?, (priority + leading).min(99)) {
            self.shared.realtime_priority.store(0, Ordering::Release);
            return Err(e);
        }
        Ok(())
    }

    /// The engine thread's id, once it runs (waits up to a second).
    fn engine_tid(&self) -> std::io::Result<u32> {
        let since = Instant::now();
        loop {
            match self.shared.engine_tid.load(Ordering::Acquire) {
                0 if since.elapsed() < Duration::from_secs(1) => {
                    thread::sleep(Duration::from_millis(1));
                }
                0 => return Err(std::io::Error::other("the engine thread has not started")),
                tid => return Ok(tid),
            }
        }
    }

    /// Whether this node leads, as of the engine's last pass: one atomic
    /// load, for hot paths (a proposal made while it just stopped leading
    /// still fails in the engine).
    pub fn is_leader(&self) -> bool {
        self.shared.leading.load(Ordering::Acquire)
    }

    /// Submitted proposals whose outcome is not known yet.
    pub fn unresolved(&self) -> u64 {
        self.shared.speculation.unresolved()
    }

    /// Whether a submitted proposal has failed (in this run).
    pub fn speculation_lost(&self) -> Option<SpeculationLost> {
        self.shared.speculation.lost()
    }

    /// The node's current status.
    pub fn status(&self) -> NodeStatus {
        let mut s = self
            .shared
            .status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        s.applied = self.shared.applied.load(Ordering::Acquire);
        if let Some(f) = &self.shared.fencing {
            s.fencing = f();
        }
        s.transport = TransportKind::from_code(self.shared.transport_kind.load(Ordering::Relaxed))
            .unwrap_or(TransportKind::Auto);
        s
    }

    /// The operator accepts that this recovering replica's lost log is lost
    /// (see [`Replica::accept_data_loss`]; `apus recover
    /// --accept-data-loss`). Returns whether it was recovering; an error if
    /// the engine did not answer within `timeout` or stopped.
    pub fn accept_data_loss(&self, stand: bool, timeout: Duration) -> std::io::Result<bool> {
        let code = if stand {
            DATA_LOSS_STAND
        } else {
            DATA_LOSS_VOTE
        };
        self.shared
            .data_loss_answer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.shared.data_loss_request.store(code, Ordering::SeqCst);
        self.shared.waker.wake();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(was) = self
                .shared
                .data_loss_answer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                return Ok(was);
            }
            if let Some(why) = self.stopped() {
                return Err(std::io::Error::other(format!("the node stopped: {why}")));
            }
            if Instant::now() >= deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the engine did not take the request in time",
                ));
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Metrics (counters, latency).
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Why the node stopped, if it did (a fatal storage error, shutdown).
    pub fn stopped(&self) -> Option<String> {
        self.shared.stopped.lock().ok().and_then(|s| s.clone())
    }

    /// Stops every thread and waits for them. Proposals still waiting fail
    /// with [`ProposeError::Stopped`].
    pub fn shutdown(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.waker.wake();
        if let Some(t) = self.shared.apply_thread.get() {
            t.unpark();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

/// Reads a transport's fencing counters.
pub(crate) type FencingProbe = Box<dyn Fn() -> FencingCounts + Send + Sync>;

/// A transport as a node runs it.
pub(crate) struct OpenedTransport {
    pub(crate) transport: Box<dyn Transport + Send>,
    pub(crate) fencing: Option<FencingProbe>,
}

/// The transport the configuration names (with `auto`, the one that
/// negotiates it); `kind` holds the [`TransportKind::code`] of the one
/// running (0 while `auto` is still choosing).
fn open_transport(
    config: &ClusterConfig,
    id: NodeId,
    layout: apus_core::RegionLayout,
    region: Region,
    kind: Arc<AtomicU8>,
    identity: Arc<ReplicaIdentity>,
) -> Result<OpenedTransport, NodeError> {
    if config.transport == TransportKind::Auto {
        return crate::negotiate::start(config.clone(), id, layout, region, kind, identity);
    }
    let opened = open_concrete(config.transport, config, id, layout, region, identity)?;
    kind.store(config.transport.code(), Ordering::Relaxed);
    Ok(opened)
}

/// Opens the transport `config` names for replica `id`, with no engine, over
/// a fresh region laid out as the configuration says: for tools and
/// benchmarks that measure a transport alone. `auto` is refused (choosing
/// needs the other replicas' engines).
pub fn open_bare_transport(
    config: &ClusterConfig,
    id: NodeId,
) -> Result<(Box<dyn Transport + Send>, Region, apus_core::RegionLayout), NodeError> {
    let layout = config.engine_for(id)?.validate().map_err(|e| ConfigError {
        field: format!("engine.{}", e.field),
        reason: e.reason,
    })?;
    if config.transport == TransportKind::Auto {
        return Err(NodeError::Config(ConfigError {
            field: "cluster.transport".into(),
            reason: "a bare transport must be named (tcp, quic, fabric or verbs), not auto".into(),
        }));
    }
    let region = Region::new(layout.region_len());
    // A bare transport is a tool's: it keeps no identity.
    let anonymous = Arc::new(Anonymous(config.name.clone()));
    let opened = open_concrete(
        config.transport,
        config,
        id,
        layout,
        region.clone(),
        anonymous,
    )?;
    Ok((opened.transport, region, layout))
}

/// A transport whose fencing counters `read` reports.
#[cfg(any(feature = "fabric", feature = "verbs"))]
fn with_fencing(
    t: impl Transport + Send + 'static,
    read: impl Fn() -> FencingCounts + Send + Sync + 'static,
) -> OpenedTransport {
    OpenedTransport {
        transport: Box::new(t),
        fencing: Some(Box::new(read)),
    }
}

/// A concrete transport, if this build has it.
pub(crate) fn open_concrete(
    transport_kind: TransportKind,
    config: &ClusterConfig,
    id: NodeId,
    layout: apus_core::RegionLayout,
    region: Region,
    identity: Arc<dyn Identity>,
) -> Result<OpenedTransport, NodeError> {
    let identity = Some(identity);
    let transport: Box<dyn Transport + Send> = match transport_kind {
        #[cfg(feature = "verbs")]
        TransportKind::Verbs => {
            let v = config
                .verbs
                .as_ref()
                .expect("validated: verbs has its settings");
            let t = apus_rdma::RdmaTransport::start(
                apus_rdma::RdmaConfig {
                    me: id,
                    peers: config.replicas.iter().map(|r| r.address).collect(),
                    secret: config.secret.clone(),
                    layout,
                    device: apus_rdma::Selection {
                        device: v.device.clone(),
                        ..apus_rdma::Selection::default()
                    },
                    op_timeout: v.op_timeout,
                    identity,
                },
                region,
            )
            .map_err(|e| {
                NodeError::Config(ConfigError {
                    field: "cluster.transport".into(),
                    reason: e.to_string(),
                })
            })?;
            let stats = t.stats();
            return Ok(with_fencing(t, move || FencingCounts {
                fenced_writes: stats.fenced_writes.load(Ordering::Relaxed),
                revocations: stats.revocations.load(Ordering::Relaxed),
            }));
        }
        #[cfg(feature = "fabric")]
        TransportKind::Fabric => {
            let f = config
                .fabric
                .as_ref()
                .expect("validated: fabric has its settings");
            let t = apus_fabric::FabricTransport::start(
                apus_fabric::FabricConfig {
                    me: id,
                    peers: config.replicas.iter().map(|r| r.address).collect(),
                    secret: config.secret.clone(),
                    layout,
                    provider: f.provider.clone(),
                    domain: f.domain.clone(),
                    op_timeout: f.op_timeout,
                    identity,
                },
                region,
            )
            .map_err(|e| {
                NodeError::Config(ConfigError {
                    field: "cluster.provider".into(),
                    reason: e.to_string(),
                })
            })?;
            let stats = t.stats();
            return Ok(with_fencing(t, move || FencingCounts {
                fenced_writes: stats.fenced_writes.load(Ordering::Relaxed),
                revocations: stats.revocations.load(Ordering::Relaxed),
            }));
        }
        #[cfg(feature = "tcp")]
        TransportKind::Tcp => Box::new(apus_tcp::TcpTransport::start(
            apus_tcp::TcpConfig {
                me: id,
                peers: config.replicas.iter().map(|r| r.address).collect(),
                secret: config.secret.clone(),
                layout,
                op_timeout: config.op_timeout,
                identity,
            },
            region,
        )?),
        #[cfg(feature = "quic")]
        TransportKind::Quic => {
            let paths = config
                .tls
                .as_ref()
                .expect("validated: quic has certificates");
            let certs: Vec<&std::path::Path> = paths.certs.iter().map(|p| p.as_path()).collect();
            let tls = apus_tcp::quic::TlsConfig::load(&paths.ca, &certs, &paths.keys[id.index()])?;
            Box::new(apus_tcp::quic::QuicTransport::start(
                apus_tcp::quic::QuicConfig {
                    me: id,
                    peers: config.replicas.iter().map(|r| r.address).collect(),
                    layout,
                    tls,
                    op_timeout: config.op_timeout,
                    identity,
                },
                region,
            )?)
        }
        #[allow(unreachable_patterns)]
        other => {
            let _ = (id, layout, region, identity);
            return Err(NodeError::Config(ConfigError {
                field: "cluster.transport".into(),
                reason: format!(
                    "{other} is not compiled into this build: enable the apus feature `{other}`"
                ),
            }));
        }
    };
    Ok(OpenedTransport {
        transport,
        fencing: None,
    })
}

struct Engine {
    replica: Replica<NodeStore>,
    transport: Box<dyn Transport + Send>,
    shared: Arc<Shared>,
    /// Proposals in the log, waiting to commit, in index order.
    pending: VecDeque<(Index, Term, Proposer, Instant)>,
    /// A proposal the replica refused with backpressure, to retry first.
    retry: Option<Request>,
    sync_tx: Option<Sender<u64>>,
    synced_rx: Receiver<u64>,
    policy: PollPolicy,
    epoch: Instant,
    latency: hdrhistogram::Histogram<u64>,
    events: Vec<TransportEvent>,
    last_status: Option<NodeStatus>,
    last_publish: Instant,
    /// The realtime priority is dropped until the next park.
    realtime_dropped: bool,
    /// The engine's stall and pre-vote counts at the last publish.
    last_stalls: u64,
    last_pre_votes: u64,
    /// A wake of the speculation's waiters found its lock taken.
    wake_retry: bool,
    /// Since when the replica has been recovering with no leader, until it
    /// said so (`None` once said, or while not in that state).
    recovering_since: Option<Instant>,
    /// This replica's identity: handshakes may say it is a replacement.
    identity: Arc<ReplicaIdentity>,
    /// It rejoins as a replacement and has not caught up yet.
    rejoining: bool,
}

impl Engine {
    fn now(&self) -> Time {
        Time(self.epoch.elapsed().as_nanos() as u64)
    }

    fn run(mut self) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        self.shared.engine_tid.store(tid, Ordering::Release);
        let mut last_activity = Instant::now();
        let mut busy_since = None;
        let result = loop {
            if self.shared.stop.load(Ordering::SeqCst) {
                break Ok(());
            }
            match self.iterate() {
                Ok(true) => {
                    last_activity = Instant::now();
                    let since = *busy_since.get_or_insert(last_activity);
                    self.check_realtime(last_activity - since);
                }
                Ok(false) => {
                    busy_since = None;
                    if let Err(e) = self.idle(last_activity) {
                        break Err(e);
                    }
                }
                Err(e) => break Err(e),
            }
        };
        let why = match result {
            Ok(()) => "shut down".to_string(),
            Err(e) => {
                error!(node = %self.shared.id, error = %e, "engine stopped");
                e
            }
        };
        if let Ok(mut s) = self.shared.stopped.lock() {
            s.get_or_insert(why.clone());
        }
        let spec = &self.shared.speculation;
        for (_, _, p, _) in self.pending.drain(..) {
            p.fail(ProposeError::Stopped(why.clone()), spec);
        }
        if let Some(r) = self.retry.take() {
            r.proposer.fail(ProposeError::Stopped(why.clone()), spec);
        }
        while let Some(r) = self.shared.queue.pop() {
            r.proposer.fail(ProposeError::Stopped(why.clone()), spec);
        }
        self.shared.stop.store(true, Ordering::SeqCst);
        spec.wake();
        if let Some(t) = self.shared.apply_thread.get() {
            t.unpark();
        }
    }

    /// One pass; `Ok(true)` if anything happened.
    fn iterate(&mut self) -> Result<bool, String> {
        if self.wake_retry {
            self.wake_speculation();
        }
        let mut busy = self.take_proposals()?;
        self.transport
            .poll(&mut self.events)
            .map_err(|e| e.to_string())?;
        let now = self.now();
        // Before the engine reads anything a new connection delivered: its
        // handshake may have said this replica is a replacement.
        busy |= self.take_rejoin(now);
        busy |= !self.events.is_empty();
        for e in self.events.drain(..) {
            self.replica
                .handle_event(e, now)
                .map_err(|e| e.to_string())?;
        }
        while let Ok(token) = self.synced_rx.try_recv() {
            self.replica.handle_synced(token, now);
            busy = true;
        }
        busy |= self.take_data_loss_request(now);
        self.replica.poll(now).map_err(|e| e.to_string())?;
        self.note_rejoined()?;
        busy |= self.carry_out()?;
        busy |= self.take_events();
        busy |= self.hand_over_committed()?;
        self.publish_status();
        Ok(busy)
    }

    /// Wakes the server threads waiting for what was resolved, without ever
    /// waiting for one of them (see `Speculation::try_wake`): when one
    /// holds the lock, again on the next pass.
    fn wake_speculation(&mut self) {
        self.wake_retry = !self.shared.speculation.try_wake();
    }

    /// Carries out what a handshake said: this replica replaced an earlier
    /// incarnation (its data directory was wiped or swapped), so it rejoins
    /// as a non-voter until a leader has brought it up to date.
    fn take_rejoin(&mut self, now: Time) -> bool {
        if !self.identity.take_rejoin() {
            return false;
        }
        if self.replica.rejoin(now) {
            warn!(node = %self.shared.id, "rejoining as a non-voter: a peer knew an earlier incarnation of this replica");
        }
        self.rejoining = true;
        true
    }

    /// A replacement that caught up votes again, after a restart too.
    fn note_rejoined(&mut self) -> Result<(), String> {
        if self.rejoining && !self.replica.is_recovering() {
            self.identity
                .rejoined()
                .map_err(|e| format!("cannot save the identity: {e}"))?;
            self.rejoining = false;
        }
        Ok(())
    }

    /// Carries out an operator's [`Node::accept_data_loss`].
    fn take_data_loss_request(&mut self, now: Time) -> bool {
        let code = self
            .shared
            .data_loss_request
            .swap(DATA_LOSS_NONE, Ordering::SeqCst);
        if code == DATA_LOSS_NONE {
            return false;
        }
        let stand = code == DATA_LOSS_STAND;
        let was = self.replica.accept_data_loss(stand, now);
        if was {
            warn!(
                node = %self.shared.id,
                stand,
                "the operator accepted the loss of what this replica's restart lost: it {}",
                if stand { "votes and may stand for election" } else { "votes" }
            );
        }
        *self
            .shared
            .data_loss_answer
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(was);
        true
    }

    fn take_proposals(&mut self) -> Result<bool, String> {
        // Whether a request left the queue (in the log, or failed).
        let mut any = false;
        loop {
            let Some(req) = self.retry.take().or_else(|| self.shared.queue.pop()) else {
                return Ok(any);
            };
            match self.replica.propose(req.kind, req.conn, &req.payload) {
                Ok(p) => {
                    // The ring holds the entry now.
                    self.shared.recycle(req.payload);
                    self.shared
                        .metrics
                        .counters
                        .proposed
                        .fetch_add(1, Ordering::Relaxed);
                    self.pending
                        .push_back((p.index, p.term, req.proposer, Instant::now()));
                }
                Err(apus_core::ProposeError::Backpressure) => {
                    // Not progress: the engine may park until acks come
                    // (no spinning on a full ring).
                    self.retry = Some(req);
                    return Ok(any);
                }
                Err(apus_core::ProposeError::NotLeader { leader }) => {
                    self.shared
                        .metrics
                        .counters
                        .not_leader
                        .fetch_add(1, Ordering::Relaxed);
                    req.proposer
                        .fail(ProposeError::NotLeader { leader }, &self.shared.speculation);
                    self.wake_speculation();
                }
                Err(apus_core::ProposeError::TooLarge { len, max }) => {
                    req.proposer.fail(
                        ProposeError::TooLarge { len, max },
                        &self.shared.speculation,
                    );
                    self.wake_speculation();
                }
                Err(apus_core::ProposeError::Store(e)) => return Err(format!("storage: {e}")),
            }
            any = true;
        }
    }

    fn carry_out(&mut self) -> Result<bool, String> {
        let mut any = false;
        while let Some(a) = self.replica.next_action() {
            any = true;
            match a {
                Action::Post(op) => self.transport.post(op).map_err(|e| e.to_string())?,
                Action::SetLogWriter(w) => self
                    .transport
                    .set_log_writer(w)
                    .map_err(|e| e.to_string())?,
                Action::Sync { token } => match &self.sync_tx {
                    Some(tx) => tx.send(token).map_err(|_| "sync thread gone".to_string())?,
                    None => {
                        let now = self.now();
                        self.replica.handle_synced(token, now);
                    }
                },
            }
        }
        Ok(any)
    }

    fn take_events(&mut self) -> bool {
        let mut any = false;
        while let Some(e) = self.replica.next_event() {
            any = true;
            match e {
                Event::RoleChanged { role, term, leader } => {
                    info!(node = %self.shared.id, %role, term, leader = ?leader, "role changed");
                    self.realtime_for_role(role);
                    if role == Role::Candidate {
                        self.shared
                            .metrics
                            .counters
                            .elections
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                Event::VotersLost { voters: 0 } => {
                    info!(node = %self.shared.id, "enough voters kept their logs again");
                }
                Event::VotersLost { voters } => {
                    error!(
                        node = %self.shared.id,
                        lost = ?NodeSet(voters),
                        "a majority of the replicas lost their logs in a restart (memory mode): \
                         nobody can be elected, and entries committed only on them are lost; \
                         `apus status` shows the cluster, `apus recover --accept-data-loss` \
                         restarts it from the logs that survived"
                    );
                }
                Event::Committed { .. } => {}
            }
        }
        any
    }

    /// Moves committed entries to the apply thread while it has room.
    fn hand_over_committed(&mut self) -> Result<bool, String> {
        let mut any = false;
        // Someone waits for an entry handed over now: a proposer, a
        // replayed server (an entry proposed elsewhere), a stopping node.
        let mut wake = false;
        while self.shared.apply_queue.len() < self.shared.apply_queue.capacity() {
            let Some(e) = self.replica.next_committed().map_err(|e| e.to_string())? else {
                break;
            };
            any = true;
            let mut waiter = None;
            let mut proposed_here = false;
            while let Some(&(index, term, _, at)) = self.pending.front() {
                if index > e.index {
                    break;
                }
                let (_, _, p, _) = self.pending.pop_front().expect("front exists");
                if index == e.index && term == e.term {
                    let _ = self.latency.record(at.elapsed().as_nanos() as u64);
                    proposed_here = true;
                    match p {
                        Proposer::Waiting(w) => waiter = Some(w),
                        // Committed is all a submitter waits for: its
                        // server has the input already.
                        Proposer::Submitted { bytes } => {
                            self.shared.speculation.resolve(bytes, true);
                        }
                    }
                } else {
                    self.shared
                        .metrics
                        .counters
                        .lost
                        .fetch_add(1, Ordering::Relaxed);
                    p.fail(ProposeError::Lost, &self.shared.speculation);
                }
            }
            wake |= waiter.is_some() || !proposed_here;
            let item = ApplyItem {
                index: e.index,
                term: e.term,
                kind: e.kind,
                conn: e.conn,
                payload: self.shared.buffer_of(&[e.payload]),
                waiter,
                proposed_here,
            };
            if self.shared.apply_queue.push(item).is_err() {
                unreachable!("the engine is the only producer and checked for room");
            }
        }
        if any {
            self.wake_speculation();
        }
        if any && (wake || self.shared.apply_queue.len() >= APPLY_WAKE_AT) {
            self.wake_apply();
        }
        Ok(any)
    }

    fn wake_apply(&self) {
        if let Some(t) = self.shared.apply_thread.get() {
            self.shared
                .metrics
                .counters
                .apply_wakeups
                .fetch_add(1, Ordering::Relaxed);
            t.unpark();
        }
    }

    fn publish_status(&mut self) {
        let r = &self.replica;
        let now = NodeStatus {
            id: self.shared.id,
            role: r.role(),
            term: r.term(),
            leader: r.leader(),
            commit: r.commit_index(),
            last_index: r.last_index(),
            applied: 0,
            recovering: r.is_recovering(),
            voters_lost: r.voters_lost(),
            fencing: FencingCounts::default(),
            transport: TransportKind::Auto,
        };
        if self.last_status.as_ref() != Some(&now) {
            self.shared
                .leading
                .store(now.role == Role::Leader, Ordering::Release);
            // Never waits for a reader (a server thread the realtime
            // engine's own priority may keep off the cores): published on
            // a later pass instead.
            match self.shared.status.try_lock() {
                Ok(mut s) => {
                    *s = now.clone();
                    self.last_status = Some(now);
                }
                Err(std::sync::TryLockError::Poisoned(p)) => {
                    *p.into_inner() = now.clone();
                    self.last_status = Some(now);
                }
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
        }
        if self.last_publish.elapsed() >= PUBLISH_EVERY {
            self.last_publish = Instant::now();
            self.shared.metrics.publish_commit_latency(&self.latency);
            self.report_counters();
        }
    }

    /// Says what the engine's own counters show an operator should know.
    fn report_counters(&mut self) {
        let c = self.replica.counters();
        if c.stalls > self.last_stalls {
            warn!(
                node = %self.shared.id,
                stalls = c.stalls - self.last_stalls,
                "the engine ran half an election timeout late (descheduled or starved of \
                 CPU); peers' silence was judged only once it had caught up"
            );
        }
        if c.pre_votes > self.last_pre_votes {
            info!(
                node = %self.shared.id,
                pre_votes = c.pre_votes - self.last_pre_votes,
                term = self.replica.term(),
                "no leader heard for an election timeout: asked the peers for a pre-vote"
            );
        }
        self.last_stalls = c.stalls;
        self.last_pre_votes = c.pre_votes;
        self.report_recovering();
    }

    /// A recovering replica that no leader synchronises says so, once: a
    /// majority of the cluster may have lost its memory, which only the
    /// replicas that kept theirs can tell (they stand, and it refuses).
    fn report_recovering(&mut self) {
        if !self.replica.is_recovering() || self.replica.leader().is_some() {
            self.recovering_since = Some(Instant::now());
            return;
        }
        let Some(since) = self.recovering_since else {
            return;
        };
        if since.elapsed() >= RECOVERING_WARN_AFTER {
            self.recovering_since = None;
            warn!(
                node = %self.shared.id,
                waited_s = since.elapsed().as_secs(),
                "this replica lost its log in a restart (memory mode) and no leader has \
                 resent it: if a majority of the replicas restarted, the cluster lost what \
                 they held; `apus status` tells, `apus recover --accept-data-loss` restarts it"
            );
        }
    }

    /// Drops the realtime priority of an engine busy for `busy` without
    /// parking (see [`Node::set_engine_realtime`]).
    fn check_realtime(&mut self, busy: Duration) {
        if self.drop_realtime_if_polling() {
            return;
        }
        if self.realtime_dropped
            || busy <= REALTIME_BUSY_LIMIT
            || self.shared.realtime_priority.load(Ordering::Relaxed) == 0
        {
            return;
        }
        self.realtime_dropped = true;
        match set_realtime(0, 0) {
            Ok(()) => warn!(
                node = %self.shared.id,
                busy_ms = busy.as_millis() as u64,
                "the engine ran without parking for longer than a realtime thread may: \
                 it runs under the normal policy until it parks again"
            ),
            Err(e) => {
                error!(node = %self.shared.id, error = %e, "cannot drop the engine's realtime priority")
            }
        }
    }

    /// A transport with manual progress (fabric, verbs) wakes its engine
    /// every 50 us even when idle: realtime, three such engines on two
    /// cores would take them from the servers (seen: redis over fabric, engines and servers
    /// starved, leaders changed under load). Such an engine gives up the
    /// priority for good, once `auto` has settled on it.
    fn drop_realtime_if_polling(&mut self) -> bool {
        if self.shared.realtime_priority.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let running = TransportKind::from_code(self.shared.transport_kind.load(Ordering::Relaxed));
        if !running.is_some_and(TransportKind::polls_for_progress) {
            return false;
        }
        self.shared.realtime_priority.store(0, Ordering::Relaxed);
        self.realtime_dropped = false;
        match set_realtime(0, 0) {
            Ok(()) => info!(
                node = %self.shared.id,
                "the transport polls for progress even when idle: the engine runs under \
                 the normal policy, not SCHED_FIFO"
            ),
            Err(e) => {
                error!(node = %self.shared.id, error = %e, "cannot drop the engine's realtime priority")
            }
        }
        true
    }

    /// The realtime priority for the current role: a leader's one above
    /// its followers'. Followers' engines are busy for tens of milliseconds
    /// at a time under bulk load, and two of them at the leader's priority
    /// on two cores kept it from running for longer than the followers
    /// wait before they elect another (seen: e2e redis, "the engine ran
    /// half an election timeout late" on the leader, then an election). A
    /// follower starved by its leader excuses its own stall; nobody excuses
    /// a starved leader's silence.
    fn role_priority(&self, role: Role) -> u8 {
        let base = self.shared.realtime_priority.load(Ordering::Relaxed);
        if base == 0 {
            return 0;
        }
        (base + u8::from(role == Role::Leader)).min(99)
    }

    /// Moves the engine to its role's realtime priority.
    fn realtime_for_role(&mut self, role: Role) {
        let priority = self.role_priority(role);
        if priority == 0 || self.realtime_dropped {
            return;
        }
        if let Err(e) = set_realtime(0, priority) {
            warn!(node = %self.shared.id, error = %e, "cannot change the engine's realtime priority");
        }
    }

    /// Takes the realtime priority back on parking, if it was dropped.
    fn restore_realtime(&mut self) {
        if self.drop_realtime_if_polling() || !self.realtime_dropped {
            return;
        }
        self.realtime_dropped = false;
        let priority = self.role_priority(self.replica.role());
        if let Err(e) = set_realtime(0, priority) {
            warn!(node = %self.shared.id, error = %e, "cannot take the engine's realtime priority back");
            self.shared.realtime_priority.store(0, Ordering::Relaxed);
        }
    }

    /// Nothing happened: spin or block, as the policy says.
    fn idle(&mut self, last_activity: Instant) -> Result<(), String> {
        if self.policy.spins(last_activity.elapsed()) {
            std::hint::spin_loop();
            return Ok(());
        }
        let now = self.now();
        let until = self.replica.next_timeout();
        let timeout = until.saturating_since(now).min(Duration::from_millis(100));
        if timeout.is_zero() {
            return Ok(());
        }
        // Announce the park, then look once more: a proposer that pushed
        // before seeing the flag is caught here, one after it wakes us.
        self.shared.engine_parked.store(true, Ordering::SeqCst);
        // A proposal refused for backpressure waits for acks, not for the
        // queue: proposals behind it cannot go in either.
        let waits_for_acks = self.retry.is_some();
        if (waits_for_acks || self.shared.queue.is_empty())
            && !self.shared.stop.load(Ordering::SeqCst)
        {
            self.restore_realtime();
            self.transport.wait(timeout).map_err(|e| e.to_string())?;
        }
        self.shared.engine_parked.store(false, Ordering::SeqCst);
        Ok(())
    }
}

fn apply_loop<S: StateMachine>(shared: Arc<Shared>, mut sm: S) {
    loop {
        let mut any = false;
        while let Some(item) = shared.apply_queue.pop() {
            any = true;
            let entry = Entry {
                index: item.index,
                term: item.term,
                kind: item.kind,
                conn: item.conn,
                payload: &item.payload,
                proposed_here: item.proposed_here,
            };
            let output = sm.apply(&entry);
            shared.recycle(item.payload);
            shared.applied.store(item.index, Ordering::Release);
            shared
                .metrics
                .counters
                .applied
                .fetch_add(1, Ordering::Relaxed);
            if let Some(w) = item.waiter {
                shared
                    .metrics
                    .counters
                    .committed
                    .fetch_add(1, Ordering::Relaxed);
                w.complete(Ok(Applied {
                    index: item.index,
                    output,
                }));
            }
        }
        if !any {
            if shared.stop.load(Ordering::SeqCst) {
                return;
            }
            thread::park_timeout(APPLY_IDLE_WAIT);
        }
    }
}

/// Puts thread `tid` (0: the calling one) under `SCHED_FIFO` at
/// `priority`, or back under the normal policy for 0.
fn set_realtime(tid: u32, priority: u8) -> std::io::Result<()> {
    let policy = if priority == 0 {
        libc::SCHED_OTHER
    } else {
        libc::SCHED_FIFO
    };
    let param = libc::sched_param {
        sched_priority: i32::from(priority),
    };
    // SAFETY: `param` is a valid sched_param for the call's duration; the
    // target is this process's thread (or the caller).
    let r = unsafe { libc::sched_setscheduler(tid as libc::pid_t, policy, &param) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn sync_loop(
    handle: SyncHandle,
    policy: Fsync,
    requests: Receiver<u64>,
    done: Sender<u64>,
    shared: Arc<Shared>,
) {
    while let Ok(mut token) = requests.recv() {
        if policy == Fsync::Batch {
            // Let the group grow: everything appended meanwhile rides along.
            thread::sleep(Fsync::BATCH_WINDOW);
        }
        while let Ok(t) = requests.try_recv() {
            token = token.max(t);
        }
        let result = handle.flush().and_then(|s| {
            if policy == Fsync::Never {
                Ok(())
            } else {
                s.sync()
            }
        });
        match result {
            Ok(()) => {
                shared
                    .metrics
                    .counters
                    .syncs
                    .fetch_add(1, Ordering::Relaxed);
                if done.send(token).is_err() {
                    return;
                }
                shared.waker.wake();
            }
            Err(e) => {
                // Without durable storage the node must not acknowledge
                // anything more: stop it.
                warn!(node = %shared.id, error = %e, "sync failed: stopping the node");
                if let Ok(mut s) = shared.stopped.lock() {
                    s.get_or_insert(format!("sync failed: {e}"));
                }
                shared.stop.store(true, Ordering::SeqCst);
                shared.waker.wake();
                return;
            }
        }
    }
}
