"""Flow-matching pipelines (Stable Diffusion 3, Flux) on tiny random-weight pipelines built offline
(CLIP and T5 encoders): the rectified-flow relations against a float64 reference written here,
fd against jvp, the pipeline left as it was, the guard's unflagged output bit for bit, and sail,
guard and scan with no calibration file."""
import copy
import math

import pytest
import torch
from pipeline_state import assert_same, snapshot

import sharpfast
from sharpfast.testing import tiny_pipeline

PROMPTS = ["a red house by the sea", "two dogs on a beach", "an old map"]
KW = dict(num_inference_steps=5)


@pytest.fixture(scope="module", params=["sd3", "flux"])
def pipe(request):
    p = tiny_pipeline(request.param)
    p.set_progress_bar_config(disable=True)
    return p


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_rectified_flow_relations_against_a_float64_reference():
    """SD3 at sigma = 1 (the first step) and at the next sigma < 1, from raw transformer outputs:
    eps_hat = x + (1 - sigma) v, s = -eps_hat / sigma. The paper's ||Δeps|| is exactly 0 at
    sigma = 1 while sharpfast's normalized wen is ||Δv||; at sigma < 1 sharpfast's wen times
    (1 - sigma) is the paper's ||Δeps|| and its sharpness times ((1 - sigma) / sigma)^2 the
    paper's ||H_Δ s_Δ|| (exact, by reverse-mode autograd here, forward mode in the product)."""
    from sharpfast.adapters import ScoreModel
    from sharpfast.curvature import EstimatorOptions
    from sharpfast.scores import step_metrics

    p = tiny_pipeline("sd3")
    prompts = PROMPTS[:2]
    tr = copy.deepcopy(p.transformer).double()
    with torch.no_grad():
        cond, null, pooled, null_pooled = p.encode_prompt(prompts, None, None, device="cpu",
                                                          do_classifier_free_guidance=True)
    sched = copy.deepcopy(p.scheduler)
    sched.set_timesteps(5)
    x = torch.randn(2, 4, 8, 8, generator=gen(4), dtype=torch.float64)

    def v(z, t, which):
        h, pp = (cond, pooled) if which == "c" else (null, null_pooled)
        return tr(hidden_states=z, timestep=torch.full((len(z),), float(t), dtype=torch.float64),
                  encoder_hidden_states=h.double(), pooled_projections=pp.double()).sample

    model = ScoreModel(p)
    enc = model.encode(prompts, 1, 16, 16)
    for k in (0, 1):
        t, sigma = sched.timesteps[k], float(sched.sigmas[k])

        def s_delta(z):  # the paper's score difference, from first principles
            eps_c = z + (1 - sigma) * v(z, t, "c")
            eps_u = z + (1 - sigma) * v(z, t, "u")
            return -(eps_c - eps_u) / sigma

        with torch.no_grad():
            dv = v(x, t, "c") - v(x, t, "u")
            paper_wen = ((1 - sigma) * dv).flatten(1).norm(dim=1)
        ours, _ = step_metrics(model, x.float(), t, model.alpha_bar(sched, t), enc, ("wen", "sharpness"), 7.0,
                               prompts=prompts, n=1, estimator=EstimatorOptions(hvp="jvp"))
        torch.testing.assert_close(ours["wen"].double(), dv.flatten(1).norm(dim=1), rtol=1e-4, atol=0)
        if k == 0:
            assert sigma == 1.0 and float(paper_wen.abs().max()) == 0.0  # vanishes at the first step
            assert float(ours["wen"].detach().min()) > 0
            continue
        assert sigma < 1
        torch.testing.assert_close(ours["wen"].double() * (1 - sigma), paper_wen, rtol=1e-4, atol=0)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with torch.no_grad():
            sd = s_delta(x)
        with sdpa_kernel([SDPBackend.MATH]):  # double backward needs plain attention
            _, hv = torch.autograd.functional.jvp(s_delta, x, sd)
        paper_sharp = hv.flatten(1).norm(dim=1)
        torch.testing.assert_close(ours["sharpness"].double() * ((1 - sigma) / sigma) ** 2, paper_sharp,
                                   rtol=1e-3, atol=0)


