//! The S3 store (issue 14; `docs/scale-out.md`, "The S3 store"): replicas and their
//! immutable versions in an S3-compatible object storage, laid out on the object layer
//! ([`super::object`]). A server uses it through [`super::AnyStore`] (`serve --store
//! s3://BUCKET/PREFIX`), and so does a client with no server (`--server
//! s3://BUCKET/PREFIX`, in-process). Retention and the garbage collector (mark and sweep with a
//! grace period) are in `s3/gc.rs`; the PostgreSQL index of its versions
//! (`serve --meta`) in `s3/index.rs`.
//!
//! The layout, under the store's `s3://BUCKET/PREFIX`:
//! - `packs/<sha256>.pack`: the new pages of one push, back to back, plain, named by the
//!   SHA-256 of its bytes; `packs/<sha256>.idx` beside it: its index, sorted by page
//!   hash ([`IDX_MAGIC`], then hash, offset and length of each page). A sealed push's
//!   pack (an encrypted replica's) holds its pages as they came, sealed, under their
//!   identities, and its index is a sealed one ([`IDX_SEALED_MAGIC`]): each entry also
//!   carries the SHA-256 of the sealed bytes, which every read checks (the store cannot
//!   open the page to check its identity);
//! - `chunks/<sha256>`: 1,024 page hashes (the last chunk of a version maybe fewer),
//!   named by their SHA-256: content-addressed, created only if absent, shared by every
//!   version and replica that has them;
//! - `replicas/<path>/v/<N>`: version N, a small JSON object ([`VersionObject`]): page
//!   size and count, both digests, message, time, client, key, base, its chunks in
//!   order and the packs its pages live in. Created with `If-None-Match: *`: the
//!   commit point, and what decides the race for a version number. Retention replaces
//!   a removed version's object by its [`Tombstone`] (numbers keep no gaps). An
//!   encrypted version's ([`SEALED_VERSION_FORMAT`]) also keeps its key id and seal;
//! - `replicas/<path>/retention.json`: the replica's own retention policy, if any;
//! - `replicas/<path>/passphrase.json`: an encrypted replica's passphrase salt and cost
//!   ([`PassphraseObject`]), written once with `If-None-Match: *`;
//! - [`CLOCK_KEY`]: the sweep's clock (rewritten by each sweep);
//! - [`MARKER_KEY`]: says the prefix holds a store, and its format (written by the
//!   first [`S3Store::check`], which a server runs at start).
//!
//! A push ([`S3Store::push`], an [`S3VersionWriter`], the engine's [`PageTarget`])
//! appends the pages no known pack holds to a temporary file beside its cache (memory
//! holds none of them), and only once the engine has checked the origin's digest
//! writes the pack (one PUT up to [`MULTIPART_ABOVE`], above it a multipart upload one
//! [`PART_SIZE`] part at a time, read from the file), its index, the chunks not known
//! to exist, and last the version object. Losing the race for the number is the
//! directory store's VERSION_CONFLICT ([`Error::Conflict`]). A crash or an error at any
//! point before the version object leaves only objects nothing names; a version is
//! never visible half-written.
//!
//! A pull ([`S3Store::read`], an [`S3VersionReader`], the engine's [`PageSource`]) reads
//! the version object, its chunks one at a time (each checked against its name), the
//! indexes of its packs it does not know yet, then the pages in runs of up to
//! [`RUN_BYTES`] that lie end to end in one pack, one ranged GET each. Every page is
//! checked against its hash before it is handed on: a damaged object is refused, never
//! delivered. Memory is one chunk of hashes and one run.
//!
//! Which pages exist, and where, is learnt from the pack indexes and kept in a local
//! cache ([`S3Store::open`]'s `cache_dir`: a SQLite file per store location, on disk,
//! not in memory): a push stores only pages no pack it knows holds, so replicas with
//! the same pages share them. The cache is only ever filled from index objects (or the
//! packs this process wrote), never trusted for page bytes (every page read is
//! checked), and may be deleted at any time: it refills as versions are read. A sweep
//! deletes packs and chunks no version names: it drops them from its own cache first,
//! and a push HEADs what it names only through its cache before committing (another
//! server's sweep may have deleted it), failing cleanly when one is gone.
//!
//! The object layer is async and the engine's roles are not: every method here waits
//! for its requests on the runtime handle given to [`S3Store::open`], so it must be
//! called from a thread that may block (the engine's own, or `spawn_blocking`), never
//! from inside an async task.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::future::Future;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension as _, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::object::{Created, MULTIPART_ABOVE, Objects, PART_SIZE, S3Options};
use super::replica::page_matches;
use super::{
    CHUNK_PAGES, PruneReport, PushOptions, ReplicaPath, Retention, RetentionPolicy, Selector,
    VersionInfo,
};
use crate::digest::{
    ChunkedDigest, Digest, DigestForm, HASH_BYTES, Hash, chunk_count, digest_text, hex,
    lock_byte_page, sha256,
};
use crate::engine::{BeginInfo, Chunk, PageSource, PageTarget, ScanFn};
use crate::{Error, Result};

mod gc;
mod index;
pub use gc::{CLOCK_KEY, Sweep};
pub use index::{IndexRow, PushFence, Pushing, Since, SweepFence, VersionIndex};

/// The first bytes of a pack's index object; what follows is the entry count (u32,
/// big-endian) and the entries, sorted by page hash: hash (32 bytes), offset in the
/// pack (u64) and length (u32), big-endian.
pub const IDX_MAGIC: &[u8] = b"sqlferry-idx-1\n";

/// Bytes of one index entry.
const IDX_ENTRY: usize = HASH_BYTES + 8 + 4;

/// The first bytes of a sealed pack's index object (the pack of a push into an
/// encrypted replica: every page in it sealed, named by its identity); its entries are
/// those of [`IDX_MAGIC`]'s followed by the SHA-256 of the sealed bytes (32 bytes), the
/// sum every read checks, since the store cannot open the page to check its identity.
/// Another magic, not a flag: a build that reads only plain packs refuses it as no
/// index, never takes a sealed page for a plain one.
pub const IDX_SEALED_MAGIC: &[u8] = b"sqlferry-idx-sealed-1\n";

/// Bytes of one sealed index entry.
const IDX_SEALED_ENTRY: usize = IDX_ENTRY + HASH_BYTES;

/// The most page bytes one ranged GET of a pull reads: the doc's "runs of ≥ 8 MiB",
/// few requests for a full pull, and the one buffer a pull holds.
pub const RUN_BYTES: u64 = 8 << 20;

/// The most page bytes a reader keeps read ahead ([`ReadAhead`]): what a pull session
/// adds to a server's memory at most.
const READ_AHEAD_BYTES: usize = 1 << 20;

/// How many entries a read-ahead starts with, and the most it grows to.
const READ_AHEAD_FIRST: u32 = 16;
const READ_AHEAD_MOST: u32 = 256;

/// The version object's format number: a version object of another is refused, not
/// misread.
pub const VERSION_FORMAT: u32 = 1;

/// The format number of an encrypted version's object (one with `encryption_key_id`
/// and `seal`): a build that knows only [`VERSION_FORMAT`] refuses it as another
/// format, rather than serving its sealed pages as plaintext ones.
pub const SEALED_VERSION_FORMAT: u32 = 2;

/// The object at the root of a store's prefix that says it is one, and its format
/// ([`S3Store::check`]).
pub const MARKER_KEY: &str = "sqlferry-store.json";

/// What the marker says it marks.
const MARKER_WHAT: &str = "sqlferry S3 store";

/// The marker object's JSON.
#[derive(Serialize, Deserialize)]
struct Marker {
    format: u32,
    what: String,
}

/// The default grace period of the garbage collector (`serve --gc-grace`): an object
/// no version names is deleted only once older than this, so a push in flight (whose
/// pack, index and chunks come before its version object) never loses them.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);

/// How long the cache's SQLite file waits for another connection's write.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The local cache of which pages the store's packs hold, and which chunks exist.
const CACHE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS pages(
    hash BLOB NOT NULL, pack BLOB NOT NULL, offset INTEGER NOT NULL, len INTEGER NOT NULL,
    PRIMARY KEY (hash, pack)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS pages_in_pack ON pages(pack, offset);
CREATE TABLE IF NOT EXISTS packs(name BLOB PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks(hash BLOB PRIMARY KEY) WITHOUT ROWID;
";

/// The column a cache made before encrypted replicas gains when opened: a sealed
/// page's sum (the SHA-256 of its sealed bytes, from its pack's sealed index); `NULL`
/// for a plain page, whose hash is its check.
const CACHE_SUM: &str = "ALTER TABLE pages ADD COLUMN sum BLOB";

/// A version as its object holds it (`replicas/<path>/v/<N>`, JSON). Hashes in
/// lower-case hex.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionObject {
    /// The format of this object ([`VERSION_FORMAT`]).
    pub format: u32,
    /// The replica it belongs to (checked against the key it was read from).
    pub replica: String,
    /// Its number (checked against the key it was read from).
    pub number: u64,
    /// Page size in bytes.
    pub page_size: u32,
    /// Number of pages.
    pub page_count: u32,
    /// Digest 1 (hex), empty when the push ran by chunks and kept some (as in the
    /// directory store: making it would read every held chunk).
    pub digest: String,
    /// The chunked digest (`c:` and hex).
    pub digest2: String,
    /// The commit message.
    pub message: String,
    /// When it was committed, Unix seconds.
    pub created_at: i64,
    /// Which client pushed it.
    pub client_id: String,
    /// With which key.
    pub key_id: String,
    /// The version it was pushed on top of (0: none).
    pub base: u64,
    /// Its chunks of page hashes, in order.
    pub chunks: Vec<String>,
    /// The packs its pages live in (maybe more: a push by chunks names every pack of
    /// its base).
    pub packs: Vec<String>,
    /// For an encrypted version: the id of the key it was sealed with (16 hex digits);
    /// absent for a plaintext one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key_id: Option<String>,
    /// For an encrypted version: its seal (hex), kept unread and relayed to a pull as
    /// it came; absent for a plaintext one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal: Option<String>,
}

impl VersionObject {
    /// What the store's callers see of it.
    pub fn info(&self) -> VersionInfo {
        VersionInfo {
            number: self.number,
            page_size: self.page_size,
            page_count: self.page_count,
            size: u64::from(self.page_size) * u64::from(self.page_count),
            digest: self.digest.clone(),
            digest2: Some(self.digest2.clone()),
            message: self.message.clone(),
            created_at: self.created_at,
            client_id: self.client_id.clone(),
            key_id: self.key_id.clone(),
            base: self.base,
            stored_bytes: None,
            merged_into: None,
            encryption: self.encryption_key_id.clone(),
        }
    }

    /// The seal of an encrypted version, decoded; `None` for a plaintext one.
    fn seal_bytes(&self) -> Result<Option<Vec<u8>>> {
        let Some(text) = &self.seal else {
            return Ok(None);
        };
        let mut out = vec![0u8; text.len() / 2];
        hex::decode_to_slice(text, &mut out).map_err(|_| {
            Error::Verification(format!(
                "the seal of {}@{} in its version object is not hex",
                self.replica, self.number
            ))
        })?;
        Ok(Some(out))
    }

    fn chunk_hashes(&self) -> Result<Vec<Hash>> {
        self.chunks.iter().map(|c| unhex(c)).collect()
    }

    fn pack_names(&self) -> Result<Vec<Hash>> {
        self.packs.iter().map(|c| unhex(c)).collect()
    }
}

/// What a version number's object holds.
#[derive(Debug)]
pub enum Slot {
    /// No object: the number was never used.
    Missing,
    /// The version.
    Present(Box<VersionObject>),
    /// The tombstone retention left in place of a removed version: the numbers keep
    /// no gaps, so the latest is still found without a LIST.
    Removed(Tombstone),
}

/// The object retention writes over a removed version's (`replicas/<path>/v/<N>`,
/// JSON): a few bytes that say it was removed and when it was made, so that a pull of
/// it, or of a time it was current, is refused clearly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tombstone {
    /// The format of the store ([`VERSION_FORMAT`]).
    pub format: u32,
    /// The replica it belonged to.
    pub replica: String,
    /// Its number.
    pub number: u64,
    /// When the removed version was committed, Unix seconds.
    pub created_at: i64,
    /// When retention removed it, Unix seconds (what tells a tombstone from a
    /// version).
    pub removed_at: Option<i64>,
}

