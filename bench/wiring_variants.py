"""Short-run comparisons of the method's wiring choices on tiny_digits (docs/TRAINING.md, "The
method's wiring"). Not a pytest suite: run by hand, one process per variant.

    python bench/wiring_variants.py stage0 ROOT
        stage 0 (2000 steps) of tiny_digits with diffusion.sigma_min=auto, into ROOT/stage0
    python bench/wiring_variants.py variant ROOT NAME RESUME STAGE1_STEPS STAGE2_STEPS [key=value ...]
        resume from RESUME (a run folder), train the remaining stages, evaluate; writes
        ROOT/NAME/result.json

A variant's result: evaluation.evaluate's metrics (head / posterior top-1, NLL, ECE, the head's
accuracy on its samples), ``samples_logreg_top1`` (a logistic regression fit on the real training
digits only, on 20 samples per class), ``xsem_probe_top1`` (a logistic regression on x_sem of the
training images, scored on the held-out ones), ``head_top1_noise1.0`` (pixel noise sigma 1.0) and
the teacher's bandwidth choices (``teacher_events``).
"""

from __future__ import annotations

import json
import sys
import time

import torch


def stage0(root: str) -> None:
    from genrep_fast.train.config import load_config
    from genrep_fast.train.trainer import Trainer

    cfg = load_config(
        "tiny_digits",
        [
            "diffusion.sigma_min=auto",
            "stage1.steps=0",
            "stage2.steps=0",
            "runtime.progress=false",
            f"out_dir={root}/stage0",
        ],
    )
    t = time.time()
    Trainer(cfg).run()
    print("stage0 seconds", time.time() - t)


def variant(root: str, name: str, resume: str, s1: str, s2: str, *overrides: str) -> None:
    from sklearn.linear_model import LogisticRegression

    from genrep_fast.train.config import load_config
    from genrep_fast.train.data import load_digits_split
    from genrep_fast.train.evaluation import evaluate, generate, head_probabilities
    from genrep_fast.train.trainer import Trainer

    out = f"{root}/{name}"
    cfg = load_config(
        "tiny_digits",
        [
            "diffusion.sigma_min=auto",
            f"stage1.steps={s1}",
            f"stage2.steps={s2}",
            "runtime.progress=false",
            f"out_dir={out}",
            "eval.samples_per_class=20",
            *overrides,
        ],
    )
    tr = Trainer(cfg, out, resume=resume, allow_config_change=True)
    t0 = time.time()
    tr.run()
    net = tr.net
    torch.manual_seed(0)
    res = evaluate(net, cfg, tr.test_set, out, backend=tr.backend)
    res["train_seconds"] = time.time() - t0
    full_train, test = load_digits_split(seed=0)
    clf = LogisticRegression(max_iter=2000).fit(
        full_train.images.flatten(1).numpy(), full_train.labels.numpy()
    )
    xs, ys = generate(net, cfg, 20, seed=cfg.seed + 7)
    res["samples_logreg_top1"] = float((clf.predict(xs.flatten(1).numpy()) == ys.numpy()).mean())
    with torch.no_grad():
        net.eval()
        _, sem_tr = net.perceive(tr.train_set.images)
        _, sem_te = net.perceive(test.images)
    probe = LogisticRegression(max_iter=3000).fit(
        sem_tr.flatten(1).numpy(), tr.train_set.labels.numpy()
    )
    res["xsem_probe_top1"] = float(
        (probe.predict(sem_te.flatten(1).numpy()) == test.labels.numpy()).mean()
    )
    g = torch.Generator().manual_seed(5)
    p = head_probabilities(net, test.images + torch.randn(test.images.shape, generator=g))
    res["head_top1_noise1.0"] = float((p.argmax(1) == test.labels).float().mean())
    keys = ("stage", "step", "teacher_bandwidth", "teacher_val_nll", "teacher_val_top1")
    res["teacher_events"] = [
        {k: r[k] for k in keys} for r in tr.history if r.get("event") == "bandwidth"
    ]
    res["overrides"] = list(overrides)
    with open(f"{out}/result.json", "w") as f:
        json.dump(res, f, indent=1)
    print(name, json.dumps({k: v for k, v in res.items() if k != "eval_timing"}))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"stage0": stage0, "variant": variant}[cmd](*args)
