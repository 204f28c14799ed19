//! The seed's CVAE_CIFAR100 as a training [`Task`]: reconstruction (binary cross-entropy summed
//! over an image's 3072 values) plus `beta` times the KL divergence to N(0, I), conditioned on the
//! one-hot fine label, from random or transferred initial weights.
//!
//! Like the classifier's task it keeps everything on the device: a step gathers its batch into
//! fixed buffers, looks up the one-hot condition in a precomputed `[100,100]` identity, draws its
//! noise in place into a fixed buffer, and adds the batch's reconstruction and KL sums to device
//! accumulators; nothing is read back to the host until [`Task::take_window`].
//!
//! Randomness: initial weights are drawn under the job's seed ([`super::seeded`]), and each
//! step's noise under the seed of that step ([`super::step_seed`] of the job's seed and the
//! global step), so a run draws the same noise whatever trains beside it in the worker's other
//! slots, and a resumed run draws what the uninterrupted one would have. Evaluation and the
//! sample grid use noise drawn once under fixed seeds, so epochs and jobs are compared on the
//! same noise.
//!
//! Must not do I/O or know about jobs and the network; must not panic on bad shapes (`f_*` ops).

use proto::metric;
use proto::spec::{Cvae as CvaeSpec, Init, Optimizer};
use tch::{nn, Kind, Reduction, TchError, Tensor};

use super::transfer::{self, FreezePlan, SourceLayers};
use super::{build_optimizer_with, seeded, step_seed, ArtifactFile, DeviceSums, Task, TrainError};
use crate::images;
use crate::model::Cvae;
use crate::optim;

/// Seed of the noise evaluation uses (the same for every epoch and every job).
pub const EVAL_NOISE_SEED: i64 = 0x5EED_E7A1;
/// Seed of the latents behind `samples.png`.
pub const SAMPLE_SEED: i64 = 0x05A3_B1E5;
/// Images per evaluation batch.
pub const EVAL_BATCH: i64 = 500;
/// `samples.png`: these fine labels, one row each ...
pub const SAMPLE_CLASSES: [i64; 10] = [0, 10, 20, 30, 40, 50, 60, 70, 80, 90];
/// ... and this many samples per row; `reconstructions.png` shows this many test images.
pub const SAMPLES_PER_CLASS: i64 = 8;

/// CIFAR-100 as the task uses it: `f32 [N,3,32,32]` images in `[0,1]` and `i64 [N]` fine labels
/// (0..100), on the training device.
pub type CvaeData = crate::data::ImageSplits;

/// What the CVAE task needs from a job spec.
#[derive(Debug, Clone)]
pub struct CvaeConfig {
    pub latent_dim: i64,
    pub beta: f64,
    pub batch_size: i64,
    pub optimizer: Optimizer,
    pub learning_rate: f64,
    /// Seed of the initial weights.
    pub seed: i64,
}

impl CvaeConfig {
    pub fn new(spec: &CvaeSpec, training: &proto::spec::Training) -> Self {
        Self {
            latent_dim: i64::from(spec.latent_dim),
            beta: spec.beta,
            batch_size: i64::from(training.batch_size),
            optimizer: training.optimizer,
            learning_rate: training.learning_rate,
            seed: training.seed as i64,
        }
    }
}

/// Reconstruction and KL sums of a batch: `BCE-with-logits(logits, x)` summed, and
/// `0.5 * sum(exp(logvar) + mu^2 - logvar - 1)`.
pub fn loss_terms(
    logits: &Tensor,
    x: &Tensor,
    mu: &Tensor,
    logvar: &Tensor,
) -> Result<(Tensor, Tensor), TchError> {
    let recon =
        logits.f_binary_cross_entropy_with_logits::<Tensor>(x, None, None, Reduction::Sum)?;
    let kl = logvar
        .f_exp()?
        .f_add(&mu.f_square()?)?
        .f_sub(logvar)?
        .f_sub_scalar(1.0)?
        .f_sum(Kind::Float)?
        .f_mul_scalar(0.5)?;
    Ok((recon, kl))
}

