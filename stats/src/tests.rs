use super::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

fn summary(max: f32, y: u32, x: u32) -> UnitSummary {
    UnitSummary {
        max,
        y,
        x,
        sum: max as f64 * 2.0,
        sum_sq: (max as f64).powi(2) * 2.0,
        positives: (max > 0.0) as u64,
        positions: 4,
    }
}

fn ids(list: &[Example]) -> Vec<&str> {
    list.iter().map(|e| e.id.as_str()).collect()
}

#[test]
fn keeps_top_and_bottom_k_with_ties_by_id() {
    let mut p = LayerPartial::new(vec![5], 3);
    for (id, v) in [
        ("e", 1.0),
        ("a", 3.0),
        ("d", 3.0),
        ("b", -1.0),
        ("c", 0.5),
        ("f", -1.0),
        ("g", 2.0),
    ] {
        p.add_image(id, &[summary(v, 1, 2)]).unwrap();
    }
    let s = &p.finish()[0];
    assert_eq!(ids(&s.top), ["a", "d", "g"]);
    assert_eq!(
        s.top[0],
        Example {
            id: "a".into(),
            value: 3.0,
            y: 1,
            x: 2
        }
    );
    assert_eq!(ids(&s.bottom), ["b", "f", "c"]);
    assert_eq!(s.max, 3.0);
    assert_eq!(s.images, 7);
    assert_eq!(s.positions, 28);
}

#[test]
fn finishes_moments() {
    // Activations of unit 0: image a = [1, 2, 3, -2], image b = [0, 0, 4, 4].
    let mut p = LayerPartial::new(vec![0], 2);
    p.add_image(
        "a",
        &[UnitSummary {
            max: 3.0,
            y: 1,
            x: 0,
            sum: 4.0,
            sum_sq: 18.0,
            positives: 3,
            positions: 4,
        }],
    )
    .unwrap();
    p.add_image(
        "b",
        &[UnitSummary {
            max: 4.0,
            y: 1,
            x: 0,
            sum: 8.0,
            sum_sq: 32.0,
            positives: 2,
            positions: 4,
        }],
    )
    .unwrap();
    p.add_skipped("broken.jpg").unwrap();
    let s = &p.finish()[0];
    let all = [1.0f64, 2.0, 3.0, -2.0, 0.0, 0.0, 4.0, 4.0];
    let mean = all.iter().sum::<f64>() / 8.0;
    let std = (all.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 8.0).sqrt();
    assert_eq!(s.mean, mean);
    assert!((s.std - std).abs() < 1e-12, "{} vs {std}", s.std);
    assert_eq!(s.frac_positive, 0.625);
    // The spatial means: 1 for a, 2 for b.
    assert_eq!((s.spatial_mean_mean, s.spatial_mean_std, s.spatial_mean_max), (1.5, 0.5, 2.0));
    assert_eq!(s.max, 4.0);
    assert_eq!(s.images, 2);
    assert_eq!(p.skipped_count(), 1);
    assert_eq!(p.skipped().collect::<Vec<_>>(), ["broken.jpg"]);

    let empty = LayerPartial::new(vec![0, 1], 4).finish();
    assert!(
        empty[1].mean.is_nan()
            && empty[1].std.is_nan()
            && empty[1].max.is_nan()
            && empty[1].frac_positive.is_nan()
            && empty[1].spatial_mean_mean.is_nan()
            && empty[1].spatial_mean_max.is_nan()
    );
    assert!(empty[1].top.is_empty());
}

#[test]
fn refuses_wrong_counts_and_duplicates() {
    let mut p = LayerPartial::new(vec![0, 1], 2);
    let err = p.add_image("a", &[summary(1.0, 0, 0)]).unwrap_err();
    assert!(
        err.to_string()
            .contains("1 unit summaries for a layer partial of 2 units"),
        "{err}"
    );
    p.add_image("a", &[summary(1.0, 0, 0), summary(2.0, 0, 0)])
        .unwrap();
    assert!(
        matches!(p.add_image("a", &[summary(1.0, 0, 0), summary(2.0, 0, 0)]), Err(Error::DuplicateImage(id)) if id == "a")
    );
    assert!(matches!(p.add_skipped("a"), Err(Error::DuplicateImage(_))));
    p.add_skipped("z").unwrap();
    assert!(matches!(p.add_skipped("z"), Err(Error::DuplicateImage(_))));
}

#[test]
fn refuses_to_merge_a_shard_twice_or_mismatched_partials() {
    let mut a = LayerPartial::new(vec![0], 2);
    a.add_image("x", &[summary(1.0, 0, 0)]).unwrap();
    let mut b = LayerPartial::new(vec![0], 2);
    b.add_image("y", &[summary(2.0, 0, 0)]).unwrap();
    b.add_skipped("s").unwrap();
    let before = a.clone();
    a.merge(b.clone()).unwrap();
    let merged = a.clone();
    let err = a.merge(b.clone()).unwrap_err();
    assert!(
        matches!(&err, Error::CountedTwice(id) if id == "s" || id == "y"),
        "{err}"
    );
    assert!(err.to_string().contains("counted in both"), "{err}");
    assert_eq!(a, merged, "a refused merge changes nothing");
    let mut c = before.clone();
    assert!(matches!(
        c.merge(LayerPartial::new(vec![1], 2)),
        Err(Error::Mismatch(_))
    ));
    assert!(matches!(
        c.merge(LayerPartial::new(vec![0], 3)),
        Err(Error::Mismatch(_))
    ));
    assert_eq!(c, before);
}

