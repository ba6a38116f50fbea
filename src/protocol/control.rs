//! Control frames: the server protocol around a page sync (who is asking, for what,
//! with which result). Same framing as page-sync frames: type byte first, integers
//! big-endian. JSON payloads are UTF-8 objects; unknown fields are ignored so either
//! side may add fields. Pure: no I/O; [`Control::decode`] never panics.

use serde::{Deserialize, Serialize};

use super::{DecodeError, MAX_FRAME_BYTES, MAX_TEXT_BYTES, code};

/// The chunked digest (`sqlferry-digest-2`) as OPEN's `digests` offers it and CONFIG's
/// `digest` accepts it.
pub const DIGEST_CHUNKED: &str = "chunked";

/// How often the server pings a subscriber; a subscriber that hears nothing for three
/// of these reconnects.
pub const PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(20);

/// Client → server, first frame: what the session is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    /// The page-sync protocol version the client speaks.
    pub protocol: u16,
    /// `push`, `pull`, `versions`, `subscribe` or `sync-now`.
    pub op: Op,
    /// The replica path, `namespace/name`.
    pub replica: String,
    /// For `pull`: `latest`, `N` or `latest-N`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// For `push`: the version the client's copy is based on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<u64>,
    /// For `push`: replace even if the replica moved past `base`.
    #[serde(default)]
    pub force: bool,
    /// For `subscribe`: `push` (this client pushes the replica and listens for sync-now)
    /// or `pull` (it follows every new version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<SubscriberRole>,
    /// Who is asking (`user@host`), recorded with a pushed version.
    #[serde(default)]
    pub client_id: String,
    /// For `revoke-key`: the id of the key to revoke (16 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The page compressions the client can receive and send, best first (`["zstd"]`);
    /// absent from older clients, which get plain pages.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compress: Vec<String>,
    /// For a push: the digest forms the client's page sync can carry besides digest 1
    /// ([`DIGEST_CHUNKED`], the chunked digest); absent from older clients, whose
    /// pushes carry digest 1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub digests: Vec<String>,
    /// For `retention`: the replica's new policy (admin key only); absent: show it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionPolicy>,
    /// For `retention`: drop the replica's own policy, so the store's default applies
    /// (admin key only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retention_clear: bool,
    /// For `prune`: say what would be removed and freed, remove nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// For `versions`: the client reads the list over several CONFIG frames (each
    /// with `more` but the last), so any number of versions fits under the frame
    /// limit. Absent from older clients, which get one CONFIG with every version.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paged: bool,
    /// For `push`: when the replica moved past `base`, merge this push's row changes
    /// onto the latest version instead of refusing (`push --merge`). A server that
    /// merges says so in its CONFIG (`merge`); an older one ignores the field, and the
    /// client then stops before sending a page. Absent from older clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeRequest>,
    /// For a push or a pull with an encryption key (`docs/security.md`): the key's id.
    /// The server then answers CONFIG's `encryption`; a server that does not is too old
    /// to keep an encrypted replica ([`check_encryption`]). Absent for a plaintext
    /// session and from older clients, so an OPEN without a key is byte for byte an
    /// older client's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// For `versions`: the client asks for the replica's passphrase salt and cost
    /// before it stretches a passphrase (`--passphrase-file`, docs/security.md). The
    /// server answers one CONFIG with `passphrase` and no version list; an older server
    /// ignores the field and answers no `passphrase`, which the client refuses ("this
    /// server cannot keep a passphrase's salt") before it derives or sends anything.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub passphrase: bool,
}

/// A replica's passphrase salt and Argon2id cost as the protocol carries them
/// (`crypt::PassphraseSalt`): in clear, public, needed by every client that stretches
/// the replica's passphrase.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Passphrase {
    /// The 16 bytes of salt: 32 lower-case hex digits.
    pub salt: String,
    /// Argon2id's memory, KiB.
    pub memory_kib: u32,
    /// Argon2id's passes.
    pub passes: u32,
    /// Argon2id's lanes.
    pub lanes: u32,
}

impl Passphrase {
    /// The wire form of a salt and an Argon2id cost (`crypt::PassphraseSalt`).
    pub fn new(salt: &[u8], memory_kib: u32, passes: u32, lanes: u32) -> Passphrase {
        Passphrase {
            salt: crate::digest::hex(salt),
            memory_kib,
            passes,
            lanes,
        }
    }

    /// The Argon2id cost: memory (KiB), passes, lanes.
    pub fn cost(&self) -> (u32, u32, u32) {
        (self.memory_kib, self.passes, self.lanes)
    }

    /// The salt's bytes, `None` when it is not hex (its length and the cost are
    /// checked by `crypt::PassphraseSalt::from_wire`).
    pub fn salt_bytes(&self) -> Option<Vec<u8>> {
        let text = self.salt.as_bytes();
        if !text.len().is_multiple_of(2) {
            return None;
        }
        text.chunks(2)
            .map(|pair| {
                std::str::from_utf8(pair)
                    .ok()
                    .and_then(|p| u8::from_str_radix(p, 16).ok())
            })
            .collect()
    }
}

/// The key of an encrypted replica, as OPEN and CONFIG name it: its public id, never
/// the key (`crypt::KeyId`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    /// The key id: 16 lower-case hex digits.
    pub key_id: String,
    /// In OPEN of a push only: this push is a rekey (`sqlferry rekey`), and this is the
    /// key id of the replica's latest version, which the push replaces with `key_id`
    /// (docs/security.md). The store takes another key id from a push only when it
    /// says so, and only when this is the latest version's key id; any other push with
    /// another key id is refused, as before. An older server ignores the field and
    /// refuses the push as one with another key. Absent everywhere else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rekey_from: Option<String>,
    /// In OPEN of a push only, when its key was stretched from a passphrase: the salt
    /// and cost it was stretched with. The store records them with the replica at the
    /// first such version and refuses a push naming others (another salt is another
    /// key). Absent for a key file's key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passphrase: Option<Passphrase>,
}

impl Encryption {
    /// The encryption of key id `key_id`, no rekey.
    pub fn key(key_id: String) -> Encryption {
        Encryption {
            key_id,
            rekey_from: None,
            passphrase: None,
        }
    }
}

