//! TLS for `sqlferry serve --tls-cert CERT.pem --tls-key KEY.pem`: every connection on
//! the port is TLS, the HTTP API (`https://`) and WebSocket sessions (`wss://`) alike.
//!
//! rustls with the ring provider: no OpenSSL, no aws-lc, no C to build but ring's own.
//! The certificate chain and the private key (PKCS#8, PKCS#1 RSA or SEC1 EC)
//! are PEM files, read and checked once at start: a file that cannot be read, holds no
//! PEM block of the right kind, or a key that does not match the certificate is an error
//! naming the file, before the server listens.
//!
//! Invariant: the handshake runs in each connection's own task (`serve_connection` in
//! the server module), so a client that never finishes it delays no one else, and a
//! failed handshake ends that connection alone.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::{self, PemObject};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::remote::tls::{invalid_file, read_certificates};
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
        let chain = read_certificates(cert)?;
        let key_der = read_private_key(key)?;
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("ring supports the default TLS versions")
                .with_no_client_auth()
                .with_single_cert(chain, key_der)
                .map_err(|e| {
                    invalid_file(
                        key,
                        format!(
                            "cannot be used with the certificate in {}: {e}",
                            cert.display()
                        ),
                    )
                })?;
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
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

/// The first private key in the PEM file at `path`.
fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| match e {
        pem::Error::NoItemsFound => invalid_file(
            path,
            "no private key in it (expected a PEM block -----BEGIN PRIVATE KEY-----, \
             RSA PRIVATE KEY or EC PRIVATE KEY)"
                .into(),
        ),
        e => invalid_file(path, format!("not a PEM private key file: {e}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_without_pem_blocks_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "this is not PEM\n").expect("write");
        let e = Tls::from_pem_files(&garbage, &garbage).expect_err("garbage");
        assert_eq!(e.kind(), crate::ErrorKind::LocalIo);
        let line = e.to_string();
        assert!(line.starts_with(&garbage.display().to_string()), "{line}");
        assert!(line.contains("no certificate in it"), "{line}");

        let missing = dir.path().join("missing.pem");
        let e = Tls::from_pem_files(&missing, &garbage).expect_err("missing");
        assert_eq!(e.kind(), crate::ErrorKind::LocalIo);
        assert!(e.to_string().contains("missing.pem"), "{e}");
    }
}
