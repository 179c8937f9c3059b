//! A whole cluster for end-to-end tests: Redis, an S3 server, the coordinator and worker
//! binaries, and the `loupe` CLI, all real processes on loopback ports.
//!
//! The binaries are the workspace's own (`cargo build --release --bins`, which `make test`
//! runs first), found next to the test executable.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
pub use loupe_testsupport::{free_port, http_get, wait_for, RedisServer, S3Server};

/// The tests share two cores: one cluster at a time.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A workspace binary, built beside this test.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join(name);
    assert!(path.is_file(), "{} is missing: run `cargo build --release --bins` first (make test does)", path.display());
    path
}

/// A test CA and a coordinator certificate it signed, for `127.0.0.1` and
/// `loupe-coordinator`, made with the `openssl` command.
pub struct TestTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestTls {
    pub fn make(dir: &Path) -> TestTls {
        let run = |args: &[&str]| {
            let o = Command::new("openssl").args(args).current_dir(dir).output().expect("running openssl (apt-get install openssl)");
            assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        run(&[&["req", "-x509"][..], &ec, &["-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=loupe test CA"]].concat());
        run(&[&["req"][..], &ec, &["-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=loupe-coordinator"]].concat());
        std::fs::write(
            dir.join("leaf.ext"),
            "subjectAltName=DNS:loupe-coordinator,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        run(&["x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "tls.crt", "-days", "2", "-extfile", "leaf.ext"]);
        TestTls { ca: dir.join("ca.crt"), cert: dir.join("tls.crt"), key: dir.join("tls.key") }
    }
}

pub struct Cluster {
    pub redis: RedisServer,
    pub s3: S3Server,
    pub port: u16,
    /// The coordinator's /metrics, /healthz and /readyz port.
    pub metrics_port: u16,
    /// Each worker's metrics port, by worker index.
    pub worker_metrics_ports: Vec<u16>,
    /// Set: the coordinator serves TLS, and workers and the CLI trust its CA.
    pub tls: Option<TestTls>,
    pub dir: tempfile::TempDir,
    /// The coordinator's credentials; none: it serves with --insecure-no-auth.
    pub tokens: Option<Tokens>,
    coordinator_args: Vec<String>,
    coordinator: Option<Child>,
    pub workers: Vec<Child>,
    pub lease_ttl: &'static str,
}

/// A coordinator's two credentials: the user token (Jobs service, the CLI's) and the
/// worker token (Workers service). A cluster writes them to `user-token` and
/// `worker-token` in its directory, which a test may overwrite to play a wrong one.
#[derive(Debug, Clone, Copy)]
pub struct Tokens {
    pub user: &'static str,
    pub worker: &'static str,
}

pub const TOKENS: Tokens = Tokens { user: "user-s3cret-t0ken", worker: "worker-s3cret-t0ken" };

impl Cluster {
    /// Redis (AOF on, so it can restart without loss), S3 with buckets `models` and
    /// `atlas`, and a coordinator with a short lease TTL, with `tokens` or, without,
    /// serving anyone (--insecure-no-auth).
    pub fn start(tokens: Option<Tokens>) -> Cluster {
        Self::start_with(tokens, false)
    }

    /// [`Cluster::start`], with the coordinator serving TLS when `tls`.
    pub fn start_with(tokens: Option<Tokens>, tls: bool) -> Cluster {
        Self::start_configured(tokens, tls, &[])
    }

