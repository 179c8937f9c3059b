//! The atlas layout: a public format, documented in docs/atlas-format.md.
//!
//! ```text
//! atlas.json
//! jobs/<name>.json                                (each job's manifest; atlas.json merges them)
//! layers/<layer>/layer.json
//! layers/<layer>/units/<unit>/<technique>.png
//! layers/<layer>/units/<unit>/diversity-<i>.png   (diversity: N images)
//! layers/<layer>/units/<unit>/<image>.step<N>.png (snapshots after N steps)
//! layers/<layer>/units/<unit>/<technique>.json   (the unit record; written last)
//! layers/<layer>/<technique>/<item>.png          (deepdream, caricature, direction)
//! layers/<layer>/<technique>/<item>.json         (the item record; written last)
//! layers/<layer>/stats.parquet, connections.parquet, examples.json (the dataset pass)
//! labels.json                                     (researchers' labels; labels.rs)
//! labels/<layer>/<unit>.json                      (each label; labels.json merges them)
//! ```
//!
//! Keys are relative, `/`-separated, and identical on a local disk and in S3. This module
//! owns the format: the keys ([`ImageId`] for every rendered image), the JSON documents,
//! and, in [`Atlas`], how they are read and written (images first, the record last).

mod io;
mod labels;

pub use io::{Atlas, RenderedImage};
pub use labels::{label_key, Label, Labels, LABELS_KEY, LABEL_FILES, MAX_LABEL_CHARS};

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::spec::{LayerInfo, RenderSettings, Technique};
use crate::{Error, Result};

/// Version of the layout and of the JSON documents in it.
pub const FORMAT_VERSION: u32 = 1;
pub const ATLAS_KEY: &str = "atlas.json";
/// Where each job's own manifest goes; `atlas.json` is their merge (docs/atlas-format.md).
pub const JOB_MANIFESTS: &str = "jobs/";
const MAX_LAYER_NAME: usize = 200;

/// The path segment that stands for a layer name. Layer names come from a model file that
/// may not be trusted, so a name can never escape the atlas:
/// - bytes other than `A-Z a-z 0-9 _ - .` are written `%XX` (uppercase hex);
/// - a name made only of dots (`.`, `..`) has every dot written `%2E`;
/// - `%` itself is escaped, so the mapping is one-to-one and reversible;
/// - an empty name, or one longer than 200 bytes, is refused.
pub fn layer_segment(name: &str) -> Result<String> {
    if name.is_empty() {
        return Err(Error::invalid("layer name", "a layer name is empty"));
    }
    if name.len() > MAX_LAYER_NAME {
        return Err(Error::invalid("layer name", format!("layer name {name:?} is longer than {MAX_LAYER_NAME} bytes")));
    }
    let only_dots = name.bytes().all(|b| b == b'.');
    let mut seg = String::with_capacity(name.len());
    for b in name.bytes() {
        let keep = b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (b == b'.' && !only_dots);
        if keep {
            seg.push(b as char);
        } else {
            seg.push_str(&format!("%{b:02X}"));
        }
    }
    Ok(seg)
}

pub fn layer_key(segment: &str) -> String {
    format!("layers/{segment}/layer.json")
}

/// Reads `layers/<segment>/units/<unit>/<technique>.json` back into its parts.
pub fn parse_record_key(key: &str) -> Option<(&str, u32, Technique)> {
    let rest = key.strip_prefix("layers/")?;
    let mut parts = rest.split('/');
    let (segment, units, unit, file) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if units != "units" || parts.next().is_some() {
        return None;
    }
    let technique = file.strip_suffix(".json")?.parse().ok()?;
    Some((segment, unit.parse().ok()?, technique))
}

/// Whether `key` is one of an atlas's final unit images, `layers/<segment>/units/<unit>/
/// <technique>.png` or `diversity-<i>.png`: not a snapshot (`.step<n>.png`), not a dataset
/// example (`examples/`). What a job whose dataset is an atlas runs over.
pub fn is_unit_image_key(key: &str) -> bool {
    let parts: Vec<&str> = key.split('/').collect();
    match parts.as_slice() {
        ["layers", _, "units", unit, file] => unit.parse::<u32>().is_ok() && file.strip_suffix(".png").is_some_and(|stem| !stem.contains('.')),
        _ => false,
    }
}

