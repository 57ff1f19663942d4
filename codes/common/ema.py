"""Exponential moving average of weights with a warm-up, for ``torch.optim.swa_utils.AveragedModel``.

Two ways to keep it, with the same values bit for bit (``tests/test_ema.py``):

- ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn_with_warmup(decay), use_buffers=True)``,
  what ``codes.common.training.build_ema`` builds. Its ``update_parameters`` synchronises the host
  with the device twice per step on a GPU: ``n_averaged`` (a CPU tensor) is copied to the device
  (a blocking copy from pageable memory), and the averaging function reads it back with ``int()``.
- :class:`WarmupEMA`: the same module, state dict and arithmetic, with the count of averaged
  steps mirrored in a Python int, so an update only queues device work (one ``_foreach_lerp_``
  over the floating-point tensors, four small operations per integer buffer).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

__all__ = ["WarmupEMA", "ema_warmup_decay", "get_ema_multi_avg_fn_with_warmup"]


def ema_warmup_decay(decay: float, num_averaged: int) -> float:
    """``min(decay, (1 + n) / (10 + n))``: early averages follow the weights closely, so short runs
    are not evaluated on weights dominated by their random initialisation."""
    return min(decay, (1.0 + num_averaged) / (10.0 + num_averaged))


def _average(averaged: list[torch.Tensor], current: list[torch.Tensor], weight: float) -> None:
    """``averaged += (current - averaged) * weight`` for tensors of one device and dtype."""
    if torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0]):
        torch._foreach_lerp_(averaged, current, weight)
    else:  # integer buffers (BatchNorm's num_batches_tracked): float arithmetic, truncated back
        for a, c in zip(averaged, current, strict=True):
            a.copy_(a + (c - a) * weight)


def get_ema_multi_avg_fn_with_warmup(decay: float) -> Callable:
    """Like ``torch.optim.swa_utils.get_ema_multi_avg_fn``, with :func:`ema_warmup_decay`."""

    @torch.no_grad()
    def ema_update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        _average(averaged, current, 1.0 - ema_warmup_decay(decay, int(num_averaged)))

    return ema_update


class WarmupEMA(AveragedModel):
    """``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn_with_warmup(decay), use_buffers=True)``
    whose :meth:`update_parameters` never synchronises with the device.

    The number of averaged steps lives in the ``n_averaged`` buffer (saved and loaded with the
    state dict, as ``AveragedModel`` does) and in a Python int that mirrors it; after
    ``load_state_dict`` the mirror is read from the buffer once, at the next update. The first
    update copies the weights and buffers; update ``n`` (counted from 0) then moves every
    floating-point tensor by ``1 - min(decay, (1 + n) / (10 + n))`` towards the model's, exactly
    as the ``AveragedModel`` form (``tests/test_ema.py`` compares them bit for bit).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn_with_warmup(decay), use_buffers=True)
        self.decay = decay
        self._count: int | None = 0
        self.register_load_state_dict_post_hook(WarmupEMA._forget_count)

    @staticmethod
    def _forget_count(module: WarmupEMA, incompatible_keys) -> None:
        module._count = None

    @property
    def num_averaged(self) -> int:
        """Steps averaged so far (reads the buffer, a host synchronisation, only after a load)."""
        if self._count is None:
            self._count = int(self.n_averaged)
        return self._count

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        count = self.num_averaged
        pairs = zip(  # the pairing of AveragedModel with use_buffers=True
            itertools.chain(self.module.parameters(), self.module.buffers()),
            itertools.chain(model.parameters(), model.buffers()),
            strict=False,
        )
        groups: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
        for p_averaged, p_model in pairs:
            averaged = p_averaged.detach()
            current = p_model.detach().to(averaged.device)
            if count == 0:
                averaged.copy_(current)
                continue
            group = groups.setdefault((averaged.device, averaged.dtype), ([], []))
            group[0].append(averaged)
            group[1].append(current)
        if count > 0:
            weight = 1.0 - ema_warmup_decay(self.decay, count)
            for averaged_list, current_list in groups.values():
                _average(averaged_list, current_list, weight)
        self.n_averaged.add_(1)
        self._count = count + 1
