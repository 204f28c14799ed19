//! Downloads missing data files from a list of mirrors (blocking HTTP with ureq).
//!
//! Each file is streamed into a temporary file in the destination folder, verified by the caller's
//! check, and only then renamed into place (atomic on one file system), so a loader never sees a
//! partial or corrupt download and two workers downloading at once do no harm.
//!
//! Runs on the training thread: must never be called from async code. Must not leave temporary
//! files behind, and must not replace a file that is already in place.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::DataError;

/// Largest download accepted (CIFAR-100's archive is 169 MB).
const MAX_DOWNLOAD_BYTES: u64 = 512 << 20;

/// A check a downloaded file must pass before it is put in place.
pub type Verify<'a> = Box<dyn Fn(&Path) -> Result<(), DataError> + 'a>;

/// One file to fetch: its name (appended to each mirror's base URL, and its name on disk) and the
/// check it must pass before it is put in place.
pub struct FileSpec<'a> {
    pub name: &'a str,
    pub verify: Verify<'a>,
}

/// `base` + `name`, with exactly one `/` between them.
pub fn join_url(base: &str, name: &str) -> String {
    format!("{}/{}", base.trim_end_matches('/'), name)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .timeout_global(Some(Duration::from_secs(30 * 60)))
        .build()
        .into()
}

