//! deploy/kubernetes, checked offline (no cluster): `kubectl kustomize` renders the base and
//! every overlay; kubernetes-validate (strict, the schemas of one fixed Kubernetes version)
//! accepts every built-in object; the KEDA ScaledObject, a custom resource outside those schemas,
//! is checked here (it scales the rendered worker Deployment, on metrics and labels the
//! coordinator really exports, for the queues the workers serve); and the manifests run what
//! docker-compose.yml runs: the same images and commands, every environment variable of the
//! compose services with the same value (tokens and passwords from Secrets instead, addresses
//! naming the cluster's Services), the same ports and the same gRPC health check. No token,
//! password or Secret object is in any manifest, and the workers' grace period outlasts a
//! hand-back.
//!
//! kubectl (its built-in kustomize) or kubernetes-validate missing is a loud failure naming the
//! fix (scripts/setup.sh installs kubernetes-validate), never a skip.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use proto::state::JobState;
use serde_yaml::Value;
use tests::compose::ComposeFile;
use tests::{kubectl, kubernetes_validate, workspace_root};

/// The Kubernetes version whose schemas every object must pass (native gRPC probes are GA since
/// 1.27; managed clusters still run 1.30).
const KUBERNETES_VERSION: &str = "1.30.0";

/// Custom resources, which the Kubernetes schemas do not know: checked by the tests below.
const CUSTOM_KINDS: &[(&str, &str)] = &[("keda.sh/v1alpha1", "ScaledObject")];

/// The compose file's default tokens, for a first try on a private machine only.
const COMPOSE_DEFAULT_TOKENS: [&str; 2] = ["change-me-client", "change-me-worker"];

/// What the compose checks give the file's required POSTGRES_PASSWORD; a value containing it is
/// a secret.
const MARKER_PASSWORD: &str = "marker-password-0123abcd";

/// The README's documented minimum for the workers' terminationGracePeriodSeconds: a stop that
/// lands in an epoch's end (evaluation, checkpoint, sample grid on a CPU: tens of seconds) and
/// then the training state's upload and ReleaseJob.
const WORKER_GRACE_MIN_S: i64 = 120;

/// The most a coordinator's grace may be: it only drains calls and ends watch streams.
const COORDINATOR_GRACE_MAX_S: i64 = 60;

const COORDINATOR: &str = "trainq-coordinator";
const WORKER: &str = "trainq-worker";

fn kube_dir() -> PathBuf {
    workspace_root().join("deploy/kubernetes")
}

/// Every overlay directory (a folder of overlays/ with a kustomization.yaml), sorted.
fn overlays() -> Vec<PathBuf> {
    let dir = kube_dir().join("overlays");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.join("kustomization.yaml").is_file())
        .collect();
    found.sort();
    assert!(
        !found.is_empty(),
        "no overlay (a folder with a kustomization.yaml) under {}",
        dir.display()
    );
    found
}

/// What `kubectl kustomize` made of one kustomization.
struct Rendered {
    /// `base` or `overlays/NAME`.
    name: String,
    text: String,
    objects: Vec<Value>,
}

impl Rendered {
    fn of(dir: &Path) -> Self {
        let name = dir
            .strip_prefix(kube_dir())
            .expect("under deploy/kubernetes")
            .display()
            .to_string();
        let out = Command::new(kubectl())
            .arg("kustomize")
            .arg(dir)
            .output()
            .expect("running kubectl kustomize");
        assert!(
            out.status.success(),
            "kubectl kustomize {name} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).expect("UTF-8 manifests");
        let objects: Vec<Value> = split_documents(&text)
            .iter()
            .map(|doc| {
                serde_yaml::from_str(doc)
                    .unwrap_or_else(|e| panic!("{name}: a rendered object is not YAML: {e}"))
            })
            .collect();
        assert!(!objects.is_empty(), "{name} renders no object");
        for o in &objects {
            assert!(
                o["apiVersion"].is_string() && o["kind"].is_string() && name_of(o).is_some(),
                "{name}: an object without apiVersion, kind or name: {o:?}"
            );
        }
        Self {
            name,
            text,
            objects,
        }
    }

    fn get(&self, kind: &str, name: &str) -> Option<&Value> {
        self.objects
            .iter()
            .find(|o| o["kind"].as_str() == Some(kind) && name_of(o) == Some(name))
    }

    fn deployment(&self, name: &str) -> &Value {
        self.get("Deployment", name)
            .unwrap_or_else(|| panic!("{}: no Deployment {name}", self.name))
    }

    fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.objects
            .iter()
            .filter(|o| o["kind"].as_str() == Some(kind))
            .collect()
    }

    /// The ConfigMap named `name` (its rendered name, hash suffix included) holds `key`.
    fn config_value(&self, name: &str, key: &str) -> String {
        let map = self.get("ConfigMap", name).unwrap_or_else(|| {
            panic!(
                "{}: a configMapKeyRef names {name}, not rendered",
                self.name
            )
        });
        map["data"][key]
            .as_str()
            .unwrap_or_else(|| panic!("{}: ConfigMap {name} has no key {key}", self.name))
            .to_string()
    }
}

