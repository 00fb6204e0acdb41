"""Every metric against a reference written here, independently of sharpfast's own helpers:
the UNet is called directly (a float64 copy), predictions are turned into eps and the score in
this file for each prediction type, and derivatives come from reverse-mode autograd (the product
uses finite differences and forward-mode AD). Values AND signs are checked, on SD 1.x (epsilon)
and SD 2.x (v-prediction), at the first step and at a mid-trajectory step where sigma << 1.

These tests exist because the product-level tests once compared the product with itself: a
flipped sign in the v-prediction conversion, a flipped score sign, a dropped 1/sigma^2, an L1
score norm or a wrong Euler alpha_bar all passed every test."""
import copy
import math

import pytest
import torch

import sharpfast
from sharpfast.testing import tiny_pipeline

PROMPTS = ["a red house by the sea", "two dogs on a beach"]


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def pipe(request):
    p = tiny_pipeline(request.param)
    p.set_progress_bar_config(disable=True)
    return p


class Reference:
    """The quantities of SPEC.md at one step, computed from scratch in float64."""

    def __init__(self, pipe, prompts, latents, step_index=0, num_inference_steps=50, guidance_scale=7.5):
        from diffusers.models.attention_processor import AttnProcessor

        self.pt = pipe.scheduler.config.prediction_type
        sched = copy.deepcopy(pipe.scheduler)
        sched.set_timesteps(num_inference_steps)
        x = latents.double() * sched.init_noise_sigma
        self.unet = copy.deepcopy(pipe.unet).double()
        self.unet.set_attn_processor(AttnProcessor())  # plain attention: double backward works everywhere
        with torch.no_grad():
            cond, null = pipe.encode_prompt(prompts, "cpu", 1, True)
        self.cond, self.null = cond.double(), null.double()
        # walk the trajectory with the pipeline's own guided update, in float64
        for i in range(step_index):
            t = sched.timesteps[i]
            with torch.no_grad():
                u, c = self.raw(x, t)
            x = sched.step(u + guidance_scale * (c - u), t, x).prev_sample
        self.t = sched.timesteps[step_index]
        self.x = x
        self.ab = float(sched.alphas_cumprod[int(self.t)])  # DDIM: the UNet sees x itself
        self.sigma = math.sqrt(1 - self.ab)

    def raw(self, x, t):
        out = self.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([self.null, self.cond])).sample
        return out.chunk(2)

    def eps(self, x):
        """(eps_null, eps_cond) from the raw predictions, per prediction type."""
        a, s = math.sqrt(self.ab), self.sigma
        u, c = self.raw(x, self.t)
        if self.pt == "epsilon":
            return u, c
        if self.pt == "v_prediction":  # v = a eps - s x0 and x = a x0 + s eps  =>  eps = a v + s x
            return a * u + s * x, a * c + s * x
        raise AssertionError(self.pt)

    def score(self, x):  # grad log p = -eps / sigma
        u, c = self.eps(x)
        return -u / self.sigma, -c / self.sigma

    def s_delta(self, x):
        u, c = self.score(x)
        return c - u

    # -- the metrics --
    def wen(self):
        with torch.no_grad():
            u, c = self.eps(self.x)
        return (c - u).flatten(1).norm(dim=1)

    def score_norm(self):
        with torch.no_grad():
            return self.score(self.x)[1].flatten(1).pow(2).sum(dim=1)

    def sharpness(self):
        """||H_delta s_delta||: H_delta v by the double-backward trick (reverse mode only)."""
        x = self.x.clone()
        with torch.no_grad():
            v = self.s_delta(x)
        _, hv = torch.autograd.functional.jvp(self.s_delta, x, v)
        return hv.flatten(1).norm(dim=1)

    def jacobian_traces(self, row):
        """(tr H(x, c), tr H_delta) of one image, from full Jacobians."""
        x0 = self.x[row:row + 1]

        def branch(which):
            def f(z):
                x = self.x.clone()
                x[row:row + 1] = z
                u, c = self.score(x)
                return (c if which == "c" else c - u)[row:row + 1].flatten()
            return f

        d = x0.numel()
        jc = torch.autograd.functional.jacobian(branch("c"), x0).reshape(d, d)
        jd = torch.autograd.functional.jacobian(branch("d"), x0).reshape(d, d)
        return float(jc.trace()), float(jd.trace())


