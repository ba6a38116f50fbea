//! Rows: `sqlferry diff` (files, replica versions on a real server, `-`), `--rows`,
//! `--json`, `--sql`, `--changeset`; `sqlferry apply` in WAL and rollback modes, with
//! a reader open, with each `--on-conflict`, and with garbage; `versions --changes`;
//! and changesets exchanged with `sqldiff` (Debian's sqlite3-tools, which `.ci/run`
//! installs).
//!
//! What is checked is what a user checks: the rows of the database a changeset or a
//! script was applied to against B's, `PRAGMA integrity_check`, the exit code, the
//! lines and JSON fields printed, and files left byte for byte as they were.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rusqlite::types::Value;
use tempfile::TempDir;

use crate::server::{Machine, TestServer};
use crate::util::{self, Mode};

fn run(dir: &Path, args: &[&dyn AsRef<OsStr>]) -> Output {
    util::sqlferry(dir)
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .expect("run sqlferry")
}

fn ok(out: &Output, what: &str) -> String {
    assert_eq!(
        util::code(out),
        0,
        "{what}: {}{}",
        util::stderr(out),
        util::stdout(out)
    );
    util::stdout(out)
}

fn json(out: &Output, what: &str) -> serde_json::Value {
    let text = ok(out, what);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{what}: not JSON: {e}: {text}"))
}

/// A's rows: three tables of every kind (an INTEGER PRIMARY KEY, WITHOUT ROWID, no
/// primary key at all) holding NULL, REAL, TEXT (long, with quotes) and BLOB values.
const A_ROWS: &str = "
    CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, qty REAL, data BLOB);
    CREATE TABLE kv(k TEXT PRIMARY KEY, v) WITHOUT ROWID;
    CREATE TABLE log(msg TEXT, at INTEGER);
    CREATE INDEX items_name ON items(name);
    INSERT INTO items VALUES (1, 'apple', 1.5, x'00ff'), (2, 'pear', 2.0, NULL),
        (3, 'plum', NULL, x''), (5, 'it''s long: ' || hex(randomblob(200)), -0.125, randomblob(3000));
    INSERT INTO kv VALUES ('a', 1), ('b', 'x'), ('c', x'beef'), ('d', 4.75);
    INSERT INTO log VALUES ('one', 1), ('two', 2), ('three', 3);
";

/// B's row changes from A: updates, inserts and deletes in each table, values changing
/// type, a NULL becoming a value and back.
const B_EDITS: &str = "
    UPDATE items SET name = 'PEAR', qty = 2.5 WHERE id = 2;
    UPDATE items SET data = zeroblob(10) WHERE id = 3;
    DELETE FROM items WHERE id = 1;
    INSERT INTO items VALUES (7, NULL, 1e300, x'0102'), (8, 'fig', 0.0, NULL);
    UPDATE kv SET v = NULL WHERE k = 'b';
    UPDATE kv SET v = 4 WHERE k = 'd';
    DELETE FROM kv WHERE k = 'c';
    INSERT INTO kv VALUES ('e', 'new');
    UPDATE log SET msg = 'ONE' WHERE at = 1;
    DELETE FROM log WHERE at = 2;
    INSERT INTO log VALUES ('four', 4);
";

fn make(path: &Path, mode: Mode, sql: &str) {
    let conn = util::create(path, 4096, mode);
    conn.execute_batch(sql).expect("fill");
}

fn exec(path: &Path, sql: &str) {
    util::open(path).execute_batch(sql).expect("edit");
}

/// A copy of a database (its WAL content included) at `dest`, through `sqlferry push`.
fn copy(dir: &Path, src: &Path, dest: &Path) {
    ok(&run(dir, &[&"push", &src, &dest, &"-q"]), "copy");
}

/// Every table's rows (by rowid or key order), without the schema table: what a
/// changeset must reproduce.
fn rows(path: &Path) -> Vec<(String, Vec<Vec<Value>>)> {
    util::dump(path)
        .into_iter()
        .filter(|(name, _)| name != "sqlite_schema")
        .collect()
}

