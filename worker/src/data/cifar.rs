//! CIFAR-100 in its official binary version (`cifar-100-binary.tar.gz`): the record format, the
//! loader, the archive download and unpacking, and the conversion to tensors (`f32 [N,3,32,32]`
//! scaled to `[0,1]` like torchvision's `ToTensor`, fine labels `i64 [N]`, coarse labels `i64 [N]`).
//!
//! Layout: `<data_dir>/cifar-100-binary/{train.bin, test.bin}` (plus the label-name files), each
//! `.bin` a run of 3,074-byte records: 1 byte coarse label (0..=19), 1 byte fine label (0..=99),
//! then 3,072 pixel bytes, channel-major R, G, B, each plane 32x32 row-major. The official files
//! hold 50,000 and 10,000 records; any whole number of records is accepted, so files written by
//! [`super::synth`] load the same way.
//!
//! When `train.bin` or `test.bin` is missing, `cifar-100-binary.tar.gz` is taken from the data dir
//! if a user put it there, or else fetched from the mirrors; its MD5 is checked BEFORE anything is
//! unpacked, the wanted members are unpacked under temporary names, checked (format always; MD5
//! when the official archive was fetched), and only then renamed into place. A downloaded archive
//! is removed afterwards. Files a user placed by hand are never checksum-checked, only parsed.
//!
//! Must not panic or return garbage on a bad file (every problem is a [`DataError`] naming the file
//! and, for a bad label, the record), must not leave a partial or unverified file where the loader
//! looks, and must not run on the async runtime (blocking I/O).

use std::io::{BufReader, Read, Write};
use std::path::{Component, Path};

use md5::{Digest, Md5};
use tch::{Device, Kind, Tensor};

use super::download::{self, TempFile};
use super::DataError;

/// Folder of CIFAR-100 inside the data dir (and inside the archive).
pub const DIR_NAME: &str = "cifar-100-binary";
/// The archive mirrors serve, and the name a user may place it under in the data dir.
pub const ARCHIVE_NAME: &str = "cifar-100-binary.tar.gz";
/// MD5 of the official archive (as published with it).
pub const ARCHIVE_MD5: &str = "03b5dce01913d631647c71ecec9e9cb8";
pub const TRAIN_FILE: &str = "train.bin";
pub const TEST_FILE: &str = "test.bin";
pub const FINE_NAMES_FILE: &str = "fine_label_names.txt";
pub const COARSE_NAMES_FILE: &str = "coarse_label_names.txt";
/// MD5 of the official `train.bin` (50,000 records).
pub const TRAIN_MD5: &str = "6172c7755cfe09b2fe270c85cebc1b15";
/// MD5 of the official `test.bin` (10,000 records).
pub const TEST_MD5: &str = "4499cfba6c016c1be1438163640a0898";

/// Default base URLs for [`ARCHIVE_NAME`], tried in order.
pub const CIFAR100_MIRRORS: &[&str] = &["https://www.cs.toronto.edu/~kriz/"];

/// Side of an image in pixels.
pub const SIDE: usize = 32;
/// Colour channels (R, G, B planes, in that order).
pub const CHANNELS: usize = 3;
/// Pixel bytes of one record.
pub const PIXELS: usize = CHANNELS * SIDE * SIDE;
/// Bytes of one record: coarse label, fine label, pixels.
pub const RECORD_BYTES: usize = 2 + PIXELS;
/// Fine classes (labels 0..=99).
pub const FINE_CLASSES: usize = 100;
/// Coarse classes, the superclasses (labels 0..=19).
pub const COARSE_CLASSES: usize = 20;

/// Members unpacked from the archive's `cifar-100-binary/` folder.
pub const MEMBERS: [&str; 4] = [TRAIN_FILE, TEST_FILE, FINE_NAMES_FILE, COARSE_NAMES_FILE];

/// Largest archive member accepted (`train.bin` is 153,700,000 bytes); guards against tar bombs.
const MAX_MEMBER_BYTES: u64 = 256 << 20;

