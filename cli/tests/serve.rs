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
