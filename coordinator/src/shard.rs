//! Sharding: a job becomes tasks. Render tasks of (layer, technique, batch of targets);
//! then, for a job with a dataset, one map per dataset shard and one reduce per job
//! layer, each reduce waiting on every map. [`Limits`] bounds what one job may ask for.

use std::collections::HashSet;

use loupe_core::atlas::{ImageId, Target};
use loupe_core::spec::{JobSpec, LayerPlan, ParamKind, RenderSettings, Technique};
use loupe_core::task::{ShardSource, Work};
use loupe_core::{Error, Result};

use crate::state::NewTask;

/// The images the atlas already holds whole for a job.
pub type Done = HashSet<ImageId>;

const GIB: u64 = 1 << 30;

/// What one job may ask of the cluster, checked at submit before anything proportional to
/// the job is built ([`Limits::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Units per job, summed over its layers, with the items of per-layer techniques.
    pub max_units: u64,
    /// Tasks per job: renders, maps and reduces.
    pub max_tasks: u64,
    /// Bytes one render task may use on a worker, by [`image_bytes`]'s estimate.
    pub worker_memory: u64,
}

/// Sized for the chart's limits (helm/loupe/values.yaml): a coordinator of 1Gi and
/// workers of 16Gi. A job at both caps (1,000,000 units, four per-unit techniques in
/// 100,000 tasks) grows the memory state store by about 240 MiB
/// (`a_job_at_the_caps_fits_the_coordinator`), leaving room for the submit's own lists
/// and a second job. The worker budget is its 16Gi less 2Gi of /dev/shm and 2Gi for
/// libtorch, the model and the process.
impl Default for Limits {
    fn default() -> Self {
        Limits { max_units: 1_000_000, max_tasks: 100_000, worker_memory: 12 * GIB }
    }
}

impl Limits {
    /// Refuses a job over the caps, counting without listing units: its units, its tasks
    /// (renders at [`batch_for`]'s batches, plus `maps` dataset shards and a reduce per
    /// layer when it has any), and a unit too big for a worker.
    pub fn check(&self, spec: &JobSpec, maps: usize) -> Result<()> {
        let units: u64 = spec.layers.iter().map(|p| p.units.len()).sum();
        if units > self.max_units {
            return Err(Error::invalid("units", format!("the job has {units} units; this cluster takes at most {} units per job (--max-units-per-job)", self.max_units)));
        }
        // The items of per-layer techniques (start images, inputs, directions, per layer)
        // are listed in tasks as units are, so they count against the same cap.
        let items: u64 = spec.layers.iter().flat_map(|p| spec.techniques_for(p).iter().filter(|t| !t.per_unit()).map(move |&t| spec.target_count(p, t))).sum();
        if units + items > self.max_units {
            return Err(Error::invalid(
                "units",
                format!("the job has {units} units and {items} items of per-layer techniques; this cluster takes at most {} per job (--max-units-per-job)", self.max_units),
            ));
        }
        let mut tasks = 0u64;
        for plan in &spec.layers {
            for &technique in spec.techniques_for(plan) {
                tasks += spec.target_count(plan, technique).div_ceil(u64::from(self.batch_for(spec, plan, technique)?));
            }
        }
        if maps > 0 {
            tasks += maps as u64 + spec.layers.len() as u64;
        }
        if tasks > self.max_tasks {
            return Err(Error::invalid("tasks", format!("the job needs {tasks} tasks; this cluster takes at most {} tasks per job (--max-tasks-per-job): raise --batch or select fewer units", self.max_tasks)));
        }
        Ok(())
    }

    /// Targets per render task of a technique in a layer: the job's batch, or the largest
    /// that fits [`Limits::worker_memory`]. The batch only groups units into optimisations
    /// (it decides no image), so a smaller one renders the same atlas. Refused only when
    /// one target alone does not fit.
    pub fn batch_for(&self, spec: &JobSpec, plan: &LayerPlan, technique: Technique) -> Result<u32> {
        let settings = spec.settings_for(plan);
        let per_target = image_bytes(&settings) * images_per_target(&settings, technique);
        let fits = self.worker_memory / per_target;
        if fits == 0 {
            let images = images_per_target(&settings, technique);
            return Err(Error::invalid(
                "size",
                format!(
                    "one {technique} target of layer {:?} ({images} image(s) of {} px, input {} px) needs about {} MiB, more than the worker memory budget of {} MiB (--worker-memory), even at batch 1 (the job asked for --batch {})",
                    plan.layer.name, settings.size, settings.input_size, per_target >> 20, self.worker_memory >> 20, spec.batch
                ),
            ));
        }
        Ok(spec.batch.min(u32::try_from(fits).unwrap_or(u32::MAX)))
    }
}

