//! [`Atlas`]: reading and writing the format over an [`ArtifactStore`]. The coordinator
//! asks it what is complete and has it write the manifest and the layer indices; the
//! workers hand it encoded images and dataset results.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::*;
use crate::job::JobId;
use crate::spec::{JobSpec, LayerPlan, RenderSettings};
use crate::store::ArtifactStore;

/// An atlas in a store.
#[derive(Clone)]
pub struct Atlas {
    store: Arc<dyn ArtifactStore>,
}

/// What a worker rendered for one [`ImageId`], encoded: the PNGs (diversity's N, the
/// others one), their objectives, the snapshots' PNGs by step, and the curve: each
/// image's objective by step ([`CurvePoint`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RenderedImage {
    pub pngs: Vec<Vec<u8>>,
    pub objectives: Vec<f64>,
    pub snapshots: Vec<(u32, Vec<Vec<u8>>)>,
    pub curve: Vec<(u32, Vec<f64>)>,
    /// Diversity: how different its images are (the record's `diversity`).
    pub diversity: Option<f64>,
    pub dead: bool,
}

impl Atlas {
    pub fn new(store: Arc<dyn ArtifactStore>) -> Atlas {
        Atlas { store }
    }

    /// The atlas at an output URI (a directory or `s3://bucket/prefix`).
    pub async fn open(uri: &str) -> Result<Atlas> {
        Ok(Atlas::new(crate::store::open(uri).await?))
    }

    pub fn store(&self) -> &dyn ArtifactStore {
        self.store.as_ref()
    }

    /// Where the atlas is, for messages.
    pub fn location(&self) -> String {
        self.store.location()
    }

