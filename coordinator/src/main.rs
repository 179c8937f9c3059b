//! `loupe-coordinator`: the cluster's coordinator, a gRPC server over a state store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tracing::info;

use loupe_coordinator::state::{MemoryStateStore, RedisStateStore, StateStore};
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
    let state: Arc<dyn StateStore> = if args.state == "memory" {
        Arc::new(MemoryStateStore::new())
    } else if args.state.starts_with("redis://") {
        Arc::new(RedisStateStore::connect(&args.state).await.with_context(|| format!("connecting to {}", args.state))?)
    } else {
        bail!("--state {:?}: use memory or redis://HOST:PORT/DB", args.state);
    };
    let coordinator = Arc::new(Coordinator::new(state, CoordinatorConfig { lease_ttl: args.lease_ttl, max_attempts: args.max_attempts }));
    coordinator.recover().await.context("recovering jobs left by a previous coordinator")?;
    let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    info!(listen = %listener.local_addr()?, state = %args.state.split('@').next_back().unwrap_or(""), auth = token.is_some(), "coordinator serving");
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("installing the SIGTERM handler");
        tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
        info!("shutting down");
    };
    server::serve(listener, coordinator, token, shutdown).await?;
    Ok(())
}
