//! Dataset examples, activation statistics and connections: the libtorch half of a job's
//! map and reduce tasks (docs/atlas-format.md "Dataset statistics", "Connections"). A map
//! runs the model over a shard's images and keeps, per layer and unit, each image's
//! summary (maximum over space and where, sum, sum of squares, positives) in a
//! [`LayerPartial`], and, per pair of consecutive job layers, each image's attributions in
//! a [`ConnectionPartial`]; the reduce merges the partials (loupe-stats) and crops each
//! example around its maximum, a receptive field wide.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use loupe_core::atlas::{self, Atlas, Connection, DatasetSummary, ExampleEntry, LayerExamples, PartialKind, SpatialMean, CONNECTIONS_LISTED};
use loupe_core::spec::LayerPlan;
use loupe_core::store::ArtifactStore;
use loupe_core::task::{Lease, ShardSource};
use loupe_dataset::Preprocessed;
use loupe_stats::{ConnectionPartial, ConnectionRow, LayerPartial, UnitSummary};

use crate::model::Model;
use crate::tasks::TaskSignals;
use crate::torch::TorchThread;
use crate::{Error, Result};

/// Images per forward pass of a map. Every pass has exactly this many images (a short
/// last batch is padded with blank images that are then dropped), so each image's
/// activations are computed by the same kernels whichever shard it falls in: the
/// statistics do not depend on how the dataset was split.
pub const MAP_BATCH: usize = 16;

