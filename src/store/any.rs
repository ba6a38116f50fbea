//! The one store interface a server holds: the directory store ([`Store`]) or the S3
//! store ([`S3Store`]), chosen by `serve --store` (issue 14, slice 3); and what a client
//! uses in-process for `--server file://…` and `--server s3://…` (slice 5).
//!
//! An enum over the two, not a trait: there are exactly two stores, both in this crate,
//! and their readers and writers are already the engine's [`PageSource`] and
//! [`PageTarget`] traits, so the enum only dispatches (one `match` per method) and
//! needs no boxing, no object-safe re-statement of every store method and no
//! associated types. Retention and pruning dispatch to each store's own (the S3
//! store's: tombstones and a mark-and-sweep with a grace period, `s3/gc.rs`). What
//! only the directory store can do (stored-bytes figures, merges, drills, packed
//! pages) is
//! reached through [`AnyStore::dir`], which refuses on an S3 store with an error that
//! names the feature and says "not with an S3 store yet" ([`Error::Usage`]: exit 2 for
//! a client), never a silent substitute.
//!
//! Invariants: those of each store (see `store.rs` and `s3.rs`); this module adds none
//! and weakens none. Every S3 method blocks on object storage requests: callers are on
//! a blocking thread (the server's `spawn_blocking` or the engine's own), as for the
//! directory store's SQLite work.

use std::path::{Path, PathBuf};

use super::s3::{S3Store, S3VersionReader, S3VersionWriter};
use super::{
    Latest, PruneReport, PushOptions, ReplicaPath, Retention, RetentionPolicy, Selector, Store,
    VersionInfo, VersionReader, VersionWriter,
};
use crate::digest::Hash;
use crate::engine::{BeginInfo, Chunk, PageSource, PageTarget, ScanFn};
use crate::{Error, ErrorKind, Result};

/// Where a server keeps its replicas' pages and versions.
#[derive(Debug, Clone)]
pub enum AnyStore {
    /// The directory store in the data directory (the default, `--store file://DIR`).
    Dir(Store),
    /// An S3 store (`--store s3://BUCKET/PREFIX`); `data` is the server's data
    /// directory, which holds its cache (and `server.db`), never pages; for a client
    /// (`--server s3://…`), the directory of its cache (`$XDG_CACHE_HOME/sqlferry/s3`).
    S3 {
        /// The store.
        store: S3Store,
        /// The server's data directory, or a client's cache directory.
        data: PathBuf,
    },
}

/// The refusal of `feature` on an S3 store.
pub fn not_with_s3(feature: &str) -> Error {
    Error::Usage(format!("{feature}: not with an S3 store yet"))
}

impl AnyStore {
    /// The directory store, for `feature`, which only it has; on an S3 store, the
    /// refusal naming `feature` ([`not_with_s3`]).
    pub fn dir(&self, feature: &str) -> Result<&Store> {
        match self {
            AnyStore::Dir(store) => Ok(store),
            AnyStore::S3 { .. } => Err(not_with_s3(feature)),
        }
    }

    /// Whether this is an S3 store.
    pub fn is_s3(&self) -> bool {
        matches!(self, AnyStore::S3 { .. })
    }

    /// The server's data directory: the directory store's root, or the directory that
    /// holds the S3 store's cache (where the server's own files are, for its disk
    /// checks).
    pub fn root(&self) -> &Path {
        match self {
            AnyStore::Dir(store) => store.root(),
            AnyStore::S3 { data, .. } => data,
        }
    }

    /// Every version of `replica`, oldest first; [`ErrorKind::NotFound`] when it has
    /// none.
    pub fn versions(&self, replica: &ReplicaPath) -> Result<Vec<VersionInfo>> {
        match self {
            AnyStore::Dir(store) => store.versions(replica),
            AnyStore::S3 { store, .. } => store.versions(replica),
        }
    }

    /// The passphrase salt and cost `replica` keeps: a row of its file, or its salt
    /// object in the bucket ([`S3Store::passphrase`]).
    pub fn passphrase(
        &self,
        replica: &ReplicaPath,
    ) -> Result<Option<crate::crypt::PassphraseSalt>> {
        match self {
            AnyStore::Dir(store) => store.passphrase(replica),
            AnyStore::S3 { store, .. } => store.passphrase(replica),
        }
    }

