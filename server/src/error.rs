//! The coordinator's one error type, and the one place it becomes a `tonic::Status`.
//!
//! Store, domain and api functions return [`Error`]; the gRPC layer converts with `?` through
//! `From<Error> for Status`. (Redis failures have their own `dispatch::DispatchError` because they
//! never reach a client: a failed push is logged and left to the reconciler.) Internal errors
//! are logged here in full and reach the client only as a short message. Messages are lowercase
//! with no trailing period. A database that is down or restarting is UNAVAILABLE, never
//! INTERNAL ([`is_unavailable`]). [`OversizedIsResourceExhausted`] corrects the one status tonic
//! produces on its own that the contract words differently.
//!
//! Must not build a `tonic::Status` anywhere else, and must not leak SQL or driver messages to
//! clients.

use std::task::{Context, Poll};

use futures::TryFutureExt as _;
use percent_encoding::percent_decode;
use proto::spec::FieldViolation;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::Status;

/// Everything that can go wrong while serving a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request breaks a documented limit; `field` is the path from the request root.
    #[error("{field}: {description}")]
    InvalidArgument { field: String, description: String },
    /// The named thing does not exist (message says which).
    #[error("{0}")]
    NotFound(String),
    /// The request is well formed but the job is not in a state that allows it: a stale lease,
    /// a finished job.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The caller may not do this (a worker token bound to another worker id).
    #[error("{0}")]
    PermissionDenied(String),
    /// A limit on what the coordinator holds open at once (watchers) is reached; the client may
    /// retry later or elsewhere.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A submit's `request_id` was used before for a different spec; `field` is `request_id`.
    #[error("{field}: {description}")]
    AlreadyExists { field: String, description: String },
    /// Postgres cannot be reached or the pool is exhausted; the client may retry.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// Any other database failure: a bug or a broken schema.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// The artifact store (local files or S3) failed; the client may retry.
    #[error("artifact store: {0}")]
    ArtifactStore(#[source] object_store::Error),
    /// A client stream (an upload) broke off or carried a message that could not be decoded:
    /// the status tonic reported, passed back unchanged.
    #[error("request stream: {}", .0.message())]
    RequestStream(Status),
    /// Anything else that is our fault.
    #[error("{0:#}")]
    Internal(anyhow::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field: field.into(),
            description: description.into(),
        }
    }

    pub fn job_not_found(id: impl Into<proto::JobId>) -> Self {
        Error::NotFound(format!("job {} not found", id.into()))
    }

    pub fn sweep_not_found(id: impl Into<proto::SweepId>) -> Self {
        Error::NotFound(format!("sweep {} not found", id.into()))
    }
}

impl From<FieldViolation> for Error {
    fn from(v: FieldViolation) -> Self {
        Error::InvalidArgument {
            field: v.field,
            description: v.description,
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        if is_unavailable(&e) {
            Error::Unavailable(e)
        } else {
            Error::Database(e)
        }
    }
}

impl From<object_store::Error> for Error {
    fn from(e: object_store::Error) -> Self {
        Error::ArtifactStore(e)
    }
}

impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Self {
        Error::Internal(e)
    }
}

/// True when the error says "the database is not there right now" rather than "the query is
/// wrong": connection failures (refused, reset, closed mid-message: `Io`, and `Protocol` for a
/// connection that ended in the middle of the wire protocol), pool timeouts and a closed pool,
/// a crashed connection worker, and the server refusing or dropping connections because it is
/// shutting down, crashed, starting up or full.
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| is_unavailable_sqlstate(&code)),
        _ => false,
    }
}

/// True for a transaction that Postgres aborted to break a deadlock (SQLSTATE 40P01): nothing
/// of it was written, so the store may run it again.
pub fn is_deadlock(e: &Error) -> bool {
    match e {
        Error::Database(sqlx::Error::Database(db)) => db.code().as_deref() == Some("40P01"),
        _ => false,
    }
}

/// Class 08: connection exception; 57P01..57P03: admin shutdown, crash shutdown, cannot connect
/// now (starting up or in recovery); 53300: too many connections.
fn is_unavailable_sqlstate(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300")
}

