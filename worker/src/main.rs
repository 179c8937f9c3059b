//! `loupe-worker`: leases tasks from a coordinator and renders them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use tokio::sync::watch;
use tracing::info;

use loupe_worker::client::{channel, BearerToken, GrpcWorkerApi, TlsOptions};
use loupe_worker::metrics::WorkerMetrics;
use loupe_worker::device::{describe, parse_device};
use loupe_worker::runner::{run_worker, WorkerConfig};

#[derive(Parser)]
#[command(name = "loupe-worker", version, about = "Renders atlas tasks leased from a loupe coordinator")]
struct Args {
    /// The coordinator's gRPC URL, e.g. http://coordinator:7600.
    #[arg(long, env = "LOUPE_COORDINATOR")]
    coordinator: String,
    /// auto, cpu or cuda:N.
    #[arg(long, env = "LOUPE_DEVICE", default_value = "auto")]
    device: String,
    /// File holding the worker token (the coordinator's --worker-token-file); the user
    /// token does not open the Workers service.
    #[arg(long, env = "LOUPE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM bundle of the CAs that sign an https:// coordinator's certificate.
    #[arg(long, env = "LOUPE_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// The name the coordinator's certificate carries, when not the URL's host.
    #[arg(long, env = "LOUPE_TLS_DOMAIN")]
    tls_domain: Option<String>,
    /// Address of the HTTP endpoints /metrics (Prometheus), /healthz and /readyz.
    /// Default: 0.0.0.0:9601, or any free port when another worker on this machine has it.
    #[arg(long, env = "LOUPE_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// This worker's name in the coordinator's messages; default: host name and process id.
    #[arg(long, env = "LOUPE_WORKER_NAME")]
    name: Option<String>,
    /// Where models fetched from object storage are cached, by digest.
    #[arg(long, env = "LOUPE_MODEL_CACHE", default_value = "/tmp/loupe-models")]
    model_cache: PathBuf,
    /// Benchmark aid: lease, write one tiny artifact and complete, without rendering.
    #[arg(long)]
    no_render: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LOUPE_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal: a container's log (kubectl logs, a
        // log collector) would get the escape codes.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let device = parse_device(&args.device)?;
    loupe_worker::tasks::check_model_cache(&args.model_cache)?;
    let token = args.token_file.as_deref().map(loupe_core::read_token_file).transpose()?;
    let token = BearerToken::new(token.as_deref()).map_err(anyhow::Error::msg)?;
    let tls = TlsOptions { ca: args.tls_ca, domain: args.tls_domain };
    let api = Arc::new(GrpcWorkerApi::new(channel(&args.coordinator, &tls).map_err(anyhow::Error::msg)?, token));
    let metrics = Arc::new(WorkerMetrics::new(device));
    let listener = loupe_metrics::bind(args.metrics_listen, loupe_metrics::WORKER_PORT).await.with_context(|| match args.metrics_listen {
        Some(addr) => format!("listening on {addr} (--metrics-listen)"),
        None => "listening for metrics on any port".to_string(),
    })?;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "worker".into());
    let name = args.name.unwrap_or_else(|| format!("{host}-{}", std::process::id()));
    info!(worker = %name, device = %describe(device), coordinator = %args.coordinator, metrics = %listener.local_addr()?, render = !args.no_render, "worker starting");
    tokio::spawn(loupe_metrics::serve(listener, metrics.clone(), std::future::pending()));

    let (stop, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutting down: the task in hand is handed back");
        let _ = stop.send(true);
    });
    let config = WorkerConfig { name, device, idle_poll: Duration::from_millis(200), model_cache: args.model_cache, render: !args.no_render, profile: false, metrics };
    let stats = run_worker(api, config, stop_rx).await.context("the coordinator refused this worker")?;
    info!(tasks = stats.tasks_done, images = stats.images_written, "worker stopped");
    Ok(())
}

/// Ctrl-C or SIGTERM (what Kubernetes sends).
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
}
