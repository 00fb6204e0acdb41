"""Every inference-time mitigation in one registry: `sharpfast.mitigate(pipe, prompt, method=...)`.

A mitigation is registered once (`REGISTRY[name]`, a `Mitigation`) with its declared cost, its
main knob with a default and a sweep, what it needs of a model family, and one function
`plan(ctx, setting) -> Plan`: what the pipeline call must get (other initial latents, other
prompts or embeddings) and the hooks it must run under (a guidance schedule on the denoiser's
output, edited cross-attention). `mitigate` and the serving guard both run a plan around the
user's own `pipe(...)` call; the pipeline is left as it was (hooks and processors are removed,
also on error).

The methods (each written from its paper; where public code exists its definition was read and
is noted):

- `sail`: SAIL's optimized initial noise (sharpfast.mitigation); `sail_reference`: the authors'
  loss and loop.
- `wen_embedding`: Wen et al.'s optimized prompt embedding; `random_tokens`: Somepalli et al.'s
  random words appended.
- `transition`: Jain et al. (CVPR 2025, "Classifier-free guidance inside the attraction basin may
  cause memorization"). While the timestep is above the transition point the guidance scale is
  `early` (0: the unconditional prediction, "no guidance"; negative: opposite guidance), then the
  request's own scale. Static: a fixed transition timestep (their commands: 500 with scale 0,
  650 with -2). Dynamic (`t_switch=None`): guidance 1 (the conditional prediction) until the
  first local minimum of ||eps_c - eps_null|| along the trajectory, per image: the step where the
  norm rises again after falling is the first guided one (their dtp script). Their
  opposite-guidance dynamic script finds the point in a full pre-pass; here the same online rule
  is used with `early` < 0. Zero extra UNet calls.
- `attention_rescale`: Ren et al. (ECCV 2024). In every cross-attention layer, at every step, the
  logit of the first token (BOS) of the conditional branch is multiplied by `c1` (their 1.25), and
  the tokens after the prompt's own (the padding "summary" tokens) are masked out of both
  branches (their `--cross_attn_mask`: the first `prompt_length` tokens are kept, BOS and EOS
  included). UNets only. Zero extra UNet calls (the edited layers compute attention explicitly).
- `attract_repel`: GUARD (Zhao, Triantafillou and Triantafillou, arXiv 2603.00133): guidance toward
  a prediction whose cross-attention is attenuated at the prompt positions a per-prompt test
  picks, and away from the full-attention (memorized) prediction. This instantiation (the paper's
  exact constants were not available offline; the rule is written from its abstract): at step 1
  the conditional branch's attention per token (mean over heads, queries and layers) is read at
  x_T; positions 1..L-1 (BOS excluded) whose attention is above median + `z` robust standard
  deviations (1.4826 MAD) are attenuated (at least the top one); at every step the attenuated
  prediction a (those logits + log `attenuation`) costs one call on the conditional rows, and the
  guided prediction is eps_null + g (a - eps_null) + `repel` (a - eps_c). UNets only.
- `sail+transition`: SAIL's noise, then the static transition schedule.
- `sail_guard` (ours): SAIL that stops on the serving guard's own metric and threshold, times
  `margin`: the guard's default for noise mitigation (sharpfast.serving).
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import settings, validate
from .errors import BadArgument, UnsupportedPipeline, UsageError
from .score import adapter_families

# the serving guard's default metric (sharpfast.serving reads it here: sail_guard outside a guard
# stops on it too)
GUARD_METRIC = settings.GUARD_METRIC
# what a method needs of the model family (the adapter's `capabilities`, sharpfast.score)
NEEDS_WHY = {"cfg": "is guidance-distilled: its call has no classifier-free batch to reschedule or steer",
             "cross_attention": "attends jointly over image and text tokens: it has no cross-attention map",
             "embeddings_only": "is conditioned on pooled / added inputs besides the text embeddings"}


# ---- what a method gives the pipeline call ---------------------------------------------------

@dataclass
class Context:
    """One mitigated generation: the pipeline, its adapter, the prompts (n images each), the unit
    noise it starts from (N rows, as `pipe(latents=...)` takes it), the rows (images) to mitigate
    (None: all), and the call's settings."""

    pipe: object
    model: object
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


