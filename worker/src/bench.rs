//! `trainq-worker bench`: training throughput of the seed models on random data kept on the
//! device, printed as JSON lines in the format of bench/torch_reference.py so the two
//! can be compared side by side (run both in the same command on the same machine).
//!
//! It times the very step the trainer runs ([`crate::train::Stepper::step`] over the task's
//! `prepare` and `compute`), for each requested step plan (`--variants`: eager or CUDA graph,
//! fp32 or bf16, NCHW or channels_last), after warm-up steps (which include a graph's capture),
//! with the device synchronised at both ends. On CUDA it also prints the peak memory the
//! configuration allocated. Must not measure anything the trainer does not do, nor skip anything
//! it does per step.

use std::time::Instant;

use anyhow::Context;
use tch::{Device, Kind, Tensor};

use crate::config::{BenchArgs, BenchModel};
use crate::data::MnistTensors;
use crate::shim;
use crate::train::classifier::ClassifierTask;
use crate::train::cvae::{CvaeConfig, CvaeData, CvaeTask};
use crate::train::{seeded, sync_device, StepPlan, Stepper, Task};

/// One measured configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchResult {
    pub model: &'static str,
    pub device: String,
    /// The step plan measured.
    pub plan: StepPlan,
    /// Whether the timed steps were replayed from a CUDA graph (a graph plan that fell back to
    /// eager says false).
    pub replayed: bool,
    pub batch_size: i64,
    pub steps: u32,
    pub seconds: f64,
    pub images_per_s: f64,
    /// CUDA: the most memory allocated at once during the configuration, in MiB.
    pub peak_mib: Option<f64>,
}

impl BenchResult {
    /// The reference's JSON line (its keys in its order), with `"impl": "trainq-<plan>"`, then
    /// trainq's own keys (`graph`, `peak_mib`).
    pub fn to_json_line(&self) -> String {
        let text = |s: &str| serde_json::Value::from(s).to_string();
        let peak = self
            .peak_mib
            .map_or("null".to_string(), |m| format!("{:.1}", m));
        format!(
            r#"{{"impl": {}, "model": {}, "device": {}, "amp": {}, "batch_size": {}, "steps": {}, "seconds": {}, "images_per_s": {}, "graph": {}, "peak_mib": {}}}"#,
            text(&format!("trainq-{}", self.plan.name())),
            text(self.model),
            text(&self.device),
            self.plan.bf16,
            self.batch_size,
            self.steps,
            (self.seconds * 1e4).round() / 1e4,
            self.images_per_s.round() as u64,
            self.replayed,
            peak,
        )
    }
}

/// The device as the reference names it (`cpu`, `cuda`, `cuda:1`).
fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(0) => "cuda".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// `--variants`: `auto` is the plan a job with `precision: auto` gets on `device`.
pub fn parse_variants(variants: &[String], device: Device) -> anyhow::Result<Vec<StepPlan>> {
    variants
        .iter()
        .map(|v| match v.trim() {
            "auto" => Ok(StepPlan::for_device(
                device,
                proto::spec::Precision::Auto,
            )),
            other => StepPlan::parse(other).ok_or_else(|| {
                anyhow::anyhow!(
                    "--variants: unknown plan {other:?}; expected auto, or eager/graph with optional -bf16 then -cl (graph-bf16-cl)"
                )
            }),
        })
        .collect()
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    args.trainer.apply_threads();
    let device = args.trainer.trainer_config()?.device;
    let plans = parse_variants(&args.variants, device)?;
    for &bs in &args.batch_sizes {
        anyhow::ensure!(bs >= 1, "--batch-sizes: {bs} is not a batch size");
        for &plan in &plans {
            let r = measure(args.model, device, plan, bs, args.steps, args.warmup).with_context(
                || {
                    format!(
                        "benchmarking {} ({}) at batch size {bs}",
                        args.model.name(),
                        plan.name()
                    )
                },
            )?;
            println!("{}", r.to_json_line());
        }
    }
    Ok(())
}