/// The schema as a set of (type, name, sql), order aside.
fn schema(path: &Path) -> Vec<(String, String, Option<String>)> {
    let conn = util::open(path);
    let mut stmt = conn
        .prepare("SELECT type, name, sql FROM sqlite_schema ORDER BY type, name")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The bytes of a database and its -wal, to say a command changed nothing.
fn bytes(path: &Path) -> (Vec<u8>, Vec<u8>) {
    let wal = util::sidecar(path, "-wal");
    (
        std::fs::read(path).expect("db bytes"),
        std::fs::read(wal).unwrap_or_default(),
    )
}

fn table<'a>(summary: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    summary["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no table {name} in {summary}"))
}

fn counts(t: &serde_json::Value) -> (u64, u64, u64) {
    let n = |f: &str| t[f].as_u64().unwrap_or_else(|| panic!("{f} in {t}"));
    (n("inserted"), n("updated"), n("deleted"))
}

#[test]
fn a_changeset_reproduces_b_in_wal_and_rollback_modes() {
    for mode in [Mode::Wal, Mode::Rollback] {
        let dir = TempDir::new().unwrap();
        let (a, b, c) = (
            dir.path().join("a.db"),
            dir.path().join("b.db"),
            dir.path().join("c.db"),
        );
        make(&a, mode, A_ROWS);
        copy(dir.path(), &a, &b);
        exec(&b, B_EDITS);
        let summary = json(
            &run(dir.path(), &[&"diff", &a, &b, &"--json"]),
            "diff --json",
        );
        assert_eq!(counts(table(&summary, "items")), (2, 2, 1), "{mode:?}");
        assert_eq!(counts(table(&summary, "kv")), (1, 2, 1), "{mode:?}");
        assert_eq!(counts(table(&summary, "log")), (1, 1, 1), "{mode:?}");
        assert_eq!(table(&summary, "log")["by_rowid"], true);
        assert_eq!(table(&summary, "kv")["by_rowid"], false);
        assert!(
            summary["objects"].as_array().unwrap().is_empty(),
            "{summary}"
        );

        let changeset = dir.path().join("a-to-b.changeset");
        ok(
            &run(
                dir.path(),
                &[&"diff", &a, &b, &"--changeset", &changeset, &"-q"],
            ),
            "--changeset",
        );
        copy(dir.path(), &a, &c);
        let out = run(dir.path(), &[&"apply", &changeset, &c, &"--json"]);
        let report = json(&out, "apply");
        assert_eq!(report["applied"], true);
        assert_eq!(report["changes"], 12, "{report}");
        assert_eq!(report["conflicts"], serde_json::json!([]));
        assert_eq!(
            rows(&c),
            rows(&b),
            "{mode:?}: the changeset reproduces B's rows"
        );
        assert_eq!(util::integrity(&c), "ok");
        assert_eq!(
            util::journal_mode(&c),
            mode.pragma(),
            "apply keeps the journal mode"
        );
        let again = ok(&run(dir.path(), &[&"diff", &c, &b]), "diff after apply");
        assert!(again.contains("no differences"), "{again}");

        // The SQL script does the same, the table without a key by rowid included.
        let sql = ok(&run(dir.path(), &[&"diff", &a, &b, &"--sql"]), "--sql");
        let d = dir.path().join("d.db");
        copy(dir.path(), &a, &d);
        util::open(&d)
            .execute_batch(&sql)
            .unwrap_or_else(|e| panic!("{e}:\n{sql}"));
        assert_eq!(
            rows(&d),
            rows(&b),
            "{mode:?}: the script reproduces B's rows:\n{sql}"
        );
    }
}

#[test]
fn rows_are_listed_by_key_with_old_and_new_values_and_json_gives_them_whole() {
    let dir = TempDir::new().unwrap();
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    make(&a, Mode::Wal, A_ROWS);
    copy(dir.path(), &a, &b);
    exec(&b, B_EDITS);
    exec(&b, "UPDATE items SET name = 'x' || name WHERE id = 5");
    let text = ok(
        &run(dir.path(), &[&"diff", &a, &b, &"--rows"]),
        "diff --rows",
    );
    for line in [
        "table items: 2 inserted, 3 updated, 1 deleted",
        "table kv: 1 inserted, 2 updated, 1 deleted",
        "table log (by rowid): 1 inserted, 1 updated, 1 deleted",
        "  update id=2: name: 'pear' → 'PEAR', qty: 2.0 → 2.5",
        "  delete id=1: name='apple', qty=1.5, data=x'00ff'",
        "  update k='b': v: 'x' → NULL",
        "  update rowid=1: msg: 'one' → 'ONE'",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        );
    }
    // A long value is cut on a line, with its length.
    let long = text
        .lines()
        .find(|l| l.starts_with("  update id=5"))
        .expect("row 5");
    assert!(long.contains("… (411 chars)"), "{long}");

    let whole = json(
        &run(dir.path(), &[&"diff", &a, &b, &"--rows", &"--json"]),
        "--rows --json",
    );
    let rows = whole["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 13, "{whole}");
    let five = rows
        .iter()
        .find(|r| r["table"] == "items" && r["key"]["id"] == 5)
        .unwrap();
    assert_eq!(
        five["new"]["name"].as_str().unwrap().chars().count(),
        412,
        "whole in JSON"
    );
    let seven = rows.iter().find(|r| r["key"]["id"] == 7).unwrap();
    assert_eq!(seven["op"], "insert");
    assert_eq!(seven["new"]["data"], serde_json::json!({"blob": "0102"}));
    assert_eq!(seven["new"]["qty"], 1e300);
    assert_eq!(seven["new"]["name"], serde_json::Value::Null);
}

