//! The load generator (`trainq-loadgen`) at a tiny size, so that it cannot rot: two real
//! coordinators on one database, five simulated workers, one watcher. Its full size is a
//! benchmark only. Asserts what must hold at any speed (the figures exist, the counts add up,
//! no lease is lost), never a timing.

use std::process::Command;

use serde_json::Value;

fn number(v: &Value, path: &str) -> f64 {
    v.pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{path} is not a number in {v:#}"))
}

#[test]
fn the_load_generator_at_a_tiny_size_prints_every_figure_and_its_counts_add_up() {
    const WORKERS: f64 = 5.0;
    const HEARTBEAT_S: f64 = 0.2;
    let out = Command::new(tests::binary("trainq-loadgen"))
        .args([
            "--coordinators",
            "2",
            "--workers",
            "5",
            "--heartbeat-ms",
            "200",
        ])
        .args([
            "--batch-points",
            "100",
            "--batch-every-ms",
            "300",
            "--job-s",
            "1.5",
        ])
        .args([
            "--warmup-s",
            "1",
            "--duration-s",
            "3",
            "--watchers",
            "1",
            "--json",
        ])
        .output()
        .expect("running trainq-loadgen");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let tables = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "trainq-loadgen failed:\n{tables}\n{stdout}"
    );

    // The human output: every promised column and row.
    for column in [
        "workers",
        "claims/s",
        "heartbeats/s",
        "worker heartbeats/s",
        "points/s stored",
        "Heartbeat p99 (ms)",
        "WorkerHeartbeat p99 (ms)",
        "leases lost",
        "jobs reaped",
        "| method",
        "p50 (ms)",
        "p99 (ms)",
        "CPU (% of one core)",
        "VmRSS max (MiB)",
        "VmHWM (MiB)",
        "Postgres connections",
        "watch latency (ReportMetrics answered by A -> seen by a watcher of B)",
        "database pool",
        "open files limit",
    ] {
        assert!(tables.contains(column), "no {column:?} in:\n{tables}");
    }
    for method in [
        "SubmitJob",
        "ClaimJob",
        "| Heartbeat ",
        "WorkerHeartbeat",
        "ReportMetrics",
        "CompleteJob",
        "WatchJob",
    ] {
        assert!(tables.contains(method), "no {method} row in:\n{tables}");
    }
    let last = tables.lines().last().unwrap_or_default();
    assert!(
        last == "held: yes" || last == "held: no",
        "the last line is {last:?}"
    );

    // The results.
    let v: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("no JSON object on stdout ({e}):\n{stdout}\n{tables}"));
    let run = &v["runs"][0];
    assert_eq!(run["workers"], 5, "{run:#}");
    assert_eq!(run["failures"], serde_json::json!([]), "{run:#}");
    assert_eq!(run["stopped_cleanly"], true, "{run:#}");
    assert!(number(run, "/claims") > 0.0, "{run:#}");
    // Every worker beats once per interval: within a generous factor of workers / interval.
    let expected = WORKERS / HEARTBEAT_S;
    let beats = number(run, "/worker_heartbeats_per_s");
    assert!(
        (expected / 4.0..=expected * 2.0).contains(&beats),
        "{beats} worker heartbeats/s, expected about {expected}"
    );
    let lease_beats = number(run, "/heartbeats_per_s");
    assert!(
        lease_beats > 0.0 && lease_beats <= expected * 2.0,
        "{lease_beats} lease heartbeats/s, at most about {expected}"
    );
    for method in ["ClaimJob", "Heartbeat", "WorkerHeartbeat", "ReportMetrics"] {
        assert!(
            number(run, &format!("/methods/{method}/calls")) > 0.0,
            "no {method} call in the window: {run:#}"
        );
        assert!(
            run["methods"][method]["p99_ms"].is_number(),
            "{method}: {run:#}"
        );
    }
    // Points: stored in the window, and over the run exactly what ReportMetrics said it stored.
    assert!(number(run, "/points_stored_window") > 0.0, "{run:#}");
    let stored = number(run, "/points_stored_run_sql");
    assert!(stored > 0.0, "{run:#}");
    assert_eq!(
        stored,
        number(run, "/points_reported_stored_run"),
        "metric_points rows against ReportMetrics' stored: {run:#}"
    );
    assert_eq!(number(run, "/points_conflicting_run"), 0.0, "{run:#}");
    assert_eq!(number(run, "/leases_lost"), 0.0, "{run:#}");
    assert_eq!(number(run, "/jobs_reaped"), 0.0, "{run:#}");
    assert!(
        number(run, "/watch_latency/samples") > 0.0,
        "no watch latency measured: {run:#}"
    );
    let coordinators = run["coordinators"].as_array().expect("coordinators");
    assert_eq!(coordinators.len(), 2, "{run:#}");
    for c in coordinators {
        assert!(c["cpu_pct_of_one_core"].is_number(), "{c:#}");
        assert!(number(c, "/vm_hwm_kib") > 0.0, "{c:#}");
    }
    assert!(number(run, "/postgres_connections_max") > 0.0, "{run:#}");
    assert_eq!(v["held"], run["held"]);
}
