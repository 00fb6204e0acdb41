"""The guard's policy: which prompts of a request are mitigated, and how strongly.

A gate is a share of the model's own normal captions that the guard would mitigate (its
threshold is those captions' score at that quantile, from the model's calibration: one number a
user can read as a cost), or "always". Tiers raise the strength for prompts further above it:
a prompt whose score passes the cut of a smaller share gets that tier's setting. Everything is
in shares of normal captions, so one policy reads the same on every model and metric.

    Policy(0.01)                               # the 1%-of-normal gate, the method's default setting
    Policy("always")                           # every prompt, no detector in the decision
    Policy(0.3, tiers=((0.01, "s0t300"),))     # 30% of normal mitigated; above the 1% cut, stronger
    Policy.parse("0.3,0.01:s0t300")            # the same, as the CLI writes it
    Policy.parse("0.01:s1t500g0.5")            # the 1% gate with its own setting
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from ..errors import BadArgument
from ..settings import FPR, GATES

ALWAYS = "always"


def _share(value: Any, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise BadArgument(f"{what} must be one of {', '.join(f'{g:g}' for g in GATES)} (a share of the model's "
                          f"normal captions) or {ALWAYS!r}, got {value!r}") from None
    if isinstance(value, bool) or v not in GATES:
        raise BadArgument(f"{what} must be one of {', '.join(f'{g:g}' for g in GATES)} (the shares a calibration "
                          f"records) or {ALWAYS!r}, got {value!r}")
    return v


@dataclass(frozen=True)
class Policy:
    """Which prompts are mitigated (gate) and with which setting (tiers).

    Attributes:
        gate: the share of the model's normal captions mitigated (one of GATES), or "always".
        tiers: (share, setting) pairs, each share smaller than the gate: a prompt scoring above
            the cut of a tier's share gets its setting (the smallest share passed wins); the
            other mitigated prompts get the gate's setting.
        setting: the gate's own setting of the guard's method (None: the guard's setting).
    """

    gate: Union[float, str] = 0.01
    tiers: tuple = ()
    setting: Any = None

    def __post_init__(self) -> None:
        if self.gate != ALWAYS:
            object.__setattr__(self, "gate", _share(self.gate, "the policy's gate"))
        tiers = []
        for t in self.tiers:
            if not (isinstance(t, (tuple, list)) and len(t) == 2):
                raise BadArgument(f"a policy tier is (share, setting), got {t!r}")
            share = _share(t[0], "a tier's share")
            if self.gate != ALWAYS and not share < float(self.gate):
                raise BadArgument(f"a tier's share ({share:g}) must be below the gate ({self.gate:g}): a stronger "
                                  f"setting is for prompts further above the gate")
            tiers.append((share, t[1]))
        object.__setattr__(self, "tiers", tuple(sorted(tiers, key=lambda t: -t[0])))
        if self.setting is not None and not str(self.setting).strip():
            raise BadArgument("a policy's gate setting is a setting of the guard's method (e.g. 0.01:s1t500g0.5), "
                              "got an empty one")

    @classmethod
    def of(cls, value: Any) -> Policy:
        """A Policy from itself, a share, "always" or its text (see parse)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        return cls(value)

    @classmethod
    def parse(cls, text: str) -> Policy:
        """"0.01", "always", "0.3,0.01:s0t300" (gate, then share:setting tiers), "0.01:s1t0" (the
        gate with its own setting)."""
        parts = [p.strip() for p in str(text).split(",")]
        gate, sep, gate_setting = parts[0].partition(":")
        if not gate or (sep and not gate_setting):
            raise BadArgument(f"a policy is a gate (e.g. 0.01, always, 0.01:s1t0 with its own setting), then "
                              f"share:setting tiers, got {text!r}")
        tiers = []
        for p in parts[1:]:
            share, sep, setting = p.partition(":")
            if not sep or not setting:
                raise BadArgument(f"a policy tier is share:setting (e.g. 0.01:s0t300), got {p!r} in {text!r}")
            tiers.append((share, setting))
        return cls(gate, tuple(tiers), gate_setting or None)

    @property
    def share(self) -> float:
        """The share of normal captions the gate sends to the mitigation (1.0 for always)."""
        return 1.0 if self.always else float(self.gate)

    @property
    def always(self) -> bool:
        """Whether every prompt is mitigated."""
        return self.gate == ALWAYS

    def shares(self) -> list:
        """The shares whose cuts the decision needs (the gate's first)."""
        return ([] if self.always else [float(self.gate)]) + [s for s, _ in self.tiers]

    def text(self) -> str:
        """The policy as parse reads it."""
        gate = ALWAYS if self.always else f"{self.gate:g}"
        if self.setting is not None:
            gate += f":{self.setting}"
        return ",".join([gate] + [f"{s:g}:{st}" for s, st in self.tiers])

    def decide(self, score: float, cuts: dict, default_setting: Any) -> tuple:
        """(mitigate, setting, why) of one prompt's score; cuts: {share: threshold};
        default_setting: the guard's, for a gate without its own."""
        if self.always:
            mitigate, why = True, "policy always"
        else:
            cut = cuts[float(self.gate)]
            mitigate = score > cut
            why = (f"score {score:.4g} {'>' if mitigate else '<='} {cut:.4g}, the cut of {self.gate:g} of normal "
                   f"captions")
        setting = default_setting if self.setting is None else self.setting
        for share, tier_setting in self.tiers:  # largest share first: the smallest passed wins
            if mitigate and score > cuts[share]:
                setting = tier_setting
                why += f"; above the {share:g} cut ({cuts[share]:.4g}): setting {tier_setting}"
        return mitigate, setting, why


DEFAULT_POLICY = Policy(FPR)  # the gate at the calibrated false-positive rate: "auto" without a calibrated policy


def auto_policy(pipe: Any) -> tuple:
    """(policy, where it came from) for policy="auto": the policy calibrated for this model
    (calibration.json beside it, for these weights), else DEFAULT_POLICY."""
    from ..calibration.store import shipped_policy

    found = shipped_policy(pipe)
    if found is None:
        return DEFAULT_POLICY, f"the default gate ({FPR:g} of normal captions; no policy calibrated for the model)"
    return Policy.parse(found["policy"]), f"calibrated for the model ({found.get('chosen_on', 'calibration.json')})"