#[test]
fn schema_changes_are_named_and_the_sql_script_turns_a_into_b() {
    let dir = TempDir::new().unwrap();
    let (a, b, c) = (
        dir.path().join("a.db"),
        dir.path().join("b.db"),
        dir.path().join("c.db"),
    );
    make(&a, Mode::Rollback, A_ROWS);
    copy(dir.path(), &a, &b);
    exec(
        &b,
        &format!(
            "{B_EDITS}
            ALTER TABLE log ADD COLUMN level TEXT DEFAULT 'info';
            CREATE TABLE tags(id INTEGER PRIMARY KEY, tag TEXT UNIQUE);
            INSERT INTO tags(tag) VALUES ('red'), ('green');
            DROP INDEX items_name;
            CREATE INDEX kv_v ON kv(v);
            CREATE VIEW big AS SELECT * FROM items WHERE qty > 1;"
        ),
    );
    let text = ok(&run(dir.path(), &[&"diff", &a, &b]), "diff");
    for line in [
        "table items: 2 inserted, 2 updated, 1 deleted",
        "table tags: added, 2 rows",
        "index items_name on items: dropped",
        "index kv_v on kv: added",
        "view big on big: added",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "no line {line:?} in:\n{text}"
        );
    }
    let altered = text
        .lines()
        .find(|l| l.starts_with("table log"))
        .expect("log");
    assert!(
        altered.contains("altered") && altered.contains("rows not compared"),
        "{altered}"
    );

    // The changeset carries the rows of the tables whose columns stayed, and says what
    // it left out.
    let changeset = dir.path().join("c.changeset");
    let out = run(dir.path(), &[&"diff", &a, &b, &"--changeset", &changeset]);
    ok(&out, "--changeset");
    let note = util::stderr(&out);
    assert!(
        note.contains("not in it: table log (altered), table tags (added, 2 rows)"),
        "{note}"
    );

    // The script does all of it.
    let sql = ok(&run(dir.path(), &[&"diff", &a, &b, &"--sql"]), "--sql");
    copy(dir.path(), &a, &c);
    util::open(&c)
        .execute_batch(&sql)
        .unwrap_or_else(|e| panic!("{e}:\n{sql}"));
    assert_eq!(rows(&c), rows(&b), "the script reproduces B's rows:\n{sql}");
    assert_eq!(schema(&c), schema(&b), "and B's schema");
    assert_eq!(util::integrity(&c), "ok");
}

