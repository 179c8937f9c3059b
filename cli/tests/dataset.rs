//! Dataset examples and activation statistics end to end, on the demo model and the
//! dataset of tools/make_test_dataset.py, whose pure red, green and blue images are the
//! known top examples of the red, green and blue logits.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use tch::{CModule, IValue, Kind, Tensor};

fn dataset(name: &str) -> std::path::PathBuf {
    repo().join("tests/fixtures/dataset").join(name)
}

/// A cheap render (2 steps) of two layers, with the dataset pass.
fn render_with_dataset(out: &Path, dataset: &Path, extra: &[&str]) -> std::process::Output {
    let ds = dataset.to_string_lossy().into_owned();
    let mut args = vec!["--layers", "logits,conv3", "--techniques", "channel", "--steps", "2", "--size", "16", "--device", "cpu", "--dataset", &ds, "--examples", "2"];
    args.extend_from_slice(extra);
    render(&demo_model(), out, &args)
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap().to_string()).collect()
}

/// Per image, each unit's maximum over space, one image per forward pass: the
/// brute-force answer the distributed map and reduce must reproduce.
fn brute_force_maxima(layer: &str) -> BTreeMap<String, Vec<f32>> {
    let model = CModule::load(demo_model()).unwrap();
    let _no_grad = tch::no_grad_guard();
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dataset("images")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Ok(img) = loupe_dataset::preprocess(&std::fs::read(&path).unwrap(), 64) else { continue };
        let x = Tensor::from_slice(&img.to_chw_f32()).reshape([1, 3, 64, 64]);
        let IValue::GenericDict(dict) = model.forward_is(&[IValue::Tensor(x)]).unwrap() else { panic!("not a dict") };
        let act = dict.into_iter().find_map(|(k, v)| match (k, v) { (IValue::String(k), IValue::Tensor(t)) if k == layer => Some(t), _ => None }).unwrap();
        let act = act.get(0);
        let maxima = if act.dim() == 1 { act } else { act.flatten(1, -1).amax([1i64].as_slice(), false) };
        out.insert(name, Vec::<f32>::try_from(maxima.to_kind(Kind::Float)).unwrap());
    }
    out
}

/// Top (highest maxima first) or bottom k image ids of one unit, ties by id.
fn ranked(maxima: &BTreeMap<String, Vec<f32>>, unit: usize, k: usize, top: bool) -> Vec<(String, f32)> {
    let mut v: Vec<(String, f32)> = maxima.iter().map(|(id, m)| (id.clone(), m[unit])).collect();
    v.sort_by(|a, b| if top { b.1.total_cmp(&a.1) } else { a.1.total_cmp(&b.1) }.then_with(|| a.0.cmp(&b.0)));
    v.truncate(k);
    v
}

#[test]
fn top_examples_are_the_known_images_and_match_a_brute_force_pass() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("atlas");
    assert_ok(&render_with_dataset(&out, &dataset("images"), &["--images-per-shard", "5"]));

    let atlas = json(&out.join("atlas.json"));
    assert_eq!(atlas["dataset"]["images"], 24, "{atlas}");
    assert_eq!(atlas["dataset"]["images_skipped"], 1, "broken.png is skipped and counted: {atlas}");
    assert_eq!(json(&out.join("layers/logits/skipped.json")), serde_json::json!(["broken.png"]));

    let logits = json(&out.join("layers/logits/examples.json"));
    for (unit, colour) in [(0, "red"), (1, "green"), (2, "blue")] {
        let top = ids(&logits["units"][unit]["top"]);
        assert_eq!(top, vec![format!("pure-{colour}-0.png"), format!("pure-{colour}-1.png")], "logit {unit} ({colour})");
    }

    for layer in ["logits", "conv3"] {
        let examples = json(&out.join(format!("layers/{layer}/examples.json")));
        let maxima = brute_force_maxima(layer);
        let units = examples["units"].as_array().unwrap();
        assert_eq!(units.len(), maxima.values().next().unwrap().len(), "{layer}: every unit");
        for (u, entry) in units.iter().enumerate() {
            for (list, top) in [("top", true), ("bottom", false)] {
                let want = ranked(&maxima, u, 2, top);
                let got = entry[list].as_array().unwrap();
                let got_ids: Vec<&str> = got.iter().map(|e| e["id"].as_str().unwrap()).collect();
                let want_ids: Vec<&str> = want.iter().map(|(id, _)| id.as_str()).collect();
                assert_eq!(got_ids, want_ids, "{layer} unit {u} {list}");
                for (g, (_, w)) in got.iter().zip(&want) {
                    let v = g["value"].as_f64().unwrap() as f32;
                    assert!((v - w).abs() <= 1e-4 * w.abs().max(1.0), "{layer} unit {u} {list}: {v} vs brute force {w}");
                }
            }
            let max = entry["max"].as_f64().unwrap() as f32;
            let brute = ranked(&maxima, u, 1, true)[0].1;
            assert!((max - brute).abs() <= 1e-4 * brute.abs().max(1.0), "{layer} unit {u}: max {max} vs {brute}");
        }
        // Every listed crop and thumbnail is a JPEG beside the layer.
        for entry in units {
            for e in entry["top"].as_array().unwrap().iter().chain(entry["bottom"].as_array().unwrap()) {
                for file in [e["crop"].as_str().unwrap(), e["image"].as_str().unwrap()] {
                    let bytes = std::fs::read(out.join(format!("layers/{layer}/{file}"))).unwrap();
                    assert_eq!(&bytes[..3], &[0xff, 0xd8, 0xff], "{file} is a JPEG");
                }
            }
        }
        assert!(out.join(format!("layers/{layer}/stats.parquet")).is_file());
        // layer.json carries the statistics and examples for the viewer.
        let index = json(&out.join(format!("layers/{layer}/layer.json")));
        assert_eq!(index["dataset"]["examples"], "examples.json");
        assert_eq!(index["units"][0]["dataset"]["top"], units[0]["top"]);
    }
}

