//! `push --subscribe`, `pull --subscribe`, `sqlferry subscribe` and `sqlferry sync-now`:
//! flags into plain settings, then the `subscribe` module's loops.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Global, RemoteArgs, exit, expand_tilde, out};
use crate::client::{Puller, Pusher};
use crate::config::{Secrets, Sidecar};
use crate::protocol::control::SubscriberRole;
use crate::remote::{Server, no_progress};
use crate::shutdown::Shutdown;
use crate::store::ReplicaPath;
use crate::subscribe::pull::Pulled;
use crate::subscribe::push::{Ended, PushSubscriber, Pushed};
use crate::subscribe::timer::Timing;
use crate::subscribe::{Line, Signals, duration};

/// How long pending changes may take to push after SIGINT or SIGTERM.
const SHUTDOWN_BOUND: Duration = Duration::from_secs(60);

fn parse_duration(s: &str) -> Result<Duration, String> {
    duration::parse(s)
}

/// When a push subscriber pushes.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Subscribe timing (durations: 90s, 10m, 1h30m, 3d, 2w)")]
pub struct TimingArgs {
    /// Push once LOCAL has had no commit for this long (10s to 24d; required for a push
    /// subscriber).
    #[arg(long = "waitIdle", visible_alias = "wait-idle", value_name = "DURATION", value_parser = parse_duration)]
    pub wait_idle: Option<Duration>,
    /// Leave at least this long between pushes [default: half of --maxInterval, else 0].
    #[arg(long = "minInterval", visible_alias = "min-interval", value_name = "DURATION", value_parser = parse_duration)]
    pub min_interval: Option<Duration>,
    /// Push at least this often while changes keep coming, idle or not [default: never
    /// without idle].
    #[arg(long = "maxInterval", visible_alias = "max-interval", value_name = "DURATION", value_parser = parse_duration)]
    pub max_interval: Option<Duration>,
    /// Push without waiting for idle once this many commits were seen since the last
    /// push (commits closer together than about 50 ms are seen as one).
    #[arg(long = "maxChanges", visible_alias = "max-changes", value_name = "N")]
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

    fn timing(&self) -> anyhow::Result<Timing> {
        let wait_idle = self.wait_idle.ok_or_else(|| {
            crate::Error::Usage(
                "a push subscriber needs --waitIdle (for example --waitIdle 10m)".into(),
            )
        })?;
        Timing::new(
            wait_idle,
            self.min_interval,
            self.max_interval,
            self.max_changes,
        )
        .map_err(|e| crate::Error::Usage(e).into())
    }

