//! TLS for both sides, rustls with the ring provider (no OpenSSL, no aws-lc, no C to
//! build but ring's own): PEM loading (certificate chains, private keys, a CA file)
//! and the two rustls configurations.
//!
//! - The server's ([`server_config`]): a certificate chain and its private key (PKCS#8,
//!   PKCS#1 RSA or SEC1 EC), read and checked once at start.
//! - The client's ([`client_config`]): the Mozilla roots that webpki-roots ships, plus
//!   every certificate of a CA file when one is named (`SQLFERRY_CA_FILE`), so a server
//!   whose certificate comes from a private CA (or is self-signed) can be trusted
//!   without touching the system's store.
//!
//! Invariants: certificates are always verified (there is no way to turn the check off,
//! only to add roots); a file that cannot be read, holds no PEM block of the right kind,
//! or a key that does not match its certificate is an [`Error::Io`] naming the file (a
//! local file problem), before a byte is sent or a port is opened.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::{Error, Result};

/// The environment variable naming a PEM file of extra trusted certificates.
pub const CA_FILE_ENV: &str = "SQLFERRY_CA_FILE";

/// The ring provider, the one crypto provider sqlferry uses.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's TLS settings: the certificate chain in the PEM file `cert` (the
/// server's own certificate first) and its private key in `key` (PKCS#8, PKCS#1 RSA or
/// SEC1 EC). Errors name the file at fault and are [`Error::Io`].
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>> {
    let chain = read_certificates(cert)?;
    let key_der = read_private_key(key)?;
    let config = ServerConfig::builder_with_provider(provider())
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
    Ok(Arc::new(config))
}

/// The client's TLS settings, trusting the webpki roots and the certificates in
/// `ca_file` (the file [`CA_FILE_ENV`] names; errors say so).
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>> {
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
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Every certificate in the PEM file at `path`, in order; at least one.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let certificates = CertificateDer::pem_slice_iter(&text)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| invalid_file(path, format!("not a PEM certificate file: {e}")))?;
    if certificates.is_empty() {
        return Err(invalid_file(
            path,
            "no certificate in it (expected a PEM block -----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    Ok(certificates)
}

/// The first private key in the PEM file at `path`.
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
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

/// A file that was read but does not hold what it should: a local file problem.
pub fn invalid_file(path: &Path, reason: String) -> Error {
    Error::io(path, io::Error::new(io::ErrorKind::InvalidData, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_webpki_roots_are_trusted_without_a_ca_file() {
        let config = client_config(None).expect("config");
        assert!(config.crypto_provider().cipher_suites.len() > 1);
    }

    #[test]
    fn an_unreadable_or_empty_ca_file_is_a_local_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing-ca.pem");
        let e = client_config(Some(&missing)).expect_err("missing");
        assert_eq!(e.kind(), crate::ErrorKind::LocalIo);
        let line = e.to_string();
        assert!(line.contains("missing-ca.pem"), "{line}");
        assert!(line.contains(CA_FILE_ENV), "{line}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        let e = client_config(Some(&empty)).expect_err("empty");
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

    #[test]
    fn files_without_pem_blocks_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "this is not PEM\n").expect("write");
        let e = server_config(&garbage, &garbage).expect_err("garbage");
        assert_eq!(e.kind(), crate::ErrorKind::LocalIo);
        let line = e.to_string();
        assert!(line.starts_with(&garbage.display().to_string()), "{line}");
        assert!(line.contains("no certificate in it"), "{line}");

        let missing = dir.path().join("missing.pem");
        let e = server_config(&missing, &garbage).expect_err("missing");
        assert_eq!(e.kind(), crate::ErrorKind::LocalIo);
        assert!(e.to_string().contains("missing.pem"), "{e}");
    }
}
