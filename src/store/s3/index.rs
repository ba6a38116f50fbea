//! The versions index of the S3 store (issue 14; `docs/scale-out.md`, "The versions
//! index"): with `serve --meta postgres://…`, a row per version object in PostgreSQL
//! (`sqlferry_versions`), so that `versions`, `select` (`@N`, `@latest-N`, `@TIME`),
//! the API's listings and retention read one query instead of one GET per version ever
//! made.
//!
//! The object stays the truth, the table a fast index of it:
//! - A push inserts its row only after its version object was created (the commit
//!   point); a failure to insert it is logged, not the push's (the version exists).
//! - The rows of a replica are a gapless prefix 1..T of its version numbers: a push
//!   inserts row N only after it found N − 1 as the latest (through the table and a
//!   probe past it), and a repair inserts what it found past T in order. So every
//!   object a row is missing for lies past T, and one GET of `v/<T+1>` (missing: nothing
//!   newer) proves the table whole: each listing, `select` and push makes it, and
//!   inserts the rows of whatever it finds there (a server killed between its object
//!   and its row, a push made while PostgreSQL was unreachable, a store that predates
//!   the index: the first listing fills it).
//! - Retention marks a row removed **before** writing the tombstone over its object: a
//!   row never names a version whose object no longer holds it. A prune killed in
//!   between leaves a version kept in the bucket that the table (and so every server)
//!   treats as removed.
//!
//! The store knows the index only through [`VersionIndex`]; `meta::postgres`
//! implements it.

use std::fmt::Debug;

use super::*;

/// A version's row in the index: what `versions` lists and `select` needs, never its
/// chunks or packs (a read GETs its object anyway).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexRow {
    /// Its number.
    pub number: u64,
    /// Page size in bytes (0 for a removed version's row made from its tombstone).
    pub page_size: u32,
    /// Number of pages.
    pub page_count: u32,
    /// Digest 1 (hex), maybe empty (see [`VersionObject::digest`]).
    pub digest: String,
    /// The chunked digest.
    pub digest2: String,
    /// The commit message.
    pub message: String,
    /// When it was committed, Unix seconds.
    pub created_at: i64,
    /// Which client pushed it.
    pub client_id: String,
    /// With which key.
    pub key_id: String,
    /// The version it was pushed on top of.
    pub base: u64,
    /// When retention removed it, Unix seconds; `None` while it is kept.
    pub removed_at: Option<i64>,
    /// The key id of an encrypted version; `None` for a plaintext one (its seal is in
    /// its object only, which every read GETs).
    pub encryption_key_id: Option<String>,
}

impl IndexRow {
    /// The row of a version object.
    pub fn of(v: &VersionObject) -> IndexRow {
        IndexRow {
            number: v.number,
            page_size: v.page_size,
            page_count: v.page_count,
            digest: v.digest.clone(),
            digest2: v.digest2.clone(),
            message: v.message.clone(),
            created_at: v.created_at,
            client_id: v.client_id.clone(),
            key_id: v.key_id.clone(),
            base: v.base,
            removed_at: None,
            encryption_key_id: v.encryption_key_id.clone(),
        }
    }

    /// The row of what a version number's object holds; `None` for no object.
    fn of_slot(slot: &Slot) -> Option<IndexRow> {
        match slot {
            Slot::Missing => None,
            Slot::Present(v) => Some(IndexRow::of(v)),
            Slot::Removed(t) => Some(IndexRow {
                removed_at: t.removed_at,
                ..IndexRow::bare(t.number, t.created_at)
            }),
        }
    }

    fn bare(number: u64, created_at: i64) -> IndexRow {
        IndexRow {
            number,
            page_size: 0,
            page_count: 0,
            digest: String::new(),
            digest2: String::new(),
            message: String::new(),
            created_at,
            client_id: String::new(),
            key_id: String::new(),
            base: 0,
            removed_at: None,
            encryption_key_id: None,
        }
    }

    /// What the store's callers see of it (a removed version: its number and time).
    pub fn info(&self) -> VersionInfo {
        if self.removed_at.is_some() {
            return VersionInfo::bare(self.number, self.created_at);
        }
        VersionInfo {
            number: self.number,
            page_size: self.page_size,
            page_count: self.page_count,
            size: u64::from(self.page_size) * u64::from(self.page_count),
            digest: self.digest.clone(),
            digest2: Some(self.digest2.clone()),
            message: self.message.clone(),
            created_at: self.created_at,
            client_id: self.client_id.clone(),
            key_id: self.key_id.clone(),
            base: self.base,
            stored_bytes: None,
            merged_into: None,
            encryption: self.encryption_key_id.clone(),
        }
    }
}

