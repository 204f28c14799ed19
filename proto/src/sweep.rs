//! The validated sweep: the domain form of [`v1::SweepSpec`], expanded into planned runs.
//!
//! [`SweepPlan::try_from`] checks every limit the .proto documents for a sweep (violations name
//! the field path from the request root: `spec.grid[1].values[2]`, `spec.seeds[3]`), applies
//! each grid value at its dotted lowerCamelCase path in the base spec's JSON mapping, forms the
//! arms (the Cartesian product of the axes, the first axis varying slowest) and validates every
//! arm's resulting job spec with [`JobSpec::try_from`]. Transfer arms of a sweep with a source
//! stage are validated with [`SOURCE_PLACEHOLDER`] as their source; the coordinator, which
//! assigns the source jobs' ids, passes the real id to [`SweepPlan::run_spec`].
//!
//! Must not know about Postgres, Redis or libtorch: pure functions only.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde_json::Value;

use crate::spec::{FieldViolation, Init, JobSpec, MAX_LABELS, MAX_NAME_CHARS};
use crate::v1;

pub use axis::derive_name;
use axis::{from_json, parse_axis, set_path, Axis};

pub const MAX_AXES: usize = 8;
pub const MAX_ARMS: usize = 256;
pub const MAX_VALUES: usize = 64;
pub const MAX_SEEDS: usize = 100;
/// Most jobs one sweep may have: arms x seeds, plus a source job per seed. The coordinator
/// stores a sweep in one transaction, so this bounds that transaction (and the time SubmitSweep
/// takes); 99 arms x 100 seeds with a source stage is exactly the limit.
pub const MAX_JOBS: usize = 10_000;
pub const MAX_FIELD_CHARS: usize = 256;
pub const MAX_VALUE_NAME_CHARS: usize = 64;
/// Arm names become the `arm` label, whose values are at most 256 characters.
pub const MAX_ARM_NAME_CHARS: usize = 256;
/// The arm name of source-stage runs (so no arm may be called that).
pub const SOURCE_ARM: &str = "source";
/// Labels every run carries; a sweep's own labels must not use these keys.
pub const LABEL_SWEEP: &str = "sweep";
pub const LABEL_SWEEP_ID: &str = "sweep_id";
pub const LABEL_ARM: &str = "arm";
pub const LABEL_SEED: &str = "seed";
/// The source job id transfer arms are validated with before the coordinator assigns the real
/// one. Never stored: [`SweepPlan::run_spec`] replaces it.
pub const SOURCE_PLACEHOLDER: &str = "00000000-0000-0000-0000-000000000000";
/// GridAxis fields the sweep sets itself.
const RESERVED_FIELDS: [&str; 4] = ["name", "labels", "dependsOn", "training.seed"];
/// Enum value prefixes dropped from derived arm names (`CONV1_ADAPTATION_LUMINANCE` ->
/// `luminance`).
const ENUM_PREFIXES: [&str; 2] = ["CONV1_ADAPTATION_", "OPTIMIZER_"];

/// One arm: a point of the grid.
#[derive(Debug, Clone, PartialEq)]
pub struct Arm {
    /// Unique in the sweep: the values' names joined with `,`.
    pub name: String,
    /// The arm's runs start from random initialisation (no transfer): a baseline candidate.
    pub random_init: bool,
    /// Its runs transfer from their seed's source-stage job.
    pub from_source: bool,
    /// The experiment kind of its runs.
    pub kind: &'static str,
    /// The base spec with the arm's values applied (name, labels and seed not yet set).
    spec: v1::JobSpec,
}

/// A planned job of a sweep: a source-stage job, or an arm's run with one seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedRun {
    /// Index into [`SweepPlan::arms`]; `None` for a source-stage job.
    pub arm: Option<usize>,
    pub seed: u64,
}

/// A sweep whose every field is within its documented limits and whose every run is a valid
/// job spec.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepPlan {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub seeds: Vec<u64>,
    /// In grid order (first axis slowest).
    pub arms: Vec<Arm>,
    /// The experiment kind of the arms (`cifar_cvae` or `mnist_classifier`).
    pub kind: &'static str,
    source: Option<v1::JobSpec>,
    raw: v1::SweepSpec,
}

