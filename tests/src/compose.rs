//! docker-compose.yml, read and run without Docker: the file's services, their environment (with
//! Compose's `${VAR:-default}` interpolation), healthchecks and commands, and [`ComposeStack`],
//! which runs the trainq services of the file as the real `trainq-server` and `trainq-worker`
//! binaries with exactly the environment the file gives them.
//!
//! What differs from `docker compose up`, and only this: Postgres and Redis are the private
//! servers of [`crate::services`]; values naming a compose service's address (`postgres:5432`,
//! `redis:6379`, `coordinator:50051`, and the containers' own listen addresses such as
//! `0.0.0.0:50051` or `localhost:50051` in a healthcheck) name free loopback ports instead; and
//! container paths of the services' volumes (`/artifacts`, `/data`) name folders of the stack's
//! temp dir (`/data` the real MNIST of [`crate::shared_data_dir`] by default). So a test of the
//! stack checks the file's settings (tokens, auth, healthcheck, worker settings), not Docker.
//! (The private Postgres trusts local connections: the file's `POSTGRES_PASSWORD` reaches the
//! coordinator's `DATABASE_URL`, but only the real `postgres` image enforces it.)
//!
//! Must not start Docker or touch the machine's shared Postgres and Redis. Which binary a service
//! runs comes from its `build.dockerfile` (docker/server.Dockerfile: trainq-server,
//! docker/worker.Dockerfile: trainq-worker); `image: postgres:*` and `image: redis:*` are the
//! private servers.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use proto::v1::job_service_client::JobServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::locate::{binary, shared_data_dir, workspace_root};
use crate::proc::{free_port, Proc};
use crate::services::{PrivatePostgres, PrivateRedis};

/// The coordinator's web UI address in the compose file.
const WEB_UI_LISTEN: &str = "0.0.0.0:8080";

/// A parsed compose file.
#[derive(Debug, Clone)]
pub struct ComposeFile {
    pub path: PathBuf,
    services: BTreeMap<String, serde_yaml::Value>,
}

impl ComposeFile {
    /// The repository's docker-compose.yml.
    pub fn workspace() -> anyhow::Result<Self> {
        Self::load(&workspace_root().join("docker-compose.yml"))
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text, path)
    }

    /// Parses compose YAML; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> anyhow::Result<Self> {
        let doc: serde_yaml::Value =
            serde_yaml::from_str(text).with_context(|| format!("parsing {}", path.display()))?;
        let services = doc
            .get("services")
            .and_then(|s| s.as_mapping())
            .ok_or_else(|| anyhow!("{} has no services: mapping", path.display()))?;
        let services = services
            .iter()
            .map(|(k, v)| {
                let name = k
                    .as_str()
                    .ok_or_else(|| anyhow!("a service name is not a string: {k:?}"))?;
                Ok((name.to_string(), v.clone()))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            path: path.to_path_buf(),
            services,
        })
    }

    /// Every service's name, sorted.
    pub fn service_names(&self) -> Vec<String> {
        self.services.keys().cloned().collect()
    }

    pub fn service(&self, name: &str) -> anyhow::Result<Service<'_>> {
        let (name, raw) = self
            .services
            .get_key_value(name)
            .ok_or_else(|| anyhow!("no service {name:?} in {}", self.path.display()))?;
        Ok(Service { name, raw })
    }
}

/// One service of a [`ComposeFile`]. The accessors taking `vars` interpolate `${...}` with them
/// (the variables of the shell or .env that `docker compose` would see).
#[derive(Debug, Clone, Copy)]
pub struct Service<'a> {
    pub name: &'a str,
    raw: &'a serde_yaml::Value,
}

