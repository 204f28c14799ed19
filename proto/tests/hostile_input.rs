//! Property tests: the spec parser and validator fed hostile input.
//!
//! - Arbitrary bytes (and valid specs with corrupted bytes) decoded as `JobSpec` and as
//!   `SubmitJobRequest`, then validated.
//! - Arbitrary JSON values and arbitrary text read by `JobSpec::from_json`.
//! - Generated valid specs of both experiment kinds, every value inside its documented limit,
//!   and the same specs with exactly one field pushed out of its limit.
//!
//! Nothing may panic; a rejection names a field path under `spec.`; whatever is accepted
//! survives the JSON round trip unchanged.

use std::collections::{BTreeMap, HashMap};

use proptest::prelude::*;
use proptest::sample::Index;
use prost::Message;
use proto::queue::MAX_PRIORITY;
use proto::spec::MAX_GPU_MEMORY_MIB;
use proto::spec::{
    Conv1Adaptation, Experiment, Freeze, Init, JobSpec, Optimizer, Precision, SpecFileError,
};
use proto::v1;
use serde_json::Value;

// The limits and defaults as trainq.proto documents them, written out rather than taken from
// spec.rs, so a constant that drifts from the contract fails here.
const MAX_NAME_CHARS: usize = 128;
const MAX_LABELS: usize = 32;
const MAX_LABEL_KEY_CHARS: usize = 63;
const MAX_LABEL_VALUE_CHARS: usize = 256;
const MAX_EPOCHS: u32 = 1000;
const MAX_BATCH_SIZE: u32 = 8192;
const MAX_LEARNING_RATE: f64 = 10.0;
const MAX_ATTEMPTS: u32 = 20;
const DEFAULT_MAX_ATTEMPTS: u32 = 3;
const MAX_LOG_EVERY_STEPS: u32 = 100_000;
const DEFAULT_LOG_EVERY_STEPS: u32 = 50;
const MAX_CHECKPOINT_EVERY_STEPS: u32 = 1_000_000;
const MAX_DEPENDENCIES: usize = 64;
const MAX_LATENT_DIM: u32 = 512;
const DEFAULT_LATENT_DIM: u32 = 20;
const MAX_BETA: f64 = 100.0;

/// Cases per property: enough to reach every mutation many times, few enough that
/// `cargo test -p proto` stays quick in a debug build.
const CASES: u32 = 512;

/// `PROPTEST_CASES` still overrides the count for a longer run. No regression files in the
/// checkout: a failure worth keeping becomes a unit test.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(CASES);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Checks shared by the properties
// ---------------------------------------------------------------------------------------------

/// What a validated spec must satisfy: it echoes its wire form, and its JSON form reads back
/// (through the same validator) as an equal spec.
fn check_accepted(raw: &v1::JobSpec, spec: &JobSpec) -> Result<(), TestCaseError> {
    prop_assert_eq!(&spec.to_proto(), raw);
    let json = spec.to_json().to_string();
    let back = JobSpec::from_json(&json)
        .map_err(|e| TestCaseError::fail(format!("{json} does not read back: {e}")))?;
    prop_assert_eq!(&back, spec);
    Ok(())
}

/// Validates a decoded wire spec: a rejection names a field under `spec.`, an acceptance
/// round-trips.
fn check_validation(raw: v1::JobSpec) -> Result<(), TestCaseError> {
    match JobSpec::try_from(raw.clone()) {
        Ok(spec) => check_accepted(&raw, &spec),
        Err(v) => {
            prop_assert!(v.field.starts_with("spec."), "field {:?}", v.field);
            prop_assert!(!v.description.is_empty());
            Ok(())
        }
    }
}

/// Reads a JSON spec: either error is fine, but a violation names a field under `spec.` and an
/// accepted spec round-trips.
fn check_json(text: &str) -> Result<(), TestCaseError> {
    match JobSpec::from_json(text) {
        Ok(spec) => check_accepted(&spec.to_proto(), &spec),
        Err(SpecFileError::Invalid(v)) => {
            prop_assert!(v.field.starts_with("spec."), "field {:?}", v.field);
            Ok(())
        }
        Err(SpecFileError::Json(_)) => Ok(()),
    }
}

/// The canonical hyphenated UUID form, written independently of the validator.
fn is_uuid(text: &str) -> bool {
    let groups: Vec<&str> = text.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

// ---------------------------------------------------------------------------------------------
// Valid specs
// ---------------------------------------------------------------------------------------------

/// A length in `lo..=hi`, often one of the ends.
fn size(lo: usize, hi: usize) -> impl Strategy<Value = usize> {
    prop_oneof![Just(lo), Just(hi), lo..=hi]
}

/// Text of `min..=max` characters, none of them a control character.
fn text(min: usize, max: usize) -> BoxedStrategy<String> {
    // Mapped rather than filtered: proptest favours control characters, so a filter would
    // reject too many.
    let char = any::<char>().prop_map(|c| if c.is_control() { '\u{fffd}' } else { c });
    size(min, max)
        .prop_flat_map(move |n| prop::collection::vec(char.clone(), n))
        .prop_map(|cs| cs.into_iter().collect())
        .boxed()
}

const KEY_ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-/";

/// A label key of `min..=max` characters, all of them allowed.
fn key_of(min: usize, max: usize) -> BoxedStrategy<String> {
    let alphabet: Vec<char> = KEY_ALPHABET.chars().collect();
    size(min, max)
        .prop_flat_map(move |n| prop::collection::vec(prop::sample::select(alphabet.clone()), n))
        .prop_map(|cs| cs.into_iter().collect())
        .boxed()
}

fn label_key() -> impl Strategy<Value = String> {
    key_of(1, MAX_LABEL_KEY_CHARS)
}

fn labels(max: usize) -> BoxedStrategy<HashMap<String, String>> {
    size(0, max)
        .prop_flat_map(|n| {
            prop::collection::hash_map(label_key(), text(0, MAX_LABEL_VALUE_CHARS), n)
        })
        .boxed()
}

fn uuid_text(n: u128, upper: bool) -> String {
    let s = format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        n >> 96,
        (n >> 80) & 0xffff,
        (n >> 64) & 0xffff,
        (n >> 48) & 0xffff,
        n & 0xffff_ffff_ffff
    );
    if upper {
        s.to_ascii_uppercase()
    } else {
        s
    }
}

