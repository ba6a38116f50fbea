//! A first sync, end to end: makes a real SQLite database, copies it with sqlferry's
//! engine, changes a few rows while keeping the database open, syncs again (only the
//! changed pages travel), and checks that the copy has the origin's rows and digest.
//!
//! Run it from a fresh clone with `cargo run --bin sqlferry-quickstart [DIR]` (default
//! DIR: `target/quickstart`). It leaves `app.db` and `backup.db` in DIR for you to try
//! the `sqlferry` command on.
//!
//! A binary of the package rather than an example because an example builds every
//! dev-dependency (proptest, rcgen) before it can run; this builds only what the
//! `sqlferry` binary needs, in the same profile the README's next commands reuse.

use std::path::{Path, PathBuf};

use rusqlite::Connection;
use sqlferry::engine::{NoProgress, SyncStats, sync_local};
use sqlferry::page::{Snapshot, Writer};

fn push(app: &Path, backup: &Path) -> anyhow::Result<SyncStats> {
    let mut source = Snapshot::open(app)?;
    let mut target = Writer::open(backup)?;
    Ok(sync_local(&mut source, &mut target, &NoProgress)?)
}

fn report(what: &str, s: &SyncStats) {
    println!(
        "{what:<28} {:>6} of {:>6} pages sent, {:>9} bytes sent, {:>6} bytes of hashes, {:>7.1?}",
        s.pages_sent, s.pages_total, s.bytes_sent, s.hash_bytes, s.duration
    );
}

fn rows(db: &Connection) -> anyhow::Result<Vec<(i64, String)>> {
    let mut stmt = db.prepare("SELECT id, note FROM notes ORDER BY id")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/quickstart".into()),
    );
    std::fs::create_dir_all(&dir)?;
    let app = dir.join("app.db");
    let backup = dir.join("backup.db");
    for f in [
        "app.db",
        "app.db-wal",
        "app.db-shm",
        "backup.db",
        "backup.db-wal",
        "backup.db-shm",
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }

    // An application's database: WAL mode, 20,000 rows, about 10 MB.
    let db = Connection::open(&app)?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.execute_batch("CREATE TABLE notes(id INTEGER PRIMARY KEY, note TEXT NOT NULL)")?;
    db.execute_batch("BEGIN")?;
    for i in 0..20_000 {
        db.execute(
            "INSERT INTO notes(note) VALUES (?1)",
            [format!("note {i} {}", "·".repeat(200))],
        )?;
    }
    db.execute_batch("COMMIT")?;
    println!(
        "made {} ({} bytes)",
        app.display(),
        std::fs::metadata(&app)?.len()
    );

    report("first push (full copy)", &push(&app, &backup)?);
    report("second push (no change)", &push(&app, &backup)?);

    // Change 100 neighbouring rows. The application keeps its connection open: the
    // changes are still in the WAL, and sqlferry reads them there.
    db.execute(
        "UPDATE notes SET note = 'edited ' || id WHERE id BETWEEN 5000 AND 5099",
        [],
    )?;
    report("third push (100 rows)", &push(&app, &backup)?);

    let copy = Connection::open(&backup)?;
    anyhow::ensure!(
        rows(&copy)? == rows(&db)?,
        "the backup's rows differ from the app's"
    );
    let check: String = copy.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    anyhow::ensure!(check == "ok", "integrity check of the backup: {check}");
    println!(
        "backup has the app's {} rows; integrity check: {check}",
        rows(&copy)?.len()
    );
    println!();
    println!("Now try the command line:");
    println!("  cargo run -- verify {}", backup.display());
    println!(
        "  cargo run -- push {} {} --json",
        app.display(),
        backup.display()
    );
    Ok(())
}
