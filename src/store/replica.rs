//! One replica's SQLite file: pushing a new version into it ([`VersionWriter`], the
//! engine's page target) and reading a version out of it ([`VersionReader`], the
//! engine's page source); its page bytes live in the store's packs (`pack`). The module
//! doc of `store` states the invariants.
//!
//! Trust, as this file keeps it: every page read from a pack is hashed again and a
//! mismatch is an error, never data; a page found damaged is recorded in `bad_pages`,
//! which makes the next push resend it (its hash is reported as not held) and point its
//! index row at the new bytes. A page that arrived compressed is kept compressed (its
//! bytes handed over by the transport, [`VersionWriter::keep_packed`]); every read
//! expands it before the hash check, and a reader may hand the stored compressed bytes
//! on to a peer that takes them ([`VersionReader::hand_packed`]). A version of an
//! encrypted replica (a sealed push, `docs/security.md`) is kept as it came: its
//! manifest and digests are over page identities, its pages are stored sealed (codec 2,
//! each checked against the SHA-256 of its sealed bytes on every read, since the store
//! cannot open them), and its seal and key id are kept with its row; its reader relays
//! them as they are ([`VersionReader::relay`]). Pages a push appends
//! but its committed version does not use are cut out of the pack before COMMIT. A new
//! replica's private file is `flock`ed by its creator for its whole life, so a cleaner
//! removes only what a dead process left.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::pack::{self, Appender, Check, Loc, Pages};
use super::place;
use super::retention::{self, GcShared};
use super::{CHUNK_PAGES, PushOptions, ReplicaPath, RetentionPolicy, Selector, VersionInfo};
use crate::digest::{
    ChunkedDigest, Digest, DigestForm, HASH_BYTES, Hash, chunk_count, chunk_pages, digest_text,
    hex, lock_byte_page, page_hash, sha256,
};
use crate::engine::{BeginInfo, Chunk, PageSource, PageTarget, ScanFn, Sealing};
use crate::page::Header;
use crate::protocol::compress::{PackedPage, PackedPages, fingerprint};
use crate::{Error, Result};

/// How long a second pusher waits for the first to finish before it is told the
/// replica moved (it then gets VERSION_CONFLICT, not "busy").
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long recording a damaged page waits for a push holding the replica's write lock;
/// the recording is best effort (scrub finds the page again).
const RECORD_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The replica file's schema, created on first push (`bad_pages` also by the first push
/// or scrub that opens a file made before it existed; `versions.digest2`, the chunked
/// digest, by [`upgrade`] in a file made before it existed).
const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS chunks(
        hash BLOB PRIMARY KEY,
        hashes BLOB NOT NULL
    );
    CREATE TABLE IF NOT EXISTS versions(
        number INTEGER PRIMARY KEY,
        page_size INTEGER NOT NULL,
        page_count INTEGER NOT NULL,
        digest BLOB NOT NULL,
        message TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        client_id TEXT NOT NULL,
        key_id TEXT NOT NULL,
        base INTEGER NOT NULL,
        digest2 BLOB,
        merged_into INTEGER,
        encryption_key_id TEXT,
        seal BLOB
    );
    CREATE TABLE IF NOT EXISTS manifest(
        version INTEGER NOT NULL REFERENCES versions(number),
        idx INTEGER NOT NULL,
        chunk BLOB NOT NULL REFERENCES chunks(hash),
        PRIMARY KEY(version, idx)
    ) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS bad_pages(
        hash BLOB PRIMARY KEY,
        found_at INTEGER NOT NULL
    );
";

/// The pages the push in progress appended to its pack, and where: those the
/// committed manifest uses are indexed at COMMIT, the others never are (and `repair`
/// rows, new bytes for a damaged page, always are).
const FRESH_SCHEMA: &str = "
    CREATE TEMP TABLE IF NOT EXISTS fresh(
        hash BLOB PRIMARY KEY,
        offset INTEGER NOT NULL,
        len INTEGER NOT NULL,
        repair INTEGER NOT NULL,
        codec INTEGER NOT NULL,
        checksum BLOB
    ) WITHOUT ROWID;
    DELETE FROM temp.fresh;
";

/// The page cache of `temp.fresh` (a negative `cache_size` is KiB): 8 MiB, one per
/// push. Its rows are keyed by page hash, so every new page lands on a random leaf;
/// with SQLite's default 2 MiB a full push of 216 MB spilled them to a temporary file
/// and read a leaf back for nearly every page (19,736 reads of 4 KiB). 8 MiB holds the
/// rows of about 100,000 new pages (400 MB of 4 KiB pages) before it spills.
const FRESH_CACHE_KIB: i64 = -8192;

pub(super) fn sql(path: &Path) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |e| Error::sqlite(path, e)
}

fn not_found(replica: &ReplicaPath) -> Error {
    Error::NotFound(format!("replica {replica} does not exist"))
}

/// Opens a replica file that must exist, read-only.
pub(super) fn open_existing(file: &Path, replica: &ReplicaPath) -> Result<Connection> {
    open_reader(file, replica, file, OpenFlags::empty())
}

/// Opens `name` (`file`, or a URI naming it: `extra` holds `SQLITE_OPEN_URI` then),
/// read-only, as a reader of replica files is set up; `file` must exist.
fn open_reader(
    file: &Path,
    replica: &ReplicaPath,
    name: impl AsRef<Path>,
    extra: OpenFlags,
) -> Result<Connection> {
    if !file.exists() {
        return Err(not_found(replica));
    }
    let conn = Connection::open_with_flags(
        name,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX | extra,
    )
    .map_err(sql(file))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sql(file))?;
    // A reader looks each page up once by hash: a large page cache would buy nothing
    // and cost every concurrent pull on a server up to 2 MiB (SQLite's default).
    conn.pragma_update(None, "cache_size", READER_CACHE_KIB)
        .map_err(sql(file))?;
    Ok(conn)
}

/// Opens a replica file that must exist, read-only, for a quick look that writes
/// nothing at all (the proof that a push would change nothing,
/// [`super::list::latest_sound`]). SQLite's first connection to a WAL file truncates its
/// `-shm` and writes it again (eight pages of 4 KiB), and a one-shot push is often the
/// only process with the replica open; with `readonly_shm` it opens the `-shm`
/// read-only instead: with a writer at work it reads through the writer's index as any
/// reader, and with none it reads the WAL (kept small: `kept_wal`) into its own memory
/// for each transaction, holding the read lock that keeps any checkpoint from
/// overwriting what it reads. A WAL without its `-shm` cannot be read this way: the
/// caller falls back to [`open_existing`] on any error. Only in a process that opens
/// no writer of the file meanwhile (`store::one_sync_at_a_time`): SQLite shares one
/// `-shm` handle between a process's connections to a file, and this one's is
/// read-only.
pub(super) fn open_peek(file: &Path, replica: &ReplicaPath) -> Result<Connection> {
    let abs = std::path::absolute(file).map_err(|e| Error::io(file, e))?;
    let mut uri = String::from("file://");
    for &b in abs.as_os_str().as_encoded_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'.' | b'_' | b'-' | b'~' => {
                uri.push(char::from(b))
            }
            _ => uri.push_str(&format!("%{b:02X}")),
        }
    }
    uri.push_str("?mode=ro&readonly_shm=1");
    open_reader(file, replica, uri, OpenFlags::SQLITE_OPEN_URI)
}

/// The page cache of a connection that reads versions: 256 KiB (a negative
/// `cache_size` is KiB).
const READER_CACHE_KIB: i64 = -256;

pub(super) const VERSION_COLUMNS: &str =
    "number, page_size, page_count, digest, message, created_at, client_id, key_id, base";

pub(super) fn version_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VersionInfo> {
    let page_size: u32 = r.get(1)?;
    let page_count: u32 = r.get(2)?;
    let digest: Vec<u8> = r.get(3)?;
    Ok(VersionInfo {
        number: r.get::<_, i64>(0)? as u64,
        page_size,
        page_count,
        size: u64::from(page_size) * u64::from(page_count),
        digest: hex(&digest),
        digest2: None,
        message: r.get(4)?,
        created_at: r.get(5)?,
        client_id: r.get(6)?,
        key_id: r.get(7)?,
        base: r.get::<_, i64>(8)? as u64,
        stored_bytes: None,
        merged_into: None,
        encryption: None,
    })
}

/// Whether the `versions` table on `conn` has the columns of encrypted versions
/// (`encryption_key_id`, `seal`): a file made before encrypted replicas has them only
/// once a sealed push added them, and a plaintext replica never needs them.
pub(super) fn has_sealing(conn: &Connection, file: &Path) -> Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM pragma_table_info('versions') WHERE name = 'seal'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )
    .map_err(sql(file))
}

/// The encryption key id (hex) and seal of `version`: `None` for a plaintext version
/// (or one that does not exist). An encrypted version without its seal is damaged: its
/// seal is `None` then, and reading it is refused.
fn sealing_of(
    conn: &Connection,
    file: &Path,
    version: u64,
) -> Result<Option<(String, Option<Vec<u8>>)>> {
    if !has_sealing(conn, file)? {
        return Ok(None);
    }
    let row: Option<(Option<String>, Option<Vec<u8>>)> = conn
        .prepare_cached("SELECT encryption_key_id, seal FROM versions WHERE number = ?1")
        .and_then(|mut s| {
            s.query_row([version as i64], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(sql(file))?;
    Ok(row.and_then(|(id, seal)| id.map(|id| (id, seal))))
}

/// The table of a replica's passphrase salt and cost (docs/security.md, "Keys"): one
/// row, in clear, made in the transaction of the replica's first version sealed with a
/// key stretched from a passphrase, and never changed after (every passphrase of the
/// replica, before and after a rekey, is stretched with it). A replica without the
/// table has no passphrase salt.
const PASSPHRASE_SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS passphrase(
        id INTEGER PRIMARY KEY CHECK (id = 1),
        salt BLOB NOT NULL,
        memory_kib INTEGER NOT NULL,
        passes INTEGER NOT NULL,
        lanes INTEGER NOT NULL
    );
";

/// The passphrase salt and cost `conn`'s replica keeps, if any.
pub(super) fn passphrase_of(
    conn: &Connection,
    file: &Path,
) -> Result<Option<crate::crypt::PassphraseSalt>> {
    let has: bool = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'passphrase'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )
        .map_err(sql(file))?;
    if !has {
        return Ok(None);
    }
    let row: Option<(Vec<u8>, u32, u32, u32)> = conn
        .query_row(
            "SELECT salt, memory_kib, passes, lanes FROM passphrase WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()
        .map_err(sql(file))?;
    let Some((salt, memory_kib, passes, lanes)) = row else {
        return Ok(None);
    };
    let salt: [u8; crate::crypt::SALT_BYTES] = salt.as_slice().try_into().map_err(|_| {
        Error::Verification(format!(
            "{}: the passphrase salt has {} bytes, not {}",
            file.display(),
            salt.len(),
            crate::crypt::SALT_BYTES
        ))
    })?;
    Ok(Some(crate::crypt::PassphraseSalt {
        salt,
        cost: crate::crypt::PassphraseCost {
            memory_kib,
            passes,
            lanes,
        },
    }))
}

/// The passphrase salt and cost of the replica in `file`: `None` for a replica that
/// has none, or does not exist.
pub(super) fn passphrase(
    file: &Path,
    replica: &ReplicaPath,
) -> Result<Option<crate::crypt::PassphraseSalt>> {
    if !file.exists() {
        return Ok(None);
    }
    passphrase_of(&open_existing(file, replica)?, file)
}

/// Whether the `versions` table on `conn` has the `merged_into` column: files made
/// before merges kept their candidates have it only once a merge added it.
pub(super) fn has_merged_into(conn: &Connection, file: &Path) -> Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM pragma_table_info('versions') WHERE name = 'merged_into'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )
    .map_err(sql(file))
}

/// Every version of the replica in `file`, oldest first, each candidate with the
/// version that merged it (`merged_into`).
pub(super) fn versions(file: &Path, replica: &ReplicaPath) -> Result<Vec<VersionInfo>> {
    let conn = open_existing(file, replica)?;
    let merged_into = if has_merged_into(&conn, file)? {
        "merged_into"
    } else {
        "NULL"
    };
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {VERSION_COLUMNS}, {merged_into} FROM versions ORDER BY number"
        ))
        .map_err(sql(file))?;
    let rows = stmt
        .query_map([], |r| {
            let mut v = version_row(r)?;
            v.merged_into = r.get::<_, Option<i64>>(9)?.map(|n| n as u64);
            Ok(v)
        })
        .map_err(sql(file))?;
    let mut versions: Vec<VersionInfo> =
        rows.collect::<rusqlite::Result<_>>().map_err(sql(file))?;
    drop(stmt);
    for v in &mut versions {
        add_digest2(&conn, file, v)?;
    }
    // A file whose first push never committed holds no version: no replica yet.
    if versions.is_empty() {
        return Err(not_found(replica));
    }
    Ok(versions)
}

fn latest(conn: &Connection, file: &Path) -> Result<Option<VersionInfo>> {
    let mut latest = conn
        .query_row(
            &format!("SELECT {VERSION_COLUMNS} FROM versions ORDER BY number DESC LIMIT 1"),
            [],
            version_row,
        )
        .optional()
        .map_err(sql(file))?;
    if let Some(v) = &mut latest {
        add_digest2(conn, file, v)?;
    }
    Ok(latest)
}

