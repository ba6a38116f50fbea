//! The library's typed error: every failure says what went wrong and which kind of
//! failure it is, so callers branch on [`ErrorKind`] (exit codes, retries) instead of
//! matching on message text.

use std::path::{Path, PathBuf};

/// The broad class of a failure: what a caller needs to decide what to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The command was used wrongly (bad argument, bad path syntax).
    Usage,
    /// A local file could not be read or written, or is not what it should be.
    LocalIo,
    /// A file is not an SQLite database, or its header is unusable.
    NotADatabase,
    /// The peer broke the protocol: malformed, oversized or out-of-order frame.
    Protocol,
    /// The connection to the peer was lost.
    Disconnected,
    /// A checksum did not match: the data is not what the origin had.
    Verification,
    /// The database is locked by another connection for longer than we wait.
    Busy,
    /// The peer reported a failure of its own.
    Remote,
    /// A replica or version that does not exist.
    NotFound,
    /// The replica moved past the version a push was based on.
    Conflict,
    /// A key is missing, wrong, or not allowed to do this.
    Auth,
    /// The server failed on its own side (its disk is full, an I/O error in its store,
    /// too many sessions at once): nothing is wrong with this client's request, and the
    /// same request may succeed later.
    Server,
    /// The local database has changes that were never pushed, and the operation would
    /// overwrite them (a pull without `--force`).
    LocalChanges,
    /// A bug in sqlferry (a panic, a task that panicked): nothing the user did; exit 1
    /// and a request to report it.
    Bug,
}

/// Error codes carried by the protocol's ERROR frame (`docs/protocol.md`): the wire
/// form of an [`ErrorKind`], re-exported as `protocol::ErrorCode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The peer broke the protocol.
    Protocol = 1,
    /// The peer speaks a protocol version this side does not.
    UnsupportedVersion = 2,
    /// A file is not an SQLite database.
    NotADatabase = 3,
    /// A local file could not be read or written.
    LocalIo = 4,
    /// The result did not match the origin's digest; nothing was committed.
    Verification = 5,
    /// The database stayed locked by another connection.
    Busy = 6,
    /// The sender gave up (interrupted, or failed on its side).
    Aborted = 7,
    /// The replica or version does not exist.
    NotFound = 8,
    /// VERSION_CONFLICT: the replica moved past the push's base version.
    VersionConflict = 9,
    /// The key may not do this (a PULL key pushing, a key of another replica).
    Unauthorized = 10,
    /// The request was not valid (bad replica path, bad version selector).
    BadRequest = 11,
    /// The server failed on its own side (disk full, I/O error in its store); the same
    /// request may succeed later.
    ServerError = 12,
    /// The server is at its limit of concurrent sessions; retry after a short wait.
    ServerBusy = 13,
}

impl ErrorCode {
    /// The code for a number read off the wire, if it is one we know.
    pub fn from_u16(n: u16) -> Option<Self> {
        Some(match n {
            1 => Self::Protocol,
            2 => Self::UnsupportedVersion,
            3 => Self::NotADatabase,
            4 => Self::LocalIo,
            5 => Self::Verification,
            6 => Self::Busy,
            7 => Self::Aborted,
            8 => Self::NotFound,
            9 => Self::VersionConflict,
            10 => Self::Unauthorized,
            11 => Self::BadRequest,
            12 => Self::ServerError,
            13 => Self::ServerBusy,
            _ => return None,
        })
    }

    /// The error class a caller sees for this code.
    pub fn kind(self) -> ErrorKind {
        match self {
            Self::Protocol | Self::UnsupportedVersion => ErrorKind::Protocol,
            Self::NotADatabase => ErrorKind::NotADatabase,
            Self::LocalIo => ErrorKind::LocalIo,
            Self::Verification => ErrorKind::Verification,
            // The peer's replica is locked by another session: for this client, a
            // conflict with that session, not a problem with its own files.
            Self::Busy => ErrorKind::Conflict,
            Self::Aborted => ErrorKind::Remote,
            Self::NotFound => ErrorKind::NotFound,
            Self::VersionConflict => ErrorKind::Conflict,
            Self::Unauthorized => ErrorKind::Auth,
            Self::BadRequest => ErrorKind::Usage,
            Self::ServerError | Self::ServerBusy => ErrorKind::Server,
        }
    }