#[test]
fn each_on_conflict_mode_does_what_it_says_and_abort_changes_nothing() {
    let dir = TempDir::new().unwrap();
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    make(&a, Mode::Wal, A_ROWS);
    copy(dir.path(), &a, &b);
    exec(&b, B_EDITS);
    let changeset = dir.path().join("x.changeset");
    ok(
        &run(
            dir.path(),
            &[&"diff", &a, &b, &"--changeset", &changeset, &"-q"],
        ),
        "diff",
    );
    // The target moved on from A on its own: row 2 changed (data), row 1 is gone
    // already (not-found), key 'e' exists with another value (conflict).
    let theirs = "UPDATE items SET name = 'poire' WHERE id = 2;
                  DELETE FROM items WHERE id = 1;
                  INSERT INTO kv VALUES ('e', 'theirs');";
    let target = |name: &str| {
        let t = dir.path().join(name);
        copy(dir.path(), &a, &t);
        exec(&t, theirs);
        t
    };

    let t = target("abort.db");
    let before = bytes(&t);
    let out = run(dir.path(), &[&"apply", &changeset, &t]);
    assert_eq!(util::code(&out), 6, "{}", util::stderr(&out));
    // The first conflict met (SQLite's order) stops it.
    let err = util::stderr(&out);
    let met: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("conflict: "))
        .collect();
    assert_eq!(met.len(), 1, "{err}");
    assert!(met[0].ends_with(": aborted"), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    assert_eq!(bytes(&t), before, "abort leaves the database byte for byte");
    let out = run(dir.path(), &[&"apply", &changeset, &t, &"--json"]);
    assert_eq!(util::code(&out), 6);
    let report: serde_json::Value = serde_json::from_str(util::stdout(&out).trim()).unwrap();
    assert_eq!(report["applied"], false);
    assert_eq!(report["conflicts"][0]["resolution"], "aborted");

    let t = target("skip.db");
    let report = json(
        &run(
            dir.path(),
            &[
                &"apply",
                &changeset,
                &t,
                &"--on-conflict",
                &"skip",
                &"--json",
            ],
        ),
        "skip",
    );
    let mut met: Vec<(String, String, String)> = report["conflicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["kind"].as_str().unwrap().into(),
                c["key"].to_string(),
                c["resolution"].as_str().unwrap().into(),
            )
        })
        .collect();
    met.sort();
    assert_eq!(
        met,
        vec![
            ("conflict".into(), "[\"e\"]".into(), "skipped".into()),
            ("data".into(), "[2]".into(), "skipped".into()),
            ("not-found".into(), "[1]".into(), "skipped".into()),
        ]
    );
    let conn = util::open(&t);
    let name: String = conn
        .query_row("SELECT name FROM items WHERE id = 2", [], |r| r.get(0))
        .unwrap();
    assert_eq!(name, "poire", "skip keeps their row");
    let e: String = conn
        .query_row("SELECT v FROM kv WHERE k = 'e'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(e, "theirs");
    let n: i64 = conn
        .query_row("SELECT count(*) FROM items WHERE id IN (7, 8)", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(n, 2, "the rest was applied");

    let t = target("replace.db");
    let text = ok(
        &run(
            dir.path(),
            &[&"apply", &changeset, &t, &"--on-conflict", &"replace"],
        ),
        "replace",
    );
    assert!(
        text.contains("conflict: data, update items key (2): replaced"),
        "{text}"
    );
    assert!(
        text.contains("conflict: not-found, delete items key (1): skipped"),
        "{text}"
    );
    assert!(
        text.contains("conflict: key exists, insert kv key (\"e\"): replaced"),
        "{text}"
    );
    assert!(
        text.lines()
            .last()
            .unwrap()
            .ends_with("12 changes, 3 conflicts"),
        "{text}"
    );
    assert_eq!(rows(&t), rows(&b), "replace: B's values win everywhere");
    assert_eq!(util::integrity(&t), "ok");
}

#[test]
fn garbage_or_a_changeset_that_does_not_fit_changes_nothing() {
    let dir = TempDir::new().unwrap();
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    make(&a, Mode::Rollback, A_ROWS);
    copy(dir.path(), &a, &b);
    exec(&b, B_EDITS);
    let garbage = dir.path().join("garbage");
    let mut noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    noise[0] = b'T';
    std::fs::write(&garbage, &noise).unwrap();
    let before = bytes(&a);
    for file in [&garbage, &b] {
        let out = run(dir.path(), &[&"apply", file, &a]);
        assert_eq!(util::code(&out), 3, "{}", util::stderr(&out));
        let err = util::stderr(&out);
        assert!(
            err.contains("not a SQLite changeset") && err.contains("nothing was changed"),
            "{err}"
        );
        assert_eq!(bytes(&a), before);
    }
    // A changeset of tables the database does not have: refused, not skipped quietly.
    let changeset = dir.path().join("x.changeset");
    ok(
        &run(
            dir.path(),
            &[&"diff", &a, &b, &"--changeset", &changeset, &"-q"],
        ),
        "diff",
    );
    let other = dir.path().join("other.db");
    make(
        &other,
        Mode::Wal,
        "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT);",
    );
    let before = bytes(&other);
    let out = run(dir.path(), &[&"apply", &changeset, &other]);
    assert_eq!(util::code(&out), 2, "{}", util::stderr(&out));
    assert!(
        util::stderr(&out).contains("changes table items but its columns or primary key differ"),
        "{}",
        util::stderr(&out)
    );
    assert_eq!(bytes(&other), before);
    // Not a database to apply to.
    let out = run(dir.path(), &[&"apply", &changeset, &garbage]);
    assert_eq!(util::code(&out), 3, "{}", util::stderr(&out));
    assert_eq!(std::fs::read(&garbage).unwrap(), noise);
}

#[test]
fn apply_while_a_reader_reads_sees_before_then_after() {
    for mode in [Mode::Wal, Mode::Rollback] {
        let dir = TempDir::new().unwrap();
        let (a, b, c) = (
            dir.path().join("a.db"),
            dir.path().join("b.db"),
            dir.path().join("c.db"),
        );
        make(&a, mode, A_ROWS);
        copy(dir.path(), &a, &b);
        exec(&b, B_EDITS);
        copy(dir.path(), &a, &c);
        let changeset = dir.path().join("x.changeset");
        ok(
            &run(
                dir.path(),
                &[&"diff", &a, &b, &"--changeset", &changeset, &"-q"],
            ),
            "diff",
        );
        let reader = util::open(&c);
        let count = |r: &rusqlite::Connection| -> i64 {
            r.query_row("SELECT count(*) FROM items", [], |row| row.get(0))
                .unwrap()
        };
        assert_eq!(count(&reader), 4);
        if mode == Mode::Wal {
            // In WAL mode a reader may even sit in a read transaction throughout.
            reader.execute_batch("BEGIN").unwrap();
            assert_eq!(count(&reader), 4);
            ok(
                &run(dir.path(), &[&"apply", &changeset, &c]),
                "apply beside a reader",
            );
            assert_eq!(count(&reader), 4, "its snapshot holds");
            reader.execute_batch("COMMIT").unwrap();
        } else {
            ok(
                &run(dir.path(), &[&"apply", &changeset, &c]),
                "apply beside a reader",
            );
        }
        assert_eq!(count(&reader), 5, "{mode:?}: the next read sees it all");
        drop(reader);
        assert_eq!(rows(&c), rows(&b));
    }
}

/// `sqlferry` on `m` against `server`.
fn on(m: &Machine, server: &TestServer, args: &[&str]) -> Output {
    m.run_on(server, args)
}

#[test]
fn diff_and_versions_changes_against_a_real_server() {
    let dir = TempDir::new().unwrap();
    let server = TestServer::start(dir.path());
    let mut m = Machine::new(dir.path(), "laptop");
    let scratch = dir.path().join("tmp");
    std::fs::create_dir_all(&scratch).unwrap();
    m.set_env("TMPDIR", scratch.to_str().unwrap());
    let app = m.path("app.db");
    make(&app, Mode::Wal, A_ROWS);
    m.push(
        &server,
        "app.db",
        "acme/app.db",
        &["--key", &server.admin_key],
    );
    exec(&app, B_EDITS);
    m.push(&server, "app.db", "acme/app.db", &[]);
    exec(&app, "INSERT INTO items VALUES (9, 'unpushed', 9.0, NULL)");

    let two = json(
        &on(
            &m,
            &server,
            &["diff", "acme/app.db@1", "acme/app.db@2", "--json"],
        ),
        "diff @1 @2",
    );
    assert_eq!(two["a"]["version"], 1);
    assert_eq!(two["b"]["version"], 2);
    assert_eq!(counts(table(&two, "items")), (2, 2, 1));
    assert_eq!(counts(table(&two, "log")), (1, 1, 1));

    // `-`: the latest version of the replica app.db follows (its last push), here
    // behind app.db by one unpushed row.
    let out = on(
        &m,
        &server,
        &["diff", "acme/app.db@latest", "./app.db", "--rows"],
    );
    let text = ok(&out, "diff @latest app.db");
    assert!(
        text.contains("table items: 1 inserted, 0 updated, 0 deleted"),
        "{text}"
    );
    assert!(
        text.contains("  insert id=9: name='unpushed', qty=9.0, data=NULL"),
        "{text}"
    );
    let out = m.run(["diff", "./app.db", "-", "--json"]);
    let back = json(&out, "diff app.db -");
    assert_eq!(back["b"]["name"], "acme/app.db@latest");
    assert_eq!(back["b"]["version"], 2);
    assert_eq!(counts(table(&back, "items")), (0, 0, 1));

    // A changeset from the server's versions turns version 1 into version 2.
    let v1 = m.path("v1.db");
    m.pull(&server, "acme/app.db@1", Some("v1.db"), &[]);
    let out = on(
        &m,
        &server,
        &[
            "diff",
            "acme/app.db@1",
            "acme/app.db@2",
            "--changeset",
            "v.changeset",
            "-q",
        ],
    );
    ok(&out, "--changeset from versions");
    ok(&m.run(["apply", "v.changeset", "v1.db"]), "apply");
    let v2 = m.path("v2.db");
    m.pull(&server, "acme/app.db@2", Some("v2.db"), &[]);
    assert_eq!(rows(&v1), rows(&v2));

    let versions = json(
        &on(
            &m,
            &server,
            &["versions", "acme/app.db", "--changes", "--json"],
        ),
        "versions --changes",
    );
    let list = versions.as_array().unwrap();
    assert_eq!(list.len(), 2);
    let first = &list[0]["changes"];
    assert!(
        first
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "items" && t["status"] == "added" && t["rows"] == 4),
        "{first}"
    );
    let second = serde_json::json!({"tables": list[1]["changes"].clone()});
    assert_eq!(counts(table(&second, "kv")), (1, 2, 1));
    let limited = json(
        &on(
            &m,
            &server,
            &[
                "versions",
                "acme/app.db",
                "--changes",
                "--last",
                "1",
                "--json",
            ],
        ),
        "--last 1",
    );
    assert_eq!(
        limited[0]["changes"],
        serde_json::Value::Null,
        "not looked at"
    );
    assert!(limited[1]["changes"].is_array());
    let text = ok(
        &on(&m, &server, &["versions", "acme/app.db", "--changes"]),
        "versions text",
    );
    assert!(
        text.contains("items: 2 inserted, 2 updated, 1 deleted"),
        "{text}"
    );

    // Every scratch file is gone.
    let left: Vec<PathBuf> = std::fs::read_dir(&scratch)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "scratch files left: {left:?}");
}

