"""Train the "digits" text-to-image pipeline that memorizes its duplicated images.

    python -m zoo_scripts.train_digits --out DIR [--seed 0] [--pretrain-steps 3000] [--unet-steps 650]

Deterministic for a seed on a given machine. Stage 1 trains a tiny AutoencoderKL (16x16x1 images
to 4x8x8 latents). Stage 2 pretrains a tiny UNet2DConditionModel and a tiny CLIP text encoder on
the generic captions only (`--pretrain-steps`, saved in DIR/pretrained), like a base model trained
on a broad corpus; stage 3 fine-tunes it on the full data, duplicated images included
(`--unet-steps`), which is where the duplicated captions get memorized. Both stages use 10% caption
dropout for classifier-free guidance and keep an exponential moving average of the weights (the
saved weights). `--generic-only` runs stage 2 alone, `--init DIR` stage 3 alone from DIR.

Why two stages and a word-level tokenizer: trained from scratch on the mixed data with a
character-level tokenizer (the first shipped model), the tiny text encoder never learned which
digit a generic caption names (generations followed the seed, not the prompt: the digit
classifier recognised about a quarter of them), while the duplicated captions were memorized.
With one token per caption word and generic pretraining the prompted digit is drawn.
Saves a StableDiffusionPipeline (safetensors) and train_info.json.
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

from sharpfast.testing import text_encoder, tiny_tokenizer, word_tokenizer
from sharpfast.zoo.digits_data import DUPLICATION_LEVELS, IMAGES_PER_LEVEL, augment, build, caption_words

MAX_TOKENS = 32  # the longest caption is 23 word-level tokens


def make_models(seed: int, tokenizer: str = "word"):
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
    tok = word_tokenizer(caption_words(), MAX_TOKENS) if tokenizer == "word" else tiny_tokenizer(MAX_TOKENS)
    te = text_encoder(64, None, seed + 1, len(tok)).train()
    return vae, unet, te, tok


def load_models(path: str):
    """(vae, unet, text encoder, tokenizer) of a saved pipeline, the UNet and text encoder trainable."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, use_safetensors=True)
    return pipe.vae, pipe.unet.train().requires_grad_(True), pipe.text_encoder.train().requires_grad_(True), \
        pipe.tokenizer


def train_vae(vae, images, steps, batch, seed, log):
    def batches(g):
        idx = torch.randint(0, len(images), (batch,), generator=g)
        x = images[idx]
        return torch.where((torch.rand(batch, generator=g) < 0.5)[:, None, None, None], augment(x, g), x)

    return fit_vae(vae, batches, steps, torch.Generator().manual_seed(seed), log)


def fit_vae(vae, batches, steps, g, log):
    """Reconstruction training of the VAE on `batches(g) -> images` (KL weight 1e-6); the last loss."""
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    loss = torch.zeros(())
    for step in range(steps):
        x = batches(g)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.4f}")
    return loss.item()


class EMA:
    """Exponential moving average of the trainable weights of some modules (copies kept apart)."""

    def __init__(self, modules, decay: float):
        self.decay = decay
        self.shadow = [copy.deepcopy(m).requires_grad_(False) for m in modules]
        self.live = modules

    @torch.no_grad()
    def update(self):
        for s, m in zip(self.shadow, self.live):
            for ps, pm in zip(s.parameters(), m.parameters()):
                ps.lerp_(pm, 1 - self.decay)


class DigitsBatches:
    """Training batches of the digits data: (images, captions) `batch` at a time, in epoch order;
    generic images augmented, duplicated ones pixel-exact."""

    def __init__(self, data):
        self.data, self.stream = data, []
        self.images = data.images  # what the latent scale is measured on

    def __call__(self, batch: int, rng: np.random.Generator, g: torch.Generator):
        while len(self.stream) < batch:
            idx, caps, aug = self.data.epoch(rng)
            self.stream += list(zip(idx, caps, aug))
        chunk, self.stream = self.stream[:batch], self.stream[batch:]
        idx = torch.tensor([c[0] for c in chunk])
        flags = torch.tensor([c[2] for c in chunk])
        x = self.data.images[idx]
        return torch.where(flags[:, None, None, None], augment(x, g), x), [c[1] for c in chunk]


