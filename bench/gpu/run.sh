#!/usr/bin/env bash
# Every GPU check of the training engine in one run, on a CUDA host, from what
# bench/gpu/prepare.sh put in ./.gpu (it builds nothing here). Prints one table at the end.
#   1. the cuda-tests (CUDA graph replay vs eager, graph-bf16-cl vs fp32, a slot's own stream);
#   2. throughput: trainq's bench (eager and the default plan, auto = graph-bf16-cl) alternating
#      with both references (torch_reference.py eager, torch_tuned_reference.py graph-bf16-cl),
#      ROUNDS rounds, for the CVAE at batch 64, 256, 1024, 4096 and the classifier at 64, 256;
#      medians, the ratio to tuned PyTorch, and trainq's peak GPU memory per configuration;
#   3. two real jobs in the worker's standalone mode: full MNIST (2 epochs), then a CVAE on
#      generated CIFAR-format data (10,000 images, 2 epochs): wall time against training time.
# Usage: bench/gpu/run.sh [--smoke]   (--smoke: tiny sizes on the CPU, to check the script here;
# it skips what needs CUDA). Environment: LD_LIBRARY_PATH must reach libtorch (on the lent H200:
# /opt/torch/.venv/lib/python3.12/site-packages/torch/lib), PYTHON a python with torch
# (default /opt/torch/.venv/bin/python), ROUNDS (default 2), OUT (default /tmp/trainq-gpu).
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
carry="$root/.gpu"
smoke=0; [ "${1:-}" = "--smoke" ] && smoke=1
py="${PYTHON:-/opt/torch/.venv/bin/python}"
rounds="${ROUNDS:-2}"
out="${OUT:-/tmp/trainq-gpu}"; mkdir -p "$out"
w="$carry/trainq-worker"
[ -x "$w" ] || { echo "run: $w missing: run bench/gpu/prepare.sh first" >&2; exit 1; }
if [ $smoke = 1 ]; then
  dev=cpu; cvae_bs=8; mnist_bs=16; steps=3; warm=5; variants=eager; rounds=1  # auto = eager on a CPU
else
  dev=cuda; cvae_bs=64,256,1024,4096; mnist_bs=64,256; steps=200; warm=20; variants=eager,auto
fi
bench="$out/bench.jsonl"; : > "$bench"
status=0

echo "== cuda-tests"
if [ $smoke = 1 ]; then echo "(skipped: --smoke)"
else "$carry/cuda-tests" --test-threads 1 2>&1 | tail -15 || status=1; fi

echo "== throughput ($rounds rounds, alternating)"
for r in $(seq "$rounds"); do
  for model in cvae mnist; do
    bs=$cvae_bs; [ $model = mnist ] && bs=$mnist_bs
    "$w" bench --model $model --batch-sizes $bs --steps $steps --warmup $warm --variants $variants --device $dev >> "$bench" || status=1
    "$py" "$carry/ref/torch_reference.py" --model $model --batch-sizes $bs --steps $steps --device $dev >> "$bench" || status=1
    if [ $smoke = 0 ]; then
      "$py" "$carry/ref/torch_tuned_reference.py" --model $model --batch-sizes $bs --steps $steps --variants graph-bf16-cl >> "$bench" || status=1
    fi
  done
done

echo "== end-to-end jobs (standalone)"
jobs="$out/jobs.jsonl"; : > "$jobs"
data="$out/data"; mkdir -p "$data/mnist" "$out/artifacts"
cp -n "$carry"/data/mnist/*.gz "$data/mnist/"
if [ $smoke = 1 ]; then mnist_limit=',"maxTrainExamples":512,"maxTestExamples":128'; cifar_n=512; epochs=1
else mnist_limit=''; cifar_n=10000; epochs=2; fi
"$w" gen-cifar --out "$data" --train $cifar_n --test 1000 >/dev/null || status=1
cat > "$out/mnist.json" <<JSON
{"name":"gpu-mnist","training":{"epochs":$epochs,"batchSize":128,"learningRate":0.001$mnist_limit},"mnistClassifier":{}}
JSON
cat > "$out/cvae.json" <<JSON
{"name":"gpu-cvae","training":{"epochs":$epochs,"batchSize":128,"learningRate":0.001},"cifarCvae":{}}
JSON
for spec in mnist cvae; do
  "$w" run "$out/$spec.json" --data-dir "$data" --out "$out/artifacts" --device $dev --json \
    | tail -1 >> "$jobs" || status=1
done

echo "== table"
"$py" "$root/bench/gpu/table.py" "$bench" "$jobs" || status=1
exit $status
