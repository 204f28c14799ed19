//! Queues, priorities, slots and the fleet, end to end: the real coordinator and workers, Redis
//! and Postgres, grpcurl and the CLI, real training on CPU.

use std::time::Duration;

use proto::v1::{self, JobState};
use tests::*;

type Client = v1::job_service_client::JobServiceClient<tonic::transport::Channel>;

const FINISH: Duration = Duration::from_secs(240);

async fn submit(client: &mut Client, spec: serde_json::Value) -> String {
    let spec: v1::JobSpec = serde_json::from_value(spec).expect("spec json");
    tests::submit(client, spec).await.expect("submit")
}

async fn get(client: &mut Client, id: &str) -> v1::Job {
    client
        .get_job(v1::GetJobRequest { job_id: id.into() })
        .await
        .expect("get")
        .into_inner()
}

fn mnist(name: &str, queue: &str, priority: i32) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "queue": queue,
        "priority": priority,
        "training": {"epochs": 1, "batchSize": 64, "learningRate": 0.001, "seed": 1,
                     "maxTrainExamples": 256, "maxTestExamples": 64},
        "mnistClassifier": {}
    })
}

fn claimed_at(job: &v1::Job) -> (i64, i32) {
    let t = job.attempts[0].claimed_at.as_ref().expect("claimed_at");
    (t.seconds, t.nanos)
}

fn ended_at(job: &v1::Job) -> (i64, i32) {
    let t = job.attempts[0].ended_at.as_ref().expect("ended_at");
    (t.seconds, t.nanos)
}

/// A later high-priority job runs before earlier low ones; a job on queue `gpu` is never claimed
/// by a worker that serves only `default`, says why it waits, and runs as soon as a worker for
/// `gpu` appears; a job that needs CUDA is never claimed by a CPU worker and says so (one that
/// needs a CPU runs, whatever GPU memory it states); ListWorkers (grpcurl) and `trainq workers`
/// show both workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_and_queues_route_jobs_and_a_job_nobody_serves_says_why() {
    let env = TestEnv::new();
    let coordinator = env.start_coordinator(&[]).await;
    let mut client = coordinator.client().await;
    let mut low = Vec::new();
    for i in 0..3 {
        low.push(submit(&mut client, mnist(&format!("low-{i}"), "", 0)).await);
    }
    let high = submit(&mut client, mnist("high", "default", 10)).await;
    let gpu = submit(&mut client, mnist("on-gpu", "gpu", 0)).await;
    let mut needs_cuda = mnist("needs-cuda", "default", 20);
    needs_cuda["resources"] = serde_json::json!({"device": "DEVICE_KIND_CUDA"});
    let needs_cuda = submit(&mut client, needs_cuda).await;
    let mut needs_cpu = mnist("needs-cpu", "default", 0);
    needs_cpu["resources"] =
        serde_json::json!({"device": "DEVICE_KIND_CPU", "gpuMemoryMib": 90000});
    low.push(submit(&mut client, needs_cpu).await);
    assert_eq!(
        get(&mut client, &gpu).await.waiting_reason,
        "no live worker serves queue gpu"
    );
    assert_eq!(
        get(&mut client, &low[0]).await.waiting_reason,
        "no live worker serves queue default",
        "before any worker reports"
    );

    let mut worker = env.start_worker(&coordinator, "w-default", &["--queues", "default"]);
    let mut done = Vec::new();
    for id in low.iter().chain([&high]) {
        let job = wait_terminal(&mut client, id, FINISH).await.expect("ends");
        assert_eq!(
            job.state(),
            JobState::Succeeded,
            "{}\n{}",
            job.error,
            worker.log()
        );
        done.push(job);
    }
    let high_job = done.pop().expect("high");
    for job in &done {
        assert!(
            claimed_at(&high_job) < claimed_at(job),
            "the priority-10 job was submitted last but claimed first: {:?} vs {:?}",
            high_job.attempts,
            job.attempts
        );
    }
    let waiting = get(&mut client, &gpu).await;
    assert_eq!(
        waiting.state(),
        JobState::Queued,
        "never claimed by w-default"
    );
    assert!(waiting.attempts.is_empty());
    assert_eq!(waiting.waiting_reason, "no live worker serves queue gpu");

    // The highest priority of all, on a served queue, but it needs CUDA: the CPU worker popped
    // it first and left it queued.
    let cuda = get(&mut client, &needs_cuda).await;
    assert_eq!(cuda.state(), JobState::Queued, "{:?}", cuda.attempts);
    assert!(cuda.attempts.is_empty());
    assert_eq!(
        cuda.waiting_reason,
        "no live worker with a CUDA device serves queue default"
    );
    let workers = coordinator
        .grpcurl(Some("{}"), &["trainq.v1.JobService/ListWorkers"])
        .json();
    let listed = &workers["workers"];
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{workers}");
    assert_eq!(listed[0]["workerId"], "w-default");
    assert_eq!(listed[0]["state"], "WORKER_STATE_LIVE");
    assert_eq!(listed[0]["queues"], serde_json::json!(["default"]));
    assert_eq!(listed[0]["slotsTotal"], 1);
    assert_eq!(listed[0]["devices"][0]["name"], "cpu");

    let mut gpu_worker = env.start_worker(&coordinator, "w-gpu", &["--queues", "gpu"]);
    let ran = wait_terminal(&mut client, &gpu, FINISH)
        .await
        .expect("ends");
    assert_eq!(
        ran.state(),
        JobState::Succeeded,
        "{}\n{}",
        ran.error,
        gpu_worker.log()
    );
    assert_eq!(ran.worker_id, "w-gpu");
    assert!(ran.waiting_reason.is_empty());

    let dir = tempfile::tempdir().expect("tempdir");
    let out = trainq(&coordinator, dir.path(), &["workers"]);
    let table = expect_exit(&out, 0, "trainq workers");
    for needle in ["w-default", "w-gpu", "live", "gpu", "0/1"] {
        assert!(table.contains(needle), "{needle} missing:\n{table}");
    }
    let out = trainq(&coordinator, dir.path(), &["workers", "--worker", "nobody"]);
    expect_exit(&out, 3, "an unknown worker is not found");
    worker.kill();
    gpu_worker.kill();
}

