//! Push: one database to one replica, again and again (`push` and the push subscriber
//! share a [`Pusher`]), and a push between two local files.
//!
//! Each push takes its base version from the local history, so a subscriber's pushes
//! chain without conflicts, and with the manifest this client kept of that version no
//! hash travels. The first push of a replica with the admin key leaves its new PUSH key
//! in the secrets file and its PULL key in a sidecar beside the database.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{Secret, Sidecar};
use crate::engine::{PageSource, Progress, ScanFn, SyncStats, sync_local};
use crate::history;
use crate::merge::OnConflict;
use crate::page::{Snapshot, Writer};
use crate::remote::{
    Followers, Merged, PushOutcome, PushRequest, Server, blocking, check_source, quick_check_source,
};
use crate::store::{PushOptions, ReplicaPath};
use crate::{Error, ErrorKind, Result};

/// One database pushed to one replica.
#[derive(Debug)]
pub struct Pusher {
    /// The database, as given.
    pub local: PathBuf,
    /// The database, absolute: the key of its history and saved key.
    pub database: PathBuf,
    /// The replica.
    pub replica: ReplicaPath,
    /// Where it lives.
    pub server: Server,
    /// The key (none for the embedded store).
    pub key: Option<String>,
    /// Whether the key was saved for this database by an earlier push (a PUSH key).
    stored: bool,
    /// Whether the saved key's entry lacks the server's id (an older sqlferry saved
    /// it): the next push that learns the id writes it in.
    saved_without_id: bool,
    /// Whether the secrets file was searched by the server's id already
    /// ([`Pusher::find_key_by_server_id`]): once per pusher, not once per push.
    id_searched: bool,
    /// The URL the saved key was found under when it was found by the server's id: the
    /// same server, so LOCAL's history with it there gives the next push's base.
    /// Boxed: a pusher is held in enums beside much smaller variants.
    alias: Option<Box<str>>,
    /// The commit message of each version.
    pub message: String,
    /// Push even if the replica moved past the base version.
    pub force: bool,
    /// Ask for new keys even if the replica exists (`--new-keys`).
    pub new_keys: bool,
    /// Push even if LOCAL fails `PRAGMA quick_check`.
    pub allow_corrupt: bool,
    /// Why the next push runs, as the sync log records it: `manual` unless a
    /// subscriber says otherwise (`idle`, `max-interval`, …).
    pub trigger: &'static str,
    /// A wait for followers follows the push ([`Pusher::wait_followers`]): a server
    /// that keeps no followers is refused before anything is sent.
    pub wait_followers: bool,
    /// Merge onto the latest version when the replica moved past the base
    /// (`--merge`), deciding rows changed on both sides this way.
    pub merge: Option<OnConflict>,
    /// The replica's encryption key (`--encryption-key-file`,
    /// `SQLFERRY_ENCRYPTION_KEY`): each push seals every page and the version with it
    /// (docs/security.md). `None`: a plaintext replica.
    pub encryption: Option<crate::crypt::EncryptionKey>,
}

/// What one push did.
#[derive(Debug, Clone)]
pub struct PushReport {
    /// The push itself.
    pub outcome: PushOutcome,
    /// Where the new keys went, when the server minted some.
    pub saved_keys: Option<SavedKeys>,
    /// After a merged push: why LOCAL was not brought to the merged version (it was
    /// written meanwhile, so it keeps its changes, based on the merge's candidate, and
    /// its next push merges what changed since);
    /// `None` when it was, or when the push was not merged.
    pub local_kept: Option<String>,
}

/// Where a push saved the new keys the server minted for the replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedKeys {
    /// The secrets file, which now holds the PUSH key for the database.
    pub secrets: PathBuf,
    /// The sidecar beside the database, which holds the PULL key.
    pub sidecar: PathBuf,
    /// The replica the keys are for.
    pub replica: String,
    /// The database pushed, as given.
    pub local: PathBuf,
}

/// The version `database` was last synced as with `replica` on `server`, or else on
/// `alias`, another URL of the same server.
fn last_version(database: &Path, server: &str, alias: Option<&str>, replica: &str) -> Option<u64> {
    history::last_with(database, server, replica)
        .or_else(|| alias.and_then(|alias| history::last_with(database, alias, replica)))
        .map(|l| l.version)
}