/// [`CIFAR100_MIRRORS`] as owned strings, the form [`super::DataCache::cifar100`] takes.
pub fn default_mirrors() -> Vec<String> {
    CIFAR100_MIRRORS.iter().map(|s| s.to_string()).collect()
}

/// Hex MD5 of `bytes`.
pub fn md5_hex(bytes: &[u8]) -> String {
    hex::encode(Md5::digest(bytes))
}

/// One split (train or test) decoded on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CifarSplit {
    /// `n * 3072` pixel bytes: per record R, G, B planes, each 32x32 row-major.
    pub pixels: Vec<u8>,
    /// Fine labels, 0..=99.
    pub fine: Vec<u8>,
    /// Coarse labels, 0..=19.
    pub coarse: Vec<u8>,
}

impl CifarSplit {
    /// Number of records.
    pub fn len(&self) -> usize {
        self.fine.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fine.is_empty()
    }
}

/// Checks that `bytes` is a whole, non-empty run of valid records; returns how many. `path` is
/// only for messages.
pub fn check_records(bytes: &[u8], path: &Path) -> Result<usize, DataError> {
    if bytes.is_empty() {
        return Err(DataError::corrupt(
            path,
            "empty: 0 bytes, expected 3074-byte CIFAR-100 records",
        ));
    }
    if !bytes.len().is_multiple_of(RECORD_BYTES) {
        return Err(DataError::corrupt(
            path,
            format!(
                "truncated: {} bytes is not a whole number of {RECORD_BYTES}-byte records",
                bytes.len()
            ),
        ));
    }
    for (i, rec) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        let (coarse, fine) = (rec[0], rec[1]);
        if fine as usize >= FINE_CLASSES {
            return Err(DataError::corrupt(
                path,
                format!(
                    "record {i}: fine label {fine} is out of range 0..={}",
                    FINE_CLASSES - 1
                ),
            ));
        }
        if coarse as usize >= COARSE_CLASSES {
            return Err(DataError::corrupt(
                path,
                format!(
                    "record {i}: coarse label {coarse} is out of range 0..={}",
                    COARSE_CLASSES - 1
                ),
            ));
        }
    }
    Ok(bytes.len() / RECORD_BYTES)
}

/// Parses the records of one `.bin` file (the content of `path`).
pub fn parse_records(bytes: &[u8], path: &Path) -> Result<CifarSplit, DataError> {
    let n = check_records(bytes, path)?;
    let mut split = CifarSplit {
        pixels: Vec::with_capacity(n * PIXELS),
        fine: Vec::with_capacity(n),
        coarse: Vec::with_capacity(n),
    };
    for rec in bytes.chunks_exact(RECORD_BYTES) {
        split.coarse.push(rec[0]);
        split.fine.push(rec[1]);
        split.pixels.extend_from_slice(&rec[2..]);
    }
    Ok(split)
}

/// Reads and parses one `.bin` file.
pub fn read_split(path: &Path) -> Result<CifarSplit, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    parse_records(&bytes, path)
}

/// The expected checksums of an archive: the archive itself, and members checked after unpacking.
/// [`OFFICIAL`] is the published archive; tests pass their own.
#[derive(Debug, Clone, Copy)]
pub struct ArchiveChecks<'a> {
    /// Hex MD5 the whole `.tar.gz` must have; checked before anything is unpacked.
    pub archive_md5: &'a str,
    /// `(member name, hex MD5)` pairs checked after unpacking, before the rename.
    pub member_md5: &'a [(&'a str, &'a str)],
}

/// The published archive and the MD5s of its `train.bin` and `test.bin`.
pub const OFFICIAL: ArchiveChecks<'static> = ArchiveChecks {
    archive_md5: ARCHIVE_MD5,
    member_md5: &[(TRAIN_FILE, TRAIN_MD5), (TEST_FILE, TEST_MD5)],
};

/// `train.bin` and `test.bin` not yet in `dir`.
fn missing_bins(dir: &Path) -> Vec<&'static str> {
    [TRAIN_FILE, TEST_FILE]
        .into_iter()
        .filter(|f| !dir.join(f).is_file())
        .collect()
}

