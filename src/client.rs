//! The workflows the command line and the subscribers share: push, pull, versions,
//! verify a database or a stored version, rekey an encrypted replica, sync-now, keys list
//! and revoke, scrub a store directory, and the bookkeeping around them (which store and
//! key a command means, the base version of a push, the local history, saved keys and
//! sidecars, the refusal to overwrite changes that were never pushed).
//!
//! It sits between `cli` and `remote`: it takes plain option structs (never clap types)
//! and returns results as structs (never printed text), so the command line only turns
//! flags into options and results into lines, JSON and exit codes, and a library user
//! gets the same promises the command line keeps. Progress is reported through the
//! engine's [`Progress`](crate::engine::Progress) trait the caller passes in.
//!
//! Everything that does I/O is an `async fn` on the caller's runtime; SQLite and file
//! work runs on `spawn_blocking`. Errors are [`crate::Error`]s; where the command line
//! used to say which step failed ("push app.db to acme/app.db failed: …"), the error
//! carries that as [`Error::Context`], so the message and the exit code stay as they
//! were.

mod pull;
mod push;
mod rekey;
mod scratch;
mod status;

pub use pull::{
    Kept, LocalChange, LocalDigest, PullPlan, Puller, local_digest, short_digest, unsynced_changes,
};
pub use push::{
    CopyPlan, PushPlan, PushReport, Pusher, SavedKeys, copy_file, copy_file_for, plan_copy,
};
pub use rekey::{RekeyOutcome, RekeyedAway, rekey};
pub use scratch::{ReplicaSource, Scratch};
pub use status::{Scope, State, Status, history, status};

use std::path::{Path, PathBuf};

use crate::crypt::Keys;
use crate::digest::hex;
use crate::page::{JournalMode, Snapshot};
use crate::protocol::compress::CompressMode;
use crate::protocol::control::KeyInfo;
use crate::remote::{Server, blocking};
use crate::store::{ReplicaPath, Selector};
use crate::{Error, ErrorKind, Result};

/// Where a replica lives and the key to reach it, as the user named them (`--server`,
/// `--key` and their environment variables); `None` where nothing was named.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// The store's URL: `ws://`, `wss://` or `file://`.
    pub server: Option<String>,
    /// The key for a server.
    pub key: Option<String>,
    /// How pages are compressed on the way to and from a server (`--compress`; `None`:
    /// `SQLFERRY_COMPRESS`, else `auto`).
    pub compress: Option<CompressMode>,
    /// The object storage endpoint for an `s3://` store (`--s3-endpoint`; `None`:
    /// `AWS_ENDPOINT_URL`, else AWS S3).
    pub s3_endpoint: Option<String>,
}

/// The server a command on a local database uses, and why.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The server.
    pub server: Server,
    /// Set when no store was named and the server is the one LOCAL's saved key is for:
    /// that server's URL as saved (the command line says so on stderr).
    pub from_saved_key: Option<String>,
}

impl Connection {
    /// The server: the one named, else the settings file's, else the embedded store.
    pub async fn resolve(&self) -> Result<Server> {
        let this = self.clone();
        blocking(move || this.resolve_now()).await
    }

    /// The server for a command on the local database `local` (push, pull): as
    /// [`Connection::resolve`], except when no store is named at all (no server, no
    /// setting) and the secrets file keeps a key for `local` on a server: a database
    /// pushed to a server is never silently synced with the embedded store instead. For
    /// the replica that key is for, that server is used (and [`Resolved`] says so); for
    /// another replica the command is refused, naming both choices, since either store
    /// could be meant.
    pub async fn resolve_for(&self, local: &Path, replica: &ReplicaPath) -> Result<Resolved> {
        let (this, local, replica) = (self.clone(), local.to_owned(), replica.clone());
        blocking(move || this.resolve_for_now(&local, &replica)).await
    }

    /// The key: the one named, else one saved for `replica` on `server` (the one saved
    /// for `database` first; a PUSH key also pulls and lists), found by the server's
    /// URL or else by its id ([`saved_key`]).
    pub async fn key_for(
        &self,
        server: &Server,
        replica: &ReplicaPath,
        database: Option<&Path>,
    ) -> Result<Option<String>> {
        if let Some(key) = &self.key {
            return Ok(Some(key.clone()));
        }
        // As before keys could be found by id: a secrets file that cannot be read
        // gives no key here (the command then says a key is missing), not an error.
        Ok(saved_key(server, replica, database)
            .await
            .ok()
            .flatten()
            .map(|saved| saved.key))
    }

