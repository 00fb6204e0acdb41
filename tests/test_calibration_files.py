"""Calibration files that do not parse as valid thresholds (NaN, infinite, wrong types, not an
object) are ignored with a warning naming the file and recomputed, for every setting alike; the
calibration key includes the image size."""
import json
import logging
import math

import pytest

from sharpfast import calibration
from sharpfast.testing import tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    p = tiny_pipeline("sd1")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARPFAST_CACHE", str(tmp_path))
    monkeypatch.setenv("SHARPFAST_CALIBRATION", "quick")
    calibration.store._MEMO.clear()
    yield tmp_path
    calibration.store._MEMO.clear()


BAD = [
    ("nan", lambda cal: cal["wen"].update(threshold=float("nan"))),
    ("-inf", lambda cal: cal["wen"].update(threshold=float("-inf"))),
    # a norm's threshold cannot be negative: -5 would flag every prompt (issue 33, item 20)
    ("negative", lambda cal: cal["wen"].update(threshold=-5.0)),
    ("text", lambda cal: cal["wen"].update(threshold="abc")),
    ("list", lambda cal: cal.clear() or cal.update(_list=True)),
    ("weights", lambda cal: cal.update(weights="x")),
]


@pytest.mark.parametrize("steps", [2, 3], ids=["one-setting", "another-setting"])
@pytest.mark.parametrize("name,spoil", BAD, ids=[b[0] for b in BAD])
def test_a_bad_cached_file_is_ignored_named_and_recomputed(pipe, cache, caplog, name, spoil, steps):
    good = calibration.resolve(pipe, "wen", "threshold", num_inference_steps=steps, progress=False)
    (path,) = list((cache / "calibration").iterdir())
    cal = json.loads(path.read_text())
    spoil(cal)
    path.write_text("[]" if cal.get("_list") else json.dumps(cal))
    calibration.store._MEMO.clear()
    with caplog.at_level(logging.WARNING, logger="sharpfast.calibration"):
        again = calibration.resolve(pipe, "wen", "threshold", num_inference_steps=steps, progress=False)
    assert str(path) in caplog.text and "recalibrating" in caplog.text
    assert math.isfinite(again.value) and again.value == pytest.approx(good.value, rel=1e-5)
    assert "calibrated now" in again.source
    assert calibration.store._value(json.loads(path.read_text()), "wen", "threshold") is not None  # rewritten


def test_a_bad_file_beside_the_model_is_ignored(pipe, cache, tmp_path, caplog):
    beside = tmp_path / "model"
    beside.mkdir()
    (beside / "calibration.json").write_text(json.dumps({"wen": {"threshold": float("nan")}}))
    pipe.register_to_config(_name_or_path=str(beside))
    try:
        with caplog.at_level(logging.WARNING, logger="sharpfast.calibration"):
            found = calibration.resolve(pipe, "wen", "threshold", num_inference_steps=2, progress=False)
        assert str(beside / "calibration.json") in caplog.text and "not a finite number" in caplog.text
        assert math.isfinite(found.value) and "calibration.json" not in found.source
        (beside / "calibration.json").write_text("{not json")
        calibration.store._MEMO.clear()
        found = calibration.resolve(pipe, "wen", "threshold", num_inference_steps=2, progress=False)
        assert math.isfinite(found.value)
    finally:
        pipe.register_to_config(_name_or_path="")


def test_the_size_is_part_of_the_setting(pipe, cache):
    a = calibration.resolve(pipe, "wen", "threshold", num_inference_steps=2, progress=False)
    b = calibration.resolve(pipe, "wen", "threshold", num_inference_steps=2, height=32, width=32, progress=False)
    assert "calibrated now" in a.source and "calibrated now" in b.source  # two calibrations, not one
    assert a.value != b.value
    assert len(list((cache / "calibration").iterdir())) == 2
    again = calibration.resolve(pipe, "wen", "threshold", num_inference_steps=2, height=32, width=32, progress=False)
    assert again.value == b.value and "calibrated now" not in again.source


def test_the_memo_and_the_cache_are_bounded(cache, monkeypatch):
    monkeypatch.setattr(calibration.store, "MAX_MEMO", 3)
    for i in range(5):
        calibration.store._remember(f"p{i}", {"i": i})
    assert list(calibration.store._MEMO) == ["p2", "p3", "p4"]
    folder = cache / "calibration"
    folder.mkdir(exist_ok=True)
    monkeypatch.setattr(calibration.store, "MAX_CACHE_FILES", 4)
    import os
    import time

    for i in range(7):
        f = folder / f"f{i}.json"
        f.write_text("{}")
        os.utime(f, (time.time() + i, time.time() + i))
    calibration.store._prune(str(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["f3.json", "f4.json", "f5.json", "f6.json"]


@pytest.mark.parametrize("metric", ["trace", "trace_delta", "wen"])
@pytest.mark.parametrize("value", [float("nan"), float("-inf"), float("inf")])
def test_a_threshold_that_is_not_finite_is_not_read(metric, value):
    """Not a finite number: never a threshold, whatever the metric's range (trace's is the whole
    line, so its range check alone lets -inf, which flags every prompt, through)."""
    assert calibration.store._value({metric: {"threshold": value}}, metric, "threshold") is None
    assert calibration.store._value({metric: {"threshold": 0.5}}, metric, "threshold") == 0.5