/// What one image of a technique shows: a unit of the layer (the per-unit techniques:
/// channel, neuron, negative, diversity) or a named item of the whole layer (the per-layer
/// ones: a deepdream start, a caricature input, a direction).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Target {
    Unit(u32),
    Item(String),
}

impl Target {
    pub fn unit(&self) -> Option<u32> {
        match self {
            Target::Unit(u) => Some(*u),
            Target::Item(_) => None,
        }
    }

    pub fn item(&self) -> Option<&str> {
        match self {
            Target::Unit(_) => None,
            Target::Item(name) => Some(name),
        }
    }
}

impl From<u32> for Target {
    fn from(unit: u32) -> Target {
        Target::Unit(unit)
    }
}

impl From<String> for Target {
    fn from(item: String) -> Target {
        Target::Item(item)
    }
}

impl From<&str> for Target {
    fn from(item: &str) -> Target {
        Target::Item(item.to_string())
    }
}

/// Refuses targets of the wrong kind for the technique: a per-unit technique renders
/// units, a per-layer one named items.
pub fn check_targets(technique: Technique, targets: &[Target]) -> Result<()> {
    let wrong = targets.iter().find(|t| matches!(t, Target::Unit(_)) != technique.per_unit());
    match wrong {
        Some(t) if technique.per_unit() => Err(Error::invalid("render", format!("{technique} renders units of a layer, not {t}"))),
        Some(t) => Err(Error::invalid("render", format!("{technique} renders named items of a layer, not {t}"))),
        None => Ok(()),
    }
}

/// One image of an atlas (for diversity, a unit's N images): a layer, a technique and
/// its target. Everything the atlas keeps of it lies at keys this type gives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageId {
    layer: String,
    segment: String,
    technique: Technique,
    target: Target,
}

impl ImageId {
    pub fn new(layer: &str, technique: Technique, target: Target) -> Result<ImageId> {
        check_targets(technique, std::slice::from_ref(&target))?;
        Ok(ImageId { layer: layer.to_string(), segment: layer_segment(layer)?, technique, target })
    }

    pub fn layer(&self) -> &str {
        &self.layer
    }

    pub fn technique(&self) -> Technique {
        self.technique
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// The file name of image `i` (diversity has several; the others one), or with
    /// `step` of its snapshot after that many steps: `channel.png`, `diversity-2.png`,
    /// `channel.step64.png`; an item's `<item>.png`, `<item>.step64.png` (an item has one
    /// image; `spec` refuses item names that end like a snapshot's, which would clash).
    pub fn image_name(&self, i: u32, step: Option<u32>) -> String {
        let base = match &self.target {
            Target::Unit(_) if self.technique == Technique::Diversity => format!("diversity-{i}"),
            Target::Unit(_) => self.technique.to_string(),
            Target::Item(name) => name.clone(),
        };
        match step {
            Some(n) => format!("{base}.step{n}.png"),
            None => format!("{base}.png"),
        }
    }

    /// The directory of the image's files: `layers/<layer>/units/<unit>/` or
    /// `layers/<layer>/<technique>/`.
    fn dir(&self) -> String {
        match &self.target {
            Target::Unit(u) => format!("layers/{}/units/{u}/", self.segment),
            Target::Item(_) => format!("layers/{}/{}/", self.segment, self.technique),
        }
    }

    /// The key of a file of the image, named as [`ImageId::image_name`] names it.
    pub fn file_key(&self, name: &str) -> String {
        format!("{}{name}", self.dir())
    }

    /// The key of the (first) image itself.
    pub fn image_key(&self) -> String {
        self.file_key(&self.image_name(0, None))
    }

    /// The key of its record, written after its images.
    pub fn record_key(&self) -> String {
        let name = match &self.target {
            Target::Unit(_) => self.technique.as_str(),
            Target::Item(name) => name,
        };
        format!("{}{name}.json", self.dir())
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Unit(u) => write!(f, "unit {u}"),
            Target::Item(name) => write!(f, "item {name:?}"),
        }
    }
}

/// The model an atlas shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSummary {
    pub name: String,
    pub sha256: String,
}

/// One layer in `atlas.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerEntry {
    pub name: String,
    /// The path segment under `layers/` (see [`layer_segment`]).
    pub path: String,
    pub units: u32,
    pub shape: Vec<i64>,
    /// The settings the layer's images were rendered with, when not the atlas's: its job
    /// gave it steps, a parameterisation or transforms of its own (a job file's
    /// `[[layer]]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<RenderSettings>,
}

