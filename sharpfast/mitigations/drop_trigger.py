"""`drop_trigger` (ours, issue 32): each mitigated prompt without its trigger word, the word that
makes it memorized.

A memorized caption steers the model toward one training image, and that pull shows where the
noise is lowest: the guidance direction eps_c - eps_null read at the schedule's last timestep
(the same x as the first step, read as if it were almost clean: wen_low's reading) points at the
copy. The caption's content words steer the coarse layout, which shows at the first, noisiest
timestep. So, for each word w of the prompt (whitespace separated, any tokenizer), with the
prompt minus w and the same x_T:

    turn(w) = cos(d_hi(p - w), d_hi(p)) - cos(d_lo(p - w), d_lo(p)),   d = pred_c - pred_null

is large when removing w turns the low-noise guidance (the copy) and keeps the high-noise one
(the content). The `words` words of largest turn are dropped (in their order in the prompt); a
word whose removal leaves the text embeddings as they were (one the tokenizer does not know, or
past its length) is never one of them. Optionally (`then`, "w1s1t500g0.5") Jain et al.'s
transition schedule then runs on the same images (sharpfast.mitigations.transition).
Cosines of prediction differences are the same in every parameterization (eps, v, flow), since
at one x each is an affine map of the prediction with the same x term. The decision reads the
first image of each prompt; its cost, before the generation, is (words + 2) UNet rows per
mitigated prompt at each of the two timesteps, in four network calls for the whole request (the
generation itself is the pipeline's own, with the new prompts).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .. import validate
from ..errors import BadArgument, NonFiniteOutput
from .base import Context, MethodConfig, Plan, register
from .transition import TransitionConfig, transition_plan


@dataclass(frozen=True)
class DropTriggerConfig(MethodConfig):
    """How many words to drop and, optionally, a transition schedule on the same images after the
    drop (`then`: a transition setting, e.g. "s1t500g0.5"; None: the request's own guidance)."""

    words: int = 1
    then: Optional[str] = None

    @classmethod
    def from_setting(cls, setting: Any) -> DropTriggerConfig:
        """A count (or its text, e.g. "1"), "w1" / "w1s1t500g0.5" (one word, then that transition
        schedule), or a config."""
        if isinstance(setting, cls):
            cfg = setting
        elif isinstance(setting, str) and setting.strip().startswith("w"):
            m = re.fullmatch(r"w(\d+)(.*)", setting.strip())
            if m is None:
                raise BadArgument(f"a drop_trigger setting looks like 1, w1 or w1s1t500g0.5 (one word dropped, then "
                                  f"transition s1t500g0.5), got {setting!r}")
            cfg = cls(int(m.group(1)), m.group(2) or None)
        else:
            return cls.from_number(setting, "drop_trigger's setting (words dropped)", minimum=1)
        validate.integer(cfg.words, "drop_trigger's words dropped", minimum=1)
        if cfg.then is not None:
            TransitionConfig.from_setting(cfg.then)  # a bad schedule is refused here, not mid-generation
        return cfg


@torch.no_grad()
def trigger_turns(model: Any, prompts: list, x_T: torch.Tensor, num_inference_steps: int, height: int, width: int,
                  guidance_scale: float) -> list:
    """The turn of each word of each prompt (a tensor per prompt; a prompt of one word or none
    gets zeros), prompt i read at its initial noise x_T[i] (unit noise, as `pipe(latents=...)`
    takes it). All the prompts' variants go through the network together: two calls per timestep
    (the variants' conditional rows; each prompt's null row)."""
    words = [p.split() for p in prompts]
    texts, owner = [], []
    for i, (p, w) in enumerate(zip(prompts, words)):
        variants = [p] + [" ".join(w[:j] + w[j + 1:]) for j in range(len(w))] if len(w) > 1 else []
        texts += variants
        owner += [i] * len(variants)
    if not texts:
        return [torch.zeros(len(w)) for w in words]
    live = sorted(set(owner))
    cond = model.encode(texts, 1, height, width, guidance_scale)
    sched = model.scheduler(num_inference_steps, height, width)
    t_hi = sched.timesteps[0]
    x = sched.scale_model_input(x_T.to(model.device, model.dtype) * sched.init_noise_sigma, t_hi)
    t_lo, _ = model.low_noise(sched, 1)
    first = [owner.index(i) for i in live]  # each live prompt's own (whole) text row
    cos = []
    for t in (t_hi, t_lo):
        c = model.predict_branch(x[owner], t, cond, "cond")
        u = model.predict_branch(x[live], t, cond.rows(first), "null")
        d = (c - u[[live.index(i) for i in owner]]).reshape(len(c), -1).float()
        ref = d[[first[live.index(i)] for i in owner]]
        cos.append(torch.nn.functional.cosine_similarity(d, ref, dim=1))
    turn = (cos[0] - cos[1]).cpu()
    bad = ~torch.isfinite(turn)
    if bool(bad.any()):
        raise NonFiniteOutput(f"the network returned NaN/inf while drop_trigger read the prompt "
                              f"{prompts[owner[int(bad.nonzero()[0])]]!r}")
    # a word the text encoder never sees (an unknown word, like the padding it becomes; one past
    # its length) changes nothing when dropped: never a candidate
    same = (cond.cond == cond.cond[[first[live.index(i)] for i in owner]]).flatten(1).all(dim=1).cpu()
    turn = turn.masked_fill(same, -math.inf)
    out = [torch.zeros(len(w)) for w in words]
    for i in live:
        rows = [k for k, o in enumerate(owner) if o == i][1:]  # the variants, in word order
        out[i] = turn[rows]
    return out


def drop_words(prompt: str, turn: torch.Tensor, k: int) -> tuple:
    """(the prompt without its k words of largest turn, those words in prompt order). Words of
    turn -inf (dropping them changes nothing) are never dropped; a prompt keeps at least one word."""
    words = prompt.split()
    live = [i for i in range(len(words)) if math.isfinite(float(turn[i]))]
    if len(words) <= k or not live:
        return prompt, []
    top = sorted(sorted(live, key=lambda i: -float(turn[i]))[:k])
    kept = [w for i, w in enumerate(words) if i not in top]
    return " ".join(kept), [words[i] for i in top]


@register("drop_trigger", cost="(words + 2) CFG calls per mitigated prompt, in 4 batched network calls",
          knob="words dropped", default=1, sweep=(1, 2, "w1s1t500g0.5"), needs=("cfg",), kind="prompt_each",
          config=DropTriggerConfig)
def _drop_trigger(ctx: Context, setting: Any) -> Plan:
    cfg = DropTriggerConfig.from_setting(setting)
    k = cfg.words
    rows = ctx.row_list()
    chosen = sorted({r // ctx.n for r in rows})
    whole = {p * ctx.n + j for p in chosen for j in range(ctx.n)}
    if set(rows) != whole:
        raise BadArgument("drop_trigger rewrites whole prompts: mitigate every image of a prompt or none")
    prompts, dropped = list(ctx.prompts), [[] for _ in ctx.prompts]  # type: list, list[list[str]]
    turns = trigger_turns(ctx.model, [ctx.prompts[p] for p in chosen], ctx.latents[[p * ctx.n for p in chosen]],
                          ctx.num_inference_steps, ctx.height, ctx.width, ctx.guidance_scale)
    for p, turn in zip(chosen, turns):
        prompts[p], dropped[p] = drop_words(ctx.prompts[p], turn, k)
    done = [bool(dropped[r // ctx.n]) for r in rows]
    notes = [f"dropped {', '.join(repr(w) for w in d)}" if d else "" for d in dropped]
    plan = Plan(prompts=prompts, info={"dropped": dropped, "new_prompts": prompts, "applied": lambda: done,
                                       "notes": notes,
                                       "unet_calls_before": sum(len(ctx.prompts[p].split()) + 2 for p in chosen)
                                       / max(1, ctx.images)})
    if cfg.then is None:
        return plan
    then = transition_plan(ctx, cfg.then)  # the same rows, the schedule on the new prompts' guidance
    ran = then.info["applied"]
    plan = plan.merge(then)
    plan.info.update(applied=lambda: [a and b for a, b in zip(done, ran())], rule=f"drop_trigger+{cfg.then}")
    return plan