def noise(n, seed):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_first_step_metrics_equal_the_reference(pipe):
    lat = noise(2, 11)
    ref = Reference(pipe, PROMPTS, lat)
    res = sharpfast.detect(pipe, PROMPTS, metrics=("wen", "score_norm", "sharpness"), latents=lat, progress=False)
    torch.testing.assert_close(res.scores["wen"].double(), ref.wen(), rtol=2e-4, atol=0)
    torch.testing.assert_close(res.scores["score_norm"].double(), ref.score_norm(), rtol=2e-4, atol=0)
    # fd sharpness against the exact value: a few percent (fd step 0.05 in fp32)
    torch.testing.assert_close(res.scores["sharpness"].double(), ref.sharpness(), rtol=0.05, atol=0)
    exact = sharpfast.detect(pipe, PROMPTS, metrics=("sharpness",), hvp="jvp", latents=lat, progress=False)
    torch.testing.assert_close(exact.scores["sharpness"].double(), ref.sharpness(), rtol=1e-3, atol=0)


def test_mid_trajectory_sigma_well_below_one(pipe):
    """At step 40 of 50 sigma is about 0.5 here: a dropped 1/sigma^2 or a wrong eps conversion
    (whose x term grows as sigma shrinks) is visible, where at the first step sigma ~ 1 hides it."""
    lat = noise(2, 12)
    k = 40
    ref = Reference(pipe, PROMPTS, lat, step_index=k)
    assert ref.sigma < 0.6
    res = sharpfast.detect(pipe, PROMPTS, metrics=("wen", "score_norm", "sharpness"), latents=lat, steps=k + 1,
                           progress=False)
    # detect averages over the first k+1 steps: step k's value is (k+1) mean_{k+1} - k mean_k
    prev = sharpfast.detect(pipe, PROMPTS, metrics=("wen", "score_norm", "sharpness"), latents=lat, steps=k,
                            progress=False)
    at_k = {m: (k + 1) * res.scores[m].double() - k * prev.scores[m].double() for m in res.scores}
    torch.testing.assert_close(at_k["wen"], ref.wen(), rtol=2e-2, atol=0)
    torch.testing.assert_close(at_k["score_norm"], ref.score_norm(), rtol=2e-2, atol=0)
    torch.testing.assert_close(at_k["sharpness"], ref.sharpness(), rtol=0.1, atol=0)


def test_traces_values_and_signs(pipe):
    """trace = -tr H(x, c) and trace_delta = -tr H_delta: the Hutchinson estimate on K probes
    against (1/K) sum v_k^T J v_k on the SAME probes (deterministic; the probes are inputs), and
    its sign against the exact trace of the full Jacobian."""
    from sharpfast.ops._hash import rademacher_signs

    lat = noise(1, 13)
    ref = Reference(pipe, PROMPTS[:1], lat)
    K = 8
    res = sharpfast.detect(pipe, PROMPTS[:1], metrics=("trace", "trace_delta"), latents=lat, num_probes=K,
                           probe_seed=5, progress=False)
    probes = rademacher_signs(K, lat[0].numel(), 5, dtype=torch.float64).view(K, 1, 4, 8, 8)
    on_probes = {"c": 0.0, "d": 0.0}
    for v in probes:
        for which, f in (("c", lambda z: ref.score(z)[1]), ("d", ref.s_delta)):
            _, jv = torch.autograd.functional.jvp(f, ref.x.clone(), v)
            on_probes[which] += float((v * jv).sum()) / K
    tr_c, tr_d = ref.jacobian_traces(0)
    assert float(res.scores["trace"][0]) == pytest.approx(-on_probes["c"], rel=0.05)
    assert float(res.scores["trace_delta"][0]) == pytest.approx(-on_probes["d"], rel=0.05, abs=0.02 * abs(tr_c))
    # the sign of the exact trace: score Jacobians of a (near-Gaussian) density are negative definite
    assert tr_c < 0 and float(res.scores["trace"][0]) > 0
    assert abs(-on_probes["c"] - (-tr_c)) < 0.5 * abs(tr_c), "the estimator estimates the exact trace"


