//! The libfabric layer: an [`Endpoint`] of one provider (fabric, domain,
//! completion queue, and either a reliable-datagram endpoint with an address
//! vector or, for connection-oriented providers, a listening endpoint with
//! one connected endpoint per peer), memory registration ([`MemoryRegion`])
//! with per-registration access and a fresh key, one-sided writes, reads and
//! compare-and-swaps addressed by a peer, region address and key, and
//! completion polling.
//!
//! Reliable-datagram (`FI_EP_RDM`) providers reach a peer as soon as its
//! name is inserted ([`Endpoint::insert_peer`]). Connection-oriented
//! (`FI_EP_MSG`) providers, such as `tcp` and `verbs`, need a connection per
//! peer: one side dials the other's listening endpoint presenting a token
//! ([`Endpoint::dial_peer`]), the other accepts only a token it expects
//! ([`Endpoint::await_peer`]), and [`Endpoint::link`] says when it is up.
//!
//! The library is loaded at run time (`dlopen`): without it, or without the
//! provider, or with a provider that has no RMA, opening an endpoint fails
//! with an error that says what to install or choose.
//!
//! Providers with manual progress (tcp, rxm, shm) move data only while the
//! endpoints are polled: both the writer and the target must call
//! [`Endpoint::poll`] for a write to land and complete.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, c_void};
use std::ptr;

use crate::sys::{self, *};

/// A peer's address in this endpoint's address vector.
pub type PeerAddr = u64;

/// Where a one-sided operation goes: a peer, an address in its registered
/// region (`MemoryRegion::base` + offset) and the region's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Remote {
    /// The peer, as `Endpoint::insert_peer` returned it.
    pub peer: PeerAddr,
    /// The address in the peer's region.
    pub addr: u64,
    /// The peer region's key.
    pub key: u64,
}

/// Where a peer's connection stands (always `Up` on reliable-datagram
/// endpoints once inserted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Dialed, or waiting for the peer to dial; nothing may be posted yet.
    Connecting,
    /// Operations may be posted.
    Up,
    /// Refused, failed or shut down; remove it and start again.
    Down(String),
}

/// Which pairs of operations to one target the provider keeps in order
/// (the earlier one takes effect first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ordering {
    /// A read after a read.
    pub read_after_read: bool,
    /// A read after a write (it sees the write).
    pub read_after_write: bool,
    /// A write after a read (the read does not see it).
    pub write_after_read: bool,
    /// A write after a write.
    pub write_after_write: bool,
}

/// Why a libfabric operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    /// libfabric itself is not installed.
    #[error("{0}")]
    LibraryMissing(&'static str),
    /// No provider of that name here.
    #[error(
        "libfabric has no provider {provider:?} on this host (providers with RMA here: {available}); \
         set cluster.provider to one of those, or use transport = \"tcp\""
    )]
    ProviderMissing {
        /// The provider asked for.
        provider: String,
        /// Providers that do offer RMA on reliable endpoints.
        available: String,
    },
    /// The provider exists but offers no one-sided RMA on reliable endpoints.
    #[error(
        "libfabric provider {provider:?} has no one-sided RMA (FI_RMA with FI_READ/FI_WRITE) on \
         reliable endpoints; providers with RMA here: {available}"
    )]
    NoRma {
        /// The provider asked for.
        provider: String,
        /// Providers that do offer it.
        available: String,
    },
    /// A libfabric call failed.
    #[error("{call}: {text} (libfabric error {code})")]
    Call {
        /// The call.
        call: &'static str,
        /// Its return code.
        code: isize,
        /// libfabric's description.
        text: String,
    },
    /// An argument the layer refuses (for example an oversized address).
    #[error("{0}")]
    Invalid(String),
}

fn check(lib: &Lib, call: &'static str, code: isize) -> Result<(), FabricError> {
    if code >= 0 {
        Ok(())
    } else {
        Err(FabricError::Call {
            call,
            code,
            text: lib.error_text(code),
        })
    }
}

/// The capabilities the transport needs.
const RMA_CAPS: u64 = FI_RMA | FI_READ | FI_WRITE | FI_REMOTE_READ | FI_REMOTE_WRITE;

/// What an endpoint asks of its provider beyond RMA.
#[derive(Clone, Copy, Debug)]
struct Wanted {
    /// `FI_EP_RDM` or `FI_EP_MSG`.
    ep_type: u32,
    /// Remote compare-and-swap (`FI_ATOMIC`).
    atomics: bool,
    /// Per-target ordering (`FI_ORDER_*` bits).
    order: u64,
}

/// What is asked for, best first: atomics and full ordering, then less.
/// The transport restores whatever ordering the provider does not give.
/// Reliable datagrams come before connections: a provider that has both
/// (`verbs` under rxm) is configured by name (`verbs;ofi_rxm` or `verbs`).
const WANTED: [Wanted; 12] = {
    const FULL: u64 = FI_ORDER_RAR | FI_ORDER_RAW | FI_ORDER_WAR | FI_ORDER_WAW;
    const NO_WAR: u64 = FI_ORDER_RAR | FI_ORDER_RAW | FI_ORDER_WAW;
    const LEVELS: [(bool, u64); 6] = [
        (true, FULL),
        (true, NO_WAR),
        (false, FULL),
        (false, NO_WAR),
        (true, 0),
        (false, 0),
    ];
    let mut out = [Wanted {
        ep_type: FI_EP_RDM,
        atomics: false,
        order: 0,
    }; 12];
    let mut i = 0;
    while i < 12 {
        let (atomics, order) = LEVELS[i % 6];
        out[i] = Wanted {
            ep_type: if i < 6 { FI_EP_RDM } else { FI_EP_MSG },
            atomics,
            order,
        };
        i += 1;
    }
    out
};

/// The least that is asked of each endpoint type.
const LEAST: [Wanted; 2] = [WANTED[5], WANTED[11]];

