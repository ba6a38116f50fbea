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
}

impl Link for MemLink {
    fn send(&mut self, frame: &Frame) -> Result<()> {
        let bytes = frame.to_bytes();
        self.sent += bytes.len() as u64;
        self.batch_bytes += bytes.len();
        self.batch.push(bytes);
        let bulk = matches!(frame, Frame::Page { .. } | Frame::Nodes { .. });
        if !bulk || self.batch_bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
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
