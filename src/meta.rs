//! The server-wide metadata: keys (their hashes), replica ids and the server's id,
//! behind one interface ([`MetaStore`]) with two homes:
//!
//! - `sqlite`: `server.db` in the data directory, as every server before `--meta` kept
//!   it (same file, same tables, same columns); the default, for one server per data
//!   directory.
//! - `postgres`: a PostgreSQL database (`serve --meta postgres://…`), shared by
//!   several servers in front of one store, with numbered migrations run at start
//!   (`sqlferry_migrations`) and the notifications servers send each other
//!   (`LISTEN`/`NOTIFY` on [`postgres::CHANNEL`]): a new version, a sync-now and its
//!   answers.
//!
//! What this layer knows is rows: it never mints, hashes or checks a key (the
//! server's `auth` module does, the same way over either home) and never sees a
//! secret, only its SHA-256.
//!
//! Invariants:
//! - Every method of [`MetaStore`] blocks: call it from a blocking thread (the server's
//!   `blocking`), never from an async task. The PostgreSQL home runs its queries as
//!   tasks of the runtime it was opened on and waits for their answers.
//! - A failure of the metadata's own home is [`Error::Server`] (a SQLite file's own
//!   error for `server.db`), saying which home and what to do; never a refused key.
//! - A connection string's password is never logged or put in an error: homes are
//!   named by [`MetaStore::describe`] (host, port and database only).

pub mod postgres;
pub mod sqlite;

use std::fmt::Debug;
use std::sync::Arc;

use crate::protocol::control::KeyInfo;
use crate::{Error, Result};

/// A key as it is stored: never its secret, only the secret's SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    /// The key's id (16 lowercase hex digits).
    pub id: String,
    /// SHA-256 of the key's secret part.
    pub secret_hash: [u8; 32],
    /// `admin`, `push` or `pull`.
    pub kind: &'static str,
    /// The replica a push or pull key is for.
    pub replica: Option<String>,
    /// When it was minted (Unix seconds).
    pub created_at: i64,
}

/// What checking a presented key needs of its stored row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    /// SHA-256 of the key's secret part.
    pub secret_hash: Vec<u8>,
    /// `admin`, `push` or `pull`.
    pub kind: String,
    /// The replica a push or pull key is for.
    pub replica: Option<String>,
    /// When it was last used (Unix seconds, to the minute).
    pub last_used_at: Option<i64>,
    /// When it was revoked (Unix seconds).
    pub revoked_at: Option<i64>,
}

/// The server-wide metadata's operations. Every method blocks (see the module's
/// invariants).
pub trait MetaStore: Send + Sync + Debug {
    /// Where the metadata lives, for messages: `server.db` with its path, or
    /// `PostgreSQL at HOST:PORT/DB` (never a password).
    fn describe(&self) -> String;

    /// The server's id: `candidate` stored if there is none yet, else the one stored
    /// (the first writer's id stays).
    fn server_id(&self, candidate: &str) -> Result<String>;

    /// Stores `key` as the admin key if there is no admin key yet; whether it was
    /// stored. Of two servers starting at once on one metadata store, one stores its
    /// key and the other learns that there is one.
    fn insert_admin_if_none(&self, key: &NewKey) -> Result<bool>;

    /// Stores a push or pull key.
    fn insert_key(&self, key: &NewKey) -> Result<()>;

    /// The stored row of key `id`, if any.
    fn key(&self, id: &str) -> Result<Option<StoredKey>>;

    /// Records that key `id` was used at `at` (Unix seconds).
    fn touch_key(&self, id: &str, at: i64) -> Result<()>;

    /// The keys not revoked, oldest first; only those of `replica` when given.
    fn keys(&self, replica: Option<&str>) -> Result<Vec<KeyInfo>>;

    /// Key `id` as listed, revoked or not; `None` when there is no such key.
    fn key_info(&self, id: &str) -> Result<Option<KeyInfo>>;

    /// Marks key `id` revoked at `at` unless it is already.
    fn revoke_key(&self, id: &str, at: i64) -> Result<()>;

    /// The id of the replica at `path`, if it is registered.
    fn replica_id(&self, path: &str) -> Result<Option<String>>;

    /// Registers `path` with `id` unless it is registered already; the id it has now
    /// (the first writer's).
    fn register_replica(&self, path: &str, id: &str, at: i64) -> Result<String>;

    /// The paths of every registered replica, in path order: the server's own record
    /// of the replicas pushed through it (or, shared, through any server of its
    /// PostgreSQL), what lists the replicas of a store that is not a directory.
    fn replica_paths(&self) -> Result<Vec<String>>;
}

/// A shared handle on the metadata's home.
#[derive(Debug, Clone)]
pub struct Meta(Arc<dyn MetaStore>);

impl Meta {
    /// The metadata in `server.db` of `data_dir` (created owner-only if missing).
    pub fn sqlite(data_dir: &std::path::Path) -> Result<Meta> {
        Ok(Meta(Arc::new(sqlite::SqliteMeta::open(data_dir)?)))
    }

    /// The metadata in a PostgreSQL database, migrated to this build's schema.
    pub fn postgres(pg: postgres::PgMeta) -> Meta {
        Meta(Arc::new(pg))
    }

    /// The operations.
    pub fn store(&self) -> &dyn MetaStore {
        &*self.0
    }
}

/// Where `serve --meta` puts the metadata.
#[derive(Clone, PartialEq, Eq)]
pub enum MetaUrl {
    /// `server.db` in the data directory (no `--meta`).
    Sqlite,
    /// A PostgreSQL connection string (`postgres://USER[:PASSWORD]@HOST[:PORT]/DB`).
    Postgres(String),
}

impl Debug for MetaUrl {
    // Never the password: only what `describe` would say.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetaUrl::Sqlite => f.write_str("Sqlite"),
            MetaUrl::Postgres(url) => write!(f, "Postgres({})", postgres::describe_url(url)),
        }
    }
}

impl MetaUrl {
    /// Parses `--meta`: a `postgres://` or `postgresql://` URL; anything else is a
    /// usage error saying what is accepted.
    pub fn parse(s: &str) -> Result<MetaUrl> {
        let lower = s.to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            postgres::parse_config(s)?;
            return Ok(MetaUrl::Postgres(s.to_owned()));
        }
        Err(Error::Usage(
            "--meta takes a PostgreSQL URL, like postgres://sqlferry@127.0.0.1:5432/sqlferry \
             (without --meta the metadata stays in DATA/server.db)"
                .into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_urls_are_postgres_only_and_never_show_a_password() {
        let url = MetaUrl::parse("postgres://app:s3cret@127.0.0.1:5433/meta").expect("valid");
        let shown = format!("{url:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("127.0.0.1:5433/meta"), "{shown}");
        assert!(MetaUrl::parse("postgresql://127.0.0.1/meta").is_ok());
        let e = MetaUrl::parse("mysql://127.0.0.1/meta").expect_err("not PostgreSQL");
        assert_eq!(e.kind(), crate::ErrorKind::Usage);
        assert!(e.to_string().contains("postgres://"), "{e}");
    }
}
