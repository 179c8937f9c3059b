//! The loupe.v1 gRPC protocol. Generated types stay at the edge: this crate converts
//! them to and from loupe-core's domain types, and validates on the way in, in one place.

#![allow(clippy::derive_partial_eq_without_eq)]

pub mod v1 {
    tonic::include_proto!("loupe.v1");
}

use loupe_core::job::{JobId, JobState, JobStatus};
use loupe_core::atlas::Target;
use loupe_core::spec::{self, DatasetSpec, Precision, JobSpec, LayerInfo, LayerPlan, ModelRef, RenderSettings, Technique, UnitRanges};
use loupe_core::task::{JobContext, Lease, LeaseState, ShardSource, TaskSpec, Work};

/// Workers send it in every request; the coordinator refuses other versions. 2: tasks
/// may be dataset maps and reduces. 3: lease ids carry a secret
/// (`<job>/<index>#<attempt>.<secret>`), which a version 2 worker cannot read. 4: a lease
/// carries durations (`ttl_ms`, `max_ms`) instead of a deadline by the coordinator's clock.
/// 5: maps also leave connection partials, and partials live under a directory per kind,
/// which a version 4 worker's reduce would not find. 6: a layer plan may carry its own
/// parameterisation and transforms (`options_json`), which a version 5 worker would
/// ignore, rendering the layer with the job's. 7: MACO's frequency 0 holds each channel's
/// mean (docs/techniques.md "MACO"), so a version 6 worker would render other MACO images
/// for the same job.
pub const PROTOCOL_VERSION: u32 = 7;

/// The largest message either end of the loupe.v1 services sends or accepts (tonic's own
/// default, 4 MiB, is less than a map task of a long shard's image keys). The largest
/// message a job produces is a lease of its largest task, so the coordinator refuses at
/// submit a job whose lease would exceed this ([`lease_len`]).
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// For measuring messages against [`MAX_MESSAGE_BYTES`] (`encoded_len`).
pub use prost::Message;

/// Refuses a request larger than [`MAX_MESSAGE_BYTES`] before it is sent: a client's own
/// limit would fail the call with an HTTP/2 reset that names nothing.
pub fn check_size(what: &str, message: &impl Message) -> Result<(), Invalid> {
    let len = message.encoded_len();
    if len > MAX_MESSAGE_BYTES {
        return Err(Invalid(format!("the {what} is {len} bytes, more than the {MAX_MESSAGE_BYTES} a loupe.v1 message may carry")));
    }
    Ok(())
}

/// Room for what a lease adds around its task and job context: the lease id (a job id
/// and a 32-digit secret), the attempt, its time to live and its maximum time.
const LEASE_FIELDS_BYTES: usize = 512;

/// An upper bound on the encoded size of a lease of `task`, where `context_len` is
/// [`context_len`] of its job: a job's tasks are measured without encoding its context
/// once per task.
pub fn lease_len(task: &TaskSpec, context_len: usize) -> usize {
    let task = v1::Lease { task: Some(task.into()), ..Default::default() };
    task.encoded_len() + context_len + LEASE_FIELDS_BYTES
}

/// The encoded size of a job's context within a lease.
pub fn context_len(job: &JobContext) -> usize {
    v1::Lease { job: Some(job.into()), ..Default::default() }.encoded_len()
}

/// A message that cannot become a domain value, with the field that is wrong.
#[derive(Debug)]
pub struct Invalid(pub String);

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Invalid {}

fn missing(field: &str) -> Invalid {
    Invalid(format!("{field} is missing"))
}

fn job_id(field: &str, id: String) -> Result<JobId, Invalid> {
    JobId::try_from(id).map_err(|e| Invalid(format!("{field}: {e}")))
}

/// A technique travels as the wire value `TECHNIQUE_<NAME>` of common.proto, matched by
/// name, so adding a technique adds its wire value there and nothing here.
fn wire_name(t: Technique) -> String {
    format!("TECHNIQUE_{}", t.as_str().to_ascii_uppercase())
}

