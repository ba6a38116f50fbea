//! The daemon's configuration file (TOML): what it reads, how it is checked, and the
//! units it makes.
//!
//! A file is read whole and checked whole before anything runs: TOML syntax, unknown
//! keys, durations, timing rules, replica paths, key files, two entries claiming the
//! same database and destination. Every error names the file, the line and the reason,
//! so a reload (SIGHUP) of a bad file changes nothing and says why.
//!
//! The file holds `[defaults]` and three kinds of entries, each turned into [`Unit`]s:
//! `[[push]]` (one database to one or more destinations: one push unit each), `[[pull]]`
//! (a replica followed into a database) and `[[directory]]` (every database matching a
//! glob in a directory, each pushed to `NAMESPACE/<file name>` and/or copied into a
//! directory). `examples/sqlferry.toml` is the commented reference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::protocol::compress::CompressMode;
use crate::store::ReplicaPath;
use crate::subscribe::duration;
use crate::subscribe::timer::Timing;

/// A secret (a key), kept out of `Debug` output and logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Where a replica lives and the key to reach it, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Store {
    /// `ws://`, `wss://` or `file://` URL; `None`: the settings file's server, else the
    /// embedded store.
    pub server: Option<String>,
    /// The key, read from `key_file` or `key_env` when the file was loaded; `None`:
    /// `SQLFERRY_KEY`, else the key saved by an earlier push of the database.
    pub key: Option<Secret>,
    /// `compress`, unless `SQLFERRY_COMPRESS` is set (the environment wins over the
    /// file); `None`: the environment's, else `auto`.
    pub compress: Option<CompressMode>,
    /// For a push: `merge = true` (with `on_conflict`, `lww_column`): merge onto the
    /// latest version when the replica moved past the push's base (`push --merge`).
    pub merge: Option<crate::merge::OnConflict>,
    /// `encryption_key_file`: the replica's end-to-end encryption key, read when the
    /// file was loaded (docs/security.md); `None`: a plaintext replica.
    pub encryption: Option<ConfiguredKey>,
    /// `passphrase_file`: the replica's passphrase, read and checked when the file was
    /// loaded; stretched into its key (with the salt the replica keeps) each time a
    /// unit using it starts, never here. `None` with [`Store::encryption`] set, or for
    /// a plaintext replica.
    pub passphrase: Option<ConfiguredPassphrase>,
}

/// A passphrase read from the file `passphrase_file` names, as `--passphrase-file`
/// reads it ([`crate::crypt::read_passphrase_file`]). It is not a key until the
/// replica's salt is known, which only a unit's start asks for: loading a file
/// connects to nothing. Two are equal when they name the same file and hold the same
/// passphrase (a reload that finds another one restarts the units using it). `Debug`
/// shows the file, never the passphrase.
#[derive(Clone, PartialEq, Eq)]
pub struct ConfiguredPassphrase {
    /// The passphrase's bytes (its line ending removed).
    pub passphrase: Vec<u8>,
    /// The file it was read from (absolute).
    pub file: PathBuf,
}

impl std::fmt::Debug for ConfiguredPassphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConfiguredPassphrase({})", self.file.display())
    }
}

/// An encryption key read from the file `encryption_key_file` names. Two are equal
/// when they name the same file and hold the same key (compared by key id): a reload
/// that finds another key in the file restarts the units using it. `Debug` shows the
/// file and the key id, never the key.
#[derive(Clone)]
pub struct ConfiguredKey {
    /// The key.
    pub key: crate::crypt::EncryptionKey,
    /// The file it was read from (absolute).
    pub file: PathBuf,
}

impl PartialEq for ConfiguredKey {
    fn eq(&self, other: &ConfiguredKey) -> bool {
        self.file == other.file && self.key.id() == other.key.id()
    }
}

impl Eq for ConfiguredKey {}

impl std::fmt::Debug for ConfiguredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ConfiguredKey({}, key id {})",
            self.file.display(),
            self.key.id()
        )
    }
}

/// Where one push unit sends its database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A replica in a store.
    Replica {
        /// The replica.
        replica: ReplicaPath,
        /// Its store.
        store: Store,
    },
    /// A local file kept equal to the database.
    File(PathBuf),
}

impl Target {
    /// How lines and `--check` name it.
    pub fn label(&self) -> String {
        match self {
            Target::Replica { replica, store } => match &store.server {
                Some(url) => format!("{replica} on {url}"),
                None => format!("{replica}"),
            },
            Target::File(path) => path.display().to_string(),
        }
    }
}

/// When a push unit pushes, as configured (checked: [`Timing::new`] accepts it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct When {
    /// The checked timing.
    pub timing: Timing,
    /// How often the watcher's safety-net poll runs.
    pub poll: Duration,
}

/// One thing the daemon runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unit {
    /// A push subscriber of one database to one destination.
    Push {
        /// The database (absolute).
        database: PathBuf,
        /// Where to.
        target: Target,
        /// When.
        when: When,
        /// The commit message (empty: `sqlferry subscribe: TRIGGER`).
        message: String,
    },
    /// A pull subscriber of one replica into one database.
    Pull {
        /// The replica.
        replica: ReplicaPath,
        /// Its store.
        store: Store,
        /// The database it keeps (absolute).
        into: PathBuf,
    },
    /// Every database matching `glob` in `path`, each a push unit per destination.
    Directory {
        /// The directory (absolute).
        path: PathBuf,
        /// File names to take (`*` and `?`).
        glob: String,
        /// Replicas `NAMESPACE/<file name>`, when set.
        namespace: Option<String>,
        /// The namespace's store.
        store: Store,
        /// Copies `COPY_TO/<file name>`, when set.
        copy_to: Option<PathBuf>,
        /// When.
        when: When,
        /// The commit message.
        message: String,
    },
}

impl Unit {
    /// The unit's identity across reloads: a unit whose id stays and whose settings
    /// change is restarted; one whose id goes is stopped.
    pub fn id(&self) -> String {
        match self {
            Unit::Push {
                database, target, ..
            } => format!("push {} -> {}", database.display(), target.label()),
            Unit::Pull { replica, into, .. } => {
                format!("pull {replica} -> {}", into.display())
            }
            Unit::Directory { path, glob, .. } => {
                format!("directory {}", path.join(glob).display())
            }
        }
    }

    /// How lines name it: `app.db -> acme/app.db`, `acme/app.db -> replica.db`,
    /// `/srv/tenants/*.db`.
    pub fn label(&self) -> String {
        match self {
            Unit::Push {
                database, target, ..
            } => format!("{} -> {}", database.display(), target.label()),
            Unit::Pull { replica, into, .. } => format!("{replica} -> {}", into.display()),
            Unit::Directory { path, glob, .. } => path.join(glob).display().to_string(),
        }
    }
}

