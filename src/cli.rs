//! The command line: clap types, one file per command, and the mapping from errors to
//! documented exit codes. Flags become plain values here; nothing below `cli` sees clap
//! or indicatif.
//!
//! [`Cli::run`] builds the one tokio runtime (multi-thread) and the one [`Shutdown`]
//! (SIGINT and SIGTERM: the first asks for a graceful stop, the second forces it), and
//! awaits the command. Nothing below `cli` builds a runtime or catches a signal.

mod daemon;
mod docs;
mod keys;
mod progress;
mod pull;
mod push;
mod retention;
mod scrub;
mod serve;
mod signals;
mod status;
mod subscribe;
mod verify;
mod versions;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::ErrorKind;
use crate::client::Connection;
use crate::shutdown::Shutdown;

/// Exit codes, documented in `docs/exit-codes.md`.
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// An unexpected failure (a bug, or an error of no known class).
    pub const FAILURE: u8 = 1;
    /// Wrong usage: unknown flag, bad argument.
    pub const USAGE: u8 = 2;
    /// A local file: missing, unreadable, unwritable, locked, or not an SQLite database.
    pub const LOCAL: u8 = 3;
    /// The peer broke the protocol or the connection was lost.
    pub const NETWORK: u8 = 4;
    /// A key is missing, wrong, or not allowed to do this.
    pub const AUTH: u8 = 5;
    /// The replica moved past the push's base version (VERSION_CONFLICT).
    pub const CONFLICT: u8 = 6;
    /// A check failed: digest mismatch or `PRAGMA integrity_check` not ok.
    pub const VERIFY: u8 = 7;
    /// The replica or version does not exist.
    pub const NOT_FOUND: u8 = 8;
    /// LOCAL has changes that were never pushed and the command would overwrite them
    /// (`pull` without `--force`); nothing was changed.
    pub const LOCAL_CHANGES: u8 = 9;
    /// The server failed on its own side (disk full, I/O error, too busy): temporary,
    /// nothing wrong with the request; retry later.
    pub const SERVER: u8 = 10;
    /// `status`: a sync's last attempt failed, or its last success is older than
    /// `--max-age`.
    pub const UNHEALTHY: u8 = 11;
    /// `push --wait-followers`: the version was committed, but fewer pull subscribers
    /// than asked reported having applied it before `--timeout`.
    pub const NOT_FOLLOWED: u8 = 12;
    /// A subscriber stopped by a second SIGINT or SIGTERM, without waiting for its sync.
    pub const INTERRUPTED: u8 = 130;
}

/// sqlferry pushes and pulls live SQLite databases page by page, checked end to end.
///
/// Only the pages that changed are sent, the source is read in one read transaction
/// (an application writing it is never blocked in WAL mode), and the copy changes in
/// one transaction, after its digest has been checked: readers see the old database
/// or the new one, never a mix.
#[derive(Debug, Parser)]
#[command(name = "sqlferry", version, max_term_width = 100)]
pub struct Cli {
    /// Global options.
    #[command(flatten)]
    pub global: Global,
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, clap::Args)]
pub struct Global {
    /// Print nothing but errors and what a command was asked to print (--json, where
    /// it has one); no progress bar.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Log what happens on stderr (-vv for more detail).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Send a database's changed pages: a new version of a replica, or a local copy.
    Push(push::PushArgs),
    /// Bring any version of a replica back into a local database, atomically.
    Pull(pull::PullArgs),
    /// List a replica's versions, with the bytes each one stores.
    Versions(versions::VersionsArgs),
    /// Show or set which versions a replica keeps (its retention policy).
    Retention(retention::RetentionArgs),
    /// Remove the versions a replica's retention policy does not keep; free their pages.
    Prune(retention::PruneArgs),
    /// Run the sqlferry server: replicas, versions and keys, over WebSocket and HTTP.
    Serve(serve::ServeArgs),
    /// Print a database's digest, page size, page count and integrity check.
    Verify(verify::VerifyArgs),
    /// Keep a database in sync: push it after changes, or follow its replica.
    Subscribe(subscribe::SubscribeArgs),
    /// Ask every running subscriber of a replica to sync now.
    #[command(name = "sync-now")]
    SyncNow(subscribe::SyncNowArgs),
    /// List or revoke a server's keys (admin key).
    Keys(keys::KeysArgs),
    /// Check every stored page and version of a store; record bad pages for repair.
    Scrub(scrub::ScrubArgs),
    /// Is every database this machine syncs safe? Last success, failures, changes not pushed.
    Status(status::StatusArgs),
    /// Syncs per day: how many, versions, bytes, durations, failures, triggers.
    History(status::HistoryArgs),
    /// Run push and pull subscribers for many databases from one configuration file.
    Daemon(daemon::DaemonArgs),
    /// Print the shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(docs::CompletionsArgs),
    /// Print a manual page in roff (`sqlferry man push | man -l -`), or write them all.
    Man(docs::ManArgs),
}

