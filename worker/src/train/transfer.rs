//! Transfer initialisation: a CVAE that starts from a trained MNIST classifier's conv layers, as
//! the seed document discusses.
//!
//! [`SourceLayers::from_checkpoint`] reads the classifier's checkpoint and GUARDS the shapes first:
//! `conv1.weight [32,1,3,3]`, `conv1.bias [32]`, `conv2.weight [64,32,3,3]`, `conv2.bias [64]`. A
//! missing tensor or another shape is a permanent job failure naming the tensor and both shapes
//! (the seed's Code Example 2 fails exactly here with a runtime error; we refuse cleanly).
//! [`apply`] then writes the spec's choice into the CVAE: conv1's grey kernel spread over R, G, B
//! (each a third, or the BT.601 luminance weights) with its bias, and conv2 copied exactly.
//! [`FreezePlan`] says which parameters are transferred and how they train (frozen for the whole
//! run, for the first epochs, or at a reduced learning rate).
//!
//! Must not panic on a bad checkpoint (it comes from another job), must not touch parameters the
//! spec does not transfer, and must not know about the network or the optimiser's internals.

use std::collections::BTreeMap;

use proto::spec::{Conv1Adaptation, Freeze, Transfer};
use tch::{Kind, TchError, Tensor};

use super::event::TrainError;
use crate::checkpoint;
use crate::model::Cvae;

/// The classifier tensors a transfer may use, with the shapes the seed's MNISTClassifier gives
/// them.
pub const SOURCE_SHAPES: [(&str, &[i64]); 4] = [
    ("conv1.weight", &proto::spec::CLASSIFIER_CONV1_SHAPE),
    ("conv1.bias", &[32]),
    ("conv2.weight", &[64, 32, 3, 3]),
    ("conv2.bias", &[64]),
];

/// The source classifier's conv layers, shape-checked, as f32 tensors on the host.
#[derive(Debug)]
pub struct SourceLayers {
    pub conv1_weight: Tensor,
    pub conv1_bias: Tensor,
    pub conv2_weight: Tensor,
    pub conv2_bias: Tensor,
}

impl SourceLayers {
    /// Reads the source checkpoint (safetensors bytes) and checks every tensor in
    /// [`SOURCE_SHAPES`]. Everything wrong here is [`TrainError::Permanent`]: another attempt
    /// would read the same bytes.
    pub fn from_checkpoint(bytes: &[u8]) -> Result<Self, TrainError> {
        let mut tensors = checkpoint::read_safetensors(bytes).map_err(|e| {
            TrainError::Permanent(format!(
                "cannot transfer: the source checkpoint is unreadable: {e}"
            ))
        })?;
        let mut take = |name: &str, want: &[i64]| -> Result<Tensor, TrainError> {
            let t = tensors.remove(name).ok_or_else(|| {
                TrainError::Permanent(format!(
                    "cannot transfer: the source checkpoint has no {name}, but the MNIST \
                     classifier's {name} has shape {want:?}; is the source job an mnist_classifier?"
                ))
            })?;
            let got = t.size();
            if got != want {
                return Err(TrainError::Permanent(format!(
                    "cannot transfer: the source checkpoint's {name} has shape {got:?} but the MNIST \
                     classifier's has shape {want:?}; is the source job an mnist_classifier?"
                )));
            }
            Ok(t)
        };
        let [(n1w, s1w), (n1b, s1b), (n2w, s2w), (n2b, s2b)] = SOURCE_SHAPES;
        Ok(Self {
            conv1_weight: take(n1w, s1w)?,
            conv1_bias: take(n1b, s1b)?,
            conv2_weight: take(n2w, s2w)?,
            conv2_bias: take(n2b, s2b)?,
        })
    }
}

/// conv1's CVAE weight `[32,3,3,3]` from the classifier's grey kernel `[32,1,3,3]`, or `None` when
/// conv1 stays random. ReplicateThird divides by 3 (so a grey image gives the classifier's
/// response exactly as far as f32 allows); Luminance multiplies by 0.299, 0.587, 0.114.
pub fn adapt_conv1(grey: &Tensor, how: Conv1Adaptation) -> Result<Option<Tensor>, TchError> {
    let channels: Vec<Tensor> = match how {
        Conv1Adaptation::KeepRandom => return Ok(None),
        Conv1Adaptation::ReplicateThird => {
            let third = grey.f_div_scalar(3.0)?;
            vec![third.shallow_clone(), third.shallow_clone(), third]
        }
        Conv1Adaptation::Luminance => {
            let weights = how.channel_weights().unwrap_or([1.0 / 3.0; 3]);
            weights
                .iter()
                .map(|&w| grey.f_mul_scalar(w))
                .collect::<Result<_, _>>()?
        }
    };
    Ok(Some(Tensor::f_cat(&channels, 1)?))
}

