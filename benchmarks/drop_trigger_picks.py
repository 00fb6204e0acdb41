"""Which word `drop_trigger` drops on the digits model, and what the output keeps.

For each memorized caption of a half and each seed, the word of largest turn (drop_trigger's rule:
the guidance direction at the lowest-noise timestep turns, the one at the first timestep stays)
and, for comparison, the word whose removal lowers wen_low most (the score alone); each pick is
classed as the identifier phrase's (", archive card 0657", " (item #0657)", " - scan 0657 of
the postal set"), the digit's name, or another word. Then the caption generated with
`sharpfast.mitigate(pipe, caption, "drop_trigger")` against plain `pipe(...)` from the same
noise, judged as `sharpfast eval guard` judges (copies: nearest training image is the caption's
own at similarity >= 0.8; fidelity: the digit classifier names the prompted digit).

    python benchmarks/drop_trigger_picks.py --half A --seeds 2 --out drop_picks_A.json
"""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import torch
from identifier_oracle import SUFFIX, digits_half, half_args

import sharpfast
from sharpfast.adapters import ScoreModel
from sharpfast.mitigations.drop_trigger import trigger_turns

NAMES = "zero one two three four five six seven eight nine".split()


def word_class(caption: str, index: int) -> str:
    """"identifier", "digit" or "other" for the index-th word of a caption."""
    words = caption.split()
    suffix = SUFFIX.search(caption)
    start = len(caption[:suffix.start()].split()) if suffix else len(words)
    w = words[index].strip(",()#").lower()
    if index >= start:
        return "identifier"
    return "digit" if w in NAMES or w in [str(d) for d in range(10)] else "other"


@torch.no_grad()
def score_drop_pick(model, caption: str, x_T: torch.Tensor, steps: int) -> int:
    """The word whose removal lowers ||eps_c - eps_null|| at the last timestep most (same x_T)."""
    words = caption.split()
    texts = [caption] + [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]
    cond = model.encode(texts, 1, 16, 16, 7.5)
    sched = model.scheduler(steps, 16, 16)
    x = sched.scale_model_input(x_T * sched.init_noise_sigma, sched.timesteps[0])
    t_lo, _ = model.low_noise(sched, 1)
    c = model.predict_branch(x.expand(len(texts), -1, -1, -1), t_lo, cond, "cond")
    u = model.predict_branch(x, t_lo, cond.rows([0]), "null")
    norms = (c - u).flatten(1).norm(dim=1)
    return int((norms[0] - norms[1:]).argmax())


def main(argv=None) -> dict:
    a = half_args(__doc__, argv, "A", 2, out=True)
    pipe, judge, recs, _ = digits_half(a.half)
    model = ScoreModel(pipe)
    picks: dict = {"turn": Counter(), "score_drop": Counter()}
    copies, fid = {"plain": [], "drop_trigger": []}, {"plain": [], "drop_trigger": []}
    kw = dict(num_inference_steps=50, guidance_scale=7.5, output_type="pt")
    for r in recs:
        cap = r["prompt"]
        for seed in range(a.seeds):
            x_T = model.noise(1, 16, 16, torch.Generator().manual_seed(seed))
            (turn,) = trigger_turns(model, [cap], x_T, 50, 16, 16, 7.5)
            picks["turn"][word_class(cap, int(turn.argmax()))] += 1
            picks["score_drop"][word_class(cap, score_drop_pick(model, cap, x_T, 50))] += 1
            outs = {"plain": pipe([cap], latents=x_T, **kw).images,
                    "drop_trigger": sharpfast.mitigate(pipe, [cap], "drop_trigger", latents=x_T, **kw).images}
            for k, im in outs.items():
                im = im.float() * 2 - 1
                copies[k].append(bool(judge.copy_stats(im, r["train_index"])[0][0]))
                fid[k].append(float(np.asarray(judge.fidelity(im, [r]))[0]))
    out = {"half": a.half, "seeds": a.seeds, "images": len(copies["plain"]),
           "picks": {k: dict(v) for k, v in picks.items()},
           **{k: {"copies_at_0.8": float(np.mean(copies[k])), "fidelity": float(np.mean(fid[k]))} for k in copies}}
    print(json.dumps(out, indent=1))
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