/// Deserializes a field that may be present as `null`: present (null or not) is
/// `Some`, so that `Option<Option<T>>` tells an absent field (`None`) from a null one
/// (`Some(None)`).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// What a client that opened a push or a pull makes of the server's answer about
/// encryption, before any page moves. `ours` is the id of the client's key (`None`: a
/// plaintext session, which sent no `encryption`); `version` and `theirs` are CONFIG's
/// `version` and `encryption`.
///
/// - A key, and no answer: the server is too old to keep an encrypted replica
///   (protocol error, exit 4); nothing is sent to it.
/// - A key, and a replica with versions in plaintext: refused (auth, exit 5); a
///   replica with no version yet becomes encrypted with this push.
/// - A key whose id is not the one of the replica's latest version: refused (auth,
///   exit 5), naming the replica's key id.
/// - No key, and an encrypted replica: refused (auth, exit 5). A server answers
///   `encryption` only to an OPEN that carried it, so this client learns it here only
///   from a server that said so anyway; a server refuses the session on its side too.
pub fn check_encryption(
    replica: &str,
    ours: Option<&str>,
    version: u64,
    theirs: Option<&Option<Encryption>>,
) -> crate::Result<()> {
    use crate::Error;
    match (ours, theirs) {
        (None, None | Some(None)) => Ok(()),
        (None, Some(Some(e))) => Err(Error::Auth(format!(
            "{replica} is encrypted (key id {}): give its key file (--encryption-key-file, or SQLFERRY_ENCRYPTION_KEY); nothing was sent",
            e.key_id
        ))),
        (Some(_), None) => Err(Error::Protocol(format!(
            "this server cannot keep an encrypted replica (it did not answer the encryption of {replica}); upgrade it, or push or pull without an encryption key; nothing was sent"
        ))),
        (Some(_), Some(None)) if version == 0 => Ok(()),
        (Some(_), Some(None)) => Err(Error::Auth(format!(
            "{replica} is not encrypted: its versions are plaintext, and a replica is encrypted or not from its first version on; push or pull it without an encryption key (or push to a new replica with one); nothing was sent"
        ))),
        (Some(k), Some(Some(e))) if k == e.key_id => Ok(()),
        (Some(k), Some(Some(e))) => Err(Error::Auth(format!(
            "version {version} of {replica} was made with key id {}, and this key's id is {k}: give its key file; nothing was sent",
            e.key_id
        ))),
    }
}

/// What a client that opened a pull with one or more keys (`ours`, their ids in the
/// order given; empty: a plaintext session) makes of the server's answer: the index in
/// `ours` of the key whose id the version names, `None` for a plaintext session. A
/// version made with a key that was not given is refused (auth, exit 5), naming the
/// key id it needs and the ids given; every other case is [`check_encryption`]'s, with
/// the first key.
pub fn pick_key(
    replica: &str,
    ours: &[String],
    version: u64,
    theirs: Option<&Option<Encryption>>,
) -> crate::Result<Option<usize>> {
    if let (Some(Some(e)), [_, _, ..]) = (theirs, ours) {
        return match ours.iter().position(|k| *k == e.key_id) {
            Some(i) => Ok(Some(i)),
            None => Err(crate::Error::Auth(format!(
                "version {version} of {replica} was made with key id {}, and the keys given have ids {}: give its key file; nothing was sent",
                e.key_id,
                ours.join(", ")
            ))),
        };
    }
    check_encryption(replica, ours.first().map(String::as_str), version, theirs)
        .map(|()| ours.first().map(|_| 0))
}

/// What a `push --merge` asks for: how rows changed on both sides are decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeRequest {
    /// `refuse` (the push is refused, with the rows listed), `ours` (this push's row
    /// wins), `theirs` (the latest version's row stays) or `newer` (the row whose
    /// `lww_column` is greater wins).
    pub on_conflict: String,
    /// For `newer`: the column that orders the writes (`updated_at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lww_column: Option<String>,
}

/// One row changed on both sides of a merge, to different values: its key and the
/// three rows (column name to value; absent: no such row on that side).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowConflict {
    /// The table.
    pub table: String,
    /// The primary key's column names (`rowid` for a table without one).
    pub key_columns: Vec<String>,
    /// The primary key's values, whole (a blob as `{"blob": "<hex>"}`).
    pub key: Vec<serde_json::Value>,
    /// The row in the version the push was based on.
    #[serde(default)]
    pub base: Option<serde_json::Map<String, serde_json::Value>>,
    /// The row in the replica's latest version.
    #[serde(default)]
    pub theirs: Option<serde_json::Map<String, serde_json::Value>>,
    /// The row in this push.
    #[serde(default)]
    pub ours: Option<serde_json::Map<String, serde_json::Value>>,
    /// `refused`, `ours` or `theirs`: which row the merge kept.
    pub resolution: String,
}

/// What a merge did or why it refused (after a `push --merge` whose base was stale).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeResult {
    /// The version the push was based on (OLD).
    pub base: u64,
    /// The latest version it was merged onto.
    pub onto: u64,
    /// The version the merge made (0 when refused).
    pub version: u64,
    /// That version's digest (empty when refused).
    #[serde(default)]
    pub digest: String,
    /// The row changes of the push applied (inserted, updated, deleted rows).
    pub changes: u64,
    /// Rows changed on both sides to different values.
    pub conflicts_total: u64,
    /// The first of them (at most [`MAX_LISTED_CONFLICTS`]).
    #[serde(default)]
    pub conflicts: Vec<RowConflict>,
    /// Why the merge was refused (`None`: it was made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// The version that holds exactly what this push sent: the candidate, stored as a
    /// version of its own just before the merge (`version - 1`), or the latest version
    /// when the push held exactly that (nothing was merged). The pushing client records
    /// it as LOCAL's base when LOCAL was written meanwhile and keeps its changes, so
    /// that its next push's three-way diff sees only what changed since. 0: none (a
    /// refused merge, or a server older than candidates, which stores only the merge).
    #[serde(default)]
    pub candidate: u64,
}

/// The most conflicting rows a merge lists (all are counted).
pub const MAX_LISTED_CONFLICTS: usize = 100;

/// Which versions of a replica are kept. Every rule given keeps what it names; a
/// version is removed only when no rule keeps it, and the latest version is always
/// kept. No rule at all keeps everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    /// Keep the N newest versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u64>,
    /// Keep the newest version of each of the D most recent days (UTC) that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u64>,
    /// Keep the newest version of each of the W most recent ISO weeks that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u64>,
    /// Keep every version made within this many seconds before now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_within_seconds: Option<u64>,
}

impl RetentionPolicy {
    /// Whether no rule is set: everything is kept.
    pub fn keeps_everything(&self) -> bool {
        *self == RetentionPolicy::default()
    }
}

impl std::fmt::Display for RetentionPolicy {
    /// `keep-last=30,keep-daily=14,keep-within=30days`, or `keep everything`; the form
    /// `serve --retention` takes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.keeps_everything() {
            return f.write_str("keep everything");
        }
        let mut parts = Vec::new();
        if let Some(n) = self.keep_last {
            parts.push(format!("keep-last={n}"));
        }
        if let Some(n) = self.keep_daily {
            parts.push(format!("keep-daily={n}"));
        }
        if let Some(n) = self.keep_weekly {
            parts.push(format!("keep-weekly={n}"));
        }
        if let Some(s) = self.keep_within_seconds {
            let d = humantime::format_duration(std::time::Duration::from_secs(s));
            parts.push(format!("keep-within={}", d.to_string().replace(' ', "")));
        }
        f.write_str(&parts.join(","))
    }
}