/// Writes the transferred layers into `model` (wherever its parameters live). Parameters the
/// spec does not transfer keep their values.
pub fn apply(model: &Cvae, source: &SourceLayers, t: &Transfer) -> Result<(), TchError> {
    tch::no_grad(|| -> Result<(), TchError> {
        let copy = |dst: &Tensor, src: &Tensor| -> Result<(), TchError> {
            let mut dst = dst.shallow_clone();
            dst.f_copy_(&src.f_to_kind(Kind::Float)?)
        };
        if let Some(w) = adapt_conv1(&source.conv1_weight, t.conv1)? {
            copy(&model.conv1.ws, &w)?;
            copy(&model.conv1.bs, &source.conv1_bias)?;
        }
        if t.copy_conv2 {
            copy(&model.conv2.ws, &source.conv2_weight)?;
            copy(&model.conv2.bs, &source.conv2_bias)?;
        }
        Ok(())
    })
}

/// How the transferred parameters train.
#[derive(Debug, Clone, PartialEq)]
pub struct FreezePlan {
    /// Checkpoint names of the transferred parameters (`conv1.weight`, `conv1.bias`, ...).
    pub params: Vec<String>,
    pub freeze: Freeze,
}

impl FreezePlan {
    pub fn new(t: &Transfer) -> Self {
        let params = t
            .transferred_layers()
            .into_iter()
            .flat_map(|layer| [format!("{layer}.weight"), format!("{layer}.bias")])
            .collect();
        Self {
            params,
            freeze: t.freeze,
        }
    }

    pub fn is_transferred(&self, name: &str) -> bool {
        self.params.iter().any(|p| p == name)
    }

    /// Whether the transferred parameters are frozen during `epoch` (1-based).
    pub fn frozen_in(&self, epoch: u32) -> bool {
        match self.freeze {
            Freeze::WholeRun => true,
            Freeze::FirstEpochs(k) => epoch <= k,
            Freeze::None | Freeze::LrMultiplier(_) => false,
        }
    }

    /// The learning-rate factor of the transferred parameters' optimiser group.
    pub fn lr_multiplier(&self) -> f64 {
        match self.freeze {
            Freeze::LrMultiplier(m) => m,
            _ => 1.0,
        }
    }

    /// Whether the transferred parameters stay out of the optimiser altogether (frozen for the
    /// whole run: then no optimiser rule, weight decay included, can move them).
    pub fn excluded_from_optimizer(&self) -> bool {
        self.freeze == Freeze::WholeRun
    }
}

