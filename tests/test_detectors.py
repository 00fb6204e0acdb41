"""The newer detectors of the registry (wen_low, anisotropy and its two terms, attn_entropy) and
the combined detector, each against a computation written here from raw UNet outputs in float64
(the same pattern as tests/test_reference.py), with batch invariance and the pipeline left as it was."""
import copy
import math

import numpy as np
import pytest
import torch
from pipeline_state import assert_same, snapshot

import sharpfast
from sharpfast.errors import BadArgument
from sharpfast.testing import tiny_pipeline

PROMPTS = ["a red house by the sea", "two dogs on a beach", "an old map of a city"]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pipe(request):
    p = tiny_pipeline(request.param)
    p.set_progress_bar_config(disable=True)
    return p


def noise(n, seed):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


class Raw:
    """eps of the null and conditional branch at any DDIM timestep index, from a float64 UNet."""

    def __init__(self, pipe, prompts, latents, steps=50):
        from diffusers.models.attention_processor import AttnProcessor

        self.pt = pipe.scheduler.config.prediction_type
        self.sched = copy.deepcopy(pipe.scheduler)
        self.sched.set_timesteps(steps)
        self.x = latents.double() * self.sched.init_noise_sigma
        self.unet = copy.deepcopy(pipe.unet).double()
        self.unet.set_attn_processor(AttnProcessor())
        with torch.no_grad():
            cond, null = pipe.encode_prompt(prompts, "cpu", 1, True)
        self.cond, self.null = cond.double(), null.double()

    def eps(self, k):
        t = self.sched.timesteps[k]
        ab = float(self.sched.alphas_cumprod[int(t)])
        a, s = math.sqrt(ab), math.sqrt(1 - ab)
        with torch.no_grad():
            u, c = self.unet(torch.cat([self.x, self.x]), t,
                             encoder_hidden_states=torch.cat([self.null, self.cond])).sample.chunk(2)
        if self.pt == "v_prediction":  # eps = a v + s x
            return a * u + s * self.x, a * c + s * self.x
        return u, c


def test_wen_low_and_anisotropy_equal_the_reference(pipe):
    lat = noise(len(PROMPTS), 5)
    raw = Raw(pipe, PROMPTS, lat)
    res = sharpfast.detect(pipe, PROMPTS, latents=lat, progress=False,
                           metrics=("wen_low", "channel_wen", "aniso_align", "anisotropy"))
    u, c = raw.eps(49)  # the last timestep, at x_T
    torch.testing.assert_close(res.scores["wen_low"].double(), (c - u).flatten(1).norm(dim=1), rtol=2e-4, atol=0)
    u, c = raw.eps(0)
    unit = lambda e: e.flatten(2) / e.flatten(2).norm(dim=2, keepdim=True)  # noqa: E731 (per channel)
    norm = (unit(c) - unit(u)).flatten(1).norm(dim=1)
    torch.testing.assert_close(res.scores["channel_wen"].double(), norm, rtol=2e-4, atol=0)
    u, c = raw.eps(47)  # third-to-last
    g = c - u
    cos = (u * g).sum(dim=1) / (u.norm(dim=1) * g.norm(dim=1))  # over channels, per pixel
    align = cos.flatten(1).mean(dim=1)
    torch.testing.assert_close(res.scores["aniso_align"].double(), align, rtol=1e-3, atol=1e-5)
    g2 = 2.0 if raw.pt == "epsilon" else 0.1  # the authors' SD 1.4 / SD 2.0 weights
    u0, c0 = raw.eps(0)
    wen = (c0 - u0).flatten(1).norm(dim=1)  # their executed norm term is Wen's plain ||eps_c - eps_null||
    torch.testing.assert_close(res.scores["anisotropy"].double(), wen + g2 * align, rtol=1e-3, atol=1e-5)
    # the norm term is wen, not the channel-normalized norm: the two differ on this model
    assert not torch.allclose(res.scores["anisotropy"].double(), norm + g2 * align, rtol=1e-2)
    assert res.config["unet_calls"] == 1 + 1 + 1  # the step's call, the last timestep's, the third-to-last's
    alone = sharpfast.detect(pipe, PROMPTS, latents=lat, progress=False, metrics=("channel_wen",))
    assert alone.config["unet_calls"] == 1  # the norm term is free: the step's own call


