"""`random_tokens`: Somepalli et al.'s mitigation: each prompt with random vocabulary tokens
appended (space separated). Changes whole prompts; zero extra UNet calls."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import BadArgument
from .base import Context, MethodConfig, Plan, register


def _vocab_words(tokenizer: Any) -> list[str]:
    special = set(tokenizer.all_special_tokens)
    words = set()
    for tok, idx in tokenizer.get_vocab().items():
        if tok in special:
            continue
        w = tokenizer.decode([idx]).strip()
        if re.fullmatch(r"[a-z0-9]+", w):
            words.add(w)
    if not words:
        raise BadArgument("the tokenizer has no alphanumeric tokens to draw random tokens from")
    return sorted(words)


def random_tokens(pipe: Any, prompts: list, num_tokens: int = 4, generator: torch.Generator | None = None) -> list[str]:
    """Each prompt with `num_tokens` random vocabulary tokens appended (space separated)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if num_tokens < 0:
        raise BadArgument(f"num_tokens must be >= 0, got {num_tokens}")
    words = _vocab_words(pipe.tokenizer)
    g = generator or torch.Generator().manual_seed(0)
    out = []
    for p in prompts:
        pick = torch.randint(len(words), (num_tokens,), generator=g).tolist()
        out.append(" ".join([p, *(words[i] for i in pick)]))
    return out



@dataclass(frozen=True)
class RandomTokensConfig(MethodConfig):
    """Somepalli et al.'s knob: the random tokens appended."""

    tokens: int = 4

    @classmethod
    def from_setting(cls, setting: Any) -> RandomTokensConfig:
        """A count (or its text) or a config."""
        return cls.from_number(setting, "random_tokens' setting (tokens added)", minimum=0)


@register("random_tokens", cost="0", knob="tokens added", default=4, sweep=(1, 2, 4, 8, 16),
          kind="prompt", config=RandomTokensConfig)
def _random_tokens(ctx: Context, setting: Any) -> Plan:
    if ctx.rows is not None:
        raise BadArgument("random_tokens changes whole prompts; it cannot mitigate single rows")
    tokens = RandomTokensConfig.from_setting(setting).tokens
    g = torch.Generator().manual_seed(1234)
    return Plan(prompts=random_tokens(ctx.pipe, ctx.prompts, tokens, g))
