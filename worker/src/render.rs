//! One optimisation: a batch of FFT-parameterised images, one per unit, each pushed up its
//! unit's objective by Adam through the standard transforms (RECIPES.md "The standard
//! render").

use std::sync::atomic::{AtomicBool, Ordering};

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

pub fn render(model: &Model, req: &RenderRequest, cancel: &AtomicBool) -> Result<Vec<RenderedUnit>> {
    let device = model.device();
    let s = req.settings;
    let (size, batch, input_size) = (s.size as usize, req.units.len(), s.input_size as i64);
    let mut rngs = unit_streams(req);
    let init = FftImage::initial_spectrum(size, &mut rngs);
    // Every step's transform for every image, drawn up front and moved once.
    let thetas = Tensor::from_slice(&transform::thetas(s.steps, s.size, &mut rngs))
        .reshape([s.steps as i64, batch as i64, 2, 3])
        .to_device(device);

    let vs = nn::VarStore::new(device);
    let init = Tensor::from_slice(&init).reshape(FftImage::spectrum_shape(batch, size)).to_device(device);
    let image = FftImage::new(vs.root().var_copy("spectrum", &init), size, device);
    let mut adam = nn::OptimizerConfig::build(nn::Adam::default(), &vs, s.learning_rate).map_err(torch)?;
    let units = unit_tensor(req.units, device);

    for step in 0..s.steps as i64 {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let x = transformed(&image.image(), &thetas.get(step), input_size);
        let value = objective(&model.activation(&x, req.layer)?, req.technique, &units, req.layer)?;
        adam.backward_step(&-value.sum(Kind::Float));
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
    Error::Torch(e.to_string())
}
