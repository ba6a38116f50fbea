//! Replicas and their immutable, numbered versions, with pages stored once by SHA-256
//! for the whole store.
//!
//! A store is a directory:
//! - `pages/`: the page bytes of every replica, each page once, in append-only pack
//!   files with an index from hash to place (see `pack`);
//! - `replicas/<namespace>/<name>.sqlferry`: one SQLite file per replica (see
//!   [`ReplicaPath`]) holding:
//!   - `chunks`: runs of up to [`CHUNK_PAGES`] page hashes, keyed by their own SHA-256,
//!     so versions that share most pages share most of their manifest too;
//!   - `manifest`: for each version, its chunks in order;
//!   - `versions`: number, page size, page count, digest, message, time, client and key,
//!     base, and for a merge's candidate the version that merged it (`merged_into`,
//!     added to older files by the first merge that stores a candidate); for a version
//!     of an encrypted replica its encryption key id and its seal (`encryption_key_id`,
//!     `seal`, added to older files by the first sealed push: an encrypted version's
//!     manifest, chunks and digests are over page identities, and its pages are stored
//!     sealed, see `pack` and `docs/security.md`);
//!   - `bad_pages`: pages found damaged, to be resent by the next push;
//!   - `places`: for each chunk, where its pages' bytes lie in the packs, written by the
//!     push that commits a version using it, so a full pull reads the pack runs with
//!     no lookup in the page index a page (see `place`; a hint is checked like every
//!     read, and one that fails falls back to the index).
//!
//! Invariants:
//! - A version is visible only once complete and verified: a push appends its new pages
//!   to a pack as they come, and only after the engine has checked the origin's digest
//!   fsyncs the pack, commits the index rows naming them, then commits its manifest and
//!   version row in one SQLite transaction. A crash or a dropped connection at any byte
//!   before that leaves no version and no index row (the pack's uncommitted tail is cut
//!   off). When the push's base is stale, it still syncs against the latest version,
//!   stores nothing from the first page that differs from it and is refused
//!   (VERSION_CONFLICT) at COMMIT; equal content makes no version and reports the
//!   latest one. A merge stores its candidate and the merge in one replica transaction
//!   (`VersionWriter::stage_candidate`): the candidate's pages are indexed first, so a
//!   crash before the COMMIT leaves index rows no version uses (freed by the next
//!   collection, as a removed version's are) but neither version.
//! - Versions are immutable: nothing updates or deletes a version row or what it
//!   references, except that a page found damaged (its bytes no longer match its hash)
//!   has its index row pointed at good bytes when a push brings them.
//! - Nothing damaged is delivered: every page read is checked against its hash; a bad
//!   one is an error and is recorded (`bad_pages`) so that the next push resends it. A
//!   page read where a place hint said and found wrong is read again through the index
//!   first: only the index's bytes decide that a page is damaged.
//! - Nothing unused is kept: pages a push appended that its version does not use are
//!   cut out of the pack before its COMMIT; files a crashed push left are removed, and
//!   pack tails it left truncated, the next time the replica is pushed (never those of
//!   a live push, which holds a lock).
//! - Memory is flat: manifests are read and written one chunk at a time; pages stream.
//! - One push at a time per replica: the push holds the replica's write lock from its
//!   start; a second push waits, then finds the replica moved and gets VERSION_CONFLICT
//!   unless it holds the same content. Pushes into different replicas run at once, each
//!   appending to a pack of its own.
//! - A replica file of the previous layout (its own `pages` table) has its pages moved
//!   into the packs the first time it is opened.
//!
//! Beside the directory store: the S3 store (`s3`, on the object layer `object`), and
//! [`AnyStore`], the one interface a server holds over either (`serve --store`).

mod any;
mod list;
pub mod object;
mod pack;
mod place;
mod replica;
mod retention;
mod runs;
pub mod s3;
mod scrub;

