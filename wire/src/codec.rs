//! Frames: the one place where messages become bytes and bytes become messages.
//!
//! A frame is a 4-byte big-endian payload length followed by the payload: one serde
//! message encoded with bincode 2.0.1 (standard configuration: little-endian,
//! variable-length integers). Swapping the encoding means changing this module only.
//!
//! Every read is bounded: the length is checked against the caller's limit
//! ([`DEFAULT_FRAME_LIMIT`] unless a protocol says otherwise) before any payload is
//! read or allocated, and the payload must decode to exactly one message with no
//! trailing bytes. Malformed, truncated or oversized input is a [`FrameError`],
//! never a panic.
//!
//! Frames carry control messages. Bulk bytes (blobs) are not framed: a message
//! announces their length and the bytes follow raw on the same stream, copied in
//! chunks of [`CHUNK`] bytes by [`copy_exact`], so a large blob never has to sit
//! in memory whole. Once a frame or a transfer has started, every read must make
//! progress within [`STALL_TIMEOUT`]; a payload buffer grows as bytes arrive, and
//! [`read_frame_within`] counts frames in flight against a server-wide budget.
//!
//! The same encoding serves records kept on disk by a component (the shell's
//! installed state): [`encode_record`] and [`decode_record`] turn a plain serde
//! value into bytes and back with the payload format and the bounds of a frame,
//! without the length prefix, so stored records too change encoding only here.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, SemaphorePermit};

/// Largest frame payload accepted unless a protocol sets another limit: 16 MiB.
pub const DEFAULT_FRAME_LIMIT: usize = 16 << 20;

/// Size of the chunks bulk bytes are copied in.
pub const CHUNK: usize = 256 << 10;

/// Once a frame's payload or a bulk transfer has started, each read must make
/// progress within this time, so a peer cannot hold a half-sent frame (and the
/// memory behind it) for ever.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a frame cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The frame announces more bytes than the limit.
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// The announced payload length.
        len: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The stream ended inside a frame or a bulk transfer.
    #[error("stream ended after {got} of {expected} bytes")]
    Truncated {
        /// Bytes expected.
        expected: u64,
        /// Bytes received.
        got: u64,
    },
    /// The payload is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The payload decodes but leaves bytes unread.
    #[error("message has {0} trailing bytes")]
    TrailingBytes(usize),
    /// The message cannot be encoded (a serde error in our own types).
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// The stream failed.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
    /// The peer stopped sending in the middle of a frame or a transfer.
    #[error("the peer sent nothing for {0:?} in the middle of a transfer")]
    Stalled(Duration),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Decoding also caps what one message may claim to allocate: a length field
/// inside a small frame must not make the decoder reserve gigabytes (found by the
/// `frame` fuzz target: a 20-byte frame asked for 72 PB and aborted the process).
fn decode_config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<DEFAULT_FRAME_LIMIT>,
> {
    bincode::config::standard().with_limit::<DEFAULT_FRAME_LIMIT>()
}

/// Encodes a plain record (a value kept on disk, not sent) to the bytes of a
/// frame's payload. A record over [`DEFAULT_FRAME_LIMIT`] is refused
/// ([`FrameError::TooLarge`]): [`decode_record`] could not read it back.
pub fn encode_record<T: Serialize>(record: &T) -> Result<Vec<u8>, FrameError> {
    let bytes = bincode::serde::encode_to_vec(record, config())
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    if bytes.len() > DEFAULT_FRAME_LIMIT {
        return Err(FrameError::TooLarge {
            len: bytes.len(),
            limit: DEFAULT_FRAME_LIMIT,
        });
    }
    Ok(bytes)
}

/// Decodes a record written by [`encode_record`], bounded like a frame: more
/// than [`DEFAULT_FRAME_LIMIT`] bytes are refused before decoding, nothing
/// inside may claim more memory than that, and the bytes must hold exactly one
/// record. Corrupt bytes are a [`FrameError`], never a panic.
pub fn decode_record<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    if bytes.len() > DEFAULT_FRAME_LIMIT {
        return Err(FrameError::TooLarge {
            len: bytes.len(),
            limit: DEFAULT_FRAME_LIMIT,
        });
    }
    decode_payload(bytes)
}

