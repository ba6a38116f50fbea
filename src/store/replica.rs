//! One replica's SQLite file: pushing a new version into it ([`VersionWriter`], the
//! engine's page target) and reading a version out of it ([`VersionReader`], the
//! engine's page source). The module doc of `store` states the invariants.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use sha2::{Digest as _, Sha256};

use super::{CHUNK_PAGES, PushOptions, ReplicaPath, Selector, VersionInfo};
use crate::engine::{PageSource, PageTarget, ScanFn};
use crate::page::{hex, lock_byte_page};
use crate::protocol::{HASH_BYTES, Hash};
use crate::{Error, Result};

/// How long a second pusher waits for the first to finish before it is told the
/// replica moved (it then gets VERSION_CONFLICT, not "busy").
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// The replica file's schema, created on first push.
const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS pages(
        hash BLOB PRIMARY KEY,
        data BLOB NOT NULL
    );
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
        base INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS manifest(
        version INTEGER NOT NULL REFERENCES versions(number),
        idx INTEGER NOT NULL,
        chunk BLOB NOT NULL REFERENCES chunks(hash),
        PRIMARY KEY(version, idx)
    ) WITHOUT ROWID;
";

fn sql(path: &Path) -> impl Fn(rusqlite::Error) -> Error + '_ {
    move |e| Error::sqlite(path, e)
}

fn not_found(replica: &ReplicaPath) -> Error {
    Error::NotFound(format!("replica {replica} does not exist"))
}

/// Opens a replica file that must exist, read-only.
fn open_existing(file: &Path, replica: &ReplicaPath) -> Result<Connection> {
    if !file.exists() {
        return Err(not_found(replica));
    }
    let conn = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql(file))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sql(file))?;
    Ok(conn)
}

const VERSION_COLUMNS: &str =
    "number, page_size, page_count, digest, message, created_at, client_id, key_id, base";

fn version_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VersionInfo> {
    let page_size: u32 = r.get(1)?;
    let page_count: u32 = r.get(2)?;
    let digest: Vec<u8> = r.get(3)?;
    Ok(VersionInfo {
        number: r.get::<_, i64>(0)? as u64,
        page_size,
        page_count,
        size: u64::from(page_size) * u64::from(page_count),
        digest: digest.iter().map(|b| format!("{b:02x}")).collect(),
        message: r.get(4)?,
        created_at: r.get(5)?,
        client_id: r.get(6)?,
        key_id: r.get(7)?,
        base: r.get::<_, i64>(8)? as u64,
    })
}

/// Every version of the replica in `file`, oldest first.
pub(super) fn versions(file: &Path, replica: &ReplicaPath) -> Result<Vec<VersionInfo>> {
    let conn = open_existing(file, replica)?;
    let mut stmt = conn
        .prepare(&format!(
            "SELECT {VERSION_COLUMNS} FROM versions ORDER BY number"
        ))
        .map_err(sql(file))?;
    let rows = stmt.query_map([], version_row).map_err(sql(file))?;
    let versions: Vec<VersionInfo> = rows.collect::<rusqlite::Result<_>>().map_err(sql(file))?;
    // A file whose first push never committed holds no version: no replica yet.
    if versions.is_empty() {
        return Err(not_found(replica));
    }
    Ok(versions)
}

fn latest(conn: &Connection, file: &Path) -> Result<Option<VersionInfo>> {
    conn.query_row(
        &format!("SELECT {VERSION_COLUMNS} FROM versions ORDER BY number DESC LIMIT 1"),
        [],
        version_row,
    )
    .optional()
    .map_err(sql(file))
}

