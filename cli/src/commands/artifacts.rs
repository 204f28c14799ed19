//! `trainq artifacts list` and `trainq artifacts download`, and the one download of an
//! artifact stream to a file (also `trainq report`'s, for sample grids), which checks the size
//! and SHA-256 the coordinator recorded.
//!
//! Must not keep a file whose size or digest does not match: a mismatch removes it.

use std::io::Write;
use std::path::{Path, PathBuf};

use proto::v1;
use sha2::Digest;
use tokio_stream::StreamExt;

use crate::args::ArtifactsCommand;
use crate::client::{exit, CliError, Client};
use crate::output::{self, print, render, Output};

/// `trainq artifacts ...`.
pub async fn run(c: &Client, cmd: ArtifactsCommand, out: Output) -> Result<u8, CliError> {
    match cmd {
        ArtifactsCommand::List { job, kind } => {
            let list = c
                .clone()
                .list_artifacts(v1::ListArtifactsRequest {
                    job_id: job.clone(),
                    kind: kind.unwrap_or_default(),
                })
                .await
                .map_err(|s| CliError::from_status(&format!("artifacts {job}"), &s))?
                .into_inner()
                .artifacts;
            print(&render(out, &list, || output::artifacts_table(&list)));
            Ok(exit::OK)
        }
        ArtifactsCommand::Download {
            id,
            kind,
            out: dest,
        } => {
            let req = match kind {
                Some(kind) => v1::DownloadArtifactRequest {
                    job_id: id.clone(),
                    kind,
                    ..Default::default()
                },
                None => v1::DownloadArtifactRequest {
                    artifact_id: id.clone(),
                    ..Default::default()
                },
            };
            let what = format!("download {id}");
            let artifact = download(c, req, dest.as_deref(), &what).await?;
            if out == Output::Json {
                print(&output::json(&artifact.0));
            } else {
                eprintln!(
                    "saved {} ({} bytes, sha256 {} checked)",
                    artifact.1.display(),
                    artifact.0.size_bytes,
                    artifact.0.sha256
                );
                print(&format!("{}\n", artifact.1.display()));
            }
            Ok(exit::OK)
        }
    }
}

/// Streams an artifact to a file and checks its size and SHA-256; a mismatch removes the file.
pub async fn download(
    c: &Client,
    req: v1::DownloadArtifactRequest,
    dest: Option<&Path>,
    what: &str,
) -> Result<(v1::Artifact, PathBuf), CliError> {
    let io = |path: &Path, e: std::io::Error| {
        CliError::usage(format!("{what}: writing {}: {e}", path.display()))
    };
    let mut stream = c
        .clone()
        .download_artifact(req)
        .await
        .map_err(|s| CliError::from_status(what, &s))?
        .into_inner();
    let mut artifact: Option<v1::Artifact> = None;
    let mut file: Option<(PathBuf, std::fs::File)> = None;
    let mut hasher = sha2::Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|s| CliError::from_status(what, &s))?;
        if let Some(a) = chunk.artifact {
            let path = match dest {
                Some(d) if d.is_dir() => d.join(&a.name),
                Some(d) => d.to_path_buf(),
                None => PathBuf::from(&a.name),
            };
            let f = std::fs::File::create(&path).map_err(|e| io(&path, e))?;
            file = Some((path, f));
            artifact = Some(a);
        }
        let Some((path, f)) = file.as_mut() else {
            return Err(CliError::new(
                exit::SERVER,
                format!("{what}: data before the artifact record"),
            ));
        };
        f.write_all(&chunk.data).map_err(|e| io(path, e))?;
        hasher.update(&chunk.data);
        size += chunk.data.len() as u64;
    }
    let (Some(artifact), Some((path, f))) = (artifact, file) else {
        return Err(CliError::new(
            exit::SERVER,
            format!("{what}: the stream was empty"),
        ));
    };
    drop(f);
    let sha = hex::encode(hasher.finalize());
    if size != artifact.size_bytes || sha != artifact.sha256 {
        let _ = std::fs::remove_file(&path);
        return Err(CliError::new(
            exit::SERVER,
            format!(
                "{what}: got {size} bytes with sha256 {sha}, expected {} bytes with {}",
                artifact.size_bytes, artifact.sha256
            ),
        ));
    }
    Ok((artifact, path))
}
