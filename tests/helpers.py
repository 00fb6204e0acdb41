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


# The heavy imports every documentation snippet pays for (torch, diffusers' pipelines, transformers'
# text encoders: about 6 s of a fresh interpreter's 7 here): a fork server imports them once, then
# each snippet runs in a process forked from it, with no name of any other snippet or test.
SNIPPET_PRELOAD = ["torch", "diffusers", "transformers", "diffusers.pipelines.stable_diffusion", "sharpfast"]


def _run_snippet(code: str, cwd: str, log: str) -> None:
    import sys
    import traceback

    os.chdir(cwd)
    with open(log, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        sys.stdout = sys.stderr = f
        try:
            exec(compile(code, "<snippet>", "exec"), {"__name__": "__main__"})
        except BaseException:  # noqa: BLE001 (any failure of the snippet is its result)
            traceback.print_exc()
            f.flush()
            os._exit(1)
        f.flush()
    os._exit(0)


def run_snippet(code: str, cwd, timeout: float = 600) -> tuple[int, str]:
    """(exit code, output) of `code` run as a script in its own process forked from a server that
    preloaded SNIPPET_PRELOAD (not one of the test's names reaches it). A hung snippet is killed."""
    import multiprocessing as mp

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(SNIPPET_PRELOAD)
    log = os.path.join(str(cwd), "snippet.log")
    proc = ctx.Process(target=_run_snippet, args=(code, str(cwd), log))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
    with open(log, encoding="utf-8", errors="replace") as f:
        return proc.exitcode if proc.exitcode is not None else -9, f.read()
