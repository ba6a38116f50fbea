//! Retention and garbage collection of the S3 store (issue 14; `docs/scale-out.md`,
//! "Retention and garbage collection over S3").
//!
//! - A replica's own policy is an object beside its versions,
//!   `replicas/<path>/retention.json` (the same [`RetentionPolicy`] as the directory
//!   store's), so that every server on the bucket applies the same one whatever its
//!   metadata; the default is the server's (`serve --retention`).
//! - Removing a version writes its **tombstone** over its object (a few bytes: number,
//!   time made, time removed): version numbers keep no gaps, so the latest is still
//!   found by GETs without a LIST, and a pull of a removed version (or of a time it was
//!   current) is refused by name. The latest version is never removed ([`keep`]).
//!   With a versions index (`s3/index.rs`), the rows are marked removed first.
//! - The sweep ([`S3Store::collect`]) is mark and sweep with a grace period: it writes
//!   [`CLOCK_KEY`] (the storage's own "now"), LISTs the store's prefix once (the only
//!   LIST the store makes), reads every version object the listing holds and marks the
//!   packs, indexes and chunks they name, then reads past the newest listed version of
//!   each replica (versions made while it listed), and deletes the `packs/` and
//!   `chunks/` objects that are unmarked **and** older than the grace by the storage's
//!   clock. A push writes its pack, index and chunks before its version object, so
//!   what a push in flight wrote is younger than the grace and stays; a push that ran
//!   longer than the grace checks (HEAD) what it names before committing
//!   (`S3VersionWriter::finish`).
//! - What the sweep deletes it first drops from this server's cache, so no later push
//!   here dedups against it; another server's cache may still name it, which is why a
//!   push HEADs every object it names only through its cache (not through the version
//!   it started from) before it commits, and fails cleanly when one is gone.
//! - **The fence** (with a versions index, i.e. `serve --meta`): a push holds an
//!   advisory lock shared from before its HEADs until its version object exists and its
//!   row is in (recording itself in PostgreSQL meanwhile); the sweep deletes in batches
//!   of [`SWEEP_BATCH`], each under the lock held exclusive, after marking what the
//!   versions indexed since its mark name and what the versions of pushes cut off
//!   mid-commit name ([`S3Store::mark_since`]). So a push's HEADs and its commit fall
//!   wholly before or after each batch: no version can name an object the sweep
//!   deletes (the argument: `docs/scale-out.md`, "The fence"). Both waits are bounded.
//! - One sweep at a time per cache (a `flock` on a file beside the cache: the servers
//!   sharing a `--data`); servers sharing `--meta` take a PostgreSQL advisory lock
//!   around it too (the server's prune does). Two sweeps that do run at once are
//!   harmless (each deletes only what no version names and is older than the grace;
//!   deleting a missing object is no error), only wasted requests.
//!
//! Invariants: nothing is deleted before every listed version object was read (one
//! that cannot be read stops the sweep: its objects might be in use); a dry run writes
//! nothing but the clock object. Memory: the listing and the marks go to temporary
//! tables of the cache's SQLite file, not to memory.

use std::collections::HashMap;
use std::fs::File;

use futures_util::StreamExt as _;

use super::*;
use crate::protocol::control::SWEPT_LISTED;
use crate::store::retention::keep;

/// The object each sweep writes just before its LIST, whose `LastModified` in the
/// listing is the sweep's "now" by the storage's own clock (so the grace does not
/// depend on the server's clock agreeing with the storage's).
pub const CLOCK_KEY: &str = "sqlferry-gc-clock";

/// How many objects a sweep deletes per hold of the fence: pushes wait at most one
/// batch (a few seconds of DELETEs), and each batch costs the sweep one query of the
/// index and the GETs of the versions made since.
pub const SWEEP_BATCH: usize = 256;

/// How long after a push lost its session mid-commit its version object can no longer
/// appear: far past every request it may still make (the object layer's retries and
/// timeouts). Until then a sweep that finds its record and no object stops.
pub const PUSH_LOST_AFTER: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// What a sweep deleted (or, in a dry run, would delete).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Objects no remaining version names and older than the grace: deleted.
    pub swept: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Objects no version names, left because younger than the grace.
    pub young: u64,
    /// The keys swept, at most [`SWEPT_LISTED`] (in key order).
    pub keys: Vec<String>,
    /// Version objects read to mark.
    pub versions: u64,
}

fn policy_key(replica: &ReplicaPath) -> String {
    format!("replicas/{replica}/retention.json")
}

