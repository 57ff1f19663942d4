"""NoiseBERT: masked reconstruction over the Squeezeformer + BERT stack, with the CLS attention row.

features (B, T, F), masked steps (B, T) -> Linear projection (B, T, D), the learned MASK
embedding put at masked steps -> SqueezeformerEncoder -> projection to the BERT width H when
H != D -> a learnable CLS token prepended (B, 1 + T, H) -> ``transformers.BertModel`` -> a
per-step reconstruction head on the step outputs (B, T, F).

The stack's modules carry the names exp018's ``GestureClassifier`` gives them
(``input_projection``, ``encoder``, ``bert_projection``, ``cls_token``, ``bert``), so a NoiseBERT
checkpoint initialises exp018 through ``model.init_from`` with the same model settings;
``mask_embedding``, ``reconstruction_head`` and ``cls_summary_head`` (the CLS objective: the
last layer's CLS output predicts a summary of the clean sequence) are pretraining-only.

CLS-to-token attention without giving up fused attention: forward hooks on the chosen BERT
layers' ``query`` and ``key`` Linears keep their outputs (tensors the layer computes anyway), and
only the CLS query row is computed again: ``softmax(q_cls . K^T / sqrt(d_head))`` over the
non-padded keys, ``(B, heads, 1 + T)``. The layers themselves still run through SDPA. The row is
the attention distribution before attention dropout (in eval mode it equals the eager
``output_attentions`` row).
"""

from __future__ import annotations

import torch
from torch import nn

from codes.models.bert_config import build_bert, build_bert_config, build_squeezeformer
from codes.models.masking import check_mask, to_attention_mask

__all__ = ["ATTENTION_LAYERS", "NoiseBERT"]

ATTENTION_LAYERS = ("last", "all")


class NoiseBERT(nn.Module):
    """``forward(features, mask, masked_steps)`` -> ``{"reconstruction": (B, T, F), "cls_attention": (B, L, heads, T),
    "cls_summary": (B, 2F) or None}`` (``cls_summary=True`` builds the CLS objective's head).

    ``cls_attention`` holds the CLS row of the chosen layers (``attention_layers``: ``"last"`` or
    ``"all"``) over the T step keys (the CLS key itself left out), 0 at padded steps; it is
    ``None`` when ``return_cls_attention=False``.
    """

    def __init__(
        self, n_features: int, cfg, max_len: int, attention_layers: str = "last", cls_summary: bool = False
    ) -> None:
        super().__init__()
        if attention_layers not in ATTENTION_LAYERS:
            raise ValueError(f"attention_layers must be one of {ATTENTION_LAYERS}, got {attention_layers!r}")
        hidden = build_bert_config(cfg, max_len).hidden_size  # validates the settings first
        # the same modules, built in the same order, as exp018's GestureClassifier
        self.input_projection = nn.Linear(n_features, cfg.d_model)
        self.encoder = build_squeezeformer(cfg, max_len)
        self.bert_projection = nn.Linear(cfg.d_model, hidden) if hidden != cfg.d_model else nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.bert = build_bert(cfg, max_len)
        self.mask_embedding = nn.Parameter(torch.randn(cfg.d_model) * 0.02)
        self.reconstruction_head = nn.Linear(hidden, n_features)
        # the CLS objective's head (built last, so the other modules keep their initialisation)
        self.cls_summary_head = nn.Linear(hidden, 2 * n_features) if cls_summary else None

        layers = self.bert.encoder.layer
        self.attention_layer_indices = (
            list(range(len(layers))) if attention_layers == "all" else [len(layers) - 1]
        )
        self.num_heads = self.bert.config.num_attention_heads
        self._captured: dict[tuple[int, str], torch.Tensor] = {}
        self._capturing = False
        for index in self.attention_layer_indices:
            attention = layers[index].attention.self
            attention.query.register_forward_hook(self._capture_hook(index, "query"))
            attention.key.register_forward_hook(self._capture_hook(index, "key"))

    def _capture_hook(self, index: int, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self._capturing:
                self._captured[(index, name)] = output  # (B, 1 + T, H)

        return hook

    def cls_attention_row(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
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

    def forward(
        self,
        features: torch.Tensor,
        mask: torch.Tensor,
        masked_steps: torch.Tensor | None = None,
        return_cls_attention: bool = True,
        from_output_attentions: bool = False,
    ) -> dict[str, torch.Tensor | None]:
        """``from_output_attentions=True`` takes the CLS row from BERT's full ``output_attentions``
        maps instead (needs ``attn_implementation=eager``; the slow reference the hooks replace)."""
        check_mask(features, mask)
        x = self.input_projection(features)  # (B, T, F) -> (B, T, D)
        if masked_steps is not None:
            x = torch.where(masked_steps[..., None], self.mask_embedding.to(x.dtype), x)
        x, mask = self.encoder(x, mask)
        x = self.bert_projection(x)  # (B, T, D) -> (B, T, H)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)  # (B, T, H) -> (B, 1 + T, H)
        full_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)  # (B, 1 + T)
        self._captured.clear()
        self._capturing = return_cls_attention and not from_output_attentions
        try:
            out = self.bert(
                inputs_embeds=x,
                attention_mask=to_attention_mask(full_mask),
                output_attentions=return_cls_attention and from_output_attentions,
            )
        finally:
            self._capturing = False
        reconstruction = self.reconstruction_head(out.last_hidden_state[:, 1:])  # (B, T, H) -> (B, T, F)
        cls_attention = None
        if return_cls_attention and from_output_attentions:
            rows = [out.attentions[i][:, :, 0] for i in self.attention_layer_indices]  # (B, heads, 1 + T)
            cls_attention = torch.stack(rows, dim=1)[..., 1:]
        elif return_cls_attention:
            rows = [
                self.cls_attention_row(self._captured[(i, "query")], self._captured[(i, "key")], full_mask)
                for i in self.attention_layer_indices
            ]
            cls_attention = torch.stack(rows, dim=1)[..., 1:]  # (B, layers, heads, T): step keys only
            self._captured.clear()
        summary = (
            None if self.cls_summary_head is None else self.cls_summary_head(out.last_hidden_state[:, 0])
        )
        return {"reconstruction": reconstruction, "cls_attention": cls_attention, "cls_summary": summary}