pub use any::{AnyReader, AnyStore, AnyWriter, not_with_s3};
pub use list::Latest;
/// A directory store's page index seen from outside: for tests that look at where
/// pages are stored, or damage the store.
#[doc(hidden)]
pub use pack::{IndexEntry, forget_entry, index_entries};
pub use replica::{VersionReader, VersionWriter, number_ranges};
pub use retention::{Collected, GcShared, keep, parse_policy, parse_span};
pub use scrub::{BadPage, BadVersion, ReplicaScrub, ScrubProgress, ScrubReport};

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Page hashes per manifest chunk (32 KiB of hashes).
pub const CHUNK_PAGES: usize = crate::digest::CHUNK_PAGES as usize;

/// The longest replica path accepted, in bytes.
const MAX_PATH_BYTES: usize = 255;

/// The longest segment accepted, in bytes. The last segment becomes a file name with
/// `.sqlferry` after it, and while a replica is created a private file
/// `.<name>.sqlferry.XXXXXX.new` with its `-wal`: 25 bytes more, which must stay within
/// the 255 bytes a file name may have. Longer segments would be refused by the file
/// system half-way through a push instead of here.
const MAX_SEGMENT_BYTES: usize = 200;

/// A validated replica path: `namespace/name`, nested segments allowed.
///
/// Rules: at least two segments separated by `/`; each segment is non-empty, made of
/// ASCII letters, digits, `.`, `_` and `-`, and is neither `.` nor `..`; at most 200
/// bytes a segment and 255 in all. Anything else is refused with a message saying which rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReplicaPath(String);