    pub(super) async fn read_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.store.get(key).await? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| Error::Json { key: format!("{}/{key}", self.store.location()), source }),
        }
    }

    /// `atlas.json`, as the viewer reads it.
    pub async fn manifest(&self) -> Result<Option<AtlasManifest>> {
        self.read_json(ATLAS_KEY).await
    }

    /// Refuses a job the atlas cannot take: an atlas holds one model at one set of render
    /// settings, so a job that differs in either is a [`Error::Conflict`] rather than
    /// mixed in.
    pub async fn check_job(&self, spec: &JobSpec) -> Result<()> {
        match self.merged_manifest().await? {
            Some(existing) => self.check_same_look(&existing, spec),
            None => Ok(()),
        }
    }

    /// Adds the job's layers and techniques to the atlas (see [`Atlas::check_job`]): writes
    /// its own job manifest, created at `now` (RFC 3339), then `atlas.json` and the viewer.
    pub async fn add_job(&self, spec: &JobSpec, now: String) -> Result<()> {
        self.check_job(spec).await?;
        self.keep_old_manifest().await?;
        self.put_job_manifest(&job_manifest(spec, now)?).await?;
        self.publish_manifest().await
    }

    /// Writes a job manifest once, named by its content (its creation time and loupe
    /// version aside): different jobs never write one key, so concurrent jobs need no
    /// conditional write, which not every S3-compatible store has; and a job submitted
    /// again adds no file and keeps its first creation time.
    async fn put_job_manifest(&self, manifest: &AtlasManifest) -> Result<()> {
        let identity = AtlasManifest { created: String::new(), loupe_version: String::new(), ..manifest.clone() };
        let key = format!("{JOB_MANIFESTS}{}.json", &crate::sha256_bytes(&crate::to_json(&identity))[..32]);
        if self.store.size(&key).await?.is_some() {
            return Ok(());
        }
        self.store.put(&key, crate::to_json(manifest)).await
    }

    /// An atlas written before job manifests has only `atlas.json`: it becomes the first
    /// job manifest, so the merge keeps what it lists.
    async fn keep_old_manifest(&self) -> Result<()> {
        if !self.store.list(JOB_MANIFESTS).await?.is_empty() {
            return Ok(());
        }
        match self.manifest().await? {
            Some(old) => self.store.put(&format!("{JOB_MANIFESTS}from-atlas.json"), crate::to_json(&old)).await,
            None => Ok(()),
        }
    }

    /// The job manifests merged, oldest first: the first names the model, settings and
    /// creation time; each adds its layers and techniques; the newest dataset wins. One of
    /// another model or look (two such jobs submitted at once) is left out.
    async fn merged_manifest(&self) -> Result<Option<AtlasManifest>> {
        let mut parts = Vec::new();
        for key in self.store.list(JOB_MANIFESTS).await? {
            if let Some(part) = self.read_json::<AtlasManifest>(&key).await? {
                parts.push((part.created.clone(), key, part));
            }
        }
        parts.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        let mut parts = parts.into_iter().map(|(_, _, part)| part);
        let Some(mut merged) = parts.next() else { return Ok(None) };
        let (model, first_look) = (merged.model.sha256.clone(), look(&merged.settings));
        for part in parts.filter(|p| p.model.sha256 == model && look(&p.settings) == first_look) {
            add_layers_and_techniques(&mut merged, part.layers, &part.techniques);
            merged.loupe_version = part.loupe_version;
            merged.dataset = part.dataset.or(merged.dataset.take());
        }
        Ok(Some(merged))
    }

    /// Writes the merged job manifests as `atlas.json`, and the viewer beside it. A job
    /// manifest written meanwhile may be missing from what was written, so it merges
    /// again until nothing changed: whichever writer writes `atlas.json` last then has
    /// every job manifest written before it in.
    async fn publish_manifest(&self) -> Result<()> {
        if self.publish_merged(ATLAS_KEY, || self.merged_manifest()).await? {
            crate::viewer::write(self.store.as_ref()).await?;
        }
        Ok(())
    }

    /// Writes at `key` the document `merge` builds from its parts (job manifests, label
    /// files), then merges again and writes again until nothing changed, so whichever
    /// writer writes last has in it every part written before. Says whether it wrote:
    /// with no parts there is nothing to write.
    pub(super) async fn publish_merged<T, F, Fut>(&self, key: &str, merge: F) -> Result<bool>
    where
        T: Serialize + PartialEq,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>>>,
    {
        const MAX_ROUNDS: usize = 100;
        let mut merged = merge().await?;
        for _ in 0..MAX_ROUNDS {
            let Some(document) = &merged else { return Ok(false) };
            self.store.put(key, crate::to_json(document)).await?;
            let again = merge().await?;
            if again == merged {
                return Ok(true);
            }
            merged = again;
        }
        Err(Error::Conflict(format!("{}: {key} kept changing while {MAX_ROUNDS} writes of it were made; try again", self.location())))
    }

    fn check_same_look(&self, existing: &AtlasManifest, spec: &JobSpec) -> Result<()> {
        let place = self.location();
        if existing.model.sha256 != spec.model.sha256 {
            return Err(Error::Conflict(format!(
                "{place} already holds an atlas of another model ({} with sha256 {}); choose another output",
                existing.model.name, existing.model.sha256
            )));
        }
        if look(&existing.settings) != look(&spec.settings) {
            return Err(Error::Conflict(format!(
                "{place} already holds an atlas rendered with other settings ({}); choose another output",
                differences(&existing.settings, &spec.settings)
            )));
        }
        for plan in &spec.layers {
            let Some(entry) = existing.layers.iter().find(|l| l.name == plan.layer.name) else { continue };
            let (held, asked) = (entry.settings(&existing.settings), spec.settings_for(plan));
            if look(held) != look(&asked) {
                return Err(Error::Conflict(format!(
                    "{place} already holds layer {} rendered with other settings ({}); give it the same [[layer]] settings or choose another output",
                    plan.layer.name,
                    differences(held, &asked)
                )));
            }
        }
        Ok(())
    }

    /// The images of the job that the atlas already holds whole: a record for this model
    /// and the layer's settings, with its image beside it, or a failed record (its
    /// optimisation diverged, and would again).
    pub async fn complete_images(&self, spec: &JobSpec) -> Result<HashSet<ImageId>> {
        let mut done = HashSet::new();
        for plan in &spec.layers {
            let settings = spec.settings_for(plan);
            let keys: HashSet<String> = self.store.list(&format!("layers/{}/", layer_segment(&plan.layer.name)?)).await?.into_iter().collect();
            for &technique in spec.techniques_for(plan) {
                for target in spec.targets(plan, technique) {
                    let id = ImageId::new(&plan.layer.name, technique, target)?;
                    if !keys.contains(&id.record_key()) {
                        continue;
                    }
                    let stamp = self.read_json::<Stamp>(&id.record_key()).await.ok().flatten();
                    let current = stamp.is_some_and(|s| s.model_sha256 == spec.model.sha256 && s.settings == settings && (s.failed.is_some() || keys.contains(&id.image_key())));
                    if current {
                        done.insert(id);
                    }
                }
            }
        }
        Ok(done)
    }

    /// Writes an image's PNGs and snapshots, then its record: the record is written last,
    /// so its presence means the images are whole.
    pub async fn write_image(&self, id: &ImageId, image: &RenderedImage, model_sha256: &str, settings: &RenderSettings) -> Result<()> {
        let mut names = Vec::with_capacity(image.pngs.len());
        for (i, png) in image.pngs.iter().enumerate() {
            names.push(self.put_image(id, i, None, png).await?);
        }
        let mut snapshots = Vec::with_capacity(image.snapshots.len());
        for (step, pngs) in &image.snapshots {
            let mut images = Vec::with_capacity(pngs.len());
            for (i, png) in pngs.iter().enumerate() {
                images.push(self.put_image(id, i, Some(*step), png).await?);
            }
            snapshots.push(SnapshotEntry { step: *step, images });
        }
        let record = match id.target() {
            Target::Unit(unit) => crate::to_json(&unit_record(id, *unit, image, names, snapshots, model_sha256, settings)),
            Target::Item(item) => crate::to_json(&ItemRecord {
                format_version: FORMAT_VERSION,
                layer: id.layer().to_string(),
                technique: id.technique(),
                item: item.clone(),
                image: names.swap_remove(0),
                objective: image.objectives[0],
                snapshots,
                curve: mean_curve(&image.curve),
                model_sha256: model_sha256.to_string(),
                settings: settings.clone(),
            }),
        };
        self.store.put(&id.record_key(), record).await
    }

    /// Writes the record of an image whose optimisation diverged, with the reason; no
    /// image. A retry or a later job with other settings that renders it overwrites it.
    pub async fn write_failed(&self, id: &ImageId, reason: &str, model_sha256: &str, settings: &RenderSettings) -> Result<()> {
        let record = FailedRecord {
            format_version: FORMAT_VERSION,
            layer: id.layer().to_string(),
            technique: id.technique(),
            target: id.target().into(),
            failed: reason.to_string(),
            model_sha256: model_sha256.to_string(),
            settings: settings.clone(),
        };
        self.store.put(&id.record_key(), crate::to_json(&record)).await
    }

    async fn put_image(&self, id: &ImageId, i: usize, step: Option<u32>, png: &[u8]) -> Result<String> {
        let name = id.image_name(i as u32, step);
        self.store.put(&id.file_key(&name), png.to_vec()).await?;
        Ok(name)
    }

    /// Writes `layer.json` for each layer of the job, listing every complete record in the
    /// layer, including those of earlier jobs on the same atlas, with the units' dataset
    /// statistics and examples where the layer's reduce left an `examples.json`. When one
    /// did, `atlas.json` says which dataset they cover. Returns how many of the job's
    /// images failed (their optimisation diverged).
    pub async fn write_layer_indices(&self, spec: &JobSpec) -> Result<u64> {
        let mut dataset = None;
        let mut failed = 0;
        for plan in &spec.layers {
            let segment = layer_segment(&plan.layer.name)?;
            let mut units = self.unit_entries(&segment).await?;
            let items = self.item_entries(&segment).await?;
            failed += failed_in_job(spec, plan, &units, &items);
            let examples = self.read_json::<LayerExamples>(&examples_key(&segment)).await?;
            let layer_dataset = examples.map(|examples| {
                dataset.get_or_insert(examples.dataset.clone());
                add_examples(&mut units, examples)
            });
            // After the examples: some indicators read the unit's dataset entry.
            for unit in units.values_mut() {
                unit.trust = Trust::of(unit);
            }
            let index = LayerIndex {
                format_version: FORMAT_VERSION,
                name: plan.layer.name.clone(),
                shape: plan.layer.shape.clone(),
                units: units.into_values().collect(),
                items,
                dataset: layer_dataset,
            };
            self.store.put(&layer_key(&segment), crate::to_json(&index)).await?;
        }
        if let Some(summary) = dataset {
            let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
            self.keep_old_manifest().await?;
            self.put_job_manifest(&AtlasManifest { dataset: Some(summary), ..job_manifest(spec, now)? }).await?;
            self.publish_manifest().await?;
        }
        Ok(failed)
    }

    /// The per-unit records of a layer, for `layer.json`.
    async fn unit_entries(&self, segment: &str) -> Result<BTreeMap<u32, UnitEntry>> {
        let mut units: BTreeMap<u32, UnitEntry> = BTreeMap::new();
        for key in self.store.list(&format!("layers/{segment}/units/")).await? {
            let Some((_, unit, technique)) = parse_record_key(&key) else { continue };
            let Some(record) = self.read_json::<Stored<UnitRecord>>(&key).await? else { continue };
            let path = |name: &String| format!("units/{unit}/{name}");
            let entry = match record {
                Stored::Rendered(record) => TechniqueEntry::Rendered(ImageEntry {
                    image: path(&record.image),
                    objective: record.objective,
                    images: record.images.iter().map(path).collect(),
                    snapshots: relative_snapshots(&record.snapshots, path),
                    dead: record.dead,
                    curve: record.curve,
                    diversity: record.diversity,
                }),
                Stored::Failed(record) => TechniqueEntry::Failed { failed: record.failed },
            };
            unit_entry(&mut units, unit).techniques.insert(technique, entry);
        }
        Ok(units)
    }

    /// The item records of a layer's per-layer techniques, for `layer.json`.
    async fn item_entries(&self, segment: &str) -> Result<BTreeMap<Technique, Vec<ItemListing>>> {
        let mut items: BTreeMap<Technique, Vec<ItemListing>> = BTreeMap::new();
        for technique in Technique::ALL.into_iter().filter(|t| !t.per_unit()) {
            for key in self.store.list(&format!("layers/{segment}/{technique}/")).await? {
                if !key.ends_with(".json") {
                    continue;
                }
                let Some(record) = self.read_json::<Stored<ItemRecord>>(&key).await? else { continue };
                let path = |name: &String| format!("{technique}/{name}");
                let listing = match record {
                    Stored::Rendered(r) => ItemListing::Rendered(ItemEntry {
                        item: r.item.clone(),
                        image: path(&r.image),
                        objective: r.objective,
                        snapshots: relative_snapshots(&r.snapshots, path),
                        curve: r.curve,
                    }),
                    Stored::Failed(r) => match r.target {
                        RecordTarget::Item(item) => ItemListing::Failed { item, failed: r.failed },
                        RecordTarget::Unit(_) => continue,
                    },
                };
                items.entry(technique).or_default().push(listing);
            }
        }
        for list in items.values_mut() {
            list.sort_by(|a, b| a.item().cmp(b.item()));
        }
        Ok(items)
    }

    /// Whether the atlas holds the statistics of every job layer over the job's dataset:
    /// an `examples.json` (a reduce's last write) for the same dataset and K, covering the
    /// layer's units.
    pub async fn has_dataset_statistics(&self, spec: &JobSpec) -> Result<bool> {
        let Some(dataset) = &spec.dataset else { return Ok(false) };
        for plan in &spec.layers {
            let key = examples_key(&layer_segment(&plan.layer.name)?);
            let covered = match self.read_json::<LayerExamples>(&key).await {
                Ok(Some(e)) => {
                    let units: HashSet<u32> = e.units.iter().map(|u| u.unit).collect();
                    let connections = dataset.connections.then(|| spec.neighbours(&plan.layer.name));
                    let made = e.connections.as_ref().map(|c| (c.previous.clone(), c.next.clone()));
                    // A job without connections is content with any; one with them needs
                    // those to the same neighbouring layers (a lone layer has none to make).
                    let connected = match connections {
                        None | Some((None, None)) => true,
                        wanted => made == wanted,
                    };
                    e.dataset.uri == dataset.uri && e.dataset.examples == dataset.examples && plan.units.iter().all(|u| units.contains(&u)) && connected
                }
                _ => false,
            };
            if !covered {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Leaves a map's partial result of one kind and layer for the reduces.
    pub async fn write_partial(&self, job_id: &JobId, kind: PartialKind, layer: &str, shard: u32, bytes: Vec<u8>) -> Result<()> {
        self.store.put(&partial_key(job_id.as_str(), kind, &layer_segment(layer)?, shard), bytes).await
    }

    /// Every map's partial of one kind and layer, in shard order: the job's own maps'
    /// only, since job ids are never reused and the job's partials are removed when it is
    /// indexed.
    pub async fn partials(&self, job_id: &JobId, kind: PartialKind, layer: &str) -> Result<Vec<Vec<u8>>> {
        let mut keys = self.store.list(&partial_prefix(job_id.as_str(), kind, &layer_segment(layer)?)).await?;
        keys.sort();
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let bytes = self.store.get(&key).await?;
            out.push(bytes.ok_or_else(|| Error::Remote { key: format!("{}/{key}", self.location()), message: "the partial result vanished".into() })?);
        }
        Ok(out)
    }

    /// Removes every partial the job's maps left, once its reduces have written the
    /// statistics: they are scratch space, and the next job never reads them.
    pub async fn delete_partials(&self, job_id: &JobId) -> Result<()> {
        for key in self.store.list(&job_partials_prefix(job_id.as_str())).await? {
            self.store.delete(&key).await?;
        }
        Ok(())
    }

    /// Writes a layer's dataset results: the example files (paths relative to the layer
    /// directory), `stats.parquet`, `skipped.json` and, last, `examples.json`, whose
    /// presence means the others are whole.
    pub async fn write_layer_examples(&self, examples: &LayerExamples, files: Vec<(String, Vec<u8>)>, parquet: Vec<u8>, connections: Option<Vec<u8>>, skipped: &[&str]) -> Result<()> {
        let segment = layer_segment(&examples.layer)?;
        let layer_dir = format!("layers/{segment}/");
        // Sixteen puts in flight: S3 latency, not bandwidth, bounds many small files.
        let mut files = files.into_iter().peekable();
        while files.peek().is_some() {
            let puts = files.by_ref().take(16).map(|(path, bytes)| {
                let key = format!("{layer_dir}{path}");
                async move { self.store.put(&key, bytes).await }
            });
            futures_util::future::try_join_all(puts).await?;
        }
        self.store.put(&stats_key(&segment), parquet).await?;
        if let Some(connections) = connections {
            self.store.put(&connections_key(&segment), connections).await?;
        }
        self.store.put(&format!("{layer_dir}skipped.json"), crate::to_json(&skipped)).await?;
        self.store.put(&examples_key(&segment), crate::to_json(examples)).await
    }
}

/// A record as stored: an image's, or a failed one's.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stored<R> {
    Rendered(R),
    Failed(Box<FailedRecord>),
}

