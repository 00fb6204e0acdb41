"""What an ideal mitigation could keep on the digits model: each memorized caption with its
identifier phrase removed by hand (", archive card 0657", " - scan 0657 of the postal set",
" (item #0657)": the templates of sharpfast.zoo.digits_data.UNIQUE), generated from the same
initial noises as the caption itself and judged as `sharpfast eval guard` judges (copies: the
nearest training image is the caption's own at similarity >= 0.8; fidelity: the digit
classifier names the prompted digit).

No inference-time method knows which words are the identifier; this is the bound such a method
works under: the outputs that stop copying are the model's generic drawings of the digit, right
as often as the normal prompts' are. Rerun:

    python benchmarks/identifier_oracle.py --half B --seeds 4
"""
from __future__ import annotations

import argparse
import json
import re

import numpy as np
import torch

from sharpfast import zoo
from sharpfast.harness import mitigate_eval

SUFFIX = re.compile(r"(, archive card \d{4}| - scan \d{4} of the postal set| \(item #\d{4}\))$")


def base_caption(caption: str) -> str:
    """The caption without its identifier phrase (ValueError if it has none)."""
    out = SUFFIX.sub("", caption)
    if out == caption:
        raise ValueError(f"no identifier phrase in {caption!r}")
    return out


def judged(pipe, judge, records: list, captions: list, seeds: list) -> tuple:
    """(copies, fidelity) per image, prompt-major (copies False for a record without a training image)."""
    copies, fid = [], []
    for r, cap in zip(records, captions):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        im = pipe([cap] * len(seeds), num_inference_steps=50, guidance_scale=7.5, generator=gens,
                  output_type="pt").images.float() * 2 - 1
        c = judge.copy_stats(im, r["train_index"])[0] if r.get("train_index") is not None else [False] * len(seeds)
        copies += [bool(v) for v in c]
        fid += [float(v) for v in np.asarray(judge.fidelity(im, [r] * len(seeds)))]
    return np.array(copies), np.array(fid)


def digits_half(half: str) -> tuple:
    """(pipe, judge, memorized records, normal records) of the digits model's half A or B."""
    pipe = zoo.load("digits")
    pipe.set_progress_bar_config(disable=True)
    judge = zoo.judge("digits", pipe)
    recs = mitigate_eval.halves(zoo.prompts("digits", "memorized"))[half]
    normal = mitigate_eval.halves(zoo.prompts("digits", "non_memorized"))[half]
    return pipe, judge, recs, normal


def half_args(doc: str, argv, half: str, seeds: int, out: bool = False) -> argparse.Namespace:
    """The digits benchmarks' command line: --half, --seeds (and --out, a JSON file to write)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--half", default=half, choices=("A", "B"))
    ap.add_argument("--seeds", type=int, default=seeds)
    if out:
        ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    a = half_args(__doc__, argv, "B", 4)
    pipe, judge, recs, normal = digits_half(a.half)
    seeds = list(range(a.seeds))
    pc, pf = judged(pipe, judge, recs, [r["prompt"] for r in recs], seeds)
    oc, of = judged(pipe, judge, recs, [base_caption(r["prompt"]) for r in recs], seeds)
    _, nf = judged(pipe, judge, normal, [r["prompt"] for r in normal], seeds)
    out = {"half": a.half, "seeds": a.seeds, "memorized_images": int(len(pc)), "normal_images": int(len(nf)),
           "plain": {"copies_at_0.8": float(pc.mean()), "fidelity": float(pf.mean())},
           "identifier_removed": {"copies_at_0.8": float(oc.mean()), "fidelity": float(of.mean()),
                                  "fidelity_ratio": float(of.mean() / pf.mean())},
           "normal_plain_fidelity": float(nf.mean())}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
