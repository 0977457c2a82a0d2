//! The verbs layer: a [`Device`] (an opened RDMA device, one port, its
//! RoCE v2 GID, a protection domain and one completion queue), memory
//! registration with the access a peer gets, and RC [`QueuePair`]s with
//! one-sided RDMA WRITE (inline when small), READ and atomic
//! compare-and-swap, selective signaling, and remote access switched on
//! and off per queue pair (Mu-style fencing).
//!
//! libibverbs is loaded at run time (through sideway): without it, or
//! without a device, [`Device::open`] fails at once with an error that
//! says so and which transports to use instead.

use std::sync::Arc;

use sideway::ibverbs::AccessFlags;
use sideway::ibverbs::address::{AddressHandleAttribute, Gid, GidType};
use sideway::ibverbs::completion::{BasicCompletionQueue, WorkCompletionStatus};
use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, Mtu, PortState};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, PostSendGuard, QueuePair as _, QueuePairAttribute, QueuePairAttributeMask,
    QueuePairState, SetInlineData, SetScatterGatherEntry, WorkRequestFlags,
};

/// Work requests a queue pair's send queue holds. The engine keeps at most
/// `max_inflight_writes` (default 32) writes per follower in flight plus a
/// few reads and slot writes; 256 leaves room for unsignaled requests, which
/// hold their slot until a later signaled one completes.
pub const SEND_QUEUE_DEPTH: u32 = 256;
/// Every this many unsignaled requests one is signaled, so the send queue
/// (256) never fills with requests whose completion was not asked for.
pub const SIGNAL_INTERVAL: u32 = 32;
/// Inline data asked for per queue pair: entries, acks and votes below this
/// size go in the work request itself (no DMA read of the source, no
/// registration needed for it). Devices that offer less get what they offer.
pub const INLINE_WANTED: u32 = 256;
/// Outstanding RDMA READs and atomics per queue pair (both directions).
const READ_ATOMIC_DEPTH: u8 = 16;
/// Local ACK timeout exponent: 4.096 us * 2^14 = 67 ms per try.
const ACK_TIMEOUT: u8 = 14;
/// Transport retries before a request fails with a retry error: a dead peer
/// shows as failed after about 7 * 67 ms.
const RETRY_COUNT: u8 = 7;

/// Why a verbs call failed.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    /// No RDMA device (or no libibverbs) on this host.
    #[error(
        "no RDMA device found ({0}): transport = \"verbs\" needs an RDMA NIC (or Soft-RoCE); \
         use transport = \"tcp\" (any host), transport = \"fabric\" with provider \"tcp;ofi_rxm\" \
         or \"shm\", or transport = \"auto\" to pick the best one available"
    )]
    NoDevice(String),
    /// The configured device does not exist.
    #[error("no RDMA device named {name:?} (devices here: {available})")]
    DeviceMissing {
        /// The name asked for.
        name: String,
        /// The devices this host has.
        available: String,
    },
    /// The port is not active (link down, or no such port).
    #[error("RDMA device {device} port {port}: {why}")]
    Port {
        /// The device.
        device: String,
        /// The port number.
        port: u8,
        /// What is wrong with it.
        why: String,
    },
    /// A verbs call failed.
    #[error("{call}: {detail}")]
    Verbs {
        /// The call.
        call: &'static str,
        /// The error.
        detail: String,
    },
}

fn verbs(call: &'static str) -> impl FnOnce(String) -> RdmaError {
    move |detail| RdmaError::Verbs { call, detail }
}

/// Which device, port and GID to use.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// The device (`rxe0`, `mlx5_0`); the first one if `None`.
    pub device: Option<String>,
    /// The port, from 1; 1 if 0.
    pub port: u8,
    /// The GID index; if `None`, a RoCE v2 GID holding an IPv4 address,
    /// else any RoCE v2 GID, else index 0 (InfiniBand).
    pub gid_index: Option<u8>,
}

