//! Store tests: each runs against a fresh, migrated database that `#[sqlx::test]` creates from
//! DATABASE_URL (for example postgres://postgres@127.0.0.1:5432/postgres) and drops afterwards.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use proto::queue::DEFAULT_QUEUE;
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
        ..Default::default()
    })
    .expect("valid spec")
}

/// The ids [`store::take_due_for_dispatch`] takes, in its order.
async fn due(pool: &PgPool, after: Duration, limit: i64) -> server::error::Result<Vec<JobId>> {
    let ready = store::take_due_for_dispatch(pool, after, limit).await?;
    Ok(ready.into_iter().map(|r| JobId::from(r.id)).collect())
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
            .expect("report")
            .stored,
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
    let report = |points: Vec<MetricPoint>| {
        let (pool, lease) = (pool.clone(), lease.clone());
        async move {
            let done = store::record_metrics(&pool, &lease, &points)
                .await
                .expect("report");
            (done.stored, done.conflicting, done.first_conflict)
        }
    };
    assert_eq!(report(first.to_vec()).await, (3, 0, None));
    // A retried batch, with one changed value: nothing new is stored, the first value stays, and
    // the changed point is counted as conflicting (the unchanged one is a plain repeat).
    let again = vec![pt("train/loss", 2, 99.0), pt("train/loss", 1, 2.0)];
    assert_eq!(report(again).await, (0, 1, Some(("train/loss".into(), 2))));
    // Duplicates inside one batch count once (the later one, with another value, conflicts); an
    // older step arriving late is stored but does not move `latest` backwards.
    let later = vec![
        pt("train/loss", 5, 0.5),
        pt("train/loss", 5, 0.7),
        pt("train/loss", 3, 1.0),
    ];
    assert_eq!(report(later).await, (2, 1, Some(("train/loss".into(), 5))));
    assert_eq!(report(vec![pt("train/loss", 4, 0.8)]).await, (1, 0, None));
    assert_eq!(
        report(vec![pt("train/nan", 1, f64::NAN)]).await,
        (1, 0, None)
    );
    assert_eq!(
        report(vec![pt("train/nan", 1, f64::NAN)]).await,
        (0, 0, None),
        "NaN repeated is the same value, not a conflict"
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
        due(&pool, LONG, 10).await.expect("due").is_empty(),
        "not dispatched in backoff"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        due(&pool, LONG, 10).await.expect("due"),
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
async fn a_forward_step_of_the_database_clock_is_undone_for_running_leases_only(pool: PgPool) {
    let a = submit(&pool, 2).await;
    let b = submit(&pool, 2).await;
    let queued = submit(&pool, 2).await;
    let lease_a = claim(&pool, a, "w-a", LONG).await;
    claim(&pool, b, "w-b", LONG).await;
    // A clock that steps 90 s forward makes 60-s leases granted just before it 30 s overdue;
    // that is what moving them 90 s back on an unchanged clock looks like.
    sqlx::query("UPDATE jobs SET lease_expires_at = lease_expires_at - interval '90 seconds'")
        .execute(&pool)
        .await
        .expect("step");
    let overdue: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE lease_expires_at < now()")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(overdue, 2, "both leases would be reaped");

    let moved = store::extend_running_leases(&pool, Duration::from_secs(90))
        .await
        .expect("extend");
    assert_eq!(moved, 2, "the two running jobs, not the queued one");
    assert!(
        store::reap_expired_leases(&pool, 100)
            .await
            .expect("reap")
            .is_empty(),
        "nothing to reap after the correction"
    );
    let left = job(&pool, a).await.lease_expires_at.expect("lease")
        - store::database_now(&pool).await.expect("now");
    assert!(
        left > chrono::Duration::seconds(50) && left <= chrono::Duration::seconds(60),
        "the lease has what was left of it before the step: {left:?}"
    );
    assert_eq!(job(&pool, queued).await.lease_expires_at, None);
    assert!(store::heartbeat(&pool, &lease_a, LONG)
        .await
        .expect("heartbeat")
        .is_some());
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
    store::take_for_dispatch(&pool, &[pushed])
        .await
        .expect("mark");

    assert_eq!(
        due(&pool, LONG, 100).await.expect("due"),
        [a, b],
        "oldest first"
    );
    assert!(
        due(&pool, LONG, 100).await.expect("due").is_empty(),
        "just dispatched"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    let stale: HashSet<JobId> = due(&pool, Duration::from_millis(10), 100)
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
async fn queued_jobs_are_dispatched_with_their_queue_and_priority_highest_first_then_oldest(
    pool: PgPool,
) {
    let on = |queue: &str, priority: i32| {
        let mut raw = spec(3, &[]).to_proto();
        raw.queue = queue.into();
        raw.priority = priority;
        JobSpec::try_from(raw).expect("valid spec")
    };
    let mut ids = Vec::new();
    for (queue, priority) in [("", 0), ("gpu", 0), ("", -3), ("", 7), ("gpu", 7)] {
        let id = new_id();
        store::insert_job(&pool, id, &on(queue, priority))
            .await
            .expect("insert");
        ids.push(id);
    }
    let ready = store::take_due_for_dispatch(&pool, LONG, 100)
        .await
        .expect("due");
    let got: Vec<(JobId, &str, i32)> = ready
        .iter()
        .map(|r| (JobId::from(r.id), r.queue.as_str(), r.priority))
        .collect();
    assert_eq!(
        got,
        [
            (ids[3], DEFAULT_QUEUE, 7),
            (ids[4], "gpu", 7),
            (ids[0], DEFAULT_QUEUE, 0),
            (ids[1], "gpu", 0),
            (ids[2], DEFAULT_QUEUE, -3),
        ],
        "an unset queue is the default one; higher priority first, then oldest"
    );
    let stats = store::queue_stats(&pool).await.expect("stats");
    let depths: Vec<(&str, i64)> = stats.iter().map(|s| (s.queue.as_str(), s.depth)).collect();
    assert_eq!(depths, [(DEFAULT_QUEUE, 3), ("gpu", 2)]);
    assert!(stats.iter().all(|s| s.oldest_age_s >= 0.0));
    claim(&pool, ids[4], "w", LONG).await;
    let stats = store::queue_stats(&pool).await.expect("stats");
    assert_eq!(stats[1].depth, 1, "a running job has left its queue");
    // The columns follow the stored spec; SQL users can filter on them.
    let (queue, priority): (String, i32) =
        sqlx::query_as("SELECT queue, priority FROM jobs WHERE id = $1")
            .bind(ids[1].as_uuid())
            .fetch_one(&pool)
            .await
            .expect("row");
    assert_eq!((queue.as_str(), priority), ("gpu", 0));
}

#[sqlx::test(migrations = "../migrations")]
async fn a_worker_claims_only_jobs_whose_resources_fit_it(pool: PgPool) {
    use proto::spec::DeviceKind;
    use server::domain::Capacity;
    let needing = |device: i32, mib: u32| {
        let mut raw = spec(3, &[]).to_proto();
        raw.resources = Some(v1::Resources {
            device,
            gpu_memory_mib: mib,
        });
        JobSpec::try_from(raw).expect("valid spec")
    };
    let insert = |spec: JobSpec| {
        let pool = pool.clone();
        async move {
            let id = new_id();
            store::insert_job(&pool, id, &spec).await.expect("insert");
            id
        }
    };
    let cuda_big = insert(needing(v1::DeviceKind::Cuda as i32, 40_000)).await;
    let cpu_only = insert(needing(v1::DeviceKind::Cpu as i32, 0)).await;
    let any = insert(spec(3, &[])).await;
    let cpu = Capacity {
        device: Some(DeviceKind::Cpu),
        free_gpu_mib: None,
    };
    let small_gpu = Capacity {
        device: Some(DeviceKind::Cuda),
        free_gpu_mib: Some(24_000),
    };
    let big_gpu = Capacity {
        device: Some(DeviceKind::Cuda),
        free_gpu_mib: Some(80_000),
    };
    let tiny_gpu = Capacity {
        device: Some(DeviceKind::Cuda),
        free_gpu_mib: Some(200),
    };
    let try_claim = |id: JobId, capacity: Capacity| {
        let pool = pool.clone();
        async move {
            store::claim_job_fitting(&pool, id, "w", LONG, &capacity)
                .await
                .expect("claim query")
                .is_some()
        }
    };
    assert!(
        !try_claim(cuda_big, cpu).await,
        "a CPU worker never takes a CUDA job"
    );
    assert!(
        !try_claim(cuda_big, small_gpu).await,
        "24000 MiB free < 40000 needed"
    );
    assert!(
        !try_claim(cpu_only, big_gpu).await,
        "a CUDA worker never takes a CPU job"
    );
    // The default estimate: 256 MiB + 1 MiB per image of the batch (32 here), in SQL as in Rust.
    let (needs,): (i32,) = sqlx::query_as("SELECT needs_gpu_mib FROM jobs WHERE id = $1")
        .bind(any.as_uuid())
        .fetch_one(&pool)
        .await
        .expect("row");
    assert_eq!(needs, proto::spec::default_gpu_memory_mib(32) as i32);
    assert_eq!(needs, 256 + 32);
    assert!(
        !try_claim(any, tiny_gpu).await,
        "200 MiB free < the 288 MiB estimate"
    );
    assert_eq!(job(&pool, cuda_big).await.state, JobState::Queued);
    assert!(try_claim(cuda_big, big_gpu).await);
    assert!(try_claim(cpu_only, cpu).await);
    assert!(try_claim(any, small_gpu).await, "any device, and it fits");
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
    assert_eq!(due(&pool, LONG, 10).await.expect("due"), [id]);
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
        kinds: vec![],
        name_contains: String::new(),
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
        kinds: vec![],
        name_contains: String::new(),
        page_size: 50,
        after: None,
    };
    let (rows, next) = store::list_jobs(&pool, &running).await.expect("list");
    assert_eq!((rows.len(), rows[0].id, next), (1, wanted[0], None));
}

#[sqlx::test(migrations = "../migrations")]
async fn jobs_filter_by_kind_and_by_name_ignoring_case(pool: PgPool) {
    let named = |name: &str| {
        let mut raw = spec(1, &[]).to_proto();
        raw.name = name.into();
        JobSpec::try_from(raw).expect("valid spec")
    };
    let lr = new_id();
    store::insert_job(&pool, lr, &named("Sweep-LR-0.1"))
        .await
        .expect("insert");
    store::insert_job(&pool, new_id(), &named("baseline"))
        .await
        .expect("insert");
    // `%` and `_` are plain text here, not patterns.
    store::insert_job(&pool, new_id(), &named("a_b%c"))
        .await
        .expect("insert");
    let query = |kinds: Vec<String>, name: &str| JobQuery {
        states: vec![],
        labels: serde_json::json!({}),
        kinds,
        name_contains: name.into(),
        page_size: 50,
        after: None,
    };
    let ids = |rows: Vec<store::JobRow>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let (rows, _) = store::list_jobs(&pool, &query(vec![], "lr-0"))
        .await
        .expect("list");
    assert_eq!(ids(rows), vec![lr]);
    let (rows, _) = store::list_jobs(&pool, &query(vec![], "_"))
        .await
        .expect("list");
    assert_eq!(rows.len(), 1, "only the name with an underscore");
    let (rows, _) = store::list_jobs(&pool, &query(vec!["mnist_classifier".into()], ""))
        .await
        .expect("list");
    assert_eq!(rows.len(), 3);
    let (rows, _) = store::list_jobs(&pool, &query(vec!["cifar_cvae".into()], ""))
        .await
        .expect("list");
    assert!(rows.is_empty(), "no CVAE job was stored");
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
        due(&pool, LONG, 10).await.expect("due") == [a],
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
            .expect("complete")
            .queued,
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
            .queued
            .is_empty(),
        "promotes nothing twice"
    );
    assert_eq!(
        due(&pool, LONG, 10).await.expect("due"),
        [b],
        "the reconciler dispatches the promoted job"
    );

    let lease = claim(&pool, b, "w", LONG).await;
    assert_eq!(
        store::complete_job(&pool, &lease, 0)
            .await
            .expect("complete")
            .queued,
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
        .queued
        .is_empty());
    assert_eq!(state(&pool, d).await, "waiting", "x has not succeeded yet");
    let lease_x = claim(&pool, x, "w", LONG).await;
    assert_eq!(
        store::complete_job(&pool, &lease_x, 0)
            .await
            .expect("complete")
            .queued,
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
        let promoted: Vec<JobId> = [ra.expect("a").queued, rb.expect("b").queued].concat();
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
        !due(&pool, LONG, 10).await.expect("due").contains(&id),
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
        store::Retention::default(),
    )
    .await
    .expect("record")
    .artifact;
    let two = store::record_artifact(
        &pool,
        &header(&first, "samples", "s1", 1, 'b'),
        "file:///x/2",
        store::Retention::default(),
    )
    .await
    .expect("record")
    .artifact;
    let again = store::record_artifact(
        &pool,
        &header(&first, "checkpoint", "e1", 1, 'c'),
        "file:///x/1",
        store::Retention::default(),
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
            store::Retention::default(),
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
        store::record_artifact(
            &pool,
            &resume_header(&lease, step),
            "file:///r",
            store::Retention::default(),
        )
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
    store::record_artifact(
        &pool,
        &resume_header(&other_lease, 1),
        "file:///o1",
        store::Retention::default(),
    )
    .await
    .expect("record");
    store::record_artifact(
        &pool,
        &header(&lease, "checkpoint", "e1", 1, 'a'),
        "file:///c",
        store::Retention::default(),
    )
    .await
    .expect("record");
    let mut pruned_steps = Vec::new();
    for step in [10, 20, 30, 40] {
        let recorded = store::record_artifact(
            &pool,
            &resume_header(&lease, step),
            &format!("file:///{step}"),
            store::Retention::default(),
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
async fn only_the_newest_checkpoints_of_the_retention_are_kept_and_zero_keeps_every_one(
    pool: PgPool,
) {
    let checkpoint = |lease: &Lease, epoch: i32| ArtifactHeader {
        step: i64::from(epoch) * 100,
        ..header(
            lease,
            "checkpoint",
            &format!("epoch-{epoch:03}.safetensors"),
            epoch,
            'c',
        )
    };
    let keep_two = store::Retention { checkpoints: 2 };
    let id = submit(&pool, 3).await;
    let lease = claim(&pool, id, "w", LONG).await;
    let mut pruned = Vec::new();
    for epoch in 1..=4 {
        let recorded = store::record_artifact(
            &pool,
            &checkpoint(&lease, epoch),
            &format!("file:///c{epoch}"),
            keep_two,
        )
        .await
        .expect("record");
        pruned.extend(recorded.pruned.into_iter().map(|a| (a.name, a.uri)));
    }
    store::record_artifact(&pool, &resume_header(&lease, 400), "file:///r", keep_two)
        .await
        .expect("a training state is not a checkpoint");
    assert_eq!(
        pruned,
        [
            (
                "epoch-001.safetensors".to_string(),
                "file:///c1".to_string()
            ),
            (
                "epoch-002.safetensors".to_string(),
                "file:///c2".to_string()
            ),
        ]
    );
    let kept: Vec<String> = store::list_artifacts(&pool, id, Some("checkpoint"))
        .await
        .expect("list")
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(kept, ["epoch-003.safetensors", "epoch-004.safetensors"]);

    let all = submit(&pool, 3).await;
    let lease = claim(&pool, all, "w", LONG).await;
    for epoch in 1..=4 {
        let recorded = store::record_artifact(
            &pool,
            &checkpoint(&lease, epoch),
            &format!("file:///a{epoch}"),
            store::Retention { checkpoints: 0 },
        )
        .await
        .expect("record");
        assert!(recorded.pruned.is_empty());
    }
    assert_eq!(
        store::list_artifacts(&pool, all, Some("checkpoint"))
            .await
            .expect("list")
            .len(),
        4
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_job_that_succeeds_loses_its_training_states_and_keeps_its_checkpoints(pool: PgPool) {
    let id = submit(&pool, 3).await;
    let first = claim(&pool, id, "w", LONG).await;
    store::record_artifact(
        &pool,
        &resume_header(&first, 10),
        "file:///r10",
        store::Retention::default(),
    )
    .await
    .expect("record");
    store::fail_job(&pool, &first, "preempted", false, |_| Duration::ZERO)
        .await
        .expect("fail");
    let second = claim(&pool, id, "w", LONG).await;
    store::record_artifact(
        &pool,
        &resume_header(&second, 20),
        "file:///r20",
        store::Retention::default(),
    )
    .await
    .expect("record");
    store::record_artifact(
        &pool,
        &header(&second, "checkpoint", "epoch-001.safetensors", 1, 'c'),
        "file:///c1",
        store::Retention::default(),
    )
    .await
    .expect("record");
    let done = store::complete_job(&pool, &second, 20)
        .await
        .expect("complete");
    let mut pruned: Vec<(String, i32)> = done
        .pruned
        .into_iter()
        .map(|a| (a.uri, a.attempt))
        .collect();
    pruned.sort();
    assert_eq!(
        pruned,
        [
            ("file:///r10".to_string(), 1),
            ("file:///r20".to_string(), 2)
        ],
        "every attempt's training states go, with their uris for the blob store"
    );
    let left: Vec<String> = store::list_artifacts(&pool, id, None)
        .await
        .expect("list")
        .into_iter()
        .map(|a| a.kind)
        .collect();
    assert_eq!(left, ["checkpoint"]);
    assert!(store::complete_job(&pool, &second, 20)
        .await
        .expect("a repeated completion is fine")
        .pruned
        .is_empty());
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
    assert_eq!(due(&pool, LONG, 10).await.expect("due"), [id]);
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

#[sqlx::test(migrations = "../migrations")]
async fn a_job_that_succeeds_after_a_failed_attempt_carries_no_error_but_the_attempt_keeps_it(
    pool: PgPool,
) {
    let id = submit(&pool, 3).await;
    let first = claim(&pool, id, "w", LONG).await;
    store::fail_job(&pool, &first, "cuda out of memory", false, |_| {
        Duration::ZERO
    })
    .await
    .expect("fail");
    assert_eq!(
        job(&pool, id).await.error.as_deref(),
        Some("cuda out of memory")
    );
    let second = claim(&pool, id, "w", LONG).await;
    store::complete_job(&pool, &second, 10)
        .await
        .expect("complete");
    let row = job(&pool, id).await;
    assert_eq!((row.state.as_str(), row.error), ("succeeded", None));
    assert_eq!(
        attempts(&pool, id).await,
        [
            (1, "failed".into(), 0, Some("cuda out of memory".into())),
            (2, "succeeded".into(), 0, None)
        ]
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_permanent_failure_reported_after_the_reaper_requeued_the_job_fails_it_for_good(
    pool: PgPool,
) {
    let reaped_then_failed = |max_attempts, permanent| {
        let pool = pool.clone();
        async move {
            let id = submit(&pool, max_attempts).await;
            let dependent = new_id();
            store::insert_job(&pool, dependent, &dependent_spec(&[id]))
                .await
                .expect("dependent");
            let lease = claim(&pool, id, "w", Duration::ZERO).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            let reaped = store::reap_expired_leases(&pool, 10).await.expect("reap");
            assert_eq!(reaped[0].state, JobState::Queued, "failures are left");
            let (state, failed) =
                store::fail_job(&pool, &lease, "shape mismatch", permanent, |_| {
                    Duration::ZERO
                })
                .await
                .expect("a late failure report of the reaped attempt is accepted");
            (id, dependent, state, failed)
        }
    };
    let (id, dependent, now, failed) = reaped_then_failed(3, true).await;
    assert_eq!(now, JobState::Failed);
    assert_eq!(failed, [dependent], "its dependents fail with it");
    let row = job(&pool, id).await;
    assert_eq!(
        (
            row.state.as_str(),
            row.failed_attempts,
            row.error.as_deref()
        ),
        ("failed", 1, Some("shape mismatch")),
        "counted once, by the reaper"
    );
    assert!(row.finished_at.is_some());
    assert_eq!(
        attempts(&pool, id).await,
        [(1, "failed".into(), 0, Some("shape mismatch".into()))]
    );
    assert!(
        store::claim_job(&pool, id, "w2", LONG)
            .await
            .expect("claim query")
            .is_none(),
        "nobody retries it"
    );
    assert_eq!(state(&pool, dependent).await, "failed");

    // A failure a retry may fix leaves the reaper's retry in place.
    let (id, dependent, now, failed) = reaped_then_failed(3, false).await;
    assert_eq!((now, failed), (JobState::Queued, vec![]));
    assert_eq!(job(&pool, id).await.state.as_str(), "queued");
    assert_eq!(state(&pool, dependent).await, "waiting");

    // Once another attempt holds the job, the old attempt's report is stale.
    let id = submit(&pool, 3).await;
    let lease = claim(&pool, id, "w", Duration::ZERO).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    store::reap_expired_leases(&pool, 10).await.expect("reap");
    claim(&pool, id, "w2", LONG).await;
    assert_precondition(store::fail_job(&pool, &lease, "late", true, |_| Duration::ZERO).await);
    assert_eq!(job(&pool, id).await.state.as_str(), "running");
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
    assert_eq!(
        d.ready_ids(DEFAULT_QUEUE).await.expect("redis"),
        ids(&[a, b])
    );

    d.delete_queues().await.expect("a worker pops both");
    reconcile::reconcile_queue(&pool, &d, LONG)
        .await
        .expect("round");
    let with_marker = d.ready_ids(DEFAULT_QUEUE).await.expect("redis");

    d.forget_alive().await.expect("redis loses the marker too");
    reconcile::reconcile_queue(&pool, &d, LONG)
        .await
        .expect("round");
    let after_loss = d.ready_ids(DEFAULT_QUEUE).await.expect("redis");
    d.delete_queues().await.expect("clean up");
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
        store::record_artifact(
            &pool,
            &h,
            &format!("file:///x/{}", h.name),
            store::Retention::default(),
        )
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
    store::record_artifact(&pool, &h, &uri, store::Retention::default())
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
// Sweeps at scale, idempotent submission, lock order
// ---------------------------------------------------------------------------------------------

use proto::sweep::{SweepPlan, MAX_JOBS};
use proto::SweepId;
use server::domain::{RequestKey, RequestKind, RunPage};

fn json_value(v: serde_json::Value) -> proto::Value {
    serde_json::from_value(v).expect("a google.protobuf.Value")
}

/// A CVAE sweep over `seeds` seeds: initialisations (random, then `transfers` transfers from a
/// classifier source stage; no source stage without transfers) times `rates` learning rates.
fn cvae_sweep(transfers: usize, rates: usize, seeds: u64) -> v1::SweepSpec {
    let conv1 = [
        "CONV1_ADAPTATION_LUMINANCE",
        "CONV1_ADAPTATION_REPLICATE_THIRD",
        "CONV1_ADAPTATION_KEEP_RANDOM",
    ];
    let mut inits = vec![serde_json::json!({"random": {}})];
    inits.extend(
        conv1
            .iter()
            .take(transfers)
            .map(|c| serde_json::json!({"transfer": {"conv1": c, "copyConv2": true}})),
    );
    let base: v1::JobSpec = serde_json::from_value(serde_json::json!({
        "name": "ignored",
        "training": {"epochs": 1, "batchSize": 64, "learningRate": 0.001},
        "cifarCvae": {}
    }))
    .expect("a JobSpec");
    v1::SweepSpec {
        name: "scale".into(),
        labels: Default::default(),
        base: Some(base),
        grid: vec![
            v1::GridAxis {
                field: "cifarCvae.init".into(),
                values: inits.into_iter().map(json_value).collect(),
                names: vec![],
            },
            v1::GridAxis {
                field: "training.learningRate".into(),
                values: (1..=rates)
                    .map(|i| json_value(serde_json::json!(i as f64 * 1e-4)))
                    .collect(),
                names: vec![],
            },
        ],
        seeds: (0..seeds).collect(),
        source: (transfers > 0).then(|| spec(1, &[]).to_proto()),
    }
}

async fn count_of(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.expect(sql)
}

#[sqlx::test(migrations = "../migrations")]
async fn a_sweep_at_the_job_limit_is_stored_whole_and_one_job_more_is_refused_naming_the_seeds(
    pool: PgPool,
) {
    // 3 initialisations x 33 learning rates = 99 arms, x 100 seeds, + 100 sources.
    let plan = SweepPlan::try_from(cvae_sweep(2, 33, 100)).expect("at the limit");
    assert_eq!(plan.job_count(), MAX_JOBS);
    let id = SweepId::from(Uuid::now_v7());
    let stored = store::insert_sweep(&pool, id, &plan, None)
        .await
        .expect("stored");
    assert!(stored.new);
    assert_eq!(stored.jobs, MAX_JOBS);
    // The sources and the 33 x 100 random runs are ready; the 66 x 100 transfers wait.
    assert_eq!(stored.queued.len(), 100 + 3300);
    assert_eq!(count_of(&pool, "SELECT count(*) FROM jobs").await, 10_000);
    assert_eq!(
        count_of(&pool, "SELECT count(*) FROM jobs WHERE state = 'waiting'").await,
        6600
    );
    assert_eq!(
        count_of(&pool, "SELECT count(*) FROM job_dependencies").await,
        6600
    );
    // Every transfer run depends on exactly its own seed's source, and names it as its source.
    assert_eq!(
        count_of(
            &pool,
            "SELECT count(*) FROM job_dependencies d
             JOIN jobs a ON a.id = d.job_id JOIN jobs s ON s.id = d.depends_on
             WHERE s.labels->>'arm' = 'source' AND s.labels->>'seed' = a.labels->>'seed'
               AND a.spec #>> '{cifarCvae,init,transfer,sourceJobId}' = s.id::text"
        )
        .await,
        6600
    );
    // Runs in creation order, positions 0..10000 with no gap, sources first.
    let runs = store::sweep_runs(&pool, id).await.expect("runs");
    assert_eq!(runs.len(), MAX_JOBS);
    assert!(runs.iter().enumerate().all(|(i, r)| r.position == i as i32));
    assert!(runs[..100].iter().all(|r| r.is_source));
    assert!(runs[100..].iter().all(|r| !r.is_source));
    assert_eq!(
        (runs[100].arm.as_str(), runs[100].seed),
        ("random,0.0001", 0)
    );
    // The spec a job got in the batch is the one the plan gives it.
    let last = runs.last().expect("a run");
    let row = job(&pool, last.job_id).await;
    let source = &runs[last.seed as usize];
    let planned = plan
        .run_spec(
            98,
            last.seed,
            &id.to_string(),
            Some(&source.job_id.to_string()),
        )
        .expect("valid");
    assert_eq!(row.spec, planned.to_json());
    assert_eq!(row.name, planned.name);
    // One job more (a 34th learning rate: 102 arms) is refused before anything is written.
    let over = SweepPlan::try_from(cvae_sweep(2, 34, 100)).expect_err("over the limit");
    assert_eq!(over.field, "spec.seeds");
    assert!(
        over.description.contains("got 10300"),
        "{}",
        over.description
    );
    // 4 initialisations x 34 learning rates = 136 arms, x 73 seeds, + 73 sources = 10001.
    let over_by_one = SweepPlan::try_from(cvae_sweep(3, 34, 73)).expect_err("10001 jobs");
    assert_eq!(over_by_one.field, "spec.seeds");
    assert!(
        over_by_one
            .description
            .contains("at most 10000 jobs, got 10001"),
        "{}",
        over_by_one.description
    );
    assert_eq!(count_of(&pool, "SELECT count(*) FROM sweeps").await, 1);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_sweeps_jobs_start_as_the_jobs_they_depend_on_outside_it_say_and_a_missing_one_stores_nothing(
    pool: PgPool,
) {
    let (done, _) = submit_spec(&pool, &spec(1, &[])).await;
    let lease = claim(&pool, done, "w", LONG).await;
    store::complete_job(&pool, &lease, 10)
        .await
        .expect("complete");
    let (broken, _) = submit_spec(&pool, &spec(1, &[])).await;
    store::cancel_job(&pool, broken, "no")
        .await
        .expect("cancel");
    let with_deps = |deps: &[JobId]| {
        let mut s = cvae_sweep(0, 2, 3);
        s.base.as_mut().expect("base").depends_on = deps.iter().map(JobId::to_string).collect();
        SweepPlan::try_from(s).expect("valid")
    };
    // Depending on a succeeded job: every run is ready.
    let ready = store::insert_sweep(
        &pool,
        SweepId::from(Uuid::now_v7()),
        &with_deps(&[done]),
        None,
    )
    .await
    .expect("stored");
    assert_eq!((ready.jobs, ready.queued.len()), (6, 6));
    // On a cancelled one as well: every run fails at once, naming it.
    let id = SweepId::from(Uuid::now_v7());
    let failed = store::insert_sweep(&pool, id, &with_deps(&[done, broken]), None)
        .await
        .expect("stored");
    assert!(failed.queued.is_empty());
    for run in store::sweep_runs(&pool, id).await.expect("runs") {
        assert_eq!(run.state, JobState::Failed);
        assert_eq!(
            run.error.as_deref(),
            Some(format!("dependency_failed: job {broken} is cancelled").as_str())
        );
    }
    // A dependency that does not exist is named under the base, and nothing is stored.
    let before = counts(&pool).await;
    let sweeps = count_of(&pool, "SELECT count(*) FROM sweeps").await;
    let (field, _) = assert_invalid(
        store::insert_sweep(
            &pool,
            SweepId::from(Uuid::now_v7()),
            &with_deps(&[done, new_id()]),
            None,
        )
        .await,
    );
    assert_eq!(field, "spec.base.depends_on[1]");
    assert_eq!(counts(&pool).await, before);
    assert_eq!(count_of(&pool, "SELECT count(*) FROM sweeps").await, sweeps);
}

fn job_key(request_id: &str, spec: &JobSpec) -> RequestKey {
    RequestKey::parse(RequestKind::Job, "request_id", request_id, &spec.to_json())
        .expect("valid")
        .expect("a key")
}

#[sqlx::test(migrations = "../migrations")]
async fn a_request_id_with_the_same_spec_returns_the_first_job_and_with_another_spec_is_already_exists(
    pool: PgPool,
) {
    let first_spec = spec(1, &[("try", "1")]);
    let key = job_key("submit-1", &first_spec);
    let (first, new) = store::submit_job(&pool, new_id(), &first_spec, Some(&key))
        .await
        .expect("first");
    assert!(new);
    // The job moves on; a repeat answers with it as it is now.
    claim(&pool, first.id, "w", LONG).await;
    let (again, new) = store::submit_job(&pool, new_id(), &first_spec, Some(&key))
        .await
        .expect("repeat");
    assert!(!new);
    assert_eq!((again.id, again.state), (first.id, JobState::Running));
    // The same key with another spec is refused, naming request_id.
    let other = spec(1, &[("try", "2")]);
    match store::submit_job(&pool, new_id(), &other, Some(&job_key("submit-1", &other))).await {
        Err(Error::AlreadyExists { field, description }) => {
            assert_eq!(field, "request_id");
            assert!(description.contains(&first.id.to_string()), "{description}");
        }
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    // Another key, or none, is another job; sweep keys are separate from job keys.
    let (second, new) =
        store::submit_job(&pool, new_id(), &other, Some(&job_key("submit-2", &other)))
            .await
            .expect("another key");
    assert!(new && second.id != first.id);
    let (third, _) = store::submit_job(&pool, new_id(), &first_spec, None)
        .await
        .expect("no key");
    assert!(third.id != first.id);
    let plan = SweepPlan::try_from(cvae_sweep(0, 1, 1)).expect("valid");
    let sweep_key = RequestKey::parse(
        RequestKind::Sweep,
        "request_id",
        "submit-1",
        &plan.to_json(),
    )
    .expect("valid")
    .expect("a key");
    let id = SweepId::from(Uuid::now_v7());
    let sweep = store::insert_sweep(&pool, id, &plan, Some(&sweep_key))
        .await
        .expect("a sweep may use a job's key");
    assert!(sweep.new);
    let repeat = store::insert_sweep(
        &pool,
        SweepId::from(Uuid::now_v7()),
        &plan,
        Some(&sweep_key),
    )
    .await
    .expect("repeat");
    assert_eq!((repeat.id, repeat.new, repeat.jobs), (id, false, 0));
    assert_eq!(count_of(&pool, "SELECT count(*) FROM jobs").await, 4);
    assert_eq!(count_of(&pool, "SELECT count(*) FROM sweeps").await, 1);
}

#[sqlx::test(migrations = "../migrations")]
async fn concurrent_submits_with_one_request_id_store_one_job_and_one_sweep(pool: PgPool) {
    let the_spec = spec(1, &[]);
    let key = job_key("concurrent", &the_spec);
    let submits = (0..8).map(|_| {
        let (pool, spec, key) = (pool.clone(), the_spec.clone(), key.clone());
        tokio::spawn(async move { store::submit_job(&pool, new_id(), &spec, Some(&key)).await })
    });
    let mut ids = HashSet::new();
    let mut created = 0;
    for handle in submits {
        let (row, new) = handle.await.expect("task").expect("submit");
        ids.insert(row.id);
        created += usize::from(new);
    }
    assert_eq!((ids.len(), created), (1, 1));
    assert_eq!(count_of(&pool, "SELECT count(*) FROM jobs").await, 1);
    let plan = SweepPlan::try_from(cvae_sweep(1, 2, 5)).expect("valid");
    let key = RequestKey::parse(
        RequestKind::Sweep,
        "request_id",
        "concurrent",
        &plan.to_json(),
    )
    .expect("valid")
    .expect("a key");
    let submits = (0..4).map(|_| {
        let (pool, plan, key) = (pool.clone(), plan.clone(), key.clone());
        tokio::spawn(async move {
            store::insert_sweep(&pool, SweepId::from(Uuid::now_v7()), &plan, Some(&key)).await
        })
    });
    let mut sweeps = HashSet::new();
    for handle in submits {
        sweeps.insert(handle.await.expect("task").expect("submit").id);
    }
    assert_eq!(sweeps.len(), 1);
    assert_eq!(count_of(&pool, "SELECT count(*) FROM sweeps").await, 1);
    assert_eq!(
        count_of(&pool, "SELECT count(*) FROM jobs").await,
        1 + 5 + 20
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_sweeps_runs_come_page_by_page_in_creation_order(pool: PgPool) {
    let plan = SweepPlan::try_from(cvae_sweep(1, 3, 7)).expect("valid");
    let id = SweepId::from(Uuid::now_v7());
    store::insert_sweep(&pool, id, &plan, None)
        .await
        .expect("stored");
    let all = store::sweep_runs(&pool, id).await.expect("runs");
    assert_eq!(all.len(), 7 + 6 * 7);
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let snapshot = store::sweep_snapshot(&pool, id, RunPage { size: 10, after })
            .await
            .expect("read")
            .expect("the sweep");
        let total: i64 = snapshot.counts.iter().map(|(_, n)| n).sum();
        assert_eq!(total, 49, "counts cover every job, whatever the page");
        assert!(snapshot.runs.len() <= 10);
        paged.extend(snapshot.runs);
        match snapshot.next {
            Some(position) => after = Some(position),
            None => break,
        }
    }
    assert_eq!(paged, all);
    let progress = store::sweep_progress(&pool, id)
        .await
        .expect("read")
        .expect("the sweep");
    assert!(!progress.cancelled);
    let mut counts = progress.counts;
    counts.sort_by_key(|(s, _)| s.as_str());
    // The sources and the random arms' runs are ready, the transfers wait.
    assert_eq!(
        counts,
        [(JobState::Queued, 7 + 21), (JobState::Waiting, 21)]
    );
    assert_eq!(
        store::sweep_progress(&pool, SweepId::from(Uuid::now_v7()))
            .await
            .expect("read"),
        None
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn cancelling_a_sweep_while_its_sources_complete_never_deadlocks_and_leaves_it_consistent(
    pool: PgPool,
) {
    // Eight transfer arms per seed wait for each source; CancelSweep cancels arms before
    // sources, completing a source promotes its arms: the two meet on the same rows.
    let mut spec = cvae_sweep(2, 4, 2);
    spec.grid[0].values.remove(0); // transfers only
    let plan = SweepPlan::try_from(spec).expect("valid");
    for round in 0..50 {
        let id = SweepId::from(Uuid::now_v7());
        store::insert_sweep(&pool, id, &plan, None)
            .await
            .expect("stored");
        let runs = store::sweep_runs(&pool, id).await.expect("runs");
        let mut leases = Vec::new();
        for source in runs.iter().filter(|r| r.is_source) {
            leases.push(claim(&pool, source.job_id, "w", LONG).await);
        }
        let completions = leases.into_iter().map(|lease| {
            let pool = pool.clone();
            tokio::spawn(async move { store::complete_job(&pool, &lease, 10).await })
        });
        let completions: Vec<_> = completions.collect();
        let cancel = store::cancel_sweep(&pool, id, "stop").await;
        cancel
            .unwrap_or_else(|e| panic!("round {round}: cancel failed: {e:?}"))
            .expect("the sweep exists");
        for c in completions {
            match c.await.expect("task") {
                // Completed first, or cancelled first: a stale lease, refused as such.
                Ok(_) | Err(Error::FailedPrecondition(_)) => {}
                Err(e) => panic!("round {round}: completion failed: {e:?}"),
            }
        }
        for run in store::sweep_runs(&pool, id).await.expect("runs") {
            let want: &[JobState] = if run.is_source {
                &[JobState::Succeeded, JobState::Cancelled]
            } else {
                &[JobState::Cancelled]
            };
            assert!(
                want.contains(&run.state),
                "round {round}: {} s{} is {} ({:?})",
                run.arm,
                run.seed,
                run.state,
                run.error
            );
        }
    }
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
