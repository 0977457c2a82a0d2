//! `apus run`: start a server under the interception library and supervise
//! its whole process tree.
//!
//! The loop, every 20 ms: reap exited processes, answer the library's
//! messages (a claim to run the node, its start, a refusal, a rebuild
//! request, notes), and check the tree:
//!
//! * the process that runs the node (the *holder*) died: everything else is
//!   stopped, and `apus run` exits with the holder's status;
//! * a process of the tree listens on the app address but no node started
//!   within [`CONFIRM_WITHIN`]: the server is stopped (78), since it would
//!   serve clients unreplicated (a static binary, a cleared `LD_PRELOAD`);
//! * no process is left: `apus run` exits with the server's status.
//!
//! A refusal stops the server and exits with 78; a rebuild stops it,
//! restores its pristine data directory and starts it again, so its state
//! is rebuilt by replaying the log.

use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::pristine::Pristine;
use super::{Answer, Listener, Message, Received, tree};

/// The exit status of a server stopped because it must not run (EX_CONFIG).
pub const EXIT_REFUSED: i32 = 78;
/// How long a server may listen on its app address before replication must
/// have started in it.
pub const CONFIRM_WITHIN: Duration = Duration::from_secs(10);
/// How long a stopped server may take to exit on SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Rebuilds in a row (without a confirmed start in between) before giving up.
const MAX_REBUILDS: u32 = 5;
/// How long a rebuild waits for the app port to be free before it starts
/// the server again anyway (which then says why it cannot listen).
const PORT_FREE_WAIT: Duration = Duration::from_secs(5);

/// The kernel's range of local ports for outgoing connections
/// (`net.ipv4.ip_local_port_range`; Linux's default if unreadable).
pub fn ephemeral_ports() -> std::ops::RangeInclusive<u16> {
    let read = || -> Option<(u16, u16)> {
        let s = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
        let mut it = s.split_whitespace().map(|w| w.parse::<u16>().ok());
        Some((it.next()??, it.next()??))
    };
    let (low, high) = read().unwrap_or((32_768, 60_999));
    low..=high
}

/// Whether nothing holds `port` on any local address (a probe bind, with
/// `SO_REUSEADDR` as servers set it, so connections in TIME_WAIT do not
/// count).
fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("0.0.0.0", port)).is_ok()
}

