//! Dataset examples statistics, without libtorch: what map tasks keep per layer and unit
//! while the worker runs a dataset through the model, how reduce tasks merge those
//! partials, and the `layers/<layer>/stats.parquet` writer.
//!
//! - [`UnitSummary`]: one image's activations of one unit, summarised on the device.
//! - [`LayerPartial`]: a map task's (or a merge's) state for one layer: per unit the
//!   top-K and bottom-K [`Example`]s and exact running moments, and the ids of the images
//!   it counted. [`LayerPartial::merge`] is exact: the merged result (and its bytes) do
//!   not depend on the order of merges or on how images were split into shards.
//! - [`UnitStats`]: the finished per-unit statistics; [`write_parquet`] writes them.
//! - [`ExactSum`]: the order-independent f64 accumulator behind the moments.
//! - [`ConnectionPartial`]: the attribution sums between the units of two layers, merged
//!   as exactly; [`write_connections_parquet`] writes a layer's connections.

mod connections;
mod exact;
mod parquet_out;

use std::cmp::Ordering;
use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

pub use connections::{write_connections_parquet, ConnectionPartial, ConnectionRow};
pub use exact::ExactSum;
pub use parquet_out::write_parquet;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("image {id}: {got} unit summaries for a layer partial of {expected} units")]
    SummaryCount {
        id: String,
        got: usize,
        expected: usize,
    },
    #[error("image {0} is already counted in this layer partial")]
    DuplicateImage(String),
    #[error("cannot merge layer partials: {0}")]
    Mismatch(String),
    /// The same image in two partials: a shard counted twice, or two shards that overlap.
    /// Merging would double-count it, so the merge is refused.
    #[error("cannot merge layer partials: image {0} is counted in both (a shard counted twice, or overlapping shards)")]
    CountedTwice(String),
    #[error("layer partial is not valid: {0}")]
    Decode(String),
    #[error("stats.parquet of layer {layer}: {message}")]
    Parquet { layer: String, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// One image's activations of one unit, computed by the worker on the device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnitSummary {
    /// The maximum over space.
    pub max: f32,
    /// Where the maximum is: the first one in row-major order; (0, 0) for a `[N, C]` layer.
    pub y: u32,
    pub x: u32,
    /// Sum and sum of squares of the activations over space.
    pub sum: f64,
    pub sum_sq: f64,
    /// How many activations are > 0.
    pub positives: u64,
    /// How many activations were summed: H*W, or 1 for a `[N, C]` layer.
    pub positions: u64,
}

/// A dataset example of a unit: an image, the unit's maximum over space on it, and where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub id: String,
    #[serde(with = "f32_exact")]
    pub value: f32,
    pub y: u32,
    pub x: u32,
}

/// Top examples first: highest value, ties by ascending id. `total_cmp` makes the order
/// total even with NaN (which ranks above +inf) and -0.0 (below +0.0).
fn top_order(a: &Example, b: &Example) -> Ordering {
    b.value.total_cmp(&a.value).then_with(|| a.id.cmp(&b.id))
}

/// Bottom examples first: lowest value, ties by ascending id.
fn bottom_order(a: &Example, b: &Example) -> Ordering {
    a.value.total_cmp(&b.value).then_with(|| a.id.cmp(&b.id))
}

/// Keeps `list` (sorted by `order`) the best `k`, offering it `candidate`.
fn offer(
    list: &mut Vec<Example>,
    k: usize,
    candidate: Example,
    order: fn(&Example, &Example) -> Ordering,
) {
    if list.len() == k
        && list
            .last()
            .is_none_or(|worst| order(&candidate, worst) != Ordering::Less)
    {
        return;
    }
    let at = list.partition_point(|e| order(e, &candidate) == Ordering::Less);
    list.insert(at, candidate);
    list.truncate(k);
}

/// The best `k` of two sorted lists of distinct images.
fn merge_lists(
    a: &mut Vec<Example>,
    b: Vec<Example>,
    k: usize,
    order: fn(&Example, &Example) -> Ordering,
) {
    a.extend(b);
    a.sort_by(order);
    a.truncate(k);
}

