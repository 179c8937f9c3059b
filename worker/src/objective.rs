//! Objectives: what each technique maximises for one unit per batch element
//! (docs/techniques.md "The peers' recipe"; lucent `optvis/objectives.py`).

use tch::{Device, Kind, Tensor};

use loupe_core::spec::{DiversityPenalty, Technique};

use crate::{Error, Result};

/// The value each batch element maximises, `[B]`: element b's unit is `units[b]`.
/// - channel: the mean over space of the unit's channel;
/// - neuron: the unit's channel at the centre position `(H/2, W/2)`;
/// - negative: minus the channel objective.
///
/// For a `[B, C]` layer (logits) all three read the unit's value, negative with its sign
/// flipped.
pub fn objective(activation: &Tensor, technique: Technique, units: &Tensor, layer: &str) -> Result<Tensor> {
    let shape = activation.size();
    let batch = shape[0];
    let rows = Tensor::arange(batch, (Kind::Int64, activation.device()));
    // [B, H, W] or [B]: each element's own unit.
    let own = activation
        .f_index(&[Some(rows), Some(units.shallow_clone())])
        .map_err(|e| Error::Model(format!("layer {layer:?}: selecting units: {e}")))?;
    let value = match (shape.len(), technique) {
        (2, Technique::Channel | Technique::Neuron) => own,
        (2, Technique::Negative) => -own,
        (4, Technique::Channel) => own.mean_dim([1i64, 2].as_slice(), false, Kind::Float),
        (4, Technique::Negative) => -own.mean_dim([1i64, 2].as_slice(), false, Kind::Float),
        (4, Technique::Neuron) => own.select(1, shape[2] / 2).select(1, shape[3] / 2),
        (2 | 4, t) if !t.per_unit() || t == Technique::Diversity => {
            return Err(Error::Model(format!("{t} is not a single unit's objective")));
        }
        _ => return Err(Error::Model(format!("layer {layer:?} has activation shape {shape:?}; expected [N, C, H, W] or [N, C]"))),
    };
    Ok(value.to_kind(Kind::Float))
}

/// Each group's similarity for lucid's `diversity(layer)`: the batch holds `groups`
/// groups of `n` consecutive images (one unit's diversity images each). Per image, the
/// activation `[C, H, W]` is flattened to `A = [C, H*W]` and its Gram matrix `A Aᵀ`
/// divided by its L2 norm; a group's similarity is the sum over ordered pairs i != j of
/// the dot products of those normalised Grams (their cosine similarity), over n. For a
/// `[B, C]` layer the activation vectors themselves are compared. Returns `[groups]`.
///
/// lucid's objective (maximised) is `channel - 1e2 * diversity` with this value, so the
/// penalty grows as the images look alike (lucent returns its negative and minimises).
pub fn diversity_similarity(activation: &Tensor, n: i64) -> Tensor {
    let a = activation.to_kind(Kind::Float);
    let b = a.size()[0];
    let features = if a.dim() == 2 {
        a
    } else {
        let c = a.size()[1];
        let flat = a.reshape([b, c, -1]);
        flat.matmul(&flat.transpose(1, 2)).reshape([b, -1])
    };
    let norm = features.norm_scalaropt_dim(2, [1i64].as_slice(), true).clamp_min(1e-10);
    let unit = (&features / norm).reshape([b / n, n, -1]);
    // [groups, n, n] of cosines; the diagonal (each image with itself) is left out.
    let cos = unit.matmul(&unit.transpose(1, 2));
    let all = cos.sum_dim_intlist([1i64, 2].as_slice(), false, Kind::Float);
    let diagonal = cos.diagonal(0, 1, 2).sum_dim_intlist([1i64].as_slice(), false, Kind::Float);
    (all - diagonal) / n as f64
}

