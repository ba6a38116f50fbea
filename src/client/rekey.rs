//! Rekey: the next version of an encrypted replica, made under a new key (`sqlferry
//! rekey`, docs/security.md). The latest version is pulled, opened with the key it was
//! made with, into a scratch file (nothing the user named is written, nothing recorded
//! in the local history), and pushed from there as the next version, sealed with the new
//! key and marked as a rekey from the old key's id: the one push a store lets change a
//! replica's key id.
//!
//! Every page identity changes with the key, so the new version shares no page with the
//! old ones: a rekey sends the whole database. Old versions are left as they are, sealed
//! with the old key (retention removes them, not a rekey). A rekey that fails or is
//! stopped at any point leaves the replica as it was: the store commits the new version
//! only when all of it has arrived and its digest matches (invariant 1).

use std::sync::Arc;

use crate::crypt::{EncryptionKey, KeyId};
use crate::engine::{Progress, SyncStats};
use crate::protocol::control::VersionInfo;
use crate::remote::{PushRequest, no_progress};
use crate::store::{PushOptions, Selector};
use crate::{Error, Result};

use super::{ReplicaSource, Scratch};

/// What a rekey did.
#[derive(Debug, Clone)]
pub struct RekeyOutcome {
    /// The version that was re-sealed (the latest before the rekey).
    pub from_version: u64,
    /// The key id it was made with.
    pub from_key: KeyId,
    /// The new version, under the new key.
    pub version: u64,
    /// The new key's id.
    pub key: KeyId,
    /// The push's figures (every page is sent: no identity is shared across keys).
    pub stats: SyncStats,
}

/// Makes the next version of `source`'s replica under `new_key`: its latest version,
/// opened with the key of `source.encryption` whose id it names, sealed again with
/// `new_key`. `message` is the new version's commit message (`None`: "rekey from key id
/// OLD to NEW").
///
/// Refused before anything is sent: a replica with no version (not found), a plaintext
/// one (turning encryption on is not a rekey), a latest version already under
/// `new_key`, and one whose key is not among those given (auth, naming the ids).
pub async fn rekey(
    source: &ReplicaSource,
    new_key: &EncryptionKey,
    message: Option<String>,
    progress: Arc<dyn Progress>,
) -> Result<RekeyOutcome> {
    let replica = &source.replica;
    let old_keys = source.encryption.as_ref().ok_or_else(|| {
        Error::Usage(format!(
            "a rekey of {replica} needs the key its latest version was made with \
             (--encryption-key-file, or SQLFERRY_ENCRYPTION_KEY); nothing was sent"
        ))
    })?;
    let versions = source
        .server
        .versions(replica, source.key.as_deref())
        .await?;
    // A merge's candidate is never the latest version.
    let latest = versions
        .iter()
        .rev()
        .find(|v| v.merged_into.is_none())
        .ok_or_else(|| {
            Error::NotFound(format!(
                "{replica} has no version to rekey; nothing was sent"
            ))
        })?;
    let new_id = new_key.id().to_string();
    let old_key = match latest.encryption.as_deref() {
        None => {
            return Err(Error::Usage(format!(
                "{replica} is not encrypted: a rekey replaces the key of an encrypted \
                 replica, and a replica is encrypted or not from its first version on \
                 (pull it and push it with --encryption-key-file to a new replica); \
                 nothing was sent"
            )));
        }
        Some(id) if id == new_id => {
            return Err(Error::Usage(format!(
                "version {} of {replica} is already under key id {id}: a rekey needs \
                 another key (sqlferry keygen FILE writes one); nothing was sent",
                latest.number
            )));
        }
        Some(id) => old_keys.find(id).ok_or_else(|| {
            Error::Auth(format!(
                "version {} of {replica} was made with key id {id}, and the keys given \
                 have ids {}: give its key file (--encryption-key-file); nothing was sent",
                latest.number,
                old_keys.ids().join(", ")
            ))
        })?,
    };
    let from_key = old_key.id();

    // The latest version, opened with its key, into a scratch file removed on drop.
    let scratch = Scratch::new()?;
    let path = scratch.path("rekey.db");
    let pulled = source
        .server
        .pull(
            replica,
            Selector::Number(latest.number),
            &path,
            (
                source.key.as_deref(),
                Some(&crate::crypt::Keys::one(old_key.clone())),
            ),
            no_progress(),
        )
        .await
        .map_err(|e| e.context(format!("pull {replica}@{} failed", latest.number)))?;

    // Pushed as the next version, sealed with the new key, marked as a rekey from the
    // old key's id: based on the version pulled, so a replica that moved on meanwhile
    // is a conflict and nothing is stored.
    let request = PushRequest {
        options: PushOptions {
            base: Some(pulled.version),
            force: false,
            message: message
                .unwrap_or_else(|| format!("rekey from key id {from_key} to {}", new_key.id())),
            client_id: crate::remote::client_id(),
            key_id: String::new(),
            encryption: Some(new_id),
            rekey_from: Some(from_key.to_string()),
            passphrase: new_key.passphrase().copied(),
        },
        key: source.key.clone(),
        encryption: Some(new_key.clone()),
        ..PushRequest::default()
    };
    let pushed = source
        .server
        .push(&path, replica, request, progress)
        .await
        .map_err(|e| {
            e.context(format!(
                "push of {replica}@{} under key id {} failed",
                pulled.version,
                new_key.id()
            ))
        })?;
    drop(scratch);
    Ok(RekeyOutcome {
        from_version: pulled.version,
        from_key,
        version: pushed.version,
        key: new_key.id(),
        stats: pushed.stats,
    })
}

