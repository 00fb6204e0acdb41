"""sharpfast.scan (this module: scanning): audit a prompt corpus for memorized prompts, resumably,
on one or many processes.

The corpus is streamed in chunks of `batch_size` consecutive rows (chunk c = rows c*B .. c*B+B-1,
the same in every run). Under `accelerate launch` (or torchrun) rank r takes the chunks with
c % world_size == r and appends them to its own shard `OUT/shards/rank-RRRRR.jsonl`: the records
of a chunk, then a commit line. A chunk counts as done only once its commit line is on disk, so a
run killed at any moment (kill -9 included) loses at most the chunk in flight: the rerun cuts the
shard back to its last commit and goes on. Prompt i draws its noise from seed + i, so scores do
not depend on the number of processes. At the end rank 0 merges the shards into
`OUT/results.jsonl` (row order), `OUT/summary.json`, `OUT/histogram.png`.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import time
from typing import Any, Optional

import numpy as np
import torch

from . import engine, settings, validate
from .adapters import ScoreModel, adapt, denoiser
from .errors import BadArgument, OutputMismatch
from .prompt_sources import check_source, file_digest, iter_chunks, iter_rows

META = "scan.json"


# ---- processes --------------------------------------------------------------------------

class _Procs:
    """rank / world size / barrier: accelerate's PartialState when launched with several
    processes, a single process otherwise."""

    def __init__(self) -> None:
        self.rank, self.world, self.device, self._state = 0, 1, None, None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            cpu = not torch.cuda.is_available()
            self._state = PartialState(cpu=cpu)
            self.rank, self.world = self._state.process_index, self._state.num_processes
            self.device = self._state.device
            if cpu:  # share the cores instead of oversubscribing them
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // self._state.num_processes))

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()


# ---- shards -----------------------------------------------------------------------------

def _read_shards(out_dir: str) -> tuple:
    recs, chunks = [], set()
    for p in sorted(glob.glob(os.path.join(out_dir, "shards", "rank-*.jsonl"))):
        r, c, _ = engine.read_log(p)
        recs += r
        chunks |= c
    return recs, chunks


def _shard(out_dir: str, rank: int) -> engine.CommitLog:
    """This rank's append-only shard (a commit log of chunks; see sharpfast.engine)."""
    return engine.CommitLog(os.path.join(out_dir, "shards", f"rank-{rank:05d}.jsonl"))


# ---- metadata ---------------------------------------------------------------------------

def _check_meta(out_dir: str, meta: dict, overwrite: bool, procs: _Procs) -> None:
    path = os.path.join(out_dir, META)
    if procs.rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
            keys = [k for k in meta if k not in ("threshold", "calibration") and old.get(k) != meta[k]]
            if keys and not overwrite:
                diff = ", ".join(f"{k}: {old.get(k)!r} -> {meta[k]!r}" for k in keys)
                raise OutputMismatch(f"{out_dir} holds a scan with other inputs or settings ({diff}); use another "
                                     f"output folder, or overwrite=True (--overwrite) to discard it")
            if keys:
                shutil.rmtree(os.path.join(out_dir, "shards"), ignore_errors=True)
                for name in ("results.jsonl", "summary.json", "histogram.png"):
                    if os.path.exists(os.path.join(out_dir, name)):
                        os.remove(os.path.join(out_dir, name))
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        os.replace(path + ".tmp", path)
    procs.barrier()


def _count_rows(path: str) -> Optional[int]:
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n += block.count(b"\n")
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - 1))
        last = f.read(1)
    return n + (last not in (b"\n", b""))


# ---- the scan ---------------------------------------------------------------------------