/// Calls `f` with each page number and hash of `version`'s manifest, in order, one
/// chunk in memory at a time.
fn for_each_hash(
    conn: &Connection,
    file: &Path,
    version: u64,
    f: &mut dyn FnMut(u32, Hash) -> Result<()>,
) -> Result<()> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT c.hashes FROM manifest m JOIN chunks c ON c.hash = m.chunk
             WHERE m.version = ?1 ORDER BY m.idx",
        )
        .map_err(sql(file))?;
    let mut rows = stmt.query([version as i64]).map_err(sql(file))?;
    let mut pgno = 0u32;
    while let Some(row) = rows.next().map_err(sql(file))? {
        let blob = row
            .get_ref(0)
            .map_err(sql(file))?
            .as_blob()
            .map_err(|e| sql(file)(e.into()))?;
        for h in blob.chunks_exact(HASH_BYTES) {
            pgno += 1;
            f(
                pgno,
                h.try_into().expect("chunks_exact yields 32-byte slices"),
            )?;
        }
    }
    Ok(())
}

/// A push in progress: the engine's page target for a new version.
///
/// It holds the replica's write lock (`BEGIN IMMEDIATE`) from [`PageTarget::begin`]
/// to [`PageTarget::commit`]; dropping it without committing rolls everything back.
pub struct VersionWriter {
    conn: Connection,
    /// The file being written: the replica's, or a private one while creating it.
    file: PathBuf,
    /// The replica's file.
    final_file: PathBuf,
    /// The private file a new replica is built in (removed on drop unless linked).
    creating: Option<tempfile::TempPath>,
    replica: ReplicaPath,
    options: PushOptions,
    base: Option<VersionInfo>,
    /// The page size the engine began with.
    page_size: u32,
    /// The version this push made, or the unchanged base when nothing differed.
    result: Option<(VersionInfo, bool)>,
}

impl VersionWriter {
    /// Opens (creating if needed) the replica file for a push.
    pub(super) fn open(
        final_file: &Path,
        replica: &ReplicaPath,
        options: PushOptions,
    ) -> Result<Self> {
        let dir = final_file.parent().expect("a replica file has a directory");
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        // A replica that does not exist yet is built in a private file and linked into
        // place only once its first version commits: a failed first push leaves nothing.
        let creating = if final_file.exists() {
            None
        } else {
            let name = final_file
                .file_name()
                .expect("a replica file has a name")
                .to_string_lossy();
            let tmp = tempfile::Builder::new()
                .prefix(&format!(".{name}."))
                .suffix(".new")
                .tempfile_in(dir)
                .map_err(|e| Error::io(dir, e))?
                .into_temp_path();
            Some(tmp)
        };
        let file = creating.as_deref().unwrap_or(final_file);
        let conn = Connection::open(file).map_err(sql(file))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql(file))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql(file))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql(file))?;
        conn.execute_batch(SCHEMA).map_err(sql(file))?;
        Ok(VersionWriter {
            conn,
            file: file.to_owned(),
            final_file: final_file.to_owned(),
            creating,
            replica: replica.clone(),
            options,
            base: None,
            page_size: 0,
            result: None,
        })
    }

    /// After a successful sync: the version now latest, and whether this push made it
    /// (`false`: nothing differed from the latest version, so none was made).
    pub fn outcome(&self) -> Option<(&VersionInfo, bool)> {
        self.result.as_ref().map(|(v, made)| (v, *made))
    }
}

impl PageTarget for VersionWriter {
    fn begin(&mut self, page_size: u32) -> Result<u32> {
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(sql(&self.file))?;
        let latest = latest(&self.conn, &self.file)?;
        let latest_number = latest.as_ref().map(|v| v.number);
        if !self.options.force && latest_number.is_some() && latest_number != self.options.base {
            return Err(Error::Conflict {
                replica: self.replica.to_string(),
                latest: latest_number.unwrap_or(0),
                based_on: self.options.base,
            });
        }
        let held = match &latest {
            Some(v) if v.page_size == page_size => v.page_count,
            _ => 0,
        };
        self.base = latest;
        self.page_size = page_size;
        Ok(held)
    }