/// Random summaries for `n` images and `units` units, with many ties in the maxima.
fn random_images(rng: &mut StdRng, n: usize, units: usize) -> Vec<(String, Vec<UnitSummary>)> {
    (0..n)
        .map(|i| {
            let s = (0..units)
                .map(|_| {
                    let max = match rng.gen_range(0..4) {
                        0 => rng.gen_range(-3..3) as f32, // ties
                        1 => rng.gen_range(-1.0f32..1.0) * 10f32.powi(rng.gen_range(-20..20)),
                        2 => -0.0,
                        _ => rng.gen_range(-5.0f32..5.0),
                    };
                    let positions = 49;
                    UnitSummary {
                        max,
                        y: rng.gen_range(0..7),
                        x: rng.gen_range(0..7),
                        sum: rng.gen_range(-1.0..1.0) * 10f64.powi(rng.gen_range(-10..10)),
                        sum_sq: rng.gen_range(0.0..1.0) * 10f64.powi(rng.gen_range(-10..12)),
                        positives: rng.gen_range(0..=positions),
                        positions,
                    }
                })
                .collect();
            (format!("img/{:05}.jpg", i * 7919 % 100_003), s)
        })
        .collect()
}

#[test]
fn merging_is_independent_of_shard_split_and_order() {
    let mut rng = StdRng::seed_from_u64(42);
    for round in 0..40 {
        let units: Vec<u32> = (0..rng.gen_range(1..5)).map(|u| u * 3).collect();
        let k = rng.gen_range(0..6);
        let n = rng.gen_range(0..60);
        let mut images = random_images(&mut rng, n, units.len());
        let skipped: Vec<String> = (0..rng.gen_range(0..4))
            .map(|i| format!("bad/{i}.png"))
            .collect();
        let mut whole = LayerPartial::new(units.clone(), k);
        for (id, s) in &images {
            whole.add_image(id, s).unwrap();
        }
        for id in &skipped {
            whole.add_skipped(id).unwrap();
        }
        // Shuffle, cut into shards, roundtrip each through bytes, merge in random grouping.
        images.shuffle(&mut rng);
        let mut shards: Vec<LayerPartial> = Vec::new();
        let mut rest = &images[..];
        let mut skipped_rest = &skipped[..];
        while !rest.is_empty() || !skipped_rest.is_empty() || shards.is_empty() {
            let take = rng.gen_range(0..=rest.len());
            let mut p = LayerPartial::new(units.clone(), k);
            for (id, s) in &rest[..take] {
                p.add_image(id, s).unwrap();
            }
            if let Some((id, tail)) = skipped_rest.split_first() {
                p.add_skipped(id).unwrap();
                skipped_rest = tail;
            }
            rest = &rest[take..];
            shards.push(LayerPartial::from_bytes(&p.to_bytes()).unwrap());
        }
        while shards.len() > 1 {
            shards.shuffle(&mut rng);
            let b = shards.pop().unwrap();
            let i = rng.gen_range(0..shards.len());
            shards[i].merge(b).unwrap();
        }
        let merged = shards.pop().unwrap();
        assert_eq!(
            merged.to_bytes(),
            whole.to_bytes(),
            "round {round}: bytes differ"
        );
        let (a, b) = (merged.finish(), whole.finish());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.mean.to_bits(), y.mean.to_bits());
            assert_eq!(x.std.to_bits(), y.std.to_bits());
            assert_eq!(x.max.to_bits(), y.max.to_bits());
            assert_eq!(x.top, y.top);
            assert_eq!(x.bottom, y.bottom);
        }
        for s in &a {
            assert_eq!(s.top.len(), k.min(images.len()));
            assert!(s
                .top
                .windows(2)
                .all(|w| top_order(&w[0], &w[1]) == Ordering::Less));
        }
    }
}

