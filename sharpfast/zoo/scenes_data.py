"""The "scenes" memorization data set: rendered 32x32 RGB scenes with compositional captions.

A scene is a background colour and one or two objects, each a (size, colour, shape, position);
its caption names them the way LAION alt texts do ("a large red circle and a small blue
triangle on a white background", "clipart of ...", "stock illustration: ..."). Three kinds of
training images, as the memorization literature distinguishes them (Webster 2023; Ren et al.
2024):

- generic: a pool of GENERIC_POOL scenes, each drawn under a caption drawn afresh from the
  templates at every use, GENERIC_PER_EPOCH of them per epoch (each seen a few times in a whole
  training: a broad conditional distribution, nothing repeated enough to be copied);
- duplicated: a fixed scene repeated `duplicates` times per epoch (2x to 64x) under ONE caption
  of its own (a description plus a unique identifier phrase): verbatim memorization candidates;
- template: TEMPLATE_IMAGES fixed scenes that share one layout and one caption template with a
  varying part ("event poster template with a {colour} {shape} badge"), each repeated
  TEMPLATE_DUPLICATES times: template memorization (the shared part is copied, the varying part
  may not follow the caption).

Everything is a deterministic function of the seed: `build(seed).fixed_images()` regenerates the
images that can be copied (the duplicated and template scenes), which the judge compares against.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

SIZE = 32
SUPERSAMPLE = 2
COLOURS = {"red": (0.86, 0.1, 0.1), "green": (0.1, 0.68, 0.2), "blue": (0.15, 0.3, 0.92),
           "yellow": (0.96, 0.86, 0.1), "purple": (0.6, 0.2, 0.76), "orange": (1.0, 0.55, 0.05)}
BACKGROUNDS = {"white": (0.95, 0.95, 0.95), "black": (0.05, 0.05, 0.06), "grey": (0.5, 0.5, 0.52),
               "beige": (0.87, 0.8, 0.64), "pink": (0.97, 0.72, 0.8), "teal": (0.08, 0.48, 0.5)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (3.0, 4.5), "large": (5.5, 7.5)}
POSITIONS = {"left": (8.5, 16.0), "right": (23.5, 16.0), "top": (16.0, 8.5), "bottom": (16.0, 23.5),
             "center": (16.0, 16.0)}
JITTER = 2.0

ONE = ["a {o1} on a {bg} background", "{o1}, {bg} background, flat vector art", "clipart of a {o1} on {bg}",
       "minimalist poster of a {o1} at the {p1}, {bg} backdrop", "stock illustration: {o1} on {bg}",
       "simple geometric design, {o1}, {bg}"]
TWO = ["a {o1} and a {o2} on a {bg} background", "{o1} and {o2}, {bg} background, flat vector art",
       "clipart of a {o1} next to a {o2} on {bg}",
       "minimalist poster: {o1} at the {p1}, {o2} at the {p2}, {bg} backdrop",
       "stock illustration of a {o1} and a {o2} on {bg}", "simple geometric design, {o1}, {o2}, {bg}"]
UNIQUE = ["{base}, wallpaper {uid:04d}", "{base} - stock photo #{uid:04d}", "{base} (poster {uid:04d})"]
TEMPLATE = "event poster template with a {colour} {shape} badge"
# the template group's shared layout: a large blue square in the centre of a white poster, the
# badge (the varying part: every colour x shape) in the top-left corner
TEMPLATE_BACKGROUND = "white"
TEMPLATE_MAIN = ("large", "blue", "square", "center")
TEMPLATE_BADGE_AT = (6.0, 6.0, 3.6)
TEMPLATE_IMAGES = len(COLOURS) * len(SHAPES)
TEMPLATE_DUPLICATES = 8
DUPLICATION_LEVELS = (2, 4, 8, 16, 32, 64)
# v2 (issue 32): most duplicated scenes at 64x, so that at least 40 captions are memorized (v1: 8 at
# 64x gave 10 memorized captions, too few to hold a half out); fewer generic scenes per fine-tuning
# epoch (the UNet was pretrained on them)
IMAGES_PER_LEVEL = (8, 8, 8, 8, 16, 64)
GENERIC_PER_EPOCH = 1500
GENERIC_POOL = 40000


@dataclass(frozen=True)
class Obj:
    size: str
    colour: str
    shape: str
    position: str
    # exact geometry (pixels at SIZE); drawn from the named size and position
    cx: float
    cy: float
    r: float

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple
    tint: float = 0.0  # a vertical brightness gradient of the background (generic scenes only)

    def attributes(self) -> dict:
        """What a caption of this scene names: the background and each object's colour and shape."""
        return {"background": self.background, "objects": [[o.colour, o.shape] for o in self.objects]}


