//! Transmission replies: what a request produced ([`Reply`]), its wire encoding
//! (simple or structured) gathered into batches of iovecs, the vectored write of a
//! batch, the splitting of READ data into `OFFSET_DATA` / `OFFSET_HOLE` chunks
//! ([`read_chunks`]), and the shaping of device extents into a BLOCK_STATUS answer.

use std::cmp::Reverse;
use std::io::{self, IoSlice};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::consts::*;
use crate::device::{Extent, NbdErrno};
use crate::option::truncate_message;

/// What a request produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyBody {
    /// Success without data.
    Done,
    /// Successful READ of `data` at `offset` (empty for a zero-length read).
    /// `chunks` is how a structured reply splits `data` (see [`read_chunks`]): in
    /// order, covering it exactly. Empty (or not covering `data` exactly) means one
    /// `OFFSET_DATA` chunk of everything. Simple replies ignore it.
    Data {
        offset: u64,
        data: Vec<u8>,
        chunks: Vec<ReadChunk>,
    },
    /// Successful BLOCK_STATUS for `base:allocation`: (length, state flags) pairs.
    BlockStatus(Vec<(u32, u32)>),
    /// Failure.
    Error { errno: NbdErrno, message: String },
}

/// The reply to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Handle of the request.
    pub cookie: u64,
    /// The request was a READ (its replies must be structured once negotiated).
    pub is_read: bool,
    /// Outcome.
    pub body: ReplyBody,
}

/// One chunk of a structured READ reply, relative to the start of the data read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadChunk {
    /// First byte, relative to the request's offset.
    pub start: u32,
    /// Bytes covered (never 0).
    pub len: u32,
    /// The bytes are all zero and go out as an `OFFSET_HOLE` chunk without payload;
    /// otherwise as an `OFFSET_DATA` chunk.
    pub hole: bool,
}

impl ReadChunk {
    fn range(&self) -> std::ops::Range<usize> {
        self.start as usize..self.start as usize + self.len as usize
    }
}

/// Whether every byte of `bytes` is zero. Compares 64 bytes at a time as four
/// `u128` words (the compiler turns this into vector instructions), stopping at
/// the first block holding a non-zero byte.
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(64);
    let blocks_zero = blocks.all(|block| {
        block
            .chunks_exact(16)
            .map(|word| {
                let mut w = [0u8; 16];
                w.copy_from_slice(word);
                u128::from_ne_bytes(w)
            })
            .fold(0, |acc, word| acc | word)
            == 0
    });
    blocks_zero && blocks.remainder().iter().all(|&b| b == 0)
}

/// Splits the `data` of a READ at export offset `offset` into the chunks of a
/// structured reply: in order, covering `data` exactly, none empty.
///
/// The data is examined in granules of [`READ_HOLE_GRANULE_BYTES`] rounded up to a
/// multiple of `min_block`, aligned to absolute export offsets (the first and last
/// granule may be cut by the request's ends). A maximal run of all-zero granules
/// at least [`READ_HOLE_MIN_BYTES`] long becomes a hole; everything else is data.
/// Every chunk boundary is thus a granule boundary or an end of the request, hence
/// a multiple of `min_block` when the request is aligned. Holes never touch each
/// other. If that makes more than `max_chunks` chunks, only the largest
/// `(max_chunks - 1) / 2` holes are kept (the others are sent as data), so a reply
/// never has more than `max_chunks` chunks; `max_chunks` below 3 means one data
/// chunk (as the DF flag asks) and the data is not even scanned. Empty data gives
/// no chunks.
pub fn read_chunks(data: &[u8], offset: u64, min_block: u32, max_chunks: usize) -> Vec<ReadChunk> {
    let len = data.len();
    if len == 0 {
        return Vec::new();
    }
    let whole = ReadChunk {
        start: 0,
        len: len as u32,
        hole: false,
    };
    if max_chunks < 3 || len < READ_HOLE_MIN_BYTES as usize {
        return vec![whole];
    }
    let min = u64::from(min_block.max(1));
    let granule = u64::from(READ_HOLE_GRANULE_BYTES).div_ceil(min) * min;
    // Maximal zero runs long enough to be holes, as (start, end) relative to data.
    let mut holes: Vec<(usize, usize)> = Vec::new();
    let mut keep_hole = |start: usize, end: usize| {
        if end - start >= READ_HOLE_MIN_BYTES as usize {
            holes.push((start, end));
        }
    };
    let mut zero_since = None;
    let mut at = 0usize;
    while at < len {
        let absolute = offset.wrapping_add(at as u64);
        let to_boundary = granule - absolute % granule;
        let end = at + to_boundary.min((len - at) as u64) as usize;
        if is_zero(&data[at..end]) {
            zero_since.get_or_insert(at);
        } else if let Some(start) = zero_since.take() {
            keep_hole(start, at);
        }
        at = end;
    }
    if let Some(start) = zero_since {
        keep_hole(start, len);
    }
    if holes.is_empty() {
        return vec![whole];
    }
    let count = |holes: &[(usize, usize)]| {
        // Each hole, plus the data between, before and after them.
        let mut chunks = holes.len();
        let mut at = 0;
        for &(start, end) in holes {
            chunks += usize::from(start > at);
            at = end;
        }
        chunks + usize::from(at < len)
    };
    if count(&holes) > max_chunks {
        holes.sort_unstable_by_key(|&(start, end)| (Reverse(end - start), start));
        holes.truncate((max_chunks - 1) / 2);
        holes.sort_unstable();
    }
    let mut chunks = Vec::with_capacity(2 * holes.len() + 1);
    let mut push = |start: usize, end: usize, hole: bool| {
        chunks.push(ReadChunk {
            start: start as u32,
            len: (end - start) as u32,
            hole,
        })
    };
    let mut at = 0;
    for (start, end) in holes {
        if start > at {
            push(at, start, false);
        }
        push(start, end, true);
        at = end;
    }
    if at < len {
        push(at, len, false);
    }
    chunks
}

