//! Protocol frames over a WebSocket, the same way on both sides: one protocol frame is
//! one binary message; a text message is a protocol error; pings are answered by
//! tungstenite and, like pongs, only prove the peer is there. [`classify`] is the one
//! place where a WebSocket message is matched; everything else here builds on it.
//!
//! [`run_engine`] is the pump between the network and a blocking engine thread. It
//! reads and writes at the same time (two futures over the split socket), so a peer
//! that is busy sending never stops reading: with the engine's own bounds neither side
//! can stall the other. Both queues between the pump and the engine are bounded: a peer
//! that sends faster than the engine takes frames is not read until it does (TCP
//! backpressure), and a peer that stops reading stalls the writer, which gives up after
//! the idle limit. The pump knows the engine only through three small traits
//! ([`EngineInbox`], [`EngineOutbox`], [`EngineLink`]), which the engine's channel link
//! implements: so this module stays a leaf and the engine knows no socket.
//!
//! Compression is the pump's too ([`run_engine_on`] with [`Wire::Zstd`], once the
//! handshake agreed to it): a client's writer compresses the engine's PAGE frames into
//! ZPAGE frames, and every reader expands the peer's back before the engine sees them
//! (see [`crate::protocol::compress`]). A server's pump ([`run_engine_with`], [`Pump`])
//! compresses nothing: it sends the ZPAGE frames of pages its store keeps compressed
//! as they come from the engine's link, and hands the bytes of each ZPAGE it expands to
//! the store ([`PackedPages`]), which keeps them. The engine, and a local sync, see
//! only plain frames.

use std::future::Future;
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::protocol::compress::{
    CompressMode, Compressor, Expander, PackedPage, PackedPages, fingerprint,
};
use crate::protocol::{ErrorCode, Frame, MAX_FRAME_BYTES, code};
use crate::{Error, Result};

/// A batch of frames between a WebSocket and an engine is handed over once it holds
/// this many bytes (16 pages of 4 KiB: one wake-up of the other side for all of them),
/// in both directions: the pump's reader gathers what the socket already holds, and
/// the engine's channel link batches its bulk frames.
pub const CHANNEL_BATCH_BYTES: usize = 64 * 1024;

/// ... or this many frames, whichever comes first. It keeps the frames in flight (the
/// engine's queue of a few batches, its current batch, the pump's) within the 256
/// entries the compressed-page hand-over keeps
/// ([`crate::protocol::compress::PackedPages`]).
pub const CHANNEL_BATCH_FRAMES: usize = 32;

/// Frames the writer sends before it flushes the socket.
const FLUSH_EVERY_FRAMES: usize = 64;

/// How long a last word to a peer (an ERROR frame, the close) may take: the peer may
/// have stopped reading, and it must not hold the session for that.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The WebSocket limits both sides use: no message larger than a protocol frame.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES))
}

/// `fut`'s output, or `None` if `limit` passed first (no limit: it always finishes).
pub async fn within<F: Future>(limit: Option<Duration>, fut: F) -> Option<F::Output> {
    match limit {
        Some(limit) => tokio::time::timeout(limit, fut).await.ok(),
        None => Some(fut.await),
    }
}

/// What one read from a WebSocket means to a protocol peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// One protocol frame (a binary message).
    Frame(Vec<u8>),
    /// A ping or a pong: the peer is there, nothing to act on.
    Alive,
    /// The peer closed the connection (a close message, or the end of the stream).
    Closed,
}

/// The one matcher of WebSocket messages: what `ws.next()` returned, as the protocol
/// sees it. A text message, an oversized message or a broken WebSocket frame is
/// [`Error::Protocol`] (the session ends with an ERROR saying so); any other read
/// failure is [`Error::Disconnected`].
pub fn classify(
    next: Option<std::result::Result<Message, tungstenite::Error>>,
) -> Result<Incoming> {
    match next {
        Some(Ok(Message::Binary(b))) => Ok(Incoming::Frame(b.into())),
        Some(Ok(Message::Close(_))) | None => Ok(Incoming::Closed),
        Some(Ok(Message::Text(_))) => Err(Error::Protocol(
            "text messages are not part of the protocol".into(),
        )),
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Ok(Incoming::Alive),
        Some(Err(e)) => Err(match broken_protocol(&e) {
            Some(why) => Error::Protocol(why),
            None => Error::Disconnected(e.to_string()),
        }),
    }
}

