"""Llama 3's RoPE scaling both ways: config parameters <-> llama.cpp's per-frequency `rope_freqs.weight`.

Llama 3.1+ checkpoints stretch the rotary frequencies ("rope_type": "llama3": frequencies with a
wavelength beyond original_max_position_embeddings / low_freq_factor are divided by `factor`, those
below ... / high_freq_factor kept, the band between interpolated). convert_hf_to_gguf.py writes no
metadata for it; it stores the divisor of every frequency as an F32 tensor, `rope_freqs.weight`, which
llama.cpp applies. transformers' GGUF loader ignores that tensor, so a Llama 3 GGUF would load with
plain RoPE: `models.load_model` recovers the parameters from the tensor (`parameters_from_factors`) and
gives them to the model's config, and `gguf_hf` writes the tensor from a checkpoint's config (`factors`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import BadInputError

TENSOR = "rope_freqs.weight"
# Relative agreement between a GGUF's stored factors and those the recovered parameters give: float32
# rounding of the converter's arithmetic, far below any change in the parameters that matters.
RTOL = 1e-5


def factors(rope: dict, dim: int) -> np.ndarray:
    """rope_freqs.weight for llama3 parameters `rope` (rope_theta, factor, low/high_freq_factor,
    original_max_position_embeddings; the converter's defaults where absent) and rotary dimension `dim`.

    float32, with convert_hf_to_gguf.py's (LlamaModel.generate_extra_tensors) operations in its order,
    element by element, so the bytes equal the converter's."""
    base = rope.get("rope_theta", 10000.0)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    kept, stretched = torch.ones_like(freqs), torch.full_like(freqs, factor)
    return torch.where(wavelen < old_context / high, kept,
                       torch.where(wavelen > old_context / low, stretched, between)).numpy()


def parameters_from_factors(stored: np.ndarray, base: float, dim: int, where: str) -> dict:
    """llama3 rope parameters that give `stored` (a GGUF's rope_freqs.weight) for this base and dimension.

    The factors fix `factor` (the largest) and, through the interpolated band, two ratios of the other
    three parameters (smooth = a / wavelength − b, a = original / (high − low), b = low / (high − low)); any
    triple with those ratios gives the same factors, so low_freq_factor is taken as 1, as Llama 3 has it.
    Refused (naming `where`) when fewer than two frequencies lie in the band or the recovered parameters do
    not give the stored factors: transformers could not run the model as llama.cpp does."""
    stored = np.asarray(stored, dtype=np.float64)
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if stored.shape != freqs.shape:
        raise BadInputError(f"{where}: {TENSOR} holds {stored.size} factors, but a rotary dimension of {dim} has "
                            f"{freqs.size} frequencies; the file is damaged or not a llama GGUF")
    factor = float(stored.max())
    if factor == 1.0:
        return {"rope_type": "default", "rope_theta": base}
    band = (stored > 1 + RTOL) & (stored < factor * (1 - RTOL))
    wavelen = 2 * math.pi / freqs
    recovered = None
    if band.sum() >= 2:
        smooth = (1 / stored[band] - 1 / factor) / (1 - 1 / factor)
        (a, b), *_ = np.linalg.lstsq(np.stack([1 / wavelen[band], -np.ones(band.sum())], 1), smooth, rcond=None)
        if a > 0 and b > 0:
            recovered = {"rope_type": "llama3", "rope_theta": base, "factor": factor, "low_freq_factor": 1.0,
                         "high_freq_factor": float(f"{1 + 1 / b:.6g}"),
                         "original_max_position_embeddings": int(round(a / b))}
    if recovered is None or not np.allclose(factors(recovered, dim), stored, rtol=RTOL, atol=0):
        raise BadInputError(f"{where}: its {TENSOR} (llama.cpp's per-frequency RoPE divisors) is not a llama3 RoPE "
                            "scaling bitalloc can recover, and transformers' GGUF loader would ignore it; load the "
                            "model from its Hugging Face checkpoint folder instead")
    return recovered
