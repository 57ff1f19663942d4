"""Fold data: features from the shared data layer, normalised on the training fold, padded.

The training fold's sequences lose their thermopile and ToF inputs with probability
``data.sensor_drop_prob`` (set to 0, the value an absent sensor has after normalisation), so the
model also learns the IMU-only path the hidden test set needs for half of its sequences.

With raw-signal augmentation on (``augment.*``), the training fold keeps its raw sensor rows and
:class:`RawBatches` computes each batch's features from the augmented signals
(``codes/common/augment.py``), in ``machine.num_workers`` DataLoader workers; every batch draws
its randomness from (epoch seed, step), so the workers do not change the numbers. Validation
uses the cached features. With ``finetune.noise_prob`` > 0 a share of the training sequences is
also shaken by a raw vibration after the augmentations (``SequenceShaker``), and each batch
carries its shaken steps for the CLS attention penalty.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from codes.common.augment import RawAugmenter, augmented_sequences, batch_from_sequences
from codes.common.features import FeatureSettings
from codes.common.schema import ORIENTATIONS, TARGET_GESTURES
from codes.common.sequences import FeatureNormalizer, SequenceTable, pad_sequences, pad_step_flags
from codes.noisebert.noise import SequenceShaker

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
    orientations: torch.Tensor  # (N,) int64 index into ORIENTATIONS (-1 unknown)
    # the sequences' table with raw sensor rows and the fold's normalizer: set on a training fold
    # whose run augments raw signals (RawBatches computes its features per batch)
    table: SequenceTable | None = None
    normalizer: FeatureNormalizer | None = None

    def __len__(self) -> int:
        return len(self.features)

    def imu_only(self, columns: list[int]) -> FoldTensors:
        """The same sequences with thermopile and ToF inputs removed."""
        features = self.features.clone()
        features[:, :, columns] = 0.0
        return FoldTensors(features, self.mask, self.demographics, self.labels, self.orientations)

    def to_dataset(self) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(
            self.features, self.mask, self.demographics, self.labels, self.orientations
        )


def orientation_indices(orientations: np.ndarray) -> np.ndarray:
    """(N,) int64 index into ORIENTATIONS, -1 for unknown ("" in test files)."""
    index = {name: i for i, name in enumerate(ORIENTATIONS)}
    return np.array([index.get(str(o), -1) for o in orientations], dtype=np.int64)


def make_tensors(table: SequenceTable, normalizer: FeatureNormalizer, max_len: int) -> FoldTensors:
    padded = pad_sequences(table, max_len, normalizer.transform(table))
    return FoldTensors(
        features=torch.from_numpy(padded.features),
        mask=torch.from_numpy(padded.mask),
        demographics=torch.from_numpy(table.demographics.astype(np.float32)),
        labels=torch.from_numpy(table.labels),
        orientations=torch.from_numpy(orientation_indices(table.orientations)),
    )


def split_fold(table: SequenceTable, folds: np.ndarray, fold: int, max_len: int):
    """(train tensors, validation tensors, validation indices, the fitted normalizer)."""
    train_index = np.flatnonzero(folds != fold)
    valid_index = np.flatnonzero(folds == fold)
    train_table, valid_table = table.subset(train_index), table.subset(valid_index)
    normalizer = FeatureNormalizer().fit(train_table)
    train = make_tensors(train_table, normalizer, max_len)
    if train_table.sensors is not None:  # the run augments raw signals
        train.table, train.normalizer = train_table, normalizer
    return train, make_tensors(valid_table, normalizer, max_len), valid_index, normalizer


class RawBatches(torch.utils.data.Dataset):
    """Training batches computed from augmented raw signals: item ``j`` is batch ``j`` of an epoch.

    ``batches[j]`` holds the indices of batch ``j`` into ``train`` (a training fold with its
    table); its randomness comes from ``(epoch_seed, j)``. Items: (features, mask, demographics,
    labels, orientations), as ``FoldTensors.to_dataset`` gives for the cached path, and with a
    ``shaker`` the shaken steps ``(B, L)`` bool after them.
    """

    def __init__(
        self,
        train: FoldTensors,
        batches: list[np.ndarray],
        epoch_seed: int,
        settings: FeatureSettings,
        augmenter: RawAugmenter | None,
        max_len: int,
        shaker: SequenceShaker | None = None,
    ) -> None:
        self.train, self.batches, self.epoch_seed = train, batches, epoch_seed
        self.settings, self.augmenter, self.max_len = settings, augmenter, max_len
        self.shaker = shaker

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, step: int) -> tuple[torch.Tensor, ...]:
        indices = self.batches[step]
        rng = np.random.default_rng([self.epoch_seed, step])
        table = self.train.table
        sequences = augmented_sequences(table, indices, self.augmenter, rng)
        if self.shaker is not None:  # after the augmentations, from the same generator
            sequences, shaken = zip(*(self.shaker(rows, rng) for rows in sequences), strict=True)
        padded = batch_from_sequences(
            table, indices, list(sequences), self.settings, self.train.normalizer, self.max_len
        )
        items = (
            torch.from_numpy(padded.features),
            torch.from_numpy(padded.mask),
            self.train.demographics[indices],
            self.train.labels[indices],
            self.train.orientations[indices],
        )
        if self.shaker is None:
            return items
        return (*items, torch.from_numpy(pad_step_flags(list(shaken), self.max_len)))


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
