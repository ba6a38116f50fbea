//! `push --subscribe`, `pull --subscribe`, `sqlferry subscribe` and `sqlferry sync-now`:
//! flags into plain options, then the `subscribe` module's subscribers; their events
//! into stamped lines (results on stdout unless `--quiet`, failures on stderr) and their
//! ends into exit codes.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use super::{Global, RemoteArgs, exit, expand_tilde, human_bytes, out};
use crate::client::{Puller, Pusher};
use crate::shutdown::Shutdown;
use crate::store::ReplicaPath;
use crate::subscribe::plan::{self, Ended, Plan, PushOptions};
use crate::subscribe::push::SHUTDOWN_BOUND;
use crate::subscribe::timer::Timing;
use crate::subscribe::{Event, NextPush, duration};

pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
    duration::parse(s)
}

/// When a push subscriber pushes.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Subscribe timing (durations: 90s, 10m, 1h30m, 3d, 2w)")]
pub struct TimingArgs {
    /// Push once LOCAL has had no commit for this long (10s to 24d; required for a push
    /// subscriber).
    #[arg(long = "wait-idle", alias = "waitIdle", value_name = "DURATION", value_parser = parse_duration)]
    pub wait_idle: Option<Duration>,
    /// Leave at least this long between pushes [default: half of --max-interval, else 0].
    #[arg(long = "min-interval", alias = "minInterval", value_name = "DURATION", value_parser = parse_duration)]
    pub min_interval: Option<Duration>,
    /// Push at least this often while changes keep coming, idle or not (at least 10s)
    /// [default: never without idle].
    #[arg(long = "max-interval", alias = "maxInterval", value_name = "DURATION", value_parser = parse_duration)]
    pub max_interval: Option<Duration>,
    /// Push without waiting for idle once this many commits were seen since the last
    /// push (commits closer together than about 50 ms are seen as one).
    #[arg(long = "max-changes", alias = "maxChanges", value_name = "N")]
    pub max_changes: Option<u32>,
    /// How often to check LOCAL for commits the file watcher missed.
    #[arg(long = "poll", value_name = "DURATION", value_parser = parse_duration, default_value = "5s", hide = true)]
    pub poll: Duration,
    /// How long pushes must fail before the server hears of it (tests shorten it).
    #[arg(long = "report-failures-after", value_name = "DURATION", value_parser = parse_duration, default_value = "5m", hide = true)]
    pub report_after: Duration,
}

impl TimingArgs {
    /// Whether any timing flag was given.
    pub fn any(&self) -> bool {
        self.wait_idle.is_some()
            || self.min_interval.is_some()
            || self.max_interval.is_some()
            || self.max_changes.is_some()
    }

    /// The flags as the push subscriber's options (checked when it starts).
    fn options(&self) -> PushOptions {
        PushOptions {
            wait_idle: self.wait_idle,
            min_interval: self.min_interval,
            max_interval: self.max_interval,
            max_changes: self.max_changes,
            poll: self.poll,
            report_after: self.report_after,
            shutdown_bound: SHUTDOWN_BOUND,
            permits: None,
        }
    }

    pub(super) fn describe(t: &Timing) -> String {
        let mut parts = vec![format!("after {} idle", duration::format(t.wait_idle))];
        if !t.min_interval.is_zero() {
            parts.push(format!(
                "at most every {}",
                duration::format(t.min_interval)
            ));
        }
        if let Some(max) = t.max_interval {
            parts.push(format!(
                "at least every {} while changing",
                duration::format(max)
            ));
        }
        if let Some(n) = t.max_changes {
            parts.push(format!("at once after {n} commits"));
        }
        parts.join(", ")
    }
}

/// Prints a subscriber's output lines, each stamped with the time: results on stdout,
/// failures on stderr. A closed stdout (a pipe whose reader left) is ignored.
#[derive(Debug, Clone, Copy)]
struct Line {
    quiet: bool,
}

impl Line {
    fn stamp() -> String {
        crate::epoch::rfc3339(crate::epoch::now())
    }

    /// One result line.
    fn out(&self, text: String) {
        if !self.quiet {
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{} {text}", Line::stamp());
            let _ = stdout.flush();
        }
    }

    /// One failure line.
    fn err(&self, text: String) {
        eprintln!("{} {text}", Line::stamp());
    }

