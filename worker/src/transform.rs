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

use loupe_core::seed::SplitMix64;
use loupe_core::spec::TransformSettings;

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

/// All draws for a task, `[steps][batch][6]` flattened, each image from its own stream.
pub fn thetas(steps: u32, size: u32, t: &TransformSettings, rngs: &mut [SplitMix64]) -> Vec<f32> {
    let mut out = Vec::with_capacity(steps as usize * rngs.len() * 6);
    for _ in 0..steps {
        for rng in rngs.iter_mut() {
            out.extend(Draw::sample(rng, t).theta(size, t));
        }
    }
    out
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
        let t = TransformSettings { pad: 4, jitter: 2, scales: vec![1.0], angles: vec![0.0], jitter_after: 0 };
        let d = Draw { jitter1: (1, 1), scale: 1.0, degrees: 0.0, jitter2: (0, 0) };
        let th = d.theta(32, &t);
        // 32 + 8 - 2 = 38 px of the padded image span the output.
        assert!((th[0] - 38.0 / 32.0).abs() < 1e-6 && th[2].abs() < 1e-6, "{th:?}");
    }
}
