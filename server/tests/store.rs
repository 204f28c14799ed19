//! Store tests: each runs against a fresh, migrated database that `#[sqlx::test]` creates from
//! DATABASE_URL (for example postgres://postgres@127.0.0.1:5432/postgres) and drops afterwards.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use proto::spec::JobSpec;
use proto::{v1, JobId, JobState};
use server::domain::{ArtifactHeader, ArtifactKind, JobQuery, Lease, MetricPoint, MetricsQuery};
use server::error::Error;
use server::{reconcile, store};
use sqlx::PgPool;
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(60);

/// A new job id, time-ordered like the coordinator's.
fn new_id() -> JobId {
    JobId::from(Uuid::now_v7())
}

fn spec(max_attempts: u32, labels: &[(&str, &str)]) -> JobSpec {
    JobSpec::try_from(v1::JobSpec {
        name: "mnist".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        training: Some(v1::Training {
            epochs: 1,
            batch_size: 32,
            learning_rate: 1e-3,
            ..Default::default()
        }),
        max_attempts,
        depends_on: vec![],
        experiment: Some(v1::job_spec::Experiment::MnistClassifier(
            v1::MnistClassifier {},
        )),
    })
    .expect("valid spec")
}

async fn submit(pool: &PgPool, max_attempts: u32) -> JobId {
    let id = new_id();
    store::insert_job(pool, id, &spec(max_attempts, &[]))
        .await
        .expect("insert");
    id
}

async fn claim(pool: &PgPool, id: JobId, worker: &str, lease_for: Duration) -> Lease {
    let row = store::claim_job(pool, id, worker, lease_for)
        .await
        .expect("claim query")
        .expect("claimed")
        .job;
    Lease {
        job_id: id,
        attempt: row.attempt,
        worker_id: worker.into(),
    }
}

async fn job(pool: &PgPool, id: JobId) -> store::JobRow {
    store::get_job(pool, id)
        .await
        .expect("get")
        .expect("job exists")
}

fn pt(name: &str, step: i64, value: f64) -> MetricPoint {
    MetricPoint {
        name: name.into(),
        step,
        epoch: 1,
        value,
    }
}

fn metrics_query(
    id: JobId,
    names: &[&str],
    page_size: u32,
    max_points: Option<u32>,
) -> MetricsQuery {
    MetricsQuery {
        job_id: id,
        names: names.iter().map(|n| n.to_string()).collect(),
        page_size,
        after: None,
        max_points,
    }
}

/// Every page of `q` from its start: the points of each page, in order.
async fn pages(pool: &PgPool, mut q: MetricsQuery) -> Vec<Vec<MetricPoint>> {
    let mut pages = Vec::new();
    loop {
        let (points, next) = store::metric_page(pool, &q).await.expect("page");
        assert!(
            points.len() <= q.page_size as usize,
            "a page holds at most page_size"
        );
        pages.push(points);
        match next {
            Some(t) => q.after = Some(t),
            None => return pages,
        }
    }
}

/// Every point of the job's `names` (all when empty), through the pages.
async fn every_point(pool: &PgPool, id: JobId, names: &[String]) -> Vec<MetricPoint> {
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    pages(pool, metrics_query(id, &names, 1000, None))
        .await
        .concat()
}

