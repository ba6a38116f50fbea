//! Pull: one replica into one database (`pull` and the pull subscriber share a
//! [`Puller`]).
//!
//! Invariant: a pull never overwrites changes LOCAL holds that no sync carried (unless
//! `force`). LOCAL is compared, by digest, with what its last sync with this replica on
//! this server left in it (the local history); a LOCAL never synced with it must already
//! hold the version pulled. A refusal changes nothing and is
//! [`Error::LocalChanges`] (exit 9). The pull subscriber keeps the same promise between
//! its pulls ([`Kept`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::engine::Progress;
use crate::history;
use crate::page::{SealedHashes, Snapshot, Writer};
use crate::remote::{PullOutcome, Server, blocking};
use crate::store::{ReplicaPath, Selector, VersionInfo};
use crate::{Error, Result};

/// One replica pulled into one database.
#[derive(Debug, Clone)]
pub struct Puller {
    /// Where the replica lives.
    pub server: Server,
    /// The replica.
    pub replica: ReplicaPath,
    /// The database, as given.
    pub local: PathBuf,
    /// The database, absolute: the key of its history.
    pub database: PathBuf,
    /// The key (none for the embedded store).
    pub key: Option<String>,
    /// Overwrite changes of LOCAL that were never pushed.
    pub force: bool,
    /// The replica's encryption keys (docs/security.md): each version is opened with
    /// the one whose id it names, and its seal checked before LOCAL commits. `None`: a
    /// plaintext replica.
    pub encryption: Option<crate::crypt::Keys>,
}

/// Why LOCAL may not be overwritten: how its digest now differs from what it was
/// expected to be, for a person.
#[derive(Debug, Clone)]
pub struct LocalChange {
    /// What changed.
    pub why: String,
}

/// What a pull would do (`pull --dry-run`); nothing was changed to find out.
#[derive(Debug)]
pub struct PullPlan {
    /// The version that would be pulled.
    pub target: VersionInfo,
    /// LOCAL's digest now (`Ok(None)`: it holds nothing; `Err`: it cannot be read).
    pub local_digest: Result<Option<LocalDigest>>,
    /// Why the pull would be refused, if it would (never with `force`).
    pub refusal: Option<Error>,
}

impl Puller {
    /// Pulls the version `selector` names; records it in the local history. Refused
    /// ([`Error::LocalChanges`], nothing changed) when LOCAL holds changes that were
    /// never pushed, unless `force`.
    pub async fn pull(
        &self,
        selector: Selector,
        progress: Arc<dyn Progress>,
    ) -> Result<PullOutcome> {
        let started = std::time::Instant::now();
        let result = self.pull_once(selector, progress).await;
        self.log(("pull", "manual"), started, &result).await;
        result
    }

    /// Records a pull that started at `started` in the sync log.
    async fn log(
        &self,
        (op, trigger): (&'static str, &'static str),
        started: std::time::Instant,
        result: &Result<PullOutcome>,
    ) {
        let sync = super::logged(
            &self.database,
            self.server.url(),
            self.replica.as_str(),
            (op, trigger),
            started,
            result.as_ref().map(|o| (&o.stats, o.version, false)),
        );
        super::log_sync(sync).await;
    }

