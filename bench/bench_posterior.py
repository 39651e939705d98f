"""Benchmarks of mixture_log_likelihood and posterior_kl_loss against the eager reference and
torch.compile of it, in the same run.

Smoke shapes by default; ``--benchmark`` runs the realistic shapes (CPU target of issue 3:
B=64, C=10, T=75, D=1024, >= 20x the eager reference with <= 1/10 of its peak memory).

Peak memory on CPU: each implementation runs once in a fresh Python process after its inputs are
built; the peak resident set is reset (``echo 5 > /proc/self/clear_refs``) just before the call,
and the record is ``VmHWM`` after the call minus ``VmRSS`` before it (``/proc/self/status``),
i.e. the extra memory the call needed at its peak. On CUDA:
``torch.cuda.max_memory_allocated`` minus the allocation before the call.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import genrep_fast as G
from genrep_fast import reference as R
from genrep_fast import roofline
from genrep_fast.benchmarking import cuda_graph, time_fn

SMOKE = {"B": 4, "C": 3, "T": 7, "D": 32}
REALISTIC_CPU = {"B": 64, "C": 10, "T": 75, "D": 1024}
REALISTIC_GPU = {"B": 256, "C": 100, "T": 75, "D": 4096}

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import genrep_fast as G
    from genrep_fast import reference as R
    impl, layout, b, c, t, d = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
    torch.manual_seed(0)
    x = torch.randn(b, d)
    mu = torch.randn(b, c, t, d) if layout == "per_image" else torch.randn(c, t, d)
    sigma = 0.5 + torch.rand(t)
    fn = {
        "reference": lambda: R.mixture_log_likelihood(x, mu, sigma),
        "genrep_fast": lambda: G.mixture_log_likelihood(x, mu, sigma, validate=False),
    }[impl]
    # One tiny call first: one-time library set-up (BLAS buffers, op registration) is not the
    # per-call peak being measured.
    small = (x[:1, :8].contiguous(), mu[..., :2, :8].contiguous(), sigma[:2].contiguous())
    small = (small[0], small[1][:1] if layout == "per_image" else small[1], small[2])
    {
        "reference": lambda: R.mixture_log_likelihood(*small),
        "genrep_fast": lambda: G.mixture_log_likelihood(*small),
    }[impl]()
    def status_kib(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set (VmHWM) to the current one
    before = status_kib("VmRSS:")
    fn()
    peak = status_kib("VmHWM:")
    print(json.dumps({"extra_peak_bytes": max(0, peak - before) * 1024}))
    """
)


def cpu_extra_peak_bytes(impl: str, layout: str, shape: dict) -> int:
    """Extra peak resident memory of one call, measured in a fresh process (see module doc)."""
    args = [impl, layout, *(str(shape[k]) for k in "BCTD")]
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, *args], capture_output=True, text=True, check=True
    )
    return int(json.loads(out.stdout.strip().splitlines()[-1])["extra_peak_bytes"])


def cuda_extra_peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


# The eager reference broadcasts [B, C, T, D] (several temporaries): at REALISTIC_GPU that is
# 31 GB each in float32 and 63 GB in float64, past an H100's 80 GB (the shared case failed there,
# both runs of bench/results/gpu-h100-20261126). It runs over chunks of images whose broadcast
# stays within this budget; the CPU shapes fit in one chunk, so their numbers do not change.
REFERENCE_CHUNK_BYTES = 2**31


