//! Job files (`--spec job.toml`) and the techniques they configure, through the real
//! `loupe` binary on the demo model.

mod common;
use common::*;

use std::path::Path;

fn render_spec(spec: &Path, args: &[&str]) -> std::process::Output {
    loupe().arg("render").arg("--spec").arg(spec).args(["--device", "cpu"]).args(args).output().expect("running loupe")
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn header(model: &Path) -> String {
    format!("model = {:?}\nout = \"atlas\"\nsize = 32\nseed = 3\n", model.to_string_lossy())
}

/// A bad key or value is refused with its name, and nothing is rendered.
#[test]
fn a_bad_spec_file_names_the_key_or_value() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("stepz = 10\n", "stepz"),
        ("[param]\ndecai = 2.0\n", "decai"),
        ("[[layer]]\nname = \"conv1\"\nstep = 3\n", "step"),
        ("dead_units = \"sometimes\"\n", "sometimes"),
        ("techniques = [\"channel\", \"dreams\"]\n", "dreams"),
        ("thresholds = [8, 4]\nsteps = 10\n", "thresholds"),
        ("techniques = [\"caricature\"]\nsteps = 4\n", "caricature input"),
        ("steps = 4\n[[directions]]\nname = \"d\"\nlayer = \"conv3\"\nvector = [1.0, 2.0]\n", "direction \"d\" has 2 values"),
        ("[[layer]]\nname = \"nope\"\n", "unknown layer \"nope\""),
        ("[param]\nkind = \"pixel\"\nmaco = true\n", "param.maco"),
        ("[param]\nmagnitude = [[1.0, 0.5], [1.0, 0.5], [1.0, 0.5]]\n", "param.magnitude"),
        ("[param]\nmaco = true\nmagnitude = [[1.0, 0.5]]\n", "param.magnitude"),
        ("[param]\nmaco = true\nmagnitude_from_dataset = true\n", "needs a dataset"),
        ("[transforms]\ncrop = { start = 0.5, end = 1.5 }\n", "transforms.crop"),
        ("[transforms]\ncrop = { start = 0.5 }\n", "end"),
        ("[transforms]\nnoise = -0.1\n", "transforms.noise"),
        ("[diversity]\npenalty = \"strong\"\n", "strong"),
        ("[[layer]]\nname = \"conv1\"\n[layer.param]\ndecai = 2.0\n", "decai"),
        ("[[layer]]\nname = \"conv1\"\n[layer.param]\ndecay = 9.0\n", "param.decay: layer \"conv1\""),
        ("[[layer]]\nname = \"conv1\"\n[layer.param]\nkind = \"pixel\"\nmaco = true\n", "param.maco: layer \"conv1\""),
        ("[[layer]]\nname = \"conv1\"\n[layer.param]\nchannels = 1\n", "param.channels"),
        ("[[layer]]\nname = \"conv1\"\n[layer.param]\nmaco = true\nmagnitude_from_dataset = true\n", "needs a dataset"),
        ("[[layer]]\nname = \"conv1\"\n[layer.transforms]\nnois = 0.1\n", "[[layer]] \"conv1\": transforms: unknown field `nois`"),
        ("[[layer]]\nname = \"conv1\"\n[layer.transforms]\nnoise = \"loud\"\n", "[[layer]] \"conv1\": transforms: invalid type"),
        ("[[layer]]\nname = \"conv1\"\n[layer.transforms]\nnoise = 2.0\n", "transforms.noise: layer \"conv1\""),
    ];
    for (i, (body, expect)) in cases.iter().enumerate() {
        let spec = write(dir.path(), &format!("bad{i}.toml"), &format!("{}{body}", header(&demo_model())));
        let o = render_spec(&spec, &[]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{body:?} was accepted");
        assert!(stderr.contains(expect), "{body:?}: the message should contain {expect:?}: {stderr}");
        assert!(files(&dir.path().join("atlas")).is_empty(), "{body:?}: nothing may be written");
    }
}