/// Where a replica lives and the key to reach it: `--server` and `--key`, shared by
/// every command that talks to a store.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Store and key")]
pub struct RemoteArgs {
    /// The store: ws://host:port or wss://host:port for a sqlferry server (wss: TLS; set
    /// SQLFERRY_CA_FILE=ca.pem to trust a private CA), file:///path for a store directory
    /// on this machine [default: `server` in ~/.config/sqlferry/config.toml, else the
    /// embedded store in ~/.local/share/sqlferry].
    #[arg(long, env = "SQLFERRY_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// The key for the server (never printed; prefer SQLFERRY_KEY or the saved key, which
    /// stay out of the process list).
    #[arg(long, env = "SQLFERRY_KEY", value_name = "KEY", hide_env_values = true)]
    pub key: Option<String>,
}

impl RemoteArgs {
    /// The flags as plain options for the client (which resolves the saved server and
    /// key behind them).
    pub fn options(&self) -> Connection {
        Connection {
            server: self.server.clone(),
            key: self.key.clone(),
        }
    }
}

/// The command line, with the help's `~/.config/sqlferry`, `~/.local/share/sqlferry`,
/// `~/.local/state/sqlferry` and `~/.cache/sqlferry` shown where they really are when
/// `XDG_*` variables move them (the doc comments can only name the defaults).
pub fn command() -> clap::Command {
    use clap::CommandFactory as _;
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let shown = |dir: Option<PathBuf>| {
        let dir = dir?;
        Some(
            match home.as_deref().and_then(|h| dir.strip_prefix(h).ok()) {
                Some(rest) => format!("~/{}", rest.display()),
                None => dir.display().to_string(),
            },
        )
    };
    let pairs: Vec<(&str, String)> = [
        ("~/.config/sqlferry", shown(crate::config::config_dir())),
        ("~/.local/share/sqlferry", shown(crate::config::data_dir())),
        ("~/.local/state/sqlferry", shown(crate::config::state_dir())),
        ("~/.cache/sqlferry", shown(crate::config::cache_dir())),
    ]
    .into_iter()
    .filter_map(|(default, real)| Some((default, real?)))
    .filter(|(default, real)| default != real)
    .collect();
    resolve_paths(Cli::command(), &pairs)
}

fn resolve_paths(cmd: clap::Command, pairs: &[(&str, String)]) -> clap::Command {
    if pairs.is_empty() {
        return cmd;
    }
    let fix = |text: String| {
        pairs
            .iter()
            .fold(text, |t, (default, real)| t.replace(default, real))
    };
    let mut cmd = cmd;
    if let Some(h) = cmd.get_after_help() {
        let h = fix(h.to_string());
        cmd = cmd.after_help(h);
    }
    if let Some(h) = cmd.get_after_long_help() {
        let h = fix(h.to_string());
        cmd = cmd.after_long_help(h);
    }
    cmd = cmd.mut_args(|a| {
        let mut a = a;
        if let Some(h) = a.get_help() {
            let h = fix(h.to_string());
            a = a.help(h);
        }
        if let Some(h) = a.get_long_help() {
            let h = fix(h.to_string());
            a = a.long_help(h);
        }
        a
    });
    cmd.mut_subcommands(|sub| resolve_paths(sub, pairs))
}

