//! Connections between the units of two consecutive job layers: for each unit `j` of the
//! later layer and `i` of the earlier one, the attribution of `j`'s spatial mean to `i`,
//! summed over the dataset's images (docs/atlas-format.md "Connections"). The worker
//! computes each image's attributions; a [`ConnectionPartial`] adds them in exact
//! accumulators, so the merged sums (and the means written to `connections.parquet`) are
//! the same bits however the images were split into shards and merged.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt32Array};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use parquet::format::KeyValue;
use serde::{Deserialize, Serialize};

use crate::{Error, ExactSum, Result};

const FORMAT: u32 = 1;

/// The attribution sums from the units of layer `from` to those of layer `to` over a set
/// of images: what a map task writes for its shard, and what a reduce builds by merging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectionPartial {
    format: u32,
    from_layer: String,
    to_layer: String,
    from_units: Vec<u32>,
    to_units: Vec<u32>,
    /// Every image counted, so a merge can refuse one counted twice.
    images: BTreeSet<String>,
    /// Row-major `[to][from]`.
    sums: Vec<ExactSum>,
}

impl ConnectionPartial {
    pub fn new(from_layer: &str, from_units: Vec<u32>, to_layer: &str, to_units: Vec<u32>) -> Self {
        let sums = vec![ExactSum::new(); from_units.len() * to_units.len()];
        ConnectionPartial {
            format: FORMAT,
            from_layer: from_layer.to_string(),
            to_layer: to_layer.to_string(),
            from_units,
            to_units,
            images: BTreeSet::new(),
            sums,
        }
    }

    pub fn from_layer(&self) -> &str {
        &self.from_layer
    }

    pub fn to_layer(&self) -> &str {
        &self.to_layer
    }

    pub fn from_units(&self) -> &[u32] {
        &self.from_units
    }

    pub fn to_units(&self) -> &[u32] {
        &self.to_units
    }

    pub fn images_seen(&self) -> u64 {
        self.images.len() as u64
    }

    /// Counts one image: `scores` is its attribution from every `from` unit to every `to`
    /// unit, row-major `[to][from]`.
    pub fn add_image(&mut self, id: &str, scores: &[f64]) -> Result<()> {
        if scores.len() != self.sums.len() {
            return Err(Error::SummaryCount { id: id.to_string(), got: scores.len(), expected: self.sums.len() });
        }
        if !self.images.insert(id.to_string()) {
            return Err(Error::DuplicateImage(id.to_string()));
        }
        for (sum, &score) in self.sums.iter_mut().zip(scores) {
            sum.add(score);
        }
        Ok(())
    }

    /// Adds `other`'s images. Refused, leaving `self` unchanged, if the two are of other
    /// layers or units, or if any image is in both.
    pub fn merge(&mut self, other: ConnectionPartial) -> Result<()> {
        let same = (&self.from_layer, &self.to_layer, &self.from_units, &self.to_units) == (&other.from_layer, &other.to_layer, &other.from_units, &other.to_units);
        if !same {
            return Err(Error::Mismatch(format!(
                "connections {} -> {} and {} -> {} are of other layers or units",
                self.from_layer, self.to_layer, other.from_layer, other.to_layer
            )));
        }
        if let Some(id) = other.images.iter().find(|id| self.images.contains(*id)) {
            return Err(Error::CountedTwice(id.clone()));
        }
        self.images.extend(other.images);
        for (sum, o) in self.sums.iter_mut().zip(&other.sums) {
            sum.merge(o);
        }
        Ok(())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a connection partial always serialises")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let p: ConnectionPartial = serde_json::from_slice(bytes).map_err(|e| Error::Decode(e.to_string()))?;
        if p.format != FORMAT {
            return Err(Error::Decode(format!("connections format {} is not the supported {FORMAT}", p.format)));
        }
        if p.sums.len() != p.from_units.len() * p.to_units.len() {
            return Err(Error::Decode(format!("{} sums for {} x {} units", p.sums.len(), p.to_units.len(), p.from_units.len())));
        }
        Ok(p)
    }

    /// The mean attribution over the images counted, row-major `[to][from]`; NaN when no
    /// image was counted.
    pub fn scores(&self) -> Vec<f64> {
        let n = self.images.len() as f64;
        self.sums.iter().map(|s| s.value() / n).collect()
    }
}

