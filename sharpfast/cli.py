"""The `sharpfast` command line."""
from __future__ import annotations

import argparse
import os
import sys

from .errors import BadArgument, MissingInput, OutputMismatch, SharpfastError

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _read_lines(path: str, what: str) -> list[str]:
    if not os.path.isfile(path):
        raise MissingInput(f"{what} file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError as err:
        raise BadArgument(f"{what} file {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    while lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise BadArgument(f"{what} file is empty: {path}")
    return lines


def load_pipeline(model_dir: str, device: str, dtype: str):
    """A local diffusers model directory, safetensors only, offline."""
    import torch
    from diffusers import DiffusionPipeline

    if not os.path.isdir(model_dir):
        raise MissingInput(f"--model must be 'digits' or a local diffusers model directory; not found: {model_dir}")
    pipe = DiffusionPipeline.from_pretrained(model_dir, torch_dtype=getattr(torch, DTYPES[dtype]),
                                             use_safetensors=True, local_files_only=True)
    return pipe.to(device)


def _fingerprint(obj) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _check_output(path: str, overwrite: bool) -> None:
    """The output file can be written (checked before any model is loaded)."""
    d = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(d):
        raise MissingInput(f"the folder of --out does not exist: {d}")
    if not os.access(d, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise BadArgument(f"--out {path} is not writable")


def cmd_detect(args) -> int:
    import torch

    import sharpfast

    from . import jsonl, validate, zoo
    from .harness.cli import _device_dtype
    from .scan_input import read_prompts

    # every argument and path is checked before the model is loaded
    rows = read_prompts(args.prompts) if args.prompts.endswith((".jsonl", ".parquet")) else [
        (i, p) for i, p in enumerate(_read_lines(args.prompts, "prompts")) if p.strip()]
    if not rows:
        raise BadArgument(f"no usable prompt in {args.prompts}")
    labels = None
    if args.labels:
        raw = _read_lines(args.labels, "labels")
        try:
            labels = {i: int(raw[i]) for i, _ in rows}
        except (IndexError, ValueError):
            raise BadArgument(f"--labels must hold one 0/1 per line of {args.prompts} ({len(raw)} labels)") from None
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    for name in ("n", "steps", "num_inference_steps", "batch_size"):
        validate.integer(getattr(args, name), "--" + name.replace("_", "-"))
    validate.guidance_scale(args.guidance_scale, needs_cfg=False)
    from .metrics import METRICS

    for m in metrics or [""]:
        if m not in METRICS:
            raise BadArgument(f"unknown metric {m!r} in --metrics; valid: {', '.join(METRICS)}")
    _check_output(args.out, args.overwrite)
    device, dtype = _device_dtype(args.device, args.dtype)
    # a record is reused only for the same prompt at the same id under the same settings and model
    settings = _fingerprint(dict(model=args.model, metrics=metrics, n=args.n, steps=args.steps, seed=args.seed,
                                 num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                 hvp=args.hvp, dtype=dtype))
    prompt_of = dict(rows)
    done = jsonl.read(args.out) if os.path.exists(args.out) else {}
    stale = [i for i, r in done.items() if prompt_of.get(i) != r.get("prompt") or r.get("settings") != settings]
    if stale and not args.overwrite:
        raise OutputMismatch(f"{args.out} holds {len(stale)} records of other prompts or settings (first: id "
                             f"{stale[0]}); use another --out, or --overwrite to start it afresh")
    if stale:
        os.remove(args.out)
        done = {}
    todo = [i for i, _ in rows if i not in done]
    if done:
        print(f"sharpfast: {len(done)} prompts already in {args.out}; {len(todo)} to go", file=sys.stderr)
    pipe = load_pipeline(zoo.resolve(args.model), device, dtype)
    pipe.set_progress_bar_config(disable=True)
    from .score import ScoreModel

    model = ScoreModel(pipe)
    height, width = model.default_size()
    from tqdm.auto import tqdm

    with open(args.out, "a", encoding="utf-8") as out, tqdm(total=len(todo), unit="prompt", desc="detect",
                                                            disable=args.quiet) as bar:
        for start in range(0, len(todo), args.batch_size):
            ids = todo[start:start + args.batch_size]
            # one generator per prompt id (its line number): results do not depend on batching or restarts
            lat = torch.cat([model.noise(args.n, height, width, torch.Generator("cpu").manual_seed(args.seed + i))
                             for i in ids])
            res = sharpfast.detect(model, [prompt_of[i] for i in ids], metrics=metrics, num_images_per_prompt=args.n,
                                   steps=args.steps, num_inference_steps=args.num_inference_steps,
                                   guidance_scale=args.guidance_scale, latents=lat.to(model.device),
                                   batch_size=args.batch_size, hvp=args.hvp, progress=False)
            recs = [{"id": i, **rec, "settings": settings} for i, rec in zip(ids, res.to_records())]
            if labels is not None:
                for rec in recs:
                    rec["label"] = labels[rec["id"]]
            jsonl.append(out, recs)
            bar.update(len(ids))
    if labels is not None:
        _print_table(args.out, metrics, len(rows))
    return 0


def _print_table(path: str, metrics, total: int):
    from .evaluation import evaluate

    from . import jsonl

    rows = [r for r in jsonl.read(path).values() if "label" in r]
    print(f"\n{len(rows)} of {total} prompts scored")
    print(f"{'metric':12s} {'AUC':>6s} {'TPR@1%FPR':>10s} {'TPR@3%FPR':>10s}")
    for m in metrics:
        try:
            e = evaluate([r[m] for r in rows], [r["label"] for r in rows])
        except ValueError as err:
            print(f"{m:12s} {err}")
            continue
        print(f"{m:12s} {e['auc']:6.3f} {e['tpr_at_1pct_fpr']:10.3f} {e['tpr_at_3pct_fpr']:10.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sharpfast", description="Find and prevent memorization in "
                                     "text-to-image diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("selfcheck", help="check every available backend against the torch reference and time it")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu' or 'cuda'")
    sub.add_parser("backends", help="list the backends usable in this process")
    d = sub.add_parser("detect", help="score prompts for memorization on a local diffusers model",
                       description="Score every prompt of a file for memorization and append one JSON line per "
                                   "prompt to --out. Restarting the same command skips prompts already written.")
    d.add_argument("--model", required=True, help="'digits' (bundled) or a local diffusers model directory "
                                                  "(safetensors; loaded offline)")
    d.add_argument("--prompts", required=True, help="text file, one prompt a line (kept exactly, HTML entities too; "
                                                    "blank lines skipped, ids are line numbers), or .jsonl/.parquet "
                                                    "read as `sharpfast scan` reads them")
    d.add_argument("--labels", help="text file, one 0/1 per line of --prompts (1 = memorized): prints AUC and TPR "
                                    "at 1%%/3%% FPR")
    d.add_argument("--metrics", default="wen,sharpness",
                   help="comma list of wen, sharpness, trace, trace_delta, score_norm (default: wen,sharpness)")
    d.add_argument("--n", type=int, default=1, help="images per prompt, averaged (default 1)")
    d.add_argument("--steps", type=int, default=1, help="first sampling steps to average over (default 1)")
    d.add_argument("--num-inference-steps", type=int, default=50, help="sampler steps of the schedule (default 50)")
    d.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale of the trajectory (default 7.5)")
    d.add_argument("--batch-size", type=int, default=8, help="prompts per UNet batch (default 8)")
    d.add_argument("--hvp", choices=("fd", "jvp"), default="fd", help="Hessian-vector product: fd (default) or jvp")
    d.add_argument("--seed", type=int, default=42, help="the prompt on line i draws its noise from seed + i "
                                                         "(default 42), as in `sharpfast scan`")
    d.add_argument("--device", default="auto", help="torch device; auto = cuda if available, else cpu")
    d.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="UNet dtype; auto = fp16 on cuda, "
                                                                               "fp32 on cpu")
    d.add_argument("--out", default="results.jsonl", help="JSON lines output, appended; a rerun resumes it, and "
                                                          "refuses it if it holds other prompts or settings")
    d.add_argument("--overwrite", action="store_true", help="start --out afresh if it holds other prompts/settings")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    from . import cli_scan
    from .harness.cli import add_parsers

    add_parsers(sub)
    cli_scan.add_parsers(sub)
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except SharpfastError as err:
        print(f"sharpfast: {err}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from . import cli_scan
    from .harness.cli import cmd_demo, cmd_eval

    if args.command == "scan":
        return cli_scan.cmd_scan(args)
    if args.command == "sail":
        return cli_scan.cmd_sail(args)
    if args.command == "eval":
        return cmd_eval(args)
    if args.command == "demo":
        return cmd_demo(args)
    if args.command == "selfcheck":
        from .selfcheck import run

        return run(args.device)
    if args.command == "detect":
        return cmd_detect(args)
    from .ops import available_backends

    print(" ".join(available_backends()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
