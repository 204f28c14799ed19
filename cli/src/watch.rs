//! `trainq watch`: follows jobs through the WatchJob stream until they end, as one progress bar
//! per job on a terminal, or as plain lines when stdout is not a terminal.
//!
//! The coordinator does not know data set sizes, so the total number of steps is computed here
//! from the spec: epochs x floor(train examples / batch size), where the train examples are
//! `maxTrainExamples` or the whole training set (60,000 MNIST images, 50,000 CIFAR-100 images),
//! whichever is smaller; the last partial batch of an epoch is dropped. Training code lives in
//! the worker; this module only reads the stream.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use proto::metric::{TRAIN_IMAGES_PER_S, TRAIN_LOSS};
use proto::v1;
use tokio_stream::StreamExt;

use crate::client::{exit, CliError, Client};
use crate::format::{counts_text, number, sweep_state_name};
use crate::output::Output;

/// Training-set sizes of the built-in data sets.
pub const MNIST_TRAIN_EXAMPLES: u64 = 60_000;
pub const CIFAR100_TRAIN_EXAMPLES: u64 = 50_000;

/// Optimiser steps a spec trains in all, or `None` when the spec lacks training or a kind.
pub fn total_steps(spec: &v1::JobSpec) -> Option<u64> {
    let training = spec.training.as_ref()?;
    let full = match spec.experiment.as_ref()? {
        v1::job_spec::Experiment::MnistClassifier(_) => MNIST_TRAIN_EXAMPLES,
        v1::job_spec::Experiment::CifarCvae(_) => CIFAR100_TRAIN_EXAMPLES,
    };
    let examples = match training.max_train_examples {
        0 => full,
        n => u64::from(n).min(full),
    };
    let batch = u64::from(training.batch_size.max(1));
    Some(u64::from(training.epochs) * (examples / batch).max(1))
}

/// What the watcher knows about one job.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub name: String,
    pub state: v1::JobState,
    pub step: u64,
    pub epoch: u32,
    pub epochs: u32,
    pub total: Option<u64>,
    pub loss: Option<f64>,
    pub images_per_s: Option<f64>,
    pub error: String,
}

impl Progress {
    fn on_job(&mut self, job: &v1::Job) {
        if let Some(spec) = &job.spec {
            self.name = spec.name.clone();
            self.total = total_steps(spec);
            self.epochs = spec.training.as_ref().map_or(0, |t| t.epochs);
        }
        self.state = job.state();
        self.error = job.error.clone();
        if job.final_step > 0 {
            self.step = self.step.max(job.final_step);
        }
        self.on_points(&job.latest_metrics);
    }

    fn on_points(&mut self, points: &[v1::MetricPoint]) {
        for p in points {
            if p.step >= self.step {
                self.step = p.step;
                self.epoch = self.epoch.max(p.epoch);
            }
            match p.name.as_str() {
                TRAIN_LOSS => self.loss = Some(p.value),
                TRAIN_IMAGES_PER_S => self.images_per_s = Some(p.value),
                _ => {}
            }
        }
    }

    /// `epoch 1/2  loss 0.5321  1234 img/s`
    pub fn summary(&self) -> String {
        let mut s = format!("epoch {}/{}", self.epoch, self.epochs);
        if let Some(l) = self.loss {
            s.push_str(&format!("  loss {}", number(l)));
        }
        if let Some(r) = self.images_per_s {
            s.push_str(&format!("  {} img/s", number(r.round())));
        }
        s
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Display {
    Bars,
    Lines,
    Quiet,
}

impl Display {
    pub fn auto() -> Self {
        if std::io::stdout().is_terminal() {
            Display::Bars
        } else {
            Display::Lines
        }
    }

    /// The display of a command's watch: none for JSON (only the result is printed), else
    /// [`Display::auto`].
    pub fn for_output(out: Output) -> Self {
        match out {
            Output::Json => Display::Quiet,
            _ => Display::auto(),
        }
    }
}

/// Watches jobs until every one ends. Returns the final jobs; the caller turns them into an
/// exit code with [`exit_code`].
pub async fn watch(
    client: &Client,
    ids: &[String],
    display: Display,
) -> Result<Vec<v1::Job>, CliError> {
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stdout());
    let style = ProgressStyle::with_template(
        "{prefix:.bold} [{bar:30.cyan/blue}] {pos}/{len} steps  {msg}  ETA {eta}",
    )
    .expect("a valid progress template")
    .progress_chars("=> ");
    let mut tasks = Vec::new();
    for id in ids {
        let bar = match display {
            Display::Bars => {
                let bar = multi.add(ProgressBar::new(0));
                bar.set_style(style.clone());
                bar.enable_steady_tick(Duration::from_millis(500));
                Some(bar)
            }
            _ => None,
        };
        let client = client.clone();
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            watch_one(client, id, bar, display).await
        }));
    }
    let mut jobs = Vec::new();
    for task in tasks {
        let job = task
            .await
            .map_err(|e| CliError::new(exit::SERVER, format!("watcher stopped: {e}")))??;
        jobs.push(job);
    }
    Ok(jobs)
}

