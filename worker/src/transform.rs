//! The standard transforms of lucid and lucent, in order: pad 12 px (constant 0.5),
//! jitter 8 px, scale by one of 0.90..1.10, rotate by one of -10..10 degrees (0 drawn 6
//! times in 26), jitter 4 px; then bilinear resampling to the model's input size.
//!
//! loupe composes the five into one affine map per image and resamples once with
//! `grid_sample`, instead of resampling at each stage. Every image of the batch gets its
//! own draw (lucent draws one per step for the whole batch), and all draws for all steps
//! are made up front from each unit's seeded stream, so the loop never waits on the host.
//! Pixels from outside the padded image are 0.5 as well (lucent's rotation fills them
//! with 0). docs/techniques.md lists these differences.
//!
//! Optionally (docs/techniques.md "Crops and noise"), each step first crops a random
//! square box whose side follows a schedule, and adds noise to the model's input. Both
//! draw from the same streams, after the six numbers above, so that with neither the
//! draws are the ones loupe always made.

use tch::{Kind, Tensor};

use loupe_core::seed::SplitMix64;
use loupe_core::spec::{CropSchedule, TransformSettings};

/// One image's draw for one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    /// Offsets of the two jitter crops, in pixels: `0..jitter` and `0..jitter_after`
    /// (0..8 and 0..4 by default), for x and y.
    pub jitter1: (u64, u64),
    pub scale: f32,
    pub degrees: f32,
    pub jitter2: (u64, u64),
}

/// A draw below `n`, or 0 for a jitter of 0 (which still takes a number from the stream,
/// so the order of the draws never depends on the settings' values).
fn below(rng: &mut SplitMix64, n: u32) -> u64 {
    rng.below(u64::from(n.max(1)))
}

impl Draw {
    /// Six numbers from the stream, always in this order: jitter x and y, scale, angle,
    /// second jitter x and y.
    pub fn sample(rng: &mut SplitMix64, t: &TransformSettings) -> Draw {
        Draw {
            jitter1: (below(rng, t.jitter), below(rng, t.jitter)),
            scale: t.scales[rng.below(t.scales.len() as u64) as usize],
            degrees: t.angles[rng.below(t.angles.len() as u64) as usize],
            jitter2: (below(rng, t.jitter_after), below(rng, t.jitter_after)),
        }
    }

    /// The 2x3 matrix for `affine_grid` (align_corners = false) that maps output
    /// coordinates in [-1, 1] to coordinates in the unpadded `size` image.
    ///
    /// In pixels about each stage's centre: the second crop (side R - j2 of the scaled side
    /// R = (size + 2 pad - j1) * s) is centred at `j2 - jitter_after/2`; undoing the
    /// rotation and the scale and adding the first crop's centre `j1 - jitter/2` lands in
    /// the padded image, whose centre is the image's centre.
    pub fn theta(&self, size: u32, t: &TransformSettings) -> [f32; 6] {
        let size = size as f32;
        let (pad, jitter1, jitter2) = (t.pad as f32, t.jitter as f32, t.jitter_after as f32);
        let s = self.scale;
        let out_side = (size + 2.0 * pad - jitter1) * s - jitter2;
        let (sin, cos) = self.degrees.to_radians().sin_cos();
        // Inverse rotation.
        let rot = [[cos, sin], [-sin, cos]];
        let half = size / 2.0;
        let k = out_side / 2.0 / s / half;
        let c2 = [self.jitter2.0 as f32 - jitter2 / 2.0, self.jitter2.1 as f32 - jitter2 / 2.0];
        let c1 = [self.jitter1.0 as f32 - jitter1 / 2.0, self.jitter1.1 as f32 - jitter1 / 2.0];
        let tr = |i: usize| ((rot[i][0] * c2[0] + rot[i][1] * c2[1]) / s + c1[i]) / half;
        [k * rot[0][0], k * rot[0][1], tr(0), k * rot[1][0], k * rot[1][1], tr(1)]
    }
}

/// The map that only resizes: used to score the final image without transforms.
pub const IDENTITY: [f32; 6] = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0];

/// The crop box's side at `step` of `steps` (from 0), as a fraction of the image side:
/// `start` at the first step, `end` at the last, linear between.
pub fn crop_side(c: &CropSchedule, step: u32, steps: u32) -> f32 {
    if steps <= 1 {
        return c.start;
    }
    c.start + (c.end - c.start) * step as f32 / (steps - 1) as f32
}