/// `--from SIDECAR` for a command that takes a REMOTE: the sidecar beside a database
/// (`<db>-sqlferry`) names the server, the replica and a PULL key.
#[derive(Debug, clap::Args)]
pub struct FromArgs {
    /// Take the server, the replica and the key from a sidecar file (`<db>-sqlferry`);
    /// REMOTE is then left out, or only a version (@3).
    #[arg(long, value_name = "SIDECAR", conflicts_with = "server")]
    pub from: Option<String>,
}

impl FromArgs {
    /// The replica spec and the connection: REMOTE and `connection` as given, or the
    /// sidecar's (a `--key` given still wins over the sidecar's PULL key).
    pub fn resolve(
        &self,
        remote: Option<&str>,
        connection: Connection,
    ) -> crate::Result<(String, Connection)> {
        let Some(path) = &self.from else {
            return remote.map(|r| (r.to_owned(), connection)).ok_or_else(|| {
                crate::Error::Usage("name the replica (namespace/name) or --from SIDECAR".into())
            });
        };
        let sidecar = crate::config::Sidecar::load(&expand_tilde(path))?;
        let spec = match remote {
            None => sidecar.replica.clone(),
            Some(v) if v.starts_with('@') => format!("{}{v}", sidecar.replica),
            Some(_) => {
                return Err(crate::Error::Usage(
                    "with --from, give the version alone (for example @3), or nothing for the latest"
                        .into(),
                ));
            }
        };
        Ok((
            spec,
            Connection {
                server: Some(sidecar.server),
                key: connection.key.or(Some(sidecar.key)),
            },
        ))
    }
}

/// Bytes for a person: `216.1 MB`, `4.0 KB`, `69 B` (powers of 1000).
///
/// Not indicatif's `DecimalBytes` (which prints `216.10 MB` and `kB`) nor `HumanBytes`
/// (powers of 1024): these exact forms are in every output line users and scripts read
/// today, and in the docs.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

impl Cli {
    /// Runs the command on the one runtime, with the one shutdown; the error, if any,
    /// carries its exit code via [`exit_code`].
    pub fn run(self) -> anyhow::Result<ExitCode> {
        // The server serves many sessions at once: a worker per core. Every other
        // command does one sync at a time, with the engine, SQLite and files on the
        // blocking pool: one thread drives its I/O, and the process stays as small as
        // it was before it had a runtime at all (a multi-thread runtime cost a no-change
        // push 1.3 MiB of peak RSS, +10%).
        let mut builder = match self.command {
            Command::Serve(_) => tokio::runtime::Builder::new_multi_thread(),
            _ => tokio::runtime::Builder::new_current_thread(),
        };
        let runtime = builder
            .enable_all()
            .build()
            .context("cannot start the runtime")?;
        let Cli { global, command } = self;
        let result = runtime.block_on(async {
            let shutdown = signals::shutdown_on_signals()?;
            command.run(&global, &shutdown).await
        });
        // Not waited for: a sync still running on a blocking thread (a command stopped
        // by a signal) is abandoned with the process, and a sync cut short commits
        // nothing.
        runtime.shutdown_background();
        result
    }
}

impl Command {
    /// Runs the command.
    pub async fn run(self, global: &Global, shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        match self {
            Command::Push(args) => args.run(global, shutdown).await,
            Command::Pull(args) => args.run(global, shutdown).await,
            Command::Versions(args) => args.run(global, shutdown).await,
            Command::Retention(args) => args.run(global, shutdown).await,
            Command::Prune(args) => args.run(global, shutdown).await,
            Command::Serve(args) => args.run(global, shutdown).await,
            Command::Verify(args) => args.run(global, shutdown).await,
            Command::Subscribe(args) => args.run(global, shutdown).await,
            Command::SyncNow(args) => args.run(global, shutdown).await,
            Command::Keys(args) => args.run(global, shutdown).await,
            Command::Scrub(args) => args.run(global, shutdown).await,
            Command::Status(args) => args.run(global, shutdown).await,
            Command::History(args) => args.run(global, shutdown).await,
            Command::Daemon(args) => args.run(global, shutdown).await,
            Command::Completions(args) => args.run(global, shutdown).await,
            Command::Man(args) => args.run(global, shutdown).await,
        }
    }
}

