//! Where a replica lives, behind one interface for push, pull and versions.
//!
//! - The embedded store: a directory on this machine (the XDG data dir by default, or
//!   `file:///path`), used in-process over the same engine and in-memory link a local
//!   push uses. No key is needed: the file system's permissions are the access control.
//! - The same, in an S3 bucket (`s3://BUCKET/PREFIX`): the S3 store
//!   ([`crate::store::s3::S3Store`]) used in-process over the same engine, through the
//!   one store interface ([`AnyStore`]); its credentials are the `AWS_*` variables, its
//!   cache of pack indexes is under the XDG cache dir. What it cannot do yet (merges,
//!   subscribers, sync-now) is refused by name before anything is
//!   written.
//! - A `sqlferry serve` server: `ws://host:port` or `wss://host:port` (rustls, no
//!   OpenSSL; the `tls` module says which certificates are trusted). The key travels only
//!   in the `Authorization: Bearer` header of the WebSocket upgrade; the engine runs on a
//!   blocking thread and `transport::ws` carries its frames.

pub mod local;
mod subscription;
pub(crate) mod tls;

pub use subscription::{Notice, Outgoing, Subscription};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::crypt::{EncryptionKey, KeyId, Keys};
use crate::digest::Hash;
use crate::engine::{
    BeginInfo, KnownBase, NoProgress, Opening, OriginOptions, PageSource, PageTarget, Progress,
    Role, Sealing, SyncStats, Synced, pumped_link, run_origin_with, run_replica_opening,
    sync_local_opening, sync_local_with,
};
use crate::history;
use crate::merge::OnConflict;
use crate::page::{Snapshot, Writer};
use crate::protocol::compress::CompressMode;
use crate::protocol::control::{
    Config, Control, Encryption, KeyInfo, MAX_FOLLOWERS_WAIT, NewKeys, Op, Open, SubscriberRole,
    WaitFollowers, check_encryption, pick_key,
};
use crate::protocol::control::{DIGEST_CHUNKED, MergeResult};
use crate::protocol::{Frame, PROTOCOL_VERSION};
use crate::store::object::S3Location;
use crate::store::{
    AnyStore, PruneReport, PushOptions, ReplicaPath, Retention, RetentionPolicy, Selector, Store,
    VersionInfo, not_with_s3,
};
use crate::transport::ws;
use crate::{Error, Result};

/// What `retention` does to a replica's policy.
#[derive(Debug, Clone)]
pub enum RetentionChange {
    /// Nothing: show it.
    Show,
    /// Give the replica this policy of its own.
    Set(RetentionPolicy),
    /// Drop the replica's own policy: the store's default applies.
    Clear,
}

