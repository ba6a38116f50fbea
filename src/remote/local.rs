//! Notifications between processes that share an embedded store, without a server.
//!
//! Each running subscriber of a replica listens on a Unix socket in the replica's
//! directory under `<store>/.subscribers/`. A push that makes a new version, and
//! `sqlferry sync-now`, connect to every socket there and write one line:
//! `version N` or `sync-now`. A socket nobody listens on any more (its process was
//! killed) refuses the connection and is removed. The file system's permissions are the
//! access control, as for the store itself.

use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// Unix socket paths are limited to 108 bytes; a longer one is reached through the
/// directory's file descriptor (`/proc/self/fd/N/name`), which is short whatever the
/// directory's own path.
const MAX_SOCKET_PATH: usize = 100;

/// The directory where `replica`'s subscribers on the store at `root` listen. The root
/// is resolved first, so every spelling of one store (a symbolic link, a trailing
/// slash) finds the same sockets.
pub fn socket_dir(root: &Path, replica: &str) -> PathBuf {
    let root = root.canonicalize().unwrap_or_else(|_| root.to_owned());
    let key = crate::digest::name_key(&[replica.as_bytes()]);
    root.join(".subscribers").join(&key[..16])
}

/// Calls `f` with a path to `dir/name` short enough for a Unix socket.
fn short_path<T>(
    dir: &Path,
    name: &std::ffi::OsStr,
    f: impl FnOnce(&Path) -> std::io::Result<T>,
) -> std::io::Result<T> {
    use std::os::fd::AsRawFd;
    let full = dir.join(name);
    if full.as_os_str().len() <= MAX_SOCKET_PATH {
        return f(&full);
    }
    let handle = std::fs::File::open(dir)?;
    let short = Path::new("/proc/self/fd")
        .join(handle.as_raw_fd().to_string())
        .join(name);
    f(&short)
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
        let name = path.file_name().expect("a file name").to_owned();
        let socket = short_path(&dir, &name, |p| tokio::net::UnixListener::bind(p))
            .map_err(|e| Error::io(&path, e))?;
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
            if let Ok(Ok(_)) = read
                && let Some(m) = Message::parse(&String::from_utf8_lossy(&buf))
            {
                return Ok(m);
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How long one subscriber may take to accept a notification.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(1);

/// Sends `message` to every subscriber of `replica` on the store at `root`; returns how
/// many were reached. Sockets of subscribers that are gone are removed. A subscriber
/// that does not accept within a second is skipped: it never holds up a push.
pub async fn notify(root: &Path, replica: &str, message: Message) -> usize {
    // Resolving the root and listing the directory are file work: off the async threads.
    let (root, name) = (root.to_owned(), replica.to_owned());
    let listed = tokio::task::spawn_blocking(move || {
        let dir = socket_dir(&root, &name);
        let sockets: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(entries) => entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "sock"))
                .collect(),
            Err(_) => Vec::new(),
        };
        (dir, sockets)
    })
    .await;
    let Ok((dir, sockets)) = listed else {
        return 0;
    };
    let line = message.line();
    let mut reached = 0;
    let mut gone = Vec::new();
    for path in sockets {
        match tokio::time::timeout(NOTIFY_TIMEOUT, send_line(&dir, &path, &line)).await {
            Ok(Ok(())) => reached += 1,
            Ok(Err(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) =>
            {
                tracing::debug!(socket = %path.display(), "removing a gone subscriber's socket");
                gone.push(path);
            }
            Ok(Err(e)) => {
                tracing::debug!(socket = %path.display(), error = %e, "cannot notify");
            }
            Err(_) => tracing::debug!(socket = %path.display(), "a subscriber did not accept"),
        }
    }
    if !gone.is_empty() {
        let _ = tokio::task::spawn_blocking(move || {
            for path in gone {
                let _ = std::fs::remove_file(path);
            }
        })
        .await;
    }
    reached
}

async fn send_line(dir: &Path, path: &Path, line: &str) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let name = path.file_name().unwrap_or_default();
    // The connect itself is quick (or fails at once); only the short path needs the
    // directory's descriptor.
    let std_stream = short_path(dir, name, |p| std::os::unix::net::UnixStream::connect(p))?;
    std_stream.set_nonblocking(true)?;
    let mut stream = tokio::net::UnixStream::from_std(std_stream)?;
    stream.write_all(line.as_bytes()).await?;
    stream.shutdown().await
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

    #[tokio::test]
    async fn a_store_with_a_long_path_is_reached_through_any_spelling() {
        let base = tempfile::tempdir().unwrap();
        let root = base.path().join("a-rather-long-directory-name".repeat(4));
        std::fs::create_dir_all(&root).unwrap();
        std::os::unix::fs::symlink(&root, base.path().join("link")).unwrap();
        let listener = Listener::bind(&root, "acme/app.db").unwrap();
        assert!(listener.path.as_os_str().len() > MAX_SOCKET_PATH);
        let other = base.path().join("link");
        let reached = notify(&other, "acme/app.db", Message::SyncNow).await;
        assert_eq!(reached, 1);
        assert_eq!(listener.next().await.unwrap(), Message::SyncNow);
    }

    #[tokio::test]
    async fn a_listener_is_reached_and_a_gone_one_is_cleaned_up() {
        let root = tempfile::tempdir().unwrap();
        let listener = Listener::bind(root.path(), "acme/app.db").unwrap();
        // A killed process leaves its socket file behind, with nobody listening.
        let gone_path = socket_dir(root.path(), "acme/app.db").join("1-dead.sock");
        drop(std::os::unix::net::UnixListener::bind(&gone_path).unwrap());
        assert!(gone_path.exists());
        let reached = notify(root.path(), "acme/app.db", Message::Version(7)).await;
        assert_eq!(reached, 1);
        assert_eq!(listener.next().await.unwrap(), Message::Version(7));
        assert!(
            !gone_path.exists(),
            "the gone subscriber's socket was removed"
        );
        assert_eq!(
            notify(root.path(), "acme/other.db", Message::SyncNow).await,
            0
        );
    }
}
