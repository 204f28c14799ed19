//! An executor thread: the OS thread on which one slot of this worker trains (a worker with
//! `--slots N` has N of them, each running one job at a time).
//!
//! The async agent hands it assignments over a channel; it runs each to the end with its
//! [`Trainer`] (whose data sets on the device are shared by every slot and kept between jobs) and
//! answers on a oneshot.
//! What the run reports (metric batches, artifacts) travels back as [`Event`]s over an unbounded
//! channel, in order. Training never runs on the async runtime
//! and no tensor leaves this thread (invariant 7). A panic inside training becomes a permanent
//! job failure, never a dead worker.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use proto::spec::JobSpec;
use tokio::sync::{mpsc, oneshot};

use crate::train::trainer::{SharedData, Trainer, TrainerConfig};
use crate::train::{Event, JobInputs, Outcome, TrainError};

/// One job handed to the executor.
pub struct Assignment {
    pub spec: JobSpec,
    /// What the agent fetched for the job (a transfer's source checkpoint).
    pub inputs: JobInputs,
    /// Raised by the agent to stop training at the next step boundary.
    pub stop: Arc<AtomicBool>,
    pub events: mpsc::UnboundedSender<Event>,
    pub done: oneshot::Sender<Result<Outcome, TrainError>>,
    /// The job's log span (its id and attempt), entered on the executor thread for the run.
    pub span: tracing::Span,
}

/// Handle to an executor thread; dropping it ends the thread after its current job.
pub struct Executor {
    tx: std::sync::mpsc::Sender<Assignment>,
}

impl Executor {
    /// One executor with data sets of its own (a worker with one slot, and tests).
    pub fn spawn(config: TrainerConfig, torch_threads: i32) -> std::io::Result<Self> {
        Self::spawn_slot(0, config, torch_threads, SharedData::default())
    }

    /// The executor of slot `slot`, loading into and reading from the worker's shared `data`.
    /// `torch_threads` > 0 sets libtorch's intra-op threads for this thread's work (0 leaves
    /// libtorch's default, every core).
    pub fn spawn_slot(
        slot: usize,
        config: TrainerConfig,
        torch_threads: i32,
        data: SharedData,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Assignment>();
        std::thread::Builder::new()
            .name(format!("trainq-executor-{slot}"))
            .spawn(move || {
                if torch_threads > 0 {
                    tch::set_num_threads(torch_threads);
                }
                if matches!(config.device, tch::Device::Cuda(_)) {
                    // Each slot's kernels on a stream of its own, so jobs overlap on the GPU.
                    if let Err(e) = crate::shim::use_pool_stream(config.device) {
                        tracing::warn!(slot, error = %e, "slot stays on the default CUDA stream");
                    }
                }
                let mut trainer = Trainer::sharing(config, data);
                for job in rx {
                    let _in_job = job.span.enter();
                    let result =
                        run_one(&mut trainer, &job.spec, &job.inputs, &job.events, &job.stop);
                    let _ = job.done.send(result);
                }
            })?;
        Ok(Self { tx })
    }

    pub fn submit(&self, assignment: Assignment) -> anyhow::Result<()> {
        self.tx
            .send(assignment)
            .map_err(|_| anyhow::anyhow!("executor thread has stopped"))
    }
}

fn run_one(
    trainer: &mut Trainer,
    spec: &JobSpec,
    inputs: &JobInputs,
    events: &mpsc::UnboundedSender<Event>,
    stop: &AtomicBool,
) -> Result<Outcome, TrainError> {
    let mut report = |event: Event| {
        let _ = events.send(event);
    };
    // Trainer::run turns a panic inside libtorch into a TrainError itself.
    trainer.run(spec, inputs, &mut report, stop)
}
