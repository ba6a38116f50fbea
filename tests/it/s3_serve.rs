//! `sqlferry serve --store s3://BUCKET/PREFIX --s3-endpoint URL` as real processes over
//! the real SeaweedFS of `seaweed` (a bucket per test): real WAL databases pushed and
//! pulled with the CLI (rows, `PRAGMA integrity_check`, digests), by `@1` and
//! `@latest`; a 1% change writing only a handful of objects (counted by listing the
//! bucket, which the server itself never does); what the S3 store cannot do yet
//! refused with its name and exit 2; two servers over one bucket sharing a real
//! PostgreSQL (`postgres`): a push to one pulled from the other, and two pushes
//! racing on the two (one version, one VERSION_CONFLICT), and one of them killed
//! half-way through a push (no version, the other serves on, the push made again
//! through it); a bad endpoint or key stopping the start with exit 10 and no admin key
//! made; a server whose `--data` is lost starting again on an empty one and serving
//! every version; a pull subscriber on one server following pushes made through the
//! other, and a sync-now reaching it.
//!
//! Every wait is on an event (a line, a process exit); nothing sleeps.

use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use futures_util::TryStreamExt as _;
use object_store::ObjectStore as _;
use tempfile::TempDir;

use crate::postgres;
use crate::seaweed::{self, ACCESS_KEY, SECRET_KEY};
use crate::server::kill::start_push;
use crate::server::{
    DbState, EXIT_CONFLICT, EXIT_USAGE, Machine, TestServer, assert_fails, exec, saved_push_key,
    sidecar_field, small_db, wait_for_exit,
};
use crate::subscribe::{Subscriber, http};
use crate::util;

/// Exit code: the server failed on its own side (docs/exit-codes.md).
const EXIT_SERVER: i32 = 10;

/// How long a command may take here (a debug build on a busy CI).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// The credentials of the test SeaweedFS, as a server's environment.
pub fn aws_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ("AWS_REGION", "us-east-1"),
    ]
}

/// A new bucket of this test's own, with the prefix `sqlferry`: `s3://NAME/sqlferry`.
pub fn new_location() -> String {
    format!("{}/sqlferry", seaweed::shared().bucket())
}

/// A `serve --store LOCATION --s3-endpoint …` named `name`, data in `dir/NAME-data`,
/// with `extra` arguments.
pub fn s3_server(
    dir: &Path,
    name: &str,
    location: &str,
    extra: &[&str],
    admin_key: Option<&str>,
) -> TestServer {
    let mut args = vec![
        "--store",
        location,
        "--s3-endpoint",
        &seaweed::shared().endpoint,
    ];
    args.extend_from_slice(extra);
    let data = dir.join(format!("{name}-data"));
    TestServer::start_named(dir, name, &data, &args, &aws_env(), admin_key)
}

/// Every object under `location` (`s3://BUCKET/PREFIX`), its name from the bucket's
/// root and its size, by a LIST of the test's own (the server never lists).
pub fn objects_under(location: &str) -> Vec<(String, u64)> {
    list_under(location).expect("list the bucket")
}

fn list_under(location: &str) -> object_store::Result<Vec<(String, u64)>> {
    let rest = location.strip_prefix("s3://").expect("an s3:// location");
    let (bucket, prefix) = rest.split_once('/').expect("a prefix");
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region("us-east-1")
        .with_endpoint(&seaweed::shared().endpoint)
        .with_allow_http(true)
        .with_virtual_hosted_style_request(false)
        .with_access_key_id(ACCESS_KEY)
        .with_secret_access_key(SECRET_KEY)
        .build()
        .expect("a client of the test bucket");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let prefix = object_store::path::Path::from(prefix);
    let mut listed: Vec<(String, u64)> = runtime
        .block_on(store.list(Some(&prefix)).try_collect::<Vec<_>>())?
        .into_iter()
        .map(|m| (m.location.to_string(), m.size))
        .collect();
    listed.sort();
    Ok(listed)
}

