//! The cluster end to end: real Redis, S3, coordinator, workers and CLI processes. No
//! test sleeps for a fixed time to pass; each waits on a condition with a deadline.

use std::time::Duration;

use loupe_e2e::*;

const JOB: &[&str] = &["--steps", "40", "--size", "16", "--batch", "4"];
/// Long enough per task that processes can be killed in the middle of one.
const SLOW_JOB: &[&str] = &["--steps", "200", "--size", "16", "--batch", "1", "--techniques", "channel,negative"];

fn tiny(c: &Cluster, rt: &tokio::runtime::Runtime) -> String {
    let fixtures = repo().join("tests/fixtures");
    c.upload_model(rt, &fixtures.join("tiny.json"), "tiny.json");
    c.upload_model(rt, &fixtures.join("tiny.pt"), "tiny.pt")
}

fn submit(c: &Cluster, model: &str, out: &str, job: &[&str]) -> String {
    let mut args = vec!["submit", "--model", model, "--out", out];
    args.extend_from_slice(job);
    let o = c.loupe(&args);
    assert_ok(&o);
    stdout(&o)
}

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
    let model = tiny(&c, &rt);
    c.start_worker();
    c.start_worker();
    let job = submit(&c, &model, "s3://atlas/run1", JOB);
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
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    out
}

#[test]
fn a_worker_killed_mid_task_loses_and_duplicates_nothing() {
    let _one = serial();
    let rt = runtime();
    let mut c = Cluster::start(None);
    let model = tiny(&c, &rt);
    let victim = c.start_worker();
    c.start_worker();
    let job = submit(&c, &model, "s3://atlas/kill", SLOW_JOB);
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
    let model = tiny(&c, &rt);
    c.start_worker();
    let job = submit(&c, &model, "s3://atlas/restart", SLOW_JOB);
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
    let model = tiny(&c, &rt);
    c.start_worker();
    let job = submit(&c, &model, "s3://atlas/redis", SLOW_JOB);
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
    let model = tiny(&c, &rt);
    c.start_worker();
    let job = submit(&c, &model, "s3://atlas/cancel", &["--steps", "3000", "--size", "16", "--batch", "1"]);
    wait_for("a task to start", Duration::from_secs(60), || c.read_log("worker-0").contains("task leased"));
    let o = c.loupe(&["cancel", &job]);
    assert_ok(&o);
    assert!(stdout(&o).contains("cancelled"));
    let o = c.loupe(&["watch", &job]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("was cancelled"), "{}", stderr(&o));
    // The worker learns it at its next heartbeat and drops the task.
    wait_for("the worker to stop the task", Duration::from_secs(30), || c.read_log("worker-0").contains("lease ended; stopping the task"));
    assert!(records(&c, &rt, "cancel/").len() < 21);
}

#[test]
fn a_bad_model_fails_the_job_with_the_model_error_in_status() {
    let _one = serial();
    let rt = runtime();
    let mut c = Cluster::start(None);
    let model = tiny(&c, &rt);
    let job = submit(&c, &model, "s3://atlas/bad", JOB);
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
    let model = tiny(&c, &rt);
    let o = c.loupe(&["submit", "--model", &model, "--out", "s3://atlas/x", "--steps", "0"]);
    assert!(!o.status.success() && stderr(&o).contains("--steps must be at least 1"), "{}", stderr(&o));
    let o = c.loupe(&["submit", "--model", &model, "--out", "s3://atlas/x", "--layers", "conv", "--units", "0..9"]);
    assert!(!o.status.success() && stderr(&o).contains("out of range"), "{}", stderr(&o));
    let o = c.loupe(&["submit", "--model", "s3://models/missing.pt", "--out", "s3://atlas/x"]);
    assert!(!o.status.success() && stderr(&o).contains("does not exist"), "{}", stderr(&o));
}

#[test]
fn a_wrong_or_missing_token_is_refused() {
    let _one = serial();
    let rt = runtime();
    let mut c = Cluster::start(Some("s3cret-token"));
    let _model = tiny(&c, &rt);
    let o = c.loupe(&["jobs"]);
    assert_ok(&o);

    std::fs::write(c.dir.path().join("token"), "wrong").unwrap();
    let o = c.loupe(&["jobs"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("Unauthenticated"), "{}", stderr(&o));
    let o = std::process::Command::new(binary("loupe")).args(["jobs", "--coordinator", &c.url()]).output().unwrap();
    assert!(!o.status.success() && stderr(&o).contains("bearer token is required"), "{}", stderr(&o));

    // A worker with the wrong token stops with the refusal instead of retrying forever.
    let w = c.start_worker();
    let status = c.workers[w].wait().unwrap();
    assert!(!status.success());
    assert!(c.read_log(&format!("worker-{w}")).contains("refused"), "{}", c.read_log(&format!("worker-{w}")));
    std::fs::write(c.dir.path().join("token"), "s3cret-token").unwrap();
    assert!(!c.read_log("coordinator").contains("s3cret-token"), "the token never reaches a log");
}