fn uuid() -> impl Strategy<Value = String> {
    (any::<u128>(), any::<bool>()).prop_map(|(n, upper)| uuid_text(n, upper))
}

/// Distinct UUIDs (distinct also ignoring case), each in lower or upper case.
fn distinct_uuids(max: usize) -> BoxedStrategy<Vec<String>> {
    size(0, max)
        .prop_flat_map(|n| prop::collection::hash_set(any::<u128>(), n))
        .prop_flat_map(|set| {
            let n = set.len();
            (
                Just(set.into_iter().collect::<Vec<_>>()),
                prop::collection::vec(any::<bool>(), n),
            )
        })
        .prop_map(|(ids, upper)| {
            ids.into_iter()
                .zip(upper)
                .map(|(n, up)| uuid_text(n, up))
                .collect()
        })
        .boxed()
}

/// A value in `lo..=hi`, often one of the ends.
fn within(lo: u32, hi: u32) -> impl Strategy<Value = u32> {
    prop_oneof![Just(lo), Just(hi), lo..=hi]
}

/// A finite value in (0, max], boundaries included.
fn positive_up_to(max: f64) -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(max),
        Just(f64::MIN_POSITIVE),
        Just(f64::from_bits(1)), // the smallest subnormal
        (0.0..=max).prop_filter("positive", |x| *x > 0.0),
    ]
}

fn training() -> BoxedStrategy<v1::Training> {
    (
        within(1, MAX_EPOCHS),
        within(1, MAX_BATCH_SIZE),
        positive_up_to(MAX_LEARNING_RATE),
        0..=3i32,
        any::<u64>(),
        any::<u32>(),
        any::<u32>(),
        within(0, MAX_LOG_EVERY_STEPS),
        within(0, MAX_CHECKPOINT_EVERY_STEPS),
        0..=3i32,
    )
        .prop_map(
            |(epochs, batch, lr, optimizer, seed, train, test, log, ckpt, precision)| {
                v1::Training {
                    epochs,
                    batch_size: batch,
                    learning_rate: lr,
                    optimizer,
                    seed,
                    max_train_examples: train,
                    max_test_examples: test,
                    log_every_steps: log,
                    checkpoint_every_steps: ckpt,
                    precision,
                }
            },
        )
        .boxed()
}

fn freeze() -> BoxedStrategy<Option<v1::FreezePolicy>> {
    use v1::freeze_policy::Policy;
    let policy = prop_oneof![
        Just(None),
        any::<bool>().prop_map(|b| Some(Policy::WholeRun(b))),
        within(1, MAX_EPOCHS).prop_map(|n| Some(Policy::FirstEpochs(n))),
        positive_up_to(1.0).prop_map(|m| Some(Policy::LrMultiplier(m))),
    ];
    prop::option::of(policy.prop_map(|policy| v1::FreezePolicy { policy })).boxed()
}

fn transfer() -> BoxedStrategy<v1::TransferInit> {
    (uuid(), 1..=3i32, any::<bool>(), freeze())
        .prop_map(|(source, conv1, copy_conv2, freeze)| {
            // Keeping conv1 random and not copying conv2 transfers nothing: a separate mutation.
            let copy_conv2 = copy_conv2 || conv1 == v1::Conv1Adaptation::KeepRandom as i32;
            v1::TransferInit {
                source_job_id: source,
                conv1,
                copy_conv2,
                freeze,
            }
        })
        .boxed()
}

fn experiment() -> BoxedStrategy<v1::job_spec::Experiment> {
    use v1::initialization::Kind;
    let beta = prop_oneof![
        Just(None),
        Just(Some(0.0)),
        Just(Some(-0.0)),
        Just(Some(MAX_BETA)),
        (0.0..=MAX_BETA).prop_map(Some),
    ];
    let init = prop_oneof![
        1 => Just(None),
        1 => Just(Some(v1::Initialization { kind: None })),
        1 => Just(Some(v1::Initialization {
            kind: Some(Kind::Random(v1::RandomInit {}))
        })),
        3 => transfer().prop_map(|t| Some(v1::Initialization {
            kind: Some(Kind::Transfer(t))
        })),
    ];
    prop_oneof![
        Just(v1::job_spec::Experiment::MnistClassifier(
            v1::MnistClassifier {}
        )),
        (within(0, MAX_LATENT_DIM), beta, init).prop_map(|(latent_dim, beta, init)| {
            v1::job_spec::Experiment::CifarCvae(v1::CifarCvae {
                latent_dim,
                beta,
                init,
            })
        }),
    ]
    .boxed()
}

