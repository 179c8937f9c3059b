//! Tasks, the unit of work a coordinator hands out, and leases on them.

use serde::{Deserialize, Serialize};

use crate::atlas::Target;
use crate::job::JobId;
use crate::spec::{DatasetSpec, JobSpec, LayerPlan, ModelRef, RenderSettings, Technique};

/// A task: one piece of a job's work, named by the job id and its position in the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "StoredTaskSpec")]
pub struct TaskSpec {
    pub job_id: JobId,
    /// Position of the task in its job; with the job id it names the task.
    pub index: u32,
    pub work: Work,
}

impl TaskSpec {
    pub fn id(&self) -> String {
        format!("{}/{}", self.job_id, self.index)
    }
}

/// A task as stored: with its `work`, or, as a state store written before dataset tasks
/// holds it, a render's `layer`, `technique` and `units` beside the id.
#[derive(Deserialize)]
struct StoredTaskSpec {
    job_id: JobId,
    index: u32,
    work: Option<Work>,
    layer: Option<String>,
    technique: Option<Technique>,
    units: Option<Vec<u32>>,
}

impl TryFrom<StoredTaskSpec> for TaskSpec {
    type Error = String;
    fn try_from(t: StoredTaskSpec) -> Result<Self, String> {
        let work = match (t.work, t.layer, t.technique, t.units) {
            (Some(work), ..) => work,
            (None, Some(layer), Some(technique), Some(units)) => Work::render(layer, technique, units),
            _ => return Err(format!("task {}/{} has no work", t.job_id, t.index)),
        };
        Ok(TaskSpec { job_id: t.job_id, index: t.index, work })
    }
}

/// What a task does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "StoredWork", try_from = "StoredWork")]
pub enum Work {
    /// One optimisation of a batch of one technique's targets in one layer: units for a
    /// per-unit technique, named items (deepdream starts, caricature inputs, directions)
    /// for a per-layer one.
    Render { layer: String, technique: Technique, targets: Vec<Target> },
    /// Statistics and examples of every job layer over one dataset shard; `shard` is its
    /// position in the job's shard list and names its partial results.
    Map { shard: u32, source: ShardSource },
    /// Merges every map's partial for one layer. Leased only after all maps are done.
    Reduce { layer: String },
}

impl Work {
    /// A render of `targets` (unit numbers or item names).
    pub fn render<T: Into<Target>>(layer: impl Into<String>, technique: Technique, targets: impl IntoIterator<Item = T>) -> Work {
        Work::Render { layer: layer.into(), technique, targets: targets.into_iter().map(Into::into).collect() }
    }

    /// The layer a render or reduce works on; a map works on every job layer.
    pub fn layer(&self) -> Option<&str> {
        match self {
            Work::Render { layer, .. } | Work::Reduce { layer } => Some(layer),
            Work::Map { .. } => None,
        }
    }

    /// The images (target x technique) the task renders: its targets for a render, else 0.
    pub fn images(&self) -> u64 {
        match self {
            Work::Render { targets, .. } => targets.len() as u64,
            Work::Map { .. } | Work::Reduce { .. } => 0,
        }
    }

    /// `render`, `map` or `reduce`, for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Work::Render { .. } => "render",
            Work::Map { .. } => "map",
            Work::Reduce { .. } => "reduce",
        }
    }
}

/// [`Work`] as state stores hold it: a per-unit render lists `units`, a per-layer one
/// (`layer_render`) `items`, as loupe always stored them.
#[derive(Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum StoredWork {
    Render { layer: String, technique: Technique, units: Vec<u32> },
    LayerRender { layer: String, technique: Technique, items: Vec<String> },
    Map { shard: u32, source: ShardSource },
    Reduce { layer: String },
}

impl From<Work> for StoredWork {
    fn from(w: Work) -> StoredWork {
        match w {
            Work::Render { layer, technique, targets } if technique.per_unit() => {
                StoredWork::Render { layer, technique, units: targets.iter().filter_map(Target::unit).collect() }
            }
            Work::Render { layer, technique, targets } => {
                StoredWork::LayerRender { layer, technique, items: targets.iter().filter_map(|t| t.item().map(str::to_string)).collect() }
            }
            Work::Map { shard, source } => StoredWork::Map { shard, source },
            Work::Reduce { layer } => StoredWork::Reduce { layer },
        }
    }
}

impl TryFrom<StoredWork> for Work {
    type Error = String;
    fn try_from(w: StoredWork) -> Result<Work, String> {
        let render = |layer: String, technique: Technique, targets: Vec<Target>| {
            crate::atlas::check_targets(technique, &targets).map(|()| Work::Render { layer, technique, targets }).map_err(|e| e.to_string())
        };
        match w {
            StoredWork::Render { layer, technique, units } => render(layer, technique, units.into_iter().map(Target::Unit).collect()),
            StoredWork::LayerRender { layer, technique, items } => render(layer, technique, items.into_iter().map(Target::Item).collect()),
            StoredWork::Map { shard, source } => Ok(Work::Map { shard, source }),
            StoredWork::Reduce { layer } => Ok(Work::Reduce { layer }),
        }
    }
}

