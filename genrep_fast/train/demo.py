"""``genrep-fast demo``: both GenRep stages on the embedded 8x8 digits, then the report.

Writes ``metrics.json``, ``reliability.png``, ``samples.png`` and ``report.md`` to the output
folder. ``ablation=True`` additionally trains the paper's ablation rows from one shared stage-0
model and writes ``ablation.json`` / ``ablation.md``.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from genrep_fast.train import metrics
from genrep_fast.train.config import load_config
from genrep_fast.train.diagnostics import read_records
from genrep_fast.train.evaluation import evaluate
from genrep_fast.train.trainer import Trainer

# The paper's ablation rows (Table: baseline, + generative perception, + semantic generation,
# + both, + gradient alignment) as config overrides, and the one-sided alignment (only the
# generation gradient's component along the perception gradient is rescaled). The first table row,
# "CNN baseline", is the SmallCNN of each seed's first row's evaluation (no GenRep training).
ABLATION_ROWS = {
    "CE-only diffusion head": ["loss.gen_distil=false", "loss.semantic=false", "align.mode=none"],
    "+ generative perception": ["loss.gen_distil=true", "loss.semantic=false", "align.mode=none"],
    "+ semantic generation": ["loss.gen_distil=false", "loss.semantic=true", "align.mode=none"],
    "+ both": ["loss.gen_distil=true", "loss.semantic=true", "align.mode=none"],
    "+ symmetric alignment (GenRep)": [
        "loss.gen_distil=true",
        "loss.semantic=true",
        "align.mode=symmetric",
    ],
    "one-sided alignment": ["loss.gen_distil=true", "loss.semantic=true", "align.mode=generation"],
    # beyond the paper: alignment over every trained value, one group per top-level block (the
    # paper's attention blocks are 6.4% of them here, and the rows above barely differ)
    "symmetric alignment, all blocks": [
        "loss.gen_distil=true",
        "loss.semantic=true",
        "align.mode=symmetric",
        "align.groups=all_blocks",
    ],
}
CNN_ROW = "CNN baseline"

# (key, header) of the ablation table's columns; None values (a column a row has not) print n/a
ABLATION_COLUMNS = (
    ("top1", "top-1"),
    ("ece", "ECE"),
    ("top1_sigma_0.5", "top-1 at sigma 0.5"),
    ("top1_sigma_1.0", "top-1 at sigma 1.0"),
    ("posterior_top1", "posterior top-1"),
    ("samples_classifier_top1", "samples-classifier top-1"),
    ("samples_fd", "samples FD"),
    ("dc_top1", "Diffusion Classifier top-1"),
    ("dc_ece", "Diffusion Classifier ECE"),
)

METRIC_KEYS = (
    "head_top1",
    "posterior_top1",
    "ece_head",
    "ece_posterior",
    "gen_head_accuracy",
    "cnn_baseline_top1",
    "samples_classifier_top1",
    "samples_fd",
    "xsem_probe_top1",
)


def train_and_evaluate(
    cfg,
    out_dir: Path,
    resume=None,
    log=print,
    allow_config_change: bool = False,
    cache: dict | None = None,
) -> dict:
    """Train ``cfg`` into ``out_dir`` and evaluate it; ``cache``: see ``evaluate``."""
    trainer = Trainer(cfg, out_dir, resume=resume, allow_config_change=allow_config_change)
    t0 = time.perf_counter()
    trainer.run()
    train_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = evaluate(
        trainer.net,
        cfg,
        trainer.test_set,
        out_dir,
        backend=trainer.backend,
        progress=False,
        train_set=trainer.train_set,
        history=trainer.history,
        cache=cache,
    )
    res["eval_seconds"] = time.perf_counter() - t0
    res["train_seconds"] = train_seconds
    for s in (0, 1, 2):
        res[f"stage{s}_seconds"] = trainer.stage_seconds.get(s, 0.0)
    res["timing"] = {k: round(v, 3) for k, v in sorted(trainer.timer.seconds.items())}
    res["ops"] = cfg.runtime.ops
    res["device"] = str(trainer.device)
    return res


PICTURES = ("reliability.png", "samples.png", "robustness.png")


def demo_config(out: str | Path, overrides: list[str] = ()):
    """The demo's config: ``tiny_digits`` with ``overrides``, its run folder ``out/run``."""
    return load_config("tiny_digits", list(overrides) + [f"out_dir={Path(out) / 'run'}"])


