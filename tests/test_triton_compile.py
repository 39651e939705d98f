"""The Triton compile gate: every kernel variant that the launchers of genrep_fast.kernels use
compiles for sm_80 (A100) and sm_90 (H100/H200) with Triton's compiler and ptxas, without a GPU,
and none spills registers except in float64 (genrep_fast/compile_gate.py).

The interpreter that runs the other tests here checks neither. Each check below runs on three
reports:

- ``live``: the gate run here, for sm_90 (the H100, the product's target), two worker processes
  sharing the specialisations. This conftest sets TRITON_INTERPRET=1, so the gate runs as a
  subprocess without it; it writes its report into bench/results/smoke/ (git-ignored).
- ``committed`` and ``committed-triton-3.6``: the reports in bench/results/ (this machine's
  triton) and bench/results/triton-3.6/ (the GPU machine's triton), for sm_80 and sm_90. They must
  have been made from these very kernels (``compile_gate.source_fingerprint``): a change to
  kernels/ or to the gate's variants fails ``test_committed_report_is_of_these_kernels`` until
  both are regenerated (README, "Tests").
"""

from __future__ import annotations

import ast
import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from genrep_fast import compile_gate

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "smoke"
LIVE_ARCHS = (90,)
# The committed reports: path, and the command that regenerates it.
COMMITTED = {
    "committed": (
        ROOT / "bench" / "results",
        "python -m genrep_fast.compile_gate --arch 80 90 --out bench/results/",
    ),
    "committed-triton-3.6": (
        ROOT / "bench" / "results" / "triton-3.6",
        "<a venv with triton 3.6>/bin/python -m genrep_fast.compile_gate --arch 80 90 "
        "--out bench/results/triton-3.6/",
    ),
}


def _nvidia_backend_missing() -> str | None:
    try:
        from triton.backends import backends
    except ImportError:
        return "triton is not installed"
    if "nvidia" not in backends:
        return "this triton has no NVIDIA backend (ptxas)"
    return None


pytestmark = pytest.mark.skipif(
    _nvidia_backend_missing() is not None, reason=str(_nvidia_backend_missing())
)


