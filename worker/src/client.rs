//! The coordinator over gRPC, as the worker loop's [`WorkerApi`]. The channel connects
//! lazily and reconnects by itself, so a restarted coordinator is found again. The CLI's
//! job commands use the same [`channel`] and [`BearerToken`]. Every call has a deadline
//! and the channel HTTP/2 keepalive, so a half-open connection (a coordinator's machine
//! gone, a dropped NAT entry) is an error in seconds rather than a stalled worker.

use async_trait::async_trait;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

use loupe_core::api::{ApiError, ApiResult, WorkerApi};
use loupe_core::task::{Failure, Lease, LeaseId, LeaseState};
use loupe_proto::v1::workers_client::WorkersClient;
use loupe_proto::{lease_state_from_i32, v1, MAX_MESSAGE_BYTES, PROTOCOL_VERSION};

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl BearerToken {
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        token
            .map(|t| format!("Bearer {t}").parse().map_err(|_| "the token has characters a header cannot carry".to_string()))
            .transpose()
            .map(BearerToken)
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// TLS settings for an `https://` coordinator URL.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// A PEM bundle of the CAs to trust (a cluster's own CA); without it, the system's.
    pub ca: Option<PathBuf>,
    /// The name the coordinator's certificate must carry, when not the URL's host (a
    /// port-forward to `localhost`, say).
    pub domain: Option<String>,
}

/// A lazily connecting channel to the coordinator at `url`: `http://` is plaintext,
/// `https://` is TLS (rustls) with `tls`.
pub fn channel(url: &str, tls: &TlsOptions) -> Result<Channel, String> {
    let mut endpoint = Endpoint::from_shared(url.to_string()).map_err(|e| format!("coordinator URL {url:?}: {e}"))?;
    if url.starts_with("https://") {
        let mut config = ClientTlsConfig::new();
        config = match &tls.ca {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| format!("reading the TLS CA bundle {}: {e}", path.display()))?;
                if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE") {
                    return Err(format!("the TLS CA bundle {} holds no PEM certificate", path.display()));
                }
                config.ca_certificate(Certificate::from_pem(pem))
            }
            None => config.with_native_roots(),
        };
        if let Some(domain) = &tls.domain {
            config = config.domain_name(domain.clone());
        }
        endpoint = endpoint.tls_config(config).map_err(|e| format!("TLS for {url}: {e}"))?;
    } else if tls.ca.is_some() || tls.domain.is_some() {
        return Err(format!("--tls-ca and --tls-domain need an https:// coordinator URL, not {url:?}"));
    }
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect_lazy())
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an HTTP/2 PING checks the connection, and how long its answer may take
/// before the connection is dropped (and made again by the next call).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long leasing, completing and failing may take.
const CALL_DEADLINE: Duration = Duration::from_secs(30);
/// How long a renewal may take: well under a lease's time to live (60 s by default), so
/// that the next renewal can still save the lease. The worker loop also bounds each
/// renewal by a third of the lease's time to live.
const RENEW_DEADLINE: Duration = Duration::from_secs(10);

pub struct GrpcWorkerApi {
    client: WorkersClient<InterceptedService<Channel, BearerToken>>,
    call_deadline: Duration,
    renew_deadline: Duration,
}

impl GrpcWorkerApi {
    pub fn new(channel: Channel, token: BearerToken) -> Self {
        // A lease of a long shard's map task exceeds tonic's default 4 MiB.
        let client = WorkersClient::with_interceptor(channel, token).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES);
        GrpcWorkerApi { client, call_deadline: CALL_DEADLINE, renew_deadline: RENEW_DEADLINE }
    }
}

/// `message` as a request that fails (`Cancelled: Timeout expired`) when no answer came
/// within `deadline`; the coordinator reads the deadline too (`grpc-timeout`).
fn request<T>(message: T, deadline: Duration) -> Request<T> {
    let mut r = Request::new(message);
    r.set_timeout(deadline);
    r
}

fn api_error(s: Status) -> ApiError {
    match s.code() {
        Code::FailedPrecondition | Code::Unauthenticated | Code::PermissionDenied => ApiError::Refused(s.message().to_string()),
        _ => ApiError::Unavailable(format!("{:?}: {}", s.code(), s.message())),
    }
}

fn state(r: v1::LeaseStateResponse) -> ApiResult<LeaseState> {
    lease_state_from_i32(r.state).map_err(|e| ApiError::Unavailable(e.to_string()))
}

#[async_trait]
impl WorkerApi for GrpcWorkerApi {
    async fn lease(&self, worker: &str) -> ApiResult<Option<Lease>> {
        let req = v1::LeaseRequest { protocol_version: PROTOCOL_VERSION, worker: worker.to_string() };
        let resp = self.client.clone().lease(request(req, self.call_deadline)).await.map_err(api_error)?.into_inner();
        resp.lease.map(Lease::try_from).transpose().map_err(|e| ApiError::Unavailable(format!("a malformed lease: {e}")))
    }

    async fn renew(&self, lease_id: &LeaseId) -> ApiResult<LeaseState> {
        let req = v1::LeaseRef { protocol_version: PROTOCOL_VERSION, lease_id: lease_id.to_string() };
        state(self.client.clone().renew(request(req, self.renew_deadline)).await.map_err(api_error)?.into_inner())
    }

    async fn complete(&self, lease_id: &LeaseId) -> ApiResult<LeaseState> {
        let req = v1::LeaseRef { protocol_version: PROTOCOL_VERSION, lease_id: lease_id.to_string() };
        state(self.client.clone().complete(request(req, self.call_deadline)).await.map_err(api_error)?.into_inner())
    }

    async fn fail(&self, lease_id: &LeaseId, failure: Failure) -> ApiResult<LeaseState> {
        let req = v1::FailRequest { protocol_version: PROTOCOL_VERSION, lease_id: lease_id.to_string(), retryable: failure.retryable, message: failure.message, released: failure.released };
        state(self.client.clone().fail(request(req, self.call_deadline)).await.map_err(api_error)?.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loupe_core::task::LeaseSecret;

    /// A coordinator whose connection is half-open: it accepts and never answers.
    #[tokio::test]
    async fn a_renewal_against_a_silent_coordinator_fails_within_its_deadline() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let black_hole = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let mut api = GrpcWorkerApi::new(channel(&url, &TlsOptions::default()).unwrap(), BearerToken::new(None).unwrap());
        api.renew_deadline = Duration::from_millis(500);
        let lease_id = LeaseId::new(&"job-1".parse().unwrap(), 0, 1, LeaseSecret::random());

        let started = tokio::time::Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(30), api.renew(&lease_id)).await.expect("the renewal hung past 30 s");
        assert!(matches!(&answer, Err(ApiError::Unavailable(m)) if m.contains("Timeout")), "{answer:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "it took {:?}", started.elapsed());
        black_hole.abort();
    }
}
