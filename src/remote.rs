//! Where a replica lives, behind one interface for push, pull and versions.
//!
//! Today that is the embedded store: a directory on this machine (the XDG data dir by
//! default, or `file:///path`), used in-process over the same engine and in-memory link
//! a local push uses. A `sqlferry serve` server over WebSocket plugs in here next.

use std::path::{Path, PathBuf};

use crate::engine::{Progress, SyncStats, sync_local};
use crate::page::{Snapshot, Writer};
use crate::store::{PushOptions, ReplicaPath, Selector, Store, VersionInfo};
use crate::{Error, Result};

/// A server: where replicas live.
#[derive(Debug, Clone)]
pub enum Server {
    /// The embedded store in a local directory.
    Embedded(Store),
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct PushOutcome {
    /// The engine's figures.
    pub stats: SyncStats,
    /// The replica's latest version after the push.
    pub version: VersionInfo,
    /// Whether this push made that version (`false`: nothing had changed).
    pub created: bool,
}

/// What a pull did.
#[derive(Debug, Clone)]
pub struct PullOutcome {
    /// The engine's figures.
    pub stats: SyncStats,
    /// The version the local file now holds.
    pub version: VersionInfo,
}

impl Server {
    /// The server named by `url` (`file:///path`), or the embedded store in the XDG
    /// data directory when `url` is `None`.
    pub fn parse(url: Option<&str>) -> Result<Server> {
        match url {
            None => {
                let dir = crate::config::data_dir().ok_or_else(|| {
                    Error::Usage(
                        "no store: set HOME, XDG_DATA_HOME or --server file:///path".into(),
                    )
                })?;
                Ok(Server::Embedded(Store::new(dir)))
            }
            Some(url) => {
                if let Some(path) = url.strip_prefix("file://") {
                    if !path.starts_with('/') {
                        return Err(Error::Usage(format!(
                            "--server {url}: a file:// server needs an absolute path, like file:///var/lib/sqlferry"
                        )));
                    }
                    Ok(Server::Embedded(Store::new(PathBuf::from(path))))
                } else if url.starts_with("ws://") || url.starts_with("wss://") {
                    Err(Error::Usage(format!(
                        "--server {url}: sqlferry servers are not supported by this build yet; use file:///path"
                    )))
                } else {
                    Err(Error::Usage(format!(
                        "--server {url}: expected file:///path, ws://host:port or wss://host:port"
                    )))
                }
            }
        }
    }

    /// The server as a URL, for messages and records.
    pub fn url(&self) -> String {
        match self {
            Server::Embedded(store) => format!("file://{}", store.root().display()),
        }
    }

    /// Every version of `replica`, oldest first.
    pub fn versions(&self, replica: &ReplicaPath) -> Result<Vec<VersionInfo>> {
        match self {
            Server::Embedded(store) => store.versions(replica),
        }
    }

    /// Pushes the database at `local` as a new version of `replica`.
    pub fn push(
        &self,
        local: &Path,
        replica: &ReplicaPath,
        options: PushOptions,
        progress: &dyn Progress,
    ) -> Result<PushOutcome> {
        match self {
            Server::Embedded(store) => {
                let mut source = Snapshot::open(local)?;
                let mut target = store.push(replica, options)?;
                let stats = sync_local(&mut source, &mut target, progress)?;
                let (version, created) = target
                    .outcome()
                    .map(|(v, made)| (v.clone(), made))
                    .expect("a successful sync leaves an outcome");
                Ok(PushOutcome {
                    stats,
                    version,
                    created,
                })
            }
        }
    }

    /// Pulls one version of `replica` into the database at `local`, atomically.
    pub fn pull(
        &self,
        replica: &ReplicaPath,
        selector: Selector,
        local: &Path,
        progress: &dyn Progress,
    ) -> Result<PullOutcome> {
        match self {
            Server::Embedded(store) => {
                let mut source = store.read(replica, selector)?;
                let version = source.info().clone();
                let mut target = Writer::open(local)?;
                let stats = sync_local(&mut source, &mut target, progress)?;
                Ok(PullOutcome { stats, version })
            }
        }
    }
}
