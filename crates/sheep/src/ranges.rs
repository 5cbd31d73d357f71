//! Byte-range locks per object, for a gateway's writes to one VDI.
//!
//! Writes to overlapping ranges of an object are sent to its replicas one after the
//! other, in the order they asked, so every replica applies them in the same order and
//! the copies never differ. Writes to disjoint ranges of the same object go at once (a
//! sequential stream of 1 MiB writes puts four in each 4 MiB object).

use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::Notify;

/// A waiting or granted range of one object.
struct Entry {
    id: u64,
    start: u64,
    end: u64,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    /// Per object index, entries in the order they asked.
    objects: HashMap<u32, Vec<Entry>>,
}

/// The range locks of one VDI.
#[derive(Default)]
pub struct RangeLocks {
    table: Mutex<Table>,
    released: Notify,
}

/// A granted range; released on drop (also when the lock is dropped while waiting).
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    index: u32,
    id: u64,
}

impl RangeLocks {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks `[start, end)` of object `index`: waits for every earlier request of an
    /// overlapping range, and only for those.
    pub async fn lock(&self, index: u32, start: u64, end: u64) -> RangeGuard<'_> {
        let id = {
            let mut t = self.table();
            let id = t.next_id;
            t.next_id += 1;
            t.objects
                .entry(index)
                .or_default()
                .push(Entry { id, start, end });
            id
        };
        let guard = RangeGuard {
            locks: self,
            index,
            id,
        };
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the check, so a release in between is not missed.
            released.as_mut().enable();
            if self.granted(index, id) {
                return guard;
            }
            released.await;
        }
    }

    fn granted(&self, index: u32, id: u64) -> bool {
        let t = self.table();
        let Some(entries) = t.objects.get(&index) else {
            return true;
        };
        let Some(at) = entries.iter().position(|e| e.id == id) else {
            return true;
        };
        let me = &entries[at];
        !entries[..at]
            .iter()
            .any(|e| e.start < me.end && me.start < e.end)
    }

    /// Ranges held or waited for (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.table().objects.values().map(Vec::len).sum()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut t = self.locks.table();
        if let Some(entries) = t.objects.get_mut(&self.index) {
            entries.retain(|e| e.id != self.id);
            if entries.is_empty() {
                t.objects.remove(&self.index);
            }
        }
        drop(t);
        self.locks.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    async fn is_waiting(f: &mut (impl std::future::Future + Unpin)) -> bool {
        tokio::time::timeout(Duration::from_millis(20), f)
            .await
            .is_err()
    }

    #[tokio::test]
    async fn disjoint_ranges_go_at_once_overlapping_ones_in_order() {
        let locks = Arc::new(RangeLocks::default());
        let a = locks.lock(0, 0, 100).await;
        // Disjoint range of the same object, and the same range of another object.
        let b = locks.lock(0, 100, 200).await;
        let c = locks.lock(1, 0, 100).await;

        // Overlapping the first: waits for it.
        let mut d = Box::pin(locks.lock(0, 50, 150));
        assert!(is_waiting(&mut d).await);
        drop(a);
        // Still overlapping `b`.
        assert!(is_waiting(&mut d).await);
        // A later request overlapping only `d` queues behind it, even though nothing it
        // overlaps is granted yet: overlapping requests keep their order.
        let mut e = Box::pin(locks.lock(0, 140, 160));
        drop(b);
        let d = d.await;
        assert!(is_waiting(&mut e).await);
        drop(d);
        let e = e.await;
        drop((c, e));
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn a_waiter_given_up_leaves_nothing_behind() {
        let locks = RangeLocks::default();
        let a = locks.lock(3, 0, 10).await;
        let mut gave_up = Box::pin(locks.lock(3, 5, 6));
        assert!(is_waiting(&mut gave_up).await);
        drop(gave_up);
        let mut next = Box::pin(locks.lock(3, 5, 20));
        assert!(is_waiting(&mut next).await);
        drop(a);
        drop(next.await);
        assert_eq!(locks.len(), 0);
    }
}
