//! Helpers shared by the integration tests: making databases of a given shape, reading
//! back what a user would check (rows, integrity check, digest, journal mode), running
//! the `sqlferry` binary, and waiting on observable events instead of sleeping.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use rusqlite::types::Value;
use sqlferry::digest::{Digest, hex, page_hash};
use sqlferry::engine::{NoProgress, SyncStats, sync_local};
use sqlferry::page::{Snapshot, Writer};

/// How long helpers wait for a database another connection holds.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The journal mode a test database is created in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Write-ahead log.
    Wal,
    /// Rollback journal (DELETE).
    Rollback,
}

impl Mode {
    /// What `PRAGMA journal_mode` answers for a database in this mode.
    pub fn pragma(self) -> &'static str {
        match self {
            Mode::Wal => "wal",
            Mode::Rollback => "delete",
        }
    }

    /// What `verify --json` reports as `journal_mode`.
    pub fn verify_name(self) -> &'static str {
        match self {
            Mode::Wal => "wal",
            Mode::Rollback => "rollback",
        }
    }
}

/// Opens a database read-write with a generous busy timeout.
pub fn open(path: &Path) -> Connection {
    let conn = Connection::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    conn.busy_timeout(BUSY_TIMEOUT).expect("busy timeout");
    conn
}

/// Creates a new database with `page_size` and `mode` and returns a connection to it.
/// Writes are not synced to disk: tests do not survive power cuts, and it is faster.
pub fn create(path: &Path, page_size: u32, mode: Mode) -> Connection {
    assert!(!path.exists(), "{} already exists", path.display());
    let conn = open(path);
    conn.pragma_update(None, "page_size", page_size)
        .expect("page_size");
    let got: String = conn
        .query_row(
            &format!("PRAGMA journal_mode = {}", mode.pragma()),
            [],
            |r| r.get(0),
        )
        .expect("journal_mode");
    assert_eq!(got, mode.pragma());
    conn.pragma_update(None, "synchronous", "OFF")
        .expect("synchronous");
    conn.execute_batch(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, k TEXT NOT NULL, v BLOB);
         CREATE INDEX t_k ON t(k);",
    )
    .expect("schema");
    assert_eq!(self::page_size(path), page_size, "page size took");
    conn
}

/// Inserts `rows` rows into `t` whose blobs are `blob_bytes` of random data.
pub fn insert_rows(conn: &Connection, rows: u64, blob_bytes: u64) {
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
         INSERT INTO t(k, v) SELECT hex(randomblob(8)), randomblob(?2) FROM n",
        rusqlite::params![rows as i64, blob_bytes as i64],
    )
    .expect("insert rows");
}

/// Makes a database of roughly `bytes` bytes in `t`, in rows of `blob_bytes` blobs.
pub fn fill(conn: &Connection, bytes: u64, blob_bytes: u64) {
    insert_rows(conn, bytes.div_ceil(blob_bytes), blob_bytes);
}

/// `PRAGMA page_size` of the database at `path`.
pub fn page_size(path: &Path) -> u32 {
    pragma_u32(path, "page_size")
}

/// `PRAGMA page_count` of the database at `path`.
pub fn page_count(path: &Path) -> u32 {
    pragma_u32(path, "page_count")
}

fn pragma_u32(path: &Path, name: &str) -> u32 {
    open(path)
        .query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
        .unwrap_or_else(|e| panic!("PRAGMA {name} on {}: {e}", path.display()))
}

/// `PRAGMA journal_mode` of the database at `path`, as a fresh connection sees it.
pub fn journal_mode(path: &Path) -> String {
    open(path)
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .expect("journal_mode")
}

/// `PRAGMA integrity_check` of the database at `path`, lines joined.
pub fn integrity(path: &Path) -> String {
    let conn = open(path);
    let mut stmt = conn.prepare("PRAGMA integrity_check").expect("prepare");
    let lines: Vec<String> = stmt
        .query_map([], |r| r.get(0))
        .expect("integrity_check")
        .collect::<Result<_, _>>()
        .expect("integrity rows");
    lines.join("\n")
}

/// Every row of every table (the schema included), in a stable order: what a user
/// compares to say two databases hold the same data.
pub fn dump(path: &Path) -> Vec<(String, Vec<Vec<Value>>)> {
    let conn = open(path);
    let mut tables: Vec<(String, bool)> = conn
        .prepare(
            "SELECT name, sql LIKE '%WITHOUT ROWID%' FROM sqlite_schema
             WHERE type = 'table' ORDER BY name",
        )
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("tables")
        .collect::<Result<_, _>>()
        .expect("table rows");
    tables.insert(0, ("sqlite_schema".into(), false));
    tables
        .into_iter()
        .map(|(name, without_rowid)| {
            let order = if without_rowid { "1" } else { "rowid" };
            let sql = format!("SELECT * FROM \"{name}\" ORDER BY {order}");
            let mut stmt = conn.prepare(&sql).expect("prepare dump");
            let n = stmt.column_count();
            let rows = stmt
                .query_map([], |r| (0..n).map(|i| r.get::<_, Value>(i)).collect())
                .expect("dump")
                .collect::<Result<_, _>>()
                .expect("dump rows");
            (name, rows)
        })
        .collect()
}