/// A queue name: empty (the default queue) or 1..=32 characters of [a-z0-9-].
fn queue_name() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[a-z0-9-]{1,32}"]
}

/// Resources: unset, or a known device kind with a memory request in range (0: the estimate).
fn resources() -> impl Strategy<Value = Option<v1::Resources>> {
    proptest::option::of(
        (0..=3i32, prop_oneof![Just(0u32), 1..=MAX_GPU_MEMORY_MIB]).prop_map(
            |(device, gpu_memory_mib)| v1::Resources {
                device,
                gpu_memory_mib,
            },
        ),
    )
}

/// A spec with every field inside its documented limit.
fn valid_spec() -> BoxedStrategy<v1::JobSpec> {
    (
        text(1, MAX_NAME_CHARS),
        labels(MAX_LABELS),
        training(),
        within(0, MAX_ATTEMPTS),
        distinct_uuids(MAX_DEPENDENCIES),
        experiment(),
        any::<Option<Index>>(),
        (queue_name(), -MAX_PRIORITY..=MAX_PRIORITY, resources()),
    )
        .prop_map(
            |(
                name,
                labels,
                training,
                max_attempts,
                depends_on,
                experiment,
                source_dep,
                (queue, priority, resources),
            )| {
                let mut spec = v1::JobSpec {
                    name,
                    labels,
                    training: Some(training),
                    max_attempts,
                    depends_on,
                    experiment: Some(experiment),
                    queue,
                    priority,
                    resources,
                };
                // Sometimes the transfer's source is also listed (maybe in another case).
                let deps = spec.depends_on.clone();
                if let (Some(t), Some(i), false) =
                    (transfer_of(&mut spec), source_dep, deps.is_empty())
                {
                    t.source_job_id = deps[i.index(deps.len())].to_ascii_uppercase();
                }
                spec
            },
        )
        .boxed()
}

/// The transfer init of a spec, if it has one.
fn transfer_of(spec: &mut v1::JobSpec) -> Option<&mut v1::TransferInit> {
    match &mut spec.experiment {
        Some(v1::job_spec::Experiment::CifarCvae(v1::CifarCvae {
            init:
                Some(v1::Initialization {
                    kind: Some(v1::initialization::Kind::Transfer(t)),
                }),
            ..
        })) => Some(t),
        _ => None,
    }
}

