//! `trainq report`: turns a sweep's summary (GetSweepSummary) and its runs' metric series into a
//! Markdown report with learning curves (mean over seeds with a band of plus or minus one
//! standard deviation) and one verdict sentence per non-baseline arm.
//!
//! Pure functions of their inputs: fetching (GetSweep, GetSweepSummary, GetMetrics,
//! DownloadArtifact) and writing files is the caller's job, so everything here is tested on
//! hand-made inputs. The statistics themselves come from the coordinator; only the curves'
//! per-step means and standard deviations are computed here.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use proto::v1;

use crate::output::timestamp;
use crate::plot;

/// One succeeded run's points (of the summarised metrics).
#[derive(Debug, Clone, PartialEq)]
pub struct RunSeries {
    pub arm: String,
    pub seed: u64,
    pub job_id: String,
    pub points: Vec<v1::MetricPoint>,
}

/// Whether smaller values of a metric are better: true for losses, negative ELBO, bits per
/// dimension, reconstruction and KL terms; false for accuracies.
pub fn lower_is_better(metric: &str) -> bool {
    !metric.ends_with("accuracy")
}

/// What a paired difference (arm minus baseline) says.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The 95% interval lies entirely on the better side of 0.
    Better {
        mean: f64,
        low: f64,
        high: f64,
        n: u32,
    },
    /// The 95% interval lies entirely on the worse side of 0.
    Worse {
        mean: f64,
        low: f64,
        high: f64,
        n: u32,
    },
    /// The interval includes 0.
    NoDifference {
        mean: f64,
        low: f64,
        high: f64,
        n: u32,
    },
    /// Fewer than two paired seeds: no interval.
    TooFewSeeds { n: u32 },
}

/// Judges a paired difference (arm minus baseline) of a metric.
pub fn judge(diff: Option<&v1::Stat>, lower_is_better: bool) -> Verdict {
    let Some(d) = diff else {
        return Verdict::TooFewSeeds { n: 0 };
    };
    let (Some(low), Some(high)) = (d.ci_low, d.ci_high) else {
        return Verdict::TooFewSeeds { n: d.n };
    };
    if d.n < 2 {
        return Verdict::TooFewSeeds { n: d.n };
    }
    let (mean, n) = (d.mean, d.n);
    let below = high < 0.0;
    let above = low > 0.0;
    match (below, above) {
        (true, _) if lower_is_better => Verdict::Better { mean, low, high, n },
        (true, _) => Verdict::Worse { mean, low, high, n },
        (_, true) if lower_is_better => Verdict::Worse { mean, low, high, n },
        (_, true) => Verdict::Better { mean, low, high, n },
        _ => Verdict::NoDifference { mean, low, high, n },
    }
}

/// A number in the report: four decimals (the statistics are exact in summary.json).
pub fn num(v: f64) -> String {
    if v.is_finite() && v.abs() >= 1e5 {
        format!("{v:.1}")
    } else {
        format!("{v:.4}")
    }
}

fn clause(v: &Verdict, baseline: &str) -> String {
    match v {
        Verdict::Better { mean, low, high, n } => format!(
            "transfer beat random init (`{baseline}`) beyond the noise (paired difference {}, 95% CI [{}, {}], n = {n})",
            num(*mean),
            num(*low),
            num(*high)
        ),
        Verdict::Worse { mean, low, high, n } => format!(
            "transfer was worse than random init (`{baseline}`) beyond the noise (paired difference {}, 95% CI [{}, {}], n = {n})",
            num(*mean),
            num(*low),
            num(*high)
        ),
        Verdict::NoDifference { low, high, .. } => format!(
            "no difference beyond the noise (CI [{}, {}] includes 0)",
            num(*low),
            num(*high)
        ),
        Verdict::TooFewSeeds { n } => format!(
            "too few seeds to tell (n = {n} paired seeds; at least 2 are needed for an interval)"
        ),
    }
}

/// The verdict sentence of one non-baseline arm on one metric: at the end of training, then
/// early in training (after the first epoch). Starts with "Verdict for `arm`".
pub fn verdict_sentence(arm: &str, baseline: &str, m: &v1::MetricSummary) -> String {
    let lower = lower_is_better(&m.name);
    let last = judge(m.last_diff.as_ref(), lower);
    let early = judge(m.early_diff.as_ref(), lower);
    format!(
        "Verdict for `{arm}` on {} ({} is better): at the end of training, {}; early in training (after epoch 1), {}.",
        m.name,
        if lower { "lower" } else { "higher" },
        clause(&last, baseline),
        clause(&early, baseline)
    )
}

