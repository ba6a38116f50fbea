//! `sqlferry pull REMOTE[@N|@latest|@latest-N] [LOCAL]`: bring any version back.
//!
//! Invariant: a pull never overwrites changes LOCAL holds that no sync carried (unless
//! `--force`). LOCAL is compared, by digest, with what its last sync with this replica on
//! this server left in it (the local history); a LOCAL never synced with it must already
//! hold the version pulled. A refusal changes nothing and exits 9
//! ([`crate::Error::LocalChanges`]). The pull subscriber keeps the same promise between
//! its pulls ([`Kept`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;

use super::progress::Bar;
use std::sync::Arc;

use super::{Global, RemoteArgs, exit, expand_tilde, human_bytes, out};
use crate::config::Sidecar;
use crate::engine::Progress;
use crate::history::{self, LastSync};
use crate::page::Snapshot;
use crate::store::{Selector, VersionInfo};

/// Arguments of `sqlferry pull`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
sqlferry pull acme/app.db                    the latest version into ./app.db\n  \
sqlferry pull acme/app.db@3 restored.db      version 3\n  \
sqlferry pull acme/app.db@latest-1 prev.db   the version before the latest\n  \
sqlferry pull acme/app.db --subscribe        keep going: pull each new version as it lands\n\n\
LOCAL changes in one transaction, after its digest has been checked against the version's: \
readers of LOCAL keep reading and see the old database or the new one, never a mix. Only \
the pages that differ are written. LOCAL keeps its journal mode; a new LOCAL takes the \
version's.\n\n\
Keys (servers only): --key, SQLFERRY_KEY, the sidecar's PULL key with --from, or the key \
saved for LOCAL by an earlier push.\n\n\
A pull never overwrites changes that were never pushed: when LOCAL changed since its last \
push or pull of this replica (or exists, was never synced with it, and differs from the \
version pulled), the pull is refused with exit 9 and LOCAL is left as it was. Keep the \
changes by pushing them (sqlferry push LOCAL REMOTE), or pull into another file; --force \
overwrites them. --dry-run says what a pull would do, and whether it would be refused.")]
pub struct PullArgs {
    /// The replica, with an optional version: namespace/name[@N|@latest|@latest-N].
    #[arg(required_unless_present = "from")]
    pub remote: Option<String>,
    /// Take the server, the replica and the key from a sidecar file (`<db>-sqlferry`);
    /// LOCAL then defaults to the database beside it.
    #[arg(long, value_name = "SIDECAR", conflicts_with = "server")]
    pub from: Option<String>,
    /// The database to write (default: the replica's last path segment, here).
    pub local: Option<String>,
    /// Print one JSON object with the figures on stdout.
    #[arg(long)]
    pub json: bool,
    /// Overwrite LOCAL even if it holds changes that were never pushed (they are lost).
    #[arg(long)]
    pub force: bool,
    /// Say what a pull would do (which version, what LOCAL holds, whether it would be
    /// refused), change nothing; the exit status is the one the pull would have.
    #[arg(long, conflicts_with_all = ["subscribe", "json"])]
    pub dry_run: bool,
    /// Keep going: pull each new version as it lands (until SIGINT or SIGTERM).
    #[arg(long, conflicts_with = "json")]
    pub subscribe: bool,
    /// The server and the key.
    #[command(flatten)]
    pub connection: RemoteArgs,
}

