//! zstd on the wire: how a PAGE frame travels compressed between two ends that agreed
//! to it in the handshake (OPEN's `compress`, CONFIG's answer; see `docs/protocol.md`).
//! Pure: no I/O. The transport applies it, never the engine: a local sync exchanges
//! plain frames.
//!
//! One compressed page is one ZPAGE frame (`0x0a`): `u32 pgno`, then one zstd frame
//! whose header states its content size, which must be a valid page size. The receiver
//! expands it back into the PAGE frame it stands for before anything else reads it, into
//! a buffer of exactly that size: a frame that would expand past it (a bomb), a zstd
//! frame without its size, or any garbage is a [`DecodeError`], never more memory.
//!
//! A server compresses nothing: [`PackedPages`] hands a ZPAGE's bytes past the engine
//! (which sees only the expanded page) to the store that keeps them, and from the store
//! to the link that sends them again, each tied to its page by number and fingerprint.
//!
//! Each page is compressed on its own (level [`LEVEL`]): a page that does not shrink by
//! at least 1/16 goes as the plain PAGE it was, and after such a page the next few are
//! sent plain without trying (doubling up to [`MAX_SKIP`] while pages keep failing), so
//! a database of random blobs costs almost no compression work.

use super::{DecodeError, MAX_FRAME_BYTES, check_page_size, code};

/// The one compression this build speaks, as OPEN and CONFIG name it.
pub const ZSTD: &str = "zstd";

/// The zstd level: measured on 4 KiB pages one at a time, level 1 leaves 0.433 of the
/// bytes of application-like text (`bench/mkdb.py text`; 4.1 ms of CPU a MiB), level 2
/// and 3 0.431 for 9% and 30% more CPU, level −1 0.554 (negative levels do not
/// entropy-code literals); on the benchmark's random letters 0.656 (see
/// `docs/performance.md`).
pub const LEVEL: i32 = 1;

/// The most pages sent plain without trying, after pages that did not compress.
pub const MAX_SKIP: u32 = 64;

/// How one end compresses the pages it sends: `--compress` of push, pull and the
/// subscribers, `compress` in the daemon's configuration, `SQLFERRY_COMPRESS`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CompressMode {
    /// Plain while the link keeps up, compressed while the link is the bottleneck
    /// ([`Adaptive`]); plain from the start to a loopback peer.
    #[default]
    Auto,
    /// Every page that shrinks goes compressed (the behaviour before `auto`).
    Zstd,
    /// Never: compression is not even offered, as with a peer older than it.
    Off,
}

impl CompressMode {
    /// The words each mode is written as (the first is its name).
    pub const NAMES: [&'static str; 3] = ["auto", "zstd", "off"];

    /// The mode `SQLFERRY_COMPRESS` names, if it is set: `auto`, `zstd` (also `on`,
    /// `1`, `yes`), `off` (also `0`, `no`, `none`). An unknown value is an error, so a
    /// typo never silently changes what travels.
    pub fn from_env() -> Result<Option<CompressMode>, String> {
        match std::env::var(COMPRESS_ENV) {
            Ok(v) if !v.trim().is_empty() => v
                .parse()
                .map(Some)
                .map_err(|e| format!("{COMPRESS_ENV}: {e}")),
            _ => Ok(None),
        }
    }
}

/// The environment variable that sets the page compression of this end (see
/// [`CompressMode`]); a server reads only whether it is `off`.
pub const COMPRESS_ENV: &str = "SQLFERRY_COMPRESS";

impl std::str::FromStr for CompressMode {
    type Err = String;

    fn from_str(s: &str) -> Result<CompressMode, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(CompressMode::Auto),
            "zstd" | "on" | "1" | "yes" => Ok(CompressMode::Zstd),
            "off" | "0" | "no" | "none" => Ok(CompressMode::Off),
            other => Err(format!(
                "{other:?} is not a page compression: expected auto, zstd or off"
            )),
        }
    }
}

impl std::fmt::Display for CompressMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CompressMode::Auto => "auto",
            CompressMode::Zstd => "zstd",
            CompressMode::Off => "off",
        })
    }
}

impl<'de> serde::Deserialize<'de> for CompressMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<CompressMode, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How long a measuring window of [`Adaptive`] lasts at least.
pub const WINDOW: std::time::Duration = std::time::Duration::from_millis(100);

