"""Helpers shared by the tests (one place): a UNet that returns NaN, a seed that is printed."""
import contextlib
import os
import random

import torch


@contextlib.contextmanager
def nan_unet(pipe):
    """pipe's UNet (or transformer) returns NaN everywhere while inside; restored afterwards."""
    net = pipe.unet

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (torch.full_like(output[0], float("nan")), *output[1:])
        output.sample = torch.full_like(output.sample, float("nan"))
        return output

    h = net.register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def fresh_seed(name: str) -> int:
    """A new random seed per run (SHARPFAST_TEST_SEED replays one), printed so a failure names it."""
    seed = int(os.environ.get("SHARPFAST_TEST_SEED") or random.SystemRandom().randrange(2**31))
    print(f"{name}: seed {seed} (replay: SHARPFAST_TEST_SEED={seed})")
    return seed


def quiet_tiny(kind: str = "sd1"):
    """A tiny random-weight pipeline with its progress bar off (the module fixtures' pipeline)."""
    from sharpfast.testing import tiny_pipeline

    p = tiny_pipeline(kind)
    p.set_progress_bar_config(disable=True)
    return p