    /// The server and the key for a command on `replica` alone (no local database).
    pub(crate) async fn resolve_with_key(
        &self,
        replica: &ReplicaPath,
    ) -> Result<(Server, Option<String>)> {
        let server = self.resolve().await?;
        let key = self.key_for(&server, replica, None).await?;
        Ok((server, key))
    }

    // The settings and secrets files are read on a blocking thread: these do the
    // reading.

    fn resolve_now(&self) -> Result<Server> {
        match &self.server {
            Some(url) => Server::parse(Some(url)),
            None => Server::parse(crate::config::Settings::load()?.server.as_deref()),
        }
        .and_then(|s| self.endpoint_for(s.with_compress(self.compress)))
    }

    /// `server` with `--s3-endpoint` when it is an S3 store; the flag with any other
    /// store is refused (as `serve` refuses it without `--store s3://…`), not ignored.
    fn endpoint_for(&self, server: Server) -> Result<Server> {
        match (&server, self.s3_endpoint.as_deref()) {
            (Server::S3 { .. }, endpoint) => Ok(server.with_s3_endpoint(endpoint)),
            (_, None) => Ok(server),
            (_, Some(_)) => Err(Error::Usage(format!(
                "--s3-endpoint is for --server s3://BUCKET/PREFIX, not {}",
                server.url()
            ))),
        }
    }

    fn resolve_for_now(&self, local: &Path, replica: &ReplicaPath) -> Result<Resolved> {
        let plain = |server| Resolved {
            server,
            from_saved_key: None,
        };
        if self.server.is_some() || crate::config::Settings::load()?.server.is_some() {
            return self.resolve_now().map(plain);
        }
        match saved_secret(local)? {
            Some(saved) if saved.replica == replica.as_str() => Ok(Resolved {
                server: self.endpoint_for(
                    Server::parse(Some(&saved.server))?.with_compress(self.compress),
                )?,
                from_saved_key: Some(saved.server),
            }),
            Some(saved) => Err(Error::Usage(format!(
                "{} was pushed to {} on {}, and no store is named for {replica}: add \
                 --server {} for that server, or --server {} for the embedded store",
                local.display(),
                saved.replica,
                saved.server,
                saved.server,
                self.resolve_now()?.url()
            ))),
            None => self.resolve_now().map(plain),
        }
    }
}

/// `e`, said plainly when a full disk is its cause: the disk holding `dir` (LOCAL's
/// directory, or the embedded store's) named as full, what to do (`again`) and what
/// was left as it was (`left`), in front of the system's or SQLite's own words. Only a
/// local file's error (exit 3) is looked at: one that says so itself, or (SQLite names
/// a full tmpfs "disk I/O error") one while a small probe write in `dir` finds no room.
/// Any other error is returned as it is.
async fn on_full_disk(e: Error, dir: &Path, left: String, again: &str) -> Error {
    if e.kind() != ErrorKind::LocalIo {
        return e;
    }
    let probed = dir.to_owned();
    let full = e.says_disk_full()
        || blocking(move || Ok(crate::error::disk_full(&probed)))
            .await
            .unwrap_or(false);
    match full {
        true => e.context(format!(
            "the disk holding {} is full: free some space there and {again}; {left}",
            dir.display()
        )),
        false => e,
    }
}

/// Records a push or pull (`op`) of the database `database` as `version` of `replica`
/// on `server` (whose id is `server_id`, when it sent one) in the local history, on a
/// blocking thread: the base of the next push and what the next pull checks LOCAL
/// against, through this URL or any other of the same server.
async fn record_sync(
    database: &Path,
    (server, server_id): (&Server, Option<String>),
    replica: &ReplicaPath,
    (version, digest): (u64, &str),
    op: &str,
    reserved: crate::history::Reserved,
) -> Result<()> {
    let sync = crate::history::LastSync::now(
        database,
        server.url(),
        replica.as_str(),
        version,
        digest,
        op,
    )
    .with_server_id(server_id);
    blocking(move || {
        crate::history::record_into(&sync, reserved);
        Ok(())
    })
    .await
}

