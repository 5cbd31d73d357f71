//! The stable hash that positions objects and virtual nodes on the ring.
//!
//! Definition (this is a compatibility contract; changing it moves every object):
//! `hash64(bytes) = mix64(fnv1a64(bytes))`, where `fnv1a64` is 64-bit FNV-1a (offset
//! basis `0xcbf29ce484222325`, prime `0x100000001b3`) and `mix64` is the splitmix64
//! finalizer. FNV-1a alone mixes its last bytes poorly into the high bits; the
//! finalizer gives full avalanche, so neighbouring oids land far apart on the ring.
//!
//! - an object sits at `hash64(oid as 8 little-endian bytes)`;
//! - virtual node `i` of a node sits at `hash64(uuid's 16 bytes in RFC 4122 order ++
//!   i as 4 little-endian bytes)`.

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a over `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(FNV_OFFSET_BASIS, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

/// The splitmix64 finalizer: a bijection on `u64` with full avalanche.
pub fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The ring hash of arbitrary bytes: `mix64(fnv1a64(bytes))`.
pub fn hash64(bytes: &[u8]) -> u64 {
    mix64(fnv1a64(bytes))
}

/// Ring position of an object.
pub fn oid_point(oid: u64) -> u64 {
    hash64(&oid.to_le_bytes())
}

/// Ring position of virtual node `vnode` of the node with identity `uuid`.
pub fn vnode_point(uuid: &uuid::Uuid, vnode: u32) -> u64 {
    let mut bytes = [0u8; 20];
    bytes[..16].copy_from_slice(uuid.as_bytes());
    bytes[16..].copy_from_slice(&vnode.to_le_bytes());
    hash64(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Published FNV-1a 64 test vectors: guards the basis and prime.
    #[test]
    fn fnv1a64_matches_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    // Reference splitmix64 outputs (seed 0 stream: mix64(k * golden gamma)).
    #[test]
    fn mix64_matches_splitmix64_reference() {
        const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
        assert_eq!(mix64(GOLDEN_GAMMA), 0xe220_a839_7b1d_cdaf);
        assert_eq!(mix64(GOLDEN_GAMMA.wrapping_mul(2)), 0x6e78_9e6a_a1b9_65f4);
    }

    // Pins the placement hash itself: if this fails, every object in every existing
    // cluster would move. Do not update the values; fix the hash.
    #[test]
    fn placement_hash_golden_values_never_change() {
        let uuid = uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        assert_eq!(oid_point(0), GOLDEN_OID_0);
        assert_eq!(oid_point(0x0000_0001_0000_0002), GOLDEN_OID_VID1_IDX2);
        assert_eq!(vnode_point(&uuid, 0), GOLDEN_VNODE_0);
        assert_eq!(vnode_point(&uuid, 127), GOLDEN_VNODE_127);
    }

    // Computed independently (Python) from the definition in the module docs.
    const GOLDEN_OID_0: u64 = 0x813f_0174_a236_7c13;
    const GOLDEN_OID_VID1_IDX2: u64 = 0x4512_2ced_64a0_ebab;
    const GOLDEN_VNODE_0: u64 = 0x6f83_27ca_c458_98c2;
    const GOLDEN_VNODE_127: u64 = 0xb188_2416_0a03_9898;
}
