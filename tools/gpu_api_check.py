# Run on the GPU machine after tools/gpu_check.sh (README "Checking on a GPU"); needs diffusers there.
"""GenRep on CUDA: train a tiny cat/dog run on the GPU, load it on CUDA and CPU, classify,
sample (CPU and CUDA generators, guidance), export and reload, the CLI over it."""

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, "tests")
from test_pipeline import _write_folder  # noqa: E402
from train_helpers import TINY  # noqa: E402

from genrep_fast import GenRep  # noqa: E402
from genrep_fast.cli import main  # noqa: E402

print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))
base = Path("/tmp/catdog")
_write_folder(base / "data", np.random.default_rng(0))
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
args = ["train", "--out", str(base / "run"), "--no-eval"]
for o in sets:
    args += ["--set", o]
t0 = time.perf_counter()
print("train rc", main(args), f"{time.perf_counter() - t0:.1f}s")
m = GenRep.from_pretrained(base / "run")
print("device", m.device, m)
img = base / "data" / "cat" / "0.png"
r = m.classify([img, img])
mc = GenRep.from_pretrained(base / "run", device="cpu")
rc = mc.classify([img, img])
print("classify", r.labels, r.scores, "cuda-cpu max diff", float((r.probs - rc.probs).abs().max()))
for gen in (torch.Generator().manual_seed(0), torch.Generator("cuda").manual_seed(0)):
    x = m.sample(["cat", "dog"], steps=10, guidance_scale=2.0, generator=gen)
    print("sample", gen.device, x.device, tuple(x.shape), bool(torch.isfinite(x).all()))
x0 = m.sample(
    ["cat", "dog"], steps=10, guidance_scale=0.0, generator=torch.Generator("cuda").manual_seed(3)
)
from genrep_fast.models import DDPMSampler  # noqa: E402

xn = DDPMSampler(m.net.adapter, 10, m.modulation).sample(
    torch.full((2,), m.net.null_class), generator=torch.Generator("cuda").manual_seed(3)
)
print("guidance 0 vs null chain max diff", float((x0 - xn).abs().max()))
m.save_pretrained("/tmp/exp")
b = GenRep.from_pretrained("/tmp/exp")
print(
    "export reload", b.device, "classify equal", torch.equal(b.classify([img, img]).probs, r.probs)
)
from diffusers import UNet2DModel  # noqa: E402

u = UNet2DModel.from_pretrained("/tmp/exp").cuda().eval()
xx = torch.randn(3, 3, 8, 8, device="cuda")
t = torch.tensor([10, 500, 999], device="cuda")
y = torch.tensor([0, 1, 2], device="cuda")
with torch.no_grad():
    d = (u(xx, t, class_labels=y).sample - m.backbone(xx, t, class_labels=y).sample).abs().max()
print("diffusers eps max diff on cuda", float(d))
print(
    "cli sample rc",
    main(
        [
            "sample",
            "--checkpoint",
            str(base / "run"),
            "--out",
            "/tmp/s.png",
            "--per-class",
            "2",
            "--steps",
            "5",
            "--guidance-scale",
            "2",
        ]
    ),
)
print("cli classify rc", main(["classify", "--checkpoint", str(base / "run"), str(img)]))

# The trainer on CUDA with a frozen backbone (issue 11 item 2), through the non-finite guarded
# step on CUDA: a stage-1 run with backbone_lr_scale=0 must train (exit code 0).
run = base / "frozen"
args = ["train", "--out", str(run), "--no-eval"]
for o in TINY + [
    "stage0.steps=0",
    "stage1.steps=3",
    "stage2.steps=0",
    "stage1.backbone_lr_scale=0",
    "loss.gen_distil=false",
    "runtime.device=cuda",
]:
    args += ["--set", o]
print("frozen backbone train rc", main(args))
