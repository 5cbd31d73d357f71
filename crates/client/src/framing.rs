//! Reading and writing whole frames on an async stream, with the header's bounds checked
//! before any payload buffer is allocated.

use crate::payload::Payload;
use proto::frame::HEADER_LEN;
use proto::sums::block_crcs;
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
    let (header, payload) = read_unchecked(r).await?;
    header.check_payload(&payload)?;
    Ok((header, payload))
}

/// [`read_frame`], keeping the checksums: a payload of whole 4 KiB blocks is checked
/// through the crcs of its blocks, which come back with it (a store's block tags), so
/// the payload is read through once.
pub async fn read_frame_summed<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<(Header, Payload), FrameReadError> {
    let (header, payload) = read_unchecked(r).await?;
    let Some(blocks) = block_crcs(&payload) else {
        header.check_payload(&payload)?;
        return Ok((header, Payload::from(payload)));
    };
    let summed = Payload::with_sums(payload.into(), blocks);
    if summed.crc() != header.payload_crc {
        return Err(FrameError::PayloadChecksum.into());
    }
    Ok((header, summed))
}

/// The header (validated) and the payload it announces, not yet checked against its crc.
async fn read_unchecked<R: AsyncRead + Unpin>(
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

/// Writes one frame carrying `payload`, with its crc computed at most once. Does not
/// flush.
pub async fn write_payload_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut header: Header,
    payload: &Payload,
) -> std::io::Result<()> {
    header.payload_len = payload.len() as u32;
    header.payload_crc = payload.crc();
    w.write_all(&header.encode()).await?;
    w.write_all(payload).await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn frame(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, Header::default(), payload)
            .await
            .expect("to memory");
        out
    }

    #[tokio::test]
    async fn summed_reads_check_whole_blocks_through_their_crcs() {
        for len in [0usize, 100, 4096, 3 * 4096] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let bytes = frame(&data).await;
            let (h, p) = read_frame_summed(&mut &bytes[..]).await.expect("intact");
            assert_eq!(h.payload_len as usize, len);
            assert_eq!(&p[..], &data[..]);
            assert_eq!(
                p.block_crcs().map(<[u32]>::len),
                (len > 0 && len % 4096 == 0).then_some(len / 4096)
            );
            // One flipped bit anywhere in the payload is refused, as by `read_frame`.
            if len > 0 {
                let mut bad = bytes.clone();
                let at = HEADER_LEN + len / 2;
                bad[at] ^= 0x10;
                assert!(matches!(
                    read_frame_summed(&mut &bad[..]).await,
                    Err(FrameReadError::Frame(FrameError::PayloadChecksum))
                ));
                assert!(matches!(
                    read_frame(&mut &bad[..]).await,
                    Err(FrameReadError::Frame(FrameError::PayloadChecksum))
                ));
            }
        }
    }

    #[tokio::test]
    async fn a_presummed_payload_is_sealed_like_a_plain_one() {
        let data: bytes::Bytes = (0..8192u32)
            .map(|i| (i * 13) as u8)
            .collect::<Vec<_>>()
            .into();
        let mut a = Vec::new();
        write_payload_frame(&mut a, Header::default(), &Payload::summed(data.clone()))
            .await
            .expect("to memory");
        assert_eq!(a, frame(&data).await);
    }
}
