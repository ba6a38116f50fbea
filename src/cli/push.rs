//! `sqlferry push LOCAL [REMOTE]`: send what changed, to a local copy or as a new
//! version of a replica.

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::progress::Bar;
use super::{Global, RemoteArgs, exit, expand_tilde, human_bytes, is_local_path, out};
use crate::client::{Pusher, SavedKeys};
use crate::engine::Progress;
use crate::protocol::MAX_TEXT_BYTES;
use crate::protocol::control::MAX_FOLLOWERS_WAIT;
use crate::shutdown::Shutdown;
use crate::store::ReplicaPath;
use crate::subscribe::duration;

/// Arguments of `sqlferry push`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
sqlferry push app.db acme/app.db -m \"before migration\"   a new version of replica acme/app.db\n  \
sqlferry push app.db /backup/app.db                      keep a local copy up to date\n  \
sqlferry push app.db ./copy.db --json                    print figures as one JSON object\n  \
sqlferry push app.db acme/app.db --subscribe --wait-idle 10m --max-interval 24h\n    \
keep going: push after 10 minutes without a commit, at least daily (docs/subscribe.md)\n\n\
REMOTE is a local file when it starts with /, ./, ../ or ~/, or already exists; otherwise \
it is a replica path, namespace/name, in the store (--server, SQLFERRY_SERVER, or the \
embedded store in ~/.local/share/sqlferry).\n\n\
Keys (servers only): --key, SQLFERRY_KEY, or the PUSH key saved by the first push. The \
first push of a replica, with the admin key, saves a PUSH key for LOCAL in the secrets \
file (~/.config/sqlferry/secrets.json, mode 0600) and writes LOCAL-sqlferry, a sidecar \
with the server, the replica and a PULL key.\n\n\
LOCAL is only read, in one read transaction: an application writing it in WAL mode never \
waits. Only the pages that differ are sent. A local copy changes in one transaction after \
its digest has been checked; a replica gets a new version only when complete and verified, \
and only if something changed.\n\n\
A push is based on the version LOCAL was last pushed or pulled as, with this replica on this \
store. If the replica has moved past it, the push is refused with VERSION_CONFLICT (exit 6) and \
nothing changes: to compare, pull the replica into another file (sqlferry pull REMOTE other.db); \
--force replaces the replica's latest version with LOCAL. (A pull into LOCAL itself refuses to \
overwrite changes that were never pushed, exit 9.)\n\n\
LOCAL must pass PRAGMA quick_check, run in the read transaction that is pushed: a damaged \
database is refused with exit 7 and replaces nothing; --allow-corrupt pushes it anyway.\n\n\
Without --server, SQLFERRY_SERVER or a configured server, a LOCAL whose PUSH key is saved \
goes to the server that key is for when REMOTE is that key's replica (stderr says so), and \
is refused for another replica (name its store); otherwise it goes to the embedded store.\n\n\
Waiting for followers (servers only): --wait-followers N returns once N pull subscribers \
(pull --subscribe) report having applied the version this push made (or, when nothing \
changed, the latest one), or a later one: the write is then on N other machines.\n  \
sqlferry push app.db acme/app.db --wait-followers 1 --timeout 30s\n\
If --timeout (default 60s, at most 1h) passes first, the push exits 12: the version WAS \
committed, it is just not confirmed on N followers. The embedded store does not know its \
pull subscribers: --wait-followers there is a usage error (exit 2). The replica's followers, \
their versions and lag are in the server's API (GET /api/replicas/NAMESPACE/NAME).")]
pub struct PushArgs {
    /// The database to push (read-only; a live database is fine).
    pub local: String,
    /// Where to: a replica path (namespace/name) or a local file path.
    pub remote: String,
    /// The version's commit message (at most 4096 bytes).
    #[arg(
        short,
        long,
        value_name = "MSG",
        default_value = "",
        hide_default_value = true
    )]
    pub message: String,
    /// Push even if the replica moved past the version LOCAL is based on.
    #[arg(long)]
    pub force: bool,
    /// With the admin key: have the server mint new PUSH and PULL keys for an existing
    /// replica too (a first push gets them anyway); saved like a first push's.
    #[arg(long)]
    pub new_keys: bool,
    /// Say what would happen, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Push LOCAL even if it fails `PRAGMA quick_check` (a damaged database then
    /// replaces the copy or becomes the replica's latest version).
    #[arg(long)]
    pub allow_corrupt: bool,
    /// Print one JSON object with the figures on stdout.
    #[arg(long, conflicts_with = "subscribe")]
    pub json: bool,
    /// Keep going: watch LOCAL and push after changes, as the timing flags say (until
    /// SIGINT or SIGTERM, which push pending changes first).
    #[arg(long, requires = "wait_idle", conflicts_with = "dry_run")]
    pub subscribe: bool,
    /// After the push, wait until N pull subscribers report having applied its version
    /// (or a later one); exit 12 if --timeout passes first. Servers only.
    #[arg(long, value_name = "N", conflicts_with_all = ["subscribe", "dry_run"],
          value_parser = clap::builder::RangedU64ValueParser::<u32>::new().range(1..))]
    pub wait_followers: Option<u32>,
    /// How long --wait-followers waits at most (at most 1h).
    #[arg(long, value_name = "DURATION", requires = "wait_followers", default_value = "60s",
          value_parser = super::subscribe::parse_duration)]
    pub timeout: Duration,
    /// When to push, with --subscribe.
    #[command(flatten)]
    pub timing: super::subscribe::TimingArgs,
    /// The server and the key.
    #[command(flatten)]
    pub connection: RemoteArgs,
}

