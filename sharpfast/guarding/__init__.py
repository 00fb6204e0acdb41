"""The serving guard (`sharpfast.guard`): configuration (config.py), thresholds per request
setting (thresholds.py), the policy (policy.py: which prompts are mitigated, how strongly), the
per-request state and decision (request.py), the regeneration of flagged rows (regenerate.py)
and the wrapped pipeline (wrapper.py)."""
from __future__ import annotations

from .config import AUTO_MITIGATION, DEFAULT_METRIC, DEFAULT_MITIGATION, GUARD_METRICS, GuardConfig
from .policy import Policy
from .regenerate import generator_states, restore_generators
from .wrapper import Guard, guard, pipeline_lock

__all__ = ["AUTO_MITIGATION", "DEFAULT_METRIC", "DEFAULT_MITIGATION", "GUARD_METRICS", "GuardConfig", "Guard", "guard",
           "pipeline_lock", "generator_states", "restore_generators", "Policy"]