/// The chunked digest of `version`: the one recorded, or else (a row an older sqlferry
/// wrote after this file's upgrade, or a file without the column yet) computed from its
/// manifest's chunk keys, which are the chunk hashes (no page read). `None` when the
/// version does not exist or its manifest is not one key a chunk.
fn digest2_of(conn: &Connection, file: &Path, version: u64) -> Result<Option<Hash>> {
    if has_digest2(conn, file)? {
        let d: Option<Option<Vec<u8>>> = conn
            .query_row(
                "SELECT digest2 FROM versions WHERE number = ?1",
                [version as i64],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql(file))?;
        if let Some(d) = d.flatten().and_then(|d| Hash::try_from(d.as_slice()).ok()) {
            return Ok(Some(d));
        }
    }
    let Some((page_size, page_count)) = version_shape(conn, file, version)? else {
        return Ok(None);
    };
    let keys: Vec<Vec<u8>> = conn
        .prepare_cached("SELECT chunk FROM manifest WHERE version = ?1 ORDER BY idx")
        .and_then(|mut s| {
            s.query_map([version as i64], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()
        })
        .map_err(sql(file))?;
    let mut d = ChunkedDigest::new(page_size, page_count);
    for key in &keys {
        match Hash::try_from(key.as_slice()) {
            Ok(k) => d.push_chunk(&k),
            Err(_) => return Ok(None),
        }
    }
    Ok(d.finish())
}

/// Page size and page count of `version`; `None` when it does not exist.
fn version_shape(conn: &Connection, file: &Path, version: u64) -> Result<Option<(u32, u32)>> {
    conn.query_row(
        "SELECT page_size, page_count FROM versions WHERE number = ?1",
        [version as i64],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .optional()
    .map_err(sql(file))
}

/// Sets `v.digest2` to the version's chunked digest, in text ([`digest2_of`]: the one
/// recorded, else made from its manifest's chunk keys; left `None` where neither is
/// there), and `v.encryption` to the key id of an encrypted version: what every
/// reader of a version row adds to it.
pub(super) fn add_digest2(conn: &Connection, file: &Path, v: &mut VersionInfo) -> Result<()> {
    v.digest2 = digest2_of(conn, file, v.number)?.map(|d| digest_text(DigestForm::Chunked, &d));
    v.encryption = sealing_of(conn, file, v.number)?.map(|(id, _)| id);
    Ok(())
}

/// Digest 1 of `version`, made from its manifest: every chunk of page hashes read and
/// checked against its key (32 bytes a page). `None` when the version does not exist,
/// or a chunk is missing or does not match its key (`scrub` names such a chunk).
pub(super) fn digest1_of(conn: &Connection, file: &Path, version: u64) -> Result<Option<Hash>> {
    let Some((page_size, page_count)) = version_shape(conn, file, version)? else {
        return Ok(None);
    };
    let mut stmt = conn
        .prepare_cached(
            "SELECT m.chunk, c.hashes FROM manifest m LEFT JOIN chunks c ON c.hash = m.chunk
             WHERE m.version = ?1 ORDER BY m.idx",
        )
        .map_err(sql(file))?;
    let mut rows = stmt.query([version as i64]).map_err(sql(file))?;
    let mut d = Digest::new(page_size, page_count);
    while let Some(row) = rows.next().map_err(sql(file))? {
        let key: Vec<u8> = row.get(0).map_err(sql(file))?;
        let Some(blob) = row.get::<_, Option<Vec<u8>>>(1).map_err(sql(file))? else {
            return Ok(None);
        };
        if sha256(&blob)[..] != key[..] || blob.len() % HASH_BYTES != 0 {
            return Ok(None);
        }
        for h in blob.chunks_exact(HASH_BYTES) {
            d.push(h.try_into().expect("chunks_exact yields 32-byte slices"));
        }
    }
    Ok(d.finish())
}

/// Gives each of `versions` (of the replica in `file`) that records no digest 1 (a
/// version made by chunks, [`VersionWriter::write_version_chunks`]) its digest 1, made
/// from its manifest ([`digest1_of`]), and records it, best effort, so that it is made
/// once: for a peer that compares digest 1 (a server's older clients). A version whose
/// manifest does not make one keeps an empty digest 1 (its pull and `scrub` say why).
pub(super) fn fill_digest1(file: &Path, versions: &mut [VersionInfo]) -> Result<()> {
    if versions.iter().all(|v| !v.digest.is_empty()) {
        return Ok(());
    }
    let conn = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql(file))?;
    conn.busy_timeout(RECORD_BUSY_TIMEOUT).map_err(sql(file))?;
    let mut made = Vec::new();
    for v in versions.iter_mut().filter(|v| v.digest.is_empty()) {
        if let Some(d) = digest1_of(&conn, file, v.number)? {
            v.digest = hex(&d);
            made.push((v.number, d));
        }
    }
    drop(conn);
    if made.is_empty() {
        return Ok(());
    }
    let record = || -> Result<()> {
        let conn = Connection::open(file).map_err(sql(file))?;
        conn.busy_timeout(RECORD_BUSY_TIMEOUT).map_err(sql(file))?;
        for (number, d) in &made {
            conn.execute(
                "UPDATE versions SET digest = ?1 WHERE number = ?2 AND length(digest) = 0",
                params![&d[..], *number as i64],
            )
            .map_err(sql(file))?;
        }
        Ok(())
    };
    if let Err(e) = record() {
        tracing::info!(file = %file.display(), error = %e, "could not record digest 1 yet");
    }
    Ok(())
}

/// Whether the `versions` table of the replica open on `conn` has its `digest2` column.
pub(super) fn has_digest2(conn: &Connection, file: &Path) -> Result<bool> {
    conn.query_row(
        "SELECT count(*) FROM pragma_table_info('versions') WHERE name = 'digest2'",
        [],
        |r| r.get::<_, i64>(0).map(|n| n > 0),
    )
    .map_err(sql(file))
}

/// Streams `version`'s page hashes in page order to `f`, checking each chunk of them
/// against its key first. A chunk that does not match is handed to `damaged` (its
/// index and key): an error from it stops the walk; `Ok` goes on with that chunk's
/// entries poisoned (they name no page, so an origin sends those pages again).
fn for_each_hash(
    conn: &Connection,
    file: &Path,
    version: u64,
    damaged: &mut dyn FnMut(u32, &Hash) -> Result<()>,
    f: &mut dyn FnMut(u32, Hash) -> Result<()>,
) -> Result<()> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT m.idx, m.chunk, c.hashes FROM manifest m JOIN chunks c ON c.hash = m.chunk
             WHERE m.version = ?1 ORDER BY m.idx",
        )
        .map_err(sql(file))?;
    let mut rows = stmt.query([version as i64]).map_err(sql(file))?;
    let mut pgno = 0u32;
    while let Some(row) = rows.next().map_err(sql(file))? {
        let idx: u32 = row.get(0).map_err(sql(file))?;
        let key = chunk_key(row.get_ref(1).map_err(sql(file))?.as_blob().ok());
        let blob = row
            .get_ref(2)
            .map_err(sql(file))?
            .as_blob()
            .map_err(|e| sql(file)(e.into()))?;
        let sound = key == sha256(blob);
        if !sound {
            damaged(idx, &key)?;
        }
        for h in blob.chunks_exact(HASH_BYTES) {
            pgno += 1;
            let h: Hash = h.try_into().expect("chunks_exact yields 32-byte slices");
            f(pgno, if sound { h } else { poisoned(&h) })?;
        }
    }
    Ok(())
}

/// A manifest row's chunk key as a hash (a key of another length: all zeros, which
/// no chunk's contents hash to).
fn chunk_key(raw: Option<&[u8]>) -> Hash {
    raw.and_then(|k| Hash::try_from(k).ok())
        .unwrap_or([0; HASH_BYTES])
}

/// The hash of page `pgno` in `version`'s manifest, through a one-chunk cache; the
/// chunk is checked against its key when loaded (a damaged one: `damaged` says what
/// to do, as in [`for_each_hash`], and its entries are poisoned).
fn manifest_hash(
    conn: &Connection,
    file: &Path,
    version: u64,
    pgno: u32,
    cache: &mut Option<(u32, Vec<u8>)>,
    damaged: &mut dyn FnMut(u32, &Hash) -> Result<()>,
) -> Result<Option<Hash>> {
    let idx = (pgno - 1) / CHUNK_PAGES as u32;
    if cache.as_ref().is_none_or(|(i, _)| *i != idx) {
        let row: Option<(Vec<u8>, Vec<u8>)> = conn
            .query_row(
                "SELECT m.chunk, c.hashes FROM manifest m JOIN chunks c ON c.hash = m.chunk
                 WHERE m.version = ?1 AND m.idx = ?2",
                params![version as i64, idx],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql(file))?;
        let blob = match row {
            Some((key, mut blob)) => {
                let key = chunk_key(Some(&key));
                if key != sha256(&blob) {
                    damaged(idx, &key)?;
                    for h in blob.chunks_exact_mut(HASH_BYTES) {
                        let p = poisoned(&h.try_into().expect("32 bytes"));
                        h.copy_from_slice(&p);
                    }
                }
                blob
            }
            None => Vec::new(),
        };
        *cache = Some((idx, blob));
    }
    let (_, blob) = cache.as_ref().expect("loaded above");
    let at = ((pgno - 1) as usize % CHUNK_PAGES) * HASH_BYTES;
    Ok(blob
        .get(at..at + HASH_BYTES)
        .and_then(|h| h.try_into().ok()))
}

/// What is wrong with a version's manifest ([`manifest_damage`]).
#[derive(Debug, Clone)]
pub(super) struct ManifestDamage {
    /// What is wrong, as "its manifest has no chunk 4 (pages 4097–5014)".
    pub problem: String,
    /// Whether a push can bring it back: a chunk whose key the manifest still lists
    /// but whose row is gone or short is stored again (whole, checked against its key)
    /// by any push whose database holds the same 1,024 pages there. A row missing from
    /// the manifest itself is never restored: stored versions never change.
    pub repairable: bool,
}

/// What is wrong with `version`'s manifest, if anything: a version of `page_count`
/// pages must list chunks `0..chunk_count(page_count)` in order, each stored, each
/// holding the hashes of exactly the pages it covers. One row per chunk and the length
/// of each chunk (SQLite reads a blob's length from its record header, not its bytes),
/// so a few hundred rows for a GiB: cheap enough to run before every pull and push.
/// The chunks' contents are checked against their keys where they are read.
pub(super) fn manifest_damage(
    conn: &Connection,
    file: &Path,
    version: u64,
    page_count: u32,
) -> Result<Option<ManifestDamage>> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT m.idx, length(c.hashes) FROM manifest m LEFT JOIN chunks c ON c.hash = m.chunk
             WHERE m.version = ?1 ORDER BY m.idx",
        )
        .map_err(sql(file))?;
    let mut rows = stmt.query([version as i64]).map_err(sql(file))?;
    let want = chunk_count(page_count);
    let lost = |problem: String| ManifestDamage {
        problem,
        repairable: false,
    };
    let mut next = 0u32;
    while let Some(row) = rows.next().map_err(sql(file))? {
        let idx: i64 = row.get(0).map_err(sql(file))?;
        let len: Option<i64> = row.get(1).map_err(sql(file))?;
        if idx != i64::from(next) {
            return Ok(Some(lost(missing_chunks(next, idx, want, page_count))));
        }
        if next >= want {
            return Ok(Some(lost(format!(
                "its manifest lists chunk {idx}, past the {want} its {page_count} pages need"
            ))));
        }
        let pages = chunk_pages(next, page_count);
        let holds = i64::from(pages.end() - pages.start() + 1) * HASH_BYTES as i64;
        let problem = match len {
            None => format!(
                "chunk {idx} of its manifest (pages {}–{}) is missing from the store",
                pages.start(),
                pages.end()
            ),
            Some(len) if len != holds => format!(
                "chunk {idx} of its manifest (pages {}–{}) holds {len} bytes of page hashes, not {holds}",
                pages.start(),
                pages.end()
            ),
            Some(_) => {
                next += 1;
                continue;
            }
        };
        return Ok(Some(ManifestDamage {
            problem,
            repairable: true,
        }));
    }
    Ok((next != want).then(|| lost(missing_chunks(next, i64::from(want), want, page_count))))
}

/// "its manifest has no chunk …" for the chunks `from..to` (of `want`) found absent.
fn missing_chunks(from: u32, to: i64, want: u32, page_count: u32) -> String {
    let to = to.clamp(i64::from(from) + 1, i64::from(want.max(from + 1))) as u32;
    let first = chunk_pages(from, page_count);
    let last = chunk_pages(to - 1, page_count);
    if to - from == 1 {
        format!(
            "its manifest has no chunk {from} (pages {}–{})",
            first.start(),
            first.end()
        )
    } else {
        format!(
            "its manifest has no chunks {from}–{} (pages {}–{})",
            to - 1,
            first.start(),
            last.end()
        )
    }
}

/// The damage of chunk `idx` of a version of `page_count` pages whose page hashes no
/// longer match its key (a push of the same pages stores it whole again).
fn damaged_chunk(idx: u32, page_count: u32) -> ManifestDamage {
    let pages = chunk_pages(idx, page_count);
    ManifestDamage {
        problem: format!(
            "chunk {idx} of its manifest (pages {}–{}) is damaged: its page hashes no longer match their key",
            pages.start(),
            pages.end()
        ),
        repairable: true,
    }
}

/// For a reader of `info`'s version: the refusal of its chunk `idx` (key `key`),
/// found damaged. The key is recorded (best effort), so that the next push of the
/// database takes no shortcut over it ([`VersionWriter::held_chunks`]) and stores it
/// whole again.
fn refuse_damaged<'a>(
    file: &'a Path,
    replica: &'a ReplicaPath,
    info: &'a VersionInfo,
) -> impl Fn(u32, &Hash) -> Error + 'a {
    move |idx, key| {
        if let Err(e) = record_bad_pages(file, &[*key]) {
            tracing::warn!(replica = %replica, error = %e, "could not record a damaged chunk");
        }
        damaged_version(replica, info.number, &damaged_chunk(idx, info.page_count))
    }
}

/// The refusal to read `replica@version`, whose manifest is damaged.
fn damaged_version(replica: &ReplicaPath, version: u64, damage: &ManifestDamage) -> Error {
    let repair = match damage.repairable {
        true => {
            "a push of the database makes a whole new latest version, and repairs this one \
             too if it still holds the same pages there"
        }
        false => {
            "a push of the database makes a whole new latest version, but a stored version \
             never changes, so nothing repairs this one"
        }
    };
    Error::Verification(format!(
        "{replica}@{version} is damaged in the store: {}. Pull another version (`sqlferry \
         versions {replica}` lists them); {repair}. `sqlferry scrub` lists every damaged version",
        damage.problem
    ))
}

/// Whether `data` is the page stored under `hash`: a page is keyed by its
/// [`page_hash`], which for page 1 differs from the plain SHA-256 (a few header bytes
/// are normalized), so both are tried when the position is not known.
pub(super) fn page_matches(pgno: Option<u32>, hash: &Hash, data: &[u8]) -> bool {
    if data.is_empty() {
        return false; // what a read leaves of bytes found damaged
    }
    match pgno {
        Some(n) => page_hash(n, data) == *hash,
        None => sha256(data) == *hash || page_hash(1, data) == *hash,
    }
}

/// The hash a damaged page is reported under to a pushing origin: never the real one,
/// so the origin's page differs and is sent again.
fn poisoned(hash: &Hash) -> Hash {
    hash.map(|b| !b)
}

/// Forgets `hashes` from the record of damage (scrub: no version uses them any more).
pub(super) fn forget_bad_pages(file: &Path, hashes: &[Hash]) -> Result<()> {
    if hashes.is_empty() {
        return Ok(());
    }
    let conn = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql(file))?;
    conn.busy_timeout(RECORD_BUSY_TIMEOUT).map_err(sql(file))?;
    conn.execute_batch("BEGIN IMMEDIATE").map_err(sql(file))?;
    for h in hashes {
        conn.execute("DELETE FROM bad_pages WHERE hash = ?1", [&h[..]])
            .map_err(sql(file))?;
    }
    conn.execute_batch("COMMIT").map_err(sql(file))?;
    Ok(())
}

/// The damaged pages (and chunks of page hashes) recorded in the replica open on
/// `conn` (a table that does not exist yet holds none).
pub(super) fn bad_pages(conn: &Connection, file: &Path) -> Result<HashSet<Hash>> {
    let exists: bool = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'bad_pages'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )
        .map_err(sql(file))?;
    if !exists {
        return Ok(HashSet::new());
    }
    let mut stmt = conn
        .prepare("SELECT hash FROM bad_pages")
        .map_err(sql(file))?;
    let rows = stmt
        .query_map([], |r| r.get::<_, Vec<u8>>(0))
        .map_err(sql(file))?;
    let mut set = HashSet::new();
    for row in rows {
        if let Ok(h) = <Hash>::try_from(row.map_err(sql(file))?.as_slice()) {
            set.insert(h);
        }
    }
    Ok(set)
}

/// Records damaged (or missing) pages of the replica in `file`, so that the next push
/// resends them. Opens its own read-write connection: the caller may hold a read-only
/// one.
pub(super) fn record_bad_pages(file: &Path, hashes: &[Hash]) -> Result<()> {
    if hashes.is_empty() {
        return Ok(());
    }
    let conn = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql(file))?;
    conn.busy_timeout(RECORD_BUSY_TIMEOUT).map_err(sql(file))?;
    let now = crate::epoch::now();
    conn.execute_batch(
        "BEGIN IMMEDIATE;
         CREATE TABLE IF NOT EXISTS bad_pages(hash BLOB PRIMARY KEY, found_at INTEGER NOT NULL);",
    )
    .map_err(sql(file))?;
    for h in hashes {
        conn.execute(
            "INSERT OR IGNORE INTO bad_pages(hash, found_at) VALUES (?1, ?2)",
            params![&h[..], now],
        )
        .map_err(sql(file))?;
    }
    conn.execute_batch("COMMIT").map_err(sql(file))?;
    Ok(())
}