/// Runs a one-shot command until it ends or a stop is asked for (SIGINT, SIGTERM): then
/// it is dropped at once and the command exits 130, as it would have died of the
/// signal. Whatever it was doing commits nothing (a version exists only once verified,
/// a local database changes in one transaction).
async fn interruptible(
    shutdown: &Shutdown,
    command: impl std::future::Future<Output = anyhow::Result<ExitCode>>,
) -> anyhow::Result<ExitCode> {
    tokio::select! {
        result = command => result,
        () = shutdown.requested() => Ok(ExitCode::from(exit::INTERRUPTED)),
    }
}

/// Sets up logging on stderr: warnings by default, more with `-v`, `RUST_LOG` wins.
pub fn init_tracing(global: &Global) {
    let default = match (global.quiet, global.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// The exit code for an error: the first [`crate::Error`] in its chain decides.
pub fn exit_code(err: &anyhow::Error) -> ExitCode {
    let kind = err
        .chain()
        .find_map(|e| e.downcast_ref::<crate::Error>())
        .map(|e| e.kind());
    let code = match kind {
        Some(ErrorKind::Usage) => exit::USAGE,
        Some(ErrorKind::LocalIo | ErrorKind::NotADatabase | ErrorKind::Busy) => exit::LOCAL,
        Some(ErrorKind::Protocol | ErrorKind::Disconnected | ErrorKind::Remote) => exit::NETWORK,
        Some(ErrorKind::Verification) => exit::VERIFY,
        Some(ErrorKind::Conflict) => exit::CONFLICT,
        Some(ErrorKind::Auth) => exit::AUTH,
        Some(ErrorKind::NotFound) => exit::NOT_FOUND,
        Some(ErrorKind::LocalChanges) => exit::LOCAL_CHANGES,
        Some(ErrorKind::Server) => exit::SERVER,
        Some(ErrorKind::Bug) | None => exit::FAILURE,
    };
    ExitCode::from(code)
}

/// One line for a person: the error and its causes, joined.
pub fn error_line(err: &anyhow::Error) -> String {
    let mut line = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

/// Writes one line of results to stdout. A closed pipe (`sqlferry verify x | head -1`)
/// is not an error: the reader has what it wanted.
fn out(line: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    use std::io::Write;
    match writeln!(std::io::stdout().lock(), "{line}") {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Expands a leading `~/` to the home directory.
fn expand_tilde(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest),
        _ => PathBuf::from(path),
    }
}

/// Whether a DEST argument names a local file: it starts with `/`, `./`, `../` or
/// `~/`, or a file of that name exists.
fn is_local_path(arg: &str) -> bool {
    ["/", "./", "../", "~/"].iter().any(|p| arg.starts_with(p)) || Path::new(arg).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_are_recognised_by_their_prefix() {
        for p in ["/tmp/x.db", "./x.db", "../x.db", "~/x.db"] {
            assert!(is_local_path(p), "{p}");
        }
        assert!(!is_local_path("acme/app.db"));
        assert!(is_local_path("Cargo.toml"), "an existing file is local");
    }

    #[test]
    fn tilde_expands_to_home() {
        if let Some(home) = std::env::var_os("HOME") {
            assert_eq!(expand_tilde("~/a.db"), Path::new(&home).join("a.db"));
        }
        assert_eq!(expand_tilde("a/~/b"), PathBuf::from("a/~/b"));
    }

    #[test]
    fn bytes_read_well() {
        assert_eq!(human_bytes(69), "69 B");
        assert_eq!(human_bytes(4096), "4.1 KB");
        assert_eq!(human_bytes(216_076_288), "216.1 MB");
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