/// The hash of every page, in page order, as the library defines page identity
/// ([`page_hash`]), read through `sqlite_dbpage` in one read transaction.
pub fn page_hashes(path: &Path) -> Vec<[u8; 32]> {
    let conn = open(path);
    conn.execute_batch("BEGIN").expect("begin");
    let mut stmt = conn
        .prepare("SELECT pgno, data FROM sqlite_dbpage")
        .expect("sqlite_dbpage");
    let mut rows = stmt.query([]).expect("pages");
    let mut out = Vec::new();
    while let Some(row) = rows.next().expect("page") {
        let pgno: u32 = row.get(0).expect("pgno");
        let data = row.get_ref(1).expect("data").as_blob().expect("a blob");
        assert_eq!(pgno as usize, out.len() + 1, "pages come in order");
        out.push(page_hash(pgno, data));
    }
    out
}

/// The database's digest (what `verify` prints and `push` checks against): SHA-256
/// over page size, page count and the ordered page hashes.
pub fn digest(path: &Path) -> String {
    let hashes = page_hashes(path);
    let mut d = Digest::new(page_size(path), hashes.len() as u32);
    for h in &hashes {
        d.push(h);
    }
    hex(&d.finish().expect("every page hashed"))
}

/// The database's chunked digest as text (`c:` + hex), computed from its definition:
/// SHA-256 over `sqlferry-digest-2`, the page size and count, and the SHA-256 of each
/// run of 1,024 page hashes.
pub fn chunked_digest(path: &Path) -> String {
    let hashes = page_hashes(path);
    let mut all = b"sqlferry-digest-2".to_vec();
    all.extend_from_slice(&page_size(path).to_be_bytes());
    all.extend_from_slice(&(hashes.len() as u32).to_be_bytes());
    for chunk in hashes.chunks(1024) {
        all.extend_from_slice(&sqlferry::digest::sha256(&chunk.concat()));
    }
    format!("c:{}", hex(&sqlferry::digest::sha256(&all)))
}

/// The database's digest in the form of `shown` (a digest as a command printed it:
/// `c:` + hex for the chunked form, hex alone for digest 1), to compare with it.
pub fn digest_like(path: &Path, shown: &serde_json::Value) -> String {
    match shown.as_str().is_some_and(|s| s.starts_with("c:")) {
        true => chunked_digest(path),
        false => digest(path),
    }
}

/// Syncs `dest` to equal `src` in this process, through the library.
pub fn sync(src: &Path, dest: &Path) -> SyncStats {
    // The page-hash caches stay in the test's own directory, not in the user's home.
    let cache = src.parent().map(|d| d.join(".hash-cache"));
    let mut source = Snapshot::open(src)
        .unwrap_or_else(|e| panic!("snapshot {}: {e}", src.display()))
        .with_hash_cache(cache.clone());
    let mut target = Writer::open(dest)
        .unwrap_or_else(|e| panic!("writer {}: {e}", dest.display()))
        .with_hash_cache(cache);
    sync_local(&mut source, &mut target, &NoProgress)
        .unwrap_or_else(|e| panic!("sync {} -> {}: {e}", src.display(), dest.display()))
}

/// Asserts that `replica` is a copy of `origin` the way a user would check it: same
/// rows, an integrity check that says ok, the same digest and page size.
pub fn assert_same(origin: &Path, replica: &Path) {
    assert_eq!(integrity(replica), "ok", "replica integrity");
    assert_eq!(page_size(replica), page_size(origin), "page size");
    assert_eq!(page_count(replica), page_count(origin), "page count");
    assert!(
        dump(replica) == dump(origin),
        "replica rows differ from origin"
    );
    assert_eq!(digest(replica), digest(origin), "digest");
}

/// The `sqlferry` binary under test, with its home, cache, data and state directories
/// inside `dir` (a test's TempDir), so it leaves nothing behind in the real home.
pub fn sqlferry(dir: &Path) -> Command {
    let home = dir.join(".home");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sqlferry"));
    cmd.env_remove("RUST_LOG")
        .env("HOME", &home)
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("XDG_DATA_HOME", home.join("data"))
        .env("XDG_STATE_HOME", home.join("state"))
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env_remove("SQLFERRY_SERVER")
        .env_remove("SQLFERRY_KEY")
        .env_remove("SQLFERRY_CA_FILE")
        .env_remove("SQLFERRY_ENCRYPTION_KEY");
    cmd
}

/// Runs `sqlferry` (isolated in `dir`) with `args` and waits for it.
pub fn run(dir: &Path, args: &[&std::ffi::OsStr]) -> Output {
    sqlferry(dir).args(args).output().expect("run sqlferry")
}

/// The exit code of a finished command (panics if it was killed by a signal).
pub fn code(out: &Output) -> i32 {
    out.status
        .code()
        .unwrap_or_else(|| panic!("killed by a signal: {out:?}"))
}