/// Per-layer techniques and steps from the file, a flag overriding the file, and
/// snapshots at every threshold.
#[test]
fn a_spec_file_sets_per_layer_techniques_and_steps_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write(
        dir.path(),
        "job.toml",
        &format!(
            "{}layers = [\"conv1\", \"conv3\"]\nunits = \"0..2\"\ntechniques = [\"channel\"]\nsteps = 12\nthresholds = [4, 8]\n\
             [transforms]\npad = 4\n\
             [[layer]]\nname = \"conv3\"\ntechniques = [\"channel\", \"deepdream\"]\nsteps = 10\n",
            header(&demo_model())
        ),
    );
    // --units overrides the file's 0..2.
    let o = render_spec(&spec, &["--units", "1"]);
    assert_ok(&o);
    let atlas = dir.path().join("atlas");
    let manifest = json(&atlas.join("atlas.json"));
    assert_eq!(manifest["settings"]["steps"], 12);
    assert_eq!(manifest["settings"]["transforms"]["pad"], 4);
    assert_eq!(manifest["settings"]["transforms"]["jitter"], 8, "unset transform keys keep lucid's values");
    let conv1 = json(&atlas.join("layers/conv1/units/1/channel.json"));
    assert_eq!(conv1["settings"]["steps"], 12);
    let conv3 = json(&atlas.join("layers/conv3/units/1/channel.json"));
    assert_eq!(conv3["settings"]["steps"], 10, "the layer's own steps");
    assert!(!atlas.join("layers/conv1/units/0").exists(), "--units 1 overrides the file");
    assert!(!atlas.join("layers/conv1/deepdream").exists(), "deepdream is conv3's only");
    let deepdream = json(&atlas.join("layers/conv3/deepdream/noise.json"));
    assert_eq!(deepdream["item"], "noise");
    // Snapshots at every threshold, listed in the record and in layer.json.
    for (layer, image) in [("conv1", "units/1/channel"), ("conv3", "units/1/channel"), ("conv3", "deepdream/noise")] {
        for step in [4, 8] {
            let path = atlas.join(format!("layers/{layer}/{image}.step{step}.png"));
            assert!(path.is_file(), "{} is missing", path.display());
            assert_ne!(std::fs::read(&path).unwrap(), std::fs::read(atlas.join(format!("layers/{layer}/{image}.png"))).unwrap());
        }
    }
    let steps: Vec<u64> = conv1["snapshots"].as_array().unwrap().iter().map(|s| s["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, vec![4, 8]);
    let layer = json(&atlas.join("layers/conv3/layer.json"));
    assert_eq!(layer["items"]["deepdream"][0]["image"], "deepdream/noise.png");
    assert_eq!(layer["units"][0]["techniques"]["channel"]["snapshots"][1]["images"][0], "units/1/channel.step8.png");
    // atlas.json lists conv3's own settings; a job that would render conv3 with the
    // job's steps into this atlas is refused, naming the layer and the difference.
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.iter().map(|l| l["settings"]["steps"].as_u64()).collect::<Vec<_>>(), [None, Some(10)], "{manifest}");
    let text = std::fs::read_to_string(&spec).unwrap().replace("steps = 10\n", "");
    let o = render_spec(&write(dir.path(), "without.toml", &text), &["--units", "1"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("layer conv3") && stderr.contains("steps 10, not 12"), "{stderr}");
}

/// A `[[layer]]` table's own `param` and `transforms`, merged key by key over the job's:
/// that layer's records carry them and its images change; the other layer renders as
/// the job alone would.
#[test]
fn a_layer_table_sets_its_own_param_and_transforms() {
    let dir = tempfile::tempdir().unwrap();
    let job = format!("{}layers = [\"conv1\", \"conv3\"]\nunits = \"0\"\ntechniques = [\"channel\"]\nsteps = 4\n[transforms]\npad = 4\n", header(&demo_model()));
    let plain = write(dir.path(), "plain.toml", &job.replace("\"atlas\"", "\"plain\""));
    let own = write(
        dir.path(),
        "own.toml",
        &format!("{job}[[layer]]\nname = \"conv3\"\n[layer.transforms]\ncrop = {{ start = 0.9, end = 0.5 }}\nnoise = 0.01\n[layer.param]\nmaco = true\ndecay = 1.5\n"),
    );
    assert_ok(&render_spec(&plain, &[]));
    assert_ok(&render_spec(&own, &[]));
    let (atlas, plain) = (dir.path().join("atlas"), dir.path().join("plain"));
    let job_settings = &json(&atlas.join("atlas.json"))["settings"];
    assert_eq!((&job_settings["param"]["maco"], &job_settings["transforms"]["crop"]), (&serde_json::Value::Null, &serde_json::Value::Null), "the job's settings are the job's");

    let conv3 = &json(&atlas.join("layers/conv3/units/0/channel.json"))["settings"];
    assert_eq!(conv3["param"]["maco"], true);
    assert_eq!(conv3["param"]["decay"], 1.5);
    assert_eq!(conv3["param"]["kind"], "fft", "unset param keys are the job's");
    assert_eq!(conv3["transforms"]["crop"], serde_json::json!({ "start": 0.9, "end": 0.5 }));
    assert!((conv3["transforms"]["noise"].as_f64().unwrap() - 0.01).abs() < 1e-6);
    assert_eq!(conv3["transforms"]["pad"], 4, "unset transform keys are the job's");
    assert_eq!(conv3["steps"], 4);
    let conv1 = &json(&atlas.join("layers/conv1/units/0/channel.json"))["settings"];
    assert_eq!(conv1, &json(&plain.join("layers/conv1/units/0/channel.json"))["settings"]);
    assert_eq!(conv1["param"].get("maco"), None);

    let image = |atlas: &Path, layer: &str| std::fs::read(atlas.join(format!("layers/{layer}/units/0/channel.png"))).unwrap();
    assert_eq!(image(&atlas, "conv1"), image(&plain, "conv1"), "conv1 renders with the job's settings");
    assert_ne!(image(&atlas, "conv3"), image(&plain, "conv3"), "conv3 renders with its own");
}

/// Diversity writes N images per unit, listed in the record and layer.json.
#[test]
fn diversity_writes_its_images_and_lists_them() {
    let dir = tempfile::tempdir().unwrap();
    let spec = write(
        dir.path(),
        "job.toml",
        &format!("{}layers = [\"conv3\"]\nunits = \"4\"\ntechniques = [\"diversity\"]\nsteps = 16\n[diversity]\nimages = 3\n", header(&demo_model())),
    );
    assert_ok(&render_spec(&spec, &[]));
    let unit = dir.path().join("atlas/layers/conv3/units/4");
    let record = json(&unit.join("diversity.json"));
    assert_eq!(record["images"], serde_json::json!(["diversity-0.png", "diversity-1.png", "diversity-2.png"]));
    assert_eq!(record["objectives"].as_array().unwrap().len(), 3);
    let images: Vec<Vec<u8>> = (0..3).map(|i| read_png(&unit.join(format!("diversity-{i}.png"))).2).collect();
    assert!(images[0] != images[1] && images[1] != images[2]);
    let layer = json(&dir.path().join("atlas/layers/conv3/layer.json"));
    assert_eq!(layer["units"][0]["techniques"]["diversity"]["images"][2], "units/4/diversity-2.png");
    let options = &json(&dir.path().join("atlas/atlas.json"))["settings"]["options"];
    assert_eq!((&options["diversity_penalty"], &options["diversity_weight"]), (&serde_json::json!("relative"), &serde_json::json!(1.0)));
    // lucid's penalty brings lucid's weight, unless the file gives one.
    for (table, weight) in [("penalty = \"lucid\"\n", 100.0), ("penalty = \"lucid\"\nweight = 10\n", 10.0)] {
        let out = dir.path().join("lucid");
        let spec = write(dir.path(), "lucid.toml", &format!("{}layers = [\"conv3\"]\nunits = \"4\"\ntechniques = [\"diversity\"]\nsteps = 2\n[diversity]\n{table}", header(&demo_model())));
        assert_ok(&render_spec(&spec, &["--out", out.to_str().unwrap()]));
        let options = &json(&out.join("atlas.json"))["settings"]["options"];
        assert_eq!((&options["diversity_penalty"], &options["diversity_weight"]), (&serde_json::json!("lucid"), &serde_json::json!(weight)));
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// The documented example runs as written (with a flag making it quick): every technique
/// of docs/techniques.md lands where docs/atlas-format.md says.
#[test]
fn the_documented_example_job_renders() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("atlas");
    let spec = repo().join("docs/examples/demo-job.toml");
    let o = render_spec(&spec, &["--out", &out.to_string_lossy(), "--steps", "8", "--thresholds", "4", "--size", "32"]);
    assert_ok(&o);
    for key in [
        "layers/conv1/units/0/channel.png",
        "layers/conv1/units/0/diversity-3.png",
        "layers/conv1/units/0/channel.step4.png",
        "layers/conv3/units/3/diversity-0.png",
        "layers/conv3/deepdream/noise.png",
        "layers/conv3/caricature/stripes.png",
        "layers/conv3/direction/unit4.png",
        "layers/conv3/direction/unit4.json",
    ] {
        assert!(out.join(key).is_file(), "{key} is missing");
    }
    let direction = json(&out.join("layers/conv3/direction/unit4.json"));
    assert_eq!(direction["settings"]["steps"], 256, "conv3's own steps");
    let atlas = json(&out.join("atlas.json"));
    let techniques: Vec<&str> = atlas["techniques"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(techniques, ["channel", "diversity", "deepdream", "caricature", "direction"]);
}

/// `--color-from-dataset` records the dataset's colour matrix in the settings; without a
/// dataset it is refused.
#[test]
fn the_colour_matrix_comes_from_the_dataset() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("atlas");
    let dataset = repo().join("tests/fixtures/dataset/images");
    let base = ["--layers", "conv1", "--units", "0", "--techniques", "channel", "--steps", "4", "--size", "16", "--device", "cpu", "--color-from-dataset"];
    let o = render(&demo_model(), &out, &base);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("needs a dataset"), "{}", String::from_utf8_lossy(&o.stderr));
    let mut args = base.to_vec();
    let dataset = dataset.to_string_lossy();
    args.extend(["--dataset", &dataset, "--examples", "2"]);
    assert_ok(&render(&demo_model(), &out, &args));
    let m = &json(&out.join("atlas.json"))["settings"]["param"]["color_matrix"];
    let m: Vec<Vec<f64>> = serde_json::from_value(m.clone()).unwrap();
    // The fixture images' matrix (dataset/src/color.rs), not lucid's ImageNet one.
    assert!((m[0][0] - 0.1476).abs() < 1e-3 && (m[1][2] + 0.1774).abs() < 1e-3, "{m:?}");
}

/// MACO with its magnitude from the dataset, a crop schedule and noise, from the job
/// file: recorded in the settings, and a flag `--param maco` does the same as the table.
#[test]
fn a_spec_file_selects_maco_crops_and_noise() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = repo().join("tests/fixtures/dataset/images");
    let spec = write(
        dir.path(),
        "job.toml",
        &format!(
            "{}layers = [\"conv1\"]\nunits = \"0\"\ntechniques = [\"channel\"]\nsteps = 4\nlearning_rate = 1.0\n\
             [param]\nmaco = true\nmagnitude_from_dataset = true\n\
             [transforms]\ncrop = {{ start = 0.9, end = 0.5 }}\nnoise = 0.05\n\
             [dataset]\nuri = {:?}\nexamples = 2\nconnections = false\n",
            header(&demo_model()),
            dataset.to_string_lossy()
        ),
    );
    assert_ok(&render_spec(&spec, &[]));
    let settings = &json(&dir.path().join("atlas/atlas.json"))["settings"];
    assert_eq!(settings["param"]["maco"], true);
    let magnitude: Vec<Vec<f64>> = serde_json::from_value(settings["param"]["magnitude"].clone()).unwrap();
    assert_eq!((magnitude.len(), magnitude[0].len()), (3, 64));
    assert!(magnitude.iter().all(|row| row[1] > row[32] && row[32] > 0.0), "natural images' amplitude falls with frequency: {magnitude:?}");
    assert_eq!(settings["transforms"]["crop"], serde_json::json!({ "start": 0.9, "end": 0.5 }));
    assert!((settings["transforms"]["noise"].as_f64().unwrap() - 0.05).abs() < 1e-6);
    assert!(dir.path().join("atlas/layers/conv1/units/0/channel.png").exists());

    let out = dir.path().join("flag");
    assert_ok(&render(&demo_model(), &out, &["--layers", "conv1", "--units", "0", "--techniques", "channel", "--steps", "2", "--size", "16", "--device", "cpu", "--param", "maco"]));
    let param = &json(&out.join("atlas.json"))["settings"]["param"];
    assert_eq!((&param["kind"], &param["maco"]), (&serde_json::json!("fft"), &serde_json::json!(true)));
    assert!(param.get("magnitude").is_none(), "without a dataset, the 1/f magnitude: nothing recorded");
}
