//! Connections between units of consecutive job layers: the libtorch half
//! (docs/atlas-format.md "Connections"). For an image, the connection from unit `i` of the
//! earlier layer to unit `j` of the later one is the attribution of `j`'s channel
//! objective (its spatial mean) to `i`: `i`'s activation times the gradient of that
//! objective with respect to it, summed over positions. On a linear path it is the weight
//! times `i`'s mean activation; through nonlinearities, branches and attention it is what
//! the gradient says. Map tasks add every image's values to a
//! [`loupe_stats::ConnectionPartial`]; the reduce averages them over the dataset.

use tch::{Device, Kind, Tensor};

use loupe_core::spec::Technique;

use crate::objective::{objective, unit_tensor};
use crate::{Error, Result};

/// The first `n` images' attributions from the `from_units` of activation `from` to the
/// `to_units` of activation `to` (a later layer computed from `from` in the same forward
/// pass, with gradients): row-major `[n][to][from]`. One backward pass per `to` unit, each
/// reaching back only as far as `from`. A later layer that does not depend on the earlier
/// one has all connections zero.
pub fn attributions(from: &Tensor, to: &Tensor, from_units: &[u32], to_units: &[u32], to_layer: &str, n: usize) -> Result<Vec<f64>> {
    let n = n as i64;
    let device = from.device();
    let from_index = unit_tensor(from_units, device);
    // In f32 (a sum over one image's positions, of a fixed shape: the same bits in any
    // batch); the sums over images are exact, on the host.
    let from_kept = from.detach().narrow(0, 0, n).index_select(1, &from_index).to_kind(Kind::Float);
    let to = to.narrow(0, 0, n);
    let mut rows = Vec::with_capacity(to_units.len());
    for &j in to_units {
        // Summed over images: each image's objective depends only on its own activations,
        // so the gradient at image b is that of b's objective alone.
        let goal = objective(&to, Technique::Channel, &unit_tensor(&vec![j; n as usize], device), to_layer)?.sum(Kind::Float);
        let grads = Tensor::f_run_backward(&[&goal], &[from], true, false).map_err(|e| Error::Model(format!("connections into layer {to_layer:?}: {e}")))?;
        let row = match grads.first() {
            Some(g) if g.defined() => {
                let g = g.narrow(0, 0, n).index_select(1, &from_index).to_kind(Kind::Float);
                (&from_kept * g).reshape([n, from_units.len() as i64, -1]).sum_dim_intlist(2, false, Kind::Float)
            }
            _ => Tensor::zeros([n, from_units.len() as i64], (Kind::Float, device)),
        };
        rows.push(row);
    }
    let all = Tensor::stack(&rows, 1).to_kind(Kind::Double).to_device(Device::Cpu).flatten(0, -1);
    Vec::<f64>::try_from(all).map_err(|e| Error::Torch(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 1x1 wiring by hand: b0 = a0 + a1, b1 = -a2, b2 = relu(a3 - 10) (never above
    /// zero here, so no gradient reaches a3).
    #[test]
    fn linear_paths_give_the_weight_times_the_mean_activation() {
        let a = Tensor::from_slice(&[1.0f32, 3.0, 2.0, 2.0, 4.0, 4.0, 1.0, 5.0, 0.5, 0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0]).reshape([1, 4, 2, 2]).set_requires_grad(true);
        let b = Tensor::stack(&[a.select(1, 0) + a.select(1, 1), -a.select(1, 2), (a.select(1, 3) - 10.0).relu()], 1);
        let got = attributions(&a, &b, &[0, 1, 2, 3], &[0, 1, 2], "b", 1).unwrap();
        // mean(a0) = 2, mean(a1) = 3.5, mean(a2) = 0.5.
        let want = [2.0, 3.5, 0.0, 0.0,
                    0.0, 0.0, -0.5, 0.0,
                    0.0, 0.0, 0.0, 0.0];
        assert_eq!(got, want);
    }

    /// TorchScript's optimising executor, from its second run on, puts a model's layers in
    /// one autograd node, through which no layer's gradient reaches an earlier layer's
    /// activation: every pass of a map must still give the gradient.
    #[test]
    fn every_forward_pass_of_a_scripted_model_gives_gradients_between_layers() {
        use crate::model::{Model, TorchScript};
        let model = TorchScript::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/demo/demo.pt"), Device::Cpu).unwrap();
        for pass in 0..4 {
            let x = Tensor::rand([2, 3, 32, 32], (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let acts = model.activations_between_layers(&x).unwrap();
            let layer = |name: &str| acts.iter().find(|(n, _)| n == name).map(|(_, t)| t).unwrap();
            let scores = attributions(layer("conv1"), layer("conv2"), &[0, 1, 2, 3], &[0, 1], "conv2", 2).unwrap();
            assert!(scores.iter().any(|&s| s != 0.0), "pass {pass}: no gradient reached conv1");
        }
    }

    #[test]
    fn each_image_gets_its_own_attribution() {
        let a = Tensor::from_slice(&[1.0f32, 2.0, 10.0, 20.0]).reshape([2, 2]).set_requires_grad(true);
        let b = (&a * 3.0).sum_dim_intlist(1, true, Kind::Float);
        // Images 0 and 1; the padding of a batch (here none) is left out by n.
        assert_eq!(attributions(&a, &b, &[0, 1], &[0], "b", 2).unwrap(), vec![3.0, 6.0, 30.0, 60.0]);
        assert_eq!(attributions(&a, &b, &[1], &[0], "b", 1).unwrap(), vec![6.0]);
    }
}
