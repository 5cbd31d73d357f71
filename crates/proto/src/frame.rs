//! The peer frame header: a fixed 80-byte little-endian header followed by a payload.
//!
//! Every frame (request or reply) has the same header. The header carries its own
//! crc32c, and the payload's crc32c, so a corrupted frame is refused instead of applied.
//! Sizes are bounded: a payload longer than [`PAYLOAD_MAX`] is a protocol error.

use crate::error::FrameError;
use crate::opcode::Opcode;

/// "SHPD" in little-endian.
pub const MAGIC: u32 = 0x4450_4853;
/// Version of the frame format and opcode set. Bumped on incompatible changes.
pub const PROTO_VERSION: u16 = 1;
/// Encoded size of a [`Header`].
pub const HEADER_LEN: usize = 80;
/// Largest payload a frame may carry: a whole inode object plus slack for metadata.
pub const PAYLOAD_MAX: u32 = 8 << 20;

/// Frame flag: this frame is a reply.
pub const FLAG_REPLY: u32 = 1 << 0;
/// Request flag: make this write durable on the replica before replying.
pub const FLAG_DURABLE: u32 = 1 << 1;
/// Request flag: a recovery read; never triggers recovery in turn.
pub const FLAG_RECOVERY: u32 = 1 << 2;
/// Flags this version understands; others are refused.
pub const FLAGS_KNOWN: u32 = FLAG_REPLY | FLAG_DURABLE | FLAG_RECOVERY;

/// The fixed part of every frame. Field meaning depends on the opcode; unused fields are 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Header {
    pub opcode: u16,
    pub flags: u32,
    /// The sender's epoch (0 from clients that are not cluster members, such as dog).
    pub epoch: u32,
    /// Replies: 0 on success, else an [`crate::ErrorCode`].
    pub status: u32,
    /// Chosen by the requester; the reply carries the same id.
    pub request_id: u64,
    pub oid: u64,
    pub offset: u64,
    /// Length of the operation (for example bytes to read); not the payload length.
    pub length: u32,
    pub payload_len: u32,
    /// Write generation (requests) or the replica's version stamp generation (replies).
    pub generation: u64,
    /// The VDI lock's fencing generation carried by writes; 0 when none.
    pub fence: u64,
    pub payload_crc: u32,
}

impl Header {
    /// A request header for `opcode` with everything else zero.
    pub fn request(opcode: Opcode, request_id: u64, epoch: u32) -> Header {
        Header {
            opcode: opcode as u16,
            epoch,
            request_id,
            ..Header::default()
        }
    }

    /// The reply header for this request, with the given status.
    pub fn reply(&self, status: u32) -> Header {
        Header {
            opcode: self.opcode,
            flags: FLAG_REPLY,
            status,
            request_id: self.request_id,
            oid: self.oid,
            offset: self.offset,
            length: self.length,
            ..Header::default()
        }
    }

    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_REPLY != 0
    }

    pub fn has_flag(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }

    /// Sets `payload_len` and `payload_crc` for `payload`.
    pub fn seal(&mut self, payload: &[u8]) {
        self.payload_len = payload.len() as u32;
        self.payload_crc = crc32c::crc32c(payload);
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&PROTO_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&self.opcode.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.epoch.to_le_bytes());
        b[16..20].copy_from_slice(&self.status.to_le_bytes());
        b[20..28].copy_from_slice(&self.request_id.to_le_bytes());
        b[28..36].copy_from_slice(&self.oid.to_le_bytes());
        b[36..44].copy_from_slice(&self.offset.to_le_bytes());
        b[44..48].copy_from_slice(&self.length.to_le_bytes());
        b[48..52].copy_from_slice(&self.payload_len.to_le_bytes());
        b[52..60].copy_from_slice(&self.generation.to_le_bytes());
        b[60..68].copy_from_slice(&self.fence.to_le_bytes());
        b[68..72].copy_from_slice(&self.payload_crc.to_le_bytes());
        // 72..76 reserved, zero.
        let crc = crc32c::crc32c(&b[0..76]);
        b[76..80].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and validates a header: magic, version, header checksum, known flags and
    /// the payload bound. The opcode is checked by the receiver, which must still answer
    /// an unknown opcode with an error reply.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, FrameError> {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let crc = crc32c::crc32c(&b[0..76]);
        if crc != u32_at(76) {
            return Err(FrameError::HeaderChecksum);
        }
        let version = u16_at(4);
        if version != PROTO_VERSION {
            return Err(FrameError::Version(version));
        }
        let h = Header {
            opcode: u16_at(6),
            flags: u32_at(8),
            epoch: u32_at(12),
            status: u32_at(16),
            request_id: u64_at(20),
            oid: u64_at(28),
            offset: u64_at(36),
            length: u32_at(44),
            payload_len: u32_at(48),
            generation: u64_at(52),
            fence: u64_at(60),
            payload_crc: u32_at(68),
        };
        if h.flags & !FLAGS_KNOWN != 0 {
            return Err(FrameError::UnknownFlags(h.flags));
        }
        if h.payload_len > PAYLOAD_MAX {
            return Err(FrameError::PayloadTooLarge(h.payload_len));
        }
        Ok(h)
    }

    /// Checks a received payload against the header's checksum.
    pub fn check_payload(&self, payload: &[u8]) -> Result<(), FrameError> {
        if payload.len() != self.payload_len as usize {
            return Err(FrameError::PayloadLength {
                expected: self.payload_len,
                got: payload.len(),
            });
        }
        if crc32c::crc32c(payload) != self.payload_crc {
            return Err(FrameError::PayloadChecksum);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_header() -> impl Strategy<Value = Header> {
        (
            any::<u16>(),
            0..=FLAGS_KNOWN,
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            0..=PAYLOAD_MAX,
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
        )
            .prop_map(|t| Header {
                opcode: t.0,
                flags: t.1,
                epoch: t.2,
                status: t.3,
                request_id: t.4,
                oid: t.5,
                offset: t.6,
                length: t.7,
                payload_len: t.8,
                generation: t.9,
                fence: t.10,
                payload_crc: t.11,
            })
    }

    proptest! {
        #[test]
        fn header_round_trips(h in any_header()) {
            prop_assert_eq!(Header::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), HEADER_LEN)) {
            let mut b = [0u8; HEADER_LEN];
            b.copy_from_slice(&bytes);
            let _ = Header::decode(&b);
        }

        #[test]
        fn any_single_bit_flip_is_detected(h in any_header(), bit in 0usize..HEADER_LEN * 8) {
            let mut b = h.encode();
            b[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(Header::decode(&b).is_err());
        }

        #[test]
        fn payload_checksum_catches_corruption(data in proptest::collection::vec(any::<u8>(), 1..512), i in any::<prop::sample::Index>()) {
            let mut h = Header::default();
            h.seal(&data);
            prop_assert!(h.check_payload(&data).is_ok());
            let mut bad = data.clone();
            let at = i.index(bad.len());
            bad[at] ^= 0x40;
            prop_assert_eq!(h.check_payload(&bad), Err(FrameError::PayloadChecksum));
        }
    }

    #[test]
    fn oversized_payload_is_refused() {
        let h = Header {
            payload_len: PAYLOAD_MAX + 1,
            ..Header::default()
        };
        assert_eq!(
            Header::decode(&h.encode()),
            Err(FrameError::PayloadTooLarge(PAYLOAD_MAX + 1))
        );
    }
}