/// Room for the records of a sync about to start ([`crate::history::reserve`]), taken
/// on a blocking thread. On a full disk, the sync must not start: `e` says so, `left`
/// what was left as it was and `again` what to do once there is room.
async fn reserve_records(left: String, again: &str) -> Result<crate::history::Reserved> {
    match blocking(crate::history::reserve).await {
        Ok(reserved) => Ok(reserved),
        Err(e) => {
            let dir = crate::config::state_dir()
                .map(|d| d.join("history"))
                .unwrap_or_default();
            Err(on_full_disk(e, &dir, left, again).await)
        }
    }
}

/// The last sync of `database` with `replica` on `server` ([`crate::history::last_with`]);
/// when none was recorded under this URL, the server is asked for its id (one `GET
/// /api/health`, no key) and a sync through another URL of the same server is taken
/// (servers sharing `serve --meta` share their id): a machine that pushed through one
/// server's URL pulls through another's as from the same store. A server that cannot be
/// asked, or sends no id, finds nothing more.
pub async fn last_sync(
    database: &Path,
    server: &Server,
    replica: &ReplicaPath,
) -> Result<Option<crate::history::LastSync>> {
    let (db, url, name) = (database.to_owned(), server.url(), replica.to_string());
    let by_url = blocking(move || Ok(crate::history::last_with(&db, &url, &name))).await?;
    if by_url.is_some() || !server.needs_key() {
        return Ok(by_url);
    }
    let url = server.url();
    let Some(id) = asked_server_id(&url).await else {
        return Ok(None);
    };
    let (db, name) = (database.to_owned(), replica.to_string());
    blocking(move || Ok(crate::history::last_by_id(&db, &id, &name))).await
}

/// A sync log entry for a sync of `database` with `replica` on `store` that started at
/// `started` and ended with `result` (its figures, the version, whether it made one).
fn logged(
    database: &Path,
    store: String,
    replica: &str,
    (op, trigger): (&'static str, &'static str),
    started: std::time::Instant,
    result: std::result::Result<(&crate::engine::SyncStats, u64, bool), &Error>,
) -> crate::synclog::Sync {
    let (pages, bytes, version, created, error) = match result {
        Ok((stats, version, created)) => {
            let bytes = if op == "push" {
                stats.bytes_sent
            } else {
                stats.bytes_received
            };
            let version = (version > 0).then_some(version);
            (u64::from(stats.pages_sent), bytes, version, created, None)
        }
        Err(e) => (0, 0, None, false, Some(e.to_string())),
    };
    let duration = started.elapsed();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    crate::synclog::Sync {
        at: now.as_secs() as i64,
        started_ms: now.saturating_sub(duration).as_millis() as i64,
        database: database.to_string_lossy().into_owned(),
        store,
        replica: replica.to_owned(),
        op,
        trigger: trigger.to_owned(),
        pages,
        bytes,
        duration,
        version,
        created,
        error,
    }
}

/// Records `sync` in the sync log on a blocking thread; never fails the sync.
async fn log_sync(sync: crate::synclog::Sync) {
    let _ = blocking(move || {
        crate::synclog::record(&sync);
        Ok(())
    })
    .await;
}

/// The saved entry for `replica` on `server`: the one for `database` first, else any
/// for the replica. Matched by the server's URL as written; when none matches and an
/// entry for the replica was saved under another URL with its server's id, `server` is
/// asked for its id (`GET /api/health`, no key) and an entry with that id is taken: so
/// `ws://localhost:7878` finds the key saved for `ws://127.0.0.1:7878`. A server that
/// cannot be asked finds nothing here; connecting to it then says why.
pub async fn saved_key(
    server: &Server,
    replica: &ReplicaPath,
    database: Option<&Path>,
) -> Result<Option<crate::config::Secret>> {
    let url = server.url();
    let secrets = blocking(crate::config::Secrets::load).await?;
    if let Some(saved) = secrets.entry_for(&url, replica.as_str(), database) {
        return Ok(Some(saved.clone()));
    }
    if !server.needs_key() || !secrets.may_know_by_id(&url, replica.as_str()) {
        return Ok(None);
    }
    let Some(id) = asked_server_id(&url).await else {
        return Ok(None);
    };
    Ok(secrets
        .key_for_server_id(&id, replica.as_str(), database)
        .cloned())
}

