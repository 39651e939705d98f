"""tiny_mnist's cost on a CPU: CPU seconds per step of each stage, per bank build and for the
evaluation, from a shortened run (100 / 30 / 30 steps), extrapolated to the config's full
schedule (docs/TRAINING.md, "MNIST-5k"). Needs the extra genrep_fast[mnist].

    python tools/measure_tiny_mnist_cost.py OUT_DIR
"""

import json
import os
import sys
import time

from genrep_fast.train.config import load_config
from genrep_fast.train.evaluation import evaluate
from genrep_fast.train.trainer import Trainer

out = sys.argv[1]
S = {0: 100, 1: 30, 2: 30}
full = load_config("tiny_mnist")
cfg = load_config(
    "tiny_mnist",
    [f"stage{s}.steps={n}" for s, n in S.items()]
    + [f"out_dir={out}", "runtime.progress=false", "runtime.log_every=10"],
)
c_init = time.process_time()
tr = Trainer(cfg)
init_cpu = time.process_time() - c_init
cpu = {0: 0.0, 1: 0.0, 2: 0.0}
bank = []
step_orig, bank_orig = tr.train_step, tr.refresh_bank


def step(stage, *a, **k):
    c = time.process_time()
    r = step_orig(stage, *a, **k)
    cpu[stage] += time.process_time() - c
    return r


def refresh(*a, **k):
    c = time.process_time()
    r = bank_orig(*a, **k)
    bank.append(time.process_time() - c)
    return r


tr.train_step, tr.refresh_bank = step, refresh
w0 = time.perf_counter()
tr.run()
train_wall = time.perf_counter() - w0
c = time.process_time()
w0 = time.perf_counter()
res = evaluate(tr.net, cfg, tr.test_set, out, backend=tr.backend)
eval_cpu, eval_wall = time.process_time() - c, time.perf_counter() - w0
per_step = {s: cpu[s] / S[s] for s in S}
# bank builds happen inside the step loop's refresh, not train_step: counted apart
refreshes = {
    1: len(range(0, full.stage1.steps, full.diffusion.bank_refresh_every)),
    2: len(range(0, full.stage2.steps, full.diffusion.bank_refresh_every)),
}
est = (
    init_cpu
    + per_step[0] * full.stage0.steps
    + per_step[1] * full.stage1.steps
    + per_step[2] * full.stage2.steps
    + (sum(bank) / len(bank)) * (refreshes[1] + refreshes[2])
    + eval_cpu
)
rep = {
    "cpu_s_per_step": per_step,
    "bank_build_cpu_s": bank,
    "init_cpu_s": init_cpu,
    "eval_cpu_s": eval_cpu,
    "eval_wall_s": eval_wall,
    "train_wall_s": train_wall,
    "eval_timing": res.get("eval_timing"),
    "estimated_full_run_cpu_s": est,
    "full_schedule": {s: getattr(full, f"stage{s}").steps for s in S},
    "bank_builds_full": refreshes,
    "load_end": os.getloadavg(),
    "metrics": {k: v for k, v in res.items() if not isinstance(v, dict)},
}
print(json.dumps(rep, indent=1))
json.dump(rep, open(os.path.join(out, "measure.json"), "w"), indent=1)
