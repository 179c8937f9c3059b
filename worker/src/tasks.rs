//! A leased task's work: rendering (on the torch thread), map and reduce, and storing
//! what a render produced. The worker loop in [`crate::runner`] calls it through
//! [`TaskWork`], so that the loop can be tested without libtorch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::info;

use loupe_core::atlas::{Atlas, ImageId, RenderedImage, Target};
use loupe_core::location::Location;
use loupe_core::spec::{NamedImage, RenderSettings, Technique, DEEPDREAM_NOISE};
use loupe_core::store::{self, ArtifactStore};
use loupe_core::task::{Lease, Work};

use crate::examples;
use crate::metrics::WorkerMetrics;
use crate::render::{decode_input, render, LayerItem, LayerItemKind, Outcome, Pixels, RenderRequest, Rendered, StepTimes, Subject};
use crate::runner::WorkerConfig;
use crate::torch::{Loaded, TorchThread};
use crate::{Error, Result};

/// What a running task and the worker loop tell each other: the loop asks the task to
/// stop (its lease ended, a shutdown, its maximum time passed); the task counts its steps
/// (optimisation steps, map batches, reduce and store items), so the loop renews the lease
/// only while the work moves (a hung device must not hold its task forever).
#[derive(Debug, Default)]
pub struct TaskSignals {
    cancel: AtomicBool,
    progress: AtomicU64,
}

impl TaskSignals {
    /// Asks the task to stop with [`Error::Cancelled`].
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Counts one step of progress; [`Error::Cancelled`] when the task is to stop.
    pub fn step(&self) -> Result<()> {
        self.progress.fetch_add(1, Ordering::Relaxed);
        if self.is_cancelled() {
            return Err(Error::Cancelled);
        }
        Ok(())
    }

    /// The steps counted so far.
    pub fn progress(&self) -> u64 {
        self.progress.load(Ordering::Relaxed)
    }
}

/// What the worker loop runs for a leased task. The loop renews the lease meanwhile, while
/// the task makes progress, and reports the outcome.
#[async_trait]
pub(crate) trait TaskWork: Send + Sync + 'static {
    /// A rendered task's images, still to be stored.
    type Finished: Send + 'static;

    /// Runs the task's work, counting its steps on `signals`; it stops with
    /// [`Error::Cancelled`] soon after they ask it to. `Some`: rendered, to be stored with
    /// [`TaskWork::store`] while the next task renders; `None`: the task's outputs are all
    /// stored.
    async fn run(&self, lease: &Lease, signals: &Arc<TaskSignals>) -> Result<Option<Self::Finished>>;

    /// Stores what [`TaskWork::run`] rendered, a step per image, stopping with
    /// [`Error::Cancelled`] when `signals` ask it to. Returns the number of images written.
    async fn store(&self, lease: &Lease, finished: Self::Finished, signals: &TaskSignals) -> Result<u64>;
}

/// The real task work: libtorch on the torch thread (none with `--no-render`) and the
/// artifact stores.
pub(crate) struct Tasks {
    torch: Option<TorchThread>,
    /// Locked by one task's `run` at a time; storing uses the store its render opened.
    stores: tokio::sync::Mutex<Stores>,
    model_cache: PathBuf,
    profile: bool,
    metrics: Arc<WorkerMetrics>,
}

impl Tasks {
    pub(crate) fn new(config: &WorkerConfig) -> Tasks {
        Tasks {
            torch: config.render.then(|| TorchThread::spawn(config.device)),
            stores: Default::default(),
            model_cache: config.model_cache.clone(),
            profile: config.profile,
            metrics: config.metrics.clone(),
        }
    }
}

/// A rendered task: each image (or why it diverged) with its id, the atlas they go to and
/// the settings their records name.
pub(crate) struct Finished {
    atlas: Atlas,
    images: Vec<(ImageId, Outcome)>,
    settings: RenderSettings,
}

#[async_trait]
impl TaskWork for Tasks {
    type Finished = Finished;

    async fn run(&self, lease: &Lease, signals: &Arc<TaskSignals>) -> Result<Option<Finished>> {
        let mut stores = self.stores.lock().await;
        let stores = &mut *stores;
        let atlas = Atlas::new(stores.open(&lease.job.out).await?);
        let Some(torch) = &self.torch else {
            write_placeholder(atlas.store(), lease).await?;
            return Ok(None);
        };
        let model_path = local_model(lease, &self.model_cache).await?;
        match &lease.task.work {
            Work::Render { layer, technique, targets } => {
                let task = RenderTask { task_id: lease.task.id(), layer: layer.clone(), technique: *technique, settings: lease.job.settings_for(layer) };
                let subjects = subjects(lease, &task, targets).await?;
                let (profile, signals, metrics) = (self.profile, signals.clone(), self.metrics.clone());
                let settings = task.settings.clone();
                let rendered = torch.run(lease, model_path, move |loaded| render_subjects(loaded, &task, &subjects, profile, &signals, &metrics)).await?;
                let images = rendered.into_iter().map(|r| Ok((ImageId::new(layer, *technique, target(&r).clone())?, r))).collect::<Result<_>>()?;
                Ok(Some(Finished { atlas, images, settings }))
            }
            Work::Map { shard, source } => {
                let dataset = dataset_store(stores, lease).await?;
                examples::run_map(torch, lease, model_path, dataset.as_ref(), &atlas, *shard, source, signals.clone()).await?;
                Ok(None)
            }
            Work::Reduce { layer } => {
                let dataset = dataset_store(stores, lease).await?;
                examples::run_reduce(torch, lease, model_path, dataset.as_ref(), &atlas, layer, signals).await?;
                Ok(None)
            }
        }
    }