/// What a push would do (`push --dry-run`); nothing was changed to find out.
#[derive(Debug)]
pub struct PushPlan {
    /// LOCAL's size in bytes.
    pub size: u64,
    /// LOCAL's page count.
    pub page_count: u32,
    /// The replica's latest version (`None`: the push would create the replica).
    pub latest: Option<u64>,
    /// The version the push would be based on.
    pub base: Option<u64>,
    /// Whether the push would be refused with VERSION_CONFLICT.
    pub conflict: bool,
    /// Why LOCAL would be refused as damaged (`PRAGMA quick_check`), if it would.
    pub damaged: Option<Error>,
}

impl Pusher {
    /// [`Pusher::new`], reading the secrets file on a blocking thread; when no key was
    /// saved for `local` under this server's URL, one saved under another URL of the
    /// same server is found by the server's id (one `GET /api/health`).
    pub async fn open(
        local: &Path,
        replica: ReplicaPath,
        server: Server,
        key: Option<String>,
    ) -> Result<Pusher> {
        let local = local.to_owned();
        let mut pusher = blocking(move || Pusher::new(&local, replica, server, key)).await?;
        pusher.find_key_by_server_id().await?;
        Ok(pusher)
    }

    /// A pusher of `local` to `replica`; the key is `key` (`--key`, `SQLFERRY_KEY`),
    /// else the one saved for `local`. Blocking: it reads the secrets file.
    pub fn new(
        local: &Path,
        replica: ReplicaPath,
        server: Server,
        key: Option<String>,
    ) -> Result<Pusher> {
        let database = crate::config::database_key(local);
        let saved = super::saved_secret(local)?
            .filter(|s| s.server == server.url() && s.replica == replica.as_str());
        let stored = saved.is_some();
        let saved_without_id = saved.as_ref().is_some_and(|s| s.server_id.is_none());
        let key = key.or(saved.map(|s| s.key));
        Ok(Pusher {
            local: local.to_owned(),
            database,
            replica,
            server,
            key,
            stored,
            saved_without_id,
            id_searched: false,
            alias: None,
            message: String::new(),
            force: false,
            new_keys: false,
            allow_corrupt: false,
            trigger: "manual",
            wait_followers: false,
            merge: None,
            encryption: None,
        })
    }

    /// Fails with an auth error when a server needs a key and there is none.
    pub fn require_key(&self) -> Result<()> {
        if self.server.needs_key() && self.key.is_none() {
            return Err(Error::Auth(format!(
                "no key for {} on {}: pass --key (the admin key for a first push) or set SQLFERRY_KEY",
                self.replica,
                self.server.url()
            )));
        }
        Ok(())
    }

    /// The request the next push makes; its base is read from the local history (a
    /// small file read; async callers use [`Pusher::base_version`]).
    pub fn request(&self) -> PushRequest {
        let base = last_version(
            &self.database,
            &self.server.url(),
            self.alias.as_deref(),
            self.replica.as_str(),
        );
        self.request_with_base(base)
    }

    /// The version the next push is based on: the one LOCAL was last pushed or pulled
    /// as, with this replica on this store.
    pub async fn base_version(&self) -> Result<Option<u64>> {
        let (database, url) = (self.database.clone(), self.server.url());
        let (replica, alias) = (self.replica.clone(), self.alias.clone());
        blocking(move || {
            Ok(last_version(
                &database,
                &url,
                alias.as_deref(),
                replica.as_str(),
            ))
        })
        .await
    }

    /// When no key was saved under this server's URL, looks for one saved under
    /// another URL of the same server, by the server's id ([`super::saved_key`]), and
    /// takes it (unless a key was given) with that URL's history as the base. Once per
    /// pusher: a subscriber does not ask the server for its id before every push.
    async fn find_key_by_server_id(&mut self) -> Result<()> {
        if self.stored || self.id_searched || !self.server.needs_key() {
            return Ok(());
        }
        self.id_searched = true;
        let database = self.database.clone();
        let Some(saved) = super::saved_key(&self.server, &self.replica, Some(&database)).await?
        else {
            return Ok(());
        };
        if saved.server == self.server.url() {
            // Another database's key for this replica under this very URL: a push
            // takes only its own database's key, as [`Pusher::new`] does.
            return Ok(());
        }
        self.alias = Some(saved.server.clone().into_boxed_str());
        self.key = self.key.take().or(Some(saved.key));
        self.stored = true;
        Ok(())
    }

