//! Link settings for everything that links libtorch (the worker's tests and the `loupe`
//! and `loupe-worker` binaries; cli/Cargo.toml points here too):
//! - an rpath to libtorch, so the binaries run without LD_LIBRARY_PATH;
//! - libtorch_cuda linked even though no symbol of it is used directly: without it,
//!   `Cuda::is_available()` is false even on a GPU machine. `LOUPE_LINK_CUDA=0` leaves it
//!   out: deploy/cli.Dockerfile builds a CPU-only CLI that way from the CUDA wheel.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LOUPE_LINK_CUDA");
    println!("cargo:rerun-if-changed=build.rs");
    let Ok(libtorch) = std::env::var("LIBTORCH") else { return };
    let lib = PathBuf::from(libtorch).join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    let link_cuda = std::env::var("LOUPE_LINK_CUDA").map_or(true, |v| v != "0");
    if link_cuda && lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