/// The replica and number a listed key names when it is a version object's
/// (`replicas/<path>/v/<N>`).
fn version_of(key: &str) -> Option<(&str, u64)> {
    let rest = key.strip_prefix("replicas/")?;
    let (path, number) = rest.rsplit_once("/v/")?;
    let number = number.parse::<u64>().ok().filter(|&n| n > 0)?;
    Some((path, number))
}

impl S3Store {
    /// `replica`'s retention policy and where it comes from: its own object, else the
    /// server's default, else none (everything kept). Refused for a replica with no
    /// version.
    pub fn retention(&self, replica: &ReplicaPath) -> Result<Retention> {
        if self.latest(replica)?.is_none() {
            return Err(not_found(replica));
        }
        let key = policy_key(replica);
        let own = match self.get(key.clone())? {
            Some(bytes) => Some(serde_json::from_slice::<RetentionPolicy>(&bytes).map_err(
                |e| {
                    Error::Verification(format!(
                        "the retention policy {key} in {} is damaged: {e}; set it again with `sqlferry retention {replica} --keep-…`",
                        self.objects.location()
                    ))
                },
            )?),
            None => None,
        };
        Ok(Retention::applying(
            replica,
            own,
            self.default_retention.clone(),
        ))
    }

    /// Gives `replica` its own policy (one PUT), or with `None` drops it (one DELETE:
    /// the default applies again). Removes nothing by itself: [`S3Store::prune`] does.
    pub fn set_retention(
        &self,
        replica: &ReplicaPath,
        policy: Option<&RetentionPolicy>,
    ) -> Result<Retention> {
        if self.latest(replica)?.is_none() {
            return Err(not_found(replica));
        }
        let key = policy_key(replica);
        let objects = self.objects.clone();
        match policy {
            Some(p) => {
                let body = serde_json::to_vec(p)
                    .map_err(|e| Error::Bug(format!("a retention policy as JSON: {e}")))?;
                self.wait(async move { objects.put(&key, body).await })?;
            }
            None => self.wait(async move { objects.delete(&key).await })?,
        }
        self.retention(replica)
    }

    /// Replaces the objects of `replica`'s versions that `policy` does not keep at
    /// `now` by their tombstones (never the latest); returns their numbers and how
    /// many versions remain. A dry run writes nothing.
    pub fn remove_versions(
        &self,
        replica: &ReplicaPath,
        policy: &RetentionPolicy,
        now: i64,
        dry_run: bool,
    ) -> Result<(Vec<u64>, u64)> {
        let present: Vec<(u64, i64)> = self
            .catalog(replica)?
            .into_iter()
            .filter(|r| r.removed_at.is_none())
            .map(|r| (r.number, r.created_at))
            .collect();
        if present.is_empty() {
            return Err(not_found(replica));
        }
        let flags = keep(policy, &present, now);
        let removed: Vec<u64> = present
            .iter()
            .zip(&flags)
            .filter(|(_, k)| !**k)
            .map(|((n, _), _)| *n)
            .collect();
        let kept = (present.len() - removed.len()) as u64;
        if dry_run {
            return Ok((removed, kept));
        }
        let at = crate::epoch::now();
        // The rows first: a row never names a version its object no longer holds.
        if !removed.is_empty() {
            self.index_removed(replica, &removed, at)?;
        }
        for &(number, created_at) in present.iter().filter(|(n, _)| removed.contains(n)) {
            let tombstone = Tombstone {
                format: VERSION_FORMAT,
                replica: replica.to_string(),
                number,
                created_at,
                removed_at: Some(at),
            };
            let body = serde_json::to_vec(&tombstone)
                .map_err(|e| Error::Bug(format!("a tombstone as JSON: {e}")))?;
            let (objects, key) = (self.objects.clone(), Self::version_key(replica, number));
            self.wait(async move { objects.put(&key, body).await })?;
        }
        if !removed.is_empty() {
            tracing::info!(%replica, removed = removed.len(), kept, "versions removed by retention");
        }
        Ok((removed, kept))
    }

    /// Removes the versions of `replica` its policy does not keep at `now` (never the
    /// latest), then sweeps the store ([`S3Store::collect`]). With `dry_run`, changes
    /// nothing and says what it would remove and delete (the versions it would remove
    /// count as gone for the sweep).
    pub fn prune(&self, replica: &ReplicaPath, dry_run: bool, now: i64) -> Result<PruneReport> {
        let policy = self.retention(replica)?.policy;
        let (removed, kept) = self.remove_versions(replica, &policy, now, dry_run)?;
        let excluded: Vec<(String, u64)> = match dry_run {
            true => removed.iter().map(|&n| (replica.to_string(), n)).collect(),
            false => Vec::new(),
        };
        let sweep = self.collect(dry_run, &excluded)?;
        Ok(PruneReport {
            replica: replica.to_string(),
            dry_run,
            removed,
            kept,
            freed_pages: 0,
            freed_bytes: sweep.bytes,
            reclaimed_bytes: sweep.bytes,
            deferred: None,
            swept_objects: Some(sweep.swept),
            young_objects: Some(sweep.young),
            swept: if dry_run { sweep.keys } else { Vec::new() },
        })
    }

