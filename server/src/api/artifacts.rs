//! Artifacts over gRPC: `WorkerService.UploadArtifact`, `JobService.ListArtifacts`, and
//! `DownloadArtifact`, which both services serve with the one implementation here.
//!
//! An upload is a header, then data chunks. The lease is checked when the header arrives and
//! again in the transaction that records the artifact; the bytes are spooled and checked
//! against the header's size and SHA-256 before anything reaches the artifact store, so a
//! refused upload leaves neither a record nor an object behind. A download streams the
//! object in chunks of at most 1 MiB, the first carrying the record, and stops quietly when
//! the client goes away.

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt as _};
use proto::v1::{self, upload_artifact_chunk::Part};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::{artifact_to_proto, AppState};
use crate::artifacts::{ArtifactStore, Spool};
use crate::auth::{check_acting_as, BoundWorker};
use crate::domain::{
    ArtifactHeader, ArtifactKind, ArtifactQuery, ArtifactRef, MAX_UPLOAD_CHUNK_BYTES,
};
use crate::error::{Error, Result};
use crate::shutdown::Shutdown;
use crate::store::{self, ArtifactRow};

/// The stream both DownloadArtifact methods return.
pub type ArtifactChunks = ReceiverStream<Result<v1::ArtifactChunk, Status>>;

/// Chunks buffered between the store and a slow client (at most 1 MiB each).
const DOWNLOAD_BUFFER: usize = 4;

/// Receives, checks, stores and records one artifact.
pub(super) async fn upload(
    state: &AppState,
    mut stream: Streaming<v1::UploadArtifactChunk>,
    bound: Option<&BoundWorker>,
) -> Result<v1::Artifact> {
    let header = match next_part(&mut stream).await? {
        Some(Some(Part::Header(h))) => ArtifactHeader::try_from(h)?,
        Some(Some(Part::Data(_))) => {
            return Err(Error::invalid(
                "header",
                "must be the first message, before any data",
            ))
        }
        Some(None) | None => {
            return Err(Error::invalid(
                "header",
                "is required: the first message must be a header",
            ))
        }
    };
    let lease = &header.lease;
    check_acting_as(bound, &lease.worker_id)?;
    store::check_lease(&state.pool, lease).await?;
    let spool = receive(&mut stream, &header).await?;

    let key = ArtifactStore::key(
        lease.job_id.as_uuid(),
        lease.attempt,
        header.kind.as_str(),
        &header.name,
    );
    let uri = state.artifacts.uri(&key);
    state.artifacts.store(&key, spool).await?;
    match store::record_artifact(&state.pool, &header, &uri, state.retention).await {
        Ok(store::Recorded {
            artifact: row,
            pruned,
        }) => {
            tracing::info!(
                job_id = %lease.job_id, attempt = lease.attempt, kind = %row.kind,
                name = %row.name, step = row.step, size = row.size_bytes, %uri, "artifact stored"
            );
            delete_pruned(state, &pruned).await;
            Ok(artifact_to_proto(row))
        }
        Err(refused) => {
            // The lease went stale while the bytes were on their way: the object goes too,
            // unless an earlier upload of the same attempt, kind and name is recorded there.
            match store::artifact_uri_in_use(&state.pool, &uri).await {
                Ok(false) => {
                    if let Err(e) = state.artifacts.delete(&key).await {
                        tracing::warn!(%uri, error = %e, "could not delete an unrecorded artifact");
                    }
                }
                Ok(true) => {}
                Err(e) => {
                    tracing::warn!(%uri, error = %e, "could not check an unrecorded artifact")
                }
            }
            Err(refused)
        }
    }
}

/// Deletes the objects of records that pruning removed (older training states and checkpoints
/// beyond the retention, a succeeded job's training states), best effort: a failure is logged
/// and leaves an unreferenced object behind, never a record without its object. An object that
/// a record points at again (an upload of the same key meanwhile) stays.
pub(super) async fn delete_pruned(state: &AppState, pruned: &[ArtifactRow]) {
    for row in pruned {
        let key = ArtifactStore::key(row.job_id.as_uuid(), row.attempt, &row.kind, &row.name);
        match store::artifact_uri_in_use(&state.pool, &row.uri).await {
            Ok(false) => match state.artifacts.delete(&key).await {
                Ok(()) => tracing::info!(
                    job_id = %row.job_id, attempt = row.attempt, kind = %row.kind,
                    step = row.step, uri = %row.uri, "pruned artifact deleted"
                ),
                Err(e) => tracing::warn!(
                    job_id = %row.job_id, attempt = row.attempt, kind = %row.kind,
                    uri = %row.uri, error = %e,
                    "could not delete a pruned artifact; its object stays behind"
                ),
            },
            Ok(true) => {}
            Err(e) => tracing::warn!(
                job_id = %row.job_id, attempt = row.attempt, uri = %row.uri, error = %e,
                "could not check a pruned artifact; its object stays behind"
            ),
        }
    }
}

/// The next message's part: `None` at the end of the stream, `Some(None)` for a message that
/// carries neither a header nor data.
async fn next_part(
    stream: &mut Streaming<v1::UploadArtifactChunk>,
) -> Result<Option<Option<Part>>> {
    let message = stream.message().await.map_err(Error::RequestStream)?;
    Ok(message.map(|chunk| chunk.part))
}

