//! The metadata in PostgreSQL (`serve --meta postgres://…`), and the notifications
//! servers sharing it send each other.
//!
//! - Client: `tokio-postgres` (pure Rust: no libpq to install) through a small
//!   `deadpool-postgres` pool ([`POOL_SIZE`] connections per server), plain TCP (or a
//!   Unix socket); TLS to PostgreSQL is not done yet.
//! - Migrations: numbered SQL files in `src/meta/migrations/`, compiled in, run at
//!   start in one transaction under a transaction-scoped advisory lock
//!   ([`MIGRATION_LOCK`]), each recorded in `sqlferry_migrations(version, name,
//!   applied_at)`. Two servers starting at once: one migrates, the other waits for the
//!   lock and finds nothing left to do. A database migrated by a newer sqlferry (a
//!   version this build does not know) is refused at start.
//! - Notifications ([`Notice`]) travel as JSON on the channel [`CHANNEL`]: a new
//!   version (also written to `sqlferry_events` in the same transaction, so a server
//!   whose listening connection was down can read what it missed), a sync-now and the
//!   number of subscribers each server reached.
//! - [`PgMeta::listen`] holds one dedicated connection (`application_name` =
//!   [`LISTEN_APP`], so servers can count each other) that `LISTEN`s, reconnects with
//!   the subscribers' backoff when lost, and catches up from `sqlferry_events` after
//!   each reconnect.
//!
//! Invariants:
//! - The blocking [`MetaStore`] methods run their queries as tasks of the runtime the
//!   store was opened on and wait for the answer: they must be called from a blocking
//!   thread, never from an async task. Every wait is bounded: a connection
//!   takes at most [`CONNECT_TIMEOUT`], a free pool slot at most [`POOL_WAIT`].
//! - A failure is [`Error::Server`] naming the database (host, port, name: never a
//!   password) and saying that the server retries; the next call tries again with a
//!   fresh connection.
//! - What a notification carries is bounded: a replica path (at most 255 bytes), a
//!   digest, ids; far below PostgreSQL's 8,000-byte payload limit.

use std::collections::BTreeSet;
use std::str::FromStr as _;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Config, NoTls};
use tokio_util::sync::CancellationToken;

use super::{MetaStore, NewKey, StoredKey};
use crate::protocol::control::KeyInfo;
use crate::store::s3::{IndexRow, PushFence, Pushing, Since, SweepFence, VersionIndex};
use crate::{Error, Result};

/// The channel every server listens on.
pub const CHANNEL: &str = "sqlferry_events";

/// The `application_name` of a server's listening connection: counting these
/// connections in `pg_stat_activity` counts the servers that can hear a sync-now.
pub const LISTEN_APP: &str = "sqlferry-listen";

/// The `application_name` of the pool's connections.
const POOL_APP: &str = "sqlferry";

/// Connections in a server's pool (the listening connection is one more).
pub const POOL_SIZE: usize = 8;

/// How long opening one connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a query waits for a free connection of the pool.
pub const POOL_WAIT: Duration = Duration::from_secs(10);

/// The advisory lock migrations run under ("sqlferry" in ASCII).
pub const MIGRATION_LOCK: i64 = 0x7371_6c66_6572_7279;

/// The advisory lock an S3 store's sweep runs under, so that one server sharing the
/// database sweeps at a time ("sqlferrz": the migrations' lock plus one).
pub const SWEEP_LOCK: i64 = MIGRATION_LOCK + 1;

/// The advisory lock of the fence between the sweep of an S3 store and the pushes of
/// every server sharing the database (`store/s3/gc.rs`, "The fence"): a push holds it
/// shared from before it checks what its version names until its version object exists
/// and its row is in; a sweep holds it exclusive while it deletes one batch.
pub const FENCE_LOCK: i64 = MIGRATION_LOCK + 2;

/// How long a push waits for the fence: a sweep holds it for one batch of deletes
/// (and waits at most [`SWEEP_FENCE_WAIT`] for it first), so this is ample; past it
/// the push fails, asking to push again.
pub const PUSH_FENCE_WAIT: Duration = Duration::from_secs(60);

/// How long a sweep waits for the fence before each batch: a push holds it for a few
/// requests, so one holding it longer is stuck; the sweep stops rather than wait on.
pub const SWEEP_FENCE_WAIT: Duration = Duration::from_secs(30);

/// [`SWEEP_LOCK`], held by one pooled connection taken out of the pool: dropping it
/// closes that connection, which releases the lock (also when the task holding it
/// fails or is cancelled), and never returns a connection still holding it to the
/// pool.
pub struct SweepLock {
    client: Option<deadpool_postgres::Object>,
}

impl std::fmt::Debug for SweepLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SweepLock")
    }
}

impl Drop for SweepLock {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// How long announced versions are kept in `sqlferry_events` for catch-ups.
const EVENTS_KEPT: &str = "1 day";

/// How often a server deletes announced versions older than [`EVENTS_KEPT`].
const EVENTS_CLEANUP_EVERY: Duration = Duration::from_secs(600);

/// How many event ids before the newest one seen a catch-up reads again: ids are
/// taken at insert, so one inserted just before the newest seen may commit just after
/// it; those already seen are skipped.
const CATCH_UP_OVERLAP: i64 = 64;

/// How many event ids a listener remembers having seen (to skip them in a catch-up).
const SEEN_KEPT: usize = 4096;

/// The migrations, in order: number, name, SQL. Append only; never edit one that
/// shipped.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "keys, replicas, server id, announced versions",
        include_str!("migrations/0001_keys_replicas_events.sql"),
    ),
    (
        2,
        "subscriber positions, expected pushes, failure reports",
        include_str!("migrations/0002_subscriber_state.sql"),
    ),
    (
        3,
        "the versions index of an S3 store",
        include_str!("migrations/0003_versions_index.sql"),
    ),
    (
        4,
        "the fence between a sweep and the pushes",
        include_str!("migrations/0004_push_fence.sql"),
    ),
    (
        5,
        "the key id of an encrypted version in the versions index",
        include_str!("migrations/0005_versions_encryption.sql"),
    ),
];

