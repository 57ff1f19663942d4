"""CPU training speed-ups for models built from the shared blocks, behind one switch.

The model code (:mod:`codes.models.squeezeformer`, the ``BertModel`` of
:mod:`codes.models.bert_config`) is plain PyTorch. Three of its operations are slow when training
on a CPU, and this package has a faster form of each:

- dropout: ``bernoulli_`` draws one random float per element;
  :class:`~codes.models.cpu_fast_paths.dropout.CheapDropout` draws 16 random bits per element;
- attention with dropout: ``scaled_dot_product_attention`` has no fused CPU kernel with dropout;
  :func:`~codes.models.cpu_fast_paths.attention.attention_with_dropout` computes it in fewer
  passes (the Squeezeformer's attention and BERT's ``"sdpa"`` entry alike);
- the weight gradient of the depthwise convolution, several times slower than its forward pass
  in oneDNN; :mod:`codes.models.cpu_fast_paths.depthwise_conv` computes it as a convolution;
- large tensors (attention scores over a few hundred steps) page-fault at every step because
  glibc's ``malloc`` maps blocks above 32 MiB afresh each time;
  :func:`~codes.models.cpu_fast_paths.allocator.keep_freed_cpu_memory` makes it reuse freed memory
  (process-wide, called by :func:`enable_cpu_fast_paths`; ``CMI_KEEP_FREED_MEMORY=0`` switches it off).

:func:`enable_cpu_fast_paths` swaps them into a built model, in place:

============================================  ============================================
plain module                                  becomes
============================================  ============================================
``nn.Dropout`` inside a Squeezeformer module  :class:`CheapDropout` (same ``p``)
or a ``transformers.BertModel``
``MultiHeadSelfAttention``                    :class:`CheapDropoutSelfAttention`
``MaskedDepthwiseConv1d``                     :class:`FastWeightGradDepthwiseConv1d`
``BertModel`` with ``"sdpa"`` attention       ``set_attn_implementation(SDPA_CHEAP_CPU_DROPOUT)``
============================================  ============================================

Other dropouts (the classification heads, the demographics encoder) stay native, and so does a
BERT with ``"eager"`` attention (its dropouts are swapped). Modules are swapped by setting their
class to a subclass that adds no state: parameters, buffers, hooks and state-dict keys are
unchanged, and an optimizer built before the switch keeps working.

Each fast path checks when it runs that it is training on CPU (float32 outside autocast where it
matters, never inside ``torch.compile``) and otherwise runs the plain operation, so an enabled
model moved to a GPU computes what the plain model does. Training loops call the switch when
their device is the CPU; on a GPU nothing here runs.

Results: the same distributions as the plain model, the same values up to float rounding with
dropout off. The cheap masks use the random bits of PyTorch's default generator differently from
``bernoulli_``: an enabled model is repeatable under ``torch.manual_seed`` but draws other dropout
masks than the plain model.
"""

from __future__ import annotations

from torch import nn
from transformers import BertModel

from codes.models.cpu_fast_paths.allocator import keep_freed_cpu_memory
from codes.models.cpu_fast_paths.attention import CheapDropoutSelfAttention
from codes.models.cpu_fast_paths.bert_attention import SDPA_CHEAP_CPU_DROPOUT
from codes.models.cpu_fast_paths.depthwise_conv import FastWeightGradDepthwiseConv1d
from codes.models.cpu_fast_paths.dropout import CheapDropout
from codes.models.squeezeformer import (
    ConvModule,
    FeedForwardModule,
    MaskedDepthwiseConv1d,
    MultiHeadSelfAttention,
    SqueezeformerBlock,
    SqueezeformerEncoder,
)

__all__ = ["cpu_fast_paths_enabled", "enable_cpu_fast_paths"]

# the modules whose nn.Dropout children take the cheap mask
_DROPOUT_SCOPES = (
    SqueezeformerEncoder,
    SqueezeformerBlock,
    FeedForwardModule,
    ConvModule,
    MultiHeadSelfAttention,
    BertModel,
)
# plain class -> its fast subclass (exact types only: other subclasses are left alone)
_FAST_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    MultiHeadSelfAttention: CheapDropoutSelfAttention,
    MaskedDepthwiseConv1d: FastWeightGradDepthwiseConv1d,
}


def _use_cheap_dropout_attention(bert: BertModel) -> None:
    """Switch a ``"sdpa"`` BERT to the SDPA entry with the cheap CPU dropout; ``"eager"`` stays."""
    if bert.config._attn_implementation != "sdpa":
        return
    bert.set_attn_implementation(SDPA_CHEAP_CPU_DROPOUT)
    if bert.config._attn_implementation != SDPA_CHEAP_CPU_DROPOUT:  # the library declined
        raise RuntimeError(
            f"{type(bert).__name__} kept attn_implementation={bert.config._attn_implementation!r} "
            f"instead of {SDPA_CHEAP_CPU_DROPOUT!r}; this transformers version cannot switch it"
        )


def enable_cpu_fast_paths(model: nn.Module) -> nn.Module:
    """Swap the CPU fast paths into ``model`` in place (see the module docstring); returns ``model``.

    Call it on a built model (before or after ``.to(device)``, before or after the optimizer is
    made); calling it again changes nothing. It also makes this process's ``malloc`` keep freed
    memory for reuse (:func:`~codes.models.cpu_fast_paths.allocator.keep_freed_cpu_memory`).
    """
    keep_freed_cpu_memory()
    for module in model.modules():
        fast = _FAST_CLASSES.get(type(module))
        if fast is not None:
            module.__class__ = fast
        if isinstance(module, BertModel):
            _use_cheap_dropout_attention(module)
        if isinstance(module, _DROPOUT_SCOPES):
            for child in module.modules():
                if type(child) is nn.Dropout:
                    child.__class__ = CheapDropout
    return model


def cpu_fast_paths_enabled(model: nn.Module) -> bool:
    """Whether any CPU fast path is in ``model`` (a fast module, or a BERT on the cheap entry)."""
    fast_types = (CheapDropout, *_FAST_CLASSES.values())
    return any(
        isinstance(module, fast_types)
        or (isinstance(module, BertModel) and module.config._attn_implementation == SDPA_CHEAP_CPU_DROPOUT)
        for module in model.modules()
    )
