//! The seed document's study end to end at CPU size: examples/study-small.yaml submitted with
//! `trainq sweep submit`, followed with `trainq sweep watch`, and written up with
//! `trainq report`, through the real coordinator and worker on generated CIFAR-100-format data
//! and the real MNIST. Every statistic in the report's summary.json is recomputed here straight
//! from Postgres's metric_points.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Instant;

use serde_json::Value;
use tests::*;

/// Mean and sample standard deviation (n - 1), as the contract defines them.
fn mean_sd(values: &[f64]) -> (f64, Option<f64>) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let sd = (values.len() >= 2)
        .then(|| (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt());
    (mean, sd)
}

fn close(got: f64, want: f64) -> bool {
    let diff = (got - want).abs();
    diff <= 1e-9 * got.abs().max(want.abs()) || diff < 1e-12
}

/// Checks one Stat of summary.json against values computed here.
fn check_stat(stat: &Value, values: &[f64], what: &str) {
    let (mean, sd) = mean_sd(values);
    assert_eq!(
        stat["n"].as_u64(),
        Some(values.len() as u64),
        "{what}: {stat}"
    );
    let got = stat["mean"].as_f64().unwrap_or(f64::NAN);
    assert!(
        close(got, mean),
        "{what}: mean {got} in summary.json, {mean} from Postgres"
    );
    match sd {
        Some(sd) => {
            let got = stat["sd"].as_f64().unwrap_or(f64::NAN);
            assert!(
                close(got, sd),
                "{what}: sd {got} in summary.json, {sd} from Postgres"
            );
        }
        None => assert!(stat.get("sd").is_none(), "{what}: no sd with n < 2: {stat}"),
    }
}

const METRICS: [&str; 4] = [
    "test/neg_elbo_nats",
    "test/bits_per_dim",
    "test/recon",
    "test/kl",
];

