//! Retention and prune: policies set and shown, versions removed (never the latest),
//! pages no version uses freed from the disk, every kept version still whole; over the
//! embedded store and a real server (admin key versus PUSH key); pushes and pulls
//! racing a prune; stored bytes in `versions`; a pull by time.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use sqlferry::engine::{NoProgress, sync_local};
use sqlferry::store::{ReplicaPath, Selector, Store};
use tempfile::TempDir;

use crate::server::{Machine, TestServer, assert_fails, saved_push_key};
use crate::util::{self, Mode};

const REPLICA: &str = "acme/app.db";

/// A test's directory: a database `app.db` and an embedded store `store/`.
struct Bench {
    dir: TempDir,
}

impl Bench {
    fn new() -> Bench {
        let b = Bench {
            dir: TempDir::new().expect("tempdir"),
        };
        let conn = util::create(&b.db(), 4096, Mode::Rollback);
        util::fill(&conn, 400 * 1024, 3000);
        b
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn db(&self) -> PathBuf {
        self.path().join("app.db")
    }

    fn store_dir(&self) -> PathBuf {
        self.path().join("store")
    }

    fn store(&self) -> Store {
        Store::new(self.store_dir())
    }

    /// `sqlferry ARGS… --server file:///…/store`.
    fn run(&self, args: &[&str]) -> Output {
        util::sqlferry(self.path())
            .args(args)
            .arg("--server")
            .arg(format!("file://{}", self.store_dir().display()))
            .output()
            .expect("run sqlferry")
    }

    /// [`Bench::run`] with `--json`, asserted to succeed: its JSON.
    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.run(&all);
        assert_eq!(
            util::code(&out),
            0,
            "{args:?}: {}{}",
            util::stderr(&out),
            util::stdout(&out)
        );
        serde_json::from_str(util::stdout(&out).trim()).expect("one JSON value")
    }

    /// Changes about a quarter of the database (new random rows over old ones), then
    /// pushes it: (version, digest).
    fn change_and_push(&self) -> (u64, String) {
        change(&self.db());
        let db = self.db();
        let report = self.json(&["push", db.to_str().expect("UTF-8"), REPLICA]);
        (
            report["version"].as_u64().expect("version"),
            report["digest"].as_str().expect("digest").to_owned(),
        )
    }

    /// Pulls `spec` into a new file; asserts its digest and integrity.
    fn assert_pulls(&self, spec: &str, digest: &str) {
        let file = self
            .path()
            .join(format!("pulled-{}.db", spec.replace(['/', '@', ':'], "_")));
        let _ = std::fs::remove_file(&file);
        let report = self.json(&["pull", spec, file.to_str().expect("UTF-8")]);
        assert_eq!(report["digest"].as_str(), Some(digest), "{spec}");
        assert_eq!(util::digest(&file), digest, "{spec}: the file holds it");
        assert_eq!(util::integrity(&file), "ok", "{spec}");
    }

    fn scrub_clean(&self) {
        let out = util::sqlferry(self.path())
            .args(["scrub", "--json", "--data"])
            .arg(self.store_dir())
            .output()
            .expect("scrub");
        assert_eq!(util::code(&out), 0, "scrub: {}", util::stdout(&out));
    }

    fn version_numbers(&self) -> Vec<u64> {
        self.json(&["versions", REPLICA])
            .as_array()
            .expect("an array")
            .iter()
            .map(|v| v["number"].as_u64().expect("number"))
            .collect()
    }
}

/// Replaces about a quarter of `t`'s rows with new random ones.
fn change(db: &Path) {
    let conn = util::open(db);
    conn.execute_batch(
        "DELETE FROM t WHERE id IN (SELECT id FROM t ORDER BY random() LIMIT (SELECT count(*) / 4 FROM t));",
    )
    .expect("delete");
    util::insert_rows(&conn, 35, 3000);
}

/// The disk space the files under `dir` take, as the file system counts it
/// (allocated blocks, like `du`).
fn allocated(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let m = entry.metadata().expect("metadata");
        total += if m.is_dir() {
            allocated(&entry.path())
        } else {
            m.blocks() * 512
        };
    }
    total
}