#[test]
fn a_side_that_is_not_there_or_not_a_database_is_a_clear_error() {
    let dir = TempDir::new().unwrap();
    let a = dir.path().join("a.db");
    make(&a, Mode::Wal, A_ROWS);
    let missing = dir.path().join("missing.db");
    let out = run(dir.path(), &[&"diff", &a, &missing]);
    assert_eq!(util::code(&out), 3, "{}", util::stderr(&out));
    assert!(util::stderr(&out).contains("missing.db"));
    let text = dir.path().join("notes.txt");
    std::fs::write(
        &text,
        "just some words, long enough to be no SQLite header at all....",
    )
    .unwrap();
    let out = run(dir.path(), &[&"diff", &a, &text]);
    assert_eq!(util::code(&out), 3, "{}", util::stderr(&out));
    assert!(
        util::stderr(&out).contains("not an SQLite database"),
        "{}",
        util::stderr(&out)
    );
    // `-` needs a file on the other side that follows a replica.
    let out = run(dir.path(), &[&"diff", &a, &"-"]);
    assert_eq!(util::code(&out), 2, "{}", util::stderr(&out));
    assert!(
        util::stderr(&out).contains("cannot tell which replica it follows"),
        "{}",
        util::stderr(&out)
    );
}

/// `sqldiff` (Debian's sqlite3-tools): required, installed by `.ci/run`.
fn sqldiff() -> Command {
    let found = Command::new("sqldiff").arg("--help").output();
    assert!(
        found.is_ok(),
        "sqldiff is missing: install it (apt-get install sqlite3-tools); .ci/run does"
    );
    Command::new("sqldiff")
}

