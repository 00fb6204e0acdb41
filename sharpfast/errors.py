"""The exceptions sharpfast raises on purpose. Every one is a SharpfastError, and also the
built-in type a caller would catch without knowing sharpfast (ValueError, TypeError), so
`except ValueError` keeps working. Library code raises these and never exits; the CLI turns any
SharpfastError into one `sharpfast: ...` line and exit code 2."""
from __future__ import annotations


class SharpfastError(Exception):
    """Base of every error sharpfast raises on purpose."""


class BadArgument(SharpfastError, ValueError, TypeError):
    """An argument has a value or type sharpfast cannot use (the message names it). Both a
    ValueError and a TypeError, as numpy's AxisError is both a ValueError and an IndexError."""


class MissingInput(SharpfastError, FileNotFoundError):
    """An input file or model directory does not exist."""


class UnsupportedPipeline(SharpfastError, TypeError):
    """The pipeline's class or configuration is not one sharpfast supports."""


class NonFiniteOutput(SharpfastError, ValueError):
    """The model returned NaN or inf for a prompt (the message names the prompt)."""


class MissingCalibration(SharpfastError, ValueError):
    """threshold='auto' was asked for and the model has no calibration to take it from."""


class NotCalibrated(MissingCalibration):
    """A request at settings the guard was not allowed to calibrate for (a server calibrates the
    settings it serves at start and refuses others)."""


class OutputMismatch(SharpfastError, ValueError):
    """An output path holds results of other inputs or settings; nothing there was reused."""


class MissingDependency(SharpfastError, ImportError):
    """An optional dependency of the feature asked for is not installed (the message says which extra)."""


class UsageError(SharpfastError, RuntimeError):
    """An object was used in a state that does not allow it (a removed guard, say)."""


class WriteFailed(SharpfastError, OSError):
    """Writing a result failed (a full disk, a read-only folder); what was committed before is kept
    (the message says how to resume). Built as OSError(errno, message)."""
