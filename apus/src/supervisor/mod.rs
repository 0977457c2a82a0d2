//! The link between `apus run` and the interception library inside the
//! server's processes.
//!
//! `apus run` listens on an abstract UNIX socket whose name and token it
//! puts in the server's environment (`APUS_SUPERVISOR`,
//! `APUS_SUPERVISOR_TOKEN`). Every process of the server's tree that loads
//! the library can reach it, whatever it did to its descriptors (daemons
//! close them) and however deep in the tree it is (wrapper scripts,
//! daemonized grandchildren). One request per connection:
//!
//! ```text
//! frame = len u32 | kind u8 | token [16] | pid u32 | text     (little-endian)
//! CLAIM    1  the process listens on the app address and will run the node
//!             -> GRANTED | HELD (pid of the process that runs it)
//! STARTED  2  the node runs in this process; the connection stays open as
//!             the lifeline (the library ends the server when it closes)
//! REFUSE   3  text: why the server must not run; apus run stops it (78)
//! REBUILD  4  text: why the server's state cannot be trusted; apus run
//!             restarts it from its pristine state and the log
//! SAY      5  text: a note for the operator (apus run prints it)
//! ```
//!
//! The token is random per `apus run`, so a process outside the server's
//! tree cannot stop or restart it.

pub mod pristine;
pub mod run;
pub mod tree;

use std::io::{self, Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};
use std::time::Duration;

/// The environment variable holding the socket's abstract name.
pub const ENV_NAME: &str = "APUS_SUPERVISOR";
/// The environment variable holding the token, in hex.
pub const ENV_TOKEN: &str = "APUS_SUPERVISOR_TOKEN";
/// Bytes of the token.
pub const TOKEN_LEN: usize = 16;
/// Largest message text.
pub const MAX_TEXT: usize = 4096;

/// What a library process tells `apus run`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// This process listens on the app address and asks to run the node.
    Claim,
    /// The node runs in this process.
    Started,
    /// The server must be stopped, for this reason.
    Refuse(String),
    /// The server must be rebuilt from its pristine state, for this reason.
    Rebuild(String),
    /// A note for the operator.
    Say(String),
}

/// `apus run`'s answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// Done (or: this process may run the node).
    Granted,
    /// Another live process runs the node.
    Held(u32),
}

/// A message with who sent it, as `apus run` receives it.
#[derive(Debug)]
pub struct Received {
    /// The sender's pid (as it says; the token vouches for the sender).
    pub pid: u32,
    /// What it says.
    pub message: Message,
    /// The connection, to answer on (and, after `Started`, the lifeline).
    pub stream: UnixStream,
}

