//! The interposed libc functions.
//!
//! Each hook calls the real function first, then, only for a replicated
//! client connection (or a listener of the server), does its work inside
//! the library (where nested libc calls pass straight through) and restores
//! `errno` before returning. Work for a replicated connection goes to the
//! node: directly in the holder, over the channel in a forked child.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::slice;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};

use libc::{c_int, c_uint, c_void, iovec, msghdr, size_t, sockaddr, socklen_t, ssize_t};

use crate::gate::Admit;
use crate::registry::{MAX_FD, Reader};
use crate::{
    Proc, REGISTRY, Verdict, become_holder, child, in_hook, inside, proc, real, refuse, say,
    settings,
};

fn errno() -> c_int {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

fn set_errno(v: c_int) {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = v }
}

/// Listeners of the server other than the app address (UNIX sockets,
/// other ports): never replicated; a follower may refuse their clients.
static OTHER_LISTENERS: LazyLock<Box<[AtomicBool]>> =
    LazyLock::new(|| (0..MAX_FD).map(|_| AtomicBool::new(false)).collect());

fn other_listener(fd: c_int) -> &'static AtomicBool {
    static NONE: AtomicBool = AtomicBool::new(false);
    usize::try_from(fd)
        .ok()
        .and_then(|i| OTHER_LISTENERS.get(i))
        .unwrap_or(&NONE)
}

/// A socket's address.
#[derive(Debug)]
enum Address {
    Inet(SocketAddr),
    Unix(String),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Inet(a) => write!(f, "{a}"),
            Address::Unix(p) => write!(f, "unix:{p}"),
        }
    }
}

/// The local or peer address of a socket.
fn address(fd: c_int, peer: bool) -> Option<Address> {
    // SAFETY: sockaddr_storage is plain data; zeroes are a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as socklen_t;
    let p = (&raw mut ss).cast::<sockaddr>();
    // SAFETY: `ss` has room for any address; `len` says how much.
    let r = unsafe {
        if peer {
            libc::getpeername(fd, p, &mut len)
        } else {
            libc::getsockname(fd, p, &mut len)
        }
    };
    if r != 0 {
        return None;
    }
    match c_int::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says `ss` holds a sockaddr_in.
            let a = unsafe { *(&raw const ss).cast::<libc::sockaddr_in>() };
            Some(Address::Inet(SocketAddr::new(
                std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into(),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says `ss` holds a sockaddr_in6.
            let a = unsafe { *(&raw const ss).cast::<libc::sockaddr_in6>() };
            Some(Address::Inet(SocketAddr::new(
                std::net::Ipv6Addr::from(a.sin6_addr.s6_addr).into(),
                u16::from_be(a.sin6_port),
            )))
        }
        libc::AF_UNIX => {
            // SAFETY: the family says `ss` holds a sockaddr_un.
            let a = unsafe { *(&raw const ss).cast::<libc::sockaddr_un>() };
            let path: Vec<u8> = a
                .sun_path
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c as u8)
                .collect();
            Some(Address::Unix(String::from_utf8_lossy(&path).into_owned()))
        }
        _ => None,
    }
}

/// Whether `fd` listens on the app port (any address family: a server
/// listening on 127.0.0.1 and ::1 replicates both).
fn is_app_listener(fd: c_int) -> bool {
    settings().is_some_and(
        |s| matches!(address(fd, false), Some(Address::Inet(a)) if a.port() == s.app.port()),
    )
}

/// Intercepted `listen`: the first process to listen on its app address
/// runs the node; any other listener is reported as not replicated.
///
/// # Safety
/// As `listen(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    // SAFETY: forwarded unchanged.
    let r = unsafe { real::listen(fd, backlog) };
    if r == 0 && !in_hook() {
        let e = errno();
        inside(|| on_listen(fd));
        set_errno(e);
    }
    r
}

fn on_listen(fd: c_int) {
    let Some(s) = settings() else { return };
    match address(fd, false) {
        Some(Address::Inet(a)) if a.port() == s.app.port() => {
            if matches!(proc(), Proc::Candidate) {
                become_holder();
            }
        }
        Some(Address::Inet(a)) if s.own_ports.contains(&a.port()) => {}
        Some(addr) if !other_listener(fd).swap(true, Ordering::AcqRel) => {
            say(format!(
                "also listening on {addr}: not replicated (only {} is); followers refuse its clients \
                 unless follower_clients = \"serve\"",
                s.app
            ));
        }
        _ => {}
    }
}

/// What to do with `fd`, just accepted on listener `lfd`.
fn on_accept(lfd: c_int, fd: c_int) -> Verdict {
    let app = is_app_listener(lfd);
    if !app && !other_listener(lfd).load(Ordering::Acquire) {
        return Verdict::Pass;
    }
    let peer = match address(fd, true) {
        Some(Address::Inet(a)) => Some(a),
        _ => None,
    };
    match proc() {
        Proc::Holder(a) if app => a.accept_app(peer),
        Proc::Holder(a) => a.accept_other(),
        Proc::Child(addr) => match child::accept(addr, app, fd, peer) {
            Ok(v) => v,
            Err(e) => refuse(&format!(
                "a forked process of the server accepted a connection but cannot reach the \
                 process that replicates it: {e}"
            )),
        },
        Proc::Candidate if app => refuse(
            "this process accepted a connection on the app address, but replication does not run \
             in it: it did not listen there itself, and it is not a fork of the process that did",
        ),
        Proc::Candidate | Proc::Outside => Verdict::Pass,
    }
}

