//! Replay order, kept where a follower's server reads.
//!
//! Replaying one entry at a time (write it, wait until the server has read
//! it, write the next) costs a few thread hand-offs per entry, and a
//! follower then falls behind a leader whose server reads many connections
//! per pass of its event loop. So the replayer writes committed input ahead
//! of the server's reads, up to [`MAX_AHEAD`] entries across connections,
//! and the read hook keeps the server's reads in log order:
//!
//! - a read of connection B while input of another connection that comes
//!   earlier in the log is unread is not B's turn: on a non-blocking socket
//!   it gets `EAGAIN` (the server goes on with its event loop and reads the
//!   earlier connection, as the leader's did), on a blocking one it waits;
//! - a read never returns input past the next entry of another connection
//!   (it is cut short, as reads may be);
//! - an entry is read only once the server has answered as much on the
//!   leader's connections as the leader's server had when it read it, so a
//!   worker thread executes it after the replies (and the work) before it.
//!
//! Only connections that threads of this process read take part; one a
//! forked process reads, or that the server watches edge-triggered (an
//! `EAGAIN` would lose its edge), is replayed one entry at a time
//! (`Replay::wait_read`). The rules that let replay go on past a blocked
//! reader hold here too: a head entry whose reader sleeps for
//! [`BLOCKED_THREAD`] is passed over, and
//! one whose answer condition stays unmet for
//! [`STATEMENT_WAIT`] is let through.

use std::collections::{HashMap, VecDeque};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::payload::Out;
use crate::replay::{BLOCKED_THREAD, STATEMENT_WAIT, running};

/// Entries written into the server ahead of its reads, at most.
pub const MAX_AHEAD: usize = 256;
/// Replayed connections the gate tracks at most (more are replayed one
/// entry at a time).
const MAX_CONNS: usize = 1 << 16;
/// How long a head entry must have waited before its reader is looked at
/// (reading `/proc` on every miss would cost more than the wait).
const LOOK_AT_READER_AFTER: Duration = Duration::from_millis(10);

const _: () = assert!(MAX_AHEAD >= 2 && MAX_AHEAD <= 1 << 16);
const _: () = assert!(LOOK_AT_READER_AFTER.as_nanos() < BLOCKED_THREAD.as_nanos());

/// What a read of a gated connection may do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Read at most this many bytes.
    Read(usize),
    /// Not its turn, and the socket does not block: `EAGAIN`.
    WouldBlock,
}

/// One entry's input, written ahead of the server's reads.
#[derive(Clone, Copy, Debug)]
struct Ahead {
    conn: u64,
    /// The connection's stream offset after this input.
    end: u64,
    /// What the leader's server had answered when it read it.
    out: Out,
    /// The leader it came from (whose answers `out` counts).
    origin: u64,
}

#[derive(Debug, Default)]
struct GatedConn {
    origin: u64,
    /// Bytes the server has read.
    consumed: u64,
    /// Bytes the replayer has written or is about to write (announced
    /// first): what a read may return when none of it is written ahead.
    announced: u64,
    /// The replayer has ended its input (or is about to): reads may see
    /// the end of stream.
    input_ended: bool,
    /// The thread of this process that read it last (0: none yet).
    reader: u32,
    /// A forked process reads it, the server watches it edge-triggered, or
    /// it is closed: never written ahead.
    ungated: bool,
    closed: bool,
    /// What the server answered on it.
    answers: Answers,
}

#[derive(Debug, Default)]
struct Answers {
    /// Bytes the server wrote on replay connections of this origin (the
    /// write hooks count them).
    written: u64,
    /// The same, as the drain threads received them.
    drained: u64,
    /// Allowance for replies shorter here than the leader's (see
    /// [`STATEMENT_WAIT`]).
    shortfall: u64,
    /// The thread that wrote last (0: none yet).
    writer: u32,
}

impl Answers {
    fn total(&self) -> u64 {
        self.written.max(self.drained) + self.shortfall
    }
}