/// What a read error means: `Some(why)` when the peer broke the protocol, `None` when
/// the connection itself failed.
fn broken_protocol(e: &tungstenite::Error) -> Option<String> {
    use tungstenite::Error as E;
    use tungstenite::error::CapacityError;
    match e {
        E::Capacity(CapacityError::MessageTooLong { size, max_size }) => Some(format!(
            "a message of {size} bytes exceeds the limit of {max_size} bytes"
        )),
        E::Capacity(c) => Some(c.to_string()),
        // A peer that went away (killed, its connection reset) broke nothing: the
        // connection was lost.
        E::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake) => None,
        E::Protocol(p) => Some(format!("WebSocket protocol error: {p}")),
        _ => None,
    }
}

/// Receives the next protocol frame, skipping pings and pongs. `Ok(None)`: closed.
pub async fn recv_binary<S>(ws: &mut WebSocketStream<S>) -> Result<Option<Vec<u8>>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match classify(ws.next().await)? {
            Incoming::Frame(b) => return Ok(Some(b)),
            Incoming::Closed => return Ok(None),
            Incoming::Alive => continue,
        }
    }
}

/// Sends one protocol frame (one binary message).
pub async fn send_binary<S>(ws: &mut WebSocketStream<S>, bytes: Vec<u8>) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(Message::Binary(bytes.into()))
        .await
        .map_err(|e| Error::Disconnected(e.to_string()))
}

/// Sends a WebSocket ping (a keep-alive; the peer's pong comes back as
/// [`Incoming::Alive`]).
pub async fn send_ping<S>(ws: &mut WebSocketStream<S>) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(Message::Ping(Vec::new().into()))
        .await
        .map_err(|e| Error::Disconnected(e.to_string()))
}

/// The pump's way to hand frames from the network to the engine.
pub trait EngineInbox: Send {
    /// Hands the frames `held` holds to the engine, in order, as one batch (one wake-up
    /// of the engine for all of them), waiting while its queue is full; `false` if the
    /// engine is gone. The frames are taken out of `held` only once the queue has room
    /// for them (never across a wait), so a pump that stops waiting still has them.
    fn deliver(&self, held: &std::sync::Mutex<Vec<Vec<u8>>>) -> impl Future<Output = bool> + Send;
}

/// Moves `batch`'s frames to the end of what `held` holds.
fn hold(held: &std::sync::Mutex<Vec<Vec<u8>>>, batch: &mut Vec<Vec<u8>>) {
    held.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .append(batch);
}

/// [`EngineInbox::deliver`] over a bounded queue of batches: room first (`reserve`),
/// then the frames, so a pump stopped while waiting for room still holds them.
pub async fn deliver_held(
    queue: &tokio::sync::mpsc::Sender<Vec<Vec<u8>>>,
    held: &std::sync::Mutex<Vec<Vec<u8>>>,
) -> bool {
    match queue.reserve().await {
        Ok(permit) => {
            permit.send(take_held(held));
            true
        }
        Err(_) => false,
    }
}

/// The frames `held` holds, taken out of it.
fn take_held(held: &std::sync::Mutex<Vec<Vec<u8>>>) -> Vec<Vec<u8>> {
    std::mem::take(
        &mut *held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
}

/// The pump's way to take the engine's frames for the network.
pub trait EngineOutbox: Send {
    /// The engine's next frame; `None` once the engine is done.
    fn next_frame(&mut self) -> impl Future<Output = Option<Vec<u8>>> + Send;
    /// The engine's next frame if one is already waiting.
    fn ready_frame(&mut self) -> Option<Vec<u8>>;
}

/// The engine's end of the link, as the pump needs it once the engine is done.
pub trait EngineLink: Send + 'static {
    /// Ends the engine's use of the link; the frames that reached it but that it did
    /// not read, in order.
    fn finish(self) -> Vec<Vec<u8>>;
}

