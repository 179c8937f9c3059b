//! A job as the user states it, validated into plain types that every part shares.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};
pub use crate::units::{to_ranges, UnitRanges};

/// What an image is optimised for. See docs/techniques.md.
///
/// The first four are per unit: each unit of a layer gets its own image(s) under
/// `layers/<layer>/units/<unit>/`. The other three are per layer: each of their items (a
/// start image, an input image, a named direction) gets an image under
/// `layers/<layer>/<technique>/<item>.png`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Technique {
    /// Maximise the mean over space of one channel.
    Channel,
    /// Maximise one channel at the centre position.
    Neuron,
    /// Minimise the mean over space of one channel (the channel objective, sign flipped).
    Negative,
    /// N images of one unit optimised together: the channel objective minus a penalty on
    /// the cosine similarity of their Gram matrices.
    Diversity,
    /// The whole layer: the mean of its squared activations, from noise or a start image.
    DeepDream,
    /// An input image's activation at the layer, matched from noise: dot product times
    /// cosine similarity to a power (lucid's caricature recipe).
    Caricature,
    /// A named direction over the layer's units: the dot product of the activation with
    /// it, times cosine similarity to a power when asked.
    Direction,
}

impl Technique {
    pub const ALL: [Technique; 7] = [
        Technique::Channel,
        Technique::Neuron,
        Technique::Negative,
        Technique::Diversity,
        Technique::DeepDream,
        Technique::Caricature,
        Technique::Direction,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Technique::Channel => "channel",
            Technique::Neuron => "neuron",
            Technique::Negative => "negative",
            Technique::Diversity => "diversity",
            Technique::DeepDream => "deepdream",
            Technique::Caricature => "caricature",
            Technique::Direction => "direction",
        }
    }

    /// Whether each unit gets its own image(s); otherwise the technique renders items of
    /// the whole layer.
    pub fn per_unit(self) -> bool {
        matches!(self, Technique::Channel | Technique::Neuron | Technique::Negative | Technique::Diversity)
    }

    /// Parses a comma-separated list such as `channel,neuron`, refusing duplicates.
    pub fn parse_list(s: &str) -> Result<Vec<Technique>> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let t: Technique = part.parse()?;
            if out.contains(&t) {
                return Err(Error::invalid("techniques", format!("{t} is listed twice")));
            }
            out.push(t);
        }
        if out.is_empty() {
            return Err(Error::invalid("techniques", "no technique given"));
        }
        Ok(out)
    }
}

impl fmt::Display for Technique {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Technique {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Technique::ALL.into_iter().find(|t| t.as_str() == s).ok_or_else(|| {
            let known: Vec<&str> = Technique::ALL.iter().map(|t| t.as_str()).collect();
            Error::invalid("technique", format!("unknown technique {s:?}; known: {}", known.join(", ")))
        })
    }
}

/// How the optimised image is represented (docs/techniques.md "The peers' recipe":
/// "FFT parameterisation", "Decorrelated colour").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParamSettings {
    /// `fft` (lucid's default: a spectrum scaled by 1/frequency^decay) or `pixel`.
    pub kind: ParamKind,
    /// The spectrum's 1/frequency exponent (lucid: 1); under `maco` without `magnitude`,
    /// the exponent of its fixed magnitude.
    pub decay: f64,
    /// Decorrelated colour: pixels are `colour_matrix @ t`. Only for 3 channels.
    pub decorrelate: bool,
    /// The colour correlation square root (rows are RGB); `None` is lucid's ImageNet one.
    /// A job with a dataset computes it from the dataset when asked.
    pub color_matrix: Option<[[f32; 3]; 3]>,
    /// Channels of the model's input: 3 for RGB, 1 for grayscale, or another count.
    pub channels: u32,
    /// MACO (Fel et al. 2023, "Unlocking feature visualization for deeper networks with
    /// magnitude constrained optimization"; serre-lab/Horama `maco_fv.py`): the FFT
    /// spectrum's magnitude is fixed and only its phase is optimised (docs/techniques.md
    /// "MACO"). Only with `kind = fft`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub maco: bool,
    /// MACO only: the fixed magnitude as a radial profile per channel, `magnitude[c][k]`
    /// the mean amplitude at radial frequency `k / (len - 1)` of the highest (the corner
    /// of the spectrum, sqrt(2)/2 cycles a pixel), resampled to the render's spectrum
    /// (docs/techniques.md "MACO"). A job with a dataset computes it from the dataset
    /// when asked; `None` is 1/frequency^decay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub magnitude: Option<Vec<Vec<f32>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ParamKind {
    Fft,
    Pixel,
}

impl Default for ParamSettings {
    fn default() -> Self {
        ParamSettings { kind: ParamKind::Fft, decay: 1.0, decorrelate: true, color_matrix: None, channels: 3, maco: false, magnitude: None }
    }
}

/// The most values of a MACO magnitude profile, per channel: the profile travels in
/// every task's settings and in atlas.json.
pub const MAX_MAGNITUDE_BINS: usize = 256;