    async fn pull_once(
        &self,
        selector: Selector,
        progress: Arc<dyn Progress>,
    ) -> Result<PullOutcome> {
        let (replica, local) = (&self.replica, &self.local);
        let seal = self.seal().await?;
        // Whether the check for local changes took LOCAL's digest from its seal.
        let mut proved = self.force;
        if !self.force {
            let (change, sealed) = self
                .local_change_with(None, selector, seal.as_ref())
                .await?;
            if let Some(change) = change {
                return Err(self.refusal(&change, selector));
            }
            proved = sealed;
        }
        let (path, database, url) = (local.clone(), self.database.clone(), self.server.url());
        let context = |e: Error| {
            e.context(format!(
                "pull {replica}@{selector} into {} failed",
                local.display()
            ))
        };
        let left = match path.exists() {
            true => format!("{} is as it was", local.display()),
            false => format!("{} was not made", local.display()),
        };
        let reserved = super::reserve_records(left.clone(), "pull again")
            .await
            .map_err(context)?;
        let name = replica.to_string();
        let old = seal.clone();
        let writer = blocking(move || {
            let mut writer = Writer::open(&path)?.seal_commits();
            if let Some(sealed) = old.and_then(|s| sealed_hashes(&database, &url, &name, &s)) {
                writer = writer.with_sealed_hashes(sealed);
            }
            Ok(writer)
        })
        .await?;
        let pulled = self
            .server
            .pull_into(
                replica,
                selector,
                writer,
                (self.key.as_deref(), self.encryption.as_ref()),
                progress,
            )
            .await;
        let (mut outcome, writer) = match pulled {
            Ok(pulled) => pulled,
            Err(e) => {
                let dir = self.database.parent().unwrap_or(Path::new("/"));
                return Err(context(
                    super::on_full_disk(e, dir, left, "pull again").await,
                ));
            }
        };
        outcome.local_sealed = proved && writer.used_sealed_hashes();
        self.record(&outcome, reserved).await?;
        let (database, url) = (self.database.clone(), self.server.url());
        let (name, pulled) = (replica.to_string(), outcome.clone());
        blocking(move || {
            keep_seal(&database, &url, &name, &writer, &pulled, seal.as_ref());
            // The writer's connection closes here, off the async threads.
            drop(writer);
            Ok(())
        })
        .await?;
        Ok(outcome)
    }

    /// The seal the last sync of LOCAL with this replica left, if any.
    async fn seal(&self) -> Result<Option<history::PushSeal>> {
        let (database, url, replica) = (
            self.database.clone(),
            self.server.url(),
            self.replica.to_string(),
        );
        blocking(move || Ok(history::load_seal(&database, &url, &replica))).await
    }

    /// Pulls the latest version through the writer `kept` from the previous pull, if it
    /// can serve again, else a new one; keeps the writer for the next pull. A writer
    /// kept across pulls knows the pages it committed, so as long as no one else writes
    /// LOCAL a pull does not read the whole file (see [`Writer::keep_committed_hashes`]).
    ///
    /// Never over changes that were never pushed (unless `force`): the previous pull of
    /// this subscriber is the base. When no other connection has committed to LOCAL
    /// since (`PRAGMA data_version` of a connection kept for that, and the same file)
    /// nothing is read; otherwise LOCAL's digest must still be the one that pull left.
    /// The first pull checks LOCAL as [`Puller::pull`] does.
    /// `trigger` says why, for the sync log (the subscriber's reason: `start`,
    /// `new-version`, …).
    pub async fn pull_latest_kept(
        &self,
        kept: &mut Kept,
        trigger: &'static str,
    ) -> Result<PullOutcome> {
        let started = std::time::Instant::now();
        let result = self.pull_latest_kept_once(kept).await;
        self.log(("pull", trigger), started, &result).await;
        result
    }

