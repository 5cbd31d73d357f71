//! The handshake phase (fixed newstyle only): greeting, client flags, then options
//! until the client enters transmission (`NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME`),
//! aborts, or breaks the protocol. Every read, write and provider call is bounded by
//! one deadline so idle or garbage connections go away.

use std::future::Future;
use std::io;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use crate::consts::*;
use crate::device::{BlockDevice, ExportProvider, OpenError};
use crate::option::*;
use crate::request::ExportParams;
use crate::wait_shutdown;

/// The outcome of a successful handshake: the export to serve and how.
pub(crate) struct Negotiated {
    /// The opened export; the caller must `close()` it when done.
    pub device: Arc<dyn BlockDevice>,
    /// Name the client selected.
    pub export_name: String,
    /// What requests are validated against.
    pub params: ExportParams,
}

/// Options that change negotiation state.
#[derive(Default)]
struct State {
    no_zeroes: bool,
    structured: bool,
    /// Export for which the last SET_META_CONTEXT selected `base:allocation`.
    meta_export: Option<String>,
}

/// What one option led to.
enum Step {
    Continue,
    Transmission(Negotiated),
    Close,
}

fn protocol_error(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// Runs `future` unless the deadline passes first.
async fn by<T>(deadline: Instant, future: impl Future<Output = T>) -> io::Result<T> {
    tokio::time::timeout_at(deadline, future)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))
}

/// The handshake driver for one connection.
pub(crate) struct Handshake<'a, R, W> {
    pub reader: &'a mut R,
    pub writer: &'a mut W,
    pub provider: &'a dyn ExportProvider,
    pub max_payload: u32,
    pub shutdown: watch::Receiver<bool>,
    pub deadline: Instant,
}

