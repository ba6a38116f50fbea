//! One server per data directory: `DATA/serve.lock`, held with an exclusive `flock`
//! for the life of the process.
//!
//! Two servers on one directory would each believe they own `server.db` and the
//! replicas (their hubs would not hear each other's pushes, and each would mint keys
//! the other knows nothing of), so the second refuses at once, naming the directory
//! and the first server's PID.
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
        let path = data.join(LOCK_FILE);
        // Not truncated on open: the holder's PID must stay readable for the message.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match text.trim().parse::<u32>() {
                    Ok(pid) => format!("another sqlferry serve (PID {pid})"),
                    Err(_) => "another sqlferry serve".to_owned(),
                };
                return Err(Error::InUse(format!(
                    "{holder} is using the data directory {}; stop it first, or pass another --data",
                    data.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        // Best effort: on a full disk the PID may not fit, and the lock holds anyway.
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
}