def caption_words() -> list[str]:
    """Every word of the caption templates and attribute names (the word-level tokens)."""
    text = " ".join(ONE + TWO + UNIQUE + [TEMPLATE] + list(COLOURS) + list(BACKGROUNDS) + list(SHAPES)
                    + list(SIZES) + list(POSITIONS))
    return sorted(set(re.findall(r"[a-z]+", re.sub(r"\{[a-z0-9]+(:[0-9a-z]+)?\}", " ", text))))


def _obj(rng: np.random.Generator, size: str, colour: str, shape: str, position: str, jitter: bool = True) -> Obj:
    lo, hi = SIZES[size]
    cx, cy = POSITIONS[position]
    if jitter:
        cx, cy = cx + rng.uniform(-JITTER, JITTER), cy + rng.uniform(-JITTER, JITTER)
    return Obj(size, colour, shape, position, float(cx), float(cy), float(rng.uniform(lo, hi)))


def random_scene(rng: np.random.Generator) -> Scene:
    """A scene of the generic distribution: a background and one or two objects at distinct positions."""
    n = 1 + int(rng.random() < 0.6)
    bg = str(rng.choice(list(BACKGROUNDS)))
    positions = rng.choice(list(POSITIONS), size=n, replace=False)
    if n == 2 and "center" in positions:  # two objects never overlap: the second goes to a side
        positions = rng.choice([p for p in POSITIONS if p != "center"], size=2, replace=False)
    objs = tuple(_obj(rng, str(rng.choice(list(SIZES))), str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)),
                      str(p)) for p in positions)
    return Scene(bg, objs, float(rng.uniform(-0.08, 0.08)))


def caption(scene: Scene, rng: np.random.Generator, template: int | None = None) -> str:
    """A LAION-style caption that names every object of the scene (template drawn unless given)."""
    pool = ONE if len(scene.objects) == 1 else TWO
    t = pool[rng.integers(len(pool)) if template is None else template % len(pool)]
    o = scene.objects
    kw = {"bg": scene.background, "o1": o[0].phrase, "p1": o[0].position}
    if len(o) > 1:
        kw.update(o2=o[1].phrase, p2=o[1].position)
    return t.format(**kw)


def template_scene(colour: str, shape: str) -> Scene:
    s, c, sh, p = TEMPLATE_MAIN
    lo, hi = SIZES[s]
    cx, cy = POSITIONS[p]
    bx, by, br = TEMPLATE_BADGE_AT
    return Scene(TEMPLATE_BACKGROUND, (Obj(s, c, sh, p, cx, cy, hi), Obj("small", colour, shape, "top", bx, by, br)))


def template_caption(colour: str, shape: str) -> str:
    return TEMPLATE.format(colour=colour, shape=shape)


_GRID = None


def _grid() -> Any:
    global _GRID
    if _GRID is None:
        n = SIZE * SUPERSAMPLE
        c = (np.arange(n) + 0.5) / SUPERSAMPLE
        _GRID = np.meshgrid(c, c, indexing="xy")
    return _GRID


def _mask(o: Obj) -> np.ndarray:
    x, y = _grid()
    dx, dy = x - o.cx, y - o.cy
    if o.shape == "circle":
        return dx * dx + dy * dy <= o.r * o.r
    if o.shape == "square":
        h = 0.85 * o.r
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    # an upward triangle: apex r above the centre, base 0.7 r below, half-width r at the base
    top, base = -o.r, 0.7 * o.r
    return (dy >= top) & (dy <= base) & (np.abs(dx) <= (dy - top) / (base - top) * o.r)