/// Bytes a measuring window of [`Adaptive`] must write at least to count: below that
/// the socket's own buffers hide the link.
pub const WINDOW_MIN_BYTES: u64 = 256 * 1024;

/// While sending plain, [`Adaptive`] compresses one page in this many, to keep its
/// estimates of the ratio and of its own speed (about 3% of what compressing
/// everything costs; the page it tried goes compressed when it shrank).
pub const SAMPLE_EVERY_PAGES: u32 = 32;

/// Pages [`Adaptive`] tries first, before it knows anything.
const FIRST_SAMPLES: u32 = 8;

/// The share of a window the writer must spend waiting for the socket for the link to
/// count as the bottleneck.
const BACKED_UP_SHARE: f64 = 0.5;

/// The most calm windows [`Adaptive`] waits before it tries plain again after it went
/// back to compressing (the hysteresis doubles up to this).
pub const MAX_CALM_WINDOWS: u32 = 64;

/// The `auto` policy of a sender (the idea of `zstd --adapt`): compress only while the
/// link is what holds the sync back and compressing makes it faster.
///
/// Pure: the writer feeds it what it measured (how long a page took to compress and
/// what it came to, how many bytes it wrote and how long it waited for the socket),
/// with the time, and asks it whether to compress the next page.
///
/// - Sending plain, it compresses the first few pages and then one in
///   [`SAMPLE_EVERY_PAGES`], to know the ratio `r` (compressed / plain) and its own
///   speed `c` (plain bytes a second). Over each window (at least [`WINDOW`] and
///   [`WINDOW_MIN_BYTES`]) it measures the link: when the writer waited for the socket
///   at least half the window, the link is the bottleneck and drains `l` bytes a
///   second. It starts compressing when `l < c × (1 − r)`: the bytes compression saves
///   a second are more than the link can carry a second, so compressing wins even
///   though it takes the sender's CPU.
/// - Compressing, it keeps going while the socket stays backed up. After a number of
///   windows in which the socket kept up (1, then doubling up to [`MAX_CALM_WINDOWS`]
///   each time plain turned out to be the wrong choice), it tries plain again: if the
///   link is fast, plain stays.
#[derive(Debug, Clone)]
pub struct Adaptive {
    compressing: bool,
    /// Estimated compressed / plain bytes of a page (1.0 until measured).
    ratio: f64,
    /// Estimated plain bytes a second this end compresses (0 until measured).
    speed: f64,
    /// Pages tried so far.
    samples: u32,
    /// Pages sent plain since the last one tried.
    since_sample: u32,
    window_start: Option<std::time::Instant>,
    window_bytes: u64,
    window_waited: std::time::Duration,
    /// Calm windows (socket not backed up) in a row while compressing.
    calm: u32,
    /// Calm windows in a row after which compressing tries plain again.
    calm_limit: u32,
    /// Whether the last switch was from compressing to plain (a probe).
    probing: bool,
}

impl Default for Adaptive {
    fn default() -> Adaptive {
        Adaptive::new()
    }
}

impl Adaptive {
    /// Plain, knowing nothing yet.
    pub fn new() -> Adaptive {
        Adaptive {
            compressing: false,
            ratio: 1.0,
            speed: 0.0,
            samples: 0,
            since_sample: 0,
            window_start: None,
            window_bytes: 0,
            window_waited: std::time::Duration::ZERO,
            calm: 0,
            calm_limit: 1,
            probing: false,
        }
    }

    /// Whether pages go compressed now.
    pub fn compressing(&self) -> bool {
        self.compressing
    }

    /// Whether to try compressing the next page.
    pub fn try_next(&mut self) -> bool {
        if self.compressing || self.samples < FIRST_SAMPLES {
            return true;
        }
        self.since_sample += 1;
        if self.since_sample >= SAMPLE_EVERY_PAGES {
            self.since_sample = 0;
            return true;
        }
        false
    }