/// What a worker needs to know about the task's job to render it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobContext {
    pub model: ModelRef,
    pub settings: RenderSettings,
    pub out: String,
    /// The job's dataset, for map and reduce tasks.
    #[serde(default)]
    pub dataset: Option<DatasetSpec>,
    /// The job's layers and units: a map gathers statistics of all of them, a reduce
    /// writes one layer's.
    #[serde(default)]
    pub layers: Vec<LayerPlan>,
}

impl JobContext {
    /// The settings a layer renders with: the job's, with the layer's own.
    pub fn settings_for(&self, layer: &str) -> RenderSettings {
        match self.layers.iter().find(|p| p.layer.name == layer) {
            Some(plan) => plan.settings(&self.settings),
            None => self.settings.clone(),
        }
    }

    pub fn of(spec: &JobSpec) -> JobContext {
        JobContext {
            model: spec.model.clone(),
            settings: spec.settings.clone(),
            out: spec.out.clone(),
            dataset: spec.dataset.clone(),
            layers: spec.layers.clone(),
        }
    }
}

/// A lease's id, `<job>/<index>#<attempt>.<secret>`: one attempt at one task, and the
/// random secret that makes it unguessable. The store keeps the whole id of the lease it
/// granted and renew, complete and fail must name it whole, so an id guessed from the job,
/// index and attempt is answered like a lost lease. The coordinator's Redis scripts build
/// the same text (coordinator/src/state/redis.rs).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LeaseId {
    job_id: JobId,
    index: u32,
    attempt: u32,
    secret: LeaseSecret,
}

impl LeaseId {
    pub fn new(job_id: &JobId, index: u32, attempt: u32, secret: LeaseSecret) -> LeaseId {
        LeaseId { job_id: job_id.clone(), index, attempt, secret }
    }

    /// `<job>/<index>#<attempt>`: the id without its secret, for logs and errors that
    /// others than the lease's holder may read.
    pub fn public(&self) -> String {
        format!("{}/{}#{}", self.job_id, self.index, self.attempt)
    }

    pub fn job_id(&self) -> &JobId {
        &self.job_id
    }

    /// The task's position in its job.
    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}#{}.{}", self.job_id, self.index, self.attempt, self.secret.0)
    }
}

impl std::str::FromStr for LeaseId {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<LeaseId> {
        let bad = || crate::Error::invalid("lease id", format!("{s:?} is not <job>/<index>#<attempt>.<secret>"));
        let (task, attempt) = s.rsplit_once('#').ok_or_else(bad)?;
        let (attempt, secret) = attempt.split_once('.').ok_or_else(bad)?;
        let (job_id, index) = task.rsplit_once('/').ok_or_else(bad)?;
        let job_id = job_id.parse::<JobId>().map_err(|e| crate::Error::invalid("lease id", format!("{s:?}: {e}")))?;
        let secret = secret.parse().map_err(|e| crate::Error::invalid("lease id", format!("{s:?}: {e}")))?;
        Ok(LeaseId { job_id, index: index.parse().map_err(|_| bad())?, attempt: attempt.parse().map_err(|_| bad())?, secret })
    }
}

/// The random part of a lease id: 128 bits from the operating system's generator, as 32
/// lowercase hex digits, so that no one can name a lease they were not granted.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseSecret(String);

impl LeaseSecret {
    const BYTES: usize = 16;

    pub fn random() -> LeaseSecret {
        use rand::RngCore;
        let mut bytes = [0u8; Self::BYTES];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        LeaseSecret(hex::encode(bytes))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for LeaseSecret {
    type Err = String;
    fn from_str(s: &str) -> Result<LeaseSecret, String> {
        let hex_digit = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
        if s.len() != 2 * Self::BYTES || !s.chars().all(hex_digit) {
            return Err(format!("the secret is not {} lowercase hex digits", 2 * Self::BYTES));
        }
        Ok(LeaseSecret(s.to_string()))
    }
}

impl TryFrom<String> for LeaseId {
    type Error = crate::Error;
    fn try_from(s: String) -> crate::Result<LeaseId> {
        s.parse()
    }
}

impl From<LeaseId> for String {
    fn from(id: LeaseId) -> String {
        id.to_string()
    }
}

/// A lease: the right to run one attempt of a task for `ttl_ms` from each renewal, and
/// never past `max_ms` from the grant. Both are durations, so that the holder measures
/// them by its own clock: the coordinator's deadlines follow the state store's one clock.
/// Renew, complete and fail name the lease id, so a stale holder is refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lease {
    pub lease_id: LeaseId,
    pub task: TaskSpec,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// How long the lease lasts after it is granted or renewed (ms).
    pub ttl_ms: u64,
    /// The longest the task may run, from its grant (ms): the store renews it no further.
    pub max_ms: u64,
    pub job: JobContext,
}

/// What a coordinator says of a lease when its holder renews or reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaseState {
    /// Still held (renewed), or the report was accepted.
    Held,
    /// The task's job was cancelled: stop and write nothing more.
    Cancelled,
    /// The lease expired or was replaced; the holder's work is no longer wanted.
    Lost,
}

