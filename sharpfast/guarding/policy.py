"""The guard's policy: which prompts of a request are mitigated, and how strongly.

A gate is a share of the model's own normal captions that the guard would mitigate (its
threshold is those captions' score at that quantile, from the model's calibration: one number a
user can read as a cost), or "always". Tiers raise the strength for prompts further above it:
a prompt whose score passes the cut of a smaller share gets that tier's setting. A tier "xM"
instead cuts at M times the gate's margin over the normal captions' median score (median + M
(gate cut - median)): for prompts far above every normal caption, where a share of them has no
cut left to give (a calibration of 148 captions has nothing above its 1% cut). Everything is
read from the normal captions' scores, so one policy reads the same on every model and metric.

    Policy(0.01)                               # the 1%-of-normal gate, the method's default setting
    Policy("always")                           # every prompt, no detector in the decision
    Policy(0.3, tiers=((0.01, "s0t300"),))     # 30% of normal mitigated; above the 1% cut, stronger
    Policy.parse("0.3,0.01:s0t300")            # the same, as the CLI writes it
    Policy.parse("0.01:s1t500g0.5")            # the 1% gate with its own setting
    Policy.parse("0.01:s1.25t0,x3:s1t500g0.5") # above 3x the gate's margin over the median, stronger
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Union

from ..errors import BadArgument
from ..settings import FPR, GATES

ALWAYS = "always"
MEDIAN = 0.5  # the share whose cut is the normal captions' median score (a multiple tier's origin)


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
class Multiple:
    """A tier's cut as a multiple m > 1 of the gate's margin over the normal captions' median:
    score > median + m (gate cut - median)."""

    m: float

    def __post_init__(self) -> None:
        if isinstance(self.m, bool) or not isinstance(self.m, (int, float)) or not math.isfinite(self.m) \
                or self.m <= 1:
            raise BadArgument(f"a multiple tier is x followed by a number > 1 (x3: three times the gate's margin "
                              f"over the normal captions' median), got x{self.m!r}")

    def text(self) -> str:
        """As parse reads it ("x3")."""
        return f"x{self.m:g}"

    def cut(self, cuts: dict, gate: float) -> float:
        """The score cut, from the gate's cut and the median's (cuts: {share: cut}); BadArgument
        when the gate's cut is not above the median (a threshold given below it: no margin)."""
        med = cuts[MEDIAN]
        if not cuts[gate] > med:
            raise BadArgument(f"a multiple tier ({self.text()}) is a multiple of the gate's margin over the normal "
                              f"captions' median score ({med:.4g}); the gate's cut {cuts[gate]:.4g} is not above it")
        return med + self.m * (cuts[gate] - med)

    @classmethod
    def parse(cls, text: str) -> Multiple:
        """ "x3" -> Multiple(3.0)."""
        try:
            m = float(text[1:])
        except ValueError:
            raise BadArgument(f"a multiple tier is x followed by a number > 1 (e.g. x3), got {text!r}") from None
        return cls(m)


def _tier_key(value: Any, gate: Any) -> Union[float, Multiple]:
    """A tier's share (below the gate) or its Multiple (of a gate below the median)."""
    if isinstance(value, str) and value.strip().lower().startswith("x"):
        value = Multiple.parse(value.strip().lower())
    if isinstance(value, Multiple):
        if gate == ALWAYS or float(gate) >= MEDIAN:
            raise BadArgument(f"a multiple tier ({value.text()}) is a multiple of the gate's margin over the normal "
                              f"captions' median: it needs a gate below {MEDIAN:g}, got {gate}")
        return value
    share = _share(value, "a tier's share")
    if gate != ALWAYS and not share < float(gate):
        raise BadArgument(f"a tier's share ({share:g}) must be below the gate ({gate:g}): a stronger "
                          f"setting is for prompts further above the gate")
    return share


