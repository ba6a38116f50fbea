//! Where sqlferry keeps its files, following the XDG base directory rules.
//!
//! Only the cache directory exists so far: it holds page-hash caches, which are safe to
//! delete at any time (the next sync recomputes them).

use std::path::PathBuf;

/// `$XDG_CACHE_HOME/sqlferry`, else `~/.cache/sqlferry`; `None` when neither is set.
pub fn cache_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME").filter(|h| !h.is_empty())?).join(".cache"),
    };
    Some(base.join("sqlferry"))
}
