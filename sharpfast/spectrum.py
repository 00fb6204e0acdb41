"""Leading eigenvalues of the Hessian of log p_t (the Jacobian of the score) at step 1, by ARPACK
over the ScoreJacobian operator of sharpfast.curvature."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from . import validate
from .adapters import ScoreModel
from .curvature import ScoreJacobian
from .errors import BadArgument

CONDITIONS = ("cond", "null")


def hessian_spectrum(pipe: Any, prompt: str, k: int = 6, *, conditions=CONDITIONS, which: str = "LM",
                     symmetric: bool = False, num_inference_steps: Optional[int] = None,
                     generator: Optional[Any] = None, latents: Optional[Tensor] = None, height: Optional[int] = None,
                     width: Optional[int] = None, tol: float = 1e-6, maxiter=None) -> dict:
    """k eigenvalues of H(x, c) and H(x, null) = d s / d x at the first sampling step, by ARPACK
    over the exact `ScoreJacobian` operator (forward-mode AD, fp32, math attention).

    A learned score's Jacobian is not exactly symmetric (the UNet is a score only approximately),
    so by default its eigenvalues come from Arnoldi (`eigs`) and are complex. symmetric=True
    takes the symmetrized operator (J + J^T) / 2 instead (one JVP and one VJP a product), whose
    eigenvalues are real (Lanczos, `eigsh`) and whose quadratic form equals J's.

    which: ARPACK's choice, "LM" (largest magnitude, default), "SR"/"SA" (most negative: the sharp
    directions of memorized prompts), "LR"/"LA", ... Returns {"cond": tensor (k,), "null": ...}
    (complex, or real with symmetric=True) sorted ascending, plus "latents" (the x_T used).
    """
    from scipy.sparse.linalg import eigs, eigsh

    validate.prompts(prompt, "prompt")
    for c in conditions:
        if c not in CONDITIONS:
            raise BadArgument(f"conditions must be among {CONDITIONS}, got {c!r}")
    model = ScoreModel(pipe)
    st = model.resolve(num_inference_steps=num_inference_steps, height=height, width=width)
    height, width = st.height, st.width
    sched = model.scheduler(st.num_inference_steps)
    if latents is None:
        latents = model.initial_latents(sched, 1, height, width, generator)
    shape = (1, *model.latent_shape(height, width))
    if tuple(latents.shape) != shape:
        raise BadArgument(f"latents must have shape {shape}, got {tuple(latents.shape)}")
    D = int(np.prod(shape))
    if not 0 < k < D - 1:
        raise BadArgument(f"k must be in [1, {D - 2}] for a latent of {D} elements, got {k}")
    t = sched.timesteps[0]
    x = sched.scale_model_input(latents.to(model.dtype), t).float()
    ab = model.alpha_bar(sched, t)
    cond = model.encode([prompt], 1, height, width)
    out = {"latents": latents.detach().cpu()}
    if symmetric:
        which = {"SR": "SA", "LR": "LA"}.get(which, which)
    for c in conditions:
        jac = ScoreJacobian(model, x, t, ab, cond, branch=c, mode="jvp")
        op = (jac.symmetrized() if symmetric else jac).to_scipy()
        v0 = np.random.default_rng(0).standard_normal(D)
        if symmetric:
            vals = eigsh(op, k=k, which=which, v0=v0, tol=tol, maxiter=maxiter, return_eigenvectors=False)
            out[c] = torch.from_numpy(np.sort(vals))
        else:
            vals = eigs(op, k=k, which=which, v0=v0, tol=tol, maxiter=maxiter, return_eigenvectors=False)
            out[c] = torch.from_numpy(np.sort_complex(vals))
    return out