@pytest.mark.parametrize("n", [2, 5])
def test_wen_low_with_probe_noises_equals_the_reference(pipe, n):
    """wen_low@n: the mean over the image's own noise and n-1 probe noises (standard normal, drawn
    on the CPU from probe_seed; the same probes for every image) of ||eps_c - eps_null|| at the
    last timestep, in one batched call."""
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    print(f"seed {seed}")
    lat = noise(len(PROMPTS), seed)
    probe_seed = 1 + seed % 1000  # never 0, the default: a seed ignored shows
    probes = torch.randn(n - 1, 4, 8, 8, generator=torch.Generator().manual_seed(probe_seed))
    norms = []
    for x in [lat] + [z.expand(len(PROMPTS), 4, 8, 8) for z in probes]:
        u, c = Raw(pipe, PROMPTS, x.clone()).eps(49)
        norms.append((c - u).flatten(1).norm(dim=1))
    ref = torch.stack(norms).mean(dim=0)
    res = sharpfast.detect(pipe, PROMPTS, latents=lat, progress=False, metrics=(f"wen_low@{n}", "wen_low"),
                           probe_seed=probe_seed)
    torch.testing.assert_close(res.scores[f"wen_low@{n}"].double(), ref, rtol=2e-4, atol=0)
    torch.testing.assert_close(res.scores["wen_low"].double(), norms[0], rtol=2e-4, atol=0)
    assert res.config["unet_calls"] == 1 + 1 + 1  # the step's, wen_low's, and one call for all n noises
    assert res.config["unet_rows"] == 2 * len(PROMPTS) * (1 + 1 + n)
    one = sharpfast.detect(pipe, PROMPTS[1:2], latents=lat[1:2], progress=False, metrics=(f"wen_low@{n}",),
                           probe_seed=probe_seed)  # the probes do not depend on the batch
    torch.testing.assert_close(one.scores[f"wen_low@{n}"], res.scores[f"wen_low@{n}"][1:2], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["wen_low@1", "wen_low@17", "wen_low@02", "wen_low@", "wen@4", "wen_low@4@4",
                                  "wen_low@-2", "wen_low@ 4"])
def test_a_bad_probed_metric_name_is_refused(name):
    p = tiny_pipeline("sd1")
    with pytest.raises(BadArgument, match="wen_low@n"):
        sharpfast.detect(p, PROMPTS[:1], metrics=(name,), progress=False)
    with pytest.raises(BadArgument, match="metric"):
        sharpfast.guard(p, metric=name, threshold=1.0)


