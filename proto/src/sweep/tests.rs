use super::*;
use crate::ids::JobId;

fn val(json: serde_json::Value) -> pbjson_types::Value {
    serde_json::from_value(json).expect("a JSON value is a google.protobuf.Value")
}

fn cvae_base() -> v1::JobSpec {
    serde_json::from_value(serde_json::json!({
        "name": "ignored",
        "training": {"epochs": 2, "batchSize": 64, "learningRate": 0.001},
        "cifarCvae": {}
    }))
    .expect("valid JSON mapping")
}

fn classifier() -> v1::JobSpec {
    serde_json::from_value(serde_json::json!({
        "name": "src",
        "training": {"epochs": 1, "batchSize": 64, "learningRate": 0.001},
        "mnistClassifier": {}
    }))
    .expect("valid JSON mapping")
}

fn axis(field: &str, values: Vec<serde_json::Value>) -> v1::GridAxis {
    v1::GridAxis {
        field: field.into(),
        values: values.into_iter().map(val).collect(),
        names: vec![],
    }
}

fn transfer(conv1: &str) -> serde_json::Value {
    serde_json::json!({"transfer": {"conv1": conv1, "copyConv2": true}})
}

/// Random vs two transfers, times two learning rates, with a source stage and two seeds.
fn study() -> v1::SweepSpec {
    v1::SweepSpec {
        name: "study".into(),
        labels: [("team".to_owned(), "ml".to_owned())].into(),
        base: Some(cvae_base()),
        grid: vec![
            axis(
                "cifarCvae.init",
                vec![
                    serde_json::json!({"random": {}}),
                    transfer("CONV1_ADAPTATION_LUMINANCE"),
                    transfer("CONV1_ADAPTATION_REPLICATE_THIRD"),
                ],
            ),
            axis(
                "training.learningRate",
                vec![serde_json::json!(0.001), serde_json::json!(0.01)],
            ),
        ],
        seeds: vec![7, 3],
        source: Some(classifier()),
    }
}

fn violation(spec: v1::SweepSpec) -> FieldViolation {
    SweepPlan::try_from(spec).expect_err("invalid sweep")
}

#[test]
fn arms_are_the_cartesian_product_with_the_first_axis_slowest() {
    let plan = SweepPlan::try_from(study()).expect("valid");
    let names: Vec<&str> = plan.arms.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "random,0.001",
            "random,0.01",
            "transfer.conv1=luminance+copyConv2,0.001",
            "transfer.conv1=luminance+copyConv2,0.01",
            "transfer.conv1=replicate_third+copyConv2,0.001",
            "transfer.conv1=replicate_third+copyConv2,0.01",
        ]
    );
    let random: Vec<bool> = plan.arms.iter().map(|a| a.random_init).collect();
    assert_eq!(random, [true, true, false, false, false, false]);
    assert_eq!(plan.kind, "cifar_cvae");
}

#[test]
fn runs_list_sources_first_then_arm_by_arm_seed_by_seed() {
    let plan = SweepPlan::try_from(study()).expect("valid");
    let runs = plan.runs();
    assert_eq!(runs.len(), 2 + 6 * 2);
    assert_eq!(runs[0], PlannedRun { arm: None, seed: 7 });
    assert_eq!(runs[1], PlannedRun { arm: None, seed: 3 });
    assert_eq!(
        runs[2],
        PlannedRun {
            arm: Some(0),
            seed: 7
        }
    );
    assert_eq!(
        runs[3],
        PlannedRun {
            arm: Some(0),
            seed: 3
        }
    );
    assert_eq!(
        runs[13],
        PlannedRun {
            arm: Some(5),
            seed: 3
        }
    );
}

