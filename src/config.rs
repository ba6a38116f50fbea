//! Where sqlferry keeps its files, following the XDG base directory rules.
//!
//! - cache: page-hash caches, safe to delete at any time (the next sync recomputes them);
//! - data: the embedded store, when no server is named;
//! - state: the version each local database was last pushed or pulled as.

use std::path::PathBuf;

/// `$XDG_CACHE_HOME/sqlferry`, else `~/.cache/sqlferry`; `None` when neither is set.
pub fn cache_dir() -> Option<PathBuf> {
    xdg_dir("XDG_CACHE_HOME", ".cache")
}

/// `$XDG_DATA_HOME/sqlferry`, else `~/.local/share/sqlferry`: the embedded store.
pub fn data_dir() -> Option<PathBuf> {
    xdg_dir("XDG_DATA_HOME", ".local/share")
}

/// `$XDG_STATE_HOME/sqlferry`, else `~/.local/state/sqlferry`: what each local
/// database was last synced with.
pub fn state_dir() -> Option<PathBuf> {
    xdg_dir("XDG_STATE_HOME", ".local/state")
}

fn xdg_dir(var: &str, fallback: &str) -> Option<PathBuf> {
    let base = match std::env::var_os(var) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME").filter(|h| !h.is_empty())?).join(fallback),
    };
    Some(base.join("sqlferry"))
}
