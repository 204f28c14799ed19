//! Renders command results for people (aligned tables), spreadsheets (CSV) and scripts (the
//! proto's JSON mapping), and prints them ([`print`]).
//!
//! Formatting only: no network, no terminal detection, and no use of the watching or report
//! modules (the pieces they share with the tables are in [`crate::format`]).

use std::io::Write;

use proto::metric::TRAIN_LOSS;
use proto::v1;

use crate::format::{counts_text, number, sweep_state_name, timestamp};

/// How a read command prints its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    #[default]
    Table,
    /// The proto's JSON mapping: one object, or an array for lists.
    Json,
    /// Comma-separated values with a header row (RFC 4180 quoting).
    Csv,
}

/// Rows under a header, rendered as a table or as CSV.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    /// Left-aligned columns separated by two spaces, no trailing blanks.
    pub fn to_text(&self) -> String {
        let cols = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(cols) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate().take(cols) {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                let pad = widths[i] - cell.chars().count();
                line.extend(std::iter::repeat_n(' ', pad));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    /// CSV with a header row; fields with commas, quotes or line breaks are quoted.
    pub fn to_csv(&self) -> String {
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let fields: Vec<String> = row.iter().map(|f| csv_field(f)).collect();
            out.push_str(&fields.join(","));
            out.push('\n');
        }
        out
    }

    /// The table in a text format (`Json` is not a table format: the caller prints JSON itself).
    pub fn render(&self, output: Output) -> String {
        match output {
            Output::Csv => self.to_csv(),
            Output::Table | Output::Json => self.to_text(),
        }
    }
}

fn csv_field(field: &str) -> String {
    if field.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_string()
    }
}

/// A value as the proto JSON mapping prints it, pretty.
pub fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string_pretty(value).expect("proto messages always serialise to JSON") + "\n"
}

/// JSON as the proto mapping, or the table in the chosen text format.
pub fn render<T: serde::Serialize>(
    out: Output,
    value: &T,
    table: impl FnOnce() -> Table,
) -> String {
    match out {
        Output::Json => json(value),
        other => table().render(other),
    }
}

/// Writes a result to stdout.
pub fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    // A closed pipe (`trainq list | head`) is not an error worth a panic.
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

pub fn state(job: &v1::Job) -> &'static str {
    proto::state_name(job.state())
}

/// Jobs as rows: id, name, state, attempt, created, and the latest loss if any.
pub fn jobs_table(jobs: &[v1::Job]) -> Table {
    let mut t = Table::new(&["ID", "NAME", "KIND", "STATE", "ATTEMPT", "CREATED", "LOSS"]);
    for job in jobs {
        let spec = job.spec.as_ref();
        let kind = match spec.and_then(|s| s.experiment.as_ref()) {
            Some(v1::job_spec::Experiment::MnistClassifier(_)) => "mnist_classifier",
            Some(v1::job_spec::Experiment::CifarCvae(_)) => "cifar_cvae",
            None => "-",
        };
        let loss = job
            .latest_metrics
            .iter()
            .find(|m| m.name == TRAIN_LOSS)
            .map_or("-".into(), |m| number(m.value));
        t.push(vec![
            job.id.clone(),
            spec.map_or("-".into(), |s| s.name.clone()),
            kind.into(),
            state(job).into(),
            job.attempt.to_string(),
            timestamp(job.created_at.as_ref()),
            loss,
        ]);
    }
    t
}

/// One job as FIELD / VALUE rows, then its latest metrics.
pub fn job_table(job: &v1::Job) -> Table {
    let mut t = Table::new(&["FIELD", "VALUE"]);
    let mut row = |k: &str, v: String| t.push(vec![k.into(), v]);
    row("id", job.id.clone());
    row(
        "name",
        job.spec.as_ref().map_or("-".into(), |s| s.name.clone()),
    );
    row("state", state(job).into());
    row("attempt", job.attempt.to_string());
    row("failed_attempts", job.failed_attempts.to_string());
    row("worker", or_dash(&job.worker_id));
    row("created", timestamp(job.created_at.as_ref()));
    row("started", timestamp(job.started_at.as_ref()));
    row("finished", timestamp(job.finished_at.as_ref()));
    row("final_step", job.final_step.to_string());
    if let Some(spec) = &job.spec {
        let queue = if spec.queue.is_empty() {
            proto::queue::DEFAULT_QUEUE
        } else {
            &spec.queue
        };
        row("queue", queue.to_string());
        row("priority", spec.priority.to_string());
    }
    if !job.waiting_reason.is_empty() {
        row("waiting", job.waiting_reason.clone());
    }
    row("error", or_dash(&job.error));
    for m in &job.latest_metrics {
        row(
            &m.name,
            format!("{} (epoch {}, step {})", number(m.value), m.epoch, m.step),
        );
    }
    t
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

/// The fleet, one worker per row: id, state, host, slots busy/total, queues, device memory in
/// use / in all (GiB), last report, and the jobs it runs.
pub fn workers_table(workers: &[v1::Worker]) -> Table {
    let mut t = Table::new(&[
        "WORKER",
        "STATE",
        "HOST",
        "SLOTS",
        "QUEUES",
        "DEVICES",
        "LAST SEEN",
        "RUNNING",
    ]);
    for w in workers {
        let state = match v1::WorkerState::try_from(w.state) {
            Ok(v1::WorkerState::Live) => "live",
            Ok(v1::WorkerState::Lost) => "lost",
            _ => "-",
        };
        let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
        let devices: Vec<String> = w
            .devices
            .iter()
            .map(|d| {
                if d.memory_total_bytes == 0 {
                    d.name.clone()
                } else {
                    format!(
                        "{} {:.1}/{:.1} GiB",
                        d.name,
                        gib(d.memory_used_bytes),
                        gib(d.memory_total_bytes)
                    )
                }
            })
            .collect();
        t.push(vec![
            w.worker_id.clone(),
            state.into(),
            or_dash(&w.host),
            format!("{}/{}", w.slots_busy, w.slots_total),
            w.queues.join(","),
            or_dash(&devices.join(", ")),
            timestamp(w.last_seen_at.as_ref()),
            or_dash(&w.running_job_ids.join(",")),
        ]);
    }
    t
}

/// Metric points, one per row: name, epoch, step, value (full precision for CSV).
pub fn metrics_table(points: &[v1::MetricPoint], exact: bool) -> Table {
    let mut t = Table::new(&["name", "epoch", "step", "value"]);
    for p in points {
        t.push(vec![
            p.name.clone(),
            p.epoch.to_string(),
            p.step.to_string(),
            if exact {
                p.value.to_string()
            } else {
                number(p.value)
            },
        ]);
    }
    t
}

pub fn artifacts_table(artifacts: &[v1::Artifact]) -> Table {
    let mut t = Table::new(&[
        "ID", "KIND", "NAME", "EPOCH", "STEP", "SIZE", "SHA256", "CREATED",
    ]);
    for a in artifacts {
        t.push(vec![
            a.id.clone(),
            a.kind.clone(),
            a.name.clone(),
            a.epoch.to_string(),
            a.step.to_string(),
            a.size_bytes.to_string(),
            a.sha256.chars().take(12).collect(),
            timestamp(a.created_at.as_ref()),
        ]);
    }
    t
}

fn sweep_state(sweep: &v1::Sweep) -> &'static str {
    sweep_state_name(sweep.state())
}