impl PullArgs {
    /// Runs the command.
    pub fn run(self, global: &Global) -> anyhow::Result<ExitCode> {
        let sidecar = match &self.from {
            Some(path) => {
                let path = expand_tilde(path);
                Some((Sidecar::load(&path)?, path))
            }
            None => None,
        };
        // With --from, one positional is LOCAL unless it is a version (@3).
        let (remote, local_arg) = match (&self.remote, &self.local, &sidecar) {
            (Some(r), None, Some(_)) if !r.starts_with('@') => (None, Some(r.clone())),
            (r, l, _) => (r.clone(), l.clone()),
        };
        let spec = match (&remote, &sidecar) {
            (Some(remote), Some((s, _))) if remote.starts_with('@') => {
                format!("{}{remote}", s.replica)
            }
            (Some(_), Some(_)) => {
                return Err(crate::Error::Usage(
                    "with --from, give the version alone (for example @3), or nothing for the latest".into(),
                )
                .into());
            }
            (Some(remote), None) => remote.clone(),
            (None, Some((s, _))) => s.replica.clone(),
            (None, None) => unreachable!("clap requires REMOTE unless --from is given"),
        };
        let (replica, selector) = Selector::split(&spec)?;
        let local = match (&local_arg, &sidecar) {
            (Some(l), _) => expand_tilde(l),
            (None, Some((_, path))) => Sidecar::database_for(path).ok_or_else(|| {
                crate::Error::Usage(format!(
                    "{} does not end in -sqlferry: name LOCAL",
                    path.display()
                ))
            })?,
            (None, None) => expand_tilde(replica.name()),
        };
        let server = match &sidecar {
            Some((s, _)) => crate::remote::Server::parse(Some(&s.server))?,
            None => self
                .connection
                .resolve_for(&local, &replica, global.quiet)?,
        };
        let database = crate::config::database_key(&local);
        // --key or SQLFERRY_KEY, else the sidecar's PULL key, else a saved key.
        let key = match (&self.connection.key, &sidecar) {
            (None, Some((s, _))) => Some(s.key.clone()),
            _ => self.connection.key_for(&server, &replica, Some(&database)),
        };
        let puller = Puller {
            server,
            replica,
            local,
            database,
            key,
            force: self.force,
        };
        if self.subscribe {
            if !matches!(selector, Selector::Latest) {
                return Err(crate::Error::Usage(format!(
                    "--subscribe follows the latest version; drop @{selector}"
                ))
                .into());
            }
            return super::subscribe::run_pull(puller, global);
        }
        if self.dry_run {
            return puller.dry_run(selector);
        }
        let bar: Arc<dyn Progress> = Arc::new(Bar::new(!global.quiet && !self.json));
        let outcome = puller.pull(selector, bar)?;
        let (replica, local) = (&puller.replica, &puller.local);
        if self.json {
            let mut v = serde_json::to_value(&outcome.stats)?;
            v["replica"] = replica.as_str().into();
            v["version"] = outcome.version.into();
            out(format_args!("{v}"))?;
        } else if !global.quiet {
            let s = &outcome.stats;
            out(format_args!(
                "pulled {replica}@{} into {}: {} of {} pages written ({} received) in {:.2?}",
                outcome.version,
                local.display(),
                s.pages_sent,
                s.pages_total,
                human_bytes(s.bytes_received),
                s.duration
            ))?;
        }
        Ok(ExitCode::from(exit::OK))
    }
}

/// One replica pulled into one database: `pull` and the pull subscriber share it.
#[derive(Debug, Clone)]
pub struct Puller {
    /// Where the replica lives.
    pub server: crate::remote::Server,
    /// The replica.
    pub replica: crate::store::ReplicaPath,
    /// The database, as given.
    pub local: std::path::PathBuf,
    /// The database, absolute: the key of its history.
    pub database: std::path::PathBuf,
    /// The key (none for the embedded store).
    pub key: Option<String>,
    /// Overwrite changes of LOCAL that were never pushed.
    pub force: bool,
}

/// Why LOCAL may not be overwritten: how its digest now differs from what it was
/// expected to be, for a person.
#[derive(Debug, Clone)]
pub struct LocalChange {
    /// What changed.
    pub why: String,
}

impl Puller {
    /// Pulls the version `selector` names; records it in the local history. Refused
    /// (exit 9, nothing changed) when LOCAL holds changes that were never pushed,
    /// unless `force`.
    pub fn pull(
        &self,
        selector: Selector,
        progress: Arc<dyn Progress>,
    ) -> anyhow::Result<crate::remote::PullOutcome> {
        let (replica, local) = (&self.replica, &self.local);
        if !self.force
            && let Some(change) = self.local_change(None, selector)?
        {
            return Err(self.refusal(&change, selector).into());
        }
        let outcome = self
            .server
            .pull(replica, selector, local, self.key.as_deref(), progress)
            .with_context(|| {
                format!("pull {replica}@{selector} into {} failed", local.display())
            })?;
        self.record(&outcome);
        Ok(outcome)
    }

