//! sqlferry's integration tests: one binary, one module per area (see STYLE.md: every
//! extra test binary relinks tokio and rusqlite).
//!
//! - `chunked`: the chunked digest in the embedded store: recorded for every version,
//!   filled for a replica file made before it from its manifest alone, and a push by
//!   chunks refusing a base that is not what it claims.
//! - `engine`: what a sync makes of new, existing, differently sized and large replicas,
//!   and what it sends.
//! - `daemon`: `sqlferry daemon` with a configuration of several databases, copies and
//!   a watched directory, a real server, SIGHUP reloads, systemd's notify socket.
//! - `daemon_passphrase`: the daemon's `passphrase_file`: push and pull units of a
//!   passphrase replica (a server and the embedded store), pull units without the
//!   right key backing off with their databases untouched, both keys refused.
//! - `disk_full`: a real tmpfs filled under encrypted (key file, passphrase) and plaintext
//!   pulls into new and open older LOCAL files and pushes into the embedded store: one
//!   line saying the disk is full (exit 3), nothing changed or left beside LOCAL, the
//!   store's versions as they were; pulls and pushes killed there; a push or pull
//!   whose local history has no room refused before it commits; plain retries with
//!   room again.
//! - `cli`: exit codes, error lines and untouched files for bad input; help texts.
//! - `live`: real second processes writing the origin, reading the replica, or killing a
//!   push half-way.
//! - `sync_props`: random edit sequences, synced after every step.
//! - `watch`: the push subscriber's watcher on real databases, written by other
//!   connections and processes.
//! - `subscribe`: push and pull subscribers as processes, with a writer, readers, a
//!   server killed and restarted, sync-now.
//! - `trust_client`: the client never loses what the user wrote: pulls over unpushed
//!   changes refused, bases kept per replica, keys never lost, corrupt sources refused.
//! - `hostile`: a hostile user against the no-change push that reads nothing (every
//!   way to change a database while the facts it trusts stay put; it writes only its
//!   line in the sync log), `apply` onto databases it cannot write, and `versions` of
//!   thousands of versions over a server.
//! - `house`: one runtime (nothing below `cli` builds one), one signal handler.
//! - `trust_store`: damaged stored pages found, refused and repaired; `scrub`; pushes that
//!   already landed; hostile origins; files a killed first push left.
//! - `wal_follow`: pushes of WAL databases that read only what the WAL names, through
//!   writes, checkpoints of every kind, VACUUM and resets: every change is seen.
//! - `status`: the sync log as `status` and `history` show it, with the exit codes
//!   cron relies on.
//! - `dashboard`: the dashboard at `/` in a real headless Chromium: a wrong key refused,
//!   every replica listed, Sync now reaching a real pull subscriber.
//! - `followers`: pull subscribers reporting what they applied, their lag in the API,
//!   and `push --wait-followers` with a real server and a real follower process.
//! - `retention`: retention policies and prune over the embedded store and a server,
//!   the disk space freed, pushes and pulls racing prunes, stored bytes, pulls by time.
//! - `ident`: a server known by its id whatever its URL's spelling (saved keys found
//!   through `localhost` and `127.0.0.1` alike); a sidecar run without sqlferry on PATH.
//! - `store_packs`: pages stored once across replicas, pushes into several replicas at
//!   once (one process and several), a store of the previous layout moved into packs.
//! - `rows`: `diff` of files and of a real server's versions, `apply` in WAL and
//!   rollback modes with each `--on-conflict`, `versions --changes`, and changesets
//!   exchanged with `sqldiff`.
//! - `merge`: `push --merge` on the embedded store from two machines: disjoint edits
//!   merged, overlapping ones refused with the rows listed or decided by each
//!   `--on-conflict`, schema changes and a base removed by retention refused.
//! - `pull_seal`: a pull of a small change reads what changed, not LOCAL (bytes read
//!   counted by the kernel), over a real server and the embedded store; every way to
//!   change LOCAL behind its seal refused or read, never a wrong file; a proptest of
//!   random histories of pulls, pushes, writes, checkpoints and replaced files.
//! - `scale_out`: two `serve --meta postgres://…` processes on one data directory and
//!   a real PostgreSQL (`postgres`: one cluster per run, one database per test): keys,
//!   pushes and pulls across servers, subscribers and sync-now across them, racing
//!   pushes, a server killed mid-push, PostgreSQL stopped for a moment.
//! - `objects`: the object layer under the S3 store against a real SeaweedFS
//!   (`seaweed`: one server per run, a bucket per test): create-if-absent raced from
//!   16 tasks (one winner), whole, ranged and multipart objects, a wrong key and an
//!   unreachable endpoint reported clearly, the secret never shown.
//! - `s3_store`: the S3 store (`store::s3`) against the same SeaweedFS: real WAL
//!   databases pushed through the engine and pulled back (rows, integrity, digest), the
//!   requests of each operation counted, a 1% push writing only its pages, two pushes
//!   racing for a version number (one wins), a damaged pack refused with LOCAL
//!   untouched, replicas sharing their pages, a large pack uploaded in parts.
//! - `s3_serve`: `serve --store s3://…` processes over the same SeaweedFS: pushes and
//!   pulls with the CLI by every selector, a 1% change writing four objects, what the
//!   S3 store cannot do yet (merges, drills) refused by name, two servers on one bucket (and one
//!   PostgreSQL) sharing versions and racing for a number, a bad endpoint or key
//!   stopping the start.
//! - `s3_embedded`: the embedded store over S3 (`--server s3://…`, no server): a WAL
//!   database pushed, changed (only the changed pages sent) and pulled back by `@1`,
//!   `@latest`, through `SQLFERRY_SERVER` and config.toml; versions, diff, retention
//!   and prune; one bucket reached through the embedded client and a `serve --store`;
//!   two pushes raced from two processes; a push killed midway (no version); a
//!   wrong secret, a dead endpoint and a missing bucket in one line each; merges,
//!   subscribers, sync-now and scrub refused by name with the bucket unchanged.
//! - `s3_sealed`: encrypted replicas on the S3 store, through `serve --store s3://…`
//!   (with `--meta`) and the embedded store over S3: a marked WAL database pushed with
//!   a key file (no marker in any object, sealed pack indexes, the key id and seal in
//!   the version object), pulled on another machine, a wrong key (exit 5, LOCAL
//!   unchanged), a 1% change sending and uploading about 1% of the pages, mixes and
//!   a stale sealed base refused with the bucket unchanged, a rekey with old and new
//!   versions pulled, retention and a sweep after it, `verify REMOTE` passing and finding a flipped pack byte (exit 7);
//!   a passphrase's salt object written once, a pull with the passphrase, a wrong one
//!   refused.
//! - `s3_gc`: retention and garbage collection over `serve --store s3://…`: versions
//!   removed by `--keep-last` (kept ones pulled back whole, removed ones refused), the
//!   bucket after a sweep holding only what kept versions name, a dry run deleting
//!   nothing, objects younger than the grace surviving (and going under `--gc-grace
//!   0s`), a push onto objects another server swept failing cleanly, one sweeper at a
//!   time among servers sharing PostgreSQL.
//! - `names`: which store a LOCAL/REMOTE argument names, never guessed (an ambiguous
//!   name refused with both spellings); pushes to several destinations at once.
//! - `sealed`: the engine's sealed sessions (end-to-end encryption) on real files over
//!   the in-memory link: a keeper holds no plaintext and no page hash, a keyed pull
//!   rebuilds the database, and a wrong key, a changed byte, swapped or relabelled
//!   pages, a page of another version, a seal of another version, and plaintext mixed
//!   with sealed are each refused with the pulled file unchanged.
//! - `sealed_store`: the directory store keeping encrypted replicas through the engine
//!   API: no plaintext in any stored file, sealed entries with their checksums, a keyed
//!   pull back, a small change storing only its pages, identities stored once, a
//!   flipped stored byte refused and found by scrub, and mixes of plaintext, keys, stale
//!   bases and merges refused.
//! - `encrypted`: encrypted replicas on the command line: `keygen`, a marked WAL
//!   database pushed with a key into the embedded store and a real server (no marker in
//!   any stored file), pulled back with the key, a one-row change sending a few pages, a
//!   wrong key (exit 5), a flipped ciphertext byte (exit 7) and missing keys refused
//!   with LOCAL unchanged, `SQLFERRY_ENCRYPTION_KEY`, keys refused where they cannot
//!   work yet.
//! - `rekey`: key rotation of encrypted replicas (`sqlferry rekey`) on the embedded
//!   store and a real server: versions under the old and the new key pulled with their
//!   own key and with both given, a version whose key was not given and a push with the
//!   old key refused (exit 5), a rekey killed half-way leaving the replica as it was.

mod chunked;
mod cli;
mod daemon;
mod daemon_passphrase;
mod dashboard;
mod disk_full;
mod encrypted;
mod encrypted_subscribe;
mod encrypted_verify;
mod engine;
mod followers;
mod hostile;
mod house;
mod ident;
mod layers;
mod live;
mod merge;
mod names;
mod objects;
mod passphrase;
mod postgres;
mod pull_seal;
mod rekey;
mod retention;
mod rows;
mod s3_embedded;
mod s3_fence;
mod s3_gc;
mod s3_index;
mod s3_lost;
mod s3_sealed;
mod s3_serve;
mod s3_store;
mod scale_out;
mod sealed;
mod sealed_store;
mod seaweed;
mod server;
mod status;
mod store_packs;
mod subscribe;
mod sync_props;
mod trust_client;
mod trust_store;
mod util;
mod wal_follow;
mod watch;