    /// Each image's PNGs, encoded here rather than on the torch thread, then its record; a
    /// diverged image's failed record. Both count as written.
    async fn store(&self, lease: &Lease, finished: Finished, signals: &TaskSignals) -> Result<u64> {
        let Finished { atlas, images, settings } = finished;
        for (id, rendered) in &images {
            signals.step()?;
            let model = &lease.job.model.sha256;
            match rendered {
                Ok(r) => atlas.write_image(id, &encoded(r, settings.size), model, &settings).await?,
                Err(diverged) => atlas.write_failed(id, &diverged.reason, model, &settings).await?,
            }
        }
        Ok(images.len() as u64)
    }
}

/// What a render task renders, taken from its lease once.
struct RenderTask {
    task_id: String,
    layer: String,
    technique: Technique,
    /// The job's settings with the layer's steps.
    settings: RenderSettings,
}

/// What a subject's outcome shows.
fn target(outcome: &Outcome) -> &Target {
    match outcome {
        Ok(r) => &r.target,
        Err(d) => &d.target,
    }
}

/// Renders a render task's subjects on the torch thread.
fn render_subjects(l: &mut Loaded, task: &RenderTask, subjects: &[Subject], profile: bool, signals: &TaskSignals, metrics: &WorkerMetrics) -> Result<Vec<Outcome>> {
    let (layer, technique, settings) = (task.layer.as_str(), task.technique, &task.settings);
    // Unknown layers and units out of range are named here; render checks each direction
    // against the layer.
    let info = l.layer(layer)?;
    if let Some(u) = subjects.iter().find_map(|s| match s { Subject::Unit(u) if *u >= info.units() => Some(u), _ => None }) {
        return Err(Error::Model(format!("unit {u} is out of range: layer {layer:?} has {} units", info.units())));
    }
    let req = RenderRequest { layer, technique, subjects, settings };
    let max_batch = l.max_batch.entry(format!("{layer}/{technique}")).or_default();
    timed(task, subjects.len(), profile, metrics, |times| render(&l.model, &req, signals, max_batch, times))
}

/// Runs a render, counting its speed for the metrics and its step split when profiling.
fn timed<T>(task: &RenderTask, images: usize, profile: bool, metrics: &WorkerMetrics, f: impl FnOnce(Option<&mut StepTimes>) -> Result<T>) -> Result<T> {
    let mut times = profile.then(StepTimes::default);
    let started = std::time::Instant::now();
    let rendered = f(times.as_mut())?;
    metrics.rendered(images, task.settings.steps, started.elapsed());
    if let Some(times) = times {
        info!(task_id = task.task_id, layer = task.layer, images, "step time split: {times}");
        PROFILE.lock().expect("profile lock").add(&times);
    }
    Ok(rendered)
}

/// What each target of a render is optimised for: a unit, or a per-layer technique's item
/// with the input image it needs fetched and decoded.
async fn subjects(lease: &Lease, task: &RenderTask, targets: &[Target]) -> Result<Vec<Subject>> {
    let mut out = Vec::with_capacity(targets.len());
    for target in targets {
        out.push(match target {
            Target::Unit(u) => Subject::Unit(*u),
            Target::Item(name) => Subject::Item(LayerItem { name: name.clone(), kind: layer_item(lease, task, name).await? }),
        });
    }
    Ok(out)
}

