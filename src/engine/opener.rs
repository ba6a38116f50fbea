//! Opening sealed pages beside the replica's own work.
//!
//! A replica that opens a sealed session does, for every page: AES-256-GCM-SIV open,
//! the plaintext page's hash, its identity again (HMAC), and the write. Done in turn on
//! one thread, a full encrypted pull took 1.44× a plaintext pull's time on the 216 MB
//! benchmark database, with the other core mostly idle (the store side only reads). An
//! [`Opener`] hands the opening and the checks to [`WORKERS`] threads of their own, a
//! batch at a time in turn, and hands back the opened pages in the order they came;
//! the replica's thread writes them and answers the origin meanwhile.
//!
//! Why two threads, and why they hash as well (docs/performance.md, "Opening on two
//! threads, one digest over identities"): with one, doing the open and the hash, `perf` put
//! 58% of a full encrypted pull's samples on it, and it set the pace (1.32×); with the
//! hash left to the replica's thread, that thread set it instead (1.39×); with two,
//! each holds under 30% and the four threads share the two cores (1.28×).
//!
//! Bounded: at most [`IN_FLIGHT`] batches of [`BATCH_PAGES`] pages are out at once, so
//! the memory held is a few hundred KiB whatever the database's size. A page that does
//! not open, or is not the page of its identity, ends the session with the error it
//! would have had on the replica's own thread; nothing was written of it, and a sealed
//! session commits only after every page came back ([`Opener::finish`]).

use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::thread::JoinHandle;

use crate::crypt::EncryptionKey;
use crate::digest::{Hash, hex, page_hash};
use crate::{Error, Result};

/// Pages sent to an opening thread at a time: one wake-up for many pages.
const BATCH_PAGES: usize = 32;

/// Opening threads: the work of opening a page and hashing it, split two ways, is
/// about what the replica's thread and the store's do for it together.
const WORKERS: usize = 2;

/// Batches out at once (sent, not yet taken back), over all the threads.
const IN_FLIGHT: usize = 2 * WORKERS;

/// A sealed page as it came: page number, identity, sealed bytes.
type Sealed = (u32, Hash, Vec<u8>);

/// A page opened and checked as the page of its identity: page number, plaintext,
/// its page hash.
pub(super) struct Opened {
    pub pgno: u32,
    pub data: Vec<u8>,
    pub hash: Hash,
}

/// One opening thread: its inbox and its outbox.
struct Worker {
    inbox: Option<SyncSender<Vec<Sealed>>>,
    outbox: Receiver<Result<Vec<Opened>>>,
    thread: Option<JoinHandle<()>>,
}

/// Opens sealed pages on threads of their own (see the module doc).
pub(super) struct Opener {
    workers: Vec<Worker>,
    batch: Vec<Sealed>,
    /// Batches sent so far; batch `n` went to worker `n % WORKERS`.
    sent: usize,
    /// Batches taken back so far, in the order they were sent.
    taken: usize,
}

impl Opener {
    /// Starts the opening threads for pages sealed with `key`.
    pub(super) fn start(key: &EncryptionKey, page_size: u32) -> Result<Opener> {
        let mut workers = Vec::with_capacity(WORKERS);
        for _ in 0..WORKERS {
            let (inbox, batches) = std::sync::mpsc::sync_channel::<Vec<Sealed>>(IN_FLIGHT);
            let (done, outbox) = std::sync::mpsc::channel();
            let key = key.clone();
            let thread = std::thread::Builder::new()
                .name("sqlferry-open".into())
                .spawn(move || {
                    for batch in batches {
                        let opened = open_batch(&key, page_size, batch);
                        let failed = opened.is_err();
                        if done.send(opened).is_err() || failed {
                            return;
                        }
                    }
                })
                .map_err(|e| Error::Bug(format!("could not start a page-opening thread: {e}")))?;
            workers.push(Worker {
                inbox: Some(inbox),
                outbox,
                thread: Some(thread),
            });
        }
        Ok(Opener {
            workers,
            batch: Vec::with_capacity(BATCH_PAGES),
            sent: 0,
            taken: 0,
        })
    }

    /// Adds a sealed page; hands each page opened by now to `done`, in the order the
    /// pages came.
    pub(super) fn add(
        &mut self,
        page: Sealed,
        done: &mut dyn FnMut(Opened) -> Result<()>,
    ) -> Result<()> {
        self.batch.push(page);
        if self.batch.len() >= BATCH_PAGES {
            self.send()?;
        }
        // Take back what is ready, in order; wait only when the batches out reach the
        // bound.
        while self.taken < self.sent {
            let outbox = &self.workers[self.taken % WORKERS].outbox;
            let opened = if self.sent - self.taken >= IN_FLIGHT {
                outbox.recv().map_err(|_| gone())?
            } else {
                match outbox.try_recv() {
                    Ok(r) => r,
                    Err(TryRecvError::Empty) => return Ok(()),
                    Err(TryRecvError::Disconnected) => return Err(gone()),
                }
            };
            self.taken += 1;
            for page in opened? {
                done(page)?;
            }
        }
        Ok(())
    }

