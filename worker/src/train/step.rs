//! How a task's optimiser steps run on the device: the [`StepPlan`] (precision, CUDA graph,
//! memory format) and the [`Stepper`] that carries it out.
//!
//! Every path runs the same two task functions: [`Task::prepare`] (the host side of a step: copy
//! the batch into the fixed buffers, draw the step's noise, count the step) and [`Task::compute`]
//! (device work only: zero the gradients in place, forward, backward, the optimiser's update and
//! the metric accumulators). Eagerly, a step is `prepare` then `compute`. With a CUDA graph, the
//! first [`WARMUP_STEPS`] steps run `compute` eagerly on a side stream (allocating the gradients
//! and optimiser moments), the next one captures `compute` into the graph and replays it, and
//! every later step is `prepare` then one replay. If anything in warm-up or capture fails, the
//! stepper says why in one log line and goes on eagerly: the step that failed is then computed
//! eagerly, so no step is lost or run twice (a capture runs nothing by itself).
//!
//! Precision: bf16 is autocast (convolutions and matrix products in bfloat16; parameters,
//! gradients and optimiser state stay fp32), around `compute` and evaluation alike.
//! `training.precision: auto` means bf16 on a CUDA GPU with bf16 (compute capability >= 8.0)
//! and fp32 otherwise, so on a CPU a job trains exactly as in fp32. On CUDA, channels_last and
//! cuDNN's benchmark mode are on as well.
//!
//! Must not know about the training loop's schedule (epochs, reports): `train_loop` and the
//! benchmark drive it.

use proto::spec::Precision;
use tch::{Device, Kind, TchError, Tensor};
use tracing::{info, warn};

use super::Task;
use crate::shim::{self, Autocast, CudaGraph};

/// Eager steps on the side stream before the capture.
pub const WARMUP_STEPS: u32 = 3;

/// How far bf16 autocast's training loss may drift from fp32's (relative, per 20-step window of
/// the seed CVAE over 200 steps; checked on CPU autocast by this module's tests).
pub const BF16_LOSS_TOLERANCE: f64 = 0.02;

/// How a task's steps run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepPlan {
    /// bf16 autocast around compute and evaluation.
    pub bf16: bool,
    /// Capture compute in a CUDA graph after warm-up and replay it.
    pub graph: bool,
    /// Convolution weights and image buffers in channels_last.
    pub channels_last: bool,
}

impl StepPlan {
    /// fp32, eager, NCHW: how every step ran before plans existed.
    pub const EAGER_FP32: StepPlan = StepPlan {
        bf16: false,
        graph: false,
        channels_last: false,
    };

    /// The defaults for a job on `device` with `precision` (see the module's doc).
    pub fn for_device(device: Device, precision: Precision) -> Self {
        let cuda = matches!(device, Device::Cuda(_));
        let bf16 = match precision {
            Precision::Fp32 => false,
            Precision::Bf16 => true,
            Precision::Auto => cuda && supports_bf16(device),
        };
        Self {
            bf16,
            graph: cuda,
            channels_last: cuda,
        }
    }

    /// `eager`, `graph-bf16-cl`, ...: the name benchmarks print.
    pub fn name(&self) -> String {
        let mut name = String::from(if self.graph { "graph" } else { "eager" });
        if self.bf16 {
            name.push_str("-bf16");
        }
        if self.channels_last {
            name.push_str("-cl");
        }
        name
    }

    /// Parses [`StepPlan::name`]'s form: `eager` or `graph`, then optional `-bf16`, then `-cl`.
    pub fn parse(text: &str) -> Option<Self> {
        let (graph, rest) = if let Some(rest) = text.strip_prefix("graph") {
            (true, rest)
        } else {
            (false, text.strip_prefix("eager")?)
        };
        let (bf16, rest) = match rest.strip_prefix("-bf16") {
            Some(r) => (true, r),
            None => (false, rest),
        };
        let channels_last = match rest {
            "" => false,
            "-cl" => true,
            _ => return None,
        };
        Some(Self {
            bf16,
            graph,
            channels_last,
        })
    }
}

/// Whether `device` computes in bf16 natively: CUDA with compute capability 8.0 or newer.
pub fn supports_bf16(device: Device) -> bool {
    matches!(device, Device::Cuda(_))
        && shim::cuda_capability(device).is_ok_and(|(major, _)| major >= 8)
}

/// Converts every 4-D parameter of `vs` (convolution weights) to channels_last in place (every
/// handle on it, the optimiser's included, sees the new layout).
pub fn params_to_channels_last(vs: &tch::nn::VarStore) -> Result<(), TchError> {
    for (_, mut p) in vs.variables() {
        if p.dim() == 4 {
            let cl = shim::channels_last(&p.detach())?;
            p.set_data(&cl);
        }
    }
    Ok(())
}

