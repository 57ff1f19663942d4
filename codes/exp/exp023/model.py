"""The model: Squeezeformer over the per-step features, then a CLS token and a BertModel head.

features (B, T, F) -> Linear projection (B, T, D) -> SqueezeformerEncoder (B, T, D)
-> projection to the BERT width H when H != D (B, T, H) -> prepend a learnable CLS token
(B, 1 + T, H), the CLS position added to the mask -> ``transformers.BertModel`` on
``inputs_embeds`` with ``attention_mask`` (padded steps are never attended to) -> the CLS
output (B, H) -> concat the demographics encoding (B, H + E) -> an 18-way gesture head and a
target-vs-non-target head. The BertModel is built from a ``BertConfig``: no pretrained weights,
nothing downloaded.

With ``cls_attention_layers`` (fine-tuning with the CLS attention penalty) the model records the
CLS token's attention row of those BERT layers (``codes/models/cls_attention.py``, fused attention
kept) and ``forward(..., return_cls_attention=True)`` returns it as ``"cls_attention"``
``(B, layers, heads, T)``.
"""

from __future__ import annotations

import torch
from torch import nn

from codes.common.schema import NUM_GESTURES, ORIENTATIONS
from codes.models.bert_config import ModelConfigError, build_bert, build_bert_config, build_squeezeformer
from codes.models.cls_attention import ClsAttentionRecorder
from codes.models.demographics import DemographicsEncoder
from codes.models.masking import check_mask, masked_max, masked_mean, to_attention_mask, to_bert_4d_mask

HEAD_POOLINGS = ("cls", "cls_mean_max")

__all__ = ["GestureClassifier", "ModelConfigError", "build_model", "classification_head"]


def classification_head(in_dim: int, hidden_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim)
    )


class GestureClassifier(nn.Module):
    """Returns ``{"gesture_logits": (B, 18), "target_logit": (B,)}`` and, with
    ``model.orientation_head``, ``"orientation_logits": (B, 4)``."""

    def __init__(self, n_features: int, cfg, max_len: int, cls_attention_layers: str | None = None) -> None:
        super().__init__()
        hidden = build_bert_config(cfg, max_len).hidden_size  # validates the settings first
        self.input_projection = nn.Linear(n_features, cfg.d_model)
        self.encoder = build_squeezeformer(cfg, max_len)
        self.bert_projection = nn.Linear(cfg.d_model, hidden) if hidden != cfg.d_model else nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        if cfg.cls_init_std > 0:
            nn.init.normal_(self.cls_token, std=cfg.cls_init_std)
        self.bert = build_bert(cfg, max_len)
        if cfg.bert.position_embeddings == "none":
            table = self.bert.embeddings.position_embeddings.weight
            table.requires_grad_(False)
            nn.init.zeros_(table)
        elif cfg.bert.position_embeddings != "learned":
            raise ModelConfigError(
                f"model.bert.position_embeddings must be 'learned' or 'none', got {cfg.bert.position_embeddings!r}"
            )
        if cfg.head_pooling not in HEAD_POOLINGS:
            raise ModelConfigError(
                f"model.head_pooling must be one of {HEAD_POOLINGS}, got {cfg.head_pooling!r}"
            )
        self.head_pooling = cfg.head_pooling
        pooled_dim = hidden * (3 if cfg.head_pooling == "cls_mean_max" else 1)
        self.head_norm = nn.LayerNorm(pooled_dim) if cfg.head_norm else nn.Identity()
        self.demographics_encoder = (
            DemographicsEncoder(out_dim=cfg.demographics_dim) if cfg.use_demographics else None
        )
        fused_dim = pooled_dim + (cfg.demographics_dim if cfg.use_demographics else 0)
        self.gesture_head = classification_head(fused_dim, hidden, NUM_GESTURES, cfg.head_dropout)
        self.target_head = classification_head(fused_dim, hidden // 2, 1, cfg.head_dropout)
        self.orientation_head = (
            classification_head(fused_dim, hidden // 2, len(ORIENTATIONS), cfg.head_dropout)
            if cfg.orientation_head
            else None
        )
        self.cls_attention_recorder = (
            ClsAttentionRecorder(self.bert, cls_attention_layers) if cls_attention_layers else None
        )

    def encode(
        self, features: torch.Tensor, mask: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The BERT outputs over [CLS] + steps: ``(B, 1 + T, H)``, its mask and (eager) attentions."""
        check_mask(features, mask)
        x = self.input_projection(features)  # (B, T, F) -> (B, T, D)
        x, mask = self.encoder(x, mask)
        x = self.bert_projection(x)  # (B, T, D) -> (B, T, H)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)  # (B, T, H) -> (B, 1 + T, H)
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)  # (B, T) -> (B, 1 + T)
        if mask.device.type == "cuda":  # the 4-D form: no padding_mask.all() host sync per forward
            attention_mask = to_bert_4d_mask(mask, self.bert.config._attn_implementation, x.dtype)
        else:  # the CPU keeps exp018's path (its numbers bit for bit)
            attention_mask = to_attention_mask(mask)
        out = self.bert(inputs_embeds=x, attention_mask=attention_mask, output_attentions=output_attentions)
        return out.last_hidden_state, mask, out.attentions

    def forward(
        self,
        features: torch.Tensor,
        mask: torch.Tensor,
        demographics: torch.Tensor | None = None,
        return_cls_attention: bool = False,
    ) -> dict[str, torch.Tensor]:
        recorder = self.cls_attention_recorder
        if return_cls_attention and recorder is None:
            raise ValueError("return_cls_attention needs a model built with cls_attention_layers")
        if return_cls_attention:
            recorder.start()
        try:
            hidden, full_mask, _ = self.encode(features, mask)
        finally:
            if recorder is not None:
                recorder.stop()
        pooled = hidden[:, 0]  # the CLS output (B, H)
        if self.head_pooling == "cls_mean_max":  # + the masked mean and max of the step outputs (B, 3H)
            steps, step_mask = hidden[:, 1:], full_mask[:, 1:]
            pooled = torch.cat([pooled, masked_mean(steps, step_mask), masked_max(steps, step_mask)], dim=-1)
        pooled = self.head_norm(pooled)
        if self.demographics_encoder is not None:
            encoded = self.demographics_encoder(demographics, batch_size=features.shape[0])
            pooled = torch.cat([pooled, encoded], dim=-1)  # (B, H) -> (B, H + E)
        outputs = {
            "gesture_logits": self.gesture_head(pooled),
            "target_logit": self.target_head(pooled).squeeze(-1),
        }
        if self.orientation_head is not None:
            outputs["orientation_logits"] = self.orientation_head(pooled)
        if return_cls_attention:
            outputs["cls_attention"] = recorder.rows(full_mask)  # (B, layers, heads, T)
        return outputs

    def head_parameters(self) -> list[nn.Parameter]:
        """The BERT head's parameters and the CLS token (``trainer.bert_lr_scale`` applies to them)."""
        return [self.cls_token, *self.bert.parameters()]


def build_model(cfg, n_features: int) -> GestureClassifier:
    """The model of a fold from a run's config, as training and inference build it (the CLS
    attention is recorded only when fine-tuning penalises it)."""
    penalised = cfg.finetune.penalty_weight > 0
    return GestureClassifier(
        n_features, cfg.model, cfg.data.max_len, cfg.finetune.penalty_layers if penalised else None
    )