#[test]
fn prune_over_the_embedded_store_frees_the_disk_and_keeps_every_kept_version_whole() {
    let b = Bench::new();
    let pushed: Vec<(u64, String)> = (0..6).map(|_| b.change_and_push()).collect();
    assert_eq!(b.version_numbers(), [1, 2, 3, 4, 5, 6]);

    // Nothing set: everything is kept, and prune removes nothing.
    let shown = b.json(&["retention", REPLICA]);
    assert_eq!(shown["source"], "none");
    assert_eq!(
        b.json(&["prune", REPLICA])["removed"],
        serde_json::json!([])
    );

    let set = b.json(&["retention", REPLICA, "--keep-last", "2"]);
    assert_eq!(set["policy"]["keep_last"], 2);
    assert_eq!(set["source"], "replica");
    let text = util::stdout(&b.run(&["retention", REPLICA]));
    assert_eq!(text.trim(), "acme/app.db: keep-last=2 (its own)");

    // A dry run says what would go and changes nothing.
    let before = allocated(&b.store_dir().join("pages"));
    let dry = b.json(&["prune", REPLICA, "--dry-run"]);
    assert_eq!(dry["removed"], serde_json::json!([1, 2, 3, 4]));
    assert_eq!(dry["dry_run"], true);
    let would_free = dry["freed_bytes"].as_u64().expect("freed_bytes");
    assert!(would_free >= 4 * 4096 * 30, "would free {would_free}");
    assert_eq!(b.version_numbers(), [1, 2, 3, 4, 5, 6]);
    assert_eq!(allocated(&b.store_dir().join("pages")), before);

    let out = b.run(&["prune", REPLICA]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let text = util::stdout(&out);
    assert!(
        text.contains("removed 4 versions: 1 to 4; 2 kept"),
        "{text}"
    );
    assert!(text.contains("freed "), "{text}");
    assert_eq!(b.version_numbers(), [5, 6]);
    // The bytes freed left the disk: the pages are 4096 bytes at 4096-byte offsets,
    // so each one freed is a whole block given back.
    let after = allocated(&b.store_dir().join("pages"));
    assert!(
        before - after >= would_free - would_free / 10,
        "allocated {before} → {after}, {would_free} freed"
    );

    for (n, digest) in &pushed[4..] {
        b.assert_pulls(&format!("{REPLICA}@{n}"), digest);
    }
    let out = b.run(&["pull", &format!("{REPLICA}@2"), "gone.db"]);
    let err = util::stderr(&out);
    assert_eq!(util::code(&out), 8, "{err}");
    assert!(
        err.contains("acme/app.db@2 was removed by the replica's retention policy; the versions kept are 5, 6"),
        "{err}"
    );
    assert!(!b.path().join("gone.db").exists());
    b.scrub_clean();

    // Pruning again frees nothing more.
    let again = b.json(&["prune", REPLICA]);
    assert_eq!(again["removed"], serde_json::json!([]));
    assert_eq!(again["freed_bytes"], 0);
}

#[test]
fn the_policy_is_applied_after_each_new_version_and_never_removes_the_latest() {
    let b = Bench::new();
    b.change_and_push();
    b.json(&["retention", REPLICA, "--keep-last", "2"]);
    let mut last = (0, String::new());
    for _ in 0..3 {
        last = b.change_and_push();
    }
    assert_eq!(
        b.version_numbers(),
        [3, 4],
        "each push removed what the policy drops"
    );
    b.assert_pulls(REPLICA, &last.1);
    b.scrub_clean();

    // A span that keeps nothing of these still keeps the latest.
    b.json(&["retention", REPLICA, "--keep-within", "1s"]);
    let store = b.store();
    let replica = ReplicaPath::parse(REPLICA).expect("valid");
    let far_future = sqlferry::epoch::now() + 10 * 86_400;
    let report = store
        .prune(
            &replica,
            false,
            far_future,
            std::time::Duration::from_secs(5),
        )
        .expect("prune");
    assert_eq!(report.removed, [3]);
    assert_eq!(b.version_numbers(), [4]);
    b.assert_pulls(REPLICA, &last.1);

    // Back to the store's default: a default set with --default applies.
    let d = b.json(&["retention", "--default", "--keep-last", "5"]);
    assert_eq!(d["default"]["keep_last"], 5);
    let shown = b.json(&["retention", REPLICA, "--use-default"]);
    assert_eq!(shown["source"], "default");
    assert_eq!(shown["policy"]["keep_last"], 5);
}

#[test]
fn versions_show_the_bytes_each_version_stores_and_the_replica_total() {
    let b = Bench::new();
    for _ in 0..3 {
        b.change_and_push();
    }
    let versions = b.json(&["versions", REPLICA]);
    let stored: Vec<u64> = versions
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v["stored_bytes"].as_u64().expect("stored_bytes"))
        .collect();
    let page_count = util::page_count(&b.db()) as u64;
    // The first version stores all its pages (the lock-byte page is never stored, and
    // this database has none); later ones only what changed: far less, not nothing.
    assert!(stored[0] >= (page_count - 40) * 4096, "{stored:?}");
    for s in &stored[1..] {
        assert!(*s > 0 && *s < stored[0] / 2, "{stored:?}");
    }
    let total: u64 = stored.iter().sum();
    let replica = ReplicaPath::parse(REPLICA).expect("valid");
    let store = b.store();
    assert_eq!(store.stored_bytes(&replica).expect("stored bytes"), total);
    // Asked again after a new version (the same Store, which keeps the figure), it
    // counts the new version's pages too.
    b.change_and_push();
    let sum: u64 = b
        .json(&["versions", REPLICA])
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v["stored_bytes"].as_u64().expect("stored_bytes"))
        .sum();
    assert!(sum > total);
    assert_eq!(store.stored_bytes(&replica).expect("stored bytes"), sum);
    let text = util::stdout(&b.run(&["versions", REPLICA]));
    assert!(
        text.lines().next().unwrap_or("").contains("stored"),
        "{text}"
    );
    assert!(text.contains("4 versions, "), "{text}");
}