/// Runs the model over `images` (preprocessed at the model's input size) and adds every
/// image to each layer's partial, in order. `partials[i]` belongs to `layers[i]`;
/// `connections`, when not empty, has one partial per pair of consecutive layers,
/// `connections[i]` from `layers[i]` to `layers[i + 1]`, and the passes then keep
/// gradients for them.
pub fn map_images(model: &dyn Model, layers: &[LayerPlan], images: &[(String, Preprocessed)], partials: &mut [LayerPartial], connections: &mut [ConnectionPartial], signals: &TaskSignals) -> Result<()> {
    let _no_grad = connections.is_empty().then(tch::no_grad_guard);
    let device = model.device();
    let unit_index: Vec<Tensor> = layers
        .iter()
        .map(|p| Tensor::from_slice(&p.units.iter().map(i64::from).collect::<Vec<_>>()).to_device(device))
        .collect();
    for batch in images.chunks(MAP_BATCH) {
        signals.step()?;
        let size = batch[0].1.size as i64;
        let mut pixels = Vec::with_capacity(MAP_BATCH * 3 * (size * size) as usize);
        for (_, img) in batch {
            pixels.extend(img.to_chw_f32());
        }
        pixels.resize(MAP_BATCH * 3 * (size * size) as usize, 0.5);
        let x = Tensor::from_slice(&pixels).reshape([MAP_BATCH as i64, 3, size, size]).to_device(device);
        let activations = if connections.is_empty() {
            model.activations(&x)?
        } else {
            // With a graph from the input, every layer's activation can be differentiated.
            model.activations_between_layers(&x.set_requires_grad(true))?
        };
        let layer_activations = layers
            .iter()
            .map(|plan| {
                activations.iter().find(|(name, _)| *name == plan.layer.name).map(|(_, t)| t).ok_or_else(|| Error::UnknownLayer(plan.layer.name.clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        for ((act, units), partial) in layer_activations.iter().zip(&unit_index).zip(partials.iter_mut()) {
            let summaries = summarise(&act.detach(), units, batch.len())?;
            for ((id, _), per_unit) in batch.iter().zip(summaries) {
                partial.add_image(id, &per_unit).map_err(stats_error)?;
            }
        }
        for (i, partial) in connections.iter_mut().enumerate() {
            signals.step()?;
            let (from, to) = (layer_activations[i], layer_activations[i + 1]);
            let scores = crate::connections::attributions(from, to, partial.from_units(), partial.to_units(), partial.to_layer(), batch.len())?;
            let per_image = partial.from_units().len() * partial.to_units().len();
            for ((id, _), scores) in batch.iter().zip(scores.chunks(per_image)) {
                partial.add_image(id, scores).map_err(stats_error)?;
            }
        }
    }
    Ok(())
}

/// The connection partials a map keeps: one per pair of consecutive job layers when the
/// job asks for connections, else none.
pub fn connection_partials(layers: &[LayerPlan], wanted: bool) -> Vec<ConnectionPartial> {
    if !wanted {
        return Vec::new();
    }
    layers.windows(2).map(|w| connection_partial(&w[0], &w[1])).collect()
}

/// An empty partial of the connections from `from`'s units to `to`'s.
fn connection_partial(from: &LayerPlan, to: &LayerPlan) -> ConnectionPartial {
    ConnectionPartial::new(&from.layer.name, from.units.iter().collect(), &to.layer.name, to.units.iter().collect())
}

/// Per image (the first `n` of the batch) and per selected unit: the summary the
/// statistics need, computed on the device and moved to the host once.
fn summarise(act: &Tensor, units: &Tensor, n: usize) -> Result<Vec<Vec<UnitSummary>>> {
    let shape = act.size();
    let width = if shape.len() == 4 { shape[3] } else { 1 };
    // [B, U, P]: P positions, row-major, one for a [N, C] layer.
    let a = act.narrow(0, 0, n as i64).index_select(1, units).to_kind(Kind::Float);
    let a = a.reshape([n as i64, units.size()[0], -1]);
    let positions = a.size()[2] as u64;
    // argmax gives the first maximum in row-major order.
    let argmax = a.argmax(2, true);
    let max = a.gather(2, &argmax, false).squeeze_dim(2);
    let wide = a.to_kind(Kind::Double);
    let sum = wide.sum_dim_intlist(2, false, Kind::Double);
    let sum_sq = (&wide * &wide).sum_dim_intlist(2, false, Kind::Double);
    let positives = a.gt(0.0).sum_dim_intlist(2, false, Kind::Int64);
    let host = |t: Tensor| t.to_device(Device::Cpu).flatten(0, -1);
    let (max, argmax, sum, sum_sq, positives) = (
        Vec::<f32>::try_from(host(max)).map_err(torch)?,
        Vec::<i64>::try_from(host(argmax)).map_err(torch)?,
        Vec::<f64>::try_from(host(sum)).map_err(torch)?,
        Vec::<f64>::try_from(host(sum_sq)).map_err(torch)?,
        Vec::<i64>::try_from(host(positives)).map_err(torch)?,
    );
    let per_image = units.size()[0] as usize;
    Ok((0..n)
        .map(|i| {
            (0..per_image)
                .map(|u| {
                    let j = i * per_image + u;
                    UnitSummary {
                        max: max[j],
                        y: (argmax[j] / width) as u32,
                        x: (argmax[j] % width) as u32,
                        sum: sum[j],
                        sum_sq: sum_sq[j],
                        positives: positives[j] as u64,
                        positions,
                    }
                })
                .collect()
        })
        .collect())
}

/// The side, in input pixels, of the square of input that a unit of `layer` at the centre
/// of the feature map sees: where the gradient of the centre activations reaches. It is
/// measured, so it holds for any architecture; the input is seeded noise, so that no
/// ReLU is dead everywhere.
pub fn receptive_field(model: &dyn Model, layer: &str, input_size: u32) -> Result<u32> {
    let s = input_size as i64;
    let device = model.device();
    let noise = Tensor::from_slice(&seeded_noise(3 * (s * s) as usize)).reshape([1, 3, s, s]).to_device(device);
    let x = noise.set_requires_grad(true);
    let act = model.activation(&x, layer)?;
    let shape = act.size();
    if shape.len() != 4 {
        // A [N, C] layer sees the whole image.
        return Ok(input_size);
    }
    let centre = act.select(2, shape[2] / 2).select(2, shape[3] / 2);
    // abs so that positive and negative paths cannot cancel to an exact zero.
    centre.abs().sum(Kind::Float).f_backward().map_err(torch)?;
    let reach = x.grad().abs().sum_dim_intlist(1, false, Kind::Float).squeeze_dim(0).gt(0.0);
    let rows = Vec::<bool>::try_from(reach.any_dim(1, false).to_device(Device::Cpu)).map_err(torch)?;
    let cols = Vec::<bool>::try_from(reach.any_dim(0, false).to_device(Device::Cpu)).map_err(torch)?;
    let extent = |v: &[bool]| match (v.iter().position(|&b| b), v.iter().rposition(|&b| b)) {
        (Some(a), Some(b)) => (b - a + 1) as u32,
        _ => input_size,
    };
    Ok(extent(&rows).max(extent(&cols)).clamp(1, input_size))
}

/// Uniform values in [0.25, 0.75) from a fixed SplitMix64 stream.
fn seeded_noise(n: usize) -> Vec<f32> {
    let mut rng = loupe_core::seed::SplitMix64::new(0x5eed);
    (0..n).map(|_| 0.25 + 0.5 * (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32).collect()
}

fn torch(e: tch::TchError) -> Error {
    Error::Torch(e.to_string())
}

/// The tar shard an example id names, if any: `<tar key>/<member>` -> `<tar key>`.
fn tar_of(id: &str) -> Option<&str> {
    let lower = id.to_ascii_lowercase();
    lower.find(".tar/").map(|i| &id[..i + 4])
}

/// Fetches the images behind example ids from the dataset's store: image files by key,
/// tar members by reading their shard once.
pub async fn fetch_examples(dataset: &dyn ArtifactStore, ids: &BTreeSet<String>) -> Result<HashMap<String, Vec<u8>>> {
    let mut out = HashMap::new();
    let mut tars: BTreeSet<&str> = BTreeSet::new();
    for id in ids {
        match tar_of(id) {
            Some(tar) => {
                tars.insert(tar);
            }
            None => {
                let bytes = dataset.get(id).await?.ok_or_else(|| Error::Model(format!("dataset image {id} is gone from {}", dataset.location())))?;
                out.insert(id.clone(), bytes);
            }
        }
    }
    for tar in tars {
        let source = ShardSource::Tar { key: tar.to_string() };
        let members = loupe_dataset::read_shard(dataset, &source).await.map_err(dataset_error)?;
        out.extend(members.into_iter().filter(|m| ids.contains(&m.id)).map(|m| (m.id, m.bytes)));
    }
    if let Some(missing) = ids.iter().find(|id| !out.contains_key(*id)) {
        return Err(Error::Model(format!("dataset image {missing} is gone from {}", dataset.location())));
    }
    Ok(out)
}

/// A dataset problem as a task error: store trouble may pass, anything else is the data's.
pub fn dataset_error(e: loupe_dataset::Error) -> Error {
    let retryable = e.retryable();
    match e {
        loupe_dataset::Error::Store(inner) if retryable => Error::Store(inner),
        other => Error::Model(other.to_string()),
    }
}

/// Side in pixels of every example crop and thumbnail JPEG.
pub const EXAMPLE_SIDE: u32 = 128;

/// The layer's `examples.json` entries and its example JPEGs as (key under the layer
/// directory, bytes): each example's receptive-field crop around its maximum and the
/// whole image. `shape` is the layer's per-image shape (`[C, H, W]` or `[C]`).
pub fn example_files(
    units: &[u32],
    stats: &[loupe_stats::UnitStats],
    images: &HashMap<String, Preprocessed>,
    shape: &[i64],
    input_size: u32,
    receptive_field: u32,
) -> (Vec<loupe_core::atlas::UnitExamples>, Vec<(String, Vec<u8>)>) {
    let (h, w) = if shape.len() == 3 { (shape[1] as u32, shape[2] as u32) } else { (1, 1) };
    let mut files = Vec::new();
    let mut entries = Vec::new();
    for (&unit, s) in units.iter().zip(stats) {
        let mut list = |name: &str, examples: &[loupe_stats::Example]| -> Vec<ExampleEntry> {
            examples
                .iter()
                .enumerate()
                .filter_map(|(rank, e)| {
                    // fetch_examples returns every id or fails, so nothing is left out here.
                    let img = images.get(&e.id)?;
                    let (crop, image) = atlas::example_paths(unit, name, rank);
                    let cy = loupe_dataset::feature_to_pixel(e.y, h, input_size);
                    let cx = loupe_dataset::feature_to_pixel(e.x, w, input_size);
                    files.push((crop.clone(), loupe_dataset::crop_jpeg(img, cy, cx, receptive_field, EXAMPLE_SIDE)));
                    files.push((image.clone(), loupe_dataset::thumbnail_jpeg(img, EXAMPLE_SIDE)));
                    Some(ExampleEntry { id: e.id.clone(), value: e.value as f64, y: e.y, x: e.x, crop, image })
                })
                .collect()
        };
        let top = list("top", &s.top);
        let bottom = list("bottom", &s.bottom);
        let finite = |v: f64| (s.images > 0 && v.is_finite()).then_some(v);
        entries.push(loupe_core::atlas::UnitExamples {
            unit,
            mean: finite(s.mean),
            std: finite(s.std),
            max: finite(s.max as f64),
            frac_positive: finite(s.frac_positive),
            top,
            bottom,
            spatial_mean: (s.images > 0).then_some(SpatialMean { mean: s.spatial_mean_mean, std: s.spatial_mean_std, max: s.spatial_mean_max }),
            inputs: Vec::new(),
            outputs: Vec::new(),
        });
    }
    (entries, files)
}

/// A map task: reads the shard, decodes its images (those that cannot be decoded are
/// skipped and counted), runs the model over them and stores one partial per job layer.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_map(
    torch: &TorchThread,
    lease: &Lease,
    model_path: PathBuf,
    dataset: &dyn ArtifactStore,
    out: &Atlas,
    shard: u32,
    source: &ShardSource,
    signals: Arc<TaskSignals>,
) -> Result<()> {
    let spec = dataset_spec(lease)?;
    let raw = loupe_dataset::read_shard(dataset, source).await.map_err(dataset_error)?;
    let input_size = lease.job.settings.input_size;
    let decoded = tokio::task::spawn_blocking(move || {
        raw.into_iter().map(|r| (r.id.clone(), r.preprocess(input_size))).collect::<Vec<_>>()
    })
    .await
    .expect("decoding panicked");
    let mut images = Vec::with_capacity(decoded.len());
    let mut skipped = Vec::new();
    for (id, result) in decoded {
        match result {
            Ok(img) => images.push((id, img)),
            Err(loupe_dataset::Error::Undecodable { reason, .. }) => {
                tracing::warn!(image = id, reason, "skipping an image that cannot be decoded");
                skipped.push(id);
            }
            Err(e) => return Err(dataset_error(e)),
        }
    }
    let (layers, k, wanted) = (lease.job.layers.clone(), spec.examples as usize, spec.connections);
    let (partials, connections) = torch
        .run(lease, model_path, move |loaded| {
            for plan in &layers {
                loaded.layer(&plan.layer.name)?;
            }
            let mut partials: Vec<LayerPartial> = layers.iter().map(|p| LayerPartial::new(p.units.iter().collect(), k)).collect();
            for partial in &mut partials {
                for id in &skipped {
                    partial.add_skipped(id).map_err(stats_error)?;
                }
            }
            let mut connections = connection_partials(&layers, wanted);
            map_images(&loaded.model, &layers, &images, &mut partials, &mut connections, &signals)?;
            Ok((partials, connections))
        })
        .await?;
    let job = &lease.task.job_id;
    for (plan, partial) in lease.job.layers.iter().zip(partials) {
        out.write_partial(job, PartialKind::Stats, &plan.layer.name, shard, partial.to_bytes()).await?;
    }
    // Under the later layer of the pair: its reduce reads them as its inputs, the earlier
    // layer's as its outputs.
    for partial in connections {
        out.write_partial(job, PartialKind::Connections, partial.to_layer(), shard, partial.to_bytes()).await?;
    }
    Ok(())
}

/// A reduce task: merges the layer's partials from every map, and writes the statistics
/// table, the example crops and thumbnails, `skipped.json` and, last, `examples.json`.
pub(crate) async fn run_reduce(
    torch: &TorchThread,
    lease: &Lease,
    model_path: PathBuf,
    dataset: &dyn ArtifactStore,
    out: &Atlas,
    layer: &str,
    signals: &TaskSignals,
) -> Result<()> {
    let spec = dataset_spec(lease)?;
    let plan = lease.job.layers.iter().find(|p| p.layer.name == layer).ok_or_else(|| Error::UnknownLayer(format!("{layer:?} is not a layer of this job")))?;
    let partials = out.partials(&lease.task.job_id, PartialKind::Stats, layer).await?;
    if partials.is_empty() {
        return Err(Error::Model(format!("layer {layer:?}: no map left a partial result in {}", out.location())));
    }
    let mut merged = LayerPartial::new(plan.units.iter().collect(), spec.examples as usize);
    for bytes in &partials {
        signals.step()?;
        merged.merge(LayerPartial::from_bytes(bytes).map_err(stats_error)?).map_err(stats_error)?;
    }
    let stats = merged.finish();
    let parquet = loupe_stats::write_parquet(layer, &stats, &plan.units.iter().collect::<Vec<_>>()).map_err(stats_error)?;
    let connections = if spec.connections && lease.job.layers.len() > 1 { Some(layer_connections(lease, out, layer, signals).await?) } else { None };

    let ids: BTreeSet<String> = stats.iter().flat_map(|s| s.top.iter().chain(&s.bottom).map(|e| e.id.clone())).collect();
    let raw = fetch_examples(dataset, &ids).await?;
    signals.step()?;
    let input_size = lease.job.settings.input_size;
    let name = layer.to_string();
    let receptive_field = torch
        .run(lease, model_path, move |loaded| {
            loaded.layer(&name)?;
            receptive_field(&loaded.model, &name, input_size)
        })
        .await?;
    let (units, shape): (Vec<u32>, _) = (plan.units.iter().collect(), plan.layer.shape.clone());
    let (mut entries, files) = tokio::task::spawn_blocking(move || {
        let images: HashMap<String, Preprocessed> = raw
            .into_iter()
            .filter_map(|(id, bytes)| loupe_dataset::preprocess(&bytes, input_size).ok().map(|img| (id, img)))
            .collect();
        example_files(&units, &stats, &images, &shape, input_size, receptive_field)
    })
    .await
    .expect("encoding examples panicked");
    let connections_parquet = match &connections {
        Some(c) => {
            for entry in &mut entries {
                entry.inputs = strongest(c.inputs_of(entry.unit));
                entry.outputs = strongest(c.outputs_of(entry.unit));
            }
            Some(loupe_stats::write_connections_parquet(layer, &c.rows()).map_err(stats_error)?)
        }
        None => None,
    };

    let skipped: Vec<&str> = merged.skipped().collect();
    let examples = LayerExamples {
        format_version: atlas::FORMAT_VERSION,
        layer: layer.to_string(),
        dataset: DatasetSummary { uri: spec.uri.clone(), images: merged.images_seen(), images_skipped: merged.skipped_count(), examples: spec.examples },
        receptive_field,
        stats: "stats.parquet".into(),
        connections: connections.as_ref().map(|c| atlas::LayerConnections {
            table: "connections.parquet".into(),
            previous: c.inputs.as_ref().map(|(p, _)| p.from_layer().to_string()),
            next: c.outputs.as_ref().map(|(p, _)| p.to_layer().to_string()),
        }),
        units: entries,
    };
    out.write_layer_examples(&examples, files, parquet, connections_parquet, &skipped).await?;
    Ok(())
}

/// A layer's connections: the mean scores from the previous job layer into it, and from
/// it into the next, each a merged partial with its scores computed once.
struct MergedConnections {
    inputs: Option<(ConnectionPartial, Vec<f64>)>,
    outputs: Option<(ConnectionPartial, Vec<f64>)>,
}

impl MergedConnections {
    /// Unit `unit`'s scores from each unit of the previous layer.
    fn inputs_of(&self, unit: u32) -> Vec<Connection> {
        let Some((p, scores)) = &self.inputs else { return Vec::new() };
        let Some(j) = p.to_units().iter().position(|&u| u == unit) else { return Vec::new() };
        let width = p.from_units().len();
        p.from_units().iter().zip(&scores[j * width..(j + 1) * width]).map(|(&u, &score)| Connection { layer: p.from_layer().to_string(), unit: u, score }).collect()
    }

    /// Unit `unit`'s scores into each unit of the next layer.
    fn outputs_of(&self, unit: u32) -> Vec<Connection> {
        let Some((p, scores)) = &self.outputs else { return Vec::new() };
        let Some(i) = p.from_units().iter().position(|&u| u == unit) else { return Vec::new() };
        let width = p.from_units().len();
        p.to_units().iter().enumerate().map(|(j, &u)| Connection { layer: p.to_layer().to_string(), unit: u, score: scores[j * width + i] }).collect()
    }

    /// Every connection of the layer's units, as `connections.parquet` lists them: per
    /// unit, its inputs then its outputs.
    fn rows(&self) -> Vec<ConnectionRow> {
        let units = match (&self.inputs, &self.outputs) {
            (Some((p, _)), _) => p.to_units().to_vec(),
            (None, Some((p, _))) => p.from_units().to_vec(),
            (None, None) => Vec::new(),
        };
        units
            .iter()
            .flat_map(|&unit| {
                self.inputs_of(unit).into_iter().chain(self.outputs_of(unit)).map(move |c| ConnectionRow { unit, other_layer: c.layer, other_unit: c.unit, score: c.score })
            })
            .collect()
    }
}

/// The strongest connections: largest |score| first (ties by unit), non-zero ones only,
/// at most [`CONNECTIONS_LISTED`].
fn strongest(mut all: Vec<Connection>) -> Vec<Connection> {
    all.retain(|c| c.score != 0.0 && !c.score.is_nan());
    all.sort_by(|a, b| b.score.abs().total_cmp(&a.score.abs()).then(a.unit.cmp(&b.unit)));
    all.truncate(CONNECTIONS_LISTED);
    all
}

/// Merges the connection partials into `layer` (from the previous job layer) and out of it
/// (into the next), as the maps left them.
async fn layer_connections(lease: &Lease, out: &Atlas, layer: &str, signals: &TaskSignals) -> Result<MergedConnections> {
    let layers = &lease.job.layers;
    let at = layers.iter().position(|p| p.layer.name == layer).ok_or_else(|| Error::UnknownLayer(layer.to_string()))?;
    // The pair of job layers `to - 1` and `to`.
    let merged = |to: usize| async move {
        let mut merged = connection_partial(&layers[to - 1], &layers[to]);
        let partials = out.partials(&lease.task.job_id, PartialKind::Connections, merged.to_layer()).await?;
        if partials.is_empty() {
            return Err(Error::Model(format!("connections into layer {:?}: no map left a partial result in {}", merged.to_layer(), out.location())));
        }
        for bytes in &partials {
            signals.step()?;
            merged.merge(ConnectionPartial::from_bytes(bytes).map_err(stats_error)?).map_err(stats_error)?;
        }
        let scores = merged.scores();
        Ok::<_, Error>((merged, scores))
    };
    let inputs = if at > 0 { Some(merged(at).await?) } else { None };
    let outputs = if at + 1 < layers.len() { Some(merged(at + 1).await?) } else { None };
    Ok(MergedConnections { inputs, outputs })
}

pub(crate) fn dataset_spec(lease: &Lease) -> Result<&loupe_core::spec::DatasetSpec> {
    lease.job.dataset.as_ref().ok_or_else(|| Error::Model(format!("task {} is a dataset task of a job without a dataset", lease.task.id())))
}

fn stats_error(e: loupe_stats::Error) -> Error {
    Error::Model(e.to_string())
}

