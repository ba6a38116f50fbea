//! Running an engine role over a WebSocket: the pump between the network and the
//! blocking engine thread. Used by the client and by the server alike.
//!
//! The pump reads and writes at the same time (two futures over the split socket), so
//! a peer that is busy sending never stops reading: with the engine's own bounds (see
//! [`crate::engine::Role`]) neither side can stall the other. Both queues between the
//! pump and the engine are bounded: a peer that sends faster than the engine takes
//! frames is not read until it does (TCP backpressure), and a peer that stops reading
//! stalls the writer, which gives up after the idle limit. One protocol frame is one
//! binary message; text messages are a protocol error; pings are answered by
//! tungstenite.

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::engine::{ChannelLink, PumpEnd, Role, channel_link};
use crate::protocol::MAX_FRAME_BYTES;
use crate::{Error, Result};

/// Frames the writer sends before it flushes the socket.
const FLUSH_EVERY_FRAMES: usize = 64;

/// The WebSocket limits both sides use: no message larger than a protocol frame.
pub(crate) fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES))
}

/// How long a last word to a peer (an ERROR frame, the close) may take: the peer may
/// have stopped reading, and it must not hold the session for that.
pub(crate) const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// `fut`'s output, or `None` if `limit` passed first (no limit: it always finishes).
pub(crate) async fn within<F: std::future::Future>(
    limit: Option<std::time::Duration>,
    fut: F,
) -> Option<F::Output> {
    match limit {
        Some(limit) => tokio::time::timeout(limit, fut).await.ok(),
        None => Some(fut.await),
    }
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
    /// The engine finished while this message was on its way to it.
    EngineGone(Vec<u8>),
    /// The peer closed the connection.
    Closed,
    /// The connection failed.
    Failed(String),
    /// The peer broke the protocol (oversized or text message) or fell silent: this
    /// side says so with one ERROR frame.
    Refused(String),
}

/// What a read error means: `Some(why)` when the peer broke the protocol (the session
/// ends with an ERROR saying so), `None` when the connection itself failed.
fn broken_protocol(e: &tokio_tungstenite::tungstenite::Error) -> Option<String> {
    use tokio_tungstenite::tungstenite::Error as E;
    use tokio_tungstenite::tungstenite::error::CapacityError;
    match e {
        E::Capacity(CapacityError::MessageTooLong { size, max_size }) => Some(format!(
            "a message of {size} bytes exceeds the limit of {max_size} bytes"
        )),
        E::Capacity(c) => Some(c.to_string()),
        E::Protocol(p) => Some(format!("WebSocket protocol error: {p}")),
        _ => None,
    }
}

/// Receives the next binary message, skipping pings and pongs. `Ok(None)`: closed.
pub(crate) async fn recv_binary<S>(ws: &mut WebSocketStream<S>) -> Result<Option<Vec<u8>>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => return Ok(Some(b.into())),
            Some(Ok(Message::Close(_))) | None => return Ok(None),
            Some(Ok(Message::Text(_))) => {
                return Err(Error::Protocol(
                    "text messages are not part of the protocol".into(),
                ));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                return Err(match broken_protocol(&e) {
                    Some(why) => Error::Protocol(why),
                    None => Error::Disconnected(e.to_string()),
                });
            }
        }
    }
}

/// Sends one binary message.
pub(crate) async fn send_binary<S>(ws: &mut WebSocketStream<S>, bytes: Vec<u8>) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(Message::Binary(bytes.into()))
        .await
        .map_err(|e| Error::Disconnected(e.to_string()))
}

