"""`sharpfast scan`: audit a prompt corpus, resumable, on one or many processes."""
from __future__ import annotations

import os

from .. import validate
from ..errors import BadArgument
from .common import check_output_dir, csv, device_dtype, load_model, parse_threshold


class ScanCommand:
    name = "scan"

    @staticmethod
    def register(sub) -> None:
        s = sub.add_parser("scan", help="audit a prompt corpus for memorized prompts (resumable, multi-process)",
                           description="Stream a prompt file, score every prompt and write shard files to --out, "
                                       "resumable at batch granularity (rerun the same command after a kill). Under "
                                       "`accelerate launch` each process takes a disjoint share; rank 0 merges "
                                       "results.jsonl, summary.json and histogram.png.")
        s.add_argument("--model", required=True, help="'digits' (bundled) or a local diffusers model directory")
        s.add_argument("--prompts", required=True, help=".txt (a prompt a line), .jsonl ('prompt' or 'caption' field; "
                                                        "other fields carried through) or .parquet")
        s.add_argument(
            "--out", required=True, help="output folder (shards, results.jsonl, summary.json, histogram.png)"
        )
        s.add_argument("--metrics", type=csv, default=["wen", "sharpness"], help="comma list (default wen,sharpness)")
        s.add_argument("--n", type=int, default=1, help="images per prompt (default 1)")
        s.add_argument("--batch-size", type=int, default=32,
                       help="prompts per batch and per resumable chunk (default 32)")
        s.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                       help="UNet dtype; auto = fp16 on cuda, fp32 on cpu")
        s.add_argument("--device", default="auto", help="torch device; auto = cuda if available (the process's own "
                                                         "GPU under accelerate), else cpu")
        s.add_argument("--threshold", default="auto",
                       help="flag prompts whose flag metric exceeds this: a number, 'auto' (default: the model's "
                            "calibration at these settings, beside it, cached, or made once on built-in captions) "
                            "or 'none' (no flags)")
        s.add_argument("--calibrate-on", help="file of known-normal prompts: threshold at --fpr of their scores")
        s.add_argument("--fpr", type=float, default=0.01, help="false-positive rate for --calibrate-on (default 0.01)")
        s.add_argument("--flag-metric", help="metric the flag uses (default: the last of --metrics)")
        s.add_argument("--column", help="prompt field / column (default: prompt, else caption)")
        s.add_argument("--id-field", help="field / column holding a stable prompt id (default: the row number)")
        s.add_argument("--seed", type=int, default=42, help="row i draws its noise from seed + i (default 42)")
        s.add_argument("--num-inference-steps", type=int, default=None,
                       help="sampler steps of the schedule (default: the pipeline's own, 50 for SD, 28 for SD3 / Flux)")
        s.add_argument("--guidance-scale", type=float, default=None,
                       help="CFG scale (Flux: its embedded guidance; default: the pipeline's own)")
        s.add_argument("--overwrite", action="store_true", help="discard a scan with other settings in --out")
        s.add_argument("--quiet", action="store_true", help="no progress bar")

    @staticmethod
    def run(args) -> int:
        import sharpfast

        from ..scan_input import check_source

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
            n=args.n,
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
            print(f"{summary['rows']} rows: {summary['scored']} scored, {summary['skipped']} skipped "
                  f"{summary['skipped_by_reason'] or ''}, {summary['flagged']} flagged "
                  + (f"({summary['flag_metric']} > {summary['threshold']:.4g}; threshold from "
                     f"{summary['threshold_source']})" if summary["threshold"] is not None else "(no threshold)"))
            for r in summary["top_flagged"]:
                print(f"  {r[summary['flag_metric']]:10.4f}  #{r['id']}  {r['prompt'][:100]}")
            print(f"wrote {args.out}/results.jsonl, summary.json, histogram.png")
        return 0
