//! `sqlferry push LOCAL REMOTE [REMOTE...]`: send what changed, to local copies or as
//! new versions of replicas.
//!
//! Every REMOTE is resolved by one rule ([`Place`]) before anything is sent: an
//! argument that could be a file or a replica is refused, so bad input changes nothing.
//! Several destinations are pushed in turn from the same LOCAL, each with its own base
//! version; one failing does not stop the others, and the exit code is the first
//! failure's.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::encryption::{GivenKey, GivenPassphrase};
use super::progress::Bar;
use super::{
    Global, Place, RemoteArgs, error_line, exit, exit_status, expand_tilde, human_bytes, on_store,
    out,
};
use crate::client::{Pusher, SavedKeys};
use crate::engine::Progress;
use crate::protocol::MAX_TEXT_BYTES;
use crate::protocol::control::MAX_FOLLOWERS_WAIT;
use crate::shutdown::Shutdown;
use crate::store::ReplicaPath;
use crate::subscribe::duration;
use crate::subscribe::plan::Destination;

/// Arguments of `sqlferry push`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
sqlferry push app.db acme/app.db -m \"before migration\"   a new version of replica acme/app.db\n  \
sqlferry push app.db /backup/app.db                      keep a local copy up to date\n  \
sqlferry push app.db ./copy.db --json                    print figures as one JSON object\n  \
sqlferry push app.db acme/app.db --compress zstd         compress every page (auto decides by the link)\n  \
sqlferry push app.db ./backup/app.db acme/app.db         two destinations: a copy and a replica\n  \
sqlferry push app.db acme/app.db --merge                 merge onto the latest version if it moved on\n  \
sqlferry push app.db acme/app.db --merge --on-conflict newer --lww-column updated_at\n    \
rows changed on both sides: the one with the greater updated_at wins\n  \
sqlferry push app.db --replica backups/app.db            the replica backups/app.db, though ./backups/ exists\n  \
sqlferry push app.db acme/app.db --subscribe --wait-idle 10m --max-interval 24h\n    \
keep going: push after 10 minutes without a commit, at least daily (sqlferry help subscribe)\n\n\
Which REMOTE is a local file and which a replica is never guessed. A local file: REMOTE \
starts with /, ./, ../ or ~/, or already exists. A replica (namespace/name, in the store \
--server names, SQLFERRY_SERVER, or the embedded store in ~/.local/share/sqlferry): REMOTE \
has a / and its directory does not exist here, or it is given with --replica. A REMOTE such \
as backups/app.db while the directory backups/ exists here could be either: it is refused \
(exit 2, nothing pushed); write ./backups/app.db for the file or --replica backups/app.db for \
the replica. A bare name that is no file here (backup.db) is no replica path either: write \
./backup.db. Each result line names its store: the server's ws:// URL, the embedded store and \
its directory, or the local file.\n\n\
Several destinations (REMOTE arguments first, in order, then each --replica): each is pushed \
in turn from LOCAL, with its own base version, and gets its own line (--json: one JSON object \
per line, with \"destination\" and \"store\"; a failed one {\"destination\", \"error\", \
\"exit\"}). One that fails does not stop the others: each failure gets its error line, then a \
summary line, and the exit status is the first failure's code. Every REMOTE is checked before \
anything is pushed. With --subscribe, a push subscriber per destination runs side by side (each \
line prefixed with its destination; the exit status is the first destination's failure, in the \
order given). --wait-followers takes one destination.\n\n\
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
--merge merges instead: LOCAL's row changes since its base version are applied onto the \
latest version, and two versions are stored in one transaction, as a merge commit records \
both parents: what LOCAL held (\"v10: push based on v7, merged in v11\"), then the merge \
(\"v11: merge of v10 (this push, based on v7) onto v9\"), which becomes the latest. LOCAL is \
then brought to the merge, atomically, unless it was written meanwhile: it then keeps its \
changes, based on v10, and its next push merges only what changed since. Rows changed on both sides to other values \
are conflicts: --on-conflict refuse (the default) refuses the push with VERSION_CONFLICT (exit \
6) and lists each one (table, key, the base, theirs and ours rows; --json has them whole); \
ours, theirs or newer --lww-column COL decide them. Schema changes on either side are never \
merged (exit 6, the reason given). See docs/rows.md, \"Merge\".\n\n\
Encrypted replicas: with --encryption-key-file FILE (sqlferry keygen FILE writes one), \
SQLFERRY_ENCRYPTION_KEY or --passphrase-file FILE (a passphrase stretched with Argon2id and \
the salt the replica keeps, made by its first push), every page, the commit message and the digest are sealed here \
before they leave; the server, or the embedded store's directory, keeps what it cannot read \
and never sees the key. A replica is encrypted or not from its first version on: a push \
without its key, with another key, or with a key to a plaintext replica is refused (exit 5) \
before anything is sent; a new key is `sqlferry rekey`. Given several keys, a push uses \
the latest version's (a push subscriber picks it when it starts: after a rekey, restart it \
with the new key). Keep a copy of the key where the database's backups are not: a lost key \
is lost data, with no back door. Not with --merge or a local copy (refused, exit 2).\n\n\
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
    /// Where to: a replica path (namespace/name) or a local file path (starting with /,
    /// ./, ../ or ~/, or existing); several for several destinations.
    #[arg(value_name = "REMOTE", required_unless_present = "replica")]
    pub remote: Vec<String>,
    /// A destination that is a replica path (namespace/name), whatever exists on this
    /// machine: for a name such as backups/app.db while a directory backups/ exists here.
    /// Repeat for several.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub replica: Vec<String>,
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
    #[arg(long, conflicts_with = "merge")]
    pub force: bool,
    /// When the replica moved past the version LOCAL is based on, merge LOCAL's row
    /// changes onto the latest version instead of refusing (docs/rows.md, "Merge");
    /// LOCAL is then brought to the merged version, if it did not change meanwhile.
    #[arg(long)]
    pub merge: bool,
    /// With --merge: what to do with rows changed both by LOCAL and in the latest
    /// version, to other values: refuse the push and list them, keep ours (LOCAL's),
    /// keep theirs (the latest version's), or the newer by --lww-column.
    #[arg(long, value_name = "MODE", requires = "merge", default_value = "refuse",
          value_parser = ["refuse", "ours", "theirs", "newer"])]
    pub on_conflict: String,
    /// With --on-conflict newer: the column whose greater value wins (updated_at).
    #[arg(long, value_name = "COL", requires = "merge")]
    pub lww_column: Option<String>,
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
    /// Print one JSON object with the figures on stdout, one line per destination.
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
    /// How pages travel.
    #[command(flatten)]
    pub compress: super::CompressArgs,
    /// The encryption key, for an encrypted replica.
    #[command(flatten)]
    pub encryption: super::encryption::EncryptionArgs,
}

