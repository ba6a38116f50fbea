//! Keys: minted at random, shown once, stored only as a SHA-256 hash, compared in
//! constant time. The server-wide SQLite file `server.db` in the data directory holds
//! the keys and the replicas' ids.
//!
//! A key reads `sfk_` + 16 hex digits of id + 48 hex digits of secret. The id finds the
//! stored hash; the secret is what is hashed and compared. Kinds:
//! - admin: creates replicas (on first push), pushes and pulls anything;
//! - push: pushes and pulls one replica;
//! - pull: pulls one replica.
//!
//! Invariant: no function here logs or returns a secret except [`Auth::ensure_admin`]
//! and [`Auth::mint_replica_keys`], whose whole purpose is to hand a new key out once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest as _, Sha256};

use crate::protocol::control::{NewKeys, Op};
use crate::store::ReplicaPath;
use crate::{Error, Result};

const KEY_PREFIX: &str = "sfk_";
const ID_HEX: usize = 16;
const SECRET_HEX: usize = 48;

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
";

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// Everything.
    Admin,
    /// Push and pull one replica.
    Push,
    /// Pull one replica.
    Pull,
}

impl KeyKind {
    /// The kind's name, as stored and as sent in CONFIG.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::Admin => "admin",
            KeyKind::Push => "push",
            KeyKind::Pull => "pull",
        }
    }

    fn parse(s: &str) -> Option<KeyKind> {
        Some(match s {
            "admin" => KeyKind::Admin,
            "push" => KeyKind::Push,
            "pull" => KeyKind::Pull,
            _ => return None,
        })
    }
}

/// Who a session is: the key it presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's id (not secret; recorded with versions).
    pub key_id: String,
    /// What it may do.
    pub kind: KeyKind,
    /// The one replica a push or pull key is for.
    pub replica: Option<String>,
}

impl Principal {
    /// Whether this key may do `op` on `replica`; the refusal says why not.
    pub fn authorize(&self, op: Op, replica: &ReplicaPath) -> Result<()> {
        match (self.kind, &self.replica) {
            (KeyKind::Admin, _) => Ok(()),
            (_, Some(own)) if own != replica.as_str() => Err(Error::Auth(format!(
                "this {} key is for replica {own}, not {replica}",
                self.kind.as_str()
            ))),
            (KeyKind::Pull, _) if op == Op::Push => Err(Error::Auth(format!(
                "this is a PULL key: it may pull {replica} but not push to it"
            ))),
            (KeyKind::Pull, _) if op == Op::SyncNow => Err(Error::Auth(format!(
                "this is a PULL key: it may pull {replica} but not ask its subscribers to sync now"
            ))),
            _ => Ok(()),
        }
    }
}

/// The server's key and replica registry.
#[derive(Debug, Clone)]
pub struct Auth {
    path: PathBuf,
}