/// One arm's curve of one metric: (epoch-end step, mean over seeds, sample sd when n >= 2).
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    pub arm: String,
    pub points: Vec<(u64, f64, Option<f64>)>,
}

/// Mean and sample standard deviation (n - 1); no sd below two values. The coordinator's own
/// statistics ([`proto::sweep::stat`]), so curves and tables cannot disagree.
pub fn mean_sd(values: &[f64]) -> (f64, Option<f64>) {
    let s = proto::sweep::stat(values);
    (s.mean, s.sd)
}

/// Every arm's mean curve of `metric` over its runs, arms in the order given, steps ascending.
/// Arms without points get no curve. A metric reported several times in an epoch keeps only its
/// epoch-end points: the last point of each epoch.
pub fn mean_curves(metric: &str, arms: &[String], runs: &[RunSeries]) -> Vec<Curve> {
    let mut curves = Vec::new();
    for arm in arms {
        let mut by_step: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
        for run in runs.iter().filter(|r| &r.arm == arm) {
            let mut epoch_end: BTreeMap<u32, (u64, f64)> = BTreeMap::new();
            for p in run.points.iter().filter(|p| p.name == metric) {
                let e = epoch_end.entry(p.epoch).or_insert((p.step, p.value));
                if p.step >= e.0 {
                    *e = (p.step, p.value);
                }
            }
            for (step, value) in epoch_end.into_values() {
                by_step.entry(step).or_default().push(value);
            }
        }
        if by_step.is_empty() {
            continue;
        }
        let points = by_step
            .into_iter()
            .map(|(step, values)| {
                let (mean, sd) = mean_sd(&values);
                (step, mean, sd)
            })
            .collect();
        curves.push(Curve {
            arm: arm.clone(),
            points,
        });
    }
    curves
}

/// The chart of one metric's curves: mean lines with a band of plus or minus one sd.
pub fn curves_chart(sweep_name: &str, metric: &str, curves: &[Curve]) -> plot::Chart {
    let series = curves
        .iter()
        .map(|c| plot::Series {
            label: c.arm.clone(),
            points: c.points.iter().map(|&(s, m, _)| (s as f64, m)).collect(),
            band: if c.points.iter().all(|p| p.2.is_some()) {
                c.points
                    .iter()
                    .map(|&(s, m, sd)| {
                        let sd = sd.unwrap_or(0.0);
                        (s as f64, m - sd, m + sd)
                    })
                    .collect()
            } else {
                Vec::new()
            },
        })
        .collect();
    plot::Chart {
        title: format!("{sweep_name}: {metric} (mean over seeds ± 1 sd)"),
        x_desc: "optimiser step (end of each epoch)".into(),
        y_desc: metric.into(),
        series,
    }
}

/// A file-name-safe form of a metric or arm name (`test/neg_elbo_nats` -> `test_neg_elbo_nats`).
pub fn file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+' | '=') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Paths (relative to the report folder) of a metric's figures.
pub fn figure_paths(metric: &str) -> (String, String) {
    let stem = file_stem(metric);
    (format!("curves/{stem}.png"), format!("curves/{stem}.svg"))
}

/// The sample grid shown for an arm: the run of its lowest succeeded seed.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleGrid {
    pub arm: String,
    pub seed: u64,
    pub job_id: String,
    /// Relative to the report folder; `None` when the run stored no sample grid.
    pub path: Option<String>,
}

/// The run whose sample grid represents each arm: its lowest seed that succeeded.
pub fn sample_runs(sweep: &v1::Sweep) -> Vec<(String, u64, String)> {
    let mut out = Vec::new();
    for arm in &sweep.arms {
        let best = sweep
            .runs
            .iter()
            .filter(|r| !r.source && &r.arm == arm && r.state() == v1::JobState::Succeeded)
            .min_by_key(|r| r.seed);
        if let Some(r) = best {
            out.push((arm.clone(), r.seed, r.job_id.clone()));
        }
    }
    out
}

