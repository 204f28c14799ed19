#!/usr/bin/env bash
# Builds here everything the GPU checks need and puts it in ./.gpu (git-ignored), to be carried
# to a GPU host that has no compiler, no network and no services:
#   .gpu/trainq-worker          the release worker (stripped)
#   .gpu/cuda-tests             worker/tests/cuda.rs built with --features cuda-tests (stripped)
#   .gpu/ref/                   the speed anchors: torch_reference.py (eager) and
#                               torch_tuned_reference.py (CUDA graph + bf16 + channels_last)
#   .gpu/data/mnist/            MNIST, for the end-to-end job
# Usage: bench/gpu/prepare.sh [REFERENCE_DIR]   (default ../shared/bench; it must hold both
# reference scripts) [MNIST_DIR] (default ../shared/data/mnist). Then bench/gpu/run.sh there.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
refs="${1:-$root/../shared/bench}"
mnist="${2:-$root/../shared/data/mnist}"
for f in "$refs/torch_reference.py" "$refs/torch_tuned_reference.py"; do
  [ -f "$f" ] || { echo "prepare: $f is missing" >&2; exit 1; }
done
[ -f "$mnist/train-images-idx3-ubyte.gz" ] || { echo "prepare: no MNIST in $mnist" >&2; exit 1; }
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
cargo build --release -p worker --bin trainq-worker
test_bin="$(cargo test --release -p worker --features cuda-tests --test cuda --no-run --message-format=json \
  | "$root/.tools/python" -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda":
        print(m["executable"])')"
rm -rf .gpu && mkdir -p .gpu/ref .gpu/data/mnist
cp "$target/release/trainq-worker" .gpu/trainq-worker
cp "$test_bin" .gpu/cuda-tests
strip .gpu/trainq-worker .gpu/cuda-tests
cp "$refs/torch_reference.py" "$refs/torch_tuned_reference.py" .gpu/ref/
cp "$mnist"/*.gz .gpu/data/mnist/
du -sh .gpu
echo "carry .gpu and run: bench/gpu/run.sh"
