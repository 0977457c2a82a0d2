//! Which file descriptors are replicated client connections.
//!
//! Every hooked call first asks [`Registry::conn`]: a lock-free array lookup
//! indexed by the descriptor, so the library's own threads (transport,
//! engine, replayer) and every non-client descriptor of the server pass
//! straight through at the cost of one atomic load.
//!
//! A replicated connection's state sits in one of `SHARDS` (64) tables, chosen
//! by its id, each with its own lock: a read or write of one connection
//! takes no lock that every other connection's reads and writes take.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::payload::StreamHash;

/// Descriptors at or above this are never replicated (and pass through).
pub const MAX_FD: usize = 1 << 16;
/// Tables the connections are spread over (by id).
const SHARDS: usize = 64;
const _: () = assert!(SHARDS.is_power_of_two() && SHARDS <= 256);

/// A replicated client connection on the leader.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    /// Its id: the index of its CONNECT entry.
    pub id: u64,
    /// What the server wrote on it.
    pub out: StreamHash,
    /// The connection can no longer be replicated (leadership lost, or a
    /// proposal failed): reads now report end of stream.
    pub broken: bool,
    /// A CLOSE has been proposed for it.
    pub closed: bool,
    /// Descriptors referring to it (duplicates count: the connection ends
    /// when the last one closes).
    pub fds: u32,
    /// This process has read from it or written to it.
    pub used: bool,
    /// A forked process told the holder it waits for more input on it
    /// (until its next read returns some).
    pub waits_said: bool,
    /// [`forks`] when it was registered: a process that forked since may
    /// have handed it to a child.
    pub fork_gen: u64,
}

/// Forks of this process so far (see [`Registry::forked`]).
static FORKS: AtomicU64 = AtomicU64::new(0);

/// How many times this process has forked.
pub fn forks() -> u64 {
    FORKS.load(Ordering::Acquire)
}

thread_local! {
    /// The registry's locks, held by the forking thread across `fork`, so
    /// the child's copy is never taken in the middle of an update.
    static FORK_GUARDS: std::cell::RefCell<Vec<Box<dyn std::any::Any>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// The table of replicated descriptors.
pub struct Registry {
    ids: Box<[AtomicU64]>,
    /// Connections by id, in [`SHARDS`] tables (see [`Registry::shard`]).
    conns: Box<[Mutex<HashMap<u64, Conn>>]>,
    /// Server-side descriptors of replay connections (followers), by fd:
    /// the connection id they replay.
    replay_ids: Box<[AtomicU64]>,
    /// How far the server has got with each replay connection.
    consumed: Mutex<HashMap<u64, Progress>>,
    consumed_changed: Condvar,
    /// Replay descriptors on which this process has said it waits for
    /// input (children, see [`Registry::idle`]), until it reads again.
    idle_said: Box<[AtomicBool]>,
}

/// A replay connection, as the server reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bytes the server has read.
    pub consumed: u64,
    /// What it had read when it last asked for more with nothing left to
    /// read: it had finished with everything up to there.
    pub idle_at: u64,
    /// The forked process of the server that reads it (0: this one), which
    /// runs concurrently with the others.
    pub reader: u32,
    /// The thread of this process that read it last (its tid; 0: none yet,
    /// or a forked process reads it).
    pub thread: u32,
}

/// Who read replayed input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reader {
    /// A thread of this process, by tid.
    Thread(u32),
    /// A forked process of the server, by pid.
    Process(u32),
    /// Not known here (a forked process counting its own reads).
    Unknown,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            ids: (0..MAX_FD).map(|_| AtomicU64::new(0)).collect(),
            conns: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            replay_ids: (0..MAX_FD).map(|_| AtomicU64::new(0)).collect(),
            consumed: Mutex::new(HashMap::new()),
            consumed_changed: Condvar::new(),
            idle_said: (0..MAX_FD).map(|_| AtomicBool::new(false)).collect(),
        }
    }
}

