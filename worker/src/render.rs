//! Optimisations: batches of parameterised images, each pushed up its objective by Adam
//! through the random transforms (docs/techniques.md "The peers' recipe").
//!
//! [`render`] renders a [`RenderRequest`]: for each of its subjects, a unit of the layer
//! under a per-unit technique (channel, neuron, negative: one image; diversity: N images
//! optimised together against each other) or a named item under a per-layer technique
//! (deepdream, caricature, direction: one image). Techniques differ only in what is
//! optimised: the goal of a batch ([`Goal::for_batch`]) and the images' starts
//! (`image_specs`); the batching, the initial values and the steps are shared.
//!
//! Every image has its own SplitMix64 stream (from the job seed and the unit's or item's
//! identity): its initial values are drawn first, then, under `DeadUnits::Reseed`, any
//! re-drawn initial values, then every step's transform. Which images share an
//! optimisation never changes what is drawn.

use std::time::{Duration, Instant};

use tch::{nn, Device, Kind, Tensor};

use loupe_core::atlas::Target;
use loupe_core::seed::{unit_seed, SplitMix64};
use loupe_core::spec::{DeadUnits, DiversityPenalty, RenderSettings, Technique};

use crate::model::Model;
use crate::objective::{caricature, deepdream, direction, diversity_penalty, objective, unit_tensor};
use crate::param::{ParamImage, INIT_SD};
use crate::tasks::TaskSignals;
use crate::transform;
use crate::{Error, Result};

/// What to render: each of `subjects` in `layer` under `technique`. Units go with the
/// per-unit techniques and items of the technique's kind with the per-layer ones;
/// [`render`] refuses any other mix.
#[derive(Debug, Clone)]
pub struct RenderRequest<'a> {
    pub layer: &'a str,
    pub technique: Technique,
    pub subjects: &'a [Subject],
    pub settings: &'a RenderSettings,
}

/// What one image (diversity: N images) is optimised for.
#[derive(Debug, Clone)]
pub enum Subject {
    /// A unit of the layer, for channel, neuron, negative or diversity.
    Unit(u32),
    /// A named item, for deepdream, caricature or direction.
    Item(LayerItem),
}

impl Subject {
    /// What the subject's images show.
    pub fn target(&self) -> Target {
        match self {
            Subject::Unit(u) => Target::Unit(*u),
            Subject::Item(item) => Target::Item(item.name.clone()),
        }
    }

    /// The number that, with the job seed, the layer and the technique, seeds its stream:
    /// the unit, or [`item_index`] of the item's name.
    fn seed_index(&self) -> u32 {
        match self {
            Subject::Unit(u) => *u,
            Subject::Item(item) => item_index(&item.name),
        }
    }
}

/// One rendered image, `size x size`, row-major, `channels` bytes a pixel: 3 (RGB) for a
/// model of 3 or more input channels (its first three), 1 (grey) for fewer (its first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pixels {
    pub channels: u8,
    pub bytes: Vec<u8>,
}

/// The images of an optimisation after `step` steps (`settings.thresholds`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub step: u32,
    pub images: Vec<Pixels>,
}

/// One subject's images: one, or `options.diversity_images` for diversity.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub target: Target,
    pub images: Vec<Pixels>,
    /// Per image, the objective on the final image resampled to the input size without
    /// transforms; for diversity each image's channel objective (the penalty left out).
    pub objectives: Vec<f64>,
    /// One per threshold, each with as many images as `images`.
    pub snapshots: Vec<Snapshot>,
    /// Per step of [`curve_steps`], each image's objective after it, measured as
    /// `objectives` are (the last step's values are `objectives`).
    pub curve: Vec<(u32, Vec<f64>)>,
    /// For several images (diversity), how different they are ([`pixel_distance`]).
    pub diversity: Option<f64>,
    /// Under `DeadUnits::Reseed`: no initial image (however bright) gave the unit's
    /// objective a gradient, so it was rendered as `Keep` renders it. Always false for an
    /// item: only a unit's record has the mark.
    pub dead: bool,
}

/// A subject whose optimisation diverged: its objective or its image stopped being finite
/// (one image of a diversity unit is enough). It has no images to keep. Each image of a
/// batch is optimised on its own (the batch shares only the passes through the model,
/// which treat each element apart), so the subject's batch-mates are as they would be
/// without it.
#[derive(Debug, Clone, PartialEq)]
pub struct Diverged {
    pub target: Target,
    /// Why, e.g. "objective became NaN at step 37".
    pub reason: String,
}

/// One subject's images, or why it has none.
pub type Outcome = std::result::Result<Rendered, Diverged>;

/// A decoded input image: `channels x size x size` floats in [0, 1], row-major CHW.
#[derive(Debug, Clone, PartialEq)]
pub struct InputImage {
    pub channels: u32,
    pub size: u32,
    pub data: Vec<f32>,
}

#[derive(Debug, Clone)]
pub enum LayerItemKind {
    /// Deepdream from noise (`start: None`) or from a start image.
    DeepDream { start: Option<InputImage> },
    /// The caricature of an input image.
    Caricature { input: InputImage },
    /// A direction over the layer's units, one value per unit.
    Direction { vector: Vec<f32> },
}

impl LayerItemKind {
    /// The per-layer technique the item is for.
    fn technique(&self) -> Technique {
        match self {
            LayerItemKind::DeepDream { .. } => Technique::DeepDream,
            LayerItemKind::Caricature { .. } => Technique::Caricature,
            LayerItemKind::Direction { .. } => Technique::Direction,
        }
    }
}

/// One item of a per-layer technique; `name` also seeds its stream.
#[derive(Debug, Clone)]
pub struct LayerItem {
    pub name: String,
    pub kind: LayerItemKind,
}

/// Decodes a JPEG or PNG into an [`InputImage`] of `channels` at `size x size`: resized
/// so its shorter side is `size` (bilinear, antialiased when shrinking) and centre-cropped
/// (loupe_dataset's `preprocess`, as for dataset examples). 3 channels are RGB; 1 is the
/// luma (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B); other counts take R, G, B for their
/// first channels and the luma for any beyond the third. `what` names the image in errors
/// (they read `<what>: <reason>`).
pub fn decode_input(bytes: &[u8], channels: u32, size: u32, what: &str) -> Result<InputImage> {
    if channels == 0 || size == 0 {
        return Err(Error::Model(format!("{what}: {channels} channels at {size} px is not an image")));
    }
    let img = loupe_dataset::preprocess(bytes, size).map_err(|e| Error::Model(format!("{what}: {e}")))?;
    let plane = (size * size) as usize;
    let mut data = vec![0f32; channels as usize * plane];
    for (i, px) in img.rgb.chunks_exact(3).enumerate() {
        let [r, g, b] = [px[0], px[1], px[2]].map(|v| v as f32 / 255.0);
        let luma = 0.299 * r + 0.587 * g + 0.114 * b;
        for c in 0..channels as usize {
            data[c * plane + i] = match (channels, c) {
                (1, _) => luma,
                (_, 0) => r,
                (_, 1) => g,
                (_, 2) => b,
                _ => luma,
            };
        }
    }
    Ok(InputImage { channels, size, data })
}

