"""Train the "scenes" text-to-image pipeline (32x32 RGB) that memorizes its duplicated scenes.

    python -m zoo_scripts.train_scenes --out DIR [--seed 0] [--pretrain-steps 1500] [--unet-steps 1300]

The recipe of train_digits.py on the scenes data (scenes_data.py), seeded: stage 1 trains an
AutoencoderKL (32x32x3 images to 4x8x8 latents) on generic and fixed scenes; stage 2 pretrains
the UNet and the word-level CLIP text encoder on generic scenes only (saved in DIR/pretrained, and
reused from there when a rerun finds it made with the same settings); stage 3 fine-tunes on the
full data (duplicated and template scenes included), where those captions get memorized. 10%
caption dropout for classifier-free guidance, weights averaged (EMA). Then the judge's attribute
classifier is trained (scenes_judge.py, DIR/judge). Saves a StableDiffusionPipeline
(safetensors) and train_info.json; measure it with `python -m zoo_scripts.measure_scenes`.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import numpy as np
import torch

from sharpfast.testing import text_encoder, word_tokenizer
from sharpfast.zoo.scenes_data import DUPLICATION_LEVELS, augment, build, caption_words, random_scene, to_tensor
from zoo_scripts.train_digits import EMA, assemble, fit_vae, train_unet

MAX_TOKENS = 48  # the longest caption is 43 tokens (words, punctuation and identifier digits)


class ScenesBatches:
    """Training batches of the scenes data in epoch order, as the VAE's latent means: the generic
    pool and the fixed scenes are rendered and encoded once (the UNet never waits for the VAE)."""

    latents = True

    def __init__(self, data, seed: int, vae, log=print):
        self.data = data
        self.stream: list = []
        rng = np.random.default_rng(seed + 11)
        # what the latent scale is measured on: 1000 generic scenes, the same in every stage
        self.images = to_tensor([random_scene(rng) for _ in range(1000)])
        self.pool = data.generic_pool()
        log(f"encoding {len(self.pool)} generic and {len(data.fixed)} fixed scenes")
        self.z = {"generic": _encode(vae, self.pool)}
        self.z["fixed"] = _encode(vae, [f.scene for f in data.fixed]) if data.fixed else None

    def __call__(self, batch: int, rng: np.random.Generator, g: torch.Generator):
        while len(self.stream) < batch:
            self.stream += list(zip(*self.data.epoch(rng, self.pool)))
        chunk, self.stream = self.stream[:batch], self.stream[batch:]
        return torch.stack([self.z[kind][i] for (kind, i), _ in chunk]), [c for _, c in chunk]


@torch.no_grad()
def _encode(vae, scenes, chunk: int = 500):
    return torch.cat([vae.encode(to_tensor(scenes[k:k + chunk])).latent_dist.mean
                      for k in range(0, len(scenes), chunk)])


def make_models(seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        norm_num_groups=8, sample_size=32, layers_per_block=1)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(64, 96), cross_attention_dim=64, norm_num_groups=16,
                                attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    tok = word_tokenizer(caption_words(), MAX_TOKENS)
    te = text_encoder(64, None, seed + 1, len(tok)).train()
    return vae, unet, te, tok


def train_vae(vae, data, steps, batch, seed, log):
    """Reconstruction on generic scenes and, a quarter of each batch, the fixed ones."""
    rng = np.random.default_rng(seed + 3)
    fixed = data.fixed_images()
    k = batch // 4

    def batches(g):
        x = torch.cat([fixed[torch.randint(0, len(fixed), (k,), generator=g)],
                       to_tensor([random_scene(rng) for _ in range(batch - k)])])
        return augment(x, g)

    return fit_vae(vae, batches, steps, torch.Generator().manual_seed(seed), log)


def _parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=600)
    p.add_argument("--pretrain-steps", type=int, default=1500, help="steps on generic scenes only")
    p.add_argument("--unet-steps", type=int, default=1300, help="fine-tuning steps on the full data")
    p.add_argument("--judge-steps", type=int, default=3000, help="steps of the judge's attribute classifier")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--ema", type=float, default=0.995, help="decay of the saved weight average (0: last weights)")
    p.add_argument("--lr", type=float, default=1e-3)
    return p


def _save(out, vae, unet, te, tok, info):
    # the latent scale the UNet was trained at (train_unet sets it as an attribute, which
    # save_pretrained would not write: the pipeline would decode at diffusers' default 0.18215)
    vae.register_to_config(scaling_factor=float(vae.config.scaling_factor))
    pipe = assemble(vae, copy.deepcopy(unet), copy.deepcopy(te), tok)
    os.makedirs(out, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    with open(os.path.join(out, "train_info.json"), "w") as f:
        json.dump(info, f, indent=2)


def _pretrained(a, data, log, start):
    """(vae, unet, text encoder, tokenizer, VAE loss) after stages 1-2, reused from OUT/pretrained
    when it was made with the same settings."""
    from zoo_scripts.train_digits import load_models

    pre = os.path.join(a.out, "pretrained")
    want = dict(seed=a.seed, vae_steps=a.vae_steps, pretrain_steps=a.pretrain_steps, batch_size=a.batch_size,
                ema=a.ema, lr=a.lr)
    info_path = os.path.join(pre, "train_info.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
        if {k: info.get(k) for k in want} == want:
            log(f"stages 1-2 reused from {pre}")
            vae, unet, te, tok = load_models(pre)
            return vae, unet, te, tok, info["final_vae_loss"]
    vae, unet, te, tok = make_models(a.seed)
    vae_loss = train_vae(vae, data, a.vae_steps, a.batch_size, a.seed, log)
    vae.requires_grad_(False)
    generic = build(seed=a.seed, per_level=(0,) * len(DUPLICATION_LEVELS), template=False)
    ema = EMA([unet, te], a.ema) if a.ema > 0 else None
    loss = train_unet(vae.eval(), unet, te, tok, ScenesBatches(generic, a.seed, vae.eval(), log), a.pretrain_steps,
                      a.batch_size, a.seed, log, lr=a.lr, ema=ema, max_tokens=MAX_TOKENS)
    u, t = ema.shadow if ema is not None else (unet, te)
    _save(pre, vae, u, t, tok, dict(want, final_vae_loss=vae_loss, final_unet_loss=loss,
                                    seconds=round(time.time() - start, 1)))
    vae, unet, te, tok = load_models(pre)  # the averaged weights go on, as with train_digits' --init
    return vae, unet, te, tok, vae_loss


def main(argv=None):
    from sharpfast.zoo.scenes_judge import train_classifier

    a = _parser().parse_args(argv)
    start = time.time()

    def log(msg):
        print(f"[{time.time() - start:7.1f}s] {msg}", flush=True)

    torch.manual_seed(a.seed)
    data = build(seed=a.seed)
    vae, unet, te, tok, vae_loss = _pretrained(a, data, log, start)
    vae.requires_grad_(False)
    ema = EMA([unet, te], a.ema) if a.ema > 0 else None
    loss = train_unet(vae.eval(), unet, te, tok, ScenesBatches(data, a.seed, vae.eval(), log), a.unet_steps,
                      a.batch_size, a.seed + 1, log, lr=a.lr, ema=ema, max_tokens=MAX_TOKENS)
    u, t = ema.shadow if ema is not None else (unet, te)
    info = dict(seed=a.seed, vae_steps=a.vae_steps, pretrain_steps=a.pretrain_steps, unet_steps=a.unet_steps,
                batch_size=a.batch_size, ema=a.ema, lr=a.lr, final_vae_loss=vae_loss, final_unet_loss=loss,
                torch=torch.__version__, threads=torch.get_num_threads())
    _save(a.out, vae, u, t, tok, info)
    train_classifier(os.path.join(a.out, "judge"), seed=a.seed, steps=a.judge_steps, log=log)
    info["seconds"] = round(time.time() - start, 1)
    with open(os.path.join(a.out, "train_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    log(f"saved to {a.out}: {info}")


if __name__ == "__main__":
    main()