/// One destination of a push, resolved by [`Place`]'s rule.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Dest {
    /// A local copy: the argument as written and its path (`~/` expanded).
    File(String, PathBuf),
    /// A replica in the store the flags (or LOCAL's saved key) name.
    Replica(ReplicaPath),
}

impl std::fmt::Display for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dest::File(arg, _) => f.write_str(arg),
            Dest::Replica(replica) => write!(f, "{replica}"),
        }
    }
}

impl PushArgs {
    /// Runs the command.
    pub async fn run(self, global: &Global, shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        // Every destination and flag is checked before anything is pushed.
        let dests = self.destinations()?;
        if self.wait_followers.is_some() {
            self.check_wait(&dests)?;
        }
        let to_replica = dests.iter().any(|d| matches!(d, Dest::Replica(_)));
        if to_replica && self.message.len() > MAX_TEXT_BYTES {
            return Err(crate::Error::Usage(format!(
                "the commit message has {} bytes; at most {MAX_TEXT_BYTES} are allowed",
                self.message.len()
            ))
            .into());
        }
        if !self.subscribe && self.timing.any() {
            return Err(crate::Error::Usage(
                "--wait-idle, --min-interval, --max-interval and --max-changes need --subscribe"
                    .into(),
            )
            .into());
        }
        let key = self.encryption_key(&dests, global)?;
        let pass = self.encryption.passphrases(global.quiet || self.json)?;
        let key = (key, pass);
        let local = expand_tilde(&self.local);
        if !self.subscribe {
            // One destination after another, nothing else in this process.
            crate::store::one_sync_at_a_time();
        }
        match (dests.as_slice(), self.subscribe) {
            ([Dest::Replica(replica)], true) => {
                let mut pusher = self.pusher(&local, replica.clone(), global).await?;
                let key = keyed(&mut pusher, &key.0, &key.1).await?;
                super::subscribe::run_push(pusher, &self.timing, global, shutdown)
                    .await
                    .map_err(|e| super::encryption::name_key(e, &key))
            }
            (_, true) => {
                self.subscribe_many(&local, &dests, &key, global, shutdown)
                    .await
            }
            ([dest], false) => Ok(ExitCode::from(
                self.push_to(&local, dest, &key, global, shutdown).await?,
            )),
            (_, false) => self.push_many(&local, &dests, &key, global, shutdown).await,
        }
    }