/// How old a server process's heartbeat may be for its subscribers to be shown by the
/// others: a few of its writes (one a second at most, one every few seconds at least)
/// may be late before its rows are taken for a dead server's.
pub const SHARED_FRESH: Duration = Duration::from_secs(15);

/// How old a heartbeat is when its process's rows are deleted, by any server.
const SHARED_KEPT: Duration = Duration::from_secs(60);

/// What one server process shares of its subscribers (migration 2's tables).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SharedRows {
    /// One row per subscriber connected.
    pub positions: Vec<PositionRow>,
    /// Expected pushes: replica, Unix seconds.
    pub expected: Vec<(String, i64)>,
    /// Failure reports.
    pub failures: Vec<FailureRow>,
}

/// A row of `sqlferry_positions`: one subscriber.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PositionRow {
    /// Its membership id on its server.
    pub member: i64,
    /// The replica it subscribes to.
    pub replica: String,
    /// `push` or `pull`.
    pub role: String,
    /// The version its database holds (pull subscribers that reported one).
    pub applied_version: Option<i64>,
    /// When it applied it (Unix seconds).
    pub applied_at: Option<i64>,
    /// When the first version it lacks was created (Unix seconds).
    pub behind_since: Option<i64>,
}

/// A row of `sqlferry_failures`: a push subscriber's latest failure report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureRow {
    /// The replica.
    pub replica: String,
    /// When the failures began (Unix seconds).
    pub failing_since: i64,
    /// Failed attempts so far.
    pub attempts: i64,
    /// The latest attempt's error (already cut to a few KB by the hub).
    pub error: String,
    /// When the report arrived (Unix seconds).
    pub reported_at: i64,
}

/// What servers sharing a metadata database tell each other.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Notice {
    /// A push committed a new version on server `origin`.
    Version {
        /// Its row in `sqlferry_events`.
        id: i64,
        /// The replica's path.
        replica: String,
        /// The new version's number.
        version: u64,
        /// Its digest.
        digest: String,
        /// When it was created (Unix seconds).
        created_at: i64,
        /// The server that announced it ([`Notice`]s a server sent come back to it).
        origin: String,
    },
    /// Someone asked server `origin` to have `replica`'s subscribers sync now.
    Sync {
        /// The replica's path.
        replica: String,
        /// The request's id, which the answers name.
        request: String,
        /// The server that was asked.
        origin: String,
    },
    /// Server `origin` told `reached` subscribers of its own about sync-now `request`.
    Reached {
        /// The sync-now request answered.
        request: String,
        /// How many subscribers it reached.
        reached: u64,
        /// The answering server.
        origin: String,
    },
}

/// What a listening connection hears, for its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// A notification (or a missed version read back in a catch-up).
    Notice(Notice),
    /// The connection is (again) listening.
    Up,
    /// The connection was lost or could not be made; it is being retried.
    Down(String),
}

/// A PostgreSQL metadata database: the pool, the connection settings (for the
/// listening connection) and the runtime the blocking calls run on.
#[derive(Clone)]
pub struct PgMeta {
    pool: Pool,
    config: Config,
    runtime: tokio::runtime::Handle,
    describe: String,
}

impl std::fmt::Debug for PgMeta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgMeta")
            .field("at", &self.describe)
            .finish()
    }
}

/// The connection settings in `url`; a usage error when it does not parse (saying
/// so without repeating the URL, which may hold a password).
pub fn parse_config(url: &str) -> Result<Config> {
    Config::from_str(url).map_err(|e| {
        Error::Usage(format!(
            "--meta: not a PostgreSQL connection URL ({e}); expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
        ))
    })
}

/// `PostgreSQL at HOST:PORT/DATABASE` for `url`: what messages and logs name, never
/// the user's password.
pub fn describe_url(url: &str) -> String {
    match Config::from_str(url) {
        Ok(c) => describe(&c),
        Err(_) => "PostgreSQL (an unreadable URL)".into(),
    }
}

fn describe(c: &Config) -> String {
    let host = match c.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    let db = c.get_dbname().or(c.get_user()).unwrap_or("postgres");
    format!("PostgreSQL at {host}:{port}/{db}")
}

