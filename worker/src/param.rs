//! The image parameterisation of lucid's `param.image(size)`: a Fourier spectrum scaled by
//! 1/frequency, decorrelated colour and a sigmoid (docs/techniques.md "The peers' recipe"; lucid
//! `optvis/param/spatial.py` and `color.py`, lucent `optvis/param/spatial.py`); and MACO's,
//! the phase of a spectrum whose magnitude is fixed (docs/techniques.md "MACO"; Fel et al.
//! 2023, serre-lab/Horama `maco_fv.py`).

use tch::{Device, Kind, Tensor};

use loupe_core::seed::SplitMix64;
use loupe_core::spec::{ParamKind, ParamSettings};

/// Lucid's colour correlation square root, from ImageNet.
pub const COLOR_CORRELATION_SVD_SQRT: [[f32; 3]; 3] = [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]];

/// Standard deviation of the initial spectrum (lucid/lucent `sd=0.01`).
pub const INIT_SD: f64 = 0.01;

/// Added to the standard deviation MACO divides its spatial image by (Horama's
/// `standardize`).
const STANDARDIZE_EPSILON: f64 = 1e-4;

/// The radial frequency, in cycles a pixel, of a MACO magnitude profile's last value:
/// the corner of the spectrum, where both frequencies are 1/2.
pub const PROFILE_MAX_FREQUENCY: f32 = std::f32::consts::FRAC_1_SQRT_2;

/// A colour matrix divided by its largest column norm, as lucid does.
pub fn normalise_columns(m: [[f32; 3]; 3]) -> [[f32; 3]; 3] {
    let max_norm = (0..3).map(|c| (0..3).map(|r| m[r][c] * m[r][c]).sum::<f32>().sqrt()).fold(0.0, f32::max);
    m.map(|row| row.map(|v| v / max_norm))
}

/// Lucid's ImageNet colour matrix divided by its largest column norm.
pub fn color_matrix() -> [[f32; 3]; 3] {
    normalise_columns(COLOR_CORRELATION_SVD_SQRT)
}

/// `numpy.fft.fftfreq(n)`: 0, 1, ..., then the negative frequencies, over n.
fn fftfreq(n: usize) -> Vec<f32> {
    let half = n.div_ceil(2);
    (0..n).map(|i| if i < half { i as f32 } else { i as f32 - n as f32 } / n as f32).collect()
}

/// The spectrum scale for an `h x w` image, `[h, w/2 + 1]`: 1 / max(freq, 1/max(w, h)),
/// decay 1. With an orthonormal inverse FFT this equals lucid's scale times sqrt(w*h)
/// with its unnormalised one (lucent's form).
pub fn spectrum_scale(h: usize, w: usize) -> Vec<f32> {
    spectrum_scale_decay(h, w, 1.0)
}

/// [`spectrum_scale`] with lucid's `decay_power`: 1 / max(freq, 1/max(w, h))^decay.
/// Decay 1 is computed without a power, so it gives exactly the values loupe always had.
pub fn spectrum_scale_decay(h: usize, w: usize, decay: f64) -> Vec<f32> {
    let fy = fftfreq(h);
    let fx: Vec<f32> = (0..w / 2 + 1).map(|i| i as f32 / w as f32).collect();
    let floor = 1.0 / h.max(w) as f32;
    fy.iter()
        .flat_map(|y| {
            fx.iter().map(move |x| {
                let f = (x * x + y * y).sqrt().max(floor);
                if decay == 1.0 { 1.0 / f } else { (1.0 / f64::from(f).powf(decay)) as f32 }
            })
        })
        .collect()
}

/// The radial frequency of each bin of an `h x w` real spectrum, `[h, w/2 + 1]`, in
/// cycles a pixel (numpy's `fftfreq` and `rfftfreq`).
fn radial_frequencies(h: usize, w: usize) -> Vec<f32> {
    fftfreq(h).into_iter().flat_map(|y| (0..w / 2 + 1).map(move |x| (x as f32 / w as f32).hypot(y))).collect()
}