/// Checks the domain form against the wire form, defaults included (an oracle written apart
/// from the validator).
fn check_domain(raw: &v1::JobSpec, s: &JobSpec) -> Result<(), TestCaseError> {
    prop_assert_eq!(&s.name, &raw.name);
    let labels: BTreeMap<String, String> = raw.labels.clone().into_iter().collect();
    prop_assert_eq!(&s.labels, &labels);
    let t = raw.training.as_ref().expect("generated with training");
    let nonzero = |n: u32| (n > 0).then_some(n);
    prop_assert_eq!(
        (s.training.epochs, s.training.batch_size, s.training.seed),
        (t.epochs, t.batch_size, t.seed)
    );
    prop_assert_eq!(
        s.training.learning_rate.to_bits(),
        t.learning_rate.to_bits()
    );
    let optimizer = match t.optimizer {
        0 | 1 => Optimizer::Adam,
        2 => Optimizer::Sgd,
        _ => Optimizer::AdamW,
    };
    prop_assert_eq!(s.training.optimizer, optimizer);
    prop_assert_eq!(s.training.max_train_examples, nonzero(t.max_train_examples));
    prop_assert_eq!(s.training.max_test_examples, nonzero(t.max_test_examples));
    prop_assert_eq!(
        s.training.log_every_steps,
        nonzero(t.log_every_steps).unwrap_or(DEFAULT_LOG_EVERY_STEPS)
    );
    prop_assert_eq!(
        s.training.checkpoint_every_steps,
        nonzero(t.checkpoint_every_steps)
    );
    let precision = match t.precision {
        2 => Precision::Fp32,
        3 => Precision::Bf16,
        _ => Precision::Auto,
    };
    prop_assert_eq!(s.training.precision, precision);
    prop_assert_eq!(
        s.max_attempts,
        nonzero(raw.max_attempts).unwrap_or(DEFAULT_MAX_ATTEMPTS)
    );

    let mut deps: Vec<String> = raw
        .depends_on
        .iter()
        .map(|d| d.to_ascii_lowercase())
        .collect();
    match (&raw.experiment, &s.experiment) {
        (Some(v1::job_spec::Experiment::MnistClassifier(_)), Experiment::MnistClassifier) => {}
        (Some(v1::job_spec::Experiment::CifarCvae(c)), Experiment::CifarCvae(d)) => {
            prop_assert_eq!(
                d.latent_dim,
                nonzero(c.latent_dim).unwrap_or(DEFAULT_LATENT_DIM)
            );
            prop_assert_eq!(d.beta, c.beta.unwrap_or(1.0));
            let transfer = c.init.as_ref().and_then(|i| match &i.kind {
                Some(v1::initialization::Kind::Transfer(t)) => Some(t),
                _ => None,
            });
            match (transfer, &d.init) {
                (None, Init::Random) => {}
                (Some(t), Init::Transfer(dt)) => {
                    let source = t.source_job_id.to_ascii_lowercase();
                    prop_assert_eq!(&dt.source_job_id.to_string(), &source);
                    if !deps.contains(&source) {
                        deps.push(source);
                    }
                    let conv1 = match t.conv1 {
                        1 => Conv1Adaptation::ReplicateThird,
                        2 => Conv1Adaptation::Luminance,
                        _ => Conv1Adaptation::KeepRandom,
                    };
                    prop_assert_eq!(dt.conv1, conv1);
                    prop_assert_eq!(dt.copy_conv2, t.copy_conv2);
                    prop_assert!(!dt.transferred_layers().is_empty());
                    use v1::freeze_policy::Policy;
                    let freeze = match t.freeze.as_ref().and_then(|f| f.policy) {
                        None | Some(Policy::WholeRun(false)) => Freeze::None,
                        Some(Policy::WholeRun(true)) => Freeze::WholeRun,
                        Some(Policy::FirstEpochs(n)) => Freeze::FirstEpochs(n),
                        Some(Policy::LrMultiplier(m)) => Freeze::LrMultiplier(m),
                    };
                    prop_assert_eq!(dt.freeze, freeze);
                }
                (raw_init, init) => {
                    return Err(TestCaseError::fail(format!(
                        "init {raw_init:?} became {init:?}"
                    )))
                }
            }
        }
        (raw, domain) => {
            return Err(TestCaseError::fail(format!(
                "experiment {raw:?} became {domain:?}"
            )))
        }
    }
    let dependencies: Vec<String> = s.dependencies.iter().map(ToString::to_string).collect();
    prop_assert_eq!(&dependencies, &deps);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// One field out of its limit
// ---------------------------------------------------------------------------------------------

/// Exactly one field pushed out of its documented limit.
#[derive(Debug, Clone)]
enum Break {
    NoTraining,
    NoExperiment,
    Epochs(u32),
    BatchSize(u32),
    LearningRate(f64),
    Optimizer(i32),
    Precision(i32),
    LogEverySteps(u32),
    CheckpointEverySteps(u32),
    MaxAttempts(u32),
    /// Not empty, and not 1..=32 characters of [a-z0-9-].
    Queue(String),
    Priority(i32),
    DeviceKind(i32),
    GpuMemory(u32),
    Name(String),
    /// A control character inserted into the name at this position.
    NameControl(Index, char),
    TooManyLabels(HashMap<String, String>),
    LabelKey(String),
    LabelValue(String, String),
    TooManyDependencies(Vec<String>),
    /// A malformed id replaces (or, in an empty list, becomes) one entry of `depends_on`.
    BadDependency(Index, String),
    /// A repeat (maybe in another case) of one entry inserted after it.
    RepeatedDependency(Index, Index, bool),
    LatentDim(u32),
    Beta(f64),
    SourceJobId(String),
    Conv1(i32),
    NothingTransferred,
    FreezeFirstEpochs(u32),
    FreezeLrMultiplier(f64),
}

fn out_of(lo: u32, hi: u32) -> impl Strategy<Value = u32> {
    // 0 when the limit starts at 1; otherwise just past the top, or anywhere above it.
    let above = prop_oneof![Just(hi + 1), (hi + 1)..=u32::MAX, Just(u32::MAX)];
    if lo == 0 {
        above.boxed()
    } else {
        prop_oneof![Just(0), above].boxed()
    }
}

/// Not a finite number in (0, max] (so also covers <= 0, NaN and the infinities).
fn not_positive_up_to(max: f64) -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(f64::NAN),
        Just(-f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(0.0),
        Just(-0.0),
        Just(-f64::MIN_POSITIVE),
        Just(f64::MIN),
        (-1e300..=0.0f64),
        Just(f64::from_bits(max.to_bits() + 1)),
        Just(f64::MAX),
        (max..1e300).prop_filter("above max", move |x| *x > max),
    ]
}

/// Not a finite number in [0, max].
fn not_in_closed(max: f64) -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(-f64::MIN_POSITIVE),
        Just(-f64::from_bits(1)),
        (-1e300..0.0f64).prop_filter("negative", |x| *x < 0.0),
        Just(f64::from_bits(max.to_bits() + 1)),
        (max..1e300).prop_filter("above max", move |x| *x > max),
    ]
}

fn control_char() -> impl Strategy<Value = char> {
    prop_oneof![0u32..=0x1f, 0x7fu32..=0x9f]
        .prop_map(|n| char::from_u32(n).expect("a C0 or C1 control character"))
}

/// Anything that is not a canonical hyphenated UUID: near misses of one and arbitrary text.
fn bad_uuid() -> BoxedStrategy<String> {
    let near_miss = (uuid(), any::<Index>(), any::<char>()).prop_map(|(u, i, c)| {
        let mut chars: Vec<char> = u.chars().collect();
        let i = i.index(chars.len());
        chars[i] = c;
        chars.into_iter().collect::<String>()
    });
    prop_oneof![
        Just(String::new()),
        uuid().prop_map(|u| u.replace('-', "")),
        uuid().prop_map(|u| format!("{{{u}}}")),
        uuid().prop_map(|u| format!("urn:uuid:{u}")),
        uuid().prop_map(|u| format!(" {u}")),
        uuid().prop_map(|u| u[..35].to_string()),
        near_miss,
        any::<String>(),
    ]
    .prop_filter("not a uuid", |s| !is_uuid(s))
    .boxed()
}