    /// The code that reports a local error of this kind to the peer.
    pub fn for_kind(kind: ErrorKind) -> Self {
        match kind {
            ErrorKind::Protocol => Self::Protocol,
            ErrorKind::NotADatabase => Self::NotADatabase,
            ErrorKind::LocalIo => Self::LocalIo,
            ErrorKind::Usage => Self::BadRequest,
            ErrorKind::Auth => Self::Unauthorized,
            ErrorKind::Verification => Self::Verification,
            ErrorKind::Busy => Self::Busy,
            ErrorKind::Disconnected | ErrorKind::Remote => Self::Aborted,
            ErrorKind::NotFound => Self::NotFound,
            ErrorKind::Conflict => Self::VersionConflict,
            ErrorKind::Server => Self::ServerError,
            // Only a client refuses over local changes; a peer sees the sender give up.
            ErrorKind::LocalChanges => Self::Aborted,
            // A bug on this side: the peer sees this side fail on its own.
            ErrorKind::Bug => Self::ServerError,
        }
    }
}

/// An error from sqlferry's library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a named local file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An SQLite error on a named local database.
    #[error("{}: {source}", path.display())]
    Sqlite {
        /// The database involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rusqlite::Error,
    },
    /// The file is not an SQLite database (or not one we can sync).
    #[error("{}: {reason}", path.display())]
    NotADatabase {
        /// The file involved.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// A usage error found by the library (for example an unusable path).
    #[error("{0}")]
    Usage(String),
    /// The peer sent something the protocol does not allow.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer went away before the sync finished.
    #[error("connection lost: {0}")]
    Disconnected(String),
    /// TLS stood in the way: the server's certificate is not trusted, the handshake
    /// failed, or a plain `ws://` client reached a TLS server. Trying again does not
    /// help until the certificate, the trusted roots or the URL change.
    #[error("{0}")]
    Tls(String),
    /// A digest did not match.
    #[error("verification failed: {0}")]
    Verification(String),
    /// A replica or version does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A key is missing, wrong, or may not do what was asked.
    #[error("{0}")]
    Auth(String),
    /// Something another session holds (a replica being pushed) stayed locked.
    #[error("{0}")]
    InUse(String),
    /// The replica's latest version is not the one the push was based on, and the
    /// pushed content differs from it. The advice never says "pull first": a pull would
    /// overwrite the very changes being pushed; `--merge` comes first, as the one way
    /// out that keeps both sides' rows. An encrypted replica can neither be merged by
    /// the server nor replaced by a forced push (its seal names the version it follows):
    /// its advice is the one way that works, the changes made again on the latest.
    #[error(
        "VERSION_CONFLICT: {replica} is at version {latest} (made {} by client {}), this push is based on {} and its content differs; {}",
        conflict_time(*latest_at),
        if latest_client.is_empty() { "unknown" } else { latest_client.as_str() },
        based_on.map_or("no version".to_owned(), |v| format!("version {v}")),
        conflict_advice(replica, *latest, *encrypted)
    )]
    Conflict {
        /// The replica.
        replica: String,
        /// The replica's latest version.
        latest: u64,
        /// The version the push was based on, if any.
        based_on: Option<u64>,
        /// When the latest version was made, seconds since the Unix epoch.
        latest_at: i64,
        /// The client id that pushed the latest version.
        latest_client: String,
        /// The push was encrypted (sealed for the version after its base).
        encrypted: bool,
    },
    /// A `push --merge` whose merge was refused: rows changed on both sides to other
    /// values (with `--on-conflict refuse`), a schema change on either side, or a
    /// result that breaks a constraint. Nothing was stored; LOCAL is as it was.
    #[error("{message}")]
    MergeRefused {
        /// What was refused and why, for a person.
        message: String,
        /// The merge's report as JSON (`protocol::control::MergeResult`): the rows.
        report: Box<serde_json::Value>,
    },
    /// The server failed on its own side (disk full, I/O error, busy); temporary.
    #[error("server error: {0}")]
    Server(String),
    /// A local database holds changes that an operation would overwrite.
    #[error("{0}")]
    LocalChanges(String),
    /// A bug in sqlferry: a task panicked. Nothing the user can fix; please report it.
    #[error("a bug in sqlferry, please report it: {0}")]
    Bug(String),
    /// What a workflow was doing when `source` happened: the message reads
    /// `what: source`, and the kind is the source's.
    #[error("{what}: {source}")]
    Context {
        /// What was being done, for a person ("push app.db to acme/app.db failed").
        what: String,
        /// The failure itself.
        #[source]
        source: Box<Error>,
    },
    /// The peer ended the session with an error of its own.
    #[error("{message}")]
    Remote {
        /// The protocol's error code (see `docs/protocol.md`).
        code: u16,
        /// The peer's explanation.
        message: String,
    },
}

