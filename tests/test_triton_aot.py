"""The Triton kernels compile for NVIDIA GPUs (sm_90, the H200 the project is measured on;
`python -m sharpfast.ops.triton_aot --arch 90,80` adds sm_80) in every variant their launchers can
produce, without spills: checked here without a GPU, because the interpreter CI runs the kernels
under does not check what the compiler checks (sharpfast.ops.triton_aot)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _aot(tmp_path, *args):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "sharpfast.ops.triton_aot", "--quiet", *args], capture_output=True,
                          text=True, env=env, timeout=900)


def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    res = _aot(tmp_path, "--arch", "90", "--json", str(tmp_path / "aot.json"))
    print(res.stdout)  # registers and shared memory per kernel, in the test log (-s / -rA)
    assert res.returncode == 0, f"AOT compile check failed:\n{res.stdout}\n{res.stderr[-4000:]}"
    rows = json.loads((tmp_path / "aot.json").read_text())["rows"]
    from sharpfast.ops import triton_aot

    kernels = {r["kernel"] for r in rows}
    assert kernels == set(triton_aot.SIGNATURES), kernels
    # every @triton.jit kernel of the module is covered: a new kernel must be added to the check
    import ast
    from pathlib import Path

    src = Path(triton_aot.__file__).with_name("_triton_kernels.py").read_text()
    launched = {
        n.name for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef) and n.name.endswith("_kernel")
    }
    assert launched == kernels, f"kernels not in the AOT check: {launched - kernels}"
    assert len(rows) == sum(1 for _ in triton_aot.variants())
    for r in rows:
        assert "error" not in r, r
        assert 0 < r["registers"] <= 255 and r["local"] == 0 and r["stack"] == 0, r


def test_aot_check_catches_a_non_constexpr_global(tmp_path, monkeypatch):
    """The check fails where compiled Triton fails: a plain int global read inside a kernel."""
    code = (
        "import sys, triton.language as tl\n"
        "import sharpfast.ops._triton_kernels as k\n"
        "k.WEYL = int(k.WEYL.value)  # the bug this check was written for\n"
        "from sharpfast.ops import triton_aot\n"
        "sys.exit(triton_aot.main(['--arch', '90', '--kernel', '_hutchinson_kernel', '--quiet']))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Cannot access global variable WEYL" in res.stdout + res.stderr


def test_aot_check_refuses_the_interpreter(monkeypatch):
    from sharpfast.ops import triton_aot

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_aot.run(archs=(90,), progress=False)