/// The secrets file's entry for `local`: saved under the database's key, or, before
/// keys resolved links, under its absolute path.
fn saved_secret(local: &Path) -> Result<Option<crate::config::Secret>> {
    let database = crate::config::database_key(local);
    let absolute = std::path::absolute(local).ok();
    let secrets = crate::config::Secrets::load()?;
    Ok([Some(&database), absolute.as_ref()]
        .into_iter()
        .flatten()
        .find_map(|db| secrets.for_database(db))
        .cloned())
}

/// Every version of `replica`, oldest first. Any key saved for the replica will do:
/// listing versions needs only pull rights.
pub async fn versions(
    connection: &Connection,
    replica: &ReplicaPath,
) -> Result<Vec<crate::store::VersionInfo>> {
    let (server, key) = connection.resolve_with_key(replica).await?;
    server
        .versions_with_stored_bytes(replica, key.as_deref())
        .await
}

/// Shows `replica`'s retention policy, or changes it first (a server needs the admin
/// key: the saved key, a PUSH key, is refused with a message saying so).
pub async fn retention(
    connection: &Connection,
    replica: &ReplicaPath,
    change: crate::remote::RetentionChange,
) -> Result<crate::store::Retention> {
    let (server, key) = connection.resolve_with_key(replica).await?;
    server.retention(replica, change, key.as_deref()).await
}

/// Sets (or with `None` removes) the store's default retention policy: only the
/// embedded store keeps one this way; a server's comes from `serve --retention`.
pub async fn set_default_retention(
    connection: &Connection,
    policy: Option<crate::store::RetentionPolicy>,
) -> Result<Option<crate::store::RetentionPolicy>> {
    match connection.resolve().await? {
        Server::Embedded(store) => {
            blocking(move || {
                store.set_default_retention(policy.as_ref())?;
                store.default_retention()
            })
            .await
        }
        Server::S3 { .. } => Err(crate::store::not_with_s3(
            "a store-wide default retention policy (retention --default)",
        )),
        Server::Ws { url, .. } => Err(Error::Usage(format!(
            "{url} keeps its default retention policy in its command line: `sqlferry serve --retention keep-last=30,...`; per replica, `sqlferry retention REMOTE --keep-last N` with the admin key"
        ))),
    }
}

/// The store's default retention policy (embedded store only; see
/// [`set_default_retention`]).
pub async fn default_retention(
    connection: &Connection,
) -> Result<Option<crate::store::RetentionPolicy>> {
    match connection.resolve().await? {
        Server::Embedded(store) => blocking(move || store.default_retention()).await,
        Server::S3 { .. } => Err(crate::store::not_with_s3(
            "a store-wide default retention policy (retention --default)",
        )),
        Server::Ws { url, .. } => Err(Error::Usage(format!(
            "{url} keeps its default retention policy in its command line (`sqlferry serve --retention`); ask for a replica's: `sqlferry retention REMOTE`"
        ))),
    }
}

/// Prunes `replica` by its retention policy (see [`Server::prune`]).
pub async fn prune(
    connection: &Connection,
    replica: &ReplicaPath,
    dry_run: bool,
) -> Result<crate::store::PruneReport> {
    let (server, key) = connection.resolve_with_key(replica).await?;
    server.prune(replica, dry_run, key.as_deref()).await
}

/// Asks every running subscriber of `replica` to sync now; returns how many were
/// reached (see [`Server::sync_now`]). A server needs a PUSH or admin key.
pub async fn sync_now(connection: &Connection, replica: &ReplicaPath) -> Result<u64> {
    let (server, key) = connection.resolve_with_key(replica).await?;
    if server.needs_key() && key.is_none() {
        return Err(Error::Auth(format!(
            "no key for {replica} on {}: pass --key or set SQLFERRY_KEY (a PUSH or admin key)",
            server.url()
        )));
    }
    server.sync_now(replica, key.as_deref()).await
}

/// The server's keys, only those of the replica `remote` names when it names one (a
/// `ws://`/`wss://` URL names the server instead, and wins over the connection's).
pub async fn keys(connection: &Connection, remote: Option<&str>) -> Result<Vec<KeyInfo>> {
    let (server, replica) = key_target(connection, remote).await?;
    server
        .keys(replica.as_ref(), connection.key.as_deref())
        .await
}

/// Revokes the key with id `key_id` (16 hex digits), of the replica `remote` names when
/// it names one, and returns it.
pub async fn revoke_key(
    connection: &Connection,
    remote: Option<&str>,
    key_id: &str,
) -> Result<KeyInfo> {
    let (server, replica) = key_target(connection, remote).await?;
    server
        .revoke_key(key_id, replica.as_ref(), connection.key.as_deref())
        .await
}

