//! The local record of syncs: for each local database and each replica on each server
//! it was synced with, the version and digest it was last pushed or pulled as. A push
//! uses it as its base version, so a replica that moved meanwhile is detected
//! (VERSION_CONFLICT) instead of overwritten; a pull uses its digest to tell whether the
//! local database changed since, so it never overwrites changes that were not pushed.
//!
//! Invariant: a record is kept per (database, store, replica), never per database only:
//! pushing `live.db` once to another replica, or to another server, must not lose the
//! base of its usual replica. A store is named by the server's id when the server sent
//! one (servers sharing `serve --meta` share it: a push to one and a pull from another
//! are syncs with one store), else by the server's URL. Small JSON files under
//! `$XDG_STATE_HOME/sqlferry/history/`, written atomically (temporary file + rename):
//! one per (database, server URL, replica), which also names the server's id; one per
//! (database, server id, replica) when the id is known; and one per database holding
//! its latest sync of any replica ([`last`]). A URL's record leads to its id's record,
//! which the syncs through every URL of that server keep. Records written before the
//! per-replica files existed are the per-database file alone; they are read as the
//! per-replica record when they name the same server and replica; records written
//! before server ids were kept have none and are read by URL, as they were.
//!
//! A one-shot push or pull takes the room for its records before it commits
//! ([`reserve`]): on a full disk it fails before anything changes, instead of
//! committing and then leaving the history at the version before, which the next push
//! would conflict with (its own version) and the next pull would take for changes
//! never pushed.

use std::path::{Path, PathBuf};

/// One sync of a local database with one replica: what it held afterwards.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LastSync {
    /// The local database, absolute.
    pub database: PathBuf,
    /// The server URL.
    pub server: String,
    /// The replica path.
    pub replica: String,
    /// The version the local database held after the sync.
    pub version: u64,
    /// That version's digest.
    pub digest: String,
    /// When, seconds since the Unix epoch: when the database came to hold this
    /// version by this sync (a later sync that left it as it was does not rewrite the
    /// record, [`record_into`]).
    pub at: i64,
    /// `push` or `pull` (empty in records written before it was kept).
    #[serde(default)]
    pub op: String,
    /// The server's id, as its CONFIG told it (`None`: the embedded store, a server
    /// that sends none, or a record written before ids were kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_id: Option<String>,
}

impl LastSync {
    /// A sync of `database` with `replica` on `server` that just left it at `version`.
    pub fn now(
        database: &Path,
        server: String,
        replica: &str,
        version: u64,
        digest: &str,
        op: &str,
    ) -> LastSync {
        LastSync {
            database: database.to_owned(),
            server,
            replica: replica.to_owned(),
            version,
            digest: digest.to_owned(),
            at: crate::epoch::now(),
            op: op.to_owned(),
            server_id: None,
        }
    }

    /// The same sync, made with the server whose id is `server_id` (if known).
    pub fn with_server_id(mut self, server_id: Option<String>) -> LastSync {
        self.server_id = server_id;
        self
    }
}

/// What stands for the server in the name of the record kept per server id: not a
/// URL (which always has a `://`), so the two kinds of record never share a name.
fn id_key(server_id: &str) -> String {
    format!("server-id {server_id}")
}

/// `dir/<name>`, where name is 32 hex digits of the SHA-256 of `database`'s absolute
/// path (and, when `with` is given, of the server URL and the replica path too), then
/// `suffix`: one file per local database, or per (database, server, replica).
fn keyed_path(
    dir: PathBuf,
    database: &Path,
    with: Option<(&str, &str)>,
    suffix: &str,
) -> Option<PathBuf> {
    let abs = crate::config::database_key(database);
    let mut parts = vec![abs.as_os_str().as_encoded_bytes()];
    if let Some((server, replica)) = with {
        parts.extend([server.as_bytes(), replica.as_bytes()]);
    }
    let key = crate::digest::name_key(&parts);
    Some(dir.join(format!("{}{suffix}", &key[..32])))
}

fn record_path(database: &Path, with: Option<(&str, &str)>) -> Option<PathBuf> {
    keyed_path(
        crate::config::state_dir()?.join("history"),
        database,
        with,
        ".json",
    )
}

fn read_record(path: Option<PathBuf>) -> Option<LastSync> {
    let text = std::fs::read_to_string(path?).ok()?;
    serde_json::from_str(&text).ok()
}