def run_demo(
    out: str | Path,
    overrides: list[str] = (),
    ablation: bool = False,
    seeds: int = 1,
    log=print,
    resume: bool = False,
) -> dict:
    """``resume``: continue the run in ``out/run`` from its latest checkpoint."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(out, overrides)
    from genrep_fast.benchmarking import environment

    env = environment()  # the commit of the code that runs, taken before it runs
    t0 = time.perf_counter()
    res = train_and_evaluate(cfg, out / "run", resume=out / "run" if resume else None, log=log)
    res["environment"] = {**env, **environment(res["device"]), "commit": env["commit"]}
    res["wall_seconds"] = time.perf_counter() - t0
    for name in PICTURES:
        src = out / "run" / name
        if src.exists():
            src.replace(out / name)
    records = read_records(out / "run" / "metrics.jsonl")
    diagnostic_pictures(records, out)
    (out / "metrics.json").write_text(json.dumps(res, indent=1))
    summary = None
    if ablation:
        summary = run_ablation(out, overrides, seeds=seeds, log=log)
    (out / "report.md").write_text(report_markdown(cfg, res, summary, records, out))
    return res


def diagnostic_pictures(records: list[dict], out: Path) -> list[str]:
    """loss_curves.png and (when stage 2 logged them) alignment.png; returns the names written."""
    written = []
    if metrics.loss_curves(records, out / "loss_curves.png") is not None:
        written.append("loss_curves.png")
    cos = [v for r in records for row in r.get("align_cos", []) for v in row]
    alpha = [v for r in records for row in r.get("align_alpha", []) for v in row]
    if cos:
        metrics.alignment_histogram(cos, alpha, out / "alignment.png")
        written.append("alignment.png")
    return written


def ablation_row_metrics(res: dict) -> dict:
    """The ablation columns of one GenRep run's evaluation (the head's numbers)."""

    def at(sigma):
        rows = [r for r in res.get("noise_robustness", []) if abs(r["sigma"] - sigma) < 1e-9]
        return rows[0]["head_top1"] if rows else None

    return {
        "top1": res["head_top1"],
        "ece": res["ece_head"],
        "top1_sigma_0.5": at(0.5),
        "top1_sigma_1.0": at(1.0),
        "posterior_top1": res.get("posterior_top1"),
        "samples_classifier_top1": res.get("samples_classifier_top1"),
        "samples_fd": res.get("samples_fd"),
        "dc_top1": res.get("dc_top1"),
        "dc_ece": res.get("dc_ece"),
    }


def cnn_row_metrics(res: dict) -> dict:
    """The ablation columns of the SmallCNN baseline trained in a run's evaluation."""

    def at(sigma):
        rows = [r for r in res.get("noise_robustness", []) if abs(r["sigma"] - sigma) < 1e-9]
        return rows[0]["cnn_baseline_top1"] if rows else None

    return {
        "top1": res.get("cnn_baseline_top1"),
        "ece": res.get("ece_cnn_baseline"),
        "top1_sigma_0.5": at(0.5),
        "top1_sigma_1.0": at(1.0),
        "posterior_top1": None,
        "samples_classifier_top1": None,
        "samples_fd": None,
        "dc_top1": None,
        "dc_ece": None,
    }