    /// The line of `event`.
    fn event(&self, event: Event) {
        match text(event) {
            Some((Stream::Out, line)) => self.out(line),
            Some((Stream::Err, line)) => self.err(line),
            None => {}
        }
    }
}

/// Where a line goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stream {
    /// Results: stdout, unless `--quiet`.
    Out,
    /// Failures: stderr.
    Err,
}

/// The line of `event` and its stream; `None` for events that make no line.
pub(super) fn text(event: Event) -> Option<(Stream, String)> {
    let out = |s: String| Some((Stream::Out, s));
    let err = |s: String| Some((Stream::Err, s));
    {
        match event {
            Event::PushStarted {
                database,
                replica,
                server,
                timing,
            } => out(format!(
                "push subscriber: {} to {}, {}",
                database.display(),
                store_label(&replica, &server),
                TimingArgs::describe(&timing)
            )),
            Event::NoFirstWord { waited } => err(format!(
                "no answer from the server within {}s; watching anyway",
                waited.as_secs()
            )),
            Event::StartedOffline { error, retry_in } => err(format!(
                "server unreachable ({error}); watching anyway, retrying in {}",
                duration::format(retry_in)
            )),
            Event::PushServerLost { error, retry_in } => err(format!(
                "lost the server ({error}); changes are tracked and pushed when it is back (next try in {})",
                duration::format(retry_in)
            )),
            Event::ServerBack => out("server reachable again".into()),
            Event::Pushed { trigger, pushed: p } => {
                if let Some(saved) = &p.saved_keys {
                    eprintln!("{}", super::push::new_keys_note(saved));
                }
                out(if let Some(m) = &p.merged {
                    merged_line(trigger.as_str(), &p, m)
                } else if p.copy {
                    format!(
                        "push ({}): copy updated, {} of {} pages, {} sent in {:.2?}",
                        trigger.as_str(),
                        p.pages_sent,
                        p.pages_total,
                        human_bytes(p.bytes_sent),
                        p.duration
                    )
                } else if p.created {
                    format!(
                        "push ({}): version {}, {} of {} pages, {} sent in {:.2?}",
                        trigger.as_str(),
                        p.version,
                        p.pages_sent,
                        p.pages_total,
                        human_bytes(p.bytes_sent),
                        p.duration
                    )
                } else {
                    format!(
                        "push ({}): no change, still version {} ({} sent in {:.2?})",
                        trigger.as_str(),
                        p.version,
                        human_bytes(p.bytes_sent),
                        p.duration
                    )
                })
            }
            Event::PushFailed {
                trigger,
                error,
                next,
            } => {
                let next = match next {
                    NextPush::Stopping => "not retried: stopping".into(),
                    NextPush::RetryIn(d) => format!("retry in {}", duration::format(d)),
                    NextPush::AtNextChange => "no more retries; pushing at the next change".into(),
                };
                err(format!(
                    "push ({}) failed: {error}; {next}",
                    trigger.as_str()
                ))
            }
            Event::PushingBeforeStop { bound } => out(format!(
                "stopping: pushing pending changes first (at most {}; a second signal stops at once)",
                duration::format(bound)
            )),
            Event::FollowingInstead {
                replica,
                from_sidecar,
            } => {
                let from = if from_sidecar {
                    " (from the sidecar)"
                } else {
                    ""
                };
                out(format!(
                    "the key{from} for {replica} is a PULL key: following the replica as a pull subscriber instead"
                ))
            }
            Event::PullStarted {
                replica,
                server,
                local,
            } => out(format!(
                "pull subscriber: {replica} on {server} into {}",
                local.display()
            )),
            Event::Reconnected { latest } => out(format!(
                "connected again; the replica is at version {latest}"
            )),
            Event::NoVersionYet => {
                out("the replica has no version yet; waiting for the first".into())
            }
            Event::PullServerLost { error, retry_in } => err(format!(
                "lost the server ({error}); reconnecting in {}",
                duration::format(retry_in)
            )),
            Event::Pulled { reason, pulled: p } => out(format!(
                "pull ({}): version {}, {} of {} pages written, {} received in {:.2?}",
                reason.as_str(),
                p.version,
                p.pages_written,
                p.pages_total,
                human_bytes(p.bytes_received),
                p.duration
            )),
            Event::PullFailed {
                reason,
                error,
                retry_in,
            } => err(format!(
                "pull ({}) failed: {error}; retry in {}",
                reason.as_str(),
                duration::format(retry_in)
            )),
            Event::PullingBeforeStop => {
                out("stopping after the pull in progress (a second signal stops at once)".into())
            }
            Event::StoppingNow => err("second signal: stopping now".into()),
            // The plan moves with every change: `status` shows it, not the log.
            Event::Planned { .. } => None,
        }
    }
}