fn unhex(text: &str) -> Result<Hash> {
    let mut out = [0u8; HASH_BYTES];
    hex::decode_to_slice(text, &mut out)
        .map_err(|_| Error::Verification(format!("{text:?} in a version object is no hash")))?;
    Ok(out)
}

/// Whether `bytes`, the marker object of the store at `location`, says it is a store
/// this build reads.
fn check_marker(location: &str, bytes: &[u8]) -> Result<()> {
    match serde_json::from_slice::<Marker>(bytes) {
        Ok(m) if m.format == VERSION_FORMAT && m.what == MARKER_WHAT => Ok(()),
        Ok(m) => Err(Error::Usage(format!(
            "{location} holds a store of format {} (this sqlferry reads format {VERSION_FORMAT}); use another prefix or a matching sqlferry",
            m.format
        ))),
        Err(_) => Err(Error::Usage(format!(
            "{location}/{MARKER_KEY} exists and is not a sqlferry store's marker; use another prefix"
        ))),
    }
}

/// A store of replicas in one bucket and prefix of an object storage.
#[derive(Clone)]
pub struct S3Store {
    objects: Objects,
    runtime: tokio::runtime::Handle,
    /// The cache file of this store's location.
    cache: PathBuf,
    /// The latest version seen of each replica: where the next look for the latest
    /// starts (version numbers have no gaps: a removed version leaves its tombstone).
    seen: Arc<Mutex<std::collections::HashMap<String, u64>>>,
    /// The policy of replicas without their own (`serve --retention`).
    default_retention: Option<RetentionPolicy>,
    /// How old an object no version names must be before a sweep deletes it, and how
    /// long a push may run before it checks that what it names still exists.
    grace: Duration,
    /// The versions index (`serve --meta`; `s3/index.rs`), if any.
    index: Option<Arc<dyn VersionIndex>>,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "S3Store({:?}, cache {})",
            self.objects,
            self.cache.display()
        )
    }
}

