//! Frames: how every message between daemons, and every record in the coordinator's store,
//! is laid out in bytes.
//!
//! ```text
//!  0      2         4                 8                      8+len
//!  +------+---------+-----------------+-----------------------+
//!  | magic| version |  length (u32 BE)|  postcard body        |
//!  +------+---------+-----------------+-----------------------+
//! ```
//!
//! The magic tells a Zhengyun frame from anything else (a stray HTTP request, a store file
//! from another program); the version says which schema the body follows; the length is
//! bounded by the reader *before* anything is allocated, so a peer cannot make us reserve
//! more than the bound. Decoding never panics: every failure is a [`FrameError`].
//!
//! A connection opens with a fixed-layout [`Preamble`] in each direction that negotiates the
//! protocol version; every frame after it carries the chosen version.

use std::fmt;
use std::ops::RangeInclusive;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The magic of wire frames between daemons.
pub const WIRE_MAGIC: [u8; 2] = *b"ZY";
/// The magic of records in the coordinator's store.
pub const RECORD_MAGIC: [u8; 2] = *b"ZR";
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 8;
/// The default bound on a frame body. Control messages are small; bulk data (images,
/// chunks) travels on streams of its own with bounds of their own.
pub const MAX_BODY: u32 = 256 * 1024;

/// The wire protocol versions this build speaks. Version 3 (this release: no build ever
/// spoke 2 to a peer that mattered) gave VMs their SSH keys and user-data and NICs their
/// name servers, which changed existing messages, and added certificate renewal and the
/// interactive console. Version 4 adds live migration (new variants at the ends of
/// the command, reply and event enums: every version 3 message keeps its layout, and a
/// version 4 build sends a version 3 peer nothing of version 4).
pub const PROTOCOL_VERSIONS: VersionRange = VersionRange { min: 3, max: 4 };

/// Why a frame could not be encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad magic {got:02x?}: not a Zhengyun frame (expected {expected:02x?})")]
    BadMagic { got: [u8; 2], expected: [u8; 2] },
    #[error("frame of {len} bytes is over the bound of {max} bytes")]
    TooLong { len: u64, max: u32 },
    #[error("frame is truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("frame version {got} is not the negotiated version {expected}")]
    WrongVersion { got: u16, expected: u16 },
    #[error("record version {got} is not one this build reads ({supported})")]
    UnsupportedVersion { got: u16, supported: VersionRange },
    #[error("frame body does not decode: {0}")]
    Body(String),
    #[error("frame body has {0} trailing bytes")]
    TrailingBytes(usize),
    #[error("message is invalid: {0}")]
    Invalid(String),
}

/// A frame's header, parsed and checked against a bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u16,
    pub len: u32,
}

impl FrameHeader {
    /// Parses and bounds a header. Nothing is allocated.
    pub fn parse(
        bytes: &[u8; HEADER_LEN],
        magic: [u8; 2],
        max_body: u32,
    ) -> Result<Self, FrameError> {
        let got = [bytes[0], bytes[1]];
        if got != magic {
            return Err(FrameError::BadMagic {
                got,
                expected: magic,
            });
        }
        let version = u16::from_be_bytes([bytes[2], bytes[3]]);
        let len = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if len > max_body {
            return Err(FrameError::TooLong {
                len: len.into(),
                max: max_body,
            });
        }
        Ok(Self { version, len })
    }

    fn write(&self, magic: [u8; 2], out: &mut Vec<u8>) {
        out.extend_from_slice(&magic);
        out.extend_from_slice(&self.version.to_be_bytes());
        out.extend_from_slice(&self.len.to_be_bytes());
    }
}

/// Encodes `msg` as one frame.
pub fn encode<T: Serialize>(
    magic: [u8; 2],
    version: u16,
    msg: &T,
    max_body: u32,
) -> Result<Vec<u8>, FrameError> {
    let mut out = postcard::to_extend(msg, vec![0u8; HEADER_LEN])
        .map_err(|e| FrameError::Body(e.to_string()))?;
    let body_len = out.len() - HEADER_LEN;
    if body_len as u64 > u64::from(max_body) {
        return Err(FrameError::TooLong {
            len: body_len as u64,
            max: max_body,
        });
    }
    let mut header = Vec::with_capacity(HEADER_LEN);
    FrameHeader {
        version,
        len: body_len as u32,
    }
    .write(magic, &mut header);
    out[..HEADER_LEN].copy_from_slice(&header);
    Ok(out)
}