/// Makes sure `<data_dir>/cifar-100-binary/{train.bin,test.bin}` exist, unpacking the official
/// archive (placed in `data_dir` by hand, or downloaded from `mirrors`) when either is missing.
/// Files already present are not checked here (loading parses them).
pub fn ensure(data_dir: &Path, mirrors: &[String]) -> Result<(), DataError> {
    ensure_with(data_dir, mirrors, &OFFICIAL)
}

/// [`ensure`] with the checksums the archive must match as a parameter.
pub fn ensure_with(
    data_dir: &Path,
    mirrors: &[String],
    checks: &ArchiveChecks<'_>,
) -> Result<(), DataError> {
    let dir = data_dir.join(DIR_NAME);
    let missing = missing_bins(&dir);
    if missing.is_empty() {
        return Ok(());
    }
    let archive = data_dir.join(ARCHIVE_NAME);
    let downloaded = if archive.is_file() {
        // Placed by hand (or left by another worker's download): still the archive we expect?
        tracing::info!(path = %archive.display(), "unpacking a CIFAR-100 archive found in the data dir");
        let sum = md5_file(&archive)?;
        if sum != checks.archive_md5 {
            return Err(DataError::corrupt(
                &archive,
                format!(
                    "md5 is {sum}, expected {} (not the official archive, or corrupt); remove it, \
                     or unpack it yourself into {}",
                    checks.archive_md5,
                    dir.display()
                ),
            ));
        }
        false
    } else {
        let expected = checks.archive_md5.to_string();
        let spec = download::FileSpec {
            name: ARCHIVE_NAME,
            verify: Box::new(move |p: &Path| {
                let sum = md5_file(p)?;
                if sum == expected {
                    Ok(())
                } else {
                    Err(DataError::corrupt(
                        p,
                        format!("md5 of the archive is {sum}, expected {expected} (a corrupt or wrong download)"),
                    ))
                }
            }),
        };
        match download::fetch_missing("cifar-100", data_dir, &[spec], mirrors) {
            Ok(()) => true,
            Err(DataError::Missing { attempts, .. }) => {
                return Err(DataError::Missing {
                    dataset: "cifar-100",
                    dir: dir.clone(),
                    files: missing.iter().map(|f| f.to_string()).collect(),
                    attempts: format!(
                        "{ARCHIVE_NAME}: {attempts}; alternatively put the official {ARCHIVE_NAME} \
                         (md5 {ARCHIVE_MD5}) in {} to have it unpacked",
                        data_dir.display()
                    ),
                })
            }
            Err(e) => return Err(e),
        }
    };
    let created_dir = !dir.exists();
    let result = unpack(&archive, &dir, &missing, checks);
    if downloaded {
        // Its content is in place (or it failed); don't keep 169 MB twice.
        let _ = std::fs::remove_file(&archive);
    }
    if result.is_err() && created_dir {
        // Only removes it when empty.
        let _ = std::fs::remove_dir(&dir);
    }
    result
}

/// Hex MD5 of a file, streamed.
fn md5_file(path: &Path) -> Result<String, DataError> {
    let mut f = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The member name of an archive entry at `cifar-100-binary/<name>` (a leading `./` allowed),
/// when `<name>` is one of [`MEMBERS`].
fn member_name(path: &Path) -> Option<&'static str> {
    let parts: Vec<Component<'_>> = path
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect();
    match parts.as_slice() {
        [Component::Normal(d), Component::Normal(f)] if *d == DIR_NAME => {
            MEMBERS.into_iter().find(|m| *f == *m)
        }
        _ => None,
    }
}

