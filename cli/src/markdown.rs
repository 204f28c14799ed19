//! `trainq report`'s report.md: the sweep's facts, the verdicts, one table per metric (early and
//! final statistics, paired differences from the baseline) with its learning-curve figures, the
//! convergence table, the sample grids and the missing runs.
//!
//! A pure function of the sweep, its summary and the files the caller wrote; the verdict rule and
//! the curves are [`crate::report`]'s, which must not use this module.

use std::fmt::Write as _;

use proto::v1;

use crate::format::{sweep_state_name, timestamp};
use crate::report::{figure_paths, lower_is_better, num, verdict_sentence, SampleGrid};

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
    use crate::fixtures::sweep_and_summary;

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
}