/// The seed's CVAE on CIFAR-100.
pub struct CvaeTask {
    vs: nn::VarStore,
    model: Cvae,
    opt: optim::Optimizer,
    beta: f64,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    /// `f32 [100,100]` identity: row `c` is label `c`'s one-hot condition.
    eye: Tensor,
    /// Fixed step buffers: images `[B,3,32,32]`, labels `[B]`, conditions `[B,100]`, noise
    /// `[B,latent]`, refilled in place every step (static shapes and addresses).
    x: Tensor,
    y: Tensor,
    cond: Tensor,
    eps: Tensor,
    /// Evaluation noise `[n_test, latent]`, drawn once under [`EVAL_NOISE_SEED`].
    eval_eps: Tensor,
    /// Sums over the window of the batches' reconstruction and KL sums.
    window: DeviceSums,
    window_steps: i64,
    batch: i64,
    /// The job's seed, which with the step number seeds each step's noise.
    seed: u64,
    /// The transferred parameters and their schedule (None: random initialisation).
    plan: Option<(FreezePlan, Vec<Tensor>)>,
}

impl CvaeTask {
    /// Builds the model (its random initialisation under `config.seed`, then the transferred
    /// layers from `source` when `init` is a transfer), the optimiser and the buffers.
    ///
    /// Takes the process-wide RNG lock itself: do not call it inside [`seeded`].
    pub fn new(
        data: CvaeData,
        config: &CvaeConfig,
        init: &Init,
        source: Option<&SourceLayers>,
    ) -> Result<Self, TrainError> {
        let err = |what: &'static str| move |e: TchError| TrainError::from_tch(what, &e);
        let device = data.train_images.device();
        let n = data.train_images.size()[0];
        let n_test = data.test_images.size()[0];
        if n < 1 || n_test < 1 {
            return Err(TrainError::Permanent(format!(
                "empty data set: {n} training and {n_test} test examples"
            )));
        }
        let latent = config.latent_dim;
        let batch = config.batch_size.clamp(1, n);
        let vs = nn::VarStore::new(device);
        let model = seeded(config.seed, || Cvae::new(&vs.root(), latent));
        let plan = match (init, source) {
            (Init::Random, _) => None,
            (Init::Transfer(t), Some(source)) => {
                transfer::apply(&model, source, t).map_err(err("transferring layers"))?;
                Some(FreezePlan::new(t))
            }
            (Init::Transfer(t), None) => {
                return Err(TrainError::Permanent(format!(
                    "transfer from job {} needs that job's checkpoint and none was given (standalone: pass --source-checkpoint FILE)",
                    t.source_job_id
                )))
            }
        };
        let vars = transfer::named_parameters(&vs);
        let group_of = |name: &str| match &plan {
            Some(p) if p.is_transferred(name) => (!p.excluded_from_optimizer()).then_some(1),
            _ => Some(0),
        };
        let transferred_lr =
            config.learning_rate * plan.as_ref().map_or(1.0, |p| p.lr_multiplier());
        let opt = build_optimizer_with(
            &vars,
            config.optimizer,
            &[config.learning_rate, transferred_lr],
            group_of,
        );
        let plan = match plan {
            Some(p) => {
                let frozen: Vec<Tensor> = p
                    .params
                    .iter()
                    .filter_map(|name| vars.get(name).map(Tensor::shallow_clone))
                    .collect();
                Some((p, frozen))
            }
            None => None,
        };
        let eval_eps = seeded(EVAL_NOISE_SEED, || {
            Tensor::f_randn([n_test, latent], (Kind::Float, device))
        })
        .map_err(err("drawing evaluation noise"))?;
        let f32s = (Kind::Float, device);
        let buffers = || -> Result<_, TchError> {
            Ok((
                Tensor::f_eye(Cvae::CLASSES, f32s)?,
                Tensor::f_zeros([batch, 3, 32, 32], f32s)?,
                Tensor::f_zeros([batch], (Kind::Int64, device))?,
                Tensor::f_zeros([batch, Cvae::CLASSES], f32s)?,
                Tensor::f_zeros([batch, latent], f32s)?,
                DeviceSums::new(device)?,
            ))
        };
        let (eye, x, y, cond, eps, window) = buffers().map_err(err("allocating"))?;
        let mut task = Self {
            vs,
            model,
            opt,
            beta: config.beta,
            train_x: data.train_images,
            train_y: data.train_labels,
            test_x: data.test_images,
            test_y: data.test_labels,
            eye,
            x,
            y,
            cond,
            eps,
            eval_eps,
            window,
            window_steps: 0,
            batch,
            seed: config.seed as u64,
            plan,
        };
        task.begin_epoch(1).map_err(err("freezing layers"))?;
        Ok(task)
    }

