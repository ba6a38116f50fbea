//! TLS for `sqlferry serve --tls-cert CERT.pem --tls-key KEY.pem`: every connection on
//! the port is TLS, the HTTP API (`https://`) and WebSocket sessions (`wss://`) alike.
//!
//! rustls with the ring provider: no OpenSSL, no aws-lc, no C to build but ring's own.
//! The certificate chain and the private key (PKCS#8, PKCS#1 RSA or SEC1 EC)
//! are PEM files, read and checked once at start by [`crate::transport::tls`] (shared
//! with the client): a file that cannot be read, holds no PEM block of the right kind,
//! or a key that does not match the certificate is an error naming the file, before
//! the server listens.
//!
//! Invariant: the handshake runs in each connection's own task (`serve_connection` in
//! the server module), so a client that never finishes it delays no one else, and a
//! failed handshake ends that connection alone.

use std::fmt;
use std::path::Path;

use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::{Error, Result};

/// A server's TLS identity (certificate chain and private key), ready to accept
/// connections. Cloning it is cheap: clones share one configuration.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The private key stays out of every debug print.
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

impl Tls {
    /// The identity in the PEM files `cert` (the certificate chain, the server's own
    /// certificate first) and `key` (its private key: PKCS#8, PKCS#1 RSA or SEC1 EC).
    /// Errors name the file at fault and are [`Error::Io`] (a local file problem).
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Tls> {
        let config = crate::transport::tls::server_config(cert, key)?;
        Ok(Tls {
            acceptor: TlsAcceptor::from(config),
        })
    }

    /// Runs the server's side of the handshake on a new connection.
    pub(super) async fn accept(&self, stream: TcpStream) -> Result<TlsStream<TcpStream>> {
        self.acceptor
            .accept(stream)
            .await
            .map_err(|e| Error::Disconnected(format!("TLS handshake failed: {e}")))
    }
}
