"""Class names saved with a run; the public ``GenRep`` API (from_pretrained, classify, sample,
save_pretrained to a diffusers folder); the CLI's classify / sample over it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_helpers import TINY

from genrep_fast import GenRep
from genrep_fast.cli import main
from genrep_fast.train import checkpoint as ckpt
from genrep_fast.train.evaluation import head_probabilities
from genrep_fast.train.trainer import load_for_inference


def _write_folder(root, rng):
    """root/cat/*.png (bright) and root/dog/*.png (dark), 8x8 RGB, 12 each."""
    from PIL import Image

    for name, base in (("cat", 200), ("dog", 40)):
        (root / name).mkdir(parents=True)
        for i in range(12):
            arr = np.clip(base + rng.integers(-30, 30, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr, "RGB").save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def cat_dog_run(tmp_path_factory):
    """A few steps of every stage on a two-class image folder, through the CLI."""
    base = tmp_path_factory.mktemp("catdog")
    _write_folder(base / "data", np.random.default_rng(0))
    out = base / "run"
    sets = TINY + [
        "data.kind=image_folder",
        f"data.root={base / 'data'}",
        "data.image_size=8",
        "data.grayscale=false",
        "model.in_channels=3",
        "model.num_classes=2",
        "stage0.steps=2",
        "stage1.steps=2",
        "stage2.steps=2",
    ]
    args = ["train", "--out", str(out), "--no-eval"]
    for o in sets:
        args += ["--set", o]
    assert main(args) == 0
    return base


def test_classify_prints_folder_names(cat_dog_run, capsys):
    img = cat_dog_run / "data" / "cat" / "0.png"
    capsys.readouterr()
    assert main(["classify", "--checkpoint", str(cat_dog_run / "run"), str(img)]) == 0
    line = capsys.readouterr().out.strip()
    # "<file>: cat (0.612), dog (0.388)" (either order: a few steps do not train the head)
    assert line.startswith(f"{img}: ")
    names = [part.split(" (")[0] for part in line[len(f"{img}: ") :].split(", ")]
    assert sorted(names) == ["cat", "dog"]


def test_class_names_in_checkpoint_and_api(cat_dog_run):
    loaded = ckpt.open_checkpoint(cat_dog_run / "run", prefixes=("none/",))
    assert loaded.meta["class_names"] == ["cat", "dog"]
    model = GenRep.from_pretrained(cat_dog_run / "run", device="cpu")
    assert model.class_names == ["cat", "dog"]
    img = cat_dog_run / "data" / "dog" / "3.png"
    res = model.classify([img, str(img)])
    assert res.probs.shape == (2, 2) and res.labels[0] in ("cat", "dog")
    assert torch.allclose(res.probs.sum(-1), torch.ones(2))
    # the same numbers as the trainer's own inference path
    _, net, _ = load_for_inference(cat_dog_run / "run", ["runtime.device=cpu"])
    x = model.to_input([img, img])
    assert torch.equal(res.probs, head_probabilities(net, x))
    assert res.top(1)[0][0][0] == res.labels[0]


def test_checkpoint_without_names_still_loads(cat_dog_run, tmp_path):
    """A checkpoint written before class names were saved: names "0", "1"."""
    loaded = ckpt.open_checkpoint(cat_dog_run / "run")
    meta = {k: v for k, v in loaded.meta.items() if k != "class_names"}
    for k in ("format_version", "serial", "state_bytes", "state_sha256", "meta_sha256"):
        meta.pop(k)
    old = ckpt.save_checkpoint(tmp_path / "checkpoints", "old", loaded.tensors, meta)
    model = GenRep.from_pretrained(old, device="cpu")
    assert model.class_names == ["0", "1"]


def test_sample_names_steps_and_guidance(cat_dog_run):
    from genrep_fast.models import DDPMSampler

    model = GenRep.from_pretrained(cat_dog_run / "run", device="cpu")

    def gen():
        return torch.Generator().manual_seed(5)

    x = model.sample(["dog", 0], steps=4, generator=gen())
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()
    assert torch.equal(x, model.sample(torch.tensor([1, 0]), steps=4, generator=gen()))
    # guidance 0: eps = eps_null, i.e. the null class's (unconditional) chain (up to the float
    # rounding of a batch of 4 against one of 2: ~1e-6; the class-conditional chain is ~0.4 away)
    x0 = model.sample(["cat", "dog"], steps=4, guidance_scale=0.0, generator=gen())
    sampler = DDPMSampler(model.net.adapter, 4, model.modulation)
    null = torch.full((2,), model.net.null_class)
    torch.testing.assert_close(x0, sampler.sample(null, generator=gen()), atol=1e-5, rtol=0)
    x3 = model.sample(["cat", "dog"], steps=4, guidance_scale=3.0, generator=gen())
    assert not torch.equal(x3, model.sample(["cat", "dog"], steps=4, generator=gen()))
    with pytest.raises(ValueError, match="labels\\[0\\]: unknown class 'horse'"):
        model.sample(["horse"], steps=4)
    with pytest.raises(ValueError, match="steps"):
        model.sample(["cat"], steps=0)


def test_cli_sample_steps_and_guidance(cat_dog_run, tmp_path, capsys):
    png = tmp_path / "s.png"
    run = str(cat_dog_run / "run")
    args = ["sample", "--checkpoint", run, "--out", str(png), "--per-class", "2", "--steps", "3"]
    assert main(args + ["--guidance-scale", "2"]) == 0
    assert png.stat().st_size > 0
    capsys.readouterr()
    assert main(args[:-1] + ["0"]) == 2
    err = capsys.readouterr().err
    assert "steps" in err and "Traceback" not in err


def test_save_pretrained_loads_with_diffusers_alone(cat_dog_run, tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    model = GenRep.from_pretrained(cat_dog_run / "run", device="cpu")
    folder = model.save_pretrained(tmp_path / "export")
    unet = UNet2DModel.from_pretrained(folder).eval()
    sched = DDPMScheduler.from_pretrained(folder)
    assert sched.config.num_train_timesteps == model.scheduler.config.num_train_timesteps
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([10, 500, 999])
    y = torch.tensor([0, 1, model.net.null_class])
    theirs_sd = unet.state_dict()
    assert sorted(theirs_sd) == sorted(model.backbone.state_dict())
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, theirs_sd[k]), k
    with torch.no_grad():
        ours = model.backbone(x, t, class_labels=y).sample
        theirs = unet(x, t, class_labels=y).sample
    # the same weights; diffusers keeps them at unaligned offsets of the file's buffer, where the
    # CPU kernels may round differently (measured: up to 6e-7; a wrong weight moves it by ~0.1)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    # ... and the whole model back through GenRep
    back = GenRep.from_pretrained(folder, device="cpu")
    assert back.class_names == ["cat", "dog"]
    img = cat_dog_run / "data" / "cat" / "1.png"
    assert torch.equal(back.classify(img).probs, model.classify(img).probs)
    a = back.sample(["cat"], steps=3, generator=torch.Generator().manual_seed(1))
    b = model.sample(["cat"], steps=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    meta = json.loads((folder / "genrep.json").read_text())
    assert meta["class_names"] == ["cat", "dog"]


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        GenRep.from_pretrained(tmp_path / "nothing")
    (tmp_path / "genrep.json").write_text('{"format": "other"}')
    with pytest.raises(ckpt.CheckpointError, match="not a genrep_fast export"):
        GenRep.from_pretrained(tmp_path)


def test_dit_export_and_guided_sampling(tmp_path):
    """A learned-variance DiT: exported as a DiTTransformer2DModel folder, loaded back whole;
    guidance acts on the noise prediction only (the variance stays the conditional one)."""
    from diffusers import DiTTransformer2DModel
    from train_helpers import tiny_config

    from genrep_fast.train.trainer import Trainer

    cfg = tiny_config(
        tmp_path / "run",
        "model.kind=dit",
        "model.factory_kwargs={}",
        "stage0.steps=1",
        "stage1.steps=1",
        "stage2.steps=1",
    )
    Trainer(cfg).run()
    model = GenRep.from_pretrained(tmp_path / "run", device="cpu")
    assert model.class_names == [str(i) for i in range(10)]
    folder = model.save_pretrained(tmp_path / "export")
    dit = DiTTransformer2DModel.from_pretrained(folder)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, dit.state_dict()[k]), k
    back = GenRep.from_pretrained(folder, device="cpu")
    x = model.sample(
        [3, "7"], steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(0)
    )
    y = back.sample(
        [3, "7"], steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(0)
    )
    assert x.shape == (2, 1, 8, 8) and torch.equal(x, y)
    assert torch.equal(back.classify(x).probs, model.classify(x).probs)