/// Why the writer half stopped.
enum WriterEnd {
    /// The engine finished and everything it sent was written.
    Done,
    /// The connection failed.
    Failed(String),
    /// The peer read nothing for the idle limit.
    Stalled(String),
}

/// Why the reader half stopped.
enum ReaderEnd {
    /// The engine finished while these messages were on their way to it.
    EngineGone(Vec<Vec<u8>>),
    /// The peer closed the connection.
    Closed,
    /// The connection failed.
    Failed(String),
    /// The peer broke the protocol (oversized or text message) or fell silent: this
    /// side says so with one ERROR frame.
    Refused(String),
}

/// How frames travel on one WebSocket's page sync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Wire {
    /// As the engine made them: no compression (what an older peer speaks).
    #[default]
    Plain,
    /// Pages zstd-compressed (ZPAGE) where that makes them smaller; both ends agreed to
    /// it in the handshake.
    Zstd,
}

pub use crate::protocol::compress::COMPRESS_ENV;

/// The page compressions this end offers or accepts: `["zstd"]`, or none when
/// [`COMPRESS_ENV`] is `off` (or `0`, `no`, `none`).
pub fn compressions() -> Vec<String> {
    let off = std::env::var(COMPRESS_ENV).is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "off" | "0" | "no" | "none"
        )
    });
    if off {
        Vec::new()
    } else {
        vec![crate::protocol::compress::ZSTD.to_owned()]
    }
}

/// The page compressions a client in `mode` offers: none for `off`, else `["zstd"]`
/// (`auto` offers it too: whether a page goes compressed is the sender's choice, page
/// by page, and the peer may send compressed pages it keeps).
pub fn offered(mode: CompressMode) -> Vec<String> {
    match mode {
        CompressMode::Off => Vec::new(),
        CompressMode::Auto | CompressMode::Zstd => {
            vec![crate::protocol::compress::ZSTD.to_owned()]
        }
    }
}

/// The server's choice among a client's `offered` compressions: the first it speaks.
pub fn choose(offered: &[String]) -> Option<String> {
    let ours = compressions();
    offered.iter().find(|c| ours.contains(c)).cloned()
}

/// How a page sync travels once the handshake settled on `agreed` (CONFIG's
/// `compress`).
pub fn wire_for(agreed: Option<&str>) -> Wire {
    match agreed {
        Some(crate::protocol::compress::ZSTD) => Wire::Zstd,
        _ => Wire::Plain,
    }
}

/// What crossed the WebSocket in one page sync: the protocol frames' bytes as sent and
/// received (compressed pages compressed), without the WebSocket's own framing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireBytes {
    /// Bytes of the frames this side sent.
    pub sent: u64,
    /// Bytes of the frames this side received.
    pub received: u64,
}

/// What a pump does with pages, beyond what the handshake agreed ([`Wire`]).
#[derive(Debug, Clone, Default)]
pub struct Pump {
    /// How pages travel.
    pub wire: Wire,
    /// With [`Wire::Zstd`]: how to compress the engine's PAGE frames (a client's
    /// push): `Zstd` every page that shrinks, `Auto` while the link is the bottleneck
    /// ([`crate::protocol::compress::Adaptive`]), `Off` none. A server compresses none:
    /// it sends a page as its store keeps it (a stored compressed page reaches the
    /// pump as a ZPAGE frame already).
    pub compress: CompressMode,
    /// With [`Wire::Zstd`]: hand each received compressed page's bytes to this, beside
    /// the plain page the engine gets, so a store keeps the page as it came.
    pub keep_packed: Option<PackedPages>,
}

impl Pump {
    /// The pump a client runs: compressing what it sends when `wire` says so, every
    /// page that shrinks.
    pub fn client(wire: Wire) -> Pump {
        Pump::client_in(wire, CompressMode::Zstd, false)
    }

