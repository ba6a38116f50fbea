//! Faults of the server's own house, named for what they are.
//!
//! A failure in the server's own files (`server.db`, a replica's file: a full disk, an
//! I/O error) is the server's, not the client's: it travels as
//! [`crate::protocol::ErrorCode::ServerError`] (HTTP 503 before an upgrade), so the
//! client exits 10 and a subscriber keeps retrying. It is never "the key was refused",
//! and never "your local file" (the code a local I/O error would get on the wire).
//!
//! Invariants:
//! - Only errors of the server's files change class here (I/O and SQLite errors other
//!   than a lock held by another session); a client's bad input (a malformed page, a
//!   conflict, a wrong key) keeps its own class.
//! - A full disk is said so: SQLite's `SQLITE_FULL`, `ENOSPC`/`EDQUOT`, or an I/O error
//!   while a small probe write in the data directory fails for lack of space (SQLite
//!   reports a full tmpfs as "disk I/O error" when it grows its shared-memory file).

use std::path::Path;

use crate::engine::{PageSource, PageTarget, ScanFn};
pub use crate::error::disk_full;
use crate::protocol::Hash;
use crate::{Error, ErrorKind, Result};

/// Whether `e` is a failure of the server's own files (rather than of the request).
fn is_own_fault(e: &Error) -> bool {
    match e {
        Error::Io { .. } => true,
        Error::Sqlite { .. } => matches!(e.kind(), ErrorKind::LocalIo | ErrorKind::NotADatabase),
        _ => false,
    }
}

/// `e` as the client should see it: a failure of the server's own files (under `data`)
/// becomes [`Error::Server`], saying so when the disk is full; anything else is
/// returned as it is.
pub(crate) fn server_side(e: Error, data: &Path) -> Error {
    if !is_own_fault(&e) {
        return e;
    }
    if e.says_disk_full() || disk_full(data) {
        Error::Server(format!("the disk holding {} is full ({e})", data.display()))
    } else {
        Error::Server(e.to_string())
    }
}

/// Sends `e` to the peer as one ERROR frame (best effort) and returns it: for a
/// failure in an engine thread before the engine itself ran.
pub(crate) fn report(link: &mut dyn crate::engine::Link, e: Error) -> Error {
    let _ = link.send(&crate::protocol::Frame::Error {
        code: crate::protocol::ErrorCode::for_kind(e.kind()) as u16,
        message: e.to_string(),
    });
    e
}

/// A store's page source or target whose failures are named as the server's own.
pub(crate) struct OwnFaults<'a, T> {
    inner: &'a mut T,
    data: &'a Path,
    /// The session agreed on the chunked digest (CONFIG's `digest`): a target takes
    /// BEGIN's CHUNKED_DIGEST only then, as a ZPAGE only where compression was agreed.
    chunked_agreed: bool,
}

impl<'a, T> OwnFaults<'a, T> {
    /// Wraps `inner`, whose files live under `data`.
    pub(crate) fn new(inner: &'a mut T, data: &'a Path) -> Self {
        OwnFaults {
            inner,
            data,
            chunked_agreed: false,
        }
    }

    /// This wrapper, taking the chunked digest when the session agreed on it.
    pub(crate) fn agreeing_chunked(mut self, agreed: bool) -> Self {
        self.chunked_agreed = agreed;
        self
    }

    fn map<R>(&self, r: Result<R>) -> Result<R> {
        r.map_err(|e| server_side(e, self.data))
    }
}

