//! The cluster end to end: real Redis, S3, coordinator, workers and CLI processes. No
//! test sleeps for a fixed time to pass; each waits on a condition with a deadline.

use std::time::Duration;

use loupe_e2e::*;

const JOB: &[&str] = &["--steps", "40", "--size", "16", "--batch", "4"];
/// Long enough per task that processes can be killed in the middle of one.
const SLOW_JOB: &[&str] = &["--steps", "200", "--size", "16", "--batch", "1", "--techniques", "channel,negative"];

fn records(c: &Cluster, rt: &tokio::runtime::Runtime, prefix: &str) -> Vec<String> {
    c.list(rt, "atlas", prefix).into_iter().filter(|k| k.contains("/units/") && k.ends_with(".json")).collect()
}

/// Every image of the job is in S3 exactly once, whole, with its record.
fn assert_complete_atlas(c: &Cluster, rt: &tokio::runtime::Runtime, prefix: &str, images: usize) {
    let keys = c.list(rt, "atlas", prefix);
    let pngs: Vec<&String> = keys.iter().filter(|k| k.ends_with(".png")).collect();
    assert_eq!(pngs.len(), images, "one PNG per image: {keys:?}");
    assert_eq!(records(c, rt, prefix).len(), images, "one record per image");
    for k in pngs {
        assert_eq!(decode_png(&c.get(rt, "atlas", k)), (16, 16), "{k}");
    }
    assert!(keys.iter().all(|k| !k.contains("tmp")), "no temporary objects: {keys:?}");
}