/// A server: where replicas live.
#[derive(Debug, Clone)]
pub enum Server {
    /// The embedded store in a local directory.
    Embedded(Store),
    /// The embedded store's S3 twin: an S3 store used in-process (`s3://BUCKET/PREFIX`),
    /// opened for each command ([`Server::in_process`]).
    S3 {
        /// The bucket and prefix.
        location: S3Location,
        /// The endpoint (`--s3-endpoint`); `None`: `AWS_ENDPOINT_URL`, else AWS S3.
        endpoint: Option<String>,
    },
    /// A `sqlferry serve` server.
    Ws {
        /// `ws://host:port` or `wss://host:port`, without a path.
        url: String,
        /// How this client compresses the pages it sends, and whether it offers
        /// compression at all ([`Server::with_compress`]; `SQLFERRY_COMPRESS`, else
        /// `auto`).
        compress: CompressMode,
    },
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct PushOutcome {
    /// The engine's figures (the pushing side's view).
    pub stats: SyncStats,
    /// The replica's latest version after the push.
    pub version: u64,
    /// Whether this push made that version (`false`: nothing had changed).
    pub created: bool,
    /// Damaged stored pages this push replaced with good ones.
    pub repaired: u32,
    /// Keys minted for a new replica (after a key request), shown once.
    pub keys: Option<NewKeys>,
    /// The server's id as its CONFIG told it (`None`: the embedded store, or an older
    /// server that sends none).
    pub server_id: Option<String>,
    /// Whether the push proved from constant-size facts that nothing changed since the
    /// last push of this database to this replica, and so ran no sync at all
    /// (docs/engine.md, "A no-change push that reads nothing"; `--json`:
    /// `proved_unchanged`).
    pub proved_unchanged: bool,
    /// Set when the replica had moved past the push's base and the push was merged
    /// onto its latest version (`push --merge`): `version` is then the merge's.
    pub merged: Option<Merged>,
}

/// What a merged push did (`push --merge`).
#[derive(Debug, Clone)]
pub struct Merged {
    /// The merge's report: the versions, the changes applied, the conflicts decided.
    pub result: MergeResult,
    /// The digest of the content merged as this push's: LOCAL is brought to the merged
    /// version only if it still holds exactly that ([`Server::pull_if_unchanged`]).
    pub candidate_digest: String,
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct PullOutcome {
    /// The engine's figures, from the pulling side: `bytes_received` is what came in.
    pub stats: SyncStats,
    /// The version the local file now holds.
    pub version: u64,
    /// Whether LOCAL was proved to hold what its last sync left (its seal), so that
    /// neither the check for local changes nor the sync read it: only the pages that
    /// changed were written (`pull --json`: `local_sealed`). Set by
    /// [`crate::client::Puller`]; `false` from the plain pulls here.
    pub local_sealed: bool,
    /// The server's id as its CONFIG told it (`None`: the embedded store, or an older
    /// server that sends none).
    pub server_id: Option<String>,
    /// The id of the key the version was opened with (of those given, the one it
    /// names); `None` for a plaintext version.
    pub encryption: Option<KeyId>,
}

/// How a push presents itself.
#[derive(Debug, Clone, Default)]
pub struct PushRequest {
    /// The local database's absolute path, for its kept manifest: with the manifest of
    /// the base version at hand, no hash travels.
    pub database: Option<PathBuf>,
    /// The store's options (base, force, message, client id).
    pub options: PushOptions,
    /// The key, for a server.
    pub key: Option<String>,
    /// Ask a server to mint PUSH and PULL keys if the replica is new (this push creates
    /// it): a first push with the admin key.
    pub key_request: bool,
    /// Ask for new PUSH and PULL keys even though the replica exists (`push
    /// --new-keys`, admin key only).
    pub new_keys: bool,
    /// Push even if LOCAL fails `PRAGMA quick_check` (`--allow-corrupt`); by default
    /// a damaged database is refused, so it never replaces a good version.
    pub allow_corrupt: bool,
    /// The caller will wait for followers after the push (`--wait-followers`): a
    /// server that keeps none (an older one) is refused before anything is sent.
    pub wait_followers: bool,
    /// Merge onto the latest version when the replica moved past the base
    /// (`--merge`), deciding rows changed on both sides this way; `None`: refuse
    /// with VERSION_CONFLICT.
    pub merge: Option<OnConflict>,
    /// The encryption key of an encrypted replica (end-to-end encryption,
    /// docs/security.md): every page and the version's facts go sealed with it, and
    /// `options.encryption` must name its id. `None`: a plaintext push.
    pub encryption: Option<EncryptionKey>,
}

/// What a wait for followers ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Followers {
    /// Connected pull subscribers that reported holding the version (or a later one).
    pub count: u32,
    /// Whether that is the count asked for (`false`: the wait timed out first).
    pub reached: bool,
}

impl Server {
    /// The server named by `url`, or the embedded store in the XDG data directory when
    /// `url` is `None`.
    pub fn parse(url: Option<&str>) -> Result<Server> {
        let Some(url) = url else {
            let dir = crate::config::data_dir().ok_or_else(|| {
                Error::Usage("no store: set HOME, XDG_DATA_HOME or --server file:///path".into())
            })?;
            return Ok(Server::Embedded(Store::new(dir)));
        };
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(Error::Usage(format!(
                    "--server {url}: a file:// server needs an absolute path, like file:///var/lib/sqlferry"
                )));
            }
            return Ok(Server::Embedded(Store::new(PathBuf::from(path))));
        }
        if url.starts_with("s3://") {
            return Ok(Server::S3 {
                location: S3Location::parse(url)?,
                endpoint: None,
            });
        }
        if url.starts_with("ws://") || url.starts_with("wss://") {
            let url = url.trim_end_matches('/');
            let host = url.split_once("://").map_or("", |(_, h)| h);
            if host.is_empty() || host.contains('/') {
                return Err(Error::Usage(format!(
                    "--server {url}: expected ws://host:port, with no path"
                )));
            }
            let compress = CompressMode::from_env()
                .map_err(Error::Usage)?
                .unwrap_or_default();
            return Ok(Server::Ws {
                url: url.to_owned(),
                compress,
            });
        }
        Err(Error::Usage(format!(
            "--server {url}: expected file:///path, s3://BUCKET/PREFIX, ws://host:port or wss://host:port"
        )))
    }

    /// This server with page compression `mode` (`--compress`, a daemon entry's
    /// `compress`) when one is given; the embedded store never compresses.
    pub fn with_compress(mut self, mode: Option<CompressMode>) -> Server {
        if let (Server::Ws { compress, .. }, Some(mode)) = (&mut self, mode) {
            *compress = mode;
        }
        self
    }

    /// This server with the object storage endpoint `endpoint` (`--s3-endpoint`) when
    /// one is given and it is an S3 store.
    pub fn with_s3_endpoint(mut self, given: Option<&str>) -> Server {
        if let (Server::S3 { endpoint, .. }, Some(given)) = (&mut self, given) {
            *endpoint = Some(given.to_owned());
        }
        self
    }

    /// The store this server names, opened for use in this process: the directory
    /// store, or the S3 store (its cache under `$XDG_CACHE_HOME/sqlferry/s3/`, never
    /// the data dir: deleting it costs only GETs). An S3 store is checked first, one
    /// line when its endpoint, credentials or bucket are wrong: for `writing`, as a
    /// server's start checks it (its marker created if absent, then read back), else
    /// by reading the marker only (a read-only key may pull). `None` for a server.
    pub async fn in_process(&self, writing: bool) -> Result<Option<AnyStore>> {
        let (location, endpoint) = match self {
            Server::Embedded(store) => return Ok(Some(AnyStore::Dir(store.clone()))),
            Server::Ws { .. } => return Ok(None),
            Server::S3 { location, endpoint } => (location.clone(), endpoint.clone()),
        };
        let data = crate::config::cache_dir()
            .ok_or_else(|| {
                Error::Usage(format!(
                    "{location}: no cache directory for the S3 store: set HOME or XDG_CACHE_HOME"
                ))
            })?
            .join("s3");
        let hint =
            crate::store::object::S3Options::from_env(endpoint.as_deref()).credentials_hint();
        let shown = location.to_string();
        let runtime = tokio::runtime::Handle::current();
        blocking(move || {
            let store =
                crate::store::s3::S3Store::connect(location, endpoint.as_deref(), &data, runtime)?;
            match writing {
                true => store.check()?,
                false => store.check_readable()?,
            }
            Ok(AnyStore::S3 { store, data })
        })
        .await
        .map(Some)
        .map_err(|e| e.context(format!("the store {shown} is not usable{hint}")))
    }

    /// The in-process store, for a method whose `Ws` arm was handled before.
    async fn local_store(&self, writing: bool) -> Result<AnyStore> {
        self.in_process(writing).await?.ok_or_else(|| {
            Error::Bug(format!(
                "{} is a server, not a store in this process",
                self.url()
            ))
        })
    }

    /// Refuses `feature` on an S3 store ([`not_with_s3`]), before anything is read or
    /// written.
    pub fn refuse_on_s3(&self, feature: &str) -> Result<()> {
        match self {
            Server::S3 { .. } => Err(not_with_s3(feature)),
            _ => Ok(()),
        }
    }

    /// The server as a URL, for messages and records. An S3 store's is its location as
    /// `s3://BUCKET/PREFIX` (one spelling, whatever the cache or the process): the
    /// local history's key, so every process that uses the bucket finds the same
    /// record.
    pub fn url(&self) -> String {
        match self {
            Server::Embedded(store) => format!("file://{}", store.root().display()),
            Server::S3 { location, .. } => location.to_string(),
            Server::Ws { url, .. } => url.clone(),
        }
    }

    /// Whether this server checks keys.
    pub fn needs_key(&self) -> bool {
        matches!(self, Server::Ws { .. })
    }

    /// Every version of `replica`, oldest first.
    pub async fn versions(
        &self,
        replica: &ReplicaPath,
        key: Option<&str>,
    ) -> Result<Vec<VersionInfo>> {
        match self {
            Server::Embedded(_) | Server::S3 { .. } => {
                let (store, replica) = (self.local_store(false).await?, replica.clone());
                blocking(move || store.versions(&replica)).await
            }
            Server::Ws { url, .. } => {
                let mut ws = connect(url, key).await?;
                let mut config =
                    open(&mut ws, Op::Versions, replica, None, None, false, None).await?;
                // A long history comes in runs, one CONFIG each, so that no frame
                // passes the frame limit; an older server sends one CONFIG with all.
                let mut list = config.versions.take().unwrap_or_default();
                while config.more {
                    config = next_config(&mut ws, Vec::new()).await?;
                    let run = config.versions.take().unwrap_or_default();
                    check_run(replica, list.last(), &run, list.len())?;
                    list.extend(run);
                }
                Ok(list)
            }
        }
    }

    /// The passphrase salt and cost `replica` keeps (`None`: it has none, or does not
    /// exist yet), checked as a client stretches with it (a cost within the maximum and
    /// not below the default, [`crate::crypt::PassphraseCost::check`]). A server too old
    /// to keep one is refused, before anything is derived or sent. `making`: for a push,
    /// which may make the replica (an S3 store is then opened as a push opens it, its
    /// marker made if absent, so a first push into a new bucket or prefix is not
    /// refused as holding no store).
    pub async fn passphrase(
        &self,
        replica: &ReplicaPath,
        key: Option<&str>,
        making: bool,
    ) -> Result<Option<crate::crypt::PassphraseSalt>> {
        let salted = match self {
            Server::Embedded(_) | Server::S3 { .. } => {
                let (store, r) = (self.local_store(making).await?, replica.clone());
                blocking(move || store.passphrase(&r)).await?
            }
            Server::Ws { url, .. } => {
                let mut ws = connect(url, key).await?;
                let mut open = open_frame(Op::Versions, replica);
                open.passphrase = true;
                ws::send_binary(&mut ws, Control::Open(open).to_bytes()).await?;
                let config = next_config(&mut ws, Vec::new()).await?;
                let _ = ws.close(None).await;
                match config.passphrase {
                    None => {
                        return Err(Error::Protocol(format!(
                            "{url} cannot keep a passphrase's salt (a sqlferry serve older \
                             than this client): upgrade it, or use --encryption-key-file; \
                             nothing was sent"
                        )));
                    }
                    Some(None) => None,
                    Some(Some(p)) => Some(crate::crypt::PassphraseSalt::from_wire(
                        replica.as_str(),
                        p.salt_bytes().as_deref(),
                        p.cost(),
                    )?),
                }
            }
        };
        if let Some(s) = &salted {
            s.cost.check(replica.as_str())?;
        }
        Ok(salted)
    }

    /// Every version of `replica`, oldest first, each with its `stored_bytes` (a
    /// server always computes them for `versions`).
    pub async fn versions_with_stored_bytes(
        &self,
        replica: &ReplicaPath,
        key: Option<&str>,
    ) -> Result<Vec<VersionInfo>> {
        match self {
            Server::Embedded(_) | Server::S3 { .. } => {
                let (store, replica) = (self.local_store(false).await?, replica.clone());
                blocking(move || store.versions_with_stored_bytes(&replica)).await
            }
            Server::Ws { .. } => self.versions(replica, key).await,
        }
    }

    /// Shows `replica`'s retention policy, or changes it first (a server needs the
    /// admin key for that).
    pub async fn retention(
        &self,
        replica: &ReplicaPath,
        change: RetentionChange,
        key: Option<&str>,
    ) -> Result<Retention> {
        match self {
            Server::Embedded(_) | Server::S3 { .. } => {
                let writing = !matches!(change, RetentionChange::Show);
                let (store, replica) = (self.local_store(writing).await?, replica.clone());
                blocking(move || match change {
                    RetentionChange::Show => store.retention(&replica),
                    RetentionChange::Set(p) => store.set_retention(&replica, Some(&p)),
                    RetentionChange::Clear => store.set_retention(&replica, None),
                })
                .await
            }
            Server::Ws { url, .. } => {
                let mut ws = connect(url, key).await?;
                let mut open = open_frame(Op::Retention, replica);
                match change {
                    RetentionChange::Show => {}
                    RetentionChange::Set(p) => open.retention = Some(p),
                    RetentionChange::Clear => open.retention_clear = true,
                }
                ws::send_binary(&mut ws, Control::Open(open).to_bytes()).await?;
                next_config(&mut ws, Vec::new())
                    .await?
                    .retention
                    .map(|r| *r)
                    .ok_or_else(|| {
                        Error::Protocol("the server's CONFIG holds no retention policy".into())
                    })
            }
        }
    }

    /// Removes the versions `replica`'s retention policy does not keep and frees the
    /// pages no version uses (a server needs the admin key); `dry_run` only says what
    /// it would do.
    pub async fn prune(
        &self,
        replica: &ReplicaPath,
        dry_run: bool,
        key: Option<&str>,
    ) -> Result<PruneReport> {
        match self {
            Server::Embedded(_) | Server::S3 { .. } => {
                let (store, replica) = (self.local_store(true).await?, replica.clone());
                blocking(move || {
                    store.prune(
                        &replica,
                        dry_run,
                        crate::epoch::now(),
                        crate::store::PRUNE_WAIT,
                    )
                })
                .await
            }
            Server::Ws { url, .. } => {
                let mut ws = connect(url, key).await?;
                let mut open = open_frame(Op::Prune, replica);
                open.dry_run = dry_run;
                ws::send_binary(&mut ws, Control::Open(open).to_bytes()).await?;
                next_config(&mut ws, Vec::new())
                    .await?
                    .pruned
                    .map(|r| *r)
                    .ok_or_else(|| {
                        Error::Protocol("the server's CONFIG holds no prune report".into())
                    })
            }
        }
    }

    /// The server's keys (ids and facts, never secrets), only those of `replica` when
    /// given; `key` must be the admin key.
    pub async fn keys(
        &self,
        replica: Option<&ReplicaPath>,
        key: Option<&str>,
    ) -> Result<Vec<KeyInfo>> {
        self.key_op(Op::Keys, replica, None, key).await
    }

    /// Revokes the key with id `key_id` (of `replica`, when given) and returns it; `key`
    /// must be the admin key.
    pub async fn revoke_key(
        &self,
        key_id: &str,
        replica: Option<&ReplicaPath>,
        key: Option<&str>,
    ) -> Result<KeyInfo> {
        let mut list = self
            .key_op(Op::RevokeKey, replica, Some(key_id), key)
            .await?;
        list.pop()
            .ok_or_else(|| Error::Protocol("the server revoked no key and said nothing".into()))
    }

    async fn key_op(
        &self,
        op: Op,
        replica: Option<&ReplicaPath>,
        key_id: Option<&str>,
        key: Option<&str>,
    ) -> Result<Vec<KeyInfo>> {
        let Server::Ws { url, .. } = self else {
            return Err(Error::Usage(
                "keys live on a sqlferry server: pass --server ws://HOST:PORT (the embedded store has none)"
                    .into(),
            ));
        };
        let mut ws = connect(url, key).await?;
        let open = Open {
            protocol: PROTOCOL_VERSION,
            op,
            replica: replica.map(ToString::to_string).unwrap_or_default(),
            version: None,
            base: None,
            force: false,
            role: None,
            client_id: client_id(),
            key_id: key_id.map(str::to_owned),
            compress: Vec::new(),
            digests: Vec::new(),
            retention: None,
            retention_clear: false,
            dry_run: false,
            paged: false,
            merge: None,
            encryption: None,
            passphrase: false,
        };
        ws::send_binary(&mut ws, Control::Open(open).to_bytes()).await?;
        let config = next_config(&mut ws, Vec::new()).await?;
        config
            .key_list
            .ok_or_else(|| Error::Protocol("the server's CONFIG holds no key list".into()))
    }

    /// Pushes the database at `local` as a new version of `replica`.
    pub async fn push(
        &self,
        local: &Path,
        replica: &ReplicaPath,
        request: PushRequest,
        progress: Arc<dyn Progress>,
    ) -> Result<PushOutcome> {
        let url = self.url();
        // What the S3 store cannot do is refused before anything is read or written.
        if request.merge.is_some() {
            self.refuse_on_s3("push --merge")?;
        }
        // An S3 store is opened (and checked) before LOCAL is read: a wrong endpoint,
        // credentials or bucket is said at once.
        let in_process = match self {
            Server::S3 { .. } => self.in_process(true).await?,
            _ => None,
        };
        // The read transaction opens before anything is sent, and LOCAL is checked
        // before anything is committed: the pages a WAL names at once, a whole file by
        // `quick_check` beside the scan that reads it (on the second core, not before
        // it on the critical path), its answer awaited before COMMIT. A damaged LOCAL is
        // still refused as such when the server is out of reach or the sync fails.
        let embedded = match self {
            Server::Embedded(store) => Some(store.clone()),
            Server::S3 { .. } | Server::Ws { .. } => None,
        };
        // An encrypted push keeps no history of identities: its kept manifest and its
        // "proved unchanged" seal would hold identities where a plaintext push's hold
        // page hashes, and a pull that takes LOCAL's page hashes from them would take
        // identities for page hashes. It runs the hash-tree descent instead (still only
        // the changed pages and a hash exchange that grows with the changes).
        let sealed = request.encryption.is_some();
        let (mut source, kept, state, deferred) = {
            let (local, replica, url) = (local.to_owned(), replica.clone(), url.clone());
            let (database, allow_corrupt) = (request.database.clone(), request.allow_corrupt);
            let (base, force) = (request.options.base, request.options.force);
            let store = embedded.clone();
            let started = std::time::Instant::now();
            let early = blocking(move || {
                let mut source = Snapshot::open(&local)?;
                let state = source.state();
                if let (Some(store), Some(db), Some(base), false, false, Some(state)) =
                    (&store, &database, base, force, sealed, state)
                {
                    let proved = proved_unchanged(
                        store,
                        &replica,
                        history::load_seal(db, &url, replica.as_str()),
                        base,
                        state,
                        allow_corrupt,
                    )?;
                    if let Some(seal) = proved {
                        tracing::debug!(%replica, "nothing changed since the last push: no sync");
                        return Ok(Err(PushOutcome {
                            stats: SyncStats {
                                page_size: state.page_size(),
                                pages_total: state.page_count(),
                                pages_sent: 0,
                                bytes_sent: 0,
                                bytes_received: 0,
                                hash_bytes: 0,
                                duration: started.elapsed(),
                                digest: seal.digest,
                                plaintext_digest: None,
                            },
                            version: seal.version,
                            created: false,
                            repaired: 0,
                            keys: None,
                            server_id: None,
                            proved_unchanged: true,
                            merged: None,
                        }));
                    }
                }
                let deferred = !allow_corrupt && defer_check(&mut source);
                // The manifest of the base version, if this client pushed it: no hash
                // travels.
                let kept = match (database, base, force || sealed) {
                    (Some(db), Some(base), false) => {
                        history::load_manifest(&db, &url, replica.as_str(), base)
                    }
                    _ => None,
                };
                Ok(Ok((source, kept, state, deferred)))
            })
            .await?;
            match early {
                Ok(going_on) => going_on,
                // Nothing changed since the last push: no sync.
                Err(unchanged) => return Ok(unchanged),
            }
        };
        let (outcome, pushed) = match self {
            Server::Embedded(_) | Server::S3 { .. } => {
                let store = match (in_process, self) {
                    (Some(store), _) => store,
                    (None, Server::Embedded(store)) => AnyStore::Dir(store.clone()),
                    (None, _) => self.local_store(true).await?,
                };
                let (outcome, pushed) = {
                    let (store, replica) = (store.clone(), replica.clone());
                    let options = request.options;
                    let merge = request.merge.clone();
                    let local = local.to_owned();
                    let key = request.encryption.clone();
                    blocking(move || {
                        let merging = merge.zip(options.base).filter(|_| !options.force);
                        let base_options = options.clone();
                        // An encrypted version's commit message travels only inside
                        // its seal: the store keeps none in clear.
                        let mut options = options;
                        if key.is_some() {
                            options.message.clear();
                        }
                        let mut target = match store.push(&replica, options) {
                            Ok(target) => target,
                            Err(e) => return Err(damage_first(&source, deferred, e)),
                        };
                        let started = std::time::Instant::now();
                        // In process both sides speak the chunked digest: the store's
                        // replica then reads only the chunks pages came for.
                        let sealing = key.as_ref().map(|key| Sealing::Seal {
                            key,
                            replica: replica.as_str(),
                            version: base_options.base.unwrap_or(0) + 1,
                            message: &base_options.message,
                        });
                        let pushed = push_origin(
                            &mut source,
                            kept,
                            (true, sealing),
                            deferred,
                            |source, options| {
                                sync_local_with(source, &mut target, &*progress, options)
                            },
                        );
                        let (stats, pushed) = match (pushed, merging) {
                            (Ok(done), _) => done,
                            (Err(Error::Conflict { .. }), Some((on_conflict, base))) => {
                                // The replica moved past the base: merge instead. The
                                // push's write lock and read transaction go first.
                                drop((target, source));
                                let outcome = merge_embedded(
                                    store.dir("push --merge")?,
                                    &local,
                                    crate::merge::Request {
                                        replica: replica.clone(),
                                        base,
                                        on_conflict,
                                        message: base_options.message,
                                        client_id: base_options.client_id,
                                        key_id: base_options.key_id,
                                    },
                                    started,
                                )?;
                                return Ok((outcome, None));
                            }
                            (Err(e), _) => return Err(e),
                        };
                        let (version, created) = target
                            .outcome()
                            .expect("a successful sync leaves an outcome");
                        // The sync agreed on the chunked digest; what is recorded and
                        // shown is the version's digest 1 where it has one (a version
                        // made with every chunk new, or on the hash-tree path), else its
                        // chunked digest (`c:…`), which every reader compares in that
                        // form.
                        let mut stats = stats;
                        match (&version.digest, &version.digest2) {
                            (one, _) if !one.is_empty() => stats.digest.clone_from(one),
                            (_, Some(chunked)) => stats.digest.clone_from(chunked),
                            _ => {}
                        }
                        let outcome = PushOutcome {
                            stats,
                            version: version.number,
                            created,
                            repaired: target.repaired(),
                            keys: None,
                            server_id: None,
                            proved_unchanged: false,
                            merged: None,
                        };
                        // Versions the retention policy removed: their pages are freed
                        // once this push lets go of the store.
                        let removed = target.removed().to_vec();
                        drop(target);
                        if let AnyStore::Dir(store) = &store {
                            store.collect_after_removal(&replica, &removed);
                        }
                        Ok((outcome, pushed))
                    })
                    .await?
                };
                if let (true, AnyStore::Dir(store)) = (outcome.created, &store) {
                    // Subscribers of this replica on this machine learn of it at once.
                    local::notify(
                        store.root(),
                        replica.as_str(),
                        local::Message::Version(outcome.version),
                    )
                    .await;
                }
                (outcome, pushed)
            }
            Server::Ws { url, compress } => {
                let mut ws = match connect(url, request.key.as_deref()).await {
                    Ok(ws) => ws,
                    Err(e) => {
                        return Err(blocking(move || Ok(damage_first(&source, deferred, e)))
                            .await
                            .unwrap_or_else(|e| e));
                    }
                };
                let o = &request.options;
                let merging = request
                    .merge
                    .as_ref()
                    .filter(|_| !o.force && o.base.is_some());
                let session = Session {
                    op: Op::Push,
                    compress: *compress,
                    merge: merging.map(OnConflict::request),
                    encryption: o.encryption.clone(),
                    rekey_from: o.rekey_from.clone(),
                    passphrase: o.passphrase,
                };
                let config = open(&mut ws, session, replica, None, o.base, o.force, None).await?;
                // A mix of plaintext and encrypted, or another key, is refused here,
                // before a page goes out. A rekey's replica is under the key it replaces.
                check_encryption(
                    replica.as_str(),
                    o.rekey_from.as_deref().or(o.encryption.as_deref()),
                    config.version,
                    config.encryption.as_ref(),
                )?;
                // A server older than merging ignores the request and would refuse the
                // push: stop before a page goes out.
                if merging.is_some() && !config.merge && Some(config.version) != o.base {
                    return Err(Error::Protocol(format!(
                        "{url} does not merge pushes (a sqlferry serve older than this client), \
                         and {replica} moved past this push's base: --merge needs a newer \
                         server; nothing was pushed"
                    )));
                }
                if request.wait_followers && !config.followers {
                    return Err(Error::Protocol(format!(
                        "{}; nothing was pushed",
                        older_server(url)
                    )));
                }
                if request.new_keys && config.key_type != "admin" {
                    return Err(Error::Auth(format!(
                        "--new-keys needs the admin key; this is a {} key",
                        config.key_type.to_uppercase()
                    )));
                }
                // Keys are minted for a replica this push creates (the server has no id
                // for it yet), or when asked: an admin key's push to an existing replica
                // leaves its keys as they are.
                let new_replica = config.replica_id.is_empty();
                if request.new_keys || (request.key_request && new_replica) {
                    ws::send_binary(&mut ws, Control::KeyRequest.to_bytes()).await?;
                }
                // An encrypted version's commit message travels only inside its seal
                // (SEAL, below): never in clear.
                if !o.message.is_empty() && request.encryption.is_none() {
                    ws::send_binary(
                        &mut ws,
                        Control::CommitMessage(o.message.clone()).to_bytes(),
                    )
                    .await?;
                }
                let pump = ws::Pump::client_in(
                    ws::wire_for(config.compress.as_deref()),
                    *compress,
                    peer_is_loopback(&ws),
                );
                // The chunked digest only where the server agreed to it (an older server
                // does not answer): the server's store then reads only the chunks pages
                // came for, and the origin goes by chunks when it knows its base.
                let chunked = config.digest_form.as_deref() == Some(DIGEST_CHUNKED);
                let key = request.encryption.clone();
                let (name, message) = (replica.to_string(), o.message.clone());
                let sealed_version = o.base.unwrap_or(0) + 1;
                let (result, rest, wire) = ws::run_engine_with(
                    &mut ws,
                    pumped_link(Role::Origin),
                    Vec::new(),
                    Some(SYNC_IDLE_TIMEOUT),
                    pump,
                    move |link| {
                        let sealing = key.as_ref().map(|key| Sealing::Seal {
                            key,
                            replica: &name,
                            version: sealed_version,
                            message: &message,
                        });
                        push_origin(
                            &mut source,
                            kept,
                            (chunked, sealing),
                            deferred,
                            |source, options| run_origin_with(source, link, &*progress, options),
                        )
                    },
                )
                .await;
                let (mut stats, pushed) = result?;
                // What went on the wire (compressed pages compressed), not what the
                // engine handed to the link.
                stats.bytes_sent = wire.sent;
                stats.bytes_received = wire.received;
                let server_id = config.server_id;
                let config = match next_config(&mut ws, rest).await {
                    Ok(config) => config,
                    // The server's DONE said the version is committed; only its answer
                    // was lost. It is found by what it holds, or the error says so.
                    Err(Error::Disconnected(why)) if merging.is_none() => {
                        let key = request.key.as_deref();
                        let keys_lost = request.new_keys || (request.key_request && new_replica);
                        let found = (stats.digest.as_str(), chunked, keys_lost);
                        let database = request.database.as_deref();
                        self.committed_unanswered(replica, key, o, found, (&why, database))
                            .await?
                    }
                    Err(e) => return Err(e),
                };
                let merged = match config.merged {
                    Some(result) if result.refused.is_some() => {
                        return Err(crate::merge::refusal(replica, &result));
                    }
                    // The server merged what this push sent: the snapshot's content.
                    Some(result) => Some(Merged {
                        result: *result,
                        candidate_digest: stats.digest.clone(),
                    }),
                    None => None,
                };
                if let Some(m) = &merged {
                    stats.digest.clone_from(&m.result.digest);
                }
                // A push in the chunked form hears the version's digest as it recorded
                // it (digest 1 where it has one), and shows and keeps that, as a push
                // into the embedded store does.
                if let (true, Some(d)) = (chunked, &config.digest) {
                    stats.digest.clone_from(d);
                }
                let outcome = PushOutcome {
                    stats,
                    version: config.version,
                    created: config.created.unwrap_or(true),
                    repaired: config.repaired.unwrap_or(0),
                    keys: config.keys,
                    server_id: config.server_id.or(server_id),
                    proved_unchanged: false,
                    merged,
                };
                (outcome, pushed)
            }
        };
        if let Some(db) = &request.database {
            // The next push into the embedded store proves "no change" from this one's
            // state, or runs; the next pull of this replica (any store) takes LOCAL's
            // page hashes from this push's manifest while LOCAL is still in that state
            // (docs/engine.md). A merged push leaves no seal: LOCAL does not hold the
            // version it made.
            let seal = state
                .filter(|_| outcome.merged.is_none() && !sealed)
                .map(|state| history::PushSeal {
                    server: url.clone(),
                    replica: replica.to_string(),
                    version: outcome.version,
                    digest: outcome.stats.digest.clone(),
                    checked: !request.allow_corrupt,
                    source: state.to_token(),
                });
            let (db, url, replica) = (db.clone(), url.clone(), replica.to_string());
            blocking(move || {
                match seal {
                    Some(seal) => history::save_seal(&db, &seal),
                    None => history::remove_seal(&db, &url, &replica),
                }
                Ok(())
            })
            .await?;
        }
        // The pages sent are the version's, or after a merge its candidate's (none kept
        // when the server stored no candidate: an older server).
        let manifest_version = match &outcome.merged {
            Some(m) => m.result.candidate,
            None => outcome.version,
        };
        if let (Some(db), Some(pushed), true) = (request.database, pushed, manifest_version > 0) {
            let replica = replica.to_string();
            blocking(move || {
                pushed.keep(&db, url, replica, manifest_version);
                Ok(())
            })
            .await?;
        }
        Ok(outcome)
    }

    /// The answer a push's session ended without: the server's DONE said the version
    /// was committed, then the connection closed before the CONFIG naming it (a network
    /// failure, a server killed in between). The version is looked up on a new
    /// connection: the newest holding what was pushed (`digest`), made on this push's
    /// base by this client (created), or the latest already holding it (not created).
    /// Its new keys, if it asked for any, went with the answer. When the version cannot
    /// be found, the push is kept in the history of `database`
    /// ([`history::Unanswered`]: the next push takes the version it made as its base),
    /// and the error says the push was committed and how to go on.
    async fn committed_unanswered(
        &self,
        replica: &ReplicaPath,
        key: Option<&str>,
        options: &PushOptions,
        (digest, chunked, keys_lost): (&str, bool, bool),
        (why, database): (&str, Option<&Path>),
    ) -> Result<Config> {
        let base = options.base.unwrap_or(0);
        let found = match self.versions(replica, key).await {
            Ok(list) => committed_version(&list, digest, (base, options.force), &options.client_id),
            Err(e) => {
                tracing::debug!(error = %e, "cannot list the versions after a lost answer");
                None
            }
        };
        let Some((version, created)) = found else {
            let kept = match database {
                Some(db) => {
                    let (db, push) = (
                        db.to_owned(),
                        history::Unanswered {
                            server: self.url(),
                            replica: replica.to_string(),
                            base,
                            digest: digest.to_owned(),
                            client: options.client_id.clone(),
                            forced: options.force,
                        },
                    );
                    let kept = blocking(move || {
                        history::save_unanswered(&db, &push).map_err(|e| Error::io(&db, e))
                    })
                    .await;
                    if let Err(e) = &kept {
                        tracing::warn!(error = %e, "the unanswered push could not be kept for the next push");
                    }
                    kept.is_ok()
                }
                None => false,
            };
            let next = match (kept, database.is_some(), options.encryption.is_some()) {
                (true, _, _) => {
                    "The next push of this database finds that version and builds on it"
                }
                // A rekey: no database of the user's was pushed.
                (false, false, _) => "Check it before running this again",
                (false, true, true) => {
                    "If LOCAL is unchanged, the next push confirms it; if LOCAL changed \
                     since, that push is refused as VERSION_CONFLICT (an encrypted replica \
                     cannot be forced: its advice says what to do)"
                }
                (false, true, false) => {
                    "If LOCAL is unchanged, the next push confirms it; if LOCAL changed \
                     since, that push is refused as VERSION_CONFLICT, and `push --force` is \
                     then safe when the latest version holds that digest"
                }
            };
            return Err(Error::Disconnected(format!(
                "{why}, after the server had committed this push and before it named the \
                 version: the version holding digest {digest} (`sqlferry versions {replica} \
                 --json` shows each version's digests). {next}"
            )));
        };
        tracing::warn!(%replica, version = version.number, "the server committed the push but its answer was lost; the version was found by its digest");
        if keys_lost {
            tracing::warn!(%replica, "the new PUSH and PULL keys the server made for this push were lost with its answer: push again with the admin key and --new-keys for new ones, and revoke the lost ones (`sqlferry keys list {replica}`, `sqlferry keys revoke`)");
        }
        Ok(Config {
            version: version.number,
            created: Some(created),
            digest: chunked.then(|| version.recorded_digest()),
            ..Config::default()
        })
    }

    /// Waits until `count` pull subscribers of `replica` report holding `version` or a
    /// later one, or `timeout` passes (at most
    /// [`MAX_FOLLOWERS_WAIT`]);
    /// `progress` hears each count the server reports on the way. Only a server knows
    /// its followers: the embedded store is a usage error.
    pub async fn wait_followers(
        &self,
        replica: &ReplicaPath,
        version: u64,
        count: u32,
        timeout: std::time::Duration,
        key: Option<&str>,
        progress: &mut (dyn FnMut(u32) + Send),
    ) -> Result<Followers> {
        let Server::Ws { url, .. } = self else {
            return Err(Error::Usage(
                "--wait-followers needs a server (sqlferry serve): the embedded store does not \
                 know its pull subscribers"
                    .into(),
            ));
        };
        let mut ws = connect(url, key).await?;
        let config = open(&mut ws, Op::WaitFollowers, replica, None, None, false, None).await?;
        if !config.followers {
            return Err(Error::Protocol(older_server(url)));
        }
        let wait = WaitFollowers {
            count,
            version,
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        ws::send_binary(&mut ws, Control::WaitFollowers(wait).to_bytes()).await?;
        // The server answers by its deadline; a margin for the network, then it is
        // taken for gone.
        let limit = timeout.min(MAX_FOLLOWERS_WAIT) + CONNECT_TIMEOUT;
        let waited = async {
            loop {
                let bytes = ws::recv_binary(&mut ws).await?.ok_or_else(|| {
                    Error::Disconnected("the server closed the session while waiting".into())
                })?;
                if !bytes.first().is_some_and(|&b| Control::is_control(b)) {
                    return Err(match Frame::decode(&bytes) {
                        Ok(Frame::Error { code, message }) => Error::Remote { code, message },
                        Ok(other) => {
                            Error::Protocol(format!("expected FOLLOWED, got {}", other.name()))
                        }
                        Err(e) => Error::Protocol(e.to_string()),
                    });
                }
                match Control::decode(&bytes).map_err(|e| Error::Protocol(e.to_string()))? {
                    Control::Followed(f) if f.version == version => {
                        progress(f.count);
                        if f.done {
                            return Ok(Followers {
                                count: f.count,
                                reached: f.count >= count,
                            });
                        }
                    }
                    other => {
                        return Err(Error::Protocol(format!(
                            "expected FOLLOWED for version {version}, got {other:?}"
                        )));
                    }
                }
            }
        };
        let result = tokio::time::timeout(limit, waited)
            .await
            .unwrap_or_else(|_| {
                Err(Error::Disconnected(format!(
                    "{url} did not answer within {}s while waiting for followers",
                    limit.as_secs()
                )))
            });
        let _ = ws.close(None).await;
        result
    }

    /// Pulls one version of `replica` into the database at `local`, atomically; with
    /// `encryption`, as [`Server::pull_into`] opens an encrypted version.
    pub async fn pull(
        &self,
        replica: &ReplicaPath,
        selector: Selector,
        local: &Path,
        (key, encryption): (Option<&str>, Option<&Keys>),
        progress: Arc<dyn Progress>,
    ) -> Result<PullOutcome> {
        let local = local.to_owned();
        let target = blocking(move || Writer::open(&local)).await?;
        self.pull_into(replica, selector, target, (key, encryption), progress)
            .await
            .map(|(outcome, _)| outcome)
    }

    /// Pulls one version of `replica` through `target`, and hands the writer back for
    /// the next pull (a subscriber keeps one across pulls; see
    /// [`Writer::keep_committed_hashes`]).
    /// With `encryption`, the version must be encrypted with one of those keys (the
    /// one whose id it names opens it): its pages are opened, and its seal checked,
    /// before LOCAL commits.
    pub async fn pull_into(
        &self,
        replica: &ReplicaPath,
        selector: Selector,
        target: Writer,
        (key, encryption): (Option<&str>, Option<&Keys>),
        progress: Arc<dyn Progress>,
    ) -> Result<(PullOutcome, Writer)> {
        self.pull_through(replica, selector, target, (key, encryption), progress)
            .await
    }

    /// Brings the database at `local` to version `version` of `replica` (after a
    /// merged push), only if it still holds the content whose digest is `expected`:
    /// checked inside the pull's write transaction, so a commit to LOCAL made after the
    /// push read it is never overwritten. When LOCAL changed: [`Error::LocalChanges`],
    /// and nothing was written.
    pub async fn pull_if_unchanged(
        &self,
        replica: &ReplicaPath,
        version: u64,
        local: &Path,
        expected: &str,
        key: Option<&str>,
    ) -> Result<PullOutcome> {
        let (path, expected) = (local.to_owned(), expected.to_owned());
        let target = blocking(move || {
            Ok(Unchanged {
                writer: Writer::open(&path)?,
                path,
                expected,
            })
        })
        .await?;
        self.pull_through(
            replica,
            Selector::Number(version),
            target,
            (key, None),
            no_progress(),
        )
        .await
        .map(|(outcome, _)| outcome)
    }

    /// [`Server::pull_into`] through any page target.
    async fn pull_through<T>(
        &self,
        replica: &ReplicaPath,
        selector: Selector,
        mut target: T,
        (key, encryption): (Option<&str>, Option<&Keys>),
        progress: Arc<dyn Progress>,
    ) -> Result<(PullOutcome, T)>
    where
        T: PageTarget + Send + 'static,
    {
        let keys = encryption.cloned();
        let ids = keys.as_ref().map(Keys::ids).unwrap_or_default();
        // The key of those given that the version names (`pick_key`), once known.
        let chosen = move |i: Option<usize>| i.and_then(|i| keys.as_ref()?.get(i).cloned());
        match self {
            Server::Embedded(_) | Server::S3 { .. } => {
                let (store, replica) = (self.local_store(false).await?, replica.clone());
                blocking(move || {
                    let mut source = store.read(&replica, selector)?;
                    let version = source.info().number;
                    // A mix or another key is refused before a page moves, as a server's
                    // CONFIG lets a client refuse it (the version's own key id here).
                    let theirs = source.info().encryption.clone();
                    let encryption = chosen(pick_key(
                        replica.as_str(),
                        &ids,
                        version,
                        Some(&theirs.map(Encryption::key)),
                    )?);
                    // An encrypted version is relayed as the store keeps it, sealed: a
                    // pull without its key is refused by the replica, never handed the
                    // sealed bytes as pages.
                    let options = OriginOptions {
                        sealing: source.relay(),
                        ..OriginOptions::default()
                    };
                    let opening = encryption.as_ref().map(|key| Opening {
                        key,
                        replica: replica.as_str(),
                        version,
                    });
                    let (mut stats, done) =
                        sync_local_opening(&mut source, &mut target, &*progress, options, opening)?;
                    stats.plaintext_digest = done.opened.map(|f| crate::digest::hex(&f.digest));
                    // The origin's figures: what it sent is what this side received.
                    std::mem::swap(&mut stats.bytes_sent, &mut stats.bytes_received);
                    Ok((
                        PullOutcome {
                            stats,
                            version,
                            local_sealed: false,
                            server_id: None,
                            encryption: encryption.map(|k| k.id()),
                        },
                        target,
                    ))
                })
                .await
            }
            Server::Ws { url, compress } => {
                // A time is resolved here, so the server is asked for a number (which
                // servers older than `@TIME` understand too). Unless the version after
                // the one picked was removed by retention: that one may have been the
                // latest at that time (an older kept one would be the wrong content),
                // and only the server, which keeps the removed versions' times, can
                // tell. Servers older than `@TIME` never remove versions.
                let selector = match selector {
                    Selector::At(_) => {
                        let versions = self.versions(replica, key).await?;
                        match selector.pick(&versions) {
                            Some(n) if removed_after(&versions, n) => selector,
                            Some(n) => Selector::Number(n),
                            None if versions.first().is_some_and(|v| v.number > 1) => selector,
                            None => {
                                return Err(Error::NotFound(format!(
                                    "{replica}@{selector} does not exist: no version is that old"
                                )));
                            }
                        }
                    }
                    other => other,
                };
                let mut ws = connect(url, key).await?;
                // Any key given says "encrypted"; the server's CONFIG names the
                // version's key id, and the key of that id is picked from those given.
                let session = Session {
                    op: Op::Pull,
                    compress: *compress,
                    merge: None,
                    encryption: ids.first().cloned(),
                    rekey_from: None,
                    passphrase: None,
                };
                let config =
                    open(&mut ws, session, replica, Some(selector), None, false, None).await?;
                let encryption = chosen(pick_key(
                    replica.as_str(),
                    &ids,
                    config.version,
                    config.encryption.as_ref(),
                )?);
                let key_id = encryption.as_ref().map(EncryptionKey::id);
                let (name, version) = (replica.to_string(), config.version);
                let (result, _, wire) = ws::run_engine_on(
                    &mut ws,
                    pumped_link(Role::Replica),
                    Vec::new(),
                    Some(SYNC_IDLE_TIMEOUT),
                    ws::wire_for(config.compress.as_deref()),
                    move |link| {
                        let started = std::time::Instant::now();
                        let opening = encryption.as_ref().map(|key| Opening {
                            key,
                            replica: &name,
                            version,
                        });
                        let done = run_replica_opening(&mut target, link, &NoProgress, opening)?;
                        progress.finish();
                        let stats = SyncStats {
                            page_size: done.page_size,
                            pages_total: done.page_count,
                            pages_sent: done.pages_written,
                            bytes_sent: link_sent(link),
                            bytes_received: link_received(link),
                            hash_bytes: done.hash_bytes,
                            duration: started.elapsed(),
                            digest: crate::digest::digest_text(done.form, &done.digest),
                            plaintext_digest: done.opened.map(|f| crate::digest::hex(&f.digest)),
                        };
                        Ok((stats, target))
                    },
                )
                .await;
                let (mut stats, target) = result?;
                // What went on the wire (compressed pages compressed).
                stats.bytes_sent = wire.sent;
                stats.bytes_received = wire.received;
                Ok((
                    PullOutcome {
                        stats,
                        version: config.version,
                        local_sealed: false,
                        server_id: config.server_id,
                        encryption: key_id,
                    },
                    target,
                ))
            }
        }
    }
}