unsafe fn accept_common(lfd: c_int, accept: impl Fn() -> c_int) -> c_int {
    loop {
        let fd = accept();
        if fd < 0 || in_hook() {
            return fd;
        }
        let e = errno();
        let verdict = inside(|| on_accept(lfd, fd));
        let keep = match verdict {
            Verdict::Replicate(id) => REGISTRY.add(fd, id),
            Verdict::Replay(id) => {
                REGISTRY.add_replay(fd, id);
                true
            }
            Verdict::Pass => true,
            Verdict::Reject => false,
        };
        if keep {
            set_errno(e);
            return fd;
        }
        // SAFETY: `fd` was just accepted and is ours to close.
        unsafe {
            real::close(fd);
        }
    }
}

/// Intercepted `accept`.
///
/// # Safety
/// As `accept(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int {
    // SAFETY: the real call gets the caller's arguments unchanged.
    unsafe { accept_common(fd, || real::accept(fd, addr, len)) }
}

/// Intercepted `accept4`.
///
/// # Safety
/// As `accept4(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    addr: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    // SAFETY: the real call gets the caller's arguments unchanged.
    unsafe { accept_common(fd, || real::accept4(fd, addr, len, flags)) }
}

thread_local! {
    /// This thread's id, once asked (0: not yet): replay's hooks ask on
    /// every read and write, and each ask would be a system call.
    static TID: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// The calling thread's id.
pub(crate) fn gettid() -> u32 {
    TID.with(|t| {
        if t.get() == 0 {
            // SAFETY: gettid has no preconditions and cannot fail.
            t.set(unsafe { libc::gettid() } as u32);
        }
        t.get()
    })
}

/// This process's id, once asked (0: not yet): every hook asks which
/// process it runs in, and glibc makes `getpid` a system call.
static PID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The calling process's id.
pub(crate) fn getpid() -> u32 {
    let pid = PID.load(std::sync::atomic::Ordering::Relaxed);
    if pid != 0 {
        return pid;
    }
    // SAFETY: getpid has no preconditions and cannot fail.
    let pid = unsafe { libc::getpid() } as u32;
    PID.store(pid, std::sync::atomic::Ordering::Relaxed);
    pid
}

/// In a forked child (`pthread_atfork` child handler, which the child runs
/// before any other code): the forking thread, the only one the child has,
/// holds its parent thread's id, and the process its parent's. Processes
/// that clone without glibc's `fork` are not told apart from their parent
/// at all (the registry's fork handling rests on the same handler).
pub(crate) fn forget_ids() {
    TID.with(|t| t.set(0));
    PID.store(0, std::sync::atomic::Ordering::Relaxed);
}

/// Counts what the server read from a replay connection (followers).
fn note_replay_read(fd: c_int, n: ssize_t) {
    if n > 0
        && !in_hook()
        && let Some(id) = REGISTRY.replay_conn(fd)
    {
        let e = errno();
        inside(|| match proc() {
            Proc::Holder(a) => {
                let tid = gettid();
                tracing::trace!(conn = id, n, tid, "replayed input read");
                REGISTRY.consumed(id, n as u64, Reader::Thread(tid));
                a.replay.gate.consumed(id, n as u64, tid);
            }
            Proc::Child(addr) => {
                // Counted here too: the child's own total, for `idle`.
                REGISTRY.consumed(id, n as u64, Reader::Unknown);
                REGISTRY.say_idle(fd, true);
                if let Err(e) = child::consumed(addr, id, n as u64) {
                    refuse(&format!(
                        "a forked process of the server read replayed input but cannot reach the \
                         process that replicates it: {e}"
                    ));
                }
            }
            Proc::Candidate | Proc::Outside => {}
        });
        set_errno(e);
    }
}

/// A forked process about to read a replay connection with nothing left to
/// read has finished with everything it read: it says so (once per wait),
/// so replay can keep a concurrent server's execution close to log order
/// (see `replay::Turnstile`).
fn before_replay_read(fd: c_int) {
    if in_hook() {
        return;
    }
    let Some(id) = REGISTRY.replay_conn(fd) else {
        return;
    };
    let e = errno();
    inside(|| {
        let Proc::Child(addr) = proc() else { return };
        let mut unread: c_int = 0;
        // SAFETY: FIONREAD writes one int.
        let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut unread) };
        if r == 0 && unread == 0 && REGISTRY.say_idle(fd, false) {
            let total = REGISTRY.progress(id).consumed;
            if let Err(e) = child::idle(addr, id, total) {
                refuse(&format!(
                    "a forked process of the server waits for replayed input but cannot reach \
                     the process that replicates it: {e}"
                ));
            }
        }
    });
    set_errno(e);
}

/// How many bytes a read of `fd` may return now, if it is a replay
/// connection of this process (the holder's) that the server reads ahead
/// of its turn: `None` when it must not read yet (its socket does not
/// block: `EAGAIN`). See [`crate::gate`].
fn replay_turn(fd: c_int, dont_wait: bool) -> Option<usize> {
    if in_hook() {
        return Some(usize::MAX);
    }
    let Some(id) = REGISTRY.replay_conn(fd) else {
        return Some(usize::MAX);
    };
    let Proc::Holder(a) = proc() else {
        return Some(usize::MAX);
    };
    let e = errno();
    let blocking = || {
        // SAFETY: F_GETFL on the caller's descriptor reads its flags.
        let fl = unsafe { real::fcntl(fd, libc::F_GETFL, 0) };
        !dont_wait && fl >= 0 && fl & libc::O_NONBLOCK == 0
    };
    let admit = inside(|| a.replay.gate.admit(id, gettid(), blocking));
    set_errno(e);
    match admit {
        Admit::Read(n) => Some(n.max(1)),
        Admit::WouldBlock => None,
    }
}

/// A read of `fd` that is not replicated: a replay connection's reads
/// keep log order ([`replay_turn`]) and are counted; `read` is called with
/// the most it may return.
fn replay_read(fd: c_int, dont_wait: bool, read: impl FnOnce(usize) -> ssize_t) -> ssize_t {
    before_replay_read(fd);
    let Some(cap) = replay_turn(fd, dont_wait) else {
        set_errno(libc::EAGAIN);
        return -1;
    };
    let n = read(cap);
    note_replay_read(fd, n);
    n
}

