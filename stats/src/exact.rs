//! An exact sum of f64 values: a wide fixed-point integer that holds every finite f64
//! (and the sum of up to 2^76 of them) without rounding.
//!
//! Why not a plain f64 or Kahan sum: reduce tasks merge map partials in whatever order
//! they arrive and over whatever split of the images into shards; floating-point addition
//! is not associative, so only an exact accumulator gives bit-identical statistics for
//! every order and grouping. Rounding happens once, in [`ExactSum::value`].
//!
//! The integer counts units of 2^-1074 (the smallest subnormal), so bit `i` of the
//! accumulator is worth 2^(i - 1074). The largest finite f64 is below 2^1024, i.e. bit
//! 2097; 34 limbs of 64 bits (2176 bits) leave 77 bits of headroom under the two's
//! complement sign bit. Infinities and NaN cannot be held as integers and are kept as
//! flags with IEEE semantics (+inf plus -inf is NaN).

use serde::{Deserialize, Serialize};

const LIMBS: usize = 34;
const FRAC_MASK: u64 = (1 << 52) - 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Wire", into = "Wire")]
pub struct ExactSum {
    /// Two's complement, least significant limb first.
    limbs: [u64; LIMBS],
    pos_inf: bool,
    neg_inf: bool,
    nan: bool,
}

impl Default for ExactSum {
    fn default() -> Self {
        ExactSum {
            limbs: [0; LIMBS],
            pos_inf: false,
            neg_inf: false,
            nan: false,
        }
    }
}

impl ExactSum {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `x` exactly.
    pub fn add(&mut self, x: f64) {
        if x.is_nan() {
            self.nan = true;
            return;
        }
        if x.is_infinite() {
            if x > 0.0 {
                self.pos_inf = true;
            } else {
                self.neg_inf = true;
            }
            return;
        }
        let bits = x.to_bits();
        let exp = (bits >> 52) & 0x7ff;
        let frac = bits & FRAC_MASK;
        // |x| = mant * 2^(shift - 1074): subnormals have exponent field 0 and no hidden bit.
        let (mant, shift) = if exp == 0 {
            (frac, 0)
        } else {
            (frac | (1 << 52), exp as usize - 1)
        };
        if mant == 0 {
            return;
        }
        let (limb, offset) = (shift / 64, shift % 64);
        let wide = (mant as u128) << offset;
        let parts = [wide as u64, (wide >> 64) as u64];
        if bits >> 63 == 0 {
            self.add_at(limb, parts);
        } else {
            self.sub_at(limb, parts);
        }
    }

    fn add_at(&mut self, limb: usize, parts: [u64; 2]) {
        let mut carry = false;
        for (i, l) in self.limbs.iter_mut().enumerate().skip(limb) {
            let p = if i - limb < 2 { parts[i - limb] } else { 0 };
            if p == 0 && !carry && i - limb >= 2 {
                break;
            }
            let (s, c1) = l.overflowing_add(p);
            let (s, c2) = s.overflowing_add(carry as u64);
            *l = s;
            carry = c1 || c2;
        }
    }

    fn sub_at(&mut self, limb: usize, parts: [u64; 2]) {
        let mut borrow = false;
        for (i, l) in self.limbs.iter_mut().enumerate().skip(limb) {
            let p = if i - limb < 2 { parts[i - limb] } else { 0 };
            if p == 0 && !borrow && i - limb >= 2 {
                break;
            }
            let (s, b1) = l.overflowing_sub(p);
            let (s, b2) = s.overflowing_sub(borrow as u64);
            *l = s;
            borrow = b1 || b2;
        }
    }

    /// Adds another exact sum; the result does not depend on the order of merges.
    pub fn merge(&mut self, other: &ExactSum) {
        let mut carry = false;
        for (l, o) in self.limbs.iter_mut().zip(other.limbs.iter()) {
            let (s, c1) = l.overflowing_add(*o);
            let (s, c2) = s.overflowing_add(carry as u64);
            *l = s;
            carry = c1 || c2;
        }
        self.pos_inf |= other.pos_inf;
        self.neg_inf |= other.neg_inf;
        self.nan |= other.nan;
    }