/// Sweeps as rows: id, name, state, arms, seeds, jobs by state, created.
pub fn sweeps_table(sweeps: &[v1::Sweep]) -> Table {
    let mut t = Table::new(&["ID", "NAME", "STATE", "ARMS", "SEEDS", "JOBS", "CREATED"]);
    for s in sweeps {
        let spec = s.spec.as_ref();
        t.push(vec![
            s.sweep_id.clone(),
            spec.map_or("-".into(), |p| p.name.clone()),
            sweep_state(s).into(),
            s.arms.len().to_string(),
            spec.map_or(0, |p| p.seeds.len()).to_string(),
            counts_text(&s.jobs_by_state),
            timestamp(s.created_at.as_ref()),
        ]);
    }
    t
}

/// One sweep as FIELD / VALUE rows.
pub fn sweep_table(sweep: &v1::Sweep) -> Table {
    let mut t = Table::new(&["FIELD", "VALUE"]);
    let spec = sweep.spec.clone().unwrap_or_default();
    let mut row = |k: &str, v: String| t.push(vec![k.into(), v]);
    row("id", sweep.sweep_id.clone());
    row("name", spec.name.clone());
    row("state", sweep_state(sweep).into());
    row("created", timestamp(sweep.created_at.as_ref()));
    for axis in &spec.grid {
        row(
            "grid",
            format!("{} ({} values)", axis.field, axis.values.len()),
        );
    }
    row("arms", sweep.arms.join(", "));
    let seeds: Vec<String> = spec.seeds.iter().map(|s| s.to_string()).collect();
    row("seeds", seeds.join(", "));
    row("jobs", counts_text(&sweep.jobs_by_state));
    t
}

/// A sweep's jobs, one per row: arm, seed, state, job id.
pub fn sweep_runs_table(sweep: &v1::Sweep) -> Table {
    let mut t = Table::new(&["ARM", "SEED", "STATE", "JOB"]);
    for r in &sweep.runs {
        t.push(vec![
            r.arm.clone(),
            r.seed.to_string(),
            proto::state_name(r.state()).into(),
            r.job_id.clone(),
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::point;

    #[test]
    fn a_table_aligns_its_columns_without_trailing_blanks() {
        let mut t = Table::new(&["A", "LONGER"]);
        t.push(vec!["wide cell".into(), "x".into()]);
        t.push(vec!["b".into(), "".into()]);
        assert_eq!(t.to_text(), "A          LONGER\nwide cell  x\nb\n");
    }

    #[test]
    fn csv_quotes_fields_with_commas_quotes_and_line_breaks() {
        let mut t = Table::new(&["name", "value"]);
        t.push(vec!["a,b".into(), "say \"hi\"".into()]);
        t.push(vec!["two\nlines".into(), "plain".into()]);
        assert_eq!(
            t.to_csv(),
            "name,value\n\"a,b\",\"say \"\"hi\"\"\"\n\"two\nlines\",plain\n"
        );
    }

    #[test]
    fn metrics_print_as_csv_with_full_precision_and_as_a_rounded_table() {
        let points = [
            point("train/loss", 20, 1, 0.123456789),
            point("test/accuracy", 4, 1, 0.9),
        ];
        assert_eq!(
            metrics_table(&points, true).to_csv(),
            "name,epoch,step,value\ntrain/loss,1,20,0.123456789\ntest/accuracy,1,4,0.9\n"
        );
        assert_eq!(
            metrics_table(&points, false).to_text(),
            "name           epoch  step  value\n\
             train/loss     1      20    0.123457\n\
             test/accuracy  1      4     0.9\n"
        );
    }

    #[test]
    fn metric_points_print_as_the_proto_json_mapping() {
        let text = json(&vec![point("train/loss", 20, 1, 0.5)]);
        let value: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(value[0]["name"], "train/loss");
        assert_eq!(value[0]["step"], "20");
        assert_eq!(value[0]["value"], 0.5);
    }
}