@dataclass(frozen=True)
class Mitigation:
    """A registered mitigation: its declared cost (extra UNet calls and backwards per image), its
    main knob (name, default, sweep), what it needs of a model family (adapter capabilities:
    "cfg", "cross_attention", "embeddings_only") and plan(ctx, setting)."""

    name: str
    cost: str
    knob: str
    default: object
    sweep: tuple
    needs: tuple
    plan: Callable[[Context, object], Plan]
    kind: str  # "noise" (changes x_T), "trajectory" (changes the sampler's predictions), "prompt"

    @property
    def families(self) -> tuple:
        """The registered model families that have what this method needs."""
        return tuple(f for f, caps in adapter_families().items() if set(self.needs) <= caps)

    def supports(self, model) -> bool:
        """Whether the model's family (its adapter) has what this method needs."""
        return set(self.needs) <= model.capabilities


REGISTRY: dict[str, Mitigation] = {}


def register(name, *, cost, knob, default, sweep, needs=(), kind):
    """Decorator: register plan(ctx, setting) as mitigation `name` in REGISTRY."""
    def deco(fn):
        REGISTRY[name] = Mitigation(name, cost, knob, default, tuple(sweep), tuple(needs), fn, kind)
        return fn
    return deco


def get(name: str) -> Mitigation:
    """The registered mitigation `name` (BadArgument naming the valid ones)."""
    if name not in REGISTRY:
        raise BadArgument(f"mitigation must be one of {', '.join(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


def check_family(m: Mitigation, model) -> None:
    """UnsupportedPipeline unless the model's family has what m needs (the message says why)."""
    missing = [need for need in m.needs if need not in model.capabilities]
    if missing:
        raise UnsupportedPipeline(f"mitigation {m.name!r} is defined for {', '.join(m.families)} pipelines, not "
                                  f"{model.family}: {model.family} {NEEDS_WHY[missing[0]]}")


# ---- the denoiser-output hook: a per-call guidance rule ----------------------------------------

def _split_call(args, kwargs):
    """(sample, timestep) of a UNet / transformer call as the pipeline makes it."""
    sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    t = args[1] if len(args) > 1 else kwargs["timestep"]
    t = t.reshape(-1)[0] if torch.is_tensor(t) and t.dim() else t
    return sample, float(t)


class GuidanceHook:
    """A forward hook on the denoiser that replaces, on the mitigated images' conditional rows of
    the CFG batch [null; cond], the prediction c by c' = u + (target - u) / g, so that the
    pipeline's own u + g (c' - u) is `target` = rule(u, c, t, call) (g: the request's scale); the
    other rows are returned bit for bit. Per-call state lives on the hook object (one per
    generation)."""

    def __init__(self, net, guidance_scale: float, rows, images: int, rule):
        self.net, self.g, self.rule = net, float(guidance_scale), rule
        self.rows = torch.as_tensor(rows, dtype=torch.long)
        self.images = images
        self.calls = 0
        self.inside = False  # a rule's own extra call on the net must not be hooked
        self.state: dict = {}

    def __call__(self, module, args, kwargs, output):
        """The forward hook: rewrite the mitigated rows' guided prediction by the rule."""
        if self.inside:
            return None
        pred = output[0] if isinstance(output, tuple) else output.sample
        if pred.shape[0] != 2 * self.images:
            raise UsageError(f"a guidance mitigation expects the CFG batch of {self.images} images "
                               f"[null; cond], got a batch of {pred.shape[0]}: call with guidance_scale > 1")
        _, t = _split_call(args, kwargs)
        rows = self.rows.to(pred.device)
        u, c = pred.chunk(2)
        target = self.rule(self, u[rows].float(), c[rows].float(), t, args, kwargs, rows)
        self.calls += 1
        if target is None:
            return None
        u_r = u[rows].float()
        new = pred.clone()
        new[self.images + rows] = (u_r + (target - u_r) / self.g).to(pred.dtype)
        if isinstance(output, tuple):
            return (new, *output[1:])
        output.sample = new
        return output

    @contextlib.contextmanager
    def installed(self):
        """Context manager: the hook installed on the denoiser for one pipeline call."""
        handle = self.net.register_forward_hook(self, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()


def _per_row(v, like):
    return v.view(-1, *[1] * (like.dim() - 1))


def _transition_rule(early: float, t_switch):
    """Jain et al.'s schedule: scale `early` above t_switch, the request's scale below; with
    t_switch None the dynamic point (the first local minimum of ||c - u||, per image)."""
    def rule(hook, u, c, t, args, kwargs, rows):
        st = hook.state
        if t_switch is not None:
            if t <= t_switch:
                st.setdefault("switched_at", t)
                return None
            st.setdefault("early_steps", 0)
            st["early_steps"] += 1
            return u + early * (c - u)
        d = (c - u).reshape(len(c), -1).norm(dim=1)
        if "prev" not in st:  # per image: the norms of the last two steps, on the device (no host sync)
            st["prev"] = st["prev2"] = torch.full_like(d, -1.0)
            st["switched"] = torch.zeros_like(d, dtype=torch.bool)
            st["early_steps"] = torch.zeros_like(d)
        # the previous step was a local minimum: this step rises above it, the one before was above it
        turn = (d > st["prev"]) & (st["prev2"] > st["prev"]) & (st["prev"] >= 0)
        st["switched"] = st["switched"] | turn
        st["prev2"], st["prev"] = st["prev"], d
        sw = st["switched"]
        st["early_steps"] = st["early_steps"] + (~sw).float()
        scale = torch.where(sw, torch.full_like(d, hook.g), torch.full_like(d, early))
        return u + _per_row(scale, u) * (c - u)
    return rule


# ---- the methods ---------------------------------------------------------------------------------

def _sail_plan(ctx: Context, options: dict, stop=None) -> Plan:
    from .mitigation import sail_latents

    rows = ctx.row_list()
    n = ctx.n
    by_prompt = sorted({r // n for r in rows})
    if [r for p in by_prompt for r in range(p * n, p * n + n)] != rows:
        raise BadArgument("SAIL mitigates whole prompts: rows must hold every image of each prompt they name")
    gens = ctx.generator
    sub_gens = [gens[r] for r in rows] if isinstance(gens, list) else gens
    kw: dict = dict(num_inference_steps=ctx.num_inference_steps, guidance_scale=ctx.guidance_scale,
                    height=ctx.height, width=ctx.width)
    opt, info = sail_latents(ctx.pipe, [ctx.prompts[p] for p in by_prompt], num_images_per_prompt=n,
                             latents=ctx.latents[rows], generator=sub_gens, stop=stop, **options, **kw)
    mixed = ctx.latents.clone()
    mixed[rows] = opt.to(mixed)
    return Plan({"latents": mixed}, info={"sail": info, "unet_calls_before": info["unet_calls_optimization"]})


def sail_setting(setting) -> dict:
    """"k1s3lr0.7" -> 1 candidate, 3 Adam steps, lr 0.7 (lr optional: sail's default); a trailing
    "a3e-5" puts the paper's alpha ||x||^2 term (alpha 3e-5) in place of the projection onto the
    Gaussian shell. A dict is taken as sail's keywords."""
    import re

    if isinstance(setting, dict):
        return dict(setting)
    num = r"(\d*\.?\d+(?:e-?\d+)?)"
    m = re.fullmatch(rf"k(\d+)s(\d+)(?:lr{num})?(?:a{num})?", str(setting))
    if not m:
        raise BadArgument(f"a SAIL setting looks like k1s3lr0.7 (1 candidate, 3 Adam steps, lr 0.7; lr optional) or "
                          f"k1s3lr0.7a1e-4 (alpha ||x||^2 instead of the projection), got {setting!r}")
    out: dict = {"candidates": int(m.group(1)), "max_steps": int(m.group(2))}
    if m.group(3):
        out["lr"] = float(m.group(3))
    if m.group(4):
        out.update(alpha=float(m.group(4)), project=False)
    return out


@register("none", cost="0", knob="-", default=None, sweep=(None,), kind="none")
def _none(ctx, setting):
    return Plan()


@register("sail", cost="2 CFG calls per evaluation, (s + 1) evaluations and s backwards at most (s Adam steps)",
          knob="candidates k, Adam steps s, lr (default k1 s3 lr 0.7)", default="k1s3",
          sweep=("k4s2lr0.05", "k1s1", "k1s2", "k1s3lr0.3", "k1s3lr0.5", "k1s3", "k1s3lr1"),
          kind="noise")
def _sail(ctx, setting):
    return _sail_plan(ctx, sail_setting(setting))


@register("sail_alpha", cost="as sail", knob="alpha of the paper's norm term (k1 s3 lr 0.7, no projection)",
          default="k1s3a3e-5", sweep=("k1s3a0", "k1s3a1e-5", "k1s3a3e-5", "k1s3a1e-4", "k1s3a3e-4"),
          kind="noise")
def _sail_alpha(ctx, setting):
    return _sail_plan(ctx, sail_setting(setting))


@register("sail_reference", cost="3 CFG calls per Adam step x k candidates (their loss), 10 steps",
          knob="the authors' loss, no early exit; lr (default 0.05)", default="k8s10",
          sweep=("k8s10", "k8s10lr0.1", "k8s10lr0.3", "k8s10lr0.7", "k8s10lr1"), kind="noise")
def _sail_reference(ctx, setting):
    # every candidate through all steps (no early exit, one round): what bench_sail times as the reference loop
    kw = {"lr": 0.05, **sail_setting(setting)}
    return _sail_plan(ctx, {"objective": "reference", "max_rounds": 1, "threshold": -1e30, **kw})


def _guard_stop(ctx, margin: float):
    if ctx.guard is None:
        return None
    return {"metric": ctx.guard["metric"], "threshold": float(ctx.guard["threshold"]) * margin}


@register("sail_guard", cost="as sail (+ the guard metric's own calls per evaluation)",
          knob="margin: stop once the guard's metric is under margin x its threshold (k1 s3 lr 0.7)",
          default=1.0, sweep=(1.0, 0.8, 0.6, 0.4), kind="noise")
def _sail_guard(ctx, setting):
    margin = validate.finite(1.0 if setting is None else setting, "margin", above=0)
    stop = _guard_stop(ctx, margin)
    if stop is None:  # outside the guard: the metric it serves with by default, at its calibrated threshold
        from .calibration import resolve

        found = resolve(ctx.pipe, GUARD_METRIC, "threshold", num_inference_steps=ctx.num_inference_steps,
                        guidance_scale=ctx.guidance_scale, height=ctx.height, width=ctx.width)
        stop = {"metric": GUARD_METRIC, "threshold": found.value * margin}
    return _sail_plan(ctx, {}, stop=stop)


@register("random_tokens", cost="0", knob="tokens added", default=4, sweep=(1, 2, 4, 8, 16),
          kind="prompt")
def _random_tokens(ctx, setting):
    from .baselines import random_tokens

    if ctx.rows is not None:
        raise BadArgument("random_tokens changes whole prompts; it cannot mitigate single rows")
    g = torch.Generator().manual_seed(1234)
    return Plan(prompts=random_tokens(ctx.pipe, ctx.prompts, int(setting), g))


@register(
    "wen_embedding",
    cost="1 CFG call + 1 backward per AdamW step (at most 50), then the sampler",
    knob="target / initial ||eps_Δ||",
    default=0.5,
    sweep=(0.9, 0.7, 0.5, 0.3, 0.15),
    needs=("cfg", "embeddings_only"),
    kind="prompt",
)
def _wen_embedding(ctx, setting):
    from .baselines import wen_embedding

    if ctx.rows is not None:
        raise BadArgument("wen_embedding changes whole prompts; it cannot mitigate single rows")
    emb, null, info = wen_embedding(ctx.pipe, ctx.prompts, ctx.latents, target_ratio=float(setting),
                                    num_inference_steps=ctx.num_inference_steps, return_info=True)
    return Plan({"prompt_embeds": emb, "negative_prompt_embeds": null}, info={"unet_calls_before": info["unet_calls"]},
                prompts=[])


def transition_setting(setting) -> tuple:
    """(early scale, transition timestep or None for the dynamic point): "s0t500", "s-2t650", "dyn",
    "s-1dyn"; a tuple is taken as it is."""
    import re

    if isinstance(setting, tuple):
        return float(setting[0]), (None if setting[1] is None else float(setting[1]))
    m = re.fullmatch(r"(?:s(-?\d*\.?\d+))?(?:t(\d+)|(dyn))", str(setting))
    if not m:
        raise BadArgument(f"a transition setting looks like s0t500 (scale 0 above t = 500), s-2t650 (opposite "
                          f"guidance -2 above 650) or dyn / s-1dyn (the dynamic transition point), got {setting!r}")
    early = float(m.group(1)) if m.group(1) is not None else (1.0 if m.group(3) else 0.0)
    return early, (float(m.group(2)) if m.group(2) else None)


def _transition_hook(ctx, setting) -> GuidanceHook:
    early, t_switch = transition_setting(setting)
    return GuidanceHook(ctx.model.unet, ctx.guidance_scale, ctx.row_list(), ctx.images,
                        _transition_rule(early, t_switch))


@register("transition", cost="0", knob="early scale s above the transition timestep t (dyn: dynamic point)",
          default="s0t500", sweep=("s0t700", "s0t600", "s0t500", "s0t450", "s0t400", "s0t300", "s-2t650", "s-2t800",
                                   "s-1t600", "s-1t500", "dyn", "s-2dyn"),
          needs=("cfg",), kind="trajectory")
def _transition(ctx, setting):
    hook = _transition_hook(ctx, setting)

    def applied():  # per mitigated row: at least one step ran at the early scale
        steps = hook.state.get("early_steps", 0)
        return (steps > 0).tolist() if torch.is_tensor(steps) else [steps > 0] * len(hook.rows)
    return Plan(hooks=[hook.installed()], info={"applied": applied})


@register("sail+transition", cost="as sail, then 0", knob="transition setting (SAIL k1 s3 lr 0.7)",
          default="s0t500", sweep=("s0t700", "s0t600", "s0t500", "s0t400", "s-2t650"), needs=("cfg",),
          kind="noise+trajectory")
def _sail_transition(ctx, setting):
    return _sail_plan(ctx, {}).merge(_transition(ctx, setting))


def _prompt_lengths(pipe, prompts, n) -> list:
    """Tokens of each image's prompt as the pipeline's tokenizer makes them (BOS and EOS included,
    truncated to its maximum length)."""
    tok = pipe.tokenizer
    out = []
    for p in prompts:
        length = min(len(tok(p).input_ids), tok.model_max_length)
        out.extend([length] * n)
    return out


def _rescale_edit(c1: float, lengths: torch.Tensor, images: int, rows_all: torch.Tensor):
    """Ren et al.'s logits: BOS x c1 on the conditional rows, tokens past the prompt masked on both."""
    def edit(scores, rows):
        # rows index the CFG batch [null (images); cond (images)]; each belongs to image rows % images
        img = rows % images
        keep = torch.arange(scores.shape[-1], device=scores.device)[None, :] < lengths.to(scores.device)[img][:, None]
        cond = (rows >= images)
        s = scores.clone()
        s[cond, ..., 0] = s[cond, ..., 0] * c1
        return s.masked_fill(~keep[:, None, None, :], float("-inf"))
    return edit


@register("attention_rescale", cost="0 (the cross-attention layers of the mitigated rows computed explicitly)",
          knob="c1, the factor on the BOS logit (summary tokens masked)", default=1.25,
          sweep=(1.1, 1.25, 1.5, 2.0, 3.0),
          needs=("cfg", "cross_attention"), kind="trajectory")
def _attention_rescale(ctx, setting):
    from .attention import edit_cross_attention

    c1 = validate.finite(setting, "c1", above=0)
    rows = torch.as_tensor(ctx.row_list(), dtype=torch.long)
    lengths = torch.tensor(_prompt_lengths(ctx.pipe, ctx.prompts, ctx.n))
    batch_rows = torch.cat([rows, rows + ctx.images]).to(ctx.model.device)
    edit = _rescale_edit(c1, lengths, ctx.images, batch_rows)
    calls = [0]

    def counted(scores, r):
        calls[0] += 1
        return edit(scores, r)
    return Plan(hooks=[edit_cross_attention(ctx.model.unet, counted, batch_rows)],
                info={"prompt_lengths": lengths.tolist(), "applied": lambda: [calls[0] > 0] * len(rows)})


def attenuated_positions(attention: torch.Tensor, lengths, z: float) -> list:
    """GUARD's per-prompt test (this instantiation): per row, the positions 1..L-1 whose attention is
    above median + z * 1.4826 MAD of those positions; at least the largest one."""
    out: list = []
    for a, L in zip(attention.float().cpu(), lengths):
        cand = a[1:int(L)]
        if not len(cand):
            out.append([])
            continue
        med = cand.median()
        mad = 1.4826 * (cand - med).abs().median()
        pick = ((cand > med + z * mad) & (mad > 0)).nonzero().view(-1) + 1
        out.append(sorted(set(pick.tolist()) | {int(cand.argmax()) + 1}))
    return out


def _attract_repel_rule(ctx, positions, attenuation: float, repel: float):
    """The guidance rule of attract_repel: one extra call on the mitigated conditional rows with the
    picked positions' logits + log(attenuation), then u + g (a - u) + repel (a - c)."""
    from .attention import edit_cross_attention

    images, rows_all = ctx.images, torch.as_tensor(ctx.row_list(), dtype=torch.long)
    mask = torch.zeros(images, ctx.pipe.tokenizer.model_max_length)
    for r, pos in zip(rows_all.tolist(), positions):
        mask[r, pos] = 1.0
    log_att = math.log(attenuation)

    def edit(scores, sub):  # the extra call's batch: row i is image rows_all[i]
        m = mask.to(scores.device)[rows_all.to(scores.device)[sub]][:, None, None, : scores.shape[-1]]
        return scores + m.to(scores.dtype) * log_att

    def rule(hook, u, c, t, args, kwargs, rows):
        sample, timestep, hidden, added = ctx.model.read_call(args, kwargs)
        cond_rows = rows + images
        hook.inside = True
        try:
            with edit_cross_attention(hook.net, edit, None), torch.no_grad():
                a = ctx.model.call(sample[cond_rows], timestep, hidden[cond_rows],
                                   None if added is None else {k: v[cond_rows] for k, v in added.items()}).float()
        finally:
            hook.inside = False
        hook.state["extra_rows"] = hook.state.get("extra_rows", 0) + len(rows)
        return u + hook.g * (a - u) + repel * (a - c)

    return rule


def attract_repel_setting(setting) -> tuple:
    """(repel, attenuation, z): "r1", "r1a0.1", "r1a0.1z2"; a tuple is taken as it is."""
    import re

    if isinstance(setting, tuple):
        return tuple(float(v) for v in setting)
    num = r"(\d*\.?\d+(?:e-?\d+)?)"
    m = re.fullmatch(rf"r{num}(?:a{num})?(?:z{num})?", str(setting))
    if not m:
        raise BadArgument(f"an attract_repel setting looks like r1 (repel 1), r1a0.1 (attenuation 0.1) or "
                          f"r1a0.1z2 (z 2), got {setting!r}")
    return float(m.group(1)), float(m.group(2) or 0.1), float(m.group(3) or 2.0)


@register("attract_repel", cost="0.5 CFG call per step (the attenuated conditional prediction) + 0.5 at step 1",
          knob="repel scale r (attenuation a, test z)", default="r1", sweep=("r0", "r0.5", "r1", "r2", "r1a0.01"),
          needs=("cfg", "cross_attention"), kind="trajectory")
def _attract_repel(ctx, setting):
    from .attention import record_cross_attention

    repel, attenuation, z = attract_repel_setting(setting)
    validate.finite(attenuation, "attenuation", above=0)
    rows = ctx.row_list()
    model = ctx.model
    sched = model.scheduler(ctx.num_inference_steps, ctx.height, ctx.width)
    t0 = sched.timesteps[0]
    with torch.no_grad():
        cond = model.encode(ctx.prompts, ctx.n, ctx.height, ctx.width, ctx.guidance_scale)
        x = sched.scale_model_input(ctx.latents.to(model.device, model.dtype) * sched.init_noise_sigma, t0)
        with record_cross_attention(model.unet) as rec:
            model.predict_branch(x[rows], t0, cond.rows(rows), "cond")
    lengths = _prompt_lengths(ctx.pipe, ctx.prompts, ctx.n)
    positions = attenuated_positions(rec.token_attention(), [lengths[r] for r in rows], z)
    hook = GuidanceHook(model.unet, ctx.guidance_scale, rows, ctx.images,
                        _attract_repel_rule(ctx, positions, attenuation, repel))
    return Plan(hooks=[hook.installed()], info={"attenuated_positions": positions,
                                                "applied": lambda: [hook.state.get("extra_rows", 0) > 0] * len(rows),
                                                "unet_calls_before": 0.5 * len(rows) / max(ctx.images, 1)})


# ---- in the serving guard: a plan for the flagged rows, and its check ----------------------------

_GUARD_NOISE = {"sail": 1.0, "sail_alpha": 1.0, "sail_guard": None, "sail+transition": 1.0}


def guard_plan(m: Mitigation, ctx: Context, setting, sail_kwargs: dict):
    """(plan, checker) of mitigation m on the flagged rows of a guarded request; checker() ->
    per prompt (mitigated, check) after the generation."""
    if ctx.guard is None:
        raise BadArgument("guard_plan needs the guard's metric and threshold in ctx.guard")
    metric, thr = ctx.guard["metric"], float(ctx.guard["threshold"])
    if m.kind.startswith("noise"):
        if m.name not in _GUARD_NOISE:
            raise BadArgument(f"{m.name!r} cannot stop on the guard's metric; use one of {', '.join(_GUARD_NOISE)}")
        margin = _GUARD_NOISE[m.name] or validate.finite(1.0 if setting is None else setting, "margin", above=0)
        options = {**(sail_setting(setting) if m.name == "sail_alpha" else {}), **sail_kwargs}
        plan = _sail_plan(ctx, options, stop={"metric": metric, "threshold": thr * margin})
        if m.name == "sail+transition":
            plan = plan.merge(_transition(ctx, setting))
    else:
        plan = m.plan(ctx, setting)
    rows, n = ctx.row_list(), ctx.n

    def checker():
        out = [(False, "not flagged")] * len(ctx.prompts)
        applied = plan.info.get("applied")
        done = applied() if applied is not None else None
        for k, p in enumerate(sorted({r // n for r in rows})):
            notes, ok = [], True
            if "sail" in plan.info:
                stat = plan.info["sail"]["final_statistic"][k * n:(k + 1) * n].float().mean().item()
                under = stat <= thr
                notes.append(f"{metric} {stat:.4g} {'<=' if under else '>'} {thr:.4g} at the new initial noise")
                ok = under
            if done is not None:
                mine = [bool(done[rows.index(r)]) for r in range(p * n, p * n + n)]
                notes.append(f"{m.name if m.kind != 'noise+trajectory' else 'transition'} "
                             f"{'applied' if all(mine) else 'not applied'} to its {n} image(s)")
                ok = all(mine) if "sail" not in plan.info else (ok or all(mine))
            out[p] = (ok, "; ".join(notes))
        return out

    return plan, checker


# ---- running a plan --------------------------------------------------------------------------------

def run_plan(pipe, prompts, plan: Plan, call_kwargs: dict):
    """pipe(...) with the plan's arguments, under its hooks (all removed afterwards)."""
    kw = {**call_kwargs, **plan.kwargs}
    with contextlib.ExitStack() as stack:
        for h in plan.hooks:
            stack.enter_context(h)
        if "prompt_embeds" in plan.kwargs:
            return pipe(**kw)
        return pipe(plan.prompts if plan.prompts is not None else prompts, **kw)


def generator_states(gens):
    """The states of a generator or a list of them (None: None), to replay their draws."""
    if gens is None:
        return None
    return [g.get_state() for g in (gens if isinstance(gens, list) else [gens])]


def restore_generators(gens, states) -> None:
    """Put generators back to states from generator_states."""
    if gens is not None:
        for g, st in zip(gens if isinstance(gens, list) else [gens], states):
            g.set_state(st)


def regenerate(m: Mitigation, ctx: Context, setting, sail_kwargs: dict, call_kwargs: dict, on_planned=None):
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


def mitigate(pipe, prompt, method: str = "transition", setting=None, *, num_images_per_prompt: int = 1,
             generator=None, latents=None, return_info: bool = False, **pipe_kwargs):
    """Generate with one registered mitigation (see sharpfast.mitigations.REGISTRY).

    Args:
        pipe: a supported diffusers pipeline (left as it was).
        prompt: a prompt or a list of prompts.
        method: a registry name ("sail", "transition", "attention_rescale", "attract_repel",
            "sail+transition", "wen_embedding", "random_tokens", ...).
        setting: the method's main knob (default: the registry's default; see each method's
            `knob`), e.g. "s0t500" for transition, 1.25 for attention_rescale.
        num_images_per_prompt: images per prompt, as for `pipe(...)`.
        generator: as for `pipe(...)`: the initial noise is the one the pipeline would draw.
        latents: or that noise given, as `pipe(latents=...)` takes it.
        return_info: also return what the method did (info dict: method, setting, seconds, UNet
            calls per image, and the method's own fields).
        **pipe_kwargs: the rest of the pipeline call (num_inference_steps, guidance_scale,
            height, width, output_type, ...).

    Returns:
        The pipeline's own output, or (output, info) with return_info=True.

    Raises:
        BadArgument: an unknown method or a bad setting or argument.
        UnsupportedPipeline: the method is not defined for this model family.
        NonFiniteOutput: the model returned NaN/inf while the method optimized.
    """
    from .score import ScoreModel

    start = time.perf_counter()
    m = get(method)
    model = ScoreModel(pipe)
    check_family(m, model)
    prompts = validate.prompts(prompt, "prompt")
    n = validate.integer(num_images_per_prompt, "num_images_per_prompt")
    ctx = _context(pipe, model, m, prompts, n, generator, latents, pipe_kwargs)
    setting = m.default if setting is None else setting
    plan = m.plan(ctx, setting)
    calls = _Counter(model.unet)
    with calls:
        out = run_plan(pipe, prompts, plan, {**pipe_kwargs, "num_images_per_prompt": n, "generator": generator,
                                             "latents": plan.kwargs.get("latents", ctx.latents)})
    if not return_info:
        return out
    info = {"method": method, "setting": setting, "seconds": time.perf_counter() - start,
            "unet_calls_per_image": calls.rows / (2 * ctx.images) + plan.info.get("unet_calls_before", 0),
            **{k: v for k, v in plan.info.items() if k != "applied"}}
    return out, info


def _context(pipe, model, m, prompts, n, generator, latents, pipe_kwargs) -> Context:
    """The call's Context: its settings (the pipeline's defaults filled in) and initial noise."""
    from .score import pipeline_defaults

    defaults = pipeline_defaults(pipe)
    steps = pipe_kwargs.get("num_inference_steps") or defaults["num_inference_steps"]
    guidance = pipe_kwargs.get("guidance_scale", defaults["guidance_scale"])
    validate.guidance_scale(guidance, needs_cfg=m.kind != "none" and not model.distilled)
    validate.generators(generator, len(prompts) * n)
    dh, dw = model.default_size()
    height, width = pipe_kwargs.get("height") or dh, pipe_kwargs.get("width") or dw
    shape = (len(prompts) * n, *model.latent_shape(height, width))
    if latents is None:  # the draw pipe(...) would make; the call then gets it as latents=
        latents = model.noise(shape[0], height, width, generator)
    elif not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
        raise BadArgument(f"latents must be a tensor of shape {shape}, got "
                          f"{tuple(getattr(latents, 'shape', ())) or type(latents).__name__}")
    return Context(pipe, model, prompts, n, latents.to(model.device), height, width, steps, guidance, generator)


class _Counter:
    """Rows through the denoiser inside the block (its own hook: other hooks' calls count too)."""

    def __init__(self, net):
        self.net, self.rows = net, 0

    def __enter__(self):
        def pre(module, args, kwargs):
            s = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            self.rows += int(s.shape[0])
        self.h = self.net.register_forward_pre_hook(pre, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.h.remove()


METHODS = tuple(REGISTRY)