    /// One page of `plain` bytes was tried: it came to `packed` bytes (`None`: it did
    /// not shrink enough to go compressed), in `took`.
    pub fn compressed(&mut self, plain: usize, packed: Option<usize>, took: std::time::Duration) {
        const WEIGHT: f64 = 1.0 / 16.0;
        let r = packed.map_or(1.0, |n| n as f64 / plain as f64);
        let secs = took.as_secs_f64().max(1e-7);
        let c = plain as f64 / secs;
        if self.samples == 0 {
            self.ratio = r;
            self.speed = c;
        } else {
            self.ratio += (r - self.ratio) * WEIGHT;
            self.speed += (c - self.speed) * WEIGHT;
        }
        self.samples = self.samples.saturating_add(1);
    }

    /// The writer wrote `bytes` to the socket and waited `waited` for it to take them;
    /// `now` is when it finished. Ends a window when it is long enough, and decides.
    pub fn wrote(&mut self, bytes: usize, waited: std::time::Duration, now: std::time::Instant) {
        let start = *self.window_start.get_or_insert(now);
        self.window_bytes += bytes as u64;
        self.window_waited += waited;
        let elapsed = now.saturating_duration_since(start);
        if elapsed < WINDOW || self.window_bytes < WINDOW_MIN_BYTES {
            return;
        }
        let secs = elapsed.as_secs_f64();
        let backed_up = self.window_waited.as_secs_f64() >= secs * BACKED_UP_SHARE;
        let link = self.window_bytes as f64 / secs;
        self.window_start = Some(now);
        self.window_bytes = 0;
        self.window_waited = std::time::Duration::ZERO;
        self.decide(backed_up, link);
    }

    /// The decision at the end of a window: `backed_up` when the link was the
    /// bottleneck, `link` the bytes a second it took.
    fn decide(&mut self, backed_up: bool, link: f64) {
        if self.compressing {
            if backed_up {
                self.calm = 0;
                return;
            }
            self.calm += 1;
            if self.calm >= self.calm_limit {
                self.compressing = false;
                self.probing = true;
                self.calm = 0;
            }
            return;
        }
        let pays =
            backed_up && self.samples >= FIRST_SAMPLES && link < self.speed * (1.0 - self.ratio);
        if pays {
            self.compressing = true;
            self.calm = 0;
            // Plain was tried and the link could not take it: wait longer before the
            // next try.
            if self.probing {
                self.calm_limit = (self.calm_limit * 2).min(MAX_CALM_WINDOWS);
            }
            self.probing = false;
        } else if !backed_up {
            // The link keeps up with plain pages: that try was right.
            if self.probing {
                self.calm_limit = 1;
            }
            self.probing = false;
        }
    }
}

/// The sending end: turns PAGE frames into ZPAGE frames when that pays.
pub struct Compressor {
    /// Made for the first page tried: a session that sends no page pays nothing.
    z: Option<zstd::bulk::Compressor<'static>>,
    /// Where a page is compressed to (never larger than the page it would replace).
    scratch: Vec<u8>,
    /// Pages still to send plain without trying.
    skip: u32,
    /// How many to skip after the next page that does not compress.
    backoff: u32,
    /// With `auto`: when to compress at all (`None`: every page is tried).
    policy: Option<Adaptive>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("skip", &self.skip)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl Default for Compressor {
    fn default() -> Compressor {
        Compressor::new()
    }
}

impl Compressor {
    /// A compressor at [`LEVEL`]; its zstd state is made when the first page comes.
    pub fn new() -> Compressor {
        Compressor {
            z: None,
            scratch: Vec::new(),
            skip: 0,
            backoff: 1,
            policy: None,
        }
    }

    /// A compressor for `auto`: pages go compressed only while [`Adaptive`] says the
    /// link is the bottleneck; the writer reports each write with [`Compressor::wrote`].
    pub fn adaptive() -> Compressor {
        Compressor {
            policy: Some(Adaptive::new()),
            ..Compressor::new()
        }
    }

    /// The writer wrote `bytes` and waited `waited` for the socket, finishing at `now`
    /// (only `auto` uses it).
    pub fn wrote(&mut self, bytes: usize, waited: std::time::Duration, now: std::time::Instant) {
        if let Some(p) = &mut self.policy {
            p.wrote(bytes, waited, now);
        }
    }

    /// The `auto` policy, if this compressor follows one.
    pub fn policy(&self) -> Option<&Adaptive> {
        self.policy.as_ref()
    }

