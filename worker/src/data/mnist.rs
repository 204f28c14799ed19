//! MNIST in its original IDX format: the four files, their checksums, the IDX parser, and the
//! conversion to tensors (`f32 [N,1,28,28]` scaled to `[0,1]` like torchvision's `ToTensor`,
//! labels `i64 [N]`).
//!
//! A file may be stored raw or gzip-compressed (detected by its magic bytes); integrity is the
//! sha256 of the DECOMPRESSED content, so the published `.gz` files and re-compressed copies both
//! pass. Must not panic or return garbage on a bad file: every check failure is a
//! [`DataError`] naming the file.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use super::{download, DataError};

/// Folder of MNIST inside the data dir.
pub const DIR_NAME: &str = "mnist";

/// Side of an MNIST image in pixels.
pub const SIDE: usize = 28;

/// Largest decompressed file we accept (train images are 47 MB); guards against gzip bombs.
const MAX_DECOMPRESSED: u64 = 256 << 20;

/// What a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// `[N, 28, 28]` u8 pixels (IDX magic 0x00000803).
    Images,
    /// `[N]` u8 labels 0..=9 (IDX magic 0x00000801).
    Labels,
}

/// One of the four MNIST files.
#[derive(Debug, Clone, Copy)]
pub struct MnistFile {
    /// The name mirrors serve it under (gzip). The raw file may be stored without `.gz`.
    pub name: &'static str,
    /// sha256 of the decompressed content (the files as published).
    pub sha256: &'static str,
    pub records: usize,
    pub content: Content,
}

impl MnistFile {
    /// The name of the raw (decompressed) form: `name` without `.gz`.
    pub fn raw_name(&self) -> &'static str {
        self.name.strip_suffix(".gz").unwrap_or(self.name)
    }

    /// The stored copy in `dir`, gzip first, then raw; `None` when neither exists.
    pub fn find_in(&self, dir: &Path) -> Option<PathBuf> {
        [self.name, self.raw_name()]
            .into_iter()
            .map(|n| dir.join(n))
            .find(|p| p.is_file())
    }
}

pub const TRAIN_IMAGES: MnistFile = MnistFile {
    name: "train-images-idx3-ubyte.gz",
    sha256: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    records: 60_000,
    content: Content::Images,
};
pub const TRAIN_LABELS: MnistFile = MnistFile {
    name: "train-labels-idx1-ubyte.gz",
    sha256: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    records: 60_000,
    content: Content::Labels,
};
pub const TEST_IMAGES: MnistFile = MnistFile {
    name: "t10k-images-idx3-ubyte.gz",
    sha256: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    records: 10_000,
    content: Content::Images,
};
pub const TEST_LABELS: MnistFile = MnistFile {
    name: "t10k-labels-idx1-ubyte.gz",
    sha256: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    records: 10_000,
    content: Content::Labels,
};

/// The four files, in the order they are checked and downloaded.
pub const FILES: [MnistFile; 4] = [TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS];

/// Reads a file and, if it starts with the gzip magic, decompresses it.
pub fn read_decompressed(path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(bytes.len() * 5);
        flate2::read::MultiGzDecoder::new(bytes.as_slice())
            .take(MAX_DECOMPRESSED + 1)
            .read_to_end(&mut out)
            .map_err(|e| DataError::corrupt(path, format!("not a valid gzip file: {e}")))?;
        if out.len() as u64 > MAX_DECOMPRESSED {
            return Err(DataError::corrupt(
                path,
                format!("decompresses to more than {MAX_DECOMPRESSED} bytes"),
            ));
        }
        Ok(out)
    } else {
        Ok(bytes)
    }
}

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A parsed IDX header over a borrowed buffer of unsigned bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idx<'a> {
    pub dims: Vec<usize>,
    pub data: &'a [u8],
}

