//! Build steps torch-sys does not make for the worker:
//! - an rpath to libtorch's lib folder, so the worker runs without LD_LIBRARY_PATH;
//! - `--no-as-needed -ltorch_cuda -lc10_cuda` when the libtorch has CUDA, since otherwise the
//!   linker drops libtorch_cuda.so (nothing references it by symbol) and CUDA is never available;
//! - the C++ shim (`shim/trainq_shim.cpp`: CUDA graphs, streams, memory format, autocast), compiled
//!   with the `cc` crate against the same libtorch headers, with `TRAINQ_SHIM_CUDA` defined when
//!   the libtorch has CUDA and the CUDA runtime headers are found (`$TRAINQ_CUDA_INCLUDE`, the
//!   `nvidia/*/include` folders PyPI's torch wheel brings beside it, with `crt/` and `nv/` from
//!   the nvidia-cuda-crt and nvidia-cuda-cccl wheels, or `$CUDA_HOME/include`).
//!   Without them the shim still builds, and its CUDA calls answer "built without CUDA".
//!
//! LIBTORCH comes from the environment or from .cargo/config.toml (set up by scripts/setup.sh).

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=TRAINQ_CUDA_INCLUDE");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-changed=shim/trainq_shim.cpp");
    let Some(libtorch) = std::env::var_os("LIBTORCH") else {
        panic!("LIBTORCH is not set: run scripts/setup.sh (the worker's C++ shim needs libtorch's headers)");
    };
    let libtorch = PathBuf::from(libtorch);
    let libtorch = libtorch.canonicalize().unwrap_or(libtorch);
    let lib = libtorch.join("lib");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    let has_cuda = lib.join("libtorch_cuda.so").exists();
    // The shim's test checks that a CUDA libtorch got a CUDA shim (headers found).
    println!(
        "cargo:rustc-env=TRAINQ_LIBTORCH_HAS_CUDA={}",
        u8::from(has_cuda)
    );
    if has_cuda {
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-lc10_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    build_shim(&libtorch, has_cuda);
}

/// The folder holding `cuda_runtime_api.h`, if any.
fn cuda_include(libtorch: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("TRAINQ_CUDA_INCLUDE") {
        candidates.push(dir.into());
    }
    // PyPI's torch wheel: site-packages/torch beside site-packages/nvidia/<cuXY or pkg>/include.
    if let Some(site) = libtorch.parent() {
        if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
            let mut dirs: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path().join("include"))
                .collect();
            dirs.sort();
            candidates.extend(dirs);
        }
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        candidates.push(PathBuf::from(home).join("include"));
    }
    candidates.push("/usr/local/cuda/include".into());
    // crt/ and nv/ come from wheels of their own (nvidia-cuda-crt, nvidia-cuda-cccl), which
    // scripts/setup.sh installs.
    candidates.into_iter().find(|d| {
        ["cuda_runtime_api.h", "crt/host_defines.h", "nv/target"]
            .iter()
            .all(|f| d.join(f).exists())
    })
}

fn build_shim(libtorch: &Path, has_cuda: bool) {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .file("shim/trainq_shim.cpp")
        .include(libtorch.join("include"))
        .flag("-std=c++17")
        .flag(format!(
            "-D_GLIBCXX_USE_CXX11_ABI={}",
            std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into())
        ))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false);
    match (has_cuda, cuda_include(libtorch)) {
        (true, Some(dir)) => {
            build.include(&dir).define("TRAINQ_SHIM_CUDA", None);
        }
        (true, None) => println!(
            "cargo:warning=libtorch has CUDA but no CUDA runtime headers (cuda_runtime_api.h with crt/ and nv/) were found: run scripts/setup.sh or set TRAINQ_CUDA_INCLUDE; the shim is built without CUDA graphs"
        ),
        (false, _) => {}
    }
    build.compile("trainq_shim");
}
