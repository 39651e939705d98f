"""The kernel-performance targets (issue 15) read from a benchmark results JSON.

    python tools/gpu_targets.py RESULTS.json [--out targets.md]

Each target is one row of ``TARGETS``: the record it reads (case, impl), how it turns the
record(s) into a number, the bound and its direction. A record that is absent gives
"not measured", never a verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _find(records, case, impl):
    for r in records:
        if r.get("case") == case and r.get("impl") == impl:
            return r
    return None


def _fraction(case, impl="genrep_fast"):
    def read(records):
        r = _find(records, case, impl)
        return None if r is None or r.get("bandwidth_fraction") is None else r["bandwidth_fraction"]

    return read


def _us_per_image(case, impl="genrep_fast"):
    def read(records):
        r = _find(records, case, impl)
        if r is None or "B" not in r.get("params", {}):
            return None
        return r["seconds"] * 1e6 / r["params"]["B"]

    return read


def _ratio(case, impl, base, inverse=False):
    """seconds(base) / seconds(impl) (a speedup), or its inverse (a time ratio)."""

    def read(records):
        r, b = _find(records, case, impl), _find(records, case, base)
        if r is None or b is None:
            return None
        return r["seconds"] / b["seconds"] if inverse else b["seconds"] / r["seconds"]

    return read


_ALIGN = "dit-like h=1152 blocks=28 fp32"

# (case label, reader, comparison, bound, unit)
TARGETS = [
    (
        "per-image bank B=64 fp32, fraction of copy BW",
        _fraction("per_image_float32"),
        ">=",
        0.85,
        "",
    ),
    (
        "per-image bank B=64 bf16, fraction of copy BW",
        _fraction("per_image_bfloat16"),
        ">=",
        0.85,
        "",
    ),
    (
        "shared bank tf32x3, raw bank, time / plain GEMM",
        _ratio("shared_bank_tf32x3", "genrep_fast", "plain_gemm", inverse=True),
        "<=",
        1.5,
        "x",
    ),
    (
        "shared bank tf32x3, prepared bank, time / plain GEMM",
        _ratio("shared_bank_tf32x3", "genrep_fast_prepared", "plain_gemm", inverse=True),
        "<=",
        1.5,
        "x",
    ),
    (
        "shared bank bf16, raw bank, time / plain GEMM",
        _ratio("shared_bank_bf16", "genrep_fast", "plain_gemm", inverse=True),
        "<=",
        1.2,
        "x",
    ),
    (
        "shared bank bf16, prepared bank, time / plain GEMM",
        _ratio("shared_bank_bf16", "genrep_fast_prepared", "plain_gemm", inverse=True),
        "<=",
        1.2,
        "x",
    ),
    (
        "candidates K=20 bf16, us per image",
        _us_per_image("candidates_K20_bfloat16"),
        "<=",
        10.0,
        " us",
    ),
    (
        "candidates K=20 fp32, fraction of copy BW",
        _fraction("candidates_K20_float32"),
        ">=",
        0.70,
        "",
    ),
    ("all classes tf32x3, us per image", _us_per_image("shared_bank_tf32x3"), "<=", 10.0, " us"),
    (
        "all classes tf32x3, prepared bank, us per image",
        _us_per_image("shared_bank_tf32x3", "genrep_fast_prepared"),
        "<=",
        10.0,
        " us",
    ),
    ("alignment fp32 ops, fraction of copy BW", _fraction(_ALIGN, "ops"), ">=", 0.85, ""),
    ("alignment fp32 ops, speedup over eager", _ratio(_ALIGN, "ops", "reference"), ">=", 10.0, "x"),
    (
        "alignment fp32 ops, speedup over flattened",
        _ratio(_ALIGN, "ops", "flattened"),
        ">=",
        20.0,
        "x",
    ),
    (
        "fused KL fwd+bwd, speedup over eager",
        _ratio("kl_loss_fwd_bwd", "genrep_fast", "reference"),
        ">=",
        3.0,
        "x",
    ),
    (
        "fused KL fwd+bwd, both replayed from CUDA graphs, speedup over eager",
        _ratio("kl_loss_fwd_bwd_graph", "genrep_fast", "reference"),
        ">=",
        3.0,
        "x",
    ),
]


def evaluate(results: dict) -> list[tuple[str, float | None, str, str]]:
    """Rows (case, measured, target text, verdict) for a loaded results JSON."""
    records = results.get("records", [])
    rows = []
    for label, read, op, bound, unit in TARGETS:
        try:
            value = read(records)
        except (KeyError, TypeError, ZeroDivisionError):
            value = None
        if value is None:
            verdict = "not measured"
        else:
            verdict = "met" if (value >= bound if op == ">=" else value <= bound) else "miss"
        rows.append((label, value, f"{op} {bound:g}{unit}", verdict))
    return rows


def markdown(results: dict) -> str:
    env = results.get("environment", {})
    head = ", ".join(
        f"{k} {env[k]}"
        for k in ("device_name", "torch", "cuda", "triton", "commit", "command")
        if k in env
    )
    lines = [
        f"Targets (issue 15), {head}",
        "",
        "| case | measured | target | verdict |",
        "|---|---|---|---|",
    ]
    for label, value, target, verdict in evaluate(results):
        shown = "-" if value is None else f"{value:.3g}"
        lines.append(f"| {label} | {shown} | {target} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "results", type=Path, help="benchmark results JSON (pytest bench/ --benchmark)"
    )
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.results.read_text())
    except (OSError, ValueError) as err:
        print(f"gpu_targets: results: cannot read {args.results}: {err}", file=sys.stderr)
        return 2
    text = markdown(results)
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