impl PgMeta {
    /// Connects to the database `url` names and migrates it to this build's schema;
    /// a database that cannot be reached is [`Error::Server`].
    pub async fn connect(url: &str) -> Result<PgMeta> {
        let mut config = parse_config(url)?;
        config
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30));
        let describe = describe(&config);
        let mut pooled = config.clone();
        pooled.application_name(POOL_APP);
        let manager = Manager::from_config(
            pooled,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| Error::Bug(format!("building the PostgreSQL pool: {e}")))?;
        let meta = PgMeta {
            pool,
            config,
            runtime: tokio::runtime::Handle::current(),
            describe,
        };
        meta.migrate().await?;
        Ok(meta)
    }

    /// `e`, a failure of this database, as the server's own error.
    fn fail(&self, e: impl std::fmt::Display) -> Error {
        Error::Server(format!(
            "the metadata store ({}) failed: {e}; the server retries with a new connection on the next request",
            self.describe
        ))
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| {
            Error::Server(format!(
                "cannot reach the metadata store ({}): {e}; the server keeps retrying, check that PostgreSQL is up",
                self.describe
            ))
        })
    }

    /// Runs the migrations this database lacks, in one transaction under
    /// [`MIGRATION_LOCK`]; refuses a database a newer sqlferry migrated.
    async fn migrate(&self) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.fail(e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(|e| self.fail(e))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS sqlferry_migrations(
                 version INTEGER PRIMARY KEY,
                 name TEXT NOT NULL,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(|e| self.fail(e))?;
        let applied: BTreeSet<i32> = tx
            .query("SELECT version FROM sqlferry_migrations", &[])
            .await
            .map_err(|e| self.fail(e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let known = MIGRATIONS.last().map_or(0, |m| m.0);
        if let Some(newer) = applied.iter().find(|&&v| v > known) {
            return Err(Error::Server(format!(
                "the metadata store ({}) was migrated by a newer sqlferry (migration {newer}; this one knows up to {known}): upgrade this server",
                self.describe
            )));
        }
        for (version, name, sql) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            tx.batch_execute(sql).await.map_err(|e| self.fail(e))?;
            tx.execute(
                "INSERT INTO sqlferry_migrations(version, name) VALUES ($1, $2)",
                &[version, name],
            )
            .await
            .map_err(|e| self.fail(e))?;
            tracing::info!(version, name, at = %self.describe, "metadata store migrated");
        }
        tx.commit().await.map_err(|e| self.fail(e))
    }

    /// The migrations recorded in the database, oldest first.
    pub async fn migrations(&self) -> Result<Vec<i32>> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT version FROM sqlferry_migrations ORDER BY version",
                &[],
            )
            .await
            .map_err(|e| self.fail(e))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Runs the future `f` makes as a task of the store's runtime and waits for its
    /// result: for the blocking methods, on a blocking thread (this thread only waits;
    /// the runtime's workers run the queries).
    fn block<T, F>(&self, f: impl FnOnce(PgMeta) -> F) -> Result<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = f(self.clone());
        self.runtime.spawn(async move {
            let _ = tx.send(task.await);
        });
        rx.blocking_recv().map_err(|_| {
            Error::Server(format!(
                "the metadata store's query ({}) was dropped: the server is stopping",
                self.describe
            ))
        })?
    }

    /// Announces version `version` of `replica`, created at `created_at`, from server
    /// `origin`: one row in `sqlferry_events` and one notification, in one transaction
    /// (the notification goes out when it commits).
    pub async fn announce_version(
        &self,
        replica: &str,
        version: u64,
        digest: &str,
        created_at: i64,
        origin: &str,
    ) -> Result<()> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.fail(e))?;
        let number = i64::try_from(version).map_err(|e| self.fail(e))?;
        let row = tx
            .query_one(
                "INSERT INTO sqlferry_events(replica, version, digest, created_at, origin)
                 VALUES ($1, $2, $3, $4, $5) RETURNING id",
                &[&replica, &number, &digest, &created_at, &origin],
            )
            .await
            .map_err(|e| self.fail(e))?;
        let notice = Notice::Version {
            id: row.get(0),
            replica: replica.to_owned(),
            version,
            digest: digest.to_owned(),
            created_at,
            origin: origin.to_owned(),
        };
        notify_in(&*tx, &notice).await.map_err(|e| self.fail(e))?;
        tx.commit().await.map_err(|e| self.fail(e))
    }

    /// Sends `notice` to every listening server (this one included).
    pub async fn notify(&self, notice: &Notice) -> Result<()> {
        let client = self.client().await?;
        notify_in(&**client, notice).await.map_err(|e| self.fail(e))
    }

    /// Takes [`SWEEP_LOCK`] if no other server holds it (`pg_try_advisory_lock`, no
    /// wait); `None` while another sweeps.
    pub async fn sweep_lock(&self) -> Result<Option<SweepLock>> {
        let client = self.client().await?;
        let row = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&SWEEP_LOCK])
            .await
            .map_err(|e| self.fail(e))?;
        let got: bool = row.get(0);
        Ok(got.then_some(SweepLock {
            client: Some(client),
        }))
    }

    /// How many servers are listening now (this one included when its listening
    /// connection is up): their connections in `pg_stat_activity`.
    pub async fn listening_servers(&self) -> Result<u64> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = $1",
                &[&LISTEN_APP],
            )
            .await
            .map_err(|e| self.fail(e))?;
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
    }

    /// Shares what server process `instance` knows of its subscribers and reads what
    /// the others share, in one transaction: its heartbeat is renewed; its rows are
    /// replaced by `mine` when `changed` (or when its rows were deleted meanwhile, as a
    /// dead process's after a long outage); the rows of processes silent for a minute
    /// are deleted; the answer is every other process's rows whose heartbeat is at
    /// most [`SHARED_FRESH`] old, in (process, member) order.
    pub async fn share(
        &self,
        instance: &str,
        mine: &SharedRows,
        changed: bool,
    ) -> Result<SharedRows> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.fail(e))?;
        let fail = |e| self.fail(e);
        let new = tx
            .query_one(
                "INSERT INTO sqlferry_instances(instance) VALUES ($1)
                 ON CONFLICT (instance) DO UPDATE SET seen_at = now()
                 RETURNING (xmax = 0)",
                &[&instance],
            )
            .await
            .map_err(fail)?
            .get::<_, bool>(0);
        if changed || new {
            for table in [
                "sqlferry_positions",
                "sqlferry_expected",
                "sqlferry_failures",
            ] {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE instance = $1"),
                    &[&instance],
                )
                .await
                .map_err(fail)?;
            }
            let p = &mine.positions;
            let members: Vec<i64> = p.iter().map(|r| r.member).collect();
            let replicas: Vec<&str> = p.iter().map(|r| r.replica.as_str()).collect();
            let roles: Vec<&str> = p.iter().map(|r| r.role.as_str()).collect();
            let applied: Vec<Option<i64>> = p.iter().map(|r| r.applied_version).collect();
            let applied_at: Vec<Option<i64>> = p.iter().map(|r| r.applied_at).collect();
            let behind: Vec<Option<i64>> = p.iter().map(|r| r.behind_since).collect();
            tx.execute(
                "INSERT INTO sqlferry_positions(instance, member, replica, role,
                     applied_version, applied_at, behind_since)
                 SELECT $1::text, * FROM unnest($2::bigint[], $3::text[], $4::text[],
                     $5::bigint[], $6::bigint[], $7::bigint[])",
                &[
                    &instance,
                    &members,
                    &replicas,
                    &roles,
                    &applied,
                    &applied_at,
                    &behind,
                ],
            )
            .await
            .map_err(fail)?;
            let replicas: Vec<&str> = mine.expected.iter().map(|(r, _)| r.as_str()).collect();
            let at: Vec<i64> = mine.expected.iter().map(|(_, at)| *at).collect();
            tx.execute(
                "INSERT INTO sqlferry_expected(instance, replica, expected_push_at)
                 SELECT $1::text, * FROM unnest($2::text[], $3::bigint[])",
                &[&instance, &replicas, &at],
            )
            .await
            .map_err(fail)?;
            let f = &mine.failures;
            let replicas: Vec<&str> = f.iter().map(|r| r.replica.as_str()).collect();
            let since: Vec<i64> = f.iter().map(|r| r.failing_since).collect();
            let attempts: Vec<i64> = f.iter().map(|r| r.attempts).collect();
            let errors: Vec<&str> = f.iter().map(|r| r.error.as_str()).collect();
            let reported: Vec<i64> = f.iter().map(|r| r.reported_at).collect();
            tx.execute(
                "INSERT INTO sqlferry_failures(instance, replica, failing_since, attempts,
                     error, reported_at)
                 SELECT $1::text, * FROM unnest($2::text[], $3::bigint[], $4::bigint[],
                     $5::text[], $6::bigint[])",
                &[&instance, &replicas, &since, &attempts, &errors, &reported],
            )
            .await
            .map_err(fail)?;
        }
        let kept = SHARED_KEPT.as_secs_f64();
        tx.execute(
            "DELETE FROM sqlferry_instances WHERE seen_at < now() - make_interval(secs => $1)",
            &[&kept],
        )
        .await
        .map_err(fail)?;
        let fresh = SHARED_FRESH.as_secs_f64();
        let live = "SELECT instance FROM sqlferry_instances
                    WHERE instance <> $1 AND seen_at > now() - make_interval(secs => $2)";
        let positions = tx
            .query(
                &format!(
                    "SELECT member, replica, role, applied_version, applied_at, behind_since
                     FROM sqlferry_positions WHERE instance IN ({live})
                     ORDER BY instance, member"
                ),
                &[&instance, &fresh],
            )
            .await
            .map_err(fail)?
            .iter()
            .map(|r| PositionRow {
                member: r.get(0),
                replica: r.get(1),
                role: r.get(2),
                applied_version: r.get(3),
                applied_at: r.get(4),
                behind_since: r.get(5),
            })
            .collect();
        let expected = tx
            .query(
                &format!(
                    "SELECT replica, expected_push_at FROM sqlferry_expected
                     WHERE instance IN ({live}) ORDER BY instance, replica"
                ),
                &[&instance, &fresh],
            )
            .await
            .map_err(fail)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let failures = tx
            .query(
                &format!(
                    "SELECT replica, failing_since, attempts, error, reported_at
                     FROM sqlferry_failures WHERE instance IN ({live})
                     ORDER BY instance, replica"
                ),
                &[&instance, &fresh],
            )
            .await
            .map_err(fail)?
            .iter()
            .map(|r| FailureRow {
                replica: r.get(0),
                failing_since: r.get(1),
                attempts: r.get(2),
                error: r.get(3),
                reported_at: r.get(4),
            })
            .collect();
        tx.commit().await.map_err(fail)?;
        Ok(SharedRows {
            positions,
            expected,
            failures,
        })
    }

    /// Deletes what server process `instance` shared (it is stopping): the other
    /// servers stop showing its subscribers at once.
    pub async fn unshare(&self, instance: &str) -> Result<()> {
        let client = self.client().await?;
        client
            .execute(
                "DELETE FROM sqlferry_instances WHERE instance = $1",
                &[&instance],
            )
            .await
            .map_err(|e| self.fail(e))?;
        Ok(())
    }

    /// Listens on [`CHANNEL`] until `stop` is cancelled, telling `heard` what it hears
    /// ([`Heard`]). A lost connection is reported ([`Heard::Down`]) and made again
    /// with the subscribers' backoff ([`crate::backoff::Reconnect`]); once it listens
    /// again, the versions announced meanwhile are read back from `sqlferry_events`
    /// and told as notices before any new one. Also deletes announced versions older
    /// than a day, every ten minutes.
    pub async fn listen(self, heard: mpsc::Sender<Heard>, stop: CancellationToken) {
        let mut backoff = crate::backoff::Reconnect::new();
        let mut cursor = Cursor::default();
        loop {
            let failure = tokio::select! {
                () = stop.cancelled() => return,
                ended = self.listen_once(&heard, &mut backoff, &mut cursor, &stop) => ended,
            };
            let Err(e) = failure else { return };
            if heard.send(Heard::Down(e.to_string())).await.is_err() {
                return;
            }
            let delay = backoff.next_delay(crate::backoff::jitter());
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One listening connection, until it is lost (an error) or `stop` (`Ok`).
    async fn listen_once(
        &self,
        heard: &mpsc::Sender<Heard>,
        backoff: &mut crate::backoff::Reconnect,
        cursor: &mut Cursor,
        stop: &CancellationToken,
    ) -> Result<()> {
        let mut config = self.config.clone();
        config.application_name(LISTEN_APP);
        let (client, mut connection) = config.connect(NoTls).await.map_err(|e| {
            Error::Server(format!(
                "cannot reach the metadata store ({}) to listen: {e}",
                self.describe
            ))
        })?;
        // The connection's messages (notifications among them) are read by a task of
        // this call's own, ended and awaited below whatever happens.
        let (tx, mut payloads) = mpsc::channel::<std::result::Result<String, String>>(1024);
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                let forwarded = match message {
                    Ok(AsyncMessage::Notification(n)) => tx.send(Ok(n.payload().to_owned())).await,
                    Ok(_) => Ok(()),
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string())).await;
                        return;
                    }
                };
                if forwarded.is_err() {
                    return;
                }
            }
            let _ = tx.send(Err("the connection was closed".into())).await;
        });
        let result = self
            .listening(&client, heard, backoff, cursor, stop, &mut payloads)
            .await;
        drop(client);
        driver.abort();
        let _ = driver.await;
        result
    }

    /// Listens on an open connection: LISTEN, the catch-up, then notifications.
    async fn listening(
        &self,
        client: &tokio_postgres::Client,
        heard: &mpsc::Sender<Heard>,
        backoff: &mut crate::backoff::Reconnect,
        cursor: &mut Cursor,
        stop: &CancellationToken,
        payloads: &mut mpsc::Receiver<std::result::Result<String, String>>,
    ) -> Result<()> {
        let fail = |e: tokio_postgres::Error| {
            Error::Server(format!(
                "the metadata store's listening connection ({}) failed: {e}",
                self.describe
            ))
        };
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
            .map_err(fail)?;
        // Listening from here on: what was announced before is read now, what comes
        // after arrives as notifications (both may hold one event: `seen` skips it).
        let caught_up = match cursor.newest {
            None => {
                let row = client
                    .query_one("SELECT coalesce(max(id), 0) FROM sqlferry_events", &[])
                    .await
                    .map_err(fail)?;
                cursor.newest = Some(row.get(0));
                Vec::new()
            }
            Some(from) => client
                .query(
                    "SELECT id, replica, version, digest, created_at, origin FROM sqlferry_events
                     WHERE id > $1 ORDER BY id",
                    &[&(from - CATCH_UP_OVERLAP)],
                )
                .await
                .map_err(fail)?
                .iter()
                .map(|r| Notice::Version {
                    id: r.get(0),
                    replica: r.get(1),
                    version: u64::try_from(r.get::<_, i64>(2)).unwrap_or(0),
                    digest: r.get(3),
                    created_at: r.get(4),
                    origin: r.get(5),
                })
                .collect(),
        };
        backoff.reset();
        if heard.send(Heard::Up).await.is_err() {
            return Ok(());
        }
        let caught = caught_up.len();
        for notice in caught_up {
            if !cursor.hear(notice, heard).await {
                return Ok(());
            }
        }
        if caught > 0 {
            tracing::info!(
                versions = caught,
                "caught up on versions announced while not listening"
            );
        }
        let mut cleanup = tokio::time::interval(EVENTS_CLEANUP_EVERY);
        // A cleanup missed while busy is not made up for: one is enough.
        cleanup.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                payload = payloads.recv() => match payload {
                    Some(Ok(text)) => match serde_json::from_str::<Notice>(&text) {
                        Ok(notice) => {
                            if !cursor.hear(notice, heard).await {
                                return Ok(());
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "an unreadable notification on {CHANNEL}; ignored"),
                    },
                    Some(Err(e)) => {
                        return Err(Error::Server(format!(
                            "lost the metadata store's listening connection ({}): {e}",
                            self.describe
                        )))
                    }
                    None => return Err(Error::Server("the listening connection ended".into())),
                },
                _ = cleanup.tick() => {
                    let deleted = client
                        .execute(
                            &format!("DELETE FROM sqlferry_events WHERE at < now() - interval '{EVENTS_KEPT}'"),
                            &[],
                        )
                        .await
                        .map_err(fail)?;
                    if deleted > 0 {
                        tracing::debug!(deleted, "deleted old announced versions");
                    }
                }
            }
        }
    }
}