/// One unit's running state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct UnitPartial {
    positions: u64,
    positives: u64,
    sum: ExactSum,
    sum_sq: ExactSum,
    /// None until an image is counted.
    #[serde(with = "opt_f32_exact")]
    max: Option<f32>,
    /// Sum and sum of squares over images of each image's spatial mean, and the highest:
    /// the distribution the channel objective is compared with.
    mean_sum: ExactSum,
    mean_sum_sq: ExactSum,
    #[serde(with = "opt_f64_bits")]
    mean_max: Option<f64>,
    top: Vec<Example>,
    bottom: Vec<Example>,
}

impl UnitPartial {
    fn new() -> Self {
        UnitPartial {
            positions: 0,
            positives: 0,
            sum: ExactSum::new(),
            sum_sq: ExactSum::new(),
            max: None,
            mean_sum: ExactSum::new(),
            mean_sum_sq: ExactSum::new(),
            mean_max: None,
            top: Vec::new(),
            bottom: Vec::new(),
        }
    }
}

/// Any NaN becomes the one canonical NaN, so NaN's sign and payload (which the total
/// order would see, and JSON cannot carry) never depend on where a value came from.
fn canonical(v: f32) -> f32 {
    if v.is_nan() {
        f32::NAN
    } else {
        v
    }
}

fn max_of(a: Option<f32>, b: f32) -> f32 {
    match a {
        Some(a) if a.total_cmp(&b) == Ordering::Greater => a,
        _ => b,
    }
}

fn max_of_f64(a: Option<f64>, b: f64) -> f64 {
    match a {
        Some(a) if a.total_cmp(&b) == Ordering::Greater => a,
        _ => b,
    }
}

/// 2: each unit keeps the moments of its per-image spatial means.
const FORMAT: u32 = 2;

/// One layer's dataset-examples state: what a map task writes for its shard, and what a
/// reduce task builds by merging every shard's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerPartial {
    format: u32,
    units: Vec<u32>,
    k: usize,
    /// Every image counted, so a merge can refuse one counted twice.
    images: BTreeSet<String>,
    /// Images that could not be decoded, sorted.
    skipped: BTreeSet<String>,
    per_unit: Vec<UnitPartial>,
}

impl LayerPartial {
    /// An empty partial for `units` (the job's units of the layer, in order) keeping the
    /// top and bottom `k` examples of each.
    pub fn new(units: Vec<u32>, k: usize) -> Self {
        let per_unit = units.iter().map(|_| UnitPartial::new()).collect();
        LayerPartial {
            format: FORMAT,
            units,
            k,
            images: BTreeSet::new(),
            skipped: BTreeSet::new(),
            per_unit,
        }
    }

