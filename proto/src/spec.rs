//! The validated job spec: the domain form of [`v1::JobSpec`].
//!
//! Both the coordinator (at submit) and the worker (at claim, and in standalone mode) parse the
//! wire type through [`JobSpec::try_from`], so an invalid spec never travels inward. Every limit
//! documented in the .proto file is enforced here and nowhere else; a violation names the field
//! path (`spec.training.batch_size`) the way gRPC's INVALID_ARGUMENT should.
//!
//! Must not know about Postgres, Redis or libtorch.

use std::collections::BTreeMap;

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
        Self { field: field.into(), description: description.into() }
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
}

#[derive(Debug, Clone, PartialEq)]
pub enum Experiment {
    /// The seed's MNISTClassifier.
    MnistClassifier,
}

impl Experiment {
    /// Stable name stored in Postgres (`jobs.kind`).
    pub fn kind(&self) -> &'static str {
        match self {
            Experiment::MnistClassifier => "mnist_classifier",
        }
    }
}

/// A job spec whose every field is within its documented limits.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub training: Training,
    pub max_attempts: u32,
    pub experiment: Experiment,
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

fn check_text(field: &str, value: &str, max: usize, allow_empty: bool) -> Result<(), FieldViolation> {
    let n = value.chars().count();
    if n == 0 && !allow_empty {
        return Err(FieldViolation::new(field, "must not be empty"));
    }
    if n > max {
        return Err(FieldViolation::new(field, format!("must be at most {max} characters, got {n}")));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldViolation::new(field, "must not contain control characters"));
    }
    Ok(())
}

fn check_labels(field: &str, labels: &std::collections::HashMap<String, String>) -> Result<(), FieldViolation> {
    if labels.len() > MAX_LABELS {
        return Err(FieldViolation::new(field, format!("at most {MAX_LABELS} labels, got {}", labels.len())));
    }
    for (k, v) in labels {
        let kf = format!("{field}[{k:?}]");
        check_text(&kf, k, MAX_LABEL_KEY_CHARS, false)?;
        if !k.chars().all(|c| c.is_ascii_alphanumeric() || "_.-/".contains(c)) {
            return Err(FieldViolation::new(kf, "label keys may contain only A-Z a-z 0-9 _ . - /"));
        }
        check_text(&kf, v, MAX_LABEL_VALUE_CHARS, true)?;
    }
    Ok(())
}

/// Validates a label filter (same rules as labels on a spec).
pub fn validate_labels(field: &str, labels: &std::collections::HashMap<String, String>) -> Result<(), FieldViolation> {
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
            format!("must be between 1 and {MAX_BATCH_SIZE}, got {}", t.batch_size),
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
            return Err(FieldViolation::new(format!("{F}.optimizer"), format!("unknown optimizer {}", t.optimizer)))
        }
    };
    if t.log_every_steps > MAX_LOG_EVERY_STEPS {
        return Err(FieldViolation::new(
            format!("{F}.log_every_steps"),
            format!("must be at most {MAX_LOG_EVERY_STEPS}, got {}", t.log_every_steps),
        ));
    }
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
    })
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
            None => {
                return Err(FieldViolation::new(
                    "spec.experiment",
                    "is required: set one experiment kind, for example mnist_classifier",
                ))
            }
        };
        let max_attempts = if raw.max_attempts == 0 { DEFAULT_MAX_ATTEMPTS } else { raw.max_attempts };
        Ok(Self {
            name: raw.name.clone(),
            labels: raw.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
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
            training: Some(v1::Training { epochs: 2, batch_size: 64, learning_rate: 1e-3, ..Default::default() }),
            experiment: Some(v1::job_spec::Experiment::MnistClassifier(v1::MnistClassifier {})),
            ..Default::default()
        }
    }

    fn field_of(spec: v1::JobSpec) -> String {
        JobSpec::try_from(spec).expect_err("spec should be rejected").field
    }

    #[test]
    fn a_valid_spec_gets_its_defaults() {
        let s = JobSpec::try_from(valid()).expect("valid");
        assert_eq!(s.max_attempts, DEFAULT_MAX_ATTEMPTS);
        assert_eq!(s.training.log_every_steps, DEFAULT_LOG_EVERY_STEPS);
        assert_eq!(s.training.optimizer, Optimizer::Adam);
        assert_eq!(s.training.max_train_examples, None);
        assert_eq!(s.experiment.kind(), "mnist_classifier");
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut s = valid();
        s.experiment = None;
        assert_eq!(field_of(s), "spec.experiment");
        let mut s = valid();
        s.training.as_mut().unwrap().epochs = 0;
        assert_eq!(field_of(s), "spec.training.epochs");
        let mut s = valid();
        s.training.as_mut().unwrap().batch_size = 0;
        assert_eq!(field_of(s), "spec.training.batch_size");
        let mut s = valid();
        s.training.as_mut().unwrap().batch_size = MAX_BATCH_SIZE + 1;
        assert_eq!(field_of(s), "spec.training.batch_size");
        for lr in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let mut s = valid();
            s.training.as_mut().unwrap().learning_rate = lr;
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

    #[test]
    fn json_specs_use_the_proto_json_mapping_and_reject_unknown_fields() {
        let ok = r#"{"name":"m","training":{"epochs":1,"batchSize":8,"learningRate":0.01,"seed":"7"},
                     "mnistClassifier":{}}"#;
        let s = JobSpec::from_json(ok).expect("valid json spec");
        assert_eq!(s.training.batch_size, 8);
        assert_eq!(s.training.seed, 7);
        let snake = r#"{"name":"m","training":{"epochs":1,"batch_size":8,"learning_rate":0.01},"mnist_classifier":{}}"#;
        assert!(JobSpec::from_json(snake).is_ok(), "proto field names are accepted too");
        let typo = r#"{"name":"m","trainig":{"epochs":1}}"#;
        let err = JobSpec::from_json(typo).expect_err("typo must be rejected").to_string();
        assert!(err.contains("trainig"), "{err}");
        let roundtrip = JobSpec::from_json(&s.to_json().to_string()).expect("roundtrip");
        assert_eq!(roundtrip, s);
    }
}
