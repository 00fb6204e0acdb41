"""`none`: the plain pipeline call (the baseline every table starts from)."""
from __future__ import annotations

from typing import Any

from .base import Context, Plan, register


@register("none", cost="0", knob="-", default=None, sweep=(None,), kind="none")
def _none(ctx: Context, setting: Any) -> Plan:
    return Plan()