/// Each group's diversity penalty before its weight, `[groups]`: lucid's
/// [`diversity_similarity`], times under [`DiversityPenalty::Relative`] the group's mean
/// |objective| (`values`, `[B]`), held constant for the gradient so that it only scales
/// the similarity's.
pub fn diversity_penalty(activation: &Tensor, values: &Tensor, n: i64, penalty: DiversityPenalty) -> Tensor {
    let similarity = diversity_similarity(activation, n);
    match penalty {
        DiversityPenalty::Lucid => similarity,
        DiversityPenalty::Relative => {
            let scale = values.detach().to_kind(Kind::Float).abs().reshape([-1, n]).mean_dim([1i64].as_slice(), false, Kind::Float);
            similarity * scale
        }
    }
}

/// lucid's deepdream: the mean of the squared activation of the whole layer, `[B]`.
pub fn deepdream(activation: &Tensor) -> Tensor {
    let a = activation.to_kind(Kind::Float);
    let b = a.size()[0];
    a.reshape([b, -1]).square().mean_dim([1i64].as_slice(), false, Kind::Float)
}

/// lucid's `_dot_cossim` over the last dimension of `x` and `y`: `dot(x, y) *
/// max(0.1, cos(x, y))^pow`, with eps 1e-4 on the magnitudes; pow 0 is the plain dot.
fn dot_cossim(x: &Tensor, y: &Tensor, pow: f64) -> Tensor {
    let dot = (x * y).sum_dim_intlist([-1i64].as_slice(), false, Kind::Float);
    if pow == 0.0 {
        return dot;
    }
    let mag = |t: &Tensor| t.square().sum_dim_intlist([-1i64].as_slice(), false, Kind::Float).sqrt() + 1e-4;
    let cos = &dot / mag(x) / mag(y);
    dot * cos.clamp_min(0.1).pow_tensor_scalar(pow)
}

/// Caricature (lucid `recipes/caricature.py`, Microscope): each image's whole flattened
/// activation against its target's (`targets[b]`, the input image's activation, same
/// shape): `dot * max(0.1, cossim)^pow`. `[B]`.
pub fn caricature(activation: &Tensor, targets: &Tensor, pow: f64) -> Tensor {
    let b = activation.size()[0];
    let x = activation.to_kind(Kind::Float).reshape([b, -1]);
    let y = targets.to_kind(Kind::Float).reshape([b, -1]);
    dot_cossim(&x, &y, pow)
}

/// Direction (lucid `objectives.direction` with `cossim_pow`): at every position the dot
/// product of the activation vector (over channels) with `vectors[b]` (`[B, C]`), times
/// `max(0.1, cossim)^pow` when pow > 0, then the mean over positions. `[B]`.
pub fn direction(activation: &Tensor, vectors: &Tensor, pow: f64) -> Tensor {
    let a = activation.to_kind(Kind::Float);
    let shape = a.size();
    let (b, c) = (shape[0], shape[1]);
    // [B, positions, C].
    let x = if a.dim() == 2 { a.reshape([b, 1, c]) } else { a.reshape([b, c, -1]).transpose(1, 2) };
    let v = vectors.to_kind(Kind::Float).reshape([b, 1, c]);
    dot_cossim(&x, &v, pow).mean_dim([1i64].as_slice(), false, Kind::Float)
}

