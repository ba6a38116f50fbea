//! The metadata in `server.db`, the SQLite file in the data directory: the home every
//! server had before `--meta`, unchanged (same tables, same columns, the same two
//! columns added to an older file at open).
//!
//! Invariants: `server.db` and its `-wal` and `-shm` files are readable by their owner
//! only (0600): created so, and tightened when an older server left them wider.
//! - Connections (WAL, a 10 s busy timeout) are kept open between calls, a few at most,
//!   each back in the pool only outside a transaction. Closing the last connection of
//!   a WAL database checkpoints it and deletes the WAL: with a connection per call that
//!   was a checkpoint and three more fsyncs after every write (a push to a new replica
//!   made two of them, registering the replica and minting its keys; see
//!   docs/performance.md, "the fsyncs around a push to a new replica"). Kept open, a
//!   write costs the one fsync of its commit, and SQLite checkpoints by itself every
//!   1,000 pages.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

use super::{MetaStore, NewKey, StoredKey};
use crate::protocol::control::KeyInfo;
use crate::{Error, Result};

/// Columns added after the first release; added to an older `server.db` at open.
const ADDED_COLUMNS: [(&str, &str); 2] = [("last_used_at", "INTEGER"), ("revoked_at", "INTEGER")];

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS keys(
        id TEXT PRIMARY KEY,
        secret_hash BLOB NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('admin', 'push', 'pull')),
        replica TEXT,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS replicas(
        path TEXT PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE IF NOT EXISTS server(
        one INTEGER PRIMARY KEY CHECK (one = 1),
        id TEXT NOT NULL
    );
";

/// The file's name in the data directory.
pub const FILE: &str = "server.db";

/// Creates `server.db` in `data_dir` owner-only if it does not exist (and tightens it
/// and its `-wal` and `-shm` files if they are wider), without a table: for what
/// stays in it whatever holds the keys (the drill results).
pub fn create_private(data_dir: &Path) -> Result<()> {
    SqliteMeta::at(data_dir).tighten()
}

/// How many idle connections are kept: enough for the calls of a few sessions at
/// once; more are opened when needed and closed after their call.
const KEPT: usize = 4;

/// `server.db` of one data directory.
#[derive(Debug, Clone)]
pub struct SqliteMeta {
    path: PathBuf,
    /// Idle connections, ready for the next call.
    idle: Arc<Mutex<Vec<Connection>>>,
}

/// A connection lent for one call: back to the pool when dropped, unless the call left
/// a transaction open (an error half-way), then closed, which rolls it back.
struct Lent<'a> {
    conn: Option<Connection>,
    idle: &'a Mutex<Vec<Connection>>,
}

impl std::ops::Deref for Lent<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        self.conn
            .as_ref()
            .expect("a lent connection is only taken by drop")
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if !conn.is_autocommit() {
            return;
        }
        // A poisoned lock only means a call panicked while holding it; the list of
        // idle connections is still sound.
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < KEPT {
            idle.push(conn);
        }
    }
}

impl SqliteMeta {
    /// Opens (creating) `server.db` in `data_dir`, owner-only (0600).
    pub fn open(data_dir: &Path) -> Result<SqliteMeta> {
        std::fs::create_dir_all(data_dir).map_err(|e| Error::io(data_dir, e))?;
        let meta = SqliteMeta::at(data_dir);
        meta.tighten()?;
        meta.migrate()?;
        // SQLite gives `-wal` and `-shm` the main file's mode; ones an older server
        // made are tightened too.
        meta.tighten()?;
        Ok(meta)
    }

    /// Creates the tables, and adds to an older file the columns it lacks.
    fn migrate(&self) -> Result<()> {
        let conn = self.conn()?;
        let sql = self.sql();
        conn.execute_batch(SCHEMA).map_err(&sql)?;
        let mut have = Vec::new();
        {
            let mut stmt = conn
                .prepare("SELECT name FROM pragma_table_info('keys')")
                .map_err(&sql)?;
            let names = stmt
                .query_map([], |r| r.get::<_, String>(0))
                .map_err(&sql)?;
            for name in names {
                have.push(name.map_err(&sql)?);
            }
        }
        for (column, ty) in ADDED_COLUMNS {
            if !have.iter().any(|h| h == column) {
                conn.execute_batch(&format!("ALTER TABLE keys ADD COLUMN {column} {ty}"))
                    .map_err(&sql)?;
            }
        }
        Ok(())
    }

