//! Keeping a replica fresh on its own (`--subscribe`): the pieces a subscriber loop is
//! made of.
//!
//! - [`duration`] parses and prints the flag values (`10m`, `1h30m`, `2w`).
//! - [`timer`] is the push subscriber's timing, a pure state machine: it is told what
//!   happened (a change, a push that started, succeeded or failed, a sync-now request,
//!   shutdown) and the current time, and answers whether a push is due, when to wake up
//!   next and which CHANGED notice to send.
//! - [`backoff`] holds the pure delay sequences: push retries and pull reconnects.
//! - [`watch`] notices commits to a local database by any other connection: file events
//!   in its directory, confirmed by `PRAGMA data_version`, with a slow poll as a safety
//!   net.
//!
//! - [`push`] and [`pull`] are the two subscriber loops that carry the answers out:
//!   they own the clock, the tasks and the [`Subscription`](crate::remote::Subscription)
//!   to the replica; `support` has what both need (output lines, signals, jitter).
//!
//! Everything but the watcher and the loops is pure: time is a [`Time`] since the subscriber started,
//! given by the caller, so the rules are tested with injected instants and never sleep.
//! The loop that carries out their answers owns the clock, the sockets and the tasks.

pub mod backoff;
pub mod duration;
pub mod pull;
pub mod push;
mod support;
pub mod timer;
pub mod watch;

pub use support::{Line, Signals, error_kind, is_auth_failure, jitter};
pub use timer::{Schedule, Timing, Trigger};
pub use watch::{Seen, Watcher};

/// A point in a subscriber's life: the time elapsed since it started.
pub type Time = std::time::Duration;