impl LayerEntry {
    pub fn new(info: &LayerInfo) -> Result<Self> {
        Ok(LayerEntry { name: info.name.clone(), path: layer_segment(&info.name)?, units: info.units(), shape: info.shape.clone(), settings: None })
    }

    /// The settings the layer's images were rendered with: its own, or the atlas's.
    pub fn settings<'a>(&'a self, atlas: &'a RenderSettings) -> &'a RenderSettings {
        self.settings.as_ref().unwrap_or(atlas)
    }
}

/// `atlas.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AtlasManifest {
    pub format_version: u32,
    pub loupe_version: String,
    pub model: ModelSummary,
    pub settings: RenderSettings,
    pub layers: Vec<LayerEntry>,
    pub techniques: Vec<Technique>,
    /// RFC 3339, UTC; the time the atlas was first created.
    pub created: String,
    /// The dataset of the statistics and examples, once a job with one has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<DatasetSummary>,
}

/// A unit record: written after the unit's PNG, so its presence means the image is whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitRecord {
    pub format_version: u32,
    pub layer: String,
    pub unit: u32,
    pub technique: Technique,
    /// File name of the image, beside the record.
    pub image: String,
    /// The technique's objective on the final image, untransformed (see docs/techniques.md);
    /// for diversity, the mean of its images' channel objectives.
    pub objective: f64,
    /// Every image's file name when the technique makes several (diversity), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
    /// Each image's objective, with `images`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objectives: Vec<f64>,
    /// Intermediate images (the job's thresholds), file names beside the record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotEntry>,
    /// No initial image excited the unit, re-seeded or not: its image is the grey start.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dead: bool,
    /// The objective, measured as `objective` is, as the optimisation went ([`CurvePoint`]);
    /// for diversity the mean of its images' at each step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub curve: Vec<CurvePoint>,
    /// Diversity only: how different its images are: the mean over pairs of images of the
    /// root mean square difference of their pixels in [0, 1] (0: identical).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diversity: Option<f64>,
    pub model_sha256: String,
    pub settings: RenderSettings,
}

/// The objective after `step` optimisation steps, on the image untransformed at the input
/// size (as the final `objective`). A curve has one after steps 1, 2, 4, ... below the
/// job's steps, each snapshot threshold and the last step, ascending; the last one's
/// objective is the record's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    pub step: u32,
    pub objective: f64,
}

/// The images kept after `step` optimisation steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    pub step: u32,
    pub images: Vec<String>,
}

/// The record of an image whose optimisation diverged (its objective or image stopped
/// being finite), at the image's record key: the reason, and no image. Like any record it
/// marks the image complete, so a resume with the same model and settings does not render
/// the (deterministic) failure again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedRecord {
    pub format_version: u32,
    pub layer: String,
    pub technique: Technique,
    /// `"unit": <n>` or `"item": "<name>"`, as in the other records.
    #[serde(flatten)]
    pub target: RecordTarget,
    /// Why, e.g. "objective became NaN at step 37".
    pub failed: String,
    pub model_sha256: String,
    pub settings: RenderSettings,
}

/// A failed record's target, named as the unit and item records name theirs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordTarget {
    Unit(u32),
    Item(String),
}

impl From<&Target> for RecordTarget {
    fn from(t: &Target) -> RecordTarget {
        match t {
            Target::Unit(u) => RecordTarget::Unit(*u),
            Target::Item(name) => RecordTarget::Item(name.clone()),
        }
    }
}

/// A technique's entry for a unit in `layer.json`: its images, or why it failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TechniqueEntry {
    Rendered(ImageEntry),
    Failed { failed: String },
}

/// What one technique produced for one unit, as listed in `layer.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageEntry {
    /// Path of the PNG relative to the layer directory.
    pub image: String,
    pub objective: f64,
    /// Every image, when the technique makes several (diversity); relative paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
    /// Snapshot images, paths relative to the layer directory.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotEntry>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dead: bool,
    /// The record's curve and diversity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub curve: Vec<CurvePoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diversity: Option<f64>,
}

