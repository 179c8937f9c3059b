//! Shared helpers for the end-to-end tests, which run the real `loupe` binary.
#![allow(dead_code)] // each test file uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn demo_model() -> PathBuf {
    repo().join("models/demo/demo.pt")
}

pub fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures").join(name)
}

pub fn loupe() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_loupe"));
    c.env_remove("LOUPE_DEVICE").env_remove("LOUPE_MODEL");
    c
}

/// Runs `loupe render` with the given arguments after `--model M --out O`.
pub fn render(model: &Path, out: &Path, args: &[&str]) -> Output {
    render_command(model, out, args).output().expect("running loupe")
}

/// The `loupe render` command of [`render`], to adjust before running it.
pub fn render_command(model: &Path, out: &Path, args: &[&str]) -> Command {
    let mut c = loupe();
    c.arg("render").arg("--model").arg(model).arg("--out").arg(out).args(args);
    c
}

pub fn assert_ok(o: &Output) {
    assert!(o.status.success(), "loupe failed: {}\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
}

/// Decodes an 8-bit RGB PNG into (width, height, bytes).
pub fn read_png(path: &Path) -> (u32, u32, Vec<u8>) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file)).read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

/// Every file under `dir`, relative, sorted.
pub fn files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(root: &Path, d: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out)
            } else {
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned())
            }
        }
    }
    if dir.exists() {
        walk(dir, dir, &mut out);
    }
    out.sort();
    out
}
