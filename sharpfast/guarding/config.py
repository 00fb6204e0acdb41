"""The guard's configuration: its metric, threshold, mitigation and setting, checked once; the
defaults (chosen on the digits model: docs/guard.md)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .. import catalog, mitigations, settings, validate
from ..errors import BadArgument
from ..scores import REGISTRY
from ..settings import FPR, GUARD_POLICY
from .policy import ALWAYS, DEFAULT_POLICY, Policy, auto_policy

GUARD_METRICS = tuple(REGISTRY)  # costs: REGISTRY[name].cost (wen and score_norm: no extra UNet call)
# chosen on the tuning half of the digits model's memorized prompts (docs/mitigation.md; the
# held-out half reports it)
DEFAULT_METRIC = mitigations.GUARD_METRIC
DEFAULT_MITIGATION = "auto"
AUTO_MITIGATION = settings.GUARD_MITIGATIONS  # mitigation="auto": the first the family has (why: settings)


@dataclass(frozen=True)
class GuardConfig:
    """What a guard does, checked once: the metric, the threshold ("auto" or a number), the
    mitigation (its registry entry and setting) and SAIL's extra keywords."""

    metric: str
    threshold: object
    mitigation: Optional[str]
    method: Optional[mitigations.Mitigation]
    setting: object
    sail_kwargs: dict
    name: str
    calibrate_new: bool = True  # False: a request at a setting not calibrated before is refused (NotCalibrated)
    policy: Policy = DEFAULT_POLICY
    policy_source: str = "given"

    @property
    def upfront(self) -> bool:
        """Whether the mitigation is planned before the generation: every prompt is mitigated by a
        trajectory method, with one setting, or with tiers the method can switch to after the first
        step (its same_step: the tiers' rows change setting from step 2, no step restarted)."""
        return (self.method is not None and self.policy.always and self.method.kind == "trajectory"
                and (not self.policy.tiers or self.method.same_step is not None))

    @classmethod
    def build(cls, model: Any, metric: str, threshold: Any, mitigation: Any, setting: Any, sail_kwargs, name: str,
              calibrate_new: bool = True, policy: Any = None) -> GuardConfig:
        """The checked configuration (BadArgument / UnsupportedPipeline naming what is wrong)."""
        policy, policy_source = _policy_of(model, threshold, policy)
        asked_setting = setting
        if metric not in REGISTRY:
            raise BadArgument(f"metric must be one of {catalog.METRIC_HELP}, got {metric!r}")
        if mitigation == "auto" and policy.method is not None:  # the method the calibrated policy was chosen for
            mitigation = policy.method
        elif mitigation == "auto":
            mitigation, auto_setting = next((m, st) for m, st in AUTO_MITIGATION
                                            if mitigations.get(m).supports(model))
            setting = auto_setting if setting is None else setting
        method = None if mitigation is None else mitigations.get(mitigation)
        if method is not None:
            mitigations.check_family(method, model)
            if method.kind == "prompt":
                raise BadArgument(f"the guard mitigates single images; {mitigation!r} changes whole prompts")
            setting = method.default if setting is None else setting
        sail_kwargs = dict(sail_kwargs or {})
        if "threshold" in sail_kwargs or "stop" in sail_kwargs:
            raise BadArgument("SAIL inside the guard stops on the guard's own metric and threshold: drop sail_kwargs' "
                              "threshold (mitigation='sail_guard', setting=margin stops under margin x threshold)")
        if threshold != "auto":  # +inf is allowed (score only, never flag); NaN would silently flag nothing
            threshold = validate.finite(threshold, "threshold", allow_inf=True)
            if policy.gate not in (FPR, ALWAYS):
                raise BadArgument(f"a given threshold is the gate: drop it, or the policy's gate ({policy.gate:g})")
        if policy_source != "given":
            policy = _calibrated_for(policy, mitigation, asked_setting)
        if policy.setting is not None:
            if method is None:
                raise BadArgument(f"the policy {policy.text()!r} names a setting; the guard has no mitigation")
            if asked_setting is not None and str(asked_setting) != str(policy.setting):
                raise BadArgument(f"the policy's gate setting ({policy.setting}) and setting={asked_setting!r} "
                                  f"disagree: give one")
            setting = policy.setting
        if policy.tiers and (method is None or method.kind != "trajectory"):
            raise BadArgument(f"a policy's tiers set a trajectory method's strength per prompt; the guard's "
                              f"mitigation is {mitigation!r}")
        read: Any = getattr(getattr(method, "config", None), "from_setting", None)
        for st in ([policy.setting] if policy.setting is not None else []) + [st for _, st in policy.tiers]:
            if read is not None:
                read(st)  # a bad gate or tier setting is refused now, not in a request
        return cls(metric, threshold, mitigation, method, setting, sail_kwargs, str(name), bool(calibrate_new),
                   policy, policy_source)



def _policy_of(model: Any, threshold: Any, policy: Any) -> tuple:
    """(Policy, where it came from) of the guard's arguments: a threshold given as a number is the
    gate itself (flag above it), keeping the calibrated policy's own setting for its gate, if any;
    "auto" (the default) the policy calibrated for the model."""
    if policy is None and threshold != "auto":
        calibrated, source = auto_policy(model.pipe)
        return (Policy(FPR, (), calibrated.setting, calibrated.method),
                (source if calibrated.setting is not None or calibrated.method is not None else "given"))
    if policy is None:
        policy = GUARD_POLICY
    if policy == "auto":
        return auto_policy(model.pipe)
    return Policy.of(policy), "given"


def _calibrated_for(policy: Policy, mitigation: Any, asked_setting: Any) -> Policy:
    """A calibrated policy's settings are its method's (calibration.json's "mitigation", else the
    auto mitigation's), chosen for it: another method keeps only its gate, a setting asked for
    replaces the gate's own."""
    if mitigation != (policy.method or AUTO_MITIGATION[0][0]):
        return Policy(policy.gate)
    if asked_setting is not None:
        return Policy(policy.gate, policy.tiers, method=policy.method)
    return policy
