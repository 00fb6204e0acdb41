"""sharpfast.guard: scores from the pipeline's own CFG batch, no extra UNet call for wen, output
unchanged for unflagged prompts, flagged ones mitigated, and the pipeline restored by remove()."""
import pytest
import torch
from helpers import nan_unet
from pipeline_state import assert_same, snapshot

import sharpfast
from sharpfast.errors import BadArgument, NonFiniteOutput
from sharpfast.testing import tiny_pipeline

KW = dict(num_inference_steps=5, output_type="pt")
PROMPTS = ["a red house by the sea", "two dogs", "an old map"]



def gen(seed=0):
    return torch.Generator().manual_seed(seed)


class CallCounter:
    def __init__(self, pipe):
        self.calls = 0
        self.h = pipe.unet.register_forward_pre_hook(lambda m, a: setattr(self, "calls", self.calls + 1))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.h.remove()


@pytest.mark.parametrize("metric,extra", [("wen", 0), ("sharpness", 1)])
def test_unflagged_output_is_plain_output_and_costs_no_extra_call(pipe, metric, extra):
    with CallCounter(pipe) as c:
        plain = pipe(PROMPTS, generator=gen(), **KW).images
    plain_calls = c.calls
    with sharpfast.guard(pipe, metric=metric, threshold=float("inf"), mitigation="sail") as guarded, \
            CallCounter(pipe) as c:
        out = guarded(PROMPTS, generator=gen(), **KW)
    assert torch.equal(out.images, plain)
    assert c.calls == plain_calls + extra
    det = sharpfast.detect(pipe, PROMPTS, metrics=(metric,), generator=gen(), num_inference_steps=5, progress=False)
    got = torch.tensor([r["score"] for r in out.memorization])
    torch.testing.assert_close(got, det.scores[metric], rtol=1e-4, atol=1e-6)
    assert [r["flagged"] for r in out.memorization] == [False] * 3


def test_mixed_batch_mitigates_only_flagged_prompts(pipe):
    plain = pipe(PROMPTS, num_images_per_prompt=2, generator=gen(), **KW).images
    wen = sharpfast.detect(pipe, PROMPTS, metrics=("wen",), num_images_per_prompt=2, generator=gen(),
                           num_inference_steps=5, progress=False).scores["wen"]
    thr = float(wen.median())  # flags exactly the prompt with the largest score
    with sharpfast.guard(pipe, metric="wen", threshold=thr, mitigation="transition") as guarded:
        out = guarded(PROMPTS, num_images_per_prompt=2, generator=gen(), **KW)
    k = int(wen.argmax())
    flags = [r["flagged"] for r in out.memorization]
    assert flags == [i == k for i in range(3)]
    assert [r["mitigated"] for r in out.memorization] == flags
    for i in range(3):
        same = torch.equal(out.images[2 * i:2 * i + 2], plain[2 * i:2 * i + 2])
        assert same != (i == k), f"prompt {i}: unflagged output must be plain, flagged must change"


def test_report_only_and_remove_restores_the_pipeline(pipe):
    pipe(PROMPTS[:1], generator=gen(), **KW)
    before = snapshot(pipe)
    guarded = sharpfast.guard(pipe, metric="wen", threshold=-1.0, mitigation=None)
    out = guarded(PROMPTS[:1], generator=gen(), **KW)
    assert out.memorization[0]["flagged"] and not out.memorization[0]["mitigated"]
    guarded.remove()
    assert_same(before, snapshot(pipe))
    with pytest.raises(RuntimeError, match="removed"):
        guarded(PROMPTS[:1], **KW)


def test_nan_from_the_unet_is_an_error_not_unflagged():
    """NaN > threshold is False: a NaN score once came back as `flagged: False`."""
    pipe = tiny_pipeline("sd1")
    pipe.set_progress_bar_config(disable=True)
    with nan_unet(pipe), sharpfast.guard(pipe, metric="wen", threshold=1.0, mitigation=None) as guarded:
        with pytest.raises(NonFiniteOutput, match="'two dogs'"):
            guarded(["two dogs"], **KW)
    assert not pipe.unet._forward_hooks


