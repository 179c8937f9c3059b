//! A job as the user states it, validated into plain types that every part shares.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// What a unit's image is optimised for. See docs/techniques.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Technique {
    /// Maximise the mean over space of one channel.
    Channel,
    /// Maximise one channel at the centre position.
    Neuron,
    /// Minimise the mean over space of one channel (the channel objective, sign flipped).
    Negative,
}

impl Technique {
    pub const ALL: [Technique; 3] = [Technique::Channel, Technique::Neuron, Technique::Negative];

    pub fn as_str(self) -> &'static str {
        match self {
            Technique::Channel => "channel",
            Technique::Neuron => "neuron",
            Technique::Negative => "negative",
        }
    }

    /// Parses a comma-separated list such as `channel,neuron`, refusing duplicates.
    pub fn parse_list(s: &str) -> Result<Vec<Technique>> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let t: Technique = part.parse()?;
            if out.contains(&t) {
                return Err(Error::invalid("techniques", format!("{t} is listed twice")));
            }
            out.push(t);
        }
        if out.is_empty() {
            return Err(Error::invalid("techniques", "no technique given"));
        }
        Ok(out)
    }
}

impl fmt::Display for Technique {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Technique {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Technique::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| {
            Error::invalid("technique", format!("unknown technique {s:?}; known: channel, neuron, negative"))
        })
    }
}

/// The settings that decide what a unit's image looks like. Two renders with equal
/// settings, model and unit give the same image; the batch size is not among them because
/// it only groups units into optimisations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenderSettings {
    /// Optimisation steps (lucid/lucent: 512).
    pub steps: u32,
    /// Side of the optimised image in pixels (lucid/lucent: 128).
    pub size: u32,
    /// Side of the model input; the transformed image is bilinearly resampled to it.
    pub input_size: u32,
    /// Job seed; per-unit seeds derive from it (see [`crate::seed`]).
    pub seed: u64,
    /// Adam learning rate (lucid/lucent: 0.05).
    pub learning_rate: f64,
    /// The number format of the model's passes.
    #[serde(default)]
    pub precision: Precision,
}

impl RenderSettings {
    pub const MAX_STEPS: u32 = 100_000;
    pub const MAX_SIZE: u32 = 2048;

    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::invalid("steps", "--steps must be at least 1 (got 0)"));
        }
        if self.steps > Self::MAX_STEPS {
            return Err(Error::invalid("steps", format!("--steps {} is above the limit of {}", self.steps, Self::MAX_STEPS)));
        }
        for (name, v) in [("size", self.size), ("input size", self.input_size)] {
            if !(8..=Self::MAX_SIZE).contains(&v) {
                return Err(Error::invalid("size", format!("{name} {v} is outside 8..={}", Self::MAX_SIZE)));
            }
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(Error::invalid("learning rate", format!("{} is not a positive number", self.learning_rate)));
        }
        Ok(())
    }
}

/// Which units of a layer to render: `all`, a half-open range `0..16`, or a list `0,3,7`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitSelection {
    All,
    Range(u32, u32),
    List(Vec<u32>),
}

impl FromStr for UnitSelection {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if s == "all" {
            return Ok(UnitSelection::All);
        }
        let num = |p: &str| -> Result<u32> {
            p.trim().parse().map_err(|_| Error::invalid("units", format!("{p:?} in {s:?} is not a unit index; use all, 0..16 or 0,3,7")))
        };
        if let Some((a, b)) = s.split_once("..") {
            let (a, b) = (num(a)?, num(b)?);
            if a >= b {
                return Err(Error::invalid("units", format!("range {s} is empty (ranges are half-open, as in Rust)")));
            }
            return Ok(UnitSelection::Range(a, b));
        }
        let list = s.split(',').map(num).collect::<Result<Vec<_>>>()?;
        Ok(UnitSelection::List(list))
    }
}

impl UnitSelection {
    /// The sorted, de-duplicated unit indices for a layer with `count` units.
    pub fn resolve(&self, layer: &str, count: u32) -> Result<Vec<u32>> {
        let units: Vec<u32> = match self {
            UnitSelection::All => (0..count).collect(),
            UnitSelection::Range(a, b) => (*a..*b).collect(),
            UnitSelection::List(l) => {
                let mut l = l.clone();
                l.sort_unstable();
                l.dedup();
                l
            }
        };
        if let Some(bad) = units.iter().find(|&&u| u >= count) {
            return Err(Error::invalid(
                "units",
                format!("unit {bad} is out of range: layer {layer:?} has {count} units (0..{count})"),
            ));
        }
        Ok(units)
    }
}

/// A layer the model exposes: its name and the shape of one example's activation,
/// `[C, H, W]` for a feature map or `[C]` for a vector such as logits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    pub name: String,
    pub shape: Vec<i64>,
}