impl S3Store {
    /// The store in `objects`, keeping its cache of pack indexes in `cache_dir` (made if
    /// missing; one file per store location, so stores may share a directory). Makes
    /// no request. Its requests run on `runtime` (see the module's doc: call it from a
    /// thread that may block).
    pub fn open(
        objects: Objects,
        cache_dir: &Path,
        runtime: tokio::runtime::Handle,
    ) -> Result<S3Store> {
        std::fs::create_dir_all(cache_dir).map_err(|e| Error::io(cache_dir, e))?;
        let name = crate::digest::name_key(&[objects.location().to_string().as_bytes()]);
        let cache = cache_dir.join(format!("s3-{name}.sqlite"));
        let store = S3Store {
            objects,
            runtime,
            cache,
            seen: Arc::default(),
            default_retention: None,
            grace: DEFAULT_GRACE,
            index: None,
        };
        let conn = store.cache_conn()?;
        conn.execute_batch(CACHE_SCHEMA)
            .map_err(sql_error(&store.cache))?;
        let has_sum = |conn: &Connection| {
            conn.query_row(
                "SELECT count(*) FROM pragma_table_info('pages') WHERE name = 'sum'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(sql_error(&store.cache))
        };
        if has_sum(&conn)? == 0
            && let Err(e) = conn.execute_batch(CACHE_SUM)
            // Another process may have added it meanwhile.
            && has_sum(&conn)? == 0
        {
            return Err(sql_error(&store.cache)(e));
        }
        Ok(store)
    }

    /// The store at `location`, reached as the usual `AWS_*` variables say, `endpoint`
    /// (`--s3-endpoint`) winning over `AWS_ENDPOINT_URL` ([`S3Options::from_env`]),
    /// with its cache in `cache_dir` ([`S3Store::open`]). What `serve --store` and the
    /// client's `--server s3://…` both open a bucket with. Makes no request.
    pub fn connect(
        location: super::object::S3Location,
        endpoint: Option<&str>,
        cache_dir: &Path,
        runtime: tokio::runtime::Handle,
    ) -> Result<S3Store> {
        let options = S3Options::from_env(endpoint);
        let objects = Objects::open(location, &options)?;
        S3Store::open(objects, cache_dir, runtime)
    }

    /// This store with `policy` as the retention policy of replicas without their own
    /// (`serve --retention`).
    pub fn with_default_retention(mut self, policy: RetentionPolicy) -> S3Store {
        self.default_retention = Some(policy);
        self
    }

    /// This store with `grace` as its garbage collector's grace period (`serve
    /// --gc-grace`; [`DEFAULT_GRACE`] otherwise): a sweep deletes only objects older
    /// than it, and a push that ran longer checks what it names before committing.
    pub fn with_grace(mut self, grace: Duration) -> S3Store {
        self.grace = grace;
        self
    }

    /// The grace period of this store's sweeps.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// The object layer under this store (its request counts, for one).
    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    /// Checks that the store's location answers and holds an S3 store this build
    /// reads: creates the marker object [`MARKER_KEY`] if absent (one PUT, refused
    /// harmlessly when it exists), then reads it back (one GET). So a wrong endpoint,
    /// refused credentials, a missing bucket or a key that may not write show here, at
    /// a server's start, not at its first push. Blocks (see the module's doc).
    pub fn check(&self) -> Result<()> {
        let marker = serde_json::to_vec(&Marker {
            format: VERSION_FORMAT,
            what: MARKER_WHAT.to_owned(),
        })
        .map_err(|e| Error::Bug(format!("the store's marker as JSON: {e}")))?;
        let location = self.objects.location().to_string();
        let missing = |e: Error| match e.kind() {
            // S3 answers a write into a bucket that does not exist with 404.
            crate::ErrorKind::NotFound => Error::Server(format!(
                "the bucket of {location} does not exist ({e}); create it, or check the bucket name and the endpoint (--s3-endpoint or AWS_ENDPOINT_URL)"
            )),
            _ => e,
        };
        self.put_if_absent(MARKER_KEY.to_owned(), marker)
            .map_err(missing)?;
        let bytes = self
            .get(MARKER_KEY.to_owned())
            .map_err(missing)?
            .ok_or_else(|| {
                Error::Server(format!(
                    "{location}: the object {MARKER_KEY} was written and cannot be read back; check the endpoint and the key's read permission"
                ))
            })?;
        check_marker(&location, &bytes)
    }

    /// Checks that the store's location answers and holds an S3 store this build
    /// reads, without writing: one GET of the marker [`MARKER_KEY`]. For the commands
    /// that only read (a pull, `versions`), whose key may be a read-only one that
    /// [`S3Store::check`]'s create-if-absent would be refused. No marker: the bucket
    /// does not exist, or nothing was ever pushed under the prefix (S3 answers both
    /// alike), said in one line ([`Error::Server`], as a server's start says it).
    /// Blocks (see the module's doc).
    pub fn check_readable(&self) -> Result<()> {
        let location = self.objects.location().to_string();
        let Some(bytes) = self.get(MARKER_KEY.to_owned())? else {
            return Err(Error::Server(format!(
                "{location} holds no sqlferry store: the bucket does not exist, or nothing was pushed under this prefix yet; check the bucket name, the prefix and the endpoint (--s3-endpoint or AWS_ENDPOINT_URL)"
            )));
        };
        check_marker(&location, &bytes)
    }

    fn cache_conn(&self) -> Result<Connection> {
        let conn = Connection::open(&self.cache).map_err(sql_error(&self.cache))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(sql_error(&self.cache))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql_error(&self.cache))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql_error(&self.cache))?;
        Ok(conn)
    }

    /// Runs `fut` on the runtime and waits for it on this thread.
    fn wait<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.runtime.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.blocking_recv().map_err(|_| {
            Error::Server(
                "an object storage request was dropped before it answered (the runtime is shutting down)"
                    .into(),
            )
        })?
    }

    fn get(&self, key: String) -> Result<Option<Vec<u8>>> {
        let objects = self.objects.clone();
        self.wait(async move { objects.get(&key).await })
    }

    fn get_range(&self, key: String, range: std::ops::Range<u64>) -> Result<Vec<u8>> {
        let objects = self.objects.clone();
        self.wait(async move { objects.get_range(&key, range).await })
    }

    fn put_if_absent(&self, key: String, data: Vec<u8>) -> Result<Created> {
        let objects = self.objects.clone();
        self.wait(async move { objects.put_if_absent(&key, data).await })
    }

    /// Writes `key` from the first `len` bytes of `file`: one PUT up to
    /// [`MULTIPART_ABOVE`], else a multipart upload one [`PART_SIZE`] part at a time.
    fn put_file(&self, key: &str, file: &mut File, len: u64) -> Result<()> {
        let read = |file: &mut File, n: usize| -> Result<Vec<u8>> {
            let mut buf = vec![0u8; n];
            file.read_exact(&mut buf)
                .map_err(|e| Error::Server(format!("reading back this push's {key}: {e}")))?;
            Ok(buf)
        };
        file.seek(SeekFrom::Start(0))
            .map_err(|e| Error::Server(format!("reading back this push's {key}: {e}")))?;
        let objects = self.objects.clone();
        let owned = key.to_owned();
        if len <= MULTIPART_ABOVE as u64 {
            let data = read(file, len as usize)?;
            return self.wait(async move { objects.put(&owned, data).await });
        }
        let mut upload = self.wait(async move { objects.upload(&owned).await })?;
        let mut left = len;
        while left > 0 {
            let n = left.min(PART_SIZE as u64);
            let data = match read(file, n as usize) {
                Ok(d) => d,
                Err(e) => {
                    let _ = self.wait(async move {
                        upload.abort().await;
                        Ok::<(), Error>(())
                    });
                    return Err(e);
                }
            };
            let (back, sent) = self.wait(async move {
                let sent = upload.part(data).await;
                Ok::<_, Error>((upload, sent))
            })?;
            upload = back;
            if let Err(e) = sent {
                let _ = self.wait(async move {
                    upload.abort().await;
                    Ok::<(), Error>(())
                });
                return Err(e);
            }
            left -= n;
        }
        self.wait(async move { upload.finish().await })
    }

    fn version_key(replica: &ReplicaPath, number: u64) -> String {
        format!("replicas/{replica}/v/{number}")
    }

    /// Version `number` of `replica`; `None` when there is none, or it was removed.
    pub fn version(&self, replica: &ReplicaPath, number: u64) -> Result<Option<VersionObject>> {
        Ok(match self.slot(replica, number)? {
            Slot::Present(v) => Some(*v),
            Slot::Missing | Slot::Removed(_) => None,
        })
    }

    /// What the object of version `number` of `replica` holds: the version, its
    /// tombstone, or nothing.
    pub fn slot(&self, replica: &ReplicaPath, number: u64) -> Result<Slot> {
        let key = Self::version_key(replica, number);
        let Some(bytes) = self.get(key.clone())? else {
            return Ok(Slot::Missing);
        };
        self.parse_slot(&key, &bytes, Some((replica.as_str(), number)))
    }

    /// A version object's bytes read from `key`; `expect`: the replica and number the
    /// key names, checked against what the object says.
    fn parse_slot(&self, key: &str, bytes: &[u8], expect: Option<(&str, u64)>) -> Result<Slot> {
        let bad = |why: String| {
            Error::Verification(format!(
                "the version object {key} in {} is damaged: {why}; nothing was read",
                self.objects.location()
            ))
        };
        if let Ok(t) = serde_json::from_slice::<Tombstone>(bytes)
            && t.removed_at.is_some()
        {
            return Ok(Slot::Removed(t));
        }
        let v: VersionObject =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not a version: {e}")))?;
        let sealed = v.encryption_key_id.is_some() || v.seal.is_some();
        match (v.format, sealed) {
            (VERSION_FORMAT, false) => {}
            (SEALED_VERSION_FORMAT, true) => {
                if v.encryption_key_id.is_none() || v.seal.is_none() {
                    return Err(bad(
                        "an encrypted version without its key id or its seal".into()
                    ));
                }
            }
            (VERSION_FORMAT | SEALED_VERSION_FORMAT, _) => {
                return Err(bad(format!(
                    "format {} with{} a seal",
                    v.format,
                    if sealed { "" } else { "out" }
                )));
            }
            (f, _) => {
                return Err(bad(format!(
                    "format {f} (this sqlferry reads {VERSION_FORMAT} and {SEALED_VERSION_FORMAT})"
                )));
            }
        }
        if let Some((replica, number)) = expect
            && (v.replica != replica || v.number != number)
        {
            return Err(bad(format!("it names {}@{}", v.replica, v.number)));
        }
        if v.chunks.len() as u32 != chunk_count(v.page_count) {
            return Err(bad(format!(
                "{} chunks for {} pages",
                v.chunks.len(),
                v.page_count
            )));
        }
        Ok(Slot::Present(Box::new(v)))
    }

    /// The latest version of `replica`, found without a LIST: from the latest this
    /// store saw (or 0), GETs of the next numbers at doubling steps until one is
    /// missing, then a binary search between the last found and the first missing.
    /// Two GETs when the latest is the one last seen. Relies on versions being numbered
    /// without gaps from 1: retention replaces a removed version's object by its
    /// tombstone, and never removes the latest.
    ///
    /// With a versions index: its latest row, one GET past it (the repair) and one of
    /// its object.
    pub fn latest(&self, replica: &ReplicaPath) -> Result<Option<VersionObject>> {
        if let Some(latest) = self.indexed_latest_object(replica)? {
            return Ok(latest);
        }
        let hint = self.seen_latest(replica);
        self.latest_from(replica, hint)
    }

    fn seen_latest(&self, replica: &ReplicaPath) -> u64 {
        self.seen
            .lock()
            .map(|s| s.get(replica.as_str()).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    fn saw(&self, replica: &ReplicaPath, number: u64) {
        if let Ok(mut s) = self.seen.lock() {
            let n = s.entry(replica.to_string()).or_insert(0);
            *n = (*n).max(number);
        }
    }

    /// Version `number` of `replica`, seen by this process, has no object any more: the
    /// bucket was emptied, replaced or lost behind its back. Forgets what it saw of the
    /// replica and everything its cache knows (none of it can be trusted to exist, and a
    /// push deduplicating against it would name missing objects), and says so.
    fn lost(&self, replica: &ReplicaPath, number: u64) -> Error {
        if let Ok(mut seen) = self.seen.lock() {
            seen.remove(replica.as_str());
        }
        let forgot = self.cache_conn().and_then(|conn| {
            conn.execute_batch("DELETE FROM pages; DELETE FROM packs; DELETE FROM chunks;")
                .map_err(sql_error(&self.cache))
        });
        if let Err(e) = forgot {
            tracing::warn!(error = %e, "the cache of a lost store was not emptied");
        }
        tracing::error!(%replica, version = number, store = %self.objects.location(), "a version this server saw is gone from the bucket: the bucket was emptied, replaced or lost");
        Error::Server(format!(
            "{replica}@{number}, seen in {} by this server, is gone: the bucket was emptied, replaced or lost behind its back; nothing was read or written. Restore the bucket (then pull or push again), or push again to start the replica anew at version 1 from your copy",
            self.objects.location()
        ))
    }

    fn latest_from(&self, replica: &ReplicaPath, hint: u64) -> Result<Option<VersionObject>> {
        // `lo`: the highest number known to have an object (a version or a tombstone).
        let (mut lo, mut found) = (0u64, None);
        let keep = |n: u64, slot: Slot, lo: &mut u64, found: &mut Option<VersionObject>| match slot
        {
            Slot::Missing => false,
            Slot::Present(v) => {
                (*lo, *found) = (n, Some(*v));
                true
            }
            Slot::Removed(_) => {
                (*lo, *found) = (n, None);
                true
            }
        };
        if hint > 0 {
            let slot = self.slot(replica, hint)?;
            if matches!(slot, Slot::Missing) && hint == self.seen_latest(replica) {
                // Numbers are never freed (a removed version leaves its tombstone): a
                // version this process saw is gone only with the bucket's content. (A
                // hint from a client's base may name a version of another store.)
                return Err(self.lost(replica, hint));
            }
            keep(hint, slot, &mut lo, &mut found);
        }
        let mut step = 1u64;
        let mut hi = loop {
            let n = lo + step;
            let slot = self.slot(replica, n)?;
            if !keep(n, slot, &mut lo, &mut found) {
                break n;
            }
            step *= 2;
        };
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            let slot = self.slot(replica, mid)?;
            if !keep(mid, slot, &mut lo, &mut found) {
                hi = mid;
            }
        }
        if lo > 0 {
            self.saw(replica, lo);
        }
        if found.is_none() && lo > 0 {
            // The highest number is a tombstone: retention never makes one of the
            // latest, so the store was changed by hand (or by another program).
            return Err(Error::Verification(format!(
                "{replica}@{lo}, the latest version number in {}, holds a removed version's tombstone; a store's latest version is never removed",
                self.objects.location()
            )));
        }
        Ok(found)
    }

    /// Every version number of `replica` with an object, oldest first: its version,
    /// or the tombstone of a removed one (GETs of 1, 2, … until one is missing: no
    /// LIST).
    fn slots(&self, replica: &ReplicaPath) -> Result<Vec<(u64, Slot)>> {
        let mut out = Vec::new();
        loop {
            let n = out.len() as u64 + 1;
            match self.slot(replica, n)? {
                Slot::Missing => break,
                slot => out.push((n, slot)),
            }
        }
        if !out.is_empty() {
            self.saw(replica, out.len() as u64);
        }
        Ok(out)
    }

    /// Every version of `replica` retention kept, oldest first: through the versions
    /// index (one query and one GET), else GETs of 1, 2, … until one is missing
    /// (tombstones included: no LIST). An error when it has none.
    pub fn versions(&self, replica: &ReplicaPath) -> Result<Vec<VersionInfo>> {
        let out: Vec<VersionInfo> = self
            .catalog(replica)?
            .into_iter()
            .filter(|r| r.removed_at.is_none())
            .map(|r| r.info())
            .collect();
        if out.is_empty() {
            return Err(not_found(replica));
        }
        Ok(out)
    }

    /// The version of `replica` that `selector` names.
    pub fn select(&self, replica: &ReplicaPath, selector: Selector) -> Result<VersionObject> {
        let latest = self.latest(replica)?.ok_or_else(|| not_found(replica))?;
        let number = match selector {
            Selector::Latest => return Ok(latest),
            Selector::Number(n) if n == latest.number => return Ok(latest),
            Selector::Number(n) => n,
            Selector::LatestMinus(n) => Selector::latest_minus(replica, latest.number, n)?,
            Selector::At(_) => {
                // Removed versions count: a time one of them was current is refused,
                // never answered with an older version.
                let all: Vec<VersionInfo> =
                    self.catalog(replica)?.iter().map(IndexRow::info).collect();
                selector.pick(&all).ok_or_else(|| {
                    Error::NotFound(format!(
                        "{replica}@{selector} does not exist: no version is that old"
                    ))
                })?
            }
        };
        let removed = |at: Option<i64>| {
            Error::NotFound(format!(
                "{replica}@{number} was removed by the retention policy (at {}); `sqlferry versions {replica}` lists the versions kept",
                crate::epoch::rfc3339(at.unwrap_or(0))
            ))
        };
        // The index marks a removal before its tombstone is written.
        if let Some(row) = self.indexed_row(replica, number)?
            && row.removed_at.is_some()
        {
            return Err(removed(row.removed_at));
        }
        match self.slot(replica, number)? {
            Slot::Present(v) => Ok(*v),
            Slot::Removed(t) => Err(removed(t.removed_at)),
            Slot::Missing => Err(Error::NotFound(format!(
                "{replica}@{number} does not exist: the latest version is {}",
                latest.number
            ))),
        }
    }

    /// Starts a push into `replica` (made by its first version).
    pub fn push(&self, replica: &ReplicaPath, options: PushOptions) -> Result<S3VersionWriter> {
        let cache = self.cache_conn()?;
        cache
            .execute_batch(
                "CREATE TEMP TABLE fresh(hash BLOB PRIMARY KEY, offset INTEGER NOT NULL, len INTEGER NOT NULL, sum BLOB) WITHOUT ROWID",
            )
            .map_err(sql_error(&self.cache))?;
        Ok(S3VersionWriter {
            store: self.clone(),
            cache,
            replica: replica.clone(),
            options,
            latest: None,
            must_equal: false,
            held: 0,
            page_size: 0,
            form: DigestForm::One,
            pack: None,
            result: None,
            started: Instant::now(),
            assumed: Default::default(),
            written: HashSet::new(),
            sealed: false,
            seal: None,
        })
    }

    /// Opens the version of `replica` that `selector` names for reading: its object
    /// and the indexes of its packs this store does not know yet.
    pub fn read(&self, replica: &ReplicaPath, selector: Selector) -> Result<S3VersionReader> {
        let version = self.select(replica, selector)?;
        let cache = self.cache_conn()?;
        let packs = version.pack_names()?;
        self.load_indexes(&cache, &packs)?;
        Ok(S3VersionReader {
            store: self.clone(),
            cache,
            replica: replica.clone(),
            seal: version.seal_bytes()?,
            info: version.info(),
            chunks: version.chunk_hashes()?,
            packs: packs.into_iter().collect(),
            chunk: None,
            ahead: ReadAhead::new(),
        })
    }

    /// Reads the index of each of `packs` the cache does not know yet into it.
    fn load_indexes(&self, cache: &Connection, packs: &[Hash]) -> Result<()> {
        for name in packs {
            let known = cache
                .prepare_cached("SELECT 1 FROM packs WHERE name = ?1")
                .and_then(|mut s| s.exists([&name[..]]))
                .map_err(sql_error(&self.cache))?;
            if known {
                continue;
            }
            let key = idx_key(name);
            let bytes = self.get(key.clone())?.ok_or_else(|| {
                Error::Verification(format!(
                    "the pack index {key} in {} is missing: the versions naming its pack cannot be read",
                    self.objects.location()
                ))
            })?;
            let entries = parse_idx(&bytes).map_err(|why| {
                Error::Verification(format!(
                    "the pack index {key} in {} is damaged: {why}",
                    self.objects.location()
                ))
            })?;
            let tx = cache
                .unchecked_transaction()
                .map_err(sql_error(&self.cache))?;
            {
                let mut insert = tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO pages(hash, pack, offset, len, sum) VALUES (?1, ?2, ?3, ?4, ?5)",
                    )
                    .map_err(sql_error(&self.cache))?;
                for (hash, offset, len, sum) in entries {
                    insert
                        .execute(params![
                            &hash[..],
                            &name[..],
                            offset as i64,
                            len,
                            sum.as_ref().map(|s| &s[..])
                        ])
                        .map_err(sql_error(&self.cache))?;
                }
            }
            tx.execute("INSERT OR IGNORE INTO packs(name) VALUES (?1)", [&name[..]])
                .map_err(sql_error(&self.cache))?;
            tx.commit().map_err(sql_error(&self.cache))?;
        }
        Ok(())
    }

    /// The passphrase salt and cost `replica` keeps (its object
    /// `replicas/<path>/passphrase.json`, [`PassphraseObject`]); `None` when it has
    /// none.
    pub fn passphrase(
        &self,
        replica: &ReplicaPath,
    ) -> Result<Option<crate::crypt::PassphraseSalt>> {
        let key = passphrase_key(replica);
        let Some(bytes) = self.get(key.clone())? else {
            return Ok(None);
        };
        let bad = |why: String| {
            Error::Verification(format!(
                "the passphrase salt {key} in {} is damaged: {why}",
                self.objects.location()
            ))
        };
        let o: PassphraseObject =
            serde_json::from_slice(&bytes).map_err(|e| bad(format!("not a salt: {e}")))?;
        if o.format != VERSION_FORMAT || o.replica != replica.as_str() {
            return Err(bad(format!("format {} of {}", o.format, o.replica)));
        }
        let mut salt = vec![0u8; o.salt.len() / 2];
        let salt = hex::decode_to_slice(&o.salt, &mut salt).ok().map(|()| salt);
        crate::crypt::PassphraseSalt::from_wire(
            replica.as_str(),
            salt.as_deref(),
            (o.memory_kib, o.passes, o.lanes),
        )
        .map(Some)
        .map_err(|e| bad(e.to_string()))
    }

    /// The key id of `replica`'s latest version when it is encrypted; `None` for a
    /// plaintext replica, or one with no version.
    pub fn encryption(&self, replica: &ReplicaPath) -> Result<Option<String>> {
        Ok(self.latest(replica)?.and_then(|v| v.encryption_key_id))
    }

    /// Chunk `hash`'s page hashes, read and checked against its name.
    fn chunk(&self, replica: &ReplicaPath, number: u64, hash: &Hash) -> Result<Vec<u8>> {
        let key = chunk_key(hash);
        let bytes = self.get(key.clone())?.ok_or_else(|| {
            Error::Verification(format!(
                "{replica}@{number} cannot be read: its chunk object {key} in {} is missing",
                self.objects.location()
            ))
        })?;
        if sha256(&bytes) != *hash || bytes.len() % HASH_BYTES != 0 {
            return Err(Error::Verification(format!(
                "{replica}@{number} cannot be read: its chunk object {key} in {} is damaged (its bytes do not match its name); nothing was delivered",
                self.objects.location()
            )));
        }
        Ok(bytes)
    }
}

