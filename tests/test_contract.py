"""The argument contract, property-based: for random mixes of valid and invalid arguments, every
public function either returns finite scores or raises a sharpfast error whose message names an
argument that was invalid. Never a diffusers reshape error, a ZeroDivisionError, NaN scores or a
silent default. hypothesis prints the falsifying example (and its seed) on failure."""
import math

import pytest
import torch
from helpers import quiet_tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sharpfast
from sharpfast.errors import SharpfastError

NAN, INF = float("nan"), float("inf")
# argument -> (valid values, invalid values)
PROMPTS = ([["a cat"], ["a cat", "two dogs"], "a red house"], [[], [""], ["a cat", "   "], [3], None, ""])
N = ([1, 2], [0, -1, 1.5, True, "2"])
GS = ([2.0, 7.5], [NAN, INF, -INF, "7"])
BATCH = ([1, 3], [0, -2, 2.5])
THRESHOLD = ([1.0, INF], [NAN, "x"])


@pytest.fixture(scope="module")
def pipe():
    return quiet_tiny("sd1")


def pick(spec):
    """(value, valid) drawn from a (valid, invalid) spec: valid three times in four, so that one
    invalid argument among valid ones (the case that tests the message) is common."""
    valid, invalid = spec
    return st.integers(0, 3).flatmap(lambda k: st.tuples(st.sampled_from(invalid), st.just(False)) if k == 0
                                     else st.tuples(st.sampled_from(valid), st.just(True)))


def check(call, drawn: dict):
    """drawn: name -> (value, valid). The call succeeds with finite scores exactly when every
    argument is valid; otherwise it raises a SharpfastError naming an invalid argument."""
    bad = [name for name, (_, ok) in drawn.items() if not ok]
    try:
        scores = call()
    except SharpfastError as err:
        assert bad, f"all arguments valid, yet: {err!r}"
        msg = str(err)
        assert any(name in msg for name in bad), f"{msg!r} names none of the invalid arguments {bad}"
        return
    except Exception as err:  # noqa: BLE001 - anything else breaks the contract
        raise AssertionError(f"not a sharpfast error for {drawn}: {type(err).__name__}: {err}") from err
    assert not bad, f"invalid {bad} accepted: {drawn}"
    assert all(math.isfinite(float(v)) for v in scores), scores


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(prompts=pick(PROMPTS), n=pick(N), gs=pick(GS), batch=pick(BATCH))
def test_detect_contract(pipe, prompts, n, gs, batch):
    def call():
        res = sharpfast.detect(pipe, prompts[0], num_images_per_prompt=n[0], guidance_scale=gs[0], batch_size=batch[0],
                               num_inference_steps=3, generator=torch.Generator().manual_seed(0), progress=False)
        return [v for m in res.scores.values() for v in m]

    check(call, {"prompt": prompts, "num_images_per_prompt": n, "guidance_scale": gs, "batch_size": batch})


SAIL_GS = ([2.0, 7.5], [NAN, INF, 1.0, 0.5, "7"])


@SETTINGS
@given(prompts=pick(PROMPTS), n=pick(N), gs=pick(SAIL_GS), thr=pick(([0.01, 1.0], [NAN, INF, "x"])))
def test_sail_contract(pipe, prompts, n, gs, thr):
    def call():
        out = sharpfast.sail(pipe, prompts[0], num_images_per_prompt=n[0], guidance_scale=gs[0], threshold=thr[0],
                             max_steps=1, num_inference_steps=2, output_type="pt",
                             generator=torch.Generator().manual_seed(0))
        return out.images.flatten()[:16]

    check(call, {"prompt": prompts, "num_images_per_prompt": n, "guidance_scale": gs, "threshold": thr})


@SETTINGS
@given(prompts=pick(PROMPTS), n=pick(N), gs=pick(SAIL_GS), thr=pick(THRESHOLD))
def test_guard_contract(pipe, prompts, n, gs, thr):
    def call():
        with sharpfast.guard(pipe, threshold=thr[0], mitigation=None) as guarded:
            out = guarded(prompts[0], num_images_per_prompt=n[0], guidance_scale=gs[0], num_inference_steps=2,
                          output_type="pt", generator=torch.Generator().manual_seed(0))
        return [r["score"] for r in out.memorization]

    check(call, {"prompt": prompts, "num_images_per_prompt": n, "guidance_scale": gs, "threshold": thr})
    assert not pipe.unet._forward_hooks, "the guard's hook is gone, whatever happened"