/// Whether `chunks` are non-empty, in order and cover `len` bytes exactly.
fn covers_exactly(chunks: &[ReadChunk], len: usize) -> bool {
    let mut at = 0usize;
    for chunk in chunks {
        if chunk.len == 0 || chunk.start as usize != at {
            return false;
        }
        at += chunk.len as usize;
    }
    !chunks.is_empty() && at == len
}

/// One piece of a batch: a range of the inline buffer or of a payload.
#[derive(Debug, Clone, Copy)]
enum Segment {
    Inline {
        start: usize,
        end: usize,
    },
    Payload {
        index: usize,
        start: usize,
        end: usize,
    },
}

/// Encoded replies waiting for one vectored write. Headers and small payloads are
/// copied into one buffer; large payloads (READ data) keep their own buffer.
#[derive(Debug, Default)]
pub struct ReplyBatch {
    inline: BytesMut,
    segments: Vec<Segment>,
    payloads: Vec<Vec<u8>>,
    bytes: usize,
    replies: usize,
}

impl ReplyBatch {
    /// Total bytes queued.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Replies queued.
    pub fn replies(&self) -> usize {
        self.replies
    }

    /// Empties the batch, keeping its allocations.
    pub fn clear(&mut self) {
        self.inline.clear();
        self.segments.clear();
        self.payloads.clear();
        self.bytes = 0;
        self.replies = 0;
    }

    fn push_inline(&mut self, bytes: &[u8]) {
        let start = self.inline.len();
        self.inline.extend_from_slice(bytes);
        self.inline_appended(start);
    }

    /// Records the inline bytes appended from `start` as the next segment.
    fn inline_appended(&mut self, start: usize) {
        let end = self.inline.len();
        match self.segments.last_mut() {
            Some(Segment::Inline { end: last_end, .. }) if *last_end == start => *last_end = end,
            _ => self.segments.push(Segment::Inline { start, end }),
        }
        self.bytes += end - start;
    }

    fn push_payload(&mut self, payload: Vec<u8>) {
        if payload.len() <= REPLY_INLINE_PAYLOAD_MAX_BYTES {
            self.push_inline(&payload);
        } else {
            let index = self.payloads.len();
            let end = payload.len();
            self.payloads.push(payload);
            self.push_payload_range(index, 0, end);
        }
    }

    /// Queues `start..end` of a payload already held: copied inline if small, else
    /// as its own iovec (no copy).
    fn push_payload_range(&mut self, index: usize, start: usize, end: usize) {
        if end - start <= REPLY_INLINE_PAYLOAD_MAX_BYTES {
            let at = self.inline.len();
            self.inline
                .extend_from_slice(&self.payloads[index][start..end]);
            self.inline_appended(at);
        } else {
            self.bytes += end - start;
            self.segments.push(Segment::Payload { index, start, end });
        }
    }

    /// The queued bytes in order, ready for a vectored write.
    pub fn slices(&self) -> Vec<&[u8]> {
        self.segments
            .iter()
            .map(|segment| match *segment {
                Segment::Inline { start, end } => &self.inline[start..end],
                Segment::Payload { index, start, end } => &self.payloads[index][start..end],
            })
            .collect()
    }