    pub fn model(&self) -> &Cvae {
        &self.model
    }

    /// Decoded images in `[0,1]` for latents `z` and labels `labels` (no gradient).
    fn decode_images(&self, z: &Tensor, labels: &Tensor) -> Result<Tensor, TchError> {
        let cond = self.eye.f_index_select(0, labels)?;
        self.model.decode(z, &cond)?.f_sigmoid()
    }
}

impl Task for CvaeTask {
    fn train_len(&self) -> i64 {
        self.train_y.size()[0]
    }

    fn batch_size(&self) -> i64 {
        self.batch
    }

    fn begin_epoch(&mut self, epoch: u32) -> Result<bool, TchError> {
        let mut changed = false;
        if let Some((plan, params)) = &self.plan {
            let trainable = !plan.frozen_in(epoch);
            for p in params {
                if p.requires_grad() != trainable {
                    // Frozen parameters get no gradient, so no optimiser rule (weight decay
                    // included) touches them; libtorch's optimisers skip undefined gradients.
                    let _ = p.f_set_requires_grad(trainable)?;
                    changed = true;
                }
            }
        }
        Ok(changed)
    }

    fn use_channels_last(&mut self) -> Result<(), TchError> {
        super::step::params_to_channels_last(&self.vs)?;
        self.x = crate::shim::channels_last(&self.x)?;
        Ok(())
    }

    fn prepare(&mut self, idx: &Tensor, step: u64) -> Result<(), TchError> {
        let _ = self.train_x.f_index_select_out(&self.x, 0, idx)?;
        let _ = self.train_y.f_index_select_out(&self.y, 0, idx)?;
        let _ = self.eye.f_index_select_out(&self.cond, 0, &self.y)?;
        let _ = seeded(step_seed(self.seed, step), || self.eps.f_normal_(0.0, 1.0))?;
        self.window_steps += 1;
        Ok(())
    }

    fn compute(&mut self) -> Result<(), TchError> {
        self.opt.zero_grad()?;
        let (logits, mu, logvar) = self.model.forward(&self.x, &self.cond, &self.eps)?;
        let (recon, kl) = loss_terms(&logits, &self.x, &mu, &logvar)?;
        let loss = recon
            .f_add(&kl.f_mul_scalar(self.beta)?)?
            .f_div_scalar(self.batch as f64)?;
        loss.f_backward()?;
        self.opt.step()?;
        self.window.add(&recon, &kl)
    }

    fn take_window(&mut self) -> Result<Vec<(&'static str, f64)>, TchError> {
        if self.window_steps == 0 {
            return Ok(Vec::new());
        }
        let [recon, kl] = self.window.take()?;
        let images = (self.window_steps * self.batch) as f64;
        let (recon, kl) = (recon / images, kl / images);
        self.window_steps = 0;
        Ok(vec![
            (metric::TRAIN_LOSS, recon + self.beta * kl),
            (metric::TRAIN_RECON, recon),
            (metric::TRAIN_KL, kl),
        ])
    }

