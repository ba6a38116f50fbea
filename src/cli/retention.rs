//! `sqlferry retention REMOTE` (show or set which versions a replica keeps) and
//! `sqlferry prune REMOTE` (remove the others now and free their pages).
//!
//! On a server both changes need the admin key (a leaked PUSH key must not be able to
//! erase history); any key of the replica may show its policy.

use std::process::ExitCode;

use super::{Global, RemoteArgs, exit, human_bytes, out};
use crate::remote::RetentionChange;
use crate::shutdown::Shutdown;
use crate::store::{ReplicaPath, RetentionPolicy};

/// Arguments of `sqlferry retention`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
sqlferry retention acme/app.db                                   show the policy\n  \
sqlferry retention acme/app.db --keep-last 30 --keep-daily 14    keep these (and the latest)\n  \
sqlferry retention acme/app.db --keep-within 30d --keep-weekly 8\n  \
sqlferry retention acme/app.db --use-default                     follow the store's default\n  \
sqlferry retention --default --keep-daily 7                      the embedded store's default\n\n\
A version is kept when any rule keeps it; the latest version is always kept; with no rule \
everything is kept (the default). --keep-daily D keeps the newest version of each of the D \
most recent UTC days that have one (--keep-weekly: ISO weeks). The flags given are the whole \
new policy. It is applied after each new version, and at once by `sqlferry prune REMOTE` \
(try --dry-run first); on a server with an S3 store, by `prune` only. A server needs the admin key to change it (any key of the replica \
shows it); a server's default comes from `sqlferry serve --retention`.")]
pub struct RetentionArgs {
    /// The replica: namespace/name (not with --default).
    #[arg(required_unless_present = "default", conflicts_with = "default")]
    pub remote: Option<String>,
    /// Keep the N newest versions.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub keep_last: Option<u64>,
    /// Keep the newest version of each of the D most recent days that have one (UTC).
    #[arg(long, value_name = "D", value_parser = clap::value_parser!(u64).range(1..))]
    pub keep_daily: Option<u64>,
    /// Keep the newest version of each of the W most recent ISO weeks that have one.
    #[arg(long, value_name = "W", value_parser = clap::value_parser!(u64).range(1..))]
    pub keep_weekly: Option<u64>,
    /// Keep every version made within this span before now (30d, 12h, 2weeks).
    #[arg(long, value_name = "SPAN", value_parser = parse_span)]
    pub keep_within: Option<u64>,
    /// Keep every version (a policy of its own that removes nothing).
    #[arg(long, conflicts_with_all = ["keep_last", "keep_daily", "keep_weekly", "keep_within", "use_default"])]
    pub keep_all: bool,
    /// Drop the replica's own policy: the store's default applies (everything is kept
    /// when there is none).
    #[arg(long, conflicts_with_all = ["keep_last", "keep_daily", "keep_weekly", "keep_within", "default"])]
    pub use_default: bool,
    /// Show or set the embedded store's default policy, for replicas without their own.
    #[arg(long)]
    pub default: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// The server and the key.
    #[command(flatten)]
    pub connection: RemoteArgs,
}

fn parse_span(s: &str) -> Result<u64, String> {
    crate::store::parse_span(s).map_err(|e| e.to_string())
}

impl RetentionArgs {
    /// Runs the command.
    pub async fn run(self, _global: &Global, shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        super::interruptible(shutdown, self.retention()).await
    }

    /// The policy the flags give, if they give one.
    fn policy(&self) -> Option<RetentionPolicy> {
        let p = RetentionPolicy {
            keep_last: self.keep_last,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_within_seconds: self.keep_within,
        };
        (self.keep_all || !p.keeps_everything()).then_some(p)
    }

