//! A frame payload that carries its checksums, so they are computed once however many
//! frames (replicas) carry it, and reused by a store as its block tags.

use bytes::Bytes;
use proto::sums::{block_crcs, concat_crc};
use std::sync::Arc;

/// Bytes to send or received, with their crc32c and, for a whole number of 4 KiB
/// blocks, each block's crc32c once computed.
#[derive(Clone, Debug, Default)]
pub struct Payload {
    data: Bytes,
    crc: Option<u32>,
    blocks: Option<Arc<[u32]>>,
}

impl Payload {
    /// Checksums `data` now (one pass): per block when it is whole blocks, else whole.
    pub fn summed(data: Bytes) -> Payload {
        match block_crcs(&data) {
            Some(blocks) => Payload::with_sums(data, blocks),
            None => Payload {
                crc: Some(crc32c::crc32c(&data)),
                blocks: None,
                data,
            },
        }
    }

    /// A payload whose block crcs were just computed from it (`blocks[i]` is the
    /// crc32c of block `i`, as `block_crcs` gives them).
    pub(crate) fn with_sums(data: Bytes, blocks: Vec<u32>) -> Payload {
        Payload {
            crc: Some(concat_crc(&blocks)),
            blocks: Some(blocks.into()),
            data,
        }
    }

    pub fn into_data(self) -> Bytes {
        self.data
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The crc32c of the whole payload (computed now if it was not).
    pub fn crc(&self) -> u32 {
        self.crc.unwrap_or_else(|| crc32c::crc32c(&self.data))
    }

    /// The crc32c of each 4 KiB block, when known.
    pub fn block_crcs(&self) -> Option<&[u32]> {
        self.blocks.as_deref()
    }
}

impl From<Bytes> for Payload {
    fn from(data: Bytes) -> Payload {
        Payload {
            data,
            crc: None,
            blocks: None,
        }
    }
}

impl From<Vec<u8>> for Payload {
    fn from(data: Vec<u8>) -> Payload {
        Payload::from(Bytes::from(data))
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summed_payloads_agree_with_a_plain_crc() {
        for len in [0usize, 1, 4095, 4096, 3 * 4096, 3 * 4096 + 7] {
            let data: Bytes = (0..len)
                .map(|i| (i * 7 + 3) as u8)
                .collect::<Vec<_>>()
                .into();
            let p = Payload::summed(data.clone());
            assert_eq!(p.crc(), crc32c::crc32c(&data), "len {len}");
            assert_eq!(Payload::from(data.clone()).crc(), p.crc());
            match p.block_crcs() {
                Some(b) => {
                    assert!(len > 0 && len % 4096 == 0);
                    assert_eq!(b.len(), len / 4096);
                }
                None => assert!(len == 0 || len % 4096 != 0),
            }
        }
    }
}
