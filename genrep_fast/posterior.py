"""Generative perception: the mixture likelihood of the chain bank, the class posterior and the
distillation loss (docs/METHOD.md section 1).

This module is the public API and the dispatch: the functions validate their arguments, then
run a backend, each in a module of its own named for what runs:

* ``"triton"``: the fused Triton kernels of ``genrep_fast.kernels`` (the CUDA default);
* ``"cpp"``: the C++ kernels of csrc/mixture_cpu.cpp, ``genrep_fast.mixture_cpp`` (mixture
  likelihood only; the CPU default for a per-image bank and for candidate classes);
* ``"torch"``: chunked torch code, ``genrep_fast.mixture_torch`` (the CPU default for a shared
  bank without candidates; the posterior and the loss in plain torch);
* ``"reference"``: the eager reference of ``genrep_fast.reference`` (materialises
  ``[B, C, T, D]``; the oracle of the tests and the benchmark baseline).

The custom ops (``torch.ops.genrep_fast.*``: opaque to torch.compile, differentiable through
``register_autograd``) are registered here too.

``mixture_log_likelihood`` takes the bank as tensors (read as they are at the call; the per-bank
operands of the fast paths are derived per call) or as a ``genrep_fast.PreparedBank`` snapshot
(derived once; ``genrep_fast/prepared_bank.py``). Nothing is cached between calls.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch

from genrep_fast import mixture_cpp, mixture_torch, reference
from genrep_fast._validation import (
    check_choice,
    check_class_index,
    check_float_tensor,
    check_positive_finite,
    check_same_device,
    check_same_dtype,
    check_tensor,
)
from genrep_fast.layout import compute_dtype, is_per_image, num_classes_out
from genrep_fast.prepared_bank import PreparedBank

PRECISIONS = ("ieee", "tf32x3", "tf32", "bf16")
# mixture_log_likelihood's backends; the posterior and the loss have no C++ kernels.
MIXTURE_BACKENDS = ("auto", "triton", "cpp", "torch", "reference")
BACKENDS = ("auto", "triton", "torch", "reference")
REDUCTIONS = ("batchmean", "sum", "none")


def validate_bank(
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    class_index: torch.Tensor | None,
    *,
    check_values: bool = True,
    check_sigma: bool = True,
) -> None:
    """Shapes, dtypes and devices of ``(x, mu, sigma, class_index)``; see ``mixture_log_likelihood``.
    ``check_values`` checks the values of ``class_index`` and (with ``check_sigma``) of sigma."""
    check_float_tensor("x", x, min_ndim=2)
    check_float_tensor("mu", mu)
    check_float_tensor("sigma", sigma, min_ndim=1)
    if class_index is not None:
        check_tensor("class_index", class_index)
    check_same_device(x=x, mu=mu, sigma=sigma, class_index=class_index)
    check_same_dtype(x=x, mu=mu)
    latent = tuple(x.shape[1:])
    b = x.shape[0]
    if mu.dim() == x.dim() + 1:
        if tuple(mu.shape[2:]) != latent:
            raise ValueError(
                f"mu: a shared bank must be [C, T, *latent] with latent = x.shape[1:] = {latent}, "
                f"got mu of shape {tuple(mu.shape)}"
            )
        c, t = mu.shape[0], mu.shape[1]
        iso_shapes = [(t,), (c, t)]
    elif mu.dim() == x.dim() + 2:
        if mu.shape[0] != b or tuple(mu.shape[3:]) != latent:
            raise ValueError(
                f"mu: a per-image bank must be [B, C, T, *latent] = [{b}, C, T, {latent}], "
                f"got mu of shape {tuple(mu.shape)}"
            )
        c, t = mu.shape[1], mu.shape[2]
        iso_shapes = [(t,), (c, t), (b, c, t)]
    else:
        raise ValueError(
            f"mu must be a shared bank [C, T, *latent] ({x.dim() + 1} dims) or a per-image bank "
            f"[B, C, T, *latent] ({x.dim() + 2} dims) for x of shape {tuple(x.shape)}; "
            f"got mu of shape {tuple(mu.shape)}"
        )
    if c < 1 or t < 1 or b < 1:
        raise ValueError(f"need B >= 1, C >= 1 and T >= 1; got B={b}, C={c}, T={t}")
    if tuple(sigma.shape) != tuple(mu.shape) and tuple(sigma.shape) not in iso_shapes:
        raise ValueError(
            f"sigma must be isotropic {' or '.join(str(list(s)) for s in iso_shapes)} or diagonal "
            f"(the shape of mu, {list(mu.shape)}); got sigma of shape {list(sigma.shape)}"
        )
    if class_index is not None:
        check_class_index(class_index, num_classes=c, rows=b, check_values=check_values)
    if check_values and check_sigma:
        check_positive_finite("sigma", sigma)


def _find_triton() -> bool:
    # find_spec, not import: importing triton costs ~1 s and is only needed once a kernel runs.
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a blocked or broken installation
        return False


# Decided once, here: the dispatch below runs inside code that torch.compile traces, where an
# `import triton` that fails (the base install has no triton) is an "Import failure" graph break
# that fullgraph=True turns into an error.
HAS_TRITON = _find_triton()


def _triton_available(device: torch.device) -> bool:
    return HAS_TRITON and device.type == "cuda"


def _resolve_backend(backend: str, device: torch.device) -> str:
    """``"auto"``: the Triton kernels on CUDA, the torch code elsewhere. The Triton interpreter is
    for tests only, so ``"auto"`` never picks it on CPU."""
    if backend != "auto":
        return backend
    return "triton" if _triton_available(device) else "torch"


def _resolve_mixture_backend(
    backend: str, x: torch.Tensor, mu: torch.Tensor, class_index: torch.Tensor | None
) -> str:
    """``"auto"`` for the mixture likelihood: Triton on CUDA; on CPU the C++ kernels for the
    layouts they serve best (``mixture_cpp.preferred``) where they are built, else the torch code."""
    impl = _resolve_backend(backend, x.device)
    if backend == "auto" and impl == "torch":
        if mixture_cpp.available(x.device) and mixture_cpp.preferred(x, mu, class_index):
            return "cpp"
    return impl


# ------------------------------------------------------------------------------------------------
# Custom ops: genrep_fast::mixture_log_likelihood (+ its backward). Opaque to torch.compile (the
# fake implementations give the output shapes), differentiable through register_autograd.
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("genrep_fast::mixture_log_likelihood", mutates_args=())
def _mixture_ll_op(
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    class_index: torch.Tensor | None,
    precision: str,
    impl: str,
    prepared: list[torch.Tensor],
) -> torch.Tensor:
    """``prepared``: the operands a ``PreparedBank`` derived from ``(mu, sigma)`` for this impl and
    precision (``PreparedBank._operands_for``); ``[]`` derives what is needed on this call."""
    _check_ll_op_args(x, mu, sigma, class_index, precision, impl)
    return _ll_forward(x, mu, sigma, class_index, precision, impl, prepared)


def _ll_forward(x, mu, sigma, class_index, precision, impl, prepared) -> torch.Tensor:
    """The forward of ``genrep_fast::mixture_log_likelihood`` on checked arguments."""
    if impl == "triton":
        from genrep_fast.kernels import mixture as mixture_kernels

        ops = mixture_kernels.GemmOperands(*prepared) if prepared else None
        lse = mixture_kernels.mixture_lse(
            x, mu, sigma, class_index, precision=precision, operands=ops
        )
        t = mu.shape[2] if is_per_image(x, mu) else mu.shape[1]
        return (lse - math.log(t)).to(compute_dtype(x.dtype))
    if impl == "cpp":
        return mixture_cpp.forward(x, mu, sigma, class_index)
    return mixture_torch.forward(x, mu, sigma, class_index, prepared=_torch_prepared(prepared))


def _torch_prepared(prepared: list[torch.Tensor]) -> mixture_torch.GemmBank | None:
    return mixture_torch.GemmBank(*prepared) if prepared else None


def _check_ll_op_args(x, mu, sigma, class_index, precision, impl) -> None:
    """The public function's checks less the value checks (no host sync): the op is also
    reachable directly, as ``torch.ops.genrep_fast.mixture_log_likelihood``."""
    check_choice("precision", precision, PRECISIONS)
    check_choice("impl", impl, ("torch", "cpp", "triton"))
    validate_bank(x, mu, sigma, class_index, check_values=False)
    if impl == "triton":
        _check_triton_usable(x.device)
    elif impl == "cpp":
        _check_cpp_usable(x.device)


@_mixture_ll_op.register_fake
def _(x, mu, sigma, class_index, precision, impl, prepared):
    k = num_classes_out(x, mu, class_index)
    return x.new_empty((x.shape[0], k), dtype=compute_dtype(x.dtype))


@torch.library.custom_op("genrep_fast::mixture_log_likelihood_backward", mutates_args=())
def _mixture_ll_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    mu: torch.Tensor,
    sigma: torch.Tensor,
    class_index: torch.Tensor | None,
    need_x: bool,
    need_mu: bool,
    need_sigma: bool,
    impl: str,
    prepared: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recompute-based backward: the scores, their LSE and the mixture weights are recomputed tile
    by tile (Triton, exact difference form whatever the forward precision) or chunk by chunk
    (torch: float64 GEMM form for a shared bank; C++: row by row), so ``[B, C, T]`` is never stored. The LSE is not
    taken from the forward's float32 output: its rounding (ulp(|ll|), 0.06 nats at -6e5) would
    scale the weights. Gradients not asked for come back as empty tensors."""
    _check_ll_op_args(x, mu, sigma, class_index, "ieee", impl)
    check_float_tensor("grad", grad)
    k = num_classes_out(x, mu, class_index)
    if tuple(grad.shape) != (x.shape[0], k):
        raise ValueError(f"grad must be [B, K] = [{x.shape[0]}, {k}], got {tuple(grad.shape)}")
    return _ll_backward(
        grad, x, mu, sigma, class_index, need_x, need_mu, need_sigma, impl, prepared
    )


