//! Link settings for libtorch that torch-sys does not make:
//! - an rpath to libtorch's lib folder, so the worker runs without LD_LIBRARY_PATH;
//! - `--no-as-needed -ltorch_cuda` when the libtorch has CUDA, since otherwise the linker drops
//!   libtorch_cuda.so (nothing references it by symbol) and CUDA is never available.
//!
//! LIBTORCH comes from the environment or from .cargo/config.toml (set up by scripts/setup.sh).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let Some(libtorch) = std::env::var_os("LIBTORCH") else {
        println!("cargo:warning=LIBTORCH is not set: run scripts/setup.sh (torch-sys will try its own lookup)");
        return;
    };
    let libtorch = PathBuf::from(libtorch);
    let libtorch = libtorch.canonicalize().unwrap_or(libtorch);
    let lib = libtorch.join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
