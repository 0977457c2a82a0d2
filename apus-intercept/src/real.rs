//! The real libc functions behind the hooks, found with `dlsym(RTLD_NEXT)`.

use std::ffi::CStr;
use std::sync::OnceLock;

use libc::{c_int, c_void, iovec, msghdr, size_t, sockaddr, socklen_t, ssize_t};

fn lookup(name: &CStr) -> usize {
    // SAFETY: dlsym with RTLD_NEXT and a NUL-terminated name has no
    // preconditions; a null result means the symbol does not exist.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
    assert!(!p.is_null(), "apus-intercept: libc has no {name:?}");
    p as usize
}

macro_rules! real {
    ($name:ident, $sym:literal, fn($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty) => {
        /// Calls the real function.
        ///
        /// # Safety
        /// The same contract as the libc function of that name.
        pub unsafe fn $name($($arg: $ty),*) -> $ret {
            static PTR: OnceLock<usize> = OnceLock::new();
            let p = *PTR.get_or_init(|| lookup($sym));
            // SAFETY: `p` is the address of the libc function with exactly
            // this signature (POSIX), found by name.
            let f: unsafe extern "C" fn($($ty),*) -> $ret = unsafe { std::mem::transmute(p) };
            // SAFETY: the caller upholds the function's contract.
            unsafe { f($($arg),*) }
        }
    };
}

real!(
    accept,
    c"accept",
    fn(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t) -> c_int
);
real!(
    accept4,
    c"accept4",
    fn(fd: c_int, addr: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int
);
real!(listen, c"listen", fn(fd: c_int, backlog: c_int) -> c_int);
real!(
    read,
    c"read",
    fn(fd: c_int, buf: *mut c_void, count: size_t) -> ssize_t
);
real!(
    recv,
    c"recv",
    fn(fd: c_int, buf: *mut c_void, len: size_t, flags: c_int) -> ssize_t
);
real!(
    recvfrom,
    c"recvfrom",
    fn(
        fd: c_int,
        buf: *mut c_void,
        len: size_t,
        flags: c_int,
        addr: *mut sockaddr,
        alen: *mut socklen_t,
    ) -> ssize_t
);
real!(
    recvmsg,
    c"recvmsg",
    fn(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t
);
real!(
    readv,
    c"readv",
    fn(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t
);
real!(
    write,
    c"write",
    fn(fd: c_int, buf: *const c_void, count: size_t) -> ssize_t
);
real!(
    send,
    c"send",
    fn(fd: c_int, buf: *const c_void, len: size_t, flags: c_int) -> ssize_t
);
real!(
    sendto,
    c"sendto",
    fn(
        fd: c_int,
        buf: *const c_void,
        len: size_t,
        flags: c_int,
        addr: *const sockaddr,
        alen: socklen_t,
    ) -> ssize_t
);
real!(
    sendmsg,
    c"sendmsg",
    fn(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t
);
real!(
    writev,
    c"writev",
    fn(fd: c_int, iov: *const iovec, n: c_int) -> ssize_t
);
real!(close, c"close", fn(fd: c_int) -> c_int);
real!(
    epoll_ctl,
    c"epoll_ctl",
    fn(epfd: c_int, op: c_int, fd: c_int, event: *mut libc::epoll_event) -> c_int
);
real!(shutdown, c"shutdown", fn(fd: c_int, how: c_int) -> c_int);
real!(dup, c"dup", fn(fd: c_int) -> c_int);
real!(dup2, c"dup2", fn(fd: c_int, new: c_int) -> c_int);
real!(
    dup3,
    c"dup3",
    fn(fd: c_int, new: c_int, flags: c_int) -> c_int
);
real!(
    fcntl,
    c"fcntl",
    fn(fd: c_int, cmd: c_int, arg: libc::c_long) -> c_int
);
real!(
    fcntl64,
    c"fcntl64",
    fn(fd: c_int, cmd: c_int, arg: libc::c_long) -> c_int
);
real!(
    read_chk,
    c"__read_chk",
    fn(fd: c_int, buf: *mut c_void, count: size_t, buflen: size_t) -> ssize_t
);
real!(
    recv_chk,
    c"__recv_chk",
    fn(fd: c_int, buf: *mut c_void, len: size_t, buflen: size_t, flags: c_int) -> ssize_t
);
real!(
    recvfrom_chk,
    c"__recvfrom_chk",
    fn(
        fd: c_int,
        buf: *mut c_void,
        len: size_t,
        buflen: size_t,
        flags: c_int,
        addr: *mut sockaddr,
        alen: *mut socklen_t,
    ) -> ssize_t
);
real!(
    recvmmsg,
    c"recvmmsg",
    fn(
        fd: c_int,
        msgs: *mut libc::mmsghdr,
        n: libc::c_uint,
        flags: c_int,
        timeout: *mut libc::timespec,
    ) -> c_int
);
real!(
    sendmmsg,
    c"sendmmsg",
    fn(fd: c_int, msgs: *mut libc::mmsghdr, n: libc::c_uint, flags: c_int) -> c_int
);
real!(
    sendfile,
    c"sendfile",
    fn(out: c_int, input: c_int, offset: *mut libc::off_t, count: size_t) -> ssize_t
);
real!(
    splice,
    c"splice",
    fn(
        input: c_int,
        off_in: *mut libc::loff_t,
        out: c_int,
        off_out: *mut libc::loff_t,
        len: size_t,
        flags: libc::c_uint,
    ) -> ssize_t
);
real!(
    close_range,
    c"close_range",
    fn(first: libc::c_uint, last: libc::c_uint, flags: c_int) -> c_int
);
real!(closefrom, c"closefrom", fn(low: c_int) -> ());