/// Where a listener is in `sqlferry_events`, across its reconnections.
#[derive(Debug, Default)]
struct Cursor {
    /// The newest event id seen; `None` until the first connection (nothing before it
    /// is caught up).
    newest: Option<i64>,
    /// The ids seen lately, at most [`SEEN_KEPT`].
    seen: BTreeSet<i64>,
}

impl Cursor {
    /// Passes `notice` on unless it is a version already seen; `false` once nobody
    /// listens to `heard` any more.
    async fn hear(&mut self, notice: Notice, heard: &mpsc::Sender<Heard>) -> bool {
        if let Notice::Version { id, .. } = notice {
            if !self.seen.insert(id) {
                return true;
            }
            if self.seen.len() > SEEN_KEPT {
                self.seen.pop_first();
            }
            self.newest = Some(self.newest.map_or(id, |n| n.max(id)));
        }
        heard.send(Heard::Notice(notice)).await.is_ok()
    }
}

/// `SELECT pg_notify(CHANNEL, notice)` on `client` (a transaction's: sent at commit).
async fn notify_in(
    client: &impl tokio_postgres::GenericClient,
    notice: &Notice,
) -> std::result::Result<(), String> {
    let payload = serde_json::to_string(notice).map_err(|e| e.to_string())?;
    client
        .execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The columns of a `sqlferry_versions` row, in [`index_row`]'s order.
const VERSION_COLUMNS: &str = "number, page_size, page_count, digest, digest2, message, created_at, client_id, key_id, base, removed_at, encryption_key_id";

fn index_row(r: &tokio_postgres::Row) -> IndexRow {
    let u = |i: usize| u64::try_from(r.get::<_, i64>(i)).unwrap_or(0);
    IndexRow {
        number: u(0),
        page_size: u32::try_from(r.get::<_, i32>(1)).unwrap_or(0),
        page_count: u32::try_from(r.get::<_, i64>(2)).unwrap_or(0),
        digest: r.get(3),
        digest2: r.get(4),
        message: r.get(5),
        created_at: r.get(6),
        client_id: r.get(7),
        key_id: r.get(8),
        base: u(9),
        removed_at: r.get(10),
        encryption_key_id: r.get(11),
    }
}

/// `n` as PostgreSQL's BIGINT (a version number or count never comes near its limit).
fn big(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `text` as an SQL literal for a simple query (dollar-quoted: nothing in it is
/// special); text holding the quote's tag or a NUL is refused (no replica path or store
/// location does).
fn literal(text: &str) -> Result<String> {
    const TAG: &str = "$sqlferry$";
    if text.contains(TAG) || text.contains('\0') {
        return Err(Error::Usage(format!(
            "{text:?} cannot be written to the metadata store"
        )));
    }
    Ok(format!("{TAG}{text}{TAG}"))
}

/// Whether `e` is PostgreSQL's `lock_timeout` running out.
fn lock_timed_out(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
}

/// The statement that lands a push: its version's row in, its record out, at once.
const LAND: &str = "WITH gone AS (DELETE FROM sqlferry_pushing WHERE id = $14)
     INSERT INTO sqlferry_versions(store, replica, number, page_size, page_count, digest, digest2, message, created_at, client_id, key_id, base, removed_at, encryption_key_id)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $15)
     ON CONFLICT (store, replica, number) DO NOTHING";

/// A push's hold on [`FENCE_LOCK`] (shared), on a pooled connection it keeps until it
/// lands or is dropped; a connection that failed is closed, never returned to the pool
/// holding the lock.
struct PgPushFence {
    pg: PgMeta,
    client: Option<deadpool_postgres::Object>,
    id: i64,
    store: String,
    replica: String,
}

impl PushFence for PgPushFence {
    fn land(mut self: Box<Self>, row: &IndexRow) -> Result<()> {
        let client = self
            .client
            .take()
            .expect("a push fence holds its connection until it lands or is dropped");
        let (store, replica, id, r) = (
            self.store.clone(),
            self.replica.clone(),
            self.id,
            row.clone(),
        );
        self.pg.block(move |pg| async move {
            let landed = async {
                let stmt = client.prepare_cached(LAND).await?;
                let page_size = i32::try_from(r.page_size).unwrap_or(i32::MAX);
                client
                    .execute(
                        &stmt,
                        &[
                            &store,
                            &replica,
                            &big(r.number),
                            &page_size,
                            &i64::from(r.page_count),
                            &r.digest,
                            &r.digest2,
                            &r.message,
                            &r.created_at,
                            &r.client_id,
                            &r.key_id,
                            &big(r.base),
                            &r.removed_at,
                            &id,
                            &r.encryption_key_id,
                        ],
                    )
                    .await?;
                // Only once the row is committed (the statement above, on its own):
                // a sweep holding the lock next must find it.
                client
                    .simple_query(&format!("SELECT pg_advisory_unlock_shared({FENCE_LOCK})"))
                    .await
                    .map(drop)
            }
            .await;
            landed.map_err(|e| {
                // Closed, not pooled: the lock goes with it.
                drop(deadpool_postgres::Object::take(client));
                pg.fail(e)
            })
        })
    }
}

impl Drop for PgPushFence {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        // The record out (committed) before the lock goes: a sweep never finds the
        // record of a push that gave up. Not waited for: this may run anywhere.
        let sql = format!(
            "BEGIN; DELETE FROM sqlferry_pushing WHERE id = {}; COMMIT; SELECT pg_advisory_unlock_shared({FENCE_LOCK})",
            self.id
        );
        let at = self.pg.describe.clone();
        self.pg.runtime.spawn(async move {
            match tokio::time::timeout(CONNECT_TIMEOUT, client.simple_query(&sql)).await {
                Ok(Ok(_)) => {}
                outcome => {
                    let error = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => "no answer".into(),
                    };
                    tracing::warn!(%at, %error, "a failed push's record in the fence was not deleted; the next sweep deletes it once its version is known never to come");
                    drop(deadpool_postgres::Object::take(client));
                }
            }
        });
    }
}

