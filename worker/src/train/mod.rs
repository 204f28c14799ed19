//! The training engine: runs one validated job spec to the end on the calling OS thread.
//!
//! [`trainer::Trainer::run`] is one generic loop over a [`Task`], one per experiment kind: the seed's MNIST
//! classifier ([`classifier::ClassifierTask`]) and its CIFAR-100 CVAE ([`cvae::CvaeTask`], from random
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
//! [`cvae`].)
//!
//! Layout: this module holds the loop ([`train_loop`]), the [`Task`] trait and what tasks share
//! (optimiser building, [`DeviceSums`]); [`event`], [`rng`] and [`device`] are leaves every part
//! uses; [`classifier`], [`cvae`] and [`transfer`] are the tasks and the transfer
//! initialisation; [`trainer`] picks the task for a spec. This module must not import the tasks
//! or the trainer (they import it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use proto::metric;
use proto::spec::{Optimizer, Training};
use tch::nn;
use tch::{Device, Kind, TchError, Tensor};
use tracing::{info, warn};

use crate::checkpoint::{self, TrainingState};
use crate::optim;

pub mod classifier;
pub mod cvae;
pub mod device;
pub mod event;
pub mod rng;
pub mod step;
pub mod trainer;
pub mod transfer;

pub use device::{parse_device, sync_device};
pub use event::{ArtifactFile, Event, JobInputs, Metric, Outcome, TrainError};
pub use rng::{epoch_seed, seeded, step_seed, unseeded};
pub use step::{StepPlan, Stepper};

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
    /// The host side of one optimiser step on the training examples at `idx` (`i64
    /// [batch_size]`, on the device): copies the batch into the task's fixed buffers, draws the
    /// step's noise into its fixed buffer, counts the step in the metric window. `step` is the
    /// global step number (1-based), which seeds any noise it draws ([`step_seed`]). Everything
    /// [`Task::compute`] reads is in place afterwards.
    fn prepare(&mut self, idx: &Tensor, step: u64) -> Result<(), TchError>;
    /// The optimiser step on the prepared buffers: gradients zeroed in place, forward, backward,
    /// the optimiser's update and the metric accumulators. Device work only: no host
    /// synchronisation and no host-side state, so a CUDA graph can capture it once and replay it
    /// ([`step::Stepper`]).
    fn compute(&mut self) -> Result<(), TchError>;
    /// One eager step: [`Task::prepare`] then [`Task::compute`].
    fn step(&mut self, idx: &Tensor, step: u64) -> Result<(), TchError> {
        self.prepare(idx, step)?;
        self.compute()
    }
    /// Puts the convolution weights and the fixed image buffers in channels_last (CUDA plans).
    fn use_channels_last(&mut self) -> Result<(), TchError>;
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
    /// layers during the first epochs. True when the set of trained parameters changed (a
    /// captured step must be captured again).
    fn begin_epoch(&mut self, _epoch: u32) -> Result<bool, TchError> {
        Ok(false)
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
/// [`trainer::Trainer::run`] for what is reported when.
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
    let mut stepper = Stepper::new(
        task,
        StepPlan::for_device(device, training.precision),
        device,
    )
    .map_err(tch_err("preparing the training step"))?;
    let first_epoch = (global / per_epoch) as u32 + 1;
    for epoch in first_epoch..=training.epochs {
        let perm = seeded(epoch_seed(training.seed, epoch), || {
            Tensor::f_randperm(n, (Kind::Int64, device))
        })
        .map_err(tch_err("shuffling"))?;
        if task
            .begin_epoch(epoch)
            .map_err(tch_err("starting an epoch"))?
        {
            stepper.invalidate();
        }
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
            stepper
                .step(task, &idx, global + 1)
                .map_err(tch_err("training"))?;
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
                let eval = stepper.evaluate(task).map_err(tch_err("evaluating"))?;
                check_finite(&eval, global)?;
                push(eval);
                let images = ((steps_per_epoch - first) * b) as f64;
                let images_per_s = images / seconds.max(1e-9);
                let flag = |on: bool| if on { 1.0 } else { 0.0 };
                push(vec![
                    (metric::TRAIN_IMAGES_PER_S, images_per_s),
                    (metric::TRAIN_GRAPH, flag(stepper.replaying())),
                    (metric::TRAIN_BF16, flag(stepper.plan().bf16)),
                ]);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_finite_window_is_a_permanent_divergence() {
        assert!(check_finite(&[(metric::TRAIN_LOSS, 0.3)], 5).is_ok());
        let err = check_finite(&[(metric::TRAIN_LOSS, f64::NAN)], 5).expect_err("nan");
        assert!(
            err.is_permanent() && err.to_string().starts_with("diverged: train/loss"),
            "{err}"
        );
        assert!(check_finite(&[(metric::TEST_LOSS, f64::INFINITY)], 5).is_err());
    }
}
