//! What `render` and `submit` share: turning the flags into a validated job (reading the
//! model's layers with libtorch), and the progress bar.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use loupe_core::job::JobStatus;
use loupe_core::location::Location;
use loupe_core::spec::{
    DatasetSpec, DeadUnits, JobSpec, LayerInfo, LayerPlan, ModelRef, NamedImage, ParamKind, ParamSettings, Precision, RenderSettings, Technique, TechniqueOptions, TransformSettings,
    UnitSelection,
};
use loupe_core::store;
use loupe_worker::model::{Sidecar, TorchScript};
use loupe_worker::render::decode_input;

use crate::jobfile::{JobFile, LayerFile, Layers, ParamFile};

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
    /// Image parameterisation: fft, pixel, or maco (an FFT whose magnitude is fixed and
    /// only its phase optimised) [default: fft].
    #[arg(long)]
    pub param: Option<String>,
    /// Compute the decorrelating colour matrix from the job's dataset (with --dataset).
    #[arg(long)]
    pub color_from_dataset: bool,
    /// Compute MACO's fixed magnitude from the job's dataset (with --param maco and
    /// --dataset).
    #[arg(long)]
    pub magnitude_from_dataset: bool,
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
    /// Skip the connections between units of consecutive layers (with --dataset): the
    /// dataset pass then only gathers statistics and examples.
    #[arg(long)]
    pub no_connections: bool,
}

/// Images the colour matrix is estimated from.
const COLOR_IMAGES: usize = 256;

/// Images MACO's magnitude is estimated from, the side they are resized and cropped to,
/// and the values of its radial profile per channel (docs/techniques.md "MACO").
const MAGNITUDE_IMAGES: usize = 256;
const MAGNITUDE_SIDE: u32 = 128;
const MAGNITUDE_BINS: usize = 64;

/// The techniques when neither the flag nor the job file names them.
const DEFAULT_TECHNIQUES: [Technique; 3] = [Technique::Channel, Technique::Neuron, Technique::Negative];

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
    let dataset = dataset(args, &file)?;
    let settings = render_settings(args, &file, sidecar.input_size, dataset.as_ref()).await?;
    let techniques = match &args.techniques {
        Some(t) => Technique::parse_list(t)?,
        None => file.techniques.clone().unwrap_or_else(|| DEFAULT_TECHNIQUES.to_vec()),
    };
    let units: UnitSelection = args.units.clone().or(file.units.clone()).unwrap_or_else(|| "all".into()).parse()?;
    let layers = TorchScript::load(&path, device)?.layers(settings.input_size, settings.param.channels)?;
    let layers = layer_plans(args, &file, &layers, &units, &settings, dataset.as_ref()).await?;
    let name = sidecar.name.unwrap_or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
    // The coordinator reads the model from its URI at submit and records its digest.
    let model = ModelRef { uri, name, sha256: String::new() };
    let batch = args.batch.or(file.batch).unwrap_or(default_batch);
    let spec = JobSpec { model, layers, techniques, settings, batch, out, dataset };
    spec.validate()?;
    Ok(spec)
}

/// A local copy of the model (and its sidecar) to read its layers from: the file itself,
/// or for `s3://` a download into `tmp`. Returns (uri to record, local path).
async fn local_model(uri: &str, tmp: &Path) -> Result<(String, PathBuf)> {
    let key = match Location::parse("model", uri)? {
        Location::Local(path) => {
            let path = existing_file("model", &path)?;
            return Ok((path.to_string_lossy().into_owned(), path));
        }
        Location::S3 { key, .. } => key,
    };
    let bytes = store::fetch(uri).await?.with_context(|| format!("model {uri} does not exist"))?;
    let local = tmp.join(key.rsplit('/').next().unwrap_or("model.pt"));
    std::fs::write(&local, bytes)?;
    let sidecar_uri = format!("{}.json", uri.strip_suffix(".pt").unwrap_or(uri));
    if let Some(sidecar) = store::fetch(&sidecar_uri).await? {
        std::fs::write(Sidecar::path_for(&local), sidecar)?;
    }
    Ok((uri.to_string(), local))
}

/// A local file's absolute path, refused with the reason when it does not exist or is
/// not a regular file (a directory, a device such as /dev/zero, a FIFO).
fn existing_file(what: &'static str, path: &Path) -> Result<PathBuf> {
    if !store::is_regular_file(what, path)? {
        bail!("{what} file {} does not exist", path.display());
    }
    path.canonicalize().with_context(|| format!("{what} file {}", path.display()))
}

