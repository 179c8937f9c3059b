//! The gRPC face of the coordinator: the Jobs service for people and tools, the Workers
//! service for workers, the standard health service, and bearer-token auth.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use loupe_core::job::JobId;
use loupe_core::spec::JobSpec;
use loupe_core::task::Failure;
use loupe_proto::v1::jobs_server::{Jobs, JobsServer};
use loupe_proto::v1::workers_server::{Workers, WorkersServer};
use loupe_proto::{v1, Message, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};

use crate::state::{JobCursor, JobsPage, StateError};
use crate::{Coordinator, Error};

/// How often a watch stream looks for progress to send.
const WATCH_POLL: Duration = Duration::from_millis(200);
/// Jobs per List page when the request names no size, and the most it may ask for.
const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 1_000;
/// How often the coordinator removes the jobs that ended longer ago than the retention.
const EXPIRY_INTERVAL: Duration = Duration::from_secs(60);

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match &e {
            Error::Invalid(_) | Error::Model(_) | Error::Dataset(_) => Status::invalid_argument(e.to_string()),
            Error::Conflict(_) => Status::failed_precondition(e.to_string()),
            Error::State(StateError::NoSuchJob(_)) => Status::not_found(e.to_string()),
            Error::State(StateError::Backend(_)) => Status::unavailable(e.to_string()),
            Error::State(StateError::InvalidTasks(_)) => Status::internal(e.to_string()),
        }
    }
}

fn state_status(e: StateError) -> Status {
    Error::State(e).into()
}

fn check_version(v: u32) -> Result<(), Status> {
    if v != PROTOCOL_VERSION {
        return Err(Status::failed_precondition(format!(
            "worker speaks protocol version {v}, this coordinator speaks {PROTOCOL_VERSION}; run matching versions"
        )));
    }
    Ok(())
}

pub struct JobsApi(pub Arc<Coordinator>);

#[tonic::async_trait]
impl Jobs for JobsApi {
    async fn submit(&self, req: Request<v1::SubmitRequest>) -> Result<Response<v1::SubmitResponse>, Status> {
        let spec = req.into_inner().spec.ok_or_else(|| Status::invalid_argument("spec is missing"))?;
        let spec = JobSpec::try_from(spec).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let job_id = self.0.submit(spec).await?;
        Ok(Response::new(v1::SubmitResponse { job_id: job_id.into() }))
    }