/// Waits until the app port is free again after the server was stopped
/// (its sockets may take a moment to go); says so if it stays taken.
fn wait_port_free(port: u16) {
    let since = Instant::now();
    while !port_free(port) {
        if since.elapsed() >= PORT_FREE_WAIT {
            let range = ephemeral_ports();
            let why = if range.contains(&port) {
                format!(
                    "it lies in the kernel's ephemeral range {}-{}, so an outgoing connection                      may hold it as its local port: choose an app port outside that range",
                    range.start(),
                    range.end()
                )
            } else {
                "another process holds it".to_string()
            };
            eprintln!(
                "apus run: the app port {port} is still taken {} s after the server stopped ({why});                  starting the server anyway",
                PORT_FREE_WAIT.as_secs()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What `apus run` starts.
#[derive(Clone, Debug)]
pub struct ServerSpec {
    /// The server's program and arguments.
    pub argv: Vec<String>,
    /// Environment for the library (config path, id).
    pub env: Vec<(String, String)>,
    /// The interception library.
    pub library: PathBuf,
    /// The app port the server must listen on.
    pub app_port: u16,
    /// The server's data directory and its pristine copy, if configured.
    pub pristine: Option<Pristine>,
}

/// Set by SIGTERM/SIGINT.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// How one incarnation of the server ended.
enum Ended {
    /// Exit `apus run` with this status.
    Exit(i32),
    /// Start it again from its pristine state.
    Rebuild,
}

/// Runs the server until it ends; returns `apus run`'s exit status.
pub fn supervise(spec: &ServerSpec) -> Result<i32> {
    tree::become_subreaper().context("becoming the reaper of the server's processes")?;
    let listener = Listener::bind().context("opening the supervisor socket")?;
    let mut env = spec.env.clone();
    env.extend(listener.env().map(|(k, v)| (k.to_string(), v)));
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("apus-run-supervisor".into())
        .spawn(move || {
            loop {
                match listener.receive() {
                    Ok(r) => {
                        if tx.send(r).is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "ignored a supervisor message"),
                }
            }
        })?;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let range = ephemeral_ports();
    if range.contains(&spec.app_port) {
        eprintln!(
            "apus run: warning: the app port {} lies in the kernel's ephemeral range {}-{} \
             (net.ipv4.ip_local_port_range): while the server is down for a rebuild, an outgoing \
             connection may take it and the server cannot listen again",
            spec.app_port,
            range.start(),
            range.end()
        );
    }
    let mut rebuilds = 0;
    loop {
        if let Some(p) = &spec.pristine {
            p.restore().with_context(|| {
                format!(
                    "restoring {} from its pristine copy",
                    p.server_dir.display()
                )
            })?;
        }
        match incarnation(spec, &env, &rx)? {
            (Ended::Exit(code), _) => return Ok(code),
            (Ended::Rebuild, confirmed) => {
                rebuilds = if confirmed { 1 } else { rebuilds + 1 };
                if rebuilds > MAX_REBUILDS {
                    eprintln!(
                        "apus run: the server needed {MAX_REBUILDS} rebuilds in a row without \
                         starting replication; giving up"
                    );
                    return Ok(EXIT_REFUSED);
                }
                eprintln!("apus run: restarting the server empty; the log rebuilds its state");
                wait_port_free(spec.app_port);
            }
        }
    }
}

/// The state of one start of the server.
struct Run {
    me: u32,
    /// The server process `apus run` started, until it exits.
    child: Option<u32>,
    child_status: Option<i32>,
    /// The process running the node, and the lifeline to it.
    holder: Option<(u32, Option<UnixStream>)>,
    confirmed: bool,
    /// When a process of the tree was first seen listening on the app port
    /// without a node.
    unconfirmed_since: Option<Instant>,
    last_check: Instant,
}

fn incarnation(
    spec: &ServerSpec,
    env: &[(String, String)],
    rx: &mpsc::Receiver<Received>,
) -> Result<(Ended, bool)> {
    let (program, args) = spec.argv.split_first().context("no server command")?;
    let mut command = Command::new(program);
    command.args(args).env("LD_PRELOAD", preload(&spec.library));
    for (k, v) in env {
        command.env(k, v);
    }
    // SAFETY: prctl is async-signal-safe and touches no memory of ours. The
    // server's first process dies with `apus run` (even by SIGKILL); a
    // daemon it forks is held by the library's lifeline instead.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let mut run = Run {
        me: std::process::id(),
        child: Some(child.id()),
        child_status: None,
        holder: None,
        confirmed: false,
        unconfirmed_since: None,
        last_check: Instant::now(),
    };
    // The Child handle is not waited on: `tree::reap` collects every exit.
    drop(child);
    loop {
        if let Some(end) = run.step(spec, rx) {
            let confirmed = run.confirmed;
            return Ok((end, confirmed));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Run {
    /// One pass of the loop; `Some` when this incarnation is over.
    fn step(&mut self, spec: &ServerSpec, rx: &mpsc::Receiver<Received>) -> Option<Ended> {
        let mut holder_status = None;
        for (pid, code) in tree::reap() {
            if Some(pid) == self.child {
                self.child = None;
                self.child_status = Some(code);
            }
            if self.holder.as_ref().is_some_and(|(h, _)| *h == pid) {
                holder_status = Some(code);
            }
        }
        while let Ok(msg) = rx.try_recv() {
            if let Some(end) = self.message(msg) {
                return Some(end);
            }
        }
        if STOP.load(Ordering::SeqCst) {
            eprintln!("apus run: stopping the server");
            tree::stop_all(self.me, STOP_GRACE);
            return Some(Ended::Exit(self.child_status.unwrap_or(0)));
        }
        if let Some((h, _)) = &self.holder
            && (holder_status.is_some() || !tree::alive(*h))
        {
            let h = *h;
            let left = tree::descendants(self.me);
            let code = holder_status.or(self.child_status).unwrap_or(1);
            if !left.is_empty() {
                eprintln!(
                    "apus run: pid {h}, which replicated the server, exited ({code}) while {} of \
                     its processes kept running; stopping them (a server that forks away from \
                     the listening process after it started listening cannot be followed: run \
                     it in the foreground)",
                    left.len()
                );
                tree::stop_all(self.me, Duration::ZERO);
            }
            return Some(Ended::Exit(code));
        }
        if self.last_check.elapsed() >= Duration::from_millis(200) {
            self.last_check = Instant::now();
            if let Some(end) = self.check_listeners(spec) {
                return Some(end);
            }
        }
        if self.child.is_none() && tree::descendants(self.me).is_empty() {
            return Some(Ended::Exit(self.child_status.unwrap_or(0)));
        }
        None
    }

    fn message(&mut self, mut r: Received) -> Option<Ended> {
        match r.message.clone() {
            Message::Claim => {
                let answer = match &self.holder {
                    Some((h, _)) if *h != r.pid && tree::alive(*h) => Answer::Held(*h),
                    _ => {
                        self.holder = Some((r.pid, None));
                        Answer::Granted
                    }
                };
                let _ = r.answer(answer);
            }
            Message::Started => {
                if self.holder.as_ref().is_some_and(|(h, _)| *h == r.pid)
                    && r.answer(Answer::Granted).is_ok()
                {
                    eprintln!(
                        "apus run: replication started in pid {} ({})",
                        r.pid,
                        tree::comm(r.pid)
                    );
                    self.confirmed = true;
                    self.holder = Some((r.pid, Some(r.stream)));
                } else {
                    let _ = r.answer(Answer::Held(self.holder.as_ref().map_or(0, |(h, _)| *h)));
                }
            }
            Message::Say(text) => {
                eprintln!("apus run: {} (pid {}): {text}", tree::comm(r.pid), r.pid);
                let _ = r.answer(Answer::Granted);
            }
            Message::Refuse(why) => {
                let _ = r.answer(Answer::Granted);
                eprintln!(
                    "apus run: {} (pid {}): {why}; the server was stopped (it must not run unreplicated)",
                    tree::comm(r.pid),
                    r.pid
                );
                tree::stop_all(self.me, Duration::ZERO);
                return Some(Ended::Exit(EXIT_REFUSED));
            }
            Message::Rebuild(why) => {
                let _ = r.answer(Answer::Granted);
                if !tree::alive(r.pid) {
                    // Sent by a process of an earlier start, stopped since
                    // (several of its threads may ask): that server is gone.
                    eprintln!(
                        "apus run: ignored a rebuild request of pid {}, which no longer runs: {why}",
                        r.pid
                    );
                    return None;
                }
                eprintln!(
                    "apus run: {} (pid {}) asks for a rebuild: {why}",
                    tree::comm(r.pid),
                    r.pid
                );
                tree::stop_all(self.me, Duration::ZERO);
                return Some(Ended::Rebuild);
            }
        }
        None
    }

    /// A process listening on the app port must be running the node.
    fn check_listeners(&mut self, spec: &ServerSpec) -> Option<Ended> {
        if self.confirmed {
            return None;
        }
        let listening = tree::listeners(self.me, spec.app_port);
        if listening.is_empty() {
            self.unconfirmed_since = None;
            return None;
        }
        let since = *self.unconfirmed_since.get_or_insert_with(Instant::now);
        if since.elapsed() < CONFIRM_WITHIN {
            return None;
        }
        let who: Vec<String> = listening
            .iter()
            .map(|p| format!("pid {p} ({})", tree::comm(*p)))
            .collect();
        eprintln!(
            "apus run: {} listens on the app port {} but replication never started in it within \
             {CONFIRM_WITHIN:?} (is the server statically linked, or does it clear LD_PRELOAD?); \
             the server was stopped (it must not run unreplicated)",
            who.join(", "),
            spec.app_port
        );
        tree::stop_all(self.me, Duration::ZERO);
        Some(Ended::Exit(EXIT_REFUSED))
    }
}

fn preload(library: &std::path::Path) -> String {
    match std::env::var("LD_PRELOAD") {
        Ok(existing) if !existing.is_empty() => format!("{}:{existing}", library.display()),
        _ => library.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// Regression (issue 14): two threads of a server asked for a rebuild;
    /// the second request, read after the restart, stopped the next start
    /// of the server too.
    #[test]
    fn a_rebuild_request_of_a_process_that_no_longer_runs_is_ignored() {
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let pid = gone.id();
        gone.wait().unwrap();
        let (stream, _peer) = UnixStream::pair().unwrap();
        let mut run = Run {
            me: std::process::id(),
            child: None,
            child_status: None,
            holder: None,
            confirmed: false,
            unconfirmed_since: None,
            last_check: Instant::now(),
        };
        let stale = Received {
            pid,
            message: Message::Rebuild("speculation lost".into()),
            stream,
        };
        assert!(
            run.message(stale).is_none(),
            "a stale request ended the run"
        );
    }
}
