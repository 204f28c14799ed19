//! The validated job spec: the domain form of [`v1::JobSpec`].
//!
//! Both the coordinator (at submit) and the worker (at claim, and in standalone mode) parse the
//! wire type through [`JobSpec::try_from`], so an invalid spec never travels inward. Every limit
//! documented in the .proto file is enforced here and nowhere else; a violation names the field
//! path (`spec.training.batch_size`) the way gRPC's INVALID_ARGUMENT should.
//!
//! Must not know about Postgres, Redis or libtorch.

use std::collections::BTreeMap;

use crate::ids::JobId;
use crate::queue;
use crate::v1;

pub const MAX_NAME_CHARS: usize = 128;
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_KEY_CHARS: usize = 63;
pub const MAX_LABEL_VALUE_CHARS: usize = 256;
pub const MAX_EPOCHS: u32 = 1000;
pub const MAX_BATCH_SIZE: u32 = 8192;
pub const MAX_LEARNING_RATE: f64 = 10.0;
pub const MAX_ATTEMPTS: u32 = 20;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
pub const DEFAULT_LOG_EVERY_STEPS: u32 = 50;
pub const MAX_LOG_EVERY_STEPS: u32 = 100_000;
pub const MAX_CHECKPOINT_EVERY_STEPS: u32 = 1_000_000;
pub const MAX_DEPENDENCIES: usize = 64;
pub const DEFAULT_LATENT_DIM: u32 = 20;
pub const MAX_LATENT_DIM: u32 = 512;
pub const MAX_BETA: f64 = 100.0;
/// Largest GPU memory request, in MiB (1 TiB).
pub const MAX_GPU_MEMORY_MIB: u32 = 1 << 20;
/// The default GPU memory estimate of a job: this much, plus [`GPU_MIB_PER_IMAGE`] per image of
/// its batch (migration 0008 computes the same in SQL, for the claim).
pub const GPU_MIB_BASE: u32 = 256;
pub const GPU_MIB_PER_IMAGE: u32 = 1;
/// conv1.weight of the seed's MNISTClassifier and of its CVAE_CIFAR100: the reason a naive copy
/// (the seed's Code Example 2) cannot work.
pub const CLASSIFIER_CONV1_SHAPE: [i64; 4] = [32, 1, 3, 3];
pub const CVAE_CONV1_SHAPE: [i64; 4] = [32, 3, 3, 3];