/// An item record, `layers/<layer>/<technique>/<item>.json`: one image of a per-layer
/// technique. Written after its PNG.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemRecord {
    pub format_version: u32,
    pub layer: String,
    pub technique: Technique,
    pub item: String,
    /// File name of the image, beside the record.
    pub image: String,
    pub objective: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotEntry>,
    /// The objective as the optimisation went, as a unit record's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub curve: Vec<CurvePoint>,
    pub model_sha256: String,
    pub settings: RenderSettings,
}

/// An item of a per-layer technique in `layer.json`: its image, or why it failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ItemListing {
    Rendered(ItemEntry),
    Failed { item: String, failed: String },
}

impl ItemListing {
    pub fn item(&self) -> &str {
        match self {
            ItemListing::Rendered(e) => &e.item,
            ItemListing::Failed { item, .. } => item,
        }
    }
}

/// An item of a per-layer technique in `layer.json`; paths relative to the layer directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemEntry {
    pub item: String,
    pub image: String,
    pub objective: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub curve: Vec<CurvePoint>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitEntry {
    pub unit: u32,
    pub techniques: BTreeMap<Technique, TechniqueEntry>,
    /// The unit's dataset statistics and examples, when a job with a dataset covered it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<UnitExamples>,
    /// How far to believe the unit's images ([`Trust::of`]); absent when nothing is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust: Option<Trust>,
}

/// A unit's trust indicators, from its technique entries and its dataset entry. Each is
/// absent when what it is computed from is (docs/atlas-format.md "Trust").
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Trust {
    /// How many of the dataset's standard deviations of the unit's spatial mean the
    /// channel image's objective lies above the best dataset image's spatial mean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub above_dataset: Option<f64>,
    /// The channel objective's relative rise over the second half of the steps: from the
    /// curve's point at or just below half the steps to the last step. Near 0: converged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub convergence: Option<f64>,
    /// The diversity technique's [`ImageEntry::diversity`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diversity: Option<f64>,
    /// No position of any dataset image activates the unit above zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_on_dataset: Option<bool>,
    /// The channel record's `dead`: no initial image excited the unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_on_start: Option<bool>,
}

impl Trust {
    /// The unit's indicators, or `None` when none is known.
    pub fn of(unit: &UnitEntry) -> Option<Trust> {
        let rendered = |t: Technique| match unit.techniques.get(&t) {
            Some(TechniqueEntry::Rendered(e)) => Some(e),
            _ => None,
        };
        let channel = rendered(Technique::Channel);
        let spatial_mean = unit.dataset.as_ref().and_then(|d| d.spatial_mean);
        let trust = Trust {
            above_dataset: channel.zip(spatial_mean).filter(|(_, m)| m.std > 0.0).map(|(c, m)| (c.objective - m.max) / m.std),
            convergence: channel.and_then(|c| Trust::convergence(&c.curve)),
            diversity: rendered(Technique::Diversity).and_then(|d| d.diversity),
            dead_on_dataset: unit.dataset.as_ref().and_then(|d| d.max).map(|max| max <= 0.0),
            dead_on_start: channel.map(|c| c.dead),
        };
        (trust != Trust::default()).then_some(trust)
    }

    /// (last - middle) / |last|, where middle is the curve's point at or just below half
    /// the last step; `None` without such a point or with a last objective of 0.
    fn convergence(curve: &[CurvePoint]) -> Option<f64> {
        let last = curve.last()?;
        let middle = curve.iter().rev().find(|p| u64::from(p.step) * 2 <= u64::from(last.step))?;
        (last.objective != 0.0).then(|| (last.objective - middle.objective) / last.objective.abs())
    }
}

/// `layers/<layer>/examples.json`: a layer's dataset statistics and examples, written by
/// its reduce task. The coordinator folds it into `layer.json` when the job ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerExamples {
    pub format_version: u32,
    pub layer: String,
    pub dataset: DatasetSummary,
    /// Side in input pixels of the square each crop shows: the receptive field of a unit
    /// at the centre of the feature map, measured by the gradient.
    pub receptive_field: u32,
    /// The statistics table beside this file (one row per unit).
    pub stats: String,
    /// The connections the pass computed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<LayerConnections>,
    pub units: Vec<UnitExamples>,
}

/// What a job's dataset pass covered, in `atlas.json` and each `examples.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetSummary {
    pub uri: String,
    /// Images counted in the statistics.
    pub images: u64,
    /// Images that could not be decoded, skipped (their ids are in `skipped.json` beside
    /// `examples.json`).
    pub images_skipped: u64,
    /// Top and bottom examples kept per unit.
    pub examples: u32,
}

