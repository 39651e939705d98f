"""Benchmarks of gradient alignment (docs/METHOD.md section 3): the two ops (group_sums + align_combine,
update written in place like into .grad) against three eager baselines, in the same run.

* ``reference``: the per-group eager reference (what a user writes by hand, float64 sums);
* ``flattened``: LibMTL / PCGrad-repo style: per group, ``torch.cat`` each task's gradients into
  one vector, dot products on the vectors, combine, split back and copy out;
* ``foreach``: ``torch._foreach`` ops (per-tensor products and norms, per-group sums by
  index_add, per-tensor coefficients, foreach multiply-add).

``test_bench_aligner_python_overhead`` times a ``GradientAligner`` step's Python side (the cached
plan and the output buffers, host time) apart from the two ops, and the first, uncached call.

Memory traffic floor: 5 accesses per element (read p, g for the sums; read p, g and write the
update for the combine), reported against the copy bandwidth measured in the same run.

Parameter lists: a DiT-like shape mix (per block: qkv, attn proj, 2 MLP layers, adaLN
modulation, biases; one group per block; embeddings and the final layer outside the groups).
Smoke: hidden 32, 4 blocks. ``--benchmark``: hidden 320, 28 blocks (~52M parameters) on CPU;
hidden 1152, 28 blocks (DiT-XL/2, ~675M) on CUDA. torchjd's GradVac is not measured: torchjd is
not installed here.
"""

from __future__ import annotations

import pytest
import torch

from genrep_fast import _ops, reference, roofline
from genrep_fast.alignment import GradientAligner, align_gradients
from genrep_fast.benchmarking import time_fn

SMOKE = {"hidden": 32, "blocks": 4}
REALISTIC_CPU = {"hidden": 320, "blocks": 28}
REALISTIC_GPU = {"hidden": 1152, "blocks": 28}


def dit_like_shapes(hidden: int, blocks: int, patch_dim: int = 16, classes: int = 1000):
    """Parameter shapes of a DiT with `blocks` blocks of width `hidden`; one group per block."""
    h = hidden
    shapes = [(h, 4, 2, 2), (h,), (h, 256), (h,), (h, h), (h,), (classes + 1, h)]  # embedders
    groups = []
    for _ in range(blocks):
        start = len(shapes)
        shapes += [
            (3 * h, h), (3 * h,),  # qkv
            (h, h), (h,),  # attention output projection
            (4 * h, h), (4 * h,), (h, 4 * h), (h,),  # MLP
            (6 * h, h), (6 * h,),  # adaLN modulation
        ]  # fmt: skip
        groups.append(list(range(start, len(shapes))))
    shapes += [(2 * h, h), (2 * h,), (patch_dim * 2, h), (patch_dim * 2,)]  # final layer
    return shapes, groups


def flattened_style(ps, gs, groups, out, k=2.0, w_p=0.7, w_g=0.3):
    """PCGrad / LibMTL style: one flat vector per task and group."""
    in_group = set()
    for members in groups:
        in_group.update(members)
        fp = torch.cat([ps[i].reshape(-1) for i in members])
        fg = torch.cat([gs[i].reshape(-1) for i in members])
        sums = torch.stack([fp @ fg, fp @ fp, fg @ fg]).double()[None]
        a, b = reference.alignment_coefficients(sums, k, w_p, w_g, "symmetric")
        upd = (a[0] * fp + b[0] * fg).to(fp.dtype)
        for i, piece in zip(members, upd.split([ps[i].numel() for i in members])):
            out[i].copy_(piece.view_as(out[i]))
    for i in range(len(ps)):
        if i not in in_group:
            torch.add(ps[i] * w_p, gs[i], alpha=w_g, out=out[i])


def foreach_style(ps, gs, ids, n_groups, out, k=2.0, w_p=0.7, w_g=0.3):
    """torch._foreach ops; per-group sums by index_add over per-tensor sums."""
    dots = torch.stack([t.sum() for t in torch._foreach_mul(ps, gs)])
    pp = torch.stack(torch._foreach_norm(ps)) ** 2
    gg = torch.stack(torch._foreach_norm(gs)) ** 2
    idx = torch.as_tensor(ids, device=dots.device)
    inside = idx >= 0
    sums = torch.zeros(n_groups, 3, dtype=torch.float64, device=dots.device)
    per_tensor = torch.stack([dots, pp, gg], 1).double()
    sums.index_add_(0, idx[inside], per_tensor[inside])
    a, b = reference.alignment_coefficients(sums, k, w_p, w_g, "symmetric")
    a_t = torch.where(inside, a[idx.clamp(min=0)], w_p).float()
    b_t = torch.where(inside, b[idx.clamp(min=0)], w_g).float()
    scaled_p = torch._foreach_mul(ps, list(a_t.unbind()))
    torch._foreach_addcmul_(scaled_p, gs, list(b_t.unbind()))
    torch._foreach_copy_(out, scaled_p)


