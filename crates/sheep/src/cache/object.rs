//! One cached object: its data file and block states, with the per-block write
//! sequence numbers and push epochs that decide when a block may become clean.

use super::bitmap::{runs, Bitmap, CACHE_BLOCK};
use super::meta::ObjectState;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// In-memory state of one cached object, guarded by its mutex.
pub struct Blocks {
    pub st: ObjectState,
    /// Write sequence per block: bumped by every write, so a push or flush only cleans
    /// a block no newer write hit meanwhile.
    pub seq: Vec<u64>,
    /// Epoch in which the block's current content was pushed (0: not pushed). A pushed
    /// block is clean only after a sync in that same epoch. Non-zero only for dirty
    /// blocks (cleaning and every new content reset it).
    pub pushed_epoch: Vec<u32>,
    /// Dirty blocks with `pushed_epoch == 0`: what the pusher has to send (blocks pushed
    /// in an older epoch are found by a full scan after an epoch change).
    pub unpushed: usize,
}

impl Blocks {
    /// Records that dirty block `i` was pushed in `epoch`; true if it was unpushed.
    pub fn set_pushed(&mut self, i: usize, epoch: u32) -> bool {
        let was = self.pushed_epoch[i] == 0;
        if was {
            self.unpushed -= 1;
        }
        self.pushed_epoch[i] = epoch;
        was
    }

    /// Forgets that dirty block `i` was pushed; true if it had been.
    pub fn set_unpushed(&mut self, i: usize) -> bool {
        let was = self.pushed_epoch[i] != 0;
        if was {
            self.unpushed += 1;
        }
        self.pushed_epoch[i] = 0;
        was
    }
}

/// A run of dirty blocks to push: block range, whether it is zeros, and each block's
/// sequence number when the snapshot was taken.
#[derive(Clone, Debug)]
pub struct PushRun {
    pub start: usize,
    pub end: usize,
    pub zero: bool,
    pub seqs: Vec<u64>,
    pub data: bytes::Bytes,
}

/// How a write or zeroing moved an object's block counts.
#[derive(Clone, Copy, Debug, Default)]
pub struct Marked {
    /// Blocks that were clean and are dirty now.
    pub newly_dirty: u64,
    /// Dirty blocks whose pushed content was replaced (they must be pushed again).
    pub unpushed: u64,
}

/// How dropping blocks from the cache moved its counts.
#[derive(Clone, Copy, Debug, Default)]
pub struct Forgot {
    /// Blocks that were valid.
    pub valid: u64,
    /// Dirty blocks dropped.
    pub dirty: u64,
    /// Of those, blocks that had been pushed.
    pub pushed: u64,
}

pub struct CachedObject {
    pub index: u32,
    file: File,
    pub blocks: Mutex<Blocks>,
    /// Pushes of this object hold it exclusively (one at a time); writes going around
    /// the cache hold it shared, so no push runs while they replace blocks under it.
    pub io: tokio::sync::RwLock<()>,
    pub last_used: AtomicU64,
    next_seq: AtomicU64,
}