/// `app.db` of `m`: about `bytes` of rows in a WAL database, with a last change left
/// in its WAL (not checkpointed) as long as the connection returned stays open, so a
/// push reads pages from the WAL too.
pub fn wal_db(m: &Machine, bytes: u64) -> (DbState, rusqlite::Connection) {
    let path = m.path("app.db");
    small_db(&path, bytes);
    let writer = util::open(&path);
    writer
        .pragma_update(None, "wal_autocheckpoint", 0)
        .expect("no automatic checkpoint");
    writer
        .execute_batch("UPDATE t SET v = randomblob(300) WHERE id <= 20")
        .expect("a change");
    assert!(
        util::file_len(&util::sidecar(&path, "-wal")) > 0,
        "the last change is in the WAL"
    );
    (DbState::of(&path), writer)
}

fn finish(mut child: Child) -> Output {
    wait_for_exit(&mut child, COMMAND_TIMEOUT).expect("the command ends");
    child.wait_with_output().expect("its output")
}

#[test]
fn a_server_over_s3_pushes_and_pulls_every_selector_and_a_small_change_writes_few_objects() {
    let dir = TempDir::new().expect("tempdir");
    let location = new_location();
    let server = s3_server(dir.path(), "s3", &location, &[], None);
    // The start wrote the marker, and nothing else.
    let names: Vec<String> = objects_under(&location)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["sqlferry/sqlferry-store.json"]);
    assert!(
        !server.data_dir().join("replicas").exists(),
        "no page or version in --data"
    );

    let origin = Machine::new(dir.path(), "origin");
    let (one, _writer) = wal_db(&origin, 3 << 20);
    let r = origin.push(
        &server,
        "app.db",
        "acme/app.db",
        &["-m", "one", "--key", &server.admin_key],
    );
    assert_eq!(r.u64("version"), 1);
    let after_one = objects_under(&location);
    // The marker, one pack and its index, one chunk (about 1,000 pages), the version.
    assert_eq!(after_one.len(), 5, "{after_one:?}");
    let pack: u64 = after_one
        .iter()
        .filter(|(n, _)| n.ends_with(".pack"))
        .map(|(_, s)| *s)
        .sum();
    let db_bytes = util::file_len(&origin.path("app.db"));
    assert!(
        pack >= db_bytes * 9 / 10,
        "the first pack holds the database: {pack} of {db_bytes}"
    );
    assert!(
        !server.data_dir().join("replicas").exists(),
        "no page or version in --data"
    );

    // A 1% change, left in the WAL: a pack of about its pages, its index, the one chunk
    // that changed, the version. Nothing else.
    let path = origin.path("app.db");
    exec(
        &path,
        "UPDATE t SET v = randomblob(300) WHERE id BETWEEN 5000 AND 5120",
    );
    let two = DbState::of(&path);
    let changed = one.pages_differing(&two);
    assert!(
        changed > 0 && changed * 100 <= two.hashes.len() as u64 * 2,
        "{changed} of {} pages changed",
        two.hashes.len()
    );
    let r = origin.push(
        &server,
        "app.db",
        "acme/app.db",
        &["-m", "two", "--key", &server.admin_key],
    );
    assert_eq!(r.u64("version"), 2);
    assert_eq!(util::digest_like(&path, &r.0["digest"]), r.digest());
    let after_two = objects_under(&location);
    let new: Vec<&(String, u64)> = after_two
        .iter()
        .filter(|o| !after_one.contains(o))
        .collect();
    assert_eq!(new.len(), 4, "pack, index, chunk, version: {new:?}");
    let new_pack = new
        .iter()
        .find(|(n, _)| n.ends_with(".pack"))
        .expect("a new pack");
    assert!(
        new_pack.1 <= (changed + 4) * 4096,
        "the new pack holds the changed pages: {} bytes for {changed} pages",
        new_pack.1
    );
    assert!(
        new.iter()
            .any(|(n, _)| n.ends_with("replicas/acme/app.db/v/2")),
        "{new:?}"
    );
    // A push of nothing new makes no version and writes nothing.
    let r = origin.push(
        &server,
        "app.db",
        "acme/app.db",
        &["--key", &server.admin_key],
    );
    assert_eq!(r.u64("version"), 2);
    assert_eq!(objects_under(&location), after_two);

    // Pulled back by another machine, by each selector.
    let other = Machine::new(dir.path(), "other");
    let key = ["--key", server.admin_key.as_str()];
    let r = other.pull(&server, "acme/app.db@1", Some("v1.db"), &key);
    assert_eq!(r.u64("version"), 1);
    one.assert_held_by(&other.path("v1.db"), "@1");
    let r = other.pull(&server, "acme/app.db@latest", Some("latest.db"), &key);
    assert_eq!(r.u64("version"), 2);
    two.assert_held_by(&other.path("latest.db"), "@latest");
    let r = other.pull(&server, "acme/app.db@latest-1", Some("v1b.db"), &key);
    assert_eq!(r.u64("version"), 1);
    one.assert_held_by(&other.path("v1b.db"), "@latest-1");
    // Into the copy of version 1: only what differs.
    let r = other.pull(&server, "acme/app.db", Some("v1.db"), &key);
    assert_eq!(r.u64("version"), 2);
    two.assert_held_by(&other.path("v1.db"), "v1.db brought to @latest");

    // The version list, and the API's view of the replica (the server's own record).
    let out = other.run_on(
        &server,
        [
            "versions",
            "acme/app.db",
            "--json",
            "--key",
            &server.admin_key,
        ],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let versions: serde_json::Value =
        serde_json::from_str(util::stdout(&out).trim()).expect("JSON");
    let numbers: Vec<u64> = versions
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| v["number"].as_u64().expect("a number"))
        .collect();
    assert_eq!(numbers, [1, 2]);
    assert_eq!(versions[1]["message"], "two");
    let (status, list) = http(&server, "GET", "/api/replicas", &server.admin_key);
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["replicas"][0]["replica"], "acme/app.db");
    assert_eq!(list["replicas"][0]["latest_version"], 2);
    assert_eq!(list["replicas"][0]["version_count"], 2);
    assert_eq!(list["replicas"][0]["stored_bytes"], serde_json::Value::Null);
}

