//! What both subscriber loops need around them: output lines, signals, jitter.

use std::io::Write;

use crate::{Error, ErrorKind, Result};

/// Prints a subscriber's output lines, each stamped with the time: results on stdout,
/// failures on stderr. A closed stdout (a pipe whose reader left) is ignored.
#[derive(Debug, Clone, Copy)]
pub struct Line {
    quiet: bool,
}

impl Line {
    /// Lines on stdout unless `quiet`; failures on stderr always.
    pub fn new(quiet: bool) -> Line {
        Line { quiet }
    }

    fn stamp() -> String {
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
    }

    /// One result line.
    pub fn out(&self, text: String) {
        if !self.quiet {
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{} {text}", Line::stamp());
            let _ = stdout.flush();
        }
    }

    /// One failure line.
    pub fn err(&self, text: String) {
        eprintln!("{} {text}", Line::stamp());
    }
}

/// SIGINT and SIGTERM, as one stream of "stop" requests.
#[derive(Debug)]
pub struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    /// Starts catching SIGINT and SIGTERM. Must be called inside a tokio runtime.
    pub fn catch() -> Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        let io = |e| Error::io(std::path::Path::new("signal handler"), e);
        Ok(Signals {
            int: signal(SignalKind::interrupt()).map_err(io)?,
            term: signal(SignalKind::terminate()).map_err(io)?,
        })
    }

    /// The next SIGINT or SIGTERM.
    pub async fn next(&mut self) {
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
    }
}

/// A jitter factor in [0.5, 1.0], so that many subscribers cut off at once do not all
/// come back in the same instant.
pub fn jitter() -> f64 {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    0.5 + f64::from(u16::from_be_bytes(b)) / f64::from(u16::MAX) / 2.0
}

/// The kind of the first sqlferry error in `e`'s chain, if any.
pub fn error_kind(e: &anyhow::Error) -> Option<ErrorKind> {
    e.chain()
        .find_map(|c| c.downcast_ref::<Error>())
        .map(|c| c.kind())
}

/// Whether `e` is a refusal of the key, which no retry mends. A server failing on its
/// own side (`ErrorKind::Server`: disk full, busy) is not: it is temporary.
pub fn is_auth_failure(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<Error>())
        .any(|c| c.kind() == ErrorKind::Auth)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_refused_key_is_an_auth_failure() {
        let refused = anyhow::Error::from(Error::Auth("refused the key".into()));
        assert!(is_auth_failure(&refused.context("push failed")));
        for temporary in [
            Error::Server("disk full".into()),
            Error::Remote {
                code: crate::protocol::ErrorCode::ServerBusy as u16,
                message: "busy".into(),
            },
            Error::Disconnected("gone".into()),
        ] {
            let e = anyhow::Error::from(temporary);
            assert!(!is_auth_failure(&e), "{e:#} is temporary");
            assert!(
                e.chain()
                    .any(|c| c.downcast_ref::<Error>().is_some_and(Error::is_retryable))
            );
        }
    }
}
