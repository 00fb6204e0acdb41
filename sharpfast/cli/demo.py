"""`sharpfast demo`: detection and mitigation on the bundled digits model, end to end."""
from __future__ import annotations

import sys
from typing import Any

from . import options
from .common import device_dtype


class DemoCommand:
    name = "demo"

    @staticmethod
    def register(sub: Any) -> None:
        demo = sub.add_parser(
            "demo",
            help="detection and mitigation on the bundled digits model (about half a minute on a 2-core CPU)",
            description="Load the bundled digits pipeline, score its prompt sets, print the AUC / "
            "TPR table, mitigate a few memorized prompts and write OUT/roc.png, "
            "OUT/before_after.png and OUT/results.jsonl.",
        )
        options.add(demo, "demo", "--out", "--device", "--quiet")

    @staticmethod
    def run(args: Any) -> int:
        from ..demo import run

        device, _ = device_dtype(args.device, "auto")
        return run(args.out, device=device, progress=not args.quiet, stream=sys.stdout)
