"""Launch configs of the Triton kernels (kernels/tuning.py): the first config off the GPU, the
choice cached per (kernel, shape key, device), the pins, every config of every list correct
against float64, and every launch inside the CUDA device guard."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _mixture_cases import DEVICES, make_bank

from genrep_fast import reference as R
from genrep_fast.kernels import mixture as M
from genrep_fast.kernels import mixture_backward as MB
from genrep_fast.kernels import posterior_loss as PL
from genrep_fast.kernels import tuning

CPU = torch.device("cpu")
CONFIGS = ({"BLOCK_D": 16}, {"BLOCK_D": 32}, {"BLOCK_D": 64})


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv(tuning.AUTOTUNE_ENV, raising=False)
    tuning.clear()
    yield
    tuning.clear()


def test_first_config_off_the_gpu():
    ran = []
    out = tuning.tuned("k", CONFIGS, ("shape",), CPU, lambda cfg: ran.append(cfg) or len(ran))
    assert ran == [CONFIGS[0]] and out == 1  # no timing runs, run's own result
    assert tuning.chosen() == {}


def test_launcher_passes_its_first_config_to_the_kernel(monkeypatch):
    # The tile of DIFF_CONFIGS[0] reaches the kernel (capped at the sizes), not a constant.
    seen = []
    cfg = {"BLOCK_T": 4, "BLOCK_D": 8, "D_STAGES": 1, "num_warps": 4}
    monkeypatch.setattr(M, "DIFF_CONFIGS", (cfg,))
    M._mixture_diff_kernel.add_pre_run_hook(lambda *a, **kw: seen.append(kw))
    try:
        x, mu, sigma = make_bank(2, 3, 9, (20,))
        M.mixture_lse_diff(x, mu, sigma, None)
    finally:
        M._mixture_diff_kernel.pre_run_hooks.pop()
    assert [(kw["BLOCK_T"], kw["BLOCK_D"]) for kw in seen] == [(4, 8)]


def test_gemm_dispatch_picks_its_config_through_the_tuner():
    # mixture_lse's GEMM path launches GEMM_CONFIGS[0] off the GPU and, in every-config mode (the
    # compile gate's), each config of GEMM_CONFIGS once: a dispatch that bypasses the tuner (one
    # fixed config) fails the second half
    seen = []
    M._mixture_gemm_kernel.add_pre_run_hook(lambda *a, **kw: seen.append(kw["BLOCK_N"]))
    try:
        x, mu, sigma = make_bank(M.GEMM_TUNE_MIN_BATCH, 2, 5, (6,))
        first = M.mixture_lse(x, mu, sigma, None, precision="tf32x3")
        assert seen == [M.GEMM_CONFIGS[0].BLOCK_N]
        seen.clear()
        with tuning.every_config():
            every = M.mixture_lse(x, mu, sigma, None, precision="tf32x3")
    finally:
        M._mixture_gemm_kernel.pre_run_hooks.pop()
    assert seen == [c.BLOCK_N for c in M.GEMM_CONFIGS]
    assert torch.equal(first, every)  # the first config's result
    # a smaller batch has the first config only (the others spill at its 16-image tile)
    seen.clear()
    M._mixture_gemm_kernel.add_pre_run_hook(lambda *a, **kw: seen.append(kw["BLOCK_N"]))
    try:
        with tuning.every_config():
            M.mixture_lse(x[: M.GEMM_TUNE_MIN_BATCH // 2], mu, sigma, None, precision="tf32x3")
    finally:
        M._mixture_gemm_kernel.pre_run_hooks.pop()
    assert seen == [M.GEMM_CONFIGS[0].BLOCK_N]


def test_split_gemm_form_is_a_tuner_candidate_for_every_gemm_precision():
    # In every-config mode mixture_lse runs the split form (_gemm_lse_kernel) after the fused
    # configs for bf16, tf32 and tf32x3, at any batch; never past SPLIT_MAX_BLOCK_T steps. Off
    # the GPU the fused first config stays the choice.
    seen = []
    M._gemm_lse_kernel.add_pre_run_hook(lambda *a, **kw: seen.append(kw["BLOCK_C"]))
    try:
        x, mu, sigma = make_bank(4, 2, 5, (6,))
        runs = {}
        for precision in ("bf16", "tf32", "tf32x3"):
            with tuning.every_config():
                M.mixture_lse(x, mu, sigma, None, precision=precision)
            runs[precision] = len(seen)
            seen.clear()
        M.mixture_lse(x, mu, sigma, None, precision="bf16")
        runs["bf16, tuned off the GPU"] = len(seen)
        x, mu, sigma = make_bank(2, 1, M.SPLIT_MAX_BLOCK_T + 1, (2,))
        with tuning.every_config():
            M.mixture_lse(x, mu, sigma, None, precision="bf16")
        runs["T = 1025"] = len(seen)
    finally:
        M._gemm_lse_kernel.pre_run_hooks.pop()
    assert runs == {
        "bf16": 1, "tf32": 1, "tf32x3": 1, "bf16, tuned off the GPU": 0, "T = 1025": 0
    }  # fmt: skip


def _table_timer(costs, ran):
    """A timer that reads a fixed cost per config from ``costs`` (what ``run`` appended last)."""

    def timer(fn):
        fn()
        return costs[ran[-1]["BLOCK_D"]]

    return timer


def test_choice_is_cached_per_kernel_shape_and_device():
    ran = []

    def run(cfg):
        ran.append(cfg)

    fast_32 = _table_timer({16: 3.0, 32: 1.0, 64: 2.0}, ran)
    fast_64 = _table_timer({16: 3.0, 32: 2.0, 64: 1.0}, ran)
    assert tuning.choose("k", CONFIGS, (75, 4096), CPU, run, fast_32) == 1
    assert len(ran) == 3  # each config timed once
    # The same key again: the cached choice, nothing timed (whatever the timer would say now).
    assert tuning.choose("k", CONFIGS, (75, 4096), CPU, run, fast_64) == 1
    assert len(ran) == 3
    # Another shape, another kernel, another device: each times afresh.
    assert tuning.choose("k", CONFIGS, (100, 4096), CPU, run, fast_64) == 2
    assert tuning.choose("k2", CONFIGS, (75, 4096), CPU, run, fast_64) == 2
    assert tuning.choose("k", CONFIGS, (75, 4096), torch.device("meta"), run, fast_64) == 2
    assert len(ran) == 12
    assert set(tuning.chosen().values()) == {1, 2} and len(tuning.chosen()) == 4


def test_a_capture_launches_the_choice_made_before_it(monkeypatch):
    """Inside a CUDA graph capture nothing is timed (it would sync): a key chosen in a warm-up
    call keeps its config in the captured graph, an unseen key takes the first."""
    cuda = torch.device("cuda")
    ran = []
    assert tuning.choose("k", CONFIGS, (75,), cuda, ran.append, _table_timer({16: 3.0, 32: 2.0, 64: 1.0}, ran)) == 2  # fmt: skip
    monkeypatch.setattr(tuning, "interpreted", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    ran.clear()
    assert tuning.choose("k", CONFIGS, (75,), cuda, ran.append) == 2
    assert tuning.choose("k", CONFIGS, (100,), cuda, ran.append) == 0
    assert ran == [] and (("k", (100,), "cuda") not in tuning.chosen())


def test_a_config_out_of_device_memory_is_skipped_not_raised():
    # A candidate the caller never asked for (the split GEMM form's scratch and per-call parts)
    # may not fit in memory where the default does: the tuner records it as not fitting (inf)
    # and keeps another; only when no config fits does the call fail.
    ran = []

    def run(cfg):
        ran.append(cfg)
        if cfg["BLOCK_D"] in oom:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.3 GiB")

    oom = {32}
    timer = _table_timer({16: 3.0, 32: 1.0, 64: 2.0}, ran)
    assert tuning.choose("k_oom", CONFIGS, (1,), CPU, run, timer) == 2
    (row,) = [r for r in tuning.report() if r["kernel"] == "k_oom"]
    assert row["ms"] == [3.0, None, 2.0]
    oom = {16, 32, 64}
    with pytest.raises(RuntimeError, match="no config of .* fits this device"):
        tuning.choose("k_oom", CONFIGS, (2,), CPU, run, timer)


def test_report_lists_each_timed_choice_with_its_times():
    ran = []

    def run(cfg):
        ran.append(cfg)

    tuning.choose(
        "k", CONFIGS, (75, torch.float32), CPU, run, _table_timer({16: 3.0, 32: 1.0, 64: 2.0}, ran)
    )
    tuning.choose(
        "k", CONFIGS, (75, torch.float32), CPU, run, _table_timer({16: 0.1, 32: 9.0, 64: 9.0}, ran)
    )
    (row,) = tuning.report()
    assert row["kernel"] == "k" and row["key"] == [75, "torch.float32"] and row["device"] == "cpu"
    assert row["ms"] == [3.0, 1.0, 2.0] and row["chosen"] == 1
    assert row["configs"] == [dict(c) for c in CONFIGS]
    json.dumps(row)  # the benchmark report writes it as JSON
    # The GEMM kernel's configs are named tuples: reported by field.
    gemm = tuple(M.GEMM_CONFIGS[:2])
    tuning.choose("g", gemm, (1,), CPU, run, lambda fn: 1.0)
    assert tuning.report()[1]["configs"][1] == M.GEMM_CONFIGS[1]._asdict()
    tuning.clear()
    assert tuning.report() == []


def test_diff_key_separates_the_shapes_that_matter():
    def key(b, c, t, latent, **kw):
        x, mu, sigma = make_bank(b, c, t, latent, **kw)
        return M.diff_key(M.diff_layout(x, mu, sigma, None), b)

    base = key(2, 3, 5, (8,))
    assert key(2, 3, 5, (8,)) == base
    others = [key(2, 3, 6, (8,)), key(2, 3, 5, (9,)), key(9, 3, 5, (8,))]
    others += [key(2, 3, 5, (8,), sigma_kind="diag"), key(2, 3, 5, (8,), per_image=True)]
    for other in others:
        assert other != base


def test_pins_take_the_first_config(monkeypatch):
    ran = []
    timer = _table_timer({16: 3.0, 32: 1.0, 64: 2.0}, ran)
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "0")
    assert tuning.choose("k", CONFIGS, (), CPU, ran.append, timer) == 0 and ran == []
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert tuning.choose("k", CONFIGS, (), CPU, ran.append, timer) == 0 and ran == []
    monkeypatch.undo()
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "yes please")
    with pytest.raises(ValueError, match="GENREP_FAST_AUTOTUNE"):
        tuning.choose("k", CONFIGS, (), CPU, ran.append, timer)


def test_every_config_mode_runs_each_config_and_returns_the_first():
    ran = []
    with tuning.every_config():
        out = tuning.tuned("k", CONFIGS, (), CPU, lambda cfg: ran.append(cfg) or cfg)
    assert ran == list(CONFIGS) and out is CONFIGS[0]
    with pytest.raises(ValueError, match="configs is empty"):
        tuning.tuned("k", (), (), CPU, lambda cfg: cfg)


# ------------------------------------------------------------------------------------------------
# Every config of every list, against float64 (shapes where the configs' tiles differ: T = 33
# spans 2-3 T tiles of 16 / 32, D = 600 spans 2-5 D tiles of 128 / 256 / 512, all with a tail)
# ------------------------------------------------------------------------------------------------


def _floor(want: torch.Tensor) -> float:
    return 4 * torch.finfo(torch.float32).eps * max(1.0, want.abs().max().item())


DIFF_LISTS = [("DIFF_CONFIGS", "c_t", i) for i in range(len(M.DIFF_CONFIGS))] + [
    ("DIFF_CONFIGS_DIAG", "diag", i) for i in range(len(M.DIFF_CONFIGS_DIAG))
]


def _on(device, *tensors):
    return [t.to(device) for t in tensors]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,kind,index", DIFF_LISTS)
@pytest.mark.parametrize("per_image", [False, True])
def test_each_forward_config_matches_float64(monkeypatch, name, kind, index, per_image, device):
    monkeypatch.setattr(M, name, (getattr(M, name)[index],))
    x, mu, sigma = make_bank(2, 3, 33, (600,), per_image=per_image, sigma_kind=kind)
    got = M.mixture_lse_diff(*_on(device, x, mu, sigma), None).double().cpu()
    want = R.mixture_log_likelihood(x.double(), mu.double(), sigma.double()) + math.log(33)
    torch32 = R.mixture_log_likelihood(x, mu, sigma).double() + math.log(33)
    torch_err = (torch32 - want).abs().max().item()
    assert (got - want).abs().max().item() <= 2 * torch_err + _floor(want)


def _grads_f64(x, mu, sigma, grad):
    x, mu, sigma = (t.double().requires_grad_() for t in (x, mu, sigma))
    lse = R.mixture_log_likelihood(x, mu, sigma)
    torch.autograd.backward(lse, grad.double())
    return x.grad, mu.grad, sigma.grad


def _check_grads(got, x, mu, sigma, grad):
    want = _grads_f64(x, mu, sigma, grad)
    xs, ms, ss = (t.clone().requires_grad_() for t in (x, mu, sigma))
    torch.autograd.backward(R.mixture_log_likelihood(xs, ms, ss), grad)
    for name, g, t32, w in zip("x mu sigma".split(), got, (xs.grad, ms.grad, ss.grad), want):
        err = (g.double().cpu() - w).abs().max().item()
        torch_err = (t32.double() - w).abs().max().item()
        assert err <= 2 * torch_err + _floor(w), (name, err, torch_err)


ROWS_LISTS = [("ROWS_CONFIGS", "c_t", i) for i in range(len(MB.ROWS_CONFIGS))] + [
    ("ROWS_CONFIGS_DIAG", "diag", i) for i in range(len(MB.ROWS_CONFIGS_DIAG))
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,kind,index", ROWS_LISTS)
def test_each_backward_rows_config_matches_float64(monkeypatch, name, kind, index, device):
    monkeypatch.setattr(MB, name, (getattr(MB, name)[index],))
    # A per-image bank: the row kernel writes all three gradients.
    x, mu, sigma = make_bank(2, 2, 33, (300,), per_image=True, sigma_kind=kind)
    grad = torch.randn(2, 2, generator=torch.Generator().manual_seed(3))
    got = MB.mixture_lse_backward(*_on(device, grad, x, mu, sigma), None)
    _check_grads(got, x, mu, sigma, grad)


BANK_LISTS = [("BANK_CONFIGS", "c_t", i) for i in range(len(MB.BANK_CONFIGS))] + [
    ("BANK_CONFIGS_DIAG", "diag", i) for i in range(len(MB.BANK_CONFIGS_DIAG))
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,kind,index", BANK_LISTS)
def test_each_backward_bank_config_matches_float64(monkeypatch, name, kind, index, device):
    monkeypatch.setattr(MB, name, (getattr(MB, name)[index],))
    # A shared bank: the bank kernel writes dL/dmu, dL/dsigma over 3 images (BLOCK_B tails).
    x, mu, sigma = make_bank(3, 2, 20, (40,), sigma_kind=kind)
    grad = torch.randn(3, 2, generator=torch.Generator().manual_seed(4))
    got = MB.mixture_lse_backward(*_on(device, grad, x, mu, sigma), None, (False, True, True))
    want = _grads_f64(x, mu, sigma, grad)[1:]
    ms, ss = mu.clone().requires_grad_(), sigma.clone().requires_grad_()
    torch.autograd.backward(R.mixture_log_likelihood(x, ms, ss), grad)
    for name, g, t32, w in zip(("mu", "sigma"), got[1:], (ms.grad, ss.grad), want):
        err = (g.double().cpu() - w).abs().max().item()
        torch_err = (t32.double() - w).abs().max().item()
        assert err <= 2 * torch_err + _floor(w), (name, err, torch_err)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_cuda_times_each_config_once_and_keeps_the_fastest(monkeypatch, precision):
    # On CUDA the first call of a shape key times every config (a tuner that never times, times
    # every call, or keeps the slowest fails here); the result matches float64 whichever won.
    timed = []
    real = tuning._cuda_time
    monkeypatch.setattr(tuning, "_cuda_time", lambda fn: timed.append(1) or real(fn))
    x, mu, sigma = make_bank(64, 8, 75, (512,))  # 64 images: the GEMM form tunes from 32
    xd, mud, sigd = _on("cuda", x, mu, sigma)
    kernel, configs = (
        ("_mixture_diff_kernel", M.DIFF_CONFIGS)
        if precision == "ieee"
        else ("_mixture_gemm_kernel", [*M.GEMM_CONFIGS, M.SPLIT_CONFIG])  # the split form too
    )
    first = M.mixture_lse(xd, mud, sigd, None, precision=precision)
    rows = [r for r in tuning.report() if r["kernel"] == kernel]
    assert len(rows) == 1 and len(timed) == len(configs) > 1, (rows, timed)
    ms = [math.inf if m is None else m for m in rows[0]["ms"]]
    assert rows[0]["chosen"] == min(range(len(ms)), key=ms.__getitem__)
    again = M.mixture_lse(xd, mud, sigd, None, precision=precision)
    assert len(timed) == len(configs)  # the cached choice: nothing timed again
    assert torch.equal(again, first)  # the same config: bitwise the same
    # Both forms are float32-reference accurate (docs/NUMERICS.md): the interpreter tests' rule.
    want = R.mixture_log_likelihood(x.double(), mu.double(), sigma.double()) + math.log(75)
    torch_err = (R.mixture_log_likelihood(x, mu, sigma).double() + math.log(75) - want).abs().max()
    err = (first.double().cpu() - want).abs().max().item()
    assert err <= 2 * torch_err.item() + _floor(want), (err, torch_err)


# ------------------------------------------------------------------------------------------------
# Device guard
# ------------------------------------------------------------------------------------------------

KERNELS = {
    "_mixture_diff_kernel": M._mixture_diff_kernel,
    "_mixture_diff_redo_kernel": M._mixture_diff_redo_kernel,
    "_mixture_gemm_kernel": M._mixture_gemm_kernel,
    "_bank_operand_kernel": M._bank_operand_kernel,
    "_mixture_bwd_rows_kernel": MB._mixture_bwd_rows_kernel,
    "_mixture_bwd_bank_kernel": MB._mixture_bwd_bank_kernel,
    "_posterior_kl_fwd_kernel": PL._posterior_kl_fwd_kernel,
    "_posterior_kl_bwd_kernel": PL._posterior_kl_bwd_kernel,
}


def test_every_launch_runs_inside_the_device_guard():
    # Triton's own pre-run hook sees, at each launch, the device the guard is holding: a launcher
    # that launches outside `tuning.device_guard` (so on whatever CUDA device is current) fails.
    seen: dict[str, list] = {name: [] for name in KERNELS}
    for name, fn in KERNELS.items():
        fn.add_pre_run_hook(lambda *a, _n=name, **kw: seen[_n].append(tuning.guarded_device()))
    try:
        x, mu, sigma = make_bank(3, 2, 5, (6,))
        M.mixture_lse(x, mu, sigma, None)
        M.mixture_lse(x, mu, sigma, None, precision="tf32x3")  # GEMM kernel + redo kernel
        MB.mixture_lse_backward(torch.ones(3, 2), x, mu, sigma, None)  # rows + bank kernels
        ll = torch.randn(3, 4)
        logits = torch.randn(3, 4)
        _, _, stats = PL.posterior_forward(ll, None, logits, store_posterior=False)
        PL.posterior_kl_backward(torch.ones(3), ll, None, logits, stats)
    finally:
        for fn in KERNELS.values():
            fn.pre_run_hooks.pop()
    assert tuning.guarded_device() is None
    for name, devices in seen.items():
        assert devices and all(d == CPU for d in devices), (name, devices)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs 2 CUDA devices: tensors on cuda:1 while cuda:0 is current",
)
def test_launches_on_the_tensors_device_not_the_current_one():
    import genrep_fast as G

    x, mu, sigma = make_bank(3, 4, 20, (64,))
    want = G.mixture_log_likelihood(x, mu, sigma, backend="torch")
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    xd, mud, sigd = (t.to(dev).requires_grad_() for t in (x, mu, sigma))
    for precision in ("ieee", "tf32x3"):
        got = G.mixture_log_likelihood(xd, mud, sigd, backend="triton", precision=precision)
        assert got.device == dev and torch.cuda.current_device() == 0
        torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-2)
    got.sum().backward()
    assert all(t.grad.device == dev and torch.isfinite(t.grad).all() for t in (xd, mud, sigd))
    post = G.class_posterior(got.detach(), backend="triton")
    torch.testing.assert_close(post.cpu(), torch.softmax(want, -1), rtol=0, atol=1e-4)
