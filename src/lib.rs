//! sqlferry pushes and pulls live SQLite databases page by page, checked end to end.
//!
//! The library holds everything; the `sqlferry` binary only parses its arguments, calls
//! [`cli::Cli::run`] and maps the error to an exit code. See `docs/` for the design, the
//! protocol and the exit codes.
//!
//! The modules, top of the layers first (`docs/architecture.md` has the map and the
//! rules `tests/it/layers.rs` enforces; a module imports only from below it):
//!
//! - `cli`: clap types, one file per command, output lines, JSON and exit codes; the
//!   one tokio runtime and the signals that drive the one shutdown.
//! - `subscribe`: the watcher, the pure push schedule and backoff, and the loops that
//!   keep a replica fresh on their own.
//! - `client`: the workflows the CLI and the subscribers share: push, pull, versions,
//!   verify a stored version, sync-now, with keys and history around them.
//! - `remote`: where a replica lives, the embedded store in-process or a server over
//!   WebSocket, behind one interface.
//! - `server`: `sqlferry serve`: HTTP and WebSocket on one port, auth, sessions, hub.
//! - `transport`: what client and server share on the wire: WebSocket framing of
//!   frames, TLS setup and PEM loading.
//! - `merge`: a push made from an older version merged row by row onto the latest
//!   version (`push --merge`), the same code for the embedded store and a server.
//! - `meta`: the server-wide metadata (keys, replica ids, the server's id) in
//!   `server.db` or in PostgreSQL (`serve --meta`), and the notifications servers
//!   sharing PostgreSQL send each other.
//! - `store`: replicas, immutable versions and content-addressed pages in SQLite files.
//! - `engine`: the sync algorithm over any link: origin and replica roles, hash-tree
//!   descent, the final digest check; its page source and target over SQLite files.
//! - `page`: SQLite page access: a consistent read snapshot over `sqlite_dbpage`, an
//!   atomic page writer, header facts.
//! - `protocol`: frames and their codec, the protocol version; pure, no I/O.
//! - `rows`: row-level diffs of two databases, SQLite changesets (the session
//!   extension, wrapped safely) and applying them; uses only rusqlite and `error`.
//! - `history`: the local record of every sync and the manifests kept for the next.
//! - `synclog`: every push and pull this machine ran, for `status` and `history`.
//! - `config`: XDG paths, the settings, secrets and sidecar files.
//! - `digest`: page hashes, the database digest, hex, name keys, spill files of hashes.
//! - `crypt`: end-to-end encryption's primitives (keys, keyed page identities, sealed
//!   pages and version facts); a leaf beside `digest`, called by the engine's sealed
//!   sessions and by no command yet (issue 15).
//! - `epoch`: Unix seconds, now and as RFC 3339.
//! - `error`: the typed [`Error`], its [`ErrorKind`] and the protocol's error codes.
//! - `shutdown`: the one cancellation (graceful, then forced) every loop obeys.
//! - `backoff`: retry and reconnect delays with jitter, pure; used by the subscribers
//!   and the remote subscription alike.

pub mod backoff;
pub mod cli;
pub mod client;
pub mod config;
pub mod crypt;
pub mod daemon;
pub mod digest;
pub mod engine;
pub mod epoch;
mod error;
pub mod history;
pub mod memory;
pub mod merge;
pub mod meta;
pub mod page;
pub mod protocol;
pub mod remote;
pub mod rows;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod subscribe;
pub mod synclog;
pub mod transport;

pub use error::{Error, ErrorKind, Result};
