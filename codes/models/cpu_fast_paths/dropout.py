"""Dropout that is cheap on CPU.

``torch.nn.functional.dropout`` draws its keep mask with ``bernoulli_``, one random float per
element; on a CPU that costs about four times the rest of the operation and was a fifth of a
whole training step of exp018. :func:`dropout` instead draws 64 random bits per four elements
(``random_`` over the full int64 range, viewed as four int16) and keeps an element when its 16
bits are at or above a threshold:

- the drop probability is ``p`` rounded to a multiple of 1/65536 (an error below 1e-5), and the
  kept elements are scaled by ``1 / (1 - rounded p)``, so the expectation is exact;
- the bits come from PyTorch's default generator, so ``torch.manual_seed`` makes it repeatable;
- the backward pass reuses the saved mask (0 or the scale, in the input's dtype).

On other devices and inside ``torch.compile`` the native fused dropout is used unchanged. In
eval mode, or with ``p == 0``, both are the identity. :class:`CheapDropout` is the module form
that :func:`codes.models.cpu_fast_paths.enable_cpu_fast_paths` gives to ``nn.Dropout`` modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CheapDropout", "drop_levels_of", "drop_mask", "dropout"]

_LEVELS = 1 << 16  # int16 values


def _random_int16(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Uniform int16 values of ``shape``: 64 random bits per four elements."""
    numel = shape.numel()
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), None)  # the full 64-bit range: every bit uniform
    return words.view(torch.int16)[:numel].view(shape)


def _keep_mask(shape: torch.Size, drop_levels: int, device: torch.device) -> torch.Tensor:
    """A bool tensor of ``shape``, each element False with probability ``drop_levels / 65536``."""
    return _random_int16(shape, device) >= (drop_levels - (1 << 15))  # uniform on [-32768, 32767]


def drop_mask(shape: torch.Size, drop_levels: int, device: torch.device) -> torch.Tensor:
    """A bool tensor of ``shape``, each element True (dropped) with probability ``drop_levels / 65536``."""
    return _random_int16(shape, device) < (drop_levels - (1 << 15))


def drop_levels_of(p: float) -> int:
    """``p`` in units of 1/65536 (checked to be in ``[0, 1)``); the cheap mask runs for ``0 < levels < 65536``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return round(p * _LEVELS)


class _BitMaskDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, drop_levels: int) -> torch.Tensor:
        keep = _keep_mask(x.shape, drop_levels, x.device)
        # a float mask holding 0 or the scale: multiplying by it is one cheap pass, forward and
        # backward alike (a bool operand would take a slow type-promotion path)
        scaled_keep = keep.to(x.dtype).mul_(_LEVELS / (_LEVELS - drop_levels))
        ctx.save_for_backward(scaled_keep)
        return x * scaled_keep

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (scaled_keep,) = ctx.saved_tensors
        return grad * scaled_keep, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the cheap CPU mask described in the module docstring."""
    drop_levels = drop_levels_of(p)
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or torch.compiler.is_compiling() or not 0 < drop_levels < _LEVELS:
        return F.dropout(x, p, training=True)
    return _BitMaskDropout.apply(x, drop_levels)


class CheapDropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, same state) computed with :func:`dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return F.dropout(x, self.p, self.training, inplace=True)
        return dropout(x, self.p, self.training)
