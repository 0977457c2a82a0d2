//! The interposed libc functions.
//!
//! Each hook calls the real function first, then, only for a replicated
//! client connection in the replicated process, does its work inside the
//! library (where nested libc calls pass straight through) and restores
//! `errno` before returning.

use std::slice;

use apus_core::EntryKind;
use libc::{c_int, c_void, iovec, msghdr, size_t, sockaddr, socklen_t, ssize_t};

use crate::payload::Close;
use crate::{REGISTRY, Serving, apus, connect_payload, in_hook, inside, real, settings};

fn errno() -> c_int {
    // SAFETY: __errno_location returns this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

fn set_errno(v: c_int) {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = v }
}

/// The local or peer port of a socket.
fn port(fd: c_int, peer: bool) -> Option<u16> {
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
        // SAFETY: the family says which address type `ss` holds.
        libc::AF_INET => Some(u16::from_be(unsafe {
            (*(&raw const ss).cast::<libc::sockaddr_in>()).sin_port
        })),
        // SAFETY: as above.
        libc::AF_INET6 => Some(u16::from_be(unsafe {
            (*(&raw const ss).cast::<libc::sockaddr_in6>()).sin6_port
        })),
        _ => None,
    }
}

fn is_app_listener(fd: c_int) -> bool {
    settings().is_some_and(|s| port(fd, false) == Some(s.app.port()))
}

/// Intercepted `listen`: the server listening on its app address starts
/// replication.
///
/// # Safety
/// As `listen(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    // SAFETY: forwarded unchanged.
    let r = unsafe { real::listen(fd, backlog) };
    if r == 0 && !in_hook() {
        let e = errno();
        if inside(|| is_app_listener(fd)) {
            let _ = apus();
        }
        set_errno(e);
    }
    r
}

enum Verdict {
    Keep,
    Reject,
}

fn on_accept(fd: c_int) -> Verdict {
    let Some(a) = apus() else {
        return Verdict::Keep;
    };
    if let Some(id) = port(fd, true).and_then(|p| a.replay.replay_port(p)) {
        // Our own replay connection into this server: not a client, but its
        // reads are watched so replay proceeds in log order.
        REGISTRY.add_replay(fd, id);
        return Verdict::Keep;
    }
    match a.serving() {
        Serving::Leader => {}
        Serving::TakingOver => return Verdict::Reject,
        // A real client reached a follower: it must use the leader (or,
        // if so configured, may inspect this replica unreplicated).
        Serving::Follower => {
            return match a.follower_clients {
                apus::FollowerClients::Serve => Verdict::Keep,
                apus::FollowerClients::Refuse => Verdict::Reject,
            };
        }
    }
    match a.replicate(EntryKind::Connect, 0, &connect_payload(a)) {
        Ok(index) if REGISTRY.add(fd, index) => Verdict::Keep,
        _ => Verdict::Reject,
    }
}

