"""NoiseBERT data: the vibration generator and the masked pretraining items."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from codes.common.augment import batch_step_features
from codes.common.features import FeatureSettings, gravity_in_body_frame
from codes.common.sequences import FeatureNormalizer, build_sequence_table, pad_sequences
from codes.common.synthetic import quat_conjugate, quat_from_rotvec, quat_multiply, quat_to_rotvec
from codes.noisebert.dataset import (
    MaskingConfig,
    NoiseBERTDataset,
    expand_intervals,
    interval_bounds,
    noisy_intervals,
    sample_span_mask,
)
from codes.noisebert.noise import (
    VibrationNoiseConfig,
    add_raw_vibration,
    add_vibration_noise,
    burst_steps,
    feature_strength,
)
from tests.helpers import make_demographics, make_frame, rest_sensors

FS = 10.0
ONE_BURST = VibrationNoiseConfig(min_bursts=1, max_bursts=1)
NO_BURST = VibrationNoiseConfig(min_bursts=0, max_bursts=0)


def _clean(n_steps: int, n_channels: int = 7, seed: int = 0) -> np.ndarray:
    """A smooth random walk, normalised per channel: what a slow hand movement looks like."""
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.normal(size=(n_steps, n_channels)), axis=0)
    walk = (walk - walk.mean(axis=0)) / (walk.std(axis=0) + 1e-6)
    return walk.astype(np.float32)


# ---------------------------------------------------------------- generator
def test_generator_is_deterministic_for_a_seed_and_differs_across_seeds():
    x = _clean(120)
    cfg = VibrationNoiseConfig(min_bursts=2, max_bursts=3)
    first = add_vibration_noise(x, np.random.default_rng(7), cfg)
    again = add_vibration_noise(x, np.random.default_rng(7), cfg)
    other = add_vibration_noise(x, np.random.default_rng(8), cfg)
    np.testing.assert_array_equal(first.noisy, again.noisy)
    np.testing.assert_array_equal(first.strength, again.strength)
    assert first.frequency == again.frequency
    assert not np.array_equal(first.noisy, other.noisy)
    assert first.noisy.dtype == np.float32 and first.strength.dtype == np.float32
    np.testing.assert_array_equal(x, _clean(120))  # the input is left as it was


@pytest.mark.parametrize("seed", range(8))
def test_strength_marks_the_bursts(seed):
    x = _clean(200, seed=seed)
    noise = add_vibration_noise(x, np.random.default_rng(seed), VibrationNoiseConfig(min_bursts=1))
    added = np.abs(noise.noisy - x).mean(axis=1)  # (T,)
    untouched = noise.strength == 0
    assert untouched.any() and noise.noisy_steps.any()
    # away from every burst the sequence is bit-for-bit the clean one
    np.testing.assert_array_equal(noise.noisy[untouched], x[untouched])
    # on noisy steps the vibration is large: a sizeable share of the channel's spread
    assert added[noise.noisy_steps].mean() > 0.1
    assert (added[noise.noisy_steps] > 0).all()
    # strength is the summed envelope of the bursts; each burst is positive on exactly its steps
    covered = np.zeros(len(x), dtype=bool)
    for burst in noise.bursts:
        first, stop = burst.clipped(len(x))
        covered[first:stop] = True
    np.testing.assert_array_equal(covered, ~untouched)
    assert noise.strength.max() <= sum(b.amplitude for b in noise.bursts) + 1e-5


def test_frequency_lies_in_the_band_and_is_zero_without_a_burst():
    cfg = VibrationNoiseConfig(min_bursts=1, max_bursts=3)
    x = _clean(80)
    for seed in range(30):
        noise = add_vibration_noise(x, np.random.default_rng(seed), cfg)
        assert cfg.freq_low * FS <= noise.frequency <= cfg.freq_high * FS
        assert noise.frequency in [b.frequency_hz for b in noise.bursts]
    silent = add_vibration_noise(x, np.random.default_rng(0), NO_BURST)
    assert silent.frequency == 0.0 and silent.bursts == []
    assert not silent.noisy_steps.any() and (silent.strength == 0).all()
    np.testing.assert_array_equal(silent.noisy, x)


@pytest.mark.parametrize(("harmonic_prob", "band_noise_fraction"), [(0.0, 0.0), (1.0, 0.3)])
def test_dominant_fft_frequency_of_a_long_burst_is_the_returned_frequency(harmonic_prob, band_noise_fraction):
    n_steps = 2048
    cfg = replace(
        ONE_BURST,
        min_burst_seconds=150,
        max_burst_seconds=150,
        harmonic_prob=harmonic_prob,
        band_noise_fraction=band_noise_fraction,
    )
    x = _clean(n_steps, n_channels=3)
    for seed in range(3):
        noise = add_vibration_noise(x, np.random.default_rng(seed), cfg)
        added = noise.noisy.astype(np.float64) - x  # (T, C)
        power = (np.abs(np.fft.rfft(added, axis=0)) ** 2).sum(axis=1)
        frequencies = np.fft.rfftfreq(n_steps, d=1 / FS)
        assert abs(frequencies[np.argmax(power)] - noise.frequency) <= FS / n_steps


def test_harmonics_above_nyquist_are_left_out():
    # a tone at 0.3 fs would put its 2nd harmonic at 0.6 fs, aliased to 0.4 fs
    cfg = replace(
        ONE_BURST,
        freq_low=0.3,
        freq_high=0.3,
        harmonic_prob=1.0,
        band_noise_fraction=0.0,
        min_burst_seconds=100,
        max_burst_seconds=100,
    )
    x = np.zeros((1024, 2), dtype=np.float32)
    noise = add_vibration_noise(x, np.random.default_rng(0), cfg)
    power = np.abs(np.fft.rfft(noise.noisy.astype(np.float64), axis=0)).sum(axis=1)
    frequencies = np.fft.rfftfreq(1024)
    assert power[np.abs(frequencies - 0.4) < 0.02].max() < 0.05 * power.max()


@pytest.mark.parametrize("n_steps", [0, 1, 5, 39])
def test_short_sequences_clip_the_bursts(n_steps):
    cfg = replace(ONE_BURST, min_burst_seconds=4, max_burst_seconds=4)
    x = _clean(max(n_steps, 1))[:n_steps]
    noise = add_vibration_noise(x, np.random.default_rng(3), cfg)
    assert noise.noisy.shape == x.shape and noise.strength.shape == (n_steps,)
    if n_steps:
        assert (noise.strength > 0).all()  # the sequence lies inside the burst
        assert np.isfinite(noise.noisy).all() and noise.frequency > 0


def test_only_the_given_channels_vibrate():
    x = _clean(100, n_channels=6)
    noise = add_vibration_noise(x, np.random.default_rng(0), replace(ONE_BURST, channels=[0, 2]))
    changed = (noise.noisy != x).any(axis=0)
    assert changed.tolist() == [True, False, True, False, False, False]
    with pytest.raises(ValueError, match="channels"):
        add_vibration_noise(x, np.random.default_rng(0), replace(ONE_BURST, channels=[9]))


def test_config_rejects_a_band_at_or_above_nyquist():
    with pytest.raises(ValueError, match="Nyquist"):
        VibrationNoiseConfig(freq_high=0.5)


# ---------------------------------------------------------------- masking helpers
def test_span_mask_has_the_exact_count_only_on_eligible_steps():
    rng = np.random.default_rng(0)
    for _ in range(50):
        eligible = rng.random(60) < 0.5
        n_masked = int(rng.integers(0, 40))
        mask = sample_span_mask(eligible, n_masked, 3.0, rng)
        assert mask.sum() == min(n_masked, eligible.sum())
        assert not (mask & ~eligible).any()


def test_spans_have_about_the_mean_length():
    rng = np.random.default_rng(0)
    eligible = np.ones(100_000, dtype=bool)
    mask = sample_span_mask(eligible, 3_000, 3.0, rng)  # sparse: spans rarely touch
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    assert 2.7 < mask.sum() / starts.sum() < 3.3


def test_intervals_follow_the_floor_rule_and_expand_back():
    np.testing.assert_array_equal(interval_bounds(10, 4), [0, 2, 5, 7, 10])
    noisy = np.zeros(12, dtype=bool)
    noisy[[1, 6]] = True  # intervals 0 and 2 of 10 real steps
    intervals = noisy_intervals(noisy, 10, 4)
    np.testing.assert_array_equal(intervals, [1, 0, 1, 0])
    expanded = expand_intervals(intervals, 10, 12)
    np.testing.assert_array_equal(np.flatnonzero(expanded), [0, 1, 5, 6])
    # fewer real steps than intervals: some intervals are empty, each step still has one
    np.testing.assert_array_equal(noisy_intervals(np.array([False, True, False]), 2, 4), [0, 0, 0, 1])


# ---------------------------------------------------------------- dataset
def _noisy_dataset(lengths=(3, 40, 90, 200, 700), max_len=128, **kwargs):
    sequences = [_clean(n, seed=i) for i, n in enumerate(lengths)]
    noise_cfg = kwargs.pop("noise_cfg", VibrationNoiseConfig(min_bursts=1, max_bursts=3))
    return NoiseBERTDataset(sequences, max_len, noise_cfg, MaskingConfig(num_intervals=16), **kwargs)


def _items(dataset, epochs=range(4)):
    for epoch in epochs:
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            yield {k: v.numpy() for k, v in dataset[i].items()}


def test_items_have_fixed_shapes_and_collate():
    dataset = _noisy_dataset()
    batch = next(iter(DataLoader(dataset, batch_size=5)))
    shapes = {k: tuple(v.shape) for k, v in batch.items()}
    assert shapes == {
        "input": (5, 128, 7),
        "target": (5, 128, 7),
        "masked": (5, 128),
        "noisy": (5, 128),
        "noise_strength": (5, 128),
        "noise_intervals": (5, 16),
        "interval_index": (5, 128),
        "frequency": (5,),
        "padding_mask": (5, 128),
    }
    assert batch["masked"].dtype == batch["noisy"].dtype == batch["padding_mask"].dtype == torch.bool


def test_masking_never_selects_noisy_or_padded_steps():
    n_masked_total = 0
    for item in _items(_noisy_dataset()):
        assert not (item["masked"] & item["noisy"]).any()
        assert not (item["masked"] & ~item["padding_mask"]).any()
        assert not (item["noisy"] & ~item["padding_mask"]).any()
        np.testing.assert_array_equal(item["noisy"], item["noise_strength"] > 0.1)
        eligible = item["padding_mask"] & ~item["noisy"]
        assert item["masked"].any() == eligible.any()  # at least one masked step when possible
        n_masked_total += int(item["masked"].sum())
    assert n_masked_total > 0


def test_masked_fraction_is_near_the_ratio_on_long_clean_sequences():
    sequences = [_clean(n, seed=n) for n in (300, 450, 600)]
    dataset = NoiseBERTDataset(sequences, 512, NO_BURST, MaskingConfig(mask_ratio=0.15))
    for item in _items(dataset, epochs=range(2)):
        n_real = item["padding_mask"].sum()
        assert abs(item["masked"].sum() / n_real - 0.15) <= 1 / n_real


def test_intervals_cover_every_noisy_step_and_only_noisy_intervals():
    for item in _items(_noisy_dataset()):
        n_real = int(item["padding_mask"].sum())
        intervals = item["noise_intervals"]
        covered = expand_intervals(intervals, n_real, len(item["noisy"]))
        assert not (item["noisy"] & ~covered).any()
        for k in range(len(intervals)):
            in_interval = item["interval_index"] == k
            assert intervals[k] == float(item["noisy"][in_interval].any())
        assert (item["interval_index"][~item["padding_mask"]] == -1).all()


def test_no_burst_gives_no_noisy_step_and_no_interval():
    for item in _items(_noisy_dataset(noise_cfg=NO_BURST)):
        assert not item["noisy"].any() and not item["noise_intervals"].any()
        assert (item["noise_strength"] == 0).all() and item["frequency"] == 0.0
    dataset = _noisy_dataset(add_noise=False)
    for item in _items(dataset, epochs=[0]):
        assert not item["noisy"].any() and item["frequency"] == 0.0


def test_single_step_and_long_sequences():
    long_sequence = _clean(300, seed=1)
    dataset = NoiseBERTDataset([_clean(1), long_sequence], 64, NO_BURST, MaskingConfig())
    single, long_item = dataset[0], dataset[1]
    assert single["padding_mask"].tolist() == [True] + [False] * 63
    assert single["masked"].tolist() == [True] + [False] * 63  # the one eligible step
    assert (single["input"] == 0).all()
    # a long sequence keeps its last max_len steps
    assert long_item["padding_mask"].all()
    np.testing.assert_array_equal(long_item["target"].numpy(), long_sequence[-64:])
    # with noise, a one-step sequence inside a burst is noisy and nothing is masked
    noisy_single = NoiseBERTDataset([_clean(1)], 8, replace(ONE_BURST, min_amplitude=1.0))[0]
    assert noisy_single["noisy"][0] and not noisy_single["masked"].any()
    assert noisy_single["noise_intervals"].sum() == 1


def test_items_are_deterministic_per_seed_epoch_and_index():
    first, second = _noisy_dataset(seed=3), _noisy_dataset(seed=3)
    first.set_epoch(2)
    second.set_epoch(2)
    for i in range(len(first)):
        a, b = first[i], second[i]
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    first.set_epoch(3)
    assert any(not torch.equal(first[i]["input"], second[i]["input"]) for i in range(len(first)))
    assert any(not torch.equal(first[i]["masked"], second[i]["masked"]) for i in range(len(first)))
    other_seed = _noisy_dataset(seed=4)
    other_seed.set_epoch(2)
    assert not torch.equal(other_seed[2]["input"], second[2]["input"])
    # identical sequences at two indices get different noise
    twins = NoiseBERTDataset([_clean(100)] * 2, 128, ONE_BURST, MaskingConfig())
    assert not torch.equal(twins[0]["input"], twins[1]["input"])


def test_input_equals_target_at_unmasked_steps_without_noise():
    for item in _items(_noisy_dataset()):
        real = item["padding_mask"]
        quiet = real & ~item["masked"] & (item["noise_strength"] == 0)
        np.testing.assert_array_equal(item["input"][quiet], item["target"][quiet])
        assert (item["input"][item["masked"]] == 0).all()
        assert (item["input"][~real] == 0).all() and (item["target"][~real] == 0).all()
        assert (item["noise_strength"][~real] == 0).all()


def test_from_sequence_table_uses_the_normalised_features_and_vibrates_imu_only():
    rng = np.random.default_rng(0)
    sequences = []
    for i, n in enumerate((12, 5, 30)):
        sensors = rest_sensors(np.array([1.0, 0, 0, 0]), np.array([0, 0, 9.8]), n, rng)
        sensors[:, :3] += rng.normal(scale=0.3, size=(n, 3))
        sequences.append((f"SEQ_{i:06d}", "SUBJ_000000", sensors))
    frame = make_frame(sequences)  # test format: no labels
    table = build_sequence_table(frame, make_demographics(["SUBJ_000000"]), FeatureSettings())
    assert (table.labels == -1).all()
    normalizer = FeatureNormalizer().fit(table)
    dataset = NoiseBERTDataset.from_sequence_table(table, normalizer, 16, ONE_BURST, noise_domain="features")
    padded = pad_sequences(table, 16, normalizer.transform(table))
    imu = table.feature_groups["imu"]
    other = np.setdiff1d(np.arange(table.features.shape[1]), imu)
    for i in range(table.n_sequences):
        item = dataset[i]
        np.testing.assert_array_equal(item["target"].numpy(), padded.features[i])
        np.testing.assert_array_equal(item["padding_mask"].numpy(), padded.mask[i])
        unmasked = ~item["masked"].numpy()
        np.testing.assert_array_equal(
            item["input"].numpy()[unmasked][:, other], padded.features[i][unmasked][:, other]
        )
        assert item["noisy"].any()


# ---------------------------------------------------------------- raw vibration
SETTINGS = FeatureSettings()
COLUMNS = SETTINGS.sensor_columns
ACC, ROT = slice(0, 3), slice(3, 7)  # IMU columns of the raw rows (SENSOR_COLUMNS order)
RAW_BURSTS = VibrationNoiseConfig(min_bursts=1, max_bursts=3, min_burst_seconds=0.8, max_burst_seconds=2)


def _orientations(n_steps: int, rng: np.random.Generator, upside_down: bool = False) -> np.ndarray:
    """(n_steps, 4) a smooth random turning of the wrist, w >= 0 as in the files; ``upside_down``
    keeps it about half a turn away from the world frame (w near 0, where the sign flips)."""
    q = np.empty((n_steps, 4))
    axis = rng.normal(size=3)
    q[0] = quat_from_rotvec(axis / np.linalg.norm(axis) * (np.pi - 0.01) if upside_down else axis)
    turns = quat_from_rotvec(rng.normal(scale=0.01 if upside_down else 0.1, size=(n_steps, 3)))
    for t in range(1, n_steps):
        q[t] = quat_multiply(q[t - 1], turns[t])
    return np.where(q[:, :1] < 0, -q, q)


def _raw_rows(
    n_steps: int, seed: int = 0, linear_scale: float = 1.0, upside_down: bool = False
) -> np.ndarray:
    """(n_steps, 332) float32 raw rows (as ``SequenceTable.sensors`` holds them): gravity seen
    from a turning wrist plus a random-walk linear acceleration, random thermopiles and ToF."""
    rng = np.random.default_rng(seed)
    q = _orientations(n_steps, rng, upside_down)
    linear = linear_scale * np.cumsum(rng.normal(scale=0.3, size=(n_steps, 3)), axis=0)
    rows = rest_sensors(q[0], np.zeros(3), n_steps, rng)
    rows[:, ACC] = gravity_in_body_frame(q) + linear
    rows[:, ROT] = q
    return rows.astype(np.float32)


def _features(*sequences: np.ndarray, left_handed: bool = False) -> list[np.ndarray]:
    """Raw features ``(n, F)`` of each raw sequence, computed on their own."""
    step, offsets = batch_step_features(list(sequences), np.full(len(sequences), left_handed), SETTINGS)
    return np.split(step.features, offsets[1:-1])


def _with_missing_rows(rows: np.ndarray, nan_acc: list[int], zero_rot: list[int]) -> np.ndarray:
    rows = rows.copy()
    rows[nan_acc, ACC] = np.nan
    rows[zero_rot, ROT] = 0.0
    return rows


def _relative_angle(clean_q: np.ndarray, shaken_q: np.ndarray) -> np.ndarray:
    """(S,) angle in radians of the rotation from ``clean_q`` to ``shaken_q``, sign-blind."""
    relative = quat_multiply(quat_conjugate(clean_q.astype(np.float64)), shaken_q.astype(np.float64))
    return 2 * np.arctan2(np.linalg.norm(relative[:, 1:], axis=1), np.abs(relative[:, 0]))


def _internal_draw(rows: np.ndarray, seed: int, cfg: VibrationNoiseConfig):
    """The six-channel draw :func:`add_raw_vibration` makes: a_vib (m/s^2), then the rotation vector
    (rad), in units of the acc axes' std (NaN ignored, floored) and of ``rotation_deg_per_unit``."""
    acc_scale = np.maximum(np.nanstd(rows[:, ACC].astype(np.float64), axis=0), cfg.min_reference_std)
    reference = np.concatenate([acc_scale, np.full(3, np.deg2rad(cfg.rotation_deg_per_unit))])
    return add_vibration_noise(
        np.zeros((len(rows), 6)),
        np.random.default_rng(seed),
        replace(cfg, channels=None),
        reference_scale=reference,
    )


