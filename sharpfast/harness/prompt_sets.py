"""Prompt sets for the harness: the bundled model's records, or files given by the user."""
from __future__ import annotations

from ..errors import BadArgument


def read_prompt_file(path: str) -> list[tuple[int, str]]:
    """(row, prompt) of a .txt, .jsonl ("prompt" or "caption" field) or .parquet prompt file, read
    by the reader `sharpfast detect` and `sharpfast scan` use (row = line number, blank lines
    skipped), so a prompt gets the same id, and the same noise, in all three. Stricter than scan:
    a row that is not blank and holds no prompt (bad JSON, not UTF-8) is an error here."""
    from ..prompt_sources import iter_rows

    rows = []
    for r in iter_rows(path):
        if r.prompt is not None:
            rows.append((r.index, r.prompt))
        elif r.problem != "blank line":
            raise BadArgument(f"{path}: row {r.index + 1}: {r.problem}")
    if not rows:
        raise BadArgument(f"prompt file is empty: {path}")
    return rows


def records_from_files(memorized: str, non_memorized: str) -> list[dict]:
    """Records of the two files; "row" (the line number) decides each prompt's noise, seed + row."""
    mem = [dict(prompt=p, memorized=True, duplicates=None, row=k) for k, p in read_prompt_file(memorized)]
    non = [dict(prompt=p, memorized=False, duplicates=0, row=k) for k, p in read_prompt_file(non_memorized)]
    return mem + non


def bundled_records(name: str, extra_splits=("duplicated_low", "narrow")) -> dict[str, list[dict]]:
    """{"eval": memorized + non_memorized, the extra splits, and "calibration": the normal
    captions the shipped calibration was made from (kept apart from every evaluation set)} of a
    bundled model."""
    from .. import zoo
    from ..zoo.digits_data import calibration_prompts

    splits = zoo.load_prompt_file(zoo.path(name))["splits"]
    # scenes stores its calibration captions; digits regenerates them from the data seed
    cal = zoo.prompts(name, "calibration") if "calibration" in splits else calibration_prompts()
    extra = tuple(extra_splits) + (("template",) if "template" in splits else ())
    return {"eval": zoo.prompts(name, "eval"), **{s: zoo.prompts(name, s) for s in extra}, "calibration": cal}