/// The first iovecs of `iov`, holding `cap` bytes at most (the last one
/// cut short).
///
/// # Safety
/// As [`iovecs`].
unsafe fn capped_iovecs(iov: *const iovec, n: usize, cap: usize) -> Vec<iovec> {
    let mut left = cap;
    let mut out = Vec::new();
    // SAFETY: the caller's iovecs.
    for (base, len) in unsafe { iovecs(iov, n) } {
        if left == 0 {
            break;
        }
        let take = len.min(left);
        out.push(iovec {
            iov_base: base as *mut c_void,
            iov_len: take,
        });
        left -= take;
    }
    out
}

/// The replicated connection behind `fd`, if this call must be replicated.
fn replicated(fd: c_int) -> Option<u64> {
    if in_hook() {
        return None;
    }
    REGISTRY.conn(fd)
}

/// The first `n` bytes of `bufs`, as the kernel filled them.
///
/// # Safety
/// Each `(ptr, len)` describes writable memory the caller owns, of which
/// the kernel filled the first `n` bytes in order.
unsafe fn gather(bufs: impl Iterator<Item = (*const u8, usize)>, n: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(n);
    // SAFETY: as ours.
    unsafe { gather_into(bufs, n, &mut data) };
    data
}

/// Appends the first `n` bytes of `bufs` to `data`.
///
/// # Safety
/// As [`gather`].
unsafe fn gather_into(
    bufs: impl Iterator<Item = (*const u8, usize)>,
    n: usize,
    data: &mut Vec<u8>,
) {
    let mut left = n;
    for (p, len) in bufs {
        if left == 0 {
            break;
        }
        let take = left.min(len);
        if take > 0 && !p.is_null() {
            // SAFETY: the kernel wrote `take` <= `len` bytes at `p`.
            data.extend_from_slice(unsafe { slice::from_raw_parts(p, take) });
        }
        left -= take;
    }
}

thread_local! {
    /// Where bytes spread over several buffers are gathered: kept per
    /// thread, so a hook allocates nothing per call.
    static GATHERED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A gathering buffer that grew beyond this is given back after use.
const GATHERED_KEEP: usize = 1 << 20;

/// Calls `f` with the first `n` bytes of `bufs`: in place when the first
/// buffer holds them all (a read or write of one buffer, the usual case),
/// else gathered into this thread's reused buffer.
///
/// # Safety
/// As [`gather`].
unsafe fn with_gathered<R>(
    mut bufs: impl Iterator<Item = (*const u8, usize)>,
    n: usize,
    f: impl FnOnce(&[u8]) -> R,
) -> R {
    if n == 0 {
        return f(&[]);
    }
    let first = bufs.next();
    if let Some((p, len)) = first
        && len >= n
        && !p.is_null()
    {
        // SAFETY: the kernel wrote `n` <= `len` bytes at `p`.
        return f(unsafe { slice::from_raw_parts(p, n) });
    }
    let mut rest = Some(first.into_iter().chain(bufs));
    let mut f = Some(f);
    let done = GATHERED.try_with(|cell| {
        let mut buf = cell.try_borrow_mut().ok()?;
        buf.clear();
        // SAFETY: as ours.
        unsafe { gather_into(rest.take()?, n, &mut buf) };
        let r = (f.take()?)(&buf);
        if buf.capacity() > GATHERED_KEEP {
            *buf = Vec::new();
        }
        Some(r)
    });
    match (done, rest, f) {
        (Ok(Some(r)), _, _) => r,
        // Re-entered, or the thread is ending: a buffer of its own.
        // SAFETY: as ours.
        (_, Some(rest), Some(f)) => f(&unsafe { gather(rest, n) }),
        _ => unreachable!("the reused buffer either ran `f` or took nothing"),
    }
}

/// The `(base, len)` pairs of an iovec array.
///
/// # Safety
/// `iov` points to `n` valid iovecs, or is null.
unsafe fn iovecs(iov: *const iovec, n: usize) -> impl Iterator<Item = (*const u8, usize)> {
    let v: &[iovec] = if iov.is_null() || n == 0 {
        &[]
    } else {
        // SAFETY: the caller guarantees `n` iovecs at `iov`.
        unsafe { slice::from_raw_parts(iov, n) }
    };
    v.iter().map(|i| (i.iov_base as *const u8, i.iov_len))
}

/// Replicates what a read returned (`data` empty: end of stream). On
/// failure the connection is broken and the caller reports a reset.
fn replicate_input(fd: c_int, conn: u64, data: &[u8]) -> Result<(), ()> {
    let out = REGISTRY
        .with(conn, |c| {
            c.used = true;
            c.waits_said = false;
            c.out
        })
        .unwrap_or_default();
    tracing::trace!(conn, n = data.len(), "input read");
    let ok = match proc() {
        Proc::Holder(a) => a.input(conn, out.bytes, data, 0).map_err(|e| {
            tracing::warn!(fd, conn, error = %e, "input could not be replicated: closing the connection");
        }),
        Proc::Child(addr) => match child::input(addr, conn, fd, out, data) {
            Ok(true) => Ok(()),
            Ok(false) => Err(()),
            Err(e) => refuse(&format!(
                "a forked process of the server read a replicated connection but cannot reach the \
                 process that replicates it: {e}"
            )),
        },
        Proc::Candidate | Proc::Outside => Ok(()),
    };
    ok.map_err(|()| {
        REGISTRY.with(conn, |c| c.broken = true);
        // SAFETY: shutdown on the server's descriptor; it stays open.
        unsafe {
            real::shutdown(fd, libc::SHUT_RDWR);
        }
    })
}

/// Common tail of every read-like hook: `n` bytes of the `requested`
/// arrived in `bufs`. A zero-length request is not end of stream.
///
/// # Safety
/// As [`gather`].
unsafe fn after_input(
    fd: c_int,
    conn: u64,
    n: ssize_t,
    requested: usize,
    bufs: impl Iterator<Item = (*const u8, usize)>,
) -> ssize_t {
    if n < 0 || (n == 0 && requested == 0) {
        return n;
    }
    let e = errno();
    // SAFETY: the caller's buffers, of which the kernel filled `n` bytes.
    let replicated = unsafe {
        with_gathered(bufs, n as usize, |data| {
            inside(|| replicate_input(fd, conn, data))
        })
    };
    match replicated {
        Ok(()) => {
            set_errno(e);
            n
        }
        Err(()) => {
            set_errno(libc::ECONNRESET);
            -1
        }
    }
}

/// Whether connection `conn` can no longer be replicated (its reads report
/// end of stream). In a forked process, a read with nothing left to read
/// also tells the holder this process has finished with what it read
/// (see `replay::Turnstile`).
fn broken(fd: c_int, conn: u64) -> bool {
    inside(|| {
        let (broken, said) = REGISTRY
            .with(conn, |c| {
                (c.broken, std::mem::replace(&mut c.waits_said, true))
            })
            .unwrap_or((true, true));
        if !broken
            && !said
            && let Proc::Child(addr) = proc()
        {
            let mut unread: c_int = 0;
            // SAFETY: FIONREAD writes one int.
            let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut unread) };
            if r == 0 && unread == 0 {
                let _ = child::waits(addr, conn);
            } else {
                REGISTRY.with(conn, |c| c.waits_said = false);
            }
        }
        broken
    })
}

