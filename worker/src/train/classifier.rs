//! The seed's MNIST classifier as a training [`Task`]: cross-entropy, training accuracy and test
//! loss and accuracy accumulated on the device.
//!
//! Must not drive the loop or know about other tasks: `train` runs it, `trainer` builds it.

use proto::metric;
use proto::spec::Optimizer;
use tch::nn;
use tch::{Kind, Reduction, TchError, Tensor};

use super::{build_optimizer, DeviceSums, Task};
use crate::data::MnistTensors;
use crate::model::MnistClassifier;
use crate::optim;

/// Images per evaluation batch (the last one of a test set may be smaller).
pub const EVAL_BATCH: i64 = 1000;

/// The seed's MNIST classifier trained with cross-entropy.
pub struct ClassifierTask {
    vs: nn::VarStore,
    model: MnistClassifier,
    opt: optim::Optimizer,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    /// Fixed batch buffers `[B,1,28,28]` and `[B]`, refilled in place every step, so a step's
    /// inputs have static shapes and addresses (CUDA-graph friendly).
    x: Tensor,
    y: Tensor,
    /// The window's sum of mean batch losses and its correct training predictions.
    window: DeviceSums,
    window_steps: i64,
    batch: i64,
}

impl ClassifierTask {
    /// Builds the model (on the data's device, from the current RNG state) and its optimiser.
    /// `data` must hold `f32 [N,1,28,28]` images and `i64 [N]` labels.
    pub fn new(
        data: MnistTensors,
        batch_size: i64,
        optimizer: Optimizer,
        lr: f64,
    ) -> Result<Self, TchError> {
        let device = data.train_images.device();
        let n = data.n_train();
        if n < 1 || data.n_test() < 1 {
            return Err(TchError::Shape(format!(
                "empty data set: {n} training and {} test examples",
                data.n_test()
            )));
        }
        let batch = batch_size.clamp(1, n);
        let vs = nn::VarStore::new(device);
        let model = MnistClassifier::new(&vs.root());
        let opt = build_optimizer(&vs, optimizer, lr);
        let dims = data.train_images.size();
        let mut xdims = dims.clone();
        xdims[0] = batch;
        let x = Tensor::f_zeros(xdims.as_slice(), (data.train_images.kind(), device))?;
        let y = Tensor::f_zeros([batch], (Kind::Int64, device))?;
        Ok(Self {
            vs,
            model,
            opt,
            train_x: data.train_images,
            train_y: data.train_labels,
            test_x: data.test_images,
            test_y: data.test_labels,
            x,
            y,
            window: DeviceSums::new(device)?,
            window_steps: 0,
            batch,
        })
    }

    pub fn model(&self) -> &MnistClassifier {
        &self.model
    }
}

impl Task for ClassifierTask {
    fn train_len(&self) -> i64 {
        self.train_y.size()[0]
    }

    fn batch_size(&self) -> i64 {
        self.batch
    }

    fn use_channels_last(&mut self) -> Result<(), TchError> {
        super::step::params_to_channels_last(&self.vs)?;
        self.x = crate::shim::channels_last(&self.x)?;
        Ok(())
    }

    fn prepare(&mut self, idx: &Tensor, _step: u64) -> Result<(), TchError> {
        let _ = self.train_x.f_index_select_out(&self.x, 0, idx)?;
        let _ = self.train_y.f_index_select_out(&self.y, 0, idx)?;
        self.window_steps += 1;
        Ok(())
    }

    fn compute(&mut self) -> Result<(), TchError> {
        self.opt.zero_grad()?;
        let logits = self.model.forward(&self.x)?;
        let loss =
            logits.f_cross_entropy_loss::<Tensor>(&self.y, None, Reduction::Mean, -100, 0.0)?;
        loss.f_backward()?;
        self.opt.step()?;
        let correct = tch::no_grad(|| {
            logits
                .f_argmax(1, false)?
                .f_eq_tensor(&self.y)?
                .f_sum(Kind::Double)
        })?;
        self.window.add(&loss, &correct)
    }

    fn take_window(&mut self) -> Result<Vec<(&'static str, f64)>, TchError> {
        if self.window_steps == 0 {
            return Ok(Vec::new());
        }
        let [loss, correct] = self.window.take()?;
        let steps = self.window_steps as f64;
        self.window_steps = 0;
        Ok(vec![
            (metric::TRAIN_LOSS, loss / steps),
            (
                metric::TRAIN_ACCURACY,
                correct / (steps * self.batch as f64),
            ),
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
            let y = self.test_y.f_narrow(0, start, len)?;
            let logits = self.model.forward(&x)?;
            let loss =
                logits.f_cross_entropy_loss::<Tensor>(&y, None, Reduction::Sum, -100, 0.0)?;
            let correct = logits
                .f_argmax(1, false)?
                .f_eq_tensor(&y)?
                .f_sum(Kind::Double)?;
            totals.add(&loss, &correct)?;
            start += len;
        }
        let [loss, correct] = totals.read()?;
        Ok(vec![
            (metric::TEST_LOSS, loss / n as f64),
            (metric::TEST_ACCURACY, correct / n as f64),
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
}
