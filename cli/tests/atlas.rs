//! The atlas a render leaves: layout, determinism, resume, crash safety, hostile names.

mod common;
use common::*;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use loupe_testsupport::wait_for;

const TINY: &[&str] = &["--steps", "8", "--size", "16", "--device", "cpu", "--batch", "4"];

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

#[test]
fn the_atlas_lists_every_layer_unit_and_technique() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("atlas");
    assert_ok(&render(&fixture("tiny.pt"), &out, TINY));
    let atlas = json(&out.join("atlas.json"));
    assert_eq!(atlas["format_version"], 1);
    assert_eq!(atlas["model"]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(atlas["settings"]["steps"], 8);
    assert_eq!(atlas["settings"]["input_size"], 16, "from the sidecar");
    let layers = atlas["layers"].as_array().unwrap();
    assert_eq!(layers.iter().map(|l| l["name"].as_str().unwrap()).collect::<Vec<_>>(), vec!["conv", "logits"]);
    assert_eq!(layers[0]["units"], 4);
    assert_eq!(layers[1]["shape"], serde_json::json!([3]));
    assert!(atlas["created"].as_str().unwrap().ends_with('Z'));

    for (layer, units) in [("conv", 4), ("logits", 3)] {
        let index = json(&out.join(format!("layers/{layer}/layer.json")));
        let entries = index["units"].as_array().unwrap();
        assert_eq!(entries.len(), units);
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(e["unit"], i);
            for t in ["channel", "neuron", "negative"] {
                let img = e["techniques"][t]["image"].as_str().unwrap();
                assert!(e["techniques"][t]["objective"].is_number());
                let (w, h, _) = read_png(&out.join("layers").join(layer).join(img));
                assert_eq!((w, h), (16, 16));
            }
        }
    }
}

#[test]
fn the_same_seed_gives_the_same_bytes_whichever_worker_runs_a_unit() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("c"));
    assert_ok(&render(&fixture("tiny.pt"), &a, TINY));
    assert_ok(&render(&fixture("tiny.pt"), &b, &["--steps", "8", "--size", "16", "--device", "cpu", "--batch", "4", "--workers", "3"]));
    assert_ok(&render(&fixture("tiny.pt"), &c, &["--steps", "8", "--size", "16", "--device", "cpu", "--batch", "4", "--seed", "1"]));
    let pngs: Vec<String> = files(&a).into_iter().filter(|f| f.ends_with(".png")).collect();
    assert_eq!(pngs.len(), 7 * 3);
    let mut differ = 0;
    for f in &pngs {
        let bytes = std::fs::read(a.join(f)).unwrap();
        assert_eq!(bytes, std::fs::read(b.join(f)).unwrap(), "{f} differs between runs with the same seed");
        differ += (bytes != std::fs::read(c.join(f)).unwrap()) as usize;
    }
    assert_eq!(differ, pngs.len(), "another seed gives other images");
}

