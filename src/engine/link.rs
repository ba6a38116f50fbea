//! A [`Link`] carries encoded frames between the two roles and counts the bytes.
//!
//! The in-memory link used for local syncs encodes and decodes every frame exactly as a
//! network transport does, so byte counts and codec checks are the same everywhere.
//! Its origin → replica direction is bounded (pages wait for the replica: memory stays
//! flat); the replica → origin direction is unbounded, but the origin never has more
//! than a window of requested hashes outstanding, so it stays small. The replica never
//! blocks on sending, which rules out a deadlock of two full queues.

use std::sync::mpsc::{Receiver, Sender, SyncSender, TryRecvError};

use crate::protocol::Frame;
use crate::{Error, Result};

/// Frames that may wait in the origin → replica queue (at most ~5 MiB of 64 KiB pages).
const MEM_QUEUE_FRAMES: usize = 64;

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
    Bounded(SyncSender<Vec<u8>>),
    Unbounded(Sender<Vec<u8>>),
}

/// One end of an in-memory link.
pub struct MemLink {
    tx: Tx,
    rx: Receiver<Vec<u8>>,
    sent: u64,
    received: u64,
}

/// A connected pair: `(origin end, replica end)`.
pub fn mem_pair() -> (MemLink, MemLink) {
    let (to_replica, from_origin) = std::sync::mpsc::sync_channel(MEM_QUEUE_FRAMES);
    let (to_origin, from_replica) = std::sync::mpsc::channel();
    (
        MemLink {
            tx: Tx::Bounded(to_replica),
            rx: from_replica,
            sent: 0,
            received: 0,
        },
        MemLink {
            tx: Tx::Unbounded(to_origin),
            rx: from_origin,
            sent: 0,
            received: 0,
        },
    )
}

impl MemLink {
    fn decode(&mut self, bytes: Vec<u8>) -> Result<Frame> {
        self.received += bytes.len() as u64;
        Frame::decode(&bytes).map_err(|e| Error::Protocol(e.to_string()))
    }
}

impl Link for MemLink {
    fn send(&mut self, frame: &Frame) -> Result<()> {
        let bytes = frame.to_bytes();
        let len = bytes.len() as u64;
        let sent = match &self.tx {
            Tx::Bounded(tx) => tx.send(bytes).is_ok(),
            Tx::Unbounded(tx) => tx.send(bytes).is_ok(),
        };
        if !sent {
            return Err(Error::Disconnected("the peer has gone".into()));
        }
        self.sent += len;
        Ok(())
    }

    fn recv(&mut self) -> Result<Frame> {
        let bytes = self
            .rx
            .recv()
            .map_err(|_| Error::Disconnected("the peer closed the session".into()))?;
        self.decode(bytes)
    }

    fn try_recv(&mut self) -> Result<Option<Frame>> {
        match self.rx.try_recv() {
            Ok(bytes) => self.decode(bytes).map(Some),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => {
                Err(Error::Disconnected("the peer closed the session".into()))
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