def test_bad_input():
    pipe = tiny_pipeline("sd1")
    with sharpfast.guard(pipe, metric="wen", threshold=1.0, mitigation=None) as guarded:
        with pytest.raises(ValueError, match="prompt is empty"):
            guarded([])
        with pytest.raises(ValueError, match="guidance_scale must be > 1"):
            guarded("a cat", guidance_scale=1.0)
        with pytest.raises(ValueError, match="prompt_embeds"):
            guarded("a cat", prompt_embeds=torch.zeros(1, 77, 32))
        # each of these once slipped through or died inside diffusers
        with pytest.raises(BadArgument, match="guidance_scale must be a finite number"):
            guarded("a cat", guidance_scale=float("nan"))
        with pytest.raises(BadArgument, match="num_images_per_prompt must be an int >= 1"):
            guarded("a cat", num_images_per_prompt=0)
        with pytest.raises(BadArgument, match="empty or blank"):
            guarded(["a cat", ""])
        with pytest.raises(BadArgument, match="generator is a list of 3 generators"):
            guarded(["a cat"], num_images_per_prompt=2, generator=[torch.Generator()] * 3)
    with pytest.raises(BadArgument, match="threshold must be a non-NaN number"):
        sharpfast.guard(pipe, threshold=float("nan"), mitigation=None)
    with pytest.raises(ValueError, match="metric must be one of"):
        sharpfast.guard(pipe, metric="sharp", threshold=1.0)
    with pytest.raises(TypeError, match="sharpfast supports"):
        sharpfast.guard(object(), threshold=1.0)
    assert not pipe.unet._forward_hooks


def test_concurrent_requests_get_their_own_results():
    """One guard, 8 threads, flagged and unflagged prompts mixed: every report and every image
    equals the sequential call's (the capture once lived in one attribute: 8 of 12 calls raised
    and one returned another request's score; the pipeline itself, unlocked, raises shape errors
    from its text encoding under threads)."""
    from concurrent.futures import ThreadPoolExecutor

    pipe = tiny_pipeline("sd1")
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red house by the sea", "two dogs", "an old map", "a tall tree", "a blue car", "three birds",
               "a quiet lake", "a big city"]
    with sharpfast.guard(pipe, metric="wen", threshold=float("inf"), mitigation=None) as probe:
        scores = [probe([p], generator=torch.Generator().manual_seed(i), **KW).memorization[0]["score"]
                  for i, p in enumerate(prompts)]
    thr = sorted(scores)[len(scores) // 2]  # half the prompts are flagged and go through SAIL
    with sharpfast.guard(pipe, metric="wen", threshold=thr, mitigation="transition") as guarded:
        def run(i):
            out = guarded([prompts[i]], generator=torch.Generator().manual_seed(i), **KW)
            return out.memorization[0], out.images

        sequential = [run(i) for i in range(8)]
        assert 0 < sum(r["flagged"] for r, _ in sequential) < 8
        for _ in range(3):
            with ThreadPoolExecutor(8) as ex:
                together = list(ex.map(run, range(8)))
            for (a, ia), (b, ib) in zip(together, sequential):
                assert a == b
                assert torch.equal(ia, ib), a["prompt"]
    assert not pipe.unet._forward_hooks


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])  # ddpm draws fresh noise from the generator every step
def test_flagged_request_is_decided_at_step_one_and_generated_once(scheduler):
    """A request with a flagged prompt stops after its first UNet call and the batch is generated
    once from mixed noise: UNet calls = 1 + SAIL's + the steps (not two generations), the
    unflagged prompts' images equal pipe(...)'s bit for bit (their noise and the generator's
    state are kept), the flagged prompt's change."""
    p = tiny_pipeline("sd1", scheduler=scheduler)
    p.set_progress_bar_config(disable=True)
    plain = p(PROMPTS, generator=gen(), **KW).images
    wen = sharpfast.detect(p, PROMPTS, metrics=("wen",), generator=gen(), num_inference_steps=5,
                           progress=False).scores["wen"]
    k = int(wen.argmax())
    thr = float(wen.sort().values[-2])  # flags exactly the prompt with the largest score
    with sharpfast.guard(p, metric="wen", threshold=thr, mitigation="sail", sail_kwargs={"max_steps": 1}) as guarded, \
            CallCounter(p) as c:
        out = guarded(PROMPTS, generator=gen(), **KW)
    assert [r["flagged"] for r in out.memorization] == [i == k for i in range(3)]
    sail_calls = 2 * (1 + 1)  # one Adam step: two evaluations of (x, x') each
    assert c.calls == 1 + sail_calls + KW["num_inference_steps"], c.calls
    for i in range(3):
        assert torch.equal(out.images[i], plain[i]) != (i == k), i


