//! The local record of syncs: for each local database, the server, replica and version
//! it was last pushed or pulled as. A push uses it as its base version, so a replica
//! that moved meanwhile is detected (VERSION_CONFLICT) instead of overwritten.
//!
//! One small JSON file per database under `$XDG_STATE_HOME/sqlferry/history/`, written
//! atomically (temporary file + rename), keyed by the database's absolute path.

use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

/// The last sync of one local database.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LastSync {
    /// The local database, absolute.
    pub database: PathBuf,
    /// The server URL.
    pub server: String,
    /// The replica path.
    pub replica: String,
    /// The version the local database held after the sync.
    pub version: u64,
    /// That version's digest.
    pub digest: String,
    /// When, seconds since the Unix epoch.
    pub at: i64,
}

fn record_path(database: &Path) -> Option<PathBuf> {
    let abs = std::path::absolute(database).ok()?;
    let key = Sha256::digest(abs.as_os_str().as_encoded_bytes());
    let name = crate::page::hex(&key.into())[..32].to_owned();
    Some(
        crate::config::state_dir()?
            .join("history")
            .join(format!("{name}.json")),
    )
}

/// The last sync of `database`, if one was recorded.
pub fn last(database: &Path) -> Option<LastSync> {
    let text = std::fs::read_to_string(record_path(database)?).ok()?;
    serde_json::from_str(&text).ok()
}

/// Records a sync of `database`. A failure to record is logged, not fatal: the sync
/// itself succeeded, and the next push will just not know its base.
pub fn record(sync: &LastSync) {
    let Some(path) = record_path(&sync.database) else {
        return;
    };
    let result = (|| -> std::io::Result<()> {
        let dir = path.parent().expect("the record path has a directory");
        std::fs::create_dir_all(dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        serde_json::to_writer_pretty(&mut tmp, sync)?;
        tmp.persist(&path).map_err(|e| e.error)?;
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(error = %e, path = %path.display(), "could not record the sync");
    }
}

/// Seconds since the Unix epoch, now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
