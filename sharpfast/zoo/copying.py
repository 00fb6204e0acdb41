"""Does a generation copy a training image? Nearest-neighbour similarity on the digits data.

Similarity is the Pearson correlation of the 16x16 pixels (cosine of the mean-centred images),
1 for a copy up to brightness and contrast. A generation copies duplicated image i when its
nearest training image is i and the similarity is at least COPY_THRESHOLD.
"""
from __future__ import annotations

import torch

COPY_THRESHOLD = 0.9


def _unit(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(len(x), -1).double()
    flat = flat - flat.mean(dim=1, keepdim=True)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)


def nearest(images: torch.Tensor, train: torch.Tensor):
    """(index of the nearest training image, its similarity) per image."""
    sim = _unit(images) @ _unit(train).T
    best, idx = sim.max(dim=1)
    return idx, best


def generate(pipe, prompts, seeds, num_inference_steps=50, guidance_scale=7.5, latents=None):
    """Images in [-1, 1], one per (prompt, seed), prompt-major."""
    caps = [p for p in prompts for _ in seeds]
    gens = [torch.Generator().manual_seed(s) for _ in prompts for s in seeds]
    out = pipe(caps, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=gens,
               latents=latents, output_type="pt").images
    return out.float() * 2 - 1


def copy_stats(images, train, target_index):
    """(copies: bool per image, similarity to the target image) for images meant to show target_index."""
    idx, best = nearest(images, train)
    target = torch.as_tensor(target_index).reshape(-1).expand(len(images))
    sim_target = (_unit(images) * _unit(train[target])).sum(dim=1)
    return (idx == target) & (best >= COPY_THRESHOLD), sim_target
