//! The sync algorithm, free of any transport: an origin role and a replica role that
//! exchange [`Frame`](crate::protocol::Frame)s over a [`Link`].
//!
//! The origin holds the database to copy ([`PageSource`]); the replica holds the copy to
//! bring up to date ([`PageTarget`]). Both hash their pages and build a hash tree
//! ([`FANOUT`] children per node). The origin asks for the replica's node hashes
//! top-down, only below nodes that differ, and sends the pages whose hashes differ, so
//! the hashes exchanged grow with the number of changed regions, not with the page
//! count. Requests are pipelined: the origin keeps up to a window of node hashes in
//! flight instead of waiting for each level. The replica commits only when its result
//! has the origin's digest.
//!
//! Local-to-local sync ([`sync_local`]) runs both roles on two threads joined by an
//! in-memory [`Link`]; a server bridges the same roles to a WebSocket. There is one
//! engine; transports only move frames.

mod link;
mod origin;
mod replica;
mod sqlite;
mod tree;

pub use link::{
    ChannelLink, FromEngine, Leftovers, Link, MemLink, PumpEnd, Role, ToEngine, channel_link,
    mem_pair, pumped_link,
};
pub use origin::{
    FLAG_KNOWN_BASE, KnownBase, ManifestSink, OriginOptions, run as run_origin,
    run_with as run_origin_with,
};
pub use replica::{ReplicaDone, run as run_replica, run_with as run_replica_with};

use std::time::Duration;

use crate::digest::Hash;
use crate::{ErrorKind, Result};

/// Children per hash-tree node. 16 keeps the hashes exchanged for one changed region
/// small (16 × 32 bytes per level) and the tree shallow (4 levels for 1 GiB of 4 KiB
/// pages).
pub const FANOUT: u32 = 16;

/// The protocol's window: node hashes an origin may have requested (WANT) and not yet
/// received (NODES) at any time, 256 KiB of hashes. The origin keeps to it; a replica
/// refuses a WANT that breaks it.
pub const WINDOW_NODES: u32 = 8192;

/// The callback of [`PageSource::scan`]: page number, page hash, and the page's bytes
/// when they were asked for.
pub type ScanFn<'a> = dyn FnMut(u32, Hash, Option<&[u8]>) -> Result<()> + 'a;

/// What a sync reads from: the origin database.
pub trait PageSource {
    /// Page size in bytes.
    fn page_size(&self) -> u32;
    /// Number of pages.
    fn page_count(&self) -> u32;
    /// Calls `f` with every page's number and hash ([`crate::digest::page_hash`]), in
    /// page order, and with the page's bytes too for pages after `with_data_after`
    /// (the pages the replica does not have, sent during the same pass) when it read
    /// them: a source that knew a page's hash without reading it passes `None`, and the
    /// origin reads the page with [`PageSource::read_page`] if it must send it.
    fn scan(&mut self, with_data_after: u32, f: &mut ScanFn<'_>) -> Result<()>;
    /// Reads page `pgno` into `buf` (replacing its contents).
    fn read_page(&mut self, pgno: u32, buf: &mut Vec<u8>) -> Result<()>;
    /// Checks the source once every page has been sent, before the origin asks the
    /// replica to commit: an error ends the sync and the replica commits nothing. It
    /// runs while the replica is still writing what it was sent, so a check that reads
    /// the whole source (`PRAGMA quick_check` of a local copy) overlaps the copy
    /// instead of delaying it. The default checks nothing.
    fn check(&mut self) -> Result<()> {
        Ok(())
    }
}

/// What the origin's BEGIN announced, handed to [`PageTarget::begin`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BeginInfo {
    /// The origin's page size in bytes.
    pub page_size: u32,
    /// The origin's page count.
    pub page_count: u32,
    /// The version the origin says its copy is based on (0: none).
    pub base_version: u64,
    /// Whether the origin knows the manifest of `base_version` ([`FLAG_KNOWN_BASE`]): it
    /// then sends only the pages that differ from that manifest and asks for no hash,
    /// provided the page count the target returns equals that version's page count.
    pub known_base: bool,
}

