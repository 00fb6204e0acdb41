"""Streaming prompt corpora for `sharpfast scan`: .txt, .jsonl, .parquet, never read whole.

Each source yields rows (row number, id, prompt or None, extra fields). The row number is the
position in the file (0-based line or parquet row) and decides which batch ("chunk") a row falls
in, so chunks are the same for every run, process count and restart. A row without a usable
prompt is yielded with prompt None: the scanner skips and counts it.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from typing import NamedTuple, Optional

from .errors import BadArgument, MissingInput

FORMATS = (".txt", ".jsonl", ".parquet")


class Row(NamedTuple):
    """One row of a prompt file: its index, id, prompt (None if unusable), problem and extra fields."""
    index: int  # type: ignore[assignment]  # the row's line / record number (shadows tuple.index)
    id: object
    prompt: Optional[str]
    extra: dict
    problem: Optional[str] = None


def check_source(path: str) -> str:
    """The prompt file's path, checked to exist and to have a supported extension."""
    if not os.path.isfile(path):
        raise MissingInput(f"prompt file not found: {path}")
    ext = next((e for e in FORMATS if path.endswith(e)), None)
    if ext is None:
        raise BadArgument(f"unsupported prompt file {path!r}: expected one of {', '.join(FORMATS)}")
    if os.path.getsize(path) == 0:
        raise BadArgument(f"prompt file is empty: {path}")
    return ext


def file_digest(path: str) -> str:
    """sha256 of a file's bytes, streamed (a rerun on an edited file is told apart from a resume)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_prompts(path: str) -> list[tuple[int, str]]:
    """(row id, prompt) of every usable row of a .txt / .jsonl / .parquet prompt file, read the
    way `sharpfast scan` reads it: the row id is the line (or parquet row) number, blank lines
    and rows that are not UTF-8 are skipped (their ids are not reused). detect and scan share
    it, so a prompt gets the same id, and so the same noise (seed + id), in both."""
    rows = [(r.index, r.prompt) for r in iter_rows(path) if r.prompt is not None]
    if not rows:
        raise BadArgument(f"no usable prompt in {path} (every line is blank or not UTF-8)")
    return rows


def _clean(p) -> Optional[str]:
    return p if isinstance(p, str) and p.strip() else None


def iter_rows(path: str, column: Optional[str] = None, id_field: Optional[str] = None) -> Iterator[Row]:
    """The rows of a .txt, .jsonl or .parquet prompt file, streamed."""
    ext = check_source(path)
    if ext == ".parquet":
        yield from _parquet(path, column or "prompt", id_field)
        return
    with open(path, "rb") as f:
        for i, raw in enumerate(f):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                yield Row(i, i, None, {}, "not UTF-8")
                continue
            if ext == ".txt":
                p = _clean(line)
                yield Row(i, i, p, {}, None if p else "blank line")
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if not isinstance(rec, dict):
                yield Row(i, i, None, {}, "not a JSON object")
                continue
            key = column or ("prompt" if "prompt" in rec else "caption")
            p = _clean(rec.pop(key, None))
            rid = rec.pop(id_field, i) if id_field else i
            yield Row(i, rid, p, rec, None if p else f"no {key!r} string")


def _parquet(path: str, column: str, id_field: Optional[str]) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading .parquet needs pyarrow: pip install pyarrow") from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if column not in names:
        raise BadArgument(f"{path} has no column {column!r}; columns: {', '.join(names)}")
    if id_field and id_field not in names:
        raise BadArgument(f"{path} has no id column {id_field!r}; columns: {', '.join(names)}")
    i = 0
    for batch in pf.iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            p = _clean(rec.pop(column, None))
            rid = rec.pop(id_field, i) if id_field else i
            yield Row(i, rid, p, rec, None if p else f"no {column!r} string")
            i += 1


def iter_chunks(rows: Iterator[Row], chunk_size: int):
    """(chunk number, rows) of consecutive row numbers: chunk c holds rows c*size .. (c+1)*size-1."""
    chunk = 0
    buf: list = []
    for r in rows:
        c = r.index // chunk_size
        if c != chunk and buf:
            yield chunk, buf
            buf = []
        chunk = c
        buf.append(r)
    if buf:
        yield chunk, buf