/// A sweep's own connection to the fence, out of the pool (closed when dropped, which
/// lets the lock go whatever happened).
struct PgSweepFence {
    pg: PgMeta,
    client: std::sync::Arc<deadpool_postgres::ClientWrapper>,
    store: String,
}

impl PgSweepFence {
    /// Runs `sql` (no parameters) on the sweep's connection.
    fn simple(&self, sql: String) -> Result<()> {
        let client = self.client.clone();
        self.pg.block(move |pg| async move {
            client.simple_query(&sql).await.map(drop).map_err(|e| {
                if lock_timed_out(&e) {
                    Error::InUse(format!(
                        "a push through a server sharing the metadata store ({}) has held the sweep's fence for more than {} s (a stuck push); the sweep stopped, deleting nothing more: run prune again",
                        pg.describe,
                        SWEEP_FENCE_WAIT.as_secs()
                    ))
                } else {
                    pg.fail(e)
                }
            })
        })
    }
}

impl SweepFence for PgSweepFence {
    fn hold(&mut self) -> Result<()> {
        self.simple(format!("SELECT pg_advisory_lock({FENCE_LOCK})"))
    }

    fn since(&mut self, tops: &std::collections::HashMap<String, u64>) -> Result<Since> {
        let (replicas, numbers): (Vec<String>, Vec<i64>) =
            tops.iter().map(|(r, n)| (r.clone(), big(*n))).unzip();
        let (client, store) = (self.client.clone(), self.store.clone());
        self.pg.block(move |pg| async move {
            let rows = client
                .query(
                    "SELECT v.replica, v.number FROM sqlferry_versions v
                     LEFT JOIN unnest($2::text[], $3::bigint[]) AS t(replica, top) ON t.replica = v.replica
                     WHERE v.store = $1 AND v.removed_at IS NULL AND v.number > coalesce(t.top, 0)
                     ORDER BY v.replica, v.number",
                    &[&store, &replicas, &numbers],
                )
                .await
                .map_err(|e| pg.fail(e))?;
            let versions = rows
                .iter()
                .map(|r| (r.get::<_, String>(0), u64::try_from(r.get::<_, i64>(1)).unwrap_or(0)))
                .collect();
            let rows = client
                .query(
                    "SELECT id, replica, number, extract(epoch FROM clock_timestamp())::bigint - started_at
                     FROM sqlferry_pushing WHERE store = $1 ORDER BY id",
                    &[&store],
                )
                .await
                .map_err(|e| pg.fail(e))?;
            let pushing = rows
                .iter()
                .map(|r| Pushing {
                    id: r.get(0),
                    replica: r.get(1),
                    number: u64::try_from(r.get::<_, i64>(2)).unwrap_or(0),
                    age_secs: r.get(3),
                })
                .collect();
            Ok(Since { versions, pushing })
        })
    }

