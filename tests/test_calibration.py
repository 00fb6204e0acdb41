"""Calibration as a product: calibrate_model's thresholds are the quantiles of normal prompts'
scores, the file records the weights and is refused for others, threshold="auto" finds it beside
the model, then in the per-user cache, else calibrates once on the built-in captions; sail, guard
and scan work with no setup on a model with no calibration, and say where their levels came from."""
import os

import numpy as np
import pytest
import torch

import sharpfast
from sharpfast import calibration
from sharpfast.errors import BadArgument, OutputMismatch
from sharpfast.testing import tiny_pipeline


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARPFAST_CACHE", str(tmp_path / "cache"))
    calibration.store._MEMO.clear()
    yield tmp_path / "cache" / "calibration"
    calibration.store._MEMO.clear()


def test_generic_prompts_are_many_distinct_and_not_benchmark_prompts():
    prompts = calibration.generic_prompts()
    assert len(prompts) >= 300 and len({p.lower() for p in prompts}) == len(prompts)
    shared = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "prompts")
    if os.path.isdir(shared):
        bench = set()
        for name in os.listdir(shared):
            with open(os.path.join(shared, name), encoding="utf-8", errors="replace") as f:
                bench.update(line.strip().lower() for line in f)
        assert not {p.lower() for p in prompts} & bench


def test_thresholds_are_quantiles_of_the_normal_scores(cache):
    """Written independently of sharpfast.calibrate: the threshold is the sorted normal score at
    index ceil((1 - fpr)(N - 1)) (so it flags at most fpr of them), the target the one at
    ceil(0.1 (N - 1)) (90% of them at or above it)."""
    import math

    pipe = tiny_pipeline("sd1")
    prompts = [f"a photo of object number {i}" for i in range(40)]
    cal = calibration.calibrate_model(pipe, prompts, fpr=0.05, num_inference_steps=10, progress=False)
    det = sharpfast.detect(pipe, prompts, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                           progress=False)
    for m in ("wen", "sharpness"):
        s = np.sort(det.scores[m].numpy())
        assert cal[m]["threshold"] == pytest.approx(float(s[math.ceil(0.95 * 39)]), rel=1e-6)
        assert (s > cal[m]["threshold"]).mean() <= 0.05
    s = np.sort(det.scores["sharpness"].numpy())
    assert cal["sharpness"]["target"] == pytest.approx(float(s[math.ceil(0.1 * 39)]), rel=1e-6)
    assert cal["weights"] == calibration.weights_fingerprint(pipe)
    assert cal["settings"]["num_inference_steps"] == 10 and cal["prompts"]["count"] == 40
    # what it cost: 5 batches of 8, one CFG call each for wen, one more each for sharpness and wen_low
    assert cal["unet_calls"] == 5 * 3 and cal["unet_rows"] == 5 * 3 * 16
    with pytest.raises(BadArgument, match="at least 20"):
        calibration.calibrate_model(pipe, prompts[:5], progress=False)
    with pytest.raises(BadArgument, match="fpr"):
        calibration.calibrate_model(pipe, prompts, fpr=float("nan"), progress=False)


def test_fingerprint_tells_weights_apart_but_not_precision():
    a, b = tiny_pipeline("sd1"), tiny_pipeline("sd1")
    fa = calibration.weights_fingerprint(a)
    assert calibration.weights_fingerprint(b) == fa  # same seed, same weights
    with torch.no_grad():
        b.unet.conv_out.bias.add_(1e-3)  # a fine-tune touching one tensor
    fb = calibration.weights_fingerprint(b)
    assert fb["fingerprint"] != fa["fingerprint"] and not calibration.same_weights(fa, fb)
    half = tiny_pipeline("sd1")
    half.unet.half()
    half.text_encoder.half()
    fh = calibration.weights_fingerprint(half)
    assert fh["fingerprint"] != fa["fingerprint"] and calibration.same_weights(fa, fh)
    b.unet.half()
    b.text_encoder.half()
    assert not calibration.same_weights(fa, calibration.weights_fingerprint(b))


def test_auto_calibrates_once_caches_and_refuses_other_weights(cache, caplog, monkeypatch):
    monkeypatch.setenv("SHARPFAST_CALIBRATION", "full")  # the full built-in set (the suite's default is quick)
    pipe = tiny_pipeline("sd1")
    with caplog.at_level("WARNING", logger="sharpfast.calibration"):
        first = calibration.resolve(pipe, "wen", num_inference_steps=10, progress=False)
    assert "calibrating once on 320 built-in generic captions" in caplog.text
    assert first.source.startswith("calibrated now") and os.listdir(cache)
    calibration.store._MEMO.clear()  # a new process: read from the cache, not recomputed
    again = calibration.resolve(pipe, "wen", num_inference_steps=10, progress=False)
    assert again.value == first.value and again.source.startswith("cache ")
    target = calibration.resolve(pipe, "sharpness", "target", num_inference_steps=10, progress=False)
    assert target.source.startswith("cache ")  # calibrated together with wen
    # another setting is another calibration
    other = calibration.resolve(pipe, "wen", num_inference_steps=20, progress=False)
    assert other.source.startswith("calibrated now") and len(os.listdir(cache)) == 2
    # a file for other weights is refused
    (path,) = [os.path.join(cache, f) for f in os.listdir(cache) if first.source.endswith(f)]
    other_pipe = tiny_pipeline("sd1")
    with torch.no_grad():
        other_pipe.unet.conv_out.bias.add_(0.1)
    with pytest.raises(OutputMismatch, match="other weights"):
        calibration.load(path, other_pipe)
    with pytest.raises(sharpfast.errors.MissingCalibration):
        calibration.resolve(other_pipe, "wen", num_inference_steps=10, calibrate=False)