    fn request_with_base(&self, base: Option<u64>) -> PushRequest {
        PushRequest {
            database: Some(self.database.clone()),
            options: PushOptions {
                base,
                force: self.force,
                message: self.message.clone(),
                client_id: crate::remote::client_id(),
                key_id: String::new(),
                encryption: self.encryption.as_ref().map(|k| k.id().to_string()),
                rekey_from: None,
                passphrase: self
                    .encryption
                    .as_ref()
                    .and_then(|k| k.passphrase().copied()),
            },
            key: self.key.clone(),
            // Without a stored PUSH key, ask for keys: an admin key's first push of a
            // replica then leaves a PUSH key here and a PULL key in the sidecar.
            key_request: self.server.needs_key() && !self.stored,
            new_keys: self.new_keys,
            allow_corrupt: self.allow_corrupt,
            wait_followers: self.wait_followers,
            merge: self.merge.clone(),
            encryption: self.encryption.clone(),
        }
    }

    /// Waits until `count` pull subscribers of the replica hold `version` (or a later
    /// one), or `timeout` passes; `progress` hears each count on the way. The version
    /// is committed already, whatever this returns.
    pub async fn wait_followers(
        &self,
        version: u64,
        count: u32,
        timeout: std::time::Duration,
        progress: &mut (dyn FnMut(u32) + Send),
    ) -> Result<Followers> {
        self.server
            .wait_followers(
                &self.replica,
                version,
                count,
                timeout,
                self.key.as_deref(),
                progress,
            )
            .await
            .map_err(|e| {
                e.context(format!(
                    "version {version} of {} was committed, but waiting for its followers failed",
                    self.replica
                ))
            })
    }

    /// Pushes once; records the version in the local history and saves new keys, and
    /// the push, whatever its result, in the sync log.
    pub async fn push(&mut self, progress: Arc<dyn Progress>) -> Result<PushReport> {
        let started = std::time::Instant::now();
        let result = self.push_once(progress).await;
        let sync = super::logged(
            &self.database,
            self.server.url(),
            self.replica.as_str(),
            ("push", self.trigger),
            started,
            result
                .as_ref()
                .map(|r| (&r.outcome.stats, r.outcome.version, r.outcome.created)),
        );
        super::log_sync(sync).await;
        result
    }

