//! `resp-kv`: a small key-value server speaking RESP (the Redis protocol),
//! written with the standard library only and knowing nothing of APUS. The
//! demo runs three copies of it under `apus run`.
//!
//! ```text
//! resp-kv [--port 6390]
//! ```
//!
//! Commands: PING, ECHO, SET, GET, DEL, EXISTS, INCR, INCRBY, DBSIZE, DIGEST
//! (a hash of the whole state, to compare replicas), QUIT.
//!
//! One thread serves every connection with non-blocking sockets, and runs
//! each request as soon as it has read it: the state and every reply depend
//! only on the order in which input is read, as with Redis's event loop.
//! Like Redis, one pass reads every client, then writes every reply.

use std::collections::BTreeMap;
use std::io::{self, BufRead, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

type Db = Arc<Mutex<BTreeMap<Vec<u8>, Vec<u8>>>>;

/// Largest bulk string accepted.
const MAX_BULK: usize = 1 << 20;
/// Most arguments in one command.
const MAX_ARGS: usize = 1024;

enum Reply {
    Simple(&'static str),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
}

fn write_reply(w: &mut impl Write, r: &Reply) -> io::Result<()> {
    match r {
        Reply::Simple(s) => write!(w, "+{s}\r\n"),
        Reply::Error(e) => write!(w, "-{e}\r\n"),
        Reply::Int(i) => write!(w, ":{i}\r\n"),
        Reply::Bulk(None) => w.write_all(b"$-1\r\n"),
        Reply::Bulk(Some(b)) => {
            write!(w, "${}\r\n", b.len())?;
            w.write_all(b)?;
            w.write_all(b"\r\n")
        }
    }
}

/// Reads one request: a RESP array of bulk strings, or an inline command.
/// `Ok(None)` at a clean end of stream; `Err` for malformed input.
fn read_request(r: &mut impl BufRead) -> io::Result<Option<Vec<Vec<u8>>>> {
    let mut line = Vec::new();
    if r.read_until(b'\n', &mut line)? == 0 {
        return Ok(None);
    }
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
    let trimmed = line
        .strip_suffix(b"\r\n")
        .or(line.strip_suffix(b"\n"))
        .unwrap_or(&line);
    if let Some(n) = trimmed.strip_prefix(b"*") {
        let n: usize = std::str::from_utf8(n)
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|&n| n <= MAX_ARGS)
            .ok_or_else(|| bad("bad array length"))?;
        let mut args = Vec::with_capacity(n);
        for _ in 0..n {
            line.clear();
            r.read_until(b'\n', &mut line)?;
            let len: usize = line
                .strip_prefix(b"$")
                .and_then(|l| l.strip_suffix(b"\r\n"))
                .and_then(|l| std::str::from_utf8(l).ok())
                .and_then(|s| s.parse().ok())
                .filter(|&l| l <= MAX_BULK)
                .ok_or_else(|| bad("bad bulk length"))?;
            let mut arg = vec![0u8; len + 2];
            r.read_exact(&mut arg)?;
            if &arg[len..] != b"\r\n" {
                return Err(bad("bulk string not terminated"));
            }
            arg.truncate(len);
            args.push(arg);
        }
        Ok(Some(args))
    } else {
        Ok(Some(
            trimmed
                .split(|b| *b == b' ')
                .filter(|a| !a.is_empty())
                .map(<[u8]>::to_vec)
                .collect(),
        ))
    }
}

fn int(v: &[u8]) -> Option<i64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn execute(db: &Db, args: &[Vec<u8>]) -> Reply {
    let Some(cmd) = args.first() else {
        return Reply::Error("ERR empty command".into());
    };
    let cmd = cmd.to_ascii_uppercase();
    let arity = |n: usize| args.len() == n;
    let mut db = db.lock().unwrap_or_else(|p| p.into_inner());
    match cmd.as_slice() {
        b"PING" => Reply::Simple("PONG"),
        b"ECHO" if arity(2) => Reply::Bulk(Some(args[1].clone())),
        b"SET" if arity(3) => {
            db.insert(args[1].clone(), args[2].clone());
            Reply::Simple("OK")
        }
        b"GET" if arity(2) => Reply::Bulk(db.get(&args[1]).cloned()),
        b"DEL" if args.len() >= 2 => {
            Reply::Int(args[1..].iter().filter(|k| db.remove(*k).is_some()).count() as i64)
        }
        b"EXISTS" if args.len() >= 2 => {
            Reply::Int(args[1..].iter().filter(|k| db.contains_key(*k)).count() as i64)
        }
        b"INCR" | b"INCRBY" if arity(2) || (cmd == b"INCRBY" && arity(3)) => {
            let by = if cmd == b"INCR" {
                Some(1)
            } else {
                int(&args[2])
            };
            let Some(by) = by else {
                return Reply::Error("ERR value is not an integer".into());
            };
            let cur = match db.get(&args[1]) {
                None => 0,
                Some(v) => match int(v) {
                    Some(i) => i,
                    None => return Reply::Error("ERR value is not an integer".into()),
                },
            };
            let Some(next) = cur.checked_add(by) else {
                return Reply::Error("ERR increment would overflow".into());
            };
            db.insert(args[1].clone(), next.to_string().into_bytes());
            Reply::Int(next)
        }
        b"DBSIZE" if arity(1) => Reply::Int(db.len() as i64),
        b"DIGEST" if arity(1) => {
            // FNV-1a over every key and value in key order.
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for (k, v) in db.iter() {
                for b in k.iter().chain(b"\0").chain(v.iter()).chain(b"\0") {
                    h ^= u64::from(*b);
                    h = h.wrapping_mul(0x0000_0100_0000_01b3);
                }
            }
            Reply::Bulk(Some(format!("{h:016x}").into_bytes()))
        }
        _ => Reply::Error(format!(
            "ERR unknown command or wrong number of arguments for '{}'",
            String::from_utf8_lossy(&cmd)
        )),
    }
}

/// One client connection of the event loop.
struct Client {
    stream: TcpStream,
    input: Vec<u8>,
    output: Vec<u8>,
    closing: bool,
}

/// Parses and runs every complete request in `c.input`; `false` once the
/// connection should close (QUIT, or malformed input after the error reply).
fn run_requests(c: &mut Client, db: &Db) -> bool {
    loop {
        let mut r = io::Cursor::new(&c.input[..]);
        match read_request(&mut r) {
            Ok(Some(req)) => {
                let used = r.position() as usize;
                c.input.drain(..used);
                if req.first().is_some_and(|c| c.eq_ignore_ascii_case(b"QUIT")) {
                    let _ = write_reply(&mut c.output, &Reply::Simple("OK"));
                    return false;
                }
                if !req.is_empty() {
                    let _ = write_reply(&mut c.output, &execute(db, &req));
                }
            }
            Ok(None) => return true,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return true,
            Err(e) => {
                let _ = write_reply(
                    &mut c.output,
                    &Reply::Error(format!("ERR protocol error: {e}")),
                );
                return false;
            }
        }
    }
}

fn serve(listener: TcpListener, db: Db) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let mut clients: Vec<Client> = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut idle = 0u32;
    loop {
        let mut busy = false;
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(true)?;
                    stream.set_nodelay(true)?;
                    clients.push(Client {
                        stream,
                        input: Vec::new(),
                        output: Vec::new(),
                        closing: false,
                    });
                    busy = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    eprintln!("resp-kv: accept: {e}");
                    break;
                }
            }
        }
        for c in clients.iter_mut().filter(|c| !c.closing) {
            match io::Read::read(&mut c.stream, &mut buf) {
                Ok(0) => c.closing = true,
                Ok(n) => {
                    busy = true;
                    c.input.extend_from_slice(&buf[..n]);
                    if !run_requests(c, &db) {
                        c.closing = true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => c.closing = true,
            }
        }
        for c in clients.iter_mut() {
            while !c.output.is_empty() {
                match c.stream.write(&c.output) {
                    Ok(0) => {
                        c.output.clear();
                        c.closing = true;
                    }
                    Ok(n) => {
                        c.output.drain(..n);
                        busy = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        c.output.clear();
                        c.closing = true;
                    }
                }
            }
        }
        // A closing client leaves once its replies are out.
        clients.retain(|c| !(c.closing && c.output.is_empty()));
        // Spin briefly after activity, then back off to at most 1 ms.
        if busy {
            idle = 0;
        } else {
            idle = idle.saturating_add(1);
            if idle > 64 {
                thread::sleep(Duration::from_micros(u64::from(idle.min(1000))));
            }
        }
    }
}

