"""Every command-line option in one table: one name, one type, one default and one help text per
concept, shared by all commands (`add(parser, command, *flags)`). Defaults and lists come from
sharpfast.settings and sharpfast.catalog, which import no torch, so `--help` answers at once.

Where a command gives a concept a default of its own, the exception is written here, in
COMMAND_DEFAULTS, with its reason; tests/test_cli_options.py holds every parser to this module.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

from .. import catalog, settings
from ..data import PROMPT_SETS
from ..errors import BadArgument

DTYPES = ("fp32", "fp16", "bf16")  # sharpfast.loading.DTYPES names their torch dtypes


def metric_name(text: str) -> str:
    """A --metric value: a built-in metric (argparse reports the error)."""
    if not catalog.is_metric(text):
        raise argparse.ArgumentTypeError(f"unknown metric {text!r}; valid: {catalog.METRIC_HELP}")
    return text


def csv(text: str, kind=str) -> list:
    """A comma-separated list (argparse type)."""
    vals = [kind(v.strip()) for v in text.split(",") if v.strip()]
    if not vals:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return vals


def ints(text: str) -> Any:
    """A comma-separated list of integers (argparse type)."""
    try:
        return csv(text, int)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_threshold(text: str, what: str = "--threshold") -> Any:
    """'auto' (the model's calibration), 'none' (no flags) or a non-NaN number (inf: never flag)."""
    import math

    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        v = float(text)
    except ValueError:
        raise BadArgument(f"{what} must be 'auto', 'none' or a number, got {text!r}") from None
    if math.isnan(v):
        raise BadArgument(f"{what} must be 'auto', 'none' or a non-NaN number, got {text!r}")
    return v


@dataclass(frozen=True)
class Option:
    """One option as argparse takes it (help says the default in words)."""

    help: str
    default: Any = None
    type: Optional[Callable] = None
    required: bool = False
    choices: Optional[tuple] = None
    flag: bool = False  # store_true
    metavar: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def kwargs(self) -> dict:
        if self.flag:
            return {"action": "store_true", "help": self.help}
        kw: dict = {"default": self.default, "help": self.help}
        for k in ("type", "choices", "metavar"):
            if getattr(self, k) is not None:
                kw[k] = getattr(self, k)
        if self.required:
            kw["required"] = True
        return {**kw, **self.extra}


_OWN = "the pipeline's own (its __call__ default)"
_METRICS = catalog.METRIC_HELP

OPTIONS: dict[str, Option] = {
    "--model": Option("'digits' or 'scenes' (the bundled models) or a local diffusers model directory "
                      "(safetensors, loaded offline)", required=True, metavar="DIR|digits|scenes"),
    "--metrics": Option(f"comma list of metrics: {_METRICS} (default {','.join(settings.DEFAULT_METRICS)})",
                        default=list(settings.DEFAULT_METRICS),
                        type=csv),
    "--metric": Option(f"the guard's metric, one of {_METRICS} (default {settings.GUARD_METRIC})",
                       default=settings.GUARD_METRIC, type=metric_name),
    "--mitigation": Option("the guard's mitigation: auto (default: "
                           + " where the model family has it, else ".join(f"{m} {st}" for m, st in
                                                                           settings.GUARD_MITIGATIONS)
                           + f"), none (report only), or one of {', '.join(catalog.MITIGATIONS)}",
                           default="auto", choices=("auto", *catalog.MITIGATIONS)),
    "--n": Option("images per prompt, averaged (default 1)", default=1, type=int),
    "--steps": Option("first sampling steps averaged (default 1)", default=1, type=int),
    "--num-inference-steps": Option(f"sampler steps of the schedule (default: {_OWN})", type=int),
    "--guidance-scale": Option(f"CFG scale (Flux: its embedded guidance; default: {_OWN})", type=float),
    "--batch-size": Option(f"prompts per denoiser batch (default {settings.BATCH_SIZE})", default=settings.BATCH_SIZE,
                           type=int),
    "--hvp": Option("Hessian-vector product of sharpness: fd (finite difference, default) or jvp (exact)",
                    default="fd", choices=catalog.HVP_MODES),
    "--seed": Option(f"the prompt in row i of the file (a line of .txt, a record of .jsonl or .parquet, from 0) "
                     f"draws its noise from seed + i (default {settings.SEED})", default=settings.SEED, type=int),
    "--threshold": Option("flag above this score: a number, 'auto' (default: the model's calibration at these "
                          "settings, beside the model, cached, or made once on the built-in captions) or 'none'",
                          default="auto"),
    "--fpr": Option(f"false-positive rate of calibrated thresholds (default {settings.FPR})", default=settings.FPR,
                    type=float),
    "--device": Option("torch device; auto = cuda if available (under accelerate: the process's own GPU), else cpu",
                       default="auto"),
    "--dtype": Option("denoiser dtype; auto = fp16 on cuda, fp32 on cpu", default="auto", choices=("auto", *DTYPES)),
    "--quiet": Option("no progress bars", flag=True),
    "--overwrite": Option("start --out afresh if it holds other prompts or settings", flag=True),
    "--out": Option("the output (each command says what it writes)"),
    "--prompts": Option("prompt file: .txt (a prompt a line, kept exactly; blank lines skipped; ids are line "
                        "numbers), .jsonl ('prompt' or 'caption' field) or .parquet", required=True),
    # one command's own
    "--labels": Option("text file, one 0/1 per line of --prompts (1 = memorized): prints AUC and TPR at 1%%/3%% FPR"),
    "--prompt": Option("the prompt", required=True),
    "--candidates": Option(f"initial noises per image (default {settings.SAIL_DEFAULTS['paper']['candidates']})",
                           type=int),
    "--max-steps": Option(f"Adam steps at most (default {settings.SAIL_DEFAULTS['paper']['max_steps']})", type=int),
    "--calibrate-on": Option("file of known-normal prompts: threshold at --fpr of their scores"),
    "--flag-metric": Option(f"metric the flag uses (default: {settings.GUARD_METRIC}, the guard's detector, when among "
                            f"--metrics, else the last of them)"),
    "--column": Option("prompt field / column (default: prompt, else caption)"),
    "--id-field": Option("field / column holding a stable prompt id (default: the row number)"),
    "--memorized": Option("memorized prompts (.txt, one a line, or .jsonl with 'prompt'; or a shipped set: "
                          f"{', '.join(n for n in PROMPT_SETS if n != 'non_memorized')}); default: the bundled "
                          "model's set"),
    "--non-memorized": Option("non-memorized prompts (.txt or .jsonl, or the shipped non_memorized); with "
                              "--memorized"),
    "--calibration": Option("normal prompts kept apart from both sets (.txt or .jsonl): the combined detectors are "
                            "fitted on these only (the bundled model: the captions of its shipped calibration)"),
    "--method": Option(f"comma list of mitigations: {', '.join(catalog.MITIGATIONS)} (default none,sail,transition,"
                       "sail+transition)", default=["none", "sail", "transition", "sail+transition"], type=csv),
    "--half": Option("memorized prompts at even positions (A: where settings are chosen), odd positions (B: where "
                     "the choice is reported) or all (default)", default="all", choices=("A", "B", "all")),
    "--seeds": Option("generations per prompt, seeds 0..S-1 (default 5)", default=5, type=int),
    "--first-seed": Option("the first seed: seeds F..F+S-1 (default 0; fresh draws for a second report on a half)",
                           default=0, type=int),
    "--settings": Option("comma list of method=setting in place of a method's registry default, e.g. "
                         "transition=s0t450,attention_rescale=1.5 (without --sweep)", default=[], type=csv),
    "--sweep": Option("every setting of each method: trade-off curves", flag=True),
    "--setting": Option("the mitigation's setting (default: its registry default)"),
    "--limit": Option("only the first LIMIT memorized prompts", type=int),
    "--policy": Option("the guard's policy: a gate as the share of the model's normal captions mitigated (0.01, "
                       "0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7) or always, then share:setting tiers, e.g. "
                       "0.3,0.01:s0t300, or xM:setting tiers (M times the gate's margin over the normal captions' "
                       "median), e.g. 0.01:s1.25t0,x3:s1t500g0.5 (default: the 1%% gate); given more than once: "
                       "the policy frontier (OUT/guard_frontier.png)", extra={"action": "append"}),
    "--no-normal": Option("judge the memorized prompts only (default: the half's normal prompts too)", flag=True),
    "--host": Option("address to bind (default 127.0.0.1: this machine only)", default="127.0.0.1"),
    "--port": Option("port (default 8000; 0 picks a free one, printed at start)", default=8000, type=int),
    "--no-guard": Option("serve the plain pipeline (a baseline for load tests)", flag=True),
    "--max-batch-size": Option("images per pipeline call at most, a single request's too (default 8)", default=8,
                               type=int),
    "--max-wait-ms": Option("how long a batch may wait to fill (default 10)", default=10.0, type=float),
    "--calibrate-for": Option("a further setting to serve, calibrated at start (repeatable): HxW, or "
                              "key=value pairs of num_inference_steps, guidance_scale, height, width, e.g. "
                              "'num_inference_steps=30,height=32,width=32'; a request at a setting not served is "
                              "refused (400), never calibrated", default=[], extra={"action": "append"}),
    "--engine": Option("uvicorn (one process, default) or ray (Ray Serve: --replicas pipelines behind one endpoint, "
                       "a dead replica replaced; needs the 'ray' extra)", default="uvicorn",
                       choices=("uvicorn", "ray")),
    "--replicas": Option("replicas with --engine ray (default 2)", default=2, type=int),
    "--ray-address": Option("a running Ray cluster to join with --engine ray (default: start a local one)"),
    "--gpus-per-replica": Option("GPUs Ray gives each replica with --engine ray (default 1 if this machine has a "
                                 "CUDA GPU, else 0)", type=float),
    "--api-key-file": Option("a file holding the API key that /generate and /metrics require as 'Authorization: "
                             "Bearer <key>' (/health stays open); put TLS in front (see docs/serving.md)"),
    "--docs": Option("serve /docs and /redoc, open without the API key (their scripts load from a public CDN: an "
                     "offline browser sees a blank page): auto (default: on without --api-key-file, off with it), "
                     "on or off; /openapi.json is always served, behind the key unless the docs are on",
                     default="auto", choices=("auto", "on", "off")),
    "--max-prompt-chars": Option("characters per prompt at most (default 2000)", default=2000, type=int),
    "--header-timeout": Option("seconds a client may take to send its request headers (default 10)", default=10.0,
                               type=float),
    "--body-timeout": Option("seconds a client may take to send a whole request body (default 30; 408 beyond)",
                             default=30.0, type=float),
    "--max-connections": Option("open connections at most (default 1000; 503 beyond)", default=1000, type=int),
    "--graceful-timeout": Option("seconds to wait for requests in flight at shutdown (default 300)", default=300.0,
                                 type=float),
}

# (command, flag) -> what differs from OPTIONS for that command, and why
COMMAND_DEFAULTS: dict[tuple, dict] = {
    ("detect", "--out"): dict(default="results.jsonl", help="JSON lines output (default results.jsonl), appended; "
                              "a rerun resumes it, and refuses it if it holds other prompts or settings"),
    ("scan", "--out"): dict(required=True, help="output folder (shards, results.jsonl, summary.json, histogram.png)"),
    ("sail", "--out"): dict(default="sail.png", help="PNG grid: plain generation above, SAIL below (default "
                            "sail.png)"),
    ("calibrate", "--out"): dict(help="output file (default: the per-user cache that threshold='auto' reads)"),
    ("eval", "--out"): dict(default="sharpfast-eval", help="output folder (default sharpfast-eval); reruns resume"),
    ("demo", "--out"): dict(default="sharpfast-demo", help="output folder (default sharpfast-demo)"),
    # the calibration prompts are optional: the built-in captions by default
    ("calibrate", "--prompts"): dict(required=False, help="normal prompts, one a line (default: the built-in "
                                     "generic captions; SHARPFAST_CALIBRATION=quick: 64 of them, a first try)"),
    # a grid of images for one prompt, not a score averaged over images
    ("sail", "--n"): dict(default=4, help="images in the grid (default 4)"),

    # the evaluation sweeps a list of settings
    ("eval detect", "--n"): dict(default=[1, 4], type=ints, help="images per prompt, comma list (default 1,4)"),
    ("eval detect", "--steps"): dict(default=[1, 5], type=ints, help="first sampling steps averaged, comma list "
                                     "(default 1,5)"),
    ("eval detect", "--metrics"): dict(default=None, help=f"comma list of metrics: {_METRICS} (default: all of them, "
                                       "side by side)"),
    # generation costs differ: the guard generates every prompt twice (plain and guarded)
    ("eval guard", "--seeds"): dict(default=2, help="generations per prompt, seeds 0..S-1 (default 2)"),
    # the guard's defaults were chosen on half A: it is reported on half B
    ("eval guard", "--half"): dict(default="B", help="memorized prompts at odd positions (B, default: held out from "
                                   "the choice of the guard's defaults), even positions (A) or all"),
}
# (command, flag) -> its help where the same concept (same default) reads differently there
HELP_OF: dict[tuple, str] = {
    # SAIL's own numbers: its generator and its stopping target, not a file row's seed or a flag
    ("sail", "--seed"): f"the generator's seed (default {settings.SEED})",
    ("sail", "--threshold"): "SAIL's target: an image's noise is optimized until its sharpness is under it; a "
                             "number or 'auto' (default: the model's calibrated target, the sharpness only the "
                             "flattest 10%% of normal prompts' images reach)",
}
OVERRIDABLE = {"--out", "--prompts", "--n", "--steps", "--metrics", "--seeds", "--half"}


def spec(command: str, flag: str) -> Option:
    """The option `flag` as `command` has it (OPTIONS with the command's exception, if any)."""
    from dataclasses import replace

    base = OPTIONS[flag]
    if (command, flag) in HELP_OF:
        base = replace(base, help=HELP_OF[(command, flag)])
    own = COMMAND_DEFAULTS.get((command, flag)) or COMMAND_DEFAULTS.get((command.split()[0], flag))
    return replace(base, **own) if own else base


def add(parser: Any, command: str, *flags: str) -> None:
    """Add `flags` to `parser` as the table defines them for `command`."""
    for flag in flags:
        parser.add_argument(flag, **spec(command, flag).kwargs())
