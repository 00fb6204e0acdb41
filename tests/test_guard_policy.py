"""The guard's policy: a gate as a share of the model's normal captions (its cut read from the
calibration), "always", and tiers that raise the strength per prompt; each image's report says
what was decided and why; the outputs are those of `mitigate` with the decided setting."""
import json

import pytest
import torch

import sharpfast
from sharpfast.errors import BadArgument
from sharpfast.guarding import Policy
from sharpfast.guarding.policy import Multiple
from sharpfast.mitigations.hooks import CallCounter
from sharpfast.testing import tiny_pipeline


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def digits():
    p = sharpfast.zoo.load("digits")
    p.set_progress_bar_config(disable=True)
    return p


def test_policy_text_and_errors():
    assert Policy.parse("0.3,0.01:s0t300") == Policy(0.3, ((0.01, "s0t300"),))
    assert Policy.parse("always").always and Policy.parse("always").text() == "always"
    assert Policy.parse("0.5,0.01:s0t300,0.1:s0t400").tiers == ((0.1, "s0t400"), (0.01, "s0t300"))
    gated = Policy.parse("0.05:s1t0,0.01:s0t300")  # the gate with its own setting
    assert gated == Policy(0.05, ((0.01, "s0t300"),), "s1t0") and gated.text() == "0.05:s1t0,0.01:s0t300"
    assert Policy.parse("always:s1t0").always and Policy.parse("always:s1t0").setting == "s1t0"
    for bad in ("0.25", "", "0.3,0.01", "0.3,0.5:s0t300", "nan", "-1", "0.3,x:s0t300", "0.01:", ":s1t0",
                "0.01: ,0.01:s0t300"):
        with pytest.raises(BadArgument):
            Policy.parse(bad)
    with pytest.raises(BadArgument):
        Policy(True)


def test_multiple_tiers_text_and_errors():
    p = Policy.parse("0.01:s1.25t0,x3:s1t500g0.5,x2:s1t0")
    assert p.tiers == ((Multiple(2.0), "s1t0"), (Multiple(3.0), "s1t500g0.5")), "weakest first"
    assert p.text() == "0.01:s1.25t0,x2:s1t0,x3:s1t500g0.5" and Policy.parse(p.text()) == p
    assert p.shares() == [0.01, 0.5], "a multiple needs the gate's cut and the median's"
    # what a request reads from the calibration besides the threshold (the 1% gate's cut is it)
    assert p.calibrated_shares() == [0.5] and Policy(0.01).calibrated_shares() == []
    assert Policy.parse("always,0.01:s0t200").calibrated_shares() == [0.01]
    assert Policy.parse("0.3,0.01:s0t300").calibrated_shares() == [0.3, 0.01]
    for bad in ("always,x3:s1t0", "0.5,x3:s1t0", "0.7,x2:s1t0", "0.01,x1:s1t0", "0.01,x0.5:s1t0", "0.01,xnan:s1t0",
                "0.01,xinf:s1t0", "0.01,x:s1t0", "0.01,x-3:s1t0", "0.3,0.01:s1t0,x3:s1t0", "0.01,x3"):
        with pytest.raises(BadArgument):
            Policy.parse(bad)


def test_multiple_tier_decides_by_the_gate_margin_over_the_median():
    cuts = {0.01: 0.5, 0.5: 0.3}  # margin 0.2: x2 cuts at 0.7, x3 at 0.9
    p = Policy.parse("0.01:gate,x2:mid,x3:far")
    assert p.decide(0.45, cuts, "base")[:2] == (False, "gate")
    assert p.decide(0.6, cuts, "base")[:2] == (True, "gate")
    assert p.decide(0.8, cuts, "base")[:2] == (True, "mid")
    assert p.decide(0.95, cuts, "base")[:2] == (True, "far")
    assert p.decide(0.9, cuts, "base")[1] == "mid", "above is score > cut"
    assert "x3" in p.decide(0.95, cuts, "base")[2] and "0.9" in p.decide(0.95, cuts, "base")[2]
    assert Policy.parse("0.01,x2:mid").decide(0.8, cuts, "base")[:2] == (True, "mid")
    with pytest.raises(BadArgument, match="not above"):  # a threshold given under the median: no margin
        p.decide(0.8, {0.01: 0.2, 0.5: 0.3}, "base")