    fn evaluate(&mut self) -> Result<Vec<(&'static str, f64)>, TchError> {
        let _guard = tch::no_grad_guard();
        let device = self.test_x.device();
        let n = self.test_y.size()[0];
        let mut totals = DeviceSums::new(device)?;
        let mut start = 0;
        while start < n {
            let len = EVAL_BATCH.min(n - start);
            let x = self.test_x.f_narrow(0, start, len)?;
            let cond = self
                .eye
                .f_index_select(0, &self.test_y.f_narrow(0, start, len)?)?;
            let eps = self.eval_eps.f_narrow(0, start, len)?;
            let (logits, mu, logvar) = self.model.forward(&x, &cond, &eps)?;
            let (recon, kl) = loss_terms(&logits, &x, &mu, &logvar)?;
            totals.add(&recon, &kl)?;
            start += len;
        }
        let [recon, kl] = totals.read()?;
        let (recon, kl) = (recon / n as f64, kl / n as f64);
        let neg_elbo = recon + kl;
        Ok(vec![
            (metric::TEST_LOSS, recon + self.beta * kl),
            (metric::TEST_NEG_ELBO_NATS, neg_elbo),
            (
                metric::TEST_BITS_PER_DIM,
                neg_elbo / (Cvae::DIMS as f64 * std::f64::consts::LN_2),
            ),
            (metric::TEST_RECON, recon),
            (metric::TEST_KL, kl),
        ])
    }

    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    fn optimizer(&self) -> &optim::Optimizer {
        &self.opt
    }

    fn optimizer_mut(&mut self) -> &mut optim::Optimizer {
        &mut self.opt
    }