/// The random transforms applied at every step, in this order (docs/techniques.md
/// "The peers' recipe"); the defaults are lucid's and lucent's standard set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransformSettings {
    /// Constant padding (value 0.5), in pixels.
    pub pad: u32,
    /// First jitter, up to this many pixels.
    pub jitter: u32,
    /// Scales drawn from, uniformly.
    pub scales: Vec<f32>,
    /// Rotation angles in degrees drawn from, uniformly (repeats weight a value).
    pub angles: Vec<f32>,
    /// Second jitter, up to this many pixels.
    pub jitter_after: u32,
    /// A random square crop at every step, before the transforms above; `None`: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crop: Option<CropSchedule>,
    /// The standard deviation of the noise added to the model's input at every step
    /// (docs/techniques.md "Crops and noise"); 0: none.
    #[serde(skip_serializing_if = "is_zero")]
    pub noise: f32,
}

fn is_zero(v: &f32) -> bool {
    *v == 0.0
}

/// The side of the random crop, as a fraction of the image's side, goes linearly from
/// `start` at the first step to `end` at the last (Horama's `box_size`, scheduled).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CropSchedule {
    pub start: f32,
    pub end: f32,
}

impl Default for TransformSettings {
    fn default() -> Self {
        let mut angles: Vec<f32> = (-10..=10).map(|a| a as f32).collect();
        angles.extend([0.0; 5]);
        TransformSettings {
            pad: 12,
            jitter: 8,
            scales: (0..11).map(|i| (90 + 2 * i) as f32 / 100.0).collect(),
            angles,
            jitter_after: 4,
            crop: None,
            noise: 0.0,
        }
    }
}

impl TransformSettings {
    /// No transform at all: the image is only resized to the model's input.
    pub fn none() -> Self {
        TransformSettings { pad: 0, jitter: 0, scales: vec![1.0], angles: vec![0.0], jitter_after: 0, crop: None, noise: 0.0 }
    }
}

/// What to do about units whose objective has no gradient on the initial image (a ReLU
/// that is off everywhere renders flat grey). lucid redirects ReLU gradients inside the
/// graph, which a TorchScript model does not allow. See docs/techniques.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeadUnits {
    /// Leave them: the image stays near the initial grey.
    Keep,
    /// Detect and re-seed: a unit whose objective and gradient are zero on its initial
    /// image gets new initial images, drawn from its own stream with growing amplitude,
    /// until one excites it; a unit that none excites is recorded as dead.
    Reseed,
}

/// Options of the techniques that have them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TechniqueOptions {
    /// Images per unit for `diversity` (lucid: 4).
    pub diversity_images: u32,
    /// How the diversity penalty is weighed against the objective. Settings recorded
    /// before the choice existed meant lucid's.
    #[serde(default = "DiversityPenalty::lucid")]
    pub diversity_penalty: DiversityPenalty,
    /// Weight of the diversity penalty: [`DiversityPenalty::default_weight`] unless set.
    pub diversity_weight: f64,
    /// Start images of `deepdream`; none: one image from noise.
    pub deepdream_inputs: Vec<NamedImage>,
    /// Input images of `caricature`.
    pub caricature_inputs: Vec<NamedImage>,
    /// The power of the cosine similarity in `caricature` (lucid's recipe: 1).
    pub caricature_cossim_pow: f64,
    /// Named directions for `direction`, each over one layer's units.
    pub directions: Vec<Direction>,
    /// The power of the cosine similarity in `direction` (0: the plain dot product).
    pub direction_cossim_pow: f64,
}

impl Default for TechniqueOptions {
    fn default() -> Self {
        TechniqueOptions {
            diversity_images: 4,
            diversity_penalty: DiversityPenalty::Relative,
            diversity_weight: DiversityPenalty::Relative.default_weight(),
            deepdream_inputs: Vec::new(),
            caricature_inputs: Vec::new(),
            caricature_cossim_pow: 1.0,
            directions: Vec::new(),
            direction_cossim_pow: 0.0,
        }
    }
}

/// How `diversity` weighs its penalty, lucid's similarity of the unit's images (see
/// docs/techniques.md "Diversity"), against their objectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiversityPenalty {
    /// lucid's `objective - weight * similarity`, with weight 1e2 tuned to InceptionV1's
    /// activations: on a layer of smaller activations the penalty overwhelms the objective.
    Lucid,
    /// `objective - weight * |objective| * similarity`, the group's mean |objective| taken
    /// at each step and held constant for the gradient: the penalty keeps its proportion to
    /// the objective whatever the layer's scale.
    Relative,
}

impl DiversityPenalty {
    fn lucid() -> DiversityPenalty {
        DiversityPenalty::Lucid
    }

    /// lucid's 1e2; for `relative`, a weight at which every image of the demo model's
    /// class units still shows its class with margin (docs/techniques.md "Diversity").
    pub fn default_weight(self) -> f64 {
        match self {
            DiversityPenalty::Lucid => 100.0,
            DiversityPenalty::Relative => 1.0,
        }
    }
}

/// An image a technique starts from or matches: a name for its outputs, and where it is
/// (a path or an s3:// URI, read by the worker).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedImage {
    pub name: String,
    pub uri: String,
}

