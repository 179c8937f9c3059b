//! `loupe render`: the coordinator and N worker loops in one process.

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::watch;

use loupe_coordinator::state::{JobState, MemoryStateStore};
use loupe_coordinator::{Coordinator, CoordinatorConfig};
use loupe_core::spec::{JobSpec, LayerPlan, ModelRef, RenderSettings, Technique, UnitSelection};
use loupe_worker::device::{describe, parse_device};
use loupe_worker::model::{Model, Sidecar};
use loupe_worker::runner::{run_worker, WorkerConfig};

use crate::RenderArgs;

/// Reads the model's layers and turns the flags into a validated job.
fn job_spec(args: &RenderArgs, device: tch::Device) -> Result<JobSpec> {
    let sidecar = Sidecar::read(&args.model)?;
    let input_size = args.input_size.or(sidecar.input_size).unwrap_or(args.size);
    let settings = RenderSettings { steps: args.steps, size: args.size, input_size, seed: args.seed, learning_rate: 0.05 };
    settings.validate()?;
    let techniques = Technique::parse_list(&args.techniques)?;
    let units: UnitSelection = args.units.parse()?;

    let path = args.model.canonicalize().with_context(|| format!("model file {} does not exist", args.model.display()))?;
    let mut model = Model::load(&path, device)?;
    let layers = model.layers(input_size)?;
    let chosen: Vec<_> = if args.layers == "all" {
        layers
    } else {
        let names: Vec<&str> = args.layers.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        let mut seen = HashSet::new();
        names
            .iter()
            .filter(|n| seen.insert(**n))
            .map(|n| {
                layers.iter().find(|l| l.name == *n).cloned().with_context(|| {
                    let known: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
                    format!("unknown layer {n:?}; the model has: {}", known.join(", "))
                })
            })
            .collect::<Result<_>>()?
    };
    let plans = chosen
        .into_iter()
        .map(|layer| Ok(LayerPlan { units: units.resolve(&layer.name, layer.units())?, layer }))
        .collect::<Result<Vec<_>>>()?;
    let name = sidecar.name.unwrap_or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
    let sha256 = loupe_core::sha256_file(&path).with_context(|| format!("reading {}", path.display()))?;
    let spec = JobSpec {
        model: ModelRef { uri: path.to_string_lossy().into_owned(), name, sha256 },
        layers: plans,
        techniques,
        settings,
        batch: args.batch,
        out: args.out.to_string_lossy().into_owned(),
    };
    spec.validate()?;
    Ok(spec)
}

pub async fn render(args: RenderArgs) -> Result<ExitCode> {
    let device = parse_device(&args.device)?;
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let spec = job_spec(&args, device)?;
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
        args.out.display(),
        if status.images_skipped > 0 { format!("; {} already complete, skipped", status.images_skipped) } else { String::new() },
    );

    let started = std::time::Instant::now();
    let (stop, stop_rx) = watch::channel(false);
    let workers: Vec<_> = (0..args.workers)
        .map(|i| {
            let config = WorkerConfig { name: format!("local-{i}"), device, idle_poll: Duration::from_millis(50) };
            tokio::spawn(run_worker(coordinator.clone(), config, stop_rx.clone()))
        })
        .collect();

    let bar = ProgressBar::new(status.images_total);
    bar.set_style(
        ProgressStyle::with_template("{wide_bar} {pos}/{len} units  {per_sec}  ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_position(status.images_skipped);
    bar.reset_eta();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut interrupted = false;
    let final_status = loop {
        let status = coordinator.status(&job_id).await?;
        bar.set_position(status.images_skipped + status.images_done);
        if status.state.is_terminal() {
            break status;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = &mut ctrl_c, if !interrupted => {
                interrupted = true;
                bar.suspend(|| eprintln!("interrupted: stopping the workers..."));
                let _ = stop.send(true);
                break coordinator.status(&job_id).await?;
            }
        }
    };
    let _ = stop.send(true);
    for w in workers {
        let _ = w.await;
    }
    bar.finish_and_clear();

    let done = final_status.images_skipped + final_status.images_done;
    if interrupted {
        eprintln!(
            "stopped with {done} of {} images complete in {}; run the same command again to resume",
            final_status.images_total,
            args.out.display()
        );
        return Ok(ExitCode::from(130));
    }
    match final_status.state {
        JobState::Succeeded => {
            let secs = started.elapsed().as_secs_f64();
            let rendered = final_status.images_done;
            println!(
                "atlas complete: {} ({} images; rendered {rendered} in {secs:.1} s, {:.2} units/s)",
                args.out.join("atlas.json").display(),
                final_status.images_total,
                rendered as f64 / secs
            );
            Ok(ExitCode::SUCCESS)
        }
        JobState::Failed { message } => bail!("render failed: {message}"),
        other => bail!("render ended as {other:?}"),
    }
}
