//! Writes a small `stats.parquet` from known values, for tests/python/test_stats_parquet.py,
//! which reads it back with pandas, polars and DuckDB.
//!
//!     cargo run --release -q -p loupe-stats --example write_sample_parquet -- OUT.parquet

use loupe_stats::{write_parquet, LayerPartial, UnitSummary};

fn s(max: f32, y: u32, x: u32, sum: f64, sum_sq: f64, positives: u64) -> UnitSummary {
    UnitSummary {
        max,
        y,
        x,
        sum,
        sum_sq,
        positives,
        positions: 4,
    }
}

fn main() {
    let out = std::env::args()
        .nth(1)
        .expect("usage: write_sample_parquet OUT.parquet");
    // Layer "mixed4a", units 3 and 7, k = 2, three images and one that failed to decode.
    let mut p = LayerPartial::new(vec![3, 7], 2);
    p.add_image(
        "a.jpg",
        &[s(1.5, 1, 2, 2.0, 5.0, 2), s(0.25, 0, 0, 0.5, 0.25, 1)],
    )
    .unwrap();
    p.add_image(
        "b.jpg",
        &[s(-0.5, 0, 3, -1.0, 0.5, 0), s(4.0, 3, 3, 6.0, 20.0, 4)],
    )
    .unwrap();
    p.add_image(
        "c.jpg",
        &[s(1.5, 2, 2, 3.0, 4.5, 3), s(0.0, 0, 1, 0.0, 0.0, 0)],
    )
    .unwrap();
    p.add_skipped("broken.png").unwrap();
    let bytes = write_parquet("mixed4a", &p.finish(), p.units()).unwrap();
    std::fs::write(&out, bytes).unwrap_or_else(|e| panic!("writing {out}: {e}"));
}
