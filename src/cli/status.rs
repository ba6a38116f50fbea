//! `sqlferry status [TARGET]` and `sqlferry history [TARGET]`: is every database this
//! machine syncs safe, and how did its syncs go day by day. Both read the local sync
//! log (`crate::synclog`); neither talks to a store.

use std::process::ExitCode;
use std::time::Duration;

use super::{Global, exit, expand_tilde, human_bytes, is_local_path, out};
use crate::client::{Scope, State, Status};
use crate::shutdown::Shutdown;
use crate::synclog::running::Planned;

/// Arguments of `sqlferry status`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
Exit codes: 0 when every sync shown is healthy; 11 when one's last attempt failed, or \
its last success is older than --max-age; 8 when TARGET names nothing this machine \
synced. So a cron job or a monitoring check can run `sqlferry status --max-age 1h -q` \
and alert on a non-zero exit.

Judged from this machine's sync log ($XDG_STATE_HOME/sqlferry/syncs.sqlite): every \
push and pull, by hand or by a subscriber, is recorded there. `sqlferry history` shows \
its daily totals (SQLFERRY_SYNC_LOG=off records nothing). A subscriber running on this machine is shown with its next planned \
push and why, for example `next push in 7m: idle 10m`.")]
pub struct StatusArgs {
    /// A database file, its sidecar (DB-sqlferry), or a replica path (namespace/name);
    /// every database this machine syncs when left out.
    pub target: Option<String>,
    /// The database of a sidecar file (`<db>-sqlferry`), like the other commands'
    /// `--from`; the same as giving the sidecar as TARGET.
    #[arg(long, value_name = "SIDECAR", conflicts_with = "target")]
    pub from: Option<String>,
    /// Also unhealthy when the last success is older than this (e.g. 1h, 2d): pick
    /// more than the longest the database goes without a change.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub max_age: Option<Duration>,
    /// Print one JSON array, one object per database, replica and direction.
    #[arg(long)]
    pub json: bool,
}

impl StatusArgs {
    /// Runs the command.
    pub async fn run(mut self, global: &Global, _shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        if let Some(sidecar) = self.from.take() {
            if !expand_tilde(&sidecar).is_file() {
                return Err(
                    crate::Error::Usage(format!("--from {sidecar}: no such sidecar file")).into(),
                );
            }
            self.target = Some(sidecar);
        }
        let now = crate::epoch::now();
        let scope = scope(self.target.as_deref());
        let lines = crate::client::status(scope.clone(), self.max_age, now).await?;
        let unhealthy = lines.iter().filter(|s| s.is_unhealthy()).count();
        if lines.is_empty() && scope != Scope::All {
            let target = self.target.unwrap_or_default();
            anyhow::bail!(crate::Error::NotFound(format!(
                "no push or pull of {target} is recorded on this machine"
            )));
        }
        if self.json {
            out(format_args!("{}", serde_json::to_string(&lines)?))?;
        } else if !global.quiet {
            print_status(&lines, now)?;
        }
        Ok(ExitCode::from(if unhealthy > 0 {
            exit::UNHEALTHY
        } else {
            exit::OK
        }))
    }
}

/// What TARGET names: a database file or its sidecar (`app.db-sqlferry`) when it is a
/// local path by the rule DEST follows ([`is_local_path`]), else a replica path; nothing
/// is every database.
fn scope(target: Option<&str>) -> Scope {
    match target {
        None => Scope::All,
        Some(t) if is_local_path(t) => {
            let path = expand_tilde(t);
            let sidecar = crate::config::Sidecar::database_for(&path).filter(|_| path.is_file());
            Scope::Database(sidecar.unwrap_or(path))
        }
        Some(t) => Scope::Replica(t.to_owned()),
    }
}

