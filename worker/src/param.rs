//! The image parameterisation of lucid's `param.image(size)`: a Fourier spectrum scaled by
//! 1/frequency, decorrelated colour and a sigmoid (docs/techniques.md "The peers' recipe"; lucid
//! `optvis/param/spatial.py` and `color.py`, lucent `optvis/param/spatial.py`).

use tch::{Device, Kind, Tensor};

use loupe_core::seed::SplitMix64;
use loupe_core::spec::{ParamKind, ParamSettings};

/// Lucid's colour correlation square root, from ImageNet.
pub const COLOR_CORRELATION_SVD_SQRT: [[f32; 3]; 3] = [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]];

/// Standard deviation of the initial spectrum (lucid/lucent `sd=0.01`).
pub const INIT_SD: f64 = 0.01;

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

/// The colour matrix a parameterisation uses, or `None` for none (`decorrelate = false`).
pub fn settings_color_matrix(p: &ParamSettings) -> Option<[[f32; 3]; 3]> {
    p.decorrelate.then(|| p.color_matrix.map(normalise_columns).unwrap_or_else(color_matrix))
}

/// A batch of parameterised images: lucid's `param.image` with `fft` or `pixel`, then
/// decorrelated colour (3 channels) or none, then a sigmoid to [0, 1].
///
/// - FFT: `[B, C, h, w/2+1, 2]` (real and imaginary parts) scaled by
///   1/frequency^decay, an orthonormal inverse real FFT, divided by 4;
/// - pixel: `[B, C, h, w]` values (lucid's `pixel_image`).
pub struct ParamImage {
    /// The optimised tensor.
    pub param: Tensor,
    kind: ParamKind,
    channels: i64,
    /// FFT only: `[h, w/2+1]`.
    scale: Option<Tensor>,
    /// `[3, 3]`, when decorrelated.
    color: Option<Tensor>,
    size: i64,
}

impl ParamImage {
    /// Values per image of the parameter tensor.
    pub fn values_per_image(p: &ParamSettings, size: usize) -> usize {
        let c = p.channels as usize;
        match p.kind {
            ParamKind::Fft => c * size * (size / 2 + 1) * 2,
            ParamKind::Pixel => c * size * size,
        }
    }

    pub fn shape(p: &ParamSettings, batch: usize, size: usize) -> Vec<i64> {
        let (b, c, s) = (batch as i64, p.channels as i64, size as i64);
        match p.kind {
            ParamKind::Fft => vec![b, c, s, s / 2 + 1, 2],
            ParamKind::Pixel => vec![b, c, s, s],
        }
    }

    /// One image's initial values, N(0, sd), drawn from its stream (lucid: sd 0.01).
    pub fn draw(p: &ParamSettings, size: usize, sd: f64, rng: &mut SplitMix64) -> Vec<f32> {
        (0..Self::values_per_image(p, size)).map(|_| (rng.next_normal() * sd) as f32).collect()
    }

    pub fn new(param: Tensor, p: &ParamSettings, size: usize, device: Device) -> ParamImage {
        let s = size as i64;
        let scale = (p.kind == ParamKind::Fft)
            .then(|| Tensor::from_slice(&spectrum_scale_decay(size, size, p.decay)).reshape([s, s / 2 + 1]).to_device(device));
        let color = settings_color_matrix(p).map(|m| {
            let v: Vec<f32> = m.iter().flatten().copied().collect();
            Tensor::from_slice(&v).reshape([3, 3]).to_device(device)
        });
        ParamImage { param, kind: p.kind, channels: p.channels as i64, scale, color, size: s }
    }

    pub fn channels(&self) -> i64 {
        self.channels
    }

    /// The images before colour and sigmoid, `[B, C, size, size]`.
    fn spatial(&self) -> Tensor {
        match &self.scale {
            Some(scale) => {
                let spectrum = self.param.view_as_complex() * scale;
                spectrum.fft_irfftn(Some([self.size, self.size].as_slice()), Some([-2i64, -1].as_slice()), "ortho") / 4.0
            }
            None => self.param.shallow_clone(),
        }
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
    pub fn invert(&self, images: &Tensor) -> Tensor {
        let _guard = tch::no_grad_guard();
        let images = images.to_kind(Kind::Float);
        let x = images.clamp(1e-4, 1.0 - 1e-4).logit(None::<f64>);
        let x = match &self.color {
            // x = t @ C^T, so t = x @ (C^T)^-1.
            Some(color) => x.permute([0, 2, 3, 1]).matmul(&color.tr().pinverse(1e-6)).permute([0, 3, 1, 2]),
            None => x,
        };
        match (&self.scale, self.kind) {
            (Some(scale), ParamKind::Fft) => {
                let spectrum = (x * 4.0).fft_rfftn(Some([self.size, self.size].as_slice()), Some([-2i64, -1].as_slice()), "ortho") / scale;
                spectrum.view_as_real().contiguous()
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
}