/// The server and the replica filter REMOTE names: a `ws://`/`wss://` URL is the
/// server (it wins over `--server`); anything else is a replica path.
async fn key_target(
    connection: &Connection,
    remote: Option<&str>,
) -> Result<(Server, Option<ReplicaPath>)> {
    match remote {
        Some(url) if url.starts_with("ws://") || url.starts_with("wss://") => {
            Ok((Server::parse(Some(url))?, None))
        }
        Some(replica) => {
            let replica = ReplicaPath::parse(replica)?;
            Ok((connection.resolve().await?, Some(replica)))
        }
        None => Ok((connection.resolve().await?, None)),
    }
}

/// The store directory `scrub` checks: `data` (a server's data directory), else the
/// store `server` names, else the settings file's, else the embedded store. A `ws://`
/// server is scrubbed on its own machine, and a directory that is not there is not a
/// store.
pub async fn scrub_root(data: Option<PathBuf>, server: Option<String>) -> Result<PathBuf> {
    blocking(move || {
        let root = match data {
            Some(dir) => dir,
            None => {
                let url = match server {
                    Some(u) => Some(u),
                    None => crate::config::Settings::load()?.server,
                };
                match Server::parse(url.as_deref())? {
                    Server::Embedded(store) => store.root().to_owned(),
                    Server::S3 { .. } => return Err(crate::store::not_with_s3("scrub")),
                    Server::Ws { url, .. } => {
                        return Err(Error::Usage(format!(
                            "{url} is a server: run `sqlferry scrub --data DIR` on its machine, with its data directory"
                        )));
                    }
                }
            }
        };
        if !root.is_dir() {
            return Err(Error::NotFound(format!(
                "{}: no such store directory",
                root.display()
            )));
        }
        Ok(root)
    })
    .await
}

/// Checks every stored page and version of the store at `root` (see
/// [`Store::scrub`](crate::store::Store::scrub)), telling `progress` as it goes.
pub async fn scrub(
    root: &Path,
    mut progress: impl FnMut(&crate::store::ScrubProgress) + Send + 'static,
) -> Result<crate::store::ScrubReport> {
    let store = crate::store::Store::new(root);
    let what = format!("scrubbing {}", root.display());
    blocking(move || store.scrub(&mut progress))
        .await
        .map_err(|e| e.context(what))
}

/// What `verify` finds: a database's digest, shape and integrity (the JSON `verify
/// --json` prints).
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    /// The file checked, or `namespace/name@N` for a stored version.
    pub file: PathBuf,
    /// The replica, for a stored version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// The version, for a stored version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// The whole-database digest (digest 1), hex.
    pub digest: String,
    /// The chunked digest of the same pages (`c:` + hex): what a version recorded only
    /// in that form is compared with.
    pub digest2: String,
    /// Both digests, as made.
    #[serde(skip)]
    pub digests: crate::digest::Digests,
    /// The page size in bytes.
    pub page_size: u32,
    /// The number of pages.
    pub page_count: u32,
    /// The database's journal mode.
    pub journal_mode: JournalMode,
    /// `PRAGMA integrity_check`'s lines (`["ok"]` when sound), and for a stored version
    /// a line when its digest differs from the one the store recorded.
    pub integrity: Vec<String>,
}

impl VerifyReport {
    /// Whether everything checked is sound.
    pub fn is_ok(&self) -> bool {
        self.integrity == ["ok"]
    }
}

/// Hashes every page of the database at `path` afresh and runs its integrity check.
pub async fn verify_file(path: &Path) -> Result<VerifyReport> {
    let path = path.to_owned();
    blocking(move || check(&path)).await
}