/// What says whether any record is current: its model and settings, and whether it failed.
#[derive(Deserialize)]
struct Stamp {
    model_sha256: String,
    settings: RenderSettings,
    #[serde(default)]
    failed: Option<String>,
}

/// The failed images among a layer's entries that this job renders: its techniques for
/// the layer, its units or items.
fn failed_in_job(spec: &JobSpec, plan: &crate::spec::LayerPlan, units: &BTreeMap<u32, UnitEntry>, items: &BTreeMap<Technique, Vec<ItemListing>>) -> u64 {
    let techniques = spec.techniques_for(plan);
    let unit_failures = units
        .values()
        .filter(|u| plan.units.contains(u.unit))
        .flat_map(|u| u.techniques.iter())
        .filter(|(t, e)| techniques.contains(t) && matches!(e, TechniqueEntry::Failed { .. }))
        .count();
    let item_failures: usize = items
        .iter()
        .filter(|(t, _)| techniques.contains(t))
        .map(|(t, list)| {
            let names = spec.layer_items(plan, *t);
            list.iter().filter(|l| matches!(l, ItemListing::Failed { item, .. } if names.contains(item))).count()
        })
        .sum();
    (unit_failures + item_failures) as u64
}

fn unit_record(id: &ImageId, unit: u32, image: &RenderedImage, names: Vec<String>, snapshots: Vec<SnapshotEntry>, model_sha256: &str, settings: &RenderSettings) -> UnitRecord {
    let several = names.len() > 1;
    UnitRecord {
        format_version: FORMAT_VERSION,
        layer: id.layer().to_string(),
        unit,
        technique: id.technique(),
        image: names[0].clone(),
        objective: image.objectives.iter().sum::<f64>() / image.objectives.len().max(1) as f64,
        images: if several { names } else { Vec::new() },
        objectives: if several { image.objectives.clone() } else { Vec::new() },
        snapshots,
        dead: image.dead,
        curve: mean_curve(&image.curve),
        diversity: image.diversity,
        model_sha256: model_sha256.to_string(),
        settings: settings.clone(),
    }
}