#[test]
fn a_job_lands_in_s3_with_the_layout_loupe_render_writes_locally() {
    let _one = serial();
    let rt = runtime();
    let mut c = Cluster::start(None);
    let model = c.upload_tiny(&rt);
    c.start_worker();
    c.start_worker();
    let job = c.submit(&model, "s3://atlas/run1", JOB);
    let o = c.loupe(&["watch", &job]);
    assert_ok(&o);
    assert!(stdout(&o).contains("succeeded"), "{}", stdout(&o));

    // The same job rendered locally: the same keys, and the same PNG bytes.
    let local = tempfile::tempdir().unwrap();
    let mut args = vec!["render", "--model", "tests/fixtures/tiny.pt", "--device", "cpu", "--out"];
    let out = local.path().join("atlas");
    let out_s = out.to_string_lossy().into_owned();
    args.push(&out_s);
    args.extend_from_slice(JOB);
    let o = std::process::Command::new(binary("loupe")).current_dir(repo()).args(&args).output().unwrap();
    assert_ok(&o);
    let mut local_keys: Vec<String> = walk(&out).into_iter().collect();
    local_keys.sort();
    let s3_keys: Vec<String> = c.list(&rt, "atlas", "run1/").into_iter().map(|k| k.trim_start_matches("run1/").to_string()).collect();
    assert_eq!(s3_keys, local_keys);
    for k in local_keys.iter().filter(|k| k.ends_with(".png")) {
        assert_eq!(c.get(&rt, "atlas", &format!("run1/{k}")), std::fs::read(out.join(k)).unwrap(), "{k} differs from the local render");
    }
    let atlas: serde_json::Value = serde_json::from_slice(&c.get(&rt, "atlas", "run1/atlas.json")).unwrap();
    assert_eq!(atlas["layers"].as_array().unwrap().len(), 2);
    let layer: serde_json::Value = serde_json::from_slice(&c.get(&rt, "atlas", "run1/layers/conv/layer.json")).unwrap();
    assert_eq!(layer["units"].as_array().unwrap().len(), 4);

    let o = c.loupe(&["jobs"]);
    assert_ok(&o);
    assert!(stdout(&o).contains(&job) && stdout(&o).contains("succeeded"), "{}", stdout(&o));

    // `loupe serve` reads the atlas and its viewer through from S3.
    let served = loupe_testsupport::Served::new(
        std::process::Command::new(binary("loupe"))
            .args(["serve", "s3://atlas/run1", "--listen", "127.0.0.1:0"])
            .envs(c.s3.env())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (_, head, body) = served.get("/atlas.json");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, c.get(&rt, "atlas", "run1/atlas.json"));
    let (_, head, body) = served.get("/");
    assert!(head.starts_with("HTTP/1.1 200") && head.contains("text/html"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("viewer.js"));
    assert!(served.get("/../run1/atlas.json").1.starts_with("HTTP/1.1 400"));
}

/// Every technique through the cluster (job file, the protocol, S3 input images) gives the
/// keys and PNG bytes of the same job rendered locally.
#[test]
fn every_technique_renders_on_the_cluster_as_it_does_locally() {
    let _one = serial();
    let rt = runtime();
    let mut c = Cluster::start(None);
    let model = c.upload_tiny(&rt);
    let input = repo().join("tests/fixtures/dataset/images/stripes-045.jpg");
    let input_uri = c.upload_model(&rt, &input, "inputs/stripes.jpg");
    c.start_worker();
    let dir = tempfile::tempdir().unwrap();
    let job = |model: &str, input: &str| {
        format!(
            "model = {model:?}\nunits = \"0..2\"\ntechniques = [\"channel\", \"diversity\", \"deepdream\", \"caricature\", \"direction\"]\n\
             steps = 12\nsize = 16\nbatch = 4\nthresholds = [6]\ndead_units = \"reseed\"\n\
             [diversity]\nimages = 2\n[caricature]\ninputs = [{{ name = \"stripes\", uri = {input:?} }}]\n\
             [[directions]]\nname = \"mix\"\nlayer = \"conv\"\nvector = [1.0, -0.5, 0.0, 0.25]\n\
             [[directions]]\nname = \"top\"\nlayer = \"logits\"\nvector = [0.0, 1.0, 0.0]\n"
        )
    };
    let cluster_spec = dir.path().join("cluster.toml");
    std::fs::write(&cluster_spec, job(&model, &input_uri)).unwrap();
    let o = c.loupe(&["submit", "--spec", &cluster_spec.to_string_lossy(), "--out", "s3://atlas/all"]);
    assert_ok(&o);
    let o = c.loupe(&["watch", &stdout(&o)]);
    assert_ok(&o);
    assert!(stdout(&o).contains("succeeded"), "{}", stdout(&o));

    let local_spec = dir.path().join("local.toml");
    std::fs::write(&local_spec, job(&repo().join("tests/fixtures/tiny.pt").to_string_lossy(), &input.to_string_lossy())).unwrap();
    let out = dir.path().join("atlas");
    let o = std::process::Command::new(binary("loupe"))
        .args(["render", "--device", "cpu", "--spec", &local_spec.to_string_lossy(), "--out", &out.to_string_lossy()])
        .output()
        .unwrap();
    assert_ok(&o);
    let mut local_keys = walk(&out);
    local_keys.sort();
    let s3_keys: Vec<String> = c.list(&rt, "atlas", "all/").into_iter().map(|k| k.trim_start_matches("all/").to_string()).collect();
    // Job manifests are named by their job, whose input URIs differ here.
    let atlas_keys = |keys: &[String]| keys.iter().filter(|k| !k.starts_with("jobs/")).cloned().collect::<Vec<_>>();
    assert_eq!(atlas_keys(&s3_keys), atlas_keys(&local_keys));
    for key in ["layers/conv/deepdream/noise.png", "layers/conv/caricature/stripes.step6.png", "layers/logits/direction/top.png", "layers/conv/units/1/diversity-1.png"] {
        assert!(local_keys.iter().any(|k| k == key), "{key} is missing: {local_keys:?}");
    }
    for k in local_keys.iter().filter(|k| k.ends_with(".png")) {
        assert_eq!(c.get(&rt, "atlas", &format!("all/{k}")), std::fs::read(out.join(k)).unwrap(), "{k} differs from the local render");
    }
}

#[test]
fn a_worker_killed_mid_task_loses_and_duplicates_nothing() {
    let _one = serial();
    let rt = runtime();
    let mut c = Cluster::start(None);
    let model = c.upload_tiny(&rt);
    let victim = c.start_worker();
    c.start_worker();
    let job = c.submit(&model, "s3://atlas/kill", SLOW_JOB);
    // Once the first images exist, the workers are busy: kill one in its task.
    wait_for("first images", Duration::from_secs(120), || records(&c, &rt, "kill/").len() >= 2);
    c.kill_worker(victim);
    let o = c.loupe(&["watch", &job]);
    assert_ok(&o);
    assert_complete_atlas(&c, &rt, "kill/", 14);
}

#[test]
fn a_coordinator_restarted_mid_job_resumes_it_from_redis() {
    let _one = serial();
    let rt = runtime();
    let mut c = Cluster::start(None);
    let model = c.upload_tiny(&rt);
    c.start_worker();
    let job = c.submit(&model, "s3://atlas/restart", SLOW_JOB);
    wait_for("first images", Duration::from_secs(120), || !records(&c, &rt, "restart/").is_empty());
    c.kill_coordinator();
    c.start_coordinator();
    let o = c.loupe(&["watch", &job]);
    assert_ok(&o);
    assert_complete_atlas(&c, &rt, "restart/", 14);
}

#[test]
fn redis_restarted_mid_job_never_hangs_the_job() {
    let _one = serial();
    let rt = runtime();
    let mut c = Cluster::start(None);
    let model = c.upload_tiny(&rt);
    c.start_worker();
    let job = c.submit(&model, "s3://atlas/redis", SLOW_JOB);
    wait_for("first images", Duration::from_secs(120), || !records(&c, &rt, "redis/").is_empty());
    c.redis.restart();
    // With AOF every write survives, so the job completes.
    let o = c.loupe(&["watch", &job]);
    assert_ok(&o);
    assert_complete_atlas(&c, &rt, "redis/", 14);
}

#[test]
fn a_cancelled_job_stops_its_workers() {
    let _one = serial();
    let rt = runtime();
    let mut c = Cluster::start(None);
    let model = c.upload_tiny(&rt);
    c.start_worker();
    // Tasks of 20,000 steps (about 19 s each on an idle machine) span several lease
    // renewals, so the worker is mid-task when it learns of the cancel, however fast the
    // machine.
    let job = c.submit(&model, "s3://atlas/cancel", &["--steps", "20000", "--size", "16", "--batch", "1"]);
    wait_for("a task to start", Duration::from_secs(60), || c.read_log("worker-0").contains("task leased"));
    let o = c.loupe(&["cancel", &job]);
    assert_ok(&o);
    assert!(stdout(&o).contains("cancelled"));
    let o = c.loupe(&["watch", &job]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("was cancelled"), "{}", stderr(&o));
    // The worker learns it at its next heartbeat and drops the task.
    wait_for("the worker to stop the task", Duration::from_secs(60), || c.read_log("worker-0").contains("lease ended; stopping the task"));
    assert!(records(&c, &rt, "cancel/").len() < 21);
}

#[test]
fn a_bad_model_fails_the_job_with_the_model_error_in_status() {
    let _one = serial();
    let rt = runtime();
    let mut c = Cluster::start(None);
    let model = c.upload_tiny(&rt);
    let job = c.submit(&model, "s3://atlas/bad", JOB);
    // The model is replaced after submission; the workers must refuse what they fetch.
    c.upload_model(&rt, &repo().join("tests/fixtures/not_torchscript.pt"), "tiny.pt");
    c.start_worker();
    let o = c.loupe(&["watch", &job]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("sha256"), "{}", stderr(&o));
    let o = c.loupe(&["status", &job]);
    assert_ok(&o);
    assert!(stdout(&o).contains("failed") && stdout(&o).contains("but the job was submitted with"), "{}", stdout(&o));
}

#[test]
fn a_submit_with_bad_settings_or_model_is_refused() {
    let _one = serial();
    let rt = runtime();
    let c = Cluster::start(None);
    let model = c.upload_tiny(&rt);
    let o = c.loupe(&["submit", "--model", &model, "--out", "s3://atlas/x", "--steps", "0"]);
    assert!(!o.status.success() && stderr(&o).contains("--steps must be at least 1"), "{}", stderr(&o));
    let o = c.loupe(&["submit", "--model", &model, "--out", "s3://atlas/x", "--layers", "conv", "--units", "0..9"]);
    assert!(!o.status.success() && stderr(&o).contains("out of range"), "{}", stderr(&o));
    let o = c.loupe(&["submit", "--model", "s3://models/missing.pt", "--out", "s3://atlas/x"]);
    assert!(!o.status.success() && stderr(&o).contains("does not exist"), "{}", stderr(&o));
}

/// Users hold the user token, workers the worker token; each opens only its own service.
#[test]
fn each_credential_opens_only_its_own_service() {
    let _one = serial();
    let rt = runtime();
    let mut c = Cluster::start(Some(TOKENS));
    let _model = c.upload_tiny(&rt);
    let o = c.loupe(&["jobs"]);
    assert_ok(&o);

    // The worker token does not open the Jobs service; a wrong or missing one neither.
    for (given, why) in [(TOKENS.worker, "takes the user token"), ("wrong", "takes the user token")] {
        std::fs::write(c.user_token_file(), given).unwrap();
        let o = c.loupe(&["jobs"]);
        assert!(!o.status.success(), "{given}");
        assert!(stderr(&o).contains("Unauthenticated") && stderr(&o).contains(why), "{given}: {}", stderr(&o));
    }
    let o = std::process::Command::new(binary("loupe")).args(["jobs", "--coordinator", &c.url()]).output().unwrap();
    assert!(!o.status.success() && stderr(&o).contains("bearer token is required"), "{}", stderr(&o));

    // A worker holding the user token stops with the refusal instead of retrying forever.
    std::fs::write(c.worker_token_file(), TOKENS.user).unwrap();
    let w = c.start_worker();
    let status = c.workers[w].wait().unwrap();
    assert!(!status.success());
    let log = c.read_log(&format!("worker-{w}"));
    assert!(log.contains("refused") && log.contains("takes the worker token"), "{log}");
    let coordinator_log = c.read_log("coordinator");
    assert!(!coordinator_log.contains(TOKENS.user) && !coordinator_log.contains(TOKENS.worker), "no token reaches a log");
}

/// The dataset of tools/make_test_dataset.py, 13 times over (312 images and the broken
/// one), written locally and uploaded to `s3://models/dataset/` under the same keys:
/// maps of 150 images take long enough to be killed in.
fn big_dataset(c: &Cluster, rt: &tokio::runtime::Runtime, local: &std::path::Path) {
    let src = repo().join("tests/fixtures/dataset/images");
    let client = c.s3_client();
    for copy in 0..13 {
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name == "broken.png" && copy > 0 {
                continue;
            }
            let key = format!("copy-{copy:02}/{name}");
            let bytes = std::fs::read(&path).unwrap();
            std::fs::create_dir_all(local.join(format!("copy-{copy:02}"))).unwrap();
            std::fs::write(local.join(&key), &bytes).unwrap();
            rt.block_on(client.put_object().bucket("models").key(format!("dataset/{key}")).body(bytes.into()).send()).unwrap();
        }
    }
}