/// `name` for the sweep state.
pub fn sweep_state_name(state: v1::SweepState) -> &'static str {
    match state {
        v1::SweepState::Unspecified => "unspecified",
        v1::SweepState::Running => "running",
        v1::SweepState::Succeeded => "succeeded",
        v1::SweepState::Partial => "partial",
        v1::SweepState::Cancelled => "cancelled",
    }
}

fn stat_cells(s: Option<&v1::Stat>) -> (String, String) {
    match s {
        None => ("–".into(), "–".into()),
        Some(s) if s.n == 0 => ("–".into(), "–".into()),
        Some(s) => {
            let mean_sd = match s.sd {
                Some(sd) => format!("{} ± {}", num(s.mean), num(sd)),
                None => num(s.mean),
            };
            let ci = match (s.ci_low, s.ci_high) {
                (Some(l), Some(h)) => format!("[{}, {}]", num(l), num(h)),
                _ => "–".into(),
            };
            (mean_sd, ci)
        }
    }
}

fn diff_cell(s: Option<&v1::Stat>) -> String {
    match s {
        None => "–".into(),
        Some(s) => match (s.ci_low, s.ci_high) {
            (Some(l), Some(h)) => format!("{} [{}, {}] (n = {})", num(s.mean), num(l), num(h), s.n),
            _ => format!("{} (n = {})", num(s.mean), s.n),
        },
    }
}

