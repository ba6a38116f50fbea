//! Handing the heap memory the process freed back to the system.
//!
//! glibc keeps freed memory in its arenas (one per thread that allocated, up to eight
//! per core) for reuse, so a burst of work on many threads (a server's sessions, a
//! daemon's 200 start pushes) leaves the resident size at its peak long after. The
//! server and the daemon call [`release_freed`] once they are idle.

/// Hands the heap memory this process freed back to the system (`malloc_trim`). Takes
/// a moment on a large heap: call it from a blocking thread, when idle.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_freed() {
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks; it takes no
    // pointer and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Hands the heap memory this process freed back to the system: a no-op where the
/// allocator has no such call.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_freed() {}

/// Lets glibc keep at most `n` malloc arenas from now on (`M_ARENA_MAX`; by default it
/// keeps up to eight per core). For a process of many mostly idle threads, such as the
/// daemon's one watcher thread per database: their few allocations, spread over 16
/// arenas, keep pages of each resident (200 idle databases: 70 MiB with the default,
/// 52 MiB with two arenas). Elsewhere a no-op.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn limit_arenas(n: u16) {
    // SAFETY: mallopt only sets a glibc tunable; arenas made already are kept.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, std::ffi::c_int::from(n));
    }
}

/// Lets the allocator keep at most `n` arenas: a no-op where there is no such setting.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn limit_arenas(_n: u16) {}
