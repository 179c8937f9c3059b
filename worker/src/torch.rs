//! The torch thread: libtorch work runs on one thread of its own, off the async runtime,
//! with the last model it loaded kept there, in the last task's precision.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::Device;
use tokio::sync::oneshot;

use loupe_core::spec::{LayerInfo, ModelRef, Precision};
use loupe_core::task::{Lease, Work};

use crate::model::TorchScript;
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

/// The model the torch thread holds, with its layers, keyed by digest and precision.
pub(crate) struct Loaded {
    sha256: String,
    precision: Precision,
    pub(crate) model: TorchScript,
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

    /// Runs `f` on the torch thread with the lease's model (from `model_path`) loaded in
    /// the task's precision.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        lease: &Lease,
        model_path: PathBuf,
        f: impl FnOnce(&mut Loaded) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        let (device, want, input_size, channels) = (self.device, lease.job.model.clone(), lease.job.settings.input_size, lease.job.settings.param.channels);
        let precision = task_precision(lease);
        let declared: Vec<LayerInfo> = lease.job.layers.iter().map(|plan| plan.layer.clone()).collect();
        let job: TorchJob = Box::new(move |loaded: &mut Option<Loaded>| {
            // tch panics on some libtorch errors; one bad task must not take the worker
            // down with it.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let l = load(loaded, device, &model_path, &want, precision, input_size, channels)?;
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

/// The number format a task computes in: a render's is its job's; a map or reduce is
/// always fp32, since its statistics are exact whatever precision the job renders in.
fn task_precision(lease: &Lease) -> Precision {
    match lease.task.work {
        Work::Render { .. } => lease.job.settings.precision,
        Work::Map { .. } | Work::Reduce { .. } => Precision::Fp32,
    }
}

/// The lease's model in `precision`, loaded once per digest and precision, and checked
/// against the digest. Another precision loads the file again rather than converting the
/// held weights: bf16 weights converted back to fp32 are rounded, and a task's result
/// must depend only on the task, not on what the worker ran before.
fn load<'a>(loaded: &'a mut Option<Loaded>, device: Device, path: &Path, want: &ModelRef, precision: Precision, input_size: u32, channels: u32) -> Result<&'a mut Loaded> {
    if loaded.as_ref().map(|l| (l.sha256.as_str(), l.precision)) != Some((want.sha256.as_str(), precision)) {
        *loaded = None;
        let digest = loupe_core::sha256_file(path).map_err(|e| Error::Model(format!("model {}: {e}", path.display())))?;
        if digest != want.sha256 {
            return Err(Error::Model(format!(
                "model {} has sha256 {digest}, but the job was submitted with {}; it changed after submission",
                want.uri,
                want.sha256
            )));
        }
        let mut model = TorchScript::load(path, device)?;
        let layers = model.layers(input_size, channels)?;
        // The batch limits are learnt anew with the precision: bf16 fits more in memory.
        *loaded = Some(Loaded { sha256: digest, precision, model: model.in_precision(precision), layers, max_batch: HashMap::new() });
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
    use loupe_core::spec::{RenderSettings, Technique};
    use loupe_core::task::{JobContext, LeaseId, LeaseSecret, TaskSpec};

    use super::*;
    use crate::model::Model;
    use crate::render::{render, RenderRequest, Subject};
    use crate::tasks::TaskSignals;

    fn demo_model() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/demo/demo.pt")
    }

    /// A lease of `work` on the demo model, rendering at `precision`.
    fn lease(work: Work, precision: Precision) -> Lease {
        let path = demo_model();
        let model = ModelRef { uri: path.to_string_lossy().into_owned(), name: "demo".into(), sha256: loupe_core::sha256_file(&path).unwrap() };
        let settings = RenderSettings { steps: 16, size: 32, input_size: 32, seed: 7, learning_rate: 0.05, precision, ..Default::default() };
        let job_id = "job-1".parse().unwrap();
        Lease {
            lease_id: LeaseId::new(&job_id, 0, 1, LeaseSecret::random()),
            task: TaskSpec { job_id, index: 0, work },
            attempt: 1,
            ttl_ms: 60_000,
            max_ms: 3_600_000,
            job: JobContext { model, settings, out: "unused".into(), dataset: None, layers: Vec::new() },
        }
    }

    /// A render of units 0..4 of the demo's logits on `torch`: each unit's pixels.
    async fn render_units(torch: &TorchThread, precision: Precision) -> Vec<Vec<u8>> {
        let lease = lease(Work::render("logits", Technique::Channel, 0..4u32), precision);
        let settings = lease.job.settings_for("logits");
        torch
            .run(&lease, demo_model(), move |l| {
                let subjects: Vec<Subject> = (0..4).map(Subject::Unit).collect();
                let req = RenderRequest { layer: "logits", technique: Technique::Channel, subjects: &subjects, settings: &settings };
                let outcomes = render(&l.model, &req, &TaskSignals::default(), &mut None, None)?;
                Ok(outcomes.into_iter().map(|o| o.expect("no unit diverges").images[0].bytes.clone()).collect())
            })
            .await
            .unwrap()
    }

    /// A reduce's forward pass on `torch`: the demo's activations of a fixed image.
    async fn reduce_activations(torch: &TorchThread) -> Vec<(String, Vec<f32>)> {
        let lease = lease(Work::Reduce { layer: "conv1".into() }, Precision::Bf16);
        torch
            .run(&lease, demo_model(), |l| {
                let _guard = tch::no_grad_guard();
                let x = tch::Tensor::linspace(0.0, 1.0, 3 * 32 * 32, (tch::Kind::Float, Device::Cpu)).view([1, 3, 32, 32]);
                let acts = l.model.activations(&x)?;
                Ok(acts.into_iter().map(|(name, t)| (name, Vec::<f32>::try_from(t.to_kind(tch::Kind::Float).flatten(0, -1)).unwrap())).collect())
            })
            .await
            .unwrap()
    }

    /// A task's result depends only on the task: fp32 renders and a reduce's forward pass
    /// after a bf16 render on the same torch thread equal a fresh thread's, byte for byte
    /// (fp32 on the CPU is deterministic; bf16 bytes differ between CPUs and are never
    /// compared).
    #[tokio::test]
    async fn a_bf16_task_does_not_change_later_fp32_tasks() {
        let fresh = TorchThread::spawn(Device::Cpu);
        let want_images = render_units(&fresh, Precision::Fp32).await;
        let want_activations = reduce_activations(&TorchThread::spawn(Device::Cpu)).await;

        let used = TorchThread::spawn(Device::Cpu);
        render_units(&used, Precision::Bf16).await;
        assert!(render_units(&used, Precision::Fp32).await == want_images, "an fp32 render after a bf16 one differs from a fresh worker's");
        render_units(&used, Precision::Bf16).await;
        assert!(reduce_activations(&used).await == want_activations, "a reduce after a bf16 render differs from a fresh worker's");
    }

    /// The tiny fixture's layers against shapes a job could declare: right ones pass; a
    /// wrong shape or an unknown layer is an error that names it, and is not retried.
    #[test]
    fn declared_shapes_are_checked_against_the_model() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny.pt");
        let sha256 = loupe_core::sha256_file(&path).unwrap();
        let want = ModelRef { uri: path.to_string_lossy().into_owned(), name: "tiny".into(), sha256 };
        let mut loaded = None;
        let l = load(&mut loaded, Device::Cpu, &path, &want, Precision::Fp32, 16, 3).unwrap();
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
