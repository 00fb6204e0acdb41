"""Curvature as linear operators (the view of curvlinops), the one home of every Hessian-vector
product and trace estimate: the Jacobian of the score at one point,
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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from . import ops
from .adapters import Conditioning, ScoreModel, eps_to_score, math_attention, sigma_of
from .errors import BadArgument

BRANCHES = ("cond", "null", "delta")
MODES = ("fd", "jvp")
# the finite-difference step (a distance in latent space) by UNet dtype, the one place it is set:
# chosen so that fd agrees with the exact JVP (tests/test_detect.py, tests/test_reference.py)
DEFAULT_FD_STEP = {torch.float32: 0.05, torch.float16: 1.0, torch.bfloat16: 1.0}


@dataclass(frozen=True)
class EstimatorOptions:
    """How the curvature metrics are estimated, as one object (detect's keywords of the same names).

    Attributes:
        hvp: "fd" (a finite difference, any precision) or "jvp" (exact forward-mode AD, fp32).
        fd_step: the sharpness's finite-difference step, a distance in latent space (None: by dtype).
        num_probes: Hutchinson's Rademacher probes K.
        probe_seed: the probes' seed.
        probe_h: the traces' step per probe element (None: fd_step / sqrt(D)).
    """

    hvp: str = "fd"
    fd_step: Optional[float] = None
    num_probes: int = 8
    probe_seed: int = 0
    probe_h: Optional[float] = None


def default_fd_step(dtype: Any) -> float:
    """The default finite-difference step for a denoiser of this dtype."""
    return DEFAULT_FD_STEP.get(dtype, 0.05)


def fd_sharpness(model: ScoreModel, x: Tensor, t: Any, alpha_bar: float, cond: Conditioning, eps_u, eps_c, h: Any,
                 check=None, wen=None) -> torch.Tensor:
    """||H_Δ s_Δ|| per row by one finite difference along s_Δ (one extra CFG call); differentiable
    in x (sharpfast.ops support autograd), so SAIL minimizes exactly what detection measures.

    x' = x + h s_Δ / ||s_Δ|| (s_Δ = -eps_Δ / sigma points along eps_u - eps_c), and
    ||H_Δ s_Δ|| ~ ||s_Δ(x') - s_Δ(x)|| ||s_Δ|| / h = ||eps_Δ(x') - eps_Δ(x)|| ||eps_Δ|| / (sigma^2 h).
    """
    sig = sigma_of(alpha_bar)
    shifted = ops.fd_direction(x, eps_c, eps_u, h)
    eps_u2, eps_c2 = model.eps(shifted, t, alpha_bar, cond)
    if check is not None:
        check(eps_c2 - eps_u2)
    dod = ops.diff_of_diffs_norm(eps_u, eps_c, eps_u2, eps_c2)
    if wen is None:  # ||eps_Δ||, unless the caller has it already (Step: from cfg_combine)
        wen = (eps_c - eps_u).reshape(len(x), -1).norm(dim=1)
    return dod * wen / (sig * sig * h)


class CurvatureOperator:
    """The one interface of sharpfast's curvature operators (curvlinops' linear-operator view): a
    per-image linear map on latents of `shape` (N, ...), applied to one vector (matvec), to K
    vectors per image at once (matmat: K matvecs unless an operator does better), transposed
    (rmatvec, where it has one), as a SciPy LinearOperator for ARPACK, and its trace by Hutchinson
    (trace: an operator may override it with a cheaper estimator of the same quantity)."""

    shape: tuple
    device: Any
    has_rmatvec: bool = False

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """op v per image; v has the operator's shape."""
        raise NotImplementedError

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """op V for K vectors per image: V (K, N, ...) -> (K, N, ...)."""
        return torch.stack([self.matvec(v) for v in V])

    def rmatvec(self, v: torch.Tensor) -> torch.Tensor:
        """op^T v per image."""
        raise BadArgument(f"{type(self).__name__} has no transpose here")

    def to_scipy(self) -> Any:
        """The operator as a scipy.sparse.linalg.LinearOperator on flat float64 vectors (one image:
        an operator of batch 1), for ARPACK and the rest of SciPy."""
        return _to_scipy(self, self.shape, self.device, self.has_rmatvec)

    def trace(self, num_probes: int = 8, seed: int = 0, probe_h: Optional[float] = None) -> torch.Tensor:
        """tr(op) per image, (1/K) sum_k v_k^T op v_k over K Rademacher probes (the signs of
        sharpfast.ops for `seed`, the same for every image): the one Hutchinson estimator; probe_h
        is for operators whose estimate moves along the probes (the finite difference's step).

        Returns:
            (N,) trace estimates.
        """
        shape = self.shape
        N, D = shape[0], int(torch.Size(shape[1:]).numel())
        signs = ops.rademacher_signs(num_probes, D, seed).view(num_probes, 1, *shape[1:]).expand(num_probes, *shape)
        jv = self.matmat(signs.contiguous())
        return (signs.to(jv) * jv).flatten(2).sum(dim=2).mean(dim=0).view(N)


