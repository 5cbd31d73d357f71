//! Per-object block state of the cache: which 4 KiB blocks hold valid data, which are
//! dirty (not yet durable on the replicas), and which dirty blocks are zeros (TRIM or
//! WRITE_ZEROES, pushed as a punch). No I/O; persisted by `meta.rs`.

/// Granularity of cache state.
pub const CACHE_BLOCK: u64 = 4096;

/// A fixed-size bit set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    bits: usize,
}

impl Bitmap {
    pub fn new(bits: usize) -> Bitmap {
        Bitmap {
            words: vec![0; bits.div_ceil(64)],
            bits,
        }
    }

    pub fn len(&self) -> usize {
        self.bits
    }

    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    pub fn get(&self, i: usize) -> bool {
        i < self.bits && self.words[i / 64] & (1 << (i % 64)) != 0
    }

    pub fn set(&mut self, i: usize, v: bool) {
        if i >= self.bits {
            return;
        }
        if v {
            self.words[i / 64] |= 1 << (i % 64);
        } else {
            self.words[i / 64] &= !(1 << (i % 64));
        }
    }

    pub fn set_range(&mut self, start: usize, end: usize, v: bool) {
        for i in start..end.min(self.bits) {
            self.set(i, v);
        }
    }

    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn any(&self) -> bool {
        self.words.iter().any(|w| *w != 0)
    }

    pub fn all_in(&self, start: usize, end: usize) -> bool {
        (start..end.min(self.bits)).all(|i| self.get(i))
    }

    /// Little-endian bytes, `bits / 8` rounded up.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate(self.bits.div_ceil(8));
        out
    }

    pub fn from_bytes(bits: usize, b: &[u8]) -> Bitmap {
        let mut m = Bitmap::new(bits);
        for i in 0..bits {
            if b.get(i / 8).is_some_and(|byte| byte & (1 << (i % 8)) != 0) {
                m.set(i, true);
            }
        }
        m
    }
}

/// Maximal runs of set bits: (start, end) block indices, end exclusive.
pub fn runs(m: &Bitmap) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < m.len() {
        if m.get(i) {
            let start = i;
            while i < m.len() && m.get(i) {
                i += 1;
            }
            out.push((start, i));
        } else {
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn bytes_round_trip(bits in 1usize..2048, set in proptest::collection::vec(any::<usize>(), 0..64)) {
            let mut m = Bitmap::new(bits);
            for s in set {
                m.set(s % bits, true);
            }
            prop_assert_eq!(Bitmap::from_bytes(bits, &m.to_bytes()), m);
        }

        #[test]
        fn runs_cover_exactly_the_set_bits(bits in 1usize..512, set in proptest::collection::vec(any::<usize>(), 0..64)) {
            let mut m = Bitmap::new(bits);
            for s in set {
                m.set(s % bits, true);
            }
            let mut rebuilt = Bitmap::new(bits);
            let rs = runs(&m);
            for w in rs.windows(2) {
                prop_assert!(w[0].1 < w[1].0, "runs are maximal and ordered");
            }
            for (a, b) in rs {
                rebuilt.set_range(a, b, true);
            }
            prop_assert_eq!(rebuilt, m);
        }
    }
}