/// The last sync of `database` with any replica, if one was recorded.
pub fn last(database: &Path) -> Option<LastSync> {
    read_record(record_path(database, None))
}

/// The last sync of `database` with `replica` on `server`, or on any other URL of the
/// same server (the same server id), if one was recorded: the base of its next push
/// there, and what a pull from there compares it with.
pub fn last_with(database: &Path, server: &str, replica: &str) -> Option<LastSync> {
    let by_url = read_record(record_path(database, Some((server, replica))))
        // Written before records were kept per replica: valid when it names this one.
        .or_else(|| last(database).filter(|l| l.server == server && l.replica == replica));
    let Some(id) = by_url.as_ref().and_then(|l| l.server_id.clone()) else {
        return by_url;
    };
    let by_id = last_by_id(database, &id, replica);
    // The id's record is written with every URL's record that names the id, so it is
    // the newer one, unless a build that kept no ids synced through this URL since.
    match (by_url, by_id) {
        (Some(url), Some(id)) if url.at > id.at => Some(url),
        (url, id) => id.or(url),
    }
}

/// The last sync of `database` with `replica` on the server whose id is `server_id`,
/// through any of its URLs, if one was recorded: what [`last_with`] finds for a URL
/// never used before, once the server told its id.
pub fn last_by_id(database: &Path, server_id: &str, replica: &str) -> Option<LastSync> {
    read_record(record_path(database, Some((&id_key(server_id), replica))))
        .filter(|l| l.server_id.as_deref() == Some(server_id) && l.replica == replica)
}

/// Bytes of room taken for one record: far more than a record takes, even with a long
/// path in it.
const RECORD_ROOM_BYTES: usize = 16 * 1024;

/// Room on the disk for the records of one sync, taken before it commits: a record
/// that cannot be written after a sync committed leaves the history at the version
/// before, and the next push conflicts with the very version this one made (an
/// encrypted replica's cannot even be merged or forced over). The room is files of
/// 16 KiB (`RECORD_ROOM_BYTES`) allocated without being written (`posix_fallocate`),
/// kept in `history/room/` from one sync to the next: [`reserve`] claims three with an
/// exclusive `flock` (making only those it cannot claim), [`record_into`] writes each
/// record into one (within room already allocated: nothing more to allocate) and
/// renames it into place, and the files not used stay for the next sync. A sync that
/// changes nothing writes no record, so its room costs it no write at all (issue 10:
/// a push that changes nothing writes under 100 KB); making and removing three
/// temporary files for every push was a third of what such a push wrote.
/// A sync that fails (a refused key, a conflict) leaves the room as it found it: the
/// rooms it made are removed when this is dropped without [`record_into`].
#[derive(Default)]
pub struct Reserved {
    rooms: Vec<Room>,
    /// Whether the sync went as far as recording: then every room stays.
    recorded: bool,
    /// The room directory, when room was reserved there: a sync that used some makes
    /// as many again for the next ([`record_into`]).
    dir: Option<PathBuf>,
}

/// One claimed room file: `file` holds its `flock` until it is dropped.
struct Room {
    path: PathBuf,
    file: std::fs::File,
    /// Made by this reservation, not found in the room directory.
    made: bool,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if self.recorded {
            return;
        }
        for room in self.rooms.iter().filter(|r| r.made) {
            let _ = std::fs::remove_file(&room.path);
        }
    }
}

/// How many records one sync writes at most (per server id, per URL, per database).
const RECORDS_PER_SYNC: usize = 3;

/// Reserves room for the records of one sync in the history directory ([`Reserved`]).
/// An error (the disk full) means the sync must not start: it could not be recorded.
/// Without a state directory there is nothing to reserve (and nothing is recorded).
pub fn reserve() -> crate::Result<Reserved> {
    match crate::config::state_dir() {
        Some(state) => reserve_in(&state.join("history").join("room")),
        None => Ok(Reserved::default()),
    }
}

