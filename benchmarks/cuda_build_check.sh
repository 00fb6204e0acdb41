#!/usr/bin/env bash
# Builds sharpfast's CUDA extension for the H100/H200 (sm_90) on a machine WITHOUT a GPU, the way
# the GPU machine will, and checks what came out. Not part of the default CI: the first run
# downloads about 5 GB (a CUDA build of torch and the CUDA toolkit wheels). Run it whenever csrc/
# or kernels/ change:
#
#   bash benchmarks/cuda_build_check.sh            # venv in build/cuda-venv (kept for reruns)
#   SF_CUDA_VENV=/some/dir bash benchmarks/cuda_build_check.sh
#
# Steps: (1) a venv with torch==2.13.0 built for CUDA 13.0 (pip --isolated, so a local CPU-only
# wheel cache is not used) and nvcc + CCCL from the cuda-toolkit 13.0.3 wheels; (2) CUDA_HOME set
# to that toolkit (torch would otherwise guess a system path) plus the two links the wheel lacks;
# (3) setup.py build_ext for sm_90 with every warning on, failing on any warning from sharpfast's
# own files; (4) cuobjdump: the .so holds sm_90 SASS for every kernel; (5) `import
# sharpfast._C_cuda` without a GPU; (6) the CMake build against the same toolkit. Prints a
# summary line per step and the total time; exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV="${SF_CUDA_VENV:-$ROOT/build/cuda-venv}"
WORK="$ROOT/build/cuda-check"
PY_BASE="${PYTHON:-python3}"
start=$SECONDS
step() { echo "== [$((SECONDS - start)) s] $*"; }
rm -rf "$WORK" && mkdir -p "$WORK"

step "1/6 venv with CUDA torch and the toolkit wheels: $VENV"
[ -x "$VENV/bin/python" ] || "$PY_BASE" -m venv "$VENV"
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$PY" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2> /dev/null; then
  "$PY" -m pip --isolated install -q "torch==2.13.0"
fi
"$PY" -m pip --isolated install -q "cuda-toolkit[nvcc,cccl]==13.0.3" "setuptools>=64" wheel ninja pybind11 numpy
"$PY" -c "import torch; assert torch.version.cuda, 'torch is a CPU build'; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

step "2/6 CUDA_HOME from the toolkit wheel"
NVCC=$(find "$VENV" -path '*/bin/nvcc' -type f | head -n 1)
[ -n "$NVCC" ] || { echo "nvcc not found in the toolkit wheels"; exit 1; }
export CUDA_HOME
CUDA_HOME=$(dirname "$(dirname "$NVCC")")
[ -e "$CUDA_HOME/lib64" ] || ln -s lib "$CUDA_HOME/lib64"
if [ ! -e "$CUDA_HOME/lib/libcudart.so" ]; then
  so=$(ls "$CUDA_HOME"/lib/libcudart.so.* 2> /dev/null | head -n 1 || true)
  [ -n "$so" ] || so=$(find "$VENV" -name 'libcudart.so.*' | head -n 1)
  [ -n "$so" ] || { echo "libcudart.so.* not found"; exit 1; }
  ln -sf "$so" "$CUDA_HOME/lib/libcudart.so"
fi
export PATH="$CUDA_HOME/bin:$PATH"
echo "CUDA_HOME=$CUDA_HOME"
"$NVCC" --version | tail -n 1

step "3/6 setup.py build_ext (sm_90, -Wall -Wextra, nvcc warnings on)"
# a copy of the sources, so the checkout's own in-place (CPU) build is not replaced
SRC="$WORK/src"
mkdir -p "$SRC"
cp -r setup.py pyproject.toml README.md csrc kernels sharpfast "$SRC"/
find "$SRC" -name '*.so' -delete
(
  cd "$SRC"
  TORCH_CUDA_ARCH_LIST=9.0 SHARPFAST_WARNINGS=all MAX_JOBS=2 "$PY" setup.py build_ext --inplace > "$WORK/build.log" 2>&1
) || { tail -n 60 "$WORK/build.log"; echo "BUILD FAILED (log: $WORK/build.log)"; exit 1; }
# warnings from sharpfast's own sources (torch's headers are included with -isystem by torch and
# are not ours to fix)
own_warnings=$(grep -E "^($SRC/)?(csrc|kernels)/[^ :]+:[0-9]+(:[0-9]+)?: warning|^($SRC/)?(csrc|kernels)/[^ ]+\([0-9]+\): warning" \
  "$WORK/build.log" | sort -u || true)
if [ -n "$own_warnings" ]; then
  echo "$own_warnings"
  echo "WARNINGS in sharpfast's sources: $(echo "$own_warnings" | wc -l)"
  exit 1
fi
other=$(grep -c ": warning" "$WORK/build.log" || true)
echo "built; warnings in sharpfast's sources: none (warnings inside torch's own headers: $other)"

step "4/6 cuobjdump: sm_90 SASS inside _C_cuda"
SO=$(ls "$SRC"/sharpfast/_C_cuda*.so)
CUOBJDUMP="$CUDA_HOME/bin/cuobjdump"
# the toolkit wheels have no cuobjdump; the triton wheel that CUDA torch brings ships one
[ -x "$CUOBJDUMP" ] || CUOBJDUMP=$(find "$VENV" -path '*/triton/backends/nvidia/bin/cuobjdump' | head -n 1)
[ -n "$CUOBJDUMP" ] || CUOBJDUMP=$(command -v cuobjdump || true)
[ -n "$CUOBJDUMP" ] || { echo "cuobjdump not found"; exit 1; }
"$CUOBJDUMP" --list-elf "$SO" | tee "$WORK/elf.txt"
grep -q "sm_90" "$WORK/elf.txt" || { echo "no sm_90 ELF in $SO"; exit 1; }
"$CUOBJDUMP" -sass "$SO" | grep -E "Function :" | sed 's/^[[:space:]]*//' | sort -u > "$WORK/functions.txt"
echo "kernels with SASS: $(wc -l < "$WORK/functions.txt")"
for k in CfgOp SqDiffOp DodOp shift_kernel perturb_kernel hutchinson_kernel finish_kernel; do
  grep -q "$k" "$WORK/functions.txt" || { echo "no SASS for a $k kernel"; cat "$WORK/functions.txt"; exit 1; }
done

step "5/6 import sharpfast._C_cuda without a GPU"
(cd "$SRC" && "$PY" -c "
import torch, sharpfast._C_cuda as m
print('imported', m.__file__, '| ops:', ', '.join(sorted(n for n in dir(m) if not n.startswith('_'))))
print('cuda available here:', torch.cuda.is_available())
")

step "6/6 CMake build against the same toolkit"
cmake -S "$ROOT" -B "$WORK/cmake" -DCMAKE_CUDA_COMPILER="$NVCC" -DCMAKE_CUDA_ARCHITECTURES=90 > "$WORK/cmake.log" 2>&1 \
  && cmake --build "$WORK/cmake" -j2 >> "$WORK/cmake.log" 2>&1 \
  || { tail -n 40 "$WORK/cmake.log"; echo "CMAKE FAILED"; exit 1; }
test -f "$WORK/cmake/libsharpfast_cuda.a" || { echo "libsharpfast_cuda.a missing"; exit 1; }
cm_warn=$(grep -E "warning" "$WORK/cmake.log" | sort -u || true)
[ -z "$cm_warn" ] || { echo "$cm_warn"; echo "CMAKE WARNINGS"; exit 1; }
echo "cmake: libsharpfast_cpu.a and libsharpfast_cuda.a built, no warnings"

step "cuda_build_check: OK in $((SECONDS - start)) s (warnings: none)"
