"""genrep_fast: fast kernels and a training system for GenRep.

Public API (docs/METHOD.md is the contract for the math):

* ``thinned_steps`` - the reverse-chain positions kept as Monte Carlo samples;
* ``mixture_log_likelihood``, ``class_posterior``, ``posterior_kl_loss`` - generative perception;
* ``prepare_bank``, ``PreparedBank`` - a snapshot of a shared bank, prepared once for many calls;
* ``align_gradients``, ``GradientAligner`` - gradient alignment;
* ``GenRep`` - a trained model: ``GenRep.from_pretrained(run)``, ``classify``, ``sample``,
  ``save_pretrained`` (a diffusers model folder).
* ``diffusion_classifier`` - the Diffusion Classifier (Li et al. 2023), a bank-free baseline and
  optional teacher.

Backbones, heads, modulation and the chain bank live in ``genrep_fast.models`` (imports diffusers);
the trainer in ``genrep_fast.train``.
"""

from __future__ import annotations

from genrep_fast import _ops  # noqa: F401  (loads the compiled extension, registers fakes)
from genrep_fast._validation import check_int
from genrep_fast.alignment import GradientAligner, align_gradients
from genrep_fast.diffusion_classifier import DiffusionClassifierResult, diffusion_classifier
from genrep_fast.pipeline import Classification, GenRep
from genrep_fast.posterior import class_posterior, mixture_log_likelihood, posterior_kl_loss
from genrep_fast.prepared_bank import PreparedBank, prepare_bank
from genrep_fast.reference import thinned_steps as _thinned_steps_ref

__version__ = "0.1.0"


def thinned_steps(num_steps: int, burn_in: int = 50, thin: int = 2) -> list[int]:
    """0-based positions of an N-step reverse chain kept as mixture samples.

    ``burn_in, burn_in + thin, ...`` while ``< num_steps``; with N=200, burn_in=50, thin=2 that is
    75 positions. ``burn_in >= num_steps`` or ``thin < 1`` is an error.
    """
    check_int("num_steps", num_steps, minimum=1)
    check_int("burn_in", burn_in, minimum=0)
    check_int("thin", thin, minimum=1)
    if burn_in >= num_steps:
        raise ValueError(
            f"burn_in must be < num_steps (no step would be kept), got burn_in={burn_in}, "
            f"num_steps={num_steps}"
        )
    return _thinned_steps_ref(num_steps, burn_in, thin)


__all__ = [
    "thinned_steps",
    "mixture_log_likelihood",
    "prepare_bank",
    "PreparedBank",
    "class_posterior",
    "posterior_kl_loss",
    "align_gradients",
    "GradientAligner",
    "GenRep",
    "Classification",
    "diffusion_classifier",
    "DiffusionClassifierResult",
    "__version__",
]