/// Calls `fi_getinfo` for `provider` (any provider if `None`), with RMA
/// (and what `wanted` adds) required or not; the caller frees the list.
fn getinfo(
    lib: &Lib,
    provider: Option<&str>,
    rma: Option<Wanted>,
) -> Result<*mut fi_info, FabricError> {
    // SAFETY: fi_dupinfo(NULL) allocates zeroed hints with every attribute
    // structure allocated (fi_allocinfo).
    let hints = unsafe { (lib.dupinfo)(ptr::null()) };
    if hints.is_null() {
        return Err(FabricError::Invalid("fi_allocinfo failed".into()));
    }
    // SAFETY: `hints` and its attribute structures were just allocated by
    // libfabric; strings put in them are malloc'd so fi_freeinfo frees them.
    unsafe {
        let h = &mut *hints;
        (*h.domain_attr).mr_mode = MR_MODES_SUPPORTED;
        (*h.domain_attr).threading = FI_THREAD_DOMAIN;
        if let Some(w) = rma {
            (*h.ep_attr).type_ = w.ep_type;
            if w.ep_type == FI_EP_MSG {
                // Registrations are shared by every peer's endpoint: one
                // bound to a single endpoint would not do.
                (*h.domain_attr).mr_mode &= !FI_MR_ENDPOINT;
            }
            h.caps = RMA_CAPS | if w.atomics { FI_ATOMIC } else { 0 };
            // A write completes once it is visible in the target's memory:
            // the engine counts a completed write as landed (memory mode).
            (*h.tx_attr).op_flags = FI_DELIVERY_COMPLETE;
            (*h.tx_attr).msg_order = w.order;
            (*h.rx_attr).msg_order = w.order;
        }
        if let Some(p) = provider {
            let c = CString::new(p).map_err(|_| FabricError::Invalid("provider name".into()))?;
            (*h.fabric_attr).prov_name = libc::strdup(c.as_ptr());
        }
    }
    let mut info: *mut fi_info = ptr::null_mut();
    // SAFETY: valid hints; `info` receives a list we free later.
    let r = unsafe {
        (lib.getinfo)(
            FI_VERSION_1_17,
            ptr::null(),
            ptr::null(),
            0,
            hints,
            &mut info,
        )
    };
    // SAFETY: `hints` came from fi_dupinfo.
    unsafe { (lib.freeinfo)(hints) };
    if r != 0 || info.is_null() {
        return Err(FabricError::Call {
            call: "fi_getinfo",
            code: r as isize,
            text: lib.error_text(r as isize),
        });
    }
    Ok(info)
}

/// Provider names in an info list, without duplicates.
fn provider_names(lib: &Lib, mut info: *mut fi_info) -> Vec<String> {
    let head = info;
    let mut names = Vec::new();
    while !info.is_null() {
        // SAFETY: a list from fi_getinfo: valid nodes with fabric attributes.
        let (next, name) = unsafe {
            let i = &*info;
            let name = if i.fabric_attr.is_null() || (*i.fabric_attr).prov_name.is_null() {
                String::new()
            } else {
                CStr::from_ptr((*i.fabric_attr).prov_name)
                    .to_string_lossy()
                    .into_owned()
            };
            (i.next, name)
        };
        if !name.is_empty() && !names.contains(&name) {
            names.push(name);
        }
        info = next;
    }
    if !head.is_null() {
        // SAFETY: the list came from fi_getinfo.
        unsafe { (lib.freeinfo)(head) };
    }
    names
}

/// The first node of `list` whose provider is exactly `provider` (asking for
/// `udp` may also offer `udp;ofi_rxd`, which is not what was configured), as
/// a list of its own; frees the rest.
fn take_exact(
    lib: &Lib,
    list: *mut fi_info,
    provider: &str,
    domain: Option<&str>,
) -> Option<*mut fi_info> {
    let mut found = None;
    let mut node = list;
    while !node.is_null() {
        // SAFETY: a list from fi_getinfo: valid nodes with fabric attributes.
        let (next, name, dom) = unsafe {
            let i = &*node;
            let name = if i.fabric_attr.is_null() || (*i.fabric_attr).prov_name.is_null() {
                None
            } else {
                Some(CStr::from_ptr((*i.fabric_attr).prov_name))
            };
            let dom = if i.domain_attr.is_null() || (*i.domain_attr).name.is_null() {
                None
            } else {
                Some(CStr::from_ptr((*i.domain_attr).name))
            };
            (i.next, name, dom)
        };
        let domain_ok = domain.is_none_or(|d| dom.is_some_and(|n| n.to_bytes() == d.as_bytes()));
        if domain_ok && name.is_some_and(|n| n.to_bytes() == provider.as_bytes()) {
            // SAFETY: fi_dupinfo copies one node (its `next` is not followed).
            found = Some(unsafe { (lib.dupinfo)(node) }).filter(|d| !d.is_null());
            break;
        }
        node = next;
    }
    // SAFETY: the list came from fi_getinfo.
    unsafe { (lib.freeinfo)(list) };
    found
}

/// The providers on this host that offer RMA on reliable endpoints
/// (datagram or connected).
pub fn rma_providers() -> Result<Vec<String>, FabricError> {
    let lib = sys::lib().map_err(FabricError::LibraryMissing)?;
    let mut names = Vec::new();
    for w in LEAST {
        for n in getinfo(lib, None, Some(w))
            .map(|info| provider_names(lib, info))
            .unwrap_or_default()
        {
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    Ok(names)
}

/// What peers may do with a registered region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Access {
    /// Peers may read it (`FI_REMOTE_READ`).
    pub remote_read: bool,
    /// Peers may write it (`FI_REMOTE_WRITE`).
    pub remote_write: bool,
}

impl Access {
    /// Local use only: the source of writes, the destination of reads.
    pub const LOCAL: Access = Access {
        remote_read: false,
        remote_write: false,
    };
    /// Peers may write (and, for compare-and-swap, read) it.
    pub const REMOTE_WRITE: Access = Access {
        remote_read: true,
        remote_write: true,
    };
    /// Peers may only read it.
    pub const REMOTE_READ: Access = Access {
        remote_read: true,
        remote_write: false,
    };
}

/// A fresh random key: a peer that was never told it cannot guess it, and a
/// revoked key is not handed out again.
fn random_key(mask: u64) -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // No entropy source: fall back to the clock; keys stay unique
        // because `issued` refuses repeats.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        b = t.to_le_bytes();
    }
    u64::from_le_bytes(b) & mask
}