#[test]
fn a_run_is_named_seeded_labelled_and_transfers_from_its_seeds_source() {
    let plan = SweepPlan::try_from(study()).expect("valid");
    let source_id = "11111111-2222-3333-4444-555555555555";
    let run = plan
        .run_spec(3, 3, "sweep-uuid", Some(source_id))
        .expect("valid run");
    assert_eq!(run.name, "study/transfer.conv1=luminance+copyConv2,0.01/s3");
    assert_eq!(run.training.seed, 3);
    assert_eq!(run.training.learning_rate, 0.01);
    assert_eq!(
        run.dependencies,
        [JobId::parse("id", source_id).expect("id")]
    );
    assert_eq!(run.labels["sweep"], "study");
    assert_eq!(run.labels["sweep_id"], "sweep-uuid");
    assert_eq!(run.labels["arm"], "transfer.conv1=luminance+copyConv2,0.01");
    assert_eq!(run.labels["seed"], "3");
    assert_eq!(run.labels["team"], "ml");
    let source = plan
        .source_spec(7, "x")
        .expect("a source stage")
        .expect("valid");
    assert_eq!(source.name, "study/source/s7");
    assert_eq!(source.training.seed, 7);
    assert_eq!(source.labels["arm"], "source");
    let random = plan.run_spec(0, 7, "", None).expect("valid");
    assert!(random.dependencies.is_empty());
    assert!(random_init(&random));
    // A transfer arm needs its source; a random arm takes none.
    assert_eq!(
        plan.run_spec(3, 7, "", None).expect_err("refused").field,
        "spec.source"
    );
    assert_eq!(
        plan.run_spec(0, 7, "", Some(source_id))
            .expect_err("refused")
            .field,
        "spec.source"
    );
}

#[test]
fn no_axes_is_one_arm_named_base() {
    let mut s = study();
    s.grid.clear();
    s.source = None;
    let plan = SweepPlan::try_from(s).expect("valid");
    assert_eq!(plan.arms.len(), 1);
    assert_eq!(plan.arms[0].name, "base");
    assert_eq!(plan.runs().len(), 2);
}

#[test]
fn given_names_replace_derived_ones_and_whole_numbers_fit_integer_fields() {
    let mut s = study();
    s.grid[1].names = vec!["lr-small".into(), "lr-big".into()];
    s.grid.push(axis(
        "training.batchSize",
        vec![serde_json::json!(32), serde_json::json!(128)],
    ));
    let plan = SweepPlan::try_from(s).expect("valid");
    assert_eq!(plan.arms[0].name, "random,lr-small,32");
    assert_eq!(plan.arms[1].name, "random,lr-small,128");
    let run = plan.run_spec(1, 7, "", None).expect("valid");
    assert_eq!(run.training.batch_size, 128);
}