/// Sets the creation time of version `n` in the replica file (versions made at known
/// times, without waiting for days to pass).
fn set_created_at(file: &Path, n: u64, at: i64) {
    let conn = rusqlite::Connection::open(file).expect("replica file");
    conn.execute(
        "UPDATE versions SET created_at = ?1 WHERE number = ?2",
        rusqlite::params![at, n as i64],
    )
    .expect("update");
}

#[test]
fn a_version_is_pulled_by_time_and_a_time_whose_version_was_removed_is_refused() {
    let b = Bench::new();
    let pushed: Vec<(u64, String)> = (0..4).map(|_| b.change_and_push()).collect();
    let file = b
        .store()
        .replica_file(&ReplicaPath::parse(REPLICA).expect("valid"));
    // Versions 1 to 4 made on 2026-11-28, 11-29, 11-30 (twice) at 10:00 UTC.
    let day = |d: i64| 1_795_860_000 + d * 86_400; // 2026-11-28T10:00:00Z
    for (n, at) in [(1, day(0)), (2, day(1)), (3, day(2)), (4, day(2) + 60)] {
        set_created_at(&file, n, at);
    }
    b.assert_pulls(&format!("{REPLICA}@2026-11-29T12:00:00Z"), &pushed[1].1);
    b.assert_pulls(&format!("{REPLICA}@2026-11-30T10:00:30Z"), &pushed[2].1);
    let out = b.run(&["pull", &format!("{REPLICA}@2026-11-01T00:00:00Z"), "old.db"]);
    assert_eq!(util::code(&out), 8, "{}", util::stderr(&out));
    assert!(util::stderr(&out).contains("no version is that old"));

    // One a day keeps 4 (the newest of 11-30), 2 and 1; version 3 goes.
    b.json(&["retention", REPLICA, "--keep-daily", "3"]);
    assert_eq!(
        b.json(&["prune", REPLICA])["removed"],
        serde_json::json!([3])
    );
    // The version current at that time is gone: an older one would be the wrong
    // content, so the pull is refused.
    let out = b.run(&["pull", &format!("{REPLICA}@2026-11-30T10:00:30Z"), "t.db"]);
    let err = util::stderr(&out);
    assert_eq!(util::code(&out), 8, "{err}");
    assert!(
        err.contains("@3 was removed by the replica's retention policy"),
        "{err}"
    );
    b.assert_pulls(&format!("{REPLICA}@2026-11-30T12:00:00Z"), &pushed[3].1);
    b.assert_pulls(&format!("{REPLICA}@2026-11-29T12:00:00Z"), &pushed[1].1);
}