    /// The encryption keys given, if any, refused where they cannot be used (rather
    /// than ignored): a local copy (it stays plaintext), `--merge` (the store cannot
    /// read an encrypted replica's rows).
    fn encryption_key(&self, dests: &[Dest], global: &Global) -> anyhow::Result<Vec<GivenKey>> {
        let keys = self.encryption.keys(global.quiet || self.json)?;
        let source = keys.first().map(|k| k.source.clone()).or_else(|| {
            (self.encryption.passphrase_file.first()).map(|f| format!("--passphrase-file {f}"))
        });
        let Some(source) = source else {
            return Ok(keys);
        };
        if let Some(Dest::File(arg, _)) = dests.iter().find(|d| matches!(d, Dest::File(..))) {
            return Err(crate::Error::Usage(format!(
                "{} is for replicas, and {arg} is a local file (a copy is plaintext, as LOCAL \
                 is); push to the file without it, or to a replica; nothing was pushed",
                source
            ))
            .into());
        }
        if self.merge {
            return Err(crate::Error::Usage(format!(
                "--merge with {}: the store cannot read an encrypted replica's rows, so it \
                 cannot merge them; pull the latest version into another file, make this push's \
                 changes there, and push that file; nothing was pushed",
                source
            ))
            .into());
        }
        Ok(keys)
    }

    /// REMOTE arguments, then `--replica` values, as destinations; the first argument
    /// that is neither clearly a file nor a replica path is a usage error.
    fn destinations(&self) -> crate::Result<Vec<Dest>> {
        let mut dests = Vec::with_capacity(self.remote.len() + self.replica.len());
        for arg in &self.remote {
            let dest = match Place::of(arg) {
                Place::Local(path) => Dest::File(arg.clone(), path),
                Place::Replica(replica) => Dest::Replica(ReplicaPath::parse(&replica)?),
                refused => return Err(refused.refusal().expect("neither a file nor a replica")),
            };
            dests.push(dest);
        }
        for arg in &self.replica {
            dests.push(Dest::Replica(ReplicaPath::parse(arg)?));
        }
        for (i, dest) in dests.iter().enumerate() {
            if dests[..i].contains(dest) {
                return Err(crate::Error::Usage(format!(
                    "{dest} is named twice: give each destination once; nothing was pushed"
                )));
            }
        }
        Ok(dests)
    }