#[derive(Debug, Default)]
struct State {
    turns: VecDeque<Ahead>,
    /// When the head turn became the head.
    head_since: Option<Instant>,
    /// When the head's reader was first seen asleep.
    head_asleep: Option<Instant>,
    conns: HashMap<u64, GatedConn>,
    answers: HashMap<u64, Answers>,
    /// Threads waiting in [`Gate::admit`], [`Gate::push`] or
    /// [`Gate::wait_empty`] (notifications are skipped while 0).
    waiters: usize,
    /// Head entries passed over because their reader slept.
    passed_blocked: u64,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<State>,
    changed: Condvar,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self, st: &State) {
        if st.waiters > 0 {
            self.changed.notify_all();
        }
    }

    fn wait<'a>(&self, mut st: MutexGuard<'a, State>, d: Duration) -> MutexGuard<'a, State> {
        st.waiters += 1;
        let (mut st, _) = self
            .changed
            .wait_timeout(st, d)
            .unwrap_or_else(|p| p.into_inner());
        st.waiters -= 1;
        st
    }

    // Replayer side.

    /// Replay connection `conn`, of leader `origin`, was opened.
    pub fn open(&self, conn: u64, origin: u64) {
        tracing::trace!(conn, "replay connection opened");
        let mut st = self.lock();
        if st.conns.len() < MAX_CONNS {
            st.conns.insert(
                conn,
                GatedConn {
                    origin,
                    ..GatedConn::default()
                },
            );
        }
    }

    /// Replay has ended connection `conn`.
    pub fn forget(&self, conn: u64) {
        tracing::trace!(conn, "forgotten");
        let mut st = self.lock();
        st.conns.remove(&conn);
        settle(&mut st);
        self.notify(&st);
    }

    /// Whether input for `conn` may be written ahead of the server's reads.
    pub fn gated(&self, conn: u64) -> bool {
        self.lock()
            .conns
            .get(&conn)
            .is_some_and(|c| c.reader != 0 && !c.ungated && !c.closed)
    }

    /// Input of `conn` up to stream offset `end` is about to be written;
    /// the leader's server had answered `out` bytes when it read it.
    /// Waits while [`MAX_AHEAD`] entries are unread.
    pub fn push(&self, conn: u64, end: u64, out: Out) {
        let mut st = self.lock();
        debug_assert!(st.conns.get(&conn).is_some_and(|c| end > c.consumed));
        while st.turns.len() >= MAX_AHEAD {
            pass_blocked(&mut st);
            if st.turns.len() < MAX_AHEAD {
                break;
            }
            st = self.wait(st, Duration::from_millis(10));
            settle(&mut st);
        }
        let Some(c) = st.conns.get_mut(&conn) else {
            return;
        };
        c.announced = c.announced.max(end);
        let origin = c.origin;
        if st.turns.is_empty() {
            st.head_since = Some(Instant::now());
        }
        st.turns.push_back(Ahead {
            conn,
            end,
            out,
            origin,
        });
        tracing::trace!(conn, end, ahead = st.turns.len(), "written ahead");
        self.notify(&st);
        assert!(
            st.turns.len() <= MAX_AHEAD,
            "the gate holds more than MAX_AHEAD"
        );
    }

    /// Input of `conn` up to stream offset `end` is about to be written one
    /// entry at a time (not ahead: the replayer waits until it is read).
    pub fn announce(&self, conn: u64, end: u64) {
        tracing::trace!(conn, end, "written one entry at a time");
        let mut st = self.lock();
        if let Some(c) = st.conns.get_mut(&conn) {
            c.announced = c.announced.max(end);
        }
        self.notify(&st);
    }

    /// The replayer is about to end `conn`'s input (its write side).
    pub fn end_input(&self, conn: u64) {
        let mut st = self.lock();
        if let Some(c) = st.conns.get_mut(&conn) {
            c.input_ended = true;
        }
        self.notify(&st);
    }

    /// Waits until the server has read everything written ahead (before an
    /// entry that is replayed one at a time). `note` is called every
    /// `note_every` of waiting, with what the head entry waits for.
    pub fn wait_empty(&self, note_every: Duration, mut note: impl FnMut(&Stuck, Duration)) {
        let since = Instant::now();
        let mut next_note = note_every;
        let mut st = self.lock();
        settle(&mut st);
        while let Some(head) = st.turns.front().copied() {
            pass_blocked(&mut st);
            if st.turns.is_empty() {
                break;
            }
            if since.elapsed() >= next_note {
                note(&stuck(&st, head), since.elapsed());
                next_note += note_every;
            }
            st = self.wait(st, Duration::from_millis(10));
            settle(&mut st);
        }
    }

    /// Unread entries, and head entries passed over so far.
    pub fn stats(&self) -> (usize, u64) {
        let st = self.lock();
        (st.turns.len(), st.passed_blocked)
    }

    // Server side (the hooks, in this process only).

    /// May thread `tid` read connection `conn` now? `blocking` says whether
    /// the read blocks (it then waits here for its turn instead of
    /// `EAGAIN`); asked only when it is not its turn.
    pub fn admit(&self, conn: u64, tid: u32, blocking: impl FnOnce() -> bool) -> Admit {
        let mut st = self.lock();
        let mut waited = false;
        let mut blocking = Some(blocking);
        let mut blocks = None;
        loop {
            settle(&mut st);
            let turn = turn_of(&mut st, conn);
            if let Turn::Now(n) = turn {
                tracing::trace!(
                    conn,
                    n,
                    ahead = st.turns.len(),
                    head = st.turns.front().map_or(0, |h| h.conn),
                    "read admitted"
                );
                return Admit::Read(n);
            }
            let blocking = *blocks.get_or_insert_with(|| blocking.take().is_some_and(|f| f()));
            tracing::trace!(conn, ?turn, blocking, waited, "read not admitted yet");
            let wait_for = match turn {
                Turn::Now(n) => return Admit::Read(n),
                // Nothing announced: the socket is empty (or about to get
                // bytes this read must not take before their turn).
                Turn::Nothing if !blocking => return Admit::WouldBlock,
                Turn::Nothing => 0,
                // The answers are this very thread's to write (a
                // single-threaded event loop writes after its reads).
                Turn::AfterAnswers(writer) if !blocking && writer == tid => {
                    return Admit::WouldBlock;
                }
                Turn::AfterAnswers(_) => 0,
                Turn::After(head_reader) => head_reader,
            };
            if wait_for == tid && wait_for != 0 {
                if !blocking {
                    // This thread itself reads the earlier input.
                    return Admit::WouldBlock;
                }
                // It cannot wait for itself: order gives way.
                return Admit::Read(usize::MAX);
            }
            if !blocking && waited {
                return Admit::WouldBlock;
            }
            pass_blocked(&mut st);
            // Non-blocking: another thread is about to read the head; a
            // moment here (it notifies) costs less than a spinning event
            // loop.
            let d = if blocking {
                Duration::from_millis(10)
            } else {
                Duration::from_millis(1)
            };
            st = self.wait(st, d);
            waited = true;
        }
    }

    /// Thread `tid` read `n` bytes of `conn` (0: a forked process did; the
    /// connection is replayed one entry at a time from now on).
    pub fn consumed(&self, conn: u64, n: u64, tid: u32) {
        let mut st = self.lock();
        let Some(c) = st.conns.get_mut(&conn) else {
            return;
        };
        c.consumed += n;
        if tid == 0 {
            c.ungated = true;
        } else {
            c.reader = tid;
        }
        settle(&mut st);
        self.notify(&st);
    }

    /// Thread `tid` of the server wrote `n` bytes on replay connection
    /// `conn`.
    pub fn wrote(&self, conn: u64, n: u64, tid: u32) {
        let mut st = self.lock();
        let Some(c) = st.conns.get_mut(&conn) else {
            return;
        };
        c.answers.written += n;
        let origin = c.origin;
        let all = st.answers.entry(origin).or_default();
        all.written += n;
        all.writer = tid;
        self.notify(&st);
    }

    /// A drain thread received `n` bytes of the server's answers on `conn`,
    /// of leader `origin`.
    pub fn drained(&self, origin: u64, conn: u64, n: u64) {
        let mut st = self.lock();
        if let Some(c) = st.conns.get_mut(&conn) {
            c.answers.drained += n;
        }
        st.answers.entry(origin).or_default().drained += n;
        self.notify(&st);
    }

    /// The leader's server answered `n` bytes on `conn` that this one never
    /// will (it closed the connection): later entries do not wait for them.
    pub fn credit(&self, conn: u64, n: u64) {
        let mut st = self.lock();
        let Some(c) = st.conns.get_mut(&conn) else {
            return;
        };
        c.answers.shortfall += n;
        let origin = c.origin;
        st.answers.entry(origin).or_default().shortfall += n;
        self.notify(&st);
    }

    /// The server closed (a descriptor of) `conn`: what it left unread is
    /// not waited for.
    pub fn closed(&self, conn: u64) {
        tracing::trace!(conn, "closed by the server");
        let mut st = self.lock();
        if let Some(c) = st.conns.get_mut(&conn) {
            c.closed = true;
        }
        settle(&mut st);
        self.notify(&st);
    }

    /// The server watches `conn` edge-triggered.
    pub fn edge_triggered(&self, conn: u64) {
        if let Some(c) = self.lock().conns.get_mut(&conn) {
            c.ungated = true;
        }
    }
}