    /// Encodes one reply, structured or simple as negotiated.
    pub fn push(&mut self, reply: Reply, structured: bool) {
        self.replies += 1;
        let cookie = reply.cookie;
        if !structured {
            match reply.body {
                ReplyBody::Done => self.simple(cookie, 0),
                ReplyBody::Data { data, .. } => {
                    self.simple(cookie, 0);
                    self.push_payload(data);
                }
                ReplyBody::Error { errno, .. } => self.simple(cookie, errno.wire_value()),
                ReplyBody::BlockStatus(_) => {
                    // validate() refuses BLOCK_STATUS unless structured replies were
                    // negotiated; answer EIO rather than send an invalid frame.
                    debug_assert!(false, "block status reply without structured replies");
                    self.simple(cookie, NbdErrno::Io.wire_value());
                }
            }
            return;
        }
        match reply.body {
            ReplyBody::Done if reply.is_read => self.chunk_header(cookie, REPLY_TYPE_NONE, 0, true),
            ReplyBody::Done => self.simple(cookie, 0),
            ReplyBody::Data { data, .. } if data.is_empty() => {
                self.chunk_header(cookie, REPLY_TYPE_NONE, 0, true)
            }
            ReplyBody::Data {
                offset,
                data,
                chunks,
            } => self.structured_read(cookie, offset, data, &chunks),
            ReplyBody::BlockStatus(descriptors) => {
                let length = 4 + 8 * descriptors.len() as u32;
                self.chunk_header(cookie, REPLY_TYPE_BLOCK_STATUS, length, true);
                let mut payload = Vec::with_capacity(length as usize);
                payload.put_u32(META_BASE_ALLOCATION_ID);
                for (len, flags) in descriptors {
                    payload.put_u32(len);
                    payload.put_u32(flags);
                }
                self.push_payload(payload);
            }
            ReplyBody::Error { errno, message } => {
                let message = truncate_message(&message);
                self.chunk_header(cookie, REPLY_TYPE_ERROR, 6 + message.len() as u32, true);
                let mut payload = Vec::with_capacity(6 + message.len());
                payload.put_u32(errno.wire_value());
                payload.put_u16(message.len() as u16);
                payload.put_slice(message.as_bytes());
                self.push_payload(payload);
            }
        }
    }