impl From<Technique> for v1::Technique {
    fn from(t: Technique) -> Self {
        v1::Technique::from_str_name(&wire_name(t)).unwrap_or_else(|| panic!("common.proto has no {}", wire_name(t)))
    }
}

pub fn technique_from_i32(t: i32) -> Result<Technique, Invalid> {
    let name = v1::Technique::try_from(t).ok().and_then(|w| w.as_str_name().strip_prefix("TECHNIQUE_").map(str::to_ascii_lowercase));
    name.and_then(|n| n.parse().ok()).ok_or_else(|| Invalid(format!("technique {t} is not a known technique")))
}

/// The settings `options_json` carries.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RenderOptions {
    param: spec::ParamSettings,
    transforms: spec::TransformSettings,
    thresholds: Vec<u32>,
    dead_units: spec::DeadUnits,
    options: spec::TechniqueOptions,
}

impl From<&RenderSettings> for v1::RenderSettings {
    fn from(s: &RenderSettings) -> Self {
        let options = RenderOptions {
            param: s.param.clone(),
            transforms: s.transforms.clone(),
            thresholds: s.thresholds.clone(),
            dead_units: s.dead_units,
            options: s.options.clone(),
        };
        v1::RenderSettings {
            steps: s.steps,
            size: s.size,
            input_size: s.input_size,
            seed: s.seed,
            learning_rate: s.learning_rate,
            bf16: s.precision == Precision::Bf16,
            options_json: serde_json::to_string(&options).expect("render options serialise"),
        }
    }
}

impl TryFrom<v1::RenderSettings> for RenderSettings {
    type Error = Invalid;
    fn try_from(s: v1::RenderSettings) -> Result<Self, Invalid> {
        let mut settings = RenderSettings {
            steps: s.steps,
            size: s.size,
            input_size: s.input_size,
            seed: s.seed,
            learning_rate: s.learning_rate,
            precision: if s.bf16 { Precision::Bf16 } else { Precision::Fp32 },
            ..RenderSettings::default()
        };
        if !s.options_json.is_empty() {
            let o: RenderOptions = serde_json::from_str(&s.options_json).map_err(|e| Invalid(format!("settings.options_json: {e}")))?;
            settings.param = o.param;
            settings.transforms = o.transforms;
            settings.thresholds = o.thresholds;
            settings.dead_units = o.dead_units;
            settings.options = o.options;
        }
        Ok(settings)
    }
}

impl From<&ModelRef> for v1::ModelRef {
    fn from(m: &ModelRef) -> Self {
        v1::ModelRef { uri: m.uri.clone(), name: m.name.clone(), sha256: m.sha256.clone() }
    }
}

impl From<v1::ModelRef> for ModelRef {
    fn from(m: v1::ModelRef) -> Self {
        ModelRef { uri: m.uri, name: m.name, sha256: m.sha256 }
    }
}

impl From<&DatasetSpec> for v1::DatasetSpec {
    fn from(d: &DatasetSpec) -> Self {
        v1::DatasetSpec { uri: d.uri.clone(), examples: d.examples, images_per_shard: d.images_per_shard, skip_connections: !d.connections }
    }
}

impl From<v1::DatasetSpec> for DatasetSpec {
    fn from(d: v1::DatasetSpec) -> Self {
        DatasetSpec { uri: d.uri, examples: d.examples, images_per_shard: d.images_per_shard, connections: !d.skip_connections }
    }
}

impl From<&ShardSource> for v1::ShardSource {
    fn from(s: &ShardSource) -> Self {
        let source = match s {
            ShardSource::Images { keys } => v1::shard_source::Source::Images(v1::ImageKeys { keys: keys.clone() }),
            ShardSource::Tar { key } => v1::shard_source::Source::Tar(key.clone()),
        };
        v1::ShardSource { source: Some(source) }
    }
}

impl TryFrom<v1::ShardSource> for ShardSource {
    type Error = Invalid;
    fn try_from(s: v1::ShardSource) -> Result<Self, Invalid> {
        match s.source.ok_or_else(|| missing("task.map.source (images or tar)"))? {
            v1::shard_source::Source::Images(i) => Ok(ShardSource::Images { keys: i.keys }),
            v1::shard_source::Source::Tar(key) => Ok(ShardSource::Tar { key }),
        }
    }
}

