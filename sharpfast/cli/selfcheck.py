"""`sharpfast selfcheck` and `sharpfast backends`: the kernel backends of this process."""
from __future__ import annotations

from typing import Any

from . import options


class SelfcheckCommand:
    name = "selfcheck"

    @staticmethod
    def register(sub: Any) -> None:
        p = sub.add_parser("selfcheck", help="check every available backend against the torch reference and time it",
                           description="Run every kernel backend usable here (torch, C++, Triton, CUDA) on random "
                                       "inputs against the float64 torch reference and time each: a quick check "
                                       "that a build works on this machine.")
        options.add(p, "selfcheck", "--device")

    @staticmethod
    def run(args: Any) -> int:
        from ..selfcheck import run

        return run(args.device)


class BackendsCommand:
    name = "backends"

    @staticmethod
    def register(sub: Any) -> None:
        sub.add_parser("backends", help="list the backends usable in this process",
                       description="Print the kernel backends usable in this process, best first (the one "
                                   "sharpfast.ops picks by default comes first).")

    @staticmethod
    def run(args: Any) -> int:
        from ..ops import available_backends

        print(" ".join(available_backends()))
        return 0
