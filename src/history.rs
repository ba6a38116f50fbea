//! The local record of syncs: for each local database and each replica on each server
//! it was synced with, the version and digest it was last pushed or pulled as. A push
//! uses it as its base version, so a replica that moved meanwhile is detected
//! (VERSION_CONFLICT) instead of overwritten; a pull uses its digest to tell whether the
//! local database changed since, so it never overwrites changes that were not pushed.
//!
//! Invariant: a record is kept per (database, server, replica), never per database only:
//! pushing `live.db` once to another replica, or to another server, must not lose the
//! base of its usual replica. Small JSON files under `$XDG_STATE_HOME/sqlferry/history/`,
//! written atomically (temporary file + rename): one per (database, server, replica),
//! and one per database holding its latest sync of any replica ([`last`]). Records
//! written before the per-replica files existed are the per-database file alone; they
//! are read as the per-replica record when they name the same server and replica.

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
    /// When, seconds since the Unix epoch.
    pub at: i64,
    /// `push` or `pull` (empty in records written before it was kept).
    #[serde(default)]
    pub op: String,
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
        }
    }
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

/// The last sync of `database` with `replica` on `server`, if one was recorded: the
/// base of its next push there, and what a pull from there compares it with.
pub fn last_with(database: &Path, server: &str, replica: &str) -> Option<LastSync> {
    read_record(record_path(database, Some((server, replica))))
        // Written before records were kept per replica: valid when it names this one.
        .or_else(|| last(database).filter(|l| l.server == server && l.replica == replica))
}

/// Records a sync of `database`, as its sync with that replica and as its last sync.
/// A failure to record is logged, not fatal: the sync itself succeeded, and the next
/// push will just not know its base.
pub fn record(sync: &LastSync) {
    let with = Some((sync.server.as_str(), sync.replica.as_str()));
    for path in [
        record_path(&sync.database, with),
        record_path(&sync.database, None),
    ]
    .into_iter()
    .flatten()
    {
        let result = (|| -> std::io::Result<()> {
            let dir = path.parent().expect("the record path has a directory");
            std::fs::create_dir_all(dir)?;
            let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
            std::io::Write::write_all(&mut tmp, &serde_json::to_vec_pretty(sync)?)?;
            tmp.persist(&path).map_err(|e| e.error)?;
            Ok(())
        })();
        if let Err(e) = result {
            tracing::warn!(error = %e, path = %path.display(), "could not record the sync");
        }
    }
}

/// The manifest of the version a local database was last pushed as: its page hashes,
/// kept so that the next push compares pages locally and sends no hash at all.
/// `$XDG_CACHE_HOME/sqlferry/manifests/`, one file per (database, server, replica): a
/// JSON header line, then 32 bytes per page. Advisory: a missing or stale file only
/// means hashes travel.
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

fn manifest_path(database: &Path, with: Option<(&str, &str)>) -> Option<PathBuf> {
    keyed_path(
        crate::config::cache_dir()?.join("manifests"),
        database,
        with,
        "",
    )
}

/// Keeps `hashes` as the manifest `header` describes, for `database`. Failures are
/// logged, not fatal.
pub fn save_manifest(
    database: &Path,
    header: &ManifestHeader,
    hashes: &mut dyn Iterator<Item = crate::Result<crate::digest::Hash>>,
) {
    use std::io::Write;
    let Some(path) = manifest_path(database, Some((&header.server, &header.replica))) else {
        return;
    };
    let result = (|| -> crate::Result<()> {
        let dir = path.parent().expect("the manifest path has a directory");
        std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
        let tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| crate::Error::io(dir, e))?;
        let mut w = std::io::BufWriter::new(tmp);
        let io = |e| crate::Error::io(&path, e);
        serde_json::to_writer(&mut w, header).map_err(|e| io(e.into()))?;
        w.write_all(b"\n").map_err(io)?;
        for h in hashes {
            w.write_all(&h?).map_err(io)?;
        }
        let tmp = w.into_inner().map_err(|e| io(e.into_error()))?;
        tmp.persist(&path).map_err(|e| io(e.error))?;
        Ok(())
    })();
    if let Err(e) = result {
        tracing::debug!(error = %e, "could not keep the pushed manifest");
    }
}

/// The kept manifest of `database`, if it describes exactly `server`, `replica` and
/// `version`: its header and a reader of its hashes.
pub fn load_manifest(
    database: &Path,
    server: &str,
    replica: &str,
    version: u64,
) -> Option<(ManifestHeader, ManifestHashes)> {
    use std::io::BufRead;
    // Kept before manifests were kept per replica: the per-database file, whose header
    // is checked below like any other.
    let file = manifest_path(database, Some((server, replica)))
        .and_then(|p| std::fs::File::open(p).ok())
        .or_else(|| std::fs::File::open(manifest_path(database, None)?).ok())?;
    let len = file.metadata().ok()?.len();
    let mut reader = std::io::BufReader::with_capacity(64 * 1024, file);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let header: ManifestHeader = serde_json::from_str(line.trim_end()).ok()?;
    (header.server == server && header.replica == replica && header.version == version)
        .then_some(())?;
    // A torn or truncated file (the cache is safe to lose, not to trust half of) is no
    // kept manifest: the sync reads what it needs instead of failing half-way.
    (len == line.len() as u64 + u64::from(header.page_count) * crate::digest::HASH_BYTES as u64)
        .then_some(())?;
    let hashes = crate::digest::HashReader::new(reader, header.page_count);
    Some((header, ManifestHashes(hashes)))
}

/// The hashes of a kept manifest, in page order.
pub struct ManifestHashes(crate::digest::HashReader<std::io::BufReader<std::fs::File>>);

impl Iterator for ManifestHashes {
    type Item = crate::Result<crate::digest::Hash>;

    fn next(&mut self) -> Option<Self::Item> {
        Some(
            self.0
                .next()?
                .map_err(|e| crate::Error::io(Path::new("kept manifest"), e)),
        )
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
