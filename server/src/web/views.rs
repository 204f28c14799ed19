//! The pages' HTML (maud: every `(value)` is escaped; nothing here builds markup by hand).
//! Tables and images are plain HTML; the charts are drawn by `static/app.js` from a JSON block
//! in the page.

use std::collections::BTreeMap;

use maud::{html, Markup, PreEscaped, DOCTYPE};
use proto::spec::Experiment;
use proto::{report, state_name, v1, AttemptOutcome, JobState, SweepState};

use super::pages::{RunsQuery, RUN_POINTS};
use super::session::Session;

/// Most metric columns in the runs table (the test metrics first).
const METRIC_COLUMNS: usize = 6;
/// The CIFAR-100 fine classes of the sample grid's rows, top to bottom (the worker's
/// `SAMPLE_CLASSES`, labels 0, 10, ..., 90, in the data set's own label order).
const SAMPLE_ROWS: [&str; 10] = [
    "apple", "bowl", "chair", "dolphin", "lamp", "mouse", "plain", "rose", "squirrel", "train",
];

fn outcome_name(o: v1::AttemptOutcome) -> &'static str {
    AttemptOutcome::try_from(o).map_or("unspecified", AttemptOutcome::as_str)
}

fn sweep_state_name(s: v1::SweepState) -> &'static str {
    SweepState::try_from(s).map_or("unspecified", SweepState::as_str)
}

