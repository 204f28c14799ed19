//! The optimisers training uses (Adam, AdamW, plain SGD), written over tensors so that their state
//! (moments and step counts) can be saved in a training state and restored when a job resumes.
//! libtorch's C++ optimisers behind tch's `COptimizer` keep that state out of reach, and a resumed
//! Adam with fresh moments would take large first steps.
//!
//! Semantics follow `torch.optim` with its defaults (Adam betas 0.9 / 0.999, eps 1e-8; AdamW
//! weight decay 0.01, decoupled; SGD without momentum). A parameter whose gradient is undefined
//! (a frozen layer) is skipped and its step count does not advance, as in PyTorch. Parameter
//! groups carry their own learning rate (a transferred layer's multiplier).
//!
//! Every update is a handful of in-place tensor ops on the parameter's device, and a step never
//! synchronises with the device. By default the bias corrections come from host-side step counts
//! (f64, as `torch.optim` computes them). [`Optimizer::make_capturable`] moves the step counts
//! and the learning rates into device tensors and computes the bias corrections there (PyTorch's
//! `capturable=True`), so a step replayed from a CUDA graph advances them itself; the two
//! agree to float rounding. Must not know about jobs or files.

use std::collections::BTreeMap;

use proto::spec::Optimizer as Kind;
use tch::{TchError, Tensor};

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;
const ADAMW_WEIGHT_DECAY: f64 = 0.01;

/// Prefix of every optimiser tensor in a training state: `optimizer.<param>.exp_avg`, ...
pub const STATE_PREFIX: &str = "optimizer.";

struct Param {
    name: String,
    tensor: Tensor,
    /// Adam's first and second moments; allocated at the parameter's first step.
    moments: Option<(Tensor, Tensor)>,
    /// Steps taken on this parameter (Adam's bias correction).
    steps: u64,
    /// Capturable: the step count as an f32 scalar on the parameter's device (the truth, in
    /// place of `steps`).
    steps_t: Option<Tensor>,
}

struct Group {
    lr: f64,
    /// Capturable: `lr` as an f32 scalar on the group's device.
    lr_t: Option<Tensor>,
    params: Vec<Param>,
}

/// An optimiser over named parameters in learning-rate groups.
pub struct Optimizer {
    kind: Kind,
    groups: Vec<Group>,
    capturable: bool,
}

impl Optimizer {
    pub fn new(kind: Kind) -> Self {
        Self {
            kind,
            groups: Vec::new(),
            capturable: false,
        }
    }

    /// Adds a group of `(name, parameter)` pairs trained at `lr`; returns the group's index.
    pub fn add_group(
        &mut self,
        lr: f64,
        params: impl IntoIterator<Item = (String, Tensor)>,
    ) -> usize {
        let params = params
            .into_iter()
            .map(|(name, tensor)| Param {
                name,
                tensor,
                moments: None,
                steps: 0,
                steps_t: None,
            })
            .collect();
        self.groups.push(Group {
            lr,
            lr_t: None,
            params,
        });
        if self.capturable {
            let g = self.groups.len() - 1;
            // Cannot fail for want of a device: a group without parameters gets no tensors.
            let _ = self.capture_group(g);
        }
        self.groups.len() - 1
    }

    /// Moves the step counts and learning rates into device tensors (see the module's doc), so
    /// that [`Optimizer::step`] launches only device work and can be captured in a CUDA graph.
    /// Idempotent; states saved and loaded afterwards read and write the device counts.
    pub fn make_capturable(&mut self) -> Result<(), TchError> {
        self.capturable = true;
        for g in 0..self.groups.len() {
            self.capture_group(g)?;
        }
        Ok(())
    }

    pub fn is_capturable(&self) -> bool {
        self.capturable
    }

    fn capture_group(&mut self, g: usize) -> Result<(), TchError> {
        let group = &mut self.groups[g];
        let Some(first) = group.params.first() else {
            return Ok(());
        };
        let device = first.tensor.device();
        if group.lr_t.is_none() {
            group.lr_t = Some(
                Tensor::f_from_slice(&[group.lr as f32])?
                    .f_to_device(device)?
                    .f_reshape([])?,
            );
        }
        for p in &mut group.params {
            if p.steps_t.is_none() {
                let t = Tensor::f_from_slice(&[p.steps as f32])?
                    .f_to_device(p.tensor.device())?
                    .f_reshape([])?;
                p.steps_t = Some(t);
            }
        }
        Ok(())
    }

