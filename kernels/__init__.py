"""Triton kernels of genrep_fast (installed as genrep_fast.kernels)."""