/// [`reserve`], with the room files in `dir`.
fn reserve_in(dir: &Path) -> crate::Result<Reserved> {
    let io = |e| crate::Error::io(dir, e);
    std::fs::create_dir_all(dir).map_err(io)?;
    // Dropped on an error: the rooms made so far go.
    let mut reserved = Reserved {
        rooms: Vec::with_capacity(RECORDS_PER_SYNC),
        recorded: false,
        dir: Some(dir.to_owned()),
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        if reserved.rooms.len() == RECORDS_PER_SYNC {
            break;
        }
        let Ok(entry) = entry else { continue };
        if let Some(room) = claim(entry.path(), false).map_err(io)? {
            reserved.rooms.push(room);
        }
    }
    while reserved.rooms.len() < RECORDS_PER_SYNC {
        let (file, path) = tempfile::Builder::new()
            .prefix("room-")
            .tempfile_in(dir)
            .and_then(|t| t.keep().map_err(|e| e.error))
            .map_err(io)?;
        drop(file);
        // Claimed as any other: another sync may have taken it since it was made.
        match claim(path.clone(), true) {
            Ok(Some(room)) => reserved.rooms.push(room),
            Ok(None) => {}
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return Err(io(e));
            }
        }
    }
    Ok(reserved)
}

/// Claims the room file at `path`: `None` when another sync holds it, or it is gone
/// (renamed into a record by the sync that held it). One that is not whole (a sync
/// died while making it) is allocated now; on a full disk that is the error.
fn claim(path: PathBuf, made: bool) -> std::io::Result<Option<Room>> {
    use std::os::unix::fs::MetadataExt as _;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
        Err(std::fs::TryLockError::Error(e)) => return Err(e),
    }
    // Only the sync holding the lock renames a room away, so the name checked now
    // stays this file's while the lock is held.
    let held = file.metadata()?;
    match std::fs::symlink_metadata(&path) {
        Ok(named) if named.ino() == held.ino() && named.dev() == held.dev() => {}
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
    if !held.is_file() {
        return Ok(None);
    }
    let room = RECORD_ROOM_BYTES as u64;
    if held.len() != room || held.blocks() * 512 < room {
        file.set_len(0)?;
        allocate(&file, RECORD_ROOM_BYTES)?;
    }
    Ok(Some(Room { path, file, made }))
}

/// Gives `file` `len` bytes of disk without writing them (`posix_fallocate`: a full
/// disk fails here, as a write would), so that a push that changes nothing does not
/// write 48 KiB of room it never uses (issue 10: a no-change push writes under
/// 100 KB). Written where the platform has no such call.
fn allocate(file: &std::fs::File, len: usize) -> std::io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: posix_fallocate on a file descriptor we own, with plain integer
        // arguments; it returns the error number instead of setting errno. glibc writes
        // the blocks itself where the file system cannot allocate them.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
        match rc {
            0 => Ok(()),
            e => Err(std::io::Error::from_raw_os_error(e)),
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        use std::io::Write as _;
        let mut file = file;
        file.write_all(&vec![b' '; len])
    }
}

/// Records a sync of `database`, as its sync with that replica (under the server's URL,
/// and under its id when known) and as its last sync. A failure to record is logged,
/// not fatal: the sync itself succeeded. A one-shot push or pull reserves the room
/// first ([`reserve`], [`record_into`]), so that a full disk fails it before it
/// commits rather than here.
pub fn record(sync: &LastSync) {
    record_into(sync, Reserved::default());
}

/// [`record`], writing into the room `reserved` holds, one file per record while it
/// lasts. A record that would change only its time is left as it is: a sync that left
/// the database at the version it held writes nothing.
pub fn record_into(sync: &LastSync, mut reserved: Reserved) {
    let with = Some((sync.server.as_str(), sync.replica.as_str()));
    let id = sync.server_id.as_deref().map(id_key);
    let by_id = id
        .as_deref()
        .and_then(|id| record_path(&sync.database, Some((id, sync.replica.as_str()))));
    for path in [
        by_id,
        record_path(&sync.database, with),
        record_path(&sync.database, None),
    ]
    .into_iter()
    .flatten()
    {
        if read_record(Some(path.clone())).is_some_and(|kept| {
            LastSync {
                at: sync.at,
                ..kept
            } == *sync
        }) {
            continue;
        }
        let result = (|| -> std::io::Result<()> {
            use std::io::Write as _;
            let text = serde_json::to_vec_pretty(sync)?;
            match reserved.rooms.pop() {
                Some(Room {
                    path: room, file, ..
                }) => {
                    let mut file = &file;
                    file.write_all(&text)?;
                    file.set_len(text.len() as u64)?;
                    std::fs::rename(&room, &path)
                }
                None => {
                    let dir = path.parent().expect("the record path has a directory");
                    std::fs::create_dir_all(dir)?;
                    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
                    tmp.write_all(&text)?;
                    tmp.persist(&path).map_err(|e| e.error)?;
                    Ok(())
                }
            }
        })();
        if let Err(e) = result {
            tracing::warn!(error = %e, path = %path.display(), "could not record the sync");
        }
    }
    room_again(reserved);
}

