//! Transmission replies: what a request produced ([`Reply`]), its wire encoding
//! (simple or structured) gathered into batches of iovecs, the vectored write of a
//! batch, and the shaping of device extents into a BLOCK_STATUS answer.

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
    Data { offset: u64, data: Vec<u8> },
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

/// One piece of a batch: a range of the inline buffer or a whole payload.
#[derive(Debug, Clone, Copy)]
enum Segment {
    Inline { start: usize, end: usize },
    Payload(usize),
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
        let end = self.inline.len();
        match self.segments.last_mut() {
            Some(Segment::Inline { end: last_end, .. }) if *last_end == start => *last_end = end,
            _ => self.segments.push(Segment::Inline { start, end }),
        }
        self.bytes += bytes.len();
    }

    fn push_payload(&mut self, payload: Vec<u8>) {
        if payload.len() <= REPLY_INLINE_PAYLOAD_MAX_BYTES {
            self.push_inline(&payload);
        } else {
            self.bytes += payload.len();
            self.segments.push(Segment::Payload(self.payloads.len()));
            self.payloads.push(payload);
        }
    }

    /// The queued bytes in order, ready for a vectored write.
    pub fn slices(&self) -> Vec<&[u8]> {
        self.segments
            .iter()
            .map(|segment| match *segment {
                Segment::Inline { start, end } => &self.inline[start..end],
                Segment::Payload(index) => &self.payloads[index][..],
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
            ReplyBody::Done if reply.is_read => self.chunk_header(cookie, REPLY_TYPE_NONE, 0),
            ReplyBody::Done => self.simple(cookie, 0),
            ReplyBody::Data { data, .. } if data.is_empty() => {
                self.chunk_header(cookie, REPLY_TYPE_NONE, 0)
            }
            ReplyBody::Data { offset, data } => {
                self.chunk_header(cookie, REPLY_TYPE_OFFSET_DATA, 8 + data.len() as u32);
                self.push_inline(&offset.to_be_bytes());
                self.push_payload(data);
            }
            ReplyBody::BlockStatus(descriptors) => {
                let length = 4 + 8 * descriptors.len() as u32;
                self.chunk_header(cookie, REPLY_TYPE_BLOCK_STATUS, length);
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
                self.chunk_header(cookie, REPLY_TYPE_ERROR, 6 + message.len() as u32);
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

    /// Every chunk this server sends is the only, final chunk of its reply.
    fn chunk_header(&mut self, cookie: u64, chunk_type: u16, length: u32) {
        let mut header = [0u8; STRUCTURED_REPLY_HEADER_BYTES];
        header[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        header[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
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
            body: ReplyBody::Data { offset: 4096, data },
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
    fn structured_read_is_one_offset_data_chunk() {
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
}
