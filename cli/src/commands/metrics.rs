//! `trainq metrics` (a job's series as a table, CSV or JSON) and `trainq plot` (one metric of
//! several jobs on one chart).
//!
//! Glue only: tables are [`crate::output`]'s and drawing is [`crate::plot`]'s.

use proto::v1;

use crate::args::{PlotArgs, XAxis};
use crate::client::{exit, CliError, Client};
use crate::output::{self, print, render, Output};
use crate::plot;

/// `trainq metrics`: every point of the job's metrics (or of `names`); CSV keeps full precision.
pub async fn metrics(
    c: &Client,
    job: &str,
    names: Vec<String>,
    out: Output,
) -> Result<u8, CliError> {
    let points = c
        .clone()
        .get_metrics(v1::GetMetricsRequest {
            job_id: job.to_string(),
            names,
        })
        .await
        .map_err(|s| CliError::from_status(&format!("metrics {job}"), &s))?
        .into_inner()
        .points;
    let exact = out == Output::Csv;
    print(&render(out, &points, || {
        output::metrics_table(&points, exact)
    }));
    Ok(exit::OK)
}

/// `trainq plot`: the chart, and an SVG next to the PNG with `--svg`; prints the paths.
pub async fn plot(c: &Client, args: &PlotArgs) -> Result<u8, CliError> {
    if !args.labels.is_empty() && args.labels.len() != args.jobs.len() {
        return Err(CliError::usage(format!(
            "{} --label values for {} jobs: give one per job or none",
            args.labels.len(),
            args.jobs.len()
        )));
    }
    let by_epoch = args.x == XAxis::Epoch;
    let mut named = Vec::new();
    for id in &args.jobs {
        let mut c = c.clone();
        let job = c
            .get_job(v1::GetJobRequest { job_id: id.clone() })
            .await
            .map_err(|s| CliError::from_status(&format!("plot {id}"), &s))?
            .into_inner();
        let points = c
            .get_metrics(v1::GetMetricsRequest {
                job_id: id.clone(),
                names: vec![args.metric.clone()],
            })
            .await
            .map_err(|s| CliError::from_status(&format!("plot {id}"), &s))?
            .into_inner()
            .points;
        let name = job.spec.map(|s| s.name).unwrap_or_else(|| id.clone());
        named.push((id.clone(), name, plot::series_points(&points, by_epoch)));
    }
    let mut series = Vec::new();
    for (i, (id, name, points)) in named.iter().enumerate() {
        let label = match args.labels.get(i) {
            Some(l) => l.clone(),
            // Two jobs of the same name get their short ids to tell them apart.
            None if named.iter().filter(|(_, n, _)| n == name).count() > 1 => {
                format!("{name} ({})", &id[..8.min(id.len())])
            }
            None => name.clone(),
        };
        if points.is_empty() {
            eprintln!("trainq: job {id} ({name}) has no {} points", args.metric);
        }
        series.push(plot::Series {
            label,
            points: points.clone(),
            band: Vec::new(),
        });
    }
    if series.iter().all(|s| s.points.is_empty()) {
        return Err(CliError::new(
            exit::NOT_FOUND,
            format!("no job has points of metric {}", args.metric),
        ));
    }
    let x = if by_epoch { "epoch" } else { "step" };
    let chart = plot::Chart {
        title: args
            .title
            .clone()
            .unwrap_or_else(|| format!("{} per {x}", args.metric)),
        x_desc: x.into(),
        y_desc: args.metric.clone(),
        series,
    };
    let mut paths = vec![args.out.clone()];
    if args.svg && args.out.extension().and_then(|e| e.to_str()) != Some("svg") {
        paths.push(args.out.with_extension("svg"));
    }
    for path in paths {
        plot::draw(&chart, &path)
            .map_err(|e| CliError::usage(format!("plot {}: {e:#}", path.display())))?;
        print(&format!("{}\n", path.display()));
    }
    Ok(exit::OK)
}
