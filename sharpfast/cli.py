"""The `sharpfast` command line."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="sharpfast", description="Find and prevent memorization in "
                                     "text-to-image diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("selfcheck", help="check every available backend against the torch reference and time it")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu' or 'cuda'")
    p = sub.add_parser("backends", help="list the backends usable in this process")
    args = parser.parse_args(argv)
    if args.command == "selfcheck":
        from .selfcheck import run

        return run(args.device)
    from .ops import available_backends

    print(" ".join(available_backends()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
