//! The object file format, without I/O: where the header, crc table and data live, how
//! the header is encoded, and how a block's crc is stored (see the crate doc).

use crate::Stamp;
use std::sync::OnceLock;

/// The unit of checksumming: every 4 KiB block of an object has its own crc32c.
pub const BLOCK_SIZE: u64 = 4096;

/// Bytes reserved for the header at the start of an object file (one block, so the crc
/// table and the data start block-aligned).
pub(crate) const HEADER_SIZE: u64 = BLOCK_SIZE;

/// Bytes of the header block actually used; the rest is zero.
pub(crate) const HEADER_USED: usize = 52;

/// Bytes of one crc table entry.
pub(crate) const TAG_SIZE: u64 = 4;

const MAGIC: [u8; 8] = *b"SDOGOBJ\0";
const FORMAT_VERSION: u32 = 1;
const HEADER_CRC_AT: usize = 48;

/// Where things are in the file of an object of a given capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Bytes the object can hold.
    pub capacity: u64,
    /// Number of 4 KiB data blocks (capacity rounded up).
    pub blocks: u64,
}

impl Layout {
    pub fn new(capacity: u64) -> Layout {
        Layout {
            capacity,
            blocks: capacity.div_ceil(BLOCK_SIZE),
        }
    }

    /// File offset of crc table entry `block`.
    pub fn tag_offset(&self, block: u64) -> u64 {
        debug_assert!(block < self.blocks);
        HEADER_SIZE + block * TAG_SIZE
    }

    /// Length of the crc table, padded to whole blocks.
    pub fn table_len(&self) -> u64 {
        (self.blocks * TAG_SIZE).next_multiple_of(BLOCK_SIZE)
    }

    /// File offset of the first data byte.
    pub fn data_offset(&self) -> u64 {
        HEADER_SIZE + self.table_len()
    }

    /// File offset of object byte `offset`.
    pub fn data_at(&self, offset: u64) -> u64 {
        self.data_offset() + offset
    }

    /// The exact length of a well-formed object file.
    pub fn file_len(&self) -> u64 {
        self.data_offset() + self.blocks * BLOCK_SIZE
    }
}

/// The header of an object file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub oid_raw: u64,
    pub capacity: u64,
    pub stamp: Stamp,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_USED] {
        let mut out = [0u8; HEADER_USED];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        out[16..24].copy_from_slice(&self.oid_raw.to_le_bytes());
        out[24..32].copy_from_slice(&self.capacity.to_le_bytes());
        out[32..36].copy_from_slice(&self.stamp.epoch.to_le_bytes());
        out[40..48].copy_from_slice(&self.stamp.generation.to_le_bytes());
        let crc = crc32c::crc32c(&out[..HEADER_CRC_AT]);
        out[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and checks a header; the error is the reason it is not valid.
    pub fn decode(bytes: &[u8; HEADER_USED]) -> Result<Header, String> {
        if bytes[0..8] != MAGIC {
            return Err(format!("bad magic {:02x?}", &bytes[0..8]));
        }
        let version = u32_at(bytes, 8);
        if version != FORMAT_VERSION {
            return Err(format!("unsupported format version {version}"));
        }
        let stored_crc = u32_at(bytes, HEADER_CRC_AT);
        let crc = crc32c::crc32c(&bytes[..HEADER_CRC_AT]);
        if stored_crc != crc {
            return Err(format!(
                "header crc {stored_crc:#010x}, computed {crc:#010x}"
            ));
        }
        let block_size = u32_at(bytes, 12);
        if u64::from(block_size) != BLOCK_SIZE {
            return Err(format!("block size {block_size}, expected {BLOCK_SIZE}"));
        }
        Ok(Header {
            oid_raw: u64_at(bytes, 16),
            capacity: u64_at(bytes, 24),
            stamp: Stamp {
                epoch: u32_at(bytes, 32),
                generation: u64_at(bytes, 40),
            },
        })
    }
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(raw)
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(raw)
}

fn zero_block_crc() -> u32 {
    static CRC: OnceLock<u32> = OnceLock::new();
    *CRC.get_or_init(|| crc32c::crc32c(&[0u8; BLOCK_SIZE as usize]))
}

/// The crc table entry of a block: its crc32c XOR the crc32c of a zero block, so that
/// the entry of an all-zero block is 0 and a hole in the table needs no initialisation.
pub(crate) fn block_tag(block: &[u8]) -> u32 {
    debug_assert_eq!(block.len() as u64, BLOCK_SIZE);
    tag_of_crc(crc32c::crc32c(block))
}

/// The crc table entry of a block whose crc32c is `crc`.
pub(crate) fn tag_of_crc(crc: u32) -> u32 {
    crc ^ zero_block_crc()
}

/// Data to write, with the crc32c of each of its 4 KiB blocks when the caller already
/// has them (a replica that checked a frame through them, a gateway that sealed its
/// frames with them): they become the blocks' tags without another pass over the data.
#[derive(Clone, Copy, Debug)]
pub struct Summed<'a> {
    pub data: &'a [u8],
    /// `block_crcs[i]` is the crc32c of `data[i * 4096..(i + 1) * 4096]`.
    pub block_crcs: Option<&'a [u32]>,
}

