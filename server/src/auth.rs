//! Bearer-token authentication with two roles, and the coordinator's optional TLS identity.
//!
//! Every call to `trainq.v1.JobService` must carry `authorization: Bearer <token>` with a
//! *client* token, every call to `trainq.v1.WorkerService` one with a *worker* token. A missing or
//! malformed header, or a token that is not configured, is UNAUTHENTICATED; a valid token of the
//! other role is PERMISSION_DENIED. gRPC health and reflection are not guarded, so probes and
//! `grpcurl list`/`describe` work without a token (they reveal only the public schema and
//! whether the server is serving). Auth is on when at least one token is configured, off
//! otherwise (local development).
//!
//! Tokens are kept only as SHA-256 digests and compared in constant time; must never log,
//! print or return a token (not even in `Debug`), and must not decide anything but who may call.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq as _;
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::config::Config;

pub use proto::ops::Secret;

/// Who a token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The users' side: `trainq.v1.JobService`.
    Client,
    /// Workers: `trainq.v1.WorkerService`.
    Worker,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Worker => "worker",
        }
    }
}

type Digest32 = [u8; 32];

fn digest(token: &str) -> Digest32 {
    Sha256::digest(token.as_bytes()).into()
}

/// The configured tokens, as digests. Empty: auth is off.
#[derive(Default)]
pub struct Tokens {
    client: Vec<Digest32>,
    worker: Vec<Digest32>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("client", &self.client.len())
            .field("worker", &self.worker.len())
            .finish()
    }
}

impl Tokens {
    /// The tokens of `--client-tokens`, `--worker-tokens` and the token files (one token per
    /// line; blank lines and `#` comments skipped). A token given for both roles is an error.
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let mut client: Vec<String> = config
            .client_tokens
            .iter()
            .map(|s| s.expose().to_string())
            .collect();
        let mut worker: Vec<String> = config
            .worker_tokens
            .iter()
            .map(|s| s.expose().to_string())
            .collect();
        if let Some(path) = &config.client_tokens_file {
            client.extend(read_token_file(path)?);
        }
        if let Some(path) = &config.worker_tokens_file {
            worker.extend(read_token_file(path)?);
        }
        Self::new(client, worker)
    }

    pub fn new(
        client: impl IntoIterator<Item = impl AsRef<str>>,
        worker: impl IntoIterator<Item = impl AsRef<str>>,
    ) -> anyhow::Result<Self> {
        let keep = |t: &str| {
            let t = t.trim();
            (!t.is_empty()).then(|| digest(t))
        };
        let client: Vec<Digest32> = client
            .into_iter()
            .filter_map(|t| keep(t.as_ref()))
            .collect();
        let worker: Vec<Digest32> = worker
            .into_iter()
            .filter_map(|t| keep(t.as_ref()))
            .collect();
        anyhow::ensure!(
            !client.iter().any(|c| worker.contains(c)),
            "a token is configured both as a client and as a worker token; each token has one role"
        );
        Ok(Tokens { client, worker })
    }

    /// Whether any token is configured.
    pub fn enabled(&self) -> bool {
        !self.client.is_empty() || !self.worker.is_empty()
    }

    /// "auth: on (N client, M worker tokens)" or "auth: off", for the start-up log.
    pub fn describe(&self) -> String {
        if self.enabled() {
            format!(
                "auth: on ({} client, {} worker tokens)",
                self.client.len(),
                self.worker.len()
            )
        } else {
            "auth: off".into()
        }
    }

    /// The role of `token`, comparing digests in constant time and always looking at every
    /// configured token, so timing says nothing about which (or how much of one) matched.
    pub fn role_of(&self, token: &str) -> Option<Role> {
        let d = digest(token);
        let mut found = None;
        for (role, list) in [(Role::Client, &self.client), (Role::Worker, &self.worker)] {
            for known in list {
                if bool::from(known.ct_eq(&d)) {
                    found = Some(role);
                }
            }
        }
        found
    }
}

fn read_token_file(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the token file {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect())
}

/// The interceptor in front of one service: lets a call through only with a token of `required`
/// (or when auth is off).
#[derive(Clone)]
pub struct RequireRole {
    tokens: Arc<Tokens>,
    required: Role,
    service: &'static str,
}

impl RequireRole {
    /// Guards `service` (its full gRPC name, for messages) for tokens of `required`.
    pub fn new(tokens: Arc<Tokens>, required: Role, service: &'static str) -> Self {
        Self {
            tokens,
            required,
            service,
        }
    }