#[test]
fn bf16_is_recorded_changes_the_images_and_is_not_mixed_into_an_fp32_atlas() {
    let dir = tempfile::tempdir().unwrap();
    let (fp32, bf16) = (dir.path().join("fp32"), dir.path().join("bf16"));
    let bf16_args: Vec<&str> = TINY.iter().copied().chain(["--precision", "bf16"]).collect();
    assert_ok(&render(&fixture("tiny.pt"), &fp32, TINY));
    assert_ok(&render(&fixture("tiny.pt"), &bf16, &bf16_args));
    assert_eq!(json(&fp32.join("atlas.json"))["settings"]["precision"], "fp32");
    assert_eq!(json(&bf16.join("atlas.json"))["settings"]["precision"], "bf16");
    assert_eq!(json(&bf16.join("layers/conv/units/0/channel.json"))["settings"]["precision"], "bf16");
    let pngs: Vec<String> = files(&fp32).into_iter().filter(|f| f.ends_with(".png")).collect();
    let differ = pngs.iter().filter(|f| std::fs::read(fp32.join(f)).unwrap() != std::fs::read(bf16.join(f)).unwrap()).count();
    assert!(differ > pngs.len() / 2, "bf16 changes the images ({differ} of {} differ)", pngs.len());
    // An atlas holds one set of settings: bf16 into the fp32 atlas is refused.
    let o = render(&fixture("tiny.pt"), &fp32, &bf16_args);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("other settings"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = loupe().args(["render", "--model"]).arg(fixture("tiny.pt")).arg("--out").arg(dir.path().join("x")).args(["--precision", "fp16"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("fp16"), "{}", String::from_utf8_lossy(&o.stderr));
}

fn records(out: &Path) -> Vec<String> {
    files(out).into_iter().filter(|f| f.contains("/units/") && f.ends_with(".json")).collect()
}

#[test]
fn an_interrupted_render_resumes_without_redoing_finished_units() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("atlas");
    // One unit per task and many steps, so the run is interrupted between tasks.
    let args = ["--steps", "600", "--size", "16", "--device", "cpu", "--batch", "1", "--techniques", "channel"];
    let child = loupe()
        .arg("render")
        .arg("--model")
        .arg(fixture("tiny.pt"))
        .arg("--out")
        .arg(&out)
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("the first unit record", Duration::from_secs(120), || !records(&out).is_empty());
    // SIGINT, as Ctrl-C sends.
    assert!(std::process::Command::new("kill").arg("-INT").arg(child.id().to_string()).status().unwrap().success());
    let first = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert_eq!(first.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("run the same command again to resume"), "{stderr}");

    let done = records(&out);
    assert!(!done.is_empty() && done.len() < 7, "interrupted part-way: {done:?}");
    assert!(!out.join("layers/conv/layer.json").exists() || done.len() == 7);
    let stamp = |f: &String| {
        let m = std::fs::metadata(out.join(f)).unwrap();
        (m.ino(), m.mtime_nsec(), m.mtime())
    };
    let before: Vec<_> = done.iter().map(|f| (f.clone(), stamp(f), stamp(&f.replace(".json", ".png")))).collect();

    let second = render(&fixture("tiny.pt"), &out, &args);
    assert_ok(&second);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains(&format!("{} already complete, skipped", done.len())), "{stderr}");
    assert_eq!(records(&out).len(), 7, "the atlas is complete");
    for (f, record, image) in before {
        assert_eq!(stamp(&f), record, "{f} was rewritten");
        assert_eq!(stamp(&f.replace(".json", ".png")), image, "the image of {f} was rewritten");
    }
    let index = json(&out.join("layers/conv/layer.json"));
    assert_eq!(index["units"].as_array().unwrap().len(), 4);
}

#[test]
fn an_image_without_its_record_is_rendered_again() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("atlas");
    assert_ok(&render(&fixture("tiny.pt"), &out, TINY));
    let png = out.join("layers/conv/units/2/neuron.png");
    let good = std::fs::read(&png).unwrap();
    // A crash between the image and its record: a truncated PNG and no record.
    std::fs::write(&png, &good[..good.len() / 2]).unwrap();
    std::fs::remove_file(out.join("layers/conv/units/2/neuron.json")).unwrap();
    let o = render(&fixture("tiny.pt"), &out, TINY);
    assert_ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("rendering 1 images"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&png).unwrap(), good, "re-rendered whole, with the same bytes");
    assert!(out.join("layers/conv/units/2/neuron.json").exists());
}

#[test]
fn hostile_layer_names_stay_inside_the_atlas() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("atlas");
    assert_ok(&render(&fixture("evil_names.pt"), &out, &["--steps", "2", "--size", "16", "--device", "cpu"]));
    let top: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(top, vec!["atlas"], "nothing written beside the atlas");
    let mut layer_dirs: Vec<_> = std::fs::read_dir(out.join("layers")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    layer_dirs.sort();
    assert_eq!(layer_dirs, vec!["%2E%2E", "%2Fabs%2Fpath", "..%2Fescape", "a%2Fb"]);
    let atlas = json(&out.join("atlas.json"));
    let names: Vec<_> = atlas["layers"].as_array().unwrap().iter().map(|l| (l["name"].as_str().unwrap().to_string(), l["path"].as_str().unwrap().to_string())).collect();
    assert!(names.contains(&("../escape".to_string(), "..%2Fescape".to_string())), "{names:?}");
}
