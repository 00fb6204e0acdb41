"""`sharpfast calibrate`: a model's detection thresholds and SAIL's target from normal prompts."""
from __future__ import annotations

import json
import sys
from typing import Any

from .. import validate
from . import options
from .common import device_dtype, load_model, read_lines


class CalibrateCommand:
    name = "calibrate"

    @staticmethod
    def register(sub: Any) -> None:
        p = sub.add_parser("calibrate", help="thresholds at a false-positive rate and SAIL's target for a model",
                           description="Score prompts that are not memorized (--prompts, a .txt file, one a line; "
                                       "default: the built-in generic captions) at the first sampling step and "
                                       "write each metric's threshold at --fpr and SAIL's stopping target, with "
                                       "the model's weights fingerprint. Written to the per-user cache, where "
                                       "threshold='auto' (sail, guard, scan, serve) finds it, or to --out (name it "
                                       "calibration.json inside the model directory to ship it with the model).")
        options.add(p, "calibrate", "--model", "--prompts", "--out", "--fpr", "--n",
                    "--num-inference-steps", "--guidance-scale", "--batch-size", "--quiet", "--device", "--dtype")

    @staticmethod
    def run(args: Any) -> int:
        from .. import calibration

        prompts: list | str = ([q for q in read_lines(args.prompts, "--prompts") if q.strip()] if args.prompts
                               else calibration.builtin_kind())
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
        kind = {} if args.prompts else {"builtin": calibration.builtin_kind()}
        out = args.out or calibration.cache_path(cal["weights"], **cal["settings"], **kind)
        calibration.save(cal, out)
        print(json.dumps({m: cal[m] for m in calibration.CALIBRATED_METRICS}, indent=1))
        print(f"wrote {out} ({cal['prompts']['count']} prompts: {cal['prompts']['source']}; weights "
              f"{cal['weights']['fingerprint']})", file=sys.stdout)
        return 0
