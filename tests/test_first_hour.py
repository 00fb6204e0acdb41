"""What a new user meets in the first hour: SAIL saying when it did nothing, no false truncation
warnings, a quick calibration that is cached apart, every bar following the pipeline's config."""
import logging

import pytest
import torch
from helpers import quiet_tiny

import sharpfast
from sharpfast import calibration
from sharpfast.errors import BadArgument
from sharpfast.testing import tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return quiet_tiny("sd1")


def test_sail_says_when_it_did_nothing(pipe):
    from sharpfast.mitigations.sail import sail_latents

    _, info = sail_latents(pipe, ["a red house", "two dogs"], generator=torch.Generator().manual_seed(0),
                           threshold=1e9, num_inference_steps=3)
    assert bool(info["unchanged"].all()) and info["adam_steps"] == 0
    assert info["note"].startswith("nothing to do") and "1e+09" in info["note"] and "given" in info["note"]
    _, info = sail_latents(pipe, ["a red house"], generator=torch.Generator().manual_seed(0), threshold=-1e9,
                           num_inference_steps=3, max_steps=1)
    assert info["note"].startswith("1 of 1 images optimized (1 Adam steps)") and "not every image" in info["note"]


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_truncation_warning_is_silenced_inside_sharpfast_only(pipe):
    """A batch with one long prompt: diffusers warns that the short one was "truncated" (its
    padding); sharpfast reports the long one itself and silences diffusers' message, which the
    user's own pipe(...) call still gets."""
    long_prompt = " ".join(["word"] * (pipe.tokenizer.model_max_length + 10))
    handler = _Collect()
    root = logging.getLogger("diffusers")
    root.addHandler(handler)
    try:
        res = sharpfast.detect(pipe, ["a cat", long_prompt], metrics=("wen",), num_inference_steps=2, progress=False)
        assert not [m for m in handler.messages if "truncated" in m], handler.messages
        assert res.warnings[1] and "truncated" in res.warnings[1][0] and not res.warnings[0]
        pipe(["a cat", long_prompt], num_inference_steps=1, output_type="latent")
        assert [m for m in handler.messages if "truncated" in m], "the user's own call keeps diffusers' warning"
    finally:
        root.removeHandler(handler)


def test_quick_calibration_is_cached_apart_and_says_its_cost(pipe, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SHARPFAST_CACHE", str(tmp_path))
    monkeypatch.setenv("SHARPFAST_CALIBRATION", "quick")
    assert len(calibration.generic_prompts("quick")) == calibration.QUICK == 64
    assert len(set(calibration.generic_prompts("quick"))) == 64
    with caplog.at_level(logging.WARNING, logger="sharpfast.calibration"):
        found = calibration.resolve(pipe, "wen", "threshold", num_inference_steps=2, progress=False)
    assert "built-in generic captions (quick)" in found.source
    said = caplog.text
    assert "64 built-in generic captions (8 batches x" in said and "sharpfast calibrate --model" in said
    assert "about" in said and "s more" in said  # the estimate after the first batch
    (quick_file,) = list((tmp_path / "calibration").iterdir())
    monkeypatch.setenv("SHARPFAST_CALIBRATION", "full")
    full_path = calibration.cache_path(calibration.weights_fingerprint(pipe),
                                       **calibration.store._settings(pipe, num_inference_steps=2))
    assert full_path != str(quick_file), "a quick calibration must not answer for the full one"
    monkeypatch.setenv("SHARPFAST_CALIBRATION", "fast")
    with pytest.raises(BadArgument, match="SHARPFAST_CALIBRATION"):
        calibration.resolve(pipe, "wen", "threshold", num_inference_steps=2, progress=False)


def test_every_bar_follows_the_pipeline_config(capsys):
    p = tiny_pipeline("sd1")
    p.set_progress_bar_config(disable=True)
    sharpfast.detect(p, ["a cat"], metrics=("wen",), num_inference_steps=2)
    assert "sharpfast detect" not in capsys.readouterr().err
    p.set_progress_bar_config(disable=False)
    sharpfast.detect(p, ["a cat"], metrics=("wen",), num_inference_steps=2)
    err = capsys.readouterr().err
    assert "sharpfast detect" in err and "\x1b[" not in err  # no escape codes outside a terminal