def _threshold(model: Any, meta: dict, calibrate_on: Any, fpr: float, procs: Any, out_dir: str, score_kw: dict,
               progress: bool) -> Any:
    """Rank 0 calibrates (on known-normal prompts, or threshold="auto": the model's calibration)
    and writes the threshold and its source to scan.json; the other ranks read it."""
    if calibrate_on is None and meta["threshold"] != "auto":
        return meta.get("threshold")
    path = os.path.join(out_dir, META)
    if procs.rank == 0:
        import sharpfast

        if calibrate_on is None:  # "auto": beside the model, the per-user cache, or calibrated now
            from .calibration import resolve

            found = resolve(model.pipe, meta["flag_metric"], "threshold", num_images_per_prompt=meta["n"],
                            num_inference_steps=meta["num_inference_steps"],
                            guidance_scale=meta["guidance_scale"], fpr=fpr, progress=progress)
            thr, source = found.value, found.source
            meta.update(threshold=thr, threshold_source=source)
        else:
            prompts = [r.prompt for r in iter_rows(calibrate_on) if r.prompt is not None]
            if not prompts:
                raise BadArgument(f"no prompts in the calibrate_on file {calibrate_on}")
            scores = _score(model, prompts, list(range(len(prompts))), **score_kw)[meta["flag_metric"]]
            thr = sharpfast.calibrate(scores, fpr=fpr)
            meta.update(threshold=thr, threshold_source=f"calibrate_on {os.path.abspath(calibrate_on)}",
                        calibration={"file": os.path.abspath(calibrate_on), "fpr": fpr, "prompts": len(prompts)})
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
        os.replace(path + ".tmp", path)
    procs.barrier()
    with open(path, encoding="utf-8") as f:
        return json.load(f)["threshold"]


def _score(model: Any, prompts: list, rows: Any, *, metrics: Any, n: int, seed: int, batch_size: int,
           num_inference_steps: int, guidance_scale: float) -> dict:
    out: dict = {m: [] for m in metrics}
    for s in range(0, len(prompts), batch_size):
        res = engine.score_batch(model, prompts[s:s + batch_size], rows[s:s + batch_size], n=n, seed=seed,
                                 metrics=metrics, num_inference_steps=num_inference_steps,
                                 guidance_scale=guidance_scale, batch_size=batch_size)
        for m in metrics:
            out[m] += res.scores[m].tolist()
    return out


def _check_flagging(metrics: Any, flag_metric: Optional[str], threshold: Any, calibrate_on: Any) -> tuple:
    """(metrics, flag metric, threshold) checked: the flag metric among the metrics, one threshold source."""
    from .scores import REGISTRY

    metrics = list(validate.metrics(metrics, REGISTRY))
    flag_metric = flag_metric or (settings.GUARD_METRIC if settings.GUARD_METRIC in metrics else metrics[-1])
    if flag_metric not in metrics:
        raise BadArgument(f"flag_metric {flag_metric!r} is not among the metrics {metrics}")
    if calibrate_on is not None:
        if threshold not in ("auto", None):
            raise BadArgument("give threshold or calibrate_on, not both")
        threshold = "auto"  # replaced by the calibration below
    elif threshold is not None and threshold != "auto":
        threshold = validate.finite(threshold, "threshold")
    return metrics, flag_metric, threshold