/// A malformed or unauthenticated message.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The frame is malformed.
    #[error("malformed supervisor message: {0}")]
    Malformed(&'static str),
    /// The token is wrong.
    #[error("supervisor message with a wrong token")]
    Token,
    /// An I/O error.
    #[error(transparent)]
    Io(#[from] io::Error),
}

const CLAIM: u8 = 1;
const STARTED: u8 = 2;
const REFUSE: u8 = 3;
const REBUILD: u8 = 4;
const SAY: u8 = 5;
const GRANTED: u8 = 1;
const HELD: u8 = 2;

impl Message {
    fn encode(&self, token: &[u8; TOKEN_LEN], pid: u32) -> Vec<u8> {
        let (kind, text) = match self {
            Message::Claim => (CLAIM, ""),
            Message::Started => (STARTED, ""),
            Message::Refuse(t) => (REFUSE, t.as_str()),
            Message::Rebuild(t) => (REBUILD, t.as_str()),
            Message::Say(t) => (SAY, t.as_str()),
        };
        let text = &text.as_bytes()[..text.len().min(MAX_TEXT)];
        let len = 1 + TOKEN_LEN + 4 + text.len();
        let mut b = Vec::with_capacity(4 + len);
        b.extend_from_slice(&(len as u32).to_le_bytes());
        b.push(kind);
        b.extend_from_slice(token);
        b.extend_from_slice(&pid.to_le_bytes());
        b.extend_from_slice(text);
        b
    }

    fn decode(body: &[u8], token: &[u8; TOKEN_LEN]) -> Result<(u32, Message), SupervisorError> {
        if body.len() < 1 + TOKEN_LEN + 4 {
            return Err(SupervisorError::Malformed("too short"));
        }
        if body[1..1 + TOKEN_LEN] != token[..] {
            return Err(SupervisorError::Token);
        }
        let pid = u32::from_le_bytes(
            body[1 + TOKEN_LEN..5 + TOKEN_LEN]
                .try_into()
                .expect("4 bytes"),
        );
        let text = String::from_utf8_lossy(&body[5 + TOKEN_LEN..]).into_owned();
        let m = match body[0] {
            CLAIM => Message::Claim,
            STARTED => Message::Started,
            REFUSE => Message::Refuse(text),
            REBUILD => Message::Rebuild(text),
            SAY => Message::Say(text),
            _ => return Err(SupervisorError::Malformed("unknown kind")),
        };
        Ok((pid, m))
    }
}

fn abstract_addr(name: &str) -> io::Result<UnixAddr> {
    UnixAddr::from_abstract_name(name.as_bytes())
}

/// The library's side: how to reach `apus run`.
#[derive(Clone, Debug)]
pub struct Link {
    name: String,
    token: [u8; TOKEN_LEN],
}

impl Link {
    /// The supervisor named in this process's environment, if any. `Err`
    /// when the variables are there but malformed.
    pub fn from_env() -> Result<Option<Link>, SupervisorError> {
        let (Ok(name), Ok(token)) = (std::env::var(ENV_NAME), std::env::var(ENV_TOKEN)) else {
            return Ok(None);
        };
        let token =
            parse_token(&token).ok_or(SupervisorError::Malformed("token is not 32 hex digits"))?;
        Ok(Some(Link { name, token }))
    }

    /// Sends `message` and waits for the answer; returns the answer and the
    /// connection (the lifeline, after `Started`).
    pub fn send(&self, message: &Message) -> Result<(Answer, UnixStream), SupervisorError> {
        let mut s = UnixStream::connect_addr(&abstract_addr(&self.name)?)?;
        s.set_write_timeout(Some(Duration::from_secs(5)))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(&message.encode(&self.token, std::process::id()))?;
        let mut a = [0u8; 5];
        s.read_exact(&mut a)?;
        s.set_read_timeout(None)?;
        let answer = match a[0] {
            GRANTED => Answer::Granted,
            HELD => Answer::Held(u32::from_le_bytes(a[1..5].try_into().expect("4 bytes"))),
            _ => return Err(SupervisorError::Malformed("unknown answer")),
        };
        Ok((answer, s))
    }
}

fn parse_token(hex: &str) -> Option<[u8; TOKEN_LEN]> {
    if hex.len() != TOKEN_LEN * 2 {
        return None;
    }
    let mut t = [0u8; TOKEN_LEN];
    for (i, b) in t.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(t)
}

/// `apus run`'s side: the listening socket.
#[derive(Debug)]
pub struct Listener {
    listener: UnixListener,
    name: String,
    token: [u8; TOKEN_LEN],
}

impl Listener {
    /// Binds a fresh abstract socket with a fresh random token.
    pub fn bind() -> io::Result<Listener> {
        let mut rnd = [0u8; TOKEN_LEN + 8];
        read_random(&mut rnd)?;
        let mut token = [0u8; TOKEN_LEN];
        token.copy_from_slice(&rnd[..TOKEN_LEN]);
        let name = format!("apus-run/{}/{}", std::process::id(), hex(&rnd[TOKEN_LEN..]));
        let listener = UnixListener::bind_addr(&abstract_addr(&name)?)?;
        Ok(Listener {
            listener,
            name,
            token,
        })
    }

    /// The environment a server needs to reach this supervisor.
    pub fn env(&self) -> [(&'static str, String); 2] {
        [(ENV_NAME, self.name.clone()), (ENV_TOKEN, hex(&self.token))]
    }

    /// Waits for the next authentic message. Connections with malformed or
    /// unauthenticated frames are dropped (and reported as errors).
    pub fn receive(&self) -> Result<Received, SupervisorError> {
        let (mut stream, _) = self.listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut len = [0u8; 4];
        stream.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len) as usize;
        if !(1 + TOKEN_LEN + 4..=1 + TOKEN_LEN + 4 + MAX_TEXT).contains(&len) {
            return Err(SupervisorError::Malformed("bad length"));
        }
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body)?;
        stream.set_read_timeout(None)?;
        let (pid, message) = Message::decode(&body, &self.token)?;
        Ok(Received {
            pid,
            message,
            stream,
        })
    }
}

impl Received {
    /// Answers the sender.
    pub fn answer(&mut self, a: Answer) -> io::Result<()> {
        let mut b = [0u8; 5];
        match a {
            Answer::Granted => b[0] = GRANTED,
            Answer::Held(pid) => {
                b[0] = HELD;
                b[1..].copy_from_slice(&pid.to_le_bytes());
            }
        }
        self.stream.write_all(&b)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn read_random(buf: &mut [u8]) -> io::Result<()> {
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_need_the_token() {
        let token = [7u8; TOKEN_LEN];
        for m in [
            Message::Claim,
            Message::Started,
            Message::Refuse("why".into()),
            Message::Rebuild("because".into()),
            Message::Say("also listening".into()),
        ] {
            let f = m.encode(&token, 42);
            let (pid, back) = Message::decode(&f[4..], &token).unwrap();
            assert_eq!((pid, back), (42, m.clone()));
            assert!(matches!(
                Message::decode(&f[4..], &[8u8; TOKEN_LEN]),
                Err(SupervisorError::Token)
            ));
        }
        assert!(Message::decode(&[1, 2, 3], &token).is_err());
        let mut f = Message::Claim.encode(&token, 1);
        f[4] = 99;
        assert!(Message::decode(&f[4..], &token).is_err());
        assert_eq!(parse_token(&hex(&token)), Some(token));
        assert_eq!(parse_token("zz"), None);
    }

    #[test]
    fn a_link_reaches_its_listener() {
        let l = Listener::bind().unwrap();
        let [(_, name), (_, token)] = l.env();
        let link = Link {
            name,
            token: parse_token(&token).unwrap(),
        };
        let t = std::thread::spawn(move || {
            let mut r = l.receive().unwrap();
            assert_eq!(r.message, Message::Say("hello".into()));
            assert_eq!(r.pid, std::process::id());
            r.answer(Answer::Held(9)).unwrap();
        });
        let (a, _) = link.send(&Message::Say("hello".into())).unwrap();
        assert_eq!(a, Answer::Held(9));
        t.join().unwrap();
        // A wrong token is refused: the listener drops the connection.
        let l = Listener::bind().unwrap();
        let [(_, name), _] = l.env();
        let bad = Link {
            name,
            token: [0; TOKEN_LEN],
        };
        let t = std::thread::spawn(move || l.receive().map(|_| ()));
        assert!(bad.send(&Message::Claim).is_err());
        assert!(matches!(t.join().unwrap(), Err(SupervisorError::Token)));
    }
}