/// Spools the data chunks that follow the header, refusing the upload as soon as it breaks a
/// limit, and checks the total size and SHA-256 against the header.
async fn receive(
    stream: &mut Streaming<v1::UploadArtifactChunk>,
    header: &ArtifactHeader,
) -> Result<Spool> {
    let mut spool = Spool::new().await?;
    while let Some(part) = next_part(stream).await? {
        let data = match part {
            Some(Part::Data(data)) => data,
            Some(Part::Header(_)) => {
                return Err(Error::invalid("header", "must be sent once, first"));
            }
            None => {
                return Err(Error::invalid(
                    "data",
                    "is required in every message after the header",
                ));
            }
        };
        if data.len() > MAX_UPLOAD_CHUNK_BYTES {
            return Err(Error::invalid(
                "data",
                format!(
                    "chunks must be at most {MAX_UPLOAD_CHUNK_BYTES} bytes, got {}",
                    data.len()
                ),
            ));
        }
        let total = spool.len() + data.len() as u64;
        if total > header.size_bytes {
            return Err(Error::invalid(
                "header.size_bytes",
                format!(
                    "is {} but more data arrived ({total} bytes so far)",
                    header.size_bytes
                ),
            ));
        }
        spool = spool.append(Bytes::from(data)).await?;
    }
    if spool.len() != header.size_bytes {
        return Err(Error::invalid(
            "header.size_bytes",
            format!("is {} but {} bytes arrived", header.size_bytes, spool.len()),
        ));
    }
    let digest = spool.sha256();
    if digest != header.sha256 {
        return Err(Error::invalid(
            "header.sha256",
            format!("is {} but the data hashes to {digest}", header.sha256),
        ));
    }
    Ok(spool)
}

/// A job's artifacts, oldest first; NOT_FOUND for an unknown job.
pub(super) async fn list(
    state: &AppState,
    req: v1::ListArtifactsRequest,
) -> Result<v1::ListArtifactsResponse> {
    let query = ArtifactQuery::try_from(req)?;
    if store::get_job(&state.pool, query.job_id).await?.is_none() {
        return Err(Error::job_not_found(query.job_id));
    }
    let kind = query.kind.as_ref().map(ArtifactKind::as_str);
    let rows = store::list_artifacts(&state.pool, query.job_id, kind).await?;
    Ok(v1::ListArtifactsResponse {
        artifacts: rows.into_iter().map(artifact_to_proto).collect(),
    })
}

/// Finds the artifact (NOT_FOUND before any stream exists), opens its object, then streams it
/// from a task of its own.
pub(super) async fn download(
    state: Arc<AppState>,
    req: v1::DownloadArtifactRequest,
) -> Result<ArtifactChunks> {
    let row = find(&state, ArtifactRef::try_from(req)?).await?;
    let key = ArtifactStore::key(row.job_id.as_uuid(), row.attempt, &row.kind, &row.name);
    let chunks = state.artifacts.fetch(&key).await.map_err(|e| match e {
        Error::ArtifactStore(object_store::Error::NotFound { .. }) => {
            Error::Internal(anyhow::anyhow!(
                "artifact {} is recorded at {} but its object is missing",
                row.id,
                row.uri
            ))
        }
        other => other,
    })?;
    let (tx, rx) = mpsc::channel(DOWNLOAD_BUFFER);
    tokio::spawn(send_chunks(
        artifact_to_proto(row),
        chunks,
        tx,
        state.shutdown.clone(),
    ));
    Ok(ReceiverStream::new(rx))
}

async fn find(state: &AppState, which: ArtifactRef) -> Result<ArtifactRow> {
    match which {
        ArtifactRef::Id(id) => store::get_artifact(&state.pool, id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("artifact {id} not found"))),
        ArtifactRef::Newest { job_id, kind } => {
            if let Some(row) = store::newest_artifact(&state.pool, job_id, kind.as_str()).await? {
                return Ok(row);
            }
            if store::get_job(&state.pool, job_id).await?.is_none() {
                return Err(Error::job_not_found(job_id));
            }
            Err(Error::NotFound(format!(
                "job {job_id} has no {kind} artifact"
            )))
        }
    }
}

type Sender = mpsc::Sender<Result<v1::ArtifactChunk, Status>>;

/// Sends the record with the first chunk (alone, for an empty object), then the rest. Ends
/// when the object is sent, the client goes away, or (with UNAVAILABLE) the coordinator shuts
/// down.
async fn send_chunks(
    artifact: v1::Artifact,
    mut chunks: BoxStream<'static, Result<Bytes>>,
    tx: Sender,
    mut shutdown: Shutdown,
) {
    let mut record = Some(artifact);
    loop {
        let next = tokio::select! {
            _ = tx.closed() => return,
            _ = shutdown.wait() => {
                let _ = tx.send(Err(Status::unavailable("coordinator is shutting down, download again"))).await;
                return;
            }
            next = chunks.next() => next,
        };
        let (message, last) = match next {
            Some(Ok(data)) => (
                Ok(v1::ArtifactChunk {
                    artifact: record.take(),
                    data: data.to_vec(),
                }),
                false,
            ),
            Some(Err(e)) => (Err(Status::from(e)), true),
            None => match record.take() {
                Some(artifact) => (
                    Ok(v1::ArtifactChunk {
                        artifact: Some(artifact),
                        data: Vec::new(),
                    }),
                    true,
                ),
                None => return,
            },
        };
        if tx.send(message).await.is_err() || last {
            return;
        }
    }
}