fn time(t: &Option<proto::Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

fn seconds_between(a: &Option<proto::Timestamp>, b: &Option<proto::Timestamp>) -> Option<i64> {
    Some(b.as_ref()?.seconds - a.as_ref()?.seconds)
}

fn duration(secs: Option<i64>) -> String {
    match secs {
        None => String::new(),
        Some(s) if s < 60 => format!("{s} s"),
        Some(s) if s < 3600 => format!("{}m {:02}s", s / 60, s % 60),
        Some(s) => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn value(v: f64) -> String {
    report::num(v)
}

/// The job's queue (a spec stored before queues existed has none: the default).
fn queue_of(spec: &v1::JobSpec) -> &str {
    if spec.queue.is_empty() {
        proto::queue::DEFAULT_QUEUE
    } else {
        &spec.queue
    }
}

fn kind_of(spec: &Option<v1::JobSpec>) -> &'static str {
    match spec.as_ref().and_then(|s| s.experiment.as_ref()) {
        Some(v1::job_spec::Experiment::MnistClassifier(_)) => "mnist_classifier",
        Some(v1::job_spec::Experiment::CifarCvae(_)) => "cifar_cvae",
        None => "",
    }
}

/// JSON for a `<script type="application/json">` block: `<` escaped, so no text inside can
/// close the element (in JSON, `<` can only occur inside strings, where `\u003c` means the same).
fn script_json(v: &serde_json::Value) -> PreEscaped<String> {
    PreEscaped(v.to_string().replace('<', "\\u003c"))
}

fn layout(title: &str, session: Option<&Session>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · trainq" }
                link rel="stylesheet" href="/static/uPlot.min.css";
                link rel="stylesheet" href="/static/app.css";
            }
            body {
                nav {
                    a.brand href="/" { "trainq" }
                    a href="/" { "Runs" }
                    a href="/sweeps" { "Sweeps" }
                    a href="/workers" { "Workers" }
                    @if let Some(s) = session.filter(|s| s.signed_in) {
                        form.logout method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(s.csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
                script src="/static/uPlot.iife.min.js" {}
                script src="/static/app.js" {}
            }
        }
    }
}

pub fn error_page(title: &str, message: &str) -> Markup {
    layout(
        title,
        None,
        html! {
            h1 { (title) }
            p.error { (message) }
            p { a href="/" { "Back to the runs" } }
        },
    )
}

pub fn login_page(next: &str, message: Option<&str>) -> Markup {
    layout(
        "Sign in",
        None,
        html! {
            h1 { "Sign in" }
            p { "This coordinator needs a client token (the one the CLI and grpcurl send)." }
            @if let Some(m) = message { p.error #login-error { (m) } }
            form #login method="post" action="/login" {
                input type="hidden" name="next" value=(next);
                label { "Client token " input #token type="password" name="token" autocomplete="current-password" required; }
                " "
                button #sign-in type="submit" { "Sign in" }
            }
        },
    )
}

/// The order metrics are shown in: test metrics first, then the rest, alphabetically.
fn metric_order(name: &str) -> (bool, &str) {
    (!name.starts_with("test/"), name)
}

/// The metric shown first (see [`metric_order`]).
pub fn preferred_metric(names: &[String]) -> Option<String> {
    names
        .iter()
        .min_by(|a, b| metric_order(a).cmp(&metric_order(b)))
        .cloned()
}

fn metric_columns(jobs: &[v1::Job]) -> Vec<String> {
    let mut names: Vec<String> = jobs
        .iter()
        .flat_map(|j| j.latest_metrics.iter().map(|m| m.name.clone()))
        .collect();
    names.sort_by(|a, b| metric_order(a).cmp(&metric_order(b)));
    names.dedup();
    names.truncate(METRIC_COLUMNS);
    names
}

fn runs_link(q: &RunsQuery, page: &str) -> String {
    let mut pairs: Vec<(&str, String)> = Vec::new();
    for (k, v) in [
        ("state", &q.state),
        ("kind", &q.kind),
        ("name", &q.name),
        ("label", &q.label),
    ] {
        if !v.is_empty() {
            pairs.push((k, v.clone()));
        }
    }
    if let Some(size) = q.size {
        pairs.push(("size", size.to_string()));
    }
    pairs.push(("page", page.to_string()));
    format!(
        "/?{}",
        serde_urlencoded::to_string(&pairs).unwrap_or_default()
    )
}

pub fn runs_page(session: &Session, q: &RunsQuery, page: &v1::ListJobsResponse) -> Markup {
    let columns = metric_columns(&page.jobs);
    layout(
        "Runs",
        Some(session),
        html! {
            h1 { "Runs" }
            form.filters #filters method="get" action="/" {
                label { "State "
                    select name="state" {
                        option value="" { "any" }
                        @for s in JobState::ALL.iter().map(|s| s.as_str()) { option value=(s) selected[q.state == s] { (s) } }
                    }
                }
                label { "Kind "
                    select name="kind" {
                        option value="" { "any" }
                        @for k in Experiment::KINDS { option value=(k) selected[q.kind == k] { (k) } }
                    }
                }
                label { "Name contains " input name="name" value=(q.name); }
                label { "Label " input name="label" placeholder="key=value" value=(q.label); }
                button type="submit" { "Filter" }
            }
            form #compare-form method="get" action="/compare" {
                table.runs #runs {
                    thead { tr {
                        th { "" } th { "Name" } th { "State" } th { "Kind" } th { "Queue" }
                        th { "Created" } th { "Duration" } th { "Attempts" }
                        @for c in &columns { th.num { (c) } }
                    } }
                    tbody {
                        @for job in &page.jobs {
                            @let spec = job.spec.clone().unwrap_or_default();
                            tr data-job-id=(job.id) {
                                td { input type="checkbox" name="run" value=(job.id); }
                                td.name { a href={ "/runs/" (job.id) } { (spec.name) } }
                                td { span class={ "state " (state_name(job.state())) } { (state_name(job.state())) } }
                                td { (kind_of(&job.spec)) }
                                td { (queue_of(&spec)) }
                                td { (time(&job.created_at)) }
                                td { (duration(seconds_between(&job.started_at, &job.finished_at))) }
                                td.num { (job.attempt) }
                                @for c in &columns {
                                    td.num { @if let Some(m) = job.latest_metrics.iter().find(|m| &m.name == c) { (value(m.value)) } }
                                }
                            }
                        }
                    }
                }
                @if page.jobs.is_empty() { p #no-runs { "No runs match." } }
                p {
                    button type="submit" { "Compare selected" }
                    @if !page.next_page_token.is_empty() {
                        " " a #next-page href=(runs_link(q, &page.next_page_token)) { "Next page →" }
                    }
                }
            }
        },
    )
}

pub fn run_page(
    session: &Session,
    job: &v1::Job,
    series: &BTreeMap<String, Vec<(u64, f64)>>,
    after: i64,
    artifacts: &[v1::Artifact],
) -> Markup {
    let spec = job.spec.clone().unwrap_or_default();
    let state = job.state();
    let data = serde_json::json!({
        "job_id": job.id,
        "live": !state.is_terminal(),
        "events": format!("/runs/{}/events?after={after}", job.id),
        "max_points": RUN_POINTS,
        "series": series
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::json!(v.iter().map(|(s, y)| serde_json::json!([s, y])).collect::<Vec<_>>())))
            .collect::<serde_json::Map<String, serde_json::Value>>(),
    });
    let spec_json = job
        .spec
        .as_ref()
        .and_then(|s| serde_json::to_string_pretty(s).ok())
        .unwrap_or_default();
    let newest = |kind: &str| artifacts.iter().rev().find(|a| a.kind == kind);
    layout(
        &spec.name,
        Some(session),
        html! {
            h1 { (spec.name) }
            p.meta {
                "State: " strong #state class={ "state " (state_name(state)) } { (state_name(state)) }
                " · kind " (kind_of(&job.spec)) " · queue " (queue_of(&spec)) " · priority " (spec.priority)
                " · attempt " (job.attempt) " · worker " (job.worker_id)
            }
            @if !job.error.is_empty() { p.error #job-error { (job.error) } }
            @if !job.waiting_reason.is_empty() { p.waiting { "Waiting: " (job.waiting_reason) } }
            @if !state.is_terminal() {
                form #cancel method="post" action={ "/runs/" (job.id) "/cancel" } {
                    input type="hidden" name="csrf" value=(session.csrf);
                    button #cancel-button type="submit" { "Cancel this run" }
                }
            }
            h2 { "Curves" }
            div #charts {}
            noscript { p { "The charts need JavaScript; the latest values are below." } }
            script #run-data type="application/json" { (script_json(&data)) }
            h2 { "Latest metrics" }
            table #latest { tbody {
                @for m in &job.latest_metrics {
                    tr { td { (m.name) } td.num { (value(m.value)) } td { "step " (m.step) ", epoch " (m.epoch) } }
                }
            } }
            @if let Some(a) = newest("samples") {
                h2 { "Samples (rows: classes)" }
                div.grid {
                    ol.classes { @for c in SAMPLE_ROWS { li { (c) } } }
                    img #samples src={ "/artifacts/" (a.id) } alt="sample grid";
                }
            }
            @if let Some(a) = newest("reconstructions") {
                h2 { "Reconstructions (test images above their reconstructions)" }
                img #reconstructions src={ "/artifacts/" (a.id) } alt="reconstructions";
            }
            h2 { "Attempts" }
            table #attempts {
                thead { tr { th { "#" } th { "Worker" } th { "Claimed" } th { "Ended" } th { "Outcome" } th { "Resumed from step" } th { "Reason" } } }
                tbody { @for a in &job.attempts {
                    tr {
                        td { (a.attempt) } td { (a.worker_id) } td { (time(&a.claimed_at)) } td { (time(&a.ended_at)) }
                        td { (outcome_name(a.outcome())) }
                        td.num { (a.resumed_from_step) } td { (a.reason) }
                    }
                } }
            }
            h2 { "Artifacts" }
            table #artifacts {
                thead { tr { th { "Kind" } th { "Name" } th { "Attempt" } th { "Epoch" } th { "Step" } th { "Bytes" } } }
                tbody { @for a in artifacts {
                    tr { td { (a.kind) } td { a href={ "/artifacts/" (a.id) } { (a.name) } } td { (a.attempt) } td { (a.epoch) } td { (a.step) } td.num { (a.size_bytes) } }
                } }
            }
            h2 { "Spec" }
            pre #spec { (spec_json) }
        },
    )
}