/// Intercepted `read`.
///
/// # Safety
/// As `read(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, count: size_t) -> ssize_t {
    let Some(conn) = replicated(fd) else {
        // SAFETY: forwarded, asking for no more than the caller's buffer.
        return replay_read(fd, false, |cap| unsafe {
            real::read(fd, buf, count.min(cap))
        });
    };
    if broken(fd, conn) {
        return 0;
    }
    // SAFETY: forwarded unchanged.
    let n = unsafe { real::read(fd, buf, count) };
    // SAFETY: the kernel filled `n` bytes of `buf`.
    unsafe { after_input(fd, conn, n, count, [(buf as *const u8, count)].into_iter()) }
}

/// `_FORTIFY_SOURCE`'s `read` (glibc calls its own read internally).
///
/// # Safety
/// As `__read_chk`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __read_chk(
    fd: c_int,
    buf: *mut c_void,
    count: size_t,
    buflen: size_t,
) -> ssize_t {
    if count > buflen {
        // SAFETY: the real check aborts the process, as it should.
        return unsafe { real::read_chk(fd, buf, count, buflen) };
    }
    // SAFETY: as `read`, with the buffer checked.
    unsafe { read(fd, buf, count) }
}

/// Intercepted `recv`.
///
/// # Safety
/// As `recv(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recv(fd: c_int, buf: *mut c_void, len: size_t, flags: c_int) -> ssize_t {
    let conn = replicated(fd).filter(|_| flags & libc::MSG_PEEK == 0);
    let Some(conn) = conn else {
        if flags & libc::MSG_PEEK != 0 {
            // SAFETY: forwarded unchanged.
            return unsafe { real::recv(fd, buf, len, flags) };
        }
        let dont_wait = flags & libc::MSG_DONTWAIT != 0;
        // SAFETY: forwarded, asking for no more than the caller's buffer.
        return replay_read(fd, dont_wait, |cap| unsafe {
            real::recv(fd, buf, len.min(cap), flags)
        });
    };
    if broken(fd, conn) {
        return 0;
    }
    // SAFETY: forwarded unchanged.
    let n = unsafe { real::recv(fd, buf, len, flags) };
    // SAFETY: the kernel filled `n` bytes of `buf`.
    unsafe { after_input(fd, conn, n, len, [(buf as *const u8, len)].into_iter()) }
}

/// `_FORTIFY_SOURCE`'s `recv`.
///
/// # Safety
/// As `__recv_chk`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __recv_chk(
    fd: c_int,
    buf: *mut c_void,
    len: size_t,
    buflen: size_t,
    flags: c_int,
) -> ssize_t {
    if len > buflen {
        // SAFETY: the real check aborts the process, as it should.
        return unsafe { real::recv_chk(fd, buf, len, buflen, flags) };
    }
    // SAFETY: as `recv`, with the buffer checked.
    unsafe { recv(fd, buf, len, flags) }
}

/// Intercepted `recvfrom`.
///
/// # Safety
/// As `recvfrom(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    len: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    alen: *mut socklen_t,
) -> ssize_t {
    let conn = replicated(fd).filter(|_| flags & libc::MSG_PEEK == 0);
    let Some(conn) = conn else {
        if flags & libc::MSG_PEEK != 0 {
            // SAFETY: forwarded unchanged.
            return unsafe { real::recvfrom(fd, buf, len, flags, addr, alen) };
        }
        let dont_wait = flags & libc::MSG_DONTWAIT != 0;
        // SAFETY: forwarded, asking for no more than the caller's buffer.
        return replay_read(fd, dont_wait, |cap| unsafe {
            real::recvfrom(fd, buf, len.min(cap), flags, addr, alen)
        });
    };
    if broken(fd, conn) {
        return 0;
    }
    // SAFETY: forwarded unchanged.
    let n = unsafe { real::recvfrom(fd, buf, len, flags, addr, alen) };
    // SAFETY: the kernel filled `n` bytes of `buf`.
    unsafe { after_input(fd, conn, n, len, [(buf as *const u8, len)].into_iter()) }
}

