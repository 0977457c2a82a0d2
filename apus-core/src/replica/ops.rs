//! Operation ids: what each posted remote operation was for.
//!
//! An [`OpId`] packs a sequence number, a purpose and the peer, so a
//! completion is routed without a lookup table (and without allocation).

use crate::layout::SlotKind;
use crate::transport::OpId;
use crate::types::NodeId;

/// Why an operation was posted.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Purpose {
    /// A control record written from a staging slot.
    Record(SlotKind),
    /// Entries written straight from the leader's own ring.
    Stream,
    /// Re-encoded entries written from the catch-up scratch chunk.
    Catchup,
    /// A read of the peer's status record.
    StatusRead,
}

impl Purpose {
    fn code(self) -> u64 {
        match self {
            Purpose::Record(k) => k as u64,
            Purpose::Stream => 4,
            Purpose::Catchup => 5,
            Purpose::StatusRead => 6,
        }
    }

    fn from_code(c: u64) -> Option<Purpose> {
        Some(match c {
            0 => Purpose::Record(SlotKind::Leader),
            1 => Purpose::Record(SlotKind::Ack),
            2 => Purpose::Record(SlotKind::VoteRequest),
            3 => Purpose::Record(SlotKind::VoteResponse),
            4 => Purpose::Stream,
            5 => Purpose::Catchup,
            6 => Purpose::StatusRead,
            _ => return None,
        })
    }
}

pub(crate) fn make(seq: u64, purpose: Purpose, peer: NodeId) -> OpId {
    OpId(seq << 16 | purpose.code() << 8 | u64::from(peer.0))
}

/// Splits an id into purpose and peer; `None` for ids this engine never made.
pub(crate) fn split(op: OpId) -> Option<(Purpose, NodeId)> {
    let purpose = Purpose::from_code((op.0 >> 8) & 0xff)?;
    Some((purpose, NodeId((op.0 & 0xff) as u8)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for p in [
            Purpose::Record(SlotKind::Ack),
            Purpose::Stream,
            Purpose::Catchup,
            Purpose::StatusRead,
        ] {
            let id = make(12345, p, NodeId(7));
            assert_eq!(split(id), Some((p, NodeId(7))));
        }
        assert_eq!(split(OpId(0xff00)), None);
    }
}