    fn is_negative(&self) -> bool {
        self.limbs[LIMBS - 1] >> 63 == 1
    }

    /// The sum, correctly rounded to the nearest f64 (ties to even); ±inf when it is
    /// beyond the f64 range or an infinity was added; NaN if a NaN, or both infinities,
    /// were added.
    pub fn value(&self) -> f64 {
        if self.nan || (self.pos_inf && self.neg_inf) {
            return f64::NAN;
        }
        if self.pos_inf {
            return f64::INFINITY;
        }
        if self.neg_inf {
            return f64::NEG_INFINITY;
        }
        let negative = self.is_negative();
        let mut mag = self.limbs;
        if negative {
            // Two's complement negation: invert and add one.
            let mut carry = true;
            for l in mag.iter_mut() {
                let (s, c) = (!*l).overflowing_add(carry as u64);
                *l = s;
                carry = c;
            }
        }
        let sign = if negative { 1u64 << 63 } else { 0 };
        let Some(top) = (0..LIMBS).rev().find(|&i| mag[i] != 0) else {
            return 0.0;
        };
        // Index of the highest set bit.
        let h = top * 64 + 63 - mag[top].leading_zeros() as usize;
        if h <= 52 {
            // Below 2^53 units of 2^-1074 the value is a subnormal or the smallest normal
            // binade, whose bit pattern is the integer itself: exact.
            return f64::from_bits(sign | mag[0]);
        }
        // Keep the top 53 bits, round to nearest even using the next bit and a sticky bit.
        let low = h - 52;
        let mut m = bits_at(&mag, low, 53);
        let half = bit_at(&mag, low - 1);
        let sticky = any_below(&mag, low - 1);
        let mut e = low + 1; // the biased exponent field: value = m * 2^(e - 1 - 1074)
        if half && (sticky || m & 1 == 1) {
            m += 1;
            if m == 1 << 53 {
                m >>= 1;
                e += 1;
            }
        }
        if e >= 0x7ff {
            return f64::from_bits(sign | f64::INFINITY.to_bits());
        }
        f64::from_bits(sign | ((e as u64) << 52) | (m & FRAC_MASK))
    }
}

fn bit_at(limbs: &[u64; LIMBS], pos: usize) -> bool {
    limbs[pos / 64] >> (pos % 64) & 1 == 1
}

/// `n` (at most 64) bits starting at bit `pos`.
fn bits_at(limbs: &[u64; LIMBS], pos: usize, n: usize) -> u64 {
    let (i, off) = (pos / 64, pos % 64);
    let lo = limbs[i] as u128;
    let hi = limbs.get(i + 1).copied().unwrap_or(0) as u128;
    let wide = (lo | hi << 64) >> off;
    (wide as u64) & if n == 64 { u64::MAX } else { (1 << n) - 1 }
}

/// Whether any bit below `pos` is set.
fn any_below(limbs: &[u64; LIMBS], pos: usize) -> bool {
    let (i, off) = (pos / 64, pos % 64);
    limbs[..i].iter().any(|&l| l != 0) || (off > 0 && limbs[i] & ((1 << off) - 1) != 0)
}

