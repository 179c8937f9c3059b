//! Real services for tests, on loopback ports: `redis-server` and the `s3s-fs` S3 server
//! (installed by `.ci/run`; see the README). Each server is a child process stopped when
//! its handle drops. Waiting is on conditions with a deadline, never a fixed sleep.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("binding a loopback port").local_addr().unwrap().port()
}

/// Polls `cond` every few milliseconds until it holds; panics after `deadline`.
pub fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn port_open(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Finds a program on PATH or in ~/.cargo/bin, with a message that says how to get it.
pub fn program(name: &str, install: &str) -> PathBuf {
    let cargo_bin = std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin").join(name));
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .chain(cargo_bin)
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed; {install} (.ci/run does this)"))
}

/// A redis-server on a loopback port, with its data directory.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    appendonly: bool,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a Redis with no persistence.
    pub fn start() -> RedisServer {
        Self::start_with(false)
    }

    /// Starts a Redis; with `appendonly`, every write is in the AOF before it is
    /// acknowledged, so a restart loses nothing.
    pub fn start_with(appendonly: bool) -> RedisServer {
        let mut server = RedisServer { port: free_port(), dir: tempfile::tempdir().unwrap(), appendonly, child: None };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let exe = program("redis-server", "apt-get install -y redis-server");
        let mut cmd = Command::new(exe);
        cmd.arg("--port").arg(self.port.to_string()).arg("--bind").arg("127.0.0.1").arg("--save").arg("").arg("--dir").arg(self.dir.path());
        if self.appendonly {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("starting redis-server");
        self.child = Some(child);
        let port = self.port;
        wait_for("redis-server to listen", Duration::from_secs(60), || port_open(port));
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Starts a killed server again on the same port and data.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "redis-server is still running");
        self.spawn();
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let port = self.port;
        wait_for("redis-server to stop", Duration::from_secs(60), || !port_open(port));
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An s3s-fs S3 server on a loopback port, serving a temporary directory whose
/// subdirectories are buckets. It checks request signatures.
pub struct S3Server {
    pub port: u16,
    pub root: tempfile::TempDir,
    child: Child,
}

pub const S3_ACCESS_KEY: &str = "loupe-test-access";
pub const S3_SECRET_KEY: &str = "loupe-test-secret-key";
pub const S3_REGION: &str = "us-east-1";

impl S3Server {
    /// Starts the server with the given buckets created.
    pub fn start(buckets: &[&str]) -> S3Server {
        let exe = program("s3s-fs", "cargo install s3s-fs@0.14.1 --features binary --locked");
        let root = tempfile::tempdir().unwrap();
        for b in buckets {
            std::fs::create_dir(root.path().join(b)).unwrap();
        }
        let port = free_port();
        let child = Command::new(exe)
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting s3s-fs");
        wait_for("s3s-fs to listen", Duration::from_secs(60), || port_open(port));
        S3Server { port, root, child }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The standard AWS environment for a client of this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY.to_string()),
            ("AWS_REGION", S3_REGION.to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("LOUPE_S3_FORCE_PATH_STYLE", "1".to_string()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `loupe serve` (started by the caller with its stdout piped), killed on drop.
pub struct Served {
    child: Child,
    /// `127.0.0.1:PORT`, from the "serving ... at http://ADDR/" line it prints.
    pub addr: String,
}

impl Served {
    pub fn new(mut child: Child) -> Served {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.as_mut().expect("stdout piped")), &mut line).unwrap();
        let addr = line.trim().rsplit("http://").next().unwrap().trim_end_matches('/').to_string();
        Served { child, addr }
    }

    /// Sends `GET <path>` exactly as written (no client-side normalisation of `..`);
    /// returns the status, the head and the body.
    pub fn get(&self, path: &str) -> (u16, String, Vec<u8>) {
        http_get(&self.addr, path)
    }
}

/// A plain HTTP/1.1 `GET <path>` to `addr` (`HOST:PORT`), sent exactly as written;
/// returns the status, the head and the body.
pub fn http_get(addr: &str, path: &str) -> (u16, String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a full response");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head, raw[split + 4..].to_vec())
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