/// A MACO magnitude profile resampled to an `h x w` real spectrum, `[h, w/2 + 1]`: at
/// radial frequency r, the profile linearly interpolated at r / [`PROFILE_MAX_FREQUENCY`]
/// of its length.
pub fn profile_magnitude(profile: &[f32], h: usize, w: usize) -> Vec<f32> {
    let last = (profile.len() - 1) as f32;
    radial_frequencies(h, w)
        .into_iter()
        .map(|r| {
            let at = (r / PROFILE_MAX_FREQUENCY * last).min(last);
            let (i, frac) = (at.floor() as usize, at.fract());
            let next = profile[(i + 1).min(profile.len() - 1)];
            profile[i] * (1.0 - frac) + next * frac
        })
        .collect()
}

/// The radial profile of `bins` values of an `h x w` real spectrum's amplitudes
/// (`[h, w/2 + 1]`), the inverse of [`profile_magnitude`]: each value the mean of the
/// amplitudes nearest its radial frequency; a bin that no frequency falls nearest (at
/// a small `h x w`) takes its lower neighbour's.
pub fn radial_profile(amplitudes: &[f32], h: usize, w: usize, bins: usize) -> Vec<f32> {
    let last = (bins - 1) as f32;
    let mut sums = vec![(0.0f64, 0u32); bins];
    for (r, a) in radial_frequencies(h, w).into_iter().zip(amplitudes) {
        let k = ((r / PROFILE_MAX_FREQUENCY * last).round() as usize).min(bins - 1);
        sums[k].0 += f64::from(*a);
        sums[k].1 += 1;
    }
    let mut out = Vec::with_capacity(bins);
    for (sum, n) in sums {
        let previous = out.last().copied().unwrap_or(0.0);
        out.push(if n == 0 { previous } else { (sum / f64::from(n)) as f32 });
    }
    out
}

/// MACO's magnitude from example images (`[N, C, S, S]` in [0, 1]): per channel, the
/// radial profile of `bins` values of their mean amplitude spectrum, taken where MACO's
/// spectrum lies: the sigmoid and the colour matrix inverted (as [`ParamImage::invert`]
/// does). Horama's magnitude template is the same mean over ImageNet in its decorrelated
/// colour space, kept whole rather than radially. Frequency 0, the images' mean colour,
/// is not used (a MACO image's mean is a parameter of its own) and takes the next value,
/// so that resampling the profile at the lowest frequencies of a large render does not
/// interpolate towards it (it is 100 times the rest on the test dataset).
pub fn dataset_magnitude(images: &Tensor, p: &ParamSettings, bins: usize) -> Vec<Vec<f32>> {
    let _guard = tch::no_grad_guard();
    let size = images.size()[2] as usize;
    let pixel = ParamSettings { kind: ParamKind::Pixel, maco: false, magnitude: None, ..p.clone() };
    let blank = ParamImage::new(Tensor::zeros([1].as_slice(), (Kind::Float, Device::Cpu)), &pixel, size, Device::Cpu);
    let x = blank.invert(&images.to_device(Device::Cpu));
    let amplitude = x.fft_rfftn(None::<&[i64]>, Some([-2i64, -1].as_slice()), "ortho").abs().mean_dim(0, false, Kind::Float);
    (0..p.channels as i64)
        .map(|c| {
            let a = Vec::<f32>::try_from(amplitude.get(c).flatten(0, -1)).expect("a float tensor converts to floats");
            let mut profile = radial_profile(&a, size, size, bins);
            profile[0] = profile[1];
            profile
        })
        .collect()
}

/// The values at frequency 0 of real spectra `[B, C, h, w/2+1]`: `[B, C, 1, 1]`, a view.
fn frequency_0(spectra: &Tensor) -> Tensor {
    spectra.narrow(2, 0, 1).narrow(3, 0, 1)
}

/// Sets frequency 0 of each of `channels` real spectra, flattened one after another, to 0.
fn zero_frequency_0(spectra: &mut [f32], channels: u32) {
    let per_channel = spectra.len() / channels as usize;
    for value in spectra.iter_mut().step_by(per_channel) {
        *value = 0.0;
    }
}