/// `verify` of a stored version of an encrypted replica opens it with its key, as a
/// pull does: the digest the store recorded is over page identities the client alone
/// can make, and the plaintext one is in the version's seal. Without a key, refused
/// before anything is fetched (exit 5, saying how to give it); with keys, every
/// version in `versions` whose key id is not among them is named up front (exit 5).
fn check_encryption(
    replica: &ReplicaPath,
    versions: &[crate::store::VersionInfo],
    encryption: Option<&Keys>,
) -> Result<()> {
    let Some(id) = versions.iter().rev().find_map(|v| v.encryption.as_deref()) else {
        return Ok(());
    };
    let Some(keys) = encryption else {
        return Err(Error::Auth(format!(
            "{replica} is encrypted (key id {id}): give its key to verify it \
             (--encryption-key-file FILE, --passphrase-file FILE or SQLFERRY_ENCRYPTION_KEY); \
             nothing was fetched"
        )));
    };
    let missing: Vec<(u64, &str)> = versions
        .iter()
        .filter_map(|v| Some((v.number, v.encryption.as_deref()?)))
        .filter(|(_, id)| keys.find(id).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut needed: Vec<&str> = missing.iter().map(|(_, id)| *id).collect();
    needed.sort_unstable();
    needed.dedup();
    let numbers: Vec<String> = missing.iter().map(|(n, _)| n.to_string()).collect();
    Err(Error::Auth(format!(
        "version{} {} of {replica} {} made with key id{} {}, and the keys given have ids {}: \
         give {} (--encryption-key-file or --passphrase-file, more than once for several); \
         nothing was fetched",
        if numbers.len() == 1 { "" } else { "s" },
        numbers.join(", "),
        if numbers.len() == 1 { "was" } else { "were" },
        if needed.len() == 1 { "" } else { "s" },
        needed.join(", "),
        keys.ids().join(", "),
        if needed.len() == 1 {
            "its key"
        } else {
            "their keys"
        },
    )))
}

/// Verifies `spec` as a stored version (`namespace/name[@N|@latest|@latest-N]`): it is
/// fetched whole into a temporary file, every page hashed again, and the result compared
/// with the digest the store recorded for it. `None` when `spec` does not name a
/// version (then it is a local file after all).
///
/// A version of an encrypted replica is opened with the key of `encryption` whose id it
/// names, as a pull opens it (every page's seal and identity checked, and the seal's
/// facts), into a temporary directory only its owner may enter, removed at the end, on
/// an error and on a signal; its pages are hashed again there and compared with the
/// plaintext digest its seal records.
pub async fn verify_stored(
    connection: &Connection,
    spec: &str,
    encryption: Option<&Keys>,
) -> Result<Option<VerifyReport>> {
    let Ok((replica, selector)) = Selector::split(spec) else {
        return Ok(None);
    };
    let (server, key) = connection.resolve_with_key(&replica).await?;
    let versions = server
        .versions(&replica, key.as_deref())
        .await
        .map_err(|e| e.context(format!("no file {spec} here either")))?;
    // The version's own key is checked by the pull, which names the one it needs: only
    // a missing key is refused here.
    if encryption.is_none() {
        check_encryption(&replica, &versions, None)?;
    }
    let scratch = Scratch::new()?;
    let copy = scratch.path("version.db");
    let pulled = server
        .pull(
            &replica,
            selector,
            &copy,
            (key.as_deref(), encryption),
            crate::remote::no_progress(),
        )
        .await
        .map_err(|e| e.context(format!("cannot fetch {replica}@{selector}")))?;
    // The temporary directory goes with the check, on the blocking thread.
    let mut report = blocking(move || {
        let report = check(&copy);
        drop(scratch);
        report
    })
    .await?;
    let recorded = versions.iter().find(|v| v.number == pulled.version);
    let differs = match pulled.encryption {
        Some(_) => sealed_digest_differs(
            pulled.stats.plaintext_digest.as_deref(),
            &report,
            pulled.version,
        ),
        None => digest_differs(recorded, &report, pulled.version),
    };
    if let Some(why) = differs {
        report.integrity.push(why);
    }
    report.file = PathBuf::from(format!("{replica}@{}", pulled.version));
    report.replica = Some(replica.to_string());
    report.version = Some(pulled.version);
    Ok(Some(report))
}

/// Why the restored file of `report` is not the version whose seal records the
/// plaintext digest `sealed` (hex), if it is not. The pull compared the pages it built
/// with that digest before it committed; this compares the file as written and read
/// back.
fn sealed_digest_differs(
    sealed: Option<&str>,
    report: &VerifyReport,
    number: u64,
) -> Option<String> {
    match sealed {
        Some(d) if d == report.digest => None,
        Some(d) => Some(format!(
            "digest {} differs from the one sealed with version {number}: {d}",
            report.digest
        )),
        None => Some(format!(
            "digest {} cannot be compared: the pull of version {number} opened no seal",
            report.digest
        )),
    }
}

/// One version's result in [`verify_all_versions`] (an element of `verify
/// --all-versions --json`'s `versions`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct VersionCheck {
    /// The version number.
    pub version: u64,
    /// Whether it restored with its recorded digest and its integrity check says ok.
    pub ok: bool,
    /// The digest of the restored file, hex; `None` when it could not be restored.
    pub digest: Option<String>,
    /// `PRAGMA integrity_check`'s lines on the restored file (empty when it could not
    /// be restored).
    pub integrity: Vec<String>,
    /// What failed, when something did: a damaged stored page, a digest that differs
    /// from the recorded one, an integrity check that is not ok.
    pub error: Option<String>,
}

