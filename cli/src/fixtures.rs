//! Hand-made metric points, sweeps and statistics for the unit tests of the table, report and
//! Markdown modules (compiled only for tests).
//!
//! Test data only: must not be used by non-test code.

use proto::v1;

/// A metric point.
pub fn point(name: &str, step: u64, epoch: u32, value: f64) -> v1::MetricPoint {
    v1::MetricPoint {
        name: name.into(),
        step,
        epoch,
        value,
    }
}

/// A wire `Stat`, with the interval as (low, high).
pub fn stat(n: u32, mean: f64, sd: Option<f64>, ci: Option<(f64, f64)>) -> v1::Stat {
    v1::Stat {
        n,
        mean,
        sd,
        ci_low: ci.map(|c| c.0),
        ci_high: ci.map(|c| c.1),
    }
}

/// A sweep of two arms (`random`, the baseline, and `replicate`) over seeds 1 and 2 with a
/// source stage, one failed run, and its summary.
pub fn sweep_and_summary() -> (v1::Sweep, v1::SweepSummary) {
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
        next_page_token: String::new(),
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
