//! The worker loop: lease a task, render it on the render thread while renewing the lease
//! beside it, write the images and unit records, report. The same loop runs in
//! `loupe render` (against the in-process coordinator) and in the cluster's workers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tch::Device;
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use loupe_core::api::{ApiError, WorkerApi};
use loupe_core::atlas::{self, UnitRecord};
use loupe_core::spec::LayerInfo;
use loupe_core::store::{self, ArtifactStore};
use loupe_core::task::{Failure, Lease, LeaseState};

use crate::model::Model;
use crate::render::{render, RenderRequest, RenderedUnit};
use crate::{Error, Result};

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Shown to the coordinator in leases (for messages about lost leases).
    pub name: String,
    pub device: Device,
    /// How long to wait before asking again when no task is runnable.
    pub idle_poll: Duration,
    /// Where models fetched from object storage are kept, by digest.
    pub model_cache: PathBuf,
    /// False for the benchmark aid that measures the coordinator: each task writes one
    /// tiny artifact instead of rendering (`loupe-worker --no-render`).
    pub render: bool,
}

/// What a worker did, for the caller's summary.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WorkerStats {
    pub tasks_done: u64,
    pub images_written: u64,
}

struct RenderCall {
    lease: Lease,
    model_path: PathBuf,
    cancel: Arc<AtomicBool>,
    reply: oneshot::Sender<Result<Vec<RenderedUnit>>>,
}

/// The render thread: libtorch work is blocking, so it runs here and never on the async
/// runtime, where lease renewal must keep its pace. A bounded channel of one keeps at
/// most one task waiting.
struct RenderThread {
    calls: std::sync::mpsc::SyncSender<RenderCall>,
}

/// The model the render thread holds, with its layers, keyed by digest.
struct Loaded {
    sha256: String,
    model: Model,
    layers: Vec<LayerInfo>,
}

impl RenderThread {
    fn spawn(device: Device) -> RenderThread {
        let (calls, rx) = std::sync::mpsc::sync_channel::<RenderCall>(1);
        std::thread::Builder::new()
            .name("loupe-render".into())
            .spawn(move || {
                let mut loaded: Option<Loaded> = None;
                for call in rx {
                    // tch panics on some libtorch errors; one bad task must not take the
                    // worker down with it.
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_render(&mut loaded, device, &call.model_path, &call.lease, &call.cancel)
                    }))
                    .unwrap_or_else(|panic| {
                        loaded = None;
                        let msg = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
                        Err(Error::Torch(msg.unwrap_or_else(|| "libtorch panicked".into())))
                    });
                    let _ = call.reply.send(result);
                }
            })
            .expect("spawning the render thread");
        RenderThread { calls }
    }

    async fn render(&self, lease: Lease, model_path: PathBuf, cancel: Arc<AtomicBool>) -> Result<Vec<RenderedUnit>> {
        let (reply, rx) = oneshot::channel();
        let calls = self.calls.clone();
        tokio::task::spawn_blocking(move || calls.send(RenderCall { lease, model_path, cancel, reply }))
            .await
            .expect("send task panicked")
            .map_err(|_| Error::Torch("the render thread has stopped".into()))?;
        rx.await.map_err(|_| Error::Torch("the render thread has stopped".into()))?
    }
}

fn run_render(loaded: &mut Option<Loaded>, device: Device, path: &Path, lease: &Lease, cancel: &AtomicBool) -> Result<Vec<RenderedUnit>> {
    let want = &lease.job.model;
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
        let layers = model.layers(lease.job.settings.input_size)?;
        *loaded = Some(Loaded { sha256: digest, model, layers });
    }
    let l = loaded.as_ref().expect("loaded above");
    let task = &lease.task;
    let layer = l.layers.iter().find(|x| x.name == task.layer).ok_or_else(|| {
        let known: Vec<&str> = l.layers.iter().map(|x| x.name.as_str()).collect();
        Error::UnknownLayer(format!("{:?}; the model has {}", task.layer, known.join(", ")))
    })?;
    if let Some(u) = task.units.iter().find(|&&u| u >= layer.units()) {
        return Err(Error::Model(format!("unit {u} is out of range: layer {:?} has {} units", layer.name, layer.units())));
    }
    let req = RenderRequest { layer: &task.layer, technique: task.technique, units: &task.units, settings: &lease.job.settings };
    render(&l.model, &req, cancel)
}