/// Runs `engine` on a blocking thread as `role`, its frames carried over `ws`. `first`
/// are frames already read from the network that belong to the engine. With `idle`,
/// a peer silent for that long ends the session. Returns the engine's result and the
/// frames that arrived for after it (in order).
///
/// Every failure is reported to the peer once: the engine sends ERROR for its own, and
/// this pump for the peer's protocol breaches it catches (an oversized or text message,
/// silence), which it returns as [`Error::Protocol`].
pub(crate) async fn run_engine<S, T, F>(
    ws: &mut WebSocketStream<S>,
    role: Role,
    first: Vec<Vec<u8>>,
    idle: Option<std::time::Duration>,
    engine: F,
) -> (Result<T>, Vec<Vec<u8>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: Send + 'static,
    F: FnOnce(&mut ChannelLink) -> Result<T> + Send + 'static,
{
    let (
        mut link,
        PumpEnd {
            to_engine,
            mut from_engine,
        },
    ) = channel_link(role);
    for frame in first {
        // The engine is not running yet; the queue holds these few frames.
        let _ = to_engine.send(frame).await;
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
        let reader = async move {
            loop {
                let next = match idle {
                    Some(limit) => match tokio::time::timeout(limit, stream.next()).await {
                        Ok(next) => next,
                        Err(_) => {
                            return ReaderEnd::Refused(format!(
                                "no frame for {} s; the session is closed",
                                limit.as_secs()
                            ));
                        }
                    },
                    None => stream.next().await,
                };
                match next {
                    Some(Ok(Message::Binary(b))) => {
                        if let Err(b) = to_engine.send(b.into()).await {
                            return ReaderEnd::EngineGone(b);
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => return ReaderEnd::Closed,
                    Some(Ok(Message::Text(_))) => {
                        return ReaderEnd::Refused(
                            "text messages are not part of the protocol".into(),
                        );
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        return match broken_protocol(&e) {
                            Some(why) => ReaderEnd::Refused(why),
                            None => ReaderEnd::Failed(e.to_string()),
                        };
                    }
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
            while let Some(frame) = from_engine.recv().await {
                let fed = within(idle, sink.feed(Message::Binary(frame.into()))).await;
                match fed {
                    None => return stalled(),
                    Some(Err(e)) => return WriterEnd::Failed(e.to_string()),
                    Some(Ok(())) => {}
                }
                let mut n = 1;
                while n < FLUSH_EVERY_FRAMES {
                    let Some(frame) = from_engine.try_recv() else {
                        break;
                    };
                    match within(idle, sink.feed(Message::Binary(frame.into()))).await {
                        None => return stalled(),
                        Some(Err(e)) => return WriterEnd::Failed(e.to_string()),
                        Some(Ok(())) => {}
                    }
                    n += 1;
                }
                match within(idle, sink.flush()).await {
                    None => return stalled(),
                    Some(Err(e)) => return WriterEnd::Failed(e.to_string()),
                    Some(Ok(())) => {}
                }
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
            Some(ReaderEnd::EngineGone(b)) => extra.push(b),
            Some(ReaderEnd::Refused(why)) => refused = Some(why),
            _ => {}
        }
    }
    if let Some(why) = &refused {
        let frame = crate::protocol::Frame::Error {
            code: crate::protocol::ErrorCode::Protocol as u16,
            message: why.clone(),
        };
        // Bounded: the peer may not be reading either.
        let _ = within(Some(CLOSE_TIMEOUT), send_binary(ws, frame.to_bytes())).await;
    }
    // A peer that does not read gets no ERROR frame (it would never arrive); the
    // session is over all the same.
    let refused = refused.or(stalled);
    match handle.await {
        Ok((result, leftovers)) => {
            let mut frames = leftovers.drain();
            frames.extend(extra);
            let result = match (result, refused) {
                // The peer's breach is why an engine lost its link; an engine that
                // failed on its own (its store, say) keeps its own error, the one it
                // reported, even if the peer then went away rudely.
                (Err(Error::Disconnected(_)), Some(why)) => Err(Error::Protocol(why)),
                (result, _) => result,
            };
            (result, frames)
        }
        // The engine thread panicked: a bug, not a network failure.
        Err(e) => (Err(Error::from(e)), Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Link;
    use tokio_tungstenite::tungstenite::protocol::Role as WsRole;

    /// A peer that never reads is cut off after the idle limit, not waited for.
    #[test]
    fn a_peer_that_stops_reading_is_cut_off_after_the_idle_limit() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            let mut ws = WebSocketStream::from_raw_socket(ours, WsRole::Server, None).await;
            // Never read, but never silent either: it sends a frame every 20 ms.
            let peer = WebSocketStream::from_raw_socket(theirs, WsRole::Client, None).await;
            let (mut peer_tx, _peer_rx) = peer.split();
            let chatter = tokio::spawn(async move {
                loop {
                    let note = crate::protocol::Frame::Message {
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
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            });
            let started = std::time::Instant::now();
            let (result, _): (Result<()>, _) = run_engine(
                &mut ws,
                Role::Origin,
                Vec::new(),
                Some(std::time::Duration::from_millis(300)),
                |link| loop {
                    link.send_page(1, &[0; 4096])?;
                },
            )
            .await;
            let Err(Error::Protocol(why)) = result else {
                panic!("not cut off: {result:?}");
            };
            assert!(why.contains("read nothing"), "{why}");
            assert!(started.elapsed() < std::time::Duration::from_secs(10));
            chatter.abort();
        });
    }
}
