//! The command line as a user meets it: bad input gets the documented exit code and one
//! error line naming the file and the cause, and leaves DEST exactly as it was; `verify`
//! tells a corrupt database apart; help texts carry their examples.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use tempfile::TempDir;

use crate::util::{self, Mode};

const EXIT_LOCAL: i32 = 3;
const EXIT_VERIFY: i32 = 7;

/// A small valid database to push.
fn source(dir: &Path) -> PathBuf {
    let path = dir.join("src.db");
    util::fill(&util::create(&path, 4096, Mode::Rollback), 100_000, 200);
    path
}

/// What is at `path`, byte for byte, with its sidecar files (`None` when absent).
fn snapshot_files(path: &Path) -> Vec<(String, Option<Vec<u8>>)> {
    ["", "-journal", "-wal", "-shm"]
        .into_iter()
        .map(|suffix| {
            let p = util::sidecar(path, suffix);
            (suffix.to_owned(), std::fs::read(&p).ok())
        })
        .collect()
}

fn push(dir: &Path, src: &Path, dest: &Path) -> Output {
    util::run(
        dir,
        &[OsStr::new("push"), src.as_os_str(), dest.as_os_str()],
    )
}

/// Asserts the failure a user should see: `code`, and exactly one stderr line
/// `sqlferry: error: …` that names `file` and contains `cause`.
fn assert_fails(out: &Output, code: i32, file: &Path, cause: &str) {
    let err = util::stderr(out);
    assert_eq!(util::code(out), code, "exit code; stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one error line: {err:?}");
    assert!(err.starts_with("sqlferry: error: "), "{err}");
    assert!(
        err.contains(&*file.to_string_lossy()),
        "the error names {}: {err}",
        file.display()
    );
    assert!(
        err.to_lowercase().contains(&cause.to_lowercase()),
        "the error says '{cause}': {err}"
    );
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout: {:?}",
        util::stdout(out)
    );
}

/// A replica that exists and holds a copy of an older state of `src`.
fn existing_replica(dir: &Path, src: &Path) -> PathBuf {
    let dest = dir.join("replica.db");
    util::push_json(src, &dest);
    util::insert_rows(&util::open(src), 100, 200);
    dest
}

#[test]
fn src_not_sqlite_is_refused_and_dest_untouched() {
    let dir = TempDir::new().expect("tempdir");
    let src = dir.path().join("notes.txt");
    std::fs::write(
        &src,
        "this is not a database, just some text that is long enough ".repeat(5),
    )
    .expect("write text");
    let src_bytes = std::fs::read(&src).expect("read SRC");
    // DEST does not exist: it must not be created.
    let new_dest = dir.path().join("new.db");
    let out = push(dir.path(), &src, &new_dest);
    assert_fails(&out, EXIT_LOCAL, &src, "not an SQLite database");
    assert!(
        snapshot_files(&new_dest).iter().all(|(_, f)| f.is_none()),
        "no DEST file was created"
    );
    assert_eq!(
        std::fs::read(&src).expect("read SRC"),
        src_bytes,
        "SRC untouched"
    );
    // DEST exists: it must not change.
    let real = source(dir.path());
    let dest = existing_replica(dir.path(), &real);
    let before = snapshot_files(&dest);
    let out = push(dir.path(), &src, &dest);
    assert_fails(&out, EXIT_LOCAL, &src, "not an SQLite database");
    assert_eq!(snapshot_files(&dest), before, "DEST untouched");
}

#[test]
fn src_missing_is_refused_and_dest_untouched() {
    let dir = TempDir::new().expect("tempdir");
    let src = dir.path().join("missing.db");
    let new_dest = dir.path().join("new.db");
    let out = push(dir.path(), &src, &new_dest);
    assert_fails(&out, EXIT_LOCAL, &src, "no such file");
    assert!(!new_dest.exists(), "no DEST was created");
    assert!(!src.exists(), "SRC was not created either");

    let real = source(dir.path());
    let dest = existing_replica(dir.path(), &real);
    let before = snapshot_files(&dest);
    let out = push(dir.path(), &src, &dest);
    assert_fails(&out, EXIT_LOCAL, &src, "no such file");
    assert_eq!(snapshot_files(&dest), before, "DEST untouched");
}

