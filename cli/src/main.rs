//! `loupe`: renders a model's atlas on this machine (`loupe render`) and shows what a model
//! exposes (`loupe inspect`). `render` runs the same coordinator and worker loop as the
//! cluster, in one process: an in-memory state store and a local-directory atlas.

mod render;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use loupe_worker::device::parse_device;
use loupe_worker::model::{Model, Sidecar};

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
}

#[derive(Args)]
pub struct RenderArgs {
    /// TorchScript model following docs/models.md.
    #[arg(long, env = "LOUPE_MODEL")]
    pub model: PathBuf,
    /// Output directory of the atlas.
    #[arg(long)]
    pub out: PathBuf,
    /// Layers to render: `all` or a comma-separated list of names.
    #[arg(long, default_value = "all")]
    pub layers: String,
    /// Units of each layer: `all`, a half-open range `0..16`, or a list `0,3,7`.
    #[arg(long, default_value = "all")]
    pub units: String,
    /// Techniques: any of channel, neuron, negative.
    #[arg(long, default_value = "channel,neuron,negative")]
    pub techniques: String,
    /// Optimisation steps.
    #[arg(long, default_value_t = 512)]
    pub steps: u32,
    /// Side of the rendered image in pixels.
    #[arg(long, default_value_t = 128)]
    pub size: u32,
    /// Side of the model input; default: the sidecar's input_size, else --size.
    #[arg(long)]
    pub input_size: Option<u32>,
    /// Units per optimisation.
    #[arg(long, default_value_t = 64)]
    pub batch: u32,
    /// auto, cpu or cuda:N.
    #[arg(long, env = "LOUPE_DEVICE", default_value = "auto")]
    pub device: String,
    /// Job seed; the same seed gives the same images.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Worker loops in this process.
    #[arg(long, default_value_t = 1)]
    pub workers: u32,
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
}

fn inspect(args: InspectArgs) -> Result<()> {
    let device = parse_device(&args.device)?;
    let sidecar = Sidecar::read(&args.model)?;
    let input_size = args.input_size.or(sidecar.input_size).unwrap_or(224);
    let mut model = Model::load(&args.model, device)?;
    let layers = model.layers(input_size)?;
    println!("{} (input {input_size}x{input_size})", args.model.display());
    println!("{:<40} {:>8}  shape", "layer", "units");
    for l in layers {
        println!("{:<40} {:>8}  {:?}", l.name, l.units(), l.shape);
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LOUPE_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(args) => inspect(args).map(|_| ExitCode::SUCCESS),
        Command::Render(args) => tokio::runtime::Runtime::new()
            .context("starting the async runtime")
            .and_then(|rt| rt.block_on(render::render(args))),
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}
