#!/usr/bin/env bash
# The package as a user gets it: build a real wheel (not the editable install), install it into a
# fresh venv and use it from outside the checkout: detect + sail + guard on a tiny pipeline with no
# calibration (threshold="auto" needs the built-in captions, package data of the wheel), the
# bundled digits model, the CLI. Called by .ci/run after the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
W=$(mktemp -d /tmp/sharpfast-wheel.XXXXXX)
trap 'rm -rf "$W"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "wheel smoke: building the wheel..."
# in-tree build with the checkout's torch: the extension's objects from .ci/setup are reused
.venv/bin/python -m pip wheel -q --no-build-isolation --no-deps -w "$W/dist" . >/dev/null
ls "$W"/dist/sharpfast-*.whl
"${PYTHON:-python3}" -m venv "$W/venv"
"$W/venv/bin/python" -m pip install -q "torch==2.13.0"
"$W/venv/bin/python" -m pip install -q "$W"/dist/sharpfast-*.whl
cd "$W"  # outside the checkout: the installed package only
SHARPFAST_CACHE="$W/cache" "$W/venv/bin/python" - "$ROOT" <<'PY'
import os, sys, torch
import sharpfast
root = sys.argv[1]
assert not sharpfast.__file__.startswith(root), f"imported the checkout, not the wheel: {sharpfast.__file__}"
from sharpfast.testing import tiny_pipeline
pipe = tiny_pipeline("sd1")
pipe.set_progress_bar_config(disable=True)
kw = dict(num_inference_steps=3, output_type="pt")
res = sharpfast.detect(pipe, ["a red house", "two dogs"], num_inference_steps=3, progress=False)
assert res.scores["sharpness"].shape == (2,)
out, info = sharpfast.sail(pipe, "a red house", return_info=True, generator=torch.Generator().manual_seed(0), **kw)
assert "built-in generic captions" in info["threshold_source"], info["threshold_source"]
with sharpfast.guard(pipe) as g:
    rep = g("a red house", generator=torch.Generator().manual_seed(0), **kw).memorization
assert rep[0]["metric"] and g.threshold_source
digits = sharpfast.zoo.load("digits")
assert len(sharpfast.zoo.prompts("digits")) > 100
print("wheel smoke: detect, sail, guard, zoo OK from", os.path.dirname(sharpfast.__file__))
PY
"$W/venv/bin/sharpfast" --help >/dev/null
printf 'digit 3 on paper\na photo of a cat\n' > "$W/p.txt"
"$W/venv/bin/sharpfast" detect --model digits --prompts "$W/p.txt" --metrics wen --out "$W/d.jsonl" --quiet
[ "$(grep -c '"prompt"' "$W/d.jsonl")" = 2 ]  # two records (and the batch's commit line)
echo "wheel smoke: CLI OK"
