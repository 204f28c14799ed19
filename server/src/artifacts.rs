//! The artifact store: where the bytes of checkpoints and image grids live, behind the
//! `object_store` crate, in a local directory (`file://`) or an S3-compatible bucket (`s3://`).
//! The only module that touches the blob store.
//!
//! Objects are keyed `jobs/<job_id>/<attempt>/<kind>/<name>` under the URL's path. An upload is
//! first spooled to an anonymous temporary file and hashed as it arrives ([`Spool`]); it is
//! stored only after the caller has checked it against its header, so a bad upload never
//! reaches the store. Files larger than one part go up as multipart uploads, so no artifact is
//! ever held in memory whole. Downloads stream in chunks of at most [`CHUNK_BYTES`].
//!
//! Must not touch Postgres (the `artifacts` table belongs to the store module) and must not
//! decide what is valid (domain does): it stores, fetches and deletes, nothing else.

use std::io::SeekFrom;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::{Bytes, BytesMut};
use futures::stream::{BoxStream, StreamExt as _};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt as _, WriteMultipart};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use uuid::Uuid;

use crate::error::{Error, Result};

/// Largest chunk a download yields.
pub const CHUNK_BYTES: usize = 1024 * 1024;
/// Size of one part of a multipart upload; files up to this size are stored with one `put`.
/// (S3 needs parts of at least 5 MiB, except the last.)
const PART_BYTES: usize = 10 * 1024 * 1024;
/// Parts of one upload in flight at once.
const PART_CONCURRENCY: usize = 4;

/// S3 settings given explicitly, layered over what `AmazonS3Builder::from_env` reads from the
/// standard `AWS_*` variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
/// AWS_REGION, AWS_ALLOW_HTTP, ...). Empty by default: the environment decides. Tests and
/// embedders set it instead of mutating the process-wide environment.
#[derive(Clone, Default)]
pub struct S3Settings {
    /// For example `http://127.0.0.1:9000` (MinIO, moto).
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Allow a plain-HTTP endpoint.
    pub allow_http: Option<bool>,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

/// A blob store with the URL it was opened from. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ArtifactStore {
    store: Arc<dyn ObjectStore>,
    /// `file:///abs/dir` or `s3://bucket/prefix`, without a trailing slash: what recorded URIs
    /// start with.
    base: String,
}

impl ArtifactStore {
    /// Opens `file://DIR` (a relative DIR is resolved against the current directory; the
    /// directory is created) or `s3://BUCKET[/PREFIX]` (configured from the `AWS_*` environment,
    /// then `s3`). Connects to nothing yet.
    pub fn open(url: &str, s3: &S3Settings) -> anyhow::Result<Self> {
        if let Some(dir) = url.strip_prefix("file://") {
            Self::local(dir)
        } else if let Some(rest) = url.strip_prefix("s3://") {
            Self::s3(rest, s3)
        } else {
            anyhow::bail!("the artifact store URL must start with file:// or s3://, got {url:?}")
        }
    }

