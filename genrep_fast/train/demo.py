"""``genrep-fast demo``: both GenRep stages on the embedded 8x8 digits, then the report.

Writes ``metrics.json``, ``reliability.png``, ``samples.png`` and ``report.md`` to the output
folder. ``ablation=True`` additionally trains the paper's ablation rows from one shared stage-0
model and writes ``ablation.json`` / ``ablation.md``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from genrep_fast.train.config import load_config
from genrep_fast.train.evaluation import evaluate
from genrep_fast.train.trainer import Trainer

# The paper's ablation rows (Table: baseline, + generative perception, + semantic generation,
# + both, + gradient alignment) as config overrides.
ABLATION_ROWS = {
    "baseline": ["loss.gen_distil=false", "loss.semantic=false", "align.mode=none"],
    "+ generative perception": ["loss.gen_distil=true", "loss.semantic=false", "align.mode=none"],
    "+ semantic generation": ["loss.gen_distil=false", "loss.semantic=true", "align.mode=none"],
    "+ both": ["loss.gen_distil=true", "loss.semantic=true", "align.mode=none"],
    "+ alignment (GenRep)": ["loss.gen_distil=true", "loss.semantic=true", "align.mode=symmetric"],
}

METRIC_KEYS = ("head_top1", "posterior_top1", "ece_head", "ece_posterior", "gen_head_accuracy")


def train_and_evaluate(cfg, out_dir: Path, resume=None, log=print) -> dict:
    trainer = Trainer(cfg, out_dir, resume=resume)
    t0 = time.perf_counter()
    trainer.run()
    train_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = evaluate(
        trainer.net, cfg, trainer.test_set, out_dir, backend=trainer.backend, progress=False
    )
    res["eval_seconds"] = time.perf_counter() - t0
    res["train_seconds"] = train_seconds
    for s in (0, 1, 2):
        res[f"stage{s}_seconds"] = trainer.stage_seconds.get(s, 0.0)
    res["timing"] = {k: round(v, 3) for k, v in sorted(trainer.timer.seconds.items())}
    res["ops"] = cfg.runtime.ops
    return res


def demo_config(out: str | Path, overrides: list[str] = ()):
    """The demo's config: ``tiny_digits`` with ``overrides``, its run folder ``out/run``."""
    return load_config("tiny_digits", list(overrides) + [f"out_dir={Path(out) / 'run'}"])


def run_demo(
    out: str | Path,
    overrides: list[str] = (),
    ablation: bool = False,
    log=print,
    resume: bool = False,
) -> dict:
    """``resume``: continue the run in ``out/run`` from its latest checkpoint."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(out, overrides)
    t0 = time.perf_counter()
    res = train_and_evaluate(cfg, out / "run", resume=out / "run" if resume else None, log=log)
    res["wall_seconds"] = time.perf_counter() - t0
    for name in ("reliability.png", "samples.png"):
        src = out / "run" / name
        if src.exists():
            src.replace(out / name)
    (out / "metrics.json").write_text(json.dumps(res, indent=1))
    rows = None
    if ablation:
        rows = run_ablation(out, overrides, log=log)
    (out / "report.md").write_text(report_markdown(cfg, res, rows))
    return res


def run_ablation(out: Path, overrides: list[str] = (), log=print) -> dict:
    """Train every ablation row from one shared stage-0 checkpoint; returns {row: metrics}."""
    base = out / "ablation"
    cfg0 = load_config(
        "tiny_digits",
        list(overrides) + ["stage1.steps=0", "stage2.steps=0", f"out_dir={base / 'stage0'}"],
    )
    stage0_dir = base / "stage0"
    if not (stage0_dir / "checkpoints" / "latest").exists():
        Trainer(cfg0, stage0_dir).run()
    rows = {}
    for name, row in ABLATION_ROWS.items():
        slug = name.strip("+ ").replace(" ", "_").replace("(", "").replace(")", "")
        cfg = load_config("tiny_digits", list(overrides) + row + [f"out_dir={base / slug}"])
        log(f"ablation row: {name}")
        res = train_and_evaluate(cfg, base / slug, resume=stage0_dir)
        rows[name] = {k: res.get(k) for k in METRIC_KEYS + ("stage1_seconds", "stage2_seconds")}
    (out / "ablation.json").write_text(json.dumps(rows, indent=1))
    (out / "ablation.md").write_text(ablation_markdown(rows))
    return rows


def ablation_markdown(rows: dict) -> str:
    lines = [
        "| row | head top-1 | posterior top-1 | ECE head | ECE posterior | head acc. on samples |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['head_top1']:.3f} | {r['posterior_top1']:.3f} | {r['ece_head']:.3f} | "
            f"{r['ece_posterior']:.3f} | {r['gen_head_accuracy']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def report_markdown(cfg, res: dict, rows: dict | None) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [
        "# genrep-fast demo: GenRep on the 8x8 handwritten digits",
        "",
        f"Config `tiny_digits` (ops: {cfg.runtime.ops}); {res['test_images']} held-out images; "
        f"stage 0 {cfg.stage0.steps} / stage 1 {cfg.stage1.steps} / stage 2 {cfg.stage2.steps} "
        f"steps; chain bank N={cfg.diffusion.num_steps}, burn-in {cfg.diffusion.burn_in}, "
        f"thin {cfg.diffusion.thin}, {cfg.diffusion.chains_per_class} chains per class.",
        "",
        "| metric | value |",
        "|---|---:|",
    ]
    for k in (
        "head_top1",
        "head_nll",
        "ece_head",
        "posterior_top1",
        "posterior_nll",
        "ece_posterior",
        "gen_head_accuracy",
        "stage0_seconds",
        "stage1_seconds",
        "stage2_seconds",
        "eval_seconds",
        "wall_seconds",
    ):
        if k in res:
            lines.append(f"| {k} | {fmt(res[k])} |")
    lines += [
        "",
        "Training time by section (seconds, all stages):",
        "",
        "| section | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.2f} |" for k, v in res.get("timing", {}).items()]
    lines += [
        "",
        "## Reliability",
        "",
        "![reliability](reliability.png)",
        "",
        "## Class-conditional samples (one row per digit)",
        "",
        "![samples](samples.png)",
        "",
    ]
    if rows:
        lines += [
            "## Ablation (one shared stage-0 model, one run per row)",
            "",
            ablation_markdown(rows),
        ]
    return "\n".join(lines)
