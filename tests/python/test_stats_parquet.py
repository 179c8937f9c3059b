"""layers/<layer>/stats.parquet is readable by pandas, polars and DuckDB.

The file comes from the Rust writer itself (stats/examples/write_sample_parquet.rs), built
from known values: layer mixed4a, units 3 and 7, k = 2, images a.jpg, b.jpg, c.jpg (each
with 4 positions) and one undecodable image that counts nowhere.
"""

import math
import subprocess
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]

# Per unit: (mean, std, max, frac_positive, top ids/values/y/x, bottom ids/values/y/x).
# Unit 3's maxima: a 1.5 at (1,2), b -0.5 at (0,3), c 1.5 at (2,2): the tie ranks by id.
# Unit 7's maxima: a 0.25 at (0,0), b 4.0 at (3,3), c 0.0 at (0,1).
EXPECTED = {
    3: dict(
        mean=4.0 / 12, std=math.sqrt(10.0 / 12 - (4.0 / 12) ** 2), max=1.5, frac_positive=5 / 12,
        top_ids=["a.jpg", "c.jpg"], top_values=[1.5, 1.5], top_y=[1, 2], top_x=[2, 2],
        bottom_ids=["b.jpg", "a.jpg"], bottom_values=[-0.5, 1.5], bottom_y=[0, 1], bottom_x=[3, 2],
    ),
    7: dict(
        mean=6.5 / 12, std=math.sqrt(20.25 / 12 - (6.5 / 12) ** 2), max=4.0, frac_positive=5 / 12,
        top_ids=["b.jpg", "a.jpg"], top_values=[4.0, 0.25], top_y=[3, 0], top_x=[3, 0],
        bottom_ids=["c.jpg", "a.jpg"], bottom_values=[0.0, 0.25], bottom_y=[0, 0], bottom_x=[1, 0],
    ),
}
LIST_COLUMNS = [f"{side}_{what}" for side in ("top", "bottom") for what in ("ids", "values", "y", "x")]
# Each image's spatial mean (its sum over 4 positions / 4): unit 3 0.5, -0.25, 0.75; unit 7
# 0.125, 1.5, 0. Columns: their mean, population std and max over the three images.
SPATIAL_MEANS = {3: [0.5, -0.25, 0.75], 7: [0.125, 1.5, 0.0]}
SPATIAL_COLUMNS = ["spatial_mean_mean", "spatial_mean_std", "spatial_mean_max"]


@pytest.fixture(scope="module")
def parquet_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("stats") / "stats.parquet"
    cmd = ["cargo", "run", "--release", "-q", "-p", "loupe-stats", "--example", "write_sample_parquet", "--", str(path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr
    return path


def check_row(unit, row):
    want = EXPECTED[unit]
    assert row["mean"] == want["mean"]
    assert row["std"] == pytest.approx(want["std"], rel=1e-15)
    assert row["max"] == want["max"]
    assert row["frac_positive"] == want["frac_positive"]
    assert row["positions"] == 12
    assert row["images"] == 3
    for col in LIST_COLUMNS:
        assert [x for x in row[col]] == want[col], col
    means = SPATIAL_MEANS[unit]
    mean = sum(means) / len(means)
    assert row["spatial_mean_mean"] == pytest.approx(mean, rel=1e-15)
    assert row["spatial_mean_std"] == pytest.approx(math.sqrt(sum((m - mean) ** 2 for m in means) / len(means)), rel=1e-12)
    assert row["spatial_mean_max"] == max(means)


def test_pandas(parquet_path):
    df = pd.read_parquet(parquet_path)
    assert list(df.columns) == ["unit", "mean", "std", "max", "frac_positive", "positions", "images", *SPATIAL_COLUMNS, *LIST_COLUMNS]
    assert list(df["unit"]) == [3, 7]
    assert str(df["unit"].dtype) == "uint32"
    assert str(df["max"].dtype) == "float32"
    for _, row in df.iterrows():
        check_row(int(row["unit"]), row)


def test_pyarrow_schema_and_metadata(parquet_path):
    table = pq.read_table(parquet_path)
    schema = table.schema
    assert schema.field("unit").type == pa.uint32()
    assert schema.field("positions").type == pa.uint64()
    assert schema.field("images").type == pa.int64()
    assert schema.field("top_ids").type.value_type == pa.string()
    assert schema.field("top_values").type.value_type == pa.float32()
    assert schema.field("bottom_y").type.value_type == pa.int32()
    assert pq.read_metadata(parquet_path).metadata[b"loupe.layer"] == b"mixed4a"


def test_polars(parquet_path):
    df = pl.read_parquet(parquet_path)
    assert df.schema["top_ids"] == pl.List(pl.String)
    assert df.schema["top_values"] == pl.List(pl.Float32)
    assert df.schema["top_x"] == pl.List(pl.Int32)
    for row in df.iter_rows(named=True):
        check_row(row["unit"], row)
    # List columns work with polars' list expressions.
    best = df.select(pl.col("unit"), pl.col("top_ids").list.first().alias("best"))
    assert best.rows() == [(3, "a.jpg"), (7, "b.jpg")]


def test_duckdb(parquet_path):
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT unit, mean, std, max, frac_positive, positions, images, {', '.join(SPATIAL_COLUMNS + LIST_COLUMNS)} "
        f"FROM read_parquet('{parquet_path}') ORDER BY unit"
    ).fetchall()
    names = ["unit", "mean", "std", "max", "frac_positive", "positions", "images", *SPATIAL_COLUMNS, *LIST_COLUMNS]
    assert [r[0] for r in rows] == [3, 7]
    for r in rows:
        check_row(r[0], dict(zip(names, r)))
    # DuckDB lists are 1-based; unnest gives one row per example.
    assert con.execute(f"SELECT top_ids[1] FROM read_parquet('{parquet_path}') WHERE unit = 7").fetchone() == ("b.jpg",)
    n = con.execute(f"SELECT count(*) FROM (SELECT unnest(bottom_ids) FROM read_parquet('{parquet_path}'))").fetchone()
    assert n == (4,)
