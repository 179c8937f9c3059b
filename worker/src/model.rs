//! Models: what rendering and the dataset pass ask of one ([`Model`]), and the one format
//! loupe loads, a TorchScript file following the contract in docs/models.md
//! ([`TorchScript`]): `forward(x)` takes RGB in [0, 1], `[N, 3, H, W]`, and returns
//! `Dict[str, Tensor]` of named activations, each `[N, C, H, W]` or `[N, C]`; plus an
//! optional sidecar JSON.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::{CModule, Device, IValue, Kind, Tensor};

use loupe_core::spec::{LayerInfo, Precision};

use crate::{Error, Result};

/// `<model>.json` beside `<model>.pt`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sidecar {
    pub name: Option<String>,
    pub input_size: Option<u32>,
}

impl Sidecar {
    pub fn path_for(model: &Path) -> PathBuf {
        model.with_extension("json")
    }

    /// The sidecar, or the default when there is none.
    pub fn read(model: &Path) -> Result<Sidecar> {
        let path = Self::path_for(model);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::Model(format!("sidecar {}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Sidecar::default()),
            Err(e) => Err(Error::Model(format!("sidecar {}: {e}", path.display()))),
        }
    }
}

/// What rendering, the dataset pass and the connections ask of a model: named activations
/// of `[0, 1]` RGB inputs that autograd differentiates back to the input. TorchScript is
/// the one format loupe loads; docs/models.md "TorchScript's future" says what a
/// torch.export one would need to implement this.
pub trait Model {
    fn device(&self) -> Device;

    /// Every layer's activation for a batch of inputs, in the model's layer order.
    fn activations(&self, x: &Tensor) -> Result<Vec<(String, Tensor)>>;

    /// [`Model::activations`], each differentiable with respect to the earlier layers'
    /// (for the connections between layers), not only to the input.
    fn activations_between_layers(&self, x: &Tensor) -> Result<Vec<(String, Tensor)>>;

    /// The activation of one layer for a batch of inputs, `[N, C, H, W]` or `[N, C]`.
    fn activation(&self, x: &Tensor, layer: &str) -> Result<Tensor>;
}

/// A loaded TorchScript model, in eval mode with its weights frozen: nothing ever needs
/// their gradients, so backward computes only the input's.
pub struct TorchScript {
    module: CModule,
    path: PathBuf,
    device: Device,
    /// True when the module exports `tap(x, layer) -> Tensor`, which runs the network only
    /// up to that layer (see tools/export.py).
    has_tap: bool,
    /// The weights' number format; inputs are cast to it.
    kind: Kind,
}

impl std::fmt::Debug for TorchScript {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TorchScript").field("path", &self.path).field("device", &self.device).finish()
    }
}

fn first_line(e: &tch::TchError) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// A failed forward pass: out of memory is the batch's fault and can be retried smaller;
/// anything else is the model's.
fn forward_error(path: &Path, what: &str, e: &tch::TchError) -> Error {
    let line = first_line(e);
    if crate::is_out_of_memory(&line) {
        Error::OutOfMemory(line)
    } else {
        Error::Model(format!("{}: {what} failed: {line}", path.display()))
    }
}

impl TorchScript {
    pub fn load(path: &Path, device: Device) -> Result<TorchScript> {
        if !path.is_file() {
            return Err(Error::Model(format!("model file {} does not exist", path.display())));
        }
        let mut module = CModule::load_on_device(path, device).map_err(|e| {
            Error::Model(format!("{} is not a TorchScript model ({})", path.display(), first_line(&e)))
        })?;
        module.set_eval();
        let params = module.named_parameters().map_err(|e| Error::Model(format!("{}: {}", path.display(), first_line(&e))))?;
        for (_, p) in params {
            let _ = p.set_requires_grad(false);
        }
        Ok(TorchScript { module, path: path.to_path_buf(), device, has_tap: false, kind: Kind::Float })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The model with its weights in `precision`'s format. It takes the model as loaded
    /// (fp32), never one already converted: bf16 weights converted back are rounded, not
    /// the file's, so a precision change loads the file again (see the torch thread).
    pub fn in_precision(mut self, precision: Precision) -> TorchScript {
        let kind = match precision {
            Precision::Fp32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
        };
        if kind != self.kind {
            self.module.to(self.device, kind, false);
            self.kind = kind;
        }
        self
    }

    /// The input in the weights' format: casting inside the graph keeps the gradient
    /// flowing back to the fp32 image.
    fn input(&self, x: &Tensor) -> Tensor {
        if x.kind() == self.kind { x.shallow_clone() } else { x.to_kind(self.kind) }
    }

    /// Each layer's name and per-example shape, from one forward pass on a blank image.
    /// It also notes whether the model's `tap` method agrees with `forward`, and uses it
    /// from then on.
    /// `channels` is the model's input channels (3 for RGB).
    pub fn layers(&mut self, input_size: u32, channels: u32) -> Result<Vec<LayerInfo>> {
        let _guard = tch::no_grad_guard();
        let s = input_size as i64;
        let x = Tensor::full([1, channels as i64, s, s], 0.5, (self.kind, self.device));
        let mut layers = Vec::new();
        for (name, t) in self.activations(&x)? {
            let shape = t.size();
            if !(shape.len() == 2 || shape.len() == 4) || shape[0] != 1 {
                return Err(Error::Model(format!(
                    "{}: layer {name:?} has shape {shape:?} for one image; expected [N, C, H, W] or [N, C]",
                    self.path.display()
                )));
            }
            layers.push(LayerInfo { name, shape: shape[1..].to_vec() });
        }
        if layers.is_empty() {
            return Err(Error::Model(format!("{}: forward returned an empty dict", self.path.display())));
        }
        let first = &layers[0];
        // A model without `tap` makes this call fail, which is all we want to know.
        self.has_tap = self
            .module
            .method_is("tap", &[IValue::Tensor(x), IValue::String(first.name.clone())])
            .is_ok_and(|v| matches!(v, IValue::Tensor(t) if t.size()[1..] == first.shape[..]));
        Ok(layers)
    }
}

impl Model for TorchScript {
    fn device(&self) -> Device {
        self.device
    }

