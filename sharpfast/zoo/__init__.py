"""Small models that ship with sharpfast, loaded offline.

    pipe = sharpfast.zoo.load("digits")                  # a stock StableDiffusionPipeline
    sets = sharpfast.zoo.prompts("digits")              # memorized + non-memorized evaluation prompts
    low = sharpfast.zoo.prompts("digits", split="duplicated_low")
    judge = sharpfast.zoo.judge("scenes", sharpfast.zoo.load("scenes"))   # copies and fidelity

"digits" is a text-to-image pipeline trained on scikit-learn's handwritten digits with
LAION-style captions, some images duplicated with a caption of their own (digits_data.py,
train_digits.py); "scenes" one trained on rendered RGB scenes with compositional captions,
duplicated scenes and a template group (scenes_data.py, train_scenes.py). The prompt sets carry
the copy rates measured by measure_digits.py / measure_scenes.py, each model's judge.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from ..errors import BadArgument, MissingInput

MODELS = ("digits", "scenes")
# "eval" is memorized + non_memorized, the two sets of the detection benchmark; "template" and
# "calibration" (the normal captions its calibration.json was made from) exist for scenes only
SPLITS = ("eval", "memorized", "non_memorized", "duplicated_low", "narrow", "template", "calibration")
PROMPT_FILE = "prompts.json"


def path(name: str = "digits") -> str:
    """Directory of a bundled model (a diffusers model directory, safetensors)."""
    if name not in MODELS:
        raise BadArgument(f"unknown bundled model {name!r}; available: {', '.join(MODELS)}")
    p = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    if not os.path.isfile(os.path.join(p, "model_index.json")):
        raise MissingInput(f"the bundled model {name!r} is missing from {p}; reinstall sharpfast or rebuild "
                                f"it with python -m zoo_scripts.train_{name} (from the repository) --out {p}")
    return p


def resolve(model: str) -> str:
    """A bundled model's name or a local model directory, as a directory."""
    return path(model) if model in MODELS else model


def dtype_kwarg(dtype: Any) -> dict:
    """from_pretrained's dtype keyword: `dtype=` where diffusers has it (it deprecates
    `torch_dtype=`, warning on every load), `torch_dtype=` on older releases."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (present with dtype=)
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


@contextlib.contextmanager
def quiet_loading():
    """Inside the block, from_pretrained shows no loading bars and diffusers / transformers log
    errors only (for the command line, whose own output this would bury); restored after."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    levels = (dlog.get_verbosity(), tlog.get_verbosity())
    bars = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()


def load(name: str = "digits", device: str = "cpu", dtype: Any = None) -> Any:
    """The bundled pipeline, offline: StableDiffusionPipeline.from_pretrained(path(name)).

    Args:
        name: "digits" (16x16 grey) or "scenes" (32x32 RGB).
        device: where to put it.
        dtype: its torch dtype (default float32).

    Returns:
        A stock StableDiffusionPipeline.

    Raises:
        BadArgument: an unknown model.
        MissingInput: its weights are missing from the installed package.
    """
    import torch

    from ..quiet import quiet_image_processor_notice

    quiet_image_processor_notice()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path(name), **dtype_kwarg(dtype or torch.float32),
                                                   use_safetensors=True, local_files_only=True)
    return pipe.to(device)


def load_prompt_file(model_dir: str) -> dict:
    """The prompts.json of a zoo model directory."""
    f = os.path.join(model_dir, PROMPT_FILE)
    if not os.path.isfile(f):
        raise MissingInput(f"no {PROMPT_FILE} beside the model in {model_dir}; measure it with "
                                f"python -m zoo_scripts.measure_digits (or measure_scenes) --model {model_dir}")
    with open(f, encoding="utf-8") as fh:
        return json.load(fh)


def prompts(name: str = "digits", split: str = "eval") -> list[dict]:
    """Prompt records of a bundled model: prompt, memorized, train_index, duplicates, copy_rate and
    what the judge checks fidelity against ("digit" for digits, "attributes" for scenes).

    Args:
        name: "digits" or "scenes".
        split: "eval" (memorized then non_memorized), "memorized" (duplicated captions that copy
            their image on at least half the seeds), "non_memorized" (in-distribution captions never
            tied to one image), "duplicated_low" (duplicated captions that copy less often),
            "narrow" (captions that name only the digit / one object); scenes also has "template"
            (the template group's captions) and "calibration".

    Returns:
        A fresh list of record dicts.

    Raises:
        BadArgument: an unknown model or split, or a split the model does not have.
        MissingInput: the model's prompts.json is missing.
    """
    if split not in SPLITS:
        raise BadArgument(f"unknown split {split!r}; available: {', '.join(SPLITS)}")
    sets = load_prompt_file(path(name))["splits"]
    if split != "eval" and split not in sets:
        raise BadArgument(f"the {name} model has no {split!r} split; it has: {', '.join(['eval', *sets])}")
    if split == "eval":
        return [dict(r) for r in sets["memorized"] + sets["non_memorized"]]
    return [dict(r) for r in sets[split]]


def judge(name: str, pipe: Any) -> Any:
    """The judge of a bundled model's generations: copies of its training images and prompt fidelity.

    Args:
        name: "digits" or "scenes".
        pipe: the loaded pipeline (the scenes judge compares against its VAE's reconstructions).

    Returns:
        An object with `references` (the training images copies are judged against),
        `threshold` (the copy cut), `similarity_note` (what its similarity measures),
        `nearest(images)`, `copy_stats(images, train_index)` (one index or one per image),
        `copies_any(images)` and `fidelity(images, records)` (one record per image);
        images (N, C, H, W) in [-1, 1].

    Raises:
        BadArgument: an unknown model.
    """
    if name == "digits":
        from .copying import DigitsJudge

        return DigitsJudge()
    if name == "scenes":
        from .scenes_judge import ScenesJudge

        return ScenesJudge(pipe, path(name))
    raise BadArgument(f"unknown bundled model {name!r}; available: {', '.join(MODELS)}")
