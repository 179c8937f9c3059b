//! The coordinator: it takes a job, asks the [`Atlas`] what is already complete, shards
//! the rest into tasks, leases them to workers, counts retries and has the atlas index
//! written when the last task is done.
//!
//! - [`state`]: the [`state::StateStore`] trait and its backends (one atomic transition
//!   per method, dependencies between tasks included).
//! - [`shard`]: job -> tasks: renders, and for a job with a dataset one map per dataset
//!   shard and one reduce per layer that waits on every map.
//! - [`Coordinator`]: submit, progress, cancel, and the [`WorkerApi`] that workers call.
//!
//! It never links libtorch: layer shapes arrive in the job spec, found by the submitter.

pub mod monitor;
pub mod server;
pub mod shard;
pub mod state;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use tracing::{info, warn};

use loupe_core::api::{ApiError, ApiResult, WorkerApi};
use loupe_core::atlas::Atlas;
use loupe_core::location::Location;
use loupe_core::spec::JobSpec;
use loupe_core::store;
use loupe_core::task::{Failure, JobContext, Lease, LeaseId, LeaseState, ShardSource, TaskSpec, Work};
use loupe_proto::MAX_MESSAGE_BYTES;

use state::{JobCursor, JobId, JobState, JobStatus, JobsPage, LeasePolicy, NewTask, StateError, StateStore};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(loupe_core::Error),
    /// The atlas holds another model, or images of other render settings.
    #[error("{0}")]
    Conflict(String),
    /// The job's model cannot be read, or is not the file the submitter described.
    #[error("{0}")]
    Model(String),
    /// The job's dataset cannot be listed, or holds no image.
    #[error("{0}")]
    Dataset(String),
    #[error(transparent)]
    State(#[from] StateError),
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<loupe_core::Error> for Error {
    fn from(e: loupe_core::Error) -> Error {
        match e {
            loupe_core::Error::Conflict(message) => Error::Conflict(message),
            other => Error::Invalid(other),
        }
    }
}

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// A lease not renewed within this time is given to another worker.
    pub lease_ttl: Duration,
    /// Attempts per task, counting expired leases and retryable failures.
    pub max_attempts: u32,
    /// When set, a job's atlas must lie under this location (the cluster's bucket and
    /// prefix).
    pub out_prefix: Option<Location>,
    /// When set, every location a job reads (model, dataset, deepdream and caricature
    /// images) must lie under one of these; `None` reads anywhere (`loupe render`).
    pub input_prefixes: Option<Vec<Location>>,
    /// Whether a job may name paths on the coordinator's and workers' filesystems, for
    /// its inputs or its atlas. A cluster refuses them unless its operator allows them.
    pub allow_local_paths: bool,
    /// How long a job that ended (succeeded, failed, cancelled) stays in the state store.
    pub job_retention: Duration,
    /// Units and tasks per job, and a render task's memory on a worker.
    pub limits: shard::Limits,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        // `loupe render`'s: its own machine's paths, anywhere.
        CoordinatorConfig {
            lease_ttl: Duration::from_secs(60),
            max_attempts: 3,
            out_prefix: None,
            input_prefixes: None,
            allow_local_paths: true,
            job_retention: Duration::from_secs(7 * 86_400),
            limits: shard::Limits::default(),
        }
    }
}

/// How often every coordinator looks for jobs left indexing ([`Coordinator::sweep_indexing`]):
/// how long, at most, such a job waits to end.
pub const INDEX_SWEEP_INTERVAL: Duration = Duration::from_secs(5);

pub struct Coordinator {
    state: Arc<dyn StateStore>,
    policy: LeasePolicy,
    config: CoordinatorConfig,
    /// The jobs whose index this coordinator is writing now: its sweep leaves such a job
    /// to the call already at it, rather than writing a large index twice at once.
    indexing_now: Mutex<HashSet<JobId>>,
}

/// A job's place in [`Coordinator::indexing_now`], held while its index is written.
struct IndexingClaim<'a> {
    jobs: &'a Mutex<HashSet<JobId>>,
    job_id: JobId,
}

