//! Data sets for training: reading and verifying them on the host, downloading missing ones, and
//! keeping them on the training device as ready tensors.
//!
//! - [`mnist`]: the MNIST IDX files (raw or gzip), checked against the published sha256 of the
//!   decompressed files, turned into `f32 [N,1,28,28]` images in `[0,1]` and `i64 [N]`
//!   labels.
//! - [`cifar`]: CIFAR-100's official binary version (`cifar-100-binary/{train,test}.bin`), turned
//!   into `f32 [N,3,32,32]` images in `[0,1]`, fine and coarse labels `i64 [N]`; a missing set is
//!   unpacked from the official `cifar-100-binary.tar.gz` (MD5-checked before unpacking).
//! - [`synth`]: writes CIFAR-100-format files with learnable class structure (`trainq-worker
//!   gen-cifar`), for tests and machines without the real set.
//! - [`download`]: fetches missing files from a list of mirrors (blocking, ureq), verifies them in
//!   a temporary file and renames them into place only once they pass.
//! - [`DataCache`]: each data set is loaded once per device and shared, as device tensors, by every
//!   job its owner runs, so training never copies a batch from the host.
//!
//! Must not run on the async runtime (file and network I/O here are blocking), must not panic on
//! bad input (a truncated or corrupt file is a [`DataError`] that names the file), and must never
//! leave an unverified file where a loader would pick it up.

pub mod cifar;
pub mod download;
pub mod mnist;
pub mod synth;

use std::collections::hash_map::{Entry, HashMap};
use std::path::{Path, PathBuf};

pub use cifar::{CifarTensors, CIFAR100_MIRRORS};
pub use mnist::MnistTensors;

use tch::{TchError, Tensor};

/// A labelled image data set on one device: train and test images (`f32 [N,C,H,W]` in `[0,1]`)
/// with `i64 [N]` class labels. MNIST is one ([`MnistTensors`]); CIFAR-100 with its fine labels
/// is another ([`CifarTensors::fine`]).
pub struct ImageSplits {
    pub train_images: Tensor,
    pub train_labels: Tensor,
    pub test_images: Tensor,
    pub test_labels: Tensor,
}

impl ImageSplits {
    /// The same device memory under new handles (no copy), for one job.
    pub fn shallow_clone(&self) -> Self {
        Self {
            train_images: self.train_images.shallow_clone(),
            train_labels: self.train_labels.shallow_clone(),
            test_images: self.test_images.shallow_clone(),
            test_labels: self.test_labels.shallow_clone(),
        }
    }

    pub fn n_train(&self) -> i64 {
        self.train_labels.size()[0]
    }

    pub fn n_test(&self) -> i64 {
        self.test_labels.size()[0]
    }

    /// The first `max_train` / `max_test` examples (views, no copy); `None`: all.
    pub fn limited(&self, max_train: Option<u32>, max_test: Option<u32>) -> Result<Self, TchError> {
        let first = |t: &Tensor, max: Option<u32>| {
            let n = t.size()[0];
            t.f_narrow(0, 0, max.map_or(n, |m| i64::from(m).min(n)))
        };
        Ok(Self {
            train_images: first(&self.train_images, max_train)?,
            train_labels: first(&self.train_labels, max_train)?,
            test_images: first(&self.test_images, max_test)?,
            test_labels: first(&self.test_labels, max_test)?,
        })
    }
}

/// Why a data set could not be made ready. Every variant names the file or folder involved.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file is there but is not what it should be (bad magic, truncated, wrong checksum).
    #[error("{}: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// Files are missing and no mirror could supply them.
    #[error(
        "{dataset} files missing from {} and could not be downloaded ({attempts}): place {} in {}",
        dir.display(),
        files.join(", "),
        dir.display()
    )]
    Missing {
        dataset: &'static str,
        dir: PathBuf,
        /// Exact names of the files still missing.
        files: Vec<String>,
        /// What each download attempt ran into.
        attempts: String,
    },
    /// Building the tensors (or moving them to the device) failed, for example out of memory.
    #[error("loading {what} onto {device:?}: {source}")]
    Tensor {
        what: &'static str,
        device: tch::Device,
        source: tch::TchError,
    },
}