fn unit_entry(units: &mut BTreeMap<u32, UnitEntry>, unit: u32) -> &mut UnitEntry {
    units.entry(unit).or_insert_with(|| UnitEntry { unit, techniques: BTreeMap::new(), dataset: None, trust: None })
}

/// A record's curve from each image's objective by step: their mean at each step.
fn mean_curve(curve: &[(u32, Vec<f64>)]) -> Vec<CurvePoint> {
    curve.iter().map(|(step, objectives)| CurvePoint { step: *step, objective: objectives.iter().sum::<f64>() / objectives.len().max(1) as f64 }).collect()
}

fn relative_snapshots(snapshots: &[SnapshotEntry], path: impl Fn(&String) -> String) -> Vec<SnapshotEntry> {
    snapshots.iter().map(|s| SnapshotEntry { step: s.step, images: s.images.iter().map(&path).collect() }).collect()
}

/// Folds a layer's `examples.json` into its units and says what `layer.json` lists of it.
fn add_examples(units: &mut BTreeMap<u32, UnitEntry>, examples: LayerExamples) -> LayerDataset {
    for entry in examples.units {
        let unit = entry.unit;
        unit_entry(units, unit).dataset = Some(entry);
    }
    LayerDataset {
        stats: examples.stats,
        examples: "examples.json".into(),
        receptive_field: examples.receptive_field,
        images: examples.dataset.images,
        images_skipped: examples.dataset.images_skipped,
        connections: examples.connections.map(|c| c.table),
    }
}

