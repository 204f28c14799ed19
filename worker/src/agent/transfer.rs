//! Artifacts over gRPC: uploading a file the run produced (a header, then chunks of at most
//! [`UPLOAD_CHUNK_BYTES`]) and downloading one (a transfer's source checkpoint, a training state
//! to resume from), its bytes checked against the record's size and SHA-256.
//!
//! Must not retry or decide what a failure means for the job: callers (the outbox, the agent's
//! input fetching) do.

use proto::v1::upload_artifact_chunk::Part;
use proto::v1::{
    Artifact, DownloadArtifactRequest, JobLease, UploadArtifactChunk, UploadArtifactHeader,
};
use sha2::{Digest, Sha256};

use super::coordinator::Client;
use crate::checkpoint;
use crate::train::ArtifactFile;

/// Largest data chunk of an artifact upload (the coordinator accepts 4 MiB).
pub const UPLOAD_CHUNK_BYTES: usize = 1 << 20;

/// Uploads one artifact: a header (lease, kind, name, epoch, size, lowercase hex SHA-256), then
/// the bytes in chunks of at most [`UPLOAD_CHUNK_BYTES`].
pub async fn upload_artifact(
    client: &mut Client,
    lease: &JobLease,
    file: &ArtifactFile,
) -> Result<proto::v1::Artifact, tonic::Status> {
    let header = UploadArtifactHeader {
        lease: Some(lease.clone()),
        kind: file.kind.clone(),
        name: file.name.clone(),
        epoch: file.epoch,
        size_bytes: file.bytes.len() as u64,
        sha256: hex::encode(Sha256::digest(&file.bytes)),
        step: file.step,
    };
    let mut chunks = Vec::with_capacity(1 + file.bytes.len().div_ceil(UPLOAD_CHUNK_BYTES));
    chunks.push(UploadArtifactChunk {
        part: Some(Part::Header(header)),
    });
    chunks.extend(
        file.bytes
            .chunks(UPLOAD_CHUNK_BYTES)
            .map(|data| UploadArtifactChunk {
                part: Some(Part::Data(data.to_vec())),
            }),
    );
    Ok(client
        .upload_artifact(tokio_stream::iter(chunks))
        .await?
        .into_inner())
}

/// Why a checkpoint download failed.
#[derive(Debug, thiserror::Error)]
pub enum Download {
    #[error("{}", .0.message())]
    Status(#[from] tonic::Status),
    /// What arrived does not match its record (size, SHA-256) or has no record.
    #[error("{0}")]
    Corrupt(String),
}

/// The newest checkpoint of job `source` (the bytes, checked against the size and SHA-256 of the
/// record the first chunk carries).
pub async fn download_checkpoint(client: &mut Client, source: &str) -> Result<Vec<u8>, Download> {
    let request = DownloadArtifactRequest {
        artifact_id: String::new(),
        job_id: source.to_string(),
        kind: checkpoint::KIND.to_string(),
    };
    Ok(download(client, request).await?.1)
}

/// One artifact's record and bytes, the bytes checked against the record's size and SHA-256.
pub async fn download(
    client: &mut Client,
    request: DownloadArtifactRequest,
) -> Result<(Artifact, Vec<u8>), Download> {
    let mut stream = client.download_artifact(request).await?.into_inner();
    let mut record = None;
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await? {
        if record.is_none() {
            record = Some(chunk.artifact.ok_or_else(|| {
                Download::Corrupt("the first chunk carries no artifact record".into())
            })?);
        }
        bytes.extend_from_slice(&chunk.data);
    }
    let record = record.ok_or_else(|| Download::Corrupt("the download was empty".into()))?;
    if record.size_bytes != bytes.len() as u64 {
        return Err(Download::Corrupt(format!(
            "artifact {} should have {} bytes but {} arrived",
            record.id,
            record.size_bytes,
            bytes.len()
        )));
    }
    let digest = hex::encode(Sha256::digest(&bytes));
    if !digest.eq_ignore_ascii_case(&record.sha256) {
        return Err(Download::Corrupt(format!(
            "artifact {} should hash to {} but the bytes hash to {digest}",
            record.id, record.sha256
        )));
    }
    Ok((record, bytes))
}

#[cfg(test)]
mod tests {
    use super::super::fake::{chunks, file, lease, serve, Fake};
    use super::*;
    use tonic::{Code, Status};

    #[tokio::test]
    async fn an_artifact_uploads_as_a_header_then_chunks_of_at_most_one_mebibyte() {
        let fake = Fake::default();
        let mut client = serve(fake.clone()).await;
        let f = file("epoch-003.safetensors", 2 * UPLOAD_CHUNK_BYTES + 1000);
        let stored = upload_artifact(&mut client, &lease(), &f)
            .await
            .expect("uploaded");
        assert_eq!(stored.name, "epoch-003.safetensors");
        let state = fake.state();
        let (header, sizes, bytes) = &state.uploads[0];
        assert_eq!(header.lease, Some(lease()));
        assert_eq!(
            (header.kind.as_str(), header.name.as_str(), header.epoch),
            ("checkpoint", "epoch-003.safetensors", 3)
        );
        assert_eq!(header.size_bytes, f.bytes.len() as u64);
        assert_eq!(header.sha256, hex::encode(Sha256::digest(&f.bytes)));
        assert_eq!(header.sha256, header.sha256.to_lowercase());
        assert_eq!(sizes, &vec![UPLOAD_CHUNK_BYTES, UPLOAD_CHUNK_BYTES, 1000]);
        assert_eq!(bytes, &f.bytes);
    }

    #[tokio::test]
    async fn a_downloaded_checkpoint_is_concatenated_and_checked_against_its_sha256() {
        let fake = Fake::default();
        let bytes = b"ten bytes!".to_vec();
        let good = hex::encode(Sha256::digest(&bytes));
        fake.state().downloads.extend([
            Ok(chunks(&bytes, &good)),
            Ok(chunks(&bytes, &"0".repeat(64))),
            Err(Status::not_found("job has no checkpoint artifact")),
        ]);
        let mut client = serve(fake.clone()).await;
        let source = "0193a5b2-7c4d-7e8f-9a0b-1c2d3e4f5a6b";
        let got = download_checkpoint(&mut client, source).await.expect("ok");
        assert_eq!(got, bytes);
        let err = download_checkpoint(&mut client, source)
            .await
            .expect_err("bad hash");
        assert!(
            matches!(err, Download::Corrupt(ref m) if m.contains("hash")),
            "{err}"
        );
        let err = download_checkpoint(&mut client, source)
            .await
            .expect_err("none");
        assert!(matches!(err, Download::Status(ref s) if s.code() == Code::NotFound));
        assert_eq!(
            fake.state().calls[0],
            format!("download {source} checkpoint")
        );
    }
}