impl LayerInfo {
    pub fn units(&self) -> u32 {
        self.shape.first().copied().unwrap_or(0) as u32
    }
}

/// The model a job renders: where to load it from, a display name and its digest, which
/// the atlas records and workers check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    pub uri: String,
    pub name: String,
    pub sha256: String,
}

/// One layer of a job with the units chosen in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerPlan {
    pub layer: LayerInfo,
    /// Sorted unit indices; stored and sent as half-open ranges, so a million contiguous
    /// units take a few bytes.
    #[serde(with = "unit_ranges")]
    pub units: Vec<u32>,
}

/// Sorted unit indices as half-open ranges `[start, end)`, and back.
pub fn to_ranges(units: &[u32]) -> Vec<(u32, u32)> {
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for &u in units {
        match ranges.last_mut() {
            Some((_, end)) if *end == u => *end = u + 1,
            _ => ranges.push((u, u + 1)),
        }
    }
    ranges
}

/// Expands ranges, refusing empty or reversed ones and any that reach past `limit` units,
/// before allocating anything.
pub fn from_ranges(ranges: &[(u32, u32)], limit: u32) -> Result<Vec<u32>> {
    let mut total = 0u64;
    for &(a, b) in ranges {
        if a >= b || b > limit {
            return Err(Error::invalid("units", format!("unit range {a}..{b} is empty or past the layer's {limit} units")));
        }
        total += u64::from(b - a);
    }
    let mut units = Vec::with_capacity(total as usize);
    for &(a, b) in ranges {
        units.extend(a..b);
    }
    Ok(units)
}

mod unit_ranges {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(units: &[u32], s: S) -> Result<S::Ok, S::Error> {
        super::to_ranges(units).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
        let ranges = Vec::<(u32, u32)>::deserialize(d)?;
        super::from_ranges(&ranges, u32::MAX).map_err(serde::de::Error::custom)
    }
}

/// The dataset a job gathers activation statistics and top/bottom examples over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetSpec {
    /// A local directory or an S3 prefix holding image files or WebDataset `.tar` shards.
    pub uri: String,
    /// Top and bottom K per unit.
    pub examples: u32,
    /// Images per map task, for a dataset of image files (a tar is one shard).
    pub images_per_shard: u32,
}

impl DatasetSpec {
    pub const MAX_EXAMPLES: u32 = 1000;
    pub const MAX_IMAGES_PER_SHARD: u32 = 100_000;

    pub fn validate(&self) -> Result<()> {
        if self.uri.trim().is_empty() {
            return Err(Error::invalid("dataset", "the dataset URI is empty"));
        }
        if !(1..=Self::MAX_EXAMPLES).contains(&self.examples) {
            return Err(Error::invalid(
                "dataset examples",
                format!("examples per unit {} is outside 1..={}", self.examples, Self::MAX_EXAMPLES),
            ));
        }
        if !(1..=Self::MAX_IMAGES_PER_SHARD).contains(&self.images_per_shard) {
            return Err(Error::invalid(
                "dataset images per shard",
                format!("images per shard {} is outside 1..={}", self.images_per_shard, Self::MAX_IMAGES_PER_SHARD),
            ));
        }
        Ok(())
    }
}

/// A whole atlas job, validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub model: ModelRef,
    pub layers: Vec<LayerPlan>,
    pub techniques: Vec<Technique>,
    pub settings: RenderSettings,
    /// Units per optimisation; each batch element is one unit.
    pub batch: u32,
    /// Where the atlas goes: a local directory (or, for the cluster, an object-store URI).
    pub out: String,
    /// A dataset to gather per-unit statistics and examples over, besides the renders.
    #[serde(default)]
    pub dataset: Option<DatasetSpec>,
}

impl JobSpec {
    pub const MAX_BATCH: u32 = 4096;

    pub fn validate(&self) -> Result<()> {
        self.settings.validate()?;
        if self.batch == 0 || self.batch > Self::MAX_BATCH {
            return Err(Error::invalid("batch", format!("--batch {} is outside 1..={}", self.batch, Self::MAX_BATCH)));
        }
        if self.layers.is_empty() {
            return Err(Error::invalid("layers", "no layer selected"));
        }
        if self.techniques.is_empty() {
            return Err(Error::invalid("techniques", "no technique selected"));
        }
        for plan in &self.layers {
            crate::atlas::layer_segment(&plan.layer.name)?;
            if plan.units.is_empty() {
                return Err(Error::invalid("units", format!("no unit selected in layer {:?}", plan.layer.name)));
            }
            let count = plan.layer.units();
            if let Some(bad) = plan.units.iter().find(|&&u| u >= count) {
                return Err(Error::invalid("units", format!("unit {bad} is out of range: layer {:?} has {count} units", plan.layer.name)));
            }
        }
        if let Some(d) = &self.dataset {
            d.validate()?;
        }
        Ok(())
    }

