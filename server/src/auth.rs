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
//! A worker token may be bound to one worker id (`ID=TOKEN` in `--worker-tokens` or a token
//! file line): a claim or worker write with that token whose worker id (the request's or its
//! lease's) is another one is PERMISSION_DENIED naming both ids ([`check_acting_as`]). An
//! unbound token may act as any worker, as before.
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

/// A token's SHA-256.
pub type Digest32 = [u8; 32];

fn digest(token: &str) -> Digest32 {
    Sha256::digest(token.as_bytes()).into()
}

/// The configured tokens, as digests. Empty: auth is off.
#[derive(Default)]
pub struct Tokens {
    client: Vec<Digest32>,
    /// Each worker token with the worker id it is bound to, if any.
    worker: Vec<(Digest32, Option<String>)>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("client", &self.client.len())
            .field("worker", &self.worker.len())
            .finish()
    }
}

/// Who a valid token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    /// The worker id a worker token is bound to; `None` for an unbound token.
    pub bound_to: Option<String>,
}

/// Put into a WorkerService request's extensions by [`RequireRole`] when its token is bound to
/// a worker id: the id the request may act as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundWorker(pub String);

/// Refuses (PERMISSION_DENIED naming both ids) a request whose token is bound to another worker
/// than `worker_id`, the worker the request claims for or whose lease it carries. Passes when the
/// token is unbound, when auth is off, and for an empty `worker_id` (which validation refuses
/// with INVALID_ARGUMENT).
pub fn check_acting_as(bound: Option<&BoundWorker>, worker_id: &str) -> crate::error::Result<()> {
    match bound {
        Some(BoundWorker(bound)) if !worker_id.is_empty() && bound != worker_id => {
            tracing::warn!(
                bound_to = %bound, worker_id = %worker_id,
                "worker call for another worker id refused"
            );
            Err(crate::error::Error::PermissionDenied(format!(
                "the token is bound to worker {bound:?} and cannot act as worker {worker_id:?}"
            )))
        }
        _ => Ok(()),
    }
}

/// The worker id a request's token is bound to (see [`BoundWorker`]).
pub fn bound_worker<T>(request: &Request<T>) -> Option<BoundWorker> {
    request.extensions().get::<BoundWorker>().cloned()
}

/// Splits a worker token entry into its bound worker id and the token: `ID=TOKEN` is bound, a
/// plain `TOKEN` is not. So that base64 padding (`abc=`, `abc==`) stays a plain token, an entry
/// is bound only when both sides are non-empty and the token does not start with `=`.
fn split_binding(entry: &str) -> (Option<&str>, &str) {
    match entry.split_once('=') {
        Some((id, token))
            if !id.trim().is_empty() && !token.trim().is_empty() && !token.starts_with('=') =>
        {
            (Some(id.trim()), token.trim())
        }
        _ => (None, entry),
    }
}

impl Tokens {
    /// The tokens of `--client-tokens`, `--worker-tokens` and the token files (one token per
    /// line; blank lines and `#` comments skipped). A token given for both roles is an error.
    /// A worker token may be given as `ID=TOKEN` to bind it to worker `ID`.
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

    /// Client tokens, and worker tokens each either `TOKEN` or `ID=TOKEN` (bound to worker
    /// `ID`). Blank entries are skipped.
    pub fn new(
        client: impl IntoIterator<Item = impl AsRef<str>>,
        worker: impl IntoIterator<Item = impl AsRef<str>>,
    ) -> anyhow::Result<Self> {
        let client: Vec<Digest32> = client
            .into_iter()
            .filter_map(|t| {
                let t = t.as_ref().trim();
                (!t.is_empty()).then(|| digest(t))
            })
            .collect();
        let mut bound: Vec<(Digest32, Option<String>)> = Vec::new();
        for entry in worker {
            let entry = entry.as_ref().trim();
            if entry.is_empty() {
                continue;
            }
            let (id, token) = split_binding(entry);
            if let Some(id) = id {
                anyhow::ensure!(
                    !id.chars().any(|c| c.is_control() || c.is_whitespace()),
                    "a worker token is bound to a worker id with spaces or control characters"
                );
            }
            let d = digest(token);
            let id = id.map(str::to_owned);
            match bound.iter().find(|(known, _)| *known == d) {
                Some((_, other)) => anyhow::ensure!(
                    *other == id,
                    "a worker token is given twice with different worker ids; bind it once"
                ),
                None => bound.push((d, id)),
            }
        }
        anyhow::ensure!(
            !client.iter().any(|c| bound.iter().any(|(w, _)| w == c)),
            "a token is configured both as a client and as a worker token; each token has one role"
        );
        Ok(Tokens {
            client,
            worker: bound,
        })
    }

    /// Whether any token is configured.
    pub fn enabled(&self) -> bool {
        !self.client.is_empty() || !self.worker.is_empty()
    }

    /// "auth: on (N client, M worker tokens, K bound to worker ids)" or "auth: off", for the
    /// start-up log.
    pub fn describe(&self) -> String {
        if self.enabled() {
            let bound = self.worker.iter().filter(|(_, id)| id.is_some()).count();
            let bound = if bound > 0 {
                format!(", {bound} bound to worker ids")
            } else {
                String::new()
            };
            format!(
                "auth: on ({} client, {} worker tokens{bound})",
                self.client.len(),
                self.worker.len()
            )
        } else {
            "auth: off".into()
        }
    }