/// The unit indices as a tensor on the device.
pub fn unit_tensor(units: &[u32], device: Device) -> Tensor {
    let v: Vec<i64> = units.iter().map(|&u| u as i64).collect();
    Tensor::from_slice(&v).to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn act() -> Tensor {
        // [2, 3, 3, 3]: channel c of element b holds b*100 + c*10 + position (0..9).
        let v: Vec<f32> = (0..2).flat_map(|b| (0..3).flat_map(move |c| (0..9).map(move |p| (b * 100 + c * 10 + p) as f32))).collect();
        Tensor::from_slice(&v).reshape([2, 3, 3, 3])
    }

    #[test]
    fn channel_neuron_and_negative_on_a_feature_map() {
        let units = unit_tensor(&[2, 0], Device::Cpu);
        let ch = objective(&act(), Technique::Channel, &units, "l").unwrap();
        assert_eq!(Vec::<f32>::try_from(&ch).unwrap(), vec![24.0, 104.0]);
        let neg = objective(&act(), Technique::Negative, &units, "l").unwrap();
        assert_eq!(Vec::<f32>::try_from(&neg).unwrap(), vec![-24.0, -104.0]);
        let neuron = objective(&act(), Technique::Neuron, &units, "l").unwrap();
        assert_eq!(Vec::<f32>::try_from(&neuron).unwrap(), vec![24.0, 104.0], "centre of 3x3 is position 4");
    }

    #[test]
    fn logits_are_units_with_no_space() {
        let logits = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).reshape([2, 3]);
        let units = unit_tensor(&[1, 2], Device::Cpu);
        for (t, want) in [(Technique::Channel, vec![2.0, 6.0]), (Technique::Neuron, vec![2.0, 6.0]), (Technique::Negative, vec![-2.0, -6.0])] {
            let v = objective(&logits, t, &units, "logits").unwrap();
            assert_eq!(Vec::<f32>::try_from(&v).unwrap(), want, "{t}");
        }
    }

    #[test]
    fn gradients_reach_only_each_elements_own_unit() {
        let a = act().set_requires_grad(true);
        let units = unit_tensor(&[1, 2], Device::Cpu);
        objective(&a, Technique::Channel, &units, "l").unwrap().sum(Kind::Float).backward();
        let g = a.grad();
        assert!((g.get(0).get(1).sum(Kind::Float).double_value(&[]) - 1.0).abs() < 1e-6);
        assert_eq!(g.get(0).get(0).abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert!((g.get(1).get(2).sum(Kind::Float).double_value(&[]) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn diversity_is_the_mean_pairwise_gram_cosine_per_group() {
        // Two groups of two: group 0 holds identical images (cosine 1), group 1 images
        // whose channels do not overlap (cosine 0).
        let mut v = vec![0f32; 4 * 2 * 4];
        let mut set = |b: usize, c: usize, p: usize, x: f32| v[(b * 2 + c) * 4 + p] = x;
        for b in 0..2 {
            set(b, 0, 0, 1.0);
            set(b, 1, 1, 2.0);
        }
        set(2, 0, 0, 1.0);
        set(3, 1, 3, 1.0);
        let a = Tensor::from_slice(&v).reshape([4, 2, 2, 2]);
        let s = Vec::<f32>::try_from(diversity_similarity(&a, 2)).unwrap();
        // lucid: sum over i != j (2 ordered pairs) / n = 2 * 1 / 2 = 1.
        assert!((s[0] - 1.0).abs() < 1e-6 && s[1].abs() < 1e-6, "{s:?}");
        // Vectors: cos([1, 0], [1, 1]) = 0.707.
        let l = Tensor::from_slice(&[1.0f32, 0.0, 1.0, 1.0]).reshape([2, 2]);
        let s = diversity_similarity(&l, 2).double_value(&[0]);
        assert!((s - 2f64.sqrt() / 2.0).abs() < 1e-6, "{s}");
        // A dead layer (all zeros) gives 0, not NaN.
        assert_eq!(diversity_similarity(&Tensor::zeros([2, 2, 2, 2], (Kind::Float, Device::Cpu)), 2).double_value(&[0]), 0.0);
    }

    /// The relative penalty is lucid's similarity times the group's mean |objective|, and
    /// that scale passes no gradient: scaling the layer's activations by k scales the
    /// relative penalty by k (as it does the objective) and leaves lucid's unchanged.
    #[test]
    fn the_relative_penalty_scales_with_the_objective_and_only_the_similarity_has_a_gradient() {
        tch::manual_seed(3);
        let a = Tensor::rand([4, 3, 2, 2], (Kind::Float, Device::Cpu));
        let units = unit_tensor(&[1, 1, 2, 2], Device::Cpu);
        let penalties = |a: &Tensor, p| {
            let values = objective(a, Technique::Channel, &units, "l").unwrap();
            Vec::<f32>::try_from(diversity_penalty(a, &values, 2, p)).unwrap()
        };
        let (lucid, relative) = (penalties(&a, DiversityPenalty::Lucid), penalties(&a, DiversityPenalty::Relative));
        let similarity = Vec::<f32>::try_from(diversity_similarity(&a, 2)).unwrap();
        assert_eq!(lucid, similarity);
        let values = Vec::<f32>::try_from(objective(&a, Technique::Channel, &units, "l").unwrap()).unwrap();
        for g in 0..2 {
            let scale = (values[2 * g].abs() + values[2 * g + 1].abs()) / 2.0;
            assert!((relative[g] - similarity[g] * scale).abs() < 1e-5, "group {g}: {relative:?}");
        }
        let scaled = &a * 10.0;
        let (lucid10, relative10) = (penalties(&scaled, DiversityPenalty::Lucid), penalties(&scaled, DiversityPenalty::Relative));
        for g in 0..2 {
            assert!((lucid10[g] - lucid[g]).abs() < 1e-5 && (relative10[g] - 10.0 * relative[g]).abs() < 1e-4 * relative10[g].abs().max(1.0));
        }
        // The gradient is the similarity's times the scale, the scale held constant.
        let x = a.copy().set_requires_grad(true);
        let values = objective(&x, Technique::Channel, &units, "l").unwrap();
        diversity_penalty(&x, &values, 2, DiversityPenalty::Relative).sum(Kind::Float).backward();
        let y = a.copy().set_requires_grad(true);
        let scales = Tensor::from_slice(&[(values.double_value(&[0]).abs() + values.double_value(&[1]).abs()) / 2.0, (values.double_value(&[2]).abs() + values.double_value(&[3]).abs()) / 2.0]).to_kind(Kind::Float);
        (diversity_similarity(&y, 2) * scales).sum(Kind::Float).backward();
        assert!((x.grad() - y.grad()).abs().max().double_value(&[]) < 1e-6);
    }

    #[test]
    fn deepdream_direction_and_caricature_values() {
        let a = act(); // [2, 3, 3, 3]
        let dd = Vec::<f32>::try_from(deepdream(&a)).unwrap();
        let want0: f32 = (0..3).flat_map(|c| (0..9).map(move |p| ((c * 10 + p) as f32).powi(2))).sum::<f32>() / 27.0;
        assert!((dd[0] - want0).abs() < 1e-3, "{dd:?}");
        // A basis direction is the channel objective.
        let v = Tensor::from_slice(&[0.0f32, 1.0, 0.0, 0.0, 0.0, 1.0]).reshape([2, 3]);
        let d = Vec::<f32>::try_from(direction(&a, &v, 0.0)).unwrap();
        let ch = Vec::<f32>::try_from(objective(&a, Technique::Channel, &unit_tensor(&[1, 2], Device::Cpu), "l").unwrap()).unwrap();
        assert_eq!(d, ch);
        // With a cosine power, a direction along the activation keeps its dot product
        // (cosine ~1) and one across it is floored at 0.1.
        let x = Tensor::from_slice(&[3.0f32, 4.0]).reshape([1, 2]);
        let along = direction(&x, &Tensor::from_slice(&[3.0f32, 4.0]).reshape([1, 2]), 1.0).double_value(&[0]);
        assert!((along - 25.0).abs() < 1e-2, "{along}");
        let across = direction(&x, &Tensor::from_slice(&[-4.0f32, 3.0]).reshape([1, 2]), 1.0).double_value(&[0]);
        assert!(across.abs() < 1e-6);
        // Caricature: the same activation as the target gives |a|^2 (cosine 1).
        let c = caricature(&a, &a, 1.0).double_value(&[1]);
        let sq = a.get(1).square().sum(Kind::Float).double_value(&[]);
        assert!((c - sq).abs() / sq < 1e-4, "{c} vs {sq}");
        let plain = caricature(&a, &a.ones_like(), 0.0).double_value(&[0]);
        assert!((plain - a.get(0).sum(Kind::Float).double_value(&[])).abs() < 1e-3);
    }
}
