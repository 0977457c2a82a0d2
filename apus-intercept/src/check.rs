//! `apus check`: the server's own digest command, run at a log position.
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

use apus::config::DigestCommand;

use crate::replay::Replay;

/// Largest digest kept (the rest of the output is cut).
const MAX_DIGEST: usize = 4096;

/// Runs `cmd` against the server behind `replay` and returns what it printed.
pub fn run_digest(cmd: &DigestCommand, replay: &Replay) -> Result<String, String> {
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
    let mut command = Command::new(&argv[0]);
    command
        .args(&argv[1..])
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
    let deadline = Instant::now() + cmd.timeout;
    let stop = Arc::new(AtomicBool::new(false));
    let mut relays = Vec::new();
    let status = loop {
        match proxy.accept() {
            Ok((client, _)) => match replay.connect_check() {
                Ok((server, local)) => {
                    let stop = stop.clone();
                    relays.push((local, thread::spawn(move || relay(client, server, &stop))));
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("cannot connect to the server: {e}"));
                }
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("digest relay: {e}")),
        }
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                stop.store(true, Ordering::SeqCst);
                return Err(format!(
                    "{} did not finish within {:?} (a single-threaded leader under load cannot \
                     answer while its next input waits for this check; retry when it is quieter)",
                    argv[0], cmd.timeout
                ));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    stop.store(true, Ordering::SeqCst);
    for (local, r) in relays {
        let _ = r.join();
        replay.forget_internal(local);
    }
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if !status.success() {
        return Err(format!("{} failed ({status}): {}", argv[0], err.trim()));
    }
    let mut digest = out.trim().to_string();
    digest.truncate(MAX_DIGEST);
    Ok(digest)
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
        s.spawn(|| pump(client, s2, stop));
        pump(server, c2, stop);
    });
}
