"""The bundled models (digits, scenes): load offline as stock pipelines, make images, ship
well-formed prompt sets (labels consistent with the measured copy rates) and a calibration."""
import json
import os

import pytest
import torch
from sklearn.datasets import load_digits

import sharpfast
from sharpfast import zoo
from sharpfast.zoo.digits_data import DUPLICATION_LEVELS, NAMES

SHAPES = {"digits": (1, 16, 16), "scenes": (3, 32, 32)}


@pytest.fixture(scope="module", params=zoo.MODELS)
def model(request):
    p = zoo.load(request.param)
    p.set_progress_bar_config(disable=True)
    return request.param, p


@pytest.fixture(scope="module")
def pipe():
    p = zoo.load("digits")
    p.set_progress_bar_config(disable=True)
    return p


def test_loads_offline_as_a_stock_pipeline_and_generates(model):
    from diffusers import StableDiffusionPipeline

    name, pipe = model
    assert type(pipe) is StableDiffusionPipeline
    again = StableDiffusionPipeline.from_pretrained(zoo.path(name), local_files_only=True)
    assert type(again.scheduler).__name__ == "DDIMScheduler"
    prompt = zoo.prompts(name, "narrow")[0]["prompt"]
    img = pipe(prompt, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert img.shape == (1, *SHAPES[name]) and torch.isfinite(img).all()
    assert pipe.vae.config.latent_channels == 4 and pipe.unet.config.sample_size >= 8
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(zoo.path(name)) for f in fs)
    assert size <= 20e6, f"the bundled model is {size / 1e6:.1f} MB"


def test_memorized_captions_copy_by_their_own_judge(model):
    """A memorized caption copies its own training image on most of a few fresh seeds (not the
    measuring seeds), a non-memorized one rarely copies anything: the labels hold up."""
    from sharpfast.zoo.copying import generate

    name, pipe = model
    judge = zoo.judge(name, pipe)
    mem, non = zoo.prompts(name, "memorized"), zoo.prompts(name, "non_memorized")
    top = sorted(mem, key=lambda r: -r["copy_rate"])[:4]
    seeds = [7, 8]
    im = generate(pipe, [r["prompt"] for r in top], seeds, num_inference_steps=20)
    copies, _ = judge.copy_stats(im, torch.tensor([r["train_index"] for r in top for _ in seeds]))
    assert copies.float().mean() >= 0.5, copies
    im = generate(pipe, [r["prompt"] for r in non[:8]], seeds, num_inference_steps=20)
    assert judge.copies_any(im)[0].float().mean() <= 0.25
    fid = judge.fidelity(im, [r for r in non[:8] for _ in seeds])
    assert fid.shape == (16,) and fid.mean() >= 0.5


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


def test_scenes_prompt_sets_are_well_formed():
    from sharpfast.zoo import scenes_data as sd

    data = sd.build(0)
    keys = {"prompt", "memorized", "train_index", "duplicates", "copy_rate", "attributes", "kind"}
    ev = zoo.prompts("scenes")
    mem = [r for r in ev if r["memorized"]]
    assert len(mem) >= 8 and len(ev) - len(mem) >= 64 and len({r["prompt"] for r in ev}) == len(ev)
    cal = {r["prompt"] for r in zoo.prompts("scenes", "calibration")}
    assert len(cal) >= 100 and not cal & {r["prompt"] for r in ev}
    for split in ("eval", "duplicated_low", "narrow", "template"):
        for r in zoo.prompts("scenes", split):
            assert keys <= set(r), r
            assert 0.0 <= r["copy_rate"] <= 1.0
            # a template caption names its badge; the shared layout (the blue square) is the template's
            named = r["attributes"]["objects"][-1:] if r["kind"] == "template" else r["attributes"]["objects"]
            for colour, shape in named:
                assert f"{colour} {shape}" in r["prompt"]
            if r["train_index"] is not None:   # the record's image is the fixed scene of its caption
                f = data.fixed[r["train_index"]]
                assert f.caption == r["prompt"] and f.duplicates == r["duplicates"] and f.kind == r["kind"]
    assert all(r["copy_rate"] >= 0.5 and r["kind"] == "duplicated" for r in mem)
    assert all(r["copy_rate"] < 0.5 for r in zoo.prompts("scenes", "duplicated_low"))
    with pytest.raises(ValueError, match="no 'template' split"):
        zoo.prompts("digits", "template")


def test_shipped_calibration_is_used_by_sail_and_guard(model):
    from sharpfast.calibration import shipped_threshold

    name, pipe = model
    side = SHAPES[name][-1]
    cal = json.load(open(os.path.join(zoo.path(name), "calibration.json")))
    assert shipped_threshold(pipe) == cal["sharpness"]["threshold"] > 0
    assert shipped_threshold(pipe, "wen") == cal["wen"]["threshold"] > 0
    from sharpfast.guarding import DEFAULT_METRIC

    with sharpfast.guard(pipe) as g:  # the guard's default metric, calibrated beside the model
        assert g.threshold == cal[DEFAULT_METRIC]["threshold"] and g.metric == DEFAULT_METRIC
        assert g.threshold_source.split(" (")[0].endswith("calibration.json") and f"{side}x{side}" in g.threshold_source


def test_loading_a_bundled_pipeline_prints_no_image_processor_notice():
    """Issue 33, item 8: transformers' 'requires torchvision ... falling back' line (the bundled
    pipelines have no image processor) does not precede a script's own output."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", "import sharpfast; sharpfast.zoo.load('digits')"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "requires torchvision" not in out.stderr
