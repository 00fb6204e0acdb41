"""Leading eigenvalues of the Hessian of log p_t (the Jacobian of the score) at step 1."""
from __future__ import annotations


import numpy as np
import torch

from .metrics import math_attention
from .score import ScoreModel, eps_to_score

CONDITIONS = ("cond", "null")


def hessian_spectrum(pipe, prompt: str, k: int = 6, *, conditions=CONDITIONS, which: str = "LM",
                     num_inference_steps: int = 50, generator=None, latents=None, height=None, width=None,
                     tol: float = 1e-6, maxiter=None) -> dict:
    """k eigenvalues of H(x, c) and H(x, null) = d s / d x at the first sampling step, by Arnoldi
    iteration (scipy's ARPACK `eigs`) on exact Hessian-vector products (forward-mode AD, fp32,
    math attention). The score Jacobian of a learned model is not exactly symmetric, hence Arnoldi.

    which: ARPACK's choice, "LM" (largest magnitude, default), "SR" (most negative real part: the
    sharp directions of memorized prompts), "LR", ... Returns {"cond": complex tensor (k,),
    "null": ...} sorted by real part, plus "latents" (the x_T used, one image).
    """
    from scipy.sparse.linalg import LinearOperator, eigs

    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt must be a non-empty str")
    for c in conditions:
        if c not in CONDITIONS:
            raise ValueError(f"conditions must be among {CONDITIONS}, got {c!r}")
    model = ScoreModel(pipe)
    dh, dw = model.default_size()
    height, width = height or dh, width or dw
    sched = model.scheduler(num_inference_steps)
    if latents is None:
        latents = model.initial_latents(sched, 1, height, width, generator)
    shape = (1, *model.latent_shape(height, width))
    if tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
    D = int(np.prod(shape))
    if not 0 < k < D - 1:
        raise ValueError(f"k must be in [1, {D - 2}] for a latent of {D} elements, got {k}")
    t = sched.timesteps[0]
    x = sched.scale_model_input(latents.to(model.dtype), t).float()
    ab = model.alpha_bar(sched, t)
    cond = model.encode([prompt], 1, height, width).to(torch.float32)  # for the fp32 UNet copy
    unet = model.fp32_unet()
    out = {"latents": latents.detach().cpu()}
    with torch.no_grad(), math_attention(unet):
        exact = model.with_unet(unet)
        for c in conditions:
            branch = 1 if c == "cond" else 0

            def score(z):
                return eps_to_score(exact.eps(z, t, ab, cond)[branch], ab)

            def matvec(v):
                tangent = torch.as_tensor(np.asarray(v, dtype=np.float32).reshape(shape), device=model.device)
                _, hv = torch.func.jvp(score, (x,), (tangent,))
                return hv.double().cpu().numpy().reshape(-1)

            op = LinearOperator((D, D), matvec=matvec, dtype=np.float64)
            v0 = np.random.default_rng(0).standard_normal(D)
            vals = eigs(op, k=k, which=which, v0=v0, tol=tol, maxiter=maxiter, return_eigenvectors=False)
            out[c] = torch.from_numpy(np.sort_complex(vals))
    return out
