//! `trainq-worker run spec.json`: trains one job spec on this machine with no coordinator, Redis
//! or Postgres, printing each metric batch as it arrives and a summary at the end, and writing
//! its artifacts (checkpoints, image grids) into `--out` (a transfer spec's source checkpoint
//! comes from `--source-checkpoint`, a file where a worker would download it).
//!
//! For trying a spec, measuring a machine and debugging the engine. Trains on the calling thread
//! (this command has no async runtime). Must not grow features of its own: what it runs is exactly
//! what a worker would run for the same spec.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::Context;
use proto::spec::JobSpec;

use crate::config::RunArgs;
use crate::train::trainer::Trainer;
use crate::train::{Event, JobInputs, Metric, Outcome, TrainError};
use proto::metric;

/// Reads the spec, trains it on this thread and prints its metrics to standard output.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let text = if args.spec.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the spec from standard input")?
    } else {
        std::fs::read_to_string(&args.spec)
            .with_context(|| format!("reading spec {}", args.spec.display()))?
    };
    let spec =
        JobSpec::from_json(&text).with_context(|| format!("spec {}", args.spec.display()))?;
    let read = |what: &str, path: &Option<PathBuf>| -> anyhow::Result<Option<Vec<u8>>> {
        path.as_ref()
            .map(|p| std::fs::read(p).with_context(|| format!("reading {what} {}", p.display())))
            .transpose()
    };
    let inputs = JobInputs {
        source_checkpoint: read("source checkpoint", &args.source_checkpoint)?,
        resume: read("training state", &args.resume)?,
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating output folder {}", args.out.display()))?;
    args.trainer.apply_threads();
    let config = args.trainer.trainer_config()?;
    let mut trainer = Trainer::new(config);
    let mut out = std::io::stdout().lock();
    let (result, summary) = run_spec(&mut trainer, &spec, &inputs, &args.out, args.json, &mut out);
    writeln!(out, "{summary}")?;
    out.flush()?;
    match result {
        Ok(_) => Ok(()),
        Err(e) => {
            let kind = if e.is_permanent() {
                "permanent"
            } else {
                "retryable"
            };
            Err(anyhow::Error::new(e).context(format!("training {:?} failed ({kind})", spec.name)))
        }
    }
}

/// Trains `spec`, writing each metric batch to `out` as it arrives and each artifact into
/// `artifacts_dir`; returns the result and the summary line.
fn run_spec(
    trainer: &mut Trainer,
    spec: &JobSpec,
    inputs: &JobInputs,
    artifacts_dir: &Path,
    json: bool,
    out: &mut dyn Write,
) -> (Result<Outcome, TrainError>, String) {
    let started = Instant::now();
    let mut images_per_s = Vec::new();
    // Pure training time: each epoch's images (its steps times the batch) over its throughput.
    let batch_size = f64::from(spec.training.batch_size);
    let mut last_epoch_step = None::<u64>;
    let mut first_step = None::<u64>;
    let resumed = inputs.resume.is_some();
    let mut train_s = 0.0;
    let mut last_accuracy = None;
    let mut last_neg_elbo = None;
    let mut artifacts: Vec<String> = Vec::new();
    let mut write_error: Option<String> = None;
    let stop = AtomicBool::new(false);
    let result = trainer.run(
        spec,
        inputs,
        &mut |event: Event| match event {
            Event::Metrics(batch) => {
                if first_step.is_none() {
                    first_step = batch.first().map(|m| m.step);
                }
                for m in &batch {
                    match m.name.as_str() {
                        metric::TRAIN_IMAGES_PER_S => {
                            images_per_s.push(m.value);
                            // Epoch `e` ends at step e * steps_per_epoch, so the first epoch seen
                            // starts one epoch earlier. A resumed run's first epoch starts at
                            // the resume point instead, which the first step it reported
                            // approximates (to within log_every_steps).
                            let epoch_start = m.step - m.step / u64::from(m.epoch.max(1));
                            let from = last_epoch_step.unwrap_or(if resumed {
                                epoch_start.max(first_step.unwrap_or(1) - 1)
                            } else {
                                epoch_start
                            });
                            train_s += (m.step - from) as f64 * batch_size / m.value.max(1e-9);
                            last_epoch_step = Some(m.step);
                        }
                        metric::TEST_ACCURACY => last_accuracy = Some(m.value),
                        metric::TEST_NEG_ELBO_NATS => last_neg_elbo = Some(m.value),
                        _ => {}
                    }
                }
                for line in format_batch(&batch, json) {
                    if let Err(e) = writeln!(out, "{line}").and_then(|_| out.flush()) {
                        write_error.get_or_insert(e.to_string());
                    }
                }
            }
            Event::Artifact(file) => {
                let path = artifacts_dir.join(&file.name);
                match std::fs::write(&path, &file.bytes) {
                    Ok(()) => artifacts.push(path.display().to_string()),
                    Err(e) => {
                        write_error.get_or_insert(format!("writing {}: {e}", path.display()));
                    }
                }
            }
        },
        &stop,
    );
    let result = match (result, write_error) {
        (Ok(_), Some(e)) => Err(TrainError::Retryable(format!("output: {e}"))),
        (other, _) => other,
    };
    let wall = started.elapsed().as_secs_f64();
    let mean = (!images_per_s.is_empty())
        .then(|| images_per_s.iter().sum::<f64>() / images_per_s.len() as f64);
    let outcome = match &result {
        Ok(Outcome::Succeeded { .. }) => proto::JobState::Succeeded.as_str(),
        Ok(Outcome::Stopped { .. }) => "stopped",
        Err(_) => proto::JobState::Failed.as_str(),
    };
    let summary = if json {
        serde_json::json!({
            "outcome": outcome,
            "name": spec.name,
            "wall_s": (wall * 1000.0).round() / 1000.0,
            "train_s": (train_s * 1000.0).round() / 1000.0,
            "mean_images_per_s": mean.map(f64::round),
            "test_accuracy": last_accuracy,
            "test_neg_elbo_nats": last_neg_elbo,
            "artifacts": artifacts,
            "error": result.as_ref().err().map(|e| e.to_string()),
        })
        .to_string()
    } else {
        let mut s = format!("{outcome}  wall {wall:.1} s  training {train_s:.1} s");
        if let Some(m) = mean {
            s += &format!("  mean {m:.0} images/s");
        }
        if let Some(a) = last_accuracy {
            s += &format!("  final test/accuracy {a:.4}");
        }
        if let Some(a) = last_neg_elbo {
            s += &format!("  final test/neg_elbo_nats {a:.2}");
        }
        if let Some(last) = artifacts.last() {
            s += &format!("  {} artifact(s), last {last}", artifacts.len());
        }
        if let Err(e) = &result {
            s += &format!("  error: {e}");
        }
        s
    };
    (result, summary)
}