/// A checked configuration: its units by id, in the file's order of ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    /// The units, by [`Unit::id`].
    pub units: BTreeMap<String, Unit>,
    /// How many pushes may run at once (`[defaults] max_concurrent_pushes`).
    pub max_concurrent_pushes: usize,
}

/// The default of `max_concurrent_pushes`: enough to use a fast link, few enough that
/// 200 databases changing at once do not read 200 files at once.
pub const DEFAULT_CONCURRENT_PUSHES: usize = 4;

// The file as written. Every table refuses keys it does not know: a typo is an error,
// not a setting silently ignored.

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct File {
    defaults: Option<Spanned<Settings>>,
    #[serde(default)]
    push: Vec<Spanned<PushEntry>>,
    #[serde(default)]
    pull: Vec<Spanned<PullEntry>>,
    #[serde(default)]
    directory: Vec<Spanned<DirectoryEntry>>,
}

/// Settings an entry may give and `[defaults]` gives to all.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct Settings {
    server: Option<String>,
    compress: Option<CompressMode>,
    merge: Option<bool>,
    on_conflict: Option<String>,
    lww_column: Option<String>,
    key_file: Option<PathBuf>,
    key_env: Option<String>,
    encryption_key_file: Option<PathBuf>,
    passphrase_file: Option<PathBuf>,
    wait_idle: Option<String>,
    min_interval: Option<String>,
    max_interval: Option<String>,
    max_changes: Option<u32>,
    poll: Option<String>,
    message: Option<String>,
    max_concurrent_pushes: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PushEntry {
    database: PathBuf,
    to: Vec<Destination>,
    server: Option<String>,
    compress: Option<CompressMode>,
    merge: Option<bool>,
    on_conflict: Option<String>,
    lww_column: Option<String>,
    key_file: Option<PathBuf>,
    key_env: Option<String>,
    encryption_key_file: Option<PathBuf>,
    passphrase_file: Option<PathBuf>,
    wait_idle: Option<String>,
    min_interval: Option<String>,
    max_interval: Option<String>,
    max_changes: Option<u32>,
    poll: Option<String>,
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PullEntry {
    replica: String,
    into: PathBuf,
    server: Option<String>,
    compress: Option<CompressMode>,
    key_file: Option<PathBuf>,
    key_env: Option<String>,
    encryption_key_file: Option<PathBuf>,
    passphrase_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectoryEntry {
    path: PathBuf,
    #[serde(default = "default_glob")]
    glob: String,
    namespace: Option<String>,
    copy_to: Option<PathBuf>,
    server: Option<String>,
    compress: Option<CompressMode>,
    merge: Option<bool>,
    on_conflict: Option<String>,
    lww_column: Option<String>,
    key_file: Option<PathBuf>,
    key_env: Option<String>,
    encryption_key_file: Option<PathBuf>,
    passphrase_file: Option<PathBuf>,
    wait_idle: Option<String>,
    min_interval: Option<String>,
    max_interval: Option<String>,
    max_changes: Option<u32>,
    poll: Option<String>,
    message: Option<String>,
}

fn default_glob() -> String {
    "*.db".into()
}

/// An entry's own settings, as [`EntrySettings`].
macro_rules! settings_of {
    ($e:expr) => {
        EntrySettings {
            server: $e.server.clone(),
            compress: $e.compress,
            merge: $e.merge,
            on_conflict: $e.on_conflict.clone(),
            lww_column: $e.lww_column.clone(),
            key_file: $e.key_file.clone(),
            key_env: $e.key_env.clone(),
            encryption_key_file: $e.encryption_key_file.clone(),
            passphrase_file: $e.passphrase_file.clone(),
            wait_idle: $e.wait_idle.clone(),
            min_interval: $e.min_interval.clone(),
            max_interval: $e.max_interval.clone(),
            max_changes: $e.max_changes,
            poll: $e.poll.clone(),
            message: $e.message.clone(),
        }
    };
}

/// The settings an entry may override (all of `[defaults]` but the daemon-wide ones).
#[derive(Debug, Default, Clone)]
struct EntrySettings {
    server: Option<String>,
    compress: Option<CompressMode>,
    merge: Option<bool>,
    on_conflict: Option<String>,
    lww_column: Option<String>,
    key_file: Option<PathBuf>,
    key_env: Option<String>,
    encryption_key_file: Option<PathBuf>,
    passphrase_file: Option<PathBuf>,
    wait_idle: Option<String>,
    min_interval: Option<String>,
    max_interval: Option<String>,
    max_changes: Option<u32>,
    poll: Option<String>,
    message: Option<String>,
}

/// A destination: a string (a path starting with `/`, `./`, `../` or `~/` is a file,
/// anything else a replica in the entry's store), or a table naming its own store.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Destination {
    Plain(String),
    Replica {
        replica: String,
        server: Option<String>,
        key_file: Option<PathBuf>,
        key_env: Option<String>,
    },
    File {
        file: PathBuf,
    },
}

/// Why a file was refused: where and why, one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

impl Config {
    /// Reads and checks the file at `path`. Relative paths in it are relative to its
    /// directory; keys are read from their files and variables now.
    pub fn load(path: &Path) -> Result<Config, Refused> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Refused(format!("{}: cannot read: {e}", path.display())))?;
        let base = std::path::absolute(path)
            .ok()
            .and_then(|p| p.parent().map(Path::to_owned))
            .unwrap_or_default();
        Config::parse(&text, &base, &|name| std::env::var(name).ok())
            .map_err(|e| Refused(format!("{}:{e}", path.display())))
    }

    /// Checks `text`; `base` resolves relative paths, `env` reads variables. Errors
    /// start with the line number (`12: …`).
    pub fn parse(
        text: &str,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, String> {
        let file: File = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(0, |s| line_of(text, s.start));
            format!("{line}: {}", e.message())
        })?;
        let cx = Context { base, env };
        let defaults_line = file
            .defaults
            .as_ref()
            .map_or(1, |d| line_of(text, d.span().start));
        let defaults = file.defaults.map(Spanned::into_inner).unwrap_or_default();
        if defaults.encryption_key_file.is_some() && defaults.passphrase_file.is_some() {
            return Err(format!("{defaults_line}: [defaults]: {BOTH_KEYS}"));
        }
        let mut config = Config {
            units: BTreeMap::new(),
            max_concurrent_pushes: match defaults.max_concurrent_pushes {
                Some(0) => {
                    return Err(format!(
                        "{defaults_line}: max_concurrent_pushes must be at least 1"
                    ));
                }
                Some(n) => n,
                None => DEFAULT_CONCURRENT_PUSHES,
            },
        };
        let mut lines: BTreeMap<String, usize> = BTreeMap::new();
        let mut add = |unit: Unit, line: usize, config: &mut Config| -> Result<(), String> {
            let id = unit.id();
            if let Some(first) = lines.get(&id) {
                return Err(format!(
                    "{line}: {} is configured twice (first on line {first})",
                    unit.label()
                ));
            }
            lines.insert(id.clone(), line);
            config.units.insert(id, unit);
            Ok(())
        };
        for entry in file.push {
            let line = line_of(text, entry.span().start);
            let entry = entry.into_inner();
            let s = settings_of!(entry).over(&defaults);
            let at = |e: String| format!("{line}: [[push]] {}: {e}", entry.database.display());
            let database = cx.path(&entry.database);
            let when = s.when().map_err(at)?;
            if entry.to.is_empty() {
                return Err(at("`to` names no destination".into()));
            }
            for to in &entry.to {
                let target = cx.target(to, &s).map_err(at)?;
                if let Target::File(copy) = &target
                    && copy == &database
                {
                    return Err(at("a destination is the database itself".into()));
                }
                let unit = Unit::Push {
                    database: database.clone(),
                    target,
                    when,
                    message: s.message.clone().unwrap_or_default(),
                };
                add(unit, line, &mut config)?;
            }
        }
        for entry in file.pull {
            let line = line_of(text, entry.span().start);
            let entry = entry.into_inner();
            let at = |e: String| format!("{line}: [[pull]] {}: {e}", entry.replica);
            let replica = ReplicaPath::parse(&entry.replica).map_err(|e| at(e.to_string()))?;
            let s = EntrySettings {
                server: entry.server.clone(),
                compress: entry.compress,
                key_file: entry.key_file.clone(),
                key_env: entry.key_env.clone(),
                encryption_key_file: entry.encryption_key_file.clone(),
                passphrase_file: entry.passphrase_file.clone(),
                ..EntrySettings::default()
            }
            .over(&defaults);
            let unit = Unit::Pull {
                replica,
                store: cx.store(&s).map_err(at)?,
                into: cx.path(&entry.into),
            };
            add(unit, line, &mut config)?;
        }
        for entry in file.directory {
            let line = line_of(text, entry.span().start);
            let entry = entry.into_inner();
            let s = settings_of!(entry).over(&defaults);
            let at = |e: String| format!("{line}: [[directory]] {}: {e}", entry.path.display());
            if entry.namespace.is_none() && entry.copy_to.is_none() {
                return Err(at(
                    "set `namespace` (replicas NAMESPACE/<file name>), `copy_to` (copies \
                     in a directory), or both"
                        .into(),
                ));
            }
            if let Some(ns) = &entry.namespace {
                // The namespace must make valid replica paths.
                ReplicaPath::parse(&format!("{ns}/x.db")).map_err(|e| at(e.to_string()))?;
            }
            if entry.glob.contains('/') || entry.glob.is_empty() {
                return Err(at(format!(
                    "glob '{}' must be a file name pattern (`*` and `?`), without `/`",
                    entry.glob
                )));
            }
            let path = cx.path(&entry.path);
            let copy_to = entry.copy_to.as_ref().map(|c| cx.path(c));
            if copy_to.as_ref() == Some(&path) {
                return Err(at("copy_to is the directory itself".into()));
            }
            let unit = Unit::Directory {
                path,
                glob: entry.glob.clone(),
                namespace: entry.namespace.clone(),
                store: cx.store(&s).map_err(at)?,
                copy_to,
                when: s.when().map_err(at)?,
                message: s.message.clone().unwrap_or_default(),
            };
            add(unit, line, &mut config)?;
        }
        config.refuse_crossed()?;
        Ok(config)
    }

    /// A database both pushed and pulled into would have the pull overwrite what the
    /// push sends (and a file written by two pulls, a mix): refused.
    fn refuse_crossed(&self) -> Result<(), String> {
        let mut written: BTreeMap<&Path, &Unit> = BTreeMap::new();
        for unit in self.units.values() {
            if let Unit::Pull { into, .. } = unit
                && let Some(other) = written.insert(into, unit)
            {
                return Err(format!(
                    "0: {} and {} both pull into {}",
                    other.label(),
                    unit.label(),
                    into.display()
                ));
            }
        }
        // A watched directory takes every matching database in it: one pulled there would
        // be pushed back (to NAMESPACE/<name>) or copied over, and a database it takes that
        // a [[push]] also sends to the same place would be pushed twice.
        for dir in self.units.values() {
            let Unit::Directory {
                path,
                glob,
                namespace,
                store,
                copy_to,
                ..
            } = dir
            else {
                continue;
            };
            // The file name of `file` when it is one of `parent`'s that `glob` takes.
            let taken = |file: &Path, parent: &Path| -> Option<String> {
                let name = file.file_name()?.to_str()?;
                (file.parent() == Some(parent) && glob_matches(glob, name)).then(|| name.into())
            };
            for unit in self.units.values() {
                match unit {
                    Unit::Pull { into, .. } => {
                        if taken(into, path).is_some() {
                            return Err(format!(
                                "0: {} writes {}, which {} watches and would push back",
                                unit.label(),
                                into.display(),
                                dir.label()
                            ));
                        }
                        if copy_to.as_deref().is_some_and(|c| taken(into, c).is_some()) {
                            return Err(format!(
                                "0: {} writes {}, which {} copies into",
                                unit.label(),
                                into.display(),
                                dir.label()
                            ));
                        }
                    }
                    Unit::Push {
                        database, target, ..
                    } => {
                        let Some(name) = taken(database, path) else {
                            continue;
                        };
                        let twice = match target {
                            Target::Replica { replica, store: s } => {
                                s == store
                                    && namespace.as_ref().is_some_and(|ns| {
                                        replica.as_str() == format!("{ns}/{name}")
                                    })
                            }
                            Target::File(copy) => {
                                copy_to.as_ref().is_some_and(|c| copy == &c.join(&name))
                            }
                        };
                        if twice {
                            return Err(format!(
                                "0: {} is already taken by {}: {} would push it twice",
                                database.display(),
                                dir.label(),
                                unit.label()
                            ));
                        }
                    }
                    Unit::Directory { .. } => {}
                }
            }
        }
        for unit in self.units.values() {
            if let Unit::Push {
                database, target, ..
            } = unit
            {
                for path in [Some(database.as_path()), target_file(target)]
                    .into_iter()
                    .flatten()
                {
                    if let Some(pull) = written.get(path) {
                        return Err(format!(
                            "0: {} writes {}, which {} pushes or copies into",
                            pull.label(),
                            path.display(),
                            unit.label()
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

fn target_file(target: &Target) -> Option<&Path> {
    match target {
        Target::File(p) => Some(p),
        Target::Replica { .. } => None,
    }
}

/// Why an entry naming both an encryption key file and a passphrase file is refused.
const BOTH_KEYS: &str = "give encryption_key_file or passphrase_file, not both: a replica is \
     sealed with one key, and a passphrase is another key than a key file's";

/// What resolving a file's values needs.
struct Context<'a> {
    base: &'a Path,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Context<'_> {
    /// A path from the file: `~/` is the home directory, a relative path is relative to
    /// the file's directory.
    fn path(&self, p: &Path) -> PathBuf {
        let p = match p.strip_prefix("~") {
            Ok(rest) => match (self.env)("HOME") {
                Some(home) => Path::new(&home).join(rest),
                None => p.to_owned(),
            },
            Err(_) => p.to_owned(),
        };
        let p = if p.is_absolute() {
            p
        } else {
            self.base.join(p)
        };
        // Lexically clean (`/etc/./a.db` is `/etc/a.db`); symbolic links are left as
        // written.
        std::path::absolute(&p).unwrap_or(p)
    }

    fn store(&self, s: &EntrySettings) -> Result<Store, String> {
        let key = match (&s.key_file, &s.key_env) {
            (Some(_), Some(_)) => return Err("give key_file or key_env, not both".into()),
            (Some(file), None) => {
                let file = self.path(file);
                let text = std::fs::read_to_string(&file)
                    .map_err(|e| format!("key_file {}: {e}", file.display()))?;
                let key = text.lines().next().unwrap_or("").trim().to_owned();
                if key.is_empty() {
                    return Err(format!("key_file {}: empty", file.display()));
                }
                Some(Secret(key))
            }
            (None, Some(var)) => match (self.env)(var) {
                Some(key) if !key.trim().is_empty() => Some(Secret(key.trim().to_owned())),
                _ => return Err(format!("key_env {var}: the variable is not set")),
            },
            (None, None) => None,
        };
        if let Some(url) = &s.server {
            // The command line's own check of a URL, at load time: a server the
            // daemon could never reach is the file's error, with its line.
            crate::remote::Server::parse(Some(url))
                .and_then(|server| server.refuse_on_s3("the daemon's subscribers"))
                .map_err(|e| e.to_string().replacen("--server ", "server ", 1))?;
        }
        // The environment wins over the file, as everywhere.
        let compress = match (self.env)(crate::protocol::compress::COMPRESS_ENV) {
            Some(v) if !v.trim().is_empty() => None,
            _ => s.compress,
        };
        let merge = match (s.merge, &s.on_conflict, &s.lww_column) {
            (Some(true), on_conflict, lww) => Some(
                crate::merge::OnConflict::parse(
                    on_conflict.as_deref().unwrap_or("refuse"),
                    lww.as_deref(),
                )
                .map_err(|e| {
                    e.to_string()
                        .replace("--on-conflict", "on_conflict")
                        .replace("--lww-column", "lww_column")
                })?,
            ),
            (_, None, None) => None,
            _ => return Err("on_conflict and lww_column go with merge = true".into()),
        };
        if s.encryption_key_file.is_some() && s.passphrase_file.is_some() {
            return Err(BOTH_KEYS.into());
        }
        let encryption = match &s.encryption_key_file {
            Some(file) => Some(self.encryption_key(file)?),
            None => None,
        };
        let passphrase = match &s.passphrase_file {
            Some(file) => Some(self.passphrase(file)?),
            None => None,
        };
        if merge.is_some() && (encryption.is_some() || passphrase.is_some()) {
            let which = if passphrase.is_some() {
                "passphrase_file"
            } else {
                "encryption_key_file"
            };
            return Err(format!(
                "merge = true with {which}: the store cannot read an encrypted replica's \
                 rows, so it cannot merge them; drop one of them"
            ));
        }
        Ok(Store {
            server: s.server.clone(),
            key,
            compress,
            merge,
            encryption,
            passphrase,
        })
    }

    /// The encryption key in `file` (relative to the file's directory, as its other
    /// paths), read as `--encryption-key-file` reads it: a file group or others may
    /// read is used with a warning, as on the command line; one that holds no key is
    /// the file's error (its text never shown).
    fn encryption_key(&self, file: &Path) -> Result<ConfiguredKey, String> {
        let file = self.path(file);
        let (key, mode) = crate::crypt::read_key_file(&file)
            .map_err(|e| format!("encryption_key_file {}: {e}", file.display()))?;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "the encryption key {} may be read by other users (mode {mode:04o}): whoever \
                 reads it reads every version made with it; chmod 600 {}",
                file.display(),
                file.display()
            );
        }
        Ok(ConfiguredKey { key, file })
    }

    /// The passphrase in `file` (relative to the file's directory), read and checked
    /// as `--passphrase-file` reads it: missing, empty or too long is the file's error
    /// (its text never shown); a file group or others may read is used with a warning.
    /// Only read: the replica's salt is asked for, and the key derived, when a unit
    /// using it starts.
    fn passphrase(&self, file: &Path) -> Result<ConfiguredPassphrase, String> {
        let file = self.path(file);
        let (passphrase, mode) = crate::crypt::read_passphrase_file(&file)
            .map_err(|e| format!("passphrase_file {}: {e}", file.display()))?;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "the passphrase file {} may be read by other users (mode {mode:04o}): whoever \
                 reads it reads every version made with it; chmod 600 {}",
                file.display(),
                file.display()
            );
        }
        Ok(ConfiguredPassphrase { passphrase, file })
    }

    fn target(&self, to: &Destination, s: &EntrySettings) -> Result<Target, String> {
        let replica = |name: &str, store: Store| -> Result<Target, String> {
            Ok(Target::Replica {
                replica: ReplicaPath::parse(name).map_err(|e| {
                    format!("{e} (a file destination starts with /, ./, ../ or ~/)")
                })?,
                store,
            })
        };
        match to {
            Destination::Plain(p) if crate::config::names_local_path(p) => {
                Ok(Target::File(self.path(Path::new(p))))
            }
            Destination::Plain(name) => replica(name, self.store(s)?),
            Destination::File { file } => Ok(Target::File(self.path(file))),
            Destination::Replica {
                replica: name,
                server,
                key_file,
                key_env,
            } => {
                let own = EntrySettings {
                    server: server.clone().or_else(|| s.server.clone()),
                    compress: s.compress,
                    merge: s.merge,
                    on_conflict: s.on_conflict.clone(),
                    lww_column: s.lww_column.clone(),
                    key_file: key_file.clone(),
                    key_env: key_env.clone(),
                    // The replica's content is the entry's, whatever server keeps it.
                    encryption_key_file: s.encryption_key_file.clone(),
                    passphrase_file: s.passphrase_file.clone(),
                    ..EntrySettings::default()
                };
                // A table with its own server and no key of its own does not borrow
                // the entry's key: that key is for another server.
                let own = if server.is_none() && key_file.is_none() && key_env.is_none() {
                    EntrySettings {
                        key_file: s.key_file.clone(),
                        key_env: s.key_env.clone(),
                        ..own
                    }
                } else {
                    own
                };
                replica(name, self.store(&own)?)
            }
        }
    }
}

impl EntrySettings {
    /// These settings, with `defaults` where they are silent.
    fn over(&self, defaults: &Settings) -> EntrySettings {
        let d = defaults;
        // A key from the defaults goes with the defaults' server only: an entry naming
        // its own server names its own key too (or relies on SQLFERRY_KEY / saved keys).
        let own_server = self.server.is_some() && self.server != d.server;
        let (key_file, key_env) = if self.key_file.is_some() || self.key_env.is_some() {
            (self.key_file.clone(), self.key_env.clone())
        } else if own_server {
            (None, None)
        } else {
            (d.key_file.clone(), d.key_env.clone())
        };
        // The same for the encryption key: an entry naming a key file or a passphrase
        // takes neither from the defaults (one replica, one way to its key).
        let (encryption_key_file, passphrase_file) =
            if self.encryption_key_file.is_some() || self.passphrase_file.is_some() {
                (
                    self.encryption_key_file.clone(),
                    self.passphrase_file.clone(),
                )
            } else {
                (d.encryption_key_file.clone(), d.passphrase_file.clone())
            };
        EntrySettings {
            server: self.server.clone().or_else(|| d.server.clone()),
            compress: self.compress.or(d.compress),
            merge: self.merge.or(d.merge),
            on_conflict: self.on_conflict.clone().or_else(|| d.on_conflict.clone()),
            lww_column: self.lww_column.clone().or_else(|| d.lww_column.clone()),
            key_file,
            key_env,
            encryption_key_file,
            passphrase_file,
            wait_idle: self.wait_idle.clone().or_else(|| d.wait_idle.clone()),
            min_interval: self.min_interval.clone().or_else(|| d.min_interval.clone()),
            max_interval: self.max_interval.clone().or_else(|| d.max_interval.clone()),
            max_changes: self.max_changes.or(d.max_changes),
            poll: self.poll.clone().or_else(|| d.poll.clone()),
            message: self.message.clone().or_else(|| d.message.clone()),
        }
    }

    /// The checked timing.
    fn when(&self) -> Result<When, String> {
        let parse = |name: &str, v: &Option<String>| -> Result<Option<Duration>, String> {
            v.as_deref()
                .map(|s| duration::parse(s).map_err(|e| format!("{name} '{s}': {e}")))
                .transpose()
        };
        let wait_idle = parse("wait_idle", &self.wait_idle)?.ok_or_else(|| {
            "wait_idle is required (here or in [defaults]), for example wait_idle = \"10m\""
                .to_owned()
        })?;
        let timing = Timing::new(
            wait_idle,
            parse("min_interval", &self.min_interval)?,
            parse("max_interval", &self.max_interval)?,
            self.max_changes,
        )
        // The rules are worded for flags; the file spells them with underscores.
        .map_err(|e| e.replace("--", "").replace('-', "_"))?;
        let poll = parse("poll", &self.poll)?.unwrap_or(crate::subscribe::watch::DEFAULT_POLL);
        if poll < Duration::from_secs(1) {
            return Err(format!("poll '{}': at least 1s", duration::format(poll)));
        }
        Ok(When { timing, poll })
    }
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Whether `name` matches `glob` (`*`: any run of characters, `?`: one character;
/// nothing else is special).
pub fn glob_matches(glob: &str, name: &str) -> bool {
    let (g, n): (Vec<char>, Vec<char>) = (glob.chars().collect(), name.chars().collect());
    // Iterative matching with one backtrack point: linear in practice, no recursion.
    let (mut gi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if gi < g.len() && (g[gi] == '?' || g[gi] == n[ni]) {
            gi += 1;
            ni += 1;
        } else if gi < g.len() && g[gi] == '*' {
            star = Some((gi, ni));
            gi += 1;
        } else if let Some((sg, sn)) = star {
            gi = sg + 1;
            ni = sn + 1;
            star = Some((sg, sn + 1));
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("/etc/sqlferry"), &|name| match name {
            "HOME" => Some("/home/u".into()),
            "PUSH_KEY" => Some("k-from-env\n".into()),
            _ => None,
        })
    }

    /// `encryption_key_file` is read relative to the file's directory, goes to each
    /// destination of its entry (a destination table's own server included) and to
    /// nothing else; a file that holds no key, and merge with a key, are the entry's
    /// errors with its line.
    #[test]
    fn an_encryption_key_file_is_read_relative_to_the_file_and_checked_with_its_line() {
        let dir = tempfile::TempDir::new().unwrap();
        let key = crate::crypt::new_key().unwrap();
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        std::fs::write(
            dir.path().join("keys/app.key"),
            crate::crypt::key_text(&key),
        )
        .unwrap();
        std::fs::write(dir.path().join("keys/bad.key"), "no key here\n").unwrap();
        let id = crate::crypt::EncryptionKey::from_bytes(&key).id();
        let text = |file: &str, extra: &str| {
            format!(
                "[defaults]\nwait_idle = \"10s\"\n\n[[push]]\ndatabase = \"/d/a.db\"\n\
                 to = [\"acme/a.db\", {{ replica = \"off/a.db\", server = \"ws://off:1\" }}]\n\
                 encryption_key_file = \"{file}\"\n{extra}\n\
                 [[push]]\ndatabase = \"/d/b.db\"\nto = [\"acme/b.db\"]\n\n\
                 [[pull]]\nreplica = \"acme/c.db\"\ninto = \"/d/c.db\"\n\
                 encryption_key_file = \"{file}\"\n"
            )
        };
        let env = |_: &str| None;
        let c = Config::parse(&text("keys/app.key", ""), dir.path(), &env).unwrap();
        let keys: Vec<(String, Option<crate::crypt::KeyId>)> = c
            .units
            .values()
            .map(|u| match u {
                Unit::Push {
                    target: Target::Replica { store, .. },
                    ..
                }
                | Unit::Pull { store, .. } => {
                    (u.label(), store.encryption.as_ref().map(|k| k.key.id()))
                }
                _ => panic!("{u:?}"),
            })
            .collect();
        assert_eq!(
            keys,
            [
                ("acme/c.db -> /d/c.db".to_owned(), Some(id)),
                ("/d/a.db -> acme/a.db".to_owned(), Some(id)),
                ("/d/a.db -> off/a.db on ws://off:1".to_owned(), Some(id)),
                ("/d/b.db -> acme/b.db".to_owned(), None),
            ]
        );
        let Some(Unit::Pull { store, .. }) = c.units.values().next() else {
            panic!()
        };
        let k = store.encryption.as_ref().unwrap();
        assert_eq!(k.file, dir.path().join("keys/app.key"));
        // Debug names the file and the key id, never the key.
        let shown = format!("{k:?}");
        assert!(shown.contains(&id.to_string()), "{shown}");
        assert!(
            !shown.contains(crate::crypt::key_text(&key).trim()),
            "{shown}"
        );

        let e = Config::parse(&text("keys/bad.key", ""), dir.path(), &env).unwrap_err();
        assert!(
            e.starts_with("4: [[push]] /d/a.db: encryption_key_file "),
            "{e}"
        );
        assert!(
            e.contains("is not a key") && !e.contains("no key here"),
            "{e}"
        );
        let e = Config::parse(&text("keys/none.key", ""), dir.path(), &env).unwrap_err();
        assert!(
            e.starts_with("4: [[push]] /d/a.db: encryption_key_file "),
            "{e}"
        );
        assert!(e.contains("none.key"), "{e}");
        let e = Config::parse(&text("keys/app.key", "merge = true"), dir.path(), &env).unwrap_err();
        assert!(e.starts_with("4: ") && e.contains("cannot merge"), "{e}");
    }

    /// `passphrase_file` is read (not stretched) when the file is loaded, relative to
    /// it, as `--passphrase-file` reads it; with `encryption_key_file` in the same
    /// entry (or in `[defaults]`) it is refused with the line; an entry naming one
    /// takes neither from the defaults; missing, empty and too long are the entry's
    /// errors, never showing the text.
    #[test]
    fn a_passphrase_file_is_read_at_load_and_exclusive_with_a_key_file() {
        let dir = tempfile::TempDir::new().unwrap();
        std::fs::create_dir(dir.path().join("keys")).unwrap();
        let key = crate::crypt::new_key().unwrap();
        std::fs::write(
            dir.path().join("keys/app.key"),
            crate::crypt::key_text(&key),
        )
        .unwrap();
        std::fs::write(dir.path().join("keys/app.pass"), "a long passphrase \n").unwrap();
        std::fs::write(dir.path().join("keys/empty.pass"), "\r\n").unwrap();
        std::fs::write(dir.path().join("keys/long.pass"), "x".repeat(1025)).unwrap();
        let text = |defaults: &str, extra: &str| {
            format!(
                "[defaults]\nwait_idle = \"10s\"\n{defaults}\n\n\
                 [[push]]\ndatabase = \"/d/a.db\"\nto = [\"acme/a.db\"]\n{extra}\n\n\
                 [[pull]]\nreplica = \"acme/c.db\"\ninto = \"/d/c.db\"\n"
            )
        };
        let env = |_: &str| None;
        let stores = |c: &Config| -> Vec<(Option<PathBuf>, Option<Vec<u8>>)> {
            c.units
                .values()
                .map(|u| match u {
                    Unit::Push {
                        target: Target::Replica { store, .. },
                        ..
                    }
                    | Unit::Pull { store, .. } => (
                        store.encryption.as_ref().map(|k| k.file.clone()),
                        store.passphrase.as_ref().map(|p| p.passphrase.clone()),
                    ),
                    _ => panic!("{u:?}"),
                })
                .collect()
        };
        let pass = dir.path().join("keys/app.pass");
        let keyf = dir.path().join("keys/app.key");
        // An entry's passphrase, the defaults' key file for the other entry.
        let c = Config::parse(
            &text(
                "encryption_key_file = \"keys/app.key\"",
                "passphrase_file = \"keys/app.pass\"",
            ),
            dir.path(),
            &env,
        )
        .unwrap();
        assert_eq!(
            stores(&c),
            [
                (Some(keyf.clone()), None),
                (None, Some(b"a long passphrase ".to_vec())),
            ]
        );
        let Some(Unit::Push {
            target: Target::Replica { store, .. },
            ..
        }) = c.units.values().nth(1)
        else {
            panic!()
        };
        let p = store.passphrase.as_ref().unwrap();
        assert_eq!(p.file, pass);
        let shown = format!("{p:?} {store:?}");
        assert!(!shown.contains("long passphrase"), "{shown}");
        // The defaults' passphrase goes to every entry naming no key.
        let c = Config::parse(
            &text("passphrase_file = \"keys/app.pass\"", ""),
            dir.path(),
            &env,
        )
        .unwrap();
        assert!(stores(&c).iter().all(|(k, p)| k.is_none() && p.is_some()));
        // Both in one entry, or in the defaults: refused with the line.
        let e = Config::parse(
            &text(
                "",
                "encryption_key_file = \"keys/app.key\"\npassphrase_file = \"keys/app.pass\"",
            ),
            dir.path(),
            &env,
        )
        .unwrap_err();
        assert!(
            e.starts_with(
                "5: [[push]] /d/a.db: give encryption_key_file or passphrase_file, not both"
            ),
            "{e}"
        );
        let e = Config::parse(
            &text(
                "encryption_key_file = \"keys/app.key\"\npassphrase_file = \"keys/app.pass\"",
                "",
            ),
            dir.path(),
            &env,
        )
        .unwrap_err();
        assert!(
            e.starts_with("1: [defaults]: give encryption_key_file or passphrase_file, not both"),
            "{e}"
        );
        // Missing, empty, too long; and merge with a passphrase.
        for (file, phrase) in [
            ("keys/none.pass", "cannot read the passphrase file"),
            ("keys/empty.pass", "holds no passphrase"),
            ("keys/long.pass", "more than 1024 bytes"),
        ] {
            let e = Config::parse(
                &text("", &format!("passphrase_file = \"{file}\"")),
                dir.path(),
                &env,
            )
            .unwrap_err();
            assert!(
                e.starts_with("5: [[push]] /d/a.db: passphrase_file "),
                "{e}"
            );
            assert!(e.contains(phrase) && !e.contains("xxxx"), "{e}");
        }
        let e = Config::parse(
            &text("", "passphrase_file = \"keys/app.pass\"\nmerge = true"),
            dir.path(),
            &env,
        )
        .unwrap_err();
        assert!(
            e.starts_with("5: ") && e.contains("merge = true with passphrase_file"),
            "{e}"
        );
    }

    #[test]
    fn a_push_entry_makes_one_unit_per_destination() {
        let c = parse(
            r#"
[defaults]
server = "ws://backup:7878"
key_env = "PUSH_KEY"
wait_idle = "10s"

[[push]]
database = "/var/lib/app/app.db"
to = ["acme/app.db", "./copies/app.db", { replica = "off/app.db", server = "wss://off:1" }]
max_interval = "1h"
"#,
        )
        .unwrap();
        let labels: Vec<String> = c.units.values().map(Unit::label).collect();
        assert_eq!(
            labels,
            [
                "/var/lib/app/app.db -> /etc/sqlferry/copies/app.db",
                "/var/lib/app/app.db -> acme/app.db on ws://backup:7878",
                "/var/lib/app/app.db -> off/app.db on wss://off:1",
            ]
        );
        let keys: Vec<Option<Secret>> = c
            .units
            .values()
            .filter_map(|u| match u {
                Unit::Push {
                    target: Target::Replica { store, .. },
                    ..
                } => Some(store.key.clone()),
                _ => None,
            })
            .collect();
        // The defaults' key goes to the defaults' server only.
        assert_eq!(keys, [Some(Secret("k-from-env".into())), None]);
        let Some(Unit::Push { when, .. }) = c.units.values().next() else {
            panic!()
        };
        assert_eq!(when.timing.max_interval, Some(Duration::from_secs(3600)));
        assert_eq!(when.timing.wait_idle, Duration::from_secs(10));
        assert_eq!(c.max_concurrent_pushes, DEFAULT_CONCURRENT_PUSHES);
    }

    /// `compress` in `[defaults]` goes to every entry that sets none; an entry's own
    /// wins; `SQLFERRY_COMPRESS` wins over both; a word that names no mode is the
    /// file's error, with its line.
    #[test]
    fn merge_comes_from_the_entry_then_the_defaults_and_is_checked() {
        let text = r#"
[defaults]
server = "ws://backup:7878"
wait_idle = "10s"
merge = true

[[push]]
database = "/d/a.db"
to = ["acme/a.db"]

[[push]]
database = "/d/b.db"
to = ["acme/b.db"]
on_conflict = "newer"
lww_column = "updated_at"

[[push]]
database = "/d/c.db"
to = ["acme/c.db"]
merge = false
"#;
        let merges = |c: &Config| -> Vec<Option<crate::merge::OnConflict>> {
            let mut by: Vec<(String, Option<crate::merge::OnConflict>)> = c
                .units
                .values()
                .filter_map(|u| match u {
                    Unit::Push {
                        database,
                        target: Target::Replica { store, .. },
                        ..
                    } => Some((database.display().to_string(), store.merge.clone())),
                    _ => None,
                })
                .collect();
            by.sort_by(|a, b| a.0.cmp(&b.0));
            by.into_iter().map(|(_, m)| m).collect()
        };
        use crate::merge::OnConflict;
        assert_eq!(
            merges(&parse(text).unwrap()),
            [
                Some(OnConflict::Refuse),
                Some(OnConflict::Newer("updated_at".into())),
                None
            ]
        );
        let e = parse(&text.replace("lww_column = \"updated_at\"", "")).unwrap_err();
        assert!(
            e.starts_with("11: ") && e.contains("needs lww_column"),
            "{e}"
        );
        let e = parse(&text.replace("merge = false", "merge = false\non_conflict = \"ours\""))
            .unwrap_err();
        assert!(e.contains("go with merge = true"), "{e}");
    }

    #[test]
    fn compress_comes_from_the_entry_then_the_defaults_and_the_environment_wins() {
        let text = r#"
[defaults]
server = "ws://backup:7878"
wait_idle = "10s"
compress = "off"

[[push]]
database = "/d/a.db"
to = ["acme/a.db"]

[[push]]
database = "/d/b.db"
to = ["acme/b.db"]
compress = "zstd"

[[pull]]
replica = "acme/c.db"
into = "/d/c.db"
"#;
        // By database: a.db, b.db, c.db.
        let modes = |c: &Config| -> Vec<Option<CompressMode>> {
            let mut by: Vec<(String, Option<CompressMode>)> = c
                .units
                .values()
                .filter_map(|u| match u {
                    Unit::Push {
                        database,
                        target: Target::Replica { store, .. },
                        ..
                    } => Some((database.display().to_string(), store.compress)),
                    Unit::Pull { into, store, .. } => {
                        Some((into.display().to_string(), store.compress))
                    }
                    _ => None,
                })
                .collect();
            by.sort_by(|a, b| a.0.cmp(&b.0));
            by.into_iter().map(|(_, m)| m).collect()
        };
        let c = parse(text).unwrap();
        assert_eq!(
            modes(&c),
            [
                Some(CompressMode::Off),
                Some(CompressMode::Zstd),
                Some(CompressMode::Off)
            ]
        );
        let c = Config::parse(text, Path::new("/etc"), &|name| {
            (name == "SQLFERRY_COMPRESS").then(|| "auto".to_owned())
        })
        .unwrap();
        assert_eq!(modes(&c), [None, None, None], "the environment decides");
        let e = parse(&text.replace("\"zstd\"", "\"fast\"")).unwrap_err();
        assert!(
            e.starts_with("14: ") && e.contains("expected auto, zstd or off"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_the_line_and_the_reason() {
        let e = parse("[[push]]\ndatabase = \"a.db\"\nto = [\"x/a.db\"]\n").unwrap_err();
        assert!(
            e.starts_with("1: [[push]] a.db: wait_idle is required"),
            "{e}"
        );
        let e = parse("[defaults]\nwait_idle = \"10s\"\n\n[[push]]\ndatabase = \"a.db\"\nto = [\"x/a.db\"]\nwiat_idle = \"1m\"\n")
            .unwrap_err();
        // The key's own line.
        assert!(
            e.starts_with("7: ") && e.contains("unknown field `wiat_idle`"),
            "{e}"
        );
        let e = parse("[defaults]\nwait_idle = \"10s\"\nmax_interval = \"5s\"\n[[push]]\ndatabase = \"a.db\"\nto = [\"x/a.db\"]\n")
            .unwrap_err();
        assert!(
            e.starts_with("4: ") && e.contains("max_interval 5s: must be at least 10s"),
            "{e}"
        );
        let e = parse("[defaults]\nwait_idle = 10\n").unwrap_err();
        assert!(e.starts_with("2: "), "{e}");
        let e = parse("[defaults]\nwait_idle = \"10s\"\n[[push]]\ndatabase = \"a.db\"\nto = [\"backup.db\"]\n")
            .unwrap_err();
        assert!(e.contains("starts with /, ./, ../ or ~/"), "{e}");
        let e = parse(
            "[defaults]\nwait_idle = \"10s\"\n[[push]]\ndatabase = \"a.db\"\nto = [\"x/a.db\"]\n\
             [[push]]\ndatabase = \"./a.db\"\nto = [\"x/a.db\"]\n",
        )
        .unwrap_err();
        assert!(e.starts_with("6: ") && e.contains("first on line 3"), "{e}");
        let e = parse("[[pull]]\nreplica = \"x/a.db\"\ninto = \"a.db\"\nkey_env = \"NOPE\"\n")
            .unwrap_err();
        assert!(e.contains("key_env NOPE: the variable is not set"), "{e}");
    }

    #[test]
    fn a_database_pulled_into_cannot_be_pushed() {
        let e = parse(
            "[defaults]\nwait_idle = \"10s\"\n[[push]]\ndatabase = \"/d/a.db\"\nto = [\"x/a.db\"]\n\
             [[pull]]\nreplica = \"x/b.db\"\ninto = \"/d/a.db\"\n",
        )
        .unwrap_err();
        assert!(e.contains("writes /d/a.db"), "{e}");
    }

    /// A watched directory's databases are its own: a pull into it (or into its copy
    /// directory) is refused, and so is a [[push]] that sends one of them where the
    /// directory already does; elsewhere, or a file the glob does not take, is fine.
    #[test]
    fn a_watched_directory_is_not_written_by_a_pull_nor_pushed_twice() {
        let dir = "[defaults]\nwait_idle = \"10s\"\n[[directory]]\npath = \"/t\"\nnamespace = \"ten\"\n\
                   copy_to = \"/c\"\n";
        let e = parse(&format!(
            "{dir}[[pull]]\nreplica = \"x/b.db\"\ninto = \"/t/b.db\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("writes /t/b.db, which /t/*.db watches"), "{e}");
        let e = parse(&format!(
            "{dir}[[pull]]\nreplica = \"x/b.db\"\ninto = \"/c/b.db\"\n"
        ))
        .unwrap_err();
        assert!(
            e.contains("writes /c/b.db, which /t/*.db copies into"),
            "{e}"
        );
        let e = parse(&format!(
            "{dir}[[push]]\ndatabase = \"/t/a.db\"\nto = [\"ten/a.db\"]\n"
        ))
        .unwrap_err();
        assert!(
            e.contains("/t/a.db is already taken by /t/*.db: /t/a.db -> ten/a.db"),
            "{e}"
        );
        let e = parse(&format!(
            "{dir}[[push]]\ndatabase = \"/t/a.db\"\nto = [\"/c/a.db\"]\n"
        ))
        .unwrap_err();
        assert!(e.contains("would push it twice"), "{e}");
        for fine in [
            "[[pull]]\nreplica = \"x/b.db\"\ninto = \"/t/b.sqlite\"\n",
            "[[pull]]\nreplica = \"x/b.db\"\ninto = \"/t/sub/b.db\"\n",
            "[[push]]\ndatabase = \"/t/a.db\"\nto = [\"other/a.db\"]\n",
            "[[push]]\ndatabase = \"/t/a.db\"\nto = [\"/backup/a.db\"]\n",
            "[[push]]\ndatabase = \"/t/a.db\"\nto = [{ replica = \"ten/a.db\", server = \"ws://h:1\", key_env = \"PUSH_KEY\" }]\n",
        ] {
            let c = parse(&format!("{dir}{fine}"));
            assert!(c.is_ok(), "{fine}: {c:?}");
        }
    }

    #[test]
    fn a_directory_needs_a_namespace_or_a_copy_directory() {
        let e =
            parse("[defaults]\nwait_idle = \"10s\"\n[[directory]]\npath = \"/t\"\n").unwrap_err();
        assert!(e.contains("set `namespace`"), "{e}");
        let c = parse(
            "[defaults]\nwait_idle = \"10s\"\n[[directory]]\npath = \"~/t\"\nnamespace = \"tenants\"\n",
        )
        .unwrap();
        assert_eq!(
            c.units.values().next().map(Unit::label).as_deref(),
            Some("/home/u/t/*.db")
        );
    }

    #[test]
    fn the_commented_example_is_a_valid_file() {
        let text = include_str!("../../examples/sqlferry.toml");
        let c = Config::parse(text, Path::new("/etc/sqlferry"), &|name| {
            matches!(name, "SQLFERRY_KEY" | "OFFSITE_KEY").then(|| format!("key-{name}"))
        })
        .unwrap();
        let labels: Vec<String> = c.units.values().map(Unit::label).collect();
        assert_eq!(
            labels,
            [
                "/var/lib/tenants/*.db",
                "acme/app.db -> /srv/read-replica/app.db",
                "/var/lib/app/app.db -> /backup/app.db",
                "/var/lib/app/app.db -> acme/app.db on ws://backup.example.net:7878",
                "/var/lib/app/audit.db -> acme/audit.db on ws://backup.example.net:7878",
                "/var/lib/app/audit.db -> acme/audit.db on wss://offsite.example.net:7878",
            ]
        );
        assert_eq!(c.max_concurrent_pushes, 4);
    }

    #[test]
    fn globs_match_file_names() {
        assert!(glob_matches("*.db", "app.db"));
        assert!(glob_matches("*.db", ".db"));
        assert!(!glob_matches("*.db", "app.db-wal"));
        assert!(glob_matches("t-??.sqlite", "t-01.sqlite"));
        assert!(!glob_matches("t-??.sqlite", "t-1.sqlite"));
        assert!(glob_matches("*", "anything"));
        assert!(glob_matches("a*b*c", "aXXbYYc"));
        assert!(!glob_matches("a*b*c", "aXXbYY"));
    }
}
