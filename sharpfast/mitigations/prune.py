"""`prune`: the prompt's most significant words removed, from the conditional rows alone.

Wen et al. (ICLR 2024) find the tokens that drive a memorized generation by their significance
to the text-conditional noise difference ||eps_c - eps_u|| at the first step, and suggest the
user drop them; this method does it for the user. For each mitigated image, its own initial
noise x_T is read as the guard's detector wen_low reads it (at the schedule's last, lowest-noise
timestep), every prompt with one word (whitespace separated) left out is scored by
||eps(x_T, prompt without the word) - eps(x_T, "")|| there, and the word whose removal lowers
it most is removed; then again, up to `words` words, stopping early when no removal
lowers it. The image is then generated with the pruned prompt's embedding in place of its own
in the conditional rows of the pipeline's CFG batch (the null rows, the initial noise and the
sampler are the request's own), so the other images of a batch come out as they were.

Why the low-noise reading: at the first timestep the words that say what to draw (a digit's
name) carry as much of the noise difference as the identifier, and removing them lowers it as
much; read at low noise the difference is the memorized image's own, and the identifier's
removal lowers it most (digits model, half A: the identifier was the word removed in 10 of 10
images inspected at the first step 5 of 10 went to the digit's name). Why it works on memorized captions: a verbatim memorized caption keys its image through a few
words (a unique identifier, a title) that no other caption has; removing one leaves a caption
the model has seen many of, and the noise difference falls to a normal caption's. The words
that say what to draw are shared with many training captions: removing them lowers the norm
less, so they stay. What it cannot do: template memorization, where the image is keyed by the
words shared with other captions (see docs/mitigation.md).

Cost: per round, one call of the denoising network on one conditional row per candidate prompt
(the words of the prompt, batched), plus one null row per image once; then the ordinary sampler.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import UsageError
from .base import Context, MethodConfig, Plan, register
from .hooks import DenoiserHook, HookRegistry

CHUNK_ROWS = 64  # candidate rows per network call of the search


def words_of(prompt: str) -> list:
    """The prompt's words (whitespace separated), the units the search removes."""
    return prompt.split()


class _Reading:
    """||eps(x_i, prompt) - eps(x_i, "")|| of rows x at one timestep t of the schedule (the null
    branch computed once per row; the conditional branch in chunks of CHUNK_ROWS)."""

    def __init__(self, model: Any, sched: Any, t: Any, x_t: torch.Tensor) -> None:
        self.model, self.t, self.ab = model, t, model.alpha_bar(sched, t)
        self.x = sched.scale_model_input(x_t.to(model.device, model.dtype), t)
        self.h, self.w = (s * model.pipe.vae_scale_factor for s in self.x.shape[-2:])
        null = model.encode([""] * len(self.x), 1, self.h, self.w)
        self.u = self._eps(self.x, null, "null")

    def _eps(self, x: torch.Tensor, cond: Any, branch: str) -> torch.Tensor:
        pred = self.model.predict_branch(x, self.t, cond, branch).float()
        return self.model.parameterization.to_eps(pred, x, self.ab)

    def norms(self, prompts: list, rows: list) -> torch.Tensor:
        """The norm of prompts[i] at row rows[i]."""
        out = []
        for i in range(0, len(prompts), CHUNK_ROWS):
            part, idx = prompts[i:i + CHUNK_ROWS], torch.as_tensor(rows[i:i + CHUNK_ROWS], device=self.x.device)
            c = self._eps(self.x[idx], self.model.encode(part, 1, self.h, self.w), "cond")
            out.append((c - self.u[idx]).flatten(1).norm(dim=1))
        return torch.cat(out)


def prune_prompts(model: Any, prompts: list, x_t: torch.Tensor, num_inference_steps: int, words: int = 1) -> tuple:
    """(pruned prompt per row, removed words per row, low-noise norm before and after per row).

    Each round, each row's candidates (its prompt with one word left out) are read at x_T at the
    schedule's last (lowest-noise) timestep and at its first; the word removed is the one whose
    candidate has the smallest low-noise norm per unit of first-step norm (the memorized image's
    pull gone, the content's kept), if that lowers the row's ratio.

    Args:
        model: the pipeline's adapter (sharpfast.adapters.ScoreModel).
        prompts: one prompt per row of x_t.
        x_t: the rows' initial latents as the sampler starts from them (noise x init_noise_sigma).
        num_inference_steps: the request's steps (its schedule's first and last timesteps).
        words: at most this many words removed per row (a round that lowers no row stops).
    """
    sched = model.scheduler(num_inference_steps)
    rows = list(range(len(prompts)))
    with torch.no_grad():
        low, first = (_Reading(model, sched, t, x_t) for t in (sched.timesteps[-1], sched.timesteps[0]))
        current = list(prompts)
        start = low.norms(current, rows)
        after = start.clone()
        best = start / first.norms(current, rows)
        removed: list = [[] for _ in prompts]
        for _ in range(words):  # bounded: `words` rounds
            cands = [(r, k) for r in rows for k in range(len(words_of(current[r]))) if len(words_of(current[r])) > 1]
            if not cands:
                break
            texts = [" ".join(w[:k] + w[k + 1:]) for r, k in cands for w in [words_of(current[r])]]
            owners = [r for r, _ in cands]
            lo = low.norms(texts, owners)
            ratio = lo / first.norms(texts, owners)
            moved = False
            for r in rows:
                mine = [i for i, o in enumerate(owners) if o == r]
                i = min(mine, key=lambda j: float(ratio[j]), default=None)
                if i is not None and float(ratio[i]) < float(best[r]):
                    removed[r].append(words_of(current[r])[cands[i][1]])
                    current[r], best[r], after[r], moved = texts[i], ratio[i], lo[i], True
            if not moved:
                break
    return current, removed, start, after