    async fn pull_latest_kept_once(&self, kept: &mut Kept) -> Result<PullOutcome> {
        let (replica, local) = (&self.replica, &self.local);
        let context =
            |e: Error| e.context(format!("pull {replica} into {} failed", local.display()));
        // Three crossings to the blocking pool per pull, not five: each one costs a
        // thread wake-up, and under a fan-out of many subscribers on few cores those
        // add up. The common case (nobody else wrote LOCAL) asks the kept connection
        // and readies the writer in one; the pull; then the kept state and the history
        // in one.
        let previous = kept.writer.take();
        let taken = std::mem::take(kept);
        let (path, check) = (local.clone(), !self.force);
        let (taken, writer) = blocking(move || {
            // The kept connection is SQLite: asked on a blocking thread.
            let writer = match !check || taken.untouched(&path) {
                true => Ok(ready_writer(&path, previous)),
                // LOCAL must be looked at first; the writer waits for that.
                false => Err(previous),
            };
            Ok((taken, writer))
        })
        .await?;
        *kept = taken;
        let writer = match writer {
            Ok(writer) => writer.map_err(context)?,
            Err(previous) => {
                let change = match kept.digest.clone() {
                    // Our own last pull is the base.
                    Some(ours) => {
                        tracing::debug!(path = %local.display(), "LOCAL may be written since the last pull: checking its digest");
                        let path = local.clone();
                        let now = blocking(move || local_digest(&path)).await?;
                        now.is_some_and(|n| !n.is(&ours)).then(|| LocalChange {
                            why: "it was written by another program since this subscriber's last pull"
                                .into(),
                        })
                    }
                    None => self.local_change(None, Selector::Latest).await?,
                };
                if let Some(change) = change {
                    drop(previous);
                    return Err(self.refusal(&change, Selector::Latest));
                }
                let path = local.clone();
                blocking(move || ready_writer(&path, previous))
                    .await
                    .map_err(context)?
            }
        };
        let (outcome, writer) = self
            .server
            .pull_into(
                replica,
                Selector::Latest,
                writer,
                (self.key.as_deref(), self.encryption.as_ref()),
                crate::remote::no_progress(),
            )
            .await
            .map_err(context)?;
        kept.writer = Some(writer);
        let mut taken = std::mem::take(kept);
        let (path, digest) = (local.clone(), outcome.stats.local_digest().to_owned());
        let sync = crate::history::LastSync::now(
            &self.database,
            self.server.url(),
            replica.as_str(),
            outcome.version,
            &digest,
            "pull",
        )
        .with_server_id(outcome.server_id.clone());
        *kept = blocking(move || {
            taken.pulled(&path, &digest);
            crate::history::record(&sync);
            Ok(taken)
        })
        .await?;
        Ok(outcome)
    }

    /// The version `selector` names, from the replica's list (`None`: there is none).
    pub async fn version_info(&self, selector: Selector) -> Result<Option<VersionInfo>> {
        let list = self
            .server
            .versions(&self.replica, self.key.as_deref())
            .await?;
        let number = selector.pick(&list);
        Ok(list.into_iter().find(|v| Some(v.number) == number))
    }

    /// Whether LOCAL holds changes no sync carried: its digest differs from the one its
    /// last sync with this replica left, or (never synced with it) from that of the
    /// version `selector` names. A LOCAL that does not exist or holds nothing has none,
    /// and neither has one that holds exactly the version pulled. That version is
    /// `known` when the caller has it, else it is looked up, only when needed.
    pub async fn local_change(
        &self,
        known: Option<&VersionInfo>,
        selector: Selector,
    ) -> Result<Option<LocalChange>> {
        let seal = self.seal().await?;
        Ok(self
            .local_change_with(known, selector, seal.as_ref())
            .await?
            .0)
    }

    /// [`Puller::local_change`], with LOCAL's digest taken from `seal` when LOCAL is
    /// in the seal's state (then nothing is read; the `bool` says so).
    async fn local_change_with(
        &self,
        known: Option<&VersionInfo>,
        selector: Selector,
        seal: Option<&history::PushSeal>,
    ) -> Result<(Option<LocalChange>, bool)> {
        let local = self.local.clone();
        let seal = seal.cloned();
        let found = blocking(move || {
            if !has_content(&local) {
                return Ok(None);
            }
            let (now, sealed) = sealed_or_read_digest(&local, seal.as_ref())?;
            Ok(now.map(|now| (now, sealed)))
        })
        .await?;
        let Some((now, sealed)) = found else {
            return Ok((None, false));
        };
        let last = super::last_sync(&self.database, &self.server, &self.replica).await?;
        let change = self.changed_from(known, selector, now, last).await?;
        Ok((change, sealed))
    }

