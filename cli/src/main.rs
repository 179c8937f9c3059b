//! `loupe`: renders a model's atlas on this machine (`render`), shows what a model exposes
//! (`inspect`), works with a cluster's coordinator (`submit`, `watch`, `status`, `jobs`,
//! `cancel`), serves an atlas's viewer from a directory or S3 (`serve`) and labels its
//! units (`label`). `render` runs the same coordinator and worker loop as the cluster, in
//! one process: an in-memory state store and a local-directory atlas.

mod cluster;
mod job;
mod jobfile;
mod label;
mod render;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use job::JobArgs;
use loupe_worker::device::parse_device;
use loupe_worker::model::{Sidecar, TorchScript};

#[derive(Parser)]
#[command(name = "loupe", version, about = "Feature-visualisation atlases of neural networks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Render an atlas of a model into a local directory. Run it again to resume.
    Render(RenderArgs),
    /// Print each layer of a model: name, unit count and activation shape.
    Inspect(InspectArgs),
    /// Submit a job to a cluster's coordinator; prints the job id.
    Submit(cluster::SubmitArgs),
    /// Follow a job's progress; exits non-zero if it fails or is cancelled.
    Watch(cluster::JobRef),
    /// Show a job's state and progress.
    Status(cluster::JobRef),
    /// List the coordinator's jobs, newest first.
    Jobs(cluster::JobsArgs),
    /// Cancel a job; its workers stop at their next heartbeat.
    Cancel(cluster::JobRef),
    /// Serve an atlas and its viewer over HTTP, from a directory or read through from S3.
    Serve(serve::ServeArgs),
    /// Label a unit of an atlas (a directory or S3) for the viewer; "" removes the label.
    Label(label::LabelArgs),
}

#[derive(Args)]
pub struct RenderArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Output directory of the atlas (or `out` in the job file).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// auto, cpu or cuda:N.
    #[arg(long, env = "LOUPE_DEVICE", default_value = "auto")]
    pub device: String,
    /// Worker loops in this process.
    #[arg(long, default_value_t = 1)]
    pub workers: u32,
    /// Time the phases of every step (transforms, forward, backward, optimiser) and print
    /// the split at the end. It synchronises the device each phase, so it slows a GPU a little.
    #[arg(long)]
    pub profile: bool,
}

#[derive(Args)]
struct InspectArgs {
    #[arg(long)]
    model: PathBuf,
    /// Side of the probe input; default: the sidecar's input_size, else 224.
    #[arg(long)]
    input_size: Option<u32>,
    /// auto, cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The model's input channels (3 for RGB, 1 for grayscale).
    #[arg(long, default_value_t = 3)]
    channels: u32,
}

fn inspect(args: InspectArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let sidecar = Sidecar::read(&args.model)?;
    let input_size = args.input_size.or(sidecar.input_size).unwrap_or(224);
    let mut model = TorchScript::load(&args.model, device)?;
    let layers = model.layers(input_size, args.channels)?;
    println!("{} (input {input_size}x{input_size})", args.model.display());
    println!("{:<40} {:>8}  shape", "layer", "units");
    for l in layers {
        println!("{:<40} {:>8}  {:?}", l.name, l.units(), l.shape);
    }
    Ok(())
}

fn block_on(f: impl std::future::Future<Output = Result<ExitCode>>) -> Result<ExitCode> {
    tokio::runtime::Runtime::new().context("starting the async runtime")?.block_on(f)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LOUPE_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: a container's log (kubectl logs, a
        // log collector) would get the escape codes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(args) => inspect(args).map(|_| ExitCode::SUCCESS),
        Command::Render(args) => block_on(render::render(args)),
        Command::Submit(args) => block_on(cluster::submit(args)),
        Command::Watch(args) => block_on(cluster::watch(args)),
        Command::Status(args) => block_on(cluster::status(args)),
        Command::Jobs(args) => block_on(cluster::jobs(args)),
        Command::Cancel(args) => block_on(cluster::cancel(args)),
        Command::Serve(args) => block_on(async { serve::serve(args).await.map(|_| ExitCode::SUCCESS) }),
        Command::Label(args) => block_on(async { label::label(args).await.map(|_| ExitCode::SUCCESS) }),
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}
