//! Finding a store's replicas, and the one row a listing needs of each.
//!
//! A listing is cheap on purpose (a dashboard asks for it every few seconds): it lists
//! the directories under `replicas/` and reads one small row per replica file, the
//! latest version's, with the version count. It never reads a manifest or a page, and
//! changes nothing (`scrub`, which walks the same files, also cleans what crashed
//! pushes left; a listing leaves that to the pushes and pulls that open a directory).

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension};

use super::ReplicaPath;
use super::replica::{
    VERSION_COLUMNS, add_digest2, manifest_damage, open_existing, open_peek, remove_leftovers, sql,
    version_row,
};
use crate::store::VersionInfo;
use crate::{Error, Result};

/// A replica's latest version and how many versions it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Latest {
    /// The newest version.
    pub version: VersionInfo,
    /// How many versions the replica has.
    pub count: u64,
}

/// Collects the replica files (`*.sqlferry`, not the private files of replicas being
/// created) under `dir`, at any depth, in no particular order. With `freed`, each
/// directory is also cleaned of what crashed pushes left, and the bytes freed added.
pub(super) fn replica_files(
    dir: &Path,
    files: &mut Vec<PathBuf>,
    mut freed: Option<&mut u64>,
) -> Result<()> {
    if let Some(freed) = freed.as_deref_mut() {
        *freed += remove_leftovers(dir);
    }
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if kind.is_dir() {
            replica_files(&path, files, freed.as_deref_mut())?;
        } else if kind.is_file()
            && path.extension().is_some_and(|e| e == "sqlferry")
            && !entry.file_name().to_string_lossy().starts_with('.')
        {
            files.push(path);
        }
    }
    Ok(())
}

/// The replica a file under `top` (a store's `replicas/`) holds: its path segments,
/// `.sqlferry` dropped; `None` for a file no valid replica path names.
pub(super) fn replica_of(top: &Path, file: &Path) -> Option<ReplicaPath> {
    let rel = file.strip_prefix(top).ok()?.to_str()?;
    ReplicaPath::parse(rel.strip_suffix(".sqlferry")?).ok()
}

/// Every replica whose file is under the store directory `root`, in path order. A
/// store with no `replicas/` yet has none; a `root` that is not a directory is
/// `NotFound`.
pub(super) fn replicas(root: &Path) -> Result<Vec<ReplicaPath>> {
    let top = root.join("replicas");
    if !top.is_dir() {
        if root.is_dir() {
            return Ok(Vec::new());
        }
        return Err(Error::NotFound(format!(
            "{} is not a store directory",
            root.display()
        )));
    }
    let mut files = Vec::new();
    replica_files(&top, &mut files, None)?;
    let mut replicas: Vec<ReplicaPath> = files.iter().filter_map(|f| replica_of(&top, f)).collect();
    replicas.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    Ok(replicas)
}

/// The latest version of the replica in `file` and its version count, in one query;
/// `None` when the file does not exist or holds no version yet.
pub(super) fn latest(file: &Path, replica: &ReplicaPath) -> Result<Option<Latest>> {
    let conn = match open_existing(file, replica) {
        Ok(conn) => conn,
        Err(Error::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut latest = conn
        .query_row(
            &format!(
                "SELECT {VERSION_COLUMNS}, (SELECT count(*) FROM versions)
             FROM versions ORDER BY number DESC LIMIT 1"
            ),
            [],
            |r| {
                Ok(Latest {
                    version: version_row(r)?,
                    count: r.get::<_, i64>(9)? as u64,
                })
            },
        )
        .optional()
        .map_err(sql(file))?;
    if let Some(l) = &mut latest {
        add_digest2(&conn, file, &mut l.version)?;
    }
    Ok(latest)
}

/// The latest version of the replica in `file` when the replica records no damaged
/// stored page (a push would resend those pages: [`super::replica`]'s `bad_pages`);
/// `None` when it has no version or records one, or its manifest is damaged. A few
/// small queries: the manifest's rows and its chunks' lengths, no chunk read.
///
/// With `peek`, through [`open_peek`] first (which writes nothing), else as any reader.
pub(super) fn latest_sound(
    file: &Path,
    replica: &ReplicaPath,
    peek: bool,
) -> Result<Option<VersionInfo>> {
    let first = match peek {
        true => open_peek(file, replica),
        false => open_existing(file, replica),
    };
    match first.and_then(|conn| latest_sound_on(&conn, file)) {
        Ok(latest) => Ok(latest),
        Err(Error::NotFound(_)) => Ok(None),
        Err(e) if !peek => Err(e),
        Err(e) => {
            // A WAL without its -shm (or none yet: a replica no connection read since
            // it was made), say: the usual reader, which makes them.
            tracing::debug!(file = %file.display(), error = %e, "a look that writes nothing failed; reading as usual");
            match open_existing(file, replica) {
                Ok(conn) => latest_sound_on(&conn, file),
                Err(Error::NotFound(_)) => Ok(None),
                Err(e) => Err(e),
            }
        }
    }
}

/// [`latest_sound`] on an open connection, in one read transaction.
fn latest_sound_on(conn: &Connection, file: &Path) -> Result<Option<VersionInfo>> {
    let tx = conn.unchecked_transaction().map_err(sql(file))?;
    let damaged: bool = tx
        .query_row(
            "SELECT EXISTS(SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'bad_pages')",
            [],
            |r| r.get(0),
        )
        .map_err(sql(file))?
        && tx
            .query_row("SELECT EXISTS(SELECT 1 FROM bad_pages)", [], |r| r.get(0))
            .map_err(sql(file))?;
    if damaged {
        return Ok(None);
    }
    let latest = tx
        .query_row(
            &format!("SELECT {VERSION_COLUMNS} FROM versions ORDER BY number DESC LIMIT 1"),
            [],
            version_row,
        )
        .optional()
        .map_err(sql(file))?;
    // A latest version whose manifest is damaged is not one to stand on either: the
    // next push makes a whole new one.
    match latest {
        Some(v) if manifest_damage(&tx, file, v.number, v.page_count)?.is_some() => Ok(None),
        Some(mut v) => {
            add_digest2(&tx, file, &mut v)?;
            Ok(Some(v))
        }
        None => Ok(None),
    }
}
