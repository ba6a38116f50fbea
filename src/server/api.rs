//! What the API tells of a replica: one summary, the same object in the list
//! (`GET /api/replicas`) and for one replica (`GET /api/replicas/<path>`), built by
//! [`summary`] from what the store and the hub know. The dashboard (`/`) shows it.
//!
//! The list is cheap: one directory walk, then one small row per replica file (its
//! latest version and the version count, never a manifest or a page), and what the
//! hub holds in memory. It holds the store's replicas and those the hub knows of
//! (a subscriber waiting for a first version, a push subscriber whose first push
//! keeps failing), in path order. A replica file that cannot be read is listed with
//! its `error`, so one damaged file does not hide every other replica.

use serde::Serialize;

use super::drill::{DrillResult, Drills};
use super::{Hub, Status};
use crate::Result;
use crate::store::{AnyStore, Latest, ReplicaPath};

/// One replica's summary, as the API answers it (field names are a contract with the
/// dashboard and with scripts: see docs/server.md).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// The replica's path, `namespace/name`.
    pub replica: String,
    /// The latest version's number; `None` before the first version.
    pub latest_version: Option<u64>,
    /// When the latest version was made (Unix seconds).
    pub latest_at: Option<i64>,
    /// How many versions the replica has.
    pub version_count: u64,
    /// The latest version's database size in bytes (page size × page count).
    pub size_bytes: Option<u64>,
    /// The latest version's digest, lower-case hex.
    pub digest: Option<String>,
    /// The bytes of the distinct pages the replica's versions use, as stored
    /// ([`crate::store::Store::stored_bytes`]: counted once per set of versions, then
    /// kept; `None` on an S3 store, which counts none yet).
    pub stored_bytes: Option<u64>,
    /// What the hub knows: subscribers connected, the planned push, the failure report.
    #[serde(flatten)]
    pub status: Status,
    /// The last restore drill of the replica (`serve --drill-every`); `None` before
    /// its first.
    pub last_drill: Option<DrillResult>,
    /// Why the replica's file could not be read, when it could not (the other fields
    /// then hold only what the hub knows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The summary of `replica`, from its latest version and count (`None`: no version
/// yet), the hub's status and its last restore drill.
pub fn summary(
    replica: &str,
    latest: Option<&Latest>,
    status: Status,
    last_drill: Option<DrillResult>,
) -> Summary {
    let version = latest.map(|l| &l.version);
    let mut status = status;
    if let Some(v) = version {
        behind_the_store(&mut status, v.number, v.created_at, crate::epoch::now());
    }
    Summary {
        replica: replica.to_owned(),
        latest_version: version.map(|v| v.number),
        latest_at: version.map(|v| v.created_at),
        version_count: latest.map_or(0, |l| l.count),
        size_bytes: version.map(|v| v.size),
        digest: version.map(|v| v.digest.clone()),
        stored_bytes: None,
        status,
        last_drill,
        error: None,
    }
}

/// A follower the hub counts as current (lag 0) although the store holds a later
/// version than it applied: a version the hub never heard of (pushed into the data
/// directory by another process). Its lag is at least the age of the store's latest
/// version, so it is shown as that, not as 0.
fn behind_the_store(status: &mut Status, latest: u64, latest_at: i64, now: i64) {
    let age = u64::try_from(now - latest_at).unwrap_or(0);
    for f in &mut status.followers {
        if let (Some(applied), Some(lag)) = (f.applied_version, f.lag_seconds.as_mut())
            && applied < latest
        {
            *lag = (*lag).max(age);
        }
    }
}

