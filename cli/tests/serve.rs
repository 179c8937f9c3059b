//! `loupe serve` over real HTTP: it serves the atlas and its viewer, and nothing outside.

mod common;
use common::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};

/// A running `loupe serve`, killed on drop.
struct Server(Child, String);

impl Server {
    fn start(atlas: &std::path::Path) -> Server {
        let mut child = loupe()
            .arg("serve")
            .arg(atlas)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // "serving <atlas> at http://127.0.0.1:PORT/"
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        let addr = line.trim().rsplit("http://").next().unwrap().trim_end_matches('/').to_string();
        Server(child, addr)
    }

    /// Sends `GET <path>` exactly as written (no client-side normalisation of `..`).
    fn get(&self, path: &str) -> (u16, Vec<u8>) {
        let mut s = TcpStream::connect(&self.1).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a full response");
        let head = String::from_utf8_lossy(&raw[..split]).into_owned();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, raw[split + 4..].to_vec())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_shows_the_atlas_and_viewer_and_refuses_paths_outside_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("atlas");
    assert_ok(&render(&fixture("tiny.pt"), &out, &["--steps", "2", "--size", "16", "--device", "cpu"]));
    std::fs::write(dir.path().join("secret.txt"), "outside the atlas").unwrap();
    let server = Server::start(&out);

    let (status, body) = server.get("/");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("viewer.js"), "the viewer is at the root");
    let (status, body) = server.get("/atlas.json");
    assert_eq!((status, body), (200, std::fs::read(out.join("atlas.json")).unwrap()));
    let (status, body) = server.get("/layers/conv/units/0/channel.png");
    assert_eq!((status, &body[1..4]), (200, &b"PNG"[..]));
    assert_eq!(server.get("/layers/conv/units/99/channel.png").0, 404);

    for bad in ["/../secret.txt", "/layers/../../secret.txt", "/%2e%2e/secret.txt", "/%2E%2E%2Fsecret.txt", "/..%2fsecret.txt", "/..%5csecret.txt", "//secret.txt"] {
        let (status, body) = server.get(bad);
        assert!(status == 400 || status == 404, "{bad}: {status}");
        assert!(!String::from_utf8_lossy(&body).contains("outside the atlas"), "{bad} leaked the file beside the atlas");
    }
}