/// A pull target that writes LOCAL only if it still holds the content whose digest is
/// `expected`, checked once the write transaction is open (no other writer can commit
/// after the check): a merged push brings LOCAL to the merged version this way.
struct Unchanged {
    writer: Writer,
    path: PathBuf,
    expected: String,
}

impl Unchanged {
    fn changed(&self, why: &str) -> Error {
        Error::LocalChanges(format!(
            "{} {why} since this push read it, so it was not brought to the merged version; \
             it keeps its changes, and its next push merges them",
            self.path.display()
        ))
    }
}

impl PageTarget for Unchanged {
    fn begin(&mut self, begin: &BeginInfo) -> Result<u32> {
        // Another page size would be rebuilt before the transaction opens: refused first.
        let size = Snapshot::open(&self.path).map(|s| s.page_size());
        if size.as_ref().map_or(true, |s| *s != begin.page_size) {
            return Err(self.changed("changed (or its page size differs)"));
        }
        let held = PageTarget::begin(&mut self.writer, begin)?;
        let now = Snapshot::open(&self.path)?.digest(false)?;
        if crate::digest::hex(&now) != self.expected {
            return Err(self.changed("was written"));
        }
        Ok(held)
    }

    fn hashes(&mut self, f: &mut dyn FnMut(u32, Hash) -> Result<()>) -> Result<()> {
        PageTarget::hashes(&mut self.writer, f)
    }