/// Every technique of the job: the job's and the layers' own, in first-seen order.
fn job_techniques(spec: &JobSpec) -> Vec<Technique> {
    let mut all = spec.techniques.clone();
    for plan in &spec.layers {
        for &t in spec.techniques_for(plan) {
            if !all.contains(&t) {
                all.push(t);
            }
        }
    }
    all
}

/// A job's own manifest: its model, settings, layers and techniques, created at `now`.
fn job_manifest(spec: &JobSpec, now: String) -> Result<AtlasManifest> {
    Ok(AtlasManifest {
        format_version: FORMAT_VERSION,
        loupe_version: crate::LOUPE_VERSION.to_string(),
        model: ModelSummary { name: spec.model.name.clone(), sha256: spec.model.sha256.clone() },
        settings: spec.settings.clone(),
        layers: spec.layers.iter().map(|plan| layer_entry(spec, plan)).collect::<Result<Vec<_>>>()?,
        techniques: job_techniques(spec),
        created: now,
        dataset: None,
    })
}

/// A job layer's entry in its job manifest, with its own settings when they are not the
/// job's.
fn layer_entry(spec: &JobSpec, plan: &LayerPlan) -> Result<LayerEntry> {
    Ok(LayerEntry { settings: plan.has_own_settings().then(|| spec.settings_for(plan)), ..LayerEntry::new(&plan.layer)? })
}

/// Adds layers (replacing an entry of the same name) and techniques to a manifest.
fn add_layers_and_techniques(manifest: &mut AtlasManifest, layers: Vec<LayerEntry>, techniques: &[Technique]) {
    for entry in layers {
        match manifest.layers.iter_mut().find(|l| l.name == entry.name) {
            Some(l) => *l = entry,
            None => manifest.layers.push(entry),
        }
    }
    for t in techniques {
        if !manifest.techniques.contains(t) {
            manifest.techniques.push(*t);
        }
    }
}

/// The settings that decide how every image of an atlas looks. A technique's own options
/// (diversity images, caricature inputs, directions) only decide its images, whose
/// records carry them, so jobs that add techniques to an atlas may differ in them.
fn look(s: &RenderSettings) -> RenderSettings {
    RenderSettings { options: Default::default(), ..s.clone() }
}

