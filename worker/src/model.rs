//! The seed document's models (../shared/seed/000_3d3eca26d24ab1f5.txt), with parameter names
//! that are the shared checkpoint contract: `conv1.weight`, `conv1.bias`, ... exactly as the
//! PyTorch modules name them, so a checkpoint loads into the reference classes and back.
//!
//! Layers are initialised like PyTorch's defaults (weights and biases uniform in
//! `±1/sqrt(fan_in)`), so experiments compare with the seed's runs. Forward passes use fallible
//! (`f_*`) ops and return `TchError` rather than panic (a bad shape or an out-of-memory on the
//! device must become a job error). Must not hold optimiser state, data or metrics: that is
//! [`crate::train`]'s business.

use tch::{nn, TchError, Tensor};

/// PyTorch's default initialisation for a layer with `fan_in` inputs: `kaiming_uniform_(a=√5)`
/// for the weight and `U(±1/√fan_in)` for the bias, which are the same bound.
fn torch_default_init(fan_in: i64) -> nn::Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    nn::Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// A 2-D convolution layer (`nn.Conv2d` with square kernel, stride 1): `weight
/// [out, in, k, k]`, `bias [out]`.
#[derive(Debug)]
pub struct Conv2d {
    pub ws: Tensor,
    pub bs: Tensor,
    pub padding: i64,
}

impl Conv2d {
    /// `nn.Conv2d(in, out, k, padding=padding)` with PyTorch's default init, as `weight` and
    /// `bias` under `vs`.
    pub fn new(vs: nn::Path, in_ch: i64, out_ch: i64, k: i64, padding: i64) -> Self {
        let init = torch_default_init(in_ch * k * k);
        let ws = vs.var("weight", &[out_ch, in_ch, k, k], init);
        let bs = vs.var("bias", &[out_ch], init);
        Self { ws, bs, padding }
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        xs.f_conv2d(
            &self.ws,
            Some(&self.bs),
            [1, 1],
            [self.padding, self.padding],
            [1, 1],
            1,
        )
    }
}

/// A fully connected layer (`nn.Linear`): `weight [out, in]`, `bias [out]`.
#[derive(Debug)]
pub struct Linear {
    pub ws: Tensor,
    pub bs: Tensor,
}

impl Linear {
    /// `nn.Linear(in, out)` with PyTorch's default init, as `weight` and `bias` under `vs`.
    pub fn new(vs: nn::Path, in_dim: i64, out_dim: i64) -> Self {
        let init = torch_default_init(in_dim);
        let ws = vs.var("weight", &[out_dim, in_dim], init);
        let bs = vs.var("bias", &[out_dim], init);
        Self { ws, bs }
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        xs.f_linear(&self.ws, Some(&self.bs))
    }
}

/// `F.relu(F.max_pool2d(x, 2))`.
fn pool_relu(xs: &Tensor) -> Result<Tensor, TchError> {
    xs.f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)?
        .f_relu()
}

/// The seed's `MNISTClassifier` (Code Example 1): two 3x3 convolutions (padding 1) each followed
/// by 2x2 max-pooling and ReLU, then 3136 -> 128 -> 10 fully connected. Input `f32 [B,1,28,28]`,
/// output logits `[B,10]`.
#[derive(Debug)]
pub struct MnistClassifier {
    pub conv1: Conv2d,
    pub conv2: Conv2d,
    pub fc1: Linear,
    pub fc2: Linear,
}

impl MnistClassifier {
    /// Flattened features after the convolutions: 7 * 7 * 64.
    pub const FEATURES: i64 = 7 * 7 * 64;
    pub const CLASSES: i64 = 10;

    /// Creates the parameters under `vs` as `conv1.*`, `conv2.*`, `fc1.*`, `fc2.*`.
    pub fn new(vs: &nn::Path) -> Self {
        Self {
            conv1: Conv2d::new(vs / "conv1", 1, 32, 3, 1),
            conv2: Conv2d::new(vs / "conv2", 32, 64, 3, 1),
            fc1: Linear::new(vs / "fc1", Self::FEATURES, 128),
            fc2: Linear::new(vs / "fc2", 128, Self::CLASSES),
        }
    }

    /// Logits for a batch of images `[B,1,28,28]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        let x = pool_relu(&self.conv1.forward(xs)?)?;
        let x = pool_relu(&self.conv2.forward(&x)?)?;
        // The seed's `x.view(-1, 7*7*64)`; flatten(1) fails instead of silently regrouping a
        // batch whose images had the wrong size.
        let x = x.f_flatten(1, -1)?;
        let x = self.fc1.forward(&x)?.f_relu()?;
        self.fc2.forward(&x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::seeded;
    use tch::{Device, Kind};

    #[test]
    fn classifier_parameters_have_the_checkpoint_names_and_shapes() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _m = seeded(0, || MnistClassifier::new(&vs.root()));
        let mut got: Vec<(String, Vec<i64>)> = vs
            .variables()
            .into_iter()
            .map(|(k, t)| (k, t.size()))
            .collect();
        got.sort();
        let want: Vec<(String, Vec<i64>)> = vec![
            ("conv1.bias".into(), vec![32]),
            ("conv1.weight".into(), vec![32, 1, 3, 3]),
            ("conv2.bias".into(), vec![64]),
            ("conv2.weight".into(), vec![64, 32, 3, 3]),
            ("fc1.bias".into(), vec![128]),
            ("fc1.weight".into(), vec![128, 3136]),
            ("fc2.bias".into(), vec![10]),
            ("fc2.weight".into(), vec![10, 128]),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn classifier_init_matches_pytorch_bounds_and_forward_gives_logits() {
        // All draws under the RNG lock, so that tests training in parallel stay deterministic.
        let (_vs, m) = seeded(0, || {
            let vs = nn::VarStore::new(Device::Cpu);
            let m = MnistClassifier::new(&vs.root());
            (vs, m)
        });
        let bound = |t: &Tensor| f64::try_from(t.abs().max()).expect("scalar");
        // fan_in 3136: bound 1/56.
        assert!(bound(&m.fc1.ws) <= 1.0 / 56.0 + 1e-7);
        assert!(bound(&m.fc1.ws) > 0.9 / 56.0);
        assert!(bound(&m.conv1.bs) <= 1.0 / 3.0 + 1e-7);
        let (x, wrong) = seeded(1, || {
            let opts = (Kind::Float, Device::Cpu);
            (
                Tensor::rand([5, 1, 28, 28], opts),
                Tensor::rand([5, 1, 32, 32], opts),
            )
        });
        let y = m.forward(&x).expect("forward");
        assert_eq!(y.size(), [5, 10]);
        assert!(
            m.forward(&wrong).is_err(),
            "wrong image size is an error, not a panic"
        );
    }
}