#[test]
fn derived_names_are_restricted_and_made_unique() {
    assert_eq!(derive_name(&serde_json::json!("OPTIMIZER_SGD")), "sgd");
    assert_eq!(derive_name(&serde_json::json!("a b/c")), "a_b_c");
    assert_eq!(derive_name(&serde_json::json!(1e-3)), "0.001");
    assert_eq!(
        derive_name(&serde_json::json!({"wholeRun": true})),
        "wholeRun"
    );
    assert_eq!(
        derive_name(&serde_json::json!({"firstEpochs": 2})),
        "firstEpochs=2"
    );
    let mut s = study();
    s.grid = vec![axis(
        "cifarCvae.init",
        vec![
            serde_json::json!({"random": {}}),
            serde_json::json!({"transfer": {"conv1": "CONV1_ADAPTATION_LUMINANCE", "copyConv2": true, "freeze": {"lrMultiplier": 0.5}}}),
            serde_json::json!({"transfer": {"conv1": "CONV1_ADAPTATION_LUMINANCE", "copyConv2": true, "freeze": {"lrMultiplier": 0.25}}}),
        ],
    )];
    let plan = SweepPlan::try_from(s).expect("valid");
    assert!(plan.arms.iter().all(|a| a
        .name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_.+=-,".contains(c))));
    assert_ne!(plan.arms[1].name, plan.arms[2].name);
}

#[test]
fn an_axis_into_a_transfer_combines_with_an_axis_that_makes_it() {
    let mut s = study();
    s.grid = vec![
        axis(
            "cifarCvae.init",
            vec![transfer("CONV1_ADAPTATION_LUMINANCE")],
        ),
        axis(
            "cifarCvae.init.transfer.freeze",
            vec![
                serde_json::json!({"wholeRun": true}),
                serde_json::json!({"firstEpochs": 1}),
            ],
        ),
    ];
    s.grid[0].names = vec!["lum".into()];
    let plan = SweepPlan::try_from(s).expect("valid");
    assert_eq!(plan.arms[0].name, "lum,wholeRun");
    assert_eq!(plan.arms[1].name, "lum,firstEpochs=1");
}

#[test]
fn each_violation_names_its_field() {
    type Change = Box<dyn Fn(&mut v1::SweepSpec)>;
    let cases: Vec<(Change, &str)> = vec![
        (Box::new(|s| s.name.clear()), "spec.name"),
        (Box::new(|s| s.name = "x".repeat(129)), "spec.name"),
        (
            Box::new(|s| {
                s.labels.insert("arm".into(), "x".into());
            }),
            "spec.labels[\"arm\"]",
        ),
        (Box::new(|s| s.base = None), "spec.base"),
        (
            Box::new(|s| {
                s.base
                    .as_mut()
                    .expect("base")
                    .training
                    .as_mut()
                    .expect("training")
                    .epochs = 0
            }),
            "spec.base.training.epochs",
        ),
        (Box::new(|s| s.seeds.clear()), "spec.seeds"),
        (Box::new(|s| s.seeds = (0..101).collect()), "spec.seeds"),
        (Box::new(|s| s.seeds = vec![1, 2, 3, 2]), "spec.seeds[3]"),
        (Box::new(|s| s.source = Some(cvae_base())), "spec.source"),
        (
            Box::new(|s| s.source.as_mut().expect("source").training = None),
            "spec.source.training",
        ),
        (
            Box::new(|s| {
                s.grid = (0..9)
                    .map(|i| axis("training.epochs", vec![serde_json::json!(i + 1)]))
                    .collect()
            }),
            "spec.grid",
        ),
        (
            Box::new(|s| s.grid[1].field = "training.seed".into()),
            "spec.grid[1].field",
        ),
        (
            Box::new(|s| s.grid[1].field = "labels.x".into()),
            "spec.grid[1].field",
        ),
        (
            Box::new(|s| s.grid[1].field = "dependsOn".into()),
            "spec.grid[1].field",
        ),
        (
            Box::new(|s| s.grid[1].field = "training.learning_rate".into()),
            "spec.grid[1].field",
        ),
        (
            Box::new(|s| s.grid[1].field = "training.nope".into()),
            "spec.grid[1].field",
        ),
        (
            Box::new(|s| s.grid[1].field = String::new()),
            "spec.grid[1].field",
        ),
        (
            Box::new(|s| s.grid[1].field = "cifarCvae.init".into()),
            "spec.grid[1].field",
        ),
        (
            Box::new(|s| s.grid[1].values.clear()),
            "spec.grid[1].values",
        ),
        (
            Box::new(|s| s.grid[1].values.push(val(serde_json::json!(0.001)))),
            "spec.grid[1].values[2]",
        ),
        (
            Box::new(|s| s.grid[1].values.push(val(serde_json::json!(100.0)))),
            "spec.grid[1].values[2]",
        ),
        (
            Box::new(|s| s.grid[1].values.push(val(serde_json::json!("fast")))),
            "spec.grid[1].values[2]",
        ),
        (
            Box::new(|s| {
                s.grid[0]
                    .values
                    .push(val(transfer("CONV1_ADAPTATION_NAIVE_COPY")))
            }),
            "spec.grid[0].values[3]",
        ),
        (
            Box::new(|s| s.grid[1].names = vec!["a".into()]),
            "spec.grid[1].names",
        ),
        (
            Box::new(|s| s.grid[1].names = vec!["a".into(), "b c".into()]),
            "spec.grid[1].names[1]",
        ),
        (
            Box::new(|s| s.grid[1].names = vec!["a".into(), "a".into()]),
            "spec.grid[1].names[1]",
        ),
        (
            Box::new(|s| {
                s.grid = vec![
                    axis(
                        "training.epochs",
                        (1..=20).map(|i| serde_json::json!(i)).collect(),
                    ),
                    axis(
                        "training.batchSize",
                        (1..=20).map(|i| serde_json::json!(i)).collect(),
                    ),
                ]
            }),
            "spec.grid",
        ),
        (
            Box::new(|s| {
                s.grid = vec![axis(
                    "cifarCvae.init",
                    vec![serde_json::json!({"random": {}})],
                )];
            }),
            "spec.source",
        ),
    ];
    for (i, (change, field)) in cases.into_iter().enumerate() {
        let mut s = study();
        change(&mut s);
        assert_eq!(violation(s).field, field, "case {i}");
    }
}

#[test]
fn a_transfer_arm_without_a_source_stage_needs_its_own_source_job() {
    let mut s = study();
    s.source = None;
    let v = violation(s.clone());
    assert_eq!(v.field, "spec.grid[0].values[1]");
    assert!(v.description.contains("no source stage"), "{v}");
    s.grid[0].values = vec![
        val(serde_json::json!({"random": {}})),
        val(
            serde_json::json!({"transfer": {"conv1": "CONV1_ADAPTATION_LUMINANCE", "sourceJobId": "11111111-2222-3333-4444-555555555555"}}),
        ),
    ];
    let plan = SweepPlan::try_from(s).expect("valid");
    assert!(!plan.arms[2].from_source);
    let run = plan.run_spec(2, 7, "", None).expect("valid");
    assert_eq!(
        run.dependencies,
        [JobId::parse("id", "11111111-2222-3333-4444-555555555555").expect("id")]
    );
}

#[test]
fn two_arms_with_the_same_spec_are_rejected_naming_both() {
    let mut s = study();
    // The base's learning rate is 0.001 already: setting batchSize 64 (the base's) changes nothing.
    s.grid = vec![
        axis(
            "training.batchSize",
            vec![serde_json::json!(64), serde_json::json!(32)],
        ),
        axis(
            "cifarCvae.latentDim",
            vec![
                serde_json::json!(0),
                serde_json::json!(20),
                serde_json::json!(8),
            ],
        ),
    ];
    s.source = None;
    // latentDim 0 and 20 differ in JSON; both are valid and distinct specs.
    assert!(SweepPlan::try_from(s.clone()).is_ok());
    s.grid = vec![axis(
        "cifarCvae.beta",
        vec![serde_json::json!(1.0), serde_json::json!(1)],
    )];
    // 1.0 and 1 are the same value: caught as a repeat.
    assert_eq!(violation(s.clone()).field, "spec.grid[0].values[1]");
    s.grid = vec![axis(
        "cifarCvae.init.transfer",
        vec![
            serde_json::json!({"conv1": "CONV1_ADAPTATION_LUMINANCE", "copyConv2": false, "sourceJobId": "11111111-2222-3333-4444-555555555555"}),
            serde_json::json!({"conv1": "CONV1_ADAPTATION_LUMINANCE", "sourceJobId": "11111111-2222-3333-4444-555555555555"}),
        ],
    )];
    s.grid[0].names = vec!["a".into(), "b".into()];
    let v = violation(s);
    assert_eq!(v.field, "spec.grid");
    assert!(v.description.contains("arms a and b"), "{v}");
}

#[test]
fn non_finite_grid_values_are_refused_naming_the_value_instead_of_panicking() {
    use pbjson_types::value::Kind;
    let number = |x: f64| pbjson_types::Value {
        kind: Some(Kind::NumberValue(x)),
    };
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let mut spec = study();
        spec.grid = vec![v1::GridAxis {
            field: "training.learningRate".into(),
            values: vec![number(bad), number(0.01)],
            names: vec![],
        }];
        let err = SweepPlan::try_from(spec).expect_err("non-finite value");
        assert_eq!(err.field, "spec.grid[0].values[0]", "{bad}: {err}");
        // Also inside an object value (a transfer's learning-rate multiplier).
        let mut spec = study();
        let struct_of = |pairs: Vec<(&str, pbjson_types::Value)>| pbjson_types::Value {
            kind: Some(Kind::StructValue(pbjson_types::Struct {
                fields: pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            })),
        };
        let nested = struct_of(vec![(
            "transfer",
            struct_of(vec![
                (
                    "conv1",
                    val(serde_json::json!("CONV1_ADAPTATION_LUMINANCE")),
                ),
                ("copyConv2", val(serde_json::json!(true))),
                ("freeze", struct_of(vec![("lrMultiplier", number(bad))])),
            ]),
        )]);
        spec.grid = vec![v1::GridAxis {
            field: "cifarCvae.init".into(),
            values: vec![val(serde_json::json!({"random": {}})), nested],
            names: vec![],
        }];
        let err = SweepPlan::try_from(spec).expect_err("nested non-finite value");
        assert_eq!(err.field, "spec.grid[0].values[1]", "{bad}: {err}");
    }
}

/// A sweep of `rates` learning rates x `batches` batch sizes (random initialisation) over
/// `seeds` seeds.
fn wide(rates: usize, batches: usize, seeds: u64) -> v1::SweepSpec {
    v1::SweepSpec {
        name: "wide".into(),
        base: Some(cvae_base()),
        grid: vec![
            axis(
                "training.learningRate",
                (1..=rates)
                    .map(|i| serde_json::json!(i as f64 * 1e-4))
                    .collect(),
            ),
            axis(
                "training.batchSize",
                (1..=batches).map(|i| serde_json::json!(i * 16)).collect(),
            ),
        ],
        seeds: (0..seeds).collect(),
        ..Default::default()
    }
}

#[test]
fn a_sweep_may_have_up_to_ten_thousand_jobs_counting_its_sources() {
    let at = SweepPlan::try_from(wide(10, 10, 100)).expect("100 arms x 100 seeds is the limit");
    assert_eq!(at.job_count(), MAX_JOBS);
    assert_eq!(at.runs().len(), MAX_JOBS);
    // The source stage counts: 99 arms (33 random, 66 transfers) x 100 seeds + 100 sources.
    let sourced = |rates: usize, seeds: u64, inits: Vec<serde_json::Value>| {
        let mut s = wide(rates, 1, seeds);
        s.grid.insert(0, axis("cifarCvae.init", inits));
        s.source = Some(classifier());
        s
    };
    let three = || {
        vec![
            serde_json::json!({"random": {}}),
            transfer("CONV1_ADAPTATION_LUMINANCE"),
            transfer("CONV1_ADAPTATION_REPLICATE_THIRD"),
        ]
    };
    let plan = SweepPlan::try_from(sourced(33, 100, three())).expect("99 x 100 + 100 is the limit");
    assert_eq!(plan.job_count(), MAX_JOBS);
    assert_eq!(plan.runs().len(), MAX_JOBS);
    let over = violation(sourced(34, 100, three()));
    assert_eq!(over.field, "spec.seeds");
    assert!(
        over.description
            .ends_with("got 10300 (102 arms x 100 seeds + 100 sources)"),
        "{}",
        over.description
    );
    // One over: 136 arms x 73 seeds + 73 sources.
    let mut four = three();
    four.push(transfer("CONV1_ADAPTATION_KEEP_RANDOM"));
    let over = violation(sourced(34, 73, four));
    assert_eq!(over.field, "spec.seeds");
    assert_eq!(
        over.description,
        "a sweep has at most 10000 jobs, got 10001 (136 arms x 73 seeds + 73 sources)"
    );
}
