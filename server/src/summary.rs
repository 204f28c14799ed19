//! The sweep summary: statistics per arm over random seeds, paired differences from the
//! baseline arm, and convergence speed. Pure: the api reads the rows, this computes.
//!
//! Definitions (the same in the `sweep_summary` SQL view of migration 0005 and in the README):
//!
//! - a run's **early** value of a metric: its point with epoch = 1 and the highest step in
//!   epoch 1 (the end of the first epoch); its **final** value: its point with the highest step;
//! - statistics are over the arm's succeeded runs that have the value: n, mean, sample sd
//!   (n - 1), and the 95% interval mean -/+ t(0.975, n - 1) * sd / sqrt(n); n < 2 gives no sd
//!   and no interval ([`stats::stat`]);
//! - the **paired difference** is arm minus baseline for each seed where both runs succeeded
//!   (and have the value), then the same statistics;
//! - **convergence**: the target is the baseline's final mean of the convergence metric. A
//!   run's curve is its value at each epoch-end step (the highest step of each epoch). The arm's
//!   mean curve is the mean over its succeeded seeds at each step that every one of them has;
//!   the convergence step is the first step where that mean is at or below the target. Per seed:
//!   the first epoch-end step at which the run is at or below the target, with statistics over
//!   the seeds that reached it.
//!
//! Must not do I/O.

use std::collections::{BTreeMap, HashMap};

use proto::{v1, JobId, JobState, SweepId};
use stats::stat;

use crate::domain::MetricPoint;
use crate::store::{SweepArmRow, SweepRunRow};

/// What to summarise.
pub struct SummaryRequest<'a> {
    pub metrics: &'a [String],
    pub baseline: &'a str,
    pub convergence_metric: &'a str,
}

/// A run's values of one metric: early, final, and its epoch-end curve (step, value) by step.
#[derive(Debug, Default, Clone)]
struct Series {
    early: Option<f64>,
    last: Option<f64>,
    curve: Vec<(i64, f64)>,
}

/// Points of one metric in step order.
fn series(points: &[MetricPoint], name: &str) -> Series {
    let mut by_epoch: BTreeMap<i32, (i64, f64)> = BTreeMap::new();
    let mut last: Option<(i64, f64)> = None;
    for p in points.iter().filter(|p| p.name == name) {
        let end = by_epoch.entry(p.epoch).or_insert((p.step, p.value));
        if p.step >= end.0 {
            *end = (p.step, p.value);
        }
        if last.is_none_or(|(s, _)| p.step >= s) {
            last = Some((p.step, p.value));
        }
    }
    let mut curve: Vec<(i64, f64)> = by_epoch.values().copied().collect();
    curve.sort_by_key(|(s, _)| *s);
    Series {
        early: by_epoch.get(&1).map(|(_, v)| *v),
        last: last.map(|(_, v)| v),
        curve,
    }
}

fn some_stat(values: &[f64]) -> Option<v1::Stat> {
    Some(stat(values).into())
}