// The training lock is held for the whole test on purpose: only one test trains at a time on a
// 2-core machine, and other tests wait for it on their own threads, not on this runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_small_study_runs_as_a_sweep_and_its_report_agrees_with_the_metrics_in_postgres() {
    let _guard = training_lock();
    let env = TestEnv::new();
    let data = data_dir_with_cifar(&env.dir.path().join("data"), 1000, 200, 7);
    let coordinator = env.start_coordinator(&[]).await;
    let mut worker = env.start_worker_with_data(&coordinator, "study-worker", &data, &[]);
    let dir = env.dir.path();
    let study = workspace_root().join("examples/study-small.yaml");
    let study = study.to_str().expect("utf-8 path");

    // A dry run validates locally and prints the spec as JSON.
    let dry: Value = serde_json::from_str(&expect_exit(
        &trainq(&coordinator, dir, &["sweep", "submit", "--dry-run", study]),
        0,
        "sweep submit --dry-run",
    ))
    .expect("dry-run JSON");
    assert_eq!(dry["grid"][0]["field"], "cifarCvae.init", "{dry}");

    let started = Instant::now();
    let id = expect_exit(
        &trainq(&coordinator, dir, &["sweep", "submit", study]),
        0,
        "sweep submit",
    )
    .trim()
    .to_string();
    assert_eq!(id.len(), 36, "sweep submit prints the sweep id: {id:?}");
    // stdout is a pipe: plain lines, and exit 0 once every job has ended and succeeded.
    let out = trainq(&coordinator, dir, &["sweep", "watch", &id]);
    assert!(worker.is_running(), "the worker died:\n{}", worker.log());
    let lines = expect_exit(&out, 0, "sweep watch");
    let wall = started.elapsed();
    assert!(lines.contains("jobs ended"), "{lines}");
    eprintln!(
        "study-small (12 jobs: 2 sources, 5 arms x 2 seeds of the CVAE) took {:.1} s from submit to the end of the watch on this machine",
        wall.as_secs_f64()
    );

    let sweep: Value = serde_json::from_str(&expect_exit(
        &trainq(
            &coordinator,
            dir,
            &["sweep", "get", &id, "--output", "json"],
        ),
        0,
        "sweep get",
    ))
    .expect("sweep JSON");
    assert_eq!(sweep["state"], "SWEEP_STATE_SUCCEEDED", "{sweep}");
    let arms: Vec<String> = sweep["arms"]
        .as_array()
        .expect("arms")
        .iter()
        .map(|a| a.as_str().expect("arm name").to_string())
        .collect();
    assert_eq!(
        arms,
        [
            "random",
            "replicate-conv2",
            "luminance-conv2",
            "conv1-random-conv2",
            "replicate-frozen2"
        ]
    );
    let runs = sweep["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2 + 5 * 2, "{sweep}");
    // (arm, seed) -> job id of the CVAE runs.
    let mut jobs: BTreeMap<(String, u64), String> = BTreeMap::new();
    for r in runs {
        assert_eq!(r["state"], "JOB_STATE_SUCCEEDED", "{r}");
        if r["source"].as_bool() == Some(true) {
            continue;
        }
        let seed: u64 = r["seed"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .or_else(|| r["seed"].as_u64())
            .expect("seed");
        jobs.insert(
            (r["arm"].as_str().expect("arm").to_string(), seed),
            r["jobId"].as_str().expect("job id").to_string(),
        );
    }

    let listed = expect_exit(
        &trainq(&coordinator, dir, &["sweep", "list"]),
        0,
        "sweep list",
    );
    assert!(
        listed.contains(&id) && listed.contains("12 succeeded"),
        "{listed}"
    );
    let table = expect_exit(
        &trainq(&coordinator, dir, &["sweep", "get", &id]),
        0,
        "sweep get",
    );
    assert!(
        table.contains("replicate-frozen2") && table.contains("succeeded"),
        "{table}"
    );

    let report = dir.join("report");
    let report_str = report.to_str().expect("utf-8 path");
    let out = trainq(&coordinator, dir, &["report", &id, "--out", report_str]);
    expect_exit(&out, 0, "report");

    // TRAINQ_KEEP_REPORT=DIR keeps a copy of the report to look at.
    if let Ok(keep) = std::env::var("TRAINQ_KEEP_REPORT") {
        let status = Command::new("cp")
            .arg("-r")
            .arg(&report)
            .arg(&keep)
            .status()
            .expect("cp runs");
        assert!(status.success(), "copying the report to {keep}");
    }

    // The files.
    let md = std::fs::read_to_string(report.join("report.md")).expect("report.md");
    for metric in METRICS {
        let stem = metric.replace('/', "_");
        for ext in ["png", "svg"] {
            let rel = format!("curves/{stem}.{ext}");
            let len = std::fs::metadata(report.join(&rel))
                .unwrap_or_else(|e| panic!("{rel}: {e}"))
                .len();
            assert!(len > 1000, "{rel} is only {len} bytes");
            assert!(md.contains(&rel), "report.md does not link {rel}");
        }
        assert!(md.contains(&format!("## {metric}")), "{md}");
    }
    for arm in &arms {
        let rel = format!("samples/{arm}.png");
        let bytes = std::fs::read(report.join(&rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{rel} is a PNG");
        assert!(md.contains(&rel), "report.md does not show {rel}");
    }
    assert!(md.contains("## Convergence"), "{md}");
    assert!(md.contains("None: every planned run succeeded."), "{md}");
    let verdicts: Vec<&str> = md
        .lines()
        .filter(|l| l.starts_with("- Verdict for `"))
        .collect();
    assert_eq!(verdicts.len(), 4, "one verdict per transfer arm:\n{md}");
    for arm in &arms[1..] {
        let v = verdicts
            .iter()
            .find(|v| v.starts_with(&format!("- Verdict for `{arm}`")))
            .unwrap_or_else(|| panic!("no verdict for {arm}:\n{md}"));
        assert!(
            v.contains("at the end of training") && v.contains("early in training"),
            "{v}"
        );
        assert!(
            v.contains("beat random init")
                || v.contains("worse than random init")
                || v.contains("no difference beyond the noise"),
            "two seeds give an interval, so a verdict: {v}"
        );
    }

    // Every statistic of summary.json against Postgres.
    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(report.join("summary.json")).expect("summary.json"),
    )
    .expect("summary JSON");
    assert_eq!(summary["baselineArm"], "random", "{summary}");
    assert_eq!(summary["convergenceMetric"], "test/neg_elbo_nats");
    let pool = env.pool().await;
    // (arm, seed, metric) -> (early, final) straight from metric_points.
    let mut values: BTreeMap<(String, u64, String), (f64, f64)> = BTreeMap::new();
    for ((arm, seed), job) in &jobs {
        for metric in METRICS {
            let rows: Vec<(i32, i64, f64)> = sqlx::query_as(
                "SELECT epoch, step, value FROM metric_points \
                 WHERE job_id::text = $1 AND name = $2 ORDER BY step",
            )
            .bind(job)
            .bind(metric)
            .fetch_all(&pool)
            .await
            .expect("metric points");
            assert_eq!(rows.len(), 2, "{metric} of {job}: one point per epoch");
            let early = rows
                .iter()
                .filter(|r| r.0 == 1)
                .max_by_key(|r| r.1)
                .expect("epoch 1")
                .2;
            let last = rows.last().expect("a point").2;
            values.insert((arm.clone(), *seed, metric.to_string()), (early, last));
        }
    }
    let target = mean_sd(
        &[1u64, 2]
            .iter()
            .map(|s| values[&("random".to_string(), *s, "test/neg_elbo_nats".to_string())].1)
            .collect::<Vec<_>>(),
    )
    .0;
    assert!(
        close(
            summary["convergenceTarget"].as_f64().expect("target"),
            target
        ),
        "{summary}"
    );
    let arm_summaries = summary["arms"].as_array().expect("arms");
    assert_eq!(arm_summaries.len(), 5);
    let mut checked = 0;
    for a in arm_summaries {
        let arm = a["arm"].as_str().expect("arm").to_string();
        assert_eq!(a["baseline"].as_bool().unwrap_or(false), arm == "random");
        for metric in METRICS {
            let m = a["metrics"]
                .as_array()
                .expect("metrics")
                .iter()
                .find(|m| m["name"] == metric)
                .unwrap_or_else(|| panic!("{metric} missing for {arm}"));
            let of = |seed: u64| values[&(arm.clone(), seed, metric.to_string())];
            let base = |seed: u64| values[&("random".to_string(), seed, metric.to_string())];
            let what = format!("{arm} {metric}");
            check_stat(&m["early"], &[of(1).0, of(2).0], &format!("{what} early"));
            check_stat(&m["last"], &[of(1).1, of(2).1], &format!("{what} final"));
            if arm == "random" {
                assert!(m.get("earlyDiff").is_none() && m.get("lastDiff").is_none());
            } else {
                let early: Vec<f64> = [1, 2].iter().map(|&s| of(s).0 - base(s).0).collect();
                let last: Vec<f64> = [1, 2].iter().map(|&s| of(s).1 - base(s).1).collect();
                check_stat(&m["earlyDiff"], &early, &format!("{what} early diff"));
                check_stat(&m["lastDiff"], &last, &format!("{what} final diff"));
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 5 * METRICS.len());

    // The README's grpcurl submit of the study file (the dry run's JSON), then `trainq sweep
    // cancel`: a cancelled sweep's watch exits 1.
    let request = serde_json::json!({ "spec": dry }).to_string();
    let second = coordinator
        .grpcurl(Some(&request), &["trainq.v1.JobService/SubmitSweep"])
        .json();
    let second_id = second["sweepId"].as_str().expect("sweep id").to_string();
    assert_eq!(
        second["runs"].as_array().map(Vec::len),
        Some(12),
        "{second}"
    );
    let cancelled: Value = serde_json::from_str(&expect_exit(
        &trainq(
            &coordinator,
            dir,
            &["sweep", "cancel", &second_id, "--output", "json"],
        ),
        0,
        "sweep cancel",
    ))
    .expect("cancelled sweep JSON");
    assert_eq!(cancelled["state"], "SWEEP_STATE_CANCELLED", "{cancelled}");
    let out = trainq(&coordinator, dir, &["sweep", "watch", &second_id]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "watching a cancelled sweep exits 1: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "study-small: sweep, report and checks took {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
}