/// The names of the RDMA devices on this host.
pub fn device_names() -> Result<Vec<String>, RdmaError> {
    let list = DeviceList::new().map_err(|e| RdmaError::NoDevice(e.to_string()))?;
    Ok(list.iter().map(|d| d.name()).collect())
}

/// What peers may do through a registration or a queue pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// RDMA READ.
    pub remote_read: bool,
    /// RDMA WRITE.
    pub remote_write: bool,
    /// Atomics (compare-and-swap).
    pub remote_atomic: bool,
}

impl Access {
    /// Nothing remote.
    pub const NONE: Access = Access {
        remote_read: false,
        remote_write: false,
        remote_atomic: false,
    };
    /// Everything remote.
    pub const ALL: Access = Access {
        remote_read: true,
        remote_write: true,
        remote_atomic: true,
    };

    fn flags(self) -> AccessFlags {
        let mut f = AccessFlags::LocalWrite;
        if self.remote_read {
            f |= AccessFlags::RemoteRead;
        }
        if self.remote_write {
            f |= AccessFlags::RemoteWrite;
        }
        if self.remote_atomic {
            f |= AccessFlags::RemoteAtomic;
        }
        f
    }
}

/// An opened device port with a default protection domain and one
/// completion queue.
pub struct Device {
    name: String,
    gid: Gid,
    atomics: bool,
    default: Domain,
    // Dropped last: everything above belongs to it.
    ctx: Arc<DeviceContext>,
}

/// A protection domain: registrations and queue pairs that can use each
/// other. A peer's key works only through a queue pair of the domain its
/// registration lives in, which is how a transport keeps the log ring out of
/// reach of every queue pair but the one it fences.
pub struct Domain {
    pd: Arc<ProtectionDomain>,
    cq: Arc<BasicCompletionQueue>,
    port: u8,
    gid_index: u8,
    mtu: Mtu,
    read_atomic: u8,
}

impl std::fmt::Debug for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domain")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.name)
            .field("port", &self.default.port)
            .field("gid_index", &self.default.gid_index)
            .field("gid", &self.gid.to_string())
            .finish_non_exhaustive()
    }
}

fn is_ipv4_mapped(gid: &Gid) -> bool {
    gid.raw[..10].iter().all(|&b| b == 0) && gid.raw[10..12] == [0xff, 0xff]
}