def test_decide_by_hand():
    cuts = {0.3: 1.0, 0.01: 2.0}
    p = Policy(0.3, ((0.01, "strong"),))
    assert p.decide(0.5, cuts, "base")[:2] == (False, "base")
    assert p.decide(1.5, cuts, "base")[:2] == (True, "base")
    assert p.decide(2.5, cuts, "base")[:2] == (True, "strong")
    assert p.decide(1.0, cuts, "base")[0] is False, "flagged is score > cut"
    assert Policy("always").decide(-1e9, {}, "base")[:2] == (True, "base")
    gated = Policy(0.3, ((0.01, "strong"),), "gate")  # the gate's own setting replaces the guard's
    assert gated.decide(1.5, cuts, "base")[:2] == (True, "gate")
    assert gated.decide(2.5, cuts, "base")[:2] == (True, "strong")
    assert gated.decide(0.5, cuts, "base")[0] is False


@pytest.mark.parametrize("policy, base", [("0.3,0.01:s0t300", "s0t450"), ("0.3:s1t500g0.5,0.01:s0t300", "s1t500g0.5"),
                                          ("0.3:s1t0,x2:s0t300", "s1t0")])
def test_gate_reads_the_calibrated_cut_and_tiers_set_the_strength(digits, policy, base):
    cal = json.load(open(sharpfast.zoo.path("digits") + "/calibration.json"))["wen_low"]
    mem = [r["prompt"] for r in sharpfast.zoo.prompts("digits", "memorized")[:2]]
    normal = [r["prompt"] for r in sharpfast.zoo.prompts("digits", "non_memorized")[:2]]
    prompts = mem + normal
    kw = dict(num_inference_steps=50, output_type="pt")
    with sharpfast.guard(digits, policy=policy) as g:
        out = g(prompts, generator=[gen(i) for i in range(4)], **kw)
        assert g.threshold == g.calibrate() == cal["gate_0.3"], "the guard's threshold is its gate's cut"
    reps = out.memorization
    assert all(r["threshold"] == cal["gate_0.3"] and r["policy"] == policy for r in reps)
    # the strong tier's cut, from the calibration by hand: the 1% cut, or the median plus twice
    # the gate's margin over it
    strong_cut = cal["gate_0.01"] if "x2" not in policy else cal["gate_0.5"] + 2 * (cal["gate_0.3"] - cal["gate_0.5"])
    for i, r in enumerate(reps):
        assert r["flagged"] == (r["score"] > cal["gate_0.3"]), r
        strong = r["score"] > strong_cut
        assert r["setting"] == (("s0t300" if strong else base) if r["flagged"] else None), r
        assert ("0.01 cut" in r["decision"] or "x2" in r["decision"]) == (strong and r["flagged"]), r["decision"]
        # the image is mitigate()'s with the decided setting, or plain pipe(...)'s
        if r["flagged"]:
            want = sharpfast.mitigate(digits, prompts[i], "transition", r["setting"], generator=gen(i), **kw).images
        else:
            want = digits(prompts[i], generator=gen(i), **kw).images
        torch.testing.assert_close(out.images[i:i + 1], want, rtol=0, atol=1e-5)
    assert any(r["setting"] == "s0t300" for r in reps) and any(not r["flagged"] for r in reps), \
        "the test needs both a strong tier and an unflagged prompt"
    assert any(r["setting"] == base for r in reps), "the test needs a prompt at the gate's setting"


def test_always_mitigates_every_prompt_without_restarting_a_step():
    p = tiny_pipeline("sd1")
    p.set_progress_bar_config(disable=True)
    prompts = ["a red house by the sea", "two dogs"]
    kw = dict(num_inference_steps=5, output_type="pt")
    want = sharpfast.mitigate(p, prompts, "transition", "s0t500", generator=gen(), **kw).images
    with sharpfast.guard(p, metric="wen", threshold=float("inf"), setting="s0t500", policy="always") as g:
        with CallCounter(sharpfast.adapters.adapt(p)).counting() as count:
            out = g(prompts, generator=gen(), **kw)
    # every prompt selected and mitigated; none flagged: flagged is the detector's verdict at the stated threshold
    assert all(r["selected"] and r["mitigated"] and r["decision"] == "policy always" and not r["flagged"]
               for r in out.memorization)
    torch.testing.assert_close(out.images, want, rtol=0, atol=1e-6)
    assert count.rows == 5 * 2 * len(prompts), "one generation, no step restarted, wen costs no call"


