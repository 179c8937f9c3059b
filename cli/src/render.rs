//! `loupe render`: the coordinator and N worker loops in one process.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use loupe_core::api::ApiError;
use loupe_core::job::{JobId, JobStatus};
use loupe_coordinator::state::{JobState, MemoryStateStore};
use loupe_coordinator::{Coordinator, CoordinatorConfig, INDEX_SWEEP_INTERVAL};
use loupe_worker::device::{describe, parse_device};
use loupe_worker::metrics::WorkerMetrics;
use loupe_worker::runner::{run_worker, WorkerConfig, WorkerStats};

use crate::job::{job_spec, Progress};
use crate::RenderArgs;

type WorkerResult = std::result::Result<WorkerStats, ApiError>;

/// Renders the job into its local atlas and says how it ended.
pub async fn render(args: RenderArgs) -> Result<ExitCode> {
    let device = parse_device(&args.device)?;
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let default_batch = if device == tch::Device::Cpu { 64 } else { 512 };
    let out = args.out.as_ref().map(|p| p.to_string_lossy().into_owned());
    let spec = job_spec(&args.job, out.as_deref(), device, default_batch).await?;
    let out = PathBuf::from(&spec.out);
    if args.workers > 1 && device == tch::Device::Cpu {
        // Worker loops share the cores instead of each taking all of them.
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as u32;
        tch::set_num_threads((cores / args.workers).max(1) as i32);
    }

    let coordinator = Arc::new(Coordinator::new(Arc::new(MemoryStateStore::new()), CoordinatorConfig::default()));
    // Ends the job should its last completion fail to (see `sweep_indexing`).
    let sweep = tokio::spawn(coordinator.clone().sweep_indexing(INDEX_SWEEP_INTERVAL));
    let job_id = coordinator.submit(spec).await?;
    let status = coordinator.status(&job_id).await?;
    announce(&status, device, &out);
    let started = Instant::now();
    let (stop, stop_rx) = watch::channel(false);
    let workers = start_workers(&coordinator, &args, device, stop_rx);
    let bar = Progress::new(&status);
    let interrupted = follow(&coordinator, &job_id, &bar).await?;
    // Workers hand back the tasks in hand; what they finished is counted below.
    let _ = stop.send(true);
    for w in workers {
        let _ = w.await;
    }
    bar.finish();
    sweep.abort();
    let status = coordinator.status(&job_id).await?;
    if interrupted {
        let done = status.images_skipped + status.images_done;
        eprintln!("stopped with {done} of {} images complete in {}; run the same command again to resume", status.images_total, out.display());
        return Ok(ExitCode::from(130));
    }
    outcome(status, started, &out, args.profile)
}

/// Prints what is about to be rendered, of which model, on what and where.
fn announce(status: &JobStatus, device: tch::Device, out: &Path) {
    eprintln!(
        "rendering {} images ({} layers, {}) of {} on {} into {}{}",
        status.images_total - status.images_skipped,
        status.spec.layers.len(),
        status.spec.techniques.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", "),
        status.spec.model.name,
        describe(device),
        out.display(),
        if status.images_skipped > 0 { format!("; {} already complete, skipped", status.images_skipped) } else { String::new() },
    );
}

/// Starts `--workers` worker loops on the in-process coordinator.
fn start_workers(coordinator: &Arc<Coordinator>, args: &RenderArgs, device: tch::Device, stop: watch::Receiver<bool>) -> Vec<JoinHandle<WorkerResult>> {
    (0..args.workers)
        .map(|i| {
            let config = WorkerConfig {
                name: format!("local-{i}"),
                device,
                idle_poll: Duration::from_millis(50),
                model_cache: std::env::temp_dir().join("loupe-models"),
                render: true,
                profile: args.profile,
                metrics: Arc::new(WorkerMetrics::new(device)),
            };
            tokio::spawn(run_worker(coordinator.clone(), config, stop.clone()))
        })
        .collect()
}

/// Shows the job's progress until it ends or Ctrl-C; returns whether it was interrupted.
async fn follow(coordinator: &Coordinator, job_id: &JobId, bar: &Progress) -> Result<bool> {
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        let status = coordinator.status(job_id).await?;
        bar.update(&status);
        if status.state.is_terminal() {
            return Ok(false);
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = &mut ctrl_c => {
                bar.println("interrupted: stopping the workers...");
                return Ok(true);
            }
        }
    }
}

/// Reports how the job ended: the atlas and its rate, or the failure.
fn outcome(status: JobStatus, started: Instant, out: &Path, profile: bool) -> Result<ExitCode> {
    match status.state {
        JobState::Succeeded => {
            let secs = started.elapsed().as_secs_f64();
            let rendered = status.images_done;
            println!(
                "atlas complete: {} ({} images; rendered {rendered} in {secs:.1} s, {:.2} units/s)",
                out.join("atlas.json").display(),
                status.images_total,
                rendered as f64 / secs
            );
            if status.images_failed > 0 {
                println!("{} images failed: their optimisation diverged; each layer.json gives the reason", status.images_failed);
            }
            if profile {
                println!("step time split: {}", loupe_worker::runner::profile_totals());
            }
            Ok(ExitCode::SUCCESS)
        }
        JobState::Failed { message } => bail!("render failed: {message}"),
        other => bail!("render ended as {other:?}"),
    }
}
