"""The Diffusion Classifier: the right class where the answer is known, batched = a per-class
loop, determinism, pruning, bad arguments; as the trainer's KL teacher and in evaluation."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from genrep_fast import diffusion_classifier
from genrep_fast.diffusion_classifier import (
    diffusion_classifier_reference,
    rows_per_image,
    sample_trials,
)
from genrep_fast.models import BackboneAdapter, tiny_unet2d

SHAPE = (1, 5, 5)  # odd sizes


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Hundreds of tiny UNet passes: on a shared 2-core machine two threads ran them several
    # times slower than one (the trainer's runtime.threads makes the same choice).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ExactForOneClass:
    """An adapter whose noise prediction is exact for images of its class: class ``c`` means
    ``x0 = template_c``, so ``eps_hat(x_t, t, c) = (x_t - sqrt(abar_t) template_c) /
    sqrt(1 - abar_t)`` equals the true noise for the true class and is off by
    ``sqrt(abar_t / (1 - abar_t)) (x0 - template_c)`` for every other class."""

    def __init__(self, templates: torch.Tensor, prediction_type: str = "epsilon"):
        self.templates = templates
        self.num_classes = templates.shape[0]
        self.latent_shape = tuple(templates.shape[1:])
        self.scheduler = DDPMScheduler(
            num_train_timesteps=1000,
            beta_schedule="squaredcos_cap_v2",
            prediction_type=prediction_type,
        )
        self.rows = 0  # model rows evaluated

    def predict(self, x_t, t, y, *, validate=True):
        self.rows += x_t.shape[0]
        a = self.scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        tmpl = self.templates[y]
        eps = (x_t - a.sqrt() * tmpl) / (1 - a).sqrt()
        if self.scheduler.config.prediction_type == "v_prediction":
            return a.sqrt() * eps - (1 - a).sqrt() * tmpl
        return eps


def _templates(c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((c, *SHAPE), generator=g) * 2 - 1


def _unet_adapter(num_classes=6, seed=0):
    torch.manual_seed(seed)
    model = tiny_unet2d(8, 1, num_classes, block_out_channels=(8, 16))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    return BackboneAdapter.unet2d(model, sched, attention_backend="sdpa")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_picks_the_class_whose_prediction_is_exact(prediction_type):
    tm = _templates()
    ad = ExactForOneClass(tm, prediction_type)
    y = torch.tensor([3, 0, 6, 1, 1, 5, 2, 4, 0])
    res = diffusion_classifier(ad, tm[y], num_trials=3, seed=1)
    assert torch.equal(res.prediction, y)
    # the true class's error is zero (exact prediction), every other one is not
    true_err = res.errors.gather(1, y[:, None]).squeeze(1)
    assert true_err.abs().max() < 1e-8
    others = res.errors.scatter(1, y[:, None], float("inf"))
    assert others.min() > 1e-3
    assert torch.allclose(res.probs, (-res.errors).softmax(-1))


def test_batched_equals_a_per_class_loop():
    ad = _unet_adapter()
    x0 = torch.randn(2, 1, 8, 8)
    t, eps = sample_trials(2, 3, (1, 8, 8), 1000, torch.Generator().manual_seed(2))
    ref = diffusion_classifier_reference(ad, x0, t, eps, num_classes=4)
    for bs in (5, 4096):  # rows split inside and across images, all at once
        res = diffusion_classifier(
            ad, x0, num_trials=3, num_classes=4, batch_size=bs, trials=(t, eps)
        )
        assert res.rows == 12
        torch.testing.assert_close(res.errors.double(), ref, rtol=1e-5, atol=1e-5 * ref.max())
        assert torch.equal(res.trials, torch.full((2, 4), 3))


def test_deterministic_given_the_seed():
    ad = _unet_adapter()
    x0 = torch.randn(2, 1, 8, 8)
    kw = {"num_trials": 2, "num_classes": 3}
    a = diffusion_classifier(ad, x0, seed=5, batch_size=5, **kw)
    b = diffusion_classifier(ad, x0, seed=5, batch_size=5, **kw)
    c = diffusion_classifier(ad, x0, generator=torch.Generator().manual_seed(5), batch_size=5, **kw)
    assert torch.equal(a.errors, b.errors) and torch.equal(a.errors, c.errors)
    d = diffusion_classifier(ad, x0, seed=6, batch_size=64, **kw)
    assert not torch.allclose(a.errors, d.errors)
    # the trials do not depend on how the rows are batched
    e = diffusion_classifier(ad, x0, seed=5, batch_size=64, **kw)
    torch.testing.assert_close(a.errors, e.errors, rtol=1e-5, atol=1e-4)


def test_pruning_scores_survivors_on_the_shared_trials():
    ad = _unet_adapter()
    x0 = torch.randn(3, 1, 8, 8)
    t, eps = sample_trials(3, 6, (1, 8, 8), 1000, torch.Generator().manual_seed(3))
    full = diffusion_classifier(ad, x0, num_trials=6, num_classes=5, trials=(t, eps))
    first2 = diffusion_classifier(
        ad, x0, num_trials=2, num_classes=5, trials=(t[:, :2], eps[:, :2])
    )
    first4 = diffusion_classifier(
        ad, x0, num_trials=4, num_classes=5, trials=(t[:, :4], eps[:, :4])
    )
    pr = diffusion_classifier(
        ad, x0, num_trials=6, num_classes=5, trials=(t, eps), prune=((2, 3), (4, 1)), batch_size=5
    )
    assert pr.rows == 5 * 2 + 3 * 2 + 1 * 2 == rows_per_image(5, 6, [[2, 3], [4, 1]])
    # round 1 keeps the 3 best after 2 trials, round 2 the best of those after 4
    kept3 = first2.errors.argsort(dim=1, stable=True)[:, :3]
    best = first4.errors.gather(1, kept3).argmin(1)
    winner = kept3.gather(1, best[:, None]).squeeze(1)
    assert torch.equal(pr.prediction, winner)
    assert torch.equal((pr.trials == 6).nonzero()[:, 1], winner)
    for i in range(3):
        for c in range(5):
            n = int(pr.trials[i, c])
            ref = {2: first2, 4: first4, 6: full}[n].errors[i, c]
            torch.testing.assert_close(pr.errors[i, c], ref, rtol=1e-5, atol=1e-4)
    # pruned classes get no probability
    assert torch.equal(pr.probs > 0, pr.trials == 6)


def test_pruning_keeps_the_true_class_and_evaluates_fewer_rows():
    tm = _templates(c=9, seed=4)
    y = torch.arange(9).repeat(2)
    ad = ExactForOneClass(tm)
    full = diffusion_classifier(ad, tm[y], num_trials=8, seed=0)
    full_rows, ad.rows = ad.rows, 0
    pr = diffusion_classifier(ad, tm[y], num_trials=8, prune=((2, 3),), seed=0)
    assert torch.equal(full.prediction, y) and torch.equal(pr.prediction, y)
    assert ad.rows == pr.rows * 18 and full_rows == full.rows * 18
    assert pr.rows == 9 * 2 + 3 * 6 < full.rows == 9 * 8


def test_temperature_scales_the_logits():
    tm = _templates()
    ad = ExactForOneClass(tm)
    x = tm[[1, 2]] + 0.3 * torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    r1 = diffusion_classifier(ad, x, num_trials=2, seed=0)
    r4 = diffusion_classifier(ad, x, num_trials=2, seed=0, temperature=4.0)
    torch.testing.assert_close(r4.probs, (-r1.errors / 4.0).softmax(-1))
    assert torch.equal(r1.errors, r4.errors)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"num_trials": 0}, "num_trials"),
        ({"temperature": 0.0}, "temperature"),
        ({"batch_size": 0}, "batch_size"),
        ({"prune": ((3, 2),), "num_trials": 3}, "after_trials"),
        ({"prune": ((1, 7),)}, "keep"),
        ({"prune": ((1, 3), (2, 3))}, "keep"),
        ({"num_classes": 8}, "num_classes"),
    ],
)
def test_bad_arguments_name_the_argument(kw, match):
    ad = ExactForOneClass(_templates())
    with pytest.raises(ValueError, match=match):
        diffusion_classifier(ad, torch.zeros(2, *SHAPE), **kw)
    with pytest.raises(ValueError, match="x0 must be"):
        diffusion_classifier(ad, torch.zeros(2, 1, 4, 4))


def test_runs_in_eval_mode_and_restores_the_flags():
    ad = _unet_adapter()
    ad.model.train()
    ad.model.mid_block.eval()
    seen = []
    hook = ad.model.conv_in.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    diffusion_classifier(ad, torch.randn(1, 1, 8, 8), num_trials=1)
    hook.remove()
    assert seen and not any(seen)
    assert ad.model.training and not ad.model.mid_block.training


# --------------------------------------------------------------------- in the trainer


def test_trainer_distils_from_the_diffusion_classifier(tmp_path, monkeypatch):
    from train_helpers import tiny_config

    from genrep_fast.train.evaluation import evaluate
    from genrep_fast.train.trainer import Trainer

    cfg = tiny_config(
        tmp_path,
        "loss.teacher=diffusion_classifier",
        "loss.dc_trials=3",
        "loss.dc_prune=[[1, 4]]",
        "eval.dc_trials=2",
        "eval.samples_per_class=0",
    )
    tr = Trainer(cfg)
    calls = []
    import genrep_fast.train.dc as dc

    orig = dc.dc_teacher_log_probs

    def spy(net, x0, cfg_, seed):
        out = orig(net, x0, cfg_, seed)
        calls.append((net, seed, out))
        return out

    monkeypatch.setattr(dc, "dc_teacher_log_probs", spy)
    tr.run()
    assert tr.bank is None  # no chain bank was built
    assert len(calls) == 6  # stages 1 and 2, 3 steps each
    assert len({s for _, s, _ in calls}) == 6  # fresh trials every step
    assert all(net is tr.teacher for net, _, _ in calls[3:])  # stage 2: the EMA network
    for *_, ll in calls:  # 4 classes survive the pruning round
        assert ll.shape == (16, 10) and (torch.isfinite(ll).sum(1) == 4).all()
    assert all(torch.isfinite(torch.tensor(r["kl"])) for r in tr.history if r["stage"] >= 1)
    res = evaluate(tr.net, cfg, tr.test_set, tmp_path)
    for key in ("dc_top1", "dc_ece", "dc_pruned_top1", "dc_pruned_ece"):
        assert 0.0 <= res[key] <= 1.0, key
    assert res["dc_ms_per_image"] > 0 and res["dc_rows_per_image"] == 20
    assert res["dc_pruned_rows_per_image"] == 10 * 1 + 4 * 2


def test_dc_teacher_resumes_bit_exact(tmp_path):
    import signal

    from train_helpers import tiny_config

    from genrep_fast.train.trainer import Trainer, TrainingInterrupted

    extra = ("loss.teacher=diffusion_classifier", "loss.dc_trials=2", "stage2.steps=0")
    full = Trainer(tiny_config(tmp_path / "full", *extra))
    full.run()
    cfg = tiny_config(tmp_path / "cut", *extra)
    first = Trainer(cfg)
    orig = first.train_step

    def stop_after(*a, **k):
        out = orig(*a, **k)
        if first.stage == 1 and first.step + 1 == 2:
            first._stop_signal = signal.SIGTERM
        return out

    first.train_step = stop_after
    with pytest.raises(TrainingInterrupted):
        first.run()
    resumed = Trainer(cfg, resume=tmp_path / "cut")
    resumed.run()
    for k, v in full.net.state_dict().items():
        assert torch.equal(v, resumed.net.state_dict()[k]), k


def test_config_rejects_a_bad_prune_schedule():
    from genrep_fast.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^loss\.dc_prune: .*after_trials"):
        load_config("tiny_digits", ["loss.dc_trials=4", "loss.dc_prune=[[4, 2]]"])
    with pytest.raises(ConfigError, match=r"^loss\.teacher: must be one of"):
        load_config("tiny_digits", ["loss.teacher=dc"])
