//! Results-views benchmark: times the README's "Results in SQL" example queries against a
//! database holding about a million metric points.
//!
//! It drops and recreates its own database (`trainq_views_bench`, on the server that
//! DATABASE_URL names; default `postgres://postgres@127.0.0.1:5432/postgres`), applies
//! migrations/ as the coordinator would, and fills it in bulk: `--jobs` succeeded jobs (a fifth
//! MNIST classifiers, the rest CVAEs spread over five initialisations and several seeds, each with
//! a real spec in the proto's JSON mapping), five metrics per job with `--points` points in all
//! (INSERT ... SELECT over generate_series, `job_metric_latest` kept consistent), and a dozen
//! artifacts per job. Then ANALYZE, and each query runs once to warm up and five times timed; it
//! prints a Markdown table of rows and the median. `--explain` also prints each query's plan.
//!
//! It never touches any other database, so it is safe to rerun; the database is left in place
//! for trying queries by hand (`psql postgres://postgres@127.0.0.1:5432/trainq_views_bench`).
//!
//! Run: `cargo run --release -p tests --bin trainq-views-bench -- [--points N] [--jobs N] [--explain]`

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use proto::spec::JobSpec;
use proto::v1;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, PgPool, Row};
use uuid::Uuid;

const DATABASE: &str = "trainq_views_bench";
const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
const METRICS_PER_JOB: u64 = 5;
const EPOCHS: u64 = 10;
const RUNS: usize = 5;

/// The README's example queries, in its order (keep the two in step).
const QUERIES: &[(&str, &str)] = &[
    (
        "final test negative ELBO of every CVAE by initialisation",
        "SELECT init_arm, count(*) AS runs,
                round(avg(test_neg_elbo_nats)::numeric, 2) AS mean_neg_elbo,
                round(stddev(test_neg_elbo_nats)::numeric, 2) AS sd,
                round(min(test_neg_elbo_nats)::numeric, 2) AS best
         FROM job_summary
         WHERE kind = 'cifar_cvae' AND state = 'succeeded'
         GROUP BY init_arm
         ORDER BY mean_neg_elbo",
    ),
    (
        "the 20 newest jobs with attempts, duration and final metrics",
        "SELECT name, kind, init_arm, seed, state, attempts, failed_attempts,
                round(duration_s::numeric, 1) AS duration_s, final_step,
                test_accuracy, test_neg_elbo_nats
         FROM job_summary
         ORDER BY created_at DESC
         LIMIT 20",
    ),
    (
        "learning curve of one job (train/loss, every 10th step)",
        "SELECT step, epoch, value
         FROM metric_series
         WHERE job_name = 'cvae-luminance-s0' AND metric = 'train/loss' AND step % 10 = 0
         ORDER BY step",
    ),
    (
        "mean test negative ELBO per epoch of every CVAE initialisation",
        "SELECT s.init_arm, e.epoch, count(*) AS runs, round(avg(e.value)::numeric, 2) AS mean_neg_elbo
         FROM (
             SELECT job_id, epoch, avg(value) AS value FROM metric_series
             WHERE metric = 'test/neg_elbo_nats' AND kind = 'cifar_cvae'
             GROUP BY job_id, epoch
         ) e
         JOIN job_summary s ON s.id = e.job_id
         GROUP BY s.init_arm, e.epoch
         ORDER BY s.init_arm, e.epoch",
    ),
    (
        "best epoch of every CVAE by test negative ELBO",
        "SELECT s.name, s.init_arm, b.epoch, b.step, b.value AS best_neg_elbo
         FROM job_summary s
         CROSS JOIN LATERAL (
             SELECT epoch, step, value FROM metric_series
             WHERE job_id = s.id AND metric = 'test/neg_elbo_nats'
             ORDER BY value LIMIT 1
         ) b
         WHERE s.kind = 'cifar_cvae'
         ORDER BY b.value",
    ),
    (
        "checkpoints of the transfer CVAEs' source classifiers",
        "SELECT a.job_name, a.name, a.step, a.size_bytes, a.key
         FROM artifact_files a
         WHERE a.kind = 'checkpoint'
           AND a.job_id IN (SELECT init_source_job_id FROM job_summary WHERE init = 'transfer')
         ORDER BY a.job_name, a.step",
    ),
];