    /// Whether LOCAL, whose digest is `now`, holds changes no sync carried, given its
    /// `last` sync with this replica.
    async fn changed_from(
        &self,
        known: Option<&VersionInfo>,
        selector: Selector,
        now: LocalDigest,
        last: Option<history::LastSync>,
    ) -> Result<Option<LocalChange>> {
        let url = self.server.url();
        let replica = self.replica.as_str();
        let target = async || match known {
            Some(v) => Ok(Some(v.clone())),
            None => self.version_info(selector).await,
        };
        if let Some(last) = last {
            // Not what the last recorded sync left may still be the version itself: a
            // pull killed after its COMMIT, before it recorded the sync.
            if now.is(&last.digest) {
                return Ok(None);
            }
            if let Some(v) = target().await?
                && self.holds(&now, &v).await
            {
                return Ok(None);
            }
            let when = crate::epoch::rfc3339(last.at);
            let op = match last.op.as_str() {
                "push" => "pushed as",
                "pull" => "pulled as",
                _ => "synced as",
            };
            return Ok(Some(LocalChange {
                why: format!(
                    "it changed since it was last {op} {replica}@{} at {when} (digest {} then, {} now)",
                    last.version,
                    short_digest(&last.digest),
                    short_digest(&now.shown())
                ),
            }));
        }
        Ok(match target().await? {
            Some(v) if self.holds(&now, &v).await => None,
            Some(v) => Some(LocalChange {
                why: format!(
                    "it was never pushed to or pulled from {replica} on {url}, and differs from version {} (digest {}, {} now)",
                    v.number,
                    short_digest(v.shown_digest()),
                    short_digest(&now.shown())
                ),
            }),
            // Nothing to pull: the pull fails on its own, without writing.
            None => None,
        })
    }

    /// Whether LOCAL, whose digest is `now`, holds version `v`. An encrypted version's
    /// digests are over page identities: LOCAL's are made under the key of its id, if
    /// it was given, reading LOCAL once; asked only where the pull would otherwise be
    /// refused. Any error making them is a no.
    async fn holds(&self, now: &LocalDigest, v: &VersionInfo) -> bool {
        if now.is_version(v) {
            return true;
        }
        let key = match (&self.encryption, v.encryption.as_deref()) {
            (Some(keys), Some(id)) => keys.find(id).cloned(),
            _ => None,
        };
        let Some(key) = key else {
            return false;
        };
        let local = self.local.clone();
        let Ok(mine) = blocking(move || Snapshot::open(&local)?.identity_digests(&key)).await
        else {
            return false;
        };
        LocalDigest::Read(mine).is_version(v)
    }

    /// The refusal of a pull over `change`: what changed, how to keep it, how to
    /// overwrite it; one line.
    pub fn refusal(&self, change: &LocalChange, selector: Selector) -> Error {
        let local = self.local.display();
        let replica = &self.replica;
        let server = match &self.server {
            Server::Embedded(_) if self.server.url() == default_store_url() => String::new(),
            s => format!(" --server {}", s.url()),
        };
        let spec = match selector {
            Selector::Latest => replica.to_string(),
            s => format!("{replica}@{s}"),
        };
        Error::LocalChanges(format!(
            "{local} has changes that were never pushed: {}; pulling would overwrite them, so \
             nothing was changed. To keep them, push them (sqlferry push {local} {replica}{server}) \
             or pull into another file (sqlferry pull {spec} {}{server}); to overwrite them: \
             sqlferry pull {spec} {local}{server} --force",
            change.why,
            other_file(&self.local).display(),
        ))
    }

