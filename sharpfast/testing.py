"""Tiny diffusers pipelines with random weights, built offline from configs.

For tests, benchmarks and examples on machines without pretrained weights: a Stable Diffusion
1.x-style pipeline (epsilon), a 2.x-style one (v-prediction), an SDXL-style one (two text
encoders, added conditioning), and the flow-matching transformers: Stable Diffusion 3 (two CLIP
encoders and a T5) and Flux (CLIP and T5, guidance-distilled). The CLIP tokenizer is a
character-level BPE vocabulary built in memory (every byte is a token; no merges) and the T5
tokenizer a character-level unigram model built with `tokenizers`, so nothing is downloaded.
"""
from __future__ import annotations

from typing import Any

import torch

from .errors import BadArgument

_BYTES = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))


def _byte_chars() -> list[str]:
    # GPT-2 / CLIP byte-level alphabet: printable bytes map to themselves, the rest above 255
    cs, n = list(_BYTES), 0
    for b in range(256):
        if b not in _BYTES:
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_tokenizer(max_length: int = 77) -> Any:
    """A CLIP tokenizer with a character-level vocabulary (516 tokens, no merges)."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def word_tokenizer(words, max_length: int = 77) -> Any:
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
            raise BadArgument(f"word_tokenizer: {w!r} must be a non-empty lower-case word without spaces")
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


def text_encoder(hidden: int, projection: int | None, seed: int, vocab_size: int) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=projection or hidden,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
                         hidden_act="gelu")
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def _vae(seed: int) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8,
                         sample_size=32).eval()


def t5_tokenizer(max_length: int = 64) -> Any:
    """A T5 tokenizer (fast) with a character-level unigram vocabulary: <pad>, </s>, <unk>, the
    word-start marker, and every printable ASCII character alone and word-initial."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    vocab += [(c, -2.0) for c in chars] + [("\u2581" + c, -1.5) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           model_max_length=max_length, extra_ids=0)


def _t5_encoder(vocab_size: int, d: int, seed: int) -> Any:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=d, d_kv=8, d_ff=2 * d, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, is_encoder_decoder=False, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(cfg).eval()


def _flow_vae(seed: int) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32, shift_factor=0.06, scaling_factor=1.5,
                         use_quant_conv=False, use_post_quant_conv=False).eval()


def tiny_flow_pipeline(kind: str = "sd3", seed: int = 0, sample_size: int = 8, max_sequence_length: int = 16) -> Any:
    """A random-weight flow-matching pipeline: kind "sd3" (StableDiffusion3Pipeline: SD3Transformer2DModel,
    FlowMatchEulerDiscreteScheduler with shift 3, two CLIP encoders with projection and a T5) or
    "flux" (FluxPipeline: FluxTransformer2DModel with guidance embedding, a CLIP encoder and a T5).

    Latents are 4 x sample_size x sample_size (Flux packs them 2x2 into 16-channel tokens); images
    are twice that size. The T5 tokenizer's model_max_length is max_sequence_length: pass it as
    the pipelines' max_sequence_length too (their default asks for 256 / 512 tokens).
    """
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    if kind not in ("sd3", "flux"):
        raise BadArgument(f"kind must be 'sd3' or 'flux', got {kind!r}")
    tok = tiny_tokenizer()
    V = len(tok)
    t5 = t5_tokenizer(max_sequence_length)
    torch.manual_seed(seed)
    if kind == "sd3":
        tr = SD3Transformer2DModel(sample_size=sample_size, patch_size=1, in_channels=4, num_layers=2,
                                   attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                   caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
                                   pos_embed_max_size=2 * sample_size).eval()
        pipe = StableDiffusion3Pipeline(transformer=tr, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                        vae=_flow_vae(seed + 1), text_encoder=text_encoder(32, 32, seed + 2, V),
                                        tokenizer=tok, text_encoder_2=text_encoder(32, 32, seed + 3, V),
                                        tokenizer_2=tiny_tokenizer(), text_encoder_3=_t5_encoder(len(t5), 32, seed + 4),
                                        tokenizer_3=t5)
    else:
        tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                    pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()
        sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=16, max_image_seq_len=256)
        pipe = FluxPipeline(transformer=tr, scheduler=sched, vae=_flow_vae(seed + 1),
                            text_encoder=text_encoder(32, None, seed + 2, V), tokenizer=tok,
                            text_encoder_2=_t5_encoder(len(t5), 32, seed + 4), tokenizer_2=t5)
    pipe.default_sample_size = sample_size
    return pipe


def tiny_pipeline(kind: str = "sd1", seed: int = 0, sample_size: int = 8, scheduler: str = "ddim") -> Any:
    """A random-weight pipeline: kind "sd1" (epsilon), "sd2" (v-prediction) or "sdxl"; "sd3" and
    "flux" give tiny_flow_pipeline(kind).

    Latents are (4, sample_size, sample_size); images are twice that size (the VAE downsamples by 2).
    scheduler: "ddim", "ddpm", "pndm", "euler", "euler_a" (Euler ancestral) or "dpm".
    """
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    if kind in ("sd3", "flux"):
        return tiny_flow_pipeline(kind, seed, sample_size)
    if kind not in ("sd1", "sd2", "sdxl"):
        raise BadArgument(f"kind must be 'sd1', 'sd2', 'sdxl', 'sd3' or 'flux', got {kind!r}")
    tok = tiny_tokenizer()
    V = len(tok)
    common = dict(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
                  block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=4)
    sched_cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     prediction_type="v_prediction" if kind == "sd2" else "epsilon", steps_offset=1)
    sched_cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "pndm": PNDMScheduler,
                 "euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
                 "dpm": DPMSolverMultistepScheduler}[scheduler]
    if scheduler in ("ddim", "ddpm"):  # SD's own configs (diffusers warns when clip_sample is left unset)
        sched_cfg.update(clip_sample=False, **({"set_alpha_to_one": False} if scheduler == "ddim" else {}))
    sched = sched_cls(**sched_cfg)
    if kind == "sdxl":
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                    transformer_layers_per_block=(1, 1), addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
                                    use_linear_projection=True, **common).eval()
        return StableDiffusionXLPipeline(
            vae=_vae(seed + 1), text_encoder=text_encoder(32, None, seed + 2, V),
            text_encoder_2=text_encoder(32, 32, seed + 3, V), tokenizer=tok, tokenizer_2=tiny_tokenizer(),
            unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                **common).eval()
    return StableDiffusionPipeline(vae=_vae(seed + 1), text_encoder=text_encoder(32, None, seed + 2, V),
                                   tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def sd15_sized_pipeline(seed: int = 0, dtype: Any = torch.float32, device: str = "cpu",
                        sample_size: int = 64) -> Any:
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
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder(768, None, seed + 2, len(tok)), tokenizer=tok,
                                   unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return pipe.to(device=device, dtype=dtype)