def test_beside_the_model_first_and_ignored_for_other_weights(cache, tmp_path):
    pipe = tiny_pipeline("sd1")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    pipe.register_to_config(_name_or_path=str(model_dir))
    cal = calibration.calibrate_model(pipe, [f"caption {i}" for i in range(30)], num_inference_steps=10,
                                      progress=False)
    cal["wen"]["threshold"] = 123.0  # recognizable
    calibration.save(cal, str(model_dir / "calibration.json"))
    got = calibration.resolve(pipe, "wen", num_inference_steps=10, progress=False)
    assert got.value == 123.0 and got.source == str(model_dir / "calibration.json")
    # settings it was not made with: not used
    assert calibration.resolve(pipe, "wen", num_inference_steps=20, progress=False).value != 123.0
    with torch.no_grad():
        pipe.unet.conv_out.bias.add_(0.1)  # the weights changed under the same directory
    assert calibration.resolve(pipe, "wen", num_inference_steps=10, progress=False).value != 123.0


def test_unwritable_cache_still_works(cache, tmp_path, monkeypatch):
    """A cache that cannot be written (here a path under a regular file, which fails for root as
    well as for a user, like a read-only home): the calibration is kept for the process and the
    source says it was not cached."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("SHARPFAST_CACHE", str(blocker / "sub"))
    got = calibration.resolve(tiny_pipeline("sd1"), "wen", num_inference_steps=10, progress=False)
    assert "not cached" in got.source and np.isfinite(got.value)
    again = calibration.resolve(tiny_pipeline("sd1"), "wen", num_inference_steps=10, progress=False)
    assert again.value == got.value and "not cached" in again.source  # from memory, not calibrated twice


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_sail_guard_and_scan_with_no_setup(kind, cache, tmp_path, monkeypatch):
    """A user's own model, no calibration file: sharpfast.sail(pipe, prompt), guard(pipe)(prompt)
    and scan with defaults run and say where their levels came from (sd1 on the full built-in
    set, the others on the quick one: the same path, a fifth of the cost)."""
    monkeypatch.setenv("SHARPFAST_CALIBRATION", "full" if kind == "sd1" else "quick")
    pipe = tiny_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    out, info = sharpfast.sail(pipe, "a red house", num_inference_steps=5, output_type="pt", return_info=True)
    assert out.images.shape[0] == 1 and info["threshold_source"].startswith("calibrated now")
    with sharpfast.guard(pipe) as g:
        res = g("a red house", num_inference_steps=5, output_type="pt")
        assert g.threshold_source.startswith("cache ") or g.threshold_source.startswith("calibrated now")
        assert res.memorization[0]["metric"] == g.metric == __import__("sharpfast.guarding").guarding.DEFAULT_METRIC
    f = tmp_path / "p.txt"
    f.write_text("a red house\ntwo dogs\n")
    summary = sharpfast.scan(pipe, str(f), str(tmp_path / "scan"), num_inference_steps=5, progress=False)
    assert summary["threshold"] is not None and summary["threshold_source"]
    assert summary["flagged"] in (0, 1, 2)


def test_calibrate_command_writes_what_auto_then_uses(cache, tmp_path, capsys, monkeypatch):
    """`sharpfast calibrate --prompts F --out FILE`: the thresholds of those prompts, the weights'
    fingerprint; without --out it goes to the cache, where threshold="auto" finds it; bad
    arguments are one error line before any model is loaded."""
    from sharpfast.cli import main

    monkeypatch.setenv("SHARPFAST_CALIBRATION", "full")  # "auto" as a deployment runs it (quick is cached apart)
    prompts = tmp_path / "normal.txt"
    prompts.write_text("\n".join(f"a photo of the digit {d} drawn in ink, style {i}" for d in range(10)
                                 for i in range(3)) + "\n")
    out = tmp_path / "cal.json"
    args = ["calibrate", "--model", "digits", "--prompts", str(prompts), "--num-inference-steps", "10", "--quiet"]
    assert main(args + ["--out", str(out)]) == 0
    import json

    cal = json.loads(out.read_text())
    pipe = sharpfast.zoo.load("digits")
    assert cal["weights"]["fingerprint"] == calibration.weights_fingerprint(pipe)["fingerprint"]
    assert cal["prompts"] == {"source": "given prompts", "count": 30, "sha256": cal["prompts"]["sha256"]}
    assert cal["settings"]["num_inference_steps"] == 10 and cal["wen"]["threshold"] > 0
    assert main(args) == 0  # into the cache
    assert "wrote " + str(cache) in capsys.readouterr().out
    got = calibration.resolve(pipe, "wen", num_inference_steps=10, calibrate=False)
    assert got.value == cal["wen"]["threshold"] and got.source.startswith("cache ")
    assert main(["calibrate", "--model", "digits", "--fpr", "nan"]) == 2
    assert main(["calibrate", "--model", "digits", "--prompts", str(tmp_path / "missing.txt")]) == 2
    assert "sharpfast:" in capsys.readouterr().err