impl PushArgs {
    /// Runs the command.
    pub async fn run(self, global: &Global, shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        let local = expand_tilde(&self.local);
        if self.wait_followers.is_some() {
            self.check_wait()?;
        }
        if is_local_path(&self.remote) {
            return super::interruptible(shutdown, self.push_file(&local, global)).await;
        }
        let replica = ReplicaPath::parse(&self.remote)?;
        if self.message.len() > MAX_TEXT_BYTES {
            return Err(crate::Error::Usage(format!(
                "the commit message has {} bytes; at most {MAX_TEXT_BYTES} are allowed",
                self.message.len()
            ))
            .into());
        }
        let resolved = self
            .connection
            .options()
            .resolve_for(&local, &replica)
            .await?;
        if let Some(saved) = &resolved.from_saved_key
            && !global.quiet
        {
            eprintln!("{}", using_saved_server(saved, &local, &replica));
        }
        let mut pusher = Pusher::open(
            &local,
            replica,
            resolved.server,
            self.connection.key.clone(),
        )
        .await?;
        pusher.message = self.message.clone();
        pusher.force = self.force;
        pusher.new_keys = self.new_keys;
        pusher.allow_corrupt = self.allow_corrupt;
        pusher.wait_followers = self.wait_followers.is_some();
        if self.wait_followers.is_some() && !pusher.server.needs_key() {
            return Err(crate::Error::Usage(format!(
                "--wait-followers needs a server (sqlferry serve; --server ws://HOST:PORT): {} \
                 is the embedded store, which does not know its pull subscribers; nothing was pushed",
                pusher.server.url()
            ))
            .into());
        }
        if self.subscribe {
            return super::subscribe::run_push(pusher, &self.timing, global, shutdown).await;
        }
        if self.timing.any() {
            return Err(crate::Error::Usage(
                "--wait-idle, --min-interval, --max-interval and --max-changes need --subscribe"
                    .into(),
            )
            .into());
        }
        pusher.require_key()?;
        super::interruptible(shutdown, async {
            if self.dry_run {
                return self.dry_run(&pusher).await;
            }
            let bar: Arc<dyn Progress> = Arc::new(Bar::new(!global.quiet && !self.json));
            let report = pusher.push(bar).await?;
            // The push line first: the version exists, whatever the wait brings.
            if !self.json {
                self.print(&pusher, &report.outcome, None, global)?;
            }
            if let Some(saved) = &report.saved_keys {
                eprintln!("{}", new_keys_note(saved));
            }
            let followers = match self.wait_followers {
                Some(n) => Some(self.wait(&pusher, report.outcome.version, n, global).await?),
                None => None,
            };
            if self.json {
                self.print(&pusher, &report.outcome, followers, global)?;
            }
            match (self.wait_followers, followers) {
                (Some(n), Some(f)) if !f.reached => {
                    eprintln!(
                        "sqlferry: error: {}",
                        not_followed(&pusher.replica, report.outcome.version, f.count, n, self.timeout)
                    );
                    Ok(ExitCode::from(exit::NOT_FOLLOWED))
                }
                (Some(n), Some(f)) => {
                    if !self.json && !global.quiet {
                        out(format_args!(
                            "followed: version {} of {} is applied by {} pull subscriber{} (waited for {n})",
                            report.outcome.version,
                            pusher.replica,
                            f.count,
                            if f.count == 1 { "" } else { "s" }
                        ))?;
                    }
                    Ok(ExitCode::from(exit::OK))
                }
                _ => Ok(ExitCode::from(exit::OK)),
            }
        })
        .await
    }