    /// Every version of `replica`, each with its stored bytes where the store counts
    /// them (the directory store); an S3 store counts none yet, and its versions carry
    /// `stored_bytes: None` ("not known", shown as `-`).
    pub fn versions_with_stored_bytes(&self, replica: &ReplicaPath) -> Result<Vec<VersionInfo>> {
        match self {
            AnyStore::Dir(store) => store.versions_with_stored_bytes(replica),
            AnyStore::S3 { store, .. } => store.versions(replica),
        }
    }

    /// The newest versions of `replica`, at most `n`, oldest first, and whether they
    /// are all it has; empty when it has none. An S3 store reads only those version
    /// objects, not every one.
    pub fn newest(&self, replica: &ReplicaPath, n: usize) -> Result<(Vec<VersionInfo>, bool)> {
        let absent = |e: Error| match e.kind() {
            ErrorKind::NotFound => Ok((Vec::new(), true)),
            _ => Err(e),
        };
        match self {
            AnyStore::Dir(store) => {
                let versions = match store.versions(replica) {
                    Ok(v) => v,
                    Err(e) => return absent(e),
                };
                let skip = versions.len().saturating_sub(n);
                Ok((versions[skip..].to_vec(), skip == 0))
            }
            AnyStore::S3 { store, .. } => {
                if let Some(found) = store.indexed_newest(replica, n)? {
                    return Ok(found);
                }
                let Some(latest) = store.latest(replica)? else {
                    return Ok((Vec::new(), true));
                };
                let first = latest.number.saturating_sub(n as u64).max(1);
                let mut out = Vec::new();
                for number in first..latest.number {
                    if let Some(v) = store.version(replica, number)? {
                        out.push(v.info());
                    }
                }
                out.push(latest.info());
                Ok((out, first == 1))
            }
        }
    }

    /// The oldest version of `replica` after `version`, if any.
    pub fn first_after(&self, replica: &ReplicaPath, version: u64) -> Result<Option<VersionInfo>> {
        match self {
            AnyStore::Dir(store) => Ok(store
                .versions(replica)?
                .into_iter()
                .find(|v| v.number > version)),
            // Numbered without gaps: a removed version's number holds its tombstone.
            AnyStore::S3 { store, .. } => {
                if let Some(found) = store.indexed_first_after(replica, version)? {
                    return Ok(found);
                }
                let mut number = version + 1;
                loop {
                    match store.slot(replica, number)? {
                        super::s3::Slot::Present(v) => return Ok(Some(v.info())),
                        super::s3::Slot::Removed(_) => number += 1,
                        super::s3::Slot::Missing => return Ok(None),
                    }
                }
            }
        }
    }

    /// `replica`'s latest version number, 0 when it has none.
    pub fn latest_number(&self, replica: &ReplicaPath) -> Result<u64> {
        match self {
            AnyStore::Dir(store) => store.latest_number(replica),
            AnyStore::S3 { store, .. } => Ok(store.latest_info(replica)?.map_or(0, |v| v.number)),
        }
    }

    /// `replica`'s latest version and its version count; `None` when it has none.
    pub fn latest(&self, replica: &ReplicaPath) -> Result<Option<Latest>> {
        match self {
            AnyStore::Dir(store) => store.latest(replica),
            // Versions are numbered from 1 without gaps: the count is the number (the
            // numbers used: removed versions count too, as counting the kept ones
            // would read every version object).
            AnyStore::S3 { store, .. } => Ok(store.latest_info(replica)?.map(|v| Latest {
                count: v.number,
                version: v,
            })),
        }
    }

    /// The number of the version `selector` names and its key id when it is encrypted,
    /// without opening it for reading: its row in the replica's file, or its version
    /// object.
    pub fn resolve(
        &self,
        replica: &ReplicaPath,
        selector: Selector,
    ) -> Result<(u64, Option<String>)> {
        match self {
            AnyStore::Dir(store) => {
                let info = store.resolve(replica, selector)?;
                Ok((info.number, info.encryption))
            }
            AnyStore::S3 { store, .. } => {
                let v = store.select(replica, selector)?;
                Ok((v.number, v.encryption_key_id))
            }
        }
    }

