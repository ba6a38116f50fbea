//! Versions go up to a server and come back: every version selector, on a second
//! machine, checked the way a user checks (rows, integrity check, digest); `versions`
//! lists them with their messages; a pull into a database that differs a little sends
//! only the pages that differ.

use tempfile::TempDir;

use super::{
    DbState, EXIT_NOT_FOUND, EXIT_USAGE, Machine, TestServer, assert_fails, exec, key_id,
    saved_push_key, sidecar_field, small_db,
};
use crate::util;

const PAGE: u64 = 4096;

#[test]
fn every_version_selector_round_trips_and_a_pull_sends_only_what_differs() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let a = Machine::new(dir.path(), "a");
    let src = a.path("app.db");
    small_db(&src, 2 << 20);

    // Version 1: the first push, with the admin key.
    let s1 = DbState::of(&src);
    let r1 = a.push(
        &server,
        "app.db",
        "acme/app.db",
        &["-m", "first version", "--key", &server.admin_key],
    );
    assert_eq!((r1.u64("version"), &r1.0["created"]), (1, &true.into()));
    assert_eq!(r1.digest(), s1.digest);
    assert_eq!(r1.u64("pages_sent"), s1.hashes.len() as u64);

    // Version 2: three rows change in place. The saved PUSH key and the kept manifest
    // of version 1 are used: only the changed pages travel, and no hash at all.
    exec(
        &src,
        "UPDATE t SET v = randomblob(300) WHERE id IN (10, 3000, 6000)",
    );
    let s2 = DbState::of(&src);
    let r2 = a.push(
        &server,
        "app.db",
        "acme/app.db",
        &["-m", "naïve ✓ three rows"],
    );
    assert_eq!(r2.u64("version"), 2);
    assert_eq!(r2.digest(), s2.digest);
    let changed_1_2 = s1.pages_differing(&s2);
    assert!(
        (1..=6).contains(&changed_1_2),
        "{changed_1_2} pages changed"
    );
    assert_eq!(r2.u64("pages_sent"), changed_1_2, "push sends what changed");
    assert_eq!(r2.u64("hash_bytes"), 0, "known base: no hash travels");

    // A commit message over 4096 bytes is refused before anything is sent.
    let out = a.run_on(
        &server,
        ["push", "app.db", "acme/app.db", "-m", &"m".repeat(4097)],
    );
    assert_fails(&out, EXIT_USAGE, "at most 4096");

    // Version 3: rows deleted and added; a message of exactly 4096 bytes (2 each).
    exec(
        &src,
        "DELETE FROM t WHERE id % 5 = 0;
         INSERT INTO t(k, v) SELECT hex(randomblob(8)), randomblob(300) FROM t LIMIT 500;",
    );
    let s3 = DbState::of(&src);
    let long_message = "é".repeat(2048);
    let r3 = a.push(&server, "app.db", "acme/app.db", &["-m", &long_message]);
    assert_eq!(r3.u64("version"), 3);
    assert_eq!(r3.digest(), s3.digest);

    // A push of an unchanged database makes no version.
    let r = a.push(&server, "app.db", "acme/app.db", &["-m", "nothing new"]);
    assert_eq!((r.u64("version"), &r.0["created"]), (3, &false.into()));
    assert_eq!(r.u64("pages_sent"), 0);

    // Machine B has only the PULL key from the sidecar, in SQLFERRY_KEY.
    let mut b = Machine::new(dir.path(), "b");
    let pull_key = sidecar_field(&a.path("app.db-sqlferry"), "key");
    b.set_env("SQLFERRY_KEY", &pull_key);
    let states = [&s1, &s2, &s3];
    for (spec, local, want) in [
        ("acme/app.db@1", "v1.db", 1),
        ("acme/app.db@2", "v2.db", 2),
        ("acme/app.db@3", "v3.db", 3),
        ("acme/app.db@latest", "latest.db", 3),
        ("acme/app.db@latest-0", "latest0.db", 3),
        ("acme/app.db@latest-1", "prev.db", 2),
        ("acme/app.db@latest-2", "prevprev.db", 1),
    ] {
        let r = b.pull(&server, spec, Some(local), &[]);
        assert_eq!(r.u64("version"), want, "{spec}");
        let state = states[want as usize - 1];
        assert_eq!(r.digest(), state.digest, "{spec}: reported digest");
        state.assert_held_by(&b.path(local), spec);
    }
    // No LOCAL: the replica's last segment, in the current directory.
    let r = b.pull(&server, "acme/app.db", None, &[]);
    assert_eq!(r.u64("version"), 3);
    s3.assert_held_by(&b.path("app.db"), "pull with no LOCAL");

    // Versions that do not exist, and one that cannot.
    for (spec, code, phrase) in [
        (
            "acme/app.db@latest-3",
            EXIT_NOT_FOUND,
            "the latest version is 3",
        ),
        ("acme/app.db@4", EXIT_NOT_FOUND, "versions are 1 to 3"),
        ("acme/app.db@0", EXIT_USAGE, "numbered from 1"),
        (
            "acme/app.db@latest-x",
            EXIT_USAGE,
            "@N, @latest, @latest-N or @TIME",
        ),
    ] {
        let out = b.run_on(&server, ["pull", spec, "missing.db"]);
        assert_fails(&out, code, phrase);
        assert!(!b.path("missing.db").exists(), "{spec}: no LOCAL created");
    }
    // (Only the admin key may ask about a replica that does not exist.)
    for (spec, code, phrase) in [
        (
            "acme/nope.db",
            EXIT_NOT_FOUND,
            "acme/nope.db does not exist",
        ),
        (
            "acme/nope.db@2",
            EXIT_NOT_FOUND,
            "acme/nope.db does not exist",
        ),
    ] {
        let key = ["--key", &server.admin_key];
        let out = b.run_on(&server, ["pull", spec, "missing.db"].iter().chain(&key));
        assert_fails(&out, code, phrase);
        assert!(!b.path("missing.db").exists(), "{spec}: no LOCAL created");
    }

    // Pull into a database that differs a little: only the differing pages come, and
    // the bytes on the wire are those pages plus a small hash exchange.
    let v1 = b.path("v1.db");
    let r = b.pull(&server, "acme/app.db@2", Some("v1.db"), &[]);
    s2.assert_held_by(&v1, "v1.db pulled to version 2");
    let sent = r.u64("pages_sent");
    assert_eq!(sent, changed_1_2, "pull writes exactly the changed pages");
    let received = r.u64("bytes_received");
    assert!(
        received >= sent * PAGE && received <= sent * (PAGE + 5) + 16 * 1024,
        "{received} bytes received for {sent} pages"
    );
    assert!(
        r.u64("bytes_sent") < 64 * 1024,
        "the pulling side sends hashes only: {}",
        r.0
    );
    // Further: from version 2 to 3 (rows deleted and added).
    let r = b.pull(&server, "acme/app.db", Some("v1.db"), &[]);
    s3.assert_held_by(&v1, "v1.db pulled to version 3");
    assert_eq!(r.u64("pages_sent"), s2.pages_differing(&s3));
    // And the same version again: nothing to write.
    let r = b.pull(&server, "acme/app.db@3", Some("v1.db"), &[]);
    assert_eq!(r.u64("pages_sent"), 0, "{}", r.0);
    s3.assert_held_by(&v1, "v1.db pulled to version 3 again");

    // `versions --json` (with the PULL key) lists all three, messages included.
    let out = b.run_on(&server, ["versions", "acme/app.db", "--json"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let list: Vec<sqlferry::store::VersionInfo> =
        serde_json::from_slice(&out.stdout).expect("JSON");
    let push_key = saved_push_key(&a, &src);
    let summary: Vec<_> = list
        .iter()
        .map(|v| {
            (
                v.number,
                v.message.as_str(),
                v.digest.as_str(),
                v.base,
                v.key_id.as_str(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (
                1,
                "first version",
                s1.digest.as_str(),
                0,
                key_id(&server.admin_key)
            ),
            (
                2,
                "naïve ✓ three rows",
                s2.digest.as_str(),
                1,
                key_id(&push_key)
            ),
            (
                3,
                long_message.as_str(),
                s3.digest.as_str(),
                2,
                key_id(&push_key)
            ),
        ]
    );
    for (v, s) in list.iter().zip(states) {
        assert_eq!(v.page_size, 4096);
        assert_eq!(v.page_count as usize, s.hashes.len());
        assert_eq!(v.size, u64::from(v.page_count) * PAGE);
        assert!(!v.client_id.is_empty());
    }
    // The table a person reads names each version and its message.
    let out = b.run_on(&server, ["versions", "acme/app.db"]);
    let table = util::stdout(&out);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(table.contains("first version") && table.contains("naïve ✓ three rows"));
    assert_eq!(
        table.lines().count(),
        5,
        "a header, three versions and the stored total:\n{table}"
    );
    assert!(
        table
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("3 versions, ") && l.ends_with(" stored")),
        "{table}"
    );
}

/// `pull --json` counts the hash exchange a pull into an existing database needs, as
/// `push --json` does: `hash_bytes` is the WANT and NODES traffic.
#[test]
fn pull_reports_its_hash_exchange() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let a = Machine::new(dir.path(), "a");
    let src = a.path("app.db");
    small_db(&src, 1 << 20);
    let key = ["--key", server.admin_key.as_str()];
    a.push(&server, "app.db", "acme/app.db", &key);
    a.pull(&server, "acme/app.db", Some("copy.db"), &key);
    exec(
        &src,
        "UPDATE t SET v = randomblob(300) WHERE id IN (5, 2500)",
    );
    a.push(&server, "app.db", "acme/app.db", &[]);

    let r = a.pull(&server, "acme/app.db", Some("copy.db"), &key);
    assert!((1..=2).contains(&r.u64("pages_sent")), "{}", r.0);
    // The pulling side answered the server's WANTs with NODES: hashes travelled.
    assert!(r.u64("bytes_sent") > 1024, "{}", r.0);
    let hash_bytes = r.u64("hash_bytes");
    assert!(
        hash_bytes > 0 && hash_bytes <= r.u64("bytes_sent") + r.u64("bytes_received"),
        "hash_bytes counts the hash exchange: {}",
        r.0
    );
}

#[test]
fn verify_fetches_a_stored_version_and_checks_its_digest() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let a = Machine::new(dir.path(), "a");
    let src = a.path("app.db");
    small_db(&src, 1 << 20);
    let r1 = a.push(
        &server,
        "app.db",
        "acme/app.db",
        &["--key", &server.admin_key],
    );
    let conn = util::open(&src);
    util::insert_rows(&conn, 50, 300);
    drop(conn);
    let r2 = a.push(&server, "app.db", "acme/app.db", &[]);
    for (spec, version, digest) in [
        ("acme/app.db@1", 1, r1.digest()),
        ("acme/app.db", 2, r2.digest()),
        ("acme/app.db@latest-1", 1, r1.digest()),
    ] {
        let out = a.run_on(&server, ["verify", spec, "--json"]);
        assert_eq!(util::code(&out), 0, "{spec}: {}", util::stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        assert_eq!(v["version"], version, "{spec}: {v}");
        assert_eq!(v["digest"], digest, "{spec}: {v}");
        assert_eq!(v["integrity"], serde_json::json!(["ok"]), "{spec}: {v}");
    }
    let out = a.run_on(&server, ["verify", "acme/app.db@7"]);
    assert_fails(&out, EXIT_NOT_FOUND, "acme/app.db@7 does not exist");
    // The embedded store too, and nothing is left behind in the working directory. It
    // is named: app.db's saved key is for a server.
    let store = format!(
        "file://{}",
        a.work
            .parent()
            .expect("machine dir")
            .join("home/data/sqlferry")
            .display()
    );
    let out = a.run(["push", "app.db", "local/app.db", "--server", &store]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let out = a.run(["verify", "local/app.db@1"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(
        util::stdout(&out).contains("version:      local/app.db@1"),
        "{}",
        util::stdout(&out)
    );
    assert!(util::stdout(&out).contains(&format!("digest:       {}", r2.digest())));
    let names: Vec<_> = std::fs::read_dir(&a.work)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| n.starts_with("app.db")), "{names:?}");
}

/// A long history is listed whole: `versions` over a server carries every version
/// whatever the frame limit (80 KiB), here 30 versions with 4,096-byte messages (about
/// 130 KiB of JSON), in order, each message intact.
#[test]
fn versions_lists_a_history_longer_than_one_frame() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let a = Machine::new(dir.path(), "a");
    let src = a.path("app.db");
    small_db(&src, 256 << 10);
    let mut digests = Vec::new();
    for n in 1..=30u64 {
        if n > 1 {
            exec(
                &src,
                &format!("UPDATE t SET v = randomblob(300) WHERE id = {n}"),
            );
        }
        // Each message is different and exactly 4,096 bytes (the limit).
        let message = format!("{n:04}{}", "m".repeat(4092));
        let key: &[&str] = if n == 1 {
            &["--key", &server.admin_key]
        } else {
            &[]
        };
        let r = a.push(
            &server,
            "app.db",
            "acme/app.db",
            &[&["-m", &message][..], key].concat(),
        );
        assert_eq!(r.u64("version"), n);
        digests.push(r.digest().to_owned());
    }
    let out = a.run_on(&server, ["versions", "acme/app.db", "--json"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(out.stdout.len() > 120 << 10, "{} bytes", out.stdout.len());
    let list: Vec<sqlferry::store::VersionInfo> =
        serde_json::from_slice(&out.stdout).expect("JSON");
    let got: Vec<_> = list
        .iter()
        .map(|v| {
            (
                v.number,
                v.message[..4].to_owned(),
                v.message.len(),
                v.digest.clone(),
            )
        })
        .collect();
    let want: Vec<_> = (1..=30u64)
        .map(|n| (n, format!("{n:04}"), 4096, digests[n as usize - 1].clone()))
        .collect();
    assert_eq!(got, want);
    // The table says so too.
    let out = a.run_on(&server, ["versions", "acme/app.db"]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(
        util::stdout(&out).contains("30 versions, "),
        "{}",
        util::stdout(&out)
    );
}
