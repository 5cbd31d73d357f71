//! One open object file: checked reads, read-modify-write of partial blocks, hole
//! punching and the stamp in the header. Callers hold the object's lock (shared for
//! reads, exclusive for changes); in fault-injection mode every overwrite first records
//! its pre-image in the [`FaultLog`].

use crate::error::StoreError;
use crate::fault::FaultLog;
use crate::format::{
    block_tag, decode_tags, encode_tags, Header, Layout, Summed, BLOCK_SIZE, HEADER_USED, TAG_SIZE,
};
use crate::{sys, Stamp};
use proto::Oid;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const BLOCK: usize = BLOCK_SIZE as usize;

/// Largest buffer of zeros written at once when the filesystem cannot punch holes.
const ZERO_CHUNK_MAX: u64 = 1 << 20;

/// An open, validated object file.
#[derive(Debug)]
pub(crate) struct ObjectFile {
    file: File,
    path: PathBuf,
    oid: Oid,
    layout: Layout,
    /// The stamp in the header, changed only under the object's exclusive lock.
    stamp: Mutex<Stamp>,
}

impl ObjectFile {
    /// Creates a new object file at `path` (which must not exist): header, full sparse
    /// length, all blocks zero.
    pub fn create_new(
        path: &Path,
        oid: Oid,
        capacity: u64,
        stamp: Stamp,
    ) -> io::Result<ObjectFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        let layout = Layout::new(capacity);
        file.set_len(layout.file_len())?;
        let header = Header {
            oid_raw: oid.raw(),
            capacity,
            stamp,
        };
        file.write_all_at(&header.encode(), 0)?;
        Ok(ObjectFile {
            file,
            path: path.to_owned(),
            oid,
            layout,
            stamp: Mutex::new(stamp),
        })
    }

    /// Opens and validates the file of `oid`; `Ok(None)` if there is none.
    pub fn open(path: &Path, oid: Oid, capacity: u64) -> Result<Option<ObjectFile>, StoreError> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(StoreError::io("open", Some(oid), err)),
        };
        let corrupt = |reason: String| StoreError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let len = file.metadata().map_err(StoreError::on("fstat", oid))?.len();
        if len < HEADER_USED as u64 {
            return Err(corrupt(format!(
                "file is {len} bytes, shorter than a header"
            )));
        }
        let mut raw = [0u8; HEADER_USED];
        file.read_exact_at(&mut raw, 0)
            .map_err(StoreError::on("pread", oid))?;
        let header = Header::decode(&raw).map_err(corrupt)?;
        if header.oid_raw != oid.raw() {
            return Err(corrupt(format!(
                "header names object {:016x}",
                header.oid_raw
            )));
        }
        if header.capacity != capacity {
            let found = header.capacity;
            return Err(corrupt(format!(
                "capacity {found}, expected {capacity} (object size changed?)"
            )));
        }
        let layout = Layout::new(capacity);
        if len != layout.file_len() {
            return Err(corrupt(format!(
                "file is {len} bytes, expected {}",
                layout.file_len()
            )));
        }
        Ok(Some(ObjectFile {
            file,
            path: path.to_owned(),
            oid,
            layout,
            stamp: Mutex::new(header.stamp),
        }))
    }

    /// Records that the file was renamed to `path`.
    pub fn set_path(&mut self, path: PathBuf) {
        self.path = path;
    }

    pub fn stamp(&self) -> Stamp {
        *self.stamp.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads `len` bytes at object offset `offset`, checking the crc of every block touched.
    pub fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, StoreError> {
        debug_assert!(offset + len <= self.layout.capacity);
        if len == 0 {
            return Ok(Vec::new());
        }
        let first = offset / BLOCK_SIZE;
        let count = (offset + len - 1) / BLOCK_SIZE - first + 1;
        let mut span = vec![0u8; (count * BLOCK_SIZE) as usize];
        self.pread(&mut span, self.layout.data_at(first * BLOCK_SIZE))?;
        let tags = self.read_tags(first, count)?;
        for (i, (block, tag)) in span.chunks_exact(BLOCK).zip(&tags).enumerate() {
            if block_tag(block) != *tag {
                let block = first + i as u64;
                return Err(StoreError::Checksum {
                    oid: self.oid,
                    block,
                });
            }
        }
        let start = (offset - first * BLOCK_SIZE) as usize;
        let len = len as usize;
        if start > 0 || span.len() != len {
            span.copy_within(start..start + len, 0);
            span.truncate(len);
        }
        Ok(span)
    }

    /// Writes `data` at object offset `offset` and updates the crcs of the blocks touched.
    /// Only partial edge blocks are read (and checked) first.
    pub fn write<'a>(
        &self,
        offset: u64,
        data: impl Into<Summed<'a>>,
        undo: Option<&FaultLog>,
    ) -> Result<(), StoreError> {
        let summed = data.into();
        let data = summed.data;
        let len = data.len() as u64;
        debug_assert!(offset + len <= self.layout.capacity);
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let first = offset / BLOCK_SIZE;
        let last = (end - 1) / BLOCK_SIZE;
        let head_partial = offset % BLOCK_SIZE != 0;
        let tail_partial = end % BLOCK_SIZE != 0;
        let tags: Vec<u32> = if !head_partial && !tail_partial {
            self.put(self.layout.data_at(offset), data, undo)?;
            summed
                .tags_at(offset)
                .unwrap_or_else(|| data.chunks_exact(BLOCK).map(block_tag).collect())
        } else {
            let count = last - first + 1;
            let mut span = vec![0u8; (count * BLOCK_SIZE) as usize];
            if head_partial {
                self.read_block_checked(first, &mut span[..BLOCK])?;
            }
            if tail_partial && (last != first || !head_partial) {
                let at = span.len() - BLOCK;
                self.read_block_checked(last, &mut span[at..])?;
            }
            let start = (offset - first * BLOCK_SIZE) as usize;
            span[start..start + data.len()].copy_from_slice(data);
            self.put(self.layout.data_at(first * BLOCK_SIZE), &span, undo)?;
            span.chunks_exact(BLOCK).map(block_tag).collect()
        };
        self.put(self.layout.tag_offset(first), &encode_tags(&tags), undo)
    }

    /// Makes `len` bytes at `offset` read as zeros: whole blocks are deallocated, partial
    /// edge blocks are rewritten with zeros.
    pub fn punch(&self, offset: u64, len: u64, undo: Option<&FaultLog>) -> Result<(), StoreError> {
        debug_assert!(offset + len <= self.layout.capacity);
        let end = offset + len;
        let whole_start = offset.next_multiple_of(BLOCK_SIZE);
        let whole_end = end / BLOCK_SIZE * BLOCK_SIZE;
        if whole_start >= whole_end {
            return self.write(offset, &vec![0u8; len as usize], undo);
        }
        if offset < whole_start {
            self.write(offset, &vec![0u8; (whole_start - offset) as usize], undo)?;
        }
        if whole_end < end {
            self.write(whole_end, &vec![0u8; (end - whole_end) as usize], undo)?;
        }
        self.punch_blocks(
            whole_start / BLOCK_SIZE,
            (whole_end - whole_start) / BLOCK_SIZE,
            undo,
        )
    }

    /// Raises the header's stamp to `max(stored, stamp)`; never lowers it.
    pub fn raise_stamp(&self, stamp: Stamp, undo: Option<&FaultLog>) -> Result<(), StoreError> {
        let mut stored = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
        if stamp <= *stored {
            return Ok(());
        }
        let header = Header {
            oid_raw: self.oid.raw(),
            capacity: self.layout.capacity,
            stamp,
        };
        self.put(0, &header.encode(), undo)?;
        *stored = stamp;
        Ok(())
    }

    /// `fdatasync`: the file's data, crcs and header are durable when this returns.
    pub fn sync_data(&self) -> Result<(), StoreError> {
        self.file
            .sync_data()
            .map_err(StoreError::on("fdatasync", self.oid))
    }

    fn punch_blocks(
        &self,
        first: u64,
        count: u64,
        undo: Option<&FaultLog>,
    ) -> Result<(), StoreError> {
        let at = self.layout.data_at(first * BLOCK_SIZE);
        let len = count * BLOCK_SIZE;
        if let Some(log) = undo {
            let mut pre_image = vec![0u8; len as usize];
            self.pread(&mut pre_image, at)?;
            log.record_restore(self.oid, at, pre_image);
        }
        match sys::punch_hole(&self.file, at, len) {
            Ok(()) => {}
            Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let zeros = vec![0u8; len.min(ZERO_CHUNK_MAX) as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(ZERO_CHUNK_MAX) as usize;
                    self.file
                        .write_all_at(&zeros[..n], at + done)
                        .map_err(StoreError::on("pwrite", self.oid))?;
                    done += n as u64;
                }
            }
            Err(err) => return Err(StoreError::io("fallocate", Some(self.oid), err)),
        }
        let zero_tags = vec![0u8; (count * TAG_SIZE) as usize];
        self.put(self.layout.tag_offset(first), &zero_tags, undo)
    }

    fn read_tags(&self, first: u64, count: u64) -> Result<Vec<u32>, StoreError> {
        let mut raw = vec![0u8; (count * TAG_SIZE) as usize];
        self.pread(&mut raw, self.layout.tag_offset(first))?;
        Ok(decode_tags(&raw))
    }

    /// Reads one whole block and checks it: a read-modify-write must not launder a
    /// corrupt block under a fresh crc.
    fn read_block_checked(&self, block: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.pread(buf, self.layout.data_at(block * BLOCK_SIZE))?;
        let tag = self.read_tags(block, 1)?;
        if block_tag(buf) != tag[0] {
            return Err(StoreError::Checksum {
                oid: self.oid,
                block,
            });
        }
        Ok(())
    }

    fn pread(&self, buf: &mut [u8], at: u64) -> Result<(), StoreError> {
        self.file.read_exact_at(buf, at).map_err(|err| {
            if err.kind() == io::ErrorKind::UnexpectedEof {
                StoreError::Corrupt {
                    path: self.path.clone(),
                    reason: format!("file truncated: short read of {} bytes at {at}", buf.len()),
                }
            } else {
                StoreError::io("pread", Some(self.oid), err)
            }
        })
    }

    /// Overwrites file bytes at `at`, first saving their pre-image in fault mode.
    fn put(&self, at: u64, bytes: &[u8], undo: Option<&FaultLog>) -> Result<(), StoreError> {
        if let Some(log) = undo {
            let mut pre_image = vec![0u8; bytes.len()];
            self.pread(&mut pre_image, at)?;
            log.record_restore(self.oid, at, pre_image);
        }
        sys::write_all_at_in_pieces(&self.file, bytes, at)
            .map_err(StoreError::on("pwrite", self.oid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_file(dir: &Path, capacity: u64) -> ObjectFile {
        let oid = Oid::data(1, 1);
        ObjectFile::create_new(&dir.join("obj"), oid, capacity, Stamp::default()).unwrap()
    }

    #[test]
    fn unwritten_object_reads_zeros_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let file = new_file(dir.path(), 64 << 10);
        assert_eq!(file.read(100, 10_000).unwrap(), vec![0u8; 10_000]);
    }

    #[test]
    fn partial_write_keeps_neighbouring_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let file = new_file(dir.path(), 64 << 10);
        file.write(0, &[7u8; 8192], None).unwrap();
        file.write(4000, &[1u8; 200], None).unwrap();
        let got = file.read(0, 8192).unwrap();
        assert!(got[..4000].iter().all(|b| *b == 7));
        assert!(got[4000..4200].iter().all(|b| *b == 1));
        assert!(got[4200..].iter().all(|b| *b == 7));
    }

    #[test]
    fn punch_zeroes_whole_and_partial_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let file = new_file(dir.path(), 64 << 10);
        file.write(0, &[9u8; 64 << 10], None).unwrap();
        file.punch(1000, 20_000, None).unwrap();
        let got = file.read(0, 64 << 10).unwrap();
        assert!(got[..1000].iter().all(|b| *b == 9));
        assert!(got[1000..21_000].iter().all(|b| *b == 0));
        assert!(got[21_000..].iter().all(|b| *b == 9));
    }

    #[test]
    fn stamp_never_goes_backwards() {
        let dir = tempfile::tempdir().unwrap();
        let file = new_file(dir.path(), 4096);
        file.raise_stamp(Stamp::new(1, 5), None).unwrap();
        file.raise_stamp(Stamp::new(3, 4), None).unwrap();
        assert_eq!(file.stamp(), Stamp::new(1, 5));
        let reopened = ObjectFile::open(&dir.path().join("obj"), Oid::data(1, 1), 4096).unwrap();
        assert_eq!(reopened.unwrap().stamp(), Stamp::new(1, 5));
    }
}
