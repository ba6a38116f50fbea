//! Keys as a user meets them: the first push with the admin key leaves a PUSH key in a
//! private secrets file and a PULL key in an executable sidecar; the next push needs no
//! key; the sidecar pulls on another machine; `--dry-run` shows keys masked. Every
//! refusal (no key, a wrong key, a PULL key pushing, a key of another replica) exits 5
//! with its own message and writes nothing, on the server or on the client.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tempfile::TempDir;

use super::{
    DbState, EXIT_AUTH, Machine, TestServer, assert_fails, exec, key_id, saved_push_key,
    sidecar_field, small_db,
};
use crate::util;

/// A server with two replicas, `acme/app.db` and `acme/other.db`, first pushed from
/// machine `a` with the admin key; the keys minted for `acme/app.db` (PUSH, PULL).
struct Setup {
    dir: TempDir,
    server: TestServer,
    a: Machine,
    push_key: String,
    pull_key: String,
}

/// `in_process`: the server runs in this test process (see
/// [`TestServer::in_process`]); a test that reads the server's log needs a process.
fn setup(in_process: bool) -> Setup {
    let dir = TempDir::new().expect("tempdir");
    let server = if in_process {
        TestServer::in_process(dir.path())
    } else {
        TestServer::start(dir.path())
    };
    let a = Machine::new(dir.path(), "a");
    small_db(&a.path("app.db"), 256 << 10);
    small_db(&a.path("other.db"), 128 << 10);
    for (db, replica) in [("app.db", "acme/app.db"), ("other.db", "acme/other.db")] {
        let out = a.run_on(
            &server,
            [
                "push",
                db,
                replica,
                "-m",
                "first",
                "--key",
                &server.admin_key,
            ],
        );
        assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
        let note = util::stderr(&out);
        assert!(
            note.contains(&format!("new keys for {replica}"))
                && note.contains(&*a.secrets_file().to_string_lossy())
                && note.contains(&format!("{db}-sqlferry")),
            "the first push says where the keys went: {note}"
        );
    }
    let push_key = saved_push_key(&a, &a.path("app.db"));
    let pull_key = sidecar_field(&a.path("app.db-sqlferry"), "key");
    for k in [&push_key, &pull_key] {
        assert!(
            k.len() == 68 && k.starts_with("sfk_") && k[4..].bytes().all(|b| b.is_ascii_hexdigit()),
            "key shape: {k}"
        );
    }
    assert!(push_key != pull_key && push_key != server.admin_key);
    Setup {
        dir,
        server,
        a,
        push_key,
        pull_key,
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Asserts `text` shows no key but masked ones (`sfk_` + 16 hex + `…`), at least one.
fn assert_masked(text: &str, keys: &[&str]) {
    for k in keys {
        assert!(!text.contains(&k[20..]), "a key's secret is shown: {text}");
    }
    let shown: Vec<&str> = text
        .match_indices("sfk_")
        .map(|(i, _)| &text[i..])
        .collect();
    assert!(!shown.is_empty(), "the key is named, masked: {text}");
    for s in shown {
        let id = &s[4..];
        assert!(
            id.len() > 16
                && id[..16].bytes().all(|b| b.is_ascii_hexdigit())
                && id[16..].starts_with('…'),
            "masked as sfk_ + 16 hex + …: {text}"
        );
    }
}

#[test]
fn first_push_keeps_keys_private_the_next_needs_none_and_the_sidecar_pulls_elsewhere() {
    let Setup {
        dir,
        server,
        a,
        push_key,
        pull_key,
    } = setup(false);
    let src = a.path("app.db");

    // The secrets file: 0600, JSON, the PUSH key for this database's absolute path.
    let secrets = a.secrets_file();
    assert_eq!(mode(&secrets), 0o600, "secrets file mode");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&secrets).expect("read")).expect("JSON");
    let entry = &v["databases"][src.to_str().expect("UTF-8")];
    assert_eq!(entry["server"], server.url.as_str());
    assert_eq!(entry["replica"], "acme/app.db");
    // The lock file that serializes changes of the secrets file stays (it is empty).
    let mut names: Vec<_> = std::fs::read_dir(secrets.parent().expect("dir"))
        .expect("config dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["secrets.json", "secrets.json.lock"],
        "no temporary file left behind"
    );

    // The sidecar: 0700, the interpreter line, server, replica and PULL key only.
    let sidecar = a.path("app.db-sqlferry");
    assert_eq!(mode(&sidecar), 0o700, "sidecar mode");
    let text = std::fs::read_to_string(&sidecar).expect("read sidecar");
    // The interpreter line runs sqlferry from PATH, else the binary that wrote it.
    let exe = Path::new(env!("CARGO_BIN_EXE_sqlferry"))
        .canonicalize()
        .expect("the binary");
    let line = sqlferry::config::Sidecar::interpreter_line(Some(&exe));
    assert!(text.starts_with(&format!("{line}\n")), "{text}");
    let settings: Vec<&str> = text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split('=').next().expect("a name").trim())
        .collect();
    assert_eq!(settings, ["server", "replica", "key"], "{text}");
    assert_eq!(sidecar_field(&sidecar, "server"), server.url);
    assert_eq!(sidecar_field(&sidecar, "replica"), "acme/app.db");
    assert!(!text.contains(&push_key) && !text.contains(&server.admin_key));

    // The second push needs no key: the saved PUSH key is used.
    exec(&src, "UPDATE t SET v = randomblob(300) WHERE id = 7");
    let v2 = DbState::of(&src);
    let r = a.push(&server, "app.db", "acme/app.db", &["-m", "second"]);
    assert_eq!(r.u64("version"), 2);
    let list = server.versions("acme/app.db").expect("exists");
    assert_eq!(
        list[1].key_id,
        key_id(&push_key),
        "pushed with the PUSH key"
    );
    assert_eq!(list[0].key_id, key_id(&server.admin_key));

    // Machine B gets the sidecar (as `cp -p` would) and runs it: sqlferry on PATH.
    let b = Machine::new(dir.path(), "b");
    let copied = b.path("app.db-sqlferry");
    std::fs::copy(&sidecar, &copied).expect("copy the sidecar");
    assert_eq!(mode(&copied), 0o700);
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_sqlferry"))
        .parent()
        .expect("the binary's directory");
    let path = std::env::join_paths(std::iter::once(bin_dir.to_owned()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .expect("PATH");
    let out = b
        .command_of(&copied)
        .env("PATH", &path)
        .output()
        .expect("run the sidecar");
    assert_eq!(util::code(&out), 0, "sidecar: {}", util::stderr(&out));
    assert!(
        util::stdout(&out).contains("acme/app.db@2"),
        "{}",
        util::stdout(&out)
    );
    v2.assert_held_by(&b.path("app.db"), "pulled by running the sidecar");
    // `pull --from SIDECAR @1` picks a version.
    let out = b.run([
        "pull",
        "--from",
        copied.to_str().expect("UTF-8"),
        "@1",
        "first.db",
    ]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert_eq!(
        util::digest(&b.path("first.db")),
        list[0].digest,
        "pull --from @1"
    );
    // The sidecar's key is a PULL key: B cannot push with it.
    let out = b.run_on(
        &server,
        [
            "push",
            "app.db",
            "acme/app.db",
            "--force",
            "--key",
            &pull_key,
        ],
    );
    assert_fails(&out, EXIT_AUTH, "this is a PULL key");

    // --dry-run names the key masked and changes nothing, with the saved key and with
    // the admin key, and for a replica that does not exist yet.
    exec(&src, "UPDATE t SET v = randomblob(300) WHERE id = 8");
    let before = (
        server.versions("acme/app.db"),
        a.state(),
        std::fs::read(&sidecar).expect("sidecar"),
        server.replica_files(),
        DbState::of(&src).digest,
    );
    let keys = [
        server.admin_key.as_str(),
        push_key.as_str(),
        pull_key.as_str(),
    ];
    for (replica, extra) in [
        ("acme/app.db", vec![]),
        ("acme/app.db", vec!["--key", &server.admin_key]),
        ("acme/new.db", vec!["--key", &server.admin_key]),
    ] {
        let mut args = vec!["push", "app.db", replica, "--dry-run"];
        args.extend(extra);
        let out = a.run_on(&server, &args);
        let text = format!("{}{}", util::stdout(&out), util::stderr(&out));
        assert_eq!(util::code(&out), 0, "{args:?}: {text}");
        assert!(text.starts_with("would push "), "{text}");
        assert_masked(&text, &keys);
        if replica == "acme/new.db" {
            assert!(text.contains("creating the replica as version 1"), "{text}");
            assert!(text.contains(&format!("sfk_{}…", key_id(&server.admin_key))));
        } else {
            assert!(text.contains("version 3 if anything changed"), "{text}");
        }
    }
    let after = (
        server.versions("acme/app.db"),
        a.state(),
        std::fs::read(&sidecar).expect("sidecar"),
        server.replica_files(),
        DbState::of(&src).digest,
    );
    assert!(before == after, "a dry run changed something");
    assert_eq!(server.versions("acme/new.db"), None, "no replica created");
    let leftovers: Vec<_> = std::fs::read_dir(&a.work)
        .expect("work dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // Keys never reach the server's log, only key ids.
    let log = server.log();
    for k in keys {
        assert!(
            !log.contains(&k[20..]),
            "a key's secret is in the server log"
        );
    }
    assert!(log.contains(key_id(&push_key)), "the log names key ids");
}

/// One refusal: what a user runs, and the phrase that tells it apart.
struct Refusal {
    what: &'static str,
    args: Vec<String>,
    phrase: String,
}

#[test]
fn each_key_refusal_is_distinct_exits_5_and_writes_nothing() {
    let Setup {
        dir,
        server,
        a: _a,
        push_key,
        pull_key,
    } = setup(true);
    // Machine C has saved nothing; its database differs from every replica, and each
    // push is forced: a push let through would make a version.
    let c = Machine::new(dir.path(), "c");
    let mine = c.path("mine.db");
    small_db(&mine, 64 << 10);
    let mine_before = DbState::of(&mine).digest;
    let unknown = format!("sfk_{}", "0123456789abcdef".repeat(4));
    let wrong_secret = format!("{}{}", &push_key[..20], "f".repeat(48));

    let push = |replica: &str, key: Option<&str>| {
        let mut args: Vec<String> = vec![
            "push".into(),
            "mine.db".into(),
            replica.into(),
            "--force".into(),
        ];
        if let Some(k) = key {
            args.extend(["--key".into(), k.into()]);
        }
        args
    };
    let pull = |replica: &str, key: Option<&str>| {
        let mut args: Vec<String> = vec!["pull".into(), replica.into(), "got.db".into()];
        if let Some(k) = key {
            args.extend(["--key".into(), k.into()]);
        }
        args
    };
    let versions = |replica: &str, key: Option<&str>| {
        let mut args: Vec<String> = vec!["versions".into(), replica.into()];
        if let Some(k) = key {
            args.extend(["--key".into(), k.into()]);
        }
        args
    };
    let other_of = |kind: &str, replica: &str| {
        format!("this {kind} key is for replica acme/app.db, not {replica}")
    };
    let refusals = [
        Refusal {
            what: "push, no key",
            args: push("acme/app.db", None),
            phrase: "no key for acme/app.db".into(),
        },
        Refusal {
            what: "pull, no key",
            args: pull("acme/app.db", None),
            phrase: "missing key".into(),
        },
        Refusal {
            what: "versions, no key",
            args: versions("acme/app.db", None),
            phrase: "missing key".into(),
        },
        Refusal {
            what: "push, unknown well-formed key",
            args: push("acme/app.db", Some(&unknown)),
            phrase: "wrong key".into(),
        },
        Refusal {
            what: "push, a real key id with a wrong secret",
            args: push("acme/app.db", Some(&wrong_secret)),
            phrase: "wrong key".into(),
        },
        Refusal {
            what: "pull, garbage key",
            args: pull("acme/app.db", Some("hunter2")),
            phrase: "wrong key".into(),
        },
        Refusal {
            what: "push, PULL key",
            args: push("acme/app.db", Some(&pull_key)),
            phrase: "this is a PULL key".into(),
        },
        Refusal {
            what: "push, PUSH key of another replica",
            args: push("acme/other.db", Some(&push_key)),
            phrase: other_of("push", "acme/other.db"),
        },
        Refusal {
            what: "push, PUSH key to a new replica",
            args: push("acme/new.db", Some(&push_key)),
            phrase: other_of("push", "acme/new.db"),
        },
        Refusal {
            what: "pull, PUSH key of another replica",
            args: pull("acme/other.db", Some(&push_key)),
            phrase: other_of("push", "acme/other.db"),
        },
        Refusal {
            what: "pull, PULL key of another replica",
            args: pull("acme/other.db", Some(&pull_key)),
            phrase: other_of("pull", "acme/other.db"),
        },
        Refusal {
            what: "versions, PULL key of another replica",
            args: versions("acme/other.db", Some(&pull_key)),
            phrase: other_of("pull", "acme/other.db"),
        },
    ];
    let before = (
        server.versions("acme/app.db"),
        server.versions("acme/other.db"),
        server.replica_files(),
    );
    let categories = [
        "no key for",
        "missing key",
        "wrong key",
        "PULL key",
        "key is for replica",
    ];
    for r in &refusals {
        let out = c.run_on(&server, &r.args);
        let line = assert_fails(&out, EXIT_AUTH, &r.phrase);
        let hits: Vec<_> = categories.iter().filter(|c| line.contains(*c)).collect();
        assert_eq!(hits.len(), 1, "{}: one kind of refusal: {line}", r.what);
        for k in [&push_key, &pull_key, &server.admin_key, &wrong_secret] {
            assert!(!line.contains(&k[20..]), "{}: a key is printed", r.what);
        }
        assert!(!c.path("got.db").exists(), "{}: no LOCAL created", r.what);
        assert_eq!(
            DbState::of(&mine).digest,
            mine_before,
            "{}: LOCAL untouched",
            r.what
        );
        assert!(
            c.state().is_empty(),
            "{}: nothing saved on the client",
            r.what
        );
        assert!(
            !c.path("mine.db-sqlferry").exists(),
            "{}: no sidecar",
            r.what
        );
    }
    let after = (
        server.versions("acme/app.db"),
        server.versions("acme/other.db"),
        server.replica_files(),
    );
    assert!(before == after, "a refused request changed the server");
    assert_eq!(server.versions("acme/new.db"), None, "no replica created");

    // The same keys where they belong work: the refusals were about the keys.
    for key in [&push_key, &pull_key] {
        let out = c.run_on(&server, pull("acme/app.db", Some(key)));
        assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
        std::fs::remove_file(c.path("got.db")).expect("remove");
    }
}