/// Parses a memory size: bytes, or a number with `Ki`, `Mi`, `Gi` or `Ti` (as Kubernetes
/// writes limits, e.g. `12Gi`).
pub fn parse_memory(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (number, shift) = [("Ki", 10), ("Mi", 20), ("Gi", 30), ("Ti", 40)]
        .into_iter()
        .find_map(|(suffix, shift)| s.strip_suffix(suffix).map(|n| (n, shift)))
        .unwrap_or((s, 0));
    match number.parse::<u64>().ok().and_then(|n| n.checked_mul(1 << shift)) {
        Some(bytes) if bytes > 0 => Ok(bytes),
        _ => Err(format!("{s:?} is not a memory size: give bytes or a positive number with Ki, Mi, Gi or Ti (e.g. 12Gi)")),
    }
}

/// The images one target of a technique optimises together: a diversity unit's N.
fn images_per_target(settings: &RenderSettings, technique: Technique) -> u64 {
    if technique == Technique::Diversity { u64::from(settings.options.diversity_images) } else { 1 }
}

/// An estimate of the bytes one optimised image takes on a worker, from the image side
/// only (fp32 values): the parameters with their gradient and Adam's two moments, the
/// image made from them and kept for the backward pass, the transformed and resized
/// model input with its sampling grid and their gradients, and every step's transform
/// (drawn up front), and the snapshots kept at the thresholds. The model's activations are not counted: the coordinator never
/// loads the model, so it cannot know them; the budget's headroom is for them.
pub fn image_bytes(s: &RenderSettings) -> u64 {
    let (size, input, channels) = (u64::from(s.size), u64::from(s.input_size), u64::from(s.param.channels));
    let param = match s.param.kind {
        // MACO optimises one phase a frequency; its fixed magnitude is one per task.
        ParamKind::Fft if s.param.maco => channels * size * (size / 2 + 1),
        ParamKind::Fft => channels * size * (size / 2 + 1) * 2,
        ParamKind::Pixel => channels * size * size,
    };
    // Parameters, gradient, Adam's first and second moments.
    let optimiser = 4 * param;
    // The spectrum scaled, its inverse FFT, the colour transform and the sigmoid.
    let image = 4 * channels * size * size;
    // The grid (2 values a pixel), the shifted and the resampled image, each with its gradient.
    let model_input = 2 * (2 * input * input + 2 * channels * input * input);
    // A 2x3 affine matrix a step.
    let transforms = 6 * u64::from(s.steps);
    // The image kept at each threshold until the task ends.
    let snapshots = s.thresholds.len() as u64 * channels * size * size;
    4 * (optimiser + image + model_input + transforms + snapshots)
}