/// Where a subscriber's changes go, as its first line says: `acme/app.db on
/// ws://host:port`, `acme/app.db in the embedded store (DIR)`, or a copy's path
/// (`server` empty).
/// A merged push's line: what it merged onto what, the versions it made, and whether
/// LOCAL now holds the merge or kept later changes (based on the candidate).
fn merged_line(
    trigger: &str,
    p: &crate::subscribe::push::Pushed,
    m: &crate::subscribe::push::MergedPush,
) -> String {
    let made = if !p.created {
        format!(": no change, version {} holds it all", p.version)
    } else if m.candidate > 0 && m.candidate != m.onto {
        format!(
            " → version {} (this push kept as version {})",
            p.version, m.candidate
        )
    } else {
        format!(" → version {}", p.version)
    };
    let decided = match m.conflicts {
        0 => String::new(),
        n => format!(
            ", {n} row{} changed on both sides decided",
            if n == 1 { "" } else { "s" }
        ),
    };
    let local = match (m.local_kept, m.candidate) {
        (false, _) => format!("LOCAL now holds version {}", p.version),
        (true, 0) => "LOCAL was written meanwhile and kept its changes".into(),
        (true, c) => {
            format!("LOCAL was written meanwhile and kept its changes, now based on version {c}")
        }
    };
    format!(
        "push ({trigger}): merged v{} onto v{}{made} ({} row change{} of this push{decided}); {local}, in {:.2?}",
        m.base,
        m.onto,
        m.changes,
        if m.changes == 1 { "" } else { "s" },
        p.duration
    )
}

fn store_label(replica: &str, server: &str) -> String {
    match server.strip_prefix("file://") {
        _ if server.is_empty() => format!("the copy {replica}"),
        Some(dir) => format!("{replica} in the embedded store ({dir})"),
        None => format!("{replica} on {server}"),
    }
}

/// Prints `event`, and remembers the replica a pull subscriber follows: its failures
/// are told as the pull subscriber's.
fn print(line: Line, following: &mut Option<String>, event: Event) {
    note_following(following, &event);
    line.event(event);
}

/// Remembers, from its start event, the replica a pull subscriber follows (a push
/// subscriber whose key is a PULL key becomes one).
fn note_following(following: &mut Option<String>, event: &Event) {
    if let Event::PullStarted {
        replica, server, ..
    } = event
    {
        *following = Some(format!("pull subscriber of {replica} on {server}"));
    }
}

/// What a subscriber asked to stop says it left behind.
fn stopped_cleanly(following: bool) -> &'static str {
    if following {
        "stopped (asked to): the database holds the last version pulled"
    } else {
        "stopped (asked to): every change seen is pushed"
    }
}

/// The exit code of a subscriber's end; a failure of the pull subscriber says so.
fn exit_code(
    line: Line,
    ended: crate::Result<Ended>,
    following: Option<String>,
) -> anyhow::Result<ExitCode> {
    match ended {
        Ok(Ended::Shutdown) => {
            line.out(stopped_cleanly(following.is_some()).into());
            Ok(ExitCode::from(exit::OK))
        }
        Ok(Ended::Unpushed(e)) => {
            Err(anyhow::Error::from(e).context("stopped with changes not pushed"))
        }
        Ok(Ended::Interrupted) => Ok(ExitCode::from(exit::INTERRUPTED)),
        Err(e) => match following {
            Some(label) => Err(anyhow::Error::from(e).context(label)),
            None => Err(e.into()),
        },
    }
}