/// A registered memory region. It belongs to its endpoint's domain: it
/// stays registered until [`Endpoint::deregister`] or the endpoint's drop.
#[derive(Debug)]
pub struct MemoryRegion {
    mr: *mut fid_mr,
    /// The key a peer names in its RMA operations.
    pub key: u64,
    /// The address a peer names for offset 0 of the region: the virtual
    /// address under `FI_MR_VIRT_ADDR`, otherwise 0.
    pub base: u64,
    desc: *mut c_void,
}

// SAFETY: a registration is a handle into its endpoint's domain (opened
// with FI_THREAD_DOMAIN); it is only used through that endpoint's `&mut`
// methods, so moving it to another thread with the endpoint is sound.
unsafe impl Send for MemoryRegion {}

impl MemoryRegion {
    /// The local descriptor passed with operations on this memory.
    pub fn desc(&self) -> *mut c_void {
        self.desc
    }
}

/// A finished operation: its context, and `Err` with libfabric's error text
/// if it failed.
#[derive(Debug, PartialEq, Eq)]
pub struct Completion {
    /// The context the operation was posted with.
    pub context: u64,
    /// The result.
    pub result: Result<(), String>,
}

/// A connection to one peer of a connection-oriented endpoint.
#[derive(Debug)]
struct Link {
    /// Null while waiting for the peer to dial.
    ep: *mut fid_ep,
    state: LinkState,
}

/// The endpoint of one provider, with its fabric, domain and completion
/// queue, and either a reliable-datagram endpoint with an address vector or
/// a listening endpoint, an event queue and one endpoint per peer. Not
/// thread-safe: one thread (the engine's) owns it.
pub struct Endpoint {
    lib: &'static Lib,
    info: *mut fi_info,
    fabric: *mut fid_fabric,
    domain: *mut fid_domain,
    cq: *mut fid_cq,
    /// Reliable datagrams: the address vector and the one endpoint.
    av: *mut fid_av,
    ep: *mut fid_ep,
    /// Connections: the event queue, the listening endpoint, the peers'
    /// connections by address, and the tokens of the ones awaited.
    eq: *mut fid_eq,
    pep: *mut fid_pep,
    links: HashMap<PeerAddr, Link>,
    awaited: HashMap<u64, PeerAddr>,
    next_link: PeerAddr,
    mr_mode: i32,
    provider: String,
    /// Live memory registrations, closed before the domain.
    mrs: Vec<*mut fid_mr>,
    /// Every key this endpoint handed out: never reused, so a revoked key
    /// stays revoked.
    issued: HashSet<u64>,
    key_mask: u64,
    wanted: Wanted,
}

// SAFETY: the endpoint's objects are opened with FI_THREAD_DOMAIN: they may
// be used from any thread as long as one thread at a time does, which
// `&mut self` on every operation guarantees.
unsafe impl Send for Endpoint {}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("provider", &self.provider)
            .field("mr_mode", &self.mr_mode)
            .finish_non_exhaustive()
    }
}

/// Closes a fid if it is set.
///
/// # Safety
/// `f` is null or a live fid.
unsafe fn close_fid(f: *mut fid) {
    if !f.is_null() {
        // SAFETY: per the contract.
        unsafe {
            ((*(*f).ops).close)(f);
        }
    }
}

impl Endpoint {
    /// Opens an endpoint of `provider` (`shm`, `tcp;ofi_rxm`,
    /// `verbs;ofi_rxm`) with one-sided RMA, in the provider's first domain.
    pub fn open(provider: &str) -> Result<Endpoint, FabricError> {
        Endpoint::open_in(provider, None)
    }

    /// As [`Endpoint::open`], in the named domain (for the tcp provider, a
    /// network interface such as `lo`).
    pub fn open_in(provider: &str, domain: Option<&str>) -> Result<Endpoint, FabricError> {
        let lib = sys::lib().map_err(FabricError::LibraryMissing)?;
        let exact = WANTED.iter().find_map(|&w| {
            getinfo(lib, Some(provider), Some(w))
                .ok()
                .and_then(|list| take_exact(lib, list, provider, domain))
                .map(|i| (i, w))
        });
        let (info, wanted) = match exact {
            Some(i) => i,
            None => {
                let available = rma_providers()?.join(", ");
                if let Some(d) = domain
                    && available.split(", ").any(|p| p == provider)
                {
                    return Err(FabricError::Invalid(format!(
                        "libfabric provider {provider:?} has no domain {d:?} with RMA on this host"
                    )));
                }
                let exists = getinfo(lib, Some(provider), None)
                    .map(|i| provider_names(lib, i).iter().any(|n| n == provider))
                    .unwrap_or(false);
                return Err(if exists {
                    FabricError::NoRma {
                        provider: provider.into(),
                        available,
                    }
                } else {
                    FabricError::ProviderMissing {
                        provider: provider.into(),
                        available,
                    }
                });
            }
        };
        let mut e = Endpoint {
            lib,
            info,
            fabric: ptr::null_mut(),
            domain: ptr::null_mut(),
            cq: ptr::null_mut(),
            av: ptr::null_mut(),
            ep: ptr::null_mut(),
            eq: ptr::null_mut(),
            pep: ptr::null_mut(),
            links: HashMap::new(),
            awaited: HashMap::new(),
            next_link: 1,
            // SAFETY: the first node of a fi_getinfo list, with attributes.
            mr_mode: unsafe { (*(*info).domain_attr).mr_mode },
            provider: provider.into(),
            mrs: Vec::new(),
            issued: HashSet::new(),
            // SAFETY: as above.
            key_mask: match unsafe { (*(*info).domain_attr).mr_key_size } {
                n @ 1..8 => (1u64 << (8 * n)) - 1,
                _ => u64::MAX,
            },
            wanted,
        };
        // On error, Drop closes whatever was opened.
        e.build()?;
        Ok(e)
    }

