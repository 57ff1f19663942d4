"""The one mask convention of the models, and the one place that converts it for libraries.

Every model in this repository takes a boolean ``mask`` of shape ``(B, T)`` with
**True = real step** and False = padding (``codes.common.sequences.pad_sequences`` writes it
that way). Libraries that want something else get it from the helpers here, never by an inline
``~mask`` or ``mask.long()`` somewhere in a model:

- :func:`to_key_padding_mask`: ``nn.MultiheadAttention`` / ``nn.TransformerEncoder``
  (True = ignore this key);
- :func:`to_attention_mask`: Hugging Face models (``long`` 1 = real, 0 = padding);
- :func:`to_bert_4d_mask`: the same mask already in the 4-D form a Hugging Face attention gets,
  so that the library builds none (and never reads the mask back from a GPU);
- :func:`sdpa_key_mask`: ``torch.nn.functional.scaled_dot_product_attention``
  (boolean ``(B, 1, 1, T)``, True = may attend).

:class:`StepLayout` lets per-step layers skip padding altogether: in its packed form a batch is
the ``(N, C)`` rows of its N real steps, and only the layers that mix steps (attention,
convolution) see a padded ``(B, T, C)`` tensor, with zeros at the padded steps.

Pooling over time (:func:`masked_mean`, :func:`masked_max`) selects real steps with
``torch.where`` rather than multiplying by the mask, so padded steps never enter a result, even
when they hold huge values, ``inf`` or ``NaN``. A sequence with no real step at all is handled by
a documented rule: it pools to zeros.
"""

from __future__ import annotations

import torch

__all__ = [
    "StepLayout",
    "as_step_layout",
    "check_mask",
    "downsample_mask",
    "lengths_to_mask",
    "masked_max",
    "masked_mean",
    "sdpa_key_mask",
    "to_attention_mask",
    "to_bert_4d_mask",
    "to_key_padding_mask",
]