def test_user_callback_is_chained_and_return_dict_false_works(pipe):
    seen = []

    def cb(p, i, t, kw):
        seen.append(i)
        return {"latents": kw["latents"] * 1.0}

    plain = pipe(PROMPTS[:1], generator=gen(), **KW).images
    with sharpfast.guard(pipe, metric="wen", threshold=float("inf"), mitigation=None) as guarded:
        out = guarded(PROMPTS[:1], generator=gen(), callback_on_step_end=cb, **KW)
        assert seen == list(range(KW["num_inference_steps"]))
        assert torch.equal(out.images, plain)
        *pipe_tuple, report = guarded(PROMPTS[:1], generator=gen(), return_dict=False, **KW)
        assert torch.equal(pipe_tuple[0], plain) and report[0]["prompt"] == PROMPTS[0]
        seen.clear()
        guarded(PROMPTS[:1], generator=gen(), callback_on_step_end=cb, output_type="latent",
                num_inference_steps=3)
        assert seen == [0, 1, 2]


def _flag_everything(p, **kw):
    return sharpfast.guard(p, metric="wen", threshold=-1.0, mitigation="transition", **kw)


def _both_paths(p, plain, kw):
    """Unflagged: the pipeline's own images; everything flagged: mitigated, other images."""
    with sharpfast.guard(p, metric="wen", threshold=float("inf"), mitigation=None) as g:
        out = g(PROMPTS[:2], generator=gen(), **kw)
    assert torch.equal(out.images, plain)
    with _flag_everything(p) as g:
        out = g(PROMPTS[:2], generator=gen(), **kw)
    assert all(r["mitigated"] for r in out.memorization) and not torch.equal(out.images, plain)


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_every_output_type_on_both_paths(pipe, output_type):
    """Unflagged: the pipeline's own output, equal; flagged (generated once from SAIL's noise):
    the same type and shape, different content."""
    import numpy as np

    kw = dict(num_inference_steps=3, output_type=output_type, num_images_per_prompt=2)
    plain = pipe(PROMPTS[:2], generator=gen(), **kw).images
    as_array = (lambda imgs: np.stack([np.asarray(i) for i in imgs])) if output_type == "pil" else \
        (lambda imgs: np.asarray(imgs.cpu() if torch.is_tensor(imgs) else imgs))
    with sharpfast.guard(pipe, metric="wen", threshold=float("inf"), mitigation=None) as g:
        out = g(PROMPTS[:2], generator=gen(), **kw)
    assert type(out.images) is type(plain)
    np.testing.assert_array_equal(as_array(out.images), as_array(plain))
    with _flag_everything(pipe) as g:
        out = g(PROMPTS[:2], generator=gen(), **kw)
    assert type(out.images) is type(plain) and len(out.images) == len(plain) == 4
    assert as_array(out.images).shape == as_array(plain).shape
    assert not np.array_equal(as_array(out.images), as_array(plain))
    assert all(r["mitigated"] for r in out.memorization)


