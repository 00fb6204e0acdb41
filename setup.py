"""Build script for sharpfast's native code.

- ``sharpfast._C``: the CPU kernels (csrc/, torch's C++ standard + OpenMP), always built.
- ``SHARPFAST_WARNINGS=all`` turns on -Wall -Wextra (and nvcc's warnings as errors), as
  benchmarks/cuda_build_check.sh does.
- ``sharpfast._C_cuda``: the CUDA kernels (kernels/*.cu) and their torch binding, built when
  torch has CUDA and nvcc is found. TORCH_CUDA_ARCH_LIST selects the GPUs (default below,
  sm_90 for H100/H200 among them).
- ``SHARPFAST_BUILD_EXT=0`` skips all native code: the package then runs on its torch (and
  Triton) backends alone.

Build without isolation so the extension links against the torch you run with:
``pip install --no-build-isolation -e .``
"""
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0"


def _want_native():
    return os.environ.get("SHARPFAST_BUILD_EXT", "1") != "0"


def _extensions():
    if not _want_native():
        print("sharpfast: SHARPFAST_BUILD_EXT=0, building no native code", file=sys.stderr)
        return [], {}
    from torch.utils import cpp_extension as ce

    # the C++ standard is torch's own default (C++20 since torch 2.10): its headers are written for it
    warn = ["-Wall", "-Wextra"] if os.environ.get("SHARPFAST_WARNINGS") == "all" else []
    cxx = ["-O3", "-fopenmp", *warn]
    exts = [
        ce.CppExtension(
            "sharpfast._C",
            ["csrc/bindings.cpp", "csrc/cpu_kernels.cpp", "csrc/cpu_kernels_avx2.cpp"],
            include_dirs=[os.path.join(ROOT, "kernels")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]
    import torch

    if torch.version.cuda is not None and ce.CUDA_HOME is not None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        exts.append(
            ce.CUDAExtension(
                "sharpfast._C_cuda",
                ["csrc/cuda_bindings.cpp", "kernels/sharpfast_kernels.cu"],
                include_dirs=[os.path.join(ROOT, "kernels")],
                extra_compile_args={"cxx": ["-O3", *warn],
                                    "nvcc": ["-O3", "-lineinfo", *(["-Xcompiler", "-Wall,-Wextra", "--Werror",
                                                                     "all-warnings"] if warn else [])]},
            )
        )
    else:
        why = "torch is a CPU build" if torch.version.cuda is None else "nvcc (CUDA_HOME) was not found"
        print(f"sharpfast: skipping the CUDA extension: {why}", file=sys.stderr)
    return exts, {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
