//! Keys: minted at random, shown once, stored only as a SHA-256 hash, compared in
//! constant time. The server-wide metadata holds the keys' hashes, the replicas' ids
//! and the server's own id ([`Auth::server_id`]): `server.db` in the data directory, or
//! a PostgreSQL database shared by several servers (`serve --meta`; [`crate::meta`]).
//! Keys are made and checked here the same way over either.
//!
//! A key reads `sfk_` + 16 hex digits of id + 48 hex digits of secret. The id finds the
//! stored hash; the secret is what is hashed and compared. Kinds:
//! - admin: creates replicas (on first push), pushes and pulls anything;
//! - push: pushes and pulls one replica;
//! - pull: pulls one replica.
//!
//! Keys can be listed ([`Auth::list`]: ids, kinds, replicas, times; never a secret) and
//! revoked ([`Auth::revoke`]): a revoked key stays in the table, marked, so that using
//! it is refused with "revoked" rather than "unknown". The admin key cannot be revoked
//! (there is no other way in). When a key was last used is kept to the minute: a key
//! checked again within [`LAST_USED_GRANULARITY_SECS`] writes nothing, and a failed
//! write of it (a full disk) never refuses the key.
//!
//! Invariants: no function here logs or returns a secret except [`Auth::ensure_admin`]
//! and [`Auth::mint_replica_keys`], whose whole purpose is to hand a new key out once.
//! Every method blocks (the metadata's rules): call them on a blocking thread.

use std::path::{Path, PathBuf};

use crate::meta::{Meta, NewKey};
use crate::protocol::control::{KeyInfo, NewKeys, Op};
use crate::store::ReplicaPath;
use crate::{Error, Result};

const KEY_PREFIX: &str = "sfk_";
const ID_HEX: usize = 16;
const SECRET_HEX: usize = 48;

/// A key's last use is recorded at most this often: a busy key costs one write a
/// minute, not one per session.
pub const LAST_USED_GRANULARITY_SECS: i64 = 60;

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
    meta: Meta,
}

fn now() -> i64 {
    crate::epoch::now()
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| Error::Io {
        path: PathBuf::from("/dev/urandom"),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(crate::digest::hex(&buf))
}

fn secret_hash(secret: &str) -> [u8; 32] {
    crate::digest::sha256(secret.as_bytes())
}

/// Compares two hashes in time independent of where they differ (`subtle`).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    a.ct_eq(b).into()
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
    /// Opens (creating) `server.db` in `data_dir`, owner-only (0600).
    pub fn open(data_dir: &Path) -> Result<Auth> {
        Ok(Auth::over(Meta::sqlite(data_dir)?))
    }

    /// The keys and replicas kept in `meta`.
    pub fn over(meta: Meta) -> Auth {
        Auth { meta }
    }

    /// The server's id: 32 random hex digits, made the first time this data directory
    /// (or metadata database) is opened and kept from then on, so it survives restarts
    /// and stays with the data when it moves. Servers sharing one metadata database
    /// (`serve --meta`) share one id: to a client they are one server, with one set of
    /// keys. Not a secret (`GET /api/health` tells it to anyone) and not derived from
    /// any key: clients use it to know one server under two URLs
    /// (`ws://localhost:7878` and `ws://127.0.0.1:7878`).
    pub fn server_id(&self) -> Result<String> {
        self.meta.store().server_id(&random_hex(16)?)
    }

    /// Where the keys live, for messages (never a password).
    pub fn describe(&self) -> String {
        self.meta.store().describe()
    }

    /// A new key of `kind`: the key itself (shown once) and its stored row.
    fn new_key(kind: KeyKind, replica: Option<&str>) -> Result<(String, NewKey)> {
        let id = random_hex(ID_HEX / 2)?;
        let secret = random_hex(SECRET_HEX / 2)?;
        let row = NewKey {
            id: id.clone(),
            secret_hash: secret_hash(&secret),
            kind: kind.as_str(),
            replica: replica.map(str::to_owned),
            created_at: now(),
        };
        Ok((format!("{KEY_PREFIX}{id}{secret}"), row))
    }

    /// Creates the admin key if there is none, and returns it (the only time it is
    /// ever seen); `None` when one exists already.
    pub fn ensure_admin(&self) -> Result<Option<String>> {
        let (key, row) = Auth::new_key(KeyKind::Admin, None)?;
        Ok(self.meta.store().insert_admin_if_none(&row)?.then_some(key))
    }

    /// Who presented `key`; `None` when it is not a key of this server. A revoked key
    /// is an [`Error::Auth`] saying so; a failure to read `server.db` is an error of
    /// its own class (never a refusal: the caller tells the client the server failed).
    pub fn check(&self, key: &str) -> Result<Option<Principal>> {
        let Some((id, secret)) = split_key(key) else {
            return Ok(None);
        };
        let id = id.to_ascii_lowercase();
        let row = self.meta.store().key(&id)?;
        let presented = secret_hash(&secret.to_ascii_lowercase());
        let Some(stored) = row else {
            return Ok(None);
        };
        if !constant_time_eq(&stored.secret_hash, &presented) {
            return Ok(None);
        }
        if let Some(at) = stored.revoked_at {
            return Err(Error::Auth(format!(
                "this key (sfk_{id}…) was revoked at {}",
                rfc3339(at)
            )));
        }
        let t = now();
        if stored
            .last_used_at
            .is_none_or(|l| t - l >= LAST_USED_GRANULARITY_SECS)
        {
            // Bookkeeping only: a full disk must not refuse a good key.
            if let Err(e) = self.meta.store().touch_key(&id, t) {
                tracing::debug!(key = %id, error = %e, "could not record the key's last use");
            }
        }
        Ok(KeyKind::parse(&stored.kind).map(|kind| Principal {
            key_id: id,
            kind,
            replica: stored.replica,
        }))
    }

    /// The keys not revoked, oldest first; only those of `replica` when given.
    pub fn list(&self, replica: Option<&ReplicaPath>) -> Result<Vec<KeyInfo>> {
        self.meta.store().keys(replica.map(ReplicaPath::as_str))
    }

    /// Revokes the key with id `id` (of `replica`, when given) and returns it. The
    /// admin key cannot be revoked; an unknown id (or one of another replica) is
    /// [`Error::NotFound`]. Revoking a revoked key again changes nothing.
    pub fn revoke(&self, id: &str, replica: Option<&ReplicaPath>) -> Result<KeyInfo> {
        let id = id.to_ascii_lowercase();
        let found = self.meta.store().key_info(&id)?;
        let mut key = match found {
            Some(k) if replica.is_none_or(|r| k.replica.as_deref() == Some(r.as_str())) => k,
            Some(_) | None => {
                return Err(Error::NotFound(match replica {
                    Some(r) => format!("no key {id} for replica {r} on this server"),
                    None => format!("no key {id} on this server"),
                }));
            }
        };
        if key.kind == KeyKind::Admin.as_str() {
            return Err(Error::Usage(format!(
                "{id} is the admin key: it cannot be revoked (there would be no way in)"
            )));
        }
        if key.revoked_at.is_none() {
            let t = now();
            self.meta.store().revoke_key(&id, t)?;
            key.revoked_at = Some(t);
        }
        Ok(key)
    }

    /// The id of `replica`, registering it when `create` is set.
    pub fn replica_id(&self, replica: &ReplicaPath, create: bool) -> Result<Option<String>> {
        let id = self.meta.store().replica_id(replica.as_str())?;
        if id.is_some() || !create {
            return Ok(id);
        }
        self.meta
            .store()
            .register_replica(replica.as_str(), &random_hex(8)?, now())
            .map(Some)
    }

    /// Every replica registered with this server's metadata (by its first push through
    /// a server sharing it), in path order.
    pub fn replicas(&self) -> Result<Vec<ReplicaPath>> {
        self.meta
            .store()
            .replica_paths()?
            .iter()
            .map(|p| ReplicaPath::parse(p))
            .collect()
    }

    /// Mints a PUSH and a PULL key for `replica` and returns them (shown once).
    pub fn mint_replica_keys(&self, replica: &ReplicaPath) -> Result<NewKeys> {
        let (push, push_row) = Auth::new_key(KeyKind::Push, Some(replica.as_str()))?;
        let (pull, pull_row) = Auth::new_key(KeyKind::Pull, Some(replica.as_str()))?;
        self.meta.store().insert_key(&push_row)?;
        self.meta.store().insert_key(&pull_row)?;
        Ok(NewKeys { push, pull })
    }
}