    fn write_page(&mut self, pgno: u32, data: Vec<u8>, hash: &Hash) -> Result<()> {
        PageTarget::write_page(&mut self.writer, pgno, data, hash)
    }

    fn commit(
        &mut self,
        page_count: u32,
        digest: &Hash,
        hashes: &mut dyn Iterator<Item = Result<Hash>>,
    ) -> Result<()> {
        PageTarget::commit(&mut self.writer, page_count, digest, hashes)
    }
}

/// The embedded store's merge of a push whose base is stale: LOCAL copied into a
/// scratch file through a consistent snapshot (the candidate), merged onto the latest
/// version and stored ([`crate::merge::merge_into_store`]). The scratch files live in
/// `$TMPDIR` and go when it returns. Blocking.
fn merge_embedded(
    store: &Store,
    local: &Path,
    request: crate::merge::Request,
    started: std::time::Instant,
) -> Result<PushOutcome> {
    let tmp = std::env::temp_dir();
    let scratch = tempfile::Builder::new()
        .prefix("sqlferry-merge-")
        .tempdir_in(&tmp)
        .map_err(|e| Error::io(&tmp, e))?;
    let candidate = scratch.path().join("candidate.db");
    let candidate_digest = crate::merge::copy_database(local, &candidate)?;
    let stored = crate::merge::merge_into_store(
        store,
        &request,
        &candidate,
        &candidate_digest,
        scratch.path(),
    )?;
    let v = &stored.version;
    Ok(PushOutcome {
        stats: SyncStats {
            page_size: v.page_size,
            pages_total: v.page_count,
            pages_sent: 0,
            bytes_sent: 0,
            bytes_received: 0,
            hash_bytes: 0,
            duration: started.elapsed(),
            digest: v.digest.clone(),
            plaintext_digest: None,
        },
        version: v.number,
        created: stored.created,
        repaired: 0,
        keys: None,
        server_id: None,
        proved_unchanged: false,
        merged: Some(Merged {
            result: stored.result,
            candidate_digest,
        }),
    })
}

