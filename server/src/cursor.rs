//! Cursors: opaque positions in an org's event log, encoding (log epoch, seq).
//!
//! The epoch identifies one incarnation of one org's log (it is derived from the database's random
//! epoch and the org id), so a cursor from another database or another org can never be mistaken for
//! a position in this log: it gets `resync` instead of a silent skip.
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub epoch: u64,
    pub seq: u64,
}

impl Cursor {
    pub fn encode(&self) -> String {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.epoch.to_be_bytes());
        b[8..].copy_from_slice(&self.seq.to_be_bytes());
        URL_SAFE_NO_PAD.encode(b)
    }

    /// `None` for anything that is not a cursor this server made.
    pub fn decode(s: &str) -> Option<Cursor> {
        let b = URL_SAFE_NO_PAD.decode(s).ok()?;
        let b: [u8; 16] = b.try_into().ok()?;
        Some(Cursor {
            epoch: u64::from_be_bytes(b[..8].try_into().ok()?),
            seq: u64::from_be_bytes(b[8..].try_into().ok()?),
        })
    }
}

/// The epoch of `org`'s log in a database whose own epoch is `db_epoch` (FNV-1a, stable forever).
pub fn org_epoch(db_epoch: u64, org: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in db_epoch.to_be_bytes().iter().chain(org.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects_garbage() {
        let c = Cursor { epoch: 42, seq: 7 };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("not a cursor"), None);
        assert_eq!(Cursor::decode(""), None);
        assert_ne!(org_epoch(1, "a"), org_epoch(1, "b"));
        assert_ne!(org_epoch(1, "a"), org_epoch(2, "a"));
    }
}
