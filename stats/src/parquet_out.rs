//! `layers/<layer>/stats.parquet`: one row per unit. Plain Arrow types only (uint32,
//! float64, float32, uint64, int64, list<utf8>, list<float32>, list<int32>) so pandas,
//! polars and DuckDB read it as is. Snappy-compressed; the layer name is in the file's
//! key-value metadata under `loupe.layer`.

use std::sync::Arc;

use arrow_array::builder::{Float32Builder, Int32Builder, ListBuilder, StringBuilder};
use arrow_array::{
    ArrayRef, Float32Array, Float64Array, Int64Array, RecordBatch, UInt32Array, UInt64Array,
};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use parquet::format::KeyValue;

use crate::{Error, Example, Result, UnitStats};

/// The four list columns of one side (top or bottom).
fn example_columns<'a>(lists: impl Iterator<Item = &'a [Example]>) -> [ArrayRef; 4] {
    let mut ids = ListBuilder::new(StringBuilder::new());
    let mut values = ListBuilder::new(Float32Builder::new());
    let mut ys = ListBuilder::new(Int32Builder::new());
    let mut xs = ListBuilder::new(Int32Builder::new());
    for list in lists {
        for e in list {
            ids.values().append_value(&e.id);
            values.values().append_value(e.value);
            // Positions are below the feature map's side, far below i32::MAX.
            ys.values().append_value(e.y as i32);
            xs.values().append_value(e.x as i32);
        }
        ids.append(true);
        values.append(true);
        ys.append(true);
        xs.append(true);
    }
    [
        Arc::new(ids.finish()),
        Arc::new(values.finish()),
        Arc::new(ys.finish()),
        Arc::new(xs.finish()),
    ]
}

/// The parquet file of a layer's statistics: row `i` is unit `units[i]` with `stats[i]`.
pub fn write_parquet(layer: &str, stats: &[UnitStats], units: &[u32]) -> Result<Vec<u8>> {
    let fail = |message: String| Error::Parquet {
        layer: layer.to_string(),
        message,
    };
    if stats.len() != units.len() {
        return Err(fail(format!(
            "{} unit statistics for {} units",
            stats.len(),
            units.len()
        )));
    }
    let f64_col = |f: fn(&UnitStats) -> f64| -> ArrayRef {
        Arc::new(stats.iter().map(f).collect::<Float64Array>())
    };
    let [top_ids, top_values, top_y, top_x] =
        example_columns(stats.iter().map(|s| s.top.as_slice()));
    let [bottom_ids, bottom_values, bottom_y, bottom_x] =
        example_columns(stats.iter().map(|s| s.bottom.as_slice()));
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("unit", Arc::new(UInt32Array::from(units.to_vec()))),
        ("mean", f64_col(|s| s.mean)),
        ("std", f64_col(|s| s.std)),
        (
            "max",
            Arc::new(stats.iter().map(|s| s.max).collect::<Float32Array>()),
        ),
        ("frac_positive", f64_col(|s| s.frac_positive)),
        (
            "positions",
            Arc::new(stats.iter().map(|s| s.positions).collect::<UInt64Array>()),
        ),
        // int64, not uint64: an image count is small and int64 is every reader's default.
        (
            "images",
            Arc::new(
                stats
                    .iter()
                    .map(|s| s.images as i64)
                    .collect::<Int64Array>(),
            ),
        ),
        ("spatial_mean_mean", f64_col(|s| s.spatial_mean_mean)),
        ("spatial_mean_std", f64_col(|s| s.spatial_mean_std)),
        ("spatial_mean_max", f64_col(|s| s.spatial_mean_max)),
        ("top_ids", top_ids),
        ("top_values", top_values),
        ("top_y", top_y),
        ("top_x", top_x),
        ("bottom_ids", bottom_ids),
        ("bottom_values", bottom_values),
        ("bottom_y", bottom_y),
        ("bottom_x", bottom_x),
    ];
    let batch = RecordBatch::try_from_iter(columns).map_err(|e| fail(e.to_string()))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_key_value_metadata(Some(vec![KeyValue::new(
            "loupe.layer".to_string(),
            layer.to_string(),
        )]))
        .build();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, batch.schema(), Some(props))
        .map_err(|e| fail(e.to_string()))?;
    writer.write(&batch).map_err(|e| fail(e.to_string()))?;
    writer.close().map_err(|e| fail(e.to_string()))?;
    Ok(out)
}