    /// Pulls the latest version through the writer `kept` from the previous pull, if it
    /// can serve again, else a new one; keeps the writer for the next pull. A writer
    /// kept across pulls knows the pages it committed, so as long as no one else writes
    /// LOCAL a pull does not read the whole file (see [`Writer::keep_committed_hashes`]).
    ///
    /// Never over changes that were never pushed (unless `force`): the previous pull of
    /// this subscriber is the base. When no other connection has committed to LOCAL
    /// since (`PRAGMA data_version` of a connection kept for that, and the same file)
    /// nothing is read; otherwise LOCAL's digest must still be the one that pull left.
    /// The first pull checks LOCAL as [`Puller::pull`] does.
    pub fn pull_latest_kept(&self, kept: &mut Kept) -> anyhow::Result<crate::remote::PullOutcome> {
        let (replica, local) = (&self.replica, &self.local);
        let context = || format!("pull {replica} into {} failed", local.display());
        if !self.force && !kept.untouched(local) {
            let change = match kept.digest.clone() {
                // Our own last pull is the base.
                Some(ours) => {
                    tracing::debug!(path = %local.display(), "LOCAL may be written since the last pull: checking its digest");
                    let now = local_digest(local)?;
                    (now.as_deref().is_some_and(|n| n != ours)).then(|| LocalChange {
                        why: "it was written by another program since this subscriber's last pull"
                            .into(),
                    })
                }
                None => self.local_change(None, Selector::Latest)?,
            };
            if let Some(change) = change {
                kept.writer = None;
                return Err(self.refusal(&change, Selector::Latest).into());
            }
        }
        let kept_writer = &mut kept.writer;
        let open = || -> anyhow::Result<crate::page::Writer> {
            Ok(crate::page::Writer::open(local)
                .with_context(context)?
                .keep_committed_hashes())
        };
        // A writer that fails to get ready is dropped: the next pull opens a new one.
        let writer = match kept_writer.take() {
            Some(mut w) => match w.ready_again().with_context(context)? {
                true => w,
                // Closed before the new one opens the file: a handle closed under a
                // live connection would drop that connection's locks.
                false => {
                    drop(w);
                    open()?
                }
            },
            None => open()?,
        };
        let (outcome, writer) = self
            .server
            .pull_into(
                replica,
                Selector::Latest,
                writer,
                self.key.as_deref(),
                crate::remote::no_progress(),
            )
            .with_context(context)?;
        *kept_writer = Some(writer);
        kept.pulled(local, &outcome.stats.digest);
        self.record(&outcome);
        Ok(outcome)
    }

    /// The version `selector` names, from the replica's list (`None`: there is none).
    fn version_info(&self, selector: Selector) -> crate::Result<Option<VersionInfo>> {
        let list = self.server.versions(&self.replica, self.key.as_deref())?;
        let latest = list.last().map_or(0, |v| v.number);
        let number = match selector {
            Selector::Latest => latest,
            Selector::Number(n) => n,
            Selector::LatestMinus(n) => latest.saturating_sub(n),
        };
        Ok(list.into_iter().find(|v| v.number == number))
    }