enum Mode {
    Eager,
    /// Eager steps on the graph's side stream; `left` of them before the capture.
    WarmingUp {
        graph: CudaGraph,
        left: u32,
    },
    Replaying(CudaGraph),
}

/// Runs a task's steps by a [`StepPlan`] (see the module's doc).
pub struct Stepper {
    plan: StepPlan,
    device: Device,
    mode: Mode,
    /// Why the graph plan fell back to eager, once it did.
    fallback: Option<String>,
}

impl Stepper {
    /// Readies `task` for `plan` on `device`: channels_last parameters and buffers, a capturable
    /// optimiser, cuDNN benchmark mode. A graph plan on a device that cannot capture starts eager
    /// (with the log line).
    pub fn new(task: &mut dyn Task, plan: StepPlan, device: Device) -> Result<Self, TchError> {
        if plan.channels_last {
            task.use_channels_last()?;
        }
        if matches!(device, Device::Cuda(_)) {
            tch::Cuda::cudnn_set_benchmark(true);
        }
        let mut stepper = Self {
            plan,
            device,
            mode: Mode::Eager,
            fallback: None,
        };
        if plan.graph {
            task.optimizer_mut().make_capturable()?;
            stepper.start_warm_up();
        }
        info!(plan = %plan.name(), ?device, "training step plan");
        Ok(stepper)
    }

    pub fn plan(&self) -> StepPlan {
        self.plan
    }

    /// Whether steps are being replayed from a captured graph now.
    pub fn replaying(&self) -> bool {
        matches!(self.mode, Mode::Replaying(_))
    }

    /// Why the graph plan is running eagerly (None: it is not, or there is no graph plan).
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    fn start_warm_up(&mut self) {
        match CudaGraph::new(self.device) {
            Ok(graph) => {
                self.mode = Mode::WarmingUp {
                    graph,
                    left: WARMUP_STEPS,
                }
            }
            Err(e) => self.fall_back(format!("cannot make a CUDA graph: {e}")),
        }
    }

    fn fall_back(&mut self, why: String) {
        warn!(reason = %why, "CUDA graph capture is off for this run; training eagerly");
        self.fallback = Some(why);
        self.mode = Mode::Eager;
    }

    /// The set of trained parameters changed (a layer was unfrozen): capture again.
    pub fn invalidate(&mut self) {
        if self.plan.graph && self.fallback.is_none() {
            self.start_warm_up();
        }
    }

    fn autocast(&self, cache: bool) -> Result<Option<Autocast>, TchError> {
        if !self.plan.bf16 {
            return Ok(None);
        }
        Ok(Some(Autocast::enter(self.device, Kind::BFloat16, cache)?))
    }

    fn compute(&self, task: &mut dyn Task, cache: bool) -> Result<(), TchError> {
        let _autocast = self.autocast(cache)?;
        task.compute()
    }

    /// One optimiser step on the examples at `idx` (global step number `step`).
    pub fn step(&mut self, task: &mut dyn Task, idx: &Tensor, step: u64) -> Result<(), TchError> {
        task.prepare(idx, step)?;
        match std::mem::replace(&mut self.mode, Mode::Eager) {
            Mode::Eager => self.compute(task, true),
            Mode::Replaying(mut graph) => {
                graph.replay()?;
                self.mode = Mode::Replaying(graph);
                Ok(())
            }
            Mode::WarmingUp { mut graph, left } if left > 0 => {
                // A failure in a warm-up step is the job's error (an eager step failed), not a
                // capture problem.
                graph.on_side_stream(|_| self.compute(task, true))?;
                self.mode = Mode::WarmingUp {
                    graph,
                    left: left - 1,
                };
                Ok(())
            }
            Mode::WarmingUp { mut graph, .. } => {
                let captured = graph
                    .on_side_stream(|g| g.capture(|| self.compute(task, false)))
                    .and_then(|()| graph.replay().map_err(TchError::from));
                match captured {
                    Ok(()) => {
                        info!(step, "training step captured in a CUDA graph");
                        self.mode = Mode::Replaying(graph);
                        Ok(())
                    }
                    Err(e) => {
                        drop(graph);
                        self.fall_back(format!("capture failed: {e}"));
                        // Nothing ran during the capture: compute this step eagerly.
                        self.compute(task, true)
                    }
                }
            }
        }
    }

