//! A [`Link`] carries encoded frames between the two roles and counts the bytes.
//!
//! The in-memory link used for local syncs encodes and decodes every frame exactly as a
//! network transport does, so byte counts and codec checks are the same everywhere.
//! Its origin → replica direction is bounded (pages wait for the replica: memory stays
//! flat); the replica → origin direction is unbounded, but the origin never has more
//! than a window of requested hashes outstanding, so it stays small. The replica never
//! blocks on sending, which rules out a deadlock of two full queues.
//!
//! Bulk frames (PAGE, NODES) are batched into one queue item of up to [`BATCH_BYTES`]:
//! waking the other thread for every 4 KiB page would cost more than the copy. A batch
//! goes out when it is full, before this end waits for a frame, and with any other
//! frame, so nothing the peer waits for is ever held back.

use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError};

use crate::protocol::Frame;
use crate::{Error, Result};

/// Batches that may wait in the origin → replica queue.
const MEM_QUEUE_BATCHES: usize = 16;

/// The size a batch of frames reaches before it is queued.
const BATCH_BYTES: usize = 256 * 1024;

/// A bidirectional, ordered frame channel between the two roles.
pub trait Link {
    /// Sends one frame.
    fn send(&mut self, frame: &Frame) -> Result<()>;
    /// Sends a PAGE frame for a borrowed page without building a [`Frame`] first.
    fn send_page(&mut self, pgno: u32, data: &[u8]) -> Result<()>;
    /// Waits for the next frame.
    fn recv(&mut self) -> Result<Frame>;
    /// The next frame if one has already arrived.
    fn try_recv(&mut self) -> Result<Option<Frame>>;
    /// Bytes sent so far.
    fn bytes_sent(&self) -> u64;
    /// Bytes received so far.
    fn bytes_received(&self) -> u64;
}

enum Tx {
    Bounded(SyncSender<Vec<Vec<u8>>>),
    Unbounded(Sender<Vec<Vec<u8>>>),
}

/// One end of an in-memory link.
pub struct MemLink {
    tx: Tx,
    rx: Receiver<Vec<Vec<u8>>>,
    /// Frames encoded but not yet queued, and their total size.
    batch: Vec<Vec<u8>>,
    batch_bytes: usize,
    /// Frames received but not yet returned.
    inbox: std::collections::VecDeque<Vec<u8>>,
    sent: u64,
    received: u64,
}

/// A connected pair: `(origin end, replica end)`.
pub fn mem_pair() -> (MemLink, MemLink) {
    let (to_replica, from_origin) = std::sync::mpsc::sync_channel(MEM_QUEUE_BATCHES);
    let (to_origin, from_replica) = std::sync::mpsc::channel();
    (
        MemLink::new(Tx::Bounded(to_replica), from_replica),
        MemLink::new(Tx::Unbounded(to_origin), from_origin),
    )
}

impl MemLink {
    fn new(tx: Tx, rx: Receiver<Vec<Vec<u8>>>) -> Self {
        MemLink {
            tx,
            rx,
            batch: Vec::new(),
            batch_bytes: 0,
            inbox: Default::default(),
            sent: 0,
            received: 0,
        }
    }

    /// Queues the frames batched so far.
    fn flush(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let queued = match &self.tx {
            Tx::Bounded(tx) => tx.send(batch).is_ok(),
            Tx::Unbounded(tx) => tx.send(batch).is_ok(),
        };
        if queued {
            Ok(())
        } else {
            Err(Error::Disconnected("the peer has gone".into()))
        }
    }

    fn decode(&mut self, bytes: Vec<u8>) -> Result<Frame> {
        self.received += bytes.len() as u64;
        Frame::decode(&bytes).map_err(|e| Error::Protocol(e.to_string()))
    }

    /// Adds encoded bytes to the batch; a frame the peer may be waiting for (`!bulk`)
    /// or a full batch goes out at once.
    fn queue(&mut self, bytes: Vec<u8>, bulk: bool) -> Result<()> {
        self.sent += bytes.len() as u64;
        self.batch_bytes += bytes.len();
        self.batch.push(bytes);
        if !bulk || self.batch_bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }
}

