//! The training engine: runs one validated job spec to the end on the calling OS thread.
//!
//! [`Trainer::run`] is one generic loop over a [`Task`], one per experiment kind: the seed's MNIST
//! classifier ([`ClassifierTask`]) and its CIFAR-100 CVAE ([`crate::cvae::CvaeTask`], from random
//! or transferred weights). A task owns the model's `VarStore`, its optimiser, fixed-shape batch
//! buffers and device-side metric accumulators; its [`Task::step`] is the one function every
//! caller (the trainer, the benchmark) runs per optimiser step.
//!
//! What a run produces leaves through one callback as [`Event`]s: metric batches, and artifacts
//! (a safetensors checkpoint at the end of every epoch; a training state to resume from at the
//! end of every epoch, every `checkpoint_every_steps` steps and when stopped; a CVAE's sample and
//! reconstruction grids at the end of the run). What a run needs from elsewhere (a transfer's
//! source checkpoint, the training state a retried attempt resumes from) comes in through
//! [`JobInputs`]: this module does no network I/O.
//!
//! Resuming: a run given a training state taken after global step `s` restores the model and the
//! optimiser (moments, step counts) and goes on with step `s + 1`, in the same epoch and at the
//! same place in that epoch's order, so a job trains exactly its configured number of steps however
//! often it is interrupted. Metric points of steps after `s` that the interrupted attempt already
//! reported are reported again under the same keys, which the coordinator stores once.
//!
//! Performance rules (GUIDE §8): data sets stay on the device ([`DataCache`]); each epoch's order
//! is a device-side `randperm`; a step gathers its batch with `index_select` into fixed buffers and
//! never synchronises with the host. Metrics are accumulated on the device and read back once
//! every `log_every_steps` steps, in one transfer.
//!
//! Must never be called from the async runtime (it blocks for minutes, and does blocking file and
//! network I/O when data is missing); tensors never leave the thread that made them. Must not
//! panic on bad input: shapes that come from a spec go through fallible `f_*` ops and become
//! [`TrainError`]s.
//!
//! Randomness: libtorch's generator is process-wide, so every use goes through [`seeded`], which
//! holds a process-wide lock while it seeds and draws: the model is built under `seed`, and each
//! epoch's permutation is drawn under `mix(seed, epoch)`. The same seed thus gives the same
//! initial weights and data order even with other jobs training in the same process, and a
//! resumed run sees the same order as an uninterrupted one. (The CVAE's per-step
//! noise draws from that generator without the lock, after the epoch's permutation: see
//! [`crate::cvae`].)

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use proto::spec::{Experiment, Init, JobSpec, Optimizer, Training};
use tch::nn;
use tch::{Device, Kind, Reduction, TchError, Tensor};
use tracing::{info, warn};

use crate::checkpoint::{self, TrainingState};
use crate::cvae::{CvaeConfig, CvaeTask};
use crate::data::{DataCache, DataError, MnistTensors};
use crate::model::MnistClassifier;
use crate::optim;
use crate::transfer::SourceLayers;

/// Metric names of the shared contract (GUIDE §3).
pub mod names {
    pub const TRAIN_LOSS: &str = "train/loss";
    pub const TRAIN_ACCURACY: &str = "train/accuracy";
    pub const TRAIN_IMAGES_PER_S: &str = "train/images_per_s";
    pub const TRAIN_RECON: &str = "train/recon";
    pub const TRAIN_KL: &str = "train/kl";
    pub const TEST_LOSS: &str = "test/loss";
    pub const TEST_ACCURACY: &str = "test/accuracy";
    pub const TEST_NEG_ELBO_NATS: &str = "test/neg_elbo_nats";
    pub const TEST_BITS_PER_DIM: &str = "test/bits_per_dim";
    pub const TEST_RECON: &str = "test/recon";
    pub const TEST_KL: &str = "test/kl";
}

/// Images per evaluation batch (the last one of a test set may be smaller).
pub const EVAL_BATCH: i64 = 1000;

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