/// A replica's retention policy, as `retention` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retention {
    /// The replica path.
    pub replica: String,
    /// The policy that applies to it.
    pub policy: RetentionPolicy,
    /// Where that policy comes from: `replica` (its own), `default` (the store's
    /// default) or `none` (nothing set anywhere: everything is kept).
    pub source: String,
}

impl Retention {
    /// The policy that applies to `replica`: its `own`, else the store's `default`,
    /// else none (everything kept), each named as its source. Both stores decide it so.
    pub fn applying(
        replica: &impl std::fmt::Display,
        own: Option<RetentionPolicy>,
        default: Option<RetentionPolicy>,
    ) -> Retention {
        let (policy, source) = match (own, default) {
            (Some(p), _) => (p, "replica"),
            (None, Some(p)) => (p, "default"),
            (None, None) => (RetentionPolicy::default(), "none"),
        };
        Retention {
            replica: replica.to_string(),
            policy,
            source: source.into(),
        }
    }
}

/// What a prune removed (or, in a dry run, would remove) and freed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneReport {
    /// The replica path.
    pub replica: String,
    /// Whether this was a dry run (nothing changed).
    pub dry_run: bool,
    /// The numbers of the versions removed, oldest first (numbers only: a first prune
    /// of a long history stays well within one frame).
    pub removed: Vec<u64>,
    /// How many versions remain.
    pub kept: u64,
    /// Pages no version of any replica uses any more, freed (or that would be).
    pub freed_pages: u64,
    /// Their stored bytes (compressed size where a page is kept compressed).
    pub freed_bytes: u64,
    /// Disk space given back to the file system, as it counts it (allocated blocks):
    /// about `freed_bytes`, less where a freed page shares a block with a kept one.
    pub reclaimed_bytes: u64,
    /// Why pages were not freed, when the versions were removed but the store was too
    /// busy to collect them now (the next prune or automatic removal does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deferred: Option<String>,
    /// On an S3 store: the objects (packs, their indexes, chunks) the sweep deleted (or
    /// would delete): unreferenced by every remaining version and older than the grace
    /// period. Their bytes are `freed_bytes`. Absent from a directory store's report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swept_objects: Option<u64>,
    /// On an S3 store: unreferenced objects left because they are younger than the
    /// grace period (a push in flight may be about to name them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub young_objects: Option<u64>,
    /// On an S3 store, in a dry run: the keys the sweep would delete (at most
    /// [`SWEPT_LISTED`]; `swept_objects` counts them all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub swept: Vec<String>,
}

/// The most object keys a dry run's [`PruneReport::swept`] lists: the frame stays
/// small however much garbage there is.
pub const SWEPT_LISTED: usize = 1000;

/// What a session does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    /// Send a database as a new version.
    Push,
    /// Fetch a version.
    Pull,
    /// List versions.
    Versions,
    /// Stay connected: NEWREPLICAVERSION and SYNCNOW come from the server, CHANGED and
    /// REPORT go to it, until either side closes.
    Subscribe,
    /// Ask every running subscriber of the replica to sync now; CONFIG says how many
    /// were reached.
    SyncNow,
    /// List the server's keys (admin key only): CONFIG's `key_list`, never a secret.
    /// `replica`, when not empty, keeps only the keys of that replica.
    Keys,
    /// Revoke the key `key_id` (admin key only): CONFIG's `key_list` holds it. With a
    /// `replica`, only a key of that replica is revoked.
    RevokeKey,
    /// Wait until pull subscribers report having applied a version: after CONFIG the
    /// client sends WAITFOLLOWERS, the server answers FOLLOWED as the count changes and
    /// once more, `done`, when it is reached or the wait timed out. Only for servers
    /// whose CONFIG says `followers`.
    WaitFollowers,
    /// Show the replica's retention policy (any key of it), or set it (admin key
    /// only): CONFIG's `retention`.
    Retention,
    /// Remove the versions the replica's retention policy does not keep and free the
    /// pages no version uses (admin key only): CONFIG's `pruned`.
    Prune,
}

/// What a subscriber does with its replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SubscriberRole {
    /// Pushes a local database when it changes (needs a PUSH or admin key).
    Push,
    /// Pulls each new version (any key that may pull).
    Pull,
}

impl SubscriberRole {
    /// `push` or `pull`.
    pub fn as_str(self) -> &'static str {
        match self {
            SubscriberRole::Push => "push",
            SubscriberRole::Pull => "pull",
        }
    }
}

/// Server → client: the replica and the session's facts. Sent after OPEN is accepted,
/// and again after a push commits (with the new version and any new keys).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// The replica's id (random, assigned at creation).
    pub replica_id: String,
    /// The replica path.
    pub path: String,
    /// The version concerned: the latest (after OPEN), the pulled one, or the one a
    /// push made (after DONE). 0 when the replica has no version yet.
    pub version: u64,
    /// The kind of key the session authenticated with: `admin`, `push` or `pull`.
    pub key_type: String,
    /// Keys minted for a new replica after KEYREQUEST (shown once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<NewKeys>,
    /// For `versions`: every version, oldest first; to a client that asked for a
    /// `paged` list, the next run of them (see `more`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub versions: Option<Vec<VersionInfo>>,
    /// For a `paged` `versions`: another CONFIG with the next versions follows.
    #[serde(default, skip_serializing_if = "is_false")]
    pub more: bool,
    /// After a push: whether it made a new version (false: nothing had changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<bool>,
    /// After a push: how many damaged stored pages it replaced with good ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repaired: Option<u32>,
    /// After `sync-now`: how many running subscribers were reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reached: Option<u64>,
    /// After `keys`: the keys; after `revoke-key`: the key revoked. Ids only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_list: Option<Vec<KeyInfo>>,
    /// The page compression of this session's page sync, one of OPEN's `compress`
    /// (`"zstd"`); absent: plain pages (and from older servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compress: Option<String>,
    /// The digest form of this push's page sync, one of OPEN's `digests`
    /// ([`DIGEST_CHUNKED`]: the origin may set BEGIN's CHUNKED_DIGEST); absent: digest 1
    /// (and from older servers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest_form: Option<String>,
    /// After a push that agreed on a `digest_form`: the version's digest as it recorded
    /// it, digest 1 (hex) where it has one, else its chunked digest (`c:` and hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The server keeps followers: it takes APPLIED from a pull subscriber and the
    /// `wait-followers` op. Absent (false) from older servers, to which a subscriber
    /// then sends no APPLIED (an unknown frame would end its session).
    #[serde(default, skip_serializing_if = "is_false")]
    pub followers: bool,
    /// After `retention`: the replica's policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Box<Retention>>,
    /// After `prune`: what was removed and freed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pruned: Option<Box<PruneReport>>,
    /// The server's id: random, made once per data directory, the same across
    /// restarts and whatever URL the client used; not a secret. Clients save it with a
    /// key so that another spelling of the server's URL finds the key. Absent from
    /// older servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_id: Option<String>,
    /// After OPEN of a `push` that asked to merge: this server merges (absent, false,
    /// from older servers, which would refuse the push as a conflict instead).
    #[serde(default, skip_serializing_if = "is_false")]
    pub merge: bool,
    /// After a push that was merged (or whose merge was refused): what the merge did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged: Option<Box<MergeResult>>,
    /// The first CONFIG of a push or a pull whose OPEN had `encryption`: the replica's
    /// encryption, the key id of its latest version (`Some(Some(..))`), or `null` for a
    /// plaintext replica or one with no version yet (`Some(None)`). Absent (`None`) to
    /// an OPEN without `encryption`, and from older servers, which cannot keep an
    /// encrypted replica ([`check_encryption`]).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub encryption: Option<Option<Encryption>>,
    /// To a `versions` OPEN with `passphrase: true`: the replica's passphrase salt and
    /// cost (`Some(Some(_))`), or `null` (`Some(None)`) for a replica that has none (no
    /// version yet, plaintext, or only ever under key files). Absent (`None`) otherwise,
    /// and from older servers.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub passphrase: Option<Option<Passphrase>>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The longest wait for followers a server grants (`push --wait-followers --timeout`
