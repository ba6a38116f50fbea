//! Replica paths: `namespace/name`, nested segments allowed, each segment letters,
//! digits, `.`, `_` and `-`, no `.` or `..`, no empty or absolute segment. Anything else
//! is refused with the rule it broke and exit code 2, by the client before it connects
//! and by the server (ERROR 11) for a client that does not check; nothing is created.

use serde_json::json;
use tempfile::TempDir;

use super::raw::{End, connect, end, open_frame, runtime, send};
use super::{EXIT_USAGE, Machine, TestServer, assert_fails, small_db};

/// Bad paths and the rule each breaks, as the message words it.
fn bad_paths() -> Vec<(String, &'static str)> {
    [
        ("acme/../etc", "'.' and '..' are not allowed"),
        ("../acme/app.db", "'.' and '..' are not allowed"),
        ("acme/./app.db", "'.' and '..' are not allowed"),
        ("acme//app.db", "empty segment"),
        ("acme/app.db/", "empty segment"),
        ("/acme/app.db", "it must be relative"),
        ("app.db", "it needs a namespace and a name"),
        ("acme/a b.db", "character ' ' is not allowed"),
        ("acme/app;rm", "character ';' is not allowed"),
        ("acme/é.db", "character 'é' is not allowed"),
        ("acme/a\\b.db", "character '\\\\' is not allowed"),
    ]
    .into_iter()
    .map(|(p, r)| (p.to_owned(), r))
    .chain([
        (format!("acme/{}", "x".repeat(260)), "longer than 255 bytes"),
        // A name the store could not make a file of once it adds its suffixes.
        (
            format!("acme/{}", "x".repeat(240)),
            "at most 200 are allowed",
        ),
    ])
    .collect()
}

#[test]
fn the_longest_name_allowed_is_stored_and_pulled() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let m = Machine::new(dir.path(), "m");
    small_db(&m.path("src.db"), 16 << 10);
    let path = format!("acme/{}", "x".repeat(200));
    let key = server.admin_key.as_str();
    let out = m.run_on(&server, ["push", "src.db", &path, "--key", key]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = m.run_on(&server, ["pull", &path, "back.db", "--key", key]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        crate::util::digest(&m.path("back.db")),
        crate::util::digest(&m.path("src.db"))
    );
}

#[test]
fn bad_replica_paths_are_refused_with_the_rule_and_create_nothing() {
    let dir = TempDir::new().expect("tempdir");
    let server = TestServer::in_process(dir.path());
    let m = Machine::new(dir.path(), "m");
    small_db(&m.path("src.db"), 16 << 10);
    let key = server.admin_key.as_str();

    for (path, rule) in bad_paths() {
        let invalid = format!("invalid replica path '{path}'");
        // A push takes REMOTE starting with / or ../ as a local file: only the others
        // are replica paths to it.
        let is_local = path.starts_with('/') || path.starts_with("../");
        let mut runs = vec![
            ("pull", vec!["pull", &path, "out.db", "--key", key]),
            ("versions", vec!["versions", &path, "--key", key]),
        ];
        if !is_local {
            runs.push(("push", vec!["push", "src.db", &path, "--key", key]));
        }
        for (cmd, args) in runs {
            let out = m.run_on(&server, &args);
            let line = assert_fails(&out, EXIT_USAGE, rule);
            assert!(line.contains(&invalid), "{cmd} {path}: {line}");
            assert!(!m.path("out.db").exists(), "{cmd} {path}: no LOCAL");
        }
        // A version selector does not save a bad path.
        let out = m.run_on(&server, ["pull", &format!("{path}@1"), "out.db"]);
        assert_fails(&out, EXIT_USAGE, rule);
    }
    // The '@' of a version selector is no part of a name.
    let out = m.run_on(&server, ["push", "src.db", "acme/app.db@2", "--key", key]);
    assert_fails(&out, EXIT_USAGE, "character '@' is not allowed");

    assert_eq!(server.replica_files(), Vec::<std::path::PathBuf>::new());
    assert!(
        !m.path("src.db-sqlferry").exists() && !m.secrets_file().exists(),
        "no keys were minted"
    );
    // The same rules hold for a client that sends a bad path anyway: ERROR 11 (bad
    // request), for every operation, and still nothing is created.
    let rt = runtime();
    for (path, rule) in bad_paths() {
        for op in ["push", "pull", "versions"] {
            let ended = rt.block_on(async {
                let mut ws = connect(&server, key).await;
                let open = json!({
                    "protocol": 1, "op": op, "replica": path, "version": "latest",
                    "client_id": "raw@test",
                });
                assert!(send(&mut ws, open_frame(&open)).await);
                end(&mut ws).await
            });
            let End::Error(code, message, _) = ended else {
                panic!("{op} {path}: closed without an ERROR");
            };
            assert_eq!(code, 11, "{op} {path}: {message}");
            assert!(message.contains(rule), "{op} {path}: {message}");
        }
    }
    assert_eq!(server.replica_files(), Vec::<std::path::PathBuf>::new());
    assert_eq!(server.versions("acme/etc"), None);
}