    /// `frame` as it goes on the wire: a PAGE frame as a ZPAGE frame when its page
    /// shrinks by at least 1/16, any other frame (and any page that does not) as it is.
    pub fn pack(&mut self, mut frame: Vec<u8>) -> Vec<u8> {
        if frame.first() != Some(&code::PAGE) || frame.len() <= 5 {
            return frame;
        }
        let sampling = match &mut self.policy {
            Some(p) => {
                if !p.try_next() {
                    return frame;
                }
                !p.compressing()
            }
            None => false,
        };
        if self.skip > 0 && !sampling {
            self.skip -= 1;
            return frame;
        }
        let page_len = frame.len() - 5;
        let limit = page_len - page_len / 16;
        if self.scratch.len() < limit {
            self.scratch.resize(limit, 0);
        }
        if self.z.is_none() {
            // Sending plain is always understood: a compressor that cannot be made
            // only costs bytes.
            self.z = zstd::bulk::Compressor::new(LEVEL).ok();
        }
        let Some(z) = &mut self.z else {
            return frame;
        };
        // A page that does not fit in `limit` bytes fails here: it goes plain.
        let started = self.policy.as_ref().map(|_| std::time::Instant::now());
        let shrunk = match z.compress_to_buffer(&frame[5..], &mut self.scratch[..limit]) {
            Ok(n) if n < limit => Some(n),
            _ => None,
        };
        if let (Some(p), Some(started)) = (&mut self.policy, started) {
            p.compressed(page_len, shrunk, started.elapsed());
        }
        let Some(n) = shrunk else {
            if sampling {
                return frame;
            }
            self.skip = self.backoff;
            self.backoff = (self.backoff * 2).min(MAX_SKIP);
            return frame;
        };
        self.backoff = 1;
        frame[0] = code::ZPAGE;
        frame.truncate(5);
        frame.extend_from_slice(&self.scratch[..n]);
        frame
    }
}

/// The receiving end: turns ZPAGE frames back into PAGE frames.
pub struct Expander {
    /// Made for the first ZPAGE: a session that receives none pays nothing.
    z: Option<zstd::bulk::Decompressor<'static>>,
}

impl std::fmt::Debug for Expander {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Expander").finish_non_exhaustive()
    }
}

impl Default for Expander {
    fn default() -> Expander {
        Expander::new()
    }
}

impl Expander {
    /// An expander; its zstd state is made when the first ZPAGE comes.
    pub fn new() -> Expander {
        Expander { z: None }
    }

    /// `frame` as the engine reads it: a ZPAGE frame as the PAGE frame it stands for,
    /// any other frame as it is. Never expands past one page (65,536 bytes).
    pub fn unpack(&mut self, frame: Vec<u8>) -> Result<Vec<u8>, DecodeError> {
        if frame.first() != Some(&code::ZPAGE) {
            return Ok(frame);
        }
        self.expand_frame(&frame)
    }

    /// The PAGE frame the ZPAGE frame `frame` stands for (its first byte must be
    /// ZPAGE); the ZPAGE frame stays the caller's.
    pub fn expand_frame(&mut self, frame: &[u8]) -> Result<Vec<u8>, DecodeError> {
        if frame.len() > MAX_FRAME_BYTES {
            return Err(DecodeError::TooLarge(frame.len()));
        }
        if frame.len() < 5 {
            return Err(DecodeError::Truncated("ZPAGE"));
        }
        let z = &frame[5..];
        let size = stated_page_size(z)?;
        let mut out = vec![0u8; 5 + size];
        out[0] = code::PAGE;
        out[1..5].copy_from_slice(&frame[1..5]);
        self.expand_exact(z, &mut out[5..])?;
        Ok(out)
    }

    /// Expands one zstd frame `z` (a ZPAGE's body, or a compressed entry of the
    /// server's store) into `out`, which then holds exactly one page. The frame must
    /// state its size, that size must be a page size, and it must expand to exactly
    /// that: anything else is a [`DecodeError`] and never more than one page of memory.
    pub fn expand_into(&mut self, z: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
        let size = stated_page_size(z)?;
        out.clear();
        out.resize(size, 0);
        self.expand_exact(z, out)
    }