/// The private file a new replica is built in, with the exclusive `flock` its creator
/// holds on it for its whole life. flock locks belong to the open file description and
/// on Linux do not interact with the fcntl locks SQLite takes on the same file, nor are
/// they dropped when SQLite closes its own descriptors: the lock says "a live process is
/// building this" and nothing else, and the kernel drops it when the process dies.
/// (std's `File::lock` is `flock(2)` on Linux.) Fields drop in order: the file goes,
/// then the lock.
struct Creating {
    path: tempfile::TempPath,
    _lock: std::fs::File,
}

impl Creating {
    /// Creates and locks a fresh private file for `final_file` in `dir`.
    fn new(dir: &Path, final_file: &Path) -> Result<Creating> {
        use std::os::unix::fs::MetadataExt;
        let name = final_file
            .file_name()
            .expect("a replica file has a name")
            .to_string_lossy();
        // A cleaner may take the lock of a file created a moment ago, before its creator
        // locked it, and remove it: then the path is no longer this file, and another
        // is made.
        for _ in 0..8 {
            let (file, path) = tempfile::Builder::new()
                .prefix(&format!(".{name}."))
                .suffix(".new")
                .tempfile_in(dir)
                .map_err(|e| Error::io(dir, e))?
                .into_parts();
            file.lock().map_err(|e| Error::io(&path, e))?;
            let ours = file.metadata().map_err(|e| Error::io(&path, e))?.ino();
            if std::fs::metadata(&path).is_ok_and(|m| m.ino() == ours) {
                return Ok(Creating { path, _lock: file });
            }
            let _ = path.keep();
        }
        Err(Error::InUse(format!(
            "{}: could not create a private file that stays put",
            dir.display()
        )))
    }
}

/// Whether `name` is a private file of a new replica (`.<replica file>.<random>.new`), or
/// its `-wal` or `-shm`: returns the private file's name.
fn private_file_of(name: &str) -> Option<&str> {
    let base = name
        .strip_suffix("-wal")
        .or_else(|| name.strip_suffix("-shm"))
        .unwrap_or(name);
    (base.starts_with('.') && base.ends_with(".new") && base.contains(".sqlferry.")).then_some(base)
}

/// Removes what crashed pushes left in the replica directory `dir`: private files of new
/// replicas whose lock nobody holds (their creator is dead), and the `-wal`/`-shm`
/// beside them or beside none. A live push holds its file's lock, so its files stay.
/// Best effort: what cannot be removed is left for the next time. Returns the bytes
/// freed.
pub(super) fn remove_leftovers(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut freed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(base) = private_file_of(name) else {
            continue;
        };
        let path = dir.join(name);
        if name != base {
            // A -wal or -shm: removed with its private file, or alone if that is gone.
            if !dir.join(base).exists() {
                freed += remove_counted(&path);
            }
            continue;
        }
        let Ok(file) = std::fs::File::open(&path) else {
            continue;
        };
        if file.try_lock().is_err() {
            continue; // a live push is building it
        }
        for suffix in ["-wal", "-shm"] {
            freed += remove_counted(&dir.join(format!("{name}{suffix}")));
        }
        freed += remove_counted(&path);
        tracing::info!(file = %path.display(), "removed a new replica's file a crashed push left");
    }
    freed
}

fn remove_counted(path: &Path) -> u64 {
    let len = std::fs::symlink_metadata(path).map_or(0, |m| m.len());
    match std::fs::remove_file(path) {
        Ok(()) => len,
        Err(_) => 0,
    }
}

/// A push in progress: the engine's page target for a new version.
///
/// It holds the replica's write lock (`BEGIN IMMEDIATE`) from [`PageTarget::begin`]
/// to [`PageTarget::commit`]; dropping it without committing rolls everything back.
///
/// It syncs against the replica's latest version whatever base the push names. When
/// that base is stale (the replica moved past it) and the push is not forced, the result
/// may only be the latest version itself: from the first page that differs from it
/// nothing more is stored, and COMMIT answers VERSION_CONFLICT (the origin is then
/// waiting for the answer and reads it; ending the session mid-stream would reach a
/// client over a WebSocket as "connection lost"). Equal content commits nothing and
/// reports the latest version ("already at version N": a push that landed but whose
/// answer was lost).
pub struct VersionWriter {
    conn: Connection,
    /// The store's page index; its write lock is taken only at COMMIT.
    pages: Pages,
    /// The pack this push appends its new pages to, taken at its first new page.
    appender: Option<Appender>,
    /// Page 1 as this push wrote it, for the header check at COMMIT.
    page1: Option<(Hash, Vec<u8>)>,
    /// The file being written: the replica's, or a private one while creating it.
    file: PathBuf,
    /// The replica's file.
    final_file: PathBuf,
    /// The private file a new replica is built in (removed on drop unless linked).
    creating: Option<Creating>,
    replica: ReplicaPath,
    options: PushOptions,
    /// The replica's latest version when the push began: what it syncs against.
    latest: Option<VersionInfo>,
    /// The base is stale and the push not forced: only the latest's content may result.
    must_equal: bool,
    /// A page differing from the latest's came while `must_equal`: a conflict.
    differs: bool,
    /// The pages of `latest` reported to the origin as held.
    held: u32,
    /// What is wrong with `latest`'s manifest, if anything: then nothing of it is held
    /// (every page comes) and the push makes a new version even of the same content,
    /// so that a push of the database leaves a whole latest version behind.
    latest_damaged: Option<ManifestDamage>,
    /// Pages (and chunks of page hashes) recorded as damaged: reported as not held,
    /// replaced when they come.
    bad: HashSet<Hash>,
    /// Whether `latest` uses any of `bad`: then the hash exchange runs, so that they
    /// are found and resent.
    bad_in_latest: bool,
    /// Page numbers written in this push, one bit each.
    written: Vec<u64>,
    /// Pages this push appended that no replica held before (rows of `temp.fresh`).
    fresh: u64,
    /// Where this push put or found each page it was sent, for the version's hints.
    placed: place::Placed,
    /// Damaged pages this push replaced with good bytes.
    repaired: u32,
    /// The manifest chunk of `latest` last looked at (for `must_equal`).
    chunk: Option<(u32, Vec<u8>)>,
    /// `latest`'s chunk keys as [`PageTarget::held_chunks`] gave them to the engine:
    /// the rows a held chunk's manifest row is copied from.
    held_keys: Vec<Hash>,
    /// The page size the engine began with.
    page_size: u32,
    /// The digest form the engine checks the result in.
    form: DigestForm,
    /// The chunked digest of `latest`.
    latest_digest2: Option<Hash>,
    /// The version this push made, or the unchanged latest when nothing differed.
    result: Option<(VersionInfo, bool)>,
    /// Pages as they arrived compressed, handed over by the transport: kept so.
    packed: Option<PackedPages>,
    /// The store's default retention policy, for a replica without its own.
    default_retention: Option<RetentionPolicy>,
    /// The versions the retention policy removed once this push's version committed.
    removed: Vec<u64>,
    /// A merge's candidate, stored by this push's first sync and committed with the
    /// merge by its second ([`VersionWriter::stage_candidate`]).
    candidate: Option<Candidate>,
    /// The session is sealed: pages come sealed under their identities, and the
    /// version's seal before COMMIT ([`PageTarget::keeps_sealed`]).
    sealed: bool,
    /// The seal of the version this sealed push makes ([`PageTarget::keep_seal`]).
    seal: Option<Vec<u8>>,
    /// The store's GC lock, held shared for the whole push (dropped last).
    _gc: GcShared,
}

/// A merge's candidate ([`VersionWriter::stage_candidate`]): what a `push --merge`
/// sent, stored as a version of its own by the writer's first sync and committed in the
/// same transaction as the merge, which its second sync stores.
struct Candidate {
    /// The version the push was based on (OLD): the candidate's `base`.
    base: u64,
    /// Its commit message.
    message: String,
    /// Its number, once the first sync wrote it (the transaction still open).
    number: Option<u64>,
}

impl VersionWriter {
    /// Opens (creating if needed) the replica file for a push.
    pub(super) fn open(
        final_file: &Path,
        pages_dir: &Path,
        replica: &ReplicaPath,
        options: PushOptions,
        gc: GcShared,
        default_retention: Option<RetentionPolicy>,
    ) -> Result<Self> {
        let pages = Pages::open(pages_dir, pack::WRITER_CACHE_KIB)?;
        let freed = pages.recover()?;
        if freed > 0 {
            tracing::info!(
                bytes = freed,
                "truncated the packs crashed pushes had grown"
            );
        }
        let dir = final_file.parent().expect("a replica file has a directory");
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        // A replica that does not exist yet is built in a private file and linked into
        // place only once its first version commits: a failed first push leaves nothing.
        let creating = if final_file.exists() {
            None
        } else {
            Some(Creating::new(dir, final_file)?)
        };
        let file = creating.as_ref().map_or(final_file, |c| &*c.path);
        let conn = Connection::open(file).map_err(sql(file))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql(file))?;
        // Not a new replica's private file: its WAL is checkpointed and the file
        // closed before it is linked into place, and its WAL must go with that name.
        if creating.is_none() {
            crate::page::kept_wal::keep_wal_on_close(&conn).map_err(sql(file))?;
        }
        // A new replica's private file is set up (WAL mode, its tables) without a
        // single fsync: no one sees it before `publish`, whose checkpoint syncs the WAL
        // and then the file before it is linked into place, and a crash before that
        // leaves a private file the next push removes. Its six fsyncs were on the
        // critical path of a push to a new replica, before READY.
        if creating.is_some() {
            conn.pragma_update(None, "synchronous", "OFF")
                .map_err(sql(file))?;
        }
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql(file))?;
        conn.execute_batch(SCHEMA).map_err(sql(file))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql(file))?;
        conn.execute_batch(&format!("PRAGMA temp.cache_size = {FRESH_CACHE_KIB}"))
            .map_err(sql(file))?;
        conn.execute_batch(FRESH_SCHEMA).map_err(sql(file))?;
        conn.execute_batch(place::SCHEMA).map_err(sql(file))?;
        conn.execute_batch(place::PLACED_SCHEMA)
            .map_err(sql(file))?;
        Ok(VersionWriter {
            conn,
            pages,
            appender: None,
            page1: None,
            file: file.to_owned(),
            final_file: final_file.to_owned(),
            creating,
            replica: replica.clone(),
            options,
            latest: None,
            must_equal: false,
            differs: false,
            held: 0,
            bad_in_latest: false,
            latest_damaged: None,
            bad: HashSet::new(),
            written: Vec::new(),
            fresh: 0,
            placed: place::Placed::new(),
            repaired: 0,
            chunk: None,
            held_keys: Vec::new(),
            page_size: 0,
            form: DigestForm::One,
            latest_digest2: None,
            result: None,
            packed: None,
            default_retention,
            removed: Vec::new(),
            candidate: None,
            sealed: false,
            seal: None,
            _gc: gc,
        })
    }

    /// Makes this push store two versions in one transaction, as a merge commit does:
    /// the first sync into this writer is a merge's candidate (what a `push --merge`
    /// sent, based on version `base`), written but not committed; the second is the
    /// merge, committed together with it. Both are made only onto the version
    /// [`PushOptions::base`] names, the latest when the first sync begins (else
    /// VERSION_CONFLICT and nothing is stored), so the candidate is numbered the latest
    /// plus one, the merge plus two, and the latest version goes from the one to the
    /// other: the candidate is never the latest. Either sync failing, or the writer
    /// dropped between them, stores neither. The merge is a new version even when its
    /// content equals the latest's.
    pub fn stage_candidate(&mut self, base: u64, message: String) {
        self.candidate = Some(Candidate {
            base,
            message,
            number: None,
        });
    }

    /// The candidate's number once both versions are committed (or while the second
    /// sync runs); `None` without [`VersionWriter::stage_candidate`].
    pub fn candidate(&self) -> Option<u64> {
        self.candidate.as_ref().and_then(|c| c.number)
    }

    /// Forgets what the candidate's sync did, before the merge's sync begins in the
    /// same transaction.
    fn reset_for_merge(&mut self) {
        self.page1 = None;
        self.written.clear();
        self.fresh = 0;
        self.repaired = 0;
        self.chunk = None;
        self.differs = false;
        self.must_equal = false;
        self.held = 0;
        self.result = None;
    }

    /// The versions the replica's retention policy removed after this push's version
    /// committed (oldest first; empty when it made none or removed none). Their pages
    /// stay until [`super::Store::collect_garbage`], which must run after this writer
    /// is dropped.
    pub fn removed(&self) -> &[u64] {
        &self.removed
    }

    /// Applies the replica's retention policy (its own, else the store's default) now
    /// that a new version is committed. Best effort: the push stands whatever happens.
    fn apply_retention(&mut self) {
        let own = match retention::own_policy(&self.final_file) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(replica = %self.replica, error = %e, "could not read the retention policy");
                return;
            }
        };
        let Some(policy) = own.or_else(|| self.default_retention.clone()) else {
            return;
        };
        if policy.keeps_everything() {
            return;
        }
        match retention::remove_versions(&self.final_file, &policy, crate::epoch::now(), false) {
            Ok((removed, _)) => self.removed = removed,
            Err(e) => {
                tracing::warn!(replica = %self.replica, error = %e, "could not apply the retention policy")
            }
        }
    }

    /// Keeps the pages that arrived compressed as they came: `packed` holds their
    /// compressed bytes, handed over by the transport that expanded them (see
    /// [`PackedPages`]). A page without a matching entry is kept plain.
    pub fn keep_packed(&mut self, packed: PackedPages) {
        self.packed = Some(packed);
    }

    /// After a successful sync: the version now latest, and whether this push made it
    /// (`false`: nothing differed from the latest version, so none was made).
    pub fn outcome(&self) -> Option<(&VersionInfo, bool)> {
        self.result.as_ref().map(|(v, made)| (v, *made))
    }

    /// How many damaged stored pages this push replaced with good ones (committed even
    /// when it made no new version).
    pub fn repaired(&self) -> u32 {
        self.repaired
    }

    fn conflict(&self) -> Error {
        let latest = self.latest.as_ref();
        Error::Conflict {
            replica: self.replica.to_string(),
            latest: latest.map_or(0, |v| v.number),
            based_on: self.options.base,
            latest_at: latest.map_or(0, |v| v.created_at),
            latest_client: latest.map_or(String::new(), |v| v.client_id.clone()),
            encrypted: self.options.encryption.is_some(),
        }
    }

    fn mark_written(&mut self, pgno: u32) {
        let i = (pgno - 1) as usize;
        if self.written.len() <= i / 64 {
            self.written.resize(i / 64 + 1, 0);
        }
        self.written[i / 64] |= 1 << (i % 64);
    }

    fn was_written(&self, pgno: u32) -> bool {
        let i = (pgno - 1) as usize;
        self.written
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Cuts the pages this push appended that its version does not use out of the
    /// pack (a hostile or broken origin's), moving the used ones down and their index
    /// rows with them, inside the open index transaction.
    fn drop_unused(&mut self) -> Result<()> {
        let Some(appender) = self.appender.as_mut() else {
            return Ok(());
        };
        let pack = appender.id();
        let pages = &self.pages;
        let mut stmt = self
            .conn
            .prepare(
                "SELECT hash, offset, len, repair, codec, checksum FROM temp.fresh ORDER BY offset",
            )
            .map_err(sql(&self.file))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, bool>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, Option<Vec<u8>>>(5)?,
                ))
            })
            .map_err(sql(&self.file))?;
        // Pages move below: the hints are built from the index instead.
        self.placed.forget(&self.conn, &self.file)?;
        let file = &self.file;
        let mut kept = rows.map(|row| {
            let (hash, offset, len, repair, codec, checksum) = row.map_err(sql(file))?;
            let hash = Hash::try_from(hash.as_slice())
                .map_err(|_| Error::Server("a pending page key is no hash".into()))?;
            let loc = Loc::from_row(pack, offset, len, codec, checksum);
            // Kept: a repair, or a page whose index row names these very bytes.
            let keep = repair || pages.lookup(&hash)? == Some(loc);
            Ok((hash, loc, keep))
        });
        appender.compact(&mut kept, &mut |hash, loc| {
            pages.insert(hash, loc, true).map(|_| ())
        })
    }

    /// Checks the page 1 of a new version: the SQLite header, with the version's page
    /// size and, where SQLite trusts it, its page count. The page is read back from the
    /// store and checked against its hash like any other read.
    fn check_page1(&mut self, hash: &Hash, page_count: u32) -> Result<()> {
        let mut data = Vec::new();
        let found = match &self.page1 {
            Some((h, d)) if h == hash => {
                data.extend_from_slice(d);
                true
            }
            _ => match self.pages.lookup(hash)? {
                Some(loc) => self.pages.read(loc.for_page(1), &mut data)?,
                None => false,
            },
        };
        if !(found && page_matches(Some(1), hash, &data)) {
            // Recorded from a connection of its own, once this push's write lock is
            // gone (it would wait for it otherwise); nothing of this push is kept.
            self.pages.rollback();
            self.conn
                .execute_batch("ROLLBACK")
                .map_err(sql(&self.file))?;
            if let Err(e) = record_bad_pages(&self.file, &[*hash]) {
                tracing::warn!(replica = %self.replica, error = %e, "could not record a damaged page");
            }
            return Err(Error::Verification(format!(
                "page 1 of {} is {} in the store; nothing was stored, push again to repair it",
                self.replica,
                if found { "damaged" } else { "missing" }
            )));
        }
        Header::check_page1(&data, self.page_size, page_count).map_err(|why| {
            Error::Verification(format!(
                "the pushed database's page 1 is not a valid SQLite header: {why}; nothing was stored"
            ))
        })
    }
}