    /// Whether LOCAL holds changes no sync carried: its digest differs from the one its
    /// last sync with this replica left, or (never synced with it) from that of the
    /// version `selector` names. A LOCAL that does not exist or holds nothing has none,
    /// and neither has one that holds exactly the version pulled. That version is
    /// `known` when the caller has it, else it is looked up, only when needed.
    pub fn local_change(
        &self,
        known: Option<&VersionInfo>,
        selector: Selector,
    ) -> crate::Result<Option<LocalChange>> {
        if !has_content(&self.local) {
            return Ok(None);
        }
        let Some(now) = local_digest(&self.local)? else {
            return Ok(None);
        };
        let target = || match known {
            Some(v) => Ok(Some(v.clone())),
            None => self.version_info(selector),
        };
        let url = self.server.url();
        let replica = self.replica.as_str();
        if let Some(last) = history::last_with(&self.database, &url, replica) {
            // Not what the last recorded sync left may still be the version itself: a
            // pull killed after its COMMIT, before it recorded the sync.
            if now == last.digest || target()?.is_some_and(|v| v.digest == now) {
                return Ok(None);
            }
            let when = crate::epoch::rfc3339(last.at);
            let op = match last.op.as_str() {
                "push" => "pushed as",
                "pull" => "pulled as",
                _ => "synced as",
            };
            return Ok(Some(LocalChange {
                why: format!(
                    "it changed since it was last {op} {replica}@{} at {when} (digest {} then, {} now)",
                    last.version,
                    short(&last.digest),
                    short(&now)
                ),
            }));
        }
        Ok(match target()? {
            Some(v) if v.digest == now => None,
            Some(v) => Some(LocalChange {
                why: format!(
                    "it was never pushed to or pulled from {replica} on {url}, and differs from version {} (digest {}, {} now)",
                    v.number,
                    short(&v.digest),
                    short(&now)
                ),
            }),
            // Nothing to pull: the pull fails on its own, without writing.
            None => None,
        })
    }

    /// The refusal of a pull over `change`: what changed, how to keep it, how to
    /// overwrite it; one line.
    pub fn refusal(&self, change: &LocalChange, selector: Selector) -> crate::Error {
        let local = self.local.display();
        let replica = &self.replica;
        let server = match &self.server {
            crate::remote::Server::Embedded(_) if self.server.url() == default_store_url() => {
                String::new()
            }
            s => format!(" --server {}", s.url()),
        };
        let spec = match selector {
            Selector::Latest => replica.to_string(),
            s => format!("{replica}@{s}"),
        };
        crate::Error::LocalChanges(format!(
            "{local} has changes that were never pushed: {}; pulling would overwrite them, so \
             nothing was changed. To keep them, push them (sqlferry push {local} {replica}{server}) \
             or pull into another file (sqlferry pull {spec} {}{server}); to overwrite them: \
             sqlferry pull {spec} {local}{server} --force",
            change.why,
            other_file(&self.local).display(),
        ))
    }

    /// `pull --dry-run`: which version, what LOCAL holds, whether the pull would be
    /// refused; nothing changed, keys masked. The exit status is the pull's.
    fn dry_run(&self, selector: Selector) -> anyhow::Result<ExitCode> {
        let target = self.version_info(selector)?.ok_or_else(|| {
            crate::Error::NotFound(format!("{}@{selector} does not exist", self.replica))
        })?;
        let key = self.key.as_deref().map_or("no key".to_owned(), |k| {
            format!("key {}", crate::server::mask(k))
        });
        let change = if self.force {
            None
        } else {
            self.local_change(Some(&target), selector)?
        };
        let holds = match local_digest(&self.local) {
            Ok(Some(d)) if d == target.digest => "already holds it".to_owned(),
            Ok(Some(d)) => format!("digest {} now", short(&d)),
            Ok(None) => "new file".to_owned(),
            Err(e) => format!("unreadable: {e}"),
        };
        out(format_args!(
            "would pull {}@{} ({}, {} pages, digest {}) from {} with {key} into {} ({holds}): {}",
            self.replica,
            target.number,
            human_bytes(target.size),
            target.page_count,
            short(&target.digest),
            self.server.url(),
            self.local.display(),
            match &change {
                Some(c) => format!("refused (exit 9), {}", self.refusal(c, selector)),
                None if self.force => "overwriting whatever it holds (--force)".into(),
                None => "ok".into(),
            }
        ))?;
        Ok(ExitCode::from(if change.is_some() {
            exit::LOCAL_CHANGES
        } else {
            exit::OK
        }))
    }