    /// Expands `z` into `out`, which must be exactly as long as it says it expands to.
    fn expand_exact(&mut self, z: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
        if self.z.is_none() {
            let made = zstd::bulk::Decompressor::new().map_err(|e| {
                DecodeError::Invalid(format!("cannot expand a ZPAGE frame here: {e}"))
            })?;
            self.z = Some(made);
        }
        let Some(x) = &mut self.z else {
            return Err(DecodeError::Invalid(
                "cannot expand a ZPAGE frame here".into(),
            ));
        };
        let size = out.len();
        match x.decompress_to_buffer(z, out) {
            Ok(n) if n == size => Ok(()),
            Ok(n) => Err(DecodeError::Invalid(format!(
                "ZPAGE frame expands to {n} bytes where it states {size}"
            ))),
            Err(e) => Err(DecodeError::Invalid(format!(
                "ZPAGE frame does not expand to a page: {e}"
            ))),
        }
    }
}

/// The page size a zstd frame says it expands to, which must be a valid page size.
fn stated_page_size(z: &[u8]) -> Result<usize, DecodeError> {
    let size = match zstd::zstd_safe::get_frame_content_size(z) {
        Ok(Some(n)) => n,
        Ok(None) => {
            return Err(DecodeError::Invalid(
                "ZPAGE frame does not state its page size".into(),
            ));
        }
        Err(_) => {
            return Err(DecodeError::Invalid(
                "ZPAGE frame does not hold a zstd frame".into(),
            ));
        }
    };
    let size = u32::try_from(size).unwrap_or(u32::MAX);
    check_page_size(size)
        .map_err(|_| DecodeError::Invalid(format!("ZPAGE frame of {size} bytes is not a page")))?;
    Ok(size as usize)
}

/// A cheap fingerprint of a page (XXH3-64), to tie a compressed page handed past the
/// engine to the very page the engine saw: see [`PackedPages`].
pub fn fingerprint(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// One page in the compressed form it travels or is stored in, beside the plain page
/// the engine handles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedPage {
    /// The page number.
    pub pgno: u32,
    /// [`fingerprint`] of the plain page these bytes expand to.
    pub fingerprint: u64,
    /// One zstd frame of the page (a ZPAGE's body).
    pub bytes: Vec<u8>,
}

/// The most entries a [`PackedPages`] holds: more than the frames that can be in
/// flight between a pump and its engine (a few batches of at most
/// `transport::ws::CHANNEL_BATCH_FRAMES`: 192); past it the oldest go.
const MAX_PACKED: usize = 256;

/// Compressed pages handed past the engine, which sees only plain pages: a server
/// keeps a page that arrived compressed as it came, and sends a page it keeps
/// compressed as it is, without compressing or expanding it again. Each entry is tied
/// to its page by number and [`fingerprint`]: an entry that does not match the page
/// the engine handles is not used (that page is then stored, or sent, plain), so a
/// mix-up can cost bytes, never change a page. Bounded (256 entries).
#[derive(Debug, Clone, Default)]
pub struct PackedPages(std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<PackedPage>>>);

