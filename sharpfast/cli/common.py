"""What every `sharpfast` command shares: argument types, device and dtype choice, loading a
model offline, reading prompt files, checking output paths. Errors are sharpfast errors; the
entry point (sharpfast.cli.main) prints them as one line and exits 2."""
from __future__ import annotations

import os

from ..errors import BadArgument, MissingInput
from .options import DTYPES


def device_dtype(device: str, dtype: str):
    """'auto' device: cuda if available, else cpu; 'auto' dtype: fp16 on cuda, fp32 on cpu."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    return device, dtype


def read_lines(path: str, what: str) -> list[str]:
    if not os.path.isfile(path):
        raise MissingInput(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError as err:
        raise BadArgument(f"{what} file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    while lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise BadArgument(f"{what} file is empty: {path}")
    return lines


def load_model(model: str, device: str, dtype: str):
    """'digits' or 'scenes' (the bundled models) or a local diffusers model directory, safetensors only, offline,
    its progress bar off (the commands show their own)."""
    import torch
    from diffusers import DiffusionPipeline

    from .. import zoo

    model_dir = zoo.resolve(model)
    if not os.path.isdir(model_dir):
        raise MissingInput(f"--model must be 'digits', 'scenes' or a local diffusers model directory; "
                           f"not found: {model_dir}")
    with zoo.quiet_loading():
        pipe = DiffusionPipeline.from_pretrained(model_dir, **zoo.dtype_kwarg(getattr(torch, DTYPES[dtype])),
                                                 use_safetensors=True, local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_output(path: str) -> None:
    """The output file's folder exists and takes a file (probed by writing one: permission bits say
    nothing for root, a read-only mount does), checked before any model is loaded."""
    import tempfile

    d = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(d):
        raise MissingInput(f"the folder of --out does not exist: {d}")
    try:
        with tempfile.NamedTemporaryFile(dir=d, prefix=".sharpfast-probe-"):
            pass
    except OSError as err:
        raise BadArgument(f"cannot write --out {path}: {err.strerror}") from None


def check_output_dir(path: str) -> None:
    """An output folder that exists or can be made, and takes files (checked before any model
    loads: a read-only or missing location is one clear error, not a traceback after scoring)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        raise BadArgument(f"cannot create the output folder {path}: {err.strerror}") from None
    check_output(os.path.join(path, "probe"))