def test_fd_agrees_with_jvp_and_the_pipeline_is_left_as_it_was(pipe):
    before = snapshot(pipe)
    fd = sharpfast.detect(pipe, PROMPTS, metrics=("wen", "sharpness", "trace_delta", "anisotropy", "wen_low"),
                          generator=gen(), progress=False, **KW)
    jvp = sharpfast.detect(pipe, PROMPTS, metrics=("sharpness",), hvp="jvp", generator=gen(), progress=False, **KW)
    assert_same(before, snapshot(pipe))
    torch.testing.assert_close(fd.scores["sharpness"], jvp.scores["sharpness"], rtol=0.05, atol=0)
    for m, v in fd.scores.items():
        assert bool(torch.isfinite(v).all()), m
    assert float(fd.scores["wen"].min()) > 0  # normalized: not the paper's 0 at sigma = 1
    # the batch does not change a prompt's score
    alone = sharpfast.detect(pipe, PROMPTS[1:2], metrics=("wen", "sharpness"),
                             latents=pipe_noise(pipe, 3)[1:2], progress=False, **KW)
    both = sharpfast.detect(pipe, PROMPTS, metrics=("wen", "sharpness"), latents=pipe_noise(pipe, 3),
                            progress=False, **KW)
    # fd sharpness divides a difference of differences by its step: float32 batching noise x 1/h
    for m, rtol in (("wen", 1e-4), ("sharpness", 1e-3)):
        torch.testing.assert_close(alone.scores[m][0], both.scores[m][1], rtol=rtol, atol=1e-6)


def pipe_noise(pipe, count):
    from sharpfast.adapters import ScoreModel

    model = ScoreModel(pipe)
    return model.noise(count, *model.default_size(), gen(7))


def test_guard_unflagged_is_plain_and_flagged_is_mitigated(pipe):
    plain = pipe(PROMPTS, generator=gen(), output_type="pt", **KW).images
    defaults = sharpfast.adapters.pipeline_defaults(pipe)
    det = sharpfast.detect(pipe, PROMPTS, metrics=("wen",), generator=gen(), progress=False,
                           guidance_scale=defaults["guidance_scale"], **KW).scores["wen"]
    with sharpfast.guard(pipe, metric="wen", threshold=float("inf"), mitigation=None) as g:
        out = g(PROMPTS, generator=gen(), output_type="pt", **KW)
    assert torch.equal(out.images, plain)
    torch.testing.assert_close(torch.tensor([r["score"] for r in out.memorization]), det, rtol=1e-4, atol=1e-6)
    k = int(det.argmax())
    with sharpfast.guard(pipe, metric="wen", threshold=float(det.sort().values[-2]), mitigation="sail",
                         sail_kwargs={"max_steps": 1}) as g:
        out = g(PROMPTS, generator=gen(), output_type="pt", **KW)
    assert [r["flagged"] for r in out.memorization] == [i == k for i in range(3)]
    for i in range(3):
        assert torch.equal(out.images[i], plain[i]) != (i == k), i
    assert not (pipe.transformer._forward_hooks or pipe.transformer._forward_pre_hooks)


def test_sail_guard_and_scan_with_no_setup(pipe, tmp_path, monkeypatch):
    """No calibration file: the levels are calibrated once on the built-in captions (cached)."""
    from sharpfast import calibration

    monkeypatch.setenv("SHARPFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SHARPFAST_CALIBRATION", "quick")  # the full set's path is tested on SD (test_calibration)
    calibration.store._MEMO.clear()
    out, info = sharpfast.sail(pipe, "a red house", output_type="pt", return_info=True, generator=gen(), **KW)
    assert out.images.shape[0] == 1 and "built-in generic captions" in info["threshold_source"]
    with sharpfast.guard(pipe) as g:
        res = g("a red house", output_type="pt", generator=gen(), **KW)
    assert (
        res.memorization[0]["metric"] == __import__("sharpfast.guarding").guarding.DEFAULT_METRIC and g.threshold_source
    )
    f = tmp_path / "p.txt"
    f.write_text("a red house\ntwo dogs\n")
    summary = sharpfast.scan(pipe, str(f), str(tmp_path / "scan"), progress=False, **KW)
    assert summary["scored"] == 2 and summary["threshold"] is not None and summary["threshold_source"]
    calibration.store._MEMO.clear()


def test_attention_entropy_is_refused_for_joint_attention(pipe):
    with pytest.raises(sharpfast.errors.UnsupportedPipeline, match="cross-attention"):
        sharpfast.detect(pipe, PROMPTS[:1], metrics=("attn_entropy",), progress=False, **KW)


def test_flux_noise_is_what_the_pipeline_draws():
    """Flux packs its latents: sharpfast's noise is the pipeline's own draw, packed the same way."""
    p = tiny_pipeline("flux")
    p.set_progress_bar_config(disable=True)
    seen = {}

    def first_input(m, a, kw):
        seen.setdefault("x0", kw["hidden_states"].clone())

    h = p.transformer.register_forward_pre_hook(first_input, with_kwargs=True)
    try:
        p(PROMPTS[:2], generator=gen(3), num_inference_steps=2, output_type="latent")
    finally:
        h.remove()
    from sharpfast.adapters import ScoreModel

    model = ScoreModel(p)
    assert torch.equal(model.noise(2, *model.default_size(), gen(3)), seen["x0"])
    assert math.isclose(float(model.scheduler(2).sigmas[0]), 1.0)