    /// `samples.png` (fine labels 0, 10, ..., 90, one row each, [`SAMPLES_PER_CLASS`] samples
    /// with latents drawn under [`SAMPLE_SEED`]) and `reconstructions.png` (the first test images
    /// above their reconstructions from the posterior means).
    fn final_artifacts(&mut self, epoch: u32) -> Result<Vec<ArtifactFile>, TrainError> {
        let err = |what: &'static str| move |e: TchError| TrainError::from_tch(what, &e);
        let image_err = |e: images::ImageError| TrainError::Permanent(e.to_string());
        let _guard = tch::no_grad_guard();
        let device = self.test_x.device();
        let per = SAMPLES_PER_CLASS;
        let count = SAMPLE_CLASSES.len() as i64 * per;
        let z = seeded(SAMPLE_SEED, || {
            Tensor::f_randn([count, self.model.latent_dim], (Kind::Float, device))
        })
        .map_err(err("drawing sample latents"))?;
        let labels: Vec<i64> = SAMPLE_CLASSES
            .iter()
            .flat_map(|&c| std::iter::repeat_n(c, per as usize))
            .collect();
        let samples = Tensor::f_from_slice(&labels)
            .and_then(|l| l.f_to_device(device))
            .and_then(|l| self.decode_images(&z, &l))
            .map_err(err("sampling"))?;
        let samples = images::grid_png(&samples, per as usize).map_err(image_err)?;

        let k = per.min(self.test_y.size()[0]);
        let recon = (|| -> Result<Tensor, TchError> {
            let x = self.test_x.f_narrow(0, 0, k)?;
            let cond = self
                .eye
                .f_index_select(0, &self.test_y.f_narrow(0, 0, k)?)?;
            let r = self.model.reconstruct(&x, &cond)?;
            Tensor::f_cat(&[&x, &r], 0)
        })()
        .map_err(err("reconstructing"))?;
        let recon = images::grid_png(&recon, k as usize).map_err(image_err)?;
        Ok(vec![
            ArtifactFile {
                kind: "samples".into(),
                name: "samples.png".into(),
                epoch,
                step: 0, // set by the training loop
                bytes: samples,
            },
            ArtifactFile {
                kind: "reconstructions".into(),
                name: "reconstructions.png".into(),
                epoch,
                step: 0, // set by the training loop
                bytes: recon,
            },
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint;
    use crate::model::MnistClassifier;
    use crate::train::{train_loop, Event, Outcome};
    use proto::spec::{Conv1Adaptation, Freeze, Training, Transfer};
    use std::collections::BTreeMap;
    use std::sync::atomic::AtomicBool;
    use tch::Device;

    /// Random CIFAR-shaped data (the tests here check mechanics, not learning).
    fn random_data(n_train: i64, n_test: i64) -> CvaeData {
        seeded(42, || {
            let opts = (Kind::Float, Device::Cpu);
            CvaeData {
                train_images: Tensor::rand([n_train, 3, 32, 32], opts),
                train_labels: Tensor::randint(100, [n_train], (Kind::Int64, Device::Cpu)),
                test_images: Tensor::rand([n_test, 3, 32, 32], opts),
                test_labels: Tensor::randint(100, [n_test], (Kind::Int64, Device::Cpu)),
            }
        })
    }

    fn config(optimizer: Optimizer, lr: f64, beta: f64) -> CvaeConfig {
        CvaeConfig {
            latent_dim: 8,
            beta,
            batch_size: 16,
            optimizer,
            learning_rate: lr,
            seed: 5,
        }
    }

    /// A classifier's checkpoint (random weights: the mechanics do not depend on training).
    fn source() -> (BTreeMap<String, Tensor>, SourceLayers) {
        let vs = nn::VarStore::new(Device::Cpu);
        seeded(77, || {
            let _ = MnistClassifier::new(&vs.root());
        });
        let bytes = checkpoint::to_safetensors(&vs).expect("serialises");
        let layers = SourceLayers::from_checkpoint(&bytes).expect("a valid source");
        (vs.variables().into_iter().collect(), layers)
    }

    fn transfer(conv1: Conv1Adaptation, freeze: Freeze) -> Init {
        Init::Transfer(Transfer {
            source_job_id: proto::JobId::parse("source", "0193a5b2-7c4d-7e8f-9a0b-1c2d3e4f5a6b")
                .expect("id"),
            conv1,
            copy_conv2: true,
            freeze,
        })
    }

    fn params(task: &CvaeTask) -> BTreeMap<String, Tensor> {
        task.var_store()
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.detach().copy()))
            .collect()
    }

    fn steps(task: &mut CvaeTask, n: i64) {
        let b = task.batch_size();
        for i in 0..n {
            let idx =
                Tensor::arange_start((i * b) % 64, (i * b) % 64 + b, (Kind::Int64, Device::Cpu));
            task.step(&idx, i as u64 + 1).expect("step");
        }
    }

    fn training(epochs: u32, log_every_steps: u32) -> Training {
        Training {
            epochs,
            batch_size: 16,
            learning_rate: 1e-3,
            optimizer: Optimizer::Adam,
            seed: 3,
            max_train_examples: None,
            max_test_examples: None,
            log_every_steps,
            checkpoint_every_steps: None,
            precision: proto::spec::Precision::Auto,
        }
    }

    /// channels_last (the CUDA default) keeps its layout through a step, since the batch is
    /// gathered straight into the channels_last buffer, and trains like NCHW to float rounding.
    #[test]
    fn a_channels_last_task_keeps_its_layout_and_trains_like_nchw() {
        tch::set_num_threads(1);
        let cl = crate::train::StepPlan {
            channels_last: true,
            ..crate::train::StepPlan::EAGER_FP32
        };
        let mut task = CvaeTask::new(
            random_data(64, 8),
            &config(Optimizer::Adam, 1e-3, 1.0),
            &Init::Random,
            None,
        )
        .expect("task");
        let mut stepper = crate::train::Stepper::new(&mut task, cl, Device::Cpu).expect("stepper");
        let mut plain = CvaeTask::new(
            random_data(64, 8),
            &config(Optimizer::Adam, 1e-3, 1.0),
            &Init::Random,
            None,
        )
        .expect("task");
        for i in 0..6i64 {
            let idx = Tensor::arange_start(i * 8, i * 8 + 16, (Kind::Int64, Device::Cpu));
            stepper.step(&mut task, &idx, i as u64 + 1).expect("step");
            plain.step(&idx, i as u64 + 1).expect("step");
        }
        assert!(
            crate::shim::is_channels_last(&task.x).expect("layout"),
            "x: {:?}",
            task.x.stride()
        );
        assert!(crate::shim::is_channels_last(&task.model.conv2.ws).expect("layout"));
        assert!(
            task.x.equal(&plain.x),
            "the gathered batch has the same values"
        );
        let (a, b) = (
            task.take_window().expect("w"),
            plain.take_window().expect("w"),
        );
        for ((name, x), (_, y)) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-4 * y.abs(),
                "{name}: channels_last {x}, NCHW {y}"
            );
        }
        // Checkpoints are written in the contract's layout whatever the memory format.
        let bytes = checkpoint::to_safetensors(task.var_store()).expect("checkpoint");
        let back = checkpoint::read_safetensors(&bytes).expect("reads");
        let w = &back["conv2.weight"];
        assert!(w.allclose(&task.model.conv2.ws.detach(), 0.0, 0.0, false));
    }

    #[test]
    fn frozen_layers_stay_bit_identical_under_adamw_while_the_rest_trains() {
        tch::set_num_threads(1);
        let (src, layers) = source();
        let init = transfer(Conv1Adaptation::ReplicateThird, Freeze::WholeRun);
        let cfg = config(Optimizer::AdamW, 1e-2, 1.0);
        let mut task = CvaeTask::new(random_data(64, 8), &cfg, &init, Some(&layers)).expect("task");
        let before = params(&task);
        assert!(before["conv2.weight"].equal(&src["conv2.weight"]));
        steps(&mut task, 4);
        let after = params(&task);
        for frozen in ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"] {
            assert!(after[frozen].equal(&before[frozen]), "{frozen} moved");
        }
        for trained in [
            "conv3.weight",
            "fc_mu.weight",
            "fc_dec.weight",
            "conv_dec3.bias",
        ] {
            assert!(
                !after[trained].equal(&before[trained]),
                "{trained} did not train"
            );
        }
    }

    #[test]
    fn first_epochs_freeze_holds_in_epoch_one_and_lifts_in_epoch_two() {
        tch::set_num_threads(1);
        let (src, layers) = source();
        let init = transfer(Conv1Adaptation::Luminance, Freeze::FirstEpochs(1));
        let cfg = config(Optimizer::AdamW, 1e-2, 1.0);
        let mut task = CvaeTask::new(random_data(64, 8), &cfg, &init, Some(&layers)).expect("task");
        let start = params(&task);
        let mut checkpoints = Vec::new();
        let outcome = train_loop(
            &mut task,
            &training(2, 2),
            Device::Cpu,
            &mut |e| {
                if let Event::Artifact(a) = e {
                    if a.kind == checkpoint::KIND {
                        checkpoints.push(checkpoint::read_safetensors(&a.bytes).expect("reads"));
                    }
                }
            },
            &AtomicBool::new(false),
            None,
        )
        .expect("trains");
        assert!(matches!(outcome, Outcome::Succeeded { .. }), "{outcome:?}");
        assert_eq!(checkpoints.len(), 2);
        let (epoch1, epoch2) = (&checkpoints[0], &checkpoints[1]);
        assert!(
            epoch1["conv2.weight"].equal(&src["conv2.weight"]),
            "frozen in epoch 1"
        );
        assert!(epoch1["conv1.weight"].equal(&start["conv1.weight"]));
        assert!(epoch1["conv1.bias"].equal(&src["conv1.bias"]));
        assert!(
            !epoch1["conv3.weight"].equal(&start["conv3.weight"]),
            "conv3 trains"
        );
        assert!(
            !epoch2["conv2.weight"].equal(&src["conv2.weight"]),
            "trains in epoch 2"
        );
        assert!(!epoch2["conv1.weight"].equal(&start["conv1.weight"]));
    }

    #[test]
    fn an_lr_multiplier_slows_only_the_transferred_layers() {
        tch::set_num_threads(1);
        let (_, layers) = source();
        let init = transfer(Conv1Adaptation::KeepRandom, Freeze::LrMultiplier(0.01));
        let lr = 1e-2;
        let mut task = CvaeTask::new(
            random_data(64, 8),
            &config(Optimizer::Adam, lr, 1.0),
            &init,
            Some(&layers),
        )
        .expect("task");
        let before = params(&task);
        steps(&mut task, 3);
        let after = params(&task);
        // Adam moves each element by at most about lr per step.
        let moved =
            |name: &str| f64::try_from((&after[name] - &before[name]).abs().max()).expect("scalar");
        let slow = moved("conv2.weight");
        assert!(
            slow > 0.0 && slow <= 3.0 * lr * 0.01 * 1.01,
            "conv2 moved {slow}"
        );
        assert!(
            moved("conv1.weight") > 3.0 * lr * 0.01 * 2.0,
            "conv1 is not transferred"
        );
        assert!(moved("conv3.weight") > 3.0 * lr * 0.01 * 2.0);
    }

    #[test]
    fn metrics_have_the_contract_names_and_evaluation_is_repeatable() {
        tch::set_num_threads(1);
        let beta = 0.5;
        let cfg = config(Optimizer::Adam, 1e-3, beta);
        let mut task = CvaeTask::new(random_data(64, 20), &cfg, &Init::Random, None).expect("task");
        steps(&mut task, 2);
        let window: BTreeMap<&str, f64> = task.take_window().expect("window").into_iter().collect();
        assert_eq!(
            window.keys().copied().collect::<Vec<_>>(),
            vec![metric::TRAIN_KL, metric::TRAIN_LOSS, metric::TRAIN_RECON]
        );
        let (l, r, k) = (
            window[metric::TRAIN_LOSS],
            window[metric::TRAIN_RECON],
            window[metric::TRAIN_KL],
        );
        assert!((l - (r + beta * k)).abs() < 1e-6 * l, "{window:?}");
        // BCE of 3072 values against random targets, near ln 2 each at the start.
        assert!(r > 1000.0 && r < 5000.0, "{r}");
        assert!(task.take_window().expect("empty").is_empty());

        let eval: BTreeMap<&str, f64> = task.evaluate().expect("eval").into_iter().collect();
        let again: BTreeMap<&str, f64> = task.evaluate().expect("eval").into_iter().collect();
        assert_eq!(eval, again, "evaluation noise is fixed");
        let nelbo = eval[metric::TEST_NEG_ELBO_NATS];
        assert!((nelbo - (eval[metric::TEST_RECON] + eval[metric::TEST_KL])).abs() < 1e-9 * nelbo);
        let bpd = nelbo / (3072.0 * std::f64::consts::LN_2);
        assert!((eval[metric::TEST_BITS_PER_DIM] - bpd).abs() < 1e-12);
        let loss = eval[metric::TEST_RECON] + beta * eval[metric::TEST_KL];
        assert!((eval[metric::TEST_LOSS] - loss).abs() < 1e-9 * loss);
    }

    #[test]
    fn the_run_ends_with_sample_and_reconstruction_grids() {
        tch::set_num_threads(1);
        let cfg = config(Optimizer::Adam, 1e-3, 1.0);
        let mut task = CvaeTask::new(random_data(32, 10), &cfg, &Init::Random, None).expect("task");
        let files = task.final_artifacts(4).expect("grids");
        let got: Vec<(&str, &str, u32)> = files
            .iter()
            .map(|f| (f.kind.as_str(), f.name.as_str(), f.epoch))
            .collect();
        assert_eq!(
            got,
            vec![
                ("samples", "samples.png", 4),
                ("reconstructions", "reconstructions.png", 4)
            ]
        );
        let size = |bytes: &[u8]| {
            let info = png::Decoder::new(std::io::Cursor::new(bytes))
                .read_info()
                .expect("a png")
                .info()
                .clone();
            (info.width, info.height)
        };
        let cell = 32 + images::PAD as u32;
        let pad = images::PAD as u32;
        assert_eq!(size(&files[0].bytes), (8 * cell + pad, 10 * cell + pad));
        assert_eq!(size(&files[1].bytes), (8 * cell + pad, 2 * cell + pad));
        let again = task.final_artifacts(4).expect("grids");
        assert_eq!(again[0].bytes, files[0].bytes, "samples use a fixed seed");
    }

    #[test]
    fn a_transfer_without_its_checkpoint_is_permanent() {
        let cfg = config(Optimizer::Adam, 1e-3, 1.0);
        let init = transfer(Conv1Adaptation::ReplicateThird, Freeze::None);
        let err = CvaeTask::new(random_data(8, 2), &cfg, &init, None)
            .err()
            .expect("no source");
        assert!(err.is_permanent(), "{err}");
    }
}