    /// Number of parameters the optimiser updates.
    pub fn len(&self) -> usize {
        self.groups.iter().map(|g| g.params.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Zeroes every parameter's gradient (where one is defined).
    pub fn zero_grad(&mut self) -> Result<(), TchError> {
        for p in self.groups.iter_mut().flat_map(|g| g.params.iter_mut()) {
            let mut grad = p.tensor.grad();
            if grad.defined() {
                let _ = grad.f_detach_()?.f_zero_()?;
            }
        }
        Ok(())
    }

    /// One update of every parameter that has a gradient.
    pub fn step(&mut self) -> Result<(), TchError> {
        let _guard = tch::no_grad_guard();
        let kind = self.kind;
        for group in &mut self.groups {
            let lr = group.lr;
            for p in &mut group.params {
                let grad = p.tensor.grad();
                if !grad.defined() {
                    continue;
                }
                match (kind, &group.lr_t) {
                    (Kind::Sgd, None) => {
                        let _ = p.tensor.f_add_(&grad.f_mul_scalar(-lr)?)?;
                    }
                    (Kind::Sgd, Some(lr_t)) => {
                        let _ = p.tensor.f_sub_(&grad.f_mul(lr_t)?)?;
                    }
                    (Kind::Adam | Kind::AdamW, None) => {
                        adam_update(p, &grad, lr, kind == Kind::AdamW)?
                    }
                    (Kind::Adam | Kind::AdamW, Some(lr_t)) => {
                        adam_update_capturable(p, &grad, lr_t, kind == Kind::AdamW)?
                    }
                }
            }
        }
        Ok(())
    }

    /// The state as named tensors (`optimizer.<param>.exp_avg`, `.exp_avg_sq`, `.step`), for
    /// parameters that have taken at least one step. SGD has none.
    pub fn state(&self) -> Result<Vec<(String, Tensor)>, TchError> {
        let mut out = Vec::new();
        for p in self.groups.iter().flat_map(|g| g.params.iter()) {
            if let Some((m, v)) = &p.moments {
                let key = |what: &str| format!("{STATE_PREFIX}{}.{what}", p.name);
                out.push((key("exp_avg"), m.shallow_clone()));
                out.push((key("exp_avg_sq"), v.shallow_clone()));
                let step = match &p.steps_t {
                    Some(t) => t.f_to_device(tch::Device::Cpu)?.f_reshape([1])?,
                    None => Tensor::f_from_slice(&[p.steps as f32])?,
                };
                out.push((key("step"), step));
            }
        }
        Ok(out)
    }

    /// Restores a state written by [`Optimizer::state`]. Strict: every tensor must belong to a
    /// parameter of this optimiser and match its shape; a parameter without state starts fresh.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>) -> Result<(), TchError> {
        let index: BTreeMap<String, (usize, usize)> = self
            .groups
            .iter()
            .enumerate()
            .flat_map(|(g, group)| {
                group
                    .params
                    .iter()
                    .enumerate()
                    .map(move |(i, p)| (p.name.clone(), (g, i)))
            })
            .collect();
        type Restored = (Option<Tensor>, Option<Tensor>, Option<u64>);
        let mut restored: BTreeMap<(usize, usize), Restored> = BTreeMap::new();
        for (key, t) in tensors {
            let Some(rest) = key.strip_prefix(STATE_PREFIX) else {
                continue;
            };
            let (name, what) = rest
                .rsplit_once('.')
                .ok_or_else(|| TchError::Convert(format!("optimizer state {key}: no field")))?;
            let &(g, i) = index.get(name).ok_or_else(|| {
                TchError::Convert(format!("optimizer state {key}: no parameter {name}"))
            })?;
            let param = &self.groups[g].params[i].tensor;
            let entry = restored.entry((g, i)).or_default();
            match what {
                "exp_avg" | "exp_avg_sq" => {
                    if t.size() != param.size() {
                        return Err(TchError::Shape(format!(
                            "optimizer state {key} has shape {:?}, the parameter {:?}",
                            t.size(),
                            param.size()
                        )));
                    }
                    let moment = t
                        .f_to_device(param.device())?
                        .f_to_kind(param.kind())?
                        .f_contiguous()?;
                    if what == "exp_avg" {
                        entry.0 = Some(moment);
                    } else {
                        entry.1 = Some(moment);
                    }
                }
                "step" => entry.2 = Some(f64::try_from(t)? as u64),
                _ => {
                    return Err(TchError::Convert(format!(
                        "optimizer state {key}: unknown field {what}"
                    )))
                }
            }
        }
        // Check everything before changing anything.
        let mut complete = Vec::with_capacity(restored.len());
        for ((g, i), state) in restored {
            match state {
                (Some(m), Some(v), Some(steps)) => complete.push((g, i, m, v, steps)),
                _ => {
                    return Err(TchError::Convert(format!(
                        "optimizer state of {} is incomplete (exp_avg, exp_avg_sq and step)",
                        self.groups[g].params[i].name
                    )))
                }
            }
        }
        for (g, i, m, v, steps) in complete {
            let param = &mut self.groups[g].params[i];
            param.moments = Some((m, v));
            param.steps = steps;
            if let Some(t) = &mut param.steps_t {
                let _ = t.f_fill_(steps as f64)?;
            }
        }
        Ok(())
    }
}

/// Adam (and AdamW with decoupled weight decay) as in `torch.optim.Adam`'s single-tensor path:
/// `m = lerp(m, g, 1 - b1)`, `v = lerp(v, g*g, 1 - b2)`,
/// `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`.
fn adam_update(
    p: &mut Param,
    grad: &Tensor,
    lr: f64,
    decoupled_decay: bool,
) -> Result<(), TchError> {
    if p.moments.is_none() {
        p.moments = Some((grad.f_zeros_like()?, grad.f_zeros_like()?));
    }
    let (m, v) = p.moments.as_mut().expect("allocated above");
    if decoupled_decay {
        let _ = p.tensor.f_mul_scalar_(1.0 - lr * ADAMW_WEIGHT_DECAY)?;
    }
    p.steps += 1;
    let t = p.steps as f64;
    let _ = m.f_lerp_(grad, 1.0 - BETA1)?;
    let _ = v.f_lerp_(&grad.f_square()?, 1.0 - BETA2)?;
    let bias1 = 1.0 - BETA1.powf(t);
    let bias2 = 1.0 - BETA2.powf(t);
    let step_size = lr / bias1;
    // denom = (sqrt(v) / sqrt(bias2) + eps) * (-1 / step_size), so p += m / denom.
    let mut denom = v.f_sqrt()?;
    let _ = denom
        .f_div_scalar_(bias2.sqrt())?
        .f_add_scalar_(EPS)?
        .f_mul_scalar_(-1.0 / step_size)?;
    let _ = p.tensor.f_addcdiv_(m, &denom)?;
    Ok(())
}

/// [`adam_update`] with the step count and learning rate as device scalars (PyTorch's
/// capturable Adam): `bias1 = 1 - b1^t`, `bias2 = 1 - b2^t`, then
/// `p += m / (sqrt(v) / (sqrt(bias2) * -lr/bias1) + eps / (-lr/bias1))`, all on the device.
fn adam_update_capturable(
    p: &mut Param,
    grad: &Tensor,
    lr: &Tensor,
    decoupled_decay: bool,
) -> Result<(), TchError> {
    if p.moments.is_none() {
        p.moments = Some((grad.f_zeros_like()?, grad.f_zeros_like()?));
    }
    let (m, v) = p.moments.as_mut().expect("allocated above");
    let t = p
        .steps_t
        .as_mut()
        .ok_or_else(|| TchError::Convert(format!("{}: no device step count", p.name)))?;
    if decoupled_decay {
        let _ = p
            .tensor
            .f_mul_(&lr.f_mul_scalar(-ADAMW_WEIGHT_DECAY)?.f_add_scalar(1.0)?)?;
    }
    let _ = t.f_add_scalar_(1.0)?;
    let _ = m.f_lerp_(grad, 1.0 - BETA1)?;
    let _ = v.f_lerp_(&grad.f_square()?, 1.0 - BETA2)?;
    let bias1 = Tensor::f_pow_scalar(BETA1, t)?.f_neg()?.f_add_scalar(1.0)?;
    let bias2 = Tensor::f_pow_scalar(BETA2, t)?.f_neg()?.f_add_scalar(1.0)?;
    let neg_step_size = lr.f_div(&bias1)?.f_neg()?;
    let mut denom = v.f_sqrt()?;
    let _ = denom
        .f_div_(&bias2.f_sqrt()?.f_mul(&neg_step_size)?)?
        .f_add_(&neg_step_size.f_reciprocal()?.f_mul_scalar(EPS)?)?;
    let _ = p.tensor.f_addcdiv_(m, &denom)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, nn::OptimizerConfig, Device, Kind as TKind};

