//! The worker's model cache (`tasks::local_model`) against a real S3 server (s3s-fs),
//! configured through the environment as workers are. Its own test binary: the
//! environment it sets affects no other test, and its tests take turns with it.

use std::path::{Path, PathBuf};

use loupe_core::spec::{ModelRef, RenderSettings, Technique};
use loupe_core::task::{JobContext, Lease, LeaseId, LeaseSecret, TaskSpec, Work};
use loupe_testsupport::S3Server;
use loupe_worker::tasks::local_model;

/// The tests set the process's environment to their own server, so they run one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An S3 server holding the demo model at `s3://models/demo.pt`, and the model's bytes.
fn server_with_demo_model() -> (S3Server, Vec<u8>) {
    let server = S3Server::start(&["models"]);
    for (k, v) in server.env() {
        std::env::set_var(k, v);
    }
    let bytes = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/demo/demo.pt")).unwrap();
    std::fs::write(server.root.path().join("models/demo.pt"), &bytes).unwrap();
    (server, bytes)
}

/// A render task's lease of the model at `s3://models/demo.pt`.
fn lease(bytes: &[u8]) -> Lease {
    let model = ModelRef { uri: "s3://models/demo.pt".into(), name: "demo".into(), sha256: loupe_core::sha256_bytes(bytes) };
    let job_id = "job-1".parse().unwrap();
    Lease {
        lease_id: LeaseId::new(&job_id, 0, 1, LeaseSecret::random()),
        task: TaskSpec { job_id, index: 0, work: Work::render("logits", Technique::Channel, [0u32]) },
        attempt: 1,
        ttl_ms: 60_000,
        max_ms: 3_600_000,
        job: JobContext { model, settings: RenderSettings::default(), out: "unused".into(), dataset: None, layers: Vec::new() },
    }
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

/// A truncated file under the model's digest (a full disk, a crash before the rename
/// reached the disk) is found on first use, and the model fetched again over it.
#[tokio::test]
async fn a_corrupt_cached_model_is_fetched_again() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (_server, bytes) = server_with_demo_model();
    let lease = lease(&bytes);
    let cache = tempfile::tempdir().unwrap();
    let cached = cache.path().join(format!("{}.pt", lease.job.model.sha256));
    std::fs::write(&cached, &bytes[..bytes.len() / 2]).unwrap();

    let path = local_model(&lease, cache.path()).await.unwrap();
    assert_eq!(path, cached);
    assert!(std::fs::read(&path).unwrap() == bytes, "the task got the truncated cached file, not the model");
    assert_eq!(files_in(cache.path()), vec![cached], "the cache holds the model and nothing else");
}

/// In-process workers (one process id: `loupe render --workers N`) fetching one model at
/// once each get it whole, and leave no temporary file behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_in_one_process_fetch_one_model_at_once() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (_server, bytes) = server_with_demo_model();
    let lease = std::sync::Arc::new(lease(&bytes));
    let cache = tempfile::tempdir().unwrap();
    for round in 0..5 {
        let mut fetches = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (lease, dir) = (lease.clone(), cache.path().join(format!("round-{round}")));
            fetches.spawn(async move { local_model(&lease, &dir).await });
        }
        while let Some(fetched) = fetches.join_next().await {
            let path = fetched.unwrap().unwrap_or_else(|e| panic!("round {round}: a worker's fetch failed: {e}"));
            assert!(std::fs::read(&path).unwrap() == bytes, "round {round}: a worker got a damaged model");
        }
        let dir = cache.path().join(format!("round-{round}"));
        assert_eq!(files_in(&dir), vec![dir.join(format!("{}.pt", lease.job.model.sha256))], "round {round}: only the model is left");
    }
}

#[test]
fn a_model_cache_that_cannot_be_written_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    loupe_worker::tasks::check_model_cache(&dir.path().join("models")).unwrap();
    assert!(files_in(&dir.path().join("models")).is_empty(), "the check left a file behind");

    // Under a regular file: no directory can be made there, even by root (the tests may
    // run as root, which file modes would not stop).
    let file = dir.path().join("not-a-directory");
    std::fs::write(&file, b"").unwrap();
    let err = loupe_worker::tasks::check_model_cache(&file.join("models")).unwrap_err().to_string();
    assert!(err.contains("not-a-directory/models") && err.contains("cannot be written"), "{err}");
}