/// Markdown table cells must not break the table.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// The whole report.md.
pub fn markdown(
    sweep: &v1::Sweep,
    summary: &v1::SweepSummary,
    figures: &[String],
    samples: &[SampleGrid],
) -> String {
    let spec = sweep.spec.clone().unwrap_or_default();
    let mut md = String::new();
    let w = &mut md;
    let _ = writeln!(w, "# Sweep report: {}\n", spec.name);
    let _ = writeln!(w, "- sweep id: `{}`", sweep.sweep_id);
    let _ = writeln!(w, "- state: {}", sweep_state_name(sweep.state()));
    let _ = writeln!(w, "- created: {}", timestamp(sweep.created_at.as_ref()));
    for axis in &spec.grid {
        let _ = writeln!(
            w,
            "- grid axis `{}`: {} values",
            axis.field,
            axis.values.len()
        );
    }
    let arms: Vec<String> = sweep.arms.iter().map(|a| format!("`{a}`")).collect();
    let _ = writeln!(w, "- arms ({}): {}", arms.len(), arms.join(", "));
    let seeds: Vec<String> = spec.seeds.iter().map(|s| s.to_string()).collect();
    let _ = writeln!(w, "- seeds: {}", seeds.join(", "));
    let counts: Vec<String> = sweep
        .jobs_by_state
        .iter()
        .map(|c| format!("{} {}", c.count, proto::state_name(c.state())))
        .collect();
    let _ = writeln!(
        w,
        "- jobs: {} ({})",
        sweep.runs.len(),
        if counts.is_empty() {
            "none".into()
        } else {
            counts.join(", ")
        }
    );
    let _ = writeln!(w, "- baseline arm: `{}`", summary.baseline_arm);
    let _ = writeln!(
        w,
        "- convergence: {} reaching the baseline's final mean {}",
        summary.convergence_metric,
        num(summary.convergence_target)
    );
    let _ = writeln!(
        w,
        "\n\"Early\" is the value at the end of the first epoch, \"final\" at the end of the last. \
Means are over the arm's succeeded seeds with the sample standard deviation (±) and a two-sided \
95% Student-t interval; \"diff\" is the arm minus the baseline, paired by seed (only seeds where \
both runs succeeded), with its own 95% interval. The exact values are in summary.json.\n"
    );

    // Verdicts: the convergence metric when summarised, else the first metric.
    let _ = writeln!(w, "## Verdicts\n");
    let _ = writeln!(
        w,
        "A transfer arm beats random init when the 95% interval of its paired difference lies \
entirely on the better side of 0, is worse when it lies entirely on the other side, and \
otherwise shows no difference beyond the noise.\n"
    );
    let primary = summary
        .arms
        .iter()
        .flat_map(|a| a.metrics.iter())
        .find(|m| m.name == summary.convergence_metric)
        .or_else(|| summary.arms.iter().flat_map(|a| a.metrics.iter()).next())
        .map(|m| m.name.clone());
    let mut any = false;
    for arm in summary.arms.iter().filter(|a| !a.baseline) {
        let m = primary
            .as_ref()
            .and_then(|p| arm.metrics.iter().find(|m| &m.name == p));
        if let Some(m) = m {
            let _ = writeln!(
                w,
                "- {}",
                verdict_sentence(&arm.arm, &summary.baseline_arm, m)
            );
            any = true;
        }
    }
    if !any {
        let _ = writeln!(w, "No arm besides the baseline has results yet.");
    }
    let _ = writeln!(w);

    // One table per metric.
    let mut metric_names: Vec<String> = Vec::new();
    for arm in &summary.arms {
        for m in &arm.metrics {
            if !metric_names.contains(&m.name) {
                metric_names.push(m.name.clone());
            }
        }
    }
    for name in &metric_names {
        let better = if lower_is_better(name) {
            "lower"
        } else {
            "higher"
        };
        let _ = writeln!(w, "## {name} ({better} is better)\n");
        let _ = writeln!(
            w,
            "| arm | n | early mean ± sd | early 95% CI | final mean ± sd | final 95% CI | early diff vs baseline [95% CI] | final diff vs baseline [95% CI] |"
        );
        let _ = writeln!(w, "|---|---|---|---|---|---|---|---|");
        for arm in &summary.arms {
            let Some(m) = arm.metrics.iter().find(|m| &m.name == name) else {
                continue;
            };
            let (early, early_ci) = stat_cells(m.early.as_ref());
            let (last, last_ci) = stat_cells(m.last.as_ref());
            let n = m.last.as_ref().map_or(0, |s| s.n);
            let label = if arm.baseline {
                format!("`{}` (baseline)", arm.arm)
            } else {
                format!("`{}`", arm.arm)
            };
            let _ = writeln!(
                w,
                "| {} | {n} | {early} | {early_ci} | {last} | {last_ci} | {} | {} |",
                cell(&label),
                diff_cell(m.early_diff.as_ref()),
                diff_cell(m.last_diff.as_ref())
            );
        }
        if figures.contains(name) {
            let (png, svg) = figure_paths(name);
            let _ = writeln!(
                w,
                "\n![{name}: mean over seeds ± 1 sd]({png})\n\nLearning curves: [PNG]({png}), [SVG]({svg}).\n"
            );
        } else {
            let _ = writeln!(w, "\nNo learning curve: no run has points of {name}.\n");
        }
    }

    // Convergence.
    let _ = writeln!(w, "## Convergence\n");
    let _ = writeln!(
        w,
        "The first epoch-end step at which the arm's mean curve of {} is at or below the \
baseline's final mean ({}), and the same step per seed.\n",
        summary.convergence_metric,
        num(summary.convergence_target)
    );
    let _ = writeln!(
        w,
        "| arm | mean curve reaches the target at step | per-seed step mean ± sd | per-seed 95% CI | seeds that reached it | seeds not reaching it |"
    );
    let _ = writeln!(w, "|---|---|---|---|---|---|");
    for arm in &summary.arms {
        let step = if arm.converged {
            arm.convergence_step.to_string()
        } else {
            "not reached".into()
        };
        let (per_seed, ci) = stat_cells(arm.convergence_step_per_seed.as_ref());
        let reached = arm.convergence_step_per_seed.as_ref().map_or(0, |s| s.n);
        let _ = writeln!(
            w,
            "| `{}` | {step} | {per_seed} | {ci} | {reached} | {} |",
            cell(&arm.arm),
            arm.seeds_not_converged
        );
    }
    let _ = writeln!(w);

    // Samples.
    let _ = writeln!(w, "## Sample grids\n");
    let _ = writeln!(
        w,
        "Samples of each arm's run with its lowest succeeded seed (artifact `samples`, the final one).\n"
    );
    if samples.is_empty() {
        let _ = writeln!(w, "No arm has a succeeded run yet.\n");
    }
    for s in samples {
        match &s.path {
            Some(path) => {
                let _ = writeln!(
                    w,
                    "### `{}` (seed {})\n\n![samples of {} seed {}]({path})\n",
                    s.arm, s.seed, s.arm, s.seed
                );
            }
            None => {
                let _ = writeln!(
                    w,
                    "### `{}` (seed {})\n\nJob `{}` stored no sample grid.\n",
                    s.arm, s.seed, s.job_id
                );
            }
        }
    }

    // Missing runs.
    let _ = writeln!(w, "## Missing runs\n");
    let missing: Vec<(&str, &v1::MissingRun)> = summary
        .arms
        .iter()
        .flat_map(|a| a.missing.iter().map(move |m| (a.arm.as_str(), m)))
        .collect();
    let sources: Vec<&v1::SweepRun> = sweep
        .runs
        .iter()
        .filter(|r| r.source && r.state() != v1::JobState::Succeeded)
        .collect();
    if missing.is_empty() && sources.is_empty() {
        let _ = writeln!(w, "None: every planned run succeeded.");
    } else {
        let _ = writeln!(w, "| arm | seed | job | state | error |");
        let _ = writeln!(w, "|---|---|---|---|---|");
        for r in sources {
            let _ = writeln!(
                w,
                "| source | {} | `{}` | {} | |",
                r.seed,
                r.job_id,
                proto::state_name(r.state())
            );
        }
        for (arm, m) in missing {
            let _ = writeln!(
                w,
                "| `{}` | {} | `{}` | {} | {} |",
                cell(arm),
                m.seed,
                m.job_id,
                proto::state_name(m.state()),
                cell(&m.error)
            );
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(n: u32, mean: f64, sd: Option<f64>, ci: Option<(f64, f64)>) -> v1::Stat {
        v1::Stat {
            n,
            mean,
            sd,
            ci_low: ci.map(|c| c.0),
            ci_high: ci.map(|c| c.1),
        }
    }

    fn point(name: &str, step: u64, epoch: u32, value: f64) -> v1::MetricPoint {
        v1::MetricPoint {
            name: name.into(),
            step,
            epoch,
            value,
        }
    }

    #[test]
    fn a_difference_counts_only_when_its_interval_excludes_zero_on_the_better_side() {
        let d = stat(3, -2.0, Some(0.5), Some((-3.2, -0.8)));
        assert!(matches!(judge(Some(&d), true), Verdict::Better { .. }));
        assert!(matches!(judge(Some(&d), false), Verdict::Worse { .. }));
        let up = stat(3, 2.0, Some(0.5), Some((0.8, 3.2)));
        assert!(matches!(judge(Some(&up), true), Verdict::Worse { .. }));
        assert!(matches!(judge(Some(&up), false), Verdict::Better { .. }));
        let straddle = stat(3, -0.3, Some(1.0), Some((-2.8, 2.2)));
        assert!(matches!(
            judge(Some(&straddle), true),
            Verdict::NoDifference { .. }
        ));
        let one = stat(1, -5.0, None, None);
        assert_eq!(judge(Some(&one), true), Verdict::TooFewSeeds { n: 1 });
        assert_eq!(judge(None, true), Verdict::TooFewSeeds { n: 0 });
    }

    #[test]
    fn accuracy_is_the_only_metric_where_higher_is_better() {
        assert!(lower_is_better("test/neg_elbo_nats"));
        assert!(lower_is_better("test/bits_per_dim"));
        assert!(lower_is_better("test/recon"));
        assert!(!lower_is_better("test/accuracy"));
    }

    #[test]
    fn the_verdict_sentence_covers_the_end_and_the_start_of_training() {
        let m = v1::MetricSummary {
            name: "test/neg_elbo_nats".into(),
            early_diff: Some(stat(3, -0.5, Some(1.0), Some((-2.98, 1.98)))),
            last_diff: Some(stat(3, -4.0, Some(0.4), Some((-5.0, -3.0)))),
            ..Default::default()
        };
        let s = verdict_sentence("replicate", "random", &m);
        assert!(s.starts_with("Verdict for `replicate`"), "{s}");
        assert!(
            s.contains("at the end of training, transfer beat random init (`random`) beyond the noise (paired difference -4.0000, 95% CI [-5.0000, -3.0000], n = 3)"),
            "{s}"
        );
        assert!(
            s.contains("early in training (after epoch 1), no difference beyond the noise (CI [-2.9800, 1.9800] includes 0)"),
            "{s}"
        );
        let few = v1::MetricSummary {
            name: "test/neg_elbo_nats".into(),
            early_diff: Some(stat(1, -0.5, None, None)),
            last_diff: Some(stat(1, -0.5, None, None)),
            ..Default::default()
        };
        assert!(verdict_sentence("a", "random", &few).contains("too few seeds"));
    }

    #[test]
    fn curves_average_the_seeds_at_each_epoch_end_with_a_sample_sd() {
        let run = |arm: &str, seed, values: [f64; 2]| RunSeries {
            arm: arm.into(),
            seed,
            job_id: format!("{arm}-{seed}"),
            points: vec![
                // A mid-epoch point that must be ignored, and another metric.
                point("test/neg_elbo_nats", 5, 1, 999.0),
                point("test/neg_elbo_nats", 10, 1, values[0]),
                point("test/neg_elbo_nats", 20, 2, values[1]),
                point("test/kl", 20, 2, 1.0),
            ],
        };
        let runs = vec![
            run("random", 1, [10.0, 6.0]),
            run("random", 2, [12.0, 8.0]),
            run("transfer", 1, [9.0, 5.0]),
        ];
        let arms = vec!["random".to_string(), "transfer".into(), "empty".into()];
        let curves = mean_curves("test/neg_elbo_nats", &arms, &runs);
        assert_eq!(curves.len(), 2, "an arm without points has no curve");
        let sd = 2f64.sqrt();
        assert_eq!(
            curves[0].points,
            vec![(10, 11.0, Some(sd)), (20, 7.0, Some(sd))]
        );
        assert_eq!(curves[1].points, vec![(10, 9.0, None), (20, 5.0, None)]);
        let chart = curves_chart("study", "test/neg_elbo_nats", &curves);
        assert_eq!(
            chart.series[0].band,
            vec![(10.0, 11.0 - sd, 11.0 + sd), (20.0, 7.0 - sd, 7.0 + sd)]
        );
        assert!(chart.series[1].band.is_empty(), "no band with one seed");
        let dir = tempfile::tempdir().expect("dir");
        for ext in ["png", "svg"] {
            let path = dir.path().join(format!("c.{ext}"));
            plot::draw(&chart, &path).expect("draw");
            assert!(std::fs::metadata(&path).expect("written").len() > 100);
        }
    }

    fn sweep_and_summary() -> (v1::Sweep, v1::SweepSummary) {
        let run = |arm: &str, seed, state: v1::JobState, source| v1::SweepRun {
            job_id: format!("job-{arm}-{seed}"),
            arm: arm.into(),
            seed,
            source,
            state: state as i32,
        };
        use v1::JobState::*;
        let sweep = v1::Sweep {
            sweep_id: "sweep-1".into(),
            spec: Some(v1::SweepSpec {
                name: "study".into(),
                seeds: vec![1, 2],
                grid: vec![v1::GridAxis {
                    field: "cifarCvae.init".into(),
                    values: vec![Default::default(), Default::default()],
                    names: vec!["random".into(), "replicate".into()],
                }],
                ..Default::default()
            }),
            state: v1::SweepState::Partial as i32,
            arms: vec!["random".into(), "replicate".into()],
            runs: vec![
                run("source", 1, Succeeded, true),
                run("source", 2, Succeeded, true),
                run("random", 1, Succeeded, false),
                run("random", 2, Succeeded, false),
                run("replicate", 1, Failed, false),
                run("replicate", 2, Succeeded, false),
            ],
            jobs_by_state: vec![
                v1::StateCount {
                    state: Succeeded as i32,
                    count: 5,
                },
                v1::StateCount {
                    state: Failed as i32,
                    count: 1,
                },
            ],
            created_at: None,
        };
        let metric = |name: &str, diff: bool| v1::MetricSummary {
            name: name.into(),
            early: Some(stat(2, 700.0, Some(5.0), Some((655.0, 745.0)))),
            last: Some(stat(2, 650.0, Some(4.0), Some((614.0, 686.0)))),
            early_diff: diff.then(|| stat(1, -3.0, None, None)),
            last_diff: diff.then(|| stat(1, -2.0, None, None)),
        };
        let summary = v1::SweepSummary {
            sweep_id: "sweep-1".into(),
            baseline_arm: "random".into(),
            convergence_metric: "test/neg_elbo_nats".into(),
            convergence_target: 650.0,
            arms: vec![
                v1::ArmSummary {
                    arm: "random".into(),
                    baseline: true,
                    seeds_planned: 2,
                    seeds_succeeded: 2,
                    metrics: vec![metric("test/neg_elbo_nats", false)],
                    convergence_step: 40,
                    converged: true,
                    convergence_step_per_seed: Some(stat(2, 40.0, Some(0.0), Some((40.0, 40.0)))),
                    ..Default::default()
                },
                v1::ArmSummary {
                    arm: "replicate".into(),
                    seeds_planned: 2,
                    seeds_succeeded: 1,
                    missing: vec![v1::MissingRun {
                        job_id: "job-replicate-1".into(),
                        seed: 1,
                        state: Failed as i32,
                        error: "diverged | nan".into(),
                    }],
                    metrics: vec![metric("test/neg_elbo_nats", true)],
                    convergence_step_per_seed: Some(stat(0, 0.0, None, None)),
                    seeds_not_converged: 1,
                    ..Default::default()
                },
            ],
        };
        (sweep, summary)
    }

    #[test]
    fn the_report_has_tables_figures_samples_verdicts_and_missing_runs() {
        let (sweep, summary) = sweep_and_summary();
        let samples = vec![
            SampleGrid {
                arm: "random".into(),
                seed: 1,
                job_id: "job-random-1".into(),
                path: Some("samples/random.png".into()),
            },
            SampleGrid {
                arm: "replicate".into(),
                seed: 2,
                job_id: "job-replicate-2".into(),
                path: None,
            },
        ];
        let md = markdown(&sweep, &summary, &["test/neg_elbo_nats".into()], &samples);
        assert!(md.starts_with("# Sweep report: study\n"), "{md}");
        assert!(
            md.contains("## test/neg_elbo_nats (lower is better)"),
            "{md}"
        );
        assert!(
            md.contains("| `random` (baseline) | 2 | 700.0000 ± 5.0000 | [655.0000, 745.0000] | 650.0000 ± 4.0000 | [614.0000, 686.0000] | – | – |"),
            "{md}"
        );
        assert!(
            md.contains("| `replicate` | 2 | 700.0000 ± 5.0000 | [655.0000, 745.0000] | 650.0000 ± 4.0000 | [614.0000, 686.0000] | -3.0000 (n = 1) | -2.0000 (n = 1) |"),
            "{md}"
        );
        assert!(
            md.contains(
                "![test/neg_elbo_nats: mean over seeds ± 1 sd](curves/test_neg_elbo_nats.png)"
            ),
            "{md}"
        );
        assert!(md.contains("[SVG](curves/test_neg_elbo_nats.svg)"), "{md}");
        assert!(md.contains("| `random` | 40 | 40.0000 ± 0.0000 |"), "{md}");
        assert!(
            md.contains("| `replicate` | not reached | – | – | 0 | 1 |"),
            "{md}"
        );
        assert!(
            md.contains("![samples of random seed 1](samples/random.png)"),
            "{md}"
        );
        assert!(
            md.contains("Job `job-replicate-2` stored no sample grid."),
            "{md}"
        );
        assert!(
            md.contains("| `replicate` | 1 | `job-replicate-1` | failed | diverged \\| nan |"),
            "{md}"
        );
        let verdicts: Vec<&str> = md
            .lines()
            .filter(|l| l.starts_with("- Verdict for"))
            .collect();
        assert_eq!(verdicts.len(), 1, "one per non-baseline arm: {md}");
        assert!(verdicts[0].contains("too few seeds"), "{md}");
    }

    #[test]
    fn each_arm_is_shown_by_its_lowest_succeeded_seed() {
        let (sweep, _) = sweep_and_summary();
        assert_eq!(
            sample_runs(&sweep),
            vec![
                ("random".into(), 1, "job-random-1".into()),
                ("replicate".into(), 2, "job-replicate-2".into())
            ]
        );
    }

    #[test]
    fn names_become_safe_file_names() {
        assert_eq!(file_stem("test/neg_elbo_nats"), "test_neg_elbo_nats");
        assert_eq!(file_stem("a,b=c d"), "a_b=c_d");
        assert_eq!(
            figure_paths("test/kl"),
            ("curves/test_kl.png".into(), "curves/test_kl.svg".into())
        );
    }
}