struct Args {
    points: u64,
    jobs: u64,
    explain: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        points: 1_000_000,
        jobs: 200,
        explain: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut number = |name: &str| -> anyhow::Result<u64> {
            it.next()
                .with_context(|| format!("{name} needs a number"))?
                .parse()
                .with_context(|| format!("{name} needs a number"))
        };
        match flag.as_str() {
            "--points" => args.points = number("--points")?,
            "--jobs" => args.jobs = number("--jobs")?,
            "--explain" => args.explain = true,
            other => bail!("unknown argument {other}; usage: [--points N] [--jobs N] [--explain]"),
        }
    }
    if args.jobs < 2 || args.points < args.jobs * METRICS_PER_JOB {
        bail!("need --jobs >= 2 and --points >= 5 * --jobs");
    }
    Ok(args)
}

/// The CVAE initialisations the seed document compares: (name part, init).
fn arms(source: Uuid) -> Vec<(&'static str, v1::Initialization)> {
    let transfer = |conv1: v1::Conv1Adaptation, freeze: Option<v1::freeze_policy::Policy>| {
        v1::Initialization {
            kind: Some(v1::initialization::Kind::Transfer(v1::TransferInit {
                source_job_id: source.to_string(),
                conv1: conv1 as i32,
                copy_conv2: true,
                freeze: freeze.map(|p| v1::FreezePolicy { policy: Some(p) }),
            })),
        }
    };
    vec![
        (
            "random",
            v1::Initialization {
                kind: Some(v1::initialization::Kind::Random(v1::RandomInit {})),
            },
        ),
        (
            "replicate-third",
            transfer(v1::Conv1Adaptation::ReplicateThird, None),
        ),
        ("luminance", transfer(v1::Conv1Adaptation::Luminance, None)),
        (
            "keep-random",
            transfer(v1::Conv1Adaptation::KeepRandom, None),
        ),
        (
            "luminance-frozen",
            transfer(
                v1::Conv1Adaptation::Luminance,
                Some(v1::freeze_policy::Policy::WholeRun(true)),
            ),
        ),
    ]
}

/// (id, name, kind, spec JSON) of every job: a fifth classifiers (seeds 0..), then CVAEs, each
/// arm in turn, seed by seed, transferring from the classifier with the same seed index.
fn job_specs(jobs: u64) -> anyhow::Result<Vec<(Uuid, String, String, serde_json::Value)>> {
    let classifiers = (jobs / 5).max(1);
    let training = |seed: u64, lr: f64| v1::Training {
        epochs: EPOCHS as u32,
        batch_size: 128,
        learning_rate: lr,
        seed,
        ..Default::default()
    };
    let mut out = Vec::new();
    let mut add = |name: String, raw: v1::JobSpec| -> anyhow::Result<Uuid> {
        let spec = JobSpec::try_from(raw).map_err(|e| anyhow::anyhow!("invalid spec: {e:?}"))?;
        let id = Uuid::now_v7();
        out.push((id, name, spec.experiment.kind().to_string(), spec.to_json()));
        Ok(id)
    };
    let mut sources = Vec::new();
    for seed in 0..classifiers {
        let name = format!("mnist-s{seed}");
        sources.push(add(
            name.clone(),
            v1::JobSpec {
                name,
                labels: [("sweep".to_string(), "bench".to_string())].into(),
                training: Some(training(seed, 1e-3)),
                experiment: Some(v1::job_spec::Experiment::MnistClassifier(
                    v1::MnistClassifier {},
                )),
                ..Default::default()
            },
        )?);
    }
    for i in 0..jobs - classifiers {
        let n_arms = arms(Uuid::nil()).len() as u64;
        let seed = i / n_arms;
        let source = sources[(seed % classifiers) as usize];
        let (arm, init) = arms(source).swap_remove((i % n_arms) as usize);
        let name = format!("cvae-{arm}-s{seed}");
        add(
            name.clone(),
            v1::JobSpec {
                name,
                labels: [("sweep".to_string(), "bench".to_string())].into(),
                training: Some(training(seed, 5e-4)),
                depends_on: match init.kind {
                    Some(v1::initialization::Kind::Transfer(_)) => vec![source.to_string()],
                    _ => vec![],
                },
                experiment: Some(v1::job_spec::Experiment::CifarCvae(v1::CifarCvae {
                    init: Some(init),
                    ..Default::default()
                })),
                ..Default::default()
            },
        )?;
    }
    Ok(out)
}