    async fn push_once(&mut self, progress: Arc<dyn Progress>) -> Result<PushReport> {
        self.find_key_by_server_id().await?;
        self.require_key()?;
        let reserved = super::reserve_records("nothing was pushed".into(), "push again")
            .await
            .map_err(|e| {
                e.context(format!(
                    "push {} to {} failed",
                    self.local.display(),
                    self.replica
                ))
            })?;
        // The version an unanswered push made, once found, is the base (see
        // [`Pusher::unanswered_version`]).
        let (adopted, unanswered) = self.unanswered_version().await?;
        let mut attempt = 0;
        let outcome = loop {
            attempt += 1;
            let base = match adopted {
                Some(version) => Some(version),
                None => self.base_version().await?,
            };
            let request = self.request_with_base(base);
            let merging = request.merge.is_some()
                && request.options.base.is_some()
                && !request.options.force
                && matches!(self.server, crate::remote::Server::Ws { .. });
            match self
                .server
                .push(&self.local, &self.replica, request, progress.clone())
                .await
            {
                // A merging push whose base was the latest when it opened, and another
                // push landed before its COMMIT: a server refuses it as a plain
                // VERSION_CONFLICT (it stored its pages against the latest, not as a
                // candidate). Pushed again, its base is stale when it opens and the
                // server merges it, as the embedded store does in this race.
                Err(e)
                    if merging
                        && e.kind() == ErrorKind::Conflict
                        && e.merge_report().is_none()
                        && attempt < crate::merge::MAX_MERGE_ATTEMPTS =>
                {
                    tracing::info!(replica = %self.replica, attempt, error = %e,
                        "the replica moved while pushing: pushing again to merge");
                }
                Err(e) => {
                    let e = self.explain_refused_key(e).await;
                    let e = match &self.server {
                        crate::remote::Server::Embedded(store) => {
                            let left = "no version was made".to_owned();
                            super::on_full_disk(e, store.root(), left, "push again").await
                        }
                        _ => e,
                    };
                    return Err(e.context(format!(
                        "push {} to {} failed",
                        self.local.display(),
                        self.replica
                    )));
                }
                Ok(outcome) => break outcome,
            }
        };
        let local_kept = match &outcome.merged {
            Some(merged) => self.bring_to_merged(&outcome, merged).await?,
            None => None,
        };
        // LOCAL holds the version the push made (or was brought to the merge); or, kept
        // after a merge because it was written meanwhile, it holds the candidate plus
        // its later changes: the candidate is its base, so its next push's three-way
        // diff sees only those changes (not its own earlier ones, which the merge put
        // in the latest version: they would conflict with themselves when changed
        // again). A server that stored no candidate leaves the base as it was.
        let recorded = match (&outcome.merged, &local_kept) {
            (Some(merged), Some(_)) => (merged.result.candidate > 0)
                .then_some((merged.result.candidate, merged.candidate_digest.as_str())),
            // The database's own digest: an encrypted push's plaintext one, which a
            // later pull compares LOCAL with.
            _ => Some((outcome.version, outcome.stats.local_digest())),
        };
        if let Some((version, digest)) = recorded {
            super::record_sync(
                &self.database,
                (&self.server, outcome.server_id.clone()),
                &self.replica,
                (version, digest),
                "push",
                reserved,
            )
            .await?;
        }
        let saved_keys = match &outcome.keys {
            Some(keys) => {
                let (push_key, pull_key) = (keys.push.clone(), keys.pull.clone());
                let (server, replica) = (self.server.url(), self.replica.to_string());
                let (database, local) = (self.database.clone(), self.local.clone());
                let server_id = outcome.server_id.clone();
                let saved = blocking(move || {
                    let entry = Secret {
                        server: server.clone(),
                        replica: replica.clone(),
                        key: push_key,
                        server_id,
                    };
                    let name = database.to_string_lossy().into_owned();
                    let secrets = crate::config::Secrets::update(|secrets| {
                        secrets.databases.insert(name, entry);
                    })?;
                    let sidecar = Sidecar {
                        server,
                        replica: replica.clone(),
                        key: pull_key,
                    }
                    .save(&local)?;
                    Ok(SavedKeys {
                        secrets,
                        sidecar,
                        replica,
                        local,
                    })
                })
                .await?;
                // Later pushes (a subscriber's) use the replica's own PUSH key.
                self.key = Some(keys.push.clone());
                self.stored = true;
                self.saved_without_id = false;
                Some(saved)
            }
            None => None,
        };
        if let (true, Some(id)) = (self.saved_without_id, &outcome.server_id) {
            self.saved_without_id = false;
            self.save_server_id(id.clone()).await;
        }
        if unanswered {
            self.forget_unanswered().await?;
        }
        Ok(PushReport {
            outcome,
            saved_keys,
            local_kept,
        })
    }