    /// What a pull of `selector` would do: which version, what LOCAL holds, whether the
    /// pull would be refused. Changes nothing.
    pub async fn plan(&self, selector: Selector) -> Result<PullPlan> {
        let target = self.version_info(selector).await?.ok_or_else(|| {
            Error::NotFound(format!("{}@{selector} does not exist", self.replica))
        })?;
        let change = if self.force {
            None
        } else {
            self.local_change(Some(&target), selector).await?
        };
        let (local, seal) = (self.local.clone(), self.seal().await?);
        let local_digest =
            blocking(move || Ok(sealed_or_read_digest(&local, seal.as_ref()).map(|(d, _)| d)))
                .await?;
        Ok(PullPlan {
            target,
            local_digest,
            refusal: change.map(|c| self.refusal(&c, selector)),
        })
    }

    /// Records a pull in the local history, in the room `reserved` holds.
    async fn record(&self, outcome: &PullOutcome, reserved: history::Reserved) -> Result<()> {
        super::record_sync(
            &self.database,
            (&self.server, outcome.server_id.clone()),
            &self.replica,
            // The database's own digest: an encrypted pull's plaintext one.
            (outcome.version, outcome.stats.local_digest()),
            "pull",
            reserved,
        )
        .await
    }
}

/// The writer for a subscriber's next pull: the last pull's, if it is ready again,
/// else a new one. A writer that fails to get ready is dropped; it is closed before the
/// new one opens the file (a handle closed under a live connection would drop that
/// connection's locks).
fn ready_writer(path: &Path, previous: Option<Writer>) -> Result<Writer> {
    let open = || Ok(Writer::open(path)?.keep_committed_hashes());
    match previous {
        Some(mut w) => match w.ready_again()? {
            true => Ok(w),
            false => {
                drop(w);
                open()
            }
        },
        None => open(),
    }
}

/// What a pull subscriber keeps between its pulls: the writer, and what tells whether
/// anyone else wrote LOCAL since its last pull.
#[derive(Default)]
pub struct Kept {
    /// The writer of the last pull, for the next ([`Writer::keep_committed_hashes`]).
    writer: Option<Writer>,
    /// A read-only connection to LOCAL that only asks `PRAGMA data_version`: its answer
    /// changes when any other connection commits, the writer's included, so it is read
    /// right after each pull. SQLite shares the file's locks between connections of one
    /// process, so this one never drops the writer's.
    watch: Option<rusqlite::Connection>,
    /// Its data version, and LOCAL's (device, inode), right after the last pull.
    seen: Option<(i64, (u64, u64))>,
    /// The digest the last pull left LOCAL with.
    digest: Option<String>,
}

impl std::fmt::Debug for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kept")
            .field("seen", &self.seen)
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

impl Kept {
    /// Whether LOCAL is certainly as the last pull left it: same file, and no other
    /// connection has committed since. `false` when unsure (then the digest decides).
    fn untouched(&self, local: &Path) -> bool {
        let (Some(conn), Some((version, id))) = (&self.watch, self.seen) else {
            return false;
        };
        identity(local) == Some(id) && data_version(conn) == Some(version)
    }

