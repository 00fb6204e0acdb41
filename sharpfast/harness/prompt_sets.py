"""Prompt sets for the harness: the bundled model's records, or files given by the user."""
from __future__ import annotations

import json
import os

from ..errors import BadArgument


def read_prompt_file(path: str) -> list[str]:
    """Prompts of a .txt file (one a line, blank lines skipped) or a .jsonl file (a "prompt" or
    "caption" field per line)."""
    if not os.path.isfile(path):
        raise BadArgument(f"prompt file not found: {path}")
    out = []
    with open(path, encoding="utf-8") as f:
        for k, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    rec = json.loads(line)
                    out.append(rec.get("prompt", rec.get("caption")))
                except ValueError as err:
                    raise BadArgument(f"{path}:{k} is not JSON: {err}") from None
                if not isinstance(out[-1], str):
                    raise BadArgument(f"{path}:{k} has no 'prompt' or 'caption' string")
            else:
                out.append(line)
    if not out:
        raise BadArgument(f"prompt file is empty: {path}")
    return out


def records_from_files(memorized: str, non_memorized: str) -> list[dict]:
    mem = [dict(prompt=p, memorized=True, duplicates=None) for p in read_prompt_file(memorized)]
    non = [dict(prompt=p, memorized=False, duplicates=0) for p in read_prompt_file(non_memorized)]
    return mem + non


def bundled_records(name: str, extra_splits=("duplicated_low", "narrow")) -> dict[str, list[dict]]:
    """{"eval": memorized + non_memorized, and the extra splits} of a bundled model."""
    from .. import zoo

    return {"eval": zoo.prompts(name, "eval"), **{s: zoo.prompts(name, s) for s in extra_splits}}
