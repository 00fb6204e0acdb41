"""The one resumable scoring engine of `sharpfast detect --out`, `sharpfast eval detect` and `scan`.

A result file is a commit log of JSON lines: the records of a batch, then a commit line
`{"_commit": k}`. A batch counts only once its commit line is on disk, so a run killed at any
moment (kill -9 included) loses at most the batch in flight: reopening the file cuts it back to
its last commit. Every record carries the fingerprint of the settings that made it, and a prompt
draws its noise from a generator seeded with seed + its id (`ScoreModel.noise_for_ids`), so its
scores depend on neither its batch, the process count nor a restart; a rerun scores only what is
not committed under the same prompt, id and settings.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from typing import Any, Literal, Optional

from .errors import WriteFailed

COMMIT = "_commit"


def fingerprint(obj) -> str:
    """A short hash of JSON-able settings: records carry it, and a rerun reuses only matching ones."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def read_log(path: str) -> tuple:
    """(records of committed batches, committed batch ids, byte length up to the last commit) of a
    commit log; a missing file is empty."""
    recs: list = []
    chunks: set = set()
    good = 0
    pending: list = []
    if not os.path.exists(path):
        return recs, chunks, good
    with open(path, "rb") as f:
        pos = 0
        for raw in f:
            pos += len(raw)
            if not raw.endswith(b"\n"):
                break
            try:
                rec = json.loads(raw)
            except ValueError:
                break
            if isinstance(rec, dict) and COMMIT in rec:
                chunks.add(rec[COMMIT])
                recs += pending
                pending, good = [], pos
            else:
                pending.append(rec)
    return recs, chunks, good


def write_atomic(path: str, text: str, kept: str = "") -> None:
    """path holds the old contents or the new, never a part (a temporary file beside it, then a
    rename); a failure leaves no temporary file and raises WriteFailed naming what is `kept`."""
    from .errors import WriteFailed

    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise WriteFailed(err.errno, f"writing {path} failed ({err.strerror})" + (f"; {kept}" if kept else "")) \
            from err


def read(path: str, key: str = "id") -> dict:
    """{record[key]: record} of the committed records of a commit log (later ones win)."""
    return {r[key]: r for r in read_log(path)[0] if isinstance(r, dict) and key in r}


class CommitLog:
    """An append-only commit log; every write is all of a batch or nothing.

    Written through a raw file descriptor (no Python buffer): a failed write leaves nothing
    buffered for a later flush or close() to fail on again, and the file is cut back to its last
    complete batch with ftruncate before the error is raised.

    Args:
        path: the log's file (created with its folder if missing; a torn tail is cut off).
    """

    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        _, self.chunks, self.good = read_log(path)
        self.fd: Optional[int] = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.ftruncate(self.fd, self.good)  # drop the batch a killed run was writing

    def next_chunk(self) -> int:
        """A batch id not used in this log yet."""
        return max(self.chunks, default=-1) + 1

    def commit(self, chunk: int, records: list) -> None:
        """Append the records of batch `chunk` and its commit line, and force them to disk.

        Raises:
            OSError: the write failed (the log is kept up to its last complete batch).
        """
        assert self.fd is not None, "commit on a closed log"
        data = ("".join(json.dumps(r) + "\n" for r in records) + json.dumps({COMMIT: chunk}) + "\n").encode("utf-8")
        try:
            view, pos = memoryview(data), self.good
            while view:  # os.pwrite may write less than asked
                n = os.pwrite(self.fd, view, pos)
                view, pos = view[n:], pos + n
            os.fsync(self.fd)
        except OSError as err:
            try:
                os.ftruncate(self.fd, self.good)
            except OSError:
                pass  # the rerun cuts the torn batch off all the same (read_log)
            raise WriteFailed(err.errno, f"writing batch {chunk} to {self.path} failed ({err.strerror}); the file is "
                                     f"kept up to its last complete batch: free space and rerun to resume") from err
        self.good += len(data)
        self.chunks.add(chunk)

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> CommitLog:
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        self.close()
        return False


def score_batch(model: Any, prompts: list, noise_ids: list, *, n: int, seed: int, **detect_kwargs: Any) -> Any:
    """sharpfast.detect of prompts whose noise comes from seed + noise id (n images each).

    Args:
        model: the pipeline's ScoreModel (one per job: it keeps the null prompt's embeddings).
        prompts: the batch's prompts.
        noise_ids: one id per prompt.
        n: images per prompt.
        seed: the job's seed.
        **detect_kwargs: the rest of sharpfast.detect's keywords (metrics, steps, ...).

    Returns:
        The batch's DetectionResult.
    """
    from .detection import detect

    h, w = model.default_size()
    lat = model.noise_for_ids(noise_ids, n, h, w, seed)
    return detect(model, prompts, num_images_per_prompt=n, latents=lat.to(model.device), progress=False,
                  **detect_kwargs)


def run(model: Any, log: CommitLog, todo: Iterable, *, prompt_of: Callable, noise_id_of: Callable, n: int, seed: int,
        batch_size: int, record: Callable, bar=None, **detect_kwargs: Any) -> list:
    """Score the ids in `todo` a batch at a time, committing each batch to `log`.

    Args:
        model: the pipeline's ScoreModel.
        log: the job's CommitLog.
        todo: the ids to score, in order.
        prompt_of: id -> its prompt.
        noise_id_of: id -> its noise id.
        n: images per prompt.
        seed: the job's seed.
        batch_size: prompts per batch (and per commit).
        record: (id, the batch's DetectionResult, its row k in it) -> the record to write.
        bar: a tqdm bar to advance, or None.
        **detect_kwargs: sharpfast.detect's other keywords.

    Returns:
        The records written.
    """
    todo = list(todo)
    written: list = []
    for start in range(0, len(todo), batch_size):
        ids = todo[start:start + batch_size]
        res = score_batch(model, [prompt_of(i) for i in ids], [noise_id_of(i) for i in ids], n=n, seed=seed,
                          batch_size=batch_size, **detect_kwargs)
        recs = [record(i, res, k) for k, i in enumerate(ids)]
        log.commit(log.next_chunk(), recs)
        written += recs
        if bar is not None:
            bar.update(len(ids))
    return written