fn a_break() -> BoxedStrategy<Break> {
    let bad_key = prop_oneof![
        Just(String::new()),
        key_of(MAX_LABEL_KEY_CHARS + 1, 100),
        (
            key_of(0, 30),
            any::<char>().prop_filter("outside the key alphabet", |c| !KEY_ALPHABET.contains(*c)),
            key_of(0, 30),
        )
            .prop_map(|(a, c, b)| format!("{a}{c}{b}")),
    ];
    prop_oneof![
        Just(Break::NoTraining),
        Just(Break::NoExperiment),
        out_of(1, MAX_EPOCHS).prop_map(Break::Epochs),
        out_of(1, MAX_BATCH_SIZE).prop_map(Break::BatchSize),
        not_positive_up_to(MAX_LEARNING_RATE).prop_map(Break::LearningRate),
        prop_oneof![4..=i32::MAX, i32::MIN..0].prop_map(Break::Optimizer),
        prop_oneof![4..=i32::MAX, i32::MIN..0].prop_map(Break::Precision),
        out_of(0, MAX_LOG_EVERY_STEPS).prop_map(Break::LogEverySteps),
        out_of(0, MAX_CHECKPOINT_EVERY_STEPS).prop_map(Break::CheckpointEverySteps),
        out_of(0, MAX_ATTEMPTS).prop_map(Break::MaxAttempts),
        prop_oneof![
            "[a-z0-9-]{33,40}",
            "[a-z0-9]{0,5}[A-Z_ :/.][a-z0-9]{0,5}",
            "\\PC{1,3}"
        ]
        .prop_filter("outside the queue name pattern", |q| {
            let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
            !q.is_empty() && (q.len() > 32 || !q.chars().all(allowed))
        })
        .prop_map(Break::Queue),
        prop_oneof![
            Just(MAX_PRIORITY + 1),
            Just(-MAX_PRIORITY - 1),
            (MAX_PRIORITY + 1)..=i32::MAX,
            i32::MIN..=(-MAX_PRIORITY - 1)
        ]
        .prop_map(Break::Priority),
        prop_oneof![4..=i32::MAX, i32::MIN..=-1].prop_map(Break::DeviceKind),
        out_of(0, MAX_GPU_MEMORY_MIB).prop_map(Break::GpuMemory),
        prop_oneof![Just(String::new()), text(MAX_NAME_CHARS + 1, 300)].prop_map(Break::Name),
        (any::<Index>(), control_char()).prop_map(|(i, c)| Break::NameControl(i, c)),
        prop::collection::hash_map(label_key(), text(0, 8), MAX_LABELS + 1..=MAX_LABELS + 10)
            .prop_map(Break::TooManyLabels),
        bad_key.prop_map(Break::LabelKey),
        (label_key(), text(MAX_LABEL_VALUE_CHARS + 1, 400))
            .prop_map(|(k, v)| Break::LabelValue(k, v)),
        prop::collection::vec(
            prop_oneof![uuid(), bad_uuid()],
            MAX_DEPENDENCIES + 1..=MAX_DEPENDENCIES + 40
        )
        .prop_map(Break::TooManyDependencies),
        (any::<Index>(), bad_uuid()).prop_map(|(i, u)| Break::BadDependency(i, u)),
        (any::<Index>(), any::<Index>(), any::<bool>())
            .prop_map(|(a, b, upper)| Break::RepeatedDependency(a, b, upper)),
        out_of(0, MAX_LATENT_DIM).prop_map(Break::LatentDim),
        not_in_closed(MAX_BETA).prop_map(Break::Beta),
        bad_uuid().prop_map(Break::SourceJobId),
        prop_oneof![
            Just(v1::Conv1Adaptation::NaiveCopy as i32),
            Just(v1::Conv1Adaptation::Unspecified as i32),
            5..=i32::MAX,
            i32::MIN..0,
        ]
        .prop_map(Break::Conv1),
        Just(Break::NothingTransferred),
        out_of(1, MAX_EPOCHS).prop_map(Break::FreezeFirstEpochs),
        not_positive_up_to(1.0).prop_map(Break::FreezeLrMultiplier),
    ]
    .boxed()
}

fn training_mut(spec: &mut v1::JobSpec) -> &mut v1::Training {
    spec.training.get_or_insert_with(Default::default)
}

/// The spec's CVAE settings, making it a (default) CVAE first if it is an MNIST classifier.
fn cvae_mut(spec: &mut v1::JobSpec) -> &mut v1::CifarCvae {
    if !matches!(
        spec.experiment,
        Some(v1::job_spec::Experiment::CifarCvae(_))
    ) {
        spec.experiment = Some(v1::job_spec::Experiment::CifarCvae(Default::default()));
    }
    match &mut spec.experiment {
        Some(v1::job_spec::Experiment::CifarCvae(c)) => c,
        _ => unreachable!("just made a cvae"),
    }
}