impl From<&TaskSpec> for v1::Task {
    fn from(t: &TaskSpec) -> Self {
        let mut m = v1::Task { job_id: t.job_id.to_string(), index: t.index, ..Default::default() };
        match &t.work {
            // A per-unit render's units travel in `units`, a per-layer render's items in
            // `layer_items`, as the wire has always carried them.
            Work::Render { layer, technique, targets } => {
                m.layer = layer.clone();
                m.technique = v1::Technique::from(*technique) as i32;
                if technique.per_unit() {
                    m.units = targets.iter().filter_map(Target::unit).collect();
                } else {
                    let items = targets.iter().filter_map(|t| t.item().map(str::to_string)).collect();
                    m.work = Some(v1::task::Work::LayerItems(v1::LayerItems { items }));
                }
            }
            Work::Map { shard, source } => {
                m.work = Some(v1::task::Work::Map(v1::MapWork { shard: *shard, source: Some(source.into()) }));
            }
            Work::Reduce { layer } => {
                m.work = Some(v1::task::Work::Reduce(v1::ReduceWork { layer: layer.clone() }));
            }
        }
        m
    }
}

impl TryFrom<v1::Task> for TaskSpec {
    type Error = Invalid;
    fn try_from(t: v1::Task) -> Result<Self, Invalid> {
        let work = match t.work {
            None => render_work(t.layer, t.technique, t.units.into_iter().map(Target::Unit).collect())?,
            Some(v1::task::Work::Map(m)) => {
                Work::Map { shard: m.shard, source: m.source.ok_or_else(|| missing("task.map.source"))?.try_into()? }
            }
            Some(v1::task::Work::Reduce(r)) => Work::Reduce { layer: r.layer },
            Some(v1::task::Work::LayerItems(i)) => render_work(t.layer, t.technique, i.items.into_iter().map(Target::Item).collect())?,
        };
        Ok(TaskSpec { job_id: job_id("task.job_id", t.job_id)?, index: t.index, work })
    }
}

fn render_work(layer: String, technique: i32, targets: Vec<Target>) -> Result<Work, Invalid> {
    let technique = technique_from_i32(technique)?;
    loupe_core::atlas::check_targets(technique, &targets).map_err(|e| Invalid(format!("task: {e}")))?;
    Ok(Work::Render { layer, technique, targets })
}

/// The settings a layer plan's `options_json` carries.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LayerOptions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    param: Option<spec::ParamSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    transforms: Option<spec::TransformSettings>,
}

impl From<&LayerPlan> for v1::LayerPlan {
    fn from(p: &LayerPlan) -> Self {
        let options_json = match (&p.param, &p.transforms) {
            (None, None) => String::new(),
            (param, transforms) => serde_json::to_string(&LayerOptions { param: param.clone(), transforms: transforms.clone() }).expect("layer options serialise"),
        };
        v1::LayerPlan {
            layer: Some(v1::Layer { name: p.layer.name.clone(), shape: p.layer.shape.clone() }),
            units: p.units.ranges().iter().map(|&(start, end)| v1::UnitRange { start, end }).collect(),
            techniques: p.techniques.iter().flatten().map(|&t| v1::Technique::from(t) as i32).collect(),
            steps: p.steps.unwrap_or(0),
            options_json,
        }
    }
}

impl TryFrom<v1::LayerPlan> for LayerPlan {
    type Error = Invalid;
    fn try_from(p: v1::LayerPlan) -> Result<Self, Invalid> {
        let l = p.layer.ok_or_else(|| missing("layers[].layer"))?;
        // Whether the ranges lie inside the layer is `JobSpec::validate`'s to say.
        let ranges: Vec<(u32, u32)> = p.units.iter().map(|r| (r.start, r.end)).collect();
        let units = UnitRanges::new(&ranges).map_err(|e| Invalid(format!("layer {:?}: {e}", l.name)))?;
        let techniques = p.techniques.into_iter().map(technique_from_i32).collect::<Result<Vec<_>, _>>()?;
        let options = match p.options_json.as_str() {
            "" => LayerOptions { param: None, transforms: None },
            json => serde_json::from_str(json).map_err(|e| Invalid(format!("layer {:?}: options_json: {e}", l.name)))?,
        };
        Ok(LayerPlan {
            layer: LayerInfo { name: l.name, shape: l.shape },
            units,
            techniques: (!techniques.is_empty()).then_some(techniques),
            steps: (p.steps > 0).then_some(p.steps),
            param: options.param,
            transforms: options.transforms,
        })
    }
}

