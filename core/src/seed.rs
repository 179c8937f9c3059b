//! Reproducible randomness. Every random draw of a render (the initial spectrum and the
//! per-step transforms) comes from a stream seeded by the job seed and the unit's identity
//! (layer, unit, technique). Which worker runs a unit, and which units share its batch,
//! does not change the draws. The generator is SplitMix64 written out here, so the
//! streams cannot change under a dependency update.

use crate::spec::Technique;

/// The seed of one unit's stream.
pub fn unit_seed(job_seed: u64, layer: &str, unit: u32, technique: Technique) -> u64 {
    // FNV-1a over the identity, then mixed with the job seed through SplitMix64.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(layer.as_bytes());
    eat(&[0xff]);
    eat(&unit.to_le_bytes());
    eat(technique.as_str().as_bytes());
    SplitMix64::new(job_seed ^ h).next_u64()
}

/// SplitMix64 (Steele, Lea and Flood 2014): tiny, fast and well distributed.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in 0..n (n > 0). The modulo bias is below 2^-40 for the small n used.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Standard normal by the Box-Muller transform.
    pub fn next_normal(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]: ln is finite
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_seeds_differ_by_every_part_of_the_identity() {
        let base = unit_seed(0, "conv1", 3, Technique::Channel);
        assert_eq!(base, unit_seed(0, "conv1", 3, Technique::Channel));
        assert_ne!(base, unit_seed(1, "conv1", 3, Technique::Channel));
        assert_ne!(base, unit_seed(0, "conv2", 3, Technique::Channel));
        assert_ne!(base, unit_seed(0, "conv1", 4, Technique::Channel));
        assert_ne!(base, unit_seed(0, "conv1", 3, Technique::Neuron));
    }

    #[test]
    fn normals_have_unit_variance() {
        let mut r = SplitMix64::new(7);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| r.next_normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.01, "mean {mean} var {var}");
    }
}
