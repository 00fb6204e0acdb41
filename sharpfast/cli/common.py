"""What every `sharpfast` command shares: argument types, device and dtype choice, loading a
model offline, reading prompt files, checking output paths. Errors are sharpfast errors; the
entry point (sharpfast.cli.main) prints them as one line and exits 2."""
from __future__ import annotations

import os

from ..errors import BadArgument, MissingInput
from ..loading import device_dtype, load_model  # noqa: F401  (the commands import them from here)


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
