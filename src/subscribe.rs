//! Keeping a replica fresh on its own (`--subscribe`): the pieces a subscriber is made
//! of.
//!
//! - [`duration`] parses and prints the flag values (`10m`, `1h30m`, `2w`).
//! - [`timer`] is the push subscriber's timing, a pure state machine: it is told what
//!   happened (a change, a push that started, succeeded or failed, a sync-now request,
//!   shutdown) and the current time, and answers whether a push is due, when to wake up
//!   next and which CHANGED notice to send. [`pull_timer`] is the pull subscriber's:
//!   new versions, sync-now, failures and retries in, "pull now / wake at T" out. The
//!   delays themselves are [`crate::backoff`]'s.
//! - [`watch`] notices commits to a local database by any other connection: file events
//!   in its directory, confirmed by `PRAGMA data_version`, with a slow poll as a safety
//!   net.
//! - [`push`] and [`pull`] are the two subscriber loops that carry the answers out.
//!   They act through traits ([`action`]: the push or pull, the subscription, the
//!   changes), stop on the one [`Shutdown`](crate::shutdown::Shutdown) (graceful, then
//!   forced), and report through [`Event`]s that the command line prints. So they are
//!   tested in-process under `tokio::time::pause`.
//! - [`plan`] is the workflow around them: which subscriber to run, which key, the
//!   switch to following on a PULL key, and the real actions (the client's push and
//!   pull, the watcher, the subscription).
//!
//! Everything but the watcher, the loops and the plan is pure: time is a [`Time`] since
//! the subscriber started, given by the caller, so the rules are tested with injected
//! instants and never sleep.

pub mod action;
pub mod duration;
pub mod event;
pub mod plan;
pub mod pull;
pub mod pull_timer;
pub mod push;
pub mod timer;
pub mod watch;

pub use action::{Changes, Notices, PullAction, PushAction};
pub use event::{Event, NextPush};
pub use pull_timer::PullSchedule;
pub use timer::{Schedule, Timing, Trigger};
pub use watch::{Seen, Watcher};

/// A point in a subscriber's life: the time elapsed since it started.
pub type Time = std::time::Duration;

#[cfg(test)]
mod tests;