impl Link for MemLink {
    fn send(&mut self, frame: &Frame) -> Result<()> {
        let bulk = matches!(frame, Frame::Page { .. } | Frame::Nodes { .. });
        self.queue(frame.to_bytes(), bulk)
    }

    fn send_page(&mut self, pgno: u32, data: &[u8]) -> Result<()> {
        self.queue(Frame::page_bytes(pgno, data), true)
    }

    fn recv(&mut self) -> Result<Frame> {
        self.flush()?;
        if self.inbox.is_empty() {
            let batch = self
                .rx
                .recv()
                .map_err(|_| Error::Disconnected("the peer closed the session".into()))?;
            self.inbox.extend(batch);
        }
        let bytes = self
            .inbox
            .pop_front()
            .expect("a received batch is never empty");
        self.decode(bytes)
    }

    fn try_recv(&mut self) -> Result<Option<Frame>> {
        self.flush()?;
        if self.inbox.is_empty() {
            match self.rx.try_recv() {
                Ok(batch) => self.inbox.extend(batch),
                Err(TryRecvError::Empty) => return Ok(None),
                Err(TryRecvError::Disconnected) => {
                    return Err(Error::Disconnected("the peer closed the session".into()));
                }
            }
        }
        let bytes = self
            .inbox
            .pop_front()
            .expect("a received batch is never empty");
        self.decode(bytes).map(Some)
    }

    fn bytes_sent(&self) -> u64 {
        self.sent
    }

    fn bytes_received(&self) -> u64 {
        self.received
    }
}

impl Drop for MemLink {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// Which role a [`ChannelLink`] carries. It decides which direction is bounded: the
/// frames a role *receives* in bulk (pages, for a replica) wait in a bounded queue; the
/// frames it receives only as answers to its own requests (node hashes, for an origin)
/// are bounded by its request window instead, so that side can never stall the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends pages, receives hashes.
    Origin,
    /// Receives pages, sends hashes.
    Replica,
}

/// Frames that may wait between a WebSocket and the engine, in bounded directions.
const CHANNEL_FRAMES: usize = 64;

enum AsyncTx {
    Bounded(tokio::sync::mpsc::Sender<Vec<u8>>),
    Unbounded(tokio::sync::mpsc::UnboundedSender<Vec<u8>>),
}

enum AsyncRx {
    Bounded(tokio::sync::mpsc::Receiver<Vec<u8>>),
    Unbounded(tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>),
}

impl AsyncRx {
    fn blocking_recv(&mut self) -> Option<Vec<u8>> {
        match self {
            AsyncRx::Bounded(rx) => rx.blocking_recv(),
            AsyncRx::Unbounded(rx) => rx.blocking_recv(),
        }
    }

    fn try_recv(&mut self) -> std::result::Result<Vec<u8>, tokio::sync::mpsc::error::TryRecvError> {
        match self {
            AsyncRx::Bounded(rx) => rx.try_recv(),
            AsyncRx::Unbounded(rx) => rx.try_recv(),
        }
    }

    async fn recv(&mut self) -> Option<Vec<u8>> {
        match self {
            AsyncRx::Bounded(rx) => rx.recv().await,
            AsyncRx::Unbounded(rx) => rx.recv().await,
        }
    }
}

impl AsyncTx {
    fn blocking_send(&self, bytes: Vec<u8>) -> bool {
        match self {
            AsyncTx::Bounded(tx) => tx.blocking_send(bytes).is_ok(),
            AsyncTx::Unbounded(tx) => tx.send(bytes).is_ok(),
        }
    }

    async fn send(&self, bytes: Vec<u8>) -> std::result::Result<(), Vec<u8>> {
        match self {
            AsyncTx::Bounded(tx) => tx.send(bytes).await.map_err(|e| e.0),
            AsyncTx::Unbounded(tx) => tx.send(bytes).map_err(|e| e.0),
        }
    }
}

/// The engine's end of a link whose other end is async code (a WebSocket pump). Its
/// methods block: use it on a blocking thread (`spawn_blocking`), never in async code.
pub struct ChannelLink {
    tx: AsyncTx,
    rx: AsyncRx,
    sent: u64,
    received: u64,
}