#[test]
fn a_worker_killed_during_a_map_task_still_gives_exact_statistics() {
    let _one = serial();
    let rt = runtime();
    let mut c = Cluster::start(None);
    let demo = repo().join("models/demo");
    c.upload_model(&rt, &demo.join("demo.json"), "demo.json");
    let model = c.upload_model(&rt, &demo.join("demo.pt"), "demo.pt");
    let local = tempfile::tempdir().unwrap();
    big_dataset(&c, &rt, &local.path().join("dataset"));
    const DATASET_JOB: &[&str] =
        &["--layers", "logits,conv3", "--techniques", "channel", "--steps", "2", "--size", "16", "--examples", "3", "--images-per-shard", "150"];

    let victim = c.start_worker();
    let mut job = DATASET_JOB.to_vec();
    job.extend_from_slice(&["--dataset", "s3://models/dataset/"]);
    let id = c.submit(&model, "s3://atlas/ds", &job);
    wait_for("the first worker to lease a map", Duration::from_secs(120), || {
        c.read_log(&format!("worker-{victim}")).lines().any(|l| l.contains("task leased") && l.contains("map"))
    });
    c.kill_worker(victim);
    c.start_worker();
    let o = c.loupe(&["watch", &id]);
    assert_ok(&o);

    // The same job rendered locally over the same files, with no crash.
    let out = local.path().join("atlas");
    let dataset = local.path().join("dataset");
    let mut args = vec!["render".to_string(), "--model".into(), demo.join("demo.pt").to_string_lossy().into_owned()];
    args.extend(["--device", "cpu", "--out"].map(String::from));
    args.push(out.to_string_lossy().into_owned());
    args.extend(DATASET_JOB.iter().map(|s| s.to_string()));
    args.extend(["--dataset".to_string(), dataset.to_string_lossy().into_owned()]);
    let o = std::process::Command::new(binary("loupe")).args(&args).output().unwrap();
    assert_ok(&o);
    for layer in ["logits", "conv3"] {
        // connections.parquet: conv3 -> logits, both directions.
        for file in ["stats.parquet", "connections.parquet", "skipped.json"] {
            let key = format!("layers/{layer}/{file}");
            assert!(c.get(&rt, "atlas", &format!("ds/{key}")) == std::fs::read(out.join(&key)).unwrap(), "{key} differs after the kill");
        }
        let s3: serde_json::Value = serde_json::from_slice(&c.get(&rt, "atlas", &format!("ds/layers/{layer}/examples.json"))).unwrap();
        let here: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join(format!("layers/{layer}/examples.json"))).unwrap()).unwrap();
        assert_eq!(s3["units"], here["units"], "{layer}: examples differ after the kill");
        assert_eq!(s3["dataset"]["images"], 312);
        assert_eq!(s3["dataset"]["images_skipped"], 1);
    }
}