fn sql_error(path: &Path) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |e| Error::Server(format!("the S3 store's cache {}: {e}", path.display()))
}

fn not_found(replica: &ReplicaPath) -> Error {
    Error::NotFound(format!("replica {replica} does not exist"))
}

/// A replica's passphrase salt and cost (`replicas/<path>/passphrase.json`, JSON),
/// public by design (docs/security.md, "Keys"): written once, by the first push sealed
/// with a key stretched from a passphrase, with `If-None-Match: *`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PassphraseObject {
    /// The store's format ([`VERSION_FORMAT`]).
    pub format: u32,
    /// The replica it belongs to (checked against the key it was read from).
    pub replica: String,
    /// The salt (hex).
    pub salt: String,
    /// Argon2id's memory in KiB.
    pub memory_kib: u32,
    /// Its passes.
    pub passes: u32,
    /// Its lanes.
    pub lanes: u32,
}

fn passphrase_key(replica: &ReplicaPath) -> String {
    format!("replicas/{replica}/passphrase.json")
}

fn passphrase_object(replica: &ReplicaPath, p: &crate::crypt::PassphraseSalt) -> Result<Vec<u8>> {
    serde_json::to_vec(&PassphraseObject {
        format: VERSION_FORMAT,
        replica: replica.to_string(),
        salt: hex(&p.salt),
        memory_kib: p.cost.memory_kib,
        passes: p.cost.passes,
        lanes: p.cost.lanes,
    })
    .map_err(|e| Error::Bug(format!("a passphrase salt as JSON: {e}")))
}

fn chunk_key(hash: &Hash) -> String {
    format!("chunks/{}", hex(hash))
}

fn pack_key(name: &Hash) -> String {
    format!("packs/{}.pack", hex(name))
}

fn idx_key(name: &Hash) -> String {
    format!("packs/{}.idx", hex(name))
}

/// One entry of an index object: hash, offset, length, and a sealed page's sum.
type IdxEntry = (Hash, u64, u32, Option<Hash>);

/// The entries of an index object (a plain pack's, [`IDX_MAGIC`], or a sealed one's,
/// [`IDX_SEALED_MAGIC`], whose entries carry the sum), sorted by hash.
fn parse_idx(bytes: &[u8]) -> std::result::Result<Vec<IdxEntry>, String> {
    let (rest, entry) = match bytes.strip_prefix(IDX_MAGIC) {
        Some(rest) => (rest, IDX_ENTRY),
        None => (
            bytes
                .strip_prefix(IDX_SEALED_MAGIC)
                .ok_or("it does not start as an index")?,
            IDX_SEALED_ENTRY,
        ),
    };
    let (count, rest) = rest.split_at_checked(4).ok_or("it is cut short")?;
    let count = u32::from_be_bytes(count.try_into().map_err(|_| "cut short")?) as usize;
    if rest.len() != count * entry {
        return Err(format!(
            "{} bytes of entries for {count} entries",
            rest.len()
        ));
    }
    let mut out: Vec<IdxEntry> = Vec::with_capacity(count);
    for e in rest.chunks_exact(entry) {
        let hash: Hash = e[..HASH_BYTES].try_into().map_err(|_| "cut short")?;
        let offset = u64::from_be_bytes(e[32..40].try_into().map_err(|_| "cut short")?);
        let len = u32::from_be_bytes(e[40..44].try_into().map_err(|_| "cut short")?);
        let sum = match entry == IDX_SEALED_ENTRY {
            true => Some(Hash::try_from(&e[44..]).map_err(|_| "cut short")?),
            false => None,
        };
        if out.last().is_some_and(|(h, _, _, _)| *h >= hash) {
            return Err("its entries are not sorted".into());
        }
        out.push((hash, offset, len, sum));
    }
    Ok(out)
}

/// Where a page lies: its pack and its bytes there, and a sealed page's sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    pack: Hash,
    offset: u64,
    len: u32,
    sum: Option<Hash>,
}

/// A sealed page's sum from the cache: `None` for a plain page (or a sum that is not
/// 32 bytes, which then matches no sealed read).
fn sum_of(blob: Option<Vec<u8>>) -> Option<Hash> {
    blob.and_then(|b| Hash::try_from(b.as_slice()).ok())
}

/// Where the cache says page `hash` lies, among the entries of its kind (`sealed`:
/// those of sealed packs, which carry a sum; else those of plain packs): in one of
/// `prefer` when one holds it, else in any pack it knows. An entry of the other kind
/// never answers, as in the directory store: a sealed push that named a plain page's
/// hash as an identity (or the reverse) is stored anew, never read as the other.
fn lookup(
    cache: &Connection,
    path: &Path,
    hash: &Hash,
    prefer: &HashSet<Hash>,
    sealed: bool,
) -> Result<Option<Loc>> {
    let sql = match sealed {
        true => "SELECT pack, offset, len, sum FROM pages WHERE hash = ?1 AND sum IS NOT NULL",
        false => "SELECT pack, offset, len, sum FROM pages WHERE hash = ?1 AND sum IS NULL",
    };
    let mut stmt = cache.prepare_cached(sql).map_err(sql_error(path))?;
    let mut rows = stmt.query([&hash[..]]).map_err(sql_error(path))?;
    let mut first = None;
    while let Some(row) = rows.next().map_err(sql_error(path))? {
        let pack: Vec<u8> = row.get(0).map_err(sql_error(path))?;
        let Ok(pack) = Hash::try_from(pack.as_slice()) else {
            continue;
        };
        let loc = Loc {
            pack,
            offset: row.get::<_, i64>(1).map_err(sql_error(path))? as u64,
            len: row.get(2).map_err(sql_error(path))?,
            sum: sum_of(row.get(3).map_err(sql_error(path))?),
        };
        if prefer.contains(&pack) {
            return Ok(Some(loc));
        }
        first.get_or_insert(loc);
    }
    Ok(first)
}