impl From<&JobSpec> for v1::JobSpec {
    fn from(s: &JobSpec) -> Self {
        v1::JobSpec {
            model: Some((&s.model).into()),
            layers: s
                .layers
                .iter()
                .map(Into::into)
                .collect(),
            techniques: s.techniques.iter().map(|&t| v1::Technique::from(t) as i32).collect(),
            settings: Some((&s.settings).into()),
            batch: s.batch,
            out: s.out.clone(),
            dataset: s.dataset.as_ref().map(Into::into),
        }
    }
}

/// A job spec from the wire. Structural problems are refused here; the rules of a valid
/// job (ranges, limits) are `JobSpec::validate`'s, which the coordinator calls.
impl TryFrom<v1::JobSpec> for JobSpec {
    type Error = Invalid;
    fn try_from(s: v1::JobSpec) -> Result<Self, Invalid> {
        let layers = s.layers.into_iter().map(TryInto::try_into).collect::<Result<Vec<_>, Invalid>>()?;
        Ok(JobSpec {
            model: s.model.ok_or_else(|| missing("model"))?.into(),
            layers,
            techniques: s.techniques.into_iter().map(technique_from_i32).collect::<Result<_, _>>()?,
            settings: s.settings.ok_or_else(|| missing("settings"))?.try_into()?,
            batch: s.batch,
            out: s.out,
            dataset: s.dataset.map(Into::into),
        })
    }
}

impl From<&Lease> for v1::Lease {
    fn from(l: &Lease) -> Self {
        v1::Lease {
            lease_id: l.lease_id.to_string(),
            task: Some((&l.task).into()),
            attempt: l.attempt,
            ttl_ms: l.ttl_ms,
            max_ms: l.max_ms,
            job: Some((&l.job).into()),
        }
    }
}

impl From<&JobContext> for v1::JobContext {
    fn from(j: &JobContext) -> Self {
        v1::JobContext {
            model: Some((&j.model).into()),
            settings: Some((&j.settings).into()),
            out: j.out.clone(),
            dataset: j.dataset.as_ref().map(Into::into),
            layers: j.layers.iter().map(Into::into).collect(),
        }
    }
}

impl TryFrom<v1::Lease> for Lease {
    type Error = Invalid;
    fn try_from(l: v1::Lease) -> Result<Self, Invalid> {
        let t = l.task.ok_or_else(|| missing("lease.task"))?;
        let j = l.job.ok_or_else(|| missing("lease.job"))?;
        Ok(Lease {
            lease_id: l.lease_id.parse().map_err(|e| Invalid(format!("lease: {e}")))?,
            task: t.try_into()?,
            attempt: l.attempt,
            ttl_ms: l.ttl_ms,
            max_ms: l.max_ms,
            job: JobContext {
                model: j.model.ok_or_else(|| missing("lease.job.model"))?.into(),
                settings: j.settings.ok_or_else(|| missing("lease.job.settings"))?.try_into()?,
                out: j.out,
                dataset: j.dataset.map(Into::into),
                layers: j.layers.into_iter().map(TryInto::try_into).collect::<Result<_, _>>()?,
            },
        })
    }
}

impl From<LeaseState> for v1::LeaseState {
    fn from(s: LeaseState) -> Self {
        match s {
            LeaseState::Held => v1::LeaseState::Held,
            LeaseState::Cancelled => v1::LeaseState::Cancelled,
            LeaseState::Lost => v1::LeaseState::Lost,
        }
    }
}