    async fn retention(self) -> anyhow::Result<ExitCode> {
        let connection = self.connection.options();
        if self.default {
            let policy = match self.policy() {
                Some(p) => crate::client::set_default_retention(&connection, Some(p)).await?,
                None => crate::client::default_retention(&connection).await?,
            };
            if self.json {
                out(format_args!(
                    "{}",
                    serde_json::json!({ "default": policy.clone().unwrap_or_default() })
                ))?;
            } else {
                out(format_args!(
                    "store default: {}",
                    policy.unwrap_or_default()
                ))?;
            }
            return Ok(ExitCode::from(exit::OK));
        }
        let remote = self
            .remote
            .as_deref()
            .expect("clap requires REMOTE without --default");
        let replica = ReplicaPath::parse(remote)?;
        let change = match (self.policy(), self.use_default) {
            (_, true) => RetentionChange::Clear,
            (Some(p), false) => RetentionChange::Set(p),
            (None, false) => RetentionChange::Show,
        };
        let shown = crate::client::retention(&connection, &replica, change).await?;
        if self.json {
            out(format_args!("{}", serde_json::to_string(&shown)?))?;
        } else {
            let from = match shown.source.as_str() {
                "replica" => "its own",
                "default" => "the store's default",
                _ => "nothing set",
            };
            out(format_args!("{}: {} ({from})", shown.replica, shown.policy))?;
        }
        Ok(ExitCode::from(exit::OK))
    }
}

/// Arguments of `sqlferry prune`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
sqlferry prune acme/app.db --dry-run     what would go, and the bytes it would free\n  \
sqlferry prune acme/app.db               remove them now\n\n\
It removes the versions the replica's retention policy (`sqlferry retention`) does not keep \
(never the latest), then frees the pages no version of any replica uses any more, and \
prints what it removed and the bytes freed. Pulls of a removed version are refused from then \
on (exit 8). It waits up to 60 s for running pushes and pulls to let it free pages; if they \
keep the store busy, the versions are removed and their pages freed by the next prune. A \
server needs the admin key.\n\n\
On a server with an S3 store (serve --store s3://…), the pages are freed by a sweep of the \
whole bucket: the packs, indexes and chunks no remaining version of any replica names and \
older than the server's --gc-grace (default 1h, so a push in flight keeps what it wrote) are \
deleted; --dry-run lists them and their bytes. One sweep at a time.")]
pub struct PruneArgs {
    /// The replica: namespace/name.
    pub remote: String,
    /// Say what would be removed and freed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// The server and the key (the admin key, for a server).
    #[command(flatten)]
    pub connection: RemoteArgs,
}

impl PruneArgs {
    /// Runs the command.
    pub async fn run(self, _global: &Global, shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        super::interruptible(shutdown, self.prune()).await
    }

    async fn prune(self) -> anyhow::Result<ExitCode> {
        let replica = ReplicaPath::parse(&self.remote)?;
        let connection = self.connection.options();
        let report = crate::client::prune(&connection, &replica, self.dry_run).await?;
        if self.json {
            out(format_args!("{}", serde_json::to_string(&report)?))?;
            return Ok(ExitCode::from(exit::OK));
        }
        let (would, removed) = if report.dry_run {
            ("would remove", "would free")
        } else {
            ("removed", "freed")
        };
        if report.removed.is_empty() {
            out(format_args!(
                "{}: nothing to remove ({} versions kept)",
                report.replica, report.kept
            ))?;
        } else {
            out(format_args!(
                "{}: {would} {} version{}: {}; {} kept",
                report.replica,
                report.removed.len(),
                if report.removed.len() == 1 { "" } else { "s" },
                crate::store::number_ranges(&report.removed),
                report.kept
            ))?;
        }
        if let Some(swept) = report.swept_objects {
            // An S3 store: the sweep's objects, not pages.
            for key in &report.swept {
                out(format_args!("  {key}"))?;
            }
            out(format_args!(
                "{removed} {} ({swept} object{} no version names, older than the server's --gc-grace; {} younger left)",
                human_bytes(report.freed_bytes),
                if swept == 1 { "" } else { "s" },
                report.young_objects.unwrap_or(0)
            ))?;
            return Ok(ExitCode::from(exit::OK));
        }
        match &report.deferred {
            Some(why) => out(format_args!("pages not freed yet: {why}"))?,
            None => out(format_args!(
                "{removed} {} ({} pages no version uses)",
                human_bytes(report.freed_bytes),
                report.freed_pages
            ))?,
        }
        Ok(ExitCode::from(exit::OK))
    }
}
