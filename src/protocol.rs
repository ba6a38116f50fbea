//! Frames and their codec: the bytes the engine's two roles exchange. Pure: no I/O.
//!
//! One frame is one message of the transport (one WebSocket binary message, one item of
//! an in-memory channel). Its first byte is the frame type; integers are big-endian.
//! `docs/protocol.md` defines every frame byte by byte; this module is that definition
//! in code, and its tests keep the two in step.
//!
//! Invariant: [`Frame::decode`] never panics. Every malformed, truncated, oversized or
//! unknown frame is a [`DecodeError`] that says what was wrong.
//!
//! The [`compress`] module is the one frame that exists only on a WebSocket whose ends
//! agreed to it (ZPAGE, a compressed PAGE); the codec here refuses it, because the
//! transport expands it before anything decodes it.
//!
//! A *sealed* session (BEGIN's SEALED flag, end-to-end encryption, `docs/security.md`)
//! carries its pages as SPAGE frames (a page encrypted on the client) and the version's
//! seal as a SEAL frame just before COMMIT. The codec decodes them anywhere; which
//! session may carry which is the engine's check, since only it knows BEGIN's flags.

pub mod compress;
pub mod control;

/// The version of the page-sync protocol this build speaks. Sent in [`Frame::Begin`].
pub const PROTOCOL_VERSION: u16 = 1;

/// The largest frame either side accepts, in bytes: one 64 KiB page plus headroom, and
/// the largest [`Frame::Nodes`] batch.
pub const MAX_FRAME_BYTES: usize = 80 * 1024;

/// The most hashes one [`Frame::Nodes`] frame carries (64 KiB of hashes).
pub const MAX_NODES_PER_FRAME: usize = 2048;

/// The most runs one [`Frame::Want`] frame carries.
pub const MAX_RUNS_PER_FRAME: usize = 4096;

/// How long one side of a page sync may stay silent before the other gives up: the
/// server waiting for a client, and a client waiting for the server (which may be busy
/// hashing or committing a large database). One value, so neither side gives up
/// before the other would.
pub const SYNC_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// What sealing adds to a page or a version's facts: a 12-byte nonce and a 16-byte tag
/// (AES-256-GCM-SIV). The same number as `crypt::SEAL_OVERHEAD`, restated here because
/// the codec imports nothing but `digest` and `error`; the engine asserts they agree.
pub const SEAL_OVERHEAD: usize = 28;

/// The longest text in an [`Frame::Error`] or [`Frame::Message`] frame, in bytes.
pub const MAX_TEXT_BYTES: usize = 4096;

/// Hashes as frames carry them; defined in [`crate::digest`], which computes them.
pub use crate::digest::{HASH_BYTES, Hash};

/// Frame type codes. The control codes (0x51..) are reserved for the server protocol
/// and are defined in `docs/protocol.md`.
pub mod code {
    /// Origin → replica: start of a sync.
    pub const BEGIN: u8 = 0x01;
    /// Replica → origin: what the replica holds.
    pub const READY: u8 = 0x02;
    /// Origin → replica: which tree nodes' hashes to send.
    pub const WANT: u8 = 0x03;
    /// Replica → origin: a run of tree node hashes.
    pub const NODES: u8 = 0x04;
    /// Origin → replica: one page.
    pub const PAGE: u8 = 0x05;
    /// Origin → replica: final page count and digest; commit if they match.
    pub const COMMIT: u8 = 0x06;
    /// Replica → origin: committed.
    pub const DONE: u8 = 0x07;
    /// Either way: the session ends with an error.
    pub const ERROR: u8 = 0x08;
    /// Either way: a human-readable note for the peer's log.
    pub const MESSAGE: u8 = 0x09;
    /// Origin → replica: one page, zstd-compressed. Only on a WebSocket whose two ends
    /// agreed to it; the transport expands it into a PAGE before the engine sees it
    /// (see [`super::compress`]).
    pub const ZPAGE: u8 = 0x0a;
    /// Origin → replica, sealed sessions only: one page, encrypted on the client
    /// (`u32 pgno`, `hash identity`, then `nonce ‖ ciphertext ‖ tag`).
    pub const SPAGE: u8 = 0x0b;
    /// Origin → replica, sealed sessions only, just before COMMIT: the version's seal,
    /// its facts encrypted on the client, which a store keeps unread.
    pub const SEAL: u8 = 0x0c;
    /// Reserved: CONFIG (server protocol).
    pub const CONFIG: u8 = 0x51;
    /// Reserved: NEWREPLICAVERSION (server protocol).
    pub const NEW_REPLICA_VERSION: u8 = 0x52;
    /// Reserved: KEYREQUEST (server protocol).
    pub const KEY_REQUEST: u8 = 0x53;
    /// Reserved: COMMITMESSAGE (server protocol).
    pub const COMMIT_MESSAGE: u8 = 0x54;
    /// Reserved: SYNCNOW (server protocol).
    pub const SYNC_NOW: u8 = 0x55;
    /// Reserved: REPORT (server protocol).
    pub const REPORT: u8 = 0x56;
    /// Reserved: CHANGED (server protocol).
    pub const CHANGED: u8 = 0x57;
    /// Reserved: APPLIED (server protocol).
    pub const APPLIED: u8 = 0x58;
    /// Reserved: WAITFOLLOWERS (server protocol).
    pub const WAIT_FOLLOWERS: u8 = 0x59;
    /// Reserved: FOLLOWED (server protocol).
    pub const FOLLOWED: u8 = 0x5a;
}

