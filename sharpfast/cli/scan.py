"""`sharpfast scan`: audit a prompt corpus, resumable, on one or many processes."""
from __future__ import annotations

import os
from typing import Any

from .. import validate
from ..errors import BadArgument
from . import options
from .common import check_output_dir, device_dtype, load_model
from .options import parse_threshold


class ScanCommand:
    name = "scan"

    @staticmethod
    def register(sub: Any) -> None:
        s = sub.add_parser("scan", help="audit a prompt corpus for memorized prompts (resumable, multi-process)",
                           description="Stream a prompt file, score every prompt and write shard files to --out, "
                                       "resumable at batch granularity (rerun the same command after a kill). Under "
                                       "`accelerate launch` each process takes a disjoint share; rank 0 merges "
                                       "results.jsonl, summary.json and histogram.png.")
        options.add(s, "scan", "--model", "--prompts", "--out", "--metrics", "--n", "--batch-size", "--dtype",
                    "--device", "--threshold", "--calibrate-on", "--fpr", "--flag-metric", "--column", "--id-field",
                    "--seed", "--num-inference-steps", "--guidance-scale", "--overwrite", "--quiet")

    @staticmethod
    def run(args: Any) -> int:
        import sharpfast

        from ..prompt_sources import check_source

        # arguments and input files are checked before the model is loaded
        check_source(args.prompts)
        if args.calibrate_on:
            check_source(args.calibrate_on)
        validate.integer(args.n, "--n")
        validate.integer(args.batch_size, "--batch-size")
        if args.num_inference_steps is not None:
            validate.integer(args.num_inference_steps, "--num-inference-steps")
        if args.guidance_scale is not None:
            validate.finite(args.guidance_scale, "--guidance-scale")
        threshold = parse_threshold(args.threshold, "--threshold")
        if args.calibrate_on and threshold != "auto":
            raise BadArgument("give --threshold or --calibrate-on, not both")
        validate.finite(args.fpr, "--fpr", above=0)
        check_output_dir(args.out)
        device, dtype = device_dtype(args.device, args.dtype)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        pipe = load_model(args.model, device, dtype)
        summary = sharpfast.scan(
            pipe,
            args.prompts,
            args.out,
            metrics=args.metrics,
            num_images_per_prompt=args.n,
            batch_size=args.batch_size,
            threshold=threshold,
            calibrate_on=args.calibrate_on,
            fpr=args.fpr,
            flag_metric=args.flag_metric,
            column=args.column,
            id_field=args.id_field,
            seed=args.seed,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            model_name=args.model,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
        if int(os.environ.get("RANK", "0")) == 0:
            why = summary["skipped_by_reason"]
            print(f"{summary['rows']} rows: {summary['scored']} scored, {summary['skipped']} skipped"
                  + (f" {why}" if why else "") + f", {summary['flagged']} flagged "
                  + (f"({summary['flag_metric']} > {summary['threshold']:.4g}; threshold: "
                     f"{summary['threshold_source']})" if summary["threshold"] is not None else "(no threshold)"))
            for r in summary["top_flagged"]:
                print(f"  {r[summary['flag_metric']]:10.4f}  #{r['id']}  {r['prompt'][:100]}")
            print(f"wrote {args.out}/results.jsonl, summary.json, histogram.png")
        return 0