#[test]
fn a_pull_reading_a_version_being_pruned_finishes_with_the_right_digest() {
    let b = Bench::new();
    let pushed: Vec<(u64, String)> = (0..3).map(|_| b.change_and_push()).collect();
    b.json(&["retention", REPLICA, "--keep-last", "1"]);
    let store = b.store();
    let replica = ReplicaPath::parse(REPLICA).expect("valid");
    // A pull of version 1 has begun (its reader holds the store's GC lock shared).
    let mut reader = store.read(&replica, Selector::Number(1)).expect("reader");
    // A prune meanwhile removes the version, but cannot free its pages yet.
    let report = store
        .prune(
            &replica,
            false,
            sqlferry::epoch::now(),
            std::time::Duration::ZERO,
        )
        .expect("prune");
    assert_eq!(report.removed, [1, 2]);
    assert!(report.deferred.is_some(), "{report:?}");
    assert_eq!(report.freed_bytes, 0);
    // The pull finishes, whole.
    let target = b.path().join("during.db");
    let mut writer = sqlferry::page::Writer::open(&target).expect("writer");
    sync_local(&mut reader, &mut writer, &NoProgress).expect("the pull finishes");
    drop(reader);
    assert_eq!(util::digest(&target), pushed[0].1);
    assert_eq!(util::integrity(&target), "ok");
    // A new pull of it is refused; the next prune frees the pages.
    let err = store
        .read(&replica, Selector::Number(1))
        .err()
        .expect("gone");
    assert!(
        err.to_string()
            .contains("removed by the replica's retention policy"),
        "{err}"
    );
    let report = store
        .prune(
            &replica,
            false,
            sqlferry::epoch::now(),
            std::time::Duration::from_secs(5),
        )
        .expect("prune");
    assert!(
        report.deferred.is_none() && report.freed_bytes > 0,
        "{report:?}"
    );
    b.assert_pulls(REPLICA, &pushed[2].1);
    b.scrub_clean();
}

#[test]
fn pushes_and_pulls_racing_prunes_in_other_processes_stay_correct() {
    let b = Bench::new();
    b.change_and_push();
    b.json(&["retention", REPLICA, "--keep-last", "2"]);
    let db = b.db();
    std::thread::scope(|s| {
        let pusher = s.spawn(|| {
            let mut digests = Vec::new();
            for _ in 0..8 {
                digests.push(b.change_and_push());
            }
            digests
        });
        let pruner = s.spawn(|| {
            for _ in 0..8 {
                let out = b.run(&["prune", REPLICA, "--json"]);
                assert_eq!(util::code(&out), 0, "prune: {}", util::stderr(&out));
            }
        });
        // Pulls of the latest meanwhile: each finishes with a version's digest, or
        // is refused because that version was removed before it began: never a torn
        // result, never a page reported damaged.
        let puller = s.spawn(|| {
            let target = b.path().join("follow.db");
            for _ in 0..8 {
                let out = b.run(&[
                    "pull",
                    REPLICA,
                    target.to_str().expect("UTF-8"),
                    "--json",
                    "--force",
                ]);
                let err = util::stderr(&out);
                match util::code(&out) {
                    0 => assert_eq!(util::integrity(&target), "ok"),
                    8 => assert!(
                        err.contains("removed by the replica's retention policy"),
                        "{err}"
                    ),
                    other => panic!("pull exited {other}: {err}"),
                }
            }
        });
        pruner.join().expect("pruner");
        puller.join().expect("puller");
        let digests = pusher.join().expect("pusher");
        let last = digests.last().expect("pushed");
        assert_eq!(util::digest(&db), last.1);
        let kept = b.version_numbers();
        assert_eq!(kept.len(), 2, "{kept:?}");
        for (n, digest) in digests.iter().filter(|(n, _)| kept.contains(n)) {
            b.assert_pulls(&format!("{REPLICA}@{n}"), digest);
        }
    });
    // One more prune after the race frees whatever the busy ones left.
    b.json(&["prune", REPLICA]);
    b.scrub_clean();
}