fn now() -> i64 {
    crate::history::now()
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| Error::Io {
        path: PathBuf::from("/dev/urandom"),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn secret_hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Compares two hashes in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Splits a presented key into (id, secret) if it has the right shape.
fn split_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    if rest.len() != ID_HEX + SECRET_HEX || !rest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(rest.split_at(ID_HEX))
}

impl Auth {
    /// Opens (creating) `server.db` in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Auth> {
        std::fs::create_dir_all(data_dir).map_err(|e| Error::io(data_dir, e))?;
        let auth = Auth {
            path: data_dir.join("server.db"),
        };
        auth.conn()?
            .execute_batch(SCHEMA)
            .map_err(|e| Error::sqlite(&auth.path, e))?;
        Ok(auth)
    }

    fn conn(&self) -> Result<Connection> {
        let conn = Connection::open(&self.path).map_err(|e| Error::sqlite(&self.path, e))?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(|e| Error::sqlite(&self.path, e))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| Error::sqlite(&self.path, e))?;
        Ok(conn)
    }

    fn insert_key(
        &self,
        conn: &Connection,
        kind: KeyKind,
        replica: Option<&str>,
    ) -> Result<String> {
        let id = random_hex(ID_HEX / 2)?;
        let secret = random_hex(SECRET_HEX / 2)?;
        conn.execute(
            "INSERT INTO keys(id, secret_hash, kind, replica, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, &secret_hash(&secret)[..], kind.as_str(), replica, now()],
        )
        .map_err(|e| Error::sqlite(&self.path, e))?;
        Ok(format!("{KEY_PREFIX}{id}{secret}"))
    }

    /// Creates the admin key if there is none, and returns it (the only time it is
    /// ever seen); `None` when one exists already.
    pub fn ensure_admin(&self) -> Result<Option<String>> {
        let conn = self.conn()?;
        let exists: bool = conn
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM keys WHERE kind = 'admin')",
                [],
                |r| r.get(0),
            )
            .map_err(|e| Error::sqlite(&self.path, e))?;
        if exists {
            return Ok(None);
        }
        self.insert_key(&conn, KeyKind::Admin, None).map(Some)
    }

    /// Who presented `key`; `None` when it is not a key of this server.
    pub fn check(&self, key: &str) -> Result<Option<Principal>> {
        let Some((id, secret)) = split_key(key) else {
            return Ok(None);
        };
        let row: Option<(Vec<u8>, String, Option<String>)> = self
            .conn()?
            .query_row(
                "SELECT secret_hash, kind, replica FROM keys WHERE id = ?1",
                [id.to_ascii_lowercase()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(|e| Error::sqlite(&self.path, e))?;
        let presented = secret_hash(&secret.to_ascii_lowercase());
        Ok(match row {
            Some((stored, kind, replica)) if constant_time_eq(&stored, &presented) => {
                KeyKind::parse(&kind).map(|kind| Principal {
                    key_id: id.to_ascii_lowercase(),
                    kind,
                    replica,
                })
            }
            _ => None,
        })
    }

    /// The id of `replica`, registering it when `create` is set.
    pub fn replica_id(&self, replica: &ReplicaPath, create: bool) -> Result<Option<String>> {
        let conn = self.conn()?;
        let id: Option<String> = conn
            .query_row(
                "SELECT id FROM replicas WHERE path = ?1",
                [replica.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| Error::sqlite(&self.path, e))?;
        if id.is_some() || !create {
            return Ok(id);
        }
        let id = random_hex(8)?;
        conn.execute(
            "INSERT OR IGNORE INTO replicas(path, id, created_at) VALUES (?1, ?2, ?3)",
            params![replica.as_str(), id, now()],
        )
        .map_err(|e| Error::sqlite(&self.path, e))?;
        conn.query_row(
            "SELECT id FROM replicas WHERE path = ?1",
            [replica.as_str()],
            |r| r.get(0),
        )
        .map(Some)
        .map_err(|e| Error::sqlite(&self.path, e))
    }

    /// Mints a PUSH and a PULL key for `replica` and returns them (shown once).
    pub fn mint_replica_keys(&self, replica: &ReplicaPath) -> Result<NewKeys> {
        let conn = self.conn()?;
        Ok(NewKeys {
            push: self.insert_key(&conn, KeyKind::Push, Some(replica.as_str()))?,
            pull: self.insert_key(&conn, KeyKind::Pull, Some(replica.as_str()))?,
        })
    }
}

/// A key with its secret replaced by `…`, for dry runs and logs.
pub fn mask(key: &str) -> String {
    match split_key(key) {
        Some((id, _)) => format!("{KEY_PREFIX}{id}…"),
        None => "…".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_check_and_authorize() {
        let dir = tempfile::tempdir().expect("temp dir");
        let auth = Auth::open(dir.path()).expect("opens");
        let admin = auth.ensure_admin().expect("creates").expect("first time");
        assert!(auth.ensure_admin().expect("checks").is_none(), "only once");
        let p = auth.check(&admin).expect("checks").expect("valid");
        assert_eq!(p.kind, KeyKind::Admin);

        let app = ReplicaPath::parse("acme/app.db").expect("valid");
        let other = ReplicaPath::parse("acme/other.db").expect("valid");
        let keys = auth.mint_replica_keys(&app).expect("mints");
        let push = auth.check(&keys.push).expect("checks").expect("valid");
        let pull = auth.check(&keys.pull).expect("checks").expect("valid");
        assert!(push.authorize(Op::Push, &app).is_ok());
        assert!(pull.authorize(Op::Pull, &app).is_ok());
        let e = pull
            .authorize(Op::Push, &app)
            .expect_err("pull key cannot push")
            .to_string();
        assert!(e.contains("PULL key"), "{e}");
        let e = push
            .authorize(Op::Pull, &other)
            .expect_err("other replica")
            .to_string();
        assert!(
            e.contains("for replica acme/app.db, not acme/other.db"),
            "{e}"
        );

        // A wrong secret with a real id, a malformed key, an unknown id.
        let mut wrong = keys.push.clone();
        let last = wrong.pop().expect("non-empty");
        wrong.push(if last == '0' { '1' } else { '0' });
        assert!(auth.check(&wrong).expect("checks").is_none());
        assert!(auth.check("sfk_nope").expect("checks").is_none());
        assert!(
            auth.check(&format!("sfk_{}", "0".repeat(64)))
                .expect("checks")
                .is_none()
        );
        assert_eq!(mask(&keys.pull), format!("sfk_{}…", &keys.pull[4..20]));
        assert!(!mask(&keys.pull).contains(&keys.pull[20..]));
    }

    #[test]
    fn comparison_is_exact() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