impl SweepPlan {
    /// The wire form this plan was parsed from.
    pub fn to_proto(&self) -> v1::SweepSpec {
        self.raw.clone()
    }

    /// The sweep spec in the proto's JSON mapping (what Postgres stores in `sweeps.spec`).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(&self.raw).expect("a prost message always serialises to JSON")
    }

    pub fn has_source_stage(&self) -> bool {
        self.source.is_some()
    }

    /// How many jobs the sweep has (the length of [`Self::runs`]); at most [`MAX_JOBS`].
    pub fn job_count(&self) -> usize {
        let sources = if self.source.is_some() {
            self.seeds.len()
        } else {
            0
        };
        self.arms.len() * self.seeds.len() + sources
    }

    /// Every job of the sweep in creation order: the sources (by seed), then arm by arm, seed
    /// by seed. Sources come first so their ids exist when the arms that depend on them are
    /// stored.
    pub fn runs(&self) -> Vec<PlannedRun> {
        let mut runs = Vec::new();
        if self.source.is_some() {
            runs.extend(
                self.seeds
                    .iter()
                    .map(|&seed| PlannedRun { arm: None, seed }),
            );
        }
        for arm in 0..self.arms.len() {
            runs.extend(self.seeds.iter().map(|&seed| PlannedRun {
                arm: Some(arm),
                seed,
            }));
        }
        runs
    }

    /// The source-stage job of a seed (`None` without a source stage).
    pub fn source_spec(
        &self,
        seed: u64,
        sweep_id: &str,
    ) -> Option<Result<JobSpec, FieldViolation>> {
        let base = self.source.as_ref()?;
        Some(
            self.finish(base.clone(), SOURCE_ARM, seed, sweep_id)
                .map_err(|v| nest(v, "spec.source")),
        )
    }

    /// The job of one arm and seed. `source_job_id` is that seed's source-stage job, required
    /// exactly when the arm transfers from the source stage.
    pub fn run_spec(
        &self,
        arm: usize,
        seed: u64,
        sweep_id: &str,
        source_job_id: Option<&str>,
    ) -> Result<JobSpec, FieldViolation> {
        let a = &self.arms[arm];
        let mut spec = a.spec.clone();
        match (a.from_source, source_job_id) {
            (true, Some(id)) => set_transfer_source(&mut spec, id),
            (false, None) => {}
            (true, None) => {
                return Err(FieldViolation::new(
                    "spec.source",
                    format!("arm {} needs its seed's source job", a.name),
                ))
            }
            (false, Some(_)) => {
                return Err(FieldViolation::new(
                    "spec.source",
                    format!("arm {} does not transfer from the source stage", a.name),
                ))
            }
        }
        self.finish(spec, &a.name, seed, sweep_id)
            .map_err(|v| nest(v, "spec.base"))
    }

    /// Sets name, seed and labels, and validates.
    fn finish(
        &self,
        mut spec: v1::JobSpec,
        arm: &str,
        seed: u64,
        sweep_id: &str,
    ) -> Result<JobSpec, FieldViolation> {
        spec.name = run_name(&self.name, arm, seed);
        if let Some(t) = spec.training.as_mut() {
            t.seed = seed;
        }
        for (k, v) in &self.labels {
            spec.labels.insert(k.clone(), v.clone());
        }
        spec.labels.insert(LABEL_SWEEP.into(), self.name.clone());
        if !sweep_id.is_empty() {
            spec.labels.insert(LABEL_SWEEP_ID.into(), sweep_id.into());
        }
        spec.labels.insert(LABEL_ARM.into(), arm.into());
        spec.labels.insert(LABEL_SEED.into(), seed.to_string());
        JobSpec::try_from(spec)
    }
}

/// `<sweep>/<arm>/s<seed>`, cut to the 128 characters a job name may have (the labels carry
/// the exact sweep, arm and seed).
pub fn run_name(sweep: &str, arm: &str, seed: u64) -> String {
    format!("{sweep}/{arm}/s{seed}")
        .chars()
        .take(MAX_NAME_CHARS)
        .collect()
}