def test_feature_strength_is_the_larger_of_the_row_and_its_predecessor():
    strength = np.array([0.0, 0.0, 0.4, 0.1, 0.0, 0.0, 0.7], dtype=np.float32)
    before = strength.copy()
    expected = np.array([0.0, 0.0, 0.4, 0.4, 0.1, 0.0, 0.7], dtype=np.float32)
    np.testing.assert_array_equal(feature_strength(strength), expected)
    np.testing.assert_array_equal(strength, before)
    assert feature_strength(np.zeros(0)).shape == (0,)


def test_reference_scale_sets_the_amplitude_of_each_channel():
    x = _clean(150, n_channels=3)
    cfg = replace(ONE_BURST, min_reference_std=0.1)
    by_std = add_vibration_noise(x, np.random.default_rng(5), cfg)
    given_std = add_vibration_noise(
        x, np.random.default_rng(5), cfg, reference_scale=np.maximum(x.astype(np.float64).std(axis=0), 0.1)
    )
    np.testing.assert_array_equal(by_std.noisy, given_std.noisy)  # None = the floored std
    np.testing.assert_array_equal(by_std.strength, given_std.strength)
    zeros = np.zeros((150, 3))
    unit = add_vibration_noise(zeros, np.random.default_rng(5), cfg, reference_scale=np.ones(3))
    scaled = add_vibration_noise(
        zeros, np.random.default_rng(5), cfg, reference_scale=np.array([0.0, 2.0, 30.0])
    )
    np.testing.assert_allclose(scaled.noisy, unit.noisy * np.array([0.0, 2.0, 30.0]), rtol=1e-6, atol=0)
    np.testing.assert_array_equal(scaled.strength, unit.strength)  # strength is in reference units
    for bad in (np.ones(2), np.array([1.0, -1.0, 1.0]), np.array([1.0, np.nan, 1.0])):
        with pytest.raises(ValueError, match="reference_scale"):
            add_vibration_noise(zeros, np.random.default_rng(5), cfg, reference_scale=bad)


