//! What a subscriber loop acts on, as traits: the push or pull it carries out, the
//! subscription it hears notices on and reports to, and the changes it watches.
//!
//! The loops ([`super::push`], [`super::pull`]) own the timing and the shutdown; what a
//! push or a pull *is* comes from outside. The real implementations live in
//! [`super::plan`] (the client's push and pull, a [`Subscription`] to the replica, the
//! [`Watcher`](super::Watcher) of the database); tests hand in their own and drive the
//! loops under `tokio::time::pause`, so the timing and shutdown rules are tested without
//! a server, a database or a wall clock.

use std::future::Future;

use super::pull::{Pulled, Reason};
use super::push::Pushed;
use super::timer::Trigger;
use super::watch::Seen;
use crate::Result;
use crate::remote::{Notice, Outgoing, Subscription};

/// One push of the subscriber's database. The loop runs it on a task of its own, never
/// two at once, and may drop it unfinished (a forced shutdown): a push cut short
/// commits nothing.
pub trait PushAction: Send + 'static {
    /// Pushes the database now; `trigger` says why (it goes into the commit message).
    fn push(&mut self, trigger: Trigger) -> impl Future<Output = Result<Pushed>> + Send;
}

/// One pull of the replica's latest version into the subscriber's database; run like a
/// [`PushAction`].
pub trait PullAction: Send + 'static {
    /// Pulls the latest version now; `reason` says why (for the sync log).
    fn pull(&mut self, reason: Reason) -> impl Future<Output = Result<Pulled>> + Send;
}

/// The subscriber's line to its replica: what it hears, and what it tells the server.
pub trait Notices: Send {
    /// The next notice; `None` once the subscription has ended.
    fn next(&mut self) -> impl Future<Output = Option<Notice>> + Send;
    /// Tells the server something, without waiting (dropped while it is unreachable).
    fn send(&mut self, message: Outgoing);
}

impl Notices for Subscription {
    fn next(&mut self) -> impl Future<Output = Option<Notice>> + Send {
        self.notices.recv()
    }

    fn send(&mut self, message: Outgoing) {
        Subscription::send(self, message);
    }
}

/// Commits to the push subscriber's database, as the watcher reports them.
pub trait Changes: Send {
    /// The next report; `None` once the watcher has stopped.
    fn next(&mut self) -> impl Future<Output = Option<Seen>> + Send;
}

impl Changes for tokio::sync::mpsc::UnboundedReceiver<Seen> {
    fn next(&mut self) -> impl Future<Output = Option<Seen>> + Send {
        self.recv()
    }
}