fn rfc3339(at: i64) -> String {
    crate::epoch::rfc3339(at)
}

/// The id in `arg`: a bare key id (16 hex digits), a masked key (`sfk_<id>…`) or a
/// whole key (whose secret is ignored, never printed); `None` if it is none of these.
pub fn key_id_of(arg: &str) -> Option<String> {
    let id = arg.strip_prefix(KEY_PREFIX).unwrap_or(arg);
    let id = id.get(..ID_HEX)?;
    id.bytes()
        .all(|b| b.is_ascii_hexdigit())
        .then(|| id.to_ascii_lowercase())
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
    fn keys_are_listed_without_secrets_and_revoked() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("temp dir");
        let auth = Auth::open(dir.path()).expect("opens");
        let mode = std::fs::metadata(dir.path().join("server.db"))
            .expect("server.db")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "server.db is owner-only");
        let admin = auth.ensure_admin().expect("creates").expect("first time");
        let app = ReplicaPath::parse("acme/app.db").expect("valid");
        let other = ReplicaPath::parse("acme/other.db").expect("valid");
        let keys = auth.mint_replica_keys(&app).expect("mints");
        auth.mint_replica_keys(&other).expect("mints");

        let all = auth.list(None).expect("lists");
        assert_eq!(all.len(), 5);
        let text = serde_json::to_string(&all).expect("json");
        for key in [&admin, &keys.push, &keys.pull] {
            assert!(!text.contains(&key[20..]), "no secret in {text}");
        }
        let of_app = auth.list(Some(&app)).expect("lists");
        assert_eq!(of_app.len(), 2);
        assert!(
            of_app
                .iter()
                .all(|k| k.replica.as_deref() == Some("acme/app.db"))
        );

        let pull_id = key_id_of(&keys.pull).expect("an id");
        let e = auth
            .revoke(&pull_id, Some(&other))
            .expect_err("other replica");
        assert_eq!(e.kind(), crate::ErrorKind::NotFound);
        let revoked = auth.revoke(&pull_id, Some(&app)).expect("revokes");
        assert!(revoked.revoked_at.is_some());
        let e = auth.check(&keys.pull).expect_err("revoked");
        assert!(e.to_string().contains("revoked"), "{e}");
        assert_eq!(auth.list(Some(&app)).expect("lists").len(), 1);
        let admin_id = key_id_of(&admin).expect("an id");
        let e = auth.revoke(&admin_id, None).expect_err("admin stays");
        assert!(e.to_string().contains("admin key"), "{e}");
        assert!(auth.check(&keys.push).expect("checks").is_some());
        let used = auth.list(Some(&app)).expect("lists");
        assert!(used[0].last_used_at.is_some(), "last use recorded");
    }

    #[test]
    fn comparison_is_exact() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
