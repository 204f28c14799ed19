//! `trainq report SWEEP --out DIR`: fetches the sweep, its summary, the runs' series and one
//! sample grid per arm, then writes report.md, summary.json, curves/ and samples/.
//!
//! Glue only: the curves and verdicts are [`crate::report`]'s, the Markdown is
//! [`crate::markdown`]'s and the statistics are the coordinator's; this module must not compute
//! any of them.

use std::path::Path;

use proto::v1;

use super::artifacts::download;
use super::metrics::series;
use super::sweeps::get_whole_sweep;
use crate::args::ReportArgs;
use crate::client::{exit, CliError, Client};
use crate::output::{self, print, Output};
use crate::{markdown, plot, report};

/// Most points per run and metric the report reads. The curves use each epoch's last point;
/// an epoch-level metric (the default ones) has one point per epoch and comes whole, and a
/// per-step metric of a long run comes as the coordinator's selection, whose last point in an
/// epoch lies within (steps / 10000) steps of the epoch's end.
const REPORT_MAX_POINTS: u32 = 10_000;

/// `trainq report`: fetches the sweep, its summary, every succeeded run's series and one
/// sample grid per arm, and writes the report folder (see [`crate::report`] and [`crate::markdown`]).
pub async fn run(c: &Client, args: &ReportArgs, out: Output) -> Result<u8, CliError> {
    let id = &args.sweep;
    let what = format!("report {id}");
    let mut client = c.clone();
    let sweep = get_whole_sweep(c, id, &what).await?;
    let summary = client
        .get_sweep_summary(v1::GetSweepSummaryRequest {
            sweep_id: id.clone(),
            metrics: args.metrics.clone(),
            baseline_arm: args.baseline.clone().unwrap_or_default(),
            convergence_metric: args.convergence_metric.clone().unwrap_or_default(),
        })
        .await
        .map_err(|s| CliError::from_status(&what, &s))?
        .into_inner();
    let mut metrics: Vec<String> = Vec::new();
    for arm in &summary.arms {
        for m in &arm.metrics {
            if !metrics.contains(&m.name) {
                metrics.push(m.name.clone());
            }
        }
    }
    let mut runs = Vec::new();
    for r in sweep
        .runs
        .iter()
        .filter(|r| !r.source && r.state() == v1::JobState::Succeeded)
    {
        let points = series(
            c,
            &r.job_id,
            &metrics,
            Some(REPORT_MAX_POINTS),
            &format!("{what}: metrics of {}", r.job_id),
        )
        .await?;
        runs.push(report::RunSeries {
            arm: r.arm.clone(),
            seed: r.seed,
            job_id: r.job_id.clone(),
            points,
        });
    }
    let dir = &args.out;
    let io = |path: &Path, e: std::io::Error| {
        CliError::usage(format!("{what}: writing {}: {e}", path.display()))
    };
    for sub in ["curves", "samples"] {
        let p = dir.join(sub);
        std::fs::create_dir_all(&p).map_err(|e| io(&p, e))?;
    }
    let name = sweep.spec.as_ref().map_or("", |s| s.name.as_str());
    let mut figures = Vec::new();
    for metric in &metrics {
        let curves = report::mean_curves(metric, &sweep.arms, &runs);
        if curves.is_empty() {
            continue;
        }
        let chart = report::curves_chart(name, metric, &curves);
        let (png, svg) = report::figure_paths(metric);
        for rel in [png, svg] {
            let path = dir.join(rel);
            plot::draw(&chart, &path)
                .map_err(|e| CliError::usage(format!("{what}: {}: {e:#}", path.display())))?;
        }
        figures.push(metric.clone());
    }
    let mut samples = Vec::new();
    for (arm, seed, job_id) in report::sample_runs(&sweep) {
        let rel = format!("samples/{}.png", report::file_stem(&arm));
        let req = v1::DownloadArtifactRequest {
            job_id: job_id.clone(),
            kind: "samples".into(),
            ..Default::default()
        };
        let path = match download(c, req, Some(&dir.join(&rel)), &what).await {
            Ok(_) => Some(rel),
            Err(e) if e.code == exit::NOT_FOUND => None,
            Err(e) => return Err(e),
        };
        samples.push(report::SampleGrid {
            arm,
            seed,
            job_id,
            path,
        });
    }
    let summary_path = dir.join("summary.json");
    std::fs::write(&summary_path, output::json(&summary)).map_err(|e| io(&summary_path, e))?;
    let md = markdown::markdown(&sweep, &summary, &figures, &samples);
    let md_path = dir.join("report.md");
    std::fs::write(&md_path, &md).map_err(|e| io(&md_path, e))?;
    if out == Output::Json {
        print(&output::json(&summary));
    } else {
        eprintln!(
            "wrote {} ({} arms, {} runs with results, {} figures, {} sample grids)",
            md_path.display(),
            summary.arms.len(),
            runs.len(),
            figures.len() * 2,
            samples.iter().filter(|s| s.path.is_some()).count()
        );
        print(&format!("{}\n", md_path.display()));
    }
    Ok(exit::OK)
}
