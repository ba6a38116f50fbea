//! `sqlferry serve`: the shared server, plain or over TLS (`--tls-cert` and `--tls-key`,
//! both or neither; the files are checked before anything is created or printed).
//!
//! Start-up refuses with one line and a documented exit code, never exit 1: a
//! `--listen` that is not an address (2), a data directory that cannot be made or is a
//! file (3), one another server holds (`DATA/serve.lock`, 3), a port in use (3), a
//! full disk (3, saying so). The order keeps a refused start from leaving anything
//! behind: flags first, then the data directory and its lock, then the port, and only
//! then `server.db` and the admin key.
//!
//! It runs on the one runtime the command line builds and stops on the one
//! [`Shutdown`] (SIGINT or SIGTERM: graceful, a second one: forced); it catches no
//! signal of its own.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use super::{Global, exit};
use crate::server::{DataLock, State, Tls, disk_full, serve, serve_metrics};
use crate::shutdown::Shutdown;

/// Arguments of `sqlferry serve`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
sqlferry serve --data /var/lib/sqlferry --listen 127.0.0.1:7878\n  \
sqlferry serve --listen 0.0.0.0:7878 --tls-cert cert.pem --tls-key key.pem   wss:// and https://\n  \
sqlferry serve --retention keep-last=30,keep-daily=14   the default retention policy\n\n\
On first start it creates the admin key and prints it once, on stdout; only its hash is \
stored. Push a new replica with the admin key (sqlferry push app.db acme/app.db --server \
ws://HOST:PORT --key KEY): the server mints a PUSH and a PULL key for it. SIGINT or SIGTERM \
stops it cleanly: sessions in flight get 10 s to finish, then are aborted (an unfinished \
push leaves no trace); a second signal aborts them at once.\n\n\
Dashboard: open http://HOST:PORT/ in a browser and enter the admin key: every replica with \
its health (failing, late, fresh), the age of its latest version, its versions and \
subscribers, and a Sync now button. The same data as JSON, with Authorization: Bearer KEY: \
GET /api/replicas (every replica), GET /api/replicas/NAMESPACE/NAME (one, with its \
subscribers), GET /api/replicas/NAMESPACE/NAME/versions; GET /api/health needs no key and \
tells the server's version and id.\n\n\
TLS: with --tls-cert and --tls-key every connection on the port is TLS (wss:// sessions, \
https:// API); clients then use --server wss://HOST:PORT. A client trusts the usual public \
CAs; for a private CA or a self-signed certificate, set SQLFERRY_CA_FILE=ca.pem on the \
client. Or leave TLS to a reverse proxy in front of a plain server on 127.0.0.1. A test \
certificate for localhost and 127.0.0.1, signed by a private CA (keep ca.key away from the \
server):\n  \
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 365 \\\n      \
-subj \"/CN=my sqlferry CA\" -keyout ca.key -out ca.pem \\\n      \
-addext \"basicConstraints=critical,CA:TRUE\" -addext \"keyUsage=critical,keyCertSign\"\n  \
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \\\n      \
-subj \"/CN=localhost\" -keyout key.pem -out server.csr\n  \
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' > san.ext\n  \
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 365 \\\n      \
-extfile san.ext -out cert.pem\n  \
sqlferry serve --tls-cert cert.pem --tls-key key.pem\n  \
SQLFERRY_CA_FILE=ca.pem sqlferry push app.db acme/app.db --server wss://127.0.0.1:7878 --key KEY\n\n\
Restore drills: with --drill-every 24h, each replica's latest version is read back from the \
store into a temporary file (DATA/tmp/) once a day, its digest and PRAGMA integrity_check \
checked; the result shows as last_drill in GET /api/replicas/NAMESPACE/NAME and in the \
metrics, and a failure is logged at ERROR. One replica at a time; the first drills after \
start are spread over up to 10 minutes.\n\n\
Metrics (Prometheus text format): --metrics-listen 127.0.0.1:9878 serves GET /metrics on a \
second listener without a key (keep it on a loopback or private address); --metrics serves \
it on the main port to the admin key (Authorization: Bearer KEY). Counters of versions \
created, pushes and pulls (by result), bytes sent and received, a histogram of session \
durations; gauges of active sessions, subscribers and, per replica, its latest version and \
that version's age (alert on it), stored bytes, follower lag and the last drill's result. \
A Prometheus scrape config: scrape_configs: [{job_name: sqlferry, static_configs: \
[{targets: ['127.0.0.1:9878']}]}].\n\n\
Several servers, one store (--meta): servers started with the same --data and the same \
--meta postgres://USER@HOST:PORT/DB share their keys, replica ids and server id in that \
PostgreSQL database (migrated at start) and tell each other through LISTEN/NOTIFY: a version \
pushed to one reaches the pull subscribers of every other within a second, and a sync-now \
sent to any reaches every server's subscribers (the answer counts them all, waiting at most \
1 s for the other servers). Put them behind one load balancer. Without --meta a second \
server on a data directory is refused. A password goes in the URL (PGPASSWORD and ~/.pgpass \
are not read): set SQLFERRY_META instead of --meta to keep it off the command line. No TLS \
to PostgreSQL yet: keep it on 127.0.0.1 or a private network. Push subscribers' expected pushes and \
failure reports, followers and drill results stay in each server's memory (the API of one \
server shows its own subscribers).\n  \
sqlferry serve --data /srv/sqlferry --listen 0.0.0.0:7878 --meta postgres://sqlferry@127.0.0.1:5432/sqlferry\n  \
sqlferry serve --data /srv/sqlferry --listen 0.0.0.0:7879 --meta postgres://sqlferry@127.0.0.1:5432/sqlferry\n\n\
Object storage (--store s3://BUCKET/PREFIX): pages and versions go to an S3-compatible \
bucket under PREFIX instead of --data, which keeps server.db (keys, replica ids) and a cache \
of the bucket's pack indexes (DATA/s3-cache/, safe to delete). Credentials and region come \
from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN), AWS_REGION; the endpoint \
from --s3-endpoint or AWS_ENDPOINT_URL (none: AWS S3). At start the server writes and reads \
back PREFIX/sqlferry-store.json: a wrong endpoint, refused credentials or a missing bucket \
stop it there (exit 10). A push writes one pack of its new pages, its index, the chunks of \
page hashes that changed and the version object, created only if absent: two servers on one \
bucket (with --meta, or each with its own --data) never make the same version twice; the \
loser gets VERSION_CONFLICT. Retention over S3: `sqlferry prune REMOTE` removes the versions \
the policy (`sqlferry retention`, --retention) does not keep, then sweeps: it lists the \
bucket once and deletes the packs and chunks no remaining version names that are older than \
--gc-grace (default 1h; a push in flight is younger); a push does not apply the policy by \
itself over S3. With --meta, a PostgreSQL advisory lock fences each batch of deletes from the \
pushes of every server sharing it: what a push names without having just written it \
(through its cache, or already in the bucket) is checked under that lock, and the sweep \
reads the versions made since it marked before each batch. Without --meta (or for pushes \
by the embedded client, --server s3://…) the grace alone protects a push: keep it above \
your longest push. Not with an S3 store yet (refused, saying so): --drill-every, push --merge, \
stored-bytes figures (shown as -); pages travel uncompressed.\n  \
AWS_ACCESS_KEY_ID=… AWS_SECRET_ACCESS_KEY=… sqlferry serve --data /srv/sqlferry --store s3://backups/sqlferry\n  \
sqlferry serve --data /srv/sqlferry --store s3://backups/sqlferry --s3-endpoint http://127.0.0.1:9000\n\n\
More examples:\n  \
sqlferry serve --data /var/lib/sqlferry --drill-every 24h --metrics-listen 127.0.0.1:9878")]
pub struct ServeArgs {
    /// Where replicas and keys are kept [default: $XDG_DATA_HOME/sqlferry].
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Address and port to listen on (port 0 picks a free one).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7878")]
    pub listen: String,
    /// Serve TLS with this certificate chain (PEM, the server's certificate first).
    #[arg(long, value_name = "CERT.pem", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, RSA or EC).
    #[arg(long, value_name = "KEY.pem", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Push and pull sessions that run at once; more wait up to --session-wait, then are
    /// told the server is busy (exit 10, retried by subscribers).
    #[arg(long, value_name = "N", default_value_t = crate::server::DEFAULT_MAX_SESSIONS,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_sessions: usize,
    /// How long a push or pull waits for a free session before it is told the server
    /// is busy.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub session_wait: std::time::Duration,
    /// Read each replica's latest version back from the store and check it (digest and
    /// integrity) this often [default: never].
    #[arg(long, value_name = "DURATION", value_parser = parse_period)]
    pub drill_every: Option<std::time::Duration>,
    /// Serve GET /metrics (Prometheus text format) on the main port, to the admin key.
    #[arg(long)]
    pub metrics: bool,
    /// Serve GET /metrics without a key on a second listener at this address (a
    /// loopback address such as 127.0.0.1:9878: anyone who reaches it reads the metrics).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// The default retention policy, for replicas without one of their own (set with
    /// `sqlferry retention REMOTE`): keep-last=N, keep-daily=D, keep-weekly=W,
    /// keep-within=SPAN, comma-separated, or `all` [default: the data directory's
    /// retention.json, else keep everything].
    #[arg(long, value_name = "RULES", value_parser = parse_retention)]
    pub retention: Option<crate::store::RetentionPolicy>,
    /// Keep keys and replica ids in this PostgreSQL database instead of DATA/server.db,
    /// so that several servers can share one --data: postgres://USER[:PASSWORD]@HOST[:PORT]/DB.
    #[arg(long, value_name = "URL", env = "SQLFERRY_META", hide_env_values = true,
          value_parser = parse_meta)]
    pub meta: Option<crate::meta::MetaUrl>,
    /// Where replicas' pages and versions live: s3://BUCKET/PREFIX (an S3-compatible
    /// object storage; credentials and region from AWS_*), or file://DIR (the directory
    /// store in --data, the default) [default: the directory store in --data].
    #[arg(long, value_name = "URL", value_parser = parse_store)]
    pub store: Option<StoreUrl>,
    /// The endpoint of an S3-compatible server (MinIO, SeaweedFS, Ceph, R2…) for
    /// --store s3://…: http://HOST:PORT or https://HOST [default: AWS_ENDPOINT_URL, else
    /// AWS S3].
    #[arg(long, value_name = "URL", requires = "store")]
    pub s3_endpoint: Option<String>,
    /// With --store s3://…: how old an object no version names must be before `prune`
    /// deletes it (1h, 30m, 0s), and how long a push may run before it checks that the
    /// objects it names still exist. Keep it above your longest push; 0s deletes at once
    /// what a push in flight has just written (for tests) [default: 1h].
    #[arg(long, value_name = "SPAN", value_parser = parse_grace, requires = "store")]
    pub gc_grace: Option<std::time::Duration>,
}

