//! `sqlferry pull REMOTE[@N|@latest|@latest-N|@TIME] [LOCAL]`: bring any version back.
//!
//! The flags become a [`Puller`]; the client keeps the invariant that a pull never
//! overwrites changes LOCAL holds that no sync carried (unless `--force`): a refusal
//! changes nothing and exits 9 ([`crate::Error::LocalChanges`]).

use std::process::ExitCode;
use std::sync::Arc;

use super::progress::Bar;
use super::{Global, RemoteArgs, exit, expand_tilde, human_bytes, out, replica_only, store_label};
use crate::client::{Puller, short_digest};
use crate::config::Sidecar;
use crate::engine::Progress;
use crate::shutdown::Shutdown;
use crate::store::Selector;

/// Arguments of `sqlferry pull`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
sqlferry pull acme/app.db                    the latest version into ./app.db\n  \
sqlferry pull acme/app.db@3 restored.db      version 3\n  \
sqlferry pull acme/app.db@latest-1 prev.db   the version before the latest\n  \
sqlferry pull acme/app.db@2026-12-01T10:00:00Z then.db   the version that was the latest then (UTC)\n  \
sqlferry pull acme/app.db --subscribe        keep going: pull each new version as it lands\n  \
sqlferry pull --replica backups/app.db       the replica backups/app.db, though ./backups/ exists\n  \
sqlferry pull acme/app.db --compress off     plain pages only (the server expands what it keeps compressed)\n\n\
REMOTE is a replica, never a local file, and never guessed: a REMOTE that is a file here, or \
starts with /, ./, ../ or ~/, is refused, and so is one such as backups/app.db while the \
directory backups/ exists here (it could mean the file ./backups/app.db): name the replica \
with --replica backups/app.db (LOCAL then follows alone), and copy a local file with push \
(sqlferry push ./backups/app.db LOCAL). The result line names the store: the server's ws:// \
URL, or the embedded store and its directory.\n\n\
LOCAL changes in one transaction, after its digest has been checked against the version's: \
readers of LOCAL keep reading and see the old database or the new one, never a mix. Only \
the pages that differ are written. LOCAL keeps its journal mode; a new LOCAL takes the \
version's.\n\n\
Keys (servers only): --key, SQLFERRY_KEY, the sidecar's PULL key with --from, or the key \
saved for LOCAL by an earlier push.\n\n\
An encrypted replica pulls with its key (--encryption-key-file FILE, \
SQLFERRY_ENCRYPTION_KEY, or --passphrase-file FILE for one made with a passphrase): each page is opened and checked here, and LOCAL commits only when \
the version's seal matches what was built. Without the key, or with another one, the pull \
is refused before anything is written (exit 5); a page or seal changed in the store exits 7, \
LOCAL untouched. After a `sqlferry rekey`, give both key files (--encryption-key-file \
OLD --encryption-key-file NEW): each version opens with the key whose id it names. The key \
never leaves this machine; without it no one can read the replica, you included. With \
--subscribe, every version followed is opened the same way: a version made with a key not \
given (a rekey to a key this subscriber lacks) stops it with exit 5, naming the key id it \
needs, LOCAL holding the last version it pulled; restart it with that key file too.\n\n\
A pull never overwrites changes that were never pushed: when LOCAL changed since its last \
push or pull of this replica (or exists, was never synced with it, and differs from the \
version pulled), the pull is refused with exit 9 and LOCAL is left as it was. Keep the \
changes by pushing them (sqlferry push LOCAL REMOTE), or pull into another file; --force \
overwrites them. --dry-run says what a pull would do, and whether it would be refused.")]
pub struct PullArgs {
    /// The replica, with an optional version: namespace/name[@N|@latest|@latest-N|@TIME],
    /// TIME in UTC such as 2026-12-01T10:00:00Z (the version that was the latest then).
    #[arg(required_unless_present_any = ["from", "replica"])]
    pub remote: Option<String>,
    /// The replica, namespace/name[@VERSION], whatever exists on this machine: for a name
    /// such as backups/app.db while a directory backups/ exists here. REMOTE is then left
    /// out (one positional is LOCAL).
    #[arg(long, value_name = "NAMESPACE/NAME", conflicts_with = "from")]
    pub replica: Option<String>,
    /// Take the server, the replica and the key from a sidecar file (`<db>-sqlferry`);
    /// LOCAL then defaults to the database beside it.
    #[arg(long, value_name = "SIDECAR", conflicts_with = "server")]
    pub from: Option<String>,
    /// The database to write (default: the replica's last path segment, here).
    pub local: Option<String>,
    /// Print one JSON object with the figures on stdout (`local_sealed`: LOCAL was
    /// proved to hold what its last sync left, so only the pages that changed were read).
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
    /// How pages travel.
    #[command(flatten)]
    pub compress: super::CompressArgs,
    /// The encryption key, for an encrypted replica.
    #[command(flatten)]
    pub encryption: super::encryption::EncryptionArgs,
}

