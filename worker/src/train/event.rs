//! What a training run sends out and how it fails: metric points, artifact files, the events
//! that carry them, the inputs a run needs from elsewhere, and [`TrainError`] with its
//! classification of libtorch errors.
//!
//! A leaf: shared by the loop (`train`), its tasks, `transfer` and the async side (agent,
//! executor, standalone). Must not import anything of `train` or of the tasks.

use tch::TchError;

use crate::data::DataError;

/// One metric point, named as in the shared contract (`train/loss`, `test/accuracy`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub name: String,
    /// Global optimiser step, 1-based; epoch metrics carry the epoch's last step.
    pub step: u64,
    /// 1-based epoch.
    pub epoch: u32,
    pub value: f64,
}

/// A file a run produced, to be stored with the job (checkpoints, image grids).
#[derive(Debug, Clone, PartialEq)]
pub struct ArtifactFile {
    /// `checkpoint`, `samples` or `reconstructions`.
    pub kind: String,
    /// File name, for example `epoch-003.safetensors`.
    pub name: String,
    /// 1-based epoch it belongs to.
    pub epoch: u32,
    /// Global optimiser step it was taken after.
    pub step: u64,
    pub bytes: Vec<u8>,
}

/// What a run reports while it goes, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Metrics(Vec<Metric>),
    Artifact(ArtifactFile),
}

/// What a job needs besides its spec, fetched by the caller before the run.
#[derive(Debug, Clone, Default)]
pub struct JobInputs {
    /// A transfer's source: the MNIST classifier job's newest checkpoint (safetensors bytes).
    pub source_checkpoint: Option<Vec<u8>>,
    /// The training state to resume from (kind `resume`), stored by an earlier attempt.
    pub resume: Option<Vec<u8>>,
}

/// How a run that did not fail ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Trained every configured epoch; `final_step` is the number of optimiser steps in all.
    Succeeded { final_step: u64 },
    /// The stop flag was raised; stopped at a step boundary after global step `step`, and a
    /// training state of that step was reported (unless one already was).
    Stopped { step: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A retry cannot help: a config that cannot run, a shape mismatch, a loss that diverged.
    #[error("{0}")]
    Permanent(String),
    /// Might work on another attempt or worker: data download failed, I/O, out of memory.
    #[error("{0}")]
    Retryable(String),
}

impl TrainError {
    pub fn is_permanent(&self) -> bool {
        matches!(self, TrainError::Permanent(_))
    }

    /// Whether this is an out-of-memory failure (of the GPU or of the host).
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, TrainError::Retryable(m) if m.starts_with("out of GPU memory") || m.starts_with("out of memory"))
    }

    /// Classifies a libtorch error raised while doing `what`: out of memory and CUDA failures
    /// may pass on another attempt or worker; anything else (shapes, dtypes) will not.
    pub fn from_tch(what: &str, e: &TchError) -> Self {
        let msg = short_torch_message(&e.to_string());
        if msg.contains("out of memory") && msg.contains("CUDA") {
            TrainError::Retryable(format!("out of GPU memory while {what}: {msg}"))
        } else if msg.contains("out of memory") || msg.contains("can't allocate memory") {
            TrainError::Retryable(format!("out of memory while {what}: {msg}"))
        } else if msg.contains("CUDA error")
            || msg.contains("CUDA driver")
            || msg.contains("cuDNN error")
        {
            TrainError::Retryable(format!("device error while {what}: {msg}"))
        } else {
            TrainError::Permanent(format!("{what}: {msg}"))
        }
    }
}

impl From<DataError> for TrainError {
    fn from(e: DataError) -> Self {
        match e {
            DataError::Tensor { ref source, .. } => TrainError::from_tch("loading data", source),
            other => TrainError::Retryable(format!("data: {other}")),
        }
    }
}

/// The first lines of a libtorch error, without its C++ backtrace.
fn short_torch_message(msg: &str) -> String {
    let cut = ["\nException raised from", "\nFrame", "\nframe #"]
        .iter()
        .filter_map(|m| msg.find(m))
        .min()
        .unwrap_or(msg.len());
    let s = msg[..cut].trim();
    if s.chars().count() > 600 {
        s.chars().take(600).collect::<String>() + "..."
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_errors_are_classified() {
        let oom = TchError::Torch(
            "CUDA out of memory. Tried to allocate 2.00 GiB\nException raised from malloc at x.cpp:1".into(),
        );
        match TrainError::from_tch("training", &oom) {
            TrainError::Retryable(m) => {
                assert!(m.contains("out of GPU memory"), "{m}");
                assert!(!m.contains("Exception raised"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        let shape = TchError::Torch(
            "mat1 and mat2 shapes cannot be multiplied (5x4096 and 3136x128)".into(),
        );
        assert!(TrainError::from_tch("training", &shape).is_permanent());
    }
}
