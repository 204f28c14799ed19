//! Artifacts at the edge: kinds, file names, the upload header, and which artifact a download
//! or a listing means; with the artifact limits of the .proto.
//!
//! Must not do I/O, and must not parse an id other than through [`proto::JobId::parse`] and
//! [`proto::ArtifactId::parse`].

use std::borrow::Cow;
use std::fmt;

use proto::{v1, ArtifactId, JobId};

use super::lease::Lease;
use super::parse_job_id;
use crate::error::{Error, Result};

/// Largest artifact, in bytes (documented in the .proto: 2 GiB).
pub const MAX_ARTIFACT_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// Largest data chunk of an upload, in bytes (documented in the .proto: 4 MiB).
pub const MAX_UPLOAD_CHUNK_BYTES: usize = 4 * 1024 * 1024;
/// Longest artifact kind, in characters.
pub const MAX_ARTIFACT_KIND_CHARS: usize = 32;
/// Longest artifact file name, in characters.
pub const MAX_ARTIFACT_NAME_CHARS: usize = 128;
/// How many `resume` artifacts of a job are kept (the newest by step); older ones are deleted.
/// Two, so that a state that turns out unreadable still leaves one to fall back on.
pub const KEPT_RESUME_STATES: i64 = 2;
/// Checkpoints a job keeps by default (the coordinator's `--keep-checkpoints`): the newest five
/// by step, which include the final one.
pub const DEFAULT_KEPT_CHECKPOINTS: u32 = 5;

/// An artifact kind: 1..=32 characters of `[a-z0-9_-]`. Workers may store kinds of their own;
/// the ones the coordinator and the worker agree on are the constants.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ArtifactKind(Cow<'static, str>);

impl ArtifactKind {
    /// A model checkpoint (safetensors, PyTorch-loadable), one per epoch.
    pub const CHECKPOINT: ArtifactKind = ArtifactKind(Cow::Borrowed("checkpoint"));
    /// A resumable training state: it names its step, a claim hands the newest one to the next
    /// attempt, and only the newest [`KEPT_RESUME_STATES`] of a job are kept.
    pub const RESUME: ArtifactKind = ArtifactKind(Cow::Borrowed("resume"));
    /// A grid of generated samples (PNG).
    pub const SAMPLES: ArtifactKind = ArtifactKind(Cow::Borrowed("samples"));
    /// A grid of reconstructions (PNG).
    pub const RECONSTRUCTIONS: ArtifactKind = ArtifactKind(Cow::Borrowed("reconstructions"));

    /// Checks `text`; `field` is its path in the request (`header.kind`, `kind`).
    pub fn parse(field: &str, text: &str) -> Result<Self> {
        let ok = (1..=MAX_ARTIFACT_KIND_CHARS).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if ok {
            Ok(ArtifactKind(Cow::Owned(text.to_owned())))
        } else {
            Err(Error::invalid(
                field,
                format!(
                    "must be 1 to {MAX_ARTIFACT_KIND_CHARS} characters of [a-z0-9_-], got {text:?}"
                ),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ArtifactKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ArtifactKind {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Checks an artifact file name: 1..=128 characters of `[A-Za-z0-9._-]`, and not `.` or `..`
/// (it becomes the last segment of the object key).
pub fn parse_artifact_name(field: &str, text: &str) -> Result<String> {
    let ok = (1..=MAX_ARTIFACT_NAME_CHARS).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && text != "."
        && text != "..";
    if ok {
        Ok(text.to_owned())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "must be 1 to {MAX_ARTIFACT_NAME_CHARS} characters of [A-Za-z0-9._-] (not . or ..), got {text:?}"
            ),
        ))
    }
}

/// What a worker says about the artifact it is about to upload (the first message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactHeader {
    pub lease: Lease,
    pub kind: ArtifactKind,
    pub name: String,
    /// 1-based epoch; 0 when not tied to an epoch.
    pub epoch: i32,
    /// What the data must add up to; at most [`MAX_ARTIFACT_BYTES`].
    pub size_bytes: u64,
    /// Lowercase hex SHA-256 the data must hash to.
    pub sha256: String,
    /// Global optimiser step; 0 when not tied to a step, at least 1 for
    /// [`ArtifactKind::RESUME`].
    pub step: i64,
}

impl TryFrom<v1::UploadArtifactHeader> for ArtifactHeader {
    type Error = Error;

    fn try_from(h: v1::UploadArtifactHeader) -> Result<Self> {
        // Lease reports `lease.*`; inside the header it is `header.lease.*`.
        let lease = Lease::try_from(h.lease).map_err(|e| match e {
            Error::InvalidArgument { field, description } => Error::InvalidArgument {
                field: format!("header.{field}"),
                description,
            },
            other => other,
        })?;
        let kind = ArtifactKind::parse("header.kind", &h.kind)?;
        let name = parse_artifact_name("header.name", &h.name)?;
        let epoch =
            i32::try_from(h.epoch).map_err(|_| Error::invalid("header.epoch", "is too large"))?;
        let step =
            i64::try_from(h.step).map_err(|_| Error::invalid("header.step", "is too large"))?;
        if kind == ArtifactKind::RESUME && step < 1 {
            return Err(Error::invalid(
                "header.step",
                format!("a {kind} artifact must name its step (>= 1), got {step}"),
            ));
        }
        if h.size_bytes > MAX_ARTIFACT_BYTES {
            return Err(Error::invalid(
                "header.size_bytes",
                format!(
                    "must be at most {MAX_ARTIFACT_BYTES} (2 GiB), got {}",
                    h.size_bytes
                ),
            ));
        }
        let hex_ok = h.sha256.len() == 64
            && h.sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex_ok {
            return Err(Error::invalid(
                "header.sha256",
                format!("must be 64 lowercase hex digits, got {:?}", h.sha256),
            ));
        }
        Ok(ArtifactHeader {
            lease,
            kind,
            name,
            epoch,
            size_bytes: h.size_bytes,
            sha256: h.sha256,
            step,
        })
    }
}

/// Which artifact a DownloadArtifact request means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArtifactRef {
    /// This one.
    Id(ArtifactId),
    /// The newest artifact of this kind the job stored.
    Newest { job_id: JobId, kind: ArtifactKind },
}

impl TryFrom<v1::DownloadArtifactRequest> for ArtifactRef {
    type Error = Error;