    fn build(&mut self) -> Result<(), FabricError> {
        let lib = self.lib;
        // SAFETY: every pointer below comes from libfabric and is used as its
        // ops table prescribes; out-pointers are checked by the return codes.
        unsafe {
            let info = &mut *self.info;
            check(
                lib,
                "fi_fabric",
                (lib.fabric)(info.fabric_attr, &mut self.fabric, ptr::null_mut()) as isize,
            )?;
            check(
                lib,
                "fi_domain",
                ((*(*self.fabric).ops).domain)(
                    self.fabric,
                    self.info,
                    &mut self.domain,
                    ptr::null_mut(),
                ) as isize,
            )?;
            let mut cq_attr = fi_cq_attr {
                size: 1024,
                flags: 0,
                format: FI_CQ_FORMAT_CONTEXT,
                wait_obj: FI_WAIT_NONE,
                signaling_vector: 0,
                wait_cond: 0,
                wait_set: ptr::null_mut(),
            };
            check(
                lib,
                "fi_cq_open",
                ((*(*self.domain).ops).cq_open)(
                    self.domain,
                    &mut cq_attr,
                    &mut self.cq,
                    ptr::null_mut(),
                ) as isize,
            )?;
            if self.wanted.ep_type == FI_EP_MSG {
                return self.listen();
            }
            let mut av_attr = fi_av_attr {
                type_: FI_AV_TABLE,
                rx_ctx_bits: 0,
                count: 16,
                ep_per_node: 0,
                name: ptr::null(),
                map_addr: ptr::null_mut(),
                flags: 0,
            };
            check(
                lib,
                "fi_av_open",
                ((*(*self.domain).ops).av_open)(
                    self.domain,
                    &mut av_attr,
                    &mut self.av,
                    ptr::null_mut(),
                ) as isize,
            )?;
            check(
                lib,
                "fi_endpoint",
                ((*(*self.domain).ops).endpoint)(
                    self.domain,
                    self.info,
                    &mut self.ep,
                    ptr::null_mut(),
                ) as isize,
            )?;
            let ep_fid = &mut (*self.ep).fid as *mut fid;
            check(
                lib,
                "fi_ep_bind(cq)",
                ((*(*ep_fid).ops).bind)(ep_fid, &mut (*self.cq).fid, FI_TRANSMIT | FI_RECV)
                    as isize,
            )?;
            check(
                lib,
                "fi_ep_bind(av)",
                ((*(*ep_fid).ops).bind)(ep_fid, &mut (*self.av).fid, 0) as isize,
            )?;
            check(
                lib,
                "fi_enable",
                ((*(*ep_fid).ops).control)(ep_fid, FI_ENABLE, ptr::null_mut()) as isize,
            )?;
        }
        Ok(())
    }

    /// Opens the event queue and the listening endpoint of a
    /// connection-oriented provider.
    fn listen(&mut self) -> Result<(), FabricError> {
        let lib = self.lib;
        // SAFETY: as in `build`: libfabric objects used through their ops
        // tables, out-pointers checked by the return codes.
        unsafe {
            let mut eq_attr = fi_eq_attr {
                size: 64,
                flags: 0,
                wait_obj: FI_WAIT_NONE,
                signaling_vector: 0,
                wait_set: ptr::null_mut(),
            };
            check(
                lib,
                "fi_eq_open",
                ((*(*self.fabric).ops).eq_open)(
                    self.fabric,
                    &mut eq_attr,
                    &mut self.eq,
                    ptr::null_mut(),
                ) as isize,
            )?;
            check(
                lib,
                "fi_passive_ep",
                ((*(*self.fabric).ops).passive_ep)(
                    self.fabric,
                    self.info,
                    &mut self.pep,
                    ptr::null_mut(),
                ) as isize,
            )?;
            let pep_fid = &mut (*self.pep).fid as *mut fid;
            check(
                lib,
                "fi_pep_bind(eq)",
                ((*(*pep_fid).ops).bind)(pep_fid, &mut (*self.eq).fid, 0) as isize,
            )?;
            check(
                lib,
                "fi_listen",
                ((*(*self.pep).cm).listen)(self.pep) as isize,
            )?;
        }
        Ok(())
    }

    /// Whether peers are reached over connections (`FI_EP_MSG`: use
    /// [`Endpoint::dial_peer`] and [`Endpoint::await_peer`]) rather than by
    /// address ([`Endpoint::insert_peer`]).
    pub fn connection_oriented(&self) -> bool {
        self.wanted.ep_type == FI_EP_MSG
    }

    /// The provider this endpoint uses.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// Whether the provider offers remote compare-and-swap.
    pub fn atomics(&self) -> bool {
        self.wanted.atomics
    }

    /// The `FI_ORDER_*` bits the provider guarantees between operations to
    /// one target (read/write after read/write).
    pub fn ordering(&self) -> Ordering {
        Ordering {
            read_after_read: self.wanted.order & FI_ORDER_RAR != 0,
            read_after_write: self.wanted.order & FI_ORDER_RAW != 0,
            write_after_read: self.wanted.order & FI_ORDER_WAR != 0,
            write_after_write: self.wanted.order & FI_ORDER_WAW != 0,
        }
    }

    /// The largest operation the provider moves at once.
    pub fn max_msg_size(&self) -> usize {
        // SAFETY: `info` is the endpoint's own fi_info, with attributes.
        unsafe { (*(*self.info).ep_attr).max_msg_size }
    }