    /// Hands every page not yet handed back to `done`: after it, every page added is
    /// written (or the session failed).
    pub(super) fn finish(&mut self, done: &mut dyn FnMut(Opened) -> Result<()>) -> Result<()> {
        if !self.batch.is_empty() {
            self.send()?;
        }
        while self.taken < self.sent {
            let opened = self.workers[self.taken % WORKERS]
                .outbox
                .recv()
                .map_err(|_| gone())?;
            self.taken += 1;
            for page in opened? {
                done(page)?;
            }
        }
        Ok(())
    }

    fn send(&mut self) -> Result<()> {
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH_PAGES));
        let worker = &self.workers[self.sent % WORKERS];
        let inbox = worker.inbox.as_ref().ok_or_else(gone)?;
        if inbox.send(batch).is_err() {
            return Err(self.failure());
        }
        self.sent += 1;
        Ok(())
    }

    /// Why a thread stopped taking pages: the error one sent, if it is still queued.
    fn failure(&mut self) -> Error {
        for worker in &self.workers {
            while let Ok(r) = worker.outbox.try_recv() {
                if let Err(e) = r {
                    return e;
                }
            }
        }
        gone()
    }
}

impl Drop for Opener {
    fn drop(&mut self) {
        // Closing their inboxes ends the threads once they are done with what they hold.
        for worker in &mut self.workers {
            worker.inbox = None;
        }
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

fn gone() -> Error {
    Error::Bug("a page-opening thread stopped".into())
}

/// Opens and checks each page of `batch`: opened under the identity it came with (a
/// changed byte, or another identity's sealed bytes, do not open), then its identity
/// made again from the plaintext, so a page is never taken for one it is not.
fn open_batch(key: &EncryptionKey, page_size: u32, batch: Vec<Sealed>) -> Result<Vec<Opened>> {
    let mut out = Vec::with_capacity(batch.len());
    for (pgno, identity, sealed) in batch {
        let mut data = Vec::with_capacity(page_size as usize);
        key.open_page(&identity, &sealed, &mut data)?;
        let hash = page_hash(pgno, &data);
        if key.page_identity(&hash) != identity {
            return Err(Error::Verification(format!(
                "page {pgno} opened, but it is not the page of identity {} it came as; nothing was committed",
                hex(&identity)
            )));
        }
        out.push(Opened { pgno, data, hash });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> EncryptionKey {
        EncryptionKey::from_bytes(&[byte; 32])
    }

    fn sealed(key: &EncryptionKey, pgno: u32, fill: u8) -> Sealed {
        let page = vec![fill; 4096];
        let identity = key.page_identity(&page_hash(pgno, &page));
        let mut bytes = Vec::new();
        key.seal_page(&identity, &page, &mut bytes).expect("sealed");
        (pgno, identity, bytes)
    }

    /// Every page comes back opened, in the order added, whatever the batching.
    #[test]
    fn pages_come_back_opened_and_in_order() {
        let k = key(1);
        let mut opener = Opener::start(&k, 4096).expect("started");
        let mut got = Vec::new();
        let mut done = |o: Opened| {
            assert_eq!(o.hash, page_hash(o.pgno, &o.data));
            got.push((o.pgno, o.data[0]));
            Ok(())
        };
        let n = (BATCH_PAGES * IN_FLIGHT * 3 + 5) as u32;
        for pgno in 1..=n {
            opener
                .add(sealed(&k, pgno, pgno as u8), &mut done)
                .expect("added");
        }
        opener.finish(&mut done).expect("finished");
        let want: Vec<_> = (1..=n).map(|p| (p, p as u8)).collect();
        assert_eq!(got, want);
    }

    /// A page that does not open, or opens as another identity's page, is the
    /// session's error, and nothing after it is handed back.
    #[test]
    fn a_page_that_does_not_open_is_the_error() {
        let k = key(2);
        for bad in ["flipped", "other identity"] {
            let mut opener = Opener::start(&k, 4096).expect("started");
            let mut handed = 0u32;
            let mut done = |_: Opened| {
                handed += 1;
                Ok(())
            };
            let mut result = Ok(());
            for pgno in 1..=200u32 {
                let mut page = sealed(&k, pgno, 7);
                if pgno == 40 {
                    match bad {
                        "flipped" => page.2[100] ^= 1,
                        // Another page's bytes, sealed under this page's identity:
                        // they open, and are not this page.
                        _ => {
                            page.2.clear();
                            k.seal_page(&page.1, &[8; 4096], &mut page.2)
                                .expect("sealed");
                        }
                    }
                }
                result = opener.add(page, &mut done);
                if result.is_err() {
                    break;
                }
            }
            let err = result
                .and_then(|()| opener.finish(&mut done))
                .expect_err(bad);
            assert_eq!(err.kind(), crate::ErrorKind::Verification, "{bad}: {err}");
            drop(opener);
            assert!(handed < 40, "{bad}: {handed} pages handed back");
        }
    }
}
