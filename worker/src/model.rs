//! The seed document's models (its code examples 1 and 3): its `MNISTClassifier`
//! and its `CVAE_CIFAR100`, with parameter names that are the shared checkpoint contract
//! (`conv1.weight`, `conv1.bias`, ..., `fc_sigma.*`, `conv_dec3.*`) exactly as the PyTorch
//! modules name them, so a checkpoint loads into the reference classes and back.
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

/// A transposed convolution (`nn.ConvTranspose2d(in, out, k, stride=k)`): `weight [in, out, k, k]`
/// (PyTorch's layout), `bias [out]`.
#[derive(Debug)]
pub struct ConvTranspose2d {
    pub ws: Tensor,
    pub bs: Tensor,
    pub stride: i64,
}

impl ConvTranspose2d {
    /// `nn.ConvTranspose2d(in, out, k, stride=stride)` with PyTorch's default init. PyTorch
    /// computes a transposed convolution's fan-in from `weight.size(1)`, which is `out`.
    pub fn new(vs: nn::Path, in_ch: i64, out_ch: i64, k: i64, stride: i64) -> Self {
        let init = torch_default_init(out_ch * k * k);
        let ws = vs.var("weight", &[in_ch, out_ch, k, k], init);
        let bs = vs.var("bias", &[out_ch], init);
        Self { ws, bs, stride }
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor, TchError> {
        xs.f_conv_transpose2d(
            &self.ws,
            Some(&self.bs),
            [self.stride, self.stride],
            [0, 0],
            [0, 0],
            1,
            [1, 1],
        )
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

/// The seed's `CVAE_CIFAR100` (Code Example 3), conditioned on the one-hot fine label.
///
/// Encoder: three 3x3 convolutions (3->32->64->128, padding 1), each followed by 2x2 max-pooling
/// and ReLU, flattened to 2048; `fc_mu` and `fc_sigma` (which holds the log-variance, as in the
/// seed) map it to the latent. Decoder: `fc_dec` (latent + 100 -> 2048) and ReLU, viewed as
/// `[B,128,4,4]`, then transposed convolutions 128->64->32->3 (kernel 2, stride 2), ReLU between
/// them. The decoder returns logits: the seed's final sigmoid is folded into the loss
/// (binary cross-entropy with logits), and applied by [`Cvae::reconstruct`] for images.
#[derive(Debug)]
pub struct Cvae {
    pub conv1: Conv2d,
    pub conv2: Conv2d,
    pub conv3: Conv2d,
    pub fc_mu: Linear,
    pub fc_sigma: Linear,
    pub fc_dec: Linear,
    pub conv_dec1: ConvTranspose2d,
    pub conv_dec2: ConvTranspose2d,
    pub conv_dec3: ConvTranspose2d,
    pub latent_dim: i64,
}

impl Cvae {
    /// Flattened encoder features: 4 * 4 * 128.
    pub const FEATURES: i64 = 4 * 4 * 128;
    /// CIFAR-100 fine labels: the size of the one-hot condition.
    pub const CLASSES: i64 = 100;
    /// Values per image: 3 * 32 * 32 (bits per dimension divide by this).
    pub const DIMS: i64 = 3 * 32 * 32;

    /// Creates the parameters under `vs` with the seed's names (`conv1.*` ... `conv_dec3.*`).
    pub fn new(vs: &nn::Path, latent_dim: i64) -> Self {
        Self {
            conv1: Conv2d::new(vs / "conv1", 3, 32, 3, 1),
            conv2: Conv2d::new(vs / "conv2", 32, 64, 3, 1),
            conv3: Conv2d::new(vs / "conv3", 64, 128, 3, 1),
            fc_mu: Linear::new(vs / "fc_mu", Self::FEATURES, latent_dim),
            fc_sigma: Linear::new(vs / "fc_sigma", Self::FEATURES, latent_dim),
            fc_dec: Linear::new(vs / "fc_dec", latent_dim + Self::CLASSES, Self::FEATURES),
            conv_dec1: ConvTranspose2d::new(vs / "conv_dec1", 128, 64, 2, 2),
            conv_dec2: ConvTranspose2d::new(vs / "conv_dec2", 64, 32, 2, 2),
            conv_dec3: ConvTranspose2d::new(vs / "conv_dec3", 32, 3, 2, 2),
            latent_dim,
        }
    }

    /// `(mu, logvar)`, each `[B, latent]`, for images `f32 [B,3,32,32]` in `[0,1]`.
    pub fn encode(&self, xs: &Tensor) -> Result<(Tensor, Tensor), TchError> {
        let h = pool_relu(&self.conv1.forward(xs)?)?;
        let h = pool_relu(&self.conv2.forward(&h)?)?;
        let h = pool_relu(&self.conv3.forward(&h)?)?;
        // The seed's `x.view(-1, 4*4*128)`; flatten(1) fails on a wrong image size instead of
        // silently regrouping the batch.
        let h = h.f_flatten(1, -1)?;
        Ok((self.fc_mu.forward(&h)?, self.fc_sigma.forward(&h)?))
    }

    /// Image logits `[B,3,32,32]` for latents `z [B, latent]` and one-hot labels `cond [B,100]`.
    pub fn decode(&self, z: &Tensor, cond: &Tensor) -> Result<Tensor, TchError> {
        let h = Tensor::f_cat(&[z, cond], 1)?;
        let h = self.fc_dec.forward(&h)?.f_relu()?.f_view([-1, 128, 4, 4])?;
        let h = self.conv_dec1.forward(&h)?.f_relu()?;
        let h = self.conv_dec2.forward(&h)?.f_relu()?;
        self.conv_dec3.forward(&h)
    }

    /// `mu + exp(logvar / 2) * eps`: the reparameterisation trick with caller-supplied noise
    /// `eps [B, latent]` (so callers decide which generator, and when, draws it).
    pub fn reparameterize(mu: &Tensor, logvar: &Tensor, eps: &Tensor) -> Result<Tensor, TchError> {
        mu.f_add(&logvar.f_mul_scalar(0.5)?.f_exp()?.f_mul(eps)?)
    }

    /// `(logits, mu, logvar)` for images `xs`, labels `cond` and noise `eps`.
    pub fn forward(
        &self,
        xs: &Tensor,
        cond: &Tensor,
        eps: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor), TchError> {
        let (mu, logvar) = self.encode(xs)?;
        let z = Self::reparameterize(&mu, &logvar, eps)?;
        Ok((self.decode(&z, cond)?, mu, logvar))
    }

    /// Reconstructions in `[0,1]` decoded from the posterior means (no noise).
    pub fn reconstruct(&self, xs: &Tensor, cond: &Tensor) -> Result<Tensor, TchError> {
        let (mu, _) = self.encode(xs)?;
        self.decode(&mu, cond)?.f_sigmoid()
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
    fn cvae_parameters_have_the_seeds_names_and_pytorch_shapes() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _m = seeded(0, || Cvae::new(&vs.root(), 20));
        let mut got: Vec<(String, Vec<i64>)> = vs
            .variables()
            .into_iter()
            .map(|(k, t)| (k, t.size()))
            .collect();
        got.sort();
        let want: Vec<(String, Vec<i64>)> = vec![
            ("conv1.bias".into(), vec![32]),
            ("conv1.weight".into(), vec![32, 3, 3, 3]),
            ("conv2.bias".into(), vec![64]),
            ("conv2.weight".into(), vec![64, 32, 3, 3]),
            ("conv3.bias".into(), vec![128]),
            ("conv3.weight".into(), vec![128, 64, 3, 3]),
            ("conv_dec1.bias".into(), vec![64]),
            ("conv_dec1.weight".into(), vec![128, 64, 2, 2]),
            ("conv_dec2.bias".into(), vec![32]),
            ("conv_dec2.weight".into(), vec![64, 32, 2, 2]),
            ("conv_dec3.bias".into(), vec![3]),
            ("conv_dec3.weight".into(), vec![32, 3, 2, 2]),
            ("fc_dec.bias".into(), vec![2048]),
            ("fc_dec.weight".into(), vec![2048, 120]),
            ("fc_mu.bias".into(), vec![20]),
            ("fc_mu.weight".into(), vec![20, 2048]),
            ("fc_sigma.bias".into(), vec![20]),
            ("fc_sigma.weight".into(), vec![20, 2048]),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn cvae_forward_gives_image_logits_and_rejects_wrong_sizes() {
        let (_vs, m) = seeded(0, || {
            let vs = nn::VarStore::new(Device::Cpu);
            let m = Cvae::new(&vs.root(), 8);
            (vs, m)
        });
        let bound = |t: &Tensor| f64::try_from(t.abs().max()).expect("scalar");
        // ConvTranspose2d(128, 64, 2): PyTorch's fan-in is 64 * 2 * 2 = 256, bound 1/16.
        assert!(bound(&m.conv_dec1.ws) <= 1.0 / 16.0 + 1e-7);
        assert!(bound(&m.conv_dec1.ws) > 0.9 / 16.0);
        let opts = (Kind::Float, Device::Cpu);
        let (x, eps, wrong) = seeded(1, || {
            (
                Tensor::rand([4, 3, 32, 32], opts),
                Tensor::randn([4, 8], opts),
                Tensor::rand([4, 3, 28, 28], opts),
            )
        });
        let cond = Tensor::eye(Cvae::CLASSES, opts).narrow(0, 0, 4);
        let (logits, mu, logvar) = m.forward(&x, &cond, &eps).expect("forward");
        assert_eq!(logits.size(), [4, 3, 32, 32]);
        assert_eq!(mu.size(), [4, 8]);
        assert_eq!(logvar.size(), [4, 8]);
        let r = m.reconstruct(&x, &cond).expect("reconstruct");
        assert!(f64::try_from(r.min()).expect("min") >= 0.0);
        assert!(f64::try_from(r.max()).expect("max") <= 1.0);
        assert!(m.forward(&wrong, &cond, &eps).is_err());
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