    /// The key id of `replica`'s latest version when it is encrypted
    /// ([`Store::encryption`], [`S3Store::encryption`]); `None` for a plaintext
    /// replica, or one with no version.
    pub fn encryption(&self, replica: &ReplicaPath) -> Result<Option<String>> {
        match self {
            AnyStore::Dir(store) => store.encryption(replica),
            AnyStore::S3 { store, .. } => store.encryption(replica),
        }
    }

    /// The requests made so far to the object storage, by kind; `None` for the
    /// directory store.
    pub fn object_requests(&self) -> Option<super::object::RequestCounts> {
        match self {
            AnyStore::Dir(_) => None,
            AnyStore::S3 { store, .. } => Some(store.objects().requests()),
        }
    }

    /// The unique page bytes `replica`'s versions use ([`Store::stored_bytes`]);
    /// refused on an S3 store.
    pub fn stored_bytes(&self, replica: &ReplicaPath) -> Result<u64> {
        self.dir("stored-bytes figures")?.stored_bytes(replica)
    }

    /// `replica`'s retention policy and where it comes from (see [`Store::retention`]
    /// and [`S3Store::retention`]).
    pub fn retention(&self, replica: &ReplicaPath) -> Result<Retention> {
        match self {
            AnyStore::Dir(store) => store.retention(replica),
            AnyStore::S3 { store, .. } => store.retention(replica),
        }
    }

    /// Gives `replica` its own policy, or with `None` drops it.
    pub fn set_retention(
        &self,
        replica: &ReplicaPath,
        policy: Option<&RetentionPolicy>,
    ) -> Result<Retention> {
        match self {
            AnyStore::Dir(store) => store.set_retention(replica, policy),
            AnyStore::S3 { store, .. } => store.set_retention(replica, policy),
        }
    }

    /// Removes the versions `replica`'s policy does not keep at `now` and frees what
    /// no version uses any more: the directory store's collection (waiting up to
    /// `wait` for pushes and pulls), or the S3 store's sweep (objects older than its
    /// grace). With `dry_run`, says what it would do.
    pub fn prune(
        &self,
        replica: &ReplicaPath,
        dry_run: bool,
        now: i64,
        wait: std::time::Duration,
    ) -> Result<PruneReport> {
        match self {
            AnyStore::Dir(store) => store.prune(replica, dry_run, now, wait),
            AnyStore::S3 { store, .. } => store.prune(replica, dry_run, now),
        }
    }

    /// Starts a push into `replica` (see [`Store::push`] and [`S3Store::push`]).
    pub fn push(&self, replica: &ReplicaPath, options: PushOptions) -> Result<AnyWriter> {
        match self {
            AnyStore::Dir(store) => store.push(replica, options).map(AnyWriter::Dir),
            AnyStore::S3 { store, .. } => store.push(replica, options).map(AnyWriter::S3),
        }
    }

    /// Opens the version `selector` names for reading (see [`Store::read`] and
    /// [`S3Store::read`]).
    pub fn read(&self, replica: &ReplicaPath, selector: Selector) -> Result<AnyReader> {
        match self {
            AnyStore::Dir(store) => store.read(replica, selector).map(AnyReader::Dir),
            AnyStore::S3 { store, .. } => store.read(replica, selector).map(AnyReader::S3),
        }
    }
}

/// A push into either store: the engine's [`PageTarget`].
// One per push, made once on the engine's thread and never copied: boxing the larger
// writer would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum AnyWriter {
    /// Into the directory store.
    Dir(VersionWriter),
    /// Into an S3 store.
    S3(S3VersionWriter),
}

impl AnyWriter {
    /// After a successful sync: the version now latest, and whether this push made it.
    pub fn outcome(&self) -> Option<(&VersionInfo, bool)> {
        match self {
            AnyWriter::Dir(w) => w.outcome(),
            AnyWriter::S3(w) => w.outcome(),
        }
    }

    /// Damaged pages this push repaired (the directory store's; none on S3).
    pub fn repaired(&self) -> u32 {
        match self {
            AnyWriter::Dir(w) => w.repaired(),
            AnyWriter::S3(_) => 0,
        }
    }

