"""Few-step runs of every stage on a tiny config; exact resume; SIGTERM writes a checkpoint."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from train_helpers import tiny_config

from genrep_fast.train.checkpoint import CheckpointError, list_checkpoints
from genrep_fast.train.config import ConfigError
from genrep_fast.train.evaluation import dataset_tensors, evaluate, head_probabilities
from genrep_fast.train.trainer import Trainer, TrainingInterrupted, ema_update


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"net.{k}": v.clone() for k, v in trainer.net.state_dict().items()}
    if trainer.teacher is not None:
        out.update({f"teacher.{k}": v.clone() for k, v in trainer.teacher.state_dict().items()})
    return out


def test_all_stages_run_and_evaluate(tmp_path):
    cfg = tiny_config(tmp_path)
    tr = Trainer(cfg)
    before = {k: v.clone() for k, v in tr.net.state_dict().items()}
    tr.run()
    # stage 2 made the unified net and the EMA teacher, both moved from the stage-1 weights
    assert tr.teacher is not None
    after = tr.net.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    steps = [r for r in tr.history if "event" not in r]  # (bank refreshes are events)
    stages = [r["stage"] for r in steps]
    assert stages == [0] * 3 + [1] * 3 + [2] * 3
    last = tr.history[-1]
    assert {"ce", "kl", "ldm", "vlb", "rep_align"} <= set(last)
    assert all(torch.isfinite(torch.tensor(v)).all() for v in last.values())
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in lines if "event" not in r]) == 9 and lines[-1]["stage"] == 2
    for key in (
        "features",
        "bank_refresh",
        "posterior",
        "backward_p",
        "backward_g",
        "alignment",
        "optimizer",
        "ema",
    ):
        assert tr.timer.seconds.get(key, 0) > 0, key
    res = evaluate(tr.net, cfg, tr.test_set, tmp_path)
    # Accuracies are counts over the evaluated images (or the generated samples): k / N exactly.
    n = res["test_images"]
    n_gen = cfg.eval.samples_per_class * tr.net.num_classes
    for key, count in (("head_top1", n), ("posterior_top1", n), ("gen_head_accuracy", n_gen)):
        k = res[key] * count
        assert 0 <= k <= count and k == pytest.approx(round(k), abs=1e-6), (key, res[key], count)
    # The head's metrics against its probabilities, computed here: top-1 exactly, and the ECE
    # between its two bounds |top1 - mean confidence| <= ECE <= mean |correct - confidence|
    # (the triangle inequality over the bins, and within each bin).
    x, y = dataset_tensors(tr.test_set, cfg.eval.max_test_images)
    p = head_probabilities(tr.net, x.to(tr.device)).cpu().double()
    conf, pred = p.max(-1)
    correct = (pred == y.cpu()).double()
    assert res["head_top1"] == pytest.approx(correct.mean().item(), abs=1e-6)
    lower = (correct.mean() - conf.mean()).abs().item()
    upper = (correct - conf).abs().mean().item()
    assert lower - 1e-6 <= res["ece_head"] <= upper + 1e-6, (lower, res["ece_head"], upper)
    assert (tmp_path / "reliability.png").stat().st_size > 0
    assert (tmp_path / "samples.png").stat().st_size > 0


def test_ema_fused_matches_loop():
    torch.manual_seed(0)
    t1 = [torch.randn(5, 3), torch.randn(7)]
    s = [torch.randn(5, 3), torch.randn(7)]
    t2 = [t.clone() for t in t1]
    ema_update(t1, s, 0.999, fused=True)
    ema_update(t2, s, 0.999, fused=False)
    for a, b in zip(t1, t2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    ref = 0.999 * torch.tensor(1.5, dtype=torch.float64) + 0.001 * 2.5
    one = [torch.tensor([1.5])]
    ema_update(one, [torch.tensor([2.5])], 0.999)
    assert abs(float(one[0]) - float(ref)) < 1e-6


def _run_recording_stage2_updates(cfg):
    """Run a trainer; return it and the update handed to the optimiser at every stage-2 step (the
    aligned gradients, read by a global optimiser pre-step hook: whatever the step's code looks
    like, the update it steps with)."""
    tr = Trainer(cfg)
    updates = []

    def hook(opt, args, kwargs):
        if tr.stage == 2:
            grads = [
                p.grad.flatten()
                for g in opt.param_groups
                for p in g["params"]
                if p.grad is not None
            ]
            updates.append(torch.cat(grads).clone())

    handle = register_optimizer_step_pre_hook(hook)
    try:
        tr.run()
    finally:
        handle.remove()
    return tr, updates


def test_reference_ops_give_the_same_training(tmp_path):
    """runtime.ops=reference swaps posterior/alignment/EMA implementations, not the math."""
    steps = ("stage0.steps=1", "stage1.steps=2", "stage2.steps=2")
    a, ups_a = _run_recording_stage2_updates(tiny_config(tmp_path / "a", *steps))
    b, ups_b = _run_recording_stage2_updates(
        tiny_config(tmp_path / "b", *steps, "runtime.ops=reference")
    )

    # Adam turns tiny gradient differences into lr-sized weight changes, so the weights are no
    # test; the losses of every step (which see the updated weights) are.
    # (the fast ops' stage-2 records also carry the alignment cosines: not compared here)
    def step_records(history):
        return [
            {k: v for k, v in r.items() if not k.startswith("align_")}
            for r in history
            if "event" not in r
        ]

    assert len(step_records(a.history)) == len(step_records(b.history)) == 5
    for ra, rb in zip(step_records(a.history), step_records(b.history)):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], rel=1e-3, abs=1e-5), (ra, rb)
    # The losses barely see one step's alignment; the aligned updates do. Measured (max abs
    # difference / max |update|): fast vs reference 1.0e-4 and 1.7e-4; fast with align.mode=none
    # 5.5e-3 and 7.0e-3, with align.groups=global 1.3e-2 and 1.4e-2 (the reference as configured).
    assert len(ups_a) == len(ups_b) == 2
    for ua, ub in zip(ups_a, ups_b):
        scale = ub.abs().max().item()
        torch.testing.assert_close(ua, ub, rtol=0.0, atol=1e-3 * scale)


class _StopAfter:
    """Sends the trainer a (simulated) SIGTERM once stage ``stage`` reaches ``step``."""

    def __init__(self, trainer, stage, step):
        self.trainer, self.stage, self.step = trainer, stage, step
        orig = trainer.train_step

        def wrapped(*a, **k):
            out = orig(*a, **k)
            if trainer.stage == self.stage and trainer.step + 1 == self.step:
                trainer._stop_signal = signal.SIGTERM
            return out

        trainer.train_step = wrapped


@pytest.mark.parametrize(
    "stop_stage, stop_step, extra",
    [(1, 2, ()), (2, 1, ()), (2, 1, ("diffusion.sigma_min=auto",))],
)
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, stop_stage, stop_step, extra):
    full = Trainer(tiny_config(tmp_path / "full", *extra))
    full.run()

    cfg = tiny_config(tmp_path / "cut", *extra)
    first = Trainer(cfg)
    _StopAfter(first, stop_stage, stop_step)
    with pytest.raises(TrainingInterrupted) as info:
        first.run()
    assert info.value.checkpoint is not None and info.value.checkpoint.exists()
    assert info.value.checkpoint.name == f"stage{stop_stage}-{stop_step:08d}"
    del first
    resumed = Trainer(cfg, resume=tmp_path / "cut")
    assert (resumed.stage, resumed.step) == (stop_stage, stop_step)
    resumed.run()

    wf, wr = _weights(full), _weights(resumed)
    assert wf.keys() == wr.keys()
    for k in wf:
        assert torch.equal(wf[k], wr[k]), k


def test_resume_from_bad_checkpoint_is_a_clear_error(tmp_path):
    cfg = tiny_config(tmp_path, "stage1.steps=0", "stage2.steps=0")
    Trainer(cfg).run()
    (ck,) = list_checkpoints(tmp_path / "checkpoints")
    state = ck / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        Trainer(cfg, resume=tmp_path)


def test_resume_with_another_model_is_a_clear_error(tmp_path):
    Trainer(tiny_config(tmp_path, "stage1.steps=0", "stage2.steps=0")).run()
    other = tiny_config(tmp_path / "x", "model.factory_kwargs={block_out_channels: [16, 16]}")
    with pytest.raises(ConfigError, match="model.factory_kwargs"):
        Trainer(other, resume=tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint net: (does not match|.* has shape)"):
        Trainer(other, resume=tmp_path, allow_config_change=True)


def test_dit_backbone_runs_all_stages(tmp_path):
    """A learned-variance DiT: diagonal sigma, the variance (vlb) term, the null class for perception."""
    cfg = tiny_config(
        tmp_path,
        "model.kind=dit",
        "model.factory_kwargs={}",
        "stage0.steps=2",
        "stage1.steps=2",
        "stage2.steps=2",
    )
    tr = Trainer(cfg)
    tr.run()
    assert tr.net.adapter.learned_variance and tr.bank.diagonal
    assert all(torch.isfinite(torch.tensor(v)).all() for v in tr.history[-1].values())


@pytest.mark.parametrize("sigma_min", [0.3, None])
def test_bank_sigma_min_from_config(tmp_path, sigma_min):
    from genrep_fast.models.chain_bank import min_nonzero_std

    value = "null" if sigma_min is None else str(sigma_min)
    cfg = tiny_config(tmp_path, "stage0.steps=0", "stage2.steps=0", f"diffusion.sigma_min={value}")
    tr = Trainer(cfg)
    tr.run()
    d = cfg.diffusion
    want = sigma_min if sigma_min is not None else min_nonzero_std(tr.net.scheduler, d.num_steps)
    assert tr.bank.sigma_min == pytest.approx(want, rel=1e-6)
    assert float(tr.bank.sigma.min()) >= tr.bank.sigma_min
    # the clamp binds at the chain's last (noise-free) steps: some sigma sits exactly on it
    assert float(tr.bank.sigma.min()) == pytest.approx(tr.bank.sigma_min, rel=1e-6)