/// Encodes `msg` as a whole frame: length prefix and payload.
pub fn encode_frame<T: Serialize>(msg: &T, limit: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; 4];
    bincode::serde::encode_into_std_write(msg, &mut out, config())
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = out.len() - 4;
    if len > limit {
        return Err(FrameError::TooLarge { len, limit });
    }
    let prefix = u32::try_from(len).map_err(|_| FrameError::TooLarge { len, limit })?;
    out[..4].copy_from_slice(&prefix.to_be_bytes());
    Ok(out)
}

/// Decodes one frame payload (without its length prefix) into a message.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (msg, used) = bincode::serde::decode_from_slice(payload, decode_config())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != payload.len() {
        return Err(FrameError::TrailingBytes(payload.len() - used));
    }
    Ok(msg)
}

/// Decodes one whole frame (length prefix and payload) from the start of `bytes`;
/// returns the message and how many bytes it used. The pure counterpart of
/// [`read_frame`], used by the fuzz target.
pub fn decode_frame<T: DeserializeOwned>(
    bytes: &[u8],
    limit: usize,
) -> Result<(T, usize), FrameError> {
    let header: [u8; 4] =
        bytes
            .get(..4)
            .and_then(|h| h.try_into().ok())
            .ok_or(FrameError::Truncated {
                expected: 4,
                got: bytes.len() as u64,
            })?;
    let len = u32::from_be_bytes(header) as usize;
    if len > limit {
        return Err(FrameError::TooLarge { len, limit });
    }
    let payload = bytes.get(4..4 + len).ok_or(FrameError::Truncated {
        expected: len as u64,
        got: (bytes.len() - 4) as u64,
    })?;
    Ok((decode_payload(payload)?, 4 + len))
}

/// Writes `msg` as one frame.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let frame = encode_frame(msg, DEFAULT_FRAME_LIMIT)?;
    w.write_all(&frame).await?;
    Ok(())
}

/// Reads one frame of at most `limit` payload bytes and decodes it.
///
/// Returns `Ok(None)` when the stream ends cleanly before a frame starts. The
/// payload buffer grows as bytes arrive: a header alone reserves nothing.
pub async fn read_frame<R, T>(r: &mut R, limit: usize) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let Some(len) = read_header(r, limit).await? else {
        return Ok(None);
    };
    read_payload(r, len).await.map(Some)
}

/// Like [`read_frame`], but first takes the payload's size (in KiB) from `budget`,
/// waiting if the budget is spent, so all frames in flight on a server together
/// stay within it. The permit is returned with the message; drop it when done.
pub async fn read_frame_within<'b, R, T>(
    r: &mut R,
    limit: usize,
    budget: &'b Semaphore,
) -> Result<Option<(T, SemaphorePermit<'b>)>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let Some(len) = read_header(r, limit).await? else {
        return Ok(None);
    };
    let permit = acquire(budget, len as u64).await?;
    let msg = read_payload(r, len).await?;
    Ok(Some((msg, permit)))
}

/// Takes `bytes` (rounded up to KiB) from `budget`.
pub async fn acquire(budget: &Semaphore, bytes: u64) -> Result<SemaphorePermit<'_>, FrameError> {
    let kib = u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX);
    budget
        .acquire_many(kib)
        .await
        .map_err(|_| FrameError::Io(std::io::Error::other("the server is shutting down")))
}

/// Reads a frame header; `None` on a clean end of stream.
async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    limit: usize,
) -> Result<Option<usize>, FrameError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        let n = r.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated {
                    expected: 4,
                    got: got as u64,
                })
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > limit {
        return Err(FrameError::TooLarge { len, limit });
    }
    Ok(Some(len))
}

/// Reads and decodes a payload of `len` bytes, growing the buffer as bytes arrive.
async fn read_payload<R, T>(r: &mut R, len: usize) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut payload = Vec::with_capacity(len.min(64 << 10));
    let mut chunk = vec![0u8; len.clamp(1, 64 << 10)];
    while payload.len() < len {
        let want = chunk.len().min(len - payload.len());
        let n = tokio::time::timeout(STALL_TIMEOUT, r.read(&mut chunk[..want]))
            .await
            .map_err(|_| FrameError::Stalled(STALL_TIMEOUT))??;
        if n == 0 {
            return Err(FrameError::Truncated {
                expected: len as u64,
                got: payload.len() as u64,
            });
        }
        payload.extend_from_slice(&chunk[..n]);
    }
    decode_payload(&payload)
}

