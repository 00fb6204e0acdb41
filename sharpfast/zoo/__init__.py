"""Small models that ship with sharpfast, loaded offline.

    pipe = sharpfast.zoo.load("digits")                  # a stock StableDiffusionPipeline
    sets = sharpfast.zoo.prompts("digits")              # memorized + non-memorized evaluation prompts
    low = sharpfast.zoo.prompts("digits", split="duplicated_low")

"digits" is a text-to-image pipeline trained on scikit-learn's handwritten digits with
LAION-style captions, some images duplicated with a caption of their own (digits_data.py,
train_digits.py); the prompt sets carry the copy rates measured by measure_digits.py.
"""
from __future__ import annotations

import contextlib
import json
import os

from ..errors import BadArgument, MissingInput

MODELS = ("digits",)
# "eval" is memorized + non_memorized, the two sets of the detection benchmark
SPLITS = ("eval", "memorized", "non_memorized", "duplicated_low", "narrow")
PROMPT_FILE = "prompts.json"


def path(name: str = "digits") -> str:
    """Directory of a bundled model (a diffusers model directory, safetensors)."""
    if name not in MODELS:
        raise BadArgument(f"unknown bundled model {name!r}; available: {', '.join(MODELS)}")
    p = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    if not os.path.isfile(os.path.join(p, "model_index.json")):
        raise MissingInput(f"the bundled model {name!r} is missing from {p}; reinstall sharpfast or rebuild "
                                f"it with python -m sharpfast.zoo.train_digits --out {p}")
    return p


def resolve(model: str) -> str:
    """A bundled model's name or a local model directory, as a directory."""
    return path(model) if model in MODELS else model


def dtype_kwarg(dtype) -> dict:
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


def load(name: str = "digits", device="cpu", dtype=None):
    """The bundled pipeline, offline: StableDiffusionPipeline.from_pretrained(path(name))."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path(name), **dtype_kwarg(dtype or torch.float32),
                                                   use_safetensors=True, local_files_only=True)
    return pipe.to(device)


def load_prompt_file(model_dir: str) -> dict:
    """The prompts.json of a zoo model directory."""
    f = os.path.join(model_dir, PROMPT_FILE)
    if not os.path.isfile(f):
        raise MissingInput(f"no {PROMPT_FILE} beside the model in {model_dir}; measure it with "
                                f"python -m sharpfast.zoo.measure_digits --model {model_dir}")
    with open(f, encoding="utf-8") as fh:
        return json.load(fh)


def prompts(name: str = "digits", split: str = "eval") -> list[dict]:
    """Prompt records of a bundled model: prompt, memorized, digit, train_index, duplicates, copy_rate.

    split: "eval" (memorized then non_memorized), "memorized" (duplicated captions that copy their
    image on at least half the seeds), "non_memorized" (in-distribution captions never tied to one
    image), "duplicated_low" (duplicated captions that copy less often), "narrow" (captions that
    name only the digit).
    """
    if split not in SPLITS:
        raise BadArgument(f"unknown split {split!r}; available: {', '.join(SPLITS)}")
    sets = load_prompt_file(path(name))["splits"]
    if split == "eval":
        return [dict(r) for r in sets["memorized"] + sets["non_memorized"]]
    return [dict(r) for r in sets[split]]
