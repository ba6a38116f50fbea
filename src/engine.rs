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
//! The digest is digest 1 unless the origin asks for the chunked one
//! ([`FLAG_CHUNKED_DIGEST`], [`crate::digest::DigestForm`]). With the chunked digest and a
//! known base, a replica whose target keeps its pages' chunk hashes ([`PageTarget::held_chunks`])
//! builds no hash tree: it reads the page hashes of the chunks pages were sent for, and
//! takes every other chunk's hash as it holds it ([`PageTarget::commit_chunks`]). An
//! origin whose source knows its chunk hashes too ([`PageSource::chunk_hashes`]: a WAL
//! database's hash list) compares chunks with its known base first and reads, hashes and
//! sends pages only in the chunks that differ; it builds no tree either.
//!
//! A sealed session ([`FLAG_SEALED`], end-to-end encryption) runs the same algorithm on
//! page identities instead of page hashes, with pages sealed on the client; see
//! [`Sealing`] and [`Opening`].
//!
//! Local-to-local sync ([`sync_local`]) runs both roles on two threads joined by an
//! in-memory [`Link`]; a server bridges the same roles to a WebSocket. There is one
//! engine; transports only move frames.

mod link;
mod opener;
mod origin;
mod replica;
mod seal;
mod sqlite;
mod tree;

pub use link::{
    ChannelLink, FromEngine, Leftovers, Link, MemLink, PumpEnd, Role, ToEngine, channel_link,
    mem_pair, pumped_link,
};
pub use origin::{
    BaseManifest, FLAG_CHUNKED_DIGEST, FLAG_KNOWN_BASE, KnownBase, ManifestSink, OriginOptions,
    Synced, run as run_origin, run_with as run_origin_with,
};
pub use replica::{
    ReplicaDone, run as run_replica, run_opening as run_replica_opening,
    run_with as run_replica_with,
};
pub use seal::{FLAG_SEALED, Facts, Opening, Sealing};

use std::time::Duration;

use crate::digest::Hash;
use crate::{Error, ErrorKind, Result};

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
    /// The hashes of the source's chunks ([`crate::digest::CHUNK_PAGES`] page hashes
    /// each, as the chunked digest hashes them) as far as it knows them without hashing
    /// their pages: `Some(hash)` for a chunk it knows unchanged since its record of it,
    /// `None` for one it must hash ([`PageSource::scan_chunk`]). `None` (the default):
    /// it knows no chunk, and the origin scans every page ([`PageSource::scan`]). Asked
    /// only by an origin that knows the replica's base and agreed on the chunked digest.
    ///
    /// No default: a source that wraps another (a check, a fault filter) must forward
    /// this and the two below, or the origin silently falls back to reading every page.
    fn chunk_hashes(&mut self) -> Result<Option<Vec<Option<Hash>>>>;
    /// After [`PageSource::chunk_hashes`]: calls `f` with every page of chunk `idx` (0-based)
    /// in order (number, hash, and bytes when it read them) and returns the chunk's hash.
    /// The origin hashes every chunk `chunk_hashes` left `None`, and others as it needs.
    fn scan_chunk(&mut self, idx: u32, f: &mut ScanFn<'_>) -> Result<Hash>;
    /// Ends a scan by chunks, once every chunk [`PageSource::chunk_hashes`] left `None` was
    /// hashed: the source may keep its record of them (a WAL database's hash list).
    fn chunks_done(&mut self) -> Result<()>;
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
    /// Whether the origin asks for the chunked digest ([`FLAG_CHUNKED_DIGEST`]): the
    /// digest COMMIT carries, and the one the result is checked against, is then the
    /// chunked form.
    pub chunked_digest: bool,
    /// Whether the session is sealed ([`FLAG_SEALED`]): every hash is a page identity,
    /// and a target that [keeps sealed pages](PageTarget::keeps_sealed) is handed
    /// sealed bytes and identities.
    pub sealed: bool,
}

/// One chunk of a new version, as the replica's chunk path hands it to
/// [`PageTarget::commit_chunks`], in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// Chunk `idx` of what the target holds, unchanged: no page of it was sent, and it
    /// covers the same pages. `hash` is the one [`PageTarget::held_chunks`] gave.
    Held {
        /// Its index (0-based), in the held pages and in the result alike.
        idx: u32,
        /// Its hash.
        hash: Hash,
    },
    /// A chunk with pages written (or cut short): its page hashes back to back, and
    /// their SHA-256.
    New {
        /// Its index (0-based).
        idx: u32,
        /// The SHA-256 of `hashes`.
        hash: Hash,
        /// Its page hashes, 32 bytes each, in page order.
        hashes: Vec<u8>,
    },
}