/// The render settings: each from its flag, else the job file, else the default.
async fn render_settings(args: &JobArgs, file: &JobFile, sidecar_input_size: Option<u32>, dataset: Option<&DatasetSpec>) -> Result<RenderSettings> {
    let defaults = RenderSettings::default();
    let size = args.size.or(file.size).unwrap_or(defaults.size);
    let dead_units = match &args.dead_units {
        Some(d) => parse_dead_units(d)?,
        None => file.dead_units.unwrap_or(defaults.dead_units),
    };
    let mut settings = RenderSettings {
        steps: args.steps.or(file.steps).unwrap_or(defaults.steps),
        size,
        input_size: args.input_size.or(file.input_size).or(sidecar_input_size).unwrap_or(size),
        seed: args.seed.or(file.seed).unwrap_or(defaults.seed),
        learning_rate: file.learning_rate.unwrap_or(defaults.learning_rate),
        precision: args.precision.or(file.precision).unwrap_or(defaults.precision),
        transforms: file.transforms.clone().unwrap_or_default(),
        dead_units,
        thresholds: thresholds(args.thresholds.as_deref(), file)?,
        param: image_param(args.param.as_deref(), file.param.as_ref())?,
        options: technique_options(args, file)?,
    };
    if args.color_from_dataset || file.param.as_ref().and_then(|p| p.color_from_dataset).unwrap_or(false) {
        settings.param.color_matrix = Some(dataset_color_matrix(dataset, settings.param.channels).await?);
    }
    // After the colour matrix: the magnitude is taken in the colour space it decorrelates.
    if args.magnitude_from_dataset || file.param.as_ref().and_then(|p| p.magnitude_from_dataset).unwrap_or(false) {
        settings.param.magnitude = Some(dataset_magnitude(dataset, &settings.param).await?);
    }
    settings.validate()?;
    Ok(settings)
}

/// `--dead-units`: keep or reseed.
fn parse_dead_units(s: &str) -> Result<DeadUnits> {
    match s {
        "keep" => Ok(DeadUnits::Keep),
        "reseed" => Ok(DeadUnits::Reseed),
        other => bail!("--dead-units {other:?}: use keep or reseed"),
    }
}

/// The steps to keep intermediate images after: `--thresholds`, else the job file's list.
fn thresholds(flag: Option<&str>, file: &JobFile) -> Result<Vec<u32>> {
    match flag {
        Some(t) => t.split(',').map(str::trim).filter(|t| !t.is_empty()).map(|t| t.parse().with_context(|| format!("--thresholds: {t:?} is not a step count"))).collect(),
        None => Ok(file.thresholds.clone().unwrap_or_default()),
    }
}

/// The image parameterisation: the `[param]` table over the defaults, `--param` over both.
fn image_param(flag: Option<&str>, table: Option<&ParamFile>) -> Result<ParamSettings> {
    let mut param = ParamSettings::default();
    if let Some(kind) = table.and_then(|p| p.kind) {
        param.kind = kind;
    }
    param.maco = table.and_then(|p| p.maco).unwrap_or(false);
    if let Some(kind) = flag {
        (param.kind, param.maco) = match kind {
            "fft" => (ParamKind::Fft, false),
            "pixel" => (ParamKind::Pixel, false),
            "maco" => (ParamKind::Fft, true),
            other => bail!("--param {other:?}: use fft, pixel or maco"),
        };
    }
    param.decay = table.and_then(|p| p.decay).unwrap_or(param.decay);
    param.channels = table.and_then(|p| p.channels).unwrap_or(param.channels);
    // Decorrelation is for RGB; other channel counts default to none.
    param.decorrelate = table.and_then(|p| p.decorrelate).unwrap_or(param.channels == 3);
    param.color_matrix = table.and_then(|p| p.color_matrix);
    param.magnitude = table.and_then(|p| p.magnitude.clone());
    Ok(param)
}

/// The techniques' options from the job file's tables, `--diversity-images` over its own.
fn technique_options(args: &JobArgs, file: &JobFile) -> Result<TechniqueOptions> {
    let mut options = TechniqueOptions::default();
    if let Some(d) = &file.diversity {
        options.diversity_images = d.images.unwrap_or(options.diversity_images);
        if let Some(penalty) = d.penalty {
            options.diversity_penalty = penalty;
            options.diversity_weight = penalty.default_weight();
        }
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
        absolute_input(input)?;
    }
    Ok(options)
}

/// An input image's local path made absolute (the workers may run elsewhere); an S3 URI
/// as given.
fn absolute_input(input: &mut NamedImage) -> Result<()> {
    let location = Location::parse("input image", &input.uri).with_context(|| format!("input image {:?}", input.name))?;
    if let Location::Local(p) = location {
        let path = existing_file("input image", &p).with_context(|| format!("input image {:?}", input.name))?;
        input.uri = path.to_string_lossy().into_owned();
    }
    Ok(())
}

