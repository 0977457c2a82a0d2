//! The few system calls std does not wrap: an eventfd to wake a blocked
//! engine, and `ppoll` to block on many sockets with a microsecond timeout.
//! Every `unsafe` of the crate is here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use apus_core::Wake;

/// An eventfd: `wake` makes it readable, `drain` resets it.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// A new, non-blocking eventfd.
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor we own and close exactly once.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(EventFd { fd })
    }

    /// Clears a pending wake-up.
    pub fn drain(&self) {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a valid, aligned u64 we own; a
        // non-blocking eventfd with nothing pending returns EAGAIN, ignored.
        let _ = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut v as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Wake for EventFd {
    fn wake(&self) {
        let v = 1u64;
        // SAFETY: writes 8 bytes from a valid u64; the only possible failure
        // (counter overflow, EAGAIN) still leaves the fd readable.
        let _ = unsafe {
            libc::write(
                self.fd.as_raw_fd(),
                (&v as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// One descriptor to wait on.
#[derive(Clone, Copy, Debug)]
pub struct Interest {
    /// The descriptor.
    pub fd: RawFd,
    /// Wake when it is writable too.
    pub writable: bool,
}

/// Blocks until one of `fds` is readable (or writable, where asked) or
/// `timeout` passes; returns how many are ready. Interrupted waits return
/// early with 0.
pub fn wait(fds: &[Interest], buf: &mut Vec<libc::pollfd>, timeout: Duration) -> io::Result<usize> {
    buf.clear();
    buf.extend(fds.iter().map(|i| libc::pollfd {
        fd: i.fd,
        events: libc::POLLIN | if i.writable { libc::POLLOUT } else { 0 },
        revents: 0,
    }));
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: `buf` holds `buf.len()` initialised pollfd structs that live
    // across the call; `ts` is a valid timespec; no signal mask is passed.
    let r = unsafe {
        libc::ppoll(
            buf.as_mut_ptr(),
            buf.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
        return Ok(0);
    }
    Ok(r as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wake_makes_the_fd_ready_and_drain_clears_it() {
        let e = EventFd::new().unwrap();
        let fds = [Interest {
            fd: e.as_raw_fd(),
            writable: false,
        }];
        let mut buf = Vec::new();
        assert_eq!(wait(&fds, &mut buf, Duration::ZERO).unwrap(), 0);
        e.wake();
        // Ready at once: a long timeout would only matter if the wake failed.
        assert_eq!(wait(&fds, &mut buf, Duration::from_secs(10)).unwrap(), 1);
        e.drain();
        assert_eq!(wait(&fds, &mut buf, Duration::ZERO).unwrap(), 0);
    }
}