#[test]
fn what_the_s3_store_cannot_do_yet_is_refused_by_name() {
    let dir = TempDir::new().expect("tempdir");
    let location = new_location();
    let server = s3_server(dir.path(), "s3", &location, &[], None);
    let m = Machine::new(dir.path(), "m");
    let _writer = wal_db(&m, 256 << 10);
    let admin = server.admin_key.as_str();
    m.push(&server, "app.db", "acme/app.db", &["--key", admin]);
    let before = objects_under(&location);

    exec(&m.path("app.db"), "DELETE FROM t WHERE id % 5 = 0");
    let out = m.run_on(
        &server,
        ["push", "app.db", "acme/app.db", "--merge", "--key", admin],
    );
    let line = assert_fails(&out, EXIT_USAGE, "not with an S3 store yet");
    assert!(line.contains("push --merge"), "{line}");
    assert_eq!(objects_under(&location), before, "nothing was written");

    // A flag the S3 store cannot serve stops the start, before anything is made.
    let data = dir.path().join("refused-drills");
    let out = m
        .command()
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .args([
            "--store",
            &location,
            "--s3-endpoint",
            &seaweed::shared().endpoint,
        ])
        .args(["--drill-every", "1h"])
        .envs(aws_env())
        .output()
        .expect("run serve");
    let line = assert_fails(&out, EXIT_USAGE, "not with an S3 store yet");
    assert!(line.contains("restore drills"), "{line}");
    assert!(!data.exists(), "nothing was made for --drill-every");
}

