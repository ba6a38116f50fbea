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

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};
use tokio_tungstenite::tungstenite;

use crate::{Error, Result};

/// The environment variable naming a PEM file of extra trusted certificates.
pub const CA_FILE_ENV: &str = "SQLFERRY_CA_FILE";

/// The TLS settings of a `wss://` connection: the webpki roots, plus the certificates in
/// the file `SQLFERRY_CA_FILE` names, if it is set and not empty.
pub(crate) fn client_config() -> Result<Arc<ClientConfig>> {
    let ca_file = std::env::var_os(CA_FILE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    client_config_with(ca_file.as_deref())
}

/// The TLS settings trusting the webpki roots and the certificates in `ca_file`.
fn client_config_with(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        let certificates = read_certificates(path).map_err(|e| match e {
            Error::Io { path, source } => Error::Io {
                source: io::Error::new(source.kind(), format!("named by {CA_FILE_ENV}: {source}")),
                path,
            },
            e => e,
        })?;
        for certificate in certificates {
            roots.add(certificate).map_err(|e| {
                invalid_file(
                    path,
                    format!("named by {CA_FILE_ENV}: not a usable CA certificate: {e}"),
                )
            })?;
        }
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Every certificate in the PEM file at `path`, in order; at least one.
pub(crate) fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let certificates = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid_file(path, format!("not a PEM certificate file: {e}")))?;
    if certificates.is_empty() {
        return Err(invalid_file(
            path,
            "no certificate in it (expected a PEM block -----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    Ok(certificates)
}

/// A file that was read but does not hold what it should: a local file problem.
pub(crate) fn invalid_file(path: &Path, reason: String) -> Error {
    Error::io(path, io::Error::new(io::ErrorKind::InvalidData, reason))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_webpki_roots_are_trusted_without_a_ca_file() {
        let config = client_config_with(None).expect("config");
        assert!(config.crypto_provider().cipher_suites.len() > 1);
    }

    #[test]
    fn an_unreadable_or_empty_ca_file_is_a_local_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing-ca.pem");
        let e = client_config_with(Some(&missing)).expect_err("missing");
        assert_eq!(e.kind(), crate::ErrorKind::LocalIo);
        let line = e.to_string();
        assert!(line.contains("missing-ca.pem"), "{line}");
        assert!(line.contains(CA_FILE_ENV), "{line}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        let e = client_config_with(Some(&empty)).expect_err("empty");
        assert_eq!(e.kind(), crate::ErrorKind::LocalIo);
        assert!(e.to_string().contains("no certificate in it"), "{e}");
    }

    #[test]
    fn a_broken_pem_block_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = dir.path().join("bad.pem");
        std::fs::write(
            &bad,
            "-----BEGIN CERTIFICATE-----\n!!!not base64!!!\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
        let e = read_certificates(&bad).expect_err("bad base64");
        assert!(e.to_string().contains("not a PEM certificate file"), "{e}");
    }
}
