//! The seed's experiments end to end, on CPU at small sizes: the MNIST classifier on real MNIST,
//! then a transfer CVAE (waiting on it) and a random CVAE on generated CIFAR-100-format data,
//! through the real coordinator and worker; checkpoints checked in Python against the classes of
//! bench/torch_reference.py.

use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::v1::{self, JobState};
use tests::*;
use tokio_stream::StreamExt;

fn cvae_spec(name: &str, init: serde_json::Value) -> v1::JobSpec {
    let json = serde_json::json!({
        "name": name,
        "labels": {"study": "system"},
        "training": {"epochs": 2, "batchSize": 64, "learningRate": 0.001, "seed": 3,
                     "maxTrainExamples": 2000, "maxTestExamples": 500, "logEverySteps": 10},
        "cifarCvae": {"init": init}
    });
    serde_json::from_value(json).expect("cvae spec")
}

async fn download(
    client: &mut v1::job_service_client::JobServiceClient<tonic::transport::Channel>,
    job_id: &str,
    kind: &str,
) -> (v1::Artifact, Vec<u8>) {
    let request = v1::DownloadArtifactRequest {
        job_id: job_id.into(),
        kind: kind.into(),
        ..Default::default()
    };
    let mut stream = client
        .download_artifact(request)
        .await
        .expect("download")
        .into_inner();
    let (mut record, mut bytes) = (None, Vec::new());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        if let Some(a) = chunk.artifact {
            record = Some(a);
        }
        bytes.extend_from_slice(&chunk.data);
    }
    let record = record.expect("first chunk carries the artifact record");
    assert_eq!(record.size_bytes as usize, bytes.len());
    (record, bytes)
}