    pub fn units(&self) -> &[u32] {
        &self.units
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// How many images were counted.
    pub fn images_seen(&self) -> u64 {
        self.images.len() as u64
    }

    /// The ids of the images that could not be decoded, sorted.
    pub fn skipped(&self) -> impl ExactSizeIterator<Item = &str> {
        self.skipped.iter().map(String::as_str)
    }

    pub fn skipped_count(&self) -> u64 {
        self.skipped.len() as u64
    }

    fn known(&self, id: &str) -> bool {
        self.images.contains(id) || self.skipped.contains(id)
    }

    /// Counts one image: `summaries` holds one summary per unit, in the order of `units`.
    pub fn add_image(&mut self, id: &str, summaries: &[UnitSummary]) -> Result<()> {
        if summaries.len() != self.units.len() {
            return Err(Error::SummaryCount {
                id: id.to_string(),
                got: summaries.len(),
                expected: self.units.len(),
            });
        }
        if self.known(id) {
            return Err(Error::DuplicateImage(id.to_string()));
        }
        self.images.insert(id.to_string());
        let k = self.k;
        for (u, s) in self.per_unit.iter_mut().zip(summaries) {
            let value = canonical(s.max);
            u.positions += s.positions;
            u.positives += s.positives;
            u.sum.add(s.sum);
            u.sum_sq.add(s.sum_sq);
            u.max = Some(max_of(u.max, value));
            // The spatial mean from the image's own sum: the same bits whichever shard
            // the image is in.
            // (NaN made the one canonical NaN, as `canonical` does for f32.)
            let mean = s.sum / s.positions as f64;
            let mean = if mean.is_nan() { f64::NAN } else { mean };
            u.mean_sum.add(mean);
            u.mean_sum_sq.add(mean * mean);
            u.mean_max = Some(max_of_f64(u.mean_max, mean));
            if k > 0 {
                let example = Example {
                    id: id.to_string(),
                    value,
                    y: s.y,
                    x: s.x,
                };
                offer(&mut u.top, k, example.clone(), top_order);
                offer(&mut u.bottom, k, example, bottom_order);
            }
        }
        Ok(())
    }

    /// Records an image that could not be decoded; it counts in no statistic.
    pub fn add_skipped(&mut self, id: &str) -> Result<()> {
        if self.known(id) {
            return Err(Error::DuplicateImage(id.to_string()));
        }
        self.skipped.insert(id.to_string());
        Ok(())
    }

    /// Adds `other`'s images. Refused, leaving `self` unchanged, if the two were made for
    /// different units or k, or if any image is in both.
    pub fn merge(&mut self, other: LayerPartial) -> Result<()> {
        if self.units != other.units {
            return Err(Error::Mismatch(format!(
                "different units ({} vs {} units)",
                self.units.len(),
                other.units.len()
            )));
        }
        if self.k != other.k {
            return Err(Error::Mismatch(format!(
                "different k ({} vs {})",
                self.k, other.k
            )));
        }
        let (small, large) =
            if other.images.len() + other.skipped.len() <= self.images.len() + self.skipped.len() {
                (&other, &*self)
            } else {
                (&*self, &other)
            };
        if let Some(id) = small
            .images
            .iter()
            .chain(&small.skipped)
            .find(|id| large.known(id))
        {
            return Err(Error::CountedTwice(id.clone()));
        }
        let LayerPartial {
            images,
            skipped,
            per_unit,
            ..
        } = other;
        self.images.extend(images);
        self.skipped.extend(skipped);
        let k = self.k;
        for (u, o) in self.per_unit.iter_mut().zip(per_unit) {
            u.positions += o.positions;
            u.positives += o.positives;
            u.sum.merge(&o.sum);
            u.sum_sq.merge(&o.sum_sq);
            if let Some(m) = o.max {
                u.max = Some(max_of(u.max, m));
            }
            u.mean_sum.merge(&o.mean_sum);
            u.mean_sum_sq.merge(&o.mean_sum_sq);
            if let Some(m) = o.mean_max {
                u.mean_max = Some(max_of_f64(u.mean_max, m));
            }
            merge_lists(&mut u.top, o.top, k, top_order);
            merge_lists(&mut u.bottom, o.bottom, k, bottom_order);
        }
        Ok(())
    }

    /// The partial as bytes (JSON; every number round-trips exactly).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a layer partial always serialises")
    }

    /// Reads [`LayerPartial::to_bytes`]'s output, checking that it is consistent.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let p: LayerPartial =
            serde_json::from_slice(bytes).map_err(|e| Error::Decode(e.to_string()))?;
        if p.format != FORMAT {
            return Err(Error::Decode(format!(
                "format {} is not the supported {FORMAT}",
                p.format
            )));
        }
        if p.per_unit.len() != p.units.len() {
            return Err(Error::Decode(format!(
                "{} unit states for {} units",
                p.per_unit.len(),
                p.units.len()
            )));
        }
        if let Some(id) = p.skipped.iter().find(|id| p.images.contains(*id)) {
            return Err(Error::Decode(format!(
                "image {id} is both counted and skipped"
            )));
        }
        for u in &p.per_unit {
            let lists = [
                (&u.top, top_order as fn(&Example, &Example) -> Ordering),
                (&u.bottom, bottom_order),
            ];
            for (list, order) in lists {
                if list.len() > p.k
                    || list
                        .windows(2)
                        .any(|w| order(&w[0], &w[1]) != Ordering::Less)
                {
                    return Err(Error::Decode(
                        "an example list is longer than k or not in order".to_string(),
                    ));
                }
                if let Some(e) = list.iter().find(|e| !p.images.contains(&e.id)) {
                    return Err(Error::Decode(format!(
                        "example {} is not a counted image",
                        e.id
                    )));
                }
            }
        }
        Ok(p)
    }

    /// The statistics of each unit, in the order of `units`.
    pub fn finish(&self) -> Vec<UnitStats> {
        let images = self.images_seen();
        self.per_unit
            .iter()
            .map(|u| {
                let (mean, std, frac_positive) = if u.positions == 0 {
                    (f64::NAN, f64::NAN, f64::NAN)
                } else {
                    let n = u.positions as f64;
                    let mean = u.sum.value() / n;
                    let var = (u.sum_sq.value() / n - mean * mean).max(0.0);
                    (mean, var.sqrt(), u.positives as f64 / n)
                };
                let (spatial_mean_mean, spatial_mean_std) = if images == 0 {
                    (f64::NAN, f64::NAN)
                } else {
                    let n = images as f64;
                    let mean = u.mean_sum.value() / n;
                    (mean, (u.mean_sum_sq.value() / n - mean * mean).max(0.0).sqrt())
                };
                UnitStats {
                    mean,
                    std,
                    max: u.max.unwrap_or(f32::NAN),
                    frac_positive,
                    positions: u.positions,
                    images,
                    spatial_mean_mean,
                    spatial_mean_std,
                    spatial_mean_max: u.mean_max.unwrap_or(f64::NAN),
                    top: u.top.clone(),
                    bottom: u.bottom.clone(),
                }
            })
            .collect()
    }
}