unsafe fn accept_common(lfd: c_int, accept: impl Fn() -> c_int) -> c_int {
    loop {
        let fd = accept();
        if fd < 0 || in_hook() {
            return fd;
        }
        let e = errno();
        let verdict = inside(|| {
            if is_app_listener(lfd) {
                on_accept(fd)
            } else {
                Verdict::Keep
            }
        });
        match verdict {
            Verdict::Keep => {
                set_errno(e);
                return fd;
            }
            Verdict::Reject => {
                // SAFETY: `fd` was just accepted and is ours to close.
                unsafe {
                    real::close(fd);
                }
            }
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

/// Counts what the server read from a replay connection (followers).
fn note_replay_read(fd: c_int, n: ssize_t) {
    if n > 0
        && !in_hook()
        && let Some(id) = REGISTRY.replay_conn(fd)
    {
        let e = errno();
        inside(|| REGISTRY.consumed(id, n as u64));
        set_errno(e);
    }
}

/// The replicated connection behind `fd`, if this call must be replicated.
fn replicated(fd: c_int) -> Option<u64> {
    if in_hook() {
        return None;
    }
    let conn = REGISTRY.conn(fd)?;
    // A forked child (Redis BGSAVE) inherits the table but not the node.
    settings()?;
    Some(conn)
}

/// Replicates what a read returned (`data` empty: end of stream). On
/// failure the connection is broken and the caller reports a reset.
fn replicate_input(fd: c_int, conn: u64, data: &[u8]) -> Result<(), ()> {
    let Some(a) = apus() else {
        return Ok(());
    };
    let result = if data.is_empty() {
        a.replicate(EntryKind::Data, conn, &[]).map(|_| ())
    } else {
        data.chunks(a.max_payload)
            .try_for_each(|chunk| a.replicate(EntryKind::Data, conn, chunk).map(|_| ()))
    };
    result.map_err(|e| {
        tracing::warn!(fd, conn, error = %e, "input could not be replicated: closing the connection");
        REGISTRY.with(conn, |c| c.broken = true);
        // SAFETY: shutdown on the server's descriptor; it stays open.
        unsafe {
            real::shutdown(fd, libc::SHUT_RDWR);
        }
    })
}

/// Common tail of every read-like hook: `n` bytes arrived in `parts`.
fn after_input(fd: c_int, conn: u64, n: ssize_t, parts: &[&[u8]]) -> ssize_t {
    if n < 0 {
        return n;
    }
    let e = errno();
    let mut data = Vec::with_capacity(n as usize);
    let mut left = n as usize;
    for p in parts {
        let take = left.min(p.len());
        data.extend_from_slice(&p[..take]);
        left -= take;
    }
    match inside(|| replicate_input(fd, conn, &data)) {
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

fn broken(conn: u64) -> bool {
    inside(|| REGISTRY.with(conn, |c| c.broken).unwrap_or(true))
}

/// Intercepted `read`.
///
/// # Safety
/// As `read(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, count: size_t) -> ssize_t {
    let Some(conn) = replicated(fd) else {
        // SAFETY: forwarded unchanged.
        let n = unsafe { real::read(fd, buf, count) };
        note_replay_read(fd, n);
        return n;
    };
    if broken(conn) {
        return 0;
    }
    // SAFETY: forwarded unchanged.
    let n = unsafe { real::read(fd, buf, count) };
    let got = if n > 0 {
        // SAFETY: the kernel wrote `n` bytes at `buf`.
        unsafe { slice::from_raw_parts(buf.cast::<u8>(), n as usize) }
    } else {
        &[]
    };
    after_input(fd, conn, n, &[got])
}

/// Intercepted `recv`.
///
/// # Safety
/// As `recv(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recv(fd: c_int, buf: *mut c_void, len: size_t, flags: c_int) -> ssize_t {
    let conn = replicated(fd).filter(|_| flags & libc::MSG_PEEK == 0);
    let Some(conn) = conn else {
        // SAFETY: forwarded unchanged.
        let n = unsafe { real::recv(fd, buf, len, flags) };
        if flags & libc::MSG_PEEK == 0 {
            note_replay_read(fd, n);
        }
        return n;
    };
    if broken(conn) {
        return 0;
    }
    // SAFETY: forwarded unchanged.
    let n = unsafe { real::recv(fd, buf, len, flags) };
    let got = if n > 0 {
        // SAFETY: the kernel wrote `n` bytes at `buf`.
        unsafe { slice::from_raw_parts(buf.cast::<u8>(), n as usize) }
    } else {
        &[]
    };
    after_input(fd, conn, n, &[got])
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
        // SAFETY: forwarded unchanged.
        let n = unsafe { real::recvfrom(fd, buf, len, flags, addr, alen) };
        if flags & libc::MSG_PEEK == 0 {
            note_replay_read(fd, n);
        }
        return n;
    };
    if broken(conn) {
        return 0;
    }
    // SAFETY: forwarded unchanged.
    let n = unsafe { real::recvfrom(fd, buf, len, flags, addr, alen) };
    let got = if n > 0 {
        // SAFETY: the kernel wrote `n` bytes at `buf`.
        unsafe { slice::from_raw_parts(buf.cast::<u8>(), n as usize) }
    } else {
        &[]
    };
    after_input(fd, conn, n, &[got])
}

/// The buffers of an iovec array.
///
/// # Safety
/// `iov` points to `n` valid iovecs.
unsafe fn parts<'a>(iov: *const iovec, n: usize) -> Vec<&'a [u8]> {
    if iov.is_null() {
        return Vec::new();
    }
    // SAFETY: the caller guarantees `n` iovecs at `iov`.
    let v = unsafe { slice::from_raw_parts(iov, n) };
    v.iter()
        .filter(|i| !i.iov_base.is_null())
        // SAFETY: each iovec describes a buffer of `iov_len` bytes.
        .map(|i| unsafe { slice::from_raw_parts(i.iov_base.cast::<u8>(), i.iov_len) })
        .collect()
}

/// Intercepted `readv`.
///
/// # Safety
/// As `readv(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t {
    let Some(conn) = replicated(fd) else {
        // SAFETY: forwarded unchanged.
        let got = unsafe { real::readv(fd, iov, n) };
        note_replay_read(fd, got);
        return got;
    };
    if broken(conn) {
        return 0;
    }
    // SAFETY: forwarded unchanged.
    let got = unsafe { real::readv(fd, iov, n) };
    // SAFETY: the caller's iovecs, now filled with `got` bytes in order.
    let p = unsafe { parts(iov, n.max(0) as usize) };
    after_input(fd, conn, got, &p)
}

/// Intercepted `recvmsg`.
///
/// # Safety
/// As `recvmsg(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    let conn = replicated(fd).filter(|_| flags & libc::MSG_PEEK == 0 && !msg.is_null());
    let Some(conn) = conn else {
        // SAFETY: forwarded unchanged.
        let n = unsafe { real::recvmsg(fd, msg, flags) };
        if flags & libc::MSG_PEEK == 0 {
            note_replay_read(fd, n);
        }
        return n;
    };
    if broken(conn) {
        return 0;
    }
    // SAFETY: forwarded unchanged.
    let got = unsafe { real::recvmsg(fd, msg, flags) };
    // SAFETY: `msg` is the caller's valid msghdr; its iovecs hold `got` bytes.
    let p = unsafe { parts((*msg).msg_iov, (*msg).msg_iovlen) };
    after_input(fd, conn, got, &p)
}