/// A named direction over one layer's units (one value per unit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Direction {
    pub name: String,
    pub layer: String,
    pub vector: Vec<f32>,
}

/// The settings that decide what a unit's image looks like. Two renders with equal
/// settings, model and unit give the same image; the batch size is not among them because
/// it only groups units into optimisations.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenderSettings {
    /// Optimisation steps (lucid/lucent: 512).
    pub steps: u32,
    /// Side of the optimised image in pixels (lucid/lucent: 128).
    pub size: u32,
    /// Side of the model input; the transformed image is bilinearly resampled to it.
    pub input_size: u32,
    /// Job seed; per-unit seeds derive from it (see [`crate::seed`]).
    pub seed: u64,
    /// Adam learning rate (lucid/lucent: 0.05).
    pub learning_rate: f64,
    /// The number format of the model's passes.
    #[serde(default)]
    pub precision: Precision,
    #[serde(default)]
    pub param: ParamSettings,
    #[serde(default)]
    pub transforms: TransformSettings,
    /// Steps after which an intermediate image is kept as well as the final one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub thresholds: Vec<u32>,
    #[serde(default = "dead_units_default")]
    pub dead_units: DeadUnits,
    #[serde(default)]
    pub options: TechniqueOptions,
}

fn dead_units_default() -> DeadUnits {
    DeadUnits::Keep
}

/// An item name becomes file names in its technique's directory: `<name>.png`,
/// `<name>.json` and its snapshots' `<name>.step<N>.png`. So it is letters, digits, `-`,
/// `_` and `.`, and does not end in `.step<digits>`, or its image would be another item's
/// snapshot.
fn check_item_name(what: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(Error::invalid(what, format!("{name:?} is not a usable name: use letters, digits, '-', '_' and '.'")));
    }
    let snapshot_like = name.rsplit_once(".step").is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if snapshot_like {
        return Err(Error::invalid(what, format!("{name:?} ends like a snapshot's name (<item>.step<N>.png); choose a name that does not end in .step and digits")));
    }
    Ok(())
}

/// Why `name` cannot join the names `seen` of its directory: it is one of them, or differs
/// from one only in case (one file on a case-insensitive disk).
fn name_clash<'a>(seen: &mut std::collections::HashMap<String, &'a str>, name: &'a str) -> Option<String> {
    match seen.insert(name.to_ascii_lowercase(), name)? {
        earlier if earlier == name => Some(format!("the name {name:?} is used twice")),
        earlier => Some(format!("the names {earlier:?} and {name:?} differ only in case, so they name one file on a case-insensitive disk")),
    }
}

/// lucid's and lucent's defaults: 512 steps of Adam at 0.05 on a 128 px FFT image.
impl Default for RenderSettings {
    fn default() -> Self {
        RenderSettings {
            steps: 512,
            size: 128,
            input_size: 128,
            seed: 0,
            learning_rate: 0.05,
            precision: Precision::Fp32,
            param: ParamSettings::default(),
            transforms: TransformSettings::default(),
            thresholds: Vec::new(),
            dead_units: DeadUnits::Keep,
            options: TechniqueOptions::default(),
        }
    }
}

impl RenderSettings {
    pub const MAX_STEPS: u32 = 100_000;
    pub const MAX_SIZE: u32 = 2048;

    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::invalid("steps", "--steps must be at least 1 (got 0)"));
        }
        if self.steps > Self::MAX_STEPS {
            return Err(Error::invalid("steps", format!("--steps {} is above the limit of {}", self.steps, Self::MAX_STEPS)));
        }
        for (name, v) in [("size", self.size), ("input size", self.input_size)] {
            if !(8..=Self::MAX_SIZE).contains(&v) {
                return Err(Error::invalid("size", format!("{name} {v} is outside 8..={}", Self::MAX_SIZE)));
            }
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(Error::invalid("learning rate", format!("{} is not a positive number", self.learning_rate)));
        }
        self.param.validate()?;
        self.transforms.validate()?;
        if let Some(bad) = self.thresholds.iter().find(|&&n| n == 0 || n > self.steps) {
            return Err(Error::invalid("thresholds", format!("threshold {bad} is outside 1..={} (the steps)", self.steps)));
        }
        if self.thresholds.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::invalid("thresholds", format!("{:?} must be increasing", self.thresholds)));
        }
        self.options.validate()
    }
}