/// The rooms a sync used, made again for the next sync (a push that changes nothing
/// then makes none, even the first after this one): the sync wrote records anyway.
/// Best effort: the next sync makes what is missing, or fails before it commits.
fn room_again(mut reserved: Reserved) {
    reserved.recorded = true;
    let Some(dir) = reserved.dir.take() else {
        return;
    };
    if reserved.rooms.len() == RECORDS_PER_SYNC {
        return;
    }
    drop(reserved);
    match reserve_in(&dir) {
        Ok(mut again) => again.recorded = true,
        Err(e) => {
            tracing::debug!(error = %e, "could not make the history's room for the next sync")
        }
    }
}

/// The manifest of the version a local database was last pushed as: its page hashes,
/// kept so that the next push compares pages locally and sends no hash at all.
/// `$XDG_CACHE_HOME/sqlferry/manifests/`, one file per (database, server, replica): a
/// header, then the page hashes by chunks ([`crate::digest::ChunkedHashes`]: 32 bytes a
/// page, then a table of chunk hashes bound to the header by a checksum), so that a push
/// by chunks reads only the table and the chunks that changed, and leaves the file by
/// rewriting only those. Advisory: a missing, stale or damaged file (or one of the
/// format before chunks) only means hashes travel, or pages that need not.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ManifestHeader {
    /// The server URL.
    pub server: String,
    /// The replica path.
    pub replica: String,
    /// The version these hashes describe.
    pub version: u64,
    /// Page size.
    pub page_size: u32,
    /// Page count.
    pub page_count: u32,
}

const MANIFEST_MAGIC: &[u8; 16] = b"sqlferry-kept-mf";
/// 2: by chunks. Files of format 1 (a JSON line, then the hashes) are not read.
const MANIFEST_FORMAT: u32 = 2;
const MANIFEST_HEADER_BYTES: usize = 80;
/// Where the header keeps the checksum over itself and the table.
const MANIFEST_CHECKSUM_AT: std::ops::Range<usize> = 68..76;

impl ManifestHeader {
    /// Who the hashes are of: the server and the replica, as one hash.
    fn whom(&self) -> crate::digest::Hash {
        crate::digest::sha256(
            crate::digest::name_key(&[self.server.as_bytes(), self.replica.as_bytes()]).as_bytes(),
        )
    }

    /// The header as it is written, with the checksum over it and `table`.
    fn to_bytes(&self, table: &[crate::digest::Hash]) -> [u8; MANIFEST_HEADER_BYTES] {
        let mut h = [0u8; MANIFEST_HEADER_BYTES];
        h[..16].copy_from_slice(MANIFEST_MAGIC);
        h[16..20].copy_from_slice(&MANIFEST_FORMAT.to_be_bytes());
        h[20..24].copy_from_slice(&self.page_size.to_be_bytes());
        h[24..28].copy_from_slice(&self.page_count.to_be_bytes());
        h[28..36].copy_from_slice(&self.version.to_be_bytes());
        h[36..68].copy_from_slice(&self.whom());
        let sum = crate::digest::table_checksum(&h, table);
        h[MANIFEST_CHECKSUM_AT].copy_from_slice(&sum.to_be_bytes());
        h
    }
}

fn manifest_path(database: &Path, server: &str, replica: &str) -> Option<PathBuf> {
    keyed_path(
        crate::config::cache_dir()?.join("manifests"),
        database,
        Some((server, replica)),
        "",
    )
}

