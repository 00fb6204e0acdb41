"""`sharpfast sail`: generate with SAIL-optimized initial noise, plain and SAIL side by side."""
from __future__ import annotations

from typing import Any

from .. import validate
from ..errors import BadArgument
from . import options
from .common import check_output, device_dtype, load_model
from .options import parse_threshold


class SailCommand:
    name = "sail"

    @staticmethod
    def register(sub: Any) -> None:
        g = sub.add_parser("sail", help="generate with SAIL-optimized initial noise (memorization mitigation)",
                           description="Generate images for a prompt with SAIL and save them as one PNG grid.")
        options.add(g, "sail", "--model", "--prompt", "--n", "--seed", "--threshold", "--candidates", "--max-steps",
                    "--num-inference-steps", "--guidance-scale", "--device", "--dtype", "--out", "--quiet")

    @staticmethod
    def run(args: Any) -> int:
        import torch

        import sharpfast

        from ..harness.plots import image_grid

        # everything that can be checked is checked before the model is loaded and anything generated
        validate.prompts(args.prompt, "--prompt")
        validate.integer(args.n, "--n")
        if args.num_inference_steps is not None:
            validate.integer(args.num_inference_steps, "--num-inference-steps")
        if args.guidance_scale is not None:
            validate.guidance_scale(args.guidance_scale, needs_cfg=True)
        for name in ("candidates", "max_steps"):
            if getattr(args, name) is not None:
                validate.integer(getattr(args, name), "--" + name.replace("_", "-"),
                                 minimum=0 if name == "max_steps" else 1)
        threshold = parse_threshold(args.threshold)
        if threshold is None:
            raise BadArgument("--threshold none: SAIL needs a target ('auto' or a number)")
        if not args.out.lower().endswith(".png"):
            raise BadArgument(f"--out must be a .png file, got {args.out!r}")
        check_output(args.out)
        device, dtype = device_dtype(args.device, args.dtype)
        pipe = load_model(args.model, device, dtype)
        pipe.set_progress_bar_config(disable=args.quiet)
        kw = dict(output_type="pt", num_images_per_prompt=args.n,
                  **{k: v for k, v in (("num_inference_steps", args.num_inference_steps),
                                       ("guidance_scale", args.guidance_scale)) if v is not None})
        plain = pipe(args.prompt, generator=torch.Generator().manual_seed(args.seed), **kw).images
        extra = {k: v for k, v in (("candidates", args.candidates), ("max_steps", args.max_steps)) if v is not None}
        out, info = sharpfast.sail(pipe, args.prompt, generator=torch.Generator().manual_seed(args.seed),
                                   threshold=threshold, return_info=True, **extra, **kw)
        def to_img(x: torch.Tensor) -> Any:  # what the pipeline made: RGB as RGB, one channel as grey, in [-1, 1]
            return (x.float() * 2 - 1).cpu().numpy() if x.shape[0] == 3 else (x.float()[0] * 2 - 1).cpu().numpy()
        image_grid([[to_img(x) for x in plain], [to_img(x) for x in out.images]], ["plain", "SAIL"],
                   [f"seed {args.seed}, image {i}" for i in range(args.n)], args.out, args.prompt[:80])
        print(f"SAIL: {int(info['accepted'].sum())}/{args.n} images under the threshold {info['threshold']:.4g}, "
              f"{int(info['unchanged'].sum())} kept their noise, {info['adam_steps']} Adam steps, "
              f"{info['unet_calls']} UNet calls, {info['seconds']:.1f} s; wrote {args.out}\nSAIL: {info['note']}")
        return 0