#[test]
fn changesets_are_the_ones_sqldiff_writes_and_the_counts_are_its_counts() {
    let dir = TempDir::new().unwrap();
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    // sqldiff's changesets cover tables with a primary key.
    let pk_only = A_ROWS.replace(
        "CREATE TABLE log(msg TEXT, at INTEGER);",
        "CREATE TABLE log(msg TEXT, at INTEGER PRIMARY KEY);",
    );
    make(&a, Mode::Rollback, &pk_only);
    copy(dir.path(), &a, &b);
    exec(&b, B_EDITS);
    util::checkpoint(&b);

    // Theirs applied by us.
    let theirs = dir.path().join("theirs.changeset");
    let out = sqldiff()
        .arg("--changeset")
        .arg(&theirs)
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = dir.path().join("c.db");
    copy(dir.path(), &a, &c);
    ok(
        &run(dir.path(), &[&"apply", &theirs, &c]),
        "apply sqldiff's changeset",
    );
    assert_eq!(rows(&c), rows(&b));

    // Ours: the same changes (a changeset's order of rows is SQLite's hash order, so
    // compared as sets through apply), and the same counts as sqldiff --summary.
    let ours = dir.path().join("ours.changeset");
    ok(
        &run(dir.path(), &[&"diff", &a, &b, &"--changeset", &ours, &"-q"]),
        "ours",
    );
    let d = dir.path().join("d.db");
    copy(dir.path(), &a, &d);
    ok(&run(dir.path(), &[&"apply", &ours, &d]), "apply ours");
    assert_eq!(rows(&d), rows(&c));

    let out = sqldiff().arg("--summary").arg(&a).arg(&b).output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout).into_owned();
    let mine = json(
        &run(dir.path(), &[&"diff", &a, &b, &"--json"]),
        "diff --json",
    );
    assert!(summary.lines().count() >= 3, "{summary}");
    for line in summary.lines() {
        // "items: 2 changes, 2 inserts, 1 deletes, 1 unchanged"
        let (name, rest) = line.split_once(": ").expect("table: figures");
        let figures: Vec<u64> = rest
            .split(", ")
            .map(|f| f.split(' ').next().unwrap().parse().unwrap())
            .collect();
        if figures[..3] == [0, 0, 0] {
            // Unchanged (sqldiff 3.40 also lists a phantom `t` this way): not ours to list.
            let listed = mine["tables"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["name"] == name);
            assert!(!listed, "{name} has no changes for sqldiff: {mine}");
            continue;
        }
        let (ins, upd, del) = counts(table(&mine, name));
        assert_eq!(
            (upd, ins, del),
            (figures[0], figures[1], figures[2]),
            "{name}: {line}"
        );
    }
}

