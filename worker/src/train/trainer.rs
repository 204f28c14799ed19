//! [`Trainer`]: runs one validated job spec to the end on the calling thread, picking the task
//! for its experiment (classifier or CVAE, with a transfer's source layers checked first) and
//! handing it to [`train_loop`]. Owns the data sets loaded on its device.
//!
//! Must never be called from the async runtime, and does no network I/O besides downloading a
//! missing data set.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use proto::spec::{Experiment, Init, JobSpec};
use tch::TchError;
use tracing::warn;

use super::classifier::ClassifierTask;
use super::cvae::{CvaeConfig, CvaeTask};
use super::transfer::SourceLayers;
use super::{seeded, train_loop, Event, JobInputs, Outcome, Task, TrainError};
use crate::checkpoint;
use crate::data::DataCache;

/// Where the trainer trains and where its data sets come from.
#[derive(Debug, Clone)]
pub struct TrainerConfig {
    pub device: tch::Device,
    pub data_dir: PathBuf,
    pub mnist_mirrors: Vec<String>,
    /// Base URLs tried in order when CIFAR-100 is missing from the data dir.
    pub cifar_mirrors: Vec<String>,
}

/// The data sets loaded on the device, shared by every trainer of one worker (one per slot):
/// each set is loaded once, under the lock, and every job gets new handles to the same memory.
pub type SharedData = Arc<Mutex<DataCache>>;

/// Runs jobs on one thread; the data sets it loads are shared with the trainers it was made with
/// ([`Trainer::sharing`]).
pub struct Trainer {
    config: TrainerConfig,
    data: SharedData,
}

impl Trainer {
    pub fn new(config: TrainerConfig) -> Self {
        Self::sharing(config, SharedData::default())
    }

    /// A trainer whose data sets are `data`'s (the worker's other slots load into it too).
    pub fn sharing(config: TrainerConfig, data: SharedData) -> Self {
        Self { config, data }
    }

    pub fn config(&self) -> &TrainerConfig {
        &self.config
    }