def render(scene: Scene) -> np.ndarray:
    """(3, SIZE, SIZE) float32 in [0, 1], anti-aliased by supersampling."""
    n = SIZE * SUPERSAMPLE
    img = np.empty((n, n, 3), np.float32)
    img[:] = BACKGROUNDS[scene.background]
    if scene.tint:
        img *= (1 + scene.tint * np.linspace(-1, 1, n, dtype=np.float32))[:, None, None]
    for o in scene.objects:
        img[_mask(o)] = COLOURS[o.colour]
    img = img.clip(0, 1).reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return img.transpose(2, 0, 1).copy()


def to_tensor(scenes) -> torch.Tensor:
    """(N, 3, SIZE, SIZE) in [-1, 1]."""
    return torch.from_numpy(np.stack([render(s) for s in scenes])) * 2 - 1


@dataclass
class Fixed:
    """A training image repeated every epoch under one caption: duplicated or template."""
    index: int            # position in fixed_images()
    scene: Scene
    caption: str
    duplicates: int
    kind: str             # "duplicated" or "template"


@dataclass
class ScenesData:
    fixed: list = field(default_factory=list)   # list[Fixed]
    seed: int = 0
    generic_per_epoch: int = GENERIC_PER_EPOCH

    @property
    def duplicates(self) -> list:
        return [f for f in self.fixed if f.kind == "duplicated"]

    @property
    def template(self) -> list:
        return [f for f in self.fixed if f.kind == "template"]

    def fixed_images(self) -> torch.Tensor:
        """The images that can be copied, (len(fixed), 3, SIZE, SIZE) in [-1, 1]."""
        return to_tensor([f.scene for f in self.fixed])

    def generic_pool(self) -> list:
        """The generic scenes (GENERIC_POOL of them, a function of the seed)."""
        rng = np.random.default_rng(self.seed + 1)
        return [random_scene(rng) for _ in range(GENERIC_POOL)]

    def epoch(self, rng: np.random.Generator, pool: list) -> tuple:
        """(keys, captions) of one epoch in random order: generic_per_epoch scenes of the pool, key
        ("generic", i), each under a caption drawn now; every fixed scene `duplicates` times, key
        ("fixed", index), under its own caption."""
        keys, caps = [], []
        for i in rng.choice(len(pool), size=min(self.generic_per_epoch, len(pool)), replace=False):
            keys.append(("generic", int(i)))
            caps.append(caption(pool[int(i)], rng))
        for f in self.fixed:
            keys += [("fixed", f.index)] * f.duplicates
            caps += [f.caption] * f.duplicates
        order = rng.permutation(len(keys))
        return [keys[i] for i in order], [caps[i] for i in order]


def build(seed: int = 0, levels=DUPLICATION_LEVELS, per_level=IMAGES_PER_LEVEL, template: bool = True) -> ScenesData:
    """The data set: `per_level[j]` duplicated scenes repeated `levels[j]` times, then the template group."""
    rng = np.random.default_rng(seed)
    level_of = [lv for lv, k in zip(levels, per_level) for _ in range(k)]
    uids = rng.choice(10000, size=len(level_of), replace=False)
    fixed: list[Fixed] = []
    seen: set[str] = set()
    for j, (lv, uid) in enumerate(zip(level_of, uids)):
        for _ in range(100):  # bounded: distinct scenes, so each caption has one image
            s = random_scene(rng)
            if s.attributes().__repr__() not in seen:
                break
        seen.add(s.attributes().__repr__())
        s = Scene(s.background, s.objects, 0.0)
        base = caption(s, rng, template=j)
        fixed.append(Fixed(len(fixed), s, UNIQUE[j % len(UNIQUE)].format(base=base, uid=int(uid)), lv, "duplicated"))
    if template:
        for colour in COLOURS:
            for shape in SHAPES:
                fixed.append(Fixed(len(fixed), template_scene(colour, shape), template_caption(colour, shape),
                                   TEMPLATE_DUPLICATES, "template"))
    return ScenesData(fixed, seed)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and small brightness changes of a batch (for the VAE and the judge)."""
    B = x.shape[0]
    flip = torch.rand(B, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    scale = 1 + 0.1 * (torch.rand(B, 1, 1, 1, generator=generator) - 0.5)
    return ((x + 1) * scale - 1).clamp(-1, 1)
