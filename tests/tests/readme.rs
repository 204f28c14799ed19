//! The README cannot rot: every shell block of README.md (```sh, except those marked
//! ```sh no-run) and every ```sql block runs, in order, as one bash session (`set -euo
//! pipefail`) against the trainq services of docker-compose.yml, started as the real binaries
//! with the file's commands, environment and healthchecks, auth on (tests::compose). Only
//! `docker compose ...` lines are skipped (the test is what brings the stack up), and the
//! published addresses (localhost:50051, localhost:5432, localhost:9091) point at the test's
//! private ports. A no-run block may not contain a grpcurl, trainq or psql command, so no such
//! command can be shown without being run.
//!
//! The README's commands leave files in a scratch folder; afterwards the test checks what they
//! should have done: the quick start's three jobs succeeded, the sample grid and the charts are
//! real files, the cancelled job is cancelled, and psql printed the CVAEs.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use tests::compose::{ComposeFile, ComposeOptions, ComposeStack};
use tests::{binary, data_dir_with_cifar, grpcurl, training_lock, workspace_root};

/// A fenced block of the README.
#[derive(Debug)]
struct Block {
    /// The info string: language, then words such as `no-run`.
    info: String,
    body: String,
    /// 1-based line of the opening fence.
    line: usize,
}

fn fenced_blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    for (i, line) in markdown.lines().enumerate() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(info)) => {
                open = Some(Block {
                    info: info.trim().to_string(),
                    body: String::new(),
                    line: i + 1,
                })
            }
            (Some(_), Some(rest)) if rest.trim().is_empty() => blocks.extend(open.take()),
            (Some(block), _) => {
                block.body.push_str(line);
                block.body.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "README.md has an unclosed code block");
    blocks
}

fn language(block: &Block) -> &str {
    block.info.split_whitespace().next().unwrap_or("")
}

fn is_no_run(block: &Block) -> bool {
    block.info.split_whitespace().any(|w| w == "no-run")
}

/// Whether a shell line runs one of the commands the README must not show without running.
fn runs_a_checked_command(line: &str) -> bool {
    let code = line.split(" #").next().unwrap_or("");
    code.split(|c: char| c.is_whitespace() || matches!(c, '(' | ')' | '|' | ';' | '&' | '$'))
        .any(|word| matches!(word, "grpcurl" | "trainq" | "psql"))
}

/// The README as one bash script, with the published addresses replaced.
fn script(blocks: &[Block], rewrites: &[(String, String)]) -> String {
    let mut script = String::from("set -euo pipefail\n");
    for block in blocks {
        let body = match language(block) {
            "sh" | "bash" if !is_no_run(block) => block
                .body
                .lines()
                .filter(|l| !l.trim_start().starts_with("docker compose"))
                .collect::<Vec<_>>()
                .join("\n"),
            "sql" => format!(
                "psql -v ON_ERROR_STOP=1 postgres://postgres@localhost:5432/trainq <<'TRAINQ_README_SQL'\n{}TRAINQ_README_SQL",
                block.body
            ),
            _ => continue,
        };
        script.push_str(&format!(
            "echo '>>> README.md line {}' >&2\n{body}\n",
            block.line
        ));
    }
    for (from, to) in rewrites {
        script = script.replace(from.as_str(), to);
    }
    script
}