/// The serialised form: only the limbs between the lowest non-zero one and the highest
/// one that is not sign extension, so a typical sum takes a few numbers, not 34.
#[derive(Serialize, Deserialize)]
struct Wire {
    #[serde(default, skip_serializing_if = "is_false")]
    negative: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    from: usize,
    limbs: Vec<u64>,
    #[serde(default, skip_serializing_if = "is_false")]
    pos_inf: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    neg_inf: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    nan: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl From<ExactSum> for Wire {
    fn from(s: ExactSum) -> Wire {
        let negative = s.is_negative();
        let ext = if negative { u64::MAX } else { 0 };
        let from = s.limbs.iter().position(|&l| l != 0).unwrap_or(LIMBS);
        let to = s
            .limbs
            .iter()
            .rposition(|&l| l != ext)
            .map_or(from, |i| i + 1)
            .max(from);
        Wire {
            negative,
            from,
            limbs: s.limbs[from..to].to_vec(),
            pos_inf: s.pos_inf,
            neg_inf: s.neg_inf,
            nan: s.nan,
        }
    }
}

impl TryFrom<Wire> for ExactSum {
    type Error = String;
    fn try_from(w: Wire) -> Result<ExactSum, String> {
        if w.from + w.limbs.len() > LIMBS {
            return Err(format!(
                "exact sum has {} limbs from {}; at most {LIMBS} fit",
                w.limbs.len(),
                w.from
            ));
        }
        let mut limbs = [if w.negative { u64::MAX } else { 0 }; LIMBS];
        limbs[..w.from].fill(0);
        limbs[w.from..w.from + w.limbs.len()].copy_from_slice(&w.limbs);
        let s = ExactSum {
            limbs,
            pos_inf: w.pos_inf,
            neg_inf: w.neg_inf,
            nan: w.nan,
        };
        if s.is_negative() != w.negative {
            return Err("exact sum's sign flag does not match its limbs".to_string());
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};

    fn sum_of(xs: &[f64]) -> ExactSum {
        let mut s = ExactSum::new();
        for &x in xs {
            s.add(x);
        }
        s
    }

    /// An independent reference: Python's `math.fsum` (Shewchuk's non-overlapping partials
    /// with a correctly rounded final sum), valid while no partial overflows.
    fn fsum(xs: &[f64]) -> f64 {
        let mut partials: Vec<f64> = Vec::new();
        for &x0 in xs {
            let mut x = x0;
            let mut i = 0;
            for j in 0..partials.len() {
                let mut y = partials[j];
                if x.abs() < y.abs() {
                    std::mem::swap(&mut x, &mut y);
                }
                let hi = x + y;
                let lo = y - (hi - x);
                if lo != 0.0 {
                    partials[i] = lo;
                    i += 1;
                }
                x = hi;
            }
            partials.truncate(i);
            partials.push(x);
        }
        let mut n = partials.len();
        if n == 0 {
            return 0.0;
        }
        n -= 1;
        let mut hi = partials[n];
        let mut lo = 0.0;
        while n > 0 {
            let x = hi;
            n -= 1;
            let y = partials[n];
            hi = x + y;
            let yr = hi - x;
            lo = y - yr;
            if lo != 0.0 {
                break;
            }
        }
        if n > 0 && ((lo < 0.0 && partials[n - 1] < 0.0) || (lo > 0.0 && partials[n - 1] > 0.0)) {
            let y = lo * 2.0;
            let x = hi + y;
            let yr = x - hi;
            if y == yr {
                hi = x;
            }
        }
        hi
    }

    /// Values of wildly mixed magnitudes and signs, with exact cancellations and subnormals.
    fn random_values(rng: &mut StdRng, n: usize) -> Vec<f64> {
        let mut xs = Vec::with_capacity(n);
        for _ in 0..n {
            let x = match rng.gen_range(0..6) {
                0 => rng.gen_range(-1.0..1.0),
                1 => rng.gen_range(-1.0..1.0) * 2f64.powi(rng.gen_range(-60..60)),
                2 => rng.gen_range(-1.0..1.0) * 2f64.powi(rng.gen_range(-1070..1000)),
                3 => {
                    f64::from_bits(rng.gen_range(0..1u64 << 52))
                        * if rng.gen() { 1.0 } else { -1.0 }
                }
                4 => (rng.gen_range(-1.0f32..1.0f32) as f64).powi(2) * 1e6,
                _ => xs.last().map_or(1.0, |&v: &f64| -v),
            };
            xs.push(x);
        }
        xs
    }

    #[test]
    fn simple_sums_are_exact() {
        assert_eq!(sum_of(&[]).value().to_bits(), 0.0f64.to_bits());
        assert_eq!(sum_of(&[0.1, 0.2]).value(), fsum(&[0.1, 0.2]));
        assert_eq!(sum_of(&[1e100, 1.0, -1e100]).value(), 1.0);
        assert_eq!(
            sum_of(&[1.0, 2f64.powi(-53)]).value(),
            1.0,
            "a tie rounds to even"
        );
        assert_eq!(
            sum_of(&[1.0, 2f64.powi(-53), 2f64.powi(-100)]).value(),
            1.0 + f64::EPSILON
        );
        assert_eq!(sum_of(&[-3.5, 1.25]).value(), -2.25);
        assert_eq!(sum_of(&[f64::MAX, f64::MAX]).value(), f64::INFINITY);
        assert_eq!(sum_of(&[f64::MAX, f64::MAX, -f64::MAX]).value(), f64::MAX);
        assert_eq!(sum_of(&[-f64::MAX, -f64::MAX]).value(), f64::NEG_INFINITY);
        let tiny = f64::from_bits(1);
        assert_eq!(sum_of(&[tiny, tiny, tiny]).value(), f64::from_bits(3));
        assert_eq!(
            sum_of(&[f64::MIN_POSITIVE, -tiny]).value(),
            f64::from_bits(f64::MIN_POSITIVE.to_bits() - 1)
        );
        assert_eq!(sum_of(&[f64::INFINITY, 1.0]).value(), f64::INFINITY);
        assert!(sum_of(&[f64::INFINITY, f64::NEG_INFINITY]).value().is_nan());
        assert!(sum_of(&[f64::NAN, 1.0]).value().is_nan());
    }

    #[test]
    fn matches_fsum_and_is_independent_of_order_and_grouping() {
        let mut rng = StdRng::seed_from_u64(7);
        for round in 0..300 {
            let n = rng.gen_range(0..200);
            let mut xs = random_values(&mut rng, n);
            let whole = sum_of(&xs);
            assert_eq!(
                whole.value().to_bits(),
                fsum(&xs).to_bits(),
                "round {round}: {xs:?}"
            );
            // Shuffle, split into random groups, sum each, merge the groups in random order.
            xs.shuffle(&mut rng);
            let mut groups: Vec<ExactSum> = Vec::new();
            let mut rest = &xs[..];
            while !rest.is_empty() {
                let take = rng.gen_range(1..=rest.len());
                groups.push(sum_of(&rest[..take]));
                rest = &rest[take..];
            }
            groups.shuffle(&mut rng);
            let mut merged = ExactSum::new();
            for g in &groups {
                merged.merge(g);
            }
            assert_eq!(
                merged, whole,
                "round {round}: the representation is canonical"
            );
            assert_eq!(merged.value().to_bits(), whole.value().to_bits());
        }
    }

    #[test]
    fn matches_an_integer_reference() {
        // Multiples of 2^-40 below 2^40 sum exactly in an i128; i128 -> f64 rounds correctly.
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..500 {
            let ints: Vec<i64> = (0..rng.gen_range(1..100))
                .map(|_| rng.gen_range(-(1i64 << 52)..(1i64 << 52)) << rng.gen_range(0..28))
                .collect();
            let xs: Vec<f64> = ints.iter().map(|&i| i as f64 * 2f64.powi(-40)).collect();
            let exact: i128 = ints.iter().map(|&i| i as i128).sum();
            assert_eq!(sum_of(&xs).value(), exact as f64 * 2f64.powi(-40));
        }
    }

    #[test]
    fn serialisation_round_trips() {
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..200 {
            let n = rng.gen_range(0..20);
            let xs = random_values(&mut rng, n);
            let s = sum_of(&xs);
            let json = serde_json::to_string(&s).unwrap();
            let back: ExactSum = serde_json::from_str(&json).unwrap();
            assert_eq!(back, s, "{json}");
        }
        let s = sum_of(&[1.5, f64::INFINITY]);
        assert_eq!(
            serde_json::from_str::<ExactSum>(&serde_json::to_string(&s).unwrap()).unwrap(),
            s
        );
        assert_eq!(
            serde_json::to_string(&sum_of(&[1.0])).unwrap(),
            r#"{"from":16,"limbs":[1125899906842624]}"#
        );
        assert!(serde_json::from_str::<ExactSum>(r#"{"from":33,"limbs":[1,2]}"#).is_err());
    }
}