/// Unpacks the wanted members of the (already verified) `archive` into `dir`: each to a temporary
/// file, then checks them, then renames them into place. `bins` are the `.bin` files still
/// missing; the label-name files come along when missing, but are optional.
fn unpack(
    archive: &Path,
    dir: &Path,
    bins: &[&'static str],
    checks: &ArchiveChecks<'_>,
) -> Result<(), DataError> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let bad = |reason: String| DataError::corrupt(archive, reason);
    let file = std::fs::File::open(archive).map_err(|e| DataError::io(archive, e))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(BufReader::new(file)));
    let entries = tar
        .entries()
        .map_err(|e| bad(format!("not a valid tar.gz: {e}")))?;
    // (member, temporary file, md5)
    let mut got: Vec<(&'static str, TempFile, String)> = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("not a valid tar.gz: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| bad(format!("bad member name: {e}")))?
            .into_owned();
        let Some(name) = member_name(&path) else {
            continue;
        };
        if !entry.header().entry_type().is_file() {
            return Err(bad(format!(
                "member {} is not a regular file",
                path.display()
            )));
        }
        if got.iter().any(|(m, _, _)| *m == name) {
            return Err(bad(format!("member {} appears twice", path.display())));
        }
        if dir.join(name).exists() {
            continue; // already in place; never replaced
        }
        let tmp = TempFile::new_in(dir, name);
        let mut out = std::fs::File::create(&tmp.path).map_err(|e| DataError::io(&tmp.path, e))?;
        let mut hasher = Md5::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(|e| bad(format!("reading member {}: {e}", path.display())))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > MAX_MEMBER_BYTES {
                return Err(bad(format!(
                    "member {} is larger than {MAX_MEMBER_BYTES} bytes",
                    path.display()
                )));
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| DataError::io(&tmp.path, e))?;
        }
        out.sync_all().map_err(|e| DataError::io(&tmp.path, e))?;
        got.push((name, tmp, hex::encode(hasher.finalize())));
    }
    for want in bins {
        if !got.iter().any(|(m, _, _)| m == want) && !dir.join(want).exists() {
            return Err(bad(format!("has no member {DIR_NAME}/{want}")));
        }
    }
    for (name, tmp, sum) in &got {
        if let Some((_, want)) = checks.member_md5.iter().find(|(m, _)| m == name) {
            if sum != want {
                return Err(bad(format!(
                    "member {DIR_NAME}/{name} has md5 {sum}, expected {want}"
                )));
            }
        }
        if name.ends_with(".bin") {
            let bytes = std::fs::read(&tmp.path).map_err(|e| DataError::io(&tmp.path, e))?;
            check_records(&bytes, Path::new(name)).map_err(|e| match e {
                DataError::Corrupt { reason, .. } => {
                    bad(format!("member {DIR_NAME}/{name}: {reason}"))
                }
                other => other,
            })?;
        }
    }
    // Everything checked: put it in place, the label names first and train.bin last.
    got.sort_by_key(|(name, _, _)| match *name {
        TRAIN_FILE => 2,
        TEST_FILE => 1,
        _ => 0,
    });
    for (name, mut tmp, _) in got {
        let dest = dir.join(name);
        if dest.exists() {
            continue; // another worker was faster; theirs was checked too
        }
        std::fs::rename(&tmp.path, &dest).map_err(|e| DataError::io(&dest, e))?;
        tmp.keep = true;
        tracing::info!(path = %dest.display(), "unpacked and verified");
    }
    Ok(())
}

/// Both splits decoded on the host.
pub struct CifarHost {
    pub train: CifarSplit,
    pub test: CifarSplit,
}

impl CifarHost {
    /// Reads and parses `train.bin` and `test.bin` from `dir` (the `cifar-100-binary` folder).
    pub fn load_dir(dir: &Path) -> Result<Self, DataError> {
        let read = |name: &str| -> Result<CifarSplit, DataError> {
            let path = dir.join(name);
            if !path.is_file() {
                return Err(DataError::Missing {
                    dataset: "cifar-100",
                    dir: dir.to_path_buf(),
                    files: vec![name.to_string()],
                    attempts: "the file was gone when loading".into(),
                });
            }
            read_split(&path)
        };
        Ok(Self {
            train: read(TRAIN_FILE)?,
            test: read(TEST_FILE)?,
        })
    }