/// Hashes what the server wrote on a replicated connection.
fn after_output(fd: c_int, n: ssize_t, parts: &[&[u8]]) {
    if n <= 0 {
        return;
    }
    let Some(conn) = replicated(fd) else {
        return;
    };
    let e = errno();
    inside(|| {
        REGISTRY.with(conn, |c| {
            let mut left = n as usize;
            for p in parts {
                let take = left.min(p.len());
                c.out.update(&p[..take]);
                left -= take;
            }
        })
    });
    set_errno(e);
}

/// Intercepted `write`.
///
/// # Safety
/// As `write(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn write(fd: c_int, buf: *const c_void, count: size_t) -> ssize_t {
    // SAFETY: forwarded unchanged.
    let n = unsafe { real::write(fd, buf, count) };
    if n > 0 && !in_hook() && REGISTRY.conn(fd).is_some() {
        // SAFETY: `buf` holds `count` >= `n` bytes.
        after_output(
            fd,
            n,
            &[unsafe { slice::from_raw_parts(buf.cast::<u8>(), count) }],
        );
    }
    n
}

/// Intercepted `send`.
///
/// # Safety
/// As `send(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn send(fd: c_int, buf: *const c_void, len: size_t, flags: c_int) -> ssize_t {
    // SAFETY: forwarded unchanged.
    let n = unsafe { real::send(fd, buf, len, flags) };
    if n > 0 && !in_hook() && REGISTRY.conn(fd).is_some() {
        // SAFETY: `buf` holds `len` >= `n` bytes.
        after_output(
            fd,
            n,
            &[unsafe { slice::from_raw_parts(buf.cast::<u8>(), len) }],
        );
    }
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
    // SAFETY: forwarded unchanged.
    let n = unsafe { real::sendto(fd, buf, len, flags, addr, alen) };
    if n > 0 && !in_hook() && REGISTRY.conn(fd).is_some() {
        // SAFETY: `buf` holds `len` >= `n` bytes.
        after_output(
            fd,
            n,
            &[unsafe { slice::from_raw_parts(buf.cast::<u8>(), len) }],
        );
    }
    n
}

/// Intercepted `writev`.
///
/// # Safety
/// As `writev(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn writev(fd: c_int, iov: *const iovec, cnt: c_int) -> ssize_t {
    // SAFETY: forwarded unchanged.
    let n = unsafe { real::writev(fd, iov, cnt) };
    if n > 0 && !in_hook() && REGISTRY.conn(fd).is_some() {
        // SAFETY: the caller's iovecs, of which the first `n` bytes were sent.
        let p = unsafe { parts(iov, cnt.max(0) as usize) };
        after_output(fd, n, &p);
    }
    n
}

/// Intercepted `sendmsg`.
///
/// # Safety
/// As `sendmsg(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    // SAFETY: forwarded unchanged.
    let n = unsafe { real::sendmsg(fd, msg, flags) };
    if n > 0 && !in_hook() && !msg.is_null() && REGISTRY.conn(fd).is_some() {
        // SAFETY: the caller's valid msghdr; its iovecs held what was sent.
        let p = unsafe { parts((*msg).msg_iov, (*msg).msg_iovlen) };
        after_output(fd, n, &p);
    }
    n
}

/// `fd` of connection `conn` is going away; if it was the connection's last
/// descriptor, its end is replicated with the hash of its output.
fn close_conn(fd: c_int, conn: u64) {
    if let Some(c) = REGISTRY.remove(fd)
        && !c.broken
        && !c.closed
        && let Some(a) = apus()
    {
        let close = Close {
            bytes_out: c.out.bytes,
            hash_out: c.out.hash,
        };
        let _ = a.replicate(EntryKind::Close, conn, &close.encode());
    }
}

/// Intercepted `close`: a replicated connection's end is replicated, with
/// the hash of everything the server wrote on it.
///
/// # Safety
/// As `close(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if let Some(conn) = replicated(fd) {
        let e = errno();
        inside(|| close_conn(fd, conn));
        set_errno(e);
    } else if !in_hook() {
        REGISTRY.remove_replay(fd);
    }
    // SAFETY: forwarded unchanged.
    unsafe { real::close(fd) }
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

/// Intercepted `shutdown`: passes through (the CLOSE at `close` carries the
/// connection's final output).
///
/// # Safety
/// As `shutdown(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn shutdown(fd: c_int, how: c_int) -> c_int {
    // SAFETY: forwarded unchanged.
    unsafe { real::shutdown(fd, how) }
}
