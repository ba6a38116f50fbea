//! Handles of database files, kept open for as long as this process may hold SQLite
//! connections to them.
//!
//! SQLite locks with POSIX record locks, and a process loses every such lock it holds
//! on a file as soon as it closes *any* handle of that file. SQLite's own handles are
//! safe (it defers their close while the process holds locks), but a handle sqlferry
//! opens itself (to read a header, to scan pages fast) and closes would silently drop
//! the locks of every connection in the process to that file: a watcher's idle
//! connection in WAL mode would then let another process remove the WAL it still uses,
//! and go blind to every later commit.
//!
//! So every handle of a database file sqlferry opens itself comes from here, and is
//! closed only when the file is gone (deleted or replaced), or when more than
//! [`MAX_KEPT`] files were opened by this process (a test suite, not the CLI).

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The most handles kept; past this, handles are not kept (and closed after use).
const MAX_KEPT: usize = 256;

/// Device, inode, and whether the handle may write.
type Key = (u64, u64, bool);

/// A kept handle and the path it was opened by (to notice when the file is gone).
type Kept = HashMap<Key, (PathBuf, Arc<File>)>;

static KEPT: Mutex<Option<Kept>> = Mutex::new(None);

/// A handle of the database file at `path`, open for reading (and writing if
/// `write`), shared with every other user of the same file in this process.
pub(crate) fn open(path: &Path, write: bool) -> std::io::Result<Arc<File>> {
    // Held while opening, so that two threads never both open (and one then close)
    // a handle of the same file.
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    let kept = kept.get_or_insert_with(HashMap::new);
    if let Ok(meta) = std::fs::metadata(path)
        && let Some((_, handle)) = kept.get(&(meta.dev(), meta.ino(), write))
    {
        return Ok(handle.clone());
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)?;
    let meta = file.metadata()?;
    // Files that are gone no longer need their handles.
    kept.retain(|&(dev, ino, _), (p, _)| {
        std::fs::metadata(p).is_ok_and(|m| m.dev() == dev && m.ino() == ino)
    });
    let handle = Arc::new(file);
    if kept.len() < MAX_KEPT {
        kept.insert(
            (meta.dev(), meta.ino(), write),
            (path.to_owned(), handle.clone()),
        );
    }
    Ok(handle)
}