impl<R, W> Handshake<'_, R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// Negotiates; `Ok(None)` when the client aborted or must be disconnected
    /// without an I/O error.
    pub async fn run(mut self) -> io::Result<Option<Negotiated>> {
        let mut greeting = BytesMut::with_capacity(18);
        greeting.put_u64(NBDMAGIC);
        greeting.put_u64(IHAVEOPT);
        greeting.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        self.send(&greeting).await?;
        let mut client_flags = [0u8; 4];
        if !self.receive(&mut client_flags).await? {
            return Ok(None);
        }
        let client_flags = u32::from_be_bytes(client_flags);
        if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(protocol_error(format!(
                "unknown client flags {client_flags:#x}"
            )));
        }
        let mut state = State {
            no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
            ..State::default()
        };
        loop {
            let mut header = [0u8; 16];
            if !self.receive(&mut header).await? {
                return Ok(None);
            }
            let magic = u64::from_be_bytes(header[0..8].try_into().unwrap_or_default());
            let option = u32::from_be_bytes(header[8..12].try_into().unwrap_or_default());
            let length = u32::from_be_bytes(header[12..16].try_into().unwrap_or_default());
            if magic != IHAVEOPT {
                return Err(protocol_error(format!("bad option magic {magic:#x}")));
            }
            if length > OPTION_DATA_MAX_BYTES {
                // Skipping up to 4 GiB is not worth it: say why, then close.
                if option != OPT_EXPORT_NAME {
                    let mut reply = BytesMut::new();
                    put_option_error(&mut reply, option, REP_ERR_TOO_BIG, "option data too long");
                    self.send(&reply).await?;
                }
                return Err(protocol_error(format!(
                    "option {option} data of {length} bytes"
                )));
            }
            let mut data = vec![0u8; length as usize];
            by(self.deadline, self.reader.read_exact(&mut data)).await??;
            debug!(option, length, "option");
            match self.option(&mut state, option, &data).await? {
                Step::Continue => {}
                Step::Transmission(negotiated) => return Ok(Some(negotiated)),
                Step::Close => return Ok(None),
            }
        }
    }

    /// Reads exactly `buf.len()` bytes; `false` if the server began shutting down
    /// first (the client is then disconnected).
    async fn receive(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            biased;
            _ = wait_shutdown(&mut shutdown) => Ok(false),
            read = by(self.deadline, self.reader.read_exact(buf)) => read?.map(|_| true),
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        by(self.deadline, async {
            self.writer.write_all(bytes).await?;
            self.writer.flush().await
        })
        .await?
    }

    async fn reply_error(
        &mut self,
        option: u32,
        reply_type: u32,
        message: &str,
    ) -> io::Result<Step> {
        let mut reply = BytesMut::new();
        put_option_error(&mut reply, option, reply_type, message);
        self.send(&reply).await?;
        Ok(Step::Continue)
    }

    async fn reply_ack(&mut self, option: u32) -> io::Result<Step> {
        let mut reply = BytesMut::new();
        put_option_reply(&mut reply, option, REP_ACK, &[]);
        self.send(&reply).await?;
        Ok(Step::Continue)
    }

    async fn option(&mut self, state: &mut State, option: u32, data: &[u8]) -> io::Result<Step> {
        if *self.shutdown.borrow() && option != OPT_ABORT {
            return self
                .reply_error(option, REP_ERR_SHUTDOWN, "server shutting down")
                .await;
        }
        match option {
            OPT_EXPORT_NAME => self.export_name(state, data).await,
            OPT_ABORT => {
                // The client may already be gone; its ACK is a courtesy.
                let _ = self.reply_ack(option).await;
                Ok(Step::Close)
            }
            OPT_LIST if !data.is_empty() => {
                self.reply_error(option, REP_ERR_INVALID, "LIST takes no data")
                    .await
            }
            OPT_LIST => self.list().await,
            OPT_INFO | OPT_GO => self.info_or_go(state, option, data).await,
            OPT_STRUCTURED_REPLY if !data.is_empty() => {
                self.reply_error(option, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
                    .await
            }
            OPT_STRUCTURED_REPLY => {
                state.structured = true;
                self.reply_ack(option).await
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(state, option, data).await
            }
            _ => {
                self.reply_error(option, REP_ERR_UNSUP, "option not supported")
                    .await
            }
        }
    }

    async fn list(&mut self) -> io::Result<Step> {
        let exports = by(self.deadline, self.provider.list()).await?;
        let mut reply = BytesMut::new();
        for export in exports.iter().filter(|e| e.name.len() <= STRING_MAX_BYTES) {
            put_rep_server(&mut reply, &export.name, &export.description);
        }
        put_option_reply(&mut reply, OPT_LIST, REP_ACK, &[]);
        self.send(&reply).await?;
        Ok(Step::Continue)
    }

    async fn meta_context(
        &mut self,
        state: &mut State,
        option: u32,
        data: &[u8],
    ) -> io::Result<Step> {
        let setting = option == OPT_SET_META_CONTEXT;
        if setting {
            // SET replaces the selection, even when it fails.
            state.meta_export = None;
        }
        if !state.structured {
            return self
                .reply_error(
                    option,
                    REP_ERR_INVALID,
                    "negotiate structured replies first",
                )
                .await;
        }
        let request = match parse_meta_context_request(data) {
            Ok(request) => request,
            Err(e) => {
                return self
                    .reply_error(option, REP_ERR_INVALID, &e.to_string())
                    .await
            }
        };
        let mut reply = BytesMut::new();
        if queries_match_base_allocation(&request.queries, !setting) {
            let id = if setting { META_BASE_ALLOCATION_ID } else { 0 };
            put_meta_context(&mut reply, option, id, META_BASE_ALLOCATION);
            if setting {
                state.meta_export = Some(request.export);
            }
        }
        put_option_reply(&mut reply, option, REP_ACK, &[]);
        self.send(&reply).await?;
        Ok(Step::Continue)
    }

    /// Opens an export and checks what it advertises; on failure returns the
    /// option error to send.
    async fn open(
        &mut self,
        name: &str,
    ) -> io::Result<Result<(Arc<dyn BlockDevice>, BlockSizes), (u32, String)>> {
        let opened = by(self.deadline, self.provider.open(name, true)).await?;
        let device = match opened {
            Ok(device) => device,
            Err(OpenError::Unknown) => {
                return Ok(Err((REP_ERR_UNKNOWN, format!("no export named {name:?}"))))
            }
            Err(OpenError::Policy(message)) => return Ok(Err((REP_ERR_POLICY, message))),
            Err(OpenError::Other(message)) => return Ok(Err((REP_ERR_UNKNOWN, message))),
        };
        match BlockSizes::new(device.min_block_size(), self.max_payload) {
            Some(sizes) => Ok(Ok((device, sizes))),
            None => {
                device.close().await;
                let message = format!("export {name:?} has an invalid minimum block size");
                Ok(Err((REP_ERR_PLATFORM, message)))
            }
        }
    }

    fn negotiated(
        state: &State,
        name: String,
        device: Arc<dyn BlockDevice>,
        sizes: BlockSizes,
    ) -> Negotiated {
        let params = ExportParams {
            size: device.size(),
            block_sizes: sizes,
            read_only: device.read_only(),
            structured: state.structured,
            base_allocation: state.structured
                && state.meta_export.as_deref() == Some(name.as_str()),
        };
        Negotiated {
            device,
            export_name: name,
            params,
        }
    }

    fn flags(state: &State, device: &dyn BlockDevice) -> u16 {
        transmission_flags(ExportCaps {
            read_only: device.read_only(),
            can_multi_conn: device.can_multi_conn(),
            structured: state.structured,
        })
    }

    async fn info_or_go(
        &mut self,
        state: &mut State,
        option: u32,
        data: &[u8],
    ) -> io::Result<Step> {
        let request = match parse_info_request(data) {
            Ok(request) => request,
            Err(e) => {
                return self
                    .reply_error(option, REP_ERR_INVALID, &e.to_string())
                    .await
            }
        };
        let (device, sizes) = match self.open(&request.name).await? {
            Ok(opened) => opened,
            Err((reply_type, message)) => {
                return self.reply_error(option, reply_type, &message).await
            }
        };
        let mut reply = BytesMut::new();
        put_info_export(
            &mut reply,
            option,
            device.size(),
            Self::flags(state, device.as_ref()),
        );
        if request.requests.contains(&INFO_NAME) {
            put_info_string(&mut reply, option, INFO_NAME, &request.name);
        }
        if request.requests.contains(&INFO_DESCRIPTION) {
            let description = by(self.deadline, self.provider.description(&request.name)).await;
            match description {
                Ok(Some(text)) if !text.is_empty() => put_info_string(
                    &mut reply,
                    option,
                    INFO_DESCRIPTION,
                    truncate_message(&text),
                ),
                Ok(_) => {}
                Err(e) => {
                    device.close().await;
                    return Err(e);
                }
            }
        }
        // Sent even when not requested (allowed): clients that asked must obey it,
        // and the server enforces it on every client anyway.
        put_info_block_size(&mut reply, option, sizes);
        put_option_reply(&mut reply, option, REP_ACK, &[]);
        let sent = self.send(&reply).await;
        if option == OPT_INFO || sent.is_err() {
            device.close().await;
            sent?;
            return Ok(Step::Continue);
        }
        Ok(Step::Transmission(Self::negotiated(
            state,
            request.name,
            device,
            sizes,
        )))
    }

    async fn export_name(&mut self, state: &mut State, data: &[u8]) -> io::Result<Step> {
        // This option cannot fail politely: any problem closes the connection.
        let name = parse_string(data).map_err(|e| protocol_error(e.to_string()))?;
        let (device, sizes) = match self.open(&name).await? {
            Ok(opened) => opened,
            Err((_, message)) => {
                debug!(%message, "EXPORT_NAME refused");
                return Ok(Step::Close);
            }
        };
        let mut reply = BytesMut::with_capacity(134);
        reply.put_u64(device.size());
        reply.put_u16(Self::flags(state, device.as_ref()));
        if !state.no_zeroes {
            reply.put_bytes(0, 124);
        }
        if let Err(e) = self.send(&reply).await {
            device.close().await;
            return Err(e);
        }
        Ok(Step::Transmission(Self::negotiated(
            state, name, device, sizes,
        )))
    }
}
