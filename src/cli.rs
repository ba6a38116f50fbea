//! The command line: clap types, one file per command, and the mapping from errors to
//! documented exit codes. Flags become plain values here; nothing below `cli` sees clap
//! or indicatif.
//!
//! [`Cli::run`] builds the one tokio runtime (multi-thread) and the one [`Shutdown`]
//! (SIGINT and SIGTERM: the first asks for a graceful stop, the second forces it), and
//! awaits the command. Nothing below `cli` builds a runtime or catches a signal.

mod apply;
mod daemon;
mod diff;
mod docs;
mod encryption;
mod keys;
mod progress;
mod pull;
mod push;
mod rekey;
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
    /// What changed between two databases or versions: per table, row by row, as a changeset.
    Diff(diff::DiffArgs),
    /// Apply a SQLite changeset to a database in one transaction, listing conflicts.
    Apply(apply::ApplyArgs),
    /// Keep a database in sync: push it after changes, or follow its replica.
    Subscribe(subscribe::SubscribeArgs),
    /// Ask every running subscriber of a replica to sync now.
    #[command(name = "sync-now")]
    SyncNow(subscribe::SyncNowArgs),
    /// List or revoke a server's keys (admin key).
    Keys(keys::KeysArgs),
    /// Write a new encryption key for encrypted replicas (mode 0600; never overwrites).
    Keygen(encryption::KeygenArgs),
    /// Make the next version of an encrypted replica under a new key (old versions keep theirs).
    Rekey(rekey::RekeyArgs),
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
    /// on this machine, s3://BUCKET/PREFIX for a store in an S3 bucket used from this
    /// process (no server; credentials and region from AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_REGION) [default: `server` in
    /// ~/.config/sqlferry/config.toml, else the embedded store in ~/.local/share/sqlferry].
    #[arg(long, env = "SQLFERRY_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// The endpoint of an S3-compatible server (MinIO, SeaweedFS, Ceph, R2…) for
    /// --server s3://…: http://HOST:PORT or https://HOST [default: AWS_ENDPOINT_URL, else
    /// AWS S3].
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// The key for the server (never printed; prefer SQLFERRY_KEY or the saved key, which
    /// stay out of the process list).
    #[arg(long, env = "SQLFERRY_KEY", value_name = "KEY", hide_env_values = true)]
    pub key: Option<String>,
}

/// `--compress`, of the commands that move pages to or from a server (push, pull,
/// subscribe).
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Store and key")]
pub struct CompressArgs {
    /// How pages travel to and from a server: `auto` sends them plain while the link
    /// keeps up and zstd-compressed while it is the bottleneck (plain from the start to a
    /// server on this machine), `zstd` compresses every page that shrinks, `off` never
    /// compresses and asks the server for plain pages. Pages kept compressed on the
    /// server come compressed unless `off`. Never for a local copy or the embedded store
    /// [default: auto].
    #[arg(long, env = "SQLFERRY_COMPRESS", value_name = "auto|zstd|off",
          value_parser = |s: &str| s.parse::<crate::protocol::compress::CompressMode>())]
    pub compress: Option<crate::protocol::compress::CompressMode>,
}

