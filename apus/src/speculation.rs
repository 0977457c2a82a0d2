//! Proposals nobody waits for ([`Node::submit`](crate::Node::submit)):
//! the bookkeeping of output commit.
//!
//! The interception library hands a server its input as soon as the input
//! is proposed, and holds the server's next output until everything
//! proposed before it has committed. So it needs to know, cheaply, when the
//! first N submitted proposals are resolved, and whether any of them failed
//! (the server then saw input that is not in the log). The engine resolves
//! proposals in the order it took them from the queue, so two counters
//! answer both: see [`Speculation::wait`] for why a count is enough.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, Thread};
use std::time::Duration;

/// Waiters at most (server threads blocked in an output call at once).
const MAX_WAITERS: usize = 1024;

/// Why submitted input can no longer be shown to clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{failed} submitted proposal(s) did not commit (lost in a leader change, or refused)")]
pub struct SpeculationLost {
    /// How many failed so far.
    pub failed: u64,
}

/// Counters of submitted proposals, shared by the submitters, the engine
/// (which resolves them) and the threads waiting in [`Speculation::wait`].
#[derive(Debug, Default)]
pub(crate) struct Speculation {
    /// Proposals submitted so far.
    submitted: AtomicU64,
    /// Of those, resolved (committed or failed), in the engine's order.
    resolved: AtomicU64,
    /// Of those, failed.
    failed: AtomicU64,
    /// Payload bytes submitted and not yet resolved.
    outstanding: AtomicU64,
    /// Threads waiting for `resolved` to reach their target.
    waiters: Mutex<Vec<(u64, Thread)>>,
    any_waiter: AtomicBool,
}

