//! SIGINT and SIGTERM into the one [`Shutdown`]: the first asks for a graceful stop, the
//! second forces it. Nothing else in sqlferry catches a signal.

use crate::shutdown::Shutdown;
use crate::{Error, Result};

/// Catches SIGINT and SIGTERM for the life of the runtime and returns the shutdown they
/// drive. Must be called inside the tokio runtime.
pub fn shutdown_on_signals() -> Result<Shutdown> {
    use tokio::signal::unix::{SignalKind, signal};
    let io = |e| Error::io(std::path::Path::new("signal handler"), e);
    let mut int = signal(SignalKind::interrupt()).map_err(io)?;
    let mut term = signal(SignalKind::terminate()).map_err(io)?;
    let shutdown = Shutdown::new();
    let driven = shutdown.clone();
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            seen += 1;
            if seen == 1 {
                tracing::info!("signal received; stopping");
                driven.begin();
            } else {
                tracing::info!("second signal received; stopping now");
                driven.force();
                return;
            }
        }
    });
    Ok(shutdown)
}
