//! Reaching the coordinator: an [`Endpoint`] from an address, TLS (rustls with ring) when the
//! address is `https://`, and [`BearerToken`], the interceptor that adds
//! `authorization: Bearer <token>` to every call.
//!
//! Must not make calls, and must never show a token: the header value is marked sensitive and
//! `Debug` prints `<redacted>`; errors never contain it.

use std::path::{Path, PathBuf};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// What an `https://` address trusts when no CA file is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WithoutCa {
    /// A CA file is required (the worker: its coordinator has a private CA).
    Refuse,
    /// The webpki (Mozilla) roots (the CLI: a coordinator behind a public certificate).
    WebpkiRoots,
}

/// Why an endpoint or a token could not be made. Messages name the address or file, never a
/// token.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bad server address {address:?}: {reason}")]
    BadAddress { address: String, reason: String },
    #[error("reading the TLS CA {}: {source}", path.display())]
    ReadCa {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuring TLS for {address}: {reason}")]
    Tls { address: String, reason: String },
    #[error("the https:// address {address} needs a CA file")]
    HttpsNeedsCa { address: String },
    #[error("--tls-ca {} given for the plaintext address {address}: use https://", path.display())]
    CaWithPlaintext { path: PathBuf, address: String },
    #[error("the token must be printable ASCII")]
    BadToken,
}

/// `localhost:50051` becomes `http://localhost:50051` (`https://` when `tls` is set); an address
/// with a scheme stays as it is.
pub fn normalise_url(address: &str, tls: bool) -> String {
    if address.contains("://") {
        address.to_string()
    } else if tls {
        format!("https://{address}")
    } else {
        format!("http://{address}")
    }
}

/// The endpoint of `url` (which has its scheme), with TCP_NODELAY. An `https://` URL is reached
/// over TLS trusting only `tls_ca` when given, else what `without_ca` says; a CA file with a
/// plaintext URL is refused rather than silently ignored. Connects nothing: callers choose
/// timeouts and `connect()` or `connect_lazy()`.
pub fn endpoint(
    url: &str,
    tls_ca: Option<&Path>,
    without_ca: WithoutCa,
) -> Result<Endpoint, ConnectError> {
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| ConnectError::BadAddress {
            address: url.to_string(),
            reason: e.to_string(),
        })?
        .tcp_nodelay(true);
    if url.starts_with("https://") {
        // Other dependencies enable rustls's aws-lc-rs as well: choose ring explicitly.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let tls = match (tls_ca, without_ca) {
            (Some(ca), _) => {
                let pem = std::fs::read(ca).map_err(|source| ConnectError::ReadCa {
                    path: ca.to_path_buf(),
                    source,
                })?;
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))
            }
            (None, WithoutCa::WebpkiRoots) => ClientTlsConfig::new().with_webpki_roots(),
            (None, WithoutCa::Refuse) => {
                return Err(ConnectError::HttpsNeedsCa {
                    address: url.to_string(),
                })
            }
        };
        endpoint = endpoint.tls_config(tls).map_err(|e| ConnectError::Tls {
            address: url.to_string(),
            reason: e.to_string(),
        })?;
    } else if let Some(ca) = tls_ca {
        return Err(ConnectError::CaWithPlaintext {
            path: ca.to_path_buf(),
            address: url.to_string(),
        });
    }
    Ok(endpoint)
}

