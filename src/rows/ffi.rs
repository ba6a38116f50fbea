//! The few declarations of SQLite's session extension sqlferry uses, written out by
//! hand: rusqlite's `session` feature generates them with bindgen, which needs libclang
//! at build time. The bundled SQLite (3.54.1, `libsqlite3-sys` 0.39) is compiled with
//! `SQLITE_ENABLE_SESSION` and `SQLITE_ENABLE_PREUPDATE_HOOK` (`.cargo/config.toml`), so
//! the symbols are in the binary; these signatures match its `sqlite3.h` one for one.
//!
//! Nothing here is called outside `rows::session`, which wraps every call in a safe API.

#![allow(non_camel_case_types)]

use std::ffi::{c_char, c_int, c_uchar, c_void};

use rusqlite::ffi::{sqlite3, sqlite3_int64, sqlite3_value};

/// An opaque session object (`sqlite3_session`).
#[repr(C)]
pub struct sqlite3_session {
    _private: [u8; 0],
}

/// An opaque changeset iterator (`sqlite3_changeset_iter`).
#[repr(C)]
pub struct sqlite3_changeset_iter {
    _private: [u8; 0],
}

/// `xInput` of the streaming functions: fill `data` with up to `*n` bytes, set `*n`.
pub type XInput =
    unsafe extern "C" fn(p_in: *mut c_void, data: *mut c_void, n: *mut c_int) -> c_int;
/// `xOutput` of the streaming functions: take `n` bytes at `data`.
pub type XOutput = unsafe extern "C" fn(p_out: *mut c_void, data: *const c_void, n: c_int) -> c_int;
/// The conflict handler of `sqlite3changeset_apply_v2`.
pub type XConflict =
    unsafe extern "C" fn(ctx: *mut c_void, kind: c_int, iter: *mut sqlite3_changeset_iter) -> c_int;
/// The table filter of `sqlite3changeset_apply_v2`.
pub type XFilter = unsafe extern "C" fn(ctx: *mut c_void, table: *const c_char) -> c_int;

/// `SQLITE_SESSION_OBJCONFIG_ROWID`: track tables without a PRIMARY KEY by rowid.
pub const SQLITE_SESSION_OBJCONFIG_ROWID: c_int = 2;
/// `SQLITE_CHANGESET_DATA`: the row exists, but its other values are not the expected.
pub const SQLITE_CHANGESET_DATA: c_int = 1;
/// `SQLITE_CHANGESET_NOTFOUND`: no row with that primary key.
pub const SQLITE_CHANGESET_NOTFOUND: c_int = 2;
/// `SQLITE_CHANGESET_CONFLICT`: an INSERT whose primary key is already there.
pub const SQLITE_CHANGESET_CONFLICT: c_int = 3;
/// `SQLITE_CHANGESET_CONSTRAINT`: a constraint (UNIQUE, NOT NULL, CHECK) failed.
pub const SQLITE_CHANGESET_CONSTRAINT: c_int = 4;
/// `SQLITE_CHANGESET_FOREIGN_KEY`: foreign keys are violated at the end.
pub const SQLITE_CHANGESET_FOREIGN_KEY: c_int = 5;
/// Conflict handler answer: skip this change.
pub const SQLITE_CHANGESET_OMIT: c_int = 0;
/// Conflict handler answer: overwrite the conflicting row.
pub const SQLITE_CHANGESET_REPLACE: c_int = 1;
/// Conflict handler answer: stop and roll back.
pub const SQLITE_CHANGESET_ABORT: c_int = 2;

unsafe extern "C" {
    pub fn sqlite3session_create(
        db: *mut sqlite3,
        z_db: *const c_char,
        pp_session: *mut *mut sqlite3_session,
    ) -> c_int;
    pub fn sqlite3session_delete(session: *mut sqlite3_session);
    pub fn sqlite3session_object_config(
        session: *mut sqlite3_session,
        op: c_int,
        arg: *mut c_void,
    ) -> c_int;
    pub fn sqlite3session_diff(
        session: *mut sqlite3_session,
        z_from_db: *const c_char,
        z_tbl: *const c_char,
        pz_err_msg: *mut *mut c_char,
    ) -> c_int;
    pub fn sqlite3session_changeset_strm(
        session: *mut sqlite3_session,
        x_output: XOutput,
        p_out: *mut c_void,
    ) -> c_int;
    pub fn sqlite3session_memory_used(session: *mut sqlite3_session) -> sqlite3_int64;
    pub fn sqlite3changeset_start_strm(
        pp: *mut *mut sqlite3_changeset_iter,
        x_input: XInput,
        p_in: *mut c_void,
    ) -> c_int;
    pub fn sqlite3changeset_next(iter: *mut sqlite3_changeset_iter) -> c_int;
    pub fn sqlite3changeset_op(
        iter: *mut sqlite3_changeset_iter,
        pz_tab: *mut *const c_char,
        pn_col: *mut c_int,
        p_op: *mut c_int,
        pb_indirect: *mut c_int,
    ) -> c_int;
    pub fn sqlite3changeset_pk(
        iter: *mut sqlite3_changeset_iter,
        pab_pk: *mut *mut c_uchar,
        pn_col: *mut c_int,
    ) -> c_int;
    pub fn sqlite3changeset_old(
        iter: *mut sqlite3_changeset_iter,
        i_val: c_int,
        pp_value: *mut *mut sqlite3_value,
    ) -> c_int;
    pub fn sqlite3changeset_new(
        iter: *mut sqlite3_changeset_iter,
        i_val: c_int,
        pp_value: *mut *mut sqlite3_value,
    ) -> c_int;
    pub fn sqlite3changeset_conflict(
        iter: *mut sqlite3_changeset_iter,
        i_val: c_int,
        pp_value: *mut *mut sqlite3_value,
    ) -> c_int;
    pub fn sqlite3changeset_fk_conflicts(
        iter: *mut sqlite3_changeset_iter,
        pn_out: *mut c_int,
    ) -> c_int;
    pub fn sqlite3changeset_finalize(iter: *mut sqlite3_changeset_iter) -> c_int;
    pub fn sqlite3changeset_apply_v2_strm(
        db: *mut sqlite3,
        x_input: XInput,
        p_in: *mut c_void,
        x_filter: Option<XFilter>,
        x_conflict: Option<XConflict>,
        p_ctx: *mut c_void,
        pp_rebase: *mut *mut c_void,
        pn_rebase: *mut c_int,
        flags: c_int,
    ) -> c_int;
}
