#!/usr/bin/env bash
# The one command for a lent GPU (the device tool runs it in the repository root):
#   1. builds the C++ and CUDA extensions in place (sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise),
#   2. runs the kernel tests of the cuda and triton backends on the GPU against float64 references,
#   3. prints a table of timings: us per call, GB/s, and the fraction of a device-to-device copy
#      of the same bytes (CUDA graphs + CUDA events, median);
#   4. times detection (UNet calls, ms per prompt, ratio to one CFG call) on an SD 1.5-sized UNet
#      with random weights in fp16, and compares fd sharpness with the exact JVP;
#   5. times the serving guard and SAIL against plain 50-step generation (bench_sail.py --sd15);
#   6. times scan throughput at batch 8 and 32 next to the bare UNet forwards (bench_scan.py --sd15).
# diffusers is not on the GPU machine: run benchmarks/fetch_gpu_wheels.sh here first and carry .whl.
# Finishes in well under 8 minutes on an H100/H200. Results also land in $OUT when set.
#
# SF_GPU_DRY_RUN=1 runs every step on the CPU with tiny sizes (benchmarks/gpu_check_dry_run.sh
# does so in a venv with the GPU image's versions): the same script, so that it cannot fail on
# setup where the GPU time is spent. Only the GPU calls themselves are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
out="${OUT:-/tmp/sharpfast-gpu}"
mkdir -p "$out"
py="${PYTHON:-python3}"
DRY="${SF_GPU_DRY_RUN:-0}"
if [ "$DRY" = 1 ]; then
  echo "DRY RUN on the CPU: tiny sizes, no GPU calls"
  dev=cpu; dt=float32
  small_detect=(--sample-size 8 --batches 1,2)
  small_sail=(--sample-size 8 --steps 2 --batch 1 --reps 1)
  small_scan=(--sample-size 8 --batches 2 --count 4)
  small_bench=(--sizes sd15 --dtypes float32)
else
  dev=cuda; dt=float16
  small_detect=(); small_sail=(); small_scan=(); small_bench=()
fi
# sharpfast is built in place, not installed: the benchmark scripts import it from here
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$py -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
if ! $py -c "import diffusers, transformers; print('diffusers', diffusers.__version__, 'transformers', transformers.__version__)"; then
  echo "diffusers/transformers do not import: the benchmarks below will be skipped (carry .whl)"
  [ "$DRY" != 1 ] || exit 1
fi

echo "== build (in place)"
# torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script (/usr/local/bin/nvcc) makes it
# guess /usr/local, where libcudart is not: take the toolkit that holds both nvcc and libcudart
if [ -z "${CUDA_HOME:-}" ]; then
  nv=$(command -v nvcc || true)
  for d in /usr/local/cuda ${nv:+"$(dirname "$(dirname "$(readlink -f "$nv")")")"}; do
    if [ -x "$d/bin/nvcc" ] && ls "$d"/lib64/libcudart.so* "$d"/lib/libcudart.so* > /dev/null 2>&1; then
      export CUDA_HOME="$d"; break
    fi
  done
fi
echo "CUDA_HOME=${CUDA_HOME:-unset}"
start=$SECONDS
# MAX_JOBS parallelizes inside each extension; `build_ext -j` would build the two extensions at
# once into one build folder, and their ninja files race (seen: the CUDA objects were never built)
MAX_JOBS=16 $py setup.py -q build_ext --inplace > "$out/build.log" 2>&1 || { tail -n 40 "$out/build.log"; exit 1; }
echo "built in $((SECONDS - start)) s"
if [ "$DRY" = 1 ]; then
  $py -c "from sharpfast.ops import available_backends as a; b = a(); print('backends:', b); assert 'cpp' in b"
  $py -c "import sharpfast._C_cuda as m; print('CUDA extension built and imports (no GPU here):', m.__file__)"
else
  $py -c "from sharpfast.ops import available_backends as a; b = a(); print('backends:', b); assert {'cuda', 'triton'} <= set(b)"
fi

echo "== kernel tests on the GPU"
# exit 5 (every test skipped for want of a GPU) is a pass only in the dry run
set +e
$py -m pytest -q -p no:cacheprovider tests/test_ops_gpu.py 2>&1 | tee "$out/tests.log" | tail -n 25
rc=${PIPESTATUS[0]}
set -e
[ "$rc" -eq 0 ] || { [ "$DRY" = 1 ] && grep -q "skipped" "$out/tests.log"; } || exit 1

# every benchmark runs even when one misses its target (GPU time is scarce); the script fails at
# the end if any missed (the benchmarks exit 1 on a missed target, on a GPU only)
missed=()
echo "== timings of the fused ops"
$py benchmarks/gpu_bench.py --device "$dev" "${small_bench[@]}" "$@" | tee "$out/gpu_bench.txt" || missed+=(gpu_bench)

echo "== detection on an SD 1.5-sized UNet (fp16)"
if $py -c "import diffusers" 2> /dev/null; then
  $py benchmarks/bench_detect.py --sd15 --device "$dev" --dtype "$dt" --batches 1,8 "${small_detect[@]}" 2>&1 \
    | grep -v "should be kept in float32" | tee "$out/bench_detect.txt" || missed+=(bench_detect)
else
  echo "SKIPPED: diffusers is not installed here (run benchmarks/fetch_gpu_wheels.sh and carry .whl)"
fi

echo "== SAIL and guard latency on an SD 1.5-sized UNet (fp16)"
if $py -c "import diffusers" 2> /dev/null; then
  $py benchmarks/bench_sail.py --sd15 --device "$dev" --dtype "$dt" --batch 4 --reps 3 "${small_sail[@]}" 2>&1 \
    | grep -v "should be kept in float32" | tee "$out/bench_sail.txt" || missed+=(bench_sail)
else
  echo "SKIPPED: diffusers is not installed here"
fi

echo "== scan throughput on an SD 1.5-sized UNet (fp16), next to the bare UNet forwards"
if $py -c "import diffusers" 2> /dev/null; then
  $py benchmarks/bench_scan.py --sd15 --device "$dev" --dtype "$dt" --batches 8,32 --processes "" --count 128 \
    "${small_scan[@]}" 2>&1 \
    | grep -v "should be kept in float32" | tee "$out/bench_scan.txt" || missed+=(bench_scan)
else
  echo "SKIPPED: diffusers is not installed here"
fi
echo "== gpu_check: done in $SECONDS s"
if [ ${#missed[@]} -gt 0 ]; then
  echo "gpu_check: targets missed or failed in: ${missed[*]}"
  exit 1
fi