/// Fetches every file of `files` into `dir` (created if needed), trying `mirrors` in order for
/// each. On failure, the error lists exactly the files still missing and the folder to put them.
pub fn fetch_missing(
    dataset: &'static str,
    dir: &Path,
    files: &[FileSpec<'_>],
    mirrors: &[String],
) -> Result<(), DataError> {
    let mut still_missing = Vec::new();
    let mut attempts = Vec::new();
    if mirrors.is_empty() {
        attempts.push("no download mirrors configured".to_string());
        still_missing.extend(files.iter().map(|f| f.name.to_string()));
    } else {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        let agent = agent();
        for file in files {
            let mut fetched = false;
            for base in mirrors {
                let url = join_url(base, file.name);
                tracing::info!(%url, dir = %dir.display(), "downloading {dataset} file");
                match fetch_one(&agent, &url, dir, file) {
                    Ok(()) => {
                        fetched = true;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(%url, error = %e, "download failed");
                        attempts.push(e.to_string());
                    }
                }
            }
            if !fetched {
                still_missing.push(file.name.to_string());
            }
        }
    }
    if still_missing.is_empty() {
        Ok(())
    } else {
        Err(DataError::Missing {
            dataset,
            dir: dir.to_path_buf(),
            files: still_missing,
            attempts: attempts.join("; "),
        })
    }
}

/// A temporary file that is removed when dropped unless it was renamed into place.
pub(crate) struct TempFile {
    pub(crate) path: PathBuf,
    pub(crate) keep: bool,
}

impl TempFile {
    /// A fresh hidden name for `name` in `dir` (`.<name>.<pid>.<nanos>.part`), unique per process
    /// and call, so concurrent writers never share one. Nothing is created yet.
    pub(crate) fn new_in(dir: &Path, name: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        TempFile {
            path: dir.join(format!(".{name}.{}.{nanos}.{n}.part", std::process::id())),
            keep: false,
        }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn fetch_one(
    agent: &ureq::Agent,
    url: &str,
    dir: &Path,
    file: &FileSpec<'_>,
) -> Result<(), DataError> {
    let dest = dir.join(file.name);
    let mut tmp = TempFile::new_in(dir, file.name);
    let net = |e: ureq::Error| DataError::Io {
        path: PathBuf::from(url),
        source: e.into_io(),
    };
    let response = agent.get(url).call().map_err(net)?;
    let mut reader = response
        .into_body()
        .into_with_config()
        .limit(MAX_DOWNLOAD_BYTES)
        .reader();
    {
        let mut out = std::fs::File::create(&tmp.path).map_err(|e| DataError::io(&tmp.path, e))?;
        std::io::copy(&mut reader, &mut out).map_err(|e| DataError::Io {
            path: PathBuf::from(url),
            source: e,
        })?;
        out.flush().map_err(|e| DataError::io(&tmp.path, e))?;
        out.sync_all().map_err(|e| DataError::io(&tmp.path, e))?;
    }
    (file.verify)(&tmp.path).map_err(|e| match e {
        // Name the URL, not the temporary file.
        DataError::Corrupt { reason, .. } => DataError::Corrupt {
            path: PathBuf::from(url),
            reason,
        },
        other => other,
    })?;
    if dest.exists() {
        // Someone else (another worker) put it there meanwhile; theirs was verified too.
        return Ok(());
    }
    std::fs::rename(&tmp.path, &dest).map_err(|e| DataError::io(&dest, e))?;
    tmp.keep = true;
    tracing::info!(path = %dest.display(), "downloaded and verified");
    Ok(())
}

/// A tiny loopback HTTP server for download tests (MNIST's here, CIFAR-100's in `cifar`).
#[cfg(test)]
pub(crate) mod test_server {
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    /// A tiny HTTP/1.1 file server on 127.0.0.1:0 serving `files` under the URL path `prefix`
    /// (e.g. `/mnist/`); 404 otherwise. Runs until the test process ends. Returns its base URL.
    pub(crate) fn serve(prefix: &'static str, files: HashMap<String, Vec<u8>>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let base = format!("http://{}{prefix}", listener.local_addr().expect("addr"));
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                loop {
                    let mut line = String::new();
                    match reader.read_line(&mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) if line == "\r\n" || line == "\n" => break,
                        Ok(_) => {}
                    }
                }
                let path = request_line
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("")
                    .to_string();
                let name = path.strip_prefix(prefix).unwrap_or("");
                let (status, body) = match files.get(name) {
                    Some(b) => ("200 OK", b.clone()),
                    None => ("404 Not Found", b"not found".to_vec()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
                let _ = stream.flush();
            }
        });
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::mnist::{self, read_decompressed, FILES, TEST_LABELS};
    use crate::data::test_data_dir;
    use std::collections::HashMap;
    use std::net::TcpListener;

    fn serve(files: HashMap<String, Vec<u8>>) -> String {
        test_server::serve("/mnist/", files)
    }

    /// A temp data dir holding every MNIST file but t10k-labels.
    fn dir_missing_test_labels() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().expect("tempdir");
        let src = test_data_dir().join(mnist::DIR_NAME);
        for f in FILES.iter().filter(|f| f.name != TEST_LABELS.name) {
            std::fs::copy(src.join(f.name), tmp.path().join(f.name)).expect("copy");
        }
        tmp
    }

    fn shared_test_labels_gz() -> Vec<u8> {
        std::fs::read(test_data_dir().join(mnist::DIR_NAME).join(TEST_LABELS.name)).expect("read")
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_missing_file_is_downloaded_from_the_first_mirror_that_has_it() {
        let dir = dir_missing_test_labels();
        let empty = serve(HashMap::new());
        let good = serve(HashMap::from([(
            TEST_LABELS.name.to_string(),
            shared_test_labels_gz(),
        )]));
        mnist::ensure(dir.path(), &[empty, good]).expect("download from the second mirror");
        let path = dir.path().join(TEST_LABELS.name);
        mnist::read_verified(&TEST_LABELS, &path).expect("downloaded file verifies");
        assert_eq!(
            entries(dir.path()).len(),
            4,
            "no temp files left: {:?}",
            entries(dir.path())
        );
        mnist::MnistHost::load_dir(dir.path()).expect("whole set loads");
    }

    #[test]
    fn a_published_style_gzip_of_the_same_content_is_accepted() {
        // Different compression, same decompressed bytes: still valid.
        let dir = dir_missing_test_labels();
        let raw = read_decompressed(&test_data_dir().join(mnist::DIR_NAME).join(TEST_LABELS.name))
            .expect("raw");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&raw).expect("gz");
        let gz = enc.finish().expect("gz");
        let base = serve(HashMap::from([(TEST_LABELS.name.to_string(), gz)]));
        mnist::ensure(dir.path(), &[base]).expect("download");
    }

    #[test]
    fn a_corrupt_download_is_a_checksum_error_and_leaves_no_file() {
        let dir = dir_missing_test_labels();
        let mut raw =
            read_decompressed(&test_data_dir().join(mnist::DIR_NAME).join(TEST_LABELS.name))
                .expect("raw");
        raw[500] = (raw[500] + 1) % 10;
        let base = serve(HashMap::from([(TEST_LABELS.name.to_string(), raw)]));
        let before = entries(dir.path());
        let err = mnist::ensure(dir.path(), &[base]).expect_err("corrupt download must fail");
        let msg = err.to_string();
        assert!(msg.contains("sha256"), "{msg}");
        assert!(msg.contains(TEST_LABELS.name), "{msg}");
        assert_eq!(
            entries(dir.path()),
            before,
            "nothing new left in the folder"
        );
    }

    #[test]
    fn without_a_server_the_error_names_the_files_to_place_and_the_folder() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("mnist");
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        }; // closed again: connections are refused
        let err = mnist::ensure(&dir, &[format!("http://127.0.0.1:{port}/mnist/")])
            .expect_err("no server");
        let msg = err.to_string();
        for f in FILES {
            assert!(msg.contains(f.name), "{msg}");
        }
        assert!(msg.contains("place train-images-idx3-ubyte.gz"), "{msg}");
        assert!(msg.contains(&dir.display().to_string()), "{msg}");
        assert!(matches!(err, DataError::Missing { ref files, .. } if files.len() == 4));
        assert!(
            entries(&dir).is_empty(),
            "no partial files: {:?}",
            entries(&dir)
        );
    }

    #[test]
    fn urls_join_with_one_slash() {
        assert_eq!(join_url("http://h/m/", "f.gz"), "http://h/m/f.gz");
        assert_eq!(join_url("http://h/m", "f.gz"), "http://h/m/f.gz");
    }
}
