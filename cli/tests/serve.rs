//! `loupe serve` over real HTTP: it serves the atlas and its viewer, and nothing outside.

mod common;
use common::*;

use std::process::Stdio;

use loupe_testsupport::Served;

fn serve(atlas: &std::path::Path) -> Served {
    Served::new(loupe().arg("serve").arg(atlas).args(["--listen", "127.0.0.1:0"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap())
}

#[test]
fn serve_shows_the_atlas_and_viewer_and_refuses_paths_outside_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("atlas");
    assert_ok(&render(&fixture("tiny.pt"), &out, &["--steps", "2", "--size", "16", "--device", "cpu"]));
    std::fs::write(dir.path().join("secret.txt"), "outside the atlas").unwrap();
    let server = serve(&out);

    let (status, _, body) = server.get("/");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("viewer.js"), "the viewer is at the root");
    let (status, _, body) = server.get("/atlas.json");
    assert_eq!((status, body), (200, std::fs::read(out.join("atlas.json")).unwrap()));
    let (status, _, body) = server.get("/layers/conv/units/0/channel.png");
    assert_eq!((status, &body[1..4]), (200, &b"PNG"[..]));
    assert_eq!(server.get("/layers/conv/units/99/channel.png").0, 404);

    for bad in ["/../secret.txt", "/layers/../../secret.txt", "/%2e%2e/secret.txt", "/%2E%2E%2Fsecret.txt", "/..%2fsecret.txt", "/..%5csecret.txt", "//secret.txt"] {
        let (status, _, body) = server.get(bad);
        assert!(status == 400 || status == 404, "{bad}: {status}");
        assert!(!String::from_utf8_lossy(&body).contains("outside the atlas"), "{bad} leaked the file beside the atlas");
    }
}

/// An atlas directory of two small files, beside a secret that must not be served.
fn small_atlas(dir: &std::path::Path) -> std::path::PathBuf {
    let atlas = dir.join("atlas");
    std::fs::create_dir_all(atlas.join("layers")).unwrap();
    std::fs::write(atlas.join("atlas.json"), r#"{"layers": []}"#).unwrap();
    std::fs::write(atlas.join("index.html"), "<script src=viewer.js></script>").unwrap();
    std::fs::write(dir.join("secret.txt"), "outside the atlas").unwrap();
    atlas
}

/// Sends `request` as written to `addr` and returns everything the server sends before
/// it closes, failing if that takes longer than a generous deadline (a server that
/// cannot answer fails the test rather than hanging it).
fn exchange(addr: &str, request: &str) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap_or_else(|e| panic!("no full answer to {request:?} within 60 s: {e}"));
    raw
}