/// Where the index lives (PostgreSQL, `meta::postgres`). Rows are keyed by the store's
/// location (`s3://BUCKET/PREFIX`), the replica and the number. Every method blocks
/// (call it from a blocking thread, as every S3 store method).
pub trait VersionIndex: Send + Sync + Debug {
    /// Inserts `rows` of `replica`, leaving any row that exists as it is.
    fn insert(&self, store: &str, replica: &str, rows: &[IndexRow]) -> Result<()>;

    /// The rows of `replica` numbered above `after`, oldest first.
    fn rows(&self, store: &str, replica: &str, after: u64) -> Result<Vec<IndexRow>>;

    /// The row of `replica` with the highest number.
    fn top(&self, store: &str, replica: &str) -> Result<Option<IndexRow>>;

    /// Marks rows `numbers` of `replica` removed at `at`.
    fn mark_removed(&self, store: &str, replica: &str, numbers: &[u64], at: i64) -> Result<()>;

    /// A push's side of the fence (see "The fence" in `gc.rs`): waits (bounded) for
    /// the fence's lock, shared, on a connection of its own, and records that version
    /// `number` of `replica` is being made. Held until [`PushFence::land`], or dropped
    /// (the record deleted, the lock let go).
    fn push_fence(&self, store: &str, replica: &str, number: u64) -> Result<Box<dyn PushFence>>;

    /// A sweep's side of the fence: a connection of its own, on which
    /// [`SweepFence::hold`] waits (bounded) for the lock, exclusive. Dropped, the
    /// connection closes (which lets the lock go).
    fn sweep_fence(&self, store: &str) -> Result<Box<dyn SweepFence>>;
}

/// A push holding the fence, shared (`VersionIndex::push_fence`). Dropped without
/// landing (the push failed before or at its version object's create): its record is
/// deleted and the lock let go, without waiting.
pub trait PushFence: Send {
    /// After the version object was created: inserts its row into the index and
    /// deletes the push's record in one statement, then lets the lock go. An error
    /// means the row may be missing (the repair adds it) and the record left for the
    /// sweep, which reads the version object; the version exists either way.
    fn land(self: Box<Self>, row: &IndexRow) -> Result<()>;
}

/// A push whose record a sweep found while holding the fence: its session ended
/// before it could delete it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushing {
    /// The record's id.
    pub id: i64,
    /// The replica and the version number it was making.
    pub replica: String,
    /// The version number.
    pub number: u64,
    /// Seconds since it took the fence (PostgreSQL's clock).
    pub age_secs: i64,
}

/// What a sweep holding the fence finds made since its mark ([`SweepFence::since`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Since {
    /// Versions indexed past the numbers the sweep has read: replica and number, not
    /// removed, oldest first per replica.
    pub versions: Vec<(String, u64)>,
    /// The records of pushes whose sessions ended mid-commit.
    pub pushing: Vec<Pushing>,
}

/// A sweep's connection to the fence (`VersionIndex::sweep_fence`).
pub trait SweepFence: Send {
    /// Waits for the fence's lock, exclusive: at most the sweep's bound, then
    /// [`Error::InUse`] (a push holding it that long is stuck; the sweep stops).
    fn hold(&mut self) -> Result<()>;

    /// Under the lock: the versions of the store indexed past `tops` (replica →
    /// the highest number the sweep has read; 0 for a replica it does not know), and
    /// the records of pushes whose sessions ended mid-commit.
    fn since(&mut self, tops: &std::collections::HashMap<String, u64>) -> Result<Since>;

    /// Deletes the record `id` (its version read, or its push long dead).
    fn forget_pushing(&mut self, id: i64) -> Result<()>;

    /// Lets the lock go.
    fn release(&mut self) -> Result<()>;
}

impl S3Store {
    /// This store with its versions indexed in `index` (`serve --meta` with `--store
    /// s3://…`).
    pub fn with_index(mut self, index: std::sync::Arc<dyn VersionIndex>) -> S3Store {
        self.index = Some(index);
        self
    }

    /// Whether this store's versions are indexed.
    pub fn indexed(&self) -> bool {
        self.index.is_some()
    }

    fn location_text(&self) -> String {
        self.objects.location().to_string()
    }

    /// The rows of the version objects past number `top` (GETs of `top + 1`, … until
    /// one is missing), inserted into `index`: the repair (see the module's doc). One
    /// GET when there is nothing past `top`.
    fn repair_after(
        &self,
        index: &dyn VersionIndex,
        replica: &ReplicaPath,
        top: u64,
    ) -> Result<Vec<(IndexRow, Slot)>> {
        let mut found = Vec::new();
        let mut number = top + 1;
        loop {
            let slot = self.slot(replica, number)?;
            let Some(row) = IndexRow::of_slot(&slot) else {
                break;
            };
            found.push((row, slot));
            number += 1;
        }
        if !found.is_empty() {
            let rows: Vec<IndexRow> = found.iter().map(|(r, _)| r.clone()).collect();
            index.insert(&self.location_text(), replica.as_str(), &rows)?;
            tracing::info!(
                %replica,
                from = top + 1,
                to = number - 1,
                "versions index: rows repaired from their version objects"
            );
        }
        Ok(found)
    }

