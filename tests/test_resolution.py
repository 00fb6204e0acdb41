"""Thresholds follow the request's image size: on the digits model, normal prompts requested at
16x16, 32x32 and 64x64 are flagged at about the calibrated rate at every size (the 16x16 threshold
flagged 95-100% of them at the larger sizes), memorized prompts still are.
(The full 320-caption calibration: benchmarks/resolution_check.py; here the quick one.)"""
import pytest

import sharpfast
from sharpfast import calibration, zoo
from sharpfast.adapters import ScoreModel


@pytest.fixture(scope="module")
def digits():
    pipe = zoo.load("digits")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("side", [32])  # 64x64: 100 s here; measured in benchmarks/results/resolution_check.json
def test_normal_prompts_are_flagged_at_the_calibrated_rate_at_every_size(digits, side, tmp_path, monkeypatch):
    monkeypatch.setenv("SHARPFAST_CACHE", str(tmp_path))
    monkeypatch.setenv("SHARPFAST_CALIBRATION", "quick")
    calibration.store._MEMO.clear()
    at_size = calibration.resolve(digits, "wen_low", "threshold", height=side, width=side, progress=False)
    at_16 = calibration.resolve(digits, "wen_low", "threshold", progress=False)
    assert "calibrated now" in at_size.source and at_size.value != at_16.value
    recs = zoo.prompts("digits", "eval")
    model = ScoreModel(digits)
    lat = model.noise_for_ids(range(len(recs)), 1, side, side, seed=42)
    s = sharpfast.detect(model, [r["prompt"] for r in recs], metrics=("wen_low",), latents=lat, height=side,
                         width=side, batch_size=16, progress=False).scores["wen_low"]
    normal = [float(v) for v, r in zip(s, recs) if not r["memorized"]]
    memorized = [float(v) for v, r in zip(s, recs) if r["memorized"]]
    flagged = sum(v > at_size.value for v in normal) / len(normal)
    assert flagged <= 0.03, f"{flagged:.0%} of normal prompts flagged at {side}x{side}"
    assert sum(v > at_16.value for v in normal) / len(normal) > 0.5  # what one threshold for all sizes did
    assert sum(v > at_size.value for v in memorized) / len(memorized) >= 0.8