/// refuses a longer one): a waiting session holds a connection.
pub const MAX_FOLLOWERS_WAIT: std::time::Duration = std::time::Duration::from_secs(3600);

/// A pull subscriber's report: its database now holds `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The version the subscriber's database holds.
    pub version: u64,
    /// When it was applied (Unix seconds, the subscriber's clock); absent: now. The
    /// server keeps the earlier of this and the time the report arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_at: Option<i64>,
}

/// What a `wait-followers` session waits for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitFollowers {
    /// How many pull subscribers must hold the version (or a later one), from 1.
    pub count: u32,
    /// The version, from 1.
    pub version: u64,
    /// How long to wait at most, in milliseconds (the server grants at most
    /// [`MAX_FOLLOWERS_WAIT`]).
    pub timeout_ms: u64,
}

/// How many pull subscribers hold a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Followed {
    /// Connected pull subscribers that reported holding `version` or a later one.
    pub count: u32,
    /// The version waited for.
    pub version: u64,
    /// The last FOLLOWED of the session: the count was reached, or the wait timed out
    /// (then `count` is below the one asked for).
    pub done: bool,
}

/// What is known about one version (a row of `versions`, as a store keeps it and as
/// the CONFIG frame carries it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The version number, from 1.
    pub number: u64,
    /// Page size in bytes.
    pub page_size: u32,
    /// Number of pages.
    pub page_count: u32,
    /// Database size in bytes (page size × page count).
    pub size: u64,
    /// The database digest (digest 1), lower-case hex.
    pub digest: String,
    /// The chunked digest (`c:` + 64 hex digits, [`crate::digest::digest_text`]) where
    /// the store recorded it; absent from older stores and servers, and ignored by older
    /// peers. A digest is compared with this one or with `digest`, in its own form
    /// ([`VersionInfo::has_digest`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest2: Option<String>,
    /// The commit message (`push -m`), possibly empty.
    pub message: String,
    /// When it was committed, seconds since the Unix epoch.
    pub created_at: i64,
    /// Which client pushed it.
    pub client_id: String,
    /// Which key pushed it (empty for the embedded store).
    pub key_id: String,
    /// The version this one was pushed on top of (0: none).
    pub base: u64,
    /// The stored bytes of the pages this version brought into its replica (pages no
    /// earlier version of it uses; compressed size where a page is kept compressed):
    /// the sum over a replica's versions is what the replica keeps stored. Absent
    /// where not computed (`versions` computes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_bytes: Option<u64>,
    /// Set on a merge's candidate (what a `push --merge` sent, stored as it was): the
    /// version that merged it, stored in the same transaction. A candidate is never the
    /// latest version. Absent on every other version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<u64>,
    /// The id of the encryption key a version of an encrypted replica was made with
    /// (16 hex digits, `docs/security.md`); its `digest` and `digest2` are then over
    /// page identities, not the plaintext pages. Absent for a plaintext version, and
    /// from older stores and servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<String>,
}

impl VersionInfo {
    /// The digest as the version recorded it: digest 1 (hex) where it has one, else its
    /// chunked digest (`c:` and hex).
    pub fn recorded_digest(&self) -> String {
        match self.digest.is_empty() {
            true => self.digest2.clone().unwrap_or_default(),
            false => self.digest.clone(),
        }
    }

    /// A version of which nothing is known but its number and when it was made: what a
    /// removed version's tombstone still says. Every other field empty (no pages, no
    /// digest, no key).
    pub fn bare(number: u64, created_at: i64) -> VersionInfo {
        VersionInfo {
            number,
            page_size: 0,
            page_count: 0,
            size: 0,
            digest: String::new(),
            digest2: None,
            message: String::new(),
            created_at,
            client_id: String::new(),
            key_id: String::new(),
            base: 0,
            stored_bytes: None,
            merged_into: None,
            encryption: None,
        }
    }

    /// Whether `digest` (text, in either form: 64 hex digits for digest 1, `c:` and 64
    /// for the chunked form) is this version's digest. Two digests compare only in the
    /// same form: a form this version has no record of matches nothing, and an empty
    /// text matches nothing.
    pub fn has_digest(&self, digest: &str) -> bool {
        if digest.is_empty() {
            return false;
        }
        match digest.starts_with(crate::digest::CHUNKED_PREFIX) {
            true => self.digest2.as_deref() == Some(digest),
            false => self.digest == digest,
        }
    }

    /// Checks a database's digests (`d`, both forms, made from its pages) against each
    /// digest this version recorded, each in its own form. `Err((recorded, ours))` for
    /// the first that differs, as text; `recorded` is empty when the version recorded
    /// no digest at all (nothing vouches for it then).
    pub fn check_digests(&self, d: &crate::digest::Digests) -> Result<(), (String, String)> {
        use crate::digest::{DigestForm, digest_text};
        let recorded = [
            (!self.digest.is_empty()).then(|| (self.digest.clone(), DigestForm::One)),
            self.digest2.clone().map(|c| (c, DigestForm::Chunked)),
        ];
        let mut any = false;
        for (theirs, form) in recorded.into_iter().flatten() {
            any = true;
            let ours = match form {
                DigestForm::One => digest_text(form, &d.one),
                DigestForm::Chunked => digest_text(form, &d.chunked),
            };
            if theirs != ours {
                return Err((theirs, ours));
            }
        }
        match any {
            true => Ok(()),
            false => Err((String::new(), crate::digest::hex(&d.one))),
        }
    }

