//! sqlferry's integration tests: one binary, one module per area (see STYLE.md: every
//! extra test binary relinks tokio and rusqlite).

mod util;
