"""Ahead-of-time compile check of every Triton kernel for NVIDIA GPUs, on a machine without one.

    python -m sharpfast.ops.triton_aot                 # sm_90 and sm_80, every variant
    python -m sharpfast.ops.triton_aot --arch 90 --json report.json

The interpreter (TRITON_INTERPRET=1, how CI runs the Triton backend on CPU tensors) does not check
what the compiler checks (globals that are not constexpr, type errors in untaken branches,
register pressure), so a kernel can pass every CPU test and fail on its first GPU. This compiles
each ``@triton.jit`` kernel of ``_triton_kernels`` through ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` in every variant its launcher can produce:

- data dtypes fp32, fp16, bf16, fp64 (fp64 accumulates in fp64, the others in fp32);
- the integer arguments that compiled Triton specializes (B, K, nc): equal to 1 (a constant),
  divisible by 16, and neither;
- the ones it never specializes (D, key0: ``do_not_specialize``) typed i32 and i64 (key0 is a
  32-bit key, so i64 whenever it is >= 2**31; D when a row has 2**31 elements or more);
- CENTRAL on and off (perturb, hutchinson); pointers 16-byte aligned and not (views at an offset).

It fails on a compile error, on register spills or local memory, and prints registers and shared
memory per kernel. Registers come from ``cuobjdump --dump-resource-usage`` (shipped in the
triton wheel) on the cubin: no driver is needed. Must run with TRITON_INTERPRET unset or 0.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

DTYPES = {"fp32": "fp32", "fp16": "fp32", "bf16": "fp32", "fp64": "fp64"}  # data dtype -> accumulator
INT_VARIANTS = {"one": 1, "div16": 32, "plain": 17}  # how compiled Triton types B, K, nc
WIDTHS = ("i32", "i64")  # D and key0 (never specialized)


@dataclass(frozen=True)
class Variant:
    kernel: str
    dtype: str
    ints: str
    width: str
    central: bool | None
    aligned: bool

    @property
    def label(self) -> str:
        c = "" if self.central is None else (" central" if self.central else " forward")
        return (f"{self.kernel}[{self.dtype} ints={self.ints} D/key0={self.width}{c} "
                f"{'aligned' if self.aligned else 'unaligned'}]")


# per kernel: its parameters in order, each (name, kind): "data" pointer of the data dtype,
# "part" fp64 partial-sum pointer, "scale" fp64 pointer, "spec" a specialized int, "wide" a
# never-specialized int, "f32" a float argument, "central"/"acc"/"block" constexprs
SIGNATURES = {
    "_cfg_combine_kernel": [("u_ptr", "data"), ("c_ptr", "data"), ("g_ptr", "data"), ("part_ptr", "part"),
                            ("D", "wide"), ("nc", "spec"), ("w", "f32"), ("ACC", "acc"), ("BLOCK", "block")],
    "_sq_diff_kernel": [("u_ptr", "data"), ("c_ptr", "data"), ("part_ptr", "part"), ("D", "wide"),
                        ("nc", "spec"), ("ACC", "acc"), ("BLOCK", "block")],
    "_dod_kernel": [("u0_ptr", "data"), ("c0_ptr", "data"), ("u1_ptr", "data"), ("c1_ptr", "data"),
                    ("part_ptr", "part"), ("D", "wide"), ("nc", "spec"), ("ACC", "acc"), ("BLOCK", "block")],
    "_shift_kernel": [("x_ptr", "data"), ("u_ptr", "data"), ("c_ptr", "data"), ("scale_ptr", "part"),
                      ("out_ptr", "data"), ("D", "wide"), ("nc", "spec"), ("ACC", "acc"), ("BLOCK", "block")],
    "_perturb_kernel": [("x_ptr", "data"), ("out_ptr", "data"), ("B", "spec"), ("D", "wide"), ("K", "spec"),
                        ("nc", "spec"), ("h", "f32"), ("key0", "wide"), ("CENTRAL", "central"), ("ACC", "acc"),
                        ("BLOCK", "block")],
    "_hutchinson_kernel": [("y_ptr", "data"), ("y0_ptr", "data"), ("part_ptr", "part"), ("B", "spec"),
                           ("D", "wide"), ("K", "spec"), ("nc", "spec"), ("key0", "wide"), ("CENTRAL", "central"),
                           ("ACC", "acc"), ("BLOCK", "block")],
}


def variants(kernels=None):
    for name, params in SIGNATURES.items():
        if kernels and name not in kernels:
            continue
        has_central = any(kind == "central" for _, kind in params)
        for dtype, ints, width, central, aligned in itertools.product(
                DTYPES, INT_VARIANTS, WIDTHS, (True, False) if has_central else (None,), (True, False)):
            yield Variant(name, dtype, ints, width, central, aligned)


def source(v: Variant) -> Any:
    """The ASTSource of one variant, typed as the JIT would type the launcher's arguments."""
    import triton.language as tl
    from triton.compiler import ASTSource

    from . import _triton_kernels as k

    fn = getattr(k, v.kernel)
    sig, constexprs, attrs = {}, {}, {}
    aligned = [["tt.divisibility", 16]]
    for i, (name, kind) in enumerate(SIGNATURES[v.kernel]):
        if kind in ("data", "part"):
            sig[name] = "*" + (v.dtype if kind == "data" else "fp64")
            # partials are fresh allocations (always aligned); data may be a view at an offset
            if kind == "part" or v.aligned:
                attrs[(i,)] = aligned
        elif kind == "spec":
            value = INT_VARIANTS[v.ints]
            if value == 1:
                sig[name], constexprs[name] = "constexpr", 1
            else:
                sig[name] = "i32"
                if value % 16 == 0:
                    attrs[(i,)] = aligned
        elif kind == "wide":
            sig[name] = v.width
        elif kind == "f32":
            sig[name] = "fp32"
        else:
            sig[name] = "constexpr"
            constexprs[name] = {"central": v.central, "block": k.BLOCK,
                                "acc": tl.float64 if DTYPES[v.dtype] == "fp64" else tl.float32}[kind]
    return ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)