impl Service<'_> {
    /// `environment:` (a mapping or a list of `KEY=VALUE`), interpolated. Scalars become strings
    /// (`true`, `3`); a key without a value takes the variable of the same name, as in Compose.
    pub fn environment(
        &self,
        vars: &HashMap<String, String>,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        let mut env = BTreeMap::new();
        let Some(raw) = self.raw.get("environment") else {
            return Ok(env);
        };
        let ctx = |k: &str| format!("service {} environment {k}", self.name);
        match raw {
            serde_yaml::Value::Mapping(map) => {
                for (k, v) in map {
                    let key = scalar(k).ok_or_else(|| anyhow!("bad environment key {k:?}"))?;
                    let value = match v {
                        serde_yaml::Value::Null => match vars.get(&key) {
                            Some(v) => v.clone(),
                            None => continue,
                        },
                        v => {
                            let s =
                                scalar(v).ok_or_else(|| anyhow!("{}: not a scalar", ctx(&key)))?;
                            interpolate(&s, vars).with_context(|| ctx(&key))?
                        }
                    };
                    env.insert(key, value);
                }
            }
            serde_yaml::Value::Sequence(items) => {
                for item in items {
                    let s = scalar(item).ok_or_else(|| anyhow!("bad environment item {item:?}"))?;
                    let s = interpolate(&s, vars).with_context(|| ctx(&s))?;
                    match s.split_once('=') {
                        Some((k, v)) => {
                            env.insert(k.to_string(), v.to_string());
                        }
                        None => {
                            if let Some(v) = vars.get(&s) {
                                env.insert(s.clone(), v.clone());
                            }
                        }
                    }
                }
            }
            other => bail!("service {}: environment is {other:?}", self.name),
        }
        Ok(env)
    }

    /// The healthcheck's command as argv: `["CMD", args...]` gives the args, `["CMD-SHELL", s]`
    /// and a plain string give `sh -c s`; none (or `["NONE"]`, or `disable: true`) is `None`.
    pub fn healthcheck(
        &self,
        vars: &HashMap<String, String>,
    ) -> anyhow::Result<Option<Vec<String>>> {
        let Some(hc) = self.raw.get("healthcheck") else {
            return Ok(None);
        };
        if hc.get("disable").and_then(|d| d.as_bool()) == Some(true) {
            return Ok(None);
        }
        let Some(test) = hc.get("test") else {
            return Ok(None);
        };
        let argv = self.argv(test, vars, "healthcheck test")?;
        match argv.first().map(String::as_str) {
            Some("NONE") | None => Ok(None),
            Some("CMD") => Ok(Some(argv[1..].to_vec())),
            Some("CMD-SHELL") => Ok(Some(vec!["sh".into(), "-c".into(), argv[1..].join(" ")])),
            Some(_) if matches!(test, serde_yaml::Value::String(_)) => {
                Ok(Some(vec!["sh".into(), "-c".into(), argv.join(" ")]))
            }
            Some(other) => bail!(
                "service {}: healthcheck test starts with {other:?}, not CMD, CMD-SHELL or NONE",
                self.name
            ),
        }
    }

    /// `command:` as argv (a list, or a string split on whitespace), interpolated; `None` when
    /// the service has none (the image's default command runs).
    pub fn command(&self, vars: &HashMap<String, String>) -> anyhow::Result<Option<Vec<String>>> {
        match self.raw.get("command") {
            None | Some(serde_yaml::Value::Null) => Ok(None),
            Some(c) => Ok(Some(self.argv(c, vars, "command")?)),
        }
    }

    /// `profiles:`; a service with any runs only when one of them is enabled.
    pub fn profiles(&self) -> Vec<String> {
        self.sequence("profiles")
    }

    /// `image:`, interpolated.
    pub fn image(&self, vars: &HashMap<String, String>) -> anyhow::Result<Option<String>> {
        self.raw
            .get("image")
            .and_then(scalar)
            .map(|s| interpolate(&s, vars))
            .transpose()
    }

    /// `build.dockerfile` (or `None` for a service built from no Dockerfile of ours).
    pub fn dockerfile(&self) -> Option<String> {
        self.raw
            .get("build")
            .and_then(|b| b.get("dockerfile"))
            .and_then(scalar)
    }

    /// `ports:` in the short form (`[HOST_IP:]HOST_PORT:CONTAINER_PORT`), interpolated.
    pub fn ports(&self, vars: &HashMap<String, String>) -> anyhow::Result<Vec<String>> {
        self.sequence("ports")
            .iter()
            .map(|p| interpolate(p, vars).with_context(|| format!("service {} ports", self.name)))
            .collect()
    }

    /// `volumes:` in the short form `source:target[:mode]`, as (source, target) pairs.
    pub fn volumes(&self) -> Vec<(String, String)> {
        self.sequence("volumes")
            .into_iter()
            .filter_map(|v| {
                let mut parts = v.splitn(3, ':');
                Some((parts.next()?.to_string(), parts.next()?.to_string()))
            })
            .collect()
    }

    fn sequence(&self, key: &str) -> Vec<String> {
        self.raw
            .get(key)
            .and_then(|p| p.as_sequence())
            .map(|s| s.iter().filter_map(scalar).collect())
            .unwrap_or_default()
    }

    fn argv(
        &self,
        value: &serde_yaml::Value,
        vars: &HashMap<String, String>,
        what: &str,
    ) -> anyhow::Result<Vec<String>> {
        let items: Vec<String> = match value {
            serde_yaml::Value::Sequence(items) => items
                .iter()
                .map(|i| scalar(i).ok_or_else(|| anyhow!("{what}: {i:?} is not a scalar")))
                .collect::<anyhow::Result<_>>()?,
            serde_yaml::Value::String(s) => s.split_whitespace().map(String::from).collect(),
            other => bail!("service {}: {what} is {other:?}", self.name),
        };
        items
            .iter()
            .map(|s| interpolate(s, vars).with_context(|| format!("service {} {what}", self.name)))
            .collect()
    }
}

