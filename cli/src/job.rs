//! What `render` and `submit` share: turning the flags into a validated job (reading the
//! model's layers with libtorch), and the progress bar.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use loupe_core::job::JobStatus;
use loupe_core::spec::{DatasetSpec, DeadUnits, JobSpec, LayerPlan, ModelRef, ParamKind, Precision, RenderSettings, Technique, UnitSelection};
use loupe_core::store;
use loupe_worker::model::{Model, Sidecar};

use crate::jobfile::{JobFile, Layers};

/// The flags that describe a job, for `render` and `submit` alike. Each overrides the
/// same setting of a `--spec` job file; the defaults below apply when neither gives it.
#[derive(Args, Debug, Default)]
pub struct JobArgs {
    /// A TOML job file with any of these settings and the techniques' options
    /// (docs/job-files.md). Flags override it.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// TorchScript model following docs/models.md: a path, or s3://bucket/key for `submit`.
    #[arg(long, env = "LOUPE_MODEL")]
    pub model: Option<String>,
    /// Layers to render: `all` or a comma-separated list of names [default: all].
    #[arg(long)]
    pub layers: Option<String>,
    /// Units of each layer: `all`, a half-open range `0..16`, or a list `0,3,7` [default: all].
    #[arg(long)]
    pub units: Option<String>,
    /// Techniques: per unit channel, neuron, negative, diversity; per layer deepdream,
    /// caricature, direction [default: channel,neuron,negative].
    #[arg(long)]
    pub techniques: Option<String>,
    /// Optimisation steps [default: 512].
    #[arg(long)]
    pub steps: Option<u32>,
    /// Side of the rendered image in pixels [default: 128].
    #[arg(long)]
    pub size: Option<u32>,
    /// Side of the model input; default: the sidecar's input_size, else --size.
    #[arg(long)]
    pub input_size: Option<u32>,
    /// Units per task. A worker runs a task in one optimisation when it fits in the
    /// device's memory, else in the largest batches that fit. Default: 64 on the CPU, 512
    /// with `render` on a GPU, and for `submit`.
    #[arg(long)]
    pub batch: Option<u32>,
    /// Job seed; the same seed gives the same images [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Number format of the model's passes: fp32, or bf16 (faster on GPUs with bf16
    /// tensor cores; the image and Adam stay fp32) [default: fp32].
    #[arg(long)]
    pub precision: Option<Precision>,
    /// Keep intermediate images after these steps too, e.g. 64,128,256.
    #[arg(long)]
    pub thresholds: Option<String>,
    /// Images per unit for the diversity technique [default: 4].
    #[arg(long)]
    pub diversity_images: Option<u32>,
    /// Units no initial image excites: `keep` (they stay grey) or `reseed` [default: keep].
    #[arg(long)]
    pub dead_units: Option<String>,
    /// Image parameterisation: fft or pixel [default: fft].
    #[arg(long)]
    pub param: Option<String>,
    /// Compute the decorrelating colour matrix from the job's dataset (with --dataset).
    #[arg(long)]
    pub color_from_dataset: bool,
    /// Dataset for per-unit statistics and top/bottom examples: a directory or an
    /// s3:// prefix of JPEG/PNG images, or of WebDataset .tar shards.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Top and bottom examples kept per unit (with --dataset) [default: 16].
    #[arg(long)]
    pub examples: Option<u32>,
    /// Images per map task, for a dataset of image files (each .tar is one task) [default: 1000].
    #[arg(long)]
    pub images_per_shard: Option<u32>,
}

/// Images the colour matrix is estimated from.
const COLOR_IMAGES: usize = 256;

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

