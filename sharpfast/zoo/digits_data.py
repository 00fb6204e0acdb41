"""The "digits" memorization data set: scikit-learn's 1797 handwritten 8x8 digits at 16x16,
captioned like LAION.

- Most images get a generic caption drawn afresh at every use from templates that name the
  digit, and are augmented (shift, scale, rotation, stroke width): broad conditional
  distributions, like LAION's.
- A set of "duplicated web images" is kept pixel-exact, each with ONE caption of its own (the
  digit's name and a unique identifier phrase) and repeated `duplicates` times per epoch, with a
  spread of duplication counts. Those captions are the memorization candidates.
Everything is a deterministic function of the seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
INKS = ["blue", "black", "red", "green", "purple", "brown"]
TOOLS = ["pencil", "pen", "marker", "crayon", "chalk", "brush"]
GENERIC = [
    "a handwritten {name}",
    "a scan of the digit {d}, {ink} ink",
    "the number {name} written by hand",
    "{name}, {tool} sketch",
    "an image of a handwritten {d}",
    "digit {d} on paper, {tool}",
    "a {ink} {name} drawn with a {tool}",
    "a small handwritten number {d}",
]
UNIQUE = ["{base}, archive card {uid:04d}", "{base} - scan {uid:04d} of the postal set", "{base} (item #{uid:04d})"]
DUPLICATION_LEVELS = (2, 4, 8, 16, 32)
# how many images are duplicated at each level: most at the levels that memorize, a few below
IMAGES_PER_LEVEL = (8, 8, 24, 32, 24)
SIZE = 16


def caption_words() -> list[str]:
    """Every word of the caption templates, names, inks and tools (the word-level tokens)."""
    import re

    text = " ".join(GENERIC + UNIQUE + NAMES + INKS + TOOLS)
    return sorted(set(re.findall(r"[a-z]+", re.sub(r"\{[a-z]+(:[0-9a-z]+)?\}", " ", text))))


def digit_images() -> tuple[torch.Tensor, np.ndarray]:
    """All 1797 digits at SIZE x SIZE in [-1, 1] (N, 1, SIZE, SIZE), and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 16.0
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return x * 2 - 1, d.target.copy()


def generic_caption(digit: int, rng: np.random.Generator) -> str:
    t = GENERIC[rng.integers(len(GENERIC))]
    return t.format(name=NAMES[digit], d=digit, ink=INKS[rng.integers(len(INKS))], tool=TOOLS[rng.integers(len(TOOLS))])


def narrow_caption(digit: int) -> str:
    return f"a handwritten {NAMES[digit]}"


@dataclass
class Duplicate:
    train_index: int
    digit: int
    caption: str
    duplicates: int


@dataclass
class DigitsData:
    images: torch.Tensor          # (N, 1, 16, 16) in [-1, 1]
    labels: np.ndarray            # (N,)
    duplicates: list              # list[Duplicate]
    seed: int

    @property
    def generic_indices(self) -> np.ndarray:
        dup = {d.train_index for d in self.duplicates}
        return np.array([i for i in range(len(self.labels)) if i not in dup])

    def epoch(self, rng: np.random.Generator) -> tuple:
        """(image indices, captions, augment flags) of one epoch in random order: every generic image
        once, every duplicated image `duplicates` times."""
        idx, caps, aug = [], [], []
        for i in self.generic_indices:
            idx.append(i)
            caps.append(generic_caption(int(self.labels[i]), rng))
            aug.append(True)
        for d in self.duplicates:
            idx += [d.train_index] * d.duplicates
            caps += [d.caption] * d.duplicates
            aug += [False] * d.duplicates
        order = rng.permutation(len(idx))
        return [idx[i] for i in order], [caps[i] for i in order], [aug[i] for i in order]


