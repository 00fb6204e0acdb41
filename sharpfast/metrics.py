"""The detection metrics at one sampling step, from the CFG batch (SPEC.md, "Detection metrics").

Every metric is per image (N rows), computed in the VP space of `sharpfast.score`:
- wen:         ||eps_Δ||                                   (0 extra UNet calls)
- sharpness:   ||H_Δ s_Δ||, finite difference (1 extra CFG call) or exact JVP
- trace:       -tr H(x, c), Hutchinson with K probes      (1 extra call on K-times the batch)
- trace_delta: -tr H_Δ, from the same probes as trace
- score_norm:  ||s(x, c)||^2                               (0 extra calls; E||s||^2 = -tr H for Gaussians)
Higher means sharper, i.e. more likely memorized, for every metric.
"""
from __future__ import annotations

import contextlib
import math

import torch

from . import ops
from .errors import NonFiniteOutput
from .score import Conditioning, ScoreModel, eps_per_pred, eps_to_score, sigma_of, to_eps

METRICS = ("wen", "sharpness", "trace", "trace_delta", "score_norm")
HVP_MODES = ("fd", "jvp")
# finite-difference step along the unit direction of s_Δ, in latent units, by UNet dtype;
# chosen so that fd agrees with the exact JVP (tests/test_detect.py)
DEFAULT_FD_STEP = {torch.float32: 0.05, torch.float16: 1.0, torch.bfloat16: 1.0}


@contextlib.contextmanager
def math_attention(unet):
    """Classic (math) attention for forward-mode AD; the original processors are restored."""
    from diffusers.models.attention_processor import AttnProcessor

    saved = unet.attn_processors
    unet.set_attn_processor(AttnProcessor())
    try:
        yield unet
    finally:
        unet.set_attn_processor(saved)


def exact_hvp_delta(model: ScoreModel, x, t, alpha_bar, cond: Conditioning, v):
    """H_Δ v by forward-mode AD (torch.func.jvp) in fp32 with math attention."""
    unet = model.fp32_unet()
    sig = sigma_of(alpha_bar)
    cond = cond.to(torch.float32)  # a half-precision pipeline's embeddings, for the fp32 copy
    with math_attention(unet):
        exact = model.with_unet(unet)

        def s_delta(z):
            u, c = exact.eps(z, t, alpha_bar, cond)
            return -(c - u) / sig

        _, hv = torch.func.jvp(s_delta, (x.float(),), (v.float(),))
    return hv


def fd_sharpness(model: ScoreModel, x, t, alpha_bar, cond: Conditioning, eps_u, eps_c, h, check=None, wen=None):
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
    if wen is None:  # ||eps_Δ||, unless the caller has it already (detect: from cfg_combine)
        wen = (eps_c - eps_u).reshape(len(x), -1).norm(dim=1)
    return dod * wen / (sig * sig * h)


def check_finite(pred: torch.Tensor, rows_per_prompt: int, prompts, what: str):
    bad = ~torch.isfinite(pred.reshape(pred.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0]) % (len(prompts) * rows_per_prompt) // rows_per_prompt
        raise NonFiniteOutput(f"the UNet returned NaN/inf ({what}) for prompt {prompts[i]!r}")


def probe_step(fd_step: float, numel: int) -> float:
    """Per-element finite-difference step of the Hutchinson probes: a Rademacher probe has norm
    sqrt(D), so h / sqrt(D) moves x by h, as far as the sharpness's finite difference does.
    (Reusing h per element moved x by h sqrt(D): 0.8 on a 4x8x8 latent, and trace_delta came
    out 21% off its value on the same probes; measured in tests/test_reference.py.)"""
    return fd_step / math.sqrt(numel)


def step_metrics(model: ScoreModel, x, t, alpha_bar, cond: Conditioning, metrics, guidance_scale, *, prompts, n,
                 hvp="fd", fd_step=None, num_probes=8, probe_seed=0, probe_h=None):
    """Metrics at latents x (N rows) and the guided prediction for the sampler.

    fd_step: the sharpness's finite-difference step (a distance in latent space, default by UNet
    dtype); probe_h: the Hutchinson probes' step per element (default fd_step / sqrt(D)).

    Returns ({metric: (N,) float32}, guided prediction in the UNet's parameterization).
    """
    pt = model.prediction_type
    pred_u, pred_c = model.predict(x, t, cond)
    check_finite(pred_u, n, prompts, "null branch")
    check_finite(pred_c, n, prompts, "conditional branch")
    guided, pred_diff = ops.cfg_combine(pred_u, pred_c, guidance_scale)
    wen = abs(eps_per_pred(pt, alpha_bar)) * pred_diff.float()
    out = {"wen": wen}
    need_eps = set(metrics) - {"wen"}
    if not need_eps:
        return out, guided
    xf = x.float()
    eps_u, eps_c = to_eps(pred_u, x, alpha_bar, pt), to_eps(pred_c, x, alpha_bar, pt)
    sig = sigma_of(alpha_bar)
    h = fd_step if fd_step is not None else DEFAULT_FD_STEP.get(model.dtype, 0.05)
    if "score_norm" in metrics:
        out["score_norm"] = eps_c.reshape(len(eps_c), -1).pow(2).sum(dim=1) / sig**2
    if "sharpness" in metrics:
        if hvp == "fd":
            out["sharpness"] = fd_sharpness(model, xf, t, alpha_bar, cond, eps_u, eps_c, h,
                                            check=lambda d: check_finite(d, n, prompts, "finite-difference point"),
                                            wen=wen.float())
        else:
            v = -(eps_c - eps_u) / sig
            hv = exact_hvp_delta(model, xf, t, alpha_bar, cond, v)
            out["sharpness"] = hv.reshape(len(hv), -1).norm(dim=1)
    if "trace" in metrics or "trace_delta" in metrics:
        K = num_probes
        hp = probe_h if probe_h is not None else probe_step(h, xf[0].numel())
        probes = ops.rademacher_perturb(xf, K, hp, probe_seed)
        eps_up, eps_cp = model.eps(probes, t, alpha_bar, cond, repeats=K)
        check_finite(eps_cp - eps_up, n, prompts, "Hutchinson probes")
        tr_c = ops.hutchinson_reduce(eps_to_score(eps_cp, alpha_bar), eps_to_score(eps_c, alpha_bar), K, hp, probe_seed)
        tr_u = ops.hutchinson_reduce(eps_to_score(eps_up, alpha_bar), eps_to_score(eps_u, alpha_bar), K, hp, probe_seed)
        out["trace"] = -tr_c
        out["trace_delta"] = -(tr_c - tr_u)
    return {m: out[m].float() for m in metrics}, guided