class ScoreJacobian(CurvatureOperator):
    """J = d s_branch / d x at x (N images; image i's block only: J acts per image), branch
    "cond" (s(x, c)), "null" (s(x, null)) or "delta" (s_Δ = s(x, c) - s(x, null)).

    mode "jvp": exact forward-mode AD through an fp32 copy of the UNet with math attention;
    "fd": a finite difference of step h along each vector (any UNet precision, one UNet call for
    a whole batch of vectors): J v ~ (s(x + h v/||v||) - s(x)) ||v|| / h.
    """

    def __init__(self, model: ScoreModel, x: Tensor, t: Any, alpha_bar: float, cond: Conditioning,
                 branch: str = "delta", mode: str = "jvp", h: Any = None, eps0=None, shared=None) -> None:
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
        self.shape, self.device, self.has_rmatvec = tuple(x.shape), x.device, mode == "jvp"
        if mode == "jvp":
            self._unet = model.fp32_unet()
            self._exact = model.with_unet(self._unet)
            self.cond = cond.to(torch.float32)
        else:
            self.cond = cond
        self._s0 = None
        self._eps0 = eps0  # (eps_null, eps_cond) at x, already computed by the caller: no call for them
        if eps0 is not None:
            self._s0 = self._branch(*(eps_to_score(e.float(), alpha_bar) for e in eps0))
        # the denoiser's outputs at probe points, shared by the branches of one point (siblings())
        self._shared: dict = {} if shared is None else shared
        # optional callable(eps_cond - eps_null, what) run on every probe evaluation
        self.check: Optional[Callable] = None

    def siblings(self, *branches: str) -> tuple:
        """Operators of other branches at the same point, sharing this one's denoiser calls (one
        call at the probe points serves cond, null and delta)."""
        out = []
        for b in branches:
            op = ScoreJacobian.__new__(ScoreJacobian)
            op.__dict__.update(self.__dict__)
            op.branch, op._s0 = b, None
            if self._eps0 is not None:
                op._s0 = op._branch(*(eps_to_score(e.float(), self.alpha_bar) for e in self._eps0))
            out.append(op)
        return tuple(out)

    def _branch(self, su, sc) -> Any:
        return {"cond": sc, "null": su, "delta": sc - su}[self.branch]

    def _score(self, z, model: Any, cond: Any, repeats: int = 1) -> Any:
        u, c = model.eps(z, self.t, self.alpha_bar, cond, repeats=repeats)
        return self._branch(eps_to_score(u, self.alpha_bar), eps_to_score(c, self.alpha_bar))

    def base(self) -> torch.Tensor:
        """s_branch at x (one CFG call, once; none when eps0 was given)."""
        if self._s0 is None:
            self._s0 = self._score(self.x, self.model, self.cond)
        return self._s0

    def trace(self, num_probes: int = 8, seed: int = 0, probe_h: Optional[float] = None) -> torch.Tensor:
        """tr J per image by Hutchinson. Mode "fd": over the fused ops (sharpfast.ops.hutchinson_trace),
        the probe points x + probe_h v_k (Rademacher v_k of `seed`; probe_h default h / sqrt(D), so a
        probe moves x by h) in ONE denoiser call for all K probes, shared with sibling branches;
        mode "jvp": the base estimator over exact products."""
        if self.mode != "fd":
            return super().trace(num_probes, seed, probe_h)
        D = self.x[0].numel()
        hp = float(probe_h) if probe_h is not None else self.h / D ** 0.5
        key = (num_probes, hp, seed)

        def scores_at(probes) -> Any:
            if key not in self._shared:
                u, c = self.model.eps(probes, self.t, self.alpha_bar, self.cond, repeats=num_probes)
                if self.check is not None:
                    self.check(c - u, "Hutchinson probes")
                self._shared[key] = (eps_to_score(u, self.alpha_bar), eps_to_score(c, self.alpha_bar))
            return self._branch(*self._shared[key])

        return ops.hutchinson_trace(scores_at, self.x, num_probes, hp, seed, y0=self.base())

    def _exact_call(self, fn: Callable) -> Any:
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
        s0 = self.base()
        norms = V.flatten(2).norm(dim=2)  # (K, N)
        scale = torch.where(norms > 0, self.h / norms.clamp_min(1e-30), torch.zeros_like(norms))
        shift = V * scale.view(K, self.N, *[1] * (V.dim() - 2))
        s1 = self._score((self.x.unsqueeze(0) + shift).reshape(K * self.N, *self.x.shape[1:]), self.model, self.cond,
                         repeats=K).view(K, self.N, *self.x.shape[1:])
        ratio = torch.where(norms > 0, norms / self.h, torch.zeros_like(norms))
        return (s1 - s0.unsqueeze(0)) * ratio.view(K, self.N, *[1] * (V.dim() - 2))

    def rmatvec(self, v: torch.Tensor) -> torch.Tensor:
        """J^T v per image (reverse-mode AD through the fp32 copy; mode "jvp" only)."""
        if self.mode != "jvp":
            raise BadArgument("rmatvec needs mode='jvp' (a transpose has no finite-difference form)")
        v = v.to(self.x.device, torch.float32)
        return self._exact_call(lambda f: torch.func.vjp(f, self.x)[1](v)[0])

    def symmetrized(self) -> SymmetrizedJacobian:
        """(J + J^T) / 2 as an operator (real eigenvalues; the same quadratic form)."""
        return SymmetrizedJacobian(self)


