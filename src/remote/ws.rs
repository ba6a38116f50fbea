//! Running an engine role over a WebSocket, on the client's side. The framing and the
//! pump between the network and the blocking engine thread are shared with the server
//! and live in [`crate::transport::ws`]; this module only ties them to the engine's
//! channel link.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;

use crate::Result;
use crate::engine::{ChannelLink, PumpEnd, Role, channel_link};

pub(crate) use crate::transport::ws::{recv_binary, send_binary, ws_config};

/// Runs `engine` on a blocking thread as `role`, its frames carried over `ws`; see
/// [`crate::transport::ws::run_engine`].
pub(crate) async fn run_engine<S, T, F>(
    ws: &mut WebSocketStream<S>,
    role: Role,
    first: Vec<Vec<u8>>,
    idle: Option<std::time::Duration>,
    engine: F,
) -> (Result<T>, Vec<Vec<u8>>)
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: Send + 'static,
    F: FnOnce(&mut ChannelLink) -> Result<T> + Send + 'static,
{
    let (
        link,
        PumpEnd {
            to_engine,
            from_engine,
        },
    ) = channel_link(role);
    crate::transport::ws::run_engine(ws, (link, to_engine, from_engine), first, idle, engine).await
}
