//! `sqlferry push LOCAL [REMOTE]`: send what changed, to a local copy or as a new
//! version of a replica.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

use super::progress::Bar;
use std::sync::Arc;

use super::{Global, RemoteArgs, exit, expand_tilde, human_bytes, is_local_path, out};
use crate::config::{Secret, Sidecar};
use crate::engine::{Progress, sync_local};
use crate::history::{self, LastSync};
use crate::page::{Snapshot, Writer};
use crate::protocol::MAX_TEXT_BYTES;
use crate::remote::{PushRequest, Server};
use crate::store::{PushOptions, ReplicaPath};

/// Arguments of `sqlferry push`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
sqlferry push app.db acme/app.db -m \"before migration\"   a new version of replica acme/app.db\n  \
sqlferry push app.db /backup/app.db                      keep a local copy up to date\n  \
sqlferry push app.db ./copy.db --json                    print figures as one JSON object\n  \
sqlferry push app.db acme/app.db --subscribe --waitIdle 10m --maxInterval 24h\n    \
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
is refused for another replica (name its store); otherwise it goes to the embedded store.")]
pub struct PushArgs {
    /// The database to push (read-only; a live database is fine).
    pub local: String,
    /// Where to: a replica path (namespace/name) or a local file path.
    pub remote: String,
    /// The version's commit message (at most 4096 bytes).
    #[arg(short, long, value_name = "MSG", default_value = "")]
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
    /// When to push, with --subscribe.
    #[command(flatten)]
    pub timing: super::subscribe::TimingArgs,
    /// The server and the key.
    #[command(flatten)]
    pub connection: RemoteArgs,
}