/// A grace period (`--gc-grace`): any span, 0s included.
fn parse_grace(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e}: use a span such as 1h, 30m or 0s"))
}

/// Where `serve --store` keeps replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `file://DIR`: the directory store.
    Dir(PathBuf),
    /// `s3://BUCKET/PREFIX`.
    S3(crate::store::object::S3Location),
}

fn parse_store(s: &str) -> Result<StoreUrl, String> {
    if let Some(dir) = s.strip_prefix("file://") {
        if dir.is_empty() {
            return Err("file:// needs a directory: file:///var/lib/sqlferry".into());
        }
        return Ok(StoreUrl::Dir(PathBuf::from(dir)));
    }
    if s.starts_with("s3://") {
        return crate::store::object::S3Location::parse(s)
            .map(StoreUrl::S3)
            .map_err(|e| e.to_string());
    }
    Err(format!(
        "{s:?} is no store: write s3://BUCKET/PREFIX (object storage) or file://DIR (a directory)"
    ))
}

fn parse_meta(s: &str) -> Result<crate::meta::MetaUrl, String> {
    crate::meta::MetaUrl::parse(s).map_err(|e| e.to_string())
}

/// A period of at least one second (`--drill-every`).
fn parse_period(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < std::time::Duration::from_secs(1) {
        return Err("at least 1s".into());
    }
    Ok(d)
}