/// The pages a push stores that no known pack holds, in a temporary file until the
/// push commits.
struct NewPack {
    file: BufWriter<File>,
    hasher: Sha256,
    len: u64,
}

/// A push into an [`S3Store`]: the engine's [`PageTarget`]. Nothing is written to the
/// object storage before [`PageTarget::commit`] (or `commit_chunks`), which writes the
/// pack, its index, the new chunks and last the version object; dropped before, it
/// leaves nothing behind but its temporary file, removed with it.
pub struct S3VersionWriter {
    store: S3Store,
    /// The cache, with this push's `temp.fresh`: hash → offset and length in its pack.
    cache: Connection,
    replica: ReplicaPath,
    options: PushOptions,
    /// The replica's latest version when the push began.
    latest: Option<VersionObject>,
    /// The base is stale and the push not forced: only the latest's content may result.
    must_equal: bool,
    /// The pages of `latest` reported to the origin as held.
    held: u32,
    page_size: u32,
    form: DigestForm,
    pack: Option<NewPack>,
    /// The version this push made, or the unchanged latest when nothing differed.
    result: Option<(VersionInfo, bool)>,
    /// When the push began: one that ran longer than the store's grace checks every
    /// object it names before committing (a sweep may have deleted one meanwhile).
    started: Instant,
    /// Objects this push names only because the cache knew them (not the latest
    /// version's, not written by this push): checked before committing, since another
    /// server's sweep may have deleted them.
    assumed: std::collections::BTreeSet<String>,
    /// Chunks this push wrote (or found existing when it tried).
    written: HashSet<Hash>,
    /// The session is sealed: pages come sealed under their identities, and the
    /// version's seal before COMMIT ([`PageTarget::keeps_sealed`]).
    sealed: bool,
    /// The seal of the version this sealed push makes ([`PageTarget::keep_seal`]).
    seal: Option<Vec<u8>>,
}

impl S3VersionWriter {
    /// After a successful sync: the version now latest, and whether this push made it
    /// (`false`: nothing differed from the latest version, so none was made).
    pub fn outcome(&self) -> Option<(&VersionInfo, bool)> {
        self.result.as_ref().map(|(v, made)| (v, *made))
    }

    fn conflict(&self, latest: Option<&VersionObject>) -> Error {
        Error::Conflict {
            replica: self.replica.to_string(),
            latest: latest.map_or(0, |v| v.number),
            based_on: self.options.base,
            latest_at: latest.map_or(0, |v| v.created_at),
            latest_client: latest.map_or(String::new(), |v| v.client_id.clone()),
            encrypted: self.options.encryption.is_some(),
        }
    }

    fn fresh(&self, hash: &Hash) -> Result<bool> {
        self.cache
            .prepare_cached("SELECT 1 FROM temp.fresh WHERE hash = ?1")
            .and_then(|mut s| s.exists([&hash[..]]))
            .map_err(sql_error(&self.store.cache))
    }

    /// The pack of each page of the result named by `hashes` (`None`: this push's new
    /// pack), added to `packs`; an error for a page stored nowhere.
    fn locate(
        &mut self,
        first_pgno: u32,
        hashes: &[u8],
        prefer: &HashSet<Hash>,
        packs: &mut HashSet<Hash>,
    ) -> Result<()> {
        for (i, h) in hashes.chunks_exact(HASH_BYTES).enumerate() {
            let hash: Hash = h.try_into().expect("chunks_exact yields 32-byte slices");
            if self.fresh(&hash)? {
                continue;
            }
            match lookup(&self.cache, &self.store.cache, &hash, prefer, self.sealed)? {
                Some(loc) => {
                    if !prefer.contains(&loc.pack) {
                        self.assumed.insert(pack_key(&loc.pack));
                        self.assumed.insert(idx_key(&loc.pack));
                    }
                    packs.insert(loc.pack);
                }
                None => {
                    return Err(Error::Protocol(format!(
                        "page {} of the pushed database ({}) was never sent and is stored nowhere; nothing was stored",
                        first_pgno + i as u32,
                        hex(&hash)
                    )));
                }
            }
        }
        Ok(())
    }

    /// Writes chunk `hash` unless it is known to exist (the cache, or the base's).
    fn put_chunk(&mut self, hash: &Hash, hashes: Vec<u8>, base: &HashSet<Hash>) -> Result<()> {
        if base.contains(hash) {
            return Ok(());
        }
        let known = self
            .cache
            .prepare_cached("SELECT 1 FROM chunks WHERE hash = ?1")
            .and_then(|mut s| s.exists([&hash[..]]))
            .map_err(sql_error(&self.store.cache))?;
        if known {
            self.assumed.insert(chunk_key(hash));
        } else {
            // Content-addressed: an existing object holds these very bytes and stays.
            // But it may be old and named by no version: checked before the commit,
            // as one named through the cache.
            match self.store.put_if_absent(chunk_key(hash), hashes)? {
                Created::Created => {
                    self.written.insert(*hash);
                }
                Created::AlreadyExists => {
                    self.assumed.insert(chunk_key(hash));
                }
            }
        }
        self.cache
            .execute(
                "INSERT OR IGNORE INTO chunks(hash) VALUES (?1)",
                [&hash[..]],
            )
            .map_err(sql_error(&self.store.cache))?;
        Ok(())
    }

    /// Writes this push's pack and its index, if it has new pages, and tells the cache;
    /// returns the pack's name.
    fn put_pack(&mut self) -> Result<Option<Hash>> {
        let Some(pack) = self.pack.take() else {
            return Ok(None);
        };
        let io = |e: std::io::Error| Error::Server(format!("this push's temporary pack: {e}"));
        let mut file = pack.file.into_inner().map_err(|e| io(e.into_error()))?;
        let name: Hash = pack.hasher.finalize().into();
        self.store.put_file(&pack_key(&name), &mut file, pack.len)?;
        // The index, sorted by hash, through a file too: it grows with the pages pushed.
        let path = &self.store.cache;
        let mut idx = BufWriter::new(tempfile::tempfile_in(cache_dir(path)).map_err(io)?);
        let count: u32 = self
            .cache
            .query_row("SELECT count(*) FROM temp.fresh", [], |r| r.get(0))
            .map_err(sql_error(path))?;
        // A sealed push's pack holds only sealed pages: its index carries their sums.
        let (magic, entry) = match self.sealed {
            true => (IDX_SEALED_MAGIC, IDX_SEALED_ENTRY),
            false => (IDX_MAGIC, IDX_ENTRY),
        };
        idx.write_all(magic).map_err(io)?;
        idx.write_all(&count.to_be_bytes()).map_err(io)?;
        {
            let mut stmt = self
                .cache
                .prepare("SELECT hash, offset, len, sum FROM temp.fresh ORDER BY hash")
                .map_err(sql_error(path))?;
            let mut rows = stmt.query([]).map_err(sql_error(path))?;
            while let Some(row) = rows.next().map_err(sql_error(path))? {
                let hash: Vec<u8> = row.get(0).map_err(sql_error(path))?;
                let offset = row.get::<_, i64>(1).map_err(sql_error(path))? as u64;
                let len: u32 = row.get(2).map_err(sql_error(path))?;
                let sum: Option<Vec<u8>> = row.get(3).map_err(sql_error(path))?;
                idx.write_all(&hash).map_err(io)?;
                idx.write_all(&offset.to_be_bytes()).map_err(io)?;
                idx.write_all(&len.to_be_bytes()).map_err(io)?;
                match (self.sealed, sum) {
                    (true, Some(sum)) if sum.len() == HASH_BYTES => {
                        idx.write_all(&sum).map_err(io)?
                    }
                    (false, None) => {}
                    _ => {
                        return Err(Error::Bug(
                            "a page of this push's pack has a sum of the other kind".into(),
                        ));
                    }
                }
            }
        }
        let mut idx = idx.into_inner().map_err(|e| io(e.into_error()))?;
        let idx_len = magic.len() as u64 + 4 + u64::from(count) * entry as u64;
        self.store.put_file(&idx_key(&name), &mut idx, idx_len)?;
        // Known from now on to every push and pull of this process (the pack exists,
        // whether or not this push's version is made).
        let tx = self
            .cache
            .unchecked_transaction()
            .map_err(sql_error(path))?;
        tx.execute(
            "INSERT OR IGNORE INTO pages(hash, pack, offset, len, sum) SELECT hash, ?1, offset, len, sum FROM temp.fresh",
            [&name[..]],
        )
        .map_err(sql_error(path))?;
        tx.execute("INSERT OR IGNORE INTO packs(name) VALUES (?1)", [&name[..]])
            .map_err(sql_error(path))?;
        tx.commit().map_err(sql_error(path))?;
        Ok(Some(name))
    }

    /// Before the version object: every object the version will name that may have
    /// been swept exists (HEAD). Those it names only through the cache always; when
    /// the push ran longer than the store's grace, all it did not write itself (a
    /// sweep may have found them unnamed and old). One that is gone fails the push
    /// cleanly: no version, and the cache forgets it so that a new push writes it.
    fn check_named(
        &mut self,
        chunks: &[Hash],
        packs: &HashSet<Hash>,
        new_pack: Option<Hash>,
    ) -> Result<()> {
        let took = self.started.elapsed();
        let long = took > self.store.grace;
        let mut keys = std::mem::take(&mut self.assumed);
        if long {
            for chunk in chunks.iter().filter(|c| !self.written.contains(*c)) {
                keys.insert(chunk_key(chunk));
            }
            for pack in packs.iter().filter(|p| Some(**p) != new_pack) {
                keys.insert(pack_key(pack));
                keys.insert(idx_key(pack));
            }
        }
        let mut gone = Vec::new();
        for key in keys {
            let objects = self.store.objects.clone();
            let probe = key.clone();
            if self
                .store
                .wait(async move { objects.head(&probe).await })?
                .is_none()
            {
                // Forgotten, so that the next push writes these pages again.
                gc::forget(&self.cache, &self.store.cache, &key)?;
                gone.push(key);
            }
        }
        let Some(first) = gone.first() else {
            return Ok(());
        };
        let why = match long {
            true => format!(
                "the push took {} s, longer than the garbage collector's grace of {} s",
                took.as_secs(),
                self.store.grace.as_secs()
            ),
            false => "deleted by a sweep since this server last read it".to_owned(),
        };
        Err(Error::Server(format!(
            "{} was pushed onto {} object(s) of {} that are gone ({first}{}: {why}); no version was made: push again",
            self.replica,
            gone.len(),
            self.store.objects.location(),
            if gone.len() > 1 { ", …" } else { "" }
        )))
    }

    /// For a sealed push whose key came from a passphrase: refuses, before any page is
    /// stored, one that names another salt or cost than the replica keeps (it
    /// stretched another key).
    fn check_passphrase(&self) -> Result<()> {
        let Some(ours) = &self.options.passphrase else {
            return Ok(());
        };
        match self.store.passphrase(&self.replica)? {
            Some(theirs) if theirs != *ours => Err(self.other_salt()),
            _ => Ok(()),
        }
    }