    /// The memory registration modes the provider asked for.
    pub fn mr_mode(&self) -> i32 {
        self.mr_mode
    }

    /// This endpoint's address, for peers to insert (or, on a
    /// connection-oriented endpoint, to dial).
    pub fn name(&self) -> Result<Vec<u8>, FabricError> {
        let mut buf = vec![0u8; MAX_NAME];
        let mut len = buf.len();
        // SAFETY: `buf` has room for `len` bytes; getname writes at most
        // that. The listening endpoint and the endpoint share the cm layout.
        let r = unsafe {
            if self.pep.is_null() {
                ((*(*self.ep).cm).getname)(&mut (*self.ep).fid, buf.as_mut_ptr().cast(), &mut len)
            } else {
                ((*(*self.pep).cm).getname)(&mut (*self.pep).fid, buf.as_mut_ptr().cast(), &mut len)
            }
        };
        check(self.lib, "fi_getname", r as isize)?;
        buf.truncate(len);
        Ok(buf)
    }

    /// The state of the connection to `peer` (`Up` for every inserted peer
    /// of a reliable-datagram endpoint).
    pub fn link(&self, peer: PeerAddr) -> LinkState {
        if !self.connection_oriented() {
            return LinkState::Up;
        }
        match self.links.get(&peer) {
            Some(l) => l.state.clone(),
            None => LinkState::Down("no such peer".into()),
        }
    }

    fn refuse_unless_connected(&self, call: &str) -> Result<(), FabricError> {
        if self.connection_oriented() {
            Ok(())
        } else {
            Err(FabricError::Invalid(format!(
                "{call}: provider {} is not connection-oriented (use insert_peer)",
                self.provider
            )))
        }
    }

    /// Opens an endpoint for a new connection, bound to the completion and
    /// event queues, with `addr` as its context.
    ///
    /// # Safety
    /// `info` is this endpoint's info or one from a connection request.
    unsafe fn open_link(
        &mut self,
        info: *mut fi_info,
        addr: PeerAddr,
    ) -> Result<*mut fid_ep, FabricError> {
        let lib = self.lib;
        let mut ep: *mut fid_ep = ptr::null_mut();
        // SAFETY: per the contract; the domain, CQ and EQ are live.
        unsafe {
            check(
                lib,
                "fi_endpoint",
                ((*(*self.domain).ops).endpoint)(self.domain, info, &mut ep, addr as *mut c_void)
                    as isize,
            )?;
            let f = &mut (*ep).fid as *mut fid;
            let r = ((*(*f).ops).bind)(f, &mut (*self.cq).fid, FI_TRANSMIT | FI_RECV);
            let r = if r == 0 {
                ((*(*f).ops).bind)(f, &mut (*self.eq).fid, 0)
            } else {
                r
            };
            let r = if r == 0 {
                ((*(*f).ops).control)(f, FI_ENABLE, ptr::null_mut())
            } else {
                r
            };
            if r != 0 {
                close_fid(f);
                check(lib, "fi_ep_bind/fi_enable", r as isize)?;
            }
        }
        Ok(ep)
    }

    /// Connection-oriented endpoints: starts connecting to the peer
    /// listening at `name`, presenting `token` (which the peer must expect,
    /// see [`Endpoint::await_peer`]). Operations may be posted once
    /// [`Endpoint::link`] says `Up`.
    pub fn dial_peer(&mut self, name: &[u8], token: u64) -> Result<PeerAddr, FabricError> {
        self.refuse_unless_connected("dial_peer")?;
        check_name(name)?;
        let addr = self.next_link;
        // SAFETY: this endpoint's own info.
        let ep = unsafe { self.open_link(self.info, addr)? };
        let token_bytes = token.to_le_bytes();
        // SAFETY: `ep` is live and enabled; `name` is an address of the
        // provider's format (as the peer's getname gave it) and the
        // connection data is 8 bytes, both copied by the call.
        let r = unsafe {
            ((*(*ep).cm).connect)(
                ep,
                name.as_ptr().cast(),
                token_bytes.as_ptr().cast(),
                token_bytes.len(),
            )
        };
        if r != 0 {
            // SAFETY: `ep` is live and not shared.
            unsafe { close_fid(&mut (*ep).fid) };
            check(self.lib, "fi_connect", r as isize)?;
        }
        self.next_link += 1;
        self.links.insert(
            addr,
            Link {
                ep,
                state: LinkState::Connecting,
            },
        );
        Ok(addr)
    }

    /// Connection-oriented endpoints: the address the peer that dials with
    /// `token` will have. A connection request with any other token is
    /// rejected; each token is accepted once.
    pub fn await_peer(&mut self, token: u64) -> Result<PeerAddr, FabricError> {
        self.refuse_unless_connected("await_peer")?;
        if self.awaited.contains_key(&token) {
            return Err(FabricError::Invalid(
                "that connection token is already awaited".into(),
            ));
        }
        let addr = self.next_link;
        self.next_link += 1;
        self.links.insert(
            addr,
            Link {
                ep: ptr::null_mut(),
                state: LinkState::Connecting,
            },
        );
        self.awaited.insert(token, addr);
        Ok(addr)
    }

    /// Adds a peer's endpoint name; returns the address to post to.
    /// Reliable-datagram endpoints only.
    pub fn insert_peer(&mut self, name: &[u8]) -> Result<PeerAddr, FabricError> {
        check_name(name)?;
        if self.connection_oriented() {
            return Err(FabricError::Invalid(format!(
                "provider {} is connection-oriented: peers are dialed or awaited, not inserted",
                self.provider
            )));
        }
        let mut addr: fi_addr_t = 0;
        // SAFETY: one address of the provider's format, as getname gave it.
        let n = unsafe {
            ((*(*self.av).ops).insert)(
                self.av,
                name.as_ptr().cast(),
                1,
                &mut addr,
                0,
                ptr::null_mut(),
            )
        };
        if n != 1 {
            return Err(FabricError::Call {
                call: "fi_av_insert",
                code: n.min(0) as isize,
                text: if n < 0 {
                    self.lib.error_text(n as isize)
                } else {
                    "the address was not inserted".into()
                },
            });
        }
        Ok(addr)
    }