    /// Copies both splits to `device` as ready tensors (pixels are sent as u8 and scaled on the
    /// device, a quarter of the bytes of f32).
    pub fn to_device(&self, device: Device) -> Result<CifarTensors, DataError> {
        let err = |source| DataError::Tensor {
            what: "cifar-100",
            device,
            source,
        };
        let images = |px: &[u8]| -> Result<Tensor, tch::TchError> {
            let n = (px.len() / PIXELS) as i64;
            let side = SIDE as i64;
            let mut t = Tensor::f_from_slice(px)?
                .f_view([n, CHANNELS as i64, side, side])?
                .f_to_device(device)?
                .f_to_kind(Kind::Float)?;
            let _ = t.f_div_scalar_(255.0)?;
            Ok(t)
        };
        let labels = |l: &[u8]| -> Result<Tensor, tch::TchError> {
            Tensor::f_from_slice(l)?
                .f_to_device(device)?
                .f_to_kind(Kind::Int64)
        };
        Ok(CifarTensors {
            train_images: images(&self.train.pixels).map_err(err)?,
            train_labels: labels(&self.train.fine).map_err(err)?,
            train_coarse_labels: labels(&self.train.coarse).map_err(err)?,
            test_images: images(&self.test.pixels).map_err(err)?,
            test_labels: labels(&self.test.fine).map_err(err)?,
            test_coarse_labels: labels(&self.test.coarse).map_err(err)?,
        })
    }
}

/// CIFAR-100 on one device: images `f32 [N,3,32,32]` in `[0,1]`, fine labels `i64 [N]` (0..=99),
/// coarse labels `i64 [N]` (0..=19).
pub struct CifarTensors {
    pub train_images: Tensor,
    /// Fine labels (what the CVAE conditions on).
    pub train_labels: Tensor,
    pub train_coarse_labels: Tensor,
    pub test_images: Tensor,
    /// Fine labels.
    pub test_labels: Tensor,
    pub test_coarse_labels: Tensor,
}

impl CifarTensors {
    /// The same device memory under new handles (no copy), for one job.
    pub fn shallow_clone(&self) -> Self {
        Self {
            train_images: self.train_images.shallow_clone(),
            train_labels: self.train_labels.shallow_clone(),
            train_coarse_labels: self.train_coarse_labels.shallow_clone(),
            test_images: self.test_images.shallow_clone(),
            test_labels: self.test_labels.shallow_clone(),
            test_coarse_labels: self.test_coarse_labels.shallow_clone(),
        }
    }

    pub fn n_train(&self) -> i64 {
        self.train_labels.size()[0]
    }