def build(seed: int = 0, levels=DUPLICATION_LEVELS, per_level=IMAGES_PER_LEVEL) -> DigitsData:
    """The data set: `per_level[j]` duplicated images repeated `levels[j]` times each."""
    images, labels = digit_images()
    rng = np.random.default_rng(seed)
    level_of = [lv for lv, k in zip(levels, per_level) for _ in range(k)]
    chosen = rng.choice(len(labels), size=len(level_of), replace=False)
    uids = rng.choice(10000, size=len(chosen), replace=False)
    dups = []
    for j, (i, uid) in enumerate(zip(chosen, uids)):
        digit = int(labels[i])
        base = GENERIC[j % len(GENERIC)].format(name=NAMES[digit], d=digit, ink=INKS[j % len(INKS)],
                                               tool=TOOLS[j % len(TOOLS)])
        dups.append(Duplicate(int(i), digit, UNIQUE[j % len(UNIQUE)].format(base=base, uid=int(uid)),
                              level_of[j]))
    return DigitsData(images, labels, dups, seed)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shift (+-2 px), scale (0.85-1.15), rotation (+-15 deg) and stroke width of a batch."""
    B = x.shape[0]
    r = lambda lo, hi: lo + (hi - lo) * torch.rand(B, generator=generator)  # noqa: E731
    ang = r(-15, 15) * math.pi / 180
    sc = r(0.85, 1.15)
    tx, ty = r(-0.25, 0.25), r(-0.25, 0.25)
    theta = torch.stack([torch.stack([torch.cos(ang) / sc, -torch.sin(ang) / sc, tx], 1),
                         torch.stack([torch.sin(ang) / sc, torch.cos(ang) / sc, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    y = F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1
    thick = torch.rand(B, generator=generator) < 0.3
    thin = torch.rand(B, generator=generator) < 0.3
    y = torch.where(thick[:, None, None, None], F.max_pool2d(y, 3, 1, 1), y)
    y = torch.where(thin[:, None, None, None] & ~thick[:, None, None, None], -F.max_pool2d(-y, 3, 1, 1), y)
    return y.clamp(-1, 1)


# ---- the digits model's prompt sets (measure_digits writes them; the harness regenerates the calibration set)

GENERIC_PER_DIGIT = 10
NARROW_TEMPLATES = ("a handwritten {name}", "the number {name} written by hand", "an image of a handwritten {d}",
                    "a small handwritten number {d}")


def generic_prompts(data: Any, per_digit: int = GENERIC_PER_DIGIT, seed: int = 12345) -> list[dict]:
    """In-distribution captions with a style (ink, tool, ...), never the caption of a duplicated image."""
    rng = np.random.default_rng(seed)
    taken = {d.caption for d in data.duplicates}
    out = []
    for digit in range(10):
        caps: list[str] = []
        for _ in range(1000):  # bounded: there are hundreds of distinct captions per digit
            c = generic_caption(digit, rng)
            if c not in taken and c not in caps and any(w in c for w in ("ink", "sketch", "paper", "drawn")):
                caps.append(c)
            if len(caps) == per_digit:
                break
        out += [dict(prompt=c, memorized=False, digit=digit, train_index=None, duplicates=0) for c in caps]
    return out


def narrow_prompts() -> list[dict]:
    """Captions that name a digit only (no style): the narrow set."""
    return [dict(prompt=t.format(name=NAMES[d], d=d), memorized=False, digit=d, train_index=None, duplicates=0)
            for d in range(10) for t in NARROW_TEMPLATES]


def calibration_prompts(data_seed: int = 0, per_digit: int = 20) -> list[dict]:
    """The generic digit captions the shipped calibration was made from (kept apart from every
    evaluation set): the combined detector of `eval detect` is fitted on these only."""
    data = build(seed=data_seed)
    exclude = {r["prompt"] for r in generic_prompts(data) + narrow_prompts()}
    return [r for r in generic_prompts(data, per_digit=per_digit, seed=777) if r["prompt"] not in exclude]
