//! `trainq metrics` (a job's series as a table, CSV or JSON) and `trainq plot` (one metric of
//! several jobs on one chart), and [`series`], the paging loop over GetMetrics they and
//! `trainq report` share.
//!
//! Glue only: tables are [`crate::output`]'s and drawing is [`crate::plot`]'s.

use proto::v1;

use crate::args::{PlotArgs, XAxis};
use crate::client::{exit, CliError, Client};
use crate::output::{self, print, render, Output};
use crate::plot;

/// Points per GetMetrics page: the coordinator's largest (trainq.proto).
const PAGE_SIZE: u32 = 5000;

/// The job's points of `names` (every metric when empty) in (name, step) order, page after page
/// until the coordinator says there are no more; with `max_points`, each series as the
/// coordinator's selection of at most that many points. `what` prefixes errors.
pub(crate) async fn series(
    c: &Client,
    job: &str,
    names: &[String],
    max_points: Option<u32>,
    what: &str,
) -> Result<Vec<v1::MetricPoint>, CliError> {
    let mut c = c.clone();
    let mut points = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = c
            .get_metrics(v1::GetMetricsRequest {
                job_id: job.to_string(),
                names: names.to_vec(),
                page_size: PAGE_SIZE,
                page_token,
                max_points: max_points.unwrap_or(0),
            })
            .await
            .map_err(|s| CliError::from_status(what, &s))?
            .into_inner();
        points.extend(page.points);
        if page.next_page_token.is_empty() {
            return Ok(points);
        }
        page_token = page.next_page_token;
    }
}

/// `trainq metrics`: every point of the job's metrics (or of `names`), or at most `max_points`
/// per series; CSV keeps full precision.
pub async fn metrics(
    c: &Client,
    job: &str,
    names: &[String],
    max_points: Option<u32>,
    out: Output,
) -> Result<u8, CliError> {
    let points = series(c, job, names, max_points, &format!("metrics {job}")).await?;
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
        // A point per pixel column is all a chart can show: the coordinator selects them, so a
        // series of a million points plots as fast as a short one.
        let points = series(
            &c,
            id,
            std::slice::from_ref(&args.metric),
            Some(plot::SIZE.0),
            &format!("plot {id}"),
        )
        .await?;
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
