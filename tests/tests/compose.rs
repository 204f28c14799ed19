//! docker-compose.yml: the real `docker-compose config` accepts it (with and without the cpu
//! profile) and interpolates it as tests::compose does; and its trainq services, run as the real
//! binaries with exactly the file's environment (tests::compose::ComposeStack), come up healthy
//! by the file's own healthcheck, with auth on, and train a tiny job on worker-cpu.
//!
//! The file publishes ports on 127.0.0.1 unless TRAINQ_BIND_ADDR says otherwise, and Postgres
//! has password auth with a password that only the environment (.env) supplies.
//!
//! docker-compose missing is a loud failure naming the fix (.ci/run installs it), never a skip.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use proto::v1;
use tests::compose::{ComposeFile, ComposeOptions, ComposeStack};
use tests::{mnist_spec_json, training_lock, workspace_root};

/// `docker-compose -f docker-compose.yml <args>` in the workspace root with only `vars` (and
/// PATH, HOME) in its environment, so the shell's DATABASE_URL and the like do not leak in.
fn docker_compose(args: &[&str], vars: &[(&str, &str)]) -> (bool, String, String) {
    let program = std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("docker-compose"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "docker-compose not found: install it (Debian/Ubuntu: `apt-get install \
                 docker-compose`; .ci/run does) to check docker-compose.yml"
            )
        });
    let out = Command::new(program)
        .current_dir(workspace_root())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::var_os("HOME").unwrap_or_default())
        .envs(vars.iter().copied())
        .args(["-f", "docker-compose.yml"])
        .args(args)
        .output()
        .expect("running docker-compose");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn service_names(config: &str) -> Vec<String> {
    let doc: serde_yaml::Value = serde_yaml::from_str(config).expect("config prints YAML");
    doc["services"]
        .as_mapping()
        .expect("services")
        .keys()
        .filter_map(|k| k.as_str().map(String::from))
        .collect()
}

/// The variables every `docker-compose config` here needs: the file has no default password.
const PASSWORD: (&str, &str) = ("POSTGRES_PASSWORD", "0123abcd-test-password");

#[test]
fn docker_compose_config_accepts_the_file_with_and_without_the_cpu_profile() {
    let (ok, stdout, stderr) = docker_compose(&["config"], &[PASSWORD]);
    assert!(ok, "docker-compose config failed:\n{stderr}{stdout}");
    let names = service_names(&stdout);
    for service in ["postgres", "redis", "coordinator", "worker"] {
        assert!(
            names.iter().any(|n| n == service),
            "{service} missing: {names:?}"
        );
    }
    let (ok, stdout, stderr) = docker_compose(&["--profile", "cpu", "config"], &[PASSWORD]);
    assert!(
        ok,
        "docker-compose --profile cpu config failed:\n{stderr}{stdout}"
    );
    let names = service_names(&stdout);
    for service in ["postgres", "redis", "coordinator", "worker", "worker-cpu"] {
        assert!(
            names.iter().any(|n| n == service),
            "{service} missing: {names:?}"
        );
    }
    // Warnings about unset variables mean a `${VAR}` without a default.
    assert!(!stderr.contains("is not set"), "{stderr}");
}

/// tests::compose interpolates every trainq service's environment as docker-compose does, with
/// the defaults and with variables set.
#[test]
fn the_parsed_environment_matches_docker_compose_config() {
    let file = ComposeFile::workspace().expect("docker-compose.yml parses");
    let set = [
        PASSWORD,
        ("TRAINQ_CLIENT_TOKEN", "c-token"),
        ("TRAINQ_WORKER_TOKEN", "w-token"),
        ("RUST_LOG", "debug"),
        ("TRAINQ_TORCH_THREADS", "2"),
    ];
    for vars in [&[PASSWORD][..], &set[..]] {
        let (ok, stdout, stderr) = docker_compose(&["--profile", "cpu", "config"], vars);
        assert!(ok, "{stderr}");
        let config: serde_yaml::Value = serde_yaml::from_str(&stdout).expect("yaml");
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for service in ["postgres", "coordinator", "worker", "worker-cpu"] {
            let ours = file
                .service(service)
                .expect("service")
                .environment(&map)
                .expect("interpolates");
            let theirs: BTreeMap<String, String> =
                serde_yaml::from_value(config["services"][service]["environment"].clone())
                    .expect("environment is a map of strings");
            assert_eq!(ours, theirs, "{service} with {vars:?}");
        }
    }
    let coordinator = file.service("coordinator").expect("coordinator");
    let password = HashMap::from([(PASSWORD.0.to_string(), PASSWORD.1.to_string())]);
    let env = coordinator.environment(&password).expect("interpolates");
    assert!(
        !env["TRAINQ_CLIENT_TOKENS"].is_empty(),
        "auth is on by default"
    );
    assert!(
        !env["TRAINQ_WORKER_TOKENS"].is_empty(),
        "auth is on by default"
    );
    let health = coordinator
        .healthcheck(&password)
        .expect("healthcheck")
        .expect("the coordinator has a healthcheck");
    assert_eq!(&health[..2], ["trainq", "health"], "{health:?}");
    assert_eq!(
        file.service("worker-cpu").expect("worker-cpu").profiles(),
        ["cpu"]
    );
}