pub fn lease_state_from_i32(s: i32) -> Result<LeaseState, Invalid> {
    match v1::LeaseState::try_from(s) {
        Ok(v1::LeaseState::Held) => Ok(LeaseState::Held),
        Ok(v1::LeaseState::Cancelled) => Ok(LeaseState::Cancelled),
        Ok(v1::LeaseState::Lost) => Ok(LeaseState::Lost),
        _ => Err(Invalid(format!("lease state {s} is unknown"))),
    }
}

impl From<&JobStatus> for v1::JobStatus {
    fn from(s: &JobStatus) -> Self {
        let (state, message) = match &s.state {
            JobState::Running => (v1::JobState::Running, String::new()),
            JobState::Indexing => (v1::JobState::Indexing, String::new()),
            JobState::Succeeded => (v1::JobState::Succeeded, String::new()),
            JobState::Failed { message } => (v1::JobState::Failed, message.clone()),
            JobState::Cancelled => (v1::JobState::Cancelled, String::new()),
        };
        v1::JobStatus {
            job_id: s.id.to_string(),
            spec: Some((&s.spec).into()),
            state: state as i32,
            message,
            created_ms: s.created_ms,
            tasks_total: s.tasks_total,
            tasks_done: s.tasks_done,
            images_total: s.images_total,
            images_skipped: s.images_skipped,
            images_done: s.images_done,
            maps_total: s.maps_total,
            maps_done: s.maps_done,
            reduces_total: s.reduces_total,
            reduces_done: s.reduces_done,
            images_failed: s.images_failed,
        }
    }
}