    /// The sweep: marks every pack, index and chunk a remaining version object names
    /// and deletes the other `packs/` and `chunks/` objects older than the store's
    /// grace (see the module's doc). `excluded`: versions (replica, number) to count as
    /// removed (a dry run's). A dry run deletes nothing. Refused ([`Error::InUse`])
    /// while another sweep through the same cache runs.
    pub fn collect(&self, dry_run: bool, excluded: &[(String, u64)]) -> Result<Sweep> {
        let _lock = self.sweep_lock()?;
        let location = self.objects.location().to_string();
        let path = self.cache.clone();
        let sql = sql_error(&path);
        // The storage's "now": the LastModified of this object in the listing.
        let objects = self.objects.clone();
        let stamp = crate::epoch::now().to_string().into_bytes();
        self.wait(async move { objects.put(CLOCK_KEY, stamp).await })?;
        let conn = self.cache_conn()?;
        conn.execute_batch(
            "CREATE TEMP TABLE IF NOT EXISTS listed(key TEXT PRIMARY KEY, size INTEGER NOT NULL, modified INTEGER NOT NULL) WITHOUT ROWID;
             CREATE TEMP TABLE IF NOT EXISTS marked(key TEXT PRIMARY KEY) WITHOUT ROWID;
             DELETE FROM temp.listed; DELETE FROM temp.marked;",
        )
        .map_err(&sql)?;
        self.list_into(&conn)?;
        let now: i64 = conn
            .query_row(
                "SELECT modified FROM temp.listed WHERE key = ?1",
                [CLOCK_KEY],
                |r| r.get(0),
            )
            .optional()
            .map_err(&sql)?
            .unwrap_or_else(crate::epoch::now);

        // Mark: every version object listed, then those made since.
        let mut newest: HashMap<String, u64> = HashMap::new();
        let mut versions = 0u64;
        {
            let mut stmt = conn
                .prepare("SELECT key FROM temp.listed WHERE key LIKE 'replicas/%/v/%' ORDER BY key")
                .map_err(&sql)?;
            let mut rows = stmt.query([]).map_err(&sql)?;
            while let Some(row) = rows.next().map_err(&sql)? {
                let key: String = row.get(0).map_err(&sql)?;
                let Some((replica, number)) = version_of(&key) else {
                    continue;
                };
                let top = newest.entry(replica.to_owned()).or_insert(0);
                *top = (*top).max(number);
                if excluded.iter().any(|(r, n)| r == replica && *n == number) {
                    continue;
                }
                versions += self.mark_version(&conn, &key, replica, number)? as u64;
            }
        }
        for (replica, top) in newest.iter_mut() {
            loop {
                let number = *top + 1;
                let key = format!("replicas/{replica}/v/{number}");
                let Some(found) = self.mark_version_opt(&conn, &key, replica, number)? else {
                    break;
                };
                versions += found as u64;
                // Read: the fence's reads start past it.
                *top = number;
            }
        }

        // Sweep: unmarked and older than the grace.
        let grace = i64::try_from(self.grace.as_secs()).unwrap_or(i64::MAX);
        let mut sweep = Sweep {
            versions,
            ..Sweep::default()
        };
        conn.execute_batch(
            "CREATE TEMP TABLE IF NOT EXISTS doomed(key TEXT PRIMARY KEY, size INTEGER NOT NULL) WITHOUT ROWID;
             DELETE FROM temp.doomed;",
        )
        .map_err(&sql)?;
        {
            let mut stmt = conn
                .prepare(
                    "SELECT key, size, modified FROM temp.listed
                     WHERE (key LIKE 'packs/%' OR key LIKE 'chunks/%')
                       AND key NOT IN (SELECT key FROM temp.marked) ORDER BY key",
                )
                .map_err(&sql)?;
            let mut doom = conn
                .prepare("INSERT INTO temp.doomed(key, size) VALUES (?1, ?2)")
                .map_err(&sql)?;
            let mut rows = stmt.query([]).map_err(&sql)?;
            while let Some(row) = rows.next().map_err(&sql)? {
                let key: String = row.get(0).map_err(&sql)?;
                let size: i64 = row.get(1).map_err(&sql)?;
                let modified: i64 = row.get(2).map_err(&sql)?;
                if now.saturating_sub(modified) < grace {
                    sweep.young += 1;
                } else {
                    doom.execute(params![key, size]).map_err(&sql)?;
                }
            }
        }
        // With a versions index, each batch under the fence (see the module's doc).
        let mut fence = match (self.index.as_deref(), dry_run) {
            (Some(index), false) => Some(index.sweep_fence(&location)?),
            _ => None,
        };
        let mut after = String::new();
        loop {
            let batch: Vec<(String, i64)> = conn
                .prepare_cached(
                    "SELECT key, size FROM temp.doomed WHERE key > ?1 ORDER BY key LIMIT ?2",
                )
                .and_then(|mut s| {
                    s.query_map(params![after, SWEEP_BATCH as i64], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?
                    .collect()
                })
                .map_err(&sql)?;
            let Some((last, _)) = batch.last() else {
                break;
            };
            after = last.clone();
            if let Some(fence) = fence.as_deref_mut() {
                // An error from here on drops the fence: its connection closes and the
                // lock goes with it.
                fence.hold()?;
                sweep.versions += self.mark_since(&conn, fence, &mut newest)?;
            }
            for (key, size) in batch {
                let marked = conn
                    .prepare_cached("SELECT 1 FROM temp.marked WHERE key = ?1")
                    .and_then(|mut s| s.exists([&key]))
                    .map_err(&sql)?;
                if marked {
                    continue;
                }
                sweep.swept += 1;
                sweep.bytes += size as u64;
                if sweep.keys.len() < SWEPT_LISTED {
                    sweep.keys.push(key.clone());
                }
                if dry_run {
                    continue;
                }
                // Forgotten by this server's cache first: no push here dedups against it.
                self.forget(&conn, &key)?;
                let objects = self.objects.clone();
                self.wait(async move { objects.delete(&key).await })?;
            }
            if let Some(fence) = fence.as_deref_mut() {
                fence.release()?;
            }
        }
        if !dry_run {
            tracing::info!(store = %location, swept = sweep.swept, bytes = sweep.bytes, young = sweep.young, versions = sweep.versions, "swept the objects no version names");
        }
        Ok(sweep)
    }

    /// Under the fence (exclusive): marks what the versions indexed since the mark
    /// name (the index's rows past `newest`, the highest number read of each replica,
    /// which it raises), and the versions of pushes whose sessions ended mid-commit
    /// (their records in the fence: their objects may exist without a row). Returns
    /// how many version objects it read. A record whose version object does not exist
    /// yet and that is younger than [`PUSH_LOST_AFTER`] stops the sweep: that push may
    /// still create it.
    fn mark_since(
        &self,
        conn: &Connection,
        fence: &mut dyn super::SweepFence,
        newest: &mut HashMap<String, u64>,
    ) -> Result<u64> {
        let since = fence.since(newest)?;
        let mut versions = 0u64;
        for (replica, number) in since.versions {
            let key = format!("replicas/{replica}/v/{number}");
            versions += self.mark_version(conn, &key, &replica, number)? as u64;
            let top = newest.entry(replica).or_insert(0);
            *top = (*top).max(number);
        }
        for p in since.pushing {
            let key = format!("replicas/{}/v/{}", p.replica, p.number);
            match self.mark_version_opt(conn, &key, &p.replica, p.number)? {
                Some(found) => {
                    versions += found as u64;
                    tracing::info!(replica = %p.replica, version = p.number, "sweep: a push whose session ended mid-commit made its version; what it names is kept");
                }
                None if p.age_secs >= PUSH_LOST_AFTER.as_secs() as i64 => {
                    tracing::info!(replica = %p.replica, version = p.number, age_secs = p.age_secs, "sweep: a push whose session ended mid-commit never made its version; its record is dropped");
                }
                None => {
                    return Err(Error::InUse(format!(
                        "a push of {}@{} into {} lost its session with the metadata store mid-commit {} s ago and may still create that version: the sweep stopped, deleting nothing more; run prune again once {} minutes have passed",
                        p.replica,
                        p.number,
                        self.objects.location(),
                        p.age_secs,
                        PUSH_LOST_AFTER.as_secs() / 60
                    )));
                }
            }
            fence.forget_pushing(p.id)?;
        }
        Ok(versions)
    }

    /// Streams the LIST of the whole prefix into `temp.listed`.
    fn list_into(&self, conn: &Connection) -> Result<()> {
        let sql = sql_error(&self.cache);
        let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
        let objects = self.objects.clone();
        self.runtime.spawn(async move {
            let mut listing = std::pin::pin!(objects.list(""));
            while let Some(item) = listing.next().await {
                if tx.send(item).await.is_err() {
                    break;
                }
            }
        });
        let txn = conn.unchecked_transaction().map_err(&sql)?;
        {
            let mut insert = txn
                .prepare(
                    "INSERT OR REPLACE INTO temp.listed(key, size, modified) VALUES (?1, ?2, ?3)",
                )
                .map_err(&sql)?;
            while let Some(item) = rx.blocking_recv() {
                let l = item?;
                insert
                    .execute(params![l.key, l.size as i64, l.modified])
                    .map_err(&sql)?;
            }
        }
        txn.commit().map_err(&sql)
    }

    /// Marks what version object `key` names; whether it was a version (not a
    /// tombstone, not gone since the listing).
    fn mark_version(&self, conn: &Connection, key: &str, replica: &str, n: u64) -> Result<bool> {
        Ok(self
            .mark_version_opt(conn, key, replica, n)?
            .unwrap_or(false))
    }

    /// As [`S3Store::mark_version`]; `None` when the object does not exist.
    fn mark_version_opt(
        &self,
        conn: &Connection,
        key: &str,
        replica: &str,
        number: u64,
    ) -> Result<Option<bool>> {
        let Some(bytes) = self.get(key.to_owned())? else {
            return Ok(None);
        };
        let v = match self.parse_slot(key, &bytes, Some((replica, number)))? {
            Slot::Present(v) => v,
            Slot::Removed(_) | Slot::Missing => return Ok(Some(false)),
        };
        let mut mark = conn
            .prepare_cached("INSERT OR IGNORE INTO temp.marked(key) VALUES (?1)")
            .map_err(sql_error(&self.cache))?;
        for chunk in &v.chunks {
            mark.execute([format!("chunks/{chunk}")])
                .map_err(sql_error(&self.cache))?;
        }
        for pack in &v.packs {
            for key in [format!("packs/{pack}.pack"), format!("packs/{pack}.idx")] {
                mark.execute([key]).map_err(sql_error(&self.cache))?;
            }
        }
        Ok(Some(true))
    }

    /// Drops what the cache knows of the object `key` (a pack's pages, a chunk).
    fn forget(&self, conn: &Connection, key: &str) -> Result<()> {
        forget(conn, &self.cache, key)
    }

    /// The lock that keeps sweeps through this cache one at a time.
    fn sweep_lock(&self) -> Result<File> {
        let path = self.cache.with_extension("gc.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::InUse(format!(
                "another sweep of {} is running on this server (its lock {}); try again when it ends",
                self.objects.location(),
                path.display()
            ))),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
        }
    }
}