/// Re-roots a job-spec violation (`spec.training.epochs`) under a sweep field (`spec.base`).
fn nest(v: FieldViolation, root: &str) -> FieldViolation {
    let field = match v.field.strip_prefix("spec") {
        Some(rest) => format!("{root}{rest}"),
        None => format!("{root}.{}", v.field),
    };
    FieldViolation::new(field, v.description)
}

fn set_transfer_source(spec: &mut v1::JobSpec, id: &str) {
    if let Some(v1::job_spec::Experiment::CifarCvae(c)) = spec.experiment.as_mut() {
        if let Some(v1::initialization::Kind::Transfer(t)) =
            c.init.as_mut().and_then(|i| i.kind.as_mut())
        {
            t.source_job_id = id.to_owned();
        }
    }
}

fn is_transfer(spec: &v1::JobSpec) -> bool {
    matches!(
        spec.experiment.as_ref(),
        Some(v1::job_spec::Experiment::CifarCvae(v1::CifarCvae {
            init: Some(v1::Initialization {
                kind: Some(v1::initialization::Kind::Transfer(_))
            }),
            ..
        }))
    )
}

fn check_name(field: &str, value: &str, max: usize) -> Result<(), FieldViolation> {
    crate::spec::check_text(field, value, max, false)
}

fn arm_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_.+=-".contains(c)
}

impl TryFrom<v1::SweepSpec> for SweepPlan {
    type Error = FieldViolation;