def test_euler_and_ddim_agree_on_alpha_bar_at_equal_t():
    """Euler-type schedulers work in sigma space (x = x0 + sigma eps, input scaled by
    1/sqrt(1 + sigma^2)): alpha_bar must come out as the DDPM alphas_cumprod at the same t."""
    from diffusers import EulerDiscreteScheduler

    from sharpfast.adapters import ScoreModel

    p = tiny_pipeline("sd1", scheduler="euler")
    assert isinstance(p.scheduler, EulerDiscreteScheduler)
    model = ScoreModel(p)
    sched = model.scheduler(50)
    for i in (0, 10, 40):
        t = sched.timesteps[i]
        sched._step_index = i
        sigma = float(sched.sigmas[i])
        ab_ref = 1.0 / (1.0 + sigma ** 2)  # x/sqrt(1+sigma^2) = sqrt(ab) x0 + sqrt(1-ab) eps
        assert model.alpha_bar(sched, t) == pytest.approx(ab_ref, rel=1e-6)
        # and that is the DDPM schedule's alpha_bar at (about) this t
        ab_ddpm = float(sched.alphas_cumprod[int(round(float(t)))])
        assert ab_ref == pytest.approx(ab_ddpm, rel=0.02, abs=1e-4)


# ---- the curvature operators ------------------------------------------------------------

def test_score_jacobian_operator_against_reverse_mode(pipe):
    """ScoreJacobian: jvp matvec = J v and rmatvec = J^T v of the reference; the fd matvec along
    s_Δ has the norm detect reports as sharpness; Hutchinson over the exact operator equals
    (1/K) sum v^T J v on the same probes."""
    from sharpfast.adapters import ScoreModel
    from sharpfast.curvature import ScoreJacobian
    from sharpfast.ops._hash import rademacher_signs

    lat = noise(2, 21)
    ref = Reference(pipe, PROMPTS, lat)
    model = ScoreModel(pipe)
    sched = model.scheduler(50)
    t = sched.timesteps[0]
    cond = model.encode(PROMPTS, 1, *model.default_size())
    x = lat * sched.init_noise_sigma
    ab = model.alpha_bar(sched, t)
    v = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(22))
    for branch, f in (("delta", ref.s_delta), ("cond", lambda z: ref.score(z)[1])):
        jac = ScoreJacobian(model, x, t, ab, cond, branch=branch, mode="jvp")
        _, jv = torch.autograd.functional.jvp(f, ref.x.clone(), v.double())
        torch.testing.assert_close(jac.matvec(v).double(), jv, rtol=1e-3, atol=1e-4 * float(jv.abs().max()))
        _, vj = torch.autograd.functional.vjp(f, ref.x.clone(), v.double())
        torch.testing.assert_close(jac.rmatvec(v).double(), vj, rtol=1e-3, atol=1e-4 * float(vj.abs().max()))
    # the fd operator along s_Δ is the sharpness
    with torch.no_grad():
        s_delta = ref.s_delta(ref.x).float()
    fd = ScoreJacobian(model, x, t, ab, cond, branch="delta", mode="fd")
    sharp = sharpfast.detect(pipe, PROMPTS, metrics=("sharpness",), latents=lat, progress=False).scores["sharpness"]
    torch.testing.assert_close(fd.matvec(s_delta).flatten(1).norm(dim=1), sharp, rtol=2e-3, atol=0)
    # Hutchinson over the exact operator, against the reference on the same probes
    K = 4
    jac = ScoreJacobian(model, x, t, ab, cond, branch="cond", mode="jvp")
    est = jac.trace(num_probes=K, seed=3)
    signs = rademacher_signs(K, 256, 3, dtype=torch.float64).view(K, 1, 4, 8, 8)
    for row in range(2):
        want = 0.0
        for sv in signs:
            vv = torch.zeros(2, 4, 8, 8, dtype=torch.float64)
            vv[row] = sv[0]
            _, jv = torch.autograd.functional.jvp(lambda z: ref.score(z)[1], ref.x.clone(), vv)
            want += float((vv * jv).sum()) / K
        assert float(est[row]) == pytest.approx(want, rel=1e-3)


def test_symmetrized_spectrum_is_real_and_matches_the_full_jacobian(pipe):
    from sharpfast.adapters import ScoreModel

    lat = noise(1, 31)
    ref = Reference(pipe, PROMPTS[:1], lat)
    model = ScoreModel(pipe)
    x = ref.x
    d = x.numel()
    jc = torch.autograd.functional.jacobian(lambda z: ref.score(z)[1].flatten(), x).reshape(d, d)
    sym = torch.linalg.eigvalsh((jc + jc.T) / 2)
    spec = sharpfast.hessian_spectrum(pipe, PROMPTS[0], k=2, conditions=("cond",), which="SA", symmetric=True,
                                      latents=lat * 1.0)
    assert not spec["cond"].is_complex()
    torch.testing.assert_close(spec["cond"].double(), sym[:2], rtol=2e-3, atol=1e-3)
    del model