/// kustomize's output: documents separated by `---` lines (block scalars are indented, so no
/// such line is inside one).
fn split_documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        if line == "---" {
            docs.push(String::new());
        } else {
            let doc = docs.last_mut().expect("one document");
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs.retain(|d| !d.trim().is_empty());
    docs
}

fn name_of(o: &Value) -> Option<&str> {
    o["metadata"]["name"].as_str()
}

fn is_custom(o: &Value) -> bool {
    CUSTOM_KINDS.iter().any(|(api, kind)| {
        o["apiVersion"].as_str() == Some(api) && o["kind"].as_str() == Some(kind)
    })
}

fn base_and_overlays() -> Vec<Rendered> {
    std::iter::once(kube_dir().join("base"))
        .chain(overlays())
        .map(|d| Rendered::of(&d))
        .collect()
}

fn rendered_overlays() -> Vec<Rendered> {
    overlays().iter().map(|d| Rendered::of(d)).collect()
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    pod_spec(workload)["containers"]
        .as_sequence()
        .and_then(|cs| cs.iter().find(|c| c["name"].as_str() == Some(name)))
        .unwrap_or_else(|| panic!("no container {name} in {:?}", name_of(workload)))
}

/// Where a container's environment variable comes from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    /// `value:`, or a `configMapKeyRef` resolved against the rendered ConfigMap.
    Value(String),
    Secret {
        name: String,
        key: String,
    },
    Other(String),
}

fn env_of(r: &Rendered, c: &Value) -> BTreeMap<String, Source> {
    let mut env = BTreeMap::new();
    for e in c["env"].as_sequence().into_iter().flatten() {
        let name = e["name"].as_str().expect("env name").to_string();
        let source = if let Some(v) = e.get("value") {
            Source::Value(v.as_str().expect("env values are strings").to_string())
        } else if let Some(s) = e["valueFrom"].get("secretKeyRef") {
            Source::Secret {
                name: s["name"].as_str().expect("secret name").to_string(),
                key: s["key"].as_str().expect("secret key").to_string(),
            }
        } else if let Some(m) = e["valueFrom"].get("configMapKeyRef") {
            Source::Value(r.config_value(
                m["name"].as_str().expect("configmap name"),
                m["key"].as_str().expect("configmap key"),
            ))
        } else {
            Source::Other(format!("{:?}", e["valueFrom"]))
        };
        assert!(
            env.insert(name.clone(), source).is_none(),
            "{}: {name} is set twice in container {:?}",
            r.name,
            c["name"]
        );
    }
    env
}

fn literal(env: &BTreeMap<String, Source>, name: &str, what: &str) -> String {
    match env.get(name) {
        Some(Source::Value(v)) => v.clone(),
        other => panic!("{what}: {name} is {other:?}, not a value"),
    }
}

/// The port of `HOST:PORT` or of a URL's authority.
fn port_of(addr: &str) -> u16 {
    let authority = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    let authority = authority.split('/').next().unwrap_or(authority);
    let port = authority.rsplit_once(':').map(|(_, p)| p).unwrap_or("");
    port.parse()
        .unwrap_or_else(|_| panic!("no port in address {addr:?}"))
}

/// `(scheme, host, port)` of a URL such as `http://coordinator:50051`.
fn url_parts(url: &str) -> (String, String, Option<u16>) {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    match authority.rsplit_once(':') {
        Some((host, port)) => (
            scheme.into(),
            host.into(),
            Some(port.parse().expect("a numeric port")),
        ),
        None => (scheme.into(), authority.into(), None),
    }
}

/// The repository of an image reference (`registry/name:tag` -> `registry/name`).
fn repository(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match image.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => image,
    }
}

fn container_ports(c: &Value) -> BTreeSet<u16> {
    c["ports"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|p| p["containerPort"].as_u64().expect("containerPort") as u16)
        .collect()
}

fn argv(v: &Value) -> Option<Vec<String>> {
    v.as_sequence().map(|s| {
        s.iter()
            .map(|a| a.as_str().expect("argv items are strings").to_string())
            .collect()
    })
}

/// Compose durations as this file writes them: `5s`, `2m`, `1m30s`.
fn seconds(duration: &str) -> i64 {
    let mut total = 0;
    let mut number = String::new();
    for ch in duration.chars() {
        match ch {
            '0'..='9' => number.push(ch),
            'h' | 'm' | 's' => {
                let n: i64 = number.parse().expect("a number before the unit");
                total += n * match ch {
                    'h' => 3600,
                    'm' => 60,
                    _ => 1,
                };
                number.clear();
            }
            other => panic!("unexpected {other:?} in duration {duration:?}"),
        }
    }
    assert!(number.is_empty(), "a duration without unit: {duration:?}");
    total
}