/// `push LOCAL REMOTE --subscribe`: push after changes until `shutdown`.
pub(super) async fn run_push(
    pusher: Pusher,
    timing: &TimingArgs,
    global: &Global,
    shutdown: &Shutdown,
) -> anyhow::Result<ExitCode> {
    let line = Line {
        quiet: global.quiet,
    };
    let mut following = None;
    let ended = plan::push(pusher, timing.options(), shutdown, |e| {
        print(line, &mut following, e);
    })
    .await;
    exit_code(line, ended, following)
}

/// `push LOCAL REMOTE REMOTE... --subscribe`: one push subscriber per destination, side
/// by side, each line prefixed with its destination; until `shutdown`. The exit code is
/// the first destination's failure (in the order given), else 0.
pub(super) async fn run_push_many(
    destinations: Vec<plan::Destination>,
    timing: &TimingArgs,
    global: &Global,
    shutdown: &Shutdown,
) -> anyhow::Result<ExitCode> {
    let line = Line {
        quiet: global.quiet,
    };
    let labels: Vec<String> = destinations.iter().map(plan::Destination::label).collect();
    let mut following: Vec<Option<String>> = vec![None; labels.len()];
    let ended = plan::push_many(destinations, timing.options(), shutdown, |i, event| {
        note_following(&mut following[i], &event);
        match text(event) {
            Some((Stream::Out, s)) => line.out(format!("{}: {s}", labels[i])),
            Some((Stream::Err, s)) => line.err(format!("{}: {s}", labels[i])),
            None => {}
        }
    })
    .await;
    let mut first: Option<anyhow::Error> = None;
    let mut interrupted = false;
    for ((ended, label), following) in ended.into_iter().zip(&labels).zip(following) {
        match ended {
            Ok(Ended::Shutdown) => {
                line.out(format!("{label}: {}", stopped_cleanly(following.is_some())));
            }
            Ok(Ended::Interrupted) => interrupted = true,
            Ok(Ended::Unpushed(e)) => {
                line.err(format!("{label}: stopped with changes not pushed: {e}"));
                first.get_or_insert_with(|| {
                    anyhow::Error::from(e)
                        .context(format!("{label}: stopped with changes not pushed"))
                });
            }
            Err(e) => {
                line.err(format!("{label}: {e}"));
                first.get_or_insert_with(|| anyhow::Error::from(e).context(label.clone()));
            }
        }
    }
    match first {
        Some(e) => Err(e),
        None if interrupted => Ok(ExitCode::from(exit::INTERRUPTED)),
        None => Ok(ExitCode::from(exit::OK)),
    }
}

/// `pull REMOTE --subscribe`: pull each new version until `shutdown`.
pub(super) async fn run_pull(
    puller: Puller,
    global: &Global,
    shutdown: &Shutdown,
) -> anyhow::Result<ExitCode> {
    let line = Line {
        quiet: global.quiet,
    };
    let mut following = None;
    let ended = plan::pull(puller, shutdown, |e| print(line, &mut following, e)).await;
    exit_code(line, ended, following)
}

/// Arguments of `sqlferry subscribe`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
sqlferry subscribe app.db --wait-idle 10m     push app.db after changes (it was pushed before, with a key)\n  \
sqlferry subscribe app.db-sqlferry           follow the replica the sidecar names, into app.db\n\n\
For a database, the key saved by its first push decides: a PUSH key makes a push \
subscriber (which needs --wait-idle), a PULL key a pull subscriber. Without a saved key, \
the sidecar beside the database makes a pull subscriber; with the embedded store, the \
database's last sync decides (pushed: push subscriber, pulled: pull subscriber).")]
pub struct SubscribeArgs {
    /// A database pushed or pulled before, or a sidecar file (`<db>-sqlferry`).
    pub target: String,
    /// The commit message of each pushed version [default: "sqlferry subscribe: TRIGGER"].
    #[arg(
        short,
        long,
        value_name = "MSG",
        default_value = "",
        hide_default_value = true
    )]
    pub message: String,
    /// When to push (push subscribers).
    #[command(flatten)]
    pub timing: TimingArgs,
    /// How pages travel.
    #[command(flatten)]
    pub compress: super::CompressArgs,
    /// The encryption key, for an encrypted replica (never saved: give it each time).
    #[command(flatten)]
    pub encryption: super::encryption::EncryptionArgs,
}

