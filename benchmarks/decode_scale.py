"""The digits decode-scale fix, measured: the same sampled latents decoded at diffusers' default
0.18215 (what the shipped config held until 2026-12-05) and at the scale the UNet was trained at
(one over the spread of the VAE's latent means of the digit images), judged as `sharpfast eval
guard` judges (copies: the nearest training image is the caption's own at similarity >= 0.8;
fidelity: the digit classifier names the prompted digit). Rerun:

    python benchmarks/decode_scale.py --half A --seeds 2
"""
from __future__ import annotations

import json

import numpy as np
import torch
from identifier_oracle import base_caption, digits_half, half_args

from sharpfast.zoo.digits_data import build

OLD_SCALE = 0.18215


def main(argv=None) -> dict:
    a = half_args(__doc__, argv, "A", 2)
    pipe, judge, memorized, normal = digits_half(a.half)
    with torch.no_grad():
        trained = 1.0 / torch.cat([pipe.vae.encode(x).latent_dist.mean for x in build().images.split(512)]).std().item()
    seeds = list(range(a.seeds))
    sets = {"memorized": memorized, "normal": normal}
    out: dict = {"half": a.half, "seeds": a.seeds, "trained_scale": trained, "rows": []}
    for name, recs in sets.items():
        variants = {"plain": [r["prompt"] for r in recs]}
        if name == "memorized":
            variants["identifier removed"] = [base_caption(r["prompt"]) for r in recs]
        for variant, caps in variants.items():
            gens = [torch.Generator().manual_seed(s) for _ in caps for s in seeds]
            z = pipe([c for c in caps for _ in seeds], num_inference_steps=50, guidance_scale=7.5, generator=gens,
                     output_type="latent").images
            per_image = [r for r in recs for _ in seeds]
            for scale in (OLD_SCALE, trained):
                with torch.no_grad():
                    im = pipe.vae.decode(z / scale).sample.clamp(-1, 1).float()
                fid = float(np.mean(judge.fidelity(im, per_image)))
                if name == "memorized":
                    copies = judge.copy_stats(im, torch.tensor([r["train_index"] for r in per_image]))[0]
                else:
                    copies = judge.copies_any(im)[0]
                out["rows"].append({"prompts": name, "captions": variant, "scale": round(scale, 5),
                                    "fidelity": round(fid, 4), "copies_at_0.8": round(float(copies.float().mean()), 4)})
                print(json.dumps(out["rows"][-1]), flush=True)
    return out


if __name__ == "__main__":
    main()