/// Whether the version numbered after `n` is missing from `versions` (oldest first)
/// though a newer one exists: it was removed by retention.
fn removed_after(versions: &[VersionInfo], n: u64) -> bool {
    let newer = versions.iter().find(|v| v.number > n);
    newer.is_some_and(|v| v.number != n + 1)
}

/// Runs blocking work (SQLite, files, the engine) on a blocking thread of the caller's
/// runtime and waits for it without holding up an async thread. A panic in it becomes
/// [`Error::Bug`].
pub(crate) async fn blocking<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await?
}

/// The most versions a `versions` list over a server may hold (a push a minute for
/// four years): a server that keeps answering "more" past it is refused, so a hostile
/// or broken one cannot make the client's list grow without bound.
const MAX_LISTED_VERSIONS: usize = 1 << 21;

/// Checks one more run of a `versions` list: not empty, after the `last` version
/// listed (the server lists oldest first and never repeats itself), within
/// [`MAX_LISTED_VERSIONS`].
fn check_run(
    replica: &ReplicaPath,
    last: Option<&VersionInfo>,
    run: &[VersionInfo],
    listed: usize,
) -> Result<()> {
    let broken = |why: String| {
        Err(Error::Protocol(format!(
            "the server's list of the versions of {replica} {why}"
        )))
    };
    let Some(first) = run.first() else {
        return broken("announced more versions and sent none".into());
    };
    if let Some(last) = last
        && first.number <= last.number
    {
        return broken(format!(
            "went back from version {} to {}",
            last.number, first.number
        ));
    }
    if run.windows(2).any(|w| w[1].number <= w[0].number) {
        return broken("is out of order".into());
    }
    if listed + run.len() > MAX_LISTED_VERSIONS {
        return broken(format!("passed {MAX_LISTED_VERSIONS} versions"));
    }
    Ok(())
}

