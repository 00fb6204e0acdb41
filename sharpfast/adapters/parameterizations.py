"""Model parameterizations as small classes (k-diffusion style): each turns the denoiser's raw
prediction into eps_hat, and says how a difference of predictions scales into eps. Every metric
works on eps, so it is written once; a new parameterization is one class here.

Flow matching (SD3, Flux) is its own class: the velocity presented at unit noise, alpha_bar = 0
(sharpfast.adapters' module doc derives why).
"""
from __future__ import annotations

import math

import torch

from ..errors import BadArgument


class Parameterization:
    """What the denoiser predicts: `to_eps` converts a prediction at the VP latent x (noise level
    alpha_bar) to eps_hat in fp32; `eps_per_pred` is d eps_hat / d prediction at fixed x."""

    name = ""

    def to_eps(self, pred: torch.Tensor, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """The prediction as eps_hat (fp32)."""
        raise NotImplementedError

    def eps_per_pred(self, alpha_bar: float) -> float:
        """The factor that turns a difference of predictions at the same x into one of eps."""
        raise NotImplementedError


class Epsilon(Parameterization):
    """eps prediction: the prediction is eps_hat."""

    name = "epsilon"

    def to_eps(self, pred: torch.Tensor, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """eps_hat = pred."""
        return pred.float()

    def eps_per_pred(self, alpha_bar: float) -> float:
        """1."""
        return 1.0


class VPrediction(Parameterization):
    """v prediction: v = sqrt(a) eps - sqrt(1 - a) x0, so eps_hat = sqrt(a) v + sqrt(1 - a) x."""

    name = "v_prediction"

    def to_eps(self, pred: torch.Tensor, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """eps_hat = sqrt(a) v + sqrt(1 - a) x."""
        a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
        return a * pred.float() + s * x.float()

    def eps_per_pred(self, alpha_bar: float) -> float:
        """sqrt(alpha_bar)."""
        return math.sqrt(alpha_bar)


class Sample(Parameterization):
    """x0 prediction: eps_hat = (x - sqrt(a) x0) / sqrt(1 - a)."""

    name = "sample"

    def to_eps(self, pred: torch.Tensor, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """eps_hat = (x - sqrt(a) x0) / sqrt(1 - a)."""
        a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
        return (x.float() - a * pred.float()) / s

    def eps_per_pred(self, alpha_bar: float) -> float:
        """-sqrt(a) / sqrt(1 - a)."""
        return -math.sqrt(alpha_bar) / math.sqrt(1.0 - alpha_bar)


class Flow(Parameterization):
    """Rectified flow: the velocity v = eps - x0 presented as eps at unit noise (the normalized
    view of sharpfast.adapters)."""

    name = "flow"

    def to_eps(self, pred: torch.Tensor, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """The velocity itself."""
        return pred.float()

    def eps_per_pred(self, alpha_bar: float) -> float:
        """1."""
        return 1.0


PARAMETERIZATIONS: dict[str, Parameterization] = {p.name: p for p in (Epsilon(), VPrediction(), Sample(), Flow())}
PREDICTION_TYPES = tuple(PARAMETERIZATIONS)


def parameterization(prediction_type: str) -> Parameterization:
    """The parameterization named by a scheduler's prediction_type (BadArgument otherwise)."""
    if prediction_type not in PARAMETERIZATIONS:
        raise BadArgument(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return PARAMETERIZATIONS[prediction_type]


def to_eps(pred: torch.Tensor, x: torch.Tensor, alpha_bar: float, prediction_type: str) -> torch.Tensor:
    """The denoiser's prediction as eps_hat, in fp32 (x: the VP latent it saw)."""
    return parameterization(prediction_type).to_eps(pred, x, alpha_bar)


def eps_per_pred(prediction_type: str, alpha_bar: float) -> float:
    """d eps_hat / d prediction: differences of predictions at the same x scale by this into eps."""
    return parameterization(prediction_type).eps_per_pred(alpha_bar)


def sigma_of(alpha_bar: float) -> float:
    """The noise level sqrt(1 - alpha_bar) of a VP latent."""
    return math.sqrt(1.0 - alpha_bar)


def eps_to_score(eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    """s(x) = grad log p_t(x) = -eps_hat / sigma_t."""
    return -eps / sigma_of(alpha_bar)