    /// The version an unanswered push of LOCAL made ([`history::Unanswered`]: the
    /// server committed it, its answer was lost and it could not be looked up then),
    /// if one is kept on this push's base (or on a version adopted so before): found by
    /// its digest, made on that base by the client it was pushed as, or the latest
    /// already holding it. It is this push's base instead of the history's, which
    /// names the version before it (so LOCAL's own version is no VERSION_CONFLICT). `(None, true)`: a record is kept but its version is not
    /// found yet (the server cannot be asked); it is forgotten once a push records, or
    /// when the list shows no such version, or the history moved past its base.
    async fn unanswered_version(&self) -> Result<(Option<u64>, bool)> {
        let (database, url) = (self.database.clone(), self.server.url());
        let replica = self.replica.to_string();
        let kept =
            blocking(move || Ok(history::load_unanswered(&database, &url, &replica))).await?;
        let Some(push) = kept else {
            return Ok((None, false));
        };
        // A push built on an adopted version keeps that version as its base, past the
        // history's: only a history that moved past the base makes the record stale.
        if push.base < self.base_version().await?.unwrap_or(0) {
            self.forget_unanswered().await?;
            return Ok((None, false));
        }
        let list = match self
            .server
            .versions(&self.replica, self.key.as_deref())
            .await
        {
            Ok(list) => list,
            Err(e) => {
                tracing::debug!(error = %e, "cannot look for an unanswered push's version");
                return Ok((None, true));
            }
        };
        let on = (push.base, push.forced);
        match crate::remote::committed_version(&list, &push.digest, on, &push.client) {
            Some((version, _)) => {
                tracing::info!(replica = %self.replica, version = version.number,
                    "the version of a push whose answer was lost is this push's base");
                Ok((Some(version.number), true))
            }
            None => {
                self.forget_unanswered().await?;
                Ok((None, false))
            }
        }
    }

    /// Forgets LOCAL's unanswered push to this replica ([`history::remove_unanswered`]).
    async fn forget_unanswered(&self) -> Result<()> {
        let (database, url) = (self.database.clone(), self.server.url());
        let replica = self.replica.to_string();
        blocking(move || {
            history::remove_unanswered(&database, &url, &replica);
            Ok(())
        })
        .await
    }

    /// A push refused for its encryption key (auth), told better where the replica
    /// says why: its passphrase salt is another than this push's key was stretched with
    /// (another first push made it while this one ran: pushed again, it stretches with
    /// that salt), or it was rekeyed away from this push's key ([`RekeyedAway`]: the
    /// versions' key ids say when and to which key). Asked of the replica only on such
    /// a refusal; anything it cannot explain, or an error asking, leaves `e` as it is.
    async fn explain_refused_key(&self, e: Error) -> Error {
        let Some(key) = &self.encryption else {
            return e;
        };
        if e.kind() != ErrorKind::Auth {
            return e;
        }
        let Ok(versions) = self
            .server
            .versions(&self.replica, self.key.as_deref())
            .await
        else {
            return e;
        };
        // A plaintext replica, or one with no version: the refusal says so already.
        if versions.last().is_none_or(|v| v.encryption.is_none()) {
            return e;
        }
        if let Some(ours) = key.passphrase() {
            let theirs = self
                .server
                .passphrase(&self.replica, self.key.as_deref(), false)
                .await;
            if let Ok(Some(theirs)) = theirs
                && theirs != *ours
            {
                return Error::Auth(format!(
                    "{} keeps another passphrase salt than this push stretched its passphrase \
                     with: another push made the replica's first version, and its salt, while \
                     this one ran; no version was made: push again, to stretch the passphrase \
                     with the replica's salt",
                    self.replica
                ));
            }
        }
        match super::rekey::RekeyedAway::of(&versions, &key.id().to_string()) {
            Some(r) => Error::Auth(r.message(self.replica.as_str())),
            None => e,
        }
    }

    /// After a merged push: brings LOCAL to the merged version, atomically and only if
    /// it still holds what was merged (checked inside the pull's write transaction).
    /// `Some(why)` when it was written meanwhile: it keeps its changes, and the caller
    /// records the merge's candidate as its base, so its next push merges only what
    /// changed since.
    async fn bring_to_merged(
        &self,
        outcome: &PushOutcome,
        merged: &Merged,
    ) -> Result<Option<String>> {
        let pulled = self
            .server
            .pull_if_unchanged(
                &self.replica,
                outcome.version,
                &self.local,
                &merged.candidate_digest,
                self.key.as_deref(),
            )
            .await;
        match pulled {
            Ok(_) => Ok(None),
            Err(e) if e.kind() == ErrorKind::LocalChanges => {
                tracing::info!(local = %self.local.display(), error = %e, "LOCAL kept after a merge");
                Ok(Some(e.to_string()))
            }
            Err(e) => Err(e.context(format!(
                "version {} of {} (the merge) WAS committed, but {} could not be brought to it",
                outcome.version,
                self.replica,
                self.local.display()
            ))),
        }
    }