fn main() {
    let mut port = 6390u16;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--port", Some(p)) => match p.parse() {
                Ok(p) => port = p,
                Err(_) => {
                    eprintln!("resp-kv: --port expects a port number, got {p:?}");
                    std::process::exit(2);
                }
            },
            _ => {
                eprintln!("usage: resp-kv [--port PORT]");
                std::process::exit(2);
            }
        }
    }
    let listener = match TcpListener::bind(("127.0.0.1", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("resp-kv: cannot listen on 127.0.0.1:{port}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!("resp-kv: listening on 127.0.0.1:{port}");
    if let Err(e) = serve(listener, Db::default()) {
        eprintln!("resp-kv: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(db: &Db, line: &str) -> String {
        let args: Vec<Vec<u8>> = line.split(' ').map(|a| a.as_bytes().to_vec()).collect();
        let mut out = Vec::new();
        write_reply(&mut out, &execute(db, &args)).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn commands() {
        let db = Db::default();
        assert_eq!(run(&db, "PING"), "+PONG\r\n");
        assert_eq!(run(&db, "SET a 1"), "+OK\r\n");
        assert_eq!(run(&db, "GET a"), "$1\r\n1\r\n");
        assert_eq!(run(&db, "INCR a"), ":2\r\n");
        assert_eq!(run(&db, "INCRBY a 40"), ":42\r\n");
        assert_eq!(run(&db, "GET missing"), "$-1\r\n");
        assert_eq!(run(&db, "DBSIZE"), ":1\r\n");
        assert_eq!(run(&db, "DEL a b"), ":1\r\n");
        assert!(run(&db, "SET a").starts_with("-ERR"));
        assert!(run(&db, "NOPE").starts_with("-ERR"));
        run(&db, "SET x notanumber");
        assert!(run(&db, "INCR x").starts_with("-ERR value"));
    }

    #[test]
    fn digest_depends_on_state_only() {
        let a = Db::default();
        let b = Db::default();
        run(&a, "SET k1 v1");
        run(&a, "SET k2 v2");
        run(&b, "SET k2 v2");
        run(&b, "SET k1 v1");
        assert_eq!(run(&a, "DIGEST"), run(&b, "DIGEST"));
        run(&b, "SET k1 other");
        assert_ne!(run(&a, "DIGEST"), run(&b, "DIGEST"));
    }

    #[test]
    fn parses_resp_and_inline_and_rejects_garbage() {
        let mut r = io::BufReader::new(&b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n"[..]);
        assert_eq!(
            read_request(&mut r).unwrap().unwrap(),
            vec![b"GET".to_vec(), b"k".to_vec()]
        );
        assert_eq!(
            read_request(&mut r).unwrap().unwrap(),
            vec![b"PING".to_vec()]
        );
        assert!(read_request(&mut r).unwrap().is_none());
        for bad in [
            &b"*x\r\n"[..],
            b"*1\r\n$99999999999\r\n",
            b"*1\r\n$1\r\nab\r\n",
            b"*9999\r\n",
        ] {
            let mut r = io::BufReader::new(bad);
            assert!(read_request(&mut r).is_err(), "{bad:?}");
        }
    }
}