impl Registry {
    /// The connection id behind `fd`, if it is a replicated connection.
    pub fn conn(&self, fd: i32) -> Option<u64> {
        let i = usize::try_from(fd).ok().filter(|&i| i < MAX_FD)?;
        match self.ids[i].load(Ordering::Acquire) {
            0 => None,
            id => Some(id),
        }
    }

    /// Registers `fd` as (another descriptor of) connection `id`.
    pub fn add(&self, fd: i32, id: u64) -> bool {
        let Some(i) = usize::try_from(fd).ok().filter(|&i| i < MAX_FD) else {
            return false;
        };
        {
            let mut t = self.shard(id);
            let c = t.entry(id).or_insert(Conn {
                id,
                fork_gen: forks(),
                ..Conn::default()
            });
            c.fds += 1;
        }
        // A descriptor number being reused while still registered would
        // mean a close we did not see: do not leak its count.
        let old = self.ids[i].swap(id, Ordering::AcqRel);
        if old != 0
            && let Some(o) = self.shard(old).get_mut(&old)
        {
            o.fds = o.fds.saturating_sub(1);
        }
        true
    }

    /// Forgets `fd` (it is being closed). Returns its connection when this
    /// was the connection's last descriptor.
    pub fn remove(&self, fd: i32) -> Option<Conn> {
        let i = usize::try_from(fd).ok().filter(|&i| i < MAX_FD)?;
        let id = self.ids[i].swap(0, Ordering::AcqRel);
        if id == 0 {
            return None;
        }
        let mut t = self.shard(id);
        let c = t.get_mut(&id)?;
        c.fds = c.fds.saturating_sub(1);
        if c.fds == 0 { t.remove(&id) } else { None }
    }

    /// Runs `f` on connection `id`.
    pub fn with<R>(&self, id: u64, f: impl FnOnce(&mut Conn) -> R) -> Option<R> {
        self.shard(id).get_mut(&id).map(f)
    }

    /// Marks every connection broken, then calls `end` on each descriptor
    /// that still refers to one, under its connection's lock.
    ///
    /// The server closes broken connections as it finds them (their reads
    /// say end of stream), and the kernel hands the freed number to the
    /// next descriptor it opens. So a descriptor is looked at again under
    /// the lock that its close takes (in [`Registry::remove`]) before its
    /// real close: `end` never reaches a number that was closed and reused.
    /// (CI: a deposed leader's shutdown of its old clients' descriptors hit
    /// replay connections the server had just accepted under those numbers,
    /// and the replica's server never got that input.)
    pub fn break_all(&self, mut end: impl FnMut(i32)) {
        for shard in &self.conns {
            for c in lock(shard).values_mut() {
                c.broken = true;
            }
        }
        for i in 0..MAX_FD {
            let id = self.ids[i].load(Ordering::Acquire);
            if id == 0 {
                continue;
            }
            let table = self.shard(id);
            if self.ids[i].load(Ordering::Acquire) == id {
                debug_assert!(table.get(&id).is_some_and(|c| c.broken && c.fds > 0));
                end(i as i32);
            }
        }
    }

    /// `pthread_atfork` prepare: takes every lock (see `FORK_GUARDS`).
    pub fn before_fork(&'static self) {
        // Always in the same order (shards, then `consumed`): no deadlock
        // with another thread forking.
        FORK_GUARDS.with(|g| {
            let mut g = g.borrow_mut();
            for shard in &self.conns {
                g.push(Box::new(lock(shard)));
            }
            g.push(Box::new(lock(&self.consumed)));
        });
    }