#[derive(Debug, Clone)]
pub struct TrainerConfig {
    pub device: tch::Device,
    pub data_dir: PathBuf,
    pub mnist_mirrors: Vec<String>,
    /// Base URLs tried in order when CIFAR-100 is missing from the data dir.
    pub cifar_mirrors: Vec<String>,
}

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`. `cuda` fails when libtorch sees no CUDA device.
pub fn parse_device(s: &str) -> anyhow::Result<tch::Device> {
    let s = s.trim().to_ascii_lowercase();
    let cuda = |i: usize| -> anyhow::Result<Device> {
        let n = tch::Cuda::device_count();
        anyhow::ensure!(
            n > 0,
            "device {s:?}: libtorch sees no CUDA device (is this a CUDA build of libtorch?)"
        );
        anyhow::ensure!(
            (i as i64) < n,
            "device {s:?}: only {n} CUDA device(s) visible"
        );
        Ok(Device::Cuda(i))
    };
    match s.as_str() {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => cuda(i),
            _ => anyhow::bail!("unknown device {s:?}: expected auto, cpu, cuda or cuda:N"),
        },
    }
}

/// Waits for the device's queued work (CUDA); a no-op on the CPU.
pub fn sync_device(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// The optimiser named in the spec over every trainable variable of `vs` (in name order), with
/// PyTorch's default hyper-parameters (see [`optim`]).
pub fn build_optimizer(vs: &nn::VarStore, kind: Optimizer, lr: f64) -> optim::Optimizer {
    let params: std::collections::BTreeMap<String, Tensor> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    build_optimizer_with(&params, kind, &[lr], |_| Some(0))
}

/// Like [`build_optimizer`] over named parameters, each put in the group `group_of(name)`
/// returns (group `i` trains at `lrs[i]`), or left out of the optimiser for `None` (or an index
/// past `lrs`).
pub fn build_optimizer_with(
    params: &std::collections::BTreeMap<String, Tensor>,
    kind: Optimizer,
    lrs: &[f64],
    group_of: impl Fn(&str) -> Option<usize>,
) -> optim::Optimizer {
    let mut opt = optim::Optimizer::new(kind);
    for (i, &lr) in lrs.iter().enumerate() {
        let members = params
            .iter()
            .filter(|(name, _)| group_of(name) == Some(i))
            .map(|(name, t)| (name.clone(), t.shallow_clone()));
        opt.add_group(lr, members);
    }
    opt
}

/// What the training loop needs from one experiment kind. Implementations keep everything on the
/// device and never synchronise with the host in [`Task::step`].
pub trait Task {
    /// Examples in the (limited) training set.
    fn train_len(&self) -> i64;
    /// Examples per step (fixed for the whole run).
    fn batch_size(&self) -> i64;
    /// One optimiser step on the training examples at `idx` (`i64 [batch_size]`, on the device).
    fn step(&mut self, idx: &Tensor) -> Result<(), TchError>;
    /// The training metrics accumulated since the last call (means over the window), read back
    /// in one transfer; resets the window. Empty when no step ran since the last call.
    fn take_window(&mut self) -> Result<Vec<(&'static str, f64)>, TchError>;
    /// Evaluates on the (limited) test set under `no_grad`, read back in one transfer.
    fn evaluate(&mut self) -> Result<Vec<(&'static str, f64)>, TchError>;
    /// The model's parameters (checkpoints save and load these).
    fn var_store(&self) -> &nn::VarStore;
    /// The optimiser (training states save and load its state).
    fn optimizer(&self) -> &optim::Optimizer;
    fn optimizer_mut(&mut self) -> &mut optim::Optimizer;
    /// Called before the first step of every epoch (1-based), for schedules such as freezing
    /// layers during the first epochs.
    fn begin_epoch(&mut self, _epoch: u32) -> Result<(), TchError> {
        Ok(())
    }
    /// Files to store once the last epoch (`epoch`) has ended, besides its checkpoint.
    fn final_artifacts(&mut self, _epoch: u32) -> Result<Vec<ArtifactFile>, TrainError> {
        Ok(Vec::new())
    }
}

/// Two running sums on the device (f64 scalars), read back together in one transfer: a task's
/// training-window accumulators, and the totals of an evaluation pass.
pub struct DeviceSums {
    sums: [Tensor; 2],
}

impl DeviceSums {
    pub fn new(device: Device) -> Result<Self, TchError> {
        let zero = || Tensor::f_zeros([], (Kind::Double, device));
        Ok(Self {
            sums: [zero()?, zero()?],
        })
    }

    /// Adds the scalars `a` and `b` to the sums (no gradient is recorded; no synchronisation).
    pub fn add(&mut self, a: &Tensor, b: &Tensor) -> Result<(), TchError> {
        tch::no_grad(|| -> Result<(), TchError> {
            let _ = self.sums[0].f_add_(a)?;
            let _ = self.sums[1].f_add_(b)?;
            Ok(())
        })
    }

    /// Both sums, in one device-to-host transfer.
    pub fn read(&self) -> Result<[f64; 2], TchError> {
        let both = Tensor::f_stack(&self.sums, 0)?.f_to_device(Device::Cpu)?;
        let v = Vec::<f64>::try_from(&both)?;
        Ok([v[0], v[1]])
    }

    /// Both sums, then sets them to zero.
    pub fn take(&mut self) -> Result<[f64; 2], TchError> {
        let values = self.read()?;
        for sum in &mut self.sums {
            let _ = sum.f_zero_()?;
        }
        Ok(values)
    }
}

/// The seed's MNIST classifier trained with cross-entropy.
pub struct ClassifierTask {
    vs: nn::VarStore,
    model: MnistClassifier,
    opt: optim::Optimizer,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    /// Fixed batch buffers `[B,1,28,28]` and `[B]`, refilled in place every step, so a step's
    /// inputs have static shapes and addresses (CUDA-graph friendly).
    x: Tensor,
    y: Tensor,
    /// The window's sum of mean batch losses and its correct training predictions.
    window: DeviceSums,
    window_steps: i64,
    batch: i64,
}

impl ClassifierTask {
    /// Builds the model (on the data's device, from the current RNG state) and its optimiser.
    /// `data` must hold `f32 [N,1,28,28]` images and `i64 [N]` labels.
    pub fn new(
        data: MnistTensors,
        batch_size: i64,
        optimizer: Optimizer,
        lr: f64,
    ) -> Result<Self, TchError> {
        let device = data.train_images.device();
        let n = data.n_train();
        if n < 1 || data.n_test() < 1 {
            return Err(TchError::Shape(format!(
                "empty data set: {n} training and {} test examples",
                data.n_test()
            )));
        }
        let batch = batch_size.clamp(1, n);
        let vs = nn::VarStore::new(device);
        let model = MnistClassifier::new(&vs.root());
        let opt = build_optimizer(&vs, optimizer, lr);
        let dims = data.train_images.size();
        let mut xdims = dims.clone();
        xdims[0] = batch;
        let x = Tensor::f_zeros(xdims.as_slice(), (data.train_images.kind(), device))?;
        let y = Tensor::f_zeros([batch], (Kind::Int64, device))?;
        Ok(Self {
            vs,
            model,
            opt,
            train_x: data.train_images,
            train_y: data.train_labels,
            test_x: data.test_images,
            test_y: data.test_labels,
            x,
            y,
            window: DeviceSums::new(device)?,
            window_steps: 0,
            batch,
        })
    }

    pub fn model(&self) -> &MnistClassifier {
        &self.model
    }
}

impl Task for ClassifierTask {
    fn train_len(&self) -> i64 {
        self.train_y.size()[0]
    }

    fn batch_size(&self) -> i64 {
        self.batch
    }

    fn step(&mut self, idx: &Tensor) -> Result<(), TchError> {
        let _ = self.train_x.f_index_select_out(&self.x, 0, idx)?;
        let _ = self.train_y.f_index_select_out(&self.y, 0, idx)?;
        self.opt.zero_grad()?;
        let logits = self.model.forward(&self.x)?;
        let loss =
            logits.f_cross_entropy_loss::<Tensor>(&self.y, None, Reduction::Mean, -100, 0.0)?;
        loss.f_backward()?;
        self.opt.step()?;
        let correct = tch::no_grad(|| {
            logits
                .f_argmax(1, false)?
                .f_eq_tensor(&self.y)?
                .f_sum(Kind::Double)
        })?;
        self.window.add(&loss, &correct)?;
        self.window_steps += 1;
        Ok(())
    }

    fn take_window(&mut self) -> Result<Vec<(&'static str, f64)>, TchError> {
        if self.window_steps == 0 {
            return Ok(Vec::new());
        }
        let [loss, correct] = self.window.take()?;
        let steps = self.window_steps as f64;
        self.window_steps = 0;
        Ok(vec![
            (names::TRAIN_LOSS, loss / steps),
            (names::TRAIN_ACCURACY, correct / (steps * self.batch as f64)),
        ])
    }

    fn evaluate(&mut self) -> Result<Vec<(&'static str, f64)>, TchError> {
        let _guard = tch::no_grad_guard();
        let device = self.test_x.device();
        let n = self.test_y.size()[0];
        let mut totals = DeviceSums::new(device)?;
        let mut start = 0;
        while start < n {
            let len = EVAL_BATCH.min(n - start);
            let x = self.test_x.f_narrow(0, start, len)?;
            let y = self.test_y.f_narrow(0, start, len)?;
            let logits = self.model.forward(&x)?;
            let loss =
                logits.f_cross_entropy_loss::<Tensor>(&y, None, Reduction::Sum, -100, 0.0)?;
            let correct = logits
                .f_argmax(1, false)?
                .f_eq_tensor(&y)?
                .f_sum(Kind::Double)?;
            totals.add(&loss, &correct)?;
            start += len;
        }
        let [loss, correct] = totals.read()?;
        Ok(vec![
            (names::TEST_LOSS, loss / n as f64),
            (names::TEST_ACCURACY, correct / n as f64),
        ])
    }

    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn optimizer(&self) -> &optim::Optimizer {
        &self.opt
    }

    fn optimizer_mut(&mut self) -> &mut optim::Optimizer {
        &mut self.opt
    }
}

/// Serialises every seed-then-draw section on libtorch's process-wide generator.
static TORCH_RNG: Mutex<()> = Mutex::new(());

/// Runs `f` right after `tch::manual_seed(seed)`, holding the process-wide RNG lock, so that what
/// `f` draws depends only on `seed`. `f` must not block for long (other jobs wait on the lock).
pub fn seeded<T>(seed: i64, f: impl FnOnce() -> T) -> T {
    let _guard = TORCH_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    tch::manual_seed(seed);
    f()
}

/// Runs `f`, which draws from libtorch's process-wide generator without seeding it, holding the
/// same lock as [`seeded`], so that it cannot draw in the middle of another job's (or test's)
/// seeded section and change what that section draws. The lock is uncontended in a worker, which
/// trains one job at a time.
pub fn unseeded<T>(f: impl FnOnce() -> T) -> T {
    let _guard = TORCH_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    f()
}

/// Mixes the job's seed with the epoch into the seed of that epoch's permutation (splitmix64).
fn epoch_seed(seed: u64, epoch: u32) -> i64 {
    let mut z = seed ^ (u64::from(epoch)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 1) as i64
}

/// Rejects a window whose values are not finite: the run diverged.
fn check_finite(values: &[(&'static str, f64)], step: u64) -> Result<(), TrainError> {
    match values.iter().find(|(_, v)| !v.is_finite()) {
        Some((name, v)) => Err(TrainError::Permanent(format!(
            "diverged: {name} is {v} at step {step}; lower the learning rate"
        ))),
        None => Ok(()),
    }
}

/// Where a run starts: after global step `step` of `total` (0: from the beginning).
fn resume_point(task: &mut dyn Task, state: Option<&TrainingState>, total_steps: u64) -> u64 {
    let Some(state) = state else { return 0 };
    if state.step > total_steps {
        warn!(
            step = state.step,
            total_steps, "training state is past the run's last step; starting from scratch"
        );
        return 0;
    }
    // Every shape is checked before anything is copied, so a refused state leaves the freshly
    // built model as it was.
    if let Err(e) = checkpoint::restore_model(state, task.var_store()) {
        warn!(error = %e, "training state does not fit the model; starting from scratch");
        return 0;
    }
    if let Err(e) = task.optimizer_mut().load_state(&state.optimizer) {
        // The model is already restored; fresh optimiser moments are the lesser evil.
        warn!(error = %e, "optimiser state could not be restored; resuming with fresh moments");
    }
    info!(step = state.step, "resumed from a training state");
    state.step
}

/// Runs `training.epochs` epochs of `task`, or what remains of them after `resume`. See
/// [`Trainer::run`] for what is reported when.
pub fn train_loop(
    task: &mut dyn Task,
    training: &Training,
    device: Device,
    report: &mut dyn FnMut(Event),
    stop: &AtomicBool,
    resume: Option<&TrainingState>,
) -> Result<Outcome, TrainError> {
    let n = task.train_len();
    let b = task.batch_size();
    let steps_per_epoch = (n / b).max(1);
    let per_epoch = steps_per_epoch as u64;
    let total_steps = per_epoch * u64::from(training.epochs);
    let log_every = u64::from(training.log_every_steps.max(1));
    let state_every = training.checkpoint_every_steps.map(u64::from);
    let tch_err = |what: &'static str| move |e: TchError| TrainError::from_tch(what, &e);
    let mut global = resume_point(task, resume, total_steps);
    // The newest step a training state was reported for (the one resumed from counts).
    let mut saved = global;
    let save_state = |task: &dyn Task, step: u64, epoch: u32, report: &mut dyn FnMut(Event)| {
        let bytes =
            checkpoint::training_state_to_safetensors(task.var_store(), task.optimizer(), step)
                .map_err(tch_err("saving a training state"))?;
        report(Event::Artifact(ArtifactFile {
            kind: checkpoint::RESUME_KIND.into(),
            name: checkpoint::resume_file_name(step),
            epoch,
            step,
            bytes,
        }));
        Ok::<(), TrainError>(())
    };
    let first_epoch = (global / per_epoch) as u32 + 1;
    for epoch in first_epoch..=training.epochs {
        let perm = seeded(epoch_seed(training.seed, epoch), || {
            Tensor::f_randperm(n, (Kind::Int64, device))
        })
        .map_err(tch_err("shuffling"))?;
        task.begin_epoch(epoch)
            .map_err(tch_err("starting an epoch"))?;
        let started = Instant::now();
        let first = (global - u64::from(epoch - 1) * per_epoch) as i64;
        for i in first..steps_per_epoch {
            if stop.load(Ordering::Relaxed) {
                if global > saved {
                    save_state(task, global, epoch, report)?;
                }
                return Ok(Outcome::Stopped { step: global });
            }
            let idx = perm
                .f_narrow(0, i * b, b)
                .map_err(tch_err("selecting a batch"))?;
            task.step(&idx).map_err(tch_err("training"))?;
            global += 1;
            let mut points = Vec::new();
            let mut push = |values: Vec<(&'static str, f64)>| {
                points.extend(values.into_iter().map(|(name, value)| Metric {
                    name: name.to_string(),
                    step: global,
                    epoch,
                    value,
                }))
            };
            if global.is_multiple_of(log_every) || global == total_steps {
                let window = task.take_window().map_err(tch_err("reading metrics"))?;
                check_finite(&window, global)?;
                push(window);
            }
            let last_of_epoch = i == steps_per_epoch - 1;
            if last_of_epoch {
                sync_device(device);
                let seconds = started.elapsed().as_secs_f64();
                let eval = task.evaluate().map_err(tch_err("evaluating"))?;
                check_finite(&eval, global)?;
                push(eval);
                let images = ((steps_per_epoch - first) * b) as f64;
                let images_per_s = images / seconds.max(1e-9);
                push(vec![(names::TRAIN_IMAGES_PER_S, images_per_s)]);
                info!(
                    epoch,
                    of = training.epochs,
                    step = global,
                    images_per_s = images_per_s.round(),
                    "epoch finished"
                );
            }
            if !points.is_empty() {
                report(Event::Metrics(points));
            }
            if !last_of_epoch && state_every.is_some_and(|k| global.is_multiple_of(k)) {
                save_state(task, global, epoch, report)?;
                saved = global;
            }
        }
        let bytes =
            checkpoint::to_safetensors(task.var_store()).map_err(tch_err("saving a checkpoint"))?;
        report(Event::Artifact(ArtifactFile {
            kind: checkpoint::KIND.into(),
            name: checkpoint::file_name(epoch),
            epoch,
            step: global,
            bytes,
        }));
        save_state(task, global, epoch, report)?;
        saved = global;
    }
    for mut file in task.final_artifacts(training.epochs)? {
        file.step = global;
        report(Event::Artifact(file));
    }
    Ok(Outcome::Succeeded { final_step: global })
}

/// Owns the data sets loaded on its device, shared by every job it runs.
pub struct Trainer {
    config: TrainerConfig,
    data: DataCache,
}

impl Trainer {
    pub fn new(config: TrainerConfig) -> Self {
        Self {
            config,
            data: DataCache::new(),
        }
    }

    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }

    /// The data sets this trainer has loaded so far.
    pub fn data(&self) -> &DataCache {
        &self.data
    }

    /// Trains `spec` to the end on the calling thread.
    ///
    /// `report` receives, in order:
    /// - [`Event::Metrics`] batches: every `log_every_steps` global steps (and at the last step
    ///   of the run) the window means since the previous window: `train/loss` and
    ///   `train/accuracy` (classifier), `train/loss`, `train/recon`, `train/kl` (CVAE, per
    ///   image); at each epoch's last step, in the same batch, the test metrics (`test/loss`,
    ///   `test/accuracy`; CVAE: `test/loss`, `test/neg_elbo_nats`, `test/bits_per_dim`,
    ///   `test/recon`, `test/kl`) and `train/images_per_s`.
    /// - [`Event::Artifact`]: after each epoch's metrics, its checkpoint (`checkpoint`,
    ///   `epoch-NNN.safetensors`) and a training state (`resume`, `step-NNNNNNNNN.safetensors`);
    ///   a training state also after every `checkpoint_every_steps` global steps; after the last
    ///   epoch, a CVAE's `samples.png` and `reconstructions.png`.
    ///
    /// `stop` is checked before every step; when raised, the run reports a training state of the
    /// step it reached (unless it just did) and returns `Ok(Outcome::Stopped)`. With
    /// `inputs.resume`, the run goes on after the state's step (a state that cannot be read or
    /// does not fit the model is logged and the run starts from scratch).
    /// A transfer job needs `inputs.source_checkpoint` (its absence, or a checkpoint of the wrong
    /// shape, is a permanent error).
    ///
    /// Steps per epoch: `train_examples / batch_size`, the last partial batch dropped; a
    /// training set smaller than one batch is one batch of all of it.
    pub fn run(
        &mut self,
        spec: &JobSpec,
        inputs: &JobInputs,
        report: &mut dyn FnMut(Event),
        stop: &AtomicBool,
    ) -> Result<Outcome, TrainError> {
        match std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.run_inner(spec, inputs, report, stop)
        })) {
            Ok(result) => result,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown panic");
                // A panic escaping libtorch's infallible API is as good as an error from it.
                Err(TrainError::from_tch(
                    "training (panicked)",
                    &TchError::Torch(msg.to_string()),
                ))
            }
        }
    }

    fn run_inner(
        &mut self,
        spec: &JobSpec,
        inputs: &JobInputs,
        report: &mut dyn FnMut(Event),
        stop: &AtomicBool,
    ) -> Result<Outcome, TrainError> {
        let t = &spec.training;
        let device = self.config.device;
        let mut task: Box<dyn Task> = match spec.experiment {
            Experiment::MnistClassifier => {
                let data =
                    self.data
                        .mnist(device, &self.config.data_dir, &self.config.mnist_mirrors)?;
                let data = data
                    .limited(t.max_train_examples, t.max_test_examples)
                    .map_err(|e| TrainError::from_tch("limiting the data set", &e))?;
                let (batch, lr) = (i64::from(t.batch_size), t.learning_rate);
                let task = seeded(t.seed as i64, || {
                    ClassifierTask::new(data, batch, t.optimizer, lr)
                })
                .map_err(|e| TrainError::from_tch("building the model", &e))?;
                Box::new(task)
            }
            Experiment::CifarCvae(ref c) => {
                // Check the source before loading (maybe downloading) any data.
                let source = match &c.init {
                    Init::Random => None,
                    Init::Transfer(tr) => {
                        let bytes = inputs.source_checkpoint.as_deref().ok_or_else(|| {
                            TrainError::Permanent(format!(
                                "transfer from job {} needs that job's checkpoint and none was given (standalone: pass --source-checkpoint FILE)",
                                tr.source_job_id
                            ))
                        })?;
                        Some(SourceLayers::from_checkpoint(bytes)?)
                    }
                };
                let data = self.data.cifar100(
                    device,
                    &self.config.data_dir,
                    &self.config.cifar_mirrors,
                )?;
                let data = data
                    .fine()
                    .limited(t.max_train_examples, t.max_test_examples)
                    .map_err(|e| TrainError::from_tch("limiting the data set", &e))?;
                let config = CvaeConfig::new(c, t);
                Box::new(CvaeTask::new(data, &config, &c.init, source.as_ref())?)
            }
        };
        let resume = inputs.resume.as_deref().and_then(|bytes| {
            checkpoint::read_training_state(bytes)
                .inspect_err(
                    |e| warn!(error = %e, "unreadable training state; starting from scratch"),
                )
                .ok()
        });
        train_loop(task.as_mut(), t, device, report, stop, resume.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_data_dir;
    use crate::model::MnistClassifier;

    fn spec(json_training: &str) -> JobSpec {
        JobSpec::from_json(&format!(
            r#"{{"name":"t","training":{json_training},"mnistClassifier":{{}}}}"#
        ))
        .expect("valid test spec")
    }

    fn trainer() -> Trainer {
        tch::set_num_threads(1);
        Trainer::new(TrainerConfig {
            device: Device::Cpu,
            data_dir: test_data_dir(),
            mnist_mirrors: vec![],
            cifar_mirrors: vec![],
        })
    }

    /// Metric batches only, for callers that look at metrics.
    fn metrics(f: &mut impl FnMut(Vec<Metric>)) -> impl FnMut(Event) + '_ {
        move |e| {
            if let Event::Metrics(b) = e {
                f(b)
            }
        }
    }

    fn values<'a>(points: &'a [Metric], name: &'a str) -> impl Iterator<Item = &'a Metric> + 'a {
        points.iter().filter(move |m| m.name == name)
    }

    #[test]
    fn the_classifier_reaches_90_percent_on_5000_mnist_images_in_two_epochs() {
        let spec = spec(
            r#"{"epochs":2,"batchSize":64,"learningRate":0.001,"optimizer":"OPTIMIZER_ADAM","seed":"1234",
                "maxTrainExamples":5000,"maxTestExamples":1000,"logEverySteps":20}"#,
        );
        let mut t = trainer();
        let mut events: Vec<Event> = Vec::new();
        let outcome = t
            .run(
                &spec,
                &JobInputs::default(),
                &mut |e| events.push(e),
                &AtomicBool::new(false),
            )
            .expect("trains");
        assert!(matches!(outcome, Outcome::Succeeded { .. }), "{outcome:?}");
        // Each epoch's checkpoint follows that epoch's metrics.
        let order: Vec<String> = events
            .iter()
            .map(|e| match e {
                Event::Metrics(b) if b.iter().any(|m| m.name == names::TEST_LOSS) => {
                    format!("eval {}", b[0].epoch)
                }
                Event::Metrics(_) => "window".into(),
                Event::Artifact(a) => format!("{} {} {}", a.kind, a.name, a.epoch),
            })
            .filter(|s| s != "window")
            .collect();
        let last = format!("resume {} 2", checkpoint::resume_file_name(2 * 78));
        assert_eq!(
            order,
            vec![
                "eval 1",
                "checkpoint epoch-001.safetensors 1",
                "resume step-000000078.safetensors 1",
                "eval 2",
                "checkpoint epoch-002.safetensors 2",
                last.as_str(),
            ]
        );
        let Some(last) = events.iter().rev().find_map(|e| match e {
            Event::Artifact(a) if a.kind == checkpoint::KIND => Some(a),
            _ => None,
        }) else {
            panic!("the run stores checkpoints")
        };
        let saved = checkpoint::read_safetensors(&last.bytes).expect("a safetensors checkpoint");
        let names: Vec<&str> = saved.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            vec![
                "conv1.bias",
                "conv1.weight",
                "conv2.bias",
                "conv2.weight",
                "fc1.bias",
                "fc1.weight",
                "fc2.bias",
                "fc2.weight"
            ]
        );
        let batches: Vec<Vec<Metric>> = events
            .into_iter()
            .filter_map(|e| match e {
                Event::Metrics(b) => Some(b),
                Event::Artifact(_) => None,
            })
            .collect();
        let points: Vec<Metric> = batches.iter().flatten().cloned().collect();
        let per_epoch = 5000 / 64;
        let n = 2 * per_epoch as u64;
        assert!(
            points.iter().all(|m| (1..=n).contains(&m.step)),
            "steps within 1..={n}"
        );
        assert_eq!(points.iter().map(|m| m.step).max(), Some(n));

        // Train windows every 20 global steps, plus the last step; each in its epoch.
        let loss_steps: Vec<u64> = values(&points, names::TRAIN_LOSS).map(|m| m.step).collect();
        let mut want: Vec<u64> = (1..=n / 20).map(|k| k * 20).collect();
        want.push(n);
        assert_eq!(loss_steps, want);
        for m in values(&points, names::TRAIN_LOSS) {
            assert_eq!(
                m.epoch,
                if m.step <= per_epoch as u64 { 1 } else { 2 },
                "{m:?}"
            );
            assert!(m.value.is_finite() && m.value > 0.0);
        }
        let acc: Vec<f64> = values(&points, names::TRAIN_ACCURACY)
            .map(|m| m.value)
            .collect();
        assert_eq!(acc.len(), want.len());
        assert!(acc.iter().all(|a| (0.0..=1.0).contains(a)));

        // Epoch metrics at the last step of each epoch, all in one report call per epoch.
        for name in [
            names::TEST_LOSS,
            names::TEST_ACCURACY,
            names::TRAIN_IMAGES_PER_S,
        ] {
            let at: Vec<(u64, u32)> = values(&points, name).map(|m| (m.step, m.epoch)).collect();
            assert_eq!(at, vec![(per_epoch as u64, 1), (n, 2)], "{name}");
        }
        for (epoch, last) in [(1u32, per_epoch as u64), (2, n)] {
            let batch = batches
                .iter()
                .find(|b| {
                    b.iter()
                        .any(|m| m.name == names::TEST_ACCURACY && m.epoch == epoch)
                })
                .expect("epoch batch");
            assert!(batch.iter().all(|m| m.step == last));
            assert!(batch
                .iter()
                .any(|m| m.name == names::TRAIN_IMAGES_PER_S && m.value > 0.0));
        }
        let final_acc = values(&points, names::TEST_ACCURACY)
            .last()
            .expect("final accuracy")
            .value;
        assert!(final_acc >= 0.90, "final test/accuracy {final_acc}");
        let test_loss = values(&points, names::TEST_LOSS)
            .last()
            .expect("loss")
            .value;
        assert!(test_loss < 0.5, "final test/loss {test_loss}");
        assert!(
            t.data().has_mnist(Device::Cpu),
            "data stays cached for the next job"
        );
    }

    #[test]
    fn raising_stop_inside_report_makes_run_return_stopped_promptly() {
        let spec = spec(
            r#"{"epochs":3,"batchSize":64,"learningRate":0.001,"seed":"1","logEverySteps":5}"#,
        );
        let mut t = trainer();
        let stop = AtomicBool::new(false);
        let mut reported = Vec::new();
        let started = Instant::now();
        let outcome = t
            .run(
                &spec,
                &JobInputs::default(),
                &mut |e| {
                    if let Event::Metrics(b) = e {
                        reported.extend(b);
                    }
                    stop.store(true, Ordering::Relaxed);
                },
                &stop,
            )
            .expect("runs");
        assert_eq!(outcome, Outcome::Stopped { step: 5 });
        assert!(
            reported.iter().all(|m| m.step == 5),
            "no step after the stop: {reported:?}"
        );
        assert!(
            started.elapsed().as_secs() < 60,
            "stopped promptly (data loading included)"
        );
    }

    /// Runs `spec` from `resume` (if any), stopping once a metric of step >= `stop_at` arrived;
    /// returns the outcome, every metric point and every artifact.
    fn run_until(
        t: &mut Trainer,
        spec: &JobSpec,
        resume: Option<Vec<u8>>,
        stop_at: u64,
    ) -> (Outcome, Vec<Metric>, Vec<ArtifactFile>) {
        let stop = AtomicBool::new(false);
        let (mut points, mut files) = (Vec::new(), Vec::new());
        let inputs = JobInputs {
            source_checkpoint: None,
            resume,
        };
        let outcome = t
            .run(
                spec,
                &inputs,
                &mut |e| match e {
                    Event::Metrics(b) => {
                        if b.iter().any(|m| m.step >= stop_at) {
                            stop.store(true, Ordering::Relaxed);
                        }
                        points.extend(b);
                    }
                    Event::Artifact(a) => files.push(a),
                },
                &stop,
            )
            .expect("runs");
        (outcome, points, files)
    }

    fn final_checkpoint(files: &[ArtifactFile]) -> std::collections::BTreeMap<String, Tensor> {
        let last = files
            .iter()
            .rev()
            .find(|f| f.kind == checkpoint::KIND)
            .expect("a checkpoint");
        checkpoint::read_safetensors(&last.bytes).expect("reads")
    }

    /// 640 images, batch 32: 20 steps an epoch, 3 epochs; a training state every 7 steps.
    const RESUMABLE: &str = r#"{"epochs":3,"batchSize":32,"learningRate":0.002,"optimizer":"OPTIMIZER_ADAM","seed":"5",
        "maxTrainExamples":640,"maxTestExamples":200,"logEverySteps":4,"checkpointEverySteps":7}"#;

    #[test]
    fn a_run_stopped_and_resumed_from_its_training_state_ends_where_an_uninterrupted_run_ends() {
        let spec = spec(RESUMABLE);
        let mut t = trainer();
        let (straight, straight_points, straight_files) = run_until(&mut t, &spec, None, u64::MAX);
        assert_eq!(straight, Outcome::Succeeded { final_step: 60 });
        // Training states every 7 steps inside an epoch and at every epoch's end, in step order.
        let states: Vec<(u64, u32)> = straight_files
            .iter()
            .filter(|f| f.kind == checkpoint::RESUME_KIND)
            .map(|f| (f.step, f.epoch))
            .collect();
        assert_eq!(
            states,
            [
                (7, 1),
                (14, 1),
                (20, 1),
                (21, 2),
                (28, 2),
                (35, 2),
                (40, 2),
                (42, 3),
                (49, 3),
                (56, 3),
                (60, 3)
            ]
        );

        // Stop in the middle of epoch 2 (the stop is seen before step 33), resume from the state
        // the stop wrote.
        let (stopped, first_points, first_files) = run_until(&mut t, &spec, None, 32);
        assert_eq!(stopped, Outcome::Stopped { step: 32 });
        let state = first_files
            .iter()
            .rev()
            .find(|f| f.kind == checkpoint::RESUME_KIND)
            .expect("a training state at the stop");
        assert_eq!(
            (state.step, state.epoch, state.name.as_str()),
            (32, 2, "step-000000032.safetensors")
        );
        let (resumed, points, files) =
            run_until(&mut t, &spec, Some(state.bytes.clone()), u64::MAX);
        assert_eq!(resumed, Outcome::Succeeded { final_step: 60 });
        let first_step = points.iter().map(|m| m.step).min().expect("points");
        assert_eq!(
            first_step, 36,
            "the first window after step 32 ends at step 36"
        );
        // Together the two attempts report exactly the uninterrupted run's train/loss steps.
        let steps = |pts: &[Metric]| -> Vec<u64> {
            pts.iter()
                .filter(|m| m.name == names::TRAIN_LOSS)
                .map(|m| m.step)
                .collect()
        };
        let mut joined = steps(&first_points);
        joined.extend(steps(&points));
        assert_eq!(joined, steps(&straight_points));
        // Same data order and optimiser state: the same final weights (one CPU thread).
        let (a, b) = (final_checkpoint(&straight_files), final_checkpoint(&files));
        for (name, t) in &a {
            let diff = f64::try_from((t - &b[name]).abs().max()).expect("scalar");
            assert!(diff < 1e-5, "{name} differs by {diff} after resuming");
        }
    }

    #[test]
    fn a_training_state_of_the_last_step_finishes_without_training_and_a_bad_one_starts_over() {
        let spec = spec(RESUMABLE);
        let mut t = trainer();
        let (_, _, files) = run_until(&mut t, &spec, None, u64::MAX);
        let last = files
            .iter()
            .rev()
            .find(|f| f.kind == checkpoint::RESUME_KIND)
            .expect("final training state");
        assert_eq!(last.step, 60);
        let (outcome, points, _) = run_until(&mut t, &spec, Some(last.bytes.clone()), u64::MAX);
        assert_eq!(outcome, Outcome::Succeeded { final_step: 60 });
        assert!(points.is_empty(), "nothing left to train: {points:?}");

        let (outcome, points, _) = run_until(&mut t, &spec, Some(b"garbage".to_vec()), u64::MAX);
        assert_eq!(outcome, Outcome::Succeeded { final_step: 60 });
        assert_eq!(
            points.iter().map(|m| m.step).min(),
            Some(4),
            "started from scratch"
        );
    }

    #[test]
    fn the_same_seed_gives_the_same_first_window_loss() {
        let first_loss = |t: &mut Trainer, seed: u64| -> f64 {
            let spec = spec(&format!(
                r#"{{"epochs":1,"batchSize":32,"learningRate":0.001,"seed":"{seed}","maxTrainExamples":640,
                    "maxTestExamples":100,"logEverySteps":10}}"#
            ));
            let stop = AtomicBool::new(false);
            let mut loss = None;
            t.run(
                &spec,
                &JobInputs::default(),
                &mut metrics(&mut |b: Vec<Metric>| {
                    if loss.is_none() {
                        loss = b
                            .iter()
                            .find(|m| m.name == names::TRAIN_LOSS)
                            .map(|m| m.value);
                    }
                    stop.store(true, Ordering::Relaxed);
                }),
                &stop,
            )
            .expect("runs");
            loss.expect("a first window")
        };
        let mut t = trainer();
        let a = first_loss(&mut t, 7);
        let b = first_loss(&mut t, 7);
        let c = first_loss(&mut t, 8);
        assert_eq!(a.to_bits(), b.to_bits(), "same seed, same loss: {a} vs {b}");
        assert_ne!(a, c, "another seed gives another loss");
    }

    #[test]
    fn a_training_set_smaller_than_a_batch_is_one_batch_per_epoch() {
        let spec = spec(
            r#"{"epochs":2,"batchSize":256,"learningRate":0.001,"optimizer":"OPTIMIZER_SGD","maxTrainExamples":100,
                "maxTestExamples":10,"logEverySteps":1}"#,
        );
        let mut t = trainer();
        let mut points = Vec::new();
        t.run(
            &spec,
            &JobInputs::default(),
            &mut metrics(&mut |b| points.extend(b)),
            &AtomicBool::new(false),
        )
        .expect("runs");
        let steps: Vec<(u64, u32)> = values(&points, names::TEST_ACCURACY)
            .map(|m| (m.step, m.epoch))
            .collect();
        assert_eq!(steps, vec![(1, 1), (2, 2)]);
        let ips = values(&points, names::TRAIN_IMAGES_PER_S).count();
        assert_eq!(ips, 2);
    }

    #[test]
    fn adamw_trains_too() {
        let spec = spec(
            r#"{"epochs":1,"batchSize":50,"learningRate":0.001,"optimizer":"OPTIMIZER_ADAMW","maxTrainExamples":200,
                "maxTestExamples":50,"logEverySteps":2}"#,
        );
        let mut points = Vec::new();
        trainer()
            .run(
                &spec,
                &JobInputs::default(),
                &mut metrics(&mut |b| points.extend(b)),
                &AtomicBool::new(false),
            )
            .expect("runs");
        assert_eq!(values(&points, names::TRAIN_LOSS).count(), 2);
    }

    #[test]
    fn missing_data_without_mirrors_is_retryable_and_names_the_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut t = Trainer::new(TrainerConfig {
            device: Device::Cpu,
            data_dir: dir.path().to_path_buf(),
            mnist_mirrors: vec![],
            cifar_mirrors: vec![],
        });
        let spec = spec(r#"{"epochs":1,"batchSize":8,"learningRate":0.001}"#);
        let err = t
            .run(
                &spec,
                &JobInputs::default(),
                &mut |_| {},
                &AtomicBool::new(false),
            )
            .expect_err("no data");
        assert!(!err.is_permanent(), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("train-images-idx3-ubyte.gz") && msg.contains("t10k-labels-idx1-ubyte.gz"),
            "{msg}"
        );
        assert!(
            msg.contains(&dir.path().join("mnist").display().to_string()),
            "{msg}"
        );
    }

    fn cvae_trainer(data_dir: &std::path::Path) -> Trainer {
        tch::set_num_threads(1);
        Trainer::new(TrainerConfig {
            device: Device::Cpu,
            data_dir: data_dir.to_path_buf(),
            mnist_mirrors: vec![],
            cifar_mirrors: vec![],
        })
    }

    fn cvae_spec(training: &str, cvae: &str) -> JobSpec {
        JobSpec::from_json(&format!(
            r#"{{"name":"cvae","training":{training},"cifarCvae":{cvae}}}"#
        ))
        .expect("valid cvae spec")
    }

    fn collect(
        t: &mut Trainer,
        spec: &JobSpec,
        inputs: &JobInputs,
    ) -> (Result<Outcome, TrainError>, Vec<Metric>, Vec<ArtifactFile>) {
        let (mut points, mut files) = (Vec::new(), Vec::new());
        let result = t.run(
            spec,
            inputs,
            &mut |e| match e {
                Event::Metrics(b) => points.extend(b),
                Event::Artifact(a) => files.push(a),
            },
            &AtomicBool::new(false),
        );
        (result, points, files)
    }

    /// The issue's acceptance criterion on generated CIFAR-100 (data::synth): Adam at 1e-3, batch
    /// 64, seed 1, 2,000 training and 500 test images, ten epochs; the test negative ELBO after
    /// the last epoch is at most 0.9 times the one after the first. (Measured alone: 2070 -> 1590
    /// nats for seed 1, ratios 0.69-0.77 over seeds 1-3; the first five epochs improve slowly, so
    /// with fewer epochs the margin gets thin: 0.82-0.84 after eight.)
    #[test]
    fn the_cvae_on_generated_cifar_cuts_its_test_neg_elbo_by_a_tenth() {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::data::synth::write_cifar100(dir.path(), 2000, 500, 7).expect("generated data");
        let mut t = cvae_trainer(dir.path());
        let spec = cvae_spec(
            r#"{"epochs":10,"batchSize":64,"learningRate":0.001,"optimizer":"OPTIMIZER_ADAM","seed":"1",
                "logEverySteps":10}"#,
            "{}",
        );
        let started = Instant::now();
        let (result, points, files) = collect(&mut t, &spec, &JobInputs::default());
        let outcome = result.expect("trains");
        assert!(matches!(outcome, Outcome::Succeeded { .. }), "{outcome:?}");
        let per_epoch = 2000 / 64;
        let epochs = 10u32;
        let n = u64::from(epochs) * per_epoch as u64;
        let nelbo: Vec<(u64, u32, f64)> = values(&points, names::TEST_NEG_ELBO_NATS)
            .map(|m| (m.step, m.epoch, m.value))
            .collect();
        eprintln!(
            "cvae on generated cifar: test/neg_elbo_nats per epoch {:?} in {:.1} s",
            nelbo.iter().map(|v| v.2).collect::<Vec<_>>(),
            started.elapsed().as_secs_f64()
        );
        let steps: Vec<(u64, u32)> = nelbo.iter().map(|v| (v.0, v.1)).collect();
        let want: Vec<(u64, u32)> = (1..=epochs)
            .map(|e| (u64::from(e) * per_epoch as u64, e))
            .collect();
        assert_eq!(steps, want, "epoch metrics at each epoch's last step");
        let (first, last) = (nelbo[0].2, nelbo[nelbo.len() - 1].2);
        assert!(last <= 0.9 * first, "test/neg_elbo_nats {first} -> {last}");
        for name in [
            names::TEST_LOSS,
            names::TEST_BITS_PER_DIM,
            names::TEST_RECON,
            names::TEST_KL,
            names::TRAIN_IMAGES_PER_S,
        ] {
            let at: Vec<(u64, u32)> = values(&points, name).map(|m| (m.step, m.epoch)).collect();
            assert_eq!(at, want, "{name}");
        }
        let mut window_steps: Vec<u64> = (1..=n / 10).map(|k| k * 10).collect();
        if !n.is_multiple_of(10) {
            window_steps.push(n);
        }
        for name in [names::TRAIN_LOSS, names::TRAIN_RECON, names::TRAIN_KL] {
            let at: Vec<u64> = values(&points, name).map(|m| m.step).collect();
            assert_eq!(at, window_steps, "{name}");
        }
        let got: Vec<(&str, &str, u32)> = files
            .iter()
            .map(|f| (f.kind.as_str(), f.name.as_str(), f.epoch))
            .collect();
        let mut want_files: Vec<(String, String, u32)> = (1..=epochs)
            .flat_map(|e| {
                [
                    ("checkpoint".into(), format!("epoch-{e:03}.safetensors"), e),
                    (
                        "resume".into(),
                        checkpoint::resume_file_name(u64::from(e) * per_epoch as u64),
                        e,
                    ),
                ]
            })
            .collect();
        want_files.push(("samples".into(), "samples.png".into(), epochs));
        want_files.push((
            "reconstructions".into(),
            "reconstructions.png".into(),
            epochs,
        ));
        let got: Vec<(String, String, u32)> = got
            .into_iter()
            .map(|(k, n, e)| (k.to_string(), n.to_string(), e))
            .collect();
        assert_eq!(got, want_files);
        assert!(t.data().has_cifar100(Device::Cpu), "cifar stays cached");
    }

    #[test]
    fn a_transfer_cvae_trains_from_a_classifier_checkpoint_and_needs_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::data::synth::write_cifar100(dir.path(), 64, 16, 3).expect("generated data");
        let mut t = cvae_trainer(dir.path());
        let source_vs = nn::VarStore::new(Device::Cpu);
        seeded(21, || {
            let _ = MnistClassifier::new(&source_vs.root());
        });
        let source = checkpoint::to_safetensors(&source_vs).expect("source checkpoint");
        let training = r#"{"epochs":2,"batchSize":16,"learningRate":0.001,"logEverySteps":2}"#;
        let spec = cvae_spec(
            training,
            r#"{"latentDim":8,"beta":0.5,"init":{"transfer":{"sourceJobId":"0193a5b2-7c4d-7e8f-9a0b-1c2d3e4f5a6b",
                "conv1":"CONV1_ADAPTATION_REPLICATE_THIRD","copyConv2":true,"freeze":{"wholeRun":true}}}}"#,
        );
        let inputs = JobInputs {
            source_checkpoint: Some(source),
            resume: None,
        };
        let (result, points, files) = collect(&mut t, &spec, &inputs);
        let outcome = result.expect("trains");
        assert!(matches!(outcome, Outcome::Succeeded { .. }), "{outcome:?}");
        assert_eq!(values(&points, names::TEST_NEG_ELBO_NATS).count(), 2);
        let last = files
            .iter()
            .rfind(|f| f.kind == checkpoint::KIND)
            .expect("a checkpoint");
        let saved = checkpoint::read_safetensors(&last.bytes).expect("reads");
        let src = source_vs.variables();
        assert!(
            saved["conv2.weight"].equal(&src["conv2.weight"]),
            "frozen conv2 is the source's"
        );
        assert!(saved["conv1.weight"]
            .narrow(1, 2, 1)
            .equal(&(&src["conv1.weight"] / 3.0)));
        assert_eq!(saved["fc_mu.weight"].size(), [8, 2048]);

        let (result, _, _) = collect(&mut t, &spec, &JobInputs::default());
        let err = result.expect_err("no source checkpoint");
        assert!(
            err.is_permanent() && err.to_string().contains("needs that job's checkpoint"),
            "{err}"
        );

        let cvae_vs = nn::VarStore::new(Device::Cpu);
        let _ = crate::model::Cvae::new(&cvae_vs.root(), 20);
        let wrong = JobInputs {
            source_checkpoint: Some(checkpoint::to_safetensors(&cvae_vs).expect("bytes")),
            resume: None,
        };
        let (result, _, _) = collect(&mut t, &spec, &wrong);
        let err = result.expect_err("a cvae is not a classifier");
        assert!(
            err.is_permanent() && err.to_string().contains("[32, 3, 3, 3]"),
            "{err}"
        );

        let random = cvae_spec(training, r#"{"latentDim":8}"#);
        let (result, points, _) = collect(&mut t, &random, &JobInputs::default());
        let outcome = result.expect("random init trains");
        assert!(matches!(outcome, Outcome::Succeeded { .. }), "{outcome:?}");
        assert_eq!(values(&points, names::TEST_BITS_PER_DIM).count(), 2);
    }

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

    #[test]
    fn a_non_finite_window_is_a_permanent_divergence() {
        assert!(check_finite(&[(names::TRAIN_LOSS, 0.3)], 5).is_ok());
        let err = check_finite(&[(names::TRAIN_LOSS, f64::NAN)], 5).expect_err("nan");
        assert!(
            err.is_permanent() && err.to_string().starts_with("diverged: train/loss"),
            "{err}"
        );
        assert!(check_finite(&[(names::TEST_LOSS, f64::INFINITY)], 5).is_err());
    }

    #[test]
    fn devices_parse() {
        assert_eq!(parse_device("cpu").expect("cpu"), Device::Cpu);
        assert_eq!(parse_device(" CPU ").expect("cpu"), Device::Cpu);
        parse_device("auto").expect("auto always parses");
        assert!(parse_device("tpu").is_err());
        assert!(parse_device("cuda:x").is_err());
        if !tch::Cuda::is_available() {
            let err = parse_device("cuda:0")
                .expect_err("no cuda here")
                .to_string();
            assert!(err.contains("no CUDA device"), "{err}");
        }
    }

    #[test]
    fn epoch_seeds_differ_per_epoch_and_seed() {
        assert_ne!(epoch_seed(1, 1), epoch_seed(1, 2));
        assert_ne!(epoch_seed(1, 1), epoch_seed(2, 1));
        assert!(epoch_seed(u64::MAX, 1000) >= 0);
    }
}
