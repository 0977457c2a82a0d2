//! Commands the library runs against its own server: `apus check`'s digest
//! at a log position, and the readiness probe replay waits for.
//!
//! The command (`cluster.digest`, e.g. `redis-cli -p {port} DEBUG DIGEST`)
//! connects to `{port}`: a port of the library's own, which relays each
//! connection into the server from an address the server's accept knows as
//! internal. So the digest reaches a follower that refuses clients, and on
//! the leader it is never replicated. The command's standard output,
//! trimmed, is the digest.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use apus::config::ServerCommand;

use crate::replay::Replay;

/// Largest digest kept (the rest of the output is cut).
const MAX_DIGEST: usize = 4096;

/// Marks the exit status the wrapper shell prints after the command.
const EXIT_MARK: &str = "\napus-exit:";

/// Runs `cmd` against the server behind `replay` and returns what it printed.
///
/// The command runs under `sh`, which prints its exit status: a server may
/// reap every child itself (PostgreSQL's postmaster does), so `waitpid`
/// cannot be relied on; the output's end is.
pub fn run_command(cmd: &ServerCommand, replay: &Replay) -> Result<String, String> {
    let proxy = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("digest relay: {e}"))?;
    let port = proxy.local_addr().map_err(|e| e.to_string())?.port();
    proxy.set_nonblocking(true).map_err(|e| e.to_string())?;
    let argv: Vec<String> = cmd
        .argv
        .iter()
        .map(|a| {
            a.replace("{port}", &port.to_string())
                .replace("{host}", "127.0.0.1")
        })
        .collect();
    let mut command = Command::new("/bin/sh");
    command
        .args(["-c", "\"$@\"; printf '\\napus-exit:%s\\n' \"$?\"", "sh"])
        .args(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The command is not part of the server: no library, no settings.
    for var in [
        "LD_PRELOAD",
        "APUS_CONFIG",
        "APUS_ID",
        apus::supervisor::ENV_NAME,
        apus::supervisor::ENV_TOKEN,
    ] {
        command.env_remove(var);
    }
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", argv[0]))?;
    let pid = child.id();
    let read_all = |r: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut text);
            }
            text
        })
    };
    let out = read_all(
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn Read + Send>),
    );
    let err = read_all(
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn Read + Send>),
    );
    // The child is reaped by whoever reaps it (the server or `Child`'s
    // drop never waits); only its output is read.
    drop(child);
    let deadline = Instant::now() + cmd.timeout;
    let stop = Arc::new(AtomicBool::new(false));
    let mut relays = Vec::new();
    let result = loop {
        match proxy.accept() {
            Ok((client, _)) => match replay.connect_check() {
                Ok((server, local)) => {
                    let stop = stop.clone();
                    relays.push((
                        local,
                        thread::spawn(move || crate::inside(|| relay(client, server, &stop))),
                    ));
                }
                Err(e) => break Err(format!("cannot connect to the server: {e}")),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => break Err(format!("digest relay: {e}")),
        }
        if out.is_finished() {
            break Ok(());
        }
        if Instant::now() >= deadline {
            break Err(format!(
                "{} did not finish within {:?} (a single-threaded leader under load cannot \
                 answer while its next input waits for this check; retry when it is quieter)",
                argv[0], cmd.timeout
            ));
        }
        thread::sleep(Duration::from_millis(2));
    };
    if result.is_err() {
        // SAFETY: signalling the shell we started (its process group is
        // the server's, so only it).
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
    stop.store(true, Ordering::SeqCst);
    for (local, r) in relays {
        let _ = r.join();
        replay.forget_internal(local);
    }
    // Reap the shell unless the server did (a zombie per check otherwise).
    for _ in 0..50 {
        // SAFETY: waitpid on our own child's pid, status not needed.
        let r = unsafe { libc::waitpid(pid as i32, std::ptr::null_mut(), libc::WNOHANG) };
        if r != 0 {
            break;
        }
        thread::sleep(Duration::from_millis(2));
    }
    result?;
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    let (printed, status) = out
        .rsplit_once(EXIT_MARK)
        .ok_or_else(|| format!("{} ended without its exit status: {}", argv[0], err.trim()))?;
    if status.trim() != "0" {
        return Err(format!(
            "{} failed (exit {}): {}",
            argv[0],
            status.trim(),
            err.trim()
        ));
    }
    let mut digest = printed.trim().to_string();
    digest.truncate(MAX_DIGEST);
    Ok(digest)
}

/// Waits until no thread of the server runs: none of this process's own
/// (the library's, named `apus-*`, aside) and none of `children`'s. A
/// server that hands what it read to worker threads (slapd) may still be
/// executing the input before the CHECK entry; its digest must see it done.
/// Bounded by `within`; three quiet looks in a row are taken as quiet.
pub fn wait_quiescent(children: &[u32], within: Duration) {
    let deadline = Instant::now() + within;
    let mut quiet = 0;
    while quiet < 3 && Instant::now() < deadline {
        let busy = std::iter::once(std::process::id())
            .chain(children.iter().copied())
            .any(|pid| {
                let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                    return false;
                };
                tasks.flatten().any(|t| {
                    let dir = t.path();
                    let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
                    !comm.starts_with("apus-")
                        && std::fs::read_to_string(dir.join("stat")).is_ok_and(|st| {
                            st.rfind(')')
                                .and_then(|i| st[i + 1..].split_whitespace().next())
                                .is_some_and(|state| matches!(state, "R" | "D"))
                        })
                })
            });
        quiet = if busy { 0 } else { quiet + 1 };
        thread::sleep(Duration::from_millis(2));
    }
}

/// Copies bytes both ways until either side ends (or `stop`).
fn relay(client: TcpStream, server: TcpStream, stop: &AtomicBool) {
    let pump = |mut from: TcpStream, mut to: TcpStream, stop: &AtomicBool| {
        let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
        let mut buf = [0u8; 16 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    };
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    thread::scope(|s| {
        s.spawn(|| crate::inside(|| pump(client, s2, stop)));
        pump(server, c2, stop);
    });
}