impl<'a> IndexingClaim<'a> {
    /// The claim, or `None` when this coordinator is writing the job's index already.
    fn take(jobs: &'a Mutex<HashSet<JobId>>, job_id: &JobId) -> Option<IndexingClaim<'a>> {
        let fresh = jobs.lock().expect("indexing lock").insert(job_id.clone());
        fresh.then(|| IndexingClaim { jobs, job_id: job_id.clone() })
    }
}

impl Drop for IndexingClaim<'_> {
    fn drop(&mut self) {
        self.jobs.lock().expect("indexing lock").remove(&self.job_id);
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_millis() as u64
}

fn rfc3339_now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl Coordinator {
    pub fn new(state: Arc<dyn StateStore>, config: CoordinatorConfig) -> Self {
        let policy = LeasePolicy { ttl_ms: config.lease_ttl.as_millis() as u64, max_attempts: config.max_attempts.max(1), task_time: state::TaskTime::DEFAULT };
        Coordinator { state, policy, config, indexing_now: Mutex::default() }
    }

    /// Validates the job, reconciles it with what the atlas already holds, lists its
    /// dataset, writes `atlas.json` and queues the tasks for images not yet complete, and
    /// the dataset's maps and reduces unless the atlas holds every layer's statistics.
    /// Returns the job id.
    pub async fn submit(&self, mut spec: JobSpec) -> Result<JobId> {
        spec.validate()?;
        // Before anything proportional to the job: the atlas's done images, the tasks.
        self.config.limits.check(&spec, 0)?;
        let model = self.check_locations(&spec)?;
        spec.model.sha256 = model_digest(&model, &spec.model.sha256).await?;
        let atlas = Atlas::open(&spec.out).await?;
        atlas.check_job(&spec).await?;
        let done = atlas.complete_images(&spec).await?;
        let shards = dataset_shards(&atlas, &spec).await?;
        let tasks = shard::shard(&spec, &done, &shards, &self.config.limits)?;
        check_lease_sizes(&spec, &tasks)?;
        atlas.add_job(&spec, rfc3339_now()).await?;
        let skipped = done.len() as u64;
        let job_id = self.state.create_job(spec, tasks, skipped, now_ms()).await?;
        info!(job_id = job_id.as_str(), images_skipped = skipped, dataset_shards = shards.len(), "job submitted");
        self.index_if_done(&job_id).await?;
        Ok(job_id)
    }

    /// Checks every location the job names against the cluster's rules: its atlas under
    /// the out prefix, what it reads under an input prefix, and local paths only where
    /// allowed. Each is parsed once here; returns the model's, which is read next.
    fn check_locations(&self, spec: &JobSpec) -> Result<Location> {
        self.allowed("out", &spec.out, self.config.out_prefix.as_ref().map(std::slice::from_ref))?;
        let inputs = self.config.input_prefixes.as_deref();
        let model = self.allowed("model", &spec.model.uri, inputs)?;
        if let Some(dataset) = &spec.dataset {
            self.allowed("dataset", &dataset.uri, inputs)?;
        }
        let o = &spec.settings.options;
        for (field, images) in [("deepdream_inputs", &o.deepdream_inputs), ("caricature_inputs", &o.caricature_inputs)] {
            for image in images {
                self.allowed(field, &image.uri, inputs)?;
            }
        }
        Ok(model)
    }

    /// `uri` parsed, if this coordinator lets a job name it as `field`: a local path only
    /// when local paths are allowed, and under one of `prefixes` when there are any.
    fn allowed(&self, field: &'static str, uri: &str, prefixes: Option<&[Location]>) -> Result<Location> {
        let location = Location::parse(field, uri)?;
        if matches!(location, Location::Local(_)) && !self.config.allow_local_paths {
            return Err(Error::Invalid(loupe_core::Error::invalid(
                field,
                format!("{location} is a local path, and this cluster reads and writes only object storage (s3://); its operator can allow local paths with --allow-local-paths"),
            )));
        }
        if let Some(prefixes) = prefixes {
            location.require_under(field, prefixes)?;
        }
        Ok(location)
    }

    /// Finishes what a previous coordinator left half done: jobs whose tasks all completed
    /// but whose atlas index was not yet written. Call it at start-up. It reads every job,
    /// so it also finds those left indexing by a coordinator older than the store's list
    /// of indexing jobs, which [`Coordinator::sweep_indexing`] reads.
    pub async fn recover(&self) -> Result<()> {
        for job in self.state.jobs().await? {
            if job.state == JobState::Indexing {
                info!(job_id = job.id.as_str(), "writing the atlas index of a job finished before a restart");
                self.index_if_done(&job.id).await?;
            }
        }
        Ok(())
    }

    /// Every `interval`, writes the index of each job left indexing: one whose last
    /// completion failed to end it (the state store erred, or the coordinator was killed
    /// mid-index), which no retried completion can end since its lease is gone. Runs on
    /// every coordinator of a cluster, forever. A job whose index this coordinator is
    /// writing already is left to that call; two coordinators indexing one job at once is
    /// harmless: the index files are rewritten with the same bytes, and only the first
    /// `finish` ends the job (it moves only an indexing job).
    pub async fn sweep_indexing(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let jobs = match self.state.indexing_jobs().await {
                Ok(jobs) => jobs,
                Err(e) => {
                    warn!(error = %e, "listing the jobs left indexing failed; trying again later");
                    continue;
                }
            };
            for job_id in jobs {
                if let Err(e) = self.index_if_done(&job_id).await {
                    warn!(job_id = job_id.as_str(), error = %e, "ending a job left indexing failed; trying again later");
                }
            }
        }
    }