impl TryFrom<v1::JobStatus> for JobStatus {
    type Error = Invalid;
    fn try_from(s: v1::JobStatus) -> Result<Self, Invalid> {
        let state = match v1::JobState::try_from(s.state) {
            Ok(v1::JobState::Running) => JobState::Running,
            Ok(v1::JobState::Indexing) => JobState::Indexing,
            Ok(v1::JobState::Succeeded) => JobState::Succeeded,
            Ok(v1::JobState::Failed) => JobState::Failed { message: s.message },
            Ok(v1::JobState::Cancelled) => JobState::Cancelled,
            _ => return Err(Invalid(format!("job state {} is unknown", s.state))),
        };
        Ok(JobStatus {
            id: job_id("status.job_id", s.job_id)?,
            spec: s.spec.ok_or_else(|| missing("status.spec"))?.try_into()?,
            state,
            created_ms: s.created_ms,
            tasks_total: s.tasks_total,
            tasks_done: s.tasks_done,
            images_total: s.images_total,
            images_skipped: s.images_skipped,
            images_done: s.images_done,
            maps_total: s.maps_total,
            maps_done: s.maps_done,
            reduces_total: s.reduces_total,
            reduces_done: s.reduces_done,
            images_failed: s.images_failed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> JobSpec {
        JobSpec {
            model: ModelRef { uri: "s3://b/m.pt".into(), name: "m".into(), sha256: "ab".into() },
            layers: vec![LayerPlan { layer: LayerInfo { name: "conv".into(), shape: vec![4, 8, 8] }, units: vec![0, 3].into(), techniques: None, steps: None, param: None, transforms: None }],
            techniques: vec![Technique::Channel, Technique::Negative],
            settings: RenderSettings { steps: 5, size: 16, input_size: 32, seed: 9, learning_rate: 0.05, ..Default::default() },
            batch: 2,
            out: "s3://b/atlas".into(),
            dataset: None,
        }
    }

    fn dataset() -> DatasetSpec {
        DatasetSpec { uri: "s3://b/imagenet/val".into(), examples: 16, images_per_shard: 500, connections: false }
    }

    #[test]
    fn a_job_spec_survives_the_wire() {
        let spec = job();
        assert_eq!(JobSpec::try_from(v1::JobSpec::from(&spec)).unwrap(), spec);
        let with_dataset = JobSpec { dataset: Some(dataset()), ..job() };
        assert_eq!(JobSpec::try_from(v1::JobSpec::from(&with_dataset)).unwrap(), with_dataset);
    }

    #[test]
    fn every_technique_has_its_wire_value() {
        for t in Technique::ALL {
            assert_eq!(technique_from_i32(v1::Technique::from(t) as i32).unwrap(), t);
        }
        assert!(technique_from_i32(0).is_err(), "unspecified");
        assert!(technique_from_i32(99).is_err());
    }

    #[test]
    fn every_kind_of_task_survives_the_wire() {
        let works = [
            Work::render("conv", Technique::Negative, [0, 1, 7]),
            Work::Map { shard: 3, source: ShardSource::Images { keys: vec!["a/0.jpg".into(), "a/1.png".into()] } },
            Work::Map { shard: 0, source: ShardSource::Images { keys: vec![] } },
            Work::Map { shard: 4, source: ShardSource::Tar { key: "train-0004.tar".into() } },
            Work::Reduce { layer: "conv".into() },
        ];
        for (index, work) in works.into_iter().enumerate() {
            let lease = Lease {
                lease_id: format!("job-2/{index}#1.0123456789abcdef0123456789abcdef").parse().unwrap(),
                task: TaskSpec { job_id: "job-2".parse().unwrap(), index: index as u32, work },
                attempt: 1,
                ttl_ms: 7,
                max_ms: 70,
                job: JobContext { model: job().model, settings: job().settings, out: "o".into(), dataset: Some(dataset()), layers: job().layers },
            };
            assert_eq!(Lease::try_from(v1::Lease::from(&lease)).unwrap(), lease);
        }
        // A map without its source is refused, naming the field.
        let mut m = v1::Task::from(&TaskSpec {
            job_id: "j".parse().unwrap(),
            index: 0,
            work: Work::Map { shard: 0, source: ShardSource::Tar { key: "t.tar".into() } },
        });
        if let Some(v1::task::Work::Map(map)) = &mut m.work {
            map.source = None;
        }
        assert!(TaskSpec::try_from(m).unwrap_err().0.contains("task.map.source"));
    }

    #[test]
    fn malformed_messages_name_the_field() {
        let mut m = v1::JobSpec::from(&job());
        m.settings = None;
        assert!(JobSpec::try_from(m).unwrap_err().0.contains("settings"));
        let mut m = v1::JobSpec::from(&job());
        m.techniques.push(0);
        assert!(JobSpec::try_from(m).unwrap_err().0.contains("technique 0"));
    }

    #[test]
    fn overlapping_or_empty_unit_ranges_are_refused_before_any_unit_is_listed() {
        let mut m = v1::JobSpec::from(&job());
        m.layers[0].units = vec![v1::UnitRange { start: 0, end: 5 }, v1::UnitRange { start: 3, end: 8 }];
        let err = JobSpec::try_from(m.clone()).unwrap_err().0;
        assert!(err.contains("\"conv\"") && err.contains("3..8 overlaps 0..5"), "{err}");
        m.layers[0].units = vec![v1::UnitRange { start: 7, end: 7 }];
        assert!(JobSpec::try_from(m.clone()).unwrap_err().0.contains("7..7 is empty"));
        // A lying shape with every unit: read as one range, left for validate to refuse.
        m.layers[0].layer.as_mut().unwrap().shape = vec![u32::MAX as i64];
        m.layers[0].units = vec![v1::UnitRange { start: 0, end: u32::MAX }];
        assert_eq!(JobSpec::try_from(m).unwrap().layers[0].units.len(), u64::from(u32::MAX));
    }

    #[test]
    fn a_lease_and_a_status_survive_the_wire() {
        let lease = Lease {
            lease_id: "job-1/0#1.0123456789abcdef0123456789abcdef".parse().unwrap(),
            task: TaskSpec {
                job_id: "job-1".parse().unwrap(),
                index: 0,
                work: Work::render("conv", Technique::Neuron, [1, 2]),
            },
            attempt: 1,
            ttl_ms: 42,
            max_ms: 420,
            job: JobContext { model: job().model, settings: job().settings, out: "o".into(), dataset: None, layers: vec![] },
        };
        assert_eq!(Lease::try_from(v1::Lease::from(&lease)).unwrap(), lease);
        let status = JobStatus {
            id: "job-1".parse().unwrap(),
            spec: job(),
            state: JobState::Failed { message: "bad model".into() },
            created_ms: 1,
            tasks_total: 2,
            tasks_done: 1,
            images_total: 4,
            images_skipped: 0,
            images_done: 2,
            maps_total: 3,
            maps_done: 1,
            reduces_total: 1,
            reduces_done: 0,
            images_failed: 1,
        };
        assert_eq!(JobStatus::try_from(v1::JobStatus::from(&status)).unwrap(), status);
    }

    #[test]
    fn render_options_per_layer_settings_and_layer_items_travel() {
        use loupe_core::spec::{DeadUnits, Direction, NamedImage, ParamKind};
        let mut settings = RenderSettings { steps: 9, size: 16, input_size: 16, ..Default::default() };
        settings.param.kind = ParamKind::Pixel;
        settings.param.color_matrix = Some([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.5, 1.0]]);
        settings.transforms.angles = vec![0.0, 5.0];
        settings.thresholds = vec![3, 6];
        settings.dead_units = DeadUnits::Reseed;
        settings.options.caricature_inputs = vec![NamedImage { name: "dog".into(), uri: "s3://b/dog.jpg".into() }];
        settings.options.directions = vec![Direction { name: "d".into(), layer: "conv".into(), vector: vec![0.5, -1.0] }];
        let wire = v1::RenderSettings::from(&settings);
        assert_eq!(RenderSettings::try_from(wire.clone()).unwrap(), settings);
        let bad = v1::RenderSettings { options_json: "{\"param\": 3}".into(), ..wire };
        assert!(RenderSettings::try_from(bad).unwrap_err().0.contains("options_json"));

        let plan = LayerPlan {
            layer: LayerInfo { name: "conv".into(), shape: vec![2, 4, 4] },
            units: vec![0, 1].into(),
            techniques: Some(vec![Technique::Diversity, Technique::Direction]),
            steps: Some(20),
            param: None,
            transforms: None,
        };
        assert_eq!(LayerPlan::try_from(v1::LayerPlan::from(&plan)).unwrap(), plan);
        // A layer's own parameterisation and transforms, each on its own and together.
        let param = spec::ParamSettings { maco: true, magnitude: Some(vec![vec![1.0, 0.5]; 3]), ..Default::default() };
        let transforms = spec::TransformSettings { crop: Some(spec::CropSchedule { start: 0.9, end: 0.5 }), noise: 0.01, ..spec::TransformSettings::none() };
        for (param, transforms) in [(Some(param.clone()), None), (None, Some(transforms.clone())), (Some(param), Some(transforms))] {
            let plan = LayerPlan { param, transforms, ..plan.clone() };
            assert_eq!(LayerPlan::try_from(v1::LayerPlan::from(&plan)).unwrap(), plan);
        }
        let bad = v1::LayerPlan { options_json: "{\"param\": {\"decai\": 1}}".into(), ..v1::LayerPlan::from(&plan) };
        let err = LayerPlan::try_from(bad).unwrap_err().0;
        assert!(err.contains("layer \"conv\": options_json") && err.contains("decai"), "{err}");
        let task = TaskSpec {
            job_id: "j".parse().unwrap(),
            index: 3,
            work: Work::render("conv", Technique::Caricature, ["dog"]),
        };
        assert_eq!(TaskSpec::try_from(v1::Task::from(&task)).unwrap(), task);
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    #[test]
    fn a_request_over_the_message_limit_is_refused_before_it_is_sent() {
        assert!(check_size("job", &v1::SubmitRequest::default()).is_ok());
        let big = v1::SubmitRequest { spec: Some(v1::JobSpec { out: "x".repeat(MAX_MESSAGE_BYTES), ..Default::default() }) };
        let e = check_size("job", &big).unwrap_err().to_string();
        assert!(e.contains(&format!("the job is {} bytes, more than the {MAX_MESSAGE_BYTES}", big.encoded_len())), "{e}");
    }
}
