"""Fused ops of sharpfast: CFG + Wen's metric, Rademacher probes, Hutchinson reductions and
the finite-difference Hessian-vector steps, on torch / C++ / CUDA / Triton backends."""
from ._backends import available_backends
from ._hash import rademacher_signs
from .fused import cfg_combine, diff_of_diffs_norm, fd_direction, hutchinson_reduce, rademacher_perturb
from .hutchinson import hutchinson_trace

__all__ = [
    "available_backends",
    "cfg_combine",
    "diff_of_diffs_norm",
    "fd_direction",
    "hutchinson_reduce",
    "hutchinson_trace",
    "rademacher_perturb",
    "rademacher_signs",
]
