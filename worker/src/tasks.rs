//! A leased task's work: rendering (on the torch thread), map and reduce, and storing
//! what a render produced. The worker loop in [`crate::runner`] calls it through
//! [`TaskWork`], so that the loop can be tested without libtorch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::info;

use loupe_core::atlas::{self, ItemRecord, SnapshotEntry, UnitRecord};
use loupe_core::spec::{NamedImage, RenderSettings, Technique, DEEPDREAM_NOISE};
use loupe_core::store::{self, ArtifactStore};
use loupe_core::task::{Lease, Work};

use crate::examples;
use crate::metrics::WorkerMetrics;
use crate::render::{decode_input, render, render_layer, LayerItem, LayerItemKind, Pixels, RenderRequest, RenderedItem, RenderedUnit, StepTimes};
use crate::runner::WorkerConfig;
use crate::torch::{Loaded, TorchThread};
use crate::{Error, Result};

/// What the worker loop runs for a leased task. The loop renews the lease meanwhile and
/// reports the outcome.
#[async_trait]
pub(crate) trait TaskWork: Send + Sync + 'static {
    /// A rendered task's images, still to be stored.
    type Finished: Send + 'static;

    /// Runs the task's work; it stops with [`Error::Cancelled`] soon after `cancel` turns
    /// true. `Some`: rendered, to be stored with [`TaskWork::store`] while the next task
    /// renders; `None`: the task's outputs are all stored.
    async fn run(&self, lease: &Lease, cancel: &Arc<AtomicBool>) -> Result<Option<Self::Finished>>;

    /// Stores what [`TaskWork::run`] rendered, stopping with [`Error::Cancelled`] when
    /// `ended` turns true. Returns the number of images written.
    async fn store(&self, lease: &Lease, finished: Self::Finished, ended: &AtomicBool) -> Result<u64>;
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

/// A rendered task: its images and the store they go to.
pub(crate) struct Finished {
    store: Arc<dyn ArtifactStore>,
    rendered: Rendered,
}

#[async_trait]
impl TaskWork for Tasks {
    type Finished = Finished;

