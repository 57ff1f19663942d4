"""The CLS token's attention row of chosen BERT layers, without giving up fused attention (SDPA).

Forward hooks on the chosen layers' ``query`` and ``key`` Linears keep their outputs (tensors the
layer computes anyway) while :meth:`ClsAttentionRecorder.recording` is on; :meth:`rows` then
recomputes only the CLS query row, ``softmax(q_cls . K^T / sqrt(d_head))`` over the non-padded
keys, in float32 (also under bf16 autocast, where the matmul would run in bf16, about 2e-3 off).
The layers themselves still run through SDPA. The row is the attention distribution before
attention dropout; in eval mode it equals the eager ``output_attentions`` row.

The recorder is a child module without parameters and its hooks are its bound methods, so a
copy of the model (``copy.deepcopy``, as the EMA makes) records into its own copy. NoiseBERT
pretraining (``codes/noisebert/model.py``) and fine-tuning with the attention penalty (exp022)
share it.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

__all__ = ["ATTENTION_LAYERS", "ClsAttentionRecorder"]

ATTENTION_LAYERS = ("last", "all")


class ClsAttentionRecorder(nn.Module):
    """Records the query and key outputs of ``bert``'s chosen layers (``"last"`` or ``"all"``)."""

    def __init__(self, bert: nn.Module, attention_layers: str = "last") -> None:
        super().__init__()
        if attention_layers not in ATTENTION_LAYERS:
            raise ValueError(f"attention_layers must be one of {ATTENTION_LAYERS}, got {attention_layers!r}")
        layers = bert.encoder.layer
        self.layer_indices = list(range(len(layers))) if attention_layers == "all" else [len(layers) - 1]
        self.num_heads = bert.config.num_attention_heads
        self.active = False
        self._captured: dict[tuple[int, str], torch.Tensor] = {}
        self._handles = []
        for index in self.layer_indices:
            attention = layers[index].attention.self
            self._handles.append(attention.query.register_forward_hook(partial(self._keep, (index, "query"))))
            self._handles.append(attention.key.register_forward_hook(partial(self._keep, (index, "key"))))

    def _keep(self, name: tuple[int, str], module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self.active:
            self._captured[name] = output  # (B, 1 + T, H)

    def start(self) -> None:
        """Record the next forward pass (the previous recording is dropped)."""
        self._captured.clear()
        self.active = True

    def stop(self) -> None:
        self.active = False

    def remove(self) -> None:
        """Take the hooks off the BERT layers (a recorder attached for one measurement)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def row(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The CLS row of one layer: ``query, key (B, 1 + T, H), mask (B, 1 + T)`` -> ``(B, heads, 1 + T)``."""
        b, n, hidden = key.shape
        head_dim = hidden // self.num_heads
        # float32 even under bf16/fp16 autocast (which would run the matmul in bf16, ~2e-3 off)
        with torch.autocast(device_type=query.device.type, enabled=False):
            q_cls = query[:, 0].reshape(b, self.num_heads, 1, head_dim).float()  # (B, heads, 1, d)
            keys = key.reshape(b, n, self.num_heads, head_dim).transpose(1, 2).float()  # (B, heads, 1 + T, d)
            scores = (
                torch.matmul(q_cls, keys.transpose(-2, -1)).squeeze(2) * head_dim**-0.5
            )  # (B, heads, 1 + T)
            scores = scores.masked_fill(~mask[:, None, :], float("-inf"))  # the CLS key is always real
            return torch.softmax(scores, dim=-1)

    def rows(self, full_mask: torch.Tensor) -> torch.Tensor:
        """``(B, layers, heads, T)``: the recorded layers' CLS rows over the step keys (the CLS key
        itself left out), 0 at padded steps; ``full_mask (B, 1 + T)`` includes the CLS position."""
        missing = [i for i in self.layer_indices if (i, "query") not in self._captured]
        if missing:
            raise RuntimeError(f"no recorded forward pass for BERT layers {missing}: call start() before it")
        rows = [
            self.row(self._captured[(i, "query")], self._captured[(i, "key")], full_mask)
            for i in self.layer_indices
        ]
        self._captured.clear()
        return torch.stack(rows, dim=1)[..., 1:]
