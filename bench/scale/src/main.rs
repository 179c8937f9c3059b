//! The coordinator at scale: tasks completed per second through the coordinator and Redis
//! with N concurrent workers, the time to submit a job of a million units, and the
//! coordinator's memory. Workers run with `--no-render` (lease, write one tiny object,
//! complete), so the coordinator is all that is measured. A benchmark: it prints figures.
//!
//!     cargo build --release --bins && target/release/loupe-scale-bench [UNITS] [WORKERS,...]
//!
//! defaults: 1000000 units (batch 64: 15,625 tasks), workers 10,50,100.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use loupe_core::job::JobState;
use loupe_core::spec::{JobSpec, LayerInfo, LayerPlan, ModelRef, RenderSettings, Technique, UnitRanges};
use loupe_proto::v1;
use loupe_proto::v1::jobs_client::JobsClient;
use loupe_testsupport::{free_port, wait_for, RedisServer};

fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().join(name)
}

/// Peak and current resident memory of a process, in MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / 1024.0
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
    // utime and stime are fields 14 and 15 of the whole line, in clock ticks (100/s on Linux).
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

struct Killed(Vec<Child>);
impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A coordinator on `port` over `redis` that may read `model` (a local, absolute path).
fn start_coordinator(redis: &RedisServer, port: u16, model: &Path) -> Result<std::process::Child> {
    Command::new(binary("loupe-coordinator"))
        .args(["--listen", &format!("127.0.0.1:{port}"), "--state", &redis.url(), "--lease-ttl", "60s", "--metrics-listen", "127.0.0.1:0"])
        // Loopback only, and the benchmark measures leasing, not auth.
        .arg("--insecure-no-auth")
        // The model and the atlas are local files of this machine.
        .arg("--allow-local-paths")
        .arg("--input-prefix")
        .arg(model.parent().context("the model path has a directory")?)
        .env("LOUPE_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting loupe-coordinator (run `cargo build --release --bins`)")
}

/// The job's status once it has ended.
async fn job_end(client: &mut JobsClient<tonic::transport::Channel>, job_id: &str) -> Result<loupe_core::job::JobStatus> {
    loop {
        let s = client.get(v1::GetJobRequest { job_id: job_id.to_string() }).await?.into_inner();
        let s = loupe_core::job::JobStatus::try_from(s).map_err(|e| anyhow::anyhow!("{e}"))?;
        if s.state.is_terminal() {
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn run(units: u32, workers: usize, model: &Path) -> Result<()> {
    // Absolute and without `..`: a path the coordinator can place under its prefix.
    let model = &model.canonicalize().with_context(|| format!("the model {}", model.display()))?;
    let redis = RedisServer::start();
    let port = free_port();
    let out = tempfile::tempdir()?;
    let coordinator = start_coordinator(&redis, port, model)?;
    let coordinator_pid = coordinator.id();
    let mut procs = Killed(vec![coordinator]);
    wait_for("the coordinator", Duration::from_secs(30), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    let url = format!("http://127.0.0.1:{port}");
    for i in 0..workers {
        let w = Command::new(binary("loupe-worker"))
            .args(["--coordinator", &url, "--device", "cpu", "--no-render", "--name", &format!("w{i}"), "--metrics-listen", "127.0.0.1:0"])
            .env("LOUPE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        procs.0.push(w);
    }

    let spec = JobSpec {
        model: ModelRef { uri: model.to_string_lossy().into_owned(), name: "bench".into(), sha256: String::new() },
        layers: vec![LayerPlan { layer: LayerInfo { name: "synthetic".into(), shape: vec![units as i64] }, units: UnitRanges::range(0, units), techniques: None, steps: None, param: None, transforms: None }],
        techniques: vec![Technique::Channel],
        settings: RenderSettings { steps: 1, size: 16, input_size: 16, seed: 0, learning_rate: 0.05, ..Default::default() },
        batch: 64,
        out: out.path().to_string_lossy().into_owned(),
        dataset: None,
    };
    let mut client = JobsClient::connect(url.clone()).await?;
    let start = Instant::now();
    let job_id = client.submit(v1::SubmitRequest { spec: Some((&spec).into()) }).await?.into_inner().job_id;
    let submit_s = start.elapsed().as_secs_f64();
    let (peak_after_submit, _) = memory_mib(coordinator_pid);

    let redis_pid = redis.pid().context("redis pid")?;
    let (coord_cpu0, redis_cpu0) = (cpu_seconds(coordinator_pid), cpu_seconds(redis_pid));
    let run_start = Instant::now();
    let status = job_end(&mut client, &job_id).await?;
    let run_s = run_start.elapsed().as_secs_f64();
    let coord_cpu = cpu_seconds(coordinator_pid) - coord_cpu0;
    let redis_cpu = cpu_seconds(redis_pid) - redis_cpu0;
    if status.state != JobState::Succeeded {
        bail!("the job ended {:?}", status.state);
    }
    let (peak, rss) = memory_mib(coordinator_pid);
    let tasks = status.tasks_total as f64;
    println!(
        "{workers:>4} workers  {units:>8} units  {tasks:>6} tasks  submit {submit_s:>5.2} s  {:>6.0} tasks/s  \
         coordinator {:.0} us CPU/task (peak {peak:.0} MiB, {peak_after_submit:.0} after submit, {rss:.0} at end)  redis {:.0} us CPU/task",
        tasks / run_s,
        coord_cpu / tasks * 1e6,
        redis_cpu / tasks * 1e6,
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let units: u32 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1_000_000);
    let workers: Vec<usize> = args.get(2).map(|s| s.split(',').map(|w| w.parse()).collect()).transpose()?.unwrap_or(vec![10, 50, 100]);
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny.pt");
    println!("coordinator with Redis on loopback, workers with --no-render, {} cores", std::thread::available_parallelism()?.get());
    for w in workers {
        run(units, w, &model).await?;
    }
    Ok(())
}
