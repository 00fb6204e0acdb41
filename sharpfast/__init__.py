"""sharpfast: find and prevent memorization in text-to-image diffusion models from the
sharpness of the learned density (Jeon, Kim and No, ICML 2025), with fused kernels.

Importing sharpfast imports no torch (`sharpfast --help` answers at once): every name below is
loaded on first use, and diffusers only when a pipeline function is used.
"""
from typing import Any

try:  # the one version source is pyproject.toml; the installed metadata carries it
    from importlib.metadata import PackageNotFoundError as _NotFound
    from importlib.metadata import version as _version

    __version__ = _version("sharpfast")
except _NotFound:  # a bare checkout on sys.path, not installed
    __version__ = "0+unknown"

_LAZY = {
    "detect": ("detection", "detect"),
    "hessian_spectrum": ("spectrum", "hessian_spectrum"),
    "evaluate": ("roc", "evaluate"),
    "calibrate": ("roc", "calibrate"),
    "calibrate_model": ("calibration", "calibrate_model"),
    "DetectionResult": ("results", "DetectionResult"),
    "sail": ("mitigations.sail", "sail"),
    "mitigate": ("mitigations", "mitigate"),
    "guard": ("guarding", "guard"),
    "Policy": ("guarding", "Policy"),
    "scan": ("scanning", "scan"),
}


_SUBMODULES = (
    "ops",
    "zoo",
    "errors",
    "testing",
    "calibration",
    "server",
    "monitoring",
    "mitigations",
    "data",
    "settings",
)  # sharpfast.zoo.load(...) works after a plain `import sharpfast`


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'sharpfast' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY, *_SUBMODULES]