    pub async fn status(&self, job_id: &JobId) -> Result<JobStatus> {
        Ok(self.state.job(job_id).await?)
    }

    /// Every job, newest first (those that ended within the retention, and the others).
    pub async fn jobs(&self) -> Result<Vec<JobStatus>> {
        Ok(self.state.jobs().await?)
    }

    /// At most `limit` jobs, newest first, submitted before `before`.
    pub async fn jobs_page(&self, before: Option<JobCursor>, limit: usize) -> Result<JobsPage> {
        Ok(self.state.jobs_page(before, limit).await?)
    }

    /// Removes the jobs that ended longer ago than the retention; returns how many.
    pub async fn expire_jobs(&self) -> Result<u64> {
        Ok(self.state.expire_jobs(now_ms(), self.config.job_retention.as_millis() as u64).await?)
    }

    pub async fn cancel(&self, job_id: &JobId) -> Result<bool> {
        Ok(self.state.cancel(job_id, now_ms()).await?)
    }

    /// Writes each layer's `layer.json` from the unit records in the atlas, once the job's
    /// tasks are all done, and ends the job with the count of its failed images (a unit
    /// whose optimisation diverged fails alone: the job still succeeds).
    async fn index_if_done(&self, job_id: &JobId) -> Result<()> {
        let Some(_claim) = IndexingClaim::take(&self.indexing_now, job_id) else {
            return Ok(());
        };
        let status = self.state.job(job_id).await?;
        if status.state != JobState::Indexing {
            return Ok(());
        }
        let (outcome, images_failed) = match write_index(job_id, &status.spec).await {
            Ok(failed) => (JobState::Succeeded, failed),
            Err(e) => {
                warn!(job_id = job_id.as_str(), error = %e, "writing the atlas index failed");
                (JobState::Failed { message: format!("writing the atlas index: {e}") }, 0)
            }
        };
        info!(job_id = job_id.as_str(), ?outcome, images_failed, "job ended");
        self.state.finish(job_id, outcome, images_failed, now_ms()).await?;
        Ok(())
    }
}

/// Writes each layer's `layer.json` and removes the partial statistics the job's maps
/// left, now that its reduces have written every layer's; returns the failed images.
async fn write_index(job_id: &JobId, spec: &JobSpec) -> loupe_core::Result<u64> {
    let atlas = Atlas::open(&spec.out).await?;
    let images_failed = atlas.write_layer_indices(spec).await?;
    if spec.dataset.is_some() {
        // Scratch only: a failure leaves files no job reads, not a wrong atlas.
        if let Err(e) = atlas.delete_partials(job_id).await {
            warn!(job_id = job_id.as_str(), error = %e, "removing the job's partial statistics failed; partials/{job_id}/ in the atlas may be deleted");
        }
    }
    Ok(images_failed)
}

/// The model's sha256, streamed from its location. A digest given at submit must match:
/// the workers check the same digest before rendering.
async fn model_digest(model: &Location, given: &str) -> Result<String> {
    let digest = store::sha256(model)
        .await
        .map_err(|e| Error::Model(format!("model {model} cannot be read: {e}")))?
        .ok_or_else(|| Error::Model(format!("model {model} does not exist")))?;
    if !given.is_empty() && given != digest {
        return Err(Error::Model(format!("model {model} has sha256 {digest}, not the {given} given at submit")));
    }
    Ok(digest)
}

/// The dataset shards the job's maps run over, in order: none for a job without a
/// dataset, or when the atlas already holds the statistics of every job layer (a resume
/// runs either all the maps and reduces or none). A dataset that cannot be listed or
/// holds no image makes the job invalid.
async fn dataset_shards(atlas: &Atlas, spec: &JobSpec) -> Result<Vec<ShardSource>> {
    let Some(dataset) = &spec.dataset else { return Ok(Vec::new()) };
    if atlas.has_dataset_statistics(spec).await? {
        info!(dataset = dataset.uri, "the atlas holds every layer's dataset statistics; no map or reduce to run");
        return Ok(Vec::new());
    }
    let shards = loupe_dataset::plan(&dataset.uri, dataset.images_per_shard as usize).await.map_err(|e| match e {
        // Already names the dataset: "dataset <uri>: no images found ...".
        loupe_dataset::Error::Dataset { .. } => Error::Dataset(e.to_string()),
        other => Error::Dataset(format!("the dataset {} cannot be listed: {other}", dataset.uri)),
    })?;
    if shards.is_empty() {
        return Err(Error::Dataset(format!("the dataset {} holds no image (JPEG or PNG files, or WebDataset .tar shards)", dataset.uri)));
    }
    Ok(shards)
}


