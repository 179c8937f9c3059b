//! Monitoring: the Prometheus metrics and readiness that `loupe-coordinator` serves on
//! its metrics port, and the gRPC health of its services.
//!
//! Everything is read from the state store, at most [`SCAN_MAX_AGE`] before the scrape,
//! so with several coordinators on one Redis each reports the cluster's numbers
//! (aggregate with `max`, not `sum`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tonic_health::server::HealthReporter;
use tokio::time::Instant;
use tonic_health::ServingStatus;
use tracing::warn;

use loupe_core::job::JobState;
use loupe_metrics::{Exposition, Kind, Probe};

use crate::state::{StateError, StoreCounters};
use crate::Coordinator;

/// How often the gRPC health of the Jobs and Workers services is brought up to date.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);

/// How long one scan of the state store answers scrapes. A scan reads every job and
/// the whole pending queue, and `/metrics` is not authenticated: without this, each
/// request would cost that scan, and a flood of them would keep the state store busy.
/// With it, any number of scrapes costs one scan per interval; Prometheus scrapes every
/// 15 s or more, so a scrape sees numbers at most this much older than before.
pub const SCAN_MAX_AGE: Duration = Duration::from_secs(5);

pub struct Monitor {
    coordinator: Arc<Coordinator>,
    scan: Cached<Scan>,
}

impl Monitor {
    pub fn new(coordinator: Arc<Coordinator>) -> Self {
        Monitor { coordinator, scan: Cached::new(SCAN_MAX_AGE) }
    }

    async fn scan(&self) -> Result<Scan, StateError> {
        let state = &self.coordinator.state;
        self.scan.get_or_make(async {
            let (jobs, counters) = (state.jobs().await?, state.counters().await?);
            let mut by_state = [0u64; JOB_STATES.len()];
            for job in &jobs {
                by_state[JOB_STATES.iter().position(|s| *s == state_name(&job.state)).expect("every state is listed")] += 1;
            }
            let running = jobs.iter().filter(|j| j.state == JobState::Running);
            let (tasks_total, tasks_done) = running.fold((0u64, 0u64), |(t, d), j| (t + j.tasks_total as u64, d + j.tasks_done as u64));
            Ok(Scan { jobs_by_state: by_state, tasks_total, tasks_done, counters })
        })
        .await
    }
}

/// What a scrape reports from one scan of the state store.
#[derive(Debug, Clone, Copy)]
struct Scan {
    /// Counts in the order of [`JOB_STATES`].
    jobs_by_state: [u64; JOB_STATES.len()],
    /// Over running jobs.
    tasks_total: u64,
    tasks_done: u64,
    counters: StoreCounters,
}

/// A value made at most once per `max_age`, shared by everyone who asks meanwhile.
struct Cached<T> {
    max_age: Duration,
    /// The lock is held while the value is made, so concurrent askers wait for that one
    /// making instead of each starting their own.
    last: tokio::sync::Mutex<Option<(Instant, T)>>,
}

impl<T: Copy> Cached<T> {
    fn new(max_age: Duration) -> Self {
        Cached { max_age, last: tokio::sync::Mutex::new(None) }
    }

    /// The value made less than `max_age` ago, or a new one from `make`. A failure is not
    /// kept: the next asker tries again.
    async fn get_or_make<E>(&self, make: impl Future<Output = Result<T, E>>) -> Result<T, E> {
        let mut last = self.last.lock().await;
        if let Some((made, value)) = *last {
            if made.elapsed() < self.max_age {
                return Ok(value);
            }
        }
        let value = make.await?;
        *last = Some((Instant::now(), value));
        Ok(value)
    }
}

const JOB_STATES: [&str; 5] = ["running", "indexing", "succeeded", "failed", "cancelled"];

fn state_name(s: &JobState) -> &'static str {
    match s {
        JobState::Running => "running",
        JobState::Indexing => "indexing",
        JobState::Succeeded => "succeeded",
        JobState::Failed { .. } => "failed",
        JobState::Cancelled => "cancelled",
    }
}

#[async_trait]
impl Probe for Monitor {
    async fn metrics(&self) -> Exposition {
        let mut e = Exposition::new();
        // The state store's liveness is asked on every scrape (one PING, cheap), so a store
        // that went down is never reported up from an earlier scan.
        let scan = match self.coordinator.state.ping().await {
            Ok(()) => self.scan().await,
            Err(err) => Err(err),
        };
        let scan = match scan {
            Ok(scan) => scan,
            Err(err) => {
                warn!(error = %err, "reading the state store for metrics failed");
                e.single("loupe_state_store_up", Kind::Gauge, "1 when the state store answers.", 0.0);
                return e;
            }
        };
        e.single("loupe_state_store_up", Kind::Gauge, "1 when the state store answers.", 1.0);

        e.family("loupe_jobs", Kind::Gauge, "Jobs by state.");
        for (name, n) in JOB_STATES.iter().zip(scan.jobs_by_state) {
            e.sample("loupe_jobs", &[("state", name)], n as f64);
        }

        // Over running jobs: `waiting` are tasks behind a prerequisite (a reduce behind
        // its maps); what is neither done, queued nor leased.
        let counters = scan.counters;
        let waiting = scan.tasks_total.saturating_sub(scan.tasks_done + counters.queued + counters.leased);
        e.family("loupe_tasks", Kind::Gauge, "Tasks of running jobs by state (queued is the queue depth workers drain).");
        for (name, n) in [("waiting", waiting), ("queued", counters.queued), ("leased", counters.leased), ("done", scan.tasks_done)] {
            e.sample("loupe_tasks", &[("state", name)], n as f64);
        }

        e.single("loupe_lease_expiries_total", Kind::Counter, "Leases that ran out without being renewed.", counters.lease_expiries as f64);
        e.single("loupe_task_retries_total", Kind::Counter, "Tasks put back in line after an expired lease or a retryable failure.", counters.retries as f64);
        e.single("loupe_task_failures_total", Kind::Counter, "Failures reported by workers, retryable or not.", counters.failures as f64);
        e.single("loupe_units_rendered_total", Kind::Counter, "Images (unit x technique) of completed render tasks; rate() gives units per second.", counters.images_rendered as f64);
        e
    }