def test_torch_compiled_unet():
    """pipe.unet = torch.compile(pipe.unet), as servers do: the hook sits on the compiled module,
    unflagged output equals the compiled pipeline's own, flagged requests run SAIL through it
    (backend aot_eager: dynamo's tracing and autograd, without a C++ compile per test)."""
    p = tiny_pipeline("sd1")
    p.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, output_type="pt")
    p.unet = torch.compile(p.unet, backend="aot_eager")
    _both_paths(p, p(PROMPTS[:2], generator=gen(), **kw).images, kw)
    assert not p.unet._forward_hooks and isinstance(p.unet, torch._dynamo.eval_frame.OptimizedModule)


def test_model_cpu_offload():
    """enable_model_cpu_offload installs accelerate's hooks on every model (device "cpu" here: the
    hooks and their order are the same as with a GPU); the guard scores, mitigates, and removes
    only its own hook."""
    pytest.importorskip("accelerate")
    p = tiny_pipeline("sd1")
    p.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, output_type="pt")
    plain = p(PROMPTS[:2], generator=gen(), **kw).images
    p.enable_model_cpu_offload(device="cpu")
    hooks_before = dict(p.unet._forward_hooks), dict(p.unet._forward_pre_hooks)
    _both_paths(p, plain, kw)
    assert (dict(p.unet._forward_hooks), dict(p.unet._forward_pre_hooks)) == hooks_before


def test_flagged_request_with_user_callback_and_tuple_output(pipe):
    """The user's callback sees each step of the generation that makes the images once (not the
    first generation's step 0, stopped before the callback), and return_dict=False gives the tuple
    then the report."""
    seen = []

    def cb(p, i, t, kw):
        seen.append(i)
        return {}

    with _flag_everything(pipe) as g:
        *tup, report = g(PROMPTS[:1], generator=gen(), callback_on_step_end=cb, return_dict=False,
                         num_inference_steps=3, output_type="pt")
    assert report[0]["mitigated"] and tup[0].shape[0] == 1
    assert seen == [0, 1, 2]


def test_stats_and_prometheus_count_what_happened(pipe):
    """guard.stats and the Prometheus series agree with the requests made: 2 requests, 5 prompts,
    the flagged ones mitigated, one error counted; scores land in the histogram."""
    prom = pytest.importorskip("prometheus_client")
    with sharpfast.guard(pipe, metric="wen", threshold=float("inf"), mitigation=None) as probe:
        scores = [r["score"] for r in probe(PROMPTS, generator=gen(), num_inference_steps=2,
                                            output_type="pt").memorization]
    thr = sorted(scores)[1]  # one of PROMPTS flagged in the first request
    registry = prom.CollectorRegistry()
    with sharpfast.guard(pipe, metric="wen", threshold=thr, mitigation="sail", name="t") as g:
        g.register_prometheus(registry)
        kw = dict(num_inference_steps=2, output_type="pt")
        reports = g(PROMPTS, generator=gen(), **kw).memorization + g(PROMPTS[:2], generator=gen(1), **kw).memorization
        with pytest.raises(BadArgument):
            g(PROMPTS, guidance_scale=float("nan"))
        s = g.stats
    got = [r["score"] for r in reports]
    assert got[:3] == pytest.approx(scores, rel=1e-5)
    assert (s["calls"], s["prompts"], s["images"], s["errors"]) == (2, 5, 5, 1)
    flagged = sum(r["flagged"] for r in reports)
    assert s["flagged"] == flagged == sum(x > thr for x in got) >= 1
    # mitigated: SAIL's check passed (wen under the threshold at the new noise); the rest unmitigated
    assert s["mitigated"] == sum(r["flagged"] and r["mitigated"] for r in reports)
    assert s["mitigated"] + s["unmitigated"] == flagged
    for r in reports:
        if r["flagged"]:
            assert ("<=" in r["check"]) == r["mitigated"], r["check"]
    assert s["score"]["count"] == 5 and s["score"]["sum"] == pytest.approx(sum(got), rel=1e-5)
    assert s["sail_steps"]["count"] == int(any(r["flagged"] for r in reports[:3])) + \
        int(any(r["flagged"] for r in reports[3:]))
    assert s["request_latency_seconds"]["count"] == 2
    assert s["added_latency_seconds"]["sum"] <= s["request_latency_seconds"]["sum"]
    value = lambda n, **lab: registry.get_sample_value(n, {"guard": "t", "metric": "wen", **lab})  # noqa: E731
    assert value("sharpfast_calls_total") == 2 and value("sharpfast_errors_total") == 1
    assert value("sharpfast_flagged_total") == flagged and value("sharpfast_score_count") == 5
    assert value("sharpfast_score_bucket", le="+Inf") == 5
    assert value("sharpfast_score_bucket", le=repr(float(thr))) == sum(x <= thr for x in got)
    text = prom.generate_latest(registry).decode()
    assert 'sharpfast_added_latency_seconds_bucket{guard="t",le="+Inf",metric="wen"} 2.0' in text
    with pytest.raises(ValueError):  # the same names twice in one registry: refused at once
        g.register_prometheus(registry)