impl ReplicaPath {
    /// Checks `s` against the rules above.
    pub fn parse(s: &str) -> Result<ReplicaPath> {
        let bad = |why: &str| Err(Error::Usage(format!("invalid replica path '{s}': {why}")));
        if s.len() > MAX_PATH_BYTES {
            return bad("longer than 255 bytes");
        }
        if s.starts_with('/') {
            return bad("it must be relative, like namespace/name");
        }
        let segments: Vec<&str> = s.split('/').collect();
        if segments.len() < 2 {
            return bad("it needs a namespace and a name, like acme/app.db");
        }
        for seg in &segments {
            if seg.is_empty() {
                return bad("empty segment");
            }
            if *seg == "." || *seg == ".." {
                return bad("'.' and '..' are not allowed");
            }
            if seg.len() > MAX_SEGMENT_BYTES {
                return bad(&format!(
                    "a segment of {} bytes; at most {MAX_SEGMENT_BYTES} are allowed",
                    seg.len()
                ));
            }
            if let Some(c) = seg
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
            {
                return bad(&format!(
                    "character {c:?} is not allowed (letters, digits, '.', '_', '-')"
                ));
            }
        }
        Ok(ReplicaPath(s.to_owned()))
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last segment: the default local file name of a pull.
    pub fn name(&self) -> &str {
        self.0
            .rsplit('/')
            .next()
            .expect("a replica path has segments")
    }
}

impl std::fmt::Display for ReplicaPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which version of a replica: `@N`, `@latest`, `@latest-N` or `@TIME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selector {
    /// The newest version.
    Latest,
    /// The version `N` before the newest (`@latest-1` is the one before the newest).
    LatestMinus(u64),
    /// Version number `N`.
    Number(u64),
    /// The version that was the latest at this time (Unix seconds): the newest one
    /// created at or before it (`@2026-12-01T10:00:00Z`).
    At(i64),
}

impl Selector {
    /// Splits `acme/app.db@latest-2` into the path and the selector (default latest).
    pub fn split(spec: &str) -> Result<(ReplicaPath, Selector)> {
        let (path, sel) = match spec.rsplit_once('@') {
            Some((p, s)) => (p, Some(s)),
            None => (spec, None),
        };
        let sel = match sel {
            None | Some("latest") => Selector::Latest,
            Some(s) => {
                let parse = |n: &str| {
                    n.parse::<u64>().map_err(|_| {
                        Error::Usage(format!(
                            "invalid version '@{s}': use @N, @latest, @latest-N or @TIME \
                             (2026-12-01T10:00:00Z)"
                        ))
                    })
                };
                if s.contains(':') || s.matches('-').count() >= 2 {
                    return Ok((ReplicaPath::parse(path)?, Selector::At(parse_time(s)?)));
                }
                match s.strip_prefix("latest-") {
                    Some(n) => Selector::LatestMinus(parse(n)?),
                    None => match parse(s)? {
                        0 => return Err(Error::Usage("versions are numbered from 1".into())),
                        n => Selector::Number(n),
                    },
                }
            }
        };
        Ok((ReplicaPath::parse(path)?, sel))
    }
}

impl Selector {
    /// The number `@latest-n` names when the newest version of `replica` is `latest`;
    /// refused by name when it would fall before version 1. Both stores resolve
    /// `@latest-N` through this, so they agree on its meaning and its error.
    pub fn latest_minus(replica: &ReplicaPath, latest: u64, n: u64) -> Result<u64> {
        latest.checked_sub(n).filter(|&v| v >= 1).ok_or_else(|| {
            Error::NotFound(format!(
                "{replica}@latest-{n} does not exist: the latest version is {latest}"
            ))
        })
    }

    /// The version number this selector names among `versions` (oldest first), whose
    /// newest is the latest; `None` when it names none.
    pub fn pick(self, versions: &[VersionInfo]) -> Option<u64> {
        let latest = versions.last()?.number;
        let number = match self {
            Selector::Latest => latest,
            Selector::Number(n) => n,
            Selector::LatestMinus(n) => latest.checked_sub(n)?,
            Selector::At(t) => versions.iter().rev().find(|v| v.created_at <= t)?.number,
        };
        versions
            .iter()
            .any(|v| v.number == number)
            .then_some(number)
    }
}

/// `2026-12-01T10:00:00Z` (or with a space, or without the `Z`: UTC either way) as
/// Unix seconds.
fn parse_time(s: &str) -> Result<i64> {
    let t = humantime::parse_rfc3339_weak(s).map_err(|e| {
        Error::Usage(format!(
            "invalid time '@{s}' ({e}): use a UTC time such as @2026-12-01T10:00:00Z"
        ))
    })?;
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| Error::Usage(format!("invalid time '@{s}': before 1970")))?;
    Ok(secs.as_secs() as i64)
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Latest => f.write_str("latest"),
            Selector::LatestMinus(n) => write!(f, "latest-{n}"),
            Selector::Number(n) => write!(f, "{n}"),
            Selector::At(t) => f.write_str(&crate::epoch::rfc3339(*t)),
        }
    }
}

/// What is known about one version: the same type the CONFIG frame carries for
/// `versions`, defined with the protocol (the lower layer) so that the store hands its
/// rows to a session without conversion.
pub use crate::protocol::control::VersionInfo;

/// A retention policy, what `retention` shows and what `prune` did: plain data the
/// protocol carries, defined with it (like [`VersionInfo`]).
pub use crate::protocol::control::{PruneReport, Retention, RetentionPolicy};

/// How long a prune waits for running pushes and pulls to let it collect pages.
pub const PRUNE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a collection after an automatic removal (a push whose new version made
/// the policy drop old ones) waits for running pushes and pulls; past it the pages
/// stay until the next collection.
pub const AUTO_COLLECT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// How a push into the store behaves.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// The version the pushing client's copy came from; `None` if it has none.
    pub base: Option<u64>,
    /// Push even if the replica moved past `base`.
    pub force: bool,
    /// The commit message.
    pub message: String,
    /// Who is pushing.
    pub client_id: String,
    /// With which key.
    pub key_id: String,
    /// For a sealed push (end-to-end encryption, `docs/security.md`): the id of the
    /// encryption key it was sealed with (16 hex digits), recorded with the version;
    /// `None` for a plaintext push. A replica is encrypted or not from its first version
    /// on, under one key id: a push that does not match its latest version is refused.
    pub encryption: Option<String>,
    /// For a rekey (`sqlferry rekey`, docs/security.md): the key id of the replica's
    /// latest version, which this sealed push replaces with `encryption`. Only such a
    /// push may change a replica's key id, and only from its latest version's; `None`
    /// for every other push.
    pub rekey_from: Option<String>,
    /// For a sealed push whose key was stretched from a passphrase: its salt and cost.
    /// The replica records them with its first such version (in the version's
    /// transaction) and refuses a push naming others; `None` for a key file's key
    /// (the record, if any, stays: older versions may need it).
    pub passphrase: Option<crate::crypt::PassphraseSalt>,
}

/// Stored bytes already computed, by replica path: (latest version, version count,
/// bytes).
type StoredCache =
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, (u64, u64, u64)>>>;

/// A store: a directory of replica files.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// The default retention policy set by `serve --retention`, over the store's file.
    default_retention: Option<RetentionPolicy>,
    /// [`Store::stored_bytes`] already computed, by replica: (latest version, version
    /// count, bytes). Versions are immutable, so the figure holds until a version is
    /// added or removed, which changes the key. Shared by the clones of this store (a
    /// server's API and metrics ask often).
    stored_cache: StoredCache,
    /// Versions handed out carry digest 1 even when they recorded only their chunked
    /// digest (made from the manifest, then recorded): a server's, whose older peers
    /// compare digest 1 ([`Store::filling_digest1`]).
    fills_digest1: bool,
}

/// Whether this process runs one sync at a time ([`one_sync_at_a_time`]).
static ONE_SYNC_AT_A_TIME: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Says this process runs one sync at a time and nothing else against a store meanwhile
/// (a one-shot `sqlferry push`): [`Store::latest_sound`] may then read the replica file
/// through SQLite's `readonly_shm`, writing nothing (docs/engine.md, "What it writes").
/// Not for a process that may open a replica file for writing while such a look is
/// under way (a daemon's units, a library's concurrent syncs): SQLite shares one handle
/// on a file's `-shm` between all the connections of a process, so a writer opened
/// then would find it read-only and fail.
pub fn one_sync_at_a_time() {
    ONE_SYNC_AT_A_TIME.store(true, std::sync::atomic::Ordering::Relaxed);
}

impl Store {
    /// A store rooted at `root` (created on first push).
    pub fn new(root: impl Into<PathBuf>) -> Store {
        Store {
            root: root.into(),
            default_retention: None,
            stored_cache: Default::default(),
            fills_digest1: false,
        }
    }

    /// This store, handing out every version with its digest 1, made where a version
    /// recorded only its chunked digest (a push by chunks into the embedded store, in
    /// this directory): what a server does, so that a peer that knows only digest 1
    /// sees it exactly as before the chunked form.
    pub fn filling_digest1(mut self) -> Store {
        self.fills_digest1 = true;
        self
    }

    /// This store, with `policy` as its default retention policy while it is open
    /// (`serve --retention`), whatever its `retention.json` says.
    pub fn with_default_retention(mut self, policy: RetentionPolicy) -> Store {
        self.default_retention = Some(policy);
        self
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file that holds `replica`.
    pub fn replica_file(&self, replica: &ReplicaPath) -> PathBuf {
        let mut p = self.root.join("replicas");
        for seg in replica.as_str().split('/') {
            p.push(seg);
        }
        p.set_extension(match p.extension() {
            Some(ext) => format!("{}.sqlferry", ext.to_string_lossy()),
            None => "sqlferry".into(),
        });
        p
    }

    /// The directory of the page packs and their index, shared by every replica.
    pub fn pages_dir(&self) -> PathBuf {
        pack::dir_of(&self.root)
    }

    /// Every version of `replica`, oldest first.
    pub fn versions(&self, replica: &ReplicaPath) -> Result<Vec<VersionInfo>> {
        let file = self.replica_file(replica);
        self.remove_leftovers(&file);
        let mut versions = replica::versions(&file, replica)?;
        if self.fills_digest1 {
            replica::fill_digest1(&file, &mut versions)?;
        }
        Ok(versions)
    }

    /// The passphrase salt and cost `replica` keeps (docs/security.md, "Keys"): `None`
    /// for a replica that has none (no version sealed with a passphrase's key yet) or
    /// that does not exist.
    pub fn passphrase(
        &self,
        replica: &ReplicaPath,
    ) -> Result<Option<crate::crypt::PassphraseSalt>> {
        replica::passphrase(&self.replica_file(replica), replica)
    }

    /// Gives `version` (of `replica`) its digest 1 when it recorded only its chunked
    /// digest: made from its manifest (every chunk of page hashes read and checked), and
    /// recorded, best effort. Left empty when the manifest does not make one.
    pub fn fill_digest1(&self, replica: &ReplicaPath, version: &mut VersionInfo) -> Result<()> {
        replica::fill_digest1(&self.replica_file(replica), std::slice::from_mut(version))
    }

    /// Every replica of the store, in path order: one directory listing per namespace,
    /// no replica file opened. A store with nothing pushed yet has none.
    pub fn replicas(&self) -> Result<Vec<ReplicaPath>> {
        list::replicas(&self.root)
    }

    /// `replica`'s latest version number (0 when it has none), from that one row as
    /// recorded: never made into digest 1 (a server's push asks this at every start,
    /// and filling digest 1 would read the chunks of a version made by chunks).
    pub fn latest_number(&self, replica: &ReplicaPath) -> Result<u64> {
        let latest = list::latest(&self.replica_file(replica), replica)?;
        Ok(latest.map_or(0, |l| l.version.number))
    }

    /// `replica`'s latest version and its version count, reading that one row (no
    /// manifest, no page); `None` when it has no version.
    pub fn latest(&self, replica: &ReplicaPath) -> Result<Option<Latest>> {
        let file = self.replica_file(replica);
        let mut latest = list::latest(&file, replica)?;
        if let (true, Some(l)) = (self.fills_digest1, &mut latest) {
            replica::fill_digest1(&file, std::slice::from_mut(&mut l.version))?;
        }
        Ok(latest)
    }

    /// The encryption key id of `replica`'s latest version (16 hex digits), `None` for a
    /// plaintext replica or one with no version: what a server's CONFIG answers as the
    /// replica's `encryption` (`docs/security.md`). Reads that one row.
    pub fn encryption(&self, replica: &ReplicaPath) -> Result<Option<String>> {
        let latest = list::latest(&self.replica_file(replica), replica)?;
        Ok(latest.and_then(|l| l.version.encryption))
    }

    /// `replica`'s latest version, when the replica records no damaged stored page
    /// (which a push would resend); `None` otherwise or when it has no version. A
    /// no-change push that reads nothing relies on it (docs/engine.md). In a process
    /// that said it syncs one replica at a time ([`one_sync_at_a_time`]), read without
    /// writing a byte.
    pub fn latest_sound(&self, replica: &ReplicaPath) -> Result<Option<VersionInfo>> {
        let peek = ONE_SYNC_AT_A_TIME.load(std::sync::atomic::Ordering::Relaxed);
        list::latest_sound(&self.replica_file(replica), replica, peek)
    }

    /// Every version of `replica`, oldest first, each with its `stored_bytes` (the
    /// bytes of the pages it brought into the replica; their sum is
    /// [`Store::stored_bytes`]). Reads each distinct manifest chunk once.
    pub fn versions_with_stored_bytes(&self, replica: &ReplicaPath) -> Result<Vec<VersionInfo>> {
        let mut versions = self.versions(replica)?;
        let (bytes, _) = retention::stored_bytes(&self.replica_file(replica), &self.pages_dir())?;
        let mut bytes = bytes.into_iter().peekable();
        for v in &mut versions {
            while bytes.next_if(|(n, _)| *n < v.number).is_some() {}
            v.stored_bytes = Some(bytes.next_if(|(n, _)| *n == v.number).map_or(0, |(_, b)| b));
        }
        Ok(versions)
    }

    /// The unique page bytes `replica`'s versions use, as stored (compressed size where
    /// a page is kept compressed): what its versions would free if no other replica
    /// shared their pages. Streams its manifests; memory stays flat.
    ///
    /// Kept in memory once computed, until the replica gains or loses a version (one
    /// query of its latest version row and count then tells whether the figure still
    /// holds).
    pub fn stored_bytes(&self, replica: &ReplicaPath) -> Result<u64> {
        let file = self.replica_file(replica);
        // The cache's key from one row (the latest version and the count), not every
        // version row: the API and the metrics ask for every replica, often.
        let latest = list::latest(&file, replica)?
            .ok_or_else(|| Error::NotFound(format!("replica {replica} does not exist")))?;
        let key = (latest.version.number, latest.count);
        let cached = self
            .stored_cache
            .lock()
            .expect("the stored-bytes cache is never poisoned: nothing panics holding it")
            .get(replica.as_str())
            .copied();
        if let Some((latest, count, bytes)) = cached
            && (latest, count) == key
        {
            return Ok(bytes);
        }
        let bytes = retention::stored_bytes(&file, &self.pages_dir())?.1;
        self.stored_cache
            .lock()
            .expect("the stored-bytes cache is never poisoned: nothing panics holding it")
            .insert(replica.to_string(), (key.0, key.1, bytes));
        Ok(bytes)
    }

    /// Starts a push into `replica`; the replica is created if it does not exist. The
    /// push holds the store's GC lock shared until it is dropped: no page it dedups
    /// against is freed meanwhile. Once its new version commits, the replica's
    /// retention policy removes the versions it no longer keeps
    /// ([`VersionWriter::removed`]); their pages are freed by [`Store::collect_garbage`].
    pub fn push(&self, replica: &ReplicaPath, options: PushOptions) -> Result<VersionWriter> {
        let file = self.replica_file(replica);
        self.remove_leftovers(&file);
        let gc = GcShared::take(&self.pages_dir(), true)?;
        replica::upgrade(&file, &self.pages_dir(), true)?;
        let default = self.default_retention()?;
        VersionWriter::open(&file, &self.pages_dir(), replica, options, gc, default)
    }

    /// Opens one version of `replica` for reading. The reader holds the store's GC lock
    /// shared until it is dropped: the pages it reads stay, even if its version is
    /// removed meanwhile.
    pub fn read(&self, replica: &ReplicaPath, selector: Selector) -> Result<VersionReader> {
        let file = self.replica_file(replica);
        self.remove_leftovers(&file);
        // Not for a replica that does not exist: a pull from a wrong directory makes
        // nothing there.
        let gc = GcShared::take(&self.pages_dir(), file.exists())?;
        replica::upgrade(&file, &self.pages_dir(), false)?;
        VersionReader::open(&file, &self.pages_dir(), replica, selector, gc)
    }

    /// Which version `selector` names in `replica` (its row, digests and key id),
    /// refused as [`Store::read`] refuses, without opening the store's pages: a look-up
    /// for a server that must know the number before it reads.
    pub fn resolve(&self, replica: &ReplicaPath, selector: Selector) -> Result<VersionInfo> {
        let file = self.replica_file(replica);
        self.remove_leftovers(&file);
        replica::upgrade(&file, &self.pages_dir(), false)?;
        replica::resolve(&file, replica, selector)
    }

    /// The store's default retention policy: `serve --retention`'s, else the one
    /// `sqlferry retention --default` wrote; `None` when there is none.
    pub fn default_retention(&self) -> Result<Option<RetentionPolicy>> {
        match &self.default_retention {
            Some(p) => Ok(Some(p.clone())),
            None => retention::read_default(&self.root),
        }
    }

    /// Sets (or with `None` removes) the default policy kept in the store's directory
    /// (`retention.json`), for every replica without a policy of its own.
    pub fn set_default_retention(&self, policy: Option<&RetentionPolicy>) -> Result<()> {
        retention::write_default(&self.root, policy)
    }

    /// The retention policy that applies to `replica`, and where it comes from.
    pub fn retention(&self, replica: &ReplicaPath) -> Result<Retention> {
        let file = self.replica_file(replica);
        // The replica must exist (a version): the same refusal as `versions`.
        replica::versions(&file, replica)?;
        let own = retention::own_policy(&file)?;
        let default = match own {
            Some(_) => None,
            None => self.default_retention()?,
        };
        Ok(Retention::applying(replica, own, default))
    }

    /// Gives `replica` its own retention policy, or with `None` drops it (the store's
    /// default applies again). Removes nothing by itself: the next new version or
    /// [`Store::prune`] does.
    pub fn set_retention(
        &self,
        replica: &ReplicaPath,
        policy: Option<&RetentionPolicy>,
    ) -> Result<Retention> {
        let file = self.replica_file(replica);
        replica::versions(&file, replica)?;
        retention::set_own_policy(&file, policy)?;
        self.retention(replica)
    }

    /// Removes the versions of `replica` its retention policy does not keep at `now`
    /// (never the latest), then frees the pages no version of any replica uses any
    /// more, waiting up to `wait` for running pushes and pulls to let it. With
    /// `dry_run`, changes nothing and says what it would do.
    pub fn prune(
        &self,
        replica: &ReplicaPath,
        dry_run: bool,
        now: i64,
        wait: std::time::Duration,
    ) -> Result<PruneReport> {
        let file = self.replica_file(replica);
        let policy = self.retention(replica)?.policy;
        let (removed, kept) = retention::remove_versions(&file, &policy, now, dry_run)?;
        let excluded = dry_run.then_some((file.as_path(), removed.as_slice()));
        let collected = retention::collect(&self.root, excluded, dry_run, wait)?;
        if !dry_run && !removed.is_empty() {
            tracing::info!(%replica, removed = removed.len(), kept, "versions removed by retention");
        }
        let mut report = PruneReport {
            replica: replica.to_string(),
            dry_run,
            removed,
            kept,
            ..PruneReport::default()
        };
        match collected {
            Some(c) => {
                report.freed_pages = c.pages;
                report.freed_bytes = c.bytes;
                report.reclaimed_bytes = c.reclaimed;
            }
            None => {
                report.deferred = Some(format!(
                    "pushes or pulls kept the store busy for {} s: the pages of the removed \
                     versions are freed by the next prune",
                    wait.as_secs()
                ));
            }
        }
        Ok(report)
    }

    /// Frees the pages no version of any replica uses (after versions were removed),
    /// waiting up to `wait` for running pushes and pulls; `None` if they kept the store
    /// busy that long. A process must not hold a reader or a writer of this store
    /// while it calls this (it would wait for itself).
    pub fn collect_garbage(&self, wait: std::time::Duration) -> Result<Option<Collected>> {
        let collected = retention::collect(&self.root, None, false, wait)?;
        if let Some(c) = &collected
            && c.pages > 0
        {
            tracing::info!(
                pages = c.pages,
                bytes = c.bytes,
                reclaimed = c.reclaimed,
                "freed pages no version uses"
            );
        }
        Ok(collected)
    }

    /// After a push whose new version made the retention policy remove `removed`
    /// versions: frees their pages if the store is free within [`AUTO_COLLECT_WAIT`],
    /// else leaves them for the next collection. Best effort: a failure is logged, the
    /// push stands.
    pub fn collect_after_removal(&self, replica: &ReplicaPath, removed: &[u64]) {
        if removed.is_empty() {
            return;
        }
        tracing::info!(%replica, versions = ?removed, "versions removed by retention after a new version");
        match self.collect_garbage(AUTO_COLLECT_WAIT) {
            Ok(Some(_)) => {}
            Ok(None) => tracing::info!(
                "the store is busy: the removed versions' pages are freed by the next collection"
            ),
            Err(e) => tracing::warn!(error = %e, "could not free the removed versions' pages"),
        }
    }

    /// Checks every stored page of every replica against its hash, and every version's
    /// manifest and digest; records what is bad for repair by the next push, and removes
    /// the files crashed pushes left. `progress` is called as it goes.
    /// It holds the store's GC lock shared: no page is freed while it looks.
    pub fn scrub(&self, progress: &mut dyn FnMut(&ScrubProgress)) -> Result<ScrubReport> {
        let _gc = GcShared::take(&self.pages_dir(), false)?;
        scrub::scrub(&self.root, progress)
    }

    /// Removes what crashed pushes left beside `file` (new replicas' private files that
    /// no live push holds, and their `-wal`/`-shm`). Cheap: one directory listing.
    fn remove_leftovers(&self, file: &Path) {
        if let Some(dir) = file.parent() {
            let freed = replica::remove_leftovers(dir);
            if freed > 0 {
                tracing::info!(dir = %dir.display(), bytes = freed, "removed files crashed pushes left");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(number: u64, created_at: i64) -> VersionInfo {
        VersionInfo {
            page_size: 4096,
            page_count: 1,
            size: 4096,
            ..VersionInfo::bare(number, created_at)
        }
    }

    #[test]
    fn a_time_selects_the_version_that_was_latest_then() {
        let (path, sel) = Selector::split("acme/app.db@2026-12-01T10:00:00Z").unwrap();
        assert_eq!(path.as_str(), "acme/app.db");
        assert_eq!(sel, Selector::At(1_796_119_200));
        assert_eq!(sel.to_string(), "2026-12-01T10:00:00Z");
        for weak in ["2026-12-01 10:00:00", "2026-12-01T10:00:00"] {
            let spec = format!("acme/app.db@{weak}");
            assert_eq!(Selector::split(&spec).unwrap().1, sel, "{weak}");
        }
        let err = Selector::split("acme/app.db@2026-13-01T00:00:00Z").unwrap_err();
        assert!(err.to_string().contains("2026-12-01T10:00:00Z"), "{err}");

        let versions = [
            version(1, 100),
            version(2, 200),
            version(3, 200),
            version(4, 300),
        ];
        assert_eq!(Selector::At(99).pick(&versions), None, "nothing that old");
        assert_eq!(Selector::At(100).pick(&versions), Some(1));
        assert_eq!(Selector::At(250).pick(&versions), Some(3));
        assert_eq!(Selector::At(10_000).pick(&versions), Some(4));
        assert_eq!(Selector::LatestMinus(1).pick(&versions), Some(3));
        assert_eq!(Selector::LatestMinus(4).pick(&versions), None);
        let replica = ReplicaPath::parse("acme/app.db").unwrap();
        assert_eq!(Selector::latest_minus(&replica, 4, 3).unwrap(), 1);
        let err = Selector::latest_minus(&replica, 4, 4)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("acme/app.db@latest-4 does not exist: the latest version is 4"),
            "{err}"
        );
        assert_eq!(Selector::Number(5).pick(&versions), None);
        assert_eq!(Selector::Latest.pick(&[]), None);
    }

    #[test]
    fn replica_paths_follow_the_rules() {
        for ok in ["acme/app.db", "a/b/c", "n-1/x_y.z", "A/B"] {
            assert_eq!(ReplicaPath::parse(ok).expect(ok).as_str(), ok);
        }
        for (bad, why) in [
            ("app.db", "namespace"),
            ("/acme/app.db", "relative"),
            ("acme//app.db", "empty"),
            ("acme/", "empty"),
            ("acme/../etc", "'..'"),
            ("acme/./x", "'.'"),
            ("acme/a b", "' '"),
            ("acme/é", "'é'"),
        ] {
            let err = ReplicaPath::parse(bad).expect_err(bad).to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        assert!(ReplicaPath::parse(&format!("a/{}", "x".repeat(300))).is_err());
        // A name that would not fit in a file name once the store adds its suffixes.
        let long = format!("a/{}", "x".repeat(240));
        let err = ReplicaPath::parse(&long).expect_err("too long").to_string();
        assert!(err.contains("at most 200"), "{err}");
        assert!(ReplicaPath::parse(&format!("a/{}", "x".repeat(200))).is_ok());
    }

    #[test]
    fn selectors_parse() {
        let (p, s) = Selector::split("acme/app.db@latest-2").expect("valid");
        assert_eq!((p.as_str(), s), ("acme/app.db", Selector::LatestMinus(2)));
        assert_eq!(Selector::split("a/b").expect("valid").1, Selector::Latest);
        assert_eq!(
            Selector::split("a/b@latest").expect("valid").1,
            Selector::Latest
        );
        assert_eq!(
            Selector::split("a/b@7").expect("valid").1,
            Selector::Number(7)
        );
        for bad in ["a/b@0", "a/b@x", "a/b@latest-", "a/b@-1", "a/b@latest-x"] {
            assert!(Selector::split(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn replica_files_nest_under_the_root() {
        let store = Store::new("/s");
        let f = store.replica_file(&ReplicaPath::parse("acme/team/app.db").expect("valid"));
        assert_eq!(f, PathBuf::from("/s/replicas/acme/team/app.db.sqlferry"));
        let g = store.replica_file(&ReplicaPath::parse("acme/app").expect("valid"));
        assert_eq!(g, PathBuf::from("/s/replicas/acme/app.sqlferry"));
    }
}