/// Refuses a job with a task whose lease would exceed the gRPC message limit: no worker
/// could receive it, and it would be leased until its attempts ran out. The largest is a
/// dataset map of a long shard's image keys.
fn check_lease_sizes(spec: &JobSpec, tasks: &[NewTask]) -> Result<()> {
    let context = loupe_proto::context_len(&JobContext::of(spec));
    // Every id a state store gives has this one's length.
    let job_id = JobId::generate();
    for (index, task) in tasks.iter().enumerate() {
        let task = TaskSpec { job_id: job_id.clone(), index: index as u32, work: task.work.clone() };
        let len = loupe_proto::lease_len(&task, context);
        if len <= MAX_MESSAGE_BYTES {
            continue;
        }
        let over = format!("makes a lease of {len} bytes, over the {MAX_MESSAGE_BYTES} a gRPC message may carry");
        let message = match &task.work {
            Work::Map { shard, source: ShardSource::Images { keys } } => {
                let fits = keys.len() * MAX_MESSAGE_BYTES.saturating_sub(context + 1024) / (len - context);
                format!("dataset shard {shard} ({} images from {:?}) {over}; lower images_per_shard to {fits} or less", keys.len(), keys.first().map_or("", |k| k.as_str()))
            }
            work => format!("task {index} ({} of {}) {over}", work.kind(), work.layer().unwrap_or("the dataset")),
        };
        return Err(Error::Invalid(loupe_core::Error::invalid("job", message)));
    }
    Ok(())
}

fn api_err(e: impl std::fmt::Display) -> ApiError {
    ApiError::Unavailable(e.to_string())
}

/// The worker-facing operations, with the coordinator's own errors; the gRPC service and
/// the in-process [`WorkerApi`] both call these.
impl Coordinator {
    pub async fn lease_for(&self, worker: &str) -> std::result::Result<Option<Lease>, StateError> {
        self.state.lease(worker, self.policy).await
    }

    pub async fn renew_lease(&self, lease_id: &LeaseId) -> std::result::Result<LeaseState, StateError> {
        self.state.renew(lease_id, self.policy).await
    }

    /// Records the task done; the last task of a job triggers its atlas index.
    pub async fn complete_lease(&self, lease_id: &LeaseId) -> Result<LeaseState> {
        let c = self.state.complete(lease_id).await?;
        if c.job_done {
            self.index_if_done(lease_id.job_id()).await?;
        }
        Ok(c.lease)
    }

    pub async fn fail_lease(&self, lease_id: &LeaseId, failure: Failure) -> std::result::Result<LeaseState, StateError> {
        warn!(lease = lease_id.public(), retryable = failure.retryable, message = %failure.message, "task failed");
        self.state.fail(lease_id, failure, self.policy).await
    }
}

#[async_trait]
impl WorkerApi for Coordinator {
    async fn lease(&self, worker: &str) -> ApiResult<Option<Lease>> {
        self.lease_for(worker).await.map_err(api_err)
    }

    async fn renew(&self, lease_id: &LeaseId) -> ApiResult<LeaseState> {
        self.renew_lease(lease_id).await.map_err(api_err)
    }

    async fn complete(&self, lease_id: &LeaseId) -> ApiResult<LeaseState> {
        self.complete_lease(lease_id).await.map_err(api_err)
    }

