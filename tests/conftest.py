import os

import torch

# The Triton backend runs on CPU tensors only under the interpreter, which must be chosen before
# triton is first imported (conftest is loaded before any test module; importing torch does not
# import triton). On a GPU machine the compiled kernels are what must be tested: no interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# under pytest-xdist (-n 2, as CI runs) each worker gets one thread: on two cores, two processes
# with torch's default two threads each were measured far slower than one thread each
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # and the subprocesses a test starts
    torch.set_num_threads(1)

# threshold="auto" calibrates a model it has no file for on the built-in captions: the tests (and
# the subprocesses they start) take the quick set of 64 (the same code path, a fifth of the cost);
# the tests of the full set ask for it (SHARPFAST_CALIBRATION=full), as does the wheel smoke test
os.environ.setdefault("SHARPFAST_CALIBRATION", "quick")

# threshold="auto" caches calibrations per user (~/.cache/sharpfast): the tests use a folder of
# their own, so they neither read a developer's cache nor leave files in it
if "SHARPFAST_CACHE" not in os.environ:
    import tempfile

    os.environ["SHARPFAST_CACHE"] = tempfile.mkdtemp(prefix="sharpfast-test-cache-")

from sharpfast.ops import _backends, available_backends  # noqa: E402

NATIVE_CPU = [b for b in available_backends() if b in ("cpp", "triton")]
ALL_CPU = ["torch"] + NATIVE_CPU
# the C++ kernels are run in both of their compiled copies where the CPU has AVX2
_ext = _backends.cpp_module()
CPP_ISAS = ["avx2", "baseline"] if _ext is not None and _ext.set_cpu_isa("auto") and _ext.cpu_isa() == "avx2" else []
NATIVE_PARAMS = [b for b in NATIVE_CPU if b != "cpp"] + [f"cpp:{isa}" for isa in CPP_ISAS or ["auto"]
                                                          if "cpp" in NATIVE_CPU]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# awkward sizes: a single element, odd row lengths, rows just over a kernel block / chunk
SHAPES = [(1, 1), (3, 4, 5, 7), (2, 1025), (5, 4097), (2, 4, 33, 31)]


@pytest.fixture(params=NATIVE_PARAMS)
def native(request):
    """A native CPU backend name; "cpp:ISA" runs the C++ backend on that instruction-set copy."""
    name, _, isa = request.param.partition(":")
    if name == "cpp":
        assert _ext.set_cpu_isa(isa)
        yield "cpp"
        _ext.set_cpu_isa("auto")
    else:
        yield name


@pytest.fixture(params=ALL_CPU)
def backend(request):
    return request.param


def randn(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def pipe(request):
    """A tiny random-weight pipeline of each kind: SD 1.x epsilon, SD 2.x v-prediction, SDXL."""
    from sharpfast.testing import tiny_pipeline

    p = tiny_pipeline(request.param)
    p.set_progress_bar_config(disable=True)
    return p


# The longest tests (measured with --durations) go to the workers first: xdist hands tests out in
# collection order, and a two-minute test collected last runs alone while the other worker idles.
SLOW_FIRST = ("test_ray.py", "test_triton_aot.py::test_every_triton_kernel_compiles",
              "test_build.py::test_cuda_binding",
              "test_harness.py::test_eval_mitigate_runs_every_baseline", "test_harness.py::test_demo",
              "test_flow.py::test_sail_guard_and_scan_with_no_setup", "test_detect.py::test_hessian_spectrum",
              "test_harness.py::test_sail_cli", "test_build.py::test_cmake_build", "test_harness.py::test_eval_guard",
              "test_digits_data.py::test_pretraining", "test_readme.py", "test_server_limits.py",
              "test_calibration_files.py")


def pytest_collection_modifyitems(config, items):
    rank = {item: next((i for i, key in enumerate(SLOW_FIRST) if key in item.nodeid), len(SLOW_FIRST))
            for item in items}
    items.sort(key=lambda item: rank[item])  # stable: the rest keep their order