    /// The replica keeps another salt than this push's key was stretched with: another
    /// first push made it after this one asked for it (they raced), or the object was
    /// changed. Either way this key is not the replica's passphrase key; pushed again,
    /// the client stretches its passphrase with the replica's salt (and is then refused
    /// by key id if the passphrase is another one).
    fn other_salt(&self) -> Error {
        Error::Auth(format!(
            "{} keeps another passphrase salt than this push's key was stretched with (another push made the replica's salt after this one asked for it, or it was changed in the store): this key is not the replica's passphrase key; no version was made: push again to stretch the passphrase with the replica's salt",
            self.replica
        ))
    }

    /// For a sealed push whose key came from a passphrase, just before its version
    /// object: the replica's salt object, written if absent (`If-None-Match: *`, so two
    /// first pushes agree on one: the loser's salt differs and it is refused, before
    /// its version object). One left by a push that failed after it is harmless: every
    /// client asks for the salt before it stretches, so the next one uses it.
    fn keep_passphrase(&self) -> Result<()> {
        let Some(ours) = &self.options.passphrase else {
            return Ok(());
        };
        match self.store.put_if_absent(
            passphrase_key(&self.replica),
            passphrase_object(&self.replica, ours)?,
        )? {
            Created::Created => Ok(()),
            Created::AlreadyExists => match self.store.passphrase(&self.replica)? {
                Some(theirs) if theirs == *ours => Ok(()),
                _ => Err(self.other_salt()),
            },
        }
    }

    /// Whether a result with `digest` (in the engine's form) is the latest's content.
    fn same_as_latest(&self, digest: &Hash) -> bool {
        let Some(l) = &self.latest else {
            return false;
        };
        match self.form {
            DigestForm::Chunked => l.digest2 == digest_text(DigestForm::Chunked, digest),
            DigestForm::One => !l.digest.is_empty() && l.digest == hex(digest),
        }
    }

    /// Before a commit: a result equal to the latest makes no version (`Some(())`); a
    /// stale base with another result is a conflict.
    fn settle_same(&mut self, digest: &Hash) -> Result<Option<()>> {
        let same = self.same_as_latest(digest);
        if self.must_equal && !same {
            return Err(self.conflict(self.latest.as_ref()));
        }
        if same {
            let latest = self.latest.as_ref().expect("same content means a latest");
            self.result = Some((latest.info(), false));
            return Ok(Some(()));
        }
        Ok(None)
    }

    /// Writes the pack, then the version object (the commit point) naming `chunks`
    /// and the packs its pages live in.
    fn finish(
        &mut self,
        page_count: u32,
        digests: (String, String),
        chunks: Vec<Hash>,
        mut packs: HashSet<Hash>,
    ) -> Result<()> {
        let new_pack = self.put_pack()?;
        if let Some(name) = new_pack {
            packs.insert(name);
        }
        let number = self.latest.as_ref().map_or(1, |l| l.number + 1);
        let seal = match self.sealed {
            true => Some(hex(self.seal.as_deref().ok_or_else(|| {
                Error::Protocol("COMMIT of a sealed push without the version's SEAL".into())
            })?)),
            false => None,
        };
        // With a versions index, the fence (`s3/gc.rs`): held from before the checks
        // until the version object exists and its row is in, so that no sweep deletes
        // between them what they found. Dropped on any error below: let go.
        let fence = self.store.push_fence(&self.replica, number)?;
        self.check_named(&chunks, &packs, new_pack)?;
        if self.sealed {
            self.keep_passphrase()?;
        }
        let mut packs: Vec<String> = packs.iter().map(|p| hex(p)).collect();
        packs.sort();
        let version = VersionObject {
            format: match self.sealed {
                true => SEALED_VERSION_FORMAT,
                false => VERSION_FORMAT,
            },
            replica: self.replica.to_string(),
            number,
            page_size: self.page_size,
            page_count,
            digest: digests.0,
            digest2: digests.1,
            message: self.options.message.clone(),
            created_at: crate::epoch::now(),
            client_id: self.options.client_id.clone(),
            key_id: self.options.key_id.clone(),
            base: self.options.base.unwrap_or(0),
            chunks: chunks.iter().map(|c| hex(c)).collect(),
            packs,
            encryption_key_id: seal.as_ref().and(self.options.encryption.clone()),
            seal,
        };
        let body = serde_json::to_vec(&version)
            .map_err(|e| Error::Bug(format!("a version object as JSON: {e}")))?;
        let key = S3Store::version_key(&self.replica, number);
        match self.store.put_if_absent(key, body)? {
            Created::Created => {
                self.store.saw(&self.replica, number);
                match fence {
                    Some(fence) => self.store.index_landed(&self.replica, &version, fence),
                    None => self.store.index_created(&self.replica, &version),
                }
                self.result = Some((version.info(), true));
                Ok(())
            }
            Created::AlreadyExists => {
                // Another push made version N first: this one is refused, as the
                // directory store refuses a push whose base moved. Where that version
                // is of the other kind (plaintext and sealed) or under another key,
                // the refusal is the mix's, as the directory store's would be once it
                // holds the replica's write lock: a conflict's advice (`--force`)
                // could never work.
                let theirs = self.store.version(&self.replica, number).ok().flatten();
                tracing::info!(replica = %self.replica, version = number, "another push created this version first: a conflict");
                if let Some(t) = &theirs {
                    super::replica::check_key_ids(
                        &self.replica,
                        self.sealed,
                        &self.options,
                        Some((t.number, t.encryption_key_id.as_deref())),
                        || self.conflict(Some(t)),
                    )?;
                }
                Err(self.conflict(theirs.as_ref()))
            }
        }
    }
}

/// The directory a cache file lies in.
fn cache_dir(cache: &Path) -> &Path {
    cache.parent().unwrap_or(Path::new("."))
}

impl PageTarget for S3VersionWriter {
    fn begin(&mut self, begin: &BeginInfo) -> Result<u32> {
        let hint = self
            .options
            .base
            .unwrap_or(0)
            .max(self.store.seen_latest(&self.replica));
        self.latest = match self.store.indexed_latest_object(&self.replica)? {
            Some(latest) => latest,
            None => self.store.latest_from(&self.replica, hint)?,
        };
        self.page_size = begin.page_size;
        self.form = match begin.chunked_digest {
            true => DigestForm::Chunked,
            false => DigestForm::One,
        };
        // A mix of plaintext and sealed, another key, or a sealed push whose base is
        // not the latest: refused before any page is stored, as by the directory store.
        self.sealed = begin.sealed;
        self.seal = None;
        super::replica::check_key_ids(
            &self.replica,
            begin.sealed,
            &self.options,
            self.latest
                .as_ref()
                .map(|l| (l.number, l.encryption_key_id.as_deref())),
            || self.conflict(self.latest.as_ref()),
        )?;
        if begin.sealed {
            self.check_passphrase()?;
        }
        let Some(latest) = self.latest.clone() else {
            return Ok(0);
        };
        // The pages of the latest version are known (deduplicated against) from its
        // packs' indexes.
        self.store
            .load_indexes(&self.cache, &latest.pack_names()?)?;
        if !self.options.force && Some(latest.number) != self.options.base {
            if begin.page_count != 0
                && (latest.page_size != begin.page_size || latest.page_count != begin.page_count)
            {
                return Err(self.conflict(Some(&latest)));
            }
            self.must_equal = true;
        }
        let mut held = if latest.page_size == begin.page_size {
            latest.page_count
        } else {
            0
        };
        // An origin that knows another manifest than the latest's must not take the
        // latest's count for its base's: say a count that differs (the hash exchange
        // then runs and finds every page).
        if begin.known_base && held > 0 && begin.base_version != latest.number {
            held = match self.store.version(&self.replica, begin.base_version)? {
                Some(v) if v.page_size == begin.page_size && v.page_count == held => held - 1,
                Some(_) => held,
                None => 0,
            };
        }
        self.held = held;
        Ok(held)
    }

    fn speaks_chunked_digest(&self) -> bool {
        true
    }

    fn keeps_sealed(&self) -> bool {
        true
    }

    fn keep_seal(&mut self, seal: Vec<u8>) -> Result<()> {
        if !self.sealed {
            return Err(Error::Protocol(
                "a version's seal in a plaintext push".into(),
            ));
        }
        self.seal = Some(seal);
        Ok(())
    }

    fn hashes(&mut self, f: &mut dyn FnMut(u32, Hash) -> Result<()>) -> Result<()> {
        let Some(latest) = self.latest.clone() else {
            return Ok(());
        };
        if self.held == 0 {
            return Ok(());
        }
        let mut pgno = 0u32;
        for chunk in latest.chunk_hashes()? {
            let hashes = self.store.chunk(&self.replica, latest.number, &chunk)?;
            for h in hashes.chunks_exact(HASH_BYTES) {
                pgno += 1;
                if pgno > self.held {
                    return Ok(());
                }
                f(
                    pgno,
                    h.try_into().expect("chunks_exact yields 32-byte slices"),
                )?;
            }
        }
        Ok(())
    }