    /// Writes the server's id into the saved entry of this database, replica and URL
    /// that lacks one (an older sqlferry saved it), so other URLs of the server find
    /// it. A failure changes nothing and does not fail the push, which is done.
    async fn save_server_id(&self, id: String) {
        let name = self.database.to_string_lossy().into_owned();
        let (server, replica) = (self.server.url(), self.replica.to_string());
        let result = blocking(move || {
            crate::config::Secrets::update(|secrets| {
                if let Some(entry) = secrets.databases.get_mut(&name)
                    && entry.server == server
                    && entry.replica == replica
                    && entry.server_id.is_none()
                {
                    entry.server_id = Some(id);
                }
            })
        })
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "the server's id could not be saved with the key");
        }
    }

    /// What a push would do now: LOCAL's size, the replica's latest version, whether
    /// the push would be refused (conflict, damaged LOCAL). Changes nothing.
    pub async fn plan(&self) -> Result<PushPlan> {
        let (local, allow_corrupt) = (self.local.clone(), self.allow_corrupt);
        let (size, page_count, damaged) = blocking(move || {
            let snap = Snapshot::open(&local).map_err(|e| e.context("cannot read LOCAL"))?;
            let size = u64::from(snap.page_count()) * u64::from(snap.page_size());
            // The real push checks first, so a damaged LOCAL is refused before a
            // conflict.
            let damaged = match allow_corrupt {
                true => None,
                false => check_source(&snap).err(),
            };
            Ok((size, snap.page_count(), damaged))
        })
        .await?;
        let base = self.base_version().await?;
        let latest = match self
            .server
            .versions(&self.replica, self.key.as_deref())
            .await
        {
            Ok(v) => v.last().map(|v| v.number),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(PushPlan {
            size,
            page_count,
            latest,
            base,
            conflict: !self.force && latest.is_some() && latest != base,
            damaged,
        })
    }
}

/// What a push between two local files would do (`--dry-run`).
#[derive(Debug)]
pub struct CopyPlan {
    /// The source's page count.
    pub page_count: u32,
    /// Why the source would be refused as damaged, if it would.
    pub damaged: Option<Error>,
}

/// Refuses a copy of a file onto itself.
fn refuse_same_file(src: &Path, dest: &Path) -> Result<()> {
    if let (Ok(a), Ok(b)) = (src.canonicalize(), dest.canonicalize())
        && a == b
    {
        return Err(Error::Usage(format!(
            "LOCAL and REMOTE are the same file ({})",
            a.display()
        )));
    }
    Ok(())
}

/// What [`copy_file`] would do; changes nothing.
pub async fn plan_copy(src: &Path, dest: &Path, allow_corrupt: bool) -> Result<CopyPlan> {
    let (src, dest) = (src.to_owned(), dest.to_owned());
    blocking(move || {
        refuse_same_file(&src, &dest)?;
        let snap = Snapshot::open(&src).map_err(|e| e.context("cannot read LOCAL"))?;
        let damaged = match allow_corrupt {
            true => None,
            false => check_source(&snap).err(),
        };
        Ok(CopyPlan {
            page_count: snap.page_count(),
            damaged,
        })
    })
    .await
}

/// `push SRC DEST` between two local files: DEST changes in one transaction, after its
/// digest has been checked; SRC is only read. A SRC failing `PRAGMA quick_check` is
/// refused unless `allow_corrupt`.
pub async fn copy_file(
    src: &Path,
    dest: &Path,
    allow_corrupt: bool,
    progress: Arc<dyn Progress>,
) -> Result<SyncStats> {
    copy_file_for(src, dest, allow_corrupt, "manual", progress).await
}