impl ParamSettings {
    fn validate(&self) -> Result<()> {
        let p = self;
        if !(1..=16).contains(&p.channels) {
            return Err(Error::invalid("param.channels", format!("{} input channels is outside 1..=16", p.channels)));
        }
        if p.decorrelate && p.channels != 3 {
            return Err(Error::invalid("param.decorrelate", format!("colour decorrelation needs 3 channels, not {}; set decorrelate = false", p.channels)));
        }
        if !(p.decay.is_finite() && (0.0..=4.0).contains(&p.decay)) {
            return Err(Error::invalid("param.decay", format!("{} is outside 0..=4", p.decay)));
        }
        if p.color_matrix.is_some_and(|m| m.iter().flatten().any(|v| !v.is_finite())) {
            return Err(Error::invalid("param.color_matrix", "holds a value that is not finite"));
        }
        if p.maco && p.kind != ParamKind::Fft {
            return Err(Error::invalid("param.maco", "MACO optimises the phase of a spectrum: it needs kind = \"fft\""));
        }
        if let Some(m) = &p.magnitude {
            if !p.maco {
                return Err(Error::invalid("param.magnitude", "is MACO's fixed magnitude: set maco = true"));
            }
            if m.len() != p.channels as usize {
                return Err(Error::invalid("param.magnitude", format!("has {} profiles; give one per channel ({})", m.len(), p.channels)));
            }
            let fits = |row: &Vec<f32>| (2..=MAX_MAGNITUDE_BINS).contains(&row.len()) && row.iter().all(|v| v.is_finite() && *v >= 0.0) && row.iter().any(|&v| v > 0.0);
            if !m.iter().all(fits) {
                return Err(Error::invalid("param.magnitude", format!("each profile must hold 2..={MAX_MAGNITUDE_BINS} finite amplitudes >= 0, not all 0")));
            }
        }
        Ok(())
    }
}

impl TransformSettings {
    fn validate(&self) -> Result<()> {
        let t = self;
        const MAX: u32 = RenderSettings::MAX_SIZE;
        if t.scales.is_empty() || t.scales.iter().any(|s| !(s.is_finite() && (0.1..=10.0).contains(s))) {
            return Err(Error::invalid("transforms.scales", format!("{:?}: give at least one scale in 0.1..=10", t.scales)));
        }
        if t.angles.is_empty() || t.angles.iter().any(|a| !(a.is_finite() && a.abs() <= 360.0)) {
            return Err(Error::invalid("transforms.angles", format!("{:?}: give at least one angle in -360..=360 degrees", t.angles)));
        }
        if t.pad > MAX || t.jitter > MAX || t.jitter_after > MAX {
            return Err(Error::invalid("transforms", format!("pad and jitter must not exceed {MAX} pixels")));
        }
        if let Some(c) = t.crop {
            if ![c.start, c.end].iter().all(|f| f.is_finite() && *f > 0.0 && *f <= 1.0) {
                return Err(Error::invalid("transforms.crop", format!("start {} and end {} must be fractions of the image side in (0, 1]", c.start, c.end)));
            }
        }
        if !(t.noise.is_finite() && (0.0..=1.0).contains(&t.noise)) {
            return Err(Error::invalid("transforms.noise", format!("{} is outside 0..=1", t.noise)));
        }
        Ok(())
    }
}

impl TechniqueOptions {
    fn validate(&self) -> Result<()> {
        let o = self;
        if !(2..=16).contains(&o.diversity_images) {
            return Err(Error::invalid("options.diversity_images", format!("{} is outside 2..=16", o.diversity_images)));
        }
        for (name, v) in [("options.diversity_weight", o.diversity_weight), ("options.caricature_cossim_pow", o.caricature_cossim_pow), ("options.direction_cossim_pow", o.direction_cossim_pow)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::invalid(name, format!("{v} is not a number >= 0")));
            }
        }
        for (what, list) in [("deepdream_inputs", &o.deepdream_inputs), ("caricature_inputs", &o.caricature_inputs)] {
            let mut names = std::collections::HashMap::new();
            for i in list {
                check_item_name(what, &i.name)?;
                if let Some(clash) = name_clash(&mut names, &i.name) {
                    return Err(Error::invalid(what, clash));
                }
                if i.uri.trim().is_empty() {
                    return Err(Error::invalid(what, format!("{:?} has no uri", i.name)));
                }
            }
        }
        let mut names: std::collections::HashMap<&str, std::collections::HashMap<String, &str>> = Default::default();
        for d in &o.directions {
            check_item_name("directions", &d.name)?;
            if let Some(clash) = name_clash(names.entry(d.layer.as_str()).or_default(), &d.name) {
                return Err(Error::invalid("directions", format!("{clash} among the directions of layer {:?}", d.layer)));
            }
            if d.vector.is_empty() || d.vector.iter().any(|v| !v.is_finite()) || d.vector.iter().all(|&v| v == 0.0) {
                return Err(Error::invalid("directions", format!("direction {:?} must be a non-zero vector of finite numbers", d.name)));
            }
        }
        Ok(())
    }
}

/// Which units of a layer to render: `all`, a half-open range `0..16`, or a list `0,3,7`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnitSelection {
    All,
    Range(u32, u32),
    List(Vec<u32>),
}

impl FromStr for UnitSelection {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if s == "all" {
            return Ok(UnitSelection::All);
        }
        let num = |p: &str| -> Result<u32> {
            p.trim().parse().map_err(|_| Error::invalid("units", format!("{p:?} in {s:?} is not a unit index; use all, 0..16 or 0,3,7")))
        };
        if let Some((a, b)) = s.split_once("..") {
            let (a, b) = (num(a)?, num(b)?);
            if a >= b {
                return Err(Error::invalid("units", format!("range {s} is empty (ranges are half-open, as in Rust)")));
            }
            return Ok(UnitSelection::Range(a, b));
        }
        let list = s.split(',').map(num).collect::<Result<Vec<_>>>()?;
        Ok(UnitSelection::List(list))
    }
}