def test_tiers_need_a_trajectory_method_and_valid_settings(digits):
    with pytest.raises(BadArgument, match="tiers"):
        sharpfast.guard(digits, mitigation="sail_guard", policy="0.3,0.01:1.0")
    with pytest.raises(BadArgument, match="transition"):
        sharpfast.guard(digits, policy="0.3,0.01:zz9")
    with pytest.raises(BadArgument, match="gate"):
        sharpfast.guard(digits, threshold=0.5, policy="0.3")
    with pytest.raises(BadArgument, match="disagree"):
        sharpfast.guard(digits, setting="s0t450", policy="0.3:s1t0")
    with pytest.raises(BadArgument, match="transition"):
        sharpfast.guard(digits, policy="0.3:zz9")
    with pytest.raises(BadArgument, match="no mitigation"):
        sharpfast.guard(digits, mitigation=None, policy="0.3:s1t0")


def test_auto_reads_the_policy_calibrated_for_these_weights(tmp_path):
    """policy="auto" (the default) is the policy calibration.json holds for the model's weights;
    a file of other weights, or none, gives the default gate."""
    import shutil

    from diffusers import StableDiffusionPipeline

    src = sharpfast.zoo.path("digits")
    dst = tmp_path / "digits"
    shutil.copytree(src, dst)
    cal = json.loads((dst / "calibration.json").read_text())
    cal["policy"] = {"policy": "0.3,0.01:s0t300", "chosen_on": "a test"}
    (dst / "calibration.json").write_text(json.dumps(cal))
    pipe = StableDiffusionPipeline.from_pretrained(str(dst), local_files_only=True)
    with sharpfast.guard(pipe) as g:
        assert g.config.policy == Policy.parse("0.3,0.01:s0t300") and "a test" in g.config.policy_source
    with sharpfast.guard(pipe, policy="0.1") as g:
        assert g.config.policy == Policy(0.1) and g.config.policy_source == "given"
    with sharpfast.guard(pipe, threshold=0.5) as g:  # a number is the gate itself
        assert g.config.policy == Policy(0.01)
    # a calibrated gate setting: the guard's setting; one asked for replaces it (tiers kept); another
    # method keeps the gate alone (the calibrated settings are transition's)
    cal["policy"] = {"policy": "0.3:s1t0,0.01:s0t300", "chosen_on": "a test"}
    (dst / "calibration.json").write_text(json.dumps(cal))
    pipe = StableDiffusionPipeline.from_pretrained(str(dst), local_files_only=True)
    with sharpfast.guard(pipe) as g:
        assert g.config.setting == "s1t0" and g.config.policy == Policy.parse("0.3:s1t0,0.01:s0t300")
    with sharpfast.guard(pipe, setting="s0t500") as g:
        assert g.config.setting == "s0t500" and g.config.policy == Policy.parse("0.3,0.01:s0t300")
    with sharpfast.guard(pipe, mitigation="attention_rescale") as g:
        assert g.config.policy == Policy(0.3) and g.config.setting == 1.25
    with sharpfast.guard(pipe, threshold=0.5) as g:  # the number is the gate; the gate's calibrated setting stays
        assert g.config.policy == Policy(0.01, (), "s1t0") and g.config.setting == "s1t0"
    cal["weights"]["fingerprint"] = "0" * 16  # a policy calibrated for other weights is not used
    (dst / "calibration.json").write_text(json.dumps(cal))
    with sharpfast.guard(StableDiffusionPipeline.from_pretrained(str(dst), local_files_only=True)) as g:
        assert g.config.policy == Policy(0.01) and "no policy calibrated" in g.config.policy_source


def test_choose_policy_keeps_to_the_budget():
    from zoo_scripts.choose_policy import choose

    def point(policy, copies, mem, normal):
        return {"policy": policy, "summary": {"guard": {"copies_at_0.8": copies}, "fidelity_ratio": mem,
                                              "normal": {"fidelity_ratio": normal}}}

    budget = {"normal_fidelity": 0.97, "memorized_fidelity": 0.95}
    pts = [point("0.01", 0.4, 0.99, 1.0), point("0.3", 0.2, 0.99, 0.96), point("0.1", 0.3, 0.96, 0.98),
           point("always", 0.3, 0.97, 0.99)]
    assert choose(pts, budget)["policy"] == "0.1", "fewest copies inside the budget; a tie to the smaller gate"
    assert choose([point("0.3", 0.2, 0.9, 1.0)], budget) is None