impl Device {
    /// Opens the selected device and port, with a completion queue of
    /// `cq_depth` entries.
    pub fn open(sel: &Selection, cq_depth: u32) -> Result<Device, RdmaError> {
        let list = DeviceList::new().map_err(|e| RdmaError::NoDevice(e.to_string()))?;
        let names: Vec<String> = list.iter().map(|d| d.name()).collect();
        if names.is_empty() {
            return Err(RdmaError::NoDevice(
                "libibverbs lists no devices".to_string(),
            ));
        }
        let device =
            match &sel.device {
                Some(want) => list.iter().find(|d| &d.name() == want).ok_or_else(|| {
                    RdmaError::DeviceMissing {
                        name: want.clone(),
                        available: names.join(", "),
                    }
                })?,
                None => list.iter().next().expect("non-empty"),
            };
        let name = device.name();
        let ctx = device
            .open()
            .map_err(|e| e.to_string())
            .map_err(verbs("ibv_open_device"))?;
        let port = sel.port.max(1);
        let port_err = |why: String| RdmaError::Port {
            device: name.clone(),
            port,
            why,
        };
        let pattr = ctx
            .query_port(port)
            .map_err(|e| port_err(format!("cannot query it: {e}")))?;
        if pattr.port_state() != PortState::Active {
            return Err(port_err(format!(
                "not active ({:?}): is the link up?",
                pattr.port_state()
            )));
        }
        let gid_index = match sel.gid_index {
            Some(i) => i,
            None => {
                let table = ctx
                    .query_gid_table()
                    .map_err(|e| e.to_string())
                    .map_err(verbs("ibv_query_gid_table"))?;
                let ours: Vec<_> = table
                    .iter()
                    .filter(|e| e.port_num() == u32::from(port) && !e.gid().is_zero())
                    .collect();
                let pick = ours
                    .iter()
                    .find(|e| e.gid_type() == GidType::RoceV2 && is_ipv4_mapped(&e.gid()))
                    .or_else(|| ours.iter().find(|e| e.gid_type() == GidType::RoceV2))
                    .or_else(|| ours.iter().find(|e| e.gid_type() == GidType::InfiniBand));
                match pick {
                    Some(e) => u8::try_from(e.gid_index())
                        .map_err(|_| port_err("GID index above 255".into()))?,
                    None => {
                        return Err(port_err(
                            "no usable GID (a RoCE device needs an IP address on its netdev)"
                                .into(),
                        ));
                    }
                }
            }
        };
        let gid = ctx
            .query_gid(port, gid_index.into())
            .map_err(|e| port_err(format!("GID {gid_index}: {e}")))?;
        let dattr = ctx
            .query_device()
            .map_err(|e| e.to_string())
            .map_err(verbs("ibv_query_device"))?;
        let read_atomic = dattr
            .max_qp_rd_atom()
            .clamp(1, i32::from(READ_ATOMIC_DEPTH)) as u8;
        let atomics = !matches!(
            dattr.atomic_capability(),
            sideway::ibverbs::device_context::AtomicCapability::None
        );
        let pd = ctx
            .alloc_pd()
            .map_err(|e| e.to_string())
            .map_err(verbs("ibv_alloc_pd"))?;
        let cq = ctx
            .create_cq_builder()
            .setup_cqe(cq_depth.max(16))
            .build()
            .map_err(|e| e.to_string())
            .map_err(verbs("ibv_create_cq"))?;
        let mtu = pattr.active_mtu();
        tracing::info!(device = %name, port, gid_index, gid = %gid, ?mtu, atomics, "RDMA device open");
        Ok(Device {
            name,
            gid,
            atomics,
            default: Domain {
                pd,
                cq,
                port,
                gid_index,
                mtu,
                read_atomic,
            },
            ctx,
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The GID peers address this port by.
    pub fn gid(&self) -> [u8; 16] {
        self.gid.raw
    }

    /// Whether the device does remote compare-and-swap.
    pub fn atomics(&self) -> bool {
        self.atomics
    }

    /// A new protection domain on this device, sharing its completion queue.
    pub fn domain(&self) -> Result<Domain, RdmaError> {
        let pd = self
            .ctx
            .alloc_pd()
            .map_err(|e| e.to_string())
            .map_err(verbs("ibv_alloc_pd"))?;
        Ok(Domain {
            pd,
            cq: self.default.cq.clone(),
            ..self.default
        })
    }

    /// [`Domain::register`] in the device's default domain.
    ///
    /// # Safety
    /// As for [`Domain::register`].
    pub unsafe fn register(
        &self,
        addr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<Region, RdmaError> {
        // SAFETY: the caller keeps Domain::register's contract.
        unsafe { self.default.register(addr, len, access) }
    }

    /// [`Domain::queue_pair`] in the device's default domain.
    pub fn queue_pair(&self, remote: Access) -> Result<QueuePair, RdmaError> {
        self.default.queue_pair(remote)
    }

    /// Collects finished work requests into `out`; returns how many.
    pub fn poll(&self, out: &mut Vec<WorkCompletion>) -> usize {
        let mut n = 0;
        while let Ok(poller) = self.default.cq.start_poll() {
            for wc in poller {
                let status = wc.status();
                out.push(WorkCompletion {
                    wr_id: wc.wr_id(),
                    status: if status == WorkCompletionStatus::Success as u32 {
                        Ok(())
                    } else {
                        Err(CompletionError(status))
                    },
                });
                n += 1;
            }
        }
        n
    }
}

impl Domain {
    /// Registers `len` bytes at `addr` for local use and what `access`
    /// lets peers do. Deregistered when the last handle is dropped.
    ///
    /// # Safety
    /// The memory stays valid, and is not moved, while the registration lives.
    pub unsafe fn register(
        &self,
        addr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<Region, RdmaError> {
        // SAFETY: per this function's contract.
        let mr = unsafe { self.pd.reg_mr(addr as usize, len, access.flags()) }
            .map_err(|e| e.to_string())
            .map_err(verbs("ibv_reg_mr"))?;
        Ok(Region {
            addr: addr as u64,
            len,
            mr,
        })
    }

    /// A new RC queue pair on this device's completion queue, in INIT,
    /// letting its peer do what `remote` allows.
    pub fn queue_pair(&self, remote: Access) -> Result<QueuePair, RdmaError> {
        // Ask for the inline size we want; a device that has less refuses
        // the queue pair, so step down.
        let mut last = String::new();
        for inline in [INLINE_WANTED, 128, 64, 0] {
            let built = self
                .pd
                .create_qp_builder()
                .setup_max_send_wr(SEND_QUEUE_DEPTH)
                .setup_max_recv_wr(1)
                .setup_max_send_sge(1)
                .setup_max_inline_data(inline)
                .setup_send_cq(self.cq.clone())
                .setup_recv_cq(self.cq.clone())
                .build();
            match built {
                Ok(qp) => {
                    let mut qp = QueuePair {
                        qp,
                        psn: random_psn(),
                        inline,
                        unsignaled: 0,
                        port: self.port,
                        gid_index: self.gid_index,
                        mtu: self.mtu,
                        read_atomic: self.read_atomic,
                    };
                    let mut attr = QueuePairAttribute::new();
                    attr.setup_state(QueuePairState::Init)
                        .setup_pkey_index(0)
                        .setup_port(self.port)
                        .setup_access_flags(remote.flags());
                    qp.qp
                        .modify(&attr)
                        .map_err(|e| e.to_string())
                        .map_err(verbs("ibv_modify_qp(INIT)"))?;
                    return Ok(qp);
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(RdmaError::Verbs {
            call: "ibv_create_qp",
            detail: last,
        })
    }
}

fn random_psn() -> u32 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    u32::from_le_bytes(b) & 0x00ff_ffff
}

/// A registered memory range.
#[derive(Clone)]
pub struct Region {
    addr: u64,
    len: usize,
    mr: Arc<MemoryRegion>,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("addr", &self.addr)
            .field("len", &self.len)
            .field("rkey", &self.rkey())
            .finish()
    }
}

impl Region {
    /// The address peers name for its first byte.
    pub fn addr(&self) -> u64 {
        self.addr
    }
    /// Its length.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The key local work requests use.
    pub fn lkey(&self) -> u32 {
        self.mr.lkey()
    }
    /// The key peers use.
    pub fn rkey(&self) -> u32 {
        self.mr.rkey()
    }
}

/// A failed work request's status (`ibv_wc_status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompletionError(pub u32);

impl CompletionError {
    /// The peer refused the access: its queue pair or registration does not
    /// allow it (fencing), or the key is not valid.
    pub fn remote_access(self) -> bool {
        self.0 == WorkCompletionStatus::RemoteAccessError as u32
            || self.0 == WorkCompletionStatus::RemoteInvalidRequestError as u32
    }

    /// Flushed: an earlier request on the queue pair failed and the queue
    /// pair is in the error state.
    pub fn flushed(self) -> bool {
        self.0 == WorkCompletionStatus::WorkRequestFlushedError as u32
    }
}

impl std::fmt::Display for CompletionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.0 {
            x if x == WorkCompletionStatus::RemoteAccessError as u32 => "remote access error",
            x if x == WorkCompletionStatus::RemoteInvalidRequestError as u32 => {
                "remote invalid request"
            }
            x if x == WorkCompletionStatus::RemoteOperationError as u32 => "remote operation error",
            x if x == WorkCompletionStatus::WorkRequestFlushedError as u32 => "flushed",
            x if x == WorkCompletionStatus::RetryCounterExceededError as u32 => {
                "retry counter exceeded (peer unreachable)"
            }
            x if x == WorkCompletionStatus::LocalProtectionError as u32 => "local protection error",
            x if x == WorkCompletionStatus::LocalLengthError as u32 => "local length error",
            _ => "work request failed",
        };
        write!(f, "{name} (ibv_wc_status {})", self.0)
    }
}

/// A finished work request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkCompletion {
    /// The id it was posted with.
    pub wr_id: u64,
    /// Its result.
    pub status: Result<(), CompletionError>,
}

/// What a peer needs to connect its queue pair to ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpEndpoint {
    /// Queue pair number.
    pub qpn: u32,
    /// First packet sequence number this side sends.
    pub psn: u32,
    /// The port's GID.
    pub gid: [u8; 16],
}

/// An RC queue pair.
pub struct QueuePair {
    qp: BasicQueuePair,
    psn: u32,
    inline: u32,
    unsignaled: u32,
    port: u8,
    gid_index: u8,
    mtu: Mtu,
    read_atomic: u8,
}

impl std::fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePair")
            .field("qpn", &self.qp.qp_number())
            .field("inline", &self.inline)
            .finish_non_exhaustive()
    }
}

