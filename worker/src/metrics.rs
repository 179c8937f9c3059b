//! What a worker tells Prometheus (`/metrics` on `--metrics-listen`) and its readiness
//! probe (`/readyz`): whether the coordinator answers it, its tasks by kind and outcome,
//! the units it rendered, how fast the last render task went, and the device it uses.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use loupe_metrics::{Exposition, Kind, Probe};

/// How a task left this worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TaskOutcome {
    /// Its outputs stored and reported complete.
    Done,
    /// Reported failed (the coordinator decides whether it is retried).
    Failed,
    /// Given back unfinished: the worker shut down, or the lease ended (job cancelled,
    /// lease lost).
    Released,
}

impl TaskOutcome {
    fn as_str(self) -> &'static str {
        match self {
            TaskOutcome::Done => "done",
            TaskOutcome::Failed => "failed",
            TaskOutcome::Released => "released",
        }
    }
}

#[derive(Debug)]
pub struct WorkerMetrics {
    /// `cpu` or `cuda:N`.
    device: String,
    /// The GPU's model name, or `cpu`.
    gpu: String,
    /// True while the coordinator answers this worker's lease calls.
    registered: AtomicBool,
    tasks: Mutex<BTreeMap<(&'static str, TaskOutcome), u64>>,
    units_rendered: AtomicU64,
    /// f64 bits: units per second and mean step seconds of the last render task.
    units_per_second: AtomicU64,
    step_seconds: AtomicU64,
}

impl WorkerMetrics {
    pub fn new(device: tch::Device) -> Self {
        let gpu = match device {
            tch::Device::Cuda(i) => gpu_name(i).unwrap_or_else(|| "unknown".into()),
            _ => "cpu".into(),
        };
        WorkerMetrics {
            device: crate::device::describe(device),
            gpu,
            registered: AtomicBool::new(false),
            tasks: Mutex::default(),
            units_rendered: AtomicU64::new(0),
            units_per_second: AtomicU64::new(0f64.to_bits()),
            step_seconds: AtomicU64::new(0f64.to_bits()),
        }
    }

    pub fn set_registered(&self, registered: bool) {
        self.registered.store(registered, Ordering::Relaxed);
    }

    pub fn task_ended(&self, kind: &'static str, outcome: TaskOutcome, units: u64) {
        *self.tasks.lock().expect("metrics lock").entry((kind, outcome)).or_default() += 1;
        self.units_rendered.fetch_add(units, Ordering::Relaxed);
    }

    /// A render of `units` units, `steps` steps per optimisation, took `elapsed`.
    pub fn rendered(&self, units: usize, steps: u32, elapsed: Duration) {
        let secs = elapsed.as_secs_f64().max(1e-9);
        self.units_per_second.store((units as f64 / secs).to_bits(), Ordering::Relaxed);
        self.step_seconds.store((secs / steps.max(1) as f64).to_bits(), Ordering::Relaxed);
    }
}

#[async_trait]
impl Probe for WorkerMetrics {
    async fn metrics(&self) -> Exposition {
        let mut e = Exposition::new();
        let registered = if self.registered.load(Ordering::Relaxed) { 1.0 } else { 0.0 };
        e.single("loupe_worker_registered", Kind::Gauge, "1 while the coordinator answers this worker.", registered);
        e.family("loupe_worker_tasks_total", Kind::Counter, "Tasks by kind and how they left this worker.");
        for ((kind, outcome), n) in self.tasks.lock().expect("metrics lock").iter() {
            e.sample("loupe_worker_tasks_total", &[("kind", kind), ("outcome", outcome.as_str())], *n as f64);
        }
        let f = |a: &AtomicU64| f64::from_bits(a.load(Ordering::Relaxed));
        e.single("loupe_worker_units_rendered_total", Kind::Counter, "Images (unit x technique) this worker stored and reported.", self.units_rendered.load(Ordering::Relaxed) as f64);
        e.single("loupe_worker_units_per_second", Kind::Gauge, "Units per second of the last render task (render time only).", f(&self.units_per_second));
        e.single("loupe_worker_step_seconds", Kind::Gauge, "Mean wall time of one optimisation step in the last render task (all its batches).", f(&self.step_seconds));
        e.family("loupe_worker_device_info", Kind::Gauge, "The device this worker renders on; gpu is its model name.");
        e.sample("loupe_worker_device_info", &[("device", &self.device), ("gpu", &self.gpu)], 1.0);
        e
    }

    async fn ready(&self) -> Result<(), String> {
        if self.registered.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("the coordinator has not answered this worker".into())
        }
    }
}

/// The model name of the `index`th visible NVIDIA GPU, from the driver's
/// `/proc/driver/nvidia/gpus/*/information`. That directory lists the host's GPUs; when
/// `NVIDIA_VISIBLE_DEVICES` names GPUs by UUID (as the Kubernetes device plugin does),
/// the visible ones are picked out by it, else they are taken in PCI order.
fn gpu_name(index: usize) -> Option<String> {
    // Each directory is named by the GPU's PCI address; sorting them gives PCI order.
    let mut dirs: Vec<std::path::PathBuf> = std::fs::read_dir("/proc/driver/nvidia/gpus").ok()?.filter_map(|d| Some(d.ok()?.path())).collect();
    dirs.sort();
    let mut infos: Vec<String> = dirs.iter().filter_map(|d| std::fs::read_to_string(d.join("information")).ok()).collect();
    let field = |info: &str, name: &str| info.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()));
    if let Ok(visible) = std::env::var("NVIDIA_VISIBLE_DEVICES") {
        let uuids: Vec<&str> = visible.split(',').filter(|v| v.starts_with("GPU-")).collect();
        if !uuids.is_empty() {
            infos.retain(|i| field(i, "GPU UUID:").is_some_and(|u| uuids.contains(&u.as_str())));
        }
    }
    infos.get(index).and_then(|i| field(i, "Model:"))
}