async fn fill(pool: &PgPool, args: &Args) -> anyhow::Result<()> {
    let jobs = job_specs(args.jobs)?;
    let steps = args.points.div_ceil(args.jobs * METRICS_PER_JOB) as i64;
    let t = Instant::now();
    let (ids, names, kinds, specs): (Vec<Uuid>, Vec<String>, Vec<String>, Vec<serde_json::Value>) =
        jobs.into_iter().fold(
            Default::default(),
            |(mut a, mut b, mut c, mut d), (id, name, kind, spec)| {
                a.push(id);
                b.push(name);
                c.push(kind);
                d.push(spec);
                (a, b, c, d)
            },
        );
    // Jobs as the coordinator leaves them after one successful attempt each, created a minute
    // apart, each trained for ~10 ms per step.
    sqlx::query(
        "INSERT INTO jobs (id, name, kind, spec, labels, state, attempt, max_attempts, worker_id,
                           created_at, updated_at, started_at, finished_at, final_step)
         SELECT id, name, kind, spec, coalesce(spec->'labels', '{}'), 'succeeded', 1, 3, 'bench-worker',
                t0, t1, t0 + interval '2 s', t1, $5
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::jsonb[])
             WITH ORDINALITY AS u(id, name, kind, spec, n),
         LATERAL (SELECT timestamptz '2026-01-01' + n * interval '1 min' AS t0) a,
         LATERAL (SELECT t0 + $5 * interval '10 ms' + interval '2 s' AS t1) b",
    )
    .bind(&ids)
    .bind(&names)
    .bind(&kinds)
    .bind(&specs)
    .bind(steps)
    .execute(pool)
    .await
    .context("inserting jobs")?;
    pool.execute(
        "INSERT INTO job_dependencies (job_id, depends_on)
         SELECT id, init_source_job_id FROM job_summary WHERE init_source_job_id IS NOT NULL;
         INSERT INTO job_attempts (job_id, attempt, worker_id, claimed_at, ended_at, outcome)
         SELECT id, 1, worker_id, started_at, finished_at, 'succeeded' FROM jobs",
    )
    .await
    .context("inserting dependencies and attempts")?;
    // Five metrics per kind; curves fall like base * (1 + 3 / sqrt(step)), with a per-job offset
    // (transfer arms a little better than random) and a little per-point noise.
    let points = sqlx::query(
        "WITH metrics(kind, name, base) AS (VALUES
             ('mnist_classifier', 'train/loss', 0.05), ('mnist_classifier', 'train/accuracy', 0.99),
             ('mnist_classifier', 'train/images_per_s', 20000.0),
             ('mnist_classifier', 'test/loss', 0.04), ('mnist_classifier', 'test/accuracy', 0.98),
             ('cifar_cvae', 'train/loss', 680.0), ('cifar_cvae', 'test/neg_elbo_nats', 690.0),
             ('cifar_cvae', 'test/bits_per_dim', 0.324), ('cifar_cvae', 'test/recon', 660.0),
             ('cifar_cvae', 'test/kl', 30.0)
         )
         INSERT INTO metric_points (job_id, name, step, epoch, value, recorded_at)
         SELECT j.id, m.name, s, 1 + ((s - 1) * $2) / $1,
                m.base * (1 + 3 / sqrt(s))
                    * (1 + (CASE WHEN j.spec->'cifarCvae'->'init' ? 'transfer' THEN -0.01 ELSE 0 END)
                         + (abs(hashtext(j.id::text || m.name)) % 1000) / 50000.0
                         + (abs(hashtext(j.id::text || m.name || s)) % 1000) / 200000.0),
                j.started_at + s * interval '10 ms'
         FROM jobs j
         JOIN metrics m ON m.kind = j.kind
         CROSS JOIN generate_series(1::bigint, $1) s",
    )
    .bind(steps)
    .bind(EPOCHS as i64)
    .execute(pool)
    .await
    .context("inserting metric points")?
    .rows_affected();
    pool.execute(
        "INSERT INTO job_metric_latest (job_id, name, step, epoch, value)
         SELECT DISTINCT ON (job_id, name) job_id, name, step, epoch, value
         FROM metric_points ORDER BY job_id, name, step DESC",
    )
    .await
    .context("summarising metrics")?;
    // A checkpoint per epoch and the two newest resume states per job, as a worker leaves them.
    let artifacts = sqlx::query(
        "INSERT INTO artifacts (id, job_id, attempt, kind, name, epoch, step, size_bytes, sha256,
                                uri, created_at)
         SELECT gen_random_uuid(), j.id, 1, a.kind, a.name, a.epoch, a.step,
                CASE j.kind WHEN 'cifar_cvae' THEN 2400000 ELSE 1700000 END,
                md5(j.id::text || a.name) || md5(a.name || j.id::text),
                'file:///artifacts/jobs/' || j.id || '/1/' || a.kind || '/' || a.name,
                j.started_at + a.step * interval '10 ms'
         FROM jobs j
         CROSS JOIN LATERAL (
             SELECT 'checkpoint' AS kind, format('epoch-%s.safetensors', lpad(e::text, 3, '0')) AS name,
                    e AS epoch, e * ($1 / $2) AS step
             FROM generate_series(1, $2::int) e
             UNION ALL
             SELECT 'resume', format('step-%s.safetensors', lpad((e * ($1 / $2))::text, 9, '0')),
                    e, e * ($1 / $2)
             FROM generate_series($2::int - 1, $2::int) e
         ) a",
    )
    .bind(steps)
    .bind(EPOCHS as i64)
    .execute(pool)
    .await
    .context("inserting artifacts")?
    .rows_affected();
    pool.execute("VACUUM ANALYZE").await.context("analyze")?;
    eprintln!(
        "loaded {} jobs, {points} metric points ({steps} steps x {METRICS_PER_JOB} metrics per \
         job), {artifacts} artifacts in {:.1} s",
        ids.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn time_query(pool: &PgPool, sql: &str) -> anyhow::Result<(usize, Duration)> {
    let rows = sqlx::query(sql).fetch_all(pool).await?.len();
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let t = Instant::now();
        let n = sqlx::query(sql).fetch_all(pool).await?.len();
        times.push(t.elapsed());
        if n != rows {
            bail!("the query returned {n} rows, then {rows}");
        }
    }
    times.sort();
    Ok((rows, times[RUNS / 2]))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_URL.into());
    let admin_options = PgConnectOptions::from_str(&url).context("parsing DATABASE_URL")?;
    let mut admin = admin_options
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    admin
        .execute(format!("DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)").as_str())
        .await?;
    admin
        .execute(format!("CREATE DATABASE {DATABASE}").as_str())
        .await?;
    admin.close().await?;

    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(admin_options.database(DATABASE))
        .await?;
    let migrations = Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
    sqlx::migrate::Migrator::new(migrations.as_path())
        .await
        .context("reading migrations/")?
        .run(&pool)
        .await
        .context("applying migrations")?;
    fill(&pool, &args).await?;

    println!("| query | rows | median ms ({RUNS} runs) |");
    println!("| --- | ---: | ---: |");
    let mut plans = Vec::new();
    for (label, sql) in QUERIES {
        let (rows, median) = time_query(&pool, sql)
            .await
            .with_context(|| format!("running \"{label}\""))?;
        println!(
            "| {label} | {rows} | {:.2} |",
            median.as_secs_f64() * 1000.0
        );
        if args.explain {
            let plan: Vec<String> = sqlx::query(&format!("EXPLAIN (ANALYZE, BUFFERS) {sql}"))
                .fetch_all(&pool)
                .await?
                .iter()
                .map(|r| r.get::<String, _>(0))
                .collect();
            plans.push(format!("-- {label}\n{}", plan.join("\n")));
        }
    }
    for plan in plans {
        println!("\n{plan}");
    }
    Ok(())
}