/// The async end of a [`ChannelLink`]: one half per direction, so a pump can read the
/// network and write it at the same time.
pub struct PumpEnd {
    /// Frames from the network to the engine.
    pub to_engine: ToEngine,
    /// Frames from the engine to the network.
    pub from_engine: FromEngine,
}

/// The pump's sending half towards the engine.
pub struct ToEngine(AsyncTx);

/// The pump's receiving half from the engine.
pub struct FromEngine(AsyncRx);

/// What is left of a [`ChannelLink`] once the engine is done: frames that reached it
/// but that it did not read (the peer's next control frame, for example).
pub struct Leftovers(AsyncRx);

impl Leftovers {
    /// The frames not read, in order.
    pub fn drain(mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Ok(b) = self.0.try_recv() {
            out.push(b);
        }
        out
    }
}

/// A link for `role` between a blocking engine and an async pump.
pub fn channel_link(role: Role) -> (ChannelLink, PumpEnd) {
    use tokio::sync::mpsc::{channel, unbounded_channel};
    let (in_tx, in_rx, out_tx, out_rx) = match role {
        Role::Replica => {
            let (a, b) = channel(CHANNEL_FRAMES);
            let (c, d) = unbounded_channel();
            (
                AsyncTx::Bounded(a),
                AsyncRx::Bounded(b),
                AsyncTx::Unbounded(c),
                AsyncRx::Unbounded(d),
            )
        }
        Role::Origin => {
            let (a, b) = unbounded_channel();
            let (c, d) = channel(CHANNEL_FRAMES);
            (
                AsyncTx::Unbounded(a),
                AsyncRx::Unbounded(b),
                AsyncTx::Bounded(c),
                AsyncRx::Bounded(d),
            )
        }
    };
    (
        ChannelLink {
            tx: out_tx,
            rx: in_rx,
            sent: 0,
            received: 0,
        },
        PumpEnd {
            to_engine: ToEngine(in_tx),
            from_engine: FromEngine(out_rx),
        },
    )
}

impl ChannelLink {
    fn send_bytes(&mut self, bytes: Vec<u8>) -> Result<()> {
        self.sent += bytes.len() as u64;
        if self.tx.blocking_send(bytes) {
            Ok(())
        } else {
            Err(Error::Disconnected("the connection closed".into()))
        }
    }

    /// Ends the engine's use of the link: closes its sending half (the pump then knows
    /// the engine is done) and keeps what it did not read.
    pub fn finish(self) -> Leftovers {
        Leftovers(self.rx)
    }

    fn decode(&mut self, bytes: Vec<u8>) -> Result<Frame> {
        self.received += bytes.len() as u64;
        Frame::decode(&bytes).map_err(|e| Error::Protocol(e.to_string()))
    }
}

impl Link for ChannelLink {
    fn send(&mut self, frame: &Frame) -> Result<()> {
        self.send_bytes(frame.to_bytes())
    }

    fn send_page(&mut self, pgno: u32, data: &[u8]) -> Result<()> {
        self.send_bytes(Frame::page_bytes(pgno, data))
    }

    fn recv(&mut self) -> Result<Frame> {
        let bytes = self
            .rx
            .blocking_recv()
            .ok_or_else(|| Error::Disconnected("the connection closed".into()))?;
        self.decode(bytes)
    }

    fn try_recv(&mut self) -> Result<Option<Frame>> {
        use tokio::sync::mpsc::error::TryRecvError;
        match self.rx.try_recv() {
            Ok(bytes) => self.decode(bytes).map(Some),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => {
                Err(Error::Disconnected("the connection closed".into()))
            }
        }
    }

    fn bytes_sent(&self) -> u64 {
        self.sent
    }

    fn bytes_received(&self) -> u64 {
        self.received
    }
}

impl ToEngine {
    /// Hands a frame from the network to the engine; gives it back if the engine is
    /// gone.
    pub async fn send(&self, bytes: Vec<u8>) -> std::result::Result<(), Vec<u8>> {
        self.0.send(bytes).await
    }
}

impl FromEngine {
    /// The engine's next frame for the network; `None` once the engine is done.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        self.0.recv().await
    }

    /// The engine's next frame if one is already waiting.
    pub fn try_recv(&mut self) -> Option<Vec<u8>> {
        self.0.try_recv().ok()
    }
}