/// The spec's transfer init, making it a valid transfer first if it has none.
fn transfer_mut(spec: &mut v1::JobSpec) -> &mut v1::TransferInit {
    let c = cvae_mut(spec);
    if !matches!(
        c.init,
        Some(v1::Initialization {
            kind: Some(v1::initialization::Kind::Transfer(_))
        })
    ) {
        c.init = Some(v1::Initialization {
            kind: Some(v1::initialization::Kind::Transfer(v1::TransferInit {
                source_job_id: "0193a5b2-7c4d-7e8f-9a0b-1c2d3e4f5a6b".into(),
                conv1: v1::Conv1Adaptation::Luminance as i32,
                copy_conv2: true,
                freeze: None,
            })),
        });
    }
    match &mut c.init {
        Some(v1::Initialization {
            kind: Some(v1::initialization::Kind::Transfer(t)),
        }) => t,
        _ => unreachable!("just made a transfer"),
    }
}

impl Break {
    /// Breaks `spec` and returns the field path the validator must name.
    fn apply(self, spec: &mut v1::JobSpec) -> String {
        use v1::freeze_policy::Policy;
        const T: &str = "spec.cifar_cvae.init.transfer";
        match self {
            Break::NoTraining => {
                spec.training = None;
                "spec.training".into()
            }
            Break::NoExperiment => {
                spec.experiment = None;
                "spec.experiment".into()
            }
            Break::Epochs(n) => {
                training_mut(spec).epochs = n;
                "spec.training.epochs".into()
            }
            Break::BatchSize(n) => {
                training_mut(spec).batch_size = n;
                "spec.training.batch_size".into()
            }
            Break::LearningRate(x) => {
                training_mut(spec).learning_rate = x;
                "spec.training.learning_rate".into()
            }
            Break::Optimizer(n) => {
                training_mut(spec).optimizer = n;
                "spec.training.optimizer".into()
            }
            Break::Precision(n) => {
                training_mut(spec).precision = n;
                "spec.training.precision".into()
            }
            Break::LogEverySteps(n) => {
                training_mut(spec).log_every_steps = n;
                "spec.training.log_every_steps".into()
            }
            Break::CheckpointEverySteps(n) => {
                training_mut(spec).checkpoint_every_steps = n;
                "spec.training.checkpoint_every_steps".into()
            }
            Break::MaxAttempts(n) => {
                spec.max_attempts = n;
                "spec.max_attempts".into()
            }
            Break::Queue(q) => {
                spec.queue = q;
                "spec.queue".into()
            }
            Break::Priority(p) => {
                spec.priority = p;
                "spec.priority".into()
            }
            Break::DeviceKind(d) => {
                spec.resources.get_or_insert_with(Default::default).device = d;
                "spec.resources.device".into()
            }
            Break::GpuMemory(m) => {
                spec.resources
                    .get_or_insert_with(Default::default)
                    .gpu_memory_mib = m;
                "spec.resources.gpu_memory_mib".into()
            }
            Break::Name(name) => {
                spec.name = name;
                "spec.name".into()
            }
            Break::NameControl(i, c) => {
                let mut chars: Vec<char> = spec.name.chars().take(MAX_NAME_CHARS - 1).collect();
                let at = i.index(chars.len() + 1);
                chars.insert(at, c);
                spec.name = chars.into_iter().collect();
                "spec.name".into()
            }
            Break::TooManyLabels(labels) => {
                spec.labels = labels;
                "spec.labels".into()
            }
            Break::LabelKey(key) => {
                make_room_for_a_label(spec);
                let field = format!("spec.labels[{key:?}]");
                spec.labels.insert(key, "v".into());
                field
            }
            Break::LabelValue(key, value) => {
                if !spec.labels.contains_key(&key) {
                    make_room_for_a_label(spec);
                }
                let field = format!("spec.labels[{key:?}]");
                spec.labels.insert(key, value);
                field
            }
            Break::TooManyDependencies(ids) => {
                spec.depends_on = ids;
                "spec.depends_on".into()
            }
            Break::BadDependency(i, id) => {
                let deps = &mut spec.depends_on;
                if deps.is_empty() {
                    deps.push(id);
                    "spec.depends_on[0]".into()
                } else {
                    let at = i.index(deps.len());
                    deps[at] = id;
                    format!("spec.depends_on[{at}]")
                }
            }
            Break::RepeatedDependency(first, at, upper) => {
                let deps = &mut spec.depends_on;
                deps.truncate(MAX_DEPENDENCIES - 1);
                if deps.is_empty() {
                    deps.push("0193a5b2-7c4d-7e8f-9a0b-1c2d3e4f5a6b".into());
                }
                let first = first.index(deps.len());
                let repeat = if upper {
                    deps[first].to_ascii_uppercase()
                } else {
                    deps[first].to_ascii_lowercase()
                };
                // Anywhere after the original: it is the first entry seen twice.
                let at = first + 1 + at.index(deps.len() - first);
                deps.insert(at, repeat);
                format!("spec.depends_on[{at}]")
            }
            Break::LatentDim(n) => {
                cvae_mut(spec).latent_dim = n;
                "spec.cifar_cvae.latent_dim".into()
            }
            Break::Beta(x) => {
                cvae_mut(spec).beta = Some(x);
                "spec.cifar_cvae.beta".into()
            }
            Break::SourceJobId(id) => {
                transfer_mut(spec).source_job_id = id;
                format!("{T}.source_job_id")
            }
            Break::Conv1(n) => {
                transfer_mut(spec).conv1 = n;
                format!("{T}.conv1")
            }
            Break::NothingTransferred => {
                let t = transfer_mut(spec);
                t.conv1 = v1::Conv1Adaptation::KeepRandom as i32;
                t.copy_conv2 = false;
                T.into()
            }
            Break::FreezeFirstEpochs(n) => {
                transfer_mut(spec).freeze = Some(v1::FreezePolicy {
                    policy: Some(Policy::FirstEpochs(n)),
                });
                format!("{T}.freeze.first_epochs")
            }
            Break::FreezeLrMultiplier(x) => {
                transfer_mut(spec).freeze = Some(v1::FreezePolicy {
                    policy: Some(Policy::LrMultiplier(x)),
                });
                format!("{T}.freeze.lr_multiplier")
            }
        }
    }
}

