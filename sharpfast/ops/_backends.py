"""Which implementations of the fused ops exist in this process, and which one to use.

Nothing here touches a device or imports triton at import time.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
from typing import Any

import torch

BACKENDS = ("torch", "cpp", "cuda", "triton")


def _load(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


# Loaded once at import (loading an extension touches no device), so that backend selection
# is plain attribute access that torch.compile traces without graph breaks.
_CPP = _load("sharpfast._C")
_CUDA = _load("sharpfast._C_cuda")
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def cpp_module() -> Any:
    """The compiled CPU extension, or None when it was not built."""
    return _CPP


def cuda_module() -> Any:
    """The compiled CUDA extension, or None when it was not built (CPU torch, no nvcc)."""
    return _CUDA


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_installed() -> bool:
    return _TRITON_INSTALLED


def available_backends() -> list[str]:
    """Backends usable in this process: "torch" always; "cpp" when the CPU extension is built;
    "cuda" when the CUDA extension is built and a GPU is visible; "triton" when triton is
    installed and either a GPU is visible or TRITON_INTERPRET=1 (CPU tensors)."""
    names = ["torch"]
    if cpp_module() is not None:
        names.append("cpp")
    gpu = torch.cuda.is_available()
    if gpu and cuda_module() is not None:
        names.append("cuda")
    if _triton_installed() and (gpu or triton_interpreted()):
        names.append("triton")
    return names


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for tensors on `device`; a clear error when it cannot run there."""
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            if cuda_module() is not None:
                return "cuda"
            return "triton" if _triton_installed() else "torch"
        if device.type == "cpu" and cpp_module() is not None:
            return "cpp"
        return "torch"
    if backend == "torch":
        return backend
    if backend == "cpp":
        if cpp_module() is None:
            raise RuntimeError("backend='cpp' is not available: the C++ extension sharpfast._C was not built "
                               "(reinstall with `pip install --no-build-isolation -e .` and SHARPFAST_BUILD_EXT unset)")
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors, got tensors on {device}")
        return backend
    if backend == "cuda":
        if cuda_module() is None:
            raise RuntimeError("backend='cuda' is not available: the CUDA extension sharpfast._C_cuda was not built "
                               "(it needs a CUDA build of torch and nvcc at install time)")
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' runs on CUDA tensors, got tensors on {device}")
        return backend
    # triton
    if not _triton_installed():
        raise RuntimeError("backend='triton' is not available: triton is not installed (pip install 'triton>=3.0')")
    if device.type == "cpu" and not triton_interpreted():
        raise ValueError("backend='triton' runs on CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 "
                         "before triton is first imported")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"backend='triton' runs on CUDA tensors, got tensors on {device}")
    return backend


class _CudaKernels:
    """Adapts the CUDA extension: makes the tensors' device current and passes its stream."""

    def __init__(self, ext) -> None:
        self._ext = ext

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self._ext, name)

        def call(*args: Any) -> Any:
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            with torch.cuda.device(device):
                return fn(*args, torch.cuda.current_stream(device).cuda_stream)

        return call


@functools.lru_cache(maxsize=1)
def _cuda_kernels() -> Any:
    return _CudaKernels(cuda_module())


def kernels(backend: str) -> Any:
    """The module-like object holding the native implementations of `backend`."""
    if backend == "cpp":
        return cpp_module()
    if backend == "cuda":
        return _cuda_kernels()
    if backend == "triton":
        from . import _triton_kernels

        return _triton_kernels
    raise ValueError(f"no native kernels for backend {backend!r}")


@contextlib.contextmanager
def poisoned_outputs():
    """Test hook: inside, native backends fill every output and workspace with NaN before their
    kernels run, so that an element a kernel forgets to write shows up as NaN."""
    targets = [m for m in (cpp_module(), cuda_module()) if m is not None]
    if _triton_installed() and (torch.cuda.is_available() or triton_interpreted()):
        from . import _triton_kernels

        targets.append(_triton_kernels)
    for m in targets:
        m.set_poison(True)
    try:
        yield
    finally:
        for m in targets:
            m.set_poison(False)
