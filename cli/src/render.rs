//! `loupe render`: the coordinator and N worker loops in one process.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use tokio::sync::watch;

use loupe_coordinator::state::{JobState, MemoryStateStore};
use loupe_coordinator::{Coordinator, CoordinatorConfig};
use loupe_worker::device::{describe, parse_device};
use loupe_worker::metrics::WorkerMetrics;
use loupe_worker::runner::{run_worker, WorkerConfig};

use crate::job::{job_spec, Progress};
use crate::RenderArgs;

pub async fn render(args: RenderArgs) -> Result<ExitCode> {
    let device = parse_device(&args.device)?;
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let default_batch = if device == tch::Device::Cpu { 64 } else { 512 };
    let out = args.out.as_ref().map(|p| p.to_string_lossy().into_owned());
    let spec = job_spec(&args.job, out.as_deref(), device, default_batch).await?;
    let spec_out = std::path::PathBuf::from(&spec.out);
    if args.workers > 1 && device == tch::Device::Cpu {
        // Worker loops share the cores instead of each taking all of them.
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as u32;
        tch::set_num_threads((cores / args.workers).max(1) as i32);
    }

    let coordinator = Arc::new(Coordinator::new(Arc::new(MemoryStateStore::new()), CoordinatorConfig::default()));
    let job_id = coordinator.submit(spec).await?;
    let status = coordinator.status(&job_id).await?;
    eprintln!(
        "rendering {} images ({} layers, {}) of {} on {} into {}{}",
        status.images_total - status.images_skipped,
        status.spec.layers.len(),
        status.spec.techniques.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", "),
        status.spec.model.name,
        describe(device),
        spec_out.display(),
        if status.images_skipped > 0 { format!("; {} already complete, skipped", status.images_skipped) } else { String::new() },
    );

    let started = std::time::Instant::now();
    let (stop, stop_rx) = watch::channel(false);
    let workers: Vec<_> = (0..args.workers)
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
            tokio::spawn(run_worker(coordinator.clone(), config, stop_rx.clone()))
        })
        .collect();

    let bar = Progress::new(&status);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut interrupted = false;
    loop {
        let status = coordinator.status(&job_id).await?;
        bar.update(&status);
        if status.state.is_terminal() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = &mut ctrl_c, if !interrupted => {
                interrupted = true;
                bar.println("interrupted: stopping the workers...");
                break;
            }
        }
    }
    // Workers hand back the tasks in hand; what they finished is counted below.
    let _ = stop.send(true);
    for w in workers {
        let _ = w.await;
    }
    bar.finish();
    let final_status = coordinator.status(&job_id).await?;

    let done = final_status.images_skipped + final_status.images_done;
    if interrupted {
        eprintln!(
            "stopped with {done} of {} images complete in {}; run the same command again to resume",
            final_status.images_total,
            spec_out.display()
        );
        return Ok(ExitCode::from(130));
    }
    match final_status.state {
        JobState::Succeeded => {
            let secs = started.elapsed().as_secs_f64();
            let rendered = final_status.images_done;
            println!(
                "atlas complete: {} ({} images; rendered {rendered} in {secs:.1} s, {:.2} units/s)",
                spec_out.join("atlas.json").display(),
                final_status.images_total,
                rendered as f64 / secs
            );
            if args.profile {
                println!("step time split: {}", loupe_worker::runner::profile_totals());
            }
            Ok(ExitCode::SUCCESS)
        }
        JobState::Failed { message } => bail!("render failed: {message}"),
        other => bail!("render ended as {other:?}"),
    }
}