/// One unit's statistics over the dataset and its examples. The statistics are absent when
/// no image could be counted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitExamples {
    pub unit: u32,
    /// Mean and population standard deviation over all positions of all images.
    pub mean: Option<f64>,
    pub std: Option<f64>,
    /// The highest activation anywhere.
    pub max: Option<f64>,
    /// The fraction of activations above zero.
    pub frac_positive: Option<f64>,
    /// Highest maxima over space first.
    pub top: Vec<ExampleEntry>,
    /// Lowest maxima over space first.
    pub bottom: Vec<ExampleEntry>,
    /// The unit's spatial mean per image (what the channel objective maximises) over the
    /// dataset's images; absent when no image was counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spatial_mean: Option<SpatialMean>,
    /// The strongest inputs among the job's units of the previous job layer, strongest
    /// |score| first ([`Connection`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<Connection>,
    /// The strongest outputs among the job's units of the next job layer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<Connection>,
}

/// In `examples.json`: the layer's connections table and the job layers it connects the
/// layer with (none before the first job layer, none after the last).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerConnections {
    pub table: String,
    pub previous: Option<String>,
    pub next: Option<String>,
}

/// Statistics over images of one unit's per-image spatial mean.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SpatialMean {
    pub mean: f64,
    /// Population standard deviation over images.
    pub std: f64,
    pub max: f64,
}

/// A unit's connection to a unit of the previous or next layer: the attribution of the
/// later unit's spatial mean to the earlier unit, averaged over the dataset (positive
/// excites, negative inhibits). docs/atlas-format.md "Connections".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Connection {
    pub layer: String,
    pub unit: u32,
    pub score: f64,
}

/// Connections kept per unit and direction in `examples.json`; `connections.parquet`
/// has them all.
pub const CONNECTIONS_LISTED: usize = 8;

/// One dataset example of a unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExampleEntry {
    /// The image: its key in the dataset, or `<tar key>/<member>`.
    pub id: String,
    /// The unit's maximum over space on the image.
    pub value: f64,
    /// Where the maximum is, in feature-map cells (row, column).
    pub y: u32,
    pub x: u32,
    /// The receptive-field crop around the maximum, a JPEG, relative to the layer directory.
    pub crop: String,
    /// The whole image (as the model saw it: resized and centre-cropped), a JPEG thumbnail.
    pub image: String,
}

/// Where a unit's example JPEGs go: `units/<unit>/examples/<top|bottom>-<rank>.jpg` for the
/// crop and `...-image.jpg` for the thumbnail, relative to the layer directory.
pub fn example_paths(unit: u32, list: &str, rank: usize) -> (String, String) {
    let base = format!("units/{unit}/examples/{list}-{rank:02}");
    (format!("{base}.jpg"), format!("{base}-image.jpg"))
}

pub fn examples_key(segment: &str) -> String {
    format!("layers/{segment}/examples.json")
}

pub fn stats_key(segment: &str) -> String {
    format!("layers/{segment}/stats.parquet")
}

/// The job's scratch space, where its maps leave partial statistics for its reduces; not
/// part of the atlas's public format, and removed when the job's index is written. Job
/// ids are unique, so a job never reads another's (an earlier run's) partials.
pub fn job_partials_prefix(job_id: &str) -> String {
    format!("partials/{job_id}/")
}

/// What a map task leaves for the reduces: a layer's statistics, or the connections into
/// a layer from the previous job layer. Each kind has its own directory, so no layer name
/// can make one kind's keys another's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartialKind {
    Stats,
    Connections,
}

impl PartialKind {
    fn dir(self) -> &'static str {
        match self {
            PartialKind::Stats => "stats",
            PartialKind::Connections => "connections",
        }
    }
}

/// Where a map task leaves its partial results of one kind for one layer.
pub fn partial_prefix(job_id: &str, kind: PartialKind, segment: &str) -> String {
    format!("{}{}/{segment}/", job_partials_prefix(job_id), kind.dir())
}

pub fn partial_key(job_id: &str, kind: PartialKind, segment: &str, shard: u32) -> String {
    format!("{}{shard:06}.json", partial_prefix(job_id, kind, segment))
}