/// Adds `authorization: Bearer <token>` to every call (nothing without a token). The value is
/// marked sensitive, so it never shows in `Debug` output.
#[derive(Clone, Default)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl BearerToken {
    /// A token is trimmed; an empty or absent one sends no header.
    pub fn new(token: Option<&str>) -> Result<Self, ConnectError> {
        let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) else {
            return Ok(Self(None));
        };
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| ConnectError::BadToken)?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }

    /// True when calls carry a token.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "BearerToken(<redacted>)"
        } else {
            "BearerToken(None)"
        })
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::interceptor::InterceptedService;
    use tonic::service::Interceptor as _;
    use tonic::{Request, Status};
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    #[test]
    fn the_token_goes_into_every_call_as_a_bearer_header_and_never_into_debug_output() {
        let mut token = BearerToken::new(Some(" s3cret-token ")).expect("token");
        assert!(token.is_set());
        let request = token.call(Request::new(())).expect("passes");
        let value = request.metadata().get("authorization").expect("header");
        assert_eq!(value.to_str().expect("ascii"), "Bearer s3cret-token");
        let shown = format!("{token:?} {:?}", request.metadata());
        assert!(!shown.contains("s3cret"), "{shown}");
        for absent in [None, Some(""), Some("  ")] {
            let mut none = BearerToken::new(absent).expect("no token");
            let request = none.call(Request::new(())).expect("passes");
            assert!(request.metadata().get("authorization").is_none());
        }
        let err = BearerToken::new(Some("bad\ntoken")).expect_err("a control character");
        assert_eq!(err.to_string(), "the token must be printable ASCII");
    }

    #[test]
    fn a_server_address_without_a_scheme_gets_http() {
        assert_eq!(
            normalise_url("localhost:50051", false),
            "http://localhost:50051"
        );
        assert_eq!(
            normalise_url("localhost:50051", true),
            "https://localhost:50051"
        );
        assert_eq!(normalise_url("https://q:1", false), "https://q:1");
    }

    #[test]
    fn https_without_a_ca_uses_the_webpki_roots_or_is_refused() {
        endpoint("https://example.com:443", None, WithoutCa::WebpkiRoots)
            .expect("an https endpoint with the webpki roots");
        let err = endpoint("https://example.com:443", None, WithoutCa::Refuse)
            .expect_err("refused without a CA");
        assert!(matches!(err, ConnectError::HttpsNeedsCa { .. }), "{err}");
        endpoint("http://127.0.0.1:1", None, WithoutCa::Refuse).expect("plaintext");
        let err = endpoint("not an address", None, WithoutCa::Refuse).expect_err("bad");
        assert!(err.to_string().contains("not an address"), "{err}");
    }

    #[test]
    fn a_missing_ca_file_or_a_ca_with_a_plaintext_address_is_refused() {
        let missing = Path::new("/nonexistent/ca.pem");
        let err =
            endpoint("https://q:1", Some(missing), WithoutCa::Refuse).expect_err("unreadable");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate").expect("write");
        let err = endpoint("http://q:1", Some(&ca), WithoutCa::WebpkiRoots).expect_err("http");
        assert!(err.to_string().contains("https://"), "{err}");
    }

    /// A health server over TLS with a self-signed certificate that requires the token: the
    /// endpoint trusts the CA file and the interceptor's header gets through; without the
    /// token the call is UNAUTHENTICATED, without the CA the certificate is not trusted.
    #[tokio::test]
    async fn over_tls_the_client_trusts_its_ca_and_sends_its_token() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certified = ::tests::tls::SelfSigned::localhost();
        let ca = certified.cert.clone();
        let identity =
            tonic::transport::Identity::from_pem(&certified.cert_pem, &certified.key_pem);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (_reporter, service) = tonic_health::server::health_reporter();
        let require_token = |request: Request<()>| match request.metadata().get("authorization") {
            Some(v) if v == "Bearer s3cret-token" => Ok(request),
            _ => Err(Status::unauthenticated("missing bearer token")),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .expect("tls")
                .add_service(InterceptedService::new(service, require_token))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let url = format!("https://localhost:{port}");
        let check = |ca: Option<&Path>, token: Option<&str>| {
            let endpoint = endpoint(&url, ca, WithoutCa::WebpkiRoots).expect("endpoint");
            let token = BearerToken::new(token).expect("token");
            async move {
                let channel = endpoint.connect_lazy();
                HealthClient::with_interceptor(channel, token)
                    .check(HealthCheckRequest::default())
                    .await
            }
        };
        check(Some(&ca), Some("s3cret-token"))
            .await
            .expect("served over TLS with the token");
        let err = check(Some(&ca), None).await.expect_err("no token");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        check(None, Some("s3cret-token"))
            .await
            .expect_err("the self-signed certificate is not a webpki root");
    }
}