    async fn fail(&self, lease_id: &LeaseId, failure: Failure) -> ApiResult<LeaseState> {
        self.fail_lease(lease_id, failure).await.map_err(api_err)
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use loupe_core::atlas::{self, LayerExamples};
    use loupe_core::spec::{DatasetSpec, LayerInfo, LayerPlan, ModelRef, RenderSettings, Technique};
    use loupe_core::task::Work;

    use crate::state::MemoryStateStore;

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        /// A model file (any bytes: the coordinator only digests it), a dataset of five
        /// image files and an empty atlas directory.
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("model.pt"), b"not really torchscript").unwrap();
            let images = dir.path().join("images");
            std::fs::create_dir_all(&images).unwrap();
            for name in ["a.jpg", "b.jpg", "c.png", "d.jpg", "e.jpeg", "notes.txt"] {
                std::fs::write(images.join(name), b"pixels").unwrap();
            }
            std::fs::create_dir_all(dir.path().join("empty")).unwrap();
            Fixture { dir }
        }

        fn path(&self, rel: &str) -> String {
            self.dir.path().join(rel).to_string_lossy().into_owned()
        }

        fn spec(&self, dataset: &str) -> JobSpec {
            JobSpec {
                model: ModelRef { uri: self.path("model.pt"), name: "m".into(), sha256: String::new() },
                layers: vec![
                    LayerPlan { layer: LayerInfo { name: "conv".into(), shape: vec![4, 8, 8] }, units: vec![0, 1, 2, 3].into(), techniques: None, steps: None, param: None, transforms: None },
                    LayerPlan { layer: LayerInfo { name: "fc".into(), shape: vec![3] }, units: vec![0, 1, 2].into(), techniques: None, steps: None, param: None, transforms: None },
                ],
                techniques: vec![Technique::Channel],
                settings: RenderSettings { steps: 4, size: 16, input_size: 16, seed: 0, learning_rate: 0.05, ..Default::default() },
                batch: 2,
                out: self.path("atlas"),
                dataset: Some(DatasetSpec { uri: self.path(dataset), examples: 4, images_per_shard: 2, connections: true }),
            }
        }
    }

    fn coordinator() -> Coordinator {
        Coordinator::new(Arc::new(MemoryStateStore::new()), CoordinatorConfig::default())
    }

    /// A memory store that counts the jobs it is asked to `finish`, can fail the first
    /// (as a Redis that drops the connection while the last completion ends its job), and
    /// can hold every `finish` until `gate` gives a permit.
    #[derive(Default)]
    struct WatchedFinish {
        inner: MemoryStateStore,
        fail_first: bool,
        gate: Option<tokio::sync::Semaphore>,
        finishes: std::sync::atomic::AtomicU32,
    }

    #[async_trait]
    impl StateStore for WatchedFinish {
        async fn finish(&self, job_id: &JobId, outcome: JobState, images_failed: u64, now_ms: u64) -> state::StateResult<()> {
            let n = self.finishes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if let Some(gate) = &self.gate {
                gate.acquire().await.expect("gate open").forget();
            }
            if self.fail_first && n == 0 {
                return Err(StateError::Backend("connection reset (injected)".into()));
            }
            self.inner.finish(job_id, outcome, images_failed, now_ms).await
        }
        async fn create_job(&self, spec: JobSpec, tasks: Vec<NewTask>, images_skipped: u64, now_ms: u64) -> state::StateResult<JobId> {
            self.inner.create_job(spec, tasks, images_skipped, now_ms).await
        }
        async fn lease(&self, worker: &str, policy: LeasePolicy) -> state::StateResult<Option<Lease>> {
            self.inner.lease(worker, policy).await
        }
        async fn renew(&self, lease_id: &LeaseId, policy: LeasePolicy) -> state::StateResult<LeaseState> {
            self.inner.renew(lease_id, policy).await
        }
        async fn complete(&self, lease_id: &LeaseId) -> state::StateResult<state::Completion> {
            self.inner.complete(lease_id).await
        }
        async fn fail(&self, lease_id: &LeaseId, failure: Failure, policy: LeasePolicy) -> state::StateResult<LeaseState> {
            self.inner.fail(lease_id, failure, policy).await
        }
        async fn indexing_jobs(&self) -> state::StateResult<Vec<JobId>> {
            self.inner.indexing_jobs().await
        }
        async fn cancel(&self, job_id: &JobId, now_ms: u64) -> state::StateResult<bool> {
            self.inner.cancel(job_id, now_ms).await
        }
        async fn job(&self, job_id: &JobId) -> state::StateResult<JobStatus> {
            self.inner.job(job_id).await
        }
        async fn jobs_page(&self, before: Option<JobCursor>, limit: usize) -> state::StateResult<JobsPage> {
            self.inner.jobs_page(before, limit).await
        }
        async fn expire_jobs(&self, now_ms: u64, retention_ms: u64) -> state::StateResult<u64> {
            self.inner.expire_jobs(now_ms, retention_ms).await
        }
        async fn ping(&self) -> state::StateResult<()> {
            self.inner.ping().await
        }
        async fn counters(&self) -> state::StateResult<state::StoreCounters> {
            self.inner.counters().await
        }
    }

    #[tokio::test]
    async fn a_job_whose_last_completion_failed_to_end_it_still_ends_without_a_restart() {
        let f = Fixture::new();
        let store = WatchedFinish { fail_first: true, ..Default::default() };
        let c = Arc::new(Coordinator::new(Arc::new(store), CoordinatorConfig::default()));
        tokio::spawn(c.clone().sweep_indexing(Duration::from_millis(100)));
        let id = c.submit(f.spec("images")).await.unwrap();
        // What the job's maps would leave for its reduces.
        let partial = f.dir.path().join(format!("atlas/{}", atlas::partial_key(id.as_str(), atlas::PartialKind::Stats, "conv", 0)));
        std::fs::create_dir_all(partial.parent().unwrap()).unwrap();
        std::fs::write(&partial, b"{}").unwrap();
        let mut last = None;
        while let Some(lease) = c.lease_for("w").await.unwrap() {
            match c.complete_lease(&lease.lease_id).await {
                Ok(state) => assert_eq!(state, LeaseState::Held),
                Err(e) => last = Some((lease.lease_id, e.to_string())),
            }
        }
        let (lease_id, error) = last.expect("the last completion's finish failed");
        assert!(error.contains("injected"), "{error}");
        assert_eq!(c.complete_lease(&lease_id).await.unwrap(), LeaseState::Lost, "the retried completion cannot end it");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let st = c.status(&id).await.unwrap();
            if st.state == JobState::Succeeded {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the job is still {:?} after 60 s", st.state);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!f.dir.path().join("atlas/partials").exists(), "the job's partials are removed when its index is written");
    }

    /// The sweep finds a job the moment its last completion marks it indexing; while that
    /// completion writes the index, the sweep leaves the job to it.
    #[tokio::test]
    async fn a_coordinator_writes_one_jobs_index_once_at_a_time() {
        let f = Fixture::new();
        let store = Arc::new(WatchedFinish { gate: Some(tokio::sync::Semaphore::new(0)), ..Default::default() });
        let c = Arc::new(Coordinator::new(store.clone(), CoordinatorConfig::default()));
        let id = c.submit(JobSpec { dataset: None, ..f.spec("images") }).await.unwrap();
        let mut leases = Vec::new();
        while let Some(lease) = c.lease_for("w").await.unwrap() {
            leases.push(lease);
        }
        let last = leases.pop().expect("the job has tasks");
        for lease in &leases {
            assert_eq!(c.complete_lease(&lease.lease_id).await.unwrap(), LeaseState::Held);
        }
        let completing = tokio::spawn({
            let c = c.clone();
            async move { c.complete_lease(&last.lease_id).await }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while store.finishes.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "the last completion never reached finish");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // What one sweep does with the job now: nothing, as its completion is at it (a
        // second writer would wait at the gate, so the call is bounded).
        let swept = tokio::time::timeout(Duration::from_secs(30), c.index_if_done(&id)).await;
        assert!(swept.is_ok(), "the sweep waited on the job's index");
        assert_eq!(store.finishes.load(std::sync::atomic::Ordering::SeqCst), 1, "the job's index was written twice at once");
        store.gate.as_ref().unwrap().add_permits(2);
        assert_eq!(completing.await.unwrap().unwrap(), LeaseState::Held);
        assert_eq!(c.status(&id).await.unwrap().state, JobState::Succeeded);
    }

    #[tokio::test]
    async fn a_dataset_job_gets_a_map_per_shard_and_a_reduce_per_layer() {
        let f = Fixture::new();
        let c = coordinator();
        let id = c.submit(f.spec("images")).await.unwrap();
        let st = c.status(&id).await.unwrap();
        // Renders: conv 2 batches, fc 2 batches; 5 images in shards of 2; 2 layers.
        assert_eq!((st.tasks_total, st.maps_total, st.reduces_total), (4 + 3 + 2, 3, 2));
        assert_eq!((st.images_total, st.images_done), (7, 0));
        let mut maps = Vec::new();
        while let Some(lease) = c.lease_for("w").await.unwrap() {
            match &lease.task.work {
                Work::Map { shard, source } => maps.push((*shard, source.clone())),
                Work::Render { .. } => {}
                Work::Reduce { .. } => panic!("a reduce leased before the maps were done"),
            }
            assert_eq!(lease.job.dataset, f.spec("images").dataset);
            assert_eq!(c.complete_lease(&lease.lease_id).await.unwrap(), LeaseState::Held);
            if maps.len() == 3 {
                break;
            }
        }
        let keys = |k: &[&str]| ShardSource::Images { keys: k.iter().map(|s| s.to_string()).collect() };
        assert_eq!(maps, vec![(0, keys(&["a.jpg", "b.jpg"])), (1, keys(&["c.png", "d.jpg"])), (2, keys(&["e.jpeg"]))]);
        let mut reduces = Vec::new();
        while let Some(lease) = c.lease_for("w").await.unwrap() {
            reduces.push(lease.task.work.clone());
            c.complete_lease(&lease.lease_id).await.unwrap();
        }
        assert_eq!(reduces, vec![Work::Reduce { layer: "conv".into() }, Work::Reduce { layer: "fc".into() }]);
        let st = c.status(&id).await.unwrap();
        assert_eq!((st.state, st.tasks_done, st.maps_done, st.reduces_done, st.images_done), (JobState::Succeeded, 9, 3, 2, 7));
    }

    #[tokio::test]
    async fn a_resumed_job_skips_the_dataset_only_when_every_layer_has_its_statistics() {
        let f = Fixture::new();
        let store = store::open(&f.path("atlas")).await.unwrap();
        // What a reduce leaves last: examples.json, for these units, dataset and K, with
        // the connections to the job's other layer (conv, then fc).
        let examples = |layer: &str, units: std::ops::Range<u32>, uri: String, k: u32| {
            let (previous, next) = if layer == "conv" { (None, Some("fc".to_string())) } else { (Some("conv".to_string()), None) };
            let e = LayerExamples {
                format_version: atlas::FORMAT_VERSION,
                layer: layer.into(),
                dataset: atlas::DatasetSummary { uri, images: 5, images_skipped: 0, examples: k },
                receptive_field: 3,
                stats: "stats.parquet".into(),
                connections: Some(atlas::LayerConnections { table: "connections.parquet".into(), previous, next }),
                units: units
                    .map(|unit| atlas::UnitExamples { unit, mean: None, std: None, max: None, frac_positive: None, top: vec![], bottom: vec![], spatial_mean: None, inputs: vec![], outputs: vec![] })
                    .collect(),
            };
            (atlas::examples_key(&atlas::layer_segment(layer).unwrap()), e)
        };
        let stored = |(key, e): (String, LayerExamples)| (key, loupe_core::to_json(&e));
        let without_connections = |(key, e): (String, LayerExamples)| (key, loupe_core::to_json(&LayerExamples { connections: None, ..e }));
        let c = coordinator();
        let uri = f.path("images");
        let (key, json) = stored(examples("conv", 0..4, uri.clone(), 4));
        store.put(&key, json).await.unwrap();
        let st = c.status(&c.submit(f.spec("images")).await.unwrap()).await.unwrap();
        assert_eq!((st.maps_total, st.reduces_total), (3, 2), "one layer's statistics missing: all maps and reduces run");
        for (layer_examples, why) in [
            (stored(examples("fc", 0..2, uri.clone(), 4)), "a unit missing"),
            (stored(examples("fc", 0..3, f.path("elsewhere"), 4)), "another dataset"),
            (stored(examples("fc", 0..3, uri.clone(), 8)), "another K"),
            (without_connections(examples("fc", 0..3, uri.clone(), 4)), "no connections"),
        ] {
            store.put(&layer_examples.0, layer_examples.1).await.unwrap();
            let st = c.status(&c.submit(f.spec("images")).await.unwrap()).await.unwrap();
            assert_eq!((st.maps_total, st.reduces_total), (3, 2), "{why}: all maps and reduces run");
        }
        let (key, json) = stored(examples("fc", 0..3, uri, 4));
        store.put(&key, json).await.unwrap();
        let st = c.status(&c.submit(f.spec("images")).await.unwrap()).await.unwrap();
        assert_eq!((st.tasks_total, st.maps_total, st.reduces_total), (4, 0, 0), "every layer's statistics there: no map, no reduce");
    }

    /// `n` image keys of `len` bytes each, as a map task of shard 7 carries them.
    fn long_keys_map(n: usize, len: usize) -> Vec<NewTask> {
        let keys = (0..n).map(|i| format!("{i:0>len$}.jpg", len = len - 4)).collect();
        vec![NewTask::runnable(Work::Map { shard: 7, source: ShardSource::Images { keys } })]
    }

    #[test]
    fn a_job_whose_map_task_exceeds_a_grpc_message_is_refused_naming_the_shard() {
        let spec = Fixture::new().spec("images");
        let max = DatasetSpec::MAX_IMAGES_PER_SHARD as usize;
        check_lease_sizes(&spec, &long_keys_map(max, 300)).expect("100,000 keys of 300 bytes fit");
        let e = check_lease_sizes(&spec, &long_keys_map(max, 400)).unwrap_err().to_string();
        assert!(e.contains("dataset shard 7 (100000 images") && e.contains(&format!("over the {MAX_MESSAGE_BYTES}")), "{e}");
        let fits: usize = e.rsplit("images_per_shard to ").next().unwrap().split(' ').next().unwrap().parse().unwrap();
        assert!(fits < max && check_lease_sizes(&spec, &long_keys_map(fits, 400)).is_ok(), "the advice fits: {e}");
    }

    #[tokio::test]
    async fn a_cluster_refuses_every_location_outside_its_prefixes_naming_the_field() {
        let f = Fixture::new();
        let at = |uri: &str| Location::parse("test", uri).unwrap();
        let config = CoordinatorConfig {
            out_prefix: Some(at(&f.path("atlas"))),
            input_prefixes: Some(vec![at("s3://models/shared"), at(&f.path("images")), at(&f.path("model.pt"))]),
            allow_local_paths: true,
            ..CoordinatorConfig::default()
        };
        let c = Coordinator::new(Arc::new(MemoryStateStore::new()), config.clone());
        let with = |edit: &dyn Fn(&mut JobSpec)| {
            let mut spec = f.spec("images");
            edit(&mut spec);
            spec
        };
        let image = |uri: &str| loupe_core::spec::NamedImage { name: "cat".into(), uri: uri.into() };
        let refused = [
            (with(&|s| s.dataset.as_mut().unwrap().uri = "/".into()), "dataset", "/ is not under"),
            (with(&|s| s.dataset.as_mut().unwrap().uri = f.path("images/../empty")), "dataset", "`..`"),
            (with(&|s| s.model.uri = "s3://models/private/m.pt".into()), "model", "s3://models/private/m.pt is not under"),
            (with(&|s| s.model.uri = "model.pt".into()), "model", "model.pt is a relative path"),
            (with(&|s| s.out = f.path("elsewhere")), "out", "elsewhere is not under"),
            (
                with(&|s| {
                    s.techniques.push(Technique::Caricature);
                    s.settings.options.caricature_inputs = vec![image("/etc/passwd")];
                }),
                "caricature_inputs",
                "/etc/passwd is not under",
            ),
            (
                with(&|s| {
                    s.techniques.push(Technique::DeepDream);
                    s.settings.options.deepdream_inputs = vec![image("s3://other/cat.jpg")];
                }),
                "deepdream_inputs",
                "s3://other/cat.jpg is not under",
            ),
        ];
        for (spec, field, problem) in refused {
            match c.submit(spec).await {
                Err(e @ Error::Invalid(_)) => {
                    let e = e.to_string();
                    assert!(e.contains(&format!("invalid {field}:")) && e.contains(problem), "{e}");
                }
                other => panic!("expected {field} refused for {problem:?}, got {:?}", other.map_err(|e| e.to_string())),
            }
        }
        assert!(c.jobs().await.unwrap().is_empty());
        assert!(!f.dir.path().join("atlas").join(atlas::ATLAS_KEY).exists(), "a refused job writes nothing");

        let no_local = Coordinator::new(Arc::new(MemoryStateStore::new()), CoordinatorConfig { allow_local_paths: false, ..config });
        let e = no_local.submit(f.spec("images")).await.unwrap_err().to_string();
        assert!(e.contains("invalid out:") && e.contains("is a local path") && e.contains("--allow-local-paths"), "{e}");
        c.submit(f.spec("images")).await.expect("every location under its prefix");
    }

    #[tokio::test]
    async fn a_model_that_is_not_a_regular_file_is_refused_without_reading_it() {
        let f = Fixture::new();
        let c = coordinator();
        for model in ["/dev/zero", &f.path("images")] {
            let mut spec = f.spec("images");
            spec.model.uri = model.to_string();
            match c.submit(spec).await {
                Err(e @ Error::Model(_)) => assert!(e.to_string().contains(&format!("{model} is not a regular file")), "{e}"),
                other => panic!("expected a model error, got {:?}", other.map_err(|e| e.to_string())),
            }
        }
    }

    #[tokio::test]
    async fn a_dataset_that_is_empty_or_missing_is_an_invalid_job_naming_it() {
        let f = Fixture::new();
        let c = coordinator();
        for dataset in ["empty", "nowhere"] {
            let spec = f.spec(dataset);
            match c.submit(spec).await {
                Err(e @ Error::Dataset(_)) => assert!(e.to_string().contains(&f.path(dataset)), "{e}"),
                other => panic!("expected a dataset error, got {:?}", other.map_err(|e| e.to_string())),
            }
        }
        assert!(c.jobs().await.unwrap().is_empty());
        assert!(!f.dir.path().join("atlas").join(atlas::ATLAS_KEY).exists(), "an invalid job writes nothing");
        let mut bad = f.spec("images");
        bad.dataset.as_mut().unwrap().examples = 0;
        assert!(matches!(c.submit(bad).await, Err(Error::Invalid(_))));
    }

    #[tokio::test]
    async fn a_job_over_the_caps_or_a_worker_is_refused_or_split_at_submit() {
        let f = Fixture::new();
        let c = coordinator();
        // A lying shape with every unit: counted and refused, never listed.
        let mut spec = JobSpec { dataset: None, ..f.spec("images") };
        spec.layers[0].layer.shape = vec![u32::MAX as i64];
        spec.layers[0].units = loupe_core::spec::UnitRanges::range(0, u32::MAX);
        let err = c.submit(spec).await.unwrap_err().to_string();
        assert!(err.contains("4294967298 units") && err.contains("at most 1000000 units per job"), "{err}");
        assert!(c.jobs().await.unwrap().is_empty());

        // --size 2048 --batch 4096 on workers that hold two such images: tasks of two.
        let mut spec = JobSpec { dataset: None, batch: 4096, ..f.spec("images") };
        spec.settings.size = 2048;
        spec.settings.input_size = 2048;
        let worker_memory = 2 * shard::image_bytes(&spec.settings);
        let limits = shard::Limits { worker_memory, ..shard::Limits::default() };
        let c = Coordinator::new(Arc::new(MemoryStateStore::new()), CoordinatorConfig { limits, ..CoordinatorConfig::default() });
        let id = c.submit(spec.clone()).await.unwrap();
        assert_eq!(c.status(&id).await.unwrap().tasks_total, 2 + 2, "conv's 4 units and fc's 3 in tasks of 2");
        spec.techniques = vec![Technique::Diversity];
        let err = c.submit(spec).await.unwrap_err().to_string();
        assert!(err.contains("4 image(s) of 2048 px") && err.contains("--batch 4096") && err.contains("--worker-memory"), "{err}");
    }
}