def test_mitigated_is_earned():
    """The issue's case: metric wen, threshold 0, mitigation sail on a random model. SAIL stops on
    the guard's own metric and threshold (wen <= 0 is out of reach), so the report says
    mitigated: False and why, and the monitoring counts it; a trajectory method that ran says so."""
    p = tiny_pipeline("sd1")
    p.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=20, output_type="pt")
    plain = p(PROMPTS[:2], generator=gen(), **kw).images
    with sharpfast.guard(p, metric="wen", threshold=0.0, mitigation="sail") as g:
        out = g(PROMPTS[:2], generator=gen(), **kw)
        stats = g.stats
    for r in out.memorization:
        assert r["flagged"] and not r["mitigated"], r
        assert r["check"].startswith("wen ") and "> 0 at the new initial noise" in r["check"]
    assert (stats["flagged"], stats["mitigated"], stats["unmitigated"]) == (2, 0, 2)
    # a reachable threshold: the check passes where SAIL brought wen under it, and the report says so
    wen = sharpfast.detect(p, PROMPTS[:2], metrics=("wen",), generator=gen(), num_inference_steps=20,
                           progress=False).scores["wen"]
    with sharpfast.guard(p, metric="wen", threshold=float(wen.min()) * 0.9, mitigation="sail",
                         sail_kwargs={"max_steps": 6}) as g:
        out = g(PROMPTS[:2], generator=gen(), **kw)
    for r in out.memorization:
        value, thr = float(r["check"].split()[1]), r["threshold"]
        assert r["mitigated"] == (value <= thr), r
    assert any(r["mitigated"] for r in out.memorization)
    with sharpfast.guard(p, metric="wen", threshold=0.0, mitigation="transition") as g:
        out = g(PROMPTS[:2], generator=gen(), **kw)
    assert all(r["mitigated"] and "transition applied" in r["check"] for r in out.memorization)
    assert not torch.equal(out.images, plain)
    with sharpfast.guard(p, metric="wen", threshold=0.0, mitigation=None) as g:
        out = g(PROMPTS[:2], generator=gen(), **kw)
    assert all(r["flagged"] and not r["mitigated"] and r["mitigation"] is None for r in out.memorization)
    with pytest.raises(BadArgument, match="changes whole prompts"):
        sharpfast.guard(p, metric="wen", threshold=0.0, mitigation="random_tokens")


