"""The bundled digits model: loads offline as a stock pipeline, makes images, ships well-formed
prompt sets (labels consistent with the measured copy rates) and a calibration."""
import json
import os

import pytest
import torch
from sklearn.datasets import load_digits

import sharpfast
from sharpfast import zoo
from sharpfast.zoo.digits_data import DUPLICATION_LEVELS, NAMES


@pytest.fixture(scope="module")
def pipe():
    p = zoo.load("digits")
    p.set_progress_bar_config(disable=True)
    return p


def test_loads_offline_as_a_stock_pipeline_and_generates(pipe):
    from diffusers import StableDiffusionPipeline

    assert type(pipe) is StableDiffusionPipeline
    again = StableDiffusionPipeline.from_pretrained(zoo.path("digits"), local_files_only=True)
    assert type(again.scheduler).__name__ == "DDIMScheduler"
    img = pipe("a handwritten seven", num_inference_steps=5, generator=torch.Generator().manual_seed(0),
               output_type="pt").images
    assert img.shape == (1, 1, 16, 16) and torch.isfinite(img).all()
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(zoo.path("digits")) for f in fs)
    assert size <= 20e6, f"the bundled model is {size / 1e6:.1f} MB"


def test_generations_show_the_prompted_digit(pipe):
    # the first shipped model (char-level tokens, no generic pretraining) drew what the seed, not
    # the prompt, said: about a quarter of these were the prompted digit
    from sharpfast.zoo.copying import generate
    from sharpfast.zoo.fidelity import fidelity

    images = generate(pipe, [f"a handwritten {name}" for name in NAMES], seeds=[0, 1, 2], num_inference_steps=20)
    recognised = fidelity(images, [d for d in range(10) for _ in range(3)])
    assert recognised.mean() >= 0.7, f"only {recognised.mean():.0%} show the prompted digit"


def test_prompt_sets_are_well_formed():
    digits = load_digits()
    keys = {"prompt", "memorized", "digit", "train_index", "duplicates", "copy_rate"}
    ev = zoo.prompts("digits")
    mem, non = [r for r in ev if r["memorized"]], [r for r in ev if not r["memorized"]]
    assert len(non) >= 64 and len(mem) >= 20
    assert len({r["prompt"] for r in ev}) == len(ev)
    for r in ev + zoo.prompts("digits", "duplicated_low") + zoo.prompts("digits", "narrow"):
        assert keys <= set(r), r
        assert NAMES[r["digit"]] in r["prompt"] or str(r["digit"]) in r["prompt"]
        assert 0.0 <= r["copy_rate"] <= 1.0
        if r["train_index"] is not None:
            assert digits.target[r["train_index"]] == r["digit"]
            assert r["duplicates"] in DUPLICATION_LEVELS
        else:
            assert r["duplicates"] == 0
    assert all(r["copy_rate"] >= 0.5 and r["train_index"] is not None for r in mem)
    assert all(r["copy_rate"] < 0.5 and not r["memorized"] for r in zoo.prompts("digits", "duplicated_low"))
    with pytest.raises(ValueError, match="unknown split"):
        zoo.prompts("digits", "train")
    with pytest.raises(ValueError, match="unknown bundled model"):
        zoo.load("sd15")


def test_shipped_calibration_is_used_by_sail_and_guard(pipe):
    from sharpfast.calibration import shipped_threshold

    cal = json.load(open(os.path.join(zoo.path("digits"), "calibration.json")))
    assert shipped_threshold(pipe) == cal["sharpness"]["threshold"] > 0
    assert shipped_threshold(pipe, "wen") == cal["wen"]["threshold"] > 0
    from sharpfast.serving import DEFAULT_METRIC

    with sharpfast.guard(pipe) as g:  # the guard's default metric, calibrated beside the model
        assert g.threshold == cal[DEFAULT_METRIC]["threshold"] and g.metric == DEFAULT_METRIC
        assert g.threshold_source.split(" (")[0].endswith("calibration.json") and "16x16" in g.threshold_source