    fn forget_pushing(&mut self, id: i64) -> Result<()> {
        self.simple(format!("DELETE FROM sqlferry_pushing WHERE id = {id}"))
    }

    fn release(&mut self) -> Result<()> {
        self.simple(format!("SELECT pg_advisory_unlock({FENCE_LOCK})"))
    }
}

/// The versions index of the S3 store (`sqlferry_versions`, migration 3;
/// `store/s3/index.rs`).
impl VersionIndex for PgMeta {
    fn push_fence(&self, store: &str, replica: &str, number: u64) -> Result<Box<dyn PushFence>> {
        // One round trip: the lock (bounded wait), then the record, in one implicit
        // transaction (the record commits with it).
        let sql = format!(
            "SET LOCAL lock_timeout = '{}ms';
             SELECT pg_advisory_lock_shared({FENCE_LOCK});
             INSERT INTO sqlferry_pushing(store, replica, number, started_at)
             VALUES ({}, {}, {}, extract(epoch FROM clock_timestamp())::bigint) RETURNING id",
            PUSH_FENCE_WAIT.as_millis(),
            literal(store)?,
            literal(replica)?,
            big(number)
        );
        let (store, replica) = (store.to_owned(), replica.to_owned());
        self.block(move |pg| async move {
            let client = pg.client().await?;
            let answer = client.simple_query(&sql).await;
            let id = match &answer {
                Ok(messages) => messages.iter().find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(row) => {
                        row.get(0).and_then(|t| t.parse::<i64>().ok())
                    }
                    _ => None,
                }),
                Err(_) => None,
            };
            let Some(id) = id else {
                // Closed, not pooled: a session lock taken before a failure is held
                // until the session ends.
                drop(deadpool_postgres::Object::take(client));
                return Err(match answer {
                    Err(e) if lock_timed_out(&e) => Error::Server(format!(
                        "a sweep of the S3 store through a server sharing the metadata store ({}) held the fence for more than {} s; no version was made: push again",
                        pg.describe,
                        PUSH_FENCE_WAIT.as_secs()
                    )),
                    Err(e) => pg.fail(e),
                    Ok(_) => pg.fail("the push's record in the fence was not returned"),
                });
            };
            Ok(Box::new(PgPushFence {
                pg,
                client: Some(client),
                id,
                store,
                replica,
            }) as Box<dyn PushFence>)
        })
    }

    fn sweep_fence(&self, store: &str) -> Result<Box<dyn SweepFence>> {
        let store = store.to_owned();
        self.block(move |pg| async move {
            let client = deadpool_postgres::Object::take(pg.client().await?);
            client
                .batch_execute(&format!(
                    "SET lock_timeout = '{}ms'",
                    SWEEP_FENCE_WAIT.as_millis()
                ))
                .await
                .map_err(|e| pg.fail(e))?;
            Ok(Box::new(PgSweepFence {
                pg,
                client: std::sync::Arc::new(client),
                store,
            }) as Box<dyn SweepFence>)
        })
    }

    fn insert(&self, store: &str, replica: &str, rows: &[IndexRow]) -> Result<()> {
        let (store, replica, rows) = (store.to_owned(), replica.to_owned(), rows.to_vec());
        self.block(move |pg| async move {
            let mut client = pg.client().await?;
            let tx = client.transaction().await.map_err(|e| pg.fail(e))?;
            let stmt = tx
                .prepare(&format!(
                    "INSERT INTO sqlferry_versions(store, replica, {VERSION_COLUMNS})
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
                     ON CONFLICT (store, replica, number) DO NOTHING"
                ))
                .await
                .map_err(|e| pg.fail(e))?;
            for r in &rows {
                let page_size = i32::try_from(r.page_size).unwrap_or(i32::MAX);
                tx.execute(
                    &stmt,
                    &[
                        &store,
                        &replica,
                        &big(r.number),
                        &page_size,
                        &i64::from(r.page_count),
                        &r.digest,
                        &r.digest2,
                        &r.message,
                        &r.created_at,
                        &r.client_id,
                        &r.key_id,
                        &big(r.base),
                        &r.removed_at,
                        &r.encryption_key_id,
                    ],
                )
                .await
                .map_err(|e| pg.fail(e))?;
            }
            tx.commit().await.map_err(|e| pg.fail(e))
        })
    }

    fn rows(&self, store: &str, replica: &str, after: u64) -> Result<Vec<IndexRow>> {
        let (store, replica) = (store.to_owned(), replica.to_owned());
        self.block(move |pg| async move {
            let client = pg.client().await?;
            let rows = client
                .query(
                    &format!(
                        "SELECT {VERSION_COLUMNS} FROM sqlferry_versions
                         WHERE store = $1 AND replica = $2 AND number > $3 ORDER BY number"
                    ),
                    &[&store, &replica, &big(after)],
                )
                .await
                .map_err(|e| pg.fail(e))?;
            Ok(rows.iter().map(index_row).collect())
        })
    }

    fn top(&self, store: &str, replica: &str) -> Result<Option<IndexRow>> {
        let (store, replica) = (store.to_owned(), replica.to_owned());
        self.block(move |pg| async move {
            let client = pg.client().await?;
            let row = client
                .query_opt(
                    &format!(
                        "SELECT {VERSION_COLUMNS} FROM sqlferry_versions
                         WHERE store = $1 AND replica = $2 ORDER BY number DESC LIMIT 1"
                    ),
                    &[&store, &replica],
                )
                .await
                .map_err(|e| pg.fail(e))?;
            Ok(row.as_ref().map(index_row))
        })
    }

    fn mark_removed(&self, store: &str, replica: &str, numbers: &[u64], at: i64) -> Result<()> {
        let (store, replica) = (store.to_owned(), replica.to_owned());
        let numbers: Vec<i64> = numbers.iter().map(|&n| big(n)).collect();
        self.block(move |pg| async move {
            let client = pg.client().await?;
            client
                .execute(
                    "UPDATE sqlferry_versions SET removed_at = $4
                     WHERE store = $1 AND replica = $2 AND number = ANY($3) AND removed_at IS NULL",
                    &[&store, &replica, &numbers, &at],
                )
                .await
                .map_err(|e| pg.fail(e))?;
            Ok(())
        })
    }
}