/// Drops one label when the spec already has the most it may have, so adding one bad label
/// breaks only that label.
fn make_room_for_a_label(spec: &mut v1::JobSpec) {
    if spec.labels.len() >= MAX_LABELS {
        if let Some(k) = spec.labels.keys().next().cloned() {
            spec.labels.remove(&k);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hostile bytes and JSON
// ---------------------------------------------------------------------------------------------

/// Encoded bytes with up to three bytes overwritten or inserted, and maybe cut short.
fn corrupt(encoded: Vec<u8>) -> BoxedStrategy<Vec<u8>> {
    (
        prop::collection::vec((any::<Index>(), any::<u8>(), any::<bool>()), 0..4),
        any::<Option<Index>>(),
    )
        .prop_map(move |(edits, cut)| {
            let mut bytes = encoded.clone();
            for (i, b, insert) in edits {
                if insert || bytes.is_empty() {
                    let at = i.index(bytes.len() + 1);
                    bytes.insert(at, b);
                } else {
                    let at = i.index(bytes.len());
                    bytes[at] = b;
                }
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            bytes
        })
        .boxed()
}

/// One well-formed field: a varint or a length-delimited value under any field number, so it
/// may be unknown, reserved, or a known field with a surprising value or wire type.
fn extra_field() -> BoxedStrategy<Vec<u8>> {
    use prost::encoding::{encode_key, encode_varint, WireType};
    (
        1u32..=40,
        any::<bool>(),
        any::<u64>(),
        prop::collection::vec(any::<u8>(), 0..40),
    )
        .prop_map(|(tag, varint, n, data)| {
            let mut bytes = Vec::new();
            if varint {
                encode_key(tag, WireType::Varint, &mut bytes);
                encode_varint(n, &mut bytes);
            } else {
                encode_key(tag, WireType::LengthDelimited, &mut bytes);
                encode_varint(data.len() as u64, &mut bytes);
                bytes.extend(data);
            }
            bytes
        })
        .boxed()
}

fn hostile_spec_bytes() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        valid_spec().prop_flat_map(|s| corrupt(s.encode_to_vec())),
        (valid_spec(), extra_field()).prop_map(|(s, extra)| [s.encode_to_vec(), extra].concat()),
        (valid_spec(), a_break()).prop_map(|(mut s, b)| {
            b.apply(&mut s);
            s.encode_to_vec()
        }),
    ]
    .boxed()
}

/// Field names of the spec's JSON mapping (both spellings) and enum names: random keys and
/// strings rarely hit them.
const VOCABULARY: &[&str] = &[
    "name",
    "labels",
    "training",
    "maxAttempts",
    "max_attempts",
    "dependsOn",
    "depends_on",
    "mnistClassifier",
    "mnist_classifier",
    "cifarCvae",
    "cifar_cvae",
    "epochs",
    "batchSize",
    "batch_size",
    "learningRate",
    "learning_rate",
    "optimizer",
    "seed",
    "maxTrainExamples",
    "maxTestExamples",
    "logEverySteps",
    "checkpointEverySteps",
    "checkpoint_every_steps",
    "precision",
    "PRECISION_BF16",
    "latentDim",
    "beta",
    "init",
    "random",
    "transfer",
    "sourceJobId",
    "source_job_id",
    "conv1",
    "copyConv2",
    "freeze",
    "wholeRun",
    "firstEpochs",
    "lrMultiplier",
    "OPTIMIZER_SGD",
    "OPTIMIZER_ADAMW",
    "CONV1_ADAPTATION_LUMINANCE",
    "CONV1_ADAPTATION_NAIVE_COPY",
    "CONV1_ADAPTATION_UNSPECIFIED",
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1",
    "4294967296",
    "18446744073709551616",
    "0x10",
    " 1",
    "1.5",
    "0193a5b2-7c4d-7e8f-9a0b-1c2d3e4f5a6b",
];

fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(VOCABULARY).prop_map(String::from),
        1 => any::<String>(),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        prop_oneof![Just(0u32), Just(1), Just(u32::MAX)].prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |x| serde_json::Number::from_f64(x)
            .map(Value::Number)),
        word().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(word(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Every position (a path of object keys and array indices) inside a JSON value, the root too.
fn positions(v: &Value, at: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    out.push(at.clone());
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                at.push(Value::String(k.clone()));
                positions(child, at, out);
                at.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                at.push(Value::from(i));
                positions(child, at, out);
                at.pop();
            }
        }
        _ => {}
    }
}

fn at_mut<'a>(v: &'a mut Value, path: &[Value]) -> &'a mut Value {
    path.iter().fold(v, |v, step| match step {
        Value::String(k) => &mut v[k.as_str()],
        Value::Number(i) => &mut v[i.as_u64().expect("an index") as usize],
        _ => unreachable!("paths hold keys and indices"),
    })
}

