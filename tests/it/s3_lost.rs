//! A bucket emptied (or lost and replaced by an empty one) under a running `sqlferry
//! serve --store s3://…`, on the real SeaweedFS of `seaweed`: a pull of a version the
//! server had seen fails saying the bucket lost it (exit 10) and leaves the local copy
//! as it was; the next push starts the replica anew at version 1, writing every page
//! again (the server forgot what its cache knew), and that version pulls back whole on
//! a new machine and into the old copy.
//!
//! Every wait is on a process's exit.

use tempfile::TempDir;

use crate::s3_gc::objects;
use crate::s3_serve::{new_location, objects_under, s3_server};
use crate::server::{DbState, Machine, assert_fails, exec, small_db};

/// Exit code: the server failed on its own side (docs/exit-codes.md).
const EXIT_SERVER: i32 = 10;

/// Deletes every object under `location`, behind the servers' backs.
fn empty(location: &str) {
    let (objects, rt) = objects(location);
    let prefix = "sqlferry/";
    for (key, _) in objects_under(location) {
        let key = key
            .strip_prefix(prefix)
            .expect("under the prefix")
            .to_owned();
        rt.block_on(objects.delete(&key)).expect("delete an object");
    }
    assert!(objects_under(location).is_empty(), "the bucket is empty");
}

#[test]
fn a_bucket_emptied_under_a_running_server_is_said_and_the_next_push_writes_it_again() {
    let dir = TempDir::new().expect("tempdir");
    let location = new_location();
    let a = s3_server(dir.path(), "a", &location, &[], None);
    let admin = a.admin_key.clone();
    let m = Machine::new(dir.path(), "m");
    let path = m.path("app.db");
    small_db(&path, 256 << 10);
    m.push(&a, "app.db", "acme/app.db", &["--key", &admin]);
    let first = DbState::of(&path);
    let other = Machine::new(dir.path(), "other");
    other.pull(&a, "acme/app.db", Some("copy.db"), &["--key", &admin]);
    first.assert_held_by(&other.path("copy.db"), "the first pull");

    empty(&location);

    // A pull: the version the server saw is gone; said, and the copy left alone.
    let out = other.run_on(&a, ["pull", "acme/app.db", "copy.db", "--key", &admin]);
    let line = assert_fails(&out, EXIT_SERVER, "is gone");
    assert!(line.contains("acme/app.db@1"), "{line}");
    assert!(line.contains("emptied, replaced or lost"), "{line}");
    first.assert_held_by(&other.path("copy.db"), "the copy after the failed pull");

    // The next push starts the replica anew: every page written again.
    exec(&path, "UPDATE t SET v = randomblob(300) WHERE id % 5 = 0");
    let second = DbState::of(&path);
    let r = m.push(&a, "app.db", "acme/app.db", &["--key", &admin]);
    assert_eq!(r.u64("version"), 1, "{:?}", r.0);
    let keys: Vec<String> = objects_under(&location)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert!(
        keys.iter()
            .any(|k| k.contains("/packs/") && k.ends_with(".pack")),
        "a pack written again: {keys:?}"
    );
    let third = Machine::new(dir.path(), "third");
    third.pull(&a, "acme/app.db", Some("new.db"), &["--key", &admin]);
    second.assert_held_by(&third.path("new.db"), "a new machine's pull");
    other.pull(&a, "acme/app.db", Some("copy.db"), &["--key", &admin]);
    second.assert_held_by(&other.path("copy.db"), "the old copy's pull");
}