    fn describe(t: &Timing) -> String {
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

/// Runs a subscriber loop on a runtime of its own. The runtime is not waited for when
/// the loop ends: a push or pull still running on a blocking thread then (after a
/// second signal) is abandoned with the process, and a sync cut short commits nothing.
fn run_loop<T>(f: impl std::future::Future<Output = crate::Result<T>>) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(f);
    runtime.shutdown_background();
    Ok(result?)
}

/// `push LOCAL REMOTE --subscribe`: push after changes until a signal.
pub(super) fn run_push(
    mut pusher: Pusher,
    timing: &TimingArgs,
    global: &Global,
) -> anyhow::Result<ExitCode> {
    let line = Line::new(global.quiet);
    // No key of our own: the sidecar beside LOCAL may hold a PULL key for the replica.
    let mut sidecar_key = false;
    if pusher.key.is_none()
        && pusher.server.needs_key()
        && let Ok(s) = Sidecar::load(&Sidecar::path_for(&pusher.local))
        && s.server == pusher.server.url()
        && s.replica == pusher.replica.as_str()
    {
        pusher.key = Some(s.key);
        sidecar_key = true;
    }
    pusher.require_key()?;
    let settings = timing.timing()?;
    let (server, replica, key) = (
        pusher.server.clone(),
        pusher.replica.clone(),
        pusher.key.clone(),
    );
    let database = pusher.local.clone();
    let message = std::mem::take(&mut pusher.message);
    let shared = Arc::new(Mutex::new(pusher));
    let push = {
        let shared = shared.clone();
        move |trigger: crate::subscribe::timer::Trigger| -> anyhow::Result<Pushed> {
            let mut p = shared.lock().unwrap_or_else(|e| e.into_inner());
            p.message = if message.is_empty() {
                format!("sqlferry subscribe: {}", trigger.as_str())
            } else {
                message.clone()
            };
            // TEMP(issue 9 merge): the subscriber loop calls the client itself.
            let report = tokio::runtime::Handle::current().block_on(p.push(no_progress()))?;
            if let Some(saved) = &report.saved_keys {
                eprintln!("{}", super::push::new_keys_note(saved, &p));
            }
            let o = report.outcome;
            Ok(Pushed {
                version: o.version,
                created: o.created,
                pages_sent: u64::from(o.stats.pages_sent),
                pages_total: u64::from(o.stats.pages_total),
                bytes_sent: o.stats.bytes_sent,
                duration: o.stats.duration,
            })
        }
    };
    let ended = run_loop(async {
        let signals = Signals::catch()?;
        let mut subscription = server
            .subscribe(&replica, SubscriberRole::Push, key.clone())
            .await?;
        line.out(format!(
            "push subscriber: {} to {replica} on {}, {}",
            database.display(),
            server.url(),
            TimingArgs::describe(&settings)
        ));
        let subscriber = PushSubscriber {
            database: database.clone(),
            timing: settings,
            poll: timing.poll,
            shutdown_bound: SHUTDOWN_BOUND,
            report_after: timing.report_after,
            push: Arc::new(push),
        };
        let ended = subscriber.run(&mut subscription, signals, line).await;
        subscription.close().await;
        ended
    })?;
    match ended {
        Ended::Shutdown => Ok(ExitCode::from(exit::OK)),
        Ended::Unpushed(e) => Err(e.context("stopped with changes not pushed")),
        Ended::Interrupted => Ok(ExitCode::from(exit::INTERRUPTED)),
        Ended::PullKey => {
            let from = if sidecar_key {
                " (from the sidecar)"
            } else {
                ""
            };
            let p = shared.lock().unwrap_or_else(|e| e.into_inner());
            // Following writes LOCAL: never over changes that were not synced.
            if let Some(why) = unsynced_changes(&p.local, &p.server, &p.replica)? {
                return Err(crate::Error::Auth(format!(
                    "the key{from} for {replica} is a PULL key, and {} {why}: following the \
                     replica would overwrite it; push it with its PUSH key (--key, or the admin key)",
                    p.local.display()
                ))
                .into());
            }
            line.out(format!(
                "the key{from} for {replica} is a PULL key: following the replica as a pull subscriber instead"
            ));
            let puller = Puller {
                server: p.server.clone(),
                replica: p.replica.clone(),
                local: p.local.clone(),
                database: p.database.clone(),
                key: p.key.clone(),
                force: false,
            };
            drop(p);
            run_pull(puller, global)
        }
    }
}

/// Why `local` holds changes no sync of `replica` carried, if it does: a file that
/// does not exist, or whose digest is the one of its last sync with `replica`, has
/// none.
fn unsynced_changes(
    local: &Path,
    server: &Server,
    replica: &ReplicaPath,
) -> anyhow::Result<Option<&'static str>> {
    if !local.exists() {
        return Ok(None);
    }
    let database = crate::config::database_key(local);
    let Some(last) = crate::history::last_with(&database, &server.url(), replica.as_str()) else {
        return Ok(Some("was never pulled from it"));
    };
    let now = crate::client::local_digest(local)?;
    Ok((now.as_deref() != Some(last.digest.as_str())).then_some("has changed since its last sync"))
}