/// One metric batch as output lines: one JSON object per point, or one table line per step.
pub fn format_batch(batch: &[Metric], json: bool) -> Vec<String> {
    if json {
        return batch
            .iter()
            .map(|m| serde_json::json!({"name": m.name, "step": m.step, "epoch": m.epoch, "value": m.value}).to_string())
            .collect();
    }
    let mut lines: Vec<String> = Vec::new();
    let mut current: Option<(u32, u64)> = None;
    for m in batch {
        if current != Some((m.epoch, m.step)) {
            current = Some((m.epoch, m.step));
            lines.push(format!("epoch {}  step {}", m.epoch, m.step));
        }
        let value = if m.name == metric::TRAIN_IMAGES_PER_S {
            format!("{:.0}", m.value)
        } else {
            format!("{:.4}", m.value)
        };
        if let Some(line) = lines.last_mut() {
            line.push_str(&format!("  {} {value}", m.name));
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TrainerArgs;
    use crate::data::test_data_dir;
    use crate::train::trainer::TrainerConfig;

    #[test]
    fn a_batch_prints_as_one_table_line_per_step_or_json_points() {
        let m = |name: &str, step, value| Metric {
            name: name.into(),
            step,
            epoch: 1,
            value,
        };
        let batch = vec![
            m("train/loss", 78, 0.23456),
            m("test/accuracy", 78, 0.95),
            m("train/images_per_s", 78, 1234.5),
        ];
        assert_eq!(
            format_batch(&batch, false),
            vec!["epoch 1  step 78  train/loss 0.2346  test/accuracy 0.9500  train/images_per_s 1234"]
        );
        let lines = format_batch(&batch, true);
        assert_eq!(lines.len(), 3);
        let v: serde_json::Value = serde_json::from_str(&lines[0]).expect("json");
        assert_eq!(v["name"], "train/loss");
        assert_eq!(v["step"], 78);
    }

    #[test]
    fn a_small_spec_runs_standalone_and_prints_a_summary() {
        tch::set_num_threads(1);
        let spec = JobSpec::from_json(
            r#"{"name":"tiny","training":{"epochs":1,"batchSize":32,"learningRate":0.001,"maxTrainExamples":320,
                "maxTestExamples":100,"logEverySteps":5},"mnistClassifier":{}}"#,
        )
        .expect("spec");
        let mut trainer = Trainer::new(TrainerConfig {
            device: tch::Device::Cpu,
            data_dir: test_data_dir(),
            mnist_mirrors: vec![],
            cifar_mirrors: vec![],
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let mut out = Vec::new();
        let (result, summary) = run_spec(
            &mut trainer,
            &spec,
            &JobInputs::default(),
            dir.path(),
            true,
            &mut out,
        );
        let outcome = result.expect("trains");
        assert!(matches!(outcome, Outcome::Succeeded { .. }), "{outcome:?}");
        let checkpoint = dir.path().join("epoch-001.safetensors");
        let bytes = std::fs::read(&checkpoint).expect("the checkpoint is written to --out");
        crate::checkpoint::read_safetensors(&bytes).expect("a safetensors file");
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.lines().count() >= 5, "{text}");
        let s: serde_json::Value = serde_json::from_str(&summary).expect("json summary");
        assert_eq!(s["outcome"], "succeeded");
        assert!(s["mean_images_per_s"].as_f64().expect("mean") > 0.0);
        let (wall, train) = (
            s["wall_s"].as_f64().expect("wall"),
            s["train_s"].as_f64().expect("train"),
        );
        assert!(
            train > 0.0 && train <= wall,
            "training {train} s of {wall} s"
        );
        // One epoch of 320 images: its training time is 320 images at the epoch's throughput.
        let mean = s["mean_images_per_s"].as_f64().expect("mean");
        let images = train * mean;
        assert!(
            (images - 320.0).abs() < 320.0 * 0.01 + mean * 0.001,
            "{images} images"
        );
    }

    #[test]
    fn a_bad_spec_file_names_the_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("spec.json");
        std::fs::write(&path, r#"{"name":"x","training":{"epochs":0,"batchSize":8,"learningRate":0.1},"mnistClassifier":{}}"#)
            .expect("write");
        let args = RunArgs {
            spec: path,
            json: false,
            out: dir.path().join("out"),
            source_checkpoint: None,
            resume: None,
            trainer: TrainerArgs {
                device: "cpu".into(),
                data_dir: dir.path().to_path_buf(),
                mnist_mirrors: vec![],
                cifar_mirrors: vec![],
                torch_threads: 1,
            },
        };
        let err = format!("{:#}", run(args).expect_err("invalid"));
        assert!(err.contains("spec.training.epochs"), "{err}");
    }
}
