"""Train the "digits" text-to-image pipeline that memorizes its duplicated images.

    python -m sharpfast.zoo.train_digits --out DIR [--seed 0] [--vae-steps 400] [--unet-steps 1750]

Deterministic for a seed on a given machine. Stage 1 trains a tiny AutoencoderKL (16x16x1 images
to 4x8x8 latents); stage 2 trains a tiny UNet2DConditionModel and a tiny CLIP text encoder with
the character-level tokenizer of sharpfast.testing, with 10% caption dropout for classifier-free
guidance. Saves a StableDiffusionPipeline (safetensors) and train_info.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..testing import _text_encoder, tiny_tokenizer
from .digits_data import augment, build

MAX_TOKENS = 64


def make_models(seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=16, sample_size=16, layers_per_block=1)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(64, 96), cross_attention_dim=64, norm_num_groups=16,
                                attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    tok = tiny_tokenizer(max_length=MAX_TOKENS)
    te = _text_encoder(64, None, seed + 1, len(tok)).train()
    return vae, unet, te, tok


def train_vae(vae, images, steps, batch, seed, log):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        x = images[idx]
        x = torch.where((torch.rand(batch, generator=g) < 0.5)[:, None, None, None], augment(x, g), x)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.4f}")
    return loss.item()


def train_unet(vae, unet, te, tok, data, steps, batch, seed, log, lr=1e-3, checkpoint=None):
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(seed + 7)
    rng = np.random.default_rng(seed + 7)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    with torch.no_grad():
        sf = 1.0 / vae.encode(data.images).latent_dist.mean.std().item()
    vae.config.scaling_factor = sf
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    stream = []
    for step in range(steps):
        while len(stream) < batch:
            idx, caps, aug = data.epoch(rng)
            stream += list(zip(idx, caps, aug))
        chunk, stream = stream[:batch], stream[batch:]
        idx = torch.tensor([c[0] for c in chunk])
        flags = torch.tensor([c[2] for c in chunk])
        caps = [c[1] if rng.random() >= 0.1 else "" for c in chunk]  # caption dropout for CFG
        x = data.images[idx]
        x = torch.where(flags[:, None, None, None], augment(x, g), x)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean * sf
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        zt = sched.add_noise(z, noise, t)
        ids = tok(caps, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
        pred = unet(zt, t, encoder_hidden_states=te(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"unet step {step} loss {loss.item():.4f}")
        if checkpoint is not None:
            checkpoint(step + 1, loss.item())
    return loss.item()


def assemble(vae, unet, te, tok):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae.eval(), text_encoder=te.eval(), tokenizer=tok, unet=unet.eval(),
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=400)
    p.add_argument("--unet-steps", type=int, default=1750)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--save-at", default="", help="comma list of UNet steps at which to also save OUT/step-N "
                                                   "(identical to a run with --unet-steps N: constant learning rate)")
    a = p.parse_args(argv)
    start = time.time()

    def log(msg):
        print(f"[{time.time() - start:7.1f}s] {msg}", flush=True)

    torch.manual_seed(a.seed)
    data = build(seed=a.seed)
    vae, unet, te, tok = make_models(a.seed)
    vae_loss = train_vae(vae, data.images, a.vae_steps, a.batch_size, a.seed, log)
    vae.requires_grad_(False)
    save_at = {int(v) for v in a.save_at.split(",") if v.strip()}

    def save(out, steps, loss):
        pipe = assemble(vae, copy.deepcopy(unet), copy.deepcopy(te), tok)
        os.makedirs(out, exist_ok=True)
        pipe.save_pretrained(out, safe_serialization=True)
        info = dict(seed=a.seed, vae_steps=a.vae_steps, unet_steps=steps, batch_size=a.batch_size,
                    final_vae_loss=vae_loss, final_unet_loss=loss, seconds=round(time.time() - start, 1),
                    torch=torch.__version__, threads=torch.get_num_threads())
        with open(os.path.join(out, "train_info.json"), "w") as f:
            json.dump(info, f, indent=2)
        log(f"saved to {out}: {info}")

    def checkpoint(step, loss):
        if step in save_at and step != a.unet_steps:
            save(os.path.join(a.out, f"step-{step}"), step, loss)

    unet_loss = train_unet(vae.eval(), unet, te, tok, data, a.unet_steps, a.batch_size, a.seed, log,
                           checkpoint=checkpoint)
    save(a.out, a.unet_steps, unet_loss)


if __name__ == "__main__":
    main()