def test_config_rejects_a_negative_rotation_amplitude():
    assert VibrationNoiseConfig(rotation_deg_per_unit=0.0).rotation_deg_per_unit == 0.0
    with pytest.raises(ValueError, match="rotation_deg_per_unit"):
        VibrationNoiseConfig(rotation_deg_per_unit=-1.0)


@pytest.mark.parametrize("seed", range(4))
def test_raw_vibration_leaves_quiet_steps_features_bit_identical(seed):
    rows = _raw_rows(90, seed=seed)
    vibration = add_raw_vibration(rows, COLUMNS, np.random.default_rng(seed), RAW_BURSTS)
    quiet_rows = vibration.strength == 0
    assert quiet_rows.any() and not quiet_rows.all()
    # untouched raw rows bit for bit; thermopiles and ToF never change
    np.testing.assert_array_equal(vibration.noisy[quiet_rows], rows[quiet_rows])
    np.testing.assert_array_equal(vibration.noisy[:, 7:], rows[:, 7:])
    assert (vibration.noisy[~quiet_rows][:, :7] != rows[~quiet_rows][:, :7]).any(axis=1).all()
    for left_handed in (False, True):
        clean, shaken = _features(rows, vibration.noisy, left_handed=left_handed)
        quiet = feature_strength(vibration.strength) == 0
        np.testing.assert_array_equal(shaken[quiet], clean[quiet])
        assert (shaken[~quiet] != clean[~quiet]).any(axis=1).all()