/// A spec field that breaks its documented limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {description}")]
pub struct FieldViolation {
    /// Path from the request root, for example `spec.training.epochs`.
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

/// A spec file that could not be read as JSON of the proto's JSON mapping, or that is invalid.
#[derive(Debug, thiserror::Error)]
pub enum SpecFileError {
    #[error("spec is not valid trainq.v1.JobSpec JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid spec: {0}")]
    Invalid(#[from] FieldViolation),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Optimizer {
    Adam,
    AdamW,
    Sgd,
}

/// The arithmetic of a training step (`spec.training.precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// bf16 autocast on a CUDA GPU that supports it, fp32 elsewhere.
    #[default]
    Auto,
    Fp32,
    /// bf16 autocast (convolutions and matrix products in bfloat16; parameters, gradients and
    /// optimiser state in fp32). Allowed on a CPU too, where libtorch's CPU autocast runs it.
    Bf16,
}

impl Precision {
    /// The name used in logs and the worker's `--precision` flag.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Auto => "auto",
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Training {
    pub epochs: u32,
    pub batch_size: u32,
    pub learning_rate: f64,
    pub optimizer: Optimizer,
    pub seed: u64,
    /// `None`: the whole training set.
    pub max_train_examples: Option<u32>,
    /// `None`: the whole test set.
    pub max_test_examples: Option<u32>,
    pub log_every_steps: u32,
    /// Store a resumable training state every N steps as well as at every epoch's end.
    pub checkpoint_every_steps: Option<u32>,
    pub precision: Precision,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Experiment {
    /// The seed's MNISTClassifier.
    MnistClassifier,
    /// The seed's CVAE_CIFAR100.
    CifarCvae(Cvae),
}

impl Experiment {
    /// Every [`Experiment::kind`], in the order of the .proto's oneof.
    pub const KINDS: [&'static str; 2] = ["mnist_classifier", "cifar_cvae"];

    /// Stable name stored in Postgres (`jobs.kind`).
    pub fn kind(&self) -> &'static str {
        match self {
            Experiment::MnistClassifier => "mnist_classifier",
            Experiment::CifarCvae(_) => "cifar_cvae",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Cvae {
    pub latent_dim: u32,
    /// Weight of the KL term.
    pub beta: f64,
    pub init: Init,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Init {
    Random,
    Transfer(Transfer),
}

/// Start a CVAE from a finished MNIST classifier's final checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Transfer {
    /// The source job.
    pub source_job_id: JobId,
    pub conv1: Conv1Adaptation,
    pub copy_conv2: bool,
    pub freeze: Freeze,
}

impl Transfer {
    /// Parameter-name prefixes of the layers this transfer writes (`conv1`, `conv2`).
    pub fn transferred_layers(&self) -> Vec<&'static str> {
        let mut layers = Vec::new();
        if self.conv1 != Conv1Adaptation::KeepRandom {
            layers.push("conv1");
        }
        if self.copy_conv2 {
            layers.push("conv2");
        }
        layers
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conv1Adaptation {
    /// Each of R, G, B gets the grey kernel / 3.
    ReplicateThird,
    /// R, G, B get the grey kernel times 0.299, 0.587, 0.114.
    Luminance,
    /// conv1 keeps its random initialisation.
    KeepRandom,
}

impl Conv1Adaptation {
    /// The per-channel factors applied to the grey kernel, or `None` for KeepRandom.
    pub fn channel_weights(self) -> Option<[f64; 3]> {
        match self {
            Conv1Adaptation::ReplicateThird => Some([1.0 / 3.0; 3]),
            Conv1Adaptation::Luminance => Some([0.299, 0.587, 0.114]),
            Conv1Adaptation::KeepRandom => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Freeze {
    /// Transferred layers train like the rest.
    None,
    WholeRun,
    /// Frozen during epochs 1..=N.
    FirstEpochs(u32),
    /// Trained with learning_rate * multiplier.
    LrMultiplier(f64),
}

/// Where a job may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Any,
    Cuda,
    Cpu,
}

impl DeviceKind {
    /// The name workers report and the store compares (`any`, `cuda`, `cpu`).
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Any => "any",
            DeviceKind::Cuda => "cuda",
            DeviceKind::Cpu => "cpu",
        }
    }
}

/// What a job needs from its worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    pub device: DeviceKind,
    /// GPU memory on a CUDA worker, in MiB: the request, or the default estimate.
    pub gpu_memory_mib: u32,
}

/// The default GPU memory estimate for a batch of `batch_size` images, in MiB.
pub fn default_gpu_memory_mib(batch_size: u32) -> u32 {
    GPU_MIB_BASE + GPU_MIB_PER_IMAGE * batch_size
}

fn parse_resources(
    r: Option<&v1::Resources>,
    batch_size: u32,
) -> Result<Resources, FieldViolation> {
    let r = r.cloned().unwrap_or_default();
    let device = match v1::DeviceKind::try_from(r.device) {
        Ok(v1::DeviceKind::Unspecified | v1::DeviceKind::Any) => DeviceKind::Any,
        Ok(v1::DeviceKind::Cuda) => DeviceKind::Cuda,
        Ok(v1::DeviceKind::Cpu) => DeviceKind::Cpu,
        Err(_) => {
            return Err(FieldViolation::new(
                "spec.resources.device",
                format!("unknown device kind {}", r.device),
            ))
        }
    };
    if r.gpu_memory_mib > MAX_GPU_MEMORY_MIB {
        return Err(FieldViolation::new(
            "spec.resources.gpu_memory_mib",
            format!(
                "must be at most {MAX_GPU_MEMORY_MIB} (1 TiB), got {}",
                r.gpu_memory_mib
            ),
        ));
    }
    let gpu_memory_mib = if r.gpu_memory_mib == 0 {
        default_gpu_memory_mib(batch_size)
    } else {
        r.gpu_memory_mib
    };
    Ok(Resources {
        device,
        gpu_memory_mib,
    })
}

/// A job spec whose every field is within its documented limits.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub training: Training,
    pub max_attempts: u32,
    pub experiment: Experiment,
    /// Jobs that must succeed first: `depends_on` plus a transfer's source, without repeats.
    pub dependencies: Vec<JobId>,
    /// The queue it waits on ([`crate::queue::DEFAULT_QUEUE`] when the spec names none).
    pub queue: String,
    /// Higher runs first (`-MAX_PRIORITY..=MAX_PRIORITY`).
    pub priority: i32,
    pub resources: Resources,
    /// The wire form, kept so it can be stored and echoed back unchanged.
    raw: v1::JobSpec,
}

impl JobSpec {
    /// The wire form this spec was parsed from.
    pub fn to_proto(&self) -> v1::JobSpec {
        self.raw.clone()
    }

    /// Parses and validates a spec written in the proto's JSON mapping. Unknown fields are errors.
    pub fn from_json(text: &str) -> Result<Self, SpecFileError> {
        let raw: v1::JobSpec = serde_json::from_str(text)?;
        Ok(Self::try_from(raw)?)
    }

    /// The spec in the proto's JSON mapping (what Postgres stores in `jobs.spec`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.raw).expect("a prost message always serialises to JSON")
    }
}

/// A text field of at most `max` characters, none of them control characters (and not empty
/// unless `allow_empty`). Shared with the sweep validator.
pub(crate) fn check_text(
    field: &str,
    value: &str,
    max: usize,
    allow_empty: bool,
) -> Result<(), FieldViolation> {
    let n = value.chars().count();
    if n == 0 && !allow_empty {
        return Err(FieldViolation::new(field, "must not be empty"));
    }
    if n > max {
        return Err(FieldViolation::new(
            field,
            format!("must be at most {max} characters, got {n}"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldViolation::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

fn check_labels(
    field: &str,
    labels: &std::collections::HashMap<String, String>,
) -> Result<(), FieldViolation> {
    if labels.len() > MAX_LABELS {
        return Err(FieldViolation::new(
            field,
            format!("at most {MAX_LABELS} labels, got {}", labels.len()),
        ));
    }
    for (k, v) in labels {
        let kf = format!("{field}[{k:?}]");
        check_text(&kf, k, MAX_LABEL_KEY_CHARS, false)?;
        if !k
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-/".contains(c))
        {
            return Err(FieldViolation::new(
                kf,
                "label keys may contain only A-Z a-z 0-9 _ . - /",
            ));
        }
        check_text(&kf, v, MAX_LABEL_VALUE_CHARS, true)?;
    }
    Ok(())
}

/// Validates a label filter (same rules as labels on a spec).
pub fn validate_labels(
    field: &str,
    labels: &std::collections::HashMap<String, String>,
) -> Result<(), FieldViolation> {
    check_labels(field, labels)
}

fn parse_training(t: &v1::Training) -> Result<Training, FieldViolation> {
    const F: &str = "spec.training";
    if t.epochs == 0 || t.epochs > MAX_EPOCHS {
        return Err(FieldViolation::new(
            format!("{F}.epochs"),
            format!("must be between 1 and {MAX_EPOCHS}, got {}", t.epochs),
        ));
    }
    if t.batch_size == 0 || t.batch_size > MAX_BATCH_SIZE {
        return Err(FieldViolation::new(
            format!("{F}.batch_size"),
            format!(
                "must be between 1 and {MAX_BATCH_SIZE}, got {}",
                t.batch_size
            ),
        ));
    }
    let lr = t.learning_rate;
    if !lr.is_finite() || lr <= 0.0 || lr > MAX_LEARNING_RATE {
        return Err(FieldViolation::new(
            format!("{F}.learning_rate"),
            format!("must be finite and in (0, {MAX_LEARNING_RATE}], got {lr}"),
        ));
    }
    let optimizer = match v1::Optimizer::try_from(t.optimizer) {
        Ok(v1::Optimizer::Unspecified | v1::Optimizer::Adam) => Optimizer::Adam,
        Ok(v1::Optimizer::Adamw) => Optimizer::AdamW,
        Ok(v1::Optimizer::Sgd) => Optimizer::Sgd,
        Err(_) => {
            return Err(FieldViolation::new(
                format!("{F}.optimizer"),
                format!("unknown optimizer {}", t.optimizer),
            ))
        }
    };
    if t.log_every_steps > MAX_LOG_EVERY_STEPS {
        return Err(FieldViolation::new(
            format!("{F}.log_every_steps"),
            format!(
                "must be at most {MAX_LOG_EVERY_STEPS}, got {}",
                t.log_every_steps
            ),
        ));
    }
    if t.checkpoint_every_steps > MAX_CHECKPOINT_EVERY_STEPS {
        return Err(FieldViolation::new(
            format!("{F}.checkpoint_every_steps"),
            format!(
                "must be at most {MAX_CHECKPOINT_EVERY_STEPS}, got {}",
                t.checkpoint_every_steps
            ),
        ));
    }
    let precision = match v1::Precision::try_from(t.precision) {
        Ok(v1::Precision::Unspecified | v1::Precision::Auto) => Precision::Auto,
        Ok(v1::Precision::Fp32) => Precision::Fp32,
        Ok(v1::Precision::Bf16) => Precision::Bf16,
        Err(_) => {
            return Err(FieldViolation::new(
                format!("{F}.precision"),
                format!("unknown precision {}", t.precision),
            ))
        }
    };
    let nonzero = |n: u32| (n > 0).then_some(n);
    Ok(Training {
        epochs: t.epochs,
        batch_size: t.batch_size,
        learning_rate: lr,
        optimizer,
        seed: t.seed,
        max_train_examples: nonzero(t.max_train_examples),
        max_test_examples: nonzero(t.max_test_examples),
        log_every_steps: nonzero(t.log_every_steps).unwrap_or(DEFAULT_LOG_EVERY_STEPS),
        checkpoint_every_steps: nonzero(t.checkpoint_every_steps),
        precision,
    })
}

fn parse_cvae(c: &v1::CifarCvae, epochs: u32) -> Result<Cvae, FieldViolation> {
    const F: &str = "spec.cifar_cvae";
    if c.latent_dim > MAX_LATENT_DIM {
        return Err(FieldViolation::new(
            format!("{F}.latent_dim"),
            format!("must be at most {MAX_LATENT_DIM}, got {}", c.latent_dim),
        ));
    }
    let beta = c.beta.unwrap_or(1.0);
    if !beta.is_finite() || !(0.0..=MAX_BETA).contains(&beta) {
        return Err(FieldViolation::new(
            format!("{F}.beta"),
            format!("must be finite and in [0, {MAX_BETA}], got {beta}"),
        ));
    }
    let init = match c.init.as_ref().and_then(|i| i.kind.as_ref()) {
        None | Some(v1::initialization::Kind::Random(_)) => Init::Random,
        Some(v1::initialization::Kind::Transfer(t)) => Init::Transfer(parse_transfer(t, epochs)?),
    };
    let latent_dim = if c.latent_dim == 0 {
        DEFAULT_LATENT_DIM
    } else {
        c.latent_dim
    };
    Ok(Cvae {
        latent_dim,
        beta,
        init,
    })
}

fn parse_transfer(t: &v1::TransferInit, epochs: u32) -> Result<Transfer, FieldViolation> {
    const F: &str = "spec.cifar_cvae.init.transfer";
    let source_job_id = JobId::parse(&format!("{F}.source_job_id"), &t.source_job_id)?;
    let conv1 = match v1::Conv1Adaptation::try_from(t.conv1) {
        Ok(v1::Conv1Adaptation::ReplicateThird) => Conv1Adaptation::ReplicateThird,
        Ok(v1::Conv1Adaptation::Luminance) => Conv1Adaptation::Luminance,
        Ok(v1::Conv1Adaptation::KeepRandom) => Conv1Adaptation::KeepRandom,
        Ok(v1::Conv1Adaptation::NaiveCopy) => {
            return Err(FieldViolation::new(
                format!("{F}.conv1"),
                naive_copy_message(),
            ));
        }
        Ok(v1::Conv1Adaptation::Unspecified) | Err(_) => {
            return Err(FieldViolation::new(
                format!("{F}.conv1"),
                "is required: CONV1_ADAPTATION_REPLICATE_THIRD, CONV1_ADAPTATION_LUMINANCE or CONV1_ADAPTATION_KEEP_RANDOM",
            ));
        }
    };
    let freeze = match t.freeze.as_ref().and_then(|f| f.policy.as_ref()) {
        None | Some(v1::freeze_policy::Policy::WholeRun(false)) => Freeze::None,
        Some(v1::freeze_policy::Policy::WholeRun(true)) => Freeze::WholeRun,
        Some(v1::freeze_policy::Policy::FirstEpochs(n)) => {
            if *n == 0 || *n > MAX_EPOCHS {
                return Err(FieldViolation::new(
                    format!("{F}.freeze.first_epochs"),
                    format!("must be between 1 and {MAX_EPOCHS}, got {n}"),
                ));
            }
            let _ = epochs; // freezing past the last epoch simply freezes the whole run
            Freeze::FirstEpochs(*n)
        }
        Some(v1::freeze_policy::Policy::LrMultiplier(m)) => {
            if !m.is_finite() || *m <= 0.0 || *m > 1.0 {
                return Err(FieldViolation::new(
                    format!("{F}.freeze.lr_multiplier"),
                    format!("must be finite and in (0, 1], got {m}"),
                ));
            }
            Freeze::LrMultiplier(*m)
        }
    };
    let transfer = Transfer {
        source_job_id,
        conv1,
        copy_conv2: t.copy_conv2,
        freeze,
    };
    if transfer.transferred_layers().is_empty() {
        return Err(FieldViolation::new(
            F,
            "transfers no layer: adapt conv1 (replicate_third or luminance) or set copy_conv2",
        ));
    }
    Ok(transfer)
}

/// Why the seed's naive copy of conv1 is refused (at submit, and by the worker's guard).
pub fn naive_copy_message() -> String {
    format!(
        "naive copy cannot work: the classifier's conv1.weight has shape {:?} but the CVAE's has shape {:?}; \
         adapt it with CONV1_ADAPTATION_REPLICATE_THIRD or CONV1_ADAPTATION_LUMINANCE, or keep it random",
        CLASSIFIER_CONV1_SHAPE, CVAE_CONV1_SHAPE
    )
}

fn parse_dependencies(
    raw: &v1::JobSpec,
    experiment: &Experiment,
) -> Result<Vec<JobId>, FieldViolation> {
    if raw.depends_on.len() > MAX_DEPENDENCIES {
        return Err(FieldViolation::new(
            "spec.depends_on",
            format!(
                "at most {MAX_DEPENDENCIES} dependencies, got {}",
                raw.depends_on.len()
            ),
        ));
    }
    let mut deps: Vec<JobId> = Vec::with_capacity(raw.depends_on.len() + 1);
    for (i, id) in raw.depends_on.iter().enumerate() {
        let id = JobId::parse(&format!("spec.depends_on[{i}]"), id)?;
        if deps.contains(&id) {
            return Err(FieldViolation::new(
                format!("spec.depends_on[{i}]"),
                format!("{id} is listed twice"),
            ));
        }
        deps.push(id);
    }
    if let Experiment::CifarCvae(Cvae {
        init: Init::Transfer(t),
        ..
    }) = experiment
    {
        if !deps.contains(&t.source_job_id) {
            deps.push(t.source_job_id);
        }
    }
    Ok(deps)
}

impl TryFrom<v1::JobSpec> for JobSpec {
    type Error = FieldViolation;

    fn try_from(raw: v1::JobSpec) -> Result<Self, Self::Error> {
        check_text("spec.name", &raw.name, MAX_NAME_CHARS, false)?;
        check_labels("spec.labels", &raw.labels)?;
        let training = match &raw.training {
            Some(t) => parse_training(t)?,
            None => return Err(FieldViolation::new("spec.training", "is required")),
        };
        if raw.max_attempts > MAX_ATTEMPTS {
            return Err(FieldViolation::new(
                "spec.max_attempts",
                format!("must be at most {MAX_ATTEMPTS}, got {}", raw.max_attempts),
            ));
        }
        let experiment = match &raw.experiment {
            Some(v1::job_spec::Experiment::MnistClassifier(_)) => Experiment::MnistClassifier,
            Some(v1::job_spec::Experiment::CifarCvae(c)) => {
                Experiment::CifarCvae(parse_cvae(c, training.epochs)?)
            }
            None => {
                return Err(FieldViolation::new(
                    "spec.experiment",
                    "is required: set one experiment kind, for example mnist_classifier",
                ))
            }
        };
        let max_attempts = if raw.max_attempts == 0 {
            DEFAULT_MAX_ATTEMPTS
        } else {
            raw.max_attempts
        };
        let dependencies = parse_dependencies(&raw, &experiment)?;
        let queue = if raw.queue.is_empty() {
            queue::DEFAULT_QUEUE.to_string()
        } else {
            queue::check_queue_name("spec.queue", &raw.queue)?;
            raw.queue.clone()
        };
        if !(-queue::MAX_PRIORITY..=queue::MAX_PRIORITY).contains(&raw.priority) {
            return Err(FieldViolation::new(
                "spec.priority",
                format!(
                    "must be between -{max} and {max}, got {}",
                    raw.priority,
                    max = queue::MAX_PRIORITY
                ),
            ));
        }
        let resources = parse_resources(raw.resources.as_ref(), training.batch_size)?;
        Ok(Self {
            dependencies,
            queue,
            priority: raw.priority,
            resources,
            name: raw.name.clone(),
            labels: raw
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            training,
            max_attempts,
            experiment,
            raw,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> v1::JobSpec {
        v1::JobSpec {
            name: "mnist".into(),
            training: Some(v1::Training {
                epochs: 2,
                batch_size: 64,
                learning_rate: 1e-3,
                ..Default::default()
            }),
            experiment: Some(v1::job_spec::Experiment::MnistClassifier(
                v1::MnistClassifier {},
            )),
            ..Default::default()
        }
    }

    fn training_of(spec: &mut v1::JobSpec) -> &mut v1::Training {
        spec.training.as_mut().expect("valid() sets training")
    }

    fn field_of(spec: v1::JobSpec) -> String {
        JobSpec::try_from(spec)
            .expect_err("spec should be rejected")
            .field
    }

    #[test]
    fn a_valid_spec_gets_its_defaults() {
        let s = JobSpec::try_from(valid()).expect("valid");
        assert_eq!(s.max_attempts, DEFAULT_MAX_ATTEMPTS);
        assert_eq!(s.training.log_every_steps, DEFAULT_LOG_EVERY_STEPS);
        assert_eq!(s.training.optimizer, Optimizer::Adam);
        assert_eq!(s.training.max_train_examples, None);
        assert_eq!(s.experiment.kind(), "mnist_classifier");
        assert_eq!((s.queue.as_str(), s.priority), (queue::DEFAULT_QUEUE, 0));
    }

    #[test]
    fn queue_and_priority_are_checked_and_kept() {
        let mut s = valid();
        s.queue = "gpu-large".into();
        s.priority = -queue::MAX_PRIORITY;
        let parsed = JobSpec::try_from(s).expect("valid");
        assert_eq!(
            (parsed.queue.as_str(), parsed.priority),
            ("gpu-large", -1000)
        );
        for bad in ["GPU", "a b", "x".repeat(33).as_str()] {
            let mut s = valid();
            s.queue = bad.into();
            assert_eq!(field_of(s), "spec.queue");
        }
        for bad in [queue::MAX_PRIORITY + 1, -queue::MAX_PRIORITY - 1, i32::MIN] {
            let mut s = valid();
            s.priority = bad;
            assert_eq!(field_of(s), "spec.priority");
        }
    }

    #[test]
    fn resources_default_to_any_device_and_the_memory_estimate_and_are_checked() {
        let parsed = JobSpec::try_from(valid()).expect("valid");
        assert_eq!(
            parsed.resources,
            Resources {
                device: DeviceKind::Any,
                gpu_memory_mib: 256 + 64
            }
        );
        let mut s = valid();
        s.resources = Some(v1::Resources {
            device: v1::DeviceKind::Cuda as i32,
            gpu_memory_mib: 40_000,
        });
        let parsed = JobSpec::try_from(s).expect("valid");
        assert_eq!(
            (parsed.resources.device, parsed.resources.gpu_memory_mib),
            (DeviceKind::Cuda, 40_000)
        );
        let mut s = valid();
        s.resources = Some(v1::Resources {
            device: 9,
            gpu_memory_mib: 0,
        });
        assert_eq!(field_of(s), "spec.resources.device");
        let mut s = valid();
        s.resources = Some(v1::Resources {
            device: 0,
            gpu_memory_mib: MAX_GPU_MEMORY_MIB + 1,
        });
        assert_eq!(field_of(s), "spec.resources.gpu_memory_mib");
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut s = valid();
        s.experiment = None;
        assert_eq!(field_of(s), "spec.experiment");
        let mut s = valid();
        training_of(&mut s).epochs = 0;
        assert_eq!(field_of(s), "spec.training.epochs");
        let mut s = valid();
        training_of(&mut s).batch_size = 0;
        assert_eq!(field_of(s), "spec.training.batch_size");
        let mut s = valid();
        training_of(&mut s).batch_size = MAX_BATCH_SIZE + 1;
        assert_eq!(field_of(s), "spec.training.batch_size");
        for lr in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let mut s = valid();
            training_of(&mut s).learning_rate = lr;
            assert_eq!(field_of(s), "spec.training.learning_rate");
        }
        let mut s = valid();
        s.name = String::new();
        assert_eq!(field_of(s), "spec.name");
        let mut s = valid();
        s.name = "x".repeat(MAX_NAME_CHARS + 1);
        assert_eq!(field_of(s), "spec.name");
        let mut s = valid();
        s.training = None;
        assert_eq!(field_of(s), "spec.training");
        let mut s = valid();
        s.labels.insert("bad key!".into(), "v".into());
        assert!(field_of(s).starts_with("spec.labels["));
        let mut s = valid();
        s.max_attempts = MAX_ATTEMPTS + 1;
        assert_eq!(field_of(s), "spec.max_attempts");
    }

    fn cvae(init: Option<v1::initialization::Kind>) -> v1::JobSpec {
        v1::JobSpec {
            experiment: Some(v1::job_spec::Experiment::CifarCvae(v1::CifarCvae {
                init: init.map(|kind| v1::Initialization { kind: Some(kind) }),
                ..Default::default()
            })),
            ..valid()
        }
    }

    const SOURCE: &str = "0193a5b2-7c4d-7e8f-9a0b-1c2d3e4f5a6b";

    fn transfer(conv1: v1::Conv1Adaptation, copy_conv2: bool) -> v1::TransferInit {
        v1::TransferInit {
            source_job_id: SOURCE.into(),
            conv1: conv1 as i32,
            copy_conv2,
            freeze: None,
        }
    }

    #[test]
    fn a_cvae_defaults_to_the_seeds_latent_size_beta_one_and_random_init() {
        let s = JobSpec::try_from(cvae(None)).expect("valid");
        let Experiment::CifarCvae(c) = &s.experiment else {
            panic!("not a cvae")
        };
        assert_eq!((c.latent_dim, c.beta, &c.init), (20, 1.0, &Init::Random));
        assert!(s.dependencies.is_empty());
    }

    #[test]
    fn the_seeds_naive_conv1_copy_is_rejected_naming_both_shapes() {
        let t = transfer(v1::Conv1Adaptation::NaiveCopy, true);
        let err = JobSpec::try_from(cvae(Some(v1::initialization::Kind::Transfer(t))))
            .expect_err("rejected");
        assert_eq!(err.field, "spec.cifar_cvae.init.transfer.conv1");
        assert!(
            err.description.contains("[32, 1, 3, 3]") && err.description.contains("[32, 3, 3, 3]"),
            "{err}"
        );
    }

    #[test]
    fn a_transfer_depends_on_its_source_and_checks_its_options() {
        let t = transfer(v1::Conv1Adaptation::Luminance, true);
        let s =
            JobSpec::try_from(cvae(Some(v1::initialization::Kind::Transfer(t)))).expect("valid");
        assert_eq!(
            s.dependencies,
            vec![JobId::parse("source", SOURCE).expect("id")]
        );
        let Experiment::CifarCvae(Cvae {
            init: Init::Transfer(t),
            ..
        }) = &s.experiment
        else {
            panic!()
        };
        assert_eq!(t.transferred_layers(), vec!["conv1", "conv2"]);

        let nothing = transfer(v1::Conv1Adaptation::KeepRandom, false);
        let err = JobSpec::try_from(cvae(Some(v1::initialization::Kind::Transfer(nothing))))
            .expect_err("no layer");
        assert_eq!(err.field, "spec.cifar_cvae.init.transfer");

        let mut bad_id = transfer(v1::Conv1Adaptation::ReplicateThird, false);
        bad_id.source_job_id = "not-a-uuid".into();
        let err = JobSpec::try_from(cvae(Some(v1::initialization::Kind::Transfer(bad_id))))
            .expect_err("bad id");
        assert_eq!(err.field, "spec.cifar_cvae.init.transfer.source_job_id");

        let mut lr = transfer(v1::Conv1Adaptation::ReplicateThird, true);
        lr.freeze = Some(v1::FreezePolicy {
            policy: Some(v1::freeze_policy::Policy::LrMultiplier(2.0)),
        });
        let err = JobSpec::try_from(cvae(Some(v1::initialization::Kind::Transfer(lr))))
            .expect_err("lr > 1");
        assert_eq!(
            err.field,
            "spec.cifar_cvae.init.transfer.freeze.lr_multiplier"
        );

        let mut twice = valid();
        twice.depends_on = vec![SOURCE.into(), SOURCE.to_uppercase()];
        assert_eq!(field_of(twice), "spec.depends_on[1]");
    }

    #[test]
    fn json_specs_use_the_proto_json_mapping_and_reject_unknown_fields() {
        let ok = r#"{"name":"m","training":{"epochs":1,"batchSize":8,"learningRate":0.01,"seed":"7"},
                     "mnistClassifier":{}}"#;
        let s = JobSpec::from_json(ok).expect("valid json spec");
        assert_eq!(s.training.batch_size, 8);
        assert_eq!(s.training.seed, 7);
        let snake = r#"{"name":"m","training":{"epochs":1,"batch_size":8,"learning_rate":0.01},"mnist_classifier":{}}"#;
        assert!(
            JobSpec::from_json(snake).is_ok(),
            "proto field names are accepted too"
        );
        let typo = r#"{"name":"m","trainig":{"epochs":1}}"#;
        let err = JobSpec::from_json(typo)
            .expect_err("typo must be rejected")
            .to_string();
        assert!(err.contains("trainig"), "{err}");
        let roundtrip = JobSpec::from_json(&s.to_json().to_string()).expect("roundtrip");
        assert_eq!(roundtrip, s);
    }

    #[test]
    fn every_float_reads_back_from_json_to_the_same_bits() {
        // Found by tests/hostile_input.rs: without serde_json's float_roundtrip, the learning
        // rate below read back one ULP off, so a stored spec was no longer the submitted one.
        for lr in [
            5.1691815400175924,
            f64::MIN_POSITIVE,
            f64::from_bits(1),
            0.1 + 0.2,
        ] {
            let mut spec = valid();
            training_of(&mut spec).learning_rate = lr;
            let s = JobSpec::try_from(spec).expect("valid");
            let back = JobSpec::from_json(&s.to_json().to_string()).expect("roundtrip");
            assert_eq!(
                back.training.learning_rate.to_bits(),
                lr.to_bits(),
                "{lr:e}"
            );
        }
    }
}
