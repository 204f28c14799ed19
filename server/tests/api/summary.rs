//! The sweep summary: seed statistics, paired differences from the baseline, convergence and
//! missing runs from GetSweepSummary, the same numbers from the `sweep_summary` view, and the
//! baseline rule.
//!
//! Must not change the study it reads once [`finished_study`] built it.

use proto::metric;
use proto::v1;
use tonic::Code;

use crate::helpers::{claim, TestServer};
use crate::sweeps::{get_sweep, json_value, run_of, run_to_success, study_spec, submit_sweep};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
}

#[track_caller]
fn assert_stat(s: Option<&v1::Stat>, n: u32, mean: f64, sd: Option<f64>, t: f64) {
    let s = s.expect("a stat");
    assert_eq!(s.n, n, "{s:?}");
    assert!(close(s.mean, mean), "mean {} != {mean}", s.mean);
    match sd {
        None => assert!(
            s.sd.is_none() && s.ci_low.is_none() && s.ci_high.is_none(),
            "{s:?}"
        ),
        Some(sd) => {
            assert!(close(s.sd.expect("sd"), sd), "sd {:?} != {sd}", s.sd);
            let half = t * sd / f64::from(n).sqrt();
            assert!(close(s.ci_low.expect("low"), mean - half), "{s:?}");
            assert!(close(s.ci_high.expect("high"), mean + half), "{s:?}");
        }
    }
}

const T1: f64 = 12.706204736174705;

const T2: f64 = 4.302652729749464;

const NELBO: &str = metric::TEST_NEG_ELBO_NATS;

/// Three seeds; the random arm all succeed, the transfer arm's seed 3 fails. neg_elbo at the
/// end of epoch 1 (step 10) and epoch 2 (step 20), with an extra mid-epoch point:
///
/// | seed | random e1, e2 | lum e1, e2 |
/// | 1    | 100, 90       | 89, 88     |
/// | 2    | 104, 94       | 91, 89     |
/// | 3    | 102, 86       | (failed)   |
async fn finished_study(server: &TestServer) -> v1::Sweep {
    let mut jobs = server.jobs();
    let mut workers = server.workers();
    let sweep = submit_sweep(&mut jobs, study_spec(vec![1, 2, 3])).await;
    for seed in [1, 2, 3] {
        run_to_success(&mut workers, &run_of(&sweep, "source", seed).job_id, &[]).await;
    }
    for (seed, e1, e2) in [(1, 100.0, 90.0), (2, 104.0, 94.0), (3, 102.0, 86.0)] {
        let points = [(NELBO, 5, 1, 50.0), (NELBO, 10, 1, e1), (NELBO, 20, 2, e2)];
        run_to_success(
            &mut workers,
            &run_of(&sweep, "random", seed).job_id,
            &points,
        )
        .await;
    }
    for (seed, e1, e2) in [(1, 89.0, 88.0), (2, 91.0, 89.0)] {
        let points = [(NELBO, 10, 1, e1), (NELBO, 20, 2, e2)];
        run_to_success(&mut workers, &run_of(&sweep, "lum", seed).job_id, &points).await;
    }
    let failing = run_of(&sweep, "lum", 3).job_id.clone();
    let lease = claim(&mut workers, &failing).await;
    workers
        .fail_job(v1::FailJobRequest {
            lease: Some(lease),
            reason: "diverged".into(),
            permanent: true,
        })
        .await
        .expect("fail");
    get_sweep(&mut jobs, &sweep.sweep_id).await
}