    /// Versions the retention policy removed after this push (none on S3: it has no
    /// retention yet).
    pub fn removed(&self) -> &[u64] {
        match self {
            AnyWriter::Dir(w) => w.removed(),
            AnyWriter::S3(_) => &[],
        }
    }
}

/// Calls the same method on whichever writer or reader it is.
macro_rules! each {
    ($self:ident, $w:ident => $e:expr) => {
        match $self {
            Self::Dir($w) => $e,
            Self::S3($w) => $e,
        }
    };
}

impl PageTarget for AnyWriter {
    fn begin(&mut self, begin: &BeginInfo) -> Result<u32> {
        each!(self, w => PageTarget::begin(w, begin))
    }

    fn speaks_chunked_digest(&self) -> bool {
        each!(self, w => PageTarget::speaks_chunked_digest(w))
    }

    fn keeps_sealed(&self) -> bool {
        each!(self, w => PageTarget::keeps_sealed(w))
    }

    fn keep_seal(&mut self, seal: Vec<u8>) -> Result<()> {
        each!(self, w => PageTarget::keep_seal(w, seal))
    }

    fn hashes(&mut self, f: &mut dyn FnMut(u32, Hash) -> Result<()>) -> Result<()> {
        each!(self, w => PageTarget::hashes(w, f))
    }

    fn write_page(&mut self, pgno: u32, data: Vec<u8>, hash: &Hash) -> Result<()> {
        each!(self, w => PageTarget::write_page(w, pgno, data, hash))
    }

    fn commit(
        &mut self,
        page_count: u32,
        digest: &Hash,
        hashes: &mut dyn Iterator<Item = Result<Hash>>,
    ) -> Result<()> {
        each!(self, w => PageTarget::commit(w, page_count, digest, hashes))
    }

    fn held_chunks(&mut self) -> Result<Option<Vec<Hash>>> {
        each!(self, w => PageTarget::held_chunks(w))
    }

    fn held_chunk(&mut self, idx: u32, out: &mut Vec<u8>) -> Result<()> {
        each!(self, w => PageTarget::held_chunk(w, idx, out))
    }

    fn commit_chunks(
        &mut self,
        page_count: u32,
        digest: &Hash,
        chunks: &mut dyn Iterator<Item = Result<Chunk>>,
    ) -> Result<()> {
        each!(self, w => PageTarget::commit_chunks(w, page_count, digest, chunks))
    }
}

/// One version of either store, for reading: the engine's [`PageSource`].
pub enum AnyReader {
    /// From the directory store.
    Dir(VersionReader),
    /// From an S3 store.
    S3(S3VersionReader),
}

impl AnyReader {
    /// The version being read.
    pub fn info(&self) -> &VersionInfo {
        each!(self, r => r.info())
    }

    /// For an encrypted version, how the engine relays it ([`VersionReader::relay`],
    /// [`S3VersionReader::relay`]); `None` for a plaintext one.
    pub fn relay(&self) -> Option<crate::engine::Sealing<'static>> {
        each!(self, r => r.relay())
    }
}

impl PageSource for AnyReader {
    fn page_size(&self) -> u32 {
        each!(self, r => PageSource::page_size(r))
    }

    fn page_count(&self) -> u32 {
        each!(self, r => PageSource::page_count(r))
    }

    fn scan(&mut self, with_data_after: u32, f: &mut ScanFn<'_>) -> Result<()> {
        each!(self, r => PageSource::scan(r, with_data_after, f))
    }

    fn read_page(&mut self, pgno: u32, buf: &mut Vec<u8>) -> Result<()> {
        each!(self, r => PageSource::read_page(r, pgno, buf))
    }

    fn check(&mut self) -> Result<()> {
        each!(self, r => PageSource::check(r))
    }

    fn chunk_hashes(&mut self) -> Result<Option<Vec<Option<Hash>>>> {
        each!(self, r => PageSource::chunk_hashes(r))
    }

    fn scan_chunk(&mut self, idx: u32, f: &mut ScanFn<'_>) -> Result<Hash> {
        each!(self, r => PageSource::scan_chunk(r, idx, f))
    }

    fn chunks_done(&mut self) -> Result<()> {
        each!(self, r => PageSource::chunks_done(r))
    }
}