def train_unet(vae, unet, te, tok, batches, steps, batch, seed, log, lr=1e-3, checkpoint=None, ema=None,
               max_tokens=MAX_TOKENS):
    """Trains unet and te in place on `batches(batch, rng, g) -> (images, captions)` (its
    `images` attribute sets the VAE's latent scale; with `latents` true it gives the VAE's
    unscaled latent means instead of images); `ema` (an EMA over them) is updated after every step."""
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(seed + 7)
    rng = np.random.default_rng(seed + 7)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    with torch.no_grad():
        sf = 1.0 / torch.cat([vae.encode(x).latent_dist.mean for x in batches.images.split(4096)]).std().item()
    # registered, so that save_pretrained writes it and the pipeline decodes at the scale the UNet
    # was trained at (the first shipped model set it as an attribute only, and its config kept
    # diffusers' 0.18215: it decoded about 4x too large; docs/zoo.md)
    vae.register_to_config(scaling_factor=sf)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    for step in range(steps):
        x, caps = batches(batch, rng, g)
        caps = [c if rng.random() >= 0.1 else "" for c in caps]  # caption dropout for CFG
        with torch.no_grad():
            z = (x if getattr(batches, "latents", False) else vae.encode(x).latent_dist.mean) * sf
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        zt = sched.add_noise(z, noise, t)
        ids = tok(caps, padding="max_length", max_length=max_tokens, truncation=True, return_tensors="pt").input_ids
        pred = unet(zt, t, encoder_hidden_states=te(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            ema.update()
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


def _parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=400)
    p.add_argument("--pretrain-steps", type=int, default=3000,
                   help="steps of generic-only pretraining before the fine-tuning (0: none; ignored with --init)")
    p.add_argument("--unet-steps", type=int, default=650, help="steps of the (final) UNet training stage")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tokenizer", choices=("word", "char"), default="word",
                   help="one token per caption word (default) or per character (the first shipped model)")
    p.add_argument("--ema", type=float, default=0.995, help="decay of the saved weight average (0: last weights)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--generic-only", action="store_true",
                   help="train on the generic captions only, without the duplicated images (pretraining)")
    p.add_argument("--init", default=None,
                   help="start from this saved pipeline (its VAE, tokenizer, text encoder and UNet) instead of "
                        "training from scratch; the VAE is kept")
    p.add_argument("--save-at", default="", help="comma list of UNet steps at which to also save OUT/step-N "
                                                   "(identical to a run with --unet-steps N: constant learning rate)")
    return p


def _models(a, data, log):
    """(vae, unet, text encoder, tokenizer, VAE loss, pretraining steps): from --init or made and the VAE trained."""
    if a.init:
        vae, unet, te, tok = load_models(a.init)
        with open(os.path.join(a.init, "train_info.json")) as f:
            init_info = json.load(f)
        pretrain_steps = init_info["unet_steps"] if init_info.get("generic_only") else 0
        return vae, unet, te, tok, init_info["final_vae_loss"], pretrain_steps
    vae, unet, te, tok = make_models(a.seed, a.tokenizer)
    return vae, unet, te, tok, train_vae(vae, data.images, a.vae_steps, a.batch_size, a.seed, log), 0


def main(argv=None):
    a = _parser().parse_args(argv)
    if a.pretrain_steps and not a.init and not a.generic_only:
        # stage 2 writes a pipeline that stage 3 loads, exactly as --generic-only then --init would
        pre = os.path.join(a.out, "pretrained")
        main(["--out", pre, "--generic-only", "--unet-steps", str(a.pretrain_steps), "--seed", str(a.seed),
              "--vae-steps", str(a.vae_steps), "--batch-size", str(a.batch_size), "--tokenizer", a.tokenizer,
              "--ema", str(a.ema), "--lr", str(a.lr)])
        a.init = pre
    start = time.time()

    def log(msg):
        print(f"[{time.time() - start:7.1f}s] {msg}", flush=True)

    torch.manual_seed(a.seed)
    data = build(seed=a.seed, per_level=(0,) * len(DUPLICATION_LEVELS) if a.generic_only else IMAGES_PER_LEVEL)
    vae, unet, te, tok, vae_loss, pretrain_steps = _models(a, data, log)
    vae.requires_grad_(False)
    save_at = {int(v) for v in a.save_at.split(",") if v.strip()}

    ema = EMA([unet, te], a.ema) if a.ema > 0 else None

    def save(out, steps, loss):
        u, t = ema.shadow if ema is not None else (unet, te)
        pipe = assemble(vae, copy.deepcopy(u), copy.deepcopy(t), tok)
        os.makedirs(out, exist_ok=True)
        pipe.save_pretrained(out, safe_serialization=True)
        info = dict(seed=a.seed, vae_steps=0 if a.init else a.vae_steps, unet_steps=steps,
                    batch_size=a.batch_size, tokenizer=a.tokenizer, ema=a.ema, lr=a.lr, generic_only=a.generic_only,
                    init=a.init and os.path.abspath(a.init), pretrain_steps=pretrain_steps,
                    final_vae_loss=vae_loss, final_unet_loss=loss, seconds=round(time.time() - start, 1),
                    torch=torch.__version__, threads=torch.get_num_threads())
        with open(os.path.join(out, "train_info.json"), "w") as f:
            json.dump(info, f, indent=2)
        log(f"saved to {out}: {info}")

    def checkpoint(step, loss):
        if step in save_at and step != a.unet_steps:
            save(os.path.join(a.out, f"step-{step}"), step, loss)

    unet_loss = train_unet(vae.eval(), unet, te, tok, DigitsBatches(data), a.unet_steps, a.batch_size, a.seed, log,
                           lr=a.lr, checkpoint=checkpoint, ema=ema)
    save(a.out, a.unet_steps, unet_loss)


if __name__ == "__main__":
    main()