/// One unit's statistics over the dataset. With no image counted, the float statistics
/// are NaN.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitStats {
    /// Over all positions of all images.
    pub mean: f64,
    /// Population standard deviation over all positions of all images.
    pub std: f64,
    /// The highest activation anywhere.
    pub max: f32,
    /// The fraction of activations > 0.
    pub frac_positive: f64,
    /// How many activations (positions x images) the statistics cover.
    pub positions: u64,
    /// How many images were counted.
    pub images: u64,
    /// Over images, each image's spatial mean of the unit (what the channel objective
    /// maximises): mean, population standard deviation and maximum.
    pub spatial_mean_mean: f64,
    pub spatial_mean_std: f64,
    pub spatial_mean_max: f64,
    /// Highest maxima first.
    pub top: Vec<Example>,
    /// Lowest maxima first.
    pub bottom: Vec<Example>,
}

/// Serde for f32 that round-trips every value: finite ones as JSON numbers, the others
/// as "NaN", "inf" or "-inf" (JSON has no such numbers).
mod f32_exact {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    pub(crate) enum Repr {
        Num(f32),
        Str(String),
    }

    pub(crate) fn to_repr_str(v: f32) -> Option<&'static str> {
        match v {
            v if v.is_nan() => Some("NaN"),
            f32::INFINITY => Some("inf"),
            f32::NEG_INFINITY => Some("-inf"),
            _ => None,
        }
    }

    pub(crate) fn from_repr<E: serde::de::Error>(r: Repr) -> Result<f32, E> {
        match r {
            Repr::Num(v) => Ok(v),
            Repr::Str(s) => match s.as_str() {
                "NaN" => Ok(f32::NAN),
                "inf" => Ok(f32::INFINITY),
                "-inf" => Ok(f32::NEG_INFINITY),
                _ => Err(E::custom(format!("{s:?} is not a number"))),
            },
        }
    }

    pub fn serialize<S: Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
        match to_repr_str(*v) {
            Some(name) => s.serialize_str(name),
            None => s.serialize_f32(*v),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
        from_repr(Repr::deserialize(d)?)
    }
}

/// Serde for Option<f64> as its bits: serde_json's default float parser may round the
/// last bit, and a partial must read back exactly.
mod opt_f64_bits {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_none(),
            Some(v) => s.serialize_u64(v.to_bits()),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(f64::from_bits))
    }
}

mod opt_f32_exact {
    use super::f32_exact::{from_repr, to_repr_str, Repr};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<f32>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_none(),
            Some(v) => match to_repr_str(*v) {
                Some(name) => s.serialize_str(name),
                None => s.serialize_f32(*v),
            },
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f32>, D::Error> {
        Option::<Repr>::deserialize(d)?.map(from_repr).transpose()
    }
}

#[cfg(test)]
mod tests;