    /// `--subscribe` with several destinations, or with a local copy: one push
    /// subscriber per destination, side by side, each with its own base version,
    /// retries and status; every line is prefixed with its destination.
    async fn subscribe_many(
        &self,
        local: &Path,
        dests: &[Dest],
        keys: &(Vec<GivenKey>, Vec<GivenPassphrase>),
        global: &Global,
        shutdown: &Shutdown,
    ) -> anyhow::Result<ExitCode> {
        let mut destinations = Vec::with_capacity(dests.len());
        for dest in dests {
            destinations.push(match dest {
                Dest::File(_, copy) => Destination::File {
                    local: local.to_owned(),
                    copy: copy.clone(),
                },
                Dest::Replica(replica) => {
                    let mut pusher = self.pusher(local, replica.clone(), global).await?;
                    keyed(&mut pusher, &keys.0, &keys.1).await?;
                    Destination::Replica(Box::new(pusher))
                }
            });
        }
        super::subscribe::run_push_many(destinations, &self.timing, global, shutdown).await
    }

    /// Pushes LOCAL to each destination in turn; a failure does not stop the others.
    /// The exit status is the first failure's code; a summary line ends a run with
    /// failures. A signal stops the run at once (exit 130).
    async fn push_many(
        &self,
        local: &Path,
        dests: &[Dest],
        key: &(Vec<GivenKey>, Vec<GivenPassphrase>),
        global: &Global,
        shutdown: &Shutdown,
    ) -> anyhow::Result<ExitCode> {
        let mut failed: Vec<(&Dest, u8)> = Vec::new();
        for dest in dests {
            let code = match self.push_to(local, dest, key, global, shutdown).await {
                Ok(code) => code,
                Err(e) => {
                    let code = exit_status(&e);
                    eprintln!("sqlferry: error: push to {dest}: {}", error_line(&e));
                    if self.json {
                        out(format_args!(
                            "{}",
                            serde_json::json!({
                                "destination": dest.to_string(),
                                "error": error_line(&e),
                                "exit": code,
                            })
                        ))?;
                    }
                    code
                }
            };
            if code == exit::INTERRUPTED {
                return Ok(ExitCode::from(code));
            }
            if code != exit::OK {
                failed.push((dest, code));
            }
        }
        let Some(&(_, first)) = failed.first() else {
            return Ok(ExitCode::from(exit::OK));
        };
        let which: Vec<String> = failed
            .iter()
            .map(|(dest, code)| format!("{dest} (exit {code})"))
            .collect();
        eprintln!(
            "sqlferry: error: {} of {} destinations failed: {}; {}",
            failed.len(),
            dests.len(),
            which.join(", "),
            if failed.len() == dests.len() {
                "none was pushed"
            } else {
                "the others were pushed"
            }
        );
        Ok(ExitCode::from(first))
    }

    /// One destination: a local copy, or a new version of a replica; its exit status.
    async fn push_to(
        &self,
        local: &Path,
        dest: &Dest,
        keys: &(Vec<GivenKey>, Vec<GivenPassphrase>),
        global: &Global,
        shutdown: &Shutdown,
    ) -> anyhow::Result<u8> {
        match dest {
            Dest::File(_, path) => {
                super::interruptible(shutdown, self.push_file(local, path, global)).await
            }
            Dest::Replica(replica) => {
                let mut pusher = self.pusher(local, replica.clone(), global).await?;
                let keys = keyed(&mut pusher, &keys.0, &keys.1).await?;
                self.push_replica(pusher, global, shutdown)
                    .await
                    .map_err(|e| super::encryption::name_key(e, &keys))
            }
        }
    }