/// `_FORTIFY_SOURCE`'s `recvfrom`.
///
/// # Safety
/// As `__recvfrom_chk`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn __recvfrom_chk(
    fd: c_int,
    buf: *mut c_void,
    len: size_t,
    buflen: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    alen: *mut socklen_t,
) -> ssize_t {
    if len > buflen {
        // SAFETY: the real check aborts the process, as it should.
        return unsafe { real::recvfrom_chk(fd, buf, len, buflen, flags, addr, alen) };
    }
    // SAFETY: as `recvfrom`, with the buffer checked.
    unsafe { recvfrom(fd, buf, len, flags, addr, alen) }
}

fn iov_total(iov: *const iovec, n: usize) -> usize {
    // SAFETY: called with the caller's iovec array of `n` entries.
    unsafe { iovecs(iov, n) }.map(|(_, l)| l).sum()
}

/// Intercepted `readv`.
///
/// # Safety
/// As `readv(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t {
    let Some(conn) = replicated(fd) else {
        return replay_read(fd, false, |cap| {
            let count = n.max(0) as usize;
            if cap >= iov_total(iov, count) {
                // SAFETY: forwarded unchanged.
                return unsafe { real::readv(fd, iov, n) };
            }
            // SAFETY: the caller's iovecs, cut to `cap` bytes.
            let capped = unsafe { capped_iovecs(iov, count, cap) };
            // SAFETY: `capped` describes part of the caller's buffers.
            unsafe { real::readv(fd, capped.as_ptr(), capped.len() as c_int) }
        });
    };
    if broken(fd, conn) {
        return 0;
    }
    // SAFETY: forwarded unchanged.
    let got = unsafe { real::readv(fd, iov, n) };
    let n = n.max(0) as usize;
    // SAFETY: the caller's iovecs, of which the kernel filled `got` bytes.
    unsafe { after_input(fd, conn, got, iov_total(iov, n), iovecs(iov, n)) }
}

/// `recvmsg` into at most `cap` bytes of `msg`'s buffers.
///
/// # Safety
/// `msg` is a valid msghdr of the caller's.
unsafe fn capped_recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int, cap: usize) -> ssize_t {
    // SAFETY: the caller's valid msghdr.
    let (iov, count) = unsafe { ((*msg).msg_iov, (*msg).msg_iovlen) };
    if cap >= iov_total(iov, count) {
        // SAFETY: forwarded unchanged.
        return unsafe { real::recvmsg(fd, msg, flags) };
    }
    // SAFETY: the caller's iovecs, cut to `cap` bytes.
    let mut capped = unsafe { capped_iovecs(iov, count, cap) };
    // SAFETY: a copy of the caller's msghdr, with the cut iovecs.
    let mut m: msghdr = unsafe { *msg };
    m.msg_iov = capped.as_mut_ptr();
    m.msg_iovlen = capped.len();
    // SAFETY: `m` points into the caller's buffers only.
    let n = unsafe { real::recvmsg(fd, &mut m, flags) };
    // SAFETY: the caller's msghdr gets back what the kernel set.
    unsafe {
        (*msg).msg_namelen = m.msg_namelen;
        (*msg).msg_controllen = m.msg_controllen;
        (*msg).msg_flags = m.msg_flags;
    }
    n
}

/// Intercepted `recvmsg`.
///
/// # Safety
/// As `recvmsg(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    let conn = replicated(fd).filter(|_| flags & libc::MSG_PEEK == 0 && !msg.is_null());
    let Some(conn) = conn else {
        if flags & libc::MSG_PEEK != 0 || msg.is_null() {
            // SAFETY: forwarded unchanged.
            return unsafe { real::recvmsg(fd, msg, flags) };
        }
        let dont_wait = flags & libc::MSG_DONTWAIT != 0;
        // SAFETY: `msg` is the caller's valid msghdr.
        return replay_read(fd, dont_wait, |cap| unsafe {
            capped_recvmsg(fd, msg, flags, cap)
        });
    };
    if broken(fd, conn) {
        return 0;
    }
    // SAFETY: forwarded unchanged.
    let got = unsafe { real::recvmsg(fd, msg, flags) };
    // SAFETY: `msg` is the caller's valid msghdr.
    let (iov, n) = unsafe { ((*msg).msg_iov, (*msg).msg_iovlen) };
    // SAFETY: its iovecs hold `got` bytes.
    unsafe { after_input(fd, conn, got, iov_total(iov, n), iovecs(iov, n)) }
}

