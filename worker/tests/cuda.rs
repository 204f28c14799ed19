//! GPU checks of the training step (CUDA graph, bf16, channels_last, streams, memory figures).
//! Built only with `--features cuda-tests` and run on a host with a CUDA device (bench/gpu/run.sh
//! carries the test binary to one); without a device every test here fails loudly.
#![cfg(feature = "cuda-tests")]

use proto::spec::{Init, Optimizer, Precision};
use tch::{Device, Kind, Tensor};
use worker::shim;
use worker::train::cvae::{CvaeConfig, CvaeData, CvaeTask};
use worker::train::step::BF16_LOSS_TOLERANCE;
use worker::train::{seeded, sync_device, StepPlan, Stepper, Task};

fn gpu() -> Device {
    assert!(
        shim::cuda_usable(),
        "the cuda-tests need a CUDA device and a shim built with CUDA (built_with_cuda = {})",
        shim::built_with_cuda()
    );
    Device::Cuda(0)
}

fn cvae(device: Device, batch: i64) -> CvaeTask {
    let data = seeded(42, || {
        let opts = (Kind::Float, device);
        CvaeData {
            train_images: Tensor::rand([1024, 3, 32, 32], opts),
            train_labels: Tensor::randint(100, [1024], (Kind::Int64, device)),
            test_images: Tensor::rand([256, 3, 32, 32], opts),
            test_labels: Tensor::randint(100, [256], (Kind::Int64, device)),
        }
    });
    let config = CvaeConfig {
        latent_dim: 20,
        beta: 1.0,
        batch_size: batch,
        optimizer: Optimizer::Adam,
        learning_rate: 1e-3,
        seed: 5,
    };
    CvaeTask::new(data, &config, &Init::Random, None).expect("task")
}

/// Mean training loss of every `window` steps over `steps` steps with `plan`.
fn losses(plan: StepPlan, steps: u64, window: u64) -> (Vec<f64>, Stepper) {
    let device = gpu();
    let mut task = cvae(device, 64);
    let mut stepper = Stepper::new(&mut task, plan, device).expect("stepper");
    let (n, b) = (task.train_len(), task.batch_size());
    let mut out = Vec::new();
    for s in 0..steps {
        let start = (s as i64 * b) % (n - b + 1);
        let idx = Tensor::arange_start(start, start + b, (Kind::Int64, device));
        stepper.step(&mut task, &idx, s + 1).expect("step");
        if (s + 1) % window == 0 {
            let w = task.take_window().expect("window");
            out.push(w[0].1);
        }
    }
    sync_device(device);
    (out, stepper)
}

#[test]
fn the_default_cuda_plan_is_graph_bf16_channels_last() {
    let plan = StepPlan::for_device(gpu(), Precision::Auto);
    assert!(plan.graph && plan.channels_last);
    assert_eq!(plan.bf16, worker::train::step::supports_bf16(gpu()));
}

#[test]
fn a_captured_step_replays_and_trains_like_the_eager_step() {
    let (eager, _) = losses(StepPlan::EAGER_FP32, 60, 20);
    let graph = StepPlan {
        graph: true,
        ..StepPlan::EAGER_FP32
    };
    let (replayed, stepper) = losses(graph, 60, 20);
    assert!(
        stepper.replaying(),
        "fell back: {:?}",
        stepper.fallback_reason()
    );
    for (e, g) in eager.iter().zip(&replayed) {
        assert!((e - g).abs() / e < 1e-3, "eager {e}, graph {g}");
    }
    assert!(
        replayed[2] < replayed[0],
        "the replayed step learns: {replayed:?}"
    );
}

#[test]
fn graph_bf16_channels_last_stays_within_the_bf16_tolerance_of_fp32() {
    let (fp32, _) = losses(StepPlan::EAGER_FP32, 200, 20);
    let plan = StepPlan {
        graph: true,
        bf16: true,
        channels_last: true,
    };
    let (mixed, stepper) = losses(plan, 200, 20);
    assert!(
        stepper.replaying(),
        "fell back: {:?}",
        stepper.fallback_reason()
    );
    for (i, (r, m)) in fp32.iter().zip(&mixed).enumerate() {
        assert!(
            (r - m).abs() / r < BF16_LOSS_TOLERANCE,
            "window {i}: fp32 {r}, graph-bf16-cl {m}"
        );
    }
}

#[test]
fn a_slot_thread_on_its_own_stream_trains_and_memory_is_counted() {
    let device = gpu();
    std::thread::spawn(move || {
        shim::use_pool_stream(device).expect("pool stream");
        shim::cuda_reset_peak(device).expect("reset");
        let mut task = cvae(device, 64);
        let plan = StepPlan::for_device(device, Precision::Auto);
        let mut stepper = Stepper::new(&mut task, plan, device).expect("stepper");
        for s in 0..10u64 {
            let idx = Tensor::arange_start(0, 64, (Kind::Int64, device));
            stepper.step(&mut task, &idx, s + 1).expect("step");
        }
        sync_device(device);
        assert!(stepper.replaying(), "{:?}", stepper.fallback_reason());
        let mem = shim::cuda_memory(device).expect("memory");
        assert!(
            mem.peak_allocated > 0 && mem.reserved >= mem.allocated,
            "{mem:?}"
        );
    })
    .join()
    .expect("slot thread");
}