    /// The client tokens' digests: the keys of the web UI's session MACs (secret like the
    /// tokens: a digest cannot be turned back into its token, but it signs sessions).
    pub fn client_digests(&self) -> &[Digest32] {
        &self.client
    }

    /// The digest of `token` when it is a client token (compared as [`Tokens::identify`] does).
    pub fn client_key(&self, token: &str) -> Option<Digest32> {
        match self.identify(token) {
            Some(Caller {
                role: Role::Client, ..
            }) => Some(digest(token)),
            _ => None,
        }
    }

    /// The role of `token` (see [`Tokens::identify`]).
    pub fn role_of(&self, token: &str) -> Option<Role> {
        self.identify(token).map(|c| c.role)
    }

    /// Who `token` belongs to, comparing digests in constant time and always looking at every
    /// configured token, so timing says nothing about which (or how much of one) matched.
    pub fn identify(&self, token: &str) -> Option<Caller> {
        let d = digest(token);
        let mut found = None;
        for known in &self.client {
            if bool::from(known.ct_eq(&d)) {
                found = Some(Caller {
                    role: Role::Client,
                    bound_to: None,
                });
            }
        }
        for (known, id) in &self.worker {
            if bool::from(known.ct_eq(&d)) {
                found = Some(Caller {
                    role: Role::Worker,
                    bound_to: id.clone(),
                });
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
        self.admit(metadata).map(|_| ())
    }

    /// The check, returning who called (`None` when auth is off).
    fn admit(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Option<Caller>, Status> {
        if !self.tokens.enabled() {
            return Ok(None);
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
        match self.tokens.identify(token) {
            Some(caller) if caller.role == self.required => Ok(Some(caller)),
            Some(caller) => {
                tracing::warn!(
                    service = self.service,
                    role = caller.role.name(),
                    "call with a token of the wrong role refused"
                );
                Err(Status::permission_denied(format!(
                    "a {} token cannot call {}",
                    caller.role.name(),
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
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let caller = self.admit(request.metadata())?;
        if let Some(id) = caller.and_then(|c| c.bound_to) {
            request.extensions_mut().insert(BoundWorker(id));
        }
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
    fn a_worker_token_may_be_bound_to_a_worker_id() {
        let tokens = Tokens::new(["c1"], ["w1", "gpu-0=w2", "pad=", "padded=="]).expect("tokens");
        let worker = |bound: Option<&str>| Caller {
            role: Role::Worker,
            bound_to: bound.map(String::from),
        };
        assert_eq!(tokens.identify("w1"), Some(worker(None)));
        assert_eq!(tokens.identify("w2"), Some(worker(Some("gpu-0"))));
        assert_eq!(
            tokens.identify("gpu-0=w2"),
            None,
            "the id is not part of the token"
        );
        // Base64 padding is a plain token, not a binding.
        assert_eq!(tokens.identify("pad="), Some(worker(None)));
        assert_eq!(tokens.identify("padded=="), Some(worker(None)));
        assert_eq!(
            tokens.describe(),
            "auth: on (1 client, 4 worker tokens, 1 bound to worker ids)"
        );
        assert!(Tokens::new(["c1"], ["a=t", "b=t"]).is_err(), "two ids");
        assert!(Tokens::new(["t"], ["a=t"]).is_err(), "two roles");
        assert!(
            Tokens::new([""; 0], ["a b=t"]).is_err(),
            "a space in the id"
        );
    }

    #[test]
    fn a_bound_token_acts_only_as_its_worker_and_the_interceptor_says_which() {
        let tokens = Arc::new(Tokens::new(["c1"], ["w1", "gpu-0=w2"]).expect("tokens"));
        let mut g = RequireRole::new(tokens, Role::Worker, "trainq.v1.WorkerService");
        let call = |g: &mut RequireRole, value: &str| {
            let mut r = Request::new(());
            r.metadata_mut()
                .insert("authorization", value.parse().expect("ascii"));
            g.call(r).map(|r| bound_worker(&r))
        };
        let bound = call(&mut g, "Bearer w2").expect("admitted");
        assert_eq!(bound, Some(BoundWorker("gpu-0".into())));
        assert_eq!(call(&mut g, "Bearer w1").expect("admitted"), None);
        assert!(check_acting_as(bound.as_ref(), "gpu-0").is_ok());
        let denied =
            Status::from(check_acting_as(bound.as_ref(), "gpu-1").expect_err("other worker"));
        assert_eq!(denied.code(), Code::PermissionDenied);
        assert!(
            denied.message().contains("\"gpu-1\""),
            "{}",
            denied.message()
        );
        assert!(
            denied.message().contains("\"gpu-0\""),
            "{}",
            denied.message()
        );
        assert!(
            check_acting_as(None, "anyone").is_ok(),
            "unbound or auth off"
        );
        assert!(
            check_acting_as(bound.as_ref(), "").is_ok(),
            "left to validation"
        );
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
