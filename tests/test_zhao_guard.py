"""GUARD (`zhao_guard`) against its authors' definition (SPEC "GUARD", read from their
`dual_guidance_call`), written out here: a DDIM sampler in float64 with a cross-attention
processor of its own, three branches per step, their orthogonalization and their cosine-decayed
repulsion; and their attenuation alone (`attenuate`: normal CFG on the attenuated prompt). The
product (float32, batched through the hook registry) may differ from the float64 run by at most
twice what the same reference loses in float32."""
import copy
import math

import pytest
import torch

from sharpfast.errors import BadArgument, UnsupportedPipeline
from sharpfast.mitigations import mitigate
from sharpfast.mitigations.attenuate import AttenuateConfig
from sharpfast.mitigations.zhao_guard import ZhaoGuardConfig, spike_edit
from sharpfast.testing import tiny_pipeline

STEPS = 5


class SpikeAttention:
    """Cross-attention with GUARD's attenuation, as their logger does it (test's own code)."""

    def __init__(self, alpha, tau):
        self.alpha, self.tau = alpha, tau

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b, n, _ = hidden_states.shape
        h = attn.heads
        q, k, v = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        d = q.shape[-1] // h
        q, k, v = (z.reshape(b, -1, h, d).permute(0, 2, 1, 3) for z in (q, k, v))
        logits = q @ k.transpose(-1, -2) / math.sqrt(d)                 # (b, h, queries, tokens)
        m = logits.max(dim=2).values                                    # (b, h, tokens)
        content = m[:, :, 1:]
        z = (m - content.mean(-1, keepdim=True)) / (content.std(-1, keepdim=True) + 1e-6)
        spike = z > self.tau
        spike[:, :, 0] = False
        logits = torch.where(spike[:, :, None, :], self.alpha * logits, logits)
        out = (logits.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(b, n, h * d)
        return attn.to_out[1](attn.to_out[0](out))


def reference(pipe, prompts, latents, r, alpha, tau, dtype, alone=False, every_layer=False):
    """Final latents of GUARD's sampler, every tensor in `dtype` (alone: their attenuation alone,
    u + s (a - u) with no repulsion and no orthogonalization)."""
    unet = copy.deepcopy(pipe.unet).to(dtype)
    plain = dict(unet.attn_processors)
    spiked = {name: (SpikeAttention(alpha, tau) if name.endswith("attn2.processor")
                     and (every_layer or name.startswith("down_blocks") or name.startswith("mid_block")) else p)
              for name, p in plain.items()}
    cond, null = pipe.encode_prompt(prompts, "cpu", 1, True)
    cond, null = cond.to(dtype), null.to(dtype)
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(STEPS)
    x = latents.to(dtype) * sched.init_noise_sigma
    s = 7.5
    with torch.no_grad():
        for i, t in enumerate(sched.timesteps):
            xin = sched.scale_model_input(x, t)
            unet.set_attn_processor(dict(plain))
            u = unet(xin, t, encoder_hidden_states=null).sample
            c = unet(xin, t, encoder_hidden_states=cond).sample
            unet.set_attn_processor(dict(spiked))
            a = unet(xin, t, encoder_hidden_states=cond).sample
            if alone:
                x = sched.step(u + s * (a - u), t, x).prev_sample
                continue
            va, vc = a - u, c - u
            out = []
            for j in range(len(x)):                                     # their orthogonalization, per image
                dot = (va[j] * vc[j]).sum()
                nc2 = (vc[j] * vc[j]).sum() + 1e-8
                cos = dot / (torch.sqrt((va[j] * va[j]).sum() + 1e-8) * torch.sqrt(nc2))
                coef = min(max(float(dot / nc2), -2.0), 2.0)
                out.append(va[j] - coef * vc[j] if float(cos) > 0.9 else va[j])
            va = torch.stack(out)
            w = r * math.cos(math.pi / 2 * i / STEPS)
            x = sched.step(u + s * va - w * vc, t, x).prev_sample
    return x


@pytest.fixture(scope="module")
def sd1():
    p = tiny_pipeline("sd1")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.mark.parametrize("setting", [(2.0, 0.3, 0.1), (1.0, 0.1, 0.01), (3.0, 0.5, -0.2)])
def test_guard_matches_its_authors_definition_in_float64(sd1, setting):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    g = torch.Generator().manual_seed(seed)
    prompts = ["a red house by the sea", "two dogs on a beach at night"]
    latents = torch.randn(2, 4, 8, 8, generator=g)
    r, alpha, tau = setting
    got = mitigate(sd1, prompts, "zhao_guard", setting, latents=latents.clone(), num_inference_steps=STEPS,
                   output_type="latent").images.double()
    want = reference(sd1, prompts, latents, r, alpha, tau, torch.float64)
    own = (reference(sd1, prompts, latents, r, alpha, tau, torch.float32).double() - want).abs().max().item()
    plain = sd1(prompts, latents=latents.clone(), num_inference_steps=STEPS, output_type="latent").images.double()
    err = (got - want).abs().max().item()
    assert err <= 2 * own + 1e-6, f"seed {seed}: {err} vs the reference's own float32 error {own}"
    assert (plain - want).abs().max().item() > 100 * max(err, 1e-6), f"seed {seed}: GUARD changed nothing"


def test_spike_edit_attenuates_the_spiking_positions_only():
    # one row, one head, two queries, five tokens: token 3 spikes; BOS (0) is never attenuated
    scores = torch.tensor([[[[9.0, 0.1, 0.2, 3.0, 0.1], [8.0, 0.0, 0.1, 2.5, 0.2]]]])
    out = spike_edit(0.3, 1.0)(scores.clone(), None)
    want = scores.clone()
    want[..., 3] *= 0.3
    torch.testing.assert_close(out, want)
    assert torch.equal(spike_edit(0.3, 10.0)(scores.clone(), None), scores), "no z above 10: nothing changes"


def test_settings_and_families():
    assert ZhaoGuardConfig.from_setting("r2") == ZhaoGuardConfig(2.0, 0.3, 0.1)
    assert ZhaoGuardConfig.from_setting("r1a0.5t0.01") == ZhaoGuardConfig(1.0, 0.5, 0.01)
    assert ZhaoGuardConfig.from_setting(4) == ZhaoGuardConfig(4.0)
    for bad in ("a0.3", "r1x2", "zz9", (float("nan"), 0.3, 0.1), (-1.0, 0.3, 0.1), "r1a-0.5"):
        with pytest.raises(BadArgument, match="zhao_guard"):
            ZhaoGuardConfig.from_setting(bad)
    flux = tiny_pipeline("flux")
    with pytest.raises(UnsupportedPipeline, match="zhao_guard"):
        mitigate(flux, "a cat", "zhao_guard", num_inference_steps=2)


@pytest.mark.parametrize("setting", ["a0.3t0.01", "a0t0.5", "a0.5t-0.3all"])
def test_attenuation_alone_matches_its_authors_definition_in_float64(sd1, setting):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    g = torch.Generator().manual_seed(seed)
    prompts = ["a red house by the sea", "two dogs on a beach at night"]
    latents = torch.randn(2, 4, 8, 8, generator=g)
    cfg = AttenuateConfig.from_setting(setting)
    got, info = mitigate(sd1, prompts, "attenuate", setting, latents=latents.clone(), num_inference_steps=STEPS,
                         output_type="latent", return_info=True)
    got = got.images.double()
    assert info["unet_calls_per_image"] == STEPS, "no extra network call"
    kw = dict(alone=True, every_layer=cfg.every_layer)
    want = reference(sd1, prompts, latents, 0.0, cfg.alpha, cfg.tau, torch.float64, **kw)
    own = (reference(sd1, prompts, latents, 0.0, cfg.alpha, cfg.tau, torch.float32, **kw).double()
           - want).abs().max().item()
    plain = sd1(prompts, latents=latents.clone(), num_inference_steps=STEPS, output_type="latent").images.double()
    err = (got - want).abs().max().item()
    assert err <= 2 * own + 1e-6, f"seed {seed}: {err} vs the reference's own float32 error {own}"
    assert (plain - want).abs().max().item() > 100 * max(err, 1e-6), f"seed {seed}: the attenuation changed nothing"


def test_attenuate_settings():
    assert AttenuateConfig.from_setting("a0.3") == AttenuateConfig(0.3, 0.01, False)
    assert AttenuateConfig.from_setting("a0t1all") == AttenuateConfig(0.0, 1.0, True)
    for bad in ("t0.1", "a-1", "a0.3x", (float("inf"), 0.1), "alla0.3"):
        with pytest.raises(BadArgument, match="attenuate"):
            AttenuateConfig.from_setting(bad)