    /// The pusher of LOCAL to `replica`: its store resolved (saying so on stderr when
    /// LOCAL's saved key chose it), its base version and key loaded.
    async fn pusher(
        &self,
        local: &Path,
        replica: ReplicaPath,
        global: &Global,
    ) -> anyhow::Result<Pusher> {
        let mut connection = self.connection.options();
        connection.compress = self.compress.compress;
        let resolved = connection.resolve_for(local, &replica).await?;
        if let Some(saved) = &resolved.from_saved_key
            && !global.quiet
        {
            eprintln!("{}", using_saved_server(saved, local, &replica));
        }
        // What an S3 store cannot do yet is refused before anything is read or written.
        if self.subscribe {
            resolved.server.refuse_on_s3("push --subscribe")?;
        }
        if self.merge {
            resolved.server.refuse_on_s3("push --merge")?;
        }
        let mut pusher =
            Pusher::open(local, replica, resolved.server, self.connection.key.clone()).await?;
        pusher.message = self.message.clone();
        pusher.force = self.force;
        pusher.new_keys = self.new_keys;
        pusher.allow_corrupt = self.allow_corrupt;
        pusher.wait_followers = self.wait_followers.is_some();
        if self.merge {
            pusher.merge = Some(crate::merge::OnConflict::parse(
                &self.on_conflict,
                self.lww_column.as_deref(),
            )?);
        }
        if self.wait_followers.is_some() && !pusher.server.needs_key() {
            return Err(crate::Error::Usage(format!(
                "--wait-followers needs a server (sqlferry serve; --server ws://HOST:PORT): {} \
                 is the embedded store, which does not know its pull subscribers; nothing was pushed",
                pusher.server.url()
            ))
            .into());
        }
        Ok(pusher)
    }

    /// The one-shot push of a replica (or its dry run), its line or JSON, and the wait
    /// for followers; its exit status.
    async fn push_replica(
        &self,
        mut pusher: Pusher,
        global: &Global,
        shutdown: &Shutdown,
    ) -> anyhow::Result<u8> {
        pusher.require_key()?;
        super::interruptible(shutdown, async {
            if self.dry_run {
                return self.dry_run(&pusher).await;
            }
            let bar: Arc<dyn Progress> = Arc::new(Bar::new(!global.quiet && !self.json));
            let report = match pusher.push(bar).await {
                Ok(report) => report,
                Err(e) => {
                    let merge = e.merge_report().cloned();
                    let e = anyhow::Error::from(e);
                    match merge {
                        Some(merge) => {
                            self.print_refused_merge(&pusher, &e, &merge)?;
                            return Ok(exit::CONFLICT);
                        }
                        None => return Err(e),
                    }
                }
            };
            // The push line first: the version exists, whatever the wait brings.
            if !self.json {
                self.print(&pusher, &report, None, global)?;
            }
            if let Some(saved) = &report.saved_keys {
                eprintln!("{}", new_keys_note(saved));
            }
            let followers = match self.wait_followers {
                Some(n) => Some(self.wait(&pusher, report.outcome.version, n, global).await?),
                None => None,
            };
            if self.json {
                self.print(&pusher, &report, followers, global)?;
            }
            match (self.wait_followers, followers) {
                (Some(n), Some(f)) if !f.reached => {
                    eprintln!(
                        "sqlferry: error: {}",
                        not_followed(&pusher.replica, report.outcome.version, f.count, n, self.timeout)
                    );
                    Ok(exit::NOT_FOLLOWED)
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
                    Ok(exit::OK)
                }
                _ => Ok(exit::OK),
            }
        })
        .await
    }