/// What the head entry written ahead waits for: said when replay has
/// waited long, since a replica that stops here lags for good.
#[derive(Debug)]
pub struct Stuck {
    /// The head entry's connection.
    pub conn: u64,
    /// Its stream offset after the head entry.
    pub end: u64,
    /// Bytes of it the server has read.
    pub consumed: u64,
    /// Bytes of it written, or about to be.
    pub announced: u64,
    /// The thread that read it last, and whether it runs now.
    pub reader: u32,
    pub reader_running: bool,
    /// The leader's answers when it read the head entry, and the local
    /// server's so far (all connections of its leader, then its own).
    pub leader_out: Out,
    pub answered_all: u64,
    pub answered_on_conn: u64,
    /// Entries written ahead.
    pub ahead: usize,
    /// How long it has been the head.
    pub head_for: Option<Duration>,
}

fn stuck(st: &State, head: Ahead) -> Stuck {
    let c = st.conns.get(&head.conn);
    let reader = c.map_or(0, |c| c.reader);
    Stuck {
        conn: head.conn,
        end: head.end,
        consumed: c.map_or(0, |c| c.consumed),
        announced: c.map_or(0, |c| c.announced),
        reader,
        reader_running: reader != 0 && running(reader),
        leader_out: head.out,
        answered_all: st.answers.get(&head.origin).map_or(0, Answers::total),
        answered_on_conn: c.map_or(0, |c| c.answers.total()),
        ahead: st.turns.len(),
        head_for: st.head_since.map(|at| at.elapsed()),
    }
}

