"""A Hugging Face attention implementation: SDPA, with the cheap dropout mask when training on CPU.

``transformers`` runs attention through a registry (``AttentionInterface``) keyed by the
config's ``attn_implementation``. Its ``"sdpa"`` entry calls ``scaled_dot_product_attention``;
on a CPU with attention dropout that call has no fused kernel and falls back to the plain
softmax math with a ``bernoulli_`` mask, the slow part of CPU dropout
(:mod:`codes.models.cpu_fast_paths.dropout`). :data:`SDPA_CHEAP_CPU_DROPOUT` names an entry that

- delegates to the library's ``"sdpa"`` function unchanged on GPU, in eval mode, without
  dropout, and inside ``torch.compile``;
- otherwise (training on CPU with dropout) computes the same softmax attention itself with
  :func:`codes.models.cpu_fast_paths.attention.attention_with_dropout` (the cheap mask, fewer
  passes over the scores).

The mask function registered under the same name is the library's SDPA one, so masks are built
exactly as for ``"sdpa"``. Models are built with ``"sdpa"``;
:func:`codes.models.cpu_fast_paths.enable_cpu_fast_paths` switches a ``BertModel`` to this entry
(``set_attn_implementation``).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from codes.models.cpu_fast_paths.attention import attention_with_dropout

__all__ = ["SDPA_CHEAP_CPU_DROPOUT", "sdpa_with_cheap_cpu_dropout"]

SDPA_CHEAP_CPU_DROPOUT = "sdpa_cheap_cpu_dropout"


def sdpa_with_cheap_cpu_dropout(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``(B, H, Q, d), (B, H, K, d), (B, H, K, d)`` -> ``(B, Q, H, d)``, as the library's SDPA entry."""
    if (
        dropout == 0.0
        or query.device.type != "cpu"
        or torch.compiler.is_compiling()
        or key.shape[1] != query.shape[1]  # grouped key/value heads: leave them to the library
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # the mask: boolean (True = attend), additive, or None
    output = attention_with_dropout(query, key, value, attention_mask, dropout, scaling)  # (B, H, Q, d)
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(SDPA_CHEAP_CPU_DROPOUT, sdpa_with_cheap_cpu_dropout)
AttentionMaskInterface.register(SDPA_CHEAP_CPU_DROPOUT, sdpa_mask)