/// A valid spec's JSON with one value (anywhere) replaced by arbitrary JSON, or one arbitrary
/// key added to one of its objects.
fn hostile_spec_json() -> BoxedStrategy<Value> {
    (
        valid_spec(),
        any::<Index>(),
        word(),
        json_value(),
        any::<bool>(),
    )
        .prop_map(|(spec, i, key, value, add)| {
            let mut json = serde_json::to_value(&spec).expect("a prost message serialises");
            let mut all = Vec::new();
            positions(&json, &mut Vec::new(), &mut all);
            let target = at_mut(&mut json, &all[i.index(all.len())]);
            match target {
                Value::Object(m) if add => {
                    m.insert(key, value);
                }
                _ => *target = value,
            }
            json
        })
        .boxed()
}

/// JSON text that is almost right: a valid spec's text cut short or with a character inserted.
fn broken_spec_text() -> BoxedStrategy<String> {
    (valid_spec(), any::<Index>(), any::<Option<char>>())
        .prop_map(|(spec, i, c)| {
            let text = serde_json::to_string(&spec).expect("a prost message serialises");
            let mut chars: Vec<char> = text.chars().collect();
            let at = i.index(chars.len() + 1);
            match c {
                Some(c) => chars.insert(at, c),
                None => chars.truncate(at),
            }
            chars.into_iter().collect()
        })
        .boxed()
}

/// Writes a non-finite double the way proto3 JSON does ("NaN", "Infinity", "-Infinity") wherever
/// serde_json left null for it.
fn nulls_to_string(v: &mut Value, x: f64) {
    match v {
        Value::Null => {
            let s = if x.is_nan() {
                "NaN"
            } else if x > 0.0 {
                "Infinity"
            } else {
                "-Infinity"
            };
            *v = Value::String(s.into());
        }
        Value::Object(m) => m.values_mut().for_each(|c| nulls_to_string(c, x)),
        Value::Array(a) => a.iter_mut().for_each(|c| nulls_to_string(c, x)),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_bytes_decoded_as_a_spec_are_validated_without_panicking(
        bytes in hostile_spec_bytes()
    ) {
        if let Ok(raw) = v1::JobSpec::decode(bytes.as_slice()) {
            check_validation(raw)?;
        }
    }

    #[test]
    fn arbitrary_bytes_decoded_as_a_submit_request_are_validated_without_panicking(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..512),
            valid_spec().prop_flat_map(|spec| corrupt(
                v1::SubmitJobRequest { spec: Some(spec), request_id: String::new() }.encode_to_vec()
            )),
        ]
    ) {
        if let Ok(req) = v1::SubmitJobRequest::decode(bytes.as_slice()) {
            if let Some(raw) = req.spec {
                check_validation(raw)?;
            }
        }
    }

    #[test]
    fn arbitrary_json_is_read_as_a_spec_without_panicking(
        json in prop_oneof![json_value(), hostile_spec_json()]
    ) {
        check_json(&json.to_string())?;
    }

    #[test]
    fn arbitrary_text_is_read_as_a_spec_without_panicking(
        text in prop_oneof![
            any::<String>(),
            "[\\[\\]{}:,\"0-9a-zA-Z_ .eE+-]{0,64}",
            broken_spec_text(),
        ]
    ) {
        check_json(&text)?;
    }

    #[test]
    fn a_spec_within_every_limit_is_accepted_and_survives_the_json_round_trip(
        raw in valid_spec()
    ) {
        let spec = JobSpec::try_from(raw.clone())
            .map_err(|e| TestCaseError::fail(format!("valid spec rejected: {e}")))?;
        check_domain(&raw, &spec)?;
        check_accepted(&raw, &spec)?;
        let text = serde_json::to_string(&raw).expect("a prost message serialises");
        let from_text = JobSpec::from_json(&text)
            .map_err(|e| TestCaseError::fail(format!("{text} rejected: {e}")))?;
        prop_assert_eq!(from_text, spec);
    }

    #[test]
    fn a_spec_with_one_field_out_of_its_limit_is_rejected_naming_that_field(
        mut raw in valid_spec(),
        broken in a_break(),
    ) {
        let what = format!("{broken:?}");
        let non_finite = match &broken {
            Break::LearningRate(x) | Break::Beta(x) | Break::FreezeLrMultiplier(x)
                if !x.is_finite() => Some(*x),
            _ => None,
        };
        let field = broken.apply(&mut raw);
        match JobSpec::try_from(raw.clone()) {
            Ok(_) => return Err(TestCaseError::fail(format!("{what} was accepted"))),
            Err(v) => {
                prop_assert_eq!(&v.field, &field, "{} gave {}", what, v);
                prop_assert!(!v.description.is_empty());
            }
        }
        // The JSON route names the same field. An enum number without a name has no JSON form
        // (it does not serialise); NaN and the infinities are written as proto3 JSON writes them,
        // strings, since serde_json would write null (which reads back as unset).
        if let Ok(mut json) = serde_json::to_value(&raw) {
            if let Some(x) = non_finite {
                nulls_to_string(&mut json, x);
            }
            match JobSpec::from_json(&json.to_string()) {
                Err(SpecFileError::Invalid(v)) => prop_assert_eq!(&v.field, &field),
                other => {
                    return Err(TestCaseError::fail(format!("{what} from JSON: {other:?}")))
                }
            }
        }
    }
}