/// Decodes a body whose header has already been checked. The whole body must be used.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (value, rest) =
        postcard::take_from_bytes(body).map_err(|e| FrameError::Body(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

/// The version a frame's header carries (checked like [`decode`] checks it), so that a
/// reader of records can choose the body's type before decoding it.
pub fn peek_version(buf: &[u8], magic: [u8; 2], max_body: u32) -> Result<u16, FrameError> {
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
        return Err(FrameError::Truncated {
            need: HEADER_LEN,
            have: buf.len(),
        });
    };
    Ok(FrameHeader::parse(head, magic, max_body)?.version)
}

/// Decodes one whole frame from `buf` (exactly one frame, nothing after it), returning the
/// version it carried and the message.
pub fn decode<T: DeserializeOwned>(
    buf: &[u8],
    magic: [u8; 2],
    max_body: u32,
) -> Result<(u16, T), FrameError> {
    let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
        return Err(FrameError::Truncated {
            need: HEADER_LEN,
            have: buf.len(),
        });
    };
    let header = FrameHeader::parse(head, magic, max_body)?;
    let body = &buf[HEADER_LEN..];
    let need = header.len as usize;
    if body.len() < need {
        return Err(FrameError::Truncated {
            need: HEADER_LEN + need,
            have: buf.len(),
        });
    }
    if body.len() > need {
        return Err(FrameError::TrailingBytes(body.len() - need));
    }
    Ok((header.version, decode_body(body)?))
}

/// An inclusive range of protocol versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VersionRange {
    pub min: u16,
    pub max: u16,
}

impl VersionRange {
    /// The range as a std range.
    pub fn as_range(&self) -> RangeInclusive<u16> {
        self.min..=self.max
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "version {}", self.min)
        } else {
            write!(f, "versions {} to {}", self.min, self.max)
        }
    }
}

/// The fixed-layout opening of every connection, in each direction. Its layout never
/// changes, so any two builds can always tell each other which versions they speak:
///
/// ```text
/// "ZYUN" | min u16 BE | max u16 BE | chosen u16 BE (0 from the side that opens)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preamble {
    pub range: VersionRange,
    /// The version the answering side chose; 0 when opening, or when there is none.
    pub chosen: u16,
}

/// The magic of a preamble.
pub const PREAMBLE_MAGIC: [u8; 4] = *b"ZYUN";
/// Bytes in a preamble.
pub const PREAMBLE_LEN: usize = 10;

impl Preamble {
    /// The preamble's bytes.
    pub fn to_bytes(&self) -> [u8; PREAMBLE_LEN] {
        let mut b = [0u8; PREAMBLE_LEN];
        b[..4].copy_from_slice(&PREAMBLE_MAGIC);
        b[4..6].copy_from_slice(&self.range.min.to_be_bytes());
        b[6..8].copy_from_slice(&self.range.max.to_be_bytes());
        b[8..10].copy_from_slice(&self.chosen.to_be_bytes());
        b
    }

    /// Parses a preamble; rejects a wrong magic or an empty range.
    pub fn parse(b: &[u8; PREAMBLE_LEN]) -> Result<Self, FrameError> {
        if b[..4] != PREAMBLE_MAGIC {
            return Err(FrameError::BadMagic {
                got: [b[0], b[1]],
                expected: [PREAMBLE_MAGIC[0], PREAMBLE_MAGIC[1]],
            });
        }
        let min = u16::from_be_bytes([b[4], b[5]]);
        let max = u16::from_be_bytes([b[6], b[7]]);
        let chosen = u16::from_be_bytes([b[8], b[9]]);
        if min == 0 || min > max {
            return Err(FrameError::Invalid(format!(
                "preamble offers an empty version range {min}..={max}"
            )));
        }
        Ok(Self {
            range: VersionRange { min, max },
            chosen,
        })
    }
}

/// Two peers could not agree on a protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("incompatible protocol: this side speaks {ours}, the peer speaks {theirs}; upgrade the older one")]
pub struct VersionMismatch {
    pub ours: VersionRange,
    pub theirs: VersionRange,
}

/// Picks the highest version both sides speak.
pub fn negotiate(ours: VersionRange, theirs: VersionRange) -> Result<u16, VersionMismatch> {
    let hi = ours.max.min(theirs.max);
    let lo = ours.min.max(theirs.min);
    if hi >= lo {
        Ok(hi)
    } else {
        Err(VersionMismatch { ours, theirs })
    }
}

/// Why a framed stream failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Version(#[from] VersionMismatch),
    #[error("the peer closed the stream")]
    Closed,
    #[error("stream I/O failed")]
    Io(#[source] std::io::Error),
}

fn io_or_closed(e: std::io::Error) -> StreamError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        StreamError::Closed
    } else {
        StreamError::Io(e)
    }
}

/// Opens a connection: sends our preamble, reads the answer, and returns the chosen
/// version. The opening side proposes; the answering side chooses.
pub async fn open_preamble<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    ours: VersionRange,
) -> Result<u16, StreamError> {
    io.write_all(
        &Preamble {
            range: ours,
            chosen: 0,
        }
        .to_bytes(),
    )
    .await
    .map_err(StreamError::Io)?;
    io.flush().await.map_err(StreamError::Io)?;
    let mut b = [0u8; PREAMBLE_LEN];
    io.read_exact(&mut b).await.map_err(io_or_closed)?;
    let answer = Preamble::parse(&b)?;
    let chosen = negotiate(ours, answer.range)?;
    if answer.chosen != chosen {
        return Err(FrameError::Invalid(format!(
            "peer chose version {} where {chosen} was expected",
            answer.chosen
        ))
        .into());
    }
    Ok(chosen)
}