    async fn run(&self, lease: &Lease, cancel: &Arc<AtomicBool>) -> Result<Option<Finished>> {
        let mut stores = self.stores.lock().await;
        let stores = &mut *stores;
        let store = stores.open(&lease.job.out).await?;
        let Some(torch) = &self.torch else {
            write_placeholder(store.as_ref(), lease).await?;
            return Ok(None);
        };
        let model_path = local_model(lease, &self.model_cache).await?;
        match &lease.task.work {
            Work::Render { .. } => {
                let (l, profile, cancel, metrics) = (lease.clone(), self.profile, cancel.clone(), self.metrics.clone());
                let units = torch.run(lease, model_path, move |loaded| render_units(loaded, &l, profile, &cancel, &metrics)).await?;
                Ok(Some(Finished { store, rendered: Rendered::Units(units) }))
            }
            Work::LayerRender { .. } => {
                let items = layer_items(lease).await?;
                let (l, profile, cancel, metrics) = (lease.clone(), self.profile, cancel.clone(), self.metrics.clone());
                let items = torch.run(lease, model_path, move |loaded| render_items(loaded, &l, &items, profile, &cancel, &metrics)).await?;
                Ok(Some(Finished { store, rendered: Rendered::Items(items) }))
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
    }

    async fn store(&self, lease: &Lease, finished: Finished, ended: &AtomicBool) -> Result<u64> {
        let Finished { store, rendered } = finished;
        match &rendered {
            Rendered::Units(units) => write_units(store.as_ref(), lease, units, ended).await?,
            Rendered::Items(items) => write_items(store.as_ref(), lease, items, ended).await?,
        }
        Ok(rendered.len() as u64)
    }
}

/// What a render task rendered.
enum Rendered {
    Units(Vec<RenderedUnit>),
    Items(Vec<RenderedItem>),
}

impl Rendered {
    fn len(&self) -> usize {
        match self {
            Rendered::Units(u) => u.len(),
            Rendered::Items(i) => i.len(),
        }
    }
}

/// Renders one render task's units on the torch thread.
fn render_units(l: &mut Loaded, lease: &Lease, profile: bool, cancel: &AtomicBool, metrics: &WorkerMetrics) -> Result<Vec<RenderedUnit>> {
    let Work::Render { layer, technique, units } = &lease.task.work else { unreachable!("only render tasks are rendered") };
    let info = l.layer(layer)?;
    if let Some(u) = units.iter().find(|&&u| u >= info.units()) {
        return Err(Error::Model(format!("unit {u} is out of range: layer {layer:?} has {} units", info.units())));
    }
    let settings = lease.job.settings_for(layer);
    l.model.set_precision(settings.precision);
    let req = RenderRequest { layer, technique: *technique, units, settings: &settings };
    let max_batch = l.max_batch.entry(format!("{layer}/{technique}")).or_default();
    timed(lease, units.len(), settings.steps, profile, metrics, |times| render(&l.model, &req, cancel, max_batch, times))
}

/// Renders one per-layer technique's items on the torch thread.
fn render_items(l: &mut Loaded, lease: &Lease, items: &[LayerItem], profile: bool, cancel: &AtomicBool, metrics: &WorkerMetrics) -> Result<Vec<RenderedItem>> {
    let Work::LayerRender { layer, technique, .. } = &lease.task.work else { unreachable!("only layer renders render items") };
    // Unknown layers are named here; render_layer checks each direction against the layer.
    l.layer(layer)?;
    let settings = lease.job.settings_for(layer);
    l.model.set_precision(settings.precision);
    let max_batch = l.max_batch.entry(format!("{layer}/{technique}")).or_default();
    timed(lease, items.len(), settings.steps, profile, metrics, |times| render_layer(&l.model, layer, *technique, items, &settings, cancel, max_batch, times))
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

/// The items of a layer render, with the input images they need fetched and decoded.
async fn layer_items(lease: &Lease) -> Result<Vec<LayerItem>> {
    let Work::LayerRender { layer, technique, items } = &lease.task.work else { unreachable!("only layer renders have items") };
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
        out.push(LayerItem { name: name.clone(), kind });
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

/// Each unit's PNGs (its images and snapshots), then its record: the record is written
/// last, so its presence means the images are whole.
async fn write_units(store: &dyn ArtifactStore, lease: &Lease, units: &[RenderedUnit], ended: &AtomicBool) -> Result<()> {
    let Work::Render { layer, technique, .. } = &lease.task.work else { unreachable!("only render tasks have unit images") };
    let (segment, technique) = (atlas::layer_segment(layer)?, *technique);
    let settings = lease.job.settings_for(layer);
    for u in units {
        if ended.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let mut names = Vec::with_capacity(u.images.len());
        for (i, image) in u.images.iter().enumerate() {
            let name = atlas::unit_image_name(technique, i as u32, None);
            store.put(&atlas::unit_file_key(&segment, u.unit, &name), encode(image, settings.size)).await?;
            names.push(name);
        }
        let mut snapshots = Vec::with_capacity(u.snapshots.len());
        for snap in &u.snapshots {
            let mut images = Vec::with_capacity(snap.images.len());
            for (i, image) in snap.images.iter().enumerate() {
                let name = atlas::unit_image_name(technique, i as u32, Some(snap.step));
                store.put(&atlas::unit_file_key(&segment, u.unit, &name), encode(image, settings.size)).await?;
                images.push(name);
            }
            snapshots.push(SnapshotEntry { step: snap.step, images });
        }
        let several = names.len() > 1;
        let record = UnitRecord {
            format_version: atlas::FORMAT_VERSION,
            layer: layer.clone(),
            unit: u.unit,
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
        store.put(&atlas::record_key(&segment, u.unit, technique), loupe_core::to_json(&record)).await?;
    }
    Ok(())
}

/// Each item's PNGs, then its record.
async fn write_items(store: &dyn ArtifactStore, lease: &Lease, items: &[RenderedItem], ended: &AtomicBool) -> Result<()> {
    let Work::LayerRender { layer, technique, .. } = &lease.task.work else { unreachable!("only layer renders have items") };
    let (segment, technique) = (atlas::layer_segment(layer)?, *technique);
    let settings = lease.job.settings_for(layer);
    for item in items {
        if ended.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        store.put(&atlas::item_image_key(&segment, technique, &item.name, None), encode(&item.image, settings.size)).await?;
        let mut snapshots = Vec::with_capacity(item.snapshots.len());
        for snap in &item.snapshots {
            let image = snap.images.first().ok_or_else(|| Error::Torch(format!("snapshot {} of {:?} has no image", snap.step, item.name)))?;
            store.put(&atlas::item_image_key(&segment, technique, &item.name, Some(snap.step)), encode(image, settings.size)).await?;
            snapshots.push(SnapshotEntry { step: snap.step, images: vec![format!("{}.step{}.png", item.name, snap.step)] });
        }
        let record = ItemRecord {
            format_version: atlas::FORMAT_VERSION,
            layer: layer.clone(),
            technique,
            item: item.name.clone(),
            image: format!("{}.png", item.name),
            objective: item.objective,
            snapshots,
            model_sha256: lease.job.model.sha256.clone(),
            settings: settings.clone(),
        };
        store.put(&atlas::item_record_key(&segment, technique, &item.name), loupe_core::to_json(&record)).await?;
    }
    Ok(())
}

fn encode(image: &Pixels, size: u32) -> Vec<u8> {
    crate::png::encode(&image.bytes, image.channels, size, size)
}