    /// Records a pull in the local history.
    fn record(&self, outcome: &crate::remote::PullOutcome) {
        history::record(&LastSync::now(
            &self.database,
            self.server.url(),
            self.replica.as_str(),
            outcome.version,
            &outcome.stats.digest,
            "pull",
        ));
    }
}

/// What a pull subscriber keeps between its pulls: the writer, and what tells whether
/// anyone else wrote LOCAL since its last pull.
#[derive(Default)]
pub struct Kept {
    /// The writer of the last pull, for the next ([`Writer::keep_committed_hashes`]).
    writer: Option<crate::page::Writer>,
    /// A read-only connection to LOCAL that only asks `PRAGMA data_version`: its answer
    /// changes when any other connection commits, the writer's included, so it is read
    /// right after each pull. SQLite shares the file's locks between connections of one
    /// process, so this one never drops the writer's.
    watch: Option<rusqlite::Connection>,
    /// Its data version, and LOCAL's (device, inode), right after the last pull.
    seen: Option<(i64, (u64, u64))>,
    /// The digest the last pull left LOCAL with.
    digest: Option<String>,
}

impl std::fmt::Debug for Kept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kept")
            .field("seen", &self.seen)
            .field("digest", &self.digest)
            .finish_non_exhaustive()
    }
}

impl Kept {
    /// Whether LOCAL is certainly as the last pull left it: same file, and no other
    /// connection has committed since. `false` when unsure (then the digest decides).
    fn untouched(&self, local: &Path) -> bool {
        let (Some(conn), Some((version, id))) = (&self.watch, self.seen) else {
            return false;
        };
        identity(local) == Some(id) && data_version(conn) == Some(version)
    }

    /// Notes what a pull just left in LOCAL.
    fn pulled(&mut self, local: &Path, digest: &str) {
        self.digest = Some(digest.to_owned());
        if self.watch.is_none() {
            self.watch = rusqlite::Connection::open_with_flags(
                local,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                    | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .ok();
        }
        self.seen = match (&self.watch, identity(local)) {
            (Some(conn), Some(id)) => data_version(conn).map(|v| (v, id)),
            _ => None,
        };
    }
}

fn data_version(conn: &rusqlite::Connection) -> Option<i64> {
    conn.query_row("PRAGMA data_version", [], |r| r.get(0)).ok()
}

fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Whether `path` is a file with something in it (a missing or empty LOCAL holds
/// nothing a pull could lose).
fn has_content(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.len() > 0)
}

/// The digest of the database at `path` now, through the page-hash cache: pages
/// unchanged since they were last hashed are read, not hashed. `None` when it holds
/// nothing a pull could lose: no pages, or only a page 1 with an empty schema (a
/// database an application created and never wrote, or one made by `sqlite3 new.db
/// "PRAGMA journal_mode=WAL"`).
pub fn local_digest(path: &Path) -> crate::Result<Option<String>> {
    let mut snap = match Snapshot::open(path) {
        Ok(s) => s,
        Err(e) if !has_content(path) && e.kind() == crate::ErrorKind::NotADatabase => {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    if snap.page_count() <= 1 {
        // Page 1's b-tree header follows the 100-byte file header; bytes 3-4 of it
        // count the schema's rows.
        let mut page1 = Vec::new();
        snap.read_page(1, &mut page1)?;
        if page1.get(103..105).is_none_or(|cells| cells == [0, 0]) {
            return Ok(None);
        }
    }
    Ok(Some(crate::digest::hex(&snap.digest(false)?)))
}

/// The first 12 hex digits of a digest, for messages.
fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

/// The embedded store's URL when no server is named.
fn default_store_url() -> String {
    crate::remote::Server::parse(None).map_or_else(|_| String::new(), |s| s.url())
}

/// Where to pull instead of LOCAL to keep it: `app.db` → `app.pulled.db`.
fn other_file(local: &Path) -> PathBuf {
    let stem = local
        .file_stem()
        .map_or_else(Default::default, |s| s.to_owned());
    let mut name = stem;
    name.push(".pulled");
    if let Some(ext) = local.extension() {
        name.push(".");
        name.push(ext);
    }
    local.with_file_name(name)
}