/// The job's dataset, if it has one: `--dataset` or `[dataset]`, each flag over the table.
fn dataset(args: &JobArgs, file: &JobFile) -> Result<Option<DatasetSpec>> {
    let table = file.dataset.as_ref();
    let Some(uri) = args.dataset.as_deref().or(table.map(|d| d.uri.as_str())) else { return Ok(None) };
    Ok(Some(DatasetSpec {
        uri: dataset_uri_of(uri)?,
        examples: args.examples.or(table.and_then(|d| d.examples)).unwrap_or(16),
        images_per_shard: args.images_per_shard.or(table.and_then(|d| d.images_per_shard)).unwrap_or(1000),
        connections: !args.no_connections && table.and_then(|d| d.connections).unwrap_or(true),
    }))
}

/// A dataset directory as an absolute path (the workers may run elsewhere); an s3://
/// prefix as given.
fn dataset_uri_of(uri: &str) -> Result<String> {
    Ok(match Location::parse("dataset", uri)? {
        Location::Local(path) => path.canonicalize().map(|p| p.to_string_lossy().into_owned()).unwrap_or_else(|_| uri.to_string()),
        Location::S3 { .. } => uri.to_string(),
    })
}

/// The decorrelating colour matrix estimated from the job's dataset.
async fn dataset_color_matrix(dataset: Option<&DatasetSpec>, channels: u32) -> Result<[[f32; 3]; 3]> {
    let Some(d) = dataset else { bail!("the colour matrix from the dataset needs a dataset (--dataset or [dataset])") };
    if channels != 3 {
        bail!("the colour matrix from the dataset is for 3 channels, not {channels}");
    }
    loupe_dataset::color::color_correlation_sqrt(&d.uri, COLOR_IMAGES).await.with_context(|| format!("the colour matrix of the dataset {}", d.uri))
}

/// MACO's magnitude from the job's dataset: the first [`MAGNITUDE_IMAGES`] images that
/// decode, at [`MAGNITUDE_SIDE`] px with the model's channels as a start image has them
/// (`decode_input`), through [`loupe_worker::param::dataset_magnitude`].
async fn dataset_magnitude(dataset: Option<&DatasetSpec>, param: &ParamSettings) -> Result<Vec<Vec<f32>>> {
    let Some(d) = dataset else { bail!("the MACO magnitude from the dataset needs a dataset (--dataset or [dataset])") };
    if !param.maco {
        bail!("the magnitude from the dataset is MACO's (--param maco or [param] maco = true)");
    }
    let what = || format!("the MACO magnitude of the dataset {}", d.uri);
    let store = loupe_core::store::open(&d.uri).await.with_context(what)?;
    let mut images = Vec::new();
    'shards: for shard in loupe_dataset::plan(&d.uri, 64).await.with_context(what)? {
        for raw in loupe_dataset::read_shard(store.as_ref(), &shard).await.with_context(what)? {
            // An image that does not decode is skipped, as the colour matrix skips it.
            if let Ok(img) = decode_input(&raw.bytes, param.channels, MAGNITUDE_SIDE, &raw.id) {
                let side = i64::from(MAGNITUDE_SIDE);
                images.push(tch::Tensor::from_slice(&img.data).reshape([1, i64::from(img.channels), side, side]));
                if images.len() == MAGNITUDE_IMAGES {
                    break 'shards;
                }
            }
        }
    }
    if images.is_empty() {
        bail!("{}: none of its images decodes as JPEG or PNG", what());
    }
    Ok(loupe_worker::param::dataset_magnitude(&tch::Tensor::cat(&images, 0), param, MAGNITUDE_BINS))
}

/// The job's layers of the model, each with its units and its `[[layer]]` table's
/// techniques and settings.
async fn layer_plans(args: &JobArgs, file: &JobFile, layers: &[LayerInfo], units: &UnitSelection, settings: &RenderSettings, dataset: Option<&DatasetSpec>) -> Result<Vec<LayerPlan>> {
    let mut chosen: Vec<LayerInfo> = match layer_names(args, file)? {
        None => layers.to_vec(),
        Some(names) => {
            let mut seen = HashSet::new();
            names.iter().filter(|n| seen.insert(n.as_str())).map(|n| find_layer(layers, n)).collect::<Result<_>>()?
        }
    };
    for table in &file.layer {
        if !chosen.iter().any(|l| l.name == table.name) {
            find_layer(layers, &table.name)?;
            bail!("job file: [[layer]] {:?} is not among the job's layers", table.name);
        }
    }
    // The model's order, whatever order they were named in: connections join each job
    // layer to the one before it in the model.
    chosen.sort_by_key(|l| layers.iter().position(|m| m.name == l.name));
    let mut plans = Vec::with_capacity(chosen.len());
    for layer in chosen {
        let table = file.layer.iter().find(|t| t.name == layer.name);
        plans.push(layer_plan(layer, table, units, settings, dataset).await?);
    }
    Ok(plans)
}