#[test]
fn dest_directory_missing_is_refused() {
    let dir = TempDir::new().expect("tempdir");
    let src = source(dir.path());
    let missing = dir.path().join("no-such-dir");
    let dest = missing.join("copy.db");
    let out = push(dir.path(), &src, &dest);
    assert_fails(&out, EXIT_LOCAL, &missing, "does not exist");
    assert!(!missing.exists(), "the directory was not created");
}

#[test]
fn dest_under_a_regular_file_is_refused() {
    let dir = TempDir::new().expect("tempdir");
    let src = source(dir.path());
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"hello").expect("write file");
    let dest = file.join("copy.db");
    let out = push(dir.path(), &src, &dest);
    assert_fails(&out, EXIT_LOCAL, &file, "not a directory");
    assert_eq!(std::fs::read(&file).expect("read file"), b"hello");
}

#[test]
fn dest_not_sqlite_is_refused_and_untouched() {
    let dir = TempDir::new().expect("tempdir");
    let src = source(dir.path());
    for (name, bytes) in [
        (
            "text.db",
            b"just some text, long enough to hold a header: ".repeat(4),
        ),
        ("short.db", b"SQLite".to_vec()),
        ("zeros.db", vec![0u8; 8192]),
    ] {
        let dest = dir.path().join(name);
        std::fs::write(&dest, &bytes).expect("write DEST");
        let before = snapshot_files(&dest);
        let out = push(dir.path(), &src, &dest);
        assert_fails(&out, EXIT_LOCAL, &dest, "not an SQLite database");
        assert_eq!(snapshot_files(&dest), before, "{name} untouched");
    }
}

/// Whether this process ignores file permission bits (root, or CAP_DAC_OVERRIDE), found
/// by trying to write a file that says it is read-only.
pub(crate) fn permissions_ignored(dir: &Path) -> bool {
    let probe = dir.join("probe");
    std::fs::write(&probe, b"x").expect("write probe");
    std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o444)).expect("chmod");
    let writable = std::fs::OpenOptions::new().write(true).open(&probe).is_ok();
    std::fs::remove_file(&probe).expect("remove probe");
    writable
}

/// The user that `push` runs as in the permission tests: this one, or `nobody` when
/// this one ignores permissions (tests run as root in CI), so that mode bits bite.
pub(crate) fn as_permission_bound_user(dir: &Path, cmd: &mut std::process::Command) {
    if permissions_ignored(dir) {
        // nobody must be able to reach and read SRC.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        cmd.uid(65534).gid(65534);
    }
}

#[test]
fn read_only_dest_is_refused_and_untouched() {
    let dir = TempDir::new().expect("tempdir");
    let src = source(dir.path());
    let dest = existing_replica(dir.path(), &src);
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o444)).expect("chmod");
    let before = snapshot_files(&dest);
    let mut cmd = util::sqlferry(dir.path());
    cmd.arg("push").arg(&src).arg(&dest);
    as_permission_bound_user(dir.path(), &mut cmd);
    let out = cmd.output().expect("run push");
    assert_fails(&out, EXIT_LOCAL, &dest, "permission denied");
    assert_eq!(snapshot_files(&dest), before, "DEST untouched");
}

