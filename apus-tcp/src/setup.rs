//! What remote-memory transports exchange over an authenticated set-up
//! stream after the [`handshake`](crate::handshake): the windows of a
//! region a peer may use ([`Window`], checked into a [`RemoteWindow`]), and
//! a non-blocking reader of length-prefixed messages ([`MessageReader`]).
//!
//! The libfabric and verbs transports both keep the stream open after the
//! set-up messages: its loss is the peer's loss.

use std::io::{self, Read};
use std::net::TcpStream;
use std::ops::Range;

use crate::handshake::MAX_MESSAGE;

/// A registered window of a region, as its owner describes it to a peer.
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct Window {
    /// Region offset of its first byte.
    #[prost(uint64, tag = "1")]
    pub offset: u64,
    /// Length in bytes.
    #[prost(uint64, tag = "2")]
    pub len: u64,
    /// The address a peer names for its first byte.
    #[prost(uint64, tag = "3")]
    pub addr: u64,
    /// The registration's key.
    #[prost(uint64, tag = "4")]
    pub key: u64,
}

/// A window of a peer's region, checked against the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteWindow {
    offset: usize,
    len: usize,
    addr: u64,
    key: u64,
}

impl RemoteWindow {
    /// Checks a window a peer sent against the range the layout says it
    /// covers; `what` names it in the error.
    pub fn check(w: Option<Window>, want: Range<usize>, what: &str) -> Result<Self, String> {
        let w = w.ok_or_else(|| format!("set-up message without the {what} window"))?;
        if w.offset != want.start as u64 || w.len != want.len() as u64 {
            return Err(format!(
                "{what} window {}+{} where the layout has {}+{}",
                w.offset,
                w.len,
                want.start,
                want.len()
            ));
        }
        if w.addr.checked_add(w.len).is_none() {
            return Err(format!("{what} window address overflows"));
        }
        Ok(RemoteWindow {
            offset: want.start,
            len: want.len(),
            addr: w.addr,
            key: w.key,
        })
    }

    /// The registration's key.
    pub fn key(&self) -> u64 {
        self.key
    }

    /// The remote address and key of region bytes `offset..offset + len`,
    /// if the window holds all of them.
    pub fn at(&self, offset: usize, len: usize) -> Option<(u64, u64)> {
        let end = offset.checked_add(len)?;
        (offset >= self.offset && end <= self.offset + self.len)
            .then(|| (self.addr + (offset - self.offset) as u64, self.key))
    }
}

/// What [`MessageReader::read_from`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamState {
    /// Still open (nothing more to read now).
    Open,
    /// The peer closed it.
    Closed,
}

/// Reassembles length-prefixed messages (as
/// [`write_msg`](crate::handshake::write_msg) sends them) from a
/// non-blocking stream.
#[derive(Debug, Default)]
pub struct MessageReader {
    buf: Vec<u8>,
}

impl MessageReader {
    /// Reads what the stream has now.
    pub fn read_from(&mut self, stream: &mut TcpStream) -> io::Result<StreamState> {
        let mut chunk = [0u8; 1024];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => return Ok(StreamState::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(StreamState::Open),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The next whole message's body, if one arrived; an error if its
    /// length prefix exceeds [`MAX_MESSAGE`].
    pub fn next_message(&mut self) -> Result<Option<Vec<u8>>, String> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
        if len > MAX_MESSAGE {
            return Err(format!("oversized set-up message ({len} bytes)"));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        Ok(Some(self.buf.drain(..4 + len).skip(4).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    #[test]
    fn windows_are_checked_against_the_layout() {
        let w = Window {
            offset: 64,
            len: 128,
            addr: 0x1000,
            key: 7,
        };
        let r = RemoteWindow::check(Some(w), 64..192, "slots").unwrap();
        assert_eq!(r.at(64, 8), Some((0x1000, 7)));
        assert_eq!(r.at(184, 8), Some((0x1000 + 120, 7)));
        assert_eq!(r.at(185, 8), None);
        assert_eq!(r.at(0, 8), None);
        assert_eq!(r.at(usize::MAX, 2), None);
        assert!(RemoteWindow::check(Some(w), 0..128, "slots").is_err());
        assert!(RemoteWindow::check(None, 64..192, "slots").is_err());
        let overflowing = Window {
            addr: u64::MAX - 4,
            ..w
        };
        assert!(RemoteWindow::check(Some(overflowing), 64..192, "slots").is_err());
    }

    #[test]
    fn reader_splits_messages_and_refuses_oversized_ones() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut b, _) = l.accept().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut r = MessageReader::default();
        a.write_all(&[2, 0, 0, 0, 9, 9, 0, 0]).unwrap();
        a.write_all(&[0, 0]).unwrap();
        let mut got = Vec::new();
        for _ in 0..1000 {
            assert_eq!(r.read_from(&mut b).unwrap(), StreamState::Open);
            while let Some(m) = r.next_message().unwrap() {
                got.push(m);
            }
            if got.len() == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(got, vec![vec![9, 9], vec![]]);
        a.write_all(&(MAX_MESSAGE as u32 + 1).to_le_bytes())
            .unwrap();
        for _ in 0..1000 {
            r.read_from(&mut b).unwrap();
            if r.buf.len() >= 4 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(r.next_message().is_err());
        drop(a);
        let mut closed = false;
        for _ in 0..1000 {
            if r.read_from(&mut b).unwrap() == StreamState::Closed {
                closed = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(closed);
    }
}