    fn local(dir: &str) -> anyhow::Result<Self> {
        anyhow::ensure!(!dir.is_empty(), "file:// needs a directory");
        let dir = std::env::current_dir()
            .context("reading the current directory")?
            .join(dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the artifact directory {}", dir.display()))?;
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?;
        let store = LocalFileSystem::new_with_prefix(&dir)
            .with_context(|| format!("opening {}", dir.display()))?;
        Ok(Self {
            store: Arc::new(store),
            base: format!("file://{}", dir.display())
                .trim_end_matches('/')
                .to_owned(),
        })
    }

    fn s3(rest: &str, settings: &S3Settings) -> anyhow::Result<Self> {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let prefix = prefix.trim_matches('/');
        anyhow::ensure!(
            !bucket.is_empty(),
            "s3:// needs a bucket: s3://BUCKET[/PREFIX]"
        );
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(region) = &settings.region {
            builder = builder.with_region(region);
        }
        if let Some(key) = &settings.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &settings.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        if let Some(allow) = settings.allow_http {
            builder = builder.with_allow_http(allow);
        }
        let s3 = builder
            .build()
            .with_context(|| format!("configuring S3 bucket {bucket:?}"))?;
        let (store, base): (Arc<dyn ObjectStore>, String) = if prefix.is_empty() {
            (Arc::new(s3), format!("s3://{bucket}"))
        } else {
            (
                Arc::new(PrefixStore::new(s3, prefix)),
                format!("s3://{bucket}/{prefix}"),
            )
        };
        Ok(Self { store, base })
    }

    /// Where an artifact lives: `jobs/<job_id>/<attempt>/<kind>/<name>`. `kind` and `name` have
    /// been checked by the domain (no `/`, not `.` or `..`).
    pub fn key(job_id: Uuid, attempt: i32, kind: &str, name: &str) -> Path {
        Path::from_iter([
            "jobs",
            &job_id.to_string(),
            &attempt.to_string(),
            kind,
            name,
        ])
    }

    /// The full URI of a key, as recorded in `artifacts.uri`.
    pub fn uri(&self, key: &Path) -> String {
        format!("{}/{key}", self.base)
    }

    /// Stores a spooled upload under `key`, replacing what was there: one `put` for a small
    /// file, else a multipart upload fed part by part from the file (aborted on failure).
    pub async fn store(&self, key: &Path, spool: Spool) -> Result<()> {
        let len = spool.len;
        let mut file = tokio::fs::File::from_std(spool.file);
        file.seek(SeekFrom::Start(0)).await.map_err(spool_error)?;
        if len <= PART_BYTES as u64 {
            let data = read_block(&mut file, len as usize).await?;
            self.store.put(key, data.into()).await?;
            return Ok(());
        }
        let upload = self.store.put_multipart(key).await?;
        let mut write = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        loop {
            let block = match read_block(&mut file, PART_BYTES).await {
                Ok(block) => block,
                Err(e) => {
                    let _ = write.abort().await;
                    return Err(e);
                }
            };
            if block.is_empty() {
                break;
            }
            if let Err(e) = write.wait_for_capacity(PART_CONCURRENCY).await {
                let _ = write.abort().await;
                return Err(e.into());
            }
            write.put(block);
        }
        write.finish().await?;
        Ok(())
    }

    /// The object's bytes as a stream of chunks of [`CHUNK_BYTES`] (the last may be shorter; an
    /// empty object yields nothing). Fails up front when the object is missing.
    pub async fn fetch(&self, key: &Path) -> Result<BoxStream<'static, Result<Bytes>>> {
        let got = self.store.get(key).await?;
        Ok(rechunk(got.into_stream(), CHUNK_BYTES))
    }

    /// Deletes an object; deleting a missing one is fine.
    pub async fn delete(&self, key: &Path) -> Result<()> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

fn spool_error(e: std::io::Error) -> Error {
    Error::Internal(anyhow::Error::new(e).context("artifact spool file"))
}

/// Reads up to `size` bytes (fewer only at the end of the file).
async fn read_block(file: &mut tokio::fs::File, size: usize) -> Result<Bytes> {
    let mut buf = BytesMut::with_capacity(size);
    while buf.len() < size {
        if file.read_buf(&mut buf).await.map_err(spool_error)? == 0 {
            break;
        }
    }
    Ok(buf.freeze())
}

/// Regroups a byte stream into chunks of exactly `size` bytes, the last one shorter. An error
/// ends the stream after it is yielded.
fn rechunk(
    inner: BoxStream<'static, object_store::Result<Bytes>>,
    size: usize,
) -> BoxStream<'static, Result<Bytes>> {
    futures::stream::unfold(
        (inner, BytesMut::new(), false),
        move |(mut inner, mut buf, mut done)| async move {
            loop {
                if buf.len() >= size {
                    let chunk = buf.split_to(size).freeze();
                    return Some((Ok(chunk), (inner, buf, done)));
                }
                if done {
                    if buf.is_empty() {
                        return None;
                    }
                    let chunk = buf.split().freeze();
                    return Some((Ok(chunk), (inner, buf, done)));
                }
                match inner.next().await {
                    Some(Ok(bytes)) => buf.extend_from_slice(&bytes),
                    Some(Err(e)) => return Some((Err(e.into()), (inner, BytesMut::new(), true))),
                    None => done = true,
                }
            }
        },
    )
    .boxed()
}

/// An upload on its way in: written to an anonymous temporary file (deleted when dropped) and
/// hashed as it arrives, off the async runtime.
#[derive(Debug)]
pub struct Spool {
    file: std::fs::File,
    hasher: Sha256,
    len: u64,
}

impl Spool {
    /// A new, empty spool in the system's temporary directory.
    pub async fn new() -> Result<Self> {
        let file = tokio::task::spawn_blocking(tempfile::tempfile)
            .await
            .map_err(|e| Error::Internal(e.into()))?
            .map_err(spool_error)?;
        Ok(Self {
            file,
            hasher: Sha256::new(),
            len: 0,
        })
    }