/// What a sync writes to: the replica. Nothing it does is visible until `commit`; if
/// it is dropped before, every change is rolled back.
pub trait PageTarget {
    /// Prepares to hold a database of `begin.page_size`-byte pages and returns how many
    /// pages it already holds at that size (0 when empty or new). A target whose pages
    /// are not exactly the origin's known base (another version, or pages it must have
    /// sent again) returns a count that differs from that base's, so that the origin
    /// runs the hash exchange instead of trusting its manifest. One method, taking all
    /// of BEGIN: a wrapper cannot forward half of it.
    fn begin(&mut self, begin: &BeginInfo) -> Result<u32>;
    /// Calls `f` with the number and hash of every page it holds, in page order.
    fn hashes(&mut self, f: &mut dyn FnMut(u32, Hash) -> Result<()>) -> Result<()>;
    /// Writes one page (not yet visible); `hash` is its [`crate::digest::page_hash`].
    /// The page is handed over, so a target that keeps it (a write batch) needs no copy.
    fn write_page(&mut self, pgno: u32, data: Vec<u8>, hash: &Hash) -> Result<()>;
    /// Truncates to `page_count` pages and makes every change visible at once. Called
    /// only after the engine has checked that the result has the origin's `digest`;
    /// `hashes` yields the final page hashes in order (a store keeps them as the new
    /// version's manifest; a file has no use for them).
    fn commit(
        &mut self,
        page_count: u32,
        digest: &Hash,
        hashes: &mut dyn Iterator<Item = Result<Hash>>,
    ) -> Result<()>;
}

/// Which part of a sync is running, for progress displays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading and hashing the origin's pages.
    Hashing,
    /// Comparing hashes and sending pages that differ.
    Sending,
    /// Receiving and writing pages (the replica side; the total is not known).
    Receiving,
}

/// Receives progress from a running sync. Every method has an empty default.
pub trait Progress: Send + Sync {
    /// A phase starts; `total` pages of `page_size` bytes are to be done (0: unknown).
    fn start(&self, _phase: Phase, _total: u64, _page_size: u32) {}
    /// `n` more pages of the current phase are done.
    fn advance(&self, _n: u64) {}
    /// The sync is over (successfully or not).
    fn finish(&self) {}
}

/// A [`Progress`] that shows nothing.
pub struct NoProgress;
impl Progress for NoProgress {}

/// What a finished sync did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SyncStats {
    /// Page size in bytes.
    pub page_size: u32,
    /// Pages in the origin (and now the replica).
    pub pages_total: u32,
    /// Pages sent because they differed.
    pub pages_sent: u32,
    /// Bytes the origin sent, frame headers included.
    pub bytes_sent: u64,
    /// Bytes the origin received (node hashes and acknowledgements).
    pub bytes_received: u64,
    /// Bytes of hash-tree traffic, both directions (WANT and NODES frames).
    pub hash_bytes: u64,
    /// Wall time of the sync.
    #[serde(rename = "duration_ms", serialize_with = "as_millis")]
    pub duration: Duration,
    /// The digest both sides agreed on, lower-case hex.
    pub digest: String,
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// Syncs `target` to equal `source`, both in this process: the replica role runs on a
/// second thread and the roles talk over an in-memory link, exactly as they would over
/// a network.
pub fn sync_local(
    source: &mut dyn PageSource,
    target: &mut (dyn PageTarget + Send),
    progress: &dyn Progress,
) -> Result<SyncStats> {
    sync_local_with(source, target, progress, OriginOptions::default())
}

/// [`sync_local`] with origin options (a known base, a manifest sink).
pub fn sync_local_with(
    source: &mut dyn PageSource,
    target: &mut (dyn PageTarget + Send),
    progress: &dyn Progress,
    options: OriginOptions<'_>,
) -> Result<SyncStats> {
    let (mut origin_link, mut replica_link) = mem_pair();
    let (origin, replica) = std::thread::scope(|s| {
        let replica = s.spawn(move || run_replica(target, &mut replica_link));
        let origin = run_origin_with(source, &mut origin_link, progress, options);
        // Dropping the origin's link ends the replica's session if the origin failed
        // before saying so.
        drop(origin_link);
        (origin, replica.join())
    });
    let replica = replica
        .unwrap_or_else(|_| Err(crate::Error::Protocol("the replica thread panicked".into())));
    match (origin, replica) {
        (Ok(stats), Ok(_)) => Ok(stats),
        // The replica's own error names its file; the origin only saw the ERROR frame.
        (Err(o), Err(r))
            if matches!(o, crate::Error::Remote { .. }) || o.kind() == ErrorKind::Disconnected =>
        {
            Err(r)
        }
        (Err(o), _) => Err(o),
        (Ok(_), Err(r)) => Err(r),
    }
}