/// The stable number of a layer item for its seed: FNV-1a of its name, so adding or
/// removing other items changes nothing.
pub fn item_index(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Checks, once before anything renders, that every subject suits the technique: units
/// for a per-unit technique; for a per-layer one, items of its kind whose images have the
/// model's channel count and whose directions are finite and all of one length.
fn check(req: &RenderRequest) -> Result<()> {
    let technique = req.technique;
    let targets: Vec<Target> = req.subjects.iter().map(Subject::target).collect();
    loupe_core::atlas::check_targets(technique, &targets).map_err(|e| Error::Model(e.to_string()))?;
    for subject in req.subjects {
        if let Subject::Item(item) = subject {
            check_item(item, technique, req.settings.param.channels)?;
        }
    }
    let mut vectors = req.subjects.iter().filter_map(|s| match s {
        Subject::Item(LayerItem { name, kind: LayerItemKind::Direction { vector } }) => Some((name, vector.len())),
        _ => None,
    });
    if let Some((_, len)) = vectors.next() {
        if let Some((name, bad)) = vectors.find(|&(_, l)| l != len) {
            return Err(Error::Model(format!("direction {name:?} has {bad} values; the others {len}")));
        }
    }
    Ok(())
}

/// One item of a per-layer `technique`'s request (see [`check`]).
fn check_item(item: &LayerItem, technique: Technique, channels: u32) -> Result<()> {
    if item.kind.technique() != technique {
        return Err(Error::Model(format!("item {:?} is a {} item, not a {technique} item", item.name, item.kind.technique())));
    }
    let fits = |img: &InputImage| -> Result<()> {
        if img.channels != channels || img.data.len() != (img.channels * img.size * img.size) as usize || img.size == 0 {
            return Err(Error::Model(format!(
                "{technique} item {:?}: the image has {} channels at {} px ({} values); the model takes {channels} channels",
                item.name,
                img.channels,
                img.size,
                img.data.len()
            )));
        }
        Ok(())
    };
    match &item.kind {
        LayerItemKind::DeepDream { start } => start.as_ref().map_or(Ok(()), fits),
        LayerItemKind::Caricature { input } => fits(input),
        LayerItemKind::Direction { vector } if vector.is_empty() || vector.iter().any(|v| !v.is_finite()) => {
            Err(Error::Model(format!("direction {:?} must be a vector of finite numbers", item.name)))
        }
        LayerItemKind::Direction { .. } => Ok(()),
    }
}

/// How an image starts.
enum Init {
    /// Values drawn from the image's stream, N(0, 0.01).
    Noise,
    /// A given image, `[C, S, S]` on the CPU (deepdream's start image).
    Image(Tensor),
}

/// One image of an optimisation: its stream and its start.
struct ImageSpec {
    rng: SplitMix64,
    init: Init,
    /// The unit or item, for error messages.
    label: String,
}

/// The images of a batch of the request's subjects, in order: per subject one image
/// from its stream, or for diversity N images, each with a stream seeded by the unit's
/// stream in turn. A deepdream item with a start image starts from it, at the render's
/// size; every other image from noise.
fn image_specs(req: &RenderRequest, subjects: &[Subject], device: Device) -> Vec<ImageSpec> {
    let s = req.settings;
    let mut out = Vec::new();
    for subject in subjects {
        let mut rng = SplitMix64::new(unit_seed(s.seed, req.layer, subject.seed_index(), req.technique));
        match subject {
            Subject::Unit(u) if req.technique == Technique::Diversity => {
                for k in 0..s.options.diversity_images {
                    let label = format!("unit {u} (diversity image {k})");
                    out.push(ImageSpec { rng: SplitMix64::new(rng.next_u64()), init: Init::Noise, label });
                }
            }
            Subject::Unit(u) => out.push(ImageSpec { rng, init: Init::Noise, label: format!("unit {u}") }),
            Subject::Item(item) => {
                let init = match &item.kind {
                    LayerItemKind::DeepDream { start: Some(img) } => Init::Image(input_tensor(img, s.size as i64, device).squeeze_dim(0).to_device(Device::Cpu)),
                    _ => Init::Noise,
                };
                out.push(ImageSpec { rng, init, label: format!("{} item {:?}", req.technique, item.name) });
            }
        }
    }
    out
}

/// Images per subject of a request.
fn images_per_subject(req: &RenderRequest) -> usize {
    if req.technique == Technique::Diversity { req.settings.options.diversity_images as usize } else { 1 }
}

/// An input image as a `[1, C, side, side]` tensor on the device.
fn input_tensor(img: &InputImage, side: i64, device: Device) -> Tensor {
    let t = Tensor::from_slice(&img.data).reshape([1, img.channels as i64, img.size as i64, img.size as i64]).to_device(device);
    if img.size as i64 == side { t } else { resized(&t, side) }
}

/// The batch at the model's input size: one affine resampling per image. Sampling
/// `x - 0.5` with zero padding and adding 0.5 back makes everything outside the image
/// 0.5, the padding colour.
fn transformed(images: &Tensor, theta: &Tensor, input_size: i64) -> Tensor {
    let shape = images.size();
    let grid = Tensor::affine_grid_generator(theta, [shape[0], shape[1], input_size, input_size], false);
    (images - 0.5).grid_sampler(&grid, 0, 0, false) + 0.5
}

/// `[B, C, S, S]` resampled to `side` without transforms.
fn resized(images: &Tensor, side: i64) -> Tensor {
    let b = images.size()[0];
    let identity = Tensor::from_slice(&transform::IDENTITY).reshape([1, 2, 3]).repeat([b, 1, 1]).to_device(images.device());
    transformed(images, &identity, side)
}

/// The images of a request before any step: what the optimisation starts from (without
/// any re-seeding, which needs the model).
pub fn initial_images(req: &RenderRequest, device: Device) -> Vec<Rendered> {
    let s = req.settings;
    let size = s.size as usize;
    let mut specs = image_specs(req, req.subjects, device);
    let blank = blank(s);
    let values: Vec<f32> = specs.iter_mut().flat_map(|spec| start_values(s, &blank, spec)).collect();
    let param = Tensor::from_slice(&values).reshape(ParamImage::shape(&s.param, specs.len(), size).as_slice()).to_device(device);
    let images = to_pixels(&ParamImage::new(param, &s.param, size, device).image());
    let n = images_per_subject(req);
    req.subjects
        .iter()
        .zip(images.chunks(n))
        .map(|(subject, images)| Rendered {
            target: subject.target(),
            images: images.to_vec(),
            objectives: vec![f64::NAN; n],
            snapshots: Vec::new(),
            curve: Vec::new(),
            diversity: None,
            dead: false,
        })
        .collect()
}

/// Where one task's optimisation time went, summed over its steps. Measuring it
/// synchronises the device after each phase, which costs a little speed, so it is only
/// collected when asked for (`loupe render --profile`).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct StepTimes {
    pub steps: u64,
    /// The image from its spectrum, and the random affine resampling to the input size.
    pub transforms: Duration,
    /// The model up to the layer, and the objective; with the curve's passes.
    pub forward: Duration,
    pub backward: Duration,
    /// Adam's update of the spectrum, with zeroing its gradient.
    pub optimiser: Duration,
}

impl StepTimes {
    pub fn add(&mut self, other: &StepTimes) {
        self.steps += other.steps;
        self.transforms += other.transforms;
        self.forward += other.forward;
        self.backward += other.backward;
        self.optimiser += other.optimiser;
    }

    pub fn total(&self) -> Duration {
        self.transforms + self.forward + self.backward + self.optimiser
    }
}

impl std::fmt::Display for StepTimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total = self.total().as_secs_f64().max(f64::MIN_POSITIVE);
        let per_step = |d: Duration| d.as_secs_f64() * 1e3 / self.steps.max(1) as f64;
        write!(f, "{} steps, {:.2} ms/step:", self.steps, per_step(self.total()))?;
        for (name, d) in [("transforms", self.transforms), ("forward", self.forward), ("backward", self.backward), ("optimiser", self.optimiser)] {
            write!(f, " {name} {:.2} ms ({:.0}%)", per_step(d), 100.0 * d.as_secs_f64() / total)?;
        }
        Ok(())
    }
}

/// Times phases when profiling; a no-op otherwise.
struct Stopwatch<'a> {
    times: Option<&'a mut StepTimes>,
    device: Device,
    mark: Instant,
}

impl Stopwatch<'_> {
    /// Adds the time since the last lap to the phase `pick` selects.
    fn lap(&mut self, pick: fn(&mut StepTimes) -> &mut Duration) {
        if let Some(times) = self.times.as_deref_mut() {
            if let Device::Cuda(i) = self.device {
                tch::Cuda::synchronize(i as i64);
            }
            let now = Instant::now();
            *pick(times) += now - self.mark;
            self.mark = now;
        }
    }
}

/// Renders the request's subjects, in as few optimisations as the device's memory allows.
/// Each unit's or item's stream is seeded by the job seed, the layer, the technique and
/// the unit or the item's name ([`item_index`]).
///
/// `max_batch` is the largest batch, in images, known to fit (`None`: not yet known). A
/// batch that runs out of memory is halved and run again, and the limit is lowered for the
/// caller's next request; so the batch follows the device's free memory unless the job's
/// batch is smaller. A diversity unit's N images always share an optimisation. Each image
/// has its own seeded stream, so grouping never changes what is drawn. A subject whose
/// optimisation diverges is [`Diverged`]; the rest of the request still renders.
pub fn render(model: &dyn Model, req: &RenderRequest, signals: &TaskSignals, max_batch: &mut Option<usize>, times: Option<&mut StepTimes>) -> Result<Vec<Outcome>> {
    check(req)?;
    let mut times = times;
    let n = images_per_subject(req);
    in_batches(req.subjects, n, max_batch, |subjects| {
        let specs = image_specs(req, subjects, model.device());
        let goal = Goal::for_batch(model, req, subjects)?;
        let o = Optimisation { model, layer: req.layer, settings: req.settings, goal: &goal, signals };
        Ok(optimise(&o, specs, times.as_deref_mut())?.per_subject(subjects, n))
    })
}