#[test]
fn dest_in_read_only_directory_is_refused_and_untouched() {
    let dir = TempDir::new().expect("tempdir");
    let src = source(dir.path());
    let sub = dir.path().join("locked");
    std::fs::create_dir(&sub).expect("mkdir");
    let dest = sub.join("replica.db");
    util::push_json(&src, &dest);
    util::insert_rows(&util::open(&src), 300, 500);
    // The file may be written, but no journal can be created next to it.
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    let before = snapshot_files(&dest);
    let mut cmd = util::sqlferry(dir.path());
    cmd.arg("push").arg(&src).arg(&dest);
    as_permission_bound_user(dir.path(), &mut cmd);
    let out = cmd.output().expect("run push");
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let err = util::stderr(&out);
    assert_eq!(util::code(&out), EXIT_LOCAL, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&*dest.to_string_lossy()), "names DEST: {err}");
    assert_eq!(snapshot_files(&dest), before, "DEST untouched");
}

#[test]
fn new_dest_in_read_only_directory_is_refused_naming_dest_and_nothing_is_created() {
    let dir = TempDir::new().expect("tempdir");
    let src = source(dir.path());
    let sub = dir.path().join("locked");
    std::fs::create_dir(&sub).expect("mkdir");
    let dest = sub.join("new.db");
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    let mut cmd = util::sqlferry(dir.path());
    cmd.arg("push").arg(&src).arg(&dest);
    as_permission_bound_user(dir.path(), &mut cmd);
    let out = cmd.output().expect("run push");
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    assert_fails(&out, EXIT_LOCAL, &dest, "permission denied");
    let left: Vec<_> = std::fs::read_dir(&sub).expect("read dir").collect();
    assert!(left.is_empty(), "nothing created: {left:?}");
}