    /// `pthread_atfork` parent and child: releases the locks. In the child,
    /// nothing it inherited has been used by it yet.
    pub fn after_fork(&'static self, child: bool) {
        FORK_GUARDS.with(|g| g.borrow_mut().clear());
        if child {
            for shard in &self.conns {
                for c in lock(shard).values_mut() {
                    c.used = false;
                }
            }
        } else {
            FORKS.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Descriptors in `first..=last` that are replicated or replay
    /// connections (for `close_range` and `closefrom`).
    pub fn registered_in(&self, first: u32, last: u32) -> Vec<i32> {
        let last = (last as usize).min(MAX_FD - 1);
        (first as usize..=last)
            .filter(|&i| {
                self.ids[i].load(Ordering::Acquire) != 0
                    || self.replay_ids[i].load(Ordering::Acquire) != 0
            })
            .map(|i| i as i32)
            .collect()
    }

    /// The replay connection whose server side is `fd`, if any.
    pub fn replay_conn(&self, fd: i32) -> Option<u64> {
        let i = usize::try_from(fd).ok().filter(|&i| i < MAX_FD)?;
        match self.replay_ids[i].load(Ordering::Acquire) {
            0 => None,
            id => Some(id),
        }
    }

    /// `fd` is (a descriptor of) the server side of replay connection `id`.
    pub fn add_replay(&self, fd: i32, id: u64) {
        if let Some(i) = usize::try_from(fd).ok().filter(|&i| i < MAX_FD) {
            self.replay_ids[i].store(id, Ordering::Release);
        }
    }

    /// `fd` is being closed.
    pub fn remove_replay(&self, fd: i32) {
        if let Some(i) = usize::try_from(fd).ok().filter(|&i| i < MAX_FD) {
            self.replay_ids[i].store(0, Ordering::Release);
        }
    }

    /// The server read `n` bytes of replay connection `id`, in `reader`.
    /// Returns what it has read in all.
    pub fn consumed(&self, id: u64, n: u64, reader: Reader) -> u64 {
        let total = {
            let mut c = lock(&self.consumed);
            let p = c.entry(id).or_default();
            p.consumed += n;
            match reader {
                Reader::Thread(tid) => p.thread = tid,
                Reader::Process(pid) => p.reader = pid,
                Reader::Unknown => {}
            }
            p.consumed
        };
        self.consumed_changed.notify_all();
        total
    }

    /// The server asked for more of replay connection `id` with nothing
    /// left to read, after reading `total` bytes.
    pub fn idle(&self, id: u64, total: u64) {
        {
            let mut c = lock(&self.consumed);
            let p = c.entry(id).or_default();
            p.idle_at = p.idle_at.max(total);
        }
        self.consumed_changed.notify_all();
    }

    /// The progress of replay connection `id`.
    pub fn progress(&self, id: u64) -> Progress {
        lock(&self.consumed).get(&id).copied().unwrap_or_default()
    }

    /// Whether this process should say it waits for input on replay
    /// descriptor `fd` (once per wait: `reading` clears it).
    pub fn say_idle(&self, fd: i32, reading: bool) -> bool {
        let Some(flag) = usize::try_from(fd).ok().and_then(|i| self.idle_said.get(i)) else {
            return false;
        };
        if reading {
            flag.store(false, Ordering::Relaxed);
            false
        } else {
            !flag.swap(true, Ordering::Relaxed)
        }
    }

    /// Waits until the server has finished with the first `target` bytes of
    /// replay connection `id` (asked for more after them); `false` on
    /// timeout.
    pub fn wait_idle(&self, id: u64, target: u64, timeout: Duration) -> bool {
        self.wait_for(id, timeout, |p| p.idle_at >= target)
    }

    /// Waits until the server has read `target` bytes of replay connection
    /// `id`; `false` on timeout.
    pub fn wait_consumed(&self, id: u64, target: u64, timeout: Duration) -> bool {
        self.wait_for(id, timeout, |p| p.consumed >= target)
    }

    fn wait_for(&self, id: u64, timeout: Duration, done: impl Fn(&Progress) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut c = lock(&self.consumed);
        loop {
            if done(&c.get(&id).copied().unwrap_or_default()) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            c = self
                .consumed_changed
                .wait_timeout(c, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Forgets replay connection `id`'s consumption.
    pub fn forget_replay(&self, id: u64) {
        lock(&self.consumed).remove(&id);
    }

    /// The table connection `id` lives in.
    fn shard(&self, id: u64) -> MutexGuard<'_, HashMap<u64, Conn>> {
        // Ids are a term and a count (`replay::conn_id`): the low bits of
        // the count spread consecutive connections over every table.
        lock(&self.conns[id as usize & (SHARDS - 1)])
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_add_remove() {
        let r = Registry::default();
        assert_eq!(r.conn(5), None);
        assert!(r.add(5, 42));
        assert_eq!(r.conn(5), Some(42));
        assert_eq!(r.with(42, |c| c.fork_gen), Some(forks()));
        r.with(42, |c| c.out.update(b"abc"));
        let c = r.remove(5).unwrap();
        assert_eq!((c.id, c.out.bytes), (42, 3));
        assert_eq!(r.conn(5), None);
        assert_eq!(r.with(42, |c| c.id), None);
        assert!(!r.add(-1, 1));
        assert!(!r.add(MAX_FD as i32, 1));
        assert_eq!(r.conn(i32::MAX), None);
    }

    #[test]
    fn duplicates_share_the_connection_until_the_last_closes() {
        let r = Registry::default();
        r.add(5, 42);
        r.add(6, 42); // dup(5)
        assert_eq!(r.conn(6), Some(42));
        assert_eq!(r.remove(5), None, "a duplicate is still open");
        assert!(r.with(42, |_| ()).is_some());
        assert_eq!(r.remove(6).map(|c| c.id), Some(42));
        assert!(r.with(42, |_| ()).is_none());
    }

    #[test]
    fn one_connection_is_used_while_another_is_locked() {
        static R: std::sync::LazyLock<Registry> = std::sync::LazyLock::new(Registry::default);
        let (a, b) = (
            crate::replay::conn_id(1, 1).unwrap(),
            crate::replay::conn_id(1, 2).unwrap(),
        );
        R.add(5, a);
        R.add(6, b);
        let (tx, rx) = std::sync::mpsc::channel();
        R.with(a, |_| {
            // Another server thread writes on b meanwhile.
            std::thread::spawn(move || tx.send(R.with(b, |c| c.out.update(b"x"))).unwrap());
            rx.recv_timeout(Duration::from_secs(5))
                .expect("b's state is not behind a's lock");
        });
        assert_eq!(R.with(b, |c| c.out.bytes), Some(1));
        R.break_all(|_| ());
        assert!(R.with(a, |c| c.broken).unwrap() && R.with(b, |c| c.broken).unwrap());
    }

    #[test]
    fn break_all_ends_each_descriptor() {
        let r = Registry::default();
        r.add(7, 1);
        r.add(9, 2);
        let mut fds = Vec::new();
        r.break_all(|fd| fds.push(fd));
        assert_eq!(fds, vec![7, 9]);
        assert!(r.with(1, |c| c.broken).unwrap());
    }

    /// Regression (e2e resp-kv, 1 run in 25): a descriptor the server
    /// closes while the connections are being broken, and whose number the
    /// next accept reuses for a replay connection, is not ended.
    #[test]
    fn break_all_does_not_end_a_number_closed_and_reused_meanwhile() {
        let r = Registry::default();
        r.add(7, 1);
        r.add(9, 2);
        let mut ended = Vec::new();
        r.break_all(|fd| {
            ended.push(fd);
            if fd == 7 {
                // The server closes 9 (it read end of stream), then
                // accepts a replay connection that gets number 9.
                assert_eq!(r.remove(9).map(|c| c.id), Some(2));
                r.add_replay(9, 77);
            }
        });
        assert_eq!(ended, vec![7], "9 is a replay connection now");
        assert_eq!(r.replay_conn(9), Some(77));
    }
}