    /// Removes a peer (inserted, dialed or awaited); operations to it fail
    /// from then on, and a connection is closed.
    pub fn remove_peer(&mut self, peer: PeerAddr) -> Result<(), FabricError> {
        if self.connection_oriented() {
            self.awaited.retain(|_, &mut a| a != peer);
            if let Some(l) = self.links.remove(&peer)
                && !l.ep.is_null()
            {
                // SAFETY: the link's endpoint is live and closed once; its
                // pending operations are flushed or dropped by the provider
                // (the transport discards completions of earlier links).
                unsafe { close_fid(&mut (*l.ep).fid) };
            }
            return Ok(());
        }
        let mut addr = peer;
        // SAFETY: one address this AV handed out.
        let r = unsafe { ((*(*self.av).ops).remove)(self.av, &mut addr, 1, 0) };
        check(self.lib, "fi_av_remove", r as isize)
    }

    /// Registers `len` bytes at `addr` for local use and for what `access`
    /// lets peers do, under a key never handed out before by this endpoint.
    ///
    /// # Safety
    /// The memory must stay valid, and not be freed or moved, until the
    /// returned region is deregistered or the endpoint dropped.
    pub unsafe fn register(
        &mut self,
        addr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<MemoryRegion, FabricError> {
        // A provider that picks keys itself (FI_MR_PROV_KEY) may hand a key
        // out again once it was closed; a deposed writer still holding it
        // must not regain access, so such a registration is kept aside
        // (never used) and another one made.
        for _ in 0..8 {
            // SAFETY: per this function's contract.
            let region = unsafe { self.register_once(addr, len, access)? };
            if self.issued.insert(region.key) {
                return Ok(region);
            }
            tracing::debug!(
                key = region.key,
                "provider reissued a revoked key; registering again"
            );
        }
        Err(FabricError::Invalid(
            "the provider keeps reissuing revoked memory keys".into(),
        ))
    }

    /// # Safety
    /// As [`Endpoint::register`].
    unsafe fn register_once(
        &mut self,
        addr: *mut u8,
        len: usize,
        access: Access,
    ) -> Result<MemoryRegion, FabricError> {
        let mut flags = FI_READ | FI_WRITE;
        if access.remote_read {
            flags |= FI_REMOTE_READ;
        }
        if access.remote_write {
            flags |= FI_REMOTE_WRITE;
        }
        let requested = loop {
            let k = random_key(self.key_mask);
            if !self.issued.contains(&k) {
                break k;
            }
        };
        let mut mr: *mut fid_mr = ptr::null_mut();
        // SAFETY: the caller keeps the memory valid; the domain is live.
        let r = unsafe {
            ((*(*self.domain).mr).reg)(
                &mut (*self.domain).fid,
                addr as *const c_void,
                len,
                flags,
                0,
                requested,
                0,
                &mut mr,
                ptr::null_mut(),
            )
        };
        check(self.lib, "fi_mr_reg", r as isize)?;
        if self.mr_mode & FI_MR_ENDPOINT != 0 && !self.ep.is_null() {
            // SAFETY: bind the new MR to our endpoint and enable it, as
            // FI_MR_ENDPOINT requires.
            let r = unsafe {
                let f = &mut (*mr).fid as *mut fid;
                let b = ((*(*f).ops).bind)(f, &mut (*self.ep).fid, 0);
                if b != 0 {
                    b
                } else {
                    ((*(*f).ops).control)(f, FI_ENABLE, ptr::null_mut())
                }
            };
            if r != 0 {
                // SAFETY: `mr` is live.
                unsafe { close_fid(&mut (*mr).fid) };
                check(self.lib, "fi_mr_bind/fi_mr_enable", r as isize)?;
            }
        }
        self.mrs.push(mr);
        // SAFETY: fi_mr_reg succeeded, so `mr` is a live MR.
        let (key, desc) = unsafe { ((*mr).key, (*mr).mem_desc) };
        Ok(MemoryRegion {
            mr,
            key,
            base: if self.mr_mode & FI_MR_VIRT_ADDR != 0 {
                addr as u64
            } else {
                0
            },
            desc,
        })
    }

    /// Closes a registration: its key is revoked, and a peer's RMA with it
    /// fails from then on (fencing of a deposed writer).
    pub fn deregister(&mut self, region: MemoryRegion) -> Result<(), FabricError> {
        let Some(at) = self.mrs.iter().position(|&m| m == region.mr) else {
            return Err(FabricError::Invalid(
                "the region was not registered with this endpoint".into(),
            ));
        };
        self.mrs.swap_remove(at);
        // SAFETY: `region.mr` is live (it was in `mrs`) and is closed once.
        let r = unsafe { ((*(*region.mr).fid.ops).close)(&mut (*region.mr).fid) };
        check(self.lib, "fi_close(mr)", r as isize)
    }

    /// Posts a one-sided write of `len` bytes at `src` (inside `local`) to
    /// `to`. `Ok(false)`: the queue is full, try again after polling.
    ///
    /// # Safety
    /// `src..src+len` lies in `local`'s memory and stays valid until the
    /// completion with `context` is returned by `poll`.
    pub unsafe fn write(
        &mut self,
        src: *const u8,
        len: usize,
        local: &MemoryRegion,
        to: Remote,
        context: u64,
    ) -> Result<bool, FabricError> {
        let (ep, peer) = self.route(to.peer)?;
        let iov = iovec {
            iov_base: src.cast_mut().cast(),
            iov_len: len,
        };
        let rma = fi_rma_iov {
            addr: to.addr,
            len,
            key: to.key,
        };
        let mut desc = local.desc;
        let msg = fi_msg_rma {
            msg_iov: &iov,
            desc: &mut desc,
            iov_count: 1,
            addr: peer,
            rma_iov: &rma,
            rma_iov_count: 1,
            context: context as *mut c_void,
            data: 0,
        };
        // The completion semantics are asked for on every write, not left to
        // the endpoint's defaults: the tcp provider's fi_write ignores them
        // and completes a write once sent, before the target has checked
        // the key (a fenced write would look landed).
        // SAFETY: per the contract; the message and what it points to live
        // through the call (the provider copies them); the context is an
        // opaque integer that comes back in the completion.
        let r = unsafe { ((*(*ep).rma).writemsg)(ep, &msg, FI_COMPLETION | FI_DELIVERY_COMPLETE) };
        self.posted("fi_write", r)
    }

    /// Posts a one-sided read of `len` bytes at `from` into `dst` (inside
    /// `local`). `Ok(false)`: try again after polling.
    ///
    /// # Safety
    /// As [`Endpoint::write`], for `dst`.
    pub unsafe fn read(
        &mut self,
        dst: *mut u8,
        len: usize,
        local: &MemoryRegion,
        from: Remote,
        context: u64,
    ) -> Result<bool, FabricError> {
        let (ep, peer) = self.route(from.peer)?;
        // SAFETY: per the contract.
        let r = unsafe {
            ((*(*ep).rma).read)(
                ep,
                dst.cast(),
                len,
                local.desc,
                peer,
                from.addr,
                from.key,
                context as *mut c_void,
            )
        };
        self.posted("fi_read", r)
    }

    /// Posts a remote compare-and-swap of the aligned `u64` at `at`: if it
    /// equals `*expected` it becomes `*new`; the value found lands in
    /// `*result` (inside `local`). `Ok(false)`: try again after polling.
    ///
    /// # Safety
    /// `new`, `expected` and `result` stay valid until the completion with
    /// `context`; `result` lies in `local`'s memory; `operands` is the
    /// registration covering `new` and `expected`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn compare_and_swap(
        &mut self,
        new: *const u64,
        expected: *const u64,
        operands: &MemoryRegion,
        result: *mut u64,
        local: &MemoryRegion,
        at: Remote,
        context: u64,
    ) -> Result<bool, FabricError> {
        if !self.wanted.atomics {
            return Err(FabricError::Invalid(format!(
                "provider {} has no remote atomics",
                self.provider
            )));
        }
        let (ep, peer) = self.route(at.peer)?;
        // SAFETY: per the contract; the atomic ops table exists because the
        // endpoint was opened with FI_ATOMIC.
        let r = unsafe {
            ((*(*ep).atomic).compwrite)(
                ep,
                new.cast(),
                1,
                operands.desc,
                expected.cast(),
                operands.desc,
                result.cast(),
                local.desc,
                peer,
                at.addr,
                at.key,
                FI_UINT64,
                FI_CSWAP,
                context as *mut c_void,
            )
        };
        self.posted("fi_compare_atomic", r)
    }

