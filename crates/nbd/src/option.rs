//! Handshake messages without I/O: parsing option data sent by the client and
//! encoding option replies. The async driver is in `handshake.rs`.

use bytes::{BufMut, BytesMut};

use crate::consts::*;

/// Why option data could not be parsed; sent back as `NBD_REP_ERR_INVALID`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionParseError {
    /// The data ends before a field it announces.
    #[error("option data truncated")]
    Truncated,
    /// Bytes are left after the last field.
    #[error("option data has {0} trailing bytes")]
    Trailing(usize),
    /// A string is longer than the protocol allows.
    #[error("string of {0} bytes is too long")]
    StringTooLong(usize),
    /// A string is not UTF-8.
    #[error("string is not valid UTF-8")]
    NotUtf8,
}

/// Data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name (empty: the default export).
    pub name: String,
    /// `NBD_INFO_*` items the client asked for.
    pub requests: Vec<u16>,
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export the contexts are for.
    pub export: String,
    /// Queries (e.g. `base:allocation`, or `base:` to list all of `base`).
    pub queries: Vec<String>,
}

/// A cursor over option data that never reads out of bounds.
struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], OptionParseError> {
        if self.data.len() < n {
            return Err(OptionParseError::Truncated);
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, OptionParseError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, OptionParseError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A string prefixed by its u32 length.
    fn string(&mut self) -> Result<String, OptionParseError> {
        let len = self.u32()? as usize;
        if len > STRING_MAX_BYTES {
            return Err(OptionParseError::StringTooLong(len));
        }
        parse_string(self.take(len)?)
    }

    fn finish(&self) -> Result<(), OptionParseError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(OptionParseError::Trailing(self.data.len()))
        }
    }
}

/// A protocol string: UTF-8, at most [`STRING_MAX_BYTES`].
pub fn parse_string(bytes: &[u8]) -> Result<String, OptionParseError> {
    if bytes.len() > STRING_MAX_BYTES {
        return Err(OptionParseError::StringTooLong(bytes.len()));
    }
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| OptionParseError::NotUtf8)
}

/// Parses the data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, OptionParseError> {
    let mut cursor = Cursor { data };
    let name = cursor.string()?;
    let count = cursor.u16()?;
    let mut requests = Vec::with_capacity(usize::from(count).min(cursor.data.len() / 2));
    for _ in 0..count {
        requests.push(cursor.u16()?);
    }
    cursor.finish()?;
    Ok(InfoRequest { name, requests })
}

/// Parses the data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
pub fn parse_meta_context_request(data: &[u8]) -> Result<MetaContextRequest, OptionParseError> {
    let mut cursor = Cursor { data };
    let export = cursor.string()?;
    let count = cursor.u32()?;
    // Each query takes at least 4 bytes, which bounds the allocation.
    let mut queries = Vec::with_capacity((count as usize).min(cursor.data.len() / 4));
    for _ in 0..count {
        queries.push(cursor.string()?);
    }
    cursor.finish()?;
    Ok(MetaContextRequest { export, queries })
}

/// Whether the queries select `base:allocation`. For LIST, no query or the `base:`
/// wildcard also match; for SET only the exact name does. Queries in other
/// namespaces are ignored, as the protocol requires.
pub fn queries_match_base_allocation(queries: &[String], listing: bool) -> bool {
    if listing && queries.is_empty() {
        return true;
    }
    queries
        .iter()
        .any(|q| q == META_BASE_ALLOCATION || (listing && q == "base:"))
}

/// Appends one option reply (`magic, option, type, length, data`).
pub fn put_option_reply(buf: &mut BytesMut, option: u32, reply_type: u32, data: &[u8]) {
    buf.reserve(20 + data.len());
    buf.put_u64(OPTION_REPLY_MAGIC);
    buf.put_u32(option);
    buf.put_u32(reply_type);
    buf.put_u32(data.len() as u32);
    buf.put_slice(data);
}

/// Appends an error reply carrying a message for humans (cut to a bounded length).
pub fn put_option_error(buf: &mut BytesMut, option: u32, reply_type: u32, message: &str) {
    debug_assert!(reply_type & (1 << 31) != 0, "not an error reply type");
    put_option_reply(
        buf,
        option,
        reply_type,
        truncate_message(message).as_bytes(),
    );
}

