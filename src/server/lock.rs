//! One server per data directory: `DATA/serve.lock`, held with an exclusive `flock`
//! for the life of the process; or several, all sharing one PostgreSQL metadata store
//! (`serve --meta`), each holding it shared ([`DataLock::acquire_shared`]).
//!
//! Two servers on one directory without a shared metadata store would each believe
//! they own `server.db` and the replicas (their hubs would not hear each other's
//! pushes, and each would mint keys the other knows nothing of), so the second refuses
//! at once, naming the directory and the first server's PID. Servers sharing
//! PostgreSQL share keys and notifications, and the store itself is safe for several
//! processes (its own `flock`s and SQLite's locks, as the embedded store used by
//! several clients at once is); a server without `--meta` still refuses while they
//! run, and they refuse while it runs.
//!
//! Invariants:
//! - The lock is the kernel's: it goes away with the process, however it ends (a
//!   SIGKILL leaves the file, never a stale lock).
//! - The PID in the file is only a hint for the message; the lock decides.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The lock file's name in the data directory.
pub const LOCK_FILE: &str = "serve.lock";

/// The held lock of a data directory; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DataLock {
    // Held open: closing it releases the lock.
    _file: File,
    path: PathBuf,
}

impl DataLock {
    /// Takes the lock of `data` (which must exist), or fails with [`Error::InUse`]
    /// naming the directory and the PID of the server holding it.
    pub fn acquire(data: &Path) -> Result<DataLock> {
        DataLock::take(data, false)
    }

    /// Takes the lock of `data` shared, for a server whose metadata is in PostgreSQL;
    /// fails with [`Error::InUse`] while a server without `--meta` holds it. When no
    /// other server runs (the lock could be taken exclusively first), `alone` runs
    /// before the lock is shared: for what only a sole owner may clean up.
    pub fn acquire_shared(data: &Path, alone: impl FnOnce()) -> Result<DataLock> {
        if let Ok(sole) = DataLock::acquire(data) {
            alone();
            drop(sole);
        }
        DataLock::take(data, true)
    }

    fn take(data: &Path, shared: bool) -> Result<DataLock> {
        let path = data.join(LOCK_FILE);
        // Not truncated on open: the holder's PID must stay readable for the message.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let locked = match shared {
            false => file.try_lock(),
            true => file.try_lock_shared(),
        };
        match locked {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let pid = text.trim().parse::<u32>().ok();
                let (holder, what) = match shared {
                    false => (
                        "another sqlferry serve",
                        "stop it first, or pass another --data",
                    ),
                    true => (
                        "a sqlferry serve without --meta",
                        "stop it first (servers share a data directory only when each has the same --meta)",
                    ),
                };
                let holder = match pid {
                    Some(pid) => format!("{holder} (PID {pid})"),
                    None => holder.to_owned(),
                };
                let alone = if shared { " alone" } else { "" };
                return Err(Error::InUse(format!(
                    "{holder} is using the data directory {}{alone}; {what}",
                    data.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        // Best effort: on a full disk the PID may not fit, and the lock holds anyway.
        // Shared, a hint only: the last server started wins it.
        let _ = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        Ok(DataLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = DataLock::acquire(dir.path()).expect("first");
        let e = DataLock::acquire(dir.path()).expect_err("second");
        let text = e.to_string();
        assert!(
            text.contains(&format!("(PID {})", std::process::id())),
            "{text}"
        );
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        assert_eq!(e.kind(), crate::ErrorKind::Busy);
        drop(first);
        DataLock::acquire(dir.path()).expect("free again");
    }

    #[test]
    fn shared_locks_coexist_and_keep_a_sole_server_out() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cleaned = 0;
        let first = DataLock::acquire_shared(dir.path(), || cleaned += 1).expect("first");
        let second = DataLock::acquire_shared(dir.path(), || cleaned += 1).expect("second");
        assert_eq!(cleaned, 1, "only a server on its own cleans up");
        let e = DataLock::acquire(dir.path()).expect_err("a sole server refused");
        assert_eq!(e.kind(), crate::ErrorKind::Busy);
        drop((first, second));
        let sole = DataLock::acquire(dir.path()).expect("free again");
        let e = DataLock::acquire_shared(dir.path(), || {}).expect_err("shared refused");
        assert!(e.to_string().contains("without --meta"), "{e}");
        drop(sole);
    }
}