/// Intercepted `recvmmsg`: the messages' bytes, in order, are one input.
///
/// # Safety
/// As `recvmmsg(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvmmsg(
    fd: c_int,
    msgs: *mut libc::mmsghdr,
    vlen: c_uint,
    flags: c_int,
    timeout: *mut libc::timespec,
) -> c_int {
    let conn = replicated(fd).filter(|_| flags & libc::MSG_PEEK == 0 && !msgs.is_null());
    let Some(conn) = conn else {
        if flags & libc::MSG_PEEK == 0
            && !msgs.is_null()
            && vlen > 0
            && REGISTRY.replay_conn(fd).is_some()
        {
            // A replay connection: one message, read as `recvmsg` reads it
            // (so its turn and its limit hold).
            let dont_wait = flags & libc::MSG_DONTWAIT != 0;
            // SAFETY: the caller's valid array of at least one message.
            let first = unsafe { &mut *msgs };
            let n = replay_read(fd, dont_wait, |cap| unsafe {
                // SAFETY: as above.
                capped_recvmsg(fd, &mut first.msg_hdr, flags & !libc::MSG_WAITFORONE, cap)
            });
            if n < 0 {
                return -1;
            }
            first.msg_len = n as c_uint;
            return 1;
        }
        // SAFETY: forwarded unchanged.
        let r = unsafe { real::recvmmsg(fd, msgs, vlen, flags, timeout) };
        if r > 0 && flags & libc::MSG_PEEK == 0 && !msgs.is_null() {
            // SAFETY: the kernel filled `r` entries of the caller's array.
            let got: u64 = unsafe { slice::from_raw_parts(msgs, r as usize) }
                .iter()
                .map(|m| u64::from(m.msg_len))
                .sum();
            note_replay_read(fd, got as ssize_t);
        }
        return r;
    };
    if broken(fd, conn) {
        return 0;
    }
    // SAFETY: forwarded unchanged.
    let r = unsafe { real::recvmmsg(fd, msgs, vlen, flags, timeout) };
    if r <= 0 {
        return r;
    }
    // SAFETY: the kernel filled `r` entries; each message's iovecs hold its
    // `msg_len` bytes.
    let data: Vec<u8> = unsafe { slice::from_raw_parts(msgs, r as usize) }
        .iter()
        .flat_map(|m| {
            // SAFETY: as above.
            unsafe {
                gather(
                    iovecs(m.msg_hdr.msg_iov, m.msg_hdr.msg_iovlen),
                    m.msg_len as usize,
                )
            }
        })
        .collect();
    let e = errno();
    match inside(|| replicate_input(fd, conn, &data)) {
        Ok(()) => {
            set_errno(e);
            r
        }
        Err(()) => {
            set_errno(libc::ECONNRESET);
            -1
        }
    }
}

/// Output commit: an output to a client, or a shutdown it can see, waits
/// until every input proposed before it (in this process, and in the
/// holder for a forked process) has committed. Blocking the call keeps the
/// socket's semantics as they are: nothing is buffered, no EAGAIN is made
/// up. If some input never commits, the output is never released (the
/// server is rebuilt).
fn before_output(fd: c_int) {
    if replicated(fd).is_none() {
        return;
    }
    let e = errno();
    inside(|| match proc() {
        Proc::Holder(a) => a.barrier(),
        Proc::Child(addr) => {
            if let Err(e) = child::barrier(addr) {
                refuse(&format!(
                    "a forked process of the server is about to answer a client but cannot reach \
                     the process that replicates its input: {e}"
                ));
            }
        }
        Proc::Candidate | Proc::Outside => {}
    });
    set_errno(e);
}

/// Hashes what the server wrote on a replicated connection.
fn after_output(fd: c_int, data: &[u8]) {
    let Some(conn) = replicated(fd) else {
        return;
    };
    let e = errno();
    inside(|| {
        REGISTRY.with(conn, |c| {
            c.used = true;
            c.out.update(data);
        });
        if let Proc::Holder(a) = proc() {
            a.wrote(data.len() as u64);
        }
    });
    set_errno(e);
}

/// [`after_output`] for the first `n` bytes of `bufs`.
///
/// # Safety
/// As [`gather`].
unsafe fn after_output_bufs(fd: c_int, n: ssize_t, bufs: impl Iterator<Item = (*const u8, usize)>) {
    if n <= 0 || in_hook() {
        return;
    }
    if REGISTRY.conn(fd).is_some() {
        // SAFETY: the caller's buffers, of which `n` bytes were sent.
        unsafe { with_gathered(bufs, n as usize, |data| after_output(fd, data)) };
    } else if let Some(id) = REGISTRY.replay_conn(fd) {
        note_replay_write(id, n as u64);
    }
}

/// The server answered `n` bytes on replay connection `id` (the gate lets
/// later input in once the answers before it are out).
fn note_replay_write(id: u64, n: u64) {
    let e = errno();
    inside(|| {
        if let Proc::Holder(a) = proc() {
            a.replay.gate.wrote(id, n, gettid());
        }
    });
    set_errno(e);
}

/// Intercepted `write`.
///
/// # Safety
/// As `write(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, count: size_t) -> ssize_t {
    before_output(fd);
    // SAFETY: forwarded unchanged.
    let n = unsafe { real::write(fd, buf, count) };
    // SAFETY: `buf` holds `count` >= `n` bytes.
    unsafe { after_output_bufs(fd, n, [(buf as *const u8, count)].into_iter()) };
    n
}

/// Intercepted `send`.
///
/// # Safety
/// As `send(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn send(fd: c_int, buf: *const c_void, len: size_t, flags: c_int) -> ssize_t {
    before_output(fd);
    // SAFETY: forwarded unchanged.
    let n = unsafe { real::send(fd, buf, len, flags) };
    // SAFETY: `buf` holds `len` >= `n` bytes.
    unsafe { after_output_bufs(fd, n, [(buf as *const u8, len)].into_iter()) };
    n
}

/// Intercepted `sendto`.
///
/// # Safety
/// As `sendto(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    len: size_t,
    flags: c_int,
    addr: *const sockaddr,
    alen: socklen_t,
) -> ssize_t {
    before_output(fd);
    // SAFETY: forwarded unchanged.
    let n = unsafe { real::sendto(fd, buf, len, flags, addr, alen) };
    // SAFETY: `buf` holds `len` >= `n` bytes.
    unsafe { after_output_bufs(fd, n, [(buf as *const u8, len)].into_iter()) };
    n
}

/// Intercepted `writev`.
///
/// # Safety
/// As `writev(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t {
    before_output(fd);
    // SAFETY: forwarded unchanged.
    let n = unsafe { real::writev(fd, iov, cnt) };
    // SAFETY: the caller's iovecs, of which the first `n` bytes were sent.
    unsafe { after_output_bufs(fd, n, iovecs(iov, cnt.max(0) as usize)) };
    n
}

