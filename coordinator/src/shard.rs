//! Sharding: a job becomes tasks of (layer, batch of units, technique).

use std::collections::HashSet;

use loupe_core::spec::{JobSpec, Technique};
use loupe_core::task::TaskSpec;

/// Splits the job into tasks, leaving out the (layer, unit, technique) images in `done`.
/// Units keep their order, so a resumed job batches the remaining units the same way
/// every time. Job id and index are filled in by the state store.
pub fn shard(spec: &JobSpec, done: &HashSet<(String, u32, Technique)>) -> Vec<TaskSpec> {
    let mut tasks = Vec::new();
    for plan in &spec.layers {
        for &technique in &spec.techniques {
            let todo: Vec<u32> =
                plan.units.iter().copied().filter(|&u| !done.contains(&(plan.layer.name.clone(), u, technique))).collect();
            for chunk in todo.chunks(spec.batch as usize) {
                tasks.push(TaskSpec {
                    job_id: String::new(),
                    index: 0,
                    layer: plan.layer.name.clone(),
                    technique,
                    units: chunk.to_vec(),
                });
            }
        }
    }
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;
    use loupe_core::spec::{LayerInfo, LayerPlan, ModelRef, RenderSettings};

    #[test]
    fn tasks_cover_every_requested_image_once_except_those_done() {
        let spec = JobSpec {
            model: ModelRef { uri: "m".into(), name: "m".into(), sha256: "0".into() },
            layers: vec![
                LayerPlan { layer: LayerInfo { name: "a".into(), shape: vec![10, 4, 4] }, units: (0..10).collect() },
                LayerPlan { layer: LayerInfo { name: "b".into(), shape: vec![3] }, units: vec![0, 2] },
            ],
            techniques: vec![Technique::Channel, Technique::Negative],
            settings: RenderSettings { steps: 1, size: 8, input_size: 8, seed: 0, learning_rate: 0.05 },
            batch: 4,
            out: "o".into(),
        };
        let done: HashSet<_> = [("a".to_string(), 5, Technique::Channel)].into_iter().collect();
        let tasks = shard(&spec, &done);
        let mut images: Vec<_> = tasks.iter().flat_map(|t| t.units.iter().map(move |&u| (t.layer.clone(), u, t.technique))).collect();
        assert!(tasks.iter().all(|t| t.units.len() <= 4 && !t.units.is_empty()));
        assert_eq!(images.len(), 10 + 10 + 2 + 2 - 1);
        images.sort();
        images.dedup();
        assert_eq!(images.len(), 23, "no image twice");
        assert!(!images.contains(&("a".to_string(), 5, Technique::Channel)));
    }
}