/// `theta` with a crop box of side `side` (a fraction of the image side) whose centre is
/// placed by `u` (two uniform numbers in [0, 1)) anywhere the box fits in the image: the
/// transforms then act on the box as if it were the whole image.
pub fn cropped(theta: [f32; 6], side: f32, u: (f64, f64)) -> [f32; 6] {
    // In affine_grid's [-1, 1] coordinates the box is x -> side * x + centre.
    let room = 1.0 - side;
    let centre = [(2.0 * u.0 as f32 - 1.0) * room, (2.0 * u.1 as f32 - 1.0) * room];
    let [a, b, tx, c, d, ty] = theta;
    [side * a, side * b, side * tx + centre[0], side * c, side * d, side * ty + centre[1]]
}

/// Every step's draws for a batch, each image's from its own stream.
pub struct StepDraws {
    /// `[steps][batch][6]` flattened: the affine maps.
    pub thetas: Vec<f32>,
    /// `[steps][batch]` flattened, with noise: the seeds of [`noise`].
    pub noise_seeds: Vec<i64>,
}

/// All draws for a task. Per step and image, in this order: the six numbers of [`Draw`];
/// with a crop, its centre's two; with noise, its seed.
pub fn draws(steps: u32, size: u32, t: &TransformSettings, rngs: &mut [SplitMix64]) -> StepDraws {
    let mut thetas = Vec::with_capacity(steps as usize * rngs.len() * 6);
    let mut noise_seeds = Vec::new();
    for step in 0..steps {
        for rng in rngs.iter_mut() {
            let theta = Draw::sample(rng, t).theta(size, t);
            thetas.extend(match &t.crop {
                Some(c) => cropped(theta, crop_side(c, step, steps), (rng.next_f64(), rng.next_f64())),
                None => theta,
            });
            if t.noise > 0.0 {
                noise_seeds.push((rng.next_u64() & 0xffff_ffff) as i64);
            }
        }
    }
    StepDraws { thetas, noise_seeds }
}

/// A 32-bit integer hash (Thomas Mueller's), on values below 2^32 held in int64: each
/// product stays below 2^59, so int64 arithmetic is exact on every device.
fn hash32(x: &Tensor) -> Tensor {
    const M: i64 = 0x045d_9f3b;
    const MASK: i64 = 0xffff_ffff;
    let x = (x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16)) * M).bitwise_and(MASK);
    let x = (x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16)) * M).bitwise_and(MASK);
    x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(16))
}