/// Runs `f` over `items` in batches of at most `*max_batch` images, each item taking
/// `per_item` images (at least one item a batch), halving the batch (and the limit) when
/// `f` runs out of memory.
fn in_batches<I, T>(items: &[I], per_item: usize, max_batch: &mut Option<usize>, mut f: impl FnMut(&[I]) -> Result<Vec<T>>) -> Result<Vec<T>> {
    let per_item = per_item.max(1);
    let mut out = Vec::with_capacity(items.len());
    let mut rest = items;
    while !rest.is_empty() {
        let n = (max_batch.unwrap_or(usize::MAX) / per_item).min(rest.len()).max(1);
        match f(&rest[..n]) {
            Ok(done) => {
                out.extend(done);
                rest = &rest[n..];
            }
            Err(Error::OutOfMemory(msg)) if n > 1 => {
                tracing::info!(batch = n * per_item, "out of memory ({msg}); halving the batch");
                *max_batch = Some(n / 2 * per_item);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// What one optimisation maximises, per batch element.
enum Goal {
    /// Element b's objective for unit `units[b]` (channel, neuron, negative).
    Unit { technique: Technique, units: Tensor },
    /// Groups of `n` consecutive elements share a unit: each element's channel objective,
    /// and `weight` times each group's [`diversity_penalty`].
    Diversity { units: Tensor, n: i64, weight: f64, penalty: DiversityPenalty },
    DeepDream,
    /// `targets[b]`: element b's input image's activation.
    Caricature { targets: Tensor, pow: f64 },
    /// `vectors[b]`: element b's direction.
    Direction { vectors: Tensor, pow: f64 },
}

impl Goal {
    /// The goal of a batch of the request's subjects, which [`check`] has found to suit
    /// the technique. Any per-unit technique but diversity is [`objective`] of one unit
    /// per element.
    fn for_batch(model: &dyn Model, req: &RenderRequest, subjects: &[Subject]) -> Result<Goal> {
        let (s, device) = (req.settings, model.device());
        let units = || subjects.iter().filter_map(|x| if let Subject::Unit(u) = x { Some(*u) } else { None });
        let items = || subjects.iter().filter_map(|x| if let Subject::Item(item) = x { Some(&item.kind) } else { None });
        Ok(match req.technique {
            Technique::DeepDream => Goal::DeepDream,
            Technique::Caricature => {
                let inputs: Vec<Tensor> = items()
                    .filter_map(|kind| if let LayerItemKind::Caricature { input } = kind { Some(input_tensor(input, s.input_size as i64, device)) } else { None })
                    .collect();
                let _no_grad = tch::no_grad_guard();
                let targets = model.activation(&Tensor::cat(&inputs, 0), req.layer)?.to_kind(Kind::Float);
                Goal::Caricature { targets, pow: s.options.caricature_cossim_pow }
            }
            Technique::Direction => {
                let rows: Vec<Tensor> =
                    items().filter_map(|kind| if let LayerItemKind::Direction { vector } = kind { Some(Tensor::from_slice(vector).reshape([1, -1])) } else { None }).collect();
                Goal::Direction { vectors: Tensor::cat(&rows, 0).to_device(device), pow: s.options.direction_cossim_pow }
            }
            Technique::Diversity => {
                let n = images_per_subject(req);
                let repeated: Vec<u32> = units().flat_map(|u| std::iter::repeat_n(u, n)).collect();
                Goal::Diversity { units: unit_tensor(&repeated, device), n: n as i64, weight: s.options.diversity_weight, penalty: s.options.diversity_penalty }
            }
            technique => Goal::Unit { technique, units: unit_tensor(&units().collect::<Vec<_>>(), device) },
        })
    }

    /// The objective each element reports, `[B]`.
    fn values(&self, act: &Tensor, layer: &str) -> Result<Tensor> {
        let shape = act.size();
        if !(shape.len() == 2 || shape.len() == 4) {
            return Err(Error::Model(format!("layer {layer:?} has activation shape {shape:?}; expected [N, C, H, W] or [N, C]")));
        }
        match self {
            Goal::Unit { technique, units } => objective(act, *technique, units, layer),
            Goal::Diversity { units, .. } => objective(act, Technique::Channel, units, layer),
            Goal::DeepDream => Ok(deepdream(act)),
            Goal::Caricature { targets, pow } => Ok(caricature(act, targets, *pow)),
            Goal::Direction { vectors, pow } => {
                if vectors.size()[1] != shape[1] {
                    return Err(Error::Model(format!("a direction has {} values, but layer {layer:?} has {} units", vectors.size()[1], shape[1])));
                }
                Ok(direction(act, vectors, *pow))
            }
        }
    }

    /// What Adam minimises: minus the sum of the values, plus the diversity penalty; and
    /// the values, `[B]`.
    fn loss(&self, act: &Tensor, layer: &str) -> Result<(Tensor, Tensor)> {
        let values = self.values(act, layer)?;
        let value = values.sum(Kind::Float);
        let loss = match self {
            Goal::Diversity { n, weight, penalty, .. } => -(value - diversity_penalty(act, &values, *n, *penalty).sum(Kind::Float) * *weight),
            _ => -value,
        };
        Ok((loss, values))
    }

    /// Element b's own objective, alone in a batch of one: what the dead-unit check asks
    /// to move (diversity's channel objective, without the penalty).
    fn single(&self, b: i64) -> Goal {
        match self {
            Goal::Unit { technique, units } => Goal::Unit { technique: *technique, units: units.narrow(0, b, 1) },
            Goal::Diversity { units, .. } => Goal::Unit { technique: Technique::Channel, units: units.narrow(0, b, 1) },
            Goal::DeepDream => Goal::DeepDream,
            Goal::Caricature { targets, pow } => Goal::Caricature { targets: targets.narrow(0, b, 1), pow: *pow },
            Goal::Direction { vectors, pow } => Goal::Direction { vectors: vectors.narrow(0, b, 1), pow: *pow },
        }
    }
}

/// One optimisation's fixed parts: its goal at `layer` of `model` under `settings`, and
/// the signals it counts its steps on and that stop it.
struct Optimisation<'a> {
    model: &'a dyn Model,
    layer: &'a str,
    settings: &'a RenderSettings,
    goal: &'a Goal,
    signals: &'a TaskSignals,
}

/// An optimisation's result, in the order of its images.
struct Optimised {
    /// `[B, C, S, S]` in [0, 1], on the CPU.
    images: Tensor,
    objectives: Vec<f64>,
    /// After each threshold's steps, the images.
    snapshots: Vec<(u32, Tensor)>,
    /// After each of [`curve_steps`], every image's objective.
    curve: Vec<(u32, Vec<f64>)>,
    dead: Vec<bool>,
    /// Per image, why its optimisation diverged, if it did.
    diverged: Vec<Option<String>>,
}

impl Optimised {
    /// The images of `subjects`, `n` consecutive images each; a subject with a diverged
    /// image has none.
    fn per_subject(self, subjects: &[Subject], n: usize) -> Vec<Outcome> {
        let pixels = to_pixels(&self.images);
        let snapshots: Vec<(u32, Vec<Pixels>)> = self.snapshots.iter().map(|(step, t)| (*step, to_pixels(t))).collect();
        subjects
            .iter()
            .enumerate()
            .map(|(i, subject)| {
                let range = i * n..(i + 1) * n;
                if let Some(reason) = self.diverged[range.clone()].iter().flatten().next() {
                    return Err(Diverged { target: subject.target(), reason: reason.clone() });
                }
                Ok(Rendered {
                    target: subject.target(),
                    images: pixels[range.clone()].to_vec(),
                    objectives: self.objectives[range.clone()].to_vec(),
                    snapshots: snapshots.iter().map(|(step, p)| Snapshot { step: *step, images: p[range.clone()].to_vec() }).collect(),
                    curve: self.curve.iter().map(|(step, values)| (*step, values[range.clone()].to_vec())).collect(),
                    diversity: pixel_distance(&pixels[range.clone()]),
                    dead: matches!(subject, Subject::Unit(_)) && self.dead[range].iter().all(|&d| d),
                })
            })
            .collect()
    }
}

/// The amplitudes, as multiples of the initial N(0, 0.01), of the re-drawn initial images
/// of `DeadUnits::Reseed`. The default initial image is nearly flat grey (pixel standard
/// deviation about 0.0025 at 32 px), which cannot turn on a ReLU unit whose bias wants more
/// contrast. Measured pixel standard deviations: x10 about 0.02 (a faint pattern), x50
/// about 0.1 (full contrast), x250 about 0.33 (the sigmoid saturated over most pixels).
/// On the demo model every unit that is off on the default image came on by x20 at most
/// (conv1 2, 5, 7 at x2 to x5; conv3 2 at x10, conv3 14 at x20). A unit that none of the
/// three excites is taken as dead for this model.
pub const RESEED_AMPLITUDES: [f64; 3] = [10.0, 50.0, 250.0];

/// The parameterisation of nothing, on the CPU: what inverts a start image into
/// initial values.
fn blank(s: &RenderSettings) -> ParamImage {
    ParamImage::new(Tensor::zeros([1].as_slice(), (Kind::Float, Device::Cpu)), &s.param, s.size as usize, Device::Cpu)
}

/// An image's initial values: its start image's, or drawn from its stream.
fn start_values(s: &RenderSettings, blank: &ParamImage, spec: &mut ImageSpec) -> Vec<f32> {
    match &spec.init {
        Init::Image(img) => Vec::<f32>::try_from(blank.invert(&img.unsqueeze(0)).flatten(0, -1)).expect("a float tensor converts to floats"),
        Init::Noise => ParamImage::draw(&s.param, s.size as usize, INIT_SD, &mut spec.rng),
    }
}

/// The batch's initial values, in image order, and per image whether it is dead: under
/// `DeadUnits::Reseed` a noise image that leaves its goal unexcited is re-drawn
/// ([`reseeded`]).
fn initial_values(o: &Optimisation, specs: &mut [ImageSpec]) -> Result<(Vec<f32>, Vec<bool>)> {
    let s = o.settings;
    let blank = blank(s);
    let mut dead = vec![false; specs.len()];
    let mut init: Vec<f32> = Vec::with_capacity(specs.len() * ParamImage::values_per_image(&s.param, s.size as usize));
    for (b, spec) in specs.iter_mut().enumerate() {
        let mut values = start_values(s, &blank, spec);
        if matches!(spec.init, Init::Noise) && s.dead_units == DeadUnits::Reseed {
            (values, dead[b]) = reseeded(o, b, spec, values)?;
        }
        init.extend(values);
    }
    Ok((init, dead))
}

/// Image b's noise `values`, or, when they leave b's own goal unexcited, values drawn
/// again at each of [`RESEED_AMPLITUDES`] in turn until one excites it; and whether none
/// did (dead: then the first values and the stream after them are kept, as under `Keep`).
fn reseeded(o: &Optimisation, b: usize, spec: &mut ImageSpec, values: Vec<f32>) -> Result<(Vec<f32>, bool)> {
    let single = o.goal.single(b as i64);
    if !unexcited(o, &single, &values)? {
        return Ok((values, false));
    }
    let kept = spec.rng.clone();
    for k in RESEED_AMPLITUDES {
        o.signals.step()?;
        let again = ParamImage::draw(&o.settings.param, o.settings.size as usize, INIT_SD * k, &mut spec.rng);
        if !unexcited(o, &single, &again)? {
            tracing::debug!(image = %spec.label, amplitude = k, "re-seeded an unexcited initial image");
            return Ok((again, false));
        }
    }
    tracing::debug!(image = %spec.label, "no initial image excites it: dead");
    spec.rng = kept;
    Ok((values, true))
}

/// Whether an image gives `goal` (of one element) a zero value and a zero gradient.
fn unexcited(o: &Optimisation, goal: &Goal, values: &[f32]) -> Result<bool> {
    let (s, device, layer) = (o.settings, o.model.device(), o.layer);
    let size = s.size as usize;
    let param = Tensor::from_slice(values).reshape(ParamImage::shape(&s.param, 1, size).as_slice()).to_device(device).set_requires_grad(true);
    let image = ParamImage::new(param.shallow_clone(), &s.param, size, device);
    let value = goal.values(&o.model.activation(&resized(&image.image(), s.input_size as i64), layer)?, layer)?.sum(Kind::Float);
    if value.double_value(&[]) != 0.0 {
        return Ok(false);
    }
    value.f_backward().map_err(torch)?;
    Ok(param.grad().abs().max().double_value(&[]) == 0.0)
}

/// One optimisation of all the given images together.
fn optimise(o: &Optimisation, mut specs: Vec<ImageSpec>, times: Option<&mut StepTimes>) -> Result<Optimised> {
    let (s, device, layer) = (o.settings, o.model.device(), o.layer);
    if s.param.decorrelate && s.param.channels != 3 {
        return Err(Error::Model(format!("colour decorrelation needs 3 channels, not {}", s.param.channels)));
    }
    let batch = specs.len();
    let (init, dead) = initial_values(o, &mut specs)?;
    let mut rngs: Vec<SplitMix64> = specs.iter().map(|spec| spec.rng.clone()).collect();
    // Every step's transform (and noise seed) for every image, drawn up front and moved
    // once, so the loop never waits on the host.
    let draws = transform::draws(s.steps, s.size, &s.transforms, &mut rngs);
    let thetas = Tensor::from_slice(&draws.thetas).reshape([s.steps as i64, batch as i64, 2, 3]).to_device(device);
    let noise_seeds = (s.transforms.noise > 0.0).then(|| Tensor::from_slice(&draws.noise_seeds).reshape([s.steps as i64, batch as i64]).to_device(device));
    let Ascent { image, snapshots, divergence, mut curve } = ascend(o, &init, batch, &thetas, noise_seeds.as_ref(), times)?;

    let _no_grad = tch::no_grad_guard();
    let images = image.image();
    let value = o.goal.values(&o.model.activation(&resized(&images, s.input_size as i64), layer)?, layer)?;
    let objectives: Vec<f64> = Vec::<f32>::try_from(&value.to_device(Device::Cpu)).map_err(torch)?.into_iter().map(f64::from).collect();
    if s.steps > 0 {
        curve.push((s.steps, value));
    }
    let curve = curve_values(curve, batch)?;
    let finite = Vec::<bool>::try_from(images.isfinite().flatten(1, -1).all_dim(1, false).to_device(Device::Cpu)).map_err(torch)?;
    let mut diverged = divergence.reasons()?;
    for (b, reason) in diverged.iter_mut().enumerate() {
        if reason.is_none() && !objectives[b].is_finite() {
            *reason = Some(format!("objective is {} on the final image", objectives[b]));
        }
        if reason.is_none() && !finite[b] {
            *reason = Some("the image is not finite".to_string());
        }
        // An objective that was not finite on the way: the record could not hold it (JSON
        // has no NaN), and the image went through a state the model cannot score.
        let unmeasurable = curve.iter().map(|(step, values)| (step, values[b])).find(|(_, v)| !v.is_finite());
        if let (None, Some((step, v))) = (&reason, unmeasurable) {
            *reason = Some(format!("objective on the untransformed image became {v} at step {step}"));
        }
        if let Some(why) = reason {
            tracing::warn!(image = %specs[b].label, layer, "the optimisation diverged: {why}");
        }
    }
    Ok(Optimised { images: images.to_device(Device::Cpu), objectives, snapshots, curve, dead, diverged })
}

/// The steps after which the curve measures the objective: 1, 2, 4, ... below the steps,
/// each threshold, and the last step; ascending, none twice (none without steps).
pub fn curve_steps(s: &RenderSettings) -> Vec<u32> {
    let powers = std::iter::successors(Some(1u32), |p| p.checked_mul(2)).take_while(|&p| p < s.steps);
    let mut steps: Vec<u32> = powers.chain(s.thresholds.iter().copied()).chain((s.steps > 0).then_some(s.steps)).collect();
    steps.sort_unstable();
    steps.dedup();
    steps
}

/// The curve's `[B]` objectives by step, moved to the host at once: per step, each image's.
fn curve_values(curve: Vec<(u32, Tensor)>, batch: usize) -> Result<Vec<(u32, Vec<f64>)>> {
    if curve.is_empty() {
        return Ok(Vec::new());
    }
    let (steps, values): (Vec<u32>, Vec<Tensor>) = curve.into_iter().unzip();
    let values = Vec::<f32>::try_from(Tensor::stack(&values, 0).to_kind(Kind::Float).to_device(Device::Cpu).flatten(0, -1)).map_err(torch)?;
    Ok(steps.into_iter().zip(values.chunks(batch.max(1))).map(|(step, v)| (step, v.iter().map(|&x| f64::from(x)).collect())).collect())
}

/// How different images of one subject are: the mean over pairs of the root mean square
/// difference of their pixels as values in [0, 1] (0: identical); `None` for fewer than
/// two images.
pub fn pixel_distance(images: &[Pixels]) -> Option<f64> {
    let mut sum = 0.0;
    let mut pairs = 0usize;
    for (i, a) in images.iter().enumerate() {
        for b in &images[i + 1..] {
            let squares: f64 = a.bytes.iter().zip(&b.bytes).map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2)).sum();
            sum += (squares / a.bytes.len().max(1) as f64).sqrt() / 255.0;
            pairs += 1;
        }
    }
    (pairs > 0).then(|| sum / pairs as f64)
}

/// Per image, the first step at which its objective was not finite and its value then,
/// kept on the device so that the steps never wait on the host.
struct Divergence {
    /// `[B]`: the step (from 1), or 0 while the objective has stayed finite.
    step: Tensor,
    /// `[B]`: the objective at that step.
    value: Tensor,
}

impl Divergence {
    fn new(batch: usize, device: Device) -> Divergence {
        Divergence { step: Tensor::zeros([batch as i64], (Kind::Int64, device)), value: Tensor::zeros([batch as i64], (Kind::Float, device)) }
    }

    /// Notes the objectives `values` (`[B]`) of step `step`.
    fn note(&mut self, step: i64, values: &Tensor) {
        let _no_grad = tch::no_grad_guard();
        let keep = values.isfinite().logical_or(&self.step.ne(0));
        self.step = self.step.where_scalarother(&keep, step);
        self.value = self.value.where_self(&keep, &values.detach().to_kind(Kind::Float));
    }

    /// Per image, e.g. "objective became NaN at step 37", if it did.
    fn reasons(&self) -> Result<Vec<Option<String>>> {
        let steps = Vec::<i64>::try_from(self.step.to_device(Device::Cpu)).map_err(torch)?;
        let values = Vec::<f32>::try_from(self.value.to_device(Device::Cpu)).map_err(torch)?;
        Ok(steps.iter().zip(values).map(|(&step, value)| (step > 0).then(|| format!("objective became {value} at step {step}"))).collect())
    }
}

/// What Adam's steps leave.
struct Ascent {
    /// The parameterised images after the last step.
    image: ParamImage,
    /// After each threshold's steps, the images.
    snapshots: Vec<(u32, Tensor)>,
    /// Where each image's objective stopped being finite.
    divergence: Divergence,
    /// After each of [`curve_steps`] but the last, the objectives, `[B]`, still on the
    /// device.
    curve: Vec<(u32, Tensor)>,
}

/// Adam's steps from the `batch` images' initial values `init`, each step through its
/// transforms `thetas[step]` and, with noise, the noise of `noise_seeds[step]`. After each
/// of [`curve_steps`] but the last (which the final objectives measure), the objectives on
/// the untransformed images, without a gradient and without waiting on the host.
fn ascend(o: &Optimisation, init: &[f32], batch: usize, thetas: &Tensor, noise_seeds: Option<&Tensor>, times: Option<&mut StepTimes>) -> Result<Ascent> {
    let (s, device, layer) = (o.settings, o.model.device(), o.layer);
    let size = s.size as usize;
    let vs = nn::VarStore::new(device);
    let init = Tensor::from_slice(init).reshape(ParamImage::shape(&s.param, batch, size).as_slice()).to_device(device);
    let image = ParamImage::new(vs.root().var_copy("spectrum", &init), &s.param, size, device);
    let mut adam = nn::OptimizerConfig::build(nn::Adam::default(), &vs, s.learning_rate).map_err(torch)?;

    let mut snapshots = Vec::with_capacity(s.thresholds.len());
    let mut divergence = Divergence::new(batch, device);
    let measured = curve_steps(s);
    let mut curve = Vec::with_capacity(measured.len());
    let mut watch = Stopwatch { times, device, mark: Instant::now() };
    for step in 0..s.steps as i64 {
        o.signals.step()?;
        let mut x = transformed(&image.image(), &thetas.get(step), s.input_size as i64);
        if let Some(seeds) = noise_seeds {
            x = &x + transform::noise(&seeds.get(step), &x.size(), f64::from(s.transforms.noise));
        }
        watch.lap(|t| &mut t.transforms);
        let (loss, values) = o.goal.loss(&o.model.activation(&x, layer)?, layer)?;
        divergence.note(step + 1, &values);
        watch.lap(|t| &mut t.forward);
        adam.zero_grad();
        loss.f_backward().map_err(torch)?;
        watch.lap(|t| &mut t.backward);
        adam.step();
        watch.lap(|t| &mut t.optimiser);
        let done = step as u32 + 1;
        if done < s.steps && measured.contains(&done) {
            let _no_grad = tch::no_grad_guard();
            curve.push((done, o.goal.values(&o.model.activation(&resized(&image.image(), s.input_size as i64), layer)?, layer)?));
            watch.lap(|t| &mut t.forward);
        }
        if s.thresholds.contains(&done) {
            let _no_grad = tch::no_grad_guard();
            snapshots.push((done, image.image().to_device(Device::Cpu)));
            watch.mark = Instant::now();
        }
    }
    if let Some(t) = watch.times.as_deref_mut() {
        t.steps += s.steps as u64;
    }
    Ok(Ascent { image, snapshots, divergence, curve })
}

/// `[B, C, S, S]` in [0, 1] -> per-image bytes, rounded to nearest: RGB from the first
/// three channels, or grey from the first when there are fewer than three.
fn to_pixels(images: &Tensor) -> Vec<Pixels> {
    let c = images.size()[1];
    let (channels, images) = if c >= 3 { (3u8, images.narrow(1, 0, 3)) } else { (1u8, images.narrow(1, 0, 1)) };
    let bytes = (images.to_device(Device::Cpu) * 255.0).round().clamp(0.0, 255.0).to_kind(Kind::Uint8).permute([0, 2, 3, 1]).contiguous();
    let b = bytes.size()[0] as usize;
    let flat = Vec::<u8>::try_from(bytes.flatten(0, -1)).expect("a uint8 tensor converts to bytes");
    let per_image = flat.len() / b.max(1);
    flat.chunks(per_image.max(1)).take(b).map(|bytes| Pixels { channels, bytes: bytes.to_vec() }).collect()
}

fn torch(e: tch::TchError) -> Error {
    let msg = e.to_string();
    if crate::is_out_of_memory(&msg) {
        Error::OutOfMemory(msg.lines().next().unwrap_or_default().to_string())
    } else {
        Error::Torch(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_halve_on_out_of_memory_and_remember_the_limit() {
        let units: Vec<u32> = (0..10).collect();
        let mut limit = None;
        let mut tried = Vec::new();
        let out = in_batches(&units, 1, &mut limit, |chunk| {
            tried.push(chunk.len());
            if chunk.len() > 3 { Err(Error::OutOfMemory("too big".into())) } else { Ok(chunk.to_vec()) }
        })
        .unwrap();
        assert_eq!(out, units, "every unit once, in order");
        assert_eq!(limit, Some(2));
        assert_eq!(tried, vec![10, 5, 2, 2, 2, 2, 2]);
        // The next request starts from the remembered limit.
        tried.clear();
        in_batches(&units[..4], 1, &mut limit, |c| {
            tried.push(c.len());
            Ok(c.to_vec())
        })
        .unwrap();
        assert_eq!(tried, vec![2, 2]);
    }

    #[test]
    fn out_of_memory_at_one_unit_and_other_errors_are_returned() {
        let mut limit = Some(1);
        let e = in_batches(&[1, 2], 1, &mut limit, |_| Err::<Vec<u32>, _>(Error::OutOfMemory("x".into()))).unwrap_err();
        assert!(matches!(e, Error::OutOfMemory(_)));
        let mut limit = None;
        let e = in_batches(&[1, 2], 1, &mut limit, |_| Err::<Vec<u32>, _>(Error::Model("bad".into()))).unwrap_err();
        assert!(matches!(e, Error::Model(_)));
        assert_eq!(limit, None);
    }

    use crate::model::TorchScript;
    use crate::objective::diversity_similarity;
    use loupe_core::spec::{CropSchedule, ParamKind, ParamSettings, Precision, TransformSettings};

    fn model(path: &str) -> TorchScript {
        TorchScript::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path), Device::Cpu).unwrap()
    }

    fn settings(steps: u32, size: u32) -> RenderSettings {
        RenderSettings { steps, size, input_size: size, seed: 7, learning_rate: 0.05, ..Default::default() }
    }

    fn run(m: &dyn Model, layer: &str, technique: Technique, units: &[u32], s: &RenderSettings) -> Vec<Rendered> {
        rendered(render(m, &RenderRequest { layer, technique, subjects: &unit_subjects(units), settings: s }, &TaskSignals::default(), &mut None, None).unwrap())
    }

    /// The images of subjects none of which diverged.
    fn rendered(outcomes: Vec<Outcome>) -> Vec<Rendered> {
        outcomes.into_iter().map(|o| o.unwrap_or_else(|d| panic!("{} diverged: {}", d.target, d.reason))).collect()
    }

    fn run_layer(m: &dyn Model, layer: &str, technique: Technique, items: &[LayerItem], s: &RenderSettings) -> Vec<Rendered> {
        try_run_layer(m, layer, technique, items, s).unwrap()
    }

    fn try_run_layer(m: &dyn Model, layer: &str, technique: Technique, items: &[LayerItem], s: &RenderSettings) -> Result<Vec<Rendered>> {
        let subjects: Vec<Subject> = items.iter().cloned().map(Subject::Item).collect();
        render(m, &RenderRequest { layer, technique, subjects: &subjects, settings: s }, &TaskSignals::default(), &mut None, None).map(rendered)
    }

    fn unit_subjects(units: &[u32]) -> Vec<Subject> {
        units.iter().map(|&u| Subject::Unit(u)).collect()
    }

    /// The unit a per-unit render's images show.
    fn unit(r: &Rendered) -> u32 {
        match r.target {
            Target::Unit(u) => u,
            Target::Item(ref name) => panic!("item {name:?} where a unit was rendered"),
        }
    }

    /// The objective of `technique` for `unit` on given pixels (resized to the input).
    fn score(m: &dyn Model, layer: &str, technique: Technique, unit: u32, p: &Pixels, s: &RenderSettings) -> f64 {
        let _g = tch::no_grad_guard();
        let x = pixels_tensor(p, s.size);
        let act = m.activation(&resized(&x, s.input_size as i64), layer).unwrap();
        objective(&act, technique, &unit_tensor(&[unit], Device::Cpu), layer).unwrap().double_value(&[0])
    }

    /// `[1, C, S, S]` in [0, 1] from bytes.
    fn pixels_tensor(p: &Pixels, size: u32) -> Tensor {
        let c = p.channels as i64;
        let s = size as i64;
        Tensor::from_slice(&p.bytes).reshape([s, s, c]).permute([2, 0, 1]).unsqueeze(0).to_kind(Kind::Float) / 255.0
    }

    /// lucid's diversity similarity of a unit's images at the layer.
    fn similarity(m: &dyn Model, layer: &str, images: &[Pixels], s: &RenderSettings) -> f64 {
        let _g = tch::no_grad_guard();
        let x = Tensor::cat(&images.iter().map(|p| pixels_tensor(p, s.size)).collect::<Vec<_>>(), 0);
        let act = m.activation(&resized(&x, s.input_size as i64), layer).unwrap();
        diversity_similarity(&act, images.len() as i64).double_value(&[0])
    }

    fn l1(a: &Pixels, b: &Pixels) -> f64 {
        a.bytes.iter().zip(&b.bytes).map(|(&x, &y)| (x as f64 - y as f64).abs()).sum::<f64>() / a.bytes.len() as f64 / 255.0
    }

    fn mean_pairwise_l1(images: &[Pixels]) -> f64 {
        let mut total = 0.0;
        let mut n = 0;
        for i in 0..images.len() {
            for j in i + 1..images.len() {
                total += l1(&images[i], &images[j]);
                n += 1;
            }
        }
        total / n as f64
    }

    /// A 3-channel input: `f(y, x)` in [0, 1] as grey.
    fn synthetic(size: u32, f: impl Fn(u32, u32) -> f32) -> InputImage {
        let plane: Vec<f32> = (0..size).flat_map(|y| (0..size).map(move |x| (y, x))).map(|(y, x)| f(y, x)).collect();
        InputImage { channels: 3, size, data: [plane.clone(), plane.clone(), plane].concat() }
    }

    fn grey(p: &Pixels) -> Vec<f64> {
        p.bytes.chunks(p.channels as usize).map(|px| px.iter().map(|&v| v as f64).sum::<f64>() / px.len() as f64 / 255.0).collect()
    }

    fn correlation(a: &[f64], b: &[f64]) -> f64 {
        let n = a.len() as f64;
        let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
        let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
        let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
        let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
        cov / (va * vb).sqrt().max(1e-12)
    }

    /// The variance of the row means over that of the column means: large for
    /// horizontal stripes, about 1 for no orientation.
    fn row_col_ratio(g: &[f64], size: usize) -> f64 {
        let rows: Vec<f64> = (0..size).map(|y| g[y * size..(y + 1) * size].iter().sum::<f64>() / size as f64).collect();
        let cols: Vec<f64> = (0..size).map(|x| (0..size).map(|y| g[y * size + x]).sum::<f64>() / size as f64).collect();
        let var = |v: &[f64]| {
            let m = v.iter().sum::<f64>() / v.len() as f64;
            v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64
        };
        var(&rows) / var(&cols).max(1e-12)
    }

    fn input_grey(img: &InputImage) -> Vec<f64> {
        img.data[..(img.size * img.size) as usize].iter().map(|&v| v as f64).collect()
    }

    /// Images rendered with the default settings before the parameterisation, transforms,
    /// techniques and dead units became settings (sha256 of each unit's RGB bytes; seed 7,
    /// 20 steps): the defaults must keep rendering exactly these. Only fp32 is pinned:
    /// these bytes are the same under libtorch's AVX2 and AVX-512 kernels and with one
    /// thread or two, though not under its kernels without SIMD; AVX2 is the least CPU
    /// supported (docs/techniques.md "Determinism"). bf16 bytes differ between CPU kinds
    /// and are checked by their tolerance below.
    #[test]
    fn default_settings_render_the_images_loupe_always_rendered() {
        let cases: [(&str, &str, Technique, &[u32], u32, &[&str]); 3] = [
            ("tests/fixtures/tiny.pt", "conv", Technique::Channel, &[0, 1, 2, 3], 16, &[
                "782ce7183ac09ebcfffb66d11aa46622b1d6c5e9f89ea193fa16f18b8f6ce9d0",
                "5b46777878b97a2420e4897711aa6e037a70b7eb4605c479eef07d16a7cffbb0",
                "6d4490f356ea3fccb71e5d7372ab72cc49ff054c5c8819420d847b476972e56d",
                "53d74f8636a822341fb51106f12b1ad8540ee3dbcd89f0adba1254c48bd9ecac",
            ]),
            ("tests/fixtures/tiny.pt", "conv", Technique::Neuron, &[0, 1, 2, 3], 16, &[
                "3f99c6acc02d808511c0f661aac61181239c4a4ad10b23c547f4ddab896878b8",
                "6f0fa0b7058d98151173a9d3aa3d19ad8725ed26acf6f029f40747967092e103",
                "d53b6470fb204dbd7184a7d4f6ebbac64a00fd703bdd1eb0c9f67030b30a7961",
                "418a8b049384f57fec211a060815885222f6e1721e3296a36453e2e53f73b1f9",
            ]),
            ("models/demo/demo.pt", "conv3", Technique::Channel, &[0, 1, 3], 32, &[
                "70e478b030371102ccd6504447f7bbecab250c5cf14493f6e30ece8457cdb89d",
                "54efd35a82ca917f672537830889fada78f1def7184d53e723bd25490f9e9dc8",
                "172f087bfe3fb4810304155a1847a7bb66b8281217f90037322b16a881352d31",
            ]),
        ];
        for (path, layer, technique, units, size, want) in cases {
            let out = run(&model(path), layer, technique, units, &settings(20, size));
            for (u, want) in out.iter().zip(want) {
                assert_eq!((u.images.len(), u.images[0].channels, u.snapshots.len(), u.dead), (1, 3, 0, false));
                assert_eq!(loupe_core::sha256_bytes(&u.images[0].bytes), *want, "{path} {layer} {technique} unit {}", unit(u));
            }
        }
    }

    /// bf16's guard (docs/benchmarks.md "bf16"): each unit's final objective, scored at
    /// the render's precision, stays within 10% of fp32's, on every CPU; both are well
    /// above the objective of the start image, so the check cannot pass without the
    /// optimisation.
    #[test]
    fn bf16_renders_reach_the_fp32_objective_within_its_tolerance() {
        let units: Vec<u32> = (0..10).collect();
        let fp32 = model("models/demo/demo.pt");
        let bf16 = model("models/demo/demo.pt").in_precision(Precision::Bf16);
        let s = settings(512, 64);
        let req = RenderRequest { layer: "logits", technique: Technique::Channel, subjects: &unit_subjects(&units), settings: &s };
        let start = initial_images(&req, Device::Cpu);
        let want = run(&fp32, "logits", Technique::Channel, &units, &s);
        let got = run(&bf16, "logits", Technique::Channel, &units, &RenderSettings { precision: Precision::Bf16, ..s.clone() });
        for ((w, g), st) in want.iter().zip(&got).zip(&start) {
            let (w, g) = (w.objectives[0], g.objectives[0]);
            let before = score(&fp32, "logits", Technique::Channel, unit(st), &st.images[0], &s);
            assert!(w > before + 1.0 && g > before + 1.0, "unit {}: optimised {w} (fp32), {g} (bf16) from {before}", unit(st));
            assert!((g - w).abs() <= 0.10 * w.abs(), "unit {}: bf16 objective {g} is not within 10% of fp32's {w}", unit(st));
        }
    }

    /// Every image's draws come from its own stream, so grouping does not change any
    /// image: diversity units (whose N images always stay together), the pixel and MACO
    /// parameterisations, crops and noise, re-seeded units and layer items.
    #[test]
    fn batching_does_not_change_any_image() {
        let demo = model("models/demo/demo.pt");
        let mut s = settings(12, 16);
        s.options.diversity_images = 3;
        s.dead_units = DeadUnits::Reseed;
        let req = |subjects: &'static [Subject], technique, s: &'static RenderSettings| RenderRequest { layer: "conv3", technique, subjects, settings: s };
        let s: &'static RenderSettings = Box::leak(Box::new(s));
        let pixel: &'static RenderSettings = Box::leak(Box::new(RenderSettings { param: ParamSettings { kind: ParamKind::Pixel, ..Default::default() }, ..s.clone() }));
        let transforms = TransformSettings { crop: Some(CropSchedule { start: 0.9, end: 0.5 }), noise: 0.05, ..Default::default() };
        let maco: &'static RenderSettings = Box::leak(Box::new(RenderSettings { param: ParamSettings { maco: true, ..Default::default() }, transforms, ..s.clone() }));
        for (technique, s) in [(Technique::Diversity, s), (Technique::Channel, pixel), (Technique::Channel, s), (Technique::Diversity, maco)] {
            let r = req(Box::leak(unit_subjects(&[0, 14, 1]).into_boxed_slice()), technique, s);
            let together = rendered(render(&demo, &r, &TaskSignals::default(), &mut None, None).unwrap());
            let per = images_per_subject(&r);
            let mut limit = Some(per);
            let alone = rendered(render(&demo, &r, &TaskSignals::default(), &mut limit, None).unwrap());
            for (a, b) in together.iter().zip(&alone) {
                assert_eq!(a.images, b.images, "{technique} unit {}", unit(a));
                assert_eq!(a.images.len(), per);
            }
        }
        let items: Vec<LayerItem> =
            ["a", "b", "c"].iter().map(|n| LayerItem { name: n.to_string(), kind: LayerItemKind::DeepDream { start: None } }).collect();
        let together = run_layer(&demo, "conv2", Technique::DeepDream, &items, s);
        let alone = run_layer(&demo, "conv2", Technique::DeepDream, &items[1..2], s);
        assert_eq!(together[1].images[0], alone[0].images[0], "an item's image does not depend on the others");
        assert_ne!(together[0].images[0], together[1].images[0], "items have their own streams");
    }

    /// Unit 0's diversity images at `layer` without the penalty and under `diverse`'s, and
    /// lucid's similarity of each set.
    fn with_and_without_penalty(demo: &dyn Model, layer: &str, diverse: &RenderSettings) -> (Rendered, Rendered, f64, f64) {
        let mut plain = diverse.clone();
        plain.options.diversity_weight = 0.0;
        let without = run(demo, layer, Technique::Diversity, &[0], &plain).remove(0);
        let with = run(demo, layer, Technique::Diversity, &[0], diverse).remove(0);
        let (sim_without, sim_with) = (similarity(demo, layer, &without.images, &plain), similarity(demo, layer, &with.images, diverse));
        (without, with, sim_without, sim_with)
    }

    /// lucid's diversity pushes a unit's images apart: lucid's similarity (the summed
    /// pairwise cosine of their Gram matrices at the layer, over N; at most N - 1 = 3)
    /// falls from about 3 (measured 2.99 for these images without the penalty: the images
    /// differ only in detail) to about 1.2 at lucid's weight. Each image still excites the
    /// unit: its channel objective stays above its initial image's, and their mean is
    /// several times it.
    #[test]
    fn diversity_images_differ_and_each_excites_the_unit() {
        let demo = model("models/demo/demo.pt");
        let layer = "conv3";
        let mut diverse = settings(64, 32);
        diverse.options.diversity_penalty = DiversityPenalty::Lucid;
        diverse.options.diversity_weight = DiversityPenalty::Lucid.default_weight();
        assert_eq!((diverse.options.diversity_images, diverse.options.diversity_weight), (4, 100.0));
        let (_, with, sim_without, sim_with) = with_and_without_penalty(&demo, layer, &diverse);
        assert!(sim_without > 2.9 && sim_with < 0.5 * sim_without, "similarity {sim_with} with the penalty, {sim_without} without");
        let init = initial_images(&RenderRequest { layer, technique: Technique::Diversity, subjects: &[Subject::Unit(0)], settings: &diverse }, Device::Cpu).remove(0);
        assert_eq!((with.images.len(), with.objectives.len()), (4, 4));
        let mut mean = (0.0, 0.0);
        for (i, (img, obj)) in with.images.iter().zip(&with.objectives).enumerate() {
            let start = score(&demo, layer, Technique::Channel, 0, &init.images[i], &diverse);
            let now = score(&demo, layer, Technique::Channel, 0, img, &diverse);
            assert!((now - obj).abs() < 0.05 * obj.abs() + 0.01, "the reported objective is the image's channel objective: {obj} vs {now}");
            assert!(now > 1.5 * start, "image {i}: channel objective {now}, initially {start}");
            mean.0 += now / 4.0;
            mean.1 += start / 4.0;
        }
        assert!(mean.0 > 4.0 * mean.1, "mean channel objective {} vs initially {}", mean.0, mean.1);
        // The images start from different noise, and end different.
        assert!(mean_pairwise_l1(&with.images) > 0.05);
    }

    /// The default, relative penalty on the same unit: the images become less alike than
    /// without a penalty (similarity measured 2.99 -> 2.13), and each keeps most of the
    /// objective that lucid's weight costs them (channel objectives measured 13.7-15.9
    /// without a penalty, 9.2-15.6 with it; lucid's 1e2 leaves 1.6-5.6).
    #[test]
    fn the_relative_penalty_separates_the_images_and_keeps_their_objective() {
        let demo = model("models/demo/demo.pt");
        let layer = "conv3";
        let diverse = settings(64, 32);
        assert_eq!((diverse.options.diversity_penalty, diverse.options.diversity_weight), (DiversityPenalty::Relative, 1.0));
        let (without, with, sim_without, sim_with) = with_and_without_penalty(&demo, layer, &diverse);
        assert!(sim_with < 0.8 * sim_without, "similarity {sim_with} with the penalty, {sim_without} without");
        let best = without.objectives.iter().copied().fold(f64::MIN, f64::max);
        assert!(with.objectives.iter().all(|&o| o > 0.4 * best), "objectives {:?} with the penalty, {:?} without", with.objectives, without.objectives);
    }

    /// The caricature of a bright square shows a square where the input has it (pixel
    /// correlation with the input 0.54 measured; the stripes' caricature correlates
    /// negatively with it), and the caricature of horizontal stripes varies more along
    /// y than along x.
    #[test]
    fn caricature_keeps_the_structure_of_its_input() {
        let demo = model("models/demo/demo.pt");
        let square = synthetic(32, |y, x| if (6..18).contains(&y) && (4..16).contains(&x) { 1.0 } else { 0.1 });
        let stripes = synthetic(32, |y, _| if (y / 4) % 2 == 0 { 0.9 } else { 0.1 });
        let items = vec![
            LayerItem { name: "square".into(), kind: LayerItemKind::Caricature { input: square.clone() } },
            LayerItem { name: "stripes".into(), kind: LayerItemKind::Caricature { input: stripes } },
        ];
        let out = run_layer(&demo, "conv2", Technique::Caricature, &items, &settings(64, 32));
        let sq = input_grey(&square);
        let (car_square, car_stripes) = (grey(&out[0].images[0]), grey(&out[1].images[0]));
        let (mine, other) = (correlation(&car_square, &sq), correlation(&car_stripes, &sq));
        assert!(mine > 0.3 && mine > other + 0.3, "correlation with the square: its caricature {mine}, the stripes' {other}");
        let (rows_stripes, rows_square) = (row_col_ratio(&car_stripes, 32), row_col_ratio(&car_square, 32));
        assert!(rows_stripes > 1.5 && rows_stripes > rows_square, "row/column variance: stripes {rows_stripes}, square {rows_square}");
        assert!(out.iter().all(|o| o.objectives[0] > 0.0));
    }

    /// A direction that is one unit's basis vector is that unit's channel objective: from
    /// the same stream it renders the same image (the gradients are equal exactly).
    #[test]
    fn a_basis_direction_renders_the_channel_image() {
        let demo = model("models/demo/demo.pt");
        let (layer, unit, units) = ("conv2", 3u32, 32usize);
        let s = settings(32, 32);
        let channel = run(&demo, layer, Technique::Channel, &[unit], &s).remove(0);
        let mut basis = vec![0f32; units];
        basis[unit as usize] = 1.0;
        let spec = ImageSpec { rng: SplitMix64::new(unit_seed(s.seed, layer, unit, Technique::Channel)), init: Init::Noise, label: "d".into() };
        let goal = Goal::Direction { vectors: Tensor::from_slice(&basis).reshape([1, -1]), pow: 0.0 };
        let done = optimise(&Optimisation { model: &demo, layer, settings: &s, goal: &goal, signals: &TaskSignals::default() }, vec![spec], None).unwrap();
        let image = to_pixels(&done.images).remove(0);
        assert!(l1(&image, &channel.images[0]) < 1.0 / 255.0, "mean difference {}", l1(&image, &channel.images[0]));
        assert!((done.objectives[0] - channel.objectives[0]).abs() < 1e-4 * channel.objectives[0].abs());
        // Through the public API (the item's own stream) it excites the unit as well.
        let item = LayerItem { name: "basis".into(), kind: LayerItemKind::Direction { vector: basis } };
        let out = run_layer(&demo, layer, Technique::Direction, &[item], &s).remove(0);
        let start = initial_images(&RenderRequest { layer, technique: Technique::Channel, subjects: &[Subject::Unit(unit)], settings: &s }, Device::Cpu).remove(0);
        let now = score(&demo, layer, Technique::Channel, unit, &out.images[0], &s);
        assert!((now - out.objectives[0]).abs() < 0.05 * now.abs());
        assert!(now > 0.5 * channel.objectives[0] && now > 3.0 * score(&demo, layer, Technique::Channel, unit, &start.images[0], &s), "{now}");
        // A wrong length is an error.
        let bad = LayerItem { name: "short".into(), kind: LayerItemKind::Direction { vector: vec![1.0; 3] } };
        assert!(try_run_layer(&demo, layer, Technique::Direction, &[bad], &s).is_err());
    }

    /// The diverges fixture's unit 2 turns NaN once it exceeds its value on grey: its
    /// optimisation is reported diverged, with the step, and its batch-mates render exactly
    /// as in a batch without it. (Diversity's penalty reads every channel, so on this
    /// model the NaN reaches every unit's images under diversity, which all diverge.)
    #[test]
    fn a_diverging_unit_fails_alone() {
        let m = model("tests/fixtures/diverges.pt");
        let s = settings(32, 16);
        let req = RenderRequest { layer: "conv", technique: Technique::Channel, subjects: &unit_subjects(&[0, 1, 2, 3]), settings: &s };
        let mut out = render(&m, &req, &TaskSignals::default(), &mut None, None).unwrap();
        let failed = out.remove(2).unwrap_err();
        assert_eq!(failed.target, Target::Unit(2));
        let step: u32 = failed.reason.strip_prefix("objective became NaN at step ").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{}", failed.reason));
        assert!((2..=32).contains(&step), "NaN from step {step}; on grey the unit is finite");
        let without = run(&m, "conv", Technique::Channel, &[0, 1, 3], &s);
        for (with, alone) in rendered(out).iter().zip(&without) {
            assert_eq!((&with.images, &with.objectives), (&alone.images, &alone.objectives), "{}", with.target);
        }
    }

    #[test]
    fn snapshots_are_kept_at_every_threshold() {
        let demo = model("models/demo/demo.pt");
        let mut s = settings(24, 16);
        s.thresholds = vec![1, 8, 24];
        s.options.diversity_images = 2;
        for technique in [Technique::Channel, Technique::Diversity] {
            let out = run(&demo, "conv3", technique, &[0, 1], &s);
            for u in &out {
                let steps: Vec<u32> = u.snapshots.iter().map(|x| x.step).collect();
                assert_eq!(steps, vec![1, 8, 24]);
                assert!(u.snapshots.iter().all(|x| x.images.len() == u.images.len()));
                assert_ne!(u.snapshots[0].images, u.images, "after 1 step the image is not the final one");
                assert_ne!(u.snapshots[1].images, u.images);
                assert_ne!(u.snapshots[0].images, u.snapshots[1].images);
                assert_eq!(u.snapshots[2].images, u.images, "the last threshold is the final image");
            }
        }
        let items = [LayerItem { name: "noise".into(), kind: LayerItemKind::DeepDream { start: None } }];
        let out = run_layer(&demo, "conv2", Technique::DeepDream, &items, &s).remove(0);
        assert_eq!(out.snapshots.len(), 3);
        assert_ne!(out.snapshots[1].images[0], out.images[0]);
    }

    #[test]
    fn the_curve_is_measured_at_powers_of_two_thresholds_and_the_last_step() {
        let with = |steps: u32, thresholds: &[u32]| curve_steps(&RenderSettings { thresholds: thresholds.to_vec(), ..settings(steps, 16) });
        assert_eq!(with(16, &[]), vec![1, 2, 4, 8, 16]);
        assert_eq!(with(16, &[3]), vec![1, 2, 3, 4, 8, 16]);
        assert_eq!(with(16, &[4, 12, 16]), vec![1, 2, 4, 8, 12, 16]);
        assert_eq!(with(17, &[]), vec![1, 2, 4, 8, 16, 17]);
        assert_eq!(with(1, &[1]), vec![1]);
        assert!(with(0, &[]).is_empty());
    }

    /// Each image's curve has a point at each of [`curve_steps`]: the last is its
    /// objective exactly, the others the objective of the image after that many steps
    /// (a snapshot's, up to its rounding to bytes), for one image a subject and for
    /// diversity's several; and it rises.
    #[test]
    fn the_curve_measures_the_objective_as_the_optimisation_goes() {
        let demo = model("models/demo/demo.pt");
        let mut s = settings(24, 32);
        s.thresholds = vec![3, 12];
        s.options.diversity_images = 2;
        for technique in [Technique::Channel, Technique::Diversity] {
            for u in run(&demo, "conv3", technique, &[0, 1], &s) {
                let steps: Vec<u32> = u.curve.iter().map(|(step, _)| *step).collect();
                assert_eq!(steps, vec![1, 2, 3, 4, 8, 12, 16, 24], "{technique} {}", u.target);
                assert!(u.curve.iter().all(|(_, values)| values.len() == u.images.len()));
                assert_eq!(u.curve.last().unwrap().1, u.objectives, "{technique} {}: the last point is the objective", u.target);
                for snapshot in &u.snapshots {
                    let (_, values) = u.curve.iter().find(|(step, _)| *step == snapshot.step).unwrap();
                    for (image, &value) in snapshot.images.iter().zip(values) {
                        let scored = score(&demo, "conv3", Technique::Channel, unit(&u), image, &s);
                        assert!((scored - value).abs() < 0.05 * value.abs().max(0.1), "{technique} {} step {}: curve {value}, image {scored}", u.target, snapshot.step);
                    }
                }
                for (b, &last) in u.objectives.iter().enumerate() {
                    assert!(last > 1.2 * u.curve[0].1[b].max(0.05), "{technique} {}: from {} to {last}", u.target, u.curve[0].1[b]);
                }
            }
        }
        let items = [LayerItem { name: "noise".into(), kind: LayerItemKind::DeepDream { start: None } }];
        let out = run_layer(&demo, "conv2", Technique::DeepDream, &items, &s).remove(0);
        assert_eq!((out.curve.len(), &out.curve[7].1), (8, &out.objectives));
        assert!(run(&demo, "conv3", Technique::Channel, &[0], &settings(0, 32))[0].curve.is_empty(), "no steps, no curve");
    }

    #[test]
    fn pixel_distance_is_the_mean_rms_difference_over_pairs() {
        let image = |bytes: &[u8]| Pixels { channels: 1, bytes: bytes.to_vec() };
        let (black, white, corner) = (image(&[0; 4]), image(&[255; 4]), image(&[255, 0, 0, 0]));
        assert_eq!(pixel_distance(&[black.clone(), black.clone(), black.clone()]), Some(0.0));
        assert_eq!(pixel_distance(&[black.clone(), white.clone()]), Some(1.0));
        assert_eq!(pixel_distance(&[black.clone(), corner.clone()]), Some(0.5), "sqrt(1/4)");
        let three = pixel_distance(&[black.clone(), black.clone(), white]).unwrap();
        assert!((three - 2.0 / 3.0).abs() < 1e-12, "pairs 0, 1, 1: {three}");
        assert_eq!(pixel_distance(&[corner]), None);
        // A diversity unit's images have theirs; one image has none.
        let demo = model("models/demo/demo.pt");
        let mut s = settings(16, 32);
        s.options.diversity_images = 3;
        let u = run(&demo, "conv3", Technique::Diversity, &[1], &s).remove(0);
        assert_eq!(u.diversity, pixel_distance(&u.images));
        assert!(u.diversity.unwrap() > 0.01, "{:?}", u.diversity);
        assert_eq!(run(&demo, "conv3", Technique::Channel, &[1], &s)[0].diversity, None);
    }

    /// Every parameterisation, and the crops and the noise, raise the objective well above
    /// the initial image's; the decay, the colour decorrelation, the crops and the noise
    /// change the image. MACO's initial image is already at full contrast (each image is
    /// standardised), so its objective starts higher: at learning rate 0.3, measured 4.79
    /// to 18.3 (1/f magnitude) and 5.41 to 18.8 (the profile); at Horama's 1, to 22.7 for
    /// both; the FFT goes from 0.44 to 14.2 at 0.05.
    #[test]
    fn parameterisations_raise_the_objective_and_their_settings_matter() {
        let demo = model("models/demo/demo.pt");
        let (layer, unit) = ("conv3", 1u32);
        let base = settings(32, 32);
        let param = |param: ParamSettings| RenderSettings { param, ..base.clone() };
        let transforms = |transforms: TransformSettings| RenderSettings { transforms, ..base.clone() };
        let maco = ParamSettings { maco: true, ..Default::default() };
        const MACO_LR: f64 = 0.3;
        let variants = [
            ("fft", base.clone()),
            ("pixel", param(ParamSettings { kind: ParamKind::Pixel, ..Default::default() })),
            ("decay 2", param(ParamSettings { decay: 2.0, ..Default::default() })),
            ("no decorrelation", param(ParamSettings { decorrelate: false, ..Default::default() })),
            ("colour matrix", param(ParamSettings { color_matrix: Some([[0.3, 0.1, 0.0], [0.3, 0.0, 0.1], [0.3, -0.1, 0.0]]), ..Default::default() })),
            ("maco", RenderSettings { learning_rate: MACO_LR, ..param(maco.clone()) }),
            ("maco with a profile", RenderSettings { learning_rate: MACO_LR, ..param(ParamSettings { magnitude: Some(vec![vec![8.0, 4.0, 1.0, 0.25]; 3]), ..maco }) }),
            ("crops", transforms(TransformSettings { crop: Some(CropSchedule { start: 0.9, end: 0.5 }), ..Default::default() })),
            ("noise", transforms(TransformSettings { noise: 0.05, ..Default::default() })),
        ];
        let mut images = Vec::new();
        for (name, s) in variants {
            let out = run(&demo, layer, Technique::Channel, &[unit], &s).remove(0);
            let start = initial_images(&RenderRequest { layer, technique: Technique::Channel, subjects: &[Subject::Unit(unit)], settings: &s }, Device::Cpu).remove(0);
            let before = score(&demo, layer, Technique::Channel, unit, &start.images[0], &s);
            assert!(out.objectives[0] > 3.0 * before.max(0.1), "{name}: objective {} from {before}", out.objectives[0]);
            images.push((name, out.images[0].clone()));
        }
        for (name, img) in &images[1..] {
            assert!(l1(img, &images[0].1) > 0.02, "{name} renders another image than the default");
        }
    }

    #[test]
    fn grayscale_renders_with_a_one_channel_model() {
        let gray = model("tests/fixtures/gray.pt");
        let mut s = settings(64, 16);
        s.param = ParamSettings { decorrelate: false, channels: 1, ..Default::default() };
        for kind in [ParamKind::Fft, ParamKind::Pixel] {
            s.param.kind = kind;
            let out = run(&gray, "conv", Technique::Channel, &[0, 1, 2, 3], &s);
            let start = initial_images(&RenderRequest { layer: "conv", technique: Technique::Channel, subjects: &unit_subjects(&[0, 1, 2, 3]), settings: &s }, Device::Cpu);
            let mut raised = 0;
            for (u, st) in out.iter().zip(&start) {
                assert_eq!((u.images[0].channels, u.images[0].bytes.len()), (1, 16 * 16));
                let before = score(&gray, "conv", Technique::Channel, unit(u), &st.images[0], &s);
                assert!(u.objectives[0] >= before - 1e-3, "{kind:?} unit {}: {} from {before}", unit(u), u.objectives[0]);
                if u.objectives[0] > 1.2 * before + 0.01 {
                    raised += 1;
                }
            }
            // Units 1 and 3 (unit 0 is off on grey; unit 2 rises only slowly).
            assert!(raised >= 2, "{kind:?}: {:?}", out.iter().map(|u| u.objectives[0]).collect::<Vec<_>>());
        }
        // A start image of the model's channel count, and a mismatched one.
        let start = InputImage { channels: 1, size: 16, data: (0..256).map(|i| (i % 16) as f32 / 15.0).collect() };
        let item = LayerItem { name: "ramp".into(), kind: LayerItemKind::DeepDream { start: Some(start) } };
        assert_eq!(run_layer(&gray, "conv", Technique::DeepDream, &[item], &s)[0].images[0].channels, 1);
        let rgb = LayerItem { name: "rgb".into(), kind: LayerItemKind::Caricature { input: synthetic(16, |_, _| 0.5) } };
        assert!(try_run_layer(&gray, "conv", Technique::Caricature, &[rgb], &s).is_err());
    }

    /// Deepdream from a start image begins at that image (within 1/255: the
    /// parameterisation is inverted), and from noise raises the layer's mean square.
    #[test]
    fn deepdream_starts_from_its_image_and_raises_the_layer() {
        let demo = model("models/demo/demo.pt");
        let start = synthetic(32, |y, x| ((x as f32 / 31.0) * 0.8 + if (y / 5) % 2 == 0 { 0.1 } else { 0.0 }).min(1.0));
        let start = InputImage { data: start.data.iter().enumerate().map(|(i, v)| if i < 1024 { *v } else { 1.0 - v }).collect(), ..start };
        let item = |name: &str, start: Option<InputImage>| LayerItem { name: name.into(), kind: LayerItemKind::DeepDream { start } };
        for param in [ParamSettings::default(), ParamSettings { kind: ParamKind::Pixel, decorrelate: false, ..Default::default() }] {
            // No step: the image is the start image.
            let s = RenderSettings { param, ..settings(0, 32) };
            let out = run_layer(&demo, "conv2", Technique::DeepDream, &[item("start", Some(start.clone()))], &s).remove(0);
            let want: Vec<u8> = (0..1024).flat_map(|p| (0..3).map(move |c| p + c * 1024)).map(|i| (start.data[i] * 255.0).round() as u8).collect();
            let worst = out.images[0].bytes.iter().zip(&want).map(|(&a, &b)| (a as i32 - b as i32).abs()).max().unwrap();
            assert!(worst <= 1, "{:?}: the initial image is {worst}/255 off the start image", s.param.kind);
        }
        let s = settings(32, 32);
        let out = run_layer(&demo, "conv2", Technique::DeepDream, &[item("noise", None), item("start", Some(start))], &s);
        let init = {
            let _g = tch::no_grad_guard();
            let spec = SplitMix64::new(unit_seed(s.seed, "conv2", item_index("noise"), Technique::DeepDream));
            let v = ParamImage::draw(&s.param, 32, INIT_SD, &mut spec.clone());
            let img = ParamImage::new(Tensor::from_slice(&v).reshape(ParamImage::shape(&s.param, 1, 32).as_slice()), &s.param, 32, Device::Cpu).image();
            deepdream(&demo.activation(&img, "conv2").unwrap()).double_value(&[0])
        };
        assert!(out[0].objectives[0] > 3.0 * init, "deepdream objective {} from {init}", out[0].objectives[0]);
        assert!(out[1].objectives[0] > out[0].objectives[0] * 0.1);
    }

    /// Demo-model units that are off on the near-grey initial image (conv3 14: objective
    /// exactly 0 under Keep) are re-seeded brighter and then render; units that were not
    /// off render exactly as under Keep; a unit that no amplitude excites (the tiny
    /// model's conv unit 3 at the centre neuron) is marked dead and rendered as Keep.
    #[test]
    fn reseeding_wakes_units_that_start_off_and_marks_the_dead() {
        let demo = model("models/demo/demo.pt");
        let keep = settings(32, 32);
        let reseed = RenderSettings { dead_units: DeadUnits::Reseed, ..keep.clone() };
        let k = run(&demo, "conv3", Technique::Channel, &[0, 14], &keep);
        let r = run(&demo, "conv3", Technique::Channel, &[0, 14], &reseed);
        assert_eq!(k[0].images, r[0].images, "an excited unit is not re-seeded");
        assert_eq!(k[1].objectives[0], 0.0);
        assert!(r[1].objectives[0] > 0.1 && !r[1].dead, "re-seeded: {:?}", r[1].objectives);
        let tiny = model("tests/fixtures/tiny.pt");
        let s = RenderSettings { dead_units: DeadUnits::Reseed, ..settings(8, 16) };
        let k = run(&tiny, "conv", Technique::Neuron, &[3], &settings(8, 16)).remove(0);
        let r = run(&tiny, "conv", Technique::Neuron, &[3], &s).remove(0);
        assert!(r.dead && !k.dead);
        assert_eq!((k.images, k.objectives), (r.images, r.objectives), "a dead unit renders as Keep renders it");
    }

    #[test]
    fn input_images_decode_to_the_models_channels() {
        // A 4x2 PNG: left half red, right half white; cropped to its centre 2x2, then 4x4.
        let rgb: Vec<u8> = (0..8).flat_map(|i| if i % 4 < 2 { [255, 0, 0] } else { [255, 255, 255] }).collect();
        let png = crate::png::encode_rgb(&rgb, 4, 2);
        let img = decode_input(&png, 3, 2, "t").unwrap();
        assert_eq!((img.channels, img.size, img.data.len()), (3, 2, 12));
        assert_eq!(&img.data[..4], &[1.0; 4], "red everywhere");
        assert!(img.data[4] < 0.1 && img.data[5] > 0.9, "green: red on the left, white on the right: {:?}", &img.data[4..8]);
        let grey = decode_input(&png, 1, 2, "t").unwrap();
        assert!((grey.data[0] - 0.299).abs() < 0.02 && grey.data[1] > 0.98, "{:?}", grey.data);
        assert_eq!(decode_input(&png, 5, 2, "t").unwrap().data.len(), 20);
        assert!(decode_input(b"not an image", 3, 8, "input image x").unwrap_err().to_string().starts_with("input image x: "));
    }

    #[test]
    fn cancelling_and_misuse_are_errors() {
        let tiny = model("tests/fixtures/tiny.pt");
        let s = settings(4, 16);
        let req = RenderRequest { layer: "conv", technique: Technique::Channel, subjects: &[Subject::Unit(0)], settings: &s };
        let cancelled = TaskSignals::default();
        cancelled.cancel();
        assert!(matches!(render(&tiny, &req, &cancelled, &mut None, None), Err(Error::Cancelled)));
        let req = RenderRequest { technique: Technique::DeepDream, ..req };
        assert!(render(&tiny, &req, &TaskSignals::default(), &mut None, None).is_err());
        let item = LayerItem { name: "x".into(), kind: LayerItemKind::Direction { vector: vec![1.0; 4] } };
        assert!(try_run_layer(&tiny, "conv", Technique::DeepDream, &[item], &s).is_err());
        // No transform at all works too, and profiling counts the steps.
        let mut times = StepTimes::default();
        let s = RenderSettings { transforms: TransformSettings::none(), ..s };
        let req = RenderRequest { layer: "conv", technique: Technique::Channel, subjects: &unit_subjects(&[1, 2]), settings: &s };
        render(&tiny, &req, &TaskSignals::default(), &mut None, Some(&mut times)).unwrap();
        assert_eq!(times.steps, 4);
    }
}
