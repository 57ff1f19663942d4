"""Squeezeformer encoder (Kim et al. 2022, "Squeezeformer: An Efficient Transformer for Automatic
Speech Recognition", arXiv:2206.00888), for padded sensor sequences with a boolean mask.

What is kept from the paper:

- the block layout **MHA -> FF -> Conv -> FF** (the "MF/CF" structure replacing Conformer's
  Macaron FF-MHA-Conv-FF), full-weight FF residuals (no 1/2 factor);
- **scaled post-LN**: every module is ``x = LayerNorm(x + module(ScaleBias(x)))``, a learnable
  per-channel scale and bias on the module input instead of a pre-LN;
- **unified activations**: Swish everywhere, the conv module's GLU replaced by Swish, so its
  first pointwise layer expands ``d -> conv_expansion * d`` (2 by default, as in the reference
  implementation) followed by Swish;
- the **temporal U-Net**: after ``reduce_after_block`` a depthwise-separable convolution (kernel
  3, stride 2) halves the time axis; before ``recover_before_block`` the reduced sequence is
  upsampled by repeating each step twice, passed through a Linear and added to the activation
  saved before the reduction (defaults follow the paper's 16-block model, which reduces after
  its 7th block and recovers before its last one).

Deviations, on purpose:

- **positional information** is added once at the input (sinusoidal, learned, or none) instead
  of the paper's relative positional encoding inside every attention layer, so that attention
  stays a single fused ``scaled_dot_product_attention`` call;
- **no convolutional subsampling stem**: the input is already projected to ``d_model`` per step
  (sensor sequences are short; the paper's 4x stem is for 100 Hz speech features);
- the depthwise convolutions carry no bias (the BatchNorm that follows, or the pointwise layer
  of the time reduction, makes one redundant);
- **masking**: padded steps are zeroed before every convolution and excluded from the
  BatchNorm statistics and from attention keys (:class:`MaskedBatchNorm1d`,
  :class:`MaskedDepthwiseConv1d`), so in eval mode the outputs of a sequence at its real steps
  depend neither on its padding length nor on the other sequences of the batch;
- **packed steps** (``pack_padded_steps``, default on): the per-step layers (Linear, LayerNorm,
  Swish, dropout, residuals, BatchNorm) run on the real steps only, packed as ``(N, D)`` rows by
  :class:`~codes.models.masking.StepLayout`; attention and the depthwise convolutions get the
  padded batch with zeros at its padded steps. Same results up to float rounding. A CPU speed
  path: on a GPU (any device but the CPU) and inside ``torch.compile`` the padded computation
  runs, whose shapes are static and which reads nothing back from the device (packing reads the
  number of real steps, a host synchronisation per layout).

The mask convention is the repository's one (``codes.models.masking``): ``(B, T)`` bool, True =
real step. Outputs at padded steps are zeroed.

Everything here is plain PyTorch (``nn.Dropout``, ``scaled_dot_product_attention``, autograd).
The CPU training speed-ups (a cheaper dropout mask, attention with dropout in fewer passes, a
faster depthwise weight gradient) live in :mod:`codes.models.cpu_fast_paths`, switched on for a
built model by ``enable_cpu_fast_paths(model)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from codes.models.masking import StepLayout, as_step_layout, check_mask, sdpa_key_mask

__all__ = [
    "ConvModule",
    "FeedForwardModule",
    "LearnedPositionalEncoding",
    "MaskedBatchNorm1d",
    "MaskedDepthwiseConv1d",
    "MultiHeadSelfAttention",
    "ScaleBias",
    "SinusoidalPositionalEncoding",
    "SqueezeformerBlock",
    "SqueezeformerEncoder",
    "TimeRecovery",
    "TimeReduction",
]

POSITIONAL_ENCODINGS = ("sinusoidal", "learned", "none")


def _zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, T, D)`` with padded steps set to 0 (``where``, so ``inf``/``NaN`` padding cannot leak)."""
    return torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))