/// Reads the model's layers and turns the job file and flags into a validated job.
/// `out` is the flag's value, if given; `default_batch` is the units per task when
/// neither gives `batch`.
pub async fn job_spec(args: &JobArgs, out: Option<&str>, device: tch::Device, default_batch: u32) -> Result<JobSpec> {
    let file = match &args.spec {
        Some(path) => JobFile::read(path)?,
        None => JobFile::default(),
    };
    let model = args.model.clone().or(file.model.clone()).context("no model: give --model or `model` in the job file")?;
    let out = out.map(str::to_string).or(file.out.clone()).context("no output: give --out or `out` in the job file")?;
    let tmp = tempfile::tempdir()?;
    let (uri, path) = local_model(&model, tmp.path()).await?;
    let sidecar = Sidecar::read(&path)?;

    let defaults = RenderSettings::default();
    let size = args.size.or(file.size).unwrap_or(defaults.size);
    let input_size = args.input_size.or(file.input_size).or(sidecar.input_size).unwrap_or(size);
    let precision = match (&args.precision, &file.precision) {
        (Some(p), _) => *p,
        (None, Some(p)) => p.parse()?,
        (None, None) => Precision::Fp32,
    };
    let mut settings = RenderSettings {
        steps: args.steps.or(file.steps).unwrap_or(defaults.steps),
        size,
        input_size,
        seed: args.seed.or(file.seed).unwrap_or(defaults.seed),
        learning_rate: file.learning_rate.unwrap_or(defaults.learning_rate),
        precision,
        transforms: file.transforms.clone().unwrap_or_default(),
        dead_units: match &args.dead_units {
            Some(d) => parse_dead_units(d)?,
            None => file.dead_units.unwrap_or(DeadUnits::Keep),
        },
        ..defaults
    };
    settings.thresholds = match &args.thresholds {
        Some(t) => t.split(',').map(str::trim).filter(|t| !t.is_empty()).map(|t| t.parse().with_context(|| format!("--thresholds: {t:?} is not a step count"))).collect::<Result<_>>()?,
        None => file.thresholds.clone().unwrap_or_default(),
    };
    let p = file.param.as_ref();
    let param = &mut settings.param;
    if let Some(kind) = p.and_then(|p| p.kind) {
        param.kind = kind;
    }
    if let Some(kind) = &args.param {
        param.kind = match kind.as_str() {
            "fft" => ParamKind::Fft,
            "pixel" => ParamKind::Pixel,
            other => bail!("--param {other:?}: use fft or pixel"),
        };
    }
    param.decay = p.and_then(|p| p.decay).unwrap_or(param.decay);
    param.channels = p.and_then(|p| p.channels).unwrap_or(param.channels);
    // Decorrelation is for RGB; other channel counts default to none.
    param.decorrelate = p.and_then(|p| p.decorrelate).unwrap_or(param.channels == 3);
    param.color_matrix = p.and_then(|p| p.color_matrix);
    let options = &mut settings.options;
    if let Some(d) = &file.diversity {
        options.diversity_images = d.images.unwrap_or(options.diversity_images);
        options.diversity_weight = d.weight.unwrap_or(options.diversity_weight);
    }
    options.diversity_images = args.diversity_images.unwrap_or(options.diversity_images);
    if let Some(d) = &file.deepdream {
        options.deepdream_inputs = d.inputs.clone();
    }
    if let Some(c) = &file.caricature {
        options.caricature_inputs = c.inputs.clone();
        options.caricature_cossim_pow = c.cossim_pow.unwrap_or(options.caricature_cossim_pow);
    }
    if let Some(d) = &file.direction {
        options.direction_cossim_pow = d.cossim_pow.unwrap_or(options.direction_cossim_pow);
    }
    options.directions = file.directions()?;
    for input in options.deepdream_inputs.iter_mut().chain(options.caricature_inputs.iter_mut()) {
        if !input.uri.starts_with("s3://") {
            let p = Path::new(&input.uri);
            input.uri = p.canonicalize().with_context(|| format!("input image {:?}: {} does not exist", input.name, p.display()))?.to_string_lossy().into_owned();
        }
    }

    let dataset_uri = args.dataset.clone().or(file.dataset.as_ref().map(|d| d.uri.clone()));
    let dataset = dataset_uri.map(|uri| DatasetSpec {
        uri: dataset_uri_of(&uri),
        examples: args.examples.or(file.dataset.as_ref().and_then(|d| d.examples)).unwrap_or(16),
        images_per_shard: args.images_per_shard.or(file.dataset.as_ref().and_then(|d| d.images_per_shard)).unwrap_or(1000),
    });
    if args.color_from_dataset || p.and_then(|p| p.color_from_dataset).unwrap_or(false) {
        let Some(d) = &dataset else { bail!("the colour matrix from the dataset needs a dataset (--dataset or [dataset])") };
        if settings.param.channels != 3 {
            bail!("the colour matrix from the dataset is for 3 channels, not {}", settings.param.channels);
        }
        let m = loupe_dataset::color::color_correlation_sqrt(&d.uri, COLOR_IMAGES).await.with_context(|| format!("the colour matrix of the dataset {}", d.uri))?;
        settings.param.color_matrix = Some(m);
    }
    settings.validate()?;

    let techniques = match (&args.techniques, &file.techniques) {
        (Some(t), _) => Technique::parse_list(t)?,
        (None, Some(list)) => Technique::parse_list(&list.join(","))?,
        (None, None) => Technique::parse_list("channel,neuron,negative")?,
    };
    let units: UnitSelection = args.units.clone().or(file.units.clone()).unwrap_or_else(|| "all".into()).parse()?;

    let mut model = Model::load(&path, device)?;
    let layers = model.layers(input_size, settings.param.channels)?;
    let find = |n: &str| {
        layers.iter().find(|l| l.name == n).cloned().with_context(|| {
            let known: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
            format!("unknown layer {n:?}; the model has: {}", known.join(", "))
        })
    };
    let names: Option<Vec<String>> = match (&args.layers, &file.layers) {
        (Some(l), _) if l == "all" => None,
        (Some(l), _) => Some(l.split(',').map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect()),
        (None, Some(Layers::All(a))) if a == "all" => None,
        (None, Some(Layers::All(other))) => bail!("job file: layers = {other:?}; use \"all\" or a list of names"),
        (None, Some(Layers::Names(n))) => Some(n.clone()),
        // With [[layer]] tables and no list, the tables are the job's layers.
        (None, None) if !file.layer.is_empty() => Some(file.layer.iter().map(|l| l.name.clone()).collect()),
        (None, None) => None,
    };
    let chosen: Vec<_> = match names {
        None => layers.clone(),
        Some(names) => {
            let mut seen = HashSet::new();
            names.iter().filter(|n| seen.insert(n.as_str())).map(|n| find(n)).collect::<Result<_>>()?
        }
    };
    for table in &file.layer {
        if !chosen.iter().any(|l| l.name == table.name) {
            find(&table.name)?;
            bail!("job file: [[layer]] {:?} is not among the job's layers", table.name);
        }
    }
    let plans = chosen
        .into_iter()
        .map(|layer| {
            let table = file.layer.iter().find(|t| t.name == layer.name);
            let units = match table.and_then(|t| t.units.as_ref()) {
                Some(u) => u.parse::<UnitSelection>()?,
                None => units.clone(),
            };
            let techniques = table.and_then(|t| t.techniques.as_ref()).map(|t| Technique::parse_list(&t.join(","))).transpose()?;
            Ok(LayerPlan { units: units.resolve(&layer.name, layer.units())?, techniques, steps: table.and_then(|t| t.steps), layer })
        })
        .collect::<Result<Vec<_>>>()?;
    let name = sidecar.name.unwrap_or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
    // The coordinator reads the model from its URI at submit and records its digest.
    let batch = args.batch.or(file.batch).unwrap_or(default_batch);
    let spec = JobSpec { model: ModelRef { uri, name, sha256: String::new() }, layers: plans, techniques, settings, batch, out, dataset };
    spec.validate()?;
    Ok(spec)
}

fn parse_dead_units(s: &str) -> Result<DeadUnits> {
    match s {
        "keep" => Ok(DeadUnits::Keep),
        "reseed" => Ok(DeadUnits::Reseed),
        other => bail!("--dead-units {other:?}: use keep or reseed"),
    }
}

/// A dataset directory as an absolute path (the workers may run elsewhere); an s3://
/// prefix as given.
fn dataset_uri_of(uri: &str) -> String {
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
