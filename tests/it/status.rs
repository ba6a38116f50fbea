//! `status` and `history` as a user meets them: pushes and pulls by hand, one that
//! fails, changes written after a push; the exit codes cron and monitoring rely on.

use std::ffi::OsStr;

use crate::util::{Mode, code, create, insert_rows, run, stderr, stdout};

fn args<'a>(a: &'a [&'a str]) -> Vec<&'a OsStr> {
    a.iter().map(OsStr::new).collect()
}

#[test]
fn status_and_history_tell_what_worked_what_failed_and_what_is_not_pushed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("app.db");
    let db_s = db.to_str().unwrap();
    let conn = create(&db, 4096, Mode::Wal);
    insert_rows(&conn, 200, 100);

    // Nothing synced yet: healthy and says so; a named target is not found.
    let out = run(d, &args(&["status"]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).contains("no push or pull is recorded"),
        "{}",
        stdout(&out)
    );
    let out = run(d, &args(&["status", "acme/app.db"]));
    assert_eq!(code(&out), 8, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no push or pull of acme/app.db"),
        "{}",
        stderr(&out)
    );

    let out = run(d, &args(&["push", db_s, "acme/app.db"]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = run(d, &args(&["status"]));
    assert_eq!(code(&out), 0, "{}\n{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("ok       push"), "{text}");
    assert!(text.contains("acme/app.db"), "{text}");
    assert!(text.contains("version 1, trigger manual"), "{text}");
    assert!(!text.contains("changes not pushed"), "{text}");

    // A write after the push: status says it is not pushed yet, still healthy.
    insert_rows(&conn, 10, 100);
    let out = run(d, &args(&["status", db_s]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        stdout(&out).contains("changes not pushed yet: written"),
        "{}",
        stdout(&out)
    );

    // A push to a store that cannot be reached fails: status exits 11 and names why.
    let out = run(
        d,
        &args(&[
            "push",
            db_s,
            "acme/app.db",
            "--server",
            "ws://127.0.0.1:1",
            "--key",
            "sfk_test",
        ]),
    );
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    let out = run(d, &args(&["status"]));
    assert_eq!(code(&out), 11, "{}", stdout(&out));
    let text = stdout(&out);
    assert!(text.contains("FAILING  push"), "{text}");
    assert!(text.contains("never succeeded"), "{text}");
    assert!(
        text.contains("(1 failure since the last success)"),
        "{text}"
    );
    assert!(text.contains("1 ok, 0 late, 1 failing"), "{text}");

    // --json: one object per database, store, replica and direction.
    let out = run(d, &args(&["status", "--json", db_s]));
    assert_eq!(code(&out), 11);
    let lines: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let lines = lines.as_array().unwrap();
    assert_eq!(lines.len(), 2);
    let failing = lines.iter().find(|l| l["state"] == "failing").unwrap();
    assert_eq!(failing["store"], "ws://127.0.0.1:1");
    assert_eq!(failing["failures_since"], 1);
    assert!(
        failing["attempt_error"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1:1")
    );

    // A pull into another file is recorded too, as a pull.
    let copy = d.join("copy.db");
    let out = run(d, &args(&["pull", "acme/app.db", copy.to_str().unwrap()]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let out = run(d, &args(&["status", "--json", copy.to_str().unwrap()]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lines: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(lines[0]["op"], "pull");
    assert_eq!(lines[0]["success_version"], 1);

    // history: today's row counts all three, the version made and the failure.
    let out = run(d, &args(&["history", "--json"]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let days: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let today = &days.as_array().unwrap()[0];
    assert_eq!(today["syncs"], 3);
    assert_eq!(today["versions"], 1);
    assert_eq!(today["failures"], 1);
    assert_eq!(today["triggers"]["manual"], 3);
    let out = run(d, &args(&["history", db_s]));
    let text = stdout(&out);
    assert!(text.contains("manual 2"), "{text}");
}

#[test]
fn a_pull_by_time_brings_the_version_that_was_latest_then() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("app.db");
    let db_s = db.to_str().unwrap();
    let conn = create(&db, 4096, Mode::Wal);
    for _ in 0..3 {
        insert_rows(&conn, 50, 100);
        let out = run(d, &args(&["push", db_s, "acme/app.db"]));
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    let out = run(d, &args(&["versions", "acme/app.db", "--json"]));
    let versions: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let versions = versions.as_array().unwrap();
    let first_at = versions[0]["created_at"].as_i64().unwrap();
    // What a user would expect at that second: the newest version created by then.
    let expected = versions
        .iter()
        .rfind(|v| v["created_at"].as_i64().unwrap() <= first_at)
        .unwrap();
    let at = sqlferry::epoch::rfc3339(first_at);
    let copy = d.join("then.db");
    let spec = format!("acme/app.db@{at}");
    let out = run(d, &args(&["pull", &spec, copy.to_str().unwrap(), "--json"]));
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let pulled: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(pulled["version"], expected["number"]);
    assert_eq!(pulled["digest"], expected["digest"]);
    assert_eq!(crate::util::integrity(&copy), "ok");

    // Before the first version: nothing to bring, said so, nothing written.
    let out = run(
        d,
        &args(&[
            "pull",
            "acme/app.db@2001-01-01T00:00:00Z",
            d.join("none.db").to_str().unwrap(),
        ]),
    );
    assert_eq!(code(&out), 8, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no version is that old"),
        "{}",
        stderr(&out)
    );
    assert!(!d.join("none.db").exists());
}