#[test]
fn two_servers_over_one_bucket_share_versions_and_race_for_one_number() {
    let pg = postgres::shared();
    let meta = pg.database();
    let dir = TempDir::new().expect("tempdir");
    let location = new_location();
    // Their own data directories (caches apart), one bucket, one metadata store.
    let a = s3_server(dir.path(), "a", &location, &["--meta", &meta], None);
    let b = s3_server(
        dir.path(),
        "b",
        &location,
        &["--meta", &meta],
        Some(&a.admin_key),
    );

    // Pushed to A, pulled from B (an empty cache) with the PULL key A minted.
    let first = Machine::new(dir.path(), "first");
    let (one, _writer) = wal_db(&first, 1 << 20);
    let r = first.push(&a, "app.db", "acme/app.db", &["--key", &a.admin_key]);
    assert_eq!(r.u64("version"), 1);
    let pull_key = sidecar_field(&first.path("app.db-sqlferry"), "key");
    let second = Machine::new(dir.path(), "second");
    let r = second.pull(&b, "acme/app.db", Some("app.db"), &["--key", &pull_key]);
    assert_eq!(r.u64("version"), 1);
    one.assert_held_by(&second.path("app.db"), "pulled from B");
    // B lists the replica (their shared record of replicas).
    let (status, list) = http(&b, "GET", "/api/replicas", &b.admin_key);
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["replicas"][0]["latest_version"], 1);

    // Both machines change their copy of version 1 and push at once, one to each
    // server: one version 2, one VERSION_CONFLICT.
    exec(
        &first.path("app.db"),
        "UPDATE t SET v = randomblob(300) WHERE id < 40",
    );
    exec(&second.path("app.db"), "DELETE FROM t WHERE id % 3 = 0");
    let states = [
        DbState::of(&first.path("app.db")),
        DbState::of(&second.path("app.db")),
    ];
    let spawn = |m: &Machine, server: &TestServer| {
        m.command()
            .args([
                "push",
                "app.db",
                "acme/app.db",
                "--json",
                "--key",
                &a.admin_key,
            ])
            .args(["--server", &server.url])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start push")
    };
    let pushes = [spawn(&first, &a), spawn(&second, &b)];
    let outs: Vec<Output> = pushes.into_iter().map(finish).collect();
    let codes: Vec<i32> = outs.iter().map(util::code).collect();
    let winner = match codes[..] {
        [0, EXIT_CONFLICT] => 0,
        [EXIT_CONFLICT, 0] => 1,
        _ => panic!(
            "one push wins, one conflicts: {codes:?}: {} / {}",
            util::stderr(&outs[0]),
            util::stderr(&outs[1])
        ),
    };
    let loser = &outs[1 - winner];
    assert!(
        util::stderr(loser).contains("VERSION_CONFLICT"),
        "{}",
        util::stderr(loser)
    );
    let won: serde_json::Value =
        serde_json::from_str(util::stdout(&outs[winner]).trim()).expect("JSON");
    assert_eq!(won["version"], 2);
    // Either server serves the winner's database as version 2; there is no version 3.
    for (server, name) in [(&a, "from-a.db"), (&b, "from-b.db")] {
        let third = Machine::new(dir.path(), &format!("third-{name}"));
        let r = third.pull(server, "acme/app.db", Some(name), &["--key", &pull_key]);
        assert_eq!(r.u64("version"), 2);
        states[winner].assert_held_by(&third.path(name), name);
    }
    let versions = objects_under(&location)
        .into_iter()
        .filter(|(n, _)| n.contains("/replicas/acme/app.db/v/"))
        .count();
    assert_eq!(versions, 2);
}

