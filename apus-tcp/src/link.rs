//! The protocol state of one connection, whatever carries its bytes (a TCP
//! stream, a QUIC stream): incoming frames are applied to the local region
//! (checking the access rules and the log grant) and answered; operations
//! this side posts are framed out and matched with their completions.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use apus_core::layout::RemoteAccess;
use apus_core::{
    Completion, NodeId, OpError, OpId, Region, RegionLayout, RemoteOp, TransportError,
    TransportEvent,
};
use tracing::debug;

use crate::wire::{self, Frame};

/// Received bytes: `buf[start..end]` is unparsed. The buffer is zeroed once
/// and reused; it grows only for a frame larger than itself.
#[derive(Debug)]
pub(crate) struct RecvBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl RecvBuf {
    fn new() -> RecvBuf {
        RecvBuf {
            buf: vec![0; 256 << 10],
            start: 0,
            end: 0,
        }
    }

    /// Room to read into, compacting or growing as needed.
    pub(crate) fn spare(&mut self) -> &mut [u8] {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                // One frame fills the buffer: make room for the rest of it
                // (frames are bounded by wire::MAX_FRAME).
                let grown = (self.buf.len() * 2).min(wire::MAX_FRAME + wire::LEN_PREFIX + 1);
                self.buf.resize(grown.max(self.buf.len() + 1), 0);
            }
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were read into [`spare`](Self::spare).
    pub(crate) fn filled(&mut self, n: usize) {
        self.end += n;
    }

    /// Appends bytes that arrived in a chunk.
    #[cfg(feature = "quic")]
    pub(crate) fn extend(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = self.spare();
            let n = room.len().min(bytes.len());
            room[..n].copy_from_slice(&bytes[..n]);
            self.filled(n);
            bytes = &bytes[n..];
        }
    }

    fn unparsed(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Awaiting {
    Write,
    Read { local: usize, len: usize },
    Cas { local: usize },
}

/// What the local side knows to apply incoming frames.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Local<'a> {
    pub layout: &'a RegionLayout,
    pub region: &'a Region,
    /// The peer holding the log write grant.
    pub writer: Option<NodeId>,
}

/// The protocol state of one connection.
#[derive(Debug)]
pub(crate) struct Link {
    /// Bytes received and not yet processed.
    pub rbuf: RecvBuf,
    /// Frames to send; `out[sent..]` is still unsent.
    pub out: Vec<u8>,
    pub sent: usize,
    /// Posted operations awaiting their DONE, oldest first, with when they
    /// were posted.
    pending: VecDeque<(OpId, Awaiting, Instant)>,
}

/// The per-operation deadline: an operation whose DONE has not come
/// `timeout` after it was posted ends its connection (a peer stopped, or
/// gone without a FIN or RST, would otherwise pin the leader's ring until
/// the kernel gives up, minutes later). Judged only by a poll that follows
/// the previous one closely: a transport that did not run for half the
/// timeout (its engine descheduled) has not read the answers that arrived
/// meanwhile, and blames nobody until it has.
#[derive(Debug)]
pub(crate) struct OpDeadline {
    timeout: Duration,
    last_poll: Instant,
}

impl OpDeadline {
    pub(crate) fn new(timeout: Duration) -> OpDeadline {
        assert!(!timeout.is_zero(), "an operation deadline of zero");
        OpDeadline {
            timeout,
            last_poll: Instant::now(),
        }
    }

    /// Called once per poll, after reading: the links with an overdue
    /// operation, if this poll may judge.
    pub(crate) fn judges(&mut self, now: Instant) -> bool {
        let gap = now.saturating_duration_since(self.last_poll);
        self.last_poll = now;
        gap < self.timeout / 2
    }

    /// Whether `link`'s oldest pending operation is overdue at `now`.
    pub(crate) fn overdue(&self, link: &Link, now: Instant) -> bool {
        link.pending
            .front()
            .is_some_and(|&(_, _, posted)| now.saturating_duration_since(posted) > self.timeout)
    }
}

impl Link {
    pub(crate) fn new() -> Link {
        Link {
            rbuf: RecvBuf::new(),
            out: Vec::with_capacity(256 << 10),
            sent: 0,
            pending: VecDeque::new(),
        }
    }

    /// Bytes waiting to be sent.
    pub(crate) fn unsent(&self) -> &[u8] {
        &self.out[self.sent..]
    }