/// Keeps `hashes` as the manifest `header` describes, for `database` (a new file,
/// written whole, then renamed over the old one). Failures are logged, not fatal.
pub fn save_manifest(
    database: &Path,
    header: &ManifestHeader,
    hashes: &mut dyn Iterator<Item = crate::Result<crate::digest::Hash>>,
) {
    use std::io::Write;
    let Some(path) = manifest_path(database, &header.server, &header.replica) else {
        return;
    };
    let result = (|| -> crate::Result<()> {
        let dir = path.parent().expect("the manifest path has a directory");
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
        let tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| crate::Error::io(dir, e))?;
        let io = |e| crate::Error::io(&path, e);
        let mut w = std::io::BufWriter::with_capacity(256 * 1024, tmp);
        w.write_all(&[0u8; MANIFEST_HEADER_BYTES]).map_err(io)?;
        let mut w = crate::digest::ChunkedWriter::new(w);
        for h in hashes {
            w.push(&h?).map_err(io)?;
        }
        if w.count() != header.page_count {
            return Err(crate::Error::Bug(format!(
                "a manifest of {} pages kept as one of {}",
                w.count(),
                header.page_count
            )));
        }
        let (w, table) = w.finish().map_err(io)?;
        let tmp = w.into_inner().map_err(|e| io(e.into_error()))?;
        std::os::unix::fs::FileExt::write_all_at(tmp.as_file(), &header.to_bytes(&table), 0)
            .map_err(io)?;
        tmp.persist(&path).map_err(|e| io(e.error))?;
        Ok(())
    })();
    if let Err(e) = result {
        tracing::debug!(error = %e, "could not keep the pushed manifest");
    }
}

/// Brings the kept manifest of `database` from `base` (the version it describes, with
/// the chunk hashes it had when loaded) to `header`: writes the page hashes of the
/// chunks in `changed` (index and page hashes, in order) in place, then the chunk hashes
/// `table`, then the header. Every other chunk's hashes are the base's. Only when the
/// file is still the base's (its header and table unchanged); otherwise it is left
/// alone, and on a failure while writing it is removed (the next push reads what it
/// needs). What a push by
/// chunks leaves, writing `32 KiB` per changed chunk where [`save_manifest`] writes 32
/// bytes a page; a crash in between leaves a table the header refuses, or chunks that
/// fail their check, never a hash trusted and wrong.
pub fn update_manifest(
    database: &Path,
    base: &ManifestHeader,
    base_table: &[crate::digest::Hash],
    header: &ManifestHeader,
    table: Vec<crate::digest::Hash>,
    changed: &mut dyn Iterator<Item = crate::Result<(u32, Vec<u8>)>>,
) {
    let Some(path) = manifest_path(database, &header.server, &header.replica) else {
        return;
    };
    let mut opened = None;
    let result = (|| -> crate::Result<()> {
        let stale = || crate::Error::Bug("the kept manifest is no longer the base's".into());
        (base.server == header.server && base.replica == header.replica)
            .then_some(())
            .ok_or_else(stale)?;
        let kept = opened.insert(open_manifest(&path, base).ok_or_else(stale)?);
        (kept.table() == base_table)
            .then_some(())
            .ok_or_else(stale)?;
        let io = |e| crate::Error::io(&path, e);
        for chunk in changed {
            let (idx, entries) = chunk?;
            kept.write_chunk(idx, &entries).map_err(io)?;
        }
        let h = header.to_bytes(&table);
        kept.finish_update(header.page_count, table).map_err(io)?;
        std::os::unix::fs::FileExt::write_all_at(kept.file(), &h, 0).map_err(io)?;
        Ok(())
    })();
    if let Err(e) = result {
        tracing::debug!(error = %e, "could not update the kept manifest; removing it");
        // Only the file this update opened: one another push wrote since stays. A
        // file that was not the base's was never touched and stays too.
        if let Some(kept) = opened {
            kept.remove_if_at(&path);
        }
    }
}

/// The chunked hashes of the kept manifest at `path` if its header is `expected`'s
/// (server, replica, version, page size and count) and its table holds.
fn open_manifest(path: &Path, expected: &ManifestHeader) -> Option<crate::digest::ChunkedHashes> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .ok()?;
    let mut h = [0u8; MANIFEST_HEADER_BYTES];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut h, 0).ok()?;
    let u32_at = |i: usize| u32::from_be_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_be_bytes(h[i..i + 8].try_into().expect("8 bytes"));
    if &h[..16] != MANIFEST_MAGIC
        || u32_at(16) != MANIFEST_FORMAT
        || u32_at(20) != expected.page_size
        || u32_at(24) != expected.page_count
        || u64_at(28) != expected.version
        || h[36..68] != expected.whom()
    {
        return None;
    }
    let sum = u64_at(MANIFEST_CHECKSUM_AT.start);
    h[MANIFEST_CHECKSUM_AT].fill(0);
    crate::digest::ChunkedHashes::open(
        file,
        MANIFEST_HEADER_BYTES as u64,
        expected.page_count,
        &h,
        sum,
    )
}

