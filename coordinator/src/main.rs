//! `loupe-coordinator`: the cluster's coordinator, a gRPC server over a state store.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tracing::info;

use loupe_coordinator::state::{MemoryStateStore, RedisStateStore, StateStore};
use loupe_coordinator::monitor::Monitor;
use loupe_coordinator::{server, Coordinator, CoordinatorConfig};

#[derive(Parser)]
#[command(name = "loupe-coordinator", version, about = "Shards atlas jobs into tasks and leases them to workers")]
struct Args {
    /// Address to serve gRPC on.
    #[arg(long, env = "LOUPE_LISTEN", default_value = "0.0.0.0:7600")]
    listen: SocketAddr,
    /// `memory` (lost on restart) or `redis://HOST:PORT/DB`.
    #[arg(long, env = "LOUPE_STATE", default_value = "memory")]
    state: String,
    /// A lease not renewed within this time goes to another worker.
    #[arg(long, env = "LOUPE_LEASE_TTL", default_value = "60s", value_parser = humantime::parse_duration)]
    lease_ttl: Duration,
    /// Attempts per task (expired leases and retryable failures).
    #[arg(long, env = "LOUPE_MAX_ATTEMPTS", default_value_t = 3)]
    max_attempts: u32,
    /// File holding the bearer token every RPC must carry.
    #[arg(long, env = "LOUPE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Serve gRPC over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "LOUPE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "LOUPE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Address of the HTTP endpoints /metrics (Prometheus), /healthz and /readyz (workers
    /// default to port 9601, so both run on one machine).
    #[arg(long, env = "LOUPE_METRICS_LISTEN", default_value_t = SocketAddr::from(([0, 0, 0, 0], loupe_metrics::COORDINATOR_PORT)))]
    metrics_listen: SocketAddr,
    /// Refuse jobs whose atlas is not under this URI (e.g. s3://bucket/atlases): the
    /// cluster's workers can write only there.
    #[arg(long, env = "LOUPE_OUT_PREFIX")]
    out_prefix: Option<String>,
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("reading the {what} {}", path.display()))?;
    if !pem.starts_with(b"-----BEGIN") && !String::from_utf8_lossy(&pem).contains("-----BEGIN") {
        bail!("the {what} {} is not PEM (no -----BEGIN line)", path.display());
    }
    Ok(pem)
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LOUPE_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.max_attempts == 0 {
        bail!("--max-attempts must be at least 1");
    }
    let token = args.token_file.as_deref().map(loupe_core::read_token_file).transpose()?;
    // tonic's TLS server needs a process-wide rustls provider. Only ring is linked, which
    // rustls would pick by itself; choosing it here keeps that true if a dependency ever
    // turns on a second provider (then neither would be the default).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tonic::transport::Identity::from_pem(read_pem(cert, "TLS certificate")?, read_pem(key, "TLS key")?)),
        _ => None,
    };
    let state: Arc<dyn StateStore> = if args.state == "memory" {
        Arc::new(MemoryStateStore::new())
    } else if args.state.starts_with("redis://") {
        Arc::new(RedisStateStore::connect(&args.state).await.with_context(|| format!("connecting to {}", args.state))?)
    } else {
        bail!("--state {:?}: use memory or redis://HOST:PORT/DB", args.state);
    };
    let coordinator = Arc::new(Coordinator::new(state, CoordinatorConfig { lease_ttl: args.lease_ttl, max_attempts: args.max_attempts, out_prefix: args.out_prefix }));
    coordinator.recover().await.context("recovering jobs left by a previous coordinator")?;
    let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let metrics = tokio::net::TcpListener::bind(args.metrics_listen).await.with_context(|| format!("listening on {} (--metrics-listen)", args.metrics_listen))?;
    info!(
        listen = %listener.local_addr()?, metrics = %metrics.local_addr()?,
        state = %args.state.split('@').next_back().unwrap_or(""), auth = token.is_some(), tls = tls.is_some(),
        "coordinator serving"
    );
    tokio::spawn(loupe_metrics::serve(metrics, Arc::new(Monitor(coordinator.clone())), std::future::pending()));
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("installing the SIGTERM handler");
        tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
        info!("shutting down");
    };
    server::serve(listener, coordinator, server::ServeOptions { token, tls }, shutdown).await?;
    Ok(())
}
