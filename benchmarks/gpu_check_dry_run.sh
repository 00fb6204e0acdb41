#!/usr/bin/env bash
# Dry run of benchmarks/gpu_check.sh on this CPU machine, with the GPU image's versions: Python
# 3.12, torch 2.11.0, triton 3.6.0, transformers 5.17.0, numpy 2.x, plus the wheels that
# fetch_gpu_wheels.sh puts in .whl (diffusers), installed the way gpu_check.sh installs them.
# Everything gpu_check.sh does runs here except the GPU calls (SF_GPU_DRY_RUN=1: CPU, tiny
# sizes), so a setup failure shows here and not in the first minutes of a lent GPU.
#
#   bash benchmarks/gpu_check_dry_run.sh        # venv in build/gpu-dry-venv (kept for reruns)
#
# The first run downloads torch 2.11 (about 3 GB); later runs take a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SF_DRY_VENV:-$PWD/build/gpu-dry-venv}"
PYBASE="${PYTHON312:-$(ls -d /root/.pyenv/versions/3.12*/bin/python3.12 2> /dev/null | head -n 1)}"
[ -n "$PYBASE" ] || PYBASE=$(python3.12 -c "import sys; print(sys.executable)" 2> /dev/null || true)
[ -n "$PYBASE" ] || { echo "python3.12 not found (set PYTHON312)"; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYBASE" -m venv "$VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# the GPU image's versions (device/KINDS.md); --isolated: not this machine's local CPU wheel cache
"$VENV/bin/python" -m pip --isolated install -q "torch==2.11.0" "triton==3.6.0" "transformers==5.17.0" \
  "numpy>=2" "huggingface_hub>=1" safetensors accelerate scipy scikit-learn matplotlib pillow tqdm pyarrow \
  pytest pytest-benchmark setuptools wheel ninja pybind11 "prometheus-client" regex requests pyyaml filelock
[ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1 || bash benchmarks/fetch_gpu_wheels.sh
rm -rf /tmp/site  # gpu_check.sh installs .whl there, as on the GPU machine
# a copy of what the device tool sends (tracked and untracked-not-ignored files, and .whl): gpu_check.sh builds in place, and
# must not replace this checkout's own extension (built against another torch)
SRC="$PWD/build/gpu-dry-src"
OUTDIR="${OUT:-$PWD/build/gpu-dry-out}"
rm -rf "$SRC" && mkdir -p "$SRC"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$SRC"
cp -r .whl "$SRC/"
cd "$SRC"
PATH="$VENV/bin:$PATH" PYTHON="$VENV/bin/python" SF_GPU_DRY_RUN=1 OUT="$OUTDIR" bash benchmarks/gpu_check.sh
