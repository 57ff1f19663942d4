"""Exponential moving average of weights with a warm-up, for ``torch.optim.swa_utils.AveragedModel``."""

from __future__ import annotations

from collections.abc import Callable

import torch


def ema_warmup_decay(decay: float, num_averaged: int) -> float:
    """``min(decay, (1 + n) / (10 + n))``: early averages follow the weights closely, so short runs
    are not evaluated on weights dominated by their random initialisation."""
    return min(decay, (1.0 + num_averaged) / (10.0 + num_averaged))


def get_ema_multi_avg_fn_with_warmup(decay: float) -> Callable:
    """Like ``torch.optim.swa_utils.get_ema_multi_avg_fn``, with :func:`ema_warmup_decay`."""

    @torch.no_grad()
    def ema_update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        weight = 1.0 - ema_warmup_decay(decay, int(num_averaged))
        if torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0]):
            torch._foreach_lerp_(averaged, current, weight)
        else:
            for a, c in zip(averaged, current, strict=True):
                a.copy_(a + (c - a) * weight)

    return ema_update