fn parse_retention(s: &str) -> Result<crate::store::RetentionPolicy, String> {
    crate::store::parse_policy(s).map_err(|e| e.to_string())
}

impl ServeArgs {
    /// Runs the command until `shutdown` stops the server (see [`crate::server::serve`]).
    pub async fn run(self, _global: &Global, shutdown: &Shutdown) -> anyhow::Result<ExitCode> {
        // `file://DIR` is the directory store, which lives in the data directory: it
        // names --data (or must be the same directory).
        let data = match (&self.store, self.data.clone()) {
            (Some(StoreUrl::Dir(dir)), None) => Some(dir.clone()),
            (Some(StoreUrl::Dir(dir)), Some(data)) if *dir != data => {
                return Err(crate::Error::Usage(format!(
                    "--store file://{} names another directory than --data {}: the directory store lives in the data directory; give one of them",
                    dir.display(),
                    data.display()
                ))
                .into());
            }
            (_, data) => data,
        };
        let s3 = match &self.store {
            Some(StoreUrl::S3(location)) => Some(location.clone()),
            _ if self.s3_endpoint.is_some() => {
                return Err(crate::Error::Usage(
                    "--s3-endpoint is for --store s3://BUCKET/PREFIX".into(),
                )
                .into());
            }
            _ if self.gc_grace.is_some() => {
                return Err(crate::Error::Usage(
                    "--gc-grace is for --store s3://BUCKET/PREFIX (the directory store frees pages under its own lock, with no grace)".into(),
                )
                .into());
            }
            _ => None,
        };
        if s3.is_some() {
            // Refused before anything is made, naming the feature (docs/scale-out.md).
            if self.drill_every.is_some() {
                return Err(crate::store::not_with_s3("restore drills (--drill-every)").into());
            }
        }
        let data = match data {
            Some(d) => d,
            None => crate::config::data_dir().ok_or_else(|| {
                crate::Error::Usage(
                    "no data directory: pass --data DIR (or set HOME or XDG_DATA_HOME)".into(),
                )
            })?,
        };
        let addrs = listen_addrs(&self.listen)?;
        let metrics_addrs = match &self.metrics_listen {
            Some(m) => Some(listen_addrs(m).map_err(|e| {
                anyhow::Error::new(crate::Error::Usage(e.to_string().replacen(
                    "--listen",
                    "--metrics-listen",
                    1,
                )))
            })?),
            None => None,
        };
        // TLS first: a bad certificate or key stops the server before the data directory
        // or an admin key is created. Reading files: off the async threads.
        let (cert, key) = (self.tls_cert.clone(), self.tls_key.clone());
        let tls = blocking(move || match (cert, key) {
            (Some(cert), Some(key)) => Tls::from_pem_files(&cert, &key)
                .map(Some)
                .context("cannot set up TLS"),
            _ => Ok(None),
        })
        .await?;
        let dir = data.clone();
        let pg_url = match &self.meta {
            Some(crate::meta::MetaUrl::Postgres(url)) => Some(url.clone()),
            Some(crate::meta::MetaUrl::Sqlite) | None => None,
        };
        let shared = pg_url.is_some();
        // Held until the server stops: a second server on this directory refuses,
        // unless both share PostgreSQL (then the lock is shared).
        let _lock = blocking(move || {
            make_data_dir(&dir)?;
            // Checked outright, not left to the first file that fails to grow: whether
            // opening server.db needs new room depends on what its WAL held at the last
            // stop (a stop on a full disk cannot checkpoint), and a start must not
            // depend on that.
            if disk_full(&dir) {
                let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
                return Err(startup(crate::Error::io(&dir, full), &dir));
            }
            // A server killed while merging left its scratch files; only a server
            // alone on the directory removes them (another one's merge may use them).
            let clean = || {
                if crate::merge::remove_scratch(&dir) {
                    tracing::info!(data = %dir.display(), "removed the scratch files of interrupted merges");
                }
            };
            let lock = if shared {
                DataLock::acquire_shared(&dir, clean)
            } else {
                DataLock::acquire(&dir).inspect(|_| clean())
            };
            lock.map_err(|e| startup(e, &dir))
        })
        .await?;
        let listener = tokio::net::TcpListener::bind(&addrs[..])
            .await
            .map_err(|e| {
                let hint = match e.kind() {
                    std::io::ErrorKind::AddrInUse => " (another process is using this port)",
                    _ => "",
                };
                anyhow::Error::new(crate::Error::io(std::path::Path::new(&self.listen), e))
                    .context(format!("cannot listen{hint}"))
            })?;
        let metrics_listener =
            match &metrics_addrs {
                Some(addrs) => Some(tokio::net::TcpListener::bind(&addrs[..]).await.map_err(
                    |e| {
                        let listen = self.metrics_listen.as_deref().unwrap_or_default();
                        anyhow::Error::new(crate::Error::io(std::path::Path::new(listen), e))
                            .context("cannot listen for metrics (--metrics-listen)")
                    },
                )?),
                None => None,
            };
        let (dir, max_sessions, session_wait) =
            (data.clone(), self.max_sessions, self.session_wait);
        let (drill_every, metrics_on_main) = (self.drill_every, self.metrics);
        let retention = self.retention.clone();
        // Connected (and migrated) before anything else is opened: a PostgreSQL that
        // cannot be reached stops the start here, with exit 10.
        let pg = match &pg_url {
            Some(url) => Some(
                crate::meta::postgres::PgMeta::connect(url)
                    .await
                    .context("cannot start: the metadata store (--meta) is not usable")?,
            ),
            None => None,
        };
        // The bucket is checked before server.db and the admin key: a start refused
        // here leaves no admin key that was never shown.
        let store = match s3 {
            Some(location) => {
                let index = pg.clone();
                let hint = crate::store::object::S3Options::from_env(self.s3_endpoint.as_deref())
                    .credentials_hint();
                let (runtime, data) = (tokio::runtime::Handle::current(), data.clone());
                let (gc_grace, endpoint) = (self.gc_grace, self.s3_endpoint.clone());
                let shown = location.to_string();
                Some(
                    blocking(move || {
                        let mut store = crate::store::s3::S3Store::connect(
                            location,
                            endpoint.as_deref(),
                            &data.join(S3_CACHE_DIR),
                            runtime,
                        )?;
                        if let Some(grace) = gc_grace {
                            store = store.with_grace(grace);
                        }
                        // Servers sharing PostgreSQL index the store's versions there.
                        if let Some(pg) = index {
                            store = store.with_index(std::sync::Arc::new(pg));
                        }
                        store.check()?;
                        Ok(crate::store::AnyStore::S3 { store, data })
                    })
                    .await
                    .with_context(|| {
                        format!("cannot start: the store {shown} is not usable{hint}")
                    })?,
                )
            }
            None => None,
        };
        let (state, admin_key) = blocking(move || {
            let opened = match pg {
                Some(pg) => State::open_with(&dir, crate::meta::Meta::postgres(pg.clone()), Some(pg))
                    .context("cannot start: the metadata store (--meta) is not usable"),
                None => State::open(&dir).map_err(|e| startup(e, &dir)),
            };
            let mut state = opened?.with_max_sessions(max_sessions, session_wait);
            if let Some(store) = store {
                state = state.with_store(store);
            }
            if let Some(every) = drill_every {
                state = state.with_drills(every);
            }
            if metrics_on_main {
                state = state.with_metrics();
            }
            if let Some(policy) = retention {
                state.store = match state.store {
                    crate::store::AnyStore::Dir(dir) => {
                        crate::store::AnyStore::Dir(dir.with_default_retention(policy))
                    }
                    crate::store::AnyStore::S3 { store, data } => crate::store::AnyStore::S3 {
                        store: store.with_default_retention(policy),
                        data,
                    },
                };
            }
            let key = state.auth.ensure_admin().map_err(|e| startup(e, &dir))?;
            if shared {
                tracing::info!(meta = %state.auth.describe(), "keys and replica ids in PostgreSQL; sharing the data directory with the servers that use it too");
            }
            Ok((state, key))
        })
        .await?;
        if let Some(key) = admin_key {
            super::out(format_args!(
                "admin key (shown only this once; keep it secret): {key}"
            ))?;
        }
        let addr = listener.local_addr()?;
        // Before the "listening on" line, which says the server is ready.
        if let Some(m) = &metrics_listener {
            super::out(format_args!(
                "metrics on http://{}/metrics (no key)",
                m.local_addr()?
            ))?;
        }
        // Where the pages go, when not in the data directory.
        let pages = match &self.store {
            Some(StoreUrl::S3(location)) => format!("; pages and versions in {location}"),
            _ => String::new(),
        };
        if tls.is_some() {
            super::out(format_args!(
                "listening on wss://{addr} and https://{addr} (TLS; data in {}{pages})",
                data.display()
            ))?;
        } else {
            super::out(format_args!(
                "listening on ws://{addr} (data in {}{pages})",
                data.display()
            ))?;
        }
        match metrics_listener {
            Some(m) => {
                let metrics = serve_metrics(m, state.clone(), shutdown.clone());
                let (served, metrics) =
                    tokio::join!(serve(listener, state, tls, shutdown.clone()), metrics);
                served?;
                metrics?;
            }
            None => serve(listener, state, tls, shutdown.clone()).await?,
        }
        Ok(ExitCode::from(exit::OK))
    }
}