/// Parses an IDX file of unsigned bytes (type code 0x08): checks the magic, the number of
/// dimensions and that the data is exactly as long as the dimensions say. `path` is for messages.
pub fn parse_idx<'a>(bytes: &'a [u8], path: &Path) -> Result<Idx<'a>, DataError> {
    if bytes.len() < 4 {
        return Err(DataError::corrupt(
            path,
            format!(
                "truncated: {} bytes is too short for an IDX header",
                bytes.len()
            ),
        ));
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 || !(1..=4).contains(&bytes[3]) {
        return Err(DataError::corrupt(
            path,
            format!("bad magic 0x{magic:08x}: not an IDX file of unsigned bytes"),
        ));
    }
    let ndims = bytes[3] as usize;
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(DataError::corrupt(
            path,
            format!(
                "truncated: {} bytes is too short for an IDX header of {ndims} dimensions",
                bytes.len()
            ),
        ));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let expected = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    let data = &bytes[header..];
    match expected {
        Some(n) if n == data.len() => Ok(Idx { dims, data }),
        Some(n) if n > data.len() => Err(DataError::corrupt(
            path,
            format!(
                "truncated: dimensions {dims:?} need {n} data bytes, the file has {}",
                data.len()
            ),
        )),
        Some(n) => Err(DataError::corrupt(
            path,
            format!(
                "{} unexpected bytes after the {n} data bytes of dimensions {dims:?}",
                data.len() - n
            ),
        )),
        None => Err(DataError::corrupt(
            path,
            format!("dimensions {dims:?} overflow"),
        )),
    }
}

/// Checks that `decompressed` (the content of `path`) is the MNIST file `file`.
fn check_content(file: &MnistFile, decompressed: &[u8], path: &Path) -> Result<(), DataError> {
    let idx = parse_idx(decompressed, path)?;
    let want: Vec<usize> = match file.content {
        Content::Images => vec![file.records, SIDE, SIDE],
        Content::Labels => vec![file.records],
    };
    if idx.dims != want {
        return Err(DataError::corrupt(
            path,
            format!(
                "dimensions are {:?}, expected {want:?} for {}",
                idx.dims, file.name
            ),
        ));
    }
    let sum = sha256_hex(decompressed);
    if sum != file.sha256 {
        return Err(DataError::corrupt(
            path,
            format!(
                "sha256 of the decompressed content is {sum}, expected {} (a corrupt or wrong file)",
                file.sha256
            ),
        ));
    }
    Ok(())
}

/// Reads, decompresses and verifies the MNIST file `file` stored at `path`; returns the
/// decompressed content.
pub fn read_verified(file: &MnistFile, path: &Path) -> Result<Vec<u8>, DataError> {
    let bytes = read_decompressed(path)?;
    check_content(file, &bytes, path)?;
    Ok(bytes)
}

