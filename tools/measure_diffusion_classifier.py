"""The Diffusion Classifier on the held-out digits: a tiny_digits stage-0 model trained for
STEPS steps, then top-1 / ECE / NLL / CPU and wall ms per image for each trial count and pruning
schedule, one JSON line each (the numbers in docs/TRAINING.md, "The Diffusion Classifier").

    python tools/measure_diffusion_classifier.py OUT_DIR [STEPS]   # 2000 by default
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from genrep_fast import diffusion_classifier
from genrep_fast.train import metrics
from genrep_fast.train.config import load_config
from genrep_fast.train.trainer import Trainer

SCHEDULES = [(10, ()), (50, ()), (50, ((10, 3),)), (200, ())]


def main(out: str, steps: int = 2000) -> None:
    torch.set_num_threads(1)
    cfg = load_config(
        "tiny_digits",
        [f"stage0.steps={steps}", "stage1.steps=0", "stage2.steps=0", f"out_dir={out}"]
        + ["runtime.progress=false", "runtime.log_every=500"],
    )
    tr = Trainer(cfg)
    c0, w0 = time.process_time(), time.perf_counter()
    tr.run()
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    print(f"stage0 {steps} cpu_s {cpu:.1f} wall_s {wall:.1f} load {os.getloadavg()}", flush=True)
    x, y = tr.test_set.images, tr.test_set.labels
    for n, prune in SCHEDULES:
        c0, w0 = time.process_time(), time.perf_counter()
        r = diffusion_classifier(
            tr.net.adapter, x, num_trials=n, prune=prune, num_classes=10, seed=4321
        )
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        row = {
            "n": n,
            "prune": [list(p) for p in prune],
            "rows_per_image": r.rows,
            "top1": metrics.top1(r.probs, y),
            "ece": metrics.ece(r.probs, y),
            "nll": metrics.nll(r.probs, y),
            "cpu_ms_per_image": 1000 * cpu / len(y),
            "wall_ms_per_image": 1000 * wall / len(y),
            "load": os.getloadavg(),
        }
        for temp in (0.3, 3.0, 10.0):  # the same errors at other temperatures
            p = (-r.errors / temp).masked_fill(r.logits.isinf(), float("-inf")).softmax(-1)
            row[f"ece_T{temp}"] = metrics.ece(p, y)
            row[f"nll_T{temp}"] = metrics.nll(p, y)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2000)
