"""The demo's independent evaluation, its report and the seeded ablation (issue 13 items 3, 5;
issue 12 item 4), on tiny configs (seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_helpers import TINY, tiny_config

from genrep_fast import reference
from genrep_fast.train import diagnostics, metrics
from genrep_fast.train.baselines import (
    backbone_features,
    cnn_outputs,
    linear_probe_top1,
    train_ce_head,
    train_cnn,
)
from genrep_fast.train.data import load_digits_split
from genrep_fast.train.demo import (
    ABLATION_ROWS,
    CNN_ROW,
    collect_ablation,
    run_ablation,
    run_demo,
)
from genrep_fast.train.trainer import Trainer


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


@pytest.fixture(scope="module")
def cnn(digits):
    train, _ = digits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (a shared 2-core machine: more threads only contend)
    try:
        return train_cnn(train.images, train.labels, 10, steps=150, batch_size=64, seed=0)
    finally:
        torch.set_num_threads(threads)


def test_real_data_classifier_is_well_above_chance(digits, cnn):
    # the judge of the samples: a broken CNN (or one trained on shuffled labels) scores ~0.1
    _, test = digits
    probs, feats = cnn_outputs(cnn, test.images)
    assert metrics.top1(probs, test.labels) > 0.6  # (150 steps: 0.79)
    assert feats.shape == (len(test), 64)


def test_frechet_distance_real_vs_real_is_far_below_real_vs_noise(digits, cnn):
    _, test = digits
    _, f = cnn_outputs(cnn, test.images)
    half = f.shape[0] // 2
    same = metrics.frechet_distance(f[:half], f[half:])
    g = torch.Generator().manual_seed(0)
    _, f_noise = cnn_outputs(cnn, torch.randn(test.images.shape, generator=g))
    noise = metrics.frechet_distance(f, f_noise)
    assert same < 0.1 * noise, (same, noise)
    assert metrics.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_matches_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(1)
    a = torch.randn(200, 6, generator=g, dtype=torch.float64)
    b = (
        torch.randn(150, 6, generator=g, dtype=torch.float64)
        @ torch.randn(6, 6, generator=g, dtype=torch.float64)
        + 0.5
    )
    sa, sb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    covmean = scipy_linalg.sqrtm(sa @ sb).real
    want = float(
        ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean)
    )
    assert metrics.frechet_distance(a, b) == pytest.approx(want, rel=1e-6)


def test_linear_probe_reads_labels_from_informative_features_only(digits):
    train, test = digits
    assert linear_probe_top1(train.images, train.labels, test.images, test.labels) > 0.9
    g = torch.Generator().manual_seed(0)
    noise_tr = torch.randn(len(train), 16, generator=g)
    noise_te = torch.randn(len(test), 16, generator=g)
    assert linear_probe_top1(noise_tr, train.labels, noise_te, test.labels) < 0.25


def test_ce_only_head_learns_the_labels_from_frozen_features(tmp_path, digits):
    # the CE-only head of the robustness rows: trained on the labels it scores well above
    # chance; on shuffled labels (a head that does not learn from them) it stays near chance
    from genrep_fast.train.network import build_network

    train, test = digits
    torch.manual_seed(0)
    net = build_network(tiny_config(tmp_path), torch.device("cpu"))
    f_train, f_test = backbone_features(net, train.images), backbone_features(net, test.images)
    assert [f.shape[0] for f in f_train] == [len(train)] * len(net.adapter.feature_channels)

    def top1(labels):
        head = train_ce_head(
            net, f_train, labels, steps=150, batch_size=64, lr=2e-3, head_kwargs={"hidden": 16}
        )
        with torch.no_grad():
            return metrics.top1(head(f_test)[0].softmax(-1), test.labels)

    g = torch.Generator().manual_seed(0)
    assert top1(train.labels) > 0.6  # (an untrained tiny UNet's features: 0.8)
    assert top1(train.labels[torch.randperm(len(train), generator=g)]) < 0.3


def test_evaluation_cache_trains_the_cnn_once_per_seed(tmp_path, monkeypatch, digits):
    # the ablation's rows of one seed share the baseline CNN; another seed trains its own
    from genrep_fast.train import baselines
    from genrep_fast.train.evaluation import evaluate
    from genrep_fast.train.network import build_network

    train, test = digits
    calls = []
    real = baselines.train_cnn

    def counting(*a, **kw):
        calls.append(kw["seed"])
        return real(*a, **kw)

    monkeypatch.setattr(baselines, "train_cnn", counting)
    extra = [
        "eval.samples_per_class=0",
        "eval.cnn_steps=3",
        "eval.max_test_images=40",
        "eval.noise_timesteps=[0]",
        "eval.dc_trials=0",
    ]
    cfg = tiny_config(tmp_path, *extra)
    torch.manual_seed(0)
    net = build_network(cfg, torch.device("cpu"))
    cache: dict = {}
    results = [
        evaluate(net, c, test, tmp_path / str(i), train_set=train, cache=cache)
        for i, c in enumerate([cfg, cfg, tiny_config(tmp_path, *extra, "seed=5")])
    ]
    assert calls == [0, 5]
    plain = evaluate(net, cfg, test, tmp_path / "plain", train_set=train)
    assert results[1]["cnn_baseline_top1"] == plain["cnn_baseline_top1"]
    assert results[1]["noise_robustness"] == plain["noise_robustness"]


def test_cosine_and_alpha_of_the_alignment_sums():
    p = torch.tensor([1.0, 2.0, 0.0])
    cases = [
        (p, p),
        (p, -p),
        (p, torch.tensor([0.0, 0.0, 3.0])),
        (p, 0.5 * p - torch.tensor([0, 0, 1.0])),
    ]
    sums = torch.stack(
        [torch.stack([(a * b).sum(), (a * a).sum(), (b * b).sum()]) for a, b in cases]
    ).double()
    cos, alpha = diagnostics.cosine_and_alpha(sums, k=2.0)
    want_cos = torch.stack([torch.nn.functional.cosine_similarity(a, b, 0) for a, b in cases])
    assert torch.allclose(cos.float(), want_cos, atol=1e-6)
    assert torch.allclose(alpha, ((cos + 1) / 2) ** 2)
    # the same alpha as the alignment itself uses: a = w_p + w_g (alpha - 1) <p,g> / |p|^2
    a, _ = reference.alignment_coefficients(sums, 2.0, 0.7, 0.3, "symmetric")
    assert torch.allclose(a, 0.7 + 0.3 * (alpha - 1) * sums[:, 0] / sums[:, 1])


def test_trainer_logs_teacher_accuracy_and_alignment_cosines(tmp_path):
    cfg = tiny_config(
        tmp_path, "stage0.steps=2", "stage1.steps=2", "stage2.steps=4", "runtime.log_every=2"
    )
    tr = Trainer(cfg)
    tr.run()
    refresh = [r for r in tr.history if r.get("event") == "bank_refresh"]
    # bank_refresh_every=2: steps 0 of stage 1, 0 and 2 of stage 2
    assert [(r["stage"], r["step"]) for r in refresh] == [(1, 0), (2, 0), (2, 2)]
    # the last record scores the bank the trainer holds now (not the one it replaced)
    x, y = diagnostics.probe_subset(tr.train_set, seed=cfg.seed)
    want = diagnostics.teacher_top1(tr.bank, x, y, cfg.diffusion.precision, tr.backend)
    assert refresh[-1]["teacher_top1_train"] == want
    assert 0 <= refresh[-1]["teacher_top1_heldout"] <= 1
    stage2 = [r for r in tr.history if r["stage"] == 2 and "event" not in r]
    groups = len(tr.align_groups)
    assert [len(r["align_cos"]) for r in stage2] == [2, 2]  # one row per step since the last log
    assert all(len(row) == groups for r in stage2 for row in r["align_cos"])
    cos = torch.tensor([r["align_cos"] for r in stage2])
    assert cos.abs().max() <= 1 and cos.abs().max() > 0  # not a row of zeros
    alpha = torch.tensor([r["align_alpha"] for r in stage2]).double()
    assert torch.allclose(alpha, ((cos.double() + 1) / 2) ** cfg.align.k, atol=1e-4)
    assert all("align_cos" not in r for r in tr.history if r["stage"] < 2)


def _overrides(*extra):
    # the trainer tests' tiny config; a CNN of 150 steps reaches ~0.8 on the digits
    return TINY + ["eval.cnn_steps=150", "eval.max_test_images=120", *extra]


def test_demo_writes_every_metric_and_a_report_people_can_read(tmp_path):
    out = tmp_path / "demo"
    res = run_demo(out, _overrides())
    saved = json.loads((out / "metrics.json").read_text())
    for key in (
        "cnn_baseline_top1",
        "samples_classifier_top1",
        "samples_fd",
        "train_vs_heldout_fd",
        "xsem_probe_top1",
        "pixel_probe_top1",
        "teacher_bandwidth",
        "teacher_val_nll",
        "noise_robustness",
        "diffusion_noise_robustness",
        "ce_head_top1",
        "dc_top1",
    ):
        assert key in saved, key
    chance = saved["chance_top1"]
    assert chance == pytest.approx(0.1)
    assert saved["cnn_baseline_top1"] > chance + 0.4  # a real classifier, not a broken one
    assert saved["pixel_probe_top1"] > 0.8
    assert 0 <= saved["xsem_probe_top1"] <= 1 and 0 <= saved["samples_classifier_top1"] <= 1
    # three tiny training steps: the samples are far from the digits, real training images not
    assert saved["samples_fd"] > 3 * saved["train_vs_heldout_fd"]
    assert saved["teacher_bandwidth"] == pytest.approx(0.7)
    assert saved["teacher_val_nll"] > 0
    rows = saved["noise_robustness"]
    assert [r["sigma"] for r in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # sigma 0 is the clean evaluation: the same numbers as the main metrics
    assert rows[0]["head_top1"] == saved["head_top1"]
    assert rows[0]["posterior_top1"] == saved["posterior_top1"]
    assert rows[0]["cnn_baseline_top1"] == saved["cnn_baseline_top1"]
    assert rows[0]["ce_head_top1"] == saved["ce_head_top1"]
    assert all("ce_head_top1" in r for r in saved["diffusion_noise_robustness"])
    assert rows[-1]["cnn_baseline_top1"] < rows[0]["cnn_baseline_top1"]  # noise hurts it
    assert [r["t"] for r in saved["diffusion_noise_robustness"]] == [0, 100, 250, 500, 750]
    assert saved["diffusion_noise_robustness"][0]["head_top1"] == saved["head_top1"]
    assert res["samples_fd"] == saved["samples_fd"]
    for name in (
        "reliability.png",
        "samples.png",
        "robustness.png",
        "loss_curves.png",
        "alignment.png",
    ):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    for text in (
        "Device: cpu",
        "Commit: ",
        "torch ",
        "diffusers ",
        "genrep_fast ",
        "chance",
        "| cnn_baseline_top1 | ",
        "The teacher at each bank refresh",
        "Gradient alignment in stage 2",
    ):
        assert text in report, text
    rows = {line.split(" | ")[0]: line for line in report.splitlines() if line.startswith("| ")}
    assert rows["| head_top1"].endswith("| 0.100 |")  # the chance column
    assert rows["| head_nll"].endswith(f"| {np.log(10):.3f} |")
    for name in (
        "reliability.png",
        "samples.png",
        "robustness.png",
        "loss_curves.png",
        "alignment.png",
    ):
        assert f"]({name})" in report, name


def test_ablation_with_seeds_writes_every_row(tmp_path):
    out = tmp_path / "abl"
    summary = run_ablation(
        out,
        _overrides(
            "stage1.steps=1",
            "stage2.steps=1",
            "diffusion.bank_refresh_every=0",
            "eval.samples_per_class=1",
            "eval.noise_sigmas=[0.5, 1.0]",
            "eval.noise_timesteps=[0]",
            "eval.max_test_images=60",
            "eval.cnn_steps=5",
        ),
        seeds=2,
    )
    names = [CNN_ROW, *ABLATION_ROWS]
    data = json.loads((out / "ablation.json").read_text())
    assert list(data["rows"]) == names and data["seeds"] == [0, 1]
    for name in names:
        row = data["rows"][name]
        assert [r["seed"] for r in row["per_seed"]] == [0, 1]
        for col in ("top1", "ece", "top1_sigma_0.5", "top1_sigma_1.0"):
            vals = [r[col] for r in row["per_seed"]]
            assert row["mean"][col] == pytest.approx(sum(vals) / 2)
            assert row["sd"][col] == pytest.approx(abs(vals[0] - vals[1]) / 2**0.5)
    assert data["rows"][CNN_ROW]["mean"]["samples_fd"] is None
    assert data["rows"]["+ both"]["mean"]["samples_fd"] is not None
    # the two seeds trained differently from the same stage-0 model (trained once)
    runs = data["rows"]["+ both"]["per_seed"]
    assert runs[0]["top1"] != runs[1]["top1"] or runs[0]["ece"] != runs[1]["ece"]
    assert len(list((out / "ablation" / "stage0" / "checkpoints").glob("stage0-*"))) == 1
    stage1_records = json.loads(
        (out / "ablation" / "seed1" / "both" / "metrics.jsonl").read_text().splitlines()[0]
    )
    assert stage1_records["stage"] == 1  # resumed after stage 0, not retrained
    table = (out / "ablation.md").read_text()
    assert all(f"| {name} |" in table for name in names)
    assert " ± " in table and "n/a" in table
    assert (out / "ablation.png").stat().st_size > 0
    assert summary["rows"].keys() == data["rows"].keys()
    # an ablation cut short is summarised from the runs' eval.json: the same table
    (out / "ablation.json").unlink()
    assert collect_ablation(out)["rows"] == data["rows"]
    assert (out / "ablation.md").read_text() == table


@pytest.mark.parametrize(
    "override, key",
    [
        ("eval.noise_sigmas=[0.5, -1]", "eval.noise_sigmas"),
        ("eval.noise_timesteps=[0, 1000]", "eval.noise_timesteps"),
        ("eval.cnn_steps=-1", "eval.cnn_steps"),
    ],
)
def test_bad_evaluation_settings_name_the_key(override, key):
    from genrep_fast.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_config("tiny_digits", [override])
