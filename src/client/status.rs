//! `status` and `history` as results: the health of every database this machine syncs,
//! judged from the sync log ([`crate::synclog`]) and the files themselves, and the
//! log's daily totals.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::Result;
use crate::remote::blocking;
use crate::synclog::running::Subscriber;
use crate::synclog::{Day, Health, Log};

/// Which syncs a `status` or `history` is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every database this machine syncs.
    All,
    /// One local database (a path; its sidecar names the same database).
    Database(PathBuf),
    /// One replica path, in whichever store.
    Replica(String),
}

impl Scope {
    fn database(&self) -> Option<String> {
        match self {
            Scope::Database(p) => Some(crate::config::database_key(p).display().to_string()),
            _ => None,
        }
    }

    fn replica(&self) -> Option<String> {
        match self {
            Scope::Replica(r) => Some(r.clone()),
            _ => None,
        }
    }

    fn keeps(&self, h: &Health) -> bool {
        match self {
            Scope::Replica(r) => h.replica == *r,
            _ => true,
        }
    }
}

/// How one sync direction of one database is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// The last attempt worked, within the allowed age.
    Ok,
    /// The last attempt worked, but longer ago than `--max-age`.
    Late,
    /// The last attempt failed.
    Failing,
}

/// One line of `status`: a database's sync with one replica in one direction.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    /// What the log knows.
    #[serde(flatten)]
    pub health: Health,
    /// Its verdict.
    pub state: State,
    /// For a push: when the database (or its WAL) was last written, in Unix seconds,
    /// if that was after the last successful push started: it has changes not pushed
    /// yet.
    pub changed_at: Option<i64>,
    /// The subscriber running this sync on this machine now, if one is, with its next
    /// planned push.
    pub subscriber: Option<Subscriber>,
}

impl Status {
    /// Whether this line makes `status` exit non-zero.
    pub fn is_unhealthy(&self) -> bool {
        self.state != State::Ok
    }
}

/// The status of every sync in `scope`, oldest success first, judged at `now` with
/// `max_age` (`None`: age alone never makes one late). An empty list when this machine
/// never synced anything (or has no sync log yet).
pub async fn status(scope: Scope, max_age: Option<Duration>, now: i64) -> Result<Vec<Status>> {
    blocking(move || {
        let Some(path) = crate::synclog::default_path() else {
            return Ok(Vec::new());
        };
        let Some(log) = Log::open_existing(&path)? else {
            return Ok(Vec::new());
        };
        let healths = log.health(scope.database().as_deref())?;
        let running = crate::synclog::running::running();
        Ok(healths
            .into_iter()
            .filter(|h| scope.keeps(h))
            .map(|health| {
                let mut status = judge(health, max_age, now);
                let h = &status.health;
                status.subscriber = running
                    .iter()
                    .find(|s| {
                        (&s.database, &s.store, &s.replica, &s.op)
                            == (&h.database, &h.store, &h.replica, &h.op)
                    })
                    .cloned();
                status
            })
            .collect())
    })
    .await
}

fn judge(health: Health, max_age: Option<Duration>, now: i64) -> Status {
    let age_limit = max_age.map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let state = if health.attempt_error.is_some() || health.success_at.is_none() {
        State::Failing
    } else if age_limit.is_some_and(|limit| now - health.success_at.unwrap_or(0) > limit) {
        State::Late
    } else {
        State::Ok
    };
    let changed_at = if health.op == "push" {
        last_write(Path::new(&health.database))
            .filter(|&ms| health.success_started_ms.is_none_or(|s| ms > s))
            .map(|ms| ms / 1000)
    } else {
        None
    };
    Status {
        health,
        state,
        changed_at,
        subscriber: None,
    }
}

/// When `database` or its WAL was last written, in Unix milliseconds (`None` when
/// neither can be read).
fn last_write(database: &Path) -> Option<i64> {
    // Where SQLite keeps the WAL: beside the file a symbolic link points to.
    let wal = crate::page::sqlite_sibling(database, "-wal");
    [database.to_owned(), wal]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok()?.modified().ok())
        .filter_map(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as i64)
        .max()
}

/// The daily totals of the `days` days up to `now`, newest first, of every sync or of
/// those of the database or replica `scope` names.
pub async fn history(scope: Scope, days: u32, now: i64) -> Result<Vec<Day>> {
    blocking(move || {
        let Some(path) = crate::synclog::default_path() else {
            return Ok(Vec::new());
        };
        match Log::open_existing(&path)? {
            Some(log) => log.days(
                scope.database().as_deref(),
                scope.replica().as_deref(),
                days,
                now,
            ),
            None => Ok(Vec::new()),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(success_at: Option<i64>, error: Option<&str>) -> Health {
        Health {
            database: "/nonexistent/app.db".into(),
            store: "file:///srv/store".into(),
            replica: "acme/app.db".into(),
            op: "push".into(),
            attempt_at: 1_000_000,
            attempt_error: error.map(str::to_owned),
            success_at,
            success_version: success_at.map(|_| 3),
            success_trigger: success_at.map(|_| "idle".into()),
            success_started_ms: success_at.map(|s| s * 1000),
            failures_since: u64::from(error.is_some()),
        }
    }

    #[test]
    fn a_sync_is_late_past_max_age_and_failing_after_a_failed_attempt() {
        let hour = Duration::from_secs(3600);
        let now = 1_000_000;
        let fresh = judge(health(Some(now - 60), None), Some(hour), now);
        assert_eq!(fresh.state, State::Ok);
        let old = health(Some(now - 7200), None);
        assert_eq!(judge(old.clone(), Some(hour), now).state, State::Late);
        assert_eq!(
            judge(old, None, now).state,
            State::Ok,
            "no --max-age, no age limit"
        );
        let failed = judge(
            health(Some(now - 60), Some("connection refused")),
            Some(hour),
            now,
        );
        assert_eq!(failed.state, State::Failing);
        assert_eq!(
            judge(health(None, Some("no key")), None, now).state,
            State::Failing
        );
        assert!(
            fresh.changed_at.is_none(),
            "a database that is not there was not written"
        );
    }
}