/// Makes sure all four files are in `dir`, downloading missing ones from `mirrors` (base URLs,
/// tried in order). Files already present are not checked here (loading checks them).
pub fn ensure(dir: &Path, mirrors: &[String]) -> Result<(), DataError> {
    let missing: Vec<MnistFile> = FILES
        .into_iter()
        .filter(|f| f.find_in(dir).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let specs: Vec<download::FileSpec<'_>> = missing
        .iter()
        .map(|f| download::FileSpec {
            name: f.name,
            verify: Box::new(move |p: &Path| read_verified(f, p).map(|_| ())),
        })
        .collect();
    download::fetch_missing("mnist", dir, &specs, mirrors)
}

/// The four MNIST files decoded on the host, verified.
pub struct MnistHost {
    /// `n_train * 784` pixels, row-major.
    pub train_images: Vec<u8>,
    pub train_labels: Vec<u8>,
    pub test_images: Vec<u8>,
    pub test_labels: Vec<u8>,
}

impl MnistHost {
    /// Reads and verifies the four files from `dir` (each raw or `.gz`).
    pub fn load_dir(dir: &Path) -> Result<Self, DataError> {
        let mut parts = Vec::with_capacity(4);
        for file in FILES {
            let path = file.find_in(dir).ok_or_else(|| DataError::Missing {
                dataset: "mnist",
                dir: dir.to_path_buf(),
                files: vec![file.name.to_string()],
                attempts: "the file was gone when loading".into(),
            })?;
            let bytes = read_verified(&file, &path)?;
            let header = if file.content == Content::Images {
                16
            } else {
                8
            };
            let mut data = bytes;
            data.drain(..header);
            if file.content == Content::Labels {
                if let Some(bad) = data.iter().find(|&&l| l > 9) {
                    return Err(DataError::corrupt(
                        &path,
                        format!("label {bad} is not a digit"),
                    ));
                }
            }
            parts.push(data);
        }
        let mut parts = parts.into_iter();
        let mut next = || parts.next().unwrap_or_default();
        Ok(Self {
            train_images: next(),
            train_labels: next(),
            test_images: next(),
            test_labels: next(),
        })
    }

    /// Copies the set to `device` as ready tensors (pixels are sent as u8 and scaled on the
    /// device, a quarter of the bytes of f32).
    pub fn to_device(&self, device: Device) -> Result<MnistTensors, DataError> {
        let err = |source| DataError::Tensor {
            what: "mnist",
            device,
            source,
        };
        let images = |px: &[u8]| -> Result<Tensor, tch::TchError> {
            let n = (px.len() / (SIDE * SIDE)) as i64;
            Tensor::f_from_slice(px)?
                .f_view([n, 1, SIDE as i64, SIDE as i64])?
                .f_to_device(device)?
                .f_to_kind(Kind::Float)?
                .f_div_scalar(255.0)
        };
        let labels = |l: &[u8]| -> Result<Tensor, tch::TchError> {
            Tensor::f_from_slice(l)?
                .f_to_device(device)?
                .f_to_kind(Kind::Int64)
        };
        Ok(MnistTensors {
            train_images: images(&self.train_images).map_err(err)?,
            train_labels: labels(&self.train_labels).map_err(err)?,
            test_images: images(&self.test_images).map_err(err)?,
            test_labels: labels(&self.test_labels).map_err(err)?,
        })
    }
}

/// MNIST on one device: images `f32 [N,1,28,28]` in `[0,1]`, labels `i64 [N]`.
pub type MnistTensors = super::ImageSplits;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_data_dir;
    use std::io::Write;

    fn mnist_dir() -> PathBuf {
        test_data_dir().join(DIR_NAME)
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).expect("gzip in memory");
        enc.finish().expect("gzip in memory")
    }

    #[test]
    fn the_shared_mnist_files_parse_and_verify_into_tensors() {
        let host = MnistHost::load_dir(&mnist_dir()).expect("shared mnist loads");
        assert_eq!(host.train_images.len(), 60_000 * 784);
        assert_eq!(host.test_labels.len(), 10_000);
        let mut counts = [0usize; 10];
        for &l in &host.train_labels {
            counts[l as usize] += 1;
        }
        assert_eq!(
            counts,
            [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
        );

        let t = host.to_device(Device::Cpu).expect("to cpu");
        assert_eq!(t.train_images.size(), [60_000, 1, 28, 28]);
        assert_eq!(t.train_images.kind(), Kind::Float);
        assert_eq!(t.train_labels.size(), [60_000]);
        assert_eq!(t.train_labels.kind(), Kind::Int64);
        assert_eq!(t.test_images.size(), [10_000, 1, 28, 28]);
        let max = f64::try_from(t.train_images.max()).expect("scalar");
        let min = f64::try_from(t.train_images.min()).expect("scalar");
        assert_eq!((min, max), (0.0, 1.0), "pixels scaled to [0,1]");
        // Like ToTensor: byte 255 -> 1.0, byte b -> b/255.
        let first_px = host
            .train_images
            .iter()
            .position(|&b| b > 0)
            .expect("a lit pixel");
        let flat = t.train_images.view([-1]);
        let v = f64::try_from(flat.get(first_px as i64)).expect("scalar");
        assert!((v - host.train_images[first_px] as f64 / 255.0).abs() < 1e-6);
    }

    #[test]
    fn raw_files_are_accepted_as_well_as_gzip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = TEST_LABELS
            .find_in(&mnist_dir())
            .expect("shared t10k labels");
        let raw = read_decompressed(&src).expect("read");
        let path = dir.path().join(TEST_LABELS.raw_name());
        std::fs::write(&path, &raw).expect("write");
        assert_eq!(TEST_LABELS.find_in(dir.path()), Some(path.clone()));
        let back = read_verified(&TEST_LABELS, &path).expect("raw file verifies");
        assert_eq!(back, raw);
    }

    #[test]
    fn a_truncated_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = TEST_IMAGES
            .find_in(&mnist_dir())
            .expect("shared t10k images");
        let raw = read_decompressed(&src).expect("read");

        // Raw, cut in the middle of the pixels.
        let path = dir.path().join(TEST_IMAGES.raw_name());
        std::fs::write(&path, &raw[..100_000]).expect("write");
        let err = read_verified(&TEST_IMAGES, &path)
            .expect_err("truncated raw")
            .to_string();
        assert!(
            err.contains("t10k-images-idx3-ubyte") && err.contains("truncated"),
            "{err}"
        );

        // Shorter than a header.
        std::fs::write(&path, &raw[..6]).expect("write");
        let err = read_verified(&TEST_IMAGES, &path)
            .expect_err("tiny")
            .to_string();
        assert!(
            err.contains("t10k-images-idx3-ubyte") && err.contains("truncated"),
            "{err}"
        );

        // Gzip stream cut short.
        let gz = std::fs::read(&src).expect("read gz");
        let path = dir.path().join(TEST_IMAGES.name);
        std::fs::write(&path, &gz[..gz.len() / 2]).expect("write");
        let err = read_verified(&TEST_IMAGES, &path)
            .expect_err("truncated gz")
            .to_string();
        assert!(
            err.contains("t10k-images-idx3-ubyte.gz") && err.contains("gzip"),
            "{err}"
        );
    }

    #[test]
    fn a_bad_magic_or_wrong_content_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = TEST_LABELS
            .find_in(&mnist_dir())
            .expect("shared t10k labels");
        let raw = read_decompressed(&src).expect("read");
        let path = dir.path().join(TEST_LABELS.name);

        let mut bad = raw.clone();
        bad[2] = 0x0d; // float data
        std::fs::write(&path, gzip(&bad)).expect("write");
        let err = read_verified(&TEST_LABELS, &path)
            .expect_err("bad magic")
            .to_string();
        assert!(
            err.contains("t10k-labels-idx1-ubyte.gz") && err.contains("bad magic"),
            "{err}"
        );

        // Well-formed IDX with the right shape but a changed label: checksum.
        let mut bad = raw.clone();
        bad[100] = (bad[100] + 1) % 10;
        std::fs::write(&path, gzip(&bad)).expect("write");
        let err = read_verified(&TEST_LABELS, &path)
            .expect_err("checksum")
            .to_string();
        assert!(
            err.contains("t10k-labels-idx1-ubyte.gz") && err.contains("sha256"),
            "{err}"
        );

        // Trailing garbage.
        let mut bad = raw.clone();
        bad.extend_from_slice(b"junk");
        std::fs::write(&path, gzip(&bad)).expect("write");
        let err = read_verified(&TEST_LABELS, &path)
            .expect_err("trailing")
            .to_string();
        assert!(err.contains("unexpected bytes"), "{err}");

        // The training labels are not the test labels.
        let err = read_verified(&TRAIN_LABELS, &src)
            .expect_err("wrong file")
            .to_string();
        assert!(err.contains("dimensions"), "{err}");
    }

    #[test]
    fn parse_idx_reads_dimensions_and_rejects_overflow() {
        let p = Path::new("x");
        let ok = [0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6];
        let idx = parse_idx(&ok, p).expect("ok");
        assert_eq!(idx.dims, vec![2, 3]);
        assert_eq!(idx.data, &[1, 2, 3, 4, 5, 6]);
        let huge = [
            0, 0, 8, 4, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255,
            255,
        ];
        assert!(parse_idx(&huge, p).is_err());
        assert!(parse_idx(&[0, 0, 8, 0], p).is_err(), "zero dimensions");
    }
}