#[test]
fn help_of_diff_apply_and_versions_teaches_with_examples() {
    let dir = TempDir::new().unwrap();
    for (command, must) in [
        ("diff", "sqlferry diff app.db -"),
        ("apply", "sqlferry apply c.bin app.db --on-conflict skip"),
        ("versions", "sqlferry versions acme/app.db --changes"),
    ] {
        let help = ok(&run(dir.path(), &[&command, &"--help"]), "help");
        assert!(
            help.contains("Examples:") && help.contains(must),
            "{command}:\n{help}"
        );
    }
    // --last means nothing without --changes.
    let out = run(dir.path(), &[&"versions", &"acme/app.db", &"--last", &"3"]);
    assert_eq!(util::code(&out), 2, "{}", util::stderr(&out));
}

#[test]
fn a_diff_stopped_by_sigint_leaves_no_scratch_file() {
    use std::time::Duration;
    let dir = TempDir::new().unwrap();
    let scratch = dir.path().join("tmp");
    std::fs::create_dir_all(&scratch).unwrap();
    let a = dir.path().join("a.db");
    make(&a, Mode::Wal, A_ROWS);
    // A "server" that takes the connection and never answers: the pull into the
    // scratch file hangs there until the signal comes.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let held = std::thread::spawn(move || listener.accept().map(|(stream, _)| stream));
    let mut child = util::sqlferry(dir.path())
        .env("TMPDIR", &scratch)
        .arg("diff")
        .arg(&a)
        .arg("acme/app.db@1")
        .args(["--server", &url, "--key", "sfk_not_needed_here"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let created = util::wait_until(Duration::from_secs(30), Duration::from_millis(10), || {
        std::fs::read_dir(&scratch).unwrap().next().is_some()
    });
    assert!(created, "the diff made its scratch directory");
    let _stream = held.join().unwrap().expect("the diff connected");
    crate::server::signal(&child, "INT");
    let status = crate::server::wait_for_exit(&mut child, Duration::from_secs(30))
        .expect("the diff stops on SIGINT");
    assert_eq!(status.code(), Some(130));
    let left: Vec<PathBuf> = std::fs::read_dir(&scratch)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "scratch files left after SIGINT: {left:?}");
}