/// Verifies every version of `replica`, oldest first, as [`verify_stored`] verifies
/// one: each is pulled into one temporary file and checked there (every page hashed
/// again, the digest compared with the recorded one, `PRAGMA integrity_check`).
///
/// The same file takes each version in turn, so only the pages that changed are read
/// again; every page a version uses was still read from the store and checked against
/// its hash, in this pull or an earlier successful one of this run (a failed pull
/// leaves the file at the last good version). A version that fails does not stop the
/// others: `each(done, total, check)` hears of every one, as it is checked. A failure
/// that is not the version's (the server unreachable, a wrong key) ends the run.
///
/// The versions of an encrypted replica are opened with `encryption` as
/// [`verify_stored`] opens one; a version whose key is not among them is named before
/// anything is fetched.
pub async fn verify_all_versions(
    connection: &Connection,
    replica: &str,
    encryption: Option<&Keys>,
    mut each: impl FnMut(usize, usize, &VersionCheck),
) -> Result<Vec<VersionCheck>> {
    if replica.contains('@') {
        return Err(Error::Usage(format!(
            "--all-versions checks every version of a replica: name it without @VERSION, not {replica}"
        )));
    }
    let replica = ReplicaPath::parse(replica)?;
    let (server, key) = connection.resolve_with_key(&replica).await?;
    let versions = server.versions(&replica, key.as_deref()).await?;
    check_encryption(&replica, &versions, encryption)?;
    let scratch = Scratch::new()?;
    let copy = scratch.path("version.db");
    let mut checks = Vec::with_capacity(versions.len());
    for (i, v) in versions.iter().enumerate() {
        let pulled = server
            .pull(
                &replica,
                Selector::Number(v.number),
                &copy,
                (key.as_deref(), encryption),
                crate::remote::no_progress(),
            )
            .await;
        let check = match pulled {
            Ok(pulled) => {
                let path = copy.clone();
                match blocking(move || check(&path)).await {
                    Ok(report) => {
                        let mut error = None;
                        let differs = match pulled.encryption {
                            Some(_) => sealed_digest_differs(
                                pulled.stats.plaintext_digest.as_deref(),
                                &report,
                                v.number,
                            ),
                            None => digest_differs(Some(v), &report, v.number),
                        };
                        if let Some(why) = differs {
                            error = Some(why);
                        } else if !report.is_ok() {
                            error =
                                Some(format!("integrity check: {}", report.integrity.join("; ")));
                        }
                        VersionCheck {
                            version: v.number,
                            ok: error.is_none(),
                            digest: Some(report.digest),
                            integrity: report.integrity,
                            error,
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Verification => failed_check(v.number, &e),
                    Err(e) => {
                        return Err(e.context(format!("cannot verify {replica}@{}", v.number)));
                    }
                }
            }
            // The version's own fault (a damaged or missing page), or gone meanwhile
            // (removed by a prune): that version failed; the others are still checked.
            Err(e) if matches!(e.kind(), ErrorKind::Verification | ErrorKind::NotFound) => {
                failed_check(v.number, &e)
            }
            Err(e) => return Err(e.context(format!("cannot fetch {replica}@{}", v.number))),
        };
        each(i + 1, versions.len(), &check);
        checks.push(check);
    }
    blocking(move || {
        drop(scratch);
        Ok(())
    })
    .await?;
    Ok(checks)
}

/// Why the restored file of `report` is not the version `recorded` says (number
/// `number`), if it is not: each digest the version recorded is compared with the
/// file's in the same form ([`crate::store::VersionInfo::check_digests`]).
fn digest_differs(
    recorded: Option<&crate::store::VersionInfo>,
    report: &VerifyReport,
    number: u64,
) -> Option<String> {
    let none = || {
        format!(
            "digest {} cannot be compared: no digest is recorded for version {number}",
            report.digest
        )
    };
    let Some(v) = recorded else {
        return Some(none());
    };
    match v.check_digests(&report.digests) {
        Ok(()) => None,
        Err((theirs, _)) if theirs.is_empty() => Some(none()),
        Err((theirs, ours)) => Some(format!(
            "digest {ours} differs from the one recorded for version {number}: {theirs}"
        )),
    }
}

/// A version that could not be restored or checked, and why.
fn failed_check(version: u64, e: &Error) -> VersionCheck {
    VersionCheck {
        version,
        ok: false,
        digest: None,
        integrity: Vec::new(),
        error: Some(e.to_string()),
    }
}

/// [`verify_file`]'s work, blocking.
fn check(path: &Path) -> Result<VerifyReport> {
    let mut snap = match Snapshot::open(path) {
        Ok(snap) => snap,
        // A file that is there and readable but is no valid database failed the
        // verification (7); a missing or unreadable one stays a local error (3).
        Err(e) if e.kind() == ErrorKind::NotADatabase => {
            return Err(Error::Verification(format!(
                "not a valid SQLite database: {e}"
            )));
        }
        Err(e) => return Err(e.context("cannot verify")),
    };
    let (page_size, page_count) = (snap.page_size(), snap.page_count());
    // Every page is hashed afresh here: verify is the check, it trusts no cache.
    let digests = snap.digests(true)?;
    let integrity = match snap.integrity_check() {
        Ok(lines) => lines,
        // SQLite could not even walk the file: that is the check's answer.
        Err(e) if e.kind() == ErrorKind::Verification => vec![e.to_string()],
        Err(e) => return Err(e),
    };
    Ok(VerifyReport {
        file: path.to_owned(),
        replica: None,
        version: None,
        digest: hex(&digests.one),
        digest2: crate::digest::digest_text(crate::digest::DigestForm::Chunked, &digests.chunked),
        digests,
        page_size,
        page_count,
        journal_mode: snap.journal_mode(),
        integrity,
    })
}

/// The id of the server at `url`, asked once; `None` when it sends none or cannot be
/// asked (the caller falls back to what it knows by URL).
async fn asked_server_id(url: &str) -> Option<String> {
    match crate::remote::server_id(url).await {
        Ok(id) => id,
        Err(e) => {
            tracing::debug!(server = %url, error = %e, "the server's id could not be asked");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A context reads `what: cause` on its own (a subscriber's failure line and its
    /// report to the server carry the cause) and keeps the cause's kind; the CLI's
    /// error line, which joins the sources, does not repeat it.
    #[test]
    fn a_context_reads_as_before_and_keeps_the_kind() {
        let e = Error::Disconnected("reset".into()).context("push a.db to acme/a.db failed");
        assert_eq!(e.kind(), ErrorKind::Disconnected);
        assert!(e.is_retryable());
        let line = crate::cli::error_line(&anyhow::Error::new(e));
        assert_eq!(
            line,
            "push a.db to acme/a.db failed: connection lost: reset"
        );
    }

    #[tokio::test]
    async fn an_s3_endpoint_is_for_an_s3_store_only() {
        let with_endpoint = |server: &str| Connection {
            server: Some(server.into()),
            key: None,
            compress: None,
            s3_endpoint: Some("http://127.0.0.1:9000".into()),
        };
        let e = with_endpoint("file:///var/lib/sqlferry")
            .resolve()
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
        assert_eq!(
            e.to_string(),
            "--s3-endpoint is for --server s3://BUCKET/PREFIX, not file:///var/lib/sqlferry"
        );
        let server = with_endpoint("s3://backups/sqlferry")
            .resolve()
            .await
            .unwrap();
        assert!(matches!(
            server,
            Server::S3 { endpoint: Some(e), .. } if e == "http://127.0.0.1:9000"
        ));
    }

    #[tokio::test]
    async fn keys_need_a_server() {
        let dir = tempfile::tempdir().unwrap();
        let connection = Connection {
            server: Some(format!("file://{}", dir.path().display())),
            key: None,
            compress: None,
            s3_endpoint: None,
        };
        let e = keys(&connection, None).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Usage, "{e}");
    }
}