    /// How many (unit, technique) images the job asks for.
    pub fn total_images(&self) -> u64 {
        self.layers.iter().map(|l| l.units.len() as u64).sum::<u64>() * self.techniques.len() as u64
    }
}

/// The number format of the model's forward and backward passes. The image, its
/// spectrum and Adam stay fp32 either way; bf16 runs the network's weights and
/// activations in bfloat16, which is faster on GPUs with bf16 tensor cores and changes the
/// images slightly (docs/benchmarks.md gives the measured tolerance).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(Error::invalid("precision", format!("unknown precision {s:?}; use fp32 or bf16"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_selection_parses_the_three_forms() {
        assert_eq!("all".parse::<UnitSelection>().unwrap(), UnitSelection::All);
        assert_eq!("0..16".parse::<UnitSelection>().unwrap().resolve("l", 32).unwrap(), (0..16).collect::<Vec<_>>());
        assert_eq!("7,0,3,3".parse::<UnitSelection>().unwrap().resolve("l", 8).unwrap(), vec![0, 3, 7]);
        assert!("5..5".parse::<UnitSelection>().is_err());
        assert!("a,b".parse::<UnitSelection>().is_err());
    }

    #[test]
    fn out_of_range_units_name_the_layer_and_count() {
        let err = "0..17".parse::<UnitSelection>().unwrap().resolve("conv1", 16).unwrap_err().to_string();
        assert!(err.contains("unit 16") && err.contains("conv1") && err.contains("16 units"), "{err}");
    }

    #[test]
    fn techniques_parse_and_refuse_unknown_or_repeated() {
        assert_eq!(Technique::parse_list("channel,negative").unwrap(), vec![Technique::Channel, Technique::Negative]);
        assert!(Technique::parse_list("channel,channel").is_err());
        assert!(Technique::parse_list("diversity").unwrap_err().to_string().contains("diversity"));
    }

    #[test]
    fn units_travel_as_ranges() {
        assert_eq!(to_ranges(&[0, 1, 2, 5, 7, 8]), vec![(0, 3), (5, 6), (7, 9)]);
        assert_eq!(from_ranges(&[(0, 3), (5, 6), (7, 9)], 10).unwrap(), vec![0, 1, 2, 5, 7, 8]);
        assert!(from_ranges(&[(0, 11)], 10).is_err() && from_ranges(&[(3, 3)], 10).is_err());
        let plan = LayerPlan { layer: LayerInfo { name: "l".into(), shape: vec![1_000_000] }, units: (0..1_000_000).collect() };
        let json = serde_json::to_string(&plan).unwrap();
        assert!(json.len() < 100, "{json}");
        assert_eq!(serde_json::from_str::<LayerPlan>(&json).unwrap(), plan);
    }

    #[test]
    fn a_dataset_is_optional_and_validated() {
        let mut spec = JobSpec {
            model: ModelRef { uri: "m".into(), name: "m".into(), sha256: String::new() },
            layers: vec![LayerPlan { layer: LayerInfo { name: "l".into(), shape: vec![4] }, units: vec![0, 1] }],
            techniques: vec![Technique::Channel],
            settings: RenderSettings { steps: 1, size: 16, input_size: 16, seed: 0, learning_rate: 0.05, precision: Default::default() },
            batch: 2,
            out: "o".into(),
            dataset: None,
        };
        spec.validate().unwrap();
        // A spec stored before datasets existed reads as one without a dataset.
        let mut json: serde_json::Value = serde_json::to_value(&spec).unwrap();
        json.as_object_mut().unwrap().remove("dataset");
        assert_eq!(serde_json::from_value::<JobSpec>(json).unwrap(), spec);
        let good = DatasetSpec { uri: "s3://b/imagenet/val".into(), examples: 16, images_per_shard: 1000 };
        spec.dataset = Some(good.clone());
        spec.validate().unwrap();
        for (bad, word) in [
            (DatasetSpec { uri: " ".into(), ..good.clone() }, "URI"),
            (DatasetSpec { examples: 0, ..good.clone() }, "examples"),
            (DatasetSpec { examples: 1001, ..good.clone() }, "examples"),
            (DatasetSpec { images_per_shard: 0, ..good.clone() }, "images per shard"),
            (DatasetSpec { images_per_shard: 100_001, ..good.clone() }, "images per shard"),
        ] {
            spec.dataset = Some(bad);
            let err = spec.validate().unwrap_err().to_string();
            assert!(err.contains(word), "{err}");
        }
    }

    #[test]
    fn zero_steps_is_refused() {
        let s = RenderSettings { steps: 0, size: 128, input_size: 128, seed: 0, learning_rate: 0.05, precision: Default::default() };
        assert!(s.validate().unwrap_err().to_string().contains("--steps"));
    }
}