    /// The check itself, on the request's metadata.
    pub fn check(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), Status> {
        if !self.tokens.enabled() {
            return Ok(());
        }
        let token = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(bearer);
        let Some(token) = token else {
            tracing::debug!(
                service = self.service,
                "call without a bearer token refused"
            );
            return Err(Status::unauthenticated("missing bearer token"));
        };
        match self.tokens.role_of(token) {
            Some(role) if role == self.required => Ok(()),
            Some(role) => {
                tracing::warn!(
                    service = self.service,
                    role = role.name(),
                    "call with a token of the wrong role refused"
                );
                Err(Status::permission_denied(format!(
                    "a {} token cannot call {}",
                    role.name(),
                    self.service
                )))
            }
            None => {
                tracing::warn!(service = self.service, "call with an invalid token refused");
                Err(Status::unauthenticated("invalid token"))
            }
        }
    }
}

/// The token of an `authorization` value `Bearer <token>` (scheme case-insensitive).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl Interceptor for RequireRole {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(request.metadata())?;
        Ok(request)
    }
}

impl fmt::Debug for RequireRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequireRole")
            .field("required", &self.required)
            .field("service", &self.service)
            .field("tokens", &self.tokens)
            .finish()
    }
}

/// The server's TLS identity from `--tls-cert`/`--tls-key` (PEM), or `None` for plaintext.
pub fn tls_config(config: &Config) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let cert = std::fs::read(cert)
        .with_context(|| format!("reading the TLS certificate {}", cert.display()))?;
    let key =
        std::fs::read(key).with_context(|| format!("reading the TLS key {}", key.display()))?;
    install_crypto_provider();
    Ok(Some(
        tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert, key)),
    ))
}

/// Makes ring rustls's process-wide provider (once; a provider already installed stays).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataMap;
    use tonic::Code;

    fn with_auth(value: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", value.parse().expect("ascii"));
        m
    }

    fn guard(required: Role) -> RequireRole {
        let tokens = Tokens::new(["c1", "c2"], ["w1"]).expect("tokens");
        RequireRole::new(Arc::new(tokens), required, "trainq.v1.JobService")
    }

    #[test]
    fn each_token_has_its_role_and_unknown_tokens_have_none() {
        let tokens = Tokens::new(["c1", " c2 ", ""], ["w1"]).expect("tokens");
        assert_eq!(tokens.role_of("c1"), Some(Role::Client));
        assert_eq!(tokens.role_of("c2"), Some(Role::Client));
        assert_eq!(tokens.role_of("w1"), Some(Role::Worker));
        assert_eq!(tokens.role_of("c"), None);
        assert_eq!(tokens.role_of(""), None);
        assert_eq!(tokens.describe(), "auth: on (2 client, 1 worker tokens)");
        assert!(Tokens::new(["same"], ["same"]).is_err());
        assert_eq!(
            Tokens::new([""; 0], [""]).expect("none").describe(),
            "auth: off"
        );
    }

    #[test]
    fn a_missing_or_wrong_token_is_unauthenticated_and_a_wrong_role_permission_denied() {
        let g = guard(Role::Client);
        let code = |m: &MetadataMap| g.check(m).err().map(|s| s.code());
        assert_eq!(code(&MetadataMap::new()), Some(Code::Unauthenticated));
        assert_eq!(code(&with_auth("c1")), Some(Code::Unauthenticated));
        assert_eq!(code(&with_auth("Basic c1")), Some(Code::Unauthenticated));
        assert_eq!(code(&with_auth("Bearer nope")), Some(Code::Unauthenticated));
        assert_eq!(code(&with_auth("Bearer w1")), Some(Code::PermissionDenied));
        assert_eq!(code(&with_auth("Bearer c1")), None);
        assert_eq!(code(&with_auth("bearer  c2")), None);
        let denied = g.check(&with_auth("Bearer w1")).expect_err("denied");
        assert_eq!(
            denied.message(),
            "a worker token cannot call trainq.v1.JobService"
        );
        let open = RequireRole::new(Arc::default(), Role::Worker, "x");
        assert!(open.check(&MetadataMap::new()).is_ok(), "auth off");
    }

    #[test]
    fn debug_output_never_shows_a_token() {
        let s = format!("{:?} {:?}", Secret::from("hunter2"), guard(Role::Worker));
        assert!(
            !s.contains("hunter2") && !s.contains("c1") && !s.contains("w1"),
            "{s}"
        );
    }
}