impl RemoteArgs {
    /// The flags as plain options for the client (which resolves the saved server and
    /// key behind them).
    pub fn options(&self) -> Connection {
        Connection {
            server: self.server.clone(),
            key: self.key.clone(),
            compress: None,
            s3_endpoint: self.s3_endpoint.clone(),
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
                compress: connection.compress,
                s3_endpoint: connection.s3_endpoint,
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
            Command::Diff(args) => args.run(global, shutdown).await,
            Command::Apply(args) => args.run(global, shutdown).await,
            Command::Subscribe(args) => args.run(global, shutdown).await,
            Command::SyncNow(args) => args.run(global, shutdown).await,
            Command::Keys(args) => args.run(global, shutdown).await,
            Command::Keygen(args) => args.run(global, shutdown).await,
            Command::Rekey(args) => args.run(global, shutdown).await,
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
async fn interruptible<T: From<u8>>(
    shutdown: &Shutdown,
    command: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::select! {
        result = command => result,
        () = shutdown.requested() => Ok(T::from(exit::INTERRUPTED)),
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
    ExitCode::from(exit_status(err))
}

/// The exit code for an error, as a number (see [`exit_code`]).
pub fn exit_status(err: &anyhow::Error) -> u8 {
    let kind = err
        .chain()
        .find_map(|e| e.downcast_ref::<crate::Error>())
        .map(|e| e.kind());
    match kind {
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
    }
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

/// Whether an argument is plainly a local path: it starts with `/`, `./`, `../` or
/// `~/`, or something of that name exists here. `status` reads its TARGET this way;
/// LOCAL/REMOTE arguments go through [`Place::of`], which also refuses the ambiguous.
fn is_local_path(arg: &str) -> bool {
    crate::config::names_local_path(arg) || Path::new(arg).exists()
}

/// What a REMOTE argument names, by the one rule of every command that takes one
/// (`push`'s destinations, `pull`'s REMOTE, `verify`'s FILE): never a guess.
///
/// - `/…`, `./…`, `../…`, `~/…`: a local path;
/// - anything that exists here: a local path;
/// - `a/b` whose directory `a/` exists here: either (the file `./a/b` or the replica
///   `a/b`), so refused until written `./a/b` or `--replica a/b`;
/// - `a/b` whose directory does not exist here: a replica path;
/// - a bare name (`backup.db`): no replica path (replicas are namespace/name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Place {
    /// A file on this machine (`~/` expanded).
    Local(PathBuf),
    /// A replica path in a store, as written (it may carry `@VERSION`; parsed later).
    Replica(String),
    /// `a/b` with a local directory `a/`: the file or the replica, the user must say.
    Ambiguous(String),
    /// A name without `/` that exists nowhere: it cannot be a replica.
    BareName(String),
}

impl Place {
    /// Classifies `arg` by the rule above (reads only whether paths exist).
    pub(crate) fn of(arg: &str) -> Place {
        if is_local_path(arg) {
            return Place::Local(expand_tilde(arg));
        }
        match arg.rfind('/') {
            None => Place::BareName(arg.to_owned()),
            Some(i) if i > 0 && Path::new(&arg[..i]).is_dir() => Place::Ambiguous(arg.to_owned()),
            Some(_) => Place::Replica(arg.to_owned()),
        }
    }

    /// The usage error for an argument that is neither clearly local nor a replica,
    /// naming the spellings that say which (`None` for `Local` and `Replica`).
    pub(crate) fn refusal(&self) -> Option<crate::Error> {
        match self {
            Place::Local(_) | Place::Replica(_) => None,
            Place::Ambiguous(arg) => Some(ambiguous(arg, &format!("./{arg}"))),
            Place::BareName(arg) => {
                let rule = match crate::store::ReplicaPath::parse(arg) {
                    Err(crate::Error::Usage(rule)) => rule,
                    _ => format!("{arg} is no replica path (namespace/name)"),
                };
                Some(crate::Error::Usage(format!(
                    "{rule}; no file {arg} exists here either: write ./{arg} for a local \
                     copy; nothing was done"
                )))
            }
        }
    }
}

/// A REMOTE that can only be a replica (`pull`'s): `arg` itself, or a usage error that
/// says why it is not one and what to write instead. The rule is [`Place`]'s; a path
/// that is no replica path gets the replica path rule it breaks, and a hint.
pub(crate) fn replica_only(arg: &str) -> crate::Result<&str> {
    let hint = |e: crate::Error, hint: &str| match e {
        crate::Error::Usage(text) => crate::Error::Usage(format!("{text} ({hint})")),
        other => other,
    };
    match Place::of(arg) {
        Place::Replica(_) => Ok(arg),
        Place::Ambiguous(_) => {
            let dir = arg.rfind('/').map_or(arg, |i| &arg[..i]);
            Err(crate::Error::Usage(format!(
                "{arg} could be the local file ./{arg} (the directory {dir}/ exists here) or \
                 the replica {arg}: write --replica {arg} for the replica (a local file is \
                 copied with push: sqlferry push ./{arg} LOCAL); nothing was done"
            )))
        }
        Place::Local(path) if path.exists() => {
            let flag = match crate::store::Selector::split(arg) {
                Ok(_) => format!("--replica {arg} for the replica of that name"),
                Err(_) => "--replica NAMESPACE/NAME names one".to_owned(),
            };
            Err(crate::Error::Usage(format!(
                "{arg} is a file here, not a replica: pull brings back a version of a replica \
                 (namespace/name; {flag}); a local file is copied with push: sqlferry push \
                 {arg} LOCAL; nothing was done"
            )))
        }
        Place::Local(_) | Place::BareName(_) => {
            crate::store::Selector::split(arg).map_err(|e| {
                hint(
                    e,
                    "pull brings back a version of a replica; a path starting with /, ./, ../ \
                     or ~/ is a local file",
                )
            })?;
            Ok(arg)
        }
    }
}

/// The error for `a/b` when the directory `a/` exists here: `file` is the spelling
/// that means the file.
fn ambiguous(arg: &str, file: &str) -> crate::Error {
    let dir = arg.rfind('/').map_or(arg, |i| &arg[..i]);
    crate::Error::Usage(format!(
        "{arg} could be the local file {file} (the directory {dir}/ exists here) or the \
         replica {arg}: write {file} for the file, or --replica {arg} for the replica; \
         nothing was done"
    ))
}

/// Where a push or pull went, for its result line: the server's URL, the embedded
/// store and its directory (`~/` for the home directory).
pub(crate) fn store_label(server: &crate::remote::Server) -> String {
    match server {
        crate::remote::Server::Embedded(store) => {
            format!("the embedded store ({})", tilde_path(store.root()))
        }
        crate::remote::Server::S3 { .. } => format!("the S3 store {}", server.url()),
        crate::remote::Server::Ws { url, .. } => url.clone(),
    }
}

/// Where a replica is, for a result line: `on ws://host:port`, or `in the embedded store
/// (DIR)` (the words the subscribers' lines use too).
pub(crate) fn on_store(server: &crate::remote::Server) -> String {
    match server {
        crate::remote::Server::Embedded(_) | crate::remote::Server::S3 { .. } => {
            format!("in {}", store_label(server))
        }
        crate::remote::Server::Ws { url, .. } => format!("on {url}"),
    }
}

/// A path for a person: `~/…` when it is under the home directory.
fn tilde_path(path: &Path) -> String {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    match home.as_deref().and_then(|h| path.strip_prefix(h).ok()) {
        Some(rest) if !rest.as_os_str().is_empty() => format!("~/{}", rest.display()),
        _ => path.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_paths_are_recognised_by_their_prefix() {
        for p in ["/tmp/x.db", "./x.db", "../x.db", "~/x.db"] {
            assert!(is_local_path(p), "{p}");
            assert!(matches!(Place::of(p), Place::Local(_)), "{p}");
        }
        assert!(!is_local_path("acme/app.db"));
        assert!(is_local_path("Cargo.toml"), "an existing file is local");
    }

    // The unit tests run in the package's directory: `src/` and `tests/` exist there,
    // `acme/` and `no-such-dir/` do not.
    #[test]
    fn an_existing_file_is_local_whatever_its_shape() {
        assert_eq!(Place::of("Cargo.toml"), Place::Local("Cargo.toml".into()));
        assert_eq!(Place::of("src/cli.rs"), Place::Local("src/cli.rs".into()));
        assert_eq!(Place::of("src"), Place::Local("src".into()));
    }

    #[test]
    fn a_path_whose_directory_exists_here_is_refused_with_both_spellings() {
        let place = Place::of("src/app.db");
        assert_eq!(place, Place::Ambiguous("src/app.db".into()));
        let why = place.refusal().expect("refused").to_string();
        assert!(why.contains("./src/app.db"), "{why}");
        assert!(why.contains("--replica src/app.db"), "{why}");
        assert!(why.contains("the directory src/ exists here"), "{why}");
        // A version does not hide the directory.
        assert_eq!(
            Place::of("tests/it@3"),
            Place::Ambiguous("tests/it@3".into())
        );
        // Deeper: the directory is everything before the last slash.
        assert_eq!(
            Place::of("src/cli/x.db"),
            Place::Ambiguous("src/cli/x.db".into())
        );
    }

    #[test]
    fn a_path_whose_directory_does_not_exist_is_a_replica() {
        for p in [
            "acme/app.db",
            "acme/app.db@3",
            "no-such-dir/a/b.db",
            "src-not/x.db",
        ] {
            assert_eq!(Place::of(p), Place::Replica(p.into()), "{p}");
            assert!(Place::of(p).refusal().is_none());
        }
        // `src/` exists, `src/nothing/` does not: no local file can be written there.
        assert_eq!(
            Place::of("src/nothing/x.db"),
            Place::Replica("src/nothing/x.db".into())
        );
    }

    #[test]
    fn a_bare_name_is_no_replica_and_the_message_says_how_to_write_a_file() {
        let place = Place::of("backup-that-is-not-here.db");
        assert_eq!(place, Place::BareName("backup-that-is-not-here.db".into()));
        let why = place.refusal().expect("refused").to_string();
        assert!(why.contains("it needs a namespace and a name"), "{why}");
        assert!(why.contains("./backup-that-is-not-here.db"), "{why}");
    }

    #[test]
    fn store_labels_name_the_store() {
        let ws = crate::remote::Server::parse(Some("ws://127.0.0.1:4000")).expect("url");
        assert_eq!(store_label(&ws), "ws://127.0.0.1:4000");
        assert_eq!(on_store(&ws), "on ws://127.0.0.1:4000");
        let embedded = crate::remote::Server::parse(Some("file:///var/lib/sqlferry")).expect("url");
        assert_eq!(
            store_label(&embedded),
            "the embedded store (/var/lib/sqlferry)"
        );
        assert_eq!(
            on_store(&embedded),
            "in the embedded store (/var/lib/sqlferry)"
        );
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