    /// A small regression problem: returns the loss of `w` (shape [4, 3]) on fixed data.
    fn loss(w: &Tensor) -> Tensor {
        let x = Tensor::from_slice(&[
            0.5f32, -1.0, 2.0, 0.1, 0.3, -0.7, 1.5, 0.2, -0.4, 0.9, 1.1, -1.3,
        ])
        .reshape([4, 3]);
        (x.matmul(&w.transpose(0, 1)) - 1.0)
            .square()
            .mean(TKind::Float)
    }

    fn start() -> Tensor {
        Tensor::from_slice(&[
            0.1f32, -0.2, 0.3, 0.05, 0.4, -0.1, 0.2, 0.0, -0.3, 0.25, 0.15, -0.05,
        ])
        .reshape([4, 3])
        .set_requires_grad(true)
    }

    /// Ten steps of ours and ten of libtorch's C++ optimiser agree to float precision.
    fn matches_libtorch(kind: Kind, config: impl OptimizerConfig) {
        let lr = 0.05;
        let vs = nn::VarStore::new(Device::Cpu);
        let reference = vs.root().var_copy("w", &start());
        let mut theirs = config.build(&vs, lr).expect("libtorch optimiser");
        let ours_w = start();
        let mut ours = Optimizer::new(kind);
        ours.add_group(lr, [("w".to_string(), ours_w.shallow_clone())]);
        for _ in 0..10 {
            theirs.zero_grad();
            loss(&reference).backward();
            theirs.step();
            ours.zero_grad().expect("zero");
            loss(&ours_w).backward();
            ours.step().expect("step");
        }
        let diff = f64::try_from((&reference - &ours_w).abs().max()).expect("scalar");
        assert!(diff < 1e-6, "{kind:?} differs from libtorch by {diff}");
        let moved = f64::try_from((&ours_w - start()).abs().max()).expect("scalar");
        assert!(moved > 1e-3, "{kind:?} moved the parameter by only {moved}");
    }

