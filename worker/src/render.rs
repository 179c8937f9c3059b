//! One optimisation: a batch of FFT-parameterised images, one per unit, each pushed up its
//! unit's objective by Adam through the standard transforms (RECIPES.md "The standard
//! render").

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tch::{nn, Device, Kind, Tensor};

use loupe_core::seed::{unit_seed, SplitMix64};
use loupe_core::spec::{RenderSettings, Technique};

use crate::model::Model;
use crate::objective::{objective, unit_tensor};
use crate::param::FftImage;
use crate::transform;
use crate::{Error, Result};

/// What to render: each unit of `units` in `layer` under `technique`.
#[derive(Debug, Clone)]
pub struct RenderRequest<'a> {
    pub layer: &'a str,
    pub technique: Technique,
    pub units: &'a [u32],
    pub settings: &'a RenderSettings,
}

/// One unit's image, `size x size` RGB bytes, and the objective on it untransformed.
#[derive(Debug, Clone)]
pub struct RenderedUnit {
    pub unit: u32,
    pub rgb: Vec<u8>,
    pub objective: f64,
}

/// Each unit's random stream: the initial spectrum is drawn first, then the transforms.
fn unit_streams(req: &RenderRequest) -> Vec<SplitMix64> {
    req.units.iter().map(|&u| SplitMix64::new(unit_seed(req.settings.seed, req.layer, u, req.technique))).collect()
}

/// The transformed batch at the model's input size: one affine resampling per image.
/// Sampling `x - 0.5` with zero padding and adding 0.5 back makes everything outside the
/// image 0.5, the padding colour.
fn transformed(images: &Tensor, theta: &Tensor, input_size: i64) -> Tensor {
    let b = images.size()[0];
    let grid = Tensor::affine_grid_generator(theta, [b, 3, input_size, input_size], false);
    (images - 0.5).grid_sampler(&grid, 0, 0, false) + 0.5
}

/// The images of a request before any step: what the optimisation starts from.
pub fn initial_images(req: &RenderRequest, device: Device) -> Vec<RenderedUnit> {
    let mut rngs = unit_streams(req);
    let size = req.settings.size as usize;
    let init = FftImage::initial_spectrum(size, &mut rngs);
    let spectrum = Tensor::from_slice(&init).reshape(FftImage::spectrum_shape(req.units.len(), size)).to_device(device);
    let images = FftImage::new(spectrum, size, device).image();
    to_units(req.units, &images, &vec![f64::NAN; req.units.len()])
}

/// Where one task's optimisation time went, summed over its steps. Measuring it
/// synchronises the device after each phase, which costs a little speed, so it is only
/// collected when asked for (`loupe render --profile`).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct StepTimes {
    pub steps: u64,
    /// The image from its spectrum, and the random affine resampling to the input size.
    pub transforms: Duration,
    /// The model up to the layer, and the objective.
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

/// Renders the request's units, in as few optimisations as the device's memory allows.
///
/// `max_batch` is the largest batch known to fit (`None`: not yet known). A batch that
/// runs out of memory is halved and run again, and the limit is lowered for the caller's
/// next request; so the batch follows the device's free memory unless the job's batch is
/// smaller. Each unit has its own seeded stream, so grouping never changes what is drawn.
pub fn render(model: &Model, req: &RenderRequest, cancel: &AtomicBool, max_batch: &mut Option<usize>, times: Option<&mut StepTimes>) -> Result<Vec<RenderedUnit>> {
    let mut times = times;
    in_batches(req.units, max_batch, |units| {
        let chunk = RenderRequest { units, ..req.clone() };
        optimise(model, &chunk, cancel, times.as_deref_mut())
    })
}

