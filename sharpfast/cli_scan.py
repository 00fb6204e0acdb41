"""`sharpfast scan` (audit a prompt corpus) and `sharpfast sail` (generate with SAIL) commands."""
from __future__ import annotations

import os
import sys


def add_parsers(sub) -> None:
    from .harness.cli import _csv

    s = sub.add_parser("scan", help="audit a prompt corpus for memorized prompts (resumable, multi-process)",
                       description="Stream a prompt file, score every prompt and write shard files to --out, "
                                   "resumable at batch granularity (rerun the same command after a kill). Under "
                                   "`accelerate launch` each process takes a disjoint share; rank 0 merges "
                                   "results.jsonl, summary.json and histogram.png.")
    s.add_argument("--model", required=True, help="'digits' (bundled) or a local diffusers model directory")
    s.add_argument("--prompts", required=True, help=".txt (a prompt a line), .jsonl ('prompt' or 'caption' field; "
                                                    "other fields carried through) or .parquet")
    s.add_argument("--out", required=True, help="output folder (shards, results.jsonl, summary.json, histogram.png)")
    s.add_argument("--metrics", type=_csv, default=["wen", "sharpness"], help="comma list (default wen,sharpness)")
    s.add_argument("--n", type=int, default=1, help="images per prompt (default 1)")
    s.add_argument("--batch-size", type=int, default=32, help="prompts per batch and per resumable chunk (default 32)")
    s.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="UNet dtype; auto = fp16 on cuda, fp32 on cpu")
    s.add_argument("--device", default="auto", help="torch device; auto = cuda if available (the process's own "
                                                     "GPU under accelerate), else cpu")
    s.add_argument("--threshold", type=float, help="flag prompts whose flag metric exceeds this")
    s.add_argument("--calibrate-on", help="file of known-normal prompts: threshold at --fpr of their scores")
    s.add_argument("--fpr", type=float, default=0.01, help="false-positive rate for --calibrate-on (default 0.01)")
    s.add_argument("--flag-metric", help="metric the flag uses (default: the last of --metrics)")
    s.add_argument("--column", help="prompt field / column (default: prompt, else caption)")
    s.add_argument("--id-field", help="field / column holding a stable prompt id (default: the row number)")
    s.add_argument("--seed", type=int, default=42, help="row i draws its noise from seed + i (default 42)")
    s.add_argument("--num-inference-steps", type=int, default=50, help="sampler steps of the schedule (default 50)")
    s.add_argument("--overwrite", action="store_true", help="discard a scan with other settings in --out")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    g = sub.add_parser("sail", help="generate with SAIL-optimized initial noise (memorization mitigation)",
                       description="Generate images for a prompt with SAIL and save them as one PNG grid.")
    g.add_argument("--model", default="digits", help="'digits' (bundled, default) or a local diffusers model directory")
    g.add_argument("--prompt", required=True, help="the prompt")
    g.add_argument("--n", type=int, default=4, help="images (default 4)")
    g.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    g.add_argument("--threshold", type=float, help="sharpness threshold (default: the model's calibration.json)")
    from .mitigation import DEFAULTS

    g.add_argument("--candidates", type=int, default=None,
                   help=f"initial noises per image (default {DEFAULTS['paper']['candidates']})")
    g.add_argument("--max-steps", type=int, default=None,
                   help=f"Adam steps at most (default {DEFAULTS['paper']['max_steps']})")
    g.add_argument("--num-inference-steps", type=int, default=50, help="sampler steps (default 50)")
    g.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale (default 7.5)")
    g.add_argument("--device", default="auto")
    g.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    g.add_argument("--out", default="sail.png", help="PNG grid: plain generation above, SAIL below (default sail.png)")


