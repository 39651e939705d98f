"""The trainer under faults: non-finite batches, a frozen backbone, killed or repeated checkpoint
writes, a resume whose config changes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from train_helpers import TINY, tiny_config

from genrep_fast.cli import main
from genrep_fast.train import checkpoint as ckpt
from genrep_fast.train.config import ConfigError
from genrep_fast.train.data import batch_indices
from genrep_fast.train.trainer import Trainer, TrainingDiverged, TrainingInterrupted

HERE = Path(__file__).parent


def _all_tensors(tr: Trainer) -> dict[str, torch.Tensor]:
    tensors, _ = tr.state()
    return tensors


def _sample_only_in(tr: Trainer, stage: int, step: int) -> int:
    """A training sample in the batch of (stage, step) and in no other batch of the tiny run."""
    n, bs = len(tr.train_set), tr.cfg.data.batch_size
    others = set()
    for s in (0, 1, 2):
        it = batch_indices(n, bs, tr.cfg.seed + 1000 * s)
        for j in range(tr.stage_config(s).steps):
            batch = next(it).tolist()
            if (s, j) != (stage, step):
                others.update(batch)
            else:
                mine = batch
    return next(i for i in mine if i not in others)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_one_nan_pixel_skips_one_step_and_nothing_turns_nan(tmp_path, stage):
    cfg = tiny_config(tmp_path, "runtime.ckpt_every=1", "runtime.keep_checkpoints=2")
    tr = Trainer(cfg)
    k = _sample_only_in(tr, stage, 1)
    tr.train_set.images[k, 0, 3, 4] = float("nan")
    tr.run()

    skipped = [r for r in tr.history if "skipped" in r]
    assert len(skipped) == 1, tr.history
    rec = skipped[0]
    assert (rec["stage"], rec["step"]) == (stage, 2)
    assert k in rec["sample_indices"] and len(rec["sample_indices"]) == cfg.data.batch_size
    assert rec["nonfinite_inputs"] == [f"sample {k}"]
    assert tr.bad_steps == 1 and tr.bad_streak == 0
    assert not ckpt.nonfinite_tensors(_all_tensors(tr))  # student, EMA teacher, bank, moments
    # every other step logged finite losses
    assert all(
        all(v == v for k2, v in r.items() if isinstance(v, float))
        for r in tr.history
        if r not in skipped
    )
    kept = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert len(kept) == 2
    for path in kept:
        tensors, _ = ckpt.load_checkpoint(path)
        assert not ckpt.nonfinite_tensors(tensors), path
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["sample_indices"] for x in lines if "skipped" in x] == [rec["sample_indices"]]


def test_consecutive_bad_steps_stop_the_run(tmp_path):
    cfg = tiny_config(tmp_path, "runtime.max_bad_steps=2", "stage0.steps=5")
    tr = Trainer(cfg)
    before = {k: v.clone() for k, v in tr.net.state_dict().items()}
    tr.train_set.images[:, :, 0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match=r"2 steps in a row .*\(stage 0, steps 1-2"):
        tr.run()
    after = tr.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was applied


def test_a_non_finite_state_is_not_checkpointed(tmp_path):
    cfg = tiny_config(tmp_path, "stage0.steps=1", "stage1.steps=0", "stage2.steps=0")
    tr = Trainer(cfg)
    tr.run()
    (good,) = ckpt.list_checkpoints(tmp_path / "checkpoints")
    with torch.no_grad():
        next(tr.net.parameters())[0] = float("nan")
    tr.step += 1
    assert tr.save() is None
    assert ckpt.list_checkpoints(tmp_path / "checkpoints") == [good]
    assert "refused" in tr.history[-1]["event"]


def test_a_non_finite_bank_is_not_installed(tmp_path, monkeypatch):
    import genrep_fast.train.trainer as trainer_module

    built = []
    real = trainer_module.build_chain_bank

    def second_bank_is_nan(*a, **k):
        bank = real(*a, **k)
        if built:
            bank.mu[0, 0] = float("nan")
        built.append(bank)
        return bank

    monkeypatch.setattr(trainer_module, "build_chain_bank", second_bank_is_nan)
    cfg = tiny_config(tmp_path, "stage0.steps=0", "stage2.steps=0")  # refreshes at steps 0 and 2
    tr = Trainer(cfg)
    tr.run()
    assert len(built) == 2 and tr.bank is built[0]
    assert any("non-finite bank, kept the previous bank" in r.get("event", "") for r in tr.history)
    assert not any("skipped" in r for r in tr.history)

    built.clear()
    built.append(None)  # the first bank of this run is already non-finite
    tr = Trainer(tiny_config(tmp_path / "b", "stage0.steps=0", "stage2.steps=0"))
    with pytest.raises(TrainingDiverged, match="chain bank .* not finite"):
        tr.run()


def _latent_shard(root: Path, rows_nan: list[int], n: int = 64) -> Path:
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(n, 1, 8, 8, generator=g)
    latents[rows_nan, 0, 2, 2] = float("nan")
    path = root / "shard0.safetensors"
    save_file({"latents": latents, "labels": torch.arange(n) % 10}, str(path))
    return path


def _latent_args(out: Path, root: Path, *extra: str) -> list[str]:
    args = ["train", "--out", str(out), "--no-eval"]
    for o in TINY + [
        "data.kind=latents",
        f"data.root={root}",
        "stage0.steps=4",
        "stage1.steps=0",
        "stage2.steps=0",
        *extra,
    ]:
        args += ["--set", o]
    return args


def test_non_finite_latents_are_reported_with_file_and_row(tmp_path):
    shard = _latent_shard(tmp_path / "latents", [37])
    assert main(_latent_args(tmp_path / "run", shard.parent)) == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = [x for x in lines if "skipped" in x]
    assert len(skipped) == 1 and 37 in skipped[0]["sample_indices"]
    assert skipped[0]["nonfinite_inputs"] == [f"{shard} row 37"]


def test_cli_exit_code_4_after_max_bad_steps(tmp_path, capsys):
    shard = _latent_shard(tmp_path / "latents", list(range(64)))
    code = main(_latent_args(tmp_path / "run", shard.parent, "runtime.max_bad_steps=3"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4
    assert err[-1].startswith("genrep-fast: stopped: 3 steps in a row with a non-finite loss")


# ------------------------------------------------------------------------- frozen backbone


def test_backbone_lr_scale_zero_freezes_the_backbone_in_stage(tmp_path):
    cfg = tiny_config(tmp_path, "stage1.backbone_lr_scale=0", "stage2.backbone_lr_scale=0")
    tr = Trainer(cfg)
    tr._enter_stage(1)
    assert not any(p.requires_grad for p in tr.net.backbone.parameters())
    assert all(p.requires_grad for p in tr.net.head.parameters())
    assert not any(n.startswith("backbone.") for n in tr.param_names)
    x = tr.train_set.images[:4].to(tr.device)
    feats = tr.net.adapter.features(x, tr.net.null_labels(4, tr.device))
    assert not any(f.requires_grad for f in feats)  # no graph is built through the backbone


def test_frozen_backbone_trains_stages_1_and_2(tmp_path):
    """The reviewer's command (stage 1, no distillation) crashed with SIGSEGV: torch's CPU
    GroupNorm backward segfaults on a channels-last input whose own gradient is not needed (the
    attention features of a frozen backbone), and the head works around it. Here the head alone,
    then stage 1 without and stage 1 + 2 with distillation train the head and the modulation and
    leave the backbone as it was. In a subprocess, so a regression fails this test instead of
    killing the test run."""
    out = tmp_path / "run"
    sets = TINY + [
        "stage0.steps=0",
        "stage1.steps=2",
        "stage2.steps=2",
        "stage1.backbone_lr_scale=0",
        "stage2.backbone_lr_scale=0",
        "diffusion.bank_refresh_every=0",
    ]
    script = textwrap.dedent(f"""
        import torch
        from genrep_fast.cli import main
        from genrep_fast.models import PerceptionHead

        head = PerceptionHead([8, 16], 10, (1, 8, 8), hidden=16)
        feats = [torch.randn(4, 8, 8, 8).to(memory_format=torch.channels_last),
                 torch.randn(4, 16, 4, 4).to(memory_format=torch.channels_last)]
        logits, x_sem = head(feats)
        grads = torch.autograd.grad(logits.square().sum() + x_sem.sum(), list(head.parameters()))
        assert all(torch.isfinite(g).all() for g in grads)
        print("head ok", flush=True)
        sets = {sets!r}
        for extra, run in ((["loss.gen_distil=false", "stage2.steps=0"], "a"), ([], "c")):
            args = ["train", "--out", {str(out)!r} + run, "--no-eval"]
            for s in sets + extra:
                args += ["--set", s]
            assert main(args) == 0, run
        print("ok")
    """)
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr[-3000:]

    init = Trainer(tiny_config(tmp_path / "init", "stage0.steps=0")).net.state_dict()
    for run in ("a", "c"):
        tensors, meta = ckpt.load_checkpoint(Path(str(out) + run))
        nets = ["net", "teacher"] if run == "c" else ["net"]
        for net in nets:
            for k, v in init.items():
                if k.startswith("backbone."):
                    assert torch.equal(tensors[f"{net}/{k}"], v), (run, net, k)
        head = [k for k in init if k.startswith("head.") and k.endswith("weight")]
        assert any(not torch.equal(tensors[f"net/{k}"], init[k]) for k in head), run
    mod = [k for k in init if k.startswith("modulation.")]
    assert any(not torch.equal(tensors[f"net/{k}"], init[k]) for k in mod)


def test_stage0_cannot_freeze_its_only_trained_part():
    with pytest.raises(ConfigError, match="^stage0.backbone_lr_scale:"):
        from genrep_fast.train.config import load_config

        load_config("tiny_digits", ["stage0.backbone_lr_scale=0"])


# ------------------------------------------------------------------------- checkpoints


def test_sigterm_on_a_checkpoint_step_writes_it_once(tmp_path, monkeypatch):
    names = []
    real = ckpt.save_checkpoint

    def recording(root, name, *a, **k):
        names.append(name)
        return real(root, name, *a, **k)

    monkeypatch.setattr(ckpt, "save_checkpoint", recording)
    cfg = tiny_config(
        tmp_path, "runtime.ckpt_every=2", "stage0.steps=0", "runtime.keep_checkpoints=5"
    )
    tr = Trainer(cfg)
    orig = tr.train_step

    def stop_at_step_2(*a, **k):
        out = orig(*a, **k)
        if tr.step + 1 == 2:
            tr._stop_signal = signal.SIGTERM
        return out

    tr.train_step = stop_at_step_2
    with pytest.raises(TrainingInterrupted) as info:
        tr.run()
    assert names == ["stage1-00000002"]
    assert info.value.checkpoint.name == "stage1-00000002"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == names


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory):
    """A run that ended in stage 1 with a bank in its checkpoints (one per step)."""
    out = tmp_path_factory.mktemp("stage1_run")
    extra = ("stage0.steps=1", "stage1.steps=2", "stage2.steps=0", "runtime.ckpt_every=1")
    Trainer(tiny_config(out, *extra, "runtime.keep_checkpoints=5")).run()
    return out, extra


@pytest.mark.parametrize(
    "change",
    ["seed=1", "data.batch_size=8", "diffusion.candidate_classes=3", "diffusion.thin=1"],
)
def test_resume_with_a_run_defining_change_is_refused(stage1_run, change):
    out, extra = stage1_run
    config_json = (out / "config.json").read_bytes()
    cfg = tiny_config(out, *extra, change)
    key = change.split("=")[0]
    with pytest.raises(ConfigError, match=f"resume: .*{key}: .* -> .*--allow-config-change"):
        Trainer(cfg, resume=out)
    assert (out / "config.json").read_bytes() == config_json  # the run folder is untouched


def test_allowed_bank_change_rebuilds_the_bank(stage1_run, tmp_path):
    out, extra = stage1_run
    cfg = tiny_config(tmp_path, *extra, "stage1.steps=3", "diffusion.thin=1")
    tr = Trainer(cfg, resume=out, allow_config_change=True)
    assert tr.bank is None and (tr.stage, tr.step) == (1, 2)
    tr.run()
    assert tr.bank.mu.shape[1] == cfg.diffusion.num_steps - cfg.diffusion.burn_in  # thin 1


def test_resume_falls_back_when_latest_is_broken(stage1_run, tmp_path):
    import shutil

    src, extra = stage1_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    (out / "checkpoints" / "latest").write_text("stage1-00000009\n")  # e.g. a rename that never ran
    with pytest.warns(UserWarning, match="using stage1-00000002"):
        tr = Trainer(tiny_config(out, *extra), resume=out)
    assert (tr.stage, tr.step) == (1, 2)


def test_stale_checkpoint_temporaries_are_removed_at_start(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / "checkpoints" / f".stage1-00000004.tmp-{dead.pid}"
    stale.mkdir(parents=True)
    (stale / ckpt.STATE_FILE).write_bytes(b"\0" * 4096)
    Trainer(tiny_config(tmp_path))
    assert not stale.exists()