    #[test]
    fn adam_adamw_and_sgd_match_libtorchs_optimisers() {
        matches_libtorch(Kind::Adam, nn::Adam::default());
        matches_libtorch(Kind::AdamW, nn::AdamW::default());
        matches_libtorch(Kind::Sgd, nn::Sgd::default());
    }

    #[test]
    fn a_restored_state_continues_exactly_where_the_saved_one_was() {
        let run = |w: &Tensor, opt: &mut Optimizer, steps: usize| {
            for _ in 0..steps {
                opt.zero_grad().expect("zero");
                loss(w).backward();
                opt.step().expect("step");
            }
        };
        // Straight through: 8 steps.
        let straight = start();
        let mut opt = Optimizer::new(Kind::Adam);
        opt.add_group(0.05, [("w".to_string(), straight.shallow_clone())]);
        run(&straight, &mut opt, 8);

        // 5 steps, save, restore into a fresh optimiser and parameter, 3 more.
        let first = start();
        let mut opt = Optimizer::new(Kind::Adam);
        opt.add_group(0.05, [("w".to_string(), first.shallow_clone())]);
        run(&first, &mut opt, 5);
        let saved: BTreeMap<String, Tensor> = opt
            .state()
            .expect("state")
            .into_iter()
            .map(|(k, t)| (k, t.copy()))
            .collect();
        assert_eq!(
            saved.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "optimizer.w.exp_avg",
                "optimizer.w.exp_avg_sq",
                "optimizer.w.step"
            ]
        );
        let resumed = start();
        tch::no_grad(|| resumed.shallow_clone().copy_(&first));
        let mut fresh = Optimizer::new(Kind::Adam);
        fresh.add_group(0.05, [("w".to_string(), resumed.shallow_clone())]);
        fresh.load_state(&saved).expect("loads");
        run(&resumed, &mut fresh, 3);
        let diff = f64::try_from((&straight - &resumed).abs().max()).expect("scalar");
        assert!(diff < 1e-7, "resumed run differs by {diff}");