/// Drops head entries that are read, or whose connection is gone.
fn settle(st: &mut State) {
    while let Some(h) = st.turns.front() {
        let done = st
            .conns
            .get(&h.conn)
            .is_none_or(|c| c.closed || c.consumed >= h.end);
        if !done {
            break;
        }
        st.turns.pop_front();
        st.head_since = Some(Instant::now());
        st.head_asleep = None;
    }
    if st.turns.is_empty() {
        st.head_since = None;
    }
}

/// Whether `conn` may be read now.
#[derive(Clone, Copy, Debug)]
enum Turn {
    /// Yes, this many bytes at most.
    Now(usize),
    /// Its input is next, once the server has answered as much as the
    /// leader's had; the thread that last answered (tid).
    AfterAnswers(u32),
    /// Input of another connection comes first; its last reader (tid).
    After(u32),
    /// None of its input is written ahead, and what was written has been
    /// read: there is nothing to read yet.
    Nothing,
}

fn turn_of(st: &mut State, conn: u64) -> Turn {
    let Some(first) = st.turns.iter().position(|t| t.conn == conn) else {
        // Nothing of it is written ahead: it may read what the replayer has
        // written one entry at a time, and no more. A read admitted with
        // more could take input pushed (and written) after this answer,
        // ahead of earlier input of other connections (CI: a resp-kv
        // follower read a connection's next request before another's).
        return match st.conns.get(&conn) {
            None => Turn::Now(usize::MAX),
            Some(c) if c.closed => Turn::Now(usize::MAX),
            Some(c) if c.announced > c.consumed => {
                Turn::Now(usize::try_from(c.announced - c.consumed).unwrap_or(usize::MAX))
            }
            Some(c) if c.input_ended => Turn::Now(usize::MAX),
            Some(_) => Turn::Nothing,
        };
    };
    let head = st.turns[0];
    if first != 0 {
        return Turn::After(st.conns.get(&head.conn).map_or(0, |c| c.reader));
    }
    let all = st.answers.entry(head.origin).or_default().total();
    let on_conn = st.conns.get(&conn).map_or(0, |c| c.answers.total());
    let short_all = head.out.all.saturating_sub(all);
    let short_conn = head.out.on_conn.unwrap_or(0).saturating_sub(on_conn);
    if short_all > 0 || short_conn > 0 {
        let waited = st
            .head_since
            .is_some_and(|at| at.elapsed() >= STATEMENT_WAIT);
        if !waited {
            let writer = st.answers.get(&head.origin).map_or(0, |a| a.writer);
            return Turn::AfterAnswers(writer);
        }
        // Its replies differ here; do not wait for them again.
        st.answers.entry(head.origin).or_default().shortfall += short_all;
        if let Some(c) = st.conns.get_mut(&conn) {
            c.answers.shortfall += short_conn;
        }
        tracing::debug!(
            conn,
            short_all,
            short_conn,
            "the local server answered less than the leader's; going on"
        );
    }
    let end = st
        .turns
        .iter()
        .take_while(|t| t.conn == conn)
        .last()
        .map_or(head.end, |t| t.end);
    let consumed = st.conns.get(&conn).map_or(0, |c| c.consumed);
    debug_assert!(end > consumed, "a settled head is unread");
    Turn::Now(usize::try_from(end - consumed).unwrap_or(usize::MAX))
}