impl UnitSelection {
    /// The selected units of a layer with `count` units, without listing a range's units.
    pub fn resolve(&self, layer: &str, count: u32) -> Result<UnitRanges> {
        let units = match self {
            UnitSelection::All => UnitRanges::range(0, count),
            UnitSelection::Range(a, b) => UnitRanges::range(*a, *b),
            UnitSelection::List(l) => UnitRanges::from(l.clone()),
        };
        check_units_in_layer(&units, layer, count)?;
        Ok(units)
    }
}

/// Refuses units past the layer's `count`, naming the first such unit: the first
/// range that reaches past the layer holds it.
fn check_units_in_layer(units: &UnitRanges, layer: &str, count: u32) -> Result<()> {
    match units.ranges().iter().find(|&&(_, end)| end > count) {
        Some(&(start, _)) => {
            let bad = start.max(count);
            Err(Error::invalid("units", format!("unit {bad} is out of range: layer {layer:?} has {count} units (0..{count})")))
        }
        None => Ok(()),
    }
}

/// A layer the model exposes: its name and the shape of one example's activation,
/// `[C, H, W]` for a feature map or `[C]` for a vector such as logits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    pub name: String,
    pub shape: Vec<i64>,
}

impl LayerInfo {
    pub fn units(&self) -> u32 {
        self.shape.first().copied().unwrap_or(0) as u32
    }
}

/// The model a job renders: where to load it from, a display name and its digest, which
/// the atlas records and workers check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    pub uri: String,
    pub name: String,
    pub sha256: String,
}

/// One layer of a job with the units chosen in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerPlan {
    pub layer: LayerInfo,
    /// Stored and sent as half-open ranges, so a million contiguous units take a few
    /// bytes.
    pub units: UnitRanges,
    /// This layer's techniques, when not the job's (a job file's `[[layer]]` table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub techniques: Option<Vec<Technique>>,
    /// This layer's optimisation steps, when not the job's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    /// This layer's image parameterisation, whole, when not the job's (the job file
    /// merges a layer's `[layer.param]` over the job's `[param]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<ParamSettings>,
    /// This layer's transforms, whole, when not the job's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transforms: Option<TransformSettings>,
}

impl LayerPlan {
    /// A plan of `units` with the job's techniques and settings.
    pub fn new(layer: LayerInfo, units: UnitRanges) -> LayerPlan {
        LayerPlan { layer, units, techniques: None, steps: None, param: None, transforms: None }
    }

    /// Whether the layer renders with settings of its own.
    pub fn has_own_settings(&self) -> bool {
        self.steps.is_some() || self.param.is_some() || self.transforms.is_some()
    }

    /// The settings the layer renders with: the job's `settings`, with the layer's own
    /// steps, parameterisation and transforms.
    pub fn settings(&self, job: &RenderSettings) -> RenderSettings {
        let mut s = job.clone();
        if let Some(steps) = self.steps {
            s.steps = steps;
        }
        if let Some(param) = &self.param {
            s.param = param.clone();
        }
        if let Some(transforms) = &self.transforms {
            s.transforms = transforms.clone();
        }
        s
    }
}

/// The dataset a job gathers activation statistics and top/bottom examples over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetSpec {
    /// A local directory or an S3 prefix holding image files or WebDataset `.tar` shards.
    pub uri: String,
    /// Top and bottom K per unit.
    pub examples: u32,
    /// Images per map task, for a dataset of image files (a tar is one shard).
    pub images_per_shard: u32,
    /// Whether the pass also computes the connections between units of consecutive job
    /// layers (docs/atlas-format.md "Connections"); jobs stored before it read as yes.
    #[serde(default = "yes")]
    pub connections: bool,
}

fn yes() -> bool {
    true
}

impl DatasetSpec {
    pub const MAX_EXAMPLES: u32 = 1000;
    pub const MAX_IMAGES_PER_SHARD: u32 = 100_000;

    pub fn validate(&self) -> Result<()> {
        if self.uri.trim().is_empty() {
            return Err(Error::invalid("dataset", "the dataset URI is empty"));
        }
        if !(1..=Self::MAX_EXAMPLES).contains(&self.examples) {
            return Err(Error::invalid(
                "dataset examples",
                format!("examples per unit {} is outside 1..={}", self.examples, Self::MAX_EXAMPLES),
            ));
        }
        if !(1..=Self::MAX_IMAGES_PER_SHARD).contains(&self.images_per_shard) {
            return Err(Error::invalid(
                "dataset images per shard",
                format!("images per shard {} is outside 1..={}", self.images_per_shard, Self::MAX_IMAGES_PER_SHARD),
            ));
        }
        Ok(())
    }
}

/// The item name of a deepdream started from noise.
pub const DEEPDREAM_NOISE: &str = "noise";