    /// `--wait-followers` is for one replica on a server, with a timeout the server
    /// grants.
    fn check_wait(&self, dests: &[Dest]) -> anyhow::Result<()> {
        match dests {
            [Dest::Replica(_)] => {}
            [Dest::File(arg, _)] => {
                return Err(crate::Error::Usage(format!(
                    "--wait-followers needs a replica on a server; {arg} is a local file"
                ))
                .into());
            }
            _ => {
                return Err(crate::Error::Usage(format!(
                    "--wait-followers waits for the followers of one replica; {} are several \
                     destinations: push them with --wait-followers one at a time",
                    list(dests)
                ))
                .into());
            }
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
        report: &crate::client::PushReport,
        followers: Option<crate::remote::Followers>,
        global: &Global,
    ) -> anyhow::Result<()> {
        let (outcome, local_kept) = (&report.outcome, &report.local_kept);
        let (replica, local) = (&pusher.replica, &pusher.local);
        let store = on_store(&pusher.server);
        if self.json {
            let mut v = serde_json::to_value(&outcome.stats)?;
            v["destination"] = replica.as_str().into();
            v["store"] = pusher.server.url().into();
            v["replica"] = replica.as_str().into();
            v["version"] = outcome.version.into();
            v["created"] = outcome.created.into();
            v["repaired"] = outcome.repaired.into();
            v["proved_unchanged"] = outcome.proved_unchanged.into();
            if let Some(key) = &pusher.encryption {
                // The replica is encrypted with this key; `digest` is then over page
                // identities (what the store checked), `plaintext_digest` the file's.
                v["encryption_key_id"] = key.id().to_string().into();
            }
            if let Some(merged) = &outcome.merged {
                // What the merge did, and whether LOCAL now holds its version.
                v["merged"] = serde_json::to_value(&merged.result)?;
                v["local_updated"] = local_kept.is_none().into();
                if let Some(why) = local_kept {
                    v["local_kept"] = why.as_str().into();
                }
            }
            if let Some(f) = followers {
                // How many pull subscribers hold the version, and whether that is
                // the number waited for.
                v["followers"] = f.count.into();
                v["followed"] = f.reached.into();
            }
            out(format_args!("{v}"))?;
        } else if !global.quiet {
            let s = &outcome.stats;
            if let Some(merged) = &outcome.merged {
                let r = &merged.result;
                let decided = match r.conflicts_total {
                    0 => String::new(),
                    n => format!(
                        ", {n} row{} changed on both sides decided",
                        if n == 1 { "" } else { "s" }
                    ),
                };
                let made = match outcome.created {
                    true if r.candidate > 0 && r.candidate != r.onto => format!(
                        "version {} (this push kept as version {})",
                        outcome.version, r.candidate
                    ),
                    true => format!("version {}", outcome.version),
                    false => format!("no change, version {} holds it all", outcome.version),
                };
                out(format_args!(
                    "merged {} (based on version {}) onto version {} of {replica} {store}: {made} ({} row change{} of this push{decided})",
                    local.display(),
                    r.base,
                    r.onto,
                    r.changes,
                    if r.changes == 1 { "" } else { "s" },
                ))?;
                match local_kept {
                    None => out(format_args!(
                        "{} now holds version {}",
                        local.display(),
                        outcome.version
                    ))?,
                    Some(why) if r.candidate > 0 => eprintln!(
                        "sqlferry: note: {why} (only what changed since version {}, this push as \
                         sent, which is now its base)",
                        r.candidate
                    ),
                    Some(why) => eprintln!("sqlferry: note: {why}"),
                }
                print_conflicts(r);
            } else if outcome.created {
                out(format_args!(
                    "pushed {} to {replica} {store}: version {} ({} of {} pages sent, {} sent) in {:.2?}",
                    local.display(),
                    outcome.version,
                    s.pages_sent,
                    s.pages_total,
                    human_bytes(s.bytes_sent),
                    s.duration
                ))?;
            } else if outcome.repaired > 0 {
                out(format_args!(
                    "repaired: {replica} {store} is already at version {} ({}); {} damaged stored page(s) replaced with good ones",
                    outcome.version,
                    local.display(),
                    outcome.repaired
                ))?;
            } else {
                out(format_args!(
                    "no change: {replica} {store} is already at version {} ({})",
                    outcome.version,
                    local.display()
                ))?;
            }
        }
        Ok(())
    }

    /// A merge refused: the error line, each conflicting row listed on stderr, and
    /// with `--json` one object holding the merge's report.
    fn print_refused_merge(
        &self,
        pusher: &Pusher,
        e: &anyhow::Error,
        merge: &serde_json::Value,
    ) -> anyhow::Result<()> {
        eprintln!("sqlferry: error: {}", error_line(e));
        let result: Option<crate::protocol::control::MergeResult> =
            serde_json::from_value(merge.clone()).ok();
        if let Some(r) = &result {
            print_conflicts(r);
        }
        if self.json {
            out(format_args!(
                "{}",
                serde_json::json!({
                    "destination": pusher.replica.as_str(),
                    "store": pusher.server.url(),
                    "replica": pusher.replica.as_str(),
                    "error": error_line(e),
                    "exit": exit::CONFLICT,
                    "merged": merge,
                })
            ))?;
        }
        Ok(())
    }

    /// `--dry-run`: what a push would do, keys masked, nothing changed.
    async fn dry_run(&self, pusher: &Pusher) -> anyhow::Result<u8> {
        let plan = pusher.plan().await?;
        let key = pusher.key.as_deref().map_or("no key".to_owned(), |k| {
            format!("key {}", crate::server::mask(k))
        });
        out(format_args!(
            "would push {} ({}, {} pages) to {} {} with {key}: {}",
            pusher.local.display(),
            human_bytes(plan.size),
            plan.page_count,
            pusher.replica,
            on_store(&pusher.server),
            match (plan.latest, plan.conflict) {
                _ if plan.damaged.is_some() => format!(
                    "refused (exit 7), {}",
                    plan.damaged
                        .as_ref()
                        .map(ToString::to_string)
                        .unwrap_or_default()
                ),
                (Some(n), true) if pusher.merge.is_some() && plan.base.is_some() => format!(
                    "a merge of LOCAL's row changes since version {} onto version {n} (refused, \
                     VERSION_CONFLICT, if it changes rows version {n} changed, unless \
                     --on-conflict decides them, or if either changed the schema)",
                    plan.base.unwrap_or(0)
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
        Ok(if plan.damaged.is_some() {
            exit::VERIFY
        } else if plan.conflict && !(pusher.merge.is_some() && plan.base.is_some()) {
            exit::CONFLICT
        } else {
            exit::OK
        })
    }

    /// `push SRC DEST` between two local files; its exit status.
    async fn push_file(&self, src: &Path, dest: &Path, global: &Global) -> anyhow::Result<u8> {
        if self.dry_run {
            let plan = crate::client::plan_copy(src, dest, self.allow_corrupt).await?;
            out(format_args!(
                "would push {} ({} pages) to {} (a local file){}",
                src.display(),
                plan.page_count,
                dest.display(),
                plan.damaged
                    .as_ref()
                    .map_or(String::new(), |e| format!(": refused (exit 7), {e}"))
            ))?;
            return Ok(if plan.damaged.is_some() {
                exit::VERIFY
            } else {
                exit::OK
            });
        }
        let bar: Arc<dyn Progress> = Arc::new(Bar::new(!global.quiet && !self.json));
        let stats = crate::client::copy_file(src, dest, self.allow_corrupt, bar).await?;
        if self.json {
            let mut v = serde_json::to_value(&stats)?;
            v["destination"] = dest.display().to_string().into();
            v["store"] = dest.display().to_string().into();
            out(format_args!("{v}"))?;
        } else if !global.quiet {
            out(format_args!(
                "pushed {} to {} (a local file): {} of {} pages sent ({} sent, {} received) in {:.2?}, digest {}",
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
        Ok(exit::OK)
    }
}

/// Each conflicting row of a merge on stderr, one line each, and how many more there
/// were than the report lists.
/// Gives `pusher` the key its pushes seal with: none, the one given, or of several the
/// one the replica's latest version was made with ([`latest_key`], asked once: a push
/// subscriber keeps it, so after a `rekey` it is restarted with the new key).
pub(super) async fn keyed(
    pusher: &mut Pusher,
    keys: &[GivenKey],
    passphrases: &[GivenPassphrase],
) -> anyhow::Result<Vec<GivenKey>> {
    // A passphrase is stretched with the replica's salt, or a new one this push
    // records with it (the replica's first passphrase version).
    let keys = &super::encryption::with_passphrases(
        keys,
        passphrases,
        &pusher.server,
        &pusher.replica,
        pusher.key.as_deref(),
        true,
    )
    .await?;
    let key = match &keys[..] {
        [] => None,
        [one] => Some(one),
        several => Some(
            latest_key(pusher, several)
                .await
                .map_err(|e| super::encryption::name_key(e.into(), keys))?,
        ),
    };
    pusher.encryption = key.map(|k| k.key.clone());
    Ok(keys.clone())
}

/// Of several keys given to a push, the one the replica's latest version was made
/// with: a push continues the replica under its key (a change of key is a rekey). A
/// replica with no encrypted latest version, or one whose key is not among those
/// given, is refused before anything is sent.
async fn latest_key<'k>(
    pusher: &crate::client::Pusher,
    keys: &'k [GivenKey],
) -> crate::Result<&'k GivenKey> {
    let replica = &pusher.replica;
    let versions = pusher
        .server
        .versions(replica, pusher.key.as_deref())
        .await?;
    let latest = versions.iter().rev().find(|v| v.merged_into.is_none());
    let Some((number, id)) = latest.and_then(|v| Some((v.number, v.encryption.as_deref()?))) else {
        return Err(crate::Error::Usage(format!(
            "{} encryption keys given, and {replica} has no encrypted version to say which \
             to push with: give one key; nothing was pushed",
            keys.len()
        )));
    };
    keys.iter()
        .find(|k| k.key.id().to_string() == id)
        .ok_or_else(|| {
            crate::Error::Auth(format!(
                "version {number} of {replica} was made with key id {id}, and the keys \
                 given have ids {}: push with its key file; nothing was pushed",
                keys.iter()
                    .map(|k| k.key.id().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

fn print_conflicts(r: &crate::protocol::control::MergeResult) {
    for c in &r.conflicts {
        eprintln!("{}", conflict_line(c));
    }
    if r.conflicts_total > r.conflicts.len() as u64 {
        eprintln!(
            "  … and {} more",
            r.conflicts_total - r.conflicts.len() as u64
        );
    }
}

/// One row changed on both sides of a merge, for stderr: `conflict: t id=1: base
/// (a=10, b='one'), theirs (a=10, b='uno'), ours (a=11, b='one') → ours`. Values are
/// shortened as `diff --rows` shortens them; `--json` has them whole.
fn conflict_line(c: &crate::protocol::control::RowConflict) -> String {
    let key = c
        .key_columns
        .iter()
        .zip(&c.key)
        .map(|(k, v)| format!("{k}={}", short_json(v)))
        .collect::<Vec<_>>()
        .join(", ");
    let row = |r: &Option<serde_json::Map<String, serde_json::Value>>| match r {
        None => "(no row)".to_owned(),
        Some(r) => format!(
            "({})",
            r.iter()
                .filter(|(k, _)| !c.key_columns.contains(k))
                .map(|(k, v)| format!("{k}={}", short_json(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    format!(
        "conflict: {} {key}: base {}, theirs {}, ours {} → {}",
        c.table,
        row(&c.base),
        row(&c.theirs),
        row(&c.ours),
        c.resolution
    )
}

/// A JSON value of a row as a shortened SQL-ish literal.
fn short_json(v: &serde_json::Value) -> String {
    use rusqlite::types::Value;
    let value = match v {
        serde_json::Value::Null => Value::Null,
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Real(n.as_f64().unwrap_or(0.0)),
        },
        serde_json::Value::String(s) => Value::Text(s.clone()),
        serde_json::Value::Object(o) => match o.get("blob").and_then(|b| b.as_str()) {
            Some(h) => Value::Blob(hex::decode(h).unwrap_or_default()),
            None => return v.to_string(),
        },
        other => return other.to_string(),
    };
    crate::rows::short_value(&value)
}

/// Destinations for a message: `./a.db, acme/app.db`.
fn list(dests: &[Dest]) -> String {
    dests
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
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