def scan(pipe: Any, prompts: str, out_dir: str, *, metrics: Any = settings.DEFAULT_METRICS,
         num_images_per_prompt: int = 1, batch_size: int = settings.BATCH_SIZE, threshold: str = "auto",
         calibrate_on: Optional[str] = None,
         fpr: float = settings.FPR, flag_metric: Optional[str] = None, column: Optional[str] = None,
         id_field: Optional[str] = None, seed: int = settings.SEED, num_inference_steps: Optional[int] = None,
         guidance_scale: Optional[float] = None, model_name: Optional[str] = None, overwrite: bool = False,
         progress: bool = True, top: int = 10, n: Optional[int] = None) -> dict:
    """Scan the prompt file `prompts` (.txt, .jsonl, .parquet) and write OUT as described above.

    Returns the summary (on every rank; rank 0 wrote it). A prompt is flagged when its score of
    flag_metric (default: the guard's detector, settings.GUARD_METRIC, when among the metrics, else the
    last of them) is above the threshold: threshold="auto" (default)
    takes the model's calibration at the scan's settings (sharpfast.calibration: beside the model,
    the per-user cache, or calibrated once on the built-in generic captions), a number is used as
    given, None flags nothing; calibrate_on=FILE calibrates on those known-normal prompts at fpr.
    The summary's threshold_source says which. `n` is the old name of num_images_per_prompt.
    """
    if n is not None:
        import warnings

        warnings.warn("scan(n=...) is now num_images_per_prompt=...", FutureWarning, stacklevel=2)
        num_images_per_prompt = n
    n = num_images_per_prompt
    check_source(prompts)
    metrics, flag_metric, threshold = _check_flagging(metrics, flag_metric, threshold, calibrate_on)
    st = adapt(pipe).resolve(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                          num_images_per_prompt=n)  # a setting not given is the pipeline's own
    num_inference_steps, guidance_scale = st.num_inference_steps, st.guidance_scale
    validate.integer(batch_size, "batch_size")
    validate.finite(fpr, "fpr", above=0)
    procs = _Procs()
    if procs.device is not None and procs.device.type == "cuda":
        pipe = pipe.to(procs.device)
    model_name = model_name or str(getattr(pipe, "name_or_path", "") or type(pipe).__name__)
    # the prompt file's contents, not only its path: an edited file at the same path is another scan
    meta = {"model": model_name, "prompts": os.path.abspath(prompts), "prompts_sha256": file_digest(prompts),
            "metrics": metrics, "n": n,
            "batch_size": batch_size, "seed": seed, "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale, "column": column, "id_field": id_field, "flag_metric": flag_metric,
            "unet_dtype": str(denoiser(pipe).dtype), "threshold": threshold}
    _check_meta(out_dir, meta, overwrite, procs)
    score_kw = dict(metrics=metrics, n=n, seed=seed, batch_size=batch_size, num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale)
    model = ScoreModel(pipe)  # one adapter for the whole scan: the null embeddings are encoded once
    threshold = _threshold(model, meta, calibrate_on, fpr, procs, out_dir, score_kw, progress)
    source = meta.get("threshold_source") or ("given" if threshold is not None else None)
    _scan_chunks(model, prompts, out_dir, procs, column, id_field, batch_size, threshold, flag_metric, score_kw,
                 progress)
    procs.barrier()
    summary = None
    if procs.rank == 0:
        summary = _merge(out_dir, metrics, flag_metric, threshold, top, source)
    procs.barrier()
    if summary is None:
        with open(os.path.join(out_dir, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
    return summary


def _chunk_records(model: Any, rows: Any, threshold: Any, flag_metric: Optional[str], score_kw: dict) -> list:
    """The records of one chunk: scores and flag per usable row, the reason per skipped one."""
    good = [r for r in rows if r.prompt is not None]
    scores = _score(model, [r.prompt for r in good], [r.index for r in good], **score_kw) if good else {}
    recs, k = [], 0
    for r in rows:
        base = {"row": r.index, "id": r.id}
        if r.prompt is None:
            recs.append({**base, "skipped": r.problem})
            continue
        vals = {m: scores[m][k] for m in score_kw["metrics"]}
        k += 1
        flag = None if threshold is None else bool(vals[flag_metric] > threshold)
        recs.append({**base, "prompt": r.prompt, **r.extra, **vals, "flagged": flag})
    return recs


def _scan_chunks(model: Any, prompts: str, out_dir: str, procs: Any, column: Optional[str], id_field: Optional[str],
                 batch_size: int, threshold: Any, flag_metric: Optional[str], score_kw: dict, progress: bool) -> None:
    """This rank's chunks that no run has committed yet, each committed to its shard."""
    from .progress import bar as progress_bar

    _, done = _read_shards(out_dir)
    shard = _shard(out_dir, procs.rank)
    bar = progress_bar(model.pipe, total=_count_rows(prompts), desc=f"scan rank {procs.rank}/{procs.world}",
                       enabled=progress and procs.rank == 0)
    try:
        for c, rows in iter_chunks(iter_rows(prompts, column, id_field), batch_size):
            if c % procs.world == procs.rank and c not in done:  # else done before, or a peer's chunk
                shard.commit(c, _chunk_records(model, rows, threshold, flag_metric, score_kw))
            bar.update(len(rows))
    finally:
        shard.close()
        bar.close()


def _merge(out_dir: str, metrics: Any, flag_metric: Optional[str], threshold: Any, top,
           source: Optional[str] = None) -> dict:
    recs, _ = _read_shards(out_dir)
    recs = sorted({r["row"]: r for r in recs}.values(), key=lambda r: r["row"])
    for r in recs:  # the flags of this run's threshold: a resumed scan's shards may hold another's
        if "skipped" not in r:
            r["flagged"] = None if threshold is None else bool(r[flag_metric] > threshold)
    _write_atomic(os.path.join(out_dir, "results.jsonl"), "".join(json.dumps(r) + "\n" for r in recs))
    scored = [r for r in recs if "skipped" not in r]
    skipped: dict = {}
    for r in recs:
        if "skipped" in r:
            skipped[r["skipped"]] = skipped.get(r["skipped"], 0) + 1
    flagged = sorted((r for r in scored if r.get("flagged")), key=lambda r: -r[flag_metric])
    summary = {"rows": len(recs), "scored": len(scored), "skipped": sum(skipped.values()), "skipped_by_reason": skipped,
               "flagged": len(flagged), "flag_metric": flag_metric, "threshold": threshold,
               "threshold_source": source,
               "top_flagged": [{"row": r["row"], "id": r["id"], "prompt": r["prompt"], flag_metric: r[flag_metric]}
                               for r in flagged[:top]],
               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_atomic(os.path.join(out_dir, "summary.json"), json.dumps(summary, indent=1))
    if scored:
        _histogram(scored, metrics, threshold, flag_metric, os.path.join(out_dir, "histogram.png"))
    return summary


def _write_atomic(path: str, text: str) -> None:
    """engine.write_atomic, saying the shards are intact."""
    engine.write_atomic(path, text, kept="every scored chunk is kept in the shards: free space and rerun to merge "
                                         "them")


def _histogram(recs: list, metrics: Any, threshold: Any, flag_metric: Optional[str], path: str) -> None:
    """One panel per metric: the scanned prompts' scores, the flag threshold and how many lie above
    it. Counts on a linear axis; a log axis (from 1, never below a prompt) only when the tallest bar
    is over 50 times the median bar, so that a long tail of a few prompts stays visible."""
    from .harness.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.8), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        vals = np.asarray([r[m] for r in recs], dtype=np.float64)
        counts, _, _ = ax.hist(vals, bins=50, color="tab:blue")
        nonzero = counts[counts > 0]
        if len(nonzero) and counts.max() > 50 * np.median(nonzero):
            ax.set_yscale("log")
            ax.set_ylim(bottom=0.8)
        if threshold is not None and m == flag_metric:
            above = int((vals > threshold).sum())
            ax.axvline(threshold, color="tab:red", ls="--", label=f"threshold {threshold:.4g}: {above} above")
            ax.legend(fontsize=8)
        ax.set_title(f"{m}: {len(vals)} prompts", fontsize=9)
        ax.set_xlabel(f"{m} score (higher = more likely memorized)", fontsize=8)
        ax.set_ylabel("prompts", fontsize=8)
        if ax.get_yscale() == "linear":
            from matplotlib.ticker import MaxNLocator

            ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: whole prompts
    fig.suptitle("sharpfast scan: score distribution" + (f" (flag: {flag_metric})" if threshold is not None else ""),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