    fn try_from(raw: v1::SweepSpec) -> Result<Self, Self::Error> {
        check_name("spec.name", &raw.name, MAX_NAME_CHARS)?;
        crate::spec::validate_labels("spec.labels", &raw.labels)?;
        for key in [LABEL_SWEEP, LABEL_SWEEP_ID, LABEL_ARM, LABEL_SEED] {
            if raw.labels.contains_key(key) {
                return Err(FieldViolation::new(
                    format!("spec.labels[{key:?}]"),
                    "is set by the sweep on every run",
                ));
            }
        }
        if raw.labels.len() + 4 > MAX_LABELS {
            return Err(FieldViolation::new(
                "spec.labels",
                format!(
                    "at most {} labels (runs also carry sweep, sweep_id, arm and seed), got {}",
                    MAX_LABELS - 4,
                    raw.labels.len()
                ),
            ));
        }
        // Seeds.
        if raw.seeds.is_empty() || raw.seeds.len() > MAX_SEEDS {
            return Err(FieldViolation::new(
                "spec.seeds",
                format!("must have 1..={MAX_SEEDS} seeds, got {}", raw.seeds.len()),
            ));
        }
        let mut seen = HashMap::new();
        for (i, s) in raw.seeds.iter().enumerate() {
            if let Some(k) = seen.insert(*s, i) {
                return Err(FieldViolation::new(
                    format!("spec.seeds[{i}]"),
                    format!("seed {s} repeats spec.seeds[{k}]"),
                ));
            }
        }
        let first_seed = raw.seeds[0];
        // The base alone.
        let base = raw
            .base
            .clone()
            .ok_or_else(|| FieldViolation::new("spec.base", "is required"))?;
        let plain = SweepPlan {
            name: raw.name.clone(),
            labels: raw
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            seeds: raw.seeds.clone(),
            arms: Vec::new(),
            kind: "",
            source: raw.source.clone(),
            raw: raw.clone(),
        };
        // The source stage.
        if let Some(result) = plain.source_spec(first_seed, "") {
            let source = result?;
            if source.experiment.kind() != "mnist_classifier" {
                return Err(FieldViolation::new(
                    "spec.source",
                    format!(
                        "must be an mnist_classifier spec, got {}",
                        source.experiment.kind()
                    ),
                ));
            }
        }
        let base_json = serde_json::to_value(&base).expect("a prost message serialises to JSON");
        // Axes, each value applied to the base alone (so a bad value is named exactly).
        if raw.grid.len() > MAX_AXES {
            return Err(FieldViolation::new(
                "spec.grid",
                format!("at most {MAX_AXES} axes, got {}", raw.grid.len()),
            ));
        }
        let mut axes = Vec::with_capacity(raw.grid.len());
        let mut arm_count: usize = 1;
        for (i, axis) in raw.grid.iter().enumerate() {
            let axis = parse_axis(i, axis)?;
            if let Some(k) = axes.iter().position(|a: &Axis| a.path == axis.path) {
                return Err(FieldViolation::new(
                    format!("spec.grid[{i}].field"),
                    format!("repeats spec.grid[{k}].field"),
                ));
            }
            arm_count = arm_count.saturating_mul(axis.values.len());
            axes.push(axis);
        }
        if arm_count > MAX_ARMS {
            return Err(FieldViolation::new(
                "spec.grid",
                format!("at most {MAX_ARMS} arms, got {arm_count}"),
            ));
        }
        // Before the arms are built: a sweep over the job limit costs no validation work.
        let seeds = raw.seeds.len();
        let sources = if raw.source.is_some() { seeds } else { 0 };
        let jobs = arm_count * seeds + sources;
        if jobs > MAX_JOBS {
            let plus = if sources > 0 {
                format!(" + {sources} sources")
            } else {
                String::new()
            };
            return Err(FieldViolation::new(
                "spec.seeds",
                format!(
                    "a sweep has at most {MAX_JOBS} jobs, got {jobs} ({arm_count} arms x {seeds} seeds{plus})"
                ),
            ));
        }
        // The arms: the Cartesian product, first axis slowest.
        let mut arms: Vec<Arm> = Vec::with_capacity(arm_count);
        let mut specs_seen: Vec<Value> = Vec::with_capacity(arm_count);
        for index in 0..arm_count {
            let mut rem = index;
            let mut picks = vec![0usize; axes.len()];
            for (k, axis) in axes.iter().enumerate().rev() {
                picks[k] = rem % axis.values.len();
                rem /= axis.values.len();
            }
            let mut json = base_json.clone();
            let mut names = Vec::with_capacity(axes.len());
            for (axis, &j) in axes.iter().zip(&picks) {
                set_path(&mut json, &axis.path, axis.values[j].clone())
                    .map_err(|e| FieldViolation::new("spec.grid", e))?;
                names.push(axis.names[j].clone());
            }
            let name = if names.is_empty() {
                "base".to_owned()
            } else {
                names.join(",")
            };
            if name == SOURCE_ARM {
                return Err(FieldViolation::new(
                    "spec.grid",
                    "no arm may be called source (the source stage's name): name the values",
                ));
            }
            if name.chars().count() > MAX_ARM_NAME_CHARS {
                return Err(FieldViolation::new(
                    "spec.grid",
                    format!(
                        "arm name {name:?} is longer than {MAX_ARM_NAME_CHARS} characters: give the values shorter names"
                    ),
                ));
            }
            let (spec, arm) = match check_arm(&plain, json, name.clone(), first_seed) {
                Ok(ok) => ok,
                Err(e) => return Err(attribute(&plain, &base_json, &axes, &picks, &name, e)),
            };
            let normal = serde_json::to_value(&spec).expect("a prost message serialises to JSON");
            if let Some(k) = specs_seen.iter().position(|s| *s == normal) {
                return Err(FieldViolation::new(
                    "spec.grid",
                    format!("arms {} and {name} have the same spec", arms[k].name),
                ));
            }
            specs_seen.push(normal);
            arms.push(arm);
        }
        if plain.source.is_some() && !arms.iter().any(|a| a.from_source) {
            return Err(FieldViolation::new(
                "spec.source",
                "no arm transfers from the source stage: drop it, or give an arm a transfer initialisation",
            ));
        }
        let mut plan = plain;
        plan.arms = arms;
        let mut kinds = HashSet::new();
        for arm in &plan.arms {
            kinds.insert(arm.kind);
        }
        plan.kind = match kinds.len() {
            1 => kinds.into_iter().next().expect("one kind"),
            _ => {
                return Err(FieldViolation::new(
                    "spec.grid",
                    "every arm must be the same experiment kind",
                ))
            }
        };
        Ok(plan)
    }
}