    fn at(data_dir: &Path) -> SqliteMeta {
        SqliteMeta {
            path: data_dir.join(FILE),
            idle: Arc::default(),
        }
    }

    /// Creates `server.db` owner-only if it does not exist (SQLite would make it 0644),
    /// and makes it and its `-wal` and `-shm` files 0600 if they are wider.
    fn tighten(&self) -> Result<()> {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&self.path)
            .map_err(|e| Error::io(&self.path, e))?;
        for suffix in ["", "-wal", "-shm"] {
            let mut name = self.path.clone().into_os_string();
            name.push(suffix);
            let path = PathBuf::from(name);
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if meta.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| Error::io(&path, e))?;
            }
        }
        Ok(())
    }

    /// A connection for one call: an idle one, or a new one.
    fn conn(&self) -> Result<Lent<'_>> {
        let kept = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match kept {
            Some(conn) => conn,
            None => {
                let conn =
                    Connection::open(&self.path).map_err(|e| Error::sqlite(&self.path, e))?;
                conn.busy_timeout(Duration::from_secs(10))
                    .map_err(|e| Error::sqlite(&self.path, e))?;
                conn.pragma_update(None, "journal_mode", "WAL")
                    .map_err(|e| Error::sqlite(&self.path, e))?;
                conn
            }
        };
        Ok(Lent {
            conn: Some(conn),
            idle: &self.idle,
        })
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> Error + '_ {
        |e| Error::sqlite(&self.path, e)
    }
}

impl MetaStore for SqliteMeta {
    fn describe(&self) -> String {
        format!("{}", self.path.display())
    }

    fn server_id(&self, candidate: &str) -> Result<String> {
        let conn = self.conn()?;
        // `OR IGNORE`: the first writer's id stays; a second server opening the same
        // directory at the same moment reads it back.
        conn.execute(
            "INSERT OR IGNORE INTO server(one, id) VALUES (1, ?1)",
            [candidate],
        )
        .map_err(self.sql())?;
        conn.query_row("SELECT id FROM server WHERE one = 1", [], |r| r.get(0))
            .map_err(self.sql())
    }

    fn insert_admin_if_none(&self, key: &NewKey) -> Result<bool> {
        let conn = self.conn()?;
        let stored = conn
            .execute(
                "INSERT INTO keys(id, secret_hash, kind, replica, created_at)
                 SELECT ?1, ?2, 'admin', NULL, ?3
                 WHERE NOT EXISTS (SELECT 1 FROM keys WHERE kind = 'admin')",
                params![key.id, &key.secret_hash[..], key.created_at],
            )
            .map_err(self.sql())?;
        Ok(stored == 1)
    }

    fn insert_key(&self, key: &NewKey) -> Result<()> {
        self.conn()?
            .execute(
                "INSERT INTO keys(id, secret_hash, kind, replica, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![key.id, &key.secret_hash[..], key.kind, key.replica, key.created_at],
            )
            .map_err(self.sql())?;
        Ok(())
    }

    fn key(&self, id: &str) -> Result<Option<StoredKey>> {
        self.conn()?
            .query_row(
                "SELECT secret_hash, kind, replica, last_used_at, revoked_at FROM keys WHERE id = ?1",
                [id],
                |r| {
                    Ok(StoredKey {
                        secret_hash: r.get(0)?,
                        kind: r.get(1)?,
                        replica: r.get(2)?,
                        last_used_at: r.get(3)?,
                        revoked_at: r.get(4)?,
                    })
                },
            )
            .optional()
            .map_err(self.sql())
    }

    fn touch_key(&self, id: &str, at: i64) -> Result<()> {
        self.conn()?
            .execute(
                "UPDATE keys SET last_used_at = ?1 WHERE id = ?2",
                params![at, id],
            )
            .map_err(self.sql())?;
        Ok(())
    }