    /// The endpoint and address an operation to `peer` is posted with.
    fn route(&self, peer: PeerAddr) -> Result<(*mut fid_ep, fi_addr_t), FabricError> {
        if !self.connection_oriented() {
            return Ok((self.ep, peer));
        }
        match self.links.get(&peer) {
            Some(Link {
                ep,
                state: LinkState::Up,
            }) => Ok((*ep, FI_ADDR_UNSPEC)),
            Some(l) => Err(FabricError::Invalid(format!(
                "the connection to that peer is not up ({:?})",
                l.state
            ))),
            None => Err(FabricError::Invalid("no such peer".into())),
        }
    }

    /// What a post returned: taken, queue full (`EAGAIN`), or an error.
    fn posted(&self, call: &'static str, r: isize) -> Result<bool, FabricError> {
        if r == -FI_EAGAIN {
            return Ok(false);
        }
        check(self.lib, call, r)?;
        Ok(true)
    }

    /// Drives progress, handles connection events, and collects finished
    /// operations into `out`; returns how many were added.
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> Result<usize, FabricError> {
        if !self.eq.is_null() {
            self.connection_events()?;
        }
        let mut entries = [const {
            fi_cq_entry {
                op_context: ptr::null_mut(),
            }
        }; 32];
        let mut added = 0;
        loop {
            // SAFETY: `entries` has room for 32 context-format entries.
            let n = unsafe {
                ((*(*self.cq).ops).read)(self.cq, entries.as_mut_ptr().cast(), entries.len())
            };
            if n > 0 {
                for e in &entries[..n as usize] {
                    out.push(Completion {
                        context: e.op_context as u64,
                        result: Ok(()),
                    });
                }
                added += n as usize;
                continue;
            }
            if n == -FI_EAVAIL {
                // SAFETY: a zeroed error entry is valid input for readerr.
                let mut err: fi_cq_err_entry = unsafe { std::mem::zeroed() };
                // SAFETY: `err` is a valid error entry to fill.
                let r = unsafe { ((*(*self.cq).ops).readerr)(self.cq, &mut err, 0) };
                if r > 0 {
                    out.push(Completion {
                        context: err.op_context as u64,
                        result: Err(format!(
                            "{} (provider error {})",
                            self.lib.error_text(err.err as isize),
                            err.prov_errno
                        )),
                    });
                    added += 1;
                    continue;
                }
            }
            if n == -FI_EAGAIN || n == 0 {
                return Ok(added);
            }
            check(self.lib, "fi_cq_read", n)?;
            return Ok(added);
        }
    }
}

/// The largest endpoint name accepted from a peer.
const MAX_NAME: usize = 256;

fn check_name(name: &[u8]) -> Result<(), FabricError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(FabricError::Invalid(format!(
            "a peer endpoint name of {} bytes",
            name.len()
        )));
    }
    Ok(())
}

/// The buffer `fi_eq_read` fills: an entry and its connection data.
#[repr(C)]
struct CmEvent {
    entry: fi_eq_cm_entry,
    data: [u8; 256],
}