@pytest.mark.parametrize("tier, online", [("s0t200", True), ("s-1t600", False)])
def test_always_with_tiers_switches_online_after_the_first_step(digits, tier, online):
    """Issue 32, item 2: under "always" with a tier, every row starts on the guard's setting and
    the rows above the tier's cut switch to it after the first step's decision, in ONE generation,
    when both settings give the first step the same guidance (transition's same_step: s0t450 and
    s0t200 both run it at scale 0); each image equals mitigate()'s with the prompt's decided
    setting. A tier whose first step differs (s-1t600: opposite guidance from the start) restarts
    the request instead, with the same images. Calls counted: one generation, or one restarted step."""
    mem = [r["prompt"] for r in sharpfast.zoo.prompts("digits", "memorized")[:2]]
    normal = [r["prompt"] for r in sharpfast.zoo.prompts("digits", "non_memorized")[:2]]
    prompts = mem + normal
    kw = dict(num_inference_steps=20, output_type="pt")
    policy = f"always,0.01:{tier}"
    with sharpfast.guard(digits, metric="wen", policy=policy) as g:
        g.calibrate(num_inference_steps=20)  # (its cuts at 20 steps: not counted below)
        with CallCounter(sharpfast.adapters.adapt(digits)).counting() as count:
            out = g(prompts, generator=[gen(i) for i in range(4)], **kw)
    reps = out.memorization
    settings = [r["setting"] for r in reps]
    assert tier in settings and "s0t450" in settings, f"the test needs both settings: {reps}"
    assert all(r["selected"] and r["mitigated"] for r in reps), reps
    for i, r in enumerate(reps):
        want = sharpfast.mitigate(digits, prompts[i], "transition", r["setting"], generator=gen(i), **kw).images
        torch.testing.assert_close(out.images[i:i + 1], want, rtol=0, atol=1e-5)
    one_generation = 20 * 2 * len(prompts)
    assert count.rows == (one_generation if online else one_generation + 2 * len(prompts)), count.rows