    pub fn n_test(&self) -> i64 {
        self.test_labels.size()[0]
    }
    /// Images with their fine labels (shallow clones, no copy), as classifiers and the CVAE use them.
    pub fn fine(&self) -> super::ImageSplits {
        super::ImageSplits {
            train_images: self.train_images.shallow_clone(),
            train_labels: self.train_labels.shallow_clone(),
            test_images: self.test_images.shallow_clone(),
            test_labels: self.test_labels.shallow_clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::download::test_server;
    use crate::data::synth;
    use std::collections::HashMap;
    use std::net::TcpListener;

    /// One valid record with the given labels and pixel bytes `px(i)`.
    fn record(coarse: u8, fine: u8, px: impl Fn(usize) -> u8) -> Vec<u8> {
        let mut r = vec![coarse, fine];
        r.extend((0..PIXELS).map(px));
        r
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = match std::fs::read_dir(dir) {
            Ok(rd) => rd
                .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        };
        v.sort();
        v
    }

    /// `cifar-100-binary.tar.gz` of the generated files under `data_dir`, as the official archive
    /// lays them out (folder `cifar-100-binary/`).
    fn pack(data_dir: &Path) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        for m in MEMBERS {
            b.append_path_with_name(data_dir.join(DIR_NAME).join(m), format!("{DIR_NAME}/{m}"))
                .expect("append");
        }
        b.into_inner().expect("tar").finish().expect("gz")
    }

    /// A generated set: (its data dir, its archive, the archive's md5).
    fn generated_archive(train: usize, test: usize) -> (tempfile::TempDir, Vec<u8>, String) {
        let src = tempfile::tempdir().expect("tempdir");
        synth::write_cifar100(src.path(), train, test, 7).expect("generate");
        let archive = pack(src.path());
        let sum = md5_hex(&archive);
        (src, archive, sum)
    }

    fn serve(files: HashMap<String, Vec<u8>>) -> String {
        test_server::serve("/kriz/", files)
    }

    #[test]
    fn records_parse_into_planes_and_labels_and_tensors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join(DIR_NAME);
        std::fs::create_dir_all(&sub).expect("mkdir");
        // Train: 3 records; pixel byte = (index * 7 + record) % 256. Test: 1 record.
        let mut train = Vec::new();
        for r in 0..3u8 {
            train.extend(record(r, 40 + r, |i| ((i * 7 + r as usize) % 256) as u8));
        }
        std::fs::write(sub.join(TRAIN_FILE), &train).expect("write");
        std::fs::write(sub.join(TEST_FILE), record(19, 99, |_| 255)).expect("write");

        let host = CifarHost::load_dir(&sub).expect("loads");
        assert_eq!(host.train.len(), 3);
        assert_eq!(host.train.fine, vec![40, 41, 42]);
        assert_eq!(host.train.coarse, vec![0, 1, 2]);
        assert_eq!(host.test.fine, vec![99]);
        assert_eq!(host.test.coarse, vec![19]);

        let t = host.to_device(Device::Cpu).expect("to cpu");
        assert_eq!(t.train_images.size(), [3, 3, 32, 32]);
        assert_eq!(t.train_images.kind(), Kind::Float);
        assert_eq!(t.train_labels.kind(), Kind::Int64);
        assert_eq!(t.train_labels.size(), [3]);
        assert_eq!(t.train_coarse_labels.size(), [3]);
        assert_eq!((t.n_train(), t.n_test()), (3, 1));
        assert_eq!(t.test_images.size(), [1, 3, 32, 32]);
        assert_eq!(f64::try_from(t.test_images.min()).expect("scalar"), 1.0);
        // Channel-major: image[r, c, y, x] = byte 2 + c*1024 + y*32 + x of record r.
        for (r, c, y, x) in [(0i64, 0i64, 0i64, 0i64), (1, 1, 5, 7), (2, 2, 31, 31)] {
            let i = (c * 1024 + y * 32 + x) as usize;
            let want = ((i * 7 + r as usize) % 256) as f64 / 255.0;
            let got = f64::try_from(t.train_images.get(r).get(c).get(y).get(x)).expect("scalar");
            assert!(
                (got - want).abs() < 1e-6,
                "({r},{c},{y},{x}): {got} vs {want}"
            );
        }
        let labels: Vec<i64> = Vec::try_from(&t.train_labels).expect("vec");
        assert_eq!(labels, vec![40, 41, 42]);
        let copy = t.shallow_clone();
        assert_eq!(copy.n_train(), 3);
    }

    #[test]
    fn a_truncated_or_empty_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(TRAIN_FILE);
        let mut bytes = record(1, 5, |_| 0);
        bytes.extend(record(2, 10, |_| 0));
        std::fs::write(&path, &bytes[..bytes.len() - 100]).expect("write");
        let err = read_split(&path).expect_err("truncated");
        let msg = err.to_string();
        assert!(matches!(err, DataError::Corrupt { .. }), "{msg}");
        assert!(
            msg.contains(&path.display().to_string())
                && msg.contains("truncated: 6048 bytes is not a whole number of 3074-byte records"),
            "{msg}"
        );