/// Appends `NBD_REP_SERVER` for one export of `NBD_OPT_LIST`.
pub fn put_rep_server(buf: &mut BytesMut, name: &str, description: &str) {
    let description = truncate_message(description);
    let mut data = Vec::with_capacity(4 + name.len() + description.len());
    data.extend_from_slice(&(name.len() as u32).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(description.as_bytes());
    put_option_reply(buf, OPT_LIST, REP_SERVER, &data);
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn put_info_export(buf: &mut BytesMut, option: u32, size: u64, flags: u16) {
    let mut data = [0u8; 12];
    data[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    data[2..10].copy_from_slice(&size.to_be_bytes());
    data[10..12].copy_from_slice(&flags.to_be_bytes());
    put_option_reply(buf, option, REP_INFO, &data);
}

/// Appends `NBD_REP_INFO` carrying a string (`NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`).
pub fn put_info_string(buf: &mut BytesMut, option: u32, info_type: u16, text: &str) {
    let mut data = Vec::with_capacity(2 + text.len());
    data.extend_from_slice(&info_type.to_be_bytes());
    data.extend_from_slice(text.as_bytes());
    put_option_reply(buf, option, REP_INFO, &data);
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn put_info_block_size(buf: &mut BytesMut, option: u32, sizes: BlockSizes) {
    let mut data = [0u8; 14];
    data[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    data[2..6].copy_from_slice(&sizes.minimum.to_be_bytes());
    data[6..10].copy_from_slice(&sizes.preferred.to_be_bytes());
    data[10..14].copy_from_slice(&sizes.maximum.to_be_bytes());
    put_option_reply(buf, option, REP_INFO, &data);
}

/// Appends `NBD_REP_META_CONTEXT`.
pub fn put_meta_context(buf: &mut BytesMut, option: u32, id: u32, name: &str) {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&id.to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    put_option_reply(buf, option, REP_META_CONTEXT, &data);
}

/// Block size constraints advertised for an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Alignment of every offset and length.
    pub minimum: u32,
    /// Size from which I/O is efficient.
    pub preferred: u32,
    /// Largest READ/WRITE payload.
    pub maximum: u32,
}

impl BlockSizes {
    /// Constraints for a device minimum block size and a configured maximum payload;
    /// `None` when the minimum is not a power of two up to 65536.
    pub fn new(device_minimum: u32, max_payload: u32) -> Option<Self> {
        if !device_minimum.is_power_of_two() || device_minimum > 65536 {
            return None;
        }
        let payload = max_payload.clamp(MAX_PAYLOAD_FLOOR_BYTES, MAX_PAYLOAD_CEILING_BYTES);
        Some(Self {
            minimum: device_minimum,
            preferred: PREFERRED_BLOCK_BYTES.max(device_minimum),
            // A multiple of the minimum, as the protocol requires.
            maximum: payload / device_minimum * device_minimum,
        })
    }
}

/// The capabilities that decide the transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportCaps {
    /// Device refuses writes.
    pub read_only: bool,
    /// Device is safe for multi-connection use.
    pub can_multi_conn: bool,
    /// Structured replies were negotiated on this connection.
    pub structured: bool,
}

/// Transmission flags advertised for an export.
pub fn transmission_flags(caps: ExportCaps) -> u16 {
    let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
    if caps.read_only {
        flags |= FLAG_READ_ONLY;
    } else {
        flags |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if caps.can_multi_conn {
        flags |= FLAG_CAN_MULTI_CONN;
    }
    if caps.structured {
        flags |= FLAG_SEND_DF;
    }
    flags
}

/// Cuts a message to [`ERROR_MESSAGE_MAX_BYTES`] on a character boundary.
pub fn truncate_message(message: &str) -> &str {
    if message.len() <= ERROR_MESSAGE_MAX_BYTES {
        return message;
    }
    let mut end = ERROR_MESSAGE_MAX_BYTES;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_data(name: &[u8], requests: &[u16]) -> Vec<u8> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name);
        data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            data.extend_from_slice(&r.to_be_bytes());
        }
        data
    }

    #[test]
    fn info_request_parses_name_and_requests() {
        let parsed =
            parse_info_request(&info_data(b"vdi0", &[INFO_BLOCK_SIZE, INFO_NAME])).unwrap();
        assert_eq!(parsed.name, "vdi0");
        assert_eq!(parsed.requests, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        let empty = parse_info_request(&info_data(b"", &[])).unwrap();
        assert_eq!(empty.name, "");
        assert!(empty.requests.is_empty());
    }

    #[test]
    fn info_request_rejects_malformed_data() {
        let mut data = info_data(b"vdi0", &[1]);
        data.push(0);
        assert_eq!(
            parse_info_request(&data),
            Err(OptionParseError::Trailing(1))
        );
        let data = info_data(b"vdi0", &[1, 2]);
        assert_eq!(
            parse_info_request(&data[..data.len() - 1]),
            Err(OptionParseError::Truncated)
        );
        let mut data = 100u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"short");
        assert_eq!(parse_info_request(&data), Err(OptionParseError::Truncated));
        assert_eq!(
            parse_info_request(&info_data(&[0xff, 0xfe], &[])),
            Err(OptionParseError::NotUtf8)
        );
        assert_eq!(parse_info_request(&[]), Err(OptionParseError::Truncated));
        let long = vec![b'a'; STRING_MAX_BYTES + 1];
        assert_eq!(
            parse_info_request(&info_data(&long, &[])),
            Err(OptionParseError::StringTooLong(STRING_MAX_BYTES + 1))
        );
    }

    fn meta_data(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            data.extend_from_slice(&(q.len() as u32).to_be_bytes());
            data.extend_from_slice(q.as_bytes());
        }
        data
    }

    #[test]
    fn meta_context_request_parses_and_matches() {
        let req = parse_meta_context_request(&meta_data("e", &["base:allocation", "qemu:dirty"]))
            .unwrap();
        assert_eq!(req.export, "e");
        assert_eq!(req.queries.len(), 2);
        assert!(queries_match_base_allocation(&req.queries, false));
        assert!(queries_match_base_allocation(&[], true));
        assert!(!queries_match_base_allocation(&[], false));
        assert!(queries_match_base_allocation(&["base:".into()], true));
        assert!(!queries_match_base_allocation(&["base:".into()], false));
        assert!(!queries_match_base_allocation(
            &["qemu:allocation-depth".into()],
            true
        ));
    }

    #[test]
    fn meta_context_request_with_huge_count_fails_without_allocating() {
        let mut data = meta_data("e", &[]);
        let n = data.len();
        data[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            parse_meta_context_request(&data),
            Err(OptionParseError::Truncated)
        );
    }

    #[test]
    fn option_reply_encoding_is_exact() {
        let mut buf = BytesMut::new();
        put_info_export(&mut buf, OPT_GO, 0x1122_3344_5566_7788, 0x0abc);
        let expected: Vec<u8> = [
            &OPTION_REPLY_MAGIC.to_be_bytes()[..],
            &OPT_GO.to_be_bytes(),
            &REP_INFO.to_be_bytes(),
            &12u32.to_be_bytes(),
            &INFO_EXPORT.to_be_bytes(),
            &0x1122_3344_5566_7788u64.to_be_bytes(),
            &0x0abcu16.to_be_bytes(),
        ]
        .concat();
        assert_eq!(&buf[..], &expected[..]);

        let mut buf = BytesMut::new();
        put_rep_server(&mut buf, "ab", "desc");
        assert_eq!(&buf[16..20], &10u32.to_be_bytes());
        assert_eq!(&buf[20..], b"\0\0\0\x02abdesc");
    }

    #[test]
    fn block_sizes_follow_protocol_rules() {
        let sizes = BlockSizes::new(512, 32 << 20).unwrap();
        assert_eq!(
            sizes,
            BlockSizes {
                minimum: 512,
                preferred: 4096,
                maximum: 32 << 20
            }
        );
        assert_eq!(
            BlockSizes::new(1, 10).unwrap().maximum,
            MAX_PAYLOAD_FLOOR_BYTES
        );
        assert_eq!(
            BlockSizes::new(65536, u32::MAX).unwrap().maximum,
            MAX_PAYLOAD_CEILING_BYTES
        );
        assert!(BlockSizes::new(3, 1 << 20).is_none());
        assert!(BlockSizes::new(0, 1 << 20).is_none());
        assert!(BlockSizes::new(1 << 17, 1 << 20).is_none());
    }

    #[test]
    fn transmission_flags_depend_on_caps() {
        let rw = transmission_flags(ExportCaps {
            read_only: false,
            can_multi_conn: true,
            structured: true,
        });
        assert_ne!(rw & FLAG_SEND_TRIM, 0);
        assert_ne!(rw & FLAG_SEND_DF, 0);
        assert_ne!(rw & FLAG_CAN_MULTI_CONN, 0);
        assert_eq!(rw & FLAG_READ_ONLY, 0);
        let ro = transmission_flags(ExportCaps {
            read_only: true,
            can_multi_conn: false,
            structured: false,
        });
        assert_ne!(ro & FLAG_READ_ONLY, 0);
        assert_eq!(
            ro & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_DF | FLAG_CAN_MULTI_CONN),
            0
        );
    }

    proptest::proptest! {
        #[test]
        fn parsing_random_option_data_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)) {
            let _ = parse_info_request(&data);
            let _ = parse_meta_context_request(&data);
            let _ = parse_string(&data);
        }
    }

    #[test]
    fn truncate_message_respects_char_boundaries() {
        let text = "é".repeat(ERROR_MESSAGE_MAX_BYTES);
        let cut = truncate_message(&text);
        assert!(cut.len() <= ERROR_MESSAGE_MAX_BYTES);
        assert!(cut.len() >= ERROR_MESSAGE_MAX_BYTES - 1);
    }
}
