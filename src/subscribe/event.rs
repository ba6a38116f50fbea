//! What a subscriber tells its user, as values: the loops emit [`Event`]s and the
//! command line turns each into one stamped line (results on stdout, failures on
//! stderr). Nothing below the command line prints, so the words and the streams are
//! decided in one place, and tests read the events themselves.

use std::path::PathBuf;
use std::time::Duration;

use super::pull::{Pulled, Reason};
use super::push::Pushed;
use super::timer::{Timing, Trigger};

/// What happens after a failed push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextPush {
    /// A retry, after this long.
    RetryIn(Duration),
    /// The retries are spent: the next change (or `max-interval`, or sync-now) pushes.
    AtNextChange,
    /// None: the subscriber is stopping.
    Stopping,
}

/// One thing a subscriber did or saw, worth a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A push subscriber is connected to its replica and starts.
    PushStarted {
        /// The database it watches.
        database: PathBuf,
        /// The replica, `namespace/name`.
        replica: String,
        /// The server's URL.
        server: String,
        /// When it pushes.
        timing: Timing,
    },
    /// The server said nothing within `waited` of the start; the subscriber watches
    /// anyway.
    NoFirstWord {
        /// How long it waited.
        waited: Duration,
    },
    /// The server could not be reached at the start; the subscriber watches anyway.
    StartedOffline {
        /// Why, one line.
        error: String,
        /// When the next attempt to connect is.
        retry_in: Duration,
    },
    /// A push subscriber lost the server; changes are tracked meanwhile.
    PushServerLost {
        /// Why, one line.
        error: String,
        /// When the next attempt to connect is.
        retry_in: Duration,
    },
    /// A push subscriber reached the server again.
    ServerBack,
    /// A push ended well.
    Pushed {
        /// Why it ran.
        trigger: Trigger,
        /// What it did.
        pushed: Pushed,
    },
    /// The push subscriber's plan moved: the next push, or the one running now. Not a
    /// line for the user; `status` shows it.
    Planned {
        /// How long until the planned push; `None` when none is planned (nothing to
        /// push until a change) or one is running.
        after: Option<Duration>,
        /// The trigger of the planned push, or of the one running now.
        trigger: Option<Trigger>,
        /// Whether a push is running now.
        running: bool,
    },
    /// A push failed.
    PushFailed {
        /// Why it ran.
        trigger: Trigger,
        /// What went wrong, one line.
        error: String,
        /// What comes next.
        next: NextPush,
    },
    /// Asked to stop with changes pending (or a push running): they are pushed first,
    /// for at most `bound`.
    PushingBeforeStop {
        /// The longest the subscriber waits for that push.
        bound: Duration,
    },
    /// The key turned out to be a PULL key: the subscriber follows the replica instead.
    FollowingInstead {
        /// The replica, `namespace/name`.
        replica: String,
        /// Whether the key came from the sidecar beside the database.
        from_sidecar: bool,
    },
    /// A pull subscriber is connected to its replica and starts.
    PullStarted {
        /// The replica, `namespace/name`.
        replica: String,
        /// The server's URL.
        server: String,
        /// The database it writes.
        local: PathBuf,
    },
    /// A pull subscriber reached the server again.
    Reconnected {
        /// The replica's latest version.
        latest: u64,
    },
    /// The replica has no version yet: the pull subscriber waits for the first.
    NoVersionYet,
    /// A pull subscriber lost the server and reconnects.
    PullServerLost {
        /// Why, one line.
        error: String,
        /// When the next attempt is.
        retry_in: Duration,
    },
    /// A pull ended well.
    Pulled {
        /// Why it ran.
        reason: Reason,
        /// What it did.
        pulled: Pulled,
    },
    /// A pull failed; it is retried.
    PullFailed {
        /// Why it ran.
        reason: Reason,
        /// What went wrong, one line.
        error: String,
        /// When the retry is.
        retry_in: Duration,
    },
    /// Asked to stop with a pull running: the subscriber stops once it ends.
    PullingBeforeStop,
    /// Asked to stop at once (the second signal): the subscriber stops now, leaving a
    /// sync in flight unfinished (it commits nothing).
    StoppingNow,
}