impl MetaStore for PgMeta {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn server_id(&self, candidate: &str) -> Result<String> {
        let candidate = candidate.to_owned();
        self.block(move |pg| async move {
            let client = pg.client().await?;
            client
                .execute(
                    "INSERT INTO sqlferry_server(one, id) VALUES (1, $1) ON CONFLICT DO NOTHING",
                    &[&candidate],
                )
                .await
                .map_err(|e| pg.fail(e))?;
            let row = client
                .query_one("SELECT id FROM sqlferry_server WHERE one = 1", &[])
                .await
                .map_err(|e| pg.fail(e))?;
            Ok(row.get(0))
        })
    }

    fn insert_admin_if_none(&self, key: &NewKey) -> Result<bool> {
        let key = key.clone();
        self.block(move |pg| async move {
            let client = pg.client().await?;
            let stored = client
                .execute(
                    "INSERT INTO sqlferry_keys(id, secret_hash, kind, replica, created_at)
                     VALUES ($1, $2, 'admin', NULL, $3) ON CONFLICT DO NOTHING",
                    &[&key.id, &&key.secret_hash[..], &key.created_at],
                )
                .await
                .map_err(|e| pg.fail(e))?;
            Ok(stored == 1)
        })
    }

    fn insert_key(&self, key: &NewKey) -> Result<()> {
        let key = key.clone();
        self.block(move |pg| async move {
            let client = pg.client().await?;
            client
                .execute(
                    "INSERT INTO sqlferry_keys(id, secret_hash, kind, replica, created_at)
                     VALUES ($1, $2, $3, $4, $5)",
                    &[
                        &key.id,
                        &&key.secret_hash[..],
                        &key.kind,
                        &key.replica,
                        &key.created_at,
                    ],
                )
                .await
                .map_err(|e| pg.fail(e))?;
            Ok(())
        })
    }

