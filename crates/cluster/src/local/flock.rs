//! `flock(2)` on open files. A flock belongs to the open file description, so two opens
//! of one path in one process exclude each other like two processes do, and the kernel
//! drops the lock when the last descriptor closes, including when a process crashes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// First pause between attempts to take a busy lock.
const RETRY_PAUSE_MIN_MS: u64 = 1;
/// Longest pause between attempts to take a busy lock.
const RETRY_PAUSE_MAX_MS: u64 = 16;

/// Tries to take an exclusive lock without waiting: `Ok(false)` if someone holds it.
pub(crate) fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    loop {
        // SAFETY: flock only reads the descriptor number, which `file` keeps open.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(err),
        }
    }
}

/// Releases a lock taken on `file` (closing the file does it too).
pub(crate) fn unlock(file: &File) -> io::Result<()> {
    // SAFETY: as above.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Takes an exclusive lock, retrying with a capped backoff for at most `wait_max`:
/// `Ok(false)` if it is still held by someone else then. Blocks the calling thread.
pub(crate) fn lock_exclusive_within(file: &File, wait_max: Duration) -> io::Result<bool> {
    let start = Instant::now();
    let mut pause_ms = RETRY_PAUSE_MIN_MS;
    loop {
        if try_lock_exclusive(file)? {
            return Ok(true);
        }
        if start.elapsed() >= wait_max {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(pause_ms));
        pause_ms = (pause_ms * 2).min(RETRY_PAUSE_MAX_MS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_opens_of_one_file_exclude_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let first = File::create(&path).unwrap();
        let second = File::open(&path).unwrap();
        assert!(try_lock_exclusive(&first).unwrap());
        assert!(!try_lock_exclusive(&second).unwrap());
        assert!(!lock_exclusive_within(&second, Duration::from_millis(20)).unwrap());
        drop(first);
        assert!(try_lock_exclusive(&second).unwrap());
        unlock(&second).unwrap();
    }
}
