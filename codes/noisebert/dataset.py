"""NoiseBERT pretraining items: a vibrating, span-masked sequence and what the model must recover.

Rules of an item (``L = max_len``, ``n`` = real steps kept, ``K = num_intervals``):

- Length: a sequence longer than ``L`` keeps its LAST ``L`` steps (as
  ``codes.common.sequences.pad_sequences``); a shorter one is padded at the end with zeros, so
  real steps are positions ``0..n-1``. ``padding_mask`` is True at real steps.
- Noise, in one of two places (``noise_domain``):

  - ``raw`` (:meth:`NoiseBERTDataset.from_sequence_table`'s default): the vibration bursts shake
    the kept steps' raw acceleration and rotation (:func:`codes.noisebert.noise.add_raw_vibration`)
    and the features of the clean and the shaken whole sequences are then computed alike
    (``codes.common.augment.batch_step_features``, the on-the-fly path of the raw augmentations),
    cut to the kept steps (so they are the features the experiments compute) and normalised. A
    step's strength is what its features see (:func:`~codes.noisebert.noise.feature_strength`:
    rows ``t - 1`` and ``t``, and the rows a missing reading is filled from); a step of strength
    0 has the clean features bit for bit. Thermopiles and ToF are untouched.
  - ``features``: the bursts are added to the normalised features, on the ``noise_channels``.

  A step is noisy when its strength is strictly above the threshold
  (``MaskingConfig.noise_threshold``, by default the noise config's ``strength_threshold``);
  the same rule gives ``noisy`` and decides which steps may be masked.
- Masking: ``round(mask_ratio * n)`` steps (at least 1, at most the eligible ones) are masked,
  chosen only among eligible steps: real and not noisy. They form spans with geometric lengths
  (``p = 1 / mean_span``, the last one cut so the total is exact; ``mean_span`` in steps is
  ``mean_span_seconds`` times the sampling rate, at least 1: 3 steps at 10 Hz, 15 at 50 Hz) placed uniformly at random
  without overlap on the eligible steps taken in order; a span that meets a noisy step continues
  after it. Masked steps are 0 in ``input`` (the model puts its MASK embedding there).
- Intervals: interval ``k`` holds steps ``[floor(k * n / K), floor((k + 1) * n / K))`` (an empty
  interval when ``n < K``); ``noise_intervals[k] = 1`` when any of its steps is noisy.
  ``interval_index`` gives each real step its interval (-1 at padding);
  :func:`expand_intervals` maps intervals back to steps.
- Randomness: item ``i`` in epoch ``e`` draws its noise and its mask from
  ``np.random.default_rng([seed, e, i])``: the same for a given (seed, epoch, index) in any
  process or worker, new every epoch. ``set_epoch`` changes the epoch; a ``DataLoader`` with
  ``persistent_workers=True`` keeps the workers' copies, so use it without persistent workers
  (or set the epoch before the workers start).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from codes.common.augment import batch_step_features
from codes.common.batching import BatchCut
from codes.common.features import FeatureSettings
from codes.common.sequences import FeatureNormalizer, SequenceTable
from codes.noisebert.noise import (
    VibrationNoiseConfig,
    add_vibration_noise,
    shake_kept_rows,
)

NOISE_DOMAINS = ("raw", "features")

__all__ = [
    "NOISE_DOMAINS",
    "MaskingConfig",
    "NoiseBERTDataset",
    "RawSequences",
    "expand_intervals",
    "interval_bounds",
    "interval_index",
    "masked_step_count",
    "noisy_intervals",
    "sample_span_mask",
]


@dataclass
class MaskingConfig:
    """How many steps are masked, in spans of which mean length, and the intervals for the CLS loss."""

    mask_ratio: float = 0.15  # share of the real steps to mask
    # mean duration of the masked spans; x the sampling rate = the mean of the geometric span
    # lengths in steps (3 at 10 Hz, 15 at 50 Hz; at least 1)
    mean_span_seconds: float = 0.3
    noise_threshold: float | None = None  # strength above which a step is noisy; None = noise config's
    num_intervals: int = 30  # K intervals over the real steps

    def __post_init__(self) -> None:
        if not 0 <= self.mask_ratio <= 1:
            raise ValueError(f"mask_ratio must lie in [0, 1], got {self.mask_ratio}")
        if not (np.isfinite(self.mean_span_seconds) and self.mean_span_seconds > 0):
            raise ValueError(f"mean_span_seconds must be a positive duration, got {self.mean_span_seconds}")
        if self.noise_threshold is not None and self.noise_threshold < 0:
            raise ValueError(f"noise_threshold must be >= 0 or None, got {self.noise_threshold}")
        if self.num_intervals < 1:
            raise ValueError(f"num_intervals must be >= 1, got {self.num_intervals}")

    def mean_span_steps(self, sampling_rate_hz: float) -> float:
        """The mean span length in steps at ``sampling_rate_hz`` (at least 1; rounded to 1e-9, so
        0.3 s at 10 Hz is exactly 3.0)."""
        return max(1.0, round(self.mean_span_seconds * sampling_rate_hz, 9))


# ---------------------------------------------------------------- masking
def masked_step_count(n_real: int, n_eligible: int, mask_ratio: float) -> int:
    """``round(mask_ratio * n_real)`` clipped to ``[1, n_eligible]``; 0 when nothing is eligible."""
    if n_eligible <= 0:
        return 0
    return int(min(max(round(mask_ratio * n_real), 1), n_eligible))


def sample_span_mask(
    eligible: np.ndarray, n_masked: int, mean_span: float, rng: np.random.Generator
) -> np.ndarray:
    """(T,) bool with exactly ``min(n_masked, eligible.sum())`` True steps, all eligible.

    Span lengths are geometric (mean ``mean_span``), shuffled, the total cut to ``n_masked``; the
    spans are placed uniformly at random without overlap on the eligible steps taken in order.
    """
    eligible = np.asarray(eligible, dtype=bool)
    positions = np.flatnonzero(eligible)
    mask = np.zeros(len(eligible), dtype=bool)
    n_masked = min(int(n_masked), len(positions))
    if n_masked <= 0:
        return mask
    lengths = rng.geometric(1.0 / mean_span, size=n_masked)  # every length >= 1: n_masked draws suffice
    ends = np.cumsum(lengths)
    n_spans = int(np.searchsorted(ends, n_masked)) + 1  # first span reaching the budget
    lengths = lengths[:n_spans]
    lengths[-1] -= ends[n_spans - 1] - n_masked
    lengths = rng.permutation(lengths)
    # n_spans span tokens among (n_eligible - n_masked) unmasked steps: span j starts after the
    # (slot_j - j) unmasked steps before it and the spans 0..j-1
    free = len(positions) - n_masked
    slots = np.sort(rng.choice(free + n_spans, size=n_spans, replace=False))
    offsets = np.repeat(slots - np.arange(n_spans), lengths) + np.arange(n_masked)  # eligible coordinates
    mask[positions[offsets]] = True
    return mask


# ---------------------------------------------------------------- intervals
def interval_bounds(n_real: int, num_intervals: int) -> np.ndarray:
    """(K + 1,) int64: interval ``k`` holds steps ``bounds[k]:bounds[k + 1]`` = floor(k n / K)..."""
    return np.arange(num_intervals + 1, dtype=np.int64) * n_real // num_intervals


def interval_index(n_real: int, num_intervals: int, length: int) -> np.ndarray:
    """(length,) int64: the interval of each real step ``0..n_real-1``, -1 at padding."""
    bounds = interval_bounds(n_real, num_intervals)
    steps = np.arange(length)
    index = np.searchsorted(bounds, steps, side="right") - 1  # last k with bounds[k] <= step
    return np.where(steps < n_real, index, -1)


def noisy_intervals(noisy: np.ndarray, n_real: int, num_intervals: int) -> np.ndarray:
    """(K,) float32 multi-hot: 1 where any real step of the interval is noisy."""
    noisy = np.asarray(noisy, dtype=bool)
    index = interval_index(n_real, num_intervals, len(noisy))
    intervals = np.zeros(num_intervals, dtype=np.float32)
    intervals[index[noisy & (index >= 0)]] = 1.0
    return intervals


def expand_intervals(intervals: np.ndarray, n_real: int, length: int) -> np.ndarray:
    """(length,) bool: the steps of the intervals marked in ``intervals`` (K,); False at padding."""
    intervals = np.asarray(intervals)
    index = interval_index(n_real, len(intervals), length)
    return (index >= 0) & (intervals[np.maximum(index, 0)] > 0)


# ---------------------------------------------------------------- dataset
@dataclass
class RawSequences:
    """The raw sensor rows of some sequences, to shake and featurise.

    Features are computed over a whole sequence and then cut to its last ``max_len`` steps, as
    the experiments compute them (angular velocity and jerk at the first kept step, and the
    quaternions' sign continuity, are those of the whole sequence); only the kept steps vibrate.
    """

    sensors: list[np.ndarray]  # (T_i, C) float32 raw rows of settings.sensor_columns (whole sequences)
    left_handed: np.ndarray  # (N,) bool
    settings: FeatureSettings
    normalizer: FeatureNormalizer
    max_len: int

    @classmethod
    def from_table(
        cls, table: SequenceTable, settings: FeatureSettings, normalizer: FeatureNormalizer, max_len: int
    ) -> RawSequences:
        if table.sensors is None:
            raise ValueError(
                "raw noise needs the raw sensor rows: load the table with keep_sensors=True "
                "(or use noise_domain='features')"
            )
        sensors = [table.sensors[a:b] for a, b in zip(table.offsets[:-1], table.offsets[1:], strict=True)]
        return cls(sensors, np.asarray(table.left_handed, dtype=bool), settings, normalizer, int(max_len))

    def features(self, index: int, rows: np.ndarray) -> np.ndarray:
        """Normalised features ``(n, F)`` of the last ``max_len`` steps of ``rows`` (a whole
        sequence's raw rows, of sequence ``index``)."""
        step, offsets = batch_step_features([rows], self.left_handed[index : index + 1], self.settings)
        normalised = self.normalizer.transform_rows(step.features, step.feature_present, np.diff(offsets))
        return normalised[-self.max_len :]

    def shaken(
        self, index: int, rng: np.random.Generator, cfg: VibrationNoiseConfig
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """The kept steps' features after a vibration of the kept rows: ``(features (n, F),
        feature strength (n,), frequency)``."""
        rows = self.sensors[index]
        noisy, step_strength, frequency = shake_kept_rows(
            rows, self.settings.sensor_columns, rng, cfg, self.max_len
        )
        return self.features(index, noisy), step_strength[-self.max_len :], frequency


class NoiseBERTDataset(Dataset):
    """Pretraining items of normalised ``(T_i, C)`` sequences; no labels needed.

    ``__getitem__`` returns (``L = max_len``, ``K = masking_cfg.num_intervals``):

    - ``input`` (L, C) float32: the noisy sequence, 0 at masked and padded steps;
    - ``target`` (L, C) float32: the clean sequence, 0 at padded steps;
    - ``masked`` (L,) bool: masked steps (real, not noisy);
    - ``noisy`` (L,) bool: strength > threshold, False at padding;
    - ``noise_strength`` (L,) float32: the vibration strength (0 at padding and away from bursts);
    - ``noise_intervals`` (K,) float32: 1 where an interval holds a noisy step;
    - ``interval_index`` (L,) int64: the interval of each real step, -1 at padding;
    - ``frequency`` () float32: Hz of the strongest burst, 0 without a burst;
    - ``padding_mask`` (L,) bool: True = real step.
    """

    def __init__(
        self,
        sequences: list[np.ndarray],
        max_len: int,
        noise_cfg: VibrationNoiseConfig | None = None,
        masking_cfg: MaskingConfig | None = None,
        seed: int = 0,
        noise_channels: list[int] | None = None,
        add_noise: bool = True,
        raw: RawSequences | None = None,
    ) -> None:
        """``sequences``: normalised features ``(T_i, C)`` (noise added to them); with ``raw``, the
        noise shakes ``raw``'s sensor rows instead and ``sequences`` are their clean features."""
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        noise_cfg = noise_cfg or VibrationNoiseConfig()
        if noise_channels is not None:
            noise_cfg = replace(noise_cfg, channels=[int(c) for c in noise_channels])
        self.noise_cfg = noise_cfg
        self.masking_cfg = masking_cfg or MaskingConfig()
        self.threshold = (
            self.noise_cfg.strength_threshold
            if self.masking_cfg.noise_threshold is None
            else self.masking_cfg.noise_threshold
        )
        # the spans' mean length in steps at the rate the noise is drawn at (the data's)
        self.mean_span = self.masking_cfg.mean_span_steps(self.noise_cfg.sampling_rate_hz)
        self.max_len = int(max_len)
        self.seed = int(seed)
        self.add_noise = add_noise
        self.raw = raw
        if raw is not None and len(raw.sensors) != len(sequences):
            raise ValueError(f"{len(raw.sensors)} raw sequences for {len(sequences)} feature sequences")
        self.epoch = 0
        self.sequences: list[np.ndarray] = []  # the kept (last max_len) steps of each sequence
        n_channels = None
        for i, sequence in enumerate(sequences):
            sequence = np.asarray(sequence, dtype=np.float32)
            if sequence.ndim != 2 or (n_channels is not None and sequence.shape[1] != n_channels):
                raise ValueError(
                    f"sequence {i} has shape {sequence.shape}; every sequence must be (T, C) "
                    f"with the same C{'' if n_channels is None else f' = {n_channels}'}"
                )
            n_channels = sequence.shape[1]
            self.sequences.append(sequence[-self.max_len :])
        self.n_channels = n_channels or 0
        if self.noise_cfg.channels and max(self.noise_cfg.channels) >= self.n_channels and self.sequences:
            raise ValueError(
                f"noise channels {self.noise_cfg.channels} do not all exist in sequences "
                f"with {self.n_channels} channels"
            )

    @classmethod
    def from_sequence_table(
        cls,
        table: SequenceTable,
        normalizer: FeatureNormalizer,
        max_len: int,
        noise_cfg: VibrationNoiseConfig | None = None,
        masking_cfg: MaskingConfig | None = None,
        seed: int = 0,
        noise_channels: list[int] | None = None,
        add_noise: bool = True,
        noise_domain: str = "raw",
        settings: FeatureSettings | None = None,
    ) -> NoiseBERTDataset:
        """Every sequence of ``table`` (train or test), normalised by a fitted ``normalizer``.

        ``noise_domain="raw"`` shakes the raw acceleration and rotation (the table must hold its
        sensor rows, ``keep_sensors=True``, and ``settings`` be the table's feature settings);
        ``"features"`` adds the noise to the ``noise_channels`` of the normalised features
        (default: the table's IMU features, ``feature_groups["imu"]``).
        """
        if noise_domain not in NOISE_DOMAINS:
            raise ValueError(f"noise_domain must be one of {NOISE_DOMAINS}, got {noise_domain!r}")
        if noise_domain == "raw":
            if settings is None:
                raise ValueError("noise_domain='raw' needs the table's FeatureSettings (settings=...)")
            raw = RawSequences.from_table(table, settings, normalizer, max_len)
            sequences = [raw.features(i, rows) for i, rows in enumerate(raw.sensors)]
            return cls(sequences, max_len, noise_cfg, masking_cfg, seed, None, add_noise, raw)
        if noise_channels is None:
            if "imu" not in table.feature_groups:
                raise ValueError(
                    f"the table has no 'imu' feature group (groups: {sorted(table.feature_groups)}); "
                    "pass noise_channels explicitly"
                )
            noise_channels = list(table.feature_groups["imu"])
        features = normalizer.transform(table)  # (R, F)
        sequences = np.split(features, table.offsets[1:-1])
        return cls(sequences, max_len, noise_cfg, masking_cfg, seed, noise_channels, add_noise)

    def set_epoch(self, epoch: int) -> None:
        """Draw new noise and masks: item ``i`` then uses ``default_rng([seed, epoch, i])``."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = range(len(self))[index]  # negative indices, and an IndexError out of range
        rng = np.random.default_rng([self.seed, self.epoch, index])
        clean = self.sequences[index]  # (n, C)
        n_real = len(clean)
        if self.add_noise and self.raw is not None:
            noisy_values, strength, frequency = self.raw.shaken(index, rng, self.noise_cfg)
        elif self.add_noise:
            vibration = add_vibration_noise(clean, rng, self.noise_cfg)
            noisy_values, strength, frequency = vibration.noisy, vibration.strength, vibration.frequency
        else:
            noisy_values, strength, frequency = clean, np.zeros(n_real, dtype=np.float32), 0.0
        noisy = strength > self.threshold  # (n,)
        eligible = ~noisy
        n_masked = masked_step_count(n_real, int(eligible.sum()), self.masking_cfg.mask_ratio)
        masked = sample_span_mask(eligible, n_masked, self.mean_span, rng)  # (n,)

        length, n_channels = self.max_len, self.n_channels
        target = np.zeros((length, n_channels), dtype=np.float32)
        target[:n_real] = clean
        model_input = np.zeros((length, n_channels), dtype=np.float32)
        model_input[:n_real] = np.where(masked[:, None], np.float32(0.0), noisy_values)
        padding_mask = np.arange(length) < n_real

        def padded(values: np.ndarray, dtype: type) -> np.ndarray:  # (n,) -> (L,)
            out = np.zeros(length, dtype=dtype)
            out[:n_real] = values
            return out

        noisy_padded = padded(noisy, bool)
        num_intervals = self.masking_cfg.num_intervals
        return {
            "input": torch.from_numpy(model_input),
            "target": torch.from_numpy(target),
            "masked": torch.from_numpy(padded(masked, bool)),
            "noisy": torch.from_numpy(noisy_padded),
            "noise_strength": torch.from_numpy(padded(strength, np.float32)),
            "noise_intervals": torch.from_numpy(noisy_intervals(noisy_padded, n_real, num_intervals)),
            "interval_index": torch.from_numpy(interval_index(n_real, num_intervals, length)),
            "frequency": torch.tensor(frequency, dtype=torch.float32),
            "padding_mask": torch.from_numpy(padding_mask),
        }


# the items of a batch with a time axis (the rest: noise_intervals (K,), frequency ())
STEP_KEYS = ("input", "target", "masked", "noisy", "noise_strength", "interval_index", "padding_mask")


class CutCollate:
    """A ``DataLoader`` collate function: the items stacked (``default_collate``), then every
    :data:`STEP_KEYS` tensor cut to the batch's longest real sequence (``data.pad_to_batch``,
    ``codes/common/batching.py``). A class, so that DataLoader workers can pickle it."""

    def __init__(self, cut: BatchCut) -> None:
        self.cut = cut

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return self.cut.cut_dict(default_collate(items), "padding_mask", STEP_KEYS)