/// The kept manifest of `database`, if it describes exactly `server`, `replica` and
/// `version` and its header and table hold: its header and its hashes (each chunk
/// checked as it is read). A torn, truncated or damaged file (the cache is safe to lose,
/// not to trust half of) is no kept manifest, or one whose damaged chunks are refused
/// when read: the sync reads what it needs instead of failing half-way.
pub fn load_manifest(
    database: &Path,
    server: &str,
    replica: &str,
    version: u64,
) -> Option<(ManifestHeader, KeptManifest)> {
    let path = manifest_path(database, server, replica)?;
    let file = std::fs::File::open(&path).ok()?;
    let mut h = [0u8; MANIFEST_HEADER_BYTES];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut h, 0).ok()?;
    drop(file);
    let u32_at = |i: usize| u32::from_be_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    let header = ManifestHeader {
        server: server.to_owned(),
        replica: replica.to_owned(),
        version,
        page_size: u32_at(20),
        page_count: u32_at(24),
    };
    let hashes = open_manifest(&path, &header)?;
    Some((
        header,
        KeptManifest {
            hashes,
            next: 1,
            buf: Vec::new(),
        },
    ))
}

/// The hashes of a kept manifest: by chunks ([`KeptManifest::table`],
/// [`KeptManifest::read_chunk`]), or in page order as an iterator, each chunk checked
/// before its hashes are given out (a chunk that fails is an error).
pub struct KeptManifest {
    hashes: crate::digest::ChunkedHashes,
    /// The page the iterator gives next.
    next: u32,
    /// The iterator's current chunk.
    buf: Vec<u8>,
}

impl KeptManifest {
    /// The chunk hashes, in order.
    pub fn table(&self) -> &[crate::digest::Hash] {
        self.hashes.table()
    }

    /// Appends the page hashes of chunk `idx` to `out` when they make the chunk's hash;
    /// `false` (and `out` as it was) when they do not.
    pub fn read_chunk(&self, idx: u32, out: &mut Vec<u8>) -> crate::Result<bool> {
        self.hashes
            .read_chunk(idx, out)
            .map_err(|e| crate::Error::io(Path::new("kept manifest"), e))
    }
}

impl Iterator for KeptManifest {
    type Item = crate::Result<crate::digest::Hash>;

    fn next(&mut self) -> Option<Self::Item> {
        use crate::digest::{CHUNK_PAGES, HASH_BYTES};
        let pgno = self.next;
        if pgno > self.hashes.page_count() {
            return None;
        }
        self.next += 1;
        let idx = (pgno - 1) / CHUNK_PAGES;
        if (pgno - 1).is_multiple_of(CHUNK_PAGES) {
            self.buf.clear();
            let read = self
                .hashes
                .read_chunk(idx, &mut self.buf)
                .map_err(|e| crate::Error::io(Path::new("kept manifest"), e));
            match read {
                Ok(true) => {}
                Ok(false) => {
                    self.next = u32::MAX;
                    return Some(Err(crate::Error::Verification(format!(
                        "chunk {idx} of the kept manifest does not match its hash"
                    ))));
                }
                Err(e) => {
                    self.next = u32::MAX;
                    return Some(Err(e));
                }
            }
        }
        let at = ((pgno - 1) % CHUNK_PAGES) as usize * HASH_BYTES;
        Some(Ok(self.buf[at..at + HASH_BYTES]
            .try_into()
            .expect("32 bytes")))
    }
}

/// What a push or a pull leaves so that the next sync of the same database with the
/// same replica can prove, without reading a page, what the database holds: in the
/// state `source`, its digest is `digest`, the digest of `version` (docs/engine.md, "A
/// no-change push that reads nothing" and "A pull that reads what changed"). A push
/// into the embedded store then proves that nothing changed; a pull takes the
/// database's page hashes from the kept manifest of `version`. Kept beside the
/// manifests, one file per (database, server, replica); advisory: a missing or
/// unreadable seal only means the database is read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PushSeal {
    /// The server URL.
    pub server: String,
    /// The replica path.
    pub replica: String,
    /// The version the push left the replica at.
    pub version: u64,
    /// That version's digest, lower-case hex.
    pub digest: String,
    /// Whether the state passed a push's source check (`false`: `--allow-corrupt`, or
    /// a pull, which runs none).
    pub checked: bool,
    /// The database's state token (`page::SourceState::to_token`): the pushed
    /// snapshot's, or the one a pull's commit left.
    pub source: String,
}