    fn key(&self, id: &str) -> Result<Option<StoredKey>> {
        let id = id.to_owned();
        self.block(move |pg| async move {
            let client = pg.client().await?;
            let row = client
                .query_opt(
                    "SELECT secret_hash, kind, replica, last_used_at, revoked_at
                     FROM sqlferry_keys WHERE id = $1",
                    &[&id],
                )
                .await
                .map_err(|e| pg.fail(e))?;
            Ok(row.map(|r| StoredKey {
                secret_hash: r.get(0),
                kind: r.get(1),
                replica: r.get(2),
                last_used_at: r.get(3),
                revoked_at: r.get(4),
            }))
        })
    }

    fn touch_key(&self, id: &str, at: i64) -> Result<()> {
        let id = id.to_owned();
        self.block(move |pg| async move {
            let client = pg.client().await?;
            client
                .execute(
                    "UPDATE sqlferry_keys SET last_used_at = $1 WHERE id = $2",
                    &[&at, &id],
                )
                .await
                .map_err(|e| pg.fail(e))?;
            Ok(())
        })
    }

    fn keys(&self, replica: Option<&str>) -> Result<Vec<KeyInfo>> {
        let replica = replica.map(str::to_owned);
        self.block(move |pg| async move {
            let client = pg.client().await?;
            let rows = client
                .query(
                    "SELECT id, kind, replica, created_at, last_used_at, revoked_at
                     FROM sqlferry_keys
                     WHERE revoked_at IS NULL AND ($1::TEXT IS NULL OR replica = $1)
                     ORDER BY created_at, seq",
                    &[&replica],
                )
                .await
                .map_err(|e| pg.fail(e))?;
            Ok(rows.iter().map(key_info).collect())
        })
    }

    fn key_info(&self, id: &str) -> Result<Option<KeyInfo>> {
        let id = id.to_owned();
        self.block(move |pg| async move {
            let client = pg.client().await?;
            let row = client
                .query_opt(
                    "SELECT id, kind, replica, created_at, last_used_at, revoked_at
                     FROM sqlferry_keys WHERE id = $1",
                    &[&id],
                )
                .await
                .map_err(|e| pg.fail(e))?;
            Ok(row.as_ref().map(key_info))
        })
    }

    fn revoke_key(&self, id: &str, at: i64) -> Result<()> {
        let id = id.to_owned();
        self.block(move |pg| async move {
            let client = pg.client().await?;
            client
                .execute(
                    "UPDATE sqlferry_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
                    &[&at, &id],
                )
                .await
                .map_err(|e| pg.fail(e))?;
            Ok(())
        })
    }

    fn replica_id(&self, path: &str) -> Result<Option<String>> {
        let path = path.to_owned();
        self.block(move |pg| async move {
            let client = pg.client().await?;
            let row = client
                .query_opt("SELECT id FROM sqlferry_replicas WHERE path = $1", &[&path])
                .await
                .map_err(|e| pg.fail(e))?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn register_replica(&self, path: &str, id: &str, at: i64) -> Result<String> {
        let (path, id) = (path.to_owned(), id.to_owned());
        self.block(move |pg| async move {
            let client = pg.client().await?;
            client
                .execute(
                    "INSERT INTO sqlferry_replicas(path, id, created_at) VALUES ($1, $2, $3)
                     ON CONFLICT DO NOTHING",
                    &[&path, &id, &at],
                )
                .await
                .map_err(|e| pg.fail(e))?;
            let row = client
                .query_one("SELECT id FROM sqlferry_replicas WHERE path = $1", &[&path])
                .await
                .map_err(|e| pg.fail(e))?;
            Ok(row.get(0))
        })
    }

    fn replica_paths(&self) -> Result<Vec<String>> {
        self.block(move |pg| async move {
            let client = pg.client().await?;
            let rows = client
                .query("SELECT path FROM sqlferry_replicas ORDER BY path", &[])
                .await
                .map_err(|e| pg.fail(e))?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }
}

fn key_info(r: &tokio_postgres::Row) -> KeyInfo {
    KeyInfo {
        id: r.get(0),
        kind: r.get(1),
        replica: r.get(2),
        created_at: r.get(3),
        last_used_at: r.get(4),
        revoked_at: r.get(5),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_literal_is_dollar_quoted_and_what_could_end_it_refused() {
        assert_eq!(
            literal("acme/o'brien.db").expect("quoted"),
            "$sqlferry$acme/o'brien.db$sqlferry$"
        );
        assert_eq!(
            literal(r"s3://b/p\x").expect("quoted"),
            r"$sqlferry$s3://b/p\x$sqlferry$"
        );
        assert!(literal("a$sqlferry$b").is_err());
        assert!(literal("a\0b").is_err());
    }

    #[test]
    fn notices_round_trip_as_json() {
        let notice = Notice::Sync {
            replica: "acme/app.db".into(),
            request: "abc".into(),
            origin: "s1".into(),
        };
        let text = serde_json::to_string(&notice).expect("json");
        assert!(text.contains(r#""kind":"sync""#), "{text}");
        assert_eq!(
            serde_json::from_str::<Notice>(&text).expect("parses"),
            notice
        );
    }

    #[test]
    fn a_database_is_described_without_its_password() {
        let shown = describe_url("postgres://app:s3cret@db.example:6543/meta");
        assert_eq!(shown, "PostgreSQL at db.example:6543/meta");
    }
}