/// A local path to the lease's model: the path itself for a local model, or the cached
/// copy `<cache>/<sha256>.pt` of an object-store model, fetched once and checked.
async fn local_model(lease: &Lease, cache: &Path) -> Result<PathBuf> {
    let model = &lease.job.model;
    if !model.uri.starts_with("s3://") {
        return Ok(PathBuf::from(model.uri.strip_prefix("file://").unwrap_or(&model.uri)));
    }
    let path = cache.join(format!("{}.pt", model.sha256));
    if tokio::fs::try_exists(&path).await.unwrap_or(false) {
        return Ok(path);
    }
    let bytes = store::fetch(&model.uri).await?.ok_or_else(|| Error::Model(format!("model {} does not exist", model.uri)))?;
    let digest = loupe_core::sha256_bytes(&bytes);
    if digest != model.sha256 {
        return Err(Error::Model(format!("model {} has sha256 {digest}, but the job was submitted with {}", model.uri, model.sha256)));
    }
    // Written under a temporary name and renamed, so a crash never leaves a partial model
    // under its digest.
    let io = |e: std::io::Error| Error::Model(format!("caching model {} in {}: {e}", model.uri, cache.display()));
    tokio::fs::create_dir_all(cache).await.map_err(io)?;
    let tmp = cache.join(format!(".{}.{}.tmp", model.sha256, std::process::id()));
    tokio::fs::write(&tmp, &bytes).await.map_err(io)?;
    tokio::fs::rename(&tmp, &path).await.map_err(io)?;
    Ok(path)
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_millis() as u64
}

/// Resolves when `shutdown` turns true or its sender goes away.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// The artifact stores this worker writes to, by output URI: opening an S3 store loads
/// the AWS configuration, which is done once per atlas rather than once per task.
#[derive(Default)]
struct Stores(HashMap<String, Arc<dyn ArtifactStore>>);

impl Stores {
    async fn open(&mut self, out: &str) -> Result<Arc<dyn ArtifactStore>> {
        if let Some(s) = self.0.get(out) {
            return Ok(s.clone());
        }
        let s = store::open(out).await?;
        self.0.insert(out.to_string(), s.clone());
        Ok(s)
    }
}

/// Runs the worker loop until `shutdown` turns true. It ends early only when the
/// coordinator refuses this worker (another protocol version, a wrong token).
pub async fn run_worker(api: Arc<dyn WorkerApi>, config: WorkerConfig, mut shutdown: watch::Receiver<bool>) -> std::result::Result<WorkerStats, ApiError> {
    let renderer = config.render.then(|| RenderThread::spawn(config.device));
    let mut stores = Stores::default();
    let mut stats = WorkerStats::default();
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            break;
        }
        let lease = match api.lease(&config.name).await {
            Ok(lease) => {
                backoff = Duration::from_millis(100);
                lease
            }
            Err(e @ ApiError::Refused(_)) => return Err(e),
            Err(e) => {
                // The coordinator may be restarting: back off and ask again.
                warn!(worker = %config.name, error = %e, "leasing failed; retrying");
                tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = stopped(&mut shutdown) => break }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        let Some(lease) = lease else {
            tokio::select! { _ = tokio::time::sleep(config.idle_poll) => {}, _ = stopped(&mut shutdown) => break }
            continue;
        };
        if let Some(images) = run_task(api.as_ref(), renderer.as_ref(), &mut stores, &config, lease, &mut shutdown).await {
            stats.tasks_done += 1;
            stats.images_written += images;
        }
    }
    Ok(stats)
}

