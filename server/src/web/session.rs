//! The UI's auth: the same client tokens as the gRPC API.
//!
//! With client tokens configured, `/login` takes a token and sets a session cookie (HttpOnly,
//! SameSite=Strict, 12 hours). The cookie holds no secret: `<token id>.<expiry>.<mac>`, the MAC
//! an HMAC-SHA256 keyed by the token's digest, so every coordinator configured with the same
//! tokens accepts it, and removing a token from the configuration ends its sessions. Every other
//! page and endpoint answers 401 with the login form without a valid session.
//!
//! State-changing requests are POSTs with a CSRF token in the form: with auth, an HMAC of the
//! session under the same key; without auth, a random value that must equal the `trainq_csrf`
//! cookie (double submit). A POST whose Origin is another site is refused either way.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Form;
use hmac::{Hmac, Mac};
use rand::RngCore as _;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{views, Web, WebError};

const SESSION_COOKIE: &str = "trainq_session";
const CSRF_COOKIE: &str = "trainq_csrf";
/// How long a login lasts.
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);

type HmacSha256 = Hmac<Sha256>;

/// What a handler knows of the caller: the CSRF token its forms must carry.
#[derive(Debug, Clone)]
pub struct Session {
    pub csrf: String,
    /// Signed in with a token (auth on): the pages offer to sign out.
    pub signed_in: bool,
}

fn hmac_hex(key: &[u8], message: &str) -> String {
    // HMAC takes a key of any length.
    let mut mac = HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(message.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// A short public name of a token's digest: which key signs its sessions.
fn token_id(digest: &[u8; 32]) -> String {
    let mut h = Sha256::new();
    h.update(b"trainq-web-token-id");
    h.update(digest);
    hex::encode(&h.finalize()[..8])
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn session_value(digest: &[u8; 32], expires: u64) -> String {
    let id = token_id(digest);
    let mac = hmac_hex(digest, &format!("trainq-web-session|{id}|{expires}"));
    format!("{id}.{expires}.{mac}")
}

fn csrf_of_session(digest: &[u8; 32], session: &str) -> String {
    hmac_hex(digest, &format!("trainq-web-csrf|{session}"))
}

fn eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// The key of a valid, unexpired session cookie value.
fn verify_session(web: &Web, value: &str, now: u64) -> Option<[u8; 32]> {
    let mut parts = value.split('.');
    let (id, expires, mac) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let expires: u64 = expires.parse().ok()?;
    if expires <= now {
        return None;
    }
    web.tokens
        .client_digests()
        .iter()
        .find(|d| token_id(d) == id)
        .filter(|d| eq(&session_value(d, expires), &format!("{id}.{expires}.{mac}")))
        .copied()
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn set_cookie(name: &str, value: &str, max_age: u64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Whether a state-changing request comes from another site: its Origin (sent by browsers
/// with every POST) names another host than the one it was sent to, or the browser says so.
fn cross_site(headers: &HeaderMap) -> bool {
    if headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == "cross-site")
    {
        return true;
    }
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    match headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        None => false,
        Some(origin) => {
            let origin_host = origin.split_once("://").map(|(_, rest)| rest).unwrap_or("");
            Some(origin_host) != host
        }
    }
}

fn login_required(next: &str, message: Option<&str>) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        Html(views::login_page(next, message).into_string()),
    )
        .into_response()
}

/// In front of every route: lets `/login` and `/static/` through; elsewhere, with auth on,
/// needs a valid session (401 and the login form otherwise); refuses cross-site POSTs; hands
/// the handlers their [`Session`].
pub async fn guard(State(web): State<Web>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    if request.method() == axum::http::Method::POST && cross_site(request.headers()) {
        return WebError::forbidden("cross-site request refused").into_response();
    }
    if path == "/login" || path.starts_with("/static/") {
        return next.run(request).await;
    }
    if web.tokens.enabled() {
        let Some((value, key)) = cookie(request.headers(), SESSION_COOKIE)
            .and_then(|v| verify_session(&web, &v, now_secs()).map(|k| (v, k)))
        else {
            let next_path = request
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into());
            return login_required(&next_path, None);
        };
        request.extensions_mut().insert(Session {
            csrf: csrf_of_session(&key, &value),
            signed_in: true,
        });
        return next.run(request).await;
    }
    // Auth off: a double-submit CSRF cookie, set on the first page.
    let (csrf, fresh) = match cookie(request.headers(), CSRF_COOKIE) {
        Some(v) if v.len() == 32 && v.chars().all(|c| c.is_ascii_hexdigit()) => (v, false),
        _ => {
            let mut bytes = [0u8; 16];
            rand::rng().fill_bytes(&mut bytes);
            (hex::encode(bytes), true)
        }
    };
    request.extensions_mut().insert(Session {
        csrf: csrf.clone(),
        signed_in: false,
    });
    let mut response = next.run(request).await;
    if fresh {
        response.headers_mut().append(
            header::SET_COOKIE,
            set_cookie(CSRF_COOKIE, &csrf, SESSION_LIFETIME.as_secs()),
        );
    }
    response
}

/// A form's CSRF field against the session's token.
pub fn check_csrf(session: &Session, sent: &str) -> Result<(), WebError> {
    if eq(&session.csrf, sent) {
        Ok(())
    } else {
        Err(WebError::forbidden(
            "the form's CSRF token is missing or wrong; reload the page and try again",
        ))
    }
}

#[derive(Debug, Deserialize)]
pub struct LoginQuery {
    #[serde(default)]
    next: String,
}

/// Only paths of this site (no scheme, no `//host`), so a login link cannot send the user
/// elsewhere afterwards.
fn safe_next(next: &str) -> &str {
    if next.starts_with('/') && !next.starts_with("//") && !next.contains('\\') {
        next
    } else {
        "/"
    }
}

pub async fn login_page(
    State(web): State<Web>,
    query: Result<axum::extract::Query<LoginQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let next = query.map(|q| q.0.next).unwrap_or_default();
    if !web.tokens.enabled() {
        return Redirect::to(safe_next(&next)).into_response();
    }
    Html(views::login_page(safe_next(&next), None).into_string()).into_response()
}

#[derive(Debug, Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: String,
}

