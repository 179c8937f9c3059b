//! The image parameterisation of lucid's `param.image(size)`: a Fourier spectrum scaled by
//! 1/frequency, decorrelated colour and a sigmoid (RECIPES.md; lucid
//! `optvis/param/spatial.py` and `color.py`, lucent `optvis/param/spatial.py`).

use tch::{Device, Tensor};

use loupe_core::seed::SplitMix64;

/// Lucid's colour correlation square root, from ImageNet.
pub const COLOR_CORRELATION_SVD_SQRT: [[f32; 3]; 3] = [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]];

/// Standard deviation of the initial spectrum (lucid/lucent `sd=0.01`).
pub const INIT_SD: f64 = 0.01;

/// The colour matrix divided by its largest column norm, as lucid does.
pub fn color_matrix() -> [[f32; 3]; 3] {
    let m = COLOR_CORRELATION_SVD_SQRT;
    let max_norm = (0..3).map(|c| (0..3).map(|r| m[r][c] * m[r][c]).sum::<f32>().sqrt()).fold(0.0, f32::max);
    m.map(|row| row.map(|v| v / max_norm))
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
    let fy = fftfreq(h);
    let fx: Vec<f32> = (0..w / 2 + 1).map(|i| i as f32 / w as f32).collect();
    let floor = 1.0 / h.max(w) as f32;
    fy.iter().flat_map(|y| fx.iter().map(move |x| 1.0 / (x * x + y * y).sqrt().max(floor))).collect()
}

/// A batch of FFT-parameterised images, one per unit.
pub struct FftImage {
    /// `[B, 3, h, w/2+1, 2]`: real and imaginary parts; the optimised tensor.
    pub spectrum: Tensor,
    scale: Tensor,
    color: Tensor,
    size: i64,
}

impl FftImage {
    /// The initial spectrum, N(0, 0.01), each unit's drawn from its own stream.
    pub fn initial_spectrum(size: usize, rngs: &mut [SplitMix64]) -> Vec<f32> {
        let per_unit = 3 * size * (size / 2 + 1) * 2;
        let mut values = Vec::with_capacity(per_unit * rngs.len());
        for rng in rngs {
            values.extend((0..per_unit).map(|_| (rng.next_normal() * INIT_SD) as f32));
        }
        values
    }

    pub fn new(spectrum: Tensor, size: usize, device: Device) -> FftImage {
        let s = size as i64;
        let scale = Tensor::from_slice(&spectrum_scale(size, size)).reshape([s, s / 2 + 1]).to_device(device);
        let color: Vec<f32> = color_matrix().iter().flatten().copied().collect();
        let color = Tensor::from_slice(&color).reshape([3, 3]).to_device(device);
        FftImage { spectrum, scale, color, size: s }
    }

    /// The images, `[B, 3, size, size]` in [0, 1].
    pub fn image(&self) -> Tensor {
        let spectrum = self.spectrum.view_as_complex() * &self.scale;
        let x = spectrum.fft_irfftn(Some([self.size, self.size].as_slice()), Some([-2i64, -1].as_slice()), "ortho") / 4.0;
        // rgb = Cn @ t for every pixel.
        let rgb = x.permute([0, 2, 3, 1]).matmul(&self.color.tr()).permute([0, 3, 1, 2]);
        rgb.sigmoid()
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
mod tests {
    use super::*;

    #[test]
    fn colour_matrix_is_lucids_normalised_by_its_largest_column_norm() {
        // RECIPES.md: the largest column L2 norm is about 0.462.
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
        let img = FftImage::new(zeros_like_spectrum(2, 8, Device::Cpu), 8, Device::Cpu);
        let x = img.image();
        assert_eq!(x.size(), vec![2, 3, 8, 8]);
        assert!((x - 0.5).abs().max().double_value(&[]) < 1e-7);
        // A DC coefficient c gives a flat image c * scale / sqrt(h*w) / 4 before colour.
        let spectrum = zeros_like_spectrum(1, 8, Device::Cpu);
        let _ = spectrum.narrow(1, 0, 1).narrow(2, 0, 1).narrow(3, 0, 1).narrow(4, 0, 1).fill_(1.0);
        let img = FftImage::new(spectrum, 8, Device::Cpu);
        let flat = img.spectrum.view_as_complex() * &img.scale;
        let flat = flat.fft_irfftn(Some([8i64, 8].as_slice()), Some([-2i64, -1].as_slice()), "ortho") / 4.0;
        let expected = 8.0 / 8.0 / 4.0; // scale(0,0) = 8, /sqrt(64), /4
        let v = flat.get(0).get(0);
        assert!((v.min().double_value(&[]) - expected).abs() < 1e-6 && (v.max().double_value(&[]) - expected).abs() < 1e-6);
    }
}