def test_calibrated_tiers_under_concurrent_requests(digits):
    """A policy with a gate of its own setting and a multiple tier (the digits model's calibrated
    policy before the decode fix) from 6 threads at once: every report and image equals the
    sequential call's, and each image is mitigate()'s with its reported setting (or plain
    pipe(...)'s when unflagged)."""
    from concurrent.futures import ThreadPoolExecutor

    kw = dict(num_inference_steps=50, output_type="pt")
    mem = [r["prompt"] for r in sharpfast.zoo.prompts("digits", "memorized")[:12]]
    with sharpfast.guard(digits, mitigation=None) as probe:  # scores only: pick prompts on each side of the tier
        reps = probe(mem, generator=[gen(i) for i in range(len(mem))], **kw).memorization
    with sharpfast.guard(digits, policy="0.01:s1.25t0,x3:s1t500g0.5") as g:
        (tier, tier_setting), = g.config.policy.tiers
        cal = json.load(open(sharpfast.zoo.path("digits") + "/calibration.json"))["wen_low"]
        cut = cal["gate_0.5"] + tier.m * (cal["gate_0.01"] - cal["gate_0.5"])  # the tier's cut, by hand
        strong = [(p, i) for i, (p, r) in enumerate(zip(mem, reps)) if r["score"] > cut][:2]
        gated = [(p, i) for i, (p, r) in enumerate(zip(mem, reps)) if g.threshold < r["score"] <= cut][:2]
        normal = [(r["prompt"], 100 + i) for i, r in enumerate(sharpfast.zoo.prompts("digits", "non_memorized")[:2])]
        jobs = strong + gated + normal
        assert len(strong) == 2 and len(gated) == 2, "the test needs prompts on both sides of the tier's cut"

        def run(job):
            out = g([job[0]], generator=gen(job[1]), **kw)
            return out.memorization[0], out.images

        sequential = [run(j) for j in jobs]
        with ThreadPoolExecutor(len(jobs)) as ex:
            together = list(ex.map(run, jobs))
    settings = [r["setting"] for r, _ in sequential]
    assert settings[:4] == [tier_setting] * 2 + [g.config.policy.setting] * 2, settings
    assert None in settings[4:], "the test needs an unflagged prompt"
    for (p, seed), (a, ia), (b, ib) in zip(jobs, together, sequential):
        assert a == b
        assert torch.equal(ia, ib), a["prompt"]
        if a["flagged"]:
            want = sharpfast.mitigate(digits, p, "transition", a["setting"], generator=gen(seed), **kw).images
        else:
            want = digits(p, generator=gen(seed), **kw).images
        torch.testing.assert_close(ia, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("policy", ["always,0.01:s0t200", "0.3", "0.01:s1.25t0,x3:s1t500g0.5"])
def test_calibrate_resolves_every_cut_the_policy_reads(digits, policy):
    """A guard that serves only what it calibrated (calibrate_new=False: the server's) resolves in
    calibrate() the cuts of its policy's gate and tiers too, so that a request at that setting is
    served, not refused as uncalibrated (a tiered policy's first request was refused)."""
    with sharpfast.guard(digits, policy=policy, calibrate_new=False) as g:
        g.calibrate(num_inference_steps=10)
        out = g(["a handwritten zero"], generator=gen(1), num_inference_steps=10, output_type="pt")
    assert out.memorization[0]["policy"] == policy


@pytest.mark.parametrize("metric", ["wen_low", "sharpness"])
@pytest.mark.parametrize("policy,mitigation", [("always:s1t0", "auto"), ("always:s1t500g0.5", "auto"),
                                               ("always", "attenuate"), ("always", "attention_rescale")])
def test_always_scores_the_model_not_the_mitigated_model(digits, metric, policy, mitigation):
    """Under "always" the mitigation's hooks are on from the first step; the score must still be
    the model's, the one a plain first step gives (a score-only guard), and the network's own
    attention processors are back afterwards. wen_low's low-noise call and sharpness's second call
    went through the guidance rule (under s1t500g0.5 a memorized caption scored 0.04 for 0.60 and
    no memorized prompt was flagged), and an attention edit changed the captured step itself."""
    kw = dict(num_inference_steps=10, output_type="pt")
    prompts = [sharpfast.zoo.prompts("digits", "memorized")[0]["prompt"], "a handwritten seven"]
    own = {k: type(v) for k, v in digits.unet.attn_processors.items()}
    with sharpfast.guard(digits, metric=metric, mitigation=None) as ref:
        want = [r["score"] for r in ref(prompts, generator=gen(3), **kw).memorization]
    with sharpfast.guard(digits, metric=metric, mitigation=mitigation, policy=policy) as g:
        out = g(prompts, generator=gen(3), **kw)
    got = out.memorization
    assert all(r["mitigated"] for r in got), got
    assert [r["score"] for r in got] == pytest.approx(want, rel=1e-4), (want, got)
    assert {k: type(v) for k, v in digits.unet.attn_processors.items()} == own
    # the mitigation still ran on every step (the edits stood aside for the score only)
    want_images = sharpfast.mitigate(digits, prompts, got[0]["mitigation"], got[0]["setting"], generator=gen(3),
                                     **kw).images
    torch.testing.assert_close(out.images, want_images, rtol=0, atol=1e-5)


def test_guard_with_probe_noises_reads_its_own_calibration(digits):
    """metric="wen_low@4": the guard's scores are detect's wen_low@4 at the same noise, its gate is
    the 1% cut calibration.json holds for wen_low@4 (not wen_low's), and flagged is score > cut."""
    cal = json.load(open(sharpfast.zoo.path("digits") + "/calibration.json"))
    mem = [r["prompt"] for r in sharpfast.zoo.prompts("digits", "memorized")[:2]]
    normal = [r["prompt"] for r in sharpfast.zoo.prompts("digits", "non_memorized")[:2]]
    prompts = mem + normal
    lat = torch.randn(4, 4, 8, 8, generator=gen(11))
    with sharpfast.guard(digits, metric="wen_low@4", mitigation=None) as g:
        out = g(prompts, latents=lat, num_inference_steps=50, output_type="pt")
    want = sharpfast.detect(digits, prompts, metrics=("wen_low@4",), latents=lat, progress=False).scores["wen_low@4"]
    reps = out.memorization
    assert cal["wen_low@4"]["gate_0.01"] != cal["wen_low"]["gate_0.01"]
    for r, s in zip(reps, want.tolist()):
        assert r["metric"] == "wen_low@4" and r["threshold"] == cal["wen_low@4"]["gate_0.01"], r
        assert r["score"] == pytest.approx(s, rel=1e-4), r
        assert r["flagged"] == (r["score"] > r["threshold"]), r
    assert [r["flagged"] for r in reps] == [True, True, False, False], reps