/// The colour matrix a parameterisation uses, or `None` for none (`decorrelate = false`).
pub fn settings_color_matrix(p: &ParamSettings) -> Option<[[f32; 3]; 3]> {
    p.decorrelate.then(|| p.color_matrix.map(normalise_columns).unwrap_or_else(color_matrix))
}

/// What a parameterisation optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// An FFT spectrum, real and imaginary parts.
    Spectrum,
    /// MACO: the phase of an FFT spectrum of fixed magnitude.
    Phase,
    Pixels,
}

impl Form {
    fn of(p: &ParamSettings) -> Form {
        match p.kind {
            ParamKind::Fft if p.maco => Form::Phase,
            ParamKind::Fft => Form::Spectrum,
            ParamKind::Pixel => Form::Pixels,
        }
    }
}

/// A batch of parameterised images: lucid's `param.image` with `fft` or `pixel`, or
/// MACO's, then decorrelated colour (3 channels) or none, then a sigmoid to [0, 1].
///
/// - FFT: `[B, C, h, w/2+1, 2]` (real and imaginary parts) scaled by
///   1/frequency^decay, an orthonormal inverse real FFT, divided by 4;
/// - pixel: `[B, C, h, w]` values (lucid's `pixel_image`);
/// - MACO: `[B, C, h, w/2+1]` phases under the fixed magnitude, an orthonormal inverse
///   real FFT, and each image standardised (mean 0, standard deviation 1 over its
///   channels and pixels), as Horama's `maco_preconditioner` does.
pub struct ParamImage {
    /// The optimised tensor.
    pub param: Tensor,
    form: Form,
    channels: i64,
    /// FFT: the spectrum scale, `[h, w/2+1]`; MACO: the magnitude, `[C, h, w/2+1]`.
    scale: Option<Tensor>,
    /// `[3, 3]`, when decorrelated.
    color: Option<Tensor>,
    size: i64,
}

impl ParamImage {
    /// Values per image of the parameter tensor.
    pub fn values_per_image(p: &ParamSettings, size: usize) -> usize {
        let c = p.channels as usize;
        match Form::of(p) {
            Form::Spectrum => c * size * (size / 2 + 1) * 2,
            Form::Pixels => c * size * size,
            Form::Phase => c * size * (size / 2 + 1),
        }
    }

    pub fn shape(p: &ParamSettings, batch: usize, size: usize) -> Vec<i64> {
        let (b, c, s) = (batch as i64, p.channels as i64, size as i64);
        match Form::of(p) {
            Form::Spectrum => vec![b, c, s, s / 2 + 1, 2],
            Form::Pixels => vec![b, c, s, s],
            Form::Phase => vec![b, c, s, s / 2 + 1],
        }
    }

    /// MACO's fixed magnitude, `[C, h, w/2+1]` flattened: each channel's profile
    /// resampled, or 1/frequency^decay for every channel; 0 at frequency 0, as each
    /// channel's mean is a parameter of its own ([`ParamImage::spatial`]).
    pub fn maco_magnitude(p: &ParamSettings, size: usize) -> Vec<f32> {
        let mut magnitude = match &p.magnitude {
            Some(profiles) => profiles.iter().flat_map(|row| profile_magnitude(row, size, size)).collect(),
            None => spectrum_scale_decay(size, size, p.decay).repeat(p.channels as usize),
        };
        zero_frequency_0(&mut magnitude, p.channels);
        magnitude
    }

    /// One image's initial values, N(0, sd), drawn from its stream (lucid: sd 0.01); for
    /// MACO, phases uniform in [-pi, pi) whatever `sd`. (Horama draws them N(0, 1), which
    /// puts every frequency's cosine nearly in phase at the origin: a spot at pixel (0, 0)
    /// measured 16 standard deviations out at 32 px, which the sigmoid saturates.) Each
    /// channel's frequency 0 holds its mean instead, which starts at 0: a grey mean.
    pub fn draw(p: &ParamSettings, size: usize, sd: f64, rng: &mut SplitMix64) -> Vec<f32> {
        let n = Self::values_per_image(p, size);
        match Form::of(p) {
            Form::Phase => {
                let mut phases: Vec<f32> = (0..n).map(|_| ((rng.next_f64() * 2.0 - 1.0) * std::f64::consts::PI) as f32).collect();
                zero_frequency_0(&mut phases, p.channels);
                phases
            }
            _ => (0..n).map(|_| (rng.next_normal() * sd) as f32).collect(),
        }
    }

