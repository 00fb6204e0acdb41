"""Tiny diffusers pipelines with random weights, built offline from configs.

For tests, benchmarks and examples on machines without pretrained weights: a Stable Diffusion
1.x-style pipeline (epsilon), a 2.x-style one (v-prediction) and an SDXL-style one (two text
encoders, added conditioning). The tokenizer is a character-level CLIP BPE vocabulary built in
memory (every byte is a token; no merges), so nothing is downloaded.
"""
from __future__ import annotations

import torch

_BYTES = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))


def _byte_chars() -> list[str]:
    # GPT-2 / CLIP byte-level alphabet: printable bytes map to themselves, the rest above 255
    cs, n = list(_BYTES), 0
    for b in range(256):
        if b not in _BYTES:
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_tokenizer(max_length: int = 77):
    """A CLIP tokenizer with a character-level vocabulary (516 tokens, no merges)."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def word_tokenizer(words, max_length: int = 77):
    """The character-level tokenizer plus one token for each of `words` (lower case, no spaces).

    BPE merges join each word's characters left to right, so a listed word is a single token and
    anything else still falls back to characters (e.g. numbers and identifiers).
    """
    from transformers import CLIPTokenizer

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tokens = [t for t, _ in sorted(tiny_tokenizer(max_length).get_vocab().items(), key=lambda kv: kv[1])
              if t not in (bos, eos)]
    known = set(tokens)
    merges: list[tuple[str, str]] = []
    for w in sorted(set(words)):
        if not w or " " in w or w != w.lower():
            raise ValueError(f"word_tokenizer: {w!r} must be a non-empty lower-case word without spaces")
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
            left = left + right
            if left not in known:
                known.add(left)
                tokens.append(left)
    # the special tokens stay last, as the text encoder config expects
    vocab = {t: i for i, t in enumerate(tokens + [bos, eos])}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _text_encoder(hidden: int, projection: int | None, seed: int, vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=projection or hidden,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                         hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8,
                         sample_size=32).eval()


def tiny_pipeline(kind: str = "sd1", seed: int = 0, sample_size: int = 8, scheduler: str = "ddim"):
    """A random-weight pipeline: kind "sd1" (epsilon), "sd2" (v-prediction) or "sdxl".

    Latents are (4, sample_size, sample_size); images are twice that size (the VAE downsamples by 2).
    scheduler: "ddim", "ddpm", "pndm", "euler" or "dpm".
    """
    from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                           PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)

    if kind not in ("sd1", "sd2", "sdxl"):
        raise ValueError(f"kind must be 'sd1', 'sd2' or 'sdxl', got {kind!r}")
    tok = tiny_tokenizer()
    V = len(tok)
    common = dict(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=4)
    sched_cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     prediction_type="v_prediction" if kind == "sd2" else "epsilon", steps_offset=1)
    sched_cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "pndm": PNDMScheduler,
                 "euler": EulerDiscreteScheduler, "dpm": DPMSolverMultistepScheduler}[scheduler]
    if scheduler in ("ddim",):
        sched_cfg.update(clip_sample=False, set_alpha_to_one=False)
    sched = sched_cls(**sched_cfg)
    if kind == "sdxl":
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                    transformer_layers_per_block=(1, 1), addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                                    use_linear_projection=True, **common).eval()
        return StableDiffusionXLPipeline(
            vae=_vae(seed + 1), text_encoder=_text_encoder(32, None, seed + 2, V),
            text_encoder_2=_text_encoder(32, 32, seed + 3, V), tokenizer=tok, tokenizer_2=tiny_tokenizer(),
            unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                **common).eval()
    return StableDiffusionPipeline(vae=_vae(seed + 1), text_encoder=_text_encoder(32, None, seed + 2, V),
                                   tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def sd15_sized_pipeline(seed: int = 0, dtype=torch.float32, device="cpu", sample_size: int = 64):
    """A StableDiffusionPipeline whose UNet has Stable Diffusion 1.5's architecture (860M
    parameters, random weights), for timings. The text encoder (hidden size 768, as SD 1.5's)
    and the VAE (downsampling by 8) are small random stand-ins. sample_size: the default latent
    side (64 as SD 1.5, i.e. 512 px; 32 gives 4x32x32 latents, small enough for a CPU)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3).eval()
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        norm_num_groups=8, sample_size=8 * sample_size).eval()
    tok = tiny_tokenizer()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=_text_encoder(768, None, seed + 2, len(tok)), tokenizer=tok,
                                   unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe.to(device=device, dtype=dtype)