impl CachedObject {
    pub fn new(index: u32, file: File, st: ObjectState, tick: u64) -> CachedObject {
        let n = st.valid.len();
        // Dirty blocks found at start (after a crash) get a sequence number so they are pushed.
        let seq = (0..n).map(|b| u64::from(st.dirty.get(b))).collect();
        let unpushed = st.dirty.count();
        CachedObject {
            index,
            file,
            blocks: Mutex::new(Blocks {
                st,
                seq,
                pushed_epoch: vec![0; n],
                unpushed,
            }),
            io: tokio::sync::RwLock::new(()),
            last_used: AtomicU64::new(tick),
            next_seq: AtomicU64::new(2),
        }
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, Blocks> {
        self.blocks.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn touch(&self, tick: u64) {
        self.last_used.store(tick, Ordering::Relaxed);
    }

    /// Writes data at `offset` (block aligned) and marks the blocks valid and, unless
    /// `clean`, dirty. Returns how the block counts moved. Data and state change under
    /// one lock, so a concurrent fill never overwrites the new data.
    pub fn write(
        &self,
        b: &mut Blocks,
        offset: u64,
        data: &[u8],
        clean: bool,
    ) -> io::Result<Marked> {
        store::sys::write_all_at_in_pieces(&self.file, data, offset)?;
        let (start, end) = block_span(offset, data.len() as u64);
        Ok(self.mark(b, start, end, false, clean))
    }

    /// Marks a block range as zeros (punched in the file), dirty.
    pub fn zero(&self, b: &mut Blocks, offset: u64, len: u64) -> io::Result<Marked> {
        punch(&self.file, offset, len)?;
        let (start, end) = block_span(offset, len);
        Ok(self.mark(b, start, end, true, false))
    }

    fn mark(&self, b: &mut Blocks, start: usize, end: usize, zero: bool, clean: bool) -> Marked {
        let mut m = Marked::default();
        for i in start..end {
            b.st.valid.set(i, true);
            b.st.zero.set(i, zero && !clean);
            if !clean {
                if !b.st.dirty.get(i) {
                    m.newly_dirty += 1;
                    // Dirty now and not pushed (pushed_epoch is 0 for clean blocks).
                    b.unpushed += 1;
                }
                b.st.dirty.set(i, true);
            }
            if !clean || b.st.dirty.get(i) {
                // New content: a push of the old content in flight must not mark it clean.
                b.seq[i] = self.next_seq.fetch_add(1, Ordering::Relaxed);
                if b.set_unpushed(i) {
                    m.unpushed += 1;
                }
            }
        }
        m
    }

    /// Drops blocks `[start, end)` after a write went around the cache: the replicas
    /// hold newer content. They become invalid (a read fetches them again) and, with
    /// `dirty_too`, clean: their older dirty content must never be pushed over the new.
    /// Without it dirty blocks stay as they are (after a failed write, whatever part of
    /// it reached the replicas is overwritten by the next push). Every dropped block gets
    /// a new sequence number, so a push or flush of older content in flight never marks
    /// it pushed or clean.
    pub fn forget(&self, b: &mut Blocks, start: usize, end: usize, dirty_too: bool) -> Forgot {
        let mut f = Forgot::default();
        for i in start..end {
            if b.st.dirty.get(i) {
                if !dirty_too {
                    continue;
                }
                f.dirty += 1;
                if b.pushed_epoch[i] != 0 {
                    f.pushed += 1;
                } else {
                    b.unpushed -= 1;
                }
                b.pushed_epoch[i] = 0;
                b.st.dirty.set(i, false);
                b.st.zero.set(i, false);
            }
            if b.st.valid.get(i) {
                f.valid += 1;
                b.st.valid.set(i, false);
            }
            b.seq[i] = self.next_seq.fetch_add(1, Ordering::Relaxed);
        }
        f
    }

    /// Fills the blocks from `first` on that `data` covers and that are neither valid
    /// nor dirty, from `data` (a copy read from the replicas).
    pub fn fill(&self, b: &mut Blocks, first: usize, data: &[u8]) -> io::Result<()> {
        let end = (first + data.len() / CACHE_BLOCK as usize).min(b.st.valid.len());
        let mut missing = Bitmap::new(b.st.valid.len());
        for i in first..end {
            missing.set(i, !b.st.valid.get(i) && !b.st.dirty.get(i));
        }
        for (s, e) in runs(&missing) {
            let from = (s - first) * CACHE_BLOCK as usize;
            let to = (e - first) * CACHE_BLOCK as usize;
            store::sys::write_all_at_in_pieces(
                &self.file,
                &data[from..to],
                s as u64 * CACHE_BLOCK,
            )?;
            b.st.valid.set_range(s, e, true);
        }
        Ok(())
    }

    pub fn read(&self, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        let got = read_full(&self.file, &mut buf, offset)?;
        if got < buf.len() {
            // Past the end of a (short) file reads as zeros: the file is sparse.
            buf[got..].fill(0);
        }
        Ok(buf)
    }

    /// Dirty blocks not yet pushed in `epoch`, as runs with their data.
    pub fn snapshot_for_push(&self, b: &Blocks, epoch: u32) -> io::Result<Vec<PushRun>> {
        let blocks = b.st.dirty.len();
        let mut want = Bitmap::new(blocks);
        for i in 0..blocks {
            want.set(i, b.st.dirty.get(i) && b.pushed_epoch[i] != epoch);
        }
        let mut out = Vec::new();
        for (s, e) in runs(&want) {
            // Split each run where zero and data blocks alternate.
            let mut i = s;
            while i < e {
                let zero = b.st.zero.get(i);
                let mut j = i;
                while j < e && b.st.zero.get(j) == zero {
                    j += 1;
                }
                let data = if zero {
                    bytes::Bytes::new()
                } else {
                    self.read(i as u64 * CACHE_BLOCK, (j - i) as u64 * CACHE_BLOCK)?
                        .into()
                };
                out.push(PushRun {
                    start: i,
                    end: j,
                    zero,
                    seqs: b.seq[i..j].to_vec(),
                    data,
                });
                i = j;
            }
        }
        Ok(out)
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// Block range covering `[offset, offset + len)`.
pub fn block_span(offset: u64, len: u64) -> (usize, usize) {
    (
        (offset / CACHE_BLOCK) as usize,
        (offset + len).div_ceil(CACHE_BLOCK) as usize,
    )
}

fn read_full(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn punch(f: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    // No hole punching here: write zeros instead.
    f.write_all_at(&vec![0u8; len as usize], offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(blocks: usize) -> (tempfile::TempDir, CachedObject) {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("obj"))
            .expect("cache file");
        file.set_len(blocks as u64 * CACHE_BLOCK).expect("size");
        let o = CachedObject::new(0, file, ObjectState::new(blocks), 1);
        (dir, o)
    }

    #[test]
    fn forgetting_blocks_drops_them_and_keeps_the_counts_straight() {
        let (_dir, o) = object(8);
        let mut b = o.lock();
        let block = vec![7u8; CACHE_BLOCK as usize];
        // Blocks 0-1 clean, 2-3 dirty and pushed, 4-5 dirty and unpushed, 6-7 absent.
        o.write(&mut b, 0, &[&block[..], &block[..]].concat(), true)
            .expect("clean write");
        o.write(&mut b, 2 * CACHE_BLOCK, &[&block[..]; 4].concat(), false)
            .expect("dirty write");
        assert!(b.set_pushed(2, 5) && b.set_pushed(3, 5));
        assert_eq!(b.unpushed, 2);
        let seq_before = b.seq.clone();

        // Keeping dirty blocks (a failed write): only clean copies go.
        let kept = o.forget(&mut b, 0, 8, false);
        assert_eq!((kept.valid, kept.dirty, kept.pushed), (2, 0, 0));
        assert!(!b.st.valid.get(0) && !b.st.valid.get(1));
        assert!((2..6).all(|i| b.st.dirty.get(i) && b.st.valid.get(i)));
        assert_eq!(b.unpushed, 2);
        assert_eq!(b.seq[2..6], seq_before[2..6]);

        // Dropping dirty blocks too: nothing is left to push over the replicas' copy,
        // and a push of the old content in flight finds its sequence numbers moved.
        let gone = o.forget(&mut b, 1, 6, true);
        assert_eq!((gone.valid, gone.dirty, gone.pushed), (4, 4, 2));
        assert!((0..8).all(|i| !b.st.valid.get(i) && !b.st.dirty.get(i)));
        assert_eq!(b.unpushed, 0);
        assert!((1..6).all(|i| b.seq[i] != seq_before[i] && b.pushed_epoch[i] == 0));
        assert!(o.snapshot_for_push(&b, 6).expect("snapshot").is_empty());
    }

    #[test]
    fn a_fill_keeps_only_blocks_the_cache_lacks() {
        let (_dir, o) = object(8);
        let mut b = o.lock();
        let block = |v: u8| vec![v; CACHE_BLOCK as usize];
        // Block 2 dirty (newer than any copy), block 3 clean; the rest absent.
        o.write(&mut b, 2 * CACHE_BLOCK, &block(2), false)
            .expect("dirty write");
        o.write(&mut b, 3 * CACHE_BLOCK, &block(3), true)
            .expect("clean write");
        // A copy of blocks 1-4 from the replicas, all 9s.
        o.fill(
            &mut b,
            1,
            &[block(9), block(9), block(9), block(9)].concat(),
        )
        .expect("fill");
        let got = o.read(0, 6 * CACHE_BLOCK).expect("read");
        let want = [block(0), block(9), block(2), block(3), block(9), block(0)].concat();
        assert_eq!(got, want);
        let valid: Vec<bool> = (0..8).map(|i| b.st.valid.get(i)).collect();
        assert_eq!(valid, [false, true, true, true, true, false, false, false]);
        assert!(b.st.dirty.get(2) && !b.st.dirty.get(1) && !b.st.dirty.get(4));
        // A copy running past the object's end is cut at it.
        o.fill(&mut b, 7, &[block(7), block(7)].concat())
            .expect("fill at the end");
        assert!(b.st.valid.get(7));
    }
}
