"""The `sharpfast` command line."""
from __future__ import annotations

import argparse
import os
import sys

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _read_lines(path: str, what: str) -> list[str]:
    if not os.path.isfile(path):
        raise SystemExit(f"sharpfast: {what} file not found: {path}")
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    while lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise SystemExit(f"sharpfast: {what} file is empty: {path}")
    return lines


def load_pipeline(model_dir: str, device: str, dtype: str):
    """A local diffusers model directory, safetensors only, offline."""
    import torch
    from diffusers import DiffusionPipeline

    if not os.path.isdir(model_dir):
        raise SystemExit(f"sharpfast: --model must be a local diffusers model directory; not found: {model_dir}")
    pipe = DiffusionPipeline.from_pretrained(model_dir, torch_dtype=getattr(torch, DTYPES[dtype]),
                                             use_safetensors=True, local_files_only=True)
    return pipe.to(device)


def cmd_detect(args) -> int:
    import torch

    import sharpfast

    prompts = _read_lines(args.prompts, "prompts")
    labels = None
    if args.labels:
        labels = [int(v) for v in _read_lines(args.labels, "labels")]
        if len(labels) != len(prompts):
            raise SystemExit(f"sharpfast: {len(labels)} labels for {len(prompts)} prompts")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    pipe = load_pipeline(args.model, args.device, args.dtype)
    pipe.set_progress_bar_config(disable=True)
    from .score import ScoreModel

    model = ScoreModel(pipe)
    height, width = model.default_size()
    from . import jsonl

    done = set(jsonl.read(args.out))
    todo = [i for i in range(len(prompts)) if i not in done]
    if done:
        print(f"sharpfast: {len(done)} prompts already in {args.out}; {len(todo)} to go", file=sys.stderr)
    from tqdm.auto import tqdm

    with open(args.out, "a", encoding="utf-8") as out, tqdm(total=len(todo), unit="prompt", desc="detect") as bar:
        for start in range(0, len(todo), args.batch_size):
            ids = todo[start:start + args.batch_size]
            # one generator per prompt id: results do not depend on batching or restarts
            lat = torch.cat([model.noise(args.n, height, width,
                                                   torch.Generator("cpu").manual_seed(args.seed + i)) for i in ids])
            res = sharpfast.detect(pipe, [prompts[i] for i in ids], metrics=metrics, num_images_per_prompt=args.n,
                                   steps=args.steps, num_inference_steps=args.num_inference_steps,
                                   guidance_scale=args.guidance_scale, latents=lat, batch_size=args.batch_size,
                                   hvp=args.hvp, progress=False)
            recs = [{"id": i, **rec} for i, rec in zip(ids, res.to_records())]
            if labels is not None:
                for rec in recs:
                    rec["label"] = labels[rec["id"]]
            jsonl.append(out, recs)
            bar.update(len(ids))
    if labels is not None:
        _print_table(args.out, metrics, len(prompts))
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
    d.add_argument("--model", required=True, help="local diffusers model directory (safetensors; loaded offline)")
    d.add_argument("--prompts", required=True, help="text file, one prompt a line (kept exactly, HTML entities too)")
    d.add_argument("--labels", help="text file, one 0/1 a line (1 = memorized): prints AUC and TPR at 1%%/3%% FPR")
    d.add_argument("--metrics", default="wen,sharpness",
                   help="comma list of wen, sharpness, trace, trace_delta, score_norm (default: wen,sharpness)")
    d.add_argument("--n", type=int, default=1, help="images per prompt, averaged (default 1)")
    d.add_argument("--steps", type=int, default=1, help="first sampling steps to average over (default 1)")
    d.add_argument("--num-inference-steps", type=int, default=50, help="sampler steps of the schedule (default 50)")
    d.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale of the trajectory (default 7.5)")
    d.add_argument("--batch-size", type=int, default=8, help="prompts per UNet batch (default 8)")
    d.add_argument("--hvp", choices=("fd", "jvp"), default="fd", help="Hessian-vector product: fd (default) or jvp")
    d.add_argument("--seed", type=int, default=42, help="prompt i draws its noise from seed + i (default 42)")
    d.add_argument("--device", default="cuda", help="torch device (default cuda)")
    d.add_argument("--dtype", choices=tuple(DTYPES), default="fp16", help="UNet dtype (default fp16)")
    d.add_argument("--out", default="results.jsonl", help="JSON lines output, appended (default results.jsonl)")
    from . import cli_scan
    from .harness.cli import add_parsers, cmd_demo, cmd_eval

    add_parsers(sub)
    cli_scan.add_parsers(sub)
    args = parser.parse_args(argv)
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
