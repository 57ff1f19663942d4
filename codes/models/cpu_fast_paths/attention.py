"""Softmax attention with dropout on attention probabilities, in few passes on a CPU.

``scaled_dot_product_attention`` has no fused CPU kernel with dropout: training on a CPU falls
back to plain math with one full pass over the ``(B, H, Q, K)`` scores per step (scale, mask,
softmax, ``bernoulli_`` mask, multiply) and as many again backward. :func:`attention_with_dropout`
computes the same attention with fewer passes:

- the scale multiplies the queries ``(B, H, Q, d)``, not the scores (``K / d`` times smaller);
- the mask is an additive bias (a boolean mask becomes ``0 / -inf``) added in place, built at
  the mask's own size: a mask expanded over the queries (what ``transformers`` passes, a
  ``(B, 1, Q, K)`` view of ``(B, 1, 1, K)``) gives a ``(B, 1, 1, K)`` bias;
- dropped probabilities are zeroed with the cheap bit mask of :mod:`codes.models.cpu_fast_paths.dropout`
  (one ``where`` with a bool mask, no float mask), and the ``1 / (1 - p)`` rescaling is applied
  to the ``(B, H, Q, d)`` output instead of the probabilities;
- the backward pass is written out: two matrix products per input, one ``masked_fill`` and the
  fused softmax backward.

The result has the distribution of ``softmax(q k^T * scale + mask)`` with dropout, then ``@ v``
(the drop probability rounded to a multiple of 1/65536, the rescaling exact). It runs for float32
tensors on CPU outside autocast and ``torch.compile``; :func:`attention_with_dropout` falls back
to the plain composition of the same operations elsewhere.

:class:`CheapDropoutSelfAttention` is the Squeezeformer's :class:`MultiHeadSelfAttention` with
this attention when training on CPU with attention dropout (SDPA otherwise).
"""

from __future__ import annotations

import torch

from codes.models.cpu_fast_paths.dropout import drop_levels_of, drop_mask, dropout
from codes.models.squeezeformer import MultiHeadSelfAttention

__all__ = ["CheapDropoutSelfAttention", "attention_with_dropout", "key_mask_bias"]


def key_mask_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """An attention mask as an additive bias: a boolean one (True = attend) becomes 0 where
    attended and ``-inf`` elsewhere; an additive one is returned as is (in ``dtype``).

    Dimensions along which the mask is a broadcast view (stride 0, e.g. the queries of a
    ``(B, 1, 1, K)`` mask expanded to ``(B, 1, Q, K)``) stay of size 1 in the bias: the same
    values broadcast in the addition, without materialising them."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    index = tuple(slice(0, 1) if stride == 0 else slice(None) for stride in mask.stride())
    mask = mask[index]
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class _AttentionWithDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, drop_levels: int, scale: float):
        scaled_q = q * scale  # (B, H, Q, d)
        scores = torch.matmul(scaled_q, k.transpose(-2, -1))  # (B, H, Q, K)
        if bias is not None:
            scores.add_(bias)
        probs = torch.softmax(scores, dim=-1)
        del scores
        dropped_mask = drop_mask(probs.shape, drop_levels, probs.device)
        # one pass (masked_fill copies, then fills); a 0-dim zero is faster than a Python scalar
        kept = torch.where(dropped_mask, probs.new_zeros(()), probs)
        keep_scale = 65536.0 / (65536 - drop_levels)
        out = torch.matmul(kept, v).mul_(keep_scale)  # (B, H, Q, d)
        ctx.save_for_backward(scaled_q, k, v, probs, kept, dropped_mask)
        ctx.scale, ctx.keep_scale = scale, keep_scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        scaled_q, k, v, probs, kept, dropped_mask = ctx.saved_tensors
        grad_out = grad_out * ctx.keep_scale
        grad_q = grad_k = grad_v = None
        if ctx.needs_input_grad[2]:
            grad_v = torch.matmul(kept.transpose(-2, -1), grad_out)  # (B, H, K, d)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_probs = torch.matmul(grad_out, v.transpose(-2, -1)).masked_fill_(dropped_mask, 0.0)
            grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
            del grad_probs
            if ctx.needs_input_grad[0]:
                grad_q = torch.matmul(grad_scores, k).mul_(ctx.scale)
            if ctx.needs_input_grad[1]:
                grad_k = torch.matmul(grad_scores.transpose(-2, -1), scaled_q)
        return grad_q, grad_k, grad_v, None, None, None


def attention_with_dropout(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    dropout_p: float,
    scale: float | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale, masked) -> dropout -> @ v`` for training.

    ``q`` ``(B, H, Q, d)``, ``k``/``v`` ``(B, H, K, d)``; ``mask`` broadcastable to ``(B, H, Q, K)``:
    boolean (True = may attend), additive (added to the scaled scores), or None. Returns
    ``(B, H, Q, d)``. A query with no key to attend gets NaN, as in plain softmax attention:
    callers keep at least one key per query.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    levels = drop_levels_of(dropout_p)
    fast = (
        0 < levels
        and q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )
    if fast:
        return _AttentionWithDropout.apply(q, k, v, key_mask_bias(mask, q.dtype), levels, scale)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = dropout(torch.softmax(scores, dim=-1), dropout_p)
    return torch.matmul(probs.to(v.dtype), v)


class CheapDropoutSelfAttention(MultiHeadSelfAttention):
    """:class:`MultiHeadSelfAttention` (same arguments, same state) whose attention, when training
    on CPU with attention dropout, is :func:`attention_with_dropout`; SDPA everywhere else."""

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor,
        dropout_p: float,
    ) -> torch.Tensor:
        if dropout_p > 0.0 and q.device.type == "cpu" and not torch.compiler.is_compiling():
            return attention_with_dropout(q, k, v, key_mask, dropout_p)  # (B, H, T, D/H)
        return super().attend(q, k, v, key_mask, dropout_p)