/// Splits the job into tasks, leaving out the images in `done`, after checking it against
/// `limits` ([`Limits::check`]). Units keep their order, so a resumed job batches the
/// remaining units the same way every time. Job id and index are filled in by the state
/// store.
///
/// `dataset_shards` are the job's dataset shards, in order; they give one map each,
/// followed by one reduce per job layer that waits on all the maps. None (no dataset, or
/// statistics the atlas already holds) gives no map and no reduce.
///
/// A per-layer technique's items (deepdream starts, caricature inputs, directions) are
/// batched like units, in tasks of at most [`Limits::batch_for`] targets.
pub fn shard(spec: &JobSpec, done: &Done, dataset_shards: &[ShardSource], limits: &Limits) -> Result<Vec<NewTask>> {
    limits.check(spec, dataset_shards.len())?;
    let mut tasks = Vec::new();
    for plan in &spec.layers {
        let layer = &plan.layer.name;
        for &technique in spec.techniques_for(plan) {
            let batch = limits.batch_for(spec, plan, technique)? as usize;
            let is_done = |t: &Target| ImageId::new(layer, technique, t.clone()).is_ok_and(|id| done.contains(&id));
            let todo: Vec<Target> = spec.targets(plan, technique).filter(|t| !is_done(t)).collect();
            for chunk in todo.chunks(batch) {
                tasks.push(NewTask::runnable(Work::Render { layer: layer.clone(), technique, targets: chunk.to_vec() }));
            }
        }
    }
    if dataset_shards.is_empty() {
        return Ok(tasks);
    }
    let first_map = tasks.len() as u32;
    for (shard, source) in dataset_shards.iter().enumerate() {
        tasks.push(NewTask::runnable(Work::Map { shard: shard as u32, source: source.clone() }));
    }
    let maps: Vec<u32> = (first_map..tasks.len() as u32).collect();
    for plan in &spec.layers {
        tasks.push(NewTask { work: Work::Reduce { layer: plan.layer.name.clone() }, after: maps.clone() });
    }
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use loupe_core::spec::{DatasetSpec, LayerInfo, ModelRef, NamedImage, UnitRanges};

    fn unit(layer: &str, u: u32, t: Technique) -> ImageId {
        ImageId::new(layer, t, Target::Unit(u)).unwrap()
    }

    fn spec() -> JobSpec {
        JobSpec {
            model: ModelRef { uri: "m".into(), name: "m".into(), sha256: "0".into() },
            layers: vec![
                LayerPlan { layer: LayerInfo { name: "a".into(), shape: vec![10, 4, 4] }, units: UnitRanges::range(0, 10), techniques: None, steps: None, param: None, transforms: None },
                LayerPlan { layer: LayerInfo { name: "b".into(), shape: vec![3] }, units: vec![0, 2].into(), techniques: None, steps: None, param: None, transforms: None },
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
        let tasks = shard(&spec(), &done, &[], &Limits::default()).unwrap();
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
        let spec = JobSpec { dataset: Some(DatasetSpec { uri: "d".into(), examples: 8, images_per_shard: 2, connections: true }), ..spec() };
        let shards = vec![
            ShardSource::Images { keys: vec!["0.jpg".into(), "1.jpg".into()] },
            ShardSource::Images { keys: vec!["2.jpg".into()] },
            ShardSource::Tar { key: "t.tar".into() },
        ];
        let renders = shard(&spec, &Done::default(), &[], &Limits::default()).unwrap().len();
        let tasks = shard(&spec, &Done::default(), &shards, &Limits::default()).unwrap();
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
            for u in p.units.iter() {
                for &t in &spec.techniques {
                    all_done.insert(unit(&p.layer.name, u, t));
                }
            }
        }
        let tasks = shard(&spec, &all_done, &shards, &Limits::default()).unwrap();
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
        let tasks = shard(&spec, &done, &[], &Limits::default()).unwrap();
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

    fn renders(tasks: &[NewTask]) -> impl Iterator<Item = (&String, Technique, &Vec<Target>)> {
        tasks.iter().filter_map(|t| match &t.work {
            Work::Render { layer, technique, targets } => Some((layer, *technique, targets)),
            _ => None,
        })
    }

    #[test]
    fn a_batch_too_big_for_a_worker_is_split_and_a_unit_too_big_is_refused() {
        let mut spec = spec();
        spec.settings.size = 2048;
        spec.settings.input_size = 2048;
        spec.batch = 4096;
        let limits = Limits { worker_memory: 4 * GIB, ..Limits::default() };
        let per_image = image_bytes(&spec.settings);
        let fits = (4 * GIB / per_image) as usize;
        assert!((2..10).contains(&fits), "{per_image} bytes an image");
        let tasks = shard(&spec, &Done::default(), &[], &limits).unwrap();
        assert!(renders(&tasks).all(|(_, _, targets)| targets.len() <= fits));
        assert!(renders(&tasks).any(|(_, _, targets)| targets.len() == fits), "the largest batch that fits is used");
        assert_eq!(renders(&tasks).map(|(_, _, t)| t.len()).sum::<usize>(), 2 * (10 + 2));

        spec.techniques = vec![Technique::Diversity];
        spec.settings.options.diversity_images = 16;
        let err = shard(&spec, &Done::default(), &[], &limits).unwrap_err().to_string();
        assert!(err.contains("16 image(s) of 2048 px") && err.contains("--batch 4096") && err.contains("4096 MiB (--worker-memory)"), "{err}");
    }

    #[test]
    fn caps_name_the_jobs_count_and_the_cap_without_listing_units() {
        let mut spec = spec();
        spec.layers[0].layer.shape = vec![u32::MAX as i64];
        spec.layers[0].units = UnitRanges::range(0, u32::MAX);
        spec.validate().unwrap();
        let err = Limits::default().check(&spec, 0).unwrap_err().to_string();
        assert!(err.contains("4294967297 units") && err.contains("at most 1000000 units per job"), "{err}");

        let spec = JobSpec { batch: 1, ..self::spec() };
        // Batch 1: a task per image, 2 x (10 + 2).
        let limits = Limits { max_tasks: 24, ..Limits::default() };
        limits.check(&spec, 0).unwrap();
        let with_dataset = JobSpec { dataset: Some(DatasetSpec { uri: "d".into(), examples: 8, images_per_shard: 2, connections: true }), ..spec.clone() };
        let err = limits.check(&with_dataset, 1).unwrap_err().to_string();
        assert!(err.contains("needs 27 tasks") && err.contains("at most 24 tasks per job"), "{err}");
        let err = shard(&spec, &Done::default(), &[], &Limits { max_tasks: 23, ..limits }).unwrap_err().to_string();
        assert!(err.contains("needs 24 tasks") && err.contains("at most 23"), "{err}");
    }

    #[test]
    fn per_layer_items_count_against_the_unit_cap_and_snapshots_against_memory() {
        let mut spec = spec();
        spec.techniques.push(Technique::Caricature);
        spec.settings.options.caricature_inputs = (0..5).map(|i| NamedImage { name: format!("i{i}"), uri: format!("s3://m/{i}.jpg") }).collect();
        // 12 units, and 5 caricature items in each of the 2 layers.
        Limits { max_units: 22, ..Limits::default() }.check(&spec, 0).unwrap();
        let err = Limits { max_units: 21, ..Limits::default() }.check(&spec, 0).unwrap_err().to_string();
        assert!(err.contains("12 units and 10 items") && err.contains("at most 21"), "{err}");

        let without = image_bytes(&spec.settings);
        spec.settings.steps = 4;
        let steps_only = image_bytes(&spec.settings);
        spec.settings.thresholds = vec![1, 2, 3, 4];
        // Four fp32 images of 3 x 8 x 8 kept until the task ends.
        assert_eq!(image_bytes(&spec.settings) - steps_only, 4 * 4 * 3 * 8 * 8);
        assert!(steps_only > without);

        // MACO's parameters are phases, half the FFT's values: Adam's four copies of them.
        let fft = image_bytes(&spec.settings);
        spec.settings.param.maco = true;
        assert_eq!(fft - image_bytes(&spec.settings), 4 * 4 * 3 * 8 * 5);
    }

    #[test]
    fn memory_sizes_parse_as_kubernetes_writes_them() {
        assert_eq!(parse_memory("12Gi"), Ok(12 * GIB));
        assert_eq!(parse_memory("512Mi"), Ok(512 << 20));
        assert_eq!(parse_memory("1000"), Ok(1000));
        for bad in ["", "0", "12G", "-1Gi", "Gi", "99999999999Ti"] {
            assert!(parse_memory(bad).unwrap_err().contains("not a memory size"), "{bad}");
        }
    }

    /// The resident memory of this process, from /proc (Linux).
    fn rss_bytes() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    }

    /// How the default caps were chosen: a job at both of them must leave most of the
    /// chart's 1Gi coordinator free.
    #[tokio::test]
    async fn a_job_at_the_caps_fits_the_coordinator() {
        use crate::state::{MemoryStateStore, StateStore};
        let limits = Limits::default();
        let mut spec = spec();
        spec.layers = vec![LayerPlan::new(LayerInfo { name: "a".into(), shape: vec![1_000_000] }, UnitRanges::range(0, limits.max_units as u32))];
        spec.techniques = vec![Technique::Channel, Technique::Neuron, Technique::Negative, Technique::Diversity];
        spec.batch = 40;
        spec.validate().unwrap();
        let before = rss_bytes();
        let tasks = shard(&spec, &Done::default(), &[], &limits).unwrap();
        assert_eq!(tasks.len() as u64, limits.max_tasks);
        let store = MemoryStateStore::new();
        store.create_job(spec, tasks, 0, 0).await.unwrap();
        let grown = rss_bytes().saturating_sub(before);
        println!("a job at the caps: {} MiB", grown >> 20);
        assert!(grown < 512 << 20, "{} MiB", grown >> 20);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;
        use std::collections::HashMap;

        fn layer(i: usize) -> impl Strategy<Value = LayerPlan> {
            let count = prop_oneof![4 => 1u32..300, 1 => any::<u32>()];
            (count, prop::option::of(prop::collection::vec(0u32..400, 1..60))).prop_map(move |(count, list)| {
                let units = list.map_or(UnitRanges::range(0, count), UnitRanges::from);
                LayerPlan::new(LayerInfo { name: format!("l{i}"), shape: vec![i64::from(count), 4, 4] }, units)
            })
        }

        fn settings() -> impl Strategy<Value = RenderSettings> {
            let side = prop_oneof![8u32..=256, 8u32..=2048];
            (side.clone(), side, 1u32..=4, any::<bool>(), 2u32..=16, 1u32..=100_000).prop_map(|(size, input_size, channels, pixel, diversity, steps)| {
                let mut s = RenderSettings { steps, size, input_size, seed: 0, learning_rate: 0.05, ..Default::default() };
                s.param.channels = channels;
                s.param.decorrelate = channels == 3;
                s.param.kind = if pixel { ParamKind::Pixel } else { ParamKind::Fft };
                s.options.diversity_images = diversity;
                s
            })
        }

        fn job() -> impl Strategy<Value = (JobSpec, Limits, usize)> {
            let techniques = prop::sample::subsequence(vec![Technique::Channel, Technique::Neuron, Technique::Negative, Technique::Diversity, Technique::DeepDream], 1..=5);
            let layers = (layer(0), prop::option::of(layer(1))).prop_map(|(a, b)| std::iter::once(a).chain(b).collect::<Vec<_>>());
            let limits = (1u64..20_000, 1u64..20_000, 20u32..36).prop_map(|(max_units, max_tasks, log)| Limits { max_units, max_tasks, worker_memory: 1 << log });
            (layers, techniques, settings(), 1u32..=4096, limits, 0usize..4).prop_map(|(layers, techniques, settings, batch, limits, maps)| {
                let dataset = (maps > 0).then(|| DatasetSpec { uri: "d".into(), examples: 8, images_per_shard: 10, connections: true });
                let model = ModelRef { uri: "m".into(), name: "m".into(), sha256: "0".into() };
                (JobSpec { model, layers, techniques, settings, batch, out: "o".into(), dataset }, limits, maps)
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 256, max_global_rejects: 100_000, ..ProptestConfig::default() })]

            /// Every job the validator and the caps accept shards within the bounds, and
            /// each (unit, technique) it asks for is in exactly one task.
            #[test]
            fn accepted_jobs_shard_within_the_bounds_and_schedule_each_image_once((spec, limits, maps) in job()) {
                prop_assume!(spec.validate().is_ok() && limits.check(&spec, maps).is_ok());
                let shards = vec![ShardSource::Tar { key: "t.tar".into() }; maps];
                let tasks = shard(&spec, &Done::default(), &shards, &limits).unwrap();
                prop_assert!(tasks.len() as u64 <= limits.max_tasks);
                let mut scheduled: HashMap<(String, Technique, u32), u32> = HashMap::new();
                for (layer, technique, targets) in renders(&tasks) {
                    let plan = spec.layers.iter().find(|p| &p.layer.name == layer).unwrap();
                    let batch = limits.batch_for(&spec, plan, technique).unwrap();
                    prop_assert!(!targets.is_empty() && targets.len() <= batch as usize && batch <= spec.batch);
                    let settings = spec.settings_for(plan);
                    prop_assert!(targets.len() as u64 * images_per_target(&settings, technique) * image_bytes(&settings) <= limits.worker_memory);
                    for unit in targets.iter().filter_map(Target::unit) {
                        *scheduled.entry((layer.clone(), technique, unit)).or_default() += 1;
                    }
                }
                prop_assert!(scheduled.values().all(|&n| n == 1), "an image scheduled twice");
                let mut expected = 0;
                for plan in &spec.layers {
                    for &t in spec.techniques_for(plan).iter().filter(|t| t.per_unit()) {
                        for unit in plan.units.iter() {
                            expected += 1;
                            prop_assert!(scheduled.contains_key(&(plan.layer.name.clone(), t, unit)), "{} unit {} {} not scheduled", plan.layer.name, unit, t);
                        }
                    }
                }
                prop_assert_eq!(scheduled.len(), expected);
            }
        }
    }
}
