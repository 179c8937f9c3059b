//! The worker loop against a fake coordinator that records every call and a fake task
//! work that sleeps (no libtorch). Real time with short leases; every wait has a generous
//! limit, and every pass condition is an assertion on the recorded calls.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use async_trait::async_trait;
use loupe_core::api::ApiResult;
use loupe_core::spec::{ModelRef, RenderSettings, Technique};
use loupe_core::task::{JobContext, LeaseId, LeaseSecret, TaskSpec, Work};
use loupe_metrics::Probe;
use tokio::time::{timeout, Instant};

use super::*;
use crate::Result;

/// The most any test waits for the loop: far beyond what it needs, so that a slow
/// machine does not fail a test, while a loop that hangs does.
const LIMIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq)]
enum Call {
    Lease,
    Renew(String),
    Complete(String),
    Fail(String, Failure),
}

/// One answer to `lease`.
enum Answer {
    /// A render task under this lease id whose lease lives this many milliseconds.
    Task(&'static str, u64),
    /// Also with a maximum time (ms).
    Bounded(&'static str, u64, u64),
    Nothing,
    Unavailable,
    Refused,
}

/// A coordinator that records every call and answers from scripts: `lease` in order (once
/// the script is spent it shuts the worker down and has nothing), `renew` and `complete`
/// per lease id (`Held` once a lease's script is spent), `fail` always `Held`.
struct FakeApi {
    calls: Mutex<Vec<(Instant, Call)>>,
    leases: Mutex<VecDeque<Answer>>,
    renewals: Mutex<HashMap<String, VecDeque<ApiResult<LeaseState>>>>,
    completions: Mutex<HashMap<String, VecDeque<ApiResult<LeaseState>>>>,
    shutdown: watch::Sender<bool>,
    index: AtomicU32,
}

#[async_trait]
impl WorkerApi for FakeApi {
    async fn lease(&self, _worker: &str) -> ApiResult<Option<Lease>> {
        self.record(Call::Lease);
        match self.leases.lock().unwrap().pop_front() {
            Some(Answer::Task(id, ttl_ms)) => Ok(Some(lease(id, self.index.fetch_add(1, Ordering::Relaxed), ttl_ms, 3_600_000))),
            Some(Answer::Bounded(id, ttl_ms, max_ms)) => Ok(Some(lease(id, self.index.fetch_add(1, Ordering::Relaxed), ttl_ms, max_ms))),
            Some(Answer::Nothing) => Ok(None),
            Some(Answer::Unavailable) => Err(ApiError::Unavailable("restarting".into())),
            Some(Answer::Refused) => Err(ApiError::Refused("wrong token".into())),
            None => {
                self.shutdown.send_replace(true);
                Ok(None)
            }
        }
    }

    async fn renew(&self, lease_id: &LeaseId) -> ApiResult<LeaseState> {
        self.record(Call::Renew(lease_id.job_id().to_string()));
        self.renewals.lock().unwrap().get_mut(lease_id.job_id().as_str()).and_then(VecDeque::pop_front).unwrap_or(Ok(LeaseState::Held))
    }

    async fn complete(&self, lease_id: &LeaseId) -> ApiResult<LeaseState> {
        self.record(Call::Complete(lease_id.job_id().to_string()));
        self.completions.lock().unwrap().get_mut(lease_id.job_id().as_str()).and_then(VecDeque::pop_front).unwrap_or(Ok(LeaseState::Held))
    }

    async fn fail(&self, lease_id: &LeaseId, failure: Failure) -> ApiResult<LeaseState> {
        self.record(Call::Fail(lease_id.job_id().to_string(), failure));
        Ok(LeaseState::Held)
    }
}

impl FakeApi {
    fn record(&self, call: Call) {
        self.calls.lock().unwrap().push((Instant::now(), call));
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().iter().map(|(_, c)| c.clone()).collect()
    }

    /// When each call equal to `call` was made.
    fn times(&self, call: &Call) -> Vec<Instant> {
        self.calls.lock().unwrap().iter().filter(|(_, c)| c == call).map(|(t, _)| *t).collect()
    }

    fn count(&self, call: &Call) -> usize {
        self.times(call).len()
    }

    fn fails(&self) -> Vec<(String, Failure)> {
        self.calls().into_iter().filter_map(|c| if let Call::Fail(id, f) = c { Some((id, f)) } else { None }).collect()
    }
}

/// A render task's lease; the fakes know it by `id`, its job's id.
fn lease(id: &str, index: u32, ttl_ms: u64, max_ms: u64) -> Lease {
    let work = Work::render("mixed4a", Technique::Channel, [0, 1]);
    let model = ModelRef { uri: "model.pt".into(), name: "model".into(), sha256: "0".repeat(64) };
    let job_id = id.parse().unwrap();
    Lease {
        lease_id: LeaseId::new(&job_id, index, 1, LeaseSecret::random()),
        task: TaskSpec { job_id, index, work },
        attempt: 1,
        ttl_ms,
        max_ms,
        job: JobContext { model, settings: RenderSettings::default(), out: "out".into(), dataset: None, layers: Vec::new() },
    }
}

/// How a fake task's work ends.
#[derive(Default)]
enum Ends {
    /// Everything stored (a map, a reduce).
    #[default]
    Done,
    /// Rendered this many images, which are stored afterwards.
    Rendered(u64),
    Fails(Error),
}

/// What a fake task does, by lease id.
#[derive(Default)]
struct Plan {
    run_for: Duration,
    ends: Ends,
    store_for: Duration,
    store_fails: Option<Error>,
    /// Storing goes on only once this lease's work has started, within 10 s.
    store_awaits_run_of: Option<&'static str>,
    /// The work makes progress for this long, then hangs (a CUDA hang) until cancelled.
    hangs_after: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
enum Event {
    RunStarted(String),
    RunCancelled(String),
    RunEnded(String),
    StoreStarted(String),
    StoreEnded(String),
}

/// Task work that takes its time, counting steps and polling its signals as the real work
/// does, and records what it did.
struct FakeWork {
    plans: Mutex<HashMap<String, Plan>>,
    events: watch::Sender<Vec<Event>>,
}

#[async_trait]
impl TaskWork for FakeWork {
    /// The lease id and the images rendered.
    type Finished = (String, u64);

    async fn run(&self, lease: &Lease, signals: &Arc<TaskSignals>) -> Result<Option<(String, u64)>> {
        let id = lease.lease_id.job_id().to_string();
        let (run_for, ends, hangs_after) =
            self.plans.lock().unwrap().get_mut(&id).map(|p| (p.run_for, std::mem::take(&mut p.ends), p.hangs_after)).unwrap_or_default();
        self.record(Event::RunStarted(id.clone()));
        if let Some(progressing) = hangs_after {
            busy(progressing, signals).await;
            hung(signals).await;
        }
        if !busy(run_for, signals).await {
            self.record(Event::RunCancelled(id));
            return Err(Error::Cancelled);
        }
        self.record(Event::RunEnded(id.clone()));
        match ends {
            Ends::Done => Ok(None),
            Ends::Rendered(images) => Ok(Some((id, images))),
            Ends::Fails(e) => Err(e),
        }
    }

    async fn store(&self, _lease: &Lease, (id, images): (String, u64), signals: &TaskSignals) -> Result<u64> {
        let (store_for, fails, awaits) =
            self.plans.lock().unwrap().get_mut(&id).map(|p| (p.store_for, p.store_fails.take(), p.store_awaits_run_of)).unwrap_or_default();
        self.record(Event::StoreStarted(id.clone()));
        if let Some(next) = awaits {
            let mut events = self.events.subscribe();
            let started = async { events.wait_for(|e| e.contains(&Event::RunStarted(next.into()))).await.map(|_| ()) };
            timeout(Duration::from_secs(10), started)
                .await
                .map_err(|_| Error::Torch(format!("{next}'s work did not start while {id} was stored")))?
                .expect("the events live as long as the work");
        }
        if !busy(store_for, signals).await {
            return Err(Error::Cancelled);
        }
        self.record(Event::StoreEnded(id));
        fails.map_or(Ok(images), Err)
    }
}

impl FakeWork {
    fn record(&self, event: Event) {
        self.events.send_modify(|e| e.push(event));
    }

    fn events(&self) -> Vec<Event> {
        self.events.borrow().clone()
    }

    fn position(&self, event: &Event) -> usize {
        self.events().iter().position(|e| e == event).unwrap_or_else(|| panic!("{event:?} never happened"))
    }
}

/// Waits `d` while making a step every few milliseconds; false when `signals` asked it to
/// stop.
async fn busy(d: Duration, signals: &TaskSignals) -> bool {
    let end = Instant::now() + d;
    loop {
        if signals.step().is_err() {
            return false;
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        tokio::time::sleep(left.min(Duration::from_millis(5))).await;
    }
}

/// Makes no progress, as a hung device does, until `signals` ask it to stop.
async fn hung(signals: &TaskSignals) {
    while !signals.is_cancelled() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Harness {
    api: Arc<FakeApi>,
    work: Arc<FakeWork>,
    metrics: Arc<WorkerMetrics>,
    idle_poll: Duration,
}

impl Harness {
    fn new(leases: Vec<Answer>) -> Harness {
        let api = FakeApi {
            calls: Mutex::default(),
            leases: Mutex::new(leases.into()),
            renewals: Mutex::default(),
            completions: Mutex::default(),
            shutdown: watch::Sender::new(false),
            index: AtomicU32::new(0),
        };
        let work = FakeWork { plans: Mutex::default(), events: watch::Sender::new(Vec::new()) };
        let metrics = Arc::new(WorkerMetrics::new(Device::Cpu));
        Harness { api: Arc::new(api), work: Arc::new(work), metrics, idle_poll: Duration::from_millis(10) }
    }

    fn plan(&self, id: &str, plan: Plan) {
        self.work.plans.lock().unwrap().insert(id.into(), plan);
    }

    fn renewals(&self, id: &str, answers: Vec<ApiResult<LeaseState>>) {
        self.api.renewals.lock().unwrap().insert(id.into(), answers.into());
    }

    fn completions(&self, id: &str, answers: Vec<ApiResult<LeaseState>>) {
        self.api.completions.lock().unwrap().insert(id.into(), answers.into());
    }

    fn spawn(&self) -> JoinHandle<std::result::Result<WorkerStats, ApiError>> {
        let config = WorkerConfig {
            name: "test-worker".into(),
            device: Device::Cpu,
            idle_poll: self.idle_poll,
            model_cache: PathBuf::from("/nonexistent"),
            render: false,
            profile: false,
            metrics: self.metrics.clone(),
        };
        let api: Arc<dyn WorkerApi> = self.api.clone();
        tokio::spawn(Worker::new(api, self.work.clone(), config, self.api.shutdown.subscribe()).run())
    }

    async fn finish(&self, worker: JoinHandle<std::result::Result<WorkerStats, ApiError>>) -> std::result::Result<WorkerStats, ApiError> {
        timeout(LIMIT, worker).await.expect("the worker loop did not end").expect("the worker loop panicked")
    }

    async fn run(&self) -> std::result::Result<WorkerStats, ApiError> {
        self.finish(self.spawn()).await
    }

    /// `loupe_worker_tasks_total` of render tasks with this outcome.
    async fn tasks_ended(&self, outcome: &str) -> u64 {
        let text = self.metrics.metrics().await.into_text();
        let prefix = format!("loupe_worker_tasks_total{{kind=\"render\",outcome=\"{outcome}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |v| v.parse().expect("a count"))
    }
}

fn renew(id: &str) -> Call {
    Call::Renew(id.into())
}

fn complete(id: &str) -> Call {
    Call::Complete(id.into())
}

#[tokio::test]
async fn a_task_longer_than_its_lease_is_renewed_and_completes() {
    let h = Harness::new(vec![Answer::Task("l1", 300)]);
    h.plan("l1", Plan { run_for: Duration::from_millis(1200), ..Plan::default() });
    let stats = h.run().await.expect("the loop ends without error");

    assert_eq!(stats, WorkerStats { tasks_done: 1, images_written: 0 });
    let renewed = h.api.times(&renew("l1"));
    let leased = h.api.times(&Call::Lease)[0];
    let completed = h.api.times(&complete("l1"));
    assert_eq!(completed.len(), 1, "{:?}", h.api.calls());
    // Every third of the 300 ms time to live over 1.2 s: about 11 renewals (at least half
    // of them, whatever the load), none before
    // the first third nor after the completion.
    assert!(renewed.len() >= 6, "renewed {} times", renewed.len());
    assert!(renewed[0] - leased >= Duration::from_millis(80), "first renewal {:?} after leasing", renewed[0] - leased);
    let most = ((completed[0] - leased).as_millis() / 90 + 1) as usize;
    assert!(renewed.len() <= most, "renewed {} times in {:?}", renewed.len(), completed[0] - leased);
    assert!(renewed.iter().all(|t| *t < completed[0]), "{:?}", h.api.calls());
    assert!(h.api.fails().is_empty());
    assert_eq!(h.tasks_ended("done").await, 1);
}

#[tokio::test]
async fn a_lost_or_cancelled_lease_stops_the_work_without_a_report_and_the_loop_goes_on() {
    for state in [LeaseState::Lost, LeaseState::Cancelled] {
        let h = Harness::new(vec![Answer::Task("l1", 300), Answer::Task("l2", 300)]);
        h.plan("l1", Plan { run_for: LIMIT * 2, ..Plan::default() });
        h.renewals("l1", vec![Ok(state)]);
        let stats = h.run().await.expect("the loop ends without error");

        assert!(h.work.events().contains(&Event::RunCancelled("l1".into())), "{state:?}: {:?}", h.work.events());
        assert_eq!(h.api.count(&complete("l1")), 0, "{state:?}: {:?}", h.api.calls());
        assert!(h.api.fails().is_empty(), "{state:?}: {:?}", h.api.calls());
        assert_eq!(h.api.count(&complete("l2")), 1, "{state:?}: {:?}", h.api.calls());
        assert_eq!(stats, WorkerStats { tasks_done: 1, images_written: 0 });
        assert_eq!((h.tasks_ended("released").await, h.tasks_ended("done").await), (1, 1), "{state:?}");
    }
}

#[tokio::test]
async fn a_shutdown_hands_the_running_task_back_and_stops() {
    let h = Harness::new(vec![Answer::Task("l1", 3000), Answer::Task("l2", 3000)]);
    h.plan("l1", Plan { run_for: LIMIT * 2, ..Plan::default() });
    let worker = h.spawn();
    let mut events = h.work.events.subscribe();
    let started = async { events.wait_for(|e| e.contains(&Event::RunStarted("l1".into()))).await.map(|_| ()) };
    timeout(LIMIT, started).await.expect("l1's work started").expect("events");
    h.api.shutdown.send_replace(true);
    let stats = h.finish(worker).await.expect("the loop ends without error");

    assert_eq!(h.api.fails(), vec![("l1".to_string(), Failure { retryable: true, message: "the worker shut down".into(), released: true })]);
    assert_eq!(h.api.count(&Call::Lease), 1, "it stops rather than leasing again: {:?}", h.api.calls());
    assert_eq!(h.api.count(&complete("l1")), 0);
    assert_eq!(stats, WorkerStats::default());
    assert_eq!(h.tasks_ended("released").await, 1);
}

#[tokio::test]
async fn completion_is_retried_with_backoff_while_the_coordinator_is_unavailable() {
    // Once for a task whose work stored everything, once for a rendered one stored after.
    for rendered in [false, true] {
        // With nothing more to lease, the loop waits for the rendered task's report; a
        // shutdown (the fake's, once its leases are spent) would end the retries.
        let h = Harness::new(vec![Answer::Task("l1", 3000), Answer::Nothing]);
        let ends = if rendered { Ends::Rendered(2) } else { Ends::Done };
        h.plan("l1", Plan { ends, ..Plan::default() });
        let unavailable = || Err(ApiError::Unavailable("restarting".into()));
        h.completions("l1", vec![unavailable(), unavailable(), Ok(LeaseState::Held)]);
        let stats = h.run().await.expect("the loop ends without error");

        let completed = h.api.times(&complete("l1"));
        assert_eq!(completed.len(), 3, "rendered {rendered}: {:?}", h.api.calls());
        assert!(completed[1] - completed[0] >= Duration::from_millis(100), "{:?}", completed[1] - completed[0]);
        assert!(completed[2] - completed[1] >= Duration::from_millis(200), "{:?}", completed[2] - completed[1]);
        let images = if rendered { 2 } else { 0 };
        assert_eq!(stats, WorkerStats { tasks_done: 1, images_written: images });
        assert!(h.api.fails().is_empty());
        assert_eq!(h.tasks_ended("done").await, 1);
    }
}

#[tokio::test]
async fn failures_are_reported_retryable_as_the_error_says() {
    let h = Harness::new(vec![Answer::Task("l1", 3000), Answer::Task("l2", 3000), Answer::Task("l3", 3000)]);
    h.plan("l1", Plan { ends: Ends::Fails(Error::Model("not TorchScript".into())), ..Plan::default() });
    h.plan("l2", Plan { ends: Ends::Fails(Error::Torch("kernel failed".into())), ..Plan::default() });
    // Storing a rendered task's images fails retryably, whatever the error.
    h.plan("l3", Plan { ends: Ends::Rendered(1), store_fails: Some(Error::Model("bad key".into())), ..Plan::default() });
    let stats = h.run().await.expect("the loop ends without error");

    let fail = |id: &str, retryable, message: &str| (id.to_string(), Failure::new(retryable, message));
    assert_eq!(h.api.fails(), vec![fail("l1", false, "not TorchScript"), fail("l2", true, "libtorch: kernel failed"), fail("l3", true, "bad key")]);
    assert!(h.api.calls().iter().all(|c| !matches!(c, Call::Complete(_))), "{:?}", h.api.calls());
    assert_eq!(stats, WorkerStats::default());
    assert_eq!(h.tasks_ended("failed").await, 3);
}

#[tokio::test]
async fn the_next_task_renders_while_the_last_is_stored() {
    let h = Harness::new(vec![Answer::Task("l1", 150), Answer::Task("l2", 3000)]);
    // l1's storing waits for l2's work to start: run one after the other, it would fail.
    h.plan("l1", Plan { ends: Ends::Rendered(2), store_for: Duration::from_millis(300), store_awaits_run_of: Some("l2"), ..Plan::default() });
    h.plan("l2", Plan { ends: Ends::Rendered(3), ..Plan::default() });
    let stats = h.run().await.expect("the loop ends without error");

    assert!(h.work.position(&Event::RunStarted("l2".into())) < h.work.position(&Event::StoreEnded("l1".into())), "{:?}", h.work.events());
    assert_eq!((h.api.count(&complete("l1")), h.api.count(&complete("l2"))), (1, 1), "{:?}", h.api.calls());
    assert!(h.api.fails().is_empty(), "{:?}", h.api.calls());
    // l1's work took no time, so it was renewed (every 50 ms) while it was stored.
    assert!(h.api.count(&renew("l1")) >= 2, "{:?}", h.api.calls());
    assert_eq!(stats, WorkerStats { tasks_done: 2, images_written: 5 });
    assert_eq!(h.tasks_ended("done").await, 2);
}

#[tokio::test]
async fn with_nothing_to_lease_the_task_being_stored_is_finished_first() {
    let mut h = Harness::new(vec![Answer::Task("l1", 3000), Answer::Nothing]);
    // A poll far beyond the test's limit: the loop must not wait it out while l1 is stored.
    h.idle_poll = LIMIT * 2;
    h.plan("l1", Plan { ends: Ends::Rendered(1), store_for: Duration::from_millis(200), ..Plan::default() });
    let stats = h.run().await.expect("the loop ends without error");

    assert_eq!(h.api.calls(), vec![Call::Lease, Call::Lease, complete("l1"), Call::Lease]);
    assert_eq!(stats, WorkerStats { tasks_done: 1, images_written: 1 });
}

#[tokio::test]
async fn leasing_backs_off_while_the_coordinator_is_unavailable() {
    let h = Harness::new(vec![Answer::Unavailable, Answer::Unavailable, Answer::Unavailable, Answer::Task("l1", 3000)]);
    let stats = h.run().await.expect("the loop ends without error");

    let leased = h.api.times(&Call::Lease);
    assert_eq!(leased.len(), 5, "{:?}", h.api.calls());
    for (i, least) in [100, 200, 400].into_iter().enumerate() {
        assert!(leased[i + 1] - leased[i] >= Duration::from_millis(least), "wait {i}: {:?}", leased[i + 1] - leased[i]);
    }
    assert_eq!(h.api.count(&complete("l1")), 1);
    assert_eq!(stats, WorkerStats { tasks_done: 1, images_written: 0 });
    assert!(h.metrics.ready().await.is_ok(), "registered once the coordinator answered");
}

#[tokio::test]
async fn a_refusal_ends_the_loop_with_its_error() {
    let h = Harness::new(vec![Answer::Unavailable, Answer::Refused, Answer::Task("l1", 3000)]);
    let result = h.run().await;

    assert!(matches!(&result, Err(ApiError::Refused(m)) if m == "wrong token"), "{result:?}");
    assert_eq!(h.api.calls(), vec![Call::Lease, Call::Lease]);
    assert!(h.work.events().is_empty());
    assert!(h.metrics.ready().await.is_err(), "not registered after the coordinator failed");
}

#[tokio::test]
async fn storing_after_a_long_render_renews_every_third_of_the_ttl() {
    // The render outlasts the 600 ms time to live; storing then takes 1.2 s.
    let h = Harness::new(vec![Answer::Task("l1", 600)]);
    h.plan("l1", Plan { run_for: Duration::from_millis(1000), ends: Ends::Rendered(1), store_for: Duration::from_millis(1200), ..Plan::default() });
    let stats = h.run().await.expect("the loop ends without error");

    assert_eq!(stats, WorkerStats { tasks_done: 1, images_written: 1 });
    let renewed = h.api.times(&renew("l1"));
    let (leased, completed) = (h.api.times(&Call::Lease)[0], h.api.times(&complete("l1"))[0]);
    // Every 200 ms over about 2.2 s: about 11 renewals, not the 50 ms floor's dozens.
    let most = ((completed - leased).as_millis() / 180 + 1) as usize;
    assert!(renewed.len() >= 4 && renewed.len() <= most, "renewed {} times in {:?}", renewed.len(), completed - leased);
    let gaps: Vec<Duration> = renewed.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.iter().all(|g| *g >= Duration::from_millis(150)), "renewal gaps {gaps:?}");
}

/// Waits, up to [`LIMIT`], until `done` holds of the calls so far.
async fn wait_for_calls(api: &FakeApi, what: &str, done: impl Fn(&[Instant]) -> bool, call: &Call) {
    let deadline = Instant::now() + LIMIT;
    while !done(&api.times(call)) {
        assert!(Instant::now() < deadline, "{what} did not happen within {LIMIT:?}: {:?}", api.calls());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_task_that_stops_making_progress_stops_being_renewed() {
    // Steps for 600 ms, then hangs: renewals (every 100 ms) stop once it has made no step
    // for three times to live, and the lease is left to expire.
    let h = Harness::new(vec![Answer::Task("l1", 300)]);
    h.plan("l1", Plan { hangs_after: Some(Duration::from_millis(600)), ..Plan::default() });
    let worker = h.spawn();
    let silent = |t: &[Instant]| t.len() >= 3 && t.last().is_some_and(|last| last.elapsed() >= Duration::from_secs(1));
    wait_for_calls(&h.api, "a second without renewals while the task hangs", silent, &renew("l1")).await;
    let renewed = h.api.count(&renew("l1"));
    h.api.shutdown.send_replace(true);
    h.finish(worker).await.expect("the loop ends without error");

    // 600 ms of steps and the 900 ms stall window, at one renewal per 100 ms.
    assert!(renewed <= 20, "renewed {renewed} times: {:?}", h.api.calls());
    assert!(h.work.events().contains(&Event::RunCancelled("l1".into())), "the shutdown stopped it: {:?}", h.work.events());
    assert_eq!(h.api.count(&complete("l1")), 0);
}

#[tokio::test]
async fn a_task_past_its_maximum_time_is_stopped() {
    let h = Harness::new(vec![Answer::Bounded("l1", 300, 500), Answer::Task("l2", 300)]);
    h.plan("l1", Plan { run_for: LIMIT * 2, ..Plan::default() });
    let stats = h.run().await.expect("the loop ends without error");

    assert!(h.work.events().contains(&Event::RunCancelled("l1".into())), "{:?}", h.work.events());
    assert_eq!(h.api.count(&complete("l1")), 0, "{:?}", h.api.calls());
    assert_eq!(h.api.count(&complete("l2")), 1, "the loop goes on: {:?}", h.api.calls());
    assert_eq!(stats, WorkerStats { tasks_done: 1, images_written: 0 });
}