/// docker-compose.yml as plain YAML, for the keys tests::compose does not read (healthcheck
/// timing, `deploy:`).
fn compose_yaml() -> Value {
    let path = workspace_root().join("docker-compose.yml");
    serde_yaml::from_str(&std::fs::read_to_string(&path).expect("docker-compose.yml"))
        .expect("docker-compose.yml is YAML")
}

fn compose_vars() -> HashMap<String, String> {
    HashMap::from([("POSTGRES_PASSWORD".to_string(), MARKER_PASSWORD.to_string())])
}

fn is_secret_value(value: &str) -> bool {
    value.contains(MARKER_PASSWORD) || COMPOSE_DEFAULT_TOKENS.iter().any(|t| value.contains(t))
}

/// A probe has the timing of a compose healthcheck: interval, timeout, retries.
fn assert_probe_timing(probe: &Value, healthcheck: &Value, what: &str) {
    assert_eq!(
        probe["periodSeconds"].as_i64(),
        Some(seconds(healthcheck["interval"].as_str().expect("interval"))),
        "{what}: periodSeconds is not the compose healthcheck's interval"
    );
    assert_eq!(
        probe["timeoutSeconds"].as_i64(),
        Some(seconds(healthcheck["timeout"].as_str().expect("timeout"))),
        "{what}: timeoutSeconds is not the compose healthcheck's timeout"
    );
    assert_eq!(
        probe["failureThreshold"].as_i64(),
        healthcheck["retries"].as_i64(),
        "{what}: failureThreshold is not the compose healthcheck's retries"
    );
}

/// A Service of `r` named `name` that selects the pods of `workload` and serves `port`, which it
/// sends to one of `container`'s ports.
fn assert_service_reaches(r: &Rendered, name: &str, port: u16, workload: &Value, c: &Value) {
    let svc = r
        .get("Service", name)
        .unwrap_or_else(|| panic!("{}: no Service {name}", r.name));
    let labels = &workload["spec"]["template"]["metadata"]["labels"];
    let selector = svc["spec"]["selector"]
        .as_mapping()
        .unwrap_or_else(|| panic!("{}: Service {name} has no selector", r.name));
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(
            &labels[k.as_str().expect("label")],
            v,
            "{}: Service {name} does not select the pods of {:?}",
            r.name,
            name_of(workload)
        );
    }
    let svc_port = svc["spec"]["ports"]
        .as_sequence()
        .and_then(|ps| ps.iter().find(|p| p["port"].as_u64() == Some(port.into())))
        .unwrap_or_else(|| panic!("{}: Service {name} has no port {port}", r.name));
    let target = &svc_port["targetPort"];
    let reaches = c["ports"].as_sequence().into_iter().flatten().any(|p| {
        if let Some(n) = target.as_str() {
            p["name"].as_str() == Some(n)
        } else {
            p["containerPort"] == *target
        }
    });
    assert!(
        reaches,
        "{}: Service {name} port {port} targets {target:?}, not a port of container {:?}",
        r.name, c["name"]
    );
}

#[test]
fn kubectl_kustomize_renders_the_base_and_every_overlay() {
    let names: Vec<String> = overlays()
        .iter()
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    for wanted in ["cpu", "gpu", "dev"] {
        assert!(
            names.iter().any(|n| n == wanted),
            "no overlay {wanted}: {names:?}"
        );
    }
    for r in base_and_overlays() {
        let coordinator = r.deployment(COORDINATOR);
        container(coordinator, "coordinator");
        container(r.deployment(WORKER), "worker");
        let mut seen = BTreeSet::new();
        for o in &r.objects {
            let key = (o["kind"].as_str(), name_of(o));
            assert!(seen.insert(key), "{}: {key:?} is rendered twice", r.name);
        }
    }
}

#[test]
fn every_rendered_object_passes_the_kubernetes_schemas() {
    let validator = kubernetes_validate();
    let scratch = tempfile::tempdir().expect("temp dir");
    let mut custom = 0;
    for r in base_and_overlays() {
        // kustomize's own text (not re-serialised: YAML 1.1 readers take `no` for false).
        let docs = split_documents(&r.text);
        assert_eq!(docs.len(), r.objects.len());
        let builtin: Vec<&str> = docs
            .iter()
            .zip(&r.objects)
            .filter(|(_, o)| !is_custom(o))
            .map(|(d, _)| d.as_str())
            .collect();
        custom += docs.len() - builtin.len();
        let file = scratch
            .path()
            .join(format!("{}.yaml", r.name.replace('/', "-")));
        std::fs::write(&file, builtin.join("---\n")).expect("write manifests");
        let out = Command::new(&validator)
            .args(["--strict", "-k", KUBERNETES_VERSION])
            .arg(&file)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", validator.display()));
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "{}: kubernetes-validate --strict -k {KUBERNETES_VERSION} failed:\n{report}",
            r.name
        );
        // An unknown kind or apiVersion is only a warning to the tool.
        assert!(
            !report.contains("WARN") && !report.contains("ERROR"),
            "{}: kubernetes-validate warned:\n{report}",
            r.name
        );
        let passed = report.matches(" passed for resource ").count();
        assert_eq!(
            passed,
            builtin.len(),
            "{}: {} objects sent, {passed} passed:\n{report}",
            r.name,
            builtin.len()
        );
    }
    assert!(
        custom > 0,
        "no custom resource rendered: components/keda is unused"
    );
}