def mean_sd(values: list) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1) of the non-None values; sd None below 2."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, None
    return m, (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5


def run_ablation(out: Path, overrides: list[str] = (), seeds: int = 1, log=print) -> dict:
    """Train every ablation row for ``seeds`` seeds (``seed``, ``seed + 1``, ...) from one shared
    stage-0 checkpoint (trained once, with the base seed); writes ablation.json, ablation.md and
    ablation.png to ``out`` and returns the summary (see ``ablation.json``)."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
    base = out / "ablation"
    stage0_dir = base / "stage0"
    cfg0 = load_config(
        "tiny_digits",
        list(overrides) + ["stage1.steps=0", "stage2.steps=0", f"out_dir={stage0_dir}"],
    )
    t_start = time.perf_counter()
    if not (stage0_dir / "checkpoints" / "latest").exists():
        log("ablation: training the shared stage-0 model")
        Trainer(cfg0, stage0_dir).run()
    seed_list = [cfg0.seed + i for i in range(seeds)]
    per_seed: dict[str, list[dict]] = {CNN_ROW: []}
    seconds: dict[str, list[float]] = {}
    for s in seed_list:
        cache: dict = {}  # the baseline CNN (and sample judge) is trained once per seed
        for i, (name, row) in enumerate(ABLATION_ROWS.items()):
            slug = row_folder(name)
            run_dir = base / f"seed{s}" / slug
            cfg = load_config(
                "tiny_digits", list(overrides) + row + [f"seed={s}", f"out_dir={run_dir}"]
            )
            log(f"ablation row: {name}, seed {s}")
            # the seed is the only run-defining key that differs from the stage-0 checkpoint
            res = train_and_evaluate(
                cfg, run_dir, resume=stage0_dir, allow_config_change=s != cfg0.seed, cache=cache
            )
            (run_dir / "eval.json").write_text(json.dumps(res, indent=1))  # (kept if cut short)
            per_seed.setdefault(name, []).append({"seed": s, **ablation_row_metrics(res)})
            seconds.setdefault(name, []).append(res["stage1_seconds"] + res["stage2_seconds"])
            if i == 0:
                per_seed[CNN_ROW].append({"seed": s, **cnn_row_metrics(res)})
    summary = summarize_ablation(per_seed, seconds, seed_list, stage0_dir, overrides)
    summary["wall_seconds"] = time.perf_counter() - t_start
    write_ablation(summary, out)
    return summary


def row_folder(name: str) -> str:
    """An ablation row's folder name: its words joined by ``_`` ("+ both" -> "both")."""
    return "_".join(re.findall(r"[A-Za-z0-9-]+", name))


def summarize_ablation(per_seed, seconds, seed_list, stage0_dir, overrides) -> dict:
    rows = {}
    for name, runs in per_seed.items():
        stats = {k: mean_sd([r[k] for r in runs]) for k, _ in ABLATION_COLUMNS}
        rows[name] = {
            "mean": {k: v[0] for k, v in stats.items()},
            "sd": {k: v[1] for k, v in stats.items()},
            "per_seed": runs,
            "train_seconds_per_seed": seconds.get(name, []),
        }
    return {
        "seeds": seed_list,
        "stage0": str(stage0_dir),
        "overrides": list(overrides),
        "columns": dict(ABLATION_COLUMNS),
        "rows": rows,
    }


def write_ablation(summary: dict, out: Path) -> None:
    (out / "ablation.json").write_text(json.dumps(summary, indent=1))
    (out / "ablation.md").write_text(ablation_markdown(summary))
    ablation_plot(summary, out / "ablation.png")


def collect_ablation(out: str | Path, overrides: list[str] = ()) -> dict:
    """The summary of an ablation cut short, from the ``eval.json`` of every row and seed that
    finished (``out/ablation/seed<S>/<row>/``); writes the three files like ``run_ablation``."""
    out = Path(out)
    per_seed: dict[str, list[dict]] = {CNN_ROW: []}
    seconds: dict[str, list[float]] = {}
    seed_dirs = sorted((out / "ablation").glob("seed*"), key=lambda p: int(p.name[4:]))
    seed_list = []
    for seed_dir in seed_dirs:
        s = int(seed_dir.name[4:])
        for i, name in enumerate(ABLATION_ROWS):
            slug = row_folder(name)
            path = seed_dir / slug / "eval.json"
            if not path.exists():
                continue
            res = json.loads(path.read_text())
            seed_list += [s] if s not in seed_list else []
            per_seed.setdefault(name, []).append({"seed": s, **ablation_row_metrics(res)})
            seconds.setdefault(name, []).append(res["stage1_seconds"] + res["stage2_seconds"])
            if i == 0:
                per_seed[CNN_ROW].append({"seed": s, **cnn_row_metrics(res)})
    summary = summarize_ablation(
        per_seed, seconds, seed_list, out / "ablation" / "stage0", overrides
    )
    write_ablation(summary, out)
    return summary


def _cell(mean, sd) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")


def ablation_markdown(summary: dict) -> str:
    n = len(summary["seeds"])
    lines = [
        f"Mean ± sample sd over {n} seed{'s' if n > 1 else ''} ({summary['seeds']}; one seed: "
        "no sd), one shared stage-0 model. top-1, ECE and the noise columns are the head's "
        "(the CNN's in its row); samples are judged by a SmallCNN trained on real images only; "
        "FD: Frechet distance of its features, samples vs held-out images (lower is closer).",
        "",
        "| row | " + " | ".join(h for _, h in ABLATION_COLUMNS) + " |",
        "|---|" + "---:|" * len(ABLATION_COLUMNS),
    ]
    for name, r in summary["rows"].items():
        cells = [_cell(r["mean"][k], r["sd"][k]) for k, _ in ABLATION_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ablation_plot(summary: dict, path: Path) -> Path:
    """One panel per column: a horizontal bar per row, the sd as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["rows"])
    cols = ABLATION_COLUMNS
    fig, axes = plt.subplots(1, len(cols), figsize=(2.9 * len(cols), 0.45 * len(names) + 1.4))
    for j, (ax, (key, header)) in enumerate(zip(axes, cols)):
        means = [summary["rows"][n]["mean"][key] for n in names]
        sds = [summary["rows"][n]["sd"][key] for n in names]
        pos = [i for i, m in enumerate(means) if m is not None]
        ax.barh(
            pos,
            [means[i] for i in pos],
            xerr=[sds[i] or 0.0 for i in pos],
            color="tab:blue",
            capsize=3,
        )
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names if j == 0 else [], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(header, fontsize=9)
        if key != "samples_fd":
            lo = min([means[i] for i in pos], default=0.0)
            ax.set_xlim(max(0.0, lo - 0.1) if key != "ece" else 0.0, 1.0 if key != "ece" else None)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# (key, what it measures, chance level) of the report's metric table; chance is for 10 classes
# and is filled in from the class count
METRIC_EXPLANATIONS = (
    ("head_top1", "GenRep's perception head, fraction of held-out images classified right", "{c}"),
    (
        "posterior_top1",
        "the generative classifier argmax_y p(x|y) of a freshly built chain bank "
        "(the teacher of L_gen_distil)",
        "{c}",
    ),
    ("head_nll", "head's mean -log p(true class), nats", "{lnc}"),
    ("posterior_nll", "posterior's mean -log p(true class), nats", "{lnc}"),
    ("ece_head", "head's expected calibration error (15 bins; 0 is calibrated)", "-"),
    ("ece_posterior", "posterior's expected calibration error", "-"),
    (
        "cnn_baseline_top1",
        "a small CNN trained on the same images, batch size and number of "
        "supervised steps (no diffusion): the discriminative baseline",
        "{c}",
    ),
    ("ece_cnn_baseline", "the CNN's expected calibration error", "-"),
    (
        "ce_head_top1",
        "a head of the same shape trained by cross-entropy alone on the final backbone's frozen "
        "features: what GenRep's head objective adds on the same features",
        "{c}",
    ),
    (
        "gen_head_accuracy",
        "GenRep's own head on its class-conditional samples (not independent)",
        "{c}",
    ),
    (
        "samples_classifier_top1",
        "the CNN (trained on real images only) on the samples: do they "
        "look like the class they were asked for?",
        "{c}",
    ),
    (
        "samples_fd",
        "Frechet distance, samples vs held-out images, in the CNN's 64-d pooled "
        "features (lower is closer)",
        "-",
    ),
    (
        "train_vs_heldout_fd",
        "the same distance for as many real training images as there are samples: what a "
        "generator of real digits would score at this sample size",
        "-",
    ),
    (
        "xsem_probe_top1",
        "logistic regression on x_sem (the semantic output of the perception "
        "branch), fitted on training images, scored on held-out images",
        "{c}",
    ),
    (
        "pixel_probe_top1",
        "the same probe on the raw pixels: what x_sem must beat to add anything",
        "{c}",
    ),
    ("teacher_bandwidth", "the chain bank's sigma_min (the teacher's kernel bandwidth)", "-"),
    ("teacher_val_nll", "the teacher's mean -log p(true class) on {split}", "{lnc}"),
)


def environment_lines(device: str, env: dict | None = None) -> list[str]:
    """Device, versions and commit (``unknown`` outside a git checkout); ``env``: the
    ``benchmarking.environment()`` taken when the run started (else now)."""
    import diffusers
    import torch

    import genrep_fast
    from genrep_fast.benchmarking import environment

    env = env or environment(device)
    return [
        f"- Device: {env['device']} ({env['device_name']}), {env['cpu_threads']} CPU thread(s)",
        f"- Versions: torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"genrep_fast {genrep_fast.__version__}, Python {env['python']}",
        f"- Commit: {env['commit']}",
        f"- Written: {env['date']}",
    ]


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def report_markdown(
    cfg, res: dict, summary: dict | None, records: list[dict] = (), out: Path | None = None
) -> str:
    """The demo's report.md: what was trained, each metric with what it measures and its chance
    level, where the files are, the pictures, the mechanism diagnostics and the ablation."""
    import math

    c = cfg.model.num_classes
    chance = {"c": f"{1 / c:.3f}", "lnc": f"{math.log(c):.3f}"}
    out = Path(out) if out is not None else None
    lines = [
        "# genrep-fast demo: GenRep on the 8x8 handwritten digits",
        "",
        "What was trained: a class-conditional diffusion model (a tiny diffusers UNet2DModel) on "
        f"scikit-learn's 8x8 digits ({c} classes), then GenRep's two stages on top of it "
        "(docs/METHOD.md): stage 1 trains a perception head on the diffusion features with "
        "cross-entropy plus a KL to the chain bank's class posterior; stage 2 trains perception "
        "and generation together with aligned gradients. Scores are on "
        f"{res['test_images']} held-out images never used in training; chance top-1 is "
        f"{1 / c:.3f}.",
        "",
        f"Classes: {', '.join(res['class_names'])}." if res.get("class_names") else "",
        "",
        f"Config `tiny_digits` (ops: {cfg.runtime.ops}); stage 0 {cfg.stage0.steps} / stage 1 "
        f"{cfg.stage1.steps} / stage 2 {cfg.stage2.steps} steps of batch {cfg.data.batch_size}; "
        f"chain bank N={cfg.diffusion.num_steps}, burn-in {cfg.diffusion.burn_in}, thin "
        f"{cfg.diffusion.thin}, {cfg.diffusion.chains_per_class} chains per class.",
        "",
        *environment_lines(res.get("device", "cpu"), res.get("environment")),
        "- Files: `metrics.json` (every number here), `run/` (checkpoints, `metrics.jsonl` with "
        "the training log, `config.json`), the PNGs below",
        "",
        "## Metrics",
        "",
        "| metric | value | what it measures | chance |",
        "|---|---:|---|---:|",
    ]
    split = res.get("teacher_val_split", "validation images")
    for key, what, ch in METRIC_EXPLANATIONS:
        if key in res:
            lines.append(
                f"| {key} | {_fmt(res[key])} | {what.format(split=split)} | {ch.format(**chance)} |"
            )
    if "noise_robustness" in res:
        lines += [
            "",
            "## Robustness",
            "",
            "Top-1 on the held-out images with Gaussian noise of std sigma added to the pixels "
            "(images in [-1, 1], not clipped), and with the images noised by the diffusion "
            "process to timestep t. CE-only head: a head of the same shape trained by "
            "cross-entropy alone on the final backbone's frozen features (the `CE-only diffusion "
            "head` row of `--ablation` is the other comparison: features trained without "
            "GenRep's losses).",
            "",
            "| sigma | head | posterior | CE-only head | CNN baseline |",
            "|---:|---:|---:|---:|---:|",
        ]

        def cells(r):
            keys = ("head_top1", "posterior_top1", "ce_head_top1", "cnn_baseline_top1")
            return " | ".join(_fmt(r.get(k)) for k in keys)

        for r in res["noise_robustness"]:
            lines.append(f"| {r['sigma']:g} | {cells(r)} |")
        lines += [
            "",
            "| t | head | posterior | CE-only head | CNN baseline |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in res.get("diffusion_noise_robustness", []):
            lines.append(f"| {r['t']} | {cells(r)} |")
        lines += ["", "![robustness](robustness.png)"]
    lines += [
        "",
        "## Reliability",
        "",
        "Accuracy against confidence in 15 bins; the number above a bar is how many held-out "
        "images fell in that bin.",
        "",
        "![reliability](reliability.png)",
        "",
        "## Class-conditional samples (one row per digit)",
        "",
        "![samples](samples.png)",
        "",
    ]
    lines += mechanism_lines(records, out)
    lines += [
        "## Time",
        "",
        "| stage / section | seconds |",
        "|---|---:|",
    ]
    for k in ("stage0_seconds", "stage1_seconds", "stage2_seconds", "eval_seconds", "wall_seconds"):
        if k in res:
            lines.append(f"| {k} | {res[k]:.1f} |")
    lines += [f"| eval: {k} | {v:.2f} |" for k, v in res.get("eval_timing", {}).items()]
    lines += [f"| train: {k} | {v:.2f} |" for k, v in res.get("timing", {}).items()]
    lines.append("")
    if summary:
        lines += [
            "## Ablation (one shared stage-0 model)",
            "",
            ablation_markdown(summary),
            "![ablation](ablation.png)",
            "",
        ]
    return "\n".join(lines)


def mechanism_lines(records: list[dict], out: Path | None) -> list[str]:
    """The report's loss curves and mechanism diagnostics from the training log."""
    lines: list[str] = []
    if out is None or (out / "loss_curves.png").exists():
        lines += ["## Training losses", "", "![loss curves](loss_curves.png)", ""]
    refresh = [r for r in records if r.get("event") == "bank_refresh"]
    if refresh:
        cols = [k for k in refresh[0] if k.startswith("teacher_top1_")]
        lines += [
            "## The teacher at each bank refresh",
            "",
            "Top-1 of the bank posterior (the KL's teacher) on fixed subsets of the training "
            "images and of "
            + ("validation" if "teacher_top1_val" in cols else "held-out")
            + " images, each time the bank was rebuilt. A teacher below the head on the training "
            "images pulls the head towards its mistakes.",
            "",
            "| stage | step | " + " | ".join(k[len("teacher_top1_") :] for k in cols) + " |",
            "|---:|---:|" + "---:|" * len(cols),
        ]
        for r in refresh:
            lines.append(
                f"| {r['stage']} | {r['step']} | " + " | ".join(f"{r[k]:.3f}" for k in cols) + " |"
            )
        lines.append("")
    cos = [v for r in records for row in r.get("align_cos", []) for v in row]
    if cos:
        alpha = [v for r in records for row in r.get("align_alpha", []) for v in row]
        mean_cos = sum(cos) / len(cos)
        mean_alpha = sum(alpha) / len(alpha)
        lines += [
            "## Gradient alignment in stage 2",
            "",
            f"Per group and step: cosine of the perception and generation gradients (mean "
            f"{mean_cos:.3f} over {len(cos)} values) and alpha = ((cos + 1) / 2)^k (mean "
            f"{mean_alpha:.3f}). A cosine near 0 leaves the update nearly unchanged by alignment.",
            "",
            "![alignment](alignment.png)",
            "",
        ]
    return lines
