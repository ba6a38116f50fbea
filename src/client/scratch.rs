//! Versions pulled into scratch files, for `diff` and `versions --changes`: a
//! temporary directory that is removed when the [`Scratch`] is dropped (at the end, on
//! an error, and when a stop drops the command's future); nothing is recorded in the
//! local history or the sync log, and no database the user named is written.
//!
//! A pull into a scratch file is a delta when a base is given: the base (a local file,
//! or another scratch file) is first copied there through the engine (a consistent
//! snapshot of it, local I/O only), and the pull then brings only the pages that
//! differ.

use std::path::{Path, PathBuf};

use crate::crypt::Keys;
use crate::remote::{Server, blocking, no_progress};
use crate::store::{ReplicaPath, Selector};
use crate::{Error, Result};

use super::Connection;

/// A temporary directory for scratch databases, removed on drop.
#[derive(Debug)]
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    /// A new, empty directory in the system's temporary directory (`$TMPDIR`), that
    /// only its owner may enter (0700): the versions pulled into it are plaintext, an
    /// encrypted replica's too, and a process killed with SIGKILL leaves them there.
    pub fn new() -> Result<Scratch> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::Builder::new()
            .prefix("sqlferry-rows-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir()
            .map_err(|e| Error::io(&std::env::temp_dir(), e))?;
        Ok(Scratch { dir })
    }

    /// The path of the scratch file `name` (not created).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// An empty SQLite database named `name`: the "before" of a replica's first
    /// version.
    pub async fn empty(&self, name: &str) -> Result<PathBuf> {
        let path = self.path(name);
        let p = path.clone();
        blocking(move || {
            rusqlite::Connection::open(&p)
                .and_then(|c| c.execute_batch("PRAGMA user_version = 0"))
                .map_err(|e| Error::sqlite(&p, e))
        })
        .await?;
        Ok(path)
    }
}

/// A replica and how to reach it, resolved once for several pulls.
#[derive(Debug, Clone)]
pub struct ReplicaSource {
    /// Where it lives.
    pub server: Server,
    /// The replica.
    pub replica: ReplicaPath,
    /// The key (none for the embedded store).
    pub key: Option<String>,
    /// The encryption keys of an encrypted replica: each version is opened with the one
    /// whose id it names (none: a plaintext replica; an encrypted one is refused, exit
    /// 5).
    pub encryption: Option<Keys>,
}

impl ReplicaSource {
    /// The same replica, its versions opened with `encryption` (an encrypted replica's
    /// keys, as `pull --encryption-key-file` takes them).
    pub fn with_encryption(self, encryption: Option<Keys>) -> ReplicaSource {
        ReplicaSource { encryption, ..self }
    }

    /// `replica` on the store `connection` names (with its key, or one saved for it).
    pub async fn resolve(connection: &Connection, replica: ReplicaPath) -> Result<ReplicaSource> {
        let (server, key) = connection.resolve_with_key(&replica).await?;
        Ok(ReplicaSource {
            server,
            replica,
            key,
            encryption: None,
        })
    }

    /// The replica the local database `file` follows: the one of its last push or pull
    /// (the local history), else the one its sidecar (`<file>-sqlferry`) names. A
    /// `--key` in `connection` wins over a saved key or the sidecar's.
    pub async fn followed_by(connection: &Connection, file: &Path) -> Result<ReplicaSource> {
        let database = crate::config::database_key(file);
        let (db, sidecar) = (database.clone(), crate::config::Sidecar::path_for(file));
        let (last, sidecar) = blocking(move || {
            let sidecar = match sidecar.exists() {
                true => Some(crate::config::Sidecar::load(&sidecar)?),
                false => None,
            };
            Ok((crate::history::last(&db), sidecar))
        })
        .await?;
        let (url, replica, sidecar_key) = match (last, sidecar) {
            (Some(last), _) => (last.server, last.replica, None),
            (None, Some(s)) => (s.server, s.replica, Some(s.key)),
            (None, None) => {
                return Err(Error::Usage(format!(
                    "{} was never pushed or pulled on this machine and has no sidecar: `-` \
                     cannot tell which replica it follows; name it (namespace/name[@VERSION])",
                    file.display()
                )));
            }
        };
        let server = Server::parse(Some(&url))?;
        let replica = ReplicaPath::parse(&replica)?;
        let key = match (&connection.key, sidecar_key) {
            (Some(k), _) => Some(k.clone()),
            (None, Some(k)) => Some(k),
            (None, None) => {
                connection
                    .key_for(&server, &replica, Some(&database))
                    .await?
            }
        };
        Ok(ReplicaSource {
            server,
            replica,
            key,
            encryption: None,
        })
    }

    /// Pulls the version `selector` names into the scratch file `dest`, first copying
    /// `base` there (when given and `dest` does not exist yet) so the pull is a delta.
    /// Returns the version's number.
    pub async fn pull_into_scratch(
        &self,
        selector: Selector,
        dest: &Path,
        base: Option<&Path>,
    ) -> Result<u64> {
        if let Some(base) = base
            && !dest.exists()
        {
            super::push::copy_quietly(base, dest).await?;
        }
        let outcome = self
            .server
            .pull(
                &self.replica,
                selector,
                dest,
                (self.key.as_deref(), self.encryption.as_ref()),
                no_progress(),
            )
            .await
            .map_err(|e| e.context(format!("pull {}@{selector} failed", self.replica)))?;
        Ok(outcome.version)
    }
}