    /// Appends one chunk.
    pub async fn append(self, data: Bytes) -> Result<Self> {
        tokio::task::spawn_blocking(move || {
            use std::io::Write as _;
            let Spool {
                mut file,
                mut hasher,
                len,
            } = self;
            file.write_all(&data)?;
            hasher.update(&data);
            Ok(Spool {
                file,
                hasher,
                len: len + data.len() as u64,
            })
        })
        .await
        .map_err(|e| Error::Internal(e.into()))?
        .map_err(spool_error)
    }

    /// Bytes so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Lowercase hex SHA-256 of the bytes so far.
    pub fn sha256(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local_store() -> (tempfile::TempDir, ArtifactStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("file://{}", dir.path().join("nested/store").display());
        let store = ArtifactStore::open(&url, &S3Settings::default()).expect("open");
        (dir, store)
    }

    async fn spool(data: &[u8]) -> Spool {
        let mut spool = Spool::new().await.expect("spool");
        for part in data.chunks(777) {
            spool = spool
                .append(Bytes::copy_from_slice(part))
                .await
                .expect("append");
        }
        spool
    }

    async fn fetch_all(store: &ArtifactStore, key: &Path) -> Vec<Bytes> {
        let mut chunks = Vec::new();
        let mut stream = store.fetch(key).await.expect("fetch");
        while let Some(chunk) = stream.next().await {
            chunks.push(chunk.expect("chunk"));
        }
        chunks
    }

    #[tokio::test]
    async fn a_spool_hashes_what_was_appended() {
        let s = spool(b"abc").await;
        assert_eq!(s.len(), 3);
        assert_eq!(
            s.sha256(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[tokio::test]
    async fn a_large_object_goes_up_in_parts_and_comes_back_in_one_mib_chunks() {
        let (_dir, store) = local_store();
        let data: Vec<u8> = (0..(PART_BYTES * 2 + 12_345))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let key = ArtifactStore::key(Uuid::nil(), 2, "checkpoint", "epoch-001.safetensors");
        assert_eq!(
            key.as_ref(),
            "jobs/00000000-0000-0000-0000-000000000000/2/checkpoint/epoch-001.safetensors"
        );
        store.store(&key, spool(&data).await).await.expect("store");
        let chunks = fetch_all(&store, &key).await;
        assert!(chunks.iter().all(|c| c.len() <= CHUNK_BYTES));
        assert!(chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c.len() == CHUNK_BYTES));
        assert_eq!(chunks.concat(), data);
        assert!(store.uri(&key).starts_with("file:///"));
        assert!(store.uri(&key).ends_with("/nested/store/jobs/00000000-0000-0000-0000-000000000000/2/checkpoint/epoch-001.safetensors"));
    }

    #[tokio::test]
    async fn a_small_object_replaces_the_old_one_and_deleted_objects_are_not_found() {
        let (_dir, store) = local_store();
        let key = ArtifactStore::key(Uuid::nil(), 1, "samples", "grid.png");
        store
            .store(&key, spool(b"first").await)
            .await
            .expect("store");
        store
            .store(&key, spool(b"second").await)
            .await
            .expect("store");
        assert_eq!(fetch_all(&store, &key).await.concat(), b"second");
        let empty = ArtifactStore::key(Uuid::nil(), 1, "samples", "empty.png");
        store.store(&empty, spool(b"").await).await.expect("store");
        assert!(fetch_all(&store, &empty).await.is_empty());
        store.delete(&key).await.expect("delete");
        store.delete(&key).await.expect("deleting twice is fine");
        assert!(matches!(
            store.fetch(&key).await.map(drop),
            Err(Error::ArtifactStore(object_store::Error::NotFound { .. }))
        ));
    }

    #[test]
    fn only_file_and_s3_urls_open_and_s3_urls_need_a_bucket() {
        assert!(ArtifactStore::open("http://x", &S3Settings::default()).is_err());
        assert!(ArtifactStore::open("s3://", &S3Settings::default()).is_err());
        let s3 = S3Settings {
            region: Some("us-east-1".into()),
            ..Default::default()
        };
        let store = ArtifactStore::open("s3://bucket/some/prefix/", &s3).expect("s3");
        let key = ArtifactStore::key(Uuid::nil(), 1, "k", "n");
        assert_eq!(
            store.uri(&key),
            "s3://bucket/some/prefix/jobs/00000000-0000-0000-0000-000000000000/1/k/n"
        );
        let secret = S3Settings {
            secret_access_key: Some("hunter2".into()),
            ..Default::default()
        };
        assert!(!format!("{secret:?}").contains("hunter2"));
    }
}