    /// The data sets loaded so far (by this trainer or one sharing them).
    pub fn data(&self) -> MutexGuard<'_, DataCache> {
        lock_data(&self.data)
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
                let data = lock_data(&self.data)
                    .mnist(device, &self.config.data_dir, &self.config.mnist_mirrors)?
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
                let data = lock_data(&self.data)
                    .cifar100(device, &self.config.data_dir, &self.config.cifar_mirrors)?
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

/// Locks the shared data sets, ignoring poisoning: a panic while loading leaves the set unloaded,
/// never half-inserted (the map entry is written only with a loaded set).
fn lock_data(data: &SharedData) -> MutexGuard<'_, DataCache> {
    data.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_data_dir;
    use crate::model::MnistClassifier;
    use crate::train::{ArtifactFile, Metric};
    use proto::metric;
    use std::sync::atomic::Ordering;
    use std::time::Instant;
    use tch::{nn, Device, Tensor};

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
                Event::Metrics(b) if b.iter().any(|m| m.name == metric::TEST_LOSS) => {
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
        let loss_steps: Vec<u64> = values(&points, metric::TRAIN_LOSS)
            .map(|m| m.step)
            .collect();
        let mut want: Vec<u64> = (1..=n / 20).map(|k| k * 20).collect();
        want.push(n);
        assert_eq!(loss_steps, want);
        for m in values(&points, metric::TRAIN_LOSS) {
            assert_eq!(
                m.epoch,
                if m.step <= per_epoch as u64 { 1 } else { 2 },
                "{m:?}"
            );
            assert!(m.value.is_finite() && m.value > 0.0);
        }
        let acc: Vec<f64> = values(&points, metric::TRAIN_ACCURACY)
            .map(|m| m.value)
            .collect();
        assert_eq!(acc.len(), want.len());
        assert!(acc.iter().all(|a| (0.0..=1.0).contains(a)));

        // Epoch metrics at the last step of each epoch, all in one report call per epoch.
        for name in [
            metric::TEST_LOSS,
            metric::TEST_ACCURACY,
            metric::TRAIN_IMAGES_PER_S,
        ] {
            let at: Vec<(u64, u32)> = values(&points, name).map(|m| (m.step, m.epoch)).collect();
            assert_eq!(at, vec![(per_epoch as u64, 1), (n, 2)], "{name}");
        }
        for (epoch, last) in [(1u32, per_epoch as u64), (2, n)] {
            let batch = batches
                .iter()
                .find(|b| {
                    b.iter()
                        .any(|m| m.name == metric::TEST_ACCURACY && m.epoch == epoch)
                })
                .expect("epoch batch");
            assert!(batch.iter().all(|m| m.step == last));
            assert!(batch
                .iter()
                .any(|m| m.name == metric::TRAIN_IMAGES_PER_S && m.value > 0.0));
        }
        let final_acc = values(&points, metric::TEST_ACCURACY)
            .last()
            .expect("final accuracy")
            .value;
        assert!(final_acc >= 0.90, "final test/accuracy {final_acc}");
        let test_loss = values(&points, metric::TEST_LOSS)
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
                .filter(|m| m.name == metric::TRAIN_LOSS)
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
                            .find(|m| m.name == metric::TRAIN_LOSS)
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
        let steps: Vec<(u64, u32)> = values(&points, metric::TEST_ACCURACY)
            .map(|m| (m.step, m.epoch))
            .collect();
        assert_eq!(steps, vec![(1, 1), (2, 2)]);
        let ips = values(&points, metric::TRAIN_IMAGES_PER_S).count();
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
        assert_eq!(values(&points, metric::TRAIN_LOSS).count(), 2);
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

    /// What `--slots` relies on: a job trains to bit-identical metric points whether it runs
    /// alone or beside another CVAE on a second thread sharing its data sets (their noise draws
    /// interleave on libtorch's one generator, each under its own step seeds).
    #[test]
    fn a_cvae_trains_bit_identically_alone_and_beside_another_job_sharing_its_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        crate::data::synth::write_cifar100(dir.path(), 96, 32, 5).expect("generated data");
        let training = |seed: u32| {
            format!(
                r#"{{"epochs":2,"batchSize":16,"learningRate":0.001,"seed":"{seed}","logEverySteps":2}}"#
            )
        };
        let (a, b) = (cvae_spec(&training(5), "{}"), cvae_spec(&training(6), "{}"));
        // Every point but the timing, with its value's exact bits.
        let exact = |points: Vec<Metric>| -> Vec<(String, u64, u64)> {
            points
                .into_iter()
                .filter(|m| m.name != metric::TRAIN_IMAGES_PER_S)
                .map(|m| (m.name, m.step, m.value.to_bits()))
                .collect()
        };
        let (result, alone, _) = collect(&mut cvae_trainer(dir.path()), &a, &JobInputs::default());
        result.expect("trains alone");
        let alone = exact(alone);
        assert!(alone.len() > 20, "{} points", alone.len());

        let shared = SharedData::default();
        let config = cvae_trainer(dir.path()).config().clone();
        let run = |spec: &JobSpec| {
            let mut t = Trainer::sharing(config.clone(), shared.clone());
            let (result, points, _) = collect(&mut t, spec, &JobInputs::default());
            result.expect("trains beside another job");
            exact(points)
        };
        let (beside, other) = std::thread::scope(|scope| {
            let first = scope.spawn(|| run(&a));
            let second = scope.spawn(|| run(&b));
            (
                first.join().expect("first thread"),
                second.join().expect("second thread"),
            )
        });
        assert_eq!(beside, alone, "the same points, bit for bit");
        assert_ne!(
            other, alone,
            "the other job (another seed) trained differently"
        );
        assert!(
            lock_data(&shared).has_cifar100(Device::Cpu),
            "one shared copy"
        );
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
        let nelbo: Vec<(u64, u32, f64)> = values(&points, metric::TEST_NEG_ELBO_NATS)
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
            metric::TEST_LOSS,
            metric::TEST_BITS_PER_DIM,
            metric::TEST_RECON,
            metric::TEST_KL,
            metric::TRAIN_IMAGES_PER_S,
        ] {
            let at: Vec<(u64, u32)> = values(&points, name).map(|m| (m.step, m.epoch)).collect();
            assert_eq!(at, want, "{name}");
        }
        let mut window_steps: Vec<u64> = (1..=n / 10).map(|k| k * 10).collect();
        if !n.is_multiple_of(10) {
            window_steps.push(n);
        }
        for name in [metric::TRAIN_LOSS, metric::TRAIN_RECON, metric::TRAIN_KL] {
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
        assert_eq!(values(&points, metric::TEST_NEG_ELBO_NATS).count(), 2);
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
        assert_eq!(values(&points, metric::TEST_BITS_PER_DIM).count(), 2);
    }
}