impl Chunk {
    /// The chunk's hash.
    pub fn hash(&self) -> &Hash {
        match self {
            Chunk::Held { hash, .. } | Chunk::New { hash, .. } => hash,
        }
    }
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
    /// Whether it can take a result checked in the chunked digest
    /// ([`FLAG_CHUNKED_DIGEST`]): a store can (it records both forms); a database file's
    /// writer cannot (what is recorded of a pull, and compared at the next one, is
    /// digest 1), so an origin that asks for the chunked form there is refused before
    /// anything is written. No by default.
    fn speaks_chunked_digest(&self) -> bool {
        false
    }
    /// Whether it keeps pages it cannot read, in a sealed session whose replica has no
    /// key (a store of an encrypted replica): [`PageTarget::hashes`] then yields page
    /// identities, [`PageTarget::write_page`] is handed a page's sealed bytes (page size
    /// plus the seal's overhead) and its identity as the hash, which it cannot check,
    /// and [`PageTarget::keep_seal`] the version's seal before the commit. No by
    /// default: a target without it refuses a sealed session it has no key for,
    /// before anything is written.
    fn keeps_sealed(&self) -> bool {
        false
    }
    /// Keeps the version's seal with the version the next [`PageTarget::commit`]
    /// makes; called once, before it, on a target that [keeps sealed
    /// pages](PageTarget::keeps_sealed).
    fn keep_seal(&mut self, _seal: Vec<u8>) -> Result<()> {
        Err(Error::Bug(
            "a version's seal handed to a target that keeps no sealed pages".into(),
        ))
    }
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

    /// The hashes of the chunks of the pages it holds, in order
    /// ([`crate::digest::CHUNK_PAGES`] page hashes each, the last one maybe short), when
    /// it has them without reading the page hashes (a store's manifest is keyed by
    /// them), and every held page is exactly the known base's; `None` otherwise (the
    /// default). Asked once, after [`PageTarget::begin`], when BEGIN named a known base
    /// and the chunked digest. With them the replica reads no page hash until a WANT
    /// asks for its tree, and at COMMIT only those of the chunks pages were sent for
    /// ([`PageTarget::held_chunk`]); it commits with [`PageTarget::commit_chunks`].
    fn held_chunks(&mut self) -> Result<Option<Vec<Hash>>> {
        Ok(None)
    }

    /// Appends the page hashes of held chunk `idx` (0-based) to `out`, back to back; for
    /// a target whose [`PageTarget::held_chunks`] gave its chunks. The engine checks
    /// them against the chunk's hash before it uses one.
    fn held_chunk(&mut self, idx: u32, _out: &mut Vec<u8>) -> Result<()> {
        Err(Error::Bug(format!(
            "held chunk {idx} asked of a target that keeps no chunks"
        )))
    }

    /// [`PageTarget::commit`] for a sync that ran on chunks: truncates to `page_count`
    /// pages and makes every change visible at once, called only after the engine has
    /// checked that the chunks have the origin's chunked `digest`; `chunks` yields the
    /// result's chunks in order. Only called on a target whose
    /// [`PageTarget::held_chunks`] gave its chunks.
    fn commit_chunks(
        &mut self,
        page_count: u32,
        _digest: &Hash,
        _chunks: &mut dyn Iterator<Item = Result<Chunk>>,
    ) -> Result<()> {
        Err(Error::Bug(format!(
            "a commit of {page_count} pages by chunks asked of a target that keeps no chunks"
        )))
    }
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
    /// The digest both sides agreed on, in its form ([`crate::digest::digest_text`]:
    /// lower-case hex for digest 1, `c:` and hex for the chunked one). In a sealed
    /// session, the digest over page identities.
    pub digest: String,
    /// A sealing origin's digest 1 over the plaintext page hashes (hex), or the one an
    /// opening replica found in the seal and checked: what `verify` of the database
    /// prints. Absent from every other sync.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plaintext_digest: Option<String>,
}

impl SyncStats {
    /// The digest of the database itself: a sealed session's plaintext digest 1 (what
    /// `verify` of the file prints), else [`SyncStats::digest`]. What the local history
    /// records, so that a later pull compares LOCAL with it in its own terms: a digest
    /// over identities says nothing of a file's bytes.
    pub fn local_digest(&self) -> &str {
        self.plaintext_digest.as_deref().unwrap_or(&self.digest)
    }
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
    sync_local_opening(source, target, progress, options, None).map(|(stats, _)| stats)
}

/// [`sync_local_with`], the replica opening a sealed session with `opening`'s key
/// ([`run_replica_opening`]): the embedded store's pull of an encrypted version, its
/// origin relaying the sealed pages it keeps (`options.sealing`). The replica's
/// result comes back too: its `opened` facts are the version's seal, as checked.
pub fn sync_local_opening(
    source: &mut dyn PageSource,
    target: &mut (dyn PageTarget + Send),
    progress: &dyn Progress,
    options: OriginOptions<'_>,
    opening: Option<Opening<'_>>,
) -> Result<(SyncStats, ReplicaDone)> {
    let (mut origin_link, mut replica_link) = mem_pair();
    let (origin, replica) = std::thread::scope(|s| {
        let replica =
            s.spawn(move || run_replica_opening(target, &mut replica_link, &NoProgress, opening));
        let origin = run_origin_with(source, &mut origin_link, progress, options);
        // Dropping the origin's link ends the replica's session if the origin failed
        // before saying so.
        drop(origin_link);
        (origin, replica.join())
    });
    let replica = replica
        .unwrap_or_else(|_| Err(crate::Error::Protocol("the replica thread panicked".into())));
    match (origin, replica) {
        (Ok(stats), Ok(done)) => Ok((stats, done)),
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