/// The settings in which `held` and `asked` differ, as "steps 512, not 100; param".
fn differences(held: &RenderSettings, asked: &RenderSettings) -> String {
    let object = |s: &RenderSettings| match serde_json::to_value(look(s)) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => unreachable!("settings serialise to an object"),
    };
    let (held, asked) = (object(held), object(asked));
    let mut out = Vec::new();
    for (key, value) in &held {
        match (value, asked.get(key)) {
            (a, Some(b)) if a == b => {}
            (a @ (serde_json::Value::Number(_) | serde_json::Value::String(_)), Some(b)) => out.push(format!("{key} {a}, not {}", b)),
            _ => out.push(key.clone()),
        }
    }
    out.extend(asked.keys().filter(|k| !held.contains_key(*k)).cloned());
    out.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{LayerInfo, LayerPlan, ModelRef, NamedImage};
    use crate::store::LocalStore;
    use crate::units::UnitRanges;

    fn spec(out: &str) -> JobSpec {
        let mut settings = RenderSettings { steps: 4, size: 16, input_size: 16, ..Default::default() };
        settings.options.caricature_inputs = vec![NamedImage { name: "dog".into(), uri: "dog.png".into() }];
        JobSpec {
            model: ModelRef { uri: "m.pt".into(), name: "m".into(), sha256: "abc".into() },
            layers: vec![LayerPlan::new(LayerInfo { name: "conv".into(), shape: vec![4, 8, 8] }, UnitRanges::range(0, 3))],
            techniques: vec![Technique::Channel, Technique::Caricature],
            settings,
            batch: 2,
            out: out.into(),
            dataset: None,
        }
    }

    fn image(objective: f64) -> RenderedImage {
        RenderedImage { pngs: vec![b"png".to_vec()], objectives: vec![objective], snapshots: Vec::new(), curve: Vec::new(), diversity: None, dead: false }
    }

    /// A failed record has the reason and no image, counts as complete for the same model
    /// and settings, and is listed in layer.json with its reason; the job's failures are
    /// counted, those of units outside the job are not.
    #[tokio::test]
    async fn failed_images_are_recorded_complete_and_listed() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(&dir.path().to_string_lossy());
        let atlas = Atlas::new(Arc::new(LocalStore::new(dir.path())));
        let s = spec.settings_for(&spec.layers[0]);
        let id = |t, target: Target| ImageId::new("conv", t, target).unwrap();
        atlas.write_image(&id(Technique::Channel, 0.into()), &image(1.5), "abc", &s).await.unwrap();
        atlas.write_failed(&id(Technique::Channel, 1.into()), "objective became NaN at step 3", "abc", &s).await.unwrap();
        atlas.write_failed(&id(Technique::Channel, 7.into()), "objective became inf at step 1", "abc", &s).await.unwrap();
        atlas.write_failed(&id(Technique::Caricature, "dog".into()), "the image is not finite", "abc", &s).await.unwrap();

        let record: serde_json::Value = serde_json::from_slice(&atlas.store().get("layers/conv/units/1/channel.json").await.unwrap().unwrap()).unwrap();
        assert_eq!((record["unit"].as_u64(), record["failed"].as_str()), (Some(1), Some("objective became NaN at step 3")));
        assert!(record.get("image").is_none() && record.get("objective").is_none());
        assert!(!dir.path().join("layers/conv/units/1/channel.png").exists());

        let done = atlas.complete_images(&spec).await.unwrap();
        let want: HashSet<ImageId> = [id(Technique::Channel, 0.into()), id(Technique::Channel, 1.into()), id(Technique::Caricature, "dog".into())].into();
        assert_eq!(done, want, "unit 2 is not rendered; the failures are complete");
        let other = JobSpec { settings: RenderSettings { learning_rate: 0.01, ..spec.settings.clone() }, ..spec.clone() };
        assert!(atlas.complete_images(&other).await.unwrap().is_empty(), "a failure under other settings is rendered again");

        assert_eq!(atlas.write_layer_indices(&spec).await.unwrap(), 2, "unit 7 is not the job's");
        let index: LayerIndex = serde_json::from_slice(&atlas.store().get("layers/conv/layer.json").await.unwrap().unwrap()).unwrap();
        let channel = |u: usize| index.units[u].techniques[&Technique::Channel].clone();
        assert!(matches!(channel(0), TechniqueEntry::Rendered(ImageEntry { objective, .. }) if objective == 1.5));
        assert_eq!(channel(1), TechniqueEntry::Failed { failed: "objective became NaN at step 3".into() });
        assert_eq!(index.items[&Technique::Caricature], vec![ItemListing::Failed { item: "dog".into(), failed: "the image is not finite".into() }]);
        let json: serde_json::Value = serde_json::from_slice(&atlas.store().get("layers/conv/layer.json").await.unwrap().unwrap()).unwrap();
        assert_eq!(json["units"][1]["techniques"]["channel"], serde_json::json!({ "failed": "objective became NaN at step 3" }));
    }

    /// A unit's dataset entry as `examples.json` has it: its maximum over every position,
    /// and its spatial mean's (mean, std, max) when given.
    fn dataset_entry(unit: u32, max: Option<f64>, spatial_mean: Option<(f64, f64, f64)>) -> serde_json::Value {
        let mut entry = serde_json::json!({ "unit": unit, "mean": 0.1, "std": 0.2, "max": max, "frac_positive": 0.5, "top": [], "bottom": [] });
        if let Some((mean, std, max)) = spatial_mean {
            entry["spatial_mean"] = serde_json::json!({ "mean": mean, "std": std, "max": max });
        }
        entry
    }

    fn curve(points: &[(u32, f64)]) -> Vec<CurvePoint> {
        points.iter().map(|&(step, objective)| CurvePoint { step, objective }).collect()
    }

    fn rendered(objective: f64, points: &[(u32, f64)], dead: bool, diversity: Option<f64>) -> TechniqueEntry {
        TechniqueEntry::Rendered(ImageEntry { image: "i.png".into(), objective, images: Vec::new(), snapshots: Vec::new(), dead, curve: curve(points), diversity })
    }

    fn unit(techniques: Vec<(Technique, TechniqueEntry)>, dataset: Option<serde_json::Value>) -> UnitEntry {
        UnitEntry { unit: 0, techniques: techniques.into_iter().collect(), dataset: dataset.map(|d| serde_json::from_value(d).unwrap()), trust: None }
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-12)
    }

    /// Each indicator from what it reads: above_dataset from the channel objective and the
    /// spatial mean's max and std, convergence from the channel curve's last point and its
    /// point at or just below half the steps, diversity from the diversity entry, the dead
    /// marks from the dataset's max and the channel record.
    #[test]
    fn trust_reads_the_channel_render_the_diversity_render_and_the_dataset() {
        let channel = rendered(3.0, &[(1, 0.5), (2, 1.0), (4, 2.0), (8, 2.4), (16, 3.0)], false, None);
        let diversity = rendered(2.0, &[(16, 2.0)], false, Some(0.25));
        let full = unit(vec![(Technique::Channel, channel.clone()), (Technique::Diversity, diversity)], Some(dataset_entry(0, Some(0.8), Some((0.2, 0.1, 0.6)))));
        let t = Trust::of(&full).unwrap();
        assert!(close(t.above_dataset, (3.0 - 0.6) / 0.1), "{t:?}");
        assert!(close(t.convergence, (3.0 - 2.4) / 3.0), "{t:?}");
        assert_eq!((t.diversity, t.dead_on_dataset, t.dead_on_start), (Some(0.25), Some(false), Some(false)));

        // Half of 24 steps is 12: a threshold there is the middle point; without it, 8.
        let points = [(1, 0.1), (2, 0.2), (4, 0.4), (8, 0.8), (12, 1.2), (16, 1.6), (24, -2.0)];
        let c = |p: &[(u32, f64)]| Trust::of(&unit(vec![(Technique::Channel, rendered(-2.0, p, false, None))], None)).unwrap().convergence;
        assert!(close(c(&points), (-2.0 - 1.2) / 2.0));
        let without: Vec<_> = points.iter().copied().filter(|p| p.0 != 12).collect();
        assert!(close(c(&without), (-2.0 - 0.8) / 2.0));
        assert!(close(c(&[(1, 1.0), (2, 2.0), (4, 3.0), (5, 4.0)]), (4.0 - 2.0) / 4.0), "half of 5 steps: step 2");
        assert_eq!(c(&[(1, 1.0)]), None, "one step has no middle");
        assert_eq!(c(&[]), None);
        assert_eq!(Trust::of(&unit(vec![(Technique::Channel, rendered(0.0, &[(1, 0.5), (2, 0.0)], false, None))], None)).unwrap().convergence, None, "the last objective is 0");

        // Without a dataset, only the renders' indicators.
        let t = Trust::of(&unit(vec![(Technique::Channel, channel.clone())], None)).unwrap();
        assert_eq!((t.above_dataset, t.diversity, t.dead_on_dataset, t.dead_on_start), (None, None, None, Some(false)));
        assert!(t.convergence.is_some());
        // A spatial mean with std 0 gives no above_dataset; a max of 0 or below is dead.
        for (max, dead) in [(0.0, true), (-0.5, true), (1e-9, false)] {
            let t = Trust::of(&unit(vec![(Technique::Channel, channel.clone())], Some(dataset_entry(0, Some(max), Some((0.0, 0.0, 0.0)))))).unwrap();
            assert_eq!((t.above_dataset, t.dead_on_dataset), (None, Some(dead)), "max {max}");
        }
        // Without a channel render (or with a failed one), only the dataset's and diversity's.
        let failed = TechniqueEntry::Failed { failed: "objective became NaN at step 3".into() };
        let t = Trust::of(&unit(vec![(Technique::Channel, failed), (Technique::Diversity, rendered(1.0, &[], false, Some(0.5)))], Some(dataset_entry(0, Some(0.8), Some((0.2, 0.1, 0.6)))))).unwrap();
        assert_eq!(t, Trust { diversity: Some(0.5), dead_on_dataset: Some(false), ..Default::default() });
        // A dead channel render; the statistics absent (no image counted).
        let t = Trust::of(&unit(vec![(Technique::Channel, rendered(0.0, &[(1, 0.0)], true, None))], Some(dataset_entry(0, None, None)))).unwrap();
        assert_eq!(t, Trust { dead_on_start: Some(true), ..Default::default() });
        // Nothing known: no trust at all.
        assert_eq!(Trust::of(&unit(vec![(Technique::Negative, rendered(1.0, &[(1, 1.0)], false, None))], Some(dataset_entry(0, None, None)))), None);
    }

    /// The curves and the diversity go from what the worker rendered to the records and
    /// layer.json (a diversity record's curve is the mean of its images'), and
    /// layer.json's units get their trust from their entries and examples.json.
    #[tokio::test]
    async fn curves_diversity_and_trust_reach_layer_json() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(&dir.path().to_string_lossy());
        spec.techniques.push(Technique::Diversity);
        let atlas = Atlas::new(Arc::new(LocalStore::new(dir.path())));
        let s = spec.settings_for(&spec.layers[0]);
        let id = |t, target: Target| ImageId::new("conv", t, target).unwrap();
        let channel = |objective: f64| RenderedImage { curve: vec![(1, vec![0.5]), (2, vec![1.0]), (4, vec![objective])], ..image(objective) };
        atlas.write_image(&id(Technique::Channel, 0.into()), &channel(2.0), "abc", &s).await.unwrap();
        atlas.write_image(&id(Technique::Channel, 1.into()), &channel(0.5), "abc", &s).await.unwrap();
        let diversity = RenderedImage {
            pngs: vec![b"png".to_vec(); 2],
            objectives: vec![1.0, 2.0],
            curve: vec![(1, vec![0.25, 0.75]), (4, vec![1.0, 2.0])],
            diversity: Some(0.3),
            ..image(0.0)
        };
        atlas.write_image(&id(Technique::Diversity, 0.into()), &diversity, "abc", &s).await.unwrap();
        let item = RenderedImage { curve: vec![(1, vec![0.1]), (4, vec![0.7])], ..image(0.7) };
        atlas.write_image(&id(Technique::Caricature, "dog".into()), &item, "abc", &s).await.unwrap();

        let record: UnitRecord = serde_json::from_slice(&atlas.store().get("layers/conv/units/0/diversity.json").await.unwrap().unwrap()).unwrap();
        assert_eq!((record.curve, record.diversity, record.objective), (curve(&[(1, 0.5), (4, 1.5)]), Some(0.3), 1.5));
        let record: serde_json::Value = serde_json::from_slice(&atlas.store().get("layers/conv/units/1/channel.json").await.unwrap().unwrap()).unwrap();
        assert_eq!(record["curve"], serde_json::json!([{ "step": 1, "objective": 0.5 }, { "step": 2, "objective": 1.0 }, { "step": 4, "objective": 0.5 }]));
        assert!(record.get("diversity").is_none());

        let examples = serde_json::json!({
            "format_version": FORMAT_VERSION,
            "layer": "conv",
            "dataset": { "uri": "data/", "images": 10, "images_skipped": 0, "examples": 2 },
            "receptive_field": 5,
            "stats": "stats.parquet",
            "units": [dataset_entry(0, Some(0.9), Some((0.2, 0.5, 1.0))), dataset_entry(1, Some(0.0), Some((0.0, 0.0, 0.0))), dataset_entry(2, Some(0.3), None)],
        });
        atlas.store().put("layers/conv/examples.json", serde_json::to_vec(&examples).unwrap()).await.unwrap();
        atlas.write_layer_indices(&spec).await.unwrap();

        let index: serde_json::Value = serde_json::from_slice(&atlas.store().get("layers/conv/layer.json").await.unwrap().unwrap()).unwrap();
        let units = &index["units"];
        assert_eq!(units[0]["techniques"]["diversity"]["curve"], serde_json::json!([{ "step": 1, "objective": 0.5 }, { "step": 4, "objective": 1.5 }]));
        assert_eq!(units[0]["techniques"]["diversity"]["diversity"], 0.3);
        assert_eq!(units[0]["techniques"]["channel"]["curve"][2], serde_json::json!({ "step": 4, "objective": 2.0 }));
        assert_eq!(units[0]["trust"], serde_json::json!({ "above_dataset": 2.0, "convergence": 0.5, "diversity": 0.3, "dead_on_dataset": false, "dead_on_start": false }));
        assert_eq!(units[1]["trust"], serde_json::json!({ "convergence": -1.0, "dead_on_dataset": true, "dead_on_start": false }), "std 0: no above_dataset");
        assert_eq!(units[2]["trust"], serde_json::json!({ "dead_on_dataset": false }), "a dataset entry alone");
        assert_eq!(index["items"]["caricature"][0]["curve"], serde_json::json!([{ "step": 1, "objective": 0.1 }, { "step": 4, "objective": 0.7 }]));
    }

    /// Jobs of one layer each, `writers` at a time for `rounds` rounds, all into one
    /// atlas: every layer must be in `atlas.json` at the end.
    async fn concurrent_jobs_keep_every_layer(atlas: Atlas, writers: usize, rounds: usize) {
        let mut set = tokio::task::JoinSet::new();
        for w in 0..writers {
            let atlas = atlas.clone();
            set.spawn(async move {
                for r in 0..rounds {
                    let mut job = spec("unused");
                    job.layers[0].layer.name = format!("layer-{w}-{r}");
                    atlas.add_job(&job, "2026-01-01T00:00:00Z".into()).await.unwrap();
                }
            });
        }
        let deadline = std::time::Duration::from_secs(120);
        tokio::time::timeout(deadline, async {
            while let Some(r) = set.join_next().await {
                r.unwrap();
            }
        })
        .await
        .expect("the jobs finished");
        let manifest = atlas.manifest().await.unwrap().unwrap();
        let names: HashSet<&str> = manifest.layers.iter().map(|l| l.name.as_str()).collect();
        let lost: Vec<String> = (0..writers).flat_map(|w| (0..rounds).map(move |r| format!("layer-{w}-{r}"))).filter(|n| !names.contains(n.as_str())).collect();
        assert!(lost.is_empty(), "{} of {} layers lost: {lost:?}", lost.len(), writers * rounds);
    }

    /// An atlas.json written before `jobs/` keeps its layers and creation time; a job
    /// submitted again adds no job manifest; another model is refused.
    #[tokio::test]
    async fn old_atlases_and_repeated_jobs_keep_what_they_list() {
        let dir = tempfile::tempdir().unwrap();
        let atlas = Atlas::new(Arc::new(LocalStore::new(dir.path())));
        let mut old = spec("unused");
        old.layers[0].layer.name = "old".into();
        let old_manifest = job_manifest(&old, "2025-01-01T00:00:00Z".into()).unwrap();
        atlas.store().put(ATLAS_KEY, crate::to_json(&old_manifest)).await.unwrap();

        let job = spec("unused");
        atlas.add_job(&job, "2026-01-01T00:00:00Z".into()).await.unwrap();
        atlas.add_job(&job, "2026-02-01T00:00:00Z".into()).await.unwrap();
        let manifest = atlas.manifest().await.unwrap().unwrap();
        let layers: Vec<&str> = manifest.layers.iter().map(|l| l.name.as_str()).collect();
        assert_eq!((layers, manifest.created.as_str()), (vec!["old", "conv"], "2025-01-01T00:00:00Z"));
        assert_eq!(atlas.store().list(JOB_MANIFESTS).await.unwrap().len(), 2, "the old atlas.json and the job");

        let other = JobSpec { model: crate::spec::ModelRef { sha256: "def".into(), ..job.model.clone() }, ..job };
        let err = atlas.add_job(&other, "2026-03-01T00:00:00Z".into()).await.unwrap_err().to_string();
        assert!(err.contains("another model"), "{err}");
    }

    /// A layer rendered with settings of its own says so in atlas.json, and a later job
    /// that would render it with others is refused, naming the layer and what differs;
    /// one that adds another layer, or the same layer with the same settings, is not.
    #[tokio::test]
    async fn a_layers_own_settings_are_listed_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let atlas = Atlas::new(Arc::new(LocalStore::new(dir.path())));
        let mut job = spec("unused");
        job.layers[0].steps = Some(100);
        atlas.add_job(&job, "2026-01-01T00:00:00Z".into()).await.unwrap();
        let manifest = atlas.manifest().await.unwrap().unwrap();
        let conv = &manifest.layers[0];
        assert_eq!((conv.settings(&manifest.settings).steps, manifest.settings.steps), (100, 4));

        let mut again = job.clone();
        again.layers.push(LayerPlan::new(LayerInfo { name: "fc".into(), shape: vec![10] }, UnitRanges::range(0, 2)));
        atlas.add_job(&again, "2026-01-02T00:00:00Z".into()).await.unwrap();
        let manifest = atlas.manifest().await.unwrap().unwrap();
        assert_eq!(manifest.layers.iter().map(|l| l.settings.is_some()).collect::<Vec<_>>(), [true, false], "{manifest:?}");

        let mut plain = job.clone();
        plain.layers[0].steps = None;
        let err = atlas.add_job(&plain, "2026-01-03T00:00:00Z".into()).await.unwrap_err().to_string();
        assert!(err.contains("layer conv") && err.contains("steps 100, not 4"), "{err}");
        let mut maco = job;
        maco.layers[0].param = Some(crate::spec::ParamSettings { maco: true, ..Default::default() });
        let err = atlas.add_job(&maco, "2026-01-04T00:00:00Z".into()).await.unwrap_err().to_string();
        assert!(err.contains("layer conv") && err.contains("param"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_jobs_into_a_local_atlas_lose_no_layer() {
        let dir = tempfile::tempdir().unwrap();
        concurrent_jobs_keep_every_layer(Atlas::new(Arc::new(LocalStore::new(dir.path()))), 8, 4).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_jobs_into_an_s3_atlas_lose_no_layer() {
        let server = loupe_testsupport::S3Server::start(&["atlas"]);
        let store = crate::s3::tests::store(&server, "atlas", "a");
        concurrent_jobs_keep_every_layer(Atlas::new(Arc::new(store)), 8, 4).await;
    }
}