    fn hashes(&mut self, f: &mut dyn FnMut(u32, Hash) -> Result<()>) -> Result<()> {
        match &self.base {
            Some(base) if base.page_count > 0 => {
                for_each_hash(&self.conn, &self.file, base.number, f)
            }
            _ => Ok(()),
        }
    }

    fn write_page(&mut self, _pgno: u32, data: Vec<u8>, hash: &Hash) -> Result<()> {
        let mut stmt = self
            .conn
            .prepare_cached("INSERT OR IGNORE INTO pages(hash, data) VALUES (?1, ?2)")
            .map_err(sql(&self.file))?;
        stmt.execute(params![&hash[..], data])
            .map_err(sql(&self.file))?;
        Ok(())
    }

    fn commit(
        &mut self,
        page_count: u32,
        digest: &Hash,
        hashes: &mut dyn Iterator<Item = Result<Hash>>,
    ) -> Result<()> {
        let file = self.file.clone();
        if let Some(base) = &self.base {
            if base.digest == hex(digest) {
                // Nothing differs: no new version. Roll back the (empty) transaction.
                self.conn.execute_batch("ROLLBACK").map_err(sql(&file))?;
                self.result = Some((base.clone(), false));
                return Ok(());
            }
        }
        let number = self.base.as_ref().map_or(1, |b| b.number + 1);
        let page_size = self.page_size;
        let created_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.conn
            .execute(
                &format!(
                    "INSERT INTO versions({VERSION_COLUMNS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)"
                ),
                params![
                    number as i64,
                    page_size,
                    page_count,
                    &digest[..],
                    self.options.message,
                    created_at,
                    self.options.client_id,
                    self.options.key_id,
                    self.base.as_ref().map_or(0, |b| b.number as i64),
                ],
            )
            .map_err(sql(&file))?;
        let mut chunk = Vec::with_capacity(CHUNK_PAGES * HASH_BYTES);
        let mut idx = 0u32;
        let mut seen = 0u32;
        loop {
            let next = hashes.next().transpose()?;
            if let Some(h) = next {
                chunk.extend_from_slice(&h);
                seen += 1;
            }
            if chunk.len() == CHUNK_PAGES * HASH_BYTES || (next.is_none() && !chunk.is_empty()) {
                let key: Hash = Sha256::digest(&chunk).into();
                self.conn
                    .prepare_cached("INSERT OR IGNORE INTO chunks(hash, hashes) VALUES (?1, ?2)")
                    .and_then(|mut s| s.execute(params![&key[..], &chunk]))
                    .map_err(sql(&file))?;
                self.conn
                    .prepare_cached("INSERT INTO manifest(version, idx, chunk) VALUES (?1, ?2, ?3)")
                    .and_then(|mut s| s.execute(params![number as i64, idx, &key[..]]))
                    .map_err(sql(&file))?;
                idx += 1;
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
        self.conn.execute_batch("COMMIT").map_err(sql(&file))?;
        let info = self
            .conn
            .query_row(
                &format!("SELECT {VERSION_COLUMNS} FROM versions WHERE number = ?1"),
                [number as i64],
                version_row,
            )
            .map_err(sql(&file))?;
        if self.creating.is_some() {
            self.publish()?;
        }
        self.result = Some((info, true));
        Ok(())
    }
}

impl VersionWriter {
    /// Links a new replica's private file into place, now that its first version is
    /// committed. `link` never replaces: if another push created the replica meanwhile,
    /// that one stands and this push is refused.
    fn publish(&mut self) -> Result<()> {
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
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(Error::InUse(format!(
                "{} was created by another push at the same time; pull it, or push again with --force",
                self.replica
            ))),
            Err(e) => Err(Error::io(&self.final_file, e)),
        }
    }
}

impl Drop for VersionWriter {
    fn drop(&mut self) {
        // The private file of a new replica goes (its TempPath removes it); so do its
        // WAL and shared-memory files, once the connection is closed (rolling back).
        if let Some(tmp) = &self.creating {
            if let Ok(memory) = Connection::open_in_memory() {
                drop(std::mem::replace(&mut self.conn, memory));
            }
            for suffix in ["-wal", "-shm"] {
                let mut p = tmp.as_os_str().to_owned();
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
    file: PathBuf,
    info: VersionInfo,
    /// The manifest chunk last used by `read_page`: (chunk index, its hashes).
    chunk: Option<(u32, Vec<u8>)>,
}

impl VersionReader {
    pub(super) fn open(file: &Path, replica: &ReplicaPath, selector: Selector) -> Result<Self> {
        let conn = open_existing(file, replica)?;
        conn.execute_batch("BEGIN DEFERRED").map_err(sql(file))?;
        let latest = latest(&conn, file)?.ok_or_else(|| not_found(replica))?;
        let number = match selector {
            Selector::Latest => latest.number,
            Selector::Number(n) => n,
            Selector::LatestMinus(n) => latest
                .number
                .checked_sub(n)
                .filter(|&v| v >= 1)
                .ok_or_else(|| {
                    Error::NotFound(format!(
                        "{replica}@latest-{n} does not exist: the latest version is {}",
                        latest.number
                    ))
                })?,
        };
        let info = conn
            .query_row(
                &format!("SELECT {VERSION_COLUMNS} FROM versions WHERE number = ?1"),
                [number as i64],
                version_row,
            )
            .optional()
            .map_err(sql(file))?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "{replica}@{number} does not exist: versions are 1 to {}",
                    latest.number
                ))
            })?;
        Ok(VersionReader {
            conn,
            file: file.to_owned(),
            info,
            chunk: None,
        })
    }