/// How a replica left a key by a rekey, told by its versions' key ids: for a push
/// refused because its key is not the latest version's, when an earlier version was
/// made with it. What the push is told instead of "another key": when, from which key
/// to which, and to push with the new key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RekeyedAway {
    /// The last version made with the key given.
    pub last: u64,
    /// The first version kept after it, made with another key: the rekey itself when
    /// it is `last + 1` (else the rekey is one of the versions removed between them).
    pub rekey: u64,
    /// The key id given.
    pub from: String,
    /// The key id `rekey` was made with.
    pub to: String,
    /// The latest version and its key id, when later rekeys moved on from `to`.
    pub latest: Option<(u64, String)>,
}

impl RekeyedAway {
    /// From `versions` (as `versions` lists them, oldest first; removed ones bare):
    /// `None` unless the latest version is encrypted with another key id than `given`
    /// and an earlier kept version was made with `given`.
    pub fn of(versions: &[VersionInfo], given: &str) -> Option<RekeyedAway> {
        let kept: Vec<&VersionInfo> = versions
            .iter()
            .filter(|v| v.merged_into.is_none())
            .collect();
        let latest = kept.last()?;
        let latest_id = latest.encryption.as_deref()?;
        if latest_id == given {
            return None;
        }
        let i = kept
            .iter()
            .rposition(|v| v.encryption.as_deref() == Some(given))?;
        let next = kept[i + 1..].iter().find(|v| v.encryption.is_some())?;
        let to = next.encryption.clone()?;
        Some(RekeyedAway {
            last: kept[i].number,
            rekey: next.number,
            from: given.to_owned(),
            latest: (to != latest_id).then(|| (latest.number, latest_id.to_owned())),
            to,
        })
    }

    /// What a push refused with the key given is told.
    pub fn message(&self, replica: &str) -> String {
        format!(
            "{}: push with the new key file (or passphrase file); nothing was pushed",
            self.what(replica)
        )
    }

    /// What happened, for [`RekeyedAway::message`] and the subscribers' own advice:
    /// "REPLICA was rekeyed at version N from key id A (the key given) to key id B".
    pub fn what(&self, replica: &str) -> String {
        let when = match self.rekey == self.last + 1 {
            true => format!("at version {}", self.rekey),
            false => format!(
                "between versions {} and {} (the versions between were removed)",
                self.last, self.rekey
            ),
        };
        let then = match &self.latest {
            Some((number, id)) => format!(", then to key id {id} (its latest version {number})"),
            None => String::new(),
        };
        format!(
            "{replica} was rekeyed {when} from key id {} (the key given) to key id {}{then}",
            self.from, self.to
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(number: u64, key: Option<&str>) -> VersionInfo {
        let mut v = VersionInfo::bare(number, 0);
        v.encryption = key.map(str::to_owned);
        v
    }

    #[test]
    fn a_key_left_by_a_rekey_is_told_when_and_to_which() {
        let (a, b, c) = ("aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb", "cccccccccccccccc");
        let versions = [v(1, Some(a)), v(2, Some(a)), v(3, Some(b)), v(4, Some(b))];
        let r = RekeyedAway::of(&versions, a).expect("rekeyed away from a");
        assert_eq!(
            (r.last, r.rekey, r.to.as_str(), r.latest.clone()),
            (2, 3, b, None)
        );
        assert_eq!(
            r.message("acme/app.db"),
            format!(
                "acme/app.db was rekeyed at version 3 from key id {a} (the key given) to key \
                 id {b}: push with the new key file (or passphrase file); nothing was pushed"
            )
        );
        // The latest's own key, a key never used, and a plaintext replica: nothing to say.
        assert_eq!(RekeyedAway::of(&versions, b), None);
        assert_eq!(RekeyedAway::of(&versions, c), None);
        assert_eq!(RekeyedAway::of(&[v(1, None), v(2, None)], a), None);
        assert_eq!(RekeyedAway::of(&[], a), None);
        // Removed versions (bare) between: the rekey is somewhere among them.
        let pruned = [v(1, Some(a)), v(2, None), v(3, None), v(4, Some(b))];
        let r = RekeyedAway::of(&pruned, a).expect("rekeyed away from a");
        assert_eq!((r.last, r.rekey), (1, 4));
        assert!(
            r.message("acme/app.db")
                .contains("rekeyed between versions 1 and 4 (the versions between were removed)"),
            "{}",
            r.message("acme/app.db")
        );
        // Two rekeys: a to b, then b to c; a push with a hears both.
        let twice = [v(1, Some(a)), v(2, Some(b)), v(3, Some(c))];
        let r = RekeyedAway::of(&twice, a).expect("rekeyed away from a");
        assert_eq!((r.rekey, r.to.as_str()), (2, b));
        assert!(
            r.message("acme/app.db").contains(&format!(
                "at version 2 from key id {a} (the key given) to key id {b}, then to key id \
                 {c} (its latest version 3): push"
            )),
            "{}",
            r.message("acme/app.db")
        );
    }
}
