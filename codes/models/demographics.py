"""Encoding a subject's demographics row into a vector fused with the sequence representation.

Input: ``(B, 7)`` float tensor in ``DEMOGRAPHIC_FIELDS`` order (adult_child, age, sex,
handedness, height_cm, shoulder_to_wrist_cm, elbow_to_wrist_cm), NaN = missing.
- Continuous fields are scaled with fixed constants, ``(x - center) / half_range`` over the
  competition's ranges (so about [-1, 1]); a missing value becomes 0 and sets its own
  missing-indicator input.
- adult_child, sex and handedness are embedded (0, 1, or a third "unknown" row when missing or
  out of range).
"""

from __future__ import annotations

import torch
from torch import nn

from codes.common.schema import DEMOGRAPHIC_FIELDS

# (center, half range) from the competition's ranges: age 10-53, height 135-190.5 cm,
# shoulder to wrist 41-71 cm, elbow to wrist 18-44 cm.
CONTINUOUS_SCALING: dict[str, tuple[float, float]] = {
    "age": (31.5, 21.5),
    "height_cm": (162.75, 27.75),
    "shoulder_to_wrist_cm": (56.0, 15.0),
    "elbow_to_wrist_cm": (31.0, 13.0),
}
CATEGORICAL_FIELDS: tuple[str, ...] = ("adult_child", "sex", "handedness")
UNKNOWN_CATEGORY = 2


class DemographicsEncoder(nn.Module):
    """``(B, 7)`` demographics (NaN = missing) -> ``(B, out_dim)``; ``None`` = all unknown."""

    def __init__(self, out_dim: int = 32, embedding_dim: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.embeddings = nn.ModuleList(nn.Embedding(3, embedding_dim) for _ in CATEGORICAL_FIELDS)
        index = {name: i for i, name in enumerate(DEMOGRAPHIC_FIELDS)}
        self.register_buffer(
            "continuous_index", torch.tensor([index[n] for n in CONTINUOUS_SCALING]), persistent=False
        )
        self.register_buffer(
            "categorical_index", torch.tensor([index[n] for n in CATEGORICAL_FIELDS]), persistent=False
        )
        centers, half_ranges = zip(*CONTINUOUS_SCALING.values(), strict=True)
        self.register_buffer("center", torch.tensor(centers), persistent=False)
        self.register_buffer("half_range", torch.tensor(half_ranges), persistent=False)
        in_dim = 2 * len(CONTINUOUS_SCALING) + embedding_dim * len(CATEGORICAL_FIELDS)
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Dropout(dropout), nn.Linear(out_dim, out_dim)
        )

    def forward(self, demographics: torch.Tensor | None, batch_size: int | None = None) -> torch.Tensor:
        if demographics is None:
            if batch_size is None:
                raise ValueError("batch_size is needed when demographics is None")
            demographics = torch.full(
                (batch_size, len(DEMOGRAPHIC_FIELDS)), float("nan"), device=self.center.device
            )
        demographics = demographics.float()
        continuous = demographics[:, self.continuous_index]  # (B, 4)
        missing = torch.isnan(continuous)
        scaled = torch.where(
            missing, torch.zeros_like(continuous), (continuous - self.center) / self.half_range
        )
        categories = demographics[:, self.categorical_index]  # (B, 3)
        known = (categories == 0) | (categories == 1)
        category_ids = torch.where(known, categories, torch.full_like(categories, UNKNOWN_CATEGORY)).long()
        embedded = [embedding(category_ids[:, k]) for k, embedding in enumerate(self.embeddings)]
        features = torch.cat([scaled, missing.float(), *embedded], dim=1)  # (B, 8 + 3 * E)
        return self.mlp(features)