/// A per-layer technique's item, as the job's technique options name it.
async fn layer_item(lease: &Lease, task: &RenderTask, name: &str) -> Result<LayerItemKind> {
    let (layer, technique, settings) = (&task.layer, task.technique, &lease.job.settings);
    let o = &settings.options;
    let input = |list: &[NamedImage]| {
        list.iter().find(|i| i.name == name).cloned().ok_or_else(|| Error::Model(format!("{technique} item {name:?} is not among the job's inputs")))
    };
    Ok(match technique {
        Technique::DeepDream if name == DEEPDREAM_NOISE && o.deepdream_inputs.is_empty() => LayerItemKind::DeepDream { start: None },
        Technique::DeepDream => LayerItemKind::DeepDream { start: Some(fetch_input(&input(&o.deepdream_inputs)?, settings).await?) },
        Technique::Caricature => LayerItemKind::Caricature { input: fetch_input(&input(&o.caricature_inputs)?, settings).await? },
        Technique::Direction => {
            let d = o.directions.iter().find(|d| &d.layer == layer && d.name == name);
            let d = d.ok_or_else(|| Error::Model(format!("direction {name:?} of layer {layer:?} is not among the job's directions")))?;
            LayerItemKind::Direction { vector: d.vector.clone() }
        }
        per_unit => return Err(Error::Model(format!("{per_unit} renders units of a layer, not item {name:?}"))),
    })
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
/// copy `<cache>/<sha256>.pt` of an object-store model, fetched when it is missing or
/// damaged, and checked.
pub async fn local_model(lease: &Lease, cache: &Path) -> Result<PathBuf> {
    let model = &lease.job.model;
    if let Location::Local(path) = Location::parse("model", &model.uri)? {
        return Ok(path);
    }
    let path = cache.join(format!("{}.pt", model.sha256));
    let io = |e: std::io::Error| Error::LocalDisk(format!("caching model {} in {}: {e}", model.uri, cache.display()));
    if is_cached(&path, &model.sha256).await.map_err(io)? {
        return Ok(path);
    }
    let bytes = store::fetch(&model.uri).await?.ok_or_else(|| Error::Model(format!("model {} does not exist", model.uri)))?;
    let digest = loupe_core::sha256_bytes(&bytes);
    if digest != model.sha256 {
        return Err(Error::Model(format!("model {} has sha256 {digest}, but the job was submitted with {}", model.uri, model.sha256)));
    }
    // Written under a name of its own and renamed over whatever is there: a crash never
    // leaves a partial model under its digest, and workers in one process (one process
    // id) fetching the same model never write the same file.
    tokio::fs::create_dir_all(cache).await.map_err(io)?;
    let suffix = rand::RngCore::next_u64(&mut rand::rngs::OsRng);
    let tmp = cache.join(format!(".{}.{suffix:016x}.tmp", model.sha256));
    let written: std::io::Result<()> = async {
        tokio::fs::write(&tmp, &bytes).await?;
        tokio::fs::rename(&tmp, &path).await
    }
    .await;
    if let Err(e) = written {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(io(e));
    }
    VERIFIED_MODELS.lock().expect("verified models lock").insert(path.clone());
    Ok(path)
}

/// Checks at start-up that models can be cached in `cache`: a worker that cannot write
/// there would fail every task it leases within milliseconds, and so spend the attempts
/// of a whole job, where refusing to start shows the mistake (a volume mounted read-only
/// or owned by another user) on the worker itself.
pub fn check_model_cache(cache: &Path) -> Result<()> {
    let fail = |e: std::io::Error| Error::LocalDisk(format!("the model cache {} (--model-cache, LOUPE_MODEL_CACHE) cannot be written: {e}", cache.display()));
    std::fs::create_dir_all(cache).map_err(fail)?;
    let suffix = rand::RngCore::next_u64(&mut rand::rngs::OsRng);
    let probe = cache.join(format!(".write-check.{suffix:016x}"));
    std::fs::write(&probe, b"").map_err(fail)?;
    std::fs::remove_file(&probe).map_err(fail)
}

/// The cached models this process has checked against their digest, or written itself.
static VERIFIED_MODELS: std::sync::Mutex<std::collections::BTreeSet<PathBuf>> = std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Whether the cache holds the model with digest `sha256` whole at `path`. A file is
/// hashed on its first use in this process: a damaged one (a disk that filled up, a crash
/// on a filesystem without atomic renames, a flipped bit) is then fetched again, instead
/// of failing every task on this worker.
async fn is_cached(path: &Path, sha256: &str) -> std::io::Result<bool> {
    let verified = VERIFIED_MODELS.lock().expect("verified models lock").contains(path);
    if verified && tokio::fs::try_exists(path).await? {
        return Ok(true);
    }
    let file = path.to_path_buf();
    let digest = match tokio::task::spawn_blocking(move || loupe_core::sha256_file(&file)).await.expect("hashing panicked") {
        Ok(digest) => digest,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if digest != sha256 {
        tracing::warn!(path = %path.display(), digest, "the cached model does not match its digest; fetching it again");
        return Ok(false);
    }
    VERIFIED_MODELS.lock().expect("verified models lock").insert(path.to_path_buf());
    Ok(true)
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

/// The dataset's store, for map and reduce tasks.
async fn dataset_store(stores: &mut Stores, lease: &Lease) -> Result<Arc<dyn ArtifactStore>> {
    stores.open(&examples::dataset_spec(lease)?.uri).await
}

/// The `--no-render` benchmark aid's whole task: one tiny object per task.
async fn write_placeholder(store: &dyn ArtifactStore, lease: &Lease) -> Result<()> {
    store.put(&format!("no-render/{}/{}", lease.task.job_id, lease.task.index), b"ok".to_vec()).await?;
    Ok(())
}

/// A rendered target's PNGs, as the atlas stores them.
fn encoded(r: &Rendered, size: u32) -> RenderedImage {
    let png = |p: &Pixels| crate::png::encode(&p.bytes, p.channels, size, size);
    RenderedImage {
        pngs: r.images.iter().map(png).collect(),
        objectives: r.objectives.clone(),
        snapshots: r.snapshots.iter().map(|s| (s.step, s.images.iter().map(png).collect())).collect(),
        curve: r.curve.clone(),
        diversity: r.diversity,
        dead: r.dead,
    }
}