#[test]
fn a_store_that_does_not_answer_stops_the_start_without_an_admin_key() {
    let dir = TempDir::new().expect("tempdir");
    let m = Machine::new(dir.path(), "m");
    let location = new_location();
    let nobody = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        format!("http://{}", l.local_addr().expect("its address"))
    };
    let wrong_secret = [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", "not-the-secret-key-at-all"),
    ];
    for (endpoint, env, phrase) in [
        (
            nobody.as_str(),
            aws_env(),
            "cannot reach the object storage",
        ),
        (
            seaweed::shared().endpoint.as_str(),
            wrong_secret.to_vec(),
            "refused the credentials",
        ),
    ] {
        let data = dir.path().join(format!("data-{}", phrase.len()));
        let child = m
            .command()
            .args(["serve", "--listen", "127.0.0.1:0", "--data"])
            .arg(&data)
            .args(["--store", &location, "--s3-endpoint", endpoint])
            .envs(env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start serve");
        let out = finish(child);
        let line = assert_fails(&out, EXIT_SERVER, phrase);
        assert!(line.contains(&location), "{line}");
        assert!(!line.contains("not-the-secret-key-at-all"), "{line}");
        assert!(
            !data.join("server.db").exists(),
            "no server.db, so no admin key that was never shown"
        );
    }
    // Nothing was written: the bucket is empty, or was never made.
    match list_under(&location) {
        Ok(objects) => assert!(objects.is_empty(), "{objects:?}"),
        Err(e) => assert!(e.to_string().contains("NoSuchBucket"), "{e}"),
    }
}

/// The bytes of the files process `pid` holds open under `dir` that are no longer in
/// it (a push's temporary pack is one: made with `tempfile_in`, never named), read
/// through `/proc/PID/fd`.
fn unnamed_bytes_open(pid: u32, dir: &Path) -> u64 {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    let dir = dir.to_string_lossy().into_owned();
    fds.flatten()
        .filter_map(|fd| {
            let target = std::fs::read_link(fd.path()).ok()?;
            let target = target.to_string_lossy();
            let unnamed = target.starts_with(&dir) && target.ends_with(" (deleted)");
            unnamed.then(|| std::fs::metadata(fd.path()).map(|m| m.len()).ok())?
        })
        .sum()
}