fn scalar(v: &serde_yaml::Value) -> Option<String> {
    match v {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Compose's variable interpolation: `$$` is a literal `$`; `${VAR}` and `$VAR` the variable
/// (empty when unset); `${VAR:-default}` the default when unset or empty, `${VAR-default}` when
/// unset; `${VAR:?message}` / `${VAR?message}` an error when unset (or empty, with `:`);
/// `${VAR:+alt}` / `${VAR+alt}` alt when set (and not empty, with `:`). Defaults may hold
/// further `${...}`.
pub fn interpolate(text: &str, vars: &HashMap<String, String>) -> anyhow::Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            // The matching brace, counting nested ${...} in defaults.
            let mut depth = 1;
            let mut end = None;
            for (j, c) in r.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            end = Some(j);
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let end = end.ok_or_else(|| anyhow!("unclosed ${{ in {text:?}"))?;
            out.push_str(&expand(&r[..end], vars, text)?);
            rest = &r[end + 1..];
        } else {
            let len = rest
                .char_indices()
                .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_'))
                .map_or(rest.len(), |(j, _)| j);
            if len == 0 {
                out.push('$');
            } else {
                out.push_str(vars.get(&rest[..len]).map_or("", String::as_str));
            }
            rest = &rest[len..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The inside of one `${...}`.
fn expand(inner: &str, vars: &HashMap<String, String>, text: &str) -> anyhow::Result<String> {
    let name_len = inner
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_'))
        .map_or(inner.len(), |(j, _)| j);
    let (name, op) = inner.split_at(name_len);
    if name.is_empty() {
        bail!("bad variable ${{{inner}}} in {text:?}");
    }
    let value = vars.get(name);
    let (colon, op) = match op.strip_prefix(':') {
        Some(o) => (true, o),
        None => (false, op),
    };
    let set = match value {
        Some(v) => !(colon && v.is_empty()),
        None => false,
    };
    let Some(kind) = op.chars().next() else {
        if colon {
            bail!("bad variable ${{{inner}}} in {text:?}");
        }
        return Ok(value.cloned().unwrap_or_default());
    };
    let arg = &op[1..];
    match kind {
        '-' if set => Ok(value.cloned().unwrap_or_default()),
        '-' => interpolate(arg, vars),
        '?' if set => Ok(value.cloned().unwrap_or_default()),
        '?' => bail!(
            "required variable {name} is missing: {}",
            interpolate(arg, vars)?
        ),
        '+' if set => interpolate(arg, vars),
        '+' => Ok(String::new()),
        _ => bail!("bad variable ${{{inner}}} in {text:?}"),
    }
}

/// What a [`ComposeStack`] runs, and with which variables.
#[derive(Debug, Clone)]
pub struct ComposeOptions {
    /// The variables `${...}` see (the shell or .env of `docker compose`); not the test
    /// process's environment, which the started binaries do not inherit.
    pub vars: HashMap<String, String>,
    /// The services to run, in start order among those of the same kind; Postgres and Redis
    /// services start first, then the coordinator (waited for until its healthcheck passes),
    /// then the workers. Profiles are not consulted: naming a service runs it.
    pub services: Vec<String>,
    /// What the `datasets` volume (the workers' `/data`) is: by default the shared real MNIST.
    pub data_dir: PathBuf,
    /// How long the coordinator's healthcheck may take to pass.
    pub healthy_within: Duration,
}

impl ComposeOptions {
    /// The given services, the shared MNIST as /data, and one variable: a fresh
    /// `POSTGRES_PASSWORD` (which the file requires, as the `.env` its first line makes would
    /// give it); every other setting is the file's default.
    pub fn services(services: &[&str]) -> Self {
        let password = format!("pw{}", uuid::Uuid::new_v4().simple());
        Self {
            vars: HashMap::from([("POSTGRES_PASSWORD".to_string(), password)]),
            services: services.iter().map(|s| s.to_string()).collect(),
            data_dir: shared_data_dir(),
            healthy_within: Duration::from_secs(60),
        }
    }

    /// Sets one `${...}` variable.
    pub fn var(mut self, name: &str, value: &str) -> Self {
        self.vars.insert(name.into(), value.into());
        self
    }
}

/// Adds `authorization: Bearer <token>` to every request of [`ComposeStack::client`].
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// A JobService client that sends the compose client token.
pub type AuthedClient = JobServiceClient<InterceptedService<Channel, Bearer>>;

/// One started service: the environment it got (after interpolation and rewriting) and its
/// process (`None` for Postgres and Redis, which are [`ComposeStack::postgres`] and `redis`).
pub struct StartedService {
    pub name: String,
    pub env: BTreeMap<String, String>,
    pub proc: Option<Proc>,
}

/// The trainq services of docker-compose.yml running as local processes (see the module docs).
/// Dropping it kills the processes and removes the private servers and temp dir.
pub struct ComposeStack {
    /// Started services in start order.
    pub started: Vec<StartedService>,
    pub postgres: PrivatePostgres,
    pub redis: PrivateRedis,
    /// Logs, the artifacts volume and other volumes live here.
    pub dir: tempfile::TempDir,
    rewrites: Vec<(String, String)>,
    healthcheck: Option<Vec<String>>,
    grpc_port: u16,
    coordinator: String,
    /// The `${...}` variables the stack was started with.
    vars: HashMap<String, String>,
}

impl ComposeStack {
    /// Starts `opts.services` of `file` (see [`ComposeOptions`]); returns once the coordinator's
    /// compose healthcheck passes and every worker has been spawned.
    pub async fn start(file: &ComposeFile, opts: ComposeOptions) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("trainq-compose-")
            .tempdir()
            .context("temp dir for the compose stack")?;
        let postgres = PrivatePostgres::start_new().context("the private postgres")?;
        let redis = PrivateRedis::start_new().context("the private redis")?;
        let grpc_port = free_port();

        // Classify the services before starting anything.
        let mut coordinator = None;
        let mut workers = Vec::new();
        for name in &opts.services {
            let service = file.service(name)?;
            match kind(&service, &opts.vars)? {
                Kind::Coordinator if coordinator.is_some() => {
                    bail!("two coordinator services: {name} and {coordinator:?}")
                }
                Kind::Coordinator => coordinator = Some(name.clone()),
                Kind::Worker => workers.push(name.clone()),
                Kind::Postgres | Kind::Redis => {}
            }
        }
        let coordinator = coordinator.ok_or_else(|| anyhow!("no coordinator service to run"))?;

        // Compose service addresses and the containers' own listen addresses.
        let local = |port: u16| format!("127.0.0.1:{port}");
        let mut rewrites = vec![
            // `@postgres:5432` first, so a password in a URL is never taken for the host.
            (
                "@postgres:5432".to_string(),
                format!("@{}", local(postgres.port())),
            ),
            ("postgres:5432".to_string(), local(postgres.port())),
            ("redis:6379".to_string(), local(redis.port())),
            (format!("{coordinator}:50051"), local(grpc_port)),
            ("localhost:50051".to_string(), local(grpc_port)),
            ("0.0.0.0:50051".to_string(), local(grpc_port)),
        ];
        // Volumes: the container path becomes a folder (the data sets: opts.data_dir).
        let mut volume_paths = BTreeMap::new();
        for name in opts.services.iter() {
            for (source, target) in file.service(name)?.volumes() {
                let path = if source == "datasets" {
                    opts.data_dir.clone()
                } else {
                    dir.path().join(&source)
                };
                std::fs::create_dir_all(&path)?;
                volume_paths.insert(target, path.display().to_string());
            }
        }
        rewrites.extend(volume_paths);

        let mut stack = Self {
            started: Vec::new(),
            postgres,
            redis,
            dir,
            rewrites,
            healthcheck: None,
            grpc_port,
            coordinator: coordinator.clone(),
            vars: opts.vars.clone(),
        };
        for name in &opts.services {
            let service = file.service(name)?;
            if matches!(kind(&service, &opts.vars)?, Kind::Postgres | Kind::Redis) {
                stack.started.push(StartedService {
                    name: name.clone(),
                    env: BTreeMap::new(),
                    proc: None,
                });
            }
        }

        let service = file.service(&coordinator)?;
        let env = stack.service_env(&service, &opts.vars, &["0.0.0.0:9091", WEB_UI_LISTEN])?;
        let args = service.command(&opts.vars)?.unwrap_or_default();
        let proc = stack.spawn(&coordinator, "trainq-server", &args, &env)?;
        let healthcheck = service
            .healthcheck(&opts.vars)?
            .map(|argv| argv.iter().map(|a| stack.rewrite(a)).collect());
        stack.healthcheck = healthcheck;
        stack.started.push(StartedService {
            name: coordinator.clone(),
            env,
            proc: Some(proc),
        });
        stack.wait_healthy(opts.healthy_within).await?;

        for name in &workers {
            let service = file.service(name)?;
            let env = stack.service_env(&service, &opts.vars, &["0.0.0.0:9092"])?;
            let args = service.command(&opts.vars)?.unwrap_or_default();
            let proc = stack.spawn(name, "trainq-worker", &args, &env)?;
            stack.started.push(StartedService {
                name: name.clone(),
                env,
                proc: Some(proc),
            });
        }
        Ok(stack)
    }

    /// A value of the compose file as the local stack uses it: service addresses and container
    /// paths replaced (see the module docs). Exact paths and `path/...` are rewritten, and URLs
    /// such as `file:///artifacts`; other text is returned unchanged.
    pub fn rewrite(&self, value: &str) -> String {
        let mut out = value.to_string();
        for (from, to) in &self.rewrites {
            if from.starts_with('/') {
                if out == *from || out.starts_with(&format!("{from}/")) {
                    out = format!("{to}{}", &out[from.len()..]);
                } else if let Some(rest) = out.strip_prefix(&format!("file://{from}")) {
                    if rest.is_empty() || rest.starts_with('/') {
                        out = format!("file://{to}{rest}");
                    }
                }
            } else {
                out = out.replace(from.as_str(), to);
            }
        }
        out
    }

    /// The coordinator's gRPC address, `http://127.0.0.1:<port>`.
    pub fn server_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// The coordinator's gRPC `host:port` (for grpcurl).
    pub fn grpc_addr(&self) -> String {
        format!("127.0.0.1:{}", self.grpc_port)
    }

    /// The environment a started service got (after interpolation and rewriting).
    pub fn env(&self, service: &str) -> Option<&BTreeMap<String, String>> {
        self.started
            .iter()
            .find(|s| s.name == service)
            .map(|s| &s.env)
    }

    fn coordinator_env(&self) -> &BTreeMap<String, String> {
        self.env(&self.coordinator)
            .expect("the coordinator is started in ComposeStack::start")
    }

    /// The first of the coordinator's client tokens (`TRAINQ_CLIENT_TOKENS`), or `None` with
    /// auth off.
    pub fn client_token(&self) -> Option<String> {
        first_token(self.coordinator_env().get("TRAINQ_CLIENT_TOKENS"))
    }

    /// The first of the coordinator's worker tokens (`TRAINQ_WORKER_TOKENS`).
    pub fn worker_token(&self) -> Option<String> {
        first_token(self.coordinator_env().get("TRAINQ_WORKER_TOKENS"))
    }

    /// The `POSTGRES_PASSWORD` the stack was started with (the file requires one).
    pub fn postgres_password(&self) -> Option<String> {
        self.vars.get("POSTGRES_PASSWORD").cloned()
    }

    /// The coordinator's `DATABASE_URL`, on the private Postgres (for SQL checks).
    pub fn database_url(&self) -> String {
        self.coordinator_env()
            .get("DATABASE_URL")
            .cloned()
            .unwrap_or_else(|| self.postgres.url("trainq"))
    }

    /// The process of a started trainq service (its log, pid, `kill`).
    pub fn proc(&self, service: &str) -> Option<&Proc> {
        self.started
            .iter()
            .find(|s| s.name == service)
            .and_then(|s| s.proc.as_ref())
    }

    pub fn proc_mut(&mut self, service: &str) -> Option<&mut Proc> {
        self.started
            .iter_mut()
            .find(|s| s.name == service)
            .and_then(|s| s.proc.as_mut())
    }

    /// The coordinator's compose healthcheck as run here (argv, after rewriting; the first
    /// word `trainq` is the built CLI).
    pub fn healthcheck_argv(&self) -> Option<&[String]> {
        self.healthcheck.as_deref()
    }

    /// Runs the coordinator's compose healthcheck once; its output (check `.status.success()`).
    pub fn run_healthcheck(&self) -> anyhow::Result<std::process::Output> {
        let argv = self
            .healthcheck
            .as_ref()
            .ok_or_else(|| anyhow!("the coordinator service has no healthcheck"))?;
        let program = match argv[0].as_str() {
            "trainq" => binary("trainq"),
            other => PathBuf::from(other),
        };
        Command::new(program)
            .args(&argv[1..])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .output()
            .with_context(|| format!("running the healthcheck {argv:?}"))
    }

    /// A JobService client sending the compose client token (auth is on in the compose file).
    pub async fn client(&self) -> anyhow::Result<AuthedClient> {
        let token = self
            .client_token()
            .ok_or_else(|| anyhow!("the coordinator has no client token (auth off)"))?;
        let value = format!("Bearer {token}")
            .parse::<MetadataValue<Ascii>>()
            .context("the client token is not ASCII")?;
        let channel = Channel::from_shared(self.server_url())?.connect().await?;
        Ok(JobServiceClient::with_interceptor(channel, Bearer(value)))
    }

    /// A JobService client without a token.
    pub async fn anonymous_client(&self) -> anyhow::Result<JobServiceClient<Channel>> {
        Ok(JobServiceClient::connect(self.server_url()).await?)
    }

    /// The interpolated environment with addresses and paths rewritten; each of the file's HTTP
    /// listen addresses in `listens` (Prometheus metrics, the web UI) gets a free port of its own.
    fn service_env(
        &self,
        service: &Service<'_>,
        vars: &HashMap<String, String>,
        listens: &[&str],
    ) -> anyhow::Result<BTreeMap<String, String>> {
        let free: HashMap<&str, String> = listens
            .iter()
            .map(|l| (*l, format!("127.0.0.1:{}", free_port())))
            .collect();
        Ok(service
            .environment(vars)?
            .into_iter()
            .map(|(k, v)| {
                let v = match free.get(v.as_str()) {
                    Some(port) => port.clone(),
                    None => self.rewrite(&v),
                };
                (k, v)
            })
            .collect())
    }

    /// Starts a binary with exactly `env` (plus PATH, so it can find programs; nothing else of
    /// the test's environment, e.g. no DATABASE_URL, leaks in).
    fn spawn(
        &self,
        name: &str,
        bin: &str,
        args: &[String],
        env: &BTreeMap<String, String>,
    ) -> anyhow::Result<Proc> {
        let mut cmd = Command::new(binary(bin));
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env)
            .current_dir(self.dir.path());
        Proc::spawn(name, cmd, self.dir.path())
    }

    async fn wait_healthy(&mut self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let coordinator = self.coordinator.clone();
        loop {
            let out = self.run_healthcheck()?;
            if out.status.success() {
                return Ok(());
            }
            let proc = self
                .proc_mut(&coordinator)
                .expect("the coordinator was spawned");
            if !proc.is_running() {
                bail!("{coordinator} exited at start:\n{}", proc.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "{coordinator} not healthy within {within:?}: {}{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    proc.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn first_token(list: Option<&String>) -> Option<String> {
    list?
        .split(',')
        .map(str::trim)
        .find(|t| !t.is_empty())
        .map(String::from)
}

enum Kind {
    Postgres,
    Redis,
    Coordinator,
    Worker,
}

fn kind(service: &Service<'_>, vars: &HashMap<String, String>) -> anyhow::Result<Kind> {
    match service.dockerfile().as_deref() {
        Some(d) if d.ends_with("server.Dockerfile") => return Ok(Kind::Coordinator),
        Some(d) if d.ends_with("worker.Dockerfile") => return Ok(Kind::Worker),
        _ => {}
    }
    match service.image(vars)?.as_deref() {
        Some(i) if i.starts_with("postgres") => Ok(Kind::Postgres),
        Some(i) if i.starts_with("redis") => Ok(Kind::Redis),
        other => bail!(
            "service {} (image {other:?}) is not one ComposeStack can run",
            service.name
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn interpolation_follows_compose() {
        let v = vars(&[("SET", "x"), ("EMPTY", "")]);
        let i = |s: &str| interpolate(s, &v).expect("interpolates");
        assert_eq!(i("${SET:-d}"), "x");
        assert_eq!(i("${UNSET:-d}"), "d");
        assert_eq!(i("${EMPTY:-d}"), "d");
        assert_eq!(i("${EMPTY-d}"), "");
        assert_eq!(i("${UNSET-d}"), "d");
        assert_eq!(i("a$SET-b ${SET}c"), "ax-b xc");
        assert_eq!(i("$$SET $${SET}"), "$SET ${SET}");
        assert_eq!(i("${UNSET:-${SET:-y}}/z"), "x/z");
        assert_eq!(i("${SET:+alt}${UNSET:+alt}"), "alt");
        assert_eq!(i("${UNSET}"), "");
        assert!(interpolate("${UNSET:?needed}", &v).is_err());
        assert!(interpolate("${SET", &v).is_err());
    }

    #[test]
    fn environment_healthcheck_and_command_of_a_service() {
        let file = ComposeFile::parse(
            r#"
services:
  a:
    image: redis:7
    command: ["redis-server", "--port", "${PORT:-6379}"]
    environment:
      X: ${X:-1}
      N: 3
      FROM_SHELL:
    healthcheck:
      test: ["CMD-SHELL", "redis-cli ping"]
  b:
    image: postgres:15
    command: run it
    environment: ["K=${K:-v}", "L"]
    healthcheck:
      test: ["CMD", "pg_isready", "-U", "${U:-postgres}"]
"#,
            Path::new("inline.yml"),
        )
        .expect("parses");
        assert_eq!(file.service_names(), ["a", "b"]);
        let v = vars(&[("FROM_SHELL", "s"), ("L", "l"), ("U", "me")]);
        let a = file.service("a").expect("a");
        let env = a.environment(&v).expect("env");
        assert_eq!(env["X"], "1");
        assert_eq!(env["N"], "3");
        assert_eq!(env["FROM_SHELL"], "s");
        assert_eq!(
            a.healthcheck(&v).expect("hc"),
            Some(vec!["sh".into(), "-c".into(), "redis-cli ping".into()])
        );
        assert_eq!(
            a.command(&v).expect("cmd"),
            Some(vec!["redis-server".into(), "--port".into(), "6379".into()])
        );
        let b = file.service("b").expect("b");
        let env = b.environment(&v).expect("env");
        assert_eq!((env["K"].as_str(), env["L"].as_str()), ("v", "l"));
        assert_eq!(
            b.healthcheck(&v).expect("hc"),
            Some(vec!["pg_isready".into(), "-U".into(), "me".into()])
        );
        assert_eq!(
            b.command(&v).expect("cmd"),
            Some(vec!["run".into(), "it".into()])
        );
        assert!(file.service("c").is_err());
    }
}