def test_raw_vibration_keeps_missing_values_missing_and_quiet_steps_identical():
    rows = _raw_rows(80, seed=11)
    probe = add_raw_vibration(rows, COLUMNS, np.random.default_rng(0), RAW_BURSTS)
    shaken_rows = np.flatnonzero(probe.strength > 0)
    first = int(shaken_rows[0])
    # a quiet row after the first burst whose predecessor is quiet too
    later = next(t for t in range(first + 1, len(rows) - 1) if probe.strength[t - 1 : t + 2].max() == 0)
    assert 6 <= first and len(shaken_rows) >= 4
    # missing rows before, inside and between the bursts, each filled from a row of its own kind
    # (quiet or shaken); a missing row just after a burst is another matter (the test below)
    nan_acc = [first - 4, first - 3, int(shaken_rows[1]), later]
    zero_rot = [first - 2, int(shaken_rows[2]), later + 1]
    rows = _with_missing_rows(rows, nan_acc, zero_rot)
    rows[first + 3, 0] = np.nan  # a row with one acc axis missing
    vibration = add_raw_vibration(rows, COLUMNS, np.random.default_rng(0), RAW_BURSTS)
    np.testing.assert_array_equal(vibration.strength, probe.strength)  # NaN leaves the draw alone
    np.testing.assert_array_equal(
        np.isnan(vibration.noisy)[:, :3] | np.isnan(rows)[:, :3], np.isnan(vibration.noisy)[:, :3]
    )
    assert np.isnan(vibration.noisy[nan_acc, :3]).all() and np.isnan(vibration.noisy[first + 3, 0])
    np.testing.assert_array_equal(vibration.noisy[zero_rot, 3:7], 0.0)  # a missing rotation is not rotated
    np.testing.assert_array_equal(vibration.noisy[:, 7:], rows[:, 7:])
    quiet_rows = vibration.strength == 0
    np.testing.assert_array_equal(vibration.noisy[quiet_rows], rows[quiet_rows])  # NaN included
    clean, shaken = _features(rows, vibration.noisy)
    quiet = feature_strength(vibration.strength) == 0
    np.testing.assert_array_equal(shaken[quiet], clean[quiet])
    assert (shaken[~quiet] != clean[~quiet]).any(axis=1).sum() >= 0.9 * (~quiet).sum()