/// Named parameters of `vs` in a stable (sorted) order.
pub fn named_parameters(vs: &tch::nn::VarStore) -> BTreeMap<String, Tensor> {
    vs.variables().into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MnistClassifier;
    use crate::train::seeded;
    use tch::{nn, Device};

    fn classifier_checkpoint(seed: i64) -> (nn::VarStore, Vec<u8>) {
        let vs = nn::VarStore::new(Device::Cpu);
        seeded(seed, || {
            let _ = MnistClassifier::new(&vs.root());
        });
        let bytes = checkpoint::to_safetensors(&vs).expect("serialises");
        (vs, bytes)
    }

    fn cvae() -> (nn::VarStore, Cvae) {
        seeded(9, || {
            let vs = nn::VarStore::new(Device::Cpu);
            let m = Cvae::new(&vs.root(), 20);
            (vs, m)
        })
    }

    fn spec(conv1: Conv1Adaptation, copy_conv2: bool) -> Transfer {
        Transfer {
            source_job_id: proto::JobId::parse("source", "0193a5b2-7c4d-7e8f-9a0b-1c2d3e4f5a6b")
                .expect("id"),
            conv1,
            copy_conv2,
            freeze: Freeze::None,
        }
    }

    fn var(vs: &nn::VarStore, name: &str) -> Tensor {
        vs.variables().remove(name).expect("variable exists")
    }

    #[test]
    fn replicate_third_spreads_the_grey_kernel_and_conv2_is_copied_exactly() {
        let (src_vs, bytes) = classifier_checkpoint(1);
        let source = SourceLayers::from_checkpoint(&bytes).expect("valid source");
        let (vs, model) = cvae();
        let before_conv3 = var(&vs, "conv3.weight").copy();
        apply(
            &model,
            &source,
            &spec(Conv1Adaptation::ReplicateThird, true),
        )
        .expect("applies");

        assert!(var(&vs, "conv2.weight").equal(&var(&src_vs, "conv2.weight")));
        assert!(var(&vs, "conv2.bias").equal(&var(&src_vs, "conv2.bias")));
        let grey = var(&src_vs, "conv1.weight");
        let third = &grey / 3.0;
        let w = var(&vs, "conv1.weight");
        assert_eq!(w.size(), proto::spec::CVAE_CONV1_SHAPE);
        for c in 0..3 {
            assert!(w.narrow(1, c, 1).equal(&third), "channel {c} is source/3");
        }
        assert!(var(&vs, "conv1.bias").equal(&var(&src_vs, "conv1.bias")));
        assert!(
            var(&vs, "conv3.weight").equal(&before_conv3),
            "conv3 untouched"
        );
    }

    #[test]
    fn luminance_weights_the_channels_and_keep_random_leaves_conv1_alone() {
        let (src_vs, bytes) = classifier_checkpoint(2);
        let source = SourceLayers::from_checkpoint(&bytes).expect("valid source");
        let (vs, model) = cvae();
        let random_conv2 = var(&vs, "conv2.weight").copy();
        apply(&model, &source, &spec(Conv1Adaptation::Luminance, false)).expect("applies");
        let grey = var(&src_vs, "conv1.weight");
        let w = var(&vs, "conv1.weight");
        for (c, k) in [0.299, 0.587, 0.114].into_iter().enumerate() {
            assert!(w.narrow(1, c as i64, 1).equal(&(&grey * k)), "channel {c}");
        }
        // The three channels add up to the grey kernel (up to f32 rounding).
        assert!(w
            .sum_dim_intlist(1, true, Kind::Float)
            .allclose(&grey, 1e-6, 1e-7, false));
        assert!(
            var(&vs, "conv2.weight").equal(&random_conv2),
            "conv2 not copied"
        );

        let (vs, model) = cvae();
        let random_conv1 = var(&vs, "conv1.weight").copy();
        apply(&model, &source, &spec(Conv1Adaptation::KeepRandom, true)).expect("applies");
        assert!(var(&vs, "conv1.weight").equal(&random_conv1));
        assert!(var(&vs, "conv2.weight").equal(&var(&src_vs, "conv2.weight")));
    }

    #[test]
    fn a_checkpoint_with_the_wrong_conv1_shape_is_permanent_and_names_both_shapes() {
        // A CVAE checkpoint given as the source: its conv1 has three input channels.
        let (vs, _m) = cvae();
        let bytes = checkpoint::to_safetensors(&vs).expect("serialises");
        let err = SourceLayers::from_checkpoint(&bytes).expect_err("wrong source");
        assert!(err.is_permanent());
        let msg = err.to_string();
        assert!(msg.contains("conv1.weight"), "{msg}");
        assert!(
            msg.contains("[32, 3, 3, 3]") && msg.contains("[32, 1, 3, 3]"),
            "{msg}"
        );
    }

    #[test]
    fn a_missing_tensor_or_garbage_is_permanent() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = (vs.root() / "conv1").zeros("weight", &[32, 1, 3, 3]);
        let bytes = checkpoint::to_safetensors(&vs).expect("serialises");
        let err = SourceLayers::from_checkpoint(&bytes).expect_err("incomplete");
        assert!(
            err.is_permanent() && err.to_string().contains("no conv1.bias"),
            "{err}"
        );
        let err = SourceLayers::from_checkpoint(b"garbage").expect_err("garbage");
        assert!(err.is_permanent(), "{err}");
    }

    #[test]
    fn freeze_plans_name_the_transferred_parameters() {
        let mut t = spec(Conv1Adaptation::KeepRandom, true);
        t.freeze = Freeze::FirstEpochs(2);
        let plan = FreezePlan::new(&t);
        assert_eq!(plan.params, vec!["conv2.weight", "conv2.bias"]);
        assert!(plan.frozen_in(1) && plan.frozen_in(2) && !plan.frozen_in(3));
        assert!(!plan.excluded_from_optimizer());
        t.freeze = Freeze::LrMultiplier(0.1);
        assert_eq!(FreezePlan::new(&t).lr_multiplier(), 0.1);
        assert!(!FreezePlan::new(&t).frozen_in(1));
        t.freeze = Freeze::WholeRun;
        assert!(FreezePlan::new(&t).excluded_from_optimizer());
    }
}