/// `pull REMOTE --subscribe`: pull each new version until a signal.
pub(super) fn run_pull(puller: Puller, global: &Global) -> anyhow::Result<ExitCode> {
    let line = Line::new(global.quiet);
    let held = crate::history::last_with(
        &puller.database,
        &puller.server.url(),
        puller.replica.as_str(),
    )
    .map(|l| l.version);
    let (server, replica, key) = (
        puller.server.clone(),
        puller.replica.clone(),
        puller.key.clone(),
    );
    if server.needs_key() && key.is_none() {
        return Err(crate::Error::Auth(format!(
            "no key for {replica} on {}: pass --key, set SQLFERRY_KEY, or use the replica's sidecar (--from)",
            server.url()
        ))
        .into());
    }
    let local = puller.local.clone();
    let kept = Mutex::new(crate::client::Kept::default());
    let pull = move || -> anyhow::Result<Pulled> {
        let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
        // TEMP(issue 9 merge): the subscriber loop calls the client itself.
        let o = tokio::runtime::Handle::current().block_on(puller.pull_latest_kept(&mut kept))?;
        Ok(Pulled {
            version: o.version,
            pages_written: u64::from(o.stats.pages_sent),
            pages_total: u64::from(o.stats.pages_total),
            bytes_received: o.stats.bytes_received,
            duration: o.stats.duration,
        })
    };
    let label = format!("pull subscriber of {replica} on {}", server.url());
    let interrupted = run_loop(async {
        let signals = Signals::catch()?;
        let mut subscription = server
            .subscribe(&replica, SubscriberRole::Pull, key)
            .await?;
        line.out(format!(
            "pull subscriber: {replica} on {} into {}",
            server.url(),
            local.display()
        ));
        let ended =
            crate::subscribe::pull::run(&mut subscription, Arc::new(pull), held, signals, line)
                .await;
        subscription.close().await;
        ended
    })
    .context(label)?;
    Ok(ExitCode::from(if interrupted {
        exit::INTERRUPTED
    } else {
        exit::OK
    }))
}

/// Arguments of `sqlferry subscribe`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
sqlferry subscribe app.db --waitIdle 10m     push app.db after changes (it was pushed before, with a key)\n  \
sqlferry subscribe app.db-sqlferry           follow the replica the sidecar names, into app.db\n\n\
For a database, the key saved by its first push decides: a PUSH key makes a push \
subscriber (which needs --waitIdle), a PULL key a pull subscriber. Without a saved key, \
the sidecar beside the database makes a pull subscriber; with the embedded store, the \
database's last sync decides (pushed: push subscriber, pulled: pull subscriber).")]
pub struct SubscribeArgs {
    /// A database pushed or pulled before, or a sidecar file (`<db>-sqlferry`).
    pub target: String,
    /// The commit message of each pushed version [default: "sqlferry subscribe: TRIGGER"].
    #[arg(short, long, value_name = "MSG", default_value = "")]
    pub message: String,
    /// When to push (push subscribers).
    #[command(flatten)]
    pub timing: TimingArgs,
}

impl SubscribeArgs {
    /// Runs the command.
    pub fn run(self, global: &Global) -> anyhow::Result<ExitCode> {
        let target = expand_tilde(&self.target);
        if let Some(database) = Sidecar::database_for(&target).filter(|_| target.is_file()) {
            return self.follow_sidecar(&target, &database, global);
        }
        let database = crate::config::database_key(&target);
        if let Some(saved) = Secrets::load()?.for_database(&database).cloned() {
            let server = Server::parse(Some(&saved.server))?;
            let replica = ReplicaPath::parse(&saved.replica)?;
            let mut pusher = Pusher::new(&target, replica, server, None)?;
            pusher.message = self.message.clone();
            return run_push(pusher, &self.timing, global);
        }
        let sidecar = Sidecar::path_for(&target);
        if sidecar.is_file() {
            return self.follow_sidecar(&sidecar, &target, global);
        }
        let Some(last) = crate::history::last(&target) else {
            return Err(crate::Error::Usage(format!(
                "{} has no saved key, no sidecar ({}) and no sync on record: push it once \
                 (sqlferry push {} NAMESPACE/NAME) or name a sidecar",
                target.display(),
                sidecar.display(),
                self.target
            ))
            .into());
        };
        let server = Server::parse(Some(&last.server))?;
        let replica = ReplicaPath::parse(&last.replica)?;
        if last.op == "pull" {
            let puller = Puller {
                key: None,
                server,
                replica,
                local: target,
                database,
                force: false,
            };
            return run_pull(puller, global);
        }
        let mut pusher = Pusher::new(&target, replica, server, None)?;
        pusher.message = self.message.clone();
        run_push(pusher, &self.timing, global)
    }

    fn follow_sidecar(
        &self,
        sidecar: &Path,
        database: &Path,
        global: &Global,
    ) -> anyhow::Result<ExitCode> {
        let s = Sidecar::load(sidecar)?;
        let puller = Puller {
            server: Server::parse(Some(&s.server))?,
            replica: ReplicaPath::parse(&s.replica)?,
            local: database.to_owned(),
            database: crate::config::database_key(database),
            key: Some(s.key),
            force: false,
        };
        run_pull(puller, global)
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
    pub remote: String,
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
        let replica = ReplicaPath::parse(&self.remote)?;
        let connection = self.connection.options();
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