/// Every replica's summary, in path order: `replicas` (the store's, as
/// `State::replicas` lists them) and those the hub knows of. Blocking (it reads the
/// store). A replica that cannot be read gives a summary with `error`.
pub fn list(
    store: &AnyStore,
    replicas: Vec<ReplicaPath>,
    hub: &Hub,
    drills: &Drills,
) -> Result<Vec<Summary>> {
    let mut names: Vec<String> = replicas.iter().map(|r| r.as_str().to_owned()).collect();
    names.extend(hub.replicas());
    names.sort();
    names.dedup();
    let mut summaries = Vec::with_capacity(names.len());
    for name in names {
        // The hub only holds paths a session checked: a parse error is never met.
        let (read, path) = match ReplicaPath::parse(&name) {
            Ok(path) => (store.latest(&path), Some(path)),
            Err(e) => (Err(e), None),
        };
        let status = hub.status(&name);
        let drill = drills.last(&name);
        let s = match read {
            Ok(Some(latest)) => Summary {
                stored_bytes: path.and_then(|p| store.stored_bytes(&p).ok()),
                ..summary(&name, Some(&latest), status, drill)
            },
            Ok(None) if status == Status::default() => continue, // no version, no one
            Ok(None) => summary(&name, None, status, drill),
            Err(e) => Summary {
                error: Some(e.to_string()),
                ..summary(&name, None, status, drill)
            },
        };
        summaries.push(s);
    }
    Ok(summaries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::control::SubscriberRole;

    #[test]
    fn a_summary_has_every_contract_field() {
        let latest = Latest {
            version: crate::store::VersionInfo {
                number: 7,
                page_size: 4096,
                page_count: 3,
                size: 12_288,
                digest: "ab12".into(),
                digest2: None,
                message: "m".into(),
                created_at: 1_764_700_000,
                client_id: "me@here".into(),
                key_id: "k".into(),
                base: 6,
                stored_bytes: None,
                merged_into: None,
                encryption: None,
            },
            count: 7,
        };
        let hub = Hub::default();
        let _member = hub.join("acme/app.db", SubscriberRole::Pull);
        let s = summary(
            "acme/app.db",
            Some(&latest),
            hub.status("acme/app.db"),
            None,
        );
        let json = serde_json::to_value(&s).expect("serializes");
        assert_eq!(
            json,
            serde_json::json!({
                "replica": "acme/app.db",
                "latest_version": 7,
                "latest_at": 1_764_700_000,
                "version_count": 7,
                "size_bytes": 12_288,
                "digest": "ab12",
                "stored_bytes": null,
                "push_subscribers": 0,
                "pull_subscribers": 1,
                "expected_push_at": null,
                "failure": null,
                "followers": [
                    {"applied_version": null, "applied_at": null, "lag_seconds": null}
                ],
                "last_drill": null,
            })
        );
        let none = serde_json::to_value(summary("acme/new.db", None, Status::default(), None))
            .expect("serializes");
        assert_eq!(
            (
                &none["latest_version"],
                &none["version_count"],
                &none["size_bytes"]
            ),
            (
                &serde_json::Value::Null,
                &serde_json::json!(0),
                &serde_json::Value::Null
            )
        );
    }

    #[test]
    fn a_follower_behind_a_version_the_hub_never_heard_of_is_not_current() {
        let follower = |applied, lag| crate::server::FollowerStatus {
            applied_version: applied,
            applied_at: Some(900),
            lag_seconds: lag,
        };
        let mut status = Status {
            followers: vec![
                follower(Some(2), Some(0)),
                follower(Some(3), Some(0)),
                follower(Some(1), Some(500)),
                follower(None, None),
            ],
            ..Status::default()
        };
        behind_the_store(&mut status, 3, 1_000, 1_060);
        let lags: Vec<_> = status.followers.iter().map(|f| f.lag_seconds).collect();
        assert_eq!(lags, [Some(60), Some(0), Some(500), None]);
    }

    #[test]
    fn the_list_holds_the_store_and_the_hub_in_path_order() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let store = crate::store::Store::new(dir.path());
        let any = AnyStore::Dir(store.clone());
        let hub = Hub::default();
        let drills = Drills::open(dir.path()).expect("the drills table");
        let replicas = || store.replicas().expect("the store lists");
        assert_eq!(
            list(&any, replicas(), &hub, &drills).expect("an empty store lists"),
            vec![]
        );
        // A file that is no replica database: listed, with the reason.
        let file = store.replica_file(&ReplicaPath::parse("acme/zz.db").expect("valid"));
        std::fs::create_dir_all(file.parent().expect("a parent")).expect("mkdir");
        std::fs::write(&file, b"not a database, not even close: 32+ bytes").expect("write");
        let _waiting = hub.join("acme/new.db", SubscriberRole::Pull);
        drop(hub.join("acme/left.db", SubscriberRole::Pull));
        let listed = list(&any, replicas(), &hub, &drills).expect("lists");
        let names: Vec<&str> = listed.iter().map(|s| s.replica.as_str()).collect();
        assert_eq!(names, ["acme/new.db", "acme/zz.db"]);
        assert_eq!(listed[0].status.pull_subscribers, 1);
        assert_eq!(listed[0].error, None);
        let error = listed[1]
            .error
            .as_deref()
            .expect("an error for the bad file");
        assert!(error.contains("zz.db"), "{error}");
        assert_eq!(listed[1].latest_version, None);
    }
}