fn print_status(lines: &[Status], now: i64) -> anyhow::Result<()> {
    if lines.is_empty() && crate::synclog::default_path().is_none() {
        return out(format_args!(
            "no push or pull is recorded: the sync log is off ({}=off, or no home directory)",
            crate::synclog::OFF_VAR
        ));
    }
    if lines.is_empty() {
        return out(format_args!(
            "no push or pull is recorded on this machine yet"
        ));
    }
    for s in lines {
        let h = &s.health;
        let state = match s.state {
            State::Ok => "ok",
            State::Late => "LATE",
            State::Failing => "FAILING",
        };
        let arrow = if h.op == "push" { "→" } else { "←" };
        out(format_args!(
            "{state:<8} {:<4} {} {arrow} {} ({})",
            h.op, h.database, h.replica, h.store
        ))?;
        match h.success_at {
            Some(at) => out(format_args!(
                "         last success {} ({}), version {}, trigger {}",
                ago(now, at),
                crate::epoch::rfc3339(at),
                h.success_version.map_or("?".into(), |v| v.to_string()),
                h.success_trigger.as_deref().unwrap_or("?")
            ))?,
            None => out(format_args!("         never succeeded"))?,
        }
        if let Some(error) = &h.attempt_error {
            out(format_args!(
                "         last attempt {} failed ({} since the last success): {error}",
                ago(now, h.attempt_at),
                plural(h.failures_since, "failure")
            ))?;
        }
        if let Some(at) = s.changed_at {
            out(format_args!(
                "         changes not pushed yet: written {}",
                ago(now, at)
            ))?;
        }
        if let Some(sub) = &s.subscriber {
            let role = if sub.op == "push" { "push" } else { "pull" };
            let next = match &sub.next {
                Some(Planned { at: None, why }) => format!(": pushing now ({why})"),
                Some(Planned { at: Some(at), why }) => {
                    format!(": next push {}: {why}", until(now, *at))
                }
                None if sub.op == "push" => ": no push planned until the next change".into(),
                None => ": applies each new version as it lands".into(),
            };
            out(format_args!(
                "         {role} subscriber running (pid {}, since {}){next}",
                sub.pid,
                ago(now, sub.started_at)
            ))?;
        }
    }
    let count = |state| lines.iter().filter(|s| s.state == state).count();
    out(format_args!(
        "{}: {} ok, {} late, {} failing",
        plural(lines.len() as u64, "sync"),
        count(State::Ok),
        count(State::Late),
        count(State::Failing)
    ))
}

/// `5m ago`, `3h ago`, `2d ago` (`just now` under a minute; `in the future` when the
/// clock went back).
fn ago(now: i64, at: i64) -> String {
    let s = now - at;
    match s {
        i64::MIN..0 => "in the future".into(),
        0..60 => "just now".into(),
        60..3600 => format!("{}m ago", s / 60),
        3600..86_400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

/// `in 7m`, `in 2h`, `in 3d` (`now` under a second; `in 45s` under a minute).
fn until(now: i64, at: i64) -> String {
    let s = at - now;
    match s {
        i64::MIN..=0 => "now".into(),
        1..60 => format!("in {s}s"),
        60..3600 => format!("in {}m", (s + 59) / 60),
        3600..86_400 => format!("in {}h", s / 3600),
        _ => format!("in {}d", s / 86_400),
    }
}

fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// Arguments of `sqlferry history`.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
One row per day (UTC), newest first: syncs run (pushes and pulls, by hand or by a \
subscriber), new versions made, pages and bytes moved, the average duration, failures, \
and how many syncs each trigger started (manual, start, idle, max-interval, changes, \
sync-now, shutdown, retry; for pulls new-version, reconnect). Days without a sync are \
left out. Older syncs are kept as these daily totals, so the log stays small.")]
pub struct HistoryArgs {
    /// A database file, its sidecar, or a replica path; every sync when left out.
    pub target: Option<String>,
    /// How many days back, today included.
    #[arg(long, default_value_t = 7, value_name = "N")]
    pub days: u32,
    /// Print one JSON array, one object per day.
    #[arg(long)]
    pub json: bool,
}

impl HistoryArgs {
    /// Runs the command.
    pub async fn run(self, _global: &Global, _shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        let now = crate::epoch::now();
        let scope = scope(self.target.as_deref());
        let days = crate::client::history(scope, self.days, now).await?;
        if self.json {
            out(format_args!("{}", serde_json::to_string(&days)?))?;
            return Ok(ExitCode::from(exit::OK));
        }
        if days.is_empty() {
            out(format_args!("no sync in the last {} days", self.days))?;
            return Ok(ExitCode::from(exit::OK));
        }
        out(format_args!(
            "{:<10}  {:>6}  {:>8}  {:>9}  {:>10}  {:>8}  {:>8}  triggers",
            "day (UTC)", "syncs", "versions", "pages", "bytes", "average", "failures"
        ))?;
        for d in &days {
            let triggers: Vec<String> =
                d.triggers.iter().map(|(t, n)| format!("{t} {n}")).collect();
            out(format_args!(
                "{:<10}  {:>6}  {:>8}  {:>9}  {:>10}  {:>8}  {:>8}  {}",
                d.day,
                d.syncs,
                d.versions,
                d.pages,
                human_bytes(d.bytes),
                format!("{:.2}s", d.average().as_secs_f64()),
                d.failures,
                triggers.join(", ")
            ))?;
        }
        Ok(ExitCode::from(exit::OK))
    }
}
