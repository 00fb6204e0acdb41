"""`sharpfast calibrate`: a model's detection thresholds and SAIL's target from normal prompts."""
from __future__ import annotations

import json
import sys

from .. import validate
from .common import add_device_args, device_dtype, load_model, read_lines


class CalibrateCommand:
    name = "calibrate"

    @staticmethod
    def register(sub) -> None:
        p = sub.add_parser("calibrate", help="thresholds at a false-positive rate and SAIL's target for a model",
                           description="Score prompts that are not memorized (--prompts, a .txt file, one a line; "
                                       "default: the built-in generic captions) at the first sampling step and "
                                       "write each metric's threshold at --fpr and SAIL's stopping target, with "
                                       "the model's weights fingerprint. Written to the per-user cache, where "
                                       "threshold='auto' (sail, guard, scan, serve) finds it, or to --out (name it "
                                       "calibration.json inside the model directory to ship it with the model).")
        p.add_argument("--model", required=True, help="'digits' (bundled) or a local diffusers model directory")
        p.add_argument("--prompts", help="normal prompts, one a line (default: the built-in generic captions)")
        p.add_argument("--out", help="output file (default: the per-user cache that threshold='auto' reads)")
        p.add_argument("--fpr", type=float, default=0.01, help="false-positive rate of the thresholds (default 0.01)")
        p.add_argument("--n", type=int, default=1, help="images per prompt (default 1)")
        p.add_argument("--num-inference-steps", type=int, default=None,
                       help="sampler steps (default: the pipeline's own, 50 for SD)")
        p.add_argument("--guidance-scale", type=float, default=None,
                       help="CFG scale (default: the pipeline's own, 7.5 for SD)")
        p.add_argument("--batch-size", type=int, default=8, help="prompts per UNet batch (default 8)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        add_device_args(p)

    @staticmethod
    def run(args) -> int:
        from .. import calibration

        prompts = read_lines(args.prompts, "--prompts") if args.prompts else None
        prompts = [q for q in prompts if q.strip()] if prompts else None
        validate.integer(args.n, "--n")
        if args.num_inference_steps is not None:
            validate.integer(args.num_inference_steps, "--num-inference-steps")
        validate.integer(args.batch_size, "--batch-size")
        if args.guidance_scale is not None:
            validate.guidance_scale(args.guidance_scale, needs_cfg=True)
        validate.finite(args.fpr, "--fpr", above=0)
        if args.out:
            from .common import check_output

            check_output(args.out)
        device, dtype = device_dtype(args.device, args.dtype)
        pipe = load_model(args.model, device, dtype)
        cal = calibration.calibrate_model(pipe, prompts, num_images_per_prompt=args.n, fpr=args.fpr,
                                          num_inference_steps=args.num_inference_steps,
                                          guidance_scale=args.guidance_scale, batch_size=args.batch_size,
                                          progress=not args.quiet)
        out = args.out or calibration.cache_path(cal["weights"], **cal["settings"])
        calibration.save(cal, out)
        print(json.dumps({m: cal[m] for m in calibration.CALIBRATED_METRICS}, indent=1))
        print(f"wrote {out} ({cal['prompts']['count']} prompts: {cal['prompts']['source']}; weights "
              f"{cal['weights']['fingerprint']})", file=sys.stdout)
        return 0