impl Endpoint {
    /// The live link whose endpoint is `f`. Events are matched by pointer
    /// against live links, never by reading a possibly closed fid.
    fn link_of(&self, f: *mut fid) -> Option<PeerAddr> {
        self.links
            .iter()
            // SAFETY: only the address of a live endpoint's fid is taken.
            .find(|(_, l)| !l.ep.is_null() && unsafe { &raw mut (*l.ep).fid } == f)
            .map(|(&a, _)| a)
    }

    /// Reads the event queue: accepts expected connection requests, rejects
    /// the rest, and records links coming up or going down.
    fn connection_events(&mut self) -> Result<(), FabricError> {
        loop {
            // SAFETY: a zeroed CmEvent is plain data (null pointers, zeros).
            let mut ev: CmEvent = unsafe { std::mem::zeroed() };
            let mut event: u32 = 0;
            // SAFETY: `ev` has room for `size_of::<CmEvent>()` bytes.
            let n = unsafe {
                ((*(*self.eq).ops).read)(
                    self.eq,
                    &mut event,
                    (&raw mut ev).cast(),
                    std::mem::size_of::<CmEvent>(),
                    0,
                )
            };
            if n == -FI_EAGAIN || n == 0 {
                return Ok(());
            }
            if n == -FI_EAVAIL {
                // SAFETY: a zeroed error entry is valid input for readerr.
                let mut err: fi_eq_err_entry = unsafe { std::mem::zeroed() };
                // SAFETY: `err` is a valid error entry to fill.
                let r = unsafe { ((*(*self.eq).ops).readerr)(self.eq, &mut err, 0) };
                if r <= 0 {
                    return Ok(());
                }
                let text = format!(
                    "{} (provider error {})",
                    self.lib.error_text(err.err as isize),
                    err.prov_errno
                );
                match self.link_of(err.fid) {
                    Some(a) => {
                        tracing::debug!(peer = a, error = %text, "connection failed");
                        self.links.get_mut(&a).expect("live").state = LinkState::Down(text);
                    }
                    None => tracing::debug!(error = %text, "connection event error"),
                }
                continue;
            }
            check(self.lib, "fi_eq_read", n)?;
            let data_len = (n as usize).saturating_sub(std::mem::size_of::<fi_eq_cm_entry>());
            match event {
                FI_CONNREQ => self.on_connect_request(&ev, data_len.min(ev.data.len())),
                FI_CONNECTED => {
                    if let Some(a) = self.link_of(ev.entry.fid) {
                        self.links.get_mut(&a).expect("live").state = LinkState::Up;
                    }
                }
                FI_SHUTDOWN => {
                    if let Some(a) = self.link_of(ev.entry.fid) {
                        self.links.get_mut(&a).expect("live").state =
                            LinkState::Down("the peer closed the connection".into());
                    }
                }
                other => tracing::debug!(event = other, "connection event ignored"),
            }
        }
    }

    /// A peer dialed: accept it if it presented an awaited token.
    fn on_connect_request(&mut self, ev: &CmEvent, data_len: usize) {
        let info = ev.entry.info;
        let token = (data_len >= 8)
            .then(|| u64::from_le_bytes(ev.data[..8].try_into().expect("8 bytes")))
            .and_then(|t| self.awaited.remove(&t));
        let accepted = match token {
            Some(addr) => {
                // SAFETY: `info` describes the requested connection.
                match unsafe { self.open_link(info, addr) } {
                    Ok(ep) => {
                        // SAFETY: `ep` is live and enabled, opened from the
                        // request's info.
                        let r = unsafe { ((*(*ep).cm).accept)(ep, ptr::null(), 0) };
                        let link = self.links.get_mut(&addr);
                        match (r, link) {
                            (0, Some(l)) => {
                                l.ep = ep;
                                true
                            }
                            (r, l) => {
                                // SAFETY: `ep` is live and not shared.
                                unsafe { close_fid(&mut (*ep).fid) };
                                if let Some(l) = l {
                                    l.state = LinkState::Down(format!(
                                        "fi_accept: {}",
                                        self.lib.error_text(r as isize)
                                    ));
                                }
                                false
                            }
                        }
                    }
                    Err(e) => {
                        if let Some(l) = self.links.get_mut(&addr) {
                            l.state = LinkState::Down(e.to_string());
                        }
                        false
                    }
                }
            }
            None => false,
        };
        if !accepted {
            tracing::debug!("connection request without an awaited token: rejected");
            // SAFETY: the request's handle is live until accepted or
            // rejected; the listening endpoint is live.
            unsafe {
                let handle = if info.is_null() {
                    ptr::null_mut()
                } else {
                    (*info).handle
                };
                ((*(*self.pep).cm).reject)(self.pep, handle, ptr::null(), 0);
            }
        }
        if !info.is_null() {
            // SAFETY: the application owns a connection request's info.
            unsafe { (self.lib.freeinfo)(info) };
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        // SAFETY: each fid is null or live; closed in reverse order of
        // opening, endpoints before what they are bound to.
        unsafe {
            for (_, l) in self.links.drain() {
                if !l.ep.is_null() {
                    close_fid(&mut (*l.ep).fid);
                }
            }
            if !self.pep.is_null() {
                close_fid(&mut (*self.pep).fid);
            }
            if !self.ep.is_null() {
                close_fid(&mut (*self.ep).fid);
            }
            for mr in self.mrs.drain(..) {
                close_fid(&mut (*mr).fid);
            }
            if !self.av.is_null() {
                close_fid(&mut (*self.av).fid);
            }
            if !self.cq.is_null() {
                close_fid(&mut (*self.cq).fid);
            }
            if !self.eq.is_null() {
                close_fid(&mut (*self.eq).fid);
            }
            if !self.domain.is_null() {
                close_fid(&mut (*self.domain).fid);
            }
            if !self.fabric.is_null() {
                close_fid(&mut (*self.fabric).fid);
            }
            (self.lib.freeinfo)(self.info);
        }
    }
}