        // Without the state, the same three steps land elsewhere (fresh moments).
        let naive = start();
        tch::no_grad(|| naive.shallow_clone().copy_(&first));
        let mut forgetful = Optimizer::new(Kind::Adam);
        forgetful.add_group(0.05, [("w".to_string(), naive.shallow_clone())]);
        run(&naive, &mut forgetful, 3);
        let diff = f64::try_from((&straight - &naive).abs().max()).expect("scalar");
        assert!(
            diff > 1e-4,
            "fresh moments should change the path, got {diff}"
        );
    }

    /// The capturable path (device step counts and learning rates) follows the host path to
    /// float rounding, and its saved state carries the device step count.
    #[test]
    fn the_capturable_optimiser_follows_the_host_one_and_saves_its_device_step_count() {
        for kind in [Kind::Adam, Kind::AdamW, Kind::Sgd] {
            let host_w = start();
            let mut host = Optimizer::new(kind);
            host.add_group(0.05, [("w".to_string(), host_w.shallow_clone())]);
            let dev_w = start();
            let mut dev = Optimizer::new(kind);
            dev.add_group(0.05, [("w".to_string(), dev_w.shallow_clone())]);
            dev.make_capturable().expect("capturable");
            assert!(dev.is_capturable());
            for _ in 0..10 {
                for (w, opt) in [(&host_w, &mut host), (&dev_w, &mut dev)] {
                    opt.zero_grad().expect("zero");
                    loss(w).backward();
                    opt.step().expect("step");
                }
            }
            // f32 bias corrections on the device against f64 ones on the host: rounding only.
            let diff = f64::try_from((&host_w - &dev_w).abs().max()).expect("scalar");
            assert!(diff < 1e-5, "{kind:?}: capturable differs by {diff}");
            let moved = f64::try_from((&dev_w - start()).abs().max()).expect("scalar");
            assert!(moved > 1e-3, "{kind:?} moved only {moved}");
            if kind != Kind::Sgd {
                let state: BTreeMap<String, Tensor> =
                    dev.state().expect("state").into_iter().collect();
                assert_eq!(
                    f64::try_from(&state["optimizer.w.step"]).expect("step"),
                    10.0
                );
                // Loading into a capturable optimiser sets its device count.
                let mut again = Optimizer::new(kind);
                again.add_group(0.05, [("w".to_string(), start())]);
                again.make_capturable().expect("capturable");
                again.load_state(&state).expect("loads");
                let loaded: BTreeMap<String, Tensor> =
                    again.state().expect("state").into_iter().collect();
                assert_eq!(
                    f64::try_from(&loaded["optimizer.w.step"]).expect("step"),
                    10.0
                );
            }
        }
    }

    #[test]
    fn a_state_for_an_unknown_parameter_or_shape_is_refused() {
        let mut opt = Optimizer::new(Kind::Adam);
        opt.add_group(0.1, [("w".to_string(), start())]);
        let mut bad = BTreeMap::new();
        bad.insert(
            "optimizer.v.exp_avg".to_string(),
            Tensor::zeros([4, 3], (TKind::Float, Device::Cpu)),
        );
        assert!(opt.load_state(&bad).is_err());
        let mut bad = BTreeMap::new();
        bad.insert(
            "optimizer.w.exp_avg".to_string(),
            Tensor::zeros([3, 4], (TKind::Float, Device::Cpu)),
        );
        let err = opt.load_state(&bad).expect_err("shape mismatch");
        assert!(err.to_string().contains("[3, 4]"), "{err}");
        let mut partial = BTreeMap::new();
        partial.insert(
            "optimizer.w.exp_avg".to_string(),
            Tensor::zeros([4, 3], (TKind::Float, Device::Cpu)),
        );
        assert!(
            opt.load_state(&partial).is_err(),
            "an incomplete state is refused"
        );
    }

    #[test]
    fn a_parameter_without_gradient_is_skipped_and_keeps_its_step_count() {
        let frozen = start().set_requires_grad(false);
        let live = start();
        let mut opt = Optimizer::new(Kind::Adam);
        opt.add_group(0.1, [("frozen".to_string(), frozen.shallow_clone())]);
        opt.add_group(0.1, [("live".to_string(), live.shallow_clone())]);
        opt.zero_grad().expect("zero");
        loss(&live).backward();
        opt.step().expect("step");
        let still = f64::try_from((&frozen - start()).abs().max()).expect("scalar");
        assert_eq!(still, 0.0);
        let names: Vec<String> = opt
            .state()
            .expect("state")
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert!(
            names.iter().all(|n| n.starts_with("optimizer.live.")),
            "{names:?}"
        );
    }
}