impl<'a> Summed<'a> {
    /// The tags of `data` written at object offset `offset` when the known crcs line up
    /// with the object's blocks (offset aligned, whole blocks); `None` otherwise.
    pub(crate) fn tags_at(&self, offset: u64) -> Option<Vec<u32>> {
        let crcs = self.block_crcs?;
        if offset % BLOCK_SIZE != 0 || crcs.len() as u64 * BLOCK_SIZE != self.data.len() as u64 {
            return None;
        }
        debug_assert!(self
            .data
            .chunks_exact(BLOCK_SIZE as usize)
            .zip(crcs)
            .all(|(b, c)| crc32c::crc32c(b) == *c));
        Some(crcs.iter().map(|&c| tag_of_crc(c)).collect())
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> From<&'a T> for Summed<'a> {
    fn from(data: &'a T) -> Summed<'a> {
        Summed {
            data: data.as_ref(),
            block_crcs: None,
        }
    }
}

/// Encodes crc table entries for one `pwrite`.
pub(crate) fn encode_tags(tags: &[u32]) -> Vec<u8> {
    tags.iter().flat_map(|tag| tag.to_le_bytes()).collect()
}

/// Decodes crc table entries read with one `pread`.
pub(crate) fn decode_tags(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(TAG_SIZE as usize)
        .map(|raw| u32_at(raw, 0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layouts_of_data_and_inode_objects() {
        let data = Layout::new(4 << 20);
        assert_eq!((data.blocks, data.data_offset()), (1024, 8192));
        assert_eq!(data.file_len(), 8192 + (4 << 20));
        let inode = Layout::new(proto::oid::INODE_OBJECT_SIZE);
        assert_eq!((inode.blocks, inode.data_offset()), (1025, 12288));
        let tiny = Layout::new(100);
        assert_eq!(
            (tiny.blocks, tiny.data_offset(), tiny.file_len()),
            (1, 8192, 12288)
        );
    }

    #[test]
    fn zero_block_has_zero_tag() {
        assert_eq!(block_tag(&[0u8; 4096]), 0);
        let mut block = [0u8; 4096];
        block[4095] = 1;
        assert_ne!(block_tag(&block), 0);
    }

    #[test]
    fn corrupt_headers_are_rejected() {
        let header = Header {
            oid_raw: 7,
            capacity: 4096,
            stamp: Stamp::new(1, 2),
        };
        let good = header.encode();
        assert_eq!(Header::decode(&good), Ok(header));
        for at in [0, 9, 13, 20, 33, 41, 49] {
            let mut bad = good;
            bad[at] ^= 0x10;
            assert!(Header::decode(&bad).is_err(), "flip at {at} accepted");
        }
        assert!(Header::decode(&[0u8; HEADER_USED]).is_err());
    }

    proptest! {
        #[test]
        fn header_round_trips(oid in any::<u64>(), cap in any::<u64>(), e in any::<u32>(), g in any::<u64>()) {
            let header = Header { oid_raw: oid, capacity: cap, stamp: Stamp::new(e, g) };
            prop_assert_eq!(Header::decode(&header.encode()), Ok(header));
        }

        #[test]
        fn tags_round_trip(tags in proptest::collection::vec(any::<u32>(), 0..64)) {
            prop_assert_eq!(decode_tags(&encode_tags(&tags)), tags);
        }
    }
}