/// Reads a frame that must be there: a clean end of stream is [`FrameError::Truncated`].
pub async fn expect_frame<R, T>(r: &mut R, limit: usize) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame(r, limit).await?.ok_or(FrameError::Truncated {
        expected: 4,
        got: 0,
    })
}

/// Copies exactly `len` raw bytes from `src` to `dst` in [`CHUNK`]-sized pieces,
/// calling `inspect` on each (to hash it, count it, show progress).
pub async fn copy_exact<R, W>(
    src: &mut R,
    dst: &mut W,
    len: u64,
    mut inspect: impl FnMut(&[u8]),
) -> Result<(), FrameError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK.min(usize::try_from(len).unwrap_or(CHUNK)).max(1)];
    let mut done = 0u64;
    while done < len {
        let want = buf
            .len()
            .min(usize::try_from(len - done).unwrap_or(buf.len()));
        let n = src.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(FrameError::Truncated {
                expected: len,
                got: done,
            });
        }
        inspect(&buf[..n]);
        dst.write_all(&buf[..n]).await?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Msg {
        Ping(u64),
        Text(String),
        Blob(Vec<u8>),
    }

    async fn read_all(bytes: &[u8], limit: usize) -> Vec<Result<Option<Msg>, String>> {
        let mut r = bytes;
        let mut out = Vec::new();
        loop {
            let res = read_frame::<_, Msg>(&mut r, limit).await;
            let stop = !matches!(res, Ok(Some(_)));
            out.push(res.map_err(|e| e.to_string()));
            if stop {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn frames_round_trip_back_to_back() {
        let mut buf = Vec::new();
        for m in [
            Msg::Ping(7),
            Msg::Text("héllo".into()),
            Msg::Blob(vec![1; 1000]),
        ] {
            write_frame(&mut buf, &m).await.unwrap();
        }
        let got = read_all(&buf, DEFAULT_FRAME_LIMIT).await;
        assert_eq!(
            got,
            vec![
                Ok(Some(Msg::Ping(7))),
                Ok(Some(Msg::Text("héllo".into()))),
                Ok(Some(Msg::Blob(vec![1; 1000]))),
                Ok(None),
            ]
        );
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_before_reading() {
        let frame = encode_frame(&Msg::Blob(vec![0; 100]), DEFAULT_FRAME_LIMIT).unwrap();
        let mut r = &frame[..];
        let err = read_frame::<_, Msg>(&mut r, 50).await.unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { limit: 50, .. }),
            "{err}"
        );
        // A header claiming 4 GiB with nothing behind it fails without allocating.
        let mut r = &[0xff, 0xff, 0xff, 0xff][..];
        assert!(matches!(
            read_frame::<_, Msg>(&mut r, DEFAULT_FRAME_LIMIT).await,
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            encode_frame(&Msg::Blob(vec![0; 100]), 10),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn truncated_and_malformed_frames_are_typed_errors() {
        let frame = encode_frame(&Msg::Text("abc".into()), DEFAULT_FRAME_LIMIT).unwrap();
        for cut in 1..frame.len() {
            let mut r = &frame[..cut];
            let err = read_frame::<_, Msg>(&mut r, DEFAULT_FRAME_LIMIT)
                .await
                .unwrap_err();
            assert!(
                matches!(err, FrameError::Truncated { .. }),
                "cut {cut}: {err}"
            );
        }
        // Variant 9 does not exist.
        let mut r = &[0, 0, 0, 1, 9][..];
        assert!(matches!(
            read_frame::<_, Msg>(&mut r, DEFAULT_FRAME_LIMIT).await,
            Err(FrameError::Malformed(_))
        ));
        // A valid message followed by junk inside the same frame.
        let mut r = &[0, 0, 0, 3, 0, 7, 0xaa][..];
        assert!(matches!(
            read_frame::<_, Msg>(&mut r, DEFAULT_FRAME_LIMIT).await,
            Err(FrameError::TrailingBytes(1))
        ));
        // The frame the fuzzer found: a length field claiming 72 PB.
        let crash = [
            0, 0, 0, 0x10, 0, 0xfd, 0xff, 0xff, 0xfa, 0x02, 0xff, 0xf5, 0xff, 0, 0, 0, 0x32, 0xff,
            0, 0x0a,
        ];
        assert!(decode_frame::<crate::repo::RepoRequest>(&crash, DEFAULT_FRAME_LIMIT).is_err());
        assert!(decode_frame::<crate::repo::RepoReply>(&crash, DEFAULT_FRAME_LIMIT).is_err());
        assert!(decode_frame::<crate::hello::Hello>(&crash, DEFAULT_FRAME_LIMIT).is_err());
        // A string claiming a huge length inside a small frame.
        let mut r = &[0, 0, 0, 6, 1, 0xfc, 0xff, 0xff, 0xff, 0x7f][..];
        assert!(matches!(
            read_frame::<_, Msg>(&mut r, DEFAULT_FRAME_LIMIT).await,
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn decode_frame_matches_read_frame() {
        let mut bytes = encode_frame(&Msg::Ping(3), DEFAULT_FRAME_LIMIT).unwrap();
        let used = bytes.len();
        bytes.extend_from_slice(&[1, 2, 3]);
        let (msg, n) = decode_frame::<Msg>(&bytes, DEFAULT_FRAME_LIMIT).unwrap();
        assert_eq!((msg, n), (Msg::Ping(3), used));
        assert!(matches!(
            decode_frame::<Msg>(&bytes[..used - 1], DEFAULT_FRAME_LIMIT),
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(
            decode_frame::<Msg>(&bytes[..2], DEFAULT_FRAME_LIMIT),
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(
            decode_frame::<Msg>(&bytes, 1),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn records_round_trip_with_the_bounds_of_a_frame() {
        for m in [
            Msg::Ping(u64::MAX),
            Msg::Text("héllo".into()),
            Msg::Blob(vec![7; 1000]),
        ] {
            let bytes = encode_record(&m).unwrap();
            // A record is exactly a frame's payload.
            assert_eq!(
                encode_frame(&m, DEFAULT_FRAME_LIMIT).unwrap()[4..],
                bytes[..]
            );
            assert_eq!(decode_record::<Msg>(&bytes).unwrap(), m);
            // Cut anywhere, or followed by anything, it is refused.
            for cut in 0..bytes.len() {
                assert!(decode_record::<Msg>(&bytes[..cut]).is_err(), "cut {cut}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(matches!(
                decode_record::<Msg>(&longer),
                Err(FrameError::TrailingBytes(1))
            ));
        }
        // A length inside claiming far more than the limit allocates nothing.
        assert!(matches!(
            decode_record::<Msg>(&[2, 0xfc, 0xff, 0xff, 0xff, 0x7f]),
            Err(FrameError::Malformed(_))
        ));
        // Over the limit: refused before decoding, and never written.
        let huge = vec![0u8; DEFAULT_FRAME_LIMIT + 1];
        assert!(matches!(
            decode_record::<Msg>(&huge),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            encode_record(&Msg::Blob(huge)),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_frame_times_out_and_budgets_bound_frames_in_flight() {
        // A header promising 1000 bytes, then 10 bytes, then silence.
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(&[0, 0, 3, 0xe8]).await.unwrap();
        client.write_all(&[0; 10]).await.unwrap();
        let err = read_frame::<_, Msg>(&mut server, DEFAULT_FRAME_LIMIT)
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Stalled(_)), "{err}");

        // A budget of 2 KiB admits one 1.5 KiB frame at a time.
        let budget = Semaphore::new(2);
        let frame = encode_frame(&Msg::Blob(vec![1; 1500]), DEFAULT_FRAME_LIMIT).unwrap();
        let mut r = &frame[..];
        let (msg, permit) = read_frame_within::<_, Msg>(&mut r, DEFAULT_FRAME_LIMIT, &budget)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(msg, Msg::Blob(vec![1; 1500]));
        assert_eq!(budget.available_permits(), 0);
        drop(permit);
        assert_eq!(budget.available_permits(), 2);
    }

    #[tokio::test]
    async fn copy_exact_copies_in_chunks_and_detects_short_input() {
        let data: Vec<u8> = (0..(3 * CHUNK + 17)).map(|i| i as u8).collect();
        let mut src = &data[..];
        let mut dst = Vec::new();
        let mut pieces = 0;
        copy_exact(&mut src, &mut dst, data.len() as u64, |_| pieces += 1)
            .await
            .unwrap();
        assert_eq!(dst, data);
        assert!(pieces >= 4);
        let mut short = &data[..10];
        let err = copy_exact(&mut short, &mut Vec::new(), 11, |_| {})
            .await
            .unwrap_err();
        assert!(matches!(
            err,
            FrameError::Truncated {
                expected: 11,
                got: 10
            }
        ));
    }
}