pub async fn login(
    State(web): State<Web>,
    form: Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return WebError::bad_request("the login form needs a token").into_response();
    };
    let next = safe_next(&form.next).to_string();
    let Some(key) = web.tokens.client_key(form.token.trim()) else {
        tracing::warn!("web login with a token that is not a client token refused");
        return login_required(&next, Some("That is not a client token."));
    };
    let value = session_value(&key, now_secs() + SESSION_LIFETIME.as_secs());
    let mut response = Redirect::to(&next).into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(SESSION_COOKIE, &value, SESSION_LIFETIME.as_secs()),
    );
    response
}

#[derive(Debug, Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    pub csrf: String,
}

pub async fn logout(
    axum::Extension(session): axum::Extension<Session>,
    form: Result<Form<CsrfForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let sent = form.map(|f| f.0.csrf).unwrap_or_default();
    if let Err(e) = check_csrf(&session, &sent) {
        return e.into_response();
    }
    let mut response = Redirect::to("/login").into_response();
    response
        .headers_mut()
        .append(header::SET_COOKIE, set_cookie(SESSION_COOKIE, "", 0));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_next_path_never_leaves_the_site() {
        assert_eq!(safe_next("/runs/x?y=1"), "/runs/x?y=1");
        assert_eq!(safe_next("//evil.example/"), "/");
        assert_eq!(safe_next("https://evil.example/"), "/");
        assert_eq!(safe_next("/\\evil"), "/");
    }

    #[test]
    fn origins_of_other_hosts_are_cross_site() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(!cross_site(&h), "no Origin: a same-site form or a script");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(!cross_site(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(cross_site(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(cross_site(&h));
    }

    #[test]
    fn a_session_is_bound_to_its_token_and_expiry() {
        let key = [7u8; 32];
        let other = [8u8; 32];
        let v = session_value(&key, 1000);
        assert_ne!(v, session_value(&other, 1000));
        assert_ne!(v, session_value(&key, 1001));
        assert_ne!(csrf_of_session(&key, &v), csrf_of_session(&other, &v));
    }
}