/// Passes over the head entry if its reader has slept for
/// [`BLOCKED_THREAD`] (blocked on something a later entry releases).
fn pass_blocked(st: &mut State) {
    let Some(head) = st.turns.front().copied() else {
        return;
    };
    if st
        .head_since
        .is_none_or(|at| at.elapsed() < LOOK_AT_READER_AFTER)
    {
        return;
    }
    let reader = st.conns.get(&head.conn).map_or(0, |c| c.reader);
    if reader == 0 || running(reader) {
        st.head_asleep = None;
        return;
    }
    let asleep = *st.head_asleep.get_or_insert_with(Instant::now);
    if asleep.elapsed() >= BLOCKED_THREAD {
        tracing::debug!(
            conn = head.conn,
            task = reader,
            "replay goes on past a reader blocked with input unread"
        );
        st.turns.pop_front();
        st.passed_blocked += 1;
        st.head_since = Some(Instant::now());
        st.head_asleep = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::thread;

    fn out(all: u64, on_conn: u64) -> Out {
        Out {
            all,
            on_conn: Some(on_conn),
        }
    }

    fn gate_with(conns: &[u64]) -> Gate {
        let g = Gate::default();
        for &c in conns {
            g.open(c, 7);
            g.consumed(c, 0, 1);
        }
        g
    }

    #[test]
    fn reads_follow_log_order_across_connections() {
        let g = gate_with(&[1, 2]);
        // Log: 10 bytes of 1, 5 of 2, 4 more of 1.
        g.push(1, 10, out(0, 0));
        g.push(2, 5, out(0, 0));
        g.push(1, 14, out(0, 0));
        assert_eq!(g.admit(2, 1, || false), Admit::WouldBlock, "2 before 1");
        assert_eq!(
            g.admit(1, 1, || false),
            Admit::Read(10),
            "1 up to 2's entry"
        );
        g.consumed(1, 10, 1);
        assert_eq!(
            g.admit(1, 1, || false),
            Admit::WouldBlock,
            "1's next is after 2's"
        );
        assert_eq!(g.admit(2, 1, || false), Admit::Read(5));
        g.consumed(2, 5, 1);
        assert_eq!(g.admit(1, 1, || false), Admit::Read(4));
        g.consumed(1, 4, 1);
        assert_eq!(g.stats(), (0, 0));
        // Everything read: nothing to read until more is announced.
        assert_eq!(g.admit(2, 1, || false), Admit::WouldBlock);
        g.announce(2, 8);
        assert_eq!(g.admit(2, 1, || false), Admit::Read(3), "what is written");
        g.consumed(2, 3, 1);
        g.end_input(2);
        assert_eq!(g.admit(2, 1, || false), Admit::Read(usize::MAX), "its end");
    }

    /// Regression (issue 14, CI and `cargo xtask e2e --server resp-kv`, 1
    /// run in 4): a follower's resp-kv read connection B's next request
    /// before A's earlier one, and the replicas' states diverged. B's read
    /// was admitted while nothing of B was written ahead ("read whatever is
    /// there"); before the read itself, the replayer pushed A's and B's next
    /// input and wrote them, and the read took B's out of turn.
    #[test]
    fn a_read_admitted_with_nothing_ahead_cannot_take_input_written_after() {
        let g = gate_with(&[1, 2]);
        g.push(1, 3, out(0, 0));
        g.push(2, 3, out(0, 0));
        g.consumed(1, 3, 1);
        g.consumed(2, 3, 1);
        // Nothing of 2 is ahead now: the read may take nothing...
        let admitted = g.admit(2, 1, || false);
        assert_eq!(admitted, Admit::WouldBlock);
        // ...so that what is pushed and written next keeps its turn.
        g.push(1, 6, out(0, 0));
        g.push(2, 6, out(0, 0));
        assert_eq!(g.admit(2, 1, || false), Admit::WouldBlock, "1 comes first");
        assert_eq!(g.admit(1, 1, || false), Admit::Read(3));
    }

    #[test]
    fn a_blocking_read_with_nothing_announced_waits_for_input() {
        let g = Arc::new(gate_with(&[1]));
        let reader = {
            let g = g.clone();
            thread::spawn(move || g.admit(1, 3, || true))
        };
        thread::sleep(Duration::from_millis(20));
        assert!(!reader.is_finished(), "nothing to read yet");
        g.announce(1, 5);
        assert_eq!(reader.join().unwrap(), Admit::Read(5));
    }

    #[test]
    fn an_entry_waits_for_the_answers_before_it() {
        let g = Arc::new(gate_with(&[1, 2]));
        g.push(1, 3, out(0, 0));
        g.push(2, 3, out(40, 0));
        g.consumed(1, 3, 1);
        assert_eq!(
            g.admit(2, 1, || false),
            Admit::WouldBlock,
            "40 bytes not answered yet"
        );
        // A worker thread (2) answers; a blocking reader (3) waits for it.
        let reader = {
            let g = g.clone();
            thread::spawn(move || g.admit(2, 3, || true))
        };
        thread::sleep(Duration::from_millis(20));
        assert!(!reader.is_finished());
        g.wrote(1, 25, 2);
        g.drained(7, 1, 40);
        assert_eq!(reader.join().unwrap(), Admit::Read(3));
    }

    /// Regression (issue 14): a PostgreSQL follower got a startup message
    /// before its backend had answered the SSL request on that connection
    /// ("received unencrypted data after SSL request"): other connections'
    /// answers had made up the total.
    #[test]
    fn an_entry_waits_for_the_answers_on_its_own_connection() {
        let g = gate_with(&[1, 2]);
        g.push(1, 8, out(0, 0));
        g.consumed(1, 8, 1);
        // Connection 1's next input came after its 1-byte answer.
        g.push(1, 20, out(1, 1));
        g.wrote(2, 300, 1);
        assert_eq!(
            g.admit(1, 1, || false),
            Admit::WouldBlock,
            "answered on 2 only"
        );
        g.wrote(1, 1, 1);
        assert_eq!(g.admit(1, 1, || false), Admit::Read(12));
    }

    #[test]
    fn a_blocking_reader_waits_for_its_turn_and_a_closed_connection_is_not_waited_for() {
        let g = Arc::new(gate_with(&[1, 2]));
        g.push(1, 8, out(0, 0));
        g.push(2, 8, out(0, 0));
        let reader = {
            let g = g.clone();
            thread::spawn(move || g.admit(2, 9, || true))
        };
        thread::sleep(Duration::from_millis(20));
        assert!(!reader.is_finished(), "2 read before 1");
        g.closed(1);
        assert_eq!(reader.join().unwrap(), Admit::Read(8));
        assert!(!g.gated(1), "a closed connection is not written ahead");
        // A forked reader takes a connection out of the gate.
        g.consumed(2, 8, 0);
        assert!(!g.gated(2));
    }

    #[test]
    fn a_head_whose_reader_sleeps_is_passed_over() {
        let g = Arc::new(Gate::default());
        g.open(1, 7);
        g.open(2, 7);
        // Connection 1's reader: a thread asleep (blocked on a lock).
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let sleeper = thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() } as u32).unwrap();
            let _ = rx.recv();
        });
        let tid = tid_rx.recv().unwrap();
        g.consumed(1, 0, tid);
        g.consumed(2, 0, 1);
        g.push(1, 5, out(0, 0));
        g.push(2, 5, out(0, 0));
        let at = Instant::now();
        assert_eq!(g.admit(2, 1, || true), Admit::Read(5));
        assert!(
            at.elapsed() >= BLOCKED_THREAD,
            "passed over after {:?}",
            at.elapsed()
        );
        assert_eq!(g.stats().1, 1);
        drop(tx);
        sleeper.join().unwrap();
    }
}