fn cvae(name: &str, seed: u32, epochs: u32) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "training": {"epochs": epochs, "batchSize": 32, "learningRate": 0.001, "seed": seed,
                     "maxTrainExamples": 256, "maxTestExamples": 64, "logEverySteps": 4},
        "cifarCvae": {}
    })
}

/// Every point of a job but the timing, with its value's exact bits.
async fn exact_points(client: &mut Client, id: &str) -> Vec<(String, u64, u64)> {
    all_points(client, id)
        .await
        .expect("metrics")
        .into_iter()
        .filter(|p| p.name != proto::metric::TRAIN_IMAGES_PER_S)
        .map(|p| (p.name, p.step, p.value.to_bits()))
        .collect()
}

/// `--slots 2`: two jobs train at once in one worker; a CVAE's metric points are bit for bit
/// those it had alone on a one-slot worker (one torch thread per job in both); cancelling one
/// job stops only its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_slots_train_two_jobs_at_once_as_they_would_alone_and_cancel_one_by_one() {
    let env = TestEnv::new();
    let data = data_dir_with_cifar(&env.dir.path().join("data"), 256, 64, 3);
    let metrics = format!("127.0.0.1:{}", free_port());
    let coordinator = env.start_coordinator(&["--metrics-listen", &metrics]).await;
    let mut client = coordinator.client().await;

    let alone = submit(&mut client, cvae("alone", 7, 3)).await;
    let mut one_slot = env.start_worker_with_data(&coordinator, "one-slot", &data, &[]);
    let job = wait_terminal(&mut client, &alone, FINISH)
        .await
        .expect("ends");
    assert_eq!(
        job.state(),
        JobState::Succeeded,
        "{}\n{}",
        job.error,
        one_slot.log()
    );
    one_slot
        .terminate(Duration::from_secs(30))
        .expect("the one-slot worker stops");
    let want = exact_points(&mut client, &alone).await;
    assert!(want.len() > 20, "{} points", want.len());

    let same = submit(&mut client, cvae("same-beside-another", 7, 3)).await;
    let long = submit(&mut client, cvae("long-cancelled", 8, 200)).await;
    let third = submit(&mut client, cvae("third", 9, 4)).await;
    let mut two_slots =
        env.start_worker_with_data(&coordinator, "two-slots", &data, &["--slots", "2"]);
    let same_job = wait_terminal(&mut client, &same, FINISH)
        .await
        .expect("ends");
    assert_eq!(
        same_job.state(),
        JobState::Succeeded,
        "{}\n{}",
        same_job.error,
        two_slots.log()
    );
    assert_eq!(
        exact_points(&mut client, &same).await,
        want,
        "the same spec trained beside another job gives the same points"
    );

    // The third job takes the slot the first freed; then the long one is cancelled.
    let deadline = std::time::Instant::now() + FINISH;
    while get(&mut client, &third).await.state() != JobState::Running {
        assert!(std::time::Instant::now() < deadline, "{}", two_slots.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fleet = client
        .get_worker(v1::GetWorkerRequest {
            worker_id: "two-slots".into(),
        })
        .await
        .expect("get worker")
        .into_inner();
    assert_eq!(fleet.slots_total, 2);
    // The coordinator's per-worker gauges show both slots busy (as of a WorkerHeartbeat), and
    // the stopped one-slot worker (live until its lease timeout) with its one slot.
    let gauges = |text: &str, worker: &str| {
        let busy = prometheus_sample(
            text,
            &format!("trainq_worker_slots_busy{{worker=\"{worker}\"}}"),
        );
        let total = prometheus_sample(
            text,
            &format!("trainq_worker_slots_total{{worker=\"{worker}\"}}"),
        );
        (busy, total)
    };
    loop {
        let (_, text) = http_get(&metrics, "/metrics").await.expect("scrape");
        if gauges(&text, "two-slots") == (Some(2.0), Some(2.0)) {
            assert_eq!(gauges(&text, "one-slot").1, Some(1.0), "{text}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the gauges never showed two busy slots:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    client
        .cancel_job(v1::CancelJobRequest {
            job_id: long.clone(),
            reason: "test".into(),
        })
        .await
        .expect("cancel");
    let third_job = wait_terminal(&mut client, &third, FINISH)
        .await
        .expect("ends");
    assert_eq!(
        third_job.state(),
        JobState::Succeeded,
        "{}\n{}",
        third_job.error,
        two_slots.log()
    );
    let long_job = get(&mut client, &long).await;
    assert_eq!(long_job.state(), JobState::Cancelled);
    assert!(
        claimed_at(&long_job) < ended_at(&same_job)
            && claimed_at(&same_job) < claimed_at(&third_job),
        "two jobs ran at once: {:?} {:?}",
        same_job.attempts,
        long_job.attempts
    );
    assert!(
        claimed_at(&third_job) < ended_at(&long_job),
        "the cancelled job was still running beside the third: {:?} {:?}",
        third_job.attempts,
        long_job.attempts
    );
    two_slots.kill();
}
