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
        let job: TorchJob = Box::new(move |loaded: &mut Option<Loaded>| {
            // tch panics on some libtorch errors; one bad task must not take the worker
            // down with it.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                load(loaded, device, &model_path, &want, input_size, channels).and_then(f)
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
    pub(crate) fn layer(&self, name: &str) -> Result<&LayerInfo> {
        self.layers.iter().find(|x| x.name == name).ok_or_else(|| {
            let known: Vec<&str> = self.layers.iter().map(|x| x.name.as_str()).collect();
            Error::UnknownLayer(format!("{name:?}; the model has {}", known.join(", ")))
        })
    }
}