def cmd_scan(args) -> int:
    import sharpfast

    from . import validate, zoo
    from .harness.cli import _device_dtype
    from .scan_input import check_source

    # arguments and input files are checked before the model is loaded
    check_source(args.prompts)
    if args.calibrate_on:
        check_source(args.calibrate_on)
    validate.integer(args.n, "--n")
    validate.integer(args.batch_size, "--batch-size")
    validate.integer(args.num_inference_steps, "--num-inference-steps")
    if args.threshold is not None:
        validate.finite(args.threshold, "--threshold")
    validate.finite(args.fpr, "--fpr", above=0)
    device, dtype = _device_dtype(args.device, args.dtype)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    from .cli import load_pipeline

    pipe = load_pipeline(zoo.resolve(args.model), device, dtype)
    pipe.set_progress_bar_config(disable=True)
    summary = sharpfast.scan(pipe, args.prompts, args.out, metrics=args.metrics, n=args.n, batch_size=args.batch_size,
                             threshold=args.threshold, calibrate_on=args.calibrate_on, fpr=args.fpr,
                             flag_metric=args.flag_metric, column=args.column, id_field=args.id_field, seed=args.seed,
                             num_inference_steps=args.num_inference_steps, model_name=args.model,
                             overwrite=args.overwrite, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{summary['rows']} rows: {summary['scored']} scored, {summary['skipped']} skipped "
              f"{summary['skipped_by_reason'] or ''}, {summary['flagged']} flagged "
              f"({summary['flag_metric']} > {summary['threshold']})")
        for r in summary["top_flagged"]:
            print(f"  {r[summary['flag_metric']]:10.4f}  #{r['id']}  {r['prompt'][:100]}")
        print(f"wrote {args.out}/results.jsonl, summary.json, histogram.png")
    return 0


def cmd_sail(args) -> int:
    import torch

    import sharpfast

    from . import validate, zoo
    from .cli import _check_output, load_pipeline
    from .harness.cli import _device_dtype
    from .harness.plots import image_grid

    # everything that can be checked is checked before the model is loaded and anything generated
    validate.prompts(args.prompt, "--prompt")
    validate.integer(args.n, "--n")
    validate.integer(args.num_inference_steps, "--num-inference-steps")
    validate.guidance_scale(args.guidance_scale, needs_cfg=True)
    for name in ("candidates", "max_steps"):
        if getattr(args, name) is not None:
            validate.integer(getattr(args, name), "--" + name.replace("_", "-"), minimum=0 if name == "max_steps" else 1)
    if args.threshold is not None:
        validate.finite(args.threshold, "--threshold")
    if not args.out.lower().endswith(".png"):
        raise validate.BadArgument(f"--out must be a .png file, got {args.out!r}")
    _check_output(args.out, overwrite=True)
    device, dtype = _device_dtype(args.device, args.dtype)
    pipe = load_pipeline(zoo.resolve(args.model), device, dtype)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, output_type="pt",
              num_images_per_prompt=args.n)
    plain = pipe(args.prompt, generator=torch.Generator().manual_seed(args.seed), **kw).images
    extra = {k: v for k, v in (("candidates", args.candidates), ("max_steps", args.max_steps)) if v is not None}
    out, info = sharpfast.sail(pipe, args.prompt, generator=torch.Generator().manual_seed(args.seed),
                               threshold=args.threshold if args.threshold is not None else "auto", return_info=True,
                               **extra, **kw)
    to_img = lambda x: (x.float().mean(0) * 2 - 1).cpu().numpy()  # noqa: E731  (grey view of any channel count)
    image_grid([[to_img(x) for x in plain], [to_img(x) for x in out.images]], ["plain", "SAIL"],
               [f"seed {args.seed}, image {i}" for i in range(args.n)], args.out, args.prompt[:80])
    print(f"SAIL: {int(info['accepted'].sum())}/{args.n} images under the threshold {info['threshold']:.4g}, "
          f"{int(info['unchanged'].sum())} kept their noise, {info['adam_steps']} Adam steps, "
          f"{info['unet_calls']} UNet calls, {info['seconds']:.1f} s; wrote {args.out}")
    return 0


