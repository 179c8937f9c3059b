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
use loupe_core::atlas::{self, ItemRecord, SnapshotEntry, Target, UnitRecord};
use loupe_core::spec::{LayerInfo, ModelRef, NamedImage, RenderSettings, Technique, DEEPDREAM_NOISE};
use loupe_core::store::{self, ArtifactStore};
use loupe_core::task::{Failure, Lease, LeaseState, Work};

use crate::examples;
use crate::metrics::{TaskOutcome, WorkerMetrics};
use crate::model::Model;
use crate::render::{decode_input, render, LayerItem, LayerItemKind, Pixels, RenderRequest, Rendered, StepTimes, Subject};
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
    /// Time each step's phases (it synchronises the device, so it is off by default) and
    /// log the split per task; [`profile_totals`] sums them.
    pub profile: bool,
    /// Counted as tasks end; served on `/metrics` by `loupe-worker`.
    pub metrics: Arc<WorkerMetrics>,
}

/// What a worker did, for the caller's summary.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WorkerStats {
    pub tasks_done: u64,
    pub images_written: u64,
}

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
    /// The largest batch known to fit in memory, per layer (see [`render`]).
    max_batch: HashMap<String, Option<usize>>,
}

impl TorchThread {
    fn spawn(device: Device) -> TorchThread {
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

/// Renders one render or layer render task's units or items on the torch thread.
fn render_subjects(l: &mut Loaded, lease: &Lease, subjects: &[Subject], profile: bool, cancel: &AtomicBool, metrics: &WorkerMetrics) -> Result<Vec<Rendered>> {
    let (Work::Render { layer, technique, .. } | Work::LayerRender { layer, technique, .. }) = &lease.task.work else { unreachable!("only renders are rendered") };
    // Unknown layers and units out of range are named here; render checks each direction against the layer.
    let info = l.layer(layer)?;
    if let Some(u) = subjects.iter().find_map(|s| match s { Subject::Unit(u) if *u >= info.units() => Some(u), _ => None }) {
        return Err(Error::Model(format!("unit {u} is out of range: layer {layer:?} has {} units", info.units())));
    }
    let settings = lease.job.settings_for(layer);
    l.model.set_precision(settings.precision);
    let req = RenderRequest { layer, technique: *technique, subjects, settings: &settings };
    let max_batch = l.max_batch.entry(format!("{layer}/{technique}")).or_default();
    timed(lease, subjects.len(), settings.steps, profile, metrics, |times| render(&l.model, &req, cancel, max_batch, times))
}

/// Runs a render, counting its speed for the metrics and its step split when profiling.
fn timed<T>(lease: &Lease, images: usize, steps: u32, profile: bool, metrics: &WorkerMetrics, f: impl FnOnce(Option<&mut StepTimes>) -> Result<T>) -> Result<T> {
    let mut times = profile.then(StepTimes::default);
    let started = std::time::Instant::now();
    let rendered = f(times.as_mut())?;
    metrics.rendered(images, steps, started.elapsed());
    if let Some(times) = times {
        info!(task_id = lease.task.id(), layer = lease.task.work.layer().unwrap_or("-"), images, "step time split: {times}");
        PROFILE.lock().expect("profile lock").add(&times);
    }
    Ok(rendered)
}

/// What a render task renders: its units, or a layer render's items with the input
/// images they need fetched and decoded.
async fn subjects(lease: &Lease) -> Result<Vec<Subject>> {
    let (layer, technique, items) = match &lease.task.work {
        Work::Render { units, .. } => return Ok(units.iter().map(|&u| Subject::Unit(u)).collect()),
        Work::LayerRender { layer, technique, items } => (layer, technique, items),
        _ => unreachable!("only renders have units or items"),
    };
    let settings = &lease.job.settings;
    let o = &settings.options;
    let input = |list: &[NamedImage], name: &str| {
        list.iter().find(|i| i.name == name).cloned().ok_or_else(|| Error::Model(format!("{technique} item {name:?} is not among the job's inputs")))
    };
    let mut out = Vec::with_capacity(items.len());
    for name in items {
        let kind = match technique {
            Technique::DeepDream if name == DEEPDREAM_NOISE && o.deepdream_inputs.is_empty() => LayerItemKind::DeepDream { start: None },
            Technique::DeepDream => LayerItemKind::DeepDream { start: Some(fetch_input(&input(&o.deepdream_inputs, name)?, settings).await?) },
            Technique::Caricature => LayerItemKind::Caricature { input: fetch_input(&input(&o.caricature_inputs, name)?, settings).await? },
            Technique::Direction => {
                let d = o.directions.iter().find(|d| &d.layer == layer && &d.name == name);
                let d = d.ok_or_else(|| Error::Model(format!("direction {name:?} of layer {layer:?} is not among the job's directions")))?;
                LayerItemKind::Direction { vector: d.vector.clone() }
            }
            other => unreachable!("{other} is a per-unit technique"),
        };
        out.push(Subject::Item(LayerItem { name: name.clone(), kind }));
    }
    Ok(out)
}

/// An input image of a technique, read from its URI and decoded at the render's size.
async fn fetch_input(image: &NamedImage, settings: &RenderSettings) -> Result<crate::render::InputImage> {
    let bytes = store::fetch(&image.uri).await?.ok_or_else(|| Error::Model(format!("input image {:?} ({}) does not exist", image.name, image.uri)))?;
    decode_input(&bytes, settings.param.channels, settings.size, &format!("input image {:?} ({})", image.name, image.uri))
}

/// Step times summed over every task this process rendered with profiling on.
static PROFILE: std::sync::Mutex<StepTimes> =
    std::sync::Mutex::new(StepTimes { steps: 0, transforms: Duration::ZERO, forward: Duration::ZERO, backward: Duration::ZERO, optimiser: Duration::ZERO });

/// The step time split of everything rendered so far with `WorkerConfig::profile` on.
pub fn profile_totals() -> StepTimes {
    *PROFILE.lock().expect("profile lock")
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
///
/// A rendered task's PNGs are encoded and stored, and the task reported, while the next
/// task renders: one task finishing beside one rendering keeps the device busy.
pub async fn run_worker(api: Arc<dyn WorkerApi>, config: WorkerConfig, mut shutdown: watch::Receiver<bool>) -> std::result::Result<WorkerStats, ApiError> {
    let torch = config.render.then(|| TorchThread::spawn(config.device));
    let mut stores = Stores::default();
    let mut stats = WorkerStats::default();
    let mut finishing: Option<tokio::task::JoinHandle<Option<u64>>> = None;
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            break;
        }
        let lease = match api.lease(&config.name).await {
            Ok(lease) => {
                config.metrics.set_registered(true);
                backoff = Duration::from_millis(100);
                lease
            }
            Err(e @ ApiError::Refused(_)) => return Err(e),
            Err(e) => {
                config.metrics.set_registered(false);
                // The coordinator may be restarting: back off and ask again.
                warn!(worker = %config.name, error = %e, "leasing failed; retrying");
                tokio::select! { _ = tokio::time::sleep(backoff) => {}, _ = stopped(&mut shutdown) => break }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        let Some(lease) = lease else {
            // Nothing to lease: let the last task finish, so that its reduce can start.
            if let Some(f) = finishing.take() {
                stats.count(f.await.unwrap_or(None));
                continue;
            }
            tokio::select! { _ = tokio::time::sleep(config.idle_poll) => {}, _ = stopped(&mut shutdown) => break }
            continue;
        };
        let outcome = run_task(&api, torch.as_ref(), &mut stores, &config, &lease, &mut shutdown).await;
        match outcome {
            Some(Outcome::Rendered(store, units)) => {
                if let Some(f) = finishing.take() {
                    stats.count(f.await.unwrap_or(None));
                }
                let (api, shutdown, metrics) = (api.clone(), shutdown.clone(), config.metrics.clone());
                finishing = Some(tokio::spawn(async move { finish_render(api, store, lease, units, shutdown, &metrics).await }));
            }
            Some(Outcome::Done) => stats.count(Some(0)),
            None => {}
        }
    }
    if let Some(f) = finishing.take() {
        stats.count(f.await.unwrap_or(None));
    }
    Ok(stats)
}

impl WorkerStats {
    /// Counts a task that completed with `images` written; `None`: it did not complete.
    fn count(&mut self, images: Option<u64>) {
        if let Some(images) = images {
            self.tasks_done += 1;
            self.images_written += images;
        }
    }
}

/// How a task's work ended, when it did not fail.
enum Outcome {
    /// Rendered; the images still have to be stored and the task reported.
    Rendered(Arc<dyn ArtifactStore>, Vec<Rendered>),
    /// Everything stored and the task reported.
    Done,
}

/// Runs a leased task's work while renewing its lease. Failures are reported here.
async fn run_task(
    api: &Arc<dyn WorkerApi>,
    torch: Option<&TorchThread>,
    stores: &mut Stores,
    config: &WorkerConfig,
    lease: &Lease,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Outcome> {
    let task_id = lease.task.id();
    info!(task_id, attempt = lease.attempt, kind = lease.task.work.kind(), layer = lease.task.work.layer().unwrap_or("-"), units = lease.task.work.images(), "task leased");
    let cancel = Arc::new(AtomicBool::new(false));
    let work = async {
        let store = stores.open(&lease.job.out).await?;
        let Some(torch) = torch else {
            write_placeholder(store.as_ref(), lease).await?;
            return Ok(None);
        };
        let model_path = local_model(lease, &config.model_cache).await?;
        match &lease.task.work {
            Work::Render { .. } | Work::LayerRender { .. } => {
                let subjects = subjects(lease).await?;
                let (l, profile, cancel, metrics) = (lease.clone(), config.profile, cancel.clone(), config.metrics.clone());
                let rendered = torch.run(lease, model_path, move |loaded| render_subjects(loaded, &l, &subjects, profile, &cancel, &metrics)).await?;
                Ok(Some((store, rendered)))
            }
            Work::Map { shard, source } => {
                let dataset = dataset_store(stores, lease).await?;
                examples::run_map(torch, lease, model_path, dataset.as_ref(), store.as_ref(), *shard, source, cancel.clone()).await?;
                Ok(None)
            }
            Work::Reduce { layer } => {
                let dataset = dataset_store(stores, lease).await?;
                examples::run_reduce(torch, lease, model_path, dataset.as_ref(), store.as_ref(), layer).await?;
                Ok(None)
            }
        }
    };
    let (result, shutting_down) = with_renewal(api.as_ref(), lease, &cancel, Some(shutdown), work).await;
    let kind = lease.task.work.kind();
    let (failure, outcome) = match result {
        Ok(Some((store, units))) => return Some(Outcome::Rendered(store, units)),
        Ok(None) => {
            report_complete(api.as_ref(), lease, shutdown).await;
            config.metrics.task_ended(kind, TaskOutcome::Done, 0);
            return Some(Outcome::Done);
        }
        Err(Error::Cancelled) if shutting_down => (Failure::released("the worker shut down"), TaskOutcome::Released),
        Err(Error::Cancelled) => {
            config.metrics.task_ended(kind, TaskOutcome::Released, 0);
            return None;
        }
        Err(e) => (Failure::new(e.retryable(), e.to_string()), TaskOutcome::Failed),
    };
    report_failure(api.as_ref(), lease, failure).await;
    config.metrics.task_ended(kind, outcome, 0);
    None
}

/// The dataset's store, for map and reduce tasks.
async fn dataset_store(stores: &mut Stores, lease: &Lease) -> Result<Arc<dyn ArtifactStore>> {
    stores.open(&examples::dataset_spec(lease)?.uri).await
}

/// Runs `work` while renewing the lease every third of its time to live. A lease that
/// ends (job cancelled, lease lost) or a shutdown, when `shutdown` is given, sets
/// `cancel`, which the work polls. Returns the work's result and whether the worker is
/// shutting down.
async fn with_renewal<T>(
    api: &dyn WorkerApi,
    lease: &Lease,
    cancel: &AtomicBool,
    mut shutdown: Option<&mut watch::Receiver<bool>>,
    work: impl std::future::Future<Output = T>,
) -> (T, bool) {
    let task_id = lease.task.id();
    let renew_every = Duration::from_millis(lease.deadline_ms.saturating_sub(now_ms()) / 3).max(Duration::from_millis(50));
    let mut renew = tokio::time::interval_at(tokio::time::Instant::now() + renew_every, renew_every);
    let mut shutting_down = false;
    tokio::pin!(work);
    loop {
        tokio::select! {
            r = &mut work => return (r, shutting_down),
            _ = renew.tick() => match api.renew(&lease.lease_id).await {
                Ok(LeaseState::Held) => {}
                Ok(state) => {
                    info!(task_id, ?state, "lease ended; stopping the task");
                    cancel.store(true, Ordering::Relaxed);
                }
                Err(e) => warn!(task_id, error = %e, "renewing the lease failed"),
            },
            _ = stopped_if(shutdown.as_deref_mut()), if !shutting_down => {
                shutting_down = true;
                cancel.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// [`stopped`], or never without a receiver.
async fn stopped_if(shutdown: Option<&mut watch::Receiver<bool>>) {
    match shutdown {
        Some(s) => stopped(s).await,
        None => std::future::pending().await,
    }
}

/// Stores a rendered task's images and records and reports the task, renewing its lease
/// meanwhile. Returns the number of images written when the task completed.
async fn finish_render(
    api: Arc<dyn WorkerApi>,
    store: Arc<dyn ArtifactStore>,
    lease: Lease,
    rendered: Vec<Rendered>,
    mut shutdown: watch::Receiver<bool>,
    metrics: &WorkerMetrics,
) -> Option<u64> {
    // Storing is not interrupted by a shutdown: it is short, and the work is done. A lease
    // that ends (the job cancelled) stops it.
    let ended = AtomicBool::new(false);
    let write = async {
        match &lease.task.work {
            Work::Render { .. } => write_units(store.as_ref(), &lease, &rendered, &ended).await,
            _ => write_items(store.as_ref(), &lease, &rendered, &ended).await,
        }
    };
    let (result, _) = with_renewal(api.as_ref(), &lease, &ended, None, write).await;
    match result {
        Ok(()) => {
            report_complete(api.as_ref(), &lease, &mut shutdown).await;
            metrics.task_ended("render", TaskOutcome::Done, rendered.len() as u64);
            Some(rendered.len() as u64)
        }
        Err(Error::Cancelled) => {
            metrics.task_ended("render", TaskOutcome::Released, 0);
            None
        }
        Err(e) => {
            report_failure(api.as_ref(), &lease, Failure::new(true, e.to_string())).await;
            metrics.task_ended("render", TaskOutcome::Failed, 0);
            None
        }
    }
}

async fn report_failure(api: &dyn WorkerApi, lease: &Lease, failure: Failure) {
    let task_id = lease.task.id();
    warn!(task_id, retryable = failure.retryable, message = %failure.message, "task failed");
    if let Err(e) = api.fail(&lease.lease_id, failure).await {
        warn!(task_id, error = %e, "reporting the failure failed; the lease will expire");
    }
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

/// Each unit's PNGs (its images and snapshots), then its record: the record is written
/// last, so its presence means the images are whole.
async fn write_units(store: &dyn ArtifactStore, lease: &Lease, units: &[Rendered], ended: &AtomicBool) -> Result<()> {
    let Work::Render { layer, technique, .. } = &lease.task.work else { unreachable!("only render tasks have unit images") };
    let (segment, technique) = (atlas::layer_segment(layer)?, *technique);
    let settings = lease.job.settings_for(layer);
    for u in units {
        if ended.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let Target::Unit(unit) = u.target else { unreachable!("a render task renders units") };
        let mut names = Vec::with_capacity(u.images.len());
        for (i, image) in u.images.iter().enumerate() {
            let name = atlas::unit_image_name(technique, i as u32, None);
            store.put(&atlas::unit_file_key(&segment, unit, &name), encode(image, settings.size)).await?;
            names.push(name);
        }
        let mut snapshots = Vec::with_capacity(u.snapshots.len());
        for snap in &u.snapshots {
            let mut images = Vec::with_capacity(snap.images.len());
            for (i, image) in snap.images.iter().enumerate() {
                let name = atlas::unit_image_name(technique, i as u32, Some(snap.step));
                store.put(&atlas::unit_file_key(&segment, unit, &name), encode(image, settings.size)).await?;
                images.push(name);
            }
            snapshots.push(SnapshotEntry { step: snap.step, images });
        }
        let several = names.len() > 1;
        let record = UnitRecord {
            format_version: atlas::FORMAT_VERSION,
            layer: layer.clone(),
            unit,
            technique,
            image: names[0].clone(),
            objective: u.objectives.iter().sum::<f64>() / u.objectives.len().max(1) as f64,
            images: if several { names } else { Vec::new() },
            objectives: if several { u.objectives.clone() } else { Vec::new() },
            snapshots,
            dead: u.dead,
            model_sha256: lease.job.model.sha256.clone(),
            settings: settings.clone(),
        };
        store.put(&atlas::record_key(&segment, unit, technique), loupe_core::to_json(&record)).await?;
    }
    Ok(())
}

/// Each item's PNGs, then its record.
async fn write_items(store: &dyn ArtifactStore, lease: &Lease, items: &[Rendered], ended: &AtomicBool) -> Result<()> {
    let Work::LayerRender { layer, technique, .. } = &lease.task.work else { unreachable!("only layer renders have items") };
    let (segment, technique) = (atlas::layer_segment(layer)?, *technique);
    let settings = lease.job.settings_for(layer);
    for item in items {
        if ended.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let Target::Item(name) = &item.target else { unreachable!("a layer render renders items") };
        store.put(&atlas::item_image_key(&segment, technique, name, None), encode(&item.images[0], settings.size)).await?;
        let mut snapshots = Vec::with_capacity(item.snapshots.len());
        for snap in &item.snapshots {
            let image = snap.images.first().ok_or_else(|| Error::Torch(format!("snapshot {} of {:?} has no image", snap.step, name)))?;
            store.put(&atlas::item_image_key(&segment, technique, name, Some(snap.step)), encode(image, settings.size)).await?;
            snapshots.push(SnapshotEntry { step: snap.step, images: vec![format!("{}.step{}.png", name, snap.step)] });
        }
        let record = ItemRecord {
            format_version: atlas::FORMAT_VERSION,
            layer: layer.clone(),
            technique,
            item: name.clone(),
            image: format!("{}.png", name),
            objective: item.objectives[0],
            snapshots,
            model_sha256: lease.job.model.sha256.clone(),
            settings: settings.clone(),
        };
        store.put(&atlas::item_record_key(&segment, technique, name), loupe_core::to_json(&record)).await?;
    }
    Ok(())
}

fn encode(image: &Pixels, size: u32) -> Vec<u8> {
    crate::png::encode(&image.bytes, image.channels, size, size)
}
