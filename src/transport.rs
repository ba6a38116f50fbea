//! What the client and the server share on the wire, and nothing else: WebSocket
//! framing of protocol frames (the [`ws`] module: one message matcher, the send and
//! receive of one frame, the pump between a socket and a blocking engine, which also
//! compresses and expands pages where the handshake agreed to it) and TLS setup
//! (the [`tls`] module: PEM loading, rustls configurations for either side).
//!
//! It sits below both `remote` (the client side) and `server`, which must not import
//! each other: whatever both need to speak the same protocol lives here, once. It
//! imports only `protocol` and `error` from the crate, so any module may use it.

pub mod tls;
pub mod ws;
