"""Fold data: features from the shared data layer, normalised on the training fold, padded.

The training fold's sequences lose their thermopile and ToF inputs with probability
``data.sensor_drop_prob`` (set to 0, the value an absent sensor has after normalisation), so the
model also learns the IMU-only path the hidden test set needs for half of its sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from codes.common.features import FeatureSettings
from codes.common.schema import TARGET_GESTURES
from codes.common.sequences import FeatureNormalizer, SequenceTable, pad_sequences

NUM_TARGET_GESTURES = len(TARGET_GESTURES)  # class indices below this are Target gestures


def feature_settings(data_cfg) -> FeatureSettings:
    return FeatureSettings(
        use_thm=data_cfg.use_thm,
        tof_mode=data_cfg.tof_mode,
        mirror_left_handed=data_cfg.mirror_left_handed,
        sampling_rate_hz=data_cfg.sampling_rate_hz,
    )


def non_imu_columns(table: SequenceTable) -> list[int]:
    """Feature indices of the thermopiles and ToF (what an IMU-only sequence lacks)."""
    return table.feature_groups.get("thm", []) + table.feature_groups.get("tof", [])


@dataclass
class FoldTensors:
    """Model inputs of a set of sequences."""

    features: torch.Tensor  # (N, L, F) float32, normalised, 0 at padding
    mask: torch.Tensor  # (N, L) bool, True = real step
    demographics: torch.Tensor  # (N, 7) float32, NaN = missing
    labels: torch.Tensor  # (N,) int64 gesture index (-1 unknown)

    def __len__(self) -> int:
        return len(self.features)

    def imu_only(self, columns: list[int]) -> FoldTensors:
        """The same sequences with thermopile and ToF inputs removed."""
        features = self.features.clone()
        features[:, :, columns] = 0.0
        return FoldTensors(features, self.mask, self.demographics, self.labels)

    def to_dataset(self) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(self.features, self.mask, self.demographics, self.labels)


def make_tensors(table: SequenceTable, normalizer: FeatureNormalizer, max_len: int) -> FoldTensors:
    padded = pad_sequences(table, max_len, normalizer.transform(table))
    return FoldTensors(
        features=torch.from_numpy(padded.features),
        mask=torch.from_numpy(padded.mask),
        demographics=torch.from_numpy(table.demographics.astype(np.float32)),
        labels=torch.from_numpy(table.labels),
    )


def split_fold(table: SequenceTable, folds: np.ndarray, fold: int, max_len: int):
    """(train tensors, validation tensors, validation indices, the fitted normalizer)."""
    train_index = np.flatnonzero(folds != fold)
    valid_index = np.flatnonzero(folds == fold)
    train_table, valid_table = table.subset(train_index), table.subset(valid_index)
    normalizer = FeatureNormalizer().fit(train_table)
    return (
        make_tensors(train_table, normalizer, max_len),
        make_tensors(valid_table, normalizer, max_len),
        valid_index,
        normalizer,
    )


def drop_sensors(
    features: torch.Tensor, columns: list[int], prob: float, generator: torch.Generator
) -> torch.Tensor:
    """Zero ``columns`` of each sequence of a batch with probability ``prob`` (B, L, F)."""
    if prob <= 0 or not columns:
        return features
    dropped = torch.rand(features.shape[0], generator=generator) < prob  # (B,)
    features = features.clone()
    block = features[:, :, columns]
    features[:, :, columns] = torch.where(dropped[:, None, None].to(features.device), 0.0, block)
    return features


def target_labels(labels: torch.Tensor) -> torch.Tensor:
    """1.0 for Target gestures, 0.0 for the rest."""
    return (labels < NUM_TARGET_GESTURES).float()