pub fn sweeps_page(session: &Session, page: &v1::ListSweepsResponse) -> Markup {
    layout(
        "Sweeps",
        Some(session),
        html! {
            h1 { "Sweeps" }
            table #sweeps {
                thead { tr { th { "Name" } th { "State" } th { "Arms" } th { "Jobs" } th { "Created" } } }
                tbody { @for s in &page.sweeps {
                    tr {
                        td { a href={ "/sweeps/" (s.sweep_id) } { (s.spec.as_ref().map(|s| s.name.as_str()).unwrap_or("")) } }
                        td { (sweep_state_name(s.state())) }
                        td.num { (s.arms.len()) }
                        td { (job_counts(&s.jobs_by_state)) }
                        td { (time(&s.created_at)) }
                    }
                } }
            }
            @if !page.next_page_token.is_empty() {
                p { a href={ "/sweeps?page=" (page.next_page_token) } { "Next page →" } }
            }
        },
    )
}

fn job_counts(counts: &[v1::StateCount]) -> String {
    counts
        .iter()
        .map(|c| format!("{} {}", c.count, state_name(c.state())))
        .collect::<Vec<_>>()
        .join(", ")
}

fn stat_cell(s: &Option<v1::Stat>) -> Markup {
    html! {
        @match s {
            None => {},
            Some(s) => {
                (value(s.mean))
                @if let (Some(lo), Some(hi)) = (s.ci_low, s.ci_high) { " [" (value(lo)) ", " (value(hi)) "]" }
                " n=" (s.n)
            }
        }
    }
}