/// [`copy_file`], with the reason the sync log records (`manual`, or a subscriber's
/// trigger: `idle`, `max-interval`, …).
pub async fn copy_file_for(
    src: &Path,
    dest: &Path,
    allow_corrupt: bool,
    trigger: &'static str,
    progress: Arc<dyn Progress>,
) -> Result<SyncStats> {
    let started = std::time::Instant::now();
    let result = copy_file_once(src, dest, allow_corrupt, progress).await;
    let dest_key = crate::config::database_key(dest);
    let sync = super::logged(
        &crate::config::database_key(src),
        "file".into(),
        &dest_key.to_string_lossy(),
        ("push", trigger),
        started,
        result.as_ref().map(|s| (s, 0, s.pages_sent > 0)),
    );
    super::log_sync(sync).await;
    result
}

/// A copy of `src` into `dest` through the engine (a consistent snapshot of `src`),
/// recorded nowhere: the base of a scratch pull ([`super::scratch`]). `src` is not
/// checked: the pull that follows replaces whatever differs, and checks the digest.
pub(super) async fn copy_quietly(src: &Path, dest: &Path) -> Result<()> {
    copy_file_once(src, dest, true, crate::remote::no_progress())
        .await
        .map(|_| ())
}

async fn copy_file_once(
    src: &Path,
    dest: &Path,
    allow_corrupt: bool,
    progress: Arc<dyn Progress>,
) -> Result<SyncStats> {
    let (src, dest) = (src.to_owned(), dest.to_owned());
    blocking(move || {
        refuse_same_file(&src, &dest)?;
        let mut snapshot = Snapshot::open(&src).map_err(|e| e.context("cannot read LOCAL"))?;
        let mut target = Writer::open(&dest).map_err(|e| e.context("cannot write REMOTE"))?;
        // A push that follows the WAL checks the structure of each changed page as the
        // scan reads it, and needs nothing more when they pass (else the full check
        // decides before DEST commits). Otherwise SRC's quick_check runs after its pages
        // went out and before DEST commits, so it overlaps the copy: a damaged SRC still
        // changes nothing.
        let check = !allow_corrupt && !snapshot.check_in_pass();
        if check {
            // When the scan reads every page from the file, the same check runs beside
            // it on the second core instead of after it.
            snapshot.check_beside_scan();
        }
        let mut source = CheckedSource {
            snapshot: &mut snapshot,
            check,
            failed: false,
        };
        sync_local(&mut source, &mut target, &*progress).map_err(|e| {
            if source.failed {
                return e;
            }
            e.context(format!(
                "push {} to {} failed",
                src.display(),
                dest.display()
            ))
        })
    })
    .await
}

/// A local copy's source: the snapshot, refused by [`quick_check_source`] (unless
/// allowed, or the changed pages its scan read passed their structural check) just
/// before the replica commits.
struct CheckedSource<'a> {
    snapshot: &'a mut Snapshot,
    check: bool,
    /// Whether the check refused the source (its error is the sync's, as it stands).
    failed: bool,
}

impl PageSource for CheckedSource<'_> {
    fn page_size(&self) -> u32 {
        PageSource::page_size(&*self.snapshot)
    }

    fn page_count(&self) -> u32 {
        PageSource::page_count(&*self.snapshot)
    }

    fn scan(&mut self, with_data_after: u32, f: &mut ScanFn<'_>) -> Result<()> {
        PageSource::scan(&mut *self.snapshot, with_data_after, f)
    }

    fn read_page(&mut self, pgno: u32, buf: &mut Vec<u8>) -> Result<()> {
        PageSource::read_page(&mut *self.snapshot, pgno, buf)
    }

    fn chunk_hashes(&mut self) -> Result<Option<Vec<Option<crate::digest::Hash>>>> {
        PageSource::chunk_hashes(&mut *self.snapshot)
    }

    fn scan_chunk(&mut self, idx: u32, f: &mut ScanFn<'_>) -> Result<crate::digest::Hash> {
        PageSource::scan_chunk(&mut *self.snapshot, idx, f)
    }

    fn chunks_done(&mut self) -> Result<()> {
        PageSource::chunks_done(&mut *self.snapshot)
    }

    fn check(&mut self) -> Result<()> {
        let result = match self.check {
            true => quick_check_source(self.snapshot),
            false => crate::remote::settle_pass_check(self.snapshot),
        };
        self.failed = result.is_err();
        result
    }
}