    fn try_from(req: v1::DownloadArtifactRequest) -> Result<Self> {
        if !req.artifact_id.is_empty() {
            if !req.job_id.is_empty() || !req.kind.is_empty() {
                return Err(Error::invalid(
                    "artifact_id",
                    "give either artifact_id or job_id and kind, not both",
                ));
            }
            return Ok(ArtifactRef::Id(ArtifactId::parse(
                "artifact_id",
                &req.artifact_id,
            )?));
        }
        if req.job_id.is_empty() {
            return Err(Error::invalid(
                "artifact_id",
                "is required (or job_id and kind)",
            ));
        }
        let job_id = parse_job_id("job_id", &req.job_id)?;
        if req.kind.is_empty() {
            return Err(Error::invalid("kind", "is required with job_id"));
        }
        let kind = ArtifactKind::parse("kind", &req.kind)?;
        Ok(ArtifactRef::Newest { job_id, kind })
    }
}

/// Which artifacts ListArtifacts returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactQuery {
    pub job_id: JobId,
    /// Only this kind; `None` for every kind.
    pub kind: Option<ArtifactKind>,
}

impl TryFrom<v1::ListArtifactsRequest> for ArtifactQuery {
    type Error = Error;

    fn try_from(req: v1::ListArtifactsRequest) -> Result<Self> {
        let job_id = parse_job_id("job_id", &req.job_id)?;
        let kind = match req.kind.as_str() {
            "" => None,
            kind => Some(ArtifactKind::parse("kind", kind)?),
        };
        Ok(ArtifactQuery { job_id, kind })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::invalid_field;
    use uuid::Uuid;

    #[test]
    fn the_known_kinds_are_valid_kinds() {
        for kind in [
            ArtifactKind::CHECKPOINT,
            ArtifactKind::RESUME,
            ArtifactKind::SAMPLES,
            ArtifactKind::RECONSTRUCTIONS,
        ] {
            assert_eq!(
                ArtifactKind::parse("kind", kind.as_str()).expect("valid"),
                kind
            );
        }
    }

    #[test]
    fn an_upload_header_is_checked_field_by_field_up_to_two_gib() {
        let good = v1::UploadArtifactHeader {
            lease: Some(v1::JobLease {
                job_id: Uuid::nil().to_string(),
                attempt: 1,
                worker_id: "w".into(),
            }),
            kind: ArtifactKind::CHECKPOINT.to_string(),
            name: "epoch-001.safetensors".into(),
            epoch: 1,
            size_bytes: MAX_ARTIFACT_BYTES,
            sha256: "0".repeat(64),
            step: 0,
        };
        assert!(ArtifactHeader::try_from(good.clone()).is_ok());
        let with = |f: fn(&mut v1::UploadArtifactHeader)| {
            let mut h = good.clone();
            f(&mut h);
            invalid_field(ArtifactHeader::try_from(h))
        };
        assert_eq!(with(|h| h.lease = None), "header.lease");
        assert_eq!(
            with(|h| h.lease.as_mut().expect("lease").attempt = 0),
            "header.lease.attempt"
        );
        assert_eq!(
            with(|h| h.lease.as_mut().expect("lease").job_id = format!("{{{}}}", Uuid::nil())),
            "header.lease.job_id"
        );
        assert_eq!(with(|h| h.kind = "Checkpoint".into()), "header.kind");
        assert_eq!(with(|h| h.kind = "k".repeat(33)), "header.kind");
        assert_eq!(with(|h| h.name = "a/b".into()), "header.name");
        assert_eq!(with(|h| h.name = ".".into()), "header.name");
        assert_eq!(with(|h| h.name = String::new()), "header.name");
        assert_eq!(
            with(|h| h.size_bytes = MAX_ARTIFACT_BYTES + 1),
            "header.size_bytes"
        );
        assert_eq!(with(|h| h.sha256 = "A".repeat(64)), "header.sha256");
        assert_eq!(with(|h| h.sha256 = "0".repeat(63)), "header.sha256");
        assert_eq!(with(|h| h.step = u64::MAX), "header.step");
    }

    #[test]
    fn a_resume_artifact_must_name_its_step_and_others_need_not() {
        let header = |kind: &ArtifactKind, step: u64| v1::UploadArtifactHeader {
            lease: Some(v1::JobLease {
                job_id: Uuid::nil().to_string(),
                attempt: 1,
                worker_id: "w".into(),
            }),
            kind: kind.to_string(),
            name: "state.safetensors".into(),
            epoch: 0,
            size_bytes: 1,
            sha256: "0".repeat(64),
            step,
        };
        assert_eq!(
            invalid_field(ArtifactHeader::try_from(header(&ArtifactKind::RESUME, 0))),
            "header.step"
        );
        assert_eq!(
            ArtifactHeader::try_from(header(&ArtifactKind::RESUME, 1))
                .expect("step 1")
                .step,
            1
        );
        assert_eq!(
            ArtifactHeader::try_from(header(&ArtifactKind::CHECKPOINT, 0))
                .expect("no step needed")
                .step,
            0
        );
    }

    fn req(artifact_id: &str, job_id: &str, kind: &str) -> v1::DownloadArtifactRequest {
        v1::DownloadArtifactRequest {
            artifact_id: artifact_id.into(),
            job_id: job_id.into(),
            kind: kind.into(),
        }
    }

    #[test]
    fn a_download_names_an_artifact_or_a_job_and_kind_but_not_both() {
        let id = Uuid::now_v7();
        assert_eq!(
            ArtifactRef::try_from(req(&id.to_string(), "", "")).expect("by id"),
            ArtifactRef::Id(ArtifactId::from(id))
        );
        assert_eq!(
            ArtifactRef::try_from(req("", &id.to_string(), "samples")).expect("by kind"),
            ArtifactRef::Newest {
                job_id: JobId::from(id),
                kind: ArtifactKind::SAMPLES
            }
        );
        assert_eq!(
            invalid_field(ArtifactRef::try_from(req("", "", ""))),
            "artifact_id"
        );
        assert_eq!(
            invalid_field(ArtifactRef::try_from(req("x", "", ""))),
            "artifact_id"
        );
        assert_eq!(
            invalid_field(ArtifactRef::try_from(req(
                &id.to_string(),
                &id.to_string(),
                "k"
            ))),
            "artifact_id"
        );
        assert_eq!(
            invalid_field(ArtifactRef::try_from(req("", &id.to_string(), ""))),
            "kind"
        );
        assert_eq!(
            invalid_field(ArtifactRef::try_from(req("", "nope", "k"))),
            "job_id"
        );
    }

    #[test]
    fn a_download_by_braced_or_urn_id_is_invalid() {
        let id = Uuid::now_v7();
        for text in [
            format!("{{{id}}}"),
            format!("urn:uuid:{id}"),
            id.simple().to_string(),
        ] {
            assert_eq!(
                invalid_field(ArtifactRef::try_from(req(&text, "", ""))),
                "artifact_id",
                "{text}"
            );
            assert_eq!(
                invalid_field(ArtifactRef::try_from(req("", &text, "samples"))),
                "job_id",
                "{text}"
            );
            assert_eq!(
                invalid_field(ArtifactQuery::try_from(v1::ListArtifactsRequest {
                    job_id: text.clone(),
                    kind: String::new(),
                })),
                "job_id",
                "{text}"
            );
        }
    }
}
