"""The guard's regeneration: its mitigation planned on the flagged rows (a noise method stops on
the guard's metric and threshold: its registry entry's guard_plan; a trajectory method runs its
plan on those rows), then ONE generation of the whole batch, so the unflagged rows come out
exactly as pipe(...) makes them; each flagged prompt's check. Nothing here names a method."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Optional

import torch

from ..errors import BadArgument
from ..mitigations import REGISTRY, Context, Mitigation, Plan, run_plan
from .config import GuardConfig
from .request import NOT_SELECTED, FlaggedAtFirstStep, RequestState


def generator_states(gens: Any) -> Optional[list]:
    """The states of a generator or a list of them (None: None), to replay their draws."""
    if gens is None:
        return None
    return [g.get_state() for g in (gens if isinstance(gens, list) else [gens])]


def restore_generators(gens: Any, states: Optional[list]) -> None:
    """Put generators back to states from generator_states."""
    if gens is not None and states is not None:
        for g, st in zip(gens if isinstance(gens, list) else [gens], states):
            g.set_state(st)


def guard_plan(m: Mitigation, ctx: Context, setting: Any, sail_kwargs: dict) -> tuple:
    """(plan, checker) of mitigation m on the flagged rows of a guarded request; checker() ->
    per prompt (mitigated, check) after the generation."""
    if ctx.guard is None:
        raise BadArgument("guard_plan needs the guard's metric and threshold in ctx.guard")
    metric, thr = ctx.guard["metric"], float(ctx.guard["threshold"])
    if m.kind.startswith("noise"):
        if m.guard_plan is None:
            able = [name for name, mm in REGISTRY.items() if mm.guard_plan is not None]
            raise BadArgument(f"{m.name!r} cannot stop on the guard's metric; use one of {', '.join(able)}")
        plan = m.guard_plan(ctx, setting, dict(sail_kwargs), {"metric": metric, "threshold": thr})
    else:
        plan = m.plan(ctx, setting)
    return plan, _checker(m, ctx, plan, metric, thr)


def _checker(m: Mitigation, ctx: Context, plan: Plan, metric: str, thr: float) -> Callable[[], list]:
    rows, n = ctx.row_list(), ctx.n
    applied_name = plan.info.get("rule", m.name)  # the rule a combined method applied

    def checker() -> list:
        out = [(False, NOT_SELECTED)] * len(ctx.prompts)
        applied = plan.info.get("applied")
        done = applied() if applied is not None else None
        for k, p in enumerate(sorted({r // n for r in rows})):
            notes, ok = [], True
            if "noise_statistic" in plan.info:  # a noise method: its new noise is checked on the guard's metric
                stat = plan.info["noise_statistic"][k * n:(k + 1) * n].float().mean().item()
                under = stat <= thr
                notes.append(f"{metric} {stat:.4g} {'<=' if under else '>'} {thr:.4g} at the new initial noise")
                ok = under
            if done is not None:
                mine = [bool(done[rows.index(r)]) for r in range(p * n, p * n + n)]
                notes.append(f"{applied_name} {'applied' if all(mine) else 'not applied'} to its {n} image(s)")
                ok = all(mine) if "noise_statistic" not in plan.info else (ok or all(mine))
            said = plan.info.get("notes")  # per prompt, what the method did to it (drop_trigger: the word)
            if said is not None and said[p]:
                notes.append(said[p])
            out[p] = (ok, "; ".join(notes))
        return out
    return checker


def regenerate(m: Mitigation, ctx: Context, setting: Any, sail_kwargs: dict, call_kwargs: dict,
               on_planned: Optional[Callable[[], float]] = None, groups: Optional[list] = None) -> tuple:
    """The guard's second pass: m planned on the flagged rows of ctx (the others as they were), then
    ONE generation of the whole batch from ctx.latents, so the unflagged rows come out exactly as
    pipe(...) makes them.

    Args:
        m: the guard's mitigation.
        ctx: its Context (rows = the flagged images, guard = metric and threshold).
        setting: the mitigation's knob, as the guard was given it.
        sail_kwargs: SAIL's extra keywords, as the guard was given them.
        call_kwargs: the pipeline call's keyword arguments (callbacks included).
        on_planned: called after planning; its return value is stored as info["_planning_s"].
        groups: (Context, setting) pairs on disjoint rows instead of (ctx, setting): one setting
            per group (a policy's tiers), their plans run together in the one generation
            (trajectory methods: each rewrites its own rows).

    Returns:
        (the pipeline's output, per prompt (mitigated, check), the plan's info).
    """
    inner = generator_states(ctx.generator)
    parts = [guard_plan(m, c, st, sail_kwargs) for c, st in (groups or [(ctx, setting)])]
    restore_generators(ctx.generator, inner)  # SAIL's extra candidates must not move the request's generators
    plan = parts[0][0]
    for p, _ in parts[1:]:
        plan = plan.merge(p)
    info = dict(plan.info)
    if on_planned is not None:
        info["_planning_s"] = on_planned()
    out = run_plan(ctx.pipe, ctx.prompts, plan, dict(call_kwargs, latents=plan.kwargs.get("latents", ctx.latents)))
    return out, _merged([check() for _, check in parts]), info


def _merged(checks: list) -> list:
    """Per prompt, the check of the group that holds it: each group's checker reports its own
    prompts and NOT_SELECTED for the others."""
    return [next((c[i] for c in checks if c[i][1] != NOT_SELECTED), checks[0][i]) for i in range(len(checks[0]))]


def regenerate_flagged(pipe: Any, config: GuardConfig, req: RequestState, call: dict, states: Optional[list]) -> Any:
    """The flagged rows mitigated, the others as they were, in ONE generation of the batch."""
    assert config.method is not None, "regenerating needs a mitigation"
    gens = call.get("generator")
    restore_generators(gens, states)
    noise = call.get("latents")
    if noise is None:  # the draw prepare_latents made, which also advances the generators as it did
        noise = req.model.noise(req.images, *req.size, gens)
    start = time.perf_counter()
    noise = noise.to(req.model.device)
    ctx = req.context(pipe, noise, gens, config.metric)
    assert req.decision is not None, "regenerating before the decision"
    flagged = req.decision["selected"].nonzero().view(-1).tolist()
    by_setting: dict = {}
    for i in flagged:
        by_setting.setdefault(repr(req.decision["settings"][i]), (req.decision["settings"][i], []))[1].append(i)
    groups = [(req.context(pipe, noise, gens, config.metric, prompts=idx), st) for st, idx in by_setting.values()]
    out, req.reports, info = regenerate(config.method, ctx, config.setting, config.sail_kwargs,
                                        dict(call, callback_on_step_end=req.watch_callback()),
                                        on_planned=lambda: time.perf_counter() - start,
                                        groups=groups if len(groups) > 1 else [(ctx, groups[0][1])])
    req.added_s += info.pop("_planning_s", 0.0)
    req.sail_steps = info.get("optimizer_steps")
    return out



def mitigate_all(pipe: Any, config: GuardConfig, req: RequestState, call: dict) -> Any:
    """A policy that mitigates every prompt by a trajectory method: the plan on every row from the
    first step (nothing to decide first, no step restarted); the report's decision is still made
    at the first step (the score is reported). With tiers, every row starts on the guard's setting
    and, at the first step's decision, the rows of prompts above a tier's cut switch to its
    setting for the steps after it: the online switch. The method's same_step says that the
    first step was the same under both settings, so the images are those of a generation planned
    with the tier from the start; where it was not, FlaggedAtFirstStep restarts the request the
    usual way (regenerate_flagged)."""
    m = config.method
    assert m is not None, "mitigating needs a mitigation"
    every = list(range(len(req.prompts)))
    ctx = req.context(pipe, call.get("latents"), call.get("generator"), config.metric, prompts=every)
    base = config.setting if config.setting is not None else m.default
    if not config.policy.tiers:
        plan, checker = guard_plan(m, ctx, base, config.sail_kwargs)
        out = run_plan(pipe, req.prompts, plan, call)
        req.reports = checker()
        return out
    same_step = m.same_step
    assert same_step is not None, "tiers online need the method's same_step"
    settings = [base] + [st for _, st in config.policy.tiers if repr(st) != repr(base)]
    plans = {repr(st): guard_plan(m, ctx, st, config.sail_kwargs)[0] for st in settings}
    hooks = {k: p.info["guidance_hook"] for k, p in plans.items()}
    for k, h in hooks.items():  # every row on the guard's setting until the decision
        if k != repr(base):
            h.rows = h.rows[:0]

    def switch(decision: dict, t: float) -> None:
        chosen = [st if st is not None else base for st in decision["settings"]]
        if not all(same_step(base, st, t) for st in chosen):
            raise FlaggedAtFirstStep()  # the first step differed: restart with each plan from the start
        for k, h in hooks.items():
            h.rows = torch.tensor([i * req.n + j for i, st in enumerate(chosen) if repr(st) == k
                                   for j in range(req.n)], dtype=torch.long)

    req.on_decision = switch
    merged = plans[repr(base)]
    for k, p in plans.items():
        if k != repr(base):
            merged = merged.merge(p)
    out = run_plan(pipe, req.prompts, merged, call)
    assert req.decision is not None, "the generation ended before its first step's decision"
    groups: dict = {}
    for i, st in enumerate(req.decision["settings"]):
        groups.setdefault(repr(st if st is not None else base), []).append(i)
    req.reports = _merged([_checker(m, req.context(pipe, call.get("latents"), call.get("generator"), config.metric,
                                                   prompts=idx), plans[k], config.metric, float(req.threshold))()
                           for k, idx in groups.items()])
    return out