#[test]
fn a_server_over_s3_killed_mid_push_leaves_no_version_and_the_other_keeps_serving() {
    let pg = postgres::shared();
    let meta = pg.database();
    let dir = TempDir::new().expect("tempdir");
    let location = new_location();
    let mut a = s3_server(dir.path(), "a", &location, &["--meta", &meta], None);
    let b = s3_server(
        dir.path(),
        "b",
        &location,
        &["--meta", &meta],
        Some(&a.admin_key),
    );
    let m = Machine::new(dir.path(), "m");
    let reader = Machine::new(dir.path(), "reader");
    small_db(&m.path("app.db"), 256 << 10);
    m.push(
        &a,
        "app.db",
        "acme/app.db",
        &["-m", "one", "--key", &a.admin_key],
    );
    let pull_key = sidecar_field(&m.path("app.db-sqlferry"), "key");
    let push_key = saved_push_key(&m, &m.path("app.db"));
    let one = DbState::of(&m.path("app.db"));

    // The database grows to about 48 MB; A is killed while its push is half-way in
    // (the pages received so far in the push's temporary pack, 8 MiB of them).
    util::fill(&util::open(&m.path("app.db")), 48 << 20, 4000);
    util::checkpoint(&m.path("app.db"));
    let mut push = start_push(&m, &a, "killed with its server");
    let mut ended = None;
    let half_way = util::wait_until(COMMAND_TIMEOUT, Duration::from_millis(2), || {
        ended = push.try_wait().expect("try_wait");
        ended.is_some() || unnamed_bytes_open(a.pid(), a.data_dir()) >= 8 << 20
    });
    assert!(half_way, "the push never got half-way");
    assert!(
        ended.is_none(),
        "the push ended ({ended:?}) before the kill"
    );
    a.sigkill();
    let out = finish(push);
    assert_ne!(util::code(&out), 0, "the push could not finish");

    // No version 2 anywhere: B lists version 1 alone, the bucket holds one version
    // object, and version 1 pulls from B as it was.
    let numbers = |server: &TestServer| {
        server
            .versions("acme/app.db")
            .expect("exists")
            .iter()
            .map(|v| v.number)
            .collect::<Vec<_>>()
    };
    assert_eq!(numbers(&b), [1]);
    let version_objects = |location: &str| {
        objects_under(location)
            .into_iter()
            .filter(|(n, _)| n.contains("/replicas/acme/app.db/v/"))
            .count()
    };
    assert_eq!(version_objects(&location), 1);
    let r = reader.pull(&b, "acme/app.db", Some("v1.db"), &["--key", &pull_key]);
    assert_eq!(r.digest(), one.digest);
    one.assert_held_by(&reader.path("v1.db"), "version 1 from B after A was killed");

    // The push made again through B lands whole.
    let big = DbState::of(&m.path("app.db"));
    let r = m.push(
        &b,
        "app.db",
        "acme/app.db",
        &["-m", "again", "--key", &push_key],
    );
    assert_eq!(r.u64("version"), 2);
    assert_eq!(r.digest(), big.digest);
    let r = reader.pull(&b, "acme/app.db", Some("v2.db"), &["--key", &pull_key]);
    assert_eq!(r.digest(), big.digest);
    assert_eq!(util::integrity(&reader.path("v2.db")), "ok");

    // A started again on the data directory (and cache) its kill left serves both
    // versions and nothing more.
    drop(a);
    let a = s3_server(
        dir.path(),
        "a",
        &location,
        &["--meta", &meta],
        Some(&b.admin_key),
    );
    assert_eq!(numbers(&a), [1, 2]);
    let r = reader.pull(&a, "acme/app.db", Some("v2-a.db"), &["--key", &pull_key]);
    assert_eq!(r.digest(), big.digest);
    big.assert_held_by(
        &reader.path("v2-a.db"),
        "version 2 from A after its restart",
    );
}

/// deployment.md, "What each failure does": a server over S3 with `--meta` whose
/// `--data` is lost (its cache of pack indexes and chunks, its drill results) starts
/// again on an empty one with nothing lost: every version is listed and pulled whole,
/// and the next push of a small change sends only that change.
#[test]
fn a_server_over_s3_whose_data_is_lost_starts_empty_and_serves_every_version() {
    let pg = postgres::shared();
    let meta = pg.database();
    let dir = TempDir::new().expect("tempdir");
    let location = new_location();
    let mut server = s3_server(dir.path(), "s3", &location, &["--meta", &meta], None);
    let admin_key = server.admin_key.clone();
    let key = ["--key", admin_key.as_str()];

    let origin = Machine::new(dir.path(), "origin");
    let (one, _writer) = wal_db(&origin, 2 << 20);
    let r = origin.push(&server, "app.db", "acme/app.db", &key);
    assert_eq!(r.u64("version"), 1);
    let path = origin.path("app.db");
    exec(&path, "UPDATE t SET v = randomblob(300) WHERE id < 60");
    let two = DbState::of(&path);
    let r = origin.push(&server, "app.db", "acme/app.db", &key);
    assert_eq!(r.u64("version"), 2);

    // The machine dies; its disk with it. It comes back on the same port with an
    // empty --data (the bucket and PostgreSQL hold everything users need).
    server.sigkill();
    let data = server.data_dir().to_owned();
    assert!(
        std::fs::read_dir(&data).expect("--data").count() > 0,
        "the server kept a cache"
    );
    std::fs::remove_dir_all(&data).expect("lose --data");
    std::fs::create_dir(&data).expect("an empty --data");
    server.restart_env(&aws_env());

    // Every version, listed and pulled whole by a machine that never saw them.
    let other = Machine::new(dir.path(), "other");
    let out = other.run_on(
        &server,
        ["versions", "acme/app.db", "--json", key[0], key[1]],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let listed: serde_json::Value = serde_json::from_str(util::stdout(&out).trim()).expect("JSON");
    let numbers: Vec<u64> = listed
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| v["number"].as_u64().expect("a number"))
        .collect();
    assert_eq!(numbers, [1, 2]);
    let r = other.pull(&server, "acme/app.db@1", Some("v1.db"), &key);
    assert_eq!(r.u64("version"), 1);
    one.assert_held_by(&other.path("v1.db"), "@1 after --data was lost");
    let r = other.pull(&server, "acme/app.db", Some("latest.db"), &key);
    assert_eq!(r.u64("version"), 2);
    two.assert_held_by(&other.path("latest.db"), "@latest after --data was lost");

    // The origin's next small change: only the changed pages travel, version 3 lands.
    exec(
        &path,
        "UPDATE t SET v = randomblob(300) WHERE id BETWEEN 100 AND 110",
    );
    let three = DbState::of(&path);
    let changed = two.pages_differing(&three);
    let r = origin.push(&server, "app.db", "acme/app.db", &key);
    assert_eq!(r.u64("version"), 3, "{}", r.0);
    assert!(
        r.u64("pages_sent") <= changed,
        "{} pages sent for {changed} changed: {}",
        r.u64("pages_sent"),
        r.0
    );
    let r = other.pull(&server, "acme/app.db", Some("latest.db"), &key);
    assert_eq!(r.u64("version"), 3);
    three.assert_held_by(&other.path("latest.db"), "@3 after --data was lost");
}