// SAFETY: a queue pair is used from one thread at a time (`&mut self` on
// every post); libibverbs queue pairs may be used from any thread.
unsafe impl Send for QueuePair {}

impl QueuePair {
    /// What the peer needs to connect to this queue pair.
    pub fn endpoint(&self, device: &Device) -> QpEndpoint {
        QpEndpoint {
            qpn: self.qp.qp_number(),
            psn: self.psn,
            gid: device.gid.raw,
        }
    }

    /// The inline size this queue pair got.
    pub fn max_inline(&self) -> u32 {
        self.inline
    }

    /// Connects to the peer's queue pair: INIT -> RTR -> RTS.
    pub fn connect(&mut self, remote: &QpEndpoint) -> Result<(), RdmaError> {
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(self.mtu)
            .setup_dest_qp_num(remote.qpn)
            .setup_rq_psn(remote.psn)
            .setup_max_dest_read_atomic(self.read_atomic)
            .setup_min_rnr_timer(12);
        let mut ah = AddressHandleAttribute::new();
        ah.setup_dest_lid(0)
            .setup_port(self.port)
            .setup_service_level(0)
            .setup_grh_src_gid_index(self.gid_index)
            .setup_grh_dest_gid(&Gid { raw: remote.gid })
            .setup_grh_hop_limit(64);
        attr.setup_address_vector(&ah);
        self.qp
            .modify(&attr)
            .map_err(|e| e.to_string())
            .map_err(verbs("ibv_modify_qp(RTR)"))?;
        let mut attr = QueuePairAttribute::new();
        attr.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(self.psn)
            .setup_timeout(ACK_TIMEOUT)
            .setup_retry_cnt(RETRY_COUNT)
            .setup_rnr_retry(7)
            .setup_max_read_atomic(self.read_atomic);
        self.qp
            .modify(&attr)
            .map_err(|e| e.to_string())
            .map_err(verbs("ibv_modify_qp(RTS)"))
    }