fn seal_path(database: &Path, server: &str, replica: &str) -> Option<PathBuf> {
    keyed_path(
        crate::config::cache_dir()?.join("manifests"),
        database,
        Some((server, replica)),
        ".seal",
    )
}

/// Keeps `seal` for `database` (atomically: a reader sees the old seal or the new one).
/// A failure is logged and removes the old seal, so that no stale one stays.
pub fn save_seal(database: &Path, seal: &PushSeal) {
    let Some(path) = seal_path(database, &seal.server, &seal.replica) else {
        return;
    };
    let result = (|| -> std::io::Result<()> {
        let dir = path.parent().expect("the seal path has a directory");
        std::fs::create_dir_all(dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        // One write: serde writes a file token by token (45 system calls for a seal).
        std::io::Write::write_all(&mut tmp, &serde_json::to_vec(seal)?)?;
        tmp.persist(&path).map_err(|e| e.error)?;
        Ok(())
    })();
    if let Err(e) = result {
        tracing::debug!(error = %e, "could not keep the push's seal");
        let _ = std::fs::remove_file(&path);
    }
}

/// The seal the last push of `database` to `replica` on `server` left, if any.
pub fn load_seal(database: &Path, server: &str, replica: &str) -> Option<PushSeal> {
    let text = std::fs::read_to_string(seal_path(database, server, replica)?).ok()?;
    let seal: PushSeal = serde_json::from_str(&text).ok()?;
    (seal.server == server && seal.replica == replica).then_some(seal)
}

/// Removes the seal of `database` with `replica` on `server`: the push that just ran
/// could not leave one, and the old one describes an older push.
pub fn remove_seal(database: &Path, server: &str, replica: &str) {
    if let Some(path) = seal_path(database, server, replica) {
        let _ = std::fs::remove_file(path);
    }
}

/// A push the server committed whose answer was lost, and that could not be looked up
/// then (the server was gone): its base and the digest it committed. The next push of
/// `database` to the replica looks for the version holding that digest and, when it is
/// there (made on this base by this client), takes it as its base: otherwise that push
/// would be refused as VERSION_CONFLICT against its own version (an encrypted replica's
/// conflict cannot even be forced). One file per (database, server, replica) in the
/// history directory, written only on that failure.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Unanswered {
    /// The server URL.
    pub server: String,
    /// The replica path.
    pub replica: String,
    /// The version the push was based on (0: none).
    pub base: u64,
    /// The digest the push committed, in the form the sync agreed on.
    pub digest: String,
    /// The client it was pushed as (the version records it).
    pub client: String,
    /// Whether it was forced (`--force`): its version then records the latest version
    /// of its commit as its base, not the push's.
    pub forced: bool,
}

fn unanswered_path(database: &Path, server: &str, replica: &str) -> Option<PathBuf> {
    keyed_path(
        crate::config::state_dir()?.join("history"),
        database,
        Some((server, replica)),
        ".unanswered",
    )
}