@pytest.mark.parametrize("missing", ["acc", "rot"])
def test_a_missing_row_after_a_burst_takes_the_strength_it_is_filled_from(missing):
    """Missing rows just after a burst are filled (forward) from the last shaken row: with the
    raw rows given, feature_strength counts them as shaken, and every step it calls 0 has the
    clean features bit for bit."""
    rows = _raw_rows(60, seed=2)
    probe = add_raw_vibration(rows, COLUMNS, np.random.default_rng(1), RAW_BURSTS)
    last = int(np.flatnonzero(probe.strength > 0)[-1])
    assert last + 3 < len(rows)
    gap = [last + 1, last + 2]  # quiet rows, filled from the shaken row `last`
    rows = _with_missing_rows(rows, gap if missing == "acc" else [], gap if missing == "rot" else [])
    vibration = add_raw_vibration(rows, COLUMNS, np.random.default_rng(1), RAW_BURSTS)
    clean, shaken = _features(rows, vibration.noisy)
    strength = feature_strength(vibration.strength, (rows, vibration.noisy), COLUMNS)
    assert (strength[gap] > 0).all() and strength[last + 3] > 0  # the filled rows and the step after
    assert (feature_strength(vibration.strength)[[last + 2]] == 0).all()  # rows alone would miss them
    quiet = strength == 0
    assert quiet[last + 4 :].any()
    np.testing.assert_array_equal(shaken[quiet], clean[quiet])
    assert (shaken[gap[0]] != clean[gap[0]]).any()