    /// `--wait-followers` is for a replica on a server, with a timeout the server grants.
    fn check_wait(&self) -> anyhow::Result<()> {
        if is_local_path(&self.remote) {
            return Err(crate::Error::Usage(format!(
                "--wait-followers needs a replica on a server; {} is a local file",
                self.remote
            ))
            .into());
        }
        if self.timeout > MAX_FOLLOWERS_WAIT || self.timeout.is_zero() {
            return Err(crate::Error::Usage(format!(
                "--timeout {}: a wait for followers lasts from 1s to {}",
                duration::format(self.timeout),
                duration::format(MAX_FOLLOWERS_WAIT)
            ))
            .into());
        }
        Ok(())
    }

    /// Waits for `n` followers of `version`, a line on stderr saying how many hold it
    /// so far (on a terminal, unless quiet or JSON), cleared at the end.
    async fn wait(
        &self,
        pusher: &Pusher,
        version: u64,
        n: u32,
        global: &Global,
    ) -> anyhow::Result<crate::remote::Followers> {
        let line = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
        if !global.quiet && !self.json && std::io::stderr().is_terminal() {
            line.set_draw_target(ProgressDrawTarget::stderr());
            line.set_style(
                ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                    .expect("the template is valid"),
            );
            line.enable_steady_tick(Duration::from_millis(200));
        }
        let (replica, shown) = (pusher.replica.to_string(), line.clone());
        let message = move |count: u32| {
            format!("waiting for followers of {replica}: {count} of {n} hold version {version}")
        };
        line.set_message(message(0));
        let followed = pusher
            .wait_followers(version, n, self.timeout, &mut |count| {
                shown.set_message(message(count));
            })
            .await;
        line.finish_and_clear();
        Ok(followed?)
    }

    /// The result, as a line or one JSON object.
    fn print(
        &self,
        pusher: &Pusher,
        outcome: &crate::remote::PushOutcome,
        followers: Option<crate::remote::Followers>,
        global: &Global,
    ) -> anyhow::Result<()> {
        let (replica, local) = (&pusher.replica, &pusher.local);
        if self.json {
            let mut v = serde_json::to_value(&outcome.stats)?;
            v["replica"] = replica.as_str().into();
            v["version"] = outcome.version.into();
            v["created"] = outcome.created.into();
            v["repaired"] = outcome.repaired.into();
            if let Some(f) = followers {
                // How many pull subscribers hold the version, and whether that is
                // the number waited for.
                v["followers"] = f.count.into();
                v["followed"] = f.reached.into();
            }
            out(format_args!("{v}"))?;
        } else if !global.quiet {
            let s = &outcome.stats;
            if outcome.created {
                out(format_args!(
                    "pushed {} to {replica}: version {} ({} of {} pages sent, {} sent) in {:.2?}",
                    local.display(),
                    outcome.version,
                    s.pages_sent,
                    s.pages_total,
                    human_bytes(s.bytes_sent),
                    s.duration
                ))?;
            } else if outcome.repaired > 0 {
                out(format_args!(
                    "repaired: {replica} is already at version {} ({}); {} damaged stored page(s) replaced with good ones",
                    outcome.version,
                    local.display(),
                    outcome.repaired
                ))?;
            } else {
                out(format_args!(
                    "no change: {replica} is already at version {} ({})",
                    outcome.version,
                    local.display()
                ))?;
            }
        }
        Ok(())
    }

