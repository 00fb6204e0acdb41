"""Data shipped with sharpfast: the built-in calibration captions (generic_prompts.txt) and the
public prompt sets the memorization literature evaluates Stable Diffusion on (prompts/).

    sharpfast.data.prompt_set("sd1_memorized")   # 500 captions SD v1.4 reproduces its image for
    sharpfast.data.prompt_set_path("non_memorized")

| name | prompts | what |
| --- | --- | --- |
| sd1_memorized | 500 | LAION captions whose training image SD v1.4 reproduces (Webster 2023) |
| sd2_memorized | 219 | the same for SD v2.0 |
| non_memorized | 500 | controls: lines 1-200 COCO captions, 201-300 Lexica, 301-400 Tuxemon, 401-500 GPT-4 written |

sd1_memorized is the list Wen et al. (ICLR 2024) and Jeon et al. (ICML 2025) report on. A line is
a prompt exactly as published (odd spaces and punctuation included): a memorized caption
reproduces its image only as written, so nothing is cleaned.
"""
from __future__ import annotations

import os

from ..errors import BadArgument

PROMPT_SETS = ("sd1_memorized", "sd2_memorized", "non_memorized")
_HERE = os.path.dirname(os.path.abspath(__file__))


def prompt_set_path(name: str) -> str:
    """The file of a shipped prompt set (one prompt a line).

    Args:
        name: one of PROMPT_SETS.

    Returns:
        The path of its .txt file inside the installed package.

    Raises:
        BadArgument: an unknown name.
    """
    if name not in PROMPT_SETS:
        raise BadArgument(f"unknown prompt set {name!r}; shipped: {', '.join(PROMPT_SETS)}")
    return os.path.join(_HERE, "prompts", f"{name}.txt")


def prompt_set(name: str) -> list[str]:
    """The prompts of a shipped set, each exactly as written (only the line break removed).

    Args:
        name: one of PROMPT_SETS.

    Returns:
        The prompts, in file order.

    Raises:
        BadArgument: an unknown name.
    """
    with open(prompt_set_path(name), encoding="utf-8") as f:
        return [line.rstrip("\r\n") for line in f if line.strip()]
