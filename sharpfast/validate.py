"""One argument contract for detect, sail, guard, scan and the CLI: each check raises
BadArgument naming the argument and the value it got."""
from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch

from . import catalog
from .errors import BadArgument


def prompts(value: Any, name: str = "prompt") -> list[str]:
    """A str or a non-empty sequence of str, none of them empty or blank."""
    if not isinstance(value, (str, list, tuple)):  # a dict or a set would iterate into its keys
        raise BadArgument(f"{name} must be a str or a list of str, got {type(value).__name__}")
    items = [value] if isinstance(value, str) else list(value)
    if not items:
        raise BadArgument(f"{name} is empty: pass a prompt or a non-empty list of prompts")
    for i, p in enumerate(items):
        if not isinstance(p, str):
            raise BadArgument(f"{name}[{i}] must be a str, got {type(p).__name__}")
        if not p.strip():
            raise BadArgument(f"{name}[{i}] is an empty or blank string: a memorization score needs a prompt")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate: no tokenizer takes it
            raise BadArgument(f"{name}[{i}] is not valid text ({err.reason} at character {err.start})") from None
    return items


def integer(value: Any, name: str, minimum: int = 1) -> int:
    """An int >= minimum (bool refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise BadArgument(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def finite(value: Any, name: str, *, above=None, allow_inf: bool = False) -> float:
    """A real number that is not NaN (nor inf unless allow_inf), and > above when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BadArgument(f"{name} must be a number, got {value!r}")
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise BadArgument(f"{name} must be a {'non-NaN' if allow_inf else 'finite'} number, got {value!r}")
    if above is not None and not v > above:
        raise BadArgument(f"{name} must be > {above}, got {value!r}")
    return v


def guidance_scale(value: Any, *, needs_cfg: bool) -> float:
    """CFG scale: finite; > 1 where the classifier-free batch [null; cond] is needed (sail, guard)."""
    return finite(value, "guidance_scale", above=1 if needs_cfg else None)


def generators(generator: Any, count: int) -> Any:
    """A generator, None, or a list of exactly `count` generators (one per image)."""
    torch_generator(generator)
    if isinstance(generator, list) and len(generator) != count:
        raise BadArgument(f"generator is a list of {len(generator)} generators; pass one per image "
                          f"(len(prompts) * num_images_per_prompt = {count}) or a single generator")
    return generator


def latents(value: Any, shape: tuple, size: Any = None, device: Any = None) -> Optional[torch.Tensor]:
    """None, or a floating tensor of exactly `shape` without NaN/inf (on `device` when given).

    Args:
        value: the latents a caller passed (as `pipe(latents=...)` takes them).
        shape: (len(prompts) * num_images_per_prompt, *one image's latent shape).
        size: the (height, width) in pixels the shape comes from, for the message.
        device: the denoiser's device, when the latents are used as they are.

    Returns:
        value, unchanged.

    Raises:
        BadArgument: naming what is wrong.
    """
    if value is None:
        return None
    import torch

    of = f" and the latent of height x width {tuple(size)}" if size is not None else ", *latent"
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(shape):
        got = tuple(getattr(value, "shape", ())) or type(value).__name__
        raise BadArgument(f"latents must be a tensor of shape {tuple(shape)} (len(prompts) * num_images_per_prompt"
                          f"{of}), got {got}")
    if not value.is_floating_point():
        raise BadArgument(f"latents must be floating point, got {value.dtype}")
    if value.device.type == "meta":
        raise BadArgument("latents are on meta, a device without values: pass a real tensor")
    if device is not None and value.device != device:
        raise BadArgument(f"latents are on {value.device} but the pipeline's denoiser is on {device}")
    if not bool(torch.isfinite(value).all()):
        raise BadArgument("latents hold NaN or inf values")
    return value


def torch_generator(value: Any) -> Any:
    """None, a torch.Generator, or a list of them (an int seed is refused with the fix)."""
    import torch

    for g in value if isinstance(value, list) else [value]:
        if g is not None and not isinstance(g, torch.Generator):
            raise BadArgument(f"generator must be a torch.Generator or a list of them, got {type(g).__name__}"
                              + (" (for a seed, pass torch.Generator().manual_seed(seed))"
                                 if isinstance(g, numbers.Integral) else ""))
    return value


def metrics(value: Any, known) -> tuple:
    """A metric name or a non-empty sequence of them, each one of `known` (duplicates dropped).

    Raises:
        BadArgument: empty, or an unknown name (the message lists the valid ones).
    """
    items = (value,) if isinstance(value, str) else tuple(value)
    names = catalog.METRIC_HELP if isinstance(known, dict) else ", ".join(known)  # the registry: probed names too
    if not items:
        raise BadArgument(f"metrics is empty; choose from {names}")
    for m in items:
        if m not in known:
            raise BadArgument(f"unknown metric {m!r}; valid metrics: {names}")
    return tuple(dict.fromkeys(items))
