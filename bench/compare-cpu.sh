#!/usr/bin/env bash
# Training throughput of trainq's step next to the PyTorch eager reference
# (bench/torch_reference.py, or $TRAINQ_REFERENCE), in one run on this machine, alternating the
# two so load affects both alike. Prints a Markdown table of every round and the medians.
# Usage: bench/compare-cpu.sh [model: mnist|cvae] [batch size] [steps] [rounds] [--malloc-ab]
# --malloc-ab adds two rows per round: trainq with glibc's default malloc thresholds (the worker
# leaves them alone when GLIBC_TUNABLES is set) and the reference with the thresholds the worker
# sets (worker/src/shim.rs, keep_freed_memory), to show what that setting is worth on each side.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
model="${1:-mnist}" bs="${2:-128}" steps="${3:-30}" rounds="${4:-3}" ab="${5:-}"
bin="${CARGO_TARGET_DIR:-$root/target}/release/trainq-worker"
[ -x "$bin" ] || (cd "$root" && cargo build --release -p worker --bin trainq-worker)
ref="${TRAINQ_REFERENCE:-$root/bench/torch_reference.py}"
rename() { sed "s/\"impl\": \"\([^\"]*\)\"/\"impl\": \"\1$1\"/"; }
for _ in $(seq "$rounds"); do
  "$bin" bench --model "$model" --batch-sizes "$bs" --steps "$steps" --device cpu 2>/dev/null
  "$root/.tools/python" "$ref" --model "$model" --device cpu --batch-size "$bs" --steps "$steps"
  if [ "$ab" = "--malloc-ab" ]; then
    GLIBC_TUNABLES=glibc.malloc.perturb=0 "$bin" bench --model "$model" --batch-sizes "$bs" --steps "$steps" --device cpu 2>/dev/null | rename "+glibc-default-malloc"
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456 \
      "$root/.tools/python" "$ref" --model "$model" --device cpu --batch-size "$bs" --steps "$steps" | rename "+trainq-malloc"
  fi
done | "$root/.tools/python" -c '
import json, statistics, sys
rows = [json.loads(l) for l in sys.stdin if l.startswith("{")]
print("| impl | model | batch | steps | images/s |")
print("| --- | --- | --- | --- | --- |")
for r in rows:
    print("| %s | %s | %d | %d | %d |" % (r["impl"], r["model"], r["batch_size"], r["steps"], r["images_per_s"]))
impls = sorted({r["impl"] for r in rows})
med = {i: statistics.median(r["images_per_s"] for r in rows if r["impl"] == i) for i in impls}
print()
print("medians: " + ", ".join("%s %.0f" % (k, med[k]) for k in impls)
      + "".join("; %s / torch-eager = %.2f" % (k, med[k] / med["torch-eager"]) for k in impls if k != "torch-eager"))
'
