"""`sharpfast eval detect|mitigate`: the evaluation harness (tables, JSON, figures; resumable)."""
from __future__ import annotations

from ..errors import BadArgument
from .common import add_device_args, check_output_dir, csv, device_dtype, ints, load_model


def _common(p):
    """Options of both eval commands."""
    p.add_argument("--model", default="digits", help="'digits' (bundled, default) or a local diffusers model directory")
    p.add_argument("--out", default="sharpfast-eval", help="output folder (default sharpfast-eval); reruns resume")
    add_device_args(p)
    p.add_argument("--num-inference-steps", type=int, default=None,
                       help="DDIM steps (default: the pipeline's own, 50 for SD)")
    p.add_argument("--guidance-scale", type=float, default=None,
                       help="CFG scale (default: the pipeline's own, 7.5 for SD)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per UNet batch (default 16)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _detect_parser(esub) -> None:
    """eval detect: the paper's Table 1 for every detector."""
    d = esub.add_parser("detect", help="AUC and TPR at 1%% FPR per metric, steps and n; table, JSON, ROC PNG",
                        description="Score the memorized and non-memorized prompt sets with every metric for each "
                                    "(n, steps), print the AUC / TPR@1%%FPR table and write OUT/detect.json, "
                                    "OUT/roc.png and the per-configuration scores (resumable).")
    _common(d)
    d.add_argument("--memorized", help="memorized prompts (.txt, one a line, or .jsonl with 'prompt'); "
                                       "default: the bundled model's set")
    d.add_argument("--non-memorized", help="non-memorized prompts (.txt or .jsonl); with --memorized")
    d.add_argument("--calibration", help="normal prompts kept apart from both sets (.txt or .jsonl): the "
                                          "combined detectors are fitted on these only (the bundled model "
                                          "uses the captions of its shipped calibration)")
    d.add_argument("--n", type=ints, default=[1, 4], help="images per prompt, comma list (default 1,4)")
    d.add_argument(
        "--steps", type=ints, default=[1, 5], help="first sampling steps averaged, comma list (default 1,5)"
    )
    d.add_argument("--metrics", type=csv, default=None,
                   help="comma list of the registry's metrics: wen, sharpness, trace, trace_delta, score_norm, "
                        "channel_wen, aniso_align, anisotropy, wen_low, attn_entropy (default: all of them, "
                        "side by side)")
    d.add_argument("--hvp", choices=("fd", "jvp"), default="fd", help="Hessian-vector product for sharpness")
    d.add_argument("--seed", type=int, default=42,
                   help="the prompt on line i of its file draws its noise from seed + i, as in `sharpfast "
                        "detect` and `scan` (bundled sets: position i) (default 42)")


def _mitigate_parser(esub) -> None:
    """eval mitigate: copies, similarity and fidelity per mitigation."""
    m = esub.add_parser("mitigate", help="copies, similarity and prompt fidelity per mitigation method",
                        description="Generate every memorized prompt from the same seeds under each mitigation and "
                                    "report the share of copies of the memorized image, the mean similarity to it "
                                    "and prompt fidelity (digit classifier). Writes OUT/mitigate.json, "
                                    "OUT/mitigate_grid.png (and OUT/tradeoff.png with --sweep); resumable.")
    _common(m)
    from ..mitigations import REGISTRY

    m.add_argument("--method", type=csv, default=["none", "sail", "transition", "sail+transition"],
                   help=f"comma list of the registry's mitigations: {', '.join(REGISTRY)} (default none,sail,"
                        f"transition,sail+transition)")
    m.add_argument("--half", choices=("A", "B", "all"), default="all",
                   help="memorized prompts at even positions (A: where settings are chosen), odd positions (B: "
                        "where the choice is reported) or all (default)")
    m.add_argument("--seeds", type=int, default=5, help="generations per prompt, seeds 0..S-1 (default 5)")
    m.add_argument("--settings", type=csv, default=[],
                   help="comma list of method=setting in place of a method's registry default, e.g. "
                        "transition=s0t450,attention_rescale=1.5 (without --sweep)")
    m.add_argument("--sweep", action="store_true", help="every setting of each method: trade-off curves")
    m.add_argument("--limit", type=int, default=None, help="only the first LIMIT memorized prompts")


def _guard_parser(esub) -> None:
    """eval guard: the guard as served against plain pipe(...)."""
    gd = esub.add_parser(
        "guard",
        help="memorized prompts through sharpfast.guard(pipe) against plain pipe(...)",
        description="Generate each memorized prompt of the half once per seed plainly and once "
        "through sharpfast.guard(pipe) (its defaults unless given), from the same "
        "generators in the same run; report copies, near copies at 0.8, fidelity, "
        "flagged / mitigated shares and the guarded / plain time. Writes OUT/guard.json "
        "(resumable).",
    )
    _common(gd)
    gd.add_argument("--half", choices=("A", "B", "all"), default="B",
                    help="memorized prompts at odd positions (B, default: held out from the choice of the guard's "
                         "defaults), even positions (A) or all")
    gd.add_argument("--seeds", type=int, default=2, help="generations per prompt, seeds 0..S-1 (default 2)")
    gd.add_argument("--metric", default=None, help="the guard's metric (default: the guard's own default)")
    gd.add_argument("--mitigation", default="auto", help="the guard's mitigation (default auto)")
    gd.add_argument("--setting", default=None, help="the mitigation's setting (default: its registry default)")
    gd.add_argument("--limit", type=int, default=None, help="only the first LIMIT memorized prompts")


class EvalCommand:
    name = "eval"

    @staticmethod
    def register(sub) -> None:
        e = sub.add_parser("eval", help="evaluation harness: detection (Table 1) and mitigation quality")
        esub = e.add_subparsers(dest="eval_command", required=True)
        _detect_parser(esub)
        _mitigate_parser(esub)
        _guard_parser(esub)

    @staticmethod
    def run(args) -> int:
        check_output_dir(args.out)
        device, dtype = device_dtype(args.device, args.dtype)
        run = {"detect": _run_detect, "guard": _run_guard, "mitigate": _run_mitigate}[args.eval_command]
        return run(args, device, dtype)


def _knob(value):
    """A setting from the command line: a number when it reads as one, else the string."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _run_detect(args, device, dtype) -> int:
    from ..harness import detect_eval
    from ..harness.prompt_sets import bundled_records, read_prompt_file, records_from_files
    from ..metrics import METRICS

    if bool(args.memorized) != bool(args.non_memorized):
        raise BadArgument("give both --memorized and --non-memorized, or neither")
    if args.memorized:
        sets = {"eval": records_from_files(args.memorized, args.non_memorized)}
        if args.calibration:
            sets["calibration"] = [dict(prompt=p, memorized=False, duplicates=0, row=k)
                                   for k, p in read_prompt_file(args.calibration)]
    elif args.model == "digits":
        sets = bundled_records("digits")
    else:
        raise BadArgument("--memorized and --non-memorized are needed for a model directory")
    pipe = load_model(args.model, device, dtype)
    report = detect_eval.run(pipe, sets, ns=args.n, steps_list=args.steps, metrics=args.metrics or list(METRICS),
                             out_dir=args.out, seed=args.seed, batch_size=args.batch_size, hvp=args.hvp,
                             num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                             progress=not args.quiet)
    print(detect_eval.format_report(report))
    print(f"\nwrote {args.out}/detect.json and {args.out}/roc.png")
    return 0


def _memorized_half(args, what: str) -> list:
    from .. import zoo
    from ..harness import mitigate_eval

    if args.model not in zoo.MODELS:
        raise BadArgument(f"eval {what} judges copies against the digits training images: use --model digits")
    return mitigate_eval.halves(zoo.prompts(args.model, "memorized"))[args.half][:args.limit]


def _run_guard(args, device, dtype) -> int:
    from ..harness import guard_eval
    from ..zoo.digits_data import digit_images

    records = _memorized_half(args, "guard")
    pipe = load_model(args.model, device, dtype)
    summary = guard_eval.run(pipe, records, digit_images()[0], seeds=tuple(range(args.seeds)), metric=args.metric,
                             mitigation=None if args.mitigation == "none" else args.mitigation,
                             setting=None if args.setting is None else _knob(args.setting), out_dir=args.out,
                             batch_prompts=args.batch_size, num_inference_steps=args.num_inference_steps,
                             guidance_scale=args.guidance_scale, progress=not args.quiet)
    print(guard_eval.format_summary(summary))
    print(f"\nwrote {args.out}/guard.json")
    return 0


def _run_mitigate(args, device, dtype) -> int:
    from ..harness import mitigate_eval
    from ..zoo.digits_data import digit_images

    records = _memorized_half(args, "mitigate")
    settings = {}
    for item in args.settings:
        name, eq, value = item.partition("=")
        if not eq:
            raise BadArgument(f"--settings takes method=setting pairs, got {item!r}")
        settings[name] = _knob(value)
    pipe = load_model(args.model, device, dtype)
    res = mitigate_eval.run(pipe, records, digit_images()[0], methods=args.method, seeds=tuple(range(args.seeds)),
                            settings=settings, sweep=args.sweep, out_dir=args.out, batch_prompts=args.batch_size,
                            num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                            progress=not args.quiet)
    print(mitigate_eval.format_summary(res["summary"]))
    print(f"\nwrote {args.out}/mitigate.json and {args.out}/mitigate_grid.png")
    return 0