/// Renders one leased task and reports it. Returns the number of images written when the
/// task completed.
async fn run_task(
    api: &dyn WorkerApi,
    renderer: Option<&RenderThread>,
    stores: &mut Stores,
    config: &WorkerConfig,
    lease: Lease,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<u64> {
    let task_id = lease.task.id();
    info!(task_id, attempt = lease.attempt, layer = %lease.task.layer, technique = %lease.task.technique, units = lease.task.units.len(), "task leased");
    let cancel = Arc::new(AtomicBool::new(false));
    let renew_every = Duration::from_millis(lease.deadline_ms.saturating_sub(now_ms()) / 3).max(Duration::from_millis(50));
    let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + renew_every, renew_every);
    let mut shutting_down = false;
    let render = async {
        let store = stores.open(&lease.job.out).await?;
        let Some(renderer) = renderer else { return write_placeholder(store.as_ref(), &lease).await.map(|_| (store, Vec::new())) };
        let model_path = local_model(&lease, &config.model_cache).await?;
        Ok((store, renderer.render(lease.clone(), model_path, cancel.clone()).await?))
    };
    tokio::pin!(render);
    let result = loop {
        tokio::select! {
            r = &mut render => break r,
            _ = renew.tick() => match api.renew(&lease.lease_id).await {
                Ok(LeaseState::Held) => {}
                Ok(state) => {
                    info!(task_id, ?state, "lease ended; stopping the task");
                    cancel.store(true, Ordering::Relaxed);
                }
                Err(e) => warn!(task_id, error = %e, "renewing the lease failed"),
            },
            _ = stopped(shutdown), if !shutting_down => {
                shutting_down = true;
                cancel.store(true, Ordering::Relaxed);
            }
        }
    };
    let failure = match result {
        Ok((store, units)) => match write_units(store.as_ref(), &lease, &units).await {
            Ok(()) => {
                report_complete(api, &lease, shutdown).await;
                return Some(units.len() as u64);
            }
            Err(e) => Failure { retryable: true, message: e.to_string() },
        },
        Err(Error::Cancelled) if shutting_down => Failure { retryable: true, message: "the worker shut down".into() },
        Err(Error::Cancelled) => return None,
        Err(e) => Failure { retryable: e.retryable(), message: e.to_string() },
    };
    warn!(task_id, retryable = failure.retryable, message = %failure.message, "task failed");
    if let Err(e) = api.fail(&lease.lease_id, failure).await {
        warn!(task_id, error = %e, "reporting the failure failed; the lease will expire");
    }
    None
}

/// Reports a finished task. The outputs are already stored, so a coordinator that is
/// restarting is asked again with backoff rather than the work being thrown away; if the
/// lease expired meanwhile, the task runs again and overwrites the same keys.
async fn report_complete(api: &dyn WorkerApi, lease: &Lease, shutdown: &mut watch::Receiver<bool>) {
    let task_id = lease.task.id();
    let mut backoff = Duration::from_millis(100);
    for _ in 0..20 {
        match api.complete(&lease.lease_id).await {
            Ok(LeaseState::Held) => return debug!(task_id, "task complete"),
            Ok(state) => return info!(task_id, ?state, "completion not accepted; the outputs stand, overwritten by any retry"),
            Err(e) => warn!(task_id, error = %e, "reporting completion failed; retrying"),
        }
        tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = stopped(shutdown) => return }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
    warn!(task_id, "giving up reporting completion; the lease will expire and the task run again");
}

/// The `--no-render` benchmark aid's whole task: one tiny object per task.
async fn write_placeholder(store: &dyn ArtifactStore, lease: &Lease) -> Result<()> {
    store.put(&format!("no-render/{}/{}", lease.task.job_id, lease.task.index), b"ok".to_vec()).await?;
    Ok(())
}

/// Each unit's PNG, then its record: the record is written last, so its presence means
/// the image is whole.
async fn write_units(store: &dyn ArtifactStore, lease: &Lease, units: &[RenderedUnit]) -> Result<()> {
    let segment = atlas::layer_segment(&lease.task.layer)?;
    let size = lease.job.settings.size;
    for u in units {
        let technique = lease.task.technique;
        let image_key = atlas::image_key(&segment, u.unit, technique);
        store.put(&image_key, crate::png::encode_rgb(&u.rgb, size, size)).await?;
        let record = UnitRecord {
            format_version: atlas::FORMAT_VERSION,
            layer: lease.task.layer.clone(),
            unit: u.unit,
            technique,
            image: format!("{technique}.png"),
            objective: u.objective,
            model_sha256: lease.job.model.sha256.clone(),
            settings: lease.job.settings.clone(),
        };
        let mut json = serde_json::to_vec_pretty(&record).expect("plain data serialises");
        json.push(b'\n');
        store.put(&atlas::record_key(&segment, u.unit, technique), json).await?;
    }
    Ok(())
}