fn assert_precondition<T: std::fmt::Debug>(result: Result<T, Error>) -> String {
    match result {
        Err(Error::FailedPrecondition(m)) => m,
        other => panic!("expected FailedPrecondition, got {other:?}"),
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_is_won_by_exactly_one_of_two_concurrent_claimers(pool: PgPool) {
    for _ in 0..20 {
        let id = submit(&pool, 3).await;
        let (a, b) = tokio::join!(
            store::claim_job(&pool, id, "worker-a", LONG),
            store::claim_job(&pool, id, "worker-b", LONG),
        );
        let winners: Vec<_> = [a.expect("a"), b.expect("b")]
            .into_iter()
            .flatten()
            .collect();
        assert_eq!(winners.len(), 1, "exactly one claimer wins");
        let row = job(&pool, id).await;
        assert_eq!((row.state.as_str(), row.attempt), ("running", 1));
        assert_eq!(row.worker_id, winners[0].job.worker_id);
        assert!(row.started_at.is_some() && row.lease_expires_at.is_some());
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn writes_from_a_stale_attempt_are_refused(pool: PgPool) {
    let id = submit(&pool, 3).await;
    let first = claim(&pool, id, "w1", LONG).await;
    assert_eq!(
        store::fail_job(&pool, &first, "oom", false, |_| Duration::ZERO)
            .await
            .expect("fail")
            .0,
        JobState::Queued
    );
    let second = claim(&pool, id, "w2", LONG).await;
    assert_eq!(second.attempt, 2);

    let m = assert_precondition(
        store::record_metrics(&pool, &first, &[pt("train/loss", 1, 1.0)]).await,
    );
    assert!(m.starts_with("stale attempt 1"), "{m}");
    assert_precondition(store::complete_job(&pool, &first, 0).await);
    assert_precondition(store::fail_job(&pool, &first, "late", true, |_| Duration::ZERO).await);
    assert_eq!(
        store::heartbeat(&pool, &first, LONG)
            .await
            .expect("heartbeat"),
        None
    );
    // Same attempt number but another worker: also not the lease holder.
    let impostor = Lease {
        worker_id: "w1".into(),
        ..second.clone()
    };
    assert_precondition(store::complete_job(&pool, &impostor, 0).await);

    assert!(store::heartbeat(&pool, &second, LONG)
        .await
        .expect("heartbeat")
        .is_some());
    assert_eq!(
        store::record_metrics(&pool, &second, &[pt("train/loss", 1, 1.0)])
            .await
            .expect("report"),
        1
    );
    store::complete_job(&pool, &second, 0)
        .await
        .expect("complete");
    store::complete_job(&pool, &second, 0)
        .await
        .expect("completing the same attempt twice is fine");
    assert_eq!(job(&pool, id).await.state, JobState::Succeeded);
    assert!(
        every_point(&pool, id, &[]).await.len() == 1,
        "no point from attempt 1"
    );

    let unknown = Lease {
        job_id: new_id(),
        ..second
    };
    assert!(matches!(
        store::complete_job(&pool, &unknown, 0).await,
        Err(Error::NotFound(_))
    ));
}

#[sqlx::test(migrations = "../migrations")]
async fn metric_points_are_stored_once_per_name_and_step_and_latest_keeps_the_highest_step(
    pool: PgPool,
) {
    let id = submit(&pool, 3).await;
    let lease = claim(&pool, id, "w", LONG).await;
    let first = [
        pt("train/loss", 1, 2.0),
        pt("train/loss", 2, 1.5),
        pt("test/accuracy", 2, 0.9),
    ];
    assert_eq!(
        store::record_metrics(&pool, &lease, &first)
            .await
            .expect("report"),
        3
    );
    // A retried batch, with one changed value: nothing new is stored, the first value stays.
    let again = [pt("train/loss", 2, 99.0), pt("train/loss", 1, 2.0)];
    assert_eq!(
        store::record_metrics(&pool, &lease, &again)
            .await
            .expect("report"),
        0
    );
    // Duplicates inside one batch count once; an older step arriving late is stored but does not
    // move `latest` backwards.
    let later = [
        pt("train/loss", 5, 0.5),
        pt("train/loss", 5, 0.7),
        pt("train/loss", 3, 1.0),
    ];
    assert_eq!(
        store::record_metrics(&pool, &lease, &later)
            .await
            .expect("report"),
        2
    );
    assert_eq!(
        store::record_metrics(&pool, &lease, &[pt("train/loss", 4, 0.8)])
            .await
            .expect("report"),
        1
    );
    assert_eq!(
        store::record_metrics(&pool, &lease, &[pt("train/nan", 1, f64::NAN)])
            .await
            .expect("report"),
        1
    );

    let series = every_point(&pool, id, &["train/loss".into()]).await;
    let steps: Vec<(i64, f64)> = series.iter().map(|p| (p.step, p.value)).collect();
    assert_eq!(steps, [(1, 2.0), (2, 1.5), (3, 1.0), (4, 0.8), (5, 0.5)]);

    let latest: HashMap<String, MetricPoint> = store::latest_metrics(&pool, id)
        .await
        .expect("latest")
        .into_iter()
        .map(|p| (p.name.clone(), p))
        .collect();
    assert_eq!(
        (latest["train/loss"].step, latest["train/loss"].value),
        (5, 0.5)
    );
    assert_eq!(
        (latest["test/accuracy"].step, latest["test/accuracy"].value),
        (2, 0.9)
    );
    assert!(
        latest["train/nan"].value.is_nan(),
        "NaN is stored, not rejected"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn cancelling_a_finished_job_is_refused_and_an_unknown_job_is_not_found(pool: PgPool) {
    let id = submit(&pool, 3).await;
    let (row, _) = store::cancel_job(&pool, id, "changed my mind")
        .await
        .expect("cancel queued");
    assert_eq!(
        (row.state.as_str(), row.error.as_deref()),
        ("cancelled", Some("changed my mind"))
    );
    assert!(row.finished_at.is_some());
    let m = assert_precondition(store::cancel_job(&pool, id, "again").await);
    assert!(m.contains("already cancelled"), "{m}");
    assert!(
        store::claim_job(&pool, id, "w", LONG)
            .await
            .expect("claim")
            .is_none(),
        "cancelled jobs are not claimable"
    );

    let done = submit(&pool, 3).await;
    let lease = claim(&pool, done, "w", LONG).await;
    store::complete_job(&pool, &lease, 0)
        .await
        .expect("complete");
    let m = assert_precondition(store::cancel_job(&pool, done, "too late").await);
    assert!(m.contains("already succeeded"), "{m}");

    assert!(matches!(
        store::cancel_job(&pool, new_id(), "x").await,
        Err(Error::NotFound(_))
    ));
}

#[sqlx::test(migrations = "../migrations")]
async fn a_failed_attempt_is_requeued_after_a_backoff_and_fails_for_good_after_max_attempts(
    pool: PgPool,
) {
    let id = submit(&pool, 2).await;
    let first = claim(&pool, id, "w", LONG).await;
    let (state, _) = store::fail_job(&pool, &first, "cuda error", false, |_| {
        Duration::from_millis(400)
    })
    .await
    .expect("fail");
    assert_eq!(state, JobState::Queued);
    let row = job(&pool, id).await;
    assert_eq!(
        (row.error.as_deref(), row.dispatched_at),
        (Some("cuda error"), None)
    );
    assert!(row.not_before.is_some() && row.lease_expires_at.is_none());
    assert_eq!(
        store::fail_job(&pool, &first, "cuda error", false, |_| LONG)
            .await
            .expect("repeat")
            .0,
        JobState::Queued
    );

    assert!(
        store::claim_job(&pool, id, "w", LONG)
            .await
            .expect("claim")
            .is_none(),
        "still in backoff"
    );
    assert!(
        store::take_due_for_dispatch(&pool, LONG, 10)
            .await
            .expect("due")
            .is_empty(),
        "not dispatched in backoff"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        store::take_due_for_dispatch(&pool, LONG, 10)
            .await
            .expect("due"),
        [id],
        "dispatched after backoff"
    );

    let second = claim(&pool, id, "w", LONG).await;
    assert_eq!(second.attempt, 2);
    let (state, _) = store::fail_job(&pool, &second, "cuda error again", false, |_| {
        Duration::ZERO
    })
    .await
    .expect("fail");
    assert_eq!(state, JobState::Failed, "no attempts left");
    let row = job(&pool, id).await;
    assert!(row.finished_at.is_some());
    assert_eq!(row.error.as_deref(), Some("cuda error again"));

    let permanent = submit(&pool, 5).await;
    let lease = claim(&pool, permanent, "w", LONG).await;
    let (state, _) = store::fail_job(&pool, &lease, "bad config", true, |_| Duration::ZERO)
        .await
        .expect("fail");
    assert_eq!(
        state,
        JobState::Failed,
        "a permanent failure is not retried"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn the_lease_reaper_requeues_expired_leases_and_fails_exhausted_ones(pool: PgPool) {
    let retry = submit(&pool, 2).await;
    let exhausted = submit(&pool, 1).await;
    let healthy = submit(&pool, 1).await;
    let retry_lease = claim(&pool, retry, "gone-1", Duration::ZERO).await;
    claim(&pool, exhausted, "gone-2", Duration::ZERO).await;
    claim(&pool, healthy, "alive", LONG).await;
    tokio::time::sleep(Duration::from_millis(20)).await;

    let reaped = store::reap_expired_leases(&pool, 100).await.expect("reap");
    let reaped: HashMap<JobId, &str> = reaped
        .into_iter()
        .map(|r| (r.id, r.state.as_str()))
        .collect();
    assert_eq!(reaped.len(), 2, "{reaped:?}");
    assert_eq!(reaped[&retry], "queued");
    assert_eq!(reaped[&exhausted], "failed");

    let row = job(&pool, retry).await;
    assert_eq!(row.error.as_deref(), Some("lease expired on worker gone-1"));
    assert_eq!(
        row.dispatched_at, None,
        "requeued jobs are dispatched again at once"
    );
    assert!(job(&pool, exhausted).await.finished_at.is_some());
    assert_eq!(job(&pool, healthy).await.state, JobState::Running);
    assert_eq!(
        store::heartbeat(&pool, &retry_lease, LONG)
            .await
            .expect("heartbeat"),
        None,
        "the old worker must stop"
    );
    assert!(
        store::reap_expired_leases(&pool, 100)
            .await
            .expect("reap")
            .is_empty(),
        "nothing left to reap"
    );
    assert_eq!(claim(&pool, retry, "w", LONG).await.attempt, 2);
}

#[sqlx::test(migrations = "../migrations")]
async fn the_reconciler_picks_queued_jobs_that_are_undispatched_or_stale_and_nothing_else(
    pool: PgPool,
) {
    let a = submit(&pool, 3).await;
    let b = submit(&pool, 3).await;
    let claimed = submit(&pool, 3).await;
    claim(&pool, claimed, "w", LONG).await;
    let pushed = submit(&pool, 3).await;
    store::mark_dispatched(&pool, &[pushed])
        .await
        .expect("mark");

    assert_eq!(
        store::take_due_for_dispatch(&pool, LONG, 100)
            .await
            .expect("due"),
        [a, b],
        "oldest first"
    );
    assert!(
        store::take_due_for_dispatch(&pool, LONG, 100)
            .await
            .expect("due")
            .is_empty(),
        "just dispatched"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    let stale: HashSet<JobId> = store::take_due_for_dispatch(&pool, Duration::from_millis(10), 100)
        .await
        .expect("due")
        .into_iter()
        .collect();
    assert_eq!(
        stale,
        HashSet::from([a, b, pushed]),
        "pushed long ago: pushed again; running: never"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_failed_push_leaves_jobs_undispatched_for_the_next_round(pool: PgPool) {
    let id = submit(&pool, 3).await;
    let unreachable =
        server::dispatch::Dispatcher::new("redis://127.0.0.1:1", "trainq-test:").expect("url");
    let pushed = reconcile::dispatch_due(&pool, &unreachable, LONG)
        .await
        .expect("round");
    assert_eq!(pushed, 0);
    assert_eq!(job(&pool, id).await.dispatched_at, None);
    assert_eq!(
        store::take_due_for_dispatch(&pool, LONG, 10)
            .await
            .expect("due"),
        [id]
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn pages_return_every_matching_job_exactly_once_newest_first(pool: PgPool) {
    let mut wanted = Vec::new();
    for i in 0..9 {
        let team = if i % 3 == 0 { "b" } else { "a" };
        let id = new_id();
        store::insert_job(
            &pool,
            id,
            &spec(3, &[("team", team), ("i", &i.to_string())]),
        )
        .await
        .expect("insert");
        if team == "a" {
            wanted.push(id);
        }
    }
    // Jobs created in one transaction share created_at: the id breaks the tie.
    let mut tx = pool.begin().await.expect("begin");
    for _ in 0..8 {
        let id = new_id();
        store::insert_job(&mut *tx, id, &spec(3, &[("team", "a")]))
            .await
            .expect("insert");
        wanted.push(id);
    }
    tx.commit().await.expect("commit");

    let mut seen = Vec::new();
    let mut query = JobQuery {
        states: vec![],
        labels: serde_json::json!({"team": "a"}),
        page_size: 4,
        after: None,
    };
    loop {
        let (rows, next) = store::list_jobs(&pool, &query).await.expect("list");
        assert!(rows.len() <= 4);
        seen.extend(rows.iter().map(|r| (r.created_at, r.id)));
        match next {
            Some(token) => query.after = Some(token),
            None => break,
        }
    }
    let ids: Vec<JobId> = seen.iter().map(|(_, id)| *id).collect();
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        ids.len(),
        "no job twice"
    );
    assert_eq!(
        ids.iter().copied().collect::<HashSet<_>>(),
        wanted.iter().copied().collect(),
        "every team=a job"
    );
    assert!(seen.windows(2).all(|w| w[0] > w[1]), "newest first");

    claim(&pool, wanted[0], "w", LONG).await;
    let running = JobQuery {
        states: vec![JobState::Running],
        labels: serde_json::json!({}),
        page_size: 50,
        after: None,
    };
    let (rows, next) = store::list_jobs(&pool, &running).await.expect("list");
    assert_eq!((rows.len(), rows[0].id, next), (1, wanted[0], None));
}

// ---------------------------------------------------------------------------------------------
// Dependencies
// ---------------------------------------------------------------------------------------------

/// A classifier job that waits for `deps`.
fn dependent_spec(deps: &[JobId]) -> JobSpec {
    let mut raw = spec(1, &[]).to_proto();
    raw.depends_on = deps.iter().map(JobId::to_string).collect();
    JobSpec::try_from(raw).expect("valid spec")
}

/// A CVAE job that starts from `source`'s checkpoint, also listing `deps`.
fn transfer_spec(source: JobId, deps: &[JobId]) -> JobSpec {
    let mut raw = dependent_spec(deps).to_proto();
    raw.experiment = Some(v1::job_spec::Experiment::CifarCvae(v1::CifarCvae {
        init: Some(v1::Initialization {
            kind: Some(v1::initialization::Kind::Transfer(v1::TransferInit {
                source_job_id: source.to_string(),
                conv1: v1::Conv1Adaptation::Luminance as i32,
                copy_conv2: true,
                freeze: None,
            })),
        }),
        ..Default::default()
    }));
    JobSpec::try_from(raw).expect("valid spec")
}

async fn submit_spec(pool: &PgPool, spec: &JobSpec) -> (JobId, store::JobRow) {
    let id = new_id();
    let row = store::insert_job(pool, id, spec).await.expect("insert");
    (id, row)
}

async fn state(pool: &PgPool, id: JobId) -> &'static str {
    job(pool, id).await.state.as_str()
}

async fn counts(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as("SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM job_dependencies)")
        .fetch_one(pool)
        .await
        .expect("count")
}

fn assert_invalid<T: std::fmt::Debug>(result: Result<T, Error>) -> (String, String) {
    match result {
        Err(Error::InvalidArgument { field, description }) => (field, description),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_chain_waits_and_only_the_next_link_is_queued_when_its_dependency_succeeds(pool: PgPool) {
    let a = submit(&pool, 3).await;
    let (b, b_row) = submit_spec(&pool, &dependent_spec(&[a])).await;
    let (c, c_row) = submit_spec(&pool, &dependent_spec(&[b])).await;
    assert_eq!(
        (b_row.state.as_str(), c_row.state.as_str()),
        ("waiting", "waiting")
    );
    assert_eq!(store::dependencies_of(&pool, c).await.expect("deps"), [b]);
    assert!(
        store::take_due_for_dispatch(&pool, LONG, 10)
            .await
            .expect("due")
            == [a],
        "waiting jobs are not dispatched"
    );
    assert!(
        store::claim_job(&pool, b, "w", LONG)
            .await
            .expect("claim")
            .is_none(),
        "waiting jobs cannot be claimed"
    );

    let lease = claim(&pool, a, "w", LONG).await;
    assert_eq!(
        store::complete_job(&pool, &lease, 0)
            .await
            .expect("complete"),
        [b]
    );
    let b_row = job(&pool, b).await;
    assert_eq!(
        (b_row.state.as_str(), b_row.dispatched_at),
        ("queued", None)
    );
    assert_eq!(state(&pool, c).await, "waiting", "c still waits for b");
    assert!(
        store::complete_job(&pool, &lease, 0)
            .await
            .expect("a repeated completion")
            .is_empty(),
        "promotes nothing twice"
    );
    assert_eq!(
        store::take_due_for_dispatch(&pool, LONG, 10)
            .await
            .expect("due"),
        [b],
        "the reconciler dispatches the promoted job"
    );

    let lease = claim(&pool, b, "w", LONG).await;
    assert_eq!(
        store::complete_job(&pool, &lease, 0)
            .await
            .expect("complete"),
        [c]
    );
    assert_eq!(state(&pool, c).await, "queued");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_with_two_dependencies_is_queued_only_after_both_succeed_even_when_they_finish_together(
    pool: PgPool,
) {
    let a = submit(&pool, 3).await;
    let x = submit(&pool, 3).await;
    let (d, _) = submit_spec(&pool, &dependent_spec(&[a, x])).await;
    let lease_a = claim(&pool, a, "w", LONG).await;
    assert!(store::complete_job(&pool, &lease_a, 0)
        .await
        .expect("complete")
        .is_empty());
    assert_eq!(state(&pool, d).await, "waiting", "x has not succeeded yet");
    let lease_x = claim(&pool, x, "w", LONG).await;
    assert_eq!(
        store::complete_job(&pool, &lease_x, 0)
            .await
            .expect("complete"),
        [d]
    );

    // Two dependencies succeeding at the same instant: whichever commits second sees the first.
    for _ in 0..10 {
        let (a, b) = (submit(&pool, 3).await, submit(&pool, 3).await);
        let (c, _) = submit_spec(&pool, &dependent_spec(&[a, b])).await;
        let (la, lb) = (
            claim(&pool, a, "w", LONG).await,
            claim(&pool, b, "w", LONG).await,
        );
        let (ra, rb) = tokio::join!(
            store::complete_job(&pool, &la, 0),
            store::complete_job(&pool, &lb, 0)
        );
        let promoted: Vec<JobId> = [ra.expect("a"), rb.expect("b")].concat();
        assert_eq!(promoted, [c], "promoted exactly once");
        assert_eq!(state(&pool, c).await, "queued");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_failed_dependency_fails_the_whole_waiting_chain_with_dependency_failed(pool: PgPool) {
    let a = submit(&pool, 3).await;
    let (b, _) = submit_spec(&pool, &dependent_spec(&[a])).await;
    let (c, _) = submit_spec(&pool, &dependent_spec(&[b])).await;
    let unrelated_dep = submit(&pool, 3).await;
    let (unrelated, _) = submit_spec(&pool, &dependent_spec(&[unrelated_dep])).await;

    let lease = claim(&pool, a, "w", LONG).await;
    let (a_state, failed) = store::fail_job(&pool, &lease, "diverged", true, |_| Duration::ZERO)
        .await
        .expect("fail");
    assert_eq!(a_state, JobState::Failed);
    assert_eq!(failed, [b, c]);
    let (b_row, c_row) = (job(&pool, b).await, job(&pool, c).await);
    assert_eq!(
        (b_row.state.as_str(), b_row.error.unwrap_or_default()),
        ("failed", format!("dependency_failed: job {a} is failed"))
    );
    assert_eq!(
        (c_row.state.as_str(), c_row.error.unwrap_or_default()),
        ("failed", format!("dependency_failed: job {b} is failed")),
        "each job names its own dependency"
    );
    assert!(b_row.finished_at.is_some() && c_row.finished_at.is_some());
    assert_eq!(b_row.attempt, 0, "never ran");
    assert!(store::claim_job(&pool, b, "w", LONG)
        .await
        .expect("claim")
        .is_none());
    assert_eq!(state(&pool, unrelated).await, "waiting");
    assert!(
        store::fail_job(&pool, &lease, "diverged", true, |_| Duration::ZERO)
            .await
            .expect("repeat")
            .1
            .is_empty(),
        "a repeated failure changes nothing more"
    );

    // A retryable failure is not the end: the dependents keep waiting.
    let lease = claim(&pool, unrelated_dep, "w", LONG).await;
    let (s, failed) = store::fail_job(&pool, &lease, "oom", false, |_| Duration::ZERO)
        .await
        .expect("fail");
    assert_eq!((s.as_str(), failed.len()), ("queued", 0));
    assert_eq!(state(&pool, unrelated).await, "waiting");
}

#[sqlx::test(migrations = "../migrations")]
async fn cancelling_a_dependency_or_losing_it_to_the_reaper_fails_its_dependents(pool: PgPool) {
    let a = submit(&pool, 3).await;
    let (b, _) = submit_spec(&pool, &dependent_spec(&[a])).await;
    let (c, _) = submit_spec(&pool, &dependent_spec(&[b])).await;
    let (row, failed) = store::cancel_job(&pool, b, "not needed")
        .await
        .expect("cancel waiting");
    assert_eq!((row.state.as_str(), failed), ("cancelled", vec![c]));
    assert_eq!(
        job(&pool, c).await.error.unwrap_or_default(),
        format!("dependency_failed: job {b} is cancelled")
    );

    let exhausted = submit(&pool, 1).await;
    let (d, _) = submit_spec(&pool, &dependent_spec(&[exhausted])).await;
    claim(&pool, exhausted, "gone", Duration::ZERO).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let reaped = store::reap_expired_leases(&pool, 100).await.expect("reap");
    assert_eq!(reaped.len(), 1);
    assert_eq!(
        (
            reaped[0].state.as_str(),
            reaped[0].dependents_failed.clone()
        ),
        ("failed", vec![d])
    );
    assert_eq!(
        job(&pool, d).await.error.unwrap_or_default(),
        format!("dependency_failed: job {exhausted} is failed")
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_whose_dependencies_already_ended_starts_queued_or_already_failed(pool: PgPool) {
    let ok = submit(&pool, 3).await;
    let lease = claim(&pool, ok, "w", LONG).await;
    store::complete_job(&pool, &lease, 0)
        .await
        .expect("complete");
    let bad = submit(&pool, 3).await;
    store::cancel_job(&pool, bad, "x").await.expect("cancel");

    let (_, row) = submit_spec(&pool, &dependent_spec(&[ok])).await;
    assert_eq!((row.state.as_str(), row.error), ("queued", None));
    let (_, row) = submit_spec(&pool, &transfer_spec(ok, &[])).await;
    assert_eq!(
        row.state,
        JobState::Queued,
        "a transfer from a finished classifier is ready"
    );
    let (id, row) = submit_spec(&pool, &dependent_spec(&[ok, bad])).await;
    assert_eq!(
        (row.state.as_str(), row.error.unwrap_or_default()),
        (
            "failed",
            format!("dependency_failed: job {bad} is cancelled")
        )
    );
    assert!(row.finished_at.is_some());
    assert_eq!(
        store::dependencies_of(&pool, id).await.expect("deps").len(),
        2
    );
    assert!(
        !store::take_due_for_dispatch(&pool, LONG, 10)
            .await
            .expect("due")
            .contains(&id),
        "never dispatched"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn submit_rejects_unknown_dependencies_and_non_classifier_sources_naming_the_field_and_stores_nothing(
    pool: PgPool,
) {
    let classifier = submit(&pool, 3).await;
    let (cvae, _) = submit_spec(&pool, &transfer_spec(classifier, &[])).await;
    let before = counts(&pool).await;
    let unknown = new_id();

    let (field, message) = assert_invalid(
        store::insert_job(&pool, new_id(), &dependent_spec(&[classifier, unknown])).await,
    );
    assert_eq!(field, "spec.depends_on[1]");
    assert_eq!(message, format!("job {unknown} does not exist"));

    let (field, message) =
        assert_invalid(store::insert_job(&pool, new_id(), &transfer_spec(unknown, &[])).await);
    assert_eq!(field, "spec.cifar_cvae.init.transfer.source_job_id");
    assert_eq!(message, format!("job {unknown} does not exist"));

    let (field, _) = assert_invalid(
        store::insert_job(
            &pool,
            new_id(),
            &transfer_spec(unknown, &[classifier, unknown]),
        )
        .await,
    );
    assert_eq!(
        field, "spec.depends_on[1]",
        "a listed source is named where it is listed"
    );

    let (field, message) =
        assert_invalid(store::insert_job(&pool, new_id(), &transfer_spec(cvae, &[])).await);
    assert_eq!(field, "spec.cifar_cvae.init.transfer.source_job_id");
    assert!(
        message.contains("cifar_cvae") && message.contains("mnist_classifier"),
        "{message}"
    );

    assert_eq!(
        counts(&pool).await,
        before,
        "no job and no edge was written"
    );
}

// ---------------------------------------------------------------------------------------------
// Artifacts
// ---------------------------------------------------------------------------------------------

fn header(lease: &Lease, kind: &str, name: &str, epoch: i32, sha: char) -> ArtifactHeader {
    ArtifactHeader {
        lease: lease.clone(),
        kind: ArtifactKind::parse("kind", kind).expect("a valid kind"),
        name: name.into(),
        epoch,
        size_bytes: 10,
        sha256: sha.to_string().repeat(64),
        step: 0,
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn an_artifact_is_recorded_only_under_the_current_lease_and_a_repeat_replaces_it(
    pool: PgPool,
) {
    let id = submit(&pool, 3).await;
    let first = claim(&pool, id, "w", LONG).await;
    let one = store::record_artifact(
        &pool,
        &header(&first, "checkpoint", "e1", 1, 'a'),
        "file:///x/1",
    )
    .await
    .expect("record")
    .artifact;
    let two = store::record_artifact(
        &pool,
        &header(&first, "samples", "s1", 1, 'b'),
        "file:///x/2",
    )
    .await
    .expect("record")
    .artifact;
    let again = store::record_artifact(
        &pool,
        &header(&first, "checkpoint", "e1", 1, 'c'),
        "file:///x/1",
    )
    .await
    .expect("record again")
    .artifact;
    assert_eq!(
        again.id, one.id,
        "same attempt, kind and name: the same record"
    );
    assert_eq!(again.sha256, "c".repeat(64));
    assert!(again.created_at >= two.created_at, "and now the newest");
    assert_eq!(
        store::newest_artifact(&pool, id, "checkpoint")
            .await
            .expect("newest")
            .map(|a| a.sha256),
        Some("c".repeat(64))
    );
    let all = store::list_artifacts(&pool, id, None).await.expect("list");
    assert_eq!(
        all.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
        ["s1", "e1"]
    );
    let samples = store::list_artifacts(&pool, id, Some("samples"))
        .await
        .expect("list");
    assert_eq!(samples, [two]);
    assert!(store::artifact_uri_in_use(&pool, "file:///x/1")
        .await
        .expect("in use"));
    assert!(!store::artifact_uri_in_use(&pool, "file:///x/3")
        .await
        .expect("in use"));

    store::fail_job(&pool, &first, "oom", false, |_| Duration::ZERO)
        .await
        .expect("fail");
    let m = assert_precondition(
        store::record_artifact(
            &pool,
            &header(&first, "checkpoint", "e2", 2, 'd'),
            "file:///x/3",
        )
        .await,
    );
    assert!(m.starts_with("stale attempt 1"), "{m}");
    assert_precondition(store::check_lease(&pool, &first).await);
    let second = claim(&pool, id, "w", LONG).await;
    store::check_lease(&pool, &second).await.expect("current");
    assert_eq!(
        store::list_artifacts(&pool, id, None)
            .await
            .expect("list")
            .len(),
        2
    );
}

// ---------------------------------------------------------------------------------------------
// Attempts, hand-backs and resumable training state
// ---------------------------------------------------------------------------------------------

fn resume_header(lease: &Lease, step: i64) -> ArtifactHeader {
    ArtifactHeader {
        step,
        ..header(
            lease,
            "resume",
            &format!("state-{step}.safetensors"),
            0,
            'e',
        )
    }
}

async fn attempts(pool: &PgPool, id: JobId) -> Vec<(i32, String, i64, Option<String>)> {
    store::attempts_of(pool, id)
        .await
        .expect("attempts")
        .into_iter()
        .map(|a| {
            assert_eq!(
                a.ended_at.is_none(),
                a.outcome.as_str() == "running",
                "only a running attempt has no end: {a:?}"
            );
            (
                a.attempt,
                a.outcome.as_str().to_owned(),
                a.resumed_from_step,
                a.reason,
            )
        })
        .collect()
}

#[sqlx::test(migrations = "../migrations")]
async fn a_claim_records_its_attempt_and_hands_out_the_highest_step_an_earlier_attempt_stored(
    pool: PgPool,
) {
    let id = submit(&pool, 5).await;
    let first = store::claim_job(&pool, id, "w1", LONG)
        .await
        .expect("claim")
        .expect("claimed");
    assert_eq!(first.resume_from, None, "nothing to resume from yet");
    assert_eq!(attempts(&pool, id).await, [(1, "running".into(), 0, None)]);
    let lease = Lease {
        job_id: id,
        attempt: 1,
        worker_id: "w1".into(),
    };
    for step in [100, 300, 200] {
        store::record_artifact(&pool, &resume_header(&lease, step), "file:///r")
            .await
            .expect("record");
    }
    store::fail_job(&pool, &lease, "oom", false, |_| Duration::ZERO)
        .await
        .expect("fail");

    let second = store::claim_job(&pool, id, "w2", LONG)
        .await
        .expect("claim")
        .expect("claimed");
    let resume = second.resume_from.expect("a state to resume from");
    assert_eq!(
        (resume.step, resume.attempt, resume.kind.as_str()),
        (300, 1, "resume"),
        "the highest step, not the newest upload"
    );
    assert_eq!(
        attempts(&pool, id).await,
        [
            (1, "failed".into(), 0, Some("oom".into())),
            (2, "running".into(), 300, None),
        ]
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn only_the_two_newest_resume_states_of_a_job_are_kept_and_other_kinds_and_jobs_are_untouched(
    pool: PgPool,
) {
    let id = submit(&pool, 3).await;
    let other = submit(&pool, 3).await;
    let lease = claim(&pool, id, "w", LONG).await;
    let other_lease = claim(&pool, other, "w", LONG).await;
    store::record_artifact(&pool, &resume_header(&other_lease, 1), "file:///o1")
        .await
        .expect("record");
    store::record_artifact(
        &pool,
        &header(&lease, "checkpoint", "e1", 1, 'a'),
        "file:///c",
    )
    .await
    .expect("record");
    let mut pruned_steps = Vec::new();
    for step in [10, 20, 30, 40] {
        let recorded = store::record_artifact(
            &pool,
            &resume_header(&lease, step),
            &format!("file:///{step}"),
        )
        .await
        .expect("record");
        assert_eq!(recorded.artifact.step, step);
        pruned_steps.extend(recorded.pruned.iter().map(|a| (a.step, a.uri.clone())));
    }
    assert_eq!(
        pruned_steps,
        [
            (10, "file:///10".to_string()),
            (20, "file:///20".to_string())
        ],
        "each upload returns what it pruned, with its uri"
    );
    let kept: Vec<i64> = store::list_artifacts(&pool, id, Some("resume"))
        .await
        .expect("list")
        .iter()
        .map(|a| a.step)
        .collect();
    assert_eq!(kept, [30, 40]);
    assert_eq!(
        store::list_artifacts(&pool, id, Some("checkpoint"))
            .await
            .expect("list")
            .len(),
        1
    );
    assert_eq!(
        store::list_artifacts(&pool, other, None)
            .await
            .expect("list")
            .len(),
        1,
        "another job's state stays"
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn failures_and_expired_leases_count_against_max_attempts_but_hand_backs_do_not(
    pool: PgPool,
) {
    let id = submit(&pool, 2).await;
    let first = claim(&pool, id, "w1", LONG).await;
    store::release_job(&pool, &first, "worker shutting down")
        .await
        .expect("release");
    store::release_job(&pool, &first, "worker shutting down")
        .await
        .expect("a repeated hand-back by the same attempt is fine");
    let row = job(&pool, id).await;
    assert_eq!((row.state.as_str(), row.failed_attempts), ("queued", 0));
    assert_eq!(
        (row.not_before, row.dispatched_at, row.lease_expires_at),
        (None, None, None),
        "claimable and due for a push at once"
    );
    assert_eq!(
        store::take_due_for_dispatch(&pool, LONG, 10)
            .await
            .expect("due"),
        [id]
    );
    assert_precondition(store::record_metrics(&pool, &first, &[pt("a", 1, 1.0)]).await);

    let second = claim(&pool, id, "w2", LONG).await;
    assert_eq!(second.attempt, 2);
    assert_precondition(store::release_job(&pool, &first, "late").await);
    let mut backoff_saw = None;
    let (state, _) = store::fail_job(&pool, &second, "nan loss", false, |failed| {
        backoff_saw = Some(failed);
        Duration::ZERO
    })
    .await
    .expect("fail");
    assert_eq!(state, JobState::Queued, "one failure of two allowed");
    assert_eq!(
        backoff_saw,
        Some(1),
        "the backoff follows failures (1), not claims (2)"
    );
    assert_eq!(job(&pool, id).await.failed_attempts, 1);

    claim(&pool, id, "w3", Duration::ZERO).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let reaped = store::reap_expired_leases(&pool, 10).await.expect("reap");
    assert_eq!(
        reaped
            .iter()
            .map(|r| (r.id, r.attempt, r.state.as_str()))
            .collect::<Vec<_>>(),
        [(id, 3, "failed")],
        "the second failure ends it"
    );
    let row = job(&pool, id).await;
    assert_eq!((row.attempt, row.failed_attempts), (3, 2));
    assert_eq!(
        attempts(&pool, id).await,
        [
            (
                1,
                "handed_back".into(),
                0,
                Some("worker shutting down".into())
            ),
            (2, "failed".into(), 0, Some("nan loss".into())),
            (
                3,
                "lease_expired".into(),
                0,
                Some("lease expired on worker w3".into())
            ),
        ]
    );

    let unknown = Lease {
        job_id: new_id(),
        ..second
    };
    assert!(matches!(
        store::release_job(&pool, &unknown, "x").await,
        Err(Error::NotFound(_))
    ));
}

#[sqlx::test(migrations = "../migrations")]
async fn completion_stores_the_final_step_and_a_cancellation_ends_the_running_attempt(
    pool: PgPool,
) {
    let done = submit(&pool, 3).await;
    let lease = claim(&pool, done, "w", LONG).await;
    store::complete_job(&pool, &lease, 1234)
        .await
        .expect("complete");
    store::complete_job(&pool, &lease, 1234)
        .await
        .expect("a repeat is fine");
    assert_eq!(job(&pool, done).await.final_step, Some(1234));
    assert_eq!(
        attempts(&pool, done).await,
        [(1, "succeeded".into(), 0, None)]
    );

    let cancelled = submit(&pool, 3).await;
    claim(&pool, cancelled, "w", LONG).await;
    store::cancel_job(&pool, cancelled, "wrong learning rate")
        .await
        .expect("cancel");
    assert_eq!(
        attempts(&pool, cancelled).await,
        [(1, "cancelled".into(), 0, Some("wrong learning rate".into()))]
    );
    assert_eq!(job(&pool, cancelled).await.final_step, None);
    let page = store::attempts_of_jobs(&pool, &[done, cancelled, new_id()])
        .await
        .expect("page");
    assert_eq!(
        (page[&done].len(), page[&cancelled].len(), page.len()),
        (1, 1, 2)
    );
}

// ---------------------------------------------------------------------------------------------
// Redis losing its keys
// ---------------------------------------------------------------------------------------------

#[sqlx::test(migrations = "../migrations")]
async fn when_redis_loses_its_keys_every_queued_job_is_pushed_again_at_once(pool: PgPool) {
    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let d = server::dispatch::Dispatcher::new(&redis, &format!("trainq-test:{}:", Uuid::new_v4()))
        .expect("url");
    let (a, b) = (submit(&pool, 3).await, submit(&pool, 3).await);
    let running = submit(&pool, 3).await;
    claim(&pool, running, "w", LONG).await;
    let ids = |v: &[JobId]| v.iter().map(JobId::to_string).collect::<Vec<_>>();

    let first = reconcile::reconcile_queue(&pool, &d, LONG)
        .await
        .expect("round");
    assert_eq!(first, 2);
    assert_eq!(d.ready_ids().await.expect("redis"), ids(&[a, b]));

    d.delete_queue().await.expect("a worker pops both");
    reconcile::reconcile_queue(&pool, &d, LONG)
        .await
        .expect("round");
    let with_marker = d.ready_ids().await.expect("redis");

    d.forget_alive().await.expect("redis loses the marker too");
    reconcile::reconcile_queue(&pool, &d, LONG)
        .await
        .expect("round");
    let after_loss = d.ready_ids().await.expect("redis");
    d.delete_queue().await.expect("clean up");
    d.forget_alive().await.expect("clean up");

    assert!(
        with_marker.is_empty(),
        "while the marker is there, pushed jobs wait for --redispatch-after-ms"
    );
    assert_eq!(after_loss, ids(&[a, b]), "every queued job, at once");
}

#[sqlx::test(migrations = "../migrations")]
async fn the_artifact_a_download_by_kind_gets_is_the_one_with_the_highest_step_not_the_last_uploaded(
    pool: PgPool,
) {
    let id = submit(&pool, 3).await;
    let lease = claim(&pool, id, "w", LONG).await;
    let at = |name: &str, step: i64, sha: char| ArtifactHeader {
        step,
        ..header(&lease, "checkpoint", name, 1, sha)
    };
    // Epoch 2's checkpoint arrives before epoch 1's (an outbox retry, say).
    for h in [at("epoch-002", 40, 'b'), at("epoch-001", 20, 'a')] {
        store::record_artifact(&pool, &h, &format!("file:///x/{}", h.name))
            .await
            .expect("record");
    }
    let newest = store::newest_artifact(&pool, id, "checkpoint")
        .await
        .expect("query")
        .expect("an artifact");
    assert_eq!((newest.name.as_str(), newest.step), ("epoch-002", 40));
}

// ---------------------------------------------------------------------------------------------
// Results views (migrations/0004_results_views.sql)
// ---------------------------------------------------------------------------------------------

fn point(name: &str, step: i64, epoch: i32, value: f64) -> MetricPoint {
    MetricPoint {
        name: name.into(),
        step,
        epoch,
        value,
    }
}

/// A classifier with every hyper-parameter set away from its default.
fn tuned_classifier_spec() -> JobSpec {
    let mut raw = spec(3, &[("sweep", "views")]).to_proto();
    raw.name = "clf-sgd".into();
    raw.training = Some(v1::Training {
        epochs: 2,
        batch_size: 64,
        learning_rate: 0.002,
        optimizer: v1::Optimizer::Sgd as i32,
        seed: 7,
        max_train_examples: 5000,
        ..Default::default()
    });
    JobSpec::try_from(raw).expect("valid spec")
}

/// A CVAE that transfers from `source`, latent 32, beta 0.5, transferred layers frozen for the
/// first 2 epochs.
fn tuned_transfer_spec(source: JobId) -> JobSpec {
    let mut raw = transfer_spec(source, &[]).to_proto();
    raw.name = "cvae-luminance".into();
    raw.training.as_mut().expect("training").seed = 3;
    raw.experiment = Some(v1::job_spec::Experiment::CifarCvae(v1::CifarCvae {
        latent_dim: 32,
        beta: Some(0.5),
        init: Some(v1::Initialization {
            kind: Some(v1::initialization::Kind::Transfer(v1::TransferInit {
                source_job_id: source.to_string(),
                conv1: v1::Conv1Adaptation::Luminance as i32,
                copy_conv2: true,
                freeze: Some(v1::FreezePolicy {
                    policy: Some(v1::freeze_policy::Policy::FirstEpochs(2)),
                }),
            })),
        }),
    }));
    JobSpec::try_from(raw).expect("valid spec")
}

/// A CVAE with random initialisation and every CVAE option at its default.
fn random_cvae_spec() -> JobSpec {
    let mut raw = spec(3, &[]).to_proto();
    raw.name = "cvae-random".into();
    raw.experiment = Some(v1::job_spec::Experiment::CifarCvae(v1::CifarCvae {
        init: Some(v1::Initialization {
            kind: Some(v1::initialization::Kind::Random(v1::RandomInit {})),
        }),
        ..Default::default()
    }));
    JobSpec::try_from(raw).expect("valid spec")
}

#[sqlx::test(migrations = "../migrations")]
async fn job_summary_shows_each_jobs_hyper_parameters_initialisation_attempts_and_final_metrics(
    pool: PgPool,
) {
    use sqlx::Row;

    // A classifier that fails once (retryably), then succeeds on its second attempt.
    let (clf, _) = submit_spec(&pool, &tuned_classifier_spec()).await;
    let first = claim(&pool, clf, "w1", LONG).await;
    store::fail_job(&pool, &first, "oom", false, |_| Duration::ZERO)
        .await
        .expect("fail");
    let second = claim(&pool, clf, "w2", LONG).await;
    let clf_points = [
        point("train/loss", 10, 1, 0.9),
        point("train/loss", 20, 2, 0.5),
        point("test/loss", 20, 2, 0.21),
        point("test/accuracy", 20, 2, 0.93),
    ];
    store::record_metrics(&pool, &second, &clf_points)
        .await
        .expect("metrics");
    // An older point arriving late does not become the final value.
    store::record_metrics(&pool, &second, &[point("test/accuracy", 10, 1, 0.81)])
        .await
        .expect("late metrics");
    store::complete_job(&pool, &second, 20)
        .await
        .expect("complete");

    // A transfer CVAE from it, run once.
    let (cvae, _) = submit_spec(&pool, &tuned_transfer_spec(clf)).await;
    let lease = claim(&pool, cvae, "w1", LONG).await;
    let cvae_points = [
        point("test/neg_elbo_nats", 5, 1, 700.25),
        point("test/neg_elbo_nats", 10, 2, 650.5),
        point("test/bits_per_dim", 10, 2, 0.1019),
        point("test/recon", 10, 2, 630.0),
        point("test/kl", 10, 2, 20.5),
    ];
    store::record_metrics(&pool, &lease, &cvae_points)
        .await
        .expect("metrics");
    store::complete_job(&pool, &lease, 10)
        .await
        .expect("complete");

    // A random CVAE that has not run.
    let (random, _) = submit_spec(&pool, &random_cvae_spec()).await;

    let summary = |id: JobId| {
        let pool = pool.clone();
        async move {
            sqlx::query("SELECT *, seed::bigint AS seed_i64 FROM job_summary WHERE id = $1")
                .bind(id.as_uuid())
                .fetch_one(&pool)
                .await
                .expect("a summary row")
        }
    };
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM job_summary")
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(count, 3, "one row per job");

    let r = summary(clf).await;
    assert_eq!(r.get::<String, _>("name"), "clf-sgd");
    assert_eq!(r.get::<String, _>("kind"), "mnist_classifier");
    assert_eq!(
        r.get::<serde_json::Value, _>("labels"),
        serde_json::json!({"sweep": "views"})
    );
    assert_eq!(r.get::<Option<i32>, _>("epochs"), Some(2));
    assert_eq!(r.get::<Option<i32>, _>("batch_size"), Some(64));
    assert_eq!(r.get::<Option<f64>, _>("learning_rate"), Some(0.002));
    assert_eq!(
        r.get::<Option<String>, _>("optimizer").as_deref(),
        Some("sgd")
    );
    assert_eq!(r.get::<Option<i64>, _>("seed_i64"), Some(7));
    assert_eq!(r.get::<Option<i32>, _>("max_train_examples"), Some(5000));
    assert_eq!(r.get::<Option<i32>, _>("max_test_examples"), None, "all");
    assert_eq!(r.get::<Option<i32>, _>("latent_dim"), None, "not a CVAE");
    assert_eq!(r.get::<Option<String>, _>("init"), None);
    assert_eq!(r.get::<Option<String>, _>("init_arm"), None);
    assert_eq!(r.get::<String, _>("state"), "succeeded");
    assert_eq!(r.get::<i32, _>("attempts"), 2);
    assert_eq!(r.get::<i32, _>("failed_attempts"), 1);
    assert_eq!(r.get::<i32, _>("max_attempts"), 3);
    assert_eq!(
        r.get::<Option<String>, _>("worker_id").as_deref(),
        Some("w2")
    );
    assert_eq!(r.get::<Option<i64>, _>("final_step"), Some(20));
    let duration = r
        .get::<Option<f64>, _>("duration_s")
        .expect("a finished job's duration");
    assert!(
        (0.0..60.0).contains(&duration),
        "duration {duration} s is finished_at - started_at"
    );
    assert_eq!(r.get::<Option<f64>, _>("train_loss"), Some(0.5));
    assert_eq!(r.get::<Option<f64>, _>("test_loss"), Some(0.21));
    assert_eq!(r.get::<Option<f64>, _>("test_accuracy"), Some(0.93));
    assert_eq!(r.get::<Option<f64>, _>("test_neg_elbo_nats"), None);

    let r = summary(cvae).await;
    assert_eq!(r.get::<String, _>("kind"), "cifar_cvae");
    assert_eq!(
        r.get::<Option<String>, _>("optimizer").as_deref(),
        Some("adam")
    );
    assert_eq!(r.get::<Option<i64>, _>("seed_i64"), Some(3));
    assert_eq!(r.get::<Option<i32>, _>("latent_dim"), Some(32));
    assert_eq!(r.get::<Option<f64>, _>("beta"), Some(0.5));
    assert_eq!(
        r.get::<Option<String>, _>("init").as_deref(),
        Some("transfer")
    );
    assert_eq!(
        r.get::<Option<String>, _>("init_conv1").as_deref(),
        Some("luminance")
    );
    assert_eq!(r.get::<Option<bool>, _>("init_copy_conv2"), Some(true));
    assert_eq!(
        r.get::<Option<String>, _>("init_freeze").as_deref(),
        Some("first_epochs")
    );
    assert_eq!(r.get::<Option<f64>, _>("init_freeze_value"), Some(2.0));
    assert_eq!(
        r.get::<Option<Uuid>, _>("init_source_job_id"),
        Some(clf.as_uuid())
    );
    assert_eq!(
        r.get::<Option<String>, _>("init_arm").as_deref(),
        Some("transfer/luminance/conv2/first_epochs=2")
    );
    assert_eq!(
        (
            r.get::<i32, _>("attempts"),
            r.get::<i32, _>("failed_attempts")
        ),
        (1, 0)
    );
    assert_eq!(r.get::<Option<f64>, _>("test_neg_elbo_nats"), Some(650.5));
    assert_eq!(r.get::<Option<f64>, _>("test_bits_per_dim"), Some(0.1019));
    assert_eq!(r.get::<Option<f64>, _>("test_recon"), Some(630.0));
    assert_eq!(r.get::<Option<f64>, _>("test_kl"), Some(20.5));
    assert_eq!(r.get::<Option<f64>, _>("test_accuracy"), None);

    let r = summary(random).await;
    assert_eq!(
        r.get::<Option<i32>, _>("latent_dim"),
        Some(20),
        "the seed's"
    );
    assert_eq!(r.get::<Option<f64>, _>("beta"), Some(1.0));
    assert_eq!(
        r.get::<Option<String>, _>("init").as_deref(),
        Some("random")
    );
    assert_eq!(
        r.get::<Option<String>, _>("init_arm").as_deref(),
        Some("random")
    );
    assert_eq!(r.get::<Option<bool>, _>("init_copy_conv2"), None);
    assert_eq!(r.get::<Option<i64>, _>("seed_i64"), Some(0), "unset");
    assert_eq!(r.get::<String, _>("state"), "queued");
    assert_eq!(r.get::<i32, _>("attempts"), 0);
    assert_eq!(r.get::<Option<f64>, _>("duration_s"), None);
    assert_eq!(r.get::<Option<i64>, _>("final_step"), None);
    assert_eq!(r.get::<Option<f64>, _>("train_loss"), None);

    // The README's example: final test negative ELBO of every CVAE by initialisation.
    let by_init: Vec<(String, f64)> = sqlx::query_as(
        "SELECT init_arm, test_neg_elbo_nats FROM job_summary
         WHERE kind = 'cifar_cvae' AND state = 'succeeded' ORDER BY init_arm",
    )
    .fetch_all(&pool)
    .await
    .expect("by init");
    assert_eq!(
        by_init,
        [("transfer/luminance/conv2/first_epochs=2".into(), 650.5)]
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn metric_series_lists_every_stored_point_once_with_its_job_in_step_order(pool: PgPool) {
    let a = submit(&pool, 3).await;
    let b = submit(&pool, 3).await;
    let lease_a = claim(&pool, a, "w", LONG).await;
    let lease_b = claim(&pool, b, "w", LONG).await;
    // Out of order, one repeated point, and another job's points in between.
    for batch in [
        vec![
            point("train/loss", 30, 2, 0.3),
            point("train/loss", 10, 1, 0.9),
        ],
        vec![
            point("train/loss", 20, 1, 0.6),
            point("train/loss", 30, 2, 99.0),
        ],
    ] {
        store::record_metrics(&pool, &lease_a, &batch)
            .await
            .expect("metrics");
        store::record_metrics(&pool, &lease_b, &[point("train/loss", 15, 1, 7.0)])
            .await
            .expect("other job");
    }
    store::record_metrics(&pool, &lease_a, &[point("test/loss", 30, 2, 0.4)])
        .await
        .expect("other metric");

    let rows: Vec<(Uuid, String, String, String, i64, i32, f64)> = sqlx::query_as(
        "SELECT job_id, job_name, kind, metric, step, epoch, value FROM metric_series
         WHERE job_id = $1 AND metric = 'train/loss' ORDER BY step",
    )
    .bind(a.as_uuid())
    .fetch_all(&pool)
    .await
    .expect("series");
    let expected: Vec<(Uuid, String, String, String, i64, i32, f64)> =
        [(10, 1, 0.9), (20, 1, 0.6), (30, 2, 0.3)]
            .into_iter()
            .map(|(step, epoch, value)| {
                let (name, kind, metric) = ("mnist", "mnist_classifier", "train/loss");
                (
                    a.as_uuid(),
                    name.into(),
                    kind.into(),
                    metric.into(),
                    step,
                    epoch,
                    value,
                )
            })
            .collect();
    assert_eq!(rows, expected, "the first value of a repeated step is kept");

    let per_job: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT job_id, count(*) FROM metric_series GROUP BY job_id ORDER BY count(*) DESC",
    )
    .fetch_all(&pool)
    .await
    .expect("counts");
    assert_eq!(per_job, [(a.as_uuid(), 4), (b.as_uuid(), 1)]);
    let recorded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM metric_series WHERE recorded_at <= now() AND recorded_at > now() - interval '1 minute'",
    )
    .fetch_one(&pool)
    .await
    .expect("recorded_at");
    assert_eq!(recorded, 5);
}

#[sqlx::test(migrations = "../migrations")]
async fn artifact_files_names_each_artifacts_job_and_its_key_in_the_store(pool: PgPool) {
    let id = submit(&pool, 3).await;
    let lease = claim(&pool, id, "w", LONG).await;
    let h = ArtifactHeader {
        step: 40,
        size_bytes: 1234,
        ..header(&lease, "checkpoint", "epoch-002.safetensors", 2, 'c')
    };
    let uri = format!("file:///artifacts/jobs/{id}/1/checkpoint/epoch-002.safetensors");
    store::record_artifact(&pool, &h, &uri)
        .await
        .expect("record");

    /// job_id, job_name, job_kind, attempt, kind, name, key, epoch, step, size_bytes, sha256, uri
    type ArtifactFileRow = (
        Uuid,
        String,
        String,
        i32,
        String,
        String,
        String,
        i32,
        i64,
        i64,
        String,
        String,
    );
    let rows: Vec<ArtifactFileRow> = sqlx::query_as(
        "SELECT job_id, job_name, job_kind, attempt, kind, name, key, epoch, step, size_bytes,
                    sha256, uri
             FROM artifact_files",
    )
    .fetch_all(&pool)
    .await
    .expect("artifact files");
    assert_eq!(
        rows,
        [(
            id.as_uuid(),
            "mnist".into(),
            "mnist_classifier".into(),
            1,
            "checkpoint".into(),
            "epoch-002.safetensors".into(),
            format!("jobs/{id}/1/checkpoint/epoch-002.safetensors"),
            2,
            40,
            1234,
            "c".repeat(64),
            uri,
        )]
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn every_results_view_and_each_of_its_columns_is_documented_in_the_database(pool: PgPool) {
    let undocumented: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname || coalesce('.' || a.attname, '')
         FROM pg_class c
         LEFT JOIN pg_attribute a
             ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
         WHERE c.relkind = 'v'
           AND c.relname IN ('job_summary', 'metric_series', 'artifact_files')
           AND (obj_description(c.oid, 'pg_class') IS NULL
                OR col_description(c.oid, a.attnum) IS NULL)
         ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .expect("catalogue");
    assert_eq!(undocumented, Vec::<String>::new());
    let views: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_views
         WHERE viewname IN ('job_summary', 'metric_series', 'artifact_files')",
    )
    .fetch_one(&pool)
    .await
    .expect("views");
    assert_eq!(views, 3);
}

#[sqlx::test(migrations = "../migrations")]
async fn looking_an_artifact_up_by_its_uri_uses_an_index(pool: PgPool) {
    let indexed: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_indexes WHERE tablename = 'artifacts'
                        AND indexdef LIKE '%(uri)%')",
    )
    .fetch_one(&pool)
    .await
    .expect("pg_indexes");
    assert!(indexed, "artifacts.uri has no index");
    // And the planner takes it for the store's lookup even on a small table.
    let mut tx = pool.begin().await.expect("tx");
    sqlx::query("SET LOCAL enable_seqscan = off")
        .execute(&mut *tx)
        .await
        .expect("set");
    let plan: Vec<String> =
        sqlx::query_scalar("EXPLAIN SELECT EXISTS (SELECT 1 FROM artifacts WHERE uri = 'x')")
            .fetch_all(&mut *tx)
            .await
            .expect("explain");
    assert!(
        plan.iter().any(|l| l.contains("artifacts_uri_idx")),
        "{plan:?}"
    );
    assert!(!store::artifact_uri_in_use(&pool, "file:///nothing")
        .await
        .expect("lookup"));
}

// ---------------------------------------------------------------------------------------------
// GetMetrics pages and downsampling
// ---------------------------------------------------------------------------------------------

/// A running job holding `series` (name, steps), each point's value derived from its step.
async fn job_with_series(pool: &PgPool, series: &[(&str, Vec<i64>)]) -> (JobId, Lease) {
    let id = submit(pool, 3).await;
    let lease = claim(pool, id, "w", LONG).await;
    let points: Vec<MetricPoint> = series
        .iter()
        .flat_map(|(name, steps)| {
            steps
                .iter()
                .map(move |&s| point(name, s, (s / 100 + 1) as i32, s as f64 * 0.5))
        })
        .collect();
    store::record_metrics(pool, &lease, &points)
        .await
        .expect("report");
    (id, lease)
}

fn keys(points: &[MetricPoint]) -> Vec<(String, i64)> {
    points.iter().map(|p| (p.name.clone(), p.step)).collect()
}

#[sqlx::test(migrations = "../migrations")]
async fn metric_pages_return_every_point_of_the_job_exactly_once_in_name_and_step_order(
    pool: PgPool,
) {
    let series = [
        ("test/loss", vec![100, 200, 300]),
        ("train/loss", (1..=25).collect::<Vec<i64>>()),
        ("train/kl", vec![2, 4, 8, 16, 32, 64, 128]),
    ];
    let (id, _) = job_with_series(&pool, &series).await;
    // Another job's points never show.
    job_with_series(&pool, &[("train/loss", (1..=9).collect())]).await;
    let mut want: Vec<(String, i64)> = series
        .iter()
        .flat_map(|(n, steps)| steps.iter().map(|s| (n.to_string(), *s)))
        .collect();
    want.sort();

    for page_size in [1, 4, 35, 36, 1000] {
        let got = pages(&pool, metrics_query(id, &[], page_size, None)).await;
        let n = want.len().div_ceil(page_size as usize).max(1);
        assert_eq!(got.len(), n, "{page_size} points a page");
        assert!(got
            .iter()
            .rev()
            .skip(1)
            .all(|p| p.len() == page_size as usize));
        assert_eq!(keys(&got.concat()), want, "{page_size} points a page");
    }
    // Values and epochs come with their points.
    let all = pages(&pool, metrics_query(id, &[], 1000, None))
        .await
        .concat();
    assert!(all
        .iter()
        .all(|p| p.value == p.step as f64 * 0.5 && p.epoch == (p.step / 100 + 1) as i32));

    // A names filter pages the same way over only those series (given in any order, and
    // names without points are no error).
    let filtered = pages(
        &pool,
        metrics_query(id, &["train/loss", "nothing/here", "test/loss"], 4, None),
    )
    .await
    .concat();
    let want_filtered: Vec<(String, i64)> = want
        .iter()
        .filter(|(n, _)| n != "train/kl")
        .cloned()
        .collect();
    assert_eq!(keys(&filtered), want_filtered);

    // A job without points: one empty page and no token.
    let empty = submit(&pool, 3).await;
    let (points, next) = store::metric_page(&pool, &metrics_query(empty, &[], 10, None))
        .await
        .expect("page");
    assert!(points.is_empty() && next.is_none());
}

#[sqlx::test(migrations = "../migrations")]
async fn a_point_stored_between_pages_neither_shifts_nor_repeats_the_points_of_later_pages(
    pool: PgPool,
) {
    let (id, lease) = job_with_series(
        &pool,
        &[
            ("train/kl", vec![10, 20, 30]),
            ("train/loss", (1..=10).map(|i| i * 10).collect()),
        ],
    )
    .await;
    let mut q = metrics_query(id, &[], 5, None);
    let (first, next) = store::metric_page(&pool, &q).await.expect("page");
    assert_eq!(
        keys(&first),
        [
            ("train/kl", 10),
            ("train/kl", 20),
            ("train/kl", 30),
            ("train/loss", 10),
            ("train/loss", 20)
        ]
        .map(|(n, s)| (n.to_string(), s))
    );
    // Behind the cursor: an earlier series, an earlier step of the current one; ahead of it: a
    // step inside the rest of the series, and a new series after it.
    store::record_metrics(
        &pool,
        &lease,
        &[
            pt("test/loss", 1, 1.0),
            pt("train/kl", 15, 1.0),
            pt("train/loss", 15, 1.0),
            pt("train/loss", 55, 1.0),
            pt("zeta", 1, 1.0),
        ],
    )
    .await
    .expect("report");
    q.after = next;
    let rest = pages(&pool, q).await.concat();
    let mut want: Vec<(String, i64)> = (3..=10)
        .map(|i| ("train/loss".to_string(), i * 10))
        .chain([("train/loss".to_string(), 55), ("zeta".to_string(), 1)])
        .collect();
    want.sort();
    assert_eq!(
        keys(&rest),
        want,
        "nothing of the first page again, nothing skipped"
    );
}

/// What every downsampled series must be: at most `max_points` of the series' own points, its
/// first and last among them, ordered by step, each once, and the whole series when it fits.
#[track_caller]
fn assert_selection(got: &[&MetricPoint], series: &[i64], max_points: u32) {
    let steps: Vec<i64> = got.iter().map(|p| p.step).collect();
    if series.len() <= max_points as usize {
        assert_eq!(steps, series, "a series that fits comes whole");
        return;
    }
    assert!(
        steps.len() <= max_points as usize,
        "{} > {max_points}",
        steps.len()
    );
    assert_eq!(steps.first(), series.first(), "the first point is kept");
    assert_eq!(steps.last(), series.last(), "the last point is kept");
    assert!(
        steps.windows(2).all(|w| w[0] < w[1]),
        "ordered by step, each once"
    );
    assert!(got
        .iter()
        .all(|p| series.contains(&p.step) && p.value == p.step as f64 * 0.5));
}

#[sqlx::test(migrations = "../migrations")]
async fn a_downsampled_series_keeps_its_first_and_last_points_and_at_most_max_points_in_step_order(
    pool: PgPool,
) {
    // Irregular steps, so the selection cannot be told from the steps alone.
    let long: Vec<i64> = (0..3000).map(|i| i * 3 + (i * i) % 3).collect();
    let short: Vec<i64> = vec![5, 6, 7, 8, 9];
    let (id, _) = job_with_series(
        &pool,
        &[("train/loss", long.clone()), ("test/loss", short.clone())],
    )
    .await;
    for max_points in [2, 3, 4, 5, 50, 999, 2999, 3000, 10_000] {
        let got = pages(&pool, metrics_query(id, &[], 5000, Some(max_points))).await;
        assert_eq!(got.len(), 1, "one page");
        let got = &got[0];
        let of =
            |name: &str| -> Vec<&MetricPoint> { got.iter().filter(|p| p.name == name).collect() };
        // Each series on its own: neither's selection depends on the other's length.
        assert_selection(&of("train/loss"), &long, max_points);
        assert_selection(&of("test/loss"), &short, max_points);
        // Paged over in small pages, or asked for by name, the selection is the same.
        let page = if max_points <= 50 { 7 } else { 701 };
        let paged = pages(&pool, metrics_query(id, &[], page, Some(max_points)))
            .await
            .concat();
        assert_eq!(
            keys(&paged),
            keys(got),
            "{max_points} points in pages of {page}"
        );
        let named = pages(
            &pool,
            metrics_query(id, &["train/loss"], page, Some(max_points)),
        )
        .await
        .concat();
        assert_eq!(
            keys(&named),
            keys(&of("train/loss").into_iter().cloned().collect::<Vec<_>>())
        );
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn a_downsampled_series_takes_the_first_point_at_or_after_each_evenly_spaced_step_once(
    pool: PgPool,
) {
    // Steps 1..=1000, and a sparse series: ten points, a gap, one more.
    let sparse: Vec<i64> = (1..=10).chain([1_000_000]).collect();
    let (id, _) = job_with_series(
        &pool,
        &[("dense", (1..=1000).collect()), ("sparse", sparse.clone())],
    )
    .await;
    let k = 10u32;
    let got = pages(&pool, metrics_query(id, &[], 5000, Some(k)))
        .await
        .concat();
    let steps = |name: &str| -> Vec<i64> {
        got.iter()
            .filter(|p| p.name == name)
            .map(|p| p.step)
            .collect()
    };
    // The documented targets: first + floor((last - first) * i / (k - 1)) for i in 0..k.
    let targets = |first: i64, last: i64| -> Vec<i64> {
        (0..i64::from(k))
            .map(|i| first + (last - first) * i / (i64::from(k) - 1))
            .collect()
    };
    assert_eq!(
        steps("dense"),
        targets(1, 1000),
        "every target lands on a point"
    );
    // Sparse: the targets in the gap all meet the last point, which comes once.
    let mut want: Vec<i64> = targets(1, 1_000_000)
        .into_iter()
        .map(|t| {
            *sparse
                .iter()
                .find(|&&s| s >= t)
                .expect("a point at or after")
        })
        .collect();
    want.dedup();
    assert_eq!(steps("sparse"), want);
    assert_eq!(want, [1, 1_000_000]);
    // Two points: the first and the last.
    let two = pages(&pool, metrics_query(id, &["dense"], 5000, Some(2)))
        .await
        .concat();
    assert_eq!(
        keys(&two),
        [("dense".to_string(), 1), ("dense".to_string(), 1000)]
    );
}