    fn simple(&mut self, cookie: u64, error: u32) {
        let mut header = [0u8; SIMPLE_REPLY_HEADER_BYTES];
        header[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        header[4..8].copy_from_slice(&error.to_be_bytes());
        header[8..16].copy_from_slice(&cookie.to_be_bytes());
        self.push_inline(&header);
    }

    /// The chunks of a non-empty structured READ reply, in order; the last one is
    /// flagged DONE. Data chunks share the one buffer read from the device.
    fn structured_read(&mut self, cookie: u64, offset: u64, data: Vec<u8>, chunks: &[ReadChunk]) {
        let whole = [ReadChunk {
            start: 0,
            len: data.len() as u32,
            hole: false,
        }];
        let chunks = if covers_exactly(chunks, data.len()) {
            chunks
        } else {
            &whole[..]
        };
        let index = self.payloads.len();
        self.payloads.push(data);
        for (i, chunk) in chunks.iter().enumerate() {
            let done = i + 1 == chunks.len();
            let at = offset.wrapping_add(u64::from(chunk.start));
            if chunk.hole {
                self.chunk_header(cookie, REPLY_TYPE_OFFSET_HOLE, 12, done);
                let mut payload = [0u8; 12];
                payload[0..8].copy_from_slice(&at.to_be_bytes());
                payload[8..12].copy_from_slice(&chunk.len.to_be_bytes());
                self.push_inline(&payload);
            } else {
                self.chunk_header(cookie, REPLY_TYPE_OFFSET_DATA, 8 + chunk.len, done);
                self.push_inline(&at.to_be_bytes());
                let range = chunk.range();
                self.push_payload_range(index, range.start, range.end);
            }
        }
    }

    /// A structured reply chunk header; `done` on the last chunk of a reply.
    fn chunk_header(&mut self, cookie: u64, chunk_type: u16, length: u32, done: bool) {
        let mut header = [0u8; STRUCTURED_REPLY_HEADER_BYTES];
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        header[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        header[4..6].copy_from_slice(&flags.to_be_bytes());
        header[6..8].copy_from_slice(&chunk_type.to_be_bytes());
        header[8..16].copy_from_slice(&cookie.to_be_bytes());
        header[16..20].copy_from_slice(&length.to_be_bytes());
        self.push_inline(&header);
    }
}

/// Writes all slices in order with as few (vectored) writes as the socket allows.
pub async fn write_all_vectored<W: AsyncWrite + Unpin>(
    writer: &mut W,
    slices: &[&[u8]],
) -> io::Result<()> {
    const IOVECS_PER_WRITE_MAX: usize = 64;
    let (mut index, mut offset) = (0usize, 0usize);
    while index < slices.len() {
        if offset == slices[index].len() {
            index += 1;
            offset = 0;
            continue;
        }
        let iovecs: Vec<IoSlice<'_>> = std::iter::once(&slices[index][offset..])
            .chain(slices[index + 1..].iter().copied())
            .filter(|s| !s.is_empty())
            .take(IOVECS_PER_WRITE_MAX)
            .map(IoSlice::new)
            .collect();
        let mut written = writer.write_vectored(&iovecs).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while written > 0 && index < slices.len() {
            let left = slices[index].len() - offset;
            if written >= left {
                written -= left;
                index += 1;
                offset = 0;
            } else {
                offset += written;
                written = 0;
            }
        }
    }
    Ok(())
}

/// Shapes device extents into BLOCK_STATUS descriptors for a request of `len`
/// bytes: empty extents dropped, the total cut to `len`, neighbours with the same
/// state merged, at most [`BLOCK_STATUS_EXTENTS_MAX`] (one with `req_one`). An empty
/// answer becomes one descriptor of the whole range with state 0 ("allocated, not
/// known to be zero"), which the protocol allows.
pub fn block_status_descriptors(extents: &[Extent], len: u32, req_one: bool) -> Vec<(u32, u32)> {
    let limit = if req_one { 1 } else { BLOCK_STATUS_EXTENTS_MAX };
    let mut descriptors: Vec<(u32, u32)> = Vec::new();
    let mut covered: u32 = 0;
    for extent in extents {
        if covered >= len {
            break;
        }
        if extent.length == 0 {
            continue;
        }
        let take = extent.length.min(u64::from(len - covered)) as u32;
        let flags =
            (if extent.hole { STATE_HOLE } else { 0 }) | (if extent.zero { STATE_ZERO } else { 0 });
        let same_as_last = descriptors.last().is_some_and(|last| last.1 == flags);
        if same_as_last {
            if let Some(last) = descriptors.last_mut() {
                last.0 += take;
            }
        } else if descriptors.len() == limit {
            break;
        } else {
            descriptors.push((take, flags));
        }
        covered += take;
    }
    if descriptors.is_empty() {
        descriptors.push((len, 0));
    }
    descriptors
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode(reply: Reply, structured: bool) -> Vec<u8> {
        let mut batch = ReplyBatch::default();
        batch.push(reply, structured);
        let bytes = batch.slices().concat();
        assert_eq!(bytes.len(), batch.bytes());
        bytes
    }

    fn read_reply(data: Vec<u8>) -> Reply {
        Reply {
            cookie: 0x0102_0304_0506_0708,
            is_read: true,
            body: ReplyBody::Data {
                offset: 4096,
                data,
                chunks: Vec::new(),
            },
        }
    }

    #[test]
    fn simple_replies_are_exact() {
        let bytes = encode(read_reply(vec![0xab; 3]), false);
        assert_eq!(
            bytes,
            [
                &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8][..],
                &[0xab; 3]
            ]
            .concat()
        );
        let error = Reply {
            cookie: 9,
            is_read: true,
            body: ReplyBody::Error {
                errno: NbdErrno::Inval,
                message: "no".into(),
            },
        };
        assert_eq!(
            encode(error, false),
            [
                &0x6744_6698u32.to_be_bytes()[..],
                &22u32.to_be_bytes(),
                &9u64.to_be_bytes()
            ]
            .concat()
        );
    }

    #[test]
    fn structured_read_without_chunks_is_one_offset_data_chunk() {
        let data = vec![0x5a; 10_000];
        let bytes = encode(read_reply(data.clone()), true);
        assert_eq!(&bytes[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&bytes[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&bytes[6..8], &REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        assert_eq!(&bytes[16..20], &(8 + 10_000u32).to_be_bytes());
        assert_eq!(&bytes[20..28], &4096u64.to_be_bytes());
        assert_eq!(&bytes[28..], &data[..]);
        let empty = encode(read_reply(Vec::new()), true);
        assert_eq!(empty.len(), 20);
        assert_eq!(&empty[6..8], &REPLY_TYPE_NONE.to_be_bytes());
    }

    #[test]
    fn structured_error_and_block_status_chunks_are_exact() {
        let error = Reply {
            cookie: 1,
            is_read: false,
            body: ReplyBody::Error {
                errno: NbdErrno::NoSpc,
                message: "full".into(),
            },
        };
        let bytes = encode(error, true);
        assert_eq!(&bytes[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&bytes[16..20], &10u32.to_be_bytes());
        assert_eq!(&bytes[20..], &[0, 0, 0, 28, 0, 4, b'f', b'u', b'l', b'l']);

        let status = Reply {
            cookie: 1,
            is_read: false,
            body: ReplyBody::BlockStatus(vec![(512, 3), (1024, 0)]),
        };
        let bytes = encode(status, true);
        assert_eq!(&bytes[6..8], &REPLY_TYPE_BLOCK_STATUS.to_be_bytes());
        assert_eq!(&bytes[16..20], &20u32.to_be_bytes());
        assert_eq!(
            &bytes[20..],
            &[0, 0, 0, 1, 0, 0, 2, 0, 0, 0, 0, 3, 0, 0, 4, 0, 0, 0, 0, 0]
        );

        let done = Reply {
            cookie: 1,
            is_read: false,
            body: ReplyBody::Done,
        };
        assert_eq!(&encode(done, true)[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
    }

    #[test]
    fn batch_keeps_order_and_merges_inline_bytes() {
        let mut batch = ReplyBatch::default();
        batch.push(read_reply(vec![1; 8192]), false);
        batch.push(
            Reply {
                cookie: 2,
                is_read: false,
                body: ReplyBody::Done,
            },
            false,
        );
        batch.push(read_reply(vec![2; 100]), false);
        let slices = batch.slices();
        assert_eq!(
            slices.len(),
            3,
            "header, large payload, then the rest merged"
        );
        assert_eq!(slices[1], &[1u8; 8192][..]);
        assert_eq!(batch.replies(), 3);
        assert_eq!(batch.bytes(), 16 + 8192 + 16 + 16 + 100);
    }

    #[tokio::test]
    async fn vectored_write_handles_partial_writes() {
        // A duplex with a tiny buffer forces many short writes.
        let (mut client, mut server) = tokio::io::duplex(7);
        let slices: Vec<Vec<u8>> = vec![vec![1; 10], vec![], vec![2; 33], vec![3; 1]];
        let expected = slices.concat();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut client, &mut got)
                .await
                .unwrap();
            got
        });
        let refs: Vec<&[u8]> = slices.iter().map(|s| &s[..]).collect();
        write_all_vectored(&mut server, &refs).await.unwrap();
        drop(server);
        assert_eq!(reader.await.unwrap(), expected);
    }

    #[test]
    fn block_status_descriptors_are_shaped() {
        let e = |length, hole, zero| Extent { length, hole, zero };
        let extents = [
            e(0, false, false),
            e(512, true, true),
            e(512, true, true),
            e(4096, false, false),
            e(1 << 40, true, true),
        ];
        assert_eq!(
            block_status_descriptors(&extents, 2048, false),
            vec![(1024, 3), (1024, 0)]
        );
        assert_eq!(
            block_status_descriptors(&extents, 8192, true),
            vec![(1024, 3)]
        );
        assert_eq!(
            block_status_descriptors(&extents, 1 << 20, false),
            vec![(1024, 3), (4096, 0), ((1 << 20) - 5120, 3)]
        );
        assert_eq!(block_status_descriptors(&[], 4096, false), vec![(4096, 0)]);
        let many: Vec<Extent> = (0..BLOCK_STATUS_EXTENTS_MAX * 2)
            .map(|i| e(1, i % 2 == 0, false))
            .collect();
        let shaped = block_status_descriptors(&many, u32::MAX, false);
        assert_eq!(shaped.len(), BLOCK_STATUS_EXTENTS_MAX);
    }

    const K: usize = 1024;

    fn data_chunk(start: usize, len: usize) -> ReadChunk {
        ReadChunk {
            start: start as u32,
            len: len as u32,
            hole: false,
        }
    }

    fn hole_chunk(start: usize, len: usize) -> ReadChunk {
        ReadChunk {
            start: start as u32,
            len: len as u32,
            hole: true,
        }
    }

    /// Data with `fill` bytes in each of the given (start, end) ranges, zeros elsewhere.
    fn image(len: usize, filled: &[(usize, usize, u8)]) -> Vec<u8> {
        let mut data = vec![0u8; len];
        for &(start, end, fill) in filled {
            data[start..end].fill(fill);
        }
        data
    }

    /// One structured chunk as read off the wire.
    #[derive(Debug, PartialEq, Eq)]
    struct WireChunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        payload: Vec<u8>,
    }

    fn parse_chunks(mut bytes: &[u8]) -> Vec<WireChunk> {
        let mut chunks = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(&bytes[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
            let len = u32::from_be_bytes(bytes[16..20].try_into().unwrap()) as usize;
            chunks.push(WireChunk {
                flags: u16::from_be_bytes([bytes[4], bytes[5]]),
                kind: u16::from_be_bytes([bytes[6], bytes[7]]),
                cookie: u64::from_be_bytes(bytes[8..16].try_into().unwrap()),
                payload: bytes[20..20 + len].to_vec(),
            });
            bytes = &bytes[20 + len..];
        }
        chunks
    }

    /// Rebuilds the data of a structured READ reply of `len` bytes at `offset` the
    /// way a client does, asserting the chunks do not overlap and cover the range
    /// and that only the last chunk is flagged DONE.
    fn reassemble(chunks: &[WireChunk], offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0x55u8; len];
        let mut covered = vec![false; len];
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            assert_eq!(chunk.flags, if last { REPLY_FLAG_DONE } else { 0 }, "{i}");
            let p = &chunk.payload;
            let at = (u64::from_be_bytes(p[0..8].try_into().unwrap()) - offset) as usize;
            let n = match chunk.kind {
                REPLY_TYPE_OFFSET_DATA => {
                    data[at..at + p.len() - 8].copy_from_slice(&p[8..]);
                    p.len() - 8
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    assert_eq!(p.len(), 12);
                    let n = u32::from_be_bytes(p[8..12].try_into().unwrap()) as usize;
                    data[at..at + n].fill(0);
                    n
                }
                other => panic!("chunk type {other}"),
            };
            assert!(n > 0);
            assert!(covered[at..at + n].iter().all(|c| !c), "overlap at {at}");
            covered[at..at + n].fill(true);
        }
        assert!(covered.iter().all(|&c| c), "range not covered");
        data
    }

    #[test]
    fn zero_detection_sees_every_byte() {
        for len in [0, 1, 15, 16, 63, 64, 65, 127, 128, 4096, 4097] {
            let zeros = vec![0u8; len];
            assert!(is_zero(&zeros), "{len}");
            for at in 0..len {
                let mut one = zeros.clone();
                one[at] = 0x80;
                assert!(!is_zero(&one), "len {len}, byte {at}");
            }
        }
        // Unaligned views of the same buffer.
        let mut buffer = vec![0u8; 300];
        buffer[299] = 1;
        for start in 0..17 {
            assert!(is_zero(&buffer[start..299]));
            assert!(!is_zero(&buffer[start..]));
        }
    }

    #[test]
    fn zero_runs_on_aligned_granules_become_holes() {
        let max = READ_CHUNKS_MAX;
        // Nothing to split: data only, or too short to hold a hole.
        assert_eq!(read_chunks(&[], 0, 1, max), vec![]);
        assert_eq!(
            read_chunks(&vec![7; 64 * K], 0, 1, max),
            vec![data_chunk(0, 64 * K)]
        );
        assert_eq!(
            read_chunks(&vec![0; 2 * K], 0, 512, max),
            vec![data_chunk(0, 2 * K)]
        );
        // All zero: one hole.
        assert_eq!(
            read_chunks(&vec![0; 64 * K], 1 << 30, 512, max),
            vec![hole_chunk(0, 64 * K)]
        );
        // data | hole | data | hole (at the end).
        let data = image(32 * K, &[(0, 4 * K, 1), (12 * K, 12 * K + 1, 2)]);
        assert_eq!(
            read_chunks(&data, 0, 1, max),
            vec![
                data_chunk(0, 4 * K),
                hole_chunk(4 * K, 8 * K),
                data_chunk(12 * K, 4 * K),
                hole_chunk(16 * K, 16 * K),
            ]
        );
        // A zero run not covering a whole granule stays data: [5K, 11K) is zero but
        // only the granule [8K, 12K) of it... is not whole zero either (11K..12K set).
        let data = image(16 * K, &[(0, 5 * K, 1), (11 * K, 16 * K, 2)]);
        assert_eq!(read_chunks(&data, 0, 1, max), vec![data_chunk(0, 16 * K)]);
        let data = image(16 * K, &[(0, 3 * K, 1), (13 * K, 16 * K, 2)]);
        assert_eq!(
            read_chunks(&data, 0, 1, max),
            vec![
                data_chunk(0, 4 * K),
                hole_chunk(4 * K, 8 * K),
                data_chunk(12 * K, 4 * K)
            ]
        );
    }

    #[test]
    fn granules_are_aligned_to_the_export_not_the_request() {
        // Request at 512: granule boundaries fall at relative 3.5K, 7.5K, ...
        let data = image(16 * K, &[(0, 512, 1), (12 * K, 12 * K + 512, 2)]);
        assert_eq!(
            read_chunks(&data, 512, 512, READ_CHUNKS_MAX),
            vec![
                data_chunk(0, 3 * K + 512),
                hole_chunk(3 * K + 512, 8 * K),
                data_chunk(11 * K + 512, 4 * K + 512),
            ]
        );
        // Zero pieces cut by the request's ends join a hole next to them.
        let data = image(9 * K, &[]);
        assert_eq!(
            read_chunks(&data, 3 * K as u64, 512, READ_CHUNKS_MAX),
            vec![hole_chunk(0, 9 * K)]
        );
        // ...but alone they are too short.
        assert_eq!(
            read_chunks(&vec![0; 1024], 3584, 512, READ_CHUNKS_MAX),
            vec![data_chunk(0, 1024)]
        );
    }

    #[test]
    fn a_large_minimum_block_size_sets_the_granule() {
        // Minimum block 64 KiB: a zero 4 KiB inside a 64 KiB block is no hole.
        let data = image(192 * K, &[(0, 60 * K, 1), (128 * K, 129 * K, 3)]);
        assert_eq!(
            read_chunks(&data, 0, 64 * K as u32, READ_CHUNKS_MAX),
            vec![
                data_chunk(0, 64 * K),
                hole_chunk(64 * K, 64 * K),
                data_chunk(128 * K, 64 * K)
            ]
        );
    }

    #[test]
    fn chunk_count_is_capped_keeping_the_largest_holes() {
        // 200 holes of 4 KiB between 4 KiB of data, and three larger holes.
        let mut filled: Vec<(usize, usize, u8)> = (0..400)
            .step_by(2)
            .map(|i| (i * 4 * K, i * 4 * K + 1, 9))
            .collect();
        filled.retain(|&(start, _, _)| ![40 * K, 48 * K, 400 * K, 408 * K].contains(&start));
        let data = image(1600 * K, &filled);
        let uncapped = read_chunks(&data, 0, 1, usize::MAX);
        assert!(uncapped.len() > 300, "{}", uncapped.len());
        for max in [3, 4, 5, 10, 63, 64, 65] {
            let chunks = read_chunks(&data, 0, 1, max);
            assert!(chunks.len() <= max, "{max}: {} chunks", chunks.len());
            assert!(covers_exactly(&chunks, data.len()));
            let holes: Vec<_> = chunks.iter().filter(|c| c.hole).collect();
            assert_eq!(holes.len(), (max - 1) / 2, "{max}");
            // The largest holes survive: [36K, 56K) and [396K, 416K) are 20 KiB.
            let big = [hole_chunk(36 * K, 20 * K), hole_chunk(396 * K, 20 * K)];
            let kept_big = holes.iter().filter(|h| big.contains(h)).count();
            assert_eq!(kept_big, holes.len().min(2), "{max}: {holes:?}");
        }
        let chunks = read_chunks(&data, 0, 1, 5);
        assert_eq!(
            chunks,
            vec![
                data_chunk(0, 36 * K),
                hole_chunk(36 * K, 20 * K),
                data_chunk(56 * K, 340 * K),
                hole_chunk(396 * K, 20 * K),
                data_chunk(416 * K, 1184 * K),
            ]
        );
        // DF: one data chunk however the data looks.
        for max in [0, 1, 2] {
            assert_eq!(
                read_chunks(&data, 0, 1, max),
                vec![data_chunk(0, data.len())]
            );
        }
    }

    #[test]
    fn structured_read_sends_data_and_hole_chunks_in_order() {
        let data = image(24 * K, &[(0, 8 * K, 0xa1), (20 * K, 24 * K, 0xb2)]);
        let chunks = read_chunks(&data, 4096, 1, READ_CHUNKS_MAX);
        assert_eq!(
            chunks,
            vec![
                data_chunk(0, 8 * K),
                hole_chunk(8 * K, 12 * K),
                data_chunk(20 * K, 4 * K)
            ]
        );
        let reply = Reply {
            cookie: 77,
            is_read: true,
            body: ReplyBody::Data {
                offset: 4096,
                data: data.clone(),
                chunks,
            },
        };
        let mut batch = ReplyBatch::default();
        batch.push(reply, true);
        // The 8 KiB data chunk is its own iovec into the buffer read; the 4 KiB one
        // is copied next to its header.
        let slices = batch.slices();
        assert_eq!(
            slices.len(),
            3,
            "{:?}",
            slices.iter().map(|s| s.len()).collect::<Vec<_>>()
        );
        assert_eq!(slices[1], &data[..8 * K]);
        let wire = slices.concat();
        assert_eq!(wire.len(), batch.bytes());
        assert_eq!(wire.len(), 3 * 20 + 8 + 8 * K + 12 + 8 + 4 * K);
        let parsed = parse_chunks(&wire);
        let kinds: Vec<(u16, u16, u64)> =
            parsed.iter().map(|c| (c.flags, c.kind, c.cookie)).collect();
        assert_eq!(
            kinds,
            vec![
                (0, REPLY_TYPE_OFFSET_DATA, 77),
                (0, REPLY_TYPE_OFFSET_HOLE, 77),
                (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 77)
            ]
        );
        assert_eq!(
            parsed[1].payload,
            [
                &(12288u64).to_be_bytes()[..],
                &(12 * K as u32).to_be_bytes()
            ]
            .concat()
        );
        assert_eq!(
            &parsed[2].payload[..8],
            &(4096 + 20 * K as u64).to_be_bytes()
        );
        assert_eq!(reassemble(&parsed, 4096, data.len()), data);
        // Simple replies ignore the chunks.
        let reply = Reply {
            cookie: 77,
            is_read: true,
            body: ReplyBody::Data {
                offset: 4096,
                data: data.clone(),
                chunks: read_chunks(&data, 4096, 1, READ_CHUNKS_MAX),
            },
        };
        assert_eq!(&encode(reply, false)[16..], &data[..]);
    }

    #[test]
    fn chunks_not_covering_the_data_fall_back_to_one_data_chunk() {
        let data = vec![0u8; 8 * K];
        let reply = Reply {
            cookie: 1,
            is_read: true,
            body: ReplyBody::Data {
                offset: 0,
                data: data.clone(),
                chunks: vec![hole_chunk(0, 4 * K)],
            },
        };
        let parsed = parse_chunks(&encode(reply, true));
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].kind, REPLY_TYPE_OFFSET_DATA);
    }