/// Refuses a push source that fails `PRAGMA quick_check`, run inside the snapshot's
/// read transaction (what is checked is what would be sent): a nightly copy of a
/// damaged database must never replace a good version or a good local copy.
///
/// A push that follows the WAL (reads only the pages changed since the last one) checks
/// the structure of those pages instead, which costs what they cost; any doubt there, and
/// every push that reads the whole file, runs the full `quick_check` (docs/trust.md).
pub fn check_source(source: &Snapshot) -> Result<()> {
    if let Some(problems) = source.check_changed_pages()? {
        if problems.is_empty() {
            return Ok(());
        }
        tracing::info!(problem = %problems[0], "a changed page looks damaged; running quick_check");
    }
    quick_check_source(source)
}

/// The full half of [`check_source`]: `PRAGMA quick_check` of every page, whatever the
/// WAL says changed. For a check that runs after the scan, when the changed pages are no
/// longer known (the scan moved the hash list on).
pub fn quick_check_source(source: &Snapshot) -> Result<()> {
    let problems = match source.quick_check() {
        Ok(lines) => lines,
        // SQLite could not even walk the file: that is the check's answer.
        Err(e) if e.kind() == crate::ErrorKind::Verification => vec![e.to_string()],
        Err(e) => return Err(e),
    };
    if problems == ["ok"] {
        return Ok(());
    }
    // One line for the error: SQLite puts several problems in one row, one a line.
    const SHOWN: usize = 3;
    let lines: Vec<&str> = problems
        .iter()
        .flat_map(|p| p.lines())
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("*** in database"))
        .collect();
    let mut shown = lines
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join("; ");
    if lines.len() > SHOWN {
        shown.push_str(&format!("; and {} more", lines.len() - SHOWN));
    }
    Err(Error::Verification(format!(
        "{} fails PRAGMA quick_check ({shown}): not pushed, so it replaces no good copy; \
         repair it, or push it anyway with --allow-corrupt",
        source.path().display()
    )))
}

/// The seal of the last push, when it proves that pushing `state` to `replica` now
/// would change nothing (docs/engine.md, "A no-change push that reads nothing"): the
/// seal is of the push that made or confirmed the base version, its source state is
/// `state` exactly, that state passed the source check (or the check is not asked
/// for), and the replica's latest version is still the base with the seal's digest,
/// and records no damaged stored page a push would resend.
fn proved_unchanged(
    store: &crate::store::Store,
    replica: &ReplicaPath,
    seal: Option<history::PushSeal>,
    base: u64,
    state: crate::page::SourceState,
    allow_corrupt: bool,
) -> Result<Option<history::PushSeal>> {
    let Some(seal) = seal else {
        return Ok(None);
    };
    if seal.version != base || seal.source != state.to_token() || !(seal.checked || allow_corrupt) {
        return Ok(None);
    }
    let latest = store.latest_sound(replica)?;
    let holds = latest.is_some_and(|v| {
        v.number == seal.version
            && v.has_digest(&seal.digest)
            && v.page_size == state.page_size()
            && v.page_count == state.page_count()
    });
    Ok(holds.then_some(seal))
}

/// The page hashes a push sent, in an unlinked temporary file, until the version they
/// became is known.
enum PushedManifest {
    /// Every page hash.
    Whole {
        page_size: u32,
        page_count: u32,
        hashes: crate::digest::HashSpill,
    },
    /// The known base with some chunks changed (a push by chunks): the base's header
    /// and chunk hashes (the kept manifest is updated only if it is still that one), the
    /// new chunk hashes, and the changed chunks' indexes and page hashes.
    Chunks {
        base: history::ManifestHeader,
        base_table: Vec<crate::protocol::Hash>,
        page_size: u32,
        page_count: u32,
        table: Vec<crate::protocol::Hash>,
        changed: Vec<(u32, u32)>,
        hashes: crate::digest::HashSpill,
    },
}

impl PushedManifest {
    /// Keeps it as `database`'s manifest of `version` of `replica` on `server`.
    fn keep(self, database: &Path, server: String, replica: String, version: u64) {
        let io = |e| Error::io(Path::new("pushed manifest"), e);
        match self {
            PushedManifest::Whole {
                page_size,
                page_count,
                hashes,
            } => {
                let header = history::ManifestHeader {
                    server,
                    replica,
                    version,
                    page_size,
                    page_count,
                };
                let mut all = hashes.iter(page_count).map(|h| h.map_err(io));
                history::save_manifest(database, &header, &mut all);
            }
            PushedManifest::Chunks {
                base,
                base_table,
                page_size,
                page_count,
                table,
                changed,
                hashes,
            } => {
                let header = history::ManifestHeader {
                    server,
                    replica,
                    version,
                    page_size,
                    page_count,
                };
                let mut at = 0u32;
                let mut chunks = changed.into_iter().map(|(idx, len)| {
                    let mut out = Vec::with_capacity(len as usize);
                    hashes.read_at(at, len, &mut out).map_err(io)?;
                    at += len;
                    Ok((idx, out.concat()))
                });
                history::update_manifest(database, &base, &base_table, &header, table, &mut chunks);
            }
        }
    }
}

/// A kept manifest as the origin's known base.
struct KeptBase(history::KeptManifest);

impl crate::engine::BaseManifest for KeptBase {
    fn chunk_hashes(&self) -> &[crate::protocol::Hash] {
        self.0.table()
    }

    fn read_chunk(&mut self, idx: u32, out: &mut Vec<u8>) -> Result<bool> {
        self.0.read_chunk(idx, out)
    }
}

/// Runs the origin side of a push through `sync`, with the kept manifest (if any) as
/// the known base, and collects the pushed page hashes; with the chunked digest when
/// `chunked` (the peer speaks it), sealed when `sealing` says so. A sealed push collects
/// nothing: its hashes are identities, which no kept manifest holds.
fn push_origin(
    source: &mut Snapshot,
    kept: Option<(history::ManifestHeader, history::KeptManifest)>,
    (chunked, sealing): (bool, Option<Sealing<'_>>),
    deferred: bool,
    sync: impl FnOnce(&mut dyn PageSource, OriginOptions<'_>) -> Result<SyncStats>,
) -> Result<(SyncStats, Option<PushedManifest>)> {
    let (base_header, mut kept) = match kept {
        Some((header, hashes)) => (Some(header), Some(KeptBase(hashes))),
        None => (None, None),
    };
    let base_table = kept.as_ref().map(|k| k.0.table().to_vec());
    let base = match (&base_header, kept.as_mut()) {
        (Some(h), Some(hashes)) => Some(KnownBase {
            version: h.version,
            page_size: h.page_size,
            page_count: h.page_count,
            hashes,
        }),
        _ => None,
    };
    let mut pushed = None;
    let mut sink = |page_size: u32, page_count: u32, synced: Synced<'_>| -> Result<()> {
        let io = |e| Error::io(&std::env::temp_dir(), e);
        let mut w = crate::digest::HashSpill::writer().map_err(io)?;
        match synced {
            Synced::Pages(hashes) => {
                for h in hashes {
                    w.push(&h?).map_err(io)?;
                }
                let hashes = w.finish().map_err(io)?;
                pushed = Some(PushedManifest::Whole {
                    page_size,
                    page_count: hashes.len(),
                    hashes,
                });
            }
            Synced::Chunks { table, changed } => {
                let (Some(base), Some(base_table)) = (base_header.clone(), base_table.clone())
                else {
                    return Err(Error::Bug("a sync by chunks without a known base".into()));
                };
                let mut kept = Vec::new();
                for chunk in changed {
                    let (idx, entries) = chunk?;
                    for h in entries.chunks_exact(crate::digest::HASH_BYTES) {
                        w.push(h.try_into().expect("32 bytes")).map_err(io)?;
                    }
                    kept.push((idx, (entries.len() / crate::digest::HASH_BYTES) as u32));
                }
                pushed = Some(PushedManifest::Chunks {
                    base,
                    base_table,
                    page_size,
                    page_count,
                    table: table.to_vec(),
                    changed: kept,
                    hashes: w.finish().map_err(io)?,
                });
            }
        }
        Ok(())
    };
    let mut checked = CheckedPush {
        snapshot: source,
        pending: deferred,
    };
    let sealed = sealing.is_some();
    let stats = sync(
        &mut checked,
        OriginOptions {
            base,
            manifest: match sealed {
                true => None,
                false => Some(&mut sink),
            },
            chunked_digest: chunked,
            sealing,
        },
    );
    let stats = match stats {
        // The sync ended before the check's answer was awaited: a damaged LOCAL is
        // what the push reports, as when it was checked first.
        Err(e) if checked.pending => return Err(damage_first(checked.snapshot, true, e)),
        // A changed page the scan found wrong before the sync failed: the same.
        Err(e) => return Err(damage_first(checked.snapshot, false, e)),
        Ok(stats) => stats,
    };
    Ok((stats, pushed))
}

/// Decides how a push checks LOCAL. A push that follows the WAL checks the structure of
/// each page the WAL names as the scan reads it ([`Snapshot::check_in_pass`]: each
/// changed page read once), and the push asks for the verdict before the replica
/// commits ([`CheckedPush`]): a changed page that looks wrong, or a scan that did not
/// see every changed page, makes the full `quick_check` decide then (`false`: nothing
/// deferred yet). A push that reads the whole file defers the full `quick_check`
/// (`true`): it runs beside the scan when the scan reads every page from the file,
/// after it otherwise, and the push waits for its answer before the commit. Before, it
/// ran here, alone on one core, before the first page went out: about half a full
/// push's client CPU on its critical path (docs/performance.md).
fn defer_check(source: &mut Snapshot) -> bool {
    if source.check_in_pass() {
        return false;
    }
    source.check_beside_scan();
    true
}

/// The full `quick_check` of LOCAL when the structural check of its changed pages
/// ([`Snapshot::check_in_pass`]) did not clear it; nothing when it did, or when none was
/// armed.
pub(crate) fn settle_pass_check(source: &Snapshot) -> Result<()> {
    match source.pass_check() {
        Some(Err(why)) => {
            tracing::info!(%why, "the check of the changed pages was not enough; running quick_check");
            quick_check_source(source)
        }
        _ => Ok(()),
    }
}

/// `e`, unless a deferred check (`deferred`) finds LOCAL damaged: then that refusal,
/// which is what a push of a damaged LOCAL has always answered, whatever else failed.
fn damage_first(source: &Snapshot, deferred: bool, e: Error) -> Error {
    if !deferred && source.pass_problem().is_none() {
        return e;
    }
    match quick_check_source(source) {
        Err(damaged) if damaged.kind() == crate::ErrorKind::Verification => damaged,
        _ => e,
    }
}

/// A push's source whose deferred `quick_check` ([`defer_check`]) is answered before
/// the origin asks the replica to commit: a damaged LOCAL still commits nothing.
struct CheckedPush<'a> {
    snapshot: &'a mut Snapshot,
    /// The check is deferred and not answered yet.
    pending: bool,
}

