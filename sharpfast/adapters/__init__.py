"""The model adapters, one class per family: a stock diffusers pipeline as "eps and score for
these latents, this timestep, these conditional and null embeddings, in one batch".

Every model parameterization is converted to eps, and eps to the score, here and nowhere else
(k-diffusion style), so that each metric is written once. All metrics work in the
variance-preserving space the UNet sees: x = scheduler.scale_model_input(latents, t), with
alpha_bar from the scheduler (from its sigma for Euler-type schedulers, alpha_bar = 1/(1 + sigma^2)),
so that the same initial noise gives comparable numbers under DDIM, DPM-Solver or Euler.

The user's pipeline is never modified: the scheduler is copied before set_timesteps, and the
UNet is only called (attention processors are swapped and restored only by the exact JVP path).

Flow-matching pipelines (Stable Diffusion 3, Flux; prediction type "flow"). Rectified flow:
x_t = (1 - sigma) x_0 + sigma eps, the transformer predicts v = eps - x_0, so
eps_hat = x_t + (1 - sigma) v_hat and the score is s = -eps_hat / sigma. Between two prompts at
the same x_t: eps_c - eps_u = (1 - sigma)(v_c - v_u), s_Δ = -((1 - sigma) / sigma) Δv and
H_Δ = ∇s_Δ = -((1 - sigma) / sigma) ∇Δv. At the first step sigma = 1 exactly, so eps_hat = x_t for
every prompt and every score difference is 0: p_1 is N(0, I) whatever the prompt. The prompt shows
in the rate at which they leave 0, and (sigma / (1 - sigma))^k times the paper's quantities have
finite limits at sigma = 1 that carry it: Wen's ||Δeps|| / (1 - sigma) = ||Δv||, the normalized
score difference -Δv, the normalized sharpness ||(∇Δv) Δv|| = (sigma / (1 - sigma))^2 ||H_Δ s_Δ||.
That is what the adapter presents for these models, at every step: the velocity v as "eps" with
alpha_bar = 0 (unit noise), so every metric written for eps computes the normalized quantity,
defined at sigma = 1 and, at sigma < 1, the paper's quantity times a positive factor that depends
only on the step (the ranking of prompts at a step is the paper's). Two exceptions are not mere
rescalings: score_norm becomes ||v_c||^2 and trace -tr ∇v_c (the paper's differ from these by
terms that do not depend on the prompt at sigma = 1: ||x||^2 and -D).

Layout: parameterizations.py (eps, v, sample, flow), base.py (Conditioning, ScoreModel and the
family registry), stable_diffusion.py (SD, SDXL), flow.py (SD3, Flux). A new family is a
ScoreModel subclass in a module here: every module of the package is imported, and defining the
class registers it.
"""
import importlib
import pkgutil

from .base import (
    SUPPORTED_PIPELINES,
    Conditioning,
    ScoreModel,
    adapt,
    adapter_class,
    adapter_families,
    denoiser,
    family,
    math_attention,
    pipeline_defaults,
    scalar_timestep,
)
from .call_settings import Settings
from .flow import FluxModel, StableDiffusion3Model
from .parameterizations import (
    PARAMETERIZATIONS,
    PREDICTION_TYPES,
    Parameterization,
    eps_per_pred,
    eps_to_score,
    parameterization,
    sigma_of,
    to_eps,
)
from .stable_diffusion import StableDiffusionModel, StableDiffusionXLModel

__all__ = ["SUPPORTED_PIPELINES", "Conditioning", "ScoreModel", "adapt", "adapter_class", "adapter_families",
           "denoiser", "family", "math_attention", "pipeline_defaults", "scalar_timestep", "FluxModel",
           "StableDiffusion3Model", "PARAMETERIZATIONS", "PREDICTION_TYPES", "Parameterization", "eps_per_pred",
           "eps_to_score", "parameterization", "sigma_of", "to_eps", "StableDiffusionModel",
           "StableDiffusionXLModel", "Settings"]

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):  # the family modules register their classes
    importlib.import_module(f"{__name__}.{_mod}")
