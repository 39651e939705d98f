"""tools/gpu_targets.py on the committed H100 results (run 2): the verdicts of the hand table."""

import copy
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
H100 = (
    ROOT / "bench/results/gpu-h100-20261126/run2/bench/NVIDIA-H100-80GB-HBM3-20261126-165641.json"
)

spec = importlib.util.spec_from_file_location("gpu_targets", ROOT / "tools/gpu_targets.py")
gpu_targets = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_targets)

EXPECTED = {  # bench/results/gpu-h100-20261126/README.md, read from the JSON
    "per-image bank B=64 fp32, fraction of copy BW": "miss",  # 0.844, "at the line" by hand
    "per-image bank B=64 bf16, fraction of copy BW": "miss",
    "shared bank tf32x3, raw bank, time / plain GEMM": "miss",
    "shared bank tf32x3, prepared bank, time / plain GEMM": "not measured",  # no such row then
    "shared bank bf16, raw bank, time / plain GEMM": "miss",
    "shared bank bf16, prepared bank, time / plain GEMM": "not measured",
    "candidates K=20 bf16, us per image": "met",
    "candidates K=20 fp32, fraction of copy BW": "met",
    "all classes tf32x3, us per image": "miss",
    "all classes tf32x3, prepared bank, us per image": "not measured",
    "alignment fp32 ops, fraction of copy BW": "miss",
    "alignment fp32 ops, speedup over eager": "miss",
    "alignment fp32 ops, speedup over flattened": "miss",
    "fused KL fwd+bwd, speedup over eager": "miss",
    "fused KL fwd+bwd, both replayed from CUDA graphs, speedup over eager": "not measured",
}


def test_h100_verdicts_match_hand_table():
    rows = gpu_targets.evaluate(json.loads(H100.read_text()))
    got = {label: verdict for label, _, _, verdict in rows}
    assert got == EXPECTED
    values = {label: value for label, value, _, _ in rows}
    assert abs(values["shared bank tf32x3, raw bank, time / plain GEMM"] - 2.72) < 0.01
    assert abs(values["shared bank bf16, raw bank, time / plain GEMM"] - 23.2) < 0.1
    assert abs(values["fused KL fwd+bwd, speedup over eager"] - 0.661) < 0.01
    assert abs(values["candidates K=20 bf16, us per image"] - 5.08) < 0.01


PREPARED = ROOT / (
    "bench/results/gpu-h100-20261126c/run3/bench/NVIDIA-H100-80GB-HBM3-20261126-215822.json"
)


def test_prepared_bank_rows():
    # bench/results/gpu-h100-20261126c/README.md: tf32x3 on a prepared bank 4.381 / 3.971 ms.
    rows = gpu_targets.evaluate(json.loads(PREPARED.read_text()))
    got = {label: (value, verdict) for label, value, _, verdict in rows}
    value, verdict = got["shared bank tf32x3, prepared bank, time / plain GEMM"]
    assert abs(value - 1.103) < 0.01 and verdict == "met"
    value, verdict = got["shared bank bf16, prepared bank, time / plain GEMM"]
    assert abs(value - 4.37) < 0.01 and verdict == "miss"
    value, verdict = got["all classes tf32x3, prepared bank, us per image"]
    assert abs(value - 17.1) < 0.1 and verdict == "miss"


def test_missing_record_is_not_measured():
    results = json.loads(H100.read_text())
    dropped = copy.deepcopy(results)
    dropped["records"] = [
        r
        for r in dropped["records"]
        if r["case"] not in ("candidates_K20_bfloat16", "kl_loss_fwd_bwd")
    ]
    got = {label: verdict for label, _, _, verdict in gpu_targets.evaluate(dropped)}
    assert got["candidates K=20 bf16, us per image"] == "not measured"
    assert got["fused KL fwd+bwd, speedup over eager"] == "not measured"
    assert got["candidates K=20 fp32, fraction of copy BW"] == "met"
    empty = gpu_targets.evaluate({"records": []})
    assert {v for _, _, _, v in empty} == {"not measured"}
    text = gpu_targets.markdown({"records": []})
    assert "not measured" in text and "| met |" not in text


def test_cli_writes_table(tmp_path):
    out = tmp_path / "targets.md"
    assert gpu_targets.main([str(H100), "--out", str(out)]) == 0
    assert "NVIDIA H100 80GB HBM3" in out.read_text()
    assert gpu_targets.main([str(tmp_path / "absent.json")]) == 2


def test_graph_replayed_kl_row_reads_its_own_case():
    """The graph-replayed KL row reads ``kl_loss_fwd_bwd_graph`` (reference time / fused time),
    not the eager case beside it in the same file."""
    results = json.loads(H100.read_text())
    label = "fused KL fwd+bwd, both replayed from CUDA graphs, speedup over eager"
    for fused_s, verdict in ((15e-6, "met"), (30e-6, "miss")):
        data = copy.deepcopy(results)
        data["records"] += [
            {"case": "kl_loss_fwd_bwd_graph", "impl": "reference", "seconds": 60e-6},
            {"case": "kl_loss_fwd_bwd_graph", "impl": "genrep_fast", "seconds": fused_s},
        ]
        got = {row[0]: row for row in gpu_targets.evaluate(data)}
        assert got[label][1] == 60e-6 / fused_s and got[label][3] == verdict
        assert got["fused KL fwd+bwd, speedup over eager"][3] == "miss"  # the eager row unchanged