/// `layers/<layer>/connections.parquet`.
pub fn connections_key(segment: &str) -> String {
    format!("layers/{segment}/connections.parquet")
}

/// `layers/<layer>/layer.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerIndex {
    pub format_version: u32,
    pub name: String,
    pub shape: Vec<i64>,
    pub units: Vec<UnitEntry>,
    /// The per-layer techniques' images (deepdream, caricature, direction), by technique.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub items: BTreeMap<Technique, Vec<ItemListing>>,
    /// The layer's dataset pass: where its statistics table is, and what it covered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<LayerDataset>,
}

/// In `layer.json`: the files of the layer's dataset pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerDataset {
    pub stats: String,
    pub examples: String,
    pub receptive_field: u32,
    pub images: u64,
    pub images_skipped: u64,
    /// The connections table beside `layer.json`, when the dataset pass computed them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<String>,
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_image_has_its_keys() {
        let unit = ImageId::new("conv", Technique::Diversity, Target::Unit(3)).unwrap();
        assert_eq!(unit.image_key(), "layers/conv/units/3/diversity-0.png");
        assert_eq!(unit.file_key(&unit.image_name(2, Some(64))), "layers/conv/units/3/diversity-2.step64.png");
        assert_eq!(unit.record_key(), "layers/conv/units/3/diversity.json");
        let item = ImageId::new("conv", Technique::Caricature, Target::Item("dog".into())).unwrap();
        assert_eq!(item.image_key(), "layers/conv/caricature/dog.png");
        assert_eq!(item.file_key(&item.image_name(0, Some(8))), "layers/conv/caricature/dog.step8.png");
        assert_eq!(item.record_key(), "layers/conv/caricature/dog.json");
        assert!(ImageId::new("conv", Technique::Channel, Target::Item("dog".into())).is_err());
        assert!(ImageId::new("conv", Technique::DeepDream, Target::Unit(0)).is_err());
    }

    use super::*;

    #[test]
    fn ordinary_layer_names_stay_readable() {
        assert_eq!(layer_segment("inception4a").unwrap(), "inception4a");
        assert_eq!(layer_segment("layer4.2.relu").unwrap(), "layer4.2.relu");
        assert_eq!(layer_segment("encoder_layer-11").unwrap(), "encoder_layer-11");
    }

    #[test]
    fn names_that_could_escape_are_escaped() {
        assert_eq!(layer_segment("..").unwrap(), "%2E%2E");
        assert_eq!(layer_segment(".").unwrap(), "%2E");
        assert_eq!(layer_segment("../../etc").unwrap(), "..%2F..%2Fetc");
        assert_eq!(layer_segment("/abs").unwrap(), "%2Fabs");
        assert_eq!(layer_segment("a\\b").unwrap(), "a%5Cb");
        assert_eq!(layer_segment("50%").unwrap(), "50%25");
        assert!(layer_segment("").is_err());
        assert!(layer_segment(&"x".repeat(201)).is_err());
        for name in ["..", "../../etc", "/abs", "a/b/../c"] {
            let seg = layer_segment(name).unwrap();
            assert!(!seg.contains('/') && seg != ".." && seg != ".", "{name} -> {seg}");
        }
    }

    #[test]
    fn unit_images_are_told_from_snapshots_and_examples() {
        assert!(is_unit_image_key("layers/conv1/units/3/channel.png"));
        assert!(is_unit_image_key("layers/a%2Fb/units/0/diversity-2.png"));
        assert!(!is_unit_image_key("layers/conv1/units/3/channel.step64.png"));
        assert!(!is_unit_image_key("layers/conv1/units/3/examples/top-00.jpg"));
        assert!(!is_unit_image_key("layers/conv1/units/3/channel.json"));
        assert!(!is_unit_image_key("layers/conv1/deepdream/noise.png"));
        assert!(!is_unit_image_key("datasets/x/units/3/channel.png"));
    }

    #[test]
    fn record_keys_round_trip() {
        let k = ImageId::new("conv/1", Technique::Negative, Target::Unit(12)).unwrap().record_key();
        assert_eq!(parse_record_key(&k), Some(("conv%2F1", 12, Technique::Negative)));
        assert_eq!(parse_record_key("layers/a/units/1/channel.png"), None);
        assert_eq!(parse_record_key("layers/a/layer.json"), None);
    }
}