    /// Notes what a pull just left in LOCAL.
    fn pulled(&mut self, local: &Path, digest: &str) {
        self.digest = Some(digest.to_owned());
        if self.watch.is_none() {
            self.watch = rusqlite::Connection::open_with_flags(
                local,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .ok();
        }
        self.seen = match (&self.watch, identity(local)) {
            (Some(conn), Some(id)) => data_version(conn).map(|v| (v, id)),
            _ => None,
        };
    }
}

fn data_version(conn: &rusqlite::Connection) -> Option<i64> {
    conn.query_row("PRAGMA data_version", [], |r| r.get(0)).ok()
}

fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Whether `path` is a file with something in it (a missing or empty LOCAL holds
/// nothing a pull could lose).
fn has_content(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() > 0)
}

/// The digest of the database at `path` now, through the page-hash cache: pages
/// unchanged since they were last hashed are read, not hashed. `None` when it holds
/// nothing a pull could lose: no pages, or only a page 1 with an empty schema (a
/// database an application created and never wrote, or one made by `sqlite3 new.db
/// "PRAGMA journal_mode=WAL"`). Blocking (SQLite): async callers run it on
/// `spawn_blocking`.
pub fn local_digest(path: &Path) -> Result<Option<LocalDigest>> {
    let mut snap = match Snapshot::open(path) {
        Ok(s) => s,
        Err(e) if !has_content(path) && e.kind() == crate::ErrorKind::NotADatabase => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    if snap.page_count() <= 1 {
        // Page 1's b-tree header follows the 100-byte file header; bytes 3-4 of it
        // count the schema's rows.
        let mut page1 = Vec::new();
        snap.read_page(1, &mut page1)?;
        if page1.get(103..105).is_none_or(|cells| cells == [0, 0]) {
            return Ok(None);
        }
    }
    Ok(Some(LocalDigest::Read(snap.digests(false)?)))
}

/// LOCAL's digest, in the forms known: both when LOCAL was read, the seal's own when
/// a seal proved LOCAL unchanged since the sync that recorded it. A recorded digest is
/// compared with it in its own form, never across forms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalDigest {
    /// Made from LOCAL's page hashes now: both forms.
    Read(crate::digest::Digests),
    /// The seal's digest (text, either form).
    Sealed(String),
}

impl LocalDigest {
    /// Whether `recorded` (text, either form) is LOCAL's digest. A sealed digest in
    /// the other form than `recorded` does not say, and answers `false`: a seal and the
    /// history record it goes with come from one sync, so they are in one form.
    pub fn is(&self, recorded: &str) -> bool {
        match self {
            LocalDigest::Read(d) => d.matches(recorded),
            LocalDigest::Sealed(t) => !t.is_empty() && t == recorded,
        }
    }

    /// Whether LOCAL holds version `v`: its digest in a form `v` recorded.
    pub fn is_version(&self, v: &VersionInfo) -> bool {
        match self {
            LocalDigest::Read(d) => {
                (!v.digest.is_empty() && d.matches(&v.digest))
                    || v.digest2.as_deref().is_some_and(|c| d.matches(c))
            }
            LocalDigest::Sealed(t) => v.has_digest(t),
        }
    }