@pytest.mark.skipif(not _ops.HAS_EXTENSION, reason="genrep_fast._C is not built")
def test_bench_alignment(realistic, bench_device, results):
    if bench_device == "cuda" and not _ops.HAS_CUDA_OPS:
        pytest.skip("extension built without CUDA kernels")
    cfg = (REALISTIC_GPU if bench_device == "cuda" else REALISTIC_CPU) if realistic else SMOKE
    shapes, groups = dit_like_shapes(cfg["hidden"], cfg["blocks"])
    dev = torch.device(bench_device)
    gen = torch.Generator(device=dev).manual_seed(0)
    ps = [torch.randn(s, device=dev, generator=gen) for s in shapes]
    gs = [0.2 * p + torch.randn(s, device=dev, generator=gen) for p, s in zip(ps, shapes)]
    out = [torch.empty_like(p) for p in ps]
    ids = reference.resolve_groups(groups, len(ps))
    numel = sum(p.numel() for p in ps)

    # Agreement first: a benchmark of a wrong result is worthless.
    want = reference.align_gradients(ps, gs, groups=groups)
    align_gradients(ps, gs, groups=groups, out=out, backend="ops")
    tmp = [torch.empty_like(p) for p in ps]
    flattened_style(ps, gs, groups, tmp)
    tmp2 = [torch.empty_like(p) for p in ps]
    foreach_style(ps, gs, ids, len(groups), tmp2)
    for o, t, t2, w in zip(out, tmp, tmp2, want):
        torch.testing.assert_close(o, w, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(t, w, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(t2, w, rtol=1e-4, atol=1e-5)
    del want, tmp, tmp2

    fns = {
        "ops": lambda: align_gradients(ps, gs, groups=groups, out=out, backend="ops"),
        "reference": lambda: reference.align_gradients(ps, gs, groups=groups),
        "flattened": lambda: flattened_style(ps, gs, groups, out),
        "foreach": lambda: foreach_style(ps, gs, ids, len(groups), out),
    }
    timings = {
        name: time_fn(fn, device=dev, l2_cold=dev.type == "cuda", min_time_s=0.5)
        for name, fn in fns.items()
    }
    results.add(
        "alignment",
        f"dit-like h={cfg['hidden']} blocks={cfg['blocks']} fp32",
        timings,
        baseline="reference",
        params={"params": numel, "tensors": len(ps), "groups": len(groups), **cfg},
        bytes_moved=5 * 4 * numel,
        cost=roofline.alignment_floor((p.numel(), p.element_size()) for p in ps),
    )
    if realistic and dev.type == "cpu":
        assert timings["reference"] / timings["ops"] >= 3.0, timings


@pytest.mark.skipif(not _ops.HAS_EXTENSION, reason="genrep_fast._C is not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bench_aligner_python_overhead(realistic, bench_device, results, dtype):
    """A GradientAligner step (after the two backward passes) split into its parts: the Python
    side before the first launch (plan lookup, output buffers; host wall time, no kernels), the
    two ops alone, and the whole step. The Python side's first call (checks, group metadata) is
    timed with the cache cleared."""
    if bench_device == "cuda" and not _ops.HAS_CUDA_OPS:
        pytest.skip("extension built without CUDA kernels")
    cfg = (REALISTIC_GPU if bench_device == "cuda" else REALISTIC_CPU) if realistic else SMOKE
    shapes, groups = dit_like_shapes(cfg["hidden"], cfg["blocks"])
    dev = torch.device(bench_device)
    gen = torch.Generator(device=dev).manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s, device=dev, dtype=dtype)) for s in shapes]
    aligner = GradientAligner(params, groups=[[params[i] for i in g] for g in groups])
    ps = [torch.randn(s, device=dev, generator=gen).to(dtype) for s in shapes]
    gs = [
        (0.2 * p + torch.randn(s, device=dev, generator=gen)).to(dtype) for p, s in zip(ps, shapes)
    ]
    out = [torch.empty_like(p) for p in ps]
    plan, _ = aligner._prepare(ps, gs)
    assert plan.use_ops
    ids, g_count = plan.ids, plan.num_groups

    def ops_only():
        sums = torch.ops.genrep_fast.group_sums(ps, gs, ids, g_count)
        torch.ops.genrep_fast.align_combine(ps, gs, sums, ids, 2.0, 0.7, 0.3, "symmetric", out)

    def first_call():
        aligner._plans.clear()
        aligner._prepare(ps, gs)

    # The step writes the update into ps (as into autograd's buffers); a few steps keep the
    # values finite (each is a bounded combination of p and g).
    steps = {"max_reps": 20, "min_time_s": 0.0}
    timings = {
        "step": time_fn(lambda: aligner.align(ps, gs), device=dev, **steps),
        "ops": time_fn(ops_only, device=dev, l2_cold=dev.type == "cuda"),
    }
    assert all(bool(torch.isfinite(p).all()) for p in ps)
    python = {
        "python_per_call": time_fn(lambda: aligner._prepare(ps, gs), device="cpu"),
        "python_first_call": time_fn(first_call, device="cpu"),
    }
    case = f"aligner dit-like h={cfg['hidden']} blocks={cfg['blocks']} {str(dtype)[6:]}"
    info = {"tensors": len(ps), "groups": len(groups), **cfg}
    results.add(
        "alignment",
        case,
        timings,
        baseline="step",
        params=dict(info, python_us_per_call=python["python_per_call"] * 1e6),
        cost=roofline.alignment_floor((p.numel(), p.element_size()) for p in ps),
    )
    results.add("alignment", case + " python side", python, baseline="python_first_call",
                params=info)  # fmt: skip
    print(
        f"{case}: step {timings['step'] * 1e3:.3f} ms, ops {timings['ops'] * 1e3:.3f} ms, Python "
        f"per call {python['python_per_call'] * 1e6:.1f} us (first call "
        f"{python['python_first_call'] * 1e6:.1f} us) for {len(ps)} tensors"
    )
