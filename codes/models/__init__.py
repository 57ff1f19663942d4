"""Shared, tested model building blocks: the mask convention and the Squeezeformer encoder.

Every model takes a boolean ``mask`` ``(B, T)`` with True = real step; ``codes.models.masking``
is the one place that converts it for libraries. The blocks are plain PyTorch; the CPU training
speed-ups are switched on for a built model by ``codes.models.cpu_fast_paths.enable_cpu_fast_paths``.
"""

from codes.models.masking import (
    downsample_mask,
    lengths_to_mask,
    masked_max,
    masked_mean,
    sdpa_key_mask,
    to_attention_mask,
    to_key_padding_mask,
)
from codes.models.squeezeformer import SqueezeformerBlock, SqueezeformerEncoder

__all__ = [
    "SqueezeformerBlock",
    "SqueezeformerEncoder",
    "downsample_mask",
    "lengths_to_mask",
    "masked_max",
    "masked_mean",
    "sdpa_key_mask",
    "to_attention_mask",
    "to_key_padding_mask",
]