    /// The digest to show: digest 1 when LOCAL was read, else the seal's.
    pub fn shown(&self) -> String {
        match self {
            LocalDigest::Read(d) => crate::digest::hex(&d.one),
            LocalDigest::Sealed(t) => t.clone(),
        }
    }
}

/// LOCAL's digest from `seal` when a snapshot of it now is in the seal's state
/// (`Snapshot::local_state`; nothing is read but the file's facts and its wal-index
/// header), else [`local_digest`]; the `bool` says whether the seal gave it.
fn sealed_or_read_digest(
    path: &Path,
    seal: Option<&history::PushSeal>,
) -> Result<(Option<LocalDigest>, bool)> {
    if let Some(seal) = seal
        && let Ok(snap) = Snapshot::open(path)
        && snap
            .local_state()
            .is_some_and(|s| s.to_token() == seal.source)
    {
        return Ok((Some(LocalDigest::Sealed(seal.digest.clone())), true));
    }
    Ok((local_digest(path)?, false))
}

/// LOCAL's page hashes as its `seal` names them: the kept manifest of the seal's
/// version, when it makes the seal's digest, in the seal's form (read once here to
/// check it; the writer checks it again, by digest 1, as it uses it). `None` when there
/// is no such manifest.
fn sealed_hashes(
    database: &Path,
    url: &str,
    replica: &str,
    seal: &history::PushSeal,
) -> Option<SealedHashes> {
    let (header, hashes) = history::load_manifest(database, url, replica, seal.version)?;
    let mut made = crate::digest::BothDigester::new(header.page_size, header.page_count);
    for h in hashes {
        made.push(&h.ok()?);
    }
    let made = made.finish()?;
    if !made.matches(&seal.digest) {
        tracing::debug!(replica, "the kept manifest does not make the seal's digest");
        return None;
    }
    let digest = made.one;
    let (again, hashes) = history::load_manifest(database, url, replica, seal.version)?;
    (again == header).then_some(())?;
    Some(SealedHashes {
        state: seal.source.clone(),
        digest,
        page_size: header.page_size,
        page_count: header.page_count,
        hashes: Box::new(hashes),
    })
}

/// After a pull through `writer` (asked to seal its commits): keeps the seal of the
/// state it left LOCAL in and the pulled version's manifest, for the next sync; or
/// removes the old seal when the state could not be proved. The manifest is not
/// written again when it is already the one kept (the same version, nothing written,
/// its hashes used). Failures are logged, not fatal: the next pull reads LOCAL.
fn keep_seal(
    database: &Path,
    url: &str,
    replica: &str,
    writer: &Writer,
    pulled: &PullOutcome,
    old: Option<&history::PushSeal>,
) {
    let Some((state, mut hashes)) = writer.committed_seal() else {
        history::remove_seal(database, url, replica);
        return;
    };
    let same_manifest = writer.used_sealed_hashes()
        && pulled.stats.pages_sent == 0
        && old.is_some_and(|s| {
            s.version == pulled.version && s.digest == pulled.stats.local_digest()
        });
    if !same_manifest {
        let header = history::ManifestHeader {
            server: url.to_owned(),
            replica: replica.to_owned(),
            version: pulled.version,
            page_size: state.page_size(),
            page_count: state.page_count(),
        };
        // The seal goes first, and is written again only after the manifest it names:
        // a seal never names a manifest that is not there (and would only be refused).
        history::remove_seal(database, url, replica);
        history::save_manifest(database, &header, &mut hashes);
    }
    history::save_seal(
        database,
        &history::PushSeal {
            server: url.to_owned(),
            replica: replica.to_owned(),
            version: pulled.version,
            // LOCAL's digest, as the manifest kept beside it (the writer's page
            // hashes, plaintext also after an encrypted pull) makes it.
            digest: pulled.stats.local_digest().to_owned(),
            checked: false,
            source: state.to_token(),
        },
    );
}

/// Why `local` holds changes no sync of `replica` carried, if it does: a file that
/// does not exist, or whose digest is the one of its last sync with `replica`, has
/// none. (Asked before a push subscriber that holds only a PULL key follows the replica
/// instead: following writes LOCAL.)
pub async fn unsynced_changes(
    local: &Path,
    server: &Server,
    replica: &ReplicaPath,
) -> Result<Option<&'static str>> {
    let (local, url, replica) = (local.to_owned(), server.url(), replica.clone());
    blocking(move || {
        if !local.exists() {
            return Ok(None);
        }
        let database = crate::config::database_key(&local);
        let Some(last) = history::last_with(&database, &url, replica.as_str()) else {
            return Ok(Some("was never pulled from it"));
        };
        let now = local_digest(&local)?;
        Ok((!now.is_some_and(|n| n.is(&last.digest))).then_some("has changed since its last sync"))
    })
    .await
}

/// The first 12 hex digits of a digest, for messages.
pub fn short_digest(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

/// The embedded store's URL when no server is named.
fn default_store_url() -> String {
    Server::parse(None).map_or_else(|_| String::new(), |s| s.url())
}

/// Where to pull instead of LOCAL to keep it: `app.db` → `app.pulled.db`.
fn other_file(local: &Path) -> PathBuf {
    let stem = local
        .file_stem()
        .map_or_else(Default::default, |s| s.to_owned());
    let mut name = stem;
    name.push(".pulled");
    if let Some(ext) = local.extension() {
        name.push(".");
        name.push(ext);
    }
    local.with_file_name(name)
}
