//! A byte-rate limit for recovery, changeable at run time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Paces recovery to at most `rate` bytes per second (0: unlimited).
pub struct Throttle {
    rate: AtomicU64,
    next_free: Mutex<Option<Instant>>,
}

impl Throttle {
    pub fn new(bytes_per_sec: u64) -> Throttle {
        Throttle {
            rate: AtomicU64::new(bytes_per_sec),
            next_free: Mutex::new(None),
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    pub fn set_rate(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::Relaxed);
        *self.next_free.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Waits until `bytes` more may be moved. The first call of a burst goes at once;
    /// each call then reserves `bytes / rate` seconds after the previous reservation.
    pub async fn acquire(&self, bytes: u64) {
        let rate = self.rate();
        if rate == 0 {
            return;
        }
        let wait_until = {
            let mut next = self.next_free.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let start = match *next {
                Some(t) if t > now => t,
                _ => now,
            };
            *next = Some(start + Duration::from_secs_f64(bytes as f64 / rate as f64));
            start
        };
        tokio::time::sleep_until(wait_until).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn paces_to_the_rate() {
        let t = Throttle::new(1 << 20);
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            t.acquire(1 << 20).await;
        }
        // Five 1 MiB grants at 1 MiB/s: the fifth starts after four seconds.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_secs(4) && elapsed < Duration::from_millis(4100),
            "{elapsed:?}"
        );
    }

    #[tokio::test]
    async fn unlimited_never_waits() {
        let t = Throttle::new(0);
        let start = std::time::Instant::now();
        for _ in 0..1000 {
            t.acquire(1 << 30).await;
        }
        assert!(start.elapsed() < Duration::from_millis(100));
    }
}