impl PullArgs {
    /// Runs the command.
    pub async fn run(self, global: &Global, shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        let key_given = self.encryption.keys(global.quiet || self.json)?;
        let pass = self.encryption.passphrases(global.quiet || self.json)?;
        let sidecar = match &self.from {
            Some(path) => {
                let path = expand_tilde(path);
                Some((Sidecar::load(&path)?, path))
            }
            None => None,
        };
        // With --from, one positional is LOCAL unless it is a version (@3); with
        // --replica, it is LOCAL.
        let (remote, local_arg) = match (&self.remote, &self.local, &sidecar, &self.replica) {
            (Some(_), Some(_), _, Some(r)) => {
                return Err(crate::Error::Usage(format!(
                    "with --replica {r}, give LOCAL alone (REMOTE is the replica --replica names)"
                ))
                .into());
            }
            (r, None, _, Some(_)) => (None, r.clone()),
            (Some(r), None, Some(_), None) if !r.starts_with('@') => (None, Some(r.clone())),
            (r, l, _, _) => (r.clone(), l.clone()),
        };
        let spec = match (&remote, &sidecar, &self.replica) {
            (Some(remote), Some((s, _)), _) if remote.starts_with('@') => {
                format!("{}{remote}", s.replica)
            }
            (Some(_), Some(_), _) => {
                return Err(crate::Error::Usage(
                    "with --from, give the version alone (for example @3), or nothing for the latest".into(),
                )
                .into());
            }
            (Some(remote), None, _) => replica_only(remote)?.to_owned(),
            (None, Some((s, _)), _) => s.replica.clone(),
            (None, None, Some(replica)) => replica.clone(),
            (None, None, None) => {
                unreachable!("clap requires REMOTE unless --from or --replica is given")
            }
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
        let mut connection = self.connection.options();
        connection.compress = self.compress.compress;
        let server = match &sidecar {
            Some((s, _)) => {
                crate::remote::Server::parse(Some(&s.server))?.with_compress(connection.compress)
            }
            None => {
                let resolved = connection.resolve_for(&local, &replica).await?;
                if let Some(saved) = &resolved.from_saved_key
                    && !global.quiet
                {
                    eprintln!(
                        "{}",
                        super::push::using_saved_server(saved, &local, &replica)
                    );
                }
                resolved.server
            }
        };
        let database = crate::config::database_key(&local);
        // --key or SQLFERRY_KEY, else the sidecar's PULL key, else a saved key.
        let key = match (&self.connection.key, &sidecar) {
            (None, Some((s, _))) => Some(s.key.clone()),
            _ => {
                connection
                    .key_for(&server, &replica, Some(&database))
                    .await?
            }
        };
        // A passphrase is stretched with the salt the replica keeps (one it does not
        // keep is refused: it was not made with a passphrase).
        let key_given = super::encryption::with_passphrases(
            &key_given,
            &pass,
            &server,
            &replica,
            key.as_deref(),
            false,
        )
        .await?;
        let puller = Puller {
            server,
            replica,
            local,
            database,
            key,
            force: self.force,
            encryption: super::encryption::keyring(&key_given),
        };
        if self.subscribe {
            puller.server.refuse_on_s3("pull --subscribe")?;
            if !matches!(selector, Selector::Latest) {
                return Err(crate::Error::Usage(format!(
                    "--subscribe follows the latest version; drop @{selector}"
                ))
                .into());
            }
            return super::subscribe::run_pull(puller, global, shutdown)
                .await
                .map_err(|e| super::encryption::name_key(e, &key_given));
        }
        super::interruptible(shutdown, self.pull(&puller, selector, global))
            .await
            .map_err(|e| super::encryption::name_key(e, &key_given))
    }

    /// The one-shot pull (or its dry run) and its result line.
    async fn pull(
        &self,
        puller: &Puller,
        selector: Selector,
        global: &Global,
    ) -> anyhow::Result<ExitCode> {
        if self.dry_run {
            return dry_run(puller, selector).await;
        }
        let bar: Arc<dyn Progress> = Arc::new(Bar::new(!global.quiet && !self.json));
        let outcome = puller.pull(selector, bar).await?;
        let (replica, local) = (&puller.replica, &puller.local);
        if self.json {
            let mut v = serde_json::to_value(&outcome.stats)?;
            v["replica"] = replica.as_str().into();
            v["store"] = puller.server.url().into();
            v["local"] = local.display().to_string().into();
            v["version"] = outcome.version.into();
            v["local_sealed"] = outcome.local_sealed.into();
            if let Some(key) = &outcome.encryption {
                // Opened with this key (of those given, the one the version names);
                // `digest` is over page identities, as the store keeps them, and
                // `plaintext_digest` the file's.
                v["encryption_key_id"] = key.to_string().into();
            }
            out(format_args!("{v}"))?;
        } else if !global.quiet {
            let s = &outcome.stats;
            out(format_args!(
                "pulled {replica}@{} from {} into {}: {} of {} pages written ({} received) in {:.2?}",
                outcome.version,
                store_label(&puller.server),
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

/// `pull --dry-run`: which version, what LOCAL holds, whether the pull would be
/// refused; nothing changed, keys masked. The exit status is the pull's.
async fn dry_run(puller: &Puller, selector: Selector) -> anyhow::Result<ExitCode> {
    let plan = puller.plan(selector).await?;
    let target = &plan.target;
    let key = puller.key.as_deref().map_or("no key".to_owned(), |k| {
        format!("key {}", crate::server::mask(k))
    });
    let holds = match &plan.local_digest {
        Ok(Some(d)) if d.is_version(target) => "already holds it".to_owned(),
        Ok(Some(d)) => format!("digest {} now", short_digest(&d.shown())),
        Ok(None) => "new file".to_owned(),
        Err(e) => format!("unreadable: {e}"),
    };
    out(format_args!(
        "would pull {}@{} ({}, {} pages, digest {}) from {} with {key} into {} ({holds}): {}",
        puller.replica,
        target.number,
        human_bytes(target.size),
        target.page_count,
        short_digest(target.shown_digest()),
        store_label(&puller.server),
        puller.local.display(),
        match &plan.refusal {
            Some(refusal) => format!("refused (exit 9), {refusal}"),
            None if puller.force => "overwriting whatever it holds (--force)".into(),
            None => "ok".into(),
        }
    ))?;
    Ok(ExitCode::from(if plan.refusal.is_some() {
        exit::LOCAL_CHANGES
    } else {
        exit::OK
    }))
}