/// The published host side of every port of every service, from `docker-compose config` (short
/// `IP:HOST:CONTAINER` strings, or the long form newer versions print).
fn published_ips(config: &str) -> Vec<(String, String)> {
    let doc: serde_yaml::Value = serde_yaml::from_str(config).expect("config prints YAML");
    let mut ips = Vec::new();
    for (name, service) in doc["services"].as_mapping().expect("services") {
        let name = name.as_str().unwrap_or_default().to_string();
        for port in service["ports"].as_sequence().into_iter().flatten() {
            let ip = match port {
                serde_yaml::Value::String(short) => {
                    let parts: Vec<&str> = short.split(':').collect();
                    if parts.len() == 3 {
                        parts[0].to_string()
                    } else {
                        String::new()
                    }
                }
                long => long["host_ip"].as_str().unwrap_or_default().to_string(),
            };
            ips.push((name.clone(), ip));
        }
    }
    ips
}

#[test]
fn ports_are_published_on_loopback_unless_trainq_bind_addr_says_otherwise() {
    let (ok, stdout, stderr) = docker_compose(&["--profile", "cpu", "config"], &[PASSWORD]);
    assert!(ok, "{stderr}");
    let ips = published_ips(&stdout);
    for service in ["postgres", "coordinator"] {
        assert!(
            ips.iter().any(|(s, _)| s == service),
            "{service} publishes nothing: {ips:?}"
        );
    }
    assert!(
        ips.iter().all(|(_, ip)| ip == "127.0.0.1"),
        "every published port is on 127.0.0.1 by default: {ips:?}\n{stdout}"
    );
    let (ok, stdout, stderr) =
        docker_compose(&["config"], &[PASSWORD, ("TRAINQ_BIND_ADDR", "0.0.0.0")]);
    assert!(ok, "{stderr}");
    let ips = published_ips(&stdout);
    assert!(
        !ips.is_empty() && ips.iter().all(|(_, ip)| ip == "0.0.0.0"),
        "{ips:?}"
    );
    // Our reading of the file agrees.
    let file = ComposeFile::workspace().expect("docker-compose.yml parses");
    let ports = file
        .service("postgres")
        .expect("postgres")
        .ports(&HashMap::new())
        .expect("interpolates");
    assert_eq!(ports, ["127.0.0.1:5432:5432"]);
}

#[test]
fn postgres_has_password_auth_and_the_password_comes_only_from_the_environment() {
    // No password: docker-compose refuses the file, naming the variable.
    let (ok, stdout, stderr) = docker_compose(&["config"], &[]);
    assert!(!ok, "config without POSTGRES_PASSWORD succeeded:\n{stdout}");
    assert!(stderr.contains("POSTGRES_PASSWORD"), "{stderr}");
    let file = ComposeFile::workspace().expect("docker-compose.yml parses");
    let postgres = file.service("postgres").expect("postgres");
    let coordinator = file.service("coordinator").expect("coordinator");
    assert!(postgres.environment(&HashMap::new()).is_err());
    assert!(coordinator.environment(&HashMap::new()).is_err());

    // With one: Postgres gets it, with no trust auth, and the coordinator's URL carries it.
    let (ok, stdout, stderr) = docker_compose(&["config"], &[PASSWORD]);
    assert!(ok, "{stderr}");
    let config: serde_yaml::Value = serde_yaml::from_str(&stdout).expect("yaml");
    let env: BTreeMap<String, String> =
        serde_yaml::from_value(config["services"]["postgres"]["environment"].clone())
            .expect("environment is a map of strings");
    assert_eq!(
        env.get("POSTGRES_PASSWORD").map(String::as_str),
        Some(PASSWORD.1)
    );
    assert!(
        !env.contains_key("POSTGRES_HOST_AUTH_METHOD"),
        "no trust (or other) auth override: {env:?}"
    );
    assert!(!stdout.contains("trust"), "{stdout}");
    let url = config["services"]["coordinator"]["environment"]["DATABASE_URL"]
        .as_str()
        .expect("DATABASE_URL");
    assert_eq!(
        url,
        format!("postgres://postgres:{}@postgres:5432/trainq", PASSWORD.1)
    );
}

