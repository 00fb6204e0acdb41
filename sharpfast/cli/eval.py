"""`sharpfast eval detect|mitigate`: the evaluation harness (tables, JSON, figures; resumable)."""
from __future__ import annotations

from typing import Any

from ..errors import BadArgument
from . import options
from .common import check_output_dir, device_dtype, load_model

_COMMON = ("--model", "--out", "--device", "--dtype", "--num-inference-steps", "--guidance-scale", "--batch-size",
           "--quiet")


def _detect_parser(esub) -> None:
    """eval detect: the paper's Table 1 for every detector."""
    d = esub.add_parser("detect", help="AUC and TPR at 1%% FPR per metric, steps and n; table, JSON, ROC PNG",
                        description="Score the memorized and non-memorized prompt sets with every metric for each "
                                    "(n, steps), print the AUC / TPR@1%FPR table and write OUT/detect.json, "
                                    "OUT/roc.png and the per-configuration scores (resumable).")
    options.add(d, "eval detect", *_COMMON, "--memorized", "--non-memorized", "--calibration", "--n", "--steps",
                "--metrics", "--hvp", "--seed")


def _mitigate_parser(esub) -> None:
    """eval mitigate: copies, similarity and fidelity per mitigation."""
    m = esub.add_parser("mitigate", help="copies, similarity and prompt fidelity per mitigation method",
                        description="Generate every memorized prompt from the same seeds under each mitigation and "
                                    "report the share of copies of the memorized image, the mean similarity to it "
                                    "and prompt fidelity (the model's judge: digit or scene-attribute classifier). "
                                    "Writes OUT/mitigate.json, "
                                    "OUT/mitigate_grid.png (and OUT/tradeoff.png with --sweep); resumable.")
    options.add(m, "eval mitigate", *_COMMON, "--method", "--half", "--seeds", "--settings", "--sweep", "--limit")


def _guard_parser(esub) -> None:
    """eval guard: the guard as served against plain pipe(...)."""
    gd = esub.add_parser(
        "guard",
        help="memorized and normal prompts through sharpfast.guard(pipe) against plain pipe(...)",
        description="Generate each memorized and each normal prompt of the half once per seed plainly and "
        "once through sharpfast.guard(pipe) (its defaults unless given), from the same "
        "generators in the same run; report, for the memorized prompts, copies, near copies at 0.8 and "
        "fidelity, for the normal ones the share mitigated and their fidelity, and for both the "
        "guarded / plain time. Writes OUT/guard.json (resumable); with several --policy, one run each "
        "and the policy frontier OUT/guard_frontier.png.",
    )
    options.add(gd, "eval guard", *_COMMON, "--half", "--seeds", "--first-seed", "--metric", "--mitigation",
                "--setting", "--limit", "--policy", "--no-normal")


class EvalCommand:
    name = "eval"

    @staticmethod
    def register(sub: Any) -> None:
        e = sub.add_parser("eval", help="evaluation harness: detection (Table 1) and mitigation quality",
                           description="The evaluation harness: `eval detect` (AUC / TPR per detector), `eval "
                                       "mitigate` (copies, similarity, fidelity per mitigation), `eval guard` (the "
                                       "guard as served). Tables, JSON and figures; every run resumes.")
        esub = e.add_subparsers(dest="eval_command", required=True)
        _detect_parser(esub)
        _mitigate_parser(esub)
        _guard_parser(esub)

    @staticmethod
    def run(args: Any) -> int:
        check_output_dir(args.out)
        device, dtype = device_dtype(args.device, args.dtype)
        run = {"detect": _run_detect, "guard": _run_guard, "mitigate": _run_mitigate}[args.eval_command]
        return run(args, device, dtype)


