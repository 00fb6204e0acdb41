"""The one grammar of the methods' short setting strings, parsed at the edge (the CLI, the
harness's sweeps, a string given to `mitigate`): a run of <key><number> pairs in a declared
order, plus declared bare words, e.g. "k1s3lr0.7" (SAIL), "s0t500" / "s-1dyn" (transition),
"r2a0.3t0.1" (zhao_guard)."""
from __future__ import annotations

import re
from collections.abc import Callable

from ..errors import BadArgument

_TOKEN = re.compile(r"([a-z]+)(-?\d*\.?\d+(?:e-?\d+)?)?")


def parse(text: object, fields: dict[str, Callable[[str], float]], *, words: tuple = (), required: tuple = (),
          one_of: tuple = (), name: str = "", example: str = "") -> dict:
    """A setting string as {key: value} (a bare word: {word: True}).

    Args:
        text: the setting, e.g. "k1s3lr0.7".
        fields: the keys in the order they must come, each with its converter (int or float).
        words: bare words the setting may hold (each at most once, after the keys before it).
        required: keys that must all be there.
        one_of: keys or words of which at least one must be there.
        name: the method's name, for the error message.
        example: what a valid setting looks like, for the error message.

    Returns:
        The keys and words found.

    Raises:
        BadArgument: anything else, naming the example.
    """
    s = str(text)
    order = [*fields, *words]
    out: dict = {}
    pos, last = 0, -1
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        key = m.group(1) if m else None
        if m is None or key not in order or order.index(key) <= last or (key in fields) != (m.group(2) is not None):
            article = "an" if name[:1] in "aeiou" else "a"
            raise BadArgument(f"{article} {name} setting looks like {example}, got {text!r}")
        last = order.index(key)
        if key in fields:
            try:
                out[key] = fields[key](m.group(2))
            except ValueError:
                raise BadArgument(f"a {name} setting looks like {example}; {key} of {text!r} is not a "
                                  f"valid number") from None
        else:
            out[key] = True
        pos = m.end()
    if any(k not in out for k in required) or (one_of and not any(k in out for k in one_of)):
        raise BadArgument(f"a{'n' if name[:1] in 'aeiou' else ''} {name} setting looks like {example}, got {text!r}")
    return out


def number(setting: object, name: str, kind: Callable[[str], float] = float) -> float:
    """A one-number setting: a number, or its text (e.g. "4" from the command line) as `kind`.

    Raises:
        BadArgument: text that is not such a number.
    """
    if isinstance(setting, str):
        try:
            return kind(setting)
        except ValueError:
            raise BadArgument(f"{name} must be a number, got {setting!r}") from None
    return setting  # type: ignore[return-value]