    /// Changes what the peer may do through this queue pair. Requests it
    /// sends afterwards that need a right it no longer has fail at the
    /// peer with a remote access error: the fence of a deposed writer.
    pub fn set_remote_access(&mut self, access: Access) -> Result<(), RdmaError> {
        let mut attr = QueuePairAttribute::new();
        attr.setup_access_flags(access.flags());
        self.qp
            .modify(&attr)
            .map_err(|e| e.to_string())
            .map_err(verbs("ibv_modify_qp(access flags)"))
    }

    /// Whether the queue pair is in the error state (after a failed
    /// request). Asks the device: the state cached in the queue pair only
    /// changes with our own `ibv_modify_qp`.
    pub fn failed(&self) -> bool {
        self.qp
            .query(QueuePairAttributeMask::State)
            .map_or(true, |(attr, _)| attr.state() == QueuePairState::Error)
    }

    /// Whether this request is to be signaled: asked for, or the interval
    /// since the last signaled one is reached.
    fn signal(&mut self, wanted: bool) -> WorkRequestFlags {
        self.unsignaled += 1;
        if wanted || self.unsignaled >= SIGNAL_INTERVAL {
            self.unsignaled = 0;
            WorkRequestFlags::Signaled
        } else {
            WorkRequestFlags::none()
        }
    }