    /// Every layer's activation for a batch of inputs, in the order `forward` gives them:
    /// `forward`'s dict, or an error that says what came back instead.
    fn activations(&self, x: &Tensor) -> Result<Vec<(String, Tensor)>> {
        let out = self
            .module
            .forward_is(&[IValue::Tensor(self.input(x))])
            .map_err(|e| forward_error(&self.path, "forward", &e))?;
        let IValue::GenericDict(entries) = out else {
            return Err(Error::Model(format!(
                "{}: forward must return Dict[str, Tensor] of named activations, but it returned {}",
                self.path.display(),
                ivalue_kind(&out)
            )));
        };
        entries
            .into_iter()
            .map(|(k, v)| match (k, v) {
                (IValue::String(name), IValue::Tensor(t)) => Ok((name, t)),
                (k, v) => Err(Error::Model(format!(
                    "{}: forward's dict must map str to Tensor, found {} -> {}",
                    self.path.display(),
                    ivalue_kind(&k),
                    ivalue_kind(&v)
                ))),
            })
            .collect()
    }

    /// [`Model::activations`] of a scripted graph, each differentiable with respect to the earlier layers' (for
    /// the connections between layers). From its second pass on, TorchScript's optimising
    /// executor runs a scripted graph as one differentiable subgraph: a single autograd
    /// node whose outputs are all the layers, through which no gradient reaches an earlier
    /// layer's activation (only the input's). Its unoptimised plan keeps each operation's
    /// own node. The switch is per thread and put back at once, so renders keep the
    /// optimised plan.
    fn activations_between_layers(&self, x: &Tensor) -> Result<Vec<(String, Tensor)>> {
        tch::jit::set_graph_executor_optimize(false);
        let out = self.activations(x);
        tch::jit::set_graph_executor_optimize(true);
        out
    }

    /// The activation of one layer for a batch of inputs, `[N, C, H, W]` or `[N, C]`.
    fn activation(&self, x: &Tensor, layer: &str) -> Result<Tensor> {
        if self.has_tap {
            return self
                .module
                .method_is("tap", &[IValue::Tensor(self.input(x)), IValue::String(layer.to_string())])
                .map_err(|e| forward_error(&self.path, &format!("tap({layer:?})"), &e))
                .and_then(|v| match v {
                    IValue::Tensor(t) => Ok(t),
                    other => Err(Error::Model(format!("tap returned {}", ivalue_kind(&other)))),
                });
        }
        self.activations(x)?
            .into_iter()
            .find(|(name, _)| name == layer)
            .map(|(_, t)| t)
            .ok_or_else(|| Error::UnknownLayer(layer.to_string()))
    }
}

fn ivalue_kind(v: &IValue) -> &'static str {
    match v {
        IValue::None => "None",
        IValue::Tensor(_) => "a Tensor",
        IValue::Double(_) => "a float",
        IValue::Int(_) => "an int",
        IValue::Bool(_) => "a bool",
        IValue::Tuple(_) => "a tuple",
        IValue::IntList(_) | IValue::DoubleList(_) | IValue::BoolList(_) | IValue::TensorList(_) | IValue::GenericList(_) => "a list",
        IValue::String(_) => "a str",
        IValue::StringList(_) => "a list of str",
        IValue::GenericDict(_) => "a dict",
        IValue::Object(_) => "an object",
        IValue::Device(_) => "a device",
        _ => "an unsupported value",
    }
}