/// The metric names of server/src/metrics.rs, each with the labels it is declared with.
fn coordinator_metrics() -> BTreeMap<String, BTreeSet<String>> {
    let path = workspace_root().join("server/src/metrics.rs");
    let source = std::fs::read_to_string(&path).expect("server/src/metrics.rs");
    let starts: Vec<usize> = source.match_indices("\"trainq_").map(|(i, _)| i).collect();
    let mut metrics = BTreeMap::new();
    for (n, &start) in starts.iter().enumerate() {
        let rest = &source[start + 1..];
        let name = &rest[..rest.find('"').expect("closing quote")];
        // The labels: a `&[...]` in its declaration, before the next metric's name.
        let next = starts.get(n + 1).copied().unwrap_or(source.len());
        let declared = source[start..]
            .find(".expect(")
            .map_or(source.len(), |i| start + i);
        let block = &source[start..next.min(declared)];
        let labels = block
            .find("&[")
            .map(|i| {
                let list = &block[i + 2..];
                let list = &list[..list.find(']').expect("closing bracket")];
                list.split(',')
                    .map(|l| l.trim().trim_matches('"').to_string())
                    .filter(|l| !l.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        metrics.insert(name.to_string(), labels);
    }
    assert!(
        metrics.contains_key("trainq_queue_depth"),
        "server/src/metrics.rs names no trainq_queue_depth: {metrics:?}"
    );
    metrics
}

/// Each `trainq_*{...}` selector of a PromQL query: the metric and its label matchers (label,
/// the values an `=` or `=~` alternation allows).
/// Label matchers of one selector: (label, the values it allows).
type Matchers = Vec<(String, BTreeSet<String>)>;

fn selectors(query: &str) -> Vec<(String, Matchers)> {
    let mut found = Vec::new();
    let mut rest = query;
    while let Some(i) = rest.find("trainq_") {
        let tail = &rest[i..];
        let len = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = tail[..len].to_string();
        let mut matchers = Vec::new();
        let after = &tail[len..];
        if let Some(inner) = after.strip_prefix('{') {
            let inner = &inner[..inner.find('}').expect("closing brace")];
            for m in inner.split(',').map(str::trim).filter(|m| !m.is_empty()) {
                let (label, value) = if let Some((l, v)) = m.split_once("=~") {
                    (l, v)
                } else {
                    m.split_once('=').expect("a label matcher")
                };
                assert!(!label.ends_with('!'), "a negative matcher in {query:?}");
                let values = value.trim().trim_matches('"').split('|');
                matchers.push((label.trim().to_string(), values.map(String::from).collect()));
            }
        }
        found.push((name, matchers));
        rest = &tail[len..];
    }
    found
}

#[test]
fn the_keda_scaled_object_scales_the_workers_on_metrics_the_coordinator_exports() {
    let metrics = coordinator_metrics();
    let states: BTreeSet<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
    let mut checked = 0;
    for r in base_and_overlays() {
        for so in r.of_kind("ScaledObject") {
            checked += 1;
            let what = format!("{} ScaledObject {:?}", r.name, name_of(so));
            assert_eq!(
                so["apiVersion"].as_str(),
                Some("keda.sh/v1alpha1"),
                "{what}"
            );
            let target = &so["spec"]["scaleTargetRef"];
            assert!(
                matches!(target["kind"].as_str(), None | Some("Deployment"))
                    && matches!(target["apiVersion"].as_str(), None | Some("apps/v1")),
                "{what}: scales {target:?}, not a Deployment"
            );
            let name = target["name"].as_str().expect("scaleTargetRef.name");
            let worker = r.deployment(name);
            container(worker, "worker");
            assert!(
                worker["spec"].get("replicas").is_none(),
                "{what}: the worker Deployment still sets spec.replicas, which every `kubectl \
                 apply` would reset KEDA's count to"
            );
            let (min, max) = (
                so["spec"]["minReplicaCount"].as_i64().unwrap_or(0),
                so["spec"]["maxReplicaCount"].as_i64().unwrap_or(100),
            );
            assert!(0 <= min && min <= max && max >= 1, "{what}: {min}..={max}");

            let env = env_of(&r, container(worker, "worker"));
            let queues: BTreeSet<String> = literal(&env, "TRAINQ_QUEUES", &what)
                .split(',')
                .map(String::from)
                .collect();
            let slots = literal(&env, "TRAINQ_SLOTS", &what);
            let triggers = so["spec"]["triggers"].as_sequence().expect("triggers");
            assert!(!triggers.is_empty(), "{what}: no trigger");
            for t in triggers {
                assert_eq!(t["type"].as_str(), Some("prometheus"), "{what}");
                let meta = &t["metadata"];
                let server = meta["serverAddress"].as_str().expect("serverAddress");
                assert!(server.starts_with("http"), "{what}: {server}");
                assert_eq!(
                    meta["threshold"].as_str(),
                    Some(slots.as_str()),
                    "{what}: the threshold (jobs per worker) is not the workers' TRAINQ_SLOTS"
                );
                let query = meta["query"].as_str().expect("query");
                let used = selectors(query);
                assert!(
                    used.iter().any(|(m, _)| m == "trainq_queue_depth"),
                    "{what}: the query does not read trainq_queue_depth: {query}"
                );
                for (metric, matchers) in &used {
                    let labels = metrics.get(metric).unwrap_or_else(|| {
                        panic!("{what}: {metric} is not a metric of server/src/metrics.rs")
                    });
                    for (label, values) in matchers {
                        assert!(
                            labels.contains(label),
                            "{what}: {metric} has no label {label} (it has {labels:?})"
                        );
                        match label.as_str() {
                            "queue" => assert_eq!(
                                values, &queues,
                                "{what}: the query's queues are not the workers' TRAINQ_QUEUES"
                            ),
                            "state" => assert!(
                                values.iter().all(|v| states.contains(v.as_str())),
                                "{what}: {values:?} are not job states {states:?}"
                            ),
                            other => panic!("{what}: unexpected label {other}"),
                        }
                    }
                    if metric == "trainq_queue_depth" {
                        assert!(
                            matchers.iter().any(|(l, _)| l == "queue"),
                            "{what}: trainq_queue_depth of every queue, not the workers' ones"
                        );
                    }
                }
            }
        }
    }
    assert!(
        checked > 0,
        "no overlay renders a ScaledObject (components/keda)"
    );
}

/// One compose service's container against its counterpart in a rendered overlay: the same
/// image repository and command, every environment variable (secrets from Secrets, addresses
/// checked by the caller), the same ports; returns the k8s environment for further checks.
struct Compared {
    env: BTreeMap<String, Source>,
    /// The compose value of each variable whose k8s value comes from a Secret.
    secrets: Vec<(String, Source)>,
    /// (name, compose value, k8s value) of the URLs, for the caller.
    urls: Vec<(String, String, String)>,
}

fn compare(r: &Rendered, compose: &ComposeFile, service: &str, c: &Value) -> Compared {
    let vars = compose_vars();
    let svc = compose.service(service).expect("compose service");
    let what = format!(
        "{}: container {:?} against compose {service}",
        r.name, c["name"]
    );
    let image = svc.image(&vars).expect("image").expect("an image");
    assert_eq!(
        repository(c["image"].as_str().expect("image")),
        repository(&image),
        "{what}: image"
    );
    // compose `command:` is the container's arguments, `entrypoint:` its command.
    assert!(
        c.get("command").is_none(),
        "{what}: compose keeps the image's entrypoint"
    );
    assert_eq!(
        argv(&c["args"]),
        svc.command(&vars).expect("command"),
        "{what}: args are not compose's command"
    );
    let env = env_of(r, c);
    let mut secrets = Vec::new();
    let mut urls = Vec::new();
    for (name, value) in svc.environment(&vars).expect("environment") {
        let k8s = env
            .get(&name)
            .unwrap_or_else(|| panic!("{what}: {name} (compose: {value:?}) is not set"));
        if is_secret_value(&value) {
            assert!(
                matches!(k8s, Source::Secret { .. }),
                "{what}: {name} carries a token or password in compose; here it is {k8s:?}, \
                 not a secretKeyRef"
            );
            secrets.push((value, k8s.clone()));
            continue;
        }
        let Source::Value(k8s) = k8s else {
            panic!("{what}: {name} is {k8s:?}; compose gives the value {value:?}")
        };
        if name == "TRAINQ_DEVICE" {
            continue; // the caller's: it depends on the overlay's GPU request
        }
        if value.contains("://") {
            urls.push((name, value, k8s.clone()));
        } else {
            assert_eq!(k8s, &value, "{what}: {name}");
        }
    }
    Compared { env, secrets, urls }
}

#[test]
fn the_manifests_run_what_docker_compose_yml_runs() {
    let compose = ComposeFile::workspace().expect("docker-compose.yml");
    let raw = compose_yaml();
    let vars = compose_vars();
    let compose_coordinator = compose.service("coordinator").expect("coordinator");
    let grpc_port = port_of(
        compose_coordinator.environment(&vars).expect("environment")["TRAINQ_LISTEN"].as_str(),
    );
    // The compose healthcheck is the gRPC health check (`trainq health --server URL`) on the
    // gRPC port: what the probes below ask too.
    let hc = compose_coordinator
        .healthcheck(&vars)
        .expect("healthcheck")
        .expect("the coordinator has a healthcheck");
    assert_eq!(hc[..2], ["trainq", "health"], "{hc:?}");
    let server = hc
        .iter()
        .skip_while(|a| *a != "--server")
        .nth(1)
        .expect("--server URL");
    assert_eq!(port_of(server), grpc_port, "the healthcheck's port: {hc:?}");
    let coordinator_hc = &raw["services"]["coordinator"]["healthcheck"];
    let start_period = seconds(
        coordinator_hc["start_period"]
            .as_str()
            .expect("start_period"),
    );

    for r in rendered_overlays() {
        // The coordinator.
        let deploy = r.deployment(COORDINATOR);
        let c = container(deploy, "coordinator");
        let coordinator = compare(&r, &compose, "coordinator", c);
        let compose_env = compose_coordinator.environment(&vars).expect("environment");
        let listen: BTreeSet<u16> = [
            "TRAINQ_LISTEN",
            "TRAINQ_HTTP_LISTEN",
            "TRAINQ_METRICS_LISTEN",
        ]
        .iter()
        .map(|v| port_of(&compose_env[*v]))
        .collect();
        let published: BTreeSet<u16> = compose_coordinator
            .ports(&vars)
            .expect("ports")
            .iter()
            .map(|p| {
                p.rsplit(':')
                    .next()
                    .expect("container port")
                    .parse()
                    .expect("port")
            })
            .collect();
        assert_eq!(listen, published, "compose publishes its listen ports");
        assert_eq!(container_ports(c), listen, "{}: coordinator ports", r.name);
        for kind in ["startupProbe", "readinessProbe", "livenessProbe"] {
            let probe = &c[kind];
            let what = format!("{}: coordinator {kind}", r.name);
            assert_eq!(
                probe["grpc"]["port"].as_u64(),
                Some(grpc_port.into()),
                "{what}: not a gRPC health probe on the gRPC port {grpc_port}: {probe:?}"
            );
            assert!(
                probe["grpc"]["service"].as_str().unwrap_or("").is_empty(),
                "{what}: `trainq health` asks about the whole server (\"\")"
            );
            if kind == "startupProbe" {
                let budget = probe["periodSeconds"].as_i64().unwrap_or(10)
                    * probe["failureThreshold"].as_i64().unwrap_or(3);
                assert!(budget >= start_period, "{what}: {budget} s < start_period");
            } else {
                assert_probe_timing(probe, coordinator_hc, &what);
            }
        }
        assert_service_reaches(&r, COORDINATOR, grpc_port, deploy, c);
        for var in ["TRAINQ_HTTP_LISTEN", "TRAINQ_METRICS_LISTEN"] {
            assert_service_reaches(
                &r,
                "trainq-coordinator-web",
                port_of(&compose_env[var]),
                deploy,
                c,
            );
        }
        let replicas = deploy["spec"]["replicas"].as_i64().unwrap_or(1);
        for (name, compose_value, value) in &coordinator.urls {
            let (scheme, _, _) = url_parts(value);
            if name == "TRAINQ_ARTIFACTS" {
                check_artifact_store(&r, deploy, c, value, replicas);
            } else {
                assert_eq!(scheme, url_parts(compose_value).0, "{}: {name}", r.name);
            }
        }

        // The workers: compose's GPU worker when they request a GPU, worker-cpu otherwise.
        let worker = r.deployment(WORKER);
        let wc = container(worker, "worker");
        let gpus = wc["resources"]["limits"]["nvidia.com/gpu"].as_i64();
        let service = if gpus.is_some() {
            "worker"
        } else {
            "worker-cpu"
        };
        let w = compare(&r, &compose, service, wc);
        let compose_worker = compose.service(service).expect("worker");
        let worker_env = compose_worker.environment(&vars).expect("environment");
        let device = literal(&w.env, "TRAINQ_DEVICE", &r.name);
        if let Some(n) = gpus {
            let reserved =
                &raw["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0];
            assert_eq!(reserved["driver"].as_str(), Some("nvidia"));
            assert_eq!(
                reserved["count"].as_i64(),
                Some(n),
                "{}: GPUs per worker differ from compose's",
                r.name
            );
            assert_eq!(
                device, "cuda",
                "{}: a GPU worker pins TRAINQ_DEVICE",
                r.name
            );
        } else {
            assert_eq!(
                device, worker_env["TRAINQ_DEVICE"],
                "{}: TRAINQ_DEVICE",
                r.name
            );
        }
        assert_eq!(
            container_ports(wc),
            BTreeSet::from([port_of(&worker_env["TRAINQ_METRICS_LISTEN"])]),
            "{}: worker ports",
            r.name
        );
        assert!(
            compose_worker
                .healthcheck(&vars)
                .expect("healthcheck")
                .is_none()
                && ["startupProbe", "readinessProbe", "livenessProbe"]
                    .iter()
                    .all(|p| wc.get(*p).is_none()),
            "{}: compose's workers have no healthcheck, so these have no probe",
            r.name
        );
        for (name, compose_value, value) in &w.urls {
            let (scheme, host, port) = url_parts(value);
            let (compose_scheme, compose_host, compose_port) = url_parts(compose_value);
            assert_eq!(scheme, compose_scheme, "{}: worker {name}", r.name);
            assert_eq!(port, compose_port, "{}: worker {name}", r.name);
            if compose_host == "coordinator" {
                // The coordinator's gRPC Service, on the gRPC port.
                assert_eq!(port, Some(grpc_port));
                assert_service_reaches(&r, &host, grpc_port, deploy, c);
            }
        }
        // The same compose value (one variable, such as TRAINQ_WORKER_TOKEN for the coordinator's
        // list and the worker's token) comes from the same Secret key, different ones from
        // different keys.
        let mut by_value: BTreeMap<&str, BTreeSet<&Source>> = BTreeMap::new();
        for (value, source) in coordinator.secrets.iter().chain(&w.secrets) {
            by_value.entry(value).or_default().insert(source);
        }
        let mut keys = BTreeSet::new();
        for (value, sources) in &by_value {
            assert_eq!(sources.len(), 1, "{}: {value:?} from {sources:?}", r.name);
            assert!(
                keys.insert(sources.iter().next()),
                "{}: keys shared",
                r.name
            );
        }
        assert!(by_value.len() >= 3, "{}: {by_value:?}", r.name);

        check_dev_services(&r, &compose, &raw, &coordinator.env, &w.env);
    }
}

/// Every coordinator replica must see every artifact: an s3:// store, or file:// on a volume
/// that is shared (ReadWriteMany) or has one replica to serve (ReadWriteOnce); never a
/// directory in the container or an emptyDir.
fn check_artifact_store(r: &Rendered, deploy: &Value, c: &Value, url: &str, replicas: i64) {
    let (scheme, _, _) = url_parts(url);
    match scheme.as_str() {
        "s3" => {}
        "file" => {
            let path = url.trim_start_matches("file://");
            let mount = c["volumeMounts"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|m| path.starts_with(m["mountPath"].as_str().unwrap_or("\0")))
                .unwrap_or_else(|| panic!("{}: {url} is on no volume", r.name));
            let volume = pod_spec(deploy)["volumes"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == mount["name"])
                .expect("the mount's volume");
            let claim = volume["persistentVolumeClaim"]["claimName"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: {url} is on {volume:?}, not a PVC", r.name));
            let pvc = r
                .get("PersistentVolumeClaim", claim)
                .unwrap_or_else(|| panic!("{}: no PVC {claim}", r.name));
            let modes: Vec<&str> = pvc["spec"]["accessModes"]
                .as_sequence()
                .into_iter()
                .flatten()
                .filter_map(|m| m.as_str())
                .collect();
            assert!(
                modes.contains(&"ReadWriteMany") || replicas == 1,
                "{}: {replicas} coordinators share {url} on a {modes:?} volume",
                r.name
            );
            if replicas == 1 {
                assert_eq!(
                    deploy["spec"]["strategy"]["type"].as_str(),
                    Some("Recreate"),
                    "{}: a rolling update would start a second coordinator on the volume",
                    r.name
                );
            }
        }
        other => panic!("{}: artifact store {other}:// (file:// or s3://)", r.name),
    }
}

/// The dev overlay's Postgres and Redis are compose's `postgres` and `redis` services: the same
/// images, commands, environment (the password from a Secret), ports, readiness check, and the
/// Service names the coordinator's and workers' URLs use.
fn check_dev_services(
    r: &Rendered,
    compose: &ComposeFile,
    raw: &Value,
    coordinator_env: &BTreeMap<String, Source>,
    worker_env: &BTreeMap<String, Source>,
) {
    let vars = compose_vars();
    for service in ["postgres", "redis"] {
        let workload = r
            .objects
            .iter()
            .filter(|o| matches!(o["kind"].as_str(), Some("Deployment" | "StatefulSet")))
            .find(|o| {
                pod_spec(o)["containers"]
                    .as_sequence()
                    .is_some_and(|cs| cs.iter().any(|c| c["name"].as_str() == Some(service)))
            });
        let Some(workload) = workload else {
            continue; // the user's own, outside the cluster or not ours
        };
        let c = container(workload, service);
        let compared = compare(r, compose, service, c);
        assert!(compared.urls.is_empty());
        let svc = compose.service(service).expect("service");
        let hc = svc.healthcheck(&vars).expect("healthcheck").expect("one");
        let probe = &c["readinessProbe"];
        assert_eq!(
            argv(&probe["exec"]["command"]),
            Some(hc),
            "{}: {service} readiness is not compose's healthcheck",
            r.name
        );
        let what = format!("{}: {service} readinessProbe", r.name);
        assert_probe_timing(probe, &raw["services"][service]["healthcheck"], &what);
        let port = *container_ports(c).iter().next().expect("a port");
        assert_service_reaches(r, service, port, workload, c);
        // The trainq services' URLs that name this Service name its port (DATABASE_URL is a
        // Secret: the README's command writes postgres:5432).
        for source in coordinator_env.values().chain(worker_env.values()) {
            if let Source::Value(v) = source {
                if v.contains("://") && url_parts(v).1 == service {
                    assert_eq!(url_parts(v).2, Some(port), "{}: {v}", r.name);
                }
            }
        }
        // Not retagged like trainq's own images: a Postgres major version is its data format.
        assert_eq!(
            c["image"].as_str(),
            svc.image(&vars).expect("image").as_deref(),
            "{}: {service} image",
            r.name
        );
    }
}

/// A URL with `user:password@` in it.
fn has_userinfo(value: &str) -> bool {
    value.contains("://") && value.contains('@')
}

/// Names of env vars whose values are credentials.
fn is_credential_name(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    ["TOKEN", "PASSWORD", "SECRET", "ACCESS_KEY", "DATABASE_URL"]
        .iter()
        .any(|w| upper.contains(w))
}

#[test]
fn no_manifest_holds_a_token_a_password_or_a_secret() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("README.md");
    for r in base_and_overlays() {
        assert!(
            r.of_kind("Secret").is_empty(),
            "{}: renders a Secret object; secrets are created by the user (README)",
            r.name
        );
        for token in COMPOSE_DEFAULT_TOKENS {
            assert!(!r.text.contains(token), "{}: contains {token}", r.name);
        }
        for workload in r
            .objects
            .iter()
            .filter(|o| matches!(o["kind"].as_str(), Some("Deployment" | "StatefulSet")))
        {
            let spec = pod_spec(workload);
            let containers = spec["containers"].as_sequence().into_iter().flatten();
            let init = spec["initContainers"].as_sequence().into_iter().flatten();
            for c in containers.chain(init) {
                let what = format!("{}: {:?} {:?}", r.name, name_of(workload), c["name"]);
                for e in c["env"].as_sequence().into_iter().flatten() {
                    let name = e["name"].as_str().expect("name");
                    if let Some(v) = e.get("value") {
                        assert!(
                            !is_credential_name(name),
                            "{what}: {name} is a literal; credentials come from Secrets"
                        );
                        let v = v.as_str().unwrap_or("");
                        assert!(!has_userinfo(v), "{what}: {name} has credentials in a URL");
                    }
                    if let Some(s) = e["valueFrom"].get("secretKeyRef") {
                        let (secret, key) = (
                            s["name"].as_str().expect("secret"),
                            s["key"].as_str().expect("key"),
                        );
                        assert!(
                            readme.contains(&format!("kubectl create secret generic {secret}"))
                                && readme.contains(&format!("--from-literal={key}=")),
                            "{what}: the README does not say how to create Secret {secret} \
                             with key {key} (`kubectl create secret generic {secret} \
                             --from-literal={key}=...`)"
                        );
                    }
                }
                for from in c["envFrom"].as_sequence().into_iter().flatten() {
                    if let Some(secret) = from["secretRef"]["name"].as_str() {
                        assert!(
                            readme.contains(&format!("kubectl create secret generic {secret}")),
                            "{what}: the README does not say how to create Secret {secret}"
                        );
                    }
                }
            }
        }
        for map in r.of_kind("ConfigMap") {
            for (k, v) in map["data"].as_mapping().into_iter().flatten() {
                let (k, v) = (k.as_str().unwrap_or(""), v.as_str().unwrap_or(""));
                assert!(
                    !is_credential_name(k) && !has_userinfo(v),
                    "{}: ConfigMap {:?} holds {k}, a credential",
                    r.name,
                    name_of(map)
                );
            }
        }
    }
    // The sources too: no generator or Secret that a later edit could fill in.
    let mut stack = vec![kube_dir()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("a text file");
            assert!(
                !text.contains("secretGenerator") && !text.contains("kind: Secret"),
                "{} generates or holds a Secret",
                path.display()
            );
        }
    }
}

#[test]
fn a_worker_has_the_time_to_hand_its_jobs_back() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).expect("README.md");
    assert!(
        readme.contains(&format!(
            "terminationGracePeriodSeconds: {WORKER_GRACE_MIN_S}"
        )),
        "the README's Kubernetes section documents the workers' grace of {WORKER_GRACE_MIN_S} s"
    );
    for r in base_and_overlays() {
        let grace = |name: &str| {
            pod_spec(r.deployment(name))["terminationGracePeriodSeconds"]
                .as_i64()
                .unwrap_or(30)
        };
        let (worker, coordinator) = (grace(WORKER), grace(COORDINATOR));
        assert!(
            worker >= WORKER_GRACE_MIN_S,
            "{}: workers get {worker} s after SIGTERM; a hand-back needs {WORKER_GRACE_MIN_S} s",
            r.name
        );
        assert!(
            coordinator <= COORDINATOR_GRACE_MAX_S && coordinator < worker,
            "{}: the coordinator's grace ({coordinator} s) is short and below the workers' \
             ({worker} s), so a worker handing back outlasts a coordinator restart",
            r.name
        );
        // SIGTERM reaches trainq-worker itself (PID 1, the image's entrypoint), not a shell.
        let wc = container(r.deployment(WORKER), "worker");
        assert!(wc.get("command").is_none() && wc.get("args").is_none());
        assert!(
            wc["lifecycle"].get("preStop").is_none(),
            "{}: a preStop hook would delay SIGTERM",
            r.name
        );
    }
}