impl PageSource for CheckedPush<'_> {
    fn page_size(&self) -> u32 {
        PageSource::page_size(&*self.snapshot)
    }

    fn page_count(&self) -> u32 {
        PageSource::page_count(&*self.snapshot)
    }

    fn scan(&mut self, with_data_after: u32, f: &mut crate::engine::ScanFn<'_>) -> Result<()> {
        PageSource::scan(&mut *self.snapshot, with_data_after, f)
    }

    fn read_page(&mut self, pgno: u32, buf: &mut Vec<u8>) -> Result<()> {
        PageSource::read_page(&mut *self.snapshot, pgno, buf)
    }

    fn chunk_hashes(&mut self) -> Result<Option<Vec<Option<crate::digest::Hash>>>> {
        PageSource::chunk_hashes(&mut *self.snapshot)
    }

    fn scan_chunk(
        &mut self,
        idx: u32,
        f: &mut crate::engine::ScanFn<'_>,
    ) -> Result<crate::digest::Hash> {
        PageSource::scan_chunk(&mut *self.snapshot, idx, f)
    }

    fn chunks_done(&mut self) -> Result<()> {
        PageSource::chunks_done(&mut *self.snapshot)
    }

    fn check(&mut self) -> Result<()> {
        if std::mem::take(&mut self.pending) {
            return quick_check_source(self.snapshot);
        }
        settle_pass_check(self.snapshot)
    }
}

fn link_sent(link: &crate::engine::ChannelLink) -> u64 {
    use crate::engine::Link;
    link.bytes_sent()
}

fn link_received(link: &crate::engine::ChannelLink) -> u64 {
    use crate::engine::Link;
    link.bytes_received()
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

// How long the server may stay silent in a sync: one value for both sides.
use crate::protocol::SYNC_IDLE_TIMEOUT;

/// How long connecting (TCP, TLS and the WebSocket upgrade) may take.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Opens a session: the upgrade carries the key in `Authorization: Bearer`.
async fn connect(url: &str, key: Option<&str>) -> Result<Socket> {
    connect_with(url, key, ws::ws_config()).await
}

/// [`connect`] for a subscription: it hears small control frames for hours, so its
/// buffers start at 4 KiB (they grow for a larger frame) instead of tungstenite's 128
/// KiB each way, which a daemon with 200 subscriptions would hold as 50 MiB.
async fn connect_small(url: &str, key: Option<&str>) -> Result<Socket> {
    let config = ws::ws_config()
        .read_buffer_size(4096)
        .write_buffer_size(4096);
    connect_with(url, key, config).await
}

async fn connect_with(
    url: &str,
    key: Option<&str>,
    config: tokio_tungstenite::tungstenite::protocol::WebSocketConfig,
) -> Result<Socket> {
    let endpoint = format!("{url}/v1/sync");
    let mut request = endpoint
        .as_str()
        .into_client_request()
        .map_err(|e| Error::Usage(format!("--server {url}: {e}")))?;
    if let Some(key) = key {
        let value = format!("Bearer {key}")
            .parse()
            .map_err(|_| Error::Usage("the key has characters a header cannot carry".into()))?;
        request.headers_mut().insert("authorization", value);
    }
    // wss:// gets our own TLS settings (ring, the webpki roots and SQLFERRY_CA_FILE);
    // ws:// needs none, so a bad SQLFERRY_CA_FILE does not stand in its way.
    let connector = if url.starts_with("wss://") {
        Some(tokio_tungstenite::Connector::Rustls(tls::client_config()?))
    } else {
        None
    };
    // TCP_NODELAY (`disable_nagle`): the session is an exchange of small frames (OPEN,
    // CONFIG, hashes, COMMIT) whose writes the pump already gathers (one flush per
    // batch); with Nagle's algorithm each small write after another waited for the
    // peer's delayed ACK, about 40 ms a round (a pull of a one-page database took 50 ms
    // on loopback, 5 ms without; docs/performance.md).
    let handshake =
        tokio_tungstenite::connect_async_tls_with_config(request, Some(config), true, connector);
    // A server that accepts and never answers (or a dropped SYN) must not hold a
    // command, or a subscriber's push, for as long as TCP takes to give up.
    let Ok(result) = tokio::time::timeout(CONNECT_TIMEOUT, handshake).await else {
        return Err(Error::Disconnected(format!(
            "cannot reach {url}: no answer within {}s",
            CONNECT_TIMEOUT.as_secs()
        )));
    };
    match result {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status();
            let body = response
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or_else(|| status.to_string());
            if status.as_u16() == 401 {
                Err(Error::Auth(format!("{url} refused the key: {body}")))
            } else if status.as_u16() == 503 {
                // The server could not even check the key (a full disk, say), or is at
                // its limit of sessions: its side, temporary; a subscriber retries.
                let body = body.strip_prefix("server error: ").unwrap_or(&body);
                Err(Error::Server(format!("{url} failed on its side: {body}")))
            } else if status.as_u16() == 429 {
                // Too many wrong keys from this address: wait, then try again.
                Err(Error::Server(format!("{url} answered {status}: {body}")))
            } else {
                Err(Error::Protocol(format!("{url} answered {status}: {body}")))
            }
        }
        Err(e) => Err(tls::failure(url, &e)
            .unwrap_or_else(|| Error::Disconnected(format!("cannot reach {url}: {e}")))),
    }
}

/// The largest `GET /api/health` answer [`server_id`] reads: the real one is well
/// under 200 bytes; anything past this is not a sqlferry server's.
const HEALTH_ANSWER_MAX_BYTES: u64 = 16 * 1024;

/// The id of the `sqlferry serve` server at `url` (`ws://` or `wss://`), as its
/// `GET /api/health` tells it: no key needed, so a client holding a key saved under
/// another URL of the same server (`ws://127.0.0.1:7878` for `ws://localhost:7878`)
/// can find it before it connects. `Ok(None)`: the server answered without an id (an
/// older server). Bounded in time ([`CONNECT_TIMEOUT`]) and bytes; `wss://` is checked
/// as a session's TLS is.
///
/// HTTP/1.0 on purpose: the answer then ends with the connection and is never chunked,
/// so reading it needs no HTTP client.
pub async fn server_id(url: &str) -> Result<Option<String>> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    async fn ask<S>(mut io: S, host: &str) -> std::io::Result<Vec<u8>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let request = format!("GET /api/health HTTP/1.0\r\nHost: {host}\r\n\r\n");
        io.write_all(request.as_bytes()).await?;
        io.flush().await?;
        let mut answer = Vec::new();
        (&mut io)
            .take(HEALTH_ANSWER_MAX_BYTES)
            .read_to_end(&mut answer)
            .await?;
        Ok(answer)
    }
    let (tls, host) = match url.split_once("://") {
        Some(("ws", host)) => (false, host),
        Some(("wss", host)) => (true, host),
        _ => {
            return Err(Error::Usage(format!(
                "{url} is not a ws:// or wss:// server"
            )));
        }
    };
    let authority: axum::http::uri::Authority = host
        .parse()
        .map_err(|e| Error::Usage(format!("--server {url}: {e}")))?;
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let name = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let unreachable =
        |e: &dyn std::fmt::Display| Error::Disconnected(format!("cannot reach {url}: {e}"));
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect((name, port))
            .await
            .map_err(|e| unreachable(&e))?;
        // A request and its answer, each written whole: no reason to wait for an ACK.
        let _ = tcp.set_nodelay(true);
        if tls {
            let server_name = rustls::pki_types::ServerName::try_from(name.to_owned())
                .map_err(|e| Error::Usage(format!("--server {url}: {e}")))?;
            let stream = tokio_rustls::TlsConnector::from(tls::client_config()?)
                .connect(server_name, tcp)
                .await
                .map_err(|e| Error::Tls(format!("{url}: {e}")))?;
            ask(stream, host).await.map_err(|e| unreachable(&e))
        } else {
            ask(tcp, host).await.map_err(|e| unreachable(&e))
        }
    };
    let answer = tokio::time::timeout(CONNECT_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            Error::Disconnected(format!(
                "cannot reach {url}: no answer within {}s",
                CONNECT_TIMEOUT.as_secs()
            ))
        })??;
    let not_sqlferry = || {
        Error::Protocol(format!(
            "{url}/api/health did not answer as a sqlferry server does"
        ))
    };
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(not_sqlferry)?;
    let (head, body) = (&answer[..split], &answer[split + 4..]);
    let status = head.split(|&b| b == b' ').nth(1).ok_or_else(not_sqlferry)?;
    if status != b"200" {
        return Err(not_sqlferry());
    }
    let body: serde_json::Value = serde_json::from_slice(body).map_err(|_| not_sqlferry())?;
    Ok(body
        .get("server_id")
        .and_then(|id| id.as_str())
        .map(str::to_owned))
}

/// An OPEN of `op` on `replica` with nothing else asked.
fn open_frame(op: Op, replica: &ReplicaPath) -> Open {
    Open {
        protocol: PROTOCOL_VERSION,
        op,
        replica: replica.to_string(),
        version: None,
        base: None,
        force: false,
        role: None,
        client_id: client_id(),
        key_id: None,
        compress: Vec::new(),
        digests: Vec::new(),
        retention: None,
        retention_clear: false,
        dry_run: false,
        paged: false,
        merge: None,
        encryption: None,
        passphrase: false,
    }
}

/// What a session is for, as OPEN says it: the operation, how this client
/// compresses, and for a push whether to merge.
#[derive(Debug, Clone)]
struct Session {
    op: Op,
    compress: CompressMode,
    merge: Option<crate::protocol::control::MergeRequest>,
    /// For a push or a pull with an encryption key: its id (hex).
    encryption: Option<String>,
    /// For a rekey's push: the key id it replaces (OPEN's `encryption.rekey_from`).
    rekey_from: Option<String>,
    /// For a push whose key came from a passphrase: its salt and cost (OPEN's
    /// `encryption.passphrase`).
    passphrase: Option<crate::crypt::PassphraseSalt>,
}

impl From<Op> for Session {
    fn from(op: Op) -> Session {
        Session {
            op,
            compress: CompressMode::Off,
            merge: None,
            encryption: None,
            rekey_from: None,
            passphrase: None,
        }
    }
}