    pub fn new(param: Tensor, p: &ParamSettings, size: usize, device: Device) -> ParamImage {
        let s = size as i64;
        let form = Form::of(p);
        let scale = match form {
            Form::Spectrum => Some(Tensor::from_slice(&spectrum_scale_decay(size, size, p.decay)).reshape([s, s / 2 + 1])),
            Form::Phase => Some(Tensor::from_slice(&Self::maco_magnitude(p, size)).reshape([p.channels as i64, s, s / 2 + 1])),
            Form::Pixels => None,
        }
        .map(|t| t.to_device(device));
        let color = settings_color_matrix(p).map(|m| {
            let v: Vec<f32> = m.iter().flatten().copied().collect();
            Tensor::from_slice(&v).reshape([3, 3]).to_device(device)
        });
        ParamImage { param, form, channels: p.channels as i64, scale, color, size: s }
    }

    pub fn channels(&self) -> i64 {
        self.channels
    }

    /// The images before colour and sigmoid, `[B, C, size, size]`.
    fn spatial(&self) -> Tensor {
        let irfft = |spectrum: Tensor| spectrum.fft_irfftn(Some([self.size, self.size].as_slice()), Some([-2i64, -1].as_slice()), "ortho");
        match (&self.scale, self.form) {
            (Some(magnitude), Form::Phase) => {
                // Horama builds the spectrum from cos and sin of the phase, not polar().
                // Every channel's mean is 0 here: the magnitude is 0 at frequency 0.
                let texture = irfft(Tensor::complex(&(self.param.cos() * magnitude), &(self.param.sin() * magnitude)));
                let texture = &texture / (texture.std_dim([1i64, 2, 3].as_slice(), true, true) + STANDARDIZE_EPSILON);
                texture + self.means()
            }
            (Some(scale), _) => irfft(self.param.view_as_complex() * scale) / 4.0,
            (None, _) => self.param.shallow_clone(),
        }
    }

    /// MACO's mean of each channel, `[B, C, 1, 1]`, in the standardised image's units:
    /// the parameter at frequency 0, which has no phase (a real image's mean is real).
    fn means(&self) -> Tensor {
        frequency_0(&self.param)
    }

    /// The images, `[B, C, size, size]` in [0, 1].
    pub fn image(&self) -> Tensor {
        let x = self.spatial();
        let x = match &self.color {
            // rgb = Cn @ t for every pixel.
            Some(color) => x.permute([0, 2, 3, 1]).matmul(&color.tr()).permute([0, 3, 1, 2]),
            None => x,
        };
        x.sigmoid()
    }

    /// The parameter values whose image is `images` (`[B, C, size, size]` in [0, 1]),
    /// to start from a given image: the sigmoid, the colour matrix and the FFT inverted.
    /// Values are clamped to [1e-4, 1 - 1e-4] first, so the image comes back within 1e-4.
    /// MACO keeps only the phase of the image's spectrum: its image is the start image's
    /// structure under the fixed magnitude, not the start image itself.
    pub fn invert(&self, images: &Tensor) -> Tensor {
        let _guard = tch::no_grad_guard();
        let images = images.to_kind(Kind::Float);
        let x = images.clamp(1e-4, 1.0 - 1e-4).logit(None::<f64>);
        let x = match &self.color {
            // x = t @ C^T, so t = x @ (C^T)^-1.
            Some(color) => x.permute([0, 2, 3, 1]).matmul(&color.tr().pinverse(1e-6)).permute([0, 3, 1, 2]),
            None => x,
        };
        match (&self.scale, self.form) {
            (Some(scale), Form::Spectrum) => {
                let spectrum = (x * 4.0).fft_rfftn(Some([self.size, self.size].as_slice()), Some([-2i64, -1].as_slice()), "ortho") / scale;
                spectrum.view_as_real().contiguous()
            }
            (_, Form::Phase) => {
                let means = x.mean_dim([2i64, 3].as_slice(), true, Kind::Float);
                let texture = &x - &means;
                let param = texture.fft_rfftn(Some([self.size, self.size].as_slice()), Some([-2i64, -1].as_slice()), "ortho").angle().contiguous();
                let scale = texture.std_dim([1i64, 2, 3].as_slice(), true, true) + STANDARDIZE_EPSILON;
                frequency_0(&param).copy_(&(means / scale));
                param
            }
            _ => x.contiguous(),
        }
    }
}