def _knob(value: Any) -> Any:
    """A setting from the command line: a number when it reads as one, else the string."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _run_detect(args: Any, device: Any, dtype: Any) -> int:
    from .. import zoo
    from ..harness import detect_eval
    from ..harness.prompt_sets import bundled_records, read_prompt_file, records_from_files
    from ..scores import METRICS

    if bool(args.memorized) != bool(args.non_memorized):
        raise BadArgument("give both --memorized and --non-memorized, or neither")
    if args.memorized:
        from ..data import PROMPT_SETS, prompt_set_path

        shipped = lambda f: prompt_set_path(f) if f in PROMPT_SETS else f  # noqa: E731  (a shipped set by name)
        sets = {"eval": records_from_files(shipped(args.memorized), shipped(args.non_memorized))}
        if args.calibration:
            sets["calibration"] = [dict(prompt=p, memorized=False, duplicates=0, row=k)
                                   for k, p in read_prompt_file(args.calibration)]
    elif args.model in zoo.MODELS:
        sets = bundled_records(args.model)
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


def _memorized_half(args: Any, what: str) -> list:
    from .. import zoo
    from ..harness import mitigate_eval

    if args.model not in zoo.MODELS:
        raise BadArgument(f"eval {what} judges copies against a bundled model's training images: use --model "
                          f"{' or '.join(zoo.MODELS)}")
    return mitigate_eval.halves(zoo.prompts(args.model, "memorized"))[args.half][:args.limit]


def _run_guard(args: Any, device: Any, dtype: Any) -> int:
    from .. import zoo
    from ..guarding import Policy
    from ..harness import guard_eval, mitigate_eval

    records = _memorized_half(args, "guard")
    normal = [] if args.no_normal else mitigate_eval.halves(zoo.prompts(args.model, "non_memorized"))[args.half]
    policies: list = [Policy.of(p) for p in args.policy or []] or [None]  # checked before loading the model
    pipe = load_model(args.model, device, dtype)
    if args.first_seed < 0 or args.seeds < 1:
        raise BadArgument(f"--first-seed must be >= 0 and --seeds >= 1, got {args.first_seed} and {args.seeds}")
    kw = dict(seeds=tuple(range(args.first_seed, args.first_seed + args.seeds)), metric=args.metric,
              mitigation=None if args.mitigation == "none" else args.mitigation,
              setting=None if args.setting is None else _knob(args.setting), batch_prompts=args.batch_size,
              num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
              progress=not args.quiet, normal=normal[:None if args.limit is None else 2 * args.limit])
    judge = zoo.judge(args.model, pipe)
    if len(policies) > 1:
        points = guard_eval.frontier(pipe, records, judge, policies, out_dir=args.out, model=args.model,
                                     half=f"half {args.half}" if args.half != "all" else "all prompts", **kw)
        for p in points:
            print(f"policy {p['policy']}:\n{guard_eval.format_summary(p['summary'])}\n")
        print(f"wrote {args.out}/guard_frontier.json and {args.out}/guard_frontier.png")
        return 0
    summary = guard_eval.run(pipe, records, judge, out_dir=args.out, policy=policies[0], **kw)
    print(guard_eval.format_summary(summary))
    print(f"\nwrote {args.out}/guard.json")
    return 0


def _run_mitigate(args: Any, device: Any, dtype: Any) -> int:
    from .. import zoo
    from ..harness import mitigate_eval

    records = _memorized_half(args, "mitigate")
    settings = {}
    for item in args.settings:
        name, eq, value = item.partition("=")
        if not eq:
            raise BadArgument(f"--settings takes method=setting pairs, got {item!r}")
        settings[name] = _knob(value)
    pipe = load_model(args.model, device, dtype)
    res = mitigate_eval.run(pipe, records, zoo.judge(args.model, pipe), methods=args.method,
                            seeds=tuple(range(args.seeds)),
                            settings=settings, sweep=args.sweep, out_dir=args.out, batch_prompts=args.batch_size,
                            num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                            progress=not args.quiet)
    print(mitigate_eval.format_summary(res["summary"]))
    print(f"\nwrote {args.out}/mitigate.json and {args.out}/mitigate_grid.png")
    return 0
