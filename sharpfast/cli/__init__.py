"""The `sharpfast` command line: one class per command (register its parser, run it), as
diffusers' commands/ do. Imports run one way: the commands import the library, never the reverse.

Every sharpfast error (a bad argument, a missing file, an output of other inputs, NaN from the
model) and every OSError (a full disk, a read-only folder: result files keep every complete
record, a rerun resumes) becomes one `sharpfast: ...` line on stderr and exit code 2; anything
else is a bug and keeps its traceback."""
from __future__ import annotations

import argparse
import sys

from ..errors import SharpfastError
from .calibrate import CalibrateCommand
from .demo import DemoCommand
from .detect import DetectCommand
from .eval import EvalCommand
from .sail import SailCommand
from .scan import ScanCommand
from .selfcheck import BackendsCommand, SelfcheckCommand
from .serve import ServeCommand

COMMANDS = (DetectCommand, ScanCommand, SailCommand, CalibrateCommand, EvalCommand, DemoCommand, ServeCommand,
            SelfcheckCommand, BackendsCommand)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sharpfast", description="Find and prevent memorization in text-to-image "
                                                              "diffusion models.")
    sub = p.add_subparsers(dest="command", required=True)
    for cmd in COMMANDS:
        cmd.register(sub)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    command = next(c for c in COMMANDS if c.name == args.command)
    try:
        return command.run(args)
    except SharpfastError as err:
        print(f"sharpfast: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine's, not the code's: a full disk, a read-only folder, ...
        print(f"sharpfast: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