/// Intercepted `sendmsg`.
///
/// # Safety
/// As `sendmsg(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    before_output(fd);
    // SAFETY: forwarded unchanged.
    let n = unsafe { real::sendmsg(fd, msg, flags) };
    if !msg.is_null() {
        // SAFETY: the caller's valid msghdr; its iovecs held what was sent.
        unsafe { after_output_bufs(fd, n, iovecs((*msg).msg_iov, (*msg).msg_iovlen)) };
    }
    n
}

/// Intercepted `sendmmsg`.
///
/// # Safety
/// As `sendmmsg(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendmmsg(
    fd: c_int,
    msgs: *mut libc::mmsghdr,
    vlen: c_uint,
    flags: c_int,
) -> c_int {
    before_output(fd);
    // SAFETY: forwarded unchanged.
    let r = unsafe { real::sendmmsg(fd, msgs, vlen, flags) };
    if r > 0 && !msgs.is_null() {
        // SAFETY: the first `r` messages were sent, `msg_len` bytes each.
        for m in unsafe { slice::from_raw_parts(msgs, r as usize) } {
            // SAFETY: as above.
            unsafe {
                after_output_bufs(
                    fd,
                    m.msg_len as ssize_t,
                    iovecs(m.msg_hdr.msg_iov, m.msg_hdr.msg_iovlen),
                )
            };
        }
    }
    r
}

/// Hashes `n` bytes of file `input` from `offset` (what `sendfile` or
/// `splice` sent from it) as output on `fd`.
fn hash_file_range(fd: c_int, input: c_int, mut offset: libc::off_t, n: ssize_t) {
    let mut left = n.max(0) as usize;
    let mut buf = vec![0u8; left.min(64 << 10)];
    while left > 0 {
        let want = left.min(buf.len());
        // SAFETY: `buf` has room for `want` bytes.
        let got = unsafe { libc::pread(input, buf.as_mut_ptr().cast(), want, offset) };
        if got <= 0 {
            return;
        }
        after_output(fd, &buf[..got as usize]);
        left -= got as usize;
        offset += got as libc::off_t;
    }
}

/// Intercepted `sendfile`: what it sends is output like a write's.
///
/// # Safety
/// As `sendfile(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendfile(
    out: c_int,
    input: c_int,
    offset: *mut libc::off_t,
    count: size_t,
) -> ssize_t {
    if replicated(out).is_none() {
        // SAFETY: forwarded unchanged.
        return unsafe { real::sendfile(out, input, offset, count) };
    }
    before_output(out);
    let start = if offset.is_null() {
        // SAFETY: lseek on the caller's descriptor, reading its position.
        unsafe { libc::lseek(input, 0, libc::SEEK_CUR) }
    } else {
        // SAFETY: the caller's valid offset.
        unsafe { *offset }
    };
    // SAFETY: forwarded unchanged.
    let n = unsafe { real::sendfile(out, input, offset, count) };
    if n > 0 && start >= 0 {
        let e = errno();
        inside(|| hash_file_range(out, input, start, n));
        set_errno(e);
    }
    n
}

/// Intercepted `splice`: bytes spliced into a replicated connection are
/// output. From a pipe they are first duplicated with `tee`, to be hashed.
///
/// # Safety
/// As `splice(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn splice(
    input: c_int,
    off_in: *mut libc::loff_t,
    out: c_int,
    off_out: *mut libc::loff_t,
    len: size_t,
    flags: c_uint,
) -> ssize_t {
    if replicated(out).is_none() {
        // SAFETY: forwarded unchanged.
        return unsafe { real::splice(input, off_in, out, off_out, len, flags) };
    }
    before_output(out);
    if !off_in.is_null() {
        // SAFETY: the caller's valid offset.
        let start = unsafe { *off_in };
        // SAFETY: forwarded unchanged.
        let n = unsafe { real::splice(input, off_in, out, off_out, len, flags) };
        if n > 0 {
            let e = errno();
            inside(|| hash_file_range(out, input, start, n));
            set_errno(e);
        }
        return n;
    }
    let e = errno();
    let mut p = [0 as c_int; 2];
    // SAFETY: pipe2 writes two descriptors into `p`.
    let copy = if unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } == 0 {
        // SAFETY: tee between the caller's pipe and ours, without consuming.
        unsafe { libc::tee(input, p[1], len, libc::SPLICE_F_NONBLOCK) }
    } else {
        -1
    };
    set_errno(e);
    let len = if copy > 0 { copy as size_t } else { len };
    // SAFETY: forwarded (at most what was duplicated, so it can be hashed).
    let n = unsafe { real::splice(input, off_in, out, off_out, len, flags) };
    if copy >= 0 {
        let e = errno();
        if n > 0 {
            let mut buf = vec![0u8; n as usize];
            // SAFETY: reading our own pipe into `buf`.
            let got = unsafe { libc::read(p[0], buf.as_mut_ptr().cast(), buf.len()) };
            if got > 0 {
                after_output(out, &buf[..got as usize]);
            }
        }
        // SAFETY: closing our own pipe.
        unsafe {
            real::close(p[0]);
            real::close(p[1]);
        }
        set_errno(e);
    }
    n
}

/// `fd` of connection `conn` is going away; if it was the connection's last
/// descriptor here, its end is replicated with the hash of its output,
/// unless this process never used it and may have handed it to a child
/// (PostgreSQL's postmaster closes what its backend serves).
fn close_conn(fd: c_int, conn: u64) {
    let Some(c) = REGISTRY.remove(fd) else { return };
    if c.broken || c.closed {
        return;
    }
    match proc() {
        Proc::Holder(a) if c.used || c.fork_gen == crate::registry::forks() => a.close(conn, c.out),
        Proc::Child(addr) if c.used => {
            let _ = child::close(addr, conn, c.out);
        }
        _ => {}
    }
}

