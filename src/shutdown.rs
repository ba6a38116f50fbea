//! One shutdown for every loop: a pair of cancellation tokens, graceful then forced.
//!
//! The command line makes one from SIGINT and SIGTERM (the first signal asks for a
//! graceful stop, the second forces it) and hands clones down to the server and to every
//! subscriber loop. Nothing below the command line catches a signal itself, so a test
//! drives any loop by calling [`Shutdown::begin`] and [`Shutdown::force`], under
//! `tokio::time::pause` where it likes.
//!
//! - Graceful: stop taking new work, finish (or push) what is pending, within the loop's
//!   own bound.
//! - Forced: stop now. Whatever is half-done commits nothing (invariant 1), so stopping
//!   anywhere is safe; it only costs the work in flight.

use tokio_util::sync::CancellationToken;

/// A graceful-then-forced stop request, cheap to clone; every clone sees the same state.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    graceful: CancellationToken,
    forced: CancellationToken,
}

impl Shutdown {
    /// A shutdown nobody has asked for yet.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Asks for a graceful stop. Idempotent.
    pub fn begin(&self) {
        self.graceful.cancel();
    }

    /// Asks for an immediate stop; implies a graceful one. Idempotent.
    pub fn force(&self) {
        self.graceful.cancel();
        self.forced.cancel();
    }

    /// Whether a stop (graceful or forced) was asked for.
    pub fn is_requested(&self) -> bool {
        self.graceful.is_cancelled()
    }

    /// Whether a forced stop was asked for.
    pub fn is_forced(&self) -> bool {
        self.forced.is_cancelled()
    }

    /// Completes once a stop (graceful or forced) is asked for.
    pub async fn requested(&self) {
        self.graceful.cancelled().await;
    }

    /// Completes once a forced stop is asked for.
    pub async fn forced(&self) {
        self.forced.cancelled().await;
    }

    /// The graceful token, for APIs that take a [`CancellationToken`] (axum's graceful
    /// shutdown, `run_until_cancelled`).
    pub fn graceful_token(&self) -> &CancellationToken {
        &self.graceful
    }

    /// The forced token.
    pub fn forced_token(&self) -> &CancellationToken {
        &self.forced
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn force_implies_graceful_and_every_clone_sees_it() {
        let a = Shutdown::new();
        let b = a.clone();
        assert!(!b.is_requested() && !b.is_forced());
        a.begin();
        assert!(b.is_requested() && !b.is_forced());
        b.requested().await;
        let c = Shutdown::new();
        c.clone().force();
        assert!(c.is_requested() && c.is_forced());
        c.forced().await;
    }
}