/// A whole atlas job, validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub model: ModelRef,
    pub layers: Vec<LayerPlan>,
    pub techniques: Vec<Technique>,
    pub settings: RenderSettings,
    /// Units per optimisation; each batch element is one unit.
    pub batch: u32,
    /// Where the atlas goes: a local directory (or, for the cluster, an object-store URI).
    pub out: String,
    /// A dataset to gather per-unit statistics and examples over, besides the renders.
    #[serde(default)]
    pub dataset: Option<DatasetSpec>,
}

impl JobSpec {
    /// The job layers before and after `layer`, in the job's order (the model's): the
    /// layers its connections join it with.
    pub fn neighbours(&self, layer: &str) -> (Option<String>, Option<String>) {
        let Some(at) = self.layers.iter().position(|p| p.layer.name == layer) else { return (None, None) };
        let name = |i: usize| self.layers.get(i).map(|p| p.layer.name.clone());
        (at.checked_sub(1).and_then(name), name(at + 1))
    }

    pub const MAX_BATCH: u32 = 4096;

    pub fn validate(&self) -> Result<()> {
        self.settings.validate()?;
        if self.batch == 0 || self.batch > Self::MAX_BATCH {
            return Err(Error::invalid("batch", format!("--batch {} is outside 1..={}", self.batch, Self::MAX_BATCH)));
        }
        if self.layers.is_empty() {
            return Err(Error::invalid("layers", "no layer selected"));
        }
        if self.techniques.is_empty() {
            return Err(Error::invalid("techniques", "no technique selected"));
        }
        for plan in &self.layers {
            crate::atlas::layer_segment(&plan.layer.name)?;
            if !plan.layer.shape.first().is_some_and(|&c| (1..=i64::from(u32::MAX)).contains(&c)) {
                return Err(Error::invalid(
                    "layers",
                    format!("layer {:?} has shape {:?}: its first dimension, the unit count, must be in 1..={}", plan.layer.name, plan.layer.shape, u32::MAX),
                ));
            }
            // The model's input is the job's: one model loads per job.
            if let Some(p) = plan.param.as_ref().filter(|p| p.channels != self.settings.param.channels) {
                return Err(Error::invalid(
                    "param.channels",
                    format!("layer {:?} has {} input channels, the job {}: the model's input is the job's", plan.layer.name, p.channels, self.settings.param.channels),
                ));
            }
            if plan.has_own_settings() {
                plan.settings(&self.settings).validate().map_err(|e| match e {
                    Error::Invalid { what, message } => Error::invalid(what, format!("layer {:?}: {message}", plan.layer.name)),
                    other => other,
                })?;
            }
            let techniques = self.techniques_for(plan);
            if techniques.is_empty() {
                return Err(Error::invalid("techniques", format!("no technique selected for layer {:?}", plan.layer.name)));
            }
            let name = &plan.layer.name;
            for &t in techniques {
                match t {
                    Technique::Caricature if self.settings.options.caricature_inputs.is_empty() => {
                        return Err(Error::invalid("caricature", format!("layer {name:?} asks for caricatures but no caricature input image is given")));
                    }
                    Technique::Direction if self.layer_items(plan, t).is_empty() => {
                        return Err(Error::invalid("direction", format!("layer {name:?} asks for directions but no direction names that layer")));
                    }
                    _ => {}
                }
            }
            for d in self.settings.options.directions.iter().filter(|d| &d.layer == name) {
                if d.vector.len() != plan.layer.units() as usize {
                    return Err(Error::invalid(
                        "direction",
                        format!("direction {:?} has {} values, but layer {name:?} has {} units", d.name, d.vector.len(), plan.layer.units()),
                    ));
                }
            }
            if plan.units.is_empty() {
                return Err(Error::invalid("units", format!("no unit selected in layer {:?}", plan.layer.name)));
            }
            check_units_in_layer(&plan.units, name, plan.layer.units())?;
        }
        if let Some(d) = &self.dataset {
            d.validate()?;
        }
        if let Some(d) = self.settings.options.directions.iter().find(|d| !self.layers.iter().any(|p| p.layer.name == d.layer)) {
            return Err(Error::invalid("direction", format!("direction {:?} is over layer {:?}, which the job does not render", d.name, d.layer)));
        }
        Ok(())
    }

    /// How many images the job asks for: (unit, technique) for per-unit techniques (a
    /// unit's diversity images count once), items for per-layer ones.
    pub fn total_images(&self) -> u64 {
        let mut total = 0;
        for plan in &self.layers {
            for &t in self.techniques_for(plan) {
                total += self.target_count(plan, t);
            }
        }
        total
    }

    /// How many targets a technique renders in a layer, counted without listing units.
    pub fn target_count(&self, plan: &LayerPlan, technique: Technique) -> u64 {
        if technique.per_unit() {
            plan.units.len()
        } else {
            self.layer_items(plan, technique).len() as u64
        }
    }

    /// The layer's techniques: its own, or the job's.
    pub fn techniques_for<'a>(&'a self, plan: &'a LayerPlan) -> &'a [Technique] {
        plan.techniques.as_deref().unwrap_or(&self.techniques)
    }