@pytest.mark.parametrize("seed", range(3))
def test_gravity_removed_with_the_shaken_rotation_leaves_the_translational_vibration(seed):
    # the wrist only turns (acc is gravity alone), about half a turn from the world frame
    rows = _raw_rows(70, seed=seed, linear_scale=0.0, upside_down=True)
    cfg = replace(RAW_BURSTS, rotation_deg_per_unit=5.0)
    vibration = add_raw_vibration(rows, COLUMNS, np.random.default_rng(seed), cfg)
    drawn = _internal_draw(rows, seed, cfg)
    np.testing.assert_array_equal(vibration.strength, drawn.strength)
    assert [b.start for b in vibration.bursts] == [b.start for b in drawn.bursts]
    shaken = drawn.strength > 0
    acc, q = vibration.noisy[:, ACC].astype(np.float64), vibration.noisy[:, ROT].astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    assert (q[:, 0] >= 0).all()
    # no tilt leak: the linear acceleration seen with the shaken rotation is the vibration alone
    np.testing.assert_allclose(
        acc - gravity_in_body_frame(q), np.where(shaken[:, None], drawn.noisy[:, :3], 0.0), atol=1e-4
    )
    # the device frame wobbles about its own axes: q' = q * exp(r)
    wobble = quat_multiply(quat_conjugate(rows[:, ROT].astype(np.float64)), q)
    np.testing.assert_allclose(quat_to_rotvec(wobble)[shaken], drawn.noisy[shaken, 3:], atol=1e-4)
    assert np.abs(drawn.noisy[shaken, 3:]).max() > 1e-2  # the wobble is not negligible
    assert (
        quat_multiply(rows[:, ROT].astype(np.float64), quat_from_rotvec(drawn.noisy[:, 3:]))[shaken, 0] < 0
    ).any()


def test_without_rotation_amplitude_only_the_translational_vibration_is_added():
    rows = _with_missing_rows(_raw_rows(70, seed=4), [10, 40], [11, 41])
    cfg = replace(RAW_BURSTS, rotation_deg_per_unit=0.0)
    vibration = add_raw_vibration(rows, COLUMNS, np.random.default_rng(4), cfg)
    drawn = _internal_draw(rows, 4, cfg)
    shaken = drawn.strength > 0
    assert shaken.any()
    np.testing.assert_array_equal(vibration.noisy[:, ROT], rows[:, ROT])
    added = vibration.noisy[:, ACC].astype(np.float64) - rows[:, ACC]
    read = np.isfinite(rows[:, 0])
    assert not read.all()
    np.testing.assert_allclose(
        added[read], np.where(shaken[:, None], drawn.noisy[:, :3], 0.0)[read], atol=1e-4
    )
    # amplitudes are in units of each acc axis's std (over the rows read): the vibration has about that size
    ratio = np.abs(added[shaken & read]).max(axis=0) / np.nanstd(rows[:, ACC].astype(np.float64), axis=0)
    assert ((ratio > 0.05) & (ratio < 3 * RAW_BURSTS.max_amplitude)).all()


@pytest.mark.parametrize("n_steps", [5, 120])
def test_raw_vibration_is_deterministic_and_strength_marks_the_clipped_bursts(n_steps):
    rows = _raw_rows(n_steps, seed=6)
    cfg = replace(RAW_BURSTS, min_burst_seconds=1, max_burst_seconds=3)
    first = add_raw_vibration(rows, COLUMNS, np.random.default_rng(9), cfg)
    again = add_raw_vibration(rows, COLUMNS, np.random.default_rng(9), cfg)
    other = add_raw_vibration(rows, COLUMNS, np.random.default_rng(10), cfg)
    np.testing.assert_array_equal(first.noisy, again.noisy)
    np.testing.assert_array_equal(first.strength, again.strength)
    assert first.bursts == again.bursts and first.frequency == again.frequency
    assert not np.array_equal(first.noisy, other.noisy)
    assert first.noisy.dtype == np.float32 and first.strength.dtype == np.float32
    np.testing.assert_array_equal(rows, _raw_rows(n_steps, seed=6))  # the input is left as it was
    covered = np.zeros(n_steps, dtype=bool)
    for burst in first.bursts:
        start, stop = burst.clipped(n_steps)
        covered[start:stop] = True
    np.testing.assert_array_equal(first.strength > 0, covered)
    assert (first.strength[~covered] == 0).all()
    np.testing.assert_array_equal(first.noisy_steps, first.strength > cfg.strength_threshold)
    if n_steps < burst_steps(cfg)[0]:
        assert covered.all()  # the sequence lies inside its bursts