impl PackedPages {
    /// An empty hand-over.
    pub fn new() -> PackedPages {
        PackedPages::default()
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<PackedPage>> {
        // A panic elsewhere cannot leave the queue half changed: use it as it is.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `page` behind the others (the oldest goes when full).
    pub fn push(&self, page: PackedPage) {
        let mut q = self.queue();
        if q.len() >= MAX_PACKED {
            q.pop_front();
        }
        q.push_back(page);
    }

    /// Replaces whatever is held with `page` (or nothing).
    pub fn set(&self, page: Option<PackedPage>) {
        let mut q = self.queue();
        q.clear();
        q.extend(page);
    }

    /// The compressed form of page `pgno` whose plain bytes are `page`, if one was
    /// handed over: entries before it (pages the engine never handled) go with it.
    pub fn take(&self, pgno: u32, page: &[u8]) -> Option<PackedPage> {
        let mut q = self.queue();
        let at = q.iter().position(|p| p.pgno == pgno)?;
        q.drain(..at);
        let found = q.pop_front()?;
        (found.fingerprint == fingerprint(page)).then_some(found)
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.queue().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Frame;
    use proptest::prelude::*;

    fn text_page(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| b"abcdefgh"[(i * 7 + i / 13) % 8])
            .collect()
    }

    #[test]
    fn a_text_page_round_trips_smaller() {
        let (mut c, mut e) = (Compressor::new(), Expander::new());
        let plain = Frame::page_bytes(9, &text_page(4096));
        let packed = c.pack(plain.clone());
        assert_eq!(packed[0], code::ZPAGE);
        assert!(packed.len() < plain.len() / 4, "{}", packed.len());
        assert_eq!(e.unpack(packed).unwrap(), plain);
    }

    #[test]
    fn other_frames_and_random_pages_go_as_they_are() {
        let mut c = Compressor::new();
        let ready = Frame::Ready { page_count: 3 }.to_bytes();
        assert_eq!(c.pack(ready.clone()), ready);
        let mut x = 1u64;
        let random: Vec<u8> = (0..4096)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        let plain = Frame::page_bytes(1, &random);
        assert_eq!(c.pack(plain.clone()), plain);
        // The next page is not even tried, however well it would compress.
        let text = Frame::page_bytes(2, &text_page(4096));
        assert_eq!(c.pack(text.clone()), text);
        // Then compression is tried again.
        assert_eq!(c.pack(text.clone())[0], code::ZPAGE);
    }

    #[test]
    fn a_bomb_is_refused() {
        let mut e = Expander::new();
        // A zstd frame of 1 MiB of zeros: larger than any page.
        let big = zstd::bulk::compress(&vec![0u8; 1 << 20], 1).unwrap();
        let mut frame = vec![code::ZPAGE, 0, 0, 0, 1];
        frame.extend_from_slice(&big);
        assert!(frame.len() < 1000);
        let err = e.unpack(frame).unwrap_err();
        assert!(err.to_string().contains("is not a page"), "{err}");
        // A frame that states 4096 bytes but holds more (two frames back to back).
        let page = zstd::bulk::compress(&[0u8; 4096], 1).unwrap();
        let mut frame = vec![code::ZPAGE, 0, 0, 0, 1];
        frame.extend_from_slice(&page);
        frame.extend_from_slice(&page);
        assert!(matches!(e.unpack(frame), Err(DecodeError::Invalid(_))));
        // A frame that does not state its size (streamed).
        let mut streamed = Vec::new();
        {
            use std::io::Write;
            let mut w = zstd::stream::write::Encoder::new(&mut streamed, 1).unwrap();
            w.write_all(&[0u8; 4096]).unwrap();
            w.finish().unwrap();
        }
        let mut frame = vec![code::ZPAGE, 0, 0, 0, 1];
        frame.extend_from_slice(&streamed);
        let err = e.unpack(frame).unwrap_err();
        assert!(err.to_string().contains("does not state"), "{err}");
        // Truncated and empty.
        assert_eq!(
            e.unpack(vec![code::ZPAGE, 0]),
            Err(DecodeError::Truncated("ZPAGE"))
        );
        assert!(e.unpack(vec![code::ZPAGE, 0, 0, 0, 1]).is_err());
    }

    /// A session holds one compressor: it must stay small, or a server's fan-out of
    /// pulls pays for it many times over. (An expander decodes in one shot into the
    /// page's buffer: it holds no window.)
    #[test]
    fn a_session_s_zstd_state_is_small() {
        let (mut c, mut e) = (Compressor::new(), Expander::new());
        for len in [4096, 65536] {
            let packed = c.pack(Frame::page_bytes(1, &text_page(len)));
            e.unpack(packed).unwrap();
        }
        let cs = c.z.as_mut().expect("made").context_mut().sizeof();
        eprintln!("compressor {cs} bytes");
        assert!(cs + c.scratch.capacity() < 1 << 20, "compressor {cs}");
    }

    fn packed(pgno: u32, page: &[u8]) -> PackedPage {
        PackedPage {
            pgno,
            fingerprint: fingerprint(page),
            bytes: zstd::bulk::compress(page, LEVEL).unwrap(),
        }
    }

    /// A hand-over gives a page's compressed bytes only for that very page: the same
    /// number and the same content. Entries for pages the engine skipped go; entries
    /// for pages not reached yet stay; it never holds more than its bound.
    #[test]
    fn packed_pages_match_by_number_and_content_and_stay_bounded() {
        let q = PackedPages::new();
        let (a, b) = (text_page(4096), vec![3u8; 4096]);
        q.push(packed(1, &a));
        q.push(packed(2, &b));
        q.push(packed(3, &a));
        assert_eq!(q.take(1, &b), None, "same number, other content");
        // Page 3 is asked for: page 2's entry (skipped) goes with it.
        assert_eq!(q.take(3, &a).map(|p| p.pgno), Some(3));
        assert!(q.is_empty());
        // A page never handed over: nothing, and nothing is dropped.
        q.push(packed(9, &a));
        assert_eq!(q.take(8, &a), None);
        assert_eq!(q.take(9, &a).map(|p| p.pgno), Some(9));
        for n in 0..(MAX_PACKED as u32 + 10) {
            q.push(packed(n + 100, &b));
        }
        assert_eq!(q.queue().len(), MAX_PACKED);
        assert_eq!(q.take(100, &b), None, "the oldest went");
        q.set(None);
        assert!(q.is_empty());
        // What the hand-over gives expands to the page.
        let mut out = Vec::new();
        q.set(Some(packed(5, &a)));
        let p = q.take(5, &a).unwrap();
        Expander::new().expand_into(&p.bytes, &mut out).unwrap();
        assert_eq!(out, a);
    }

    #[test]
    fn modes_are_read_as_written_and_unknown_words_refused() {
        for (word, mode) in [
            ("auto", CompressMode::Auto),
            ("ZSTD", CompressMode::Zstd),
            ("on", CompressMode::Zstd),
            ("off", CompressMode::Off),
            ("0", CompressMode::Off),
            (" none ", CompressMode::Off),
        ] {
            assert_eq!(word.parse::<CompressMode>(), Ok(mode), "{word}");
        }
        for mode in [CompressMode::Auto, CompressMode::Zstd, CompressMode::Off] {
            assert_eq!(mode.to_string().parse::<CompressMode>(), Ok(mode));
        }
        let err = "fast".parse::<CompressMode>().unwrap_err();
        assert!(err.contains("expected auto, zstd or off"), "{err}");
    }

    use std::time::{Duration, Instant};

    /// Feeds `a` one second of a sender at `link` bytes a second, the writer waiting
    /// `waited_share` of the time for the socket, in writes of 64 KiB.
    fn run(a: &mut Adaptive, clock: &mut Instant, link: f64, waited_share: f64) {
        let write = 64 * 1024;
        let each = Duration::from_secs_f64(write as f64 / link);
        let steps = (link / write as f64).ceil() as u32;
        for _ in 0..steps {
            *clock += each;
            a.wrote(write, each.mul_f64(waited_share), *clock);
        }
    }

    /// `n` pages tried at `speed` plain bytes a second, each shrinking to `ratio`.
    fn sample(a: &mut Adaptive, n: u32, ratio: f64, speed: f64) {
        for _ in 0..n {
            let took = Duration::from_secs_f64(4096.0 / speed);
            let packed = (ratio < 15.0 / 16.0).then_some((4096.0 * ratio) as usize);
            a.compressed(4096, packed, took);
        }
    }

    const MB: f64 = 1e6;

    #[test]
    fn auto_compresses_when_the_link_is_the_bottleneck_and_compression_pays() {
        let mut clock = Instant::now();
        // 100 Mbit/s, backed up; text that compresses to 0.43 at 184 MB/s.
        let mut a = Adaptive::new();
        assert!(!a.compressing());
        sample(&mut a, 8, 0.43, 184.0 * MB);
        run(&mut a, &mut clock, 12.5 * MB, 0.9);
        assert!(a.compressing(), "a slow link: compress");
        // Compressing, the link still backed up: it stays so.
        run(&mut a, &mut clock, 12.5 * MB, 0.9);
        assert!(a.compressing());

        // The same text on a link that keeps up: plain.
        let mut a = Adaptive::new();
        sample(&mut a, 8, 0.43, 184.0 * MB);
        run(&mut a, &mut clock, 400.0 * MB, 0.1);
        assert!(!a.compressing(), "the link keeps up: plain");
        // Backed up but faster than compression can win (10 Gbit/s): plain.
        run(&mut a, &mut clock, 1250.0 * MB, 0.9);
        assert!(
            !a.compressing(),
            "compressing would be slower than the link"
        );

        // Pages that do not compress: never, however slow the link.
        let mut a = Adaptive::new();
        sample(&mut a, 8, 1.0, 184.0 * MB);
        run(&mut a, &mut clock, 1.0 * MB, 0.95);
        assert!(!a.compressing(), "random pages: plain");

        // Nothing measured yet: no decision on a guess.
        let mut a = Adaptive::new();
        run(&mut a, &mut clock, 1.0 * MB, 0.95);
        assert!(!a.compressing());
    }

    #[test]
    fn auto_tries_plain_again_when_the_link_speeds_up_with_hysteresis() {
        let mut clock = Instant::now();
        let mut a = Adaptive::new();
        sample(&mut a, 8, 0.43, 184.0 * MB);
        run(&mut a, &mut clock, 12.5 * MB, 0.9);
        assert!(a.compressing());
        // The link got fast: the socket keeps up, so plain is tried, and kept.
        run(&mut a, &mut clock, 400.0 * MB, 0.05);
        assert!(!a.compressing(), "plain tried again");
        run(&mut a, &mut clock, 400.0 * MB, 0.05);
        assert!(!a.compressing(), "and kept while the link keeps up");

        // A link just too slow for plain: each plain try backs up again, and the next
        // try waits twice as many calm windows (up to the limit).
        let mut a = Adaptive::new();
        sample(&mut a, 8, 0.43, 184.0 * MB);
        let window = |a: &mut Adaptive, clock: &mut Instant, backed_up: bool| {
            *clock += WINDOW;
            let waited = if backed_up {
                WINDOW.mul_f64(0.9)
            } else {
                Duration::ZERO
            };
            a.wrote(WINDOW_MIN_BYTES as usize, waited, *clock);
        };
        window(&mut a, &mut clock, true); // opens the first window
        window(&mut a, &mut clock, true);
        assert!(a.compressing());
        let mut calm_before_try = Vec::new();
        for _ in 0..8 {
            let mut calm = 0;
            while a.compressing() {
                window(&mut a, &mut clock, false);
                calm += 1;
            }
            calm_before_try.push(calm);
            window(&mut a, &mut clock, true);
            assert!(a.compressing(), "plain backed up: compress again");
        }
        assert_eq!(calm_before_try, [1, 2, 4, 8, 16, 32, 64, 64]);
    }

    #[test]
    fn an_adaptive_compressor_sends_plain_until_the_link_backs_up() {
        let mut c = Compressor::adaptive();
        let text = Frame::page_bytes(2, &text_page(4096));
        // The first pages are tried (and go compressed, since they shrank); then one
        // in SAMPLE_EVERY_PAGES.
        let kinds: Vec<u8> = (0..8 + 64).map(|_| c.pack(text.clone())[0]).collect();
        assert!(kinds[..8].iter().all(|&k| k == code::ZPAGE), "{kinds:?}");
        let tried = kinds[8..].iter().filter(|&&k| k == code::ZPAGE).count();
        assert_eq!(tried, 2, "{kinds:?}");
        let p = c.policy().expect("auto");
        assert!(p.ratio < 0.5 && p.speed > 0.0, "{p:?}");
        // A link at 1 MB/s, backed up: every page goes compressed.
        let mut clock = Instant::now();
        for _ in 0..20 {
            clock += Duration::from_millis(300);
            c.wrote(300_000, Duration::from_millis(290), clock);
        }
        assert!(c.policy().expect("auto").compressing());
        assert!((0..16).all(|_| c.pack(text.clone())[0] == code::ZPAGE));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut e = Expander::new();
            let mut frame = vec![code::ZPAGE];
            frame.extend_from_slice(&tail);
            if let Ok(out) = e.unpack(frame) {
                prop_assert!(Frame::decode(&out).is_ok());
            }
        }

        #[test]
        fn a_damaged_zpage_never_panics(cut in 0usize..2000, flip in any::<(usize, u8)>()) {
            let (mut c, mut e) = (Compressor::new(), Expander::new());
            let mut packed = c.pack(Frame::page_bytes(4, &text_page(4096)));
            let at = 5 + flip.0 % (packed.len() - 5);
            packed[at] ^= flip.1 | 1;
            packed.truncate(packed.len().min(5 + cut));
            if let Ok(out) = e.unpack(packed) {
                prop_assert!(out.len() <= 5 + 65536);
            }
        }
    }
}