#[test]
fn no_block_shows_a_command_that_the_readme_test_does_not_run() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("README.md");
    let blocks = fenced_blocks(&readme);
    assert!(blocks.len() > 10, "README.md lost its code blocks");
    for block in &blocks {
        if is_no_run(block) {
            for line in block.body.lines() {
                assert!(
                    !runs_a_checked_command(line),
                    "README.md line {}: a no-run block may not run grpcurl, trainq or psql: {line}",
                    block.line
                );
            }
        }
    }
    let executed = blocks
        .iter()
        .filter(|b| matches!(language(b), "sh" | "bash") && !is_no_run(b))
        .count();
    assert!(executed >= 8, "only {executed} executed shell blocks");
    assert!(runs_a_checked_command("X=$(trainq submit a.yaml)"));
    assert!(runs_a_checked_command("  localhost:50051 | psql -c 1"));
    assert!(!runs_a_checked_command(
        "target/release/trainq-server --help"
    ));
    assert!(!runs_a_checked_command("cargo build # then trainq"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_readme_command_runs_against_the_compose_stack_with_auth_on() {
    let _guard = training_lock();
    for tool in ["jq", "psql", "curl"] {
        let found = ["/usr/local/bin", "/usr/bin", "/bin"]
            .iter()
            .any(|dir| Path::new(dir).join(tool).is_file());
        assert!(
            found,
            "the README's commands need {tool}: install it (Debian: apt-get install jq \
             postgresql-client curl; .ci/run does)"
        );
    }
    let scratch = tempfile::tempdir().expect("scratch dir");
    let data = data_dir_with_cifar(&scratch.path().join("datasets"), 1000, 200, 3);
    let file = ComposeFile::workspace().expect("docker-compose.yml");
    let mut opts = ComposeOptions::services(&["postgres", "redis", "coordinator", "worker-cpu"]);
    opts.data_dir = data;
    let stack = ComposeStack::start(&file, opts)
        .await
        .expect("the compose stack comes up healthy");
    let metrics = stack
        .env("coordinator")
        .and_then(|env| env.get("TRAINQ_METRICS_LISTEN"))
        .cloned()
        .expect("the coordinator's metrics address")
        .replace("0.0.0.0", "127.0.0.1");
    let rewrites = vec![
        ("localhost:50051".to_string(), stack.grpc_addr()),
        (
            "localhost:5432".to_string(),
            format!("127.0.0.1:{}", stack.postgres.port()),
        ),
        ("localhost:9091".to_string(), metrics),
    ];
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("README.md");
    let script = script(&fenced_blocks(&readme), &rewrites);

    let work = scratch.path().join("work");
    std::fs::create_dir_all(&work).expect("work dir");
    std::os::unix::fs::symlink(workspace_root().join("examples"), work.join("examples"))
        .expect("link examples");
    std::fs::write(work.join("readme.sh"), &script).expect("write the script");
    // The .env the quick start's first command writes (the README reads the password from it).
    let password = stack.postgres_password().expect("ComposeOptions sets one");
    std::fs::write(work.join(".env"), format!("POSTGRES_PASSWORD={password}\n"))
        .expect("write .env");
    let bin_dir = binary("trainq").parent().expect("bin dir").to_path_buf();
    let grpcurl_dir = grpcurl().parent().expect("grpcurl dir").to_path_buf();
    let path = std::env::join_paths([
        bin_dir.as_path(),
        grpcurl_dir.as_path(),
        Path::new("/usr/local/bin"),
        Path::new("/usr/bin"),
        Path::new("/bin"),
    ])
    .expect("PATH");
    let started = Instant::now();
    let run = tokio::task::spawn_blocking({
        let work = work.clone();
        move || {
            Command::new("timeout")
                .arg("600")
                .args(["bash", "readme.sh"])
                .current_dir(&work)
                .env_clear()
                .env("PATH", path)
                .env("HOME", &work)
                .output()
                .expect("bash runs")
        }
    })
    .await
    .expect("the script's thread");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    eprintln!(
        "README script: exit {:?} after {:.1} s",
        run.status.code(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        run.status.success(),
        "a README command failed ({:?}); the script is {}\n--- stderr ---\n{stderr}\n--- stdout (tail) ---\n{}",
        run.status.code(),
        work.join("readme.sh").display(),
        tail(&stdout, 4000),
    );

    // What the commands should have done.
    let pool = sqlx::PgPool::connect(&stack.database_url())
        .await
        .expect("the stack's database");
    let quickstart: Vec<(String, String)> = sqlx::query_as(
        "SELECT name, state FROM jobs WHERE labels->>'study' = 'quickstart' ORDER BY name",
    )
    .fetch_all(&pool)
    .await
    .expect("query");
    let names: Vec<&str> = quickstart.iter().map(|(n, _)| n.as_str()).collect();
    for name in [
        "quickstart-cvae-random",
        "quickstart-cvae-transfer",
        "quickstart-mnist",
    ] {
        assert!(names.contains(&name), "{name} missing: {quickstart:?}");
    }
    assert!(
        quickstart.iter().all(|(_, state)| state == "succeeded"),
        "{quickstart:?}"
    );
    let cancelled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE name = 'mnist-classifier' AND state = 'cancelled'",
    )
    .fetch_one(&pool)
    .await
    .expect("query");
    assert_eq!(cancelled, 1, "the README's cancelled job");
    let png = std::fs::read(work.join("transfer-samples.png")).expect("samples downloaded");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(std::fs::read(work.join("elbo.png"))
        .expect("elbo.png")
        .starts_with(b"\x89PNG"));
    assert!(std::fs::read_to_string(work.join("elbo.svg"))
        .expect("elbo.svg")
        .contains("<svg"));
    assert!(
        std::fs::read(work.join("ckpt.safetensors"))
            .expect("checkpoint")
            .len()
            > 100_000
    );
    assert!(
        stdout.contains("quickstart-cvae-transfer") && stdout.contains("transfer/luminance"),
        "psql did not print the transfer CVAE:\n{}",
        tail(&stdout, 4000)
    );
    assert!(
        stdout.contains("trainq_jobs{state=\"succeeded\"}"),
        "curl of /metrics"
    );
    let report = std::fs::read_to_string(work.join("study-report/report.md")).expect("report.md");
    assert!(report.contains("luminance-conv2"), "{report}");
    assert!(work
        .join("study-report/curves/test_neg_elbo_nats.svg")
        .exists());
    let sweeps: Vec<(String, String)> = sqlx::query_as(
        "SELECT s.name, j.state FROM sweeps s JOIN sweep_runs r ON r.sweep_id = s.id
         JOIN jobs j ON j.id = r.job_id WHERE s.name = 'readme-study'",
    )
    .fetch_all(&pool)
    .await
    .expect("query");
    assert_eq!(sweeps.len(), 6, "2 sources and 2 x 2 arm runs: {sweeps:?}");
    assert!(
        sweeps.iter().all(|(_, state)| state == "succeeded"),
        "{sweeps:?}"
    );
}

fn tail(text: &str, max: usize) -> &str {
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    &text[start..]
}