    /// Every row of `replica` (removed versions' too), oldest first: through the index,
    /// repaired past its latest row; else from every version object (GETs of 1, 2, …).
    pub(super) fn catalog(&self, replica: &ReplicaPath) -> Result<Vec<IndexRow>> {
        let Some(index) = self.index.as_deref() else {
            return Ok(self
                .slots(replica)?
                .iter()
                .filter_map(|(_, slot)| IndexRow::of_slot(slot))
                .collect());
        };
        let mut rows = index.rows(&self.location_text(), replica.as_str(), 0)?;
        let top = rows.last().map_or(0, |r| r.number);
        rows.extend(
            self.repair_after(index, replica, top)?
                .into_iter()
                .map(|(r, _)| r),
        );
        Ok(rows)
    }

    /// The latest row of `replica` through the index (repaired past it), and its
    /// object when the repair read it; `None` without an index.
    fn indexed_latest(
        &self,
        replica: &ReplicaPath,
    ) -> Result<Option<(Option<IndexRow>, Option<Slot>)>> {
        let Some(index) = self.index.as_deref() else {
            return Ok(None);
        };
        let top = index.top(&self.location_text(), replica.as_str())?;
        let found = self.repair_after(index, replica, top.as_ref().map_or(0, |r| r.number))?;
        Ok(Some(match found.into_iter().last() {
            Some((row, slot)) => (Some(row), Some(slot)),
            None => (top, None),
        }))
    }

    /// The latest version of `replica` as a row, without reading its object when the
    /// index knows it (one GET: the probe past the table's latest); from the objects
    /// without an index.
    pub fn latest_info(&self, replica: &ReplicaPath) -> Result<Option<VersionInfo>> {
        match self.indexed_latest(replica)? {
            Some((Some(row), _)) if row.removed_at.is_none() => Ok(Some(row.info())),
            Some((None, _)) => Ok(None),
            // A removed latest (never made by retention) is named by the object's path.
            Some((Some(_), _)) | None => Ok(self.latest(replica)?.map(|v| v.info())),
        }
    }

    /// The latest version object of `replica` through the index: `None` without an
    /// index; `Some(None)` for a replica with no version.
    pub(super) fn indexed_latest_object(
        &self,
        replica: &ReplicaPath,
    ) -> Result<Option<Option<VersionObject>>> {
        let Some((row, slot)) = self.indexed_latest(replica)? else {
            return Ok(None);
        };
        let Some(row) = row else {
            return Ok(Some(None));
        };
        let slot = match slot {
            Some(slot) => slot,
            None => self.slot(replica, row.number)?,
        };
        match slot {
            Slot::Present(v) => {
                self.saw(replica, v.number);
                Ok(Some(Some(*v)))
            }
            Slot::Removed(_) => Err(Error::Verification(format!(
                "{replica}@{}, the latest version number in {}, holds a removed version's tombstone; a store's latest version is never removed",
                row.number,
                self.objects.location()
            ))),
            // A row never names a version whose object does not exist.
            Slot::Missing => {
                let location = self.objects.location().to_string();
                let lost = self.lost(replica, row.number);
                Err(Error::Verification(format!(
                    "{lost} (the versions index of {location} in PostgreSQL still lists it: restore the bucket, or, if it is lost for good, delete the replica's rows, `DELETE FROM sqlferry_versions WHERE store = '{location}' AND replica = '{replica}'`, and push again)"
                )))
            }
        }
    }

    /// The row of version `number` of `replica` through the index, without a GET;
    /// `None` without an index, or when the index has no such row (then the object
    /// decides).
    pub(super) fn indexed_row(
        &self,
        replica: &ReplicaPath,
        number: u64,
    ) -> Result<Option<IndexRow>> {
        let Some(index) = self.index.as_deref() else {
            return Ok(None);
        };
        let rows = index.rows(
            &self.location_text(),
            replica.as_str(),
            number.saturating_sub(1),
        )?;
        Ok(rows.into_iter().next().filter(|r| r.number == number))
    }

    /// The newest versions of `replica` retention kept, at most `n`, oldest first, and
    /// whether they are all it has, through the index; `None` without one.
    pub fn indexed_newest(
        &self,
        replica: &ReplicaPath,
        n: usize,
    ) -> Result<Option<(Vec<VersionInfo>, bool)>> {
        if self.index.is_none() {
            return Ok(None);
        }
        let kept: Vec<VersionInfo> = self
            .catalog(replica)?
            .iter()
            .filter(|r| r.removed_at.is_none())
            .map(IndexRow::info)
            .collect();
        let skip = kept.len().saturating_sub(n);
        Ok(Some((kept[skip..].to_vec(), skip == 0)))
    }