    fn write_page(&mut self, pgno: u32, data: Vec<u8>, hash: &Hash) -> Result<()> {
        let none = HashSet::new();
        if self.fresh(hash)?
            || lookup(&self.cache, &self.store.cache, hash, &none, self.sealed)?.is_some()
        {
            return Ok(()); // stored already: by this push, or in a known pack
        }
        // A sealed page cannot be checked here (the client checks its identity when it
        // opens it): it is kept with the SHA-256 of its bytes, which every read checks.
        let sum = match self.sealed {
            true => {
                if data.len() != self.page_size as usize + crate::crypt::SEAL_OVERHEAD {
                    return Err(Error::Protocol(format!(
                        "sealed page {pgno} has {} bytes, not a sealed page of {}; nothing was stored",
                        data.len(),
                        self.page_size
                    )));
                }
                Some(sha256(&data))
            }
            false => None,
        };
        if self.pack.is_none() {
            let file = tempfile::tempfile_in(cache_dir(&self.store.cache))
                .map_err(|e| Error::Server(format!("a temporary pack for this push: {e}")))?;
            self.pack = Some(NewPack {
                file: BufWriter::with_capacity(1 << 20, file),
                hasher: Sha256::new(),
                len: 0,
            });
        }
        let pack = self.pack.as_mut().expect("made above");
        pack.file
            .write_all(&data)
            .map_err(|e| Error::Server(format!("this push's temporary pack: {e}")))?;
        pack.hasher.update(&data);
        self.cache
            .prepare_cached(
                "INSERT INTO temp.fresh(hash, offset, len, sum) VALUES (?1, ?2, ?3, ?4)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    &hash[..],
                    pack.len as i64,
                    data.len() as u32,
                    sum.as_ref().map(|s| &s[..])
                ])
            })
            .map_err(sql_error(&self.store.cache))?;
        pack.len += data.len() as u64;
        Ok(())
    }

    fn commit(
        &mut self,
        page_count: u32,
        digest: &Hash,
        hashes: &mut dyn Iterator<Item = Result<Hash>>,
    ) -> Result<()> {
        if self.settle_same(digest)?.is_some() {
            return Ok(());
        }
        let prefer: HashSet<Hash> = match &self.latest {
            Some(l) => l.pack_names()?.into_iter().collect(),
            None => HashSet::new(),
        };
        let base_chunks: HashSet<Hash> = match &self.latest {
            Some(l) => l.chunk_hashes()?.into_iter().collect(),
            None => HashSet::new(),
        };
        let mut one = Digest::new(self.page_size, page_count);
        let mut chunked = ChunkedDigest::new(self.page_size, page_count);
        let mut chunks = Vec::with_capacity(chunk_count(page_count) as usize);
        let mut packs = HashSet::new();
        let mut chunk = Vec::with_capacity(CHUNK_PAGES * HASH_BYTES);
        let mut seen = 0u32;
        loop {
            let next = hashes.next().transpose()?;
            if let Some(h) = next {
                seen += 1;
                one.push(&h);
                chunk.extend_from_slice(&h);
            }
            let full = chunk.len() == CHUNK_PAGES * HASH_BYTES;
            if full || (next.is_none() && !chunk.is_empty()) {
                let first = seen - (chunk.len() / HASH_BYTES) as u32 + 1;
                self.locate(first, &chunk, &prefer, &mut packs)?;
                let key = sha256(&chunk);
                chunked.push_chunk(&key);
                chunks.push(key);
                self.put_chunk(&key, std::mem::take(&mut chunk), &base_chunks)?;
                chunk.reserve(CHUNK_PAGES * HASH_BYTES);
            }
            if next.is_none() {
                break;
            }
        }
        if seen != page_count {
            return Err(Error::Protocol(format!(
                "the result has {seen} pages, expected {page_count}"
            )));
        }
        let (one, chunked) = match (one.finish(), chunked.finish()) {
            (Some(o), Some(c)) => (o, c),
            _ => return Err(Error::Bug("the result's digests could not be made".into())),
        };
        let checked = match self.form {
            DigestForm::One => one,
            DigestForm::Chunked => chunked,
        };
        if checked != *digest {
            return Err(Error::Bug(
                "the result does not have the digest the engine checked".into(),
            ));
        }
        self.finish(
            page_count,
            (hex(&one), digest_text(DigestForm::Chunked, &chunked)),
            chunks,
            packs,
        )
    }

    fn held_chunks(&mut self) -> Result<Option<Vec<Hash>>> {
        let Some(latest) = &self.latest else {
            return Ok(Some(Vec::new())); // a new replica: nothing held
        };
        if self.must_equal || latest.page_size != self.page_size || self.held != latest.page_count {
            return Ok(None);
        }
        latest.chunk_hashes().map(Some)
    }

    fn held_chunk(&mut self, idx: u32, out: &mut Vec<u8>) -> Result<()> {
        let latest = self
            .latest
            .as_ref()
            .ok_or_else(|| Error::Bug(format!("held chunk {idx} asked of a new replica")))?;
        let hash = latest
            .chunk_hashes()?
            .get(idx as usize)
            .copied()
            .ok_or_else(|| Error::Bug(format!("held chunk {idx} is past the latest's")))?;
        out.extend_from_slice(&self.store.chunk(&self.replica, latest.number, &hash)?);
        Ok(())
    }

    fn commit_chunks(
        &mut self,
        page_count: u32,
        digest: &Hash,
        chunks: &mut dyn Iterator<Item = Result<Chunk>>,
    ) -> Result<()> {
        if self.settle_same(digest)?.is_some() {
            return Ok(());
        }
        let (prefer, base_chunks): (HashSet<Hash>, HashSet<Hash>) = match &self.latest {
            Some(l) => (
                l.pack_names()?.into_iter().collect(),
                l.chunk_hashes()?.into_iter().collect(),
            ),
            None => (HashSet::new(), HashSet::new()),
        };
        let mut chunked = ChunkedDigest::new(self.page_size, page_count);
        let mut one = Some(Digest::new(self.page_size, page_count));
        let mut keys = Vec::with_capacity(chunk_count(page_count) as usize);
        let mut packs = HashSet::new();
        for chunk in chunks {
            match chunk? {
                Chunk::Held { hash, .. } => {
                    // Its pages are the latest's: they live in the latest's packs.
                    packs.extend(prefer.iter().copied());
                    // Digest 1 would need every held chunk read: none is recorded.
                    one = None;
                    chunked.push_chunk(&hash);
                    keys.push(hash);
                }
                Chunk::New { idx, hash, hashes } => {
                    if sha256(&hashes) != hash {
                        return Err(Error::Bug(format!("new chunk {idx} is not its hash")));
                    }
                    self.locate(idx * CHUNK_PAGES as u32 + 1, &hashes, &prefer, &mut packs)?;
                    if let Some(d) = one.as_mut() {
                        for h in hashes.chunks_exact(HASH_BYTES) {
                            d.push(h.try_into().expect("chunks_exact yields 32-byte slices"));
                        }
                    }
                    chunked.push_chunk(&hash);
                    keys.push(hash);
                    self.put_chunk(&hash, hashes, &base_chunks)?;
                }
            }
        }
        let chunked = chunked.finish().filter(|c| c == digest).ok_or_else(|| {
            Error::Bug("the result's chunks do not have the digest the engine checked".into())
        })?;
        let one = one
            .and_then(Digest::finish)
            .map_or(String::new(), |d| hex(&d));
        self.finish(
            page_count,
            (one, digest_text(DigestForm::Chunked, &chunked)),
            keys,
            packs,
        )
    }
}

/// One version of a replica in an [`S3Store`], for reading: the engine's
/// [`PageSource`].
pub struct S3VersionReader {
    store: S3Store,
    cache: Connection,
    replica: ReplicaPath,
    info: VersionInfo,
    chunks: Vec<Hash>,
    /// The packs the version names: where its pages are read from when the cache knows
    /// them in several.
    packs: HashSet<Hash>,
    /// The chunk last used by `read_page`: (index, its hashes).
    chunk: Option<(u32, Vec<u8>)>,
    /// Pages `read_page` fetched ahead of being asked for.
    ahead: ReadAhead,
    /// The seal of an encrypted version: its pages are sealed, checked against their
    /// sums (never their identities, which only the key opens), and it is relayed as
    /// it is stored ([`S3VersionReader::relay`]).
    seal: Option<Vec<u8>>,
}

/// The pages a reader fetched ahead. A pull into an older copy asks for the pages that
/// differ one at a time, and the pages one push brought lie end to end in its pack, in
/// page order: so when a page must be fetched, the entries after it in its pack come in
/// the same ranged GET, kept by hash until asked for (checked then, against the page
/// number that asks). How many: a window that doubles while most of what was fetched
/// ahead is used and halves while most is not (a copy that differs in scattered pages
/// of a large pack), within [`READ_AHEAD_BYTES`] kept at once, the oldest dropped first.
struct ReadAhead {
    /// The page bytes by hash, with a sealed page's sum.
    pages: HashMap<Hash, (Vec<u8>, Option<Hash>)>,
    /// The order they came in, for dropping the oldest.
    order: VecDeque<Hash>,
    bytes: usize,
    window: u32,
    /// Fetched ahead, and of those asked for, since the window last changed.
    fetched: u32,
    used: u32,
}

impl ReadAhead {
    fn new() -> ReadAhead {
        ReadAhead {
            pages: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            window: READ_AHEAD_FIRST,
            fetched: 0,
            used: 0,
        }
    }

    fn take(&mut self, hash: &Hash) -> Option<(Vec<u8>, Option<Hash>)> {
        let page = self.pages.remove(hash)?;
        self.bytes -= page.0.len();
        self.used += 1;
        Some(page)
    }

    fn keep(&mut self, hash: Hash, page: &[u8], sum: Option<Hash>) {
        if self.pages.contains_key(&hash) {
            return;
        }
        while self.bytes + page.len() > READ_AHEAD_BYTES {
            let Some(old) = self.order.pop_front() else {
                return;
            };
            if let Some(p) = self.pages.remove(&old) {
                self.bytes -= p.0.len();
            }
        }
        self.bytes += page.len();
        self.pages.insert(hash, (page.to_vec(), sum));
        self.order.push_back(hash);
        self.fetched += 1;
    }

    /// How many entries the next fetch reads ahead, after adapting the window to how
    /// much of what came before was used.
    fn next_window(&mut self) -> u32 {
        if self.fetched >= self.window.max(8) {
            self.window = match self.used * 2 >= self.fetched {
                true => (self.window * 2).min(READ_AHEAD_MOST),
                false => (self.window / 2).max(1),
            };
            (self.fetched, self.used) = (0, 0);
        }
        self.window
    }
}

/// Pages waiting to be read in one ranged GET: they lie end to end in one pack.
struct Run {
    /// Page number, hash, length and a sealed page's sum.
    pages: Vec<(u32, Hash, u32, Option<Hash>)>,
    pack: Hash,
    start: u64,
    end: u64,
}

impl S3VersionReader {
    /// The version being read.
    pub fn info(&self) -> &VersionInfo {
        &self.info
    }

