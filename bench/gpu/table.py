#!/usr/bin/env python3
"""Prints bench/gpu/run.sh's results as one Markdown table.

Input: the JSON lines of `trainq-worker bench` and of the two references (one file), and the
standalone jobs' JSON summaries (another). Per model and batch size: the median images/s of every
implementation over the rounds, its ratio to tuned PyTorch (torch-graph-bf16-cl; to torch-eager
where there is no tuned figure, as on a CPU), and trainq's peak GPU memory. Then each job's wall
time against its training time.
Usage: table.py BENCH_JSONL JOBS_JSONL
"""
import json
import statistics
import sys
from collections import defaultdict


def rows(path):
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                out.append(json.loads(line))
    return out


def main(bench_path, jobs_path):
    runs = defaultdict(list)
    peaks = defaultdict(list)
    errors = []
    for r in rows(bench_path):
        if "error" in r:
            errors.append(r)
            continue
        key = (r["model"], r["batch_size"], r["impl"])
        runs[key].append(r["images_per_s"])
        if r.get("peak_mib") is not None:
            peaks[key].append(r["peak_mib"])
        if r["impl"].startswith("trainq-graph") and not r.get("graph", True):
            errors.append({"impl": r["impl"], "error": "fell back to eager (no graph replay)"})
    configs = sorted({(m, b) for (m, b, _) in runs})
    impls = sorted({i for (_, _, i) in runs})
    print("| model | batch | " + " | ".join(impls) + " | anchor | best trainq / anchor | trainq peak MiB |")
    print("| --- | --- | " + " | ".join("---" for _ in impls) + " | --- | --- | --- |")
    for model, bs in configs:
        med = {i: statistics.median(runs[(model, bs, i)]) for i in impls if runs.get((model, bs, i))}
        anchor = "torch-graph-bf16-cl" if "torch-graph-bf16-cl" in med else "torch-eager"
        ours = {i: v for i, v in med.items() if i.startswith("trainq-")}
        best = max(ours, key=ours.get) if ours else None
        ratio = "%.2f (%s)" % (ours[best] / med[anchor], best) if best and anchor in med else "-"
        peak = "; ".join("%s %.0f" % (i, max(peaks[(model, bs, i)])) for i in ours if peaks.get((model, bs, i)))
        cells = ["%.0f" % med[i] if i in med else "-" for i in impls]
        print("| %s | %d | %s | %s | %s | %s |" % (model, bs, " | ".join(cells), anchor, ratio, peak or "-"))
    print()
    print("medians of %s rounds; images/s" % max((len(v) for v in runs.values()), default=0))
    jobs = rows(jobs_path)
    if jobs:
        print()
        print("| job | outcome | wall s | training s | training / wall | mean images/s | final metric |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for j in jobs:
            wall, train = j.get("wall_s"), j.get("train_s")
            share = "%.2f" % (train / wall) if wall and train else "-"
            final = j.get("test_accuracy") or j.get("test_neg_elbo_nats")
            print("| %s | %s | %s | %s | %s | %s | %s |" % (j.get("name"), j.get("outcome"), wall, train, share,
                                                            j.get("mean_images_per_s"), final))
    for e in errors:
        print("error:", json.dumps(e))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
