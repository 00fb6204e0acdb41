"""The mitigation registry: every method on every scheduler, each against its peer's definition
written out here in float64 (not with the product's helpers), and the pipeline left as it was."""
import math

import numpy as np
import pytest
import torch
from pipeline_state import assert_same, snapshot

import sharpfast
from sharpfast.errors import BadArgument, UnsupportedPipeline
from sharpfast.mitigations import REGISTRY, Context, mitigate
from sharpfast.testing import tiny_pipeline

PROMPTS = ["a red house by the sea", "two dogs"]
STEPS = 6
# small budgets; SAIL's target 0 so that it always moves the noise
FAST_SETTINGS = {"sail_reference": {"candidates": 2, "max_steps": 2}, "sail": {"max_steps": 2, "threshold": 0.0},
                 "sail_alpha": {"max_steps": 2, "threshold": 0.0, "alpha": 3e-5, "project": False},
                 "wen_embedding": 0.9}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def sd1():
    p = tiny_pipeline("sd1")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "pndm", "euler", "euler_a", "dpm"])
def test_every_method_runs_on_every_scheduler(scheduler):
    pipe = tiny_pipeline("sd1", scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(PROMPTS, generator=gen(), num_inference_steps=STEPS, output_type="pt").images
    before = snapshot(pipe)  # after a plain call: the pipeline's own call sets its scheduler's timesteps
    for name in REGISTRY:
        out, info = mitigate(pipe, PROMPTS, name, FAST_SETTINGS.get(name), generator=gen(), num_inference_steps=STEPS,
                             output_type="pt", return_info=True)
        assert out.images.shape == plain.shape and bool(torch.isfinite(out.images).all()), (scheduler, name)
        assert info["unet_calls_per_image"] >= STEPS
        if name == "none":
            assert torch.equal(out.images, plain), "method none is the plain pipeline, bit for bit"
        elif name not in ("sail_guard",):  # sail_guard may stop at once where the start is under target
            assert not torch.equal(out.images, plain), f"{scheduler}: {name} changed nothing"
    assert_same(before, snapshot(pipe))


class _Raw:
    """The denoiser's raw CFG output per call (a hook registered before any mitigation's) and the
    guided prediction the scheduler is stepped with."""

    def __init__(self, pipe):
        self.raw, self.guided, self.t = [], [], []
        self.h = pipe.unet.register_forward_hook(self.hook, with_kwargs=True)
        step = pipe.scheduler.step
        self.pipe, self.step = pipe, step

        def capture(model_output, timestep, sample, *a, **k):
            self.guided.append(model_output.double())
            return step(model_output, timestep, sample, *a, **k)
        pipe.scheduler.step = capture

    def hook(self, module, args, kwargs, output):
        self.raw.append(output[0].double().chunk(2))
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.t.append(float(t))

    def close(self):
        self.h.remove()
        del self.pipe.scheduler.step


def _guided_check(raw, scale_of, g, rows=None):
    for k, ((u, c), guided) in enumerate(zip(raw.raw, raw.guided)):
        s = scale_of(k, raw)  # per image, float64 (their code: noise_pred = u + s (c - u))
        want = u + s.view(-1, 1, 1, 1) * (c - u)
        scale = (u.abs() + g * (c - u).abs()).max()
        assert torch.allclose(guided, want, atol=float(scale) * 1e-5, rtol=0), f"call {k}"


@pytest.mark.parametrize("setting,early,t_switch,late", [((0.0, 500.0), 0.0, 500.0, None),
                                                         ("s-2t650", -2.0, 650.0, None),
                                                         ("s0t600g1", 0.0, 600.0, 1.0),
                                                         ("s0.9t300g0.5", 0.9, 300.0, 0.5)])
def test_static_transition_is_jain_et_al(sd1, setting, early, t_switch, late):
    g = 7.5
    raw = _Raw(sd1)
    try:
        mitigate(sd1, PROMPTS, "transition", setting, generator=gen(), num_inference_steps=10,
                 guidance_scale=g, output_type="pt")
    finally:
        raw.close()
    assert any(t > t_switch for t in raw.t) and any(t <= t_switch for t in raw.t)
    after = g if late is None else late
    _guided_check(raw, lambda k, r: torch.full((2,), early if r.t[k] > t_switch else after, dtype=torch.float64), g)


def test_dynamic_transition_is_the_first_local_minimum(sd1):
    g = 7.5
    raw = _Raw(sd1)
    try:
        mitigate(sd1, PROMPTS, "transition", "dyn", generator=gen(), num_inference_steps=12, guidance_scale=g,
                 output_type="pt")
    finally:
        raw.close()
    d = torch.stack([(c - u).flatten(1).norm(dim=1) for u, c in raw.raw])  # (steps, images)
    first = []
    for i in range(d.shape[1]):  # their dtp rule: d_j > d_{j-1} and d_{j-2} > d_{j-1}: step j is the first guided
        js = [j for j in range(2, len(d)) if d[j, i] > d[j - 1, i] and d[j - 2, i] > d[j - 1, i]]
        first.append(js[0] if js else len(d))
    _guided_check(raw, lambda k, r: torch.tensor([g if k >= f else 1.0 for f in first], dtype=torch.float64), g)


def test_attention_rescale_is_ren_et_al(sd1):
    """One cross-attention layer in float64: BOS logit x c1 on the conditional rows, tokens past the
    prompt's own masked on both branches; rows not mitigated equal the layer's own processor."""
    from sharpfast.attention import LogitEditProcessor
    from sharpfast.mitigations.attention_rescale import rescale_edit as _rescale_edit
    from sharpfast.mitigations.base import prompt_lengths as _prompt_lengths

    attn = next(m for name, m in sd1.unet.named_modules() if name.endswith("attn2"))
    g = torch.Generator().manual_seed(3)
    images, L, dim = 2, 16, attn.to_q.in_features
    hidden = torch.randn(2 * images, L, dim, generator=g)
    ctx = torch.randn(2 * images, 77, attn.to_k.in_features, generator=g)
    lengths = torch.tensor(_prompt_lengths(sd1, PROMPTS, 1))
    c1 = 1.25
    rows = torch.tensor([1, 3])  # image 1 only: its null row 1 and its cond row 3
    proc = LogitEditProcessor(attn.processor, _rescale_edit(c1, lengths, images, rows), rows)
    with torch.no_grad():
        got = proc(attn, hidden, ctx)
        base = attn.processor(attn, hidden, ctx)
        assert torch.equal(got[[0, 2]], base[[0, 2]]), "rows not mitigated are the layer's own output, bit for bit"
        W = {k: getattr(attn, k).weight.double() for k in ("to_q", "to_k", "to_v")}
        out_w, out_b = attn.to_out[0].weight.double(), attn.to_out[0].bias.double()
        H = attn.heads
        for r in (1, 3):
            q = (hidden[r].double() @ W["to_q"].T).view(L, H, -1).transpose(0, 1)
            k = (ctx[r].double() @ W["to_k"].T).view(77, H, -1).transpose(0, 1)
            v = (ctx[r].double() @ W["to_v"].T).view(77, H, -1).transpose(0, 1)
            logits = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
            if r >= images:  # the conditional branch: their attn_weight[..., 0] * c1
                logits[..., 0] = logits[..., 0] * c1
            logits[..., int(lengths[r % images]):] = float("-inf")  # their cross_attn_mask: keep prompt_length tokens
            o = (logits.softmax(-1) @ v).transpose(0, 1).reshape(L, -1) @ out_w.T + out_b
            torch.testing.assert_close(got[r].double(), o, rtol=1e-4, atol=1e-5)


def test_errors_and_families():
    pipe = tiny_pipeline("flux")
    pipe.set_progress_bar_config(disable=True)
    for name in ("transition", "attention_rescale", "zhao_guard"):
        with pytest.raises(UnsupportedPipeline, match=name):
            mitigate(pipe, "a cat", name, num_inference_steps=2)
    sd3 = tiny_pipeline("sd3")
    with pytest.raises(UnsupportedPipeline, match="attention_rescale"):
        mitigate(sd3, "a cat", "attention_rescale", num_inference_steps=2)
    sd1 = tiny_pipeline("sd1")
    with pytest.raises(BadArgument, match="mitigation must be one of"):
        mitigate(sd1, "a cat", "nope")
    with pytest.raises(BadArgument, match="transition setting"):
        mitigate(sd1, "a cat", "transition", "t-5x")
    with pytest.raises(BadArgument, match="latents"):
        mitigate(sd1, "a cat", "transition", latents=torch.zeros(1, 4, 3, 3))
    with pytest.raises(BadArgument, match="prompt"):
        mitigate(sd1, "", "transition")
    with pytest.raises(BadArgument, match="c1"):
        mitigate(sd1, "a cat", "attention_rescale", float("nan"))


def test_transition_on_sd3_and_sdxl_runs_and_changes_the_output():
    for kind in ("sd3", "sdxl"):
        pipe = tiny_pipeline(kind)
        pipe.set_progress_bar_config(disable=True)
        plain = pipe(PROMPTS, generator=gen(), num_inference_steps=4, output_type="pt").images
        out = mitigate(pipe, PROMPTS, "transition", "s0t500", generator=gen(), num_inference_steps=4,
                       output_type="pt").images
        assert out.shape == plain.shape and not torch.equal(out, plain)


def test_public_api():
    assert sharpfast.mitigate is mitigate
    assert set(REGISTRY) >= {"sail", "wen_embedding", "random_tokens", "transition", "attention_rescale",
                             "zhao_guard", "sail+transition", "sail_guard"}
    for m in REGISTRY.values():
        assert m.cost and m.knob and m.families and m.default in m.sweep, m.name


def test_one_setting_grammar_for_every_method():
    """The three short setting strings are one grammar (<key><number> pairs in a declared order,
    bare words); what it refuses names the method and an example."""
    from sharpfast.mitigations.noise import sail_setting
    from sharpfast.mitigations.transition import transition_setting
    from sharpfast.mitigations.zhao_guard import ZhaoGuardConfig

    assert sail_setting("k1s3lr0.7") == {"candidates": 1, "max_steps": 3, "lr": 0.7}
    assert sail_setting("k2s4a3e-5") == {"candidates": 2, "max_steps": 4, "alpha": 3e-5, "project": False}
    assert transition_setting("s0t500") == (0.0, 500.0) and transition_setting("s-2t650") == (-2.0, 650.0)
    assert transition_setting("dyn") == (1.0, None) and transition_setting("s-1dyn") == (-1.0, None)
    assert transition_setting("t450") == (0.0, 450.0) and transition_setting("s0t600g1") == (0.0, 600.0)
    from sharpfast.mitigations.transition import TransitionConfig, same_step
    late = lambda st: TransitionConfig.from_setting(st).late  # noqa: E731
    assert late("s0t600g1") == 1.0 and late("s0t600") is None
    # the scale at t: early above the point, then g (None: the request's)
    assert same_step("s1t0", "s1t500g1", 700) and same_step("s1t0", "s1t500g1", 300)
    assert not same_step("s0t450", "s0t600g1", 300) and same_step("s0t450", "s0t600", 300)
    assert not same_step("s0t450", "s1t0", 900)
    assert ZhaoGuardConfig.from_setting("r0.5a0.01t3") == ZhaoGuardConfig(0.5, 0.01, 3.0)
    refused = ((sail_setting, "s3k1", "SAIL"), (sail_setting, "k1", "SAIL"), (sail_setting, "k1.5s3", "SAIL"),
               (sail_setting, "k1s3k1", "SAIL"), (transition_setting, "t500s0", "transition"),
               (transition_setting, "s0", "transition"), (transition_setting, "s0t500dyn", "transition"),
               (ZhaoGuardConfig.from_setting, "a0.1", "zhao_guard"),
               (ZhaoGuardConfig.from_setting, "r1x2", "zhao_guard"),
               (transition_setting, "zz9", "transition"), (transition_setting, "s0t500g", "transition"),
               (transition_setting, "g1t500", "transition"), (transition_setting, "s0t500gnan", "transition"))
    for fn, bad, name in refused:
        with pytest.raises(BadArgument, match=name):
            fn(bad)


@pytest.mark.parametrize("method,bad", [("random_tokens", "zz9"), ("random_tokens", -1), ("wen_embedding", "zz9"),
                                        ("wen_embedding", float("nan"))])
def test_a_bad_one_number_setting_is_a_sharpfast_error(method, bad):
    ctx = Context(None, None, ["p"], 1, torch.zeros(1, 4, 2, 2), 16, 16, 2, 7.5)
    with pytest.raises(BadArgument, match="setting"):
        REGISTRY[method].plan(ctx, bad)


def test_every_method_with_a_knob_has_a_typed_config():
    """Each registered method declares a frozen config with its defaults; its default and every
    sweep setting read into it (the short strings parsed once, at the edge)."""
    import dataclasses

    from sharpfast.mitigations.base import MethodConfig

    for name, m in REGISTRY.items():
        if name == "none":
            assert m.config is None
            continue
        assert m.config is not None and issubclass(m.config, MethodConfig), name
        assert dataclasses.is_dataclass(m.config) and m.config.__dataclass_params__.frozen, name
        for setting in (m.default, *m.sweep):
            cfg = m.config.from_setting(setting)
            assert isinstance(cfg, m.config) and m.config.from_setting(cfg) is cfg, (name, setting)
        with pytest.raises(BadArgument):
            m.config.from_setting("zz9")


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_mitigate_never_returns_non_finite_images(sd1, name):
    """A guidance scale that overflows the sampler and NaN latents: a sharpfast error from every
    method (before: non-finite images from all 11 with guidance 1e308, NaN images from six)."""
    from sharpfast.errors import NonFiniteOutput

    kw = dict(num_inference_steps=2, output_type="np")
    with pytest.raises((NonFiniteOutput, BadArgument)):
        mitigate(sd1, PROMPTS[:1], name, FAST_SETTINGS.get(name), guidance_scale=1e308, generator=gen(), **kw)
    lat = torch.full((1, 4, 8, 8), float("nan"))
    with pytest.raises(BadArgument, match="NaN"):
        mitigate(sd1, PROMPTS[:1], name, FAST_SETTINGS.get(name), latents=lat, **kw)
    with pytest.raises(BadArgument, match="floating point"):
        mitigate(sd1, PROMPTS[:1], name, FAST_SETTINGS.get(name), latents=torch.zeros(1, 4, 8, 8, dtype=torch.int64),
                 **kw)
    lat64 = torch.randn(1, 4, 8, 8, dtype=torch.float64)  # on an fp32 pipeline: cast, not a dtype error inside it
    out = mitigate(sd1, PROMPTS[:1], name, FAST_SETTINGS.get(name), latents=lat64, generator=gen(), **kw)
    assert np.isfinite(out.images).all()


BAD_CALLS = [  # (keyword arguments of mitigate, what the message names)
    (dict(height=61), "height must be a multiple of"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_images_per_prompt=10**6), "num_images_per_prompt"),
    (dict(latents=torch.zeros(1, 4, 8, 8, device="meta")), "meta"),
    (dict(latents=torch.zeros(1, 4, 8, 8, dtype=torch.int64)), "floating point"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
]


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_bad_argument_is_refused_before_any_work(sd1, method):
    """Issue 33, items 15 and 18: each bad argument of mitigate is a sharpfast error naming it,
    raised before the method runs (no denoiser call at all: SAIL calibrated 16 s at a size the
    pipeline then refused)."""
    from sharpfast.errors import SharpfastError
    from sharpfast.mitigations.hooks import CallCounter

    model = sharpfast.adapters.adapt(sd1)
    for kwargs, names in BAD_CALLS:
        with CallCounter(model).counting() as count:
            with pytest.raises(SharpfastError, match=names):
                mitigate(sd1, "a cat", method, **kwargs)
        assert count.rows == 0, (method, kwargs)
    if REGISTRY[method].config is None:
        with pytest.raises(BadArgument, match="takes no setting"):
            mitigate(sd1, "a cat", method, "s0t500", num_inference_steps=2)


def test_a_config_built_by_hand_is_checked_too():
    from sharpfast.mitigations.wen_embedding import WenEmbeddingConfig

    with pytest.raises(BadArgument, match="wen_embedding"):
        WenEmbeddingConfig.from_setting(WenEmbeddingConfig(float("nan")))