def test_attention_entropy_equals_the_reference(pipe):
    """The entropy over tokens of every cross-attention map (attn2) of the conditional branch,
    from queries and keys captured at each attn2 module's input and softmax written here."""
    lat = noise(2, 9)
    prompts = PROMPTS[:2]
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(50)
    x, t = lat * sched.init_noise_sigma, sched.timesteps[0]
    with torch.no_grad():
        cond, _ = pipe.encode_prompt(prompts, "cpu", 1, True)
    per_layer = []

    def pre(mod, args, kwargs):
        h = (args[0] if args else kwargs["hidden_states"]).double()
        ctx = kwargs.get("encoder_hidden_states").double()
        q = torch.nn.functional.linear(h, mod.to_q.weight.double())
        k = torch.nn.functional.linear(ctx, mod.to_k.weight.double())
        b, heads = q.shape[0], mod.heads
        q = q.view(b, q.shape[1], heads, -1).transpose(1, 2)
        k = k.view(b, k.shape[1], heads, -1).transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        per_layer.append(-(p * p.log()).sum(-1).mean(dim=(1, 2)))

    hooks = [m.register_forward_pre_hook(pre, with_kwargs=True) for name, m in pipe.unet.named_modules()
             if name.endswith("attn2")]
    try:
        with torch.no_grad():
            pipe.unet(x, t, encoder_hidden_states=cond)
    finally:
        for h in hooks:
            h.remove()
    assert per_layer
    ref = torch.stack(per_layer).mean(dim=0)
    before = snapshot(pipe)
    res = sharpfast.detect(pipe, prompts, latents=lat, metrics=("attn_entropy",), progress=False)
    assert_same(before, snapshot(pipe))  # the recording processors are gone again
    torch.testing.assert_close(-res.scores["attn_entropy"].double(), ref, rtol=1e-4, atol=0)
    assert float(ref.min()) > 0 and float(ref.max()) <= math.log(77) + 1e-9


def test_batch_invariance_and_pipeline_left_as_it_was():
    p = tiny_pipeline("sdxl")
    p.set_progress_bar_config(disable=True)
    metrics = ("wen_low", "anisotropy", "channel_wen", "aniso_align", "attn_entropy")
    lat = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    before = snapshot(p)
    together = sharpfast.detect(p, PROMPTS, metrics=metrics, latents=lat, batch_size=3, progress=False)
    alone = [sharpfast.detect(p, [q], metrics=metrics, latents=lat[i:i + 1], progress=False)
             for i, q in enumerate(PROMPTS)]
    assert_same(before, snapshot(p))
    for m in metrics:
        got = torch.cat([a.scores[m] for a in alone])
        torch.testing.assert_close(together.scores[m], got, rtol=1e-4, atol=1e-5)


def test_guard_scores_the_new_detectors_as_detect_does():
    p = tiny_pipeline("sd1")
    p.set_progress_bar_config(disable=True)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    for m in ("wen_low", "anisotropy", "attn_entropy"):
        det = sharpfast.detect(p, PROMPTS, metrics=(m,), generator=g(), num_inference_steps=5, progress=False)
        with sharpfast.guard(p, metric=m, threshold=float("inf"), mitigation=None) as guarded:
            out = guarded(PROMPTS, generator=g(), num_inference_steps=5, output_type="pt")
        got = torch.tensor([r["score"] for r in out.memorization])
        torch.testing.assert_close(got, det.scores[m], rtol=1e-4, atol=1e-6)
    assert not p.unet._forward_hooks


def test_combined_detector_standardizes_on_normal_prompts_only():
    from sharpfast.roc import CombinedDetector

    rng = np.random.default_rng(0)
    normal = {"a": rng.lognormal(0, 0.5, 50), "b": rng.normal(0, 2, 50)}
    det = CombinedDetector(("a", "b")).fit(normal)
    la = np.log(normal["a"])
    mad = lambda v: 1.4826 * np.median(np.abs(v - np.median(v)))  # noqa: E731
    new = {"a": np.array([1.0, 10.0]), "b": np.array([0.0, 5.0])}
    want = ((np.log(new["a"]) - np.median(la)) / mad(la) + (new["b"] - np.median(normal["b"])) / mad(normal["b"])) / 2
    np.testing.assert_allclose(det.score(new), want, rtol=1e-12)
    again = CombinedDetector.from_dict(det.to_dict())
    np.testing.assert_allclose(again.score(new), want, rtol=1e-12)
    with pytest.raises(ValueError, match="fit"):
        CombinedDetector(("a",)).score(new)
    with pytest.raises(ValueError, match="at least 10"):
        CombinedDetector(("a",)).fit({"a": [1.0, 2.0]})
    with pytest.raises(ValueError, match="NaN"):
        det.score({"a": [np.nan], "b": [0.0]})
