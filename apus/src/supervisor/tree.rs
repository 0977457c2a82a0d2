//! The server's processes as `apus run` sees them.
//!
//! `apus run` is a child subreaper, so every process the server starts,
//! daemons and their children included, stays its descendant: orphans are
//! reparented to it, not to init. Everything here reads `/proc`.

use std::collections::{HashMap, HashSet};
use std::io;
use std::time::{Duration, Instant};

/// Makes this process the reaper of its orphaned descendants.
pub fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with an integer argument touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `(ppid, state)` of `pid` from `/proc/<pid>/stat`.
fn stat(pid: u32) -> Option<(u32, char)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let rest = &s[s.rfind(')')? + 1..];
    let mut f = rest.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    Some((ppid, state))
}

/// Whether `pid` is a live (not zombie) process.
pub fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(_, state)| state != 'Z' && state != 'X')
}

/// The program name of `pid`.
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Every live descendant of `root`.
pub fn descendants(root: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for pid in dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
    {
        if let Some((ppid, state)) = stat(pid)
            && state != 'Z'
            && state != 'X'
        {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

/// Collects every exited child (descendants reparented to us included);
/// returns `(pid, exit code)` (128 + signal for a killed one).
pub fn reap() -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes only `status`.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return out;
        }
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        };
        out.push((pid as u32, code));
    }
}

/// Signals every descendant of `root`.
pub fn signal_all(root: u32, sig: i32) {
    for pid in descendants(root) {
        // SAFETY: kill has no memory preconditions.
        unsafe {
            libc::kill(pid as i32, sig);
        }
    }
}

/// Stops every descendant of `root`: SIGTERM, then SIGKILL for what is
/// left after `grace`; reaps them. Returns the exits reaped meanwhile.
pub fn stop_all(root: u32, grace: Duration) -> Vec<(u32, i32)> {
    let mut reaped = Vec::new();
    if !grace.is_zero() {
        signal_all(root, libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline && !descendants(root).is_empty() {
            reaped.extend(reap());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    while !descendants(root).is_empty() {
        signal_all(root, libc::SIGKILL);
        reaped.extend(reap());
        std::thread::sleep(Duration::from_millis(5));
    }
    reaped.extend(reap());
    reaped
}

/// Inodes of TCP sockets listening on `port` (IPv4 and IPv6).
pub fn listening_on(port: u16) -> HashSet<u64> {
    let mut out = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:tm retr uid timeout inode
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let local_port = f[1]
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port)
                && let Ok(inode) = f[9].parse::<u64>()
            {
                out.insert(inode);
            }
        }
    }
    out
}

/// Inodes of the sockets `pid` holds open.
pub fn sockets_of(pid: u32) -> HashSet<u64> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return HashSet::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let link = std::fs::read_link(e.path()).ok()?;
            let s = link.to_str()?;
            s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// The descendants of `root` that hold a socket listening on `port`.
pub fn listeners(root: u32, port: u16) -> Vec<u32> {
    let inodes = listening_on(port);
    if inodes.is_empty() {
        return Vec::new();
    }
    descendants(root)
        .into_iter()
        .filter(|&p| !sockets_of(p).is_disjoint(&inodes))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_listener_among_descendants() {
        let me = std::process::id();
        assert!(alive(me));
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(!listening_on(port).is_empty());
        assert!(!sockets_of(me).is_disjoint(&listening_on(port)));
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(descendants(me).contains(&child.id()));
        assert_eq!(comm(child.id()), "sleep");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!alive(child.id()));
    }
}