/// The names of the layers asked for, in order; `None` for all the model's layers.
fn layer_names(args: &JobArgs, file: &JobFile) -> Result<Option<Vec<String>>> {
    Ok(match (&args.layers, &file.layers) {
        (Some(l), _) if l == "all" => None,
        (Some(l), _) => Some(l.split(',').map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect()),
        (None, Some(Layers::All(a))) if a == "all" => None,
        (None, Some(Layers::All(other))) => bail!("job file: layers = {other:?}; use \"all\" or a list of names"),
        (None, Some(Layers::Names(n))) => Some(n.clone()),
        // With [[layer]] tables and no list, the tables are the job's layers.
        (None, None) if !file.layer.is_empty() => Some(file.layer.iter().map(|l| l.name.clone()).collect()),
        (None, None) => None,
    })
}

/// The model's layer of that name; the error lists the names it has.
fn find_layer(layers: &[LayerInfo], name: &str) -> Result<LayerInfo> {
    layers.iter().find(|l| l.name == name).cloned().with_context(|| {
        let known: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
        format!("unknown layer {name:?}; the model has: {}", known.join(", "))
    })
}

/// One layer's plan: its table's units, techniques and settings where it gives them,
/// else the job's. A table's `param` and `transforms` are merged over the job's, whose
/// values include the flags'.
async fn layer_plan(layer: LayerInfo, table: Option<&LayerFile>, units: &UnitSelection, job: &RenderSettings, dataset: Option<&DatasetSpec>) -> Result<LayerPlan> {
    let own_units = table.and_then(|t| t.units.as_deref()).map(str::parse::<UnitSelection>).transpose()?;
    let units = own_units.as_ref().unwrap_or(units).resolve(&layer.name, layer.units())?;
    let param = match table.and_then(|t| t.param.as_ref()) {
        Some(p) => Some(layer_param(&job.param, p, dataset).await?),
        None => None,
    };
    let transforms = table.and_then(|t| t.transforms.as_ref()).map(|t| layer_transforms(&layer.name, &job.transforms, t)).transpose()?;
    Ok(LayerPlan { units, techniques: table.and_then(|t| t.techniques.clone()), steps: table.and_then(|t| t.steps), param, transforms, layer })
}

/// A layer's parameterisation: its `[layer.param]` table over the job's. Turning to
/// `kind = "pixel"` turns off the job's MACO, and turning MACO off drops its magnitude.
async fn layer_param(job: &ParamSettings, table: &ParamFile, dataset: Option<&DatasetSpec>) -> Result<ParamSettings> {
    let kind = table.kind.unwrap_or(job.kind);
    let maco = table.maco.unwrap_or(job.maco && kind == ParamKind::Fft);
    let mut param = ParamSettings {
        kind,
        decay: table.decay.unwrap_or(job.decay),
        decorrelate: table.decorrelate.unwrap_or(job.decorrelate),
        color_matrix: table.color_matrix.or(job.color_matrix),
        channels: table.channels.unwrap_or(job.channels),
        maco,
        magnitude: table.magnitude.clone().or_else(|| job.magnitude.clone().filter(|_| maco)),
    };
    if table.color_from_dataset == Some(true) {
        param.color_matrix = Some(dataset_color_matrix(dataset, param.channels).await?);
    }
    if table.magnitude_from_dataset == Some(true) {
        param.magnitude = Some(dataset_magnitude(dataset, &param).await?);
    }
    Ok(param)
}

/// A layer's transforms: its `[layer.transforms]` keys over the job's transforms.
fn layer_transforms(layer: &str, job: &TransformSettings, table: &toml::Table) -> Result<TransformSettings> {
    let mut merged = toml::Table::try_from(job)?;
    merged.extend(table.clone());
    merged.try_into().map_err(|e| anyhow::anyhow!("job file: [[layer]] {layer:?}: transforms: {}", e.to_string().trim_end()))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_input_that_is_not_a_regular_file_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("model.pt");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(existing_file("model", &file).unwrap(), file.canonicalize().unwrap());
        for path in [Path::new("/dev/zero"), dir.path()] {
            let e = format!("{:#}", existing_file("model", path).unwrap_err());
            assert!(e.contains(&format!("{} is not a regular file", path.display())) && !e.contains("does not exist"), "{e}");
        }
        let e = existing_file("model", &dir.path().join("missing.pt")).unwrap_err().to_string();
        assert!(e.contains("missing.pt does not exist"), "{e}");
    }
}