fn python() -> PathBuf {
    let p = std::env::var("TRAINQ_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join(".tools/python"));
    assert!(
        p.exists(),
        "{} missing: run scripts/setup.sh (it installs torch and safetensors)",
        p.display()
    );
    p
}

fn reference_script() -> PathBuf {
    let p = workspace_root().join("bench/torch_reference.py");
    assert!(p.exists(), "{} missing", p.display());
    p
}

/// Loads the checkpoints into the reference PyTorch classes (strict) and checks the transfer
/// arithmetic on the CVAE's first-epoch checkpoint (conv1 and conv2 frozen during epoch 1).
fn check_in_python(classifier: &Path, cvae_epoch1: &Path, cvae_final: &Path) {
    let script = r#"
import importlib.util, sys
import torch, safetensors.torch as st
spec = importlib.util.spec_from_file_location("ref", sys.argv[1]); ref = importlib.util.module_from_spec(spec); spec.loader.exec_module(ref)
clf = st.load_file(sys.argv[2]); e1 = st.load_file(sys.argv[3]); fin = st.load_file(sys.argv[4])
m = ref.MnistClassifier(); m.load_state_dict(clf, strict=True)
for sd in (e1, fin):
    c = ref.Cvae(); c.load_state_dict(sd, strict=True)
    c.loss(torch.rand(2, 3, 32, 32), torch.nn.functional.one_hot(torch.tensor([1, 2]), 100).float())
assert clf["conv1.weight"].shape == (32, 1, 3, 3) and e1["conv1.weight"].shape == (32, 3, 3, 3)
assert torch.equal(e1["conv2.weight"], clf["conv2.weight"]) and torch.equal(e1["conv2.bias"], clf["conv2.bias"])
for ch in range(3):
    assert torch.allclose(e1["conv1.weight"][:, ch:ch+1], clf["conv1.weight"] / 3, atol=1e-7)
assert not torch.equal(fin["conv2.weight"], clf["conv2.weight"]), "conv2 should train after the frozen epoch"
print("python-ok", sorted(fin.keys()))
"#;
    let out = std::process::Command::new(python())
        .arg("-c")
        .arg(script)
        .arg(reference_script())
        .args([classifier, cvae_epoch1, cvae_final])
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python check failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("python-ok"), "{stdout}");
    for name in [
        "conv1.weight",
        "conv3.bias",
        "fc_mu.weight",
        "fc_sigma.weight",
        "fc_dec.weight",
        "conv_dec3.weight",
    ] {
        assert!(
            stdout.contains(&format!("'{name}'")),
            "{name} missing from {stdout}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_cvae_waits_for_its_classifier_and_both_cvaes_train_with_checkpoints_and_images()
{
    let _guard = training_lock();
    let env = TestEnv::new();
    let data = data_dir_with_cifar(&env.dir.path().join("data"), 2000, 500, 7);
    let coordinator = env.start_coordinator(&[]).await;
    let mut client = coordinator.client().await;

    let classifier: v1::JobSpec =
        serde_json::from_str(&mnist_spec_json("source", 1, 2000, 500)).expect("spec");
    let source_id = client
        .submit_job(v1::SubmitJobRequest {
            spec: Some(classifier),
            request_id: String::new(),
        })
        .await
        .expect("submit")
        .into_inner()
        .job_id;

    // The seed's naive copy is refused at submit, naming both shapes.
    let naive = serde_json::json!({"spec": {"name": "naive", "training": {"epochs": 1, "batchSize": 8, "learningRate": 0.001},
        "cifarCvae": {"init": {"transfer": {"sourceJobId": source_id, "conv1": "CONV1_ADAPTATION_NAIVE_COPY", "copyConv2": true}}}}});
    let out = coordinator.grpcurl(
        Some(&naive.to_string()),
        &["trainq.v1.JobService/SubmitJob"],
    );
    assert!(
        !out.success && out.stderr.contains("InvalidArgument"),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("spec.cifar_cvae.init.transfer.conv1"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("[32, 1, 3, 3]") && out.stderr.contains("[32, 3, 3, 3]"),
        "{}",
        out.stderr
    );

    let transfer = cvae_spec(
        "transfer",
        serde_json::json!({"transfer": {"sourceJobId": source_id, "conv1": "CONV1_ADAPTATION_REPLICATE_THIRD",
                                        "copyConv2": true, "freeze": {"firstEpochs": 1}}}),
    );
    let submitted = client
        .submit_job(v1::SubmitJobRequest {
            spec: Some(transfer),
            request_id: String::new(),
        })
        .await
        .expect("submit")
        .into_inner();
    assert_eq!(
        submitted.state(),
        JobState::Waiting,
        "a transfer waits for its source"
    );
    let transfer_id = submitted.job_id;
    let random = cvae_spec("random", serde_json::json!({"random": {}}));
    let random_id = client
        .submit_job(v1::SubmitJobRequest {
            spec: Some(random),
            request_id: String::new(),
        })
        .await
        .expect("submit")
        .into_inner()
        .job_id;

    let mut worker = env.start_worker_with_data(&coordinator, "worker-x", &data, &[]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        worker.is_running(),
        "worker exited at start:\n{}",
        worker.log()
    );
    for id in [&source_id, &transfer_id, &random_id] {
        let job = wait_terminal(&mut client, id, Duration::from_secs(600))
            .await
            .expect("job ends");
        assert_eq!(
            job.state(),
            JobState::Succeeded,
            "job {} ({id}): {}",
            job.spec.as_ref().map(|s| s.name.as_str()).unwrap_or(""),
            job.error
        );
    }

    for id in [&transfer_id, &random_id] {
        let metrics = client
            .get_metrics(v1::GetMetricsRequest {
                job_id: id.clone(),
                page_size: 5000,
                ..Default::default()
            })
            .await
            .expect("metrics")
            .into_inner()
            .points;
        for name in [
            "train/loss",
            "train/recon",
            "train/kl",
            "test/neg_elbo_nats",
            "test/bits_per_dim",
            "test/recon",
            "test/kl",
        ] {
            assert!(
                metrics.iter().any(|p| p.name == name),
                "{name} missing for {id}"
            );
        }
        let elbo: Vec<_> = metrics
            .iter()
            .filter(|p| p.name == "test/neg_elbo_nats")
            .collect();
        assert_eq!(elbo.len(), 2, "one evaluation per epoch");
        assert!(elbo.iter().all(|p| p.value.is_finite() && p.value > 0.0));
        let bpd = metrics
            .iter()
            .find(|p| p.name == "test/bits_per_dim" && p.step == elbo[1].step)
            .expect("bpd");
        assert!(
            (bpd.value - elbo[1].value / (3072.0 * std::f64::consts::LN_2)).abs()
                < 1e-6 * bpd.value.max(1.0)
        );

        let listed = client
            .list_artifacts(v1::ListArtifactsRequest {
                job_id: id.clone(),
                kind: String::new(),
            })
            .await
            .expect("list artifacts")
            .into_inner()
            .artifacts;
        let names: Vec<(&str, &str)> = listed
            .iter()
            .map(|a| (a.kind.as_str(), a.name.as_str()))
            .collect();
        for want in [
            ("checkpoint", "epoch-001.safetensors"),
            ("checkpoint", "epoch-002.safetensors"),
            ("samples", "samples.png"),
            ("reconstructions", "reconstructions.png"),
        ] {
            assert!(names.contains(&want), "{want:?} missing from {names:?}");
        }
        let (_, png) = download(&mut client, id, "samples").await;
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "samples.png is a PNG");
    }

    // Checkpoints: the classifier's final one, and the transfer CVAE's first and last.
    let dir = env.dir.path();
    let (_, clf) = download(&mut client, &source_id, "checkpoint").await;
    let listed = client
        .list_artifacts(v1::ListArtifactsRequest {
            job_id: transfer_id.clone(),
            kind: "checkpoint".into(),
        })
        .await
        .expect("list")
        .into_inner()
        .artifacts;
    let epoch1 = listed
        .iter()
        .find(|a| a.epoch == 1)
        .expect("epoch-1 checkpoint");
    let mut stream = client
        .download_artifact(v1::DownloadArtifactRequest {
            artifact_id: epoch1.id.clone(),
            ..Default::default()
        })
        .await
        .expect("download by id")
        .into_inner();
    let mut e1 = Vec::new();
    while let Some(chunk) = stream.next().await {
        e1.extend_from_slice(&chunk.expect("chunk").data);
    }
    let (_, last) = download(&mut client, &transfer_id, "checkpoint").await;
    let paths = [
        dir.join("clf.safetensors"),
        dir.join("e1.safetensors"),
        dir.join("last.safetensors"),
    ];
    for (p, bytes) in paths.iter().zip([&clf, &e1, &last]) {
        std::fs::write(p, bytes).expect("write checkpoint");
    }
    check_in_python(&paths[0], &paths[1], &paths[2]);
}