    /// The digest to show: digest 1 where recorded, else the chunked one (`c:…`).
    pub fn shown_digest(&self) -> &str {
        match (self.digest.is_empty(), &self.digest2) {
            (true, Some(d2)) => d2,
            _ => &self.digest,
        }
    }
}

/// What the server tells of a key: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    /// The key's id: the 16 hex digits after `sfk_` (not secret; versions record it).
    pub id: String,
    /// `admin`, `push` or `pull`.
    pub kind: String,
    /// The replica a PUSH or PULL key is for.
    pub replica: Option<String>,
    /// When it was minted (Unix seconds).
    pub created_at: i64,
    /// When it last opened a session or API request (Unix seconds, to the minute), if
    /// ever.
    pub last_used_at: Option<i64>,
    /// When it was revoked (Unix seconds), if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
}

/// The keys of a new replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewKeys {
    /// Push and pull this replica.
    pub push: String,
    /// Pull this replica only.
    pub pull: String,
}

/// A new version landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewVersion {
    /// The replica path.
    pub replica: String,
    /// The new version number.
    pub version: u64,
    /// Its digest, hex.
    pub digest: String,
}

/// The longest `error` text a REPORT keeps, in bytes: longer ones are cut (on a
/// character boundary, with `…` added) by the subscriber before sending and by the
/// server on receipt.
pub const MAX_REPORT_ERROR_BYTES: usize = 2048;

impl FailureReport {
    /// Cuts `error` to at most [`MAX_REPORT_ERROR_BYTES`] bytes (plus `…`).
    pub fn cap_error(&mut self) {
        if self.error.len() > MAX_REPORT_ERROR_BYTES {
            let mut end = MAX_REPORT_ERROR_BYTES;
            while !self.error.is_char_boundary(end) {
                end -= 1;
            }
            self.error.truncate(end);
            self.error.push('…');
        }
    }
}

/// A push subscriber's report that its pushes have been failing for a while.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureReport {
    /// Seconds since the first failed attempt after the last successful push.
    pub failing_for: u64,
    /// Failed attempts since the last successful push.
    pub attempts: u32,
    /// The latest attempt's error, one line.
    pub error: String,
}

/// One control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// `0x50` OPEN: JSON [`Open`].
    Open(Open),
    /// `0x51` CONFIG: JSON [`Config`].
    Config(Config),
    /// `0x52` NEWREPLICAVERSION: JSON [`NewVersion`].
    NewReplicaVersion(NewVersion),
    /// `0x53` KEYREQUEST: no payload.
    KeyRequest,
    /// `0x54` COMMITMESSAGE: `u16` length, then that many bytes of UTF-8 (≤ 4096).
    CommitMessage(String),
    /// `0x55` SYNCNOW (server → subscriber): sync now. No payload.
    SyncNow,
    /// `0x56` REPORT (push subscriber → server): JSON [`FailureReport`].
    Report(FailureReport),
    /// `0x57` CHANGED: `u32` seconds until the planned push.
    Changed(u32),
    /// `0x58` APPLIED (pull subscriber → server): JSON [`Applied`].
    Applied(Applied),
    /// `0x59` WAITFOLLOWERS (client → server, `wait-followers` op): JSON
    /// [`WaitFollowers`].
    WaitFollowers(WaitFollowers),
    /// `0x5a` FOLLOWED (server → client, `wait-followers` op): JSON [`Followed`].
    Followed(Followed),
}

/// Frame code of OPEN.
pub const OPEN: u8 = 0x50;

impl Control {
    /// Whether `byte` is the type of a control frame.
    pub fn is_control(byte: u8) -> bool {
        matches!(
            byte,
            OPEN | code::CONFIG
                | code::NEW_REPLICA_VERSION
                | code::KEY_REQUEST
                | code::COMMIT_MESSAGE
                | code::SYNC_NOW
                | code::REPORT
                | code::CHANGED
                | code::APPLIED
                | code::WAIT_FOLLOWERS
                | code::FOLLOWED
        )
    }

