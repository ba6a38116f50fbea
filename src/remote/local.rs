//! Notifications between processes that share an embedded store, without a server.
//!
//! Each running subscriber of a replica listens on a Unix socket in the replica's
//! directory under `<store>/.subscribers/`. A push that makes a new version, and
//! `sqlferry sync-now`, connect to every socket there and write one line:
//! `version N` or `sync-now`. A socket nobody listens on any more (its process was
//! killed) refuses the connection and is removed. The file system's permissions are the
//! access control, as for the store itself.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// What one line on a subscriber's socket says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// Version N of the replica was committed.
    Version(u64),
    /// Sync now.
    SyncNow,
}

impl Message {
    fn line(self) -> String {
        match self {
            Message::Version(n) => format!("version {n}\n"),
            Message::SyncNow => "sync-now\n".into(),
        }
    }

    /// Parses one line; `None` for anything else.
    pub fn parse(line: &str) -> Option<Message> {
        match line.trim_end().split_once(' ') {
            Some(("version", n)) => n.parse().ok().map(Message::Version),
            None if line.trim_end() == "sync-now" => Some(Message::SyncNow),
            _ => None,
        }
    }
}

/// Unix socket paths are limited to about 104 bytes: past this, the directory moves to
/// the temporary directory under a name derived from the long one.
const MAX_SOCKET_DIR: usize = 80;

/// The directory where `replica`'s subscribers on the store at `root` listen.
pub fn socket_dir(root: &Path, replica: &str) -> PathBuf {
    let key = crate::page::hex(&Sha256::digest(replica.as_bytes()).into());
    let dir = root.join(".subscribers").join(&key[..16]);
    if dir.as_os_str().len() <= MAX_SOCKET_DIR {
        return dir;
    }
    let mut long = Sha256::new();
    long.update(root.as_os_str().as_encoded_bytes());
    long.update([0]);
    long.update(replica.as_bytes());
    let key = crate::page::hex(&long.finalize().into());
    std::env::temp_dir().join(format!("sqlferry-{}", &key[..24]))
}

/// A subscriber's socket: listening until dropped, then removed.
#[derive(Debug)]
pub struct Listener {
    /// The socket.
    pub socket: tokio::net::UnixListener,
    path: PathBuf,
}

impl Listener {
    /// Listens for `replica`'s notifications on the store at `root`. Must be called
    /// inside a tokio runtime.
    pub fn bind(root: &Path, replica: &str) -> Result<Listener> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = socket_dir(root, replica);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Error::io(&dir, e))?;
        let mut id = [0u8; 4];
        getrandom::fill(&mut id).map_err(|e| Error::io(&dir, std::io::Error::other(e)))?;
        let path = dir.join(format!(
            "{}-{:08x}.sock",
            std::process::id(),
            u32::from_be_bytes(id)
        ));
        let socket = tokio::net::UnixListener::bind(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Listener { socket, path })
    }

    /// The next message; connections that say nothing useful are skipped.
    pub async fn next(&self) -> Result<Message> {
        use tokio::io::AsyncReadExt;
        loop {
            let (mut stream, _) = self
                .socket
                .accept()
                .await
                .map_err(|e| Error::io(&self.path, e))?;
            let mut buf = Vec::with_capacity(32);
            let read = tokio::time::timeout(
                Duration::from_secs(1),
                (&mut stream).take(64).read_to_end(&mut buf),
            )
            .await;
            if let Ok(Ok(_)) = read {
                if let Some(m) = Message::parse(&String::from_utf8_lossy(&buf)) {
                    return Ok(m);
                }
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends `message` to every subscriber of `replica` on the store at `root`; returns how
/// many were reached. Sockets of subscribers that are gone are removed.
pub fn notify(root: &Path, replica: &str, message: Message) -> usize {
    let dir = socket_dir(root, replica);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let line = message.line();
    let mut reached = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "sock") {
            continue;
        }
        match UnixStream::connect(&path) {
            Ok(mut stream) => {
                let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                if stream.write_all(line.as_bytes()).is_ok() {
                    reached += 1;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) =>
            {
                tracing::debug!(socket = %path.display(), "removing a gone subscriber's socket");
                let _ = std::fs::remove_file(&path);
            }
            Err(e) => tracing::debug!(socket = %path.display(), error = %e, "cannot notify"),
        }
    }
    reached
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        for m in [Message::Version(42), Message::SyncNow] {
            assert_eq!(Message::parse(&m.line()), Some(m));
        }
        assert_eq!(Message::parse("version x\n"), None);
        assert_eq!(Message::parse("hello\n"), None);
    }

    #[test]
    fn long_store_paths_still_fit_a_socket_path() {
        let root = PathBuf::from(format!("/{}", "d/".repeat(100)));
        let dir = socket_dir(&root, "acme/app.db");
        assert!(dir.as_os_str().len() <= MAX_SOCKET_DIR, "{}", dir.display());
        assert_ne!(dir, socket_dir(&root, "acme/other.db"));
    }

    #[tokio::test]
    async fn a_listener_is_reached_and_a_gone_one_is_cleaned_up() {
        let root = tempfile::tempdir().unwrap();
        let listener = Listener::bind(root.path(), "acme/app.db").unwrap();
        // A killed process leaves its socket file behind, with nobody listening.
        let gone_path = socket_dir(root.path(), "acme/app.db").join("1-dead.sock");
        drop(std::os::unix::net::UnixListener::bind(&gone_path).unwrap());
        assert!(gone_path.exists());
        let root_path = root.path().to_owned();
        let reached = tokio::task::spawn_blocking(move || {
            notify(&root_path, "acme/app.db", Message::Version(7))
        })
        .await
        .unwrap();
        assert_eq!(reached, 1);
        assert_eq!(listener.next().await.unwrap(), Message::Version(7));
        assert!(
            !gone_path.exists(),
            "the gone subscriber's socket was removed"
        );
        assert_eq!(notify(root.path(), "acme/other.db", Message::SyncNow), 0);
    }
}