class ScaleBias(nn.Module):
    """Learnable per-channel scale (init 1) and bias (init 0) on a module's input: ``x * scale + bias``."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, T, D)``."""
        return torch.addcmul(self.bias, x, self.scale)  # x * scale + bias in one pass


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over channels of ``(B, T, C)`` whose statistics come from real steps only.

    In training, the mean and (biased) variance used for normalisation are those of the real
    steps of the batch, computed in float32; the running statistics are updated with them as
    ``nn.BatchNorm1d`` does (unbiased variance, ``momentum``, or a cumulative average when
    ``momentum`` is None). In eval, the running statistics are used. Padded outputs are zero.
    A batch without any real step leaves the running statistics unchanged.

    Parameters and buffers are those of ``nn.BatchNorm1d``, so state dicts are interchangeable.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True, track_running_stats=True)
        # switched off while gradient checkpointing recomputes a forward pass, so that one
        # training step updates the running statistics once
        self.update_running_stats = True

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        """``(B, T, C), (B, T) -> (B, T, C)``, in ``x``'s dtype.

        ``mask=None``: every row of ``x`` ``(..., C)`` is real (the packed rows of a
        :class:`~codes.models.masking.StepLayout`); training then uses the fused batch-norm
        kernel when there are at least two rows.
        """
        if mask is None and self.training and x.numel() >= 2 * x.shape[-1]:
            return self._fused_training_forward(x)
        if mask is not None:
            check_mask(x, mask)
        m = None if mask is None else mask.unsqueeze(-1)  # (B, T) -> (B, T, 1)
        xf = x.float()
        if self.training:
            rows = xf.reshape(-1, xf.shape[-1])
            if m is None:
                count = torch.tensor(float(rows.shape[0]), device=x.device)
            else:
                count = mask.sum().to(torch.float32)
                rows = torch.where(m, xf, 0.0).reshape(-1, xf.shape[-1])
            n = count.clamp(min=1.0)
            mean = rows.sum(dim=0) / n  # (..., C) -> (C,)
            centered = xf - mean if m is None else torch.where(m, xf - mean, 0.0)
            var = centered.square().reshape(-1, xf.shape[-1]).sum(dim=0) / n  # (C,), biased
            if self.update_running_stats:
                self._update_running_stats(mean, var, count)
        else:
            mean = self.running_mean.float()
            var = self.running_var.float()
        scale = self.weight.float() * torch.rsqrt(var + self.eps)  # (C,)
        shift = self.bias.float() - mean * scale
        y = torch.addcmul(shift, xf, scale)
        if m is not None:
            y = torch.where(m, y, 0.0)
        return y.to(x.dtype)

    def _fused_training_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training on rows that are all real: ``F.batch_norm`` in float32, same statistics."""
        rows = x.reshape(-1, x.shape[-1]).float()  # (N, C)
        if self.update_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            running_mean, running_var = self.running_mean, self.running_var
        else:  # normalise with the batch statistics, update copies (same saved tensors as above)
            factor, running_mean, running_var = 0.0, self.running_mean.clone(), self.running_var.clone()
        y = F.batch_norm(
            rows, running_mean, running_var, self.weight.float(), self.bias.float(), True, factor, self.eps
        )
        return y.view(x.shape).to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """Move the running statistics towards this batch's, without a host synchronisation."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm1d
            factor: torch.Tensor | float = 1.0 / self.num_batches_tracked.to(self.running_mean.dtype)
        else:
            factor = self.momentum
        unbiased = var * count / (count - 1.0).clamp(min=1.0)
        has_real = count > 0  # an all-padding batch leaves the statistics where they are
        mean = torch.where(has_real, mean.to(self.running_mean.dtype), self.running_mean)
        unbiased = torch.where(has_real, unbiased.to(self.running_var.dtype), self.running_var)
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(unbiased, factor)


def depthwise_conv_image(x: torch.Tensor) -> torch.Tensor:
    """``(B, T, C)`` as a channels-last ``(B, C, 1, T)`` image, without a copy."""
    return x.transpose(1, 2).unsqueeze(2)