    /// The pump a client in `mode` runs; `loopback` when the server is on this
    /// machine (127.0.0.0/8, ::1), where `auto` sends plain from the start: there is no
    /// link slower than the compressor, only a CPU both ends share.
    pub fn client_in(wire: Wire, mode: CompressMode, loopback: bool) -> Pump {
        let compress = match mode {
            CompressMode::Auto if loopback => CompressMode::Off,
            mode => mode,
        };
        Pump {
            wire,
            compress,
            keep_packed: None,
        }
    }
}

/// [`run_engine_on`] with plain frames, for callers that need no byte counts.
pub async fn run_engine<S, L, T, F>(
    ws: &mut WebSocketStream<S>,
    link: (L, impl EngineInbox, impl EngineOutbox),
    first: Vec<Vec<u8>>,
    idle: Option<Duration>,
    engine: F,
) -> (Result<T>, Vec<Vec<u8>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
    L: EngineLink,
    T: Send + 'static,
    F: FnOnce(&mut L) -> Result<T> + Send + 'static,
{
    let (result, rest, _) = run_engine_on(ws, link, first, idle, Wire::Plain, engine).await;
    (result, rest)
}

/// Runs `engine` on a blocking thread with `link`, its frames carried over `ws`
/// through `inbox` and `outbox` (the pump's ends of the same link). `first` are frames
/// already read from the network that belong to the engine. With `idle`, a peer silent
/// for that long ends the session. Returns the engine's result and the frames that
/// arrived for after it (in order).
///
/// Every failure is reported to the peer once: the engine sends ERROR for its own, and
/// this pump for the peer's protocol breaches it catches (an oversized or text message,
/// a compressed page that does not expand to one, silence), which it returns as
/// [`Error::Protocol`].
///
/// With [`Wire::Zstd`] pages go compressed where that pays and compressed pages are
/// expanded; with [`Wire::Plain`] a compressed page reaches the engine, which refuses
/// it. Also returns the bytes that crossed the socket.
pub async fn run_engine_on<S, L, T, F>(
    ws: &mut WebSocketStream<S>,
    link: (L, impl EngineInbox, impl EngineOutbox),
    first: Vec<Vec<u8>>,
    idle: Option<Duration>,
    wire: Wire,
    engine: F,
) -> (Result<T>, Vec<Vec<u8>>, WireBytes)
where
    S: AsyncRead + AsyncWrite + Unpin,
    L: EngineLink,
    T: Send + 'static,
    F: FnOnce(&mut L) -> Result<T> + Send + 'static,
{
    run_engine_with(ws, link, first, idle, Pump::client(wire), engine).await
}

/// [`run_engine_on`] with the pump's page handling spelled out ([`Pump`]).
pub async fn run_engine_with<S, L, T, F>(
    ws: &mut WebSocketStream<S>,
    (mut link, inbox, mut outbox): (L, impl EngineInbox, impl EngineOutbox),
    first: Vec<Vec<u8>>,
    idle: Option<Duration>,
    pump: Pump,
    engine: F,
) -> (Result<T>, Vec<Vec<u8>>, WireBytes)
where
    S: AsyncRead + AsyncWrite + Unpin,
    L: EngineLink,
    T: Send + 'static,
    F: FnOnce(&mut L) -> Result<T> + Send + 'static,
{
    let (mut compressor, mut expander) = match pump.wire {
        Wire::Plain => (None, None),
        Wire::Zstd => {
            let compressor = match pump.compress {
                CompressMode::Off => None,
                CompressMode::Zstd => Some(Compressor::new()),
                CompressMode::Auto => Some(Compressor::adaptive()),
            };
            (compressor, Some(Expander::new()))
        }
    };
    let keep_packed = pump.keep_packed.filter(|_| pump.wire == Wire::Zstd);
    let sent = std::sync::atomic::AtomicU64::new(0);
    let received = std::sync::atomic::AtomicU64::new(0);
    let count = |n: &std::sync::atomic::AtomicU64, len: usize| {
        n.fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
    };
    let first: Vec<Vec<u8>> = first
        .into_iter()
        .map(|frame| {
            count(&received, frame.len());
            // Frames read before the page sync (its BEGIN) are never compressed pages;
            // one that is, and does not expand, reaches the engine as it came.
            match &mut expander {
                Some(x) => x.unpack(frame.clone()).unwrap_or(frame),
                None => frame,
            }
        })
        .collect();
    // Frames read from the socket and not yet in the engine's queue: outside the reader,
    // so that what it held when it was stopped is handed back, not dropped with it.
    let starts_with_frames = !first.is_empty();
    let held = std::sync::Mutex::new(first);
    if starts_with_frames {
        // The engine is not running yet; the queue holds this one batch.
        let _ = inbox.deliver(&held).await;
    }
    let handle = tokio::task::spawn_blocking(move || {
        crate::error::debug_panic("engine");
        let result = engine(&mut link);
        (result, link.finish())
    });
    let (mut sink, mut stream) = ws.split();
    let mut extra = Vec::new();
    let mut refused = None;
    let mut stalled = None;
    {
        let (sent, received, held) = (&sent, &received, &held);
        let reader = async move {
            // The frames the socket already holds go to the engine as one batch: one
            // wake-up of the engine thread for many pages, not one for each.
            let mut batch: Vec<Vec<u8>> = Vec::new();
            let mut batch_bytes = 0usize;
            loop {
                let next = match within(idle, stream.next()).await {
                    Some(next) => next,
                    None => {
                        return ReaderEnd::Refused(format!(
                            "no frame for {} s; the session is closed",
                            idle.map_or(0, |d| d.as_secs())
                        ));
                    }
                };
                let mut next = Some(next);
                let mut end = None;
                while let Some(message) = next.take() {
                    match classify(message) {
                        Ok(Incoming::Frame(b)) => {
                            count(received, b.len());
                            let b = match &mut expander {
                                None => b,
                                Some(x) if b.first() == Some(&code::ZPAGE) => {
                                    match x.expand_frame(&b) {
                                        Ok(page) => {
                                            if let Some(keep) = &keep_packed {
                                                keep.push(packed_page(b, &page));
                                            }
                                            page
                                        }
                                        Err(e) => {
                                            end = Some(ReaderEnd::Refused(e.to_string()));
                                            break;
                                        }
                                    }
                                }
                                Some(_) => b,
                            };
                            batch_bytes += b.len();
                            batch.push(b);
                        }
                        Ok(Incoming::Alive) => {}
                        Ok(Incoming::Closed) => {
                            end = Some(ReaderEnd::Closed);
                            break;
                        }
                        Err(Error::Protocol(why)) => {
                            end = Some(ReaderEnd::Refused(why));
                            break;
                        }
                        Err(e) => {
                            end = Some(ReaderEnd::Failed(e.to_string()));
                            break;
                        }
                    }
                    if batch_bytes < CHANNEL_BATCH_BYTES && batch.len() < CHANNEL_BATCH_FRAMES {
                        // Only what is there already: never wait here.
                        next = stream.next().now_or_never();
                    }
                }
                // What arrived before an end reaches the engine first (a peer's ERROR,
                // then its close).
                if !batch.is_empty() {
                    batch_bytes = 0;
                    hold(held, &mut batch);
                    if !inbox.deliver(held).await {
                        return ReaderEnd::EngineGone(take_held(held));
                    }
                }
                if let Some(end) = end {
                    return end;
                }
            }
        };
        let writer = async move {
            // A peer that stops reading stalls these writes: after `idle` it is cut off
            // (its queues are bounded, so until then it costs a bounded amount).
            let stalled = || {
                WriterEnd::Stalled(format!(
                    "the peer read nothing for {} s; the session is closed",
                    idle.map_or(0, |d| d.as_secs())
                ))
            };
            // Each frame is compressed (or not) just before it is fed; the time spent
            // waiting for the socket to take it is what `auto` measures the link by.
            let pack = |c: &mut Option<Compressor>, frame: Vec<u8>| {
                let frame = match c {
                    Some(c) => c.pack(frame),
                    None => frame,
                };
                count(sent, frame.len());
                (frame.len(), Message::Binary(frame.into()))
            };
            let measured = |c: &mut Option<Compressor>, bytes, waited| {
                if let Some(c) = c.as_mut().filter(|c| c.policy().is_some()) {
                    c.wrote(bytes, waited, std::time::Instant::now());
                }
            };
            while let Some(frame) = outbox.next_frame().await {
                let mut n = 0;
                let mut next = Some(frame);
                while let Some(frame) = next.take() {
                    let (len, message) = pack(&mut compressor, frame);
                    let started = std::time::Instant::now();
                    match within(idle, sink.feed(message)).await {
                        None => return stalled(),
                        Some(Err(e)) => return WriterEnd::Failed(e.to_string()),
                        Some(Ok(())) => {}
                    }
                    measured(&mut compressor, len, started.elapsed());
                    n += 1;
                    if n < FLUSH_EVERY_FRAMES {
                        next = outbox.ready_frame();
                    }
                }
                let started = std::time::Instant::now();
                match within(idle, sink.flush()).await {
                    None => return stalled(),
                    Some(Err(e)) => return WriterEnd::Failed(e.to_string()),
                    Some(Ok(())) => {}
                }
                measured(&mut compressor, 0, started.elapsed());
            }
            WriterEnd::Done
        };
        tokio::pin!(reader, writer);
        let mut reader_end = None;
        let written = loop {
            tokio::select! {
                w = &mut writer => break w,
                r = &mut reader, if reader_end.is_none() => {
                    if let ReaderEnd::Failed(why) | ReaderEnd::Refused(why) = &r {
                        tracing::debug!(%why, "reading the connection ended");
                    }
                    reader_end = Some(r);
                }
            }
        };
        match written {
            WriterEnd::Done => {}
            WriterEnd::Failed(e) => {
                tracing::debug!(error = %e, "could not write to the connection");
            }
            WriterEnd::Stalled(why) => {
                tracing::debug!(%why, "writing the connection stalled");
                stalled = Some(why);
            }
        }
        let reader_end = match reader_end {
            Some(end) => Some(end),
            // The engine is done; a message on its way to it is handed back at once.
            None => (&mut reader).now_or_never(),
        };
        match reader_end {
            Some(ReaderEnd::EngineGone(b)) => extra.extend(b),
            Some(ReaderEnd::Refused(why)) => refused = Some(why),
            _ => {}
        }
    }
    // What the reader held when it was stopped, waiting for room in the engine's
    // queue: after the engine's leftovers (it came later), never dropped.
    extra.extend(take_held(&held));
    if let Some(why) = &refused {
        let frame = Frame::Error {
            code: ErrorCode::Protocol as u16,
            message: why.clone(),
        };
        // Bounded: the peer may not be reading either.
        let _ = within(Some(CLOSE_TIMEOUT), send_binary(ws, frame.to_bytes())).await;
    }
    // A peer that does not read gets no ERROR frame (it would never arrive); the
    // session is over all the same.
    let refused = refused.or(stalled);
    let bytes = WireBytes {
        sent: sent.into_inner(),
        received: received.into_inner(),
    };
    match handle.await {
        Ok((result, mut frames)) => {
            frames.extend(extra);
            let result = match (result, refused) {
                // The peer's breach is why an engine lost its link; an engine that
                // failed on its own (its store, say) keeps its own error, the one it
                // reported, even if the peer then went away rudely.
                (Err(Error::Disconnected(_)), Some(why)) => Err(Error::Protocol(why)),
                (result, _) => result,
            };
            (result, frames, bytes)
        }
        // The engine thread panicked: a bug, not a network failure.
        Err(e) => (Err(Error::from(e)), Vec::new(), bytes),
    }
}

/// The compressed page a ZPAGE frame `zpage` carries, tied to `page`, the PAGE frame
/// it expanded to.
fn packed_page(mut zpage: Vec<u8>, page: &[u8]) -> PackedPage {
    let pgno = u32::from_be_bytes([zpage[1], zpage[2], zpage[3], zpage[4]]);
    zpage.drain(..5);
    PackedPage {
        pgno,
        fingerprint: fingerprint(&page[5..]),
        bytes: zpage,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_classified_once_for_both_sides() {
        let binary = Some(Ok(Message::Binary(vec![1, 2].into())));
        assert_eq!(
            classify(binary).expect("binary"),
            Incoming::Frame(vec![1, 2])
        );
        assert_eq!(classify(None).expect("end"), Incoming::Closed);
        let reset = tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        );
        assert!(matches!(
            classify(Some(Err(reset))),
            Err(Error::Disconnected(_))
        ));
        let broken =
            tungstenite::Error::Protocol(tungstenite::error::ProtocolError::NonZeroReservedBits);
        assert!(matches!(
            classify(Some(Err(broken))),
            Err(Error::Protocol(_))
        ));
        assert_eq!(
            classify(Some(Ok(Message::Close(None)))).expect("close"),
            Incoming::Closed
        );
        assert_eq!(
            classify(Some(Ok(Message::Ping(Vec::new().into())))).expect("ping"),
            Incoming::Alive
        );
        let text = classify(Some(Ok(Message::Text("hi".into()))));
        assert!(matches!(text, Err(Error::Protocol(_))), "{text:?}");
        let reset = classify(Some(Err(tungstenite::Error::ConnectionClosed)));
        assert!(matches!(reset, Err(Error::Disconnected(_))), "{reset:?}");
    }

    /// A stand-in for the engine's channel link: plain bounded channels.
    struct FakeLink(tokio::sync::mpsc::Sender<Vec<u8>>);

    impl EngineLink for FakeLink {
        fn finish(self) -> Vec<Vec<u8>> {
            Vec::new()
        }
    }

    struct Inbox(tokio::sync::mpsc::Sender<Vec<Vec<u8>>>);

    impl EngineInbox for Inbox {
        async fn deliver(&self, held: &std::sync::Mutex<Vec<Vec<u8>>>) -> bool {
            deliver_held(&self.0, held).await
        }
    }

    struct Outbox(tokio::sync::mpsc::Receiver<Vec<u8>>);

    impl EngineOutbox for Outbox {
        async fn next_frame(&mut self) -> Option<Vec<u8>> {
            self.0.recv().await
        }
        fn ready_frame(&mut self) -> Option<Vec<u8>> {
            self.0.try_recv().ok()
        }
    }

    /// A peer that never reads is cut off after the idle limit, not waited for, even
    /// while it keeps sending.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_peer_that_stops_reading_is_cut_off_after_the_idle_limit() {
        use tokio_tungstenite::tungstenite::protocol::Role as WsRole;
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let mut ws = WebSocketStream::from_raw_socket(ours, WsRole::Server, None).await;
        // Never read, but never silent either: it sends a frame every 20 ms.
        let peer = WebSocketStream::from_raw_socket(theirs, WsRole::Client, None).await;
        let (mut peer_tx, _peer_rx) = peer.split();
        let chatter = tokio::spawn(async move {
            loop {
                let note = Frame::Message {
                    level: 0,
                    text: "hi".into(),
                };
                if peer_tx
                    .send(Message::Binary(note.to_bytes().into()))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let (in_tx, _in_rx) = tokio::sync::mpsc::channel(64);
        let (out_tx, out_rx) = tokio::sync::mpsc::channel(64);
        let (result, _): (Result<()>, _) = run_engine(
            &mut ws,
            (FakeLink(out_tx), Inbox(in_tx), Outbox(out_rx)),
            Vec::new(),
            Some(Duration::from_millis(300)),
            |link: &mut FakeLink| loop {
                link.0
                    .blocking_send(Frame::page_bytes(1, &[0; 4096]))
                    .map_err(|_| Error::Disconnected("the connection closed".into()))?;
            },
        )
        .await;
        let Err(Error::Protocol(why)) = result else {
            panic!("not cut off: {result:?}");
        };
        assert!(why.contains("read nothing"), "{why}");
        chatter.abort();
    }
}