impl Error {
    /// The class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::LocalIo,
            Error::Sqlite { source, .. } => match source.sqlite_error_code() {
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                    ErrorKind::Busy
                }
                Some(rusqlite::ErrorCode::NotADatabase) => ErrorKind::NotADatabase,
                // SQLite found the file damaged: a check failed.
                Some(rusqlite::ErrorCode::DatabaseCorrupt) => ErrorKind::Verification,
                _ => ErrorKind::LocalIo,
            },
            Error::NotADatabase { .. } => ErrorKind::NotADatabase,
            Error::Usage(_) => ErrorKind::Usage,
            Error::Protocol(_) => ErrorKind::Protocol,
            Error::Disconnected(_) => ErrorKind::Disconnected,
            Error::Tls(_) => ErrorKind::Protocol,
            Error::Verification(_) => ErrorKind::Verification,
            Error::NotFound(_) => ErrorKind::NotFound,
            Error::Auth(_) => ErrorKind::Auth,
            Error::InUse(_) => ErrorKind::Busy,
            Error::Conflict { .. } | Error::MergeRefused { .. } => ErrorKind::Conflict,
            Error::Server(_) => ErrorKind::Server,
            Error::LocalChanges(_) => ErrorKind::LocalChanges,
            Error::Bug(_) => ErrorKind::Bug,
            Error::Context { source, .. } => source.kind(),
            Error::Remote { code, .. } => ErrorCode::from_u16(*code)
                .map(|c| c.kind())
                .unwrap_or(ErrorKind::Remote),
        }
    }

    /// Whether trying the same operation again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind(),
            ErrorKind::Disconnected | ErrorKind::Busy | ErrorKind::Server
        )
    }

    /// This error, with what was being done when it happened in front of it.
    pub fn context(self, what: impl Into<String>) -> Self {
        Error::Context {
            what: what.into(),
            source: Box::new(self),
        }
    }

    /// The merge report of a refused merge, under any context.
    pub fn merge_report(&self) -> Option<&serde_json::Value> {
        match self {
            Error::MergeRefused { report, .. } => Some(report),
            Error::Context { source, .. } => source.merge_report(),
            _ => None,
        }
    }

    /// Whether this error says outright that a disk is full: `ENOSPC` or `EDQUOT`
    /// from the system, `SQLITE_FULL` from SQLite, under any context.
    pub fn says_disk_full(&self) -> bool {
        match self {
            Error::Io { source, .. } => {
                source.kind() == std::io::ErrorKind::StorageFull
                    || source
                        .raw_os_error()
                        .is_some_and(|c| OS_DISK_FULL.contains(&c))
            }
            Error::Sqlite { source, .. } => {
                source.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull)
            }
            Error::Context { source, .. } => source.says_disk_full(),
            _ => false,
        }
    }

    /// Wraps an I/O error with the file it happened on.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_owned(),
            source,
        }
    }

    /// Wraps an SQLite error with the database it happened on.
    pub fn sqlite(path: &Path, source: rusqlite::Error) -> Self {
        Error::Sqlite {
            path: path.to_owned(),
            source,
        }
    }
}