/// The error codes carried by [`Frame::Error`], defined beside [`crate::ErrorKind`]
/// because both directions of the mapping (code to kind, kind to code) belong to the
/// error type, which sits below the protocol.
pub use crate::error::ErrorCode;

/// A contiguous run of tree nodes at one level: `count` nodes from index `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Index of the first node at its level (0-based).
    pub start: u32,
    /// Number of nodes.
    pub count: u32,
}

/// One protocol frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Origin → replica, first frame: what the origin holds.
    Begin {
        /// The protocol version the origin speaks.
        version: u16,
        /// The origin's page size in bytes.
        page_size: u32,
        /// The origin's page count.
        page_count: u32,
        /// The version the origin's copy was last synced from (0: unknown).
        base_version: u64,
        /// Reserved flags; 0 in this version.
        flags: u8,
    },
    /// Replica → origin, answer to `Begin`: what the replica holds.
    Ready {
        /// The replica's page count (0 when it is empty or new).
        page_count: u32,
    },
    /// Origin → replica: send the hashes of these nodes of level `level`.
    Want {
        /// Tree level: 0 is pages, each level up groups the engine's FANOUT (16) nodes.
        level: u8,
        /// The runs of node indices wanted.
        runs: Vec<Run>,
    },
    /// Replica → origin: hashes of consecutive nodes of one level.
    Nodes {
        /// Tree level of the nodes.
        level: u8,
        /// Index of the first node.
        start: u32,
        /// One hash per node, in order.
        hashes: Vec<Hash>,
    },
    /// Origin → replica: the content of one page.
    Page {
        /// Page number, 1-based.
        pgno: u32,
        /// Exactly one page of bytes.
        data: Vec<u8>,
    },
    /// Origin → replica: all pages sent; commit if the result has this digest.
    Commit {
        /// The origin's page count (the replica truncates to it).
        page_count: u32,
        /// The origin's digest.
        digest: Hash,
    },
    /// Replica → origin: committed.
    Done {
        /// Pages the replica wrote.
        pages_written: u32,
        /// The digest the replica verified before committing.
        digest: Hash,
    },
    /// Either way: the session ends with this error.
    Error {
        /// A numeric [`ErrorCode`] (unknown codes are kept as they are).
        code: u16,
        /// What went wrong, for a person.
        message: String,
    },
    /// Either way: a note for the peer's log; changes nothing.
    Message {
        /// 0 info, 1 warning.
        level: u8,
        /// The note.
        text: String,
    },
    /// Origin → replica, in a sealed session only: one page, encrypted on the client.
    SealedPage {
        /// Page number, 1-based.
        pgno: u32,
        /// The page's identity (a keyed MAC of its page hash): what a store that cannot
        /// open the page keys it by and builds its tree from, and what the side that
        /// opens it authenticates it with.
        identity: Hash,
        /// `nonce ‖ ciphertext ‖ tag`: one page of bytes plus [`SEAL_OVERHEAD`].
        sealed: Vec<u8>,
    },
    /// Origin → replica, in a sealed session only, just before COMMIT: the version's
    /// seal (its facts, encrypted on the client).
    Seal {
        /// `nonce ‖ ciphertext ‖ tag`, at least [`SEAL_OVERHEAD`] bytes.
        sealed: Vec<u8>,
    },
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// No bytes at all.
    #[error("empty frame")]
    Empty,
    /// More bytes than [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    /// The type byte is not one we know.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// A control frame of the server protocol arrived in a page-sync session.
    #[error("control frame 0x{0:02x} is not valid inside a page sync")]
    Control(u8),
    /// The frame ended early.
    #[error("{0} frame is truncated")]
    Truncated(&'static str),
    /// The frame has bytes after its last field.
    #[error("{0} frame has {1} trailing bytes")]
    Trailing(&'static str, usize),
    /// A field holds a value the protocol does not allow.
    #[error("{0}")]
    Invalid(String),
}

impl Frame {
    /// A short name of the frame's type, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Begin { .. } => "BEGIN",
            Frame::Ready { .. } => "READY",
            Frame::Want { .. } => "WANT",
            Frame::Nodes { .. } => "NODES",
            Frame::Page { .. } => "PAGE",
            Frame::Commit { .. } => "COMMIT",
            Frame::Done { .. } => "DONE",
            Frame::Error { .. } => "ERROR",
            Frame::Message { .. } => "MESSAGE",
            Frame::SealedPage { .. } => "SPAGE",
            Frame::Seal { .. } => "SEAL",
        }
    }

    /// Appends the frame's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Begin {
                version,
                page_size,
                page_count,
                base_version,
                flags,
            } => {
                out.push(code::BEGIN);
                out.extend_from_slice(&version.to_be_bytes());
                out.extend_from_slice(&page_size.to_be_bytes());
                out.extend_from_slice(&page_count.to_be_bytes());
                out.extend_from_slice(&base_version.to_be_bytes());
                out.push(*flags);
            }
            Frame::Ready { page_count } => {
                out.push(code::READY);
                out.extend_from_slice(&page_count.to_be_bytes());
            }
            Frame::Want { level, runs } => {
                out.push(code::WANT);
                out.push(*level);
                out.extend_from_slice(&(runs.len() as u16).to_be_bytes());
                for run in runs {
                    out.extend_from_slice(&run.start.to_be_bytes());
                    out.extend_from_slice(&run.count.to_be_bytes());
                }
            }
            Frame::Nodes {
                level,
                start,
                hashes,
            } => {
                out.push(code::NODES);
                out.push(*level);
                out.extend_from_slice(&start.to_be_bytes());
                out.extend_from_slice(&(hashes.len() as u16).to_be_bytes());
                for h in hashes {
                    out.extend_from_slice(h);
                }
            }
            Frame::Page { pgno, data } => {
                out.push(code::PAGE);
                out.extend_from_slice(&pgno.to_be_bytes());
                out.extend_from_slice(data);
            }
            Frame::Commit { page_count, digest } => {
                out.push(code::COMMIT);
                out.extend_from_slice(&page_count.to_be_bytes());
                out.extend_from_slice(digest);
            }
            Frame::Done {
                pages_written,
                digest,
            } => {
                out.push(code::DONE);
                out.extend_from_slice(&pages_written.to_be_bytes());
                out.extend_from_slice(digest);
            }
            Frame::Error { code: c, message } => {
                out.push(code::ERROR);
                out.extend_from_slice(&c.to_be_bytes());
                out.extend_from_slice(truncate_utf8(message, MAX_TEXT_BYTES).as_bytes());
            }
            Frame::Message { level, text } => {
                out.push(code::MESSAGE);
                out.push(*level);
                out.extend_from_slice(truncate_utf8(text, MAX_TEXT_BYTES).as_bytes());
            }
            Frame::SealedPage {
                pgno,
                identity,
                sealed,
            } => {
                out.push(code::SPAGE);
                out.extend_from_slice(&pgno.to_be_bytes());
                out.extend_from_slice(identity);
                out.extend_from_slice(sealed);
            }
            Frame::Seal { sealed } => {
                out.push(code::SEAL);
                out.extend_from_slice(sealed);
            }
        }
    }

    /// The bytes of a PAGE frame for `data`, encoded straight from the borrowed page
    /// (one copy, where building a [`Frame::Page`] first would make two).
    pub fn page_bytes(pgno: u32, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() + 5);
        out.push(code::PAGE);
        out.extend_from_slice(&pgno.to_be_bytes());
        out.extend_from_slice(data);
        out
    }

    /// The frame's bytes in a new buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(match self {
            Frame::Page { data, .. } => data.len() + 5,
            Frame::SealedPage { sealed, .. } => sealed.len() + 5 + HASH_BYTES,
            Frame::Seal { sealed } => sealed.len() + 1,
            Frame::Nodes { hashes, .. } => hashes.len() * HASH_BYTES + 8,
            _ => 64,
        });
        self.encode(&mut out);
        out
    }

    /// Decodes one frame. Never panics: anything malformed is an error.
    pub fn decode(bytes: &[u8]) -> Result<Frame, DecodeError> {
        if bytes.len() > MAX_FRAME_BYTES {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        let (&ty, rest) = bytes.split_first().ok_or(DecodeError::Empty)?;
        let mut r = Reader {
            buf: rest,
            what: "",
        };
        let frame = match ty {
            code::BEGIN => {
                r.what = "BEGIN";
                let version = r.u16()?;
                let page_size = r.u32()?;
                let page_count = r.u32()?;
                let base_version = r.u64()?;
                let flags = r.u8()?;
                if version == PROTOCOL_VERSION {
                    check_page_size(page_size)?;
                }
                Frame::Begin {
                    version,
                    page_size,
                    page_count,
                    base_version,
                    flags,
                }
            }
            code::READY => {
                r.what = "READY";
                Frame::Ready {
                    page_count: r.u32()?,
                }
            }
            code::WANT => {
                r.what = "WANT";
                let level = r.u8()?;
                let n = usize::from(r.u16()?);
                if n == 0 || n > MAX_RUNS_PER_FRAME {
                    return Err(DecodeError::Invalid(format!("WANT frame with {n} runs")));
                }
                let mut runs = Vec::with_capacity(n);
                for _ in 0..n {
                    let run = Run {
                        start: r.u32()?,
                        count: r.u32()?,
                    };
                    if run.count == 0 || run.start.checked_add(run.count).is_none() {
                        return Err(DecodeError::Invalid(format!(
                            "WANT run of {} nodes from {} is not valid",
                            run.count, run.start
                        )));
                    }
                    runs.push(run);
                }
                Frame::Want { level, runs }
            }
            code::NODES => {
                r.what = "NODES";
                let level = r.u8()?;
                let start = r.u32()?;
                let n = usize::from(r.u16()?);
                if n == 0 || n > MAX_NODES_PER_FRAME {
                    return Err(DecodeError::Invalid(format!("NODES frame with {n} hashes")));
                }
                let mut hashes = Vec::with_capacity(n);
                for _ in 0..n {
                    hashes.push(r.hash()?);
                }
                Frame::Nodes {
                    level,
                    start,
                    hashes,
                }
            }
            code::PAGE => {
                r.what = "PAGE";
                let pgno = r.u32()?;
                if pgno == 0 {
                    return Err(DecodeError::Invalid("PAGE frame for page 0".into()));
                }
                let data = r.rest().to_vec();
                check_page_size(data.len() as u32).map_err(|_| {
                    DecodeError::Invalid(format!(
                        "PAGE frame of {} bytes is not a page",
                        data.len()
                    ))
                })?;
                Frame::Page { pgno, data }
            }
            code::COMMIT => {
                r.what = "COMMIT";
                Frame::Commit {
                    page_count: r.u32()?,
                    digest: r.hash()?,
                }
            }
            code::DONE => {
                r.what = "DONE";
                Frame::Done {
                    pages_written: r.u32()?,
                    digest: r.hash()?,
                }
            }
            code::ERROR => {
                r.what = "ERROR";
                let code = r.u16()?;
                Frame::Error {
                    code,
                    message: r.text()?,
                }
            }
            code::MESSAGE => {
                r.what = "MESSAGE";
                let level = r.u8()?;
                Frame::Message {
                    level,
                    text: r.text()?,
                }
            }
            code::SPAGE => {
                r.what = "SPAGE";
                let pgno = r.u32()?;
                if pgno == 0 {
                    return Err(DecodeError::Invalid("SPAGE frame for page 0".into()));
                }
                let identity = r.hash()?;
                let sealed = r.rest().to_vec();
                // A sealed page is a page and the seal's overhead: anything else was
                // cut or padded on the way, and would only fail to open later.
                if !is_sealed_page_len(sealed.len()) {
                    return Err(DecodeError::Invalid(format!(
                        "SPAGE frame of {} sealed bytes is not a sealed page (a page and {SEAL_OVERHEAD} bytes)",
                        sealed.len()
                    )));
                }
                Frame::SealedPage {
                    pgno,
                    identity,
                    sealed,
                }
            }
            code::SEAL => {
                r.what = "SEAL";
                let sealed = r.rest().to_vec();
                if sealed.len() < SEAL_OVERHEAD {
                    return Err(DecodeError::Invalid(format!(
                        "SEAL frame of {} bytes is shorter than a seal's {SEAL_OVERHEAD}",
                        sealed.len()
                    )));
                }
                Frame::Seal { sealed }
            }
            // The transport expands ZPAGE frames where they were agreed to; one that
            // reaches the codec came where they were not.
            code::ZPAGE => {
                return Err(DecodeError::Invalid(
                    "compressed PAGE frame (0x0a) in a session that did not agree to compression"
                        .into(),
                ));
            }
            code::CONFIG
            | code::NEW_REPLICA_VERSION
            | code::KEY_REQUEST
            | code::COMMIT_MESSAGE
            | code::CHANGED
            | code::APPLIED
            | code::WAIT_FOLLOWERS
            | code::FOLLOWED => return Err(DecodeError::Control(ty)),
            other => return Err(DecodeError::UnknownType(other)),
        };
        if !r.buf.is_empty() {
            return Err(DecodeError::Trailing(r.what, r.buf.len()));
        }
        Ok(frame)
    }
}