class MaskedDepthwiseConv1d(nn.Conv1d):
    """Depthwise convolution over time of ``(B, T, C)``, padded steps zeroed first.

    "Same" padding (``kernel_size // 2``), so the output has ``ceil(T / stride)`` steps; no bias
    (a BatchNorm or a pointwise layer follows). The caller masks the output.
    """

    def __init__(self, channels: int, kernel_size: int, stride: int = 1) -> None:
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        super().__init__(
            channels,
            channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=channels,
            bias=False,
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``(B, T, C), (B, T) -> (B, ceil(T / stride), C)``."""
        return self.convolve(_zero_padding(x, mask))

    def convolve(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution of ``(B, T, C)`` whose padded steps are already zero."""
        # A (B, T, C) tensor is a channels-last (B, C, 1, T) image without a copy, and oneDNN's
        # channels-last depthwise 2-D convolution is several times faster on CPU than conv1d.
        y = F.conv2d(
            depthwise_conv_image(x),
            self.weight.unsqueeze(2),  # (C, 1, k) -> (C, 1, 1, k)
            stride=(1, self.stride[0]),
            padding=(0, self.padding[0]),
            groups=self.groups,
        )  # (B, C, 1, T) -> (B, C, 1, ceil(T / stride))
        return y.squeeze(2).transpose(1, 2)  # (B, C, 1, T') -> (B, T', C)


class FeedForwardModule(nn.Module):
    """Linear(d, ff_dim) -> Swish -> dropout -> Linear(ff_dim, d) -> dropout."""

    def __init__(self, d_model: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_model, ff_dim),  # (B, T, D) -> (B, T, F)
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(ff_dim, d_model),  # (B, T, F) -> (B, T, D)
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, D) -> (B, T, D)``."""
        return self.net(x)


class ConvModule(nn.Module):
    """Squeezeformer convolution module, mask-correct.

    Pointwise ``d -> expansion * d`` -> Swish -> depthwise conv (``kernel_size``) ->
    :class:`MaskedBatchNorm1d` -> Swish -> pointwise ``expansion * d -> d`` -> dropout.

    This is Conformer's module with the GLU replaced by Swish (the paper's "unified
    activations"); without a GLU halving the channels, the depthwise convolution runs on the
    expanded ``expansion * d`` channels (2 by default, as in the reference implementation; 1
    gives the cheapest variant).
    """

    def __init__(self, d_model: int, kernel_size: int, expansion: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        inner = expansion * d_model
        self.pointwise_in = nn.Linear(d_model, inner)
        self.depthwise = MaskedDepthwiseConv1d(inner, kernel_size)
        self.norm = MaskedBatchNorm1d(inner)
        self.pointwise_out = nn.Linear(inner, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | StepLayout) -> torch.Tensor:
        """``(B, T, D), (B, T) -> (B, T, D)``, or rows of a :class:`StepLayout` ``(N, D) -> (N, D)``."""
        layout = as_step_layout(mask)
        x = F.silu(self.pointwise_in(x))  # (..., D) -> (..., E * D)
        if layout.packed:  # the padded tensor has zeros at its padded steps
            x = layout.to_rows(self.depthwise.convolve(layout.to_padded(x)))
            x = F.silu(self.norm(x, None))  # every row is real
        else:
            x = self.depthwise(x, layout.mask)  # padded steps zeroed inside
            x = F.silu(self.norm(x, layout.mask))
        x = self.pointwise_out(x)  # (..., E * D) -> (..., D)
        return self.dropout(x)


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention`` (fused QKV projection).

    Padded keys are excluded with a boolean key mask; attention-probability dropout applies in
    training only; the output projection is followed by (residual) dropout. Queries at padded
    steps produce values that the rest of the encoder ignores.
    """

    def __init__(self, d_model: int, num_heads: int, attention_dropout: float, dropout: float) -> None:
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | StepLayout) -> torch.Tensor:
        """``(B, T, D), (B, T) -> (B, T, D)``, or rows of a :class:`StepLayout` ``(N, D) -> (N, D)``."""
        layout = as_step_layout(mask)
        mask = layout.mask
        b, t = mask.shape
        d = x.shape[-1]
        h = self.num_heads
        qkv = (
            layout.to_padded(self.qkv(x)).view(b, t, 3, h, d // h).permute(2, 0, 3, 1, 4)
        )  # (B, T, 3D) -> (3, B, H, T, D/H)
        q, k, v = qkv.unbind(0)
        dropout_p = self.attention_dropout if self.training else 0.0
        x = self.attend(q, k, v, sdpa_key_mask(mask), dropout_p)  # (B, H, T, D/H)
        x = layout.to_rows(x.transpose(1, 2).reshape(b, t, d))  # (B, H, T, D/H) -> (B, T, D) -> rows
        return self.dropout(self.out(x))

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor,
        dropout_p: float,
    ) -> torch.Tensor:
        """Softmax attention with dropout on its probabilities: ``q, k, v (B, H, T, D/H)``,
        ``key_mask`` ``(B, 1, 1, T)`` (True = attend) -> ``(B, H, T, D/H)``."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=dropout_p)


class SqueezeformerBlock(nn.Module):
    """MHA -> FF -> Conv -> FF, each ``x = LayerNorm(x + module(ScaleBias(x)))`` (scaled post-LN)."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        ff_dim: int,
        conv_kernel: int,
        conv_expansion: int = 2,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.attention_scale = ScaleBias(d_model)
        self.attention = MultiHeadSelfAttention(d_model, num_heads, attention_dropout, dropout)
        self.attention_norm = nn.LayerNorm(d_model)
        self.ff1_scale = ScaleBias(d_model)
        self.ff1 = FeedForwardModule(d_model, ff_dim, dropout)
        self.ff1_norm = nn.LayerNorm(d_model)
        self.conv_scale = ScaleBias(d_model)
        self.conv = ConvModule(d_model, conv_kernel, conv_expansion, dropout)
        self.conv_norm = nn.LayerNorm(d_model)
        self.ff2_scale = ScaleBias(d_model)
        self.ff2 = FeedForwardModule(d_model, ff_dim, dropout)
        self.ff2_norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | StepLayout) -> torch.Tensor:
        """``(B, T, D), (B, T) -> (B, T, D)`` (values at padded steps are meaningless), or rows of
        a :class:`StepLayout` ``(N, D) -> (N, D)``."""
        mask = as_step_layout(mask)
        x = self.attention_norm(x + self.attention(self.attention_scale(x), mask))
        x = self.ff1_norm(x + self.ff1(self.ff1_scale(x)))
        x = self.conv_norm(x + self.conv(self.conv_scale(x), mask))
        return self.ff2_norm(x + self.ff2(self.ff2_scale(x)))