/// Of two racing commands' exit codes, which one succeeded and which one did not, as
/// `(winner, loser)`: the first to exit 0 wins; none doing so fails the test.
pub fn winner_and_loser(codes: &[i32]) -> (usize, usize) {
    let winner = codes
        .iter()
        .position(|&c| c == 0)
        .unwrap_or_else(|| panic!("one of the racing commands succeeds: {codes:?}"));
    (winner, 1 - winner)
}

/// stdout of a finished command as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stderr of a finished command as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The directory a test file lives in: where its `sqlferry` runs keep their state.
fn dir_of(path: &Path) -> &Path {
    path.parent().expect("test files live in a TempDir")
}

/// `sqlferry push SRC DEST --json`, asserted to succeed; its JSON report.
pub fn push_json(src: &Path, dest: &Path) -> serde_json::Value {
    let out = sqlferry(dir_of(dest))
        .arg("push")
        .arg(src)
        .arg(dest)
        .arg("--json")
        .output()
        .expect("run push");
    assert_eq!(code(&out), 0, "push failed: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("push --json prints JSON")
}

/// `sqlferry verify FILE --json`: exit code, its JSON report (if any) and stderr.
pub fn verify_json(path: &Path) -> (i32, Option<serde_json::Value>, String) {
    let out = sqlferry(dir_of(path))
        .arg("verify")
        .arg(path)
        .arg("--json")
        .output()
        .expect("run verify");
    (
        code(&out),
        serde_json::from_slice(&out.stdout).ok(),
        stderr(&out),
    )
}

/// Polls `cond` every `every` until it holds or `timeout` passes; whether it held.
pub fn wait_until(timeout: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// `path` with `suffix` appended (`-wal`, `-journal`, `-shm`).
pub fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// The size of a file, 0 when it does not exist.
pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Runs `PRAGMA wal_checkpoint(TRUNCATE)` and closes, so a WAL database's content is
/// all in its main file.
pub fn checkpoint(path: &Path) {
    let conn = open(path);
    let (busy, _, _): (i64, i64, i64) = conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .expect("checkpoint");
    assert_eq!(busy, 0, "checkpoint of {} was blocked", path.display());
}

/// Runs a Python 3 script (`python3 -c SCRIPT ARGS…`), as a second process would use
/// its own SQLite; asserts it succeeded and returns what it printed, trimmed.
pub fn python<S: AsRef<std::ffi::OsStr>>(script: &str, args: &[S]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Every file under `dir`, recursively, sorted (none if `dir` does not exist).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out.sort();
    out
}

/// The files under `dir` that hold `needle` (a marker a store must not keep in clear);
/// asserts there are files at all, so an empty or wrong directory does not pass.
pub fn holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let files = files_under(dir);
    assert!(!files.is_empty(), "no file under {}", dir.display());
    files
        .into_iter()
        .filter(|f| {
            std::fs::read(f)
                .map(|b| b.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        })
        .collect()
}

/// A tmpfs of `size` mounted on `dir` for the guard's life (unmounted on drop, even
/// when the test fails). Panics if it cannot be mounted: the full-disk tests need it.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs on {} failed (these tests run as root): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_owned())
    }

    /// Writes a file until the disk is full; returns it.
    pub fn fill(&self) -> PathBuf {
        use std::io::Write as _;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        let chunk = vec![0u8; 16 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        path
    }

    /// Fills the disk, then gives back `room` bytes of the filler: what is left free
    /// is `room`, give or take a page of the file system's own. Returns the filler.
    pub fn fill_leaving(&self, room: u64) -> PathBuf {
        let path = self.fill();
        let len = std::fs::metadata(&path).expect("filler").len();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("filler");
        f.set_len(len.saturating_sub(room))
            .expect("shrink the filler");
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A snapshot of the page index of the directory store rooted at `root`, as a table
/// `pages(hash, pack, offset, len, codec, checksum)` in memory: every entry, whether
/// the index keeps it in its table or in a run file. Changing it changes nothing; to
/// lose an entry, [`forget_page`].
pub fn index_snapshot(root: &Path) -> Connection {
    let entries = sqlferry::store::index_entries(root).expect("read the page index");
    let conn = Connection::open_in_memory().expect("in-memory database");
    conn.execute_batch(
        "CREATE TABLE pages(hash BLOB PRIMARY KEY, pack INTEGER, offset INTEGER,
             len INTEGER, codec INTEGER, checksum BLOB)",
    )
    .expect("table");
    let mut insert = conn
        .prepare("INSERT INTO pages VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
        .expect("prepare");
    for e in entries {
        insert
            .execute(rusqlite::params![
                &e.hash[..],
                e.pack,
                e.offset as i64,
                e.len,
                e.codec,
                e.checksum
            ])
            .expect("insert");
    }
    drop(insert);
    conn
}

/// Removes the entry of `hash` from the page index of the store rooted at `root`, as
/// if the index had lost it; whether there was one.
pub fn forget_page(root: &Path, hash: &[u8]) -> bool {
    let hash: [u8; 32] = hash.try_into().expect("a 32-byte hash");
    sqlferry::store::forget_entry(root, &hash).expect("forget the entry")
}