impl PushArgs {
    /// Runs the command.
    pub fn run(self, global: &Global) -> anyhow::Result<ExitCode> {
        let local = expand_tilde(&self.local);
        if is_local_path(&self.remote) {
            return self.push_file(&local, global);
        }
        let replica = ReplicaPath::parse(&self.remote)?;
        if self.message.len() > MAX_TEXT_BYTES {
            return Err(crate::Error::Usage(format!(
                "the commit message has {} bytes; at most {MAX_TEXT_BYTES} are allowed",
                self.message.len()
            ))
            .into());
        }
        let server = self
            .connection
            .resolve_for(&local, &replica, global.quiet)?;
        let mut pusher = Pusher::new(&local, replica, server, self.connection.key.clone())?;
        pusher.message = self.message.clone();
        pusher.force = self.force;
        pusher.new_keys = self.new_keys;
        pusher.allow_corrupt = self.allow_corrupt;
        if self.subscribe {
            return super::subscribe::run_push(pusher, &self.timing, global);
        }
        if self.timing.any() {
            return Err(crate::Error::Usage(
                "--waitIdle, --minInterval, --maxInterval and --maxChanges need --subscribe".into(),
            )
            .into());
        }
        pusher.require_key()?;
        if self.dry_run {
            let request = pusher.request();
            return self.dry_run(&local, &pusher.replica, &pusher.server, &request);
        }
        let bar: Arc<dyn Progress> = Arc::new(Bar::new(!global.quiet && !self.json));
        let (outcome, notes) = pusher.push(bar)?;
        let replica = &pusher.replica;
        if self.json {
            let mut v = serde_json::to_value(&outcome.stats)?;
            v["replica"] = replica.as_str().into();
            v["version"] = outcome.version.into();
            v["created"] = outcome.created.into();
            v["repaired"] = outcome.repaired.into();
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
        for note in notes {
            eprintln!("{note}");
        }
        Ok(ExitCode::from(exit::OK))
    }

    /// `--dry-run`: what a push would do, keys masked, nothing changed.
    fn dry_run(
        &self,
        local: &Path,
        replica: &ReplicaPath,
        server: &Server,
        request: &PushRequest,
    ) -> anyhow::Result<ExitCode> {
        let snap = Snapshot::open(local).context("cannot read LOCAL")?;
        let latest = match server.versions(replica, request.key.as_deref()) {
            Ok(v) => v.last().map(|v| v.number),
            Err(e) if e.kind() == crate::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        let base = request.options.base;
        let size = u64::from(snap.page_count()) * u64::from(snap.page_size());
        let conflict = !self.force && latest.is_some() && latest != base;
        // The real push checks first, so a damaged LOCAL is refused before a conflict.
        let damaged = match self.allow_corrupt {
            true => None,
            false => crate::remote::check_source(&snap).err(),
        };
        let key = request.key.as_deref().map_or("no key".to_owned(), |k| {
            format!("key {}", crate::server::mask(k))
        });
        out(format_args!(
            "would push {} ({}, {} pages) to {replica} on {} with {key}: {}",
            local.display(),
            human_bytes(size),
            snap.page_count(),
            server.url(),
            match (latest, conflict) {
                _ if damaged.is_some() => format!(
                    "refused (exit 7), {}",
                    damaged
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default()
                ),
                (_, true) => format!(
                    "refused, VERSION_CONFLICT: the replica is at version {}, LOCAL is based on {}",
                    latest.unwrap_or(0),
                    base.map_or("no version".into(), |b| format!("version {b}"))
                ),
                (None, _) => "creating the replica as version 1".into(),
                (Some(n), _) => format!("version {} if anything changed since version {n}", n + 1),
            }
        ))?;
        Ok(ExitCode::from(if damaged.is_some() {
            exit::VERIFY
        } else if conflict {
            exit::CONFLICT
        } else {
            exit::OK
        }))
    }

    /// `push SRC DEST` between two local files.
    fn push_file(&self, src: &Path, global: &Global) -> anyhow::Result<ExitCode> {
        let dest = expand_tilde(&self.remote);
        if let (Ok(a), Ok(b)) = (src.canonicalize(), dest.canonicalize())
            && a == b
        {
            return Err(crate::Error::Usage(format!(
                "LOCAL and REMOTE are the same file ({})",
                a.display()
            ))
            .into());
        }
        if self.dry_run {
            let snap = Snapshot::open(src).context("cannot read LOCAL")?;
            let damaged = match self.allow_corrupt {
                true => None,
                false => crate::remote::check_source(&snap).err(),
            };
            out(format_args!(
                "would sync {} ({} pages) into {}{}",
                src.display(),
                snap.page_count(),
                dest.display(),
                damaged
                    .as_ref()
                    .map_or(String::new(), |e| format!(": refused (exit 7), {e}"))
            ))?;
            return Ok(ExitCode::from(if damaged.is_some() {
                exit::VERIFY
            } else {
                exit::OK
            }));
        }
        let mut source = Snapshot::open(src).context("cannot read LOCAL")?;
        if !self.allow_corrupt {
            crate::remote::check_source(&source)?;
        }
        let mut target = Writer::open(&dest).context("cannot write REMOTE")?;
        let bar = Bar::new(!global.quiet && !self.json);
        let stats = sync_local(&mut source, &mut target, &bar)
            .with_context(|| format!("push {} to {} failed", src.display(), dest.display()))?;
        drop(source);
        drop(target);
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

/// One database pushed to one replica, again and again: `push` and the push
/// subscriber share it. Each push takes its base version from the local history, so
/// a subscriber's pushes chain without conflicts.
#[derive(Debug)]
pub struct Pusher {
    /// The database, as given.
    pub local: std::path::PathBuf,
    /// The database, absolute: the key of its history and saved key.
    pub database: std::path::PathBuf,
    /// The replica.
    pub replica: ReplicaPath,
    /// Where it lives.
    pub server: Server,
    /// The key (none for the embedded store).
    pub key: Option<String>,
    /// Whether the key was saved for this database by an earlier push (a PUSH key).
    stored: bool,
    /// The commit message of each version.
    pub message: String,
    /// Push even if the replica moved past the base version.
    pub force: bool,
    /// Ask for new keys even if the replica exists (`--new-keys`).
    pub new_keys: bool,
    /// Push even if LOCAL fails `PRAGMA quick_check`.
    pub allow_corrupt: bool,
}

impl Pusher {
    /// A pusher of `local` to `replica`; the key is `key` (`--key`, `SQLFERRY_KEY`),
    /// else the one saved for `local`, else, for a subscriber, the sidecar's PULL key.
    pub fn new(
        local: &Path,
        replica: ReplicaPath,
        server: Server,
        key: Option<String>,
    ) -> anyhow::Result<Pusher> {
        let database = crate::config::database_key(local);
        let secrets = crate::config::Secrets::load()?;
        // Saved under the database's key; before keys resolved links, under its
        // absolute path.
        let absolute = std::path::absolute(local).ok();
        let saved = [Some(&database), absolute.as_ref()]
            .into_iter()
            .flatten()
            .find_map(|db| secrets.for_database(db))
            .filter(|s| s.server == server.url() && s.replica == replica.as_str())
            .map(|s| s.key.clone());
        let stored = saved.is_some();
        let key = key.or(saved);
        Ok(Pusher {
            local: local.to_owned(),
            database,
            replica,
            server,
            key,
            stored,
            message: String::new(),
            force: false,
            new_keys: false,
            allow_corrupt: false,
        })
    }

    /// Fails with an auth error when a server needs a key and there is none.
    pub fn require_key(&self) -> anyhow::Result<()> {
        if self.server.needs_key() && self.key.is_none() {
            return Err(crate::Error::Auth(format!(
                "no key for {} on {}: pass --key (the admin key for a first push) or set SQLFERRY_KEY",
                self.replica,
                self.server.url()
            ))
            .into());
        }
        Ok(())
    }

    /// The request the next push makes.
    pub fn request(&self) -> PushRequest {
        let last = history::last_with(&self.database, &self.server.url(), self.replica.as_str());
        PushRequest {
            database: Some(self.database.clone()),
            options: PushOptions {
                base: last.as_ref().map(|l| l.version),
                force: self.force,
                message: self.message.clone(),
                client_id: crate::remote::client_id(),
                key_id: String::new(),
            },
            key: self.key.clone(),
            // Without a stored PUSH key, ask for keys: an admin key's first push of a
            // replica then leaves a PUSH key here and a PULL key in the sidecar.
            key_request: self.server.needs_key() && !self.stored,
            new_keys: self.new_keys,
            allow_corrupt: self.allow_corrupt,
        }
    }

    /// Pushes once; records the version in the local history and saves new keys.
    /// Returns the outcome and notes for the user (where new keys went).
    pub fn push(
        &mut self,
        progress: Arc<dyn Progress>,
    ) -> anyhow::Result<(crate::remote::PushOutcome, Vec<String>)> {
        self.require_key()?;
        let (local, replica) = (&self.local, &self.replica);
        let outcome = self
            .server
            .push(local, replica, self.request(), progress)
            .with_context(|| format!("push {} to {replica} failed", local.display()))?;
        history::record(&LastSync::now(
            &self.database,
            self.server.url(),
            replica.as_str(),
            outcome.version,
            &outcome.stats.digest,
            "push",
        ));
        let mut notes = Vec::new();
        if let Some(keys) = &outcome.keys {
            let entry = Secret {
                server: self.server.url(),
                replica: replica.to_string(),
                key: keys.push.clone(),
            };
            let name = self.database.to_string_lossy().into_owned();
            let secrets_path = crate::config::Secrets::update(|secrets| {
                secrets.databases.insert(name, entry);
            })?;
            let sidecar = Sidecar {
                server: self.server.url(),
                replica: replica.to_string(),
                key: keys.pull.clone(),
            }
            .save(local)?;
            notes.push(format!(
                "new keys for {replica}: the PUSH key is saved in {} (next pushes of {} need no key); \
                 {} holds the PULL key: copy it beside a database elsewhere and run it to pull",
                secrets_path.display(),
                local.display(),
                sidecar.display()
            ));
            // Later pushes (a subscriber's) use the replica's own PUSH key.
            self.key = Some(keys.push.clone());
            self.stored = true;
        }
        Ok((outcome, notes))
    }
}
