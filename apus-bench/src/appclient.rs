//! Small clients for the servers the end-to-end checks, the demo and the
//! benchmark drive:
//! RESP (Redis, resp-kv) and the memcached text protocol. Only what the
//! harness sends is implemented; anything unexpected is an error.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// How long a request may wait for its reply. Generous: a replicated
/// server holds a request while a new leader is elected.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<(BufReader<TcpStream>, TcpStream)> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(REPLY_TIMEOUT))?;
    s.set_write_timeout(Some(REPLY_TIMEOUT))?;
    Ok((BufReader::new(s.try_clone()?), s))
}

/// Reads one line without its `\r\n`; end of stream is an error.
fn line(r: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let mut l = Vec::new();
    if r.read_until(b'\n', &mut l)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    match l.strip_suffix(b"\r\n") {
        Some(body) => Ok(body.to_vec()),
        None => Err(invalid(format!(
            "line not terminated by CRLF: {:?}",
            String::from_utf8_lossy(&l)
        ))),
    }
}

fn number<T: std::str::FromStr>(b: &[u8]) -> io::Result<T> {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("not a number: {:?}", String::from_utf8_lossy(b))))
}

/// A RESP reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Resp>),
}

/// One RESP connection.
#[derive(Debug)]
pub struct RespConn {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl RespConn {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<RespConn> {
        let (r, w) = connect(addr, timeout)?;
        Ok(RespConn { r, w })
    }

    /// Sends one command and reads its reply.
    pub fn call(&mut self, args: &[&[u8]]) -> io::Result<Resp> {
        let mut req = Vec::new();
        encode(&mut req, args);
        self.w.write_all(&req)?;
        self.read()
    }

    /// Sends `depth` copies of one command at once (pipelined), then reads
    /// their replies, each of which `check` must accept.
    pub fn call_pipelined(
        &mut self,
        args: &[&[u8]],
        depth: usize,
        check: impl Fn(&Resp) -> bool,
    ) -> io::Result<()> {
        let mut req = Vec::new();
        for _ in 0..depth {
            encode(&mut req, args);
        }
        self.w.write_all(&req)?;
        for _ in 0..depth {
            let reply = self.read()?;
            if !check(&reply) {
                return Err(invalid(format!(
                    "{}: {reply:?}",
                    String::from_utf8_lossy(args[0])
                )));
            }
        }
        Ok(())
    }

    fn read(&mut self) -> io::Result<Resp> {
        let l = line(&mut self.r)?;
        let (kind, body) = l
            .split_first()
            .ok_or_else(|| invalid("empty reply line".into()))?;
        Ok(match kind {
            b'+' => Resp::Simple(String::from_utf8_lossy(body).into_owned()),
            b'-' => Resp::Error(String::from_utf8_lossy(body).into_owned()),
            b':' => Resp::Int(number(body)?),
            b'$' => {
                let n: i64 = number(body)?;
                if n < 0 {
                    Resp::Bulk(None)
                } else {
                    let mut b = vec![0u8; n as usize + 2];
                    self.r.read_exact(&mut b)?;
                    b.truncate(n as usize);
                    Resp::Bulk(Some(b))
                }
            }
            b'*' => {
                let n: i64 = number(body)?;
                let mut items = Vec::new();
                for _ in 0..n.max(0) {
                    items.push(self.read()?);
                }
                Resp::Array(items)
            }
            _ => {
                return Err(invalid(format!(
                    "unexpected RESP reply {:?}",
                    String::from_utf8_lossy(&l)
                )));
            }
        })
    }
}

/// Appends one RESP command (an array of bulk strings) to `req`.
fn encode(req: &mut Vec<u8>, args: &[&[u8]]) {
    req.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a);
        req.extend_from_slice(b"\r\n");
    }
}

/// One memcached text-protocol connection.
#[derive(Debug)]
pub struct McConn {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl McConn {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<McConn> {
        let (r, w) = connect(addr, timeout)?;
        Ok(McConn { r, w })
    }

    pub fn set(&mut self, key: &str, value: &[u8]) -> io::Result<()> {
        self.set_pipelined(key, value, 1)
    }

