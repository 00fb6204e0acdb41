"""Loading a model by name: a bundled one ('digits', 'scenes') or a local diffusers directory,
offline, on a device and dtype ('auto' picks them). The CLI and the server transports use it."""
from __future__ import annotations

import os
from typing import Any

from .errors import MissingInput

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def device_dtype(device: str, dtype: str) -> tuple[str, str]:
    """'auto' device: cuda if available, else cpu; 'auto' dtype: fp16 on cuda, fp32 on cpu."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    return device, dtype


def load_model(model: str, device: str, dtype: str) -> Any:
    """'digits' or 'scenes' (the bundled models) or a local diffusers model directory, safetensors only, offline,
    its progress bar off (the commands show their own)."""
    import torch

    from .quiet import quiet_image_processor_notice

    quiet_image_processor_notice()
    from diffusers import DiffusionPipeline

    from . import zoo

    model_dir = zoo.resolve(model)
    if not os.path.isdir(model_dir):
        raise MissingInput(f"--model must be 'digits', 'scenes' or a local diffusers model directory; "
                           f"not found: {model_dir}")
    with zoo.quiet_loading():
        pipe = DiffusionPipeline.from_pretrained(model_dir, **zoo.dtype_kwarg(getattr(torch, DTYPES[dtype])),
                                                 use_safetensors=True, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