/// Failures in a row after which a watch gives up reconnecting (about 15 s of tries).
const RECONNECT_TRIES: usize = 8;

/// Whether a broken watch is worth opening again: the coordinator went away or shut down (a
/// replica behind a balancer; the next connection reaches another), or the link broke. A watch
/// only reads, so opening it again is always safe.
fn reconnects_on(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Aborted
            | tonic::Code::Cancelled
    )
}

/// The pauses between tries of one run of failures.
fn reconnect_delays() -> impl Iterator<Item = Duration> {
    use ::client::retry::BackoffBuilder as _;
    ::client::retry::tries(RECONNECT_TRIES).build()
}

async fn watch_one(
    mut client: Client,
    id: String,
    bar: Option<ProgressBar>,
    display: Display,
) -> Result<v1::Job, CliError> {
    let what = format!("watch {id}");
    let short: String = id.chars().take(8).collect();
    let mut progress = Progress::default();
    let mut last: Option<v1::Job> = None;
    let mut last_state = None;
    // For the ETA of plain lines: when and at which step the first metric arrived.
    let mut first_seen: Option<(Instant, u64)> = None;
    let mut delays = reconnect_delays();
    'streams: loop {
        // A stream that breaks is opened again (it starts over with the job and all its points,
        // which the progress takes as it would the first time), until the job ended.
        let broke = |status: tonic::Status, delays: &mut dyn Iterator<Item = Duration>| match delays
            .next()
        {
            Some(pause) if reconnects_on(&status) => {
                eprintln!(
                    "trainq: {what}: the stream broke ({:?}: {}); watching again in {} ms",
                    status.code(),
                    status.message(),
                    pause.as_millis()
                );
                Ok(pause)
            }
            _ => Err(CliError::from_status(&what, &status)),
        };
        let mut stream = match client
            .watch_job(v1::WatchJobRequest { job_id: id.clone() })
            .await
        {
            Ok(stream) => stream.into_inner(),
            Err(status) => {
                tokio::time::sleep(broke(status, &mut delays)?).await;
                continue 'streams;
            }
        };
        loop {
            let event = match stream.next().await {
                Some(Ok(event)) => event,
                Some(Err(status)) => {
                    tokio::time::sleep(broke(status, &mut delays)?).await;
                    continue 'streams;
                }
                // Ended without the job's end (a coordinator shutting down may close it so).
                None if !progress.state.is_terminal() => {
                    let status = tonic::Status::unavailable("the stream ended before the job did");
                    tokio::time::sleep(broke(status, &mut delays)?).await;
                    continue 'streams;
                }
                None => break 'streams,
            };
            // Something arrived: the next break starts the tries over.
            delays = reconnect_delays();
            match event.event {
                Some(v1::job_event::Event::Job(job)) => {
                    progress.on_job(&job);
                    last = Some(job);
                }
                Some(v1::job_event::Event::Metrics(batch)) => progress.on_points(&batch.points),
                None => continue,
            }
            if first_seen.is_none() && progress.step > 0 {
                first_seen = Some((Instant::now(), progress.step));
            }
            let state = proto::state_name(progress.state);
            match (&bar, display) {
                (Some(bar), _) => {
                    bar.set_prefix(format!("{short} {}", progress.name));
                    if let Some(total) = progress.total {
                        bar.set_length(total.max(progress.step));
                    }
                    bar.set_position(progress.step);
                    bar.set_message(format!("{state}  {}", progress.summary()));
                }
                (None, Display::Lines) => {
                    // The end gets its own line below.
                    if last_state != Some(progress.state) && !progress.state.is_terminal() {
                        println!("{id} {}: {state}", progress.name);
                        last_state = Some(progress.state);
                    }
                    if progress.step > 0 && !progress.state.is_terminal() {
                        let total = progress
                            .total
                            .map_or("?".into(), |t| t.max(progress.step).to_string());
                        let eta = match (first_seen, progress.total) {
                            (Some((t0, s0)), Some(total)) if progress.step > s0 => {
                                let per_step =
                                    t0.elapsed().as_secs_f64() / (progress.step - s0) as f64;
                                format!(
                                    "{:.0}s",
                                    per_step * total.saturating_sub(progress.step) as f64
                                )
                            }
                            _ => "?".into(),
                        };
                        println!(
                            "{id} step {}/{total}  {}  eta {eta}",
                            progress.step,
                            progress.summary()
                        );
                    }
                }
                _ => {}
            }
            if progress.state.is_terminal() {
                break 'streams;
            }
        }
    }
    let job = match last {
        Some(job) if job.state().is_terminal() => job,
        _ => {
            return Err(CliError::new(
                exit::SERVER,
                format!("{what}: the stream ended before the job did"),
            ))
        }
    };
    let end = match job.state() {
        v1::JobState::Succeeded => format!("succeeded at step {}", job.final_step),
        other => format!("{}: {}", proto::state_name(other), job.error),
    };
    match (&bar, display) {
        (Some(bar), _) => bar.finish_with_message(end),
        (None, Display::Lines) => println!("{id} {}: {end}", progress.name),
        _ => {}
    }
    Ok(job)
}

