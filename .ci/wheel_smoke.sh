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
# The wheel's Python package, data and entry points are what this checks; its native extension is
# built by .ci/setup and tested by the suite (test_build), so it is not compiled a second time here
# (two minutes on two cores): SHARPFAST_BUILD_EXT=0, the torch backends serve.
SHARPFAST_BUILD_EXT=0 .venv/bin/python -m pip wheel -q --no-build-isolation --no-deps -w "$W/dist" . >/dev/null
ls "$W"/dist/sharpfast-*.whl
# A fresh venv holding the wheel alone; its dependencies are the checkout venv's, reached through
# a path line in a .pth file (which adds that folder to sys.path but runs none of its own .pth
# files, so the editable install's finder stays out): installing torch and the rest again would
# cost minutes for no more evidence. `pip check` then holds the wheel's declared requirements to them.
"${PYTHON:-python3}" -m venv "$W/venv"
"$W/venv/bin/python" -m pip install -q --no-deps "$W"/dist/sharpfast-*.whl
SITE=$("$W/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
DEPS=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$DEPS" > "$SITE/zz_sharpfast_deps.pth"
if ! "$W/venv/bin/python" -m pip check > "$W/check.txt"; then
  if grep -i '^sharpfast ' "$W/check.txt"; then echo "wheel smoke: the wheel's requirements are not met"; exit 1; fi
fi
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
scenes = sharpfast.zoo.load("scenes")   # weights and the judge's classifier ship in the wheel
assert len(sharpfast.zoo.prompts("scenes")) > 100 and sharpfast.zoo.judge("scenes", scenes).references.shape[1] == 3
assert [len(sharpfast.data.prompt_set(n)) for n in sharpfast.data.PROMPT_SETS] == [500, 219, 500]
print("wheel smoke: detect, sail, guard, zoo OK from", os.path.dirname(sharpfast.__file__))
PY
START=$(date +%s%N)
"$W/venv/bin/sharpfast" detect --help >/dev/null
echo "wheel smoke: sharpfast detect --help in $(( ($(date +%s%N) - START) / 1000000 )) ms"
printf 'digit 3 on paper\na photo of a cat\n' > "$W/p.txt"
"$W/venv/bin/sharpfast" detect --model digits --prompts "$W/p.txt" --metrics wen --out "$W/d.jsonl" --quiet
[ "$(grep -c '"prompt"' "$W/d.jsonl")" = 2 ]  # two records (and the batch's commit line)
echo "wheel smoke: CLI OK"