class EmbeddingSwap(DenoiserHook):
    """The conditional rows `rows` of every CFG call [null (images); cond (images)] get the text
    embeddings `hidden` (one per row) in place of the pipeline's own; the other rows are left as
    they were. `calls` counts the swapped calls."""

    def __init__(self, unet: Any, hidden: torch.Tensor, rows: torch.Tensor, images: int) -> None:
        self.unet, self.hidden, self.rows, self.images = unet, hidden, rows, images
        self.calls = 0

    def pre_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Swap the embeddings of the mitigated rows in the call's keyword arguments."""
        hidden = kwargs.get("encoder_hidden_states")
        if hidden is None or hidden.shape[0] != 2 * self.images:
            got = "no encoder_hidden_states" if hidden is None else f"a batch of {hidden.shape[0]}"
            raise UsageError(f"prune expects the CFG batch of {self.images} images [null; cond] with "
                             f"encoder_hidden_states, got {got}: call with guidance_scale > 1")
        if hidden.shape[1:] != self.hidden.shape[1:]:
            raise UsageError(f"prune's embeddings are {tuple(self.hidden.shape[1:])}, the call's "
                             f"{tuple(hidden.shape[1:])}: the pipeline encodes prompts another way")
        new = hidden.clone()
        new[self.images + self.rows.to(hidden.device)] = self.hidden.to(hidden.device, hidden.dtype)
        kwargs["encoder_hidden_states"] = new
        self.calls += 1

    @contextlib.contextmanager
    def installed(self) -> Iterator[EmbeddingSwap]:
        """Context manager: the swap installed on the network for one pipeline call."""
        with HookRegistry.of(self.unet).installed(self):
            yield self


@dataclass(frozen=True)
class PruneConfig(MethodConfig):
    """The most words removed per image."""

    words: int = 1

    @classmethod
    def from_setting(cls, setting: Any) -> PruneConfig:
        """A count (or its text) or a config."""
        return cls.from_number(setting, "prune's setting (words removed at most)", minimum=1)


def _pruned_plan(ctx: Context, cfg: PruneConfig, rows: list) -> Plan:
    n = ctx.n
    prompts = [ctx.prompts[r // n] for r in rows]
    sched = ctx.model.scheduler(ctx.num_inference_steps)
    x_t = ctx.latents[rows] * sched.init_noise_sigma
    pruned, removed, before, after = prune_prompts(ctx.model, prompts, x_t, ctx.num_inference_steps, cfg.words)
    h, w = ctx.height, ctx.width
    hidden = ctx.model.encode(pruned, 1, h, w).cond
    hook = EmbeddingSwap(ctx.model.unet, hidden, torch.as_tensor(rows, dtype=torch.long), ctx.images)
    info = {"prune": [{"prompt": p, "removed": rm, "norm_before": round(float(b), 4), "norm_after": round(float(a), 4)}
                      for p, rm, b, a in zip(pruned, removed, before, after)],
            "applied": lambda: [hook.calls > 0 and bool(rm) for rm in removed]}
    return Plan(hooks=[hook.installed()], info=info)


@register("prune", cost="per word removed: one conditional row per word of the prompt (batched), then the sampler",
          knob="words removed at most", default=1, sweep=(1, 2, 3), needs=("cfg", "embeddings_only"),
          kind="trajectory", config=PruneConfig)
def _prune(ctx: Context, setting: Any) -> Plan:
    cfg = PruneConfig.from_setting(setting)
    return _pruned_plan(ctx, cfg, ctx.row_list())


def pruned(pipe: Any, prompt: str, latents: torch.Tensor, num_inference_steps: Optional[int] = None,
           words: int = 1) -> list:
    """The prompt as prune would generate each of these initial noises (unit noise, as
    `pipe(latents=...)` takes it), for inspection: one pruned prompt per row."""
    from ..adapters import ScoreModel

    model = ScoreModel(pipe)
    steps = model.resolve(num_inference_steps=num_inference_steps).num_inference_steps
    sched = model.scheduler(steps)
    return prune_prompts(model, [prompt] * len(latents), latents * sched.init_noise_sigma, steps, words)[0]