/// Builds the summary. `points` holds the points of the succeeded runs (by job id). Only each
/// epoch's last point (the highest step of the epoch) counts in any definition above, so the
/// epoch ends alone give the same summary as every point (the store reads only those).
pub fn summarise(
    sweep_id: SweepId,
    arms: &[SweepArmRow],
    runs: &[SweepRunRow],
    points: &HashMap<JobId, Vec<MetricPoint>>,
    req: &SummaryRequest<'_>,
) -> v1::SweepSummary {
    let empty = Vec::new();
    // (arm, seed) -> series per metric, for succeeded runs.
    let succeeded = |arm: &str| -> Vec<&SweepRunRow> {
        runs.iter()
            .filter(|r| !r.is_source && r.arm == arm && r.state == JobState::Succeeded)
            .collect()
    };
    let series_of = |arm: &str, metric: &str| -> Vec<(u64, Series)> {
        succeeded(arm)
            .into_iter()
            .map(|r| {
                (
                    r.seed,
                    series(points.get(&r.job_id).unwrap_or(&empty), metric),
                )
            })
            .collect()
    };
    let baseline_conv = series_of(req.baseline, req.convergence_metric);
    let baseline_finals: Vec<f64> = baseline_conv.iter().filter_map(|(_, s)| s.last).collect();
    let target = (!baseline_finals.is_empty()).then(|| stat(&baseline_finals).mean);

    // The baseline's series of each metric, by seed: what every other arm is paired with.
    let baseline_series: HashMap<&str, HashMap<u64, Series>> = req
        .metrics
        .iter()
        .map(|m| (m.as_str(), series_of(req.baseline, m).into_iter().collect()))
        .collect();

    let mut out = Vec::with_capacity(arms.len());
    for arm in arms {
        let is_baseline = arm.name == req.baseline;
        let planned: Vec<&SweepRunRow> = runs
            .iter()
            .filter(|r| !r.is_source && r.arm == arm.name)
            .collect();
        let missing = planned
            .iter()
            .filter(|r| r.state != JobState::Succeeded)
            .map(|r| v1::MissingRun {
                job_id: r.job_id.to_string(),
                seed: r.seed,
                state: v1::JobState::from(r.state) as i32,
                error: if r.state.is_terminal() {
                    r.error.clone().unwrap_or_default()
                } else {
                    String::new()
                },
            })
            .collect::<Vec<_>>();
        let seeds_succeeded = planned.len() - missing.len();
        let mut metrics = Vec::with_capacity(req.metrics.len());
        for metric in req.metrics {
            let mine = series_of(&arm.name, metric);
            let early: Vec<f64> = mine.iter().filter_map(|(_, s)| s.early).collect();
            let last: Vec<f64> = mine.iter().filter_map(|(_, s)| s.last).collect();
            let (early_diff, last_diff) = if is_baseline {
                (None, None)
            } else {
                let base = &baseline_series[metric.as_str()];
                let diff = |pick: fn(&Series) -> Option<f64>| -> Vec<f64> {
                    mine.iter()
                        .filter_map(|(seed, s)| Some(pick(s)? - pick(base.get(seed)?)?))
                        .collect()
                };
                (some_stat(&diff(|s| s.early)), some_stat(&diff(|s| s.last)))
            };
            metrics.push(v1::MetricSummary {
                name: metric.clone(),
                early: some_stat(&early),
                last: some_stat(&last),
                early_diff,
                last_diff,
            });
        }
        // Convergence.
        let conv = series_of(&arm.name, req.convergence_metric);
        let mut summary = v1::ArmSummary {
            arm: arm.name.clone(),
            baseline: is_baseline,
            seeds_planned: planned.len() as u32,
            seeds_succeeded: seeds_succeeded as u32,
            missing,
            metrics,
            convergence_step: 0,
            converged: false,
            convergence_step_per_seed: None,
            seeds_not_converged: seeds_succeeded as u32,
        };
        if let Some(target) = target {
            let curves: Vec<&Vec<(i64, f64)>> = conv
                .iter()
                .map(|(_, s)| &s.curve)
                .filter(|c| !c.is_empty())
                .collect();
            if let Some(first) = curves.first() {
                for (step, _) in first.iter() {
                    let values: Option<Vec<f64>> = curves
                        .iter()
                        .map(|c| c.iter().find(|(s, _)| s == step).map(|(_, v)| *v))
                        .collect();
                    if let Some(values) = values {
                        if stat(&values).mean <= target {
                            summary.convergence_step = (*step).max(0) as u64;
                            summary.converged = true;
                            break;
                        }
                    }
                }
            }
            let reached: Vec<f64> = conv
                .iter()
                .filter_map(|(_, s)| s.curve.iter().find(|(_, v)| *v <= target))
                .map(|(step, _)| *step as f64)
                .collect();
            summary.seeds_not_converged =
                (seeds_succeeded - reached.len().min(seeds_succeeded)) as u32;
            summary.convergence_step_per_seed = Some(stat(&reached).into());
        } else {
            summary.convergence_step_per_seed = Some(stat(&[]).into());
        }
        out.push(summary);
    }
    v1::SweepSummary {
        sweep_id: sweep_id.to_string(),
        baseline_arm: req.baseline.to_owned(),
        convergence_metric: req.convergence_metric.to_owned(),
        convergence_target: target.unwrap_or(0.0),
        arms: out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, step: i64, epoch: i32, value: f64) -> MetricPoint {
        MetricPoint {
            name: name.into(),
            step,
            epoch,
            value,
        }
    }

    #[test]
    fn early_is_the_end_of_epoch_one_and_final_the_highest_step() {
        let points = [
            p("m", 5, 1, 3.0),
            p("m", 10, 1, 2.0),
            p("m", 20, 2, 1.0),
            p("other", 30, 2, 9.0),
        ];
        let s = series(&points, "m");
        assert_eq!(s.early, Some(2.0));
        assert_eq!(s.last, Some(1.0));
        assert_eq!(s.curve, [(10, 2.0), (20, 1.0)]);
    }

    #[test]
    fn the_epoch_end_points_alone_give_the_same_summary_as_every_point() {
        let arms = [
            SweepArmRow {
                position: 0,
                name: "random".into(),
                baseline: true,
            },
            SweepArmRow {
                position: 1,
                name: "transfer".into(),
                baseline: false,
            },
        ];
        let mut runs = Vec::new();
        let mut all = HashMap::new();
        for (a, arm) in arms.iter().enumerate() {
            for seed in 0..3u64 {
                let job_id = JobId::from(uuid::Uuid::now_v7());
                runs.push(SweepRunRow {
                    position: runs.len() as i32,
                    job_id,
                    arm: arm.name.clone(),
                    seed,
                    is_source: false,
                    state: JobState::Succeeded,
                    error: None,
                });
                // Three epochs of 10 steps; a per-step metric and an epoch-end one.
                let mut points = Vec::new();
                for step in 1..=30i64 {
                    let epoch = ((step - 1) / 10 + 1) as i32;
                    let v = 10.0 / step as f64 + a as f64 * 0.3 - seed as f64 * 0.05;
                    points.push(p("train/loss", step, epoch, v + (step % 3) as f64 * 0.1));
                    if step % 10 == 0 {
                        points.push(p("test/loss", step, epoch, v));
                    }
                }
                all.insert(job_id, points);
            }
        }
        let ends: HashMap<JobId, Vec<MetricPoint>> = all
            .iter()
            .map(|(id, points)| {
                let kept = points
                    .iter()
                    .filter(|q| {
                        !points
                            .iter()
                            .any(|o| o.name == q.name && o.epoch == q.epoch && o.step > q.step)
                    })
                    .cloned()
                    .collect();
                (*id, kept)
            })
            .collect();
        assert!(
            ends.values().all(|e| e.len() == 6),
            "three epoch ends of two metrics"
        );
        let metrics = ["train/loss".to_owned(), "test/loss".to_owned()];
        for convergence_metric in ["train/loss", "test/loss"] {
            let req = SummaryRequest {
                metrics: &metrics,
                baseline: "random",
                convergence_metric,
            };
            let id = SweepId::from(uuid::Uuid::now_v7());
            let full = summarise(id, &arms, &runs, &all, &req);
            assert_eq!(summarise(id, &arms, &runs, &ends, &req), full);
            assert!(full.arms.iter().all(|a| a
                .metrics
                .iter()
                .all(|m| m.last.as_ref().is_some_and(|s| s.n == 3))));
        }
    }
}