    /// `n` more bytes went out.
    pub(crate) fn mark_sent(&mut self, n: usize) {
        self.sent += n;
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        }
    }

    /// Frames `op` (reading a write's source bytes from `region` now).
    pub(crate) fn encode(&mut self, region: &Region, op: RemoteOp) -> Result<(), TransportError> {
        match op {
            RemoteOp::Write {
                op,
                local_offset,
                len,
                remote_offset,
                ..
            } => {
                if !region.contains(local_offset, len) {
                    return Err(TransportError::LocalRange {
                        offset: local_offset,
                        len,
                    });
                }
                let range = wire::encode_write(&mut self.out, op, remote_offset as u64, len);
                region.read(local_offset, &mut self.out[range]);
                self.pending
                    .push_back((op, Awaiting::Write, Instant::now()));
            }
            RemoteOp::Read {
                op,
                remote_offset,
                len,
                local_offset,
                ..
            } => {
                if !region.contains(local_offset, len) {
                    return Err(TransportError::LocalRange {
                        offset: local_offset,
                        len,
                    });
                }
                let count = u32::try_from(len).map_err(|_| TransportError::LocalRange {
                    offset: local_offset,
                    len,
                })?;
                wire::encode_read(&mut self.out, op, remote_offset as u64, count);
                self.pending.push_back((
                    op,
                    Awaiting::Read {
                        local: local_offset,
                        len,
                    },
                    Instant::now(),
                ));
            }
            RemoteOp::CompareAndSwap {
                op,
                remote_offset,
                expected,
                new,
                local_offset,
                ..
            } => {
                if !region.contains(local_offset, 8) {
                    return Err(TransportError::LocalRange {
                        offset: local_offset,
                        len: 8,
                    });
                }
                wire::encode_cas(&mut self.out, op, remote_offset as u64, expected, new);
                self.pending.push_back((
                    op,
                    Awaiting::Cas {
                        local: local_offset,
                    },
                    Instant::now(),
                ));
            }
        }
        Ok(())
    }

    /// Acts on every complete frame received from `peer`: applies its
    /// operations to the local region and answers them, and turns its
    /// answers into completions. An error is a protocol violation.
    pub(crate) fn process(
        &mut self,
        peer: NodeId,
        local: Local<'_>,
        events: &mut VecDeque<TransportEvent>,
    ) -> Result<(), String> {
        let Local {
            layout,
            region,
            writer,
        } = local;
        while let Some((frame, used)) =
            wire::decode(self.rbuf.unparsed()).map_err(|e| e.to_string())?
        {
            match frame {
                Frame::Write { op, remote, data } => {
                    let status = match usize::try_from(remote)
                        .map(|r| layout.remote_write_access(peer, r, data.len()))
                        .unwrap_or(RemoteAccess::Denied)
                    {
                        RemoteAccess::Slot(_) => Ok(()),
                        RemoteAccess::Ring if writer == Some(peer) => Ok(()),
                        _ => Err(OpError::AccessDenied),
                    };
                    if status.is_ok() {
                        region.write(remote as usize, data);
                    } else {
                        debug!(%peer, remote, len = data.len(), "write refused");
                    }
                    wire::encode_done(&mut self.out, op, status, 0);
                }
                Frame::Read { op, remote, count } => {
                    let count = count as usize;
                    let ok =
                        usize::try_from(remote).is_ok_and(|r| layout.remote_read_allowed(r, count));
                    if ok {
                        let range = wire::encode_done(&mut self.out, op, Ok(()), count);
                        region.read(remote as usize, &mut self.out[range]);
                    } else {
                        wire::encode_done(&mut self.out, op, Err(OpError::AccessDenied), 0);
                    }
                }
                Frame::Cas {
                    op,
                    remote,
                    expected,
                    new,
                } => {
                    let ok = usize::try_from(remote).is_ok_and(|r| {
                        r % 8 == 0
                            && matches!(
                                layout.remote_write_access(peer, r, 8),
                                RemoteAccess::Slot(_)
                            )
                    });
                    if ok {
                        let old = region.compare_and_swap(remote as usize, expected, new);
                        let range = wire::encode_done(&mut self.out, op, Ok(()), 8);
                        self.out[range].copy_from_slice(&old.to_le_bytes());
                    } else {
                        wire::encode_done(&mut self.out, op, Err(OpError::AccessDenied), 0);
                    }
                }
                Frame::Done { op, status, data } => {
                    let Some((want, awaiting, _)) = self.pending.pop_front() else {
                        return Err(format!("completion of {op:?}, which is not pending"));
                    };
                    if want != op {
                        return Err(format!("completion of {op:?} where {want:?} was next"));
                    }
                    if status.is_ok() {
                        match awaiting {
                            Awaiting::Write if data.is_empty() => {}
                            Awaiting::Read { local, len } if data.len() == len => {
                                region.write(local, data)
                            }
                            Awaiting::Cas { local } if data.len() == 8 => region.write(local, data),
                            _ => {
                                return Err(format!(
                                    "completion of {op:?} with {} bytes",
                                    data.len()
                                ));
                            }
                        }
                    }
                    events.push_back(TransportEvent::Completed(Completion {
                        op,
                        peer,
                        result: status,
                    }));
                }
            }
            self.rbuf.consume(used);
        }
        Ok(())
    }

    /// The connection is gone: every operation still pending fails.
    pub(crate) fn fail_pending(&mut self, peer: NodeId, events: &mut VecDeque<TransportEvent>) {
        for (op, _, _) in self.pending.drain(..) {
            events.push_back(TransportEvent::Completed(Completion {
                op,
                peer,
                result: Err(OpError::PeerUnreachable),
            }));
        }
    }
}
