//! Per-block checksums of a payload, computed in one pass and shared.
//!
//! A store keeps a crc32c per 4 KiB block of every object, and a frame carries the
//! crc32c of its whole payload. For a payload of whole blocks both come from the same
//! pass: the crc of each block, then the payload's crc derived from those (the crc of
//! a concatenation follows from the crcs of its parts and the length of the second
//! part). So a gateway checksums a write once for every replica's frame and its own
//! store, and a replica checks a frame and gets its block tags from the same pass.

use std::sync::OnceLock;

/// Bytes per checksummed block (the store's block; writes of whole blocks skip the
/// read-modify-write of edge blocks, so this is also the unit writes are aligned to).
pub const SUM_BLOCK: usize = 4096;

/// The crc32c of every `SUM_BLOCK` of `data`, or `None` when `data` is empty or not a
/// whole number of blocks.
pub fn block_crcs(data: &[u8]) -> Option<Vec<u32>> {
    if data.is_empty() || !data.len().is_multiple_of(SUM_BLOCK) {
        return None;
    }
    Some(data.chunks_exact(SUM_BLOCK).map(crc32c::crc32c).collect())
}

/// The crc32c of the concatenation of blocks of `SUM_BLOCK` bytes whose crcs are
/// `crcs` (0, the crc32c of nothing, for none).
pub fn concat_crc(crcs: &[u32]) -> u32 {
    let Some((&first, rest)) = crcs.split_first() else {
        return 0;
    };
    let shift = shift_tables();
    rest.iter().fold(first, |acc, &c| shift.apply(acc) ^ c)
}

/// The linear map that appends `SUM_BLOCK` zero bytes to a crc32c register, as four
/// byte-indexed tables: crc(A ‖ B) = shift(crc(A)) ^ crc(B) for |B| = `SUM_BLOCK`.
struct Shift([[u32; 256]; 4]);

impl Shift {
    fn apply(&self, crc: u32) -> u32 {
        let b = crc.to_le_bytes();
        self.0[0][b[0] as usize]
            ^ self.0[1][b[1] as usize]
            ^ self.0[2][b[2] as usize]
            ^ self.0[3][b[3] as usize]
    }
}

fn shift_tables() -> &'static Shift {
    static TABLES: OnceLock<Shift> = OnceLock::new();
    TABLES.get_or_init(|| {
        // The map is linear: build it from the image of each of the 32 basis bits
        // (crc32c_combine with an empty second part applies just the shift).
        let basis: Vec<u32> = (0..32)
            .map(|bit| crc32c::crc32c_combine(1 << bit, 0, SUM_BLOCK))
            .collect();
        let mut t = [[0u32; 256]; 4];
        for (byte, table) in t.iter_mut().enumerate() {
            for (v, slot) in table.iter_mut().enumerate() {
                *slot = (0..8)
                    .filter(|i| v & (1 << i) != 0)
                    .fold(0, |acc, i| acc ^ basis[byte * 8 + i]);
            }
        }
        Shift(t)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn partial_or_empty_payloads_have_no_block_crcs() {
        assert_eq!(block_crcs(&[]), None);
        assert_eq!(block_crcs(&[1u8; SUM_BLOCK - 1]), None);
        assert_eq!(block_crcs(&[1u8; SUM_BLOCK + 512]), None);
        assert_eq!(concat_crc(&[]), crc32c::crc32c(&[]));
    }

    proptest! {
        #[test]
        fn concatenated_crc_equals_the_crc_of_the_whole(
            blocks in 1usize..6,
            seed in any::<u64>(),
        ) {
            let mut x = seed | 1;
            let data: Vec<u8> = (0..blocks * SUM_BLOCK)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let crcs = block_crcs(&data).expect("whole blocks");
            prop_assert_eq!(crcs.len(), blocks);
            for (c, b) in crcs.iter().zip(data.chunks(SUM_BLOCK)) {
                prop_assert_eq!(*c, crc32c::crc32c(b));
            }
            prop_assert_eq!(concat_crc(&crcs), crc32c::crc32c(&data));
        }
    }
}