    /// [`Cluster::start_with`], with more flags for the coordinator.
    pub fn start_configured(tokens: Option<Tokens>, tls: bool, coordinator_args: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cluster {
            redis: RedisServer::start_with(true),
            s3: S3Server::start(&["models", "atlas"]),
            port: free_port(),
            metrics_port: free_port(),
            worker_metrics_ports: Vec::new(),
            tls: tls.then(|| TestTls::make(dir.path())),
            dir,
            tokens,
            coordinator_args: coordinator_args.iter().map(|a| a.to_string()).collect(),
            coordinator: None,
            workers: Vec::new(),
            // Short, so that a killed worker's task comes back soon, but long enough that
            // a worker starved of CPU on a loaded machine still renews in time (it renews
            // every third of the TTL).
            lease_ttl: "6s",
        };
        if let Some(t) = tokens {
            std::fs::write(c.user_token_file(), t.user).unwrap();
            std::fs::write(c.worker_token_file(), t.worker).unwrap();
        }
        c.start_coordinator();
        c
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// `--tls-ca` for a client of a TLS cluster.
    fn tls_ca_args(&self) -> Vec<String> {
        match &self.tls {
            Some(t) => vec!["--tls-ca".into(), t.ca.to_string_lossy().into_owned()],
            None => vec![],
        }
    }

    pub fn user_token_file(&self) -> PathBuf {
        self.dir.path().join("user-token")
    }

    pub fn worker_token_file(&self) -> PathBuf {
        self.dir.path().join("worker-token")
    }

    fn coordinator_auth_args(&self) -> Vec<OsString> {
        match self.tokens {
            Some(_) => vec!["--user-token-file".into(), self.user_token_file().into(), "--worker-token-file".into(), self.worker_token_file().into()],
            None => vec!["--insecure-no-auth".into()],
        }
    }

    fn worker_token_args(&self) -> Vec<OsString> {
        match self.tokens {
            Some(_) => vec!["--token-file".into(), self.worker_token_file().into()],
            None => vec![],
        }
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join(format!("{name}.log"))).unwrap()
    }

