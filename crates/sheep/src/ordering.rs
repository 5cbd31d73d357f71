//! The ordering primitives of the data path, with no I/O: write generations handed out
//! by a gateway, and the fencing table a replica keeps of VDI lock generations.

use proto::{ErrorCode, PeerError, Vid};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Write generations: unique and strictly increasing on one gateway, and close to
/// wall-clock microseconds so generations from a restarted gateway (or another gateway
/// that takes over a VDI) continue above earlier ones.
#[derive(Default)]
pub struct GenerationClock {
    last: AtomicU64,
}

impl GenerationClock {
    /// The next generation given the current time in microseconds.
    pub fn next_at(&self, now_micros: u64) -> u64 {
        let prev = self
            .last
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |last| {
                Some(now_micros.max(last + 1))
            })
            .unwrap_or(0);
        now_micros.max(prev + 1)
    }

    pub fn next(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        self.next_at(now)
    }
}

/// The highest VDI lock generation a replica has seen in writes, per VDI. A write with
/// an older one comes from a gateway whose lock was taken over, and is refused.
#[derive(Default)]
pub struct FenceTable {
    seen: Mutex<HashMap<Vid, u64>>,
}

impl FenceTable {
    /// Checks (and records) the token of a write. Token 0 means the writer held no lock;
    /// its gateway checked that nobody else does.
    pub fn check(&self, vid: Vid, fence: u64) -> Result<(), PeerError> {
        if fence == 0 {
            return Ok(());
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let highest = seen.entry(vid).or_insert(0);
        if fence < *highest {
            return Err(PeerError::new(
                ErrorCode::Fenced,
                format!("write to vid {vid:#x} carries lock generation {fence}, but generation {highest} has taken over"),
            ));
        }
        *highest = fence;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    proptest! {
        #[test]
        fn generations_strictly_increase_whatever_the_clock_does(times in proptest::collection::vec(0u64..1000, 1..200)) {
            let c = GenerationClock::default();
            let mut last = 0;
            for t in times {
                let g = c.next_at(t);
                prop_assert!(g > last);
                prop_assert!(g >= t);
                last = g;
            }
        }
    }

    #[test]
    fn concurrent_generations_are_unique() {
        let c = Arc::new(GenerationClock::default());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || (0..10_000).map(|_| c.next_at(5)).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
    }

    #[test]
    fn old_lock_generations_are_fenced_off() {
        let f = FenceTable::default();
        assert!(f.check(1, 2).is_ok());
        assert!(f.check(1, 3).is_ok());
        let e = f.check(1, 2).unwrap_err();
        assert_eq!(e.code, ErrorCode::Fenced);
        assert!(f.check(1, 3).is_ok(), "the current holder goes on");
        assert!(
            f.check(1, 0).is_ok(),
            "unlocked writers are checked at their gateway"
        );
        assert!(f.check(2, 1).is_ok(), "other VDIs are independent");
    }
}
