"""The scenes model's judge: copies by pixel correlation, fidelity by an attribute classifier.

Copies. A generation copies fixed training image i (a duplicated or template scene) when its
nearest fixed image, by the correlation of the RGB pixels with each colour channel centred on its
own mean, is i and the correlation is at least COPY_CUT (copying.py: the
one definition). (Centring all channels together,
as the digits judge does with its one channel, lets the colour of a uniform background alone
correlate two teal scenes at 0.95 whatever their objects; centred per channel a background
contributes nothing and the objects decide.) The references are the fixed scenes passed through the model's own VAE
(encode, decode), so that the autoencoder's reconstruction error, which no generation can beat,
does not hide a copy. The correlation is not a quantity any sharpfast detector or mitigation
computes.

Fidelity. A small CNN trained on the renderer's labels (scenes_data.py) reads the background
colour (6 classes) and which (colour, shape) pairs are present (18 labels). An image's fidelity to
its prompt is the share of the prompt's attributes it shows: the background, and each named
object's colour and shape together. Trained by train_scenes.py (weights in MODEL/judge), seeded,
on clean and degraded renders (blur, noise) so that it reads generations, not only renders.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .copying import COPY_CUT
from .scenes_data import BACKGROUNDS, COLOURS, SHAPES, random_scene, template_scene, to_tensor

PAIRS = [(c, s) for c in COLOURS for s in SHAPES]
WEIGHTS = "attributes.safetensors"
POOL = 20000  # training scenes of the classifier


class AttributeNet(nn.Module):
    """(N, 3, 32, 32) in [-1, 1] -> (background logits (N, 6), pair logits (N, 18))."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(64 * 16, 128), nn.ReLU())
        self.head = nn.Linear(128, len(BACKGROUNDS) + len(PAIRS))

    def forward(self, x: Tensor) -> tuple:
        """(background logits, pair logits) of a batch."""
        y = self.head(self.body(x))
        return y[:, :len(BACKGROUNDS)], y[:, len(BACKGROUNDS):]


def labels(scenes) -> tuple:
    """(background index (N,), pair presence (N, 18)) of rendered scenes."""
    bgs = list(BACKGROUNDS)
    bg = torch.tensor([bgs.index(s.background) for s in scenes])
    pairs = torch.zeros(len(scenes), len(PAIRS))
    for i, s in enumerate(scenes):
        for o in s.objects:
            pairs[i, PAIRS.index((o.colour, o.shape))] = 1
    return bg, pairs


def _degrade(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Half the batch blurred (3x3 box), all of it with a little noise: generations are not crisp renders."""
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    pick = (torch.rand(len(x), generator=g) < 0.5)[:, None, None, None]
    x = torch.where(pick, blur, x)
    return (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def _scenes(rng: np.random.Generator, n: int) -> list:
    """Generic scenes, with a template-layout scene one time in eight (so the classifier knows it too)."""
    out = []
    for _ in range(n):
        if rng.random() < 0.125:
            out.append(template_scene(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))))
        else:
            out.append(random_scene(rng))
    return out


def train_classifier(out_dir: str, seed: int = 0, steps: int = 3000, batch: int = 128, log=print,
                     pool: int | None = None) -> dict:
    """Trains the attribute classifier and saves it to out_dir; returns its held-out accuracy."""
    from safetensors.torch import save_file

    torch.manual_seed(seed + 21)
    g = torch.Generator().manual_seed(seed + 21)
    rng = np.random.default_rng(seed + 21)
    net = AttributeNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    pool = POOL if pool is None else pool
    scenes = _scenes(rng, pool)  # rendered once; every batch is degraded afresh
    images, (bgs, pairs_all) = to_tensor(scenes), labels(scenes)
    for step in range(steps):
        pick = torch.randint(0, pool, (batch,), generator=g)
        bg, pairs = bgs[pick], pairs_all[pick]
        lb, lp = net(_degrade(images[pick], g))
        loss = F.cross_entropy(lb, bg) + F.binary_cross_entropy_with_logits(lp, pairs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"judge step {step} loss {loss.item():.4f}")
    net.eval()
    held = _scenes(np.random.default_rng(seed + 99), min(1000, pool))  # scenes never trained on
    acc = accuracy(net, held, g)
    os.makedirs(out_dir, exist_ok=True)
    save_file(net.state_dict(), os.path.join(out_dir, WEIGHTS))
    with open(os.path.join(out_dir, "judge_info.json"), "w") as f:
        json.dump(dict(seed=seed, steps=steps, batch=batch, held_out=acc), f, indent=2)
    log(f"judge held-out accuracy {acc}")
    return acc


@torch.no_grad()
def accuracy(net, scenes, g: Any) -> dict:
    """Background accuracy and the share of images whose 18 pair labels are all right (degraded renders)."""
    bg, pairs = labels(scenes)
    x = _degrade(to_tensor(scenes), g)
    lb, lp = net(x)
    return {"background": round(float((lb.argmax(1) == bg).float().mean()), 4),
            "pairs_exact": round(float(((lp > 0).float() == pairs).all(1).float().mean()), 4)}


@functools.lru_cache(maxsize=4)
def classifier(model_dir: str) -> AttributeNet:
    """The trained attribute classifier of a scenes model directory (cached per directory)."""
    from safetensors.torch import load_file

    from ..errors import MissingInput

    f = os.path.join(model_dir, "judge", WEIGHTS)
    if not os.path.isfile(f):
        raise MissingInput(f"the scenes judge's classifier is missing: {f}; train it with "
                           f"python -m zoo_scripts.train_scenes --out {model_dir}")
    net = AttributeNet()
    net.load_state_dict(load_file(f))
    return net.eval()


@torch.no_grad()
def fidelity(net: AttributeNet, images: torch.Tensor, attributes: list) -> np.ndarray:
    """Per image, the share of its prompt's attributes (background, each object's colour + shape)
    the classifier sees in it. attributes: one {"background", "objects"} per image."""
    lb, lp = net(images.float().clamp(-1, 1))
    bgs = list(BACKGROUNDS)
    out = []
    for i, a in enumerate(attributes):
        hits = [] if a["background"] is None else [int(lb[i].argmax()) == bgs.index(a["background"])]
        hits += [bool(lp[i, PAIRS.index((c, s))] > 0) for c, s in a["objects"]]
        out.append(float(np.mean(hits)))
    return np.asarray(out)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Each image with every channel centred on its own mean, flattened, at unit length (float64)."""
    x = x.double()
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    flat = x.reshape(len(x), -1)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)