@pytest.mark.parametrize("flag", [False, True])
def test_nan_at_any_step_of_a_guarded_call_raises(flag):
    """NaN from the denoiser at a later step (nothing flagged, or on the mitigated generation), and
    a guidance so large that the sampler's own arithmetic overflows, raise NonFiniteOutput naming
    the prompt instead of returning a black image."""
    p = tiny_pipeline("sd1")
    p.set_progress_bar_config(disable=True)
    calls = [0]

    def late_nan(module, args, output):
        calls[0] += 1
        if calls[0] >= 3:
            return (torch.full_like(output[0], float("nan")), *output[1:])
        return None

    with sharpfast.guard(p, metric="wen", threshold=-1.0 if flag else float("inf"),
                         mitigation="transition") as g:
        h = p.unet.register_forward_hook(late_nan)
        try:
            with pytest.raises(NonFiniteOutput, match="'two dogs'"):
                g(["two dogs"], generator=gen(), **KW)
        finally:
            h.remove()
        with pytest.raises(NonFiniteOutput, match="'two dogs'"):
            g(["two dogs"], generator=gen(), guidance_scale=1e300, **KW)
    assert not p.unet._forward_hooks


def test_latents_of_the_wrong_shape_are_refused():
    p = tiny_pipeline("sd1")
    with sharpfast.guard(p, metric="wen", threshold=1.0) as g:
        with pytest.raises(BadArgument, match=r"latents must be a tensor of shape \(1, 4, 8, 8\)"):
            g(["two dogs"], latents=torch.zeros(1, 4, 3, 3), **KW)
        with pytest.raises(BadArgument, match="latents"):
            g(["two dogs"], num_images_per_prompt=2, latents=torch.zeros(1, 4, 8, 8), **KW)


def test_guard_calibrate_returns_the_threshold_of_a_setting(tmp_path, monkeypatch):
    from sharpfast import calibration

    monkeypatch.setenv("SHARPFAST_CACHE", str(tmp_path))
    calibration.store._MEMO.clear()
    p = tiny_pipeline("sd1")
    p.set_progress_bar_config(disable=True)
    with sharpfast.guard(p, metric="wen", threshold=0.25) as g:
        assert g.calibrate(num_inference_steps=7) == 0.25  # a given threshold is the same at every setting
    with sharpfast.guard(p, metric="wen") as g:
        # lazy: making the guard calibrates nothing; the first request (or calibrate()) does
        assert not any(tmp_path.rglob("*.json")) and not calibration.store._MEMO
        thr = g.calibrate(num_inference_steps=7)
        assert len(list(tmp_path.rglob("*.json"))) == 1
        res = g("two dogs", num_inference_steps=7, generator=gen(), output_type="pt")
        assert res.memorization[0]["threshold"] == thr
        assert thr == calibration.resolve(p, "wen", "threshold", num_inference_steps=7).value
    calibration.store._MEMO.clear()


@pytest.mark.parametrize("mitigation", ["transition", "attention_rescale", "zhao_guard", "sail_guard"])
def test_every_guard_mitigation_changes_only_the_flagged_rows(mitigation):
    """A mixed request: the flagged prompt's images change, the others are pipe(...)'s bit for bit
    (hooks and attention edits act on the flagged rows only), and the report states its check."""
    p = tiny_pipeline("sd1")
    p.set_progress_bar_config(disable=True)
    plain = p(PROMPTS, num_images_per_prompt=2, generator=gen(), **KW).images
    wen = sharpfast.detect(p, PROMPTS, metrics=("wen",), num_images_per_prompt=2, generator=gen(),
                           num_inference_steps=5, progress=False).scores["wen"]
    k = int(wen.argmax())
    with sharpfast.guard(p, metric="wen", threshold=float(wen.median()), mitigation=mitigation,
                         setting=0.5 if mitigation == "sail_guard" else None) as g:
        out = g(PROMPTS, num_images_per_prompt=2, generator=gen(), **KW)
    assert [r["flagged"] for r in out.memorization] == [i == k for i in range(3)]
    for i in range(3):
        same = torch.equal(out.images[2 * i:2 * i + 2], plain[2 * i:2 * i + 2])
        assert same != (i == k), f"{mitigation}: prompt {i}"
    r = out.memorization[k]
    assert r["mitigation"] == mitigation and r["check"]
    if mitigation != "sail_guard":
        assert r["mitigated"] and "applied" in r["check"]
    assert not p.unet._forward_hooks and all(type(v).__name__ != "LogitEditProcessor"
                                             for v in p.unet.attn_processors.values())