        std::fs::write(&path, b"").expect("write");
        let msg = read_split(&path).expect_err("empty").to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("empty"),
            "{msg}"
        );
    }

    #[test]
    fn a_bad_label_is_an_error_naming_the_file_and_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(TEST_FILE);
        let mut bytes = record(0, 0, |_| 9);
        bytes.extend(record(3, 100, |_| 9)); // fine label 100
        std::fs::write(&path, &bytes).expect("write");
        let msg = read_split(&path).expect_err("bad fine").to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("record 1: fine label 100"),
            "{msg}"
        );

        let mut bytes = record(0, 0, |_| 9);
        bytes.extend(record(19, 1, |_| 9));
        bytes.extend(record(20, 1, |_| 9)); // coarse label 20
        std::fs::write(&path, &bytes).expect("write");
        let msg = read_split(&path).expect_err("bad coarse").to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("record 2: coarse label 20"),
            "{msg}"
        );
    }

    #[test]
    fn a_missing_split_is_a_missing_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(TRAIN_FILE), record(0, 0, |_| 0)).expect("write");
        let err = CifarHost::load_dir(dir.path())
            .err()
            .expect("test.bin missing");
        assert!(
            matches!(err, DataError::Missing { ref files, .. } if files == &vec![TEST_FILE.to_string()]),
            "{err}"
        );
    }

    #[test]
    fn a_good_archive_is_downloaded_verified_unpacked_and_loads() {
        let (src, archive, sum) = generated_archive(40, 10);
        let data = tempfile::tempdir().expect("tempdir");
        let empty = serve(HashMap::new());
        let good = serve(HashMap::from([(ARCHIVE_NAME.to_string(), archive)]));
        // The generated set's own checksums stand in for the official ones.
        let train_md5 =
            md5_hex(&std::fs::read(src.path().join(DIR_NAME).join(TRAIN_FILE)).expect("r"));
        let member_md5 = [(TRAIN_FILE, train_md5.as_str())];
        let checks = ArchiveChecks {
            archive_md5: &sum,
            member_md5: &member_md5,
        };
        ensure_with(data.path(), &[empty, good], &checks).expect("download and unpack");

        assert_eq!(
            entries(data.path()),
            vec![DIR_NAME.to_string()],
            "the archive and temp files are gone"
        );
        let mut want: Vec<String> = MEMBERS.iter().map(|m| m.to_string()).collect();
        want.sort();
        assert_eq!(entries(&data.path().join(DIR_NAME)), want);
        for m in MEMBERS {
            assert_eq!(
                std::fs::read(data.path().join(DIR_NAME).join(m)).expect("read"),
                std::fs::read(src.path().join(DIR_NAME).join(m)).expect("read"),
                "{m} unpacked byte for byte"
            );
        }

        let mut cache = crate::data::DataCache::new();
        let t = cache
            .cifar100(Device::Cpu, data.path(), &[])
            .expect("loads without network");
        assert_eq!((t.n_train(), t.n_test()), (40, 10));
        assert!(cache.has_cifar100(Device::Cpu));
        // Second call: the same tensors, no reload.
        let again = cache
            .cifar100(Device::Cpu, data.path(), &[])
            .expect("cached");
        assert_eq!(again.n_train(), 40);
    }

    #[test]
    fn a_corrupt_archive_is_a_checksum_error_and_leaves_nothing() {
        let (_src, mut archive, sum) = generated_archive(20, 5);
        let mid = archive.len() / 2;
        archive[mid] ^= 0x55;
        let base = serve(HashMap::from([(ARCHIVE_NAME.to_string(), archive)]));
        let data = tempfile::tempdir().expect("tempdir");
        let checks = ArchiveChecks {
            archive_md5: &sum,
            member_md5: &[],
        };
        let err = ensure_with(data.path(), &[base], &checks).expect_err("corrupt archive");
        let msg = err.to_string();
        assert!(msg.contains("md5") && msg.contains(&sum), "{msg}");
        assert!(msg.contains(ARCHIVE_NAME), "{msg}");
        assert_eq!(entries(data.path()), Vec::<String>::new(), "nothing left");
    }

    #[test]
    fn a_member_with_the_wrong_md5_is_refused_and_nothing_is_put_in_place() {
        let (_src, archive, sum) = generated_archive(20, 5);
        let base = serve(HashMap::from([(ARCHIVE_NAME.to_string(), archive)]));
        let data = tempfile::tempdir().expect("tempdir");
        let checks = ArchiveChecks {
            archive_md5: &sum,
            member_md5: &[(TEST_FILE, TEST_MD5)], // the official test.bin's: not this one
        };
        let msg = ensure_with(data.path(), &[base], &checks)
            .expect_err("wrong member")
            .to_string();
        assert!(msg.contains("test.bin") && msg.contains(TEST_MD5), "{msg}");
        assert_eq!(entries(data.path()), Vec::<String>::new(), "nothing left");
    }

    #[test]
    fn an_archive_placed_in_the_data_dir_is_checked_and_unpacked_and_kept() {
        let (_src, archive, sum) = generated_archive(20, 5);
        let data = tempfile::tempdir().expect("tempdir");
        std::fs::write(data.path().join(ARCHIVE_NAME), &archive).expect("write");
        // Not the official archive: refused with the md5 named, and left alone.
        let msg = ensure(data.path(), &[])
            .expect_err("not official")
            .to_string();
        assert!(
            msg.contains(ARCHIVE_NAME) && msg.contains(ARCHIVE_MD5),
            "{msg}"
        );
        assert_eq!(entries(data.path()), vec![ARCHIVE_NAME.to_string()]);
        // With its own checksum: unpacked, the user's archive kept.
        let checks = ArchiveChecks {
            archive_md5: &sum,
            member_md5: &[],
        };
        ensure_with(data.path(), &[], &checks).expect("unpack");
        assert_eq!(
            entries(data.path()),
            vec![DIR_NAME.to_string(), ARCHIVE_NAME.to_string()]
        );
        CifarHost::load_dir(&data.path().join(DIR_NAME)).expect("loads");
    }

    #[test]
    fn without_a_server_the_error_names_the_files_and_the_folder() {
        let data = tempfile::tempdir().expect("tempdir");
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        }; // closed again: connections are refused
        let err = ensure(data.path(), &[format!("http://127.0.0.1:{port}/kriz/")])
            .expect_err("no server");
        let msg = err.to_string();
        let dir = data.path().join(DIR_NAME);
        assert!(
            msg.contains(&format!("place train.bin, test.bin in {}", dir.display())),
            "{msg}"
        );
        assert!(msg.contains(ARCHIVE_NAME), "{msg}");
        assert!(
            matches!(err, DataError::Missing { ref files, ref dir, .. }
                if files == &vec![TRAIN_FILE.to_string(), TEST_FILE.to_string()]
                    && dir == &data.path().join(DIR_NAME)),
            "{err:?}"
        );
        assert_eq!(entries(data.path()), Vec::<String>::new(), "nothing left");

        // Only test.bin missing: only it is named.
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(TRAIN_FILE), record(0, 0, |_| 0)).expect("write");
        let err = ensure(data.path(), &[]).expect_err("no mirrors");
        assert!(
            matches!(err, DataError::Missing { ref files, .. } if files == &vec![TEST_FILE.to_string()]),
            "{err}"
        );
    }

    #[test]
    fn archive_member_names_are_matched_exactly() {
        assert_eq!(
            member_name(Path::new("cifar-100-binary/train.bin")),
            Some(TRAIN_FILE)
        );
        assert_eq!(
            member_name(Path::new("./cifar-100-binary/test.bin")),
            Some(TEST_FILE)
        );
        assert_eq!(member_name(Path::new("train.bin")), None);
        assert_eq!(member_name(Path::new("x/cifar-100-binary/train.bin")), None);
        assert_eq!(
            member_name(Path::new("cifar-100-binary/../train.bin")),
            None
        );
        assert_eq!(member_name(Path::new("cifar-100-binary/other.bin")), None);
    }

    #[test]
    fn the_official_mirror_list_is_the_toronto_one() {
        assert_eq!(
            download::join_url(CIFAR100_MIRRORS[0], ARCHIVE_NAME),
            "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
        );
        assert_eq!(default_mirrors().len(), CIFAR100_MIRRORS.len());
    }
}