@pytest.fixture(scope="module")
def live() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "genrep_fast.compile_gate", "--out", str(OUT), "--jobs", "2"]
    cmd += ["--arch", *(str(a) for a in LIVE_ARCHS)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    path = OUT / f"{compile_gate.REPORT_NAME}.json"
    assert path.exists(), f"the gate wrote no report:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    data = json.loads(path.read_text())
    data["returncode"] = res.returncode
    data["output"] = res.stdout[-4000:] + res.stderr[-4000:]
    data["expected_archs"] = LIVE_ARCHS
    return data


def _committed(name: str) -> dict:
    folder, _ = COMMITTED[name]
    data = json.loads((folder / f"{compile_gate.REPORT_NAME}.json").read_text())
    data["expected_archs"] = (80, 90)
    return data


@pytest.fixture(scope="module", params=["live", *COMMITTED])
def report(request) -> dict:
    if request.param == "live":
        return request.getfixturevalue("live")
    return _committed(request.param)


def _sections(report: dict) -> list[dict]:
    assert sorted(report["archs"]) == sorted(str(a) for a in report["expected_archs"])
    sections = [report["archs"][str(a)] for a in report["expected_archs"]]
    for s in sections:
        assert "error" not in s, f"sm_{s['arch']} worker failed:\n{s['error']}"
    return sections


def test_every_variant_compiles(report):
    for s in _sections(report):
        assert s["variants"] == len(compile_gate.VARIANTS)
        assert not s["failures"], "\n".join(
            f"sm_{s['arch']} {f['kernel']} {f['constexprs']} ({f['variant']}): {f['summary']}"
            for f in s["failures"]
        )


def test_no_spills_below_float64(report):
    # Allowed: float64 kernels only; a fp32 / bf16 / fp16 kernel spills not one byte.
    for s in _sections(report):
        assert all(e["registers"] for e in s["kernels"]), "a kernel without a ptxas -v record"
        failing = [e for e in s["kernels"] if compile_gate.spill_kind(e) == "FAIL"]
        assert not failing, [(e["kernel"], e["constexprs"], e["spill_stores"]) for e in failing]


def test_spill_rule():
    e = dict(fp64=False, num_warps=4, registers=128, spill_stores=0, spill_loads=0)
    assert compile_gate.spill_kind(e) == ""
    assert compile_gate.spill_kind(e | dict(spill_stores=4, spill_loads=4)) == "FAIL"
    assert compile_gate.spill_kind(e | dict(spill_stores=8, registers=255)) == "FAIL"
    assert compile_gate.spill_kind(e | dict(spill_loads=64)) == "FAIL"
    assert compile_gate.spill_kind(e | dict(spill_loads=64, fp64=True)) == "fp64"


def test_gate_verdict_and_exit_code(report):
    assert report["ok"] and not report["problems"], report["problems"]
    assert compile_gate.verdict(report) == [], "the report's verdict is not its own"
    assert report.get("returncode", 0) == 0, report["output"]


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_report_is_of_these_kernels(name):
    # Changing kernels/*.py (or the gate's variants) without regenerating both committed reports
    # fails here: the sm_80 and triton 3.6 compiles are checked from those reports only.
    rep = _committed(name)
    _, command = COMMITTED[name]
    assert rep.get("fingerprint") == compile_gate.source_fingerprint(), (
        f"bench/results/{name} was compiled from other kernels or variants (fingerprint "
        f"{rep.get('fingerprint')}, these are {compile_gate.source_fingerprint()}): rerun {command}"
    )
    if name == "committed-triton-3.6":
        assert rep["triton"].startswith("3.6"), rep["triton"]


def _spec_counts(section: dict) -> collections.Counter:
    return collections.Counter(
        json.dumps([e["kernel"], e["constexprs"], e["pointers"], e["num_warps"], e["num_stages"]])
        for e in section["kernels"]
    )


def test_two_workers_compile_what_one_process_compiled(live):
    # The live gate shares sm_90's specialisations between two workers; the committed report
    # compiled them in one process. With the same triton the two must list the same kernels.
    rep = _committed("committed")
    if rep["triton"] != live["triton"]:
        pytest.skip(f"committed with triton {rep['triton']}, this is {live['triton']}")
    section = live["archs"]["90"]
    assert section["workers"] == 2
    assert _spec_counts(section) == _spec_counts(rep["archs"]["90"])


def test_merge_sections_joins_workers_and_reports_each_error_once():
    def kernel(name, h, variants):
        return dict(kernel=name, hash=h, constexprs={"B": 1}, pointers={}, variants=variants)

    launcher = dict(kernel="(launcher)", constexprs={}, variant="v3", summary="bad")
    compile_error = dict(kernel="k", constexprs={"B": 2}, variant="v1", summary="ptxas")
    common = dict(arch=90, triton="3.9", ptxas="13", variants=3, launches=7)
    a = dict(common, kernels=[kernel("k", "h1", ["v1"]), kernel("k", "h2", ["v2"])], wall_s=2.0)
    b = dict(common, kernels=[kernel("k", "h1", ["v3"]), kernel("j", "h3", ["v1"])], wall_s=3.0)
    a["failures"], b["failures"] = [launcher, compile_error], [dict(launcher)]
    merged = compile_gate.merge_sections([a, b])
    by_hash = {e["hash"]: e["variants"] for e in merged["kernels"]}
    assert by_hash == {"h1": ["v1", "v3"], "h2": ["v2"], "h3": ["v1"]}
    assert merged["failures"] == [launcher, compile_error]
    assert (merged["variants"], merged["launches"], merged["wall_s"]) == (3, 7, 3.0)
    assert merged["workers"] == 2
    assert a["kernels"][0]["variants"] == ["v1"]  # the workers' sections are left as they were


def _jit_kernels() -> set[str]:
    """Names of the ``@triton.jit`` kernels (``*_kernel``) defined in kernels/*.py."""
    names = set()
    for path in (ROOT / "kernels").glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                if any("jit" in ast.unparse(d) for d in node.decorator_list):
                    names.add(node.name)
    return names


def test_every_kernel_is_launched_by_a_variant(report):
    # A new kernel (or one no longer reached by any variant) must get variants in
    # compile_gate.VARIANTS.
    kernels = _jit_kernels()
    assert kernels
    for s in _sections(report):
        assert kernels <= {e["kernel"] for e in s["kernels"]}


def _tuning_lists() -> dict[str, tuple]:
    """The config lists of kernels/tuning.py's launchers, per kernel."""
    from genrep_fast.kernels import mixture, mixture_backward

    return {
        "_mixture_diff_kernel": mixture.DIFF_CONFIGS + mixture.DIFF_CONFIGS_DIAG,
        "_mixture_diff_redo_kernel": mixture.REDO_CONFIGS,
        "_mixture_bwd_rows_kernel": mixture_backward.ROWS_CONFIGS
        + mixture_backward.ROWS_CONFIGS_DIAG,
        "_mixture_bwd_bank_kernel": mixture_backward.BANK_CONFIGS
        + mixture_backward.BANK_CONFIGS_DIAG,
        "_bank_operand_kernel": (mixture.PREP_CONFIG,),
    }


def test_every_tuning_config_is_compiled(report):
    # The autotuner may pick any config of a list on the GPU: each must have compiled (and passed
    # the spill rule above) at the configs' shapes, where no tile is capped (T >= 75, D = 4096).
    for s in _sections(report):
        for kernel, configs in _tuning_lists().items():
            compiled = {
                (e["num_warps"], e["num_stages"], *sorted(e["constexprs"].items()))
                for e in s["kernels"]
                if e["kernel"] == kernel
            }
            for cfg in configs:
                blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK_")}
                if kernel == "_mixture_diff_kernel":  # a program per row, or per span of steps
                    blocks["T_TILES"] = cfg.get("T_TILES", 0)
                assert any(
                    c[:2] == (cfg["num_warps"], cfg["num_stages"])
                    and blocks.items() <= dict(c[2:]).items()
                    for c in compiled
                ), f"sm_{s['arch']}: {kernel} never compiled at {cfg}"


def test_tf32x3_operands_round_to_nearest_in_the_ptx(report):
    # tf32x3 splits fp32 operands into hi + lo in the kernel (Triton's cvt.rna); the tf32 mode
    # reads operands rounded to nearest tf32 once, in gemm_operand (a plain tf32 dot would
    # truncate: tests/test_gpu_large.py::test_tf32_check_on_cpu_tells_rounding_from_truncation).
    for s in _sections(report):
        gemm = [e for e in s["kernels"] if e["kernel"] == "_mixture_gemm_kernel"]
        modes = {e["constexprs"]["PRECISION"] for e in gemm}
        assert {1, 2, 3} <= modes
        for e in gemm:
            assert e["mma"], f"sm_{s['arch']}: the GEMM kernel's PTX has no tensor-core op: {e}"
            if e["constexprs"]["PRECISION"] == 2:
                assert e["tf32_rounds"] > 0, f"sm_{s['arch']}: unrounded tf32x3 operands: {e}"


def test_every_gemm_config_compiles_without_spills_and_uses_wgmma_on_sm90(report):
    from genrep_fast.kernels.mixture import GEMM_CONFIGS

    for s in _sections(report):
        for i in range(len(GEMM_CONFIGS)):
            names = {v.name for v in compile_gate.VARIANTS if v.gemm_config == i}
            entries = [e for e in s["kernels"] if names & set(e["variants"])]
            assert names and names <= {n for e in entries for n in e["variants"]}, (s["arch"], i)
            for e in entries:  # the GEMM kernel and the launcher's non-finite redo kernel
                # (the redo kernel, a rare path, is held to the gate's spill rule, which allows
                # ptxas's few-byte spills well below the register ceiling: sm_80 spills 12 B of
                # it at 32 registers)
                if e["kernel"] == "_mixture_gemm_kernel":
                    assert not compile_gate.spills(e), (s["arch"], i, e["constexprs"])
                assert not compile_gate.shared_memory_too_large(e), (s["arch"], i, e["shared"])
                if s["arch"] >= 90 and e["kernel"] == "_mixture_gemm_kernel":
                    assert e["mma"] == "wgmma", (s["arch"], i, e["constexprs"], e["mma"])


def test_split_epilogue_loads_four_values_per_instruction_where_t_allows(report):
    # _gemm_lse_kernel takes T as a constexpr so that at T = 100 (DiT-XL/2's bank, a multiple of
    # 4) every [BLOCK_C, BLOCK_T] load is a 128-bit vector load; only |x|^2's scalar is not.
    # With T a runtime argument every load was scalar (ld.global.b32) and the kernel
    # instruction-bound on the H100 (bench/results/gpu-h100-20261127).
    for s in _sections(report):
        lse = [e for e in s["kernels"] if e["kernel"] == "_gemm_lse_kernel"]
        by4 = [e for e in lse if e["constexprs"]["T"] % 4 == 0 and e["constexprs"]["T"] >= 4]
        assert by4, f"sm_{s['arch']}: no variant launches the epilogue at a T divisible by 4"
        for e in by4:
            assert e["vector_loads"] == e["global_loads"] - 1, (s["arch"], e)


def test_every_per_image_config_is_modelled_from_its_own_kernel(report):
    # The report's per-image table finds, for each DIFF_CONFIGS entry, the kernel compiled for it
    # (same tile, stages, T tiles, warps). The H100's ncu profile of config 2 in bf16 (bench/
    # results/gpu-h100-20261127, 101 registers there) read 2 blocks per SM and 2.42 waves.
    from genrep_fast.kernels.mixture import DIFF_CONFIGS

    for s in _sections(report):
        rows = compile_gate.diff_config_rows(s)
        assert len(rows) == 2 * len(DIFF_CONFIGS), s["arch"]
        assert not [r for r in rows if "not compiled" in r], s["arch"]
        for row in rows:
            _, dtype, tile, stages, t_tiles, warps, regs, smem = row.split("|")[1:9]
            block_t, block_d = tile.split("x")
            want = dict(BLOCK_T=int(block_t), BLOCK_D=int(block_d), D_STAGES=int(stages))
            want["T_TILES"] = int(t_tiles)
            assert any(
                e["kernel"] == "_mixture_diff_kernel"
                and f"mixture/ldm8/{dtype.strip()}/per_image/sigma=CT/ieee" in e["variants"]
                and want.items() <= e["constexprs"].items()
                and (e["num_warps"], e["registers"], e["shared"])
                == (int(warps), int(regs), int(smem))
                for e in s["kernels"]
            ), (s["arch"], row)
        if s["arch"] == 90:
            cells = [c.strip() for c in rows[len(DIFF_CONFIGS) + 2].split("|")]
            assert cells[1:3] == ["2", "bf16"] and cells[9:12] == ["2 regs", "640", "2.42 (81%)"]


def test_per_image_table_is_at_the_benchmark_s_shape():
    # compile_gate cannot import bench/ (not a package): the shape is written twice, held equal here.
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from bench_posterior import PER_IMAGE_GPU
    finally:
        sys.path.remove(str(ROOT / "bench"))
    sh = compile_gate.PER_IMAGE_SHAPE
    assert PER_IMAGE_GPU == {"B": sh.batch, "C": sh.classes, "T": sh.steps, "D": sh.dim}


def test_every_report_table_row_has_its_header_s_cells(report):
    md = compile_gate.markdown(report)
    header = None
    for line in md.splitlines():
        if not line.startswith("|"):
            header = None
        elif header is None:
            header = line.count("|")
        else:
            assert line.count("|") - line.count("\\|") == header, line


def test_ptx_global_load_count():
    ptx = (
        "ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];\n"
        "ld.global.b32 %r5, [%rd2];\n"
        "ld.global.L1::evict_last.v2.f32 {%f1, %f2}, [%rd3];\n"
        "ld.global.nc.b64 %rd4, [%rd5];\n"
        "ld.shared.b32 %r6, [%r7];\n"
        "st.global.v4.b32 [%rd6], {%r1, %r2, %r3, %r4};\n"
    )
    out = compile_gate.ptx_summary(ptx)
    assert (out["global_loads"], out["vector_loads"]) == (4, 2)


def test_shared_memory_rule():
    e = dict(arch=80, shared=compile_gate.SHARED_MEMORY_LIMIT[80])
    assert not compile_gate.shared_memory_too_large(e)
    assert compile_gate.shared_memory_too_large(e | dict(shared=e["shared"] + 1))
    assert not compile_gate.shared_memory_too_large(e | dict(arch=90, shared=e["shared"] + 1))


def test_register_file_rule():
    """A block's threads share 64 Ki registers: 255 per thread fit 8 warps, 128 fit 16. A 16-warp
    kernel that ``maxnreg`` let past 128 compiles and then cannot launch; the verdict names it."""
    e = dict(arch=90, registers=255, num_warps=8)
    assert not compile_gate.registers_too_many(e)
    assert not compile_gate.registers_too_many(e | dict(registers=128, num_warps=16))
    assert compile_gate.registers_too_many(e | dict(registers=129, num_warps=16))
    # Whole warps per sub-partition: 12 warps are 3 per sub-partition, 168 registers each (5376 of
    # 16 Ki), not 65536 // (32 * 12) = 170.
    assert compile_gate.register_ceiling(12) == 168
    entry = dict(
        e, kernel="_k", constexprs={"BLOCK": 64}, shared=0, spill_stores=0, spill_loads=0,
        fp64=False, num_warps=16, registers=204,
    )  # fmt: skip
    report = {"archs": {"90": {"arch": 90, "failures": [], "kernels": [entry]}}}
    assert compile_gate.verdict(report) == [
        "sm_90: _k BLOCK=64 needs 204 registers per thread at 16 warps (limit 128: 64 Ki per block)"
    ]
    report["archs"]["90"]["kernels"] = [entry | dict(num_warps=8)]
    assert compile_gate.verdict(report) == []


def test_ptxas_log_parsing():
    log = (
        "ptxas info    : Compiling entry function '_k' for 'sm_90'\n"
        "ptxas info    : Function properties for _k\n"
        "    48 bytes stack frame, 40 bytes spill stores, 44 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers\n"
    )
    assert compile_gate.parse_ptxas_log(log) == {
        "registers": 255,
        "stack_frame": 48,
        "spill_stores": 40,
        "spill_loads": 44,
    }
    assert compile_gate.parse_ptxas_log("ptxas info : nothing") is None