/// Drops what the cache at `path` knows of the object `key`: a pack's pages (for its
/// `.pack` or `.idx`), or a chunk.
pub(super) fn forget(conn: &Connection, path: &Path, key: &str) -> Result<()> {
    let sql = sql_error(path);
    let name = |hex_text: &str| -> Option<Hash> {
        let mut out = [0u8; HASH_BYTES];
        hex::decode_to_slice(hex_text, &mut out).ok().map(|_| out)
    };
    if let Some(rest) = key.strip_prefix("packs/") {
        let stem = rest
            .strip_suffix(".pack")
            .or_else(|| rest.strip_suffix(".idx"));
        if let Some(pack) = stem.and_then(name) {
            conn.execute("DELETE FROM pages WHERE pack = ?1", [&pack[..]])
                .map_err(&sql)?;
            conn.execute("DELETE FROM packs WHERE name = ?1", [&pack[..]])
                .map_err(&sql)?;
        }
    } else if let Some(chunk) = key.strip_prefix("chunks/").and_then(name) {
        conn.execute("DELETE FROM chunks WHERE hash = ?1", [&chunk[..]])
            .map_err(&sql)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_keys_are_told_from_the_others() {
        assert_eq!(
            version_of("replicas/acme/app.db/v/12"),
            Some(("acme/app.db", 12))
        );
        assert_eq!(version_of("replicas/ns/v/v/3"), Some(("ns/v", 3)));
        assert_eq!(version_of("replicas/acme/app.db/retention.json"), None);
        assert_eq!(version_of("replicas/acme/app.db/v/0"), None);
        assert_eq!(version_of("packs/ab.pack"), None);
    }
}