/// An arm from its resulting spec: whether it transfers, and whether from the source stage.
fn arm_of(
    plan: &SweepPlan,
    spec: v1::JobSpec,
    name: String,
    field: &str,
) -> Result<Arm, FieldViolation> {
    let transfer = is_transfer(&spec);
    let from_source = transfer && plan.source.is_some();
    if transfer && !from_source {
        let own = match spec.experiment.as_ref() {
            Some(v1::job_spec::Experiment::CifarCvae(c)) => {
                match c.init.as_ref().and_then(|i| i.kind.as_ref()) {
                    Some(v1::initialization::Kind::Transfer(t)) => t.source_job_id.clone(),
                    _ => String::new(),
                }
            }
            _ => String::new(),
        };
        if own.is_empty() {
            return Err(FieldViolation::new(
                field,
                format!("arm {name} transfers but the sweep has no source stage and the transfer names no source_job_id"),
            ));
        }
    }
    Ok(Arm {
        name,
        random_init: !transfer,
        from_source,
        kind: "",
        spec,
    })
}

/// Why an arm's JSON is not a valid run: the message of the JSON mapping or of validation.
enum ArmError {
    /// The JSON does not read back as a JobSpec (`unknown field` and the like).
    Json(String),
    Invalid(FieldViolation),
}

/// Reads an arm's JSON back and validates its first run (transfer sources as the placeholder).
fn check_arm(
    plan: &SweepPlan,
    json: Value,
    name: String,
    seed: u64,
) -> Result<(v1::JobSpec, Arm), ArmError> {
    let spec = from_json(json).map_err(ArmError::Json)?;
    let mut arm = arm_of(plan, spec.clone(), name, "spec.grid").map_err(ArmError::Invalid)?;
    let mut p = plan.clone();
    p.arms = vec![arm.clone()];
    let id = arm.from_source.then_some(SOURCE_PLACEHOLDER);
    let run = p.run_spec(0, seed, "", id).map_err(ArmError::Invalid)?;
    arm.kind = run.experiment.kind();
    Ok((spec, arm))
}

/// Names the grid value that makes an arm invalid: the first of the arm's values that is
/// invalid applied to the base alone; otherwise the combination (`spec.grid`, naming the arm).
fn attribute(
    plan: &SweepPlan,
    base: &Value,
    axes: &[Axis],
    picks: &[usize],
    name: &str,
    error: ArmError,
) -> FieldViolation {
    if check_arm(plan, base.clone(), String::new(), plan.seeds[0]).is_err() {
        // The base is invalid on its own: report the arm's violation (under `spec.base`).
        return match error {
            ArmError::Json(e) => FieldViolation::new("spec.base", e),
            ArmError::Invalid(v) => v,
        };
    }
    for (i, (axis, &j)) in axes.iter().zip(picks).enumerate() {
        let mut json = base.clone();
        if set_path(&mut json, &axis.path, axis.values[j].clone()).is_err() {
            return FieldViolation::new(
                format!("spec.grid[{i}].field"),
                format!(
                    "{:?} does not lead to a field of JobSpec",
                    axis.field_text()
                ),
            );
        }
        match check_arm(plan, json, String::new(), plan.seeds[0]) {
            Ok(_) => {}
            Err(ArmError::Json(e)) if e.contains("unknown field") => {
                return FieldViolation::new(
                    format!("spec.grid[{i}].field"),
                    format!("{:?} is not a JobSpec field: {e}", axis.field_text()),
                )
            }
            Err(ArmError::Json(e)) => {
                return FieldViolation::new(
                    format!("spec.grid[{i}].values[{j}]"),
                    format!("does not fit the field: {e}"),
                )
            }
            Err(ArmError::Invalid(v)) => {
                return FieldViolation::new(
                    format!("spec.grid[{i}].values[{j}]"),
                    format!("gives an invalid spec: {v}"),
                )
            }
        }
    }
    let why = match error {
        ArmError::Json(e) => e,
        ArmError::Invalid(v) => v.to_string(),
    };
    FieldViolation::new("spec.grid", format!("arm {name} is invalid: {why}"))
}

/// Whether a validated job spec starts from random initialisation.
pub fn random_init(spec: &JobSpec) -> bool {
    match &spec.experiment {
        crate::spec::Experiment::CifarCvae(c) => c.init == Init::Random,
        crate::spec::Experiment::MnistClassifier => true,
    }
}

mod axis;
#[cfg(test)]
mod tests;
