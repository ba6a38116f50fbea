//! `sqlferry scrub`: checks a store on this machine — a server's `--data` directory or the
//! embedded store — page by page against the hashes, and every version's digest against
//! its manifest. It reports what is bad and which versions it touches, records the bad
//! pages so that the next push of the database resends them, and exits 7 when anything
//! is bad. It only reads the store (besides that record and the removal of files crashed
//! pushes left), so it is safe beside a running server.

use std::io::IsTerminal;
use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{Global, exit, expand_tilde, human_bytes, out};
use crate::shutdown::Shutdown;
use crate::store::ScrubProgress;

/// Arguments of `sqlferry scrub`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
sqlferry scrub --data /var/lib/sqlferry     a server's data directory (the server may run)\n  \
sqlferry scrub                              the embedded store of this machine\n  \
sqlferry scrub --server file:///backups     another store directory\n  \
sqlferry scrub --json                       one JSON object\n\n\
Exit status is 0 when everything is good, 7 when a stored page does not match its hash, a \
page a version needs is missing, or a version's digest does not match its manifest. Bad \
pages are recorded: the next push of the database they belong to sends them again and \
repairs them (a version that uses them cannot be pulled until then).")]
pub struct ScrubArgs {
    /// A server's data directory (what `sqlferry serve --data` was given).
    #[arg(long, value_name = "DIR", conflicts_with = "server")]
    pub data: Option<String>,
    /// The store: file:///path for a store directory [default: `server` in
    /// ~/.config/sqlferry/config.toml, else the embedded store]. A ws:// server is
    /// scrubbed on its own machine, with --data; an s3:// store is not scrubbed yet.
    #[arg(long, env = "SQLFERRY_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

impl ScrubArgs {
    /// Runs the command.
    pub async fn run(self, global: &Global, shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        super::interruptible(shutdown, self.scrub(global)).await
    }

    async fn scrub(&self, global: &Global) -> anyhow::Result<ExitCode> {
        let data = self.data.as_deref().map(expand_tilde);
        let root = crate::client::scrub_root(data, self.server.clone()).await?;
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
        if !global.quiet && !self.json && std::io::stderr().is_terminal() {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "scrubbing {prefix} [{bar:30}] {pos}/{len} ({percent}%) eta {eta}",
                )
                .expect("the template is valid")
                .progress_chars("=> "),
            );
        }
        let shown = bar.clone();
        let report = crate::client::scrub(&root, move |p: &ScrubProgress| {
            if shown.prefix() != p.replica {
                shown.set_prefix(p.replica.clone());
                shown.set_length(p.total);
            }
            shown.set_position(p.done);
        })
        .await?;
        bar.finish_and_clear();
        let clean = report.is_clean();
        if self.json {
            out(format_args!("{}", serde_json::to_string(&report)?))?;
        } else {
            for r in &report.replicas {
                if let Some(e) = &r.error {
                    out(format_args!("{}: could not be checked: {e}", r.replica))?;
                }
                for p in &r.bad_pages {
                    let used = if p.versions.is_empty() {
                        "used by no version".to_owned()
                    } else {
                        format!(
                            "used by version{} {}",
                            if p.versions.len() == 1 { "" } else { "s" },
                            p.versions
                                .iter()
                                .map(u64::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    };
                    out(format_args!(
                        "{}: {} page {} ({used})",
                        r.replica, p.problem, p.hash
                    ))?;
                }
                for v in &r.bad_versions {
                    out(format_args!(
                        "{}: version {} is bad: {} ({})",
                        r.replica,
                        v.number,
                        v.problem,
                        if v.repairable {
                            "a push of a database holding the same pages repairs it"
                        } else {
                            "nothing repairs it"
                        }
                    ))?;
                }
            }
            let pages = report.pages;
            let versions: u64 = report.replicas.iter().map(|r| r.versions).sum();
            let bad_pages: usize = report.replicas.iter().map(|r| r.bad_pages.len()).sum();
            let bad_versions: usize = report.replicas.iter().map(|r| r.bad_versions.len()).sum();
            if report.leftover_bytes_removed > 0 && !global.quiet {
                out(format_args!(
                    "removed {} of files crashed pushes had left",
                    human_bytes(report.leftover_bytes_removed)
                ))?;
            }
            if !clean {
                let lost = report
                    .replicas
                    .iter()
                    .flat_map(|r| &r.bad_versions)
                    .filter(|v| !v.repairable)
                    .count();
                let mut advice = Vec::new();
                if bad_pages > 0 {
                    advice.push(
                        "bad pages are recorded: the next push of each database resends them, which repairs every version that uses them"
                            .to_owned(),
                    );
                }
                if lost > 0 {
                    advice.push(format!(
                        "{lost} version(s) whose manifest or digest does not hold stay as they are (a stored version never changes): pull another version, and push the database to make a whole new latest one"
                    ));
                }
                out(format_args!(
                    "BAD: {bad_pages} bad page(s), {bad_versions} bad version(s) in {} ({} replicas, {versions} versions, {pages} pages checked){}",
                    root.display(),
                    report.replicas.len(),
                    advice.iter().map(|a| format!("; {a}")).collect::<String>()
                ))?;
            } else if !global.quiet {
                out(format_args!(
                    "ok: {} ({} replicas, {versions} versions, {pages} pages checked)",
                    root.display(),
                    report.replicas.len()
                ))?;
            }
        }
        Ok(ExitCode::from(if clean { exit::OK } else { exit::VERIFY }))
    }
}