impl Speculation {
    /// A proposal of `bytes` is about to be queued; returns the number of
    /// proposals submitted with it (the target that covers it).
    pub(crate) fn submit(&self, bytes: u64) -> u64 {
        self.outstanding.fetch_add(bytes, Ordering::SeqCst);
        self.submitted.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// A submission was never queued (the node stopped meanwhile): it
    /// counts as failed.
    pub(crate) fn withdraw(&self, bytes: u64) {
        self.resolve(bytes, false);
        self.wake();
    }

    /// Proposals submitted so far: the target of a full barrier.
    pub(crate) fn submitted(&self) -> u64 {
        self.submitted.load(Ordering::SeqCst)
    }

    /// Submitted and not resolved yet.
    pub(crate) fn unresolved(&self) -> u64 {
        self.submitted() - self.resolved.load(Ordering::SeqCst)
    }

    /// Payload bytes submitted and not resolved yet.
    pub(crate) fn outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::SeqCst)
    }

    /// Whether any submitted proposal failed.
    pub(crate) fn lost(&self) -> Option<SpeculationLost> {
        match self.failed.load(Ordering::SeqCst) {
            0 => None,
            failed => Some(SpeculationLost { failed }),
        }
    }

    /// The engine resolved the next submitted proposal (of `bytes`). Call
    /// [`wake`](Self::wake) after a batch.
    pub(crate) fn resolve(&self, bytes: u64, committed: bool) {
        if !committed {
            self.failed.fetch_add(1, Ordering::SeqCst);
        }
        let before = self.outstanding.fetch_sub(bytes, Ordering::SeqCst);
        debug_assert!(before >= bytes, "more bytes resolved than submitted");
        let resolved = self.resolved.fetch_add(1, Ordering::SeqCst) + 1;
        debug_assert!(
            resolved <= self.submitted(),
            "more proposals resolved than submitted"
        );
    }

    /// Wakes the threads whose target has been reached (or all, once
    /// something failed: they must learn it).
    pub(crate) fn wake(&self) {
        if !self.any_waiter.load(Ordering::SeqCst) {
            return;
        }
        let w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        self.wake_locked(w);
    }

    /// [`wake`](Self::wake) for the engine, which must never wait for a
    /// server thread: a realtime engine that blocked on this lock while a
    /// waiter held it was kept waiting for as long as other realtime
    /// threads kept that waiter off the cores (priority inversion). When
    /// the lock is taken, a waiter is announcing or leaving: one that is
    /// announcing looks at `resolved` again before it parks, and a parked
    /// one wakes within its 10 ms bound. Returns `false` if it could not
    /// look (the engine tries again on its next pass).
    pub(crate) fn try_wake(&self) -> bool {
        if !self.any_waiter.load(Ordering::SeqCst) {
            return true;
        }
        match self.waiters.try_lock() {
            Ok(w) => self.wake_locked(w),
            Err(std::sync::TryLockError::Poisoned(p)) => self.wake_locked(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => return false,
        }
        true
    }

    fn wake_locked(&self, mut w: std::sync::MutexGuard<'_, Vec<(u64, Thread)>>) {
        let resolved = self.resolved.load(Ordering::SeqCst);
        let failed = self.lost().is_some();
        w.retain(|(target, t)| {
            let done = *target <= resolved || failed;
            if done {
                t.unpark();
            }
            !done
        });
        self.any_waiter.store(!w.is_empty(), Ordering::SeqCst);
    }

    /// Waits until the first `target` submitted proposals are resolved.
    ///
    /// A count is enough because the engine resolves proposals in the
    /// order it took them from the queue, and a proposal is counted in
    /// `submitted` before it is queued: every proposal queued before this
    /// call is among the first `submitted()` in the engine's order (one
    /// queued later was counted later), so once that many are resolved,
    /// they all are. Fails if any submitted proposal failed, ever: the
    /// server was then shown input that is not in the log.
    pub(crate) fn wait(&self, target: u64, stopped: &AtomicBool) -> Result<(), SpeculationLost> {
        loop {
            if let Some(lost) = self.lost() {
                return Err(lost);
            }
            if self.resolved.load(Ordering::SeqCst) >= target {
                return Ok(());
            }
            if stopped.load(Ordering::SeqCst) {
                // The engine resolves everything as it stops; whatever is
                // left did not commit here.
                return Err(SpeculationLost {
                    failed: self.unresolved().max(1),
                });
            }
            {
                let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
                assert!(
                    w.len() < MAX_WAITERS,
                    "more than {MAX_WAITERS} threads wait for commits"
                );
                w.push((target, thread::current()));
                self.any_waiter.store(true, Ordering::SeqCst);
            }
            // Look again after announcing: a resolution before the
            // announcement found nobody to wake.
            if self.resolved.load(Ordering::SeqCst) < target && self.lost().is_none() {
                // Bounded: a missed unpark costs 10 ms, not the wait.
                thread::park_timeout(Duration::from_millis(10));
            }
            let mut w = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            let me = thread::current().id();
            w.retain(|(_, t)| t.id() != me);
            self.any_waiter.store(!w.is_empty(), Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_wait_ends_when_its_target_resolves_and_fails_once_one_failed() {
        let s = Arc::new(Speculation::default());
        let stop = Arc::new(AtomicBool::new(false));
        let a = s.submit(10);
        let b = s.submit(5);
        assert_eq!((a, b, s.outstanding()), (1, 2, 15));
        let waiter = {
            let (s, stop) = (s.clone(), stop.clone());
            thread::spawn(move || s.wait(b, &stop))
        };
        s.resolve(10, true);
        s.wake();
        thread::sleep(Duration::from_millis(20));
        assert!(!waiter.is_finished(), "one of two resolved is not enough");
        s.resolve(5, true);
        s.wake();
        assert_eq!(waiter.join().unwrap(), Ok(()));
        assert_eq!((s.unresolved(), s.outstanding()), (0, 0));
        let c = s.submit(1);
        s.resolve(1, false);
        s.wake();
        assert_eq!(s.wait(c, &stop), Err(SpeculationLost { failed: 1 }));
        assert_eq!(
            s.wait(0, &stop),
            Err(SpeculationLost { failed: 1 }),
            "for good"
        );
    }

    #[test]
    fn a_stopped_node_fails_what_is_unresolved() {
        let s = Speculation::default();
        let t = s.submit(3);
        let stop = AtomicBool::new(true);
        assert!(s.wait(t, &stop).is_err());
    }
}