/// Horama's noise for a batch of shape `shape` (`[B, ...]`): `sd` times a standard
/// normal plus `sd` times a uniform in [-1/2, 1/2), per value. Each value's numbers are
/// hashes of its image's seed (`seeds`, `[B]`, below 2^32) and its index within the
/// image, computed on the seeds' device, so an image's noise depends on neither its
/// batch nor the device's random generator.
pub fn noise(seeds: &Tensor, shape: &[i64], sd: f64) -> Tensor {
    let per_image: i64 = shape[1..].iter().product();
    let index = Tensor::arange(per_image, (Kind::Int64, seeds.device())).reshape([1, per_image]);
    let seeds = seeds.reshape([-1, 1]);
    // Three numbers per value: two for Box-Muller, one uniform.
    let uniform = |k: i64| -> Tensor {
        let h = hash32(&hash32(&((&index * 3 + k).bitwise_and(0xffff_ffff))).bitwise_xor_tensor(&seeds));
        // The top 24 bits, which a float holds exactly: in [0, 1 - 2^-24].
        h.bitwise_right_shift_tensor_scalar(8).to_kind(Kind::Float) / 16_777_216.0
    };
    // u1 in [2^-24, 1]: its logarithm is finite.
    let (u1, u2, u3) = (-uniform(0) + 1.0, uniform(1), uniform(2));
    let normal = (u1.log() * -2.0).sqrt() * (u2 * std::f64::consts::TAU).cos();
    ((normal + u3 - 0.5) * sd).reshape(shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn std() -> TransformSettings {
        TransformSettings::default()
    }

    #[test]
    fn a_centred_unscaled_unrotated_draw_shows_the_padded_image_less_the_crops() {
        let d = Draw { jitter1: (4, 4), scale: 1.0, degrees: 0.0, jitter2: (2, 2) };
        let t = d.theta(128, &std());
        // 128 + 24 - 8 - 4 = 140 px of the padded image span the output: 140/128 of the image.
        assert!((t[0] - 140.0 / 128.0).abs() < 1e-6 && t[1] == 0.0 && t[3] == 0.0 && (t[4] - t[0]).abs() < 1e-6);
        assert!(t[2].abs() < 1e-6 && t[5].abs() < 1e-6);
    }

    #[test]
    fn jitter_shifts_and_scale_zooms() {
        let a = Draw { jitter1: (7, 0), scale: 1.0, degrees: 0.0, jitter2: (2, 2) }.theta(128, &std());
        // Crop offset 7 is 3 px right of centre: 3 / 64 in normalised units; 0 is 4 px up.
        assert!((a[2] - 3.0 / 64.0).abs() < 1e-6 && (a[5] + 4.0 / 64.0).abs() < 1e-6);
        // As in lucent, the final resize to the input size undoes the scale except for the
        // 4 px second crop, which takes less of a larger image: (128 + 16 - 4 / s) px shown.
        for s in [0.9f32, 1.1] {
            let t = Draw { jitter1: (4, 4), scale: s, degrees: 0.0, jitter2: (2, 2) }.theta(128, &std());
            assert!((t[0] - (144.0 - 4.0 / s) / 128.0).abs() < 1e-6, "scale {s}: {}", t[0]);
        }
    }

    #[test]
    fn rotation_keeps_the_zoom() {
        let t = Draw { jitter1: (4, 4), scale: 1.0, degrees: 10.0, jitter2: (2, 2) }.theta(128, &std());
        let det = t[0] * t[4] - t[1] * t[3];
        assert!((det - (140.0f32 / 128.0).powi(2)).abs() < 1e-5);
        assert!(t[1] > 0.0 && t[3] < 0.0);
    }

    #[test]
    fn draws_cover_the_documented_values() {
        let mut rng = SplitMix64::new(1);
        let draws: Vec<Draw> = (0..5000).map(|_| Draw::sample(&mut rng, &std())).collect();
        assert!(draws.iter().all(|d| d.jitter1.0 < 8 && d.jitter2.1 < 4));
        let zeros = draws.iter().filter(|d| d.degrees == 0.0).count() as f64 / 5000.0;
        assert!((zeros - 6.0 / 26.0).abs() < 0.03, "{zeros}");
        for s in std().scales {
            assert!(draws.iter().any(|d| d.scale == s));
        }
    }

    /// The defaults are the constants loupe used before the settings existed: the same
    /// values in the same order, so the same draws.
    #[test]
    fn default_settings_are_the_standard_transforms() {
        let t = std();
        let scales = [0.90f32, 0.92, 0.94, 0.96, 0.98, 1.00, 1.02, 1.04, 1.06, 1.08, 1.10];
        assert_eq!(t.scales, scales.to_vec());
        let mut angles: Vec<f32> = (-10..=10).map(|a| a as f32).collect();
        angles.extend([0.0; 5]);
        assert_eq!(t.angles, angles);
        assert_eq!((t.pad, t.jitter, t.jitter_after), (12, 8, 4));
    }

    #[test]
    fn no_transform_is_the_identity_and_takes_six_draws() {
        let none = TransformSettings::none();
        let mut rng = SplitMix64::new(3);
        let d = Draw::sample(&mut rng, &none);
        assert_eq!(d, Draw { jitter1: (0, 0), scale: 1.0, degrees: 0.0, jitter2: (0, 0) });
        let mut other = SplitMix64::new(3);
        for _ in 0..6 {
            other.next_u64();
        }
        assert_eq!(rng.next_u64(), other.next_u64(), "six numbers per draw whatever the settings");
        let t = d.theta(32, &none);
        for (a, b) in t.iter().zip(IDENTITY) {
            assert!((a - b).abs() < 1e-6, "{t:?}");
        }
    }

    #[test]
    fn padding_and_jitter_follow_the_settings() {
        let t = TransformSettings { pad: 4, jitter: 2, scales: vec![1.0], angles: vec![0.0], jitter_after: 0, ..TransformSettings::none() };
        let d = Draw { jitter1: (1, 1), scale: 1.0, degrees: 0.0, jitter2: (0, 0) };
        let th = d.theta(32, &t);
        // 32 + 8 - 2 = 38 px of the padded image span the output.
        assert!((th[0] - 38.0 / 32.0).abs() < 1e-6 && th[2].abs() < 1e-6, "{th:?}");
    }

    /// Without a crop or noise the draws are the ones loupe always made: six numbers a
    /// step from each stream, no noise seed.
    #[test]
    fn draws_without_crop_or_noise_are_the_standard_ones() {
        let t = std();
        let mut rngs = [SplitMix64::new(1), SplitMix64::new(2)];
        let d = draws(3, 32, &t, &mut rngs);
        let (mut a, mut b) = (SplitMix64::new(1), SplitMix64::new(2));
        let mut want = Vec::new();
        for _ in 0..3 {
            want.extend(Draw::sample(&mut a, &t).theta(32, &t));
            want.extend(Draw::sample(&mut b, &t).theta(32, &t));
        }
        assert_eq!(d.thetas, want);
        assert!(d.noise_seeds.is_empty());
        assert_eq!(rngs[0].next_u64(), a.next_u64(), "the stream moved by six a step");
    }

    #[test]
    fn the_crop_side_follows_its_schedule_and_the_box_stays_inside() {
        let c = CropSchedule { start: 0.8, end: 0.2 };
        assert_eq!(crop_side(&c, 0, 7), 0.8);
        assert!((crop_side(&c, 3, 7) - 0.5).abs() < 1e-6);
        assert!((crop_side(&c, 6, 7) - 0.2).abs() < 1e-6);
        assert_eq!(crop_side(&c, 0, 1), 0.8);
        // The identity cropped to a centred half: x -> x / 2.
        assert_eq!(cropped(IDENTITY, 0.5, (0.5, 0.5)), [0.5, 0.0, 0.0, 0.0, 0.5, 0.0]);
        // At the extremes of its centre the box touches the image's edges.
        let left = cropped(IDENTITY, 0.25, (0.0, 0.0));
        assert!((left[2] + 0.75).abs() < 1e-6 && (left[5] + 0.75).abs() < 1e-6);
        let right = cropped(IDENTITY, 0.25, (1.0, 1.0));
        assert!((right[5] - 0.75).abs() < 1e-6);
        // A crop of a transformed image scales the transform's map too.
        let th = Draw { jitter1: (4, 4), scale: 1.0, degrees: 10.0, jitter2: (2, 2) }.theta(64, &std());
        let c = cropped(th, 0.5, (0.5, 0.5));
        for i in 0..6 {
            assert!((c[i] - 0.5 * th[i]).abs() < 1e-6);
        }
    }

    /// A crop takes two more numbers a step from each stream, noise one more; and the
    /// crop's maps shrink over the steps.
    #[test]
    fn crops_and_noise_draw_after_the_transforms() {
        let t = TransformSettings { crop: Some(CropSchedule { start: 1.0, end: 0.25 }), noise: 0.1, ..TransformSettings::none() };
        let mut rngs = [SplitMix64::new(4)];
        let d = draws(5, 32, &t, &mut rngs);
        assert_eq!((d.thetas.len(), d.noise_seeds.len()), (5 * 6, 5));
        assert!((d.thetas[0] - 1.0).abs() < 1e-6 && (d.thetas[24] - 0.25).abs() < 1e-6, "{:?}", d.thetas);
        let mut other = SplitMix64::new(4);
        for _ in 0..5 * 9 {
            other.next_u64();
        }
        assert_eq!(rngs[0].next_u64(), other.next_u64(), "nine numbers a step");
        assert!(d.noise_seeds.iter().all(|&s| (0..1 << 32).contains(&s)));
    }

    /// Noise is a function of the image's seed and the value's place: the same seed gives
    /// the same noise in any batch; and it has Horama's spread, a normal plus a uniform.
    #[test]
    fn noise_depends_only_on_the_seed() {
        let shape = [2i64, 3, 32, 32];
        let n = noise(&Tensor::from_slice(&[7i64, 123_456_789]), &shape, 0.5);
        assert_eq!(n.size(), shape.to_vec());
        let alone = noise(&Tensor::from_slice(&[123_456_789i64]), &[1, 3, 32, 32], 0.5);
        assert_eq!(n.get(1), alone.get(0));
        assert!((n.get(0) - n.get(1)).abs().max().double_value(&[]) > 0.5, "other seeds, other noise");
        let big = noise(&Tensor::from_slice(&[1i64, 2, 3, 4]), &[4, 3, 64, 64], 1.0);
        let (mean, sd) = (big.mean(Kind::Float).double_value(&[]), big.std(true).double_value(&[]));
        assert!(mean.abs() < 0.02, "{mean}");
        assert!((sd - (1.0f64 + 1.0 / 12.0).sqrt()).abs() < 0.02, "{sd}");
        assert!(big.isfinite().all().int64_value(&[]) == 1);
    }
}
