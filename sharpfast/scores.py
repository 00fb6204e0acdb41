"""The detection metrics at one sampling step, from the CFG batch (docs/method.md, "Detection metrics").

A metric is a function of one `Step` (the CFG batch's raw predictions at latents x, with the
schedule's alpha_bar) registered in `REGISTRY` with its cost; detect (`step_metrics`), the
serving guard and SAIL's objective all compute a metric as `REGISTRY[name].fn(step)`, so each
formula exists once. Every metric is per image (N rows), in the VP space of `sharpfast.adapters`:
- wen:         ||eps_Δ||                                   (0 extra UNet calls)
- sharpness:   ||H_Δ s_Δ||, finite difference (1 extra CFG call) or exact JVP
- trace:       -tr H(x, c), Hutchinson with K probes      (1 extra call on K-times the batch)
- trace_delta: -tr H_Δ, from the same probes as trace
- score_norm:  ||s(x, c)||^2                               (0 extra calls; E||s||^2 = -tr H for Gaussians)
- anisotropy:  Asthana & Belagiannis (ICLR 2026), as their detection code executes it:
               g1 * wen + g2 * aniso_align                (1 extra CFG call)
    aniso_align: cos(eps_null, eps_c - eps_null) over channels per pixel, averaged over pixels, at
                 a LOW-noise timestep (the schedule's third-to-last) evaluated at the same x
                                                           (1 extra CFG call)
    (g1, g2) = (1, 2) for epsilon models, (1, 0.1) for v-prediction, as the authors' SD 1.4 / 2.0
    (Their pipeline also has a normalization="l2" branch that first scales each channel of eps to
    unit norm; their detection scripts never reach it: the call's `normalization` defaults to None
    and the script's flag goes to from_pretrained. sharpfast's first version used that branch's
    norm with the plain cosine, a mix their code never runs.)
- channel_wen: ||n(eps_c) - n(eps_null)||, n = each channel's spatial map scaled to unit norm: the
               norm of that l2 branch, kept as a detector of its own because it is free and
               scale-free per channel (0 extra calls)
- wen_low:     ||eps_Δ|| of the same x at the schedule's LAST (lowest-noise) timestep (1 extra CFG
               call): at step 1, pure noise read as if it were almost clean, the anisotropy
               paper's observation applied to Wen's norm (measured in docs/evaluation.md)
- wen_low@n:   wen_low averaged over n noises: the image's own x and n-1 fixed probe noises
               (standard normal latents drawn on the CPU from probe_seed, the same for every
               image), in ONE CFG call on n times the rows (n = 2..16). At the first step x is
               pure noise, so the probes are more draws of what wen_low reads; the average is
               less noisy than one draw (recall at a low false-positive rate: docs/guard.md).
               Not registered by name: REGISTRY["wen_low@4"] builds it (catalog.probed)
- attn_entropy: minus the cross-attention entropy over tokens (Ren et al., ECCV 2024), averaged
                over heads, queries and cross-attention layers, of the conditional branch at this
                step                                       (1 extra UNet call on the N conditional rows)
Higher means sharper, i.e. more likely memorized, for every metric.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import catalog, ops
from .adapters import Conditioning, ScoreModel, eps_per_pred, sigma_of, to_eps
from .curvature import EstimatorOptions, ScoreJacobian, default_fd_step, fd_sharpness
from .errors import BadArgument, NonFiniteOutput

HVP_MODES = catalog.HVP_MODES
DEFAULT_ESTIMATOR = EstimatorOptions()  # frozen: a shared default is safe


def check_finite(pred: torch.Tensor, rows_per_prompt: int, prompts: list, what: str) -> None:
    """NonFiniteOutput naming the prompt (prompts None: the image's row) of the first row with NaN/inf."""
    bad = ~torch.isfinite(pred.reshape(pred.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        if prompts is None:
            raise NonFiniteOutput(f"the UNet returned NaN/inf ({what}) for image {row}")
        i = row % (len(prompts) * rows_per_prompt) // rows_per_prompt
        raise NonFiniteOutput(f"the UNet returned NaN/inf ({what}) for prompt {prompts[i]!r}")


def probe_step(fd_step: float, numel: int) -> float:
    """Per-element finite-difference step of the Hutchinson probes: a Rademacher probe has norm
    sqrt(D), so h / sqrt(D) moves x by h, as far as the sharpness's finite difference does.
    (Reusing h per element moved x by h sqrt(D): 0.8 on a 4x8x8 latent, and trace_delta came
    out 21% off its value on the same probes; measured in tests/test_reference.py.)"""
    return fd_step / math.sqrt(numel)


class Step:
    """One sampling step of a CFG batch: latents x (N rows, the VP latent the UNet saw), its
    timestep and alpha_bar, the conditioning, and the UNet's raw predictions of the null and the
    conditional branch. Everything a metric needs is derived here once and cached (eps, wen, the
    guided prediction, the Hutchinson traces), so metrics sharing a quantity share its cost.

    names / n: the prompts of the rows (n images each) for error messages; schedule: the
    sampler's scheduler with its timesteps set (read only: anisotropy and wen_low evaluate x at
    its low-noise timesteps); fd_step: the
    sharpness's finite-difference step (a distance in latent space, default by UNet dtype);
    probe_h: the traces' step per probe element (default fd_step / sqrt(D)); hvp: "fd" or "jvp";
    checks=False skips the NaN/inf checks (a host sync each), for a caller that checks its own
    results (SAIL's loop, in the one sync of its step).
    """

    def __init__(self, model: ScoreModel, x: Tensor, t: Any, alpha_bar: float, cond: Conditioning, pred_u: torch.Tensor,
                 pred_c: torch.Tensor, *, names: Any = None, n: int = 1, guidance_scale: float = 1.0,
                 estimator: EstimatorOptions = DEFAULT_ESTIMATOR, checks: bool = True, schedule: Any = None) -> None:
        self.model, self.x, self.t, self.alpha_bar, self.cond = model, x, t, alpha_bar, cond
        self.pred_u, self.pred_c = pred_u, pred_c
        self.names, self.n, self.guidance_scale, self.hvp = names, n, guidance_scale, estimator.hvp
        self.sigma = sigma_of(alpha_bar)
        self.h = estimator.fd_step if estimator.fd_step is not None else default_fd_step(model.dtype)
        self.num_probes, self.probe_seed, self.probe_h = estimator.num_probes, estimator.probe_seed, estimator.probe_h
        self.checks = checks
        self.schedule = (
            schedule  # the sampler's scheduler, timesteps set: its low-noise timesteps (anisotropy, wen_low)
        )
        self._cache: dict = {}

    def _cached(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def check(self, tensor: torch.Tensor, what: str) -> None:
        """Raise NonFiniteOutput naming the first prompt whose rows of tensor hold NaN/inf."""
        if self.checks:
            check_finite(tensor, self.n, self.names, what)

    @property
    def guided(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The CFG-guided prediction (UNet parameterization) and ||pred_c - pred_u||, one fused op.
        A guidance-distilled model (Flux) is guided by its embedded scale: its prediction is pred_c."""
        if self.model.distilled:
            return self._cached("cfg", lambda: (self.pred_c, (self.pred_c.float() - self.pred_u.float())
                                                .reshape(len(self.pred_c), -1).norm(dim=1)))
        return self._cached("cfg", lambda: ops.cfg_combine(self.pred_u, self.pred_c, self.guidance_scale))

    @property
    def wen(self) -> torch.Tensor:
        """||eps_Δ|| = |d eps / d pred| ||pred_c - pred_u|| (same x: the x terms cancel)."""
        return abs(eps_per_pred(self.model.prediction_type, self.alpha_bar)) * self.guided[1].float()

    @property
    def eps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_u, eps_c) in fp32."""
        pt = self.model.prediction_type
        return self._cached("eps", lambda: (to_eps(self.pred_u, self.x, self.alpha_bar, pt),
                                            to_eps(self.pred_c, self.x, self.alpha_bar, pt)))

    def traces(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tr H(x, c), tr H(x, null)) by Hutchinson over num_probes probes: one UNet call on a
        num_probes-times batch, shared by trace and trace_delta."""
        def make() -> tuple:
            xf = self.x.float()
            hp = self.probe_h if self.probe_h is not None else probe_step(self.h, xf[0].numel())
            jc = ScoreJacobian(self.model, xf, self.t, self.alpha_bar, self.cond, branch="cond", mode="fd", h=self.h,
                               eps0=self.eps)
            jc.check = self.check
            (ju,) = jc.siblings("null")
            return jc.trace(self.num_probes, self.probe_seed, hp), ju.trace(self.num_probes, self.probe_seed, hp)
        return self._cached("traces", make)


    def low_timestep(self, from_end: int) -> tuple:
        """(t, alpha_bar) of the from_end-th timestep from the end of the sampler's schedule."""
        if self.schedule is None:
            raise BadArgument("this metric evaluates x at the schedule's low-noise timesteps: Step(schedule=...)")
        return self.model.low_noise(self.schedule, from_end)

    def at_low_noise(self, from_end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_null, eps_cond) at x, at the from_end-th timestep from the schedule's end: one CFG call."""
        def make() -> tuple:
            t_lo, ab_lo = self.low_timestep(from_end)
            u, c = self.model.eps(self.x, t_lo, ab_lo, self.cond)
            self.check(c - u, f"low-noise timestep ({from_end} from the end)")
            return u, c
        return self._cached(("low", from_end), make)

    def low_noise_probed(self, n: int) -> torch.Tensor:
        """(N,) mean over x and n-1 probe noises of ||eps_c - eps_null|| at the last timestep, in one
        CFG call on n*N rows (the probes: randn((n-1, *x[0].shape)) from a CPU generator seeded
        with probe_seed, each the same for every row)."""
        def make() -> torch.Tensor:
            t_lo, ab_lo = self.low_timestep(1)
            N = len(self.x)
            z = torch.randn((n - 1, *self.x.shape[1:]), generator=torch.Generator("cpu").manual_seed(self.probe_seed))
            xs = torch.cat([self.x, z.to(self.x.device, self.x.dtype).repeat_interleave(N, dim=0)])
            u, c = self.model.eps(xs, t_lo, ab_lo, self.cond, repeats=n)
            self.check(c - u, f"low-noise timestep, {n} probe noises")
            return (c - u).reshape(n, N, -1).norm(dim=2).mean(dim=0)
        return self._cached(("low_probed", n), make)

    def channel_wen(self) -> torch.Tensor:
        """||n(eps_c) - n(eps_null)|| at this step, each channel's spatial map scaled to unit norm (0 extra calls)."""
        def make() -> torch.Tensor:
            eps_u, eps_c = (self.model.channels_first(e) for e in self.eps)
            N, C = eps_u.shape[:2]
            unit = lambda e: e.reshape(N, C, -1) / e.reshape(N, C, -1).norm(dim=2, keepdim=True).clamp_min(1e-12)  # noqa: E731
            return (unit(eps_c) - unit(eps_u)).reshape(N, -1).norm(dim=1)
        return self._cached("channel_wen", make)

    def aniso_align(self) -> torch.Tensor:
        """cos(eps_null, eps_c - eps_null) over channels per pixel, averaged, at the low-noise
        timestep (one CFG call)."""
        def make() -> torch.Tensor:
            u, c = (self.model.channels_first(e) for e in self.at_low_noise(3))
            cos = torch.nn.functional.cosine_similarity(u, c - u, dim=1, eps=1e-12)  # (N, h, w): over channels
            return cos.reshape(len(cos), -1).mean(dim=1)
        return self._cached("aniso_align", make)

    def attention_entropy(self) -> torch.Tensor:
        """Mean cross-attention entropy of the conditional branch at x: one UNet call on N rows."""
        def make() -> torch.Tensor:
            from .attention import record_cross_attention

            with record_cross_attention(self.model.unet) as rec:
                pred = self.model.predict_branch(self.x, self.t, self.cond, "cond")
            self.check(pred, "cross-attention probe")
            return rec.entropy()
        return self._cached("attn_entropy", make)


# the anisotropy score's weights (g1 norm, g2 alignment) by prediction type: the authors' SD 1.4
# (epsilon) and SD 2.0 (v-prediction) settings
ANISOTROPY_WEIGHTS = {"epsilon": (1.0, 2.0), "v_prediction": (1.0, 0.1), "sample": (1.0, 2.0), "flow": (1.0, 2.0)}


@dataclass(frozen=True)
class Metric:
    """A registered metric: its name, its cost beyond the step's own CFG call, its function, and
    the range its scores can take (a threshold outside it is a corrupt one: it would flag every
    prompt or none)."""

    name: str
    cost: str
    fn: Callable[[Step], torch.Tensor]
    low: float = -math.inf
    high: float = math.inf

    def in_range(self, value: float) -> bool:
        """Whether a score (or a threshold) of this metric can be `value`."""
        return self.low <= value <= self.high


class _Registry(dict):
    """The metrics by name; a probed name ("wen_low@4", catalog.probed) is built on lookup, not
    stored: iterating lists the registered metrics only."""

    def __missing__(self, name: str) -> Metric:
        parsed = catalog.probed(name)
        if parsed is None:  # (a sharpfast error, not KeyError: every caller checks `in` first)
            raise BadArgument(f"unknown metric {name!r}; valid metrics: {catalog.METRIC_HELP}")
        base, n = parsed
        return Metric(name, f"1 extra CFG call on {n} times the rows ({base} at the image's noise and {n - 1} "
                            f"probe noises)", lambda step: PROBED_FNS[base](step, n), self[base].low, self[base].high)

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or catalog.probed(name) is not None

    def get(self, name: Any, default: Any = None) -> Any:
        return self[name] if name in self else default


REGISTRY: dict[str, Metric] = _Registry()


def register(name: str, cost: str, low: float = -math.inf, high: float = math.inf) -> Callable:
    """Decorator: register fn(step) -> (N,) tensor as metric `name` (higher = more memorized),
    whose scores lie in [low, high]."""
    def deco(fn: Callable) -> Callable:
        REGISTRY[name] = Metric(name, cost, fn, low, high)
        return fn
    return deco


@register("wen", "0 extra UNet calls", low=0.0)
def _wen(step: Step) -> torch.Tensor:
    return step.wen


@register("sharpness", "1 extra CFG call (hvp='fd'); a forward-mode JVP in fp32 (hvp='jvp')", low=0.0)
def _sharpness(step: Step) -> torch.Tensor:
    eps_u, eps_c = step.eps
    xf = step.x.float()
    if step.hvp == "fd":
        return fd_sharpness(step.model, xf, step.t, step.alpha_bar, step.cond, eps_u, eps_c, step.h,
                            check=lambda d: step.check(d, "finite-difference point"), wen=step.wen.float())
    jac = ScoreJacobian(step.model, xf, step.t, step.alpha_bar, step.cond, branch="delta", mode="jvp")
    hv = jac.matvec(-(eps_c - eps_u) / step.sigma)  # H_Δ s_Δ, exact
    return hv.reshape(len(hv), -1).norm(dim=1)


@register("trace", "1 extra call on a num_probes-times batch (shared with trace_delta)")
def _trace(step: Step) -> torch.Tensor:
    return -step.traces()[0]


@register("trace_delta", "1 extra call on a num_probes-times batch (shared with trace)")
def _trace_delta(step: Step) -> torch.Tensor:
    tr_c, tr_u = step.traces()
    return -(tr_c - tr_u)


@register("score_norm", "0 extra UNet calls", low=0.0)
def _score_norm(step: Step) -> torch.Tensor:
    eps_c = step.eps[1]
    return eps_c.reshape(len(eps_c), -1).pow(2).sum(dim=1) / step.sigma ** 2


@register("channel_wen", "0 extra UNet calls", low=0.0)
def _channel_wen(step: Step) -> torch.Tensor:
    return step.channel_wen()


@register("aniso_align", "1 extra CFG call (at the low-noise timestep; shared with anisotropy)")
def _aniso_align(step: Step) -> torch.Tensor:
    return step.aniso_align()


@register("anisotropy", "1 extra CFG call (at the low-noise timestep)")
def _anisotropy(step: Step) -> torch.Tensor:
    g1, g2 = ANISOTROPY_WEIGHTS[step.model.prediction_type]
    return g1 * step.wen.float() + g2 * step.aniso_align()


@register("wen_low", "1 extra CFG call (at the schedule's last, lowest-noise timestep)", low=0.0)
def _wen_low(step: Step) -> torch.Tensor:
    u, c = step.at_low_noise(1)
    return (c - u).reshape(len(c), -1).norm(dim=1)


PROBED_FNS: dict[str, Callable[[Step, int], torch.Tensor]] = {"wen_low": lambda step, n: step.low_noise_probed(n)}


@register("attn_entropy", "1 extra UNet call on the conditional rows (attention recorded)", high=0.0)
def _attn_entropy(step: Step) -> torch.Tensor:
    return -step.attention_entropy()


METRICS = tuple(REGISTRY)


def step_metrics(model: ScoreModel, x: Tensor, t: Any, alpha_bar: float, cond: Conditioning, metrics: Any,
                 guidance_scale: float, *, prompts: list, n: int, estimator: EstimatorOptions = DEFAULT_ESTIMATOR,
                 schedule: Any = None) -> tuple:
    """Metrics at latents x (N rows) from one CFG call, and the guided prediction for the sampler.

    Returns ({metric: (N,) float32}, guided prediction in the UNet's parameterization).
    """
    pred_u, pred_c = model.predict(x, t, cond)
    check_finite(pred_u, n, prompts, "null branch")
    check_finite(pred_c, n, prompts, "conditional branch")
    step = Step(model, x, t, alpha_bar, cond, pred_u, pred_c, names=prompts, n=n, guidance_scale=guidance_scale,
                estimator=estimator, schedule=schedule)
    return {m: REGISTRY[m].fn(step).float() for m in metrics}, step.guided[0]
