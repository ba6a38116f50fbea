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
