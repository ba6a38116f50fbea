//! `sqlferry daemon --config FILE`: the [`crate::daemon`] under the command line's one
//! runtime and shutdown, SIGHUP as reload, its notes as stamped lines (results on
//! stdout, failures on stderr), and systemd's readiness protocol when `NOTIFY_SOCKET` is
//! set.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use super::subscribe::{Stream, text};
use super::{Global, exit, expand_tilde};
use crate::daemon::{self, Config, Note, Phase, Unit};
use crate::shutdown::Shutdown;

/// Arguments of `sqlferry daemon`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
sqlferry daemon --config /etc/sqlferry/sqlferry.toml\n  \
sqlferry daemon --config sqlferry.toml --check      check the file, print what it would run\n  \
kill -HUP $(pidof sqlferry)                         reload the file\n\n\
The file (TOML) lists databases to push, each to one or more destinations (replicas on a \
server or the embedded store, and local copies), replicas to follow into local databases, \
and directories whose every database matching a glob is pushed to NAMESPACE/<file name>. \
`sqlferry daemon --example config` prints a commented file explaining every setting.\n\n\
SIGHUP reloads the file: entries added start, entries removed stop (pending changes pushed \
first), entries changed restart with their new settings, the others are not touched. A file \
with an error is refused with its line and reason, and everything keeps running as it was. \
A database that fails (missing, locked, a server that refuses its key) is retried on its own \
(1s, doubling to 60s); it never stops the others.\n\n\
SIGINT or SIGTERM stops every subscriber gracefully (pending changes pushed first, within \
60s); a second signal stops at once. Exit 0 when every change seen was pushed; otherwise \
the first unpushed failure's exit code, after one line per database left behind.\n\n\
Under systemd (Type=notify), READY=1 is sent once the file is loaded, RELOADING=1 and \
READY=1 around each reload, STOPPING=1 at the end. `sqlferry daemon --example systemd` \
prints a unit file (dedicated user, directories, restart policy), `--example cron` a \
crontab for nightly pushes with `status --max-age` as the alert.")]
pub struct DaemonArgs {
    /// The configuration file (TOML) [default: $XDG_CONFIG_HOME/sqlferry/daemon.toml].
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<String>,
    /// Check the file and print the subscribers it makes, one per line; run nothing.
    #[arg(long)]
    pub check: bool,
    /// Print a commented example and exit: `config` (the TOML file), `systemd` (a unit
    /// file) or `cron` (a crontab without a daemon).
    #[arg(long, value_name = "WHAT", value_parser = ["config", "systemd", "cron"])]
    pub example: Option<String>,
}

/// The examples `--example` prints: the files of `examples/`, built in.
fn example(what: &str) -> &'static str {
    match what {
        "systemd" => include_str!("../../examples/sqlferry.service"),
        "cron" => include_str!("../../examples/sqlferry.cron"),
        _ => include_str!("../../examples/sqlferry.toml"),
    }
}

impl DaemonArgs {
    fn path(&self) -> anyhow::Result<PathBuf> {
        match &self.config {
            Some(p) => Ok(expand_tilde(p)),
            None => crate::config::config_dir()
                .map(|d| d.join("daemon.toml"))
                .ok_or_else(|| {
                    crate::Error::Usage(
                        "no --config and no HOME or XDG_CONFIG_HOME to find daemon.toml in".into(),
                    )
                    .into()
                }),
        }
    }

    /// Runs the command.
    pub async fn run(self, global: &Global, shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        if let Some(what) = &self.example {
            std::io::stdout()
                .lock()
                .write_all(example(what).as_bytes())?;
            return Ok(ExitCode::from(exit::OK));
        }
        // The daemon's entries each name their own key (`encryption_key_file`): one key
        // in the environment for every entry is refused, not silently applied or ignored.
        if super::encryption::env_key_set() {
            return Err(crate::Error::Usage(format!(
                "{}: the daemon takes an encryption key per entry of its file \
                 (encryption_key_file = \"FILE\", sqlferry keygen FILE writes one; or \
                 passphrase_file = \"FILE\"), not from \
                 the environment; unset it; nothing was started",
                super::encryption::KEY_ENV
            ))
            .into());
        }
        let path = self.path()?;
        if self.check {
            let config = Config::load(&path).map_err(|e| crate::Error::Usage(e.0))?;
            let mut stdout = std::io::stdout().lock();
            for unit in config.units.values() {
                writeln!(stdout, "{}", describe(unit))?;
            }
            writeln!(
                stdout,
                "{}: {} subscriber{} (at most {} pushes at once)",
                path.display(),
                config.units.len(),
                if config.units.len() == 1 { "" } else { "s" },
                config.max_concurrent_pushes
            )?;
            return Ok(ExitCode::from(exit::OK));
        }
        // One watcher thread per database: few arenas keep their allocations together.
        crate::memory::limit_arenas(2);
        let (reload_tx, mut reload) = tokio::sync::mpsc::channel(1);
        let _hangup = reload_on_hangup(reload_tx)?;
        let quiet = global.quiet;
        let report: daemon::Report = Arc::new(move |label: &str, note: Note| {
            if let Some((stream, line)) = line(note) {
                print(quiet, stream, &format!("{label}: {line}"));
            }
        });
        let notify = Systemd::from_env();
        let stopped = daemon::run(&path, shutdown, &mut reload, report, |phase| {
            notify.tell(phase);
        })
        .await?;
        if shutdown.is_forced() {
            return Ok(ExitCode::from(exit::INTERRUPTED));
        }
        let mut first = None;
        for (label, error) in stopped.unpushed {
            print(
                quiet,
                Stream::Err,
                &format!("{label}: stopped with changes not pushed: {error}"),
            );
            first.get_or_insert(error);
        }
        match first {
            Some(error) => {
                Err(anyhow::Error::from(error).context("stopped with changes not pushed"))
            }
            None => {
                print(
                    quiet,
                    Stream::Out,
                    "daemon stopped (asked to): every change seen is pushed",
                );
                Ok(ExitCode::from(exit::OK))
            }
        }
    }
}