/// `ENOSPC` and `EDQUOT` on Linux: no space left, quota exceeded.
const OS_DISK_FULL: [i32; 2] = [28, 122];

/// Bytes [`disk_full`]'s probe writes: a page or two short of it already means SQLite
/// cannot grow a file.
const PROBE_BYTES: usize = 64 * 1024;

/// Whether the disk holding `dir` has no room for a small write: a probe file is
/// written, synced and removed. For the errors that do not say so themselves (SQLite
/// reports a full tmpfs as "disk I/O error" when it grows its shared-memory file).
pub fn disk_full(dir: &Path) -> bool {
    use std::io::Write as _;
    let probe = || -> std::io::Result<()> {
        let mut file = tempfile::Builder::new()
            .prefix(".space-probe")
            .tempfile_in(dir)?;
        file.write_all(&[0u8; PROBE_BYTES])?;
        file.as_file().sync_all()
    };
    match probe() {
        Ok(()) => false,
        Err(e) => Error::io(dir, e).says_disk_full(),
    }
}

/// A task that did not finish: a panic in it is a bug (exit 1), never a network
/// failure; one cancelled (the runtime shutting down) lost its connection.
impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        if e.is_panic() {
            Error::Bug(format!("a task panicked: {e}"))
        } else {
            Error::Disconnected(format!("the task was cancelled: {e}"))
        }
    }
}

/// Debug builds only: panics when the environment variable `SQLFERRY_DEBUG_PANIC`
/// names `place` (`main`, `engine`, `answer`: a server's push session after its
/// commit), so tests can prove a panic is reported as a bug (exit 1), a server's
/// panicking session as the server's error, and a push whose answer never came as
/// committed. Release builds never read it.
pub(crate) fn debug_panic(place: &str) {
    if cfg!(debug_assertions) && std::env::var("SQLFERRY_DEBUG_PANIC").is_ok_and(|p| p == place) {
        panic!("SQLFERRY_DEBUG_PANIC={place}");
    }
}

/// Debug builds only: when the environment variable `SQLFERRY_DEBUG_PAUSE` names
/// `place` (`merge`, `answer`), creates the file `SQLFERRY_DEBUG_PAUSE_FILE` names and
/// blocks the calling thread until that file is removed (at most an hour), so a test
/// can act at that very point (kill a server in the middle of a merge or before its
/// answer to a push, or write a database while it merges) after waiting for the file. Release builds never read it.
pub(crate) fn debug_pause(place: &str) {
    if !cfg!(debug_assertions) || !std::env::var("SQLFERRY_DEBUG_PAUSE").is_ok_and(|p| p == place) {
        return;
    }
    let Some(file) = std::env::var_os("SQLFERRY_DEBUG_PAUSE_FILE") else {
        return;
    };
    if std::fs::write(&file, place).is_err() {
        return;
    }
    let until = std::time::Instant::now() + std::time::Duration::from_secs(3600);
    while std::path::Path::new(&file).exists() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A version's time as the conflict message shows it: RFC 3339 in UTC.
/// What a user whose push conflicted can do (see [`Error::Conflict`]).
fn conflict_advice(replica: &str, latest: u64, encrypted: bool) -> String {
    if encrypted {
        format!(
            "an encrypted replica can be neither merged (the server cannot read its rows) nor replaced with --force (each version's seal names the version it follows): pull {replica} into another file, make this push's changes there, and push that file"
        )
    } else {
        format!(
            "push with --merge to merge this push's row changes onto version {latest}, with --force to replace version {latest}, or pull {replica} into another file and compare"
        )
    }
}

fn conflict_time(secs: i64) -> String {
    crate::epoch::rfc3339(secs)
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicked_task_is_a_bug() {
        let join = tokio::task::spawn_blocking(|| panic!("boom"))
            .await
            .expect_err("the task panicked");
        let e = Error::from(join);
        assert_eq!(e.kind(), ErrorKind::Bug);
        assert!(!e.is_retryable());
        assert!(
            e.to_string()
                .starts_with("a bug in sqlferry, please report it"),
            "{e}"
        );
    }
}