// The training lock is a std mutex on purpose: it serialises training across tests, each of
// which has its own runtime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_stack_is_healthy_with_auth_on_and_worker_cpu_trains_a_job() {
    let _guard = training_lock();
    let file = ComposeFile::workspace().expect("docker-compose.yml parses");
    let opts = ComposeOptions::services(&["postgres", "redis", "coordinator", "worker-cpu"])
        .var("TRAINQ_TORCH_THREADS", "1");
    let stack = ComposeStack::start(&file, opts)
        .await
        .expect("the stack starts and its healthcheck passes");

    // The file's healthcheck is `trainq health` and passes now (start() waited for it).
    let argv = stack.healthcheck_argv().expect("healthcheck");
    assert_eq!(argv[0], "trainq");
    let health = stack.run_healthcheck().expect("runs");
    assert!(health.status.success(), "{health:?}");
    assert!(String::from_utf8_lossy(&health.stdout).contains("SERVING"));

    // The rewritten environment: nothing names a compose host or a container path any more.
    let worker_env = stack.env("worker-cpu").expect("worker-cpu started");
    assert_eq!(worker_env["TRAINQ_DEVICE"], "cpu");
    assert_eq!(worker_env["TRAINQ_TORCH_THREADS"], "1");
    assert!(worker_env["TRAINQ_COORDINATOR"].contains("127.0.0.1:"));
    assert!(PathBuf::from(&worker_env["TRAINQ_DATA_DIR"])
        .join("mnist")
        .is_dir());
    assert!(
        stack.database_url().contains("127.0.0.1:"),
        "{}",
        stack.database_url()
    );
    // The password the stack was given (as .env would) is in the coordinator's DATABASE_URL.
    let password = stack.postgres_password().expect("ComposeOptions sets one");
    assert!(
        stack
            .database_url()
            .starts_with(&format!("postgres://postgres:{password}@127.0.0.1:")),
        "{}",
        stack.database_url()
    );

    // Auth is on as in compose: no token is UNAUTHENTICATED, the compose client token works.
    let mut anonymous = stack.anonymous_client().await.expect("connects");
    let refused = anonymous
        .list_jobs(v1::ListJobsRequest::default())
        .await
        .expect_err("no token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    assert_eq!(stack.client_token().as_deref(), Some("change-me-client"));
    let mut client = stack.client().await.expect("connects");
    client
        .list_jobs(v1::ListJobsRequest::default())
        .await
        .expect("the client token is accepted");

    // worker-cpu registered with the compose worker token: a tiny job succeeds.
    let spec: v1::JobSpec =
        serde_json::from_str(&mnist_spec_json("compose-tiny", 1, 256, 256)).expect("spec");
    let job_id = client
        .submit_job(v1::SubmitJobRequest {
            spec: Some(spec),
            request_id: String::new(),
        })
        .await
        .expect("submitted")
        .into_inner()
        .job_id;
    let deadline = Instant::now() + Duration::from_secs(300);
    let job = loop {
        let job = client
            .get_job(v1::GetJobRequest {
                job_id: job_id.clone(),
            })
            .await
            .expect("get")
            .into_inner();
        if job.state().is_terminal() {
            break job;
        }
        assert!(
            Instant::now() < deadline,
            "job still {:?}; worker log:\n{}",
            job.state(),
            stack
                .proc("worker-cpu")
                .map(|p| p.log())
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(
        job.state(),
        v1::JobState::Succeeded,
        "{job:?}\nworker log:\n{}",
        stack
            .proc("worker-cpu")
            .map(|p| p.log())
            .unwrap_or_default()
    );
    assert!(tests::latest(&job, "test/accuracy").is_some(), "{job:?}");
}