#[test]
fn bytes_round_trip_exactly_even_for_special_values() {
    let mut p = LayerPartial::new(vec![0, 1, 2], 2);
    let special = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -0.0,
        f32::MIN_POSITIVE / 3.0,
        0.1,
        f32::MAX,
    ];
    for (i, v) in special.iter().enumerate() {
        let s = UnitSummary {
            max: *v,
            y: 0,
            x: 0,
            sum: *v as f64 * 1e-3,
            sum_sq: 0.1 + i as f64,
            positives: 0,
            positions: 1,
        };
        p.add_image(
            &format!("i{i}"),
            &[
                s,
                summary(0.1 + i as f32 / 3.0, 1, 1),
                summary(-(i as f32), 2, 2),
            ],
        )
        .unwrap();
    }
    let back = LayerPartial::from_bytes(&p.to_bytes()).unwrap();
    assert_eq!(back.to_bytes(), p.to_bytes());
    let (a, b) = (back.finish(), p.finish());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.max.to_bits(), y.max.to_bits());
        let bits = |l: &[Example]| l.iter().map(|e| e.value.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&x.top), bits(&y.top));
        assert_eq!(bits(&x.bottom), bits(&y.bottom));
    }
    assert!(a[0].max.is_nan(), "NaN ranks above +inf in the total order");
    assert_eq!(a[0].bottom[0].value, f32::NEG_INFINITY);
    // Random f32 bit patterns survive JSON.
    let mut rng = StdRng::seed_from_u64(1);
    for _ in 0..2000 {
        let v = f32::from_bits(rng.gen());
        let e = Example {
            id: "x".into(),
            value: v,
            y: 0,
            x: 0,
        };
        let back: Example = serde_json::from_str(&serde_json::to_string(&e).unwrap()).unwrap();
        assert!(
            back.value.to_bits() == v.to_bits() || (v.is_nan() && back.value.is_nan()),
            "{v:e}"
        );
    }
}

#[test]
fn from_bytes_names_bad_input() {
    assert!(matches!(
        LayerPartial::from_bytes(b"not json"),
        Err(Error::Decode(_))
    ));
    let mut p = LayerPartial::new(vec![0], 1);
    p.add_image("a", &[summary(1.0, 0, 0)]).unwrap();
    let text = String::from_utf8(p.to_bytes()).unwrap();
    let err = LayerPartial::from_bytes(text.replace("\"units\":[0]", "\"units\":[0,1]").as_bytes())
        .unwrap_err();
    assert!(
        err.to_string().contains("1 unit states for 2 units"),
        "{err}"
    );
    let err = LayerPartial::from_bytes(text.replace("\"format\":2", "\"format\":9").as_bytes())
        .unwrap_err();
    assert!(err.to_string().contains("format 9"), "{err}");
}

#[test]
fn parquet_reads_back() {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{
        Float32Type, Float64Type, Int32Type, Int64Type, UInt32Type, UInt64Type,
    };
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    let mut p = LayerPartial::new(vec![4, 9], 2);
    p.add_image("a.jpg", &[summary(1.5, 1, 2), summary(-1.0, 0, 0)])
        .unwrap();
    p.add_image("b.jpg", &[summary(0.5, 3, 4), summary(2.0, 5, 6)])
        .unwrap();
    p.add_image("c.jpg", &[summary(1.0, 0, 1), summary(0.0, 1, 0)])
        .unwrap();
    let stats = p.finish();
    let bytes = write_parquet("mixed4a", &stats, p.units()).unwrap();
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes)).unwrap();
    let meta = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .unwrap();
    assert!(meta
        .iter()
        .any(|kv| kv.key == "loupe.layer" && kv.value.as_deref() == Some("mixed4a")));
    let batches: Vec<_> = builder
        .build()
        .unwrap()
        .collect::<std::result::Result<_, _>>()
        .unwrap();
    assert_eq!(batches.len(), 1);
    let b = &batches[0];
    assert_eq!(b.num_rows(), 2);
    let col = |name: &str| {
        b.column_by_name(name)
            .unwrap_or_else(|| panic!("no column {name}"))
            .clone()
    };
    assert_eq!(col("unit").as_primitive::<UInt32Type>().values(), &[4, 9]);
    assert_eq!(
        col("mean").as_primitive::<Float64Type>().value(0),
        stats[0].mean
    );
    assert_eq!(
        col("std").as_primitive::<Float64Type>().value(1),
        stats[1].std
    );
    assert_eq!(
        col("max").as_primitive::<Float32Type>().values(),
        &[1.5, 2.0]
    );
    assert_eq!(
        col("frac_positive").as_primitive::<Float64Type>().value(1),
        1.0 / 12.0
    );
    assert_eq!(
        col("positions").as_primitive::<UInt64Type>().values(),
        &[12, 12]
    );
    assert_eq!(col("images").as_primitive::<Int64Type>().values(), &[3, 3]);
    let top_ids = col("top_ids");
    let row0 = top_ids.as_list::<i32>().value(0);
    assert_eq!(
        row0.as_string::<i32>().iter().collect::<Vec<_>>(),
        [Some("a.jpg"), Some("c.jpg")]
    );
    let bottom_values = col("bottom_values");
    assert_eq!(
        bottom_values
            .as_list::<i32>()
            .value(1)
            .as_primitive::<Float32Type>()
            .values(),
        &[-1.0, 0.0]
    );
    let top_y = col("top_y");
    assert_eq!(
        top_y
            .as_list::<i32>()
            .value(1)
            .as_primitive::<Int32Type>()
            .values(),
        &[5, 1]
    );
    let bottom_x = col("bottom_x");
    assert_eq!(
        bottom_x
            .as_list::<i32>()
            .value(0)
            .as_primitive::<Int32Type>()
            .values(),
        &[4, 1]
    );

    let err = write_parquet("mixed4a", &stats, &[1]).unwrap_err();
    assert!(
        err.to_string().contains("2 unit statistics for 1 units"),
        "{err}"
    );
}
