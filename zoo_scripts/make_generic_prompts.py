"""Writes generic_prompts.txt: everyday captions of the kind found in web caption data, for
calibrating a model's thresholds on prompts that are not memorized.

How it was made: the word lists below were written by hand for this project (subjects with
something they do, places, times of day, photo and art styles, product shots); captions are
drawn from their combinations with a fixed seed, de-duplicated, and none is taken from a
memorization benchmark (the script checks the shipped prompt sets, sharpfast/data/prompts).
Rerun: python -m zoo_scripts.make_generic_prompts  (same seed -> the same file).
"""
from __future__ import annotations

import os
import random

from sharpfast.errors import UsageError

SUBJECTS = [
    "a golden retriever", "a tabby cat", "a young woman", "an old man", "two children", "a cyclist", "a chef",
    "a red fox", "a flock of sheep", "a brown horse", "a small sailboat", "a vintage car", "a yellow taxi",
    "a steam train", "a hot air balloon", "a lighthouse", "a wooden cabin", "a stone bridge", "a coffee cup",
    "a bowl of ramen", "a stack of pancakes", "a basket of apples", "a pair of running shoes", "a leather backpack",
    "a potted fern", "a bunch of sunflowers", "a snowy owl", "a family", "a street musician", "a skateboarder",
    "a fisherman", "a farmer", "a baker", "a teenage girl", "a group of friends", "a dog and a cat", "a hiker",
    "a ballet dancer", "a jazz band", "a carpenter", "a city bus", "a mountain goat", "a pair of swans",
    "a kitten", "a toddler", "a bride and groom", "a soccer team", "a row of bicycles", "a red barn",
    "a glass teapot", "a plate of sushi", "a birthday cake", "a wooden chair", "a ceramic vase", "a desk lamp",
]
DOING = [
    "sitting", "walking", "resting", "waiting", "standing", "playing", "looking out", "parked", "reflected in water",
]
PLACES = [
    "on a sandy beach", "in a busy street market", "in a quiet forest", "on a mountain trail", "by a calm lake",
    "in a modern kitchen", "in a cozy living room", "at a train station", "in a snowy village", "in a flower field",
    "on a city rooftop", "in an old library", "at a farmers market", "in a rainy alley", "on a wooden dock",
    "in a desert canyon", "in a sunlit garden", "at a small cafe", "in a busy office", "on a country road",
    "in a museum hall", "near a waterfall", "in a bamboo grove", "on a harbor pier", "in a vineyard",
    "on a white background", "on a marble countertop", "on a rustic table", "in a greenhouse", "at a night market",
]
TIMES = ["at sunrise", "at sunset", "at night", "in the fog", "after the rain", "in autumn", "in winter",
         "on a summer afternoon", "under a cloudy sky", "in soft morning light"]
STYLES = [
    "photo", "high resolution photo", "close-up photo", "aerial photo", "black and white photo", "stock photo",
    "watercolor painting", "oil painting", "pencil sketch", "digital illustration", "3d render", "vintage postcard",
    "film photograph", "travel poster", "product photo", "children's book illustration", "flat vector art",
]
SUFFIXES = ["", "", "", ", high quality", ", 4k", ", detailed", " | free stock image", ", wallpaper",
            " - canvas print", ", award winning", ", trending on social media", ", editorial"]


def captions(count: int = 320, seed: int = 20261129) -> list[str]:
    rng = random.Random(seed)
    out: list = []
    seen: set = set()
    for _ in range(100 * count):  # bounded: the space has far more than `count` combinations
        if len(out) == count:
            break
        s, p = rng.choice(SUBJECTS), rng.choice(PLACES)
        form = rng.randrange(4)
        if form == 0:
            c = f"{rng.choice(STYLES)} of {s} {p}"
        elif form == 1:
            c = f"{s} {rng.choice(DOING)} {p} {rng.choice(TIMES)}"
        elif form == 2:
            c = f"{s} {p}, {rng.choice(STYLES)}"
        else:
            c = f"{rng.choice(STYLES)} of {s} {rng.choice(TIMES)}"
        c = (c + rng.choice(SUFFIXES)).strip()
        c = c[0].upper() + c[1:]
        if c.lower() not in seen:
            seen.add(c.lower())
            out.append(c)
    return out


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    lines = captions()
    shared = os.path.join(here, "prompts")  # the shipped benchmark sets (sharpfast.data.PROMPT_SETS)
    if os.path.isdir(shared):  # none of them may be a benchmark prompt
        bench: set = set()
        for name in os.listdir(shared):
            with open(os.path.join(shared, name), encoding="utf-8", errors="replace") as f:
                bench.update(line.strip().lower() for line in f)
        clash = [c for c in lines if c.lower() in bench]
        if clash:
            raise UsageError(f"generic captions found in the benchmark sets: {clash[:5]}")
    with open(os.path.join(here, "generic_prompts.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {len(lines)} captions")


if __name__ == "__main__":
    main()