    async fn get(&self, req: Request<v1::GetJobRequest>) -> Result<Response<v1::JobStatus>, Status> {
        let status = self.0.status(&parse_id(&req.into_inner().job_id)?).await?;
        Ok(Response::new((&status).into()))
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::JobStatus, Status>> + Send>>;

    async fn watch(&self, req: Request<v1::GetJobRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let job_id: JobId = parse_id(&req.into_inner().job_id)?;
        let first = self.0.status(&job_id).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let coordinator = self.0.clone();
        tokio::spawn(async move {
            let mut last = None;
            let mut status = Ok(first);
            loop {
                let s = match status {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                let key = (s.state.clone(), s.images_done, s.tasks_done);
                if last.as_ref() != Some(&key) {
                    // A client that went away fails the send; stop watching for it.
                    if tx.send(Ok(v1::JobStatus::from(&s))).await.is_err() {
                        return;
                    }
                    last = Some(key);
                }
                if s.state.is_terminal() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(WATCH_POLL) => {}
                    _ = tx.closed() => return,
                }
                status = coordinator.status(&job_id).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list(&self, req: Request<v1::ListJobsRequest>) -> Result<Response<v1::ListJobsResponse>, Status> {
        let req = req.into_inner();
        let limit = match req.page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let before = parse_page_token(&req.page_token)?;
        Ok(Response::new(list_response(self.0.jobs_page(before, limit).await?)))
    }

    async fn cancel(&self, req: Request<v1::CancelJobRequest>) -> Result<Response<v1::CancelJobResponse>, Status> {
        let job_id: JobId = parse_id(&req.into_inner().job_id)?;
        let cancelled = self.0.cancel(&job_id).await?;
        info!(job_id = job_id.as_str(), cancelled, "cancel requested");
        Ok(Response::new(v1::CancelJobResponse { cancelled }))
    }
}

pub struct WorkersApi(pub Arc<Coordinator>);

fn lease_state(s: loupe_core::task::LeaseState) -> Response<v1::LeaseStateResponse> {
    Response::new(v1::LeaseStateResponse { state: v1::LeaseState::from(s) as i32 })
}

#[tonic::async_trait]
impl Workers for WorkersApi {
    async fn lease(&self, req: Request<v1::LeaseRequest>) -> Result<Response<v1::LeaseResponse>, Status> {
        let req = req.into_inner();
        check_version(req.protocol_version)?;
        let lease = self.0.lease_for(&req.worker).await.map_err(state_status)?;
        Ok(Response::new(v1::LeaseResponse { lease: lease.as_ref().map(Into::into) }))
    }

    async fn renew(&self, req: Request<v1::LeaseRef>) -> Result<Response<v1::LeaseStateResponse>, Status> {
        let req = req.into_inner();
        check_version(req.protocol_version)?;
        Ok(lease_state(self.0.renew_lease(&parse_id(&req.lease_id)?).await.map_err(state_status)?))
    }

    async fn complete(&self, req: Request<v1::LeaseRef>) -> Result<Response<v1::LeaseStateResponse>, Status> {
        let req = req.into_inner();
        check_version(req.protocol_version)?;
        Ok(lease_state(self.0.complete_lease(&parse_id(&req.lease_id)?).await?))
    }

    async fn fail(&self, req: Request<v1::FailRequest>) -> Result<Response<v1::LeaseStateResponse>, Status> {
        let req = req.into_inner();
        check_version(req.protocol_version)?;
        let failure = Failure { retryable: req.retryable, message: req.message, released: req.released };
        Ok(lease_state(self.0.fail_lease(&parse_id(&req.lease_id)?, failure).await.map_err(state_status)?))
    }
}

/// A page token is the cursor of the last job of the previous page, as decimal digits.
fn parse_page_token(token: &str) -> Result<Option<JobCursor>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let cursor = token.parse().map_err(|_| Status::invalid_argument("page_token is not a next_page_token this coordinator gave"))?;
    Ok(Some(JobCursor(cursor)))
}

/// A page as the wire carries it. One that would exceed the message limit (jobs with
/// large specs) ends early, and its token resumes after the last job it holds.
fn list_response(page: JobsPage) -> v1::ListJobsResponse {
    // Room for the token, and each job's field tag and length.
    let room = MAX_MESSAGE_BYTES - 64;
    let mut response = v1::ListJobsResponse::default();
    let mut len = 0;
    let mut next = page.next;
    let mut last = None;
    for (cursor, job) in &page.jobs {
        let job = v1::JobStatus::from(job);
        len += job.encoded_len() + 8;
        if len > room && last.is_some() {
            next = last;
            break;
        }
        response.jobs.push(job);
        last = Some(*cursor);
    }
    response.next_page_token = next.map(|c| c.0.to_string()).unwrap_or_default();
    response
}

/// A job or lease id from the wire; a malformed one is refused here, naming the problem.
fn parse_id<T: std::str::FromStr<Err = loupe_core::Error>>(id: &str) -> Result<T, Status> {
    id.parse().map_err(|e: loupe_core::Error| Status::invalid_argument(e.to_string()))
}

/// Checks `authorization: Bearer <token>` on every call of one service against that
/// service's credential: the user token for Jobs, the worker token for Workers, so that
/// neither opens the other. The token is compared in constant time and never logged.
#[derive(Clone)]
pub struct BearerAuth {
    expected: Option<Arc<str>>,
    /// Which token the service takes, for the refusal: `user` or `worker`.
    credential: &'static str,
}

impl BearerAuth {
    pub fn new(credential: &'static str, token: Option<String>) -> Self {
        BearerAuth { expected: token.map(Into::into), credential }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else { return Ok(req) };
        let given = req.metadata().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(t) if constant_time_eq(t.as_bytes(), expected.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated(format!("wrong bearer token: this service takes the {} token", self.credential))),
            None => Err(Status::unauthenticated(format!("a bearer token is required: this service takes the {} token", self.credential))),
        }
    }
}

/// How the gRPC server is reached: the bearer token each service's calls must carry (the
/// user token for Jobs, the worker token for Workers; none: that service is open), and
/// the TLS identity (certificate chain and key, PEM) when it serves TLS.
#[derive(Default)]
pub struct ServeOptions {
    pub user_token: Option<String>,
    pub worker_token: Option<String>,
    pub tls: Option<tonic::transport::Identity>,
}

/// Serves the coordinator on `listener` until `shutdown` resolves. The health service
/// answers without a token, so that Kubernetes probes can use it; the Jobs and Workers
/// services are reported SERVING only while the state store answers
/// ([`crate::monitor::keep_health`]).
pub async fn serve(
    listener: TcpListener,
    coordinator: Arc<Coordinator>,
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    // Registered before the first request can arrive: until the state store has
    // answered, a readiness probe reads NOT_SERVING, not "service not registered".
    crate::monitor::set_health(&health, tonic_health::ServingStatus::NotServing).await;
    let health_task = tokio::spawn(crate::monitor::keep_health(coordinator.clone(), health));
    let expiry_task = tokio::spawn(keep_expiring(coordinator.clone()));
    let user_auth = BearerAuth::new("user", options.user_token);
    let worker_auth = BearerAuth::new("worker", options.worker_token);
    // Small request/response RPCs: without TCP_NODELAY, Nagle's algorithm and delayed
    // ACKs add tens of milliseconds to each one.
    let incoming = TcpListenerStream::new(listener).map(|conn| {
        if let Ok(c) = &conn {
            let _ = c.set_nodelay(true);
        }
        conn
    });
    let mut builder = tonic::transport::Server::builder();
    if let Some(identity) = options.tls {
        builder = builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
    }
    // The message size limit, both ways, in place of tonic's 4 MiB.
    let jobs = JobsServer::new(JobsApi(coordinator.clone())).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES);
    let workers = WorkersServer::new(WorkersApi(coordinator)).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES);
    let served = builder
        .add_service(health_service)
        .add_service(InterceptedService::new(jobs, user_auth))
        .add_service(InterceptedService::new(workers, worker_auth))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    health_task.abort();
    expiry_task.abort();
    served
}

/// Removes the jobs that ended longer ago than the retention, every [`EXPIRY_INTERVAL`].
/// Every coordinator of a cluster does; each removal is one transition of the store.
async fn keep_expiring(coordinator: Arc<Coordinator>) {
    loop {
        match coordinator.expire_jobs().await {
            Ok(0) => {}
            Ok(n) => info!(jobs = n, "removed jobs that ended longer ago than the retention"),
            Err(e) => warn!(error = %e, "removing expired jobs failed"),
        }
        tokio::time::sleep(EXPIRY_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn another_protocol_version_is_refused_with_a_clear_status() {
        assert!(check_version(PROTOCOL_VERSION).is_ok());
        let s = check_version(PROTOCOL_VERSION + 1).unwrap_err();
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        assert!(s.message().contains("protocol version"), "{}", s.message());
    }

    #[test]
    fn each_service_takes_only_its_own_token() {
        let with = |v: Option<&str>| {
            let mut r = Request::new(());
            if let Some(v) = v {
                r.metadata_mut().insert("authorization", v.parse().unwrap());
            }
            r
        };
        let mut jobs = BearerAuth::new("user", Some("user-t0k".into()));
        let mut workers = BearerAuth::new("worker", Some("worker-t0k".into()));
        assert!(jobs.call(with(Some("Bearer user-t0k"))).is_ok());
        assert!(workers.call(with(Some("Bearer worker-t0k"))).is_ok());
        for (auth, other, needs) in [(&mut jobs, "Bearer worker-t0k", "user"), (&mut workers, "Bearer user-t0k", "worker")] {
            let refused = auth.call(with(Some(other))).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::Unauthenticated);
            assert!(refused.message().contains(&format!("takes the {needs} token")), "{}", refused.message());
            assert!(!refused.message().contains("t0k"), "the refusal shows no token: {}", refused.message());
            assert_eq!(auth.call(with(Some("Bearer t0x"))).unwrap_err().code(), tonic::Code::Unauthenticated);
            assert_eq!(auth.call(with(None)).unwrap_err().code(), tonic::Code::Unauthenticated);
        }
        assert!(BearerAuth::new("user", None).call(with(None)).is_ok(), "no token configured, no check");
    }

    /// The interceptors as `serve` wires them: through a real server, the user token
    /// lists jobs but cannot lease, and the worker token leases but cannot list.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn through_the_server_each_token_opens_only_its_service() {
        use loupe_proto::v1::jobs_client::JobsClient;
        use loupe_proto::v1::workers_client::WorkersClient;
        let coordinator = Arc::new(Coordinator::new(Arc::new(crate::state::MemoryStateStore::new()), crate::CoordinatorConfig::default()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let options = ServeOptions { user_token: Some("user-t0k".into()), worker_token: Some("worker-t0k".into()), tls: None };
        tokio::spawn(serve(listener, coordinator, options, std::future::pending()));
        let channel = tonic::transport::Endpoint::from_shared(url).unwrap().connect_lazy();
        let bearer = |token: &'static str| {
            move |mut req: Request<()>| {
                req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
                Ok(req)
            }
        };
        let lease = || v1::LeaseRequest { protocol_version: PROTOCOL_VERSION, worker: "w".into() };

        assert!(JobsClient::with_interceptor(channel.clone(), bearer("user-t0k")).list(v1::ListJobsRequest::default()).await.is_ok());
        assert!(WorkersClient::with_interceptor(channel.clone(), bearer("worker-t0k")).lease(lease()).await.is_ok());
        let refused = JobsClient::with_interceptor(channel.clone(), bearer("worker-t0k")).list(v1::ListJobsRequest::default()).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        let refused = WorkersClient::with_interceptor(channel, bearer("user-t0k")).lease(lease()).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        assert!(refused.message().contains("takes the worker token"), "{}", refused.message());
    }
}

/// Message sizes and List paging, through a real server on loopback.
#[cfg(test)]
mod wire_tests {
    use super::*;
    use loupe_core::spec::DatasetSpec;
    use loupe_core::task::{Lease, ShardSource, Work};
    use loupe_proto::v1::jobs_client::JobsClient;
    use loupe_proto::v1::workers_client::WorkersClient;
    use tonic::transport::{Channel, Endpoint};

    use crate::state::conformance::{dataset_spec, spec};
    use crate::state::{MemoryStateStore, NewTask, StateStore};
    use crate::CoordinatorConfig;

    /// A coordinator over `state`, served on a loopback port without tokens; a channel to it.
    async fn served(state: Arc<dyn StateStore>) -> Channel {
        let coordinator = Arc::new(Coordinator::new(state, CoordinatorConfig::default()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(serve(listener, coordinator, ServeOptions::default(), std::future::pending()));
        Endpoint::from_shared(url).unwrap().connect_lazy()
    }

    fn lease_request() -> v1::LeaseRequest {
        v1::LeaseRequest { protocol_version: PROTOCOL_VERSION, worker: "w".into() }
    }

    /// A map of the most images a shard may hold, with keys of 200 bytes: 20 MB, five
    /// times tonic's default limit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_map_task_of_100000_long_keys_is_leased_and_decoded_through_grpc() {
        let state = Arc::new(MemoryStateStore::new());
        let keys: Vec<String> = (0..DatasetSpec::MAX_IMAGES_PER_SHARD).map(|i| format!("{i:0>196}.jpg")).collect();
        let map = Work::Map { shard: 0, source: ShardSource::Images { keys } };
        state.create_job(dataset_spec(), vec![NewTask::runnable(map.clone())], 0, 0).await.unwrap();
        let channel = served(state).await;

        // Sized as the worker's client is (worker/src/client.rs).
        let mut worker = WorkersClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES);
        let lease = worker.lease(lease_request()).await.unwrap().into_inner().lease.expect("the map is leased");
        let lease = Lease::try_from(lease).unwrap();
        assert_eq!(lease.task.work, map);

        // Handed back, it is leased again to a client with tonic's default limit, which
        // cannot receive it: what every worker saw before the limit was set.
        let release = v1::FailRequest { protocol_version: PROTOCOL_VERSION, lease_id: lease.lease_id.to_string(), retryable: true, message: "stopping".into(), released: true };
        worker.fail(release).await.unwrap();
        let refused = WorkersClient::new(channel).lease(lease_request()).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
        assert!(refused.message().contains("decoded message length too large"), "{}", refused.message());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_over_the_message_limit_is_refused_and_the_server_goes_on() {
        let channel = served(Arc::new(MemoryStateStore::new())).await;
        let mut huge = v1::JobSpec::from(&spec());
        huge.out = "x".repeat(MAX_MESSAGE_BYTES);
        let submit = || v1::SubmitRequest { spec: Some(huge.clone()) };

        // tonic sends a message of any size by default; the server refuses it unread. (A
        // client with an encoding limit fails the call itself, as an h2 reset that names
        // nothing, so the CLI measures a request first: loupe_proto::check_size.)
        let mut client = JobsClient::new(channel);
        for _ in 0..3 {
            let refused = client.submit(submit()).await.unwrap_err();
            assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
            assert!(refused.message().contains(&format!("the limit is: {MAX_MESSAGE_BYTES} bytes")), "{}", refused.message());
        }
        assert!(client.list(v1::ListJobsRequest::default()).await.unwrap().into_inner().jobs.is_empty(), "still serving");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn list_pages_newest_first_and_refuses_a_token_it_did_not_give() {
        let state = Arc::new(MemoryStateStore::new());
        let mut ids = Vec::new();
        for t in 0..5 {
            ids.push(state.create_job(spec(), vec![], 0, t).await.unwrap().to_string());
        }
        let jobs = JobsClient::new(served(state).await);
        let list = |page_size, page_token: String| {
            let req = v1::ListJobsRequest { page_size, page_token };
            let mut jobs = jobs.clone();
            async move { jobs.list(req).await.map(|r| r.into_inner()) }
        };
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = list(2, token).await.unwrap();
            assert!(page.jobs.len() <= 2);
            seen.extend(page.jobs.into_iter().map(|j| j.job_id));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        ids.reverse();
        assert_eq!(seen, ids, "every job once, newest first");
        let all = list(0, String::new()).await.unwrap();
        assert_eq!((all.jobs.len(), all.next_page_token.as_str()), (5, ""), "page size 0 is the default of 100");
        let bad = list(2, "job-3".into()).await.unwrap_err();
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        assert!(bad.message().contains("page_token"), "{}", bad.message());
    }

    /// Jobs whose specs are large: a page ends before it would exceed the message limit,
    /// and its token resumes after the last job it holds.
    #[tokio::test]
    async fn a_page_of_large_jobs_ends_within_the_message_limit() {
        let state = MemoryStateStore::new();
        let out = "o".repeat(MAX_MESSAGE_BYTES / 3);
        for t in 0..4 {
            state.create_job(JobSpec { out: out.clone(), ..spec() }, vec![], 0, t).await.unwrap();
        }
        let page = state.jobs_page(None, 10).await.unwrap();
        let newest_two = (page.jobs[1].0).0;
        let response = list_response(page);
        assert_eq!(response.jobs.len(), 2);
        assert!(response.encoded_len() <= MAX_MESSAGE_BYTES);
        assert_eq!(response.next_page_token, newest_two.to_string());
    }
}
