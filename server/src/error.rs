//! The coordinator's one error type, and the one place it becomes a `tonic::Status`.
//!
//! Store, domain and api functions return [`Error`]; the gRPC layer converts with `?` through
//! `From<Error> for Status`. (Redis failures have their own `dispatch::DispatchError` because they
//! never reach a client: a failed push is logged and left to the reconciler.) Internal errors are logged here in full and reach the client only as
//! a short message. Messages are lowercase with no trailing period.
//!
//! Must not build a `tonic::Status` anywhere else, and must not leak SQL or driver messages to
//! clients.

use proto::spec::FieldViolation;
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

    pub fn job_not_found(id: uuid::Uuid) -> Self {
        Error::NotFound(format!("job {id} not found"))
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
/// wrong": connection failures, pool timeouts, and the server shutting down or starting up.
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // Class 08: connection exception; 57P01..57P03: admin shutdown, crash, cannot connect now.
            code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03")
        }),
        _ => false,
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        match e {
            Error::InvalidArgument { .. } => Status::invalid_argument(e.to_string()),
            Error::NotFound(m) => Status::not_found(m),
            Error::FailedPrecondition(m) => Status::failed_precondition(m),
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