#[test]
fn successful_push_and_verify_agree() {
    let dir = TempDir::new().expect("tempdir");
    let src = source(dir.path());
    let dest = dir.path().join("copy.db");
    let report = util::push_json(&src, &dest);
    for field in [
        "page_size",
        "pages_total",
        "pages_sent",
        "bytes_sent",
        "bytes_received",
        "hash_bytes",
        "duration_ms",
        "digest",
    ] {
        assert!(
            report.get(field).is_some(),
            "push --json has {field}: {report}"
        );
    }
    assert_eq!(report["pages_total"], util::page_count(&src));
    assert_eq!(report["pages_sent"], report["pages_total"]);
    let digest = util::digest(&src);
    assert_eq!(report["digest"], digest.as_str());
    for file in [&src, &dest] {
        let (code, verify, err) = util::verify_json(file);
        assert_eq!(code, 0, "{err}");
        let verify = verify.expect("verify --json report");
        assert_eq!(verify["digest"], digest.as_str());
        assert_eq!(verify["page_count"], util::page_count(&src));
        assert_eq!(verify["integrity"], serde_json::json!(["ok"]));
    }
    // Quiet: nothing on stdout or stderr when all is well.
    let out = util::run(
        dir.path(),
        &[
            OsStr::new("push"),
            src.as_os_str(),
            dest.as_os_str(),
            OsStr::new("-q"),
        ],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
}

/// The page numbers of b-tree pages of the given type (0x0d table leaf, 0x0a index
/// leaf, 0x05 table interior, 0x02 index interior), read from the file.
fn pages_of_type(bytes: &[u8], page_size: usize, kind: u8) -> Vec<usize> {
    (2..=bytes.len() / page_size)
        .filter(|pgno| bytes[(pgno - 1) * page_size] == kind)
        .collect()
}

/// A healthy database in `dir` and its bytes. Its content is fixed, not random, so the
/// same damage has the same effect on every run.
fn corruptible(dir: &Path, name: &str) -> (PathBuf, Vec<u8>) {
    let path = dir.join(name);
    let conn = util::create(&path, 4096, Mode::Rollback);
    conn.execute_batch(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
         INSERT INTO t(k, v) SELECT printf('%x', i * 2654435761 % 4294967296),
                                    CAST(printf('%0300d', i) AS BLOB) FROM n",
    )
    .expect("fixed rows");
    drop(conn);
    assert_eq!(util::integrity(&path), "ok");
    let bytes = std::fs::read(&path).expect("read db");
    (path, bytes)
}

#[test]
fn verify_exits_7_when_integrity_check_finds_problems() {
    let dir = TempDir::new().expect("tempdir");
    let (path, mut bytes) = corruptible(dir.path(), "broken-cells.db");
    // Garbage over the cell pointers of a table leaf: cells out of range.
    let leaves = pages_of_type(&bytes, 4096, 0x0d);
    assert!(leaves.len() > 10, "the table has leaf pages");
    let at = (leaves[leaves.len() / 2] - 1) * 4096;
    bytes[at + 8..at + 40].fill(0xaa);
    std::fs::write(&path, &bytes).expect("write corrupt copy");
    let (code, report, err) = util::verify_json(&path);
    assert_eq!(code, EXIT_VERIFY, "{err}");
    let report = report.unwrap_or_else(|| panic!("verify --json still reports; stderr: {err}"));
    assert_ne!(report["integrity"], serde_json::json!(["ok"]));
}

#[test]
fn verify_exits_7_when_a_btree_page_is_destroyed() {
    // Damage like this makes SQLite's integrity check itself fail with SQLITE_CORRUPT
    // instead of listing problems; the database is corrupt all the same, and scripts
    // tell "corrupt" (7) from "cannot read the file" (3) by the exit code.
    let dir = TempDir::new().expect("tempdir");
    let mut wrong = Vec::new();
    for (name, kind, damage) in [
        ("zeroed-table-leaf.db", 0x0d_u8, 0..4096),
        ("zeroed-index-leaf.db", 0x0a, 0..4096),
        ("index-leaf-cell-pointers.db", 0x0a, 8..40),
    ] {
        let (path, mut bytes) = corruptible(dir.path(), name);
        let pages = pages_of_type(&bytes, 4096, kind);
        let at = (pages[pages.len() / 2] - 1) * 4096;
        bytes[at + damage.start..at + damage.end].fill(0);
        std::fs::write(&path, &bytes).expect("write corrupt copy");
        let (code, _, err) = util::verify_json(&path);
        if code != EXIT_VERIFY {
            wrong.push(format!("{name}: exit {code}, {}", err.trim()));
        }
    }
    assert!(
        wrong.is_empty(),
        "corrupt databases not reported with exit 7:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn verify_of_what_is_not_a_database_exits_7_and_of_a_missing_file_3() {
    let dir = TempDir::new().expect("tempdir");
    let text = dir.path().join("text.db");
    std::fs::write(
        &text,
        "not a database at all, not a database at all, not at all ".repeat(3),
    )
    .expect("write");
    let missing = dir.path().join("missing.db");
    // A file that is there but is no database failed the verification; one that is not
    // there could not be verified at all.
    for (file, code, cause) in [
        (&text, EXIT_VERIFY, "not an SQLite database"),
        (&missing, EXIT_LOCAL, "no such file"),
    ] {
        let out = util::run(dir.path(), &[OsStr::new("verify"), file.as_os_str()]);
        assert_fails(&out, code, file, cause);
    }
}

#[test]
fn help_of_push_and_verify_shows_examples() {
    let dir = TempDir::new().expect("tempdir");
    for command in ["push", "verify", "retention", "prune"] {
        let out = util::run(dir.path(), &[OsStr::new(command), OsStr::new("--help")]);
        assert_eq!(util::code(&out), 0);
        let help = util::stdout(&out);
        assert!(
            help.contains("Examples:") && help.contains(&format!("sqlferry {command} ")),
            "`sqlferry {command} --help` shows examples:\n{help}"
        );
    }
}

#[test]
fn a_version_names_its_user_by_uid_when_user_is_unset() {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().unwrap();
    let src = source(dir.path());
    let out = crate::util::sqlferry(dir.path())
        .env_remove("USER")
        .env_remove("LOGNAME")
        .args(["push".as_ref(), src.as_os_str(), "acme/app.db".as_ref()])
        .output()
        .unwrap();
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let out = util::run(
        dir.path(),
        &[
            "versions".as_ref(),
            "acme/app.db".as_ref(),
            "--json".as_ref(),
        ],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let versions: serde_json::Value = serde_json::from_str(&util::stdout(&out)).unwrap();
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    let client = versions[0]["client_id"].as_str().unwrap();
    assert!(
        client.starts_with(&format!("uid{uid}@")) && client.len() > format!("uid{uid}@").len(),
        "{versions}"
    );
}

#[test]
fn a_usage_error_reads_like_every_other_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = util::run(dir.path(), &["push".as_ref(), "--bogus".as_ref()]);
    assert_eq!(util::code(&out), 2);
    let err = util::stderr(&out);
    assert!(
        err.starts_with("sqlferry: error: unexpected argument '--bogus'"),
        "{err}"
    );
    assert!(err.contains("Usage: sqlferry push"), "{err}");
    let out = util::run(dir.path(), &["--version".as_ref()]);
    assert_eq!(util::code(&out), 0);
    assert!(util::stdout(&out).starts_with("sqlferry "), "{out:?}");
}

#[test]
fn completions_load_in_bash_and_man_pages_render() {
    let dir = tempfile::tempdir().unwrap();
    let out = util::run(dir.path(), &["completions".as_ref(), "bash".as_ref()]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let script = dir.path().join("sqlferry.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    let loaded = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p sqlferry",
            script.display()
        ))
        .output()
        .expect("run bash");
    assert!(loaded.status.success(), "{loaded:?}");
    assert!(
        util::stdout(&loaded).contains("-F _sqlferry sqlferry"),
        "{loaded:?}"
    );
    let out = util::run(dir.path(), &["completions".as_ref(), "zsh".as_ref()]);
    assert!(
        util::stdout(&out).starts_with("#compdef sqlferry"),
        "{out:?}"
    );

    let out = util::run(dir.path(), &["man".as_ref(), "push".as_ref()]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let roff = util::stdout(&out);
    assert!(roff.contains(".TH sqlferry-push 1"), "{roff}");
    let page = dir.path().join("sqlferry-push.1");
    std::fs::write(&page, &out.stdout).unwrap();
    // `man` renders it: required in CI (.ci/run installs man-db), used wherever it is.
    let has_man = std::process::Command::new("man")
        .arg("--version")
        .output()
        .is_ok();
    assert!(
        has_man || std::env::var_os("CI").is_none(),
        "man is missing in CI"
    );
    if has_man {
        let shown = std::process::Command::new("man")
            .arg("-l")
            .arg(&page)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .output()
            .expect("run man");
        assert!(shown.status.success(), "{shown:?}");
        let text = util::stdout(&shown);
        assert!(text.contains("sqlferry-push"), "{text}");
        assert!(text.contains("--wait-idle"), "{text}");
    }
    let out = util::run(dir.path(), &["man".as_ref(), "nope".as_ref()]);
    assert_eq!(util::code(&out), 2);
    assert!(
        util::stderr(&out).contains("no command nope"),
        "{}",
        util::stderr(&out)
    );
    let pages = dir.path().join("man1");
    let out = util::run(
        dir.path(),
        &["man".as_ref(), "--dir".as_ref(), pages.as_os_str()],
    );
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    assert!(pages.join("sqlferry.1").is_file() && pages.join("sqlferry-pull.1").is_file());
}

#[test]
fn help_names_the_directories_where_they_really_are() {
    // util::sqlferry sets HOME to DIR/.home and XDG_CONFIG_HOME to DIR/.home/config.
    let dir = tempfile::tempdir().unwrap();
    let out = util::run(dir.path(), &["help".as_ref(), "push".as_ref()]);
    assert_eq!(util::code(&out), 0, "{}", util::stderr(&out));
    let help = util::stdout(&out);
    assert!(help.contains("~/config/sqlferry/secrets.json"), "{help}");
    assert!(help.contains("~/data/sqlferry"), "{help}");
    assert!(!help.contains("~/.config/sqlferry"), "{help}");
}
