"""Does a generation copy a training image? Nearest-neighbour similarity on the digits data.

Similarity is the Pearson correlation of the 16x16 pixels (cosine of the mean-centred images),
1 for a copy up to brightness and contrast. A generation copies duplicated image i when its
nearest training image is i and the similarity is at least COPY_CUT.

The one definition of a copy (docs/method.md, "Copies"), for both bundled models: the cut is
COPY_CUT (0.8) in every table, figure and the demo; LABEL_CUT (0.9) is reported beside it where
outputs sit between the two, and is the cut that labelled the bundled prompts memorized (copied
on at least half of the seeds, zoo_scripts/measure_*.py).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

COPY_CUT = 0.8   # a copy: nearest training image is the prompt's own at similarity >= this
LABEL_CUT = 0.9  # the stricter cut reported beside it, and the one the prompt labels were measured at


def _unit(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(len(x), -1).double()
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)


def nearest(images: torch.Tensor, train: torch.Tensor) -> tuple:
    """(index of the nearest training image, its similarity) per image."""
    sim = _unit(images) @ _unit(train).T
    best, idx = sim.max(dim=1)
    return idx, best


def generate(pipe: Any, prompts: list, seeds: Any, num_inference_steps: int = 50, guidance_scale: float = 7.5,
             latents: Optional[Tensor] = None) -> Any:
    """Images in [-1, 1], one per (prompt, seed), prompt-major."""
    caps = [p for p in prompts for _ in seeds]
    gens = [torch.Generator().manual_seed(s) for _ in prompts for s in seeds]
    out = pipe(caps, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=gens,
               latents=latents, output_type="pt").images
    return out.float() * 2 - 1


def copy_stats(images: Any, train, target_index, cut: float = COPY_CUT) -> tuple:
    """(copies: bool per image, similarity to the target image) for images meant to show target_index;
    a copy: the nearest training image is the target at similarity >= cut."""
    idx, best = nearest(images, train)
    target = torch.as_tensor(target_index).reshape(-1).expand(len(images))
    sim_target = (_unit(images) * _unit(train[target])).sum(dim=1)
    return (idx == target) & (best >= cut), sim_target


class DigitsJudge:
    """The digits model's judge (the interface of sharpfast.zoo.judge): copies against the 1797
    digits by Pearson similarity, fidelity by the digit classifier (fidelity.py)."""

    threshold = COPY_CUT
    similarity_note = ("similarity: Pearson correlation of the 16x16 pixels with the prompt's training image "
                       "(1: the same image up to brightness and contrast)")

    def __init__(self) -> None:
        from .digits_data import digit_images

        self.references = digit_images()[0]

    def nearest(self, images: Any) -> Any:
        """(index of the nearest digit image, its similarity) per image."""
        return nearest(images.float().cpu(), self.references)

    def copy_stats(self, images: Any, target_index, cut: float = COPY_CUT) -> Any:
        """(copies: bool per image, similarity to the target) for images meant to show target_index."""
        return copy_stats(images.float().cpu(), self.references, target_index, cut)

    def copies_any(self, images: Any, cut: float = COPY_CUT) -> tuple:
        """(copies: bool per image, best similarity) against every digit image."""
        _, best = self.nearest(images)
        return best >= cut, best

    def fidelity(self, images: Any, records: list) -> Any:
        """1.0 where the classifier reads the record's digit (one record per image), else 0.0."""
        from .fidelity import fidelity

        return fidelity(images, [r["digit"] for r in records])