    /// The oldest version of `replica` retention kept after `version`, through the
    /// index; `None` without one.
    pub fn indexed_first_after(
        &self,
        replica: &ReplicaPath,
        version: u64,
    ) -> Result<Option<Option<VersionInfo>>> {
        let Some(index) = self.index.as_deref() else {
            return Ok(None);
        };
        let mut rows = index.rows(&self.location_text(), replica.as_str(), version)?;
        // The repair starts past the table's latest row, wherever `version` is.
        let top = match rows.last() {
            Some(r) => r.number,
            None => index
                .top(&self.location_text(), replica.as_str())?
                .map_or(0, |r| r.number),
        };
        rows.extend(
            self.repair_after(index, replica, top)?
                .into_iter()
                .map(|(r, _)| r),
        );
        Ok(Some(
            rows.iter()
                .find(|r| r.removed_at.is_none() && r.number > version)
                .map(IndexRow::info),
        ))
    }

    /// Records the version this store's push just created in the index, if any. A
    /// failure is logged, not returned: the version exists (its object is the commit
    /// point), and the next listing repairs the row.
    pub(super) fn index_created(&self, replica: &ReplicaPath, version: &VersionObject) {
        let Some(index) = self.index.as_deref() else {
            return;
        };
        let row = IndexRow::of(version);
        if let Err(e) = index.insert(&self.location_text(), replica.as_str(), &[row]) {
            tracing::warn!(%replica, version = version.number, error = %e, "versions index: the new version's row was not inserted; the next listing of the replica repairs it from its object");
        }
    }

    /// The fence's shared hold for a push about to make version `number` of
    /// `replica` (`s3/gc.rs`, "The fence"); `None` without an index (no fence: the
    /// grace alone protects the push).
    pub(super) fn push_fence(
        &self,
        replica: &ReplicaPath,
        number: u64,
    ) -> Result<Option<Box<dyn PushFence>>> {
        match self.index.as_deref() {
            Some(index) => index
                .push_fence(&self.location_text(), replica.as_str(), number)
                .map(Some),
            None => Ok(None),
        }
    }

    /// Records the version this store's push just created in the index and lets the
    /// fence go. A failure is logged, not returned, as in [`S3Store::index_created`]:
    /// the row is repaired by the next listing, and the push's record stays in the
    /// fence for the next sweep to read the version object by.
    pub(super) fn index_landed(
        &self,
        replica: &ReplicaPath,
        version: &VersionObject,
        fence: Box<dyn PushFence>,
    ) {
        if let Err(e) = fence.land(&IndexRow::of(version)) {
            tracing::warn!(%replica, version = version.number, error = %e, "versions index: the new version's row was not inserted (its object exists); the next listing of the replica repairs it, and the next sweep reads it from the push's record in the fence");
        }
    }

    /// Marks `numbers` of `replica` removed in the index, if any (before their
    /// tombstones are written: see the module's doc).
    pub(super) fn index_removed(
        &self,
        replica: &ReplicaPath,
        numbers: &[u64],
        at: i64,
    ) -> Result<()> {
        match self.index.as_deref() {
            Some(index) => index.mark_removed(&self.location_text(), replica.as_str(), numbers, at),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tombstone_makes_a_removed_row_that_says_only_its_number_and_time() {
        let t = Tombstone {
            format: VERSION_FORMAT,
            replica: "acme/app.db".into(),
            number: 3,
            created_at: 1_000,
            removed_at: Some(2_000),
        };
        let row = IndexRow::of_slot(&Slot::Removed(t)).expect("a row");
        assert_eq!((row.number, row.removed_at), (3, Some(2_000)));
        assert_eq!(row.info(), VersionInfo::bare(3, 1_000));
        assert!(
            IndexRow::of_slot(&Slot::Missing).is_none(),
            "no object, no row"
        );
    }

    #[test]
    fn a_version_row_carries_what_versions_lists() {
        let v = VersionObject {
            format: VERSION_FORMAT,
            replica: "acme/app.db".into(),
            number: 2,
            page_size: 4096,
            page_count: 10,
            digest: "ab".into(),
            digest2: "c:cd".into(),
            message: "m".into(),
            created_at: 7,
            client_id: "c".into(),
            key_id: "k".into(),
            base: 1,
            chunks: vec![],
            packs: vec![],
            encryption_key_id: None,
            seal: None,
        };
        assert_eq!(IndexRow::of(&v).info(), v.info());
    }
}
