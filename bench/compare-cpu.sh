#!/usr/bin/env bash
# Training throughput of trainq's step next to the PyTorch eager reference
# (bench/torch_reference.py), in one run on this machine, alternating the two so load
# affects both alike. Prints a Markdown table of every round and the medians.
# Usage: bench/compare-cpu.sh [model: mnist|cvae] [batch size] [steps] [rounds]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
model="${1:-mnist}" bs="${2:-128}" steps="${3:-30}" rounds="${4:-3}"
bin="${CARGO_TARGET_DIR:-$root/target}/release/trainq-worker"
[ -x "$bin" ] || (cd "$root" && cargo build --release -p worker --bin trainq-worker)
ref="${TRAINQ_REFERENCE:-$root/bench/torch_reference.py}"
for _ in $(seq "$rounds"); do
  "$bin" bench --model "$model" --batch-sizes "$bs" --steps "$steps" --device cpu 2>/dev/null
  "$root/.tools/python" "$ref" --model "$model" --device cpu --batch-size "$bs" --steps "$steps"
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
      + "".join("; %s / reference = %.2f" % (k, med[k] / med["torch-eager"]) for k in impls if k.startswith("trainq-")))
'