class TimeReduction(nn.Module):
    """Halve the time axis: depthwise conv (kernel 3, stride 2) then pointwise Linear.

    Padded steps are zeroed before the convolution. The mask is downsampled consistently:
    reduced step ``t`` is real iff input step ``2t`` is (``ceil(n / 2)`` real steps for a
    right-padded sequence of real length ``n``), and padded reduced steps are zeroed.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.depthwise = MaskedDepthwiseConv1d(d_model, kernel_size=3, stride=2)
        self.pointwise = nn.Linear(d_model, d_model)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | StepLayout
    ) -> tuple[torch.Tensor, torch.Tensor | StepLayout]:
        """``(B, T, D), (B, T) -> (B, ceil(T / 2), D), (B, ceil(T / 2))``; given a
        :class:`StepLayout` instead of a mask: its rows -> the reduced rows and reduced layout."""
        layout = as_step_layout(mask)
        reduced = layout.downsampled(stride=2)  # (B, T) -> (B, ceil(T / 2))
        if layout.packed:
            x = reduced.to_rows(self.depthwise.convolve(layout.to_padded(x)))
            return self.pointwise(x), reduced
        x = self.depthwise(x, layout.mask)  # (B, T, D) -> (B, ceil(T / 2), D)
        x = _zero_padding(self.pointwise(x), reduced.mask)
        return x, (reduced if isinstance(mask, StepLayout) else reduced.mask)


class TimeRecovery(nn.Module):
    """Undo :class:`TimeReduction`: repeat each step twice, crop to ``T``, Linear, add the skip.

    The Linear is applied before the repetition, which gives the same result (it acts on each
    step alone) at half the cost. Given the layouts, a padded reduced step contributes zero (a
    real step ``t`` whose reduced step ``t // 2`` is padding, possible only when the padding is
    not at the end, gets its skip alone), in packed and padded form alike.
    """

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_model, d_model)

    def forward(
        self,
        x: torch.Tensor,
        skip: torch.Tensor,
        reduced: StepLayout | None = None,
        layout: StepLayout | None = None,
    ) -> torch.Tensor:
        """``(B, ceil(T / 2), D), skip (B, T, D) -> (B, T, D)``, or with packed layouts the
        reduced rows and the full-rate skip rows -> full-rate rows."""
        x = self.linear(x)
        if reduced is not None and reduced.packed:
            if layout is None:
                raise ValueError("a packed reduced layout needs the full-rate layout too")
            padded = reduced.to_padded(x)  # zeros at padded reduced steps
            source = layout.upsampling_index(padded.shape[1])
            return skip + padded.reshape(-1, padded.shape[-1]).index_select(0, source)
        if reduced is not None:
            x = _zero_padding(x, reduced.mask)
        x = x.repeat_interleave(2, dim=1)[:, : skip.shape[1]]  # (B, ceil(T / 2), D) -> (B, T, D)
        return skip + x


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sine/cosine encoding (Vaswani et al. 2017), ``T -> (T, D)``; any length works.

    A table of ``max_len`` steps is precomputed (not saved in the state dict); longer sequences
    are computed on the fly.
    """

    def __init__(self, d_model: int, max_len: int = 1024) -> None:
        super().__init__()
        self.d_model = d_model
        self.register_buffer("table", self._compute(max_len, d_model), persistent=False)

    @staticmethod
    def _compute(length: int, d_model: int, device: torch.device | None = None) -> torch.Tensor:
        position = torch.arange(length, dtype=torch.float32, device=device)[:, None]  # (T, 1)
        div = torch.exp(
            torch.arange(0, d_model, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / d_model)
        )  # (ceil(D / 2),)
        table = torch.zeros(length, d_model, device=device)
        table[:, 0::2] = torch.sin(position * div)
        table[:, 1::2] = torch.cos(position * div)[:, : d_model // 2]
        return table

    def forward(self, length: int) -> torch.Tensor:
        """The encoding of positions ``0 .. length - 1``: ``(length, D)``."""
        if length <= self.table.shape[0]:
            return self.table[:length]
        return self._compute(length, self.d_model, self.table.device)


class LearnedPositionalEncoding(nn.Module):
    """A learned vector per position, ``T -> (T, D)``, for ``T <= max_len``."""

    def __init__(self, d_model: int, max_len: int = 1024) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(max_len, d_model) * 0.02)

    def forward(self, length: int) -> torch.Tensor:
        """The encoding of positions ``0 .. length - 1``: ``(length, D)``."""
        if length > self.table.shape[0]:
            raise ValueError(
                f"sequence length {length} exceeds max_len={self.table.shape[0]} of the learned "
                "positional encoding; build the encoder with a larger max_len or crop the sequences"
            )
        return self.table[:length]


