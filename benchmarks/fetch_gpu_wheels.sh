#!/usr/bin/env bash
# Fetches the pure-Python wheels that the GPU machine lacks (diffusers and what it needs beyond
# that machine's packages) into .whl/, which gpu_check.sh installs from when present.
# Run here, before a device run that carries .whl (keep .whl out of git: .git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 importlib_metadata
ls -la .whl