/// 0 when every job succeeded, 1 otherwise.
pub fn exit_code(jobs: &[v1::Job]) -> u8 {
    if jobs.iter().all(|j| j.state() == v1::JobState::Succeeded) {
        exit::OK
    } else {
        exit::JOB_FAILED
    }
}

/// Jobs of a sweep, from its counts (WatchSweep messages carry no runs).
pub fn sweep_jobs(sweep: &v1::Sweep) -> u64 {
    sweep.jobs_by_state.iter().map(|c| u64::from(c.count)).sum()
}

/// Jobs of a sweep in states for which `pick` holds.
fn sweep_count(sweep: &v1::Sweep, pick: impl Fn(v1::JobState) -> bool) -> u64 {
    sweep
        .jobs_by_state
        .iter()
        .filter(|c| pick(c.state()))
        .map(|c| u64::from(c.count))
        .sum()
}

/// Jobs of a sweep that have ended.
pub fn sweep_ended(sweep: &v1::Sweep) -> u64 {
    sweep_count(sweep, |s| s.is_terminal())
}

/// Whether every job of the sweep has ended.
pub fn sweep_done(sweep: &v1::Sweep) -> bool {
    sweep_jobs(sweep) > 0 && sweep_ended(sweep) == sweep_jobs(sweep)
}

/// Follows a sweep through WatchSweep until every job has ended: one bar of ended jobs out of
/// all (plain lines when stdout is not a terminal), with the jobs by state as its message.
/// Returns the last message; [`sweep_exit_code`] turns it into an exit code.
pub async fn watch_sweep(
    client: &Client,
    id: &str,
    display: Display,
) -> Result<v1::Sweep, CliError> {
    let what = format!("sweep watch {id}");
    let mut stream = client
        .clone()
        .watch_sweep(v1::WatchSweepRequest {
            sweep_id: id.to_string(),
        })
        .await
        .map_err(|s| CliError::from_status(&what, &s))?
        .into_inner();
    let bar = (display == Display::Bars).then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:.bold} [{bar:30.cyan/blue}] {pos}/{len} jobs ended  {msg}  {elapsed}",
            )
            .expect("a valid progress template")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(500));
        bar
    });
    let mut last: Option<v1::Sweep> = None;
    let mut last_line = String::new();
    while let Some(msg) = stream.next().await {
        let sweep = msg.map_err(|s| CliError::from_status(&what, &s))?;
        let name = sweep.spec.as_ref().map_or("", |s| s.name.as_str());
        let counts = counts_text(&sweep.jobs_by_state);
        let ended = sweep_ended(&sweep);
        let jobs = sweep_jobs(&sweep);
        match (&bar, display) {
            (Some(bar), _) => {
                bar.set_prefix(name.to_string());
                bar.set_length(jobs);
                bar.set_position(ended);
                bar.set_message(counts.clone());
            }
            (None, Display::Lines) => {
                let line = format!("sweep {id} {name}: {ended}/{jobs} jobs ended ({counts})");
                if line != last_line {
                    println!("{line}");
                    last_line = line;
                }
            }
            _ => {}
        }
        let done = sweep_done(&sweep);
        last = Some(sweep);
        if done {
            break;
        }
    }
    let sweep = match last {
        Some(s) if sweep_done(&s) => s,
        _ => {
            return Err(CliError::new(
                exit::SERVER,
                format!("{what}: the stream ended before every job did"),
            ))
        }
    };
    let end = format!(
        "{}: {}",
        sweep_state_name(sweep.state()),
        counts_text(&sweep.jobs_by_state)
    );
    match (&bar, display) {
        (Some(bar), _) => bar.finish_with_message(end),
        (None, Display::Lines) => println!("sweep {id} ended {end}"),
        _ => {}
    }
    Ok(sweep)
}