#[tokio::test]
async fn the_summary_gives_seed_statistics_paired_differences_convergence_and_missing_runs() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let sweep = finished_study(&server).await;
    assert_eq!(sweep.state(), v1::SweepState::Partial);
    let summary = jobs
        .get_sweep_summary(v1::GetSweepSummaryRequest {
            sweep_id: sweep.sweep_id.clone(),
            ..Default::default()
        })
        .await
        .expect("summary")
        .into_inner();
    assert_eq!(summary.baseline_arm, "random");
    assert_eq!(summary.convergence_metric, NELBO);
    assert_eq!(summary.convergence_target, 90.0);
    let [random, lum] = summary.arms.as_slice() else {
        panic!("two arms: {summary:?}")
    };
    let names: Vec<&str> = random.metrics.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "test/neg_elbo_nats",
            "test/bits_per_dim",
            "test/recon",
            "test/kl"
        ]
    );
    // Random: early 100, 104, 102; final 90, 94, 86.
    assert!(random.baseline && !lum.baseline);
    assert_eq!((random.seeds_planned, random.seeds_succeeded), (3, 3));
    assert!(random.missing.is_empty());
    let m = &random.metrics[0];
    assert_stat(m.early.as_ref(), 3, 102.0, Some(2.0), T2);
    assert_stat(m.last.as_ref(), 3, 90.0, Some(4.0), T2);
    assert!(m.early_diff.is_none() && m.last_diff.is_none());
    // A metric nobody reported: n = 0.
    assert_eq!(random.metrics[1].last.as_ref().expect("stat").n, 0);
    // Mean curve 102 (step 10), 90 (step 20): reaches the target at step 20; per seed, seeds 1
    // (90) and 3 (86) reach it at step 20, seed 2 (94) never.
    assert!(random.converged);
    assert_eq!(random.convergence_step, 20);
    assert_stat(
        random.convergence_step_per_seed.as_ref(),
        2,
        20.0,
        Some(0.0),
        T1,
    );
    assert_eq!(random.seeds_not_converged, 1);
    // Lum: seed 3 failed.
    assert_eq!((lum.seeds_planned, lum.seeds_succeeded), (3, 2));
    let missing = &lum.missing[..];
    assert_eq!(missing.len(), 1);
    assert_eq!(missing[0].seed, 3);
    assert_eq!(missing[0].job_id, run_of(&sweep, "lum", 3).job_id);
    assert_eq!(missing[0].state(), v1::JobState::Failed);
    assert_eq!(missing[0].error, "diverged");
    let m = &lum.metrics[0];
    assert_stat(m.early.as_ref(), 2, 90.0, Some(2f64.sqrt()), T1);
    assert_stat(m.last.as_ref(), 2, 88.5, Some(0.5f64.sqrt()), T1);
    // Paired by seed: early 89-100 = -11, 91-104 = -13; final 88-90 = -2, 89-94 = -5.
    assert_stat(m.early_diff.as_ref(), 2, -12.0, Some(2f64.sqrt()), T1);
    assert_stat(m.last_diff.as_ref(), 2, -3.5, Some(4.5f64.sqrt()), T1);
    // Mean curve 90 (step 10) already at the target; per seed 10 (89) and 20 (91, then 89).
    assert!(lum.converged);
    assert_eq!(lum.convergence_step, 10);
    assert_stat(
        lum.convergence_step_per_seed.as_ref(),
        2,
        15.0,
        Some(50f64.sqrt()),
        T1,
    );
    assert_eq!(lum.seeds_not_converged, 0);

    // Another baseline: the transfer arm; an unknown one is refused.
    let flipped = jobs
        .get_sweep_summary(v1::GetSweepSummaryRequest {
            sweep_id: sweep.sweep_id.clone(),
            metrics: vec![NELBO.into()],
            baseline_arm: "lum".into(),
            convergence_metric: NELBO.into(),
        })
        .await
        .expect("summary")
        .into_inner();
    assert_eq!(flipped.convergence_target, 88.5);
    assert_stat(
        flipped.arms[0].metrics[0].last_diff.as_ref(),
        2,
        3.5,
        Some(4.5f64.sqrt()),
        T1,
    );
    assert!(!flipped.arms[0].converged);
    assert_eq!(flipped.arms[0].seeds_not_converged, 2);
    let unknown = jobs
        .get_sweep_summary(v1::GetSweepSummaryRequest {
            sweep_id: sweep.sweep_id.clone(),
            baseline_arm: "nope".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown arm");
    assert_eq!(unknown.code(), Code::InvalidArgument);
    assert!(
        unknown.message().starts_with("baseline_arm: "),
        "{unknown:?}"
    );
    let twice = jobs
        .get_sweep_summary(v1::GetSweepSummaryRequest {
            sweep_id: sweep.sweep_id.clone(),
            metrics: vec![NELBO.into(), NELBO.into()],
            ..Default::default()
        })
        .await
        .expect_err("repeated metric");
    assert!(twice.message().starts_with("metrics[1]: "), "{twice:?}");
    server.stop().await;
}

#[tokio::test]
async fn the_sweep_summary_view_gives_the_same_numbers_as_the_rpc() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let sweep = finished_study(&server).await;
    let summary = jobs
        .get_sweep_summary(v1::GetSweepSummaryRequest {
            sweep_id: sweep.sweep_id.clone(),
            ..Default::default()
        })
        .await
        .expect("summary")
        .into_inner();
    type Row = (
        String,
        String,
        String,
        i32,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<i32>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT arm, metric, stage, n, mean, sd, ci_low, ci_high,
                diff_n, diff_mean, diff_sd, diff_ci_low, diff_ci_high
         FROM sweep_summary WHERE sweep_id = $1
         ORDER BY arm_position, metric, stage",
    )
    .bind(
        proto::SweepId::parse("sweep_id", &sweep.sweep_id)
            .expect("a sweep id")
            .as_uuid(),
    )
    .fetch_all(&server.pool)
    .await
    .expect("view");
    assert_eq!(rows.len(), 2 * 4 * 2);
    let same = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => close(a, b),
        (a, b) => a == b,
    };
    for (arm, metric, stage, n, mean, sd, low, high, dn, dmean, dsd, dlow, dhigh) in rows {
        let a = summary.arms.iter().find(|a| a.arm == arm).expect("the arm");
        let m = a
            .metrics
            .iter()
            .find(|m| m.name == metric)
            .expect("the metric");
        let (s, d) = match stage.as_str() {
            "early" => (m.early.as_ref(), m.early_diff.as_ref()),
            "final" => (m.last.as_ref(), m.last_diff.as_ref()),
            other => panic!("stage {other}"),
        };
        let s = s.expect("a stat");
        let what = format!("{arm} {metric} {stage}");
        assert_eq!(n as u32, s.n, "{what}");
        if s.n > 0 {
            assert!(same(mean, Some(s.mean)), "{what}: {mean:?} vs {}", s.mean);
        } else {
            assert_eq!(mean, None, "{what}");
        }
        assert!(
            same(sd, s.sd) && same(low, s.ci_low) && same(high, s.ci_high),
            "{what}"
        );
        match d {
            None => assert_eq!((dn, dmean), (None, None), "{what}"),
            Some(d) => {
                assert_eq!(dn.map(|n| n as u32), Some(d.n), "{what}");
                if d.n > 0 {
                    assert!(same(dmean, Some(d.mean)), "{what}");
                }
                assert!(
                    same(dsd, d.sd) && same(dlow, d.ci_low) && same(dhigh, d.ci_high),
                    "{what}"
                );
            }
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn a_summary_without_a_single_random_arm_needs_a_named_baseline() {
    let server = TestServer::start().await;
    let mut jobs = server.jobs();
    let mut spec = study_spec(vec![1]);
    spec.source = None;
    spec.grid = vec![v1::GridAxis {
        field: "training.learningRate".into(),
        values: vec![
            json_value(serde_json::json!(0.001)),
            json_value(serde_json::json!(0.01)),
        ],
        names: vec![],
    }];
    let sweep = submit_sweep(&mut jobs, spec).await;
    let status = jobs
        .get_sweep_summary(v1::GetSweepSummaryRequest {
            sweep_id: sweep.sweep_id.clone(),
            ..Default::default()
        })
        .await
        .expect_err("two random arms");
    assert_eq!(status.code(), Code::FailedPrecondition);
    let named = jobs
        .get_sweep_summary(v1::GetSweepSummaryRequest {
            sweep_id: sweep.sweep_id.clone(),
            baseline_arm: "0.01".into(),
            ..Default::default()
        })
        .await
        .expect("named baseline")
        .into_inner();
    assert_eq!(named.baseline_arm, "0.01");
    assert!(named.arms[1].baseline);
    assert_eq!(named.arms[0].missing.len(), 1, "queued runs are missing");
    server.stop().await;
}

#[tokio::test]
async fn the_summary_reads_only_each_runs_epoch_end_points_from_the_store() {
    let server = TestServer::start().await;
    let sweep = finished_study(&server).await;
    let id = proto::SweepId::parse("sweep_id", &sweep.sweep_id).expect("a sweep id");
    let points = server::store::sweep_epoch_end_points(&server.pool, id, &[NELBO.into()])
        .await
        .expect("epoch ends");
    // Five succeeded arm runs (sources excluded), each with its two epoch ends only: the
    // random runs' mid-epoch point at step 5 is not read.
    assert_eq!(points.len(), 5);
    for (job, run) in &points {
        let steps: Vec<(i64, i32)> = run.iter().map(|p| (p.step, p.epoch)).collect();
        assert_eq!(steps, [(10, 1), (20, 2)], "run {job}");
    }
    server.stop().await;
}