    /// The settings the layer renders with: the job's, with the layer's own.
    pub fn settings_for(&self, plan: &LayerPlan) -> RenderSettings {
        plan.settings(&self.settings)
    }

    /// What a technique renders in a layer: the layer's units for a per-unit technique,
    /// its items for a per-layer one.
    /// Lists every unit: callers check the job's size first (the coordinator's caps).
    pub fn targets<'a>(&self, plan: &'a LayerPlan, technique: Technique) -> Box<dyn Iterator<Item = crate::atlas::Target> + Send + 'a> {
        if technique.per_unit() {
            Box::new(plan.units.iter().map(crate::atlas::Target::Unit))
        } else {
            Box::new(self.layer_items(plan, technique).into_iter().map(crate::atlas::Target::Item))
        }
    }

    /// The items a per-layer technique renders in a layer: deepdream's start images (or
    /// one from `noise`), caricature's inputs, the layer's directions.
    pub fn layer_items(&self, plan: &LayerPlan, technique: Technique) -> Vec<String> {
        let o = &self.settings.options;
        match technique {
            Technique::DeepDream if o.deepdream_inputs.is_empty() => vec![DEEPDREAM_NOISE.to_string()],
            Technique::DeepDream => o.deepdream_inputs.iter().map(|i| i.name.clone()).collect(),
            Technique::Caricature => o.caricature_inputs.iter().map(|i| i.name.clone()).collect(),
            Technique::Direction => o.directions.iter().filter(|d| d.layer == plan.layer.name).map(|d| d.name.clone()).collect(),
            _ => Vec::new(),
        }
    }
}

