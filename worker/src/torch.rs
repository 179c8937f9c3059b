//! The torch thread: libtorch work runs on one thread of its own, off the async runtime,
//! with the last model it loaded kept there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::Device;
use tokio::sync::oneshot;

use loupe_core::spec::{LayerInfo, ModelRef};
use loupe_core::task::Lease;

use crate::model::Model;
use crate::{Error, Result};

/// A piece of libtorch work for the torch thread, with the model it needs.
type TorchJob = Box<dyn FnOnce(&mut Option<Loaded>) + Send>;

/// The torch thread: libtorch work is blocking, so it runs here and never on the async
/// runtime, where lease renewal must keep its pace. It keeps the last model loaded. A
/// bounded channel of one keeps at most one piece of work waiting.
pub(crate) struct TorchThread {
    calls: std::sync::mpsc::SyncSender<TorchJob>,
    device: Device,
}

/// The model the torch thread holds, with its layers, keyed by digest.
pub(crate) struct Loaded {
    sha256: String,
    pub(crate) model: Model,
    pub(crate) layers: Vec<LayerInfo>,
    /// The largest batch known to fit in memory, per layer (see [`render`](crate::render::render)).
    pub(crate) max_batch: HashMap<String, Option<usize>>,
}

impl TorchThread {
    pub(crate) fn spawn(device: Device) -> TorchThread {
        let (calls, rx) = std::sync::mpsc::sync_channel::<TorchJob>(1);
        std::thread::Builder::new()
            .name("loupe-torch".into())
            .spawn(move || {
                let mut loaded: Option<Loaded> = None;
                for job in rx {
                    job(&mut loaded);
                }
            })
            .expect("spawning the torch thread");
        TorchThread { calls, device }
    }

    /// Runs `f` on the torch thread with the lease's model (from `model_path`) loaded.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        lease: &Lease,
        model_path: PathBuf,
        f: impl FnOnce(&mut Loaded) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        let (device, want, input_size, channels) = (self.device, lease.job.model.clone(), lease.job.settings.input_size, lease.job.settings.param.channels);
        let declared: Vec<LayerInfo> = lease.job.layers.iter().map(|plan| plan.layer.clone()).collect();
        let job: TorchJob = Box::new(move |loaded: &mut Option<Loaded>| {
            // tch panics on some libtorch errors; one bad task must not take the worker
            // down with it.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let l = load(loaded, device, &model_path, &want, input_size, channels)?;
                l.check_shapes(&declared)?;
                f(l)
            }))
            .unwrap_or_else(|panic| {
                *loaded = None;
                let msg = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                Err(Error::Torch(msg.unwrap_or_else(|| "libtorch panicked".into())))
            });
            let _ = reply.send(result);
        });
        let calls = self.calls.clone();
        tokio::task::spawn_blocking(move || calls.send(job))
            .await
            .expect("send task panicked")
            .map_err(|_| Error::Torch("the torch thread has stopped".into()))?;
        rx.await.map_err(|_| Error::Torch("the torch thread has stopped".into()))?
    }
}

/// The lease's model, loaded once per digest and checked against it.
fn load<'a>(loaded: &'a mut Option<Loaded>, device: Device, path: &Path, want: &ModelRef, input_size: u32, channels: u32) -> Result<&'a mut Loaded> {
    if loaded.as_ref().map(|l| l.sha256.as_str()) != Some(want.sha256.as_str()) {
        *loaded = None;
        let digest = loupe_core::sha256_file(path).map_err(|e| Error::Model(format!("model {}: {e}", path.display())))?;
        if digest != want.sha256 {
            return Err(Error::Model(format!(
                "model {} has sha256 {digest}, but the job was submitted with {}; it changed after submission",
                want.uri,
                want.sha256
            )));
        }
        let mut model = Model::load(path, device)?;
        let layers = model.layers(input_size, channels)?;
        *loaded = Some(Loaded { sha256: digest, model, layers, max_batch: HashMap::new() });
    }
    Ok(loaded.as_mut().expect("loaded above"))
}

impl Loaded {
    /// Checks the job's layer shapes, which its submitter declared and the coordinator
    /// sized the job by, against the model's own (from the probe pass at load). A job
    /// that got one wrong fails at once, whichever task finds it.
    pub(crate) fn check_shapes(&self, declared: &[LayerInfo]) -> Result<()> {
        for want in declared {
            let real = self.layer(&want.name)?;
            if real.shape != want.shape {
                return Err(Error::Model(format!(
                    "layer {:?} has shape {:?} in the model, but the job declares {:?}",
                    want.name, real.shape, want.shape
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn layer(&self, name: &str) -> Result<&LayerInfo> {
        self.layers.iter().find(|x| x.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.layers.iter().map(|x| x.name.as_str()).collect();
            Error::UnknownLayer(format!("{name:?}; the model has {}", known.join(", ")))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiny fixture's layers against shapes a job could declare: right ones pass; a
    /// wrong shape or an unknown layer is an error that names it, and is not retried.
    #[test]
    fn declared_shapes_are_checked_against_the_model() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny.pt");
        let sha256 = loupe_core::sha256_file(&path).unwrap();
        let want = ModelRef { uri: path.to_string_lossy().into_owned(), name: "tiny".into(), sha256 };
        let mut loaded = None;
        let l = load(&mut loaded, Device::Cpu, &path, &want, 16, 3).unwrap();
        let layer = |name: &str, shape: &[i64]| LayerInfo { name: name.into(), shape: shape.to_vec() };
        l.check_shapes(&[layer("conv", &[4, 16, 16]), layer("logits", &[3])]).unwrap();
        for (declared, message) in [
            (layer("conv", &[4294967295]), "layer \"conv\" has shape [4, 16, 16] in the model, but the job declares [4294967295]"),
            (layer("logits", &[3, 1, 1]), "layer \"logits\" has shape [3] in the model, but the job declares [3, 1, 1]"),
            (layer("fc9", &[3]), "unknown layer \"fc9\"; the model has conv, logits"),
        ] {
            let e = l.check_shapes(&[layer("conv", &[4, 16, 16]), declared]).unwrap_err();
            assert_eq!(e.to_string(), message);
            assert!(!e.retryable(), "{message}");
        }
    }
}