/// One row of `connections.parquet`: `unit` of `layer` and `other_unit` of `other_layer`,
/// with the score of the connection between them (from the earlier to the later layer).
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionRow {
    pub unit: u32,
    pub other_layer: String,
    pub other_unit: u32,
    pub score: f64,
}

/// `layers/<layer>/connections.parquet`: columns layer, unit, other_layer, other_unit
/// (uint32 units, utf8 layers) and score (float64), one row per connection. Snappy, the
/// layer name in the key-value metadata under `loupe.layer`, as stats.parquet.
pub fn write_connections_parquet(layer: &str, rows: &[ConnectionRow]) -> Result<Vec<u8>> {
    let fail = |message: String| Error::Parquet { layer: layer.to_string(), message };
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("layer", Arc::new(StringArray::from(vec![layer; rows.len()]))),
        ("unit", Arc::new(rows.iter().map(|r| r.unit).collect::<UInt32Array>())),
        ("other_layer", Arc::new(rows.iter().map(|r| Some(r.other_layer.as_str())).collect::<StringArray>())),
        ("other_unit", Arc::new(rows.iter().map(|r| r.other_unit).collect::<UInt32Array>())),
        ("score", Arc::new(rows.iter().map(|r| r.score).collect::<Float64Array>())),
    ];
    let batch = RecordBatch::try_from_iter(columns).map_err(|e| fail(e.to_string()))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_key_value_metadata(Some(vec![KeyValue::new("loupe.layer".to_string(), layer.to_string())]))
        .build();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(props)).map_err(|e| fail(e.to_string()))?;
    writer.write(&batch).map_err(|e| fail(e.to_string()))?;
    writer.close().map_err(|e| fail(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partial() -> ConnectionPartial {
        ConnectionPartial::new("a", vec![0, 2], "b", vec![1, 3, 5])
    }

    #[test]
    fn merges_give_the_same_bits_in_any_grouping() {
        // Values whose float sum depends on the order.
        let images: Vec<(String, Vec<f64>)> = (0..9)
            .map(|i| (format!("img{i}"), (0..6).map(|k| [1e16, 1.0, -1e16, 0.1, 3.3e-5, -7.25][(i + k) % 6] * (k + 1) as f64).collect()))
            .collect();
        let mut whole = partial();
        for (id, s) in &images {
            whole.add_image(id, s).unwrap();
        }
        let mut parts: Vec<ConnectionPartial> = images
            .chunks(4)
            .map(|chunk| {
                let mut p = partial();
                for (id, s) in chunk.iter().rev() {
                    p.add_image(id, s).unwrap();
                }
                p
            })
            .collect();
        let mut merged = parts.pop().unwrap();
        for p in parts {
            merged.merge(ConnectionPartial::from_bytes(&p.to_bytes()).unwrap()).unwrap();
        }
        assert_eq!(merged.scores().iter().map(|v| v.to_bits()).collect::<Vec<_>>(), whole.scores().iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        assert_eq!(whole.images_seen(), 9);
        // Exact: 1e16 + 1 - 1e16 is 1 here, where a float sum in this order gives 0.
        let mut p = ConnectionPartial::new("a", vec![0], "b", vec![0]);
        for (i, v) in [1e16, 1.0, -1e16].into_iter().enumerate() {
            p.add_image(&format!("{i}"), &[v]).unwrap();
        }
        assert_eq!(p.scores(), vec![1.0 / 3.0]);
    }

    #[test]
    fn an_image_counted_twice_or_other_units_are_refused() {
        let mut a = partial();
        a.add_image("x", &[0.0; 6]).unwrap();
        assert!(matches!(a.add_image("x", &[0.0; 6]), Err(Error::DuplicateImage(_))));
        assert!(matches!(a.add_image("y", &[0.0; 5]), Err(Error::SummaryCount { .. })));
        let mut b = partial();
        b.add_image("x", &[1.0; 6]).unwrap();
        assert!(matches!(a.merge(b), Err(Error::CountedTwice(id)) if id == "x"));
        assert!(matches!(a.merge(ConnectionPartial::new("a", vec![0, 2], "b", vec![1])), Err(Error::Mismatch(_))));
        assert_eq!(a.scores(), vec![0.0; 6]);
    }
}