@dataclass(frozen=True)
class Policy:
    """Which prompts are mitigated (gate) and with which setting (tiers).

    Attributes:
        gate: the share of the model's normal captions mitigated (one of GATES), or "always".
        tiers: (share, setting) pairs, each share smaller than the gate: a prompt scoring above
            the cut of a tier's share gets its setting (the smallest share passed wins); or all
            (Multiple, setting) pairs (the largest multiple passed wins); the other mitigated
            prompts get the gate's setting.
        setting: the gate's own setting of the guard's method (None: the guard's setting).
        method: the mitigation a calibrated policy was chosen for (None: the guard's default,
            transition); the guard's `mitigation="auto"` takes it (not part of the text).
    """

    gate: Union[float, str] = 0.01
    tiers: tuple = ()
    setting: Any = None
    method: Any = None

    def __post_init__(self) -> None:
        if self.gate != ALWAYS:
            object.__setattr__(self, "gate", _share(self.gate, "the policy's gate"))
        tiers = []
        for t in self.tiers:
            if not (isinstance(t, (tuple, list)) and len(t) == 2):
                raise BadArgument(f"a policy tier is (share, setting) or (Multiple, setting), got {t!r}")
            tiers.append((_tier_key(t[0], self.gate), t[1]))
        kinds = {isinstance(k, Multiple) for k, _ in tiers}
        if len(kinds) > 1:
            raise BadArgument("a policy's tiers are all shares (0.01:...) or all multiples (x3:...), not both")
        # weakest first: the decision walks them in order and the last one passed wins
        object.__setattr__(self, "tiers", tuple(sorted(tiers, key=lambda t: t[0].m if isinstance(t[0], Multiple)
                                                      else -t[0])))
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
        gate with its own setting), "0.01:s1.25t0,x3:s1t500g0.5" (a multiple tier)."""
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
        """The shares whose cuts the decision needs (the gate's first; the median's for multiples)."""
        tiers = [s for s, _ in self.tiers if not isinstance(s, Multiple)]
        median = [MEDIAN] if len(tiers) < len(self.tiers) else []
        return ([] if self.always else [float(self.gate)]) + tiers + median

    @property
    def threshold_share(self) -> Union[float, None]:
        """The share whose cut is the guard's threshold (flagged: score above it): the gate's, or
        None for the calibrated threshold itself (a gate at the false-positive rate, "always")."""
        return None if self.always or float(self.gate) == FPR else float(self.gate)

    def calibrated_shares(self) -> list:
        """The shares whose cuts a request reads from the calibration besides the calibrated
        threshold: threshold_share's, if any, and those of shares()[1:] (the tiers', the median's)."""
        gate = [] if self.threshold_share is None else [self.threshold_share]
        return gate + self.shares()[0 if self.always else 1:]

    def text(self) -> str:
        """The policy as parse reads it."""
        gate = ALWAYS if self.always else f"{self.gate:g}"
        if self.setting is not None:
            gate += f":{self.setting}"
        return ",".join([gate] + [f"{tier_text(s)}:{st}" for s, st in self.tiers])

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
        for key, tier_setting in self.tiers:  # weakest first: the last one passed wins
            cut = key.cut(cuts, float(self.gate)) if isinstance(key, Multiple) else cuts[key]
            if mitigate and score > cut:
                setting = tier_setting
                what = (f"{key.text()} the gate's margin over the median" if isinstance(key, Multiple)
                        else f"the {key:g} cut")
                why += f"; above {what} ({cut:.4g}): setting {tier_setting}"
        return mitigate, setting, why


def tier_text(key: Any) -> str:
    """A tier's key as parse reads it ("0.01", "x3")."""
    return key.text() if isinstance(key, Multiple) else f"{key:g}"


DEFAULT_POLICY = Policy(FPR)  # the gate at the calibrated false-positive rate: "auto" without a calibrated policy


def auto_policy(pipe: Any) -> tuple:
    """(policy, where it came from) for policy="auto": the policy calibrated for this model
    (calibration.json beside it, for these weights), else DEFAULT_POLICY."""
    from ..calibration.store import shipped_policy

    found = shipped_policy(pipe)
    if found is None:
        return DEFAULT_POLICY, f"the default gate ({FPR:g} of normal captions; no policy calibrated for the model)"
    method = found.get("mitigation")
    if method is not None and not isinstance(method, str):
        raise BadArgument(f"calibration.json's policy names its mitigation as text, got {method!r}")
    policy = Policy.parse(found["policy"])
    return (Policy(policy.gate, policy.tiers, policy.setting, method),
            f"calibrated for the model ({found.get('chosen_on', 'calibration.json')})")