class ScenesJudge:
    """Copies and fidelity of scenes generations (the module docstring says how).

    Args:
        pipe: the scenes pipeline (its VAE makes the references).
        model_dir: its directory (the classifier's weights are in model_dir/judge).
        data_seed: the seed the model was trained with (regenerates the fixed scenes).
    """

    threshold = COPY_CUT
    similarity_note = ("similarity: correlation of the RGB pixels (each colour channel centred) with the caption's "
                       "training scene as the model's VAE reconstructs it. It compares pixels in place: the same "
                       "objects drawn elsewhere score near 0 although the picture looks alike, so read a low number "
                       "with the image above it")

    def __init__(self, pipe: Any, model_dir: str, data_seed: int = 0) -> None:
        from .scenes_data import build

        data = build(seed=data_seed)
        self.fixed = data.fixed
        self.template = torch.tensor([f.kind == "template" for f in data.fixed])
        vae = pipe.vae
        x = data.fixed_images().to(vae.device, vae.dtype)
        with torch.no_grad():
            self.references = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1).cpu()
        self.net = classifier(os.path.abspath(model_dir))

    def nearest(self, images: torch.Tensor) -> tuple:
        """(index of the nearest fixed scene, its correlation) per image."""
        sim = _unit(images.float().cpu()) @ _unit(self.references).T
        best, idx = sim.max(dim=1)
        return idx, best

    def copy_stats(self, images: torch.Tensor, target_index, cut: float = COPY_CUT) -> tuple:
        """(copies: bool per image, correlation with the target) for images of prompts whose
        training image is fixed scene `target_index` (one int, or one per image). For a template
        caption a copy of ANY template scene counts (template memorization: the layout is copied)."""
        images = images.float().cpu()
        idx, best = self.nearest(images)
        target = torch.as_tensor(target_index).reshape(-1).expand(len(images))
        sim = (_unit(images) * _unit(self.references[target])).sum(dim=1)
        hit = torch.where(self.template[target], self.template[idx], idx == target)
        return hit & (best >= cut), sim

    def copies_any(self, images: torch.Tensor, cut: float = COPY_CUT) -> tuple:
        """(copies: bool per image, best correlation) against every fixed scene (prompts without one)."""
        _, best = self.nearest(images)
        return best >= cut, best

    def fidelity(self, images: torch.Tensor, records: list) -> np.ndarray:
        """Per image, the share of its record's "attributes" the classifier sees (one record per image)."""
        return fidelity(self.net, images.cpu(), [r["attributes"] for r in records])


def main(argv=None) -> None:
    """python -m sharpfast.zoo.scenes_judge --model DIR [--steps N]: (re)train the classifier alone."""
    import argparse

    p = argparse.ArgumentParser(description="train the scenes judge's attribute classifier into DIR/judge")
    p.add_argument("--model", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    a = p.parse_args(argv)
    train_classifier(os.path.join(a.model, "judge"), seed=a.seed, steps=a.steps)


if __name__ == "__main__":
    main()