/// The refusals of a push that would mix a plaintext and an encrypted replica or two
/// keys, and of a sealed push the store cannot keep as its seal says
/// (`docs/security.md`), the same in every store: a replica is encrypted or not from
/// its first version on, under one key id that only a rekey from the latest version's
/// changes (`options.rekey_from`), and a seal names the version number it was made for,
/// the latest plus one, so a sealed push must be based on the latest version
/// (`conflict`, forced or not). `latest`: the replica's latest version number and its
/// key id when it is encrypted; `None` for a new replica. `Ok` when the push may go on.
pub(crate) fn check_key_ids(
    replica: &ReplicaPath,
    sealed: bool,
    options: &PushOptions,
    latest: Option<(u64, Option<&str>)>,
    conflict: impl Fn() -> Error,
) -> Result<()> {
    let ours = options.encryption.as_deref();
    match (sealed, ours) {
        (true, None) => {
            return Err(Error::Protocol(format!(
                "a sealed push into {replica} without its encryption key id; nothing was stored"
            )));
        }
        (false, Some(_)) => {
            return Err(Error::Protocol(format!(
                "a push into {replica} named an encryption key and did not seal its pages; nothing was stored"
            )));
        }
        _ => {}
    }
    let rekey_from = options.rekey_from.as_deref();
    let Some((number, theirs)) = latest else {
        if rekey_from.is_some() {
            return Err(Error::NotFound(format!(
                "{replica} has no version to rekey; nothing was stored"
            )));
        }
        if sealed && options.base.is_some_and(|b| b > 0) {
            return Err(conflict());
        }
        return Ok(());
    };
    // A rekey: the one push that may change the key id, and only from the latest
    // version's, which it names (docs/security.md).
    if let Some(from) = rekey_from {
        match (ours, theirs) {
            (_, None) => {
                return Err(Error::Usage(format!(
                    "{replica} is not encrypted: a rekey replaces the key of an encrypted replica (turning encryption on is a push with a key to a new replica); nothing was stored"
                )));
            }
            (None, Some(_)) => {
                return Err(Error::Usage(format!(
                    "a rekey of {replica} without a new key: turning encryption off is not a rekey (pull it with its key and push it to a new replica without one); nothing was stored"
                )));
            }
            (Some(k), Some(id)) if id == from && k != id => {}
            (Some(k), Some(id)) if id == from => {
                return Err(Error::Usage(format!(
                    "version {number} of {replica} is already under key id {k}: a rekey needs another key; nothing was stored"
                )));
            }
            (_, Some(id)) => {
                return Err(Error::Auth(format!(
                    "a rekey of {replica} from key id {from}, and its latest version {number} was made with key id {id}; nothing was stored"
                )));
            }
        }
        if options.base != Some(number) {
            return Err(conflict());
        }
        return Ok(());
    }
    match (ours, theirs) {
        (None, None) => return Ok(()),
        (None, Some(id)) => {
            return Err(Error::Auth(format!(
                "{replica} is encrypted (key id {id}): push with its key (--encryption-key-file, or SQLFERRY_ENCRYPTION_KEY); nothing was stored"
            )));
        }
        (Some(_), None) => {
            return Err(Error::Auth(format!(
                "{replica} is not encrypted: its versions are plaintext, and a replica is encrypted or not from its first version on; push without an encryption key, or to a new replica; nothing was stored"
            )));
        }
        (Some(k), Some(id)) if k != id => {
            return Err(Error::Auth(format!(
                "version {number} of {replica} was made with key id {id}, and this push's key id is {k}: push with its key file; nothing was stored"
            )));
        }
        (Some(_), Some(_)) => {}
    }
    // Forced or not: the seal was made for the base's next number, and only the
    // latest's next number is the one this version would get.
    if options.base != Some(number) {
        return Err(conflict());
    }
    Ok(())
}

impl VersionWriter {
    /// Refuses, before any page is stored, a push that would mix a plaintext and an
    /// encrypted replica or two keys, and a sealed push this store cannot keep as its
    /// seal says: a replica is encrypted or not from its first version on, under one key
    /// id (`docs/security.md`), and a seal names the version number it was made for,
    /// the latest plus one, so a sealed push must be based on the latest version.
    fn check_sealing(&mut self, begin: &BeginInfo) -> Result<()> {
        self.sealed = begin.sealed;
        self.seal = None;
        let replica = &self.replica;
        if begin.sealed && self.candidate.is_some() {
            return Err(Error::Usage(format!(
                "{replica} is encrypted: the server cannot read its rows, so it cannot merge them; pull the latest version into another file, make this push's changes there, and push that file; nothing was stored"
            )));
        }
        if begin.sealed && self.packed.is_some() {
            return Err(Error::Protocol(
                "a sealed push over a compressed session: an encrypted session never agrees to compression; nothing was stored".into(),
            ));
        }
        let latest = match &self.latest {
            Some(l) => Some((
                l.number,
                sealing_of(&self.conn, &self.file, l.number)?.map(|(id, _)| id),
            )),
            None => None,
        };
        check_key_ids(
            replica,
            begin.sealed,
            &self.options,
            latest.as_ref().map(|(n, id)| (*n, id.as_deref())),
            || self.conflict(),
        )?;
        self.add_sealing_columns()
    }

    /// Gives a replica file made before encrypted replicas the columns of a sealed
    /// version (a sealed push's, inside its write transaction); a plaintext push leaves
    /// the file as it is.
    fn add_sealing_columns(&self) -> Result<()> {
        if !self.sealed {
            return Ok(());
        }
        self.keep_passphrase()?;
        if has_sealing(&self.conn, &self.file)? {
            return Ok(());
        }
        self.conn
            .execute_batch(
                "ALTER TABLE versions ADD COLUMN encryption_key_id TEXT;
                 ALTER TABLE versions ADD COLUMN seal BLOB;",
            )
            .map_err(sql(&self.file))
    }

    /// For a sealed push whose key came from a passphrase: records its salt and cost
    /// with the replica when it has none (inside the push's write transaction, so they
    /// are kept only with the version), and refuses, before any page is stored, one
    /// that names another salt or cost than the replica's (it stretched another key).
    fn keep_passphrase(&self) -> Result<()> {
        let Some(ours) = &self.options.passphrase else {
            return Ok(());
        };
        match passphrase_of(&self.conn, &self.file)? {
            Some(theirs) if theirs == *ours => Ok(()),
            Some(_) => Err(Error::Auth(format!(
                "{} keeps another passphrase salt than this push was stretched with: its key is not the replica's passphrase key; nothing was stored",
                self.replica
            ))),
            None => {
                self.conn
                    .execute_batch(PASSPHRASE_SCHEMA)
                    .map_err(sql(&self.file))?;
                self.conn
                    .execute(
                        "INSERT INTO passphrase(id, salt, memory_kib, passes, lanes) VALUES (1, ?1, ?2, ?3, ?4)",
                        params![
                            &ours.salt[..],
                            ours.cost.memory_kib,
                            ours.cost.passes,
                            ours.cost.lanes
                        ],
                    )
                    .map_err(sql(&self.file))?;
                Ok(())
            }
        }
    }
}

impl PageTarget for VersionWriter {
    fn begin(&mut self, begin: &BeginInfo) -> Result<u32> {
        if self.candidate().is_some() {
            // A merge after its candidate: the same transaction (the write lock is
            // held), against the same latest version.
            self.reset_for_merge();
        } else {
            self.conn
                .execute_batch("BEGIN IMMEDIATE")
                .map_err(sql(&self.file))?;
            self.latest = latest(&self.conn, &self.file)?;
            self.bad = bad_pages(&self.conn, &self.file)?;
        }
        // The page lookups of the whole push in one snapshot of the index: no locking
        // per page. A page another push indexes meanwhile is appended again and cut
        // out again at COMMIT (`drop_unused`).
        self.pages.begin_read()?;
        self.page_size = begin.page_size;
        self.form = match begin.chunked_digest {
            true => DigestForm::Chunked,
            false => DigestForm::One,
        };
        if !has_digest2(&self.conn, &self.file)? {
            // A file an older sqlferry created after this push's `upgrade` looked for
            // it: the column every version this push writes fills.
            self.conn
                .execute_batch("ALTER TABLE versions ADD COLUMN digest2 BLOB")
                .map_err(sql(&self.file))?;
        }
        self.check_sealing(begin)?;
        if self.candidate.is_some() {
            // A candidate and its merge go only onto the version they were merged onto.
            if self.latest.as_ref().map(|l| l.number) != self.options.base {
                return Err(self.conflict());
            }
            if self.candidate().is_none() && !has_merged_into(&self.conn, &self.file)? {
                // A replica file made before candidates were kept.
                self.conn
                    .execute_batch("ALTER TABLE versions ADD COLUMN merged_into INTEGER")
                    .map_err(sql(&self.file))?;
            }
        }
        let Some(latest) = self.latest.clone() else {
            return Ok(0);
        };
        self.latest_digest2 = digest2_of(&self.conn, &self.file, latest.number)?;
        self.latest_damaged =
            manifest_damage(&self.conn, &self.file, latest.number, latest.page_count)?;
        if let Some(damage) = &self.latest_damaged {
            tracing::warn!(replica = %self.replica, version = latest.number, "the latest version is damaged in the store ({}): every page is sent again, to make a whole new version", damage.problem);
        }
        if !self.options.force && Some(latest.number) != self.options.base {
            // Only the latest's own content may come of this push. Another size can't.
            if begin.page_count != 0
                && (latest.page_size != begin.page_size || latest.page_count != begin.page_count)
            {
                return Err(self.conflict());
            }
            self.must_equal = true;
        }
        let mut held = if latest.page_size == begin.page_size {
            latest.page_count
        } else {
            0
        };
        // An origin that knows a manifest sends only the pages that differ from it, and
        // asks for no hash, when READY's count equals that manifest's. If what is held is
        // not exactly that manifest (another version, or damaged pages to be resent),
        // say a count that differs, so that the hash exchange runs and finds every page.
        self.bad_in_latest = !self.bad.is_empty() && self.uses_bad(latest.number)?;
        let trusted = begin.base_version == latest.number && !self.bad_in_latest;
        if begin.known_base && held > 0 && !trusted {
            let theirs = if begin.base_version == latest.number {
                Some(latest.clone())
            } else {
                self.conn
                    .query_row(
                        &format!("SELECT {VERSION_COLUMNS} FROM versions WHERE number = ?1"),
                        [begin.base_version as i64],
                        version_row,
                    )
                    .optional()
                    .map_err(sql(&self.file))?
            };
            held = match theirs {
                Some(v) if v.page_size == begin.page_size && v.page_count == held => held - 1,
                Some(v) if v.page_size == begin.page_size => held,
                // A manifest of another size is not used; one this replica never had
                // cannot be told apart: nothing is held, every page comes.
                Some(_) => held,
                None => 0,
            };
        }
        if self.latest_damaged.is_some() {
            held = 0;
        }
        self.held = held;
        Ok(held)
    }

    fn hashes(&mut self, f: &mut dyn FnMut(u32, Hash) -> Result<()>) -> Result<()> {
        let (held, bad) = (self.held, &self.bad);
        let latest_damaged = &mut self.latest_damaged;
        let replica = &self.replica;
        match &self.latest {
            Some(latest) if held > 0 => for_each_hash(
                &self.conn,
                &self.file,
                latest.number,
                // A damaged chunk of the latest's page hashes: its pages are resent and
                // the push makes a new version, which stores the chunk whole again.
                &mut |idx, _| {
                    let damage = damaged_chunk(idx, latest.page_count);
                    tracing::warn!(replica = %replica, version = latest.number, "the latest version is damaged in the store ({}): its pages are sent again, to make a whole new version", damage.problem);
                    latest_damaged.get_or_insert(damage);
                    Ok(())
                },
                &mut |pgno, h| {
                    if pgno > held {
                        Ok(())
                    } else if bad.contains(&h) {
                        f(pgno, poisoned(&h))
                    } else {
                        f(pgno, h)
                    }
                },
            ),
            _ => Ok(()),
        }
    }