def check_mask(x: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise a ``ValueError`` unless ``mask`` is a boolean ``(B, T)`` matching ``x`` ``(B, T, ...)``."""
    if mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool tensor (True = real step), got dtype {mask.dtype}; "
            "convert a 0/1 mask with mask.bool()"
        )
    if mask.dim() != 2 or x.dim() < 2 or tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"mask must have shape (B, T) = {tuple(x.shape[:2])} matching the input {tuple(x.shape)}, "
            f"got {tuple(mask.shape)}"
        )


def lengths_to_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """Right-padded mask from real lengths: ``(B,) -> (B, max_len)``, True = real step.

    ``max_len`` defaults to the largest length (which syncs with the device once to read it).
    """
    if max_len is None:
        max_len = int(lengths.max()) if lengths.numel() else 0
    positions = torch.arange(max_len, device=lengths.device)
    return positions[None, :] < lengths[:, None]  # (B,) -> (B, max_len)


def downsample_mask(mask: torch.Tensor, stride: int = 2) -> torch.Tensor:
    """Mask of a sequence downsampled by ``stride``: step ``t`` is real iff input step ``stride * t`` is.

    ``(B, T) -> (B, ceil(T / stride))``, the output length of a convolution with kernel 3,
    padding 1 and this stride. With right padding, a sequence of real length ``n`` keeps
    ``ceil(n / stride)`` real steps.
    """
    return mask[:, ::stride]


def to_key_padding_mask(mask: torch.Tensor) -> torch.Tensor:
    """``key_padding_mask`` for ``nn.MultiheadAttention``: ``(B, T)`` bool, True = ignore (padding)."""
    return ~mask


def to_attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """Hugging Face ``attention_mask``: ``(B, T)`` long, 1 = real step, 0 = padding."""
    return mask.long()


def to_bert_4d_mask(
    mask: torch.Tensor, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A Hugging Face ``attention_mask`` in its 4-D form ``(B, 1, 1, T)``, which the library uses as is.

    Given the 2-D mask, ``transformers`` (5.x, ``masking_utils``) first tests
    ``padding_mask.all()`` to leave the mask out for a batch without padding: a Python ``bool``
    of a device tensor, so on a GPU every forward pass waits there for the queued work. This
    form skips that: ``"eager"`` gets the additive mask (0 = attend, ``finfo(dtype).min`` =
    padding, ``dtype`` the embeddings' dtype), every other implementation the boolean one
    (True = attend), broadcast over heads and queries. The attention is the one the 2-D mask
    gives for a batch with padding; a batch without padding gets an all-True mask where the
    library would pass none (the same values; on a GPU, SDPA then cannot take its flash kernel).
    """
    key = mask[:, None, None, :]  # (B, T) -> (B, 1, 1, T)
    if attn_implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(key, zero, torch.finfo(dtype).min)
    return key


def sdpa_key_mask(mask: torch.Tensor) -> torch.Tensor:
    """Boolean ``attn_mask`` for ``scaled_dot_product_attention``: ``(B, T) -> (B, 1, 1, T)``, True = attend.

    It broadcasts over heads and queries, so every query sees only the real keys of its sequence.
    Rule for a sequence with no real step: its queries may attend to all of its (padded) keys, so
    that the softmax stays finite (no ``NaN`` in the forward or the backward pass); the outputs of
    such a sequence are padding and must be ignored like any other padded output.
    """
    empty = ~mask.any(dim=1, keepdim=True)  # (B, 1)
    return (mask | empty)[:, None, None, :]  # (B, T) -> (B, 1, 1, T)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real steps: ``(B, T, D), (B, T) -> (B, D)``; a sequence with no real step gives zeros."""
    check_mask(x, mask)
    m = mask.unsqueeze(-1)  # (B, T) -> (B, T, 1)
    total = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=1)  # (B, D)
    count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(total.dtype)  # (B, 1)
    return total / count


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Maximum over real steps: ``(B, T, D), (B, T) -> (B, D)``; a sequence with no real step gives zeros.

    Padded steps are replaced by the dtype's lowest value (not ``-inf``, not a multiplication),
    so the result is exact for large negative values and gradients reach only the real maxima.
    """
    check_mask(x, mask)
    m = mask.unsqueeze(-1)  # (B, T) -> (B, T, 1)
    lowest = torch.full((), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device)
    best = torch.where(m, x, lowest).amax(dim=1)  # (B, T, D) -> (B, D)
    any_real = mask.any(dim=1, keepdim=True)  # (B, 1)
    return torch.where(any_real, best, torch.zeros((), dtype=x.dtype, device=x.device))


class StepLayout:
    """Where the real steps of a padded batch are, and how its activations are stored.

    Per-step layers (Linear, LayerNorm, activations, dropout) act on *rows*:

    - packed (``packed=True``): rows are the ``(N, C)`` real steps only, in batch-major order
      (``N = mask.sum()``), so no work is spent on padding;
    - padded (``packed=False``): rows are the ``(B, T, C)`` tensor itself, padding included.

    Layers that mix steps call :meth:`to_padded` (``(B, T, C)``; zeros at the padded steps in
    packed form, arbitrary values in padded form, so they must still mask) and :meth:`to_rows`
    to come back. Both are differentiable. Building a packed layout reads the number of real
    steps (one host synchronisation on a GPU).
    """

    def __init__(self, mask: torch.Tensor, packed: bool) -> None:
        if mask.dtype != torch.bool or mask.dim() != 2:
            raise ValueError(f"mask must be a (B, T) bool tensor, got {tuple(mask.shape)} {mask.dtype}")
        self.mask = mask
        self.packed = packed
        # flat positions (b * T + t) of the real steps
        self.index = mask.reshape(-1).nonzero().squeeze(1) if packed else None
        # no padding at all: packing is a reshape, no copy
        self.all_real = packed and self.index.numel() == mask.numel()

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, C)`` -> rows: ``(N, C)`` packed, ``x`` itself padded."""
        if not self.packed:
            return x
        if self.all_real:
            return x.reshape(-1, x.shape[-1])
        return x.reshape(-1, x.shape[-1]).index_select(0, self.index)

    def to_padded(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows -> ``(B, T, C)``; in packed form the padded steps are zeros."""
        if not self.packed:
            return rows
        b, t = self.mask.shape
        if self.all_real:
            return rows.reshape(b, t, rows.shape[-1])
        padded = rows.new_zeros(b * t, rows.shape[-1]).index_copy(0, self.index, rows)
        return padded.view(b, t, rows.shape[-1])

    def downsampled(self, stride: int = 2) -> StepLayout:
        """The layout after a time reduction by ``stride`` (:func:`downsample_mask`), same form."""
        return StepLayout(downsample_mask(self.mask, stride), self.packed)

    def upsampling_index(self, reduced_length: int, stride: int = 2) -> torch.Tensor:
        """Packed form: for each real step ``(b, t)``, the flat position ``b * T' + t // stride``
        of its source in a padded reduced ``(B, T', C)`` tensor."""
        if not self.packed:
            raise ValueError("upsampling_index is defined for a packed layout only")
        length = self.mask.shape[1]
        return torch.div(self.index, length, rounding_mode="floor") * reduced_length + torch.div(
            self.index % length, stride, rounding_mode="floor"
        )


def as_step_layout(mask: torch.Tensor | StepLayout) -> StepLayout:
    """A :class:`StepLayout` as is; a ``(B, T)`` bool mask as a padded layout."""
    return mask if isinstance(mask, StepLayout) else StepLayout(mask, packed=False)