/// Runs `f` over `units` in batches of at most `*max_batch`, halving the batch (and the
/// limit) when `f` runs out of memory.
fn in_batches<T>(units: &[u32], max_batch: &mut Option<usize>, mut f: impl FnMut(&[u32]) -> Result<Vec<T>>) -> Result<Vec<T>> {
    let mut out = Vec::with_capacity(units.len());
    let mut rest = units;
    while !rest.is_empty() {
        let n = max_batch.unwrap_or(usize::MAX).min(rest.len()).max(1);
        match f(&rest[..n]) {
            Ok(done) => {
                out.extend(done);
                rest = &rest[n..];
            }
            Err(Error::OutOfMemory(msg)) if n > 1 => {
                tracing::info!(batch = n, "out of memory ({msg}); halving the batch");
                *max_batch = Some(n / 2);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// One optimisation of all the request's units together.
fn optimise(model: &Model, req: &RenderRequest, cancel: &AtomicBool, times: Option<&mut StepTimes>) -> Result<Vec<RenderedUnit>> {
    let device = model.device();
    let s = req.settings;
    let (size, batch, input_size) = (s.size as usize, req.units.len(), s.input_size as i64);
    let mut rngs = unit_streams(req);
    let init = FftImage::initial_spectrum(size, &mut rngs);
    // Every step's transform for every image, drawn up front and moved once, so the loop
    // never waits on the host.
    let thetas = Tensor::from_slice(&transform::thetas(s.steps, s.size, &mut rngs))
        .reshape([s.steps as i64, batch as i64, 2, 3])
        .to_device(device);

    let vs = nn::VarStore::new(device);
    let init = Tensor::from_slice(&init).reshape(FftImage::spectrum_shape(batch, size)).to_device(device);
    let image = FftImage::new(vs.root().var_copy("spectrum", &init), size, device);
    let mut adam = nn::OptimizerConfig::build(nn::Adam::default(), &vs, s.learning_rate).map_err(torch)?;
    let units = unit_tensor(req.units, device);

    let mut watch = Stopwatch { times, device, mark: Instant::now() };
    for step in 0..s.steps as i64 {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let x = transformed(&image.image(), &thetas.get(step), input_size);
        watch.lap(|t| &mut t.transforms);
        let value = objective(&model.activation(&x, req.layer)?, req.technique, &units, req.layer)?;
        let loss = -value.sum(Kind::Float);
        watch.lap(|t| &mut t.forward);
        adam.zero_grad();
        loss.f_backward().map_err(torch)?;
        watch.lap(|t| &mut t.backward);
        adam.step();
        watch.lap(|t| &mut t.optimiser);
    }
    if let Some(t) = watch.times.as_deref_mut() {
        t.steps += s.steps as u64;
    }

    let _no_grad = tch::no_grad_guard();
    let images = image.image();
    let identity = Tensor::from_slice(&transform::IDENTITY).reshape([1, 2, 3]).repeat([batch as i64, 1, 1]).to_device(device);
    let value = objective(&model.activation(&transformed(&images, &identity, input_size), req.layer)?, req.technique, &units, req.layer)?;
    let objectives: Vec<f64> = Vec::<f32>::try_from(&value.to_device(Device::Cpu)).map_err(torch)?.into_iter().map(f64::from).collect();
    if let Some(i) = objectives.iter().position(|v| !v.is_finite()) {
        return Err(Error::Torch(format!("unit {} of layer {:?}: the objective is not finite ({})", req.units[i], req.layer, objectives[i])));
    }
    Ok(to_units(req.units, &images, &objectives))
}

/// `[B, 3, S, S]` in [0, 1] -> per-unit RGB bytes, rounded to nearest.
fn to_units(units: &[u32], images: &Tensor, objectives: &[f64]) -> Vec<RenderedUnit> {
    let bytes = (images.to_device(Device::Cpu) * 255.0).round().clamp(0.0, 255.0).to_kind(Kind::Uint8).permute([0, 2, 3, 1]).contiguous();
    let per_unit = bytes.numel() / units.len().max(1);
    let flat = Vec::<u8>::try_from(bytes.flatten(0, -1)).expect("a uint8 tensor converts to bytes");
    units
        .iter()
        .zip(flat.chunks(per_unit))
        .zip(objectives)
        .map(|((&unit, rgb), &objective)| RenderedUnit { unit, rgb: rgb.to_vec(), objective })
        .collect()
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
        let out = in_batches(&units, &mut limit, |chunk| {
            tried.push(chunk.len());
            if chunk.len() > 3 { Err(Error::OutOfMemory("too big".into())) } else { Ok(chunk.to_vec()) }
        })
        .unwrap();
        assert_eq!(out, units, "every unit once, in order");
        assert_eq!(limit, Some(2));
        assert_eq!(tried, vec![10, 5, 2, 2, 2, 2, 2]);
        // The next request starts from the remembered limit.
        tried.clear();
        in_batches(&units[..4], &mut limit, |c| {
            tried.push(c.len());
            Ok(c.to_vec())
        })
        .unwrap();
        assert_eq!(tried, vec![2, 2]);
    }

    #[test]
    fn out_of_memory_at_one_unit_and_other_errors_are_returned() {
        let mut limit = Some(1);
        let e = in_batches(&[1, 2], &mut limit, |_| Err::<Vec<u32>, _>(Error::OutOfMemory("x".into()))).unwrap_err();
        assert!(matches!(e, Error::OutOfMemory(_)));
        let mut limit = None;
        let e = in_batches(&[1, 2], &mut limit, |_| Err::<Vec<u32>, _>(Error::Model("bad".into()))).unwrap_err();
        assert!(matches!(e, Error::Model(_)));
        assert_eq!(limit, None);
    }
}
