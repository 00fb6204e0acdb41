"""Curvature as linear operators (the view of curvlinops): the Jacobian of the score at one point,
J = d s / d x = the Hessian of log p_t, as an operator with a batched matvec, and estimators over
any such operator. The sharpness is one matvec (||J_Δ s_Δ||), the traces are Hutchinson estimates
over it, the spectrum is ARPACK over it.

J is not symmetric for a learned model: a UNet's Jacobian is the Hessian of log p only where the
network is an exact score, so its eigenvalues may be complex (hence Arnoldi in
`hessian_spectrum`). `ScoreJacobian.symmetrized()` is (J + J^T) / 2, the symmetric operator
whose quadratic form v^T J v is J's own: its eigenvalues are real (Lanczos), and the Hutchinson
trace cannot tell the two apart (tr J = tr (J + J^T) / 2).
"""
from __future__ import annotations

import torch

from . import ops
from .errors import BadArgument
from .score import Conditioning, ScoreModel, eps_to_score, math_attention

BRANCHES = ("cond", "null", "delta")
MODES = ("fd", "jvp")
# the finite-difference step (a distance in latent space) by UNet dtype, the one place it is set:
# chosen so that fd agrees with the exact JVP (tests/test_detect.py, tests/test_reference.py)
DEFAULT_FD_STEP = {torch.float32: 0.05, torch.float16: 1.0, torch.bfloat16: 1.0}


def default_fd_step(dtype) -> float:
    """The default finite-difference step for a denoiser of this dtype."""
    return DEFAULT_FD_STEP.get(dtype, 0.05)


class ScoreJacobian:
    """J = d s_branch / d x at x (N images; image i's block only: J acts per image), branch
    "cond" (s(x, c)), "null" (s(x, null)) or "delta" (s_Δ = s(x, c) - s(x, null)).

    mode "jvp": exact forward-mode AD through an fp32 copy of the UNet with math attention;
    "fd": a finite difference of step h along each vector (any UNet precision, one UNet call for
    a whole batch of vectors): J v ~ (s(x + h v/||v||) - s(x)) ||v|| / h.
    """

    def __init__(self, model: ScoreModel, x, t, alpha_bar, cond: Conditioning, branch="delta", mode="jvp", h=None):
        if branch not in BRANCHES:
            raise BadArgument(f"branch must be one of {BRANCHES}, got {branch!r}")
        if mode not in MODES:
            raise BadArgument(f"mode must be one of {MODES}, got {mode!r}")
        self.model, self.x, self.t, self.alpha_bar, self.branch, self.mode = (
            model,
            x.float(),
            t,
            alpha_bar,
            branch,
            mode,
        )
        self.h = h if h is not None else default_fd_step(model.dtype)
        self.N = x.shape[0]
        if mode == "jvp":
            self._unet = model.fp32_unet()
            self._exact = model.with_unet(self._unet)
            self.cond = cond.to(torch.float32)
        else:
            self.cond = cond
        self._s0 = None

    def _score(self, z, model, cond, repeats=1):
        u, c = model.eps(z, self.t, self.alpha_bar, cond, repeats=repeats)
        su, sc = eps_to_score(u, self.alpha_bar), eps_to_score(c, self.alpha_bar)
        return {"cond": sc, "null": su, "delta": sc - su}[self.branch]

    def _exact_call(self, fn):
        # torch.func's transforms work under no_grad (no graph is kept for the weights)
        with torch.no_grad(), math_attention(self._unet):
            return fn(lambda z: self._score(z, self._exact, self.cond))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """J v per image; v has x's shape."""
        return self.matmat(v.unsqueeze(0))[0]

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """J V for K vectors per image: V (K, N, ...) -> (K, N, ...)."""
        K = V.shape[0]
        V = V.to(self.x.device, torch.float32)
        if self.mode == "jvp":
            return torch.stack([self._exact_call(lambda f, v=v: torch.func.jvp(f, (self.x,), (v,))[1]) for v in V])
        if self._s0 is None:
            self._s0 = self._score(self.x, self.model, self.cond)
        norms = V.flatten(2).norm(dim=2)  # (K, N)
        scale = torch.where(norms > 0, self.h / norms.clamp_min(1e-30), torch.zeros_like(norms))
        shift = V * scale.view(K, self.N, *[1] * (V.dim() - 2))
        s1 = self._score((self.x.unsqueeze(0) + shift).reshape(K * self.N, *self.x.shape[1:]), self.model, self.cond,
                         repeats=K).view(K, self.N, *self.x.shape[1:])
        ratio = torch.where(norms > 0, norms / self.h, torch.zeros_like(norms))
        assert self._s0 is not None
        return (s1 - self._s0.unsqueeze(0)) * ratio.view(K, self.N, *[1] * (V.dim() - 2))

    def rmatvec(self, v: torch.Tensor) -> torch.Tensor:
        """J^T v per image (reverse-mode AD through the fp32 copy; mode "jvp" only)."""
        if self.mode != "jvp":
            raise BadArgument("rmatvec needs mode='jvp' (a transpose has no finite-difference form)")
        v = v.to(self.x.device, torch.float32)
        return self._exact_call(lambda f: torch.func.vjp(f, self.x)[1](v)[0])

    def symmetrized(self) -> SymmetrizedJacobian:
        """(J + J^T) / 2 as an operator (real eigenvalues; the same quadratic form)."""
        return SymmetrizedJacobian(self)


class SymmetrizedJacobian:
    """(J + J^T) / 2 of a ScoreJacobian: real eigenvalues, the same quadratic form as J."""

    def __init__(self, jac: ScoreJacobian):
        self.jac = jac

    def matvec(self, v):
        """J v for a flat vector v (scipy's LinearOperator protocol)."""
        return 0.5 * (self.jac.matvec(v) + self.jac.rmatvec(v))


def hutchinson_trace(op, shape, num_probes: int = 8, seed: int = 0) -> torch.Tensor:
    """tr(op) per image, (1/K) sum_k v_k^T op v_k over K Rademacher probes (the signs of
    sharpfast.ops for `seed`, the same for every image); op.matmat takes (K, N, ...) when it has
    one (one UNet call for all probes with a finite-difference ScoreJacobian), else K matvecs."""
    N, D = shape[0], int(torch.Size(shape[1:]).numel())
    signs = ops.rademacher_signs(num_probes, D, seed).view(num_probes, 1, *shape[1:]).expand(num_probes, *shape)
    signs = signs.contiguous()
    if hasattr(op, "matmat"):
        jv = op.matmat(signs)
    else:
        jv = torch.stack([op.matvec(v) for v in signs])
    return (signs.to(jv) * jv).flatten(2).sum(dim=2).mean(dim=0).view(N)