/// Wraps a gRPC service so that a request larger than its decoding limit is refused with
/// RESOURCE_EXHAUSTED, as the gRPC specification and the .proto say, instead of the
/// OUT_OF_RANGE that tonic answers. The status travels in the response headers (a
/// trailers-only response), which is what is rewritten; nothing else is touched.
#[derive(Debug, Clone)]
pub struct OversizedIsResourceExhausted<S>(pub S);

impl<S: NamedService> NamedService for OversizedIsResourceExhausted<S> {
    const NAME: &'static str = S::NAME;
}

type HttpResponse = http::Response<tonic::body::Body>;

impl<S, B> tonic::codegen::Service<http::Request<B>> for OversizedIsResourceExhausted<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = HttpResponse>,
{
    type Response = HttpResponse;
    type Error = S::Error;
    type Future = futures::future::MapOk<S::Future, fn(HttpResponse) -> HttpResponse>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        self.0
            .call(request)
            .map_ok(oversized_is_resource_exhausted as fn(HttpResponse) -> HttpResponse)
    }
}

fn oversized_is_resource_exhausted(mut response: HttpResponse) -> HttpResponse {
    let headers = response.headers_mut();
    let out_of_range = headers
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"11");
    // grpc-message is percent-encoded.
    let oversized = headers.get("grpc-message").is_some_and(|m| {
        percent_decode(m.as_bytes())
            .decode_utf8_lossy()
            .contains("message length too large")
    });
    if out_of_range && oversized {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    response
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
            Error::NotFound(m) => Status::not_found(m),
            Error::FailedPrecondition(m) => Status::failed_precondition(m),
            Error::PermissionDenied(m) => Status::permission_denied(m),
            Error::ResourceExhausted(m) => Status::resource_exhausted(m),
            Error::AlreadyExists { .. } => Status::already_exists(e.to_string()),
            Error::Unavailable(ref source) => {
                tracing::warn!(error = %source, "database unavailable");
                Status::unavailable("database unavailable, retry later")
            }
            Error::ArtifactStore(ref source) => {
                tracing::error!(error = %source, "artifact store failed");
                Status::unavailable("artifact store unavailable, retry later")
            }
            Error::RequestStream(status) => status,
            Error::Database(_) | Error::Internal(_) => {
                tracing::error!(error = ?e, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn each_kind_of_error_maps_to_its_grpc_code() {
        let s = Status::from(Error::from(FieldViolation::new(
            "spec.name",
            "must not be empty",
        )));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "spec.name: must not be empty");
        assert_eq!(
            Status::from(Error::job_not_found(uuid::Uuid::nil())).code(),
            Code::NotFound
        );
        assert_eq!(
            Status::from(Error::FailedPrecondition("stale attempt".into())).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            Status::from(Error::PermissionDenied("bound to another worker".into())).code(),
            Code::PermissionDenied
        );
        let reused = Status::from(Error::AlreadyExists {
            field: "request_id".into(),
            description: "was used for another spec".into(),
        });
        assert_eq!(
            (reused.code(), reused.message()),
            (Code::AlreadyExists, "request_id: was used for another spec")
        );
        assert_eq!(
            Status::from(Error::from(sqlx::Error::PoolTimedOut)).code(),
            Code::Unavailable
        );
        let internal = Status::from(Error::from(sqlx::Error::RowNotFound));
        assert_eq!(internal.code(), Code::Internal);
        assert_eq!(
            internal.message(),
            "internal error",
            "details stay in the log"
        );
        let closed = Status::from(Error::from(sqlx::Error::Protocol(
            "connection closed unexpectedly".into(),
        )));
        assert_eq!(closed.code(), Code::Unavailable);
        let store = Status::from(Error::from(object_store::Error::NotImplemented {
            operation: "put".into(),
            implementer: "test".into(),
        }));
        assert_eq!(
            (store.code(), store.message()),
            (Code::Unavailable, "artifact store unavailable, retry later")
        );
    }
}

#[cfg(test)]
mod unavailable_tests {
    use std::borrow::Cow;
    use std::io;

    use super::*;

    /// A database error with only a SQLSTATE, as Postgres would send it.
    #[derive(Debug)]
    struct Sqlstate(&'static str);

    impl std::fmt::Display for Sqlstate {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "sqlstate {}", self.0)
        }
    }

    impl std::error::Error for Sqlstate {}

    impl sqlx::error::DatabaseError for Sqlstate {
        fn message(&self) -> &str {
            "test"
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn code_of(e: sqlx::Error) -> tonic::Code {
        Status::from(Error::from(e)).code()
    }

    #[test]
    fn a_database_that_is_down_or_restarting_is_unavailable_and_a_bad_query_is_internal() {
        let unavailable = [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::WorkerCrashed,
            sqlx::Error::Io(io::Error::from(io::ErrorKind::ConnectionRefused)),
            sqlx::Error::Io(io::Error::from(io::ErrorKind::UnexpectedEof)),
            sqlx::Error::Protocol("connection closed".into()),
            sqlx::Error::Database(Box::new(Sqlstate("08006"))),
            sqlx::Error::Database(Box::new(Sqlstate("08001"))),
            sqlx::Error::Database(Box::new(Sqlstate("57P01"))),
            sqlx::Error::Database(Box::new(Sqlstate("57P02"))),
            sqlx::Error::Database(Box::new(Sqlstate("57P03"))),
            sqlx::Error::Database(Box::new(Sqlstate("53300"))),
        ];
        for e in unavailable {
            let shown = format!("{e:?}");
            assert_eq!(code_of(e), tonic::Code::Unavailable, "{shown}");
        }
        let internal = [
            sqlx::Error::RowNotFound,
            sqlx::Error::ColumnNotFound("x".into()),
            sqlx::Error::Database(Box::new(Sqlstate("42P01"))), // undefined table
            sqlx::Error::Database(Box::new(Sqlstate("23505"))), // unique violation
            sqlx::Error::Database(Box::new(Sqlstate("57014"))), // query cancelled
        ];
        for e in internal {
            let shown = format!("{e:?}");
            assert_eq!(code_of(e), tonic::Code::Internal, "{shown}");
        }
    }

    #[test]
    fn only_sqlstate_40p01_is_a_deadlock() {
        let deadlock = Error::from(sqlx::Error::Database(Box::new(Sqlstate("40P01"))));
        assert!(is_deadlock(&deadlock));
        for other in [
            Error::from(sqlx::Error::Database(Box::new(Sqlstate("40001")))),
            Error::from(sqlx::Error::PoolTimedOut),
            Error::FailedPrecondition("40P01".into()),
        ] {
            assert!(!is_deadlock(&other), "{other:?}");
        }
    }

    #[test]
    fn only_an_oversized_request_becomes_resource_exhausted() {
        let response = |status: &'static str, message: &'static str| {
            let mut r = HttpResponse::new(tonic::body::Body::empty());
            r.headers_mut()
                .insert("grpc-status", http::HeaderValue::from_static(status));
            r.headers_mut()
                .insert("grpc-message", http::HeaderValue::from_static(message));
            r
        };
        let status_of = |r: HttpResponse| r.headers()["grpc-status"].clone();
        let oversized = response(
            "11",
            "Error,%20decoded%20message%20length%20too%20large:%20found%209000000%20bytes",
        );
        assert_eq!(status_of(oversized_is_resource_exhausted(oversized)), "8");
        // Any escape, not only %20, is decoded.
        let escaped = response(
            "11",
            "Error%2C%20decoded%20message%20length%20too%20large%3A%20found%209000000%20bytes",
        );
        assert_eq!(status_of(oversized_is_resource_exhausted(escaped)), "8");
        let spaced = response("11", "message%20length%20too%20large%0A");
        assert_eq!(status_of(oversized_is_resource_exhausted(spaced)), "8");
        let other = response("11", "step%20out%20of%20range");
        assert_eq!(status_of(oversized_is_resource_exhausted(other)), "11");
        let not_found = response("5", "message%20length%20too%20large");
        assert_eq!(status_of(oversized_is_resource_exhausted(not_found)), "5");
    }
}