    /// The task's evaluation, in the plan's precision.
    pub fn evaluate(&self, task: &mut dyn Task) -> Result<Vec<(&'static str, f64)>, TchError> {
        let _autocast = self.autocast(true)?;
        task.evaluate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::classifier::ClassifierTask;
    use crate::train::cvae::{CvaeConfig, CvaeData, CvaeTask};
    use crate::train::seeded;
    use proto::spec::{Init, Optimizer};

    /// Learnable CIFAR-shaped data: each label has a colour, and an image is its label's colour
    /// plus a little noise (random pixels would leave nothing to learn).
    fn cvae(batch: i64) -> CvaeTask {
        let data = seeded(42, || {
            let opts = (Kind::Float, Device::Cpu);
            let colours = Tensor::rand([100, 3, 1, 1], opts);
            let images = |labels: &Tensor| {
                (colours.index_select(0, labels)
                    + Tensor::randn([labels.size()[0], 3, 32, 32], opts) * 0.05)
                    .clamp(0.0, 1.0)
            };
            let train_labels = Tensor::randint(100, [64], (Kind::Int64, Device::Cpu));
            let test_labels = Tensor::randint(100, [16], (Kind::Int64, Device::Cpu));
            CvaeData {
                train_images: images(&train_labels),
                train_labels,
                test_images: images(&test_labels),
                test_labels,
            }
        });
        let config = CvaeConfig {
            latent_dim: 8,
            beta: 1.0,
            batch_size: batch,
            optimizer: Optimizer::Adam,
            learning_rate: 1e-3,
            seed: 5,
        };
        CvaeTask::new(data, &config, &Init::Random, None).expect("task")
    }

    fn classifier(batch: i64) -> ClassifierTask {
        seeded(9, || {
            let opts = (Kind::Float, Device::Cpu);
            let data = crate::data::MnistTensors {
                train_images: Tensor::rand([256, 1, 28, 28], opts),
                train_labels: Tensor::randint(10, [256], (Kind::Int64, Device::Cpu)),
                test_images: Tensor::rand([32, 1, 28, 28], opts),
                test_labels: Tensor::randint(10, [32], (Kind::Int64, Device::Cpu)),
            };
            ClassifierTask::new(data, batch, Optimizer::Adam, 1e-3).expect("task")
        })
    }

    /// `steps` steps through `stepper` (None: the task's own eager `step`), returning the mean
    /// training loss of every window of `window` steps.
    fn train(
        task: &mut dyn Task,
        mut stepper: Option<&mut Stepper>,
        steps: u64,
        window: u64,
    ) -> Vec<f64> {
        let (n, b) = (task.train_len(), task.batch_size());
        let mut losses = Vec::new();
        for s in 0..steps {
            let start = (s as i64 * b) % (n - b + 1);
            let idx = Tensor::arange_start(start, start + b, (Kind::Int64, Device::Cpu));
            match stepper.as_deref_mut() {
                Some(st) => st.step(task, &idx, s + 1).expect("step"),
                None => task.step(&idx, s + 1).expect("step"),
            }
            if (s + 1) % window == 0 {
                let w = task.take_window().expect("window");
                losses.push(
                    w.iter()
                        .find(|(k, _)| *k == proto::metric::TRAIN_LOSS)
                        .expect("loss")
                        .1,
                );
            }
        }
        losses
    }

    fn params(task: &dyn Task) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = task
            .var_store()
            .variables()
            .into_iter()
            .map(|(k, t)| (k, t.detach().copy()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// `precision: auto` on a CPU is the eager fp32 step, bit for bit: the same windows and the
    /// same parameters as the task's own step, for both seed models.
    #[test]
    fn auto_precision_on_the_cpu_trains_bit_identically_to_the_plain_eager_step() {
        tch::set_num_threads(1);
        let plan = StepPlan::for_device(Device::Cpu, Precision::Auto);
        let tasks: [(Box<dyn Task>, Box<dyn Task>); 2] = [
            (Box::new(cvae(16)), Box::new(cvae(16))),
            (Box::new(classifier(32)), Box::new(classifier(32))),
        ];
        for (mut plain, mut planned) in tasks {
            let a = train(plain.as_mut(), None, 12, 4);
            let mut stepper = Stepper::new(planned.as_mut(), plan, Device::Cpu).expect("stepper");
            let b = train(planned.as_mut(), Some(&mut stepper), 12, 4);
            assert_eq!(a, b, "windows differ");
            let eval_a = plain.evaluate().expect("eval");
            let eval_b = stepper.evaluate(planned.as_mut()).expect("eval");
            assert_eq!(eval_a, eval_b);
            for ((name, x), (_, y)) in params(plain.as_ref()).iter().zip(params(planned.as_ref())) {
                assert!(x.equal(&y), "{name} differs");
            }
            assert!(!stepper.replaying() && stepper.fallback_reason().is_none());
        }
    }

    /// bf16 autocast (on the CPU here, through libtorch's CPU autocast) follows fp32: over 200
    /// steps of the seed CVAE, every 20-step window's mean loss is within
    /// [`BF16_LOSS_TOLERANCE`] of fp32's, and the loss falls as much.
    #[test]
    fn bf16_autocast_stays_within_tolerance_of_fp32_over_200_steps() {
        tch::set_num_threads(1);
        let bf16 = StepPlan {
            bf16: true,
            ..StepPlan::EAGER_FP32
        };
        let mut fp32_task = cvae(8);
        let mut fp32 =
            Stepper::new(&mut fp32_task, StepPlan::EAGER_FP32, Device::Cpu).expect("fp32");
        let reference = train(&mut fp32_task, Some(&mut fp32), 200, 20);
        let mut bf16_task = cvae(8);
        let mut stepper = Stepper::new(&mut bf16_task, bf16, Device::Cpu).expect("bf16");
        let mixed = train(&mut bf16_task, Some(&mut stepper), 200, 20);
        assert_ne!(reference, mixed, "bf16 must actually change the arithmetic");
        let worst = reference
            .iter()
            .zip(&mixed)
            .map(|(r, m)| (r - m).abs() / r.abs())
            .fold(0.0, f64::max);
        eprintln!("bf16 vs fp32: largest relative window difference {worst:.5}");
        for (i, (r, m)) in reference.iter().zip(&mixed).enumerate() {
            let rel = (r - m).abs() / r.abs();
            assert!(
                rel < BF16_LOSS_TOLERANCE,
                "window {i}: fp32 {r}, bf16 {m} (relative difference {rel:.4})"
            );
        }
        assert!(
            mixed[9] < 0.95 * mixed[0],
            "bf16 training learns: {mixed:?}"
        );
        assert!(
            reference[9] < 0.95 * reference[0],
            "fp32 training learns: {reference:?}"
        );
        // Evaluation runs in the plan's precision too, and agrees as closely.
        let loss = |v: Vec<(&'static str, f64)>| {
            v.iter()
                .find(|(k, _)| *k == proto::metric::TEST_LOSS)
                .expect("loss")
                .1
        };
        let (r, m) = (
            loss(fp32.evaluate(&mut fp32_task).expect("eval")),
            loss(stepper.evaluate(&mut bf16_task).expect("eval")),
        );
        assert!(
            (r - m).abs() / r < BF16_LOSS_TOLERANCE,
            "test loss fp32 {r}, bf16 {m}"
        );
    }

    /// A graph plan where no CUDA device is present runs eagerly (with a capturable optimiser)
    /// and says why, and trains like the eager plan to float rounding.
    #[test]
    fn a_graph_plan_without_cuda_falls_back_to_eager_and_says_why() {
        tch::set_num_threads(1);
        if shim::cuda_usable() {
            return; // covered by the cuda-tests feature's graph test
        }
        let graph = StepPlan {
            graph: true,
            ..StepPlan::EAGER_FP32
        };
        let mut task = cvae(16);
        let mut stepper = Stepper::new(&mut task, graph, Device::Cpu).expect("stepper");
        let reason = stepper.fallback_reason().expect("fell back").to_string();
        assert!(reason.contains("CUDA"), "{reason}");
        assert!(task.optimizer().is_capturable());
        let got = train(&mut task, Some(&mut stepper), 12, 4);
        let mut eager_task = cvae(16);
        let want = train(&mut eager_task, None, 12, 4);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() / w < 1e-5, "graph-fallback {g}, eager {w}");
        }
        assert!(!stepper.replaying());
    }

    #[test]
    fn plans_have_names_that_parse_back() {
        for graph in [false, true] {
            for bf16 in [false, true] {
                for channels_last in [false, true] {
                    let plan = StepPlan {
                        bf16,
                        graph,
                        channels_last,
                    };
                    assert_eq!(StepPlan::parse(&plan.name()), Some(plan), "{}", plan.name());
                }
            }
        }
        assert_eq!(StepPlan::parse("eager"), Some(StepPlan::EAGER_FP32));
        for bad in ["", "graph-cl-bf16", "eager-", "fast", "graph-bf16-cl-x"] {
            assert_eq!(StepPlan::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn auto_precision_is_fp32_eager_on_the_cpu_and_bf16_is_allowed_there() {
        assert_eq!(
            StepPlan::for_device(Device::Cpu, Precision::Auto),
            StepPlan::EAGER_FP32
        );
        assert_eq!(
            StepPlan::for_device(Device::Cpu, Precision::Fp32),
            StepPlan::EAGER_FP32
        );
        let bf16 = StepPlan::for_device(Device::Cpu, Precision::Bf16);
        assert!(bf16.bf16 && !bf16.graph && !bf16.channels_last);
    }
}