/// Issue 14's notifications over S3: two servers on one bucket and one PostgreSQL; a
/// pull subscriber connected to B applies a version pushed through A (the "new
/// version" travels through PostgreSQL's NOTIFY), and a sync-now sent to A reaches it.
#[test]
fn a_pull_subscriber_on_one_server_over_s3_follows_pushes_to_another() {
    let pg = postgres::shared();
    let meta = pg.database();
    let dir = TempDir::new().expect("tempdir");
    let location = new_location();
    let a = s3_server(dir.path(), "a", &location, &["--meta", &meta], None);
    let b = s3_server(
        dir.path(),
        "b",
        &location,
        &["--meta", &meta],
        Some(&a.admin_key),
    );
    let key = ["--key", a.admin_key.as_str()];
    let origin = Machine::new(dir.path(), "origin");
    let (one, _writer) = wal_db(&origin, 1 << 20);
    assert_eq!(
        origin
            .push(&a, "app.db", "acme/app.db", &key)
            .u64("version"),
        1
    );

    let follower = Machine::new(dir.path(), "follower");
    let mut sub = Subscriber::start(
        &follower,
        &[
            "pull",
            "acme/app.db",
            "sub.db",
            "--subscribe",
            "--server",
            &b.url,
            "--key",
            &a.admin_key,
        ],
    );
    sub.expect(&["pull (start): version 1"]);
    one.assert_held_by(&follower.path("sub.db"), "the subscriber's first pull");

    let path = origin.path("app.db");
    exec(&path, "DELETE FROM t WHERE id % 7 = 0");
    let two = DbState::of(&path);
    assert_eq!(
        origin
            .push(&a, "app.db", "acme/app.db", &key)
            .u64("version"),
        2
    );
    sub.expect(&["pull (new-version): version 2"]);
    two.assert_held_by(
        &follower.path("sub.db"),
        "the subscriber on B after a push to A",
    );
    assert_eq!(util::integrity(&follower.path("sub.db")), "ok");

    let (status, body) = http(&a, "POST", "/api/replicas/acme/app.db/sync", &a.admin_key);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reached"], 1, "{body}");
    sub.expect(&["pull (sync-now)"]);
    drop(sub);
}
