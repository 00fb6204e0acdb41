"""The mitigation framework: what a method gives a pipeline call (a Plan: arguments, hooks,
info), the one Context of a mitigated generation, the registry entry of a method (Mitigation:
its cost, knob, default, needs, kind and, for noise methods, how the serving guard applies it)
and the registry itself. Each method is one module of this package that calls `register`."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .. import settings, validate
from ..adapters import adapter_families
from ..errors import BadArgument, UnsupportedPipeline
from .grammar import number

# the serving guard's default metric (sail_guard outside a guard stops on it too)
GUARD_METRIC = settings.GUARD_METRIC
# what a method needs of the model family (the adapter's `capabilities`, sharpfast.adapters)
NEEDS_WHY = {"cfg": "is guidance-distilled: its call has no classifier-free batch to reschedule or steer",
             "cross_attention": "attends jointly over image and text tokens: it has no cross-attention map",
             "embeddings_only": "is conditioned on pooled / added inputs besides the text embeddings"}


# ---- what a method gives the pipeline call ---------------------------------------------------

@dataclass
class Context:
    """One mitigated generation: the pipeline, its adapter, the prompts (n images each), the unit
    noise it starts from (N rows, as `pipe(latents=...)` takes it), the rows (images) to mitigate
    (None: all), and the call's settings."""

    pipe: Any
    model: Any
    prompts: list
    n: int
    latents: torch.Tensor
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    generator: object = None
    rows: Optional[list] = None
    guard: Optional[dict] = None  # the serving guard's metric and threshold (sail_guard)

    @property
    def images(self) -> int:
        """len(prompts) * n."""
        return len(self.prompts) * self.n

    def row_list(self) -> list:
        """The rows to mitigate (all images when rows is None)."""
        return list(range(self.images)) if self.rows is None else list(self.rows)


@dataclass
class Plan:
    """What the pipeline call gets: keyword arguments to set (latents, prompt_embeds, ...), hooks to
    run it under (context managers), and per-image info (what the method did, checked)."""

    kwargs: dict = field(default_factory=dict)
    hooks: list = field(default_factory=list)
    info: dict = field(default_factory=dict)
    prompts: Optional[list] = None  # replacement prompts (random_tokens)

    def merge(self, other: Plan) -> Plan:
        """This plan and other's together (other's kwargs and prompts win)."""
        return Plan({**self.kwargs, **other.kwargs}, self.hooks + other.hooks, {**self.info, **other.info},
                    other.prompts if other.prompts is not None else self.prompts)




GuardPlan = Callable[[Context, Any, dict, dict], Plan]


@dataclass(frozen=True)
class MethodConfig:
    """A method's knobs, typed, frozen, with their defaults. `from_setting` reads what a caller
    gives: the config itself, the method's short setting string (the one grammar of
    sharpfast.mitigations.grammar, as the CLI and the harness's sweeps write it) or its main knob
    as a number; a plan works on the config only."""

    @classmethod
    def from_setting(cls, setting: Any) -> Any:
        """The config of a setting (BadArgument naming the method and an example)."""
        raise NotImplementedError

    @classmethod
    def from_number(cls, setting: Any, name: str, *, minimum: Optional[int] = None) -> Any:
        """The config of a one-number method: the config itself, or the number (or its text),
        checked: an int >= minimum when a minimum is given, else a finite number > 0."""
        if isinstance(setting, cls):  # a config built by hand is checked all the same (NaN, <= 0)
            from dataclasses import astuple

            cls.from_number(astuple(setting)[0], name, minimum=minimum)
            return setting
        make: Callable[[Any], Any] = cls  # a one-field subclass
        if minimum is not None:
            return make(validate.integer(number(setting, name, int), name, minimum=minimum))
        return make(validate.finite(number(setting, name), name, above=0))


@dataclass(frozen=True)
class Mitigation:
    """A registered mitigation: its declared cost (extra UNet calls and backwards per image), its
    main knob (name, default, sweep), what it needs of a model family (adapter capabilities:
    "cfg", "cross_attention", "embeddings_only"), plan(ctx, setting), its kind ("noise": a new
    initial noise, "trajectory": the sampler's predictions, "prompt": whole prompts, the whole
    batch's; "prompt_each": each mitigated prompt rewritten, the others kept; "none") and,
    for a noise method the serving guard may run, guard_plan(ctx, setting, sail_kwargs, stop): its
    plan when it must stop on the guard's metric (stop: {"metric", "threshold"})."""

    name: str
    cost: str
    knob: str
    default: object
    sweep: tuple
    needs: tuple
    plan: Callable[[Context, Any], Plan]
    kind: str
    guard_plan: Optional[GuardPlan] = None
    config: Optional[type] = None  # its MethodConfig (None: no knob)
    # same_step(a, b, t): whether settings a and b act alike on a step at timestep t (a trajectory
    # method whose plan exposes info["guidance_hook"]: the guard may switch a row's setting after
    # that step instead of restarting the generation; None: it cannot)
    same_step: Optional[Callable[[Any, Any, float], bool]] = None

    @property
    def families(self) -> tuple:
        """The registered model families that have what this method needs."""
        return tuple(f for f, caps in adapter_families().items() if set(self.needs) <= caps)

    def supports(self, model: Any) -> bool:
        """Whether the model's family (its adapter) has what this method needs."""
        return set(self.needs) <= model.capabilities


REGISTRY: dict[str, Mitigation] = {}


def register(name: str, *, cost: str, knob: str, default: object, sweep: tuple, needs: tuple = (), kind: str,
             guard_plan: Optional[GuardPlan] = None, config: Optional[type] = None,
             same_step: Optional[Callable[[Any, Any, float], bool]] = None) -> Callable:
    """Decorator: register plan(ctx, setting) as mitigation `name` in REGISTRY."""
    def deco(fn: Callable) -> Callable:
        REGISTRY[name] = Mitigation(name, cost, knob, default, tuple(sweep), tuple(needs), fn, kind, guard_plan, config,
                                    same_step)
        return fn
    return deco


def get(name: str) -> Mitigation:
    """The registered mitigation `name` (BadArgument naming the valid ones)."""
    if name not in REGISTRY:
        raise BadArgument(f"mitigation must be one of {', '.join(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def check_family(m: Mitigation, model: Any) -> None:
    """UnsupportedPipeline unless the model's family has what m needs (the message says why)."""
    missing = [need for need in m.needs if need not in model.capabilities]
    if missing:
        raise UnsupportedPipeline(f"mitigation {m.name!r} is defined for {', '.join(m.families)} pipelines, not "
                                  f"{model.family}: {model.family} {NEEDS_WHY[missing[0]]}")



def per_row(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row vector shaped to broadcast over the rows of `like`."""
    return v.view(-1, *[1] * (like.dim() - 1))


def prompt_lengths(pipe: Any, prompts: list, n: int) -> list:
    """Tokens of each image's prompt as the pipeline's tokenizer makes them (BOS and EOS included,
    truncated to its maximum length)."""
    tok = pipe.tokenizer
    out = []
    for p in prompts:
        length = min(len(tok(p).input_ids), tok.model_max_length)
        out.extend([length] * n)
    return out
