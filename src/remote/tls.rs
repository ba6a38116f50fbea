//! The client's TLS for `wss://` servers: rustls with the ring provider (no OpenSSL, no
//! aws-lc), trusting the Mozilla roots that webpki-roots ships plus, when
//! `SQLFERRY_CA_FILE` names a PEM file, every certificate in it, so a server whose
//! certificate comes from a private CA (or is self-signed) can be trusted without
//! touching the system's store.
//!
//! Invariants:
//! - Certificates are always verified: there is no way to turn the check off, only to
//!   add roots.
//! - A certificate the client does not trust is an [`Error::Tls`] that names the problem
//!   and the way out (so is a `ws://` request answered in TLS); an unreadable or empty
//!   `SQLFERRY_CA_FILE` is a local file error naming the file. Neither sends a byte of
//!   the session.
//!
//! PEM loading and building the rustls configuration are shared with the server:
//! they live in [`crate::transport::tls`].

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::ClientConfig;
use tokio_tungstenite::tungstenite;

pub use crate::transport::tls::CA_FILE_ENV;
use crate::{Error, Result};

/// The TLS settings of a `wss://` connection: the webpki roots, plus the certificates in
/// the file `SQLFERRY_CA_FILE` names, if it is set and not empty.
pub(crate) fn client_config() -> Result<Arc<ClientConfig>> {
    let ca_file = std::env::var_os(CA_FILE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    crate::transport::tls::client_config(ca_file.as_deref())
}

/// The TLS failure behind a failed connection attempt, if TLS is what failed: one line
/// for a person, with the way out. Three cases: a `wss://` handshake that failed (most
/// often a certificate the client does not trust), a `wss://` handshake the server
/// hung up on (a plain server does), and a `ws://` client whose request got an answer
/// that is not HTTP, which is what a TLS server sends it.
pub(crate) fn failure(url: &str, error: &tungstenite::Error) -> Option<Error> {
    use tungstenite::error::{ProtocolError, TlsError};
    let tls = match error {
        // A server that does not speak TLS reads the ClientHello as a bad HTTP request
        // and hangs up. The connection may also just have dropped: still retryable.
        tungstenite::Error::Io(e)
            if url.starts_with("wss://") && e.kind() == io::ErrorKind::UnexpectedEof =>
        {
            return Some(Error::Disconnected(format!(
                "cannot reach {url}: {e} (if the server does not use TLS, use ws://)"
            )));
        }
        // tokio-tungstenite hands back the handshake's I/O error, with rustls' inside.
        tungstenite::Error::Io(e) => e.get_ref()?.downcast_ref::<rustls::Error>()?,
        tungstenite::Error::Tls(TlsError::Rustls(e)) => e,
        tungstenite::Error::Protocol(ProtocolError::HttparseError(e))
            if url.starts_with("ws://") =>
        {
            return Some(Error::Tls(format!(
                "cannot reach {url}: the answer is not HTTP ({e}) — if the server uses TLS, \
                 use wss://"
            )));
        }
        _ => return None,
    };
    let hint = match tls {
        rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature,
        ) => format!(
            " — if the server uses a private CA or a self-signed certificate, set \
             {CA_FILE_ENV} to a PEM file holding it"
        ),
        _ => String::new(),
    };
    Some(Error::Tls(format!("cannot reach {url}: {tls}{hint}")))
}