#[test]
fn statistics_do_not_depend_on_how_the_dataset_is_split() {
    let dir = tempfile::tempdir().unwrap();
    let (one, many) = (dir.path().join("one"), dir.path().join("many"));
    assert_ok(&render_with_dataset(&one, &dataset("images"), &["--images-per-shard", "1000"]));
    assert_ok(&render_with_dataset(&many, &dataset("images"), &["--images-per-shard", "3"]));
    for layer in ["logits", "conv3"] {
        for file in ["stats.parquet", "examples.json", "skipped.json"] {
            let a = std::fs::read(one.join(format!("layers/{layer}/{file}"))).unwrap();
            let b = std::fs::read(many.join(format!("layers/{layer}/{file}"))).unwrap();
            assert!(a == b, "{layer}/{file} differs between one shard and nine");
        }
    }
    // The same images as two tar shards: the same statistics (ids name the shard).
    let tars = dir.path().join("tars");
    assert_ok(&render_with_dataset(&tars, &dataset("tars"), &[]));
    let (a, b) = (json(&one.join("layers/conv3/examples.json")), json(&tars.join("layers/conv3/examples.json")));
    for (x, y) in a["units"].as_array().unwrap().iter().zip(b["units"].as_array().unwrap()) {
        for stat in ["mean", "std", "max", "frac_positive"] {
            assert_eq!(x[stat], y[stat], "unit {}: {stat}", x["unit"]);
        }
        let strip = |v: &Value| ids(v).into_iter().map(|id| id.rsplit('/').next().unwrap().to_string()).collect::<Vec<_>>();
        assert_eq!(strip(&x["top"]), strip(&y["top"]));
    }
    assert_eq!(json(&tars.join("atlas.json"))["dataset"]["images_skipped"], 0);
}

#[test]
fn an_empty_dataset_and_a_shard_that_is_not_a_tar_are_refused_with_their_names() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = render_with_dataset(&dir.path().join("a"), &empty, &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no images") && err.contains(&*empty.to_string_lossy()), "{err}");
    assert!(!dir.path().join("a/atlas.json").exists(), "nothing is written for a refused job");

    let o = render_with_dataset(&dir.path().join("b"), &dataset("not-a-tar"), &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bad.tar") && err.contains("not a tar archive"), "{err}");
}

/// Renders into an atlas that an earlier job already gave dataset statistics, with other
/// shards, K or units: each reduce must merge only its own job's partials. Under a repeated
/// job id the earlier job's were merged too ("counted twice", "different units (8 vs 4
/// units)", or silently inflated counts). The statistics must equal a fresh render's, and
/// no partial is left behind.
#[test]
fn a_render_into_an_atlas_merges_only_its_own_partials_and_leaves_none() {
    let dir = tempfile::tempdir().unwrap();
    let (atlas, fresh) = (dir.path().join("atlas"), dir.path().join("fresh"));
    let ds = dataset("images").to_string_lossy().into_owned();
    let conv3 = |out: &Path, units: &str, per_shard: &str, examples: &str| {
        let args = ["--layers", "conv3", "--units", units, "--techniques", "channel", "--steps", "2", "--size", "16", "--device", "cpu"];
        render(&demo_model(), out, &[&args[..], &["--dataset", &ds, "--examples", examples, "--images-per-shard", per_shard]].concat())
    };
    for (units, per_shard, examples, why) in [("0..4", "3", "2", "the first job"), ("0..4", "10", "3", "other shards and K"), ("0..8", "5", "3", "more units")] {
        let o = conv3(&atlas, units, per_shard, examples);
        assert!(o.status.success(), "{why}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(!atlas.join("partials").exists(), "{why}: partials left: {:?}", files(&atlas.join("partials")));
    }
    assert_ok(&conv3(&fresh, "0..8", "5", "3"));
    for file in ["stats.parquet", "examples.json", "skipped.json"] {
        let (a, b) = (std::fs::read(atlas.join("layers/conv3").join(file)).unwrap(), std::fs::read(fresh.join("layers/conv3").join(file)).unwrap());
        assert!(a == b, "conv3/{file} differs from a fresh render's");
    }
}