/// 0 when every job of the sweep succeeded, 1 otherwise (from its counts).
pub fn sweep_exit_code(sweep: &v1::Sweep) -> u8 {
    if sweep_done(sweep)
        && sweep_count(sweep, |s| s == v1::JobState::Succeeded) == sweep_jobs(sweep)
    {
        exit::OK
    } else {
        exit::JOB_FAILED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(epochs: u32, batch: u32, max_train: u32, cvae: bool) -> v1::JobSpec {
        v1::JobSpec {
            name: "s".into(),
            training: Some(v1::Training {
                epochs,
                batch_size: batch,
                max_train_examples: max_train,
                ..Default::default()
            }),
            experiment: Some(if cvae {
                v1::job_spec::Experiment::CifarCvae(Default::default())
            } else {
                v1::job_spec::Experiment::MnistClassifier(v1::MnistClassifier {})
            }),
            ..Default::default()
        }
    }

    #[test]
    fn total_steps_drop_the_last_partial_batch_of_every_epoch() {
        assert_eq!(total_steps(&spec(1, 64, 256, false)), Some(4));
        assert_eq!(total_steps(&spec(2, 100, 250, false)), Some(4));
        assert_eq!(total_steps(&spec(1, 64, 0, false)), Some(937));
        assert_eq!(total_steps(&spec(3, 128, 0, true)), Some(3 * 390));
        assert_eq!(total_steps(&spec(1, 64, 1_000_000, false)), Some(937));
    }

    #[test]
    fn a_sweep_exits_0_only_when_every_job_ended_and_succeeded() {
        use v1::JobState::*;
        // As WatchSweep sends it: counts, no runs.
        let sweep = |states: &[v1::JobState]| v1::Sweep {
            jobs_by_state: states
                .iter()
                .map(|s| v1::StateCount {
                    state: *s as i32,
                    count: 1,
                })
                .collect(),
            ..Default::default()
        };
        assert_eq!(sweep_exit_code(&sweep(&[Succeeded, Succeeded])), exit::OK);
        assert_eq!(
            sweep_exit_code(&sweep(&[Succeeded, Failed])),
            exit::JOB_FAILED
        );
        assert_eq!(
            sweep_exit_code(&sweep(&[Succeeded, Cancelled])),
            exit::JOB_FAILED
        );
        assert!(!sweep_done(&sweep(&[Succeeded, Running])));
        assert!(!sweep_done(&sweep(&[])));
        let counts = [
            v1::StateCount {
                state: Succeeded as i32,
                count: 3,
            },
            v1::StateCount {
                state: Running as i32,
                count: 1,
            },
        ];
        assert_eq!(counts_text(&counts), "1 running, 3 succeeded");
    }

    #[test]
    fn progress_follows_the_newest_step_and_the_latest_loss() {
        let mut p = Progress::default();
        let pt = |name: &str, step, epoch, value| v1::MetricPoint {
            name: name.into(),
            step,
            epoch,
            value,
        };
        p.on_points(&[
            pt("train/loss", 20, 1, 0.9),
            pt("train/images_per_s", 20, 1, 1500.4),
        ]);
        p.on_points(&[pt("train/loss", 40, 2, 0.5)]);
        assert_eq!((p.step, p.epoch, p.loss), (40, 2, Some(0.5)));
        p.epochs = 2;
        assert_eq!(p.summary(), "epoch 2/2  loss 0.5  1500 img/s");
    }
}