    /// The version being read.
    pub fn info(&self) -> &VersionInfo {
        &self.info
    }

    fn page_data(&self, hash: &Hash, buf: &mut Vec<u8>) -> Result<()> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT data FROM pages WHERE hash = ?1")
            .map_err(sql(&self.file))?;
        let mut rows = stmt.query([&hash[..]]).map_err(sql(&self.file))?;
        let row = rows.next().map_err(sql(&self.file))?.ok_or_else(|| {
            Error::Verification(format!("page {} is missing from the store", hex(hash)))
        })?;
        let data = row
            .get_ref(0)
            .map_err(sql(&self.file))?
            .as_blob()
            .map_err(|e| sql(&self.file)(e.into()))?;
        buf.clear();
        buf.extend_from_slice(data);
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
        let mut buf = Vec::with_capacity(self.info.page_size as usize);
        let this = &*self;
        for_each_hash(
            &this.conn,
            &this.file,
            this.info.number,
            &mut |pgno, hash| {
                if pgno <= with_data_after {
                    f(pgno, hash, None)
                } else if pgno == lock_page {
                    f(pgno, hash, Some(&zeros))
                } else {
                    this.page_data(&hash, &mut buf)?;
                    f(pgno, hash, Some(&buf))
                }
            },
        )
    }

    fn read_page(&mut self, pgno: u32, buf: &mut Vec<u8>) -> Result<()> {
        let idx = (pgno - 1) / CHUNK_PAGES as u32;
        if self.chunk.as_ref().is_none_or(|(i, _)| *i != idx) {
            let blob: Vec<u8> = self
                .conn
                .query_row(
                    "SELECT c.hashes FROM manifest m JOIN chunks c ON c.hash = m.chunk
                     WHERE m.version = ?1 AND m.idx = ?2",
                    params![self.info.number as i64, idx],
                    |r| r.get(0),
                )
                .map_err(sql(&self.file))?;
            self.chunk = Some((idx, blob));
        }
        let (_, blob) = self.chunk.as_ref().expect("loaded above");
        let at = ((pgno - 1) as usize % CHUNK_PAGES) * HASH_BYTES;
        let hash: Hash = blob
            .get(at..at + HASH_BYTES)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| Error::Verification(format!("manifest has no page {pgno}")))?;
        self.page_data(&hash, buf)
    }
}
