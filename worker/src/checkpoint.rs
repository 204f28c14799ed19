//! Checkpoints: a model's parameters as safetensors bytes, and safetensors bytes back as tensors;
//! and training states, from which a retried attempt resumes.
//!
//! The bytes follow the shared contract (GUIDE §3): one entry per `VarStore` variable under its
//! seed module name (`conv1.weight`, ..., `fc_sigma.bias`, ...), f32, contiguous, little-endian,
//! so `Module().load_state_dict(safetensors.torch.load_file(path))` works on the reference
//! classes in bench/torch_reference.py. Written in memory (no temporary file), because a
//! checkpoint travels as an artifact to the coordinator, not to a local path.
//!
//! A training state (artifact kind `resume`) is a safetensors file too: the model under `model.`,
//! the optimiser's moments and step counts under `optimizer.`, and in the header's metadata the
//! format and the global step it was taken after. Unlike a checkpoint it is not for PyTorch.
//!
//! Must not know about jobs, transfer rules or the network; must not panic on bytes that are not
//! a valid safetensors file (they come from another job, through the coordinator).

use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use tch::{nn, Device, Kind, TchError, Tensor};

use crate::optim::{Optimizer, STATE_PREFIX};

/// Artifact kind of a model checkpoint.
pub const KIND: &str = "checkpoint";

/// File name of the checkpoint taken at the end of `epoch` (1-based): `epoch-003.safetensors`.
pub fn file_name(epoch: u32) -> String {
    format!("epoch-{epoch:03}.safetensors")
}

/// Artifact kind of a training state (model, optimiser, position).
pub const RESUME_KIND: &str = "resume";

/// The `format` metadata of a training state.
pub const RESUME_FORMAT: &str = "trainq-training-state/1";

/// Prefix of the model's tensors in a training state.
const MODEL_PREFIX: &str = "model.";

/// File name of the training state taken after global step `step`: `step-000000120.safetensors`.
pub fn resume_file_name(step: u64) -> String {
    format!("step-{step:09}.safetensors")
}

/// Every variable of `vs` as a safetensors file (sorted by name, f32, on the host).
pub fn to_safetensors(vs: &nn::VarStore) -> Result<Vec<u8>, TchError> {
    serialize(vs.variables(), None)
}

/// A training state: everything a resumed attempt needs to go on as if it had never stopped
/// (except the CVAE's per-step noise, which is drawn afresh).
pub struct TrainingState {
    /// The global optimiser step it was taken after.
    pub step: u64,
    /// The model's variables, by their checkpoint names.
    pub model: BTreeMap<String, Tensor>,
    /// The optimiser's tensors, by their full names (`optimizer.<param>.exp_avg`, ...).
    pub optimizer: BTreeMap<String, Tensor>,
}

/// Saves the model in `vs`, the optimiser's state and the step as a training state.
pub fn training_state_to_safetensors(
    vs: &nn::VarStore,
    opt: &Optimizer,
    step: u64,
) -> Result<Vec<u8>, TchError> {
    let mut tensors: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(name, t)| (format!("{MODEL_PREFIX}{name}"), t))
        .collect();
    tensors.extend(opt.state()?);
    let metadata = HashMap::from([
        ("format".to_string(), RESUME_FORMAT.to_string()),
        ("step".to_string(), step.to_string()),
    ]);
    serialize(tensors, Some(metadata))
}

