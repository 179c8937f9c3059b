//! The coordinator over gRPC, as the worker loop's [`WorkerApi`]. The channel connects
//! lazily and reconnects by itself, so a restarted coordinator is found again. The CLI's
//! job commands use the same [`channel`] and [`BearerToken`].

use async_trait::async_trait;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use std::path::PathBuf;

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
    Ok(endpoint.connect_timeout(std::time::Duration::from_secs(5)).connect_lazy())
}

pub struct GrpcWorkerApi {
    client: WorkersClient<InterceptedService<Channel, BearerToken>>,
}

impl GrpcWorkerApi {
    pub fn new(channel: Channel, token: BearerToken) -> Self {
        // A lease of a long shard's map task exceeds tonic's default 4 MiB.
        let client = WorkersClient::with_interceptor(channel, token).max_decoding_message_size(MAX_MESSAGE_BYTES).max_encoding_message_size(MAX_MESSAGE_BYTES);
        GrpcWorkerApi { client }
    }
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
        let resp = self.client.clone().lease(req).await.map_err(api_error)?.into_inner();
        resp.lease.map(Lease::try_from).transpose().map_err(|e| ApiError::Unavailable(format!("a malformed lease: {e}")))
    }

    async fn renew(&self, lease_id: &LeaseId) -> ApiResult<LeaseState> {
        let req = v1::LeaseRef { protocol_version: PROTOCOL_VERSION, lease_id: lease_id.to_string() };
        state(self.client.clone().renew(req).await.map_err(api_error)?.into_inner())
    }

    async fn complete(&self, lease_id: &LeaseId) -> ApiResult<LeaseState> {
        let req = v1::LeaseRef { protocol_version: PROTOCOL_VERSION, lease_id: lease_id.to_string() };
        state(self.client.clone().complete(req).await.map_err(api_error)?.into_inner())
    }

    async fn fail(&self, lease_id: &LeaseId, failure: Failure) -> ApiResult<LeaseState> {
        let req = v1::FailRequest { protocol_version: PROTOCOL_VERSION, lease_id: lease_id.to_string(), retryable: failure.retryable, message: failure.message, released: failure.released };
        state(self.client.clone().fail(req).await.map_err(api_error)?.into_inner())
    }
}
