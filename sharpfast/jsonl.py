"""Append-only JSON-lines result files that survive being killed: every long job resumes from them."""
from __future__ import annotations

import json
import os


def repair(path: str) -> None:
    """Cut a torn last line (a run killed mid-write) so that appending starts on a fresh line."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def read(path: str, key: str = "id") -> dict:
    """{record[key]: record} of the complete lines of a results file (later lines win)."""
    repair(path)
    out = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    out[rec[key]] = rec
                except (ValueError, KeyError, TypeError):
                    continue
    return out


def append(f, records: list) -> None:
    """Write records to an open file and force them to disk."""
    for rec in records:
        f.write(json.dumps(rec) + "\n")
    f.flush()
    os.fsync(f.fileno())