    /// For an encrypted version: how the engine relays it, its stored seal sent as it
    /// is, like its sealed pages (`OriginOptions::sealing`); `None` for a plaintext one.
    pub fn relay(&self) -> Option<crate::engine::Sealing<'static>> {
        self.seal
            .clone()
            .map(|seal| crate::engine::Sealing::Relay { seal })
    }

    /// Whether `page`, read as page `pgno` under `hash`, is what the version stores:
    /// a plain page hashes to `hash`; a sealed one (the store cannot open it) is a
    /// sealed page's length and its bytes have the SHA-256 its pack's index recorded.
    fn stored_ok(&self, pgno: u32, hash: &Hash, sum: Option<&Hash>, page: &[u8]) -> bool {
        match (self.seal.is_some(), sum) {
            (false, None) => page_matches(Some(pgno), hash, page),
            (true, Some(sum)) => {
                page.len() == self.info.page_size as usize + crate::crypt::SEAL_OVERHEAD
                    && sha256(page) == *sum
            }
            _ => false,
        }
    }

    fn locate(&self, pgno: u32, hash: &Hash) -> Result<Loc> {
        lookup(
            &self.cache,
            &self.store.cache,
            hash,
            &self.packs,
            self.seal.is_some(),
        )?
        .ok_or_else(|| {
            Error::Verification(format!(
                "page {pgno} of {}@{} is in none of its packs in {}; nothing was delivered",
                self.replica,
                self.info.number,
                self.store.objects.location()
            ))
        })
    }

    /// Up to `n` entries that follow `loc` end to end in its pack, as the cache knows
    /// them: (hash, offset, length), in pack order; none once one is missing, and no
    /// more than [`READ_AHEAD_BYTES`] from `loc` on.
    fn following(&self, loc: &Loc, n: u32) -> Result<Vec<IdxEntry>> {
        let path = &self.store.cache;
        let mut stmt = self
            .cache
            .prepare_cached(
                "SELECT hash, offset, len, sum FROM pages WHERE pack = ?1 AND offset > ?2
                 ORDER BY offset LIMIT ?3",
            )
            .map_err(sql_error(path))?;
        let mut rows = stmt
            .query(params![&loc.pack[..], loc.offset as i64, i64::from(n)])
            .map_err(sql_error(path))?;
        let mut out = Vec::new();
        let mut end = loc.offset + u64::from(loc.len);
        while let Some(row) = rows.next().map_err(sql_error(path))? {
            let hash: Vec<u8> = row.get(0).map_err(sql_error(path))?;
            let offset = row.get::<_, i64>(1).map_err(sql_error(path))? as u64;
            let len: u32 = row.get(2).map_err(sql_error(path))?;
            let sum = sum_of(row.get(3).map_err(sql_error(path))?);
            let (Ok(hash), true) = (Hash::try_from(hash.as_slice()), offset == end) else {
                break;
            };
            // One GET's buffer stays within what is kept ahead, whatever the page size.
            if (end + u64::from(len) - loc.offset) as usize > READ_AHEAD_BYTES {
                break;
            }
            out.push((hash, offset, len, sum));
            end += u64::from(len);
        }
        Ok(out)
    }

    fn damaged(&self, pgno: u32, pack: &Hash) -> Error {
        Error::Verification(format!(
            "page {pgno} of {}@{} is damaged in the object storage ({} in {}): its bytes do not match its {}; nothing was delivered",
            self.replica,
            self.info.number,
            pack_key(pack),
            self.store.objects.location(),
            match self.seal.is_some() {
                true => "sum (a sealed page's SHA-256 in its pack's index)",
                false => "hash",
            }
        ))
    }

    /// Reads the run's pages in one ranged GET, checks each and hands it on.
    fn flush(&self, run: &mut Option<Run>, f: &mut ScanFn<'_>) -> Result<()> {
        let Some(r) = run.take() else {
            return Ok(());
        };
        let bytes = self.store.get_range(pack_key(&r.pack), r.start..r.end)?;
        let mut at = 0usize;
        for (pgno, hash, len, sum) in r.pages {
            let page = &bytes[at..at + len as usize];
            at += len as usize;
            if !self.stored_ok(pgno, &hash, sum.as_ref(), page) {
                return Err(self.damaged(pgno, &r.pack));
            }
            f(pgno, hash, Some(page))?;
        }
        Ok(())
    }
}

impl PageSource for S3VersionReader {
    fn page_size(&self) -> u32 {
        self.info.page_size
    }

    fn page_count(&self) -> u32 {
        self.info.page_count
    }

    fn scan(&mut self, with_data_after: u32, f: &mut ScanFn<'_>) -> Result<()> {
        let lock_page = lock_byte_page(self.info.page_size);
        let zeros = vec![0u8; self.info.page_size as usize];
        let mut run: Option<Run> = None;
        let mut pgno = 0u32;
        for chunk in &self.chunks {
            let hashes = self.store.chunk(&self.replica, self.info.number, chunk)?;
            for h in hashes.chunks_exact(HASH_BYTES) {
                pgno += 1;
                let hash: Hash = h.try_into().expect("chunks_exact yields 32-byte slices");
                if pgno > with_data_after && pgno != lock_page {
                    let loc = self.locate(pgno, &hash)?;
                    let joins = run.as_ref().is_some_and(|r| {
                        r.pack == loc.pack
                            && r.end == loc.offset
                            && r.end - r.start + u64::from(loc.len) <= RUN_BYTES
                    });
                    if !joins {
                        self.flush(&mut run, f)?;
                        run = Some(Run {
                            pages: Vec::new(),
                            pack: loc.pack,
                            start: loc.offset,
                            end: loc.offset,
                        });
                    }
                    let r = run.as_mut().expect("made above");
                    r.pages.push((pgno, hash, loc.len, loc.sum));
                    r.end += u64::from(loc.len);
                    continue;
                }
                // In page order: the pages waiting go first.
                self.flush(&mut run, f)?;
                if pgno <= with_data_after {
                    f(pgno, hash, None)?;
                } else {
                    f(pgno, hash, Some(&zeros))?;
                }
            }
        }
        self.flush(&mut run, f)?;
        if pgno != self.info.page_count {
            return Err(Error::Verification(format!(
                "{}@{} has {pgno} page hashes in its chunks for {} pages; nothing more was delivered",
                self.replica, self.info.number, self.info.page_count
            )));
        }
        Ok(())
    }

    fn read_page(&mut self, pgno: u32, buf: &mut Vec<u8>) -> Result<()> {
        let idx = (pgno - 1) / CHUNK_PAGES as u32;
        if self.chunk.as_ref().is_none_or(|(i, _)| *i != idx) {
            let hash = self.chunks.get(idx as usize).ok_or_else(|| {
                Error::Verification(format!(
                    "{}@{} has no page {pgno}",
                    self.replica, self.info.number
                ))
            })?;
            let hashes = self.store.chunk(&self.replica, self.info.number, hash)?;
            self.chunk = Some((idx, hashes));
        }
        let (_, hashes) = self.chunk.as_ref().expect("loaded above");
        let at = ((pgno - 1) as usize % CHUNK_PAGES) * HASH_BYTES;
        let hash: Hash = hashes
            .get(at..at + HASH_BYTES)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| {
                Error::Verification(format!(
                    "{}@{} has no page {pgno}",
                    self.replica, self.info.number
                ))
            })?;
        buf.clear();
        if pgno == lock_byte_page(self.info.page_size) {
            buf.resize(self.info.page_size as usize, 0);
            return Ok(());
        }
        // A page read ahead that does not match (damaged) is read again where this
        // version keeps it, which names the damage if there is one.
        if let Some((page, sum)) = self.ahead.take(&hash)
            && self.stored_ok(pgno, &hash, sum.as_ref(), &page)
        {
            buf.extend_from_slice(&page);
            return Ok(());
        }
        let loc = self.locate(pgno, &hash)?;
        let window = self.ahead.next_window();
        let following = self.following(&loc, window)?;
        let end = following
            .last()
            .map_or(loc.offset + u64::from(loc.len), |(_, o, l, _)| {
                o + u64::from(*l)
            });
        let bytes = self.store.get_range(pack_key(&loc.pack), loc.offset..end)?;
        let page = &bytes[..loc.len as usize];
        if !self.stored_ok(pgno, &hash, loc.sum.as_ref(), page) {
            return Err(self.damaged(pgno, &loc.pack));
        }
        buf.extend_from_slice(page);
        for (h, offset, len, sum) in following {
            let at = (offset - loc.offset) as usize;
            self.ahead.keep(h, &bytes[at..at + len as usize], sum);
        }
        Ok(())
    }

    /// A stored version offers no chunk hashes (as the directory store's): a pull
    /// compares and sends by page.
    fn chunk_hashes(&mut self) -> Result<Option<Vec<Option<Hash>>>> {
        Ok(None)
    }

    fn scan_chunk(&mut self, idx: u32, _f: &mut ScanFn<'_>) -> Result<Hash> {
        Err(Error::Bug(format!(
            "chunk {idx} asked of a stored version, which knows no chunks"
        )))
    }

    fn chunks_done(&mut self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_ahead_keeps_at_most_its_bytes_and_follows_what_is_used() {
        let mut ahead = ReadAhead::new();
        let page = vec![7u8; 4096];
        let hash = |i: u32| {
            let mut h = [0u8; 32];
            h[..4].copy_from_slice(&i.to_be_bytes());
            h
        };
        // More than it may keep: the oldest go first, the bytes stay bounded.
        for i in 0..300 {
            ahead.keep(hash(i), &page, None);
            assert!(ahead.bytes <= READ_AHEAD_BYTES);
        }
        assert_eq!(ahead.bytes, READ_AHEAD_BYTES);
        assert_eq!(ahead.take(&hash(0)), None, "dropped first");
        assert_eq!(ahead.take(&hash(299)), Some((page.clone(), None)));
        assert_eq!(ahead.bytes, READ_AHEAD_BYTES - 4096);

        // All used: the window doubles up to its most; none used: it halves to one,
        // judged over eight pages at least (a small window takes several fetches).
        let mut ahead = ReadAhead::new();
        let mut next = 0;
        let mut round = |ahead: &mut ReadAhead, use_them: bool| {
            let n = ahead.next_window();
            for _ in 0..n {
                ahead.keep(hash(next), &page[..16], None);
                if use_them {
                    ahead.take(&hash(next)).unwrap();
                }
                next += 1;
            }
            n
        };
        let grown: Vec<u32> = (0..6).map(|_| round(&mut ahead, true)).collect();
        assert_eq!(grown, [16, 32, 64, 128, 256, 256]);
        let shrunk: Vec<u32> = (0..14).map(|_| round(&mut ahead, false)).collect();
        assert_eq!(shrunk, [256, 128, 64, 32, 16, 8, 4, 4, 2, 2, 2, 2, 1, 1]);
    }

    #[test]
    fn an_index_parses_only_when_whole_and_sorted() {
        let mut bytes = IDX_MAGIC.to_vec();
        bytes.extend_from_slice(&2u32.to_be_bytes());
        for (h, off) in [([1u8; 32], 0u64), ([2u8; 32], 4096)] {
            bytes.extend_from_slice(&h);
            bytes.extend_from_slice(&off.to_be_bytes());
            bytes.extend_from_slice(&4096u32.to_be_bytes());
        }
        let entries = parse_idx(&bytes).expect("a whole index");
        assert_eq!(
            entries,
            vec![([1u8; 32], 0, 4096, None), ([2u8; 32], 4096, 4096, None)]
        );
        assert!(parse_idx(&bytes[..bytes.len() - 1]).is_err(), "cut short");
        let mut unsorted = bytes.clone();
        unsorted[IDX_MAGIC.len() + 4] = 3; // the first hash now sorts after the second
        assert!(parse_idx(&unsorted).unwrap_err().contains("sorted"));
        assert!(parse_idx(b"not an index").is_err());

        // A sealed pack's index: the same entries, each with its sum.
        let mut sealed = IDX_SEALED_MAGIC.to_vec();
        sealed.extend_from_slice(&1u32.to_be_bytes());
        sealed.extend_from_slice(&[1u8; 32]);
        sealed.extend_from_slice(&0u64.to_be_bytes());
        sealed.extend_from_slice(&4124u32.to_be_bytes());
        sealed.extend_from_slice(&[9u8; 32]);
        let entries = parse_idx(&sealed).expect("a whole sealed index");
        assert_eq!(entries, vec![([1u8; 32], 0, 4124, Some([9u8; 32]))]);
        assert!(parse_idx(&sealed[..sealed.len() - 1]).is_err(), "cut short");
    }
}