    /// Posts an RDMA WRITE of `len` bytes at `src` to `remote_addr`, inline
    /// when it fits. Unsignaled requests (`signaled = false`) complete
    /// silently; a later signaled one on this queue pair covers them.
    /// Returns whether it was signaled.
    ///
    /// # Safety
    /// `src..src+len` lies in `local` and stays valid until the request
    /// completes (inline data is copied at once).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn post_write(
        &mut self,
        wr_id: u64,
        src: *const u8,
        len: usize,
        local: &Region,
        remote_addr: u64,
        rkey: u32,
        signaled: bool,
    ) -> Result<bool, RdmaError> {
        let flags = self.signal(signaled);
        let inline = len <= self.inline as usize;
        let mut guard = self.qp.start_post_send();
        let wr = guard
            .construct_wr(
                wr_id,
                if inline {
                    flags | WorkRequestFlags::Inline
                } else {
                    flags
                },
            )
            .setup_write(rkey, remote_addr);
        if inline {
            // SAFETY: per the contract, `src` holds `len` readable bytes.
            wr.setup_inline_data(unsafe { std::slice::from_raw_parts(src, len) });
        } else {
            // SAFETY: the source lies in `local`'s registration.
            unsafe { wr.setup_sge(local.lkey(), src as u64, len as u32) };
        }
        guard
            .post()
            .map_err(|e| e.to_string())
            .map_err(verbs("ibv_post_send(WRITE)"))?;
        Ok(flags.contains(WorkRequestFlags::Signaled))
    }

    /// Posts an RDMA READ of `len` bytes at `remote_addr` into `dst`
    /// (always signaled: the data is there only at its completion).
    ///
    /// # Safety
    /// `dst..dst+len` lies in `local` and stays valid until completion.
    pub unsafe fn post_read(
        &mut self,
        wr_id: u64,
        dst: *mut u8,
        len: usize,
        local: &Region,
        remote_addr: u64,
        rkey: u32,
    ) -> Result<(), RdmaError> {
        let flags = self.signal(true);
        let mut guard = self.qp.start_post_send();
        let wr = guard
            .construct_wr(wr_id, flags)
            .setup_read(rkey, remote_addr);
        // SAFETY: the destination lies in `local`'s registration.
        unsafe { wr.setup_sge(local.lkey(), dst as u64, len as u32) };
        guard
            .post()
            .map_err(|e| e.to_string())
            .map_err(verbs("ibv_post_send(READ)"))
    }

    /// Posts an atomic compare-and-swap of the aligned `u64` at
    /// `remote_addr`; the value found lands in `*result` (always signaled).
    ///
    /// # Safety
    /// `result` is 8-aligned, lies in `local` and stays valid until completion.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn post_compare_and_swap(
        &mut self,
        wr_id: u64,
        result: *mut u64,
        local: &Region,
        remote_addr: u64,
        rkey: u32,
        expected: u64,
        new: u64,
    ) -> Result<(), RdmaError> {
        let flags = self.signal(true);
        let mut guard = self.qp.start_post_send();
        let wr = guard.construct_wr(wr_id, flags).setup_atomic_compare_swap(
            rkey,
            remote_addr,
            expected,
            new,
        );
        // SAFETY: the result word lies in `local`'s registration.
        unsafe { wr.setup_sge(local.lkey(), result as u64, 8) };
        guard
            .post()
            .map_err(|e| e.to_string())
            .map_err(verbs("ibv_post_send(CAS)"))
    }
}