    /// Data made of runs of zeros and of filled bytes, and an offset, both aligned
    /// to a minimum block size.
    fn read_case() -> impl Strategy<Value = (Vec<u8>, u64, u32)> {
        let run = (
            prop_oneof![3 => Just(0u8), 1 => 1u8..=255],
            1usize..24,
            any::<bool>(),
        );
        (
            proptest::collection::vec(run, 0..24),
            prop_oneof![Just(1u32), Just(512), Just(4096), Just(8192), Just(65536)],
            0u64..1 << 40,
        )
            .prop_map(|(runs, min, offset)| {
                let mut data = Vec::new();
                for (fill, units, single) in runs {
                    let start = data.len();
                    data.resize(start + units * 512, 0);
                    if single {
                        // One non-zero byte somewhere in an otherwise zero run.
                        let at = start + (units * 512 - 1) * usize::from(fill) / 255;
                        data[at] = fill;
                    } else {
                        data[start..].fill(fill);
                    }
                }
                let min_usize = min as usize;
                data.resize(data.len().div_ceil(min_usize) * min_usize, 0);
                (data, offset / u64::from(min) * u64::from(min), min)
            })
    }

    proptest! {
        #[test]
        fn read_chunks_cover_the_range_in_order(
            (data, offset, min) in read_case(),
            max in prop_oneof![Just(usize::MAX), Just(READ_CHUNKS_MAX), 0usize..12],
        ) {
            let chunks = read_chunks(&data, offset, min, max);
            if data.is_empty() {
                prop_assert!(chunks.is_empty());
                return Ok(());
            }
            prop_assert!(covers_exactly(&chunks, data.len()), "{:?}", chunks);
            prop_assert!(chunks.len() <= max.max(1));
            let granule = u64::from(READ_HOLE_GRANULE_BYTES.max(min));
            for (i, chunk) in chunks.iter().enumerate() {
                prop_assert!(chunk.len > 0);
                let absolute = offset + u64::from(chunk.start);
                prop_assert_eq!(absolute % u64::from(min), 0, "chunk {:?} misaligned", chunk);
                if i > 0 {
                    // Inner boundaries are granule boundaries.
                    prop_assert_eq!(absolute % granule, 0, "boundary of {:?}", chunk);
                }
                if chunk.hole {
                    prop_assert!(is_zero(&data[chunk.range()]));
                    prop_assert!(chunk.len >= READ_HOLE_MIN_BYTES);
                    prop_assert!(i == 0 || !chunks[i - 1].hole, "adjacent holes");
                } else {
                    prop_assert!(i == 0 || chunks[i - 1].hole, "adjacent data chunks");
                }
            }
            if max == usize::MAX {
                // Uncapped, every whole zero granule is inside a hole.
                let holes: Vec<_> = chunks.iter().filter(|c| c.hole).map(|c| c.range()).collect();
                let first = (granule - offset % granule) % granule;
                let mut at = first as usize;
                while at + granule as usize <= data.len() {
                    let end = at + granule as usize;
                    if is_zero(&data[at..end]) {
                        prop_assert!(
                            holes.iter().any(|h| h.start <= at && end <= h.end),
                            "zero granule at {} not in a hole", at
                        );
                    }
                    at = end;
                }
            }
            // On the wire, the reply reassembles to the data.
            let reply = Reply {
                cookie: 5,
                is_read: true,
                body: ReplyBody::Data { offset, data: data.clone(), chunks },
            };
            let parsed = parse_chunks(&encode(reply, true));
            prop_assert_eq!(reassemble(&parsed, offset, data.len()), data);
        }
    }
}