/// The number format of the model's forward and backward passes. The image, its
/// spectrum and Adam stay fp32 either way; bf16 runs the network's weights and
/// activations in bfloat16, which is faster on GPUs with bf16 tensor cores and changes the
/// images slightly (docs/benchmarks.md gives the measured tolerance).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(Error::invalid("precision", format!("unknown precision {s:?}; use fp32 or bf16"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_selection_parses_the_three_forms() {
        assert_eq!("all".parse::<UnitSelection>().unwrap(), UnitSelection::All);
        assert_eq!("0..16".parse::<UnitSelection>().unwrap().resolve("l", 32).unwrap(), UnitRanges::range(0, 16));
        assert_eq!("7,0,3,3".parse::<UnitSelection>().unwrap().resolve("l", 8).unwrap().iter().collect::<Vec<_>>(), vec![0, 3, 7]);
        assert_eq!(UnitSelection::All.resolve("l", u32::MAX).unwrap().len(), u64::from(u32::MAX));
        assert!("5..5".parse::<UnitSelection>().is_err());
        assert!("a,b".parse::<UnitSelection>().is_err());
    }

    #[test]
    fn out_of_range_units_name_the_layer_and_count() {
        let err = "0..17".parse::<UnitSelection>().unwrap().resolve("conv1", 16).unwrap_err().to_string();
        assert!(err.contains("unit 16") && err.contains("conv1") && err.contains("16 units"), "{err}");
        let err = "3,20,30".parse::<UnitSelection>().unwrap().resolve("conv1", 16).unwrap_err().to_string();
        assert!(err.contains("unit 20 is out of range"), "{err}");
    }

    #[test]
    fn techniques_parse_and_refuse_unknown_or_repeated() {
        assert_eq!(Technique::parse_list("channel,negative").unwrap(), vec![Technique::Channel, Technique::Negative]);
        assert!(Technique::parse_list("channel,channel").is_err());
        assert_eq!(Technique::parse_list("diversity, deepdream").unwrap(), vec![Technique::Diversity, Technique::DeepDream]);
        assert!(Technique::parse_list("dreams").unwrap_err().to_string().contains("dreams"));
    }

    #[test]
    fn units_travel_as_ranges() {
        assert_eq!(to_ranges(&[0, 1, 2, 5, 7, 8]), vec![(0, 3), (5, 6), (7, 9)]);
        let plan = LayerPlan { layer: LayerInfo { name: "l".into(), shape: vec![1_000_000] }, units: UnitRanges::range(0, 1_000_000), techniques: None, steps: None, param: None, transforms: None };
        let json = serde_json::to_string(&plan).unwrap();
        assert!(json.len() < 100, "{json}");
        assert_eq!(serde_json::from_str::<LayerPlan>(&json).unwrap(), plan);
        let overlapping = json.replace("[[0,1000000]]", "[[0,5],[3,8]]");
        let err = serde_json::from_str::<LayerPlan>(&overlapping).unwrap_err().to_string();
        assert!(err.contains("3..8 overlaps 0..5"), "{err}");
    }

    #[test]
    fn a_lying_shape_is_counted_not_listed() {
        // 2^32 - 1 units in one range: validate and total_images count, never list.
        let layer = LayerInfo { name: "l".into(), shape: vec![u32::MAX as i64] };
        let mut spec = JobSpec {
            model: ModelRef { uri: "m".into(), name: "m".into(), sha256: String::new() },
            layers: vec![LayerPlan::new(layer, UnitRanges::range(0, u32::MAX))],
            techniques: vec![Technique::Channel, Technique::Neuron],
            settings: RenderSettings { steps: 1, size: 16, input_size: 16, seed: 0, learning_rate: 0.05, ..Default::default() },
            batch: 2,
            out: "o".into(),
            dataset: None,
        };
        spec.validate().unwrap();
        assert_eq!(spec.total_images(), 2 * u64::from(u32::MAX));
        spec.layers[0].layer.shape = vec![10];
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("unit 10 is out of range") && err.contains("10 units"), "{err}");
        for bad in [vec![-1], vec![1 << 32], vec![]] {
            spec.layers[0].layer.shape = bad;
            let err = spec.validate().unwrap_err().to_string();
            assert!(err.contains("the unit count, must be in 1..=4294967295"), "{err}");
        }
    }

    #[test]
    fn a_dataset_is_optional_and_validated() {
        let mut spec = JobSpec {
            model: ModelRef { uri: "m".into(), name: "m".into(), sha256: String::new() },
            layers: vec![LayerPlan { layer: LayerInfo { name: "l".into(), shape: vec![4] }, units: vec![0, 1].into(), techniques: None, steps: None, param: None, transforms: None }],
            techniques: vec![Technique::Channel],
            settings: RenderSettings { steps: 1, size: 16, input_size: 16, seed: 0, learning_rate: 0.05, ..Default::default() },
            batch: 2,
            out: "o".into(),
            dataset: None,
        };
        spec.validate().unwrap();
        // A spec stored before datasets existed reads as one without a dataset.
        let mut json: serde_json::Value = serde_json::to_value(&spec).unwrap();
        json.as_object_mut().unwrap().remove("dataset");
        assert_eq!(serde_json::from_value::<JobSpec>(json).unwrap(), spec);
        let good = DatasetSpec { uri: "s3://b/imagenet/val".into(), examples: 16, images_per_shard: 1000, connections: true };
        spec.dataset = Some(good.clone());
        spec.validate().unwrap();
        for (bad, word) in [
            (DatasetSpec { uri: " ".into(), ..good.clone() }, "URI"),
            (DatasetSpec { examples: 0, ..good.clone() }, "examples"),
            (DatasetSpec { examples: 1001, ..good.clone() }, "examples"),
            (DatasetSpec { images_per_shard: 0, ..good.clone() }, "images per shard"),
            (DatasetSpec { images_per_shard: 100_001, ..good.clone() }, "images per shard"),
        ] {
            spec.dataset = Some(bad);
            let err = spec.validate().unwrap_err().to_string();
            assert!(err.contains(word), "{err}");
        }
    }

    /// An item's files are `<item>.png`, `<item>.json` and `<item>.step<N>.png` in its
    /// technique's directory: item `x.step64`'s image would be item `x`'s snapshot.
    #[test]
    fn item_names_that_could_share_a_file_are_refused() {
        let image = |name: &str| NamedImage { name: name.into(), uri: "in.png".into() };
        let direction = |name: &str| Direction { name: name.into(), layer: "l".into(), vector: vec![1.0; 4] };
        let mut spec = JobSpec {
            model: ModelRef { uri: "m".into(), name: "m".into(), sha256: String::new() },
            layers: vec![LayerPlan { layer: LayerInfo { name: "l".into(), shape: vec![4] }, units: vec![0, 1].into(), techniques: None, steps: None, param: None, transforms: None }],
            techniques: vec![Technique::Caricature, Technique::DeepDream, Technique::Direction],
            settings: RenderSettings { steps: 128, size: 16, input_size: 16, thresholds: vec![64], ..Default::default() },
            batch: 2,
            out: "o".into(),
            dataset: None,
        };
        let o = &mut spec.settings.options;
        o.caricature_inputs = vec![image("x"), image("x.step-64"), image("x.step"), image("x.steps64")];
        o.deepdream_inputs = vec![image("dog.v2")];
        o.directions = vec![direction("a.step1x")];
        spec.validate().unwrap();
        for bad in ["x.step64", "x.step0", "cat.step007"] {
            for list in 0..3 {
                let mut spec = spec.clone();
                let o = &mut spec.settings.options;
                match list {
                    0 => o.caricature_inputs.push(image(bad)),
                    1 => o.deepdream_inputs.push(image(bad)),
                    _ => o.directions.push(direction(bad)),
                }
                let err = spec.validate().unwrap_err().to_string();
                assert!(err.contains(&format!("{bad:?}")) && err.contains(".step<N>.png"), "{err}");
            }
        }
        // On a case-insensitive disk (macOS, Windows) `Dog.png` is `dog.png`.
        spec.settings.options.deepdream_inputs.push(image("DOG.V2"));
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("\"DOG.V2\"") && err.contains("\"dog.v2\""), "{err}");
    }

    #[test]
    fn zero_steps_is_refused() {
        let s = RenderSettings { steps: 0, size: 128, input_size: 128, seed: 0, learning_rate: 0.05, ..Default::default() };
        assert!(s.validate().unwrap_err().to_string().contains("--steps"));
    }
}