    /// `--dry-run`: what a push would do, keys masked, nothing changed.
    async fn dry_run(&self, pusher: &Pusher) -> anyhow::Result<ExitCode> {
        let plan = pusher.plan().await?;
        let key = pusher.key.as_deref().map_or("no key".to_owned(), |k| {
            format!("key {}", crate::server::mask(k))
        });
        out(format_args!(
            "would push {} ({}, {} pages) to {} on {} with {key}: {}",
            pusher.local.display(),
            human_bytes(plan.size),
            plan.page_count,
            pusher.replica,
            pusher.server.url(),
            match (plan.latest, plan.conflict) {
                _ if plan.damaged.is_some() => format!(
                    "refused (exit 7), {}",
                    plan.damaged
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default()
                ),
                (_, true) => format!(
                    "refused, VERSION_CONFLICT: the replica is at version {}, LOCAL is based on {}",
                    plan.latest.unwrap_or(0),
                    plan.base
                        .map_or("no version".into(), |b| format!("version {b}"))
                ),
                (None, _) => "creating the replica as version 1".into(),
                (Some(n), _) => format!("version {} if anything changed since version {n}", n + 1),
            }
        ))?;
        Ok(ExitCode::from(if plan.damaged.is_some() {
            exit::VERIFY
        } else if plan.conflict {
            exit::CONFLICT
        } else {
            exit::OK
        }))
    }

    /// `push SRC DEST` between two local files.
    async fn push_file(&self, src: &Path, global: &Global) -> anyhow::Result<ExitCode> {
        let dest = expand_tilde(&self.remote);
        if self.dry_run {
            let plan = crate::client::plan_copy(src, &dest, self.allow_corrupt).await?;
            out(format_args!(
                "would sync {} ({} pages) into {}{}",
                src.display(),
                plan.page_count,
                dest.display(),
                plan.damaged
                    .as_ref()
                    .map_or(String::new(), |e| format!(": refused (exit 7), {e}"))
            ))?;
            return Ok(ExitCode::from(if plan.damaged.is_some() {
                exit::VERIFY
            } else {
                exit::OK
            }));
        }
        let bar: Arc<dyn Progress> = Arc::new(Bar::new(!global.quiet && !self.json));
        let stats = crate::client::copy_file(src, &dest, self.allow_corrupt, bar).await?;
        if self.json {
            out(format_args!("{}", serde_json::to_string(&stats)?))?;
        } else if !global.quiet {
            out(format_args!(
                "{} -> {}: {} of {} pages sent ({} sent, {} received) in {:.2?}, digest {}",
                src.display(),
                dest.display(),
                stats.pages_sent,
                stats.pages_total,
                human_bytes(stats.bytes_sent),
                human_bytes(stats.bytes_received),
                stats.duration,
                stats.digest
            ))?;
        }
        Ok(ExitCode::from(exit::OK))
    }
}

/// What stderr says when no store was named and LOCAL's saved key chose the server.
pub(super) fn using_saved_server(server: &str, local: &Path, replica: &ReplicaPath) -> String {
    format!(
        "sqlferry: using {server}, the server {} was pushed to as {replica} (its key is \
         in the secrets file); --server names another store",
        local.display()
    )
}

/// The error line of a wait for followers that timed out: the version exists.
pub(super) fn not_followed(
    replica: &ReplicaPath,
    version: u64,
    count: u32,
    wanted: u32,
    timeout: Duration,
) -> String {
    format!(
        "version {version} of {replica} WAS committed, but only {count} of {wanted} pull \
         subscriber{s} reported having applied it within {t}; the server's API lists the \
         replica's followers and their lag",
        s = if wanted == 1 { "" } else { "s" },
        t = duration::format(timeout)
    )
}

/// What stderr says after a push saved new keys.
pub(super) fn new_keys_note(saved: &SavedKeys) -> String {
    format!(
        "new keys for {}: the PUSH key is saved in {} (next pushes of {} need no key); \
         {} holds the PULL key: copy it beside a database elsewhere and run it to pull",
        saved.replica,
        saved.secrets.display(),
        saved.local.display(),
        saved.sidecar.display()
    )
}