def _ll_backward(
    grad, x, mu, sigma, class_index, need_x, need_mu, need_sigma, impl, prepared
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of ``genrep_fast::mixture_log_likelihood`` on checked arguments."""
    needs = (need_x, need_mu, need_sigma)
    if impl == "triton":
        gx, gmu, gsig = _triton_backward(grad, x, mu, sigma, class_index, needs)
    elif impl == "cpp":
        gx, gmu, gsig = mixture_cpp.backward(grad, x, mu, sigma, class_index, needs)
    else:
        gx, gmu, gsig = mixture_torch.backward(
            grad, x, mu, sigma, class_index, needs, prepared=_torch_prepared(prepared)
        )
    empty = x.new_empty(0)
    return (
        gx if gx is not None else empty,
        gmu if gmu is not None else empty.clone(),
        gsig if gsig is not None else empty.clone(),
    )


def _triton_backward(grad, x, mu, sigma, class_index, needs):
    from genrep_fast.kernels import mixture_backward

    return mixture_backward.mixture_lse_backward(grad, x, mu, sigma, class_index, needs)


@_mixture_ll_backward_op.register_fake
def _(grad, x, mu, sigma, class_index, need_x, need_mu, need_sigma, impl, prepared):
    return (
        torch.empty_like(x) if need_x else x.new_empty(0),
        torch.empty_like(mu) if need_mu else x.new_empty(0),
        torch.empty_like(sigma) if need_sigma else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, mu, sigma, class_index, _precision, impl, prepared = inputs
    tensors = (x, mu, sigma, *prepared)
    # A bank made under torch.inference_mode() cannot be saved for backward. It takes no gradient
    # (inference tensors never require grad) and has no version counter to check: hold it as is.
    ctx.held = tensors if any(t.is_inference() for t in tensors) else None
    ctx.save_for_backward(*(() if ctx.held else tensors))
    ctx.class_index = class_index
    ctx.impl = impl


def _input_grads(ctx, grad, backward) -> tuple[tuple, int]:
    """``((dx, dmu, dsigma), number of prepared operands)`` of the saved call, each gradient None
    where it is not needed; ``backward`` is the custom backward op or its body."""
    x, mu, sigma, *prepared = ctx.held or ctx.saved_tensors
    nx, nmu, nsig = ctx.needs_input_grad[:3]
    gx, gmu, gsig = backward(
        grad.contiguous(), x, mu, sigma, ctx.class_index, nx, nmu, nsig, ctx.impl, prepared
    )
    return (gx if nx else None, gmu if nmu else None, gsig if nsig else None), len(prepared)


def _backward(ctx, grad):
    grads, n = _input_grads(ctx, grad, _mixture_ll_backward_op)
    return (*grads, None, None, None, [None] * n)  # no gradient into the operands


_mixture_ll_op.register_autograd(_backward, setup_context=_setup_context)


class _MixtureLL(torch.autograd.Function):
    """``mixture_log_likelihood`` in eager mode: the custom op's forward and backward bodies
    (``_ll_forward``, ``_ll_backward``) behind a plain autograd.Function, without the custom op's
    dispatch and its second round of argument checks (the public function checked them). Under
    torch.compile the custom op runs instead (opaque, with its fake implementation)."""

    @staticmethod
    def forward(ctx, x, mu, sigma, class_index, precision, impl, *prepared):
        out = _ll_forward(x, mu, sigma, class_index, precision, impl, list(prepared))
        _setup_context(ctx, (x, mu, sigma, class_index, precision, impl, list(prepared)), out)
        return out

    @staticmethod
    def backward(ctx, grad):
        grads, n = _input_grads(ctx, grad, _ll_backward)
        return (*grads, None, None, None, *([None] * n))


def mixture_log_likelihood(
    x: torch.Tensor,
    mu: torch.Tensor | PreparedBank,
    sigma: torch.Tensor | None = None,
    *,
    class_index: torch.Tensor | None = None,
    precision: str = "ieee",
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Class-conditional log-likelihood of the chain bank's Gaussian mixture.

    ``log p(x|y) = logsumexp_t log N(x; mu[y,t], sigma[y,t]^2) - log T``, in nats.

    Args:
        x: ``[B, *latent]`` images or latents (float16/bfloat16/float32/float64).
        mu: shared bank ``[C, T, *latent]`` or per-image bank ``[B, C, T, *latent]``, same dtype as
            x; or a ``genrep_fast.PreparedBank`` of a shared bank (then no ``sigma``). Raw tensors
            are read as they are at this call: whatever the fast path derives from them (the
            float64 copy and row norms of the torch GEMM form, the Triton GEMM operands) is
            recomputed every call. A ``PreparedBank`` (``genrep_fast.prepare_bank(mu, sigma)``)
            derives it once, from a private snapshot of the bank, for many calls.
        sigma: isotropic ``[T]``, ``[C, T]`` (or ``[B, C, T]`` with a per-image bank), or diagonal
            (the shape of ``mu``); every value finite and > 0. None with a ``PreparedBank``.
        class_index: optional ``[B, K]`` int64 candidate classes per image (values in ``[0, C)``).
        precision: ``"ieee"`` (fp32), ``"tf32x3"``, ``"tf32"`` or ``"bf16"``: the arithmetic of the
            shared-bank GEMM form of the Triton backend (see docs/NUMERICS.md). The difference forms
            are exact fp32; the torch backend always uses a float64 GEMM form.
        backend: ``"auto"`` (Triton on CUDA; on CPU ``"cpp"`` for a per-image bank or candidate
            classes where the extension is built, else ``"torch"``), ``"triton"`` (the Triton
            kernels), ``"cpp"`` (the C++ kernels of the difference form, CPU tensors),
            ``"torch"`` (chunked torch code) or ``"reference"`` (the eager reference).
        validate: check ``sigma > 0`` and the class_index range (one host sync each); set False
            inside a hot loop once the inputs are known to be good.

    Returns:
        ``[B, C]`` (or ``[B, K]``) in float32 (float64 for float64 inputs).

    Non-finite values (docs/METHOD.md), the same on every backend: a NaN in x or mu makes the
    entries it takes part in NaN (with NaN gradients). Infinities follow the difference form: a
    step with an infinite ``x_d - mu_d`` has zero density and drops out (``x[b] = inf`` gives -inf
    for every class; ``mu[c, t] = inf`` removes step t of class c), the same infinity in x and mu
    at one position is NaN. An entry whose every step has zero density, or whose value is below
    the float range, is -inf (never NaN) and passes no gradient; zero-density steps add nothing to
    the gradients.
    """
    check_choice("precision", precision, PRECISIONS)
    check_choice("backend", backend, MIXTURE_BACKENDS)
    # The value checks sync with the host; under torch.compile they would break the graph, so a
    # compiled caller gets the shape/dtype checks only (validate eagerly once, outside the loop).
    check_values = validate and not torch.compiler.is_compiling()
    bank = None
    if isinstance(mu, PreparedBank):
        bank, mu, sigma = mu, *_prepared_tensors(x, mu, sigma)
    elif sigma is None:
        raise TypeError("sigma is required with a tensor mu (only a PreparedBank carries its own)")
    # A prepared bank's sigma was checked when it was prepared.
    validate_bank(x, mu, sigma, class_index, check_values=check_values, check_sigma=bank is None)
    impl = _resolve_mixture_backend(backend, x, mu, class_index)
    if impl == "reference":
        return reference.mixture_log_likelihood(x, mu, sigma, class_index=class_index)
    if impl == "triton":
        _check_triton_usable(x.device)
    elif impl == "cpp":
        _check_cpp_usable(x.device)
    prepared = [] if bank is None else bank._operands_for(impl, x, class_index, precision)
    if torch.compiler.is_compiling():
        return _mixture_ll_op(x, mu, sigma, class_index, precision, impl, prepared)
    return _MixtureLL.apply(x, mu, sigma, class_index, precision, impl, *prepared)


def _prepared_tensors(
    x: torch.Tensor, bank: PreparedBank, sigma: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """The snapshot's ``(mu, sigma)`` after the checks that only a prepared bank needs."""
    if sigma is not None:
        raise TypeError(
            "sigma must be None with a PreparedBank (it carries its own), got "
            f"{type(sigma).__name__}"
        )
    check_float_tensor("x", x, min_ndim=2)
    if tuple(x.shape[1:]) != bank.latent_shape:
        raise ValueError(
            f"x must be [B, *latent] with latent = {bank.latent_shape} (the prepared bank's), got "
            f"x of shape {tuple(x.shape)}"
        )
    if x.dtype != bank.dtype:
        raise TypeError(
            f"x is {x.dtype} but the prepared bank is {bank.dtype}: prepare it with "
            f"prepare_bank(mu, sigma, dtype={x.dtype}) or convert x"
        )
    return bank._mu, bank._sigma


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_triton_usable(device: torch.device) -> None:
    if not HAS_TRITON:
        raise ValueError("backend='triton' needs the triton package, which is not installed")
    if not _triton_available(device) and not _triton_interpreted():
        raise ValueError(
            f"backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 for tests); the "
            f"tensors are on {device}"
        )


def _check_cpp_usable(device: torch.device) -> None:
    if not mixture_cpp.available(device):
        raise ValueError(
            "backend='cpp' needs CPU tensors and genrep_fast._C built with the mixture kernels; "
            f"the tensors are on {device}"
            + (
                ""
                if mixture_cpp.available(torch.device("cpu"))
                else " and the kernels are not built"
            )
        )


def _check_log_prior(log_prior: torch.Tensor | None, scores: torch.Tensor) -> None:
    if log_prior is None:
        return
    check_float_tensor("log_prior", log_prior, min_ndim=1)
    check_same_device(log_likelihood=scores, log_prior=log_prior)
    b, c = scores.shape
    if tuple(log_prior.shape) not in ((c,), (b, c)):
        raise ValueError(
            f"log_prior must be [C] = [{c}] or [B, C] = [{b}, {c}], got {list(log_prior.shape)}"
        )


def class_posterior(
    log_likelihood: torch.Tensor,
    log_prior: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """p(y|x) = softmax_y(log p(x|y) + log p(y)) for ``log_likelihood: [B, C]``; uniform prior by
    default. Returns ``[B, C]`` probabilities (float32, or float64 for float64 input).

    ``backend``: ``"auto"`` (the fused Triton kernel on CUDA, torch elsewhere), ``"triton"``,
    ``"torch"`` or ``"reference"``.

    Non-finite values (docs/METHOD.md): a class at -inf (log-likelihood or log-prior) gets
    probability 0; a row with a NaN or +inf, or with every class at -inf, is NaN throughout.
    """
    check_choice("backend", backend, BACKENDS)
    check_float_tensor("log_likelihood", log_likelihood)
    if log_likelihood.dim() != 2:
        raise ValueError(f"log_likelihood must be [B, C], got shape {tuple(log_likelihood.shape)}")
    _check_log_prior(log_prior, log_likelihood)
    if _posterior_impl(backend, log_likelihood.device) == "triton":
        return _class_posterior_op(log_likelihood, log_prior)
    return reference.class_posterior(log_likelihood, log_prior)


def _posterior_impl(backend: str, device: torch.device) -> str:
    impl = _resolve_backend(backend, device)
    if impl == "triton":
        _check_triton_usable(device)
    return impl


def posterior_kl_loss(
    logits: torch.Tensor,
    log_likelihood: torch.Tensor,
    log_prior: torch.Tensor | None = None,
    reduction: str = "batchmean",
    *,
    class_index: torch.Tensor | None = None,
    detach_teacher: bool = True,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """L_gen_distil = KL(p(y|x) || softmax(logits)), the teacher p from the mixture likelihood.

    Args:
        logits: ``[B, C]`` head logits (the student).
        log_likelihood: ``[B, C]`` (or ``[B, K]`` with ``class_index``) from
            ``mixture_log_likelihood``.
        log_prior: optional ``[C]`` / ``[B, C]`` (``[K]`` / ``[B, K]`` with candidates) log prior.
        reduction: ``"batchmean"`` (default: sum over classes, mean over images), ``"sum"``,
            ``"none"`` (``[B]``).
        class_index: ``[B, K]`` candidates: logits are gathered to them and both distributions
            are renormalised over the K classes.
        detach_teacher: no gradient into the teacher (default, docs/METHOD.md).
        backend: ``"auto"`` (the fused Triton kernels on CUDA, torch elsewhere), ``"triton"``,
            ``"torch"`` or ``"reference"``. ``detach_teacher=False`` always runs the reference.
        validate: check the class_index range (a host sync); False for indices known to be in
            range (the trainer's, built from the head's top-k and labels checked once).

    Non-finite values (docs/METHOD.md): classes at -inf are valid (p = 0, no contribution). An
    image whose teacher row holds a NaN or +inf, or has every class at -inf, or whose logits hold
    a NaN or +inf, gets a NaN loss and NaN logit gradients, so a reduced loss is NaN: never a
    finite loss over NaN gradients. A logit of -inf where p > 0 gives a loss of +inf.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("backend", backend, BACKENDS)
    check_float_tensor("logits", logits)
    check_float_tensor("log_likelihood", log_likelihood)
    if class_index is not None:
        check_tensor("class_index", class_index)
    check_same_device(logits=logits, log_likelihood=log_likelihood, class_index=class_index)
    if logits.dim() != 2 or log_likelihood.dim() != 2:
        raise ValueError(
            f"logits and log_likelihood must be 2-D, got {tuple(logits.shape)} and "
            f"{tuple(log_likelihood.shape)}"
        )
    if class_index is not None:
        check_class_index(
            class_index,
            num_classes=logits.shape[1],
            shape=tuple(log_likelihood.shape),
            check_values=validate,
        )
        class_index = class_index.long()
    elif tuple(logits.shape) != tuple(log_likelihood.shape):
        raise ValueError(
            f"logits {tuple(logits.shape)} and log_likelihood {tuple(log_likelihood.shape)} must "
            "have the same shape (pass class_index for candidate classes)"
        )
    _check_log_prior(log_prior, log_likelihood)
    impl = _posterior_impl(backend, logits.device)
    if not detach_teacher or impl == "reference":
        # Gradient into the teacher as well: plain autograd through the reference math.
        return reference.posterior_kl_loss(
            logits,
            log_likelihood,
            log_prior,
            reduction,
            class_index=class_index,
            detach_teacher=detach_teacher,
        )
    if class_index is not None:
        logits = torch.gather(logits, 1, class_index)
    if impl == "triton":
        if torch.compiler.is_compiling():
            # The custom op: opaque to torch.compile, with its fake implementation.
            per_image = _posterior_kl_op(logits, log_likelihood, log_prior)[0]
        else:
            # Eager: the same kernels through a plain autograd.Function, without the custom
            # op's dispatch and its second round of argument checks (done above): 97 instead of
            # 200 us of host time per forward + backward (the 2-core CPU machine, launches
            # stubbed), which is what a small loss (B=256, C=1000: microseconds of GPU work)
            # costs per step.
            per_image = _PosteriorKLKernels.apply(logits, log_likelihood, log_prior)
    else:
        per_image = _PosteriorKL.apply(logits, log_likelihood, log_prior)
    if reduction == "none":
        return per_image
    if reduction == "sum":
        return per_image.sum()
    return per_image.mean()


class _PosteriorKLKernels(torch.autograd.Function):
    """The Triton path of ``posterior_kl_loss`` in eager mode: the kernels of
    ``genrep_fast.kernels.posterior_loss`` (as ``genrep_fast::posterior_kl`` runs them) behind a
    plain autograd.Function. Per-image KL ``[B]``; only the logits get a gradient."""

    @staticmethod
    def forward(ctx, logits, log_likelihood, log_prior):
        from genrep_fast.kernels import posterior_loss

        _, kl, stats = posterior_loss.posterior_forward(
            log_likelihood, log_prior, logits, store_posterior=False
        )
        ctx.save_for_backward(logits, log_likelihood, log_prior, stats)
        return kl

    @staticmethod
    def backward(ctx, grad):
        from genrep_fast.kernels import posterior_loss

        logits, log_likelihood, log_prior, stats = ctx.saved_tensors
        gz = posterior_loss.posterior_kl_backward(grad, log_likelihood, log_prior, logits, stats)
        return gz, None, None


class _PosteriorKL(torch.autograd.Function):
    """Per-image ``KL(p || softmax(logits))`` ``[B]`` with the teacher p detached.

    Saves ``p`` and ``log q`` (``[B, C]`` each) and returns ``dL/dlogits = g * (q - p)`` in one
    elementwise pass instead of autograd's chain through log_softmax, where, sub and sum.
    """

    @staticmethod
    def forward(ctx, logits, log_likelihood, log_prior):
        log_p = reference.log_class_posterior(log_likelihood.detach(), log_prior)
        log_p = log_p.detach()
        log_q = torch.log_softmax(logits.detach().to(log_p.dtype), dim=-1)
        per_image, p = reference.kl_divergence(log_p, log_q)
        ctx.save_for_backward(p, log_q)
        ctx.logits_dtype = logits.dtype
        return per_image

    @staticmethod
    def backward(ctx, grad):
        p, log_q = ctx.saved_tensors
        grad_logits = (log_q.exp() - p) * grad.to(p.dtype)[:, None]
        return grad_logits.to(ctx.logits_dtype), None, None


# ------------------------------------------------------------------------------------------------
# Custom ops of the fused posterior / KL kernels (the Triton path): opaque to torch.compile.
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("genrep_fast::class_posterior", mutates_args=())
def _class_posterior_op(
    log_likelihood: torch.Tensor, log_prior: torch.Tensor | None
) -> torch.Tensor:
    _check_posterior_op_args(log_likelihood, log_prior)
    from genrep_fast.kernels import posterior_loss

    p, _, _ = posterior_loss.posterior_forward(
        log_likelihood, log_prior, None, store_posterior=True
    )
    return p


def _check_posterior_op_args(log_likelihood, log_prior, logits=None) -> None:
    """Checks of the Triton posterior / KL ops, reachable directly through torch.ops.genrep_fast."""
    check_float_tensor("log_likelihood", log_likelihood)
    if log_likelihood.dim() != 2:
        raise ValueError(f"log_likelihood must be [B, C], got shape {tuple(log_likelihood.shape)}")
    _check_log_prior(log_prior, log_likelihood)
    if logits is not None:
        check_float_tensor("logits", logits)
        check_same_device(logits=logits, log_likelihood=log_likelihood)
        if logits.shape != log_likelihood.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} and log_likelihood {tuple(log_likelihood.shape)} "
                f"must have the same shape"
            )
    _check_triton_usable(log_likelihood.device)


@_class_posterior_op.register_fake
def _(log_likelihood, log_prior):
    return log_likelihood.new_empty(log_likelihood.shape, dtype=compute_dtype(log_likelihood.dtype))


def _class_posterior_setup(ctx, inputs, output):
    log_likelihood, log_prior = inputs
    ctx.save_for_backward(output)
    ctx.ll_dtype = log_likelihood.dtype
    ctx.prior_shape = None if log_prior is None else tuple(log_prior.shape)
    ctx.prior_dtype = None if log_prior is None else log_prior.dtype


def _class_posterior_backward(ctx, grad):
    # Softmax backward: ds = p * (g - sum_y p g); the prior gets the same, summed over a
    # broadcast batch dim.
    (p,) = ctx.saved_tensors
    ds = p * (grad - (p * grad).sum(-1, keepdim=True))
    d_prior = None
    if ctx.prior_shape is not None:
        d_prior = (ds.sum(0) if len(ctx.prior_shape) == 1 else ds).to(ctx.prior_dtype)
    return ds.to(ctx.ll_dtype), d_prior


_class_posterior_op.register_autograd(
    _class_posterior_backward, setup_context=_class_posterior_setup
)


@torch.library.custom_op("genrep_fast::posterior_kl", mutates_args=())
def _posterior_kl_op(
    logits: torch.Tensor, log_likelihood: torch.Tensor, log_prior: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image ``KL(p || softmax(logits))`` ``[B]`` and the row statistics ``[B, 4]`` that the
    backward recomputes p and q from (see ``genrep_fast.kernels.posterior_loss``)."""
    _check_posterior_op_args(log_likelihood, log_prior, logits)
    from genrep_fast.kernels import posterior_loss

    _, kl, stats = posterior_loss.posterior_forward(
        log_likelihood, log_prior, logits, store_posterior=False
    )
    return kl, stats


@_posterior_kl_op.register_fake
def _(logits, log_likelihood, log_prior):
    dt = compute_dtype(log_likelihood.dtype)
    b = log_likelihood.shape[0]
    return log_likelihood.new_empty((b,), dtype=dt), log_likelihood.new_empty((b, 4), dtype=dt)


@torch.library.custom_op("genrep_fast::posterior_kl_backward", mutates_args=())
def _posterior_kl_backward_op(
    grad: torch.Tensor,
    logits: torch.Tensor,
    log_likelihood: torch.Tensor,
    log_prior: torch.Tensor | None,
    stats: torch.Tensor,
) -> torch.Tensor:
    _check_posterior_op_args(log_likelihood, log_prior, logits)
    b = log_likelihood.shape[0]
    check_float_tensor("grad", grad)
    check_float_tensor("stats", stats)
    if tuple(grad.shape) != (b,) or tuple(stats.shape) != (b, 4):
        raise ValueError(
            f"grad must be [B] and stats [B, 4] with B = {b}, got {tuple(grad.shape)} and "
            f"{tuple(stats.shape)}"
        )
    from genrep_fast.kernels import posterior_loss

    return posterior_loss.posterior_kl_backward(grad, log_likelihood, log_prior, logits, stats)


@_posterior_kl_backward_op.register_fake
def _(grad, logits, log_likelihood, log_prior, stats):
    return torch.empty_like(logits)


def _posterior_kl_setup(ctx, inputs, output):
    logits, log_likelihood, log_prior = inputs
    ctx.save_for_backward(logits, log_likelihood, log_prior, output[1])


def _posterior_kl_backward(ctx, grad_kl, _grad_stats):
    logits, log_likelihood, log_prior, stats = ctx.saved_tensors
    # The teacher is detached: only the logits get a gradient.
    gz = _posterior_kl_backward_op(grad_kl, logits, log_likelihood, log_prior, stats)
    return gz, None, None


_posterior_kl_op.register_autograd(_posterior_kl_backward, setup_context=_posterior_kl_setup)
