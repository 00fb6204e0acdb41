"""`sharpfast selfcheck` and `sharpfast backends`: the kernel backends of this process."""
from __future__ import annotations


class SelfcheckCommand:
    name = "selfcheck"

    @staticmethod
    def register(sub) -> None:
        p = sub.add_parser("selfcheck", help="check every available backend against the torch reference and time it")
        p.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu' or 'cuda'")

    @staticmethod
    def run(args) -> int:
        from ..selfcheck import run

        return run(args.device)


class BackendsCommand:
    name = "backends"

    @staticmethod
    def register(sub) -> None:
        sub.add_parser("backends", help="list the backends usable in this process")

    @staticmethod
    def run(args) -> int:
        from ..ops import available_backends

        print(" ".join(available_backends()))
        return 0