def test_raw_vibration_without_a_burst_copies_the_rows():
    rows = _with_missing_rows(_raw_rows(30), [3], [4])
    silent = add_raw_vibration(rows, COLUMNS, np.random.default_rng(0), NO_BURST)
    np.testing.assert_array_equal(silent.noisy, rows)
    assert silent.bursts == [] and (silent.strength == 0).all() and silent.frequency == 0.0
    empty = add_raw_vibration(rows[:0], COLUMNS, np.random.default_rng(0), RAW_BURSTS)
    assert empty.noisy.shape == (0, len(COLUMNS)) and empty.strength.shape == (0,)
    with pytest.raises(ValueError, match="rot_w"):
        add_raw_vibration(rows[:, [0, 1, 2, 4, 5, 6]], ["acc_x", "acc_y", "acc_z", "rot_x", "rot_y", "rot_z"],
                          np.random.default_rng(0), RAW_BURSTS)  # fmt: skip
    with pytest.raises(ValueError, match="sensors must be"):
        add_raw_vibration(rows[:, :7], COLUMNS, np.random.default_rng(0), RAW_BURSTS)


@pytest.mark.parametrize("seed", range(3))
def test_rotation_angle_scales_with_rotation_deg_per_unit(seed):
    rows = _raw_rows(100, seed=seed)
    small = add_raw_vibration(
        rows, COLUMNS, np.random.default_rng(seed), replace(RAW_BURSTS, rotation_deg_per_unit=3.0)
    )
    large = add_raw_vibration(
        rows, COLUMNS, np.random.default_rng(seed), replace(RAW_BURSTS, rotation_deg_per_unit=6.0)
    )
    np.testing.assert_array_equal(small.strength, large.strength)
    shaken = small.strength > 0
    assert shaken.any()
    clean_q = rows[shaken, ROT]
    angle_small = _relative_angle(clean_q, small.noisy[shaken, ROT])
    angle_large = _relative_angle(clean_q, large.noisy[shaken, ROT])
    # float32 outputs: about 1e-7 rad of rounding on top of the relative tolerance
    np.testing.assert_allclose(angle_large, 2 * angle_small, rtol=1e-4, atol=1e-6)
    assert np.deg2rad(0.5) < angle_large.max() < np.deg2rad(6.0 * 3 * RAW_BURSTS.max_amplitude)


# ---------------------------------------------------------------- dataset, raw noise
RAW_LENGTHS = (12, 5, 30, 70)
RAW_MAX_LEN = 32


@pytest.fixture(scope="module")
def raw_table():
    """Four test-format sequences with their raw rows (one wearer left-handed, one sequence longer
    than RAW_MAX_LEN), and a normaliser fitted on them."""
    sequences = [
        (f"SEQ_{i:06d}", f"SUBJ_{i % 2:06d}", _raw_rows(n, seed=20 + i).astype(np.float64))
        for i, n in enumerate(RAW_LENGTHS)
    ]
    subjects = ["SUBJ_000000", "SUBJ_000001"]
    table = build_sequence_table(
        make_frame(sequences), make_demographics(subjects, {"SUBJ_000001"}), SETTINGS, keep_sensors=True
    )
    assert table.left_handed.any() and not table.left_handed.all()
    return table, FeatureNormalizer().fit(table)


def _raw_dataset(table, normalizer, **kwargs):
    kwargs.setdefault("noise_cfg", replace(RAW_BURSTS, min_burst_seconds=0.4, max_burst_seconds=1.2))
    return NoiseBERTDataset.from_sequence_table(
        table, normalizer, RAW_MAX_LEN, masking_cfg=MaskingConfig(num_intervals=8), noise_domain="raw",
        settings=SETTINGS, **kwargs,
    )  # fmt: skip


def test_raw_dataset_input_equals_target_where_the_strength_is_zero(raw_table):
    table, normalizer = raw_table
    dataset = _raw_dataset(table, normalizer)
    assert dataset.raw is not None and len(dataset) == table.n_sequences
    imu = np.array(table.feature_groups["imu"])
    other = np.setdiff1d(np.arange(table.features.shape[1]), imu)
    n_noisy = n_changed = 0
    for item in _items(dataset, epochs=range(3)):
        real, masked, noisy = item["padding_mask"], item["masked"], item["noisy"]
        quiet = real & ~masked & (item["noise_strength"] == 0)
        np.testing.assert_array_equal(item["input"][quiet], item["target"][quiet])
        np.testing.assert_array_equal(noisy, item["noise_strength"] > dataset.threshold)
        assert not (masked & noisy).any() and not (masked & ~real).any() and not (noisy & ~real).any()
        assert (item["input"][masked] == 0).all() and (item["input"][~real] == 0).all()
        # thermopiles and ToF are never shaken
        visible = real & ~masked
        np.testing.assert_array_equal(item["input"][visible][:, other], item["target"][visible][:, other])
        n_noisy += int(noisy.sum())
        n_changed += int((item["input"][noisy][:, imu] != item["target"][noisy][:, imu]).any(axis=1).sum())
    assert n_noisy > 0 and n_changed == n_noisy  # every noisy step has shaken IMU features