fn verdict_word(v: &report::Verdict) -> &'static str {
    match v {
        report::Verdict::Better { .. } => "better",
        report::Verdict::Worse { .. } => "worse",
        report::Verdict::NoDifference { .. } => "no difference",
        report::Verdict::TooFewSeeds { .. } => "too few seeds",
    }
}

pub fn sweep_page(
    session: &Session,
    sweep: &v1::Sweep,
    summary: &Result<v1::SweepSummary, String>,
    curves: &[report::Curve],
    grids: &[(String, u64, String, String)],
) -> Markup {
    let name = sweep
        .spec
        .as_ref()
        .map(|s| s.name.clone())
        .unwrap_or_default();
    let total: u32 = sweep.jobs_by_state.iter().map(|c| c.count).sum();
    let done: u32 = sweep
        .jobs_by_state
        .iter()
        .filter(|c| c.state().is_terminal())
        .map(|c| c.count)
        .sum();
    let curve_data = serde_json::json!({
        "metric": summary.as_ref().map(|s| s.convergence_metric.clone()).unwrap_or_default(),
        "curves": curves.iter().map(|c| serde_json::json!({
            "arm": c.arm,
            "points": c.points.iter().map(|(s, m, sd)| serde_json::json!([s, m, sd])).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    layout(
        &name,
        Some(session),
        html! {
            h1 { "Sweep " (name) }
            p.meta #progress { (done) " of " (total) " jobs ended · " (job_counts(&sweep.jobs_by_state)) }
            @match summary {
                Err(message) => {
                    p.error #summary-error { "No summary: " (message) }
                    p { "Compare with: "
                        @for arm in &sweep.arms { a href={ "?baseline=" (arm) } { (arm) } " " }
                    }
                },
                Ok(summary) => {
                    p { "Baseline arm: " strong #baseline { (summary.baseline_arm) }
                        " · convergence on " (summary.convergence_metric) }
                    table #arms {
                        thead { tr {
                            th { "Arm" } th { "Seeds" } th { "Metric" } th { "Final mean [95% CI]" }
                            th { "Paired diff from baseline [95% CI]" } th { "Verdict" } th { "Early (epoch 1) diff" } th { "Early verdict" }
                        } }
                        tbody {
                            @for arm in &summary.arms {
                                @for (i, m) in arm.metrics.iter().enumerate() {
                                    @let lower = report::lower_is_better(&m.name);
                                    tr data-arm=(arm.arm) data-metric=(m.name) {
                                        td { @if i == 0 { (arm.arm) @if arm.baseline { " (baseline)" } } }
                                        td.num { @if i == 0 { (arm.seeds_succeeded) "/" (arm.seeds_planned) } }
                                        td { (m.name) }
                                        td.num.last { (stat_cell(&m.last)) }
                                        td.num.diff { (stat_cell(&m.last_diff)) }
                                        td.verdict { @if !arm.baseline { (verdict_word(&report::judge(m.last_diff.as_ref(), lower))) } }
                                        td.num { (stat_cell(&m.early_diff)) }
                                        td { @if !arm.baseline { (verdict_word(&report::judge(m.early_diff.as_ref(), lower))) } }
                                    }
                                }
                            }
                        }
                    }
                    ul #verdicts {
                        @for arm in summary.arms.iter().filter(|a| !a.baseline) {
                            @for m in &arm.metrics {
                                li { (report::verdict_sentence(&arm.arm, &summary.baseline_arm, m)) }
                            }
                        }
                    }
                    @let missing: Vec<_> = summary.arms.iter().flat_map(|a| a.missing.iter().map(move |m| (a.arm.clone(), m))).collect();
                    @if !missing.is_empty() {
                        h2 { "Runs without a result" }
                        table #missing {
                            thead { tr { th { "Arm" } th { "Seed" } th { "State" } th { "Error" } } }
                            tbody { @for (arm, m) in &missing {
                                tr { td { (arm) } td { (m.seed) } td { a href={ "/runs/" (m.job_id) } { (state_name(m.state())) } } td { (m.error) } }
                            } }
                        }
                    }
                    h2 { "Mean curves (± 1 sd over seeds)" }
                    div #sweep-charts {}
                    script #sweep-data type="application/json" { (script_json(&curve_data)) }
                },
            }
            @if !grids.is_empty() {
                h2 { "One sample grid per arm (its lowest succeeded seed)" }
                div.grids {
                    @for (arm, seed, job_id, artifact) in grids {
                        figure {
                            img src={ "/artifacts/" (artifact) } alt={ "samples of " (arm) };
                            figcaption { a href={ "/runs/" (job_id) } { (arm) " (seed " (seed) ")" } }
                        }
                    }
                }
            }
            h2 { "Runs" }
            form method="get" action="/compare" {
                table #sweep-runs {
                    thead { tr { th {} th { "Arm" } th { "Seed" } th { "State" } } }
                    tbody { @for r in &sweep.runs {
                        tr {
                            td { input type="checkbox" name="run" value=(r.job_id); }
                            td { (r.arm) } td { (r.seed) }
                            td { a href={ "/runs/" (r.job_id) } { (state_name(r.state())) } }
                        }
                    } }
                }
                button type="submit" { "Compare selected" }
            }
        },
    )
}

pub fn compare_page(
    session: &Session,
    names: &[String],
    metric: &str,
    lines: &[(v1::Job, Vec<(u64, f64)>)],
) -> Markup {
    let data = serde_json::json!({
        "metric": metric,
        "runs": lines.iter().map(|(job, pts)| serde_json::json!({
            "label": format!("{} ({})", job.spec.as_ref().map(|s| s.name.as_str()).unwrap_or(""), &job.id[..8.min(job.id.len())]),
            "points": pts.iter().map(|(s, v)| serde_json::json!([s, v])).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    layout(
        "Compare",
        Some(session),
        html! {
            h1 { "Compare " (lines.len()) " runs" }
            form #metric-form method="get" action="/compare" {
                @for (job, _) in lines { input type="hidden" name="run" value=(job.id); }
                label { "Metric "
                    select name="metric" {
                        @for n in names { option value=(n) selected[n == metric] { (n) } }
                    }
                }
                button type="submit" { "Show" }
            }
            div #compare-charts {}
            script #compare-data type="application/json" { (script_json(&data)) }
            table #compared {
                thead { tr { th { "Run" } th { "State" } th { "Points shown" } th { "Last value" } } }
                tbody { @for (job, pts) in lines {
                    tr {
                        td { a href={ "/runs/" (job.id) } { (job.spec.as_ref().map(|s| s.name.as_str()).unwrap_or("")) } }
                        td { (state_name(job.state())) }
                        td.num { (pts.len()) }
                        td.num { @if let Some((_, v)) = pts.last() { (value(*v)) } }
                    }
                } }
            }
        },
    )
}

pub fn workers_page(session: &Session, workers: &[v1::Worker], all: bool) -> Markup {
    layout(
        "Workers",
        Some(session),
        html! {
            h1 { "Workers" }
            p { @if all { a href="/workers" { "Only live workers" } } @else { a href="/workers?all=true" { "Include lost workers" } } }
            table #workers {
                thead { tr { th { "Worker" } th { "Host" } th { "State" } th { "Devices" } th { "Slots busy" } th { "Queues" } th { "Version" } th { "Last seen" } th { "Running" } } }
                tbody { @for w in workers {
                    tr {
                        td { (w.worker_id) } td { (w.host) }
                        td { (w.state().as_str_name().trim_start_matches("WORKER_STATE_").to_ascii_lowercase()) }
                        td { @for d in &w.devices {
                            (d.name)
                            @if d.memory_total_bytes > 0 { " (" (d.memory_used_bytes >> 20) "/" (d.memory_total_bytes >> 20) " MiB)" }
                            " "
                        } }
                        td.num { (w.slots_busy) "/" (w.slots_total) }
                        td { (w.queues.join(", ")) } td { (w.version) } td { (time(&w.last_seen_at)) }
                        td { @for id in &w.running_job_ids { a href={ "/runs/" (id) } { (&id[..8.min(id.len())]) } " " } }
                    }
                } }
            }
            @if workers.is_empty() { p { "No live workers." } }
        },
    )
}