    pub fn read_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    pub fn start_coordinator(&mut self) {
        let child = Command::new(binary("loupe-coordinator"))
            .args(["--listen", &format!("127.0.0.1:{}", self.port), "--state", &self.redis.url(), "--lease-ttl", self.lease_ttl])
            .args(["--metrics-listen", &format!("127.0.0.1:{}", self.metrics_port)])
            // Models, input images and datasets are uploaded to the `models` bucket.
            .args(["--input-prefix", "s3://models"])
            .args(self.tls.iter().flat_map(|t| [OsString::from("--tls-cert"), t.cert.clone().into(), "--tls-key".into(), t.key.clone().into()]))
            .args(self.coordinator_auth_args())
            .args(&self.coordinator_args)
            .envs(self.s3.env())
            .stdout(Stdio::null())
            .stderr(self.log("coordinator"))
            .spawn()
            .unwrap();
        self.coordinator = Some(child);
        let port = self.port;
        wait_for("the coordinator to listen", Duration::from_secs(60), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    }

    /// The running coordinator's process id.
    pub fn coordinator_pid(&self) -> u32 {
        self.coordinator.as_ref().expect("a running coordinator").id()
    }

    /// SIGKILL, as a crash.
    pub fn kill_coordinator(&mut self) {
        if let Some(mut c) = self.coordinator.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Starts a worker process; its log is `worker-<i>.log`.
    pub fn start_worker(&mut self) -> usize {
        let i = self.workers.len();
        let cache = self.dir.path().join(format!("cache-{i}"));
        let metrics_port = free_port();
        let child = Command::new(binary("loupe-worker"))
            .args(["--coordinator", &self.url(), "--device", "cpu", "--name", &format!("w{i}")])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .arg("--model-cache")
            .arg(cache)
            .args(self.worker_token_args())
            .args(self.tls_ca_args())
            .envs(self.s3.env())
            .env("LOUPE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(self.log(&format!("worker-{i}")))
            .spawn()
            .unwrap();
        self.workers.push(child);
        self.worker_metrics_ports.push(metrics_port);
        i
    }

    pub fn kill_worker(&mut self, i: usize) {
        self.workers[i].kill().unwrap();
        self.workers[i].wait().unwrap();
    }

    /// The `loupe` CLI with this cluster's coordinator, user token and S3 environment.
    pub fn loupe(&self, args: &[&str]) -> Output {
        Command::new(binary("loupe"))
            .args(args)
            .env("LOUPE_COORDINATOR", self.url())
            .envs(self.tls.as_ref().map(|t| ("LOUPE_TLS_CA", t.ca.clone())))
            .envs(self.tokens.map(|_| ("LOUPE_TOKEN_FILE", self.user_token_file())))
            .envs(self.s3.env())
            .output()
            .unwrap()
    }

    /// A plain S3 client of the cluster's S3 server (not loupe's store).
    pub fn s3_client(&self) -> aws_sdk_s3::Client {
        let creds = Credentials::new(loupe_testsupport::S3_ACCESS_KEY, loupe_testsupport::S3_SECRET_KEY, None, None, "test");
        let config = aws_sdk_s3::Config::builder()
            .http_client(loupe_core::s3::http_client())
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(loupe_testsupport::S3_REGION))
            .endpoint_url(self.s3.endpoint())
            .credentials_provider(creds)
            .force_path_style(true)
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    /// Uploads a file into the `models` bucket; returns its s3:// URI.
    pub fn upload_model(&self, rt: &tokio::runtime::Runtime, local: &Path, key: &str) -> String {
        let client = self.s3_client();
        let bytes = std::fs::read(local).unwrap();
        rt.block_on(client.put_object().bucket("models").key(key).body(bytes.into()).send()).unwrap();
        format!("s3://models/{key}")
    }

    /// Every key under `prefix` in `bucket`, sorted, through the plain client.
    pub fn list(&self, rt: &tokio::runtime::Runtime, bucket: &str, prefix: &str) -> Vec<String> {
        let client = self.s3_client();
        let mut keys = Vec::new();
        let mut token = None;
        loop {
            let resp = rt.block_on(client.list_objects_v2().bucket(bucket).prefix(prefix).set_continuation_token(token).send()).unwrap();
            keys.extend(resp.contents().iter().filter_map(|o| o.key().map(str::to_string)));
            match resp.next_continuation_token() {
                Some(t) => token = Some(t.to_string()),
                None => break,
            }
        }
        keys.sort();
        keys
    }

    /// Uploads the tiny test model and its sidecar; returns the model's s3:// URI.
    pub fn upload_tiny(&self, rt: &tokio::runtime::Runtime) -> String {
        let fixtures = repo().join("tests/fixtures");
        self.upload_model(rt, &fixtures.join("tiny.json"), "tiny.json");
        self.upload_model(rt, &fixtures.join("tiny.pt"), "tiny.pt")
    }

    /// `loupe submit --model M --out O` with `job`'s flags; returns the job id.
    pub fn submit(&self, model: &str, out: &str, job: &[&str]) -> String {
        let mut args = vec!["submit", "--model", model, "--out", out];
        args.extend_from_slice(job);
        let o = self.loupe(&args);
        assert_ok(&o);
        stdout(&o)
    }

    pub fn get(&self, rt: &tokio::runtime::Runtime, bucket: &str, key: &str) -> Vec<u8> {
        let client = self.s3_client();
        let resp = rt.block_on(client.get_object().bucket(bucket).key(key).send()).unwrap();
        rt.block_on(resp.body.collect()).unwrap().into_bytes().to_vec()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        self.kill_coordinator();
    }
}

/// Every file under `dir`, as keys relative to it (in no particular order).
pub fn walk(dir: &std::path::Path) -> Vec<String> {
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

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

pub fn assert_ok(o: &Output) {
    assert!(o.status.success(), "command failed: {}\n{}", stdout(o), stderr(o));
}

/// Decodes a PNG fully, so a truncated or corrupt one fails.
pub fn decode_png(bytes: &[u8]) -> (u32, u32) {
    let mut reader = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().expect("a PNG header");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("whole PNG data");
    (info.width, info.height)
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}
