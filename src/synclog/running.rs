//! The subscribers running on this machine, and what each plans next: one small JSON
//! file per running subscriber in `$XDG_STATE_HOME/sqlferry/running/`, so `sqlferry
//! status` can say `next push in 7m: idle 10m` for a database a subscriber watches.
//!
//! - A subscriber writes its file when it starts and rewrites it (a temporary file
//!   renamed over it: a reader sees the old plan or the new one) when its plan moves by
//!   a second or more or changes trigger; it removes it when it stops.
//! - A subscriber that died without removing its file leaves it behind: a reader keeps
//!   only files whose process is still the one that wrote them (its PID and, on Linux,
//!   its start time in `/proc`), and removes the others.
//! - Nothing here ever fails a subscriber: a file that cannot be written is logged at
//!   debug level and `status` simply does not show the plan.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// What one running subscriber is doing, as `status` reads it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Subscriber {
    /// Its process.
    pub pid: u32,
    /// When its process started, in clock ticks since boot (`/proc/PID/stat`, field
    /// 22); `None` where there is no `/proc`.
    pub process_start: Option<u64>,
    /// When the subscriber started, Unix seconds.
    pub started_at: i64,
    /// The local database (its [`crate::config::database_key`]).
    pub database: String,
    /// The store's URL.
    pub store: String,
    /// The replica path.
    pub replica: String,
    /// `push` or `pull`.
    pub op: String,
    /// The next planned push, when one is planned.
    pub next: Option<Planned>,
}

/// A push a subscriber plans.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Planned {
    /// When, Unix seconds; `None` while it is running now.
    pub at: Option<i64>,
    /// Why then: `idle 10m`, `max-interval 24h`, `retry`, `sync-now`, … (or what the
    /// running push was started by).
    pub why: String,
}

/// The directory of the running subscribers' files.
pub fn dir() -> Option<PathBuf> {
    Some(crate::config::state_dir()?.join("running"))
}

/// The record of one running subscriber: its file exists while this value lives.
#[derive(Debug)]
pub struct Running {
    path: PathBuf,
    record: Subscriber,
}

impl Running {
    /// Records a subscriber of `database` with `replica` on `store` as running;
    /// `None` when its file cannot be written (say, no state directory).
    pub fn start(database: &str, store: &str, replica: &str, op: &str) -> Option<Running> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = dir()?;
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let running = Running {
            path: dir.join(format!("{pid}-{n}.json")),
            record: Subscriber {
                pid,
                process_start: process_start(pid),
                started_at: crate::epoch::now(),
                database: database.to_owned(),
                store: store.to_owned(),
                replica: replica.to_owned(),
                op: op.to_owned(),
                next: None,
            },
        };
        if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| running.write()) {
            tracing::debug!(
                "the subscriber record in {} was not written: {e}",
                dir.display()
            );
            return None;
        }
        Some(running)
    }

    /// Records the next planned push; the file is rewritten only when the plan moved
    /// by a second or more, or its reason changed.
    pub fn plan(&mut self, next: Option<Planned>) {
        let same = match (&self.record.next, &next) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                a.why == b.why
                    && match (a.at, b.at) {
                        (Some(x), Some(y)) => x.abs_diff(y) < 1,
                        (x, y) => x == y,
                    }
            }
            _ => false,
        };
        if same {
            return;
        }
        self.record.next = next;
        if let Err(e) = self.write() {
            tracing::debug!(
                "the subscriber record {} was not updated: {e}",
                self.path.display()
            );
        }
    }

    fn write(&self) -> std::io::Result<()> {
        let mut tmp = self.path.as_os_str().to_owned();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        std::fs::write(&tmp, serde_json::to_vec(&self.record)?)?;
        std::fs::rename(&tmp, &self.path)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The subscribers running on this machine now; files of subscribers that are gone
/// are removed on the way.
pub fn running() -> Vec<Subscriber> {
    dir().map(|d| running_in(&d)).unwrap_or_default()
}

fn running_in(dir: &Path) -> Vec<Subscriber> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        match serde_json::from_slice::<Subscriber>(&bytes) {
            Ok(s) if is_alive(&s) => found.push(s),
            // Gone, or not ours to read: the file is only a note.
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    found.sort_by_key(|s| (s.started_at, s.pid));
    found
}

/// Whether the process that wrote `s` still runs: its PID is there and, where the
/// start time is known, started when it did (a PID reused by another process is not
/// the subscriber).
fn is_alive(s: &Subscriber) -> bool {
    if !Path::new("/proc").is_dir() {
        return true;
    }
    match (process_start(s.pid), s.process_start) {
        (Some(now), Some(then)) => now == then,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// A process's start time in clock ticks since boot, from `/proc/PID/stat`.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count fields
    // after its closing parenthesis. Field 22 is the 20th after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_lives_while_its_subscriber_runs_and_dead_ones_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let record = |pid, start| Subscriber {
            pid,
            process_start: start,
            started_at: 1,
            database: "/srv/app.db".into(),
            store: "ws://127.0.0.1:1".into(),
            replica: "acme/app.db".into(),
            op: "push".into(),
            next: Some(Planned {
                at: Some(100),
                why: "idle 10m".into(),
            }),
        };
        let write = |name: &str, s: &Subscriber| {
            std::fs::write(dir.path().join(name), serde_json::to_vec(s).unwrap()).unwrap();
        };
        let alive = record(me, process_start(me));
        write("alive.json", &alive);
        // This process's PID, but another start time: the PID was reused.
        let reused = record(me, process_start(me).map(|t| t + 1));
        write("reused.json", &reused);
        // A PID no process has (beyond the kernel's pid_max).
        write("dead.json", &record(u32::MAX - 1, Some(5)));
        std::fs::write(dir.path().join("garbage.json"), b"{not json").unwrap();
        assert_eq!(running_in(dir.path()), vec![alive]);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            left,
            vec!["alive.json".to_owned()],
            "the dead ones' files are removed"
        );
    }

    #[test]
    fn this_process_has_a_start_time() {
        assert!(process_start(std::process::id()).is_some());
    }
}