def _cuobjdump() -> str:
    import triton

    shipped = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    found = shipped if os.path.exists(shipped) else shutil.which("cuobjdump")
    if not found:
        raise RuntimeError("cuobjdump not found (neither in the triton wheel nor on PATH)")
    return found


_USAGE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


def resource_usage(cubin: bytes) -> dict:
    """{'REG', 'STACK', 'SHARED', 'LOCAL'} of the (single) kernel in a cubin, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        res = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True)
    finally:
        os.unlink(f.name)
    usage = {}
    for line in res.stdout.splitlines():
        if "REG:" in line:
            usage.update({k: int(v) for k, v in _USAGE.findall(line)})
    if "REG" not in usage:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{res.stdout}")
    return usage


def compile_one(v: Variant, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    row = {"variant": v.label, "kernel": v.kernel, "arch": arch}
    try:
        compiled = triton.compile(source(v), target=GPUTarget("cuda", arch, 32))
    except Exception as e:  # noqa: BLE001 - every compile error is reported, with its variant
        cause = e.__cause__ or e
        row["error"] = f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}"
        row["error_full"] = f"{type(e).__name__}: {e}"
        return row
    usage = resource_usage(compiled.asm["cubin"])
    row.update(registers=usage["REG"], local=usage.get("LOCAL", 0), stack=usage.get("STACK", 0),
               shared=int(getattr(compiled.metadata, "shared", usage.get("SHARED", 0))))
    if row["local"] or row["stack"]:
        row["error"] = f"register spills / local memory: local {row['local']} B, stack {row['stack']} B"
    return row


def run(archs=(90, 80), kernels=None, progress: bool = True) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the AOT check compiles for the GPU: run it with TRITON_INTERPRET unset or 0")
    todo = [(v, a) for a in archs for v in variants(kernels)]
    from tqdm.auto import tqdm

    return [compile_one(v, a) for v, a in tqdm(todo, desc="triton AOT", unit="variant", disable=not progress)]


def summary(rows: Any) -> str:
    """One line per (kernel, arch): variants compiled, registers min-max, shared memory max."""
    lines = []
    by: dict = {}
    for r in rows:
        by.setdefault((r["kernel"], r["arch"]), []).append(r)
    for (kernel, arch), rs in sorted(by.items()):
        ok = [r for r in rs if "error" not in r]
        regs = sorted({r["registers"] for r in ok})
        shared = max((r["shared"] for r in ok), default=0)
        reg = f"{regs[0]}-{regs[-1]}" if len(regs) > 1 else (str(regs[0]) if regs else "-")
        lines.append(f"{kernel:<22} sm_{arch}  {len(ok):>3}/{len(rs):<3} compiled  registers {reg:<7} "
                     f"shared {shared} B  local/stack 0" if len(ok) == len(rs) else
                     f"{kernel:<22} sm_{arch}  {len(ok):>3}/{len(rs):<3} compiled  FAILED: "
                     f"{next(r['error'] for r in rs if 'error' in r)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sharpfast.ops.triton_aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="90,80", help="compute capabilities, comma-separated (default: 90,80)")
    ap.add_argument("--kernel", action="append", help="only this kernel (repeatable)")
    ap.add_argument("--json", help="write every variant's row to this file")
    ap.add_argument("--quiet", action="store_true", help="no progress line")
    args = ap.parse_args(argv)
    import triton

    archs = [int(a) for a in args.arch.split(",") if a.strip()]
    rows = run(archs, args.kernel, progress=not args.quiet)
    print(f"triton {triton.__version__}: {len(rows)} kernel variants for sm_{', sm_'.join(map(str, archs))}")
    print(summary(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"triton": triton.__version__, "rows": [{k: v for k, v in r.items() if k != "error_full"}
                                                             for r in rows]}, f, indent=1)
    bad = [r for r in rows if "error" in r]
    for r in bad[:5]:
        print(f"\nFAILED {r['variant']} sm_{r['arch']}:\n{r.get('error_full', r['error'])}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