    async fn ready(&self) -> Result<(), String> {
        self.coordinator.state.ping().await.map_err(|e| e.to_string())
    }
}

/// Keeps the gRPC health of `loupe.v1.Jobs` and `loupe.v1.Workers` at SERVING while the
/// state store answers and NOT_SERVING while it does not (readiness probes ask for them);
/// the overall service `""` stays SERVING while the process runs (liveness).
pub async fn keep_health(coordinator: Arc<Coordinator>, reporter: HealthReporter) {
    let mut last = None;
    loop {
        let up = coordinator.state.ping().await;
        if last != Some(up.is_ok()) {
            if let Err(e) = &up {
                warn!(error = %e, "the state store does not answer: not ready");
            }
            set_health(&reporter, if up.is_ok() { ServingStatus::Serving } else { ServingStatus::NotServing }).await;
            last = Some(up.is_ok());
        }
        tokio::time::sleep(HEALTH_INTERVAL).await;
    }
}

/// Sets the gRPC health of both services that depend on the state store.
pub async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    use loupe_proto::v1::{jobs_server::JobsServer, workers_server::WorkersServer};
    reporter.set_service_status(<JobsServer<crate::server::JobsApi> as tonic::server::NamedService>::NAME, status).await;
    reporter.set_service_status(<WorkersServer<crate::server::WorkersApi> as tonic::server::NamedService>::NAME, status).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::RedisStateStore;
    use crate::{server, CoordinatorConfig};
    use loupe_testsupport::RedisServer;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    async fn health(port: u16, service: &str) -> ServingStatus {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect().await.unwrap();
        let mut client = HealthClient::new(channel);
        let r = client.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        ServingStatus::try_from(r.status).unwrap()
    }

    /// Waits (polling, within a deadline) until `service` reports `want`. The deadline is
    /// generous: a loaded machine may take several health intervals, and a Redis that was
    /// just killed can take its client's timeouts to be noticed.
    async fn until(port: u16, service: &str, want: ServingStatus) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while health(port, service).await != want {
            assert!(tokio::time::Instant::now() < deadline, "{service} never became {want:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A flood of scrapes costs one scan per [`SCAN_MAX_AGE`]: concurrent askers share the
    /// scan in progress, later ones its result until it is too old; a failed scan is not
    /// kept.
    #[tokio::test(start_paused = true)]
    async fn concurrent_and_repeated_askers_share_one_making_per_interval() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let cached = Arc::new(Cached::<u64>::new(SCAN_MAX_AGE));
        let made = Arc::new(AtomicU64::new(0));
        let ask = |cached: Arc<Cached<u64>>, made: Arc<AtomicU64>| async move {
            cached
                .get_or_make(async {
                    // A scan that takes a while, so that the askers overlap it.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Ok::<_, ()>(made.fetch_add(1, Ordering::SeqCst) + 1)
                })
                .await
                .unwrap()
        };
        let flood: Vec<_> = (0..100).map(|_| tokio::spawn(ask(cached.clone(), made.clone()))).collect();
        for asker in flood {
            assert_eq!(asker.await.unwrap(), 1, "every concurrent asker gets the one scan");
        }
        tokio::time::advance(SCAN_MAX_AGE / 2).await;
        assert_eq!(ask(cached.clone(), made.clone()).await, 1, "a young scan is reused");
        tokio::time::advance(SCAN_MAX_AGE).await;
        assert_eq!(ask(cached.clone(), made.clone()).await, 2, "an old scan is made again");
        assert_eq!(made.load(Ordering::SeqCst), 2);

        let failing = Cached::<u64>::new(SCAN_MAX_AGE);
        assert_eq!(failing.get_or_make(async { Err("down") }).await, Err("down"));
        assert_eq!(failing.get_or_make(async { Ok::<_, &str>(7) }).await, Ok(7), "a failure is not kept");
    }

    /// What the chart's gRPC probes ask: `""` for liveness, `loupe.v1.Jobs` for readiness.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_services_are_not_serving_while_redis_is_down_and_the_process_stays_live() {
        let redis = RedisServer::start();
        let state = Arc::new(RedisStateStore::connect(&redis.url()).await.unwrap());
        let coordinator = Arc::new(Coordinator::new(state, CoordinatorConfig::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(server::serve(listener, coordinator, server::ServeOptions::default(), std::future::pending()));
        until(port, "loupe.v1.Jobs", ServingStatus::Serving).await;
        assert_eq!(health(port, "loupe.v1.Workers").await, ServingStatus::Serving);

        let mut redis = tokio::task::spawn_blocking(move || {
            let mut redis = redis;
            redis.kill();
            redis
        })
        .await
        .unwrap();
        until(port, "loupe.v1.Jobs", ServingStatus::NotServing).await;
        assert_eq!(health(port, "loupe.v1.Workers").await, ServingStatus::NotServing);
        assert_eq!(health(port, "").await, ServingStatus::Serving, "liveness does not depend on Redis");

        redis = tokio::task::spawn_blocking(move || {
            redis.start_again();
            redis
        })
        .await
        .unwrap();
        until(port, "loupe.v1.Jobs", ServingStatus::Serving).await;
        drop(redis);
    }
}
