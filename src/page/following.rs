//! A push subscriber following its database's WAL between pushes, so that checkpoints
//! and resets between two pushes do not cost the next one a full read.
//!
//! A push reads only the pages the WAL names since the position its WAL hash list
//! ([`super::fastcache`]) is true at. Alone, it can follow the WAL across at most one
//! reset, and only while the new generation has not written over frames of the old one
//! it never saw ([`wal::walk_since`]). A [`Following`] does the same walk on every
//! change the subscriber's watcher notices (a short read of frame headers, no SQLite
//! lock, no transaction held between walks), and keeps the pages the walks named since
//! the list's position, with the WAL position it reached. By the time of the push it
//! has usually walked every generation in between while its frames were still there;
//! the push then walks only from that position ([`since`]).
//!
//! Soundness: the pages kept are those of every frame walked from the list's position
//! on, each walk starting where the last one ended (a commit frame, which is never
//! written over within its generation). A walk that cannot be sure (see
//! [`wal::walk_since`]) marks the follower lost: it keeps nothing and offers nothing
//! until a push moves the list on, and that push walks the WAL itself or reads every
//! page. The kept pages are bounded by [`MAX_PAGES`] (past it: lost), so memory does
//! not grow with the database.
//!
//! Followers live in a table of this process, one per database file (by canonical
//! path), shared by every [`Following`] of it and consulted by every
//! [`super::Snapshot`] of it whose hash list lives in the same directory.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use super::fastcache::{FileId, sealed_stamp};
use super::wal::{self, Position};

/// The most changed pages a follower keeps (1 MiB or so of memory); past it the next
/// push would read too much to follow the WAL anyway.
pub const MAX_PAGES: usize = 1 << 18;

/// What is known of one database's WAL since its hash list's position.
#[derive(Debug)]
struct State {
    id: FileId,
    page_size: u32,
    /// The hash list's position the pages count from.
    from: Position,
    /// Where the last walk ended.
    at: Position,
    /// The pages named since `from` (empty when lost).
    pages: BTreeSet<u32>,
    /// A walk could not be sure: nothing is offered until the list moves on.
    lost: bool,
}

#[derive(Debug)]
struct Entry {
    /// Where the hash list lives.
    dir: PathBuf,
    /// Live [`Following`]s of this database.
    users: usize,
    state: Option<State>,
}

fn table() -> MutexGuard<'static, HashMap<PathBuf, Entry>> {
    static TABLE: OnceLock<Mutex<HashMap<PathBuf, Entry>>> = OnceLock::new();
    TABLE
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// A subscriber's hold on the following of one database: while it lives, each
/// [`Following::advance`] walks the WAL on, and pushes of the database use what was
/// walked.
#[derive(Debug)]
pub struct Following {
    key: PathBuf,
}

impl Following {
    /// Starts following `db`, whose hash lists live in the default cache directory.
    /// `None` when there is no such directory or `db` cannot be resolved: pushes then
    /// work as without a follower.
    pub fn start(db: &Path) -> Option<Following> {
        Self::start_in(db, super::hashcache::default_dir()?)
    }

    /// Starts following `db`, whose hash lists live in `dir`.
    pub fn start_in(db: &Path, dir: PathBuf) -> Option<Following> {
        let key = std::fs::canonicalize(db).ok()?;
        let mut table = table();
        let entry = table.entry(key.clone()).or_insert(Entry {
            dir: dir.clone(),
            users: 0,
            state: None,
        });
        if entry.dir != dir {
            // Another directory's list: start over with this one.
            entry.dir = dir;
            entry.state = None;
        }
        entry.users += 1;
        Some(Following { key })
    }

    /// Walks the WAL from where the last walk ended: a few reads of frame headers.
    pub fn advance(&self) {
        if let Some(entry) = table().get_mut(&self.key) {
            advance(&self.key, entry);
        }
    }

    /// How many changed pages are kept (`None`: nothing is followed, or lost), for
    /// tests and logs.
    pub fn pages_kept(&self) -> Option<usize> {
        let table = table();
        let state = table.get(&self.key)?.state.as_ref()?;
        (!state.lost).then_some(state.pages.len())
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        let mut table = table();
        if let Some(entry) = table.get_mut(&self.key) {
            entry.users -= 1;
            if entry.users == 0 {
                table.remove(&self.key);
            }
        }
    }
}

fn advance(db: &Path, entry: &mut Entry) {
    let Some(stamp) = sealed_stamp(&entry.dir, db) else {
        // No list yet, or one being updated: the next walk starts from the new one.
        entry.state = None;
        return;
    };
    let id = FileId::of_path(db);
    if id != Some(stamp.id) {
        entry.state = None;
        return;
    }
    let state = match &mut entry.state {
        Some(s) if s.from == stamp.position && s.id == stamp.id => s,
        state => state.insert(State {
            id: stamp.id,
            page_size: stamp.page_size,
            from: stamp.position,
            at: stamp.position,
            pages: BTreeSet::new(),
            lost: false,
        }),
    };
    if state.lost {
        return;
    }
    match wal::walk_since(db, state.page_size, state.at) {
        Some(walk) => {
            if walk.resume.salt != state.at.salt {
                tracing::debug!(path = %db.display(), "follower crossed a WAL reset");
            }
            state.pages.extend(walk.pages);
            state.at = walk.resume;
            if state.pages.len() > MAX_PAGES {
                state.lost = true;
            }
        }
        None => {
            tracing::debug!(path = %db.display(), "follower lost the WAL: the next push reads more");
            state.lost = true;
        }
    }
    if state.lost {
        state.pages = BTreeSet::new();
    }
}

/// For a push of `db` whose hash list in `dir` is true at `from`: the pages a follower
/// saw named since `from`, and the position its walks reached (the push walks on from
/// there). `None` when no follower of `db` followed the WAL from `from` without losing
/// track.
pub(super) fn since(
    dir: &Path,
    db: &Path,
    id: FileId,
    from: Position,
) -> Option<(Vec<u32>, Position)> {
    let key = std::fs::canonicalize(db).ok()?;
    let mut table = table();
    let entry = table.get_mut(&key)?;
    if entry.dir != dir {
        return None;
    }
    // Up to date first: the walk from here to now is the follower's own.
    advance(&key, entry);
    let state = entry.state.as_ref()?;
    (!state.lost && state.from == from && state.id == id)
        .then(|| (state.pages.iter().copied().collect(), state.at))
}
