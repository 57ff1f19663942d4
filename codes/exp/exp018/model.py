"""The model: Squeezeformer over the per-step features, then a CLS token and a BertModel head.

features (B, T, F) -> Linear projection (B, T, D) -> SqueezeformerEncoder (B, T, D)
-> projection to the BERT width H when H != D (B, T, H) -> prepend a learnable CLS token
(B, 1 + T, H), the CLS position added to the mask -> ``transformers.BertModel`` on
``inputs_embeds`` with ``attention_mask`` (padded steps are never attended to) -> the CLS
output (B, H) -> concat the demographics encoding (B, H + E) -> an 18-way gesture head and a
target-vs-non-target head. The BertModel is built from a ``BertConfig``: no pretrained weights,
nothing downloaded.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertModel

from codes.common.schema import NUM_GESTURES
from codes.models.bert_attention import SDPA_CHEAP_CPU_DROPOUT
from codes.models.demographics import DemographicsEncoder
from codes.models.dropout import replace_dropout_modules
from codes.models.masking import check_mask, to_attention_mask
from codes.models.squeezeformer import SqueezeformerEncoder

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


class ModelConfigError(ValueError):
    """A model setting that cannot work, found at start-up."""


def classification_head(in_dim: int, hidden_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim)
    )


def build_bert_config(cfg, max_len: int) -> BertConfig:
    """A ``BertConfig`` for the head, validated with errors that name the setting to change."""
    bert = cfg.bert
    hidden = bert.hidden_size or cfg.d_model
    if hidden % bert.num_heads != 0:
        raise ModelConfigError(
            f"model.bert.hidden_size ({hidden}) must be divisible by model.bert.num_heads ({bert.num_heads})"
        )
    if bert.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ModelConfigError(
            f"model.bert.attn_implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {bert.attn_implementation!r}"
        )
    positions = bert.max_position_embeddings or max_len + 1
    if positions < max_len + 1:
        raise ModelConfigError(
            f"model.bert.max_position_embeddings ({positions}) must cover data.max_len + 1 = {max_len + 1} "
            "(the sequence plus the CLS token)"
        )
    return BertConfig(
        vocab_size=1,  # token ids are never used: the input is inputs_embeds
        type_vocab_size=1,
        hidden_size=hidden,
        num_hidden_layers=bert.num_layers,
        num_attention_heads=bert.num_heads,
        intermediate_size=bert.intermediate_size or 4 * hidden,
        hidden_dropout_prob=bert.hidden_dropout,
        attention_probs_dropout_prob=bert.attention_dropout,
        max_position_embeddings=positions,
        # "sdpa" runs as the library's SDPA, except for training on CPU where attention dropout
        # uses the cheap mask (codes.models.bert_attention)
        attn_implementation=SDPA_CHEAP_CPU_DROPOUT if bert.attn_implementation == "sdpa" else "eager",
    )


class GestureClassifier(nn.Module):
    """Returns ``{"gesture_logits": (B, 18), "target_logit": (B,)}``."""

    def __init__(self, n_features: int, cfg, max_len: int) -> None:
        super().__init__()
        bert_config = build_bert_config(cfg, max_len)
        hidden = bert_config.hidden_size
        self.input_projection = nn.Linear(n_features, cfg.d_model)
        self.encoder = SqueezeformerEncoder(
            d_model=cfg.d_model,
            num_blocks=cfg.num_blocks,
            num_heads=cfg.num_heads,
            ff_dim=cfg.ff_dim,
            conv_kernel=cfg.conv_kernel,
            conv_expansion=cfg.conv_expansion,
            dropout=cfg.dropout,
            attention_dropout=cfg.attention_dropout,
            time_reduction=cfg.time_reduction,
            positional_encoding=cfg.positional_encoding,
            max_len=max_len,
        )
        self.bert_projection = nn.Linear(cfg.d_model, hidden) if hidden != cfg.d_model else nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden))
        self.bert = BertModel(bert_config, add_pooling_layer=False)
        replace_dropout_modules(self.bert)  # the cheap CPU dropout mask, same probabilities
        if cfg.bert.gradient_checkpointing:
            self.bert.gradient_checkpointing_enable()
        self.demographics_encoder = (
            DemographicsEncoder(out_dim=cfg.demographics_dim) if cfg.use_demographics else None
        )
        fused_dim = hidden + (cfg.demographics_dim if cfg.use_demographics else 0)
        self.gesture_head = classification_head(fused_dim, hidden, NUM_GESTURES, cfg.head_dropout)
        self.target_head = classification_head(fused_dim, hidden // 2, 1, cfg.head_dropout)

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
        out = self.bert(
            inputs_embeds=x, attention_mask=to_attention_mask(mask), output_attentions=output_attentions
        )
        return out.last_hidden_state, mask, out.attentions

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor, demographics: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        hidden, _, _ = self.encode(features, mask)
        pooled = hidden[:, 0]  # the CLS output (B, H)
        if self.demographics_encoder is not None:
            encoded = self.demographics_encoder(demographics, batch_size=features.shape[0])
            pooled = torch.cat([pooled, encoded], dim=-1)  # (B, H) -> (B, H + E)
        return {
            "gesture_logits": self.gesture_head(pooled),
            "target_logit": self.target_head(pooled).squeeze(-1),
        }