#[test]
fn over_a_server_only_the_admin_key_sets_a_policy_or_prunes() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let m = Machine::new(dir.path(), "laptop");
    let db = m.path("app.db");
    {
        let conn = util::create(&db, 4096, Mode::Rollback);
        util::fill(&conn, 400 * 1024, 3000);
    }
    let admin = server.admin_key.clone();
    m.push(&server, "app.db", REPLICA, &["--key", &admin]);
    let mut digests = Vec::new();
    for _ in 0..3 {
        change(&db);
        // The saved PUSH key from here on.
        digests.push(m.push(&server, "app.db", REPLICA, &[]).digest().to_owned());
    }
    let push_key = saved_push_key(&m, &db);
    // Versions 1 to 4 made on 2026-11-28 to 12-01, 10:00 UTC (for the pulls by time).
    let file = server.replica_file(REPLICA);
    for n in 1..=4u64 {
        set_created_at(&file, n, 1_795_860_000 + (n as i64 - 1) * 86_400);
    }

    // The PUSH key may show the policy, not change it, nor prune.
    let out = m.run_on(&server, ["retention", REPLICA, "--json"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(shown["source"], "none");
    let out = m.run_on(&server, ["retention", REPLICA, "--keep-last", "1"]);
    assert_fails(
        &out,
        5,
        "only the admin key may set a retention policy; this is a PUSH key",
    );
    let out = m.run_on(&server, ["prune", REPLICA, "--key", &push_key]);
    assert_fails(&out, 5, "only the admin key may prune");
    assert_eq!(server.version_numbers(REPLICA), [1, 2, 3, 4]);

    // The admin key does both.
    let out = m.run_on(
        &server,
        ["retention", REPLICA, "--keep-last", "2", "--key", &admin],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let out = m.run_on(&server, ["prune", REPLICA, "--json", "--key", &admin]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["removed"], serde_json::json!([1, 2]));
    assert!(
        report["freed_bytes"].as_u64().expect("freed") > 0,
        "{report}"
    );
    assert_eq!(server.version_numbers(REPLICA), [3, 4]);
    let versions = server.versions(REPLICA).expect("versions");
    assert!(
        versions
            .iter()
            .all(|v| v.stored_bytes.is_some_and(|b| b > 0)),
        "{versions:?}"
    );

    // Kept versions pull whole; a removed one is refused with exit 8.
    for (n, digest) in [(3, &digests[1]), (4, &digests[2])] {
        let local = format!("v{n}.db");
        let report = m.pull(&server, &format!("{REPLICA}@{n}"), Some(&local), &[]);
        assert_eq!(report.digest(), digest);
        assert_eq!(util::integrity(&m.path(&local)), "ok");
    }
    let out = m.run_on(&server, ["pull", &format!("{REPLICA}@1"), "v1.db"]);
    assert_fails(
        &out,
        8,
        "was removed by the replica's retention policy; the versions kept are 3, 4",
    );

    // By time: the version that was the latest then, or a refusal when it was removed.
    let report = m.pull(
        &server,
        &format!("{REPLICA}@2026-11-30T12:00:00Z"),
        Some("t3.db"),
        &[],
    );
    assert_eq!(report.digest(), digests[1], "version 3");
    let report = m.pull(
        &server,
        &format!("{REPLICA}@2026-12-02T00:00:00Z"),
        Some("t4.db"),
        &[],
    );
    assert_eq!(report.digest(), digests[2], "version 4");
    let out = m.run_on(
        &server,
        ["pull", &format!("{REPLICA}@2026-11-29T12:00:00Z"), "t2.db"],
    );
    assert_fails(
        &out,
        8,
        "acme/app.db@2 was removed by the replica's retention policy",
    );

    // A later push applies the policy on the server too.
    change(&db);
    m.push(&server, "app.db", REPLICA, &[]);
    assert_eq!(server.version_numbers(REPLICA), [4, 5]);
}

#[test]
fn a_prune_killed_at_any_moment_leaves_every_kept_version_whole() {
    let b = Bench::new();
    let pushed: Vec<(u64, String)> = (0..8).map(|_| b.change_and_push()).collect();
    b.json(&["retention", REPLICA, "--keep-last", "6"]);
    let store_url = format!("file://{}", b.store_dir().display());
    // Prunes killed (SIGKILL: no cleanup) ever later into their run; the policy
    // tightens each time, so each one has versions to remove and pages to free.
    for (i, delay_ms) in [0u64, 3, 10, 25, 60].into_iter().enumerate() {
        let keep = (5 - i).to_string();
        b.json(&["retention", REPLICA, "--keep-last", &keep]);
        let mut child = util::sqlferry(b.path())
            .args(["prune", REPLICA, "--server", &store_url])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn prune");
        // The moment of the kill, not a wait for an event: any moment must do.
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        child.wait().expect("reaped");
        b.scrub_clean();
        for (n, digest) in &pushed {
            if b.version_numbers().contains(n) {
                b.assert_pulls(&format!("{REPLICA}@{n}"), digest);
            }
        }
    }
    // A prune that runs to its end finishes what the killed ones left.
    let before = allocated(&b.store_dir().join("pages"));
    b.json(&["prune", REPLICA]);
    assert_eq!(b.version_numbers(), [8]);
    let dry = b.json(&["prune", REPLICA, "--dry-run"]);
    assert_eq!(dry["freed_bytes"], 0, "nothing unused is left indexed");
    assert!(allocated(&b.store_dir().join("pages")) <= before);
    b.assert_pulls(REPLICA, &pushed[7].1);
    b.scrub_clean();
}

#[test]
fn pull_help_shows_every_way_to_name_a_version() {
    let dir = TempDir::new().expect("tempdir");
    let out = util::sqlferry(dir.path())
        .args(["pull", "--help"])
        .output()
        .expect("help");
    let help = util::stdout(&out);
    for form in ["acme/app.db@3 ", "@latest-1 ", "@2026-12-01T10:00:00Z "] {
        assert!(help.contains(form), "{form} in:\n{help}");
    }
}