/// What `--check` prints for a unit.
fn describe(unit: &Unit) -> String {
    // An encrypted entry names its key's id and file (never the key), so `--check`
    // shows which key each replica is sealed with.
    let store = match unit {
        Unit::Push {
            target: crate::daemon::config::Target::Replica { store, .. },
            ..
        }
        | Unit::Pull { store, .. }
        | Unit::Directory { store, .. } => Some(store),
        Unit::Push { .. } => None,
    };
    let sealed = match (
        store.and_then(|s| s.encryption.as_ref()),
        store.and_then(|s| s.passphrase.as_ref()),
    ) {
        (Some(k), _) => format!(", encrypted (key id {}, {})", k.key.id(), k.file.display()),
        // Its key id needs the replica's salt, which only the unit's start asks for.
        (None, Some(p)) => format!(
            ", encrypted (passphrase_file {}, stretched when the unit starts)",
            p.file.display()
        ),
        (None, None) => String::new(),
    };
    let described = match unit {
        Unit::Push { when, .. } => format!(
            "push {}, {}",
            unit.label(),
            super::subscribe::TimingArgs::describe(&when.timing)
        ),
        Unit::Pull { .. } => format!("pull {}", unit.label()),
        Unit::Directory {
            namespace,
            copy_to,
            when,
            ..
        } => {
            let mut to = Vec::new();
            if let Some(ns) = namespace {
                to.push(format!("{ns}/<file name>"));
            }
            if let Some(dir) = copy_to {
                to.push(format!("{}/<file name>", dir.display()));
            }
            format!(
                "directory {} -> {}, {}",
                unit.label(),
                to.join(" and "),
                super::subscribe::TimingArgs::describe(&when.timing)
            )
        }
    };
    described + &sealed
}

/// The line of a note and its stream.
fn line(note: Note) -> Option<(Stream, String)> {
    match note {
        // A unit stopped at once says so in its own note; "second signal" would
        // mislead (one unit is stopped by a reload or a deleted file).
        Note::Event(crate::subscribe::Event::StoppingNow) => None,
        Note::Event(event) => text(event),
        Note::Failed { error, retry_in } => Some((
            Stream::Err,
            format!(
                "failed: {}; starting again in {}",
                super::error_line(&anyhow::Error::from(error)),
                crate::subscribe::duration::format(retry_in)
            ),
        )),
        Note::Stopped(why) => Some((Stream::Out, format!("stopped: {why}"))),
        Note::Found(db) => Some((Stream::Out, format!("found {}: pushing it", db.display()))),
        Note::Dropped(db) => Some((
            Stream::Out,
            format!("{} is gone: its subscribers stop", db.display()),
        )),
        Note::Loaded { path, units } => Some((
            Stream::Out,
            format!(
                "{}: {units} subscriber{} starting",
                path.display(),
                if units == 1 { "" } else { "s" }
            ),
        )),
        Note::Reloaded(d) => Some((
            Stream::Out,
            format!(
                "reloaded: {} added, {} removed, {} changed, {} unchanged",
                d.added, d.removed, d.changed, d.kept
            ),
        )),
        Note::Refused(e) => Some((
            Stream::Err,
            format!("reload refused, nothing changed: {}", e.0),
        )),
    }
}

/// One stamped line.
fn print(quiet: bool, stream: Stream, line: &str) {
    let stamp = crate::epoch::rfc3339(crate::epoch::now());
    match stream {
        Stream::Out if quiet => {}
        Stream::Out => {
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{stamp} {line}");
            let _ = stdout.flush();
        }
        Stream::Err => eprintln!("{stamp} {line}"),
    }
}

/// Sends a reload request on each SIGHUP, for the life of the returned task.
fn reload_on_hangup(
    reload: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<tokio_util::task::AbortOnDropHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup())
        .map_err(|e| crate::Error::io(std::path::Path::new("signal handler"), e))?;
    Ok(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
        async move {
            while hangup.recv().await.is_some() {
                // A reload already waiting covers this one.
                let _ = reload.try_send(());
            }
        },
    )))
}

/// systemd's readiness notifications (`sd_notify`): a datagram on the socket
/// `NOTIFY_SOCKET` names, when it names one. Failures are logged, never fatal.
struct Systemd {
    socket: Option<std::os::unix::net::SocketAddr>,
}

impl Systemd {
    fn from_env() -> Systemd {
        use std::os::linux::net::SocketAddrExt;
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|s| {
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(s.as_os_str()).to_vec();
            match bytes.strip_prefix(b"@") {
                // An abstract socket.
                Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name).ok(),
                None => std::os::unix::net::SocketAddr::from_pathname(&s).ok(),
            }
        });
        Systemd { socket }
    }

    fn tell(&self, phase: Phase) {
        let Some(addr) = &self.socket else { return };
        let message = match phase {
            Phase::Ready => "READY=1\nSTATUS=running".to_owned(),
            // Type=notify: RELOADING=1 needs no timestamp (Type=notify-reload would).
            Phase::Reloading => "RELOADING=1".to_owned(),
            Phase::Stopping => "STOPPING=1".to_owned(),
        };
        let sent = std::os::unix::net::UnixDatagram::unbound()
            .and_then(|s| s.send_to_addr(message.as_bytes(), addr));
        if let Err(e) = sent {
            tracing::warn!("telling systemd {message:?}: {e}");
        }
    }
}