class SymmetrizedJacobian(CurvatureOperator):
    """(J + J^T) / 2 of a ScoreJacobian: real eigenvalues, the same quadratic form as J."""

    has_rmatvec = True

    def __init__(self, jac: ScoreJacobian) -> None:
        self.jac, self.shape, self.device = jac, jac.shape, jac.device

    def matvec(self, v: Any) -> Any:
        """((J + J^T) / 2) v per image; v has x's shape."""
        return 0.5 * (self.jac.matvec(v) + self.jac.rmatvec(v))

    def rmatvec(self, v: Any) -> Any:
        """The same as matvec: the operator is symmetric."""
        return self.matvec(v)


def _to_scipy(op, shape: tuple, device: Any, with_rmatvec: bool) -> Any:
    import numpy as np
    from scipy.sparse.linalg import LinearOperator

    if shape[0] != 1:
        raise BadArgument(f"to_scipy takes the operator of one image (x of batch 1), got batch {shape[0]}")
    D = int(torch.Size(shape).numel())

    def wrap(fn: Callable) -> Any:
        def apply(v: Any) -> torch.Tensor:
            tangent = torch.as_tensor(np.asarray(v, dtype=np.float32).reshape(shape), device=device)
            return fn(tangent).detach().double().cpu().numpy().reshape(-1)
        return apply

    return LinearOperator((D, D), matvec=wrap(op.matvec), rmatvec=wrap(op.rmatvec) if with_rmatvec else None,
                          dtype=np.float64)