/// Whether the server at the other end of `ws` is on this machine (127.0.0.0/8,
/// ::1, or an IPv4 loopback address mapped to IPv6): `auto` then sends plain.
fn peer_is_loopback(ws: &Socket) -> bool {
    use tokio_tungstenite::MaybeTlsStream;
    let tcp = match ws.get_ref() {
        MaybeTlsStream::Plain(tcp) => tcp,
        MaybeTlsStream::Rustls(tls) => tls.get_ref().0,
        _ => return false,
    };
    tcp.peer_addr().is_ok_and(|a| match a.ip() {
        std::net::IpAddr::V4(ip) => ip.is_loopback(),
        std::net::IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    })
}

/// Sends OPEN and waits for the server's CONFIG (or its refusal).
async fn open(
    ws: &mut Socket,
    session: impl Into<Session>,
    replica: &ReplicaPath,
    selector: Option<Selector>,
    base: Option<u64>,
    force: bool,
    role: Option<SubscriberRole>,
) -> Result<Config> {
    let Session {
        op,
        compress,
        merge,
        encryption,
        rekey_from,
        passphrase,
    } = session.into();
    let open = Open {
        protocol: PROTOCOL_VERSION,
        op,
        replica: replica.to_string(),
        version: selector.map(|s| s.to_string()),
        base,
        force,
        role,
        client_id: client_id(),
        key_id: None,
        // Only a page sync carries pages.
        compress: match op {
            Op::Push | Op::Pull => ws::offered(compress),
            _ => Vec::new(),
        },
        // A push's page sync may carry the chunked digest; a pull's origin is the server,
        // which makes digest 1 as it streams the version's page hashes (docs/engine.md).
        digests: match op {
            Op::Push => vec![DIGEST_CHUNKED.to_owned()],
            _ => Vec::new(),
        },
        retention: None,
        retention_clear: false,
        dry_run: false,
        paged: op == Op::Versions,
        merge,
        encryption: encryption.map(|key_id| Encryption {
            key_id,
            rekey_from,
            passphrase: passphrase.as_ref().map(|s| {
                let c = s.cost;
                crate::protocol::control::Passphrase::new(&s.salt, c.memory_kib, c.passes, c.lanes)
            }),
        }),
        passphrase: false,
    };
    let offered = open.compress.clone();
    let offered_digests = open.digests.clone();
    ws::send_binary(ws, Control::Open(open).to_bytes()).await?;
    let mut config = next_config(ws, Vec::new()).await?;
    // A server may only choose what was offered: anything else is not spoken here.
    if config
        .compress
        .as_ref()
        .is_some_and(|c| !offered.contains(c))
    {
        return Err(Error::Protocol(format!(
            "the server chose page compression {:?}, which this client did not offer",
            config.compress.take().unwrap_or_default()
        )));
    }
    if config
        .digest_form
        .as_ref()
        .is_some_and(|d| !offered_digests.contains(d))
    {
        return Err(Error::Protocol(format!(
            "the server chose the digest form {:?}, which this client did not offer",
            config.digest_form.take().unwrap_or_default()
        )));
    }
    Ok(config)
}

/// Which of `list` (oldest first) a push committed without an answer made: the newest
/// version holding `digest`, when it was made on `base` by `client` (`true`: created;
/// a forced push's version records the latest of its commit as its base, so any base
/// past `base` is its), or is the latest and was there already (`false`).
pub(crate) fn committed_version(
    list: &[VersionInfo],
    digest: &str,
    (base, forced): (u64, bool),
    client: &str,
) -> Option<(VersionInfo, bool)> {
    let newest = list.iter().rev().find(|v| v.has_digest(digest))?;
    let on_base = newest.base == base || (forced && newest.base >= base);
    if newest.number > base && on_base && newest.client_id == client {
        return Some((newest.clone(), true));
    }
    let latest = list.last()?;
    (latest.number == newest.number).then(|| (newest.clone(), false))
}

/// The next CONFIG from the server: from `pending` frames first, then the socket. An
/// ERROR frame becomes the error it reports.
async fn next_config(ws: &mut Socket, pending: Vec<Vec<u8>>) -> Result<Config> {
    let mut pending = pending.into_iter();
    loop {
        let bytes = match pending.next() {
            Some(b) => b,
            None => ws::recv_binary(ws)
                .await?
                .ok_or_else(|| Error::Disconnected("the server closed the session".into()))?,
        };
        if bytes.first().is_some_and(|&b| Control::is_control(b)) {
            match Control::decode(&bytes).map_err(|e| Error::Protocol(e.to_string()))? {
                Control::Config(c) => return Ok(c),
                Control::NewReplicaVersion(_) | Control::Changed(_) => continue,
                other => {
                    return Err(Error::Protocol(format!(
                        "unexpected {other:?} from the server"
                    )));
                }
            }
        }
        match Frame::decode(&bytes).map_err(|e| Error::Protocol(e.to_string()))? {
            Frame::Error { code, message } => return Err(Error::Remote { code, message }),
            Frame::Message { text, .. } => tracing::info!(server = %text, "server says"),
            other => {
                return Err(Error::Protocol(format!(
                    "expected CONFIG, got {}",
                    other.name()
                )));
            }
        }
    }
}

/// The refusal of `--wait-followers` by a server that keeps no followers.
fn older_server(url: &str) -> String {
    format!(
        "{url} does not keep followers (a sqlferry serve older than this client): \
         --wait-followers needs a newer server"
    )
}

/// Who is asking, as recorded with each version: `user@host`. Without `$USER` (or
/// `$LOGNAME`), as under systemd or `env -i`, the user is the numeric uid: `uid1000`.
pub fn client_id() -> String {
    let user = ["USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .or_else(|| {
            use std::os::unix::fs::MetadataExt as _;
            // This process's own /proc entry belongs to its user.
            let uid = std::fs::metadata("/proc/self").ok()?.uid();
            Some(format!("uid{uid}"))
        })
        .unwrap_or_else(|| "unknown".into());
    let host =
        hostname::get().map_or_else(|_| "localhost".into(), |h| h.to_string_lossy().into_owned());
    format!("{user}@{host}")
}

/// A [`Progress`] that shows nothing, shareable across threads.
pub fn no_progress() -> Arc<dyn Progress> {
    Arc::new(NoProgress)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(number: u64) -> VersionInfo {
        VersionInfo {
            page_size: 4096,
            page_count: 1,
            size: 4096,
            ..VersionInfo::bare(number, 0)
        }
    }

    /// The version a push committed without an answer is the newest holding its
    /// digest, made on its base by this client; or the latest, already holding it.
    /// Another client's version, or an older one holding the digest, is not it.
    #[test]
    fn an_unanswered_push_is_matched_by_digest_base_and_client() {
        let made = |number, base, client: &str, digest: &str| VersionInfo {
            base,
            client_id: client.into(),
            digest: digest.into(),
            digest2: Some(format!("c:{digest}")),
            ..v(number)
        };
        let list = [made(1, 0, "me", "aa"), made(2, 1, "me", "bb")];
        let found = |list: &[VersionInfo], digest, base| {
            committed_version(list, digest, (base, false), "me")
                .map(|(v, created)| (v.number, created))
        };
        assert_eq!(found(&list, "bb", 1), Some((2, true)));
        assert_eq!(found(&list, "c:bb", 1), Some((2, true)), "the chunked form");
        // Already there: the latest holds it, made on another base.
        assert_eq!(found(&list, "bb", 2), Some((2, false)));
        // Not made on this base, and not the latest: not this push's.
        assert_eq!(found(&list, "aa", 1), None);
        assert_eq!(found(&list, "cc", 1), None);
        // Another client's version on this base holding the digest, then another on
        // top: not this push's.
        let theirs = [
            made(1, 0, "me", "aa"),
            made(2, 1, "them", "bb"),
            made(3, 2, "them", "cc"),
        ];
        assert_eq!(found(&theirs, "bb", 1), None);
        assert_eq!(found(&[], "bb", 1), None);
        // A forced push made on base 1 over another client's version 2: its version
        // records 2 as its base.
        let forced = [
            made(1, 0, "me", "aa"),
            made(2, 1, "them", "bb"),
            made(3, 2, "me", "cc"),
        ];
        let created = committed_version(&forced, "cc", (1, true), "me").map(|(v, c)| (v.number, c));
        assert_eq!(created, Some((3, true)));
        assert_eq!(
            found(&forced, "cc", 1),
            Some((3, false)),
            "unforced: only already there"
        );
    }

    #[test]
    fn a_versions_run_must_move_forward_and_stay_bounded() {
        let r = ReplicaPath::parse("ns/db").unwrap();
        assert!(check_run(&r, Some(&v(3)), &[v(4), v(9)], 3).is_ok());
        assert!(check_run(&r, None, &[v(1)], 0).is_ok());
        let err = |last: Option<&VersionInfo>, run: &[VersionInfo], listed| {
            check_run(&r, last, run, listed).unwrap_err().to_string()
        };
        assert!(err(Some(&v(3)), &[], 3).contains("announced more versions and sent none"));
        assert!(err(Some(&v(3)), &[v(3)], 3).contains("went back from version 3 to 3"));
        assert!(err(Some(&v(3)), &[v(5), v(4)], 3).contains("out of order"));
        let full = MAX_LISTED_VERSIONS - 1;
        assert!(check_run(&r, Some(&v(9)), &[v(10)], full).is_ok());
        assert!(err(Some(&v(9)), &[v(10), v(11)], full).contains("passed 2097152 versions"));
    }

    #[test]
    fn an_s3_store_has_one_url_whatever_its_spelling_and_takes_an_endpoint() {
        for spelled in ["s3://backups/sqlferry", "s3://backups/sqlferry/"] {
            let server = Server::parse(Some(spelled)).unwrap();
            assert_eq!(server.url(), "s3://backups/sqlferry", "{spelled}");
            assert!(!server.needs_key());
        }
        let server = Server::parse(Some("s3://backups/sqlferry"))
            .unwrap()
            .with_s3_endpoint(Some("http://127.0.0.1:9000"));
        assert!(matches!(
            &server,
            Server::S3 { endpoint: Some(e), .. } if e == "http://127.0.0.1:9000"
        ));
        let e = server.refuse_on_s3("sync-now").unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Usage);
        assert_eq!(e.to_string(), "sync-now: not with an S3 store yet");
        // An endpoint is for an S3 store only; a bad location is a usage error.
        let ws = Server::parse(Some("ws://127.0.0.1:4000"))
            .unwrap()
            .with_s3_endpoint(Some("http://127.0.0.1:9000"));
        assert_eq!(ws.url(), "ws://127.0.0.1:4000");
        assert!(ws.refuse_on_s3("sync-now").is_ok());
        let bad = Server::parse(Some("s3://B")).unwrap_err();
        assert_eq!(bad.kind(), crate::ErrorKind::Usage, "{bad}");
    }
}
