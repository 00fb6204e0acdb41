"""sharpfast's progress bars: tqdm, following the pipeline's own settings.

`pipe.set_progress_bar_config(disable=True)` (or any tqdm option: `leave`, `file`, `ncols`, ...)
silences or shapes every bar sharpfast draws for that pipeline, as it does the pipeline's own; a
bar also stays off where `progress=False` is passed. Outside a terminal (a log file, CI) a bar
prints a plain line at most every 30 s instead of rewriting itself with escape codes.
"""
from __future__ import annotations

import sys
from typing import Any, Optional


def config(pipe: Any) -> dict:
    """The tqdm options of `pipe.set_progress_bar_config(...)` (those a bar of ours can take)."""
    cfg = dict(getattr(pipe, "_progress_bar_config", None) or {})
    return {k: v for k, v in cfg.items() if k not in ("desc", "total", "unit", "initial")}


def bar(pipe: Any, *, total: Optional[int], desc: str, unit: str = "prompt", enabled: bool = True,
        initial: int = 0) -> Any:
    """A tqdm bar for work on `pipe` (None for no pipeline): off unless `enabled` and the
    pipeline's bar config allows it."""
    from tqdm.auto import tqdm

    cfg = config(pipe) if pipe is not None else {}
    off = bool(cfg.pop("disable", False))
    disable = off or not enabled
    stream = cfg.get("file", sys.stderr)
    if not getattr(stream, "isatty", lambda: False)():
        cfg.setdefault("mininterval", 30.0)  # a log, not a terminal: a line now and then
        cfg.setdefault("ascii", True)
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, initial=initial, **cfg)