/// The close work for descriptor `fd`, before it is closed.
fn closing(fd: c_int) {
    if let Some(conn) = replicated(fd) {
        let e = errno();
        inside(|| close_conn(fd, conn));
        set_errno(e);
    } else if !in_hook() {
        if let Some(id) = REGISTRY.replay_conn(fd) {
            let e = errno();
            inside(|| {
                if let Proc::Holder(a) = proc() {
                    a.replay.gate.closed(id);
                }
            });
            set_errno(e);
        }
        REGISTRY.remove_replay(fd);
        other_listener(fd).store(false, Ordering::Release);
    }
}

/// Intercepted `close`: a replicated connection's end is replicated, with
/// the hash of everything the server wrote on it.
///
/// # Safety
/// As `close(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    closing(fd);
    // SAFETY: forwarded unchanged.
    unsafe { real::close(fd) }
}

/// Intercepted `close_range`: each replicated descriptor in the range ends
/// as with `close`.
///
/// # Safety
/// As `close_range(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int {
    if flags & libc::CLOSE_RANGE_CLOEXEC as c_int == 0 && !in_hook() {
        for fd in REGISTRY.registered_in(first, last) {
            closing(fd);
        }
    }
    // SAFETY: forwarded unchanged.
    unsafe { real::close_range(first, last, flags) }
}

/// Intercepted `closefrom`.
///
/// # Safety
/// As `closefrom(3)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn closefrom(low: c_int) {
    if !in_hook() {
        for fd in REGISTRY.registered_in(low.max(0) as u32, u32::MAX) {
            closing(fd);
        }
    }
    // SAFETY: forwarded unchanged.
    unsafe { real::closefrom(low) }
}

/// A new descriptor `new` refers to the same socket as `old`: if `old` is
/// a replicated connection, so is `new`.
fn duplicated(old: c_int, new: c_int) {
    if new < 0 || in_hook() {
        return;
    }
    let e = errno();
    inside(|| {
        // dup2/dup3 onto a replicated descriptor closes it first.
        if new != old
            && let Some(gone) = REGISTRY.conn(new)
        {
            close_conn(new, gone);
        }
        if let Some(conn) = REGISTRY.conn(old) {
            REGISTRY.add(new, conn);
        }
        if let Some(id) = REGISTRY.replay_conn(old) {
            REGISTRY.add_replay(new, id);
        }
        if other_listener(old).load(Ordering::Acquire) {
            other_listener(new).store(true, Ordering::Release);
        }
    });
    set_errno(e);
}

/// Intercepted `dup`.
///
/// # Safety
/// As `dup(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    // SAFETY: forwarded unchanged.
    let new = unsafe { real::dup(fd) };
    duplicated(fd, new);
    new
}

/// Intercepted `dup2`.
///
/// # Safety
/// As `dup2(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup2(fd: c_int, new: c_int) -> c_int {
    // SAFETY: forwarded unchanged.
    let r = unsafe { real::dup2(fd, new) };
    duplicated(fd, r);
    r
}

/// Intercepted `dup3`.
///
/// # Safety
/// As `dup3(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn dup3(fd: c_int, new: c_int, flags: c_int) -> c_int {
    // SAFETY: forwarded unchanged.
    let r = unsafe { real::dup3(fd, new, flags) };
    duplicated(fd, r);
    r
}

/// Intercepted `fcntl`, for `F_DUPFD` and `F_DUPFD_CLOEXEC` (how Rust's
/// `try_clone` duplicates a socket).
///
/// `fcntl` is variadic; its optional argument is an int or a pointer, which
/// the x86-64 and AArch64 calling conventions pass in the same register as
/// a fixed `long` third argument, so it is taken as one and passed on as is.
///
/// # Safety
/// As `fcntl(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: libc::c_long) -> c_int {
    // SAFETY: forwarded unchanged (see above for the variadic argument).
    let r = unsafe { real::fcntl(fd, cmd, arg) };
    if cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC {
        duplicated(fd, r);
    }
    r
}

/// Intercepted `fcntl64` (what programs built with 64-bit file offsets
/// call), as [`fcntl`].
///
/// # Safety
/// As `fcntl(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: libc::c_long) -> c_int {
    // SAFETY: forwarded unchanged (see `fcntl`).
    let r = unsafe { real::fcntl64(fd, cmd, arg) };
    if cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC {
        duplicated(fd, r);
    }
    r
}

/// Intercepted `epoll_ctl`: a replay connection the server watches
/// edge-triggered is never read ahead of its turn (an `EAGAIN` would lose
/// its edge, see [`crate::gate`]).
///
/// # Safety
/// As `epoll_ctl(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn epoll_ctl(
    epfd: c_int,
    op: c_int,
    fd: c_int,
    event: *mut libc::epoll_event,
) -> c_int {
    if op != libc::EPOLL_CTL_DEL && !event.is_null() && !in_hook() {
        // SAFETY: the caller's valid event.
        let events = unsafe { (*event).events };
        if events & libc::EPOLLET as u32 != 0
            && let Some(id) = REGISTRY.replay_conn(fd)
        {
            let e = errno();
            inside(|| {
                if let Proc::Holder(a) = proc() {
                    a.replay.gate.edge_triggered(id);
                }
            });
            set_errno(e);
        }
    }
    // SAFETY: forwarded unchanged.
    unsafe { real::epoll_ctl(epfd, op, fd, event) }
}

/// Intercepted `shutdown`: a FIN the client can see waits for the commits
/// before it, as output does (the CLOSE at `close` carries the connection's
/// final output).
///
/// # Safety
/// As `shutdown(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shutdown(fd: c_int, how: c_int) -> c_int {
    if how != libc::SHUT_RD {
        before_output(fd);
    }
    // SAFETY: forwarded unchanged.
    unsafe { real::shutdown(fd, how) }
}