def test_raw_dataset_target_is_the_tables_features(raw_table):
    """The clean target is the experiments' features: computed over the whole sequence, then cut
    to its last max_len steps (angular velocity, jerk and the quaternion signs of the first kept
    step are the whole sequence's), bit for bit, also for sequences longer than max_len."""
    table, normalizer = raw_table
    item_of = _raw_dataset(table, normalizer, add_noise=False)
    padded = pad_sequences(table, RAW_MAX_LEN, normalizer.transform(table))
    assert max(RAW_LENGTHS) > RAW_MAX_LEN
    for i in range(len(RAW_LENGTHS)):
        item = item_of[i]
        np.testing.assert_array_equal(item["padding_mask"].numpy(), padded.mask[i])
        np.testing.assert_array_equal(item["target"].numpy(), padded.features[i])
        assert not item["noisy"].any() and (item["noise_strength"] == 0).all()
        unmasked = ~item["masked"].numpy()
        np.testing.assert_array_equal(item["input"].numpy()[unmasked], item["target"].numpy()[unmasked])


def test_raw_dataset_needs_the_sensor_rows_and_a_known_domain(raw_table):
    table, normalizer = raw_table
    without_sensors = replace(table, sensors=None)
    with pytest.raises(ValueError, match="keep_sensors"):
        _raw_dataset(without_sensors, normalizer)
    with pytest.raises(ValueError, match="settings"):
        NoiseBERTDataset.from_sequence_table(table, normalizer, RAW_MAX_LEN, noise_domain="raw")
    with pytest.raises(ValueError, match="noise_domain"):
        NoiseBERTDataset.from_sequence_table(table, normalizer, RAW_MAX_LEN, noise_domain="raw_rows")
    # the features domain needs no sensor rows
    features = NoiseBERTDataset.from_sequence_table(
        without_sensors, normalizer, RAW_MAX_LEN, noise_domain="features"
    )
    assert features.raw is None and len(features) == table.n_sequences


def test_transform_rows_equals_transform(raw_table):
    table, normalizer = raw_table
    table = replace(table, feature_present=table.feature_present.copy())
    table.feature_present[1, table.feature_groups["thm"]] = False  # a sequence without thermopiles
    expected = normalizer.transform(table)
    got = normalizer.transform_rows(table.features, table.feature_present, table.lengths)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    absent_rows = slice(table.offsets[1], table.offsets[2])
    assert (got[absent_rows][:, table.feature_groups["thm"]] == 0).all()


# ---------------------------------------------------------------- durations in seconds
def test_spans_and_bursts_are_durations_converted_with_the_sampling_rate():
    """The defaults give the step values runs used at 10 Hz (spans of mean 3, bursts 8-40 steps)
    and the same durations at 50 Hz (15, 40-200); a burst never drops below one step."""
    masking = MaskingConfig()
    assert masking.mean_span_steps(10.0) == 3.0  # exactly: the geometric draws of earlier runs
    assert masking.mean_span_steps(50.0) == 15.0
    assert MaskingConfig(mean_span_seconds=0.01).mean_span_steps(10.0) == 1.0
    assert burst_steps(VibrationNoiseConfig(sampling_rate_hz=10.0)) == (8, 40)
    assert burst_steps(VibrationNoiseConfig(sampling_rate_hz=50.0)) == (40, 200)
    assert burst_steps(VibrationNoiseConfig(min_burst_seconds=0.01, max_burst_seconds=0.02)) == (1, 1)
    for bad in ({"min_burst_seconds": 0.0}, {"min_burst_seconds": 5.0}, {"max_burst_seconds": float("inf")}):
        with pytest.raises(ValueError, match="burst"):
            VibrationNoiseConfig(**bad)
    with pytest.raises(ValueError, match="mean_span_seconds"):
        MaskingConfig(mean_span_seconds=0.0)


def test_masked_spans_last_as_long_in_seconds_at_10_and_50_hz():
    """The same config masks spans of the same mean duration at both rates (0.3 s): the dataset
    converts with the rate its noise is drawn at."""
    durations = {}
    for rate in (10.0, 50.0):
        n_steps = int(40 * rate)  # 40 s, so that many spans are drawn
        noise_cfg = replace(NO_BURST, sampling_rate_hz=rate)
        dataset = NoiseBERTDataset([_clean(n_steps)] * 8, n_steps, noise_cfg, MaskingConfig(mask_ratio=0.3))
        lengths = []
        for index in range(len(dataset)):
            masked = dataset[index]["masked"].numpy().astype(np.int8)
            starts = np.flatnonzero(np.diff(np.r_[0, masked]) == 1)
            stops = np.flatnonzero(np.diff(np.r_[masked, 0]) == -1)
            lengths.extend(stops - starts + 1)
        durations[rate] = np.mean(lengths) / rate
    # adjacent spans merge, so the mean run is a little above 0.3 s at either rate
    assert 0.25 < durations[10.0] < 0.5 and 0.25 < durations[50.0] < 0.5
    assert abs(durations[10.0] - durations[50.0]) < 0.08