impl DataError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn corrupt(path: &Path, reason: impl Into<String>) -> Self {
        DataError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// Data sets already loaded onto a device, shared by every job of one [`crate::train::trainer::Trainer`].
///
/// Lives on the training thread (tensors are not shared across threads). Loading happens on first
/// use; later jobs get shallow clones of the same device tensors.
#[derive(Default)]
pub struct DataCache {
    mnist: HashMap<tch::Device, MnistTensors>,
    cifar100: HashMap<tch::Device, CifarTensors>,
}

impl DataCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// MNIST on `device`, loaded from `<data_dir>/mnist/` (downloading missing files from
    /// `mirrors` first) the first time it is asked for.
    pub fn mnist(
        &mut self,
        device: tch::Device,
        data_dir: &Path,
        mirrors: &[String],
    ) -> Result<&MnistTensors, DataError> {
        match self.mnist.entry(device) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(slot) => {
                let dir = data_dir.join(mnist::DIR_NAME);
                mnist::ensure(&dir, mirrors)?;
                let host = mnist::MnistHost::load_dir(&dir)?;
                let tensors = host.to_device(device)?;
                // Slots read it from their own CUDA streams: finish every copy first.
                crate::train::sync_device(device);
                Ok(slot.insert(tensors))
            }
        }
    }

    /// Whether MNIST is already loaded on `device`.
    pub fn has_mnist(&self, device: tch::Device) -> bool {
        self.mnist.contains_key(&device)
    }

    /// CIFAR-100 on `device`, loaded from `<data_dir>/cifar-100-binary/{train,test}.bin` the first
    /// time it is asked for. When either file is missing, the official `cifar-100-binary.tar.gz`
    /// (found in `data_dir`, or downloaded from `mirrors`, e.g. [`CIFAR100_MIRRORS`]) is checked
    /// and unpacked first. Files already in place are parsed, not checksum-checked, so generated
    /// sets ([`synth`]) load too.
    pub fn cifar100(
        &mut self,
        device: tch::Device,
        data_dir: &Path,
        mirrors: &[String],
    ) -> Result<&CifarTensors, DataError> {
        match self.cifar100.entry(device) {
            Entry::Occupied(e) => Ok(e.into_mut()),
            Entry::Vacant(slot) => {
                cifar::ensure(data_dir, mirrors)?;
                let host = cifar::CifarHost::load_dir(&data_dir.join(cifar::DIR_NAME))?;
                let tensors = host.to_device(device)?;
                // Slots read it from their own CUDA streams: finish every copy first.
                crate::train::sync_device(device);
                Ok(slot.insert(tensors))
            }
        }
    }

    /// Whether CIFAR-100 is already loaded on `device`.
    pub fn has_cifar100(&self, device: tch::Device) -> bool {
        self.cifar100.contains_key(&device)
    }
}

/// The shared development data (`../shared/data`), for tests: `$TRAINQ_TEST_DATA_DIR` or
/// `<CARGO_MANIFEST_DIR>/../../shared/data`. Panics with a clear message when it is absent: tests
/// that need real data must fail loudly, never skip.
#[cfg(test)]
pub(crate) fn test_data_dir() -> PathBuf {
    let dir = match std::env::var_os("TRAINQ_TEST_DATA_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"),
    };
    let probe = dir.join("mnist").join(mnist::FILES[0].name);
    assert!(
        probe.exists(),
        "test data missing: {} does not exist; set TRAINQ_TEST_DATA_DIR to a folder holding \
         mnist/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte.gz ",
        probe.display()
    );
    dir
}