/// Trains `model` for `warmup` then `steps` timed steps of batch `bs` on random data on `device`,
/// like the reference: `n = max(8192, 2*bs)` examples, Adam at 1e-3, batch `i` at offset
/// `(i*bs) % (n-bs)`.
pub fn measure(
    model: BenchModel,
    device: Device,
    plan: StepPlan,
    bs: i64,
    steps: u32,
    warmup: u32,
) -> anyhow::Result<BenchResult> {
    let cuda = matches!(device, Device::Cuda(_));
    if cuda {
        sync_device(device);
        shim::cuda_reset_peak(device)?;
    }
    let n = 8192.max(2 * bs);
    let adam = proto::spec::Optimizer::Adam;
    let mut task: Box<dyn Task> = match model {
        BenchModel::Mnist => seeded(0, || -> Result<Box<dyn Task>, tch::TchError> {
            let data = MnistTensors {
                train_images: Tensor::f_rand([n, 1, 28, 28], (Kind::Float, device))?,
                train_labels: Tensor::f_randint(10, [n], (Kind::Int64, device))?,
                test_images: Tensor::f_rand([1, 1, 28, 28], (Kind::Float, device))?,
                test_labels: Tensor::f_zeros([1], (Kind::Int64, device))?,
            };
            Ok(Box::new(ClassifierTask::new(data, bs, adam, 1e-3)?))
        })?,
        BenchModel::Cvae => {
            let data = seeded(0, || -> Result<CvaeData, tch::TchError> {
                Ok(CvaeData {
                    train_images: Tensor::f_rand([n, 3, 32, 32], (Kind::Float, device))?,
                    train_labels: Tensor::f_randint(100, [n], (Kind::Int64, device))?,
                    test_images: Tensor::f_rand([1, 3, 32, 32], (Kind::Float, device))?,
                    test_labels: Tensor::f_zeros([1], (Kind::Int64, device))?,
                })
            })?;
            let config = CvaeConfig {
                latent_dim: i64::from(proto::spec::DEFAULT_LATENT_DIM),
                beta: 1.0,
                batch_size: bs,
                optimizer: adam,
                learning_rate: 1e-3,
                seed: 0,
            };
            let init = proto::spec::Init::Random;
            Box::new(CvaeTask::new(data, &config, &init, None).map_err(anyhow::Error::new)?)
        }
    };
    let order = Tensor::f_arange(n, (Kind::Int64, device))?;
    let mut stepper = Stepper::new(task.as_mut(), plan, device)?;
    let mut run = |task: &mut dyn Task, from: u32, k: u32| -> anyhow::Result<()> {
        for i in i64::from(from)..i64::from(from + k) {
            let o = (i * bs) % (n - bs);
            stepper.step(task, &order.f_narrow(0, o, bs)?, i as u64 + 1)?;
        }
        Ok(())
    };
    run(task.as_mut(), 0, warmup)?;
    sync_device(device);
    let started = Instant::now();
    run(task.as_mut(), warmup, steps)?;
    sync_device(device);
    let seconds = started.elapsed().as_secs_f64();
    let replayed = stepper.replaying();
    let peak_mib = if cuda {
        Some(shim::cuda_memory(device)?.peak_allocated as f64 / (1024.0 * 1024.0))
    } else {
        None
    };
    let window = task.take_window()?;
    anyhow::ensure!(
        window.iter().all(|(_, v)| v.is_finite()),
        "benchmark loss is not finite: {window:?}"
    );
    Ok(BenchResult {
        model: model.name(),
        device: device_name(device),
        plan,
        replayed,
        batch_size: bs,
        steps,
        seconds,
        images_per_s: (bs * i64::from(steps)) as f64 / seconds.max(1e-9),
        peak_mib,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cvae_benchmark_runs_the_cvae_step() {
        tch::set_num_threads(1);
        let r =
            measure(BenchModel::Cvae, Device::Cpu, StepPlan::EAGER_FP32, 8, 2, 1).expect("bench");
        assert!(r.images_per_s > 0.0);
        assert!(r.to_json_line().contains(r#""model": "cvae""#));
    }

    #[test]
    fn a_short_benchmark_prints_the_reference_format() {
        tch::set_num_threads(1);
        let r = measure(
            BenchModel::Mnist,
            Device::Cpu,
            StepPlan::EAGER_FP32,
            16,
            2,
            1,
        )
        .expect("bench");
        assert!(r.images_per_s > 0.0);
        let line = r.to_json_line();
        let v: serde_json::Value = serde_json::from_str(&line).expect("valid json");
        for key in [
            "impl",
            "model",
            "device",
            "batch_size",
            "steps",
            "seconds",
            "images_per_s",
        ] {
            assert!(v.get(key).is_some(), "{key} missing from {v}");
        }
        assert_eq!(v["impl"], "trainq-eager");
        assert_eq!(v["graph"], false);
        assert!(v["peak_mib"].is_null(), "no CUDA peak on the CPU: {v}");
        assert_eq!(v["model"], "mnist");
        assert_eq!(v["device"], "cpu");
        assert!(
            line.starts_with(r#"{"impl": "trainq-eager", "model": "mnist", "device": "cpu""#),
            "{line}"
        );
    }
}