/// Reads a training state written by [`training_state_to_safetensors`].
pub fn read_training_state(bytes: &[u8]) -> Result<TrainingState, ReadError> {
    let (_, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| ReadError::Format(format!("{e:?}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    match metadata.get("format") {
        Some(f) if f == RESUME_FORMAT => {}
        other => {
            return Err(ReadError::Format(format!(
                "not a training state: format {other:?}, expected {RESUME_FORMAT:?}"
            )))
        }
    }
    let step = metadata
        .get("step")
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| ReadError::Format("training state without a step".into()))?;
    let mut model = BTreeMap::new();
    let mut optimizer = BTreeMap::new();
    for (name, t) in read_safetensors(bytes)? {
        if let Some(var) = name.strip_prefix(MODEL_PREFIX) {
            model.insert(var.to_string(), t);
        } else if name.starts_with(STATE_PREFIX) {
            optimizer.insert(name, t);
        } else {
            return Err(ReadError::Format(format!(
                "training state holds an unexpected tensor {name}"
            )));
        }
    }
    Ok(TrainingState {
        step,
        model,
        optimizer,
    })
}

/// Copies the model's variables from `state`. Strict, and checked before anything is copied: the
/// state must hold exactly the model's variables, with their shapes. (The optimiser's part goes
/// to [`Optimizer::load_state`].)
pub fn restore_model(state: &TrainingState, vs: &nn::VarStore) -> Result<(), TchError> {
    let vars = vs.variables();
    if let Some(extra) = state.model.keys().find(|k| !vars.contains_key(*k)) {
        return Err(TchError::Convert(format!(
            "training state has a variable {extra} the model does not"
        )));
    }
    for (name, var) in &vars {
        let saved = state.model.get(name).ok_or_else(|| {
            TchError::Convert(format!("training state lacks the variable {name}"))
        })?;
        if saved.size() != var.size() {
            return Err(TchError::Shape(format!(
                "training state's {name} has shape {:?}, the model's {:?}",
                saved.size(),
                var.size()
            )));
        }
    }
    tch::no_grad(|| -> Result<(), TchError> {
        for (name, var) in &vars {
            let mut var = var.shallow_clone();
            var.f_copy_(&state.model[name])?;
        }
        Ok(())
    })
}

/// Named tensors as a safetensors file (sorted by name, f32, on the host), with `metadata`.
fn serialize(
    tensors: impl IntoIterator<Item = (String, Tensor)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>, TchError> {
    let mut host: BTreeMap<String, (Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (name, t) in tensors {
        let t = t
            .f_detach()?
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let values = Vec::<f32>::try_from(&t.f_reshape([-1])?)?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        host.insert(name, (shape, bytes));
    }
    let views = host
        .iter()
        .map(|(name, (shape, bytes))| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.as_str(), view))
                .map_err(|e| TchError::Convert(format!("checkpoint tensor {name}: {e:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::tensor::serialize(views, &metadata)
        .map_err(|e| TchError::Convert(format!("serialising a checkpoint: {e:?}")))
}

/// Why checkpoint bytes could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("not a safetensors file: {0}")]
    Format(String),
    #[error("tensor {name} has dtype {dtype}, expected a floating-point dtype")]
    Dtype { name: String, dtype: String },
    #[error("tensor {name}: {source}")]
    Tensor { name: String, source: TchError },
}

/// Every tensor of a safetensors file, as f32 tensors on the host, by name.
pub fn read_safetensors(bytes: &[u8]) -> Result<BTreeMap<String, Tensor>, ReadError> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| ReadError::Format(format!("{e:?}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in file.tensors() {
        let kind = match view.dtype() {
            Dtype::F32 => Kind::Float,
            Dtype::F64 => Kind::Double,
            Dtype::F16 => Kind::Half,
            Dtype::BF16 => Kind::BFloat16,
            other => {
                return Err(ReadError::Dtype {
                    name,
                    dtype: format!("{other:?}"),
                })
            }
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)
            .and_then(|t| t.f_to_kind(Kind::Float))
            .map_err(|source| ReadError::Tensor {
                name: name.clone(),
                source,
            })?;
        out.insert(name, t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Cvae, MnistClassifier};
    use crate::train::seeded;

    #[test]
    fn checkpoint_names_are_zero_padded_epochs() {
        assert_eq!(file_name(3), "epoch-003.safetensors");
        assert_eq!(file_name(1000), "epoch-1000.safetensors");
    }

    #[test]
    fn a_checkpoint_round_trips_every_variable_exactly() {
        for build in [
            (|p: &nn::Path| {
                let _ = MnistClassifier::new(p);
            }) as fn(&nn::Path),
            |p: &nn::Path| {
                let _ = Cvae::new(p, 20);
            },
        ] {
            let vs = nn::VarStore::new(Device::Cpu);
            seeded(3, || build(&vs.root()));
            let bytes = to_safetensors(&vs).expect("serialises");
            let back = read_safetensors(&bytes).expect("reads");
            let vars = vs.variables();
            assert_eq!(back.len(), vars.len());
            for (name, t) in vars {
                let b = back.get(&name).expect("every variable saved");
                assert_eq!(b.size(), t.size(), "{name}");
                assert!(b.equal(&t), "{name} differs after the round trip");
            }
        }
    }

    /// The project's Python (torch + safetensors): `$TRAINQ_PYTHON` or `<workspace>/.tools/python`.
    fn python() -> std::path::PathBuf {
        let path = std::env::var_os("TRAINQ_PYTHON")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/python")
            });
        assert!(
            path.exists(),
            "{} is missing: run scripts/setup.sh (it creates the Python venv with torch and \
             safetensors), or set TRAINQ_PYTHON",
            path.display()
        );
        path
    }

    /// The repository's `bench/torch_reference.py`, or `$TRAINQ_REFERENCE`.
    fn reference() -> std::path::PathBuf {
        let path = std::env::var_os("TRAINQ_REFERENCE")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/torch_reference.py")
            });
        assert!(
            path.exists(),
            "{} is missing: set TRAINQ_REFERENCE to bench/torch_reference.py",
            path.display()
        );
        path
    }

    const LOAD_IN_TORCH: &str = r#"
import importlib.util, sys
import torch, torch.nn.functional as F
from safetensors.torch import load_file
spec = importlib.util.spec_from_file_location("torch_reference", sys.argv[1])
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)
torch.manual_seed(0)

clf = ref.MnistClassifier()
clf.load_state_dict(load_file(sys.argv[2]))  # strict: every name and shape must match
io = load_file(sys.argv[3])
x, logits = io["x"], io["logits"]
y = torch.tensor([1, 7])
with torch.no_grad():
    loss = clf.loss(x, y)
assert torch.isfinite(loss), loss
want = F.cross_entropy(logits, y)
assert torch.allclose(loss, want, rtol=1e-4, atol=1e-5), (loss, want)

cvae = ref.Cvae(latent_dim=20)
cvae.load_state_dict(load_file(sys.argv[4]))
io = load_file(sys.argv[5])
x, cond = io["x"], io["cond"]
with torch.no_grad():
    loss = cvae.loss(x, cond)
    assert torch.isfinite(loss), loss
    h = F.relu(F.max_pool2d(cvae.conv1(x), 2))
    h = F.relu(F.max_pool2d(cvae.conv2(h), 2))
    h = F.relu(F.max_pool2d(cvae.conv3(h), 2)).flatten(1)
    mu = cvae.fc_mu(h)
    d = F.relu(cvae.fc_dec(torch.cat([mu, cond], 1))).view(-1, 128, 4, 4)
    d = F.relu(cvae.conv_dec2(F.relu(cvae.conv_dec1(d))))
    out = cvae.conv_dec3(d)
assert torch.allclose(mu, io["mu"], rtol=1e-4, atol=1e-5), (mu - io["mu"]).abs().max()
assert torch.allclose(out, io["logits"], rtol=1e-4, atol=1e-4), (out - io["logits"]).abs().max()
print("loaded both checkpoints; outputs match")
"#;

    #[test]
    fn checkpoints_load_strictly_into_the_pytorch_reference_models_and_compute_the_same() {
        let (python, reference) = (python(), reference());
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).expect("write");
            path
        };
        let save = |name: &str, tensors: &[(&str, &Tensor)]| {
            let path = dir.path().join(name);
            Tensor::write_safetensors(tensors, &path).expect("write tensors");
            path
        };
        let opts = (Kind::Float, Device::Cpu);

        let clf_vs = nn::VarStore::new(Device::Cpu);
        let clf = seeded(11, || MnistClassifier::new(&clf_vs.root()));
        let x = seeded(12, || Tensor::rand([2, 1, 28, 28], opts));
        let logits = tch::no_grad(|| clf.forward(&x)).expect("forward");
        let clf_path = write("clf.safetensors", &to_safetensors(&clf_vs).expect("save"));
        let clf_io = save("clf_io.safetensors", &[("x", &x), ("logits", &logits)]);

        let cvae_vs = nn::VarStore::new(Device::Cpu);
        let cvae = seeded(13, || Cvae::new(&cvae_vs.root(), 20));
        let x = seeded(14, || Tensor::rand([2, 3, 32, 32], opts));
        let cond = Tensor::eye(100, opts).narrow(0, 3, 2).contiguous();
        let (mu, logits) = tch::no_grad(|| -> Result<_, TchError> {
            let (mu, _) = cvae.encode(&x)?;
            let logits = cvae.decode(&mu, &cond)?;
            Ok((mu, logits))
        })
        .expect("forward");
        let cvae_path = write("cvae.safetensors", &to_safetensors(&cvae_vs).expect("save"));
        let cvae_io = save(
            "cvae_io.safetensors",
            &[("x", &x), ("cond", &cond), ("mu", &mu), ("logits", &logits)],
        );

        let out = std::process::Command::new(&python)
            .arg("-c")
            .arg(LOAD_IN_TORCH)
            .arg(&reference)
            .args([&clf_path, &clf_io, &cvae_path, &cvae_io])
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "python failed ({}):\n{stdout}\n{stderr}",
            out.status
        );
        assert!(stdout.contains("outputs match"), "{stdout}\n{stderr}");
    }

    #[test]
    fn bytes_that_are_not_safetensors_are_an_error() {
        assert!(matches!(
            read_safetensors(b"definitely not a checkpoint"),
            Err(ReadError::Format(_))
        ));
        assert!(read_safetensors(&[]).is_err());
    }
}
