//! The metadata in `server.db`, the SQLite file in the data directory: the home every
//! server had before `--meta`, unchanged (same tables, same columns, the same two
//! columns added to an older file at open).
//!
//! Invariants: `server.db` and its `-wal` and `-shm` files are readable by their owner
//! only (0600): created so, and tightened when an older server left them wider. A
//! connection is opened per call (WAL, a 10 s busy timeout) and never held across
//! calls.

use std::path::{Path, PathBuf};
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
    SqliteMeta {
        path: data_dir.join(FILE),
    }
    .tighten()
}

/// `server.db` of one data directory.
#[derive(Debug, Clone)]
pub struct SqliteMeta {
    path: PathBuf,
}

impl SqliteMeta {
    /// Opens (creating) `server.db` in `data_dir`, owner-only (0600).
    pub fn open(data_dir: &Path) -> Result<SqliteMeta> {
        std::fs::create_dir_all(data_dir).map_err(|e| Error::io(data_dir, e))?;
        let meta = SqliteMeta {
            path: data_dir.join(FILE),
        };
        meta.tighten()?;
        let conn = meta.conn()?;
        let sql = |e| Error::sqlite(&meta.path, e);
        conn.execute_batch(SCHEMA).map_err(sql)?;
        let mut have = Vec::new();
        {
            let mut stmt = conn
                .prepare("SELECT name FROM pragma_table_info('keys')")
                .map_err(sql)?;
            let names = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(sql)?;
            for name in names {
                have.push(name.map_err(sql)?);
            }
        }
        for (column, ty) in ADDED_COLUMNS {
            if !have.iter().any(|h| h == column) {
                conn.execute_batch(&format!("ALTER TABLE keys ADD COLUMN {column} {ty}"))
                    .map_err(sql)?;
            }
        }
        // SQLite gives `-wal` and `-shm` the main file's mode; ones an older server
        // made are tightened too.
        meta.tighten()?;
        Ok(meta)
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

    fn conn(&self) -> Result<Connection> {
        let conn = Connection::open(&self.path).map_err(|e| Error::sqlite(&self.path, e))?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(|e| Error::sqlite(&self.path, e))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| Error::sqlite(&self.path, e))?;
        Ok(conn)
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
