//! Reading and writing whole frames on an async stream, with the header's bounds checked
//! before any payload buffer is allocated.

use proto::frame::HEADER_LEN;
use proto::{FrameError, Header};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameReadError {
    #[error("connection closed")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Frame(#[from] FrameError),
}

/// Reads one frame. `Closed` when the peer closed cleanly between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<(Header, Vec<u8>), FrameReadError> {
    let mut hb = [0u8; HEADER_LEN];
    match r.read_exact(&mut hb).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(FrameReadError::Closed)
        }
        Err(e) => return Err(e.into()),
    }
    let header = Header::decode(&hb)?;
    // Read into spare capacity: a payload of up to an object is not zeroed first.
    let len = header.payload_len as usize;
    let mut payload = Vec::with_capacity(len);
    let got = (&mut *r).take(len as u64).read_to_end(&mut payload).await?;
    if got != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("frame payload cut short: {got} of {len} bytes"),
        )
        .into());
    }
    header.check_payload(&payload)?;
    Ok((header, payload))
}

/// Writes one frame; `header.payload_len`/`payload_crc` are set from `payload`. Does not flush.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut header: Header,
    payload: &[u8],
) -> std::io::Result<()> {
    header.seal(payload);
    w.write_all(&header.encode()).await?;
    w.write_all(payload).await
}