/// Why a task failed, as the worker reports it; only the coordinator decides retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// True for transient trouble (a store timeout); false for a problem a retry cannot fix
    /// (a model that is not TorchScript, an unknown layer), which fails the job at once.
    pub retryable: bool,
    pub message: String,
    /// The worker gave the task back unfinished because it is stopping (SIGTERM): not
    /// the task's fault, so it goes back in line without using one of its attempts.
    #[serde(default)]
    pub released: bool,
}

impl Failure {
    pub fn new(retryable: bool, message: impl Into<String>) -> Failure {
        Failure { retryable, message: message.into(), released: false }
    }

    /// A task handed back by a worker that is stopping.
    pub fn released(message: impl Into<String>) -> Failure {
        Failure { retryable: true, message: message.into(), released: true }
    }
}

/// Where a dataset map task's images come from. Keys are relative to the job's dataset
/// URI (a local directory or an S3 prefix); an image's id in the atlas is its key, or
/// `<tar key>/<member name>` for a member of a tar shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ShardSource {
    /// A run of image files (JPEG or PNG), in key order.
    Images { keys: Vec<String> },
    /// One WebDataset `.tar` shard: every JPEG or PNG member, in archive order.
    Tar { key: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_round_trip_and_old_render_tasks_still_read() {
        let tasks = [
            TaskSpec {
                job_id: "job-1".parse().unwrap(),
                index: 0,
                work: Work::render("conv", Technique::Neuron, [1, 2]),
            },
            TaskSpec { job_id: "job-1".parse().unwrap(), index: 1, work: Work::Map { shard: 0, source: ShardSource::Tar { key: "a.tar".into() } } },
            TaskSpec { job_id: "job-1".parse().unwrap(), index: 2, work: Work::Reduce { layer: "conv".into() } },
        ];
        for t in &tasks {
            let json = serde_json::to_string(t).unwrap();
            assert_eq!(&serde_json::from_str::<TaskSpec>(&json).unwrap(), t, "{json}");
        }
        let json = serde_json::to_string(&tasks[1]).unwrap();
        assert!(json.contains(r#""work":{"kind":"map","shard":0,"source":{"kind":"tar","key":"a.tar"}}"#), "{json}");
        let old = r#"{"job_id":"job-1","index":0,"layer":"conv","technique":"neuron","units":[1,2]}"#;
        assert_eq!(serde_json::from_str::<TaskSpec>(old).unwrap(), tasks[0]);
        assert!(serde_json::from_str::<TaskSpec>(r#"{"job_id":"j","index":0}"#).unwrap_err().to_string().contains("no work"));
        let secret = "0123456789abcdef0123456789abcdef";
        let text = format!("job-7/12#3.{secret}");
        let id: LeaseId = text.parse().unwrap();
        assert_eq!((id.job_id().as_str(), id.index(), id.attempt()), ("job-7", 12, 3));
        assert_eq!(id.to_string(), text);
        assert_eq!(id.public(), "job-7/12#3", "what logs show holds no secret");
        // A job id holds no '/', so a lease id's job part is everything before its one '/'.
        // Without its whole secret, an id is not a lease id at all.
        for bad in ["job-7/12", "job-7#3", "/1#1", "j/x#1", "j/1#", "a/b/1#2", "job-7/12#3", "job-7/12#3.", "job-7/12#3.0123", &format!("job-7/12#3.{}", secret.to_uppercase())] {
            assert!(bad.parse::<LeaseId>().is_err(), "{bad}");
        }
        let old_ctx = r#"{"model":{"uri":"m","name":"m","sha256":"0"},"settings":{"steps":1,"size":8,"input_size":8,"seed":0,"learning_rate":0.05},"out":"o"}"#;
        assert_eq!(serde_json::from_str::<JobContext>(old_ctx).unwrap().dataset, None);
    }

    #[test]
    fn lease_secrets_are_random_and_read_back() {
        let a = LeaseSecret::random();
        let b = LeaseSecret::random();
        assert_ne!(a, b, "two draws of 128 bits");
        assert_eq!(a.as_str().parse::<LeaseSecret>().unwrap(), a);
        let job: crate::job::JobId = "job-1".parse().unwrap();
        let id = LeaseId::new(&job, 4, 2, a.clone());
        assert_eq!(id.to_string().parse::<LeaseId>().unwrap(), id);
        assert_ne!(id, LeaseId::new(&job, 4, 2, b), "the same task and attempt with another secret is another lease");
    }
}
