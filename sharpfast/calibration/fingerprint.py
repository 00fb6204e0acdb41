"""A model's identity for calibration files: its name and a fingerprint of its weights (a few
elements of every parameter, hashed), so a calibration is never used for other weights."""
from __future__ import annotations

import hashlib
from typing import Any

import torch

_SAMPLE = 16  # weight elements read per parameter for the fingerprint


def model_name(pipe: Any) -> str:
    """How messages name the model: its directory, else its pipeline class."""
    return str(getattr(pipe, "name_or_path", "") or type(pipe).__name__)


# ---- the weights' fingerprint ----------------------------------------------------------------

def _modules(pipe: Any) -> list:
    names = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
    return [(n, getattr(pipe, n)) for n in names if isinstance(getattr(pipe, n, None), torch.nn.Module)]


def weights_fingerprint(pipe: Any) -> dict:
    """{"fingerprint": exact hash, "structure": hash of names/shapes, "dtype", "sample": [floats]}.

    Cheap: names and shapes of every parameter of the denoiser and text encoders, plus the sum of
    sums of w and of |w| over a strided sample of _SAMPLE elements of each parameter (one device
    transfer). "fingerprint" hashes the exact sampled values in the model's dtype; `same_weights`
    also accepts the same weights at another precision (every sampled sum equal within bf16
    rounding of its |w| sum). A change smaller than that rounding goes unseen."""
    structure = hashlib.sha256()
    sums, dtypes = [], set()
    for mod_name, mod in _modules(pipe):
        for name, p in mod.named_parameters():
            structure.update(f"{mod_name}.{name}:{tuple(p.shape)};".encode())
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // _SAMPLE)
            picked = flat[::step][:_SAMPLE].double()
            sums += [picked.sum(), picked.abs().sum()]
            dtypes.add(str(p.dtype).replace("torch.", ""))
    by_device: dict = {}  # one transfer per device (offloaded models span several)
    for i, v in enumerate(sums):
        by_device.setdefault(v.device, []).append(i)
    sample = [0.0] * len(sums)
    for _dev, idx in by_device.items():
        for i, v in zip(idx, torch.stack([sums[i] for i in idx]).cpu().tolist()):
            sample[i] = float(v)
    dtype = "+".join(sorted(dtypes))
    exact = hashlib.sha256((structure.hexdigest() + dtype + ",".join(repr(v) for v in sample)).encode())
    return {"fingerprint": exact.hexdigest()[:16], "structure": structure.hexdigest()[:16], "dtype": dtype,
            "sample": sample}


def same_weights(recorded: dict, current: dict) -> bool:
    """The same weights: the exact fingerprint, or the same structure with sums equal within
    bf16 / fp16 rounding when the dtypes differ (a model calibrated in fp32, served in fp16)."""
    if recorded.get("fingerprint") == current["fingerprint"]:
        return True
    if recorded.get("structure") != current["structure"] or recorded.get("dtype") == current["dtype"]:
        return False
    a, b = recorded.get("sample") or [], current["sample"]
    if len(a) != len(b):
        return False
    # pairs (sum w, sum |w|) per parameter: the sums may differ by the rounding of every term
    return all(abs(a[i] - b[i]) <= 2 ** -7 * max(a[i + 1], b[i + 1]) + 1e-6 and
               abs(a[i + 1] - b[i + 1]) <= 2 ** -7 * max(a[i + 1], b[i + 1]) + 1e-6 for i in range(0, len(a), 2))


# ---- calibrating -------------------------------------------------------------------------------