    /// `depth` sets sent at once, then their replies read.
    pub fn set_pipelined(&mut self, key: &str, value: &[u8], depth: usize) -> io::Result<()> {
        let mut req = Vec::new();
        for _ in 0..depth {
            req.extend_from_slice(format!("set {key} 0 0 {}\r\n", value.len()).as_bytes());
            req.extend_from_slice(value);
            req.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&req)?;
        for _ in 0..depth {
            match line(&mut self.r)?.as_slice() {
                b"STORED" => {}
                other => {
                    return Err(invalid(format!(
                        "set {key}: {}",
                        String::from_utf8_lossy(other)
                    )));
                }
            }
        }
        Ok(())
    }

    /// `get k1 k2 ...`: the keys that exist, with their values.
    pub fn get_many(&mut self, keys: &[String]) -> io::Result<Vec<(String, Vec<u8>)>> {
        self.w
            .write_all(format!("get {}\r\n", keys.join(" ")).as_bytes())?;
        let mut out = Vec::new();
        loop {
            let l = line(&mut self.r)?;
            if l == b"END" {
                return Ok(out);
            }
            let text = String::from_utf8_lossy(&l).into_owned();
            let mut f = text.split(' ');
            match (f.next(), f.next(), f.next(), f.next()) {
                (Some("VALUE"), Some(key), Some(_flags), Some(len)) => {
                    let n: usize = number(len.as_bytes())?;
                    let mut b = vec![0u8; n + 2];
                    self.r.read_exact(&mut b)?;
                    b.truncate(n);
                    out.push((key.to_string(), b));
                }
                _ => return Err(invalid(format!("get: unexpected line {text:?}"))),
            }
        }
    }

    pub fn incr(&mut self, key: &str) -> io::Result<i64> {
        self.w.write_all(format!("incr {key} 1\r\n").as_bytes())?;
        let l = line(&mut self.r)?;
        number(&l).map_err(|_| {
            invalid(format!(
                "incr {key}: {}",
                String::from_utf8_lossy(&l).into_owned()
            ))
        })
    }
}

/// Which protocol a server speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Resp,
    Memcached,
}

/// A connection to any of the servers, with the operations the harness
/// needs.
#[derive(Debug)]
pub enum AppConn {
    Resp(RespConn),
    Mc(McConn),
}

impl AppConn {
    pub fn connect(p: Protocol, addr: SocketAddr, timeout: Duration) -> io::Result<AppConn> {
        Ok(match p {
            Protocol::Resp => AppConn::Resp(RespConn::connect(addr, timeout)?),
            Protocol::Memcached => AppConn::Mc(McConn::connect(addr, timeout)?),
        })
    }

    pub fn set(&mut self, key: &str, value: &[u8]) -> io::Result<()> {
        self.set_pipelined(key, value, 1)
    }

    /// `depth` sets of `key` sent at once (pipelined), then every reply
    /// read and checked.
    pub fn set_pipelined(&mut self, key: &str, value: &[u8], depth: usize) -> io::Result<()> {
        match self {
            AppConn::Resp(c) => c.call_pipelined(
                &[b"SET", key.as_bytes(), value],
                depth,
                |r| matches!(r, Resp::Simple(s) if s == "OK"),
            ),
            AppConn::Mc(c) => c.set_pipelined(key, value, depth),
        }
    }

    pub fn get(&mut self, key: &str) -> io::Result<Option<Vec<u8>>> {
        match self {
            AppConn::Resp(c) => match c.call(&[b"GET", key.as_bytes()])? {
                Resp::Bulk(v) => Ok(v),
                other => Err(invalid(format!("GET {key}: {other:?}"))),
            },
            AppConn::Mc(c) => Ok(c.get_many(&[key.to_string()])?.pop().map(|(_, v)| v)),
        }
    }

    pub fn incr(&mut self, key: &str) -> io::Result<i64> {
        match self {
            AppConn::Resp(c) => match c.call(&[b"INCR", key.as_bytes()])? {
                Resp::Int(v) => Ok(v),
                other => Err(invalid(format!("INCR {key}: {other:?}"))),
            },
            AppConn::Mc(c) => c.incr(key),
        }
    }
}

/// FNV-1a, to fingerprint dumped key-value pairs.
pub fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// A small deterministic generator for load keys and garbage bytes.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}