impl SubscribeArgs {
    /// Runs the command.
    pub async fn run(self, global: &Global, shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        let keys = self.encryption.keys(global.quiet)?;
        let pass = self.encryption.passphrases(global.quiet)?;
        let target = expand_tilde(&self.target);
        let mode = self.compress.compress;
        match plan::resolve(target, self.target.clone()).await? {
            Plan::Push(mut pusher) => {
                pusher.message = self.message.clone();
                pusher.server = pusher.server.with_compress(mode);
                let keys = super::push::keyed(&mut pusher, &keys, &pass).await?;
                run_push(pusher, &self.timing, global, shutdown)
                    .await
                    .map_err(|e| super::encryption::name_key(e, &keys))
            }
            Plan::Pull(mut puller) => {
                puller.server = puller.server.with_compress(mode);
                let keys = super::encryption::with_passphrases(
                    &keys,
                    &pass,
                    &puller.server,
                    &puller.replica,
                    puller.key.as_deref(),
                    false,
                )
                .await?;
                puller.encryption = super::encryption::keyring(&keys);
                run_pull(puller, global, shutdown)
                    .await
                    .map_err(|e| super::encryption::name_key(e, &keys))
            }
        }
    }
}

/// Arguments of `sqlferry sync-now`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
sqlferry sync-now acme/app.db       push subscribers push now, pull subscribers pull now\n\n\
Returns at once, saying how many running subscribers were reached; it does not wait for \
their syncs. A push subscriber that is pushing already pushes once more after. With a \
server, it needs a PUSH or admin key; with the embedded store, it reaches the subscribers \
running on this machine.")]
pub struct SyncNowArgs {
    /// The replica, namespace/name.
    #[arg(required_unless_present = "from")]
    pub remote: Option<String>,
    /// The replica of a sidecar.
    #[command(flatten)]
    pub from: super::FromArgs,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// The server and the key.
    #[command(flatten)]
    pub connection: RemoteArgs,
}

impl SyncNowArgs {
    /// Runs the command.
    pub async fn run(self, global: &Global, shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        let (spec, connection) = self
            .from
            .resolve(self.remote.as_deref(), self.connection.options())?;
        let replica = ReplicaPath::parse(&spec)?;
        let asked = super::interruptible(shutdown, async {
            let reached = crate::client::sync_now(&connection, &replica).await?;
            if self.json {
                out(format_args!(
                    "{}",
                    serde_json::json!({"replica": replica.as_str(), "reached": reached})
                ))?;
            } else if !global.quiet {
                let s = if reached == 1 { "" } else { "s" };
                out(format_args!(
                    "sync-now {replica}: {reached} subscriber{s} reached"
                ))?;
            }
            Ok(ExitCode::from(exit::OK))
        });
        asked.await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subscribe::push::{MergedPush, Pushed};

    fn pushed(version: u64, created: bool) -> Pushed {
        Pushed {
            version,
            copy: false,
            created,
            pages_sent: 3,
            pages_total: 10,
            bytes_sent: 12_288,
            duration: Duration::from_millis(250),
            saved_keys: None,
            merged: None,
        }
    }

    #[test]
    fn a_merged_push_says_what_it_merged_and_whether_local_was_kept() {
        let mut m = MergedPush {
            base: 7,
            onto: 9,
            candidate: 10,
            changes: 3,
            conflicts: 0,
            local_kept: false,
        };
        assert_eq!(
            merged_line("idle", &pushed(11, true), &m),
            "push (idle): merged v7 onto v9 → version 11 (this push kept as version 10) \
             (3 row changes of this push); LOCAL now holds version 11, in 250.00ms"
        );
        m.local_kept = true;
        m.conflicts = 1;
        let line = merged_line("idle", &pushed(11, true), &m);
        assert!(
            line.ends_with(
                "1 row changed on both sides decided); LOCAL was written meanwhile and kept \
                 its changes, now based on version 10, in 250.00ms"
            ),
            "{line}"
        );
        // Nothing of its own to merge: nothing stored.
        let m = MergedPush {
            base: 11,
            onto: 13,
            candidate: 0,
            changes: 0,
            conflicts: 0,
            local_kept: false,
        };
        assert_eq!(
            merged_line("sync-now", &pushed(13, false), &m),
            "push (sync-now): merged v11 onto v13: no change, version 13 holds it all \
             (0 row changes of this push); LOCAL now holds version 13, in 250.00ms"
        );
    }
}