fn get(addr: &str, path: &str) -> (u16, String, Vec<u8>) {
    let raw = exchange(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"));
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a full response");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head, raw[split + 4..].to_vec())
}

#[test]
fn serve_answers_a_request_under_2000_idle_connections_and_stays_up() {
    // 2,000 client sockets need more open files than the common soft limit of 1024.
    let prlimit = loupe_testsupport::program("prlimit", "install util-linux");
    let raised = std::process::Command::new(prlimit).args(["--pid", &std::process::id().to_string(), "--nofile=8192:"]).status().unwrap();
    assert!(raised.success(), "raising this test's open-file limit to 8192 (the hard limit is lower?)");
    let dir = tempfile::tempdir().unwrap();
    let atlas = small_atlas(dir.path());
    // Idle connections may wait 10 minutes for their request head: at the cap, only making
    // room (the oldest closes at once) lets a new request be answered within `get`'s 60 s.
    let server = Served::new(
        loupe().arg("serve").arg(&atlas).args(["--listen", "127.0.0.1:0", "--header-read-timeout", "600s"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap(),
    );
    // Idle connections that never send a byte, well over the default cap of 512.
    let idle: Vec<_> = (0..2000).map(|i| std::net::TcpStream::connect(&server.addr).unwrap_or_else(|e| panic!("connection {i}: {e}"))).collect();
    // `get` waits at most 60 s for the answer, far less than the idle connections' 600 s.
    let (status, _, body) = get(&server.addr, "/atlas.json");
    assert_eq!((status, body.as_slice()), (200, &br#"{"layers": []}"#[..]));
    drop(idle);
    assert_eq!(get(&server.addr, "/").0, 200, "the server is still up");
}

#[test]
fn serve_refuses_symlinks_that_leave_the_atlas_and_follows_those_inside() {
    let dir = tempfile::tempdir().unwrap();
    let atlas = small_atlas(dir.path());
    std::os::unix::fs::symlink(dir.path().join("secret.txt"), atlas.join("leak.txt")).unwrap();
    std::os::unix::fs::symlink(dir.path(), atlas.join("layers/up")).unwrap();
    std::os::unix::fs::symlink(atlas.join("atlas.json"), atlas.join("alias.json")).unwrap();
    // The atlas itself reached through a symlink: its resolved path is the root.
    let linked = dir.path().join("linked");
    std::os::unix::fs::symlink(&atlas, &linked).unwrap();
    let server = serve(&linked);

    for path in ["/leak.txt", "/layers/up/secret.txt"] {
        let (status, _, body) = get(&server.addr, path);
        assert_eq!(status, 404, "{path}");
        assert!(!String::from_utf8_lossy(&body).contains("outside the atlas"), "{path} leaked the file beside the atlas");
    }
    assert_eq!(get(&server.addr, "/alias.json").2, br#"{"layers": []}"#, "a symlink inside the atlas is served");
    assert_eq!(get(&server.addr, "/layers").0, 404, "a directory is not a file");
}

#[test]
fn serve_answers_head_from_metadata_and_streams_get() {
    let dir = tempfile::tempdir().unwrap();
    let atlas = small_atlas(dir.path());
    // 64 GiB, sparse: more than this machine could read into memory in the test's time.
    let size: u64 = 64 << 30;
    std::fs::File::create(atlas.join("big.parquet")).unwrap().set_len(size).unwrap();
    let server = serve(&atlas);

    let raw = exchange(&server.addr, "HEAD /big.parquet HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let text = String::from_utf8_lossy(&raw).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains(&format!("content-length: {size}\r\n")), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "HEAD sends no body: {text}");

    // GET starts answering at once: the first megabyte arrives without the rest read.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(&server.addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
    s.write_all(b"GET /big.parquet HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut first = vec![0; 1 << 20];
    s.read_exact(&mut first).expect("the first megabyte within 60 s");
    assert!(String::from_utf8_lossy(&first[..200]).contains(&format!("content-length: {size}")));
    drop(s);
    assert_eq!(get(&server.addr, "/atlas.json").0, 200, "the server is still up");
}

/// Out of file descriptors, `accept` fails; the server logs it (not once per failure),
/// waits and carries on, and answers once the header-read timeout has closed the idle
/// connections that used them up.
#[test]
fn serve_survives_running_out_of_file_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let atlas = small_atlas(dir.path());
    let log = dir.path().join("serve.log");
    let prlimit = loupe_testsupport::program("prlimit", "install util-linux");
    let server = Served::new(
        std::process::Command::new(prlimit)
            .args(["--nofile=64:64", "--", env!("CARGO_BIN_EXE_loupe"), "serve"])
            .arg(&atlas)
            .args(["--listen", "127.0.0.1:0", "--header-read-timeout", "1s"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let idle: Vec<_> = (0..200).map(|_| std::net::TcpStream::connect(&server.addr).unwrap()).collect();
    let (status, _, _) = get(&server.addr, "/atlas.json");
    assert_eq!(status, 200);
    drop(idle);
    assert_eq!(get(&server.addr, "/").0, 200, "the server is still up");
    let logged = std::fs::read_to_string(&log).unwrap();
    let lines = logged.matches("accepting a connection failed").count();
    assert!((1..=2).contains(&lines), "the accept error is logged, at most once a minute: {lines} lines\n{logged}");
}
