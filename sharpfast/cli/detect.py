"""`sharpfast detect`: score every prompt of a file, one JSON line each, resumable."""
from __future__ import annotations

import json
import os
import sys
from typing import Any

from .. import engine, validate
from ..errors import BadArgument, OutputMismatch
from . import options
from .common import check_output, device_dtype, load_model, read_lines


class DetectCommand:
    name = "detect"

    @staticmethod
    def register(sub: Any) -> None:
        d = sub.add_parser("detect", help="score prompts for memorization on a local diffusers model",
                           description="Score every prompt of a file for memorization and append one JSON line "
                                       "per prompt to --out (its commit log, what a rerun resumes "
                                       "from, is OUT.log beside it). "
                                       "Restarting the same command skips prompts already scored; an --out of other "
                                       "prompts or settings is refused.")
        options.add(d, "detect", "--model", "--prompts", "--labels", "--metrics", "--n", "--steps",
                    "--num-inference-steps", "--guidance-scale", "--batch-size", "--hvp", "--seed", "--device",
                    "--dtype", "--out", "--overwrite", "--quiet")

    @staticmethod
    def run(args: Any) -> int:
        from ..adapters import ScoreModel
        from ..progress import bar as progress_bar
        from ..scores import REGISTRY

        rows, labels = _read_inputs(args)  # every argument and path is checked before the model is loaded
        metrics = args.metrics
        for name in ("n", "steps", "num_inference_steps", "batch_size"):
            if getattr(args, name) is not None:
                validate.integer(getattr(args, name), "--" + name.replace("_", "-"))
        if args.guidance_scale is not None:
            validate.guidance_scale(args.guidance_scale, needs_cfg=False)
        metrics = list(validate.metrics(metrics, REGISTRY))
        check_output(args.out)
        device, dtype = device_dtype(args.device, args.dtype)
        # a record is reused only for the same prompt at the same id under the same settings and model
        settings = engine.fingerprint(dict(model=args.model, metrics=metrics, n=args.n, steps=args.steps,
                                           seed=args.seed, num_inference_steps=args.num_inference_steps,
                                           guidance_scale=args.guidance_scale, hvp=args.hvp, dtype=dtype))
        prompt_of = dict(rows)
        log_path = commit_log_of(args.out)
        done = engine.read(log_path)
        stale = [i for i, r in done.items() if prompt_of.get(i) != r.get("prompt") or r.get("settings") != settings]
        if stale and not args.overwrite:
            raise OutputMismatch(f"{args.out} holds {len(stale)} records of other prompts or settings (first: id "
                                 f"{stale[0]}); use another --out, or --overwrite to start it afresh")
        if stale:
            for path in (log_path, args.out):
                if os.path.exists(path):
                    os.remove(path)
            done = {}
        todo = [i for i, _ in rows if i not in done]
        if done:
            print(f"sharpfast: {len(done)} prompts already in {args.out}; {len(todo)} to go", file=sys.stderr)
        if todo:  # else nothing to score: no model to load
            model = ScoreModel(load_model(args.model, device, dtype))

            def record(i: int, res, k: int) -> Any:  # the id is the prompt's line number: its noise is seed + id
                rec={"id": i, **res.to_records()[k], "settings": settings}
                return rec if labels is None else {**rec, "label": labels[i]}

            with engine.CommitLog(log_path) as log, \
                    progress_bar(None, total=len(todo), desc="sharpfast detect", enabled=not args.quiet) as bar:
                engine.run(model, log, todo, prompt_of=prompt_of.__getitem__, noise_id_of=int, n=args.n,
                           seed=args.seed, batch_size=args.batch_size, record=record, bar=bar, metrics=metrics,
                           steps=args.steps, num_inference_steps=args.num_inference_steps,
                           guidance_scale=args.guidance_scale, hvp=args.hvp)
        final = engine.read(log_path)
        recs = [final[i] for i, _ in rows if i in final]
        engine.write_atomic(args.out, "".join(json.dumps(r) + "\n" for r in recs),
                            kept=f"every scored prompt is kept in {log_path}: free space and rerun")
        print(summary_line(args.out, recs, metrics, scored_now=len(todo), log_path=log_path))
        if labels is not None:
            print_table(recs, metrics, len(rows))
        return 0


def _read_inputs(args: Any) -> tuple:
    """(rows (id, prompt), labels {id: 0/1} or None) of --prompts / --labels."""
    from ..prompt_sources import read_prompts

    rows = read_prompts(args.prompts) if args.prompts.endswith((".jsonl", ".parquet")) else [
        (i, p) for i, p in enumerate(read_lines(args.prompts, "prompts")) if p.strip()]
    if not rows:
        raise BadArgument(f"no usable prompt in {args.prompts}")
    if not args.labels:
        return rows, None
    raw = read_lines(args.labels, "labels")
    try:
        return rows, {i: int(raw[i]) for i, _ in rows}
    except (IndexError, ValueError):
        raise BadArgument(f"--labels must hold one 0/1 per line of {args.prompts} ({len(raw)} labels)") from None


def commit_log_of(out: str) -> str:
    """The commit log beside a results file (what a rerun resumes from); a results file of an
    earlier version, which was its own commit log, becomes the log."""
    log = out + ".log"
    if not os.path.exists(log) and os.path.exists(out) and engine.read(out):
        os.replace(out, log)
    return log


def summary_line(out: str, recs: list, metrics: Any, scored_now: int, log_path: str) -> str:
    """What detect prints: where the rows went, how many were scored now, each metric's median."""
    import statistics

    medians = ", ".join(f"{m} {statistics.median(r[m] for r in recs):.4g}" for m in metrics if recs)
    return (f"sharpfast detect: wrote {len(recs)} rows (one per prompt) to {out}; {scored_now} scored now, "
            f"{len(recs) - scored_now} resumed from {log_path}" + (f"; medians: {medians}" if medians else ""))


def print_table(recs: list, metrics: Any, total: int) -> None:
    from ..roc import evaluate

    rows = [r for r in recs if "label" in r]
    print(f"\n{len(rows)} of {total} prompts scored")
    print(f"{'metric':12s} {'AUC':>6s} {'TPR@1%FPR':>10s} {'TPR@3%FPR':>10s}")
    for m in metrics:
        try:
            e = evaluate([r[m] for r in rows], [r["label"] for r in rows])
        except ValueError as err:
            print(f"{m:12s} {err}")
            continue
        print(f"{m:12s} {e['auc']:6.3f} {e['tpr_at_1pct_fpr']:10.3f} {e['tpr_at_3pct_fpr']:10.3f}")
