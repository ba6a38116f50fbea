//! A `[[directory]]` unit: every SQLite database whose name matches a glob in one
//! directory, each pushed to `NAMESPACE/<file name>` and/or copied to
//! `COPY_TO/<file name>`.
//!
//! The scanner lists the directory at the start, after file events in it (one shared
//! watch for the directory, the same the databases' own watchers use), and every
//! [`RESCAN`] as a safety net. A file counts once it is a regular file whose first 16
//! bytes are SQLite's header (`SQLite format 3\0`); `-wal`, `-shm`, `-journal` and
//! sidecar files never do. Each database found gets its push units; a database that
//! leaves the directory has its units stopped at once (nothing is left to push from a
//! file that is gone).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::config::{Target, Unit, glob_matches};
use super::{Note, Shared, Units};
use crate::shutdown::Shutdown;
use crate::subscribe::plan::Ended;
use crate::subscribe::watch::DirWatch;
use crate::{Error, Result};

/// How often the directory is listed without an event.
pub const RESCAN: Duration = Duration::from_secs(60);

/// After an event, how long the directory must stay quiet before it is listed (a new
/// database is a burst of events: the file, its `-wal`, its first commits).
const SETTLE: Duration = Duration::from_millis(200);

/// Files that belong to a database without being one.
const NOT_DATABASES: [&str; 4] = ["-wal", "-shm", "-journal", "-sqlferry"];

/// Runs the directory unit `unit` until `stop`.
pub(super) async fn run(unit: &Unit, stop: &Shutdown, shared: &Shared) -> Result<Ended> {
    let Unit::Directory {
        path,
        glob,
        namespace,
        store,
        copy_to,
        when,
        message,
    } = unit
    else {
        unreachable!("a directory unit");
    };
    let dir = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::canonicalize(&path).map_err(|e| Error::io(&path, e))
        })
        .await??
    };
    if !dir.is_dir() {
        return Err(Error::Usage(format!("{}: not a directory", dir.display())));
    }
    let event = Arc::new(tokio::sync::Notify::new());
    let _watch = {
        let (dir, event) = (dir.clone(), Arc::clone(&event));
        tokio::task::spawn_blocking(move || {
            DirWatch::start(&dir, None, Arc::new(move || event.notify_one()))
        })
        .await??
    };
    let label = unit.label();
    let mut children = Units::new(shared.clone(), true);
    // The databases found by the last scan (their units run).
    let mut held: HashSet<PathBuf> = HashSet::new();
    loop {
        let found = {
            let (dir, glob, seen) = (dir.clone(), glob.clone(), held.clone());
            tokio::task::spawn_blocking(move || scan(&dir, &glob, &seen)).await?
        };
        match found {
            Ok(found) => {
                let mut wanted = BTreeMap::new();
                for database in &found {
                    let name = database.file_name().expect("listed files have names");
                    let mut targets = Vec::new();
                    if let Some(ns) = namespace {
                        let replica = format!("{ns}/{}", name.to_string_lossy());
                        match crate::store::ReplicaPath::parse(&replica) {
                            Ok(replica) => targets.push(Target::Replica {
                                replica,
                                store: store.clone(),
                            }),
                            Err(e) => {
                                // Once per file, not per scan.
                                if !held.contains(database) {
                                    tracing::warn!("{}: {e}", database.display());
                                }
                                continue;
                            }
                        }
                    }
                    if let Some(copies) = copy_to {
                        targets.push(Target::File(copies.join(name)));
                    }
                    for target in targets {
                        let unit = Unit::Push {
                            database: database.clone(),
                            target,
                            when: *when,
                            message: message.clone(),
                        };
                        wanted.insert(unit.id(), unit);
                    }
                }
                let now: HashSet<PathBuf> = found.into_iter().collect();
                for gone in held.difference(&now) {
                    (shared.report)(&label, Note::Dropped(gone.clone()));
                }
                let mut new: Vec<&PathBuf> = now.difference(&held).collect();
                new.sort();
                for database in new {
                    (shared.report)(&label, Note::Found(database.clone()));
                }
                held = now;
                children.apply(wanted, "the database left the directory");
            }
            // Listing failed (the directory was removed, permissions): the supervisor
            // starts the unit again later.
            Err(e) => {
                let _ = children.stop_all(stop).await;
                return Err(e);
            }
        }
        tokio::select! {
            () = event.notified() => {
                // Let the burst settle; a stop request cuts it short.
                tokio::select! {
                    () = tokio::time::sleep(SETTLE) => {}
                    () = stop.requested() => break,
                }
            }
            () = tokio::time::sleep(RESCAN) => {}
            () = stop.requested() => break,
        }
    }
    let stopped = children.stop_all(stop).await;
    match stopped.unpushed.into_iter().next() {
        Some((_, e)) => Ok(Ended::Unpushed(e)),
        None if stop.is_forced() => Ok(Ended::Interrupted),
        None => Ok(Ended::Shutdown),
    }
}

/// The databases in `dir` whose names match `glob`, sorted; `known` were databases at
/// the last scan (their header is not read again).
fn scan(dir: &Path, glob: &str, known: &HashSet<PathBuf>) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(text) = name.to_str() else { continue };
        if NOT_DATABASES.iter().any(|s| text.ends_with(s))
            || text.starts_with('.')
            || !glob_matches(glob, text)
        {
            continue;
        }
        let path = entry.path();
        // Follows a symbolic link: a link to a database is a database.
        if !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            continue;
        }
        if known.contains(&path) || is_sqlite(&path) {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// Whether `path` starts with SQLite's header (a new, still empty file does not yet).
fn is_sqlite(path: &Path) -> bool {
    use std::io::Read;
    let mut header = [0u8; 16];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .is_ok_and(|()| &header == b"SQLite format 3\0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scan_takes_databases_and_leaves_their_files_and_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let db = |name: &str| {
            let c = rusqlite::Connection::open(dir.path().join(name)).unwrap();
            c.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(x);")
                .unwrap();
            c
        };
        let _a = db("a.db");
        let _b = db("b.db");
        let _other = db("c.sqlite");
        std::fs::write(dir.path().join("empty.db"), b"").unwrap();
        std::fs::write(dir.path().join("notes.db"), b"not a database at all").unwrap();
        std::fs::write(dir.path().join("a.db-sqlferry"), b"x").unwrap();
        std::fs::create_dir(dir.path().join("sub.db")).unwrap();
        let found = scan(dir.path(), "*.db", &HashSet::new()).unwrap();
        let names: Vec<_> = found
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        // a.db-wal and a.db-shm exist (WAL mode, connection open) and are not taken.
        assert!(dir.path().join("a.db-wal").exists());
        assert_eq!(names, ["a.db", "b.db"]);
    }
}
