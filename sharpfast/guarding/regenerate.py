"""The guard's regeneration: its mitigation planned on the flagged rows (a noise method stops on
the guard's metric and threshold: its registry entry's guard_plan; a trajectory method runs its
plan on those rows), then ONE generation of the whole batch, so the unflagged rows come out
exactly as pipe(...) makes them; each flagged prompt's check. Nothing here names a method."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Optional

from ..errors import BadArgument
from ..mitigations import REGISTRY, Context, Mitigation, Plan, run_plan
from .config import GuardConfig
from .request import RequestState


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
        out = [(False, "not flagged")] * len(ctx.prompts)
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
            out[p] = (ok, "; ".join(notes))
        return out
    return checker


def regenerate(m: Mitigation, ctx: Context, setting: Any, sail_kwargs: dict, call_kwargs: dict,
               on_planned: Optional[Callable[[], float]] = None) -> tuple:
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

    Returns:
        (the pipeline's output, per prompt (mitigated, check), the plan's info).
    """
    inner = generator_states(ctx.generator)
    plan, checker = guard_plan(m, ctx, setting, sail_kwargs)
    restore_generators(ctx.generator, inner)  # SAIL's extra candidates must not move the request's generators
    info = dict(plan.info)
    if on_planned is not None:
        info["_planning_s"] = on_planned()
    out = run_plan(ctx.pipe, ctx.prompts, plan, dict(call_kwargs, latents=plan.kwargs.get("latents", ctx.latents)))
    return out, checker(), info


def regenerate_flagged(pipe: Any, config: GuardConfig, req: RequestState, call: dict, states: Optional[list]) -> Any:
    """The flagged rows mitigated, the others as they were, in ONE generation of the batch."""
    assert config.method is not None, "regenerating needs a mitigation"
    gens = call.get("generator")
    restore_generators(gens, states)
    noise = call.get("latents")
    if noise is None:  # the draw prepare_latents made, which also advances the generators as it did
        noise = req.model.noise(req.images, *req.size, gens)
    start = time.perf_counter()
    ctx = req.context(pipe, noise.to(req.model.device), gens, config.metric)
    out, req.reports, info = regenerate(config.method, ctx, config.setting, config.sail_kwargs,
                                        dict(call, callback_on_step_end=req.watch_callback()),
                                        on_planned=lambda: time.perf_counter() - start)
    req.added_s += info.pop("_planning_s", 0.0)
    req.sail_steps = info.get("optimizer_steps")
    return out