/// The directory under `--data` that holds an S3 store's cache of pack indexes.
const S3_CACHE_DIR: &str = "s3-cache";

/// Runs start-up file and SQLite work on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("a start-up task failed")?
}

/// The addresses `--listen` names; a usage error (exit 2) when it names none.
fn listen_addrs(listen: &str) -> anyhow::Result<Vec<std::net::SocketAddr>> {
    use std::net::ToSocketAddrs as _;
    let usage = |why: String| {
        crate::Error::Usage(format!(
            "--listen {listen}: {why}; expected ADDRESS:PORT, like 127.0.0.1:7878 or [::]:7878"
        ))
    };
    let addrs: Vec<_> = listen
        .to_socket_addrs()
        .map_err(|e| usage(e.to_string()))?
        .collect();
    if addrs.is_empty() {
        return Err(usage("it names no address".into()).into());
    }
    Ok(addrs)
}

/// Creates the data directory if needed; a path that is a file, or one that cannot be
/// made, is a local error (exit 3) naming it.
fn make_data_dir(data: &std::path::Path) -> anyhow::Result<()> {
    if data.exists() && !data.is_dir() {
        return Err(anyhow::Error::new(crate::Error::io(
            data,
            std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                "it is a file, not a directory",
            ),
        ))
        .context("--data must be a directory"));
    }
    std::fs::create_dir_all(data)
        .map_err(|e| crate::Error::io(data, e))
        .context("cannot create the data directory")
}

/// A start-up failure in the data directory, saying so when its disk is full (SQLite
/// often says only "disk I/O error").
fn startup(e: crate::Error, data: &std::path::Path) -> anyhow::Error {
    let full = matches!(
        e.kind(),
        crate::ErrorKind::LocalIo | crate::ErrorKind::NotADatabase
    ) && disk_full(data);
    let context = if full {
        format!(
            "cannot start: the disk holding {} is full; free some space and start again",
            data.display()
        )
    } else {
        "cannot open the data directory".to_owned()
    };
    anyhow::Error::new(e).context(context)
}