    fn write_page(&mut self, pgno: u32, data: Vec<u8>, hash: &Hash) -> Result<()> {
        // Taken whatever becomes of the page, so the hand-over never holds more than
        // the frames in flight.
        let packed = self.packed.as_ref().and_then(|p| p.take(pgno, &data));
        if self.differs {
            return Ok(()); // a conflict already: nothing more is stored
        }
        if self.must_equal {
            let number = self.latest.as_ref().map_or(0, |v| v.number);
            // A damaged chunk names no page: those differ, a conflict (told at COMMIT).
            let theirs = manifest_hash(
                &self.conn,
                &self.file,
                number,
                pgno,
                &mut self.chunk,
                &mut |_, _| Ok(()),
            )?;
            if theirs != Some(*hash) {
                // The content differs from the latest version: a real conflict, told at
                // COMMIT, when the origin listens.
                tracing::info!(replica = %self.replica, page = pgno, "the push differs from the latest version: a conflict");
                self.differs = true;
                return Ok(());
            }
        }
        self.mark_written(pgno);
        if pgno == 1 && !self.sealed {
            self.page1 = Some((*hash, data.clone()));
        }
        let repair = self.bad.contains(hash);
        if !repair && let Some(loc) = self.pages.lookup(hash)? {
            // Stored already, by any replica's push: that place is the page's hint.
            return self.placed.add(&self.conn, &self.file, pgno, hash, loc);
        }
        if self.appender.is_none() {
            self.appender = Some(self.pages.appender()?);
        }
        // A page that came compressed is kept as it came (checked: the engine hashed the
        // page these bytes expanded to, and the fingerprint ties the two together).
        let packed = packed.filter(|p| p.bytes.len() < data.len());
        let appender = self.appender.as_mut().expect("taken above");
        let (bytes, zstd) = match &packed {
            Some(p) => (&p.bytes[..], true),
            None => (&data[..], false),
        };
        // Kept with the sum of its stored bytes, which every read checks (a sealed
        // page's identity cannot be checked here at all; a plain one's was, by the
        // engine, before it reached this).
        let sealed = self.sealed;
        // Where the bytes will go, recorded first: a row that is there already means
        // this push appended the page before (one statement per new page, not a look
        // and then a write).
        let at = Loc::of_bytes(appender.id(), appender.end(), bytes, zstd, sealed);
        let recorded = self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO temp.fresh(hash, offset, len, repair, codec, checksum) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    &hash[..],
                    at.offset as i64,
                    at.len,
                    repair,
                    at.codec(),
                    at.checksum()
                ])
            })
            .map_err(sql(&self.file))?;
        if recorded == 0 {
            return Ok(()); // stored already, by this push
        }
        let loc = appender.append(bytes, zstd, sealed)?;
        debug_assert_eq!(loc, at, "appended where it was recorded");
        self.placed.add(&self.conn, &self.file, pgno, hash, loc)?;
        if repair {
            self.conn
                .prepare_cached("DELETE FROM bad_pages WHERE hash = ?1")
                .and_then(|mut s| s.execute([&hash[..]]))
                .map_err(sql(&self.file))?;
            self.bad.remove(hash);
            self.repaired += 1;
            tracing::info!(replica = %self.replica, page = pgno, hash = %hex(hash), "damaged page replaced");
        } else {
            self.fresh += 1;
        }
        Ok(())
    }

    fn commit(
        &mut self,
        page_count: u32,
        digest: &Hash,
        hashes: &mut dyn Iterator<Item = Result<Hash>>,
    ) -> Result<()> {
        let same = self.latest_damaged.is_none()
            && match (self.form, &self.latest) {
                (DigestForm::Chunked, _) => self.latest_digest2 == Some(*digest),
                (DigestForm::One, None) => false,
                // A latest version made by chunks may record no digest 1: made from its
                // manifest here (this push read every page hash anyway).
                (DigestForm::One, Some(l)) if l.digest.is_empty() => {
                    digest1_of(&self.conn, &self.file, l.number)? == Some(*digest)
                }
                (DigestForm::One, Some(l)) => l.digest == hex(digest),
            };
        self.commit_with(same, |w, number, same| {
            w.write_version(number, same, page_count, digest, hashes)
        })
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

    fn held_chunks(&mut self) -> Result<Option<Vec<Hash>>> {
        let Some(latest) = &self.latest else {
            return Ok(Some(Vec::new())); // a new replica: nothing held
        };
        // Only a replica that holds exactly its latest version, as the origin's base,
        // with no damaged page or chunk in it to be resent (otherwise the hash exchange
        // runs).
        if self.must_equal
            || self.bad_in_latest
            || self.latest_damaged.is_some()
            || latest.page_size != self.page_size
            || self.held != latest.page_count
        {
            return Ok(None);
        }
        let number = latest.number;
        let keys: Vec<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT chunk FROM manifest WHERE version = ?1 ORDER BY idx")
            .and_then(|mut s| {
                s.query_map([number as i64], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()
            })
            .map_err(sql(&self.file))?;
        let keys: Option<Vec<Hash>> = keys
            .iter()
            .map(|k| Hash::try_from(k.as_slice()).ok())
            .collect();
        // A manifest that is not one key a chunk is left to the hash exchange (and
        // to scrub).
        let keys = keys.filter(|k| k.len() as u32 == chunk_count(self.held));
        self.held_keys = keys.clone().unwrap_or_default();
        Ok(keys)
    }

    fn held_chunk(&mut self, idx: u32, out: &mut Vec<u8>) -> Result<()> {
        let number = self.latest.as_ref().map_or(0, |v| v.number);
        let row: Option<(Vec<u8>, Vec<u8>)> = self
            .conn
            .prepare_cached(
                "SELECT m.chunk, c.hashes FROM manifest m JOIN chunks c ON c.hash = m.chunk
                 WHERE m.version = ?1 AND m.idx = ?2",
            )
            .and_then(|mut s| {
                s.query_row(params![number as i64, idx], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(sql(&self.file))?;
        let (key, blob) = row.ok_or_else(|| {
            Error::Verification(format!(
                "chunk {idx} of {}@{number}'s manifest is missing; `sqlferry scrub` finds every such chunk",
                self.replica
            ))
        })?;
        let key = chunk_key(Some(&key));
        if key != sha256(&blob) {
            return Err(self.refuse_damaged_chunk(idx, &key));
        }
        out.extend_from_slice(&blob);
        Ok(())
    }

    fn commit_chunks(
        &mut self,
        page_count: u32,
        digest: &Hash,
        chunks: &mut dyn Iterator<Item = Result<Chunk>>,
    ) -> Result<()> {
        let same = self.latest_damaged.is_none() && self.latest_digest2 == Some(*digest);
        self.commit_with(same, |w, number, same| {
            w.write_version_chunks(number, same, page_count, digest, chunks)
        })
    }
}

impl VersionWriter {
    /// Commits the push whose result is the latest version's content when `same`
    /// (only repairs are kept then, or nothing), or a new version written by `write`
    /// (given its number, and whether only repairs are to be written: never for a
    /// merge's two versions, whatever their content) into the open transactions.
    fn commit_with(
        &mut self,
        same: bool,
        write: impl FnOnce(&mut Self, u64, bool) -> Result<()>,
    ) -> Result<()> {
        let file = self.file.clone();
        if self.must_equal && (self.differs || !same) {
            return Err(self.conflict());
        }
        // A merge's candidate (first sync) or the merge after it (second): both are
        // versions whatever their content.
        let staging = self.candidate.as_ref().map(|c| c.number.is_none());
        let same = same && staging.is_none();
        if same && self.repaired == 0 && self.fresh == 0 {
            // Nothing differs and nothing was mended: no new version, nothing to keep
            // (what was appended is cut off when the pack is let go).
            self.conn.execute_batch("ROLLBACK").map_err(sql(&file))?;
            let latest = self.latest.clone().expect("same content means a latest");
            self.result = Some((latest, false));
            return Ok(());
        }
        self.pages.begin()?;
        let number = match self.candidate() {
            Some(candidate) => candidate + 1,
            None => self.latest.as_ref().map_or(1, |b| b.number + 1),
        };
        let written = write(self, number, same).and_then(|()| {
            // The places of the version's pages, for its pulls (after `write`, which
            // moved any page it moved): a new version's chunks that have none, or
            // every chunk of the version a repair changed the places of.
            let previous = self.latest.as_ref().map(|l| l.number);
            let hinted = match (same, previous) {
                (false, _) => Some(number),
                (true, latest) if self.repaired > 0 => latest,
                (true, _) => None,
            };
            if let Some(version) = hinted {
                let all = self.repaired > 0;
                place::write(
                    &self.conn,
                    &self.file,
                    &self.pages,
                    &mut self.placed,
                    version,
                    previous,
                    all,
                )?;
            }
            // The page bytes are durable before the index rows naming them commit.
            match &mut self.appender {
                Some(a) => a.sync(),
                None => Ok(()),
            }
        });
        if let Err(e) = written {
            self.pages.rollback();
            return Err(e);
        }
        self.pages.commit(self.appender.as_mut())?;
        if staging == Some(true) {
            // The candidate is written and its pages indexed (the GC lock this push
            // holds keeps them), but not committed: the merge's sync follows, and
            // commits both. Nothing of it is visible until then.
            self.conn
                .execute_batch("DELETE FROM temp.fresh; DELETE FROM temp.placed")
                .map_err(sql(&file))?;
            if let Some(c) = self.candidate.as_mut() {
                c.number = Some(number);
            }
            return Ok(());
        }
        if staging == Some(false) {
            // Both versions written, neither committed (a test kills the server here).
            // Both or neither: never the candidate alone, which would be the latest.
            let merge_written = self
                .conn
                .query_row(
                    "SELECT count(*) FROM versions WHERE number = ?1",
                    [number as i64],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(sql(&file))?;
            if merge_written != 1 {
                return Err(Error::Bug(format!(
                    "the merge (version {number} of {}) was not written with its candidate; \
                     nothing was stored",
                    self.replica
                )));
            }
            crate::error::debug_pause("merge-commit");
        }
        self.conn.execute_batch("COMMIT").map_err(sql(&file))?;
        // A new replica's private file is checkpointed whole by `publish`.
        if self.creating.is_none() {
            crate::page::kept_wal::trim_wal(&self.conn, &file, BUSY_TIMEOUT);
        }
        self.conn
            .execute_batch("DELETE FROM temp.fresh; DELETE FROM temp.placed")
            .map_err(sql(&file))?;
        if same {
            let latest = self.latest.clone().expect("same content means a latest");
            self.result = Some((latest, false));
            return Ok(());
        }
        let mut info = self
            .conn
            .query_row(
                &format!("SELECT {VERSION_COLUMNS} FROM versions WHERE number = ?1"),
                [number as i64],
                version_row,
            )
            .map_err(sql(&file))?;
        add_digest2(&self.conn, &file, &mut info)?;
        if self.creating.is_some()
            && let Some(theirs) = self.publish(&info.digest)?
        {
            // Another push created the replica with this very content (the same
            // push, resent after its client lost the answer): already there.
            self.result = Some((theirs, false));
            return Ok(());
        }
        self.result = Some((info, true));
        if self.creating.is_none() {
            self.apply_retention();
        }
        Ok(())
    }
}

impl VersionWriter {
    /// Writes version `number` (unless `same`: then only repairs) into the replica's
    /// transaction and the index rows of the pages it uses into the index's, both left
    /// open for the caller to commit: from every page hash of the result, in order
    /// (the hash-tree path). Both digests are computed from them, and the one the
    /// engine checked must be among them.
    fn write_version(
        &mut self,
        number: u64,
        same: bool,
        page_count: u32,
        digest: &Hash,
        hashes: &mut dyn Iterator<Item = Result<Hash>>,
    ) -> Result<()> {
        if !same {
            self.insert_version(number, page_count)?;
        }
        let mut chunk = Vec::with_capacity(CHUNK_PAGES * HASH_BYTES);
        let mut idx = 0u32;
        let mut seen = 0u32;
        let mut page1 = None;
        let mut counts = (0u64, 0u64);
        let mut one = Digest::new(self.page_size, page_count);
        let mut chunked = ChunkedDigest::new(self.page_size, page_count);
        loop {
            let next = hashes.next().transpose()?;
            if let Some(h) = next {
                seen += 1;
                if seen == 1 {
                    page1 = Some(h);
                }
                self.index_fresh(seen, &h, &mut counts)?;
                one.push(&h);
                chunk.extend_from_slice(&h);
            }
            let full = chunk.len() == CHUNK_PAGES * HASH_BYTES;
            if !same && (full || (next.is_none() && !chunk.is_empty())) {
                let key: Hash = sha256(&chunk);
                chunked.push_chunk(&key);
                self.insert_chunk(number, idx, &key, Some(&chunk))?;
                idx += 1;
            }
            if full || next.is_none() {
                chunk.clear();
            }
            if next.is_none() {
                break;
            }
        }
        if seen != page_count {
            return Err(Error::Protocol(format!(
                "manifest has {seen} pages, expected {page_count}"
            )));
        }
        if !same {
            let (one, chunked) = (one.finish(), chunked.finish());
            let checked = match self.form {
                DigestForm::One => one,
                DigestForm::Chunked => chunked,
            };
            match (one, chunked) {
                (Some(one), Some(chunked)) if checked == Some(*digest) => {
                    self.set_digests(number, Some(&one), &chunked)?
                }
                _ => {
                    return Err(Error::Bug(
                        "the manifest written does not have the digest the engine checked".into(),
                    ));
                }
            }
        }
        self.finish_version(same, page1, page_count, counts)
    }

    /// [`VersionWriter::write_version`] from the result's chunks (the chunk path): a
    /// chunk held as it is becomes a manifest row naming the latest version's chunk,
    /// not read (but chunk 0, for page 1's hash, checked against its key); a new one is
    /// stored and its pages indexed. The chunked digest is the one the engine checked
    /// and the one recorded. Digest 1 is recorded only when every chunk is new (its
    /// page hashes are all at hand then); a version that kept a chunk records none:
    /// making it would read every held chunk, in proportion to the file
    /// (docs/engine.md, "The chunked digest"). Readers compare such a version in the
    /// chunked form, and a server makes digest 1 for a peer that asks
    /// ([`fill_digest1`]).
    fn write_version_chunks(
        &mut self,
        number: u64,
        same: bool,
        page_count: u32,
        digest: &Hash,
        chunks: &mut dyn Iterator<Item = Result<Chunk>>,
    ) -> Result<()> {
        if !same {
            self.insert_version(number, page_count)?;
        }
        // Digest 1 while every chunk so far was new; `None` from the first kept one.
        let mut one = Some(Digest::new(self.page_size, page_count));
        let mut chunked = ChunkedDigest::new(self.page_size, page_count);
        let mut page1 = None;
        let mut counts = (0u64, 0u64);
        let mut seen = 0u32;
        // Consecutive held chunks whose manifest rows are not yet copied.
        let mut held_run: Option<(u32, u32)> = None;
        for (expected, chunk) in (0u32..).zip(chunks) {
            let chunk = chunk?;
            let (idx, key) = match &chunk {
                Chunk::Held { idx, hash } | Chunk::New { idx, hash, .. } => (*idx, *hash),
            };
            if idx != expected {
                return Err(Error::Bug(format!(
                    "chunk {idx} came where chunk {expected} was due"
                )));
            }
            chunked.push_chunk(&key);
            if !matches!(chunk, Chunk::Held { .. })
                && let Some((first, last)) = held_run.take()
            {
                self.copy_held_rows(number, first, last)?;
            }
            let hashes = match chunk {
                // Repairs only: nothing to write for a chunk held as it is.
                Chunk::Held { .. } if same => continue,
                Chunk::Held { .. } => {
                    if self.held_keys.get(idx as usize) != Some(&key) {
                        return Err(Error::Bug(format!(
                            "chunk {idx} came as held with a key the replica did not give"
                        )));
                    }
                    if idx == 0 {
                        // Page 1's hash, for the check of the new version's page 1.
                        let blob = self.chunk_hashes(&key)?;
                        if sha256(&blob) != key {
                            return Err(self.refuse_damaged_chunk(idx, &key));
                        }
                        page1 = blob.get(..HASH_BYTES).and_then(|h| h.try_into().ok());
                    }
                    held_run = Some(held_run.map_or((idx, idx), |(first, _)| (first, idx)));
                    seen += chunk_pages(idx, page_count).count() as u32;
                    one = None;
                    continue;
                }
                Chunk::New { hashes, .. } => {
                    // The hashes came back through the engine's spill file: what is
                    // stored under `key` must be what `key` is the hash of, as the
                    // tree path recomputes both digests from what it writes.
                    if sha256(&hashes) != key {
                        return Err(Error::Verification(format!(
                            "chunk {idx} of the new version of {} changed between its check \
                             and its write (the temporary spill file); nothing was stored",
                            self.replica
                        )));
                    }
                    let first = idx * CHUNK_PAGES as u32;
                    for (j, h) in hashes.chunks_exact(HASH_BYTES).enumerate() {
                        let h: Hash = h.try_into().expect("chunks_exact yields 32-byte slices");
                        self.index_fresh(first + j as u32 + 1, &h, &mut counts)?;
                    }
                    if !same {
                        self.insert_chunk(number, idx, &key, Some(&hashes))?;
                    }
                    hashes
                }
            };
            for h in hashes.chunks_exact(HASH_BYTES) {
                let h: Hash = h.try_into().expect("chunks_exact yields 32-byte slices");
                seen += 1;
                if seen == 1 {
                    page1 = Some(h);
                }
                if let Some(one) = &mut one {
                    one.push(&h);
                }
            }
        }
        if let Some((first, last)) = held_run {
            self.copy_held_rows(number, first, last)?;
        }
        if !same {
            if seen != page_count {
                return Err(Error::Protocol(format!(
                    "manifest has {seen} pages, expected {page_count}"
                )));
            }
            match chunked.finish() {
                Some(chunked) if chunked == *digest => {
                    let one = one.and_then(Digest::finish);
                    self.set_digests(number, one.as_ref(), &chunked)?
                }
                _ => {
                    return Err(Error::Bug(
                        "the manifest written does not have the digest the engine checked".into(),
                    ));
                }
            }
        }
        self.finish_version(same, page1, page_count, counts)
    }

    /// The page hashes of the stored chunk `key`.
    fn chunk_hashes(&self, key: &Hash) -> Result<Vec<u8>> {
        self.conn
            .prepare_cached("SELECT hashes FROM chunks WHERE hash = ?1")
            .and_then(|mut s| s.query_row([&key[..]], |r| r.get(0)).optional())
            .map_err(sql(&self.file))?
            .ok_or_else(|| {
                Error::Verification(format!(
                    "a manifest chunk of {}'s latest version is missing; nothing was stored \
                     (`sqlferry scrub` finds every such chunk)",
                    self.replica
                ))
            })
    }

    /// The refusal of a push that found chunk `idx` (key `key`) of the latest version
    /// damaged at COMMIT, too late to have its pages sent: nothing of this push is kept,
    /// and the chunk is recorded (from a connection of its own, once this push's write
    /// lock is gone), so that the next push takes no shortcut over it and stores it
    /// whole again.
    fn refuse_damaged_chunk(&mut self, idx: u32, key: &Hash) -> Error {
        self.pages.rollback();
        if !self.conn.is_autocommit()
            && let Err(e) = self.conn.execute_batch("ROLLBACK")
        {
            return Error::sqlite(&self.file, e);
        }
        if let Err(e) = record_bad_pages(&self.file, &[*key]) {
            tracing::warn!(replica = %self.replica, error = %e, "could not record a damaged chunk");
        }
        let latest = self.latest.as_ref();
        Error::Verification(format!(
            "{}@{} is damaged in the store: {}; nothing was stored, and the next push of the database repairs it",
            self.replica,
            latest.map_or(0, |v| v.number),
            damaged_chunk(idx, latest.map_or(0, |v| v.page_count)).problem
        ))
    }

    /// Whether version `number` uses a page or chunk recorded as damaged. Recorded
    /// damage blocks the shortcuts only where the latest version uses it (a page or chunk
    /// of older versions alone is never resent), so its chunks are read, and checked
    /// against their keys, to see; only while damage is recorded (`sqlferry scrub`
    /// forgets what no version uses any more).
    fn uses_bad(&self, number: u64) -> Result<bool> {
        let bad = &self.bad;
        let uses = std::cell::Cell::new(false);
        for_each_hash(
            &self.conn,
            &self.file,
            number,
            &mut |_, _| {
                // A chunk that is damaged, recorded or not, is resent as well.
                uses.set(true);
                Ok(())
            },
            &mut |_, h| {
                if bad.contains(&h) {
                    uses.set(true);
                }
                Ok(())
            },
        )?;
        if uses.get() {
            return Ok(true);
        }
        let keys = self
            .conn
            .prepare_cached("SELECT chunk FROM manifest WHERE version = ?1")
            .and_then(|mut s| {
                s.query_map([number as i64], |r| r.get::<_, Vec<u8>>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(sql(&self.file))?;
        Ok(keys.iter().any(|k| bad.contains(&chunk_key(Some(k)))))
    }

    /// Names chunk `key` as chunk `idx` of version `number`, storing its page hashes
    /// first when given (a chunk already stored is kept as it is).
    fn insert_chunk(&self, number: u64, idx: u32, key: &Hash, hashes: Option<&[u8]>) -> Result<()> {
        if let Some(hashes) = hashes {
            // `key` is the SHA-256 of `hashes` (checked by the caller), so a stored row
            // under `key` that differs is damaged: this write heals it, for every
            // version that names it, instead of naming the damage again.
            self.conn
                .prepare_cached(
                    "INSERT INTO chunks(hash, hashes) VALUES (?1, ?2)
                     ON CONFLICT(hash) DO UPDATE SET hashes = excluded.hashes
                     WHERE hashes IS NOT excluded.hashes",
                )
                .and_then(|mut s| s.execute(params![&key[..], hashes]))
                .map_err(sql(&self.file))?;
            if self.bad.contains(key) {
                // A chunk recorded as damaged, now whole again.
                self.conn
                    .prepare_cached("DELETE FROM bad_pages WHERE hash = ?1")
                    .and_then(|mut s| s.execute([&key[..]]))
                    .map_err(sql(&self.file))?;
            }
        }
        self.conn
            .prepare_cached("INSERT INTO manifest(version, idx, chunk) VALUES (?1, ?2, ?3)")
            .and_then(|mut s| s.execute(params![number as i64, idx, &key[..]]))
            .map_err(sql(&self.file))?;
        Ok(())
    }

    /// Names chunks `first..=last` of `latest` as the same chunks of version `number`:
    /// their manifest rows copied in one statement (a 10 GiB database has 2,560 chunks,
    /// and a push that changed a few copies nearly all of them). Each key was checked
    /// against `held_keys`, read from these rows in this transaction.
    fn copy_held_rows(&self, number: u64, first: u32, last: u32) -> Result<()> {
        let latest = self.latest.as_ref().map_or(0, |v| v.number);
        let copied = self
            .conn
            .prepare_cached(
                "INSERT INTO manifest(version, idx, chunk)
                 SELECT ?1, idx, chunk FROM manifest
                 WHERE version = ?2 AND idx BETWEEN ?3 AND ?4",
            )
            .and_then(|mut s| s.execute(params![number as i64, latest as i64, first, last]))
            .map_err(sql(&self.file))?;
        if copied != (last - first + 1) as usize {
            return Err(Error::Bug(format!(
                "copied {copied} manifest rows of {}@{latest} for its chunks {first}–{last}",
                self.replica
            )));
        }
        Ok(())
    }

    /// The row of version `number`, first (its manifest rows refer to it), its
    /// digests set by [`VersionWriter::set_digests`] once the manifest made them.
    fn insert_version(&self, number: u64, page_count: u32) -> Result<()> {
        // A merge's candidate records the version its push was based on and the
        // merge's number; every other version the latest it was made onto.
        let latest = self.latest.as_ref().map_or(0, |b| b.number);
        let (base, message, merged_into) = match &self.candidate {
            Some(c) if c.number.is_none() => (c.base, &c.message, Some(number + 1)),
            _ => (latest, &self.options.message, None),
        };
        // One time for both versions of a merge, so `@TIME` never names the
        // candidate alone.
        let created_at = match self.candidate() {
            Some(candidate) => self
                .conn
                .query_row(
                    "SELECT created_at FROM versions WHERE number = ?1",
                    [candidate as i64],
                    |r| r.get(0),
                )
                .map_err(sql(&self.file))?,
            None => crate::epoch::now(),
        };
        self.conn
            .execute(
                &format!(
                    "INSERT INTO versions({VERSION_COLUMNS}) VALUES (?1,?2,?3,X'',?4,?5,?6,?7,?8)"
                ),
                params![
                    number as i64,
                    self.page_size,
                    page_count,
                    message,
                    created_at,
                    self.options.client_id,
                    self.options.key_id,
                    base as i64,
                ],
            )
            .map_err(sql(&self.file))?;
        if self.sealed {
            // The columns are there: `begin` added them for a sealed push.
            let seal = self.seal.as_deref().ok_or_else(|| {
                Error::Protocol("COMMIT of a sealed push without the version's SEAL".into())
            })?;
            self.conn
                .execute(
                    "UPDATE versions SET encryption_key_id = ?2, seal = ?3 WHERE number = ?1",
                    params![number as i64, self.options.encryption, seal],
                )
                .map_err(sql(&self.file))?;
        }
        if let Some(merge) = merged_into {
            // Only a candidate names the column (`begin` added it to a file made
            // before candidates were kept; other pushes leave such a file as it is).
            self.conn
                .execute(
                    "UPDATE versions SET merged_into = ?2 WHERE number = ?1",
                    params![number as i64, merge as i64],
                )
                .map_err(sql(&self.file))?;
        }
        Ok(())
    }

    /// Records both digests of version `number`.
    fn set_digests(&self, number: u64, one: Option<&Hash>, chunked: &Hash) -> Result<()> {
        self.conn
            .execute(
                "UPDATE versions SET digest = ?1, digest2 = ?2 WHERE number = ?3",
                params![one.map_or(&[][..], |d| &d[..]), &chunked[..], number as i64],
            )
            .map_err(sql(&self.file))?;
        Ok(())
    }

    /// Indexes page `pgno` (hash `h`) of the result if this push appended it:
    /// what this push appended and the result uses is indexed; the rest never is.
    /// Counts it in `indexed`, or in `raced` when another push (of another replica)
    /// indexed the page first, while this one ran: the version uses that copy.
    fn index_fresh(
        &mut self,
        pgno: u32,
        h: &Hash,
        (indexed, raced): &mut (u64, u64),
    ) -> Result<()> {
        let Some(pack) = self.appender.as_ref().map(Appender::id) else {
            return Ok(());
        };
        if self.fresh == 0 || !self.was_written(pgno) {
            return Ok(());
        }
        let at: Option<(i64, u32, i64, Option<Vec<u8>>)> = self
            .conn
            .prepare_cached(
                "SELECT offset, len, codec, checksum FROM temp.fresh WHERE hash = ?1 AND repair = 0",
            )
            .and_then(|mut s| {
                s.query_row([&h[..]], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .optional()
            })
            .map_err(sql(&self.file))?;
        if let Some((offset, len, codec, checksum)) = at {
            let loc = Loc::from_row(pack, offset, len, codec, checksum);
            if self.pages.insert(h, loc, false)? {
                *indexed += 1;
            } else {
                *raced += 1;
            }
        }
        Ok(())
    }

    /// After the version's rows: indexes the new bytes of damaged pages, cuts what the
    /// version does not use out of the pack, and checks the new version's page 1.
    fn finish_version(
        &mut self,
        same: bool,
        page1: Option<Hash>,
        page_count: u32,
        (indexed, raced): (u64, u64),
    ) -> Result<()> {
        let file = self.file.clone();
        let pack = self.appender.as_ref().map(Appender::id);
        // New bytes for damaged pages: indexed whether or not this version uses them
        // (the versions that do are older).
        if let Some(pack) = pack
            && self.repaired > 0
        {
            type Repair = (Vec<u8>, i64, u32, i64, Option<Vec<u8>>);
            let repairs: Vec<Repair> = {
                let mut stmt = self
                    .conn
                    .prepare(
                        "SELECT hash, offset, len, codec, checksum FROM temp.fresh WHERE repair = 1",
                    )
                    .map_err(sql(&file))?;
                let rows = stmt
                    .query_map([], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                    })
                    .map_err(sql(&file))?;
                rows.collect::<rusqlite::Result<_>>().map_err(sql(&file))?
            };
            for (h, offset, len, codec, checksum) in repairs {
                if let Ok(h) = Hash::try_from(h.as_slice()) {
                    let loc = Loc::from_row(pack, offset, len, codec, checksum);
                    self.pages.insert(&h, loc, true)?;
                }
            }
        }
        if indexed < self.fresh {
            self.drop_unused()?;
            if indexed + raced < self.fresh {
                tracing::warn!(replica = %self.replica, pages = self.fresh - indexed - raced, "pages the push sent but its version does not use were not kept");
            } else {
                tracing::debug!(replica = %self.replica, pages = raced, "pages a concurrent push stored first: that copy is used");
            }
        }
        // A sealed page 1 cannot be read here: the client checked its header before it
        // sealed it, the one check of it left (docs/security.md).
        if !same && !self.sealed {
            let page1 = page1.ok_or_else(|| Error::Protocol("a version without pages".into()))?;
            self.check_page1(&page1, page_count)?;
        }
        Ok(())
    }

    /// Links a new replica's private file into place, now that its first version is
    /// committed. `link` never replaces: if another push created the replica meanwhile,
    /// that one stands and this push is refused.
    ///
    /// Returns the other push's latest version when it holds exactly this push's
    /// content: then nothing is lost by standing back, and the push succeeds as
    /// "already at version N" (a first push whose client was killed after COMMIT may
    /// still be publishing on the server when the same client pushes again).
    fn publish(&mut self, ours: &str) -> Result<Option<VersionInfo>> {
        // Everything into the main file, and the file closed, before it is shared.
        self.conn
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .map_err(sql(&self.file))?;
        let closed = std::mem::replace(
            &mut self.conn,
            Connection::open_in_memory().map_err(sql(&self.file))?,
        );
        closed.close().map_err(|(_, e)| sql(&self.file)(e))?;
        match std::fs::hard_link(&self.file, &self.final_file) {
            Ok(()) => {
                // The new name is durable before the client hears of the version: the
                // file's bytes were synced by the checkpoint, its link is the
                // directory's.
                let dir = self
                    .final_file
                    .parent()
                    .expect("a replica file has a directory");
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| Error::io(dir, e))?;
                leave_wal(&self.final_file);
                Ok(None)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let theirs = versions(&self.final_file, &self.replica)
                    .ok()
                    .and_then(|v| v.into_iter().last());
                match theirs {
                    Some(v) if v.digest == ours => Ok(Some(v)),
                    _ => Err(Error::InUse(format!(
                        "{} was created by another push at the same time, with other content; \
                         pull it into another file to compare, or push again with --force to \
                         replace it",
                        self.replica
                    ))),
                }
            }
            Err(e) => Err(Error::io(&self.final_file, e)),
        }
    }
}

/// Leaves the replica file just linked into place with its (empty) WAL and `-shm`, as
/// every later push leaves them ([`crate::page::kept_wal`]): one read through a
/// connection that keeps its WAL. The next push's look that writes nothing
/// ([`open_peek`]) cannot read a WAL file that is not there, and its fallback reader
/// would make them then, in a push that changes nothing. Best effort.
fn leave_wal(file: &Path) {
    let made = Connection::open(file).and_then(|conn| {
        crate::page::kept_wal::keep_wal_on_close(&conn)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
    });
    if let Err(e) = made {
        tracing::debug!(file = %file.display(), error = %e, "could not leave the new replica's WAL in place");
    }
}

impl Drop for VersionWriter {
    fn drop(&mut self) {
        // The private file of a new replica goes (its TempPath removes it, then its lock
        // is released); so do its WAL and shared-memory files, once the connection is
        // closed (rolling back).
        if let Some(c) = &self.creating {
            if let Ok(memory) = Connection::open_in_memory() {
                drop(std::mem::replace(&mut self.conn, memory));
            }
            for suffix in ["-wal", "-shm"] {
                let mut p = c.path.as_os_str().to_owned();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// One version, opened for reading: the engine's page source for a pull.
///
/// It reads inside one read transaction, so a push landing meanwhile changes nothing
/// it sees (versions are immutable anyway).
pub struct VersionReader {
    conn: Connection,
    pages: Pages,
    file: PathBuf,
    replica: ReplicaPath,
    info: VersionInfo,
    /// The manifest chunk last used by `read_page`: (chunk index, its hashes).
    chunk: Option<(u32, Vec<u8>)>,
    /// Where a page stored compressed is handed on as it is stored, for a peer that
    /// takes it so (see [`VersionReader::hand_packed`]).
    packed: Option<PackedPages>,
    /// The file has place hints (`place`): a scan reads its pages where they say.
    hints: bool,
    /// Pages read through a hint, and those whose hinted bytes did not check and were
    /// read again through the index, by the last scan.
    hinted: (u64, u64),
    /// The seal of an encrypted version: its pages are sealed, and it is relayed as
    /// it is stored ([`VersionReader::relay`]).
    seal: Option<Vec<u8>>,
    /// The store's GC lock, held shared for the whole read (dropped last).
    _gc: GcShared,
}

/// The version `selector` names, read inside the caller's transaction on `replica`'s
/// file, with its chunked digest and key id: what a pull opens, and all that
/// [`resolve`] answers. Refused (not found, removed by retention) as a pull is.
fn select(
    conn: &Connection,
    file: &Path,
    replica: &ReplicaPath,
    selector: Selector,
) -> Result<VersionInfo> {
    let latest = latest(conn, file)?.ok_or_else(|| not_found(replica))?;
    let number = match selector {
        Selector::Latest => latest.number,
        Selector::Number(n) => n,
        Selector::LatestMinus(n) => Selector::latest_minus(replica, latest.number, n)?,
        Selector::At(t) => {
            let kept = conn
                .query_row(
                    "SELECT max(number) FROM versions WHERE created_at <= ?1",
                    [t],
                    |r| r.get::<_, Option<i64>>(0),
                )
                .map_err(sql(file))?
                .map(|n| n as u64);
            // The version current then may be one retention removed: then an older
            // kept one would be the wrong content, so the pull is refused.
            let gone = retention::removed_at(conn, file, t)?;
            match (kept, gone) {
                (k, Some(g)) if k.is_none_or(|k| g > k) => {
                    return Err(no_version(conn, file, replica, g, latest.number));
                }
                (Some(k), _) => k,
                (None, _) => {
                    return Err(Error::NotFound(format!(
                        "{replica}@{selector} does not exist: no version is that old"
                    )));
                }
            }
        }
    };
    let mut info = conn
        .query_row(
            &format!("SELECT {VERSION_COLUMNS} FROM versions WHERE number = ?1"),
            [number as i64],
            version_row,
        )
        .optional()
        .map_err(sql(file))?
        .ok_or_else(|| no_version(conn, file, replica, number, latest.number))?;
    add_digest2(conn, file, &mut info)?;
    Ok(info)
}

/// Which version `selector` names in `replica`'s file, without opening the store's
/// pages: a look-up in one read transaction (`AnyStore::resolve`).
pub(super) fn resolve(
    file: &Path,
    replica: &ReplicaPath,
    selector: Selector,
) -> Result<VersionInfo> {
    let conn = open_existing(file, replica)?;
    conn.execute_batch("BEGIN DEFERRED").map_err(sql(file))?;
    select(&conn, file, replica, selector)
}

impl VersionReader {
    pub(super) fn open(
        file: &Path,
        pages_dir: &Path,
        replica: &ReplicaPath,
        selector: Selector,
        gc: GcShared,
    ) -> Result<Self> {
        let conn = open_existing(file, replica)?;
        conn.execute_batch("BEGIN DEFERRED").map_err(sql(file))?;
        let info = select(&conn, file, replica, selector)?;
        // Refused before a page is sent: a manifest short of chunks would otherwise
        // surface as the engine's "page count changed" half-way through the pull.
        if let Some(damage) = manifest_damage(&conn, file, info.number, info.page_count)? {
            return Err(damaged_version(replica, info.number, &damage));
        }
        let seal = match sealing_of(&conn, file, info.number)? {
            None => None,
            Some((_, Some(seal))) => Some(seal),
            Some((id, None)) => {
                return Err(Error::Verification(format!(
                    "version {} of {replica} is encrypted (key id {id}) and its seal is missing in the store; it cannot be pulled",
                    info.number
                )));
            }
        };
        // A sealed page is read where its hint says only when the hint carries the
        // entry's sum (hints written since sums; `Fetch::matches` refuses a sealed
        // version's page through an older hint, which is then looked up in the index).
        let hints = place::has_places(&conn, file)?;
        Ok(VersionReader {
            conn,
            pages: {
                let pages = Pages::open(pages_dir, pack::READER_CACHE_KIB)?;
                // One snapshot for the whole read: no locking per page.
                pages.begin_read()?;
                pages
            },
            file: file.to_owned(),
            replica: replica.clone(),
            info,
            chunk: None,
            packed: None,
            hints,
            hinted: (0, 0),
            seal,
            _gc: gc,
        })
    }

    /// For an encrypted version: how the engine relays it, its stored seal sent as it
    /// is, like its sealed pages (`OriginOptions::sealing`); `None` for a plaintext one.
    pub fn relay(&self) -> Option<Sealing<'static>> {
        self.seal.clone().map(|seal| Sealing::Relay { seal })
    }

    /// How many pages the last [`PageSource::scan`] read where a place hint said, and
    /// how many of those it read again through the page index because the hinted bytes
    /// did not check (a stale hint).
    pub fn hinted(&self) -> (u64, u64) {
        self.hinted
    }

    /// The version being read.
    pub fn info(&self) -> &VersionInfo {
        &self.info
    }

    /// Hands each page read that is stored compressed to `packed` too, as it is stored
    /// (after expanding it and checking it against its hash, as every read does), for
    /// a transport that sends it so. A page stored plain clears it.
    pub fn hand_packed(&mut self, packed: PackedPages) {
        self.packed = Some(packed);
    }
}

/// What a reader needs to fetch and check one page, apart from the manifest.
struct Fetch<'a> {
    pages: &'a mut Pages,
    /// The version is encrypted: its entries must be sealed ones, checked against
    /// their checksums, never hashed as pages.
    sealed: bool,
    file: &'a Path,
    replica: &'a ReplicaPath,
    version: u64,
    packed: Option<&'a PackedPages>,
    /// Pages whose hinted bytes did not check, read again through the index.
    stale: u64,
}

impl Fetch<'_> {
    /// Reads page `pgno` (stored under `hash`) into `buf`, and checks it against its
    /// hash: a damaged or missing page is recorded for repair and is an error, never
    /// data.
    fn page(&mut self, pgno: u32, hash: &Hash, buf: &mut Vec<u8>) -> Result<()> {
        let loc = self.pages.lookup(hash)?;
        self.page_at(pgno, hash, loc, buf)
    }

    /// [`Fetch::page`] for a page whose entry was looked up already (`None`: not
    /// indexed).
    fn page_at(
        &mut self,
        pgno: u32,
        hash: &Hash,
        loc: Option<Loc>,
        buf: &mut Vec<u8>,
    ) -> Result<()> {
        self.try_page_at(pgno, hash, loc, buf, false).map(drop)
    }

    /// [`Fetch::page_at`] for the place `loc` a hint gave (`hinted`): bytes there that
    /// do not check are read again where the index says, and only that read decides
    /// whether the page is damaged or missing.
    fn hinted_page_at(
        &mut self,
        pgno: u32,
        hash: &Hash,
        loc: Option<Loc>,
        buf: &mut Vec<u8>,
        hinted: bool,
    ) -> Result<()> {
        if !self.try_page_at(pgno, hash, loc, buf, hinted)? {
            self.page(pgno, hash, buf)?;
        }
        Ok(())
    }

    /// Reads and checks page `pgno` at `loc`; with `hinted`, bytes that do not check
    /// are `Ok(false)` (nothing recorded), else an error as [`Fetch::checked`] says.
    fn try_page_at(
        &mut self,
        pgno: u32,
        hash: &Hash,
        loc: Option<Loc>,
        buf: &mut Vec<u8>,
        hinted: bool,
    ) -> Result<bool> {
        let loc = loc.map(|l| l.for_page(pgno));
        let Some(handed) = self.packed else {
            let found = match loc {
                Some(loc) => self.pages.read(loc, buf)?,
                None => false,
            };
            return self.check(pgno, hash, loc, buf, found, hinted);
        };
        handed.set(None);
        let mut bytes = Vec::new();
        let found = match loc {
            Some(loc) => self.pages.read_keeping(loc, buf, Some(&mut bytes))?,
            None => false,
        };
        if !self.check(pgno, hash, loc, buf, found, hinted)? {
            return Ok(false);
        }
        if !bytes.is_empty() {
            handed.set(Some(PackedPage {
                pgno,
                fingerprint: fingerprint(buf),
                bytes,
            }));
        }
        Ok(true)
    }

    /// Checks the entry `raw` (stored at `loc`, read as part of a run) as page `pgno`
    /// under `hash`, and hands the page to `f`: a plain entry as it lies in the run's
    /// buffer (no copy), a compressed one expanded into `page` (and its stored bytes
    /// handed on, as [`Fetch::page`] does).
    fn entry(
        &mut self,
        (pgno, hash, loc, hinted): (u32, Hash, Loc, bool),
        raw: &[u8],
        page: &mut Vec<u8>,
        f: &mut ScanFn<'_>,
    ) -> Result<()> {
        // The stored bytes' own check first (the run was read unchecked); bytes that
        // fail it are checked as no bytes, which fail as damaged bytes do.
        let loc = loc.for_page(pgno);
        let intact = loc.holds(raw) != Some(false);
        if !loc.zstd {
            let stored = if intact { raw } else { &[][..] };
            if !self.check(pgno, &hash, Some(loc), stored, true, hinted)? {
                self.page(pgno, &hash, page)?;
                return f(pgno, hash, Some(page));
            }
            if let Some(handed) = self.packed {
                handed.set(None);
            }
            return f(pgno, hash, Some(raw));
        }
        if intact {
            self.pages.pack_files().expand(raw, page);
        } else {
            page.clear();
        }
        if !self.check(pgno, &hash, Some(loc), page, true, hinted)? {
            self.page(pgno, &hash, page)?;
            return f(pgno, hash, Some(page));
        }
        if let Some(handed) = self.packed {
            handed.set(Some(PackedPage {
                pgno,
                fingerprint: fingerprint(page),
                bytes: raw.to_vec(),
            }));
        }
        f(pgno, hash, Some(page))
    }

    /// [`Fetch::checked`], except that bytes read where a hint said (`hinted`) that do
    /// not check are `Ok(false)`: the hint is stale, the page is to be read again
    /// through the index, and nothing is recorded.
    fn check(
        &mut self,
        pgno: u32,
        hash: &Hash,
        loc: Option<Loc>,
        buf: &[u8],
        found: bool,
        hinted: bool,
    ) -> Result<bool> {
        let good = found && self.matches(pgno, hash, loc, buf);
        if hinted && !good {
            self.stale += 1;
            return Ok(false);
        }
        self.checked(pgno, hash, found, good).map(|()| true)
    }

    /// Whether `buf`, read from entry `loc`, is what the version stores as page `pgno`
    /// under `hash`. Reads check an entry's stored bytes against its sum (or an older
    /// sealed entry's SHA-256) and leave no bytes when they fail ([`pack::PackFiles::read`]),
    /// so such an entry matches when bytes are left; an older plain entry's page
    /// hashes to `hash`. The store cannot open a sealed page: the client checks its
    /// identity. An entry of the other kind (sealed or not) never matches.
    fn matches(&self, pgno: u32, hash: &Hash, loc: Option<Loc>, buf: &[u8]) -> bool {
        let Some(loc) = loc else {
            return false;
        };
        if loc.sealed != self.sealed {
            return false;
        }
        // A sealed page is a page and the seal's nonce and tag: bytes of another length
        // (a plaintext entry a hint was edited to call sealed, its sum intact) are
        // never handed on as one.
        if self.sealed && !crate::protocol::is_sealed_page_len(buf.len()) {
            return false;
        }
        match loc.check {
            Check::Page => page_matches(Some(pgno), hash, buf),
            Check::Sum(_) | Check::Sha(_) => !buf.is_empty(),
        }
    }

    /// `Ok` if the page stored under `hash` was `found` and is `good` (as
    /// [`Fetch::matches`] said); else records it for repair and says so.
    fn checked(&mut self, pgno: u32, hash: &Hash, found: bool, good: bool) -> Result<()> {
        if good {
            return Ok(());
        }
        if let Err(e) = record_bad_pages(self.file, &[*hash]) {
            tracing::warn!(replica = %self.replica, error = %e, "could not record a damaged page");
        }
        // Info, not warn: the error itself carries all of it to whoever asked (one line
        // for a user of the embedded store; a server logs the sessions it ends).
        tracing::info!(replica = %self.replica, version = self.version, page = pgno, hash = %hex(hash), "stored page {}", if found { "damaged" } else { "missing" });
        Err(Error::Verification(format!(
            "page {pgno} of {}@{} is {} in the store (hash {}); a push of the same database repairs it, and `sqlferry scrub` finds every such page",
            self.replica,
            self.version,
            if found {
                "damaged: its bytes no longer match their hash"
            } else {
                "missing"
            },
            hex(hash)
        )))
    }
}

/// The pages a scan must send, gathered so that the entries lying end to end in a
/// pack are read with one `pread` (a version pushed whole lies in page order), at most
/// [`RUN_BYTES`] or [`RUN_PAGES`] at a time: the memory a read holds stays bounded.
struct Runs {
    /// Page number, hash, entry (`None`: not indexed) of the pages waiting, and
    /// whether the entry is a hint's (checked, then looked up if it fails).
    pages: Vec<(u32, Hash, Option<Loc>, bool)>,
    /// The stored bytes of the entries waiting.
    bytes: usize,
    /// One run's bytes, as stored.
    raw: Vec<u8>,
    /// One page, read alone or expanded.
    page: Vec<u8>,
}

/// Stored bytes a scan gathers before it reads them. Each pull on a server holds a
/// buffer this large: 256 KiB made 100 concurrent pulls peak 18 MiB higher (88 MiB
/// against 70 MiB); at 64 KiB a read per 16 pages is still a small part of a pull's
/// reads (the page index's leaves are one per page).
const RUN_BYTES: usize = 64 * 1024;

/// Pages a scan gathers before it reads them.
const RUN_PAGES: usize = 16;

impl Runs {
    fn new(page_size: u32) -> Runs {
        Runs {
            pages: Vec::with_capacity(RUN_PAGES),
            bytes: 0,
            raw: Vec::new(),
            page: Vec::with_capacity(page_size as usize),
        }
    }

    /// Adds page `pgno` to those waiting; reads, checks and hands on every page
    /// waiting (`f`) once they fill a read.
    fn add(
        &mut self,
        (pgno, hash, hint): (u32, Hash, Option<Loc>),
        fetch: &mut Fetch<'_>,
        f: &mut ScanFn<'_>,
    ) -> Result<()> {
        let (loc, hinted) = match hint {
            Some(loc) => (Some(loc), true),
            None => (fetch.pages.lookup(&hash)?, false),
        };
        self.bytes += loc.map_or(0, |l| l.len as usize);
        self.pages.push((pgno, hash, loc, hinted));
        if self.bytes >= RUN_BYTES || self.pages.len() >= RUN_PAGES {
            self.flush(fetch, f)?;
        }
        Ok(())
    }

    /// Reads, checks and hands on (`f`) every page waiting, in page order.
    fn flush(&mut self, fetch: &mut Fetch<'_>, f: &mut ScanFn<'_>) -> Result<()> {
        let pages = std::mem::take(&mut self.pages);
        self.bytes = 0;
        let mut i = 0;
        while i < pages.len() {
            // The longest stretch from `i` whose entries lie end to end in one pack.
            let mut j = i + 1;
            if let (_, _, Some(first), _) = pages[i] {
                let mut end = first.offset + u64::from(first.len);
                while let Some(&(_, _, Some(next), _)) = pages.get(j) {
                    if next.pack != first.pack || next.offset != end {
                        break;
                    }
                    end += u64::from(next.len);
                    j += 1;
                }
                let span = Loc {
                    len: (end - first.offset) as u32,
                    zstd: false,
                    sealed: false,
                    check: Check::Page,
                    ..first
                };
                if j - i > 1 && fetch.pages.pack_files().read_raw(span, &mut self.raw)? {
                    let mut at = 0usize;
                    for &(pgno, hash, loc, hinted) in &pages[i..j] {
                        let loc = loc.expect("a run holds indexed entries");
                        let raw = &self.raw[at..at + loc.len as usize];
                        at += loc.len as usize;
                        fetch.entry((pgno, hash, loc, hinted), raw, &mut self.page, f)?;
                    }
                    i = j;
                    continue;
                }
                // One entry, or a run cut short (bytes gone): page by page, so the
                // error names the page that is missing.
            }
            for &(pgno, hash, loc, hinted) in &pages[i..j] {
                fetch.hinted_page_at(pgno, &hash, loc, &mut self.page, hinted)?;
                f(pgno, hash, Some(&self.page))?;
            }
            i = j;
        }
        // The list's buffer is kept for the next read.
        self.pages = pages;
        self.pages.clear();
        Ok(())
    }
}

impl PageSource for VersionReader {
    fn page_size(&self) -> u32 {
        self.info.page_size
    }

    fn page_count(&self) -> u32 {
        self.info.page_count
    }

    fn scan(&mut self, with_data_after: u32, f: &mut ScanFn<'_>) -> Result<()> {
        let lock_page = lock_byte_page(self.info.page_size);
        let zeros = vec![0u8; self.info.page_size as usize];
        let mut runs = Runs::new(self.info.page_size);
        let mut fetch = Fetch {
            pages: &mut self.pages,
            sealed: self.seal.is_some(),
            file: &self.file,
            replica: &self.replica,
            version: self.info.number,
            packed: self.packed.as_ref(),
            stale: 0,
        };
        let refuse = refuse_damaged(&self.file, &self.replica, &self.info);
        let mut hint = place::Hint::new();
        let mut hinted = 0u64;
        // Each chunk's hashes with its place hint (none in a file made before hints,
        // or for a chunk no push of this binary wrote yet): a page with a place is
        // read there, one without is looked up in the index.
        let file = &self.file;
        let mut stmt = self
            .conn
            .prepare_cached(if self.hints {
                "SELECT c.hashes, p.runs, m.idx, m.chunk FROM manifest m
                 JOIN chunks c ON c.hash = m.chunk LEFT JOIN places p ON p.chunk = m.chunk
                 WHERE m.version = ?1 ORDER BY m.idx"
            } else {
                "SELECT c.hashes, NULL, m.idx, m.chunk FROM manifest m
                 JOIN chunks c ON c.hash = m.chunk WHERE m.version = ?1 ORDER BY m.idx"
            })
            .map_err(sql(file))?;
        let mut rows = stmt.query([self.info.number as i64]).map_err(sql(file))?;
        let mut pgno = 0u32;
        let scanned = (|| {
            while let Some(row) = rows.next().map_err(sql(file))? {
                let blob = row
                    .get_ref(0)
                    .map_err(sql(file))?
                    .as_blob()
                    .map_err(|e| sql(file)(e.into()))?;
                // Each chunk of page hashes is checked against its key before use.
                let key = chunk_key(row.get_ref(3).map_err(sql(file))?.as_blob().ok());
                if key != sha256(blob) {
                    return Err(refuse(row.get(2).map_err(sql(file))?, &key));
                }
                let runs_blob = row
                    .get_ref(1)
                    .map_err(sql(file))?
                    .as_blob_or_null()
                    .map_err(|e| sql(file)(e.into()))?;
                hint.load(runs_blob, blob.len() / HASH_BYTES);
                for (j, h) in blob.chunks_exact(HASH_BYTES).enumerate() {
                    pgno += 1;
                    let hash: Hash = h.try_into().expect("chunks_exact yields 32-byte slices");
                    if pgno > with_data_after && pgno != lock_page {
                        let place = hint.get(j);
                        hinted += u64::from(place.is_some());
                        runs.add((pgno, hash, place), &mut fetch, f)?;
                        continue;
                    }
                    // In page order: the pages waiting go first.
                    runs.flush(&mut fetch, f)?;
                    if pgno <= with_data_after {
                        f(pgno, hash, None)?;
                    } else {
                        f(pgno, hash, Some(&zeros))?;
                    }
                }
            }
            runs.flush(&mut fetch, f)
        })();
        self.hinted = (hinted, fetch.stale);
        if fetch.stale > 0 {
            tracing::debug!(replica = %self.replica, version = self.info.number, pages = fetch.stale, "stale place hints: read through the page index");
        }
        scanned
    }

    fn read_page(&mut self, pgno: u32, buf: &mut Vec<u8>) -> Result<()> {
        let refuse = refuse_damaged(&self.file, &self.replica, &self.info);
        let hash = manifest_hash(
            &self.conn,
            &self.file,
            self.info.number,
            pgno,
            &mut self.chunk,
            &mut |idx, key| Err(refuse(idx, key)),
        )?
        .ok_or_else(|| Error::Verification(format!("manifest has no page {pgno}")))?;
        Fetch {
            pages: &mut self.pages,
            sealed: self.seal.is_some(),
            file: &self.file,
            replica: &self.replica,
            version: self.info.number,
            packed: self.packed.as_ref(),
            stale: 0,
        }
        .page(pgno, &hash, buf)
    }

    /// A stored version offers no chunk hashes (yet): a pull from the store compares
    /// and sends by page, which costs lookups in the store, not reads of page data.
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

/// The refusal of a pull of version `number`, which the replica does not hold: never
/// made, or removed by its retention policy (numbers are never reused, so a missing
/// number below the latest was removed). Names the versions that exist.
fn no_version(
    conn: &Connection,
    file: &Path,
    replica: &ReplicaPath,
    number: u64,
    latest: u64,
) -> Error {
    let numbers: Vec<u64> = conn
        .prepare("SELECT number FROM versions ORDER BY number")
        .and_then(|mut s| {
            s.query_map([], |r| r.get::<_, i64>(0).map(|n| n as u64))?
                .collect::<rusqlite::Result<_>>()
        })
        .unwrap_or_else(|e| {
            tracing::warn!(file = %file.display(), error = %e, "could not list the versions");
            Vec::new()
        });
    let have = number_ranges(&numbers);
    if number < latest {
        Error::NotFound(format!(
            "{replica}@{number} was removed by the replica's retention policy; the versions kept are {have}"
        ))
    } else {
        Error::NotFound(format!(
            "{replica}@{number} does not exist: the latest version is {latest}; the versions are {have}"
        ))
    }
}

/// `1, 3 to 5, 9`: ascending numbers as runs, for messages; at most the last 20 runs.
pub fn number_ranges(numbers: &[u64]) -> String {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &n in numbers {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == n => *end = n,
            _ => runs.push((n, n)),
        }
    }
    const SHOWN: usize = 20;
    let skipped = runs.len().saturating_sub(SHOWN);
    let mut parts: Vec<String> = runs[skipped..]
        .iter()
        .map(|&(a, b)| match b - a {
            0 => a.to_string(),
            1 => format!("{a}, {b}"),
            _ => format!("{a} to {b}"),
        })
        .collect();
    if skipped > 0 {
        parts.insert(0, "…".into());
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// Brings a replica file made by an earlier layout to this one, once, on its first
/// open for a push or a pull, under the replica's write lock; cheap when there is
/// nothing to do (a read of its schema and versions):
/// - pages kept in the file (a `pages` table of its own) move into the store's packs;
/// - versions without their chunked digest (`versions.digest2`, a column added if the
///   file has none) get it from their manifest rows alone: the rows' keys are the
///   chunk hashes, so no page and no chunk is read. A push (`for_push`) needs it to
///   compare its result with the latest version, and fails if it cannot be written; a
///   pull needs nothing of it, so for a pull it is best effort (a store it may only
///   read, or a push holding the replica for more than a few seconds, leaves it to
///   the next push).
pub(super) fn upgrade(file: &Path, pages_dir: &Path, for_push: bool) -> Result<()> {
    if !file.exists() {
        return Ok(());
    }
    move_pages(file, pages_dir)?;
    match fill_digest2(
        file,
        if for_push {
            BUSY_TIMEOUT
        } else {
            RECORD_BUSY_TIMEOUT
        },
    ) {
        Err(e) if !for_push => {
            tracing::info!(file = %file.display(), error = %e, "could not record the chunked digests yet");
            Ok(())
        }
        done => done,
    }
}

/// Whether the replica file open on `conn` has versions without a chunked digest (or
/// no column for it).
fn lacks_digest2(conn: &Connection, file: &Path) -> Result<bool> {
    let tables: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'versions'",
            [],
            |r| r.get(0),
        )
        .map_err(sql(file))?;
    if tables == 0 {
        return Ok(false);
    }
    if !has_digest2(conn, file)? {
        return Ok(true);
    }
    conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM versions WHERE digest2 IS NULL)",
        [],
        |r| r.get(0),
    )
    .map_err(sql(file))
}

/// Fills `versions.digest2` where it is missing (see [`upgrade`]). A version whose
/// manifest rows do not make a chunked digest (a key that is no hash, or rows missing)
/// gets an empty one, so that the pass runs once: `scrub` reports such a version by
/// its digest 1.
fn fill_digest2(file: &Path, busy: Duration) -> Result<()> {
    {
        let conn = Connection::open_with_flags(
            file,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql(file))?;
        conn.busy_timeout(busy).map_err(sql(file))?;
        if !lacks_digest2(&conn, file)? {
            return Ok(());
        }
    }
    let conn = Connection::open(file).map_err(sql(file))?;
    conn.busy_timeout(busy).map_err(sql(file))?;
    conn.execute_batch("BEGIN IMMEDIATE").map_err(sql(file))?;
    if !lacks_digest2(&conn, file)? {
        return Ok(()); // another process filled them meanwhile (rolled back on drop)
    }
    if !has_digest2(&conn, file)? {
        conn.execute_batch("ALTER TABLE versions ADD COLUMN digest2 BLOB")
            .map_err(sql(file))?;
    }
    let todo: Vec<(i64, u32, u32)> = conn
        .prepare("SELECT number, page_size, page_count FROM versions WHERE digest2 IS NULL")
        .and_then(|mut s| {
            s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<_>>()
        })
        .map_err(sql(file))?;
    let mut keys = conn
        .prepare("SELECT chunk FROM manifest WHERE version = ?1 ORDER BY idx")
        .map_err(sql(file))?;
    for (number, page_size, page_count) in &todo {
        let mut d = ChunkedDigest::new(*page_size, *page_count);
        let mut whole = true;
        let mut rows = keys.query([number]).map_err(sql(file))?;
        while let Some(row) = rows.next().map_err(sql(file))? {
            let key: Vec<u8> = row.get(0).map_err(sql(file))?;
            match Hash::try_from(key.as_slice()) {
                Ok(k) => d.push_chunk(&k),
                Err(_) => whole = false,
            }
        }
        let digest2 = d.finish().filter(|_| whole);
        conn.execute(
            "UPDATE versions SET digest2 = ?1 WHERE number = ?2",
            params![digest2.as_ref().map_or(&[][..], |d| &d[..]), number],
        )
        .map_err(sql(file))?;
    }
    drop(keys);
    conn.execute_batch("COMMIT").map_err(sql(file))?;
    tracing::info!(file = %file.display(), versions = todo.len(), "recorded the chunked digest of each version");
    Ok(())
}

/// Moves the pages of a replica file made by the previous layout (a `pages` table of
/// its own) into the store's packs, then drops the table.
fn move_pages(file: &Path, pages_dir: &Path) -> Result<()> {
    let has_pages = |conn: &Connection| -> Result<bool> {
        conn.query_row(
            "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'pages'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )
        .map_err(sql(file))
    };
    {
        let conn = Connection::open_with_flags(
            file,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql(file))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql(file))?;
        if !has_pages(&conn)? {
            return Ok(());
        }
    }
    let conn = Connection::open(file).map_err(sql(file))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sql(file))?;
    conn.execute_batch("BEGIN IMMEDIATE").map_err(sql(file))?;
    if !has_pages(&conn)? {
        return Ok(()); // another process moved them meanwhile
    }
    let pages = Pages::open(pages_dir, pack::WRITER_CACHE_KIB)?;
    let mut appender = pages.appender()?;
    pages.begin()?;
    let mut moved = 0u64;
    let copy = (|| -> Result<()> {
        let mut stmt = conn
            .prepare("SELECT hash, data FROM pages")
            .map_err(sql(file))?;
        let mut rows = stmt.query([]).map_err(sql(file))?;
        while let Some(row) = rows.next().map_err(sql(file))? {
            let key = row.get_ref(0).map_err(sql(file))?.as_blob().ok();
            let data = row.get_ref(1).map_err(sql(file))?.as_blob().ok();
            let (Some(Ok(hash)), Some(data)) = (key.map(Hash::try_from), data) else {
                continue; // a key that is no hash names nothing a manifest can use
            };
            if pages.lookup(&hash)?.is_none() {
                // Moved as it is: a damaged page stays damaged, and scrub or a read
                // finds it as before.
                // Checked by its page's hash, as before the move: a sum of bytes
                // already damaged would hide the damage from every read.
                let loc = Loc {
                    check: Check::Page,
                    ..appender.append(data, false, false)?
                };
                pages.insert(&hash, loc, false)?;
                moved += 1;
            }
        }
        appender.sync()
    })();
    if let Err(e) = copy {
        pages.rollback();
        return Err(e);
    }
    pages.commit(Some(&mut appender))?;
    conn.execute_batch("DROP TABLE pages; COMMIT")
        .map_err(sql(file))?;
    // The page bytes leave the replica file for good: give the space back.
    conn.execute_batch("VACUUM").map_err(sql(file))?;
    tracing::info!(file = %file.display(), pages = moved, "moved a replica's pages into the store's packs");
    Ok(())
}
