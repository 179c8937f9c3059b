//! What `render` and `submit` share: turning the flags into a validated job (reading the
//! model's layers with libtorch), and the progress bar.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use loupe_core::job::JobStatus;
use loupe_core::spec::{DatasetSpec, JobSpec, Precision, LayerPlan, ModelRef, RenderSettings, Technique, UnitSelection};
use loupe_core::store;
use loupe_worker::model::{Model, Sidecar};

/// The flags that describe a job, for `render` and `submit` alike.
#[derive(Args, Debug)]
pub struct JobArgs {
    /// TorchScript model following docs/models.md: a path, or s3://bucket/key for `submit`.
    #[arg(long, env = "LOUPE_MODEL")]
    pub model: String,
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
    /// Units per task. A worker runs a task in one optimisation when it fits in the
    /// device's memory, else in the largest batches that fit. Default: 64 on the CPU, 512
    /// with `render` on a GPU, and for `submit`.
    #[arg(long)]
    pub batch: Option<u32>,
    /// Job seed; the same seed gives the same images.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number format of the model's passes: fp32, or bf16 (faster on GPUs with bf16
    /// tensor cores; the image and Adam stay fp32).
    #[arg(long, default_value = "fp32")]
    pub precision: Precision,
    /// Dataset for per-unit statistics and top/bottom examples: a directory or an
    /// s3:// prefix of JPEG/PNG images, or of WebDataset .tar shards.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Top and bottom examples kept per unit (with --dataset).
    #[arg(long, default_value_t = 16)]
    pub examples: u32,
    /// Images per map task, for a dataset of image files (each .tar is one task).
    #[arg(long, default_value_t = 1000)]
    pub images_per_shard: u32,
}

/// A local copy of the model (and its sidecar) to read its layers from: the file itself,
/// or for `s3://` a download into `tmp`. Returns (uri to record, local path).
async fn local_model(uri: &str, tmp: &Path) -> Result<(String, PathBuf)> {
    if !uri.starts_with("s3://") {
        let path = Path::new(uri.strip_prefix("file://").unwrap_or(uri));
        let path = path.canonicalize().with_context(|| format!("model file {} does not exist", path.display()))?;
        return Ok((path.to_string_lossy().into_owned(), path));
    }
    let bytes = store::fetch(uri).await?.with_context(|| format!("model {uri} does not exist"))?;
    let name = uri.rsplit('/').next().unwrap_or("model.pt");
    let local = tmp.join(name);
    std::fs::write(&local, bytes)?;
    let sidecar_uri = format!("{}.json", uri.strip_suffix(".pt").unwrap_or(uri));
    if let Some(sidecar) = store::fetch(&sidecar_uri).await? {
        std::fs::write(Sidecar::path_for(&local), sidecar)?;
    }
    Ok((uri.to_string(), local))
}

/// Reads the model's layers and turns the flags into a validated job.
/// `default_batch` is the units per task when `--batch` is not given.
pub async fn job_spec(args: &JobArgs, out: &str, device: tch::Device, default_batch: u32) -> Result<JobSpec> {
    let tmp = tempfile::tempdir()?;
    let (uri, path) = local_model(&args.model, tmp.path()).await?;
    let sidecar = Sidecar::read(&path)?;
    let input_size = args.input_size.or(sidecar.input_size).unwrap_or(args.size);
    let settings = RenderSettings { steps: args.steps, size: args.size, input_size, seed: args.seed, learning_rate: 0.05, precision: args.precision };
    settings.validate()?;
    let techniques = Technique::parse_list(&args.techniques)?;
    let units: UnitSelection = args.units.parse()?;

    let mut model = Model::load(&path, device)?;
    let layers = model.layers(input_size)?;
    let chosen: Vec<_> = if args.layers == "all" {
        layers
    } else {
        let mut seen = HashSet::new();
        args.layers
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty() && seen.insert(*n))
            .map(|n| {
                layers.iter().find(|l| l.name == n).cloned().with_context(|| {
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
    // The coordinator reads the model from its URI at submit and records its digest.
    let batch = args.batch.unwrap_or(default_batch);
    let dataset = args.dataset.as_ref().map(|uri| DatasetSpec {
        uri: dataset_uri(uri),
        examples: args.examples,
        images_per_shard: args.images_per_shard,
    });
    let spec = JobSpec { model: ModelRef { uri, name, sha256: String::new() }, layers: plans, techniques, settings, batch, out: out.to_string(), dataset };
    spec.validate()?;
    Ok(spec)
}

/// A dataset directory as an absolute path (the workers may run elsewhere); an s3://
/// prefix as given.
fn dataset_uri(uri: &str) -> String {
    if uri.starts_with("s3://") {
        return uri.to_string();
    }
    let path = Path::new(uri.strip_prefix("file://").unwrap_or(uri));
    path.canonicalize().map(|p| p.to_string_lossy().into_owned()).unwrap_or_else(|_| uri.to_string())
}

/// A progress bar of a job's images, with units/s and the ETA.
pub struct Progress(ProgressBar);

impl Progress {
    pub fn new(status: &JobStatus) -> Progress {
        let bar = ProgressBar::new(status.images_total);
        bar.set_style(
            ProgressStyle::with_template("{wide_bar} {pos}/{len} units  {per_sec}  ETA {eta}").expect("valid template").progress_chars("=> "),
        );
        bar.set_position(status.images_skipped + status.images_done);
        // Rates count only what this run renders, not what was already there.
        bar.reset_eta();
        Progress(bar)
    }

    pub fn update(&self, status: &JobStatus) {
        self.0.set_position(status.images_skipped + status.images_done);
    }

    pub fn println(&self, line: &str) {
        self.0.suspend(|| eprintln!("{line}"));
    }

    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}
