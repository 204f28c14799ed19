//! A self-signed certificate for `localhost`, for the TLS tests of the coordinator, the client
//! crate and the CLI: the certificate is its own CA, so a client that trusts `cert` (as its CA
//! file) trusts a server that presents it.
//!
//! Must not start servers: each test serves what it tests.

use std::path::PathBuf;

/// The certificate and its key, as PEM and as files in a temporary folder that lives as long as
/// this value.
pub struct SelfSigned {
    pub cert_pem: String,
    pub key_pem: String,
    /// `cert_pem`, written out: the server's `--tls-cert` and the client's CA file.
    pub cert: PathBuf,
    /// `key_pem`, written out: the server's `--tls-key`.
    pub key: PathBuf,
    _dir: tempfile::TempDir,
}

impl SelfSigned {
    /// A new certificate for the name `localhost`.
    pub fn localhost() -> SelfSigned {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
            .expect("self-signed certificate");
        let (cert_pem, key_pem) = (certified.cert.pem(), certified.key_pair.serialize_pem());
        let dir = tempfile::tempdir().expect("temporary folder");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, &cert_pem).expect("writing the certificate");
        std::fs::write(&key, &key_pem).expect("writing the key");
        SelfSigned {
            cert_pem,
            key_pem,
            cert,
            key,
            _dir: dir,
        }
    }
}