/// The default parameterisation's image: an FFT spectrum, lucid's colours, 3 channels.
/// Kept for callers that predate [`ParamImage`].
pub struct FftImage;

impl FftImage {
    /// The initial spectrum, N(0, 0.01), each image's drawn from its own stream.
    pub fn initial_spectrum(size: usize, rngs: &mut [SplitMix64]) -> Vec<f32> {
        let p = ParamSettings::default();
        rngs.iter_mut().flat_map(|rng| ParamImage::draw(&p, size, INIT_SD, rng)).collect()
    }

    pub fn spectrum_shape(batch: usize, size: usize) -> [i64; 5] {
        [batch as i64, 3, size as i64, size as i64 / 2 + 1, 2]
    }
}

#[cfg(test)]
fn zeros_like_spectrum(batch: usize, size: usize, device: Device) -> Tensor {
    Tensor::zeros(FftImage::spectrum_shape(batch, size), (tch::Kind::Float, device))
}

#[cfg(test)]
fn fft(spectrum: Tensor, size: usize) -> ParamImage {
    ParamImage::new(spectrum, &ParamSettings::default(), size, Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_matrix_is_lucids_normalised_by_its_largest_column_norm() {
        // docs/techniques.md "The peers' recipe": the largest column L2 norm is about 0.462.
        let m = COLOR_CORRELATION_SVD_SQRT;
        let norm0 = (m[0][0] * m[0][0] + m[1][0] * m[1][0] + m[2][0] * m[2][0]).sqrt();
        assert!((norm0 - 0.4621).abs() < 1e-3, "{norm0}");
        let n = color_matrix();
        assert!((n[0][0] - 0.26 / norm0).abs() < 1e-6);
        assert!((n[1][2] - (-0.05 / norm0)).abs() < 1e-6);
        let max_col = (0..3).map(|c| (0..3).map(|r| n[r][c] * n[r][c]).sum::<f32>().sqrt()).fold(0.0, f32::max);
        assert!((max_col - 1.0).abs() < 1e-6);
    }

    #[test]
    fn spectrum_scale_matches_lucid() {
        // h = w = 128: freq 0 is floored to 1/128, so scale 128; freq k/128 gives 128/k.
        let s = spectrum_scale(128, 128);
        let at = |y: usize, x: usize| s[y * 65 + x];
        assert_eq!(at(0, 0), 128.0);
        assert_eq!(at(0, 1), 128.0);
        assert!((at(0, 2) - 64.0).abs() < 1e-4);
        assert!((at(0, 64) - 2.0).abs() < 1e-5, "Nyquist column");
        assert!((at(127, 0) - 128.0).abs() < 1e-3, "row 127 is frequency -1/128");
        assert!((at(3, 4) - 128.0 / 5.0).abs() < 1e-4, "sqrt(3^2 + 4^2) = 5");
        // Odd and non-square sizes follow numpy's fftfreq and rfftfreq.
        let s = spectrum_scale(5, 4);
        assert_eq!(s.len(), 5 * 3);
        assert!((s[3 * 3] - 1.0 / 0.4).abs() < 1e-5, "fftfreq(5)[3] = -0.4");
    }

    #[test]
    fn a_zero_spectrum_is_mid_grey_and_the_fft_is_orthonormal() {
        let img = fft(zeros_like_spectrum(2, 8, Device::Cpu), 8);
        let x = img.image();
        assert_eq!(x.size(), vec![2, 3, 8, 8]);
        assert!((x - 0.5).abs().max().double_value(&[]) < 1e-7);
        // A DC coefficient c gives a flat image c * scale / sqrt(h*w) / 4 before colour.
        let spectrum = zeros_like_spectrum(1, 8, Device::Cpu);
        let _ = spectrum.narrow(1, 0, 1).narrow(2, 0, 1).narrow(3, 0, 1).narrow(4, 0, 1).fill_(1.0);
        let img = fft(spectrum, 8);
        let flat = img.spatial();
        let expected = 8.0 / 8.0 / 4.0; // scale(0,0) = 8, /sqrt(64), /4
        let v = flat.get(0).get(0);
        assert!((v.min().double_value(&[]) - expected).abs() < 1e-6 && (v.max().double_value(&[]) - expected).abs() < 1e-6);
    }

    #[test]
    fn decay_one_is_the_plain_scale_and_other_decays_are_powers() {
        assert_eq!(spectrum_scale_decay(16, 16, 1.0), spectrum_scale(16, 16));
        let two = spectrum_scale_decay(16, 16, 2.0);
        let one = spectrum_scale(16, 16);
        for (a, b) in two.iter().zip(&one) {
            assert!((a - b * b).abs() <= 1e-3 * a.abs(), "{a} vs {b}^2");
        }
        assert!(spectrum_scale_decay(16, 16, 0.0).iter().all(|&v| v == 1.0));
    }

    fn random_images(c: i64, size: i64, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::rand([2, c, size, size], (Kind::Float, Device::Cpu))
    }

    /// Starting from a given image: the inverted parameters give the image back within
    /// 1/255 (the clamp to [1e-4, 1 - 1e-4] costs at most 1e-4), for every
    /// parameterisation.
    #[test]
    fn inverting_reproduces_the_image() {
        let cases = [
            ParamSettings::default(),
            ParamSettings { kind: ParamKind::Pixel, ..Default::default() },
            ParamSettings { decay: 1.5, decorrelate: false, ..Default::default() },
            ParamSettings { kind: ParamKind::Pixel, decorrelate: false, channels: 1, ..Default::default() },
            ParamSettings { decorrelate: false, channels: 5, ..Default::default() },
            ParamSettings { color_matrix: Some([[0.5, 0.1, 0.0], [0.5, 0.0, 0.1], [0.5, -0.1, 0.0]]), ..Default::default() },
        ];
        for (i, p) in cases.iter().enumerate() {
            for size in [8usize, 9, 16] {
                let target = random_images(p.channels as i64, size as i64, i as i64);
                let shape = ParamImage::shape(p, 2, size);
                let img = ParamImage::new(Tensor::zeros(shape.as_slice(), (Kind::Float, Device::Cpu)), p, size, Device::Cpu);
                let param = img.invert(&target);
                assert_eq!(param.size(), shape, "{p:?}");
                let back = ParamImage::new(param, p, size, Device::Cpu).image();
                let err = (back - &target).abs().max().double_value(&[]);
                assert!(err < 1.0 / 255.0, "{p:?} at {size}: max error {err}");
            }
        }
    }

    #[test]
    fn pixel_and_channel_counts_shape_the_image() {
        let p = ParamSettings { kind: ParamKind::Pixel, decorrelate: false, channels: 1, ..Default::default() };
        let mut rng = SplitMix64::new(1);
        let v = ParamImage::draw(&p, 8, INIT_SD, &mut rng);
        assert_eq!(v.len(), 64);
        let img = ParamImage::new(Tensor::from_slice(&v).reshape(ParamImage::shape(&p, 1, 8).as_slice()), &p, 8, Device::Cpu).image();
        assert_eq!(img.size(), vec![1, 1, 8, 8]);
        assert!((img - 0.5).abs().max().double_value(&[]) < 0.01, "N(0, 0.01) pixels are near grey");
        let p = ParamSettings { decorrelate: false, channels: 4, ..Default::default() };
        assert_eq!(ParamImage::values_per_image(&p, 8), 4 * 8 * 5 * 2);
        // The default parameterisation draws what loupe always drew.
        let mut a = [SplitMix64::new(5)];
        let mut b = SplitMix64::new(5);
        assert_eq!(FftImage::initial_spectrum(8, &mut a), ParamImage::draw(&ParamSettings::default(), 8, INIT_SD, &mut b));
    }

    fn maco() -> ParamSettings {
        ParamSettings { maco: true, ..Default::default() }
    }

    fn maco_image(p: &ParamSettings, batch: usize, size: usize, seed: u64) -> ParamImage {
        let mut rng = SplitMix64::new(seed);
        let v: Vec<f32> = (0..batch).flat_map(|_| ParamImage::draw(p, size, INIT_SD, &mut rng)).collect();
        ParamImage::new(Tensor::from_slice(&v).reshape(ParamImage::shape(p, batch, size).as_slice()), p, size, Device::Cpu)
    }

    /// Resampling a profile to a spectrum and averaging it back by radius gives the
    /// profile again, up to the interpolation between bins.
    #[test]
    fn a_magnitude_profile_survives_resampling_and_averaging() {
        // Linear, so that interpolating between bins is exact.
        let profile: Vec<f32> = (0..32).map(|k| 2.0 - k as f32 / 31.0).collect();
        let spectrum = profile_magnitude(&profile, 64, 64);
        assert_eq!(spectrum.len(), 64 * 33);
        assert_eq!(spectrum[0], 2.0, "frequency 0 is the first value");
        assert!((spectrum[32 * 33 + 32] - profile[31]).abs() < 1e-6, "the corner (1/2, 1/2) is the last value");
        let back = radial_profile(&spectrum, 64, 64, 32);
        for (k, (a, b)) in back.iter().zip(&profile).enumerate() {
            // The last bin averages only the frequencies below it: 1.2% high here.
            assert!((a - b).abs() <= 0.02 * b, "bin {k}: {a} for {b}");
        }
    }

    /// MACO's image before colour has each image standardised, and its spectrum's
    /// amplitudes are the fixed magnitude's (to a factor, DC aside): only the phase moves.
    #[test]
    fn maco_fixes_the_magnitude_and_standardises_each_image() {
        let profiles = vec![vec![4.0, 2.0, 1.0, 0.5], vec![1.0; 4], vec![1.0, 0.0, 0.0, 0.0]];
        for p in [maco(), ParamSettings { magnitude: Some(profiles.clone()), ..maco() }] {
            let img = maco_image(&p, 2, 16, 3);
            let x = img.spatial();
            for b in 0..2 {
                let xb = x.get(b);
                assert!(xb.mean(Kind::Float).double_value(&[]).abs() < 1e-5);
                assert!((xb.std(true).double_value(&[]) - 1.0).abs() < 1e-3);
            }
            let amplitude = x.fft_rfftn(Some([16i64, 16].as_slice()), Some([-2i64, -1].as_slice()), "ortho").abs();
            let magnitude = Tensor::from_slice(&ParamImage::maco_magnitude(&p, 16)).reshape([3, 16, 9]);
            // Channel 0, away from DC and the columns irfft makes Hermitian: one ratio.
            let ratio = amplitude.get(0).get(0).narrow(0, 1, 7).narrow(1, 1, 7) / magnitude.get(0).narrow(0, 1, 7).narrow(1, 1, 7);
            let (lo, hi) = (ratio.min().double_value(&[]), ratio.max().double_value(&[]));
            assert!(hi - lo < 1e-3 * hi, "{p:?}: amplitude / magnitude in {lo}..{hi}");
        }
        let flat = ParamSettings { magnitude: Some(profiles), ..maco() };
        let x = maco_image(&flat, 1, 16, 3).spatial();
        let high = x.get(0).get(2).fft_rfftn(Some([16i64, 16].as_slice()), Some([-2i64, -1].as_slice()), "ortho").abs().narrow(0, 4, 1);
        assert!(high.max().double_value(&[]) < 1e-4, "a profile that is 0 beyond DC leaves channel 2 without high frequencies");
    }

    /// Each image is standardised on its own: its batch-mates change nothing.
    #[test]
    fn maco_images_do_not_depend_on_their_batch() {
        let p = maco();
        let both = maco_image(&p, 2, 8, 5).image();
        let mut rng = SplitMix64::new(5);
        let _first = ParamImage::draw(&p, 8, INIT_SD, &mut rng);
        let second = ParamImage::draw(&p, 8, INIT_SD, &mut rng);
        let alone = ParamImage::new(Tensor::from_slice(&second).reshape(ParamImage::shape(&p, 1, 8).as_slice()), &p, 8, Device::Cpu).image();
        assert!((both.get(1) - alone.get(0)).abs().max().double_value(&[]) < 1e-6);
        assert_eq!(ParamImage::values_per_image(&p, 8), 3 * 8 * 5);
    }

    /// Inverting a MACO image gives back its phases, wherever they are free: not at the
    /// columns of frequency 0 and 1/2 across, which a real image makes Hermitian (the
    /// inverse FFT of the random phases there is not the image's own). Any other image
    /// inverts to finite phases: it keeps its structure, not its pixels.
    #[test]
    fn inverting_a_maco_image_keeps_its_phase() {
        for p in [maco(), ParamSettings { decorrelate: false, channels: 1, ..maco() }] {
            let img = maco_image(&p, 2, 16, 9);
            let phase = img.invert(&img.image());
            // The difference of the phases, wrapped to (-pi, pi].
            let free = |t: &Tensor| t.narrow(3, 1, 7);
            let diff = free(&phase) - free(&img.param);
            let wrapped = diff.sin().atan2(&diff.cos());
            let err = wrapped.abs().max().double_value(&[]);
            assert!(err < 1e-3, "{p:?}: phases off by {err}");
        }
        let p = maco();
        let target = random_images(3, 16, 1);
        let blank = ParamImage::new(Tensor::zeros([1].as_slice(), (Kind::Float, Device::Cpu)), &p, 16, Device::Cpu);
        let param = blank.invert(&target);
        assert_eq!(param.size(), ParamImage::shape(&p, 2, 16));
        let back = ParamImage::new(param, &p, 16, Device::Cpu).image();
        assert!(back.isfinite().all().int64_value(&[]) == 1);
    }

    /// Frequency 0 has no phase: its parameter is the channel's mean, in the standardised
    /// image's units, with the texture's contrast whatever the mean; inverting the image
    /// gives the means back.
    #[test]
    fn a_maco_channels_mean_is_its_parameter_at_frequency_0() {
        let img = maco_image(&maco(), 1, 16, 4);
        let means = [0.5, -1.0, 2.0];
        for (c, mean) in means.iter().enumerate() {
            let _ = img.param.get(0).get(c as i64).get(0).get(0).fill_(*mean);
        }
        let x = img.spatial().get(0);
        let channel_means = x.mean_dim([1i64, 2].as_slice(), true, Kind::Float);
        for (c, mean) in means.iter().enumerate() {
            assert!((channel_means.double_value(&[c as i64, 0, 0]) - mean).abs() < 1e-5);
        }
        assert!(((x - channel_means).std(true).double_value(&[]) - 1.0).abs() < 1e-3);
        let back = img.invert(&img.image());
        for (c, mean) in means.iter().enumerate() {
            assert!((back.double_value(&[0, c as i64, 0, 0]) - mean).abs() < 1e-3, "channel {c}: {back:?}");
        }
    }

    /// The dataset's magnitude is the radial profile of its images' mean amplitude:
    /// MACO's own images, whose amplitude is the 1/f magnitude to a factor, give back
    /// a profile proportional to 1/f.
    #[test]
    fn the_dataset_magnitude_of_maco_images_is_their_magnitude() {
        let p = ParamSettings { decorrelate: false, ..maco() };
        let images = maco_image(&p, 4, 32, 2).image();
        let profile = dataset_magnitude(&images, &p, 16);
        assert_eq!((profile.len(), profile[0].len()), (3, 16));
        let want = radial_profile(&spectrum_scale(32, 32), 32, 32, 16);
        // Past DC (which the standardisation moved) and the corner bins, one ratio to 10%.
        let ratios: Vec<f32> = profile[1][2..14].iter().zip(&want[2..14]).map(|(a, b)| a / b).collect();
        let (lo, hi) = ratios.iter().fold((f32::MAX, 0.0f32), |(lo, hi), &r| (lo.min(r), hi.max(r)));
        assert!(hi < 1.1 * lo, "{ratios:?}");
    }
}