/// Keeps `push` for `database` (atomically, and synced: it is what keeps the next push
/// from a conflict with its own version). An error is returned: the caller says the
/// push was committed either way.
pub fn save_unanswered(database: &Path, push: &Unanswered) -> std::io::Result<()> {
    let path = unanswered_path(database, &push.server, &push.replica)
        .ok_or_else(|| std::io::Error::other("no state directory"))?;
    let dir = path.parent().expect("the record path has a directory");
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    std::io::Write::write_all(&mut tmp, &serde_json::to_vec(push)?)?;
    tmp.as_file().sync_all()?;
    tmp.persist(&path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The unanswered push of `database` to `replica` on `server`, if one is kept.
pub fn load_unanswered(database: &Path, server: &str, replica: &str) -> Option<Unanswered> {
    let text = std::fs::read_to_string(unanswered_path(database, server, replica)?).ok()?;
    let push: Unanswered = serde_json::from_str(&text).ok()?;
    (push.server == server && push.replica == replica).then_some(push)
}

/// Forgets the unanswered push of `database` to `replica` on `server`: its version was
/// found (and a later push recorded), or it no longer names the database's base.
pub fn remove_unanswered(database: &Path, server: &str, replica: &str) {
    if let Some(path) = unanswered_path(database, server, replica) {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rooms(dir: &Path) -> std::collections::BTreeSet<PathBuf> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect()
    }

    fn claimed(r: &Reserved) -> std::collections::BTreeSet<PathBuf> {
        r.rooms.iter().map(|room| room.path.clone()).collect()
    }

    #[test]
    fn room_is_kept_for_the_next_sync_and_never_shared_with_a_running_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("room");
        let first = reserve_in(&dir).unwrap();
        assert_eq!(claimed(&first).len(), RECORDS_PER_SYNC);
        // A second sync while the first runs gets rooms of its own.
        let second = reserve_in(&dir).unwrap();
        assert_eq!(claimed(&second).len(), RECORDS_PER_SYNC);
        assert!(claimed(&first).is_disjoint(&claimed(&second)));
        let made = rooms(&dir);
        assert_eq!(made.len(), 2 * RECORDS_PER_SYNC);
        for path in &made {
            assert_eq!(
                std::fs::metadata(path).unwrap().len(),
                RECORD_ROOM_BYTES as u64
            );
        }
        // Once they ended (recording nothing: their syncs changed nothing), the next
        // sync takes rooms already there, and makes none.
        let (mut first, mut second) = (first, second);
        first.recorded = true;
        second.recorded = true;
        drop((first, second));
        let third = reserve_in(&dir).unwrap();
        assert!(claimed(&third).is_subset(&made));
        assert_eq!(rooms(&dir), made);
    }

    #[test]
    fn a_sync_that_recorded_leaves_three_rooms_for_the_next() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("room");
        let mut reserved = reserve_in(&dir).unwrap();
        // Two rooms became records (renamed away).
        let used: Vec<PathBuf> = (0..2)
            .map(|_| {
                let room = reserved.rooms.pop().unwrap();
                std::fs::remove_file(&room.path).unwrap();
                room.path.clone()
            })
            .collect();
        room_again(reserved);
        let left = rooms(&dir);
        assert_eq!(left.len(), RECORDS_PER_SYNC, "{left:?}");
        assert!(used.iter().all(|p| !left.contains(p)));
    }

    #[test]
    fn a_sync_that_fails_leaves_the_room_as_it_found_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("room");
        // The first sync fails before it records: it made three rooms, and removes them.
        drop(reserve_in(&dir).unwrap());
        assert!(rooms(&dir).is_empty());
        // One that records keeps the rooms it did not use; a failing one after it
        // leaves those and removes only what it made.
        let mut kept = reserve_in(&dir).unwrap();
        kept.recorded = true;
        // One room became a record (renamed away).
        let used = kept.rooms.pop().unwrap();
        std::fs::rename(&used.path, tmp.path().join("record.json")).unwrap();
        drop(kept);
        let before = rooms(&dir);
        assert_eq!(before.len(), RECORDS_PER_SYNC - 1);
        drop(reserve_in(&dir).unwrap());
        assert_eq!(rooms(&dir), before);
    }

    #[test]
    fn a_room_left_written_or_cut_short_is_whole_again_when_claimed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("room");
        std::fs::create_dir_all(&dir).unwrap();
        // A sync that died while writing its record into the room, and one that died
        // while making a room.
        std::fs::write(dir.join("room-written"), b"{\"database\": ").unwrap();
        std::fs::write(dir.join("room-empty"), b"").unwrap();
        let reserved = reserve_in(&dir).unwrap();
        assert!(claimed(&reserved).contains(&dir.join("room-written")));
        assert!(claimed(&reserved).contains(&dir.join("room-empty")));
        use std::os::unix::fs::MetadataExt as _;
        for path in claimed(&reserved) {
            let m = std::fs::metadata(&path).unwrap();
            assert_eq!(m.len(), RECORD_ROOM_BYTES as u64, "{}", path.display());
            assert!(
                m.blocks() * 512 >= RECORD_ROOM_BYTES as u64,
                "{}",
                path.display()
            );
        }
        let text = std::fs::read(dir.join("room-written")).unwrap();
        assert!(text.iter().all(|&b| b == 0), "the old bytes are gone");
    }
}