def reference_in_chunks(x, mu, sigma, max_bytes=REFERENCE_CHUNK_BYTES):
    """``R.mixture_log_likelihood`` over chunks of images whose broadcast ``[b, C, T, D]`` in the
    compute dtype takes at most ``max_bytes`` (at least one image per chunk)."""
    per_image = (mu[0] if mu.dim() == 4 else mu).numel() * R.compute_dtype(x.dtype).itemsize
    step = max(1, max_bytes // per_image)
    if step >= x.shape[0]:
        return R.mixture_log_likelihood(x, mu, sigma)
    return torch.cat(
        [
            R.mixture_log_likelihood(
                x[lo : lo + step], mu[lo : lo + step] if mu.dim() == 4 else mu, sigma
            )
            for lo in range(0, x.shape[0], step)
        ]
    )


def _inputs(shape, layout, device, dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(0)
    b, c, t, d = (shape[k] for k in "BCTD")
    x = torch.randn(b, d, generator=g)
    mu = torch.randn(*((b, c, t) if layout == "per_image" else (c, t)), d, generator=g)
    sigma = 0.5 + torch.rand(t, generator=g)
    return tuple(a.to(device=device, dtype=dtype) for a in (x, mu, sigma))


def _compiled_reference():
    try:
        return torch.compile(R.mixture_log_likelihood)
    except Exception:  # pragma: no cover - torch.compile unavailable
        return None


@pytest.mark.parametrize("layout", ["shared", "per_image"])
def test_bench_mixture_log_likelihood(results, realistic, bench_device, layout):
    if bench_device == "cuda":
        shape = REALISTIC_GPU if realistic else SMOKE
        if layout == "per_image" and realistic:
            shape = dict(shape, C=10)  # 256*10*75*4096 fp32 = 3.1 GB of mu
    else:
        shape = REALISTIC_CPU if realistic else SMOKE
    x, mu, sigma = _inputs(shape, layout, bench_device)
    b, c, t, d = (shape[k] for k in "BCTD")
    if not realistic:  # the chunking itself: a few images per chunk give the same numbers
        torch.testing.assert_close(
            reference_in_chunks(x, mu, sigma, max_bytes=1), R.mixture_log_likelihood(x, mu, sigma)
        )
    timings = {
        "reference": time_fn(lambda: reference_in_chunks(x, mu, sigma), device=bench_device),
        "genrep_fast": time_fn(
            lambda: G.mixture_log_likelihood(x, mu, sigma, validate=False), device=bench_device
        ),
    }
    prepared = None
    if layout == "shared":
        # The bank prepared once (what a trainer does after each refresh): the per-call cost
        # without the float64 copy / GEMM operands that raw tensors get recomputed every call.
        prepared = G.prepare_bank(mu, sigma)
        timings["genrep_fast_prepared"] = time_fn(
            lambda: G.mixture_log_likelihood(x, prepared, validate=False), device=bench_device
        )
    compiled = _compiled_reference()
    if compiled is not None:
        try:
            compiled(x, mu, sigma)
            timings["reference_compiled"] = time_fn(
                lambda: compiled(x, mu, sigma), device=bench_device
            )
        except Exception as exc:  # recorded as missing, the reason printed
            print(f"torch.compile(reference) failed for {layout}: {type(exc).__name__}: {exc}")
    if bench_device == "cuda" and layout == "shared":
        for prec in ("tf32x3", "tf32", "bf16"):
            timings[f"genrep_fast_{prec}"] = time_fn(
                lambda p=prec: G.mixture_log_likelihood(x, mu, sigma, precision=p, validate=False),
                device=bench_device,
            )
            timings[f"genrep_fast_{prec}_prepared"] = time_fn(
                lambda p=prec: G.mixture_log_likelihood(x, prepared, precision=p, validate=False),
                device=bench_device,
            )
    peak = None
    if realistic:
        if bench_device == "cpu":
            peak = {
                impl: cpu_extra_peak_bytes(impl, layout, shape)
                for impl in ("reference", "genrep_fast")
            }
        else:
            peak = {
                "reference": cuda_extra_peak_bytes(lambda: reference_in_chunks(x, mu, sigma)),
                "genrep_fast": cuda_extra_peak_bytes(
                    lambda: G.mixture_log_likelihood(x, mu, sigma)
                ),
            }
    bytes_mu = mu.numel() * mu.element_size()
    recs = results.add(
        "posterior",
        f"mixture_ll_{layout}",
        timings,
        baseline="reference",
        params=dict(shape, dtype="float32", layout=layout),
        bytes_moved=bytes_mu if layout == "per_image" else None,
        flops=2.0 * b * c * t * d,
        peak_memory=peak,
        cost=(
            roofline.per_image_bank if layout == "per_image" else roofline.shared_bank_difference
        )(b, c, t, d),
    )
    fast = next(r for r in recs if r.impl == "genrep_fast")
    print(
        f"{layout} {shape}: genrep_fast {fast.seconds * 1e3:.2f} ms, {fast.speedup:.1f}x reference"
    )
    # Same numbers as the reference (the benchmark measures a correct op), on at most 16 images
    # (the float64 copy of a per-image bank of all 256 would not fit)
    n = min(16, b)
    mu_n = mu[:n] if layout == "per_image" else mu
    want = reference_in_chunks(x[:n].double(), mu_n.double(), sigma.double())
    torch.testing.assert_close(
        G.mixture_log_likelihood(x, mu, sigma)[:n].double(), want, rtol=1e-5, atol=1e-3
    )
    if prepared is not None:
        got = G.mixture_log_likelihood(x, prepared)[:n]
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)
        # Preparing is lazy: the snapshot copies the bank, its first call derives the operands.
        first = time_fn(
            lambda: G.mixture_log_likelihood(x, G.prepare_bank(mu, sigma), validate=False),
            device=bench_device,
        )
        print(
            f"{layout}: raw {timings['genrep_fast'] * 1e3:.2f} ms, prepared "
            f"{timings['genrep_fast_prepared'] * 1e3:.2f} ms per call; prepare + first call "
            f"{first * 1e3:.2f} ms"
        )


def test_bench_posterior_kl_loss(results, realistic, bench_device):
    b, c = (256, 1000) if realistic else (8, 10)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(b, c, generator=g).to(bench_device).requires_grad_()
    ll = (torch.randn(b, c, generator=g) * 50).to(bench_device)

    def run(fn):
        def step():
            loss = fn(logits, ll)
            loss.backward()
            logits.grad = None

        return step

    impls = (("reference", R.posterior_kl_loss), ("genrep_fast", G.posterior_kl_loss))
    cases = {"kl_loss_fwd_bwd": {n: time_fn(run(fn), device=bench_device) for n, fn in impls}}
    if bench_device == "cuda":
        # The same steps replayed from CUDA graphs: the GPU's time without the host's. Eager, both
        # are host-bound at B=256, C=1000 (about 0.4 ms of host time for microseconds of kernels,
        # bench/results/gpu-h100-20261127), so the eager ratio compares Python overheads.
        cases["kl_loss_fwd_bwd_graph"] = {
            n: time_fn(cuda_graph(run(fn), device=bench_device), device=bench_device)
            for n, fn in impls
        }
    for case, timings in cases.items():
        results.add(
            "posterior",
            case,
            timings,
            baseline="reference",
            params={"B": b, "C": c, "dtype": "float32"},
            bytes_moved=3.0 * b * c * 4,
            cost=roofline.kl_loss(b, c),
        )
        print(
            f"{case} B={b} C={c}: genrep_fast {timings['genrep_fast'] * 1e6:.1f} us, "
            f"{timings['reference'] / timings['genrep_fast']:.2f}x the reference"
        )


# ImageNet-scale cases (the GPU targets of the kernel-performance work): the shared bank in every
# precision against a plain GEMM of the same shape and precision, candidate classes, and the
# per-image bank in fp32 and bf16 against the copy bandwidth. Smoke: the same code at tiny shapes.
IMAGENET_SHARED = {"B": 256, "C": 1000, "T": 100, "D": 4096}
IMAGENET_CANDIDATES = {"B": 256, "C": 1000, "T": 100, "D": 4096, "K": 20}
PER_IMAGE_GPU = {"B": 64, "C": 10, "T": 75, "D": 4096}
SMOKE_LARGE = {
    "B": 4,
    "C": 4,
    "T": 5,
    "D": 16,
    "K": 3,
}  # T > C: a bank cut by class keeps sigma [T]

_GEMM_DTYPE = {"ieee": torch.float32, "tf32x3": torch.float32, "tf32": torch.float32}


def _plain_gemm_seconds(b, n, d, precision, device):
    """``[b, d] @ [d, n]`` in the arithmetic of ``precision`` (tf32 for tf32, else fp32; bf16)."""
    from genrep_fast.benchmarking import gemm_seconds

    dtype = _GEMM_DTYPE.get(precision, torch.bfloat16)
    if device != "cuda":
        return gemm_seconds(b, n, d, dtype, device)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        return gemm_seconds(b, n, d, dtype, device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _large_shape(realistic, bench_device, shape):
    if not realistic:
        return SMOKE_LARGE
    if bench_device != "cuda":
        pytest.skip("ImageNet-scale cases need a GPU (they hold GBs of bank)")
    return shape


@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32", "bf16"])
def test_bench_shared_bank_vs_plain_gemm(results, realistic, bench_device, precision):
    shape = _large_shape(realistic, bench_device, IMAGENET_SHARED)
    b, c, t, d = (shape[k] for k in "BCTD")
    x, mu, sigma = _inputs(shape, "shared", bench_device)
    sigma = sigma + 1.0  # sigma >= 1.5: the regime where the GEMM modes are accurate
    fn = lambda: G.mixture_log_likelihood(x, mu, sigma, precision=precision, validate=False)  # noqa: E731
    # A PreparedBank holds the GEMM operands (bf16 / tf32-rounded copy, row norms) made once per
    # bank refresh; raw tensors remake them every call (a pass over the whole bank).
    bank = G.prepare_bank(mu, sigma)
    fn_prepared = lambda: G.mixture_log_likelihood(x, bank, precision=precision, validate=False)  # noqa: E731
    gemm = _plain_gemm_seconds(b, c * t, d, precision, bench_device)
    timings = {"plain_gemm": gemm, "genrep_fast": time_fn(fn, device=bench_device)}
    timings["genrep_fast_prepared"] = time_fn(fn_prepared, device=bench_device)
    results.add(
        "posterior",
        f"shared_bank_{precision}",
        timings,
        baseline="plain_gemm",
        params=dict(shape, dtype="float32", precision=precision),
        flops=2.0 * b * c * t * d,
        gemm_time=gemm,
        cost=roofline.shared_bank_difference(b, c, t, d)
        if precision == "ieee"
        else roofline.shared_bank_gemm(b, c, t, d, precision=precision),
    )
    # The op timed is correct: every row against the float64 reference, within the mode's error.
    # (two images, the first classes: the float64 reference materialises [B, C, T, D]).
    # sigma is isotropic [T]: only the bank is cut to its first classes.
    cc = min(c, 50)
    want = R.mixture_log_likelihood(x[:2].double(), mu[:cc].double(), sigma.double())
    atol = {"ieee": 1e-3, "tf32x3": 1e-3, "tf32": 0.05, "bf16": 0.5}[precision]
    torch.testing.assert_close(fn()[:2, :cc].double(), want, rtol=1e-5, atol=atol)
    torch.testing.assert_close(fn_prepared()[:2, :cc].double(), want, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bench_candidate_classes(results, realistic, bench_device, bank_dtype):
    shape = _large_shape(realistic, bench_device, IMAGENET_CANDIDATES)
    b, c, t, d, k = (shape[key] for key in "BCTDK")
    x, mu, sigma = _inputs(shape, "shared", bench_device, dtype=bank_dtype)
    g = torch.Generator().manual_seed(1)
    ci = torch.stack([torch.randperm(c, generator=g)[:k] for _ in range(b)]).to(bench_device)
    fn = lambda: G.mixture_log_likelihood(x, mu, sigma, class_index=ci, validate=False)  # noqa: E731
    timings = {"genrep_fast": time_fn(fn, device=bench_device)}
    try:
        ref = lambda: R.mixture_log_likelihood(x, mu, sigma, class_index=ci)  # noqa: E731
        timings["reference"] = time_fn(ref, device=bench_device, min_reps=1, min_time_s=0.0)
    except torch.OutOfMemoryError as exc:  # [B, K, T, D] does not fit: recorded as missing
        print(f"reference does not fit at {shape}: {exc}".splitlines()[0])
    recs = results.add(
        "posterior",
        f"candidates_K{k}_{str(bank_dtype).split('.')[-1]}",
        timings,
        baseline="reference" if "reference" in timings else "genrep_fast",
        params=dict(shape, dtype=str(bank_dtype).split(".")[-1]),
        bytes_moved=float(b * k * t * d * mu.element_size()),
        cost=roofline.candidate_classes(b, k, t, d, s_bank=mu.element_size(), s_x=x.element_size()),
    )
    fast = next(r for r in recs if r.impl == "genrep_fast")
    print(f"candidates {shape}: {fast.seconds / b * 1e6:.2f} us per image")
    want = R.mixture_log_likelihood(x[:2].double(), mu.double(), sigma.double(), class_index=ci[:2])
    torch.testing.assert_close(fn()[:2].double(), want, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bench_per_image_bank_bandwidth(results, realistic, bench_device, dtype):
    shape = _large_shape(realistic, bench_device, PER_IMAGE_GPU)
    b, c, t, d = (shape[key] for key in "BCTD")
    x, mu, sigma = _inputs(shape, "per_image", bench_device, dtype=dtype)
    fn = lambda: G.mixture_log_likelihood(x, mu, sigma, validate=False)  # noqa: E731
    timings = {
        "genrep_fast": time_fn(fn, device=bench_device, l2_cold=bench_device == "cuda"),
        "reference": time_fn(lambda: R.mixture_log_likelihood(x, mu, sigma), device=bench_device),
    }
    results.add(
        "posterior",
        f"per_image_{str(dtype).split('.')[-1]}",
        timings,
        baseline="reference",
        params=dict(shape, dtype=str(dtype).split(".")[-1]),
        bytes_moved=float(mu.numel() * mu.element_size()),
        cost=roofline.per_image_bank(b, c, t, d, s_bank=mu.element_size(), s_x=x.element_size()),
    )
    want = R.mixture_log_likelihood(x.double(), mu.double(), sigma.double())
    torch.testing.assert_close(fn().double(), want, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bench_per_image_diagonal_sigma(results, realistic, bench_device, dtype):
    """The per-image bank with a diagonal sigma of the bank's shape: two streams read once (the
    bank and sigma), a division per value and the log-determinant of every sigma row. Realistic:
    REALISTIC_CPU's shape on the CPU, PER_IMAGE_GPU's on a GPU."""
    if not realistic:
        shape = SMOKE
    else:
        shape = PER_IMAGE_GPU if bench_device == "cuda" else REALISTIC_CPU
    b, c, t, d = (shape[key] for key in "BCTD")
    x, mu, _ = _inputs(shape, "per_image", bench_device, dtype=dtype)
    g = torch.Generator(device="cpu").manual_seed(1)
    sigma = (0.5 + torch.rand(b, c, t, d, generator=g)).to(device=bench_device, dtype=dtype)
    fn = lambda: G.mixture_log_likelihood(x, mu, sigma, validate=False)  # noqa: E731
    timings = {
        "genrep_fast": time_fn(fn, device=bench_device, l2_cold=bench_device == "cuda"),
        "reference": time_fn(lambda: R.mixture_log_likelihood(x, mu, sigma), device=bench_device),
    }
    name = str(dtype).split(".")[-1]
    sizes = dict(s_bank=mu.element_size(), s_x=x.element_size(), s_sigma=sigma.element_size())
    results.add(
        "posterior",
        f"per_image_diag_sigma_{name}",
        timings,
        baseline="reference",
        params=dict(shape, dtype=name, sigma="diagonal"),
        bytes_moved=float(mu.numel() * mu.element_size() + sigma.numel() * sigma.element_size()),
        cost=roofline.per_image_bank(b, c, t, d, **sizes),
    )
    n = min(8, b)  # the float64 check on a few images (a float64 copy of the whole is GBs)
    want = R.mixture_log_likelihood(x[:n].double(), mu[:n].double(), sigma[:n].double())
    torch.testing.assert_close(fn()[:n].double(), want, rtol=1e-4, atol=1e-2)
