//! What a cluster operator relies on: Prometheus metrics and readiness on both processes,
//! a worker that hands its task back on SIGTERM, and TLS with tokens between the CLI,
//! the workers and the coordinator. Real processes; no fixed sleeps.

use std::time::Duration;

use loupe_e2e::*;

/// `GET path` on a loopback port; status 0 while nothing listens there yet.
fn get(port: u16, path: &str) -> (u16, String) {
    if std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        return (0, String::new());
    }
    let (status, _, body) = http_get(&format!("127.0.0.1:{port}"), path);
    (status, String::from_utf8(body).unwrap())
}

/// The value of the sample `series` (name with labels, exactly as exposed).
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no sample {series} in\n{metrics}"))
        .parse()
        .unwrap()
}

#[test]
fn metrics_readiness_and_a_worker_that_hands_its_task_back_on_sigterm() {
    let _one = serial();
    let rt = runtime();
    let mut c = Cluster::start(Some(TOKENS));
    let model = c.upload_tiny(&rt);
    wait_for("the coordinator to be ready", Duration::from_secs(60), || get(c.metrics_port, "/readyz").0 == 200);
    assert_eq!(get(c.metrics_port, "/healthz").0, 200);

    // Two tasks, each long enough to be interrupted.
    let job = c.submit(&model, "s3://atlas/ops", &["--layers", "conv", "--units", "0..2", "--steps", "3000", "--size", "16", "--batch", "1", "--techniques", "channel"]);
    let first = c.start_worker();
    wait_for("the worker to be ready", Duration::from_secs(60), || get(c.worker_metrics_ports[first], "/readyz").0 == 200);
    wait_for("the worker to lease a task", Duration::from_secs(60), || c.read_log("worker-0").contains("task leased"));
    let status = std::process::Command::new("kill").args(["-TERM", &c.workers[first].id().to_string()]).status().unwrap();
    assert!(status.success());
    let exited = c.workers[first].wait().unwrap();
    assert!(exited.success(), "a worker told to stop exits cleanly: {exited:?}\n{}", c.read_log("worker-0"));
    assert!(c.read_log("worker-0").contains("handed back"), "{}", c.read_log("worker-0"));

    let second = c.start_worker();
    let o = c.loupe(&["watch", &job]);
    assert_ok(&o);
    assert!(stdout(&o).contains("succeeded"), "{}", stdout(&o));

    let (status, m) = get(c.metrics_port, "/metrics");
    assert_eq!(status, 200);
    assert_eq!(sample(&m, "loupe_state_store_up"), 1.0);
    assert_eq!(sample(&m, r#"loupe_jobs{state="succeeded"}"#), 1.0);
    assert_eq!(sample(&m, r#"loupe_jobs{state="running"}"#), 0.0);
    assert_eq!(sample(&m, r#"loupe_tasks{state="queued"}"#), 0.0);
    assert_eq!(sample(&m, r#"loupe_tasks{state="leased"}"#), 0.0);
    assert_eq!(sample(&m, "loupe_units_rendered_total"), 2.0);
    // The handed-back task is neither a failure nor a retry (it used no attempt); no
    // lease ran out.
    assert_eq!(sample(&m, "loupe_task_failures_total"), 0.0, "{m}");
    assert_eq!(sample(&m, "loupe_task_retries_total"), 0.0);
    assert_eq!(sample(&m, "loupe_lease_expiries_total"), 0.0);

    let (status, w) = get(c.worker_metrics_ports[second], "/metrics");
    assert_eq!(status, 200);
    assert_eq!(sample(&w, "loupe_worker_registered"), 1.0);
    assert_eq!(sample(&w, r#"loupe_worker_tasks_total{kind="render",outcome="done"}"#), 2.0, "{w}");
    assert_eq!(sample(&w, "loupe_worker_units_rendered_total"), 2.0);
    assert!(sample(&w, "loupe_worker_units_per_second") > 0.0);
    assert!(sample(&w, "loupe_worker_step_seconds") > 0.0);
    assert_eq!(sample(&w, r#"loupe_worker_device_info{device="cpu",gpu="cpu"}"#), 1.0);

    // Readiness follows the state store; liveness does not.
    c.redis.kill();
    wait_for("the coordinator to report not ready", Duration::from_secs(60), || get(c.metrics_port, "/readyz").0 == 503);
    assert_eq!(get(c.metrics_port, "/healthz").0, 200);
    assert_eq!(sample(&get(c.metrics_port, "/metrics").1, "loupe_state_store_up"), 0.0);
    c.redis.start_again();
    wait_for("the coordinator to be ready again", Duration::from_secs(60), || get(c.metrics_port, "/readyz").0 == 200);
}

#[test]
fn the_cli_and_workers_reach_a_tls_coordinator_with_its_ca_and_token() {
    let _one = serial();
    let rt = runtime();
    let mut c = Cluster::start_with(Some(TOKENS), true);
    let model = c.upload_tiny(&rt);
    c.start_worker();
    let job = c.submit(&model, "s3://atlas/tls", &["--steps", "20", "--size", "16"]);
    let o = c.loupe(&["watch", &job]);
    assert_ok(&o);
    assert!(stdout(&o).contains("succeeded"), "{}", stdout(&o));

    // Without the CA the certificate is not trusted; plaintext gets no answer; a name the
    // certificate does not carry is refused.
    let tls = c.tls.as_ref().unwrap();
    let ca = tls.ca.to_string_lossy().into_owned();
    let token = c.user_token_file().to_string_lossy().into_owned();
    let url = c.url();
    let plain = url.replace("https://", "http://");
    for (why, args) in [
        ("no CA", vec!["jobs", "--coordinator", &url, "--token-file", &token]),
        ("plaintext", vec!["jobs", "--coordinator", &plain, "--token-file", &token]),
        ("wrong name", vec!["jobs", "--coordinator", &url, "--token-file", &token, "--tls-ca", &ca, "--tls-domain", "elsewhere"]),
    ] {
        let o = std::process::Command::new(binary("loupe")).args(&args).env_remove("LOUPE_TLS_CA").output().unwrap();
        assert!(!o.status.success(), "{why}: {}", stdout(&o));
        assert!(!stdout(&o).contains(&job), "{why}");
    }
    // With the CA but without the token: refused by the coordinator.
    let o = std::process::Command::new(binary("loupe")).args(["jobs", "--coordinator", &url, "--tls-ca", &ca]).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("bearer token"), "{}", stderr(&o));
    // And a --tls-ca with an http:// URL is a mistake worth naming.
    let o = std::process::Command::new(binary("loupe")).args(["jobs", "--coordinator", &plain, "--tls-ca", &ca]).output().unwrap();
    assert!(stderr(&o).contains("https://"), "{}", stderr(&o));
}

/// Secure by default: a coordinator given no tokens, one token, or one token for both
/// services refuses to start and says what it needs; --insecure-no-auth is the explicit
/// way to serve anyone.
#[test]
fn a_coordinator_without_two_distinct_tokens_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let (user, worker) = (dir.path().join("user"), dir.path().join("worker"));
    std::fs::write(&user, TOKENS.user).unwrap();
    std::fs::write(&worker, TOKENS.user).unwrap();
    let (user, worker) = (user.to_string_lossy().into_owned(), worker.to_string_lossy().into_owned());
    for (args, says) in [
        (vec![], "--user-token-file and --worker-token-file"),
        (vec!["--user-token-file", &user], "--insecure-no-auth"),
        (vec!["--user-token-file", &user, "--worker-token-file", &worker], "the same token"),
        (vec!["--insecure-no-auth", "--user-token-file", &user], "cannot be used with"),
    ] {
        let o = std::process::Command::new(binary("loupe-coordinator"))
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--input-prefix", "s3://models"])
            .args(&args)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?} started");
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).contains(TOKENS.user), "{args:?}: the error shows the token: {}", stderr(&o));
    }
}

/// A Redis URL carries its password; what the coordinator says of it never does.
#[test]
fn the_coordinator_never_shows_the_redis_password() {
    let url = format!("redis://:s3cret-pass@127.0.0.1:{}/0", free_port());
    let o = std::process::Command::new(binary("loupe-coordinator"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--input-prefix", "s3://models", "--insecure-no-auth", "--state", &url])
        .output()
        .unwrap();
    assert!(!o.status.success(), "nothing listens there");
    assert!(stderr(&o).contains("redis://:***@127.0.0.1"), "the error names the Redis: {}", stderr(&o));
    assert!(!stderr(&o).contains("s3cret-pass"), "{}", stderr(&o));
}
