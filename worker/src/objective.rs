//! Objectives: what each technique maximises for one unit per batch element
//! (RECIPES.md "Objectives"; lucent `optvis/objectives.py`).

use tch::{Device, Kind, Tensor};

use loupe_core::spec::Technique;

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
        _ => return Err(Error::Model(format!("layer {layer:?} has activation shape {shape:?}; expected [N, C, H, W] or [N, C]"))),
    };
    Ok(value.to_kind(Kind::Float))
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
}