/// Answers a connection's preamble. On a mismatch the answer (chosen = 0) is still sent,
/// so that the opening side can name both ranges in its own error.
pub async fn answer_preamble<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    ours: VersionRange,
) -> Result<u16, StreamError> {
    let mut b = [0u8; PREAMBLE_LEN];
    io.read_exact(&mut b).await.map_err(io_or_closed)?;
    let theirs = Preamble::parse(&b)?.range;
    let result = negotiate(ours, theirs);
    let chosen = result.unwrap_or(0);
    io.write_all(
        &Preamble {
            range: ours,
            chosen,
        }
        .to_bytes(),
    )
    .await
    .map_err(StreamError::Io)?;
    io.flush().await.map_err(StreamError::Io)?;
    Ok(result?)
}

/// Reads one frame from a stream, bounded by `max_body`, and decodes it. A frame that
/// carries another version than `version` is refused.
pub async fn read_frame<T: DeserializeOwned, R: AsyncRead + Unpin>(
    io: &mut R,
    version: u16,
    max_body: u32,
    buf: &mut Vec<u8>,
) -> Result<T, StreamError> {
    let mut head = [0u8; HEADER_LEN];
    io.read_exact(&mut head).await.map_err(io_or_closed)?;
    let header = FrameHeader::parse(&head, WIRE_MAGIC, max_body)?;
    if header.version != version {
        return Err(FrameError::WrongVersion {
            got: header.version,
            expected: version,
        }
        .into());
    }
    buf.clear();
    buf.resize(header.len as usize, 0);
    io.read_exact(buf).await.map_err(io_or_closed)?;
    let value = decode_body(buf)?;
    if buf.capacity() > 64 * 1024 {
        // Do not keep a large buffer alive for a connection that mostly sends small frames.
        *buf = Vec::new();
    }
    Ok(value)
}

/// Encodes and writes one frame.
pub async fn write_frame<T: Serialize, W: AsyncWrite + Unpin>(
    io: &mut W,
    version: u16,
    msg: &T,
) -> Result<(), StreamError> {
    let bytes = encode(WIRE_MAGIC, version, msg, MAX_BODY)?;
    io.write_all(&bytes).await.map_err(StreamError::Io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn header_bounds_before_allocating() {
        let mut h = [0u8; HEADER_LEN];
        h[..2].copy_from_slice(&WIRE_MAGIC);
        h[4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            FrameHeader::parse(&h, WIRE_MAGIC, MAX_BODY),
            Err(FrameError::TooLong { .. })
        ));
        h[0] = b'X';
        assert!(matches!(
            FrameHeader::parse(&h, WIRE_MAGIC, MAX_BODY),
            Err(FrameError::BadMagic { .. })
        ));
    }

    #[test]
    fn negotiation_picks_highest_common_or_names_both() {
        let a = VersionRange { min: 1, max: 3 };
        let b = VersionRange { min: 2, max: 5 };
        assert_eq!(negotiate(a, b), Ok(3));
        let c = VersionRange { min: 4, max: 4 };
        let err = negotiate(a, c).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("versions 1 to 3") && msg.contains("version 4"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn preamble_exchange_agrees_or_fails_on_both_sides() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let ours = VersionRange { min: 1, max: 2 };
        let theirs = VersionRange { min: 2, max: 3 };
        let (x, y) = tokio::join!(open_preamble(&mut a, ours), answer_preamble(&mut b, theirs));
        assert_eq!(x.unwrap(), 2);
        assert_eq!(y.unwrap(), 2);

        let (mut a, mut b) = tokio::io::duplex(64);
        let theirs = VersionRange { min: 5, max: 6 };
        let (x, y) = tokio::join!(open_preamble(&mut a, ours), answer_preamble(&mut b, theirs));
        assert!(matches!(x, Err(StreamError::Version(_))));
        assert!(matches!(y, Err(StreamError::Version(_))));
    }

    #[tokio::test]
    async fn stream_rejects_wrong_version_frames() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame(&mut a, 2, &7u32).await.unwrap();
        let mut buf = Vec::new();
        let r: Result<u32, _> = read_frame(&mut b, 1, MAX_BODY, &mut buf).await;
        assert!(matches!(
            r,
            Err(StreamError::Frame(FrameError::WrongVersion {
                got: 2,
                expected: 1
            }))
        ));
    }

    proptest! {
        #[test]
        fn preamble_parse_never_panics(bytes in proptest::array::uniform10(any::<u8>())) {
            let _ = Preamble::parse(&bytes);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode::<(u32, String)>(&bytes, WIRE_MAGIC, MAX_BODY);
        }

        #[test]
        fn round_trip(v in any::<u16>(), s in ".{0,100}", n in any::<u64>()) {
            let bytes = encode(WIRE_MAGIC, v, &(s.clone(), n), MAX_BODY).unwrap();
            let (ver, back): (u16, (String, u64)) = decode(&bytes, WIRE_MAGIC, MAX_BODY).unwrap();
            prop_assert_eq!(ver, v);
            prop_assert_eq!(back, (s, n));
        }
    }
}
