//! The engine's page source and page target over SQLite files: [`Snapshot`] is the
//! origin of a push or local copy, [`Writer`] the replica of a pull.
//!
//! They live here, not in `page`, so that the layers run one way: `page` knows SQLite
//! pages and nothing of the sync, and the engine adapts it. Each method forwards to the
//! page type's own method of the same meaning; nothing else happens here.

use super::{BeginInfo, PageSource, PageTarget, ScanFn};
use crate::Result;
use crate::digest::Hash;
use crate::page::{Snapshot, Writer};

impl PageSource for Snapshot {
    fn page_size(&self) -> u32 {
        Snapshot::page_size(self)
    }

    fn page_count(&self) -> u32 {
        Snapshot::page_count(self)
    }

    fn scan(&mut self, with_data_after: u32, f: &mut ScanFn<'_>) -> Result<()> {
        self.hash_pages(with_data_after, f)
    }

    fn read_page(&mut self, pgno: u32, buf: &mut Vec<u8>) -> Result<()> {
        Snapshot::read_page(self, pgno, buf)
    }

    fn chunk_hashes(&mut self) -> Result<Option<Vec<Option<Hash>>>> {
        Ok(Snapshot::chunk_hashes(self))
    }

    fn scan_chunk(&mut self, idx: u32, f: &mut ScanFn<'_>) -> Result<Hash> {
        self.hash_chunk(idx, f)
    }

    fn chunks_done(&mut self) -> Result<()> {
        Snapshot::chunks_done(self)
    }
}

impl PageTarget for Writer {
    fn begin(&mut self, begin: &BeginInfo) -> Result<u32> {
        // A file has no versions: only the page size matters to it.
        self.prepare(begin.page_size)
    }

    fn hashes(&mut self, f: &mut dyn FnMut(u32, Hash) -> Result<()>) -> Result<()> {
        self.held_hashes(f)
    }

    fn write_page(&mut self, pgno: u32, data: Vec<u8>, hash: &Hash) -> Result<()> {
        Writer::write_page(self, pgno, data, hash)
    }

    fn commit(
        &mut self,
        page_count: u32,
        _digest: &Hash,
        hashes: &mut dyn Iterator<Item = Result<Hash>>,
    ) -> Result<()> {
        // The engine checked the digest before calling: the file has nothing to add.
        self.commit_pages(page_count, hashes)
    }
}
