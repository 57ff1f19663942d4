"""The model: Squeezeformer over the per-step features, pooled, fused with demographics.

features (B, T, F) -> Linear projection (B, T, D) -> SqueezeformerEncoder (positional
information added at its input) -> masked mean and max pooling (B, 2D) -> concat the
demographics encoding (B, 2D + E) -> an 18-way gesture head and a target-vs-non-target head.
"""

from __future__ import annotations

import torch
from torch import nn

from codes.common.schema import NUM_GESTURES
from codes.models.demographics import DemographicsEncoder
from codes.models.masking import check_mask, masked_max, masked_mean
from codes.models.squeezeformer import SqueezeformerEncoder


def classification_head(in_dim: int, hidden_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.SiLU(), nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim)
    )


class GestureClassifier(nn.Module):
    """Returns ``{"gesture_logits": (B, 18), "target_logit": (B,)}``."""

    def __init__(self, n_features: int, cfg, max_len: int) -> None:
        super().__init__()
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
        self.use_demographics = cfg.use_demographics
        self.demographics_encoder = (
            DemographicsEncoder(out_dim=cfg.demographics_dim) if cfg.use_demographics else None
        )
        fused_dim = 2 * cfg.d_model + (cfg.demographics_dim if cfg.use_demographics else 0)
        self.gesture_head = classification_head(fused_dim, cfg.d_model, NUM_GESTURES, cfg.head_dropout)
        self.target_head = classification_head(fused_dim, cfg.d_model // 2, 1, cfg.head_dropout)

    def pool(self, encoded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, 2D): mean and max over real steps only."""
        return torch.cat([masked_mean(encoded, mask), masked_max(encoded, mask)], dim=-1)

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor, demographics: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        check_mask(features, mask)
        x = self.input_projection(features)  # (B, T, F) -> (B, T, D)
        x, mask = self.encoder(x, mask)
        pooled = self.pool(x, mask)  # (B, T, D) -> (B, 2D)
        if self.demographics_encoder is not None:
            encoded = self.demographics_encoder(demographics, batch_size=features.shape[0])
            pooled = torch.cat([pooled, encoded], dim=-1)  # (B, 2D) -> (B, 2D + E)
        return {
            "gesture_logits": self.gesture_head(pooled),
            "target_logit": self.target_head(pooled).squeeze(-1),
        }


def build_model(cfg, n_features: int) -> GestureClassifier:
    """The model of a fold from a run's config, as training and inference build it."""
    return GestureClassifier(n_features, cfg.model, cfg.data.max_len)