/// Whether `len` bytes are a sealed page: a valid page size plus [`SEAL_OVERHEAD`].
pub fn is_sealed_page_len(len: usize) -> bool {
    len.checked_sub(SEAL_OVERHEAD)
        .and_then(|page| u32::try_from(page).ok())
        .is_some_and(|page| check_page_size(page).is_ok())
}

/// Checks that `n` is a page size SQLite allows: a power of two from 512 to 65536.
pub fn check_page_size(n: u32) -> Result<(), DecodeError> {
    if (512..=65536).contains(&n) && n.is_power_of_two() {
        Ok(())
    } else {
        Err(DecodeError::Invalid(format!(
            "{n} is not a valid page size"
        )))
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A bounds-checked reader over a frame's payload.
struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated(self.what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn hash(&mut self) -> Result<Hash, DecodeError> {
        self.array()
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn text(&mut self) -> Result<String, DecodeError> {
        let what = self.what;
        let bytes = self.rest();
        if bytes.len() > MAX_TEXT_BYTES {
            return Err(DecodeError::Invalid(format!(
                "{what} text longer than {MAX_TEXT_BYTES} bytes"
            )));
        }
        String::from_utf8(bytes.to_vec())
            .map_err(|_| DecodeError::Invalid(format!("{what} text is not UTF-8")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_hash() -> impl Strategy<Value = Hash> {
        any::<[u8; 32]>()
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let page = (9u32..=16).prop_flat_map(|shift| {
            (
                1u32..,
                proptest::collection::vec(any::<u8>(), 1usize << shift),
            )
                .prop_map(|(pgno, data)| Frame::Page { pgno, data })
        });
        let sealed_page = (9u32..=16).prop_flat_map(|shift| {
            (
                1u32..,
                arb_hash(),
                proptest::collection::vec(any::<u8>(), (1usize << shift) + SEAL_OVERHEAD),
            )
                .prop_map(|(pgno, identity, sealed)| Frame::SealedPage {
                    pgno,
                    identity,
                    sealed,
                })
        });
        prop_oneof![
            sealed_page,
            proptest::collection::vec(any::<u8>(), SEAL_OVERHEAD..4200)
                .prop_map(|sealed| Frame::Seal { sealed }),
            (any::<u32>(), any::<u64>(), any::<u8>(), 9u32..=16).prop_map(
                |(page_count, base_version, flags, shift)| Frame::Begin {
                    version: PROTOCOL_VERSION,
                    page_size: 1 << shift,
                    page_count,
                    base_version,
                    flags
                }
            ),
            any::<u32>().prop_map(|page_count| Frame::Ready { page_count }),
            (
                any::<u8>(),
                proptest::collection::vec((0u32..1 << 30, 1u32..1 << 20), 1..50)
            )
                .prop_map(|(level, runs)| Frame::Want {
                    level,
                    runs: runs
                        .into_iter()
                        .map(|(start, count)| Run { start, count })
                        .collect()
                }),
            (
                any::<u8>(),
                any::<u32>(),
                proptest::collection::vec(arb_hash(), 1..100)
            )
                .prop_map(|(level, start, hashes)| Frame::Nodes {
                    level,
                    start,
                    hashes
                }),
            page,
            (any::<u32>(), arb_hash())
                .prop_map(|(page_count, digest)| Frame::Commit { page_count, digest }),
            (any::<u32>(), arb_hash()).prop_map(|(pages_written, digest)| Frame::Done {
                pages_written,
                digest
            }),
            (any::<u16>(), ".{0,200}").prop_map(|(code, message)| Frame::Error { code, message }),
            (any::<u8>(), ".{0,200}").prop_map(|(level, text)| Frame::Message { level, text }),
        ]
    }

    proptest! {
        #[test]
        fn every_frame_round_trips(frame in arb_frame()) {
            let bytes = frame.to_bytes();
            prop_assert!(bytes.len() <= MAX_FRAME_BYTES);
            prop_assert_eq!(Frame::decode(&bytes), Ok(frame));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Frame::decode(&bytes);
        }

        #[test]
        fn every_truncation_is_an_error(frame in arb_frame(), cut in any::<prop::sample::Index>()) {
            let bytes = frame.to_bytes();
            let cut = cut.index(bytes.len());
            // Cutting a PAGE or text frame can leave another valid frame; every other
            // frame has a fixed layout, so any cut must fail.
            if !matches!(
                frame,
                Frame::Page { .. }
                    | Frame::SealedPage { .. }
                    | Frame::Seal { .. }
                    | Frame::Error { .. }
                    | Frame::Message { .. }
            ) {
                prop_assert!(Frame::decode(&bytes[..cut]).is_err());
            }
        }
    }

    #[test]
    fn page_bytes_match_the_frame() {
        let data = vec![7u8; 512];
        assert_eq!(
            Frame::page_bytes(3, &data),
            Frame::Page { pgno: 3, data }.to_bytes()
        );
    }

    #[test]
    fn begin_is_byte_exact() {
        let f = Frame::Begin {
            version: 1,
            page_size: 4096,
            page_count: 3,
            base_version: 7,
            flags: 0,
        };
        assert_eq!(
            f.to_bytes(),
            [
                1, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 7, 0
            ]
        );
    }

    #[test]
    fn rejects_what_the_protocol_forbids() {
        assert_eq!(Frame::decode(&[]), Err(DecodeError::Empty));
        assert_eq!(Frame::decode(&[0xee]), Err(DecodeError::UnknownType(0xee)));
        assert_eq!(
            Frame::decode(&[code::CONFIG, b'{']),
            Err(DecodeError::Control(0x51))
        );
        assert_eq!(
            Frame::decode(&vec![code::PAGE; MAX_FRAME_BYTES + 1]),
            Err(DecodeError::TooLarge(MAX_FRAME_BYTES + 1))
        );
        // A page of 1000 bytes is not a page.
        let mut page = vec![code::PAGE, 0, 0, 0, 1];
        page.extend(std::iter::repeat_n(0u8, 1000));
        assert!(matches!(Frame::decode(&page), Err(DecodeError::Invalid(_))));
        // Page 0 does not exist.
        let mut page0 = vec![code::PAGE, 0, 0, 0, 0];
        page0.extend(std::iter::repeat_n(0u8, 512));
        assert!(matches!(
            Frame::decode(&page0),
            Err(DecodeError::Invalid(_))
        ));
        // A BEGIN with page size 3000.
        let mut begin = Frame::Begin {
            version: 1,
            page_size: 4096,
            page_count: 1,
            base_version: 0,
            flags: 0,
        }
        .to_bytes();
        begin[3..7].copy_from_slice(&3000u32.to_be_bytes());
        assert!(matches!(
            Frame::decode(&begin),
            Err(DecodeError::Invalid(_))
        ));
        // A READY with a trailing byte.
        assert_eq!(
            Frame::decode(&[code::READY, 0, 0, 0, 1, 9]),
            Err(DecodeError::Trailing("READY", 1))
        );
        // Invalid UTF-8 in an ERROR.
        assert!(matches!(
            Frame::decode(&[code::ERROR, 0, 1, 0xff]),
            Err(DecodeError::Invalid(_))
        ));
        // A WANT run that overflows.
        let want = [code::WANT, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 2];
        assert!(matches!(Frame::decode(&want), Err(DecodeError::Invalid(_))));
    }

    /// SPAGE and SEAL as docs/protocol.md gives them, and what the codec refuses of
    /// them: a sealed page that is not a page and the seal's overhead, page 0, a seal
    /// too short to hold a nonce and a tag.
    #[test]
    fn sealed_frames_are_byte_exact_and_checked() {
        let sealed = vec![0xabu8; 512 + SEAL_OVERHEAD];
        let bytes = Frame::SealedPage {
            pgno: 2,
            identity: [9; 32],
            sealed: sealed.clone(),
        }
        .to_bytes();
        assert_eq!(&bytes[..5], [0x0b, 0, 0, 0, 2]);
        assert_eq!(&bytes[5..37], [9; 32]);
        assert_eq!(&bytes[37..], &sealed[..]);
        assert_eq!(bytes.len(), 5 + 32 + 512 + 28);
        // The largest sealed page fits in a frame.
        let big = Frame::SealedPage {
            pgno: 1,
            identity: [1; 32],
            sealed: vec![0; 65536 + SEAL_OVERHEAD],
        };
        assert!(big.to_bytes().len() <= MAX_FRAME_BYTES);
        assert_eq!(Frame::decode(&big.to_bytes()), Ok(big));
        // A plain page's length, a page without its overhead, is refused.
        let mut plain = vec![code::SPAGE, 0, 0, 0, 1];
        plain.extend(std::iter::repeat_n(0u8, 32 + 4096));
        assert!(
            matches!(Frame::decode(&plain), Err(DecodeError::Invalid(m)) if m.contains("not a sealed page"))
        );
        let mut short = vec![code::SPAGE, 0, 0, 0, 1];
        short.extend(std::iter::repeat_n(0u8, 32 + 20));
        assert!(matches!(
            Frame::decode(&short),
            Err(DecodeError::Invalid(_))
        ));
        let mut page0 = vec![code::SPAGE, 0, 0, 0, 0];
        page0.extend(std::iter::repeat_n(0u8, 32 + 512 + SEAL_OVERHEAD));
        assert!(matches!(
            Frame::decode(&page0),
            Err(DecodeError::Invalid(_))
        ));
        assert_eq!(
            Frame::decode(&[code::SPAGE, 0, 0]),
            Err(DecodeError::Truncated("SPAGE"))
        );
        assert_eq!(
            Frame::decode(&[code::SPAGE, 0, 0, 0, 1, 7, 7]),
            Err(DecodeError::Truncated("SPAGE"))
        );

        let seal = Frame::Seal {
            sealed: vec![7; 100],
        };
        let bytes = seal.to_bytes();
        assert_eq!(bytes[0], 0x0c);
        assert_eq!(&bytes[1..], &[7u8; 100][..]);
        assert_eq!(Frame::decode(&bytes), Ok(seal));
        assert!(matches!(
            Frame::decode(&[code::SEAL; 28]),
            Err(DecodeError::Invalid(m)) if m.contains("shorter")
        ));
        assert_eq!(
            Frame::decode(&[code::SEAL; 29]),
            Ok(Frame::Seal {
                sealed: vec![code::SEAL; 28]
            })
        );
    }

    #[test]
    fn long_text_is_cut_on_a_character_boundary() {
        let f = Frame::Error {
            code: 1,
            message: "é".repeat(3000),
        };
        match Frame::decode(&f.to_bytes()) {
            Ok(Frame::Error { message, .. }) => assert_eq!(message.len(), 4096),
            other => panic!("unexpected {other:?}"),
        }
    }
}