@contextmanager
def _running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Within the block, :class:`MaskedBatchNorm1d` layers normalise as usual but update nothing."""
    norms = [m for m in module.modules() if isinstance(m, MaskedBatchNorm1d)]
    previous = [m.update_running_stats for m in norms]
    for m in norms:
        m.update_running_stats = False
    try:
        yield
    finally:
        for m, flag in zip(norms, previous, strict=True):
            m.update_running_stats = flag


class SqueezeformerEncoder(nn.Module):
    """Squeezeformer encoder: ``x (B, T, d_model), mask (B, T) -> (B, T, d_model), mask``.

    Args:
        d_model: width of the input and of every block.
        num_blocks: number of :class:`SqueezeformerBlock`.
        num_heads: attention heads (must divide ``d_model``).
        ff_dim: hidden width of the feed-forward modules.
        conv_kernel: depthwise convolution kernel (odd).
        conv_expansion: channel expansion of the conv module's first pointwise layer.
        dropout: dropout on the input and on every module output.
        attention_dropout: dropout on attention probabilities (training only).
        time_reduction: the temporal U-Net (reduce, run the middle blocks at half rate, recover).
        reduce_after_block: 0-based index of the block after which time is halved; default
            ``max(0, (num_blocks - 1) // 2 - 1)`` (6 of 16 as in the paper, 2 of 8).
        recover_before_block: 0-based index of the block before which full rate is recovered
            (``num_blocks`` = after the last block); default ``num_blocks - 1``.
        positional_encoding: ``"sinusoidal"``, ``"learned"`` or ``"none"``, added once at the input.
        max_len: longest sequence of the learned encoding (the sinusoidal table's size).
        gradient_checkpointing: recompute each block in the backward pass to save memory
            (training only; the BatchNorm running statistics are still updated once per step).
        pack_padded_steps: run the per-step layers on the real steps only (a packed
            :class:`~codes.models.masking.StepLayout`); attention and convolutions still see the
            padded batch. Same results as the padded computation up to float rounding, less
            work the more padding there is. On the CPU only: on other devices and inside
            ``torch.compile`` the padded computation runs (the number of real steps is
            data-dependent; reading it would synchronise a GPU with the host).

    Outputs at padded steps are zero; the returned mask is the input mask (same ``T``).
    """

    def __init__(
        self,
        d_model: int = 256,
        num_blocks: int = 8,
        num_heads: int = 8,
        ff_dim: int = 1024,
        conv_kernel: int = 31,
        conv_expansion: int = 2,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        time_reduction: bool = True,
        reduce_after_block: int | None = None,
        recover_before_block: int | None = None,
        positional_encoding: str = "sinusoidal",
        max_len: int = 1024,
        gradient_checkpointing: bool = False,
        pack_padded_steps: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("d_model", d_model),
            ("num_blocks", num_blocks),
            ("num_heads", num_heads),
            ("ff_dim", ff_dim),
            ("conv_expansion", conv_expansion),
            ("max_len", max_len),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if d_model % num_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        if not isinstance(conv_kernel, int) or conv_kernel < 1 or conv_kernel % 2 == 0:
            raise ValueError(
                f"conv_kernel must be a positive odd integer ('same' padding), got {conv_kernel!r}"
            )
        for name, value in (("dropout", dropout), ("attention_dropout", attention_dropout)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if positional_encoding not in POSITIONAL_ENCODINGS:
            raise ValueError(
                f"positional_encoding must be one of {POSITIONAL_ENCODINGS}, got {positional_encoding!r}"
            )
        if reduce_after_block is None:
            reduce_after_block = max(0, (num_blocks - 1) // 2 - 1)
        if recover_before_block is None:
            recover_before_block = num_blocks - 1
        if time_reduction:
            if not 0 <= reduce_after_block < num_blocks:
                raise ValueError(
                    f"reduce_after_block must be a block index in [0, {num_blocks - 1}], got {reduce_after_block}"
                )
            if not reduce_after_block + 1 < recover_before_block <= num_blocks:
                raise ValueError(
                    f"recover_before_block must be in [reduce_after_block + 2, num_blocks] = "
                    f"[{reduce_after_block + 2}, {num_blocks}] so that at least one block runs at the "
                    f"reduced rate, got {recover_before_block}; with few blocks set time_reduction=False"
                )

        self.d_model = d_model
        self.time_reduction = time_reduction
        self.reduce_after_block = reduce_after_block
        self.recover_before_block = recover_before_block
        self.gradient_checkpointing = gradient_checkpointing
        self.pack_padded_steps = pack_padded_steps
        if positional_encoding == "sinusoidal":
            self.positional_encoding: nn.Module | None = SinusoidalPositionalEncoding(d_model, max_len)
        elif positional_encoding == "learned":
            self.positional_encoding = LearnedPositionalEncoding(d_model, max_len)
        else:
            self.positional_encoding = None
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            SqueezeformerBlock(
                d_model, num_heads, ff_dim, conv_kernel, conv_expansion, dropout, attention_dropout
            )
            for _ in range(num_blocks)
        )
        self.time_reduce = TimeReduction(d_model) if time_reduction else None
        self.time_recover = TimeRecovery(d_model) if time_reduction else None

    def packs(self, x: torch.Tensor) -> bool:
        """Whether a forward pass on ``x`` runs packed: ``pack_padded_steps``, on the CPU, not compiling."""
        return self.pack_padded_steps and x.device.type == "cpu" and not torch.compiler.is_compiling()

    def _run_block(self, block: SqueezeformerBlock, x: torch.Tensor, mask: StepLayout) -> torch.Tensor:
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return block(x, mask)
        calls = 0

        def run(x: torch.Tensor, mask: StepLayout) -> torch.Tensor:
            nonlocal calls
            calls += 1
            if calls == 1:
                return block(x, mask)
            with _running_stats_frozen(block):  # the recomputation in the backward pass
                return block(x, mask)

        return checkpoint(run, x, mask, use_reentrant=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, T, D), (B, T) bool -> (B, T, D), (B, T)``; padded outputs are zero."""
        check_mask(x, mask)
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, T, {self.d_model}), got {tuple(x.shape)}")
        full_mask = mask
        x = _zero_padding(x, mask)
        if self.positional_encoding is not None:
            x = x + self.positional_encoding(x.shape[1]).to(x.dtype)  # (T, D) broadcast over B
        full = StepLayout(mask, packed=self.packs(x))
        layout = full
        x = self.input_dropout(full.to_rows(x))  # (B, T, D) -> rows
        skip = None
        for i, block in enumerate(self.blocks):
            if self.time_recover is not None and i == self.recover_before_block:
                x, layout = self.time_recover(x, skip, layout, full), full  # reduced -> full rate
            x = self._run_block(block, x, layout)
            if self.time_reduce is not None and i == self.reduce_after_block:
                skip = x
                x, layout = self.time_reduce(x, layout)  # T -> ceil(T / 2) steps
        if self.time_recover is not None and self.recover_before_block == len(self.blocks):
            x, layout = self.time_recover(x, skip, layout, full), full
        x = full.to_padded(x) if full.packed else _zero_padding(x, full_mask)
        return x, full_mask
