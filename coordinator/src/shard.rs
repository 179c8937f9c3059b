//! Sharding: a job becomes tasks. Render tasks of (layer, technique, batch of targets);
//! then, for a job with a dataset, one map per dataset shard and one reduce per job
//! layer, each reduce waiting on every map.

use std::collections::HashSet;

use loupe_core::atlas::{ImageId, Target};
use loupe_core::spec::JobSpec;
use loupe_core::task::{ShardSource, Work};

use crate::state::NewTask;

/// The images the atlas already holds whole for a job.
pub type Done = HashSet<ImageId>;

/// Splits the job into tasks, leaving out the images in `done`.
/// Units keep their order, so a resumed job batches the remaining units the same way
/// every time. Job id and index are filled in by the state store.
///
/// `dataset_shards` are the job's dataset shards, in order; they give one map each,
/// followed by one reduce per job layer that waits on all the maps. None (no dataset, or
/// statistics the atlas already holds) gives no map and no reduce.
///
/// A per-layer technique's items (deepdream starts, caricature inputs, directions) are
/// batched like units.
pub fn shard(spec: &JobSpec, done: &Done, dataset_shards: &[ShardSource]) -> Vec<NewTask> {
    let mut tasks = Vec::new();
    for plan in &spec.layers {
        let layer = &plan.layer.name;
        for &technique in spec.techniques_for(plan) {
            let is_done = |t: &Target| ImageId::new(layer, technique, t.clone()).is_ok_and(|id| done.contains(&id));
            let todo: Vec<Target> = spec.targets(plan, technique).into_iter().filter(|t| !is_done(t)).collect();
            for chunk in todo.chunks(spec.batch as usize) {
                tasks.push(NewTask::runnable(Work::Render { layer: layer.clone(), technique, targets: chunk.to_vec() }));
            }
        }
    }
    if dataset_shards.is_empty() {
        return tasks;
    }
    let first_map = tasks.len() as u32;
    for (shard, source) in dataset_shards.iter().enumerate() {
        tasks.push(NewTask::runnable(Work::Map { shard: shard as u32, source: source.clone() }));
    }
    let maps: Vec<u32> = (first_map..tasks.len() as u32).collect();
    for plan in &spec.layers {
        tasks.push(NewTask { work: Work::Reduce { layer: plan.layer.name.clone() }, after: maps.clone() });
    }
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;
    use loupe_core::spec::{DatasetSpec, LayerInfo, LayerPlan, ModelRef, RenderSettings, Technique};

    fn unit(layer: &str, u: u32, t: Technique) -> ImageId {
        ImageId::new(layer, t, Target::Unit(u)).unwrap()
    }

    fn spec() -> JobSpec {
        JobSpec {
            model: ModelRef { uri: "m".into(), name: "m".into(), sha256: "0".into() },
            layers: vec![
                LayerPlan { layer: LayerInfo { name: "a".into(), shape: vec![10, 4, 4] }, units: (0..10).collect(), techniques: None, steps: None },
                LayerPlan { layer: LayerInfo { name: "b".into(), shape: vec![3] }, units: vec![0, 2], techniques: None, steps: None },
            ],
            techniques: vec![Technique::Channel, Technique::Negative],
            settings: RenderSettings { steps: 1, size: 8, input_size: 8, seed: 0, learning_rate: 0.05, ..Default::default() },
            batch: 4,
            out: "o".into(),
            dataset: None,
        }
    }

    #[test]
    fn tasks_cover_every_requested_image_once_except_those_done() {
        let done: Done = [unit("a", 5, Technique::Channel)].into_iter().collect();
        let tasks = shard(&spec(), &done, &[]);
        assert!(tasks.iter().all(|t| t.after.is_empty()));
        let renders: Vec<(&String, Technique, Vec<u32>)> = tasks
            .iter()
            .map(|t| match &t.work {
                Work::Render { layer, technique, targets } => (layer, *technique, targets.iter().filter_map(Target::unit).collect()),
                other => panic!("a job without a dataset has only renders, got {other:?}"),
            })
            .collect();
        let mut images: Vec<_> = renders.iter().flat_map(|(l, t, units)| units.iter().map(move |&u| ((*l).clone(), u, *t))).collect();
        assert!(renders.iter().all(|(_, _, u)| u.len() <= 4 && !u.is_empty()));
        assert_eq!(images.len(), 10 + 10 + 2 + 2 - 1);
        images.sort();
        images.dedup();
        assert_eq!(images.len(), 23, "no image twice");
        assert!(!images.contains(&("a".to_string(), 5, Technique::Channel)));
    }

    #[test]
    fn a_dataset_adds_a_map_per_shard_then_a_reduce_per_layer_after_every_map() {
        let spec = JobSpec { dataset: Some(DatasetSpec { uri: "d".into(), examples: 8, images_per_shard: 2 }), ..spec() };
        let shards = vec![
            ShardSource::Images { keys: vec!["0.jpg".into(), "1.jpg".into()] },
            ShardSource::Images { keys: vec!["2.jpg".into()] },
            ShardSource::Tar { key: "t.tar".into() },
        ];
        let renders = shard(&spec, &Done::default(), &[]).len();
        let tasks = shard(&spec, &Done::default(), &shards);
        assert_eq!(tasks.len(), renders + 3 + 2);
        assert!(tasks[..renders].iter().all(|t| matches!(t.work, Work::Render { .. }) && t.after.is_empty()));
        for (i, source) in shards.iter().enumerate() {
            assert_eq!(tasks[renders + i], NewTask::runnable(Work::Map { shard: i as u32, source: source.clone() }));
        }
        let maps: Vec<u32> = (renders as u32..renders as u32 + 3).collect();
        assert_eq!(tasks[renders + 3], NewTask { work: Work::Reduce { layer: "a".into() }, after: maps.clone() });
        assert_eq!(tasks[renders + 4], NewTask { work: Work::Reduce { layer: "b".into() }, after: maps });
        // Everything rendered already: the dataset tasks remain.
        let mut all_done = Done::default();
        for p in &spec.layers {
            for &u in &p.units {
                for &t in &spec.techniques {
                    all_done.insert(unit(&p.layer.name, u, t));
                }
            }
        }
        let tasks = shard(&spec, &all_done, &shards);
        assert_eq!(tasks.len(), 5);
        assert_eq!(tasks[3].after, vec![0, 1, 2]);
    }

    #[test]
    fn layer_techniques_render_items_and_a_layer_may_have_its_own_techniques() {
        use loupe_core::spec::{Direction, NamedImage};
        let mut spec = spec();
        spec.techniques = vec![Technique::Channel, Technique::DeepDream];
        spec.settings.options.caricature_inputs =
            vec![NamedImage { name: "dog".into(), uri: "dog.png".into() }, NamedImage { name: "cat".into(), uri: "cat.png".into() }];
        spec.settings.options.directions = vec![Direction { name: "up".into(), layer: "b".into(), vector: vec![1.0, 0.0, 0.0] }];
        spec.layers[1].techniques = Some(vec![Technique::Caricature, Technique::Direction]);
        spec.validate().unwrap();
        let done: Done = [ImageId::new("b", Technique::Caricature, Target::Item("cat".into())).unwrap()].into_iter().collect();
        let tasks = shard(&spec, &done, &[]);
        let items: Vec<(String, Technique, Vec<String>)> = tasks
            .iter()
            .filter_map(|t| match &t.work {
                Work::Render { layer, technique, targets } if !technique.per_unit() => {
                    Some((layer.clone(), *technique, targets.iter().filter_map(|t| t.item().map(str::to_string)).collect()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            items,
            vec![
                ("a".into(), Technique::DeepDream, vec!["noise".to_string()]),
                ("b".into(), Technique::Caricature, vec!["dog".to_string()]),
                ("b".into(), Technique::Direction, vec!["up".to_string()]),
            ]
        );
        // Layer b renders no channel images: it has its own techniques.
        assert!(tasks.iter().all(|t| !matches!(&t.work, Work::Render { layer, technique, .. } if layer == "b" && technique.per_unit())));
        assert_eq!(spec.total_images(), 10 + 1 + 2 + 1);
    }
}
