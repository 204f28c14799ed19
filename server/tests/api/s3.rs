//! Artifacts in an S3 store: the round trip of `artifacts.rs` against a real moto server, with
//! the objects checked in the bucket by a client of the test's own.
//!
//! Must not leave moto running: it is killed when the test ends.

use std::time::Duration;

use tests::redis_url;

use crate::artifacts::{files_under, round_trip_artifacts};
use crate::helpers::TestServer;

/// A moto S3 server on a free port of 127.0.0.1, killed on drop.
struct Moto {
    port: u16,
    child: std::process::Child,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One plain HTTP/1.1 request to moto; returns the status line and headers.
async fn http(port: u16, method: &str, path: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    conn.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    conn.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response);
    Ok(text.split("\r\n\r\n").next().unwrap_or_default().to_owned())
}

impl Moto {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = std::process::Command::new(tests::moto_server())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("moto_server starts");
        let moto = Moto { port, child };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while http(port, "GET", "/").await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "moto_server did not start listening"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        moto
    }

    async fn create_bucket(&self, bucket: &str) {
        let head = http(self.port, "PUT", &format!("/{bucket}"))
            .await
            .expect("PUT bucket");
        assert!(
            head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
            "{head}"
        );
    }
}

#[tokio::test]
async fn artifacts_round_trip_through_a_real_s3_server() {
    let moto = Moto::start().await;
    moto.create_bucket("trainq-artifacts").await;
    let settings = server::artifacts::S3Settings {
        endpoint: Some(format!("http://127.0.0.1:{}", moto.port)),
        region: Some("us-east-1".into()),
        access_key_id: Some("testing".into()),
        secret_access_key: Some("testing".into()),
        allow_http: Some(true),
    };
    let server = TestServer::start_configured(
        &redis_url(),
        &["--artifacts", "s3://trainq-artifacts/runs/ci"],
        |config| config.s3 = settings,
    )
    .await;
    let stored = round_trip_artifacts(&server).await;
    // Look in the bucket directly, with a client of our own.
    use object_store::ObjectStoreExt as _;
    let bucket = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(format!("http://127.0.0.1:{}", moto.port))
        .with_region("us-east-1")
        .with_bucket_name("trainq-artifacts")
        .with_access_key_id("testing")
        .with_secret_access_key("testing")
        .with_allow_http(true)
        .build()
        .expect("s3 client");
    for artifact in &stored {
        let key = artifact
            .uri
            .strip_prefix("s3://trainq-artifacts/")
            .expect("an s3 uri in the bucket");
        assert!(key.starts_with("runs/ci/jobs/"), "{key}");
        let meta = bucket
            .head(&object_store::path::Path::from(key))
            .await
            .expect("the object is in the bucket");
        assert_eq!(meta.size, artifact.size_bytes, "{key}");
    }
    assert!(
        files_under(server.artifacts.path()).is_empty(),
        "nothing went to local files"
    );
    server.stop().await;
}