    fn keys(&self, replica: Option<&str>) -> Result<Vec<KeyInfo>> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare(
                "SELECT id, kind, replica, created_at, last_used_at, revoked_at FROM keys
                 WHERE revoked_at IS NULL AND (?1 IS NULL OR replica = ?1)
                 ORDER BY created_at, rowid",
            )
            .map_err(self.sql())?;
        let rows = stmt.query_map([replica], key_info).map_err(self.sql())?;
        rows.map(|r| r.map_err(self.sql())).collect()
    }

    fn key_info(&self, id: &str) -> Result<Option<KeyInfo>> {
        self.conn()?
            .query_row(
                "SELECT id, kind, replica, created_at, last_used_at, revoked_at FROM keys WHERE id = ?1",
                [id],
                key_info,
            )
            .optional()
            .map_err(self.sql())
    }

    fn revoke_key(&self, id: &str, at: i64) -> Result<()> {
        self.conn()?
            .execute(
                "UPDATE keys SET revoked_at = ?1 WHERE id = ?2 AND revoked_at IS NULL",
                params![at, id],
            )
            .map_err(self.sql())?;
        Ok(())
    }

    fn replica_id(&self, path: &str) -> Result<Option<String>> {
        self.conn()?
            .query_row("SELECT id FROM replicas WHERE path = ?1", [path], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.sql())
    }

    fn register_replica(&self, path: &str, id: &str, at: i64) -> Result<String> {
        let conn = self.conn()?;
        conn.execute(
            "INSERT OR IGNORE INTO replicas(path, id, created_at) VALUES (?1, ?2, ?3)",
            params![path, id, at],
        )
        .map_err(self.sql())?;
        conn.query_row("SELECT id FROM replicas WHERE path = ?1", [path], |r| {
            r.get(0)
        })
        .map_err(self.sql())
    }

    fn replica_paths(&self) -> Result<Vec<String>> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare("SELECT path FROM replicas ORDER BY path")
            .map_err(self.sql())?;
        let paths = stmt
            .query_map([], |r| r.get(0))
            .map_err(self.sql())?
            .collect::<rusqlite::Result<Vec<String>>>()
            .map_err(self.sql())?;
        Ok(paths)
    }
}

fn key_info(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyInfo> {
    Ok(KeyInfo {
        id: r.get(0)?,
        kind: r.get(1)?,
        replica: r.get(2)?,
        created_at: r.get(3)?,
        last_used_at: r.get(4)?,
        revoked_at: r.get(5)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> NewKey {
        NewKey {
            id: id.into(),
            secret_hash: [7; 32],
            kind: "push",
            replica: Some("acme/app.db".into()),
            created_at: 1,
        }
    }

    /// A write leaves the WAL in place (no checkpoint when its call ends), is seen by
    /// another handle at once, and is in the file after every handle is gone.
    #[test]
    fn writes_keep_the_wal_and_last() {
        let dir = tempfile::tempdir().unwrap();
        let meta = SqliteMeta::open(dir.path()).unwrap();
        meta.insert_key(&key("00000000000000aa")).unwrap();
        meta.register_replica("acme/app.db", "r1", 1).unwrap();
        let wal = dir.path().join("server.db-wal");
        assert!(
            wal.exists(),
            "the WAL was checkpointed and deleted after a call"
        );
        let other = SqliteMeta::open(dir.path()).unwrap();
        assert_eq!(
            other.key("00000000000000aa").unwrap().map(|k| k.kind),
            Some("push".to_string())
        );
        drop(meta);
        drop(other);
        assert!(!wal.exists(), "the last close checkpoints the WAL");
        let again = SqliteMeta::open(dir.path()).unwrap();
        assert_eq!(
            again.replica_id("acme/app.db").unwrap().as_deref(),
            Some("r1")
        );
        assert_eq!(again.keys(None).unwrap().len(), 1);
    }

    /// A connection left inside a transaction is closed (rolled back), not lent again.
    #[test]
    fn a_connection_inside_a_transaction_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let meta = SqliteMeta::open(dir.path()).unwrap();
        {
            let conn = meta.conn().unwrap();
            conn.execute_batch(
                "BEGIN; INSERT INTO replicas(path, id, created_at) VALUES ('x', 'y', 1);",
            )
            .unwrap();
        }
        assert_eq!(meta.replica_id("x").unwrap(), None, "rolled back");
        let conn = meta.conn().unwrap();
        assert!(conn.is_autocommit());
    }
}
