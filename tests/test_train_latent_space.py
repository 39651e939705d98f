"""``model.vae`` end to end on a tiny random AutoencoderKL saved locally (nothing downloads):
on-the-fly encoding in training and evaluation, decoded samples, ``genrep-fast encode`` shards
that train to the same latents, and one-line config errors (exit code 2) before training."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import TINY

from genrep_fast.cli import main
from genrep_fast.models import tiny_vae, vae_decode, vae_encode
from genrep_fast.train.config import ConfigError, load_config
from genrep_fast.train.latent_space import LatentSpace
from genrep_fast.train.trainer import Trainer, load_for_inference

# 16x16 RGB images -> 4x8x8 latents (the tiny VAE downsamples by 2)
LATENT = [
    "data.kind=image_folder",
    "data.grayscale=false",
    "data.image_size=16",
    "data.batch_size=8",
    "model.sample_size=8",
    "model.in_channels=4",
    "model.num_classes=2",
    "stage0.steps=2",
    "stage1.steps=2",
    "stage2.steps=2",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A VAE folder and train/test image folders of digits 0 and 1 upscaled to 16x16 RGB."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("latent_assets")
    torch.manual_seed(0)
    vae = tiny_vae("kl", block_out_channels=(8, 16)).eval()
    assert vae.config.scaling_factor != 1  # so a missing scale is seen
    vae.save_pretrained(root / "vae")
    d = load_digits()
    for cls, name in ((0, "zero"), (1, "one")):
        imgs = d.images[d.target == cls]
        for split, lo, hi in (("train", 0, 12), ("test", 12, 16)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(lo, hi):
                a = (imgs[i] * 255 / 16).astype(np.uint8)
                a = np.stack([a, 255 - a, a // 2], -1)  # three different channels
                Image.fromarray(a).resize((16, 16), Image.NEAREST).save(folder / f"{i}.png")
    return root


def overrides(assets, *extra):
    return LATENT + [
        f"model.vae={assets / 'vae'}",
        f"data.root={assets / 'train'}",
        f"data.test_root={assets / 'test'}",
        *extra,
    ]


def cli_sets(items):
    out = []
    for o in items:
        out += ["--set", o]
    return out


def test_train_on_the_fly_eval_and_sample_decode(assets, tmp_path, capsys):
    run = tmp_path / "run"
    # train (stages 0-2 on latents encoded per batch) and the evaluation after it (held-out
    # images encoded, the grid decoded): either without the VAE feeds RGB 16x16 to a 4x8x8 model
    assert main(["train", "--out", str(run)] + cli_sets(TINY + overrides(assets))) == 0
    res = json.loads((run / "eval.json").read_text())
    assert res["test_images"] == 8 and 0 <= res["head_top1"] <= 1
    with Image.open(run / "samples.png") as im:
        assert im.mode == "RGB"  # a 4-channel latent grid would be drawn as one grey channel

    png = tmp_path / "s.png"
    cmd = ["sample", "--checkpoint", str(run), "--out", str(png), "--per-class", "2"]
    assert main(cmd) == 0
    with Image.open(png) as im:
        assert im.mode == "RGB"
    # classify reads images at the VAE's resolution and encodes them
    capsys.readouterr()
    img = next((assets / "test" / "one").glob("*.png"))
    assert main(["classify", "--checkpoint", str(run), str(img)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{img}: ") and {"one", "zero"} <= set(re.findall(r"(\w+) \(", out))

    # the decoded samples: pixels of the VAE's decoder, [N, 3, 16, 16] in [-1, 1]
    from genrep_fast.cli import _decoded
    from genrep_fast.models.vae import load_vae
    from genrep_fast.train.evaluation import generate

    cfg, net, _ = load_for_inference(run)
    assert not net.scheduler.config.clip_sample  # latents are not clipped to [-1, 1] as pixels are
    z, _ = generate(net, cfg, 2, seed=0)
    assert z.shape == (4, 4, 8, 8)
    x = _decoded(cfg, z)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
    with torch.no_grad():
        want = vae_decode(load_vae(assets / "vae", device=z.device), z).clamp(-1, 1)
    torch.testing.assert_close(x, want, rtol=0, atol=0)


def test_encode_shards_train_to_the_same_latents(assets, tmp_path, capsys):
    enc = tmp_path / "enc"
    # on CPU: cuDNN may run float32 convolutions in TF32, which the tolerance below does not admit
    base = TINY + overrides(assets, "runtime.device=cpu")
    # a shard size that splits the 24 training images unevenly (10 + 10 + 4)
    args = ["encode", "--out", str(enc), "--shard-size", "10", "--batch-size", "7"]
    # data.augment (random flips) is for training; encode writes the images as they are
    assert main(args + cli_sets(base + ["data.augment=true"])) == 0
    out = capsys.readouterr().out
    assert "data.kind=latents" in out and "data.latent_scale=1" in out
    shards = sorted((enc / "train").glob("*.safetensors"))
    assert [len(load_shard(s)[0]) for s in shards] == [10, 10, 4]
    assert len(list((enc / "test").glob("*.safetensors"))) == 1

    # the shards: the VAE's scaled posterior mode of image i at row i, with its folder label
    from genrep_fast.train.data import ImageFolder, LatentShards

    folder = ImageFolder(assets / "train", 16)
    images = torch.stack([folder[i][0] for i in range(len(folder))])
    shard_set = LatentShards(enc / "train")
    z_all = torch.stack([shard_set[i][0] for i in range(len(shard_set))])
    assert torch.equal(shard_set.labels, folder.labels)
    vae = LatentSpace.from_config(load_config("tiny_digits", base), "cpu").vae
    with torch.no_grad():
        want = vae_encode(vae, images)
    # Same float32 VAE, same pixels, same CPU; only the batch split differs (7 per call here, 24
    # there), which may change the convolutions' summation order: a few float32 ulps of latents
    # of magnitude ~1 (measured: max |diff| 6e-8 at max |z| 0.16 on this CPU). A missing scaling factor (x5.5),
    # another image order, a flip or a posterior sample instead of its mode is off by >= 1e-2.
    torch.testing.assert_close(z_all, want, rtol=1e-5, atol=1e-6)

    # one training step on the fly and one from the shards see the same batch and latents
    one_step = ["stage0.steps=1", "stage1.steps=0", "stage2.steps=0"]
    fly = Trainer(load_config("tiny_digits", base + one_step), tmp_path / "fly")
    fly.run()
    from_shards = [
        "data.kind=latents",
        f"data.root={enc / 'train'}",
        f"data.test_root={enc / 'test'}",
        "data.latent_scale=1",
    ]
    pre = Trainer(load_config("tiny_digits", base + one_step + from_shards), tmp_path / "pre")
    pre.run()
    (idx_a, z_a), (idx_b, z_b) = fly._step_inputs[0], pre._step_inputs[0]
    assert torch.equal(idx_a, idx_b) and z_a.shape == (8, 4, 8, 8)
    torch.testing.assert_close(z_a, z_b, rtol=1e-5, atol=1e-6)  # as above
    # same latents, same initial weights and noise: the same loss (the weights after Adam's first
    # step are not compared: it moves a parameter by ~lr * sign(grad), and gradients that are zero
    # in exact arithmetic, e.g. biases before a GroupNorm, have a rounding-level sign)
    (rec_a,), (rec_b,) = fly.history, pre.history
    assert rec_a["step"] == rec_b["step"] == 1
    assert rec_a["ldm"] == pytest.approx(rec_b["ldm"], rel=1e-6)

    # evaluating the shard-trained run: held-out latents as they are, the grid decoded
    from genrep_fast.train.evaluation import evaluate

    res = evaluate(pre.net, pre.cfg, pre.test_set, tmp_path / "eval", backend=pre.backend)
    assert res["test_images"] == 8
    with Image.open(tmp_path / "eval" / "samples.png") as im:
        assert im.mode == "RGB"


def test_vq_model(tmp_path):
    # a VQModel: latents are its pre-quantisation output, quantised on decode
    from diffusers import VQModel

    # whose codebook vectors (vq_embed_dim 3) are narrower than its encoder's output (4)
    blocks = dict(down_block_types=("DownEncoderBlock2D",) * 2, block_out_channels=(8, 16))
    blocks["up_block_types"] = ("UpDecoderBlock2D",) * 2
    vq = VQModel(
        latent_channels=4, vq_embed_dim=3, norm_num_groups=8, num_vq_embeddings=64, **blocks
    )
    vq.save_pretrained(tmp_path / "vq")
    sets = LATENT + [f"model.vae={tmp_path / 'vq'}", "data.root=x", "model.in_channels=3"]
    space = LatentSpace.from_config(load_config("tiny_digits", sets), "cpu")
    assert isinstance(space.vae, VQModel) and (space.downsample, space.latent_channels) == (2, 3)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    z = space.encode(x, batch_size=2)
    assert z.shape == (3, 3, 8, 8) and not z.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(z, space.vae.encode(x).latents * space.vae.config.scaling_factor)
    pix = space.decode(z)
    assert pix.shape == x.shape and pix.min() >= -1 and pix.max() <= 1


def load_shard(path):
    from safetensors.torch import load_file

    t = load_file(str(path))
    return t["latents"], t["labels"]


@pytest.mark.parametrize(
    "bad,key",
    [
        ("model.vae={tmp}/nope", "model.vae: cannot load"),
        ("model.vae={tmp}/not_a_vae", "model.vae: cannot load"),
        ("model.in_channels=3", "model.in_channels: must be 4"),
        ("data.image_size=32", "data.image_size: must be model.sample_size x 2 = 16"),
        ("data.grayscale=true", "data.grayscale: must be false"),
    ],
)
def test_bad_vae_settings_exit_2_before_training(assets, tmp_path, capsys, bad, key):
    (tmp_path / "not_a_vae").mkdir()
    (tmp_path / "not_a_vae" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    run = tmp_path / "run"
    sets = TINY + overrides(assets, bad.format(tmp=tmp_path))
    assert main(["train", "--out", str(run)] + cli_sets(sets)) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not run.exists()  # refused before anything was written


def test_encode_refuses_without_vae_or_into_shards(assets, tmp_path, capsys):
    base = TINY + overrides(assets)
    no_vae = [o for o in base if not o.startswith("model.vae=")]
    assert main(["encode", "--out", str(tmp_path / "e")] + cli_sets(no_vae)) == 2
    assert "model.vae: encode needs" in capsys.readouterr().err
    (tmp_path / "e" / "train").mkdir(parents=True)
    (tmp_path / "e" / "train" / "old.safetensors").write_bytes(b"")
    assert main(["encode", "--out", str(tmp_path / "e")] + cli_sets(base)) == 2
    assert "already holds shards" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="model.vae"):
        LatentSpace.from_config(
            load_config("tiny_digits", overrides(assets, "model.vae=/nope")), "cpu"
        )


def test_nan_pixel_under_the_vae_skips_its_step(tmp_path):
    # digits (1x8x8) through a 1-channel VAE to 4x4x4 latents; one NaN pixel makes its sample's
    # latents NaN (the VAE's GroupNorm is per sample): that step is skipped and names the sample
    from genrep_fast.train import checkpoint as ckpt
    from genrep_fast.train.data import batch_indices

    tiny_vae("kl", in_channels=1, block_out_channels=(8, 16)).save_pretrained(tmp_path / "vae")
    sets = ["model.sample_size=4", "model.in_channels=4", f"model.vae={tmp_path / 'vae'}"]
    sets += ["stage1.steps=0", "stage2.steps=0", "eval.samples_per_class=0"]
    cfg = load_config("tiny_digits", TINY + sets + [f"out_dir={tmp_path / 'run'}"])
    tr = Trainer(cfg)
    batches = batch_indices(len(tr.train_set), cfg.data.batch_size, cfg.seed, start_batch=1)
    k = int(next(batches)[0])  # in the stage's second batch only
    tr.train_set.images[k, 0, 3, 4] = float("nan")
    tr.run()
    (rec,) = [r for r in tr.history if "skipped" in r]
    assert rec["step"] == 2 and rec["nonfinite_inputs"] == [f"sample {k}"]
    assert tr.bad_steps == 1 and not ckpt.nonfinite_tensors(tr.net.state_dict())


def test_resume_with_the_vae_is_bit_exact(tmp_path):
    # SIGTERM in stage 2, resume: the same weights as an uninterrupted run (the VAE is loaded
    # before the seeding and its encoding draws no random numbers)
    import signal

    from genrep_fast.train.trainer import TrainingInterrupted

    tiny_vae("kl", in_channels=1, block_out_channels=(8, 16)).save_pretrained(tmp_path / "vae")
    sets = ["model.sample_size=4", "model.in_channels=4", f"model.vae={tmp_path / 'vae'}"]
    sets += ["stage0.steps=2", "stage1.steps=2", "stage2.steps=3"]
    full = Trainer(load_config("tiny_digits", TINY + sets + [f"out_dir={tmp_path / 'full'}"]))
    full.run()
    cfg = load_config("tiny_digits", TINY + sets + [f"out_dir={tmp_path / 'cut'}"])
    first = Trainer(cfg)
    step = first.train_step

    def stop_in_stage2(*a, **k):
        out = step(*a, **k)
        if first.stage == 2 and first.step == 0:  # after stage 2's first step
            first._stop_signal = signal.SIGTERM
        return out

    first.train_step = stop_in_stage2
    with pytest.raises(TrainingInterrupted):
        first.run()
    resumed = Trainer(cfg, resume=tmp_path / "cut")
    assert (resumed.stage, resumed.step) == (2, 1)
    resumed.run()
    for (name, a), b in zip(full.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), name