    /// The frame's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        fn json(ty: u8, v: &impl Serialize) -> Vec<u8> {
            let mut out = vec![ty];
            serde_json::to_writer(&mut out, v).expect("serialising to a Vec cannot fail");
            out
        }
        match self {
            Control::Open(o) => json(OPEN, o),
            Control::Config(c) => json(code::CONFIG, c),
            Control::NewReplicaVersion(n) => json(code::NEW_REPLICA_VERSION, n),
            Control::KeyRequest => vec![code::KEY_REQUEST],
            Control::CommitMessage(m) => {
                let mut end = m.len().min(MAX_TEXT_BYTES);
                while !m.is_char_boundary(end) {
                    end -= 1;
                }
                let mut out = vec![code::COMMIT_MESSAGE];
                out.extend_from_slice(&(end as u16).to_be_bytes());
                out.extend_from_slice(&m.as_bytes()[..end]);
                out
            }
            Control::SyncNow => vec![code::SYNC_NOW],
            Control::Report(r) => json(code::REPORT, r),
            Control::Changed(s) => {
                let mut out = vec![code::CHANGED];
                out.extend_from_slice(&s.to_be_bytes());
                out
            }
            Control::Applied(a) => json(code::APPLIED, a),
            Control::WaitFollowers(w) => json(code::WAIT_FOLLOWERS, w),
            Control::Followed(f) => json(code::FOLLOWED, f),
        }
    }

    /// Decodes one control frame. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Control, DecodeError> {
        if bytes.len() > MAX_FRAME_BYTES {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        let (&ty, rest) = bytes.split_first().ok_or(DecodeError::Empty)?;
        fn json<T: for<'de> Deserialize<'de>>(
            what: &'static str,
            b: &[u8],
        ) -> Result<T, DecodeError> {
            serde_json::from_slice(b)
                .map_err(|e| DecodeError::Invalid(format!("{what} frame: {e}")))
        }
        Ok(match ty {
            OPEN => Control::Open(json("OPEN", rest)?),
            code::CONFIG => Control::Config(json("CONFIG", rest)?),
            code::NEW_REPLICA_VERSION => {
                Control::NewReplicaVersion(json("NEWREPLICAVERSION", rest)?)
            }
            code::KEY_REQUEST if rest.is_empty() => Control::KeyRequest,
            code::KEY_REQUEST => return Err(DecodeError::Trailing("KEYREQUEST", rest.len())),
            code::COMMIT_MESSAGE => {
                let (len, text) = match rest {
                    [a, b, text @ ..] => (usize::from(u16::from_be_bytes([*a, *b])), text),
                    _ => return Err(DecodeError::Truncated("COMMITMESSAGE")),
                };
                if len > MAX_TEXT_BYTES {
                    return Err(DecodeError::Invalid(format!(
                        "COMMITMESSAGE of {len} bytes; at most {MAX_TEXT_BYTES} are allowed"
                    )));
                }
                if text.len() < len {
                    return Err(DecodeError::Truncated("COMMITMESSAGE"));
                }
                if text.len() > len {
                    return Err(DecodeError::Trailing("COMMITMESSAGE", text.len() - len));
                }
                let text = String::from_utf8(text.to_vec())
                    .map_err(|_| DecodeError::Invalid("COMMITMESSAGE is not UTF-8".into()))?;
                Control::CommitMessage(text)
            }
            code::SYNC_NOW if rest.is_empty() => Control::SyncNow,
            code::SYNC_NOW => return Err(DecodeError::Trailing("SYNCNOW", rest.len())),
            code::REPORT => Control::Report(json("REPORT", rest)?),
            code::CHANGED => match rest {
                [a, b, c, d] => Control::Changed(u32::from_be_bytes([*a, *b, *c, *d])),
                [_, _, _, _, more @ ..] => {
                    return Err(DecodeError::Trailing("CHANGED", more.len()));
                }
                _ => return Err(DecodeError::Truncated("CHANGED")),
            },
            code::APPLIED => Control::Applied(json("APPLIED", rest)?),
            code::WAIT_FOLLOWERS => Control::WaitFollowers(json("WAITFOLLOWERS", rest)?),
            code::FOLLOWED => Control::Followed(json("FOLLOWED", rest)?),
            other => return Err(DecodeError::UnknownType(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_frames_round_trip() {
        let frames = [
            Control::Open(Open {
                protocol: 1,
                op: Op::Push,
                replica: "acme/app.db".into(),
                version: None,
                base: Some(3),
                force: false,
                role: None,
                client_id: "me@host".into(),
                key_id: None,
                compress: vec!["zstd".into()],
                digests: vec![DIGEST_CHUNKED.into()],
                retention: None,
                retention_clear: false,
                dry_run: false,
                paged: false,
                merge: None,
                encryption: None,
                passphrase: false,
            }),
            Control::Open(Open {
                protocol: 1,
                op: Op::Retention,
                replica: "acme/app.db".into(),
                version: None,
                base: None,
                force: false,
                role: None,
                client_id: "me@host".into(),
                key_id: None,
                compress: Vec::new(),
                digests: Vec::new(),
                retention: Some(RetentionPolicy {
                    keep_last: Some(30),
                    keep_within_seconds: Some(86_400),
                    ..RetentionPolicy::default()
                }),
                retention_clear: false,
                dry_run: true,
                paged: false,
                merge: None,
                encryption: None,
                passphrase: false,
            }),
            Control::Open(Open {
                protocol: 1,
                op: Op::Subscribe,
                replica: "acme/app.db".into(),
                version: None,
                base: None,
                force: false,
                role: Some(SubscriberRole::Pull),
                client_id: "me@host".into(),
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
            }),
            Control::Config(Config {
                replica_id: "r1".into(),
                path: "acme/app.db".into(),
                version: 4,
                key_type: "push".into(),
                compress: Some("zstd".into()),
                digest_form: Some(DIGEST_CHUNKED.into()),
                ..Default::default()
            }),
            Control::NewReplicaVersion(NewVersion {
                replica: "a/b".into(),
                version: 9,
                digest: "ab".into(),
            }),
            Control::KeyRequest,
            Control::CommitMessage("before migration ✓".into()),
            Control::SyncNow,
            Control::Report(FailureReport {
                failing_for: 420,
                attempts: 6,
                error: "cannot reach ws://h:1".into(),
            }),
            Control::Changed(600),
            Control::Applied(Applied {
                version: 7,
                applied_at: Some(1_764_700_003),
            }),
            Control::Applied(Applied {
                version: 1,
                applied_at: None,
            }),
            Control::WaitFollowers(WaitFollowers {
                count: 2,
                version: 8,
                timeout_ms: 60_000,
            }),
            Control::Followed(Followed {
                count: 1,
                version: 8,
                done: false,
            }),
            Control::Config(Config {
                followers: true,
                ..Default::default()
            }),
        ];
        for f in frames {
            assert_eq!(Control::decode(&f.to_bytes()), Ok(f));
        }
    }

    /// The compression fields are left out when empty, so an OPEN or CONFIG without
    /// compression is the one an older peer sends; and an older peer's frames, without
    /// them, decode as "no compression".
    #[test]
    fn compression_fields_are_absent_when_unused() {
        let old_open = br#"{"protocol":1,"op":"pull","replica":"a/b","client_id":"x"}"#;
        let mut frame = vec![OPEN];
        frame.extend_from_slice(old_open);
        let Ok(Control::Open(open)) = Control::decode(&frame) else {
            panic!("an older client's OPEN decodes");
        };
        assert!(open.compress.is_empty());
        let plain = Control::Open(Open {
            compress: Vec::new(),
            ..open
        })
        .to_bytes();
        assert!(!String::from_utf8_lossy(&plain).contains("compress"));
        let config = Control::Config(Config::default()).to_bytes();
        assert!(!String::from_utf8_lossy(&config).contains("compress"));
        let mut old_config = vec![code::CONFIG];
        old_config
            .extend_from_slice(br#"{"replica_id":"","path":"a/b","version":0,"key_type":"admin"}"#);
        let Ok(Control::Config(c)) = Control::decode(&old_config) else {
            panic!("an older server's CONFIG decodes");
        };
        assert_eq!(c.compress, None);
    }

    /// The digest-form fields are left out when unused, so an OPEN or CONFIG that does
    /// not agree on the chunked digest is byte for byte an older peer's; an older
    /// peer's frames decode as "digest 1".
    #[test]
    fn digest_form_fields_are_absent_when_unused() {
        let mut frame = vec![OPEN];
        frame.extend_from_slice(br#"{"protocol":1,"op":"push","replica":"a/b","client_id":"x"}"#);
        let Ok(Control::Open(open)) = Control::decode(&frame) else {
            panic!("an older client's OPEN decodes");
        };
        assert!(open.digests.is_empty());
        assert!(!String::from_utf8_lossy(&Control::Open(open).to_bytes()).contains("digest"));
        let config = Control::Config(Config::default()).to_bytes();
        assert!(!String::from_utf8_lossy(&config).contains("digest"));
        let Ok(Control::Config(c)) = Control::decode(&config) else {
            panic!("a CONFIG decodes");
        };
        assert_eq!((c.digest_form, c.digest), (None, None));
    }

    /// The server's id rides in CONFIG as `server_id`; an older server's CONFIG has
    /// none and decodes as `None`.
    #[test]
    fn config_carries_the_server_id_when_there_is_one() {
        let with = Control::Config(Config {
            server_id: Some("5f0c".into()),
            ..Config::default()
        });
        assert!(String::from_utf8_lossy(&with.to_bytes()).contains(r#""server_id":"5f0c""#));
        assert_eq!(Control::decode(&with.to_bytes()), Ok(with));
        let without = Control::Config(Config::default()).to_bytes();
        assert!(!String::from_utf8_lossy(&without).contains("server_id"));
        let mut old_config = vec![code::CONFIG];
        old_config
            .extend_from_slice(br#"{"replica_id":"","path":"a/b","version":0,"key_type":"admin"}"#);
        let Ok(Control::Config(c)) = Control::decode(&old_config) else {
            panic!("an older server's CONFIG decodes");
        };
        assert_eq!(c.server_id, None);
    }

    /// The follower frames as docs/protocol.md gives them, and the CONFIG flag that
    /// tells a subscriber it may send them: absent unless set, false from an older
    /// server.
    #[test]
    fn follower_frames_are_byte_exact_and_negotiated() {
        let applied = Control::Applied(Applied {
            version: 7,
            applied_at: None,
        });
        assert_eq!(applied.to_bytes(), b"\x58{\"version\":7}");
        assert_eq!(
            Control::decode(b"\x58{\"version\":7,\"applied_at\":5,\"later\":1}"),
            Ok(Control::Applied(Applied {
                version: 7,
                applied_at: Some(5)
            }))
        );
        assert_eq!(
            Control::WaitFollowers(WaitFollowers {
                count: 1,
                version: 3,
                timeout_ms: 1000
            })
            .to_bytes(),
            b"\x59{\"count\":1,\"version\":3,\"timeout_ms\":1000}"
        );
        assert_eq!(
            Control::Followed(Followed {
                count: 0,
                version: 3,
                done: true
            })
            .to_bytes(),
            b"\x5a{\"count\":0,\"version\":3,\"done\":true}"
        );
        for bad in [
            &b"\x58"[..],
            b"\x58{}",
            b"\x58{\"version\":-1}",
            b"\x59{\"count\":1}",
        ] {
            assert!(
                matches!(Control::decode(bad), Err(DecodeError::Invalid(_))),
                "{bad:?}"
            );
        }
        let open = Open {
            protocol: 1,
            op: Op::WaitFollowers,
            replica: "a/b".into(),
            version: None,
            base: None,
            force: false,
            role: None,
            client_id: "x".into(),
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
        };
        let bytes = Control::Open(open).to_bytes();
        assert!(String::from_utf8_lossy(&bytes).contains(r#""op":"wait-followers""#));
        let plain = Control::Config(Config::default()).to_bytes();
        assert!(!String::from_utf8_lossy(&plain).contains("followers"));
        let flagged = Control::Config(Config {
            followers: true,
            ..Config::default()
        })
        .to_bytes();
        assert!(String::from_utf8_lossy(&flagged).contains(r#""followers":true"#));
        let mut old = vec![code::CONFIG];
        old.extend_from_slice(br#"{"replica_id":"","path":"a/b","version":0,"key_type":"pull"}"#);
        let Ok(Control::Config(c)) = Control::decode(&old) else {
            panic!("an older server's CONFIG decodes");
        };
        assert!(!c.followers);
        // Inside a page sync they are control frames, out of place.
        for ty in [code::APPLIED, code::WAIT_FOLLOWERS, code::FOLLOWED] {
            assert!(Control::is_control(ty));
            assert_eq!(
                super::super::Frame::decode(&[ty, b'{', b'}']),
                Err(DecodeError::Control(ty))
            );
        }
    }

    /// OPEN's and CONFIG's `encryption` as docs/protocol.md gives them: absent unless
    /// a key is used (so an older peer never sees them), and CONFIG's three states
    /// (absent, null, a key id) kept apart through a round trip.
    #[test]
    fn encryption_fields_are_negotiated_and_absent_when_unused() {
        let mut frame = vec![OPEN];
        frame.extend_from_slice(br#"{"protocol":1,"op":"push","replica":"a/b","client_id":"x"}"#);
        let Ok(Control::Open(open)) = Control::decode(&frame) else {
            panic!("an older client's OPEN decodes");
        };
        assert_eq!(open.encryption, None);
        assert!(
            !String::from_utf8_lossy(&Control::Open(open.clone()).to_bytes())
                .contains("encryption")
        );
        let keyed = Control::Open(Open {
            encryption: Some(Encryption::key("0011223344556677".into())),
            ..open.clone()
        });
        assert!(
            String::from_utf8_lossy(&keyed.to_bytes())
                .contains(r#""encryption":{"key_id":"0011223344556677"}"#)
        );
        assert_eq!(Control::decode(&keyed.to_bytes()), Ok(keyed));
        // A rekey's OPEN names the key it replaces too; an older peer ignores it.
        let rekey = Control::Open(Open {
            encryption: Some(Encryption {
                key_id: "0011223344556677".into(),
                rekey_from: Some("8899aabbccddeeff".into()),
                passphrase: None,
            }),
            ..open
        });
        assert!(String::from_utf8_lossy(&rekey.to_bytes()).contains(
            r#""encryption":{"key_id":"0011223344556677","rekey_from":"8899aabbccddeeff"}"#
        ));
        assert_eq!(Control::decode(&rekey.to_bytes()), Ok(rekey));

        let absent = Control::Config(Config::default()).to_bytes();
        assert!(!String::from_utf8_lossy(&absent).contains("encryption"));
        let Ok(Control::Config(c)) = Control::decode(&absent) else {
            panic!("a CONFIG decodes");
        };
        assert_eq!(c.encryption, None);
        let plain = Control::Config(Config {
            encryption: Some(None),
            ..Config::default()
        });
        assert!(String::from_utf8_lossy(&plain.to_bytes()).contains(r#""encryption":null"#));
        assert_eq!(Control::decode(&plain.to_bytes()), Ok(plain));
        let sealed = Control::Config(Config {
            encryption: Some(Some(Encryption::key("8899aabbccddeeff".into()))),
            ..Config::default()
        });
        assert!(
            String::from_utf8_lossy(&sealed.to_bytes())
                .contains(r#""encryption":{"key_id":"8899aabbccddeeff"}"#)
        );
        assert_eq!(Control::decode(&sealed.to_bytes()), Ok(sealed));
        // A key id that is no object is refused, not taken for "plaintext".
        let mut bad = vec![code::CONFIG];
        bad.extend_from_slice(
            br#"{"replica_id":"","path":"a/b","version":0,"key_type":"push","encryption":"k"}"#,
        );
        assert!(matches!(
            Control::decode(&bad),
            Err(DecodeError::Invalid(_))
        ));
    }

    /// Each mix of a client's key and a replica's encryption: what is allowed, and
    /// the exit class and words of each refusal.
    #[test]
    fn encryption_mixes_are_refused_before_any_page() {
        use crate::ErrorKind;
        let e = |id: &str| Some(Encryption::key(id.into()));
        let kind = |r: crate::Result<()>| r.map_err(|e| (e.kind(), e.to_string()));
        // Plaintext with plaintext, and a plaintext client of an older server.
        assert!(check_encryption("a/b", None, 3, None).is_ok());
        assert!(check_encryption("a/b", None, 3, Some(&None)).is_ok());
        // A key on a new replica, and on a replica made with the same key.
        assert!(check_encryption("a/b", Some("k1"), 0, Some(&None)).is_ok());
        assert!(check_encryption("a/b", Some("k1"), 4, Some(&e("k1"))).is_ok());
        // A key and a server that did not answer: too old.
        let (k, m) = kind(check_encryption("a/b", Some("k1"), 4, None)).unwrap_err();
        assert_eq!(k, ErrorKind::Protocol);
        assert!(
            m.contains("this server cannot keep an encrypted replica"),
            "{m}"
        );
        // A key on a plaintext replica with versions.
        let (k, m) = kind(check_encryption("a/b", Some("k1"), 4, Some(&None))).unwrap_err();
        assert_eq!(k, ErrorKind::Auth);
        assert!(m.contains("a/b is not encrypted"), "{m}");
        // Another key.
        let (k, m) = kind(check_encryption("a/b", Some("k1"), 4, Some(&e("k2")))).unwrap_err();
        assert_eq!(k, ErrorKind::Auth);
        assert!(
            m.contains("made with key id k2") && m.contains("is k1"),
            "{m}"
        );
        // No key on an encrypted replica.
        let (k, m) = kind(check_encryption("a/b", None, 4, Some(&e("k2")))).unwrap_err();
        assert_eq!(k, ErrorKind::Auth);
        assert!(m.contains("a/b is encrypted (key id k2)"), "{m}");
    }

    /// Several keys given to a pull: the one the version names opens it, and a version
    /// made with none of them is refused naming the id it needs and the ids given.
    #[test]
    fn a_pull_picks_the_key_its_version_names() {
        use crate::ErrorKind;
        let e = |id: &str| Some(Encryption::key(id.into()));
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(pick_key("a/b", &[], 3, Some(&None)).unwrap(), None);
        assert_eq!(
            pick_key("a/b", &ids(&["k1"]), 3, Some(&e("k1"))).unwrap(),
            Some(0)
        );
        assert_eq!(
            pick_key("a/b", &ids(&["k1", "k2"]), 3, Some(&e("k2"))).unwrap(),
            Some(1)
        );
        let err = pick_key("a/b", &ids(&["k1", "k2"]), 3, Some(&e("k3"))).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Auth);
        let m = err.to_string();
        assert!(
            m.contains("version 3 of a/b was made with key id k3") && m.contains("ids k1, k2"),
            "{m}"
        );
        // One key: the refusal names it, as before.
        let m = pick_key("a/b", &ids(&["k1"]), 3, Some(&e("k3")))
            .unwrap_err()
            .to_string();
        assert!(m.contains("is k1"), "{m}");
        // Keys, and a plaintext version: refused, as with one key.
        let err = pick_key("a/b", &ids(&["k1", "k2"]), 3, Some(&None)).unwrap_err();
        assert!(err.to_string().contains("a/b is not encrypted"), "{err}");
    }

    #[test]
    fn commit_message_is_byte_exact_and_bounded() {
        assert_eq!(
            Control::CommitMessage("hi".into()).to_bytes(),
            [0x54, 0, 2, b'h', b'i']
        );
        assert_eq!(Control::Changed(600).to_bytes(), [0x57, 0, 0, 2, 0x58]);
        let mut big = vec![0x54];
        big.extend_from_slice(&4097u16.to_be_bytes());
        big.extend(std::iter::repeat_n(b'a', 4097));
        assert!(matches!(
            Control::decode(&big),
            Err(DecodeError::Invalid(_))
        ));
        assert!(matches!(
            Control::decode(&[0x54, 0, 5, b'a']),
            Err(DecodeError::Truncated(_))
        ));
        assert!(matches!(
            Control::decode(&[0x50, b'{']),
            Err(DecodeError::Invalid(_))
        ));
        assert!(matches!(
            Control::decode(&[0x01]),
            Err(DecodeError::UnknownType(1))
        ));
        assert!(matches!(
            Control::decode(&[0x53, 0]),
            Err(DecodeError::Trailing(..))
        ));
    }

    #[test]
    fn a_passphrase_salt_round_trips_and_a_bad_one_is_refused() {
        let salted = crate::crypt::PassphraseSalt {
            salt: [0xab; crate::crypt::SALT_BYTES],
            cost: crate::crypt::PassphraseCost::default(),
        };
        let of = |s: &crate::crypt::PassphraseSalt| {
            Passphrase::new(&s.salt, s.cost.memory_kib, s.cost.passes, s.cost.lanes)
        };
        let checked = |p: &Passphrase| {
            crate::crypt::PassphraseSalt::from_wire("a/b", p.salt_bytes().as_deref(), p.cost())
        };
        let wire = of(&salted);
        assert_eq!(wire.salt, "ab".repeat(16));
        assert_eq!(checked(&wire).unwrap(), salted);
        // An older server's CONFIG has no `passphrase`; a new one's says null or the salt.
        let config: Config =
            serde_json::from_str(r#"{"replica_id":"","path":"a/b","version":0,"key_type":"pull"}"#)
                .unwrap();
        assert_eq!(config.passphrase, None);
        let config: Config = serde_json::from_str(
            r#"{"replica_id":"","path":"a/b","version":0,"key_type":"pull","passphrase":null}"#,
        )
        .unwrap();
        assert_eq!(config.passphrase, Some(None));
        for bad in [
            Passphrase {
                salt: "ab".repeat(15),
                ..wire.clone()
            },
            Passphrase {
                salt: "zz".repeat(16),
                ..wire.clone()
            },
            Passphrase {
                memory_kib: 8 * 1024 * 1024,
                ..wire.clone()
            },
            Passphrase {
                lanes: 0,
                ..wire.clone()
            },
        ] {
            assert_eq!(
                checked(&bad).unwrap_err().kind(),
                crate::ErrorKind::Protocol
            );
        }
    }
}