impl<T: PageTarget> PageTarget for OwnFaults<'_, T> {
    fn begin(&mut self, begin: &crate::engine::BeginInfo) -> Result<u32> {
        let r = self.inner.begin(begin);
        self.map(r)
    }

    fn hashes(&mut self, f: &mut dyn FnMut(u32, Hash) -> Result<()>) -> Result<()> {
        let r = self.inner.hashes(f);
        self.map(r)
    }

    fn write_page(&mut self, pgno: u32, data: Vec<u8>, hash: &Hash) -> Result<()> {
        let r = self.inner.write_page(pgno, data, hash);
        self.map(r)
    }

    fn commit(
        &mut self,
        page_count: u32,
        digest: &Hash,
        hashes: &mut dyn Iterator<Item = Result<Hash>>,
    ) -> Result<()> {
        let r = self.inner.commit(page_count, digest, hashes);
        self.map(r)
    }

    fn speaks_chunked_digest(&self) -> bool {
        self.chunked_agreed && self.inner.speaks_chunked_digest()
    }

    // An encrypted replica's push: the store keeps what it cannot read. Without these
    // two the wrapper would refuse every sealed push as a side that keeps no sealed
    // pages.
    fn keeps_sealed(&self) -> bool {
        self.inner.keeps_sealed()
    }

    fn keep_seal(&mut self, seal: Vec<u8>) -> Result<()> {
        let r = self.inner.keep_seal(seal);
        self.map(r)
    }

    fn held_chunks(&mut self) -> Result<Option<Vec<Hash>>> {
        let r = self.inner.held_chunks();
        self.map(r)
    }

    fn held_chunk(&mut self, idx: u32, out: &mut Vec<u8>) -> Result<()> {
        let r = self.inner.held_chunk(idx, out);
        self.map(r)
    }

    fn commit_chunks(
        &mut self,
        page_count: u32,
        digest: &Hash,
        chunks: &mut dyn Iterator<Item = Result<crate::engine::Chunk>>,
    ) -> Result<()> {
        let r = self.inner.commit_chunks(page_count, digest, chunks);
        self.map(r)
    }
}

impl<T: PageSource> PageSource for OwnFaults<'_, T> {
    fn page_size(&self) -> u32 {
        self.inner.page_size()
    }

    fn page_count(&self) -> u32 {
        self.inner.page_count()
    }

    fn scan(&mut self, with_data_after: u32, f: &mut ScanFn<'_>) -> Result<()> {
        let r = self.inner.scan(with_data_after, f);
        self.map(r)
    }

    fn read_page(&mut self, pgno: u32, buf: &mut Vec<u8>) -> Result<()> {
        let r = self.inner.read_page(pgno, buf);
        self.map(r)
    }

    fn chunk_hashes(&mut self) -> Result<Option<Vec<Option<crate::digest::Hash>>>> {
        let r = self.inner.chunk_hashes();
        self.map(r)
    }

    fn scan_chunk(&mut self, idx: u32, f: &mut ScanFn<'_>) -> Result<crate::digest::Hash> {
        let r = self.inner.scan_chunk(idx, f);
        self.map(r)
    }

    fn chunks_done(&mut self) -> Result<()> {
        let r = self.inner.chunks_done();
        self.map(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_io_faults_become_server_errors() {
        let dir = tempfile::tempdir().expect("temp dir");
        let io = Error::io(dir.path(), std::io::Error::other("boom"));
        let e = server_side(io, dir.path());
        assert_eq!(e.kind(), ErrorKind::Server, "{e}");
        assert!(e.to_string().contains("boom"), "{e}");

        let full = Error::io(dir.path(), std::io::Error::from_raw_os_error(28));
        let e = server_side(full, dir.path());
        assert!(
            e.to_string().contains(&format!(
                "the disk holding {} is full",
                dir.path().display()
            )),
            "{e}"
        );

        // The request's own faults keep their class.
        let auth = server_side(Error::Auth("wrong key".into()), dir.path());
        assert_eq!(auth.kind(), ErrorKind::Auth);
        let conflict = server_side(Error::InUse("pushing".into()), dir.path());
        assert_eq!(conflict.kind(), ErrorKind::Busy);
        assert!(!disk_full(dir.path()), "a temp dir has room for 64 KiB");
    }
}
