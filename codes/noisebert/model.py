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

The CLS attention row comes from ``codes/models/cls_attention.py`` (hooks on the chosen BERT
layers' query and key; the layers still run fused attention).
"""

from __future__ import annotations

import torch
from torch import nn

from codes.models.bert_config import build_bert, build_bert_config, build_squeezeformer
from codes.models.cls_attention import ATTENTION_LAYERS, ClsAttentionRecorder
from codes.models.masking import check_mask, to_attention_mask

__all__ = ["ATTENTION_LAYERS", "NoiseBERT"]


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

        self.cls_attention_recorder = ClsAttentionRecorder(self.bert, attention_layers)

    @property
    def attention_layer_indices(self) -> list[int]:
        return self.cls_attention_recorder.layer_indices

    def cls_attention_row(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The CLS row of one layer: ``query, key (B, 1 + T, H), mask (B, 1 + T)`` -> ``(B, heads, 1 + T)``."""
        return self.cls_attention_recorder.row(query, key, mask)

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
        recorder = self.cls_attention_recorder
        if return_cls_attention and not from_output_attentions:
            recorder.start()
        try:
            out = self.bert(
                inputs_embeds=x,
                attention_mask=to_attention_mask(full_mask),
                output_attentions=return_cls_attention and from_output_attentions,
            )
        finally:
            recorder.stop()
        reconstruction = self.reconstruction_head(out.last_hidden_state[:, 1:])  # (B, T, H) -> (B, T, F)
        cls_attention = None
        if return_cls_attention and from_output_attentions:
            rows = [out.attentions[i][:, :, 0] for i in self.attention_layer_indices]  # (B, heads, 1 + T)
            cls_attention = torch.stack(rows, dim=1)[..., 1:]
        elif return_cls_attention:
            cls_attention = recorder.rows(full_mask)  # (B, layers, heads, T): step keys only
        summary = (
            None if self.cls_summary_head is None else self.cls_summary_head(out.last_hidden_state[:, 0])
        )
        return {"reconstruction": reconstruction, "cls_attention": cls_attention, "cls_summary": summary}
